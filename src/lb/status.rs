//! Registrar status files: `<state dir>/registrars/<pid>.json`, one per running registrar,
//! saying which ledger revision all its sinks have applied. `shim drain` reads them to know
//! when every load balancer on this host has stopped sending new connections to a container.
//!
//! ```json
//! {"pid": 4242, "startTime": 123456, "revision": 17, "sinks": ["haproxy /run/haproxy/admin.sock"], "updated": 1767225600}
//! ```
//!
//! `startTime` is the process start time from `/proc/<pid>/stat` (clock ticks since boot): a
//! file whose pid is gone or now belongs to another process is stale and ignored (a registrar
//! killed with SIGKILL leaves its file; the next registrar removes such files). Files are
//! written to a temp name and renamed, so a reader never sees half of one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The subdirectory of the state dir holding the status files.
pub const DIR: &str = "registrars";

/// What one registrar reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub pid: u32,
    pub start_time: u64,
    /// The ledger revision every sink has applied.
    pub revision: u64,
    pub sinks: Vec<String>,
    /// Seconds since the epoch of the last write.
    pub updated: u64,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// Start time of process `pid` (field 22 of `/proc/<pid>/stat`), `None` if it does not exist
/// or is a zombie (killed, not yet reaped: not running).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    if matches!(f.next(), Some("Z" | "X")) {
        return None;
    }
    f.nth(18)?.parse().ok()
}

/// Whether the status file's process is still the one that wrote it.
pub fn is_live(s: &Status) -> bool {
    start_time(s.pid) == Some(s.start_time)
}

/// Writes this process's status file atomically.
pub fn write(state_dir: &Path, s: &Status) -> io::Result<()> {
    let d = dir(state_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)?;
    let path = d.join(format!("{}.json", s.pid));
    let tmp = d.join(format!(".{}.json.tmp", s.pid));
    let bytes = serde_json::to_vec(s).map_err(io::Error::other)?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    fs::rename(&tmp, &path)
}

/// Removes this process's status file (on a clean exit).
pub fn remove(state_dir: &Path, pid: u32) {
    let _ = fs::remove_file(dir(state_dir).join(format!("{pid}.json")));
}

/// Every status file that parses: (path, status). Unreadable or half-made ones are skipped.
pub fn read_all(state_dir: &Path) -> Vec<(PathBuf, Status)> {
    let Ok(rd) = fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if let Ok(bytes) = fs::read(&p)
            && let Ok(s) = serde_json::from_slice::<Status>(&bytes)
        {
            out.push((p, s));
        }
    }
    out.sort_by_key(|(_, s)| s.pid);
    out
}

/// The running registrars (stale files left by killed ones are skipped).
pub fn live(state_dir: &Path) -> Vec<Status> {
    read_all(state_dir)
        .into_iter()
        .map(|(_, s)| s)
        .filter(is_live)
        .collect()
}

/// Deletes the files of registrars that are gone; returns their pids.
pub fn remove_stale(state_dir: &Path) -> Vec<u32> {
    let mut gone = Vec::new();
    for (p, s) in read_all(state_dir) {
        if !is_live(&s) && fs::remove_file(&p).is_ok() {
            gone.push(s.pid);
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_file_is_live_and_a_dead_pid_is_stale() {
        let d = std::env::temp_dir().join(format!("nsunit-status-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let me = std::process::id();
        let st = start_time(me).unwrap();
        let s = Status {
            pid: me,
            start_time: st,
            revision: 7,
            sinks: vec!["file-sd /x".into()],
            updated: 1,
        };
        write(&d, &s).unwrap();
        assert_eq!(live(&d), vec![s.clone()]);
        // Same pid, another start time: a reused pid, not this registrar.
        write(
            &d,
            &Status {
                start_time: st + 1,
                ..s.clone()
            },
        )
        .unwrap();
        assert!(live(&d).is_empty());
        assert_eq!(remove_stale(&d), vec![me]);
        assert!(read_all(&d).is_empty());
        write(&d, &s).unwrap();
        remove(&d, me);
        assert!(read_all(&d).is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn start_time_of_running_gone_and_zombie_processes() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(u32::MAX), None);
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie is not a running registrar.
        let gone = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            start_time(pid).is_none()
        });
        assert!(gone, "zombie {pid} counted as running");
        child.wait().unwrap();
    }
}
