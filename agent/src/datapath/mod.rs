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
//!
//! The parts: [`pins`] (pinned-map checks and the read-only [`Pinned`] view), [`attach`]
//! (cgroup and TC attachment, restarts without a gap), [`apply`] (desired state → map writes),
//! [`stats`] (counters, usage, events). Map names, layouts and default sizes are those of
//! `cortexflow-common`.
mod apply;
mod attach;
mod pins;
mod stats;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{CgroupSockAddr, SchedClassifier},
    util::KernelVersion,
};
use cortexflow_common::{
    AgentState, BackendKey, BackendValue, CidrKey, CidrValue, Counter, DatapathConfig,
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, ServiceKey, ServiceValue, capacity, maps,
    programs,
};

pub use self::{
    pins::Pinned,
    stats::{CounterSample, Counters},
};
use crate::{
    compile::{Allocator, MapContents},
    loader::EBPF_OBJECT,
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
    /// The sizes the kernel object is built with (`cortexflow_common::capacity`).
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            ipcache: capacity::IPCACHE,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
            policy_exact: capacity::POLICY_EXACT,
            conntrack: capacity::CONNTRACK,
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            revnat: capacity::REVNAT,
            events_bytes: capacity::EVENTS_BYTES,
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
    #[error(transparent)]
    Overflow(#[from] crate::compile::Overflow),
    #[error("{write}; the previous config was written back, nothing of this one is in force")]
    RolledBack { write: Box<DatapathError> },
    #[error(
        "{write}; writing the previous config back failed too ({undo}): the maps hold parts of both \
         until the next apply"
    )]
    RollbackFailed {
        write: Box<DatapathError>,
        undo: Box<DatapathError>,
    },
    #[error("{0}")]
    Other(String),
}

impl DatapathError {
    /// The map a config does not fit, when that is why it was refused.
    pub fn full_map(&self) -> Option<&'static str> {
        match self {
            Self::Capacity { map, .. } | Self::Overflow(crate::compile::Overflow { map, .. }) => {
                Some(map)
            }
            _ => None,
        }
    }
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}
pub(crate) fn prog_err(
    context: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Program { context, source }
}
pub(crate) fn map_err(
    context: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Map { context, source }
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
    /// The agent's own record of what the maps hold (not a program map).
    state: Array<MapData, AgentState>,
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

impl Datapath {
    /// Loads the programs, creating the maps or reusing the pinned ones, and reads back what the
    /// maps hold (after a restart: the previous agent's state, still enforced).
    pub fn open(opts: DatapathOptions) -> Result<Self, DatapathError> {
        crate::netns::ensure_bpffs(&opts.pin_dir).map_err(io_err("mount bpffs"))?;
        let maps_dir = opts.pin_dir.join("maps");
        fs::create_dir_all(&maps_dir).map_err(io_err(format!("create {}", maps_dir.display())))?;
        fs::create_dir_all(opts.pin_dir.join("links/tc")).map_err(io_err("create links dir"))?;
        pins::check_pinned(&maps_dir, &opts.capacity)?;
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
            state: pins::agent_state(&maps_dir)?,
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

    /// What the agent recorded about the state in the maps: the revision and version of the
    /// config programmed last (zeros for new maps).
    pub fn agent_state(&self) -> Result<AgentState, DatapathError> {
        self.maps
            .state
            .get(&0, 0)
            .map_err(map_err(maps::AGENT_STATE))
    }

    /// Records the revision and version of the config now in the maps (it survives restarts
    /// with the pins).
    pub fn record_state(&mut self, state: AgentState) -> Result<(), DatapathError> {
        self.maps
            .state
            .set(0, state, 0)
            .map_err(map_err(maps::AGENT_STATE))
    }

    /// The current policy generation.
    pub fn generation(&self) -> u32 {
        self.config.generation
    }

    /// A loaded TC program.
    fn tc_program(&self, name: &str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or_else(|| DatapathError::Other(format!("program {name} missing")))?
            .try_into()
            .map_err(prog_err(name))
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

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Other(format!("program {name} missing from the object")))?;
    p.try_into().map_err(prog_err(format!("program {name}")))
}

pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Other(format!("map {name} missing from the object")))?;
    m.try_into().map_err(map_err(format!("map {name}")))
}
