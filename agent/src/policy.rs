//! What the datapath enforces, in plain Rust: the per-endpoint policy the operator compiles
//! from MeshPolicies, and the reference model of the decision the kernel takes
//! ([`cortexflow_domain::verdict`], shared with `cfcli policy diff`).
pub use cortexflow_domain::verdict::{PeerAddr, Verdict, decide, rule_matches, untrackable};
pub use cortexflow_domain::{
    Action, Cidr, Direction, EndpointPolicy, Mode, Peer, Peers, PortRange, Protocol, Rule,
};

/// The `DIR_*` constant of the shared kernel types for a direction.
pub const fn dir_u8(dir: Direction) -> u8 {
    match dir {
        Direction::Ingress => cortexflow_common::DIR_INGRESS,
        Direction::Egress => cortexflow_common::DIR_EGRESS,
    }
}
