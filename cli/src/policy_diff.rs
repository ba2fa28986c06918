//! `cfcli policy diff -f FILE`: before applying, what a MeshPolicy change would change.
//!
//! The file's policies are sent to the apiserver as a **dry run** (create, or replace of the
//! live object), so that what the apiserver would refuse is refused here, with its message, and
//! what it would store (defaults, generation, the status it keeps) is what is compared. The
//! operator's engine then compiles the live state twice — as it is, and with the change — and
//! every pair of live pods is evaluated on both compilations with the kernel's reference model
//! ([`cortexflow_domain::verdict`]): egress at the source, then ingress at the destination.
//!
//! Exact, not sampled: pods with the same identity and the same compiled policies (before and
//! after) are one class, and ports are split into the ranges on which no rule's port range
//! begins or ends, so one evaluation per (class pair, protocol, range) covers every pod pair and
//! every TCP and UDP port. What is listed: the (source identity, destination identity, protocol,
//! ports) whose verdict — allowed, audit (allowed, reported as a would-drop) or dropped —
//! changes. What is not: traffic to or from addresses outside the cluster (`ipBlock` peers, the
//! world identity), protocols other than TCP and UDP, and the host, which reaches local pods
//! whatever the policies say; the result names each of these that the change touches.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, bail};
use cortexflow_crds::MeshPolicy as MeshPolicyCr;
use cortexflow_domain::{
    Direction, EndpointPolicy, Protocol, RuleRef,
    verdict::{PeerAddr, Verdict, decide},
};
use cortexflow_operator_core::{Engine, ObjKey};
use kube::api::Api;
use serde::Serialize;

use crate::{connect::Cluster, live::Live};

/// What the file asks for one policy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyChange {
    pub namespace: String,
    pub name: String,
    /// `create`, `update` or `delete`.
    pub action: &'static str,
    /// Whether the operator would accept it (compile it); a refused generation leaves the last
    /// accepted one in force, and the diff shows that.
    pub accepted: bool,
    pub message: String,
}

/// One side of a pair: an identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct IdentityName {
    pub id: u32,
    /// `sid`, `sa`, or `reserved`.
    pub kind: String,
    /// `namespace/name`, or the reserved name.
    pub name: String,
}

/// What one direction of the evaluation decided.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Outcome {
    /// `allowed`, `audit` or `dropped`.
    pub verdict: &'static str,
    pub reason: &'static str,
    /// Where the deciding verdict is taken: `egress` (the source's node) or `ingress`.
    pub direction: &'static str,
    /// The deciding rule, `namespace/policy direction[index]`, when a rule decided.
    pub rule: Option<String>,
}

/// A (source, destination, protocol, ports) whose verdict changes.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PairChange {
    /// `allow` (dropped → allowed), `deny` (allowed → dropped), `audit` (allowed ↔ audit).
    pub change: &'static str,
    pub from: IdentityName,
    pub to: IdentityName,
    pub protocol: &'static str,
    pub first_port: u16,
    pub last_port: u16,
    pub before: Outcome,
    pub after: Outcome,
    /// How many (source pod, destination pod) pairs this covers, and one of them.
    pub pod_pairs: usize,
    pub example: (String, String),
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub policies: Vec<PolicyChange>,
    pub changes: Vec<PairChange>,
    /// What the change touches that the pairs do not show.
    pub notes: Vec<String>,
}

/// The file's MeshPolicies, as the apiserver would store them (dry run). With `delete`, the
/// objects the file names are the ones to delete (they must exist).
pub async fn read(
    cluster: &Cluster,
    path: &Path,
    default_namespace: &str,
    delete: bool,
) -> anyhow::Result<Vec<(ObjKey, Option<MeshPolicyCr>)>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read the policies from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
    };
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
        .map_err(|e| anyhow::anyhow!("{} is not YAML: {e}", path.display()))?;
    let mut out: Vec<(ObjKey, Option<MeshPolicyCr>)> = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let what = format!("{} document {}", path.display(), i + 1);
        let (api_version, kind) = (
            doc.get("apiVersion").and_then(|v| v.as_str()).unwrap_or(""),
            doc.get("kind").and_then(|v| v.as_str()).unwrap_or(""),
        );
        if api_version != "mesh.cortexflow.io/v1alpha1" || kind != "MeshPolicy" {
            bail!(
                "{what}: {api_version:?} {kind:?} is not a MeshPolicy (apiVersion mesh.cortexflow.io/v1alpha1): policy diff compares MeshPolicies only"
            );
        }
        let name = doc
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .with_context(|| format!("{what}: metadata.name is missing"))?
            .to_string();
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or(default_namespace)
            .to_string();
        let key = ObjKey::new(namespace.clone(), name.clone());
        if out.iter().any(|(k, _)| *k == key) {
            bail!("{what}: {namespace}/{name} appears twice in the file");
        }
        let api = Api::<MeshPolicyCr>::namespaced(cluster.client.clone(), &namespace);
        let live = api
            .get_opt(&name)
            .await
            .with_context(|| format!("read MeshPolicy {namespace}/{name}"))?;
        if delete {
            if live.is_none() {
                bail!(
                    "{what}: MeshPolicy {namespace}/{name} does not exist, so deleting it changes nothing"
                );
            }
            out.push((key, None));
            continue;
        }
        // The document as written (a typed parse would drop unknown fields): the apiserver
        // validates it strictly, as `kubectl apply` does, so a misspelt field is an error here.
        let mut doc = doc;
        // A replace names the version it replaces (custom resources require one): the live
        // object's, just read.
        if let Some(meta) = doc.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.insert("namespace".into(), namespace.clone().into());
            match live
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone())
            {
                Some(rv) => meta.insert("resourceVersion".into(), rv.into()),
                None => meta.remove("resourceVersion"),
            };
        }
        let base = format!("/apis/mesh.cortexflow.io/v1alpha1/namespaces/{namespace}/meshpolicies");
        let query = "dryRun=All&fieldManager=cfcli-policy-diff&fieldValidation=Strict";
        let body = serde_json::to_vec(&doc)?;
        let req = match live {
            None => http::Request::post(format!("{base}?{query}")),
            Some(_) => http::Request::put(format!("{base}/{name}?{query}")),
        }
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
        let stored: MeshPolicyCr = cluster.client.request(req).await.map_err(|e| match e {
            kube::Error::Api(ae) => anyhow::anyhow!(
                "the apiserver refuses MeshPolicy {namespace}/{name}: {}",
                ae.message
            ),
            e => anyhow::Error::from(e).context(format!("dry-run MeshPolicy {namespace}/{name}")),
        })?;
        out.push((key, Some(stored)));
    }
    if out.is_empty() {
        bail!("{} holds no MeshPolicy", path.display());
    }
    Ok(out)
}

/// A live pod as the engine compiled it.
struct Ep {
    ip: Ipv4Addr,
    identity: u32,
    policy: Arc<EndpointPolicy>,
}

/// Every live pod with an address, and the rule id → origin map, over all nodes.
fn endpoints(e: &Engine) -> (BTreeMap<String, Ep>, BTreeMap<u32, RuleRef>) {
    let (mut eps, mut rules) = (BTreeMap::new(), BTreeMap::new());
    for (_, node) in e.nodes() {
        let n = &node.endpoints;
        for ep in &n.endpoints {
            if let Some(policy) = n.policy_sets.get(&ep.policy_set) {
                eps.insert(
                    format!("{}/{}", ep.namespace, ep.name),
                    Ep {
                        ip: ep.ip,
                        identity: ep.identity,
                        policy: policy.clone(),
                    },
                );
            }
        }
        rules.extend(n.rules.iter().map(|(k, v)| (*k, v.clone())));
    }
    (eps, rules)
}

/// Pods with one identity and the same policies before and after.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ClassKey {
    identity: u32,
    before: Arc<EndpointPolicy>,
    after: Arc<EndpointPolicy>,
}

/// The range starts on which some rule's ports begin or end, per protocol (1 always).
fn cuts<'a>(policies: impl Iterator<Item = &'a EndpointPolicy>) -> BTreeMap<Protocol, Vec<u16>> {
    let mut out: BTreeMap<Protocol, BTreeSet<u16>> = [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .map(|p| (p, BTreeSet::from([1])))
        .collect();
    for p in policies {
        for r in p.ingress.iter().chain(&p.egress) {
            for pr in &r.ports {
                let s = out.entry(pr.protocol).or_default();
                s.insert(pr.first.max(1));
                if let Some(next) = pr.last.checked_add(1) {
                    s.insert(next);
                }
            }
        }
    }
    out.into_iter()
        .map(|(p, s)| (p, s.into_iter().collect()))
        .collect()
}

fn outcome(v: Verdict, dir: Direction, rules: &BTreeMap<u32, RuleRef>) -> Outcome {
    let rule_name = |id: u32| {
        (id != 0).then(|| match rules.get(&id) {
            Some(r) => format!(
                "{}/{} {}[{}]",
                r.namespace,
                r.policy,
                r.direction.as_str(),
                r.index
            ),
            None => format!("rule {id}"),
        })
    };
    match (v.allowed, v.audit) {
        (false, _) => Outcome {
            verdict: "dropped",
            reason: v.reason.name(),
            direction: dir.as_str(),
            rule: rule_name(v.rule),
        },
        (true, Some((reason, rule))) => Outcome {
            verdict: "audit",
            reason: reason.name(),
            direction: dir.as_str(),
            rule: rule_name(rule),
        },
        (true, None) => Outcome {
            verdict: "allowed",
            reason: v.reason.name(),
            direction: dir.as_str(),
            rule: rule_name(v.rule),
        },
    }
}

/// A connection from `src` to `dst` on (`proto`, `port`): egress at the source, then ingress
/// at the destination (docs/policy.md: both sides enforce).
fn evaluate(
    src: (&EndpointPolicy, Ipv4Addr, u32),
    dst: (&EndpointPolicy, Ipv4Addr, u32),
    proto: Protocol,
    port: u16,
    rules: &BTreeMap<u32, RuleRef>,
) -> Outcome {
    let peer = |ip, id| PeerAddr {
        addr: ip,
        cluster_identity: Some(id),
    };
    let eg = decide(
        src.0,
        Direction::Egress,
        &peer(dst.1, dst.2),
        proto.number(),
        port,
    );
    let ing = decide(
        dst.0,
        Direction::Ingress,
        &peer(src.1, src.2),
        proto.number(),
        port,
    );
    let (side, dir) = if !eg.allowed {
        (eg, Direction::Egress)
    } else if !ing.allowed || ing.audit.is_some() {
        (ing, Direction::Ingress)
    } else if eg.audit.is_some() || (ing.rule == 0 && eg.rule != 0) {
        (eg, Direction::Egress)
    } else {
        (ing, Direction::Ingress)
    };
    outcome(side, dir, rules)
}

fn change_kind(before: &str, after: &str) -> &'static str {
    match (before, after) {
        ("dropped", _) => "allow",
        (_, "dropped") => "deny",
        _ => "audit",
    }
}

/// (from, to, protocol, first port, last port, before, after): one listed change.
type PairKey = (
    IdentityName,
    IdentityName,
    Protocol,
    u16,
    u16,
    Outcome,
    Outcome,
);

/// The diff of `edits` on the live state.
pub fn diff(live: &Live, edits: &[(ObjKey, Option<MeshPolicyCr>)]) -> anyhow::Result<Diff> {
    let before = live.engine(&[])?;
    let borrowed: Vec<(ObjKey, Option<&MeshPolicyCr>)> =
        edits.iter().map(|(k, p)| (k.clone(), p.as_ref())).collect();
    let after = live.engine(&borrowed)?;

    let mut policies = Vec::new();
    let mut notes = Vec::new();
    for (key, obj) in edits {
        let exists = live.policies.iter().any(|p| {
            p.metadata.namespace.as_deref() == Some(&*key.namespace)
                && p.metadata.name.as_deref() == Some(&*key.name)
        });
        let (accepted, message) = match obj {
            None => (true, "deleted".to_string()),
            Some(_) => match after.policy_status(key) {
                Some(st) => (
                    st.accepted.status,
                    if st.accepted.status {
                        st.resolved_refs.message.clone()
                    } else {
                        st.accepted.message.clone()
                    },
                ),
                None => (false, "the engine did not compile it".to_string()),
            },
        };
        let touches_world = |p: &MeshPolicyCr| {
            p.spec
                .ingress
                .iter()
                .flat_map(|r| &r.from)
                .chain(p.spec.egress.iter().flat_map(|r| &r.to))
                .any(|peer| peer.ip_block.is_some())
        };
        let old = live.policies.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(&*key.namespace)
                && p.metadata.name.as_deref() == Some(&*key.name)
        });
        if obj.iter().chain(old).any(touches_world) {
            notes.push(format!(
                "{}/{} has ipBlock peers: traffic to and from addresses outside the cluster is not listed",
                key.namespace, key.name
            ));
        }
        policies.push(PolicyChange {
            namespace: key.namespace.to_string(),
            name: key.name.to_string(),
            action: match (obj, exists) {
                (None, _) => "delete",
                (Some(_), true) => "update",
                (Some(_), false) => "create",
            },
            accepted,
            message,
        });
    }

    let names: BTreeMap<u32, IdentityName> = before
        .identities_with_pods()
        .into_iter()
        .filter_map(|i| {
            Some((
                i.id?,
                IdentityName {
                    id: i.id?,
                    kind: i.kind.to_string(),
                    name: format!("{}/{}", i.namespace, i.name),
                },
            ))
        })
        .collect();
    let name_of = |id: u32| {
        names.get(&id).cloned().unwrap_or_else(|| IdentityName {
            id,
            kind: "reserved".into(),
            name: if id == 0 {
                "unknown".into()
            } else {
                format!("id {id}")
            },
        })
    };

    let (eps_before, rules_before) = endpoints(&before);
    let (eps_after, rules_after) = endpoints(&after);
    let mut classes: BTreeMap<ClassKey, Vec<(&str, Ipv4Addr)>> = BTreeMap::new();
    for (pod, b) in &eps_before {
        let Some(a) = eps_after.get(pod) else {
            continue;
        };
        classes
            .entry(ClassKey {
                identity: b.identity,
                before: b.policy.clone(),
                after: a.policy.clone(),
            })
            .or_default()
            .push((pod, b.ip));
    }
    let cuts = cuts(classes.keys().flat_map(|c| [&*c.before, &*c.after]));
    let mut merged: BTreeMap<PairKey, (usize, (String, String))> = BTreeMap::new();
    for (s, spods) in &classes {
        for (d, dpods) in &classes {
            let pairs = if s == d {
                spods.len() * spods.len().saturating_sub(1)
            } else {
                spods.len() * dpods.len()
            };
            if pairs == 0 {
                continue;
            }
            // A representative pair (peer matching is by identity, never by address).
            let (sp, sip) = spods[0];
            let (dp, dip) = if s == d { dpods[1] } else { dpods[0] };
            for (&proto, starts) in &cuts {
                let mut run: Option<(u16, u16, Outcome, Outcome)> = None;
                let mut flush = |run: &mut Option<(u16, u16, Outcome, Outcome)>| {
                    if let Some((lo, hi, b, a)) = run.take() {
                        let e = merged
                            .entry((
                                name_of(s.identity),
                                name_of(d.identity),
                                proto,
                                lo,
                                hi,
                                b,
                                a,
                            ))
                            .or_insert((0, (sp.to_string(), dp.to_string())));
                        e.0 += pairs;
                    }
                };
                for (i, &lo) in starts.iter().enumerate() {
                    let hi = starts.get(i + 1).map_or(u16::MAX, |n| n - 1);
                    let b = evaluate(
                        (&s.before, sip, s.identity),
                        (&d.before, dip, d.identity),
                        proto,
                        lo,
                        &rules_before,
                    );
                    let a = evaluate(
                        (&s.after, sip, s.identity),
                        (&d.after, dip, d.identity),
                        proto,
                        lo,
                        &rules_after,
                    );
                    if b.verdict == a.verdict {
                        flush(&mut run);
                        continue;
                    }
                    match &mut run {
                        Some((_, rhi, rb, ra)) if *rb == b && *ra == a && *rhi + 1 == lo => {
                            *rhi = hi
                        }
                        _ => {
                            flush(&mut run);
                            run = Some((lo, hi, b, a));
                        }
                    }
                }
                flush(&mut run);
            }
        }
    }
    let changes = merged
        .into_iter()
        .map(
            |((from, to, proto, first_port, last_port, before, after), (pod_pairs, example))| {
                PairChange {
                    change: change_kind(before.verdict, after.verdict),
                    from,
                    to,
                    protocol: match proto {
                        Protocol::Tcp => "TCP",
                        Protocol::Udp => "UDP",
                    },
                    first_port,
                    last_port,
                    before,
                    after,
                    pod_pairs,
                    example,
                }
            },
        )
        .collect();
    Ok(Diff {
        policies,
        changes,
        notes,
    })
}

fn ports(c: &PairChange) -> String {
    match (c.first_port, c.last_port) {
        (1, u16::MAX) => format!("{} any", c.protocol),
        (a, b) if a == b => format!("{} {a}", c.protocol),
        (a, b) => format!("{} {a}-{b}", c.protocol),
    }
}

fn show(o: &Outcome) -> String {
    let mut s = format!("{} {} ({}", o.verdict, o.reason, o.direction);
    if let Some(r) = &o.rule {
        s.push_str(&format!(" {r}"));
    }
    s.push(')');
    s
}

/// The diff for a terminal.
pub fn render(d: &Diff) -> String {
    let mut out = String::new();
    for p in &d.policies {
        out.push_str(&format!(
            "MeshPolicy {}/{}: {}{}\n",
            p.namespace,
            p.name,
            p.action,
            if p.accepted {
                String::new()
            } else {
                format!(" — the operator would refuse it: {}", p.message)
            }
        ));
    }
    for n in &d.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if d.changes.is_empty() {
        out.push_str("No verdict between live pods changes.\n");
        return out;
    }
    let allow = d.changes.iter().filter(|c| c.change == "allow").count();
    let deny = d.changes.iter().filter(|c| c.change == "deny").count();
    out.push_str(&format!(
        "{allow} become allowed, {deny} become denied, {} change audit only.\n\n",
        d.changes.len() - allow - deny
    ));
    let id = |i: &IdentityName| format!("{} ({})", i.name, i.id);
    let w_from = d
        .changes
        .iter()
        .map(|c| id(&c.from).len())
        .max()
        .unwrap_or(0)
        .max(4);
    let w_to = d
        .changes
        .iter()
        .map(|c| id(&c.to).len())
        .max()
        .unwrap_or(0)
        .max(2);
    let w_ports = d
        .changes
        .iter()
        .map(|c| ports(c).len())
        .max()
        .unwrap_or(0)
        .max(5);
    out.push_str(&format!(
        "{:<6}  {:<w_from$}  {:<w_to$}  {:<w_ports$}  {:>4}  NOW → AFTER\n",
        "CHANGE", "FROM", "TO", "PORTS", "PODS"
    ));
    for c in &d.changes {
        out.push_str(&format!(
            "{:<6}  {:<w_from$}  {:<w_to$}  {:<w_ports$}  {:>4}  {} → {}\n",
            c.change,
            id(&c.from),
            id(&c.to),
            ports(c),
            c.pod_pairs,
            show(&c.before),
            show(&c.after)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cortexflow_domain::{Action, Mode, Peer, Peers, PortRange, Rule};

    fn allow_from(id: u32, peer: u32, ports: Vec<PortRange>) -> EndpointPolicy {
        EndpointPolicy {
            ingress: vec![Rule {
                id,
                action: Action::Allow,
                mode: Mode::Enforce,
                peers: Peers::Only(vec![Peer::Identity(peer)]),
                ports,
            }],
            egress: vec![],
        }
    }

    #[test]
    fn cuts_split_at_every_range_edge() {
        let p = allow_from(
            1,
            300,
            vec![
                PortRange {
                    protocol: Protocol::Tcp,
                    first: 8000,
                    last: 8080,
                },
                PortRange {
                    protocol: Protocol::Udp,
                    first: 53,
                    last: 53,
                },
                PortRange {
                    protocol: Protocol::Tcp,
                    first: 65000,
                    last: 65535,
                },
            ],
        );
        let c = cuts([&p].into_iter());
        assert_eq!(c[&Protocol::Tcp], vec![1, 8000, 8081, 65000]);
        assert_eq!(c[&Protocol::Udp], vec![1, 53, 54]);
    }

    #[test]
    fn egress_drops_before_ingress_is_asked() {
        let rules = BTreeMap::new();
        let open = EndpointPolicy::default();
        let ing = allow_from(5, 300, vec![]);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        // 301 → pod with ingress from 300 only: dropped at ingress, default deny.
        let o = evaluate((&open, ip, 301), (&ing, ip, 302), Protocol::Tcp, 80, &rules);
        assert_eq!(
            (o.verdict, o.reason, o.direction),
            ("dropped", "default_deny", "ingress")
        );
        // 300 → it: allowed by rule 5 at ingress.
        let o = evaluate((&open, ip, 300), (&ing, ip, 302), Protocol::Tcp, 80, &rules);
        assert_eq!(
            (o.verdict, o.direction, o.rule.as_deref()),
            ("allowed", "ingress", Some("rule 5"))
        );
        // A source with an egress Deny for everything: dropped at egress whatever ingress says.
        let deny_all = EndpointPolicy {
            ingress: vec![],
            egress: vec![Rule {
                id: 9,
                action: Action::Deny,
                mode: Mode::Enforce,
                peers: Peers::Any,
                ports: vec![],
            }],
        };
        let o = evaluate(
            (&deny_all, ip, 300),
            (&ing, ip, 302),
            Protocol::Udp,
            53,
            &rules,
        );
        assert_eq!(
            (o.verdict, o.reason, o.direction),
            ("dropped", "policy_deny", "egress")
        );
    }
}
