//! The scenarios: the mesh (the datapath with its rules, the socket load balancer) and the
//! sidecar reference (iptables REDIRECT to an haproxy pair).
use super::*;

/// Policies: B admits A on the benchmark ports plus `extra` rules for other identities and
/// ports (installed, never matched by the benchmark traffic); A may open anything to B.
pub(crate) fn mesh_state(topo: &Topology, extra: u32) -> DesiredState {
    let mut ingress = vec![Rule {
        id: 1,
        action: Action::Allow,
        mode: Mode::Enforce,
        peers: Peers::Only(vec![Peer::Identity(ID_A)]),
        ports: PORTS
            .iter()
            .map(|p| PortRange {
                protocol: Protocol::Tcp,
                first: *p,
                last: *p,
            })
            .collect(),
    }];
    for i in 0..extra {
        ingress.push(Rule {
            id: 10 + i,
            action: if i % 10 == 9 {
                Action::Deny
            } else {
                Action::Allow
            },
            mode: Mode::Enforce,
            peers: Peers::Only(vec![Peer::Identity(5000 + i)]),
            ports: vec![PortRange {
                protocol: if i % 2 == 0 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                first: 20000 + (i % 40000) as u16,
                last: 20000 + (i % 40000) as u16,
            }],
        });
    }
    let b_policy = EndpointPolicy {
        ingress,
        egress: vec![],
    };
    let a_policy = EndpointPolicy {
        ingress: vec![],
        egress: vec![Rule {
            id: 2,
            action: Action::Allow,
            mode: Mode::Enforce,
            peers: Peers::Only(vec![Peer::Identity(ID_B)]),
            ports: vec![],
        }],
    };
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    let mut s = DesiredState::default();
    s.endpoints.insert(
        a.ifindex,
        Endpoint {
            ip: a.ip,
            identity: ID_A,
            policy: a_policy,
        },
    );
    s.endpoints.insert(
        b.ifindex,
        Endpoint {
            ip: b.ip,
            identity: ID_B,
            policy: b_policy,
        },
    );
    s.ipcache.insert(a.ip, ID_A);
    s.ipcache.insert(b.ip, ID_B);
    s.ipcache.insert(topo.node_ip, IDENTITY_HOST);
    for i in 0..extra.min(2000) {
        s.ipcache.insert(
            Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250) as u8 + 1),
            5000 + i,
        );
    }
    for p in PORTS {
        s.services.insert(
            Frontend {
                vip: VIP,
                port: p,
                protocol: Protocol::Tcp,
            },
            vec![Backend {
                ip: b.ip,
                port: p,
                weight: 1,
            }],
        );
    }
    s
}

/// The mesh, attached for the life of the value, as the agent runs it by default: flow events
/// for allowed new flows on, and the ring buffer drained as the agent's flow pump does (every
/// 20 ms, or when the kernel wakes it at a quarter full).
pub(crate) struct Mesh {
    pub(crate) dp: Option<TestDatapath>,
    pub(crate) cgroup: Cgroup,
    pub(crate) node: PathBuf,
    pub(crate) drain: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
}

impl Mesh {
    pub(crate) fn up(topo: &Topology, rules: u32, parts: Parts) -> Result<Self, String> {
        let cgroup = Cgroup::create();
        let node = topo.node.path();
        let ifs: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
        let state = mesh_state(topo, rules);
        let cg = cgroup.path.clone();
        let n = node.clone();
        let dp = std::thread::spawn(
            move || -> Result<(TestDatapath, aya::maps::RingBuf<aya::maps::MapData>), String> {
                cortexflow_agent::netns::enter(&n).map_err(|e| e.to_string())?;
                let mut t = TestDatapath::with(Capacity::default(), TcMode::Auto);
                if parts.tc {
                    for i in &ifs {
                        t.dp().attach_interface(i).map_err(|e| e.to_string())?;
                    }
                }
                if parts.socket_lb {
                    t.dp().attach_cgroup(&cg).map_err(|e| e.to_string())?;
                }
                t.dp()
                    .set_events_allowed(parts.events)
                    .map_err(|e| e.to_string())?;
                t.dp().apply(&state).map_err(|e| e.to_string())?;
                let ring = t.dp().take_events().map_err(|e| e.to_string())?;
                Ok((t, ring))
            },
        )
        .join()
        .map_err(|_| "mesh setup panicked".to_string())??;
        let (dp, mut ring) = dp;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let drain = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                while ring.next().is_some() {
                    n += 1;
                }
                std::thread::sleep(cortexflow_agent::flows::DRAIN_EVERY);
            }
            n
        });
        Ok(Self {
            dp: Some(dp),
            cgroup,
            node,
            drain: Some((stop, drain)),
        })
    }

    /// Average ns per run of the TC programs since the last call.
    pub(crate) fn stats(&self) -> Result<(u64, u64), String> {
        let dp = self.dp.as_ref().ok_or("no datapath")?;
        let stats = dp
            .dp
            .as_ref()
            .ok_or("no datapath")?
            .program_stats()
            .map_err(|e| e.to_string())?;
        Ok(stats.iter().fold((0, 0), |(t, n), s| (t + s.1, n + s.2)))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.drain.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
        // Detach inside the node namespace: the pins go, the links with them.
        let dp = self.dp.take();
        let node = self.node.clone();
        let _ = std::thread::spawn(move || {
            let _ = cortexflow_agent::netns::enter(&node);
            drop(dp);
        })
        .join();
    }
}

/// The sidecar reference, set up for the life of the value.
pub(crate) struct Sidecars<'a> {
    pub(crate) topo: &'a Topology,
    pub(crate) _proxies: Vec<Proc>,
    pub(crate) _dir: Tempdir,
}

pub(crate) struct Tempdir(PathBuf);
impl Drop for Tempdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl<'a> Sidecars<'a> {
    pub(crate) fn up(topo: &'a Topology) -> Result<Self, String> {
        let (a, b) = (&topo.pods[0], &topo.pods[1]);
        let dir = Tempdir(std::env::temp_dir().join(common::unique("cfbench-")));
        std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
        let global = format!(
            "global\n  maxconn 4096\n  uid {PROXY_UID}\n  gid {PROXY_UID}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        );
        let mut client_cfg = global.clone();
        let mut server_cfg = global;
        for (k, p) in PORTS.iter().enumerate() {
            let out_port = 15000 + k as u16;
            let in_port = 16000 + k as u16;
            client_cfg.push_str(&format!(
                "listen out{p}\n  bind 127.0.0.1:{out_port}\n  server s {}:{p}\n",
                b.ip
            ));
            server_cfg.push_str(&format!(
                "listen in{p}\n  bind 0.0.0.0:{in_port}\n  server s 127.0.0.1:{p}\n"
            ));
            // Outbound capture in the client pod (the proxy's own connections excepted) and
            // inbound capture in the server pod, as sidecar meshes install them.
            a.ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &b.ip.to_string(),
                "--dport",
                &p.to_string(),
                "-m",
                "owner",
                "!",
                "--uid-owner",
                PROXY_UID,
                "-j",
                "REDIRECT",
                "--to-ports",
                &out_port.to_string(),
            ]);
            b.ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                &p.to_string(),
                "-j",
                "REDIRECT",
                "--to-ports",
                &in_port.to_string(),
            ]);
        }
        let ccfg = dir.0.join("client.cfg");
        let scfg = dir.0.join("server.cfg");
        std::fs::write(&ccfg, client_cfg).map_err(|e| e.to_string())?;
        std::fs::write(&scfg, server_cfg).map_err(|e| e.to_string())?;
        let proxies = vec![
            spawn_in(
                &a.ns,
                &["haproxy", "-db", "-f", &ccfg.display().to_string()],
            )?,
            spawn_in(
                &b.ns,
                &["haproxy", "-db", "-f", &scfg.display().to_string()],
            )?,
        ];
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self {
            topo,
            _proxies: proxies,
            _dir: dir,
        })
    }
}

impl Drop for Sidecars<'_> {
    fn drop(&mut self) {
        for p in &self.topo.pods {
            let _ = Command::new("ip")
                .args(["netns", "exec", &p.ns.name, "iptables", "-t", "nat", "-F"])
                .status();
        }
    }
}
