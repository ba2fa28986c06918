//! `cortexflow-proxy`: the mTLS proxy. See the crate documentation of `cortexflow_proxy`.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cortexflow_proxy::run(cortexflow_proxy::Args::parse())
        .await?
        .exit("cortexflow-proxy")
}
