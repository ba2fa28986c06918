//! Every long-running task of the agent, killed one at a time through the supervisor's test
//! hook (`CORTEXFLOW_FAIL_TASK=<task>`, then SIGUSR2: the task panics from inside, as a bug
//! would; for `datapath` it is the datapath thread that panics): the process exits with code
//! 1, naming the task, and the kernel goes on enforcing from the pins. The task list comes from
//! the agent's own log, so a task added later is covered too. It proves that the process ends,
//! not how fast: the exit takes the supervisor's 500 ms drain at most, the test allows
//! [`EXIT_BOUND`] (a machine stalled by other I/O must not fail it) and prints what it measured.
use super::*;

/// How long an agent with a dead task may take to be gone.
const EXIT_BOUND: Duration = Duration::from_secs(10);

pub(crate) fn dead_task_ends_the_agent() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 75, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        op.set(&node_config(&node.topo, &policy, 10));
        node.start_agent(&op.control()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        let tasks = node.agent().supervised_tasks();
        for must in [
            "datapath",
            "subscription",
            "identity",
            "reports",
            "flows",
            "grpc",
            "admin",
        ] {
            assert!(
                tasks.iter().any(|t| t == must),
                "task {must} is not supervised: {tasks:?}"
            );
        }
        assert!(node.stop_agent(true), "a graceful stop exits 0");

        let mut slowest = Duration::ZERO;
        for task in &tasks {
            node.start_agent_with(&op.control(), &[("CORTEXFLOW_FAIL_TASK", task.clone())])
                .expect("start agent");
            node.wait_ready(Duration::from_secs(20))
                .await
                .expect("ready");
            let agent = node.daemon().expect("agent");
            let t = Instant::now();
            agent
                .signal(nix::sys::signal::Signal::SIGUSR2)
                .expect("SIGUSR2");
            let status = agent.wait_exit(EXIT_BOUND);
            let took = t.elapsed();
            let log = agent.log();
            let status =
                status.unwrap_or_else(|| panic!("the agent lived on after {task} died:\n{log}"));
            assert_eq!(status.code(), Some(1), "task {task}: exit {status}\n{log}");
            assert!(
                took < EXIT_BOUND,
                "task {task}: the agent took {took:?} to exit"
            );
            let said = if task == "datapath" {
                "task datapath failed: the datapath thread panicked".to_string()
            } else {
                format!("task {task} panicked: injected failure")
            };
            assert!(log.contains(&said), "task {task}: no {said:?} in\n{log}");
            node.forget_agent();
            // No agent runs: the pins enforce the last programmed state.
            assert_enforces(&node, &policy, &[8080, 9090]);
            eprintln!("  {task}: exit 1 after {:.0} ms", took.as_secs_f64() * 1e3);
            slowest = slowest.max(took);
        }
        eprintln!(
            "{} tasks killed one by one; slowest exit {:.0} ms; enforcement held after each",
            tasks.len(),
            slowest.as_secs_f64() * 1e3
        );
        op.stop().await;
    });
}
