//! The world of the end-to-end tests under real runtimes (`runc_e2e.rs`, `runtimes_e2e.rs`): the
//! shipped hook files localized to the binary under test, busybox bundles, and a host network
//! namespace H linked to a client namespace C:
//!
//! ```text
//!   netns C (client) <net>.n.2/30 ---veth--- <net>.n.1/30 netns H (the "host")
//! ```
//!
//! Runtimes run inside H (`nsenter --net`, not `ip netns exec`, which remounts /sys and hides
//! this host's cgroup v1 mounts, so runc fails with "no cgroup mount found in mountinfo"), so
//! their hooks run there and netshim0, the nsh* veths and the nftables table `ip netshim` are made
//! in H, never on the real host. The client connects from C to `<net>.n.1:<hostPort>`.
//!
//! Each [`World`] has its own prefix, namespaces and temp dir (netshim's state dir and config
//! inside), so tests run in parallel; its `Drop` removes them, also when a test fails.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{HostPair, SHIM, in_ns, is_root};

/// Where the shipped hook files point; tests replace it with the binary under test.
pub const INSTALLED_SHIM: &str = "/usr/local/bin/shim";
/// The dynamic host-port range every world's config sets.
pub const DYNAMIC_RANGE: (u64, u64) = (40000, 40999);
pub const BUSYBOX: &str = "/bin/busybox";
pub const APPLETS: [&str; 8] = ["sh", "httpd", "sleep", "ip", "cat", "echo", "nc", "wget"];
/// The container process serving the page of [`World::rootfs`] on port 80.
pub const HTTPD: [&str; 7] = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"];
/// The runc (and crun) bundle fragment.
pub const RUNC_HOOKS: &str = "hooks/runc-hooks.json";

static COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// Small helpers.

pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Runs a command to completion, stdin closed, output captured.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// stdout then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with stdout and stderr to `log` (runtimes hand their stdio to detached
/// containers, so never a pipe); returns success and what it wrote.
pub fn run_logged(cmd: &mut Command, log: &Path) -> (bool, String) {
    let f = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let status = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup log"))
        .stderr(f)
        .status()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    (
        status.success(),
        fs::read_to_string(log).unwrap_or_default(),
    )
}

/// Waits until `f` holds, up to `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn host_port(entry: &Value) -> u16 {
    entry["hostPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("hostPort in {entry}"))
}

/// One `GET /` over HTTP/1.0; the whole response.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// GET / from netns `ns` to `addr`, retrying for `patience` while httpd starts. Returns the
/// whole response.
pub fn fetch_page(ns: &str, addr: SocketAddr, patience: Duration) -> Result<String, String> {
    // Only the thread `in_ns` starts moves into `ns`.
    in_ns(ns, move || {
        let deadline = Instant::now() + patience;
        loop {
            let last = match http_get(addr) {
                Ok(r) if r.starts_with("HTTP/1.") => return Ok(r),
                Ok(r) => format!("not HTTP: {r:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!("{addr}: {last}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// The page [`World::rootfs`] writes for container `name`, as it appears in a response.
pub fn page_of(name: &str) -> String {
    format!("hello from {name}<")
}

// ---------------------------------------------------------------------------------------------
// The shipped hook files.

/// Rewrites one shipped hook entry for this test: the binary under test, this test's state dir,
/// and a config with a known dynamic range. Also checks the entry is what the shim expects.
pub fn localize_hook(hook: &Value, stage: &str, state_dir: &Path, config: &Path) -> Value {
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

/// The `hooks` object of a shipped spec fragment (runc-hooks.json, containerd/*.json), localized.
pub fn hooks_from_spec_fragment(rel: &str, state_dir: &Path, config: &Path) -> Value {
    let fragment = read_json(&repo_file(rel));
    let hooks = fragment["hooks"]
        .as_object()
        .unwrap_or_else(|| panic!("{rel}: a top-level \"hooks\" object"));
    let mut stages: Vec<&String> = hooks.keys().collect();
    stages.sort();
    assert_eq!(stages, ["createRuntime", "poststop"], "{rel}");
    let mut out = serde_json::Map::new();
    for (stage, list) in hooks {
        let list = list.as_array().expect("each stage is a list of hooks");
        assert_eq!(list.len(), 1, "{rel}: {stage}: one netshim hook");
        out.insert(
            stage.clone(),
            json!([localize_hook(&list[0], stage, state_dir, config)]),
        );
    }
    Value::Object(out)
}

/// The shipped `ctr run --config` fragment: its hooks, localized, after checking its annotations
/// are netshim's and well-formed.
pub fn hooks_from_ctr_fragment(state_dir: &Path, config: &Path) -> Value {
    let rel = "hooks/containerd/ctr-run-config.json";
    let fragment = read_json(&repo_file(rel));
    let ann = fragment["annotations"]
        .as_object()
        .unwrap_or_else(|| panic!("{rel}: annotations (ctr ignores --annotation with --config)"));
    assert!(
        ann["netshim.network-mode"] == "bridge",
        "{rel}: netshim.network-mode"
    );
    let pm = ann["netshim.port-mappings"]
        .as_str()
        .unwrap_or_else(|| panic!("{rel}: netshim.port-mappings must be a string"));
    let pm: Value = serde_json::from_str(pm)
        .unwrap_or_else(|e| panic!("{rel}: netshim.port-mappings is not JSON: {e}"));
    assert!(
        pm.is_array(),
        "{rel}: netshim.port-mappings is a JSON array"
    );
    hooks_from_spec_fragment(rel, state_dir, config)
}

/// The oci-hooks.d files, each with its hook localized: (file name, file content).
pub fn oci_hooks_d_files(state_dir: &Path, config: &Path) -> Vec<(String, Value)> {
    let dir = repo_file("hooks/oci-hooks.d");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        let mut v = read_json(f);
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
        let stage = stages[0].as_str().expect("stage name").to_string();
        v["hook"] = localize_hook(&v["hook"], &stage, state_dir, config);
        let file_name = f.file_name().expect("file name").to_string_lossy();
        out.push((file_name.into_owned(), v));
    }
    out
}

/// The runtime-spec `hooks` the oci-hooks.d files amount to (the way podman and CRI-O turn them
/// into hooks), localized.
pub fn hooks_from_oci_hooks_d(state_dir: &Path, config: &Path) -> Value {
    let mut out = serde_json::Map::new();
    for (name, v) in oci_hooks_d_files(state_dir, config) {
        let stage = v["stages"][0].as_str().expect("stage").to_string();
        let prev = out.insert(stage.clone(), json!([v["hook"]]));
        assert!(prev.is_none(), "{name}: stage {stage} defined twice");
    }
    let mut stages: Vec<&String> = out.keys().collect();
    stages.sort();
    assert_eq!(
        stages,
        ["createRuntime", "poststop"],
        "{}",
        repo_file("hooks/oci-hooks.d").display()
    );
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// One test's world.

/// What tells the worlds of one test file from another's.
pub struct Flavour {
    /// First letters of every name (namespaces, links, containers); three letters.
    pub tag: &'static str,
    /// First two octets of the H–C link's /30s.
    pub net: &'static str,
    /// How long a page fetch retries while httpd starts.
    pub patience: Duration,
}

/// A [`HostPair`] (H with a default route via C, C) for a runtime under test.
pub struct World {
    pub pair: HostPair,
    /// Which runtime, for messages.
    pub label: String,
    patience: Duration,
}

impl std::ops::Deref for World {
    type Target = HostPair;
    fn deref(&self) -> &HostPair {
        &self.pair
    }
}

impl World {
    /// H (lo up, a default route via C like a real host: its source is the load-balancer target)
    /// linked to C; the temp dir with an empty state dir and a config with [`DYNAMIC_RANGE`].
    pub fn new(f: &Flavour, label: &str) -> World {
        assert!(
            is_root(),
            "the {label} e2e tests need root (network namespaces, runtimes, nftables)"
        );
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{}{}x{}", f.tag, std::process::id(), n);
        let third = (n % 250 + 1) as u8;
        let net: Vec<u8> = f.net.split('.').filter_map(|o| o.parse().ok()).collect();
        let addr = |last| Ipv4Addr::new(net[0], net[1], third, last);
        let w = World {
            pair: HostPair::new(&prefix, 'c', addr(1), addr(2), true),
            label: label.to_string(),
            patience: f.patience,
        };
        fs::create_dir_all(w.state_dir()).expect("create temp dirs");
        let range = format!("{}-{}", DYNAMIC_RANGE.0, DYNAMIC_RANGE.1);
        w.set_config(&format!("[ports]\ndynamic_range = \"{range}\"\n"));
        w
    }

    /// A command run inside H (network namespace only).
    pub fn in_host(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host))
            .arg("--")
            .arg(prog);
        c
    }

    /// The shim under test, inside H, with this world's state dir and config.
    pub fn shim(&self) -> Command {
        let mut c = self.in_host(SHIM);
        c.env("NETSHIM_STATE_DIR", self.state_dir())
            .env("NETSHIM_CONFIG", self.config_path());
        c
    }

    /// Container name for a short name; unique across tests and test processes.
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// `<dir>/<short>/rootfs` with busybox and a page naming the container.
    pub fn rootfs(&self, short: &str) -> PathBuf {
        let rootfs = self.dir.join(short).join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
            fs::create_dir_all(rootfs.join(d)).expect("create rootfs dirs");
        }
        fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a)).expect("applet symlink");
        }
        fs::write(
            rootfs.join("www/index.html"),
            format!(
                "<html><body>hello from {}</body></html>\n",
                self.name(short)
            ),
        )
        .expect("write index.html");
        rootfs
    }

    /// Bundle `<dir>/<short>`: the rootfs and a `config.json` running `args` with `annotations`
    /// and `hooks`, in a network namespace of its own unless `own_netns` is false (host mode).
    pub fn write_bundle(
        &self,
        short: &str,
        annotations: Value,
        hooks: &Value,
        args: &[&str],
        own_netns: bool,
    ) -> PathBuf {
        let bundle = self.dir.join(short);
        let rootfs = self.rootfs(short);
        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        if own_netns {
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
            "hostname": short,
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
            ],
            "annotations": annotations,
            "hooks": hooks,
            "linux": {"namespaces": namespaces}
        });
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("serialize spec"),
        )
        .expect("write config.json");
        bundle
    }

    /// `shim ports list --json`.
    pub fn ports(&self) -> Vec<Value> {
        let out = must(self.shim().args(["ports", "list", "--json"]));
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ports list --json is not JSON ({e}): {out}"));
        v.as_array()
            .unwrap_or_else(|| panic!("ports list --json is not an array: {out}"))
            .clone()
    }

    /// Elements of an nft map or set of `ip netshim` in H; empty if the table is gone.
    pub fn nft_elements(&self, kind: &str, name: &str) -> Vec<Value> {
        // A poststop retires elements with a 1 ms timeout (Linux 6.12+): wait for the tick.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < deadline
            && String::from_utf8_lossy(
                &output(self.in_host("nft").args(["list", "ruleset"])).stdout,
            )
            .contains(" expires ")
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let out = output(
            self.in_host("nft")
                .args(["-j", "list", kind, "ip", "netshim", name]),
        );
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

    /// GET / from C through H's address and `port`, retrying while httpd starts.
    pub fn fetch(&self, port: u16) -> Result<String, String> {
        let addr: SocketAddr = format!("{}:{port}", self.host_ip)
            .parse()
            .expect("socket address");
        fetch_page(&self.client, addr, self.patience)
    }

    /// GET / from netns `ns` to `addr`, with this world's patience.
    pub fn fetch_from(&self, ns: &str, addr: SocketAddr) -> Result<String, String> {
        fetch_page(ns, addr, self.patience)
    }

    /// Fetches through `port` and asserts the page is container `name`'s.
    pub fn assert_serves(&self, port: u16, name: &str) {
        let label = &self.label;
        match self.fetch(port) {
            Ok(r) => assert!(
                r.contains(&page_of(name)),
                "{label}: page through {}:{port} is not {name}'s: {r}",
                self.host_ip
            ),
            Err(e) => panic!(
                "{label}: no page from {name} through {}:{port}: {e}",
                self.host_ip
            ),
        }
    }

    /// Prints netshim's state file (for a failing test).
    pub fn dump_state(&self) {
        for id in self.recorded() {
            eprintln!(
                "--- record {id}: {:?}",
                super::ledger_record(&self.state_dir(), &id)
            );
        }
    }
}
