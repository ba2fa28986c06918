//! `cortexflow-operator`: see the crate documentation of `cortexflow_operator`.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "CortexFlow operator")]
struct Args {}

fn main() {
    let _args = Args::parse();
    println!(
        "cortexflow-operator: not implemented yet; CRDs served: {}",
        cortexflow_operator::crds::crds()
            .iter()
            .map(|c| c.spec.names.kind.clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
}
