//! No identity by forged source address: a pod that sends with another address (raw socket)
//! is dropped at its own veth with a `spoofed` flow — also a pod the config does not name yet,
//! whose interface the agent guards as soon as its route appears.
use std::net::UdpSocket;

use cortexflow_testkit::net::{Netns, forge_udp, wire_pod};

use super::*;

/// Listens on UDP `port` in `ns` for `wait` and returns the payloads received.
fn listen(ns: &Netns, port: u16, wait: Duration) -> std::thread::JoinHandle<Vec<String>> {
    let path = ns.path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        enter(&path).expect("enter netns");
        let s = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let end = Instant::now() + wait;
        let mut buf = [0u8; 256];
        while Instant::now() < end {
            if let Ok(n) = s.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    });
    let _ = ready_rx.recv();
    h
}

/// Runs `cortexflow-cni` as a container runtime does after the pod network's plugin: ADD, the
/// previous plugin's result on stdin. Returns (success, output).
fn run_cni_add(socket: &std::path::Path, host_if: &str, ip: Ipv4Addr) -> (bool, String) {
    use std::io::Write as _;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "type": "cortexflow-cni",
        "socket": socket,
        "timeoutSeconds": 5,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": host_if}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": format!("{ip}/32"), "interface": 1}]
        }
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cortexflow-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "test")
        .env("CNI_NETNS", "/var/run/netns/x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run cortexflow-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write the config");
    let out = child.wait_with_output().expect("cortexflow-cni");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Sends from `ns` one datagram per `(source, tag)` to `dst:port`.
fn send_all(ns: &Netns, dst: Ipv4Addr, port: u16, sends: Vec<(Ipv4Addr, String)>) {
    ns.run(move || {
        for (src, tag) in sends {
            forge_udp(src, 40000, dst, port, tag.as_bytes()).expect("raw send");
        }
    });
}

pub(crate) fn forged_sources_are_dropped_at_the_senders_veth() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let cni_dir = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-cni-"));
        let socket = cni_dir.join("cni.sock");
        let mut node = node(3, 74, &["--cni-socket", &socket.to_string_lossy()]);
        let open = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v = op.set(&node_config(&node.topo, &open, 0));
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v
        })
        .await;
        let mut flows = node.local_flows().await.expect("connect Flows");
        let mut stream = flows
            .observe(ObserveRequest {
                namespace: String::new(),
                pod: String::new(),
                verdicts: vec!["dropped".into()],
                direction: String::new(),
                limit: 0,
                ..Default::default()
            })
            .await
            .expect("observe")
            .into_inner();
        let (p0, p1, p2) = (
            node.topo.pods[0].ip,
            node.topo.pods[1].ip,
            node.topo.pods[2].ip,
        );
        let node_ip = node.topo.node_ip;
        let port = 7070;

        // A pod the config does not name: wired after the agent started (its route appears),
        // like a pod the operator has not told this node about yet.
        let stranger = Netns::new("cfp");
        let stranger_ip = Ipv4Addr::new(10, 74, 0, 99);
        let wired = Instant::now();
        wire_pod(&node.topo.node, &stranger, stranger_ip, "cfvx");
        let pinned = pinned(&node);
        let guarded_after = loop {
            if pinned
                .endpoints()
                .expect("endpoints")
                .get(&stranger_ip)
                .is_some_and(|(_, identity)| *identity == cortexflow_common::IDENTITY_UNKNOWN)
            {
                break wired.elapsed();
            }
            assert!(
                wired.elapsed() < Duration::from_secs(5),
                "the stranger's interface is not guarded after 5 s:\n{}",
                node.agent().log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };

        // p1 (programmed) and the stranger each send to p2 (which anyone may reach) with
        // their own address, with p0's, with the node's, and with an outside address.
        // A pod the runtime sets up with the CNI hook: the plugin returns once its interface is
        // guarded, and the pod sends at once — no wait.
        let newcomer = Netns::new("cfp");
        let newcomer_ip = Ipv4Addr::new(10, 74, 0, 98);
        wire_pod(&node.topo.node, &newcomer, newcomer_ip, "cfvy");
        let t_cni = Instant::now();
        let cni = run_cni_add(&socket, "cfvy", newcomer_ip);
        let cni_ms = t_cni.elapsed().as_secs_f64() * 1e3;
        assert!(cni.0, "the CNI ADD succeeds: {}", cni.1);
        let outside = Ipv4Addr::new(203, 0, 113, 7);
        let rx_first = listen(&node.topo.pods[2].ns, port + 1, Duration::from_millis(800));
        send_all(
            &newcomer,
            p2,
            port + 1,
            vec![
                (p0, "newcomer-as-p0".into()),
                (newcomer_ip, "newcomer-own".into()),
            ],
        );
        let first = tokio::task::block_in_place(|| rx_first.join().expect("listener"));
        assert_eq!(
            first,
            vec!["newcomer-own".to_string()],
            "right after the CNI ADD, the forged first packet is dropped and the own one passes"
        );
        let rx = listen(&node.topo.pods[2].ns, port, Duration::from_millis(1500));
        let from = |who: &str, own: Ipv4Addr| {
            vec![
                (own, format!("{who}-own")),
                (p0, format!("{who}-as-p0")),
                (node_ip, format!("{who}-as-node")),
                (outside, format!("{who}-as-outside")),
            ]
        };
        send_all(&node.topo.pods[1].ns, p2, port, from("p1", p1));
        send_all(&stranger, p2, port, from("stranger", stranger_ip));
        let got = tokio::task::block_in_place(|| rx.join().expect("listener"));
        let mut got_sorted = got.clone();
        got_sorted.sort();
        assert_eq!(
            got_sorted,
            vec!["p1-own".to_string(), "stranger-own".to_string()],
            "only datagrams with the sender's own address arrive"
        );

        // Six spoofed drops, each with a flow naming the sender's interface's address.
        let mut spoofed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while spoofed.len() < 7 && Instant::now() < deadline {
            let Ok(Ok(Some(f))) =
                tokio::time::timeout(Duration::from_millis(500), stream.message()).await
            else {
                continue;
            };
            if f.reason == "spoofed" {
                spoofed.push((
                    Ipv4Addr::from(f.source.as_ref().map_or(0, |s| s.ip)),
                    f.direction.clone(),
                ));
            }
        }
        spoofed.sort();
        let mut want: Vec<(Ipv4Addr, String)> = [p0, p0, p0, node_ip, node_ip, outside, outside]
            .into_iter()
            .map(|ip| (ip, "egress".to_string()))
            .collect();
        want.sort();
        assert_eq!(spoofed, want, "one spoofed flow per forged datagram, at the sender");
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(
                &text,
                "cortexflow_agent_endpoints",
                "state=\"guarded\""
            ),
            Some(2.0),
            "the stranger's and the newcomer's interfaces are counted as guarded"
        );
        eprintln!(
            "forged sources: 7/7 dropped at the sender's veth (a programmed pod; one the config does not name, guarded {:.1} ms after its route appeared; one set up by the CNI hook, whose ADD took {cni_ms:.1} ms, its first packet checked); own addresses 3/3 delivered",
            guarded_after.as_secs_f64() * 1e3
        );
        drop(stranger);
        drop(newcomer);
        let _ = std::fs::remove_dir_all(&cni_dir);
        op.stop().await;
    });
}
