//! The expansion of a policy into map entries is bounded by the maps' capacities: a config far
//! too large for the kernel is refused with the map it overflows, in memory of the order of
//! the maps themselves, instead of being materialised first.
//!
//! The compile runs in a child process (this test binary again) whose address space is capped
//! with `ulimit -v`: an unbounded expansion of the policy below (about 10^8 entries, several
//! GB) aborts the child on allocation failure and fails the test; a bounded one reports its
//! peak resident memory, which the test also bounds.
use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use cortexflow_agent::{
    compile::{self, Allocator, DesiredState, Endpoint, Limits},
    datapath::Capacity,
    policy::{Action, EndpointPolicy, Mode, Peer, Peers, PortRange, Protocol, Rule},
};

const CHILD: &str = "CF_COMPILE_BOUND_CHILD";
/// The child's address space: far below what the unbounded expansion needs.
const ADDRESS_SPACE_KB: u64 = 1024 * 1024;
/// Its peak resident memory: the maps' capacities in compile's data structures, with room.
const MAX_RSS_KB: u64 = 256 * 1024;

/// One policy as the issue describes it: 32 rules (the most per direction), each with 32 port
/// ranges of up to 16 prefix blocks and a peer list of 10 000 identities (what
/// `namespaceSelector: {}` becomes in a large cluster).
fn oversized() -> DesiredState {
    let peers: Vec<Peer> = (0..10_000).map(|i| Peer::Identity(1000 + i)).collect();
    let rule = |id: u32| Rule {
        id,
        action: Action::Allow,
        mode: Mode::Enforce,
        peers: Peers::Only(peers.clone()),
        ports: (0..32u16)
            .map(|p| PortRange {
                protocol: if p % 2 == 0 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                first: 1 + p * 1000 + id as u16,
                last: 999 + p * 1000,
            })
            .collect(),
    };
    DesiredState {
        endpoints: BTreeMap::from([(
            1,
            Endpoint {
                ip: Ipv4Addr::new(10, 244, 0, 1),
                identity: 300,
                policy: EndpointPolicy {
                    ingress: (1..=32).map(rule).collect(),
                    egress: vec![],
                },
            },
        )]),
        ..Default::default()
    }
}

fn vm_hwm_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn child() {
    let state = oversized();
    let c = Capacity::default();
    let limits = Limits {
        cidrs: c.cidrs as usize,
        policy: c.policy as usize,
        policy_exact: c.policy_exact as usize,
        backends: c.backends as usize,
    };
    let before = vm_hwm_kb().unwrap_or(0);
    let result = compile::compile(&state, &mut Allocator::default(), limits);
    let after = vm_hwm_kb().unwrap_or(0);
    match result {
        Err(e) => println!(
            "REFUSED map={} hwm_before_kb={before} hwm_kb={after} {e}",
            e.map
        ),
        Ok(m) => println!("COMPILED entries={}", m.policy.len()),
    }
}

#[test]
fn an_oversized_policy_is_refused_in_bounded_memory() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {ADDRESS_SPACE_KB} && exec \"$0\" --exact an_oversized_policy_is_refused_in_bounded_memory --nocapture --test-threads 1"
        ))
        .arg(&exe)
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed ({}): an unbounded expansion runs out of its {} MiB of address space\n{stdout}\n{}",
        out.status,
        ADDRESS_SPACE_KB / 1024,
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness prints the test's name on the same line.
    let line = stdout
        .lines()
        .find_map(|l| {
            l.find("REFUSED")
                .or_else(|| l.find("COMPILED"))
                .map(|i| &l[i..])
        })
        .unwrap_or_else(|| panic!("no result from the child:\n{stdout}"));
    assert!(line.starts_with("REFUSED map=CF_POLICY "), "{line}");
    let hwm: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hwm_kb="))
        .and_then(|v| v.parse().ok())
        .expect("peak memory");
    assert!(
        hwm < MAX_RSS_KB,
        "peak resident memory {hwm} kB over {MAX_RSS_KB} kB: {line}"
    );
    eprintln!("{line}");
}
