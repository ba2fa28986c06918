//! What the node's kernel offers the agent: the eBPF program and map types the datapath uses
//! (the agent cannot start without them) and those later parts will use, probed at start-up by
//! loading a trivial program or creating a one-entry map of each type (aya's feature probes),
//! and exported as `cortexflow_agent_kernel_feature` so that `cfcli check` can report them per
//! node.
use aya::{maps::MapType, programs::ProgramType, sys};

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    /// The metric's `feature` label.
    pub name: &'static str,
    /// Whether this version's datapath needs it.
    pub required: bool,
    /// What it is for (logged when it is missing).
    pub purpose: &'static str,
    pub available: bool,
}

enum Probe {
    Program(ProgramType),
    Map(MapType),
    /// Known without a probe (e.g. how the datapath attached).
    Known(bool),
}

/// Probes every feature; `tcx` is whether the datapath attached its TC programs as tcx links.
pub fn probe(tcx: bool) -> Vec<Feature> {
    let table: [(&'static str, bool, &'static str, Probe); 12] = [
        (
            "sched_cls",
            true,
            "the TC programs on pod interfaces (policy, flows)",
            Probe::Program(ProgramType::SchedClassifier),
        ),
        (
            "cgroup_sock_addr",
            true,
            "Service translation at connect and sendmsg",
            Probe::Program(ProgramType::CgroupSockAddr),
        ),
        (
            "map_hash",
            true,
            "endpoints and Services",
            Probe::Map(MapType::Hash),
        ),
        (
            "map_lpm_trie",
            true,
            "identities of addresses and port ranges of rules",
            Probe::Map(MapType::LpmTrie),
        ),
        (
            "map_lru_hash",
            true,
            "connection tracking",
            Probe::Map(MapType::LruHash),
        ),
        (
            "map_ringbuf",
            true,
            "flow events",
            Probe::Map(MapType::RingBuf),
        ),
        (
            "map_percpu_array",
            true,
            "packet counters",
            Probe::Map(MapType::PerCpuArray),
        ),
        (
            "tcx",
            false,
            "TC links that cannot be detached by others (else clsact qdiscs)",
            Probe::Known(tcx),
        ),
        (
            "sk_lookup",
            false,
            "steering inbound connections to the mTLS proxy (not used yet)",
            Probe::Program(ProgramType::SkLookup),
        ),
        (
            "cgroup_sockopt",
            false,
            "the original destination for the mTLS proxy (not used yet)",
            Probe::Program(ProgramType::CgroupSockopt),
        ),
        (
            "sock_ops",
            false,
            "socket events for the mTLS proxy (not used yet)",
            Probe::Program(ProgramType::SockOps),
        ),
        (
            "sk_msg",
            false,
            "socket message redirection (not used yet)",
            Probe::Program(ProgramType::SkMsg),
        ),
    ];
    table
        .into_iter()
        .map(|(name, required, purpose, probe)| {
            let available = match probe {
                Probe::Program(t) => sys::is_program_supported(t).unwrap_or_else(|e| {
                    tracing::warn!(feature = name, error = %e, "feature probe failed");
                    false
                }),
                Probe::Map(t) => sys::is_map_supported(t).unwrap_or_else(|e| {
                    tracing::warn!(feature = name, error = %e, "feature probe failed");
                    false
                }),
                Probe::Known(b) => b,
            };
            Feature {
                name,
                required,
                purpose,
                available,
            }
        })
        .collect()
}

/// The kernel's release (`uname -r`), or `unknown`.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
