//! Attaching the programs: the socket load balancer to a cgroup, the policy programs to each
//! pod's host-side interface (tcx links, or clsact filters on older kernels). Links are pinned
//! under `<pin_dir>/links`; a restarted agent swaps its programs into them with
//! `BPF_LINK_UPDATE` (atomic), so nothing is ever detached by a restart.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use cortexflow_common::programs;

use super::{Datapath, DatapathError, io_err, prog_err, program};
use crate::sys;

const TC_PRIORITY: u16 = 0xcf00;
const TC_HANDLE: TcHandle = TcHandle::new(0xcf, 1);

impl Datapath {
    /// Attaches the socket load-balancing programs to a cgroup (v2) and everything below it;
    /// on a restart, swaps the new programs into the pinned links instead.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let dir =
            fs::File::open(cgroup).map_err(io_err(format!("open cgroup {}", cgroup.display())))?;
        for name in [programs::CONNECT4, programs::SENDMSG4, programs::RECVMSG4] {
            let pin = self
                .opts
                .pin_dir
                .join("links")
                .join(format!("cgroup-{name}"));
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            if pin.exists() {
                let link = sys::obj_get(&pin)
                    .map_err(io_err(format!("open pinned link {}", pin.display())))?;
                let prog = p.fd().map_err(prog_err(name))?;
                sys::link_update(&link, prog)
                    .map_err(io_err(format!("update link {}", pin.display())))?;
                continue;
            }
            let id = p
                // A cgroup link always lets other programs run beside it (link flags must be 0).
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(prog_err(format!("attach {name} to {}", cgroup.display())))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            let link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| {
                    DatapathError::Other(e.to_string())
                })?;
            link.pin(&pin)
                .map_err(|e| DatapathError::Other(format!("pin {}: {e:?}", pin.display())))?;
        }
        Ok(())
    }

    /// Attaches the policy programs to a pod's host-side interface (ingress hook: what the pod
    /// sends; egress hook: what it receives). Idempotent; on a restart the new programs replace
    /// the old ones atomically.
    pub fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let name = ifname.to_string();
        self.attach_interfaces(std::slice::from_ref(&name))
            .pop()
            .map_or(Ok(()), |(_, r)| r)
    }

    /// [`Datapath::attach_interface`] for many interfaces, with one result per interface.
    ///
    /// Creating a tcx link (or a clsact filter) waits for an RCU grace period under the RTNL
    /// lock, about 10 ms per hook on a typical kernel, and the lock serialises them: a node's
    /// first config with a hundred pods spends most of its time here (nodes that run with
    /// `/sys/kernel/rcu_expedited` set do not). Interfaces attached once by this process are
    /// skipped, so later configs pay nothing.
    pub fn attach_interfaces(
        &mut self,
        ifnames: &[String],
    ) -> Vec<(String, Result<(), DatapathError>)> {
        ifnames
            .iter()
            .map(|name| {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str()).unwrap_or(0);
                if ifindex == 0 {
                    self.attached.remove(name);
                    let e = DatapathError::Other(format!("no interface {name}"));
                    return (name.clone(), Err(e));
                }
                // Once per interface and process: the first attach after a restart swaps this
                // process's programs into the pinned links; later ones would only repeat that.
                if self.attached.get(name) == Some(&ifindex) {
                    return (name.clone(), Ok(()));
                }
                self.attached.remove(name);
                let r = [
                    (programs::FROM_POD, TcAttachType::Ingress),
                    (programs::TO_POD, TcAttachType::Egress),
                ]
                .into_iter()
                .try_for_each(|(prog, hook)| {
                    if self.tcx {
                        self.attach_tcx(name, ifindex, prog, hook)
                    } else {
                        self.attach_clsact(name, prog, hook)
                    }
                });
                if r.is_ok() {
                    self.attached.insert(name.clone(), ifindex);
                }
                (name.clone(), r)
            })
            .collect()
    }

    fn attach_tcx(
        &self,
        ifname: &str,
        ifindex: u32,
        name: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        let p = self.tc_program(name)?;
        let prog = p.fd().map_err(prog_err(name))?;
        attach_tcx_link(
            prog,
            ifindex,
            hook == TcAttachType::Ingress,
            &self.tc_pin(ifname, hook),
        )
        .map_err(io_err(format!("attach {name} to {ifname}")))
    }

    /// `links/tc/<hook>-<ifname>`. bpffs refuses names with a dot, which interface names may
    /// have; a colon never appears in one, so dots are written as colons.
    fn tc_pin(&self, ifname: &str, hook: TcAttachType) -> PathBuf {
        let h = if hook == TcAttachType::Ingress {
            "ingress"
        } else {
            "egress"
        };
        self.opts
            .pin_dir
            .join("links/tc")
            .join(format!("{h}-{}", ifname.replace('.', ":")))
    }

    fn attach_clsact(
        &mut self,
        ifname: &str,
        name: &str,
        hook: TcAttachType,
    ) -> Result<(), DatapathError> {
        // Fails harmlessly when the qdisc is already there.
        let _ = aya::programs::tc::qdisc_add_clsact(ifname);
        let p: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let existing = SchedClassifierLink::attached(ifname, hook, TC_PRIORITY, TC_HANDLE, None)
            .map_err(io_err(format!("find {ifname}")))?;
        // Replacing an existing filter (same priority and handle) is atomic.
        let id = match p.attach_to_link(existing) {
            Ok(id) => id,
            Err(_) => p
                .attach_with_options(
                    ifname,
                    hook,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TC_HANDLE,
                        ..Default::default()
                    }),
                )
                .map_err(prog_err(format!("attach {name} to {ifname}")))?,
        };
        // The filter stays on the interface after the program object is dropped.
        let link = p.take_link(id).map_err(prog_err(name))?;
        std::mem::forget(link);
        Ok(())
    }

    /// Detaches the policy programs from an interface (when its pod goes away).
    pub fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attached.remove(ifname);
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            if self.tcx {
                let pin = self.tc_pin(ifname, hook);
                match fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("remove {}", pin.display()))(e)),
                }
            } else {
                let name = if hook == TcAttachType::Ingress {
                    programs::FROM_POD
                } else {
                    programs::TO_POD
                };
                let _ = aya::programs::tc::qdisc_detach_program(ifname, hook, name);
            }
        }
        Ok(())
    }

    /// Interfaces with pinned links (tcx mode).
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.opts.pin_dir.join("links/tc"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("ingress-").map(|i| i.replace(':', "."))
            })
            .collect();
        out.sort();
        out
    }
}

/// Makes the tcx link pinned at `pin` run `prog` on interface `ifindex`: swaps the program into
/// the pinned link when it is on that interface (a restart), else creates and pins a new link
/// (replacing a pin whose interface went away).
fn attach_tcx_link(
    prog: impl std::os::fd::AsFd,
    ifindex: u32,
    ingress: bool,
    pin: &Path,
) -> io::Result<()> {
    if pin.exists() {
        let link = sys::obj_get(pin)?;
        let on = sys::tcx_link_ifindex(&link).unwrap_or(0);
        if on != 0 && on == ifindex && sys::link_update(&link, prog.as_fd()).is_ok() {
            return Ok(());
        }
        // The interface went away (and with it the link); a new one may have its name.
        fs::remove_file(pin)?;
    }
    let link = sys::tcx_link_create(prog.as_fd(), ifindex, ingress)?;
    sys::obj_pin(&link, pin)
}
