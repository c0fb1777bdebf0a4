//! Real load balancers for the load-balancer tests: Debian's HAProxy (master-worker, admin
//! socket, the shipped `lb/haproxy.cfg` with its paths and bind address localized), nginx and
//! Prometheus, each started by the test inside a network namespace the test made and stopped on
//! drop; the registrar as a child process; HTTP clients under load from a client namespace.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::command_in;
use super::lab::repo_file;

/// The HAProxy config users copy.
pub const SHIPPED_HAPROXY: &str = "lb/haproxy.cfg";

/// A child process stopped on drop (SIGTERM, then SIGKILL after 3 s), output in a log file.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout+stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let f = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running (not exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and the exit status (None: had to be killed).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, self.log_text());
        }
        self.terminate();
    }
}

/// The shipped HAProxy config, localized: its `/run/haproxy/` paths under `dir`, its frontend
/// bound to `bind`, `slots` slots per backend, and one backend per name in `backends` (the
/// shipped file's `backend web` block repeated). Panics if the shipped file lost a line this
/// relies on, so the file users copy stays the one tested.
pub fn haproxy_config(dir: &Path, bind: &str, slots: u32, backends: &[&str]) -> String {
    let text = fs::read_to_string(repo_file(SHIPPED_HAPROXY)).expect("read lb/haproxy.cfg");
    for needle in [
        "stats socket /run/haproxy/admin.sock",
        "server-state-file /run/haproxy/servers.state",
        "load-server-state-from-file global",
        "    bind :80\n",
        "\nbackend web\n",
        "server-template slot 10 localhost:1 disabled",
        "master-worker",
    ] {
        assert!(text.contains(needle), "{SHIPPED_HAPROXY} lacks {needle:?}");
    }
    let d = dir.display().to_string();
    let mut cfg = text
        .replace("/run/haproxy/", &format!("{d}/"))
        .replace("    bind :80\n", &format!("    bind {bind}\n"))
        .replace(
            "server-template slot 10 ",
            &format!("server-template slot {slots} "),
        )
        // No syslog socket in a test's world.
        .replace("    log /dev/log local0\n", "")
        .replace("    log global\n", "");
    let start = cfg.find("\nbackend web\n").expect("backend web") + 1;
    let block = cfg[start..].to_string();
    for b in backends.iter().filter(|b| **b != "web") {
        cfg += "\n";
        cfg += &block.replacen("backend web\n", &format!("backend {b}\n"), 1);
    }
    cfg
}

/// HAProxy (master-worker, foreground master) running inside a netns.
pub struct Haproxy {
    pub dir: PathBuf,
    pub cfg: PathBuf,
    pub sock: PathBuf,
    pub state_file: PathBuf,
    pub master: Proc,
}

impl Haproxy {
    /// Writes `cfg_text` to `<dir>/haproxy.cfg`, checks it with `haproxy -c`, starts HAProxy in
    /// netns `ns` and waits for its admin socket.
    pub fn start(ns: &str, dir: &Path, cfg_text: &str) -> Haproxy {
        fs::create_dir_all(dir).expect("haproxy dir");
        let cfg = dir.join("haproxy.cfg");
        fs::write(&cfg, cfg_text).expect("write haproxy.cfg");
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .expect("haproxy -c (apt-get install haproxy)");
        assert!(
            check.status.success(),
            "haproxy -c refuses the config: {}{}\n{cfg_text}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = command_in(ns, "/usr/sbin/haproxy");
        cmd.arg("-W").arg("-db").arg("-f").arg(&cfg);
        let master = Proc::spawn("haproxy", &mut cmd, &dir.join("haproxy.log"));
        let h = Haproxy {
            dir: dir.to_path_buf(),
            sock: dir.join("admin.sock"),
            state_file: dir.join("servers.state"),
            cfg,
            master,
        };
        let up = super::lab::wait_for(Duration::from_secs(10), || h.try_cmd("show info").is_ok());
        assert!(
            up,
            "haproxy did not open its admin socket: {}",
            h.master.log_text()
        );
        h
    }

    /// One runtime API command.
    pub fn try_cmd(&self, line: &str) -> std::io::Result<String> {
        let mut s = UnixStream::connect(&self.sock)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    pub fn cmd(&self, line: &str) -> String {
        self.try_cmd(line)
            .unwrap_or_else(|e| panic!("haproxy {line}: {e}"))
    }

    /// The worker's pid (`show info`).
    pub fn worker(&self) -> u32 {
        let info = self.cmd("show info");
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Pid in show info: {info}"))
    }

    /// The slots of `backend` that take traffic: (slot, "ip:port", "ready" | "drain").
    pub fn active(&self, backend: &str) -> Vec<(String, String, String)> {
        let out = self.cmd(&format!("show servers state {backend}"));
        let mut v = Vec::new();
        for l in out.lines().skip(2) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 19 || !f[3].starts_with("slot") {
                continue;
            }
            let admin: u32 = f[6].parse().unwrap_or(0);
            if admin & (0x01 | 0x02 | 0x20 | 0x40) != 0 {
                continue;
            }
            let mode = if admin & (0x08 | 0x10) != 0 {
                "drain"
            } else {
                "ready"
            };
            v.push((
                f[3].to_string(),
                format!("{}:{}", f[4], f[18]),
                mode.to_string(),
            ));
        }
        v.sort();
        v
    }

    /// A reload the way systemd's `ExecReload` does it: SIGUSR2 to the master.
    pub fn reload(&self) {
        self.master.signal(libc::SIGUSR2);
    }

    /// The master is running.
    pub fn alive(&mut self) -> bool {
        self.master.running()
    }
}

/// Counts of a load run.
#[derive(Debug, Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// HTTP clients hammering `addr` from netns `ns` until stopped; every response that is not a
/// `200` with a page, and every connection error, is a failure.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub counts: Arc<Counts>,
    /// Page bodies seen, per thread (the replica that answered), for round-robin checks.
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(ns: &str, addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        for _ in 0..threads {
            let (stop, counts, errors) = (stop.clone(), counts.clone(), errors.clone());
            let path = format!("/run/netns/{ns}");
            hs.push(thread::spawn(move || {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on this thread only, with a valid netns fd.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns {path}");
                while !stop.load(Ordering::Relaxed) {
                    match get(addr) {
                        Ok((200, _)) => counts.ok.fetch_add(1, Ordering::Relaxed),
                        Ok((code, body)) => {
                            errors
                                .lock()
                                .map(|mut e| {
                                    e.push(format!(
                                        "HTTP {code}: {}",
                                        body.chars().take(80).collect::<String>()
                                    ))
                                })
                                .ok();
                            counts.failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            errors.lock().map(|mut v| v.push(e)).ok();
                            counts.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        Load {
            stop,
            counts,
            errors,
            threads: hs,
        }
    }

    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    /// Stops the clients; (served, failed, first errors).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        let errs = self
            .errors
            .lock()
            .map(|e| e.iter().take(10).cloned().collect())
            .unwrap_or_default();
        (self.ok(), self.failed(), errs)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// One HTTP/1.0 GET of `/`: (status, body) or the error.
pub fn get(addr: SocketAddr) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {:?}", text.chars().take(60).collect::<String>()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// GET from inside netns `ns` (one request on a thread there).
pub fn get_from(ns: &str, addr: SocketAddr) -> Result<(u16, String), String> {
    super::in_ns(ns, move || get(addr))
}

/// A network namespace with only loopback up, removed on drop (for consumers that might try to
/// reach the addresses in an export: they can reach nothing outside it).
pub struct PrivateNs {
    pub name: String,
}

impl PrivateNs {
    pub fn new(name: &str) -> PrivateNs {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        super::ip(&["netns", "add", name]);
        super::ip(&["-n", name, "link", "set", "lo", "up"]);
        PrivateNs {
            name: name.to_string(),
        }
    }
}

impl Drop for PrivateNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A free TCP port on loopback of netns `ns` (bind to 0, read, close).
pub fn free_port(ns: &str) -> u16 {
    super::in_ns(ns, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    })
}

/// An nginx config (for `nginx -t` and a real nginx): `http` with `include` of `upstreams` and
/// the shipped example server, pid and logs under `dir`.
pub fn nginx_config(dir: &Path, upstreams: &Path, server: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    include {};\n{server}\n}}\n",
        upstreams.display()
    )
}

/// `nginx -t -c cfg` inside netns `ns` (the check binds the `listen` addresses): Ok or its
/// complaint.
pub fn nginx_test(ns: &str, cfg: &Path) -> Result<(), String> {
    let out = command_in(ns, "/usr/sbin/nginx")
        .args(["-t", "-q", "-e", "stderr", "-c"])
        .arg(cfg)
        .output()
        .map_err(|e| format!("run nginx -t (apt-get install nginx): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
