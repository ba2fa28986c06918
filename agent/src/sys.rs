//! The `bpf(2)` commands aya 0.14 does not expose publicly, or not without `&mut` access to the
//! program: opening and pinning objects, creating a tcx link from a program's descriptor,
//! atomically replacing the program behind a link, and reading which interface a tcx link is
//! on. They are what lets an
//! agent restart (or an upgrade) swap its programs without ever detaching them.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_TCX: u32 = 11;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `link_create` of `union bpf_attr`, with the `tcx` member of its inner union.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the tcx member of its union (which starts at offset 16: the
/// union holds 64-bit members).
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `tcx.ifindex` (0 once the interface is gone).
    ifindex: u32,
    attach_type: u32,
    _rest: [u64; 6],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised, #[repr(C)] bpf_attr prefix of the size passed; the
    // kernel reads (and for some commands writes) only within it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned bpffs object (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpffs object (a link, here) at `path`.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Attaches `prog` to interface `ifindex` (of the calling thread's network namespace) as a tcx
/// link, after the programs already there: ingress is what the interface receives.
pub fn tcx_link_create(prog: impl AsFd, ifindex: u32, ingress: bool) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: if ingress {
            BPF_TCX_INGRESS
        } else {
            BPF_TCX_EGRESS
        },
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program of the link `link` with `prog`: traffic sees either the old
/// or the new program, never none.
pub fn link_update(link: impl AsFd, prog: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: prog.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The interface a tcx link is attached to; 0 when the interface is gone (the link is defunct).
pub fn tcx_link_ifindex(link: impl AsFd) -> io::Result<u32> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != BPF_LINK_TYPE_TCX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link {} is of type {}, not tcx", info.id, info.type_),
        ));
    }
    Ok(info.ifindex)
}

/// The flow-event ring buffer, registered with the async runtime (it becomes readable when the
/// kernel submits records).
pub fn async_ring_buffer(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
) -> io::Result<tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>> {
    // SAFETY: the ring buffer owns its map's file descriptor (`MapData` holds an `OwnedFd`) and
    // the `AsyncFd` owns the ring buffer, so the descriptor stays open, and `as_raw_fd` returns
    // the same one, for as long as the `AsyncFd` exists.
    unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(io::Error::from)
}
