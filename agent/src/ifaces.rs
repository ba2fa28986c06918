//! Finding a local pod's host-side interface.
//!
//! The agent follows the routed-CNI convention (Calico, Cilium's routing modes, the CNI `ptp`
//! plugin, the lab's node simulator): the node has a host route `<pod ip>/32 dev <veth>` to each
//! local pod. The interface is the device of that route. Only /32 routes count — a wider route
//! (a default route, a pod-CIDR route towards a bridge) would name the wrong device; pods of
//! bridged CNIs are not found and stay pending (documented in docs/architecture.md).
//!
//! The routes are read from `/proc/thread-self/net/route`, i.e. in the network namespace of the
//! calling thread (the datapath thread enters the node's namespace).
use std::{collections::BTreeMap, io, net::Ipv4Addr, path::Path};

const RTF_UP: u32 = 0x1;

/// A pod interface: name and index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Iface {
    pub name: String,
    pub index: u32,
}

/// Parses the kernel's route table text: `/32` routes that are up, by destination.
pub fn parse_host_routes(text: &str) -> BTreeMap<Ipv4Addr, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(flags), Some(mask)) = (hex(f[1]), hex(f[3]), hex(f[7])) else {
            continue;
        };
        if mask != u32::MAX || flags & RTF_UP == 0 || f[0] == "lo" {
            continue;
        }
        // The kernel prints the big-endian address as a native integer.
        out.insert(Ipv4Addr::from(dest.to_ne_bytes()), f[0].to_string());
    }
    out
}

/// The host routes of the calling thread's network namespace.
pub fn host_routes() -> io::Result<BTreeMap<Ipv4Addr, String>> {
    let path = if Path::new("/proc/thread-self/net/route").exists() {
        "/proc/thread-self/net/route"
    } else {
        "/proc/net/route"
    };
    Ok(parse_host_routes(&std::fs::read_to_string(path)?))
}

/// The interface of each address that has a host route to an existing device.
pub fn resolve(ips: impl IntoIterator<Item = Ipv4Addr>) -> io::Result<BTreeMap<Ipv4Addr, Iface>> {
    Ok(resolve_in(&host_routes()?, ips))
}

/// [`resolve`] against routes already read.
pub fn resolve_in(
    routes: &BTreeMap<Ipv4Addr, String>,
    ips: impl IntoIterator<Item = Ipv4Addr>,
) -> BTreeMap<Ipv4Addr, Iface> {
    let mut out = BTreeMap::new();
    for ip in ips {
        let Some(name) = routes.get(&ip) else {
            continue;
        };
        if let Ok(index) = nix::net::if_::if_nametoindex(name.as_str()) {
            out.insert(
                ip,
                Iface {
                    name: name.clone(),
                    index,
                },
            );
        }
    }
    out
}

/// Every IPv4 address of the calling thread's network namespace but loopback ones: the node's
/// addresses, all of which are the host (a kubelet probe comes from whichever the route picks,
/// not only from those `Node.status.addresses` lists).
pub fn local_addresses() -> io::Result<std::collections::BTreeSet<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect())
}

/// The interfaces of pods the config does not name (yet): a `/32` host route is the only route
/// to its device, and the device holds no address of the node (an uplink with a `/32` route to
/// a gateway is not a pod). They are guarded from their first packet — anti-spoofing, no
/// policy — until the config names the pod.
pub fn unknown_pods(
    routes: &BTreeMap<Ipv4Addr, String>,
    known: &std::collections::BTreeSet<Ipv4Addr>,
    local: &std::collections::BTreeSet<Ipv4Addr>,
    addressed_devices: &std::collections::BTreeSet<String>,
) -> BTreeMap<Ipv4Addr, String> {
    let mut per_device: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
    for (ip, dev) in routes {
        per_device.entry(dev.as_str()).or_default().push(*ip);
    }
    per_device
        .into_iter()
        .filter(|(dev, ips)| ips.len() == 1 && !addressed_devices.contains(*dev))
        .map(|(dev, ips)| (ips[0], dev.to_string()))
        .filter(|(ip, _)| !known.contains(ip) && !local.contains(ip))
        .collect()
}

/// The names of the devices that hold an IPv4 address.
pub fn addressed_devices() -> io::Result<std::collections::BTreeSet<String>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some()
        })
        .map(|a| a.interface_name)
        .collect())
}

/// Wakes the datapath thread when links, addresses or routes change in its network namespace
/// (netlink multicast), so that a new pod's interface is guarded within milliseconds of its
/// route appearing rather than at the next periodic look. Created on the calling thread (in
/// its namespace); the listening thread it starts ends when `stop` is set (it checks every
/// second) and sets `dead` if the socket fails.
pub struct ChangeWatch {
    pub changed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub dead: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ChangeWatch {
    pub fn start() -> io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv,
            setsockopt, socket, sockopt::ReceiveTimeout,
        };
        use std::{os::fd::AsRawFd, sync::atomic::Ordering};
        const RTMGRP_LINK: u32 = 0x1;
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV4_ROUTE: u32 = 0x40;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE),
        )?;
        setsockopt(&fd, ReceiveTimeout, &nix::sys::time::TimeVal::new(1, 0))?;
        let w = Self {
            changed: Default::default(),
            dead: Default::default(),
            stop: Default::default(),
        };
        let (changed, dead, stop) = (w.changed.clone(), w.dead.clone(), w.stop.clone());
        std::thread::Builder::new()
            .name("netlink".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(_) => changed.store(true, Ordering::Release),
                        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                        // ENOBUFS: messages were lost — something changed.
                        Err(nix::errno::Errno::ENOBUFS) => changed.store(true, Ordering::Release),
                        Err(e) => {
                            tracing::error!(error = %e, "netlink watch failed");
                            dead.store(true, Ordering::Release);
                            return;
                        }
                    }
                }
            })?;
        Ok(w)
    }
}

impl Drop for ChangeWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_host_routes_that_are_up_count() {
        // 10.0.0.2/32 dev cali1 (up), 10.0.0.3/32 dev cali2 (down), default via eth0,
        // 10.0.0.0/24 dev br0, 127.0.0.5/32 dev lo.
        let ip = |a: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(a));
        let text = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             cali1\t{}\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
             cali2\t{}\t00000000\t0004\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             br0\t{}\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             lo\t{}\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n",
            ip([10, 0, 0, 2]),
            ip([10, 0, 0, 3]),
            ip([10, 0, 0, 0]),
            ip([127, 0, 0, 5]),
        );
        let r = parse_host_routes(&text);
        assert_eq!(
            r,
            [(Ipv4Addr::new(10, 0, 0, 2), "cali1".to_string())]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn unknown_pods_are_single_routes_to_unaddressed_devices() {
        let a = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        let routes: BTreeMap<Ipv4Addr, String> = [
            (a(2), "cali1"), // a pod the config names
            (a(3), "cali2"), // a pod it does not name
            (a(4), "tap0"),  // two /32 routes to one device: not a pod
            (a(5), "tap0"),
            (a(6), "uplink"), // a device with an address of the node
            (Ipv4Addr::new(10, 9, 9, 9), "cali3"), // the node's own address: not a pod
        ]
        .into_iter()
        .map(|(ip, d)| (ip, d.to_string()))
        .collect();
        let known = [a(2)].into_iter().collect();
        let local = [Ipv4Addr::new(10, 9, 9, 9)].into_iter().collect();
        let addressed = ["uplink".to_string()].into_iter().collect();
        let got = unknown_pods(&routes, &known, &local, &addressed);
        assert_eq!(
            got,
            [(a(3), "cali2".to_string())]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        );
    }
}
