//! The operator goes away: the node fails static, then resyncs.
use super::*;

pub(crate) fn operator_down() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let addr = op.addr;
        let mut node = node(3, 74, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let cfg = node_config(&node.topo, &policy, 1000);
        let v = op.set(&cfg);
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v
        })
        .await;
        let pinned = pinned(&node);
        let (eps, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.generation().expect("generation"),
        );

        let (_, text) = node.admin("/metrics").await.expect("metrics");
        let first_sync = metric(&text, "cortexflow_agent_resync_duration_seconds_sum", "");
        // The operator goes away for 5 s: the datapath keeps enforcing, the agent stays up and
        // ready (it serves the last state), and says it is disconnected.
        op.stop().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(node.agent().running(), "{}", node.agent().log_tail(20));
        assert_enforces(&node, &policy, &[8080, 9090]);
        assert_eq!(node.admin("/readyz").await.map(|r| r.0), Some(200));
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(&text, "cortexflow_agent_operator_connected", ""),
            Some(0.0)
        );
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);

        // Back on the same address, with the same config under a new version (as a restarted
        // operator numbers from its start time).
        let back = Instant::now();
        let op = ScriptedOperator::start(addr, 1 << 40).await;
        let v2 = op.set(&cfg);
        op.report("resynced", Duration::from_secs(15), |r| {
            r.applied_version == v2
        })
        .await;
        let resync = back.elapsed();
        assert_eq!(
            pinned.generation().expect("generation"),
            generation,
            "resyncing the same config changes nothing"
        );
        assert_enforces(&node, &policy, &[8080, 9090]);
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        let sum = metric(&text, "cortexflow_agent_resync_duration_seconds_sum", "");
        let count = metric(&text, "cortexflow_agent_resync_duration_seconds_count", "");
        assert_eq!(count, Some(2.0), "two syncs: the first and the resync");
        eprintln!(
            "operator back → config re-applied and reported in {:.0} ms (reconnect backoff \
             capped at 500 ms); agent-side resync (stream open → programmed) {:.1} ms",
            resync.as_secs_f64() * 1e3,
            (sum.unwrap_or(0.0) - first_sync.unwrap_or(0.0)) * 1e3,
        );
        op.stop().await;
    });
}
