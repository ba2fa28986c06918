//! The **reference model** of the decision the kernel takes for a new connection, in plain
//! Rust, written from docs/policy.md independently of how the kernel gets there (LPM port
//! prefixes, merged flags, CIDR identities, conntrack). A property test of the agent runs random
//! (policy, packet) cases through the kernel and this model and requires the same verdict,
//! reason and rule; `cfcli policy diff` evaluates the operator's compiled policies with it.
use std::net::Ipv4Addr;

use cortexflow_common::{IDENTITY_HOST, IDENTITY_WORLD, Reason};

use crate::{Action, Direction, EndpointPolicy, Mode, Peer, Peers, Rule};

/// The peer of a connection as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub addr: Ipv4Addr,
    /// `Some(identity)` for cluster addresses (pods, and the node with identity host).
    pub cluster_identity: Option<u32>,
}

impl PeerAddr {
    /// The identity the datapath reports for the peer (world for non-cluster addresses; the
    /// kernel may report a finer CIDR identity, which the model does not predict).
    pub fn identity(&self) -> u32 {
        self.cluster_identity.unwrap_or(IDENTITY_WORLD)
    }
}

/// The outcome the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `VERDICT_ALLOWED` or `VERDICT_DROPPED` (the enforced outcome).
    pub allowed: bool,
    pub reason: Reason,
    /// Rule behind the verdict (0: none).
    pub rule: u32,
    /// When allowed: what Enforce and Audit policies together would do, if that is a drop.
    pub audit: Option<(Reason, u32)>,
}

fn peer_matches(p: &Peer, peer: &PeerAddr) -> bool {
    match p {
        Peer::Identity(id) => peer.cluster_identity == Some(*id),
        Peer::IpBlock { cidr, except } => {
            peer.cluster_identity.is_none()
                && cidr.contains(peer.addr)
                && !except.iter().any(|e| e.contains(peer.addr))
        }
    }
}

/// Whether `rule` matches a connection to/from `peer` with IP protocol `protocol` and
/// destination port `port`.
pub fn rule_matches(rule: &Rule, peer: &PeerAddr, protocol: u8, port: u16) -> bool {
    let peer_ok = match &rule.peers {
        Peers::Any => true,
        Peers::Only(list) => list.iter().any(|p| peer_matches(p, peer)),
    };
    let port_ok = rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|r| r.protocol.number() == protocol && (r.first..=r.last).contains(&port));
    peer_ok && port_ok
}

/// The decision for a new connection (TCP/UDP) or an untracked packet (other protocols,
/// `port` 0) in direction `dir` of an endpoint with policy `policy`. See docs/policy.md.
pub fn decide(
    policy: &EndpointPolicy,
    dir: Direction,
    peer: &PeerAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let allow = |reason, rule| Verdict {
        allowed: true,
        reason,
        rule,
        audit: None,
    };
    let drop = |reason, rule| Verdict {
        allowed: false,
        reason,
        rule,
        audit: None,
    };
    if dir == Direction::Ingress && peer.cluster_identity == Some(IDENTITY_HOST) {
        return allow(Reason::Host, 0);
    }
    if !policy.policed(dir) {
        return allow(Reason::NoPolicy, 0);
    }
    let first = |action: Action, mode: Mode| {
        policy
            .rules(dir)
            .iter()
            .filter(|r| {
                r.action == action && r.mode == mode && rule_matches(r, peer, protocol, port)
            })
            .map(|r| r.id)
            .min()
    };
    let deny = first(Action::Deny, Mode::Enforce);
    let allow_rule = first(Action::Allow, Mode::Enforce);
    let audit_deny = first(Action::Deny, Mode::Audit);
    let audit_allow = first(Action::Allow, Mode::Audit);
    let mut v = if let Some(id) = deny {
        drop(Reason::PolicyDeny, id)
    } else if let Some(id) = allow_rule {
        allow(Reason::PolicyAllow, id)
    } else if policy.default_deny(dir) {
        drop(Reason::DefaultDeny, 0)
    } else {
        allow(Reason::NoPolicy, 0)
    };
    if v.allowed {
        if let Some(id) = audit_deny {
            v.audit = Some((Reason::PolicyDeny, id));
        } else if (policy.default_deny(dir) || policy.audit_default_deny(dir))
            && allow_rule.is_none()
            && audit_allow.is_none()
        {
            v.audit = Some((Reason::DefaultDeny, 0));
        }
    }
    v
}

/// What happens to traffic the datapath cannot track per connection (IPv6, IPv4 fragments,
/// other network protocols): `Some(false)` dropped, `Some(true)` passed with an audit event,
/// `None` passed silently.
pub fn untrackable(policy: &EndpointPolicy, dir: Direction) -> Option<bool> {
    if policy.enforced(dir) {
        Some(false)
    } else if policy.policed(dir) {
        Some(true)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cidr, PortRange, Protocol};
    use cortexflow_common::{PROTO_TCP, PROTO_UDP};

    fn rule(id: u32, action: Action, mode: Mode, peers: Peers, ports: Vec<PortRange>) -> Rule {
        Rule {
            id,
            action,
            mode,
            peers,
            ports,
        }
    }
    fn tcp(first: u16, last: u16) -> PortRange {
        PortRange {
            protocol: Protocol::Tcp,
            first,
            last,
        }
    }
    fn pod(id: u32) -> PeerAddr {
        PeerAddr {
            addr: Ipv4Addr::new(10, 0, 0, 1),
            cluster_identity: Some(id),
        }
    }

    #[test]
    fn no_policy_passes() {
        let v = decide(
            &EndpointPolicy::default(),
            Direction::Ingress,
            &pod(300),
            PROTO_TCP,
            80,
        );
        assert!(v.allowed);
        assert_eq!(v.reason, Reason::NoPolicy);
    }

    #[test]
    fn allow_makes_default_deny_and_deny_beats_allow() {
        let p = EndpointPolicy {
            ingress: vec![
                rule(
                    5,
                    Action::Allow,
                    Mode::Enforce,
                    Peers::Only(vec![Peer::Identity(300)]),
                    vec![tcp(80, 80)],
                ),
                rule(
                    7,
                    Action::Deny,
                    Mode::Enforce,
                    Peers::Any,
                    vec![tcp(70, 90)],
                ),
            ],
            egress: vec![],
        };
        let v = decide(&p, Direction::Ingress, &pod(300), PROTO_TCP, 80);
        assert_eq!(
            (v.allowed, v.reason, v.rule),
            (false, Reason::PolicyDeny, 7)
        );
        let v = decide(&p, Direction::Ingress, &pod(301), PROTO_TCP, 443);
        assert_eq!((v.allowed, v.reason), (false, Reason::DefaultDeny));
        // Egress untouched.
        assert!(decide(&p, Direction::Egress, &pod(301), PROTO_TCP, 443).allowed);
    }

    #[test]
    fn host_always_reaches_the_pod() {
        let p = EndpointPolicy {
            ingress: vec![rule(1, Action::Deny, Mode::Enforce, Peers::Any, vec![])],
            egress: vec![],
        };
        let v = decide(
            &p,
            Direction::Ingress,
            &pod(IDENTITY_HOST),
            PROTO_TCP,
            10250,
        );
        assert_eq!((v.allowed, v.reason), (true, Reason::Host));
    }

    #[test]
    fn audit_reports_what_it_would_drop() {
        let p = EndpointPolicy {
            ingress: vec![rule(
                9,
                Action::Allow,
                Mode::Audit,
                Peers::Only(vec![Peer::Identity(300)]),
                vec![],
            )],
            egress: vec![],
        };
        let v = decide(&p, Direction::Ingress, &pod(301), PROTO_UDP, 53);
        assert_eq!((v.allowed, v.audit), (true, Some((Reason::DefaultDeny, 0))));
        let v = decide(&p, Direction::Ingress, &pod(300), PROTO_UDP, 53);
        assert_eq!((v.allowed, v.audit), (true, None));
    }

    #[test]
    fn ip_blocks_match_only_non_cluster_addresses_outside_excepts() {
        let block = Peer::IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        };
        let r = rule(
            1,
            Action::Allow,
            Mode::Enforce,
            Peers::Only(vec![block]),
            vec![],
        );
        let ext = |a: [u8; 4]| PeerAddr {
            addr: Ipv4Addr::from(a),
            cluster_identity: None,
        };
        assert!(rule_matches(&r, &ext([10, 2, 3, 4]), PROTO_TCP, 1));
        assert!(!rule_matches(&r, &ext([10, 1, 3, 4]), PROTO_TCP, 1));
        assert!(!rule_matches(&r, &ext([11, 0, 0, 1]), PROTO_TCP, 1));
        assert!(!rule_matches(&r, &pod(300), PROTO_TCP, 1));
    }

    #[test]
    fn empty_ports_cover_other_protocols_and_port_lists_do_not() {
        let any_port = rule(1, Action::Allow, Mode::Enforce, Peers::Any, vec![]);
        let tcp_only = rule(
            2,
            Action::Allow,
            Mode::Enforce,
            Peers::Any,
            vec![tcp(1, 65535)],
        );
        assert!(rule_matches(&any_port, &pod(300), 1, 0));
        assert!(!rule_matches(&tcp_only, &pod(300), 1, 0));
        assert!(!rule_matches(&tcp_only, &pod(300), PROTO_UDP, 53));
    }

    #[test]
    fn unresolved_peers_match_nothing_but_still_default_deny() {
        let p = EndpointPolicy {
            ingress: vec![rule(
                3,
                Action::Allow,
                Mode::Enforce,
                Peers::Only(vec![]),
                vec![],
            )],
            egress: vec![],
        };
        let v = decide(&p, Direction::Ingress, &pod(300), PROTO_TCP, 80);
        assert_eq!((v.allowed, v.reason), (false, Reason::DefaultDeny));
    }

    #[test]
    fn cidrs_parse_mask_and_cover() {
        let c: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.covers(&"10.1.128.0/17".parse().unwrap()));
        assert!(!c.covers(&"10.0.0.0/8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!(
            Cidr::new(Ipv4Addr::UNSPECIFIED, 0)
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
    }
}
