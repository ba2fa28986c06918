//! Fixtures of the root-only kernel tests: datapaths in throw-away pin directories, crafted
//! packets, network namespaces with veth pairs, cgroups. Everything removes itself on drop, so
//! a failing (panicking) test cleans up too.
#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use cortexflow_agent::datapath::{Capacity, Datapath, DatapathOptions, TcMode};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<seq>` (no longer than an interface
/// name may be, for the prefixes used here).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes what earlier runs killed before their cleanup ran (`SIGKILL`, a timeout) left
/// behind: network namespaces, pin directories and cgroups named `<prefix><pid>x…` whose process
/// is gone.
pub fn sweep_stale() {
    fn owner_gone(name: &str) -> bool {
        let Some(rest) = ["cfn", "cfp", "cftest-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
        else {
            return false;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    }
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    for ns in names("/var/run/netns") {
        if owner_gone(&ns) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
    for pin in names("/sys/fs/bpf") {
        if owner_gone(&pin) {
            let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(pin));
        }
    }
    for cg in names(CGROUP2_ROOT) {
        if owner_gone(&cg) {
            let _ = std::fs::remove_dir(Path::new(CGROUP2_ROOT).join(cg));
        }
    }
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
    let mut p = eth(ETH_IP);
    p.extend(ipv4(src, dst, 6, 0, 20));
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
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

// ---- network namespaces ----------------------------------------------------------------------

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (with every interface in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            cortexflow_agent::netns::enter(&path).expect("enter netns");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A "node" namespace routing between "pod" namespaces, as a CNI would set it up: each pod has
/// a veth whose host side lives in the node, a /32 address, and a default route via a
/// link-local gateway that resolves to the host side of the veth.
pub struct Topology {
    pub node: Netns,
    pub pods: Vec<Pod>,
    /// The node's own address (on its loopback), identity host.
    pub node_ip: Ipv4Addr,
}

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Host-side interface name (in the node namespace).
    pub host_if: String,
    pub ifindex: u32,
}

impl Topology {
    /// A node with `n` pods at 10.<net>.0.2 … and the node at 10.<net>.255.1.
    pub fn new(n: usize, net: u8) -> Self {
        let node = Netns::new("cfn");
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let node_ip = Ipv4Addr::new(10, net, 255, 1);
        // (This kernel has no dummy interfaces; the node's address sits on its loopback.)
        node.ip(&["addr", "add", &format!("{node_ip}/32"), "dev", "lo"]);
        let mut pods = Vec::new();
        for i in 0..n {
            let ns = Netns::new("cfp");
            let ip = Ipv4Addr::new(10, net, 0, 2 + i as u8);
            let host_if = format!("cfv{i}");
            sh(&[
                "ip", "link", "add", &host_if, "netns", &node.name, "type", "veth", "peer", "name",
                "eth0", "netns", &ns.name,
            ]);
            node.ip(&["link", "set", &host_if, "up"]);
            node.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if]);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0"]);
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ]);
            let link = node.ip(&["-o", "link", "show", &host_if]);
            let ifindex: u32 = link
                .split(':')
                .next()
                .unwrap_or("0")
                .trim()
                .parse()
                .expect("ifindex");
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .expect("host veth mac")
                .to_string();
            // The gateway is the host side of the veth, resolved statically.
            ns.ip(&[
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            pods.push(Pod {
                ns,
                ip,
                host_if,
                ifindex,
            });
        }
        Self {
            node,
            pods,
            node_ip,
        }
    }
}

/// A cgroup v2 directory under the unified hierarchy, removed on drop (its processes are moved
/// back to the root first).
pub struct Cgroup {
    pub path: PathBuf,
}

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

impl Cgroup {
    pub fn new() -> Self {
        let path = Path::new(CGROUP2_ROOT).join(unique("cftest-"));
        std::fs::create_dir_all(&path).expect("create cgroup");
        Self { path }
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CGROUP2_ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
