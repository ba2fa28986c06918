//! Writing the desired state: compile it into exact map contents, check that everything fits
//! (refused whole, naming the map, when it does not), then write the difference in an order
//! that never shows a packet a half-applied policy (docs/architecture.md, "Applying a config").
use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use cortexflow_common::{BackendKey, CFG_EVENTS_ALLOWED, CidrKey, POLICY_KEY_BITS, maps};

use super::{ApplyStats, Datapath, DatapathError, map_err};
use crate::compile::{self, DesiredState, MapContents};

impl Datapath {
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

    /// Guards one pod interface at once, outside a config (the CNI hook, before the pod's
    /// container starts): an endpoint of identity `unknown` with no policy — anti-spoofing
    /// only — unless the interface already has an endpoint. The next [`Datapath::apply`] takes
    /// it over like any other entry. An entry of another address (an interface index that
    /// belonged to a gone pod) is replaced.
    pub fn guard_endpoint(
        &mut self,
        ifindex: u32,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), DatapathError> {
        if self
            .installed
            .endpoints
            .get(&ifindex)
            .is_some_and(|e| e.ip == compile::net_u32(ip))
        {
            return Ok(());
        }
        let info = cortexflow_common::EndpointInfo {
            ip: compile::net_u32(ip),
            identity: cortexflow_common::IDENTITY_UNKNOWN,
            policy_set: 0,
            flags: 0,
        };
        self.maps
            .endpoints
            .insert(ifindex, info, 0)
            .map_err(map_err(maps::ENDPOINTS))?;
        self.installed.endpoints.insert(ifindex, info);
        Ok(())
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

    /// Checks that `want` fits every map at the peak of the update; nothing is written when it
    /// does not. New entries are written before old ones are deleted (so that no packet sees a
    /// half-applied state), so every map briefly holds what it keeps, what is new, and what
    /// goes.
    fn check_capacity(&self, want: &MapContents) -> Result<(), DatapathError> {
        fn all<K>(_: &K) -> bool {
            true
        }
        fn peak<K: Ord, V>(
            want: &BTreeMap<K, V>,
            have: &BTreeMap<K, V>,
            of: impl Fn(&K) -> bool,
        ) -> usize {
            want.keys().filter(|k| of(k)).count()
                + have
                    .keys()
                    .filter(|k| of(k) && !want.contains_key(k))
                    .count()
        }
        let (c, have) = (&self.opts.capacity, &self.installed);
        let exact = |k: &(u32, compile::PolicyKeyBytes)| k.0 == POLICY_KEY_BITS;
        for (map, needed, capacity) in [
            (
                maps::ENDPOINTS,
                peak(&want.endpoints, &have.endpoints, all),
                c.endpoints,
            ),
            (
                maps::IPCACHE,
                peak(&want.ipcache, &have.ipcache, all),
                c.ipcache,
            ),
            (maps::CIDRS, peak(&want.cidrs, &have.cidrs, all), c.cidrs),
            (
                maps::POLICY,
                peak(&want.policy, &have.policy, |k| !exact(k)),
                c.policy,
            ),
            (
                maps::POLICY_EXACT,
                peak(&want.policy, &have.policy, exact),
                c.policy_exact,
            ),
            (
                maps::SERVICES,
                peak(&want.services, &have.services, all),
                c.services,
            ),
            (
                maps::BACKENDS,
                peak(&want.backends, &have.backends, all),
                c.backends,
            ),
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

    /// Makes the maps hold `desired`, or leaves them holding what they held: refused whole
    /// (nothing written) when it does not fit, and rolled back to the previous contents when a
    /// write fails half-way (another writer, kernel memory).
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, DatapathError> {
        let mut alloc = self.alloc.clone();
        let c = &self.opts.capacity;
        let limits = compile::Limits {
            cidrs: c.cidrs as usize,
            policy: c.policy as usize,
            policy_exact: c.policy_exact as usize,
            backends: c.backends as usize,
        };
        let want = compile::compile(desired, &mut alloc, limits)?;
        self.check_capacity(&want)?;
        let have = self.installed.clone();
        let mut stats = ApplyStats::default();
        let Err(write) = self.write_diff(&have, &want, &mut stats) else {
            // Only the agent writes these maps: they hold what it wrote.
            self.installed = want;
            alloc.retain_used(desired);
            self.alloc = alloc;
            return Ok(stats);
        };
        // Half written: write the previous contents back, in the same safe order (the
        // generation is bumped again, so flows accepted meanwhile are decided again).
        let undo = self.read_installed().and_then(|now| {
            let now = now.restricted_to(&have, &want);
            self.write_diff(&now, &have, &mut ApplyStats::default())
        });
        match undo {
            Ok(()) => {
                self.installed = have;
                Err(DatapathError::RolledBack {
                    write: Box::new(write),
                })
            }
            Err(undo) => {
                // Both partly in the kernel: keep every id either may use, so that no id is
                // given to something else while entries of it remain.
                self.installed = self.read_installed().unwrap_or_default();
                self.alloc = alloc;
                Err(DatapathError::RollbackFailed {
                    write: Box::new(write),
                    undo: Box::new(undo),
                })
            }
        }
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
}
