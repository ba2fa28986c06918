//! What the datapath can tell about itself: packet counters, map usage, conntrack size, the
//! flow-event ring buffer, the programs' run-time statistics.
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use cortexflow_common::{Counter, POLICY_KEY_BITS, Reason, maps, programs};

use super::{Datapath, DatapathError, map_err, prog_err, take};

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

impl Datapath {
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
            let p = self.tc_program(name)?;
            let info = p.info().map_err(prog_err(name))?;
            out.push((name, info.run_time().as_nanos() as u64, info.run_count()));
        }
        Ok(out)
    }
}

pub(super) fn read_counters(
    map: &PerCpuArray<MapData, Counter>,
) -> Result<Counters, DatapathError> {
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
