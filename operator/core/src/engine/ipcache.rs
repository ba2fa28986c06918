//! The ipcache: every live pod's address → identity, with a change log so that a stream gets
//! only what changed since its last message.
use super::*;

impl Engine {
    /// Updates what a pod puts in the ipcache; returns whether the ipcache changed.
    pub(super) fn readdress(&mut self, pod: &ObjKey) -> bool {
        let new = self
            .snap
            .pods
            .get(pod)
            .filter(|p| p.live())
            .and_then(|p| Some((p.ip?, self.pod_identity(pod)?)));
        let old = self.pod_address.get(pod).copied();
        if new == old {
            return false;
        }
        let mut touched = BTreeSet::new();
        if let Some((ip, _)) = old {
            if let Some(o) = self.address_owners.get_mut(&ip) {
                o.retain(|k| k != pod);
                if o.is_empty() {
                    self.address_owners.remove(&ip);
                }
            }
            self.pod_address.remove(pod);
            touched.insert(ip);
        }
        if let Some((ip, id)) = new {
            let owners = self.address_owners.entry(ip).or_default();
            if let Err(i) = owners.binary_search(pod) {
                owners.insert(i, pod.clone());
            }
            self.pod_address.insert(pod.clone(), (ip, id));
            touched.insert(ip);
        }
        let mut changed = false;
        for ip in touched {
            // Two pods with one address (a recycled IP): the first by name wins, deterministically.
            let want = self
                .address_owners
                .get(&ip)
                .and_then(|o| o.first())
                .and_then(|p| self.pod_address.get(p))
                .map(|(_, id)| *id);
            let have = self.ipcache.get(&ip).copied();
            if want != have {
                match want {
                    Some(id) => self.ipcache.insert(ip, id),
                    None => self.ipcache.remove(&ip),
                };
                self.ipcache_log.push_back((self.version, ip, want));
                changed = true;
            }
        }
        while self.ipcache_log.len() > self.cfg.ipcache_log {
            if let Some((v, _, _)) = self.ipcache_log.pop_front() {
                self.ipcache_log_floor = self.ipcache_log_floor.max(v);
            }
        }
        changed
    }

    /// The whole ipcache and its version.
    pub fn ipcache(&self) -> (&BTreeMap<Ipv4Addr, u32>, u64) {
        (&self.ipcache, self.ipcache_version)
    }

    /// The ipcache changes after version `since`, or `None` when the log no longer reaches
    /// back that far (the subscriber needs the whole table).
    pub fn ipcache_since(&self, since: u64) -> Option<Ipcache> {
        if since >= self.ipcache_version {
            return Some(Ipcache::default());
        }
        if since < self.ipcache_log_floor {
            return None;
        }
        let mut latest: BTreeMap<Ipv4Addr, Option<u32>> = BTreeMap::new();
        for (v, ip, id) in &self.ipcache_log {
            if *v > since {
                latest.insert(*ip, *id);
            }
        }
        let mut delta = Ipcache::default();
        for (ip, id) in latest {
            match id {
                Some(id) => delta.upserts.push((ip, id)),
                None => delta.removals.push(ip),
            }
        }
        Some(delta)
    }

    /// The whole ipcache as a full section.
    pub fn ipcache_full(&self) -> Ipcache {
        Ipcache {
            full: true,
            upserts: self.ipcache.iter().map(|(ip, id)| (*ip, *id)).collect(),
            removals: Vec::new(),
        }
    }
}
