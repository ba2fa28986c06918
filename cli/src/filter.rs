//! Which flows a command shows.
use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context as _, bail};
use cortexflow_proto::flows::v1;

/// One side of a flow, as `--from`/`--to` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSel {
    /// `NS/POD`: that pod (matched by name where the reporting node holds it, and by its
    /// addresses, which the Kubernetes API gives, everywhere else).
    Pod {
        namespace: String,
        pod: String,
        ips: BTreeSet<u32>,
    },
    /// `NS/` or `NS`: any pod of the namespace (and any identity of it).
    Namespace(String),
    /// `id:N` or `id:NS/NAME`: an identity by number or name (`host`, `world` too).
    Identity(IdSel),
    /// An IPv4 address.
    Ip(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdSel {
    Number(u32),
    Name(String),
}

/// Parses a `--from`/`--to` value (pods' addresses are filled in by [`PeerSel::resolve`]).
pub fn parse_peer(s: &str) -> anyhow::Result<PeerSel> {
    if let Some(id) = s.strip_prefix("id:") {
        if id.is_empty() {
            bail!("{s:?}: an identity needs a number or a name after id:");
        }
        return Ok(PeerSel::Identity(match id.parse::<u32>() {
            Ok(n) => IdSel::Number(n),
            Err(_) => IdSel::Name(id.to_string()),
        }));
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(PeerSel::Ip(u32::from(ip)));
    }
    match s.split_once('/') {
        Some((ns, "")) => Ok(PeerSel::Namespace(ns.to_string())),
        Some((ns, pod)) if !ns.is_empty() && !pod.contains('/') => Ok(PeerSel::Pod {
            namespace: ns.to_string(),
            pod: pod.to_string(),
            ips: BTreeSet::new(),
        }),
        None if !s.is_empty() => Ok(PeerSel::Namespace(s.to_string())),
        _ => bail!(
            "{s:?}: expected NAMESPACE/POD, NAMESPACE/, id:NUMBER, id:NAMESPACE/NAME or an IPv4 address"
        ),
    }
}

impl PeerSel {
    /// A pod's addresses from the Kubernetes API (a pod of another node appears in a flow by
    /// address only).
    pub async fn resolve(&mut self, client: &kube::Client) -> anyhow::Result<()> {
        if let PeerSel::Pod {
            namespace,
            pod,
            ips,
        } = self
        {
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(client.clone(), namespace);
            let p = api
                .get_opt(pod)
                .await?
                .with_context(|| format!("no pod {namespace}/{pod}"))?;
            for ip in p
                .status
                .into_iter()
                .flat_map(|s| s.pod_ips.unwrap_or_default())
            {
                if let Ok(a) = ip.ip.parse::<Ipv4Addr>() {
                    ips.insert(u32::from(a));
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, p: Option<&v1::FlowPeer>) -> bool {
        let Some(p) = p else { return false };
        match self {
            PeerSel::Pod {
                namespace,
                pod,
                ips,
            } => (p.namespace == *namespace && p.pod == *pod) || ips.contains(&p.ip),
            PeerSel::Namespace(ns) => {
                p.namespace == *ns
                    || p.identity_name
                        .split_once('/')
                        .is_some_and(|(n, _)| n == ns)
            }
            PeerSel::Identity(IdSel::Number(n)) => p.identity == *n,
            PeerSel::Identity(IdSel::Name(name)) => p.identity_name == *name,
            PeerSel::Ip(ip) => p.ip == *ip,
        }
    }
}

/// Every filter of `cfcli flows` (and of the flows `cfcli explain` looks at).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub from: Option<PeerSel>,
    pub to: Option<PeerSel>,
    pub verdicts: Vec<String>,
    pub reasons: Vec<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub nodes: Vec<String>,
    pub direction: Option<String>,
}

impl Filter {
    pub fn matches(&self, f: &v1::Flow) -> bool {
        self.from
            .as_ref()
            .is_none_or(|s| s.matches(f.source.as_ref()))
            && self
                .to
                .as_ref()
                .is_none_or(|s| s.matches(f.destination.as_ref()))
            && (self.verdicts.is_empty() || self.verdicts.contains(&f.verdict))
            && (self.reasons.is_empty() || self.reasons.contains(&f.reason))
            && self
                .port
                .is_none_or(|p| f.destination.as_ref().map(|d| d.port) == Some(u32::from(p)))
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&f.protocol))
            && (self.nodes.is_empty() || self.nodes.contains(&f.node))
            && self.direction.as_ref().is_none_or(|d| *d == f.direction)
    }
}

/// The verdicts the datapath reports (docs/policy.md).
pub const VERDICTS: [&str; 3] = cortexflow_common::VERDICT_NAMES;

/// The reasons the datapath reports, by their names (docs/policy.md, "Verdict reasons").
pub fn reasons() -> Vec<&'static str> {
    cortexflow_common::Reason::ALL
        .iter()
        .map(|r| r.name())
        .collect()
}

/// Checks `--verdict` and `--reason` values against the datapath's names.
pub fn check_names(verdicts: &[String], reasons: &[String]) -> anyhow::Result<()> {
    for v in verdicts {
        if !VERDICTS.contains(&v.as_str()) {
            bail!("--verdict {v:?}: one of {}", VERDICTS.join(", "));
        }
    }
    let known = self::reasons();
    for r in reasons {
        if !known.contains(&r.as_str()) {
            bail!("--reason {r:?}: one of {}", known.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ns: &str, pod: &str, ip: u32, id: u32, name: &str) -> v1::FlowPeer {
        v1::FlowPeer {
            ip,
            port: 8080,
            identity: id,
            identity_name: name.into(),
            namespace: ns.into(),
            pod: pod.into(),
        }
    }

    #[test]
    fn peer_selectors() {
        assert_eq!(
            parse_peer("shop/").unwrap(),
            PeerSel::Namespace("shop".into())
        );
        assert_eq!(
            parse_peer("shop").unwrap(),
            PeerSel::Namespace("shop".into())
        );
        assert_eq!(
            parse_peer("id:7").unwrap(),
            PeerSel::Identity(IdSel::Number(7))
        );
        assert_eq!(
            parse_peer("id:shop/frontend").unwrap(),
            PeerSel::Identity(IdSel::Name("shop/frontend".into()))
        );
        assert_eq!(parse_peer("10.0.0.1").unwrap(), PeerSel::Ip(0x0A00_0001));
        for bad in ["", "id:", "/pod", "a/b/c"] {
            assert!(parse_peer(bad).is_err(), "{bad:?}");
        }
        let local = peer("shop", "backend-1", 0x0A00_0002, 9, "shop/backend");
        let remote = peer("", "", 0x0A00_0002, 9, "shop/backend");
        let pod = PeerSel::Pod {
            namespace: "shop".into(),
            pod: "backend-1".into(),
            ips: [0x0A00_0002].into(),
        };
        assert!(pod.matches(Some(&local)) && pod.matches(Some(&remote)));
        let other = peer("", "", 0x0A00_0003, 9, "shop/backend");
        assert!(!pod.matches(Some(&other)));
        assert!(PeerSel::Namespace("shop".into()).matches(Some(&other)));
        assert!(!PeerSel::Namespace("batch".into()).matches(Some(&other)));
        assert!(PeerSel::Identity(IdSel::Number(9)).matches(Some(&other)));
        assert!(!PeerSel::Identity(IdSel::Name("shop/frontend".into())).matches(Some(&other)));
        assert!(!pod.matches(None));
    }

    #[test]
    fn filters_combine() {
        let f = v1::Flow {
            node: "n1".into(),
            direction: "ingress".into(),
            verdict: "dropped".into(),
            reason: "default_deny".into(),
            protocol: "TCP".into(),
            source: Some(peer("", "", 1, 5, "batch/etl")),
            destination: Some(peer("shop", "backend-1", 2, 9, "shop/backend")),
            ..Default::default()
        };
        let mut q = Filter {
            from: Some(parse_peer("batch/").unwrap()),
            to: Some(parse_peer("id:shop/backend").unwrap()),
            verdicts: vec!["dropped".into()],
            reasons: vec!["default_deny".into()],
            port: Some(8080),
            protocol: Some("tcp".into()),
            nodes: vec!["n1".into()],
            direction: Some("ingress".into()),
        };
        assert!(q.matches(&f));
        q.port = Some(80);
        assert!(!q.matches(&f));
        q.port = None;
        q.verdicts = vec!["allowed".into()];
        assert!(!q.matches(&f));
        assert!(check_names(&["dropped".into()], &["policy_deny".into()]).is_ok());
        assert!(check_names(&["denied".into()], &[]).is_err());
        assert!(check_names(&[], &["deny".into()]).is_err());
    }
}
