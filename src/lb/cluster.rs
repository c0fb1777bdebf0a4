//! The cluster view in etcd: each host's registrar publishes its targets on a lease of its
//! own ([`EtcdSink`]), and a load-balancer host reads every host's ([`ClusterFeed`], `shim
//! registrar --from-etcd`; [`list`], `shim ports list --etcd`).
//!
//! ```text
//! /netshim/v1/targets/<service>/<host-id>/<container-id>/<proto>-<containerPort>
//!     = the `ports list --json` object with "hostId"           (on the host's lease)
//! /netshim/v1/hosts/<host-id> = {"hostId", "address", "instanceId", "since"}  (same lease)
//! ```
//!
//! The lease (TTL `[lb] lease_seconds`) is kept alive at a third of its TTL; a host whose
//! registrar dies loses every key at once when the lease expires. Readers route a target only
//! while its host key exists.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::etcd::{Client, EtcdError, Event, Kv, Op};
use super::registrar::{Sink, Snapshot, Source, Want, log_line};
use crate::lb::entries::PortEntry;

/// Every key netshim writes starts with this.
pub const PREFIX: &str = "/netshim/v1/";
pub const TARGETS: &str = "/netshim/v1/targets/";
pub const HOSTS: &str = "/netshim/v1/hosts/";
/// etcd's default `--max-txn-ops`: a larger diff is split into several transactions.
const MAX_TXN_OPS: usize = 128;
/// The file in the state dir holding the lease of the last run.
pub const LEASE_FILE: &str = "registrar-etcd.lease";
/// How often the keys on the lease are compared with what the registrar believes it wrote.
const VERIFY_EVERY: Duration = Duration::from_secs(30);
/// The longest pause between attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One target as etcd holds it: the `ports list --json` object and the host it runs on.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEntry {
    #[serde(flatten)]
    pub entry: PortEntry,
    pub host_id: String,
}

/// `/netshim/v1/hosts/<host-id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub host_id: String,
    pub address: String,
    pub instance_id: String,
    /// Seconds since the epoch when this lease was granted.
    pub since: u64,
}

/// The key of one entry; `None` for an entry without a service (no load balancer routes it).
pub fn target_key(e: &PortEntry, host_id: &str) -> Option<String> {
    let svc = e.service.as_deref()?;
    Some(format!(
        "{TARGETS}{svc}/{host_id}/{}/{}-{}",
        e.container_id, e.protocol, e.container_port
    ))
}

/// The host id of a target key.
pub fn key_host(key: &str) -> Option<&str> {
    let mut parts = key.strip_prefix(TARGETS)?.split('/');
    let (_svc, host) = (parts.next()?, parts.next()?);
    (parts.next().is_some() && parts.next().is_some() && parts.next().is_none()).then_some(host)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The targets of alive hosts among `kvs` (a range of [`PREFIX`]).
pub fn alive_entries<'a>(kvs: impl Iterator<Item = &'a Kv>) -> Vec<ClusterEntry> {
    let mut hosts = BTreeSet::new();
    let mut targets = Vec::new();
    for kv in kvs {
        if let Some(h) = kv.key.strip_prefix(HOSTS) {
            hosts.insert(h.to_string());
        } else if key_host(&kv.key).is_some() {
            targets.push(kv);
        }
    }
    let mut out: Vec<ClusterEntry> = targets
        .into_iter()
        .filter_map(|kv| {
            let host = key_host(&kv.key)?;
            let e: ClusterEntry = serde_json::from_slice(&kv.value).ok()?;
            // A value must agree with its key (a hand-written key cannot route elsewhere).
            (hosts.contains(host)
                && e.host_id == host
                && target_key(&e.entry, host).as_deref() == Some(kv.key.as_str()))
            .then_some(e)
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.host_id, &a.entry.container_id, a.entry.container_port).cmp(&(
            &b.host_id,
            &b.entry.container_id,
            b.entry.container_port,
        ))
    });
    out
}

/// `shim ports list --etcd`: every alive host's entries.
pub fn list(url: &str) -> anyhow::Result<Vec<ClusterEntry>> {
    let c = Client::new(url)?;
    let (_, kvs) = c
        .range_prefix(PREFIX)
        .map_err(|e| anyhow::anyhow!("ports list --etcd: {e}: is etcd running there?"))?;
    Ok(alive_entries(kvs.iter()))
}

// ---------------------------------------------------------------------------------------------
// Publishing: the etcd sink.

/// What the registrar asks the publisher for, and what it reports back.
#[derive(Default)]
struct Shared {
    /// The ledger revision, the host address and the target keys and values wanted.
    want: Option<(u64, Ipv4Addr, BTreeMap<String, String>)>,
    /// The ledger revision etcd holds.
    published: Option<u64>,
    /// Whether the last call to etcd got an answer.
    reachable: bool,
    stop: bool,
}

type SharedPair = Arc<(Mutex<Shared>, Condvar)>;

fn lock(p: &SharedPair) -> MutexGuard<'_, Shared> {
    p.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes this host's targets to etcd from a thread of its own: [`Sink::apply`] only hands
/// the wanted set over, so an unreachable etcd never holds back the other sinks.
pub struct EtcdSink {
    label: String,
    host_id: String,
    shared: SharedPair,
    waiting_since: Option<Instant>,
    next_ask: Option<Instant>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the publisher needs to know.
pub struct Publisher {
    pub client: Client,
    pub host_id: String,
    pub instance_id: String,
    pub ttl: u64,
    pub lease_file: PathBuf,
}

impl EtcdSink {
    pub fn start(p: Publisher) -> EtcdSink {
        let shared: SharedPair = Arc::new((
            Mutex::new(Shared {
                reachable: true,
                ..Shared::default()
            }),
            Condvar::new(),
        ));
        let label = format!("etcd {} as {}", p.client.url(), p.host_id);
        let host_id = p.host_id.clone();
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("etcd-publish".into())
            .spawn(move || Worker::new(p, s2).run())
            .ok();
        EtcdSink {
            label,
            host_id,
            shared,
            waiting_since: None,
            next_ask: None,
            thread,
        }
    }
}

impl Drop for EtcdSink {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Sink for EtcdSink {
    fn label(&self) -> String {
        self.label.clone()
    }

    /// `Ok(true)` once etcd holds this revision, or at once while etcd is unreachable (a drain
    /// does not wait for it then); `Ok(false)` while the publisher works on it.
    fn apply(&mut self, want: &Want, _log: &mut super::registrar::Log) -> anyhow::Result<bool> {
        let mut keys = BTreeMap::new();
        for e in want.entries {
            if let Some(k) = target_key(e, &self.host_id) {
                let v = serde_json::json!(ClusterEntry {
                    entry: e.clone(),
                    host_id: self.host_id.clone(),
                });
                keys.insert(k, v.to_string());
            }
        }
        let mut s = lock(&self.shared);
        let changed = s
            .want
            .as_ref()
            .is_none_or(|(r, h, k)| *r != want.revision || *h != want.host || *k != keys);
        if changed {
            s.want = Some((want.revision, want.host, keys));
            self.shared.1.notify_all();
        }
        let done = s.published == Some(want.revision) || !s.reachable;
        // While the publisher works, the registrar asks again soon (every 2 ms for the first
        // 50 ms, a transaction's usual time, then every 50 ms), so a drain learns of it.
        let now = Instant::now();
        self.waiting_since = (!done).then(|| self.waiting_since.unwrap_or(now));
        self.next_ask = self.waiting_since.map(|t| {
            now + if now.duration_since(t) < Duration::from_millis(50) {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(50)
            }
        });
        Ok(done)
    }

    fn due(&self) -> Option<Instant> {
        self.next_ask
    }
}

/// What etcd holds under one key for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    value: String,
    lease: i64,
}

struct Worker {
    p: Publisher,
    shared: SharedPair,
    lease: Option<(i64, u64)>,
    /// The lease of the previous run, revoked once this run has published.
    previous: Option<i64>,
    /// This host's keys as etcd holds them; `None`: unknown (read them again).
    held: Option<BTreeMap<String, Held>>,
    published: Option<(u64, Ipv4Addr, BTreeMap<String, String>)>,
    next_keepalive: Instant,
    next_verify: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

impl Worker {
    fn new(p: Publisher, shared: SharedPair) -> Worker {
        let previous = std::fs::read_to_string(&p.lease_file)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok());
        Worker {
            p,
            shared,
            lease: None,
            previous,
            held: None,
            published: None,
            next_keepalive: Instant::now(),
            next_verify: Instant::now() + VERIFY_EVERY,
            retry_at: None,
            backoff: Duration::from_millis(100),
            last_error: String::new(),
        }
    }

    fn keepalive_every(&self) -> Duration {
        Duration::from_millis(self.p.ttl * 1000 / 3)
    }

    fn run(mut self) {
        loop {
            let want = {
                let mut s = lock(&self.shared);
                loop {
                    if s.stop {
                        return;
                    }
                    let now = Instant::now();
                    let stale = s.want.is_some() && s.want != self.published;
                    let retry = self.retry_at.is_none_or(|t| now >= t);
                    if retry
                        && (stale
                            || (self.lease.is_some()
                                && (now >= self.next_keepalive || now >= self.next_verify)))
                    {
                        break;
                    }
                    let mut wake = self.retry_at.unwrap_or(now + Duration::from_secs(60));
                    if self.lease.is_some() && self.retry_at.is_none() {
                        wake = wake.min(self.next_keepalive).min(self.next_verify);
                    }
                    let wait = wake
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1));
                    s = self
                        .shared
                        .1
                        .wait_timeout(s, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                s.want.clone()
            };
            let r = self.step(want);
            let ok = r.is_ok();
            match r {
                Ok(()) => {
                    if !self.last_error.is_empty() {
                        log_line(&format!("{}: in step again", self.label()));
                        self.last_error.clear();
                    }
                    self.backoff = Duration::from_millis(100);
                    self.retry_at = None;
                }
                Err(EtcdError::LeaseGone) => {
                    log_line(&format!(
                        "{}: lease {} is gone (expired while etcd was out of reach, or revoked): granting a new one and publishing again",
                        self.label(),
                        self.lease.map_or(0, |l| l.0)
                    ));
                    self.lease = None;
                    self.held = None;
                    self.published = None;
                }
                Err(e) => {
                    let msg = format!("{}: {e}: retrying; the other sinks go on", self.label());
                    if msg != self.last_error {
                        log_line(&msg);
                        self.last_error = msg;
                    }
                    self.held = None;
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
            let mut s = lock(&self.shared);
            s.reachable = ok || self.last_error.is_empty();
            s.published = self.published.as_ref().map(|p| p.0);
        }
    }

    fn label(&self) -> String {
        format!("etcd {} as {}", self.p.client.url(), self.p.host_id)
    }

    /// One round: lease, keepalive, verification, publication.
    fn step(
        &mut self,
        want: Option<(u64, Ipv4Addr, BTreeMap<String, String>)>,
    ) -> Result<(), EtcdError> {
        let c = self.p.client.clone();
        let every = self.keepalive_every();
        let (lease, since) = match self.lease {
            Some(l) => l,
            None => {
                let id = c.grant(self.p.ttl)?;
                save_lease(&self.p.lease_file, id);
                self.lease = Some((id, now_secs()));
                self.held = None;
                self.published = None;
                self.next_keepalive = Instant::now() + every;
                log_line(&format!(
                    "{}: lease {id} granted (TTL {}s)",
                    self.label(),
                    self.p.ttl
                ));
                (id, now_secs())
            }
        };
        let now = Instant::now();
        if now >= self.next_keepalive {
            c.keepalive(lease)?;
            self.next_keepalive = Instant::now() + every;
        }
        if now >= self.next_verify {
            self.next_verify = now + VERIFY_EVERY;
            if let Some(held) = &self.held {
                let (_, keys) = c.lease_keys(lease)?;
                let on_lease: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
                let believed: BTreeSet<&str> = held
                    .iter()
                    .filter(|(_, h)| h.lease == lease)
                    .map(|(k, _)| k.as_str())
                    .collect();
                if on_lease != believed {
                    log_line(&format!(
                        "{}: etcd holds other keys than published: reading them again",
                        self.label()
                    ));
                    self.held = None;
                    self.published = None;
                }
            }
        }
        let Some(want) = want else { return Ok(()) };
        if self.published.as_ref() == Some(&want) && self.held.is_some() {
            return Ok(());
        }
        let held = match self.held.take() {
            Some(h) => h,
            None => self.read_held(&c)?,
        };
        let host_key = format!("{HOSTS}{}", self.p.host_id);
        let host_value = serde_json::json!(HostRecord {
            host_id: self.p.host_id.clone(),
            address: want.1.to_string(),
            instance_id: self.p.instance_id.clone(),
            since,
        })
        .to_string();
        let mut desired: BTreeMap<&str, &str> = want
            .2
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        desired.insert(&host_key, &host_value);
        let ops = diff(&held, &desired, lease);
        let puts = ops.iter().filter(|o| matches!(o, Op::Put { .. })).count();
        let t0 = Instant::now();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            c.txn(chunk)?;
        }
        if !ops.is_empty() {
            crate::trace::mark(&format!("etcd-txn {}", ops.len()));
            log_line(&format!(
                "{}: revision {}: {puts} put, {} deleted in {:.1} ms",
                self.label(),
                want.0,
                ops.len() - puts,
                t0.elapsed().as_secs_f64() * 1000.0
            ));
        }
        self.held = Some(
            desired
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Held {
                            value: v.to_string(),
                            lease,
                        },
                    )
                })
                .collect(),
        );
        self.published = Some(want);
        // Everything is on this run's lease now: the previous run's lease holds nothing
        // this host still has.
        if let Some(old) = self.previous.take()
            && old != lease
        {
            c.revoke(old)?;
            log_line(&format!(
                "{}: revoked lease {old} of the previous run",
                self.label()
            ));
        }
        Ok(())
    }

    /// This host's keys as etcd holds them (on any lease).
    fn read_held(&self, c: &Client) -> Result<BTreeMap<String, Held>, EtcdError> {
        let (_, kvs) = c.range_prefix(TARGETS)?;
        let (_, hosts) = c.range_prefix(&format!("{HOSTS}{}", self.p.host_id))?;
        let host_key = format!("{HOSTS}{}", self.p.host_id);
        Ok(kvs
            .into_iter()
            .filter(|kv| key_host(&kv.key) == Some(self.p.host_id.as_str()))
            .chain(hosts.into_iter().filter(|kv| kv.key == host_key))
            .map(|kv| {
                (
                    kv.key,
                    Held {
                        value: String::from_utf8_lossy(&kv.value).into_owned(),
                        lease: kv.lease,
                    },
                )
            })
            .collect())
    }
}

/// Puts for what is missing, different or on another lease; deletes for what is not wanted.
fn diff(held: &BTreeMap<String, Held>, desired: &BTreeMap<&str, &str>, lease: i64) -> Vec<Op> {
    let mut ops = Vec::new();
    for (k, v) in desired {
        if held
            .get(*k)
            .is_none_or(|h| h.value != *v || h.lease != lease)
        {
            ops.push(Op::Put {
                key: k.to_string(),
                value: v.to_string(),
                lease,
            });
        }
    }
    for k in held.keys() {
        if !desired.contains_key(k.as_str()) {
            ops.push(Op::Delete(k.clone()));
        }
    }
    ops
}

fn save_lease(path: &Path, id: i64) {
    let tmp = path.with_file_name(format!(".{LEASE_FILE}.tmp"));
    let r = std::fs::write(&tmp, format!("{id}\n")).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        log_line(&format!(
            "etcd: save the lease id in {}: {e} (the next run cannot revoke it; its keys expire by themselves)",
            path.display()
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Reading: the cluster feed of `--from-etcd`.

#[derive(Default)]
struct View {
    revision: i64,
    kvs: BTreeMap<String, Kv>,
    /// Set once a full read succeeded: before that there is nothing to apply.
    loaded: bool,
    stop: bool,
}

/// The cluster-wide set, kept by a thread that ranges [`PREFIX`] and then watches it; the
/// registrar loop polls [`ClusterFeed`]'s socket to learn of a change.
pub struct ClusterFeed {
    url: String,
    view: Arc<Mutex<View>>,
    wake: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClusterFeed {
    pub fn start(client: Client) -> anyhow::Result<ClusterFeed> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let view = Arc::new(Mutex::new(View::default()));
        let v2 = view.clone();
        let url = client.url().to_string();
        let thread = std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || follow(client, v2, notify))?;
        Ok(ClusterFeed {
            url,
            view,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for ClusterFeed {
    fn drop(&mut self) {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        // The thread may sit in a watch read of up to WATCH_SPAN: do not wait for it.
        drop(self.thread.take());
    }
}

fn view_lock(v: &Mutex<View>) -> MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watching thread: full read, then the watch from the next revision; any error or
/// compaction means a full read again. The view keeps its last content meanwhile.
fn follow(c: Client, view: Arc<Mutex<View>>, mut notify: UnixStream) {
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    let report = |e: &EtcdError, last_error: &mut String| {
        let msg = format!(
            "etcd {}: {e}: the load balancers keep their targets until etcd answers",
            c.url()
        );
        if *last_error != msg {
            log_line(&msg);
            *last_error = msg;
        }
    };
    'outer: loop {
        if view_lock(&view).stop {
            return;
        }
        let (rev, kvs) = match c.range_prefix(PREFIX) {
            Ok(r) => r,
            Err(e) => {
                report(&e, &mut last_error);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !last_error.is_empty() {
            log_line(&format!("etcd {}: read again at revision {rev}", c.url()));
            last_error.clear();
        }
        backoff = Duration::from_millis(100);
        {
            let mut v = view_lock(&view);
            v.revision = rev;
            v.kvs = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
            v.loaded = true;
        }
        let _ = notify.write(&[1]);
        let mut at = rev;
        loop {
            let mut w = match c.watch(PREFIX, at + 1) {
                Ok(w) => w,
                Err(e) => {
                    report(&e, &mut last_error);
                    std::thread::sleep(backoff);
                    continue 'outer;
                }
            };
            loop {
                match w.next() {
                    Ok(Some((r, events))) => {
                        if view_lock(&view).stop {
                            return;
                        }
                        if events.is_empty() {
                            continue;
                        }
                        at = at.max(r);
                        let mut v = view_lock(&view);
                        for ev in events {
                            match ev {
                                Event::Put(kv) => {
                                    v.kvs.insert(kv.key.clone(), kv);
                                }
                                Event::Delete(k) => {
                                    v.kvs.remove(&k);
                                }
                            }
                        }
                        v.revision = at;
                        drop(v);
                        let _ = notify.write(&[1]);
                    }
                    // The stream's span ended: watch on from where it got to.
                    Ok(None) => break,
                    Err(e) => {
                        report(&e, &mut last_error);
                        std::thread::sleep(backoff);
                        continue 'outer;
                    }
                }
            }
        }
    }
}

impl Source for ClusterFeed {
    fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let mut any = false;
        while let Ok(n) = (&self.wake).read(&mut buf) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }

    fn resync(&mut self) {}

    fn load(&mut self) -> Result<Option<Snapshot>, String> {
        let v = view_lock(&self.view);
        if !v.loaded {
            return Ok(None);
        }
        let entries = alive_entries(v.kvs.values())
            .into_iter()
            .map(|e| e.entry)
            .collect();
        Ok(Some(Snapshot {
            revision: u64::try_from(v.revision).unwrap_or(0),
            host: Ipv4Addr::UNSPECIFIED,
            entries,
        }))
    }

    fn status_dir(&self) -> Option<&Path> {
        None
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LbState;
    use crate::types::NetworkMode;

    fn entry(id: &str, svc: Option<&str>) -> PortEntry {
        PortEntry {
            container_id: id.into(),
            service: svc.map(String::from),
            network_mode: NetworkMode::Bridge,
            protocol: "tcp".into(),
            container_port: 80,
            host_port: 49153,
            bind_ip: "0.0.0.0".into(),
            container_ip: Some("10.213.0.2".into()),
            target_ip: "192.0.2.2".into(),
            target_port: 49153,
            name: None,
            dynamic: true,
            state: LbState::Serving,
            eni_mac: None,
        }
    }

    fn kv(key: &str, value: String) -> Kv {
        Kv {
            key: key.into(),
            value: value.into_bytes(),
            lease: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn keys_follow_the_contract_layout() {
        let e = entry("c1", Some("web"));
        let k = target_key(&e, "h1");
        assert_eq!(k.as_deref(), Some("/netshim/v1/targets/web/h1/c1/tcp-80"));
        assert_eq!(key_host("/netshim/v1/targets/web/h1/c1/tcp-80"), Some("h1"));
        assert_eq!(key_host("/netshim/v1/targets/web/h1/c1"), None);
        assert_eq!(key_host("/netshim/v1/hosts/h1"), None);
        assert_eq!(target_key(&entry("c2", None), "h1"), None);
    }

    #[test]
    fn only_targets_of_alive_hosts_whose_value_matches_the_key_are_routed() {
        let v = |id: &str, host: &str| {
            serde_json::to_string(&ClusterEntry {
                entry: entry(id, Some("web")),
                host_id: host.into(),
            })
            .unwrap()
        };
        let kvs = [
            kv("/netshim/v1/hosts/h1", "{}".into()),
            kv("/netshim/v1/targets/web/h1/a/tcp-80", v("a", "h1")),
            // host h2 has no host key: its lease expired or it never published one
            kv("/netshim/v1/targets/web/h2/b/tcp-80", v("b", "h2")),
            // a value claiming another host than its key
            kv("/netshim/v1/targets/web/h1/c/tcp-80", v("c", "h2")),
            kv("/netshim/v1/targets/web/h1/d/tcp-80", "not json".into()),
        ];
        let got: Vec<String> = alive_entries(kvs.iter())
            .into_iter()
            .map(|e| e.entry.container_id)
            .collect();
        assert_eq!(got, vec!["a"]);
    }

    #[test]
    fn the_value_is_the_ports_list_object_with_its_host() {
        let v = serde_json::to_value(ClusterEntry {
            entry: entry("a", Some("web")),
            host_id: "h1".into(),
        })
        .unwrap();
        assert_eq!(v["hostId"], "h1");
        assert_eq!(v["containerId"], "a");
        assert_eq!(v["state"], "serving");
        assert_eq!(v["targetPort"], 49153);
        let back: ClusterEntry = serde_json::from_value(v).unwrap();
        assert_eq!(back.entry, entry("a", Some("web")));
    }

    #[test]
    fn the_diff_puts_what_differs_or_sits_on_another_lease_and_deletes_the_rest() {
        let held: BTreeMap<String, Held> = [
            ("same", "1", 7),
            ("changed", "1", 7),
            ("old-lease", "1", 3),
            ("gone", "1", 7),
        ]
        .into_iter()
        .map(|(k, v, l)| {
            (
                k.to_string(),
                Held {
                    value: v.into(),
                    lease: l,
                },
            )
        })
        .collect();
        let desired: BTreeMap<&str, &str> = [
            ("same", "1"),
            ("changed", "2"),
            ("old-lease", "1"),
            ("new", "1"),
        ]
        .into_iter()
        .collect();
        let ops = diff(&held, &desired, 7);
        let put = |k: &str, v: &str| Op::Put {
            key: k.into(),
            value: v.into(),
            lease: 7,
        };
        assert_eq!(
            ops,
            vec![
                put("changed", "2"),
                put("new", "1"),
                put("old-lease", "1"),
                Op::Delete("gone".into()),
            ]
        );
    }
}
