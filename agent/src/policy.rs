//! What the datapath enforces, in plain Rust: the per-endpoint policy the operator compiles
//! from MeshPolicies, and the **reference model** of the decision the kernel takes.
//!
//! The model is written from docs/policy.md, independently of how the kernel gets there (LPM
//! port prefixes, merged flags, CIDR identities, conntrack). A property test runs random
//! (policy, packet) cases through both and requires the same verdict, reason and rule.
use std::net::Ipv4Addr;

use cortexflow_common::{IDENTITY_HOST, IDENTITY_WORLD, PROTO_TCP, PROTO_UDP, Reason};

/// Allow or Deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

/// Enforce or Audit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Enforce,
    Audit,
}

/// Traffic direction, seen from the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The `DIR_*` constant of the shared types.
    pub const fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => cortexflow_common::DIR_INGRESS,
            Direction::Egress => cortexflow_common::DIR_EGRESS,
        }
    }
}

/// An IPv4 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// A prefix; the address is masked to `len` bits. `len` above 32 is an error.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, String> {
        if len > 32 {
            return Err(format!("prefix length {len} > 32"));
        }
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR"))?;
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
        Cidr::new(addr, len)
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods (or the host) carrying this numeric identity.
    Identity(u32),
    /// Addresses that are not cluster addresses, inside `cidr` and outside every `except`.
    IpBlock { cidr: Cidr, except: Vec<Cidr> },
}

/// The peers of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peers {
    /// Any peer (the rule lists none).
    Any,
    /// Exactly these (possibly none, e.g. when every reference is unresolved).
    Only(Vec<Peer>),
}

/// L4 protocol of a port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

/// An inclusive destination port range of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// One rule of one policy, in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// Non-zero id reported with verdicts (the operator maps it back to policy and rule).
    pub id: u32,
    pub action: Action,
    pub mode: Mode,
    pub peers: Peers,
    /// Empty: every port and protocol (including protocols other than TCP and UDP).
    pub ports: Vec<PortRange>,
}

/// Every rule of every policy that selects an endpoint. Endpoints with equal policies share one
/// policy set in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointPolicy {
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl EndpointPolicy {
    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// An Enforce-mode Allow policy has rules in `dir`: default-deny.
    pub fn default_deny(&self, dir: Direction) -> bool {
        self.rules(dir)
            .iter()
            .any(|r| r.action == Action::Allow && r.mode == Mode::Enforce)
    }

    /// An Audit-mode Allow policy has rules in `dir`.
    pub fn audit_default_deny(&self, dir: Direction) -> bool {
        self.rules(dir)
            .iter()
            .any(|r| r.action == Action::Allow && r.mode == Mode::Audit)
    }

    /// Some Enforce-mode policy has rules in `dir`: the endpoint is under enforcement.
    pub fn enforced(&self, dir: Direction) -> bool {
        self.rules(dir).iter().any(|r| r.mode == Mode::Enforce)
    }

    /// Some policy has rules in `dir`.
    pub fn policed(&self, dir: Direction) -> bool {
        !self.rules(dir).is_empty()
    }
}

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

impl Peer {
    fn matches(&self, peer: &PeerAddr) -> bool {
        match self {
            Peer::Identity(id) => peer.cluster_identity == Some(*id),
            Peer::IpBlock { cidr, except } => {
                peer.cluster_identity.is_none()
                    && cidr.contains(peer.addr)
                    && !except.iter().any(|e| e.contains(peer.addr))
            }
        }
    }
}

impl Rule {
    /// Whether the rule matches a connection to/from `peer` with IP protocol `protocol`
    /// and destination port `port`.
    pub fn matches(&self, peer: &PeerAddr, protocol: u8, port: u16) -> bool {
        let peer_ok = match &self.peers {
            Peers::Any => true,
            Peers::Only(list) => list.iter().any(|p| p.matches(peer)),
        };
        let port_ok = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|r| r.protocol.number() == protocol && (r.first..=r.last).contains(&port));
        peer_ok && port_ok
    }
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
            .filter(|r| r.action == action && r.mode == mode && r.matches(peer, protocol, port))
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
        assert!(r.matches(&ext([10, 2, 3, 4]), PROTO_TCP, 1));
        assert!(!r.matches(&ext([10, 1, 3, 4]), PROTO_TCP, 1));
        assert!(!r.matches(&ext([11, 0, 0, 1]), PROTO_TCP, 1));
        assert!(!r.matches(&pod(300), PROTO_TCP, 1));
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
        assert!(any_port.matches(&pod(300), 1, 0));
        assert!(!tcp_only.matches(&pod(300), 1, 0));
        assert!(!tcp_only.matches(&pod(300), PROTO_UDP, 53));
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
