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
    use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
    fstatfs(f).is_ok_and(|st| st.filesystem_type() == NSFS_MAGIC)
}

/// Whether a bind mount in this mount namespace holds the network namespace with inode `ino`
/// (as `ip netns add`, podman and CRI-O pin one). Unreadable mountinfo counts as held.
pub fn held_by_mount(ino: u64) -> bool {
    let needle = format!("net:[{ino}]");
    std::fs::read_to_string("/proc/self/mountinfo").map_or(true, |m| {
        m.lines()
            .any(|l| l.split(' ').nth(3).is_some_and(|root| root == needle))
    })
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
    let dir = path.parent();
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    if let Err(e) = File::create(path) {
        // The directory was removed as empty between the two calls (the last pin of another
        // container went): make it again, once.
        match dir {
            Some(dir) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)?;
                File::create(path)?;
            }
            _ => return Err(e),
        }
    }
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

/// Opens a pin made by [`pin`]: `None` when the file is gone or is no longer a namespace (a
/// pin whose bind mount was lost, after a reboot or in another mount namespace, is an empty
/// file).
pub fn open_pin(path: &std::path::Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) if is_nsfs(&f) => Ok(Some(f)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Releases a pin made by [`pin`]; a missing pin is fine.
pub fn unpin(path: &std::path::Path) -> io::Result<()> {
    use nix::mount::{MntFlags, umount2};
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The pins' directory goes with its last pin (a failed setup leaves no empty directory);
    // one still holding others stays (ENOTEMPTY).
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}
