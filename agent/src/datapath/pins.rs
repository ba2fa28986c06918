//! Pinned maps: the check that a pinned map matches what this agent would create (layout and
//! size, from `cortexflow_common::MAP_SPECS`), and a read-only view of a pinned datapath for
//! other processes.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{Array, HashMap, MapData, MapInfo, PerCpuArray};
use cortexflow_common::{
    AgentState, Counter, DatapathConfig, EndpointInfo, IpcacheValue, MAP_SPECS, maps,
};

use super::{Capacity, Counters, DatapathError, map_err, stats::read_counters};

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

/// Pinned maps are reused as they are: refuse to start when their layout or size differs from
/// what this agent would create, instead of running with other capacities or misreading values.
/// The agent's state map: the pinned one, or a new one pinned now. Refused when a pin of
/// another layout is there.
pub(super) fn agent_state(maps_dir: &Path) -> Result<Array<MapData, AgentState>, DatapathError> {
    let path = maps_dir.join(maps::AGENT_STATE);
    if !path.exists() {
        let new: Array<MapData, AgentState> =
            Array::create(1, 0).map_err(map_err(format!("create {}", maps::AGENT_STATE)))?;
        new.pin(&path)
            .map_err(|e| DatapathError::Other(format!("pin {}: {e}", path.display())))?;
    }
    let info =
        MapInfo::from_pin(&path).map_err(map_err(format!("inspect pinned {}", path.display())))?;
    let want = std::mem::size_of::<AgentState>() as u32;
    if info.value_size() != want {
        return Err(DatapathError::PinnedMismatch {
            map: maps::AGENT_STATE,
            path,
            what: "value size",
            have: info.value_size(),
            want,
        });
    }
    let data =
        MapData::from_pin(&path).map_err(map_err(format!("open pinned {}", path.display())))?;
    aya::maps::Map::from_map_data(data)
        .map_err(map_err(maps::AGENT_STATE))?
        .try_into()
        .map_err(map_err(maps::AGENT_STATE))
}

pub(super) fn check_pinned(maps_dir: &Path, capacity: &Capacity) -> Result<(), DatapathError> {
    let sizes = capacity.sizes();
    for spec in MAP_SPECS {
        let path = maps_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .map_err(map_err(format!("inspect pinned {}", path.display())))?;
        // Configurable maps must have the configured size; fixed ones (counters, config) the
        // object's.
        let entries = sizes
            .iter()
            .find(|(n, _)| *n == spec.name)
            .map_or(spec.default_entries, |(_, s)| *s);
        let mismatch = [
            ("key size", info.key_size(), spec.key_size),
            ("value size", info.value_size(), spec.value_size),
            ("capacity", info.max_entries(), entries),
        ]
        .into_iter()
        .find(|(_, have, want)| have != want);
        if let Some((what, have, want)) = mismatch {
            return Err(DatapathError::PinnedMismatch {
                map: spec.name,
                path,
                what,
                have,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/architecture.md's map table states every map's default size: it must be the size
    /// the kernel object is built with.
    #[test]
    fn the_docs_map_table_gives_the_default_sizes() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md"),
        )
        .expect("docs/architecture.md");
        for spec in MAP_SPECS {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", spec.name)))
                .unwrap_or_else(|| panic!("no row for {} in the map table", spec.name));
            let size = row.split('|').nth(4).expect("a size column").trim();
            let entries = match size.strip_suffix(" MiB") {
                Some(mib) => mib.trim().parse::<u32>().expect("MiB") << 20,
                None => size.replace(' ', "").parse().expect("a number"),
            };
            assert_eq!(
                entries, spec.default_entries,
                "{}: the docs say {size}",
                spec.name
            );
        }
    }
}
