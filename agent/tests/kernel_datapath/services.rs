//! Service load balancing at the socket: weights, no backend, UDP reverse translation.
use super::{
    netns::{drop_in_node, pod_state, topology_with_datapath},
    *,
};

/// Runs this test binary as a client inside `ns` and `cgroup`: it waits for a line on stdin
/// (sent once it is in the cgroup), then connects `count` times and prints one line per result.
pub(crate) fn client(
    ns: &common::Netns,
    cgroup: &Cgroup,
    mode: &str,
    target: SocketAddrV4,
    count: usize,
) -> Vec<String> {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .env("CF_HELPER", mode)
        .env("CF_TARGET", target.to_string())
        .env("CF_COUNT", count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client");
    cgroup.add(child.id());
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let out = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().expect("wait");
    assert!(status.success(), "client failed");
    out
}

/// The client side of [`client`].
pub(crate) fn helper(mode: &str) -> ExitCode {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let target: SocketAddrV4 = std::env::var("CF_TARGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("CF_TARGET");
    let count: usize = std::env::var("CF_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let result = match mode {
            "tcp" => {
                let start = Instant::now();
                match TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)) {
                    Ok(s) => {
                        let mut buf = String::new();
                        let _ = BufReader::new(s).read_line(&mut buf);
                        format!("ok {}", buf.trim())
                    }
                    Err(e) => format!("err {:?} {}us", e.kind(), start.elapsed().as_micros()),
                }
            }
            _ => {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.set_read_timeout(Some(Duration::from_secs(1)))
                    .expect("timeout");
                match s.send_to(b"ping", target) {
                    Ok(_) => {
                        let mut buf = [0u8; 64];
                        match s.recv_from(&mut buf) {
                            Ok((n, from)) => {
                                format!("ok {} {}", String::from_utf8_lossy(&buf[..n]), from)
                            }
                            Err(e) => format!("err {:?}", e.kind()),
                        }
                    }
                    Err(e) => format!("err {:?}", e.kind()),
                }
            }
        };
        let _ = writeln!(out, "{result}");
    }
    ExitCode::SUCCESS
}

pub(crate) fn service_topology(
    net: u8,
    backends: &[(usize, u32)],
    vip: Ipv4Addr,
) -> (Topology, TestDatapath, Cgroup) {
    let (topo, mut t) = topology_with_datapath(4, net, TcMode::Auto);
    let cgroup = Cgroup::create();
    t.dp().attach_cgroup(&cgroup.path).expect("attach cgroup");
    let mut s = pod_state(&topo, &[]);
    s.services.insert(
        Frontend {
            vip,
            port: 80,
            protocol: Protocol::Tcp,
        },
        backends
            .iter()
            .map(|(i, w)| Backend {
                ip: topo.pods[*i].ip,
                port: 8080,
                weight: *w,
            })
            .collect(),
    );
    s.services.insert(
        Frontend {
            vip,
            port: 53,
            protocol: Protocol::Udp,
        },
        backends
            .iter()
            .map(|(i, w)| Backend {
                ip: topo.pods[*i].ip,
                port: 5353,
                weight: *w,
            })
            .collect(),
    );
    t.dp().apply(&s).expect("apply");
    (topo, t, cgroup)
}

pub(crate) fn service_weights() {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let (topo, mut t, cgroup) = service_topology(206, &[(1, 1), (2, 2), (3, 3)], vip);
    let _servers: Vec<Server> = [(1, "b1"), (2, "b2"), (3, "b3")]
        .iter()
        .map(|(i, tag)| Server::start(&topo.pods[*i].ns, 8080, tag))
        .collect();
    const N: usize = 6000;
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "tcp",
        SocketAddrV4::new(vip, 80),
        N,
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        *counts.entry(l.clone()).or_default() += 1;
    }
    assert_eq!(lines.len(), N);
    let failures: usize = counts
        .iter()
        .filter(|(k, _)| !k.starts_with("ok"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures, 0, "failed connects: {counts:?}");
    // Each backend's share within 5 standard deviations of its weight's share.
    for (tag, w) in [("ok b1", 1.0), ("ok b2", 2.0), ("ok b3", 3.0)] {
        let p: f64 = w / 6.0;
        let want = N as f64 * p;
        let sd = (N as f64 * p * (1.0 - p)).sqrt();
        let got = *counts.get(tag).unwrap_or(&0) as f64;
        assert!(
            (got - want).abs() <= 5.0 * sd,
            "{tag}: {got} connects, want {want:.0} ± {:.0}: {counts:?}",
            5.0 * sd
        );
    }
    // Closed connections free their conntrack entries (two per connection: the client's
    // egress and the backend's ingress): the table does not fill up with dead flows.
    std::thread::sleep(Duration::from_millis(200));
    let ct = t.dp().conntrack_entries().expect("conntrack");
    eprintln!("service weights 1:2:3 over {N} connects: {counts:?}; {ct} conntrack entries left");
    assert!(
        ct < N / 20,
        "{ct} conntrack entries left after {N} closed connections"
    );
    drop(cgroup);
    drop_in_node(&topo, t);
}

pub(crate) fn service_no_backend() {
    let vip = Ipv4Addr::new(10, 96, 0, 11);
    let (topo, t, cgroup) = service_topology(207, &[], vip);
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "tcp",
        SocketAddrV4::new(vip, 80),
        5,
    );
    for l in &lines {
        assert!(
            l.starts_with("err ConnectionRefused"),
            "want ECONNREFUSED, got {l}"
        );
        let us: u64 = l
            .split_whitespace()
            .last()
            .and_then(|s| s.trim_end_matches("us").parse().ok())
            .unwrap_or(u64::MAX);
        assert!(us < 100_000, "refused only after {us} µs: {l}");
    }
    drop(cgroup);
    drop_in_node(&topo, t);
}

pub(crate) fn service_udp() {
    let vip = Ipv4Addr::new(10, 96, 0, 12);
    let (topo, t, cgroup) = service_topology(208, &[(2, 1)], vip);
    let _srv = Server::start(&topo.pods[2].ns, 5353, "dns");
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "udp",
        SocketAddrV4::new(vip, 53),
        3,
    );
    for l in &lines {
        assert_eq!(
            l,
            &format!("ok dns {vip}:53"),
            "reply must come from the Service address"
        );
    }
    drop(cgroup);
    drop_in_node(&topo, t);
    let _ = sh(&["true"]);
    let _ = DIR_EGRESS;
}
