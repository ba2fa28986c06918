//! A config reaches the kernel and enforces; invalid and oversized configs keep the last good
//! state.
use super::*;

pub(crate) fn config_reaches_the_kernel() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 71, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        node.start_agent(&op.control()).expect("start agent");
        // Not ready before the first config (the operator has none to give yet).
        let deadline = Instant::now() + Duration::from_secs(20);
        let not_ready = loop {
            if let Some((code, _)) = node.admin("/readyz").await {
                break code;
            }
            assert!(Instant::now() < deadline, "{}", node.agent().log_tail(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(not_ready, 503, "/readyz before the first config");
        assert_eq!(node.admin("/healthz").await.map(|r| r.0), Some(200));

        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v = op.set(&node_config(&node.topo, &policy, 100));
        node.wait_ready(Duration::from_secs(10))
            .await
            .expect("ready");
        let r = op
            .report("applied", Duration::from_secs(10), |r| {
                r.applied_version == v
            })
            .await;
        assert_eq!(r.node, NODE);
        assert_eq!(r.failed_version, 0);
        assert_eq!(r.policies.len(), 1);
        assert_eq!(r.policies[0].generation, 1);

        // The pinned maps hold the config.
        let pinned = pinned(&node);
        let eps = pinned.endpoints().expect("endpoints");
        assert_eq!(eps.len(), 3);
        for (i, pod) in node.topo.pods.iter().enumerate() {
            assert_eq!(eps.get(&pod.ip), Some(&(pod.ifindex, identity(i))), "p{i}");
        }
        let ipc = pinned.ipcache().expect("ipcache");
        // The pods, 100 remote addresses, and the node's own address (the host identity).
        assert_eq!(ipc.len(), 104);
        assert_eq!(ipc.get(&node.topo.node_ip), Some(&1));
        assert_eq!(ipc.get(&node.topo.pods[2].ip), Some(&identity(2)));
        assert_eq!(ipc.get(&Ipv4Addr::new(10, 250, 0, 99)), Some(&5000));

        // Flows.Observe: a dropped flow into p1, with names.
        let mut flows = node.local_flows().await.expect("connect Flows");
        let mut stream = flows
            .observe(ObserveRequest {
                namespace: NS.into(),
                pod: "p1".into(),
                verdicts: vec!["dropped".into()],
                direction: String::new(),
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("observe")
            .into_inner();
        assert_enforces(&node, &policy, &[8080, 9090]);
        let flow = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a flow within 5 s")
            .expect("stream")
            .expect("a flow");
        let (src, dst) = (flow.source.expect("src"), flow.destination.expect("dst"));
        assert_eq!(flow.node, NODE);
        assert_eq!(flow.verdict, "dropped");
        assert_eq!(flow.direction, "ingress");
        assert_eq!((dst.namespace.as_str(), dst.pod.as_str()), (NS, "p1"));
        assert_eq!(dst.identity_name, "shop/p1");
        assert!(
            ["p0", "p2"].contains(&src.pod.as_str()),
            "source {src:?} is a denied peer"
        );
        eprintln!(
            "flow: {} {} {}:{} ({}) → {}:{} ({}) reason {}",
            flow.direction,
            flow.verdict,
            Ipv4Addr::from(src.ip),
            src.port,
            src.identity_name,
            Ipv4Addr::from(dst.ip),
            dst.port,
            dst.identity_name,
            flow.reason
        );

        // The history: the same flow again, to a client that comes later and asks for the
        // last flows only (`cfcli flows --last`, `cfcli explain`); the stream ends after it.
        let mut history = flows
            .observe(ObserveRequest {
                namespace: NS.into(),
                pod: "p1".into(),
                verdicts: vec!["dropped".into()],
                last: 1000,
                history_only: true,
                ..Default::default()
            })
            .await
            .expect("observe the history")
            .into_inner();
        let mut kept = Vec::new();
        while let Some(f) = tokio::time::timeout(Duration::from_secs(5), history.message())
            .await
            .expect("the history ends within 5 s")
            .expect("stream")
        {
            kept.push(f);
        }
        assert!(
            kept.iter()
                .any(|f| f.time_unix_nanos == flow.time_unix_nanos
                    && f.destination.as_ref().map(|d| d.ip) == Some(dst.ip)),
            "the history lacks the flow just seen: {kept:?}"
        );
        assert!(
            kept.iter()
                .all(|f| f.verdict == "dropped"
                    && f.destination.as_ref().is_some_and(|d| d.pod == "p1")),
            "the history ignores the filters: {kept:?}"
        );
        let mut one = flows
            .observe(ObserveRequest {
                last: 1,
                history_only: true,
                ..Default::default()
            })
            .await
            .expect("observe the last flow")
            .into_inner();
        let mut n = 0;
        while tokio::time::timeout(Duration::from_secs(5), one.message())
            .await
            .expect("ends")
            .expect("stream")
            .is_some()
        {
            n += 1;
        }
        assert_eq!(n, 1, "last: 1 sent {n} flows");

        // The network port: no flows without the Kubernetes API to authorize callers (this agent
        // has none), in plaintext never.
        let control = op.control();
        let trust = cortexflow_trust::TrustStore::new(
            cortexflow_testkit::scripted_operator::TRUST_DOMAIN,
            cortexflow_trust::Bundle::from_pem(
                &std::fs::read(&control.bundle_file).expect("bundle"),
            )
            .expect("bundle"),
        );
        let tls = cortexflow_trust::tls::client_config(
            None,
            trust,
            &cortexflow_domain::spiffe::node_agent(
                cortexflow_testkit::scripted_operator::TRUST_DOMAIN,
                &node.name,
            ),
        )
        .expect("TLS config");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc))
            .expect("uri")
            .connect_with_connector(cortexflow_trust::tls::connector(tls))
            .await
            .expect("TLS to the agent, verified as its node");
        let e = FlowsClient::new(channel)
            .observe(ObserveRequest::default())
            .await
            .expect_err("refused without an API to authorize");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        let plain = FlowsClient::connect(format!("http://{}", node.grpc)).await;
        let plain_refused = match plain {
            Err(_) => true,
            Ok(mut c) => c.observe(ObserveRequest::default()).await.is_err(),
        };
        assert!(plain_refused, "a plaintext Flows.Observe was served");

        // A policy change: now p2 may connect on 9090 instead.
        let changed = Policy {
            from: vec![2],
            port: 9090,
            generation: 2,
        };
        let gen_before = pinned.generation().expect("generation");
        let v2 = op.set(&node_config(&node.topo, &changed, 100));
        let r = op
            .report("applied v2", Duration::from_secs(10), |r| {
                r.applied_version == v2
            })
            .await;
        assert_eq!(r.policies[0].generation, 2);
        assert!(pinned.generation().expect("generation") > gen_before);
        assert_enforces(&node, &changed, &[8080, 9090]);

        // Metrics (after the usage loop's first round).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (code, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        for (name, label, want) in [
            ("cortexflow_agent_config_version", "", Some(v2 as f64)),
            (
                "cortexflow_agent_endpoints",
                "state=\"programmed\"",
                Some(3.0),
            ),
            (
                "cortexflow_agent_map_entries",
                "map=\"CF_IPCACHE\"",
                Some(104.0),
            ),
            ("cortexflow_agent_operator_connected", "", Some(1.0)),
            (
                "cortexflow_agent_configs_total",
                "result=\"applied\"",
                Some(2.0),
            ),
        ] {
            assert_eq!(metric(&text, name, label), want, "{name}{{{label}}}");
        }
        for name in [
            "cortexflow_agent_map_capacity",
            "cortexflow_agent_config_apply_duration_seconds_bucket",
            "cortexflow_agent_flows_total",
            "cortexflow_agent_packets_total",
            "cortexflow_agent_drops_total",
            "cortexflow_agent_policy_generation",
        ] {
            assert!(text.contains(name), "/metrics has {name}:\n{text}");
        }
        assert!(
            metric(&text, "cortexflow_agent_drops_total", "").unwrap_or(0.0) > 0.0,
            "drops counted"
        );
        op.stop().await;
    });
}

pub(crate) fn invalid_and_oversized() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        // Room for 50 ipcache entries only.
        let mut node = node(3, 72, &["--map-ipcache", "50"]);
        let _srv = servers(&node, &[8080, 9090]);
        let good = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v1 = op.set(&node_config(&node.topo, &good, 10));
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v1
        })
        .await;
        let pinned = pinned(&node);
        let (eps, ipc, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.ipcache().expect("ipcache"),
            pinned.generation().expect("generation"),
        );

        // An invalid message: an endpoint of a policy set the message does not carry (and a
        // policy change with it).
        let subs = op.subscriptions();
        let mut bad = v1::NodeConfig::from(&node_config(
            &node.topo,
            &Policy {
                from: vec![2],
                port: 9090,
                generation: 2,
            },
            10,
        ));
        bad.full = false;
        if let Some(e) = bad.endpoints.as_mut() {
            e.endpoints[2].policy_set = 999;
        }
        let vbad = op.push_raw(bad);
        let r = op
            .report("refusal", Duration::from_secs(10), |r| {
                r.failed_version == vbad
            })
            .await;
        assert!(
            r.error.contains("unknown policy set 999"),
            "error: {}",
            r.error
        );
        assert_eq!(r.applied_version, v1, "the last good version stays applied");
        // The agent starts over with a new snapshot, which it applies (again v1's content).
        let deadline = Instant::now() + Duration::from_secs(10);
        while op.subscriptions() <= subs {
            assert!(Instant::now() < deadline, "no new subscription");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc);
        assert_eq!(pinned.generation().expect("generation"), generation);
        assert_enforces(&node, &good, &[8080, 9090]);
        eprintln!("invalid message v{vbad} refused: {}", r.error);

        // Too large: 61 ipcache entries (with the node's) for a 50-entry map (and a policy change with it).
        let vbig = op.set(&node_config(
            &node.topo,
            &Policy {
                from: vec![2],
                port: 9090,
                generation: 3,
            },
            57,
        ));
        let r = op
            .report("capacity refusal", Duration::from_secs(10), |r| {
                r.failed_version == vbig
            })
            .await;
        assert!(
            r.error.contains("CF_IPCACHE") && r.error.contains("61"),
            "error names the map and the need: {}",
            r.error
        );
        assert_eq!(r.applied_version, v1);
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc, "nothing written");
        assert_eq!(pinned.generation().expect("generation"), generation);
        assert_enforces(&node, &good, &[8080, 9090]);
        eprintln!("oversized config v{vbig} refused: {}", r.error);
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(
                &text,
                "cortexflow_agent_configs_total",
                "result=\"invalid\""
            ),
            Some(1.0)
        );
        assert_eq!(
            metric(
                &text,
                "cortexflow_agent_configs_total",
                "result=\"refused\""
            ),
            Some(1.0)
        );

        // The next config that fits applies.
        let next = Policy {
            from: vec![2],
            port: 9090,
            generation: 4,
        };
        let vok = op.set(&node_config(&node.topo, &next, 40));
        let r = op
            .report("applied after refusals", Duration::from_secs(10), |r| {
                r.applied_version == vok
            })
            .await;
        assert_eq!(r.failed_version, 0, "the refusal is cleared");
        assert_eq!(pinned.ipcache().expect("ipcache").len(), 44);
        assert_enforces(&node, &next, &[8080, 9090]);

        // A write the kernel refuses half-way (another writer filled the ipcache: the agent's
        // own count says it fits) is rolled back, and retried without a new config until it
        // goes through once there is room.
        let mut foreign: aya::maps::HashMap<
            aya::maps::MapData,
            u32,
            cortexflow_common::IpcacheValue,
        > = aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(node.pin_dir().join("maps/CF_IPCACHE")).expect("pin"),
        )
        .try_into()
        .expect("hash map");
        let (eps, ipc) = (
            pinned.endpoints().expect("endpoints"),
            pinned.ipcache().expect("ipcache"),
        );
        let foreign_keys: Vec<u32> = (1..=6u32)
            .map(|n| u32::from_ne_bytes([10, 251, 0, n as u8]))
            .collect();
        for k in &foreign_keys {
            foreign
                .insert(k, cortexflow_common::IpcacheValue::default(), 0)
                .expect("fill from outside");
        }
        let wider = Policy {
            from: vec![0, 2],
            port: 9090,
            generation: 5,
        };
        let vfail = op.set(&node_config(&node.topo, &wider, 45));
        let r = op
            .report("write failure", Duration::from_secs(10), |r| {
                r.failed_version == vfail
            })
            .await;
        assert!(
            r.error.contains("CF_IPCACHE") && r.error.contains("written back"),
            "error: {}",
            r.error
        );
        assert_eq!(r.applied_version, vok);
        let mut now = pinned.ipcache().expect("ipcache");
        now.retain(|a, _| a.octets()[..2] != [10, 251]);
        assert_eq!(now, ipc, "the ipcache as it was");
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_enforces(&node, &next, &[8080, 9090]);
        eprintln!("half-written config v{vfail} rolled back: {}", r.error);
        for k in &foreign_keys {
            foreign.remove(k).expect("remove");
        }
        let r = op
            .report("retried once there is room", Duration::from_secs(10), |r| {
                r.applied_version == vfail
            })
            .await;
        assert_eq!(r.failed_version, 0);
        assert_eq!(pinned.ipcache().expect("ipcache").len(), 49);
        assert_enforces(&node, &wider, &[8080, 9090]);
        op.stop().await;
    });
}
