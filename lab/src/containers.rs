//! A pod's containers as the kubelet runs them, as a state machine the node simulator drives
//! (`sim.rs` starts and stops the processes, runs the probes and reports the status):
//!
//! * **init containers** in order, each to a successful exit before the next; a failed one is
//!   restarted (back-off) unless the pod's `restartPolicy` is `Never`, which fails the pod;
//! * **native sidecars** (init containers with `restartPolicy: Always`) start in their place in
//!   that order — the next init container waits until the sidecar runs — and keep running for
//!   the pod's life, restarted whenever they exit;
//! * then the **app containers**, restarted on exit by the pod's `restartPolicy` (`Always`,
//!   `OnFailure`: only a non-zero exit, `Never`);
//! * restarts back off 1 s, doubling to 30 s (the kubelet: 10 s to 5 min; shorter so that tests
//!   see several), reset after 30 s of running;
//! * **probes** (`httpGet`, `tcpSocket`): readiness decides the container's `ready`, liveness
//!   kills it after `failureThreshold` failures (and the restart policy restarts it). An `exec`
//!   or `grpc` probe is an error of the pod, never silently skipped.
//!
//! The pod is Ready when it is initialized, every app container and sidecar runs and is ready,
//! and (`sim.rs`) every readiness gate is True.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod as PodK, Probe as ProbeK};

/// Where a container stands in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Init,
    Sidecar,
    App,
}

/// A pod's `restartPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

/// What a probe checks (from the node, at the pod's address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

/// One container of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub image: String,
    pub kind: Kind,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
}

/// What happened to one container so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub running: bool,
    /// When the current (or last) run started.
    pub started: Option<Instant>,
    /// The exit code of the last run.
    pub last_exit: Option<i32>,
    pub restarts: u32,
    /// When the next start is due (a restart after its back-off).
    pub next_start: Option<Instant>,
    backoff: Duration,
    /// Readiness: the probe's verdict (or, without a probe, whether it runs).
    pub ready: bool,
    ready_ok: u32,
    ready_failed: u32,
    live_failed: u32,
    pub last_readiness: Option<Instant>,
    pub last_liveness: Option<Instant>,
    /// An init container that exited 0.
    pub completed: bool,
}

impl State {
    fn never_started(&self) -> bool {
        self.started.is_none() && self.last_exit.is_none()
    }

    fn due(&self, now: Instant) -> bool {
        self.next_start.is_some_and(|t| t <= now)
    }
}

/// The pod's containers and their states.
#[derive(Clone, Debug)]
pub struct Pod {
    pub restart: Restart,
    pub specs: Vec<Spec>,
    pub states: Vec<State>,
    /// Every init container completed and every sidecar started once.
    pub initialized: bool,
}

/// A probe of a container: which kind, what to check, within what time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueProbe {
    pub container: usize,
    pub liveness: bool,
    pub check: Check,
    pub timeout: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn port_of(
    c: &Container,
    p: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> anyhow::Result<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| anyhow::anyhow!("probe port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| {
                anyhow::anyhow!("probe port {name:?} is not a port of container {}", c.name)
            }),
    }
}

fn probe(c: &Container, p: &ProbeK, what: &str) -> anyhow::Result<Probe> {
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let check = match (&p.http_get, &p.tcp_socket, &p.exec, &p.grpc) {
        (Some(h), None, None, None) => {
            anyhow::ensure!(
                h.scheme.as_deref().is_none_or(|s| s == "HTTP"),
                "{what} probe of {}: scheme {:?} is not supported by the lab",
                c.name,
                h.scheme
            );
            Check::Http {
                port: port_of(c, &h.port)?,
                path: h.path.clone().unwrap_or_else(|| "/".into()),
            }
        }
        (None, Some(t), None, None) => Check::Tcp {
            port: port_of(c, &t.port)?,
        },
        _ => anyhow::bail!(
            "{what} probe of {}: only httpGet and tcpSocket probes are supported by the lab",
            c.name
        ),
    };
    Ok(Probe {
        check,
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
    })
}

fn spec(c: &Container, kind: Kind) -> anyhow::Result<Spec> {
    if c.startup_probe.is_some() {
        anyhow::bail!("startupProbe of {} is not supported by the lab", c.name);
    }
    Ok(Spec {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        kind,
        readiness: c
            .readiness_probe
            .as_ref()
            .map(|p| probe(c, p, "readiness"))
            .transpose()?,
        liveness: c
            .liveness_probe
            .as_ref()
            .map(|p| probe(c, p, "liveness"))
            .transpose()?,
    })
}

impl Pod {
    /// The containers of `p` (init containers and sidecars first, in order, then the app
    /// containers), or why the lab cannot run them.
    pub fn of(p: &PodK) -> anyhow::Result<(Self, Vec<Container>)> {
        let s = p
            .spec
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("pod without spec"))?;
        anyhow::ensure!(!s.containers.is_empty(), "pod without containers");
        let restart = match s.restart_policy.as_deref() {
            None | Some("Always") => Restart::Always,
            Some("OnFailure") => Restart::OnFailure,
            Some("Never") => Restart::Never,
            Some(other) => anyhow::bail!("restartPolicy {other:?}"),
        };
        let mut specs = Vec::new();
        let mut containers = Vec::new();
        for c in s.init_containers.iter().flatten() {
            let kind = match c.restart_policy.as_deref() {
                Some("Always") => Kind::Sidecar,
                None => Kind::Init,
                Some(other) => anyhow::bail!("init container {}: restartPolicy {other:?}", c.name),
            };
            if kind == Kind::Init {
                anyhow::ensure!(
                    c.readiness_probe.is_none() && c.liveness_probe.is_none(),
                    "init container {} may not have probes (only sidecars may)",
                    c.name
                );
            }
            specs.push(spec(c, kind)?);
            containers.push(c.clone());
        }
        for c in &s.containers {
            specs.push(spec(c, Kind::App)?);
            containers.push(c.clone());
        }
        let states = vec![State::default(); specs.len()];
        Ok((
            Self {
                restart,
                specs,
                states,
                initialized: false,
            },
            containers,
        ))
    }

    /// Container `i` started at `now`.
    pub fn started(&mut self, i: usize, now: Instant) {
        let st = &mut self.states[i];
        if !st.never_started() {
            st.restarts += 1;
        }
        st.running = true;
        st.started = Some(now);
        st.next_start = None;
        st.ready = self.specs[i].readiness.is_none();
        st.ready_ok = 0;
        st.ready_failed = 0;
        st.live_failed = 0;
        st.last_readiness = None;
        st.last_liveness = None;
    }

    /// Container `i` exited with `code` at `now`: what follows from it (a restart after its
    /// back-off, a completed init container, or nothing).
    pub fn exited(&mut self, i: usize, code: i32, now: Instant) {
        let kind = self.specs[i].kind;
        let restart = self.restart;
        let st = &mut self.states[i];
        let ran = st
            .started
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        st.running = false;
        st.ready = false;
        st.last_exit = Some(code);
        let again = match kind {
            Kind::Init => {
                st.completed = code == 0;
                code != 0 && restart != Restart::Never
            }
            Kind::Sidecar => true,
            Kind::App => match restart {
                Restart::Always => true,
                Restart::OnFailure => code != 0,
                Restart::Never => false,
            },
        };
        if again {
            if ran >= MAX_BACKOFF {
                st.backoff = Duration::ZERO;
            }
            st.backoff = if st.backoff.is_zero() {
                Duration::from_secs(1)
            } else {
                (st.backoff * 2).min(MAX_BACKOFF)
            };
            st.next_start = Some(now + st.backoff);
        }
    }

    /// The containers to start now, in order.
    pub fn to_start(&mut self, now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        if self.failed_init() {
            return out;
        }
        if !self.initialized {
            for (i, s) in self.specs.iter().enumerate() {
                let st = &self.states[i];
                match s.kind {
                    Kind::App => break,
                    Kind::Init if st.completed => continue,
                    Kind::Sidecar if st.running => continue,
                    Kind::Init | Kind::Sidecar => {
                        if !st.running && (st.never_started() || st.due(now)) {
                            out.push(i);
                        }
                        return out;
                    }
                }
            }
            self.initialized = true;
        }
        for (i, s) in self.specs.iter().enumerate() {
            let st = &self.states[i];
            if st.running {
                continue;
            }
            let start = match s.kind {
                Kind::Init => false,
                Kind::Sidecar => st.due(now),
                Kind::App => st.never_started() || st.due(now),
            };
            if start {
                out.push(i);
            }
        }
        out
    }

    fn failed_init(&self) -> bool {
        self.specs.iter().zip(&self.states).any(|(s, st)| {
            s.kind == Kind::Init
                && st.last_exit.is_some_and(|c| c != 0)
                && st.next_start.is_none()
                && !st.running
        })
    }

    fn apps(&self) -> impl Iterator<Item = &State> {
        self.specs
            .iter()
            .zip(&self.states)
            .filter(|(s, _)| s.kind == Kind::App)
            .map(|(_, st)| st)
    }

    /// `Pending`, `Running`, `Succeeded` or `Failed`, by the kubelet's rules.
    pub fn phase(&self) -> &'static str {
        if self.failed_init() {
            return "Failed";
        }
        if !self.initialized || self.apps().all(State::never_started) {
            return "Pending";
        }
        if self.apps().any(|st| st.running || st.next_start.is_some()) {
            return "Running";
        }
        if self.apps().all(|st| st.last_exit == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    }

    /// Whether the pod is done: no container runs or will run again.
    pub fn terminal(&self) -> bool {
        matches!(self.phase(), "Succeeded" | "Failed")
    }

    /// Every app container and sidecar runs and is ready.
    pub fn containers_ready(&self) -> bool {
        self.initialized
            && self
                .specs
                .iter()
                .zip(&self.states)
                .filter(|(s, _)| s.kind != Kind::Init)
                .all(|(_, st)| st.running && st.ready)
    }

    /// The probes due at `now` (each marked as run).
    pub fn due_probes(&mut self, now: Instant) -> Vec<DueProbe> {
        let mut out = Vec::new();
        for (i, (s, st)) in self.specs.iter().zip(self.states.iter_mut()).enumerate() {
            let Some(started) = st.started.filter(|_| st.running) else {
                continue;
            };
            for (liveness, probe, last) in [
                (false, &s.readiness, &mut st.last_readiness),
                (true, &s.liveness, &mut st.last_liveness),
            ] {
                let Some(p) = probe else { continue };
                let ready_at = started + p.initial_delay;
                let due = now >= ready_at && last.is_none_or(|l| now >= l + p.period);
                if due {
                    *last = Some(now);
                    out.push(DueProbe {
                        container: i,
                        liveness,
                        check: p.check.clone(),
                        timeout: p.timeout,
                    });
                }
            }
        }
        out
    }

    /// A probe's result; `true` when the container must be killed (liveness failed enough).
    pub fn probed(&mut self, p: &DueProbe, ok: bool) -> bool {
        let spec = &self.specs[p.container];
        let st = &mut self.states[p.container];
        if !st.running {
            return false;
        }
        if p.liveness {
            let Some(probe) = &spec.liveness else {
                return false;
            };
            st.live_failed = if ok { 0 } else { st.live_failed + 1 };
            return st.live_failed >= probe.failure_threshold;
        }
        let Some(probe) = &spec.readiness else {
            return false;
        };
        if ok {
            st.ready_ok += 1;
            st.ready_failed = 0;
            if st.ready_ok >= probe.success_threshold {
                st.ready = true;
            }
        } else {
            st.ready_failed += 1;
            st.ready_ok = 0;
            if st.ready_failed >= probe.failure_threshold {
                st.ready = false;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(manifest: serde_json::Value) -> Pod {
        let p: PodK = serde_json::from_value(manifest).unwrap();
        Pod::of(&p).unwrap().0
    }

    fn c(name: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "cortexflow/workload"})
    }

    #[test]
    fn init_containers_run_in_order_sidecars_stay_then_apps() {
        let mut side = c("proxy");
        side["restartPolicy"] = "Always".into();
        let mut p = pod(serde_json::json!({"spec": {
            "initContainers": [c("migrate"), side, c("warm")],
            "containers": [c("app")],
        }}));
        let t = Instant::now();
        assert_eq!(p.to_start(t), vec![0]);
        p.started(0, t);
        assert_eq!(p.to_start(t), Vec::<usize>::new(), "waits for migrate");
        assert_eq!(p.phase(), "Pending");
        p.exited(0, 0, t);
        assert_eq!(p.to_start(t), vec![1], "then the sidecar");
        p.started(1, t);
        assert_eq!(
            p.to_start(t),
            vec![2],
            "the next init container once the sidecar runs"
        );
        p.started(2, t);
        p.exited(2, 0, t);
        assert_eq!(p.to_start(t), vec![3], "then the app");
        p.started(3, t);
        assert!(p.initialized);
        assert_eq!(p.phase(), "Running");
        assert!(p.containers_ready());
        // The sidecar exits: restarted after 1 s, the pod stays initialized; not ready meanwhile.
        p.exited(1, 137, t);
        assert!(!p.containers_ready());
        assert_eq!(p.to_start(t), Vec::<usize>::new());
        assert_eq!(p.to_start(t + Duration::from_secs(1)), vec![1]);
        p.started(1, t + Duration::from_secs(1));
        assert_eq!(p.states[1].restarts, 1);
        assert!(p.containers_ready());
    }

    #[test]
    fn restarts_back_off_and_follow_the_restart_policy() {
        let t = Instant::now();
        let mut p = pod(serde_json::json!({"spec": {"containers": [c("app")]}}));
        assert_eq!(p.to_start(t), vec![0]);
        let mut now = t;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            p.started(0, now);
            p.exited(0, 1, now);
            let next = p.states[0].next_start.unwrap();
            gaps.push(next - now);
            assert!(p.to_start(now).is_empty());
            now = next;
            assert_eq!(p.to_start(now), vec![0]);
        }
        let s = Duration::from_secs;
        assert_eq!(gaps, vec![s(1), s(2), s(4), s(8), s(16), s(30)]);
        assert_eq!(p.phase(), "Running");
        // OnFailure: a clean exit ends it (Succeeded); Never: any exit ends it.
        let mut p = pod(
            serde_json::json!({"spec": {"restartPolicy": "OnFailure", "containers": [c("app")]}}),
        );
        p.to_start(t);
        p.started(0, t);
        p.exited(0, 1, t);
        assert_eq!(p.phase(), "Running");
        p.started(0, t);
        p.exited(0, 0, t);
        assert_eq!(p.phase(), "Succeeded");
        let mut p =
            pod(serde_json::json!({"spec": {"restartPolicy": "Never", "containers": [c("app")]}}));
        p.to_start(t);
        p.started(0, t);
        p.exited(0, 2, t);
        assert_eq!((p.phase(), p.terminal()), ("Failed", true));
        // A failed init container with Never fails the pod, its apps never start.
        let mut p = pod(
            serde_json::json!({"spec": {"restartPolicy": "Never", "initContainers": [c("init")], "containers": [c("app")]}}),
        );
        assert_eq!(p.to_start(t), vec![0]);
        p.started(0, t);
        p.exited(0, 1, t);
        assert_eq!(p.phase(), "Failed");
        assert!(p.to_start(t + s(60)).is_empty());
    }

    #[test]
    fn probes_decide_readiness_and_liveness_kills() {
        let t = Instant::now();
        let mut app = c("app");
        app["ports"] = serde_json::json!([{"name": "health", "containerPort": 8081}]);
        app["readinessProbe"] = serde_json::json!({"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 1, "failureThreshold": 2});
        app["livenessProbe"] = serde_json::json!({"tcpSocket": {"port": 8080}, "periodSeconds": 2, "failureThreshold": 2, "initialDelaySeconds": 1});
        let mut p = pod(serde_json::json!({"spec": {"containers": [app]}}));
        p.to_start(t);
        p.started(0, t);
        assert!(
            !p.containers_ready(),
            "not ready before the first readiness probe"
        );
        let due = p.due_probes(t);
        assert_eq!(
            due,
            vec![DueProbe {
                container: 0,
                liveness: false,
                check: Check::Http {
                    port: 8081,
                    path: "/healthz".into()
                },
                timeout: Duration::from_secs(1)
            }]
        );
        assert!(!p.probed(&due[0], true));
        assert!(p.containers_ready());
        assert!(p.due_probes(t).is_empty(), "not again within the period");
        let later = t + Duration::from_secs(1);
        let due = p.due_probes(later);
        assert_eq!(
            due.len(),
            2,
            "readiness again, liveness after its initial delay: {due:?}"
        );
        for d in &due {
            assert!(!p.probed(d, false));
        }
        assert!(p.containers_ready(), "one failure is below the threshold");
        let due = p.due_probes(t + Duration::from_secs(3));
        let kill = due.iter().map(|d| p.probed(d, false)).collect::<Vec<_>>();
        assert!(!p.containers_ready());
        assert_eq!(kill, vec![false, true], "the second liveness failure kills");
        // Unsupported probes are errors.
        let mut bad = c("app");
        bad["readinessProbe"] = serde_json::json!({"exec": {"command": ["true"]}});
        let p: PodK =
            serde_json::from_value(serde_json::json!({"spec": {"containers": [bad]}})).unwrap();
        let e = Pod::of(&p).unwrap_err().to_string();
        assert!(e.contains("only httpGet and tcpSocket"), "{e}");
    }
}
