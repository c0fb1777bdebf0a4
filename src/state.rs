//! The on-disk ledger: every container netshim set up, with the addresses and host ports it holds.
//!
//! One JSON file, `state.json`, replaced atomically (temp file, fsync, rename, fsync of the
//! directory), so a reader never sees a half-written file and a crash leaves either the old or
//! the new ledger. Writers hold one global lock (`lock`, flock) around allocate → apply → persist;
//! readers (`ports list`) take no lock at all.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use serde::{Deserialize, Serialize};

use crate::types::{Attachment, MacAddr, NetworkMode, Protocol};

/// Version of the state file format; a newer file is refused rather than misread.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state dir {path}: {cause}")]
    Dir { path: String, cause: io::Error },
    #[error("state lock {path}: {cause}")]
    Lock { path: String, cause: io::Error },
    #[error(
        "state file {path} is corrupt ({msg}): it was left untouched; move it aside after checking what is running, or run `shim gc` once it is repaired"
    )]
    Corrupt { path: String, msg: String },
    #[error(
        "state file {path} has version {found}, this shim understands {STATE_VERSION}: use the shim that wrote it"
    )]
    Version { path: String, found: u32 },
    #[error("state file {path}: {cause}")]
    Io { path: String, cause: io::Error },
    #[error(
        "the netshim lock {path} is held by {holder}, who did not release it within {waited:.1}s: is a hook or `shim gc` stuck? (hook.lock_timeout_seconds sets the wait)"
    )]
    Busy {
        path: String,
        holder: String,
        waited: f64,
    },
}

/// One host port held by a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRecord {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// `None`: all host addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Picked by netshim (true) or asked for (false).
    pub dynamic: bool,
}

/// Everything netshim did for one container: enough to undo it with no pid and no netns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    pub id: String,
    pub mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Seconds since the epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Inode of the container's netns at setup: tells a re-run (same netns) from a reused id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// awsvpc: the task's first IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Host end of the veth pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    /// Bridge the veth was attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortRecord>,
    /// awsvpc: the ENI the task holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<EniRecord>,
}

impl ContainerRecord {
    /// A record with nothing allocated yet.
    pub fn new(id: &str, mode: NetworkMode) -> Self {
        ContainerRecord {
            id: id.to_string(),
            mode,
            service: None,
            created: 0,
            pid: None,
            netns_inode: None,
            ip: None,
            ip6: None,
            veth: None,
            bridge: None,
            ports: Vec::new(),
            eni: None,
        }
    }
}

/// What an awsvpc setup did with the task's ENI, enough to hand it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniRecord {
    pub mac: MacAddr,
    /// The interface's name on the host before the task took it (branch: the trunk's name).
    pub name: String,
    pub attachment: Attachment,
    /// Exclusive: the bind mount keeping the task's netns alive until poststop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_pin: Option<PathBuf>,
    /// Shared: host end of the task's veth, the policy-routing table and the subnet gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Exclusive: the interface's MTU before the task took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Branch: the trunk's MAC and the VLAN id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

impl Default for EniRecord {
    fn default() -> Self {
        EniRecord {
            mac: MacAddr([0; 6]),
            name: String::new(),
            attachment: Attachment::Exclusive,
            netns_pin: None,
            veth: None,
            table: None,
            subnet: None,
            gateway: None,
            mtu: None,
            trunk: None,
            vlan: None,
        }
    }
}

/// Next-fit cursors: where the last allocation ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cursors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// The whole ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub cursors: Cursors,
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerRecord>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            cursors: Cursors::default(),
            containers: BTreeMap::new(),
        }
    }
}

impl State {
    /// Parses a state file's bytes, refusing garbage and newer versions. One pass in the
    /// common case; the version alone is read only to explain a failure.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<State, StateError> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let p = path.display().to_string();
        match serde_json::from_slice::<State>(bytes) {
            Ok(st) if st.version == STATE_VERSION => Ok(st),
            Ok(st) => Err(StateError::Version {
                path: p,
                found: st.version,
            }),
            Err(e) => match serde_json::from_slice::<Probe>(bytes) {
                Ok(probe) if probe.version != STATE_VERSION => Err(StateError::Version {
                    path: p,
                    found: probe.version,
                }),
                _ => Err(StateError::Corrupt {
                    path: p,
                    msg: e.to_string(),
                }),
            },
        }
    }
}

/// The state directory: the ledger, its lock and per-container files of modes that need them.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// The global writer lock; released on drop (and by the kernel if the process dies).
pub struct Lock {
    _file: Flock<File>,
}

/// "pid N" of the lock's holder, as it wrote itself into the lock file.
fn holder(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "another process".into())
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Creates the directory 0700 (and tightens an existing one).
    pub fn ensure(&self) -> Result<(), StateError> {
        let err = |cause| StateError::Dir {
            path: self.dir.display().to_string(),
            cause,
        };
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
        {
            Ok(()) => {}
            Err(e) => return Err(err(e)),
        }
        let meta = fs::metadata(&self.dir).map_err(err)?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
        Ok(())
    }

    /// Takes the global lock, waiting as long as it takes (maintenance commands).
    pub fn lock(&self) -> Result<Lock, StateError> {
        self.lock_within(Duration::MAX)
    }

    /// Takes the global lock: one writer at a time, across all modes. After a second of waiting
    /// it says who holds it; after `timeout` it gives up with an error naming the holder, so a
    /// hook ends before the runtime's own hook timeout kills it.
    pub fn lock_within(&self, timeout: Duration) -> Result<Lock, StateError> {
        self.ensure()?;
        let path = self.dir.join("lock");
        let err = |cause| StateError::Lock {
            path: path.display().to_string(),
            cause,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(err)?;
        let start = Instant::now();
        let mut said = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => {
                    // Who holds it, for anyone who has to wait.
                    let me = format!("{}\n", std::process::id());
                    let _ = held.set_len(0);
                    let _ = held.write_at(me.as_bytes(), 0);
                    return Ok(Lock { _file: held });
                }
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(err(io::Error::from(e))),
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(StateError::Busy {
                    path: path.display().to_string(),
                    holder: holder(&path),
                    waited: waited.as_secs_f64(),
                });
            }
            if !said && waited >= Duration::from_secs(1) {
                said = true;
                eprintln!(
                    "shim: waiting for the netshim lock held by {}",
                    holder(&path)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads the ledger; a missing file is an empty ledger. No lock needed: files are replaced
    /// by rename, so a reader sees the old or the new one, never half of one.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => State::from_bytes(&path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(cause) => Err(StateError::Io {
                path: path.display().to_string(),
                cause,
            }),
        }
    }

    /// Replaces the ledger atomically and durably. Caller holds the [`Lock`].
    pub fn store(&self, state: &State, _lock: &Lock) -> Result<(), StateError> {
        let path = self.state_path();
        let tmp = self.dir.join(".state.json.tmp");
        let err = |cause| StateError::Io {
            path: path.display().to_string(),
            cause,
        };
        let bytes = serde_json::to_vec(state).map_err(|e| err(io::Error::other(e)))?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nsunit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            mode: NetworkMode::Bridge,
            service: Some("web".into()),
            created: 1,
            pid: Some(42),
            netns_inode: Some(7),
            ip: Some(Ipv4Addr::new(10, 213, 0, 2)),
            ip6: None,
            veth: Some("nshabc".into()),
            bridge: Some("netshim0".into()),
            ports: vec![PortRecord {
                protocol: Protocol::Tcp,
                container_port: 80,
                host_port: 49153,
                host_ip: None,
                name: None,
                dynamic: true,
            }],
            eni: None,
        }
    }

    #[test]
    fn round_trip_and_dir_mode() {
        let d = tmpdir("rt");
        let sd = StateDir::new(&d);
        let lock = sd.lock().unwrap();
        assert_eq!(sd.load().unwrap(), State::default());
        let mut st = State::default();
        st.containers.insert("a".into(), record("a"));
        st.cursors.port = Some(49153);
        sd.store(&st, &lock).unwrap();
        assert_eq!(sd.load().unwrap(), st);
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(!d.join(".state.json.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_file_is_refused_and_kept() {
        let d = tmpdir("corrupt");
        let sd = StateDir::new(&d);
        sd.ensure().unwrap();
        fs::write(sd.state_path(), b"{not json").unwrap();
        let e = sd.load().unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        assert_eq!(fs::read(sd.state_path()).unwrap(), b"{not json");
        fs::write(sd.state_path(), br#"{"version":99}"#).unwrap();
        assert!(sd.load().unwrap_err().to_string().contains("version 99"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lock_excludes_a_second_writer() {
        let d = tmpdir("lock");
        let sd = StateDir::new(&d);
        let l = sd.lock().unwrap();
        let sd2 = sd.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _l2 = sd2.lock().unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        drop(l);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
