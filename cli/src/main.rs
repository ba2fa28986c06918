//! `cfcli`: the CortexFlow command line (wave 2).
//!
//! It will show live flows from the agents (`Flows.Observe`), identities and policy status.
//! Until then use `kubectl get mp,sid -A`.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "CortexFlow command line (flows, identities, policy status)"
)]
struct Args {}

fn main() {
    let _args = Args::parse();
    println!(
        "cfcli: nothing to do yet; use `kubectl get mp,sid -A` to see policies and identities"
    );
}
