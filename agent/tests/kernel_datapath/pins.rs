//! Capacity refusals, pinned maps of another size or layout, restarts from the pins.
use super::*;

pub(crate) fn capacity_refused_whole() {
    let capacity = Capacity {
        policy: 64,
        ..Capacity::default()
    };
    let mut t = TestDatapath::with(capacity, TcMode::Auto);
    let small = EndpointPolicy {
        ingress: vec![allow_tcp(1, 301, 80)],
        egress: vec![],
    };
    t.dp().apply(&state(small, &[])).expect("small config fits");
    let before = t.dp().read_installed().expect("read");
    // 40 identities × (1-65535 → 16 blocks) = 640 policy entries.
    let big = EndpointPolicy {
        ingress: vec![rule(
            2,
            Action::Allow,
            Mode::Enforce,
            ids(&(400..440).collect::<Vec<_>>()),
            vec![tcp_ports(1, 65535)],
        )],
        egress: vec![],
    };
    let ipcache: Vec<(Ipv4Addr, u32)> = (0..50u8)
        .map(|i| (Ipv4Addr::new(10, 9, 0, i), 500 + u32::from(i)))
        .collect();
    let err = t
        .dp()
        .apply(&state(big, &ipcache))
        .expect_err("must not fit");
    // The expansion stops at the map's capacity: compiling never materialises the 640.
    match &err {
        DatapathError::Overflow(o) => {
            assert_eq!(o.map, "CF_POLICY");
            assert_eq!(o.limit, 64);
        }
        other => panic!("wrong error {other}"),
    }
    assert_eq!(err.full_map(), Some("CF_POLICY"));
    let msg = err.to_string();
    assert!(
        msg.contains("CF_POLICY")
            && msg.contains("more than 64")
            && msg.contains("nothing was applied"),
        "{msg}"
    );
    assert_eq!(
        t.dp().read_installed().expect("read"),
        before,
        "nothing of the refused config was written"
    );
}

pub(crate) fn pinned_capacity_mismatch() {
    let mut t = TestDatapath::new();
    t.close();
    let err =
        cortexflow_agent::datapath::Datapath::open(cortexflow_agent::datapath::DatapathOptions {
            pin_dir: t.pin_dir.clone(),
            capacity: Capacity {
                conntrack: 1024,
                ..Capacity::default()
            },
            tc_mode: TcMode::Auto,
        })
        .err()
        .expect("must refuse");
    assert!(
        matches!(err, DatapathError::PinnedMismatch { map: "CF_CT", .. }),
        "{err}"
    );
}

/// A pinned map left by an agent whose value layout differs (here: an ipcache of 4-byte values,
/// the layout before same-node delivery) is refused by name instead of being reused.
pub(crate) fn pinned_layout_mismatch() {
    let mut t = TestDatapath::new();
    t.close();
    let pin = t.pin_dir.join("maps/CF_IPCACHE");
    std::fs::remove_file(&pin).expect("unpin the ipcache");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "65536",
            "name",
            "CF_IPCACHE",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err =
        cortexflow_agent::datapath::Datapath::open(cortexflow_agent::datapath::DatapathOptions {
            pin_dir: t.pin_dir.clone(),
            capacity: Capacity::default(),
            tc_mode: TcMode::Auto,
        })
        .err()
        .expect("must refuse");
    assert!(
        matches!(
            err,
            DatapathError::PinnedMismatch {
                map: "CF_IPCACHE",
                what: "value size",
                have: 4,
                want: 8,
                ..
            }
        ),
        "{err}"
    );
}

pub(crate) fn restart_reopens_pins() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let mut t = TestDatapath::new();
    let p = EndpointPolicy {
        ingress: vec![rule(
            5,
            Action::Allow,
            Mode::Enforce,
            ids(&[301]),
            vec![tcp_ports(80, 90)],
        )],
        egress: vec![rule(6, Action::Deny, Mode::Audit, Peers::Any, vec![])],
    };
    let mut s = state(p, &[(peer, 301)]);
    s.services.insert(
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 9),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vec![Backend {
            ip: peer,
            port: 8080,
            weight: 1,
        }],
    );
    t.dp().apply(&s).expect("apply");
    let before = t.dp().read_installed().expect("read");
    let generation = t.dp().generation();
    t.close();
    t.reopen();
    assert_eq!(
        t.dp().installed(),
        &before,
        "a restarted datapath reads the previous state back"
    );
    assert_eq!(t.dp().generation(), generation);
    let stats = t.dp().apply(&s).expect("apply");
    assert_eq!(
        (stats.written, stats.deleted, stats.generation_bumped),
        (0, 0, false),
        "same state: nothing to write"
    );
}
