//! `cortexflow-cni`: the chained CNI plugin that has the node's agent guard a new pod's
//! interface before its container starts (see `cortexflow_agent::cni`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let code = cortexflow_agent::cni::plugin(
        &command,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    ExitCode::from(code as u8)
}
