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
    let routes = host_routes()?;
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
    Ok(out)
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
}
