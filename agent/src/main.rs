//! `cortexflow-agent`: the node daemon. See the crate documentation of `cortexflow_agent`.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let exit = cortexflow_agent::run(cortexflow_agent::Args::parse()).await?;
    if let cortexflow_runtime::Exit::Failed(reason) = &exit {
        eprintln!("cortexflow-agent: {reason}");
    }
    // Exit now, whatever is still running (it was drained or is dead); the pins stay.
    std::process::exit(exit.code());
}
