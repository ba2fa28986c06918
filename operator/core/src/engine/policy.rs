//! Policy compilation: each MeshPolicy becomes rules over identity numbers (peers resolved,
//! rule ids from `cortexflow_domain::rule_id`), the pods it selects, and each pod's endpoint
//! policy (every rule of every policy selecting it; equal ones shared).
use super::*;

impl Engine {
    pub(super) fn recompile(&mut self, key: &ObjKey, d: &mut Dirty, up: &mut Update) {
        let old = self.policies.get(key).cloned();
        let old_compiled = old.as_ref().and_then(|o| o.compiled.clone());
        let Some(p) = self.snap.policies.get(key).cloned() else {
            // Deleted: everything it selected is dirty.
            if let Some(c) = old_compiled {
                d.pods.extend(c.selected.iter().cloned());
                for (id, _) in &c.refs {
                    self.rule_refs.remove(id);
                }
            }
            self.policies.remove(key);
            up.policies.insert(key.clone());
            return;
        };
        let number = self.alloc.get(&AllocKey::Policy(key.clone()));
        let (compiled, deps, accepted, resolved_refs, spec) = match number {
            None => (
                old_compiled.clone(),
                old.as_ref().map(|o| o.deps.clone()).unwrap_or_default(),
                None,
                None,
                old.as_ref().and_then(|o| o.spec.clone()),
            ),
            Some(number) => match self.compile(&p, number) {
                Ok((c, deps, missing)) => {
                    let resolved = if missing.is_empty() {
                        Cond::new(true, CondReason::ResolvedRefs, "every reference resolved")
                    } else {
                        Cond::new(
                            false,
                            CondReason::IdentityNotFound,
                            format!("not found: {}", missing.join(", ")),
                        )
                    };
                    (
                        Some(c),
                        deps,
                        Some(Cond::new(
                            true,
                            CondReason::Accepted,
                            "the policy is valid and compiled",
                        )),
                        Some(resolved),
                        Some(p.clone()),
                    )
                }
                Err(e) => {
                    // The last accepted generation, as the status records it, stays in force
                    // (it compiled once: what makes a spec invalid is the spec alone).
                    let last = p
                        .in_force
                        .as_deref()
                        .filter(|f| f.generation < p.generation)
                        .and_then(|f| Some((f, self.compile(f, number).ok()?)));
                    let not_compiled = Cond::new(
                        false,
                        CondReason::Invalid,
                        "the policy could not be compiled",
                    );
                    match last {
                        Some((f, (c, deps, _))) => (
                            Some(c),
                            deps,
                            Some(Cond::new(
                                false,
                                CondReason::Invalid,
                                format!(
                                    "{e}; generation {} (the last accepted) stays in force until this is fixed",
                                    f.generation
                                ),
                            )),
                            Some(not_compiled),
                            Some(f.clone()),
                        ),
                        None => (
                            None,
                            Deps::default(),
                            Some(Cond::new(
                                false,
                                CondReason::Invalid,
                                format!(
                                    "{e}; nothing of this policy is in force (no generation of it was accepted)"
                                ),
                            )),
                            Some(not_compiled),
                            None,
                        ),
                    }
                }
            },
        };
        let in_force = compiled.as_ref().and(spec.as_ref()).map(|s| InForce {
            generation: s.generation,
            spec_json: s.spec_json.clone(),
        });
        let status = PolicyStatus {
            generation: p.generation,
            pending: accepted.is_none(),
            accepted: accepted.unwrap_or_else(|| {
                Cond::new(false, CondReason::Pending, "waiting for a policy number")
            }),
            resolved_refs: resolved_refs.unwrap_or_else(|| {
                Cond::new(false, CondReason::Pending, "waiting for a policy number")
            }),
            in_force,
        };
        let enforcement_changed = compiled != old_compiled;
        if enforcement_changed {
            let before = old_compiled
                .as_ref()
                .map(|c| c.selected.clone())
                .unwrap_or_default();
            let after = compiled
                .as_ref()
                .map(|c| c.selected.clone())
                .unwrap_or_default();
            d.pods.extend(before.union(&after).cloned());
            if let Some(c) = &old_compiled {
                for (id, _) in &c.refs {
                    self.rule_refs.remove(id);
                }
            }
            if let Some(c) = &compiled {
                for (id, r) in &c.refs {
                    self.rule_refs.insert(*id, r.clone());
                }
            }
        }
        let changed_at = match &old {
            Some(o) if !enforcement_changed => o.changed_at,
            _ => self.version,
        };
        if old
            .as_ref()
            .is_none_or(|o| o.status != status || enforcement_changed)
        {
            up.policies.insert(key.clone());
        }
        self.policies.insert(
            key.clone(),
            PolicyState {
                compiled,
                spec,
                deps,
                status,
                changed_at,
            },
        );
    }

    /// Compiles a policy: the pods it selects, its rules with every reference resolved, what it
    /// depends on, and the references that resolve to nothing.
    pub(super) fn compile(
        &self,
        p: &MeshPolicy,
        number: u32,
    ) -> Result<(Compiled, Deps, Vec<String>), String> {
        if let Some(e) = &p.invalid {
            return Err(e.clone());
        }
        let selector = p
            .selector
            .as_ref()
            .map_err(|e| format!("spec.selector: {e}"))?;
        let ns = &p.key.namespace;
        let selected: BTreeSet<ObjKey> = self
            .pods_of(ns)
            .filter(|pod| pod.live() && selector.matches(&pod.labels))
            .map(|pod| pod.key.clone())
            .collect();
        let mut deps = Deps::default();
        let mut missing = BTreeSet::new();
        let mut compiled = Compiled {
            number,
            generation: p.generation,
            selected,
            ..Default::default()
        };
        for (dir, rules) in [
            (Direction::Ingress, &p.ingress),
            (Direction::Egress, &p.egress),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let field = format!("spec.{}[{i}]", dir.as_str());
                let peers = if r.peers.is_empty() {
                    Peers::Any
                } else {
                    let mut out = BTreeSet::new();
                    for (j, peer) in r.peers.iter().enumerate() {
                        let pfield = format!(
                            "{field}.{}[{j}]",
                            if dir == Direction::Ingress {
                                "from"
                            } else {
                                "to"
                            }
                        );
                        match peer {
                            PolicyPeer::Identity(r) => {
                                let key = r.resolve(ns);
                                deps.sids.insert(key.clone());
                                if !self.snap.sids.contains_key(&key) {
                                    missing.insert(format!("identity {key}"));
                                } else if let Some(id) = self.alloc.get(&AllocKey::Sid(key)) {
                                    out.insert(Peer::Identity(id));
                                }
                            }
                            PolicyPeer::ServiceAccount(r) => {
                                let key = r.resolve(ns);
                                deps.sas.insert(key.clone());
                                if let Some(id) = self.alloc.get(&AllocKey::Sa(key)) {
                                    out.insert(Peer::Identity(id));
                                }
                            }
                            PolicyPeer::NamespaceSelector(sel) => {
                                deps.namespace_selector = true;
                                let sel: &Selector = sel
                                    .as_ref()
                                    .map_err(|e| format!("{pfield}.namespaceSelector: {e}"))?;
                                for n in self
                                    .snap
                                    .namespaces
                                    .values()
                                    .filter(|n| sel.matches(&n.labels))
                                {
                                    if let Some(st) = self.ns.get(n.name.as_str()) {
                                        out.extend(
                                            st.identities.iter().map(|i| Peer::Identity(*i)),
                                        );
                                    }
                                }
                            }
                            PolicyPeer::IpBlock { cidr, except } => {
                                let c = cidr.parse().map_err(|e: cortexflow_domain::Invalid| {
                                    format!("{pfield}.ipBlock.cidr: {}", e.0)
                                })?;
                                let mut ex = Vec::new();
                                for (k, e) in except.iter().enumerate() {
                                    let e =
                                        e.parse().map_err(|e: cortexflow_domain::Invalid| {
                                            format!("{pfield}.ipBlock.except[{k}]: {}", e.0)
                                        })?;
                                    ex.push(e);
                                }
                                ex.sort();
                                ex.dedup();
                                out.insert(Peer::IpBlock {
                                    cidr: c,
                                    except: ex,
                                });
                            }
                        }
                    }
                    Peers::Only(out.into_iter().collect())
                };
                for pr in &r.ports {
                    if pr.first == 0 || pr.last < pr.first {
                        return Err(format!(
                            "{field}.ports: {}-{} is not a port range",
                            pr.first, pr.last
                        ));
                    }
                }
                let Some(id) = rule_id::encode(number, dir, i) else {
                    return Err(format!(
                        "more than {} rules in a direction",
                        rule_id::MAX_RULES_PER_DIRECTION
                    ));
                };
                let rule = Rule {
                    id,
                    action: p.action,
                    mode: p.mode,
                    peers,
                    ports: r.ports.clone(),
                };
                compiled.refs.push((
                    id,
                    RuleRef {
                        namespace: p.key.namespace.to_string(),
                        policy: p.key.name.to_string(),
                        direction: dir,
                        index: i as u32,
                    },
                ));
                match dir {
                    Direction::Ingress => compiled.ingress.push(rule),
                    Direction::Egress => compiled.egress.push(rule),
                }
            }
        }
        if p.ingress.len() > rule_id::MAX_RULES_PER_DIRECTION
            || p.egress.len() > rule_id::MAX_RULES_PER_DIRECTION
        {
            return Err(format!(
                "more than {} rules in a direction",
                rule_id::MAX_RULES_PER_DIRECTION
            ));
        }
        Ok((compiled, deps, missing.into_iter().collect()))
    }

    /// Updates which policies select `pod` (and their selected sets).
    pub(super) fn reselect_pod(&mut self, pod: &ObjKey) {
        let live = self.snap.pods.get(pod).filter(|p| p.live()).cloned();
        let mut now = BTreeSet::new();
        let start = ObjKey::new(pod.namespace.clone(), "");
        let keys: Vec<ObjKey> = self
            .policies
            .range(start..)
            .take_while(|(k, _)| k.namespace == pod.namespace)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let in_force = self.policies.get(&k).and_then(|st| st.spec.as_ref());
            let selects = match (&live, in_force) {
                (Some(p), Some(pol)) => pol.selector.as_ref().is_ok_and(|s| s.matches(&p.labels)),
                _ => false,
            };
            if let Some(c) = self
                .policies
                .get_mut(&k)
                .and_then(|st| st.compiled.as_mut())
            {
                if selects {
                    c.selected.insert(pod.clone());
                    now.insert(k.clone());
                } else {
                    c.selected.remove(pod);
                }
            }
        }
        if now.is_empty() {
            self.pod_policies.remove(pod);
        } else {
            let list = self.policy_lists.intern(now.into_iter().collect());
            self.pod_policies.insert(pod.clone(), list);
        }
    }

    /// The compiled policies selecting `pod`.
    pub(super) fn compiled_policies_of<'a>(
        &'a self,
        pod: &ObjKey,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Compiled)> {
        self.pod_policies
            .get(pod)
            .into_iter()
            .flat_map(|l| l.iter())
            .filter_map(|k| Some((k, self.policies.get(k)?.compiled.as_ref()?)))
    }

    /// The endpoint policy of a pod; pods with equal policies share one allocation.
    pub(super) fn endpoint_policy(&mut self, pod: &ObjKey) -> Option<Arc<EndpointPolicy>> {
        self.snap.pods.get(pod).filter(|p| p.live())?;
        let mut ep = EndpointPolicy::default();
        for (_, c) in self.compiled_policies_of(pod) {
            ep.ingress.extend(c.ingress.iter().cloned());
            ep.egress.extend(c.egress.iter().cloned());
        }
        if let Some(shared) = self.interned.get(&ep) {
            return Some(shared.clone());
        }
        let shared = Arc::new(ep);
        self.interned.insert(shared.clone());
        Some(shared)
    }
}
