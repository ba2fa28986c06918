//! Network fixtures on one machine: network namespaces, veth pairs, routes, cgroups — what a
//! node or a pod of the lab is made of, and what the kernel tests of the agent build on.
//! Everything removes itself on drop, so a failing (panicking) test cleans up too; names carry
//! the owner's pid so that [`sweep_stale`] can remove what a killed run left behind.
use std::{
    fs::File,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

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

/// The kind of a fixture that outlives a crash unless removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fixture {
    Netns,
    Pins,
    Cgroup,
}

/// Every fixture on the machine named `<prefix><pid>x…` by [`unique`]: `(kind, owner pid, path)`
/// of network namespaces, bpffs pin directories and cgroups. One scan of the three directories.
fn fixtures() -> Vec<(Fixture, u32, PathBuf)> {
    let mut found = Vec::new();
    for (kind, dir) in [
        (Fixture::Netns, "/var/run/netns"),
        (Fixture::Pins, "/sys/fs/bpf"),
        (Fixture::Cgroup, CGROUP2_ROOT),
    ] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = ["cfn", "cfp", "cftest-"]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .and_then(|rest| rest.split('x').next()?.parse::<u32>().ok());
            if let Some(pid) = pid {
                found.push((kind, pid, e.path()));
            }
        }
    }
    found
}

/// What the fixtures of process `pid` made and have not removed.
pub fn owned_by(pid: u32) -> Vec<(Fixture, PathBuf)> {
    fixtures()
        .into_iter()
        .filter(|(_, owner, _)| *owner == pid)
        .map(|(kind, _, path)| (kind, path))
        .collect()
}

/// Removes what earlier runs killed before their cleanup ran (`SIGKILL`, a timeout) left
/// behind: network namespaces, pin directories and cgroups named `<prefix><pid>x…` whose process
/// is gone.
pub fn sweep_stale() {
    let me = std::process::id();
    for (kind, owner, path) in fixtures() {
        if owner == me || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        match kind {
            Fixture::Netns => {
                let _ = Command::new("ip")
                    .arg("netns")
                    .arg("del")
                    .arg(path.file_name().unwrap_or_default())
                    .status();
            }
            Fixture::Pins => {
                let _ = std::fs::remove_dir_all(&path);
            }
            Fixture::Cgroup => {
                // A lab node's cgroup holds its pods' cgroups.
                for sub in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    if sub.path().is_dir() {
                        let _ = std::fs::remove_dir(sub.path());
                    }
                }
                let _ = std::fs::remove_dir(&path);
            }
        }
    }
}

// ---- network namespaces ----------------------------------------------------------------------

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    try_sh(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a command: its stdout, or an error naming the command with its output.
pub fn try_sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| anyhow::anyhow!("{args:?}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
            enter(&path).expect("enter netns");
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
            let ifindex = wire_pod(&node, &ns, ip, &host_if);
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

/// Wires a pod's namespace to its node's as a routed CNI does: a veth whose host side
/// (`host_if`) stays in the node with a /32 route to `ip`, the pod side `eth0` with `ip`/32 and a
/// default route via a link-local gateway resolved statically to the host side. Returns the
/// host side's ifindex. Panics when a step fails (for tests; see [`try_wire_pod`]).
pub fn wire_pod(node: &Netns, pod: &Netns, ip: Ipv4Addr, host_if: &str) -> u32 {
    try_wire_pod(node, pod, ip, host_if).unwrap_or_else(|e| panic!("wire {host_if}: {e:#}"))
}

/// [`wire_pod`], failing with the step's error instead of panicking. The node's /32 route is
/// *replaced*, not added: an address handed out again while the previous owner's route is
/// still there (its sandbox being torn down) moves to the new interface.
pub fn try_wire_pod(node: &Netns, pod: &Netns, ip: Ipv4Addr, host_if: &str) -> anyhow::Result<u32> {
    let (n, p) = (node.name.as_str(), pod.name.as_str());
    let host = format!("{ip}/32");
    try_sh(&[
        "ip", "link", "add", host_if, "netns", n, "type", "veth", "peer", "name", "eth0", "netns",
        p,
    ])?;
    try_sh(&["ip", "-n", n, "link", "set", host_if, "up"])?;
    try_sh(&["ip", "-n", n, "route", "replace", &host, "dev", host_if])?;
    try_sh(&["ip", "-n", p, "addr", "add", &host, "dev", "eth0"])?;
    try_sh(&["ip", "-n", p, "link", "set", "eth0", "up"])?;
    try_sh(&[
        "ip",
        "-n",
        p,
        "route",
        "replace",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    try_sh(&[
        "ip",
        "-n",
        p,
        "route",
        "replace",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    let link = try_sh(&["ip", "-n", n, "-o", "link", "show", host_if])?;
    let ifindex: u32 = link
        .split(':')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("ifindex of {host_if} in {link:?}: {e}"))?;
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no MAC for {host_if} in {link:?}"))?
        .to_string();
    // The gateway is the host side of the veth, resolved statically.
    try_sh(&[
        "ip",
        "-n",
        p,
        "neigh",
        "replace",
        "169.254.1.1",
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    Ok(ifindex)
}

/// A cgroup v2 directory under the unified hierarchy, removed on drop (its processes are moved
/// back to the root first).
pub struct Cgroup {
    pub path: PathBuf,
}

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

impl Cgroup {
    /// Creates a new, empty cgroup.
    pub fn create() -> Self {
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

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

// ---- traffic -----------------------------------------------------------------------------------

/// A TCP and UDP server on a thread in a namespace, stopped on drop. TCP: it sends its tag and a
/// newline, then echoes what it reads until the peer closes (so one connection can carry a
/// conversation); UDP: it answers every datagram with its tag.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &Netns, port: u16, tag: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&path).expect("enter netns");
            let tcp = TcpListener::bind(("0.0.0.0", port)).expect("bind tcp");
            tcp.set_nonblocking(true).expect("nonblocking");
            let udp = UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
            // The UDP wait doubles as the pause between accept polls.
            udp.set_read_timeout(Some(Duration::from_millis(1)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                while let Ok((c, _)) = tcp.accept() {
                    let stop = s.clone();
                    std::thread::spawn(move || echo(c, tag, &stop));
                }
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(tag.as_bytes(), from);
                }
            }
        });
        ready_rx.recv().expect("server ready");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut c: TcpStream, tag: &str, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_nodelay(true);
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    if c.write_all(format!("{tag}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `ns` to `dst:port` over TCP and returns the server's first line (its tag), or
/// why that failed (a dropped SYN times out after 700 ms).
pub fn tcp_try(ns: &Netns, dst: Ipv4Addr, port: u16) -> Result<String, ErrorKind> {
    ns.run(move || {
        let s = TcpStream::connect_timeout(
            &SocketAddrV4::new(dst, port).into(),
            Duration::from_millis(700),
        )
        .map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| e.kind())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.kind())?;
        Ok(line.trim().to_string())
    })
}

/// Sends one UDP datagram from `ns` and returns the answer and where it came from.
pub fn udp_try(ns: &Netns, dst: Ipv4Addr, port: u16) -> Option<(String, Ipv4Addr)> {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.send_to(b"ping", (dst, port)).ok()?;
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).ok()?;
        let from = match from {
            std::net::SocketAddr::V4(a) => *a.ip(),
            _ => return None,
        };
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

/// Sends one UDP datagram with a source address of the caller's choosing, through a raw socket
/// (`IPPROTO_RAW`, the header written by hand: what a pod with `CAP_NET_RAW` can do). The
/// kernel fills in the IP checksum and length; the UDP checksum is left 0 (none).
pub fn forge_udp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> std::io::Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )?;
    let udp_len = 8 + payload.len();
    let total = (20 + udp_len) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let to = SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
    sendto(fd.as_raw_fd(), &p, &to, MsgFlags::empty())?;
    Ok(())
}
