//! Supervision: every long-running task of a daemon is registered with a [`Supervisor`]. If one
//! ends — returns, fails or panics — before shutdown, the process logs which and why, drains for
//! a short moment and exits non-zero, so Kubernetes restarts it: never a live process (that
//! answers `/readyz`) with a dead engine, watch or stream behind it.
//!
//! * [`Supervisor::spawn`]: a task that runs until shutdown; ending at all is a failure.
//! * [`Supervisor::spawn_startup`]: a task that does its job and ends; only an error or a panic
//!   is a failure.
//! * [`Supervisor::run`]: waits for SIGTERM/Ctrl-C (then drains for up to the grace period; a
//!   second signal exits at once) or for the first task to fail.
//!
//! Every task runs in a `task` span carrying its name, so its logs say which task wrote them.
//!
//! **Test hook.** With `CORTEXFLOW_FAIL_TASK=<name>` in its environment, the process panics the
//! named task when it receives SIGUSR2 (from inside the task, as a bug would). The tests of
//! every daemon use it to prove that any dead task ends the process; without the variable no
//! handler is installed and nothing changes.
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use tokio::task::{Id, JoinError, JoinSet};
use tracing::Instrument as _;

use crate::drain::{Drained, Trigger};

/// The environment variable of the test hook.
pub const FAIL_TASK_ENV: &str = "CORTEXFLOW_FAIL_TASK";

/// How long a daemon whose task died drains before it exits: enough to release a lease or end
/// streams cleanly, short enough that the restart comes at once.
pub const FAILED_GRACE: Duration = Duration::from_millis(500);

/// How the daemon ends.
#[derive(Debug)]
pub enum Exit {
    /// Shut down on a signal; every task finished within the grace period.
    Clean,
    /// Shut down on a signal, but the grace period ran out (the rest was aborted).
    Forced,
    /// A second signal arrived during the drain: exit at once.
    Interrupted,
    /// A task ended or panicked before shutdown.
    Failed(String),
}

impl Exit {
    /// The process exit code: 0 for a clean or forced shutdown, 130 after a second signal, 1
    /// for a failure.
    pub fn code(&self) -> i32 {
        match self {
            Exit::Clean | Exit::Forced => 0,
            Exit::Interrupted => 130,
            Exit::Failed(_) => 1,
        }
    }

    /// Ends the process with [`Exit::code`] at once, whatever is still running (it was drained,
    /// or it is dead), saying why on stderr when it failed.
    pub fn exit(self, daemon: &str) -> ! {
        if let Exit::Failed(reason) = &self {
            eprintln!("{daemon}: {reason}");
        }
        std::process::exit(self.code())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Runs until shutdown.
    Service,
    /// Does its job and ends.
    Startup,
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The registered tasks of one daemon.
pub struct Supervisor {
    set: JoinSet<anyhow::Result<()>>,
    tasks: HashMap<Id, (String, Kind)>,
    /// The task the test hook fails, if any.
    inject: Option<String>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor; reads the test hook's variable.
    pub fn new() -> Self {
        Self {
            set: JoinSet::new(),
            tasks: HashMap::new(),
            inject: std::env::var(FAIL_TASK_ENV).ok().filter(|v| !v.is_empty()),
        }
    }

    /// Registers a task that runs until shutdown: if it ends before, the daemon fails.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.add(name.into(), Kind::Service, task);
    }

    /// Registers a task that does its job and ends (an initial sync): only an error or a panic
    /// fails the daemon.
    pub fn spawn_startup<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.add(name.into(), Kind::Startup, task);
    }

    /// The names of the registered tasks that have not ended yet.
    pub fn names(&self) -> Vec<String> {
        self.names_of(None)
    }

    fn names_of(&self, kind: Option<Kind>) -> Vec<String> {
        let mut n: Vec<String> = self
            .tasks
            .values()
            .filter(|(_, k)| kind.is_none_or(|want| *k == want))
            .map(|(n, _)| n.clone())
            .collect();
        n.sort();
        n
    }

    /// For work that is not a task of this supervisor (a thread): resolves when the test hook
    /// names `name` and SIGUSR2 arrives; `None` when the hook does not name it. Claims the hook:
    /// a task spawned later under that name is not failed by it (the caller injects the failure
    /// where it belongs, and the task reports it).
    pub fn injected_failure(
        &mut self,
        name: &str,
    ) -> Option<impl Future<Output = ()> + Send + use<>> {
        if self.inject.as_deref() != Some(name) {
            return None;
        }
        self.inject = None;
        Some(sigusr2())
    }

    fn add<F>(&mut self, name: String, kind: Kind, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let span = tracing::info_span!("task", task = %name);
        let injected = self
            .injected_failure(&name)
            .map(|f| Box::pin(f) as BoxFuture);
        let hook_name = name.clone();
        let task = async move {
            match injected {
                None => task.await,
                Some(fail) => {
                    tokio::select! {
                        r = task => r,
                        () = fail => panic!("injected failure of task {hook_name} ({FAIL_TASK_ENV}, SIGUSR2)"),
                    }
                }
            }
        };
        let handle = self.set.spawn(task.instrument(span));
        self.tasks.insert(handle.id(), (name, kind));
    }

    /// Runs until SIGTERM or Ctrl-C, or until a task fails. On a signal: starts the drain and
    /// waits up to `grace` for every task and watcher to finish (a second signal exits at once).
    /// On a failure: logs it, drains for [`FAILED_GRACE`] and returns [`Exit::Failed`].
    pub async fn run(self, drain: Trigger, grace: Duration) -> Exit {
        self.run_until(drain, grace, || Box::pin(crate::shutdown_signal()))
            .await
    }

    /// [`Supervisor::run`] with the signals coming from `signal` (one call per signal).
    pub async fn run_until(
        mut self,
        drain: Trigger,
        grace: Duration,
        mut signal: impl FnMut() -> BoxFuture,
    ) -> Exit {
        tracing::info!(
            tasks = ?self.names_of(Some(Kind::Service)),
            startup = ?self.names_of(Some(Kind::Startup)),
            "supervising"
        );
        let failure = {
            let mut first = signal();
            loop {
                tokio::select! {
                    () = &mut first => break None,
                    joined = self.set.join_next_with_id() => {
                        let Some(joined) = joined else {
                            break Some("every task ended".to_string());
                        };
                        if let Some(reason) = self.ended(joined, false) {
                            break Some(reason);
                        }
                    }
                }
            }
        };
        match failure {
            None => {
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "shutting down: draining (a second signal exits at once)"
                );
                tokio::select! {
                    drained = self.drain(drain, grace) => match drained {
                        Drained::Graceful => Exit::Clean,
                        Drained::Forced => Exit::Forced,
                    },
                    () = signal() => {
                        tracing::warn!("second signal: exiting at once");
                        Exit::Interrupted
                    }
                }
            }
            Some(reason) => {
                tracing::error!(%reason, "a critical task is gone: exiting so that the process is restarted");
                tokio::select! {
                    _ = self.drain(drain, FAILED_GRACE) => {}
                    () = signal() => {}
                }
                Exit::Failed(reason)
            }
        }
    }

    /// Signals the drain and waits for every task and watcher, up to `deadline`; then aborts
    /// what is left.
    async fn drain(&mut self, trigger: Trigger, deadline: Duration) -> Drained {
        let start = Instant::now();
        trigger.start();
        let tasks = tokio::time::timeout(deadline, async {
            while let Some(joined) = self.set.join_next_with_id().await {
                self.ended(joined, true);
            }
        })
        .await;
        let left = deadline.saturating_sub(start.elapsed());
        let watchers = trigger.drain(left).await;
        if tasks.is_err() || watchers == Drained::Forced {
            tracing::warn!(
                still_running = ?self.names(),
                "drain deadline passed; stopping what is left"
            );
            self.set.abort_all();
            return Drained::Forced;
        }
        Drained::Graceful
    }

    /// Records a task's end; returns why the daemon fails, if it does.
    fn ended(
        &mut self,
        joined: Result<(Id, anyhow::Result<()>), JoinError>,
        draining: bool,
    ) -> Option<String> {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let (name, kind) = self
            .tasks
            .remove(&id)
            .unwrap_or_else(|| ("unknown".into(), Kind::Service));
        let reason = match joined {
            Ok((_, Ok(()))) if draining || kind == Kind::Startup => {
                tracing::debug!(task = %name, "task done");
                return None;
            }
            Ok((_, Ok(()))) => format!("task {name} ended"),
            Ok((_, Err(e))) => format!("task {name} failed: {e:#}"),
            Err(e) if e.is_panic() => format!("task {name} panicked: {}", panic_message(e)),
            Err(_) => format!("task {name} was cancelled"),
        };
        if draining {
            tracing::warn!(%reason, "during the drain");
            return None;
        }
        Some(reason)
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Resolves on SIGUSR2 (never, when the handler cannot be installed).
fn sigusr2() -> impl Future<Output = ()> + Send + use<> {
    let sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2());
    async move {
        match sig {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use tokio::sync::mpsc;

    use super::*;
    use crate::drain;

    /// Signals that a test sends by hand.
    fn signals() -> (
        mpsc::UnboundedSender<()>,
        impl FnMut() -> BoxFuture + Send + 'static,
    ) {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let next = move || {
            let rx = rx.clone();
            Box::pin(async move {
                if rx.lock().await.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }) as BoxFuture
        };
        (tx, next)
    }

    /// A task that runs until the drain, like every service of a daemon.
    async fn service(w: drain::Watcher) -> anyhow::Result<()> {
        w.signaled().await;
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_task_fails_the_supervisor_at_once_naming_it() {
        let (trigger, watcher) = drain::channel();
        let mut sup = Supervisor::new();
        sup.spawn("engine", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("index out of bounds");
        });
        sup.spawn("watch/Pod", service(watcher.clone()));
        let stopped = Arc::new(AtomicBool::new(false));
        let s = stopped.clone();
        sup.spawn("admin", async move {
            watcher.signaled().await;
            s.store(true, Ordering::SeqCst);
            Ok(())
        });
        let (_tx, signal) = signals();
        let t = Instant::now();
        let exit = sup
            .run_until(trigger, Duration::from_secs(30), signal)
            .await;
        let Exit::Failed(reason) = &exit else {
            panic!("{exit:?}")
        };
        assert!(
            reason.contains("task engine panicked: index out of bounds"),
            "{reason}"
        );
        assert_eq!(exit.code(), 1);
        // The other tasks were drained, within the short grace of a failure.
        assert!(stopped.load(Ordering::SeqCst));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_task_that_returns_or_fails_before_shutdown_is_a_failure() {
        for (result, expected) in [
            (Ok(()), "task grpc ended"),
            (
                Err(anyhow::anyhow!("bind: address in use")),
                "task grpc failed: bind: address in use",
            ),
        ] {
            let (trigger, watcher) = drain::channel();
            let mut sup = Supervisor::new();
            sup.spawn("grpc", async move { result });
            sup.spawn("admin", service(watcher));
            let (_tx, signal) = signals();
            match sup
                .run_until(trigger, Duration::from_secs(30), signal)
                .await
            {
                Exit::Failed(r) => assert_eq!(r, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn startup_tasks_may_finish_but_not_fail() {
        let (trigger, watcher) = drain::channel();
        let mut sup = Supervisor::new();
        sup.spawn_startup("initial sync", async { Ok(()) });
        sup.spawn("admin", service(watcher));
        let (tx, signal) = signals();
        let run = tokio::spawn(sup.run_until(trigger, Duration::from_secs(5), signal));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !run.is_finished(),
            "a finished start-up task is not a failure"
        );
        tx.send(()).expect("signal");
        assert!(matches!(run.await.expect("join"), Exit::Clean));

        let (trigger, _watcher) = drain::channel();
        let mut sup = Supervisor::new();
        sup.spawn_startup("initial sync", async {
            anyhow::bail!("the id table is invalid")
        });
        let (_tx, signal) = signals();
        match sup.run_until(trigger, Duration::from_secs(5), signal).await {
            Exit::Failed(r) => assert_eq!(r, "task initial sync failed: the id table is invalid"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_signal_drains_gracefully_and_a_second_one_exits_at_once() {
        // Graceful: every task ends on the drain.
        let (trigger, watcher) = drain::channel();
        let mut sup = Supervisor::new();
        for name in ["a", "b"] {
            sup.spawn(name, service(watcher.clone()));
        }
        drop(watcher);
        let (tx, signal) = signals();
        tx.send(()).expect("signal");
        assert!(matches!(
            sup.run_until(trigger, Duration::from_secs(5), signal).await,
            Exit::Clean
        ));

        // A task that ignores the drain: the deadline forces it.
        let (trigger, watcher) = drain::channel();
        let mut sup = Supervisor::new();
        sup.spawn("stuck", async move {
            let _held = watcher;
            std::future::pending::<anyhow::Result<()>>().await
        });
        let (tx, signal) = signals();
        tx.send(()).expect("signal");
        let t = Instant::now();
        assert!(matches!(
            sup.run_until(trigger, Duration::from_millis(200), signal)
                .await,
            Exit::Forced
        ));
        assert!(t.elapsed() >= Duration::from_millis(200));

        // A second signal during a long drain exits at once.
        let (trigger, watcher) = drain::channel();
        let mut sup = Supervisor::new();
        sup.spawn("stuck", async move {
            let _held = watcher;
            std::future::pending::<anyhow::Result<()>>().await
        });
        let (tx, signal) = signals();
        tx.send(()).expect("first signal");
        tx.send(()).expect("second signal");
        let t = Instant::now();
        let exit = sup
            .run_until(trigger, Duration::from_secs(60), signal)
            .await;
        assert!(matches!(exit, Exit::Interrupted), "{exit:?}");
        assert_eq!(exit.code(), 130);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
