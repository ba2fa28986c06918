//! `cortexflow-agent`: the node daemon. See the crate documentation of `cortexflow_agent`.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The pins stay whatever the exit: the kernel keeps enforcing.
    cortexflow_agent::run(cortexflow_agent::Args::parse())
        .await?
        .exit("cortexflow-agent")
}
