//! Input: changes absorbed into the snapshot, each marking dirty what it can affect.
use super::*;

impl Engine {
    pub(super) fn absorb(&mut self, c: Change, d: &mut Dirty) {
        match c {
            Change::Apply(o) => self.upsert(o, d),
            Change::Delete(kind, key) => self.delete(kind, &key, d),
            Change::Reset(kind, objs) => {
                let keep: BTreeSet<ObjKey> = objs.iter().map(Object::key).collect();
                for key in self.keys_of(kind) {
                    if !keep.contains(&key) {
                        self.delete(kind, &key, d);
                    }
                }
                for o in objs {
                    self.upsert(o, d);
                }
            }
            Change::TableUnreadable { why, watermark } => {
                // Keep every number in use: the leader writes the table again from them.
                self.table_problem = Some(why);
                if let Some((identities, policies)) = watermark {
                    // Counters never go below what was handed out, whatever happens next.
                    self.alloc.next_identity = self.alloc.next_identity.max(identities);
                    self.alloc.next_policy = self.alloc.next_policy.max(policies);
                    self.table_lost = self.alloc.ids.is_empty();
                }
            }
            Change::Allocations(mut a) => {
                if self.table_lost {
                    // A restored table: its numbers are the old ones; the counters stay at
                    // least where the watermark put them.
                    a.next_identity = a.next_identity.max(self.alloc.next_identity);
                    a.next_policy = a.next_policy.max(self.alloc.next_policy);
                } else if let Err(why) = a.check_successor(&self.alloc) {
                    self.table_problem = Some(format!("the id table read was refused: {why}"));
                    return;
                }
                self.table_problem = None;
                self.table_lost = false;
                let old = std::mem::replace(&mut self.alloc, a);
                let changed: BTreeSet<&AllocKey> = old
                    .ids
                    .iter()
                    .filter(|(k, v)| self.alloc.get(k) != Some(**v))
                    .map(|(k, _)| k)
                    .chain(
                        self.alloc
                            .ids
                            .iter()
                            .filter(|(k, v)| old.get(k) != Some(**v))
                            .map(|(k, _)| k),
                    )
                    .collect();
                for k in changed {
                    match k {
                        AllocKey::Sid(key) | AllocKey::Sa(key) => {
                            // The pods carrying the key change identity.
                            if let Some(st) = self.ns.get(&key.namespace) {
                                for (pod, pk) in &st.pod_keys {
                                    if pk == k {
                                        d.pods.insert(pod.clone());
                                        d.addresses.insert(pod.clone());
                                    }
                                }
                            }
                            d.namespaces.insert(key.namespace.clone());
                            if matches!(k, AllocKey::Sid(_)) {
                                d.sids.insert(key.clone());
                            }
                            for (p, st) in &self.policies {
                                if st.deps.sids.contains(key) || st.deps.sas.contains(key) {
                                    d.policies.insert(p.clone());
                                }
                            }
                        }
                        AllocKey::Policy(k) => {
                            d.policies.insert(k.clone());
                        }
                    }
                }
            }
        }
    }

    pub(super) fn keys_of(&self, kind: Kind) -> Vec<ObjKey> {
        match kind {
            Kind::Namespace => self
                .snap
                .namespaces
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
                .collect(),
            Kind::Pod => self.snap.pods.keys().cloned().collect(),
            Kind::ServiceIdentity => self.snap.sids.keys().cloned().collect(),
            Kind::MeshPolicy => self.snap.policies.keys().cloned().collect(),
            Kind::Service => self.snap.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.snap.slices.keys().cloned().collect(),
            Kind::Node => self
                .snap
                .nodes
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
                .collect(),
        }
    }

    pub(super) fn policies_with_namespace_selectors(&self, d: &mut Dirty) {
        for (k, st) in &self.policies {
            if st.deps.namespace_selector {
                d.policies.insert(k.clone());
            }
        }
    }

    pub(super) fn policies_referring_to_sid(&self, sid: &ObjKey, d: &mut Dirty) {
        for (k, st) in &self.policies {
            if st.deps.sids.contains(sid) {
                d.policies.insert(k.clone());
            }
        }
    }

    pub(super) fn upsert(&mut self, o: Object, d: &mut Dirty) {
        match o {
            Object::Namespace(n) => {
                if self.snap.namespaces.get(&n.name) != Some(&n) {
                    self.snap.namespaces.insert(n.name.clone(), n);
                    self.policies_with_namespace_selectors(d);
                }
            }
            Object::Pod(mut p) => {
                self.share(&mut p);
                let key = p.key.clone();
                let old = self.snap.pods.insert(key.clone(), p.clone());
                if old.as_ref() == Some(&p) {
                    return;
                }
                if let Some(n) = old.as_ref().and_then(|o| o.node.clone()) {
                    if let Some(set) = self.pods_by_node.get_mut(&n) {
                        set.remove(&key);
                    }
                    d.nodes.insert(n);
                }
                if let Some(n) = &p.node {
                    self.pods_by_node
                        .entry(n.clone())
                        .or_default()
                        .insert(key.clone());
                    d.nodes.insert(n.clone());
                }
                d.namespaces.insert(key.namespace.clone());
                d.pods.insert(key.clone());
                d.addresses.insert(key);
            }
            Object::ServiceIdentity(s) => {
                let key = s.key.clone();
                if self.snap.sids.get(&key) == Some(&s) {
                    return;
                }
                self.snap.sids.insert(key.clone(), s);
                d.namespaces.insert(key.namespace.clone());
                d.sids.insert(key.clone());
                self.policies_referring_to_sid(&key, d);
            }
            Object::MeshPolicy(p) => {
                let key = p.key.clone();
                if self.snap.policies.get(&key) == Some(&p) {
                    return;
                }
                self.snap.policies.insert(key.clone(), p);
                d.policies.insert(key);
            }
            Object::Service(s) => {
                if self.snap.services.get(&s.key) != Some(&s) {
                    self.snap.services.insert(s.key.clone(), s);
                    d.services = true;
                }
            }
            Object::EndpointSlice(s) => {
                if self.snap.slices.get(&s.key) != Some(&s) {
                    self.snap.slices.insert(s.key.clone(), s);
                    d.services = true;
                }
            }
            Object::Node(n) => {
                if self.snap.nodes.get(&n.name) != Some(&n) {
                    d.nodes.insert(n.name.as_str().into());
                    self.snap.nodes.insert(n.name.clone(), n);
                }
            }
        }
    }

    /// Replaces a pod's strings and labels by the shared copies.
    pub(super) fn share(&mut self, p: &mut Pod) {
        let take = std::mem::take::<Arc<str>>;
        p.key.namespace = self.strs.intern(take(&mut p.key.namespace));
        p.service_account = self.strs.intern(take(&mut p.service_account));
        p.node = p.node.take().map(|n| self.strs.intern(n));
        p.labels = self.labels.intern(std::mem::take(&mut p.labels));
    }

    pub(super) fn delete(&mut self, kind: Kind, key: &ObjKey, d: &mut Dirty) {
        match kind {
            Kind::Namespace => {
                if self.snap.namespaces.remove(&*key.name).is_some() {
                    self.policies_with_namespace_selectors(d);
                }
            }
            Kind::Pod => {
                if let Some(old) = self.snap.pods.remove(key) {
                    if let Some(n) = old.node {
                        if let Some(set) = self.pods_by_node.get_mut(&n) {
                            set.remove(key);
                        }
                        d.nodes.insert(n);
                    }
                    d.namespaces.insert(key.namespace.clone());
                    d.pods.insert(key.clone());
                    d.addresses.insert(key.clone());
                }
            }
            Kind::ServiceIdentity => {
                if self.snap.sids.remove(key).is_some() {
                    d.namespaces.insert(key.namespace.clone());
                    d.sids.insert(key.clone());
                    self.policies_referring_to_sid(key, d);
                }
            }
            Kind::MeshPolicy => {
                if self.snap.policies.remove(key).is_some() {
                    d.policies.insert(key.clone());
                }
            }
            Kind::Service => {
                if self.snap.services.remove(key).is_some() {
                    d.services = true;
                }
            }
            Kind::EndpointSlice => {
                if self.snap.slices.remove(key).is_some() {
                    d.services = true;
                }
            }
            Kind::Node => {
                if self.snap.nodes.remove(&*key.name).is_some() {
                    d.nodes.insert(key.name.clone());
                }
            }
        }
    }
}
