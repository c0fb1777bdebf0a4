//! The nginx sink: an include file of `upstream` blocks (the `nginx` export of the ready
//! targets), replaced atomically, checked with the test command (`nginx -t`), then the reload
//! command, at most one reload a second. A failed check puts the previous file back and
//! reloads nothing.
//!
//! The file on disk is what nginx runs with (or will at its next start or reload), so it is
//! what the ledger is compared with: an upstream the file has keeps a block after its last
//! target is gone (a placeholder server marked `down`), so the `proxy_pass` naming it stays
//! valid; a server the file already lists counts as ready (no new check after a registrar
//! restart).

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::export;
use super::filesd::replace;
use super::registrar::{Log, Sink, Want};
use super::{Target, safe_name};

/// The first line of the file.
pub const HEADER: &str =
    "# written by shim registrar from the netshim ledger; replaced on every change, do not edit\n";
/// How long an include the check refused waits before it is tried again.
pub const RETRY_REJECTED: Duration = Duration::from_secs(5);
/// The least time between two reloads.
pub const MIN_RELOAD_GAP: Duration = Duration::from_secs(1);

pub struct NginxSink {
    path: PathBuf,
    test: String,
    reload: String,
    pid_file: Option<PathBuf>,
    /// Upstreams written even with no target (named in the config before any container runs).
    upstreams: Vec<String>,
    last_reload: Option<Instant>,
    /// The file changed since the last reload.
    pending: bool,
    /// The last include the check refused, when, and why: not tried again for a while, so a
    /// broken nginx config does not have the file flip back and forth.
    rejected: Option<(String, Instant, String)>,
    due: Option<Instant>,
}

impl NginxSink {
    pub fn new(
        path: &Path,
        test: &str,
        reload: &str,
        pid_file: Option<&Path>,
        upstreams: &[String],
    ) -> NginxSink {
        NginxSink {
            path: path.to_path_buf(),
            test: test.to_string(),
            reload: reload.to_string(),
            pid_file: pid_file.map(Path::to_path_buf),
            upstreams: upstreams.to_vec(),
            last_reload: None,
            // A registrar that starts does not know whether nginx runs with the file: reload once.
            pending: true,
            rejected: None,
            due: None,
        }
    }
}

/// Upstream names and (upstream, server) pairs not marked `down` in an include file.
pub fn parse(text: &str) -> (Vec<String>, HashSet<(String, SocketAddrV4)>) {
    let mut names = Vec::new();
    let mut up = HashSet::new();
    let mut current: Option<String> = None;
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["upstream", name, "{"] if safe_name(name) => {
                names.push(name.to_string());
                current = Some(name.to_string());
            }
            ["server", addr] => {
                if let (Some(g), Ok(a)) = (&current, addr.trim_end_matches(';').parse()) {
                    up.insert((g.clone(), a));
                }
            }
            ["}"] => current = None,
            _ => {}
        }
    }
    (names, up)
}

/// Runs `cmd` with `sh -c`; an error carries the last line it printed.
fn sh(cmd: &str) -> anyhow::Result<()> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("{cmd:?} failed ({}): {}", out.status, last.trim());
    }
    Ok(())
}

/// Children of process `pid` (nginx's workers when `pid` is its master).
fn children(pid: u32) -> HashSet<u32> {
    let mut out = HashSet::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat"))
            && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..])
            && rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
        {
            out.insert(child);
        }
    }
    out
}

/// Whether nginx process `pid` has begun its graceful exit (its title says so; it has closed
/// its listening sockets then) or is gone.
fn shutting_down(pid: u32) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => String::from_utf8_lossy(&c).contains("shutting down"),
        Err(_) => true,
    }
}

impl Sink for NginxSink {
    fn label(&self) -> String {
        format!("nginx {}", self.path.display())
    }

    fn apply(&mut self, want: &Want, log: &mut Log) -> anyhow::Result<bool> {
        let label = self.label();
        self.due = None;
        let current = fs::read_to_string(&self.path).ok();
        let (mut keep, present) = parse(current.as_deref().unwrap_or(""));
        keep.extend(self.upstreams.iter().cloned());
        let chosen: Vec<Target> = want
            .targets
            .iter()
            .filter(|t| {
                t.draining || want.is_ready(t) || present.contains(&(t.group.clone(), t.addr))
            })
            .cloned()
            .collect();
        let text = format!("{HEADER}{}", export::nginx(&chosen, &keep));
        if current.as_deref() != Some(text.as_str()) {
            if let Some((t, at, why)) = &self.rejected
                && *t == text
                && at.elapsed() < RETRY_REJECTED
            {
                self.due = Some(*at + RETRY_REJECTED);
                bail!("{why}");
            }
            replace(&self.path, &text).with_context(|| format!("{label}: write"))?;
            if let Err(e) = sh(&self.test) {
                // Put back what nginx was running with; nothing is reloaded.
                match &current {
                    Some(old) => {
                        let _ = replace(&self.path, old);
                    }
                    None => {
                        let _ = fs::remove_file(&self.path);
                    }
                }
                let e = e.context(format!(
                    "{label}: the new include fails the check, kept the old one"
                ));
                self.rejected = Some((text, Instant::now(), format!("{e:#}")));
                return Err(e);
            }
            self.rejected = None;
            self.pending = true;
            let (ups, servers) = (text.matches("upstream ").count(), chosen.len());
            log.line(format!(
                "{label}: written ({ups} upstreams, {servers} servers)"
            ));
        }
        if !self.pending {
            return Ok(true);
        }
        if let Some(t) = self.last_reload {
            let next = t + MIN_RELOAD_GAP;
            if Instant::now() < next {
                self.due = Some(next);
                return Ok(false);
            }
        }
        let master = self
            .pid_file
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<u32>().ok());
        let before = master.map(children).unwrap_or_default();
        self.last_reload = Some(Instant::now());
        sh(&self.reload).with_context(|| format!("{label}: reload"))?;
        // nginx reloads asynchronously. Applied means: a new worker runs the new upstreams, and
        // every old worker is gone or shutting down (it closes its listening sockets as it
        // retitles itself), so no new connection reaches the old upstreams.
        if let Some(m) = master {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = children(m);
                let fresh = now.difference(&before).next().is_some();
                let old_busy = before.iter().any(|p| now.contains(p) && !shutting_down(*p));
                if (fresh && !old_busy) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.pending = false;
        log.line(format!("{label}: reloaded"));
        Ok(true)
    }

    fn due(&self) -> Option<Instant> {
        self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_back_the_export() {
        let t = vec![
            Target {
                group: "web".into(),
                addr: "10.0.0.1:80".parse().unwrap(),
                draining: false,
                container: "a".into(),
            },
            Target {
                group: "web".into(),
                addr: "10.0.0.2:80".parse().unwrap(),
                draining: true,
                container: "b".into(),
            },
        ];
        let text = format!("{HEADER}{}", export::nginx(&t, &["old".into()]));
        let (names, up) = parse(&text);
        assert_eq!(names, vec!["old".to_string(), "web".to_string()]);
        assert_eq!(up.len(), 1);
        assert!(up.contains(&("web".into(), "10.0.0.1:80".parse().unwrap())));
    }
}
