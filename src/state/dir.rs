//! The state directory on disk:
//!
//! ```text
//! <dir>/lock                 flock of every writer; holds the holder's pid
//! <dir>/containers/<id>.json the committed records (replaced by rename; fsynced)
//! <dir>/pending/<id>.json    a setup's intent, written before it touches the kernel
//! <dir>/claims/…             who holds what (see claims.rs); derived, rebuilt by `shim gc`
//! <dir>/index.json           next-fit cursors and the revision
//! <dir>/netns/<id>           netns pins of exclusive and branch tasks
//! <dir>/corrupt/             records `shim gc` moved aside
//! ```
//!
//! A setup writes its intent, then its claims, then touches the kernel, then commits the record
//! and drops the intent; a writer that finds an intent after taking the lock knows its writer
//! died and rolls it back before doing anything else. Teardown deletes the record before its
//! claims, so a crash can leave a claim held too long (repaired by `shim gc`), never a port or
//! address handed out twice. Containers are named by their id, which the hook checks is a safe
//! file name. The directory must belong to root and be writable by no one else; files are
//! created with `O_EXCL | O_NOFOLLOW`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::claims::{ClaimDir, claims_of, create_excl};
use super::{Backing, ContainerRecord, Cursors, STATE_VERSION, State, StateError};

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// The global writer lock; released on drop (and by the kernel if the process dies).
pub struct Lock {
    _file: Flock<File>,
}

/// `index.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    version: u32,
    #[serde(default)]
    cursors: Cursors,
    #[serde(default)]
    revision: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(path: &Path, cause: io::Error) -> StateError {
    StateError::Io {
        path: path.display().to_string(),
        cause,
    }
}

/// "pid N" of the lock's holder, as it wrote itself into the lock file.
fn holder(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "another process".into())
}

fn record_path(records: &Path, id: &str) -> PathBuf {
    records.join(format!("{id}.json"))
}

/// A record from its bytes, checked to act only on what is netshim's (see
/// [`ContainerRecord::check`]); the state dir is the parent of the file's directory.
fn parse_record(path: &Path, bytes: &[u8]) -> Result<ContainerRecord, StateError> {
    let corrupt = |msg: String| StateError::Corrupt {
        path: path.display().to_string(),
        msg,
    };
    let r: ContainerRecord = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let dir = path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    r.check(dir).map_err(corrupt)?;
    let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("");
    if name != r.id {
        return Err(corrupt(format!("it holds container {:?}", r.id)));
    }
    Ok(r)
}

fn open_read(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut b = Vec::new();
    f.read_to_end(&mut b)?;
    Ok(b)
}

/// The committed record of `id` in `records`, `None` if there is none.
pub fn read_record(records: &Path, id: &str) -> Result<Option<ContainerRecord>, StateError> {
    let p = record_path(records, id);
    match open_read(&p) {
        Ok(b) => parse_record(&p, &b).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&p, e)),
    }
}

/// Record files that did not parse, with why.
pub type Unreadable = Vec<(PathBuf, StateError)>;

/// Every record in `records` (sorted by id), and the files that did not parse.
pub fn read_records(records: &Path) -> Result<(Vec<ContainerRecord>, Unreadable), StateError> {
    let entries = match fs::read_dir(records) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], vec![])),
        Err(e) => return Err(io_err(records, e)),
    };
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    for e in entries {
        let e = e.map_err(|x| io_err(records, x))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let p = e.path();
        let bytes = match open_read(&p) {
            Ok(b) => b,
            // Deleted while listing: a teardown committed meanwhile.
            Err(x) if x.kind() == io::ErrorKind::NotFound => continue,
            Err(x) => return Err(io_err(&p, x)),
        };
        match parse_record(&p, &bytes) {
            Ok(r) => out.push(r),
            Err(x) => bad.push((p, x)),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((out, bad))
}

/// Replaces `dir/name` atomically: a temp file created exclusively, written, renamed; with
/// `sync`, fsynced before and the directory after.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> io::Result<()> {
    write_atomic_via(dir, &format!(".{name}.tmp"), dir, name, bytes, sync)
}

/// [`write_atomic`] with the temp file `tmp_name` in `tmp_dir` (same file system), renamed into
/// `dir`: records are written through the small intent directory, so that sweeping the temp
/// files a kill left behind never has to list every record.
fn write_atomic_via(
    tmp_dir: &Path,
    tmp_name: &str,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    sync: bool,
) -> io::Result<()> {
    let path = dir.join(name);
    let tmp = tmp_dir.join(tmp_name);
    // A temp file left by a crash (or planted: creation below refuses to follow anything).
    let _ = fs::remove_file(&tmp);
    let mut f = match create_excl(&tmp) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for d in [tmp_dir, dir] {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)?;
            }
            create_excl(&tmp)?
        }
        r => r?,
    };
    let r = f
        .write_all(bytes)
        .and_then(|()| if sync { f.sync_all() } else { Ok(()) });
    drop(f);
    let r = r.and_then(|()| match fs::rename(&tmp, &path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && tmp_dir != dir => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            fs::rename(&tmp, &path)
        }
        r => r,
    });
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    fn records(&self) -> PathBuf {
        self.dir.join("containers")
    }
    fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }
    pub fn claims(&self) -> ClaimDir {
        ClaimDir {
            root: self.dir.join("claims"),
        }
    }
    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }
    /// The single-file ledger of earlier versions, migrated on first use.
    pub fn legacy_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Whether the directory holds a ledger at all (poststop and gc have nothing to do
    /// otherwise).
    pub fn exists(&self) -> bool {
        self.index_path().exists()
            || self.records().exists()
            || self.pending_dir().exists()
            || self.legacy_path().exists()
    }

    /// Creates the directory 0700, and checks an existing one: a directory (not a symlink),
    /// owned by this user (root), writable by no one else. A state dir others can write would
    /// let them forge records that poststop acts on.
    pub fn ensure(&self) -> Result<(), StateError> {
        let path = self.dir.display().to_string();
        let meta = match fs::symlink_metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.dir)
                    .map_err(|cause| StateError::Dir {
                        path: path.clone(),
                        cause,
                    })?;
                fs::symlink_metadata(&self.dir).map_err(|cause| StateError::Dir {
                    path: path.clone(),
                    cause,
                })?
            }
            Err(cause) => return Err(StateError::Dir { path, cause }),
        };
        let unsafe_ = |why: String| StateError::Unsafe {
            path: path.clone(),
            why,
        };
        if meta.file_type().is_symlink() {
            return Err(unsafe_("it is a symbolic link".into()));
        }
        if !meta.is_dir() {
            return Err(unsafe_("it is not a directory".into()));
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(unsafe_(format!("it is owned by uid {}", meta.uid())));
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(unsafe_(format!(
                "it is writable by group or others (mode {:o})",
                mode & 0o777
            )));
        }
        if mode & 0o077 != 0 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                .map_err(|cause| StateError::Dir { path, cause })?;
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

    fn read_index(&self) -> Result<Index, StateError> {
        let p = self.index_path();
        match open_read(&p) {
            Ok(b) => {
                let i: Index = serde_json::from_slice(&b).map_err(|e| StateError::Corrupt {
                    path: p.display().to_string(),
                    msg: e.to_string(),
                })?;
                if i.version != STATE_VERSION {
                    return Err(StateError::Version {
                        path: p.display().to_string(),
                        found: i.version,
                    });
                }
                Ok(i)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index {
                version: STATE_VERSION,
                ..Index::default()
            }),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    fn write_index(&self, st: &State) -> Result<(), StateError> {
        let i = Index {
            version: STATE_VERSION,
            cursors: st.cursors.clone(),
            revision: st.revision,
        };
        let bytes = serde_json::to_vec(&i).map_err(|e| io_err(&self.index_path(), e.into()))?;
        write_atomic(&self.dir, "index.json", &bytes, false)
            .map_err(|e| io_err(&self.index_path(), e))
    }

    /// A consistent snapshot of the committed records, with no lock: records are replaced by
    /// rename, so each is the old or the new one, never half of one. A record that does not
    /// parse is an error naming it.
    pub fn load(&self) -> Result<State, StateError> {
        let (st, bad) = self.load_lenient()?;
        match bad.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(st),
        }
    }

    /// Like [`StateDir::load`], but records that do not parse are returned beside the snapshot.
    pub fn load_lenient(&self) -> Result<(State, Unreadable), StateError> {
        if !self.records().exists() && self.legacy_path().exists() {
            return Ok((self.read_legacy()?, vec![]));
        }
        let idx = self.read_index()?;
        let (recs, bad) = read_records(&self.records())?;
        let mut st = State {
            cursors: idx.cursors,
            revision: idx.revision,
            ..State::default()
        };
        for r in recs {
            st.insert(r);
        }
        Ok((st, bad))
    }

    fn read_legacy(&self) -> Result<State, StateError> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let path = self.legacy_path();
        let bytes = open_read(&path).map_err(|e| io_err(&path, e))?;
        let p = path.display().to_string();
        match serde_json::from_slice::<State>(&bytes) {
            Ok(st) if st.version == STATE_VERSION => Ok(st),
            Ok(st) => Err(StateError::Version {
                path: p,
                found: st.version,
            }),
            Err(e) => match serde_json::from_slice::<Probe>(&bytes) {
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

    /// Moves a single-file ledger of an earlier version into this layout (under the lock).
    fn migrate(&self, lock: &Lock) -> Result<(), StateError> {
        if !self.legacy_path().exists() {
            return Ok(());
        }
        let st = self.read_legacy()?;
        for r in st.containers.values() {
            self.write_record(r)?;
        }
        self.claims()
            .rebuild(st.containers.values())
            .map_err(|e| io_err(&self.claims().root, e))?;
        self.write_index(&st)?;
        let _ = lock;
        fs::remove_file(self.legacy_path()).map_err(|e| io_err(&self.legacy_path(), e))
    }

    /// The hook's view: answers from the claim files, records read one at a time.
    pub fn open(&self, lock: &Lock) -> Result<State, StateError> {
        self.migrate(lock)?;
        let idx = self.read_index()?;
        Ok(State::backed(
            Backing {
                claims: self.claims(),
                records: self.records(),
            },
            idx.cursors,
            idx.revision,
        ))
    }

    fn write_record(&self, r: &ContainerRecord) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(r).map_err(|e| io_err(&self.records(), e.into()))?;
        let name = format!("{}.json", r.id);
        write_atomic_via(
            &self.pending_dir(),
            &format!(".{name}.record.tmp"),
            &self.records(),
            &name,
            &bytes,
            true,
        )
        .map_err(|e| io_err(&record_path(&self.records(), &r.id), e))
    }

    fn add_claims(&self, r: &ContainerRecord) -> Result<(), StateError> {
        let cd = self.claims();
        for (c, detail) in claims_of(r) {
            cd.add(&c, &r.id, &detail)
                .map_err(|e| io_err(&cd.root.join(c.rel_path()), e))?;
        }
        Ok(())
    }

    fn drop_claims(&self, r: &ContainerRecord, used: bool) -> Result<(), StateError> {
        let (cd, t) = (self.claims(), used.then(now));
        for (c, _) in claims_of(r) {
            cd.remove(&c, &r.id, t)
                .map_err(|e| io_err(&cd.root.join(c.rel_path()), e))?;
        }
        Ok(())
    }

    /// Records a setup's intent and its claims, before it touches the kernel.
    pub fn begin(&self, r: &ContainerRecord, _lock: &Lock) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(r).map_err(|e| io_err(&self.pending_dir(), e.into()))?;
        write_atomic(
            &self.pending_dir(),
            &format!("{}.json", r.id),
            &bytes,
            false,
        )
        .map_err(|e| io_err(&record_path(&self.pending_dir(), &r.id), e))?;
        self.add_claims(r)
    }

    /// Commits a setup: the record, then the intent dropped, the index advanced.
    pub fn commit(
        &self,
        r: &ContainerRecord,
        st: &mut State,
        _lock: &Lock,
    ) -> Result<(), StateError> {
        self.write_record(r)?;
        let p = record_path(&self.pending_dir(), &r.id);
        remove(&p).map_err(|e| io_err(&p, e))?;
        st.revision += 1;
        self.write_index(st)
    }

    /// Gives up an intent whose kernel side was undone: its claims go, then the intent.
    pub fn abandon(&self, r: &ContainerRecord, _lock: &Lock) -> Result<(), StateError> {
        self.drop_claims(r, false)?;
        let p = record_path(&self.pending_dir(), &r.id);
        remove(&p).map_err(|e| io_err(&p, e))?;
        Ok(())
    }

    /// Drops an intent whose setup did commit (a crash between the two).
    pub fn drop_intent(&self, id: &str, _lock: &Lock) -> Result<(), StateError> {
        let p = record_path(&self.pending_dir(), id);
        remove(&p).map_err(|e| io_err(&p, e))?;
        Ok(())
    }

    /// Removes the temp files of writes a kill interrupted (`.<name>.tmp`, all written in the
    /// intent directory, which holds only the setups under way): under the lock no write is
    /// under way, and an intent or record that never got its name committed nothing. Returns
    /// what it removed. Every hook runs it, so it never lists the records.
    pub fn sweep_temp(&self, lock: &Lock) -> Result<Vec<PathBuf>, StateError> {
        self.sweep_temp_in(&[self.pending_dir()], lock)
    }

    /// [`Self::sweep_temp`], and the record directory too, where versions before records were
    /// written through the intent directory left their temp files (`shim gc`).
    pub fn sweep_temp_everywhere(&self, lock: &Lock) -> Result<Vec<PathBuf>, StateError> {
        self.sweep_temp_in(&[self.pending_dir(), self.records()], lock)
    }

    fn sweep_temp_in(&self, dirs: &[PathBuf], _lock: &Lock) -> Result<Vec<PathBuf>, StateError> {
        let mut gone = Vec::new();
        for dir in dirs {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(dir, e)),
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let p = e.path();
                    if remove(&p).map_err(|x| io_err(&p, x))? {
                        gone.push(p);
                    }
                }
            }
        }
        Ok(gone)
    }

    /// Intents of setups that did not finish (their writer died: only a lock holder writes
    /// them, and it finishes or abandons them before letting go).
    pub fn pending(&self) -> Result<Vec<ContainerRecord>, StateError> {
        // Temp files of interrupted writes (`.<name>.tmp`) are not read here: `sweep_temp`
        // removes them under the lock.
        read_records(&self.pending_dir()).map(|(r, bad)| {
            // An intent that does not parse held nothing that is not also in its claims:
            // drop it; `shim gc` reconciles claims and kernel objects.
            for (p, _) in bad {
                let _ = fs::remove_file(p);
            }
            r
        })
    }

    /// Forgets a released container: the record first, then its claims (so a crash between
    /// the two can only hold a claim too long), then the index advanced.
    pub fn forget(
        &self,
        r: &ContainerRecord,
        st: &mut State,
        _lock: &Lock,
    ) -> Result<(), StateError> {
        let p = record_path(&self.records(), &r.id);
        remove(&p).map_err(|e| io_err(&p, e))?;
        if let Ok(d) = File::open(self.records()) {
            let _ = d.sync_all();
        }
        self.drop_claims(r, true)?;
        st.revision += 1;
        self.write_index(st)
    }

    /// Rewrites a committed record whose claims did not change (e.g. `shim drain` marking it),
    /// advancing the revision. Returns the new revision.
    pub fn put(&self, r: &ContainerRecord, _lock: &Lock) -> Result<u64, StateError> {
        let mut idx = self.read_index()?;
        self.write_record(r)?;
        idx.revision += 1;
        let st = State {
            cursors: idx.cursors,
            revision: idx.revision,
            ..State::default()
        };
        self.write_index(&st)?;
        Ok(st.revision)
    }

    /// Moves a record that does not parse aside, to `corrupt/`.
    pub fn quarantine(&self, path: &Path, _lock: &Lock) -> Result<PathBuf, StateError> {
        let dir = self.dir.join("corrupt");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err(&dir, e))?;
        let name = path
            .file_name()
            .map(|n| format!("{}.{}", n.to_string_lossy(), now()))
            .unwrap_or_else(|| format!("record.{}", now()));
        let to = dir.join(name);
        fs::rename(path, &to).map_err(|e| io_err(path, e))?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Claim, PortRecord};
    use crate::types::{NetworkMode, Protocol};
    use std::net::Ipv4Addr;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nsunit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn record(id: &str) -> ContainerRecord {
        let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
        r.service = Some("web".into());
        r.pid = Some(42);
        r.netns_inode = Some(7);
        r.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
        r.veth = Some("nsh000000ab".into());
        r.bridge = Some("netshim0".into());
        r.ports = vec![PortRecord {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port: 49153,
            host_ip: None,
            name: None,
            dynamic: true,
            ct_zone: None,
        }];
        r
    }

    #[test]
    fn a_setup_commits_and_a_teardown_forgets() {
        let d = tmpdir("rt");
        let sd = StateDir::new(&d);
        let lock = sd.lock().unwrap();
        let mut v = sd.open(&lock).unwrap();
        let r = record("a");
        sd.begin(&r, &lock).unwrap();
        assert_eq!(sd.pending().unwrap(), vec![r.clone()]);
        assert_eq!(v.port_holders(Protocol::Tcp, 49153).len(), 1);
        // An intent is not a record readers see.
        assert!(sd.load().unwrap().containers.is_empty());
        v.cursors.port = Some(49153);
        sd.commit(&r, &mut v, &lock).unwrap();
        assert!(sd.pending().unwrap().is_empty());
        let names = |sub: &str| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d.join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("containers"), vec!["a.json"], "only the record");
        assert!(names("pending").is_empty(), "no temp file left behind");
        let snap = sd.load().unwrap();
        assert_eq!(snap.containers.get("a"), Some(&r));
        assert_eq!(snap.cursors.port, Some(49153));
        assert_eq!(snap.revision, 1);
        assert_eq!(v.record("a"), Some(r.clone()));
        sd.forget(&r, &mut v, &lock).unwrap();
        assert!(sd.load().unwrap().containers.is_empty());
        assert!(v.port_holders(Protocol::Tcp, 49153).is_empty());
        assert!(v.released_at(Protocol::Tcp, 49153).is_some());
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_single_file_ledger_is_migrated() {
        let d = tmpdir("migrate");
        let sd = StateDir::new(&d);
        sd.ensure().unwrap();
        let mut old = State::default();
        old.insert(record("a"));
        fs::write(sd.legacy_path(), serde_json::to_vec(&old).unwrap()).unwrap();
        // Readers see it before migration, the first writer moves it.
        assert!(sd.load().unwrap().containers.contains_key("a"));
        let lock = sd.lock().unwrap();
        let v = sd.open(&lock).unwrap();
        assert!(!sd.legacy_path().exists());
        assert_eq!(v.record("a"), Some(record("a")));
        assert_eq!(v.holders(&Claim::Link("nsh000000ab".into()))[0].id, "a");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_records_are_refused_and_kept() {
        let d = tmpdir("corrupt");
        let sd = StateDir::new(&d);
        sd.ensure().unwrap();
        fs::create_dir_all(d.join("containers")).unwrap();
        fs::write(d.join("containers/x.json"), b"{not json").unwrap();
        let e = sd.load().unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("x.json"), "{e}");
        assert_eq!(fs::read(d.join("containers/x.json")).unwrap(), b"{not json");
        fs::write(d.join("index.json"), br#"{"version":99}"#).unwrap();
        fs::remove_file(d.join("containers/x.json")).unwrap();
        assert!(sd.load().unwrap_err().to_string().contains("version 99"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn temp_files_of_interrupted_writes_are_swept_under_the_lock() {
        let d = tmpdir("sweep");
        let sd = StateDir::new(&d);
        sd.ensure().unwrap();
        for sub in ["pending", "containers"] {
            fs::create_dir_all(d.join(sub)).unwrap();
            fs::write(d.join(sub).join(".a.json.tmp"), b"{\"half").unwrap();
        }
        fs::write(d.join("pending/.c.json.record.tmp"), b"{\"half").unwrap();
        fs::write(d.join("containers/b.json"), b"{}").unwrap();
        let lock = sd.lock().unwrap();
        // A hook's sweep lists the intent directory only, where every temp file is written.
        let gone = sd.sweep_temp(&lock).unwrap();
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert!(!d.join("pending/.a.json.tmp").exists());
        assert!(!d.join("pending/.c.json.record.tmp").exists());
        assert!(
            d.join("containers/.a.json.tmp").exists(),
            "not listed by a hook"
        );
        // gc's sweep also takes what older versions left among the records.
        let gone = sd.sweep_temp_everywhere(&lock).unwrap();
        assert_eq!(gone, vec![d.join("containers/.a.json.tmp")]);
        assert!(d.join("containers/b.json").exists(), "records are kept");
        drop(lock);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_state_dir_others_can_write_or_a_symlink_is_refused() {
        let d = tmpdir("unsafe");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateDir::new(&d).ensure().unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o777,
            "left as it was"
        );
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/", &link).unwrap();
        let e = StateDir::new(&link).ensure().unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_temp_symlink_is_never_followed() {
        let d = tmpdir("tmplink");
        let sd = StateDir::new(&d);
        sd.ensure().unwrap();
        let victim = d.with_extension("victim");
        fs::write(&victim, b"keep").unwrap();
        fs::create_dir_all(d.join("pending")).unwrap();
        let planted = d.join("pending/.a.json.record.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let lock = sd.lock().unwrap();
        let mut v = sd.open(&lock).unwrap();
        sd.commit(&record("a"), &mut v, &lock).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(!planted.exists());
        assert!(d.join("containers/a.json").exists());
        fs::remove_file(&victim).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lock_excludes_a_second_writer_and_names_its_holder() {
        let d = tmpdir("lock");
        let sd = StateDir::new(&d);
        let l = sd.lock().unwrap();
        let sd2 = sd.clone();
        let e = sd2
            .lock_within(Duration::from_millis(200))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("held by pid {}", std::process::id())),
            "{e}"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _l2 = sd2.lock().unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(l);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
