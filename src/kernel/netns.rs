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
