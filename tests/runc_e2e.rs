//! End to end under runc 1.1: the shim registered from the shipped hook files (`hooks/`), real
//! busybox httpd containers, real TCP from a client network namespace through the host ports.
//!
//! Every test builds its own little world and never touches the real host network:
//!
//! ```text
//!   netns C (client) 172.30.n.2/30 ---veth--- 172.30.n.1/30 netns H (the "host")
//! ```
//!
//! runc runs inside H (`nsenter --net`), so the hooks run there too and netshim0, the nsh* veths
//! and the nftables table `ip netshim` are created in H. The client connects from C to
//! 172.30.n.1:<hostPort>.
//!
//! Needs root, runc, iproute2, nftables and a static busybox at /bin/busybox (see RUNTIMES.md).
//! Tests are independent (own prefix, namespaces, temp dir, state dir, runc root) and run in
//! parallel. Cleanup is in `Lab`'s `Drop`, so it runs on panic too.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SHIM: &str = env!("CARGO_BIN_EXE_shim");
/// Where the shipped hook files point; tests replace it with the binary under test.
const INSTALLED_SHIM: &str = "/usr/local/bin/shim";
const DYNAMIC_RANGE: (u64, u64) = (40000, 40999);
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 8] = ["sh", "httpd", "sleep", "ip", "cat", "echo", "nc", "wget"];

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Runs a command to completion, stdin closed, output captured.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    must(Command::new("ip").args(args))
}

/// Rewrites one shipped hook entry for this test: the binary under test, this test's state dir,
/// and a config with a known dynamic range. Also checks the entry is what the shim expects.
fn localize_hook(hook: &Value, stage: &str, state_dir: &Path, config: &Path) -> Value {
    let mut h = hook.clone();
    assert_eq!(
        h["path"], INSTALLED_SHIM,
        "{stage} hook: shipped path must be {INSTALLED_SHIM}"
    );
    assert_eq!(
        h["args"],
        json!(["shim", "hook", stage]),
        "{stage} hook: args must name the stage (runtimes pass the stage nowhere else)"
    );
    assert!(
        h["timeout"].as_u64().is_some_and(|t| t > 0),
        "{stage} hook: needs a timeout"
    );
    let env: Vec<String> = h["env"]
        .as_array()
        .unwrap_or_else(|| panic!("{stage} hook: env must be a list (hooks get no other env)"))
        .iter()
        .map(|v| v.as_str().expect("env entries are strings").to_string())
        .collect();
    assert!(
        env.iter().any(|e| e == "NETSHIM_STATE_DIR=/run/netshim"),
        "{stage} hook: env must set NETSHIM_STATE_DIR=/run/netshim: {env:?}"
    );
    let mut env: Vec<String> = env
        .into_iter()
        .filter(|e| !e.starts_with("NETSHIM_STATE_DIR=") && !e.starts_with("NETSHIM_CONFIG="))
        .collect();
    env.push(format!("NETSHIM_STATE_DIR={}", state_dir.display()));
    env.push(format!("NETSHIM_CONFIG={}", config.display()));
    h["path"] = json!(SHIM);
    h["env"] = json!(env);
    h
}

/// The `hooks` object of `hooks/runc-hooks.json`, localized.
fn hooks_from_runc_snippet(state_dir: &Path, config: &Path) -> Value {
    let snippet = read_json(&repo_file("hooks/runc-hooks.json"));
    let hooks = snippet["hooks"]
        .as_object()
        .expect("hooks/runc-hooks.json: a top-level \"hooks\" object");
    let mut stages: Vec<&String> = hooks.keys().collect();
    stages.sort();
    assert_eq!(stages, ["createRuntime", "poststop"]);
    let mut out = serde_json::Map::new();
    for (stage, list) in hooks {
        let list = list.as_array().expect("each stage is a list of hooks");
        assert_eq!(list.len(), 1, "{stage}: one netshim hook");
        out.insert(
            stage.clone(),
            json!([localize_hook(&list[0], stage, state_dir, config)]),
        );
    }
    Value::Object(out)
}

/// A runtime-spec `hooks` object built from the oci-hooks.d files (the way podman and CRI-O
/// turn them into hooks), localized.
fn hooks_from_oci_hooks_d(state_dir: &Path, config: &Path) -> Value {
    let dir = repo_file("hooks/oci-hooks.d");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = serde_json::Map::new();
    for f in &files {
        let v = read_json(f);
        let name = f.display();
        assert_eq!(v["version"], "1.0.0", "{name}: oci-hooks.d version");
        assert_eq!(
            v["when"]["annotations"],
            json!({ "^netshim\\.network-mode$": ".+" }),
            "{name}: must fire only for containers that ask netshim for a network"
        );
        let stages = v["stages"].as_array().expect("stages list");
        // One hook entry has one argv for all its stages, and the shim reads its stage from
        // argv: a file naming two stages would run the same stage twice.
        assert_eq!(stages.len(), 1, "{name}: exactly one stage per file");
        let stage = stages[0].as_str().expect("stage name");
        let prev = out.insert(
            stage.to_string(),
            json!([localize_hook(&v["hook"], stage, state_dir, config)]),
        );
        assert!(prev.is_none(), "{name}: stage {stage} defined twice");
    }
    let mut stages: Vec<&String> = out.keys().collect();
    stages.sort();
    assert_eq!(stages, ["createRuntime", "poststop"], "{}", dir.display());
    Value::Object(out)
}

/// Which shipped hook file registers the shim.
#[derive(Clone, Copy)]
enum HookSource {
    RuncSnippet,
    OciHooksD,
}

/// One test's world: host netns H, client netns C, a temp dir with state, runc root and bundles.
struct Lab {
    prefix: String,
    host_ns: String,
    client_ns: String,
    /// H's address on the H–C link: what the client connects to.
    host_addr: String,
    dir: PathBuf,
    hooks: Value,
    /// Every container id ever started (even failed ones), for cleanup.
    containers: RefCell<Vec<String>>,
}

impl Lab {
    fn new(source: HookSource) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the runc e2e tests need root (network namespaces, runc, nftables)"
        );
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("nse{}x{}", std::process::id(), n);
        // Link names are the prefix plus one letter; the kernel allows 15 characters.
        assert!(prefix.len() < 15, "prefix {prefix} too long for link names");
        let dir = std::env::temp_dir().join(format!("netshim-e2e-{prefix}"));
        let (state_dir, config) = (dir.join("state"), dir.join("config.toml"));
        let hooks = match source {
            HookSource::RuncSnippet => hooks_from_runc_snippet(&state_dir, &config),
            HookSource::OciHooksD => hooks_from_oci_hooks_d(&state_dir, &config),
        };
        let third = n % 250 + 1;
        let lab = Lab {
            host_ns: format!("{prefix}h"),
            client_ns: format!("{prefix}c"),
            host_addr: format!("172.30.{third}.1"),
            prefix,
            dir,
            hooks,
            containers: RefCell::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever was made.
        let _ = fs::remove_dir_all(&lab.dir);
        for d in [&state_dir, &lab.runc_root()] {
            fs::create_dir_all(d).expect("create temp dirs");
        }
        let range = format!("{}-{}", DYNAMIC_RANGE.0, DYNAMIC_RANGE.1);
        fs::write(&config, format!("[ports]\ndynamic_range = \"{range}\"\n"))
            .expect("write config");
        let (h, c) = (lab.host_ns.as_str(), lab.client_ns.as_str());
        let (hv, cv) = (format!("{}a", lab.prefix), format!("{}b", lab.prefix));
        let host_cidr = format!("{}/30", lab.host_addr);
        let client_addr = format!("172.30.{third}.2");
        let client_cidr = format!("{client_addr}/30");
        ip(&["netns", "add", h]);
        ip(&["-n", h, "link", "set", "lo", "up"]);
        ip(&["netns", "add", c]);
        ip(&["-n", c, "link", "set", "lo", "up"]);
        ip(&[
            "-n", h, "link", "add", &hv, "type", "veth", "peer", "name", &cv, "netns", c,
        ]);
        ip(&["-n", h, "addr", "add", &host_cidr, "dev", &hv]);
        ip(&["-n", h, "link", "set", &hv, "up"]);
        ip(&["-n", c, "addr", "add", &client_cidr, "dev", &cv]);
        ip(&["-n", c, "link", "set", &cv, "up"]);
        ip(&["-n", c, "route", "add", "default", "via", &lab.host_addr]);
        // Like a real host, H has a default route; its source address is what `ports list`
        // reports as the load-balancer target.
        ip(&["-n", h, "route", "add", "default", "via", &client_addr]);
        lab
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// A command run inside H. Only the network namespace changes: `ip netns exec` would also
    /// remount /sys, which hides this host's cgroup v1 mounts under /sys/fs/cgroup, and runc
    /// then fails with "no cgroup mount found in mountinfo".
    fn in_host(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns))
            .arg("--")
            .arg(prog);
        c
    }

    fn runc(&self) -> Command {
        let mut c = self.in_host("runc");
        c.arg("--root").arg(self.runc_root());
        c
    }

    /// The shim under test, inside H, with this test's state dir and config.
    fn shim(&self) -> Command {
        let mut c = self.in_host(SHIM);
        c.env("NETSHIM_STATE_DIR", self.state_dir())
            .env("NETSHIM_CONFIG", self.config());
        c
    }

    /// Container id for a short name; unique across tests and test processes.
    fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Writes bundle `name` (rootfs with busybox and a page naming the container), runs it
    /// detached in H. Returns whether `runc run` succeeded and what it printed.
    fn start(&self, name: &str, port_mappings: &str) -> (bool, String) {
        self.start_process(
            name,
            port_mappings,
            &["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"],
        )
    }

    /// Like [`Lab::start`] with another container process.
    fn start_process(&self, name: &str, port_mappings: &str, args: &[&str]) -> (bool, String) {
        self.start_mode(name, "bridge", port_mappings, args)
    }

    /// Starts a container in network `mode` (host mode: no network namespace of its own).
    fn start_mode(
        &self,
        name: &str,
        mode: &str,
        port_mappings: &str,
        args: &[&str],
    ) -> (bool, String) {
        let id = self.id(name);
        let bundle = self.dir.join(name);
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
            fs::create_dir_all(rootfs.join(d)).expect("create rootfs dirs");
        }
        fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a)).expect("applet symlink");
        }
        fs::write(
            rootfs.join("www/index.html"),
            format!("<html><body>hello from {id}</body></html>\n"),
        )
        .expect("write index.html");
        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if mode != "host" {
            namespaces.push(json!({"type": "network"}));
        }
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "cwd": "/",
                "args": args,
                "env": ["PATH=/bin"],
                // With no capabilities listed the process has none, and httpd cannot bind :80.
                "capabilities": {
                    "bounding": ["CAP_NET_BIND_SERVICE"],
                    "effective": ["CAP_NET_BIND_SERVICE"],
                    "permitted": ["CAP_NET_BIND_SERVICE"]
                }
            },
            "root": {"path": rootfs},
            "hostname": name,
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
            ],
            "annotations": {
                "netshim.network-mode": mode,
                "netshim.port-mappings": port_mappings
            },
            "hooks": self.hooks,
            "linux": {"namespaces": namespaces}
        });
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("serialize spec"),
        )
        .expect("write config.json");
        self.containers.borrow_mut().push(id.clone());
        // runc hands its own stdio to a detached container: never a pipe (RUNTIMES.md gotcha 1).
        let log_path = bundle.join("runc.out");
        let log = File::create(&log_path).expect("create runc.out");
        let status = self
            .runc()
            .arg("run")
            .arg("-d")
            .arg("-b")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .status()
            .expect("spawn runc run");
        let out = fs::read_to_string(&log_path).unwrap_or_default();
        (status.success(), out)
    }

    /// Starts a container that must come up.
    fn start_ok(&self, name: &str, port_mappings: &str) -> String {
        let (ok, out) = self.start(name, port_mappings);
        assert!(ok, "runc run {name} failed: {out}");
        self.id(name)
    }

    /// `runc delete -f` inside H (so poststop runs in H).
    fn delete(&self, id: &str) -> Output {
        run(self.runc().args(["delete", "-f", id]))
    }

    fn ports(&self) -> Vec<Value> {
        let out = must(self.shim().args(["ports", "list", "--json"]));
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ports list --json is not JSON ({e}): {out}"));
        v.as_array()
            .unwrap_or_else(|| panic!("ports list --json is not an array: {out}"))
            .clone()
    }

    /// Container ids in the state file.
    fn recorded(&self) -> Vec<String> {
        let path = self.state_dir().join("state.json");
        if !path.exists() {
            return Vec::new();
        }
        let v = read_json(&path);
        let mut ids: Vec<String> = v["containers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Links in H whose name starts with `prefix`.
    fn links(&self, prefix: &str) -> Vec<String> {
        ip(&["-n", &self.host_ns, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// Elements of an nft map or set of `ip netshim` in H; empty if the table is gone.
    fn nft_elements(&self, kind: &str, name: &str) -> Vec<Value> {
        let out = run(self
            .in_host("nft")
            .args(["-j", "list", kind, "ip", "netshim", name]));
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("No such file or directory"),
                "nft list {kind} {name} in H: {err}"
            );
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o[kind]["elem"].as_array())
            .flatten()
            .cloned()
            .collect()
    }

    /// GET / from the client netns through H's address and `port`; retries for ~3 s while
    /// httpd starts. Returns the whole response.
    fn fetch(&self, port: u16) -> Result<String, String> {
        let ns_path = format!("/run/netns/{}", self.client_ns);
        let addr: SocketAddr = format!("{}:{port}", self.host_addr)
            .parse()
            .expect("socket address");
        std::thread::spawn(move || {
            let ns = File::open(&ns_path).map_err(|e| format!("open {ns_path}: {e}"))?;
            // Only this thread moves into C.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns {ns_path}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let last = get(addr);
                match last {
                    Ok(r) if r.starts_with("HTTP/1.") => return Ok(r),
                    Ok(r) => {
                        if Instant::now() >= deadline {
                            return Err(format!("{addr}: not HTTP: {r:?}"));
                        }
                    }
                    Err(e) => {
                        if Instant::now() >= deadline {
                            return Err(format!("{addr}: {e}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .join()
        .expect("client thread")
    }

    /// Fetches through `port` and asserts the page is container `id`'s.
    fn assert_serves(&self, port: u16, id: &str) {
        match self.fetch(port) {
            Ok(r) => assert!(
                r.contains(&format!("hello from {id}<")),
                "page through {}:{port} is not {id}'s: {r}",
                self.host_addr
            ),
            Err(e) => panic!("no page from {id} through {}:{port}: {e}", self.host_addr),
        }
    }
}

fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

impl Drop for Lab {
    fn drop(&mut self) {
        let ids = self.containers.borrow().clone();
        if std::thread::panicking() {
            for id in &ids {
                let name = id.trim_start_matches(&format!("{}-", self.prefix));
                let log = fs::read_to_string(self.dir.join(name).join("runc.out"));
                eprintln!("--- runc output of {id}: {}", log.unwrap_or_default());
            }
            if let Ok(s) = fs::read_to_string(self.state_dir().join("state.json")) {
                eprintln!("--- state.json: {s}");
            }
        }
        for id in ids.iter().rev() {
            let _ = self.delete(id);
        }
        for ns in [&self.client_ns, &self.host_ns] {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn host_port(entry: &Value) -> u16 {
    entry["hostPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("hostPort in {entry}"))
}

#[test]
fn shipped_hook_files_agree_and_name_their_stages() {
    // Pure file checks (no root): both formats register the same hooks.
    let (sd, cfg) = (Path::new("/s"), Path::new("/c.toml"));
    assert_eq!(
        hooks_from_runc_snippet(sd, cfg),
        hooks_from_oci_hooks_d(sd, cfg)
    );
}

#[test]
fn two_dynamic_replicas_serve_through_their_own_host_ports() {
    let lab = Lab::new(HookSource::RuncSnippet);
    let a = lab.start_ok("web1", r#"[{"containerPort":80}]"#);
    let b = lab.start_ok("web2", r#"[{"containerPort":80}]"#);

    let ports = lab.ports();
    assert_eq!(ports.len(), 2, "{ports:#?}");
    let find = |id: &str| {
        ports
            .iter()
            .find(|p| p["containerId"] == id)
            .unwrap_or_else(|| panic!("{id} not in ports list: {ports:#?}"))
    };
    let (pa, pb) = (find(&a), find(&b));
    for p in [pa, pb] {
        assert_eq!(p["networkMode"], "bridge", "{p}");
        assert_eq!(p["protocol"], "tcp", "{p}");
        assert_eq!(p["containerPort"], 80, "{p}");
        assert_eq!(p["targetIP"], lab.host_addr.as_str(), "{p}");
        assert_eq!(p["targetPort"], p["hostPort"], "{p}");
        let hp = u64::from(host_port(p));
        assert!(
            (DYNAMIC_RANGE.0..=DYNAMIC_RANGE.1).contains(&hp),
            "host port {hp} outside the configured dynamic range: {p}"
        );
    }
    assert_ne!(pa["hostPort"], pb["hostPort"], "{ports:#?}");
    assert_ne!(pa["containerIP"], pb["containerIP"], "{ports:#?}");

    lab.assert_serves(host_port(pa), &a);
    lab.assert_serves(host_port(pb), &b);
    assert_eq!(lab.links("nsh").len(), 2);
}

#[test]
fn static_host_port_conflict_fails_the_second_container_and_leaves_no_trace() {
    let lab = Lab::new(HookSource::RuncSnippet);
    let first = lab.start_ok("web1", r#"[{"containerPort":80,"hostPort":18080}]"#);
    lab.assert_serves(18080, &first);
    let links_before = lab.links("nsh");
    assert_eq!(links_before.len(), 1, "{links_before:?}");

    let (ok, out) = lab.start("web2", r#"[{"containerPort":80,"hostPort":18080}]"#);
    assert!(
        !ok,
        "a second container on host port 18080 must not start: {out}"
    );
    assert!(
        out.contains("shim: ") && out.contains("18080"),
        "runc's error must carry the shim's message naming the port: {out}"
    );

    lab.assert_serves(18080, &first);
    assert_eq!(
        lab.links("nsh"),
        links_before,
        "a link of the failed container is left"
    );
    assert_eq!(lab.recorded(), vec![first.clone()]);
    let ports = lab.ports();
    assert_eq!(ports.len(), 1, "{ports:#?}");
    assert_eq!(ports[0]["containerId"], first.as_str());
    assert_eq!(ports[0]["hostPort"], 18080);
    assert_eq!(lab.nft_elements("map", "ports").len(), 1);
    let second = run(lab.runc().args(["state", &lab.id("web2")]));
    assert!(
        !second.status.success(),
        "runc still knows the failed container"
    );
}

#[test]
fn runc_delete_runs_poststop_and_releases_everything() {
    // Registered from the oci-hooks.d files this time, so both shipped formats run for real.
    let lab = Lab::new(HookSource::OciHooksD);
    let id = lab.start_ok("web1", r#"[{"containerPort":80}]"#);
    let ports = lab.ports();
    assert_eq!(ports.len(), 1, "{ports:#?}");
    lab.assert_serves(host_port(&ports[0]), &id);
    assert_eq!(lab.links("nsh").len(), 1);
    assert_eq!(lab.nft_elements("map", "ports").len(), 1);

    let out = lab.delete(&id);
    assert!(
        out.status.success(),
        "runc delete -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "runc delete reports a hook error: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(lab.links("nsh"), Vec::<String>::new());
    assert_eq!(lab.nft_elements("map", "ports"), Vec::<Value>::new());
    assert_eq!(lab.nft_elements("set", "mapped"), Vec::<Value>::new());
    assert_eq!(lab.ports(), Vec::<Value>::new());
    assert_eq!(lab.recorded(), Vec::<String>::new());
}

#[test]
fn a_container_failing_after_network_setup_is_released_by_poststop() {
    // runc runs createRuntime, then fails to exec the process and destroys the container,
    // running poststop: the setup must not leak.
    let lab = Lab::new(HookSource::RuncSnippet);
    let keep = lab.start_ok("web1", r#"[{"containerPort":80}]"#);
    let (ok, out) = lab.start_process(
        "broken",
        r#"[{"containerPort":80,"hostPort":18081}]"#,
        &["/bin/no-such-program"],
    );
    assert!(
        !ok,
        "a container with a missing program must not start: {out}"
    );
    // The setup did run (the address cursor moved past web1's) and was undone.
    let state = read_json(&lab.state_dir().join("state.json"));
    assert_eq!(state["cursors"]["ip"], "10.213.0.3", "{state}");
    assert_eq!(lab.recorded(), vec![keep.clone()]);
    assert_eq!(lab.links("nsh").len(), 1, "{:?}", lab.links("nsh"));
    assert_eq!(lab.nft_elements("map", "ports").len(), 1);
    let ports = lab.ports();
    assert_eq!(ports.len(), 1, "{ports:#?}");
    lab.assert_serves(host_port(&ports[0]), &keep);
}

#[test]
fn host_mode_second_claim_is_refused_while_the_first_keeps_serving() {
    let lab = Lab::new(HookSource::RuncSnippet);
    let httpd = ["/bin/busybox", "httpd", "-f", "-p", "18181", "-h", "/www"];
    let (ok, out) = lab.start_mode("h1", "host", r#"[{"containerPort":18181}]"#, &httpd);
    assert!(ok, "host-mode container: {out}");
    let first = lab.id("h1");
    lab.assert_serves(18181, &first);
    let (ok, out) = lab.start_mode("h2", "host", r#"[{"containerPort":18181}]"#, &httpd);
    assert!(!ok, "a second host-mode claim on 18181 must fail: {out}");
    assert!(
        out.contains("shim: ") && out.contains("18181/tcp") && out.contains(&first),
        "{out}"
    );
    lab.assert_serves(18181, &first);
    let ports = lab.ports();
    assert_eq!(ports.len(), 1, "{ports:#?}");
    assert_eq!(ports[0]["networkMode"], "host");
    assert_eq!(ports[0]["targetPort"], 18181);
    // Deleting the first frees the claim for a new container.
    assert!(lab.delete(&first).status.success());
    assert!(lab.ports().is_empty());
    let (ok, out) = lab.start_mode("h3", "host", r#"[{"containerPort":18181}]"#, &httpd);
    assert!(ok, "the claim is free again: {out}");
    lab.assert_serves(18181, &lab.id("h3"));
}

#[test]
fn none_mode_container_has_only_loopback_up() {
    let lab = Lab::new(HookSource::RuncSnippet);
    let (ok, out) = lab.start_mode("n1", "none", "[]", &["/bin/busybox", "sleep", "30"]);
    assert!(ok, "none-mode container: {out}");
    let state: Value = serde_json::from_str(&must(lab.runc().args(["state", &lab.id("n1")])))
        .expect("runc state json");
    let pid = state["pid"].as_i64().expect("pid");
    let links = must(
        Command::new("/usr/bin/nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["/usr/sbin/ip", "-o", "link", "show"]),
    );
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains(",UP"), "{links}");
    assert_eq!(lab.recorded(), vec![lab.id("n1")]);
    assert!(lab.delete(&lab.id("n1")).status.success());
    assert!(lab.recorded().is_empty());
}
