//! CortexFlow kernel programs.
//!
//! * `cf_from_pod` / `cf_to_pod` — TC (tcx or clsact) on the host side of every local pod's
//!   veth: identity-based policy for the pod's egress and ingress, with connection tracking.
//! * `cf_connect4` / `cf_sendmsg4` / `cf_recvmsg4` — cgroup sock_addr: Service load balancing at
//!   the socket.
//!
//! Built for `bpfel-unknown-none` by `agent/build.rs` (aya-build) and embedded in the agent.
//! Every program is a thin entry point around logic that cannot panic: every packet read goes
//! through `bpf_skb_load_bytes` with its error handled, every map lookup handles absence, and no
//! arithmetic can overflow or divide by zero. The exact semantics are in docs/policy.md; the maps
//! are described in docs/architecture.md.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_redirect_peer,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use cortexflow_common::{
    BackendKey, BackendValue, CFG_EVENTS_ALLOWED, CT_FIN_ORIGIN, CT_FIN_REPLY, CT_REFRESH_NS,
    CidrKey, CidrValue, Counter, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, DatapathConfig, DirFlags,
    EndpointInfo, FlowEvent, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, IpcacheValue,
    POLICY_ALLOW, POLICY_AUDIT_ALLOW, POLICY_AUDIT_DENY, POLICY_DENY, POLICY_KEY_BITS, PROTO_OTHER,
    PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, RULE_ALLOW, RULE_AUDIT_DENY, RULE_DENY, Reason,
    RevNatKey, RevNatValue, ServiceKey, ServiceValue, TCP_FIN, TCP_RST, VERDICT_ALLOWED,
    VERDICT_AUDIT, VERDICT_DROPPED, capacity, counter_index, maps,
};

// Every map is declared with its name, types and default size from `cortexflow-common` (the
// agent sets the size of the configurable ones at load time); `pinned_map!` checks the name
// against the shared table at compile time.
macro_rules! pinned_map {
    ($name:tt = $common:expr, $static:ident: $ty:ty = $init:expr) => {
        const _: () = assert!(cortexflow_common::str_eq($name, $common));
        #[map(name = $name)]
        static $static: $ty = $init;
    };
}

pinned_map!("CF_ENDPOINTS" = maps::ENDPOINTS,
    ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0));
pinned_map!("CF_IPCACHE" = maps::IPCACHE,
    IPCACHE: HashMap<u32, IpcacheValue> = HashMap::pinned(capacity::IPCACHE, 0));
pinned_map!("CF_CIDRS" = maps::CIDRS,
    CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(capacity::CIDRS, 0));
pinned_map!("CF_POLICY" = maps::POLICY,
    POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0));
pinned_map!("CF_POLICY_EXACT" = maps::POLICY_EXACT,
    POLICY_EXACT: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY_EXACT, 0));
pinned_map!("CF_CT" = maps::CONNTRACK,
    CONNTRACK: LruHashMap<CtKey, CtValue> =
        LruHashMap::pinned(capacity::CONNTRACK, BPF_F_NO_COMMON_LRU));
pinned_map!("CF_SERVICES" = maps::SERVICES,
    SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(capacity::SERVICES, 0));
pinned_map!("CF_BACKENDS" = maps::BACKENDS,
    BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(capacity::BACKENDS, 0));
pinned_map!("CF_REVNAT" = maps::REVNAT,
    REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(capacity::REVNAT, 0));
pinned_map!("CF_COUNTERS" = maps::COUNTERS,
    COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(capacity::COUNTERS, 0));
pinned_map!("CF_EVENTS" = maps::EVENTS,
    EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0));
pinned_map!("CF_CONFIG" = maps::CONFIG,
    CONFIG: Array<DatapathConfig> = Array::pinned(capacity::CONFIG, 0));

/// Per-CPU LRU lists: inserting a flow takes no lock shared between CPUs.
const BPF_F_NO_COMMON_LRU: u32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IP_MF_OR_OFFSET: u16 = 0x3fff;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Type, code, checksum and 4 bytes of the ICMP header before the quoted datagram.
const ICMP_HLEN: usize = 8;
const ECONNREFUSED: i32 = 111;

/// tcx: let the next program (or the stack) decide; clsact direct-action: continue.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;

/// The fixed part of an IPv4 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// What the policy says about one connection (or untracked packet).
#[derive(Clone, Copy)]
struct Decision {
    verdict: u8,
    reason: Reason,
    rule: u32,
    /// Set when the packet passes but Audit-mode policies would drop it.
    audit: Option<(Reason, u32)>,
}

impl Decision {
    const fn allow(reason: Reason, rule: u32) -> Self {
        Self {
            verdict: VERDICT_ALLOWED,
            reason,
            rule,
            audit: None,
        }
    }
    const fn drop(reason: Reason, rule: u32) -> Self {
        Self {
            verdict: VERDICT_DROPPED,
            reason,
            rule,
            audit: None,
        }
    }
}

/// The 5-tuple of a packet plus the endpoint it was seen at.
#[derive(Clone, Copy)]
struct Packet {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// IP protocol number.
    protocol: u8,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_OTHER`].
    proto_key: u8,
    direction: u8,
    /// TCP header flags (0 for other protocols).
    tcp_flags: u8,
    ifindex: u32,
    len: u32,
}

#[classifier]
pub fn cf_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn cf_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn count(verdict: u8, reason: Reason, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(verdict, reason)) {
        // SAFETY: a per-CPU array slot of this CPU; the program is not preempted while it runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

#[inline(always)]
fn config() -> DatapathConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Reports a flow event; when the ring buffer is full the event is lost and counted in
/// counter slot 0.
#[inline(always)]
fn event(p: &Packet, ep: &EndpointInfo, peer: u32, verdict: u8, reason: Reason, rule: u32) {
    let (src_identity, dst_identity) = if p.direction == DIR_EGRESS {
        (ep.identity, peer)
    } else {
        (peer, ep.identity)
    };
    let ev = FlowEvent {
        timestamp_ns: now(),
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        protocol: p.protocol,
        direction: p.direction,
        verdict,
        reason: reason as u8,
        src_identity,
        dst_identity,
        rule,
        ifindex: p.ifindex,
    };
    // No wake-up per event: the agent drains the ring every few milliseconds on its own, and is
    // woken only when the ring is a quarter full (a wake-up per event would cost a context
    // switch per new connection).
    let flags =
        if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= EVENTS.query(BPF_RB_RING_SIZE.into()) / 4 {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
    if EVENTS.output::<FlowEvent>(&ev, flags.into()).is_err()
        && let Some(c) = COUNTERS.get_ptr_mut(0)
    {
        // SAFETY: as in `count`.
        unsafe { (*c).packets += 1 };
    }
}

/// Identity of a peer address: a cluster address (pod or node), else the most specific policy
/// CIDR containing it, else world.
#[inline(always)]
fn identity_of(addr: u32) -> u32 {
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { IPCACHE.get(addr) } {
        return v.identity;
    }
    let key = Key::new(
        32,
        CidrKey {
            addr: addr.to_ne_bytes(),
        },
    );
    match CIDRS.get(&key) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

/// The policy entries for (identity, direction, protocol, port), merged with those for any
/// identity.
#[inline(always)]
fn lookup_policy(ep: &EndpointInfo, peer: u32, dir: u8, proto_key: u8, port: u16) -> PolicyValue {
    let mut out = PolicyValue::default();
    for identity in [peer, IDENTITY_ANY] {
        let exact = PolicyKey::new(ep.policy_set, identity, dir, proto_key, port);
        // SAFETY: the value is only read during this run.
        let v = match unsafe { POLICY_EXACT.get(exact) } {
            Some(v) => Some(v),
            None => POLICY.get(Key::new(POLICY_KEY_BITS, exact)),
        };
        if let Some(v) = v {
            out.flags |= v.flags;
            let mut i = 0;
            while i < 4 {
                let r = v.rules[i];
                if r != 0 && (out.rules[i] == 0 || r < out.rules[i]) {
                    out.rules[i] = r;
                }
                i += 1;
            }
        }
    }
    out
}

/// The verdict for a new connection (or an untracked packet). See docs/policy.md.
#[inline(always)]
fn decide(ep: &EndpointInfo, dir: u8, peer: u32, proto_key: u8, port: u16) -> Decision {
    let f = DirFlags::of(dir);
    if dir == DIR_INGRESS && peer == IDENTITY_HOST {
        return Decision::allow(Reason::Host, 0);
    }
    if ep.flags & f.policed == 0 {
        return Decision::allow(Reason::NoPolicy, 0);
    }
    let m = lookup_policy(ep, peer, dir, proto_key, port);
    let mut d = if m.flags & POLICY_DENY != 0 {
        Decision::drop(Reason::PolicyDeny, m.rules[RULE_DENY])
    } else if m.flags & POLICY_ALLOW != 0 {
        Decision::allow(Reason::PolicyAllow, m.rules[RULE_ALLOW])
    } else if ep.flags & f.default_deny != 0 {
        Decision::drop(Reason::DefaultDeny, 0)
    } else {
        Decision::allow(Reason::NoPolicy, 0)
    };
    if d.verdict == VERDICT_ALLOWED {
        // What Enforce and Audit policies together would do.
        if m.flags & POLICY_AUDIT_DENY != 0 {
            d.audit = Some((Reason::PolicyDeny, m.rules[RULE_AUDIT_DENY]));
        } else if ep.flags & (f.default_deny | f.audit_default_deny) != 0
            && m.flags & (POLICY_ALLOW | POLICY_AUDIT_ALLOW) == 0
        {
            d.audit = Some((Reason::DefaultDeny, 0));
        }
    }
    d
}

/// Traffic the datapath cannot track per connection (IPv6, other network protocols, IPv4
/// fragments): dropped when the endpoint is under enforcement in this direction, reported when
/// only Audit policies police it, passed otherwise.
#[inline(always)]
fn untrackable(p: &Packet, ep: &EndpointInfo, reason: Reason) -> i32 {
    let f = DirFlags::of(p.direction);
    if ep.flags & f.enforced != 0 {
        event(p, ep, IDENTITY_ANY, VERDICT_DROPPED, reason, 0);
        count(VERDICT_DROPPED, reason, p.len);
        DROP
    } else if ep.flags & f.policed != 0 {
        event(p, ep, IDENTITY_ANY, VERDICT_AUDIT, reason, 0);
        count(VERDICT_AUDIT, reason, p.len);
        PASS
    } else {
        count(VERDICT_ALLOWED, Reason::NotIp, p.len);
        PASS
    }
}

/// A pointer to a `T` at `offset` in the packet, if the linear data holds it. The bounds check
/// is made on the very pointer returned, as the verifier requires.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let end = ctx.data_end();
    let ptr = ctx.data() + offset;
    if ptr + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(ptr as *const T)
}

/// As [`ptr_at`]; when the headers are not all in the linear data (rare: headers are almost
/// always linear), pulls exactly what is needed in and tries again. Pulling can copy the
/// packet (a cloned TCP segment is un-cloned), so it is never done when not needed.
#[inline(always)]
fn header<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    if let Some(p) = ptr_at::<T>(ctx, offset) {
        return Some(p);
    }
    let need = (offset + core::mem::size_of::<T>()) as u32;
    if ctx.len() < need || ctx.pull_data(need).is_err() {
        return None;
    }
    ptr_at::<T>(ctx, offset)
}

fn handle(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    // SAFETY: the value is copied out at once.
    let ep = match unsafe { ENDPOINTS.get(ifindex) } {
        Some(ep) => *ep,
        None => {
            count(VERDICT_ALLOWED, Reason::Unmanaged, len);
            return PASS;
        }
    };
    let mut p = Packet {
        saddr: 0,
        daddr: 0,
        sport: 0,
        dport: 0,
        protocol: 0,
        proto_key: PROTO_OTHER,
        direction: dir,
        tcp_flags: 0,
        ifindex,
        len,
    };
    let Some(ethertype) = header::<u16>(ctx, 12) else {
        return malformed(&p);
    };
    // SAFETY: `ptr_at` checked the bounds; packet data has no alignment guarantee.
    let ethertype = u16::from_be(unsafe { ethertype.read_unaligned() });
    if ethertype == ETH_P_ARP {
        count(VERDICT_ALLOWED, Reason::NotIp, len);
        return PASS;
    }
    if ethertype != ETH_P_IP {
        return untrackable(&p, &ep, Reason::Ipv6);
    }
    let Some(ip) = header::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return malformed(&p);
    };
    // SAFETY: as above.
    let ip = unsafe { ip.read_unaligned() };
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 {
        return malformed(&p);
    }
    p.saddr = ip.saddr;
    p.daddr = ip.daddr;
    p.protocol = ip.protocol;
    if dir == DIR_INGRESS && ip.daddr != ep.ip {
        // Broadcast and the like: not addressed to the pod.
        count(VERDICT_ALLOWED, Reason::NotIp, len);
        return PASS;
    }
    let fragment = u16::from_be(ip.frag_off) & IP_MF_OR_OFFSET != 0;
    if !fragment && (ip.protocol == PROTO_TCP || ip.protocol == PROTO_UDP) {
        let Some(ports) = header::<[u16; 2]>(ctx, ETH_HLEN + ihl) else {
            return malformed(&p);
        };
        // SAFETY: as above.
        let ports = unsafe { ports.read_unaligned() };
        p.sport = ports[0];
        p.dport = ports[1];
        p.proto_key = ip.protocol;
        if ip.protocol == PROTO_TCP {
            // Bytes 12–13: data offset and flags. (Two bytes, not one: LLVM turns a one-byte
            // bound check into `ptr >= end`, from which the verifier derives no range.)
            let Some(word) = header::<[u8; 2]>(ctx, ETH_HLEN + ihl + 12) else {
                return malformed(&p);
            };
            // SAFETY: as above.
            p.tcp_flags = unsafe { word.read_unaligned() }[1];
        }
    }
    // Before anything else can pass the packet (a fragment of a pod without policy would);
    // checked once the ports are read, so that the flow names them.
    if dir == DIR_EGRESS && ip.saddr != ep.ip {
        event(&p, &ep, IDENTITY_ANY, VERDICT_DROPPED, Reason::Spoofed, 0);
        count(VERDICT_DROPPED, Reason::Spoofed, len);
        return DROP;
    }
    if fragment {
        return untrackable(&p, &ep, Reason::Fragment);
    }
    if ip.protocol == PROTO_ICMP && icmp_error_of_tracked_flow(ctx, &ep, dir, ihl) {
        count(VERDICT_ALLOWED, Reason::Related, len);
        return PASS;
    }
    let cfg = config();
    let v = verdict(&p, &ep, &cfg);
    if v != PASS || dir != DIR_EGRESS || p.proto_key == PROTO_OTHER {
        return v;
    }
    // Same-node delivery: a pod on this node gets the packet straight into its namespace, its
    // ingress decided here, so neither the host's IP stack nor a second program run is on the
    // way. (Other protocols take the routed path and meet `cf_to_pod` there.)
    let Some((dst_ifindex, dst)) = local_endpoint(p.daddr) else {
        return PASS;
    };
    let q = Packet {
        direction: DIR_INGRESS,
        ifindex: dst_ifindex,
        ..p
    };
    if verdict(&q, &dst, &cfg) != PASS {
        return DROP;
    }
    // SAFETY: helper with plain arguments; it returns TC_ACT_REDIRECT (or TC_ACT_SHOT when
    // the flags are invalid, which they are not).
    unsafe { bpf_redirect_peer(dst_ifindex, 0) as i32 }
}

/// Whether an ICMP packet is an error (destination unreachable — which carries "fragmentation
/// needed" for path-MTU discovery —, time exceeded, parameter problem) about a TCP or UDP
/// packet of a flow the endpoint has in its connection table: such errors pass like the
/// flow's replies, whatever router sends them. The quoted datagram is the packet the error is
/// about: one the endpoint sent (ingress) or received (egress).
#[inline(always)]
fn icmp_error_of_tracked_flow(ctx: &TcContext, ep: &EndpointInfo, dir: u8, ihl: usize) -> bool {
    let icmp = ETH_HLEN + ihl;
    let Some(tc) = header::<[u8; 2]>(ctx, icmp) else {
        return false;
    };
    // SAFETY: `header` checked the bounds; packet data has no alignment guarantee.
    let kind = unsafe { tc.read_unaligned() }[0];
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return false;
    }
    let Some(inner) = header::<Ipv4Hdr>(ctx, icmp + ICMP_HLEN) else {
        return false;
    };
    // SAFETY: as above.
    let inner = unsafe { inner.read_unaligned() };
    let inner_ihl = usize::from(inner.ver_ihl & 0x0f) * 4;
    if inner.ver_ihl >> 4 != 4
        || inner_ihl < 20
        || (inner.protocol != PROTO_TCP && inner.protocol != PROTO_UDP)
    {
        return false;
    }
    let Some(ports) = header::<[u16; 2]>(ctx, icmp + ICMP_HLEN + inner_ihl) else {
        return false;
    };
    // SAFETY: as above.
    let ports = unsafe { ports.read_unaligned() };
    // Into the pod: about a packet it sent (source: the pod). Out of it: about one it
    // received (destination: the pod).
    let (ep_side, peer_addr, ep_port, peer_port) = if dir == DIR_INGRESS {
        (inner.saddr, inner.daddr, ports[0], ports[1])
    } else {
        (inner.daddr, inner.saddr, ports[1], ports[0])
    };
    if ep_side != ep.ip {
        return false;
    }
    let key = CtKey {
        ep_addr: ep.ip,
        peer_addr,
        ep_port,
        peer_port,
        protocol: inner.protocol,
        _pad: [0; 3],
    };
    // SAFETY: the value is only tested for presence.
    unsafe { CONNTRACK.get(key) }.is_some()
}

/// A pod on this node with address `addr`: its host-side ifindex and endpoint, when the
/// ipcache names an interface whose endpoint still has that address.
#[inline(always)]
fn local_endpoint(addr: u32) -> Option<(u32, EndpointInfo)> {
    // SAFETY: the values are copied out at once.
    let ifindex = unsafe { IPCACHE.get(addr) }?.ifindex;
    if ifindex == 0 {
        return None;
    }
    // SAFETY: as above.
    let ep = *unsafe { ENDPOINTS.get(ifindex) }?;
    (ep.ip == addr).then_some((ifindex, ep))
}

/// The verdict at one endpoint for a parsed TCP, UDP or other IPv4 packet: a tracked flow
/// passes on its entry, a new one gets a policy decision (and an entry when it passes).
#[inline(always)]
fn verdict(p: &Packet, ep: &EndpointInfo, cfg: &DatapathConfig) -> i32 {
    let dir = p.direction;
    let len = p.len;
    let (peer_addr, ep_port, peer_port) = if dir == DIR_EGRESS {
        (p.daddr, p.sport, p.dport)
    } else {
        (p.saddr, p.dport, p.sport)
    };
    let key = CtKey {
        ep_addr: ep.ip,
        peer_addr,
        ep_port,
        peer_port,
        protocol: p.protocol,
        _pad: [0; 3],
    };
    if p.proto_key != PROTO_OTHER
        && let Some(ct) = CONNTRACK.get_ptr_mut(key)
    {
        return tracked(p, ep, ct, &key, cfg.generation);
    }

    // A new flow (or a packet of an untracked protocol).
    let peer = identity_of(peer_addr);
    let d = decide(ep, dir, peer, p.proto_key, u16::from_be(p.dport));
    if d.verdict != VERDICT_ALLOWED {
        event(p, ep, peer, d.verdict, d.reason, d.rule);
        count(d.verdict, d.reason, len);
        return DROP;
    }
    // A TCP FIN or RST that finds no flow ends one (a retransmission after the close, or a
    // flow forgotten): it gets its verdict but no entry.
    if p.proto_key != PROTO_OTHER && p.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        let t = now();
        let value = CtValue {
            created_ns: t,
            seen_ns: t,
            generation: cfg.generation,
            rule: d.rule,
            peer_identity: peer,
            reason: d.reason as u16,
            origin: dir,
            closing: 0,
        };
        // A full LRU evicts the least recently used flow; it cannot fail for lack of room.
        let _ = CONNTRACK.insert(key, value, 0);
    }
    match d.audit {
        Some((reason, rule)) => {
            event(p, ep, peer, VERDICT_AUDIT, reason, rule);
            count(VERDICT_AUDIT, reason, len);
        }
        None => {
            if p.proto_key != PROTO_OTHER && cfg.flags & CFG_EVENTS_ALLOWED != 0 {
                event(p, ep, peer, VERDICT_ALLOWED, d.reason, d.rule);
            }
            count(VERDICT_ALLOWED, d.reason, len);
        }
    }
    PASS
}

/// A packet of a tracked flow, in either direction. A flow accepted under an older generation
/// is re-evaluated against the current policy in its original direction; if that now drops it,
/// the entry is removed and the packet dropped.
#[inline(always)]
fn tracked(p: &Packet, ep: &EndpointInfo, ct: *mut CtValue, key: &CtKey, generation: u32) -> i32 {
    // SAFETY: `ct` points into the map value, valid during the program run.
    let (ct_generation, origin) = unsafe { ((*ct).generation, (*ct).origin) };
    let reason = if origin == p.direction {
        Reason::Established
    } else {
        Reason::Reply
    };
    if ct_generation != generation {
        // The destination port of the packet that opened the flow.
        let dport = if origin == DIR_EGRESS {
            key.peer_port
        } else {
            key.ep_port
        };
        let peer = identity_of(key.peer_addr);
        let d = decide(ep, origin, peer, key.protocol, u16::from_be(dport));
        if d.verdict != VERDICT_ALLOWED {
            let _ = CONNTRACK.remove(key);
            event(p, ep, peer, d.verdict, d.reason, d.rule);
            count(d.verdict, d.reason, p.len);
            return DROP;
        }
        // SAFETY: as above.
        unsafe {
            (*ct).generation = generation;
            (*ct).rule = d.rule;
            (*ct).peer_identity = peer;
        }
    }
    count(VERDICT_ALLOWED, reason, p.len);
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 || p.protocol == PROTO_TCP && closing(ct) != 0 {
        return tcp_close(p, ct, key, origin);
    }
    let t = now();
    // SAFETY: as above. Refreshing at most once per second keeps the hot path read-only.
    unsafe {
        if t.wrapping_sub((*ct).seen_ns) > CT_REFRESH_NS {
            (*ct).seen_ns = t;
        }
    }
    PASS
}

#[inline(always)]
fn closing(ct: *mut CtValue) -> u8 {
    // SAFETY: `ct` points into the map value, valid during the program run.
    unsafe { (*ct).closing }
}

/// The end of a TCP connection frees its entry, so that closed flows do not crowd live ones
/// out of the LRU: a RST at once; FINs are noted per side, and the first packet after both
/// (the last ACK) removes the entry. The packet itself passes.
#[inline(always)]
fn tcp_close(p: &Packet, ct: *mut CtValue, key: &CtKey, origin: u8) -> i32 {
    if p.tcp_flags & TCP_RST != 0 {
        let _ = CONNTRACK.remove(key);
        return PASS;
    }
    let seen = closing(ct);
    if p.tcp_flags & TCP_FIN != 0 {
        let side = if origin == p.direction {
            CT_FIN_ORIGIN
        } else {
            CT_FIN_REPLY
        };
        if seen & side == 0 {
            // SAFETY: as in `closing`.
            unsafe { (*ct).closing = seen | side };
        }
    } else if seen == CT_FIN_ORIGIN | CT_FIN_REPLY {
        let _ = CONNTRACK.remove(key);
    }
    PASS
}

#[inline(always)]
fn malformed(p: &Packet) -> i32 {
    count(VERDICT_DROPPED, Reason::Malformed, p.len);
    DROP
}

// ---- Service load balancing at the socket -------------------------------------------------------

/// Connects (TCP, connected UDP) to a Service address go to a backend chosen by weight.
#[cgroup_sock_addr(connect4)]
pub fn cf_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

/// Unconnected UDP sends to a Service address go to a backend chosen by weight.
#[cgroup_sock_addr(sendmsg4)]
pub fn cf_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

/// UDP replies from a backend appear to come from the Service address the app used.
#[cgroup_sock_addr(recvmsg4)]
pub fn cf_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = RevNatKey {
        cookie,
        ip: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { REVNAT.get(key) } {
        sa.user_ip4 = v.vip;
        sa.user_port = u32::from(v.port);
    }
    1
}

/// Rewrites a Service destination to a backend; refuses (ECONNREFUSED) when the Service has
/// none. Returns 1 to let the call proceed, 0 to fail it.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol as u8;
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return 1;
    }
    let key = ServiceKey {
        vip: sa.user_ip4,
        port: sa.user_port as u16,
        protocol,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let svc = match unsafe { SERVICES.get(key) } {
        Some(s) => *s,
        None => return 1,
    };
    let backend = if svc.slots == 0 {
        None
    } else {
        // SAFETY: helper without arguments.
        let slot = unsafe { bpf_get_prandom_u32() } % svc.slots;
        // SAFETY: the value is copied out at once.
        unsafe {
            BACKENDS.get(BackendKey {
                table: svc.table,
                slot,
            })
        }
        .copied()
    };
    let Some(be) = backend else {
        count(VERDICT_DROPPED, Reason::NoBackend, 0);
        // SAFETY: sets the errno the syscall returns when the program rejects it.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return 0;
    };
    if protocol == PROTO_UDP {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        let rk = RevNatKey {
            cookie,
            ip: be.ip,
            port: be.port,
            _pad: 0,
        };
        let rv = RevNatValue {
            vip: key.vip,
            port: key.port,
            _pad: 0,
        };
        let _ = REVNAT.insert(rk, rv, 0);
    }
    sa.user_ip4 = be.ip;
    sa.user_port = u32::from(be.port);
    count(VERDICT_ALLOWED, Reason::ServiceTranslated, 0);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic, so this is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}
