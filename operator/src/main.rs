//! `cortexflow-operator`: see the crate documentation of `cortexflow_operator`.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cortexflow_operator::run(cortexflow_operator::Args::parse())
        .await?
        .exit("cortexflow-operator")
}
