//! The node's datapath: loads the kernel programs, pins maps and links under a bpffs directory,
//! attaches to pods and cgroups, and writes the desired state into the maps.
//!
//! **Restart without a gap.** Maps are pinned under `<pin_dir>/maps` and reused by the next
//! load; links are pinned under `<pin_dir>/links`. A new agent loads its programs and swaps
//! them into the existing links with `BPF_LINK_UPDATE` (atomic), so a restart or an upgrade never
//! detaches anything. Several datapaths with different pin directories and cgroups can run on
//! one machine (the lab runs one per simulated node).
//!
//! **No half-applied state.** [`Datapath::apply`] first checks that everything fits (a config
//! that does not is refused whole, naming the map and by how much), then writes in an order
//! that keeps every packet's decision consistent: new policy sets and backend tables are
//! written under fresh ids, then endpoints and Services switch to them (one atomic write each),
//! then the generation is bumped (accepted flows re-evaluate), then what is no longer
//! referenced is deleted.
use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use cortexflow_common::{
    BackendKey, BackendValue, CFG_EVENTS_ALLOWED, CidrKey, CidrValue, Counter, DatapathConfig,
    EndpointInfo, IpcacheValue, POLICY_KEY_BITS, PolicyKey, PolicyValue, Reason, ServiceKey,
    ServiceValue, maps, programs,
};

use crate::{
    compile::{self, Allocator, DesiredState, MapContents},
    loader::EBPF_OBJECT,
    sys,
};

/// Sizes of the maps, set when they are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
    /// Policy entries of port ranges and rules without ports.
    pub policy: u32,
    /// Policy entries of single ports.
    pub policy_exact: u32,
    pub conntrack: u32,
    pub services: u32,
    pub backends: u32,
    pub revnat: u32,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub events_bytes: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            endpoints: 1024,
            ipcache: 65536,
            cidrs: 4096,
            policy: 65536,
            policy_exact: 131072,
            conntrack: 262144,
            services: 4096,
            backends: 65536,
            revnat: 65536,
            events_bytes: 1 << 20,
        }
    }
}

impl Capacity {
    /// `(map name, max entries)` of every map whose size is configurable.
    pub fn sizes(&self) -> [(&'static str, u32); 10] {
        [
            (maps::ENDPOINTS, self.endpoints),
            (maps::IPCACHE, self.ipcache),
            (maps::CIDRS, self.cidrs),
            (maps::POLICY, self.policy),
            (maps::POLICY_EXACT, self.policy_exact),
            (maps::CONNTRACK, self.conntrack),
            (maps::SERVICES, self.services),
            (maps::BACKENDS, self.backends),
            (maps::REVNAT, self.revnat),
            (maps::EVENTS, self.events_bytes),
        ]
    }
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcMode {
    /// tcx where the kernel has it (6.6+), clsact otherwise.
    #[default]
    Auto,
    /// tcx links (pinned).
    Tcx,
    /// Legacy clsact qdisc with direct-action filters.
    Clsact,
}

/// Where and how a datapath runs.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// bpffs directory for pins (default `/sys/fs/bpf/cortexflow`).
    pub pin_dir: PathBuf,
    pub capacity: Capacity,
    pub tc_mode: TcMode,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(cortexflow_common::DEFAULT_PIN_DIR),
            capacity: Capacity::default(),
            tc_mode: TcMode::Auto,
        }
    }
}

/// Why the datapath refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {map}: the config needs {needed} entries but the capacity is {capacity} ({} over); nothing was applied", needed - capacity)]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: usize,
    },
    #[error(
        "pinned map {map} at {path} has {what} {have} but this agent wants {want}; remove the pins \
         (`cortexflow-agent --uninstall`) to recreate the maps (enforcement stops while they are recreated)"
    )]
    PinnedMismatch {
        map: &'static str,
        path: PathBuf,
        what: &'static str,
        have: u32,
        want: u32,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Other(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}
fn prog_err(
    context: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Program { context, source }
}
fn map_err(context: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Map { context, source }
}

/// Packets and bytes of one (verdict, reason), summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSample {
    pub verdict: u8,
    pub reason: Reason,
    pub packets: u64,
    pub bytes: u64,
}

/// Every non-zero counter, and the flow events lost to a full ring buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub samples: Vec<CounterSample>,
    pub events_lost: u64,
}

impl Counters {
    /// Packets counted for (verdict, reason).
    pub fn packets(&self, verdict: u8, reason: Reason) -> u64 {
        self.samples
            .iter()
            .find(|s| s.verdict == verdict && s.reason == reason)
            .map_or(0, |s| s.packets)
    }
}

/// What an [`Datapath::apply`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub deleted: usize,
    /// Whether accepted flows will be re-evaluated (policy or identities changed).
    pub generation_bumped: bool,
}

struct Maps {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: HashMap<MapData, u32, IpcacheValue>,
    cidrs: LpmTrie<MapData, CidrKey, CidrValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    counters: PerCpuArray<MapData, Counter>,
    config: Array<MapData, DatapathConfig>,
}

/// A loaded, pinned datapath.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    opts: DatapathOptions,
    tcx: bool,
    /// Interfaces this datapath attached its programs to (name → ifindex): attaching again is
    /// a no-op until the interface changes.
    attached: std::collections::HashMap<String, u32>,
    alloc: Allocator,
    installed: MapContents,
    config: DatapathConfig,
}

const TC_PRIORITY: u16 = 0xcf00;
const TC_HANDLE: TcHandle = TcHandle::new(0xcf, 1);

impl Datapath {
    /// Loads the programs, creating the maps or reusing the pinned ones, and reads back what the
    /// maps hold (after a restart: the previous agent's state, still enforced).
    pub fn open(opts: DatapathOptions) -> Result<Self, DatapathError> {
        crate::netns::ensure_bpffs(&opts.pin_dir).map_err(io_err("mount bpffs"))?;
        let maps_dir = opts.pin_dir.join("maps");
        fs::create_dir_all(&maps_dir).map_err(io_err(format!("create {}", maps_dir.display())))?;
        fs::create_dir_all(opts.pin_dir.join("links/tc")).map_err(io_err("create links dir"))?;
        check_pinned(&maps_dir, &opts.capacity)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        for (name, size) in opts.capacity.sizes() {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [programs::FROM_POD, programs::TO_POD] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load().map_err(prog_err(format!("load {name}")))?;
        }
        for name in [programs::CONNECT4, programs::SENDMSG4, programs::RECVMSG4] {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load().map_err(prog_err(format!("load {name}")))?;
        }
        let maps = Maps {
            endpoints: take(&mut ebpf, maps::ENDPOINTS)?,
            ipcache: take(&mut ebpf, maps::IPCACHE)?,
            cidrs: take(&mut ebpf, maps::CIDRS)?,
            policy: take(&mut ebpf, maps::POLICY)?,
            policy_exact: take(&mut ebpf, maps::POLICY_EXACT)?,
            services: take(&mut ebpf, maps::SERVICES)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            counters: take(&mut ebpf, maps::COUNTERS)?,
            config: take(&mut ebpf, maps::CONFIG)?,
        };
        let tcx = match opts.tc_mode {
            TcMode::Tcx => true,
            TcMode::Clsact => false,
            TcMode::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
        };
        let config = maps.config.get(&0, 0).map_err(map_err("read config"))?;
        let mut dp = Self {
            ebpf,
            maps,
            opts,
            tcx,
            attached: Default::default(),
            alloc: Allocator::default(),
            installed: MapContents::default(),
            config,
        };
        dp.installed = dp.read_installed()?;
        dp.alloc = Allocator::resume(&dp.installed);
        Ok(dp)
    }

    /// The options the datapath runs with.
    pub fn options(&self) -> &DatapathOptions {
        &self.opts
    }

    /// Whether TC programs attach as tcx links (else clsact filters).
    pub fn uses_tcx(&self) -> bool {
        self.tcx
    }

    /// What the agent-written maps hold now.
    pub fn installed(&self) -> &MapContents {
        &self.installed
    }

    /// The current policy generation.
    pub fn generation(&self) -> u32 {
        self.config.generation
    }

    /// Attaches the socket load-balancing programs to a cgroup (v2) and everything below it;
    /// on a restart, swaps the new programs into the pinned links instead.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let dir =
            fs::File::open(cgroup).map_err(io_err(format!("open cgroup {}", cgroup.display())))?;
        for name in [programs::CONNECT4, programs::SENDMSG4, programs::RECVMSG4] {
            let pin = self
                .opts
                .pin_dir
                .join("links")
                .join(format!("cgroup-{name}"));
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            if pin.exists() {
                let link = sys::obj_get(&pin)
                    .map_err(io_err(format!("open pinned link {}", pin.display())))?;
                let prog = p.fd().map_err(prog_err(name))?;
                sys::link_update(&link, prog)
                    .map_err(io_err(format!("update link {}", pin.display())))?;
                continue;
            }
            let id = p
                // A cgroup link always lets other programs run beside it (link flags must be 0).
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(prog_err(format!("attach {name} to {}", cgroup.display())))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| {
                    DatapathError::Other(e.to_string())
                })?;
            link.pin(&pin)
                .map_err(|e| DatapathError::Other(format!("pin {}: {e:?}", pin.display())))?;
        }
        Ok(())
    }

    /// Attaches the policy programs to a pod's host-side interface (ingress hook: what the pod
    /// sends; egress hook: what it receives). Idempotent; on a restart the new programs replace
    /// the old ones atomically.
    pub fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let name = ifname.to_string();
        self.attach_interfaces(std::slice::from_ref(&name))
            .pop()
            .map_or(Ok(()), |(_, r)| r)
    }

    /// [`Datapath::attach_interface`] for many interfaces, with one result per interface.
    ///
    /// Creating a tcx link (or a clsact filter) waits for an RCU grace period under the RTNL
    /// lock, about 10 ms per hook on a typical kernel, and the lock serialises them: a node's
    /// first config with a hundred pods spends most of its time here (nodes that run with
    /// `/sys/kernel/rcu_expedited` set do not). Interfaces attached once by this process are
    /// skipped, so later configs pay nothing.
    pub fn attach_interfaces(
        &mut self,
        ifnames: &[String],
    ) -> Vec<(String, Result<(), DatapathError>)> {
        ifnames
            .iter()
            .map(|name| {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str()).unwrap_or(0);
                if ifindex == 0 {
                    self.attached.remove(name);
                    let e = DatapathError::Other(format!("no interface {name}"));
                    return (name.clone(), Err(e));
                }
                // Once per interface and process: the first attach after a restart swaps this
                // process's programs into the pinned links; later ones would only repeat that.
                if self.attached.get(name) == Some(&ifindex) {
                    return (name.clone(), Ok(()));
                }
                self.attached.remove(name);
                let r = [
                    (programs::FROM_POD, TcAttachType::Ingress),
                    (programs::TO_POD, TcAttachType::Egress),
                ]
                .into_iter()
                .try_for_each(|(prog, hook)| {
                    if self.tcx {
                        self.attach_tcx(name, ifindex, prog, hook)
                    } else {
                        self.attach_clsact(name, prog, hook)
                    }
                });
                if r.is_ok() {
                    self.attached.insert(name.clone(), ifindex);
                }
                (name.clone(), r)
            })
            .collect()
    }

    fn attach_tcx(
        &self,
        ifname: &str,
        ifindex: u32,
        name: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        let p: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or_else(|| DatapathError::Other(format!("program {name} missing")))?
            .try_into()
            .map_err(prog_err(name))?;
        let prog = p.fd().map_err(prog_err(name))?;
        attach_tcx_link(
            prog,
            ifindex,
            hook == TcAttachType::Ingress,
            &self.tc_pin(ifname, hook),
        )
        .map_err(io_err(format!("attach {name} to {ifname}")))
    }

    /// `links/tc/<hook>-<ifname>`. bpffs refuses names with a dot, which interface names may
    /// have; a colon never appears in one, so dots are written as colons.
    fn tc_pin(&self, ifname: &str, hook: TcAttachType) -> PathBuf {
        let h = if hook == TcAttachType::Ingress {
            "ingress"
        } else {
            "egress"
        };
        self.opts
            .pin_dir
            .join("links/tc")
            .join(format!("{h}-{}", ifname.replace('.', ":")))
    }

    fn attach_clsact(
        &mut self,
        ifname: &str,
        name: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        // Fails harmlessly when the qdisc is already there.
        let _ = aya::programs::tc::qdisc_add_clsact(ifname);
        let p: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let existing = SchedClassifierLink::attached(ifname, hook, TC_PRIORITY, TC_HANDLE, None)
            .map_err(io_err(format!("find {ifname}")))?;
        // Replacing an existing filter (same priority and handle) is atomic.
        let id = match p.attach_to_link(existing) {
            Ok(id) => id,
            Err(_) => p
                .attach_with_options(
                    ifname,
                    hook,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TC_HANDLE,
                        ..Default::default()
                    }),
                )
                .map_err(prog_err(format!("attach {name} to {ifname}")))?,
        };
        // The filter stays on the interface after the program object is dropped.
        let link = p.take_link(id).map_err(prog_err(name))?;
        std::mem::forget(link);
        Ok(())
    }

    /// Detaches the policy programs from an interface (when its pod goes away).
    pub fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attached.remove(ifname);
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            if self.tcx {
                let pin = self.tc_pin(ifname, hook);
                match fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("remove {}", pin.display()))(e)),
                }
            } else {
                let name = if hook == TcAttachType::Ingress {
                    programs::FROM_POD
                } else {
                    programs::TO_POD
                };
                let _ = aya::programs::tc::qdisc_detach_program(ifname, hook, name);
            }
        }
        Ok(())
    }

    /// Interfaces with pinned links (tcx mode).
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.opts.pin_dir.join("links/tc"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("ingress-").map(|i| i.replace(':', "."))
            })
            .collect();
        out.sort();
        out
    }

    /// Enables or disables flow events for allowed new flows (drops and audit verdicts are
    /// always reported).
    pub fn set_events_allowed(&mut self, on: bool) -> Result<(), DatapathError> {
        if on {
            self.config.flags |= CFG_EVENTS_ALLOWED;
        } else {
            self.config.flags &= !CFG_EVENTS_ALLOWED;
        }
        self.maps
            .config
            .set(0, self.config, 0)
            .map_err(map_err("write config"))
    }

    /// Reads what the agent-written maps hold.
    pub fn read_installed(&self) -> Result<MapContents, DatapathError> {
        let mut m = MapContents::default();
        for kv in self.maps.endpoints.iter() {
            let (k, v) = kv.map_err(map_err("read endpoints"))?;
            m.endpoints.insert(k, v);
        }
        for kv in self.maps.ipcache.iter() {
            let (k, v) = kv.map_err(map_err("read ipcache"))?;
            m.ipcache.insert(k, v);
        }
        for kv in self.maps.cidrs.iter() {
            let (k, v) = kv.map_err(map_err("read cidrs"))?;
            m.cidrs.insert((k.prefix_len(), k.data().addr), v);
        }
        for kv in self.maps.policy.iter() {
            let (k, v) = kv.map_err(map_err("read policy"))?;
            m.policy
                .insert((k.prefix_len(), compile::policy_key_bytes(&k.data())), v);
        }
        // Single-port entries live in their own hash map; in `MapContents` they are the
        // full-length prefixes.
        for kv in self.maps.policy_exact.iter() {
            let (k, v) = kv.map_err(map_err("read exact policy"))?;
            m.policy
                .insert((POLICY_KEY_BITS, compile::policy_key_bytes(&k)), v);
        }
        for kv in self.maps.services.iter() {
            let (k, v) = kv.map_err(map_err("read services"))?;
            m.services.insert((k.vip, k.port, k.protocol), v);
        }
        for kv in self.maps.backends.iter() {
            let (k, v) = kv.map_err(map_err("read backends"))?;
            m.backends.insert((k.table, k.slot), v);
        }
        Ok(m)
    }

    /// Checks that `want` fits every map; nothing is written when it does not.
    fn check_capacity(&self, want: &MapContents) -> Result<(), DatapathError> {
        let c = &self.opts.capacity;
        // During an update old and new policy sets and backend tables coexist.
        let peak = |exact: bool| {
            let is = |k: &&(u32, compile::PolicyKeyBytes)| (k.0 == POLICY_KEY_BITS) == exact;
            want.policy.keys().filter(is).count()
                + self
                    .installed
                    .policy
                    .keys()
                    .filter(is)
                    .filter(|k| !want.policy.contains_key(k))
                    .count()
        };
        let (policy_peak, exact_peak) = (peak(false), peak(true));
        let backends_peak = want.backends.len()
            + self
                .installed
                .backends
                .keys()
                .filter(|k| !want.backends.contains_key(k))
                .count();
        let cidr_peak = want.cidrs.len()
            + self
                .installed
                .cidrs
                .keys()
                .filter(|k| !want.cidrs.contains_key(k))
                .count();
        for (map, needed, capacity) in [
            (maps::ENDPOINTS, want.endpoints.len(), c.endpoints),
            (maps::IPCACHE, want.ipcache.len(), c.ipcache),
            (maps::CIDRS, cidr_peak, c.cidrs),
            (maps::POLICY, policy_peak, c.policy),
            (maps::POLICY_EXACT, exact_peak, c.policy_exact),
            (maps::SERVICES, want.services.len(), c.services),
            (maps::BACKENDS, backends_peak, c.backends),
        ] {
            if needed > capacity as usize {
                return Err(DatapathError::Capacity {
                    map,
                    needed,
                    capacity: capacity as usize,
                });
            }
        }
        Ok(())
    }

    /// Makes the maps hold `desired`. Refused whole (nothing written) when it does not fit.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, DatapathError> {
        let mut alloc = self.alloc.clone();
        let want = compile::compile(desired, &mut alloc);
        self.check_capacity(&want)?;
        let have = std::mem::take(&mut self.installed);
        let mut stats = ApplyStats::default();
        if let Err(e) = self.write_diff(&have, &want, &mut stats) {
            // Partly written: learn what the kernel holds now.
            self.installed = self.read_installed()?;
            return Err(e);
        }
        // Only the agent writes these maps: they hold what it wrote.
        self.installed = want;
        alloc.retain_used(desired);
        self.alloc = alloc;
        Ok(stats)
    }

    fn write_diff(
        &mut self,
        have: &MapContents,
        want: &MapContents,
        stats: &mut ApplyStats,
    ) -> Result<(), DatapathError> {
        let m = &mut self.maps;
        let mut verdicts_changed = false;
        // 1. New policy entries and backend slots (under ids nothing references yet, or
        //    additions to sets in use).
        for (k, v) in &want.policy {
            if have.policy.get(k) != Some(v) {
                let key = compile::policy_key(&k.1);
                if k.0 == POLICY_KEY_BITS {
                    m.policy_exact
                        .insert(key, v, 0)
                        .map_err(map_err(maps::POLICY_EXACT))?;
                } else {
                    m.policy
                        .insert(&Key::new(k.0, key), v, 0)
                        .map_err(map_err(maps::POLICY))?;
                }
                stats.written += 1;
                verdicts_changed = true;
            }
        }
        for (k, v) in &want.backends {
            if have.backends.get(k) != Some(v) {
                m.backends
                    .insert(
                        BackendKey {
                            table: k.0,
                            slot: k.1,
                        },
                        v,
                        0,
                    )
                    .map_err(map_err(maps::BACKENDS))?;
                stats.written += 1;
            }
        }
        // 2. Identities of addresses.
        for (k, v) in &want.ipcache {
            if have.ipcache.get(k) != Some(v) {
                m.ipcache.insert(k, v, 0).map_err(map_err(maps::IPCACHE))?;
                stats.written += 1;
                verdicts_changed = true;
            }
        }
        // 3. Switch endpoints and Services (one atomic write each).
        for (k, v) in &want.endpoints {
            if have.endpoints.get(k) != Some(v) {
                m.endpoints
                    .insert(k, v, 0)
                    .map_err(map_err(maps::ENDPOINTS))?;
                stats.written += 1;
                verdicts_changed = true;
            }
        }
        for (k, v) in &want.services {
            if have.services.get(k) != Some(v) {
                m.services
                    .insert(compile::service_key(k), v, 0)
                    .map_err(map_err(maps::SERVICES))?;
                stats.written += 1;
            }
        }
        // 4. CIDR identities: new sets already carry entries for old and new prefixes.
        for (k, v) in &want.cidrs {
            if have.cidrs.get(k) != Some(v) {
                m.cidrs
                    .insert(&Key::new(k.0, CidrKey { addr: k.1 }), v, 0)
                    .map_err(map_err(maps::CIDRS))?;
                stats.written += 1;
                verdicts_changed = true;
            }
        }
        for k in have.cidrs.keys().filter(|k| !want.cidrs.contains_key(*k)) {
            m.cidrs
                .remove(&Key::new(k.0, CidrKey { addr: k.1 }))
                .map_err(map_err(maps::CIDRS))?;
            stats.deleted += 1;
            verdicts_changed = true;
        }
        // 5. Accepted flows re-evaluate against what is now in place.
        if verdicts_changed {
            self.config.generation = self.config.generation.wrapping_add(1);
            m.config
                .set(0, self.config, 0)
                .map_err(map_err(maps::CONFIG))?;
            stats.generation_bumped = true;
        }
        // 6. Delete what nothing references any more.
        for k in have
            .endpoints
            .keys()
            .filter(|k| !want.endpoints.contains_key(*k))
        {
            m.endpoints.remove(k).map_err(map_err(maps::ENDPOINTS))?;
            stats.deleted += 1;
        }
        for k in have
            .services
            .keys()
            .filter(|k| !want.services.contains_key(*k))
        {
            m.services
                .remove(&compile::service_key(k))
                .map_err(map_err(maps::SERVICES))?;
            stats.deleted += 1;
        }
        for k in have
            .ipcache
            .keys()
            .filter(|k| !want.ipcache.contains_key(*k))
        {
            m.ipcache.remove(k).map_err(map_err(maps::IPCACHE))?;
            stats.deleted += 1;
        }
        for k in have.policy.keys().filter(|k| !want.policy.contains_key(*k)) {
            let key = compile::policy_key(&k.1);
            if k.0 == POLICY_KEY_BITS {
                m.policy_exact
                    .remove(&key)
                    .map_err(map_err(maps::POLICY_EXACT))?;
            } else {
                m.policy
                    .remove(&Key::new(k.0, key))
                    .map_err(map_err(maps::POLICY))?;
            }
            stats.deleted += 1;
        }
        for k in have
            .backends
            .keys()
            .filter(|k| !want.backends.contains_key(*k))
        {
            m.backends
                .remove(&BackendKey {
                    table: k.0,
                    slot: k.1,
                })
                .map_err(map_err(maps::BACKENDS))?;
            stats.deleted += 1;
        }
        Ok(())
    }

    /// Packet and byte counters summed over CPUs, for every non-zero (verdict, reason), and the
    /// number of flow events lost to a full ring buffer.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.maps.counters)
    }

    /// `(map, entries, capacity)` of every map the agent writes, from what it last wrote.
    pub fn map_usage(&self) -> Vec<(&'static str, usize, u32)> {
        let c = &self.opts.capacity;
        let i = &self.installed;
        let exact = i.policy.keys().filter(|k| k.0 == POLICY_KEY_BITS).count();
        vec![
            (maps::ENDPOINTS, i.endpoints.len(), c.endpoints),
            (maps::IPCACHE, i.ipcache.len(), c.ipcache),
            (maps::CIDRS, i.cidrs.len(), c.cidrs),
            (maps::POLICY, i.policy.len() - exact, c.policy),
            (maps::POLICY_EXACT, exact, c.policy_exact),
            (maps::SERVICES, i.services.len(), c.services),
            (maps::BACKENDS, i.backends.len(), c.backends),
        ]
    }

    /// How many connection-tracking entries there are (walks the map: call it rarely).
    pub fn conntrack_entries(&mut self) -> Result<usize, DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::CONNTRACK)
            .ok_or_else(|| DatapathError::Other("conntrack map missing".into()))?;
        let ct: HashMap<&mut MapData, cortexflow_common::CtKey, cortexflow_common::CtValue> =
            HashMap::try_from(map).map_err(map_err(maps::CONNTRACK))?;
        Ok(ct.keys().filter(Result::is_ok).count())
    }

    /// Removes every connection-tracking entry: every flow is re-evaluated on its next packet as
    /// a new one. Returns how many entries there were.
    pub fn flush_conntrack(&mut self) -> Result<usize, DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::CONNTRACK)
            .ok_or_else(|| DatapathError::Other("conntrack map missing".into()))?;
        let mut ct: HashMap<&mut MapData, cortexflow_common::CtKey, cortexflow_common::CtValue> =
            HashMap::try_from(map).map_err(map_err(maps::CONNTRACK))?;
        let keys: Vec<_> = ct.keys().filter_map(Result::ok).collect();
        for k in &keys {
            let _ = ct.remove(k);
        }
        Ok(keys.len())
    }

    /// The flow-event ring buffer (each datapath hands it out once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        take(&mut self.ebpf, maps::EVENTS)
    }

    /// Kernel run-time statistics of the TC programs: `(program, total run time in ns, runs)`.
    /// They only count while `kernel.bpf_stats_enabled` is on (`aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        let mut out = Vec::new();
        for name in [programs::FROM_POD, programs::TO_POD] {
            let p: &SchedClassifier = self
                .ebpf
                .program(name)
                .ok_or_else(|| DatapathError::Other(format!("program {name} missing")))?
                .try_into()
                .map_err(prog_err(name))?;
            let info = p.info().map_err(prog_err(name))?;
            out.push((name, info.run_time().as_nanos() as u64, info.run_count()));
        }
        Ok(out)
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN` in tests.
    pub fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    /// Removes every pin (links and maps) under the pin directory: the programs detach and the
    /// maps are freed once nothing references them. Used by `--uninstall` and by tests.
    pub fn uninstall(pin_dir: &Path) -> Result<(), DatapathError> {
        match fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", pin_dir.display()))(e)),
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Other(format!("program {name} missing from the object")))?;
    p.try_into().map_err(prog_err(format!("program {name}")))
}

/// Makes the tcx link pinned at `pin` run `prog` on interface `ifindex`: swaps the program into
/// the pinned link when it is on that interface (a restart), else creates and pins a new link
/// (replacing a pin whose interface went away).
fn attach_tcx_link(
    prog: impl std::os::fd::AsFd,
    ifindex: u32,
    ingress: bool,
    pin: &Path,
) -> io::Result<()> {
    if pin.exists() {
        let link = sys::obj_get(pin)?;
        let on = sys::tcx_link_ifindex(&link).unwrap_or(0);
        if on != 0 && on == ifindex && sys::link_update(&link, prog.as_fd()).is_ok() {
            return Ok(());
        }
        // The interface went away (and with it the link); a new one may have its name.
        fs::remove_file(pin)?;
    }
    let link = sys::tcx_link_create(prog.as_fd(), ifindex, ingress)?;
    sys::obj_pin(&link, pin)
}

fn read_counters(map: &PerCpuArray<MapData, Counter>) -> Result<Counters, DatapathError> {
    let mut out = Counters::default();
    let sum = |idx: u32| -> Result<(u64, u64), DatapathError> {
        let per_cpu = map.get(&idx, 0).map_err(map_err(maps::COUNTERS))?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes)))
    };
    for verdict in 0..cortexflow_common::VERDICTS as u8 {
        for reason in Reason::ALL {
            let (packets, bytes) = sum(cortexflow_common::counter_index(verdict, reason))?;
            if packets > 0 {
                out.samples.push(CounterSample {
                    verdict,
                    reason,
                    packets,
                    bytes,
                });
            }
        }
    }
    out.events_lost = sum(0)?.0;
    Ok(out)
}

/// Read-only view of a pinned datapath's state, for inspection by another process (tests, the
/// CLI) while an agent owns it: opens the pinned maps only, loads no program, writes nothing.
pub struct Pinned {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    ipcache: HashMap<MapData, u32, IpcacheValue>,
    counters: PerCpuArray<MapData, Counter>,
    config: Array<MapData, DatapathConfig>,
}

impl Pinned {
    /// Opens the maps pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        fn pinned<T>(pin_dir: &Path, name: &str) -> Result<T, DatapathError>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let path = pin_dir.join("maps").join(name);
            let data = MapData::from_pin(&path)
                .map_err(map_err(format!("open pinned {}", path.display())))?;
            aya::maps::Map::from_map_data(data)
                .map_err(map_err(format!("map {name}")))?
                .try_into()
                .map_err(map_err(format!("map {name}")))
        }
        Ok(Self {
            endpoints: pinned(pin_dir, maps::ENDPOINTS)?,
            ipcache: pinned(pin_dir, maps::IPCACHE)?,
            counters: pinned(pin_dir, maps::COUNTERS)?,
            config: pinned(pin_dir, maps::CONFIG)?,
        })
    }

    /// Local endpoints by address: `ip → (host-side ifindex, identity)`.
    pub fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, (u32, u32)>, DatapathError> {
        self.endpoints
            .iter()
            .map(|kv| {
                let (ifindex, v) = kv.map_err(map_err("read endpoints"))?;
                Ok((Ipv4Addr::from(v.ip.to_ne_bytes()), (ifindex, v.identity)))
            })
            .collect()
    }

    /// Cluster addresses with their identities.
    pub fn ipcache(&self) -> Result<BTreeMap<Ipv4Addr, u32>, DatapathError> {
        self.ipcache
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(map_err("read ipcache"))?;
                Ok((Ipv4Addr::from(k.to_ne_bytes()), v.identity))
            })
            .collect()
    }

    /// The policy generation.
    pub fn generation(&self) -> Result<u32, DatapathError> {
        Ok(self
            .config
            .get(&0, 0)
            .map_err(map_err("read config"))?
            .generation)
    }

    /// The packet counters (see [`Datapath::counters`]).
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.counters)
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Other(format!("map {name} missing from the object")))?;
    m.try_into().map_err(map_err(format!("map {name}")))
}

/// `(map, key size, value size)` of every pinned map, from the shared types: a pinned map left
/// by an agent with another layout must not be reused (the programs would read past its values).
fn layouts() -> [(&'static str, usize, usize); 12] {
    use core::mem::size_of;
    use cortexflow_common::{CtKey, CtValue, RevNatKey, RevNatValue};
    let lpm = |data: usize| size_of::<u32>() + data;
    [
        (maps::ENDPOINTS, size_of::<u32>(), size_of::<EndpointInfo>()),
        (maps::IPCACHE, size_of::<u32>(), size_of::<IpcacheValue>()),
        (
            maps::CIDRS,
            lpm(size_of::<CidrKey>()),
            size_of::<CidrValue>(),
        ),
        (
            maps::POLICY,
            lpm(size_of::<PolicyKey>()),
            size_of::<PolicyValue>(),
        ),
        (
            maps::POLICY_EXACT,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        (maps::CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>()),
        (
            maps::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        (
            maps::BACKENDS,
            size_of::<BackendKey>(),
            size_of::<BackendValue>(),
        ),
        (
            maps::REVNAT,
            size_of::<RevNatKey>(),
            size_of::<RevNatValue>(),
        ),
        (maps::COUNTERS, size_of::<u32>(), size_of::<Counter>()),
        (maps::EVENTS, 0, 0),
        (maps::CONFIG, size_of::<u32>(), size_of::<DatapathConfig>()),
    ]
}

/// Pinned maps are reused as they are: refuse to start when their layout or size differs from
/// what this agent would create, instead of running with other capacities or misreading values.
fn check_pinned(maps_dir: &Path, capacity: &Capacity) -> Result<(), DatapathError> {
    let sizes = capacity.sizes();
    for (name, key, value) in layouts() {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .map_err(map_err(format!("inspect pinned {}", path.display())))?;
        // Maps of a fixed size (counters, config) are not in `sizes`: their capacity is the
        // object's.
        let entries = sizes.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        let mismatch = [
            ("key size", info.key_size(), key as u32),
            ("value size", info.value_size(), value as u32),
            (
                "capacity",
                info.max_entries(),
                entries.unwrap_or(info.max_entries()),
            ),
        ]
        .into_iter()
        .find(|(_, have, want)| have != want);
        if let Some((what, have, want)) = mismatch {
            return Err(DatapathError::PinnedMismatch {
                map: name,
                path,
                what,
                have,
                want,
            });
        }
    }
    Ok(())
}

/// Reads a [`FlowEvent`](cortexflow_common::FlowEvent) from ring-buffer bytes (native endian,
/// the layout of the shared type); `None` when the record is too short.
pub fn parse_event(b: &[u8]) -> Option<cortexflow_common::FlowEvent> {
    if b.len() < std::mem::size_of::<cortexflow_common::FlowEvent>() {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&b[0..8]);
    Some(cortexflow_common::FlowEvent {
        timestamp_ns: u64::from_ne_bytes(ts),
        saddr: u32_at(8),
        daddr: u32_at(12),
        sport: u16_at(16),
        dport: u16_at(18),
        protocol: b[20],
        direction: b[21],
        verdict: b[22],
        reason: b[23],
        src_identity: u32_at(24),
        dst_identity: u32_at(28),
        rule: u32_at(32),
        ifindex: u32_at(36),
    })
}
