//! A stream whose state is older than the kernel's (a lagging or just-restarted replica) never
//! replaces it: the agent holds the richer state in the kernel, across its own restarts too
//! (the revision is pinned with the maps), and programs the stream once it catches up.
use super::*;

pub(crate) fn an_older_snapshot_never_replaces_the_kernels_state() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 76, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let mut rich = node_config(&node.topo, &policy, 10);
        rich.revision = 100;
        let v = op.set(&rich);
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v
        })
        .await;
        let pinned = pinned(&node);
        let eps = pinned.endpoints().expect("endpoints");
        assert_eq!(eps.len(), 3);
        assert_enforces(&node, &policy, &[8080, 9090]);

        // A lagging replica: its snapshot (revision 50) has none of the node's pods.
        let mut poor = rich.clone();
        poor.revision = 50;
        poor.endpoints = Some(domain::Endpoints::default());
        op.set(&poor);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            pinned.endpoints().expect("endpoints"),
            eps,
            "the kernel kept its state"
        );
        assert_enforces(&node, &policy, &[8080, 9090]);
        let log = std::fs::read_to_string(node.log_path(node.starts())).unwrap_or_default();
        assert!(
            log.contains("older than the kernel's") && log.contains("kernel_revision=100"),
            "{log}"
        );
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(&text, "cortexflow_agent_configs_total", "result=\"stale\""),
            Some(1.0)
        );

        // The agent restarts while the operator still lags: the revision came back with the
        // pins, so it holds again (and is not ready: it programmed nothing).
        assert!(node.stop_agent(true));
        node.start_agent(&op.control()).expect("restart agent");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(node.admin("/readyz").await.map(|r| r.0), Some(503));
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_enforces(&node, &policy, &[8080, 9090]);
        let log = std::fs::read_to_string(node.log_path(node.starts())).unwrap_or_default();
        assert!(
            log.contains("programmed_revision=100") && log.contains("older than the kernel's"),
            "{log}"
        );

        // The operator catches up (revision 120, the same pods): programmed, ready.
        rich.revision = 120;
        let v = op.set(&rich);
        op.report("caught up", Duration::from_secs(10), |r| {
            r.applied_version == v
        })
        .await;
        node.wait_ready(Duration::from_secs(10))
            .await
            .expect("ready");
        assert_enforces(&node, &policy, &[8080, 9090]);
        op.stop().await;
    });
}
