//! Network namespaces and bpffs: what an agent needs to run beside others on one machine.
use std::{fs::File, io, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Moves the calling thread into the network namespace at `path` (e.g. `/var/run/netns/node-1`).
/// Sockets, interfaces and TC attachments made by this thread afterwards live there.
pub fn enter(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Makes sure `/sys/fs/bpf` (or the bpffs mount point above `pin_dir`) is a bpffs, mounting one
/// when nothing is mounted there yet; fails when `pin_dir` is elsewhere and not on a bpffs.
pub fn ensure_bpffs(pin_dir: &Path) -> io::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let on_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    let mut probe = pin_dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if on_bpffs(probe) {
        return Ok(());
    }
    if pin_dir.starts_with(root) && root.is_dir() && !on_bpffs(root) {
        mount(
            Some("bpf"),
            root,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(io::Error::from)?;
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} is not on a bpffs",
        pin_dir.display()
    )))
}
