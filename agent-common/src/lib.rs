//! Types shared by the kernel programs (`cortexflow-ebpf`) and user space (`cortexflow-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit integer widths, no `bool`, no `Option` and no
//! implicit padding (padding is spelled out as `_pad` fields and always zero), so that the kernel
//! and user space agree on the byte layout of every map key and value. With the `user` feature
//! the types implement `aya::Pod`. Addresses are IPv4 in network byte order (as they sit in the
//! packet); ports are in network byte order too, except inside [`PolicyKey`], where the port is
//! big-endian bytes so that the LPM trie can match port prefixes.
//!
//! docs/architecture.md describes every map: key, value, size and who writes it.
#![cfg_attr(not(test), no_std)]

/// Default bpffs directory under which the agent pins maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/cortexflow";

/// Names of the maps (≤ 15 characters, the kernel's limit).
pub mod maps {
    /// Host-side veth ifindex → [`EndpointInfo`](super::EndpointInfo) (hash).
    pub const ENDPOINTS: &str = "CF_ENDPOINTS";
    /// Pod or node IPv4 → [`IpcacheValue`](super::IpcacheValue) (hash).
    pub const IPCACHE: &str = "CF_IPCACHE";
    /// IPv4 prefix → CIDR identity of addresses that are not cluster pods (LPM trie).
    pub const CIDRS: &str = "CF_CIDRS";
    /// [`PolicyKey`](super::PolicyKey) prefix → [`PolicyValue`](super::PolicyValue) (LPM trie):
    /// port ranges and rules without ports.
    pub const POLICY: &str = "CF_POLICY";
    /// [`PolicyKey`](super::PolicyKey) → [`PolicyValue`](super::PolicyValue) (hash): single
    /// ports, looked up first so that their cost does not grow with the number of rules.
    pub const POLICY_EXACT: &str = "CF_POLICY_EXACT";
    /// [`CtKey`](super::CtKey) → [`CtValue`](super::CtValue) (LRU hash).
    pub const CONNTRACK: &str = "CF_CT";
    /// [`ServiceKey`](super::ServiceKey) → [`ServiceValue`](super::ServiceValue) (hash).
    pub const SERVICES: &str = "CF_SERVICES";
    /// [`BackendKey`](super::BackendKey) → [`BackendValue`](super::BackendValue) (hash).
    pub const BACKENDS: &str = "CF_BACKENDS";
    /// [`RevNatKey`](super::RevNatKey) → [`RevNatValue`](super::RevNatValue) (LRU hash).
    pub const REVNAT: &str = "CF_REVNAT";
    /// Counter index → [`Counter`](super::Counter) (per-CPU array).
    pub const COUNTERS: &str = "CF_COUNTERS";
    /// [`FlowEvent`](super::FlowEvent) ring buffer.
    pub const EVENTS: &str = "CF_EVENTS";
    /// Index 0 → [`DatapathConfig`](super::DatapathConfig) (array of one).
    pub const CONFIG: &str = "CF_CONFIG";
    /// Index 0 → [`AgentState`](super::AgentState) (array of one): the agent's, not the
    /// programs' (not in [`ALL`] or [`MAP_SPECS`](super::MAP_SPECS)).
    pub const AGENT_STATE: &str = "CF_AGENT_STATE";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 12] = [
        ENDPOINTS,
        IPCACHE,
        CIDRS,
        POLICY,
        POLICY_EXACT,
        CONNTRACK,
        SERVICES,
        BACKENDS,
        REVNAT,
        COUNTERS,
        EVENTS,
        CONFIG,
    ];
}

/// Default capacity (entries; bytes for the ring buffer) of every map. The kernel object is
/// built with these sizes and the agent's `--map-*` flags default to them; the agent sets the
/// real size of every configurable map when it creates it.
pub mod capacity {
    pub const ENDPOINTS: u32 = 1024;
    pub const IPCACHE: u32 = 65536;
    pub const CIDRS: u32 = 4096;
    pub const POLICY: u32 = 65536;
    pub const POLICY_EXACT: u32 = 131072;
    pub const CONNTRACK: u32 = 262144;
    pub const SERVICES: u32 = 4096;
    pub const BACKENDS: u32 = 65536;
    pub const REVNAT: u32 = 65536;
    /// Fixed: one slot per (verdict, reason).
    pub const COUNTERS: u32 = super::COUNTER_SLOTS;
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Fixed: one [`DatapathConfig`](super::DatapathConfig).
    pub const CONFIG: u32 = 1;
}

/// The layout of one map: what a pinned map must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    /// Key size in bytes (an LPM trie key counts its 4-byte prefix length).
    pub key_size: u32,
    pub value_size: u32,
    /// The size it is built with (see [`capacity`]).
    pub default_entries: u32,
    /// Whether the agent sizes it from its configuration.
    pub configurable: bool,
}

const fn spec<K, V>(name: &'static str, default_entries: u32, configurable: bool) -> MapSpec {
    MapSpec {
        name,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        default_entries,
        configurable,
    }
}

/// The key of an LPM trie map: a 4-byte prefix length, then the data.
#[repr(C)]
pub struct LpmKey<T> {
    pub prefix_len: u32,
    pub data: T,
}

/// Every map's layout, in [`maps::ALL`] order. The kernel programs declare their maps with
/// these types, names and default sizes; the agent checks pinned maps against this table.
pub const MAP_SPECS: [MapSpec; 12] = [
    spec::<u32, EndpointInfo>(maps::ENDPOINTS, capacity::ENDPOINTS, true),
    spec::<u32, IpcacheValue>(maps::IPCACHE, capacity::IPCACHE, true),
    spec::<LpmKey<CidrKey>, CidrValue>(maps::CIDRS, capacity::CIDRS, true),
    spec::<LpmKey<PolicyKey>, PolicyValue>(maps::POLICY, capacity::POLICY, true),
    spec::<PolicyKey, PolicyValue>(maps::POLICY_EXACT, capacity::POLICY_EXACT, true),
    spec::<CtKey, CtValue>(maps::CONNTRACK, capacity::CONNTRACK, true),
    spec::<ServiceKey, ServiceValue>(maps::SERVICES, capacity::SERVICES, true),
    spec::<BackendKey, BackendValue>(maps::BACKENDS, capacity::BACKENDS, true),
    spec::<RevNatKey, RevNatValue>(maps::REVNAT, capacity::REVNAT, true),
    spec::<u32, Counter>(maps::COUNTERS, capacity::COUNTERS, false),
    spec::<(), ()>(maps::EVENTS, capacity::EVENTS_BYTES, true),
    spec::<u32, DatapathConfig>(maps::CONFIG, capacity::CONFIG, false),
];

/// `a == b` in a constant context (the kernel crate checks its map names against [`maps`]).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const _: () = {
    let mut i = 0;
    while i < MAP_SPECS.len() {
        assert!(str_eq(MAP_SPECS[i].name, maps::ALL[i]));
        // The kernel limits map names to 15 characters.
        assert!(MAP_SPECS[i].name.len() <= 15);
        i += 1;
    }
};

/// Names of the kernel programs.
pub mod programs {
    /// TC program on the ingress hook of a pod's host-side veth: packets the pod sends
    /// (the pod's egress direction).
    pub const FROM_POD: &str = "cf_from_pod";
    /// TC program on the egress hook of a pod's host-side veth: packets delivered to the pod
    /// (the pod's ingress direction).
    pub const TO_POD: &str = "cf_to_pod";
    /// cgroup `connect4`: Service load balancing for TCP and connected UDP.
    pub const CONNECT4: &str = "cf_connect4";
    /// cgroup `sendmsg4`: Service load balancing for unconnected UDP.
    pub const SENDMSG4: &str = "cf_sendmsg4";
    /// cgroup `recvmsg4`: reverse translation so that UDP replies come from the Service address.
    pub const RECVMSG4: &str = "cf_recvmsg4";
}

// ---- identities ------------------------------------------------------------------------------

/// In a [`PolicyKey`]: any identity.
pub const IDENTITY_ANY: u32 = 0;
/// A cluster pod whose identity number is not known yet (its key has no number yet, and it
/// had none before). The same value as [`IDENTITY_ANY`] on purpose: as a peer such a pod
/// matches only the entries of rules that admit any peer, never a rule naming identities.
pub const IDENTITY_UNKNOWN: u32 = 0;
/// The node itself (kubelet probes). Always reaches local pods.
pub const IDENTITY_HOST: u32 = 1;
/// An address that is neither a cluster pod nor inside any CIDR used by a policy.
pub const IDENTITY_WORLD: u32 = 2;
/// Identities up to this value are reserved.
pub const IDENTITY_RESERVED_MAX: u32 = 255;
/// CIDR identities (addresses that are not pods, by the most specific policy CIDR containing
/// them) are local to a node and allocated from this value up; cluster identities stay below.
pub const IDENTITY_CIDR_BASE: u32 = 0xFF00_0000;
/// The first identity the operator allocates (ServiceIdentities and service accounts).
pub const IDENTITY_FIRST_ALLOCATED: u32 = IDENTITY_RESERVED_MAX + 1;
/// The last identity the operator may allocate: the ones above are node-local CIDR identities.
pub const IDENTITY_LAST_ALLOCATED: u32 = IDENTITY_CIDR_BASE - 1;

const _: () = {
    assert!(IDENTITY_ANY == 0 && IDENTITY_HOST <= IDENTITY_RESERVED_MAX);
    assert!(IDENTITY_WORLD <= IDENTITY_RESERVED_MAX);
    assert!(IDENTITY_FIRST_ALLOCATED <= IDENTITY_LAST_ALLOCATED);
};

// ---- directions and protocols ----------------------------------------------------------------

/// Traffic arriving at the endpoint.
pub const DIR_INGRESS: u8 = 0;
/// Traffic the endpoint sends.
pub const DIR_EGRESS: u8 = 1;

/// Protocol key for anything that is neither TCP nor UDP (ICMP, SCTP, …): matched only by
/// rules that cover every port and protocol.
pub const PROTO_OTHER: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

// ---- endpoints -------------------------------------------------------------------------------

/// A local pod, keyed by the ifindex of its host-side veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// The pod's IPv4 address (network order). Packets from the pod must carry it.
    pub ip: u32,
    /// The pod's numeric identity.
    pub identity: u32,
    /// The policy set that applies to the pod ([`PolicyKey::policy_set`]).
    pub policy_set: u32,
    /// `EP_*` flags.
    pub flags: u32,
}

/// Enforce-mode Allow policies with ingress rules select the pod: ingress is default-deny.
pub const EP_INGRESS_DEFAULT_DENY: u32 = 1 << 0;
/// Enforce-mode Allow policies with egress rules select the pod: egress is default-deny.
pub const EP_EGRESS_DEFAULT_DENY: u32 = 1 << 1;
/// Audit-mode Allow policies with ingress rules select the pod.
pub const EP_INGRESS_AUDIT_DEFAULT_DENY: u32 = 1 << 2;
/// Audit-mode Allow policies with egress rules select the pod.
pub const EP_EGRESS_AUDIT_DEFAULT_DENY: u32 = 1 << 3;
/// Some Enforce-mode policy (Allow or Deny) with ingress rules selects the pod: the pod is
/// under ingress enforcement (IPv6, fragments and other non-trackable traffic are dropped).
pub const EP_INGRESS_ENFORCED: u32 = 1 << 4;
/// As [`EP_INGRESS_ENFORCED`], for egress.
pub const EP_EGRESS_ENFORCED: u32 = 1 << 5;
/// Some policy (either mode) with ingress rules selects the pod.
pub const EP_INGRESS_POLICED: u32 = 1 << 6;
/// Some policy (either mode) with egress rules selects the pod.
pub const EP_EGRESS_POLICED: u32 = 1 << 7;

/// The `EP_*` flags of one direction, so that code can be written once for both.
#[derive(Clone, Copy, Debug)]
pub struct DirFlags {
    pub default_deny: u32,
    pub audit_default_deny: u32,
    pub enforced: u32,
    pub policed: u32,
}

impl DirFlags {
    /// The flags of direction `dir` ([`DIR_INGRESS`] or [`DIR_EGRESS`]).
    pub const fn of(dir: u8) -> Self {
        if dir == DIR_INGRESS {
            Self {
                default_deny: EP_INGRESS_DEFAULT_DENY,
                audit_default_deny: EP_INGRESS_AUDIT_DEFAULT_DENY,
                enforced: EP_INGRESS_ENFORCED,
                policed: EP_INGRESS_POLICED,
            }
        } else {
            Self {
                default_deny: EP_EGRESS_DEFAULT_DENY,
                audit_default_deny: EP_EGRESS_AUDIT_DEFAULT_DENY,
                enforced: EP_EGRESS_ENFORCED,
                policed: EP_EGRESS_POLICED,
            }
        }
    }
}

// ---- identities of addresses -----------------------------------------------------------------

/// Identity of a cluster address (pod IPs; the node's own IPs with [`IDENTITY_HOST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    /// For a pod on this node: the ifindex of its host-side veth, so that traffic between two
    /// local pods is delivered straight into the destination pod (see docs/architecture.md,
    /// "Same-node delivery"). 0 for every other address.
    pub ifindex: u32,
}

/// Data of an LPM key of [`maps::CIDRS`]: an IPv4 address (network order bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrKey {
    pub addr: [u8; 4],
}

/// The CIDR identity of a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrValue {
    pub identity: u32,
}

// ---- policy ----------------------------------------------------------------------------------

/// Data of an LPM key of [`maps::POLICY`]. The first 80 bits (policy set, identity, direction,
/// protocol) are always matched in full; the port is matched on a prefix of
/// [`POLICY_KEY_FIXED_BITS`]` + 0..=16` bits, so that one entry covers an aligned port range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Big-endian bytes of the policy set id.
    pub policy_set: [u8; 4],
    /// Big-endian bytes of the peer identity ([`IDENTITY_ANY`] for rules without peers).
    pub identity: [u8; 4],
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_OTHER`].
    pub protocol: u8,
    /// Destination port, big-endian (0 for [`PROTO_OTHER`]).
    pub port: [u8; 2],
}

/// Bits of a [`PolicyKey`] before the port.
pub const POLICY_KEY_FIXED_BITS: u32 = 80;
/// Bits of a whole [`PolicyKey`].
pub const POLICY_KEY_BITS: u32 = 96;

impl PolicyKey {
    pub const fn new(
        policy_set: u32,
        identity: u32,
        direction: u8,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            policy_set: policy_set.to_be_bytes(),
            identity: identity.to_be_bytes(),
            direction,
            protocol,
            port: port.to_be_bytes(),
        }
    }
}

/// What the rules covering one (policy set, identity, direction, protocol, port range) say.
/// Entries for narrower port ranges already include the flags of the wider ranges that contain
/// them (the LPM trie returns only the longest match).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// `POLICY_*` flags.
    pub flags: u32,
    /// The rule id behind each flag, indexed by [`RULE_ALLOW`] … [`RULE_AUDIT_DENY`]
    /// (the lowest matching id; 0 when the flag is clear).
    pub rules: [u32; 4],
}

/// An Enforce-mode Allow rule matches.
pub const POLICY_ALLOW: u32 = 1 << 0;
/// An Enforce-mode Deny rule matches.
pub const POLICY_DENY: u32 = 1 << 1;
/// An Audit-mode Allow rule matches.
pub const POLICY_AUDIT_ALLOW: u32 = 1 << 2;
/// An Audit-mode Deny rule matches.
pub const POLICY_AUDIT_DENY: u32 = 1 << 3;

pub const RULE_ALLOW: usize = 0;
pub const RULE_DENY: usize = 1;
pub const RULE_AUDIT_ALLOW: usize = 2;
pub const RULE_AUDIT_DENY: usize = 3;

// ---- connection tracking ---------------------------------------------------------------------

/// A flow at one endpoint, the same for both of its directions: the endpoint's address and
/// port, the peer's address and port, the protocol. One lookup finds the entry for a packet
/// going either way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ep_addr: u32,
    pub peer_addr: u32,
    pub ep_port: u16,
    pub peer_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// State of an accepted flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns` at creation.
    pub created_ns: u64,
    /// Last time a packet refreshed the entry (updated at most once per second).
    pub seen_ns: u64,
    /// [`DatapathConfig::generation`] when the verdict was taken; a packet that finds an older
    /// generation re-evaluates the flow against the current policy.
    pub generation: u32,
    /// Rule that allowed the flow (0: no rule, the endpoint is not default-deny).
    pub rule: u32,
    /// Identity of the peer when the verdict was taken.
    pub peer_identity: u32,
    /// Verdict reason ([`Reason`] as `u16`).
    pub reason: u16,
    /// Direction of the packet that opened the flow ([`DIR_INGRESS`]: the peer opened it).
    pub origin: u8,
    /// TCP close: [`CT_FIN_ORIGIN`] and [`CT_FIN_REPLY`] once each side sent its FIN.
    pub closing: u8,
}

/// [`CtValue::closing`]: the side that opened the flow sent a FIN.
pub const CT_FIN_ORIGIN: u8 = 1;
/// [`CtValue::closing`]: the other side sent a FIN.
pub const CT_FIN_REPLY: u8 = 2;
/// TCP header flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// How often, at most, a packet rewrites [`CtValue::seen_ns`].
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

// ---- services --------------------------------------------------------------------------------

/// A Service frontend: ClusterIP, port (network order) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// A Service's current backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Id of the backend table ([`BackendKey::table`]); a new table gets a new id.
    pub table: u32,
    /// Slots in the table; 0 = no backend (connects fail with ECONNREFUSED).
    pub slots: u32,
}

/// One slot of a backend table. Backends fill slots in proportion to their weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub table: u32,
    pub slot: u32,
}

/// A backend address and port (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A UDP socket's translated peer: socket cookie, backend address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The Service address the application addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
}

// ---- verdicts, reasons, counters, events -----------------------------------------------------

/// The packet (or connection) was forwarded.
pub const VERDICT_ALLOWED: u8 = 0;
/// The packet was dropped (or the connect refused).
pub const VERDICT_DROPPED: u8 = 1;
/// Forwarded, but Audit-mode policies would have dropped it.
pub const VERDICT_AUDIT: u8 = 2;
/// Number of verdicts.
pub const VERDICTS: u32 = 3;

/// Why a verdict was taken.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The endpoint is not default-deny in this direction and no Deny rule matched.
    NoPolicy = 1,
    /// An Allow rule matched.
    PolicyAllow = 2,
    /// The peer is the node itself (always allowed in).
    Host = 3,
    /// A packet of an accepted flow, in its original direction.
    Established = 4,
    /// A reply of an accepted flow.
    Reply = 5,
    /// Not IP (ARP, …), or IP not addressed to the endpoint: passed.
    NotIp = 6,
    /// The interface is not a CortexFlow endpoint.
    Unmanaged = 7,
    /// A Deny rule matched.
    PolicyDeny = 8,
    /// Default-deny: no Allow rule matched.
    DefaultDeny = 9,
    /// IPv6 (or another non-IPv4 network protocol) to or from an enforced endpoint.
    Ipv6 = 10,
    /// An IPv4 fragment to or from an enforced endpoint.
    Fragment = 11,
    /// The pod sent a packet whose source is not its own address.
    Spoofed = 12,
    /// Headers too short to read.
    Malformed = 13,
    /// A Service connect with no backend (refused with ECONNREFUSED).
    NoBackend = 14,
    /// A Service connect translated to a backend.
    ServiceTranslated = 15,
    /// An ICMP error (unreachable, fragmentation needed, time exceeded, parameter problem)
    /// about a packet of a tracked flow: passed like its replies.
    Related = 16,
}

/// Number of reason slots (reasons are `1..REASONS`). Room for reasons to come, so that adding
/// one does not change the size of the pinned counters map.
pub const REASONS: u32 = 32;

impl Reason {
    /// Every reason, in order.
    pub const ALL: [Reason; 16] = [
        Reason::NoPolicy,
        Reason::PolicyAllow,
        Reason::Host,
        Reason::Established,
        Reason::Reply,
        Reason::NotIp,
        Reason::Unmanaged,
        Reason::PolicyDeny,
        Reason::DefaultDeny,
        Reason::Ipv6,
        Reason::Fragment,
        Reason::Spoofed,
        Reason::Malformed,
        Reason::NoBackend,
        Reason::ServiceTranslated,
        Reason::Related,
    ];

    /// The reason with this number.
    pub const fn from_u8(v: u8) -> Option<Reason> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u8 == v {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// A short, stable, lowercase name (a metric label value).
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NoPolicy => "no_policy",
            Reason::PolicyAllow => "policy_allow",
            Reason::Host => "host",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::NotIp => "not_ip",
            Reason::Unmanaged => "unmanaged",
            Reason::PolicyDeny => "policy_deny",
            Reason::DefaultDeny => "default_deny",
            Reason::Ipv6 => "ipv6",
            Reason::Fragment => "fragment",
            Reason::Spoofed => "spoofed",
            Reason::Malformed => "malformed",
            Reason::NoBackend => "no_backend",
            Reason::ServiceTranslated => "service_translated",
            Reason::Related => "related",
        }
    }
}

/// The name of every verdict, in order ([`verdict_name`] of 0, 1, 2).
pub const VERDICT_NAMES: [&str; VERDICTS as usize] = ["allowed", "dropped", "audit"];

/// Name of a verdict (a metric label value).
pub const fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_ALLOWED => "allowed",
        VERDICT_DROPPED => "dropped",
        _ => "audit",
    }
}

/// Index of the counter of (verdict, reason) in [`maps::COUNTERS`].
pub const fn counter_index(verdict: u8, reason: Reason) -> u32 {
    verdict as u32 * REASONS + reason as u32
}

/// Size of [`maps::COUNTERS`].
pub const COUNTER_SLOTS: u32 = VERDICTS * REASONS;

/// Packets and bytes of one (verdict, reason), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// One flow event: a verdict on a new flow, or a drop. Never one per packet of an accepted
/// flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number (6, 17, 1, …).
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    /// [`Reason`] as `u8`.
    pub reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The rule behind the verdict (0: none).
    pub rule: u32,
    /// Host-side ifindex of the endpoint.
    pub ifindex: u32,
}

// ---- global configuration --------------------------------------------------------------------

/// Global datapath settings (index 0 of [`maps::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Bumped by the agent whenever policy or identities change; flows accepted under an older
    /// generation are re-evaluated on their next packet.
    pub generation: u32,
    /// `CFG_*` flags.
    pub flags: u32,
}

/// Emit flow events for allowed new flows (drops and audit verdicts are always reported).
pub const CFG_EVENTS_ALLOWED: u32 = 1 << 0;

// ---- the agent's own state -------------------------------------------------------------------

/// What the agent remembers across restarts about the state in the maps (index 0 of the pinned
/// array [`maps::AGENT_STATE`], which only the agent reads and writes: the kernel programs do not
/// know it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AgentState {
    /// The cluster revision of the config programmed last (0: unknown).
    pub revision: u64,
    /// Its version on the stream it came from.
    pub version: u64,
}

// The layouts both sides rely on, checked wherever this crate compiles (the kernel build too):
// a field added without its padding fails here, not in the verifier or as misread values.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<EndpointInfo>() == 16);
    assert!(size_of::<IpcacheValue>() == 8);
    assert!(size_of::<CidrKey>() == 4);
    assert!(size_of::<CidrValue>() == 4);
    assert!(size_of::<PolicyKey>() == 12);
    assert!(POLICY_KEY_BITS as usize == size_of::<PolicyKey>() * 8);
    assert!(size_of::<PolicyValue>() == 20);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 32);
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<ServiceValue>() == 8);
    assert!(size_of::<BackendKey>() == 8);
    assert!(size_of::<BackendValue>() == 8);
    assert!(size_of::<RevNatKey>() == 16);
    assert!(size_of::<RevNatValue>() == 8);
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<FlowEvent>() == 40);
    assert!(size_of::<DatapathConfig>() == 8);
    assert!(size_of::<AgentState>() == 16);
    assert!(size_of::<LpmKey<PolicyKey>>() == 16);
    assert!(size_of::<LpmKey<CidrKey>>() == 8);
};

impl FlowEvent {
    /// Reads an event from ring-buffer bytes (the kernel wrote the struct as is); `None` when
    /// the record is shorter than the struct.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < core::mem::size_of::<Self>() {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: `b` holds at least `size_of::<FlowEvent>()` bytes; FlowEvent is `repr(C)`,
        // made only of integers with no implicit padding, so every bit pattern is a valid value;
        // `read_unaligned` makes no alignment assumption about the ring buffer's bytes.
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and integer arrays, with all
    // padding spelled out as fields, so any bit pattern is valid and no byte is uninitialised.
    macro_rules! pod {
        ($($t:ty),*) => { $( unsafe impl aya::Pod for $t {} )* };
    }
    pod!(
        EndpointInfo,
        IpcacheValue,
        CidrKey,
        CidrValue,
        PolicyKey,
        PolicyValue,
        CtKey,
        CtValue,
        ServiceKey,
        ServiceValue,
        BackendKey,
        BackendValue,
        RevNatKey,
        RevNatValue,
        Counter,
        FlowEvent,
        DatapathConfig,
        AgentState
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_are_the_names_of_the_verdict_numbers() {
        for (i, n) in VERDICT_NAMES.iter().enumerate() {
            assert_eq!(verdict_name(i as u8), *n);
        }
        assert_eq!(
            [VERDICT_ALLOWED, VERDICT_DROPPED, VERDICT_AUDIT].map(verdict_name),
            VERDICT_NAMES
        );
    }

    #[test]
    fn flow_events_decode_from_the_bytes_the_kernel_writes() {
        let e = FlowEvent {
            timestamp_ns: 0x0102_0304_0506_0708,
            saddr: 0x0a00_0001,
            daddr: 0x0a00_0002,
            sport: 40000,
            dport: 80,
            protocol: PROTO_TCP,
            direction: DIR_EGRESS,
            verdict: VERDICT_DROPPED,
            reason: Reason::DefaultDeny as u8,
            src_identity: 300,
            dst_identity: 301,
            rule: 65,
            ifindex: 7,
        };
        // The bytes as the kernel lays them out (native endian, field by field, no padding).
        let mut b = Vec::new();
        b.extend_from_slice(&e.timestamp_ns.to_ne_bytes());
        b.extend_from_slice(&e.saddr.to_ne_bytes());
        b.extend_from_slice(&e.daddr.to_ne_bytes());
        b.extend_from_slice(&e.sport.to_ne_bytes());
        b.extend_from_slice(&e.dport.to_ne_bytes());
        b.extend_from_slice(&[e.protocol, e.direction, e.verdict, e.reason]);
        for v in [e.src_identity, e.dst_identity, e.rule, e.ifindex] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        // Unaligned, as a record can sit in the ring.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&b);
        assert_eq!(FlowEvent::from_bytes(&shifted[1..]), Some(e));
        assert_eq!(FlowEvent::from_bytes(&b[..39]), None);
    }

    #[test]
    fn reasons_round_trip_and_fit_the_counters() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u8(r as u8), Some(r));
            assert!((r as u32) < REASONS);
        }
        assert_eq!(Reason::from_u8(0), None);
        assert!(counter_index(VERDICT_AUDIT, Reason::ServiceTranslated) < COUNTER_SLOTS);
    }
}
