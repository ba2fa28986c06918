//! The end-to-end suite on the lab: one lab (real control plane, two simulated nodes with their
//! agents, the operator, Prometheus, the demo of `examples/lab`) for the whole binary; the tests
//! run one after the other against it with real traffic from inside the pods, and each leaves
//! the demo as it found it. The last test removes the lab and checks that nothing is left.
use std::{
    collections::BTreeSet,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use cortexflow_lab::lab::{self, Expected, FlowLog, Lab, LabOptions, Probe, TargetKind};
use cortexflow_testkit::workspace_root;
use libtest_mimic::{Arguments, Failed, Trial};

type Shared = Arc<Mutex<Option<Lab>>>;
type TestFn =
    fn(&mut Lab) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + '_>>;

macro_rules! t {
    ($f:ident) => {
        (stringify!($f), (|l| Box::pin($f(l))) as TestFn)
    };
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One lab, one test at a time.
    args.test_threads = Some(1);
    let tests: Vec<(&'static str, TestFn)> = vec![
        t!(matrix_matches_the_demo),
        t!(every_documented_metric_has_samples_in_prometheus),
        t!(service_balances_over_backends_on_both_nodes),
        t!(deny_beats_allow),
        t!(namespace_selector_peers),
        t!(ip_block_peers),
        t!(policy_change_is_enforced_on_every_node),
        t!(scaling_keeps_the_service_and_new_pods_wait_for_their_policy),
        t!(agent_restart_under_traffic_drops_nothing),
        t!(operator_down_for_a_minute_changes_nothing),
        t!(operator_restarts_and_rollouts_change_no_verdict),
        t!(identity_changes_under_load_change_no_verdict),
        t!(a_lost_id_table_renumbers_nothing_under_load),
        t!(an_oversized_policy_is_refused_whole_under_load),
        t!(a_pod_reaches_itself_whatever_its_policy),
        t!(path_mtu_discovery_works_under_default_deny),
        t!(every_address_of_the_node_is_the_host),
        t!(a_forged_source_address_gets_nothing),
        t!(agents_on_a_follower_and_leader_loss_under_load),
        t!(cargo_xtask_lab_exec_runs_in_a_node_as_the_same_process),
        t!(a_pods_environment_comes_from_its_manifest),
        t!(pods_run_init_containers_sidecars_restarts_and_probes),
        t!(a_pods_token_is_projected_and_the_apiserver_answers_at_its_service),
        t!(cluster_dns_resolves_services_inside_pods),
        t!(a_pods_credentials_cannot_pass_for_an_agent_or_read_flows),
        t!(the_ca_rotates_leaves_issuer_and_root_under_config_traffic),
        t!(the_webhook_is_trusted_through_the_ca_bundle_the_operator_keeps),
        t!(the_injector_patches_exactly_the_pods_that_ask),
        t!(the_proxy_delivers_messages_over_mtls_and_relays_dns),
        t!(kubectl_logs_reads_containers_through_the_kubelet_api),
        t!(host_path_volumes_are_the_nodes_own),
        t!(cfcli_flows_filter_and_explain_names_the_deciding_rule),
        t!(cfcli_identities_agree_with_the_statuses_and_the_kernel),
        t!(cfcli_status_and_check_see_a_stopped_agent),
        t!(cfcli_policy_diff_predicts_the_matrix_after_applying),
        t!(every_dashboard_panel_returns_data_in_prometheus),
    ];
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared: Shared = Arc::new(Mutex::new(None));
    let state_dir = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-lab-"));
    let start_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut trials: Vec<Trial> = tests
        .into_iter()
        .map(|(name, f)| {
            let (rt, shared, state_dir, start_error) = (
                rt.clone(),
                shared.clone(),
                state_dir.clone(),
                start_error.clone(),
            );
            Trial::test(name, move || {
                let mut guard = shared.lock().map_err(|_| Failed::from("lab lock"))?;
                if guard.is_none() {
                    if let Some(e) = start_error.lock().ok().and_then(|e| e.clone()) {
                        return Err(Failed::from(format!("the lab did not start: {e}")));
                    }
                    let opts = LabOptions::new(state_dir.clone());
                    match rt.block_on(Lab::start(&opts)) {
                        Ok(l) => *guard = Some(l),
                        Err(e) => {
                            let msg = format!("{e:#}");
                            if let Ok(mut s) = start_error.lock() {
                                *s = Some(msg.clone());
                            }
                            return Err(Failed::from(format!("the lab did not start: {msg}")));
                        }
                    }
                }
                let lab = guard.as_mut().ok_or_else(|| Failed::from("no lab"))?;
                rt.block_on(f(lab))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    {
        let (rt, shared, state_dir) = (rt.clone(), shared.clone(), state_dir.clone());
        trials.push(Trial::test("teardown_leaves_nothing_behind", move || {
            let lab = shared.lock().ok().and_then(|mut g| g.take());
            if let Some(lab) = lab {
                rt.block_on(lab.shutdown());
            }
            let _ = std::fs::remove_dir_all(&state_dir);
            leftovers().map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    // For debugging a failure: CORTEXFLOW_LAB_KEEP_LOGS=<dir> keeps the daemons' logs there.
    if let Some(keep) = std::env::var_os("CORTEXFLOW_LAB_KEEP_LOGS") {
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(state_dir.join("logs"))
            .arg(&keep)
            .status();
    }
    // A filtered run may not have torn down.
    if let Some(lab) = shared.lock().ok().and_then(|mut g| g.take()) {
        rt.block_on(lab.shutdown());
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    conclusion.exit_code()
}

// ---- helpers -----------------------------------------------------------------------------------

/// `kubectl rollout status`; when it times out, the error carries every pod's phase, address
/// and conditions (what a stuck readiness gate looks like).
fn rollout(lab: &Lab, ns: &str, deployment: &str) -> anyhow::Result<()> {
    let Err(e) = lab.kubectl(&[
        "rollout",
        "status",
        "deployment",
        "-n",
        ns,
        deployment,
        "--timeout=90s",
    ]) else {
        return Ok(());
    };
    let pods = lab
        .kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} \
             {.status.podIP} deleting={.metadata.deletionTimestamp} \
             {range .status.conditions[*]}{.type}={.status}({.reason}:{.message}) {end}{\"\\n\"}{end}",
        ])
        .unwrap_or_else(|e| format!("(pods: {e:#})"));
    Err(e.context(format!("pods of {ns}:\n{pods}")))
}

fn probe(
    from: (&'static str, &'static str),
    to: (&'static str, &'static str),
    kind: TargetKind,
    protocol: &'static str,
    port: u16,
) -> Probe {
    Probe {
        from,
        to,
        kind,
        protocol,
        port,
        expect: Expected {
            result: "",
            verdict: "",
            reason: "",
        },
    }
}

/// A TCP probe from `from` to the Service `to` on port 80.
fn to_service(from: (&'static str, &'static str), to: (&'static str, &'static str)) -> Probe {
    probe(from, to, TargetKind::Service, "tcp", 80)
}

/// Repeats `attempt` — one probe, described as (result, verdict, reason) — until it gives
/// `want`, for up to 20 s, with the agents' flows observed; returns how long that took.
async fn retry_until(
    lab: &Lab,
    what: &str,
    want: (&str, &str, &str),
    mut attempt: impl AsyncFnMut(&FlowLog) -> anyhow::Result<(String, String, String)>,
) -> anyhow::Result<Duration> {
    let timeout = Duration::from_secs(20);
    let log = lab.observe_flows().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < timeout {
        let got = attempt(&log).await?;
        if (got.0.as_str(), got.1.as_str(), got.2.as_str()) == want {
            return Ok(t.elapsed());
        }
        last = Some(got);
    }
    bail!("{what}: not {want:?} after {timeout:?}; last {last:?}")
}

/// Repeats `p` until its (result, verdict, reason) is `want`.
async fn until(lab: &Lab, p: &Probe, want: (&str, &str, &str)) -> anyhow::Result<Duration> {
    retry_until(lab, &format!("{p:?}"), want, async |log| {
        let c = lab.check(log, p).await?;
        Ok((c.result, c.verdict, c.reason))
    })
    .await
}

/// Applies MeshPolicy `name` of namespace `shop` with `spec` (YAML of the spec's fields,
/// indented by two), runs `during`, and deletes the policy again, also when `during` failed.
async fn with_policy<T>(
    lab: &Lab,
    name: &str,
    spec: &str,
    during: impl AsyncFnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    lab.apply_yaml(&format!(
        "apiVersion: mesh.cortexflow.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    ))?;
    let r = during().await;
    lab.kubectl(&["delete", "meshpolicy", "-n", "shop", name])?;
    r
}

/// The demo's policies, as `examples/lab` has them.
fn restore_policies(lab: &Lab) -> anyhow::Result<()> {
    let f = workspace_root().join("examples/lab/30-policies.yaml");
    lab.kubectl(&["apply", "-f", &f.to_string_lossy()])?;
    Ok(())
}

/// A prober running `p` over and over in the background, counting outcomes.
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Prober {
    /// Probes from pod `client` of `ns` to `target` (`ip:port`) every `every`.
    fn start(
        lab: &Lab,
        ns: &str,
        client: &str,
        protocol: &str,
        target: &str,
        every: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (located, bin) = (
            cortexflow_lab::sim::locate(&lab.state_dir, ns, client),
            lab.workload_bin.clone(),
        );
        let (s, o, f, fl) = (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        let (protocol, target) = (protocol.to_string(), target.to_string());
        let task = tokio::task::spawn_blocking(move || {
            let Ok((netns, cgroup)) = located else {
                f.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let out = lab::probe_command(&bin, &netns, &cgroup, &protocol, &target).output();
                let line = out
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_else(|e| format!("exec {e}"));
                if line.starts_with("success") {
                    o.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut v) = fl.lock()
                        && v.len() < 10
                    {
                        v.push(line);
                    }
                }
                if let Some(rest) = every.checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        });
        Self {
            stop,
            task,
            ok,
            failed,
            failures,
        }
    }

    /// Stops; `(successes, failures, some failure lines)`.
    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.failures.lock().map(|v| v.clone()).unwrap_or_default(),
        )
    }
}

/// What the two probers of [`with_traffic`] saw.
struct Traffic {
    /// Frontend → backend Service: successes, failures and some failure lines.
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    /// Batch job → backend Service: connections that got through, and those blocked.
    through: u64,
    blocked: u64,
}

impl Traffic {
    /// Every allowed probe passed (at least `min_ok` of them) and no denied one got through.
    fn ensure_undisturbed(&self, min_ok: u64) -> anyhow::Result<()> {
        ensure!(
            self.failed == 0 && self.ok >= min_ok,
            "frontend: {} ok, {} failed: {:?}",
            self.ok,
            self.failed,
            self.failures
        );
        ensure!(
            self.through == 0 && self.blocked > 0,
            "the batch job got through {} times ({} blocked)",
            self.through,
            self.blocked
        );
        Ok(())
    }
}

/// Runs `during` while the frontend (allowed) and the batch job (denied) connect to the
/// backend Service every `every`, from inside their pods.
async fn with_traffic<T>(
    lab: &mut Lab,
    every: Duration,
    during: impl AsyncFnOnce(&mut Lab) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Traffic)> {
    let vip = lab.cluster_ip("shop", "backend")?;
    let (frontend, _) = first_pod(lab, "shop", "frontend")?;
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    let target = format!("{vip}:80");
    let allowed = Prober::start(lab, "shop", &frontend, "tcp", &target, every);
    let denied = Prober::start(lab, "batch", &etl, "tcp", &target, every);
    let r = during(lab).await;
    let (ok, failed, failures) = allowed.finish().await;
    let (through, blocked, _) = denied.finish().await;
    Ok((
        r?,
        Traffic {
            ok,
            failed,
            failures,
            through,
            blocked,
        },
    ))
}

fn first_pod(lab: &Lab, ns: &str, app: &str) -> anyhow::Result<(String, std::net::Ipv4Addr)> {
    lab.pods(ns, app)?
        .into_iter()
        .next()
        .with_context(|| format!("no running {ns}/{app} pod"))
}

/// Waits until `ns/app` has `n` Ready pods.
async fn ready_replicas(lab: &Lab, ns: &str, deployment: &str, n: usize) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let out = lab.kubectl(&[
            "get",
            "deployment",
            "-n",
            ns,
            deployment,
            "-o",
            "jsonpath={.status.readyReplicas}/{.status.replicas}",
        ])?;
        if out.trim() == format!("{n}/{n}") {
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "{ns}/{deployment}: {out} ready, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---- tests -------------------------------------------------------------------------------------

/// No policy → allowed; an Allow policy → default-deny for everyone else, the allowed peer
/// passes (TCP and UDP, through the Service); Audit reports would-drop without dropping.
async fn matrix_matches_the_demo(lab: &mut Lab) -> anyhow::Result<()> {
    let cells = lab.matrix().await?;
    let table = lab::render(&cells);
    eprintln!("{table}");
    ensure!(cells.iter().all(|c| c.as_expected()), "matrix:\n{table}");
    Ok(())
}

/// `promtool check metrics` (Prometheus' own lint) on `who`'s /metrics text.
fn promtool_check_metrics(who: &str, body: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run promtool (`cargo xtask setup`)")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("promtool stdin")?;
        stdin.write_all(body.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics on the {who}'s /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn every_documented_metric_has_samples_in_prometheus(lab: &mut Lab) -> anyhow::Result<()> {
    // Every /metrics endpoint passes Prometheus' own lint (`promtool check metrics`).
    let mut endpoints = vec![("operator".to_string(), lab.operator.admin)];
    endpoints.extend(
        lab.agents
            .iter()
            .map(|a| (format!("agent {}", a.name), a.admin)),
    );
    for (who, addr) in endpoints {
        let (code, body) = cortexflow_testkit::process::http_get(addr, "/metrics").await?;
        ensure!(code == 200, "{who}: /metrics answered {code}");
        promtool_check_metrics(&who, &body)?;
    }
    let doc = std::fs::read_to_string(workspace_root().join("docs/metrics.md"))?;
    // Every `cortexflow_…` and `process_…` name in the first column of a metrics table, with
    // its type.
    let mut metrics = Vec::new();
    for line in doc
        .lines()
        .filter(|l| l.starts_with("| `cortexflow_") || l.starts_with("| `process_"))
    {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (names, kind) = (
            cols.get(1).copied().unwrap_or(""),
            cols.get(2).copied().unwrap_or(""),
        );
        for n in names.split(',') {
            let n = n.trim().trim_matches('`');
            // The proxy's run in pods, which the lab's Prometheus does not scrape: the proxy's
            // test requires them on a proxy's own /metrics.
            if n.starts_with("cortexflow_proxy_") {
                continue;
            }
            if n.starts_with("cortexflow_") || n.starts_with("process_") {
                metrics.push((n.to_string(), kind.to_string()));
            }
        }
    }
    ensure!(
        metrics.len() >= 20,
        "found only {metrics:?} in docs/metrics.md"
    );
    let t = Instant::now();
    loop {
        let mut missing = Vec::new();
        for (name, kind) in &metrics {
            let series = if kind == "histogram" {
                format!("{name}_count")
            } else {
                name.clone()
            };
            if series.starts_with("process_") {
                // Every daemon exports them: both jobs have the series.
                let body = lab
                    .prometheus_query(&format!("count by (job) ({series})"))
                    .await?;
                for job in ["cortexflow-operator", "cortexflow-agent"] {
                    if !body.contains(&format!("\"job\":\"{job}\"")) {
                        missing.push(format!("{series} of {job}"));
                    }
                }
                continue;
            }
            let body = lab.prometheus_query(&format!("count({series})")).await?;
            if !body.contains("\"value\"") {
                missing.push(series);
            }
        }
        if missing.is_empty() {
            eprintln!(
                "{} documented metrics all have samples in Prometheus after {:.1} s",
                metrics.len(),
                t.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(40) {
            bail!("no samples in Prometheus for {missing:?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn service_balances_over_backends_on_both_nodes(lab: &mut Lab) -> anyhow::Result<()> {
    let placed = lab.placed_pods("shop", "backend")?;
    let backends: BTreeSet<String> = placed.iter().map(|p| p.0.clone()).collect();
    let nodes: BTreeSet<&str> = placed.iter().map(|p| p.2.as_str()).collect();
    ensure!(nodes.len() == 2, "backends on {nodes:?}");
    let (client, _) = first_pod(lab, "shop", "frontend")?;
    let vip = lab.cluster_ip("shop", "backend")?;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let out = tokio::task::block_in_place(|| {
            lab.probe("shop", &client, "tcp", &format!("{vip}:80"))
        })?;
        let who = out
            .strip_prefix("success ")
            .with_context(|| format!("probe: {out}"))?;
        *seen.entry(who.to_string()).or_insert(0u32) += 1;
    }
    eprintln!("40 connections to {vip}:80 from two nodes' backends: {seen:?}");
    let names: BTreeSet<String> = seen.keys().cloned().collect();
    ensure!(
        names == backends,
        "answered by {names:?}, backends {backends:?}"
    );
    ensure!(seen.values().all(|n| *n >= 5), "unbalanced: {seen:?}");
    Ok(())
}

async fn deny_beats_allow(lab: &mut Lab) -> anyhow::Result<()> {
    let p = to_service(("shop", "frontend"), ("shop", "backend"));
    let took = with_policy(
        lab,
        "deny-frontend",
        "  selector: {matchLabels: {app: backend}}\n  action: Deny\n  ingress:\n    - from: [{identity: frontend}]\n      ports: [{port: 8080, protocol: TCP}]\n",
        async || until(lab, &p, ("timeout", "dropped", "policy_deny")).await,
    )
    .await?;
    eprintln!(
        "Deny over Allow enforced after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    until(lab, &p, ("success", "allowed", "policy_allow")).await?;
    Ok(())
}

async fn namespace_selector_peers(lab: &mut Lab) -> anyhow::Result<()> {
    let from_batch = to_service(("batch", "etl"), ("shop", "frontend"));
    let from_shop = to_service(("shop", "backend"), ("shop", "frontend"));
    // The frontend admits the batch namespace only.
    with_policy(
        lab,
        "frontend-from-batch",
        "  selector: {matchLabels: {app: frontend}}\n  ingress:\n    - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: batch}}}]\n      ports: [{port: 8080, protocol: TCP}]\n",
        async || {
            until(lab, &from_shop, ("timeout", "dropped", "default_deny")).await?;
            until(lab, &from_batch, ("success", "allowed", "policy_allow")).await
        },
    )
    .await?;
    until(lab, &from_shop, ("success", "allowed", "no_policy")).await?;
    Ok(())
}

/// Repeats a probe from simulated node `node` until its (result, verdict, reason) is `want`.
async fn node_until(
    lab: &Lab,
    node: usize,
    target: &str,
    want: (&str, &str, &str),
) -> anyhow::Result<Duration> {
    let source = lab.nodes[node].ip;
    retry_until(
        lab,
        &format!("node {node} → {target}"),
        want,
        async |log| {
            let started = Instant::now();
            let out = tokio::task::block_in_place(|| lab.probe_from_node(node, "tcp", target))?;
            let (verdict, reason) = lab.verdict_since(log, started, source, "tcp").await;
            let result = out.split_whitespace().next().unwrap_or("").to_string();
            Ok((result, verdict, reason))
        },
    )
    .await
}

/// `ipBlock` peers: the nodes' fabric addresses (172.30.0.0/24) are not pod addresses, so on
/// every node but their own they are `world` — or the identity of the `ipBlock` containing them.
async fn ip_block_peers(lab: &mut Lab) -> anyhow::Result<()> {
    ensure!(lab.nodes.len() >= 2, "needs two nodes");
    let placed = lab.placed_pods("shop", "backend")?;
    let mut backend_on = std::collections::BTreeMap::new();
    for (_, ip, node) in &placed {
        if let Some(i) = lab.nodes.iter().position(|n| n.name == *node) {
            backend_on.insert(i, ip.to_string());
        }
    }
    let (Some(on0), Some(on1)) = (backend_on.get(&0), backend_on.get(&1)) else {
        bail!("want a backend on each of the first two nodes: {placed:?}");
    };
    // Node 0 probes the backend on node 1 and node 1 the one on node 0: each arrives from an
    // address that is not the receiving node's own.
    let (from0, from1) = (format!("{on1}:8080"), format!("{on0}:8080"));
    // The backend admits the frontend only: the nodes are default-denied.
    node_until(lab, 0, &from0, ("timeout", "dropped", "default_deny")).await?;
    let except = format!("{}/32", lab.nodes[1].ip);
    let took = with_policy(
        lab,
        "backend-from-nodes",
        &format!("  selector: {{matchLabels: {{app: backend}}}}\n  ingress:\n    - from: [{{ipBlock: {{cidr: 172.30.0.0/24, except: ['{except}']}}}}]\n      ports: [{{port: 8080, protocol: TCP}}]\n"),
        async || {
            let took = node_until(lab, 0, &from0, ("success", "allowed", "policy_allow")).await?;
            // Inside the block but in `except`: still default-denied.
            node_until(lab, 1, &from1, ("timeout", "dropped", "default_deny")).await?;
            Ok(took)
        },
    )
    .await?;
    eprintln!(
        "ipBlock 172.30.0.0/24 except {except}: node 1 admitted after {:.0} ms, node 2 still denied",
        took.as_secs_f64() * 1e3
    );
    node_until(lab, 0, &from0, ("timeout", "dropped", "default_deny")).await?;
    Ok(())
}

async fn policy_change_is_enforced_on_every_node(lab: &mut Lab) -> anyhow::Result<()> {
    // Admit the batch job to the backend too; measure until both backends (one per node)
    // accept it, straight to their pod addresses.
    let backends = lab.pods("shop", "backend")?;
    ensure!(backends.len() == 2);
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    for (_, ip) in &backends {
        let out =
            tokio::task::block_in_place(|| lab.probe("batch", &etl, "tcp", &format!("{ip}:8080")))?;
        ensure!(out == "timeout", "before the change: {out}");
    }
    let t = Instant::now();
    lab.apply_yaml(
        "apiVersion: mesh.cortexflow.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: allow-frontend-to-backend, namespace: shop}\nspec:\n  selector: {matchLabels: {app: backend}}\n  ingress:\n    - from: [{identity: frontend}, {serviceAccount: batch/etl}]\n      ports: [{port: 8080, protocol: TCP}, {port: 5353, protocol: UDP}]\n",
    )?;
    let mut per_node = Vec::new();
    for (name, ip) in &backends {
        loop {
            let out = tokio::task::block_in_place(|| {
                lab.probe("batch", &etl, "tcp", &format!("{ip}:8080"))
            })?;
            if out.starts_with("success") {
                per_node.push((name.clone(), t.elapsed()));
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                restore_policies(lab)?;
                bail!("{name} still refuses the batch job after 30 s: {out}");
            }
        }
    }
    let total = t.elapsed();
    // The status says so too.
    let programmed = lab.kubectl(&[
        "get",
        "meshpolicy",
        "-n",
        "shop",
        "allow-frontend-to-backend",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Programmed\")].status}",
    ])?;
    restore_policies(lab)?;
    eprintln!(
        "policy change (kubectl apply → connection accepted on every node): {:.0} ms ({})",
        total.as_secs_f64() * 1e3,
        per_node
            .iter()
            .map(|(n, d)| format!("{n} {:.0} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    ensure!(programmed == "True", "Programmed={programmed}");
    // And back: denied again on both.
    for (_, ip) in &backends {
        let t = Instant::now();
        loop {
            let out = tokio::task::block_in_place(|| {
                lab.probe("batch", &etl, "tcp", &format!("{ip}:8080"))
            })?;
            if out == "timeout" {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "still admitted after the revert"
            );
        }
    }
    Ok(())
}

async fn scaling_keeps_the_service_and_new_pods_wait_for_their_policy(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    // The frontend must always get through; the batch job never (not even to a new pod
    // before its policy is in place).
    let ((), traffic) = with_traffic(lab, Duration::from_millis(100), async |lab| {
        for n in [4usize, 1, 2] {
            lab.kubectl(&[
                "scale",
                "deployment",
                "-n",
                "shop",
                "backend",
                &format!("--replicas={n}"),
            ])?;
            ready_replicas(lab, "shop", "backend", n).await?;
            // Scaled-down pods drain for 2 s after SIGTERM; let that pass.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Ok(())
    })
    .await?;
    eprintln!(
        "scaling 2→4→1→2 under probes: frontend {} ok / {} failed; batch job {} through / {} blocked",
        traffic.ok, traffic.failed, traffic.through, traffic.blocked
    );
    traffic.ensure_undisturbed(20)?;
    // Every backend pod's gate is True, and it turned True no later than Ready did (the
    // times are RFC 3339 seconds, so they compare as strings).
    let out = lab.kubectl(&[
        "get", "pods", "-n", "shop", "-l", "app=backend", "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"mesh.cortexflow.io/programmed\")].status} {.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"mesh.cortexflow.io/programmed\")].lastTransitionTime} {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}{\"\\n\"}{end}",
    ])?;
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        ensure!(
            f.len() == 5 && f[1] == "True" && f[2] == "True" && f[3] <= f[4],
            "gate and readiness (name gate ready gate-time ready-time): {l}"
        );
    }
    Ok(())
}

async fn agent_restart_under_traffic_drops_nothing(lab: &mut Lab) -> anyhow::Result<()> {
    let (ready, traffic) = with_traffic(lab, Duration::from_millis(50), async |lab| {
        restart_agents(lab, 3).await
    })
    .await?;
    let ms: Vec<String> = ready
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    eprintln!(
        "3 restarts of every agent (SIGTERM, new process) under probes: {} ok, {} failed, {} denied got through; stop→ready ms: {}",
        traffic.ok,
        traffic.failed,
        traffic.through,
        ms.join(" ")
    );
    traffic.ensure_undisturbed(20)
}

/// Restarts every agent `n` times (SIGTERM, then a new process on the same pins and ports);
/// returns the restart-to-ready times.
async fn restart_agents(lab: &mut Lab, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..n {
        let controls: Vec<_> = lab.agents.iter().map(|a| lab.control(&a.name)).collect();
        for (a, control) in lab.agents.iter_mut().zip(controls) {
            let t = Instant::now();
            ensure!(
                a.stop_agent(true),
                "{}: SIGTERM did not end the agent cleanly",
                a.name
            );
            a.start_agent(&control)?;
            a.wait_ready(Duration::from_secs(30)).await?;
            times.push(t.elapsed());
            // Traffic between restarts too.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(times)
}

async fn operator_down_for_a_minute_changes_nothing(lab: &mut Lab) -> anyhow::Result<()> {
    let (resync, traffic) = with_traffic(lab, Duration::from_millis(500), async |lab| {
        lab.stop_operator();
        tokio::time::sleep(Duration::from_secs(60)).await;
        for a in &lab.agents {
            let (_, m) = a.admin("/metrics").await.context("agent metrics")?;
            ensure!(
                m.lines()
                    .any(|l| l.starts_with("cortexflow_agent_operator_connected")
                        && l.ends_with(" 0")),
                "{} does not say it is disconnected",
                a.name
            );
        }
        let back = Instant::now();
        lab.start_operator().await?;
        // Resynced: every agent connected again.
        loop {
            let mut all = true;
            for a in &lab.agents {
                let (_, m) = a.admin("/metrics").await.context("agent metrics")?;
                all &= m.lines().any(|l| {
                    l.starts_with("cortexflow_agent_operator_connected") && l.ends_with(" 1")
                });
            }
            if all {
                return Ok(back.elapsed());
            }
            ensure!(
                back.elapsed() < Duration::from_secs(60),
                "agents did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?;
    eprintln!(
        "operator down 60 s: {} ok / {} failed, {} denied got through; every agent resynced {:.0} ms after the operator started again",
        traffic.ok,
        traffic.failed,
        traffic.through,
        resync.as_secs_f64() * 1e3
    );
    traffic.ensure_undisturbed(50)
}

/// Nothing of this process is left: network namespaces, pins, cgroups, processes.
/// Operator rollouts under load change no verdict: ten `kill -9` and immediate restarts, then a
/// second replica behind the operator Service and a rolling restart of both, while the frontend
/// opens 100 new connections a second to the backend Service (allowed) and the batch job 100
/// (denied). A replica serves nothing before it is synced, and no agent programs a state older
/// than its kernel's: no allowed connection fails, no denied one gets through.
async fn operator_restarts_and_rollouts_change_no_verdict(lab: &mut Lab) -> anyhow::Result<()> {
    let (allowed, denied) = start_load(lab)?;
    let t = Instant::now();
    let mut restarts = Vec::new();
    let run = async {
        for _ in 0..10 {
            let r = Instant::now();
            lab.kill_and_restart_operator().await?;
            restarts.push(r.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut second = lab.start_replica("operator-1").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // One replica at a time, as a Deployment rolls.
        lab.restart_operator().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        lab.restart_replica(&mut second, false).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Back to one replica.
        lab.operator_service.remove(second.grpc);
        second.daemon.stop(Duration::from_secs(15));
        tokio::time::sleep(Duration::from_secs(1)).await;
        anyhow::Ok(())
    };
    let result = run.await;
    let secs = t.elapsed().as_secs_f64();
    let (allowed, denied) = (allowed.finish()?, denied.finish()?);
    result?;
    let ms: Vec<String> = restarts
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    ensure_no_verdict_changed(
        &format!(
            "10 kill -9 restarts (kill→ready ms: {}) and a two-replica rolling restart",
            ms.join(" ")
        ),
        secs,
        &allowed,
        &denied,
    )
}

/// Starts 100 new connections a second from the frontend (allowed) and from the batch job
/// (denied) to the backend Service.
fn start_load(lab: &Lab) -> anyhow::Result<(lab::Load, lab::Load)> {
    let target = format!("{}:80", lab.cluster_ip("shop", "backend")?);
    let (frontend, _) = first_pod(lab, "shop", "frontend")?;
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    Ok((
        lab.load("shop", &frontend, "tcp", &target, 100)?,
        lab.load("batch", &etl, "tcp", &target, 100)?,
    ))
}

/// No allowed connection failed, no denied one got through, and both ran at rate.
fn ensure_no_verdict_changed(
    what: &str,
    secs: f64,
    allowed: &lab::LoadCount,
    denied: &lab::LoadCount,
) -> anyhow::Result<()> {
    eprintln!(
        "{what} in {secs:.1} s: allowed {} ok, {} failed; denied {} got through, {} blocked",
        allowed.ok,
        allowed.failed(),
        denied.ok,
        denied.failed()
    );
    ensure!(
        allowed.failed() == 0 && allowed.ok as f64 >= 80.0 * secs,
        "allowed: {allowed:?} over {secs:.1} s"
    );
    ensure!(
        denied.ok == 0 && denied.failed() as f64 >= 50.0 * secs,
        "denied: {denied:?} over {secs:.1} s"
    );
    Ok(())
}

/// The id of a ServiceIdentity as its status says (once allocated).
fn sid_id(lab: &Lab, ns: &str, name: &str) -> anyhow::Result<Option<u32>> {
    let out = lab.kubectl(&["get", "sid", "-n", ns, name, "-o", "jsonpath={.status.id}"])?;
    Ok(out.trim().parse().ok())
}

/// Identity changes under load change no verdict: pods under default-deny whose identity
/// number is not known for a moment keep the number they had, or are enforced as "unknown" —
/// never left out of their node's maps. (1) The backend's ServiceIdentity is deleted (its pods
/// fall to their service account's identity, which has no number yet) and created again (a
/// new identity taking the pods over: it gets a new number); (2) the backend rolls to pods of a
/// new service account (a new implicit identity) and back.
async fn identity_changes_under_load_change_no_verdict(lab: &mut Lab) -> anyhow::Result<()> {
    let before = sid_id(lab, "shop", "backend")?.context("the backend identity has an id")?;
    let (allowed, denied) = start_load(lab)?;
    let t = Instant::now();
    let run = async {
        lab.kubectl(&["delete", "sid", "-n", "shop", "backend"])?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let identities = workspace_root().join("examples/lab/20-identities.yaml");
        lab.kubectl(&["apply", "-f", &identities.to_string_lossy()])?;
        let t = Instant::now();
        let after = loop {
            if let Some(id) = sid_id(lab, "shop", "backend")? {
                break id;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "no id for the new backend identity"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(after != before, "identity {before} was reused");
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab.kubectl(&["create", "serviceaccount", "-n", "shop", "backend-v2"])?;
        for sa in ["backend-v2", "backend"] {
            let patch =
                format!(r#"{{"spec":{{"template":{{"spec":{{"serviceAccountName":"{sa}"}}}}}}}}"#);
            lab.kubectl(&["patch", "deployment", "-n", "shop", "backend", "-p", &patch])?;
            rollout(lab, "shop", "backend")?;
            ready_replicas(lab, "shop", "backend", 2).await?;
            // Replaced pods drain for 2 s after SIGTERM.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        lab.kubectl(&["delete", "serviceaccount", "-n", "shop", "backend-v2"])?;
        anyhow::Ok(())
    };
    let result = run.await;
    let secs = t.elapsed().as_secs_f64();
    let (allowed, denied) = (allowed.finish()?, denied.finish()?);
    result?;
    ensure_no_verdict_changed(
        "the backend's ServiceIdentity deleted and re-created, the backend rolled to a new service account and back",
        secs,
        &allowed,
        &denied,
    )
}

/// The id ConfigMap deleted, then edited to garbage, then the operator killed and restarted,
/// under load: the leader writes the numbers it holds back each time, no identity number
/// changes, no verdict changes.
async fn a_lost_id_table_renumbers_nothing_under_load(lab: &mut Lab) -> anyhow::Result<()> {
    const TABLE: &str = "cortexflow-identities";
    let ns = lab::SYSTEM_NAMESPACE;
    let ids = |lab: &Lab| -> anyhow::Result<(Option<u32>, Option<u32>)> {
        Ok((
            sid_id(lab, "shop", "frontend")?,
            sid_id(lab, "shop", "backend")?,
        ))
    };
    let table = |lab: &Lab| {
        lab.kubectl(&[
            "get",
            "configmap",
            "-n",
            ns,
            TABLE,
            "-o",
            "jsonpath={.data}",
        ])
    };
    let before = ids(lab)?;
    let good = table(lab)?;
    ensure!(before.0.is_some() && before.1.is_some(), "ids: {before:?}");
    let (allowed, denied) = start_load(lab)?;
    let t = Instant::now();
    let written_back = async |lab: &Lab, what: &str| -> anyhow::Result<()> {
        let t = Instant::now();
        while table(lab).ok().as_deref() != Some(good.as_str()) {
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: the table was not written back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    };
    let run = async {
        lab.kubectl(&["delete", "configmap", "-n", ns, TABLE])?;
        written_back(lab, "deleted").await?;
        lab.kubectl(&[
            "patch",
            "configmap",
            "-n",
            ns,
            TABLE,
            "--type=merge",
            "-p",
            r#"{"data":{"next-identity":"256","sa_shop_frontend":"garbage"}}"#,
        ])?;
        written_back(lab, "garbage").await?;
        lab.kill_and_restart_operator().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        written_back(lab, "after the restart").await?;
        anyhow::Ok(())
    };
    let result = run.await;
    let secs = t.elapsed().as_secs_f64();
    let (allowed, denied) = (allowed.finish()?, denied.finish()?);
    result?;
    ensure!(
        ids(lab)? == before,
        "identity numbers changed: {before:?} → {:?}",
        ids(lab)?
    );
    ensure_no_verdict_changed(
        "the id table deleted, garbled, the operator killed and restarted",
        secs,
        &allowed,
        &denied,
    )
}

/// `(status, reason, message)` of condition `type_` of MeshPolicy `shop/name`.
fn policy_condition(
    lab: &Lab,
    name: &str,
    type_: &str,
) -> anyhow::Result<(String, String, String)> {
    let out = lab.kubectl(&[
        "get",
        "meshpolicy",
        "-n",
        "shop",
        name,
        "-o",
        &format!(
            "jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}}|{{.status.conditions[?(@.type==\"{type_}\")].reason}}|{{.status.conditions[?(@.type==\"{type_}\")].message}}"
        ),
    ])?;
    let mut parts = out.splitn(3, '|').map(str::to_string);
    Ok((
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    ))
}

/// Waits until condition `type_` of `shop/name` satisfies `ok`; returns it.
async fn wait_condition(
    lab: &Lab,
    name: &str,
    type_: &str,
    ok: impl Fn(&(String, String, String)) -> bool,
) -> anyhow::Result<(String, String, String)> {
    let t = Instant::now();
    loop {
        let c = policy_condition(lab, name, type_)?;
        if ok(&c) {
            return Ok(c);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "{name} {type_}: still {c:?} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A policy far too large for the nodes' maps, under load: 32 ingress rules on the backend
/// pods, each with 32 port ranges (all covering the backend's port) and peers
/// `namespaceSelector: {}` plus 28 address blocks (which multiply the identities as a large
/// cluster's namespaces would) — about 500 000 policy entries for a 65 536-entry map. Were any
/// of it in force, the batch job's denied connections would get through. The nodes refuse it
/// whole (compiling stops at the map's capacity): `Programmed=False` naming the map, not one
/// verdict changes; once it is deleted the nodes apply configs again.
async fn an_oversized_policy_is_refused_whole_under_load(lab: &mut Lab) -> anyhow::Result<()> {
    let mut spec = String::from("  selector: {matchLabels: {app: backend}}\n  ingress:\n");
    for r in 0..32u32 {
        spec.push_str("    - from:\n        - namespaceSelector: {}\n");
        for b in 0..28u32 {
            let i = r * 28 + b;
            spec.push_str(&format!(
                "        - ipBlock: {{cidr: 198.{}.{}.0/24}}\n",
                18 + i / 256,
                i % 256
            ));
        }
        spec.push_str("      ports:\n");
        for p in 0..32u32 {
            let (first, last) = (1 + p * 2000 + r, 1998 + p * 2000 - r);
            spec.push_str(&format!(
                "        - {{port: {first}, endPort: {last}, protocol: TCP}}\n"
            ));
        }
    }
    let (allowed, denied) = start_load(lab)?;
    let t = Instant::now();
    let run = async {
        let refused = with_policy(lab, "oversized", &spec, async || {
            let c = wait_condition(lab, "oversized", "Programmed", |c| {
                c.0 == "False" && c.1 == "Failed"
            })
            .await?;
            let since = t.elapsed();
            ensure!(
                c.2.contains("CF_POLICY") && c.2.contains("0/2 nodes"),
                "Programmed names the map on both nodes: {c:?}"
            );
            let accepted = policy_condition(lab, "oversized", "Accepted")?;
            ensure!(accepted.0 == "True", "Accepted: {accepted:?}");
            // The demo's policy is untouched and still in force.
            let demo = policy_condition(lab, "allow-frontend-to-backend", "Programmed")?;
            ensure!(demo.0 == "True", "the demo policy: {demo:?}");
            tokio::time::sleep(Duration::from_secs(3)).await;
            anyhow::Ok((since, c.2))
        })
        .await?;
        // Recovery: a (harmless) new policy on the same pods is programmed on both nodes.
        let recovered = with_policy(
            lab,
            "after-oversized",
            "  selector: {matchLabels: {app: backend}}\n  ingress:\n    - from: [{identity: frontend}]\n      ports: [{port: 8080, protocol: TCP}]\n",
            async || {
                let t = Instant::now();
                wait_condition(lab, "after-oversized", "Programmed", |c| c.0 == "True").await?;
                anyhow::Ok(t.elapsed())
            },
        )
        .await?;
        anyhow::Ok((refused, recovered))
    };
    let result = run.await;
    let secs = t.elapsed().as_secs_f64();
    let (allowed, denied) = (allowed.finish()?, denied.finish()?);
    let ((since, message), recovered) = result?;
    eprintln!(
        "oversized policy: Programmed=False {:.0} ms after the apply: {message}; then a new policy programmed on both nodes {:.0} ms after its apply",
        since.as_secs_f64() * 1e3,
        recovered.as_secs_f64() * 1e3
    );
    ensure_no_verdict_changed(
        "an oversized policy applied, refused and deleted",
        secs,
        &allowed,
        &denied,
    )
}

/// A pod reaching itself — its own address, or its own Service balanced to itself — passes
/// whatever its policy, with no flow (docs/policy.md): the backend is default-deny for
/// everyone but the frontend, yet reaches itself; the same connection to the other backend is
/// dropped and reported.
async fn a_pod_reaches_itself_whatever_its_policy(lab: &mut Lab) -> anyhow::Result<()> {
    let backends = lab.pods("shop", "backend")?;
    ensure!(backends.len() == 2, "{backends:?}");
    let (me, my_ip) = backends[0].clone();
    let (other, other_ip) = backends[1].clone();
    let log = lab.observe_flows().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let probe =
        |target: String| tokio::task::block_in_place(|| lab.probe("shop", &me, "tcp", &target));
    for _ in 0..3 {
        let out = probe(format!("{my_ip}:8080"))?;
        ensure!(out == format!("success {me}"), "to itself: {out}");
    }
    let out = probe(format!("{other_ip}:8080"))?;
    ensure!(out == "timeout", "to {other}: {out}");
    // Through its own Service: itself or the other backend, at random.
    let vip = lab.cluster_ip("shop", "backend")?;
    let (mut itself, mut denied) = (0, 0);
    for _ in 0..12 {
        match probe(format!("{vip}:80"))?.as_str() {
            s if s == format!("success {me}") => itself += 1,
            "timeout" => denied += 1,
            s => bail!("through the Service: {s}"),
        }
    }
    ensure!(
        itself > 0 && denied > 0,
        "12 connects: {itself} to itself, {denied} denied"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flows = log.since(t, my_ip, "tcp");
    let to = |ip: std::net::Ipv4Addr| {
        flows
            .iter()
            .filter(|f| f.destination.as_ref().map(|d| d.ip) == Some(u32::from(ip)))
            .collect::<Vec<_>>()
    };
    ensure!(
        to(other_ip).iter().any(|f| f.verdict == "dropped"),
        "the denied connections are reported: {flows:?}"
    );
    ensure!(to(my_ip).is_empty(), "no flow to itself: {:?}", to(my_ip));
    eprintln!(
        "a backend to itself: 3/3 direct, {itself}/12 through its Service (the other {denied} balanced to {other}, dropped); {} flows to the other backend, 0 to itself",
        to(other_ip).len()
    );
    Ok(())
}

/// The index of simulated node `name`.
fn node_index(lab: &Lab, name: &str) -> anyhow::Result<usize> {
    lab.nodes
        .iter()
        .position(|n| n.name == name)
        .with_context(|| format!("no node {name}"))
}

/// Path-MTU discovery under default-deny: the frontend's node gets a smaller MTU on the last
/// hop (its veth to the frontend, 1200), and the frontend pulls 4 MB through a backend on the
/// other node (its echo). The backend's segments are too big for that hop; the frontend's node
/// answers "fragmentation needed" from its own address — `world` to the backend's node, where
/// the backend is default-deny — and the error passes there as related to the tracked
/// connection, so the backend lowers its segments and the transfer completes (without that it
/// stalls: a PMTU black hole).
async fn path_mtu_discovery_works_under_default_deny(lab: &mut Lab) -> anyhow::Result<()> {
    let frontends = lab.placed_pods("shop", "frontend")?;
    let (fe, fe_ip, fe_node) = frontends.first().cloned().context("a frontend")?;
    let (be, be_ip, _) = lab
        .placed_pods("shop", "backend")?
        .into_iter()
        .find(|(_, _, n)| *n != fe_node)
        .context("a backend on the other node")?;
    let node = &lab.nodes[node_index(lab, &fe_node)?];
    let route = node.ns.ip(&["-o", "route", "get", &fe_ip.to_string()]);
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .with_context(|| format!("no device in {route:?}"))?
        .to_string();
    node.ns.ip(&["link", "set", &dev, "mtu", "1200"]);
    let t = Instant::now();
    let out = tokio::task::block_in_place(|| {
        lab.workload(
            "shop",
            &fe,
            &[
                "probe",
                "tcp",
                &format!("{be_ip}:8080"),
                "--bytes",
                "4000000",
                "--timeout-ms",
                "5000",
            ],
        )
    });
    let node = &lab.nodes[node_index(lab, &fe_node)?];
    node.ns.ip(&["link", "set", &dev, "mtu", "1500"]);
    let out = out?;
    ensure!(
        out.starts_with(&format!("success {be} bytes=4000000")),
        "4 MB through a 1200-byte hop: {out}"
    );
    eprintln!(
        "4 MB echoed through a 1200-byte last hop under default-deny in {:.0} ms ({out})",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Every address of a node is the host there, not only those `Node.status.addresses` lists: a
/// connection from node 0's second address (on its loopback) reaches a default-deny backend on
/// node 0 as `host`; from node 1's second address it is `world` to node 0 and denied.
async fn every_address_of_the_node_is_the_host(lab: &mut Lab) -> anyhow::Result<()> {
    let (_, be_ip, _) = lab
        .placed_pods("shop", "backend")?
        .into_iter()
        .find(|(_, _, n)| *n == lab.nodes[0].name)
        .context("a backend on node 0")?;
    let log = lab.observe_flows().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let target = format!("{be_ip}:8080");
    let mut got = Vec::new();
    for i in 0..2 {
        let extra = lab.nodes[i].extra_ip.to_string();
        let t = Instant::now();
        let out = tokio::task::block_in_place(|| {
            lab.workload_on_node(i, &["probe", "tcp", &target, "--source", &extra])
        })?;
        let verdict = lab
            .verdict_since(&log, t, lab.nodes[i].extra_ip, "tcp")
            .await;
        got.push((out, verdict));
    }
    ensure!(
        got[0].0.starts_with("success") && got[0].1 == ("allowed".into(), "host".into()),
        "from node 0's second address: {:?}",
        got[0]
    );
    ensure!(
        got[1].0 == "timeout" && got[1].1 == ("dropped".into(), "default_deny".into()),
        "from node 1's second address: {:?}",
        got[1]
    );
    Ok(())
}

/// A pod forging another pod's source address (a raw socket: the batch job sends UDP to each
/// backend's port 5353 — which the frontend may reach — as the frontend) gets nothing: each
/// datagram is dropped at the batch job's own veth with a `spoofed` flow, and no backend
/// accepts one; the frontend's own datagram gets its answer.
async fn a_forged_source_address_gets_nothing(lab: &mut Lab) -> anyhow::Result<()> {
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    let (fe, fe_ip) = first_pod(lab, "shop", "frontend")?;
    let backends = lab.pods("shop", "backend")?;
    let log = lab.observe_flows().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    for (_, be_ip) in &backends {
        let out = tokio::task::block_in_place(|| {
            lab.workload(
                "batch",
                &etl,
                &["forge", "udp", &fe_ip.to_string(), &format!("{be_ip}:5353")],
            )
        })?;
        ensure!(out == "sent", "forge: {out}");
        let own = tokio::task::block_in_place(|| {
            lab.probe("shop", &fe, "udp", &format!("{be_ip}:5353"))
        })?;
        ensure!(
            own.starts_with("success"),
            "the frontend's own datagram: {own}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flows = log.since(t, fe_ip, "udp");
    let forged: Vec<_> = flows
        .iter()
        .filter(|f| f.source.as_ref().is_some_and(|s| s.port == 40000))
        .collect();
    let spoofed = forged
        .iter()
        .filter(|f| f.verdict == "dropped" && f.reason == "spoofed" && f.direction == "egress")
        .count();
    ensure!(
        spoofed == backends.len(),
        "one spoofed drop per forged datagram: {forged:?}"
    );
    ensure!(
        forged.iter().all(|f| f.verdict == "dropped"),
        "no forged datagram was accepted anywhere: {forged:?}"
    );
    eprintln!(
        "{} forged datagrams (the batch job as the frontend): {spoofed} dropped at the sender's veth as spoofed, 0 accepted; the frontend's own {} answered",
        backends.len(),
        backends.len()
    );
    Ok(())
}

/// The holder of the operator's Lease.
fn lease_holder(lab: &Lab) -> anyhow::Result<String> {
    Ok(lab
        .kubectl(&[
            "get",
            "lease",
            "-n",
            lab::SYSTEM_NAMESPACE,
            "cortexflow-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?
        .trim()
        .to_string())
}

/// Two operator replicas, every agent attached to the follower, under load: the follower
/// forwards the agents' reports to the leader, which writes `Programmed` (a new policy reads
/// "programmed on 2/2 nodes") and sets the readiness gate (a new frontend pod becomes Ready).
/// Then the leader is killed (`kill -9`): the follower takes the Lease over (the lease is
/// 15 s) and goes on serving the agents it has; no verdict changes, and a policy applied after
/// the handover is programmed too. The first replica is brought back at the end.
async fn agents_on_a_follower_and_leader_loss_under_load(lab: &mut Lab) -> anyhow::Result<()> {
    let leader = lab.operator.identity.clone();
    ensure!(lease_holder(lab)? == leader, "the first replica leads");
    let mut follower = lab.start_replica("operator-follower").await?;
    let (allowed, denied) = start_load(lab)?;
    let t = Instant::now();
    let harmless = |name: &str| {
        format!(
            "apiVersion: mesh.cortexflow.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: backend}}}}\n  ingress:\n    - from: [{{identity: frontend}}]\n      ports: [{{port: 8080, protocol: TCP}}]\n"
        )
    };
    let programmed = async |lab: &Lab, name: &str| -> anyhow::Result<Duration> {
        let t = Instant::now();
        wait_condition(lab, name, "Programmed", |c| {
            c.0 == "True" && c.2 == "programmed on 2/2 nodes"
        })
        .await?;
        Ok(t.elapsed())
    };
    let run = async {
        // Every agent onto the follower.
        lab.operator_service.remove(lab.operator.grpc);
        restart_agents(lab, 1).await?;
        let on_follower = follower
            .metric("cortexflow_operator_connected_agents")
            .await?;
        ensure!(on_follower == 2.0, "agents on the follower: {on_follower}");
        lab.apply_yaml(&harmless("via-follower"))?;
        let via_follower = programmed(lab, "via-follower").await?;
        // A new pod's readiness gate, from a report the follower forwarded.
        lab.kubectl(&[
            "scale",
            "deployment",
            "-n",
            "shop",
            "frontend",
            "--replicas=2",
        ])?;
        let t_ready = Instant::now();
        ready_replicas(lab, "shop", "frontend", 2).await?;
        let ready = t_ready.elapsed();
        lab.kubectl(&[
            "scale",
            "deployment",
            "-n",
            "shop",
            "frontend",
            "--replicas=1",
        ])?;
        ready_replicas(lab, "shop", "frontend", 1).await?;

        // The leader dies.
        lab.operator.daemon.kill();
        let t_kill = Instant::now();
        while lease_holder(lab)? != follower.identity {
            ensure!(
                t_kill.elapsed() < Duration::from_secs(40),
                "the follower did not take the Lease over"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let handover = t_kill.elapsed();
        lab.apply_yaml(&harmless("after-handover"))?;
        let after = programmed(lab, "after-handover").await?;
        for p in ["via-follower", "after-handover"] {
            lab.kubectl(&["delete", "meshpolicy", "-n", "shop", p])?;
        }
        anyhow::Ok((via_follower, ready, handover, after))
    };
    let result = run.await;
    let secs = t.elapsed().as_secs_f64();
    // Back to one replica, the first, where the agents expect it.
    let restored = async {
        lab.start_operator().await?;
        lab.operator_service.add(lab.operator.grpc);
        lab.operator_service.remove(follower.grpc);
        follower.daemon.stop(Duration::from_secs(15));
        anyhow::Ok(())
    }
    .await;
    let (allowed, denied) = (allowed.finish()?, denied.finish()?);
    let (via_follower, ready, handover, after) = result?;
    restored?;
    eprintln!(
        "agents on the follower: a policy Programmed 2/2 in {:.0} ms, a new pod Ready in {:.0} ms; leader killed, the follower leads after {:.1} s, a policy Programmed 2/2 in {:.0} ms",
        via_follower.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3,
        handover.as_secs_f64(),
        after.as_secs_f64() * 1e3
    );
    ensure_no_verdict_changed(
        "two replicas, agents on the follower, the leader killed",
        secs,
        &allowed,
        &denied,
    )
}

fn leftovers() -> anyhow::Result<()> {
    let pid = std::process::id();
    let mut left: Vec<String> = cortexflow_testkit::net::owned_by(pid)
        .into_iter()
        .map(|(kind, path)| format!("{kind:?} {}", path.display()))
        .collect();
    // Children of this process (the probes and daemons were ours).
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace() {
        if let Ok(cmd) = std::fs::read_to_string(format!("/proc/{c}/cmdline")) {
            left.push(format!("process {c} {}", cmd.replace('\0', " ")));
        }
    }
    // Pods' resolv.conf directories, and mount targets the lab created on the machine.
    for d in [
        "/etc/netns",
        "/etc/coredns",
        "/var/run/secrets/kubernetes.io",
    ] {
        let p = std::path::Path::new(d);
        let ours = match std::fs::read_dir(p) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| d != "/etc/netns" || e.file_name().to_string_lossy().starts_with("cfp"))
                .count(),
            Err(_) => 0,
        };
        if ours > 0 {
            left.push(format!("{ours} entries in {d}"));
        }
    }
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// `cargo xtask lab exec node/<name> -- <cmd>` runs the command in the node's network namespace,
/// and *as the process the caller started* (cargo → xtask → cargo → lab → command, each
/// replacing itself): a signal sent to `cargo xtask …` reaches the command — and, for
/// `cargo xtask lab`, the lab, which removes everything before it exits. Were any step a child
/// process, the pid would stay cargo's and the signal would orphan the rest.
async fn cargo_xtask_lab_exec_runs_in_a_node_as_the_same_process(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    let node = lab.nodes.first().context("no node")?;
    let (node_name, node_ns) = (node.name.clone(), node.ns.path());
    // `cargo xtask lab exec` finds the lab under $TMPDIR/cortexflow-lab.
    let tmp = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-xtask-"));
    std::fs::create_dir_all(&tmp)?;
    let _cleanup = scopeguard(tmp.clone());
    std::os::unix::fs::symlink(&lab.state_dir, tmp.join("cortexflow-lab"))?;
    let mut child = cortexflow_testkit::cargo::cargo_command()
        .current_dir(workspace_root())
        .env("TMPDIR", &tmp)
        .args([
            "xtask",
            "lab",
            "exec",
            &format!("node/{node_name}"),
            "--",
            "sleep",
            "120",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    let t = Instant::now();
    let outcome = async {
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("cargo xtask lab exec exited ({status}) before running the command");
            }
            ensure!(
                t.elapsed() < Duration::from_secs(240),
                "the started process is still {comm:?} after {:?}",
                t.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let inode = |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let in_ns = inode(std::path::Path::new(&format!("/proc/{pid}/ns/net")))?;
        ensure!(
            in_ns == inode(&node_ns)?,
            "the command does not run in {node_name}'s network namespace"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let t2 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    std::os::unix::process::ExitStatusExt::signal(&status) == Some(15),
                    "ended with {status}, not by the SIGTERM"
                );
                break;
            }
            ensure!(t2.elapsed() < Duration::from_secs(5), "SIGTERM did not end the command");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "cargo xtask lab exec node/{node_name}: the same pid ran the command in the node after {:.1} s; SIGTERM to it ended the command",
            t.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    }
    .await;
    if outcome.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    outcome
}

/// Removes a directory when dropped (also when the test fails).
fn scopeguard(dir: std::path::PathBuf) -> impl Drop {
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Rm(dir)
}

/// The node simulator builds a container's environment as a kubelet does — plain values, the
/// downward API, ConfigMap and Secret keys, `envFrom` — read from the running process itself
/// (`/proc/<pid>/environ`); a pod whose source is missing does not start, and says why.
async fn a_pods_environment_comes_from_its_manifest(lab: &mut Lab) -> anyhow::Result<()> {
    let ns = "batch";
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "env-cm", "namespace": ns},
         "data": {"mode": "fast", "A": "from-envfrom"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "env-secret", "namespace": ns},
         "stringData": {"token": "s3cr3t"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "env-probe", "namespace": ns, "labels": {"app": "env-probe", "tier": "t1"}},
         "spec": {"containers": [{"name": "app", "image": "cortexflow/workload",
            "args": ["serve", "--tcp", "8080"],
            "envFrom": [{"configMapRef": {"name": "env-cm"}, "prefix": "CM_"}],
            "env": [
                {"name": "PLAIN", "value": "v"},
                {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "MY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "MY_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "MY_TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "mode"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "token"}}},
                {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "no-such-cm", "key": "k", "optional": true}}}
            ]}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "env-missing", "namespace": ns},
         "spec": {"containers": [{"name": "app", "image": "cortexflow/workload",
            "args": ["serve", "--tcp", "8080"],
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "no-such-cm", "key": "k"}}}]}]}}
    ]});
    let file = lab.state_dir.join("env-test.json");
    std::fs::write(&file, manifest.to_string())?;
    let path = file.to_string_lossy().into_owned();
    lab.kubectl(&["apply", "-f", &path])?;
    let outcome = async {
        let t = Instant::now();
        let (pod, node, ip, host_ip) = loop {
            let out = lab.kubectl(&[
                "get", "pod", "-n", ns, "env-probe", "-o",
                "jsonpath={.status.phase} {.spec.nodeName} {.status.podIP} {.status.hostIP}",
            ])?;
            let f: Vec<&str> = out.split_whitespace().collect();
            if f.len() == 4 && f[0] == "Running" {
                break ("env-probe", f[1].to_string(), f[2].to_string(), f[3].to_string());
            }
            ensure!(t.elapsed() < Duration::from_secs(30), "env-probe not running: {out:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let state = std::fs::read_to_string(lab.state_dir.join("pods").join(format!("{ns}_{pod}")))?;
        let pid = state.lines().nth(4).context("no pid in the pod's state file")?;
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let env: std::collections::BTreeMap<String, String> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let want = [
            ("PLAIN", "v"),
            ("MY_NAME", "env-probe"),
            ("MY_NS", ns),
            ("MY_NODE", node.as_str()),
            ("MY_IP", ip.as_str()),
            ("MY_HOST_IP", host_ip.as_str()),
            ("MY_TIER", "t1"),
            ("MODE", "fast"),
            ("TOKEN", "s3cr3t"),
            ("CM_mode", "fast"),
            ("CM_A", "from-envfrom"),
        ];
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| env.get(*k).map(String::as_str) != Some(*v))
            .map(|(k, v)| format!("{k}={:?} (want {v:?})", env.get(*k)))
            .collect();
        ensure!(wrong.is_empty(), "the process's environment: {}", wrong.join(", "));
        ensure!(!env.contains_key("MAYBE"), "an optional missing key was set");
        // The pod whose ConfigMap does not exist never runs, and its condition says why.
        let t = Instant::now();
        loop {
            let out = lab.kubectl(&[
                "get", "pod", "-n", ns, "env-missing", "-o",
                "jsonpath={.status.phase}|{.status.conditions[?(@.type=='Ready')].message}",
            ])?;
            if out.contains("no-such-cm") {
                ensure!(!out.starts_with("Running"), "env-missing runs: {out}");
                break;
            }
            ensure!(t.elapsed() < Duration::from_secs(30), "env-missing says nothing: {out:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("a pod's environment: {} variables from value, fieldRef, configMapKeyRef, secretKeyRef and envFrom as the manifest says; a missing ConfigMap keeps its pod from starting, named in its condition", want.len());
        anyhow::Ok(())
    }
    .await;
    // Waits until the node simulator removed both pods (their sandboxes gone).
    let deleted = lab.kubectl(&["delete", "-f", &path, "--timeout=60s"]);
    let _ = std::fs::remove_file(&file);
    outcome?;
    deleted.map(|_| ())
}

/// What a process in a pod holds — its service account's tokens bound to the pod, as the kubelet
/// projects them (one for the CA's audience, one for the API) — used as an attacker would
/// against the operator and the agents (the lab's operator Service is on the host's loopback,
/// which pods do not reach: the attempts run from the host, with the pod's credentials only):
/// it obtains its own identity's certificate and nothing more; it cannot subscribe, report or
/// read flows.
async fn a_pods_credentials_cannot_pass_for_an_agent_or_read_flows(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    use cortexflow_domain::spiffe;
    use cortexflow_proto::agent::v1::{self as av1, agent_config_client::AgentConfigClient};
    use cortexflow_trust::{Bundle, Credentials, TrustStore};
    use tonic::Code;
    const TD: &str = "cluster.local";
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(lab.client.clone(), "shop");
    let list = pods
        .list(&kube::api::ListParams::default().labels("app=frontend"))
        .await?;
    let pod = list.items.first().context("no frontend pod")?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let sa = spec.service_account_name.unwrap_or_default();
    let node = spec.node_name.unwrap_or_default();
    let bound = [
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        name.as_str(),
    ];
    let mut args = vec![
        "create",
        "token",
        "-n",
        "shop",
        sa.as_str(),
        "--audience",
        "cortexflow-ca",
    ];
    args.extend(bound);
    let ca_token = lab.kubectl(&args)?.trim().to_string();
    let mut args = vec!["create", "token", "-n", "shop", sa.as_str()];
    args.extend(bound);
    let api_token = lab.kubectl(&args)?.trim().to_string();

    let bundle = Bundle::from_pem(&std::fs::read(lab.state_dir.join("ca.crt"))?)?;
    let operator = lab.operator_service.addr;
    let channel = |creds: Option<std::sync::Arc<Credentials>>| {
        let trust = TrustStore::new(TD, bundle.clone());
        async move {
            let cfg = cortexflow_trust::tls::client_config(creds, trust, &spiffe::operator(TD))?;
            anyhow::Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{operator}"))?
                    .connect_with_connector(cortexflow_trust::tls::connector(cfg))
                    .await?,
            )
        }
    };

    // Its own identity: issued. A node certificate: refused.
    let own = spiffe::service_identity(TD, "shop", "frontend");
    let creds = Credentials::new();
    cortexflow_trust::client::obtain(channel(None).await?, &ca_token, &own, TD, &creds)
        .await
        .context("the pod's own certificate")?;
    let node_id = spiffe::node_agent(TD, &node);
    match cortexflow_trust::client::obtain(
        channel(None).await?,
        &ca_token,
        &node_id,
        TD,
        &Credentials::new(),
    )
    .await
    {
        Err(cortexflow_trust::client::ObtainError::Refused(s)) => {
            ensure!(
                s.code() == Code::PermissionDenied,
                "a node certificate: {s}"
            )
        }
        other => bail!("the pod obtained {node_id}: {other:?}"),
    }
    // The API token is not for the CA.
    match cortexflow_trust::client::obtain(
        channel(None).await?,
        &api_token,
        &own,
        TD,
        &Credentials::new(),
    )
    .await
    {
        Err(cortexflow_trust::client::ObtainError::Refused(s)) => {
            ensure!(s.code() == Code::Unauthenticated, "the API token: {s}")
        }
        other => bail!("the CA took the pod's API token: {other:?}"),
    }

    // Subscribe and report as its node: with its certificate, with none.
    let sub = av1::SubscribeRequest {
        node: node.clone(),
        ..Default::default()
    };
    let mut with_cert = AgentConfigClient::new(channel(Some(creds)).await?);
    let e = with_cert.subscribe(sub.clone()).await.unwrap_err();
    ensure!(
        e.code() == Code::PermissionDenied,
        "subscribe with the pod's certificate: {e}"
    );
    let report = av1::AgentStatus {
        node: node.clone(),
        applied_version: 1,
        ..Default::default()
    };
    let e = with_cert
        .report_status(tokio_stream::iter(vec![report.clone()]))
        .await
        .unwrap_err();
    ensure!(
        e.code() == Code::PermissionDenied,
        "report with the pod's certificate: {e}"
    );
    let mut anon = AgentConfigClient::new(channel(None).await?);
    let e = anon.subscribe(sub).await.unwrap_err();
    ensure!(
        e.code() == Code::Unauthenticated,
        "subscribe without a certificate: {e}"
    );
    let e = anon
        .report_status(tokio_stream::iter(vec![report]))
        .await
        .unwrap_err();
    ensure!(
        e.code() == Code::Unauthenticated,
        "report without a certificate: {e}"
    );

    // Flows of its node's agent: its API token is not allowed, no token is not authenticated;
    // the lab's reader is served.
    let agent = lab
        .agents
        .iter()
        .find(|a| a.name == node)
        .context("the pod's node has no agent")?;
    for (what, token, code) in [
        (
            "the pod's API token",
            Some(api_token.as_str()),
            Code::PermissionDenied,
        ),
        ("no token", None, Code::Unauthenticated),
    ] {
        let e = lab
            .flows_client(agent, token)
            .await?
            .observe(cortexflow_proto::flows::v1::ObserveRequest::default())
            .await
            .unwrap_err();
        ensure!(e.code() == code, "flows with {what}: {e}");
    }
    let ns_scoped = lab
        .flows_client(agent, Some(&lab.flows_token))
        .await?
        .observe(cortexflow_proto::flows::v1::ObserveRequest {
            namespace: "shop".into(),
            ..Default::default()
        })
        .await;
    ensure!(ns_scoped.is_ok(), "the reader was refused: {ns_scoped:?}");
    eprintln!(
        "pod {name} (sa {sa}, node {node}): its own certificate {own} issued; a node certificate, subscribe, report and flows refused"
    );
    Ok(())
}

/// The sum of an agent's metric samples whose line starts with `prefix`.
async fn agent_metric(a: &cortexflow_testkit::node::Agent, prefix: &str) -> anyhow::Result<f64> {
    let (_, body) = a.admin("/metrics").await.context("agent metrics")?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Config deliveries while the CA rotates: each round changes a MeshPolicy that applies on both
/// nodes and waits until its new generation is Programmed on every node.
struct Deliveries {
    rounds: u32,
    failed: Vec<String>,
}

impl Deliveries {
    fn round(&mut self, lab: &Lab) -> anyhow::Result<()> {
        self.rounds += 1;
        let port = 7000 + self.rounds;
        lab.apply_yaml(&format!(
            "apiVersion: mesh.cortexflow.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: ca-rotation-probe, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: backend}}}}\n  ingress:\n    - from: [{{identity: frontend}}]\n      ports: [{{port: {port}, protocol: TCP}}]\n"
        ))?;
        let t = Instant::now();
        loop {
            let out = lab.kubectl(&[
                "get", "meshpolicy", "-n", "shop", "ca-rotation-probe", "-o",
                "jsonpath={.metadata.generation} {.status.conditions[?(@.type==\"Programmed\")].status} {.status.conditions[?(@.type==\"Programmed\")].observedGeneration}",
            ])?;
            let f: Vec<&str> = out.split_whitespace().collect();
            if f.len() == 3 && f[1] == "True" && f[0] == f[2] {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(15) {
                self.failed
                    .push(format!("round {} (port {port}): {out}", self.rounds));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Rotation as an operator of the mesh does it, by editing the CA Secret, while config changes
/// keep flowing: a new root added (every agent takes and acknowledges the bundle), the issuer
/// switched to an intermediate of it (only after those acknowledgements; the operator's and the
/// agents' certificates move to it), the old root removed (only a leaf lifetime after the
/// switch). Meanwhile every leaf renews on its own every ~30 s. No delivery fails, no process
/// restarts, no renewal fails, and afterwards a certificate of the old root is refused.
async fn the_ca_rotates_leaves_issuer_and_root_under_config_traffic(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    use cortexflow_domain::spiffe;
    use cortexflow_trust::{Authority, Bundle, Credentials, TrustStore, ca::Material};
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    const TD: &str = "cluster.local";
    let secrets: kube::Api<Secret> = kube::Api::namespaced(lab.client.clone(), "cortexflow");
    let old = secrets.get("cortexflow-ca").await?;
    let data = old.data.clone().unwrap_or_default();
    let text = |k: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(
            data.get(k).context(k.to_string())?.0.clone(),
        )?)
    };
    let old_material = Material {
        roots_pem: text("ca.crt")?,
        root_key_pem: text("ca.key").ok(),
        issuer_pem: text("issuer.crt")?,
        issuer_key_pem: text("issuer.key")?,
    };
    let old_ca = Authority::from_material(TD, old_material.clone())?;
    let new_ca = Authority::generate(TD, std::time::SystemTime::now())?;
    let set = |fields: Vec<(&'static str, String)>| {
        let secrets = secrets.clone();
        async move {
            let data: std::collections::BTreeMap<String, ByteString> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect();
            let patch = serde_json::json!({ "data": serde_json::to_value(&data)? });
            secrets
                .patch(
                    "cortexflow-ca",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await?;
            anyhow::Ok(())
        }
    };
    let starts: Vec<usize> = lab.agents.iter().map(|a| a.starts()).collect();
    let mut renewed_before = Vec::new();
    let mut failed_before = Vec::new();
    for a in &lab.agents {
        renewed_before.push(
            agent_metric(
                a,
                "cortexflow_agent_certificate_renewals_total{result=\"ok\"",
            )
            .await?,
        );
        failed_before.push(
            agent_metric(
                a,
                "cortexflow_agent_certificate_renewals_total{result=\"failed\"",
            )
            .await?,
        );
    }
    let mut d = Deliveries {
        rounds: 0,
        failed: Vec::new(),
    };
    let wait = |what: &'static str, limit: Duration| (what, Instant::now(), limit);
    // Rounds of deliveries until `done`, at most until `limit`.
    macro_rules! until {
        ($w:expr, $done:expr) => {{
            let (what, t, limit) = $w;
            loop {
                tokio::task::block_in_place(|| d.round(lab))?;
                if $done {
                    break t.elapsed();
                }
                ensure!(t.elapsed() < limit, "{what}: not within {limit:?}");
            }
        }};
    }
    async fn all_agents(lab: &Lab, prefix: &str, want: f64) -> anyhow::Result<bool> {
        for a in &lab.agents {
            if agent_metric(a, prefix).await? != want {
                return Ok(false);
            }
        }
        Ok(true)
    }
    // The agents' node certificates chain to `anchors`: their TLS port verifies with those
    // alone (a root, or an intermediate to tell which one signed).
    async fn agents_chain_to(lab: &Lab, anchors: &Bundle) -> anyhow::Result<bool> {
        for a in &lab.agents {
            let trust = TrustStore::new(TD, anchors.clone());
            let cfg = cortexflow_trust::tls::client_config(
                None,
                trust,
                &spiffe::node_agent(TD, &a.name),
            )?;
            let ok = tonic::transport::Endpoint::from_shared(format!("http://{}", a.grpc))?
                .connect_with_connector(cortexflow_trust::tls::connector(cfg))
                .await
                .is_ok();
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
    let operator_chains_to = |anchors: &Bundle| {
        let trust = TrustStore::new(TD, anchors.clone());
        let addr = lab.operator_service.addr;
        async move {
            let cfg = cortexflow_trust::tls::client_config(None, trust, &spiffe::operator(TD))?;
            anyhow::Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_with_connector(cortexflow_trust::tls::connector(cfg))
                    .await
                    .is_ok(),
            )
        }
    };
    until!(
        wait("deliveries before", Duration::from_secs(30)),
        d.rounds >= 2
    );

    // 0. A new intermediate of the same root: the bundle does not change, so the issuer
    // switches at once; the agents' certificates move to it at their next renewal.
    let next =
        Authority::from_material(TD, old_ca.next_intermediate(std::time::SystemTime::now())?)?;
    let next_only = Bundle::from_der(vec![next.issuer_der().clone()])?;
    set(vec![
        ("issuer.crt", next.material().issuer_pem.clone()),
        ("issuer.key", next.material().issuer_key_pem.clone()),
    ])
    .await?;
    let intermediate_switched = until!(
        wait(
            "the operator serves from the new intermediate",
            Duration::from_secs(60)
        ),
        lab.operator
            .metric("cortexflow_ca_issuer_rotations_total")
            .await?
            == 1.0
            && operator_chains_to(&next_only).await?
    );
    let intermediate_moved = until!(
        wait(
            "every agent's certificate comes from the new intermediate",
            Duration::from_secs(2 * lab::CERT_LIFETIME_SECS)
        ),
        agents_chain_to(lab, &next_only).await?
    );

    // 1. The new root joins the bundle.
    let both = format!("{}{}", old_material.roots_pem, new_ca.material().roots_pem);
    set(vec![("ca.crt", both)]).await?;
    let took_bundle = until!(
        wait(
            "every agent takes the two-root bundle",
            Duration::from_secs(60)
        ),
        all_agents(lab, "cortexflow_agent_trust_bundle_roots", 2.0).await?
    );

    // 2. The issuer switches to the new root's intermediate.
    let m = new_ca.material();
    set(vec![
        ("issuer.crt", m.issuer_pem.clone()),
        ("issuer.key", m.issuer_key_pem.clone()),
        ("ca.key", m.root_key_pem.clone().unwrap_or_default()),
    ])
    .await?;
    let switched = until!(
        wait(
            "the operator serves from the new issuer",
            Duration::from_secs(60)
        ),
        lab.operator
            .metric("cortexflow_ca_issuer_rotations_total")
            .await?
            == 2.0
            && operator_chains_to(new_ca.bundle()).await?
    );
    let switch_seen = Instant::now();
    let agents_moved = until!(
        wait(
            "every agent's certificate chains to the new root",
            Duration::from_secs(2 * lab::CERT_LIFETIME_SECS)
        ),
        agents_chain_to(lab, new_ca.bundle()).await?
    );

    // 3. The old root leaves the bundle — only a leaf lifetime after the switch.
    set(vec![("ca.crt", m.roots_pem.clone())]).await?;
    let switch_seen_before_removal = switch_seen.elapsed();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cm_roots = |lab: &Lab| -> anyhow::Result<usize> {
        let pem = lab.kubectl(&[
            "get",
            "configmap",
            "-n",
            "cortexflow",
            "cortexflow-ca-bundle",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])?;
        Ok(Bundle::from_pem(pem.as_bytes())?.ders().len())
    };
    let early = cm_roots(lab)?;
    let removed = until!(
        wait(
            "the old root leaves every agent's bundle",
            Duration::from_secs(3 * lab::CERT_LIFETIME_SECS)
        ),
        cm_roots(lab)? == 1 && all_agents(lab, "cortexflow_agent_trust_bundle_roots", 1.0).await?
    );
    let removed_after = t.elapsed();

    // A certificate of the old root is refused now; the operator serves nothing to the old root.
    let old_node = {
        let (key, c) = old_ca
            .issue_own(
                &spiffe::node_agent(TD, &lab.agents[0].name),
                Duration::from_secs(600),
                std::time::SystemTime::now(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let creds = Credentials::new();
        creds.set_issued(&key, c)?;
        creds
    };
    let trust = TrustStore::new(TD, new_ca.bundle().clone());
    let cfg = cortexflow_trust::tls::client_config(Some(old_node), trust, &spiffe::operator(TD))?;
    let refused = match tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        lab.operator_service.addr
    ))?
    .connect_with_connector(cortexflow_trust::tls::connector(cfg))
    .await
    {
        Err(_) => true,
        Ok(ch) => cortexflow_proto::agent::v1::agent_config_client::AgentConfigClient::new(ch)
            .subscribe(cortexflow_proto::agent::v1::SubscribeRequest {
                node: lab.agents[0].name.clone(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    let old_served = operator_chains_to(old_ca.bundle()).await?;

    // What must not have happened.
    let mut renewed = Vec::new();
    for (i, a) in lab.agents.iter_mut().enumerate() {
        ensure!(
            a.running() && a.starts() == starts[i],
            "agent {} restarted",
            a.name
        );
        let ok = agent_metric(
            a,
            "cortexflow_agent_certificate_renewals_total{result=\"ok\"",
        )
        .await?;
        let failed = agent_metric(
            a,
            "cortexflow_agent_certificate_renewals_total{result=\"failed\"",
        )
        .await?;
        ensure!(
            failed == failed_before[i],
            "agent {}: {} renewals failed",
            a.name,
            failed - failed_before[i]
        );
        renewed.push((ok - renewed_before[i]) as u64);
    }
    lab.kubectl(&["delete", "meshpolicy", "-n", "shop", "ca-rotation-probe"])?;
    ensure!(d.failed.is_empty(), "failed deliveries: {:?}", d.failed);
    if switch_seen_before_removal + Duration::from_secs(5)
        < Duration::from_secs(lab::CERT_LIFETIME_SECS)
    {
        ensure!(
            early == 2,
            "the old root was dropped {:.0} s after the switch, before a leaf lifetime",
            switch_seen_before_removal.as_secs_f64()
        );
    }
    ensure!(
        refused,
        "a client certificate of the removed root was accepted"
    );
    ensure!(
        !old_served,
        "the operator still serves a certificate of the old root"
    );
    ensure!(
        renewed.iter().all(|n| *n >= 2),
        "every agent renews its certificate on its own during the test: {renewed:?}"
    );
    eprintln!(
        "CA rotation under config traffic: {} deliveries, 0 failed; a new intermediate served by the operator in {:.1} s and by every agent {:.1} s later; agents took the new root in {:.1} s, the issuer switched {:.1} s later, agents' certificates moved in {:.1} s, the old root left {:.0} s after its removal was asked (lifetime {} s); renewals per agent {renewed:?}, 0 failed, 0 restarts; a certificate of the old root refused",
        d.rounds,
        intermediate_switched.as_secs_f64(),
        intermediate_moved.as_secs_f64(),
        took_bundle.as_secs_f64(),
        switched.as_secs_f64(),
        agents_moved.as_secs_f64(),
        removed_after.as_secs_f64(),
        lab::CERT_LIFETIME_SECS,
    );
    let _ = removed;
    Ok(())
}

/// The chain the webhook at `addr` presents to a standard TLS client (the apiserver's view: the
/// host name `localhost` verified against `bundle` as roots, by webpki).
async fn webhook_chain(
    addr: std::net::SocketAddr,
    bundle: &cortexflow_trust::Bundle,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut roots = rustls::RootCertStore::empty();
    for r in bundle.ders() {
        roots.add(r.clone())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(cortexflow_trust::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// The injector's MutatingWebhookConfiguration, as an admin creates it before the operator
/// knows it, with no `caBundle`: the leader sets it to the trust bundle and sets it back when
/// it is changed; the apiserver calls the webhook with it (a dry-run pod creation in a
/// selected namespace is admitted, and refused while the bundle is another CA's); the serving
/// certificate is renewed at half-life and the next call uses the new one.
async fn the_webhook_is_trusted_through_the_ca_bundle_the_operator_keeps(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    use k8s_openapi::api::{
        admissionregistration::v1::MutatingWebhookConfiguration, core::v1::ConfigMap,
    };
    const NS: &str = "webhook-test";
    let mwcs: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(lab.client.clone());
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(lab.client.clone(), "cortexflow");
    let manifest = format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{cortexflow-webhook-test: "yes"}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: cortexflow-injector
webhooks:
  - name: inject.mesh.cortexflow.io
    clientConfig:
      url: https://localhost:{port}/mutate
    rules:
      - {{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}}
    namespaceSelector:
      matchLabels: {{cortexflow-webhook-test: "yes"}}
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: [v1]
    timeoutSeconds: 5
"#,
        port = lab.webhook.port()
    );
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe, namespace: {NS}}}\nspec:\n  containers: [{{name: c, image: registry.k8s.io/pause:3.10}}]\n"
    );
    let dry_run = |lab: &Lab| -> anyhow::Result<cortexflow_lab::kubectl::Output> {
        let file = lab.state_dir.join("webhook-probe.yaml");
        std::fs::write(&file, &pod)?;
        cortexflow_lab::kubectl::run(
            &lab.cluster.kubeconfig(),
            &["create", "--dry-run=server", "-f", &file.to_string_lossy()],
        )
    };
    let bundle = || async {
        let cm = cms.get("cortexflow-ca-bundle").await?;
        let pem = cm
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("cortexflow-ca-bundle has no ca.crt")?;
        anyhow::Ok(pem)
    };
    let ca_bundle = || async {
        let m = mwcs.get("cortexflow-injector").await?;
        anyhow::Ok(
            m.webhooks
                .unwrap_or_default()
                .first()
                .and_then(|w| w.client_config.ca_bundle.clone())
                .map(|b| String::from_utf8_lossy(&b.0).into_owned()),
        )
    };
    // The probe pod gets the readiness gate: answered `patched`.
    let admitted = "cortexflow_operator_webhook_requests_total{result=\"patched\"";
    let result = async {
        // The leader's reconciliation (every 10 s) makes the caBundle the trust bundle.
        let (configured, published) = (&ca_bundle, &bundle);
        let until_trusted = |what: &'static str| async move {
            let t = Instant::now();
            while configured().await?.as_deref() != Some(published().await?.as_str()) {
                ensure!(
                    t.elapsed() < Duration::from_secs(20),
                    "the operator did not {what} the webhook's caBundle within 20 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!("the operator {what} the caBundle in {:?}", t.elapsed());
            anyhow::Ok(())
        };
        lab.apply_yaml(&manifest)?;
        until_trusted("set").await?;
        let before = lab.operator.metric(admitted).await?;
        let out = dry_run(lab)?;
        ensure!(
            out.success,
            "a pod creation through the webhook failed: {}",
            out.stderr
        );
        let after = lab.operator.metric(admitted).await?;
        ensure!(
            after >= before + 1.0,
            "the webhook answered no review for the dry-run pod (admitted {before} → {after})"
        );
        // Another CA's bundle: the apiserver cannot verify the webhook; the operator sets it
        // back.
        let other = cortexflow_trust::Authority::generate(
            "cluster.local",
            std::time::SystemTime::now(),
        )?
        .bundle()
        .to_pem();
        let patch = serde_json::json!([{
            "op": "replace",
            "path": "/webhooks/0/clientConfig/caBundle",
            "value": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, other.as_bytes()),
        }]);
        mwcs.patch(
            "cortexflow-injector",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::<()>::Json(serde_json::from_value(patch)?),
        )
        .await?;
        let refused = dry_run(lab)?;
        if ca_bundle().await?.as_deref() == Some(other.as_str()) {
            // Still the other CA's after the call returned: the call was made with it.
            ensure!(
                !refused.success && refused.stderr.contains("x509"),
                "a pod creation succeeded while the webhook's caBundle was another CA's: {}{}",
                refused.stdout,
                refused.stderr
            );
            eprintln!("refused with another CA's bundle: {}", refused.stderr.trim());
        }
        until_trusted("restored").await?;
        // The serving certificate: for localhost, verified by webpki with the bundle as
        // roots, renewed at half its lifetime; the next call uses the new one.
        let trust = cortexflow_trust::Bundle::from_pem(bundle().await?.as_bytes())?;
        let first = webhook_chain(lab.webhook, &trust).await?;
        ensure!(first.len() == 2, "the webhook sends {} certificates, want leaf and intermediate", first.len());
        let t = Instant::now();
        let limit = Duration::from_secs(lab::CERT_LIFETIME_SECS * 3 / 4);
        loop {
            let now = webhook_chain(lab.webhook, &trust).await?;
            if now[0] != first[0] {
                break;
            }
            ensure!(t.elapsed() < limit, "the webhook's certificate was not renewed within {limit:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("serving certificate renewed {:?} after it was first read", t.elapsed());
        let out = dry_run(lab)?;
        ensure!(
            out.success,
            "a pod creation through the renewed certificate failed: {}",
            out.stderr
        );
        anyhow::Ok(())
    }
    .await;
    let _ = lab.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "cortexflow-injector",
        "--ignore-not-found",
    ]);
    delete_namespace(lab, NS);
    result
}

/// After the suite's traffic (the last test: the demo's matrix, Audit policies, policy changes,
/// restarts and renewals came before), every query of every dashboard panel — `node` at "All",
/// the rate interval 5 minutes — returns at least one series from the lab's Prometheus.
async fn every_dashboard_panel_returns_data_in_prometheus(lab: &mut Lab) -> anyhow::Result<()> {
    // The Proxy dashboard reads injected proxies: run one, and send it a message and DNS
    // queries until every panel's query has series (a rate needs two scrapes of a series,
    // and a histogram's series exist from its first observation on).
    cluster_dns_available(lab)?;
    let r = async {
        injected_app(lab, "dash", "dash-proxy").await?;
        let (p, _) = first_pod(lab, "dash", "dash-proxy")?;
        let line = r#"{"service":"dash-proxy.dash","direction":"Incoming","payload":"aGk="}"#;
        let t = Instant::now();
        loop {
            lab.workload("dash", &p, &["send", "127.0.0.1:5054", line])?;
            lab.workload(
                "dash",
                &p,
                &[
                    "resolve",
                    "127.0.0.1:5053",
                    "dash-proxy.dash.svc.cluster.local",
                ],
            )?;
            let empty = panels_return_data(lab).await?;
            if empty.is_empty() {
                return Ok(());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(90),
                "panel queries with no series in Prometheus after 90 s of traffic: {empty:#?}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    .await;
    delete_namespace(lab, "dash");
    r
}

/// Runs every panel query (variables at "All", rates over 5 m); the queries without series.
/// Prints, once all have series, which of them are only zeros or NaN now.
async fn panels_return_data(lab: &Lab) -> anyhow::Result<Vec<String>> {
    use cortexflow_lab::dashboards;
    let queries = dashboards::queries()?;
    let mut empty = Vec::new();
    let mut zero_or_nan = Vec::new();
    for q in &queries {
        let body = lab
            .prometheus_query(&dashboards::substitute(&q.expr, "5m"))
            .await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(v["status"] == "success", "{}: {body}", q.name);
        let series = v["data"]["result"].as_array().cloned().unwrap_or_default();
        if series.is_empty() {
            empty.push(q.name.clone());
            continue;
        }
        let moving = series.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|x| x.parse::<f64>().ok())
                .is_some_and(|x| x != 0.0 && x.is_finite())
        });
        if !moving {
            zero_or_nan.push(q.name.clone());
        }
    }
    if empty.is_empty() {
        eprintln!(
            "{} panel queries all return series; {} of them only zeros or NaN now (no such event in the window): {zero_or_nan:?}",
            queries.len(),
            zero_or_nan.len()
        );
    }
    Ok(empty)
}

/// `cfcli` as a user runs it against the lab: the admin's kubeconfig, each agent's flow
/// endpoint (the lab's agents are not pods), and with `reader` a flows reader's token.
fn cfcli_command(lab: &Lab, reader: bool) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(cortexflow_testkit::cargo::binary("cfcli", "cfcli")?);
    cmd.arg("--kubeconfig").arg(lab.cluster.kubeconfig());
    for a in &lab.agents {
        cmd.arg("--agent").arg(format!("{}={}", a.name, a.grpc));
    }
    if reader {
        let token = lab.state_dir.join("flows-reader.token");
        std::fs::write(&token, &lab.flows_token)?;
        cmd.arg("--token-file").arg(&token);
    }
    Ok(cmd)
}

/// [`cfcli_command`] run to its end: (success, stdout, stderr).
fn cfcli(lab: &Lab, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let own_token = args.iter().any(|a| a.starts_with("--token"));
    let out = cfcli_command(lab, !own_token)?.args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `cfcli flows` with each filter and `cfcli explain` for the demo's allowed, dropped and
/// audited connections: the policy and rule the kernel reported (and the rule's YAML), or the
/// default that decided; bad flags and tokens refused with a clear error.
async fn cfcli_flows_filter_and_explain_names_the_deciding_rule(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    // Built before anything is timed.
    cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
    let (fe, fe_ip) = first_pod(lab, "shop", "frontend")?;
    let (be, be_ip) = first_pod(lab, "shop", "backend")?;
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    let allowed = lab.probe("shop", &fe, "tcp", &format!("{be_ip}:8080"))?;
    ensure!(
        allowed.starts_with("success"),
        "frontend → backend: {allowed}"
    );
    let dropped = lab.probe("batch", &etl, "tcp", &format!("{be_ip}:8080"))?;
    ensure!(dropped.starts_with("timeout"), "etl → backend: {dropped}");
    let audited = lab.probe("batch", &etl, "tcp", &format!("{fe_ip}:8080"))?;
    ensure!(audited.starts_with("success"), "etl → frontend: {audited}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let json_lines = |out: &str| -> anyhow::Result<Vec<serde_json::Value>> {
        out.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    };
    let run_ok = |args: &[&str]| -> anyhow::Result<String> {
        let (ok, out, err) = cfcli(lab, args)?;
        ensure!(ok, "cfcli {args:?} failed: {err}");
        Ok(out)
    };

    // explain: the allowed connection, by the rule that allowed it.
    let t = Instant::now();
    let out = run_ok(&[
        "explain",
        &format!("shop/{fe}"),
        &format!("shop/{be}"),
        "8080/tcp",
        "-o",
        "json",
    ])?;
    let explain_allowed = t.elapsed();
    let e: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(e["verdict"] == "allowed", "{e:#}");
    let ingress = e["sides"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["direction"] == "ingress"))
        .with_context(|| format!("no ingress side: {e:#}"))?;
    ensure!(
        ingress["reason"] == "policy_allow"
            && ingress["policy"] == "shop/allow-frontend-to-backend"
            && ingress["ruleIndex"] == 0
            && ingress["ruleYaml"]
                .as_str()
                .is_some_and(|y| y.contains("identity: frontend") && y.contains("8080")),
        "the allowed connection is not explained by allow-frontend-to-backend ingress[0]: {ingress:#}"
    );
    let egress = e["sides"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["direction"] == "egress"))
        .with_context(|| format!("no egress side: {e:#}"))?;
    ensure!(
        egress["reason"] == "no_policy" && egress["policy"].is_null(),
        "{egress:#}"
    );
    // The dropped one: default deny, no rule.
    let t = Instant::now();
    let out = run_ok(&[
        "explain",
        &format!("batch/{etl}"),
        &format!("shop/{be}"),
        "8080/tcp",
        "-o",
        "json",
    ])?;
    let explain_dropped = t.elapsed();
    let e: serde_json::Value = serde_json::from_str(&out)?;
    let ingress = e["sides"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["direction"] == "ingress"))
        .with_context(|| format!("no ingress side: {e:#}"))?;
    ensure!(
        e["verdict"] == "dropped"
            && ingress["verdict"] == "dropped"
            && ingress["reason"] == "default_deny"
            && ingress["policy"].is_null()
            && ingress["destination"]["identityName"] == "shop/backend",
        "the dropped connection: {e:#}"
    );
    // The audited one, in text as people read it.
    let text = run_ok(&[
        "explain",
        &format!("batch/{etl}"),
        &format!("shop/{fe}"),
        "8080/tcp",
    ])?;
    ensure!(
        text.starts_with("verdict: audit")
            && text.contains("an Audit-mode policy would have dropped it"),
        "{text}"
    );
    let allowed_text = run_ok(&[
        "explain",
        &format!("shop/{fe}"),
        &format!("shop/{be}"),
        "8080/tcp",
    ])?;
    eprintln!("$ cfcli explain shop/{fe} shop/{be} 8080/tcp\n{allowed_text}");

    // flows, filter by filter: each line passes the filter, and something does.
    let dropped = json_lines(&run_ok(&[
        "flows",
        "--from",
        "batch/",
        "--verdict",
        "dropped",
        "--last",
        "0",
        "-o",
        "json",
    ])?)?;
    ensure!(!dropped.is_empty(), "no dropped flow from batch/");
    for f in &dropped {
        ensure!(
            f["verdict"] == "dropped"
                && (f["source"]["namespace"] == "batch"
                    || f["source"]["identityName"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("batch/"))),
            "{f}"
        );
    }
    let to_backend = json_lines(&run_ok(&[
        "flows",
        "--to",
        &format!("shop/{be}"),
        "--port",
        "8080",
        "--protocol",
        "tcp",
        "-o",
        "json",
    ])?)?;
    let backend_ip = be_ip.to_string();
    ensure!(
        to_backend.iter().any(|f| f["verdict"] == "allowed")
            && to_backend.iter().any(|f| f["verdict"] == "dropped"),
        "both connections to the backend: {to_backend:?}"
    );
    for f in &to_backend {
        ensure!(
            f["destination"]["ip"] == backend_ip.as_str()
                && f["destination"]["port"] == 8080
                && f["protocol"] == "TCP",
            "{f}"
        );
    }
    let node = lab.agents[0].name.clone();
    let on_node = json_lines(&run_ok(&[
        "flows",
        "--node",
        &node,
        "--reason",
        "policy_allow",
        "--last",
        "5",
        "-o",
        "json",
    ])?)?;
    ensure!(on_node.len() <= 5, "--last 5 printed {}", on_node.len());
    for f in &on_node {
        ensure!(
            f["node"] == node.as_str() && f["reason"] == "policy_allow",
            "{f}"
        );
    }
    let by_identity = json_lines(&run_ok(&[
        "flows",
        "--to",
        "id:shop/backend",
        "--direction",
        "ingress",
        "-o",
        "json",
    ])?)?;
    ensure!(
        !by_identity.is_empty(),
        "no ingress flow to id:shop/backend"
    );
    for f in &by_identity {
        ensure!(
            f["destination"]["identityName"] == "shop/backend" && f["direction"] == "ingress",
            "{f}"
        );
    }
    let table = run_ok(&["flows", "--from", &format!("batch/{etl}"), "--last", "3"])?;
    ensure!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.starts_with("TIME") && h.contains("RULE"))
            && table.lines().count() >= 2,
        "{table}"
    );
    // --follow prints a flow that happens after it started.
    let mut child = tokio::process::Command::from(cfcli_command(lab, true)?)
        .args([
            "flows",
            "--follow",
            "--last",
            "1",
            "--from",
            &format!("batch/{etl}"),
            "--port",
            "5353",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("cfcli stdout")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    lab.probe("batch", &etl, "udp", &format!("{be_ip}:5353"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let followed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(l) = lines.next_line().await? {
            let f: serde_json::Value = serde_json::from_str(&l)?;
            if f["time"].as_u64().is_some_and(|t| t >= started) {
                return anyhow::Ok(f);
            }
        }
        anyhow::bail!("cfcli flows --follow ended")
    })
    .await
    .context("cfcli flows --follow printed no new flow within 10 s")??;
    let _ = child.kill().await;
    ensure!(
        followed["destination"]["port"] == 5353 && followed["protocol"] == "UDP",
        "{followed}"
    );

    // Bad input and bad credentials: a clear error, exit code 1.
    let (ok, _, err) = cfcli(lab, &["flows", "--verdict", "denied"])?;
    ensure!(!ok && err.contains("allowed, dropped, audit"), "{err}");
    let (ok, _, err) = cfcli(lab, &["flows", "--token", "not-a-token"])?;
    ensure!(
        !ok && err.contains("refused Flows.Observe") && err.contains("Unauthenticated"),
        "{err}"
    );
    let pod_token = lab.kubectl(&["create", "token", "default", "-n", "shop", "--duration=10m"])?;
    let (ok, _, err) = cfcli(lab, &["flows", "--token", pod_token.trim()])?;
    ensure!(
        !ok && err.contains("refused Flows.Observe: PermissionDenied"),
        "a token without the flows permission: {err}"
    );
    let (ok, _, err) = cfcli(lab, &["explain", "shop/no-such-pod", &format!("shop/{be}")])?;
    ensure!(!ok && err.contains("no pod shop/no-such-pod"), "{err}");
    eprintln!(
        "cfcli explain: allowed by shop/allow-frontend-to-backend ingress[0] in {:.0} ms, dropped by default_deny in {:.0} ms, audit explained; flows filtered by --from/--verdict ({} lines), --to/--port/--protocol ({}), --node/--reason/--last, id:, --follow; bad verdict, bad token and a pod's token refused",
        explain_allowed.as_secs_f64() * 1000.0,
        explain_dropped.as_secs_f64() * 1000.0,
        dropped.len(),
        to_backend.len()
    );
    Ok(())
}

/// `cfcli identities` against the demo: each ServiceIdentity's number is its status's, its pods
/// are the Deployment's, the batch job has its service account's implicit identity; and the
/// numbers are the ones the kernel reports in flows.
async fn cfcli_identities_agree_with_the_statuses_and_the_kernel(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
    let t = Instant::now();
    let (ok, out, err) = cfcli(lab, &["identities", "-o", "json"])?;
    let took = t.elapsed();
    ensure!(ok, "cfcli identities: {err}");
    let ids: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let find = |ns: &str, name: &str| {
        ids.iter()
            .find(|i| i["namespace"] == ns && i["name"] == name)
            .cloned()
            .with_context(|| format!("no identity {ns}/{name} in {out}"))
    };
    let names = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect()
    };
    for app in ["frontend", "backend"] {
        let i = find("shop", app)?;
        let status_id = sid_id(lab, "shop", app)?.context("no status.id")?;
        let pods: std::collections::BTreeSet<String> =
            lab.pods("shop", app)?.into_iter().map(|(n, _)| n).collect();
        ensure!(
            i["kind"] == "sid"
                && i["id"] == status_id
                && i["spiffeId"] == format!("spiffe://cluster.local/ns/shop/sid/{app}")
                && names(&i) == pods,
            "shop/{app}: cfcli says {i}, the status id {status_id}, the pods {pods:?}"
        );
    }
    let etl_pods: std::collections::BTreeSet<String> = lab
        .pods("batch", "etl")?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let etl = find("batch", "etl")?;
    ensure!(
        etl["kind"] == "sa"
            && etl["id"].as_u64().is_some_and(|n| n >= 256)
            && etl["spiffeId"] == "spiffe://cluster.local/ns/batch/sa/etl"
            && names(&etl) == etl_pods,
        "batch/etl: {etl} (pods {etl_pods:?})"
    );
    // The kernel's numbers: a flow from a frontend pod carries the frontend's id.
    let (fe, _) = first_pod(lab, "shop", "frontend")?;
    let (_, be_ip) = first_pod(lab, "shop", "backend")?;
    lab.probe("shop", &fe, "tcp", &format!("{be_ip}:8080"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, flows, err) = cfcli(
        lab,
        &[
            "flows",
            "--from",
            &format!("shop/{fe}"),
            "--last",
            "5",
            "-o",
            "json",
        ],
    )?;
    ensure!(ok, "{err}");
    let frontend_id = find("shop", "frontend")?["id"].clone();
    let mut seen = 0;
    for l in flows.lines() {
        let f: serde_json::Value = serde_json::from_str(l)?;
        ensure!(
            f["source"]["identity"] == frontend_id,
            "the kernel reports {} for the frontend, cfcli identities {frontend_id}",
            f["source"]["identity"]
        );
        seen += 1;
    }
    ensure!(seen > 0, "no flow from the frontend pod");
    let (ok, shop, err) = cfcli(lab, &["identities", "-n", "shop", "-o", "json"])?;
    ensure!(ok, "{err}");
    let shop: Vec<serde_json::Value> = serde_json::from_str(&shop)?;
    ensure!(
        !shop.is_empty() && shop.iter().all(|i| i["namespace"] == "shop"),
        "-n shop: {shop:?}"
    );
    let (ok, table, err) = cfcli(lab, &["identities"])?;
    ensure!(
        ok && table.starts_with("ID")
            && table.contains("spiffe://cluster.local/ns/shop/sid/frontend"),
        "{err}{table}"
    );
    eprintln!(
        "cfcli identities: {} identities in {:.0} ms; shop/frontend, shop/backend = their status ids and pods, batch/etl implicit; the kernel's flows carry the same numbers",
        ids.len(),
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The flags that point cfcli at the lab's daemons (they are not pods: their admin addresses
/// are passed).
fn metrics_flags(lab: &Lab) -> Vec<String> {
    let mut v = vec![
        "--operator-metrics".to_string(),
        lab.operator.admin.to_string(),
        "--prometheus".to_string(),
        format!("http://{}", lab.prometheus_addr),
    ];
    for a in &lab.agents {
        v.push("--agent-metrics".into());
        v.push(format!("{}={}", a.name, a.admin));
    }
    v
}

/// `cfcli check -o json` on the lab: (exit 0, the checks, stderr).
fn cfcli_check(lab: &Lab) -> anyhow::Result<(bool, Vec<serde_json::Value>, String)> {
    let mut args = vec!["check".to_string(), "-o".into(), "json".into()];
    args.extend(metrics_flags(lab));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = cfcli(lab, &args)?;
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&out).with_context(|| format!("cfcli check: {out}{err}"))?;
    Ok((ok, checks, err))
}

/// `cfcli status` and `cfcli check` on the lab (its daemons are not pods: their admin
/// addresses are passed): all green, the leader and every node's agent shown; an agent stopped
/// turns its node's checks red with a hint and the exit code non-zero; started again, green.
async fn cfcli_status_and_check_see_a_stopped_agent(lab: &mut Lab) -> anyhow::Result<()> {
    cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
    let check = cfcli_check;
    let failing = |checks: &[serde_json::Value]| -> Vec<String> {
        checks
            .iter()
            .filter(|c| c["result"] == "fail")
            .map(|c| format!("{} ({}) hint: {}", c["name"], c["detail"], c["hint"]))
            .collect()
    };
    // Healthy: every check passes (some skip, saying why); at least 25 of them.
    let t = Instant::now();
    let (ok, checks) = loop {
        let (ok, checks, _) = check(lab)?;
        if ok || t.elapsed() > Duration::from_secs(30) {
            break (ok, checks);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    ensure!(
        ok && failing(&checks).is_empty(),
        "on a healthy lab: {:#?}",
        failing(&checks)
    );
    let passed = checks.iter().filter(|c| c["result"] == "ok").count();
    let skipped: Vec<_> = checks
        .iter()
        .filter(|c| c["result"] == "skip")
        .map(|c| format!("{} ({})", c["name"], c["detail"]))
        .collect();
    ensure!(passed >= 25, "only {passed} checks passed: {checks:#?}");
    // Each node's kernel, probed by its agent: this machine's kernel has every required feature.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    for a in &lab.agents {
        let name = format!(
            "{}: the kernel has the eBPF features the agent uses",
            a.name
        );
        let k = checks
            .iter()
            .find(|c| c["name"] == name.as_str())
            .with_context(|| format!("no check {name:?}"))?;
        ensure!(
            k["result"] == "ok"
                && k["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&format!("Linux {}", release.trim()))),
            "{k:#}"
        );
    }
    // status: the leader and every node's agent.
    let mut args = vec!["status".to_string(), "-o".into(), "json".into()];
    args.extend(metrics_flags(lab));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = cfcli(lab, &argv)?;
    ensure!(ok, "cfcli status: {err}");
    let st: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        st["leader"] == lease_holder(lab)?.as_str(),
        "leader: {st:#}"
    );
    for a in &lab.agents {
        let n = st["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node"] == a.name.as_str()))
            .with_context(|| format!("no node {} in {st:#}", a.name))?;
        ensure!(
            n["cortexflow_agent_operator_connected"] == 1.0
                && n["cortexflow_agent_config_version"]
                    .as_f64()
                    .is_some_and(|v| v > 0.0),
            "{n:#}"
        );
    }
    let mut table_args = vec!["status".to_string()];
    table_args.extend(metrics_flags(lab));
    let targv: Vec<&str> = table_args.iter().map(String::as_str).collect();
    let (ok, table, err) = cfcli(lab, &targv)?;
    ensure!(
        ok && table.starts_with("Operator: leader")
            && lab.agents.iter().all(|a| table.contains(&a.name)),
        "{err}{table}"
    );
    eprintln!("$ cfcli status\n{table}");
    // An agent stopped: its checks fail with a hint; the command exits non-zero.
    let name = lab.agents[0].name.clone();
    let control = lab.control(&name);
    ensure!(
        lab.agents[0].stop_agent(true),
        "the agent did not stop cleanly"
    );
    let result = async {
        let (ok, checks, _) = check(lab)?;
        let fails = failing(&checks);
        ensure!(
            !ok,
            "cfcli check succeeded with the agent of {name} stopped"
        );
        let down = checks
            .iter()
            .find(|c| c["name"] == format!("{name}: the agent answers"))
            .context("no check of the stopped agent")?;
        ensure!(
            down["result"] == "fail" && down["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{down:#}"
        );
        ensure!(
            // The node's own checks, Prometheus' view of its target, and policies that are
            // no longer Programmed on every node they select.
            fails.iter().all(|f| f.contains(&name)
                || f.contains("target is up")
                || f.contains("MeshPolicy")),
            "other checks failed too: {fails:#?}"
        );
        eprintln!(
            "with the agent of {name} stopped, {} checks fail: {fails:?}",
            fails.len()
        );
        anyhow::Ok(())
    }
    .await;
    lab.agents[0].start_agent(&control)?;
    lab.agents[0].wait_ready(Duration::from_secs(30)).await?;
    result?;
    let t = Instant::now();
    loop {
        let (ok, checks, _) = check(lab)?;
        if ok {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "still failing 30 s after the agent came back: {:#?}",
            failing(&checks)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "cfcli check: {passed} passed, {} skipped ({skipped:?}) on the healthy lab; the stopped agent turned its checks red; green again {:.1} s after it came back",
        skipped.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What `cfcli policy diff -f FILE [extra]` predicts (its JSON), with the file holding `yaml`.
fn policy_diff(lab: &Lab, yaml: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let f = lab
        .state_dir
        .join(cortexflow_testkit::net::unique("diff-"))
        .with_extension("yaml");
    std::fs::write(&f, yaml)?;
    let path = f.to_string_lossy().into_owned();
    let mut args = vec!["policy", "diff", "-f", &path, "-o", "json"];
    args.extend_from_slice(extra);
    let r = cfcli(lab, &args);
    let _ = std::fs::remove_file(&f);
    let (ok, out, err) = r?;
    ensure!(ok, "cfcli policy diff failed: {err}");
    serde_json::from_str(&out).with_context(|| format!("cfcli policy diff: {out}{err}"))
}

/// The (change, from, to, protocol, ports, after verdict, after reason) of every listed pair.
fn diff_rows(d: &serde_json::Value) -> Vec<String> {
    d["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}→{} {} {}-{} {}/{} → {}/{}",
                c["change"].as_str().unwrap_or("?"),
                c["from"]["name"].as_str().unwrap_or("?"),
                c["to"]["name"].as_str().unwrap_or("?"),
                c["protocol"].as_str().unwrap_or("?"),
                c["firstPort"],
                c["lastPort"],
                c["before"]["verdict"].as_str().unwrap_or("?"),
                c["before"]["reason"].as_str().unwrap_or("?"),
                c["after"]["verdict"].as_str().unwrap_or("?"),
                c["after"]["reason"].as_str().unwrap_or("?"),
            )
        })
        .collect()
}

/// Every probe of the demo's matrix after a change gives what the diff predicted: the diff's
/// `after` for the pairs it lists, the demo's verdict for all the others. The demo's workloads
/// carry identities named like them (`shop/frontend` and `shop/backend` ServiceIdentities,
/// `batch/etl` the service account's), and the Services forward 80/TCP to 8080 and 53/UDP to
/// 5353. With `from_demo`, the diff was taken on the demo's state, and its `before` must be what
/// the demo enforces.
async fn matrix_as_predicted(
    lab: &Lab,
    diff: &serde_json::Value,
    from_demo: bool,
) -> anyhow::Result<()> {
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    for mut p in lab::demo_matrix() {
        let port = match (&p.kind, p.protocol) {
            (TargetKind::Service, "tcp") => 8080,
            (TargetKind::Service, _) => 5353,
            (TargetKind::Pod, _) => p.port,
        };
        let (from, to) = (
            format!("{}/{}", p.from.0, p.from.1),
            format!("{}/{}", p.to.0, p.to.1),
        );
        let listed = diff["changes"].as_array().into_iter().flatten().find(|c| {
            c["from"]["name"] == from.as_str()
                && c["to"]["name"] == to.as_str()
                && c["protocol"].as_str() == Some(&p.protocol.to_uppercase())
                && c["firstPort"]
                    .as_u64()
                    .is_some_and(|a| a <= u64::from(port))
                && c["lastPort"].as_u64().is_some_and(|b| b >= u64::from(port))
        });
        if let Some(c) = listed {
            ensure!(
                !from_demo
                    || c["before"]["verdict"] == p.expect.verdict
                        && c["before"]["reason"] == p.expect.reason,
                "the diff's `before` of {from}→{to} {port} is not what the lab enforces now ({:?}): {c}",
                p.expect
            );
            let verdict = leak(c["after"]["verdict"].as_str().unwrap_or(""));
            p.expect = Expected {
                result: if verdict == "dropped" {
                    "timeout"
                } else {
                    "success"
                },
                verdict,
                reason: leak(c["after"]["reason"].as_str().unwrap_or("")),
            };
        }
        let want = (p.expect.result, p.expect.verdict, p.expect.reason);
        until(lab, &p, want).await?;
    }
    Ok(())
}

/// `cfcli policy diff` before applying a change that opens a pair, its deletion, and a change
/// that closes one: exactly the pairs that change are listed, with the rule that will decide
/// them, and after applying each change every probe of the demo's matrix gives what the diff
/// said (the listed ones changed, no other). A misspelt field and an invalid policy are refused
/// by the apiserver's dry run with its message, and nothing is stored.
async fn cfcli_policy_diff_predicts_the_matrix_after_applying(lab: &mut Lab) -> anyhow::Result<()> {
    cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
    let pairs = lab.pods("batch", "etl")?.len() * lab.pods("shop", "backend")?.len();
    ensure!(pairs > 0, "no etl or backend pods");
    let open = r#"apiVersion: mesh.cortexflow.io/v1alpha1
kind: MeshPolicy
metadata: {name: allow-etl-to-backend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  ingress:
    - from: [{serviceAccount: batch/etl}]
      ports: [{port: 8080, protocol: TCP}]
"#;
    let r = async {
        // Opening: the etl job reaches the backend on 8080/TCP; 5353/UDP stays closed.
        let t = Instant::now();
        let d = policy_diff(lab, open, &[])?;
        let took = t.elapsed();
        ensure!(
            diff_rows(&d)
                == vec!["allow batch/etl→shop/backend TCP 8080-8080 dropped/default_deny → allowed/policy_allow".to_string()],
            "opening diff: {:#?}",
            diff_rows(&d)
        );
        let c = &d["changes"][0];
        ensure!(
            c["after"]["rule"] == "shop/allow-etl-to-backend ingress[0]"
                && c["after"]["direction"] == "ingress"
                && c["podPairs"] == pairs
                && d["policies"][0]["action"] == "create"
                && d["policies"][0]["accepted"] == true,
            "opening diff: {d:#}"
        );
        eprintln!("policy diff (opening) took {took:?}");
        // The text form, as a user sees it (the README's transcript).
        let (ok, text, err) = policy_diff_raw(lab, open)?;
        ensure!(
            ok && text.contains("1 become allowed, 0 become denied")
                && text.contains("shop/allow-etl-to-backend ingress[0]"),
            "text diff: {text}{err}"
        );
        eprintln!("$ cfcli policy diff -f allow-etl-to-backend.yaml\n{text}");
        // Nothing was stored.
        ensure!(
            lab.kubectl(&["get", "meshpolicy", "-n", "shop", "allow-etl-to-backend", "--ignore-not-found", "-o", "name"])?.trim().is_empty(),
            "the dry run stored the policy"
        );
        lab.apply_yaml(open)?;
        matrix_as_predicted(lab, &d, true).await?;

        // Its deletion: exactly the reverse.
        let d = policy_diff(lab, open, &["--delete"])?;
        ensure!(
            diff_rows(&d)
                == vec!["deny batch/etl→shop/backend TCP 8080-8080 allowed/policy_allow → dropped/default_deny".to_string()],
            "deleting diff: {:#?}",
            diff_rows(&d)
        );
        lab.kubectl(&["delete", "meshpolicy", "-n", "shop", "allow-etl-to-backend"])?;
        matrix_as_predicted(lab, &d, false).await?;

        // Closing: the demo's policy without 5353/UDP.
        let close = r#"apiVersion: mesh.cortexflow.io/v1alpha1
kind: MeshPolicy
metadata: {name: allow-frontend-to-backend, namespace: shop}
spec:
  selector:
    matchLabels: {app: backend}
  ingress:
    - from: [{identity: frontend}]
      ports: [{port: 8080, protocol: TCP}]
"#;
        let d = policy_diff(lab, close, &[])?;
        ensure!(
            diff_rows(&d)
                == vec!["deny shop/frontend→shop/backend UDP 5353-5353 allowed/policy_allow → dropped/default_deny".to_string()],
            "closing diff: {:#?}",
            diff_rows(&d)
        );
        ensure!(d["policies"][0]["action"] == "update", "closing diff: {d:#}");
        lab.apply_yaml(close)?;
        matrix_as_predicted(lab, &d, true).await?;
        restore_policies(lab)?;
        matrix_as_predicted(lab, &serde_json::json!({"changes": []}), true).await?;

        // Refused statically: a misspelt field, and a peer with two kinds; nothing stored.
        for (bad, says) in [
            (open.replace("serviceAccount", "serviceAcount"), "serviceAcount"),
            (
                open.replace("{serviceAccount: batch/etl}", "{serviceAccount: batch/etl, identity: backend}"),
                "exactly one",
            ),
        ] {
            let f = lab.state_dir.join("bad-policy.yaml");
            std::fs::write(&f, &bad)?;
            let (ok, out, err) = cfcli(lab, &["policy", "diff", "-f", &f.to_string_lossy()])?;
            let _ = std::fs::remove_file(&f);
            ensure!(
                !ok && err.contains("the apiserver refuses MeshPolicy shop/allow-etl-to-backend") && err.contains(says),
                "a bad policy: ok={ok} out={out} err={err}"
            );
        }
        ensure!(
            lab.kubectl(&["get", "meshpolicy", "-n", "shop", "allow-etl-to-backend", "--ignore-not-found", "-o", "name"])?.trim().is_empty(),
            "a refused dry run stored the policy"
        );
        // Not a MeshPolicy.
        let (ok, _, err) = policy_diff_raw(lab, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")?;
        ensure!(!ok && err.contains("is not a MeshPolicy"), "a ConfigMap: {err}");
        anyhow::Ok(())
    }
    .await;
    let _ = lab.kubectl(&[
        "delete",
        "meshpolicy",
        "-n",
        "shop",
        "allow-etl-to-backend",
        "--ignore-not-found",
    ]);
    restore_policies(lab)?;
    r
}

/// `cfcli policy diff -f FILE` with the file holding `yaml`: (success, stdout, stderr).
fn policy_diff_raw(lab: &Lab, yaml: &str) -> anyhow::Result<(bool, String, String)> {
    let f = lab.state_dir.join("diff-raw.yaml");
    std::fs::write(&f, yaml)?;
    let r = cfcli(lab, &["policy", "diff", "-f", &f.to_string_lossy()]);
    let _ = std::fs::remove_file(&f);
    r
}

/// The injector on the real apiserver, through the chart's own MutatingWebhookConfiguration
/// (its namespace selector; only `clientConfig` pointed at the lab's operator): a table of pods
/// created as dry runs, each answered with exactly the change it needs — the proxy (native
/// sidecar, first init container, token volume, annotation) for the pods that ask for it by
/// identity, pod or namespace annotation; the readiness gate for every endpoint; nothing for
/// host-network pods, opted-out proxies, already injected pods and excluded namespaces; a
/// refusal naming a misspelt annotation.
/// The chart's MutatingWebhookConfiguration, called at the lab operator's address, applied and
/// trusted (once the leader has set its caBundle). Pod creations outside the excluded
/// namespaces go through the injector until [`remove_injector`].
async fn install_injector(lab: &Lab) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let mwcs: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(lab.client.clone());
    // The chart's configuration, called at the lab operator's address.
    let docs = cortexflow_lab::chart::documents(&cortexflow_lab::chart::render(
        "cortexflow",
        "cortexflow",
        &[],
    )?)?;
    let mut mwc = docs
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .context("the chart has no MutatingWebhookConfiguration")?;
    mwc["webhooks"][0]["clientConfig"] =
        serde_json::json!({"url": format!("https://localhost:{}/mutate", lab.webhook.port())});
    let file = lab.state_dir.join("injector-mwc.json");
    std::fs::write(&file, mwc.to_string())?;
    lab.kubectl(&["apply", "-f", &file.to_string_lossy()])?;
    let _ = std::fs::remove_file(&file);
    // Trusted once the leader has set the caBundle.
    let t = Instant::now();
    loop {
        let m = mwcs.get("cortexflow-injector").await?;
        if m.webhooks
            .unwrap_or_default()
            .first()
            .is_some_and(|w| w.client_config.ca_bundle.is_some())
        {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "no caBundle within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn remove_injector(lab: &Lab) {
    let _ = lab.kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "cortexflow-injector",
        "--ignore-not-found",
    ]);
}

async fn the_injector_patches_exactly_the_pods_that_ask(lab: &mut Lab) -> anyhow::Result<()> {
    let gate = "mesh.cortexflow.io/programmed";
    let setup = r#"apiVersion: v1
kind: Namespace
metadata: {name: inject-a}
---
apiVersion: v1
kind: Namespace
metadata:
  name: inject-b
  annotations: {mesh.cortexflow.io/inject: enabled}
---
apiVersion: v1
kind: Namespace
metadata:
  name: inject-c
  annotations: {mesh.cortexflow.io/inject: "yes"}
---
apiVersion: mesh.cortexflow.io/v1alpha1
kind: ServiceIdentity
metadata: {name: secure, namespace: inject-a}
spec:
  selector: {matchLabels: {app: secure}}
  mtls: Strict
"#;
    let dry_run =
        |lab: &Lab, manifest: &str| -> anyhow::Result<(bool, serde_json::Value, String)> {
            let file = lab.state_dir.join("inject-probe.yaml");
            std::fs::write(&file, manifest)?;
            let out = cortexflow_lab::kubectl::run(
                &lab.cluster.kubeconfig(),
                &[
                    "create",
                    "--dry-run=server",
                    "-o",
                    "json",
                    "-f",
                    &file.to_string_lossy(),
                ],
            )?;
            let _ = std::fs::remove_file(&file);
            let v = if out.success {
                serde_json::from_str(&out.stdout)?
            } else {
                serde_json::Value::Null
            };
            Ok((out.success, v, out.stderr))
        };
    let pod = |ns: &str, app: &str, annotation: Option<&str>, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probe-{app}\n  namespace: {ns}\n  labels: {{app: {app}}}\n{}spec:\n  containers: [{{name: app, image: cortexflow/workload}}]\n{extra}",
            annotation
                .map(|a| format!("  annotations: {{mesh.cortexflow.io/inject: {a}}}\n"))
                .unwrap_or_default()
        )
    };
    let summary = |v: &serde_json::Value| -> (Vec<String>, Vec<String>, Option<String>) {
        let names = |p: &str| -> Vec<String> {
            v.pointer(p)
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
                .map(|c| {
                    c["name"]
                        .as_str()
                        .or(c["conditionType"].as_str())
                        .unwrap_or("?")
                        .to_string()
                })
                .collect()
        };
        let mut init = names("/spec/initContainers");
        init.extend(names("/spec/readinessGates"));
        (
            init,
            names("/spec/volumes")
                .into_iter()
                .filter(|n| n.starts_with("cortexflow"))
                .collect(),
            v["metadata"]["annotations"]["mesh.cortexflow.io/proxy-injected"]
                .as_str()
                .map(str::to_string),
        )
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let result = async {
        lab.apply_yaml(setup)?;
        // The operator's engine has the ServiceIdentity once its status has a number.
        let t = Instant::now();
        while lab
            .kubectl(&["get", "sid", "-n", "inject-a", "secure", "-o", "jsonpath={.status.id}"])?
            .trim()
            .is_empty()
        {
            ensure!(t.elapsed() < Duration::from_secs(20), "ServiceIdentity inject-a/secure got no id");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for ns in ["inject-a", "inject-b", "inject-c"] {
            default_service_account(lab, ns).await?;
        }
        install_injector(lab).await?;
        let proxy = "cortexflow-proxy";
        let token = "cortexflow-proxy-token";
        let cases = vec![
            (
                "opted in by its identity (Strict)",
                pod("inject-a", "secure", None, ""),
                s(&[proxy, gate]),
                s(&[token]),
                Some("ServiceIdentity inject-a/secure has mtls Strict"),
            ),
            (
                "no identity with mTLS: the gate only",
                pod("inject-a", "plain", None, ""),
                s(&[gate]),
                vec![],
                None,
            ),
            (
                "opted in by its annotation",
                pod("inject-a", "plain", Some("enabled"), ""),
                s(&[proxy, gate]),
                s(&[token]),
                Some("the pod's annotation mesh.cortexflow.io/inject"),
            ),
            (
                "opted in by its namespace",
                pod("inject-b", "plain", None, ""),
                s(&[proxy, gate]),
                s(&[token]),
                Some("the namespace's annotation mesh.cortexflow.io/inject"),
            ),
            (
                "opted out in an opted-in namespace",
                pod("inject-b", "plain", Some("disabled"), ""),
                s(&[gate]),
                vec![],
                None,
            ),
            (
                "opted out although its identity is Strict",
                pod("inject-a", "secure", Some("disabled"), ""),
                s(&[gate]),
                vec![],
                None,
            ),
            (
                "host network: unchanged",
                pod("inject-a", "secure", None, "  hostNetwork: true\n"),
                vec![],
                vec![],
                None,
            ),
            (
                "its own init container stays, after the proxy",
                pod("inject-a", "secure", None, "  initContainers: [{name: migrate, image: cortexflow/workload}]\n"),
                s(&[proxy, "migrate", gate]),
                s(&[token]),
                Some("ServiceIdentity inject-a/secure has mtls Strict"),
            ),
            (
                "the system's namespace is not sent",
                pod("kube-system", "secure", Some("enabled"), ""),
                vec![],
                vec![],
                None,
            ),
            (
                "the control plane's namespace is not sent",
                pod("cortexflow", "secure", Some("enabled"), ""),
                vec![],
                vec![],
                None,
            ),
        ];
        let mut table = Vec::new();
        let mut injected = None;
        for (what, manifest, init, volumes, annotation) in &cases {
            let (ok, v, err) = dry_run(lab, manifest)?;
            ensure!(ok, "{what}: refused: {err}");
            let got = summary(&v);
            ensure!(
                got == (init.clone(), volumes.clone(), annotation.map(str::to_string)),
                "{what}: got {got:?}, want {:?}",
                (init, volumes, annotation)
            );
            if got.0.first().map(String::as_str) == Some(proxy) {
                let c = &v["spec"]["initContainers"][0];
                ensure!(
                    c["restartPolicy"] == "Always"
                        && c["image"] == "ghcr.io/cortexflow/cortexflow-proxy:lab"
                        && c["securityContext"]["runAsNonRoot"] == true
                        && c["securityContext"]["capabilities"]["drop"] == serde_json::json!(["ALL"]),
                    "{what}: the proxy container {c:#}"
                );
                ensure!(
                    v["spec"]["volumes"].as_array().into_iter().flatten().any(|vol| vol["name"] == token
                        && vol["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "cortexflow-ca"),
                    "{what}: no projected token with audience cortexflow-ca: {}", v["spec"]["volumes"]
                );
                injected.get_or_insert(v.clone());
            }
            table.push(format!("{what}: {:?}", got.0));
        }
        // Idempotent: the injected pod created again comes back with the same containers and
        // gates, and the webhook answers without a patch.
        let mut again = injected.context("no case injected the proxy")?;
        for f in ["uid", "resourceVersion", "creationTimestamp", "managedFields"] {
            if let Some(m) = again["metadata"].as_object_mut() {
                m.remove(f);
            }
        }
        if let Some(o) = again.as_object_mut() {
            o.remove("status");
        }
        let admitted = "cortexflow_operator_webhook_requests_total{result=\"admitted\"";
        let before = lab.operator.metric(admitted).await?;
        let (ok, v, err) = dry_run(lab, &again.to_string())?;
        ensure!(ok, "the injected pod again: {err}");
        ensure!(
            summary(&v).0 == s(&[proxy, gate]),
            "injected twice: {:?}",
            summary(&v)
        );
        ensure!(
            lab.operator.metric(admitted).await? >= before + 1.0,
            "the injected pod again was patched, not admitted unchanged"
        );
        // A misspelt opt-in (the namespace's "yes") is refused, naming it.
        let (ok, _, err) = dry_run(lab, &pod("inject-c", "plain", None, ""))?;
        ensure!(
            !ok && err.contains("mesh.cortexflow.io/inject") && err.contains("is neither"),
            "a misspelt namespace annotation: {err}"
        );
        eprintln!("injector table:\n  {}", table.join("\n  "));
        // Admission time with the webhook and without (a namespace it does not see), 30 pods each.
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(lab.client.clone(), "inject-a");
        let plain: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(lab.client.clone(), "kube-system");
        let spec: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "timed", "labels": {"app": "secure"}},
            "spec": {"containers": [{"name": "app", "image": "cortexflow/workload"}]},
        }))?;
        let pp = kube::api::PostParams { dry_run: true, field_manager: None };
        let times = |api: kube::Api<k8s_openapi::api::core::v1::Pod>| {
            let spec = spec.clone();
            let pp = pp.clone();
            async move {
                let mut v = Vec::new();
                for _ in 0..30 {
                    let t = Instant::now();
                    api.create(&pp, &spec).await?;
                    v.push(t.elapsed());
                }
                v.sort();
                anyhow::Ok(v)
            }
        };
        let with = times(pods).await?;
        let without = times(plain).await?;
        eprintln!(
            "dry-run pod admission, 30 each: with the injector p50 {:?} max {:?}; without p50 {:?} max {:?}",
            with[15], with[29], without[15], without[29]
        );
        anyhow::Ok(())
    }
    .await;
    remove_injector(lab);
    for ns in ["inject-a", "inject-b", "inject-c"] {
        delete_namespace(lab, ns);
    }
    result
}

/// The node simulator runs pods as a kubelet does: init containers in order to completion, a
/// native sidecar (an init container with `restartPolicy: Always`) started in its place and kept
/// running beside the app, in the pod's network namespace; readiness from an HTTP probe;
/// a liveness probe that fails restarts the container; a crashing container restarted with
/// back-off (CrashLoopBackOff, its last exit code kept); `restartPolicy: Never` ends in
/// Succeeded or Failed; a host-network pod serves on its node's address; a probe kind the lab
/// cannot run fails the pod with the reason.
async fn pods_run_init_containers_sidecars_restarts_and_probes(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    const NS: &str = "lifecycle";
    let manifest = r#"apiVersion: v1
kind: Namespace
metadata: {name: lifecycle}
---
apiVersion: v1
kind: Pod
metadata: {name: multi, namespace: lifecycle}
spec:
  initContainers:
    - {name: migrate, image: cortexflow/workload, args: [exit, "0", --after-ms, "700"]}
    - name: sidecar
      image: cortexflow/workload
      restartPolicy: Always
      args: [serve, --tcp, "9000", --name, sidecar]
  containers:
    - name: app
      image: cortexflow/workload
      args: [serve, --tcp, "8080", --http, "8081"]
      ports: [{name: health, containerPort: 8081}]
      readinessProbe: {httpGet: {path: /healthz, port: health}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: crash, namespace: lifecycle}
spec:
  containers: [{name: crash, image: cortexflow/workload, args: [exit, "3"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: lifecycle}
spec:
  restartPolicy: Never
  containers: [{name: job, image: cortexflow/workload, args: [exit, "0", --after-ms, "200"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: failed, namespace: lifecycle}
spec:
  restartPolicy: Never
  containers: [{name: job, image: cortexflow/workload, args: [exit, "2"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: unwell, namespace: lifecycle}
spec:
  containers:
    - name: app
      image: cortexflow/workload
      args: [serve, --http, "8081", --http-fail-after-ms, "1500"]
      livenessProbe: {httpGet: {path: /healthz, port: 8081}, periodSeconds: 1, failureThreshold: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: lifecycle}
spec:
  hostNetwork: true
  containers:
    - name: app
      image: cortexflow/workload
      args: [serve, --tcp, "18081", --name, hostnet]
      readinessProbe: {tcpSocket: {port: 18081}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: exec-probe, namespace: lifecycle}
spec:
  containers:
    - name: app
      image: cortexflow/workload
      args: [serve, --tcp, "8080"]
      readinessProbe: {exec: {command: ["true"]}}
"#;
    let get = |lab: &Lab, pod: &str| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &lab.kubectl(&["get", "pod", "-n", NS, pod, "-o", "json"])?,
        )?)
    };
    let status = |v: &serde_json::Value, list: &str, name: &str| -> serde_json::Value {
        v["status"][list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let condition = |v: &serde_json::Value, t: &str| -> (String, String) {
        v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("").to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .unwrap_or_default()
    };
    let until =
        async |lab: &Lab, pod: &str, what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
            let t = Instant::now();
            loop {
                let v = get(lab, pod)?;
                if ok(&v) {
                    return anyhow::Ok((v, t.elapsed()));
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(40),
                    "{pod}: not {what} after 40 s: {:#}",
                    v["status"]
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
    let result = async {
        lab.kubectl(&["create", "namespace", NS])?;
        default_service_account(lab, NS).await?;
        lab.apply_yaml(manifest.split_once("---\n").map(|(_, rest)| rest).unwrap_or(manifest))?;

        // Init container, then sidecar, then app; Ready once the HTTP probe passes.
        let (v, took) = until(lab, "multi", "Ready", &|v| condition(v, "Ready").0 == "True").await?;
        let migrate = status(&v, "initContainerStatuses", "migrate");
        let sidecar = status(&v, "initContainerStatuses", "sidecar");
        let app = status(&v, "containerStatuses", "app");
        ensure!(
            migrate["state"]["terminated"]["exitCode"] == 0
                && migrate["state"]["terminated"]["reason"] == "Completed"
                && sidecar["state"]["running"].is_object()
                && sidecar["ready"] == true
                && app["state"]["running"].is_object()
                && app["ready"] == true
                && condition(&v, "Initialized").0 == "True",
            "multi: {:#}",
            v["status"]
        );
        let ts = |c: &serde_json::Value, p: &str| c.pointer(p).and_then(|t| t.as_str()).unwrap_or("").to_string();
        let (done, side_start, app_start) = (
            ts(&migrate, "/state/terminated/finishedAt"),
            ts(&sidecar, "/state/running/startedAt"),
            ts(&app, "/state/running/startedAt"),
        );
        let parse = |s: &str| s.parse::<k8s_openapi::jiff::Timestamp>();
        ensure!(
            parse(&done)? <= parse(&side_start)? && parse(&side_start)? <= parse(&app_start)?,
            "order: migrate finished {done}, sidecar started {side_start}, app started {app_start}"
        );
        // The sidecar shares the pod's network: another pod reaches both on the pod's address.
        let ip = v["status"]["podIP"].as_str().context("multi has no address")?.to_string();
        let (client, _) = first_pod(lab, "batch", "etl")?;
        let side = lab.probe("batch", &client, "tcp", &format!("{ip}:9000"))?;
        let main = lab.probe("batch", &client, "tcp", &format!("{ip}:8080"))?;
        ensure!(
            side.trim() == "success sidecar" && main.trim() == "success multi",
            "through the pod's address: sidecar {side:?}, app {main:?}"
        );
        eprintln!("multi: Ready after {took:?}; migrate done {done}, sidecar {side_start}, app {app_start}");

        // A crash loop: restarted with back-off, the last exit kept.
        let (v, _) = until(lab, "crash", "restarted twice", &|v| {
            status(v, "containerStatuses", "crash")["restartCount"].as_u64().unwrap_or(0) >= 2
        })
        .await?;
        let c = status(&v, "containerStatuses", "crash");
        ensure!(
            v["status"]["phase"] == "Running"
                && (c["state"]["waiting"]["reason"] == "CrashLoopBackOff"
                    || c["state"]["running"].is_object())
                && c["lastState"]["terminated"]["exitCode"] == 3,
            "crash: {:#}",
            v["status"]
        );
        // restartPolicy Never: Succeeded, Failed.
        until(lab, "done", "Succeeded", &|v| v["status"]["phase"] == "Succeeded").await?;
        let (v, _) = until(lab, "failed", "Failed", &|v| v["status"]["phase"] == "Failed").await?;
        ensure!(
            status(&v, "containerStatuses", "job")["state"]["terminated"]["exitCode"] == 2,
            "failed: {:#}",
            v["status"]
        );
        // Liveness: the HTTP endpoint starts failing after 1.5 s; two failures restart it.
        let (v, took) = until(lab, "unwell", "restarted by its liveness probe", &|v| {
            status(v, "containerStatuses", "app")["restartCount"].as_u64().unwrap_or(0) >= 1
        })
        .await?;
        let last = status(&v, "containerStatuses", "app")["lastState"]["terminated"].clone();
        ensure!(
            last["exitCode"] == 137 && last["finishedAt"].is_string(),
            "unwell: the liveness kill is not its last state: {:#}",
            v["status"]
        );
        eprintln!("unwell: restarted by its liveness probe after {took:?}: {last}");
        // Host network: the node's address, reached there by another pod.
        let (v, _) = until(lab, "hostnet", "Ready", &|v| condition(v, "Ready").0 == "True").await?;
        let (pod_ip, host_ip) = (
            v["status"]["podIP"].as_str().unwrap_or("").to_string(),
            v["status"]["hostIP"].as_str().unwrap_or("").to_string(),
        );
        ensure!(!host_ip.is_empty() && pod_ip == host_ip, "hostnet: podIP {pod_ip}, hostIP {host_ip}");
        let got = lab.probe("batch", &client, "tcp", &format!("{host_ip}:18081"))?;
        ensure!(got.trim() == "success hostnet", "the host-network pod at {host_ip}:18081: {got:?}");
        // A probe the lab cannot run: the pod says so.
        let (v, _) = until(lab, "exec-probe", "refused", &|v| condition(v, "Ready").1.contains("only httpGet and tcpSocket")).await?;
        ensure!(condition(&v, "Ready").0 == "False", "exec-probe: {:#}", v["status"]);
        anyhow::Ok(())
    }
    .await;
    delete_namespace(lab, NS);
    result
}

/// Waits (up to 20 s) for the default ServiceAccount of a new namespace (the controller
/// manager's): pods cannot be created before it.
async fn default_service_account(lab: &Lab, ns: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while lab
        .kubectl(&[
            "get",
            "serviceaccount",
            "default",
            "-n",
            ns,
            "--ignore-not-found",
            "-o",
            "name",
        ])?
        .trim()
        .is_empty()
    {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "no default ServiceAccount in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Every lab pod gets, as on a real node, its ServiceAccount token (the TokenRequest API, bound
/// to the pod), the cluster CA and its namespace at the standard path, and the `kubernetes`
/// Service's address in its environment; from inside the pod (its network, cgroup and mount
/// namespaces) the apiserver answers at `https://10.96.0.1` — through the agents' socket load
/// balancer and the lab's gateway — verified with that CA and authenticated with that token.
async fn a_pods_token_is_projected_and_the_apiserver_answers_at_its_service(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let (pod, _) = first_pod(lab, "shop", "frontend")?;
    let state = std::fs::read_to_string(lab.state_dir.join("pods").join(format!("shop_{pod}")))?;
    // The state file: name, netns, cgroup, address, pid of the app container.
    let fields: Vec<&str> = state.lines().collect();
    let (cgroup, pid) = (
        fields
            .get(2)
            .context("no cgroup in the state file")?
            .to_string(),
        fields
            .get(4)
            .context("no pid in the state file")?
            .to_string(),
    );
    // In the container: its cgroup (for the socket load balancer), then its mount and network
    // namespaces.
    let in_pod = |script: &str| -> anyhow::Result<(bool, String, String)> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec nsenter -t \"$1\" -m -n -- sh -c \"$2\"")
            .arg(&cgroup)
            .arg(&pid)
            .arg(script)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (ok, token, err) = in_pod(&format!("cat {dir}/token"))?;
    ensure!(ok && !token.trim().is_empty(), "no token in the pod: {err}");
    let (_, ca, _) = in_pod(&format!("cat {dir}/ca.crt"))?;
    let cluster_ca = std::fs::read_to_string(lab.cluster.dir().join("ca.crt"))?;
    ensure!(ca == cluster_ca, "the pod's ca.crt is not the cluster CA");
    let (_, ns, _) = in_pod(&format!("cat {dir}/namespace"))?;
    ensure!(ns == "shop", "the pod's namespace file says {ns:?}");
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let environ = String::from_utf8_lossy(&environ);
    ensure!(
        environ
            .split('\0')
            .any(|v| v == "KUBERNETES_SERVICE_HOST=10.96.0.1")
            && environ
                .split('\0')
                .any(|v| v == "KUBERNETES_SERVICE_PORT=443"),
        "the container's environment lacks the kubernetes Service"
    );
    // The token is the pod's: its ServiceAccount, bound to this pod.
    let review: TokenReview = kube::Api::all(lab.client.clone())
        .create(
            &kube::api::PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: token.trim().to_string(),
                    audiences: None,
                },
                ..Default::default()
            },
        )
        .await?;
    let status = review.status.context("no TokenReview status")?;
    let user = status.user.clone().unwrap_or_default();
    ensure!(
        status.authenticated == Some(true)
            && user.username.as_deref() == Some("system:serviceaccount:shop:frontend")
            && user
                .extra
                .as_ref()
                .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
                .is_some_and(|v| v == &vec![pod.clone()]),
        "the token is not the pod's: {status:?}"
    );
    // The apiserver from inside the pod, at the Service address, with the pod's credentials.
    let t = Instant::now();
    let (ok, body, err) = in_pod(&format!(
        "curl -sS --max-time 5 --cacert {dir}/ca.crt -H \"Authorization: Bearer $(cat {dir}/token)\" https://10.96.0.1/api"
    ))?;
    ensure!(
        ok && body.contains("\"kind\": \"APIVersions\""),
        "GET https://10.96.0.1/api from the pod: {body}{err}"
    );
    eprintln!(
        "pod {pod}: token of system:serviceaccount:shop:frontend bound to it; GET https://10.96.0.1/api answered in {:?}",
        t.elapsed()
    );
    Ok(())
}

/// Cluster DNS as on a real cluster: the real CoreDNS (its `kubernetes` plugin on the lab's
/// apiserver, reached from its pod through the `kubernetes` Service) behind the kube-dns
/// Service, and every pod's resolv.conf: a Service's full name, its short name through the
/// search path, `name.namespace` from another namespace, each resolving to its ClusterIP; an
/// unknown name does not resolve.
async fn cluster_dns_resolves_services_inside_pods(lab: &mut Lab) -> anyhow::Result<()> {
    cluster_dns_available(lab)?;
    let backend = lab.cluster_ip("shop", "backend")?.to_string();
    let (fe, _) = first_pod(lab, "shop", "frontend")?;
    let (etl, _) = first_pod(lab, "batch", "etl")?;
    let resolve = |ns: &str, pod: &str, name: &str| -> anyhow::Result<(bool, String)> {
        let (netns, cgroup) = cortexflow_lab::sim::locate(&lab.state_dir, ns, pod)?;
        let out = cortexflow_lab::sim::exec_command(
            &netns,
            &cgroup,
            &["getent".into(), "ahostsv4".into(), name.into()],
        )
        .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string(),
        ))
    };
    for (ns, pod, name) in [
        ("shop", fe.as_str(), "backend.shop.svc.cluster.local"),
        ("shop", fe.as_str(), "backend"),
        ("batch", etl.as_str(), "backend.shop"),
    ] {
        let t = Instant::now();
        let got = loop {
            let (ok, ip) = resolve(ns, pod, name)?;
            if ok || t.elapsed() > Duration::from_secs(20) {
                break (ok, ip);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(
            got == (true, backend.clone()),
            "{name} from {ns}/{pod}: {got:?}, want {backend}"
        );
        eprintln!("{name} from {ns}/{pod} → {backend} ({:?})", t.elapsed());
    }
    let (ok, ip) = resolve("shop", &fe, "nosuch.shop.svc.cluster.local")?;
    ensure!(!ok, "an unknown name resolved to {ip}");
    Ok(())
}

/// Deletes namespace `ns` (and what is in it) without waiting: a test's cleanup.
fn delete_namespace(lab: &Lab, ns: &str) {
    let _ = lab.kubectl(&[
        "delete",
        "namespace",
        ns,
        "--ignore-not-found",
        "--wait=false",
    ]);
}

/// Waits until the cluster DNS (CoreDNS, applied by the lab at start) is Available.
fn cluster_dns_available(lab: &Lab) -> anyhow::Result<()> {
    lab.kubectl(&[
        "wait",
        "--for=condition=Available",
        "deployment/coredns",
        "-n",
        "kube-system",
        "--timeout=90s",
    ])
    .map(drop)
}

/// A Deployment `name` of one workload pod in `ns` (injected where the namespace asks) and its
/// Service, which lists the message port 5054.
fn proxy_app(ns: &str, name: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
        - name: app
          image: cortexflow/workload
          args: [serve, --tcp, "8080"]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports:
    - {{name: app, port: 8080, protocol: TCP}}
    - {{name: cf-messages, port: 5054, protocol: TCP}}
"#
    )
}

/// A namespace `ns` that opts in to the proxy, with one injected [`proxy_app`] `name`, Ready;
/// the webhook is installed for its creation only.
async fn injected_app(lab: &Lab, ns: &str, name: &str) -> anyhow::Result<()> {
    lab.apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  annotations: {{mesh.cortexflow.io/inject: enabled}}\n"
    ))?;
    default_service_account(lab, ns).await?;
    install_injector(lab).await?;
    let r = async {
        lab.apply_yaml(&proxy_app(ns, name))?;
        ready_replicas(lab, ns, name, 1).await
    }
    .await;
    remove_injector(lab);
    r
}

/// A proxy's metric (the sum of the series starting with `prefix`) from its admin port, read
/// inside its pod.
fn proxy_metric(lab: &Lab, ns: &str, pod: &str, prefix: &str) -> anyhow::Result<f64> {
    let text = lab.workload(ns, pod, &["get", "127.0.0.1:15090", "/metrics"])?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The injected proxy (issue 14's first part) on real pods: the chart's webhook injects it, the
/// node simulator runs it as a native sidecar from the image map, it obtains its workload
/// certificate from the operator's CA with the pod's own token through the operator's Service,
/// and the pod is Ready only then. Messages (port 5054): from the app to its own proxy,
/// delivered over mTLS to the named Service's proxy (both proxies' counters, and the receiver's
/// log read with `kubectl logs` names the sender's SPIFFE id); straight to the destination's port; every bad line
/// answered `Delivery failed` on a connection that keeps serving. DNS (port 5053): answers
/// are CoreDNS's (a Service's ClusterIP, NXDOMAIN), counted by result.
async fn the_proxy_delivers_messages_over_mtls_and_relays_dns(lab: &mut Lab) -> anyhow::Result<()> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let manifest = |name: &str| proxy_app("msg", name);
    cluster_dns_available(lab)?;
    let result = async {
        lab.apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: msg\n  annotations: {mesh.cortexflow.io/inject: enabled}\n",
        )?;
        default_service_account(lab, "msg").await?;
        // Never unnoticed: a pod of the opted-in namespace created while no injector answers
        // (here: before it is installed) runs without the proxy — counted, named in the
        // operator's log, and `cfcli check` fails on it until it is gone.
        cortexflow_testkit::cargo::binary("cfcli", "cfcli")?;
        lab.apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: early, namespace: msg}\nspec:\n  containers: [{name: app, image: cortexflow/workload, args: [serve, --tcp, \"8080\"]}]\n",
        )?;
        let without = "cortexflow_operator_pods_without_proxy";
        let t = Instant::now();
        while lab.operator.metric(without).await? != 1.0 {
            ensure!(t.elapsed() < Duration::from_secs(20), "{without} did not count msg/early");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let log = lab.operator.daemon.log();
        ensure!(
            log.lines().any(|l| l.contains("runs without it") && l.contains("msg/early")),
            "the operator's log does not name msg/early"
        );
        let name = "every pod that asks for the mTLS proxy runs it";
        let (ok, checks, _) = cfcli_check(lab)?;
        let c = checks
            .iter()
            .find(|c| c["name"] == name)
            .with_context(|| format!("no check {name:?}"))?;
        ensure!(
            !ok && c["result"] == "fail" && c["detail"] == "1 without",
            "cfcli check with msg/early: {c:#}"
        );
        lab.kubectl(&["delete", "pod", "-n", "msg", "early", "--wait=false"])?;
        let t = Instant::now();
        while lab.operator.metric(without).await? != 0.0 {
            ensure!(t.elapsed() < Duration::from_secs(30), "{without} still counts msg/early");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        install_injector(lab).await?;
        let t = Instant::now();
        lab.apply_yaml(&format!("{}---\n{}", manifest("test-proxy1"), manifest("test-proxy2")))?;
        for d in ["test-proxy1", "test-proxy2"] {
            ready_replicas(lab, "msg", d, 1).await?;
        }
        let ready_after = t.elapsed();
        let (p1, _) = first_pod(lab, "msg", "test-proxy1")?;
        let (p2, ip2) = first_pod(lab, "msg", "test-proxy2")?;
        // Injected, running beside the app, holding its certificate.
        let init = lab.kubectl(&[
            "get", "pod", "-n", "msg", &p1, "-o",
            "jsonpath={.spec.initContainers[0].name} {.status.initContainerStatuses[0].ready}",
        ])?;
        ensure!(init.trim() == "cortexflow-proxy true", "test-proxy1's proxy: {init}");
        for p in [&p1, &p2] {
            let ok = proxy_metric(lab, "msg", p, "cortexflow_proxy_certificate_renewals_total{result=\"ok\"")?;
            ensure!(ok >= 1.0, "{p}: no certificate obtained ({ok})");
        }
        eprintln!("two injected pods Ready in {ready_after:?} (the proxies' certificates included)");
        let forwarded = "cortexflow_proxy_messages_total{result=\"ok\",way=\"forwarded\"";
        let delivered = "cortexflow_proxy_messages_total{result=\"ok\",way=\"delivered\"";
        let (f1, d2) = (
            proxy_metric(lab, "msg", &p1, forwarded)?,
            proxy_metric(lab, "msg", &p2, delivered)?,
        );
        // The app → its own proxy → mTLS → test-proxy2's proxy, which answers.
        let msg = |service: &str, payload: &str| {
            format!(r#"{{"service":"{service}","direction":"Incoming","payload":"{}"}}"#, b64(payload))
        };
        let want = |service: &str| {
            serde_json::json!({
                "payload": b64(r#"{"status":"received"}"#),
                "service": service,
                "direction": "Outcoming",
            })
        };
        let t = Instant::now();
        let out = lab.workload("msg", &p1, &["send", "127.0.0.1:5054", &msg("test-proxy2.msg", "hello")])?;
        let took = t.elapsed();
        let got: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("the answer {out:?}"))?;
        ensure!(got == want("test-proxy2.msg"), "the answer {got}");
        ensure!(
            proxy_metric(lab, "msg", &p1, forwarded)? == f1 + 1.0
                && proxy_metric(lab, "msg", &p2, delivered)? == d2 + 1.0,
            "the message did not go from test-proxy1's proxy to test-proxy2's"
        );
        let sender = "spiffe://cluster.local/ns/msg/sa/default";
        let log = lab.kubectl(&["logs", "-n", "msg", &p2, "-c", "cortexflow-proxy"])?;
        ensure!(
            log.lines().any(|l| l.contains("message received") && l.contains(sender)),
            "test-proxy2's proxy did not log the message from {sender}:\n{log}"
        );
        eprintln!("message test-proxy1 → test-proxy2 over mTLS answered in {took:?}");
        // Straight to the destination's port (from another pod: delivered there).
        let out = lab.workload("msg", &p1, &["send", &format!("{ip2}:5054"), &msg("test-proxy2.msg", "direct")])?;
        let got: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("the direct answer {out:?}"))?;
        ensure!(got == want("test-proxy2.msg"), "the direct answer {got}");
        // Bad lines: each answered "Delivery failed", and the connection serves the next.
        let bad = [
            "not json".to_string(),
            format!(r#"{{"service":"test-proxy2.msg","payload":"{}"}}"#, b64("x")),
            r#"{"service":"test-proxy2.msg","direction":"Incoming","payload":"%%%"}"#.to_string(),
            msg("nosuch.msg", "x"),
            msg("test-proxy2.msg", "after the errors"),
        ];
        let args: Vec<&str> = ["send", "127.0.0.1:5054"]
            .into_iter()
            .chain(bad.iter().map(String::as_str))
            .collect();
        let out = lab.workload("msg", &p1, &args)?;
        let lines: Vec<&str> = out.lines().collect();
        ensure!(
            lines.len() == 5 && lines[..4].iter().all(|l| *l == "Delivery failed"),
            "answers to four bad lines and a good one: {out}"
        );
        let last: serde_json::Value = serde_json::from_str(lines[4])?;
        ensure!(last == want("test-proxy2.msg"), "the good line after the bad: {last}");
        // DNS through the proxy: CoreDNS's answers, counted.
        let ip = lab.cluster_ip("msg", "test-proxy2")?.to_string();
        let noerror = "cortexflow_proxy_dns_requests_total{result=\"noerror\"";
        let nxdomain = "cortexflow_proxy_dns_requests_total{result=\"nxdomain\"";
        let (n0, x0) = (
            proxy_metric(lab, "msg", &p1, noerror)?,
            proxy_metric(lab, "msg", &p1, nxdomain)?,
        );
        let out = lab.workload("msg", &p1, &["resolve", "127.0.0.1:5053", "test-proxy2.msg.svc.cluster.local"])?;
        ensure!(out.trim() == format!("NOERROR {ip}"), "test-proxy2 through the proxy's DNS: {out}");
        let out = lab.workload("msg", &p1, &["resolve", "127.0.0.1:5053", "nosuch.msg.svc.cluster.local"])?;
        ensure!(out.trim() == "NXDOMAIN", "an unknown name through the proxy's DNS: {out}");
        // Over TCP too (what a resolver does after a truncated answer).
        let out = lab.workload("msg", &p1, &["resolve", "127.0.0.1:5053", "test-proxy2.msg.svc.cluster.local", "--tcp"])?;
        ensure!(out.trim() == format!("NOERROR {ip}"), "test-proxy2 through the proxy's DNS over TCP: {out}");
        ensure!(
            proxy_metric(lab, "msg", &p1, noerror)? == n0 + 2.0
                && proxy_metric(lab, "msg", &p1, nxdomain)? == x0 + 1.0,
            "the DNS answers were not counted by result"
        );
        // Every documented proxy metric is exported, and /metrics passes promtool.
        let text = lab.workload("msg", &p1, &["get", "127.0.0.1:15090", "/metrics"])?;
        let doc = std::fs::read_to_string(workspace_root().join("docs/metrics.md"))?;
        let documented: Vec<(String, bool)> = doc
            .lines()
            .filter(|l| l.starts_with("| `cortexflow_proxy_"))
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                Some((cols.get(1)?.trim_matches('`').to_string(), *cols.get(2)? == "histogram"))
            })
            .collect();
        ensure!(documented.len() >= 6, "docs/metrics.md lists {documented:?}");
        let missing: Vec<&String> = documented
            .iter()
            .filter(|(n, hist)| {
                let series = if *hist { format!("{n}_count") } else { n.clone() };
                !text.lines().any(|l| l.starts_with(&series))
            })
            .map(|(n, _)| n)
            .collect();
        ensure!(missing.is_empty(), "documented but not on the proxy's /metrics: {missing:?}");
        // (`Lab::workload` trims what the program printed; the exposition ends in a newline.)
        promtool_check_metrics("proxy", &format!("{}\n", text.trim_end()))?;
        anyhow::Ok(())
    }
    .await;
    remove_injector(lab);
    delete_namespace(lab, "msg");
    result
}

/// `kubectl logs` through the real apiserver to the node simulator's kubelet API: a pod's app
/// container (the default), an init container (`-c`), `--tail`, `-f` seeing lines appended
/// while it runs, and clear refusals for what the simulator does not record (`--previous`,
/// `--timestamps`). The kubelet API takes the apiserver's kubelet client certificate only:
/// the admin's certificate and no certificate fail the handshake.
async fn kubectl_logs_reads_containers_through_the_kubelet_api(
    lab: &mut Lab,
) -> anyhow::Result<()> {
    let pod = r#"apiVersion: v1
kind: Pod
metadata: {name: logs, namespace: logs-test}
spec:
  initContainers:
    - {name: setup, image: cortexflow/workload, args: [exit, "0"]}
  containers:
    - {name: crash, image: cortexflow/workload, args: [exit, "1", --after-ms, "100"]}
    - {name: app, image: cortexflow/workload, args: [serve, --tcp, "8080", --name, logs-app]}
"#;
    let logs = |args: &[&str]| -> anyhow::Result<cortexflow_lab::kubectl::Output> {
        let mut all = vec!["logs", "-n", "logs-test", "logs"];
        all.extend(args);
        cortexflow_lab::kubectl::run(&lab.cluster.kubeconfig(), &all)
    };
    let result = async {
        lab.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: logs-test}\n")?;
        default_service_account(lab, "logs-test").await?;
        lab.apply_yaml(pod)?;
        // The crashing container restarts with back-off (1 s, 2 s, …): a few lines.
        let t = Instant::now();
        let crash = loop {
            let out = logs(&["-c", "crash"])?;
            if out.success && out.stdout.lines().filter(|l| *l == "exit 1").count() >= 2 {
                break out.stdout;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "kubectl logs -c crash: {} {}",
                out.stdout,
                out.stderr
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(
            crash.lines().all(|l| l == "exit 1"),
            "the crash container's log: {crash:?}"
        );
        let setup = logs(&["-c", "setup"])?;
        ensure!(
            setup.success && setup.stdout == "exit 0\n",
            "the init container's log: {setup:?}"
        );
        let app = logs(&["-c", "app"])?;
        ensure!(
            app.success && app.stdout.contains("serving as logs-app"),
            "the app container's log: {app:?}"
        );
        // The default container is the first (kubectl picks it, as on a real cluster).
        let first = logs(&[])?;
        ensure!(
            first.success && first.stdout.starts_with("exit 1"),
            "the default container: {first:?}"
        );
        let tail = logs(&["-c", "crash", "--tail=1"])?;
        ensure!(
            tail.success && tail.stdout == "exit 1\n",
            "--tail=1: {tail:?}"
        );
        // -f: a line appended while following shows up.
        let mut follow = std::process::Command::new(cortexflow_testkit::tools::kubectl_bin())
            .args([
                "logs",
                "-f",
                "-n",
                "logs-test",
                "logs",
                "-c",
                "crash",
                "--tail=0",
            ])
            .env("KUBECONFIG", lab.cluster.kubeconfig())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = follow.stdout.take().context("kubectl logs -f stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let seen = rx.recv_timeout(Duration::from_secs(40));
        let _ = follow.kill();
        let _ = follow.wait();
        ensure!(
            seen.as_deref() == Ok("exit 1"),
            "kubectl logs -f saw no new line within 40 s: {seen:?}"
        );
        for (flag, why) in [
            ("--previous", "no previous"),
            ("--timestamps", "no timestamps"),
        ] {
            let out = logs(&["-c", "crash", flag])?;
            ensure!(
                !out.success && out.stderr.contains(why),
                "kubectl logs {flag}: {out:?}"
            );
        }
        // Only the apiserver is served.
        let node = lab.kubectl(&[
            "get",
            "pod",
            "-n",
            "logs-test",
            "logs",
            "-o",
            "jsonpath={.spec.nodeName}",
        ])?;
        let port = lab.kubectl(&[
            "get",
            "node",
            node.trim(),
            "-o",
            "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}",
        ])?;
        let port: u16 = port
            .trim()
            .parse()
            .with_context(|| format!("kubelet port {port:?}"))?;
        let ca = std::fs::read(lab.cluster.dir().join("ca.crt"))?;
        let admin = lab
            .cluster
            .client_pair("cortexflow-admin", &["system:masters"])?;
        for (who, pair) in [
            ("no certificate", None),
            ("the admin's certificate", Some(&admin)),
        ] {
            let got = kubelet_get(port, &ca, pair, "/healthz").await;
            ensure!(got.is_err(), "the kubelet API answered {who}: {got:?}");
        }
        let apiserver = lab
            .cluster
            .client_pair(cortexflow_lab::kubelet::APISERVER_CLIENT, &[])?;
        let ok = kubelet_get(port, &ca, Some(&apiserver), "/healthz").await?;
        ensure!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok"),
            "the apiserver's certificate: {ok}"
        );
        anyhow::Ok(())
    }
    .await;
    delete_namespace(lab, "logs-test");
    result
}

/// One HTTP/1.1 GET to the kubelet API on loopback `port`, verifying it with `ca` and
/// presenting `client` (cert and key PEM) if given; the whole answer.
async fn kubelet_get(
    port: u16,
    ca: &[u8],
    client: Option<&cortexflow_lab::pki::CertPair>,
    path: &str,
) -> anyhow::Result<String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some(p) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(p.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

/// hostPath volumes are the node's own: a directory made on one node (`DirectoryOrCreate`) is
/// seen by another pod of that node and is absent on the other node (`Directory` there fails
/// the pod, named); a hostPath under `/sys` (not simulated yet) fails the pod, named.
async fn host_path_volumes_are_the_nodes_own(lab: &mut Lab) -> anyhow::Result<()> {
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    let pod = |name: &str, node: &str, path: &str, kind: &str, args: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: hostpath-test}}
spec:
  nodeName: {node}
  volumes:
    - {{name: data, hostPath: {{path: {path}, type: {kind}}}}}
  initContainers:
    - name: init
      image: cortexflow/workload
      args: {args}
      volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
    - name: app
      image: cortexflow/workload
      args: [serve, --tcp, "8080"]
      volumeMounts: [{{name: data, mountPath: /data}}]
"#
        )
    };
    let field = |name: &str, path: &str| -> anyhow::Result<String> {
        lab.kubectl(&[
            "get",
            "pod",
            "-n",
            "hostpath-test",
            name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    let wait_ready = |name: &str| -> anyhow::Result<()> {
        if let Err(e) = lab.kubectl(&[
            "wait",
            "-n",
            "hostpath-test",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=60s",
        ]) {
            let status = field(name, "{.status}")?;
            anyhow::bail!("{e:#}\n{name}'s status: {status}");
        }
        Ok(())
    };
    let refused = async |name: &str, why: &str| -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let msg = field(name, "{.status.conditions[?(@.type==\"Ready\")].message}")?;
            if msg.contains(why) {
                return Ok(());
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{name}: {msg:?}, want {why:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let data = "/var/lib/lab-hostpath";
    let result = async {
        lab.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: hostpath-test}\n")?;
        default_service_account(lab, "hostpath-test").await?;
        lab.apply_yaml(&pod(
            "writer",
            &n1,
            data,
            "DirectoryOrCreate",
            "[write, /data/hello, from-writer]",
        ))?;
        wait_ready("writer")?;
        let reader = pod("reader", &n1, data, "Directory", "[cat, /data/hello]");
        let other = pod("other", &n2, data, "Directory", "[cat, /data/hello]");
        let kernel = pod("kernel", &n1, "/sys/fs/bpf", "Directory", "[ls, /data]");
        lab.apply_yaml(&format!("{reader}---\n{other}---\n{kernel}"))?;
        wait_ready("reader")?;
        // The node's own directory, on the machine: there on node 1, not on node 2.
        let on = |node: &str| {
            lab.state_dir
                .join("node-roots")
                .join(node)
                .join("var/lib/lab-hostpath/hello")
        };
        ensure!(
            std::fs::read_to_string(on(&n1))? == "from-writer\n",
            "the file on {n1}"
        );
        ensure!(!on(&n2).exists(), "{n2} has {n1}'s file");
        let read = lab.kubectl(&["logs", "-n", "hostpath-test", "reader", "-c", "init"])?;
        ensure!(
            read.trim() == "from-writer",
            "another pod of {n1} read {read:?}"
        );
        // Node 2 has no such directory; /sys is not given to pods: each pod fails to start,
        // saying why.
        refused(
            "other",
            "hostPath \"/var/lib/lab-hostpath\" (type Directory): not a Directory on the node",
        )
        .await?;
        refused(
            "kernel",
            "hostPath \"/sys/fs/bpf\": the lab's nodes do not give pods the kernel's filesystems",
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    delete_namespace(lab, "hostpath-test");
    result
}
