//! `cortexflow-operator`: see the crate documentation of `cortexflow_operator`.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let exit = cortexflow_operator::run(cortexflow_operator::Args::parse()).await?;
    if let cortexflow_runtime::Exit::Failed(reason) = &exit {
        eprintln!("cortexflow-operator: {reason}");
    }
    // Exit now, whatever is still running (it was drained or is dead).
    std::process::exit(exit.code());
}
