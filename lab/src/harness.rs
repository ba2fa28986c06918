//! The end-to-end test harness: one real control plane per test binary, one namespace per test.
//!
//! Each e2e test binary has `harness = false` and calls [`run_suite`]. The suite starts a fresh
//! [`Cluster`] (owned: it dies with the binary, even on SIGKILL), installs the CortexFlow CRDs
//! from the chart exactly as a user would (`kubectl apply`), runs the tests (in parallel, each in
//! its own namespace, panics caught), and tears everything down before exiting. A failing test's
//! error carries a dump of its namespace.
use std::{future::Future, path::PathBuf, pin::Pin, process::ExitCode, sync::Arc, time::Duration};

use kube::Client;
use libtest_mimic::{Arguments, Failed, Trial};

use cortexflow_testkit::workspace_root;

use crate::{
    cluster::{self, Cluster, Lifetime},
    kubectl,
};

/// Prefix of the state directories of harness clusters under the temp dir.
const DIR_PREFIX: &str = "cortexflow-e2e-";

/// What a test gets.
#[derive(Clone)]
pub struct Ctx {
    /// Admin client.
    pub client: Client,
    /// Admin kubeconfig, for `kubectl`.
    pub kubeconfig: PathBuf,
    /// A namespace created for this test (deleted after it).
    pub ns: String,
    /// Root of the workspace (for `examples/`, `charts/`).
    pub workspace: PathBuf,
    /// The control plane's state directory (its `logs/` take the daemons' logs too).
    pub dir: PathBuf,
}

impl Ctx {
    /// `kubectl <args>`, failing unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl::ok(&self.kubeconfig, args)
    }
}

type TestFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One end-to-end test.
pub struct Test {
    name: &'static str,
    f: Box<dyn Fn(Ctx) -> TestFuture + Send + Sync>,
}

/// Declares a test: `test("name", |ctx| async move { … })`.
pub fn test<F, Fut>(name: &'static str, f: F) -> Test
where
    F: Fn(Ctx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    Test {
        name,
        f: Box::new(move |ctx| Box::pin(f(ctx))),
    }
}

/// Runs a suite of tests against a fresh control plane and returns the process exit code.
pub fn run_suite(tests: Vec<Test>) -> ExitCode {
    run_suite_with(tests, false)
}

/// As [`run_suite`]; `serial` runs the tests one at a time (for suites whose tests run
/// cluster-wide daemons, such as operators, that would see each other's objects).
pub fn run_suite_with(tests: Vec<Test>, serial: bool) -> ExitCode {
    let mut args = Arguments::from_args();
    if serial {
        args.test_threads = Some(1);
    }
    let names_only = args.list;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            eprintln!("cannot build a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let selected = tests.iter().any(|t| selected(&args, t.name));
    let setup: Result<(Option<Cluster>, Option<Ctx>), String> = if names_only || !selected {
        Ok((None, None))
    } else {
        runtime
            .block_on(start())
            .map(|(c, ctx)| (Some(c), Some(ctx)))
            .map_err(|e| format!("{e:#}"))
    };
    let (cluster, base) = match &setup {
        Ok((c, ctx)) => (c.as_ref(), ctx.clone()),
        Err(_) => (None, None),
    };
    let setup_error = setup.as_ref().err().cloned();
    let trials = tests
        .into_iter()
        .map(|t| {
            let rt = runtime.clone();
            let base = base.clone();
            let setup_error = setup_error.clone();
            let name = t.name;
            Trial::test(name, move || {
                if let Some(e) = &setup_error {
                    return Err(Failed::from(format!("control plane did not start: {e}")));
                }
                let Some(base) = base.clone() else {
                    return Err(Failed::from("no control plane"));
                };
                rt.block_on(run_one(name, &t.f, base))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if conclusion.has_failed()
        && let Some(c) = cluster
    {
        eprintln!(
            "control-plane logs at the end of the run:\n{}",
            c.log_tails(15)
        );
    }
    drop(setup);
    conclusion.exit_code()
}

fn selected(args: &Arguments, name: &str) -> bool {
    let filtered = match &args.filter {
        Some(f) if args.exact => name == f,
        Some(f) => name.contains(f.as_str()),
        None => true,
    };
    filtered && !args.skip.iter().any(|s| name.contains(s.as_str()))
}

async fn start() -> anyhow::Result<(Cluster, Ctx)> {
    let tmp = std::env::temp_dir();
    cluster::sweep_stale(&tmp, DIR_PREFIX);
    let dir = tmp.join(format!("{DIR_PREFIX}{}", std::process::id()));
    let c = Cluster::start(&dir, Lifetime::Owned).await?;
    let workspace = workspace_root();
    kubectl::install_crds(&c.kubeconfig())?;
    let ctx = Ctx {
        client: c.client().await?,
        kubeconfig: c.kubeconfig(),
        ns: String::new(),
        workspace,
        dir: c.dir().to_path_buf(),
    };
    Ok((c, ctx))
}

async fn run_one(
    name: &str,
    f: &(dyn Fn(Ctx) -> TestFuture + Send + Sync),
    base: Ctx,
) -> anyhow::Result<()> {
    let ns = format!("e2e-{}", name.replace('_', "-"));
    let ns: String = ns
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string();
    base.kubectl(&["create", "namespace", &ns])?;
    wait_for_default_service_account(&base, &ns).await?;
    let ctx = Ctx {
        ns: ns.clone(),
        ..base.clone()
    };
    let result = f(ctx).await;
    let result = result.map_err(|e| {
        let dump = kubectl::run(
            &base.kubeconfig,
            &["get", "all,mp,sid,events", "-n", &ns, "-o", "wide"],
        )
        .map(|o| format!("{}{}", o.stdout, o.stderr))
        .unwrap_or_default();
        e.context(format!("namespace {ns} at failure:\n{dump}"))
    });
    let _ = kubectl::run(
        &base.kubeconfig,
        &["delete", "namespace", &ns, "--wait=false"],
    );
    result
}

/// Pods need the namespace's `default` ServiceAccount, which the controller manager creates
/// shortly after the namespace.
async fn wait_for_default_service_account(ctx: &Ctx, ns: &str) -> anyhow::Result<()> {
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(ctx.client.clone(), ns);
    for _ in 0..200 {
        if api.get_opt("default").await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("ServiceAccount {ns}/default did not appear")
}
