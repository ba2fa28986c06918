//! Fixtures of the root-only kernel tests: datapaths in throw-away pin directories and crafted
//! packets; network namespaces, veth pairs and cgroups come from `cortexflow_testkit::net`.
//! Everything removes itself on drop, so a failing (panicking) test cleans up too.
#![allow(dead_code)]

use std::{net::Ipv4Addr, path::PathBuf};

use cortexflow_agent::datapath::{Capacity, Datapath, DatapathOptions, TcMode};

/// Runs a kernel suite: each test a function that panics on failure; all reported as ignored
/// unless [`enabled`]; what killed runs left behind is swept first.
pub fn run(
    args: libtest_mimic::Arguments,
    tests: Vec<(&'static str, fn())>,
) -> std::process::ExitCode {
    let enabled = enabled();
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            libtest_mimic::Trial::test(name, move || {
                std::panic::catch_unwind(f).map_err(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    libtest_mimic::Failed::from(msg)
                })
            })
            .with_ignored_flag(!enabled)
        })
        .collect();
    if enabled {
        sweep_stale();
    } else {
        eprintln!(
            "kernel tests need root: run them with CORTEXFLOW_KERNEL_TESTS=1 (cargo xtask test does)"
        );
    }
    libtest_mimic::run(&args, trials).exit_code()
}

/// Whether the kernel tests are switched on (they need root and change the machine).
pub fn enabled() -> bool {
    std::env::var("CORTEXFLOW_KERNEL_TESTS").is_ok_and(|v| v == "1")
}

/// A datapath pinned under its own directory, removed on drop.
pub struct TestDatapath {
    pub dp: Option<Datapath>,
    pub pin_dir: PathBuf,
}

impl TestDatapath {
    pub fn new() -> Self {
        Self::with(Capacity::default(), TcMode::Auto)
    }

    pub fn with(capacity: Capacity, tc_mode: TcMode) -> Self {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("cftest-"));
        Self::at(pin_dir, capacity, tc_mode)
    }

    pub fn at(pin_dir: PathBuf, capacity: Capacity, tc_mode: TcMode) -> Self {
        let dp = Datapath::open(DatapathOptions {
            pin_dir: pin_dir.clone(),
            capacity,
            tc_mode,
        })
        .unwrap_or_else(|e| {
            let _ = Datapath::uninstall(&pin_dir);
            panic!("open datapath: {e}")
        });
        Self {
            dp: Some(dp),
            pin_dir,
        }
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath")
    }

    /// Drops the loaded programs (as an agent exit does) but keeps the pins.
    pub fn close(&mut self) {
        self.dp = None;
    }

    /// Loads again from the same pins (as a restarted agent does).
    pub fn reopen(&mut self) {
        let capacity = Capacity::default();
        let dp = Datapath::open(DatapathOptions {
            pin_dir: self.pin_dir.clone(),
            capacity,
            tc_mode: TcMode::Auto,
        })
        .expect("reopen datapath");
        self.dp = Some(dp);
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        self.dp = None;
        let _ = Datapath::uninstall(&self.pin_dir);
    }
}

// ---- packets ---------------------------------------------------------------------------------

const ETH_IP: [u8; 2] = [0x08, 0x00];

fn eth(ethertype: [u8; 2]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype);
    p
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag_off: u16, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag_off.to_be_bytes());
    h.push(64);
    h.push(protocol);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// An Ethernet + IPv4 + TCP SYN packet.
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp_with(src, sport, dst, dport, 0x02)
}

/// An Ethernet + IPv4 + TCP packet with the given header flags (0x01 FIN, 0x02 SYN, 0x04 RST,
/// 0x10 ACK).
pub fn tcp_with(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, 6, 0, 20));
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// An Ethernet + IPv4 + UDP packet with 8 bytes of payload.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, 17, 0, 16));
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&16u16.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(b"payload!");
    p
}

/// An Ethernet header and an IPv4 header for `payload_len` bytes of protocol `protocol`.
pub fn eth_ip_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> Vec<u8> {
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, protocol, 0, payload_len));
    p
}

/// An Ethernet + IPv4 + ICMP echo request.
pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, 1, 0, 8));
    p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    p
}

/// A non-first IPv4 fragment of a UDP datagram.
pub fn fragment(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, 17, 185, 16)); // offset 185 * 8 bytes
    p.extend_from_slice(&[0u8; 16]);
    p
}

/// A minimal IPv6 packet (UDP next header).
pub fn ipv6() -> Vec<u8> {
    let mut p = eth([0x86, 0xdd]);
    p.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
    p
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut p = eth([0x08, 0x06]);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0u8; 20]);
    p
}

/// An IPv4 packet whose header length field is below the minimum (the kernel's test run
/// refuses packets shorter than an IPv4 header, so "malformed" is tested this way).
pub fn bad_ihl() -> Vec<u8> {
    let mut p = tcp(
        Ipv4Addr::new(10, 0, 0, 20),
        1,
        Ipv4Addr::new(10, 0, 0, 10),
        80,
    );
    p[14] = 0x44;
    p
}

#[allow(unused_imports)]
pub use cortexflow_testkit::net::{
    CGROUP2_ROOT, Cgroup, Netns, Pod, Server, Topology, sh, sweep_stale, tcp_try, udp_try, unique,
};
