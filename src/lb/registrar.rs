//! The registrar loop: keeps every sink equal to its source, this host's ledger ([`Ledger`])
//! or the cluster view in etcd (`cluster::ClusterFeed`, `--from-etcd`).
//!
//! Each pass reads the source (the ledger: `StateDir::load`, lock-free), turns it into targets, checks new
//! serving targets with a TCP connect, and asks every sink to make itself equal to that (each
//! sink compares with what it reports itself: HAProxy's `show servers state`, the files on
//! disk). A pass runs when the state dir changes (inotify on the dir and every subdirectory
//! under it but those holding no committed state; records and the index are replaced by
//! rename), when a check flips, when a sink reports a
//! restart or reload, and on a periodic resync. Once every sink has applied a ledger revision,
//! the registrar says so in its status file (`status.rs`), which `shim drain` waits on.
//!
//! SIGTERM and SIGINT end it with exit 0 (status file removed); SIGHUP forces a resync.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::status::{self, Status};
use super::{Target, targets};
use crate::lb::entries::{PortEntry, entries};
use crate::state::StateDir;

/// Where a sink's change and error lines go: stderr, one line each (control characters
/// escaped, so no name can forge a line).
#[derive(Debug, Default)]
pub struct Log {
    /// Lines written (tests and the bench count them).
    pub lines: usize,
}

impl Log {
    pub fn line(&mut self, s: String) {
        self.lines += 1;
        log_line(&s);
    }
}

/// One log line from any thread of the registrar.
pub fn log_line(s: &str) {
    eprintln!("shim registrar: {}", crate::output::escape_controls(s));
}

/// What a pass asks the sinks to look like.
pub struct Want<'a> {
    /// The revision of what the entries were read from (the ledger's, or etcd's).
    pub revision: u64,
    /// The address of this host's bridge and host targets.
    pub host: Ipv4Addr,
    /// Every listed port (file-sd exports them all).
    pub entries: &'a [PortEntry],
    /// The TCP targets with a service, by group.
    pub targets: Vec<Target>,
    ready: &'a HashSet<(String, SocketAddrV4)>,
}

impl Want<'_> {
    /// Whether a serving target passed its TCP check.
    pub fn is_ready(&self, t: &Target) -> bool {
        self.ready.contains(&(t.container.clone(), t.addr))
    }
}

/// A load balancer (or a file one reads) the registrar keeps equal to the ledger.
pub trait Sink {
    /// `kind path`, for logs and the status file.
    fn label(&self) -> String;
    /// Makes the sink equal to `want`. `Ok(true)`: applied; `Ok(false)`: deferred (see
    /// [`Sink::due`]); `Err`: not applied, retried.
    fn apply(&mut self, want: &Want, log: &mut Log) -> anyhow::Result<bool>;
    /// Whether the sink changed under the registrar (restart, reload) since the last apply.
    fn changed(&mut self) -> bool {
        false
    }
    /// How often [`Sink::changed`] is asked.
    fn poll_every(&self) -> Option<Duration> {
        None
    }
    /// When a deferred apply should run.
    fn due(&self) -> Option<Instant> {
        None
    }
}

pub struct Options {
    pub source: Box<dyn Source>,
    pub sinks: Vec<Box<dyn Sink>>,
    pub resync: Duration,
    pub probe_timeout: Duration,
}

/// What one pass reads: the entries and the revision they come from.
pub struct Snapshot {
    pub revision: u64,
    pub host: Ipv4Addr,
    pub entries: Vec<PortEntry>,
}

/// Where the targets come from: this host's ledger, or the cluster view in etcd.
pub trait Source {
    /// Readable when [`Source::load`] may return something new.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Consumes what made [`Source::fd`] readable; true if a pass should run.
    fn drain(&mut self) -> bool;
    /// The periodic resync (re-read what may drift, such as the host address).
    fn resync(&mut self);
    /// The current entries; `Ok(None)` when there is nothing to apply yet.
    fn load(&mut self) -> Result<Option<Snapshot>, String>;
    /// The state dir whose registrar status files `shim drain` reads (the ledger only).
    fn status_dir(&self) -> Option<&Path>;
    fn describe(&self) -> String;
}

/// The ledger of this host, watched with inotify.
pub struct Ledger {
    sd: StateDir,
    root: PathBuf,
    watch: Watch,
    host_address: Box<dyn Fn() -> Ipv4Addr>,
    host: Ipv4Addr,
}

impl Ledger {
    /// `host_address` gives the address of bridge and host targets (re-read on each resync).
    pub fn open(
        state_dir: &Path,
        host_address: Box<dyn Fn() -> Ipv4Addr>,
    ) -> anyhow::Result<Ledger> {
        let sd = StateDir::new(state_dir);
        sd.ensure()?;
        let watch = Watch::new(state_dir)?;
        let host = host_address();
        Ok(Ledger {
            sd,
            root: state_dir.to_path_buf(),
            watch,
            host_address,
            host,
        })
    }
}

impl Source for Ledger {
    fn fd(&self) -> BorrowedFd<'_> {
        self.watch.ino.as_fd()
    }
    fn drain(&mut self) -> bool {
        self.watch.drain()
    }
    fn resync(&mut self) {
        self.host = (self.host_address)();
        self.watch.repair();
    }
    fn load(&mut self) -> Result<Option<Snapshot>, String> {
        let state = self
            .sd
            .load()
            .map_err(|e| format!("read the ledger: {e}: keeping the sinks as they are"))?;
        Ok(Some(Snapshot {
            revision: state.revision,
            host: self.host,
            entries: entries(&state, self.host, None, None),
        }))
    }
    fn status_dir(&self) -> Option<&Path> {
        Some(&self.root)
    }
    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// A serving target's TCP check.
struct Probe {
    first: Instant,
    next: Instant,
    ok: bool,
}

impl Probe {
    /// Often while a container starts (that is the propagation time), then less.
    fn backoff(&self, now: Instant) -> Duration {
        match now.duration_since(self.first) {
            d if d < Duration::from_millis(500) => Duration::from_millis(5),
            d if d < Duration::from_secs(5) => Duration::from_millis(50),
            _ => Duration::from_millis(500),
        }
    }
}

/// Connects to every address in parallel (a failing one may take the whole timeout).
fn check_all(addrs: &[SocketAddrV4], timeout: Duration) -> Vec<bool> {
    let mut out = vec![false; addrs.len()];
    for (chunk, res) in addrs.chunks(64).zip(out.chunks_mut(64)) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|a| {
                    s.spawn(move || {
                        TcpStream::connect_timeout(&std::net::SocketAddr::V4(*a), timeout).is_ok()
                    })
                })
                .collect();
            for (h, r) in handles.into_iter().zip(res.iter_mut()) {
                *r = h.join().unwrap_or(false);
            }
        });
    }
    out
}

/// The state dir and every directory below it (but the registrars' own), watched.
struct Watch {
    ino: Inotify,
    root: PathBuf,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

impl Watch {
    fn new(root: &Path) -> anyhow::Result<Watch> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("inotify_init")?;
        let mut w = Watch {
            ino,
            root: root.to_path_buf(),
            dirs: HashMap::new(),
        };
        w.add_tree(root);
        if w.dirs.is_empty() {
            anyhow::bail!("cannot watch {}", root.display());
        }
        Ok(w)
    }

    fn ignored(&self, name: &OsStr) -> bool {
        let n = name.to_string_lossy();
        n.starts_with('.') || n == "lock"
    }

    /// Directories of the state dir that hold no committed state: setups' intents, claims
    /// (derived from the records), netns pins, quarantined records, and the registrars' own
    /// status files. Their churn would only cause passes that change nothing.
    fn skipped(&self, dir: &Path) -> bool {
        dir == status::dir(&self.root)
            || ["pending", "claims", "netns", "corrupt"]
                .iter()
                .any(|d| dir == self.root.join(d))
    }

    fn add_tree(&mut self, dir: &Path) {
        if self.skipped(dir) || self.dirs.values().any(|d| d == dir) {
            return;
        }
        if let Ok(wd) = self.ino.add_watch(dir, DIR_EVENTS) {
            self.dirs.insert(wd, dir.to_path_buf());
        }
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) && !self.ignored(&e.file_name()) {
                    self.add_tree(&e.path());
                }
            }
        }
    }

    /// Reads pending events; true if the ledger may have changed.
    fn drain(&mut self) -> bool {
        let mut relevant = false;
        while let Ok(events) = self.ino.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                    continue;
                };
                if ev.mask.contains(AddWatchFlags::IN_IGNORED)
                    || ev.mask.contains(AddWatchFlags::IN_DELETE_SELF)
                {
                    self.dirs.remove(&ev.wd);
                    relevant = true;
                    continue;
                }
                let Some(name) = ev.name else {
                    relevant = true;
                    continue;
                };
                if self.ignored(&name) {
                    continue;
                }
                let path = dir.join(&name);
                if self.skipped(&path) {
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_ISDIR)
                    && ev
                        .mask
                        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    self.add_tree(&path);
                }
                relevant = true;
            }
        }
        relevant
    }

    /// Watches the root again if it was removed and made anew.
    fn repair(&mut self) {
        if !self.dirs.values().any(|d| *d == self.root) {
            let root = self.root.clone();
            self.add_tree(&root);
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs until SIGTERM or SIGINT.
pub fn run(mut o: Options) -> anyhow::Result<()> {
    let mut log = Log::default();
    // Signals arrive through a descriptor, so the loop handles them between passes.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).context("block signals")?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;

    let pid = std::process::id();
    let start_time = status::start_time(pid).unwrap_or(0);
    let status_dir = o.source.status_dir().map(Path::to_path_buf);
    if let Some(d) = &status_dir {
        for gone in status::remove_stale(d) {
            log.line(format!(
                "removed the status file of registrar {gone} (not running)"
            ));
        }
    }
    let labels: Vec<String> = o.sinks.iter().map(|s| s.label()).collect();
    let mut my_status = Status {
        pid,
        start_time,
        revision: 0,
        sinks: labels.clone(),
        updated: now_secs(),
    };
    // Registered from the start: a drain issued now waits for this registrar too.
    if let Some(d) = &status_dir {
        status::write(d, &my_status).context("write the status file")?;
    }
    log.line(format!(
        "watching {} for {}",
        o.source.describe(),
        labels.join(", ")
    ));

    let mut probes: HashMap<(String, SocketAddrV4), Probe> = HashMap::new();
    let mut ready: HashSet<(String, SocketAddrV4)> = HashSet::new();
    let mut last_applied: Option<u64> = None;
    // Whether the status file reports an applied revision yet (not only the start).
    let mut confirmed = false;
    let mut dirty = true;
    let mut next_resync = Instant::now() + o.resync;
    let mut next_retry: Option<Instant> = None;
    let mut next_poll: Vec<Option<Instant>> = o
        .sinks
        .iter()
        .map(|s| s.poll_every().map(|d| Instant::now() + d))
        .collect();
    let mut last_error: Vec<String> = vec![String::new(); o.sinks.len()];
    let mut last_load_error = String::new();

    loop {
        let now = Instant::now();
        if now >= next_resync {
            o.source.resync();
            dirty = true;
            next_resync = now + o.resync;
        }
        for (i, s) in o.sinks.iter_mut().enumerate() {
            if next_poll[i].is_some_and(|t| now >= t) {
                if s.changed() {
                    dirty = true;
                }
                next_poll[i] = s.poll_every().map(|d| now + d);
            }
            if s.due().is_some_and(|t| now >= t) {
                dirty = true;
            }
        }
        if next_retry.is_some_and(|t| now >= t) {
            dirty = true;
            next_retry = None;
        }

        crate::trace::mark("registrar-wait");
        // The entries and their targets.
        let snap = match o.source.load() {
            Ok(s) => {
                last_load_error.clear();
                s
            }
            Err(msg) => {
                if msg != last_load_error {
                    log.line(msg.clone());
                    last_load_error = msg;
                }
                next_retry = Some(now + Duration::from_millis(500));
                None
            }
        };
        if let Some(snap) = snap {
            if last_applied != Some(snap.revision) {
                dirty = true;
            }
            let list = snap.entries;
            let tg = targets(&list);
            // TCP checks of serving targets not yet ready.
            let live: HashSet<(String, SocketAddrV4)> = tg
                .iter()
                .filter(|t| !t.draining)
                .map(|t| (t.container.clone(), t.addr))
                .collect();
            probes.retain(|k, _| live.contains(k));
            ready.retain(|k| live.contains(k));
            for k in &live {
                probes.entry(k.clone()).or_insert(Probe {
                    first: now,
                    next: now,
                    ok: false,
                });
            }
            let due: Vec<(String, SocketAddrV4)> = probes
                .iter()
                .filter(|(_, p)| !p.ok && p.next <= now)
                .map(|(k, _)| k.clone())
                .collect();
            crate::trace::mark("registrar-load");
            if !due.is_empty() {
                let addrs: Vec<SocketAddrV4> = due.iter().map(|k| k.1).collect();
                let res = check_all(&addrs, o.probe_timeout);
                crate::trace::mark(&format!("registrar-check {}", addrs.len()));
                let after = Instant::now();
                for (k, ok) in due.into_iter().zip(res) {
                    if let Some(p) = probes.get_mut(&k) {
                        if ok {
                            p.ok = true;
                            ready.insert(k);
                            dirty = true;
                        } else {
                            p.next = after + p.backoff(after);
                        }
                    }
                }
            }
            if dirty {
                let want = Want {
                    revision: snap.revision,
                    host: snap.host,
                    entries: &list,
                    targets: tg,
                    ready: &ready,
                };
                let mut all = true;
                for (i, s) in o.sinks.iter_mut().enumerate() {
                    let r = s.apply(&want, &mut log);
                    crate::trace::mark("registrar-apply");
                    match r {
                        Ok(true) => {
                            if !last_error[i].is_empty() {
                                log.line(format!("{}: in step again", s.label()));
                                last_error[i].clear();
                            }
                        }
                        Ok(false) => all = false,
                        Err(e) => {
                            all = false;
                            let msg = format!("{e:#}");
                            if msg != last_error[i] {
                                log.line(msg.clone());
                                last_error[i] = msg;
                            }
                            next_retry = Some(Instant::now() + Duration::from_millis(200));
                        }
                    }
                }
                dirty = false;
                if all {
                    last_applied = Some(snap.revision);
                    if my_status.revision != snap.revision || !confirmed {
                        confirmed = true;
                        my_status.revision = snap.revision;
                        my_status.updated = now_secs();
                        if let Some(d) = &status_dir
                            && let Err(e) = status::write(d, &my_status)
                        {
                            log.line(format!("write the status file: {e}"));
                        }
                    }
                } else {
                    last_applied = None;
                }
            }
        }

        // Sleep until the next thing to do.
        let mut wake = next_resync;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t
                && t < wake
            {
                wake = t;
            }
        };
        consider(probes.values().filter(|p| !p.ok).map(|p| p.next).min());
        consider(next_retry);
        for (i, s) in o.sinks.iter().enumerate() {
            consider(next_poll[i]);
            consider(s.due());
        }
        let wait = wake.saturating_duration_since(Instant::now());
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [
            PollFd::new(o.source.fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(anyhow::anyhow!("poll: {e}")),
        }
        let sig_ready = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        let src_ready = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if sig_ready {
            while let Ok(Some(si)) = sfd.read_signal() {
                if si.ssi_signo == Signal::SIGHUP as u32 {
                    log.line("SIGHUP: resync".into());
                    next_resync = Instant::now();
                } else {
                    if let Some(d) = &status_dir {
                        status::remove(d, pid);
                    }
                    log.line("stopping: the load balancers keep their last targets".into());
                    return Ok(());
                }
            }
        }
        if src_ready && o.source.drain() {
            dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_run_in_parallel_and_tell_open_from_closed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        // A port nobody listens on: bind, read the port, close.
        let closed = {
            let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            match t.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                _ => unreachable!(),
            }
        };
        let mut addrs = vec![open; 100];
        addrs.push(closed);
        let r = check_all(&addrs, Duration::from_millis(500));
        assert!(r[..100].iter().all(|x| *x));
        assert!(!r[100]);
    }

    #[test]
    fn backoff_slows_down() {
        let t0 = Instant::now();
        let p = Probe {
            first: t0,
            next: t0,
            ok: false,
        };
        assert_eq!(p.backoff(t0), Duration::from_millis(5));
        assert_eq!(
            p.backoff(t0 + Duration::from_secs(1)),
            Duration::from_millis(50)
        );
        assert_eq!(
            p.backoff(t0 + Duration::from_secs(60)),
            Duration::from_millis(500)
        );
    }
}
