//! `cortexflow-agent`: the node daemon. See the crate documentation of `cortexflow_agent`.
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "CortexFlow node agent")]
struct Args {
    /// Name of the node this agent serves.
    #[arg(long, env = "CORTEXFLOW_NODE_NAME")]
    node_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "cortexflow-agent (node {:?}): embedded kernel object of {} bytes",
        args.node_name,
        cortexflow_agent::loader::EBPF_OBJECT.len()
    );
    Ok(())
}
