//! The HAProxy sink: its runtime API (a line protocol over the admin unix socket, one command
//! per connection) fills `server-template` slots with the ledger's targets.
//!
//! A slot is a server named `<prefix><n>` (default prefix `slot`, as `server-template slot 10
//! 127.0.0.1:1 disabled` makes them) in a backend named after the target's group. Every slot
//! is the registrar's: a target takes a free slot with `set server <b>/<s> addr <ip> port <p>`
//! then `state ready` (only after a TCP connect to it succeeded), a draining target's slot goes
//! to `state drain`, and a slot whose target is gone to `state maint`. Slots are never deleted
//! (`del server` crashes HAProxy 2.6 under load). What HAProxy reports (`show servers state`) is
//! compared with the ledger on every pass, so a restarted HAProxy (all slots back to `disabled`)
//! or a restarted registrar converges the same way, without duplicates.
//!
//! Every command is built from [`safe_name`]s, IPv4 addresses and port numbers only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use super::registrar::{Log, Sink, Want};
use super::{Target, safe_name};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Admin-state bits of `show servers state` (`srv_admin_state`).
const ADMF_FMAINT: u32 = 0x01;
const ADMF_IMAINT: u32 = 0x02;
const ADMF_FDRAIN: u32 = 0x08;
const ADMF_IDRAIN: u32 = 0x10;
const ADMF_RMAINT: u32 = 0x20;
const ADMF_HMAINT: u32 = 0x40;

/// A runtime API endpoint.
#[derive(Debug, Clone)]
pub struct Api {
    pub socket: PathBuf,
}

impl Api {
    pub fn new(socket: impl Into<PathBuf>) -> Api {
        Api {
            socket: socket.into(),
        }
    }

    /// Sends one command and returns HAProxy's whole answer (it closes the connection after a
    /// command when not in interactive mode).
    pub fn cmd(&self, line: &str) -> io::Result<String> {
        if line.contains(['\n', '\r', ';']) || line.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "one command, no separators",
            ));
        }
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// `show info`: the worker's pid and start time (both change on a restart or reload).
    pub fn process(&self) -> io::Result<(u32, u64)> {
        let out = self.cmd("show info")?;
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(": ")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (field("Pid"), field("Start_time_sec")) {
            (Some(pid), Some(start)) => Ok((pid as u32, start)),
            (Some(pid), None) => Ok((pid as u32, 0)),
            _ => Err(io::Error::other(format!(
                "not an HAProxy answer to show info: {:?}",
                out.chars().take(80).collect::<String>()
            ))),
        }
    }

    /// `show servers state`: every server of every backend.
    pub fn servers(&self) -> io::Result<Vec<Server>> {
        parse_servers(&self.cmd("show servers state")?).map_err(io::Error::other)
    }
}

/// What HAProxy reports about one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub backend: String,
    pub name: String,
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
    pub admin: u32,
}

/// A slot's state as the registrar sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ready,
    Drain,
    Maint,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Ready => "ready",
            Mode::Drain => "drain",
            Mode::Maint => "maint",
        }
    }
}

impl Server {
    pub fn mode(&self) -> Mode {
        // CMAINT (`disabled` in the config) stays set after `state ready`: not decisive.
        if self.admin & (ADMF_FMAINT | ADMF_IMAINT | ADMF_RMAINT | ADMF_HMAINT) != 0 {
            Mode::Maint
        } else if self.admin & (ADMF_FDRAIN | ADMF_IDRAIN) != 0 {
            Mode::Drain
        } else {
            Mode::Ready
        }
    }
    pub fn target(&self) -> Option<SocketAddrV4> {
        self.addr.map(|a| SocketAddrV4::new(a, self.port))
    }
}

/// Parses `show servers state` (format 1: a version line, a `#` header naming the columns,
/// one line per server).
pub fn parse_servers(text: &str) -> Result<Vec<Server>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next() {
        Some("1") => {}
        Some(other) => return Err(format!("unexpected show servers state answer: {other:?}")),
        None => return Ok(Vec::new()),
    }
    let header: Vec<&str> = match lines.next() {
        Some(h) if h.starts_with('#') => h.trim_start_matches('#').split_whitespace().collect(),
        _ => return Ok(Vec::new()),
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| format!("show servers state has no column {name}"))
    };
    let (be, sn, sa, ad, sp) = (
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_admin_state")?,
        col("srv_port")?,
    );
    let mut out = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        let get = |i: usize| f.get(i).copied().unwrap_or("");
        out.push(Server {
            backend: get(be).to_string(),
            name: get(sn).to_string(),
            addr: get(sa).parse().ok(),
            port: get(sp).parse().unwrap_or(0),
            admin: get(ad).parse().unwrap_or(0),
        });
    }
    Ok(out)
}

/// One change the sink makes to HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Put a target into a slot.
    Fill {
        backend: String,
        slot: String,
        addr: SocketAddrV4,
        mode: Mode,
        container: String,
    },
    /// Change a slot's state (same target).
    Set {
        backend: String,
        slot: String,
        addr: SocketAddrV4,
        mode: Mode,
        container: String,
    },
    /// Free a slot whose target is gone (or a duplicate).
    Free {
        backend: String,
        slot: String,
        addr: Option<SocketAddrV4>,
    },
}

/// The outcome of comparing HAProxy with the ledger.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Group → serving targets that wait for a free slot.
    pub waiting: BTreeMap<String, usize>,
    /// Groups that have targets but no backend with slots.
    pub missing: Vec<String>,
}

/// Whether `name` is a slot: `<prefix>` then digits.
pub fn is_slot(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Compares what HAProxy has with the targets; pure. `ready(t)`: a serving target passed its
/// TCP check. Targets keep their slot; a target in two slots keeps the first; a serving target
/// not yet in a slot takes the first free one (preferring a free slot that last held its
/// address); a draining target never takes a slot.
pub fn plan(
    servers: &[Server],
    prefix: &str,
    want: &[Target],
    ready: &dyn Fn(&Target) -> bool,
) -> Plan {
    let mut p = Plan::default();
    let mut slots: BTreeMap<&str, Vec<&Server>> = BTreeMap::new();
    for s in servers {
        if is_slot(&s.name, prefix) && safe_name(&s.backend) && safe_name(&s.name) {
            slots.entry(s.backend.as_str()).or_default().push(s);
        }
    }
    let mut by_group: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for t in want {
        by_group.entry(t.group.as_str()).or_default().push(t);
    }
    for g in by_group.keys() {
        if !slots.contains_key(g) {
            p.missing.push(g.to_string());
        }
    }
    for (backend, mut list) in slots {
        // Slot order as HAProxy numbers them (slot1, slot2, ... slot10).
        list.sort_by_key(|s| s.name[prefix.len()..].parse::<u64>().unwrap_or(u64::MAX));
        let targets = by_group.get(backend).cloned().unwrap_or_default();
        let index: HashMap<SocketAddrV4, &Target> = targets.iter().map(|t| (t.addr, *t)).collect();
        let mut placed: HashSet<SocketAddrV4> = HashSet::new();
        let mut free: Vec<&Server> = Vec::new();
        for s in &list {
            let here = s.target();
            let active = s.mode() != Mode::Maint;
            match here.and_then(|a| index.get(&a)) {
                Some(t) if active && !placed.contains(&t.addr) => {
                    placed.insert(t.addr);
                    let want_mode = if t.draining { Mode::Drain } else { Mode::Ready };
                    if s.mode() != want_mode {
                        p.changes.push(Change::Set {
                            backend: backend.to_string(),
                            slot: s.name.clone(),
                            addr: t.addr,
                            mode: want_mode,
                            container: t.container.clone(),
                        });
                    }
                }
                _ if active => {
                    p.changes.push(Change::Free {
                        backend: backend.to_string(),
                        slot: s.name.clone(),
                        addr: here,
                    });
                    free.push(s);
                }
                _ => free.push(s),
            }
        }
        let mut waiting = 0;
        for t in targets {
            if placed.contains(&t.addr) || t.draining || !ready(t) {
                continue;
            }
            // A free slot that last held this address, else the first free one.
            let pick = free
                .iter()
                .position(|s| s.target() == Some(t.addr))
                .or(if free.is_empty() { None } else { Some(0) });
            match pick {
                Some(i) => {
                    let s = free.remove(i);
                    placed.insert(t.addr);
                    p.changes.push(Change::Fill {
                        backend: backend.to_string(),
                        slot: s.name.clone(),
                        addr: t.addr,
                        mode: Mode::Ready,
                        container: t.container.clone(),
                    });
                }
                None => waiting += 1,
            }
        }
        if waiting > 0 {
            p.waiting.insert(backend.to_string(), waiting);
        }
    }
    p
}

/// Commands for one change, in order.
pub fn commands(c: &Change) -> Vec<String> {
    match c {
        Change::Fill {
            backend,
            slot,
            addr,
            mode,
            ..
        } => vec![
            format!(
                "set server {backend}/{slot} addr {} port {}",
                addr.ip(),
                addr.port()
            ),
            format!("set server {backend}/{slot} state {}", mode.as_str()),
        ],
        Change::Set {
            backend,
            slot,
            mode,
            ..
        } => vec![format!(
            "set server {backend}/{slot} state {}",
            mode.as_str()
        )],
        Change::Free { backend, slot, .. } => {
            vec![format!("set server {backend}/{slot} state maint")]
        }
    }
}

/// The log line of one change.
pub fn describe(c: &Change) -> String {
    match c {
        Change::Fill {
            backend,
            slot,
            addr,
            mode,
            container,
        }
        | Change::Set {
            backend,
            slot,
            addr,
            mode,
            container,
        } => format!(
            "{backend}/{slot} {addr} {} (container {})",
            mode.as_str(),
            container.escape_debug()
        ),
        Change::Free {
            backend,
            slot,
            addr,
        } => match addr {
            Some(a) => format!("{backend}/{slot} {a} maint (target gone)"),
            None => format!("{backend}/{slot} maint"),
        },
    }
}

/// The sink: one HAProxy admin socket.
pub struct HaproxySink {
    api: Api,
    prefix: String,
    /// HAProxy's `server-state-file`, kept current so a reload starts with the slots filled.
    state_file: Option<PathBuf>,
    /// The state file needs writing (a change, a new worker, a first pass).
    dump: bool,
    /// The worker last seen (pid, start time): a change is a restart or reload.
    process: Option<(u32, u64)>,
    /// What was last logged about missing backends and waiting targets (logged on change).
    last_note: String,
}

impl HaproxySink {
    pub fn new(socket: &Path, prefix: &str, state_file: Option<&Path>) -> HaproxySink {
        HaproxySink {
            api: Api::new(socket),
            prefix: prefix.to_string(),
            state_file: state_file.map(Path::to_path_buf),
            dump: true,
            process: None,
            last_note: String::new(),
        }
    }

    fn label_text(&self) -> String {
        format!("haproxy {}", self.api.socket.display())
    }
}

impl Sink for HaproxySink {
    fn label(&self) -> String {
        self.label_text()
    }

    fn apply(&mut self, want: &Want, log: &mut Log) -> anyhow::Result<bool> {
        let label = self.label_text();
        let process = self
            .api
            .process()
            .with_context(|| format!("{label}: show info"))?;
        match self.process {
            Some(p) if p != process => log.line(format!(
                "{label}: new worker (pid {}, was {}): restarted or reloaded, re-applying",
                process.0, p.0
            )),
            None => log.line(format!("{label}: connected (worker pid {})", process.0)),
            _ => {}
        }
        if self.process != Some(process) {
            self.dump = true;
        }
        self.process = Some(process);
        let servers = self
            .api
            .servers()
            .with_context(|| format!("{label}: show servers state"))?;
        let ready = |t: &Target| want.is_ready(t);
        let p = plan(&servers, &self.prefix, &want.targets, &ready);
        for c in &p.changes {
            for cmd in commands(c) {
                let out = self
                    .api
                    .cmd(&cmd)
                    .with_context(|| format!("{label}: {cmd}"))?;
                if let Some(err) = answer_error(&out) {
                    bail!("{label}: {cmd}: {err}");
                }
            }
            log.line(format!("{label}: {}", describe(c)));
            self.dump = true;
        }
        if let Some(f) = &self.state_file
            && self.dump
        {
            // What HAProxy has now, in its own format: a reload (`load-server-state-from-file`)
            // starts from it instead of from `disabled` slots.
            let text = self
                .api
                .cmd("show servers state")
                .with_context(|| format!("{label}: show servers state"))?;
            if parse_servers(&text).is_ok() {
                super::filesd::replace(f, &text)
                    .with_context(|| format!("{label}: write {}", f.display()))?;
            }
            self.dump = false;
        }
        let mut note = String::new();
        for g in &p.missing {
            note += &format!(
                "{label}: no backend {g} with {prefix}<n> slots: its targets are not served; add `backend {g}` with `server-template {prefix} 10 127.0.0.1:1 disabled`; ",
                prefix = self.prefix
            );
        }
        for (g, n) in &p.waiting {
            note += &format!(
                "{label}: backend {g} has no free slot: {n} target(s) wait for one; add slots to its server-template; "
            );
        }
        if note != self.last_note {
            for part in note.split("; ").filter(|s| !s.is_empty()) {
                log.line(part.to_string());
            }
            self.last_note = note;
        }
        Ok(true)
    }

    fn changed(&mut self) -> bool {
        match (self.process, self.api.process()) {
            (Some(p), Ok(now)) => p != now,
            (None, Ok(_)) => true,
            // Unreachable now: the next apply reports it.
            (_, Err(_)) => false,
        }
    }

    fn poll_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

/// HAProxy answers a successful `set server` with nothing or an informative line ("IP changed
/// from ..."); errors are known phrases.
fn answer_error(out: &str) -> Option<String> {
    let t = out.trim();
    let lower = t.to_ascii_lowercase();
    let bad = [
        "no such",
        "unknown command",
        "require",
        "permission denied",
        "can't",
        "invalid",
        "not supported",
        "is only supported",
        "expects",
    ];
    bad.iter()
        .any(|b| lower.contains(b))
        .then(|| t.lines().next().unwrap_or(t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 web 1 slot1 127.0.0.1 2 4 1 1 0 1 0 0 8 0 0 0 - 18001 - 0 0 - - 0
3 web 2 slot2 127.0.0.2 2 12 1 1 0 1 0 0 8 0 0 0 - 18002 - 0 0 - - 0
3 web 3 slot3 127.0.0.1 0 5 1 1 11 1 0 0 8 0 0 0 - 1 - 0 0 - - 0
3 web 4 static 10.9.9.9 2 0 1 1 11 1 0 0 8 0 0 0 - 80 - 0 0 - - 0
4 api 1 slot1 127.0.0.1 0 5 1 1 11 1 0 0 8 0 0 0 - 1 - 0 0 - - 0
";

    fn t(g: &str, a: &str, draining: bool) -> Target {
        Target {
            group: g.into(),
            addr: a.parse().unwrap(),
            draining,
            container: format!("c-{a}"),
        }
    }

    #[test]
    fn parses_show_servers_state() {
        let s = parse_servers(STATE).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].target(), Some("127.0.0.1:18001".parse().unwrap()));
        assert_eq!(s[0].mode(), Mode::Ready, "CMAINT alone is a slot in use");
        assert_eq!(s[1].mode(), Mode::Drain);
        assert_eq!(s[2].mode(), Mode::Maint);
        assert!(parse_servers("").unwrap().is_empty());
        assert!(parse_servers("Unknown command\n").is_err());
    }

    #[test]
    fn plan_frees_fills_and_drains() {
        let s = parse_servers(STATE).unwrap();
        let want = vec![
            t("web", "127.0.0.2:18002", false), // in slot2 (drain): back to ready
            t("web", "127.0.0.3:1000", false),  // new: takes slot1 once slot1 is freed
            t("api", "10.0.0.1:443", true),     // draining, not in a slot: never added
            t("db", "10.0.0.2:5432", false),    // no backend
        ];
        let p = plan(&s, "slot", &want, &|_| true);
        let got: Vec<String> = p.changes.iter().map(describe).collect();
        assert_eq!(
            got,
            vec![
                "web/slot1 127.0.0.1:18001 maint (target gone)",
                "web/slot2 127.0.0.2:18002 ready (container c-127.0.0.2:18002)",
                "web/slot1 127.0.0.3:1000 ready (container c-127.0.0.3:1000)",
            ]
        );
        assert_eq!(p.missing, vec!["db".to_string()]);
        assert!(p.waiting.is_empty());
        // The user's own server in the backend is never touched.
        assert!(!got.iter().any(|l| l.contains("static")));
    }

    #[test]
    fn plan_is_idempotent_and_waits_for_slots_and_readiness() {
        let s = parse_servers(STATE).unwrap();
        let want = vec![
            t("web", "127.0.0.1:18001", false),
            t("web", "127.0.0.2:18002", true),
        ];
        assert_eq!(plan(&s, "slot", &want, &|_| true), Plan::default());
        let four = vec![
            t("web", "127.0.0.1:18001", false),
            t("web", "127.0.0.2:18002", true),
            t("web", "10.1.0.1:1", false),
            t("web", "10.1.0.2:1", false),
        ];
        let p = plan(&s, "slot", &four, &|_| true);
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        assert_eq!(p.waiting.get("web"), Some(&1));
        // Not yet ready: no slot taken, nothing waiting.
        let p = plan(&s, "slot", &four, &|t| t.addr.port() != 1);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn duplicate_slots_keep_the_first() {
        let dup = STATE
            .replace("127.0.0.2 2 12", "127.0.0.1 2 4")
            .replace(" 18002 ", " 18001 ");
        let s = parse_servers(&dup).unwrap();
        let p = plan(&s, "slot", &[t("web", "127.0.0.1:18001", false)], &|_| true);
        assert_eq!(
            p.changes.iter().map(describe).collect::<Vec<_>>(),
            vec!["web/slot2 127.0.0.1:18001 maint (target gone)"]
        );
    }

    #[test]
    fn commands_are_single_safe_lines() {
        let c = Change::Fill {
            backend: "web".into(),
            slot: "slot3".into(),
            addr: "10.0.0.1:40000".parse().unwrap(),
            mode: Mode::Ready,
            container: "x".into(),
        };
        assert_eq!(
            commands(&c),
            vec![
                "set server web/slot3 addr 10.0.0.1 port 40000",
                "set server web/slot3 state ready"
            ]
        );
        assert!(Api::new("/nonexistent").cmd("a; b").is_err());
        assert!(Api::new("/nonexistent").cmd("a\nb").is_err());
        assert!(is_slot("slot12", "slot") && !is_slot("slot", "slot") && !is_slot("slotx", "slot"));
        assert_eq!(
            answer_error("No such server.\n").as_deref(),
            Some("No such server.")
        );
        assert_eq!(answer_error("\n"), None);
        assert_eq!(
            answer_error(
                "IP changed from '127.0.0.1' to '10.0.0.1', port changed from '1' to '40000' by 'stats socket command'\n"
            ),
            None
        );
    }
}
