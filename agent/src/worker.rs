//! The datapath thread: owns the [`Datapath`], lives in the node's network namespace, applies
//! configs, attaches pods' interfaces and retries those not there yet.
//!
//! A network namespace is a property of a thread (`setns`), and the async runtime's threads must
//! stay in the agent's own namespace (that is where the operator and the scrapers reach it). So
//! everything that names interfaces — route lookups, `if_nametoindex`, TC attachment — runs on
//! this one thread, which enters the node's namespace once and never leaves it. Map operations
//! do not depend on the namespace.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use cortexflow_common::AgentState;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::{
    datapath::{ApplyStats, Counters, Datapath, DatapathError, DatapathOptions},
    ifaces::{self, Iface},
    state::Received,
};

/// Where and how the datapath thread runs.
#[derive(Clone, Debug, Default)]
pub struct WorkerOptions {
    pub datapath: DatapathOptions,
    /// The node's network namespace (a `/run/netns/<name>` path); `None`: the agent's own.
    pub netns: Option<PathBuf>,
    /// The cgroup (v2) whose sockets get Service load balancing; `None`: none.
    pub cgroup_root: Option<PathBuf>,
    /// Report allowed new flows too (drops and audit verdicts are always reported).
    pub events_allowed: bool,
    /// How often pods whose interface is missing (or changed) are looked up again.
    pub retry_interval: Duration,
}

/// The outcome of programming one config.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Version of the config now in the kernel.
    pub version: u64,
    /// Its cluster revision.
    pub revision: u64,
    pub stats: ApplyStats,
    /// Endpoints in the kernel (`ns/name`), and those whose interface is not there yet.
    pub programmed: Vec<String>,
    /// The address each of `programmed` has in the kernel.
    pub programmed_at: BTreeMap<String, Ipv4Addr>,
    pub pending: Vec<String>,
    /// Interfaces of pods the config does not name, guarded (anti-spoofing, no policy).
    pub guarded: Vec<String>,
    pub duration: Duration,
}

/// Why a config was not programmed (the kernel keeps the previous state).
#[derive(Clone, Debug)]
pub struct Refused {
    pub version: u64,
    pub error: String,
    /// A capacity refusal (the config does not fit the maps), as opposed to a failure.
    pub capacity: bool,
}

/// Everything the metrics need from the datapath.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub maps: Vec<(&'static str, usize, u32)>,
    pub conntrack: Option<(usize, u32)>,
    pub counters: Counters,
    pub generation: u32,
}

/// Something the thread did on its own (a retry found an interface, or lost one).
#[derive(Clone, Debug)]
pub enum Notice {
    Reapplied(Result<Applied, Refused>),
}

enum Cmd {
    Apply(Arc<Received>, oneshot::Sender<Result<Applied, Refused>>),
    Usage(bool, oneshot::Sender<Usage>),
    /// The CNI hook: guard this pod interface (name, address) before its container starts.
    Guard(String, Ipv4Addr, oneshot::Sender<Result<(), String>>),
    /// The supervisor's test hook: panic, as a bug in the thread would.
    Panic,
}

/// Tells the supervisor that the thread is gone (sent from a guard's `drop`, so a panic that
/// unwinds the thread reports too).
struct EndGuard(Option<oneshot::Sender<&'static str>>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let why = if thread::panicking() {
            "panicked"
        } else {
            "ended"
        };
        if let Some(tx) = self.0.take() {
            let _ = tx.send(why);
        }
    }
}

/// The handle the async side holds.
pub struct Worker {
    tx: mpsc::Sender<Cmd>,
    thread: Option<thread::JoinHandle<()>>,
}

/// What starting the thread hands back.
pub struct Started {
    pub worker: Worker,
    pub events: RingBuf<MapData>,
    pub notices: tmpsc::Receiver<Notice>,
    /// Whether TC programs attach as tcx links.
    pub tcx: bool,
    /// Resolves when the thread is gone: `"panicked"` or `"ended"`.
    pub ended: oneshot::Receiver<&'static str>,
    /// What the maps held when the datapath opened (after a restart: the previous agent's
    /// last programmed config).
    pub state: AgentState,
}

impl Worker {
    /// Starts the thread: enters the namespace, opens the datapath (reusing pins), attaches the
    /// socket programs to the cgroup root. Nothing is written to the maps until the first
    /// [`Worker::apply`]: after a restart the kernel goes on enforcing what the pins hold.
    pub fn start(opts: WorkerOptions) -> Result<Started, DatapathError> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (notice_tx, notices) = tmpsc::channel(16);
        let (ended_tx, ended) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                let _end = EndGuard(Some(ended_tx));
                let _span = tracing::info_span!(
                    "datapath thread",
                    netns = %opts.netns.as_deref().map_or("(own)".into(), |p| p.display().to_string())
                )
                .entered();
                let started = (|| {
                    if let Some(ns) = &opts.netns {
                        crate::netns::enter(ns).map_err(|e| DatapathError::Io {
                            context: format!("enter network namespace {}", ns.display()),
                            source: e,
                        })?;
                    }
                    let mut dp = Datapath::open(opts.datapath.clone())?;
                    if let Some(cg) = &opts.cgroup_root {
                        dp.attach_cgroup(cg)?;
                    }
                    dp.set_events_allowed(opts.events_allowed)?;
                    let events = dp.take_events()?;
                    let state = dp.agent_state()?;
                    Ok::<_, DatapathError>((dp, events, state))
                })();
                match started {
                    Ok((dp, events, state)) => {
                        let tcx = dp.uses_tcx();
                        if ready_tx.send(Ok((events, tcx, state))).is_err() {
                            return;
                        }
                        Thread::new(dp, opts, notice_tx).run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| DatapathError::Io {
                context: "spawn the datapath thread".into(),
                source: e,
            })?;
        let (events, tcx, state) = ready_rx
            .recv()
            .map_err(|_| DatapathError::Other("the datapath thread died".into()))??;
        Ok(Started {
            worker: Worker {
                tx,
                thread: Some(thread),
            },
            events,
            notices,
            tcx,
            ended,
            state,
        })
    }

    /// The supervisor's test hook (`CORTEXFLOW_FAIL_TASK=datapath`): makes the thread panic.
    pub fn inject_panic(&self) {
        let _ = self.tx.send(Cmd::Panic);
    }

    /// Programs a config; the previous state stays when it is refused.
    pub async fn apply(&self, r: Arc<Received>) -> Result<Applied, Refused> {
        let version = r.version;
        let (tx, rx) = oneshot::channel();
        let gone = || Refused {
            version,
            error: "the datapath thread is gone".into(),
            capacity: false,
        };
        self.tx.send(Cmd::Apply(r, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Guards a new pod's interface now (the CNI hook): returns once packets from it are
    /// checked for spoofing.
    pub async fn guard(&self, ifname: String, ip: Ipv4Addr) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let gone = || "the datapath thread is gone".to_string();
        self.tx
            .send(Cmd::Guard(ifname, ip, tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Map usage and counters (`conntrack`: also walk the conntrack map).
    pub async fn usage(&self, conntrack: bool) -> Option<Usage> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Usage(conntrack, tx)).ok()?;
        rx.await.ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread; it leaves every pin in place.
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Thread {
    dp: Datapath,
    opts: WorkerOptions,
    notices: tmpsc::Sender<Notice>,
    /// The last config asked for, and the interfaces it was programmed with.
    current: Option<Arc<Received>>,
    resolved: BTreeMap<Ipv4Addr, Iface>,
    /// The node's host routes and addresses the last program saw.
    routes: BTreeMap<Ipv4Addr, String>,
    local: BTreeSet<Ipv4Addr>,
    /// Netlink notifications of changes (`None` when they cannot be had: periodic looks only).
    watch: Option<ifaces::ChangeWatch>,
    /// Interfaces the CNI hook guarded, with their addresses.
    cni_guarded: BTreeMap<String, Ipv4Addr>,
    /// The last apply failed for a reason other than size (a write the kernel refused): it is
    /// tried again at every tick, the maps holding the previous config meanwhile.
    failed: bool,
}

impl Thread {
    fn new(dp: Datapath, opts: WorkerOptions, notices: tmpsc::Sender<Notice>) -> Self {
        Self {
            dp,
            opts,
            notices,
            current: None,
            resolved: BTreeMap::new(),
            routes: BTreeMap::new(),
            local: BTreeSet::new(),
            cni_guarded: BTreeMap::new(),
            watch: match ifaces::ChangeWatch::start() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "no netlink notifications; interfaces are looked up every second only");
                    None
                }
            },
            failed: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let interval = if self.opts.retry_interval.is_zero() {
            Duration::from_secs(1)
        } else {
            self.opts.retry_interval
        };
        // Commands are waited for in short slices, so that a netlink notification (a new pod's
        // route) is acted on within one; the full look happens every `interval` regardless.
        let slice = Duration::from_millis(20).min(interval);
        let mut last_look = Instant::now();
        loop {
            if let Some(w) = &self.watch {
                if w.dead.load(std::sync::atomic::Ordering::Acquire) {
                    panic!("the netlink watch of the node's interfaces died");
                }
                if w.changed.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    self.retry();
                }
            }
            if last_look.elapsed() >= interval {
                last_look = Instant::now();
                self.retry();
            }
            match rx.recv_timeout(slice) {
                Ok(Cmd::Apply(r, reply)) => {
                    self.current = Some(r);
                    let _ = reply.send(self.program());
                }
                Ok(Cmd::Usage(ct, reply)) => {
                    let _ = reply.send(self.usage(ct));
                }
                Ok(Cmd::Guard(ifname, ip, reply)) => {
                    let _ = reply.send(self.guard(&ifname, ip));
                }
                Ok(Cmd::Panic) => {
                    panic!("injected failure of the datapath thread (CORTEXFLOW_FAIL_TASK)")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn ips(&self) -> Vec<Ipv4Addr> {
        self.current
            .as_ref()
            .map(|r| r.endpoints.endpoints.iter().map(|e| e.ip).collect())
            .unwrap_or_default()
    }

    /// The CNI hook: the interface's endpoint entry written and its programs attached before
    /// this returns; remembered (while the interface exists) so that later configs keep it
    /// guarded even where no host route names it.
    fn guard(&mut self, ifname: &str, ip: Ipv4Addr) -> Result<(), String> {
        let index = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| format!("interface {ifname}: {e}"))?;
        self.dp
            .guard_endpoint(index, ip)
            .map_err(|e| e.to_string())?;
        for (_, r) in self.dp.attach_interfaces(&[ifname.to_string()]) {
            r.map_err(|e| format!("attach {ifname}: {e}"))?;
        }
        self.cni_guarded.insert(ifname.to_string(), ip);
        tracing::info!(interface = ifname, %ip, "guarded by the CNI hook");
        Ok(())
    }

    /// Re-resolves the interfaces; programs again when any changed, or when the last write
    /// failed.
    fn retry(&mut self) {
        if self.current.is_none() {
            return;
        }
        let Ok(routes) = ifaces::host_routes() else {
            return;
        };
        let local = ifaces::local_addresses().unwrap_or_default();
        let now = ifaces::resolve_in(&routes, self.ips());
        if self.failed || now != self.resolved || routes != self.routes || local != self.local {
            let r = self.program();
            let _ = self.notices.try_send(Notice::Reapplied(r));
        }
    }

    fn program(&mut self) -> Result<Applied, Refused> {
        let start = Instant::now();
        let Some(r) = self.current.clone() else {
            return Err(Refused {
                version: 0,
                error: "no config".into(),
                capacity: false,
            });
        };
        let _span = tracing::info_span!("datapath apply", version = r.version).entered();
        let refused = |error: String, capacity: bool| Refused {
            version: r.version,
            error,
            capacity,
        };
        let routes = ifaces::host_routes()
            .map_err(|e| refused(format!("read the node's routes: {e}"), false))?;
        let local = ifaces::local_addresses()
            .map_err(|e| refused(format!("read the node's addresses: {e}"), false))?;
        let addressed = ifaces::addressed_devices()
            .map_err(|e| refused(format!("read the node's addresses: {e}"), false))?;
        let resolved = ifaces::resolve_in(&routes, self.ips());
        let (mut desired, pending) = r.desired(|e| resolved.get(&e.ip).map(|i| i.index));
        // Every address of the node is the host, whichever the config lists.
        for a in &local {
            desired.ipcache.insert(*a, cortexflow_common::IDENTITY_HOST);
        }
        // Pods the config does not name yet: guarded from their first packet.
        let known: BTreeSet<Ipv4Addr> = r.endpoints.endpoints.iter().map(|e| e.ip).collect();
        let mut guarded = BTreeSet::new();
        // Interfaces the CNI hook guarded that still exist, then those found by their route.
        self.cni_guarded
            .retain(|dev, _| nix::net::if_::if_nametoindex(dev.as_str()).is_ok());
        let from_cni: Vec<(Ipv4Addr, String)> = self
            .cni_guarded
            .iter()
            .filter(|(_, ip)| !known.contains(ip))
            .map(|(dev, ip)| (*ip, dev.clone()))
            .collect();
        for (ip, dev) in from_cni
            .into_iter()
            .chain(ifaces::unknown_pods(&routes, &known, &local, &addressed))
        {
            let Ok(index) = nix::net::if_::if_nametoindex(dev.as_str()) else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(e) = desired.endpoints.entry(index) {
                e.insert(crate::compile::Endpoint {
                    ip,
                    identity: cortexflow_common::IDENTITY_UNKNOWN,
                    policy: crate::policy::EndpointPolicy::default(),
                });
                guarded.insert(dev);
            }
        }
        let stats = self.dp.apply(&desired).map_err(|e| {
            let capacity = e.full_map().is_some();
            self.failed = !capacity;
            refused(e.to_string(), capacity)
        })?;
        self.failed = false;
        // The maps hold this config now: remember which (a restarted agent compares what the
        // operator offers against it).
        if let Err(e) = self.dp.record_state(AgentState {
            revision: r.revision,
            version: r.version,
        }) {
            tracing::warn!(error = %e, "recording the programmed revision failed");
        }
        // The endpoints are in the maps: attach their interfaces (idempotent), and detach the
        // interfaces of pods that are gone.
        let mut pending: Vec<String> = pending
            .iter()
            .map(|e| format!("{}/{}", e.namespace, e.name))
            .collect();
        let pods: BTreeMap<String, String> = r
            .endpoints
            .endpoints
            .iter()
            .filter_map(|e| {
                let i = resolved.get(&e.ip)?;
                Some((i.name.clone(), format!("{}/{}", e.namespace, e.name)))
            })
            .collect();
        let addresses: BTreeMap<String, Ipv4Addr> = r
            .endpoints
            .endpoints
            .iter()
            .map(|e| (format!("{}/{}", e.namespace, e.name), e.ip))
            .collect();
        let names: Vec<String> = pods.keys().chain(&guarded).cloned().collect();
        let mut attached = BTreeSet::new();
        let mut programmed = Vec::new();
        for (name, result) in self.dp.attach_interfaces(&names) {
            let pod = pods.get(&name).cloned().unwrap_or_default();
            match result {
                Ok(()) => {
                    attached.insert(name.clone());
                    if !guarded.contains(&name) {
                        programmed.push(pod);
                    }
                }
                Err(err) => {
                    tracing::warn!(%pod, interface = %name, error = %err, "attach failed; retrying");
                    pending.push(pod);
                }
            }
        }
        for name in self.dp.attached_interfaces() {
            if !attached.contains(&name)
                && let Err(e) = self.dp.detach_interface(&name)
            {
                tracing::warn!(interface = %name, error = %e, "detach failed");
            }
        }
        // A failed attach is retried at the next tick: forget that interface.
        self.resolved = resolved
            .into_iter()
            .filter(|(_, i)| attached.contains(&i.name))
            .collect();
        self.routes = routes;
        self.local = local;
        let guarded: Vec<String> = guarded
            .into_iter()
            .filter(|g| attached.contains(g))
            .collect();
        if !guarded.is_empty() {
            tracing::info!(interfaces = ?guarded, "guarding the interfaces of pods the config does not name yet (anti-spoofing, no policy)");
        }
        Ok(Applied {
            version: r.version,
            revision: r.revision,
            stats,
            programmed_at: programmed
                .iter()
                .filter_map(|p| Some((p.clone(), *addresses.get(p)?)))
                .collect(),
            programmed,
            pending,
            guarded,
            duration: start.elapsed(),
        })
    }

    fn usage(&mut self, conntrack: bool) -> Usage {
        Usage {
            maps: self.dp.map_usage(),
            conntrack: conntrack
                .then(|| self.dp.conntrack_entries().ok())
                .flatten()
                .map(|n| (n, self.opts.datapath.capacity.conntrack)),
            counters: self.dp.counters().unwrap_or_default(),
            generation: self.dp.generation(),
        }
    }
}
