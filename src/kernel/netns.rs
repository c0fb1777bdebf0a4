//! Network namespaces: open a container's netns from its pid, run a closure inside one.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use nix::sched::{CloneFlags, setns};

/// Opens `/proc/<pid>/ns/net`.
pub fn open_pid(pid: i32) -> io::Result<File> {
    File::open(format!("/proc/{pid}/ns/net"))
}

/// Inode of a netns file: identifies the namespace while it lives.
pub fn inode(f: &File) -> io::Result<u64> {
    Ok(f.metadata()?.ino())
}

/// Whether `f` is a namespace file (nsfs), not e.g. the empty file left by a lost bind mount.
pub fn is_nsfs(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes into st, a properly sized buffer, for a valid fd.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) };
    // f_type's width differs between targets.
    #[allow(clippy::unnecessary_cast)]
    let nsfs = |st: libc::statfs| st.f_type as i64 == NSFS_MAGIC;
    // SAFETY: st is only read after a successful fstatfs initialised it.
    rc == 0 && nsfs(unsafe { st.assume_init() })
}

/// Inode of this process's own network namespace.
pub fn self_inode() -> io::Result<u64> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Runs `f` with the calling thread inside `ns`, then switches back (also on error).
pub fn with_netns<T>(ns: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let out = f();
    setns(home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    Ok(out)
}

/// Keeps the netns of `pid` alive at `path` (a bind mount of `/proc/<pid>/ns/net`), the role
/// ECS's pause container plays, so a task's interfaces survive until poststop hands them back.
pub fn pin(pid: i32, path: &std::path::Path) -> io::Result<()> {
    use nix::mount::{MsFlags, mount};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    File::create(path)?;
    let src = format!("/proc/{pid}/ns/net");
    if let Err(e) = mount(
        Some(src.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = std::fs::remove_file(path);
        return Err(io::Error::from(e));
    }
    Ok(())
}

/// Releases a pin made by [`pin`]; a missing pin is fine.
pub fn unpin(path: &std::path::Path) -> io::Result<()> {
    use nix::mount::{MntFlags, umount2};
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
