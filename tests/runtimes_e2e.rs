//! End to end under crun, containerd and podman: the shim registered from the shipped hook files
//! (`hooks/runc-hooks.json`, `hooks/containerd/ctr-run-config.json`, `hooks/oci-hooks.d/`), real
//! busybox httpd containers, real TCP from a client network namespace through the host ports.
//! The runc cases are in `runc_e2e.rs`; these are the same cases under the other runtimes (two
//! dynamic ports serving, a refused static-port conflict leaving nothing, delete releasing
//! everything), plus each runtime's own failed-create and poststop behaviour: crun and podman
//! never run poststop after a failed create (netshim's rollback must leave nothing; a failure
//! after its hook is left to `shim gc`), podman runs poststop when the container exits.
//! See docs/runtimes.md.
//!
//! ```text
//!   netns C (client) 172.31.n.2/30 ---veth--- 172.31.n.1/30 netns H (the "host")
//! ```
//!
//! Every runtime runs inside H (`nsenter --net`, not `ip netns exec`, which remounts /sys and hides
//! this host's cgroup v1 mounts), so its hooks run there and netshim0, the nsh* veths and the
//! nftables table `ip netshim` are made in H, never on the real host. Containers get their own
//! network namespaces from the runtime.
//!
//! * crun runs through an unshare wrapper written into the test's temp dir: on a hybrid cgroup
//!   host it hides the cgroup2 mount in a private mount namespace (crun refuses hybrid mode).
//! * containerd is a private daemon per test, started in H with root, state, sockets and the
//!   `opt` plugin's directory in the temp dir, killed by its own pid. Containers come from
//!   `ctr run -d --null-io --runc-root <temp> --config` with the hooks of the shipped fragment.
//! * podman runs with private --root/--runroot/--tmpdir/--network-config-dir, file locks (a
//!   containers.conf in the temp dir, so no /dev/shm/libpod_lock), `--network none` and a
//!   --hooks-dir holding the shipped oci-hooks.d files with path and env localized.
//!
//! What the runtimes still create outside the temp dir (/run/containerd; /run/containers,
//! /run/runc, /etc/containers/networks, /var/lib/containers) is removed when the last test of this
//! process that uses it finishes, and only if it did not exist before.
//!
//! Needs root, crun, containerd, podman, runc, iproute2, nftables and /bin/busybox (static);
//! `scripts/deps.sh` installs them. A missing runtime fails its tests with the reason.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SHIM: &str = env!("CARGO_BIN_EXE_shim");
/// Where the shipped hook files point; tests replace it with the binary under test.
const INSTALLED_SHIM: &str = "/usr/local/bin/shim";
const DYNAMIC_RANGE: (u64, u64) = (40000, 40999);
const STATIC_PORT: u16 = 18080;
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: [&str; 5] = ["sh", "httpd", "sleep", "ip", "cat"];
const HTTPD: [&str; 7] = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"];
const DYNAMIC: &str = r#"[{"containerPort":80}]"#;
const STATIC: &str = r#"[{"containerPort":80,"hostPort":18080}]"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rt {
    Crun,
    Containerd,
    Podman,
}

impl Rt {
    fn binaries(self) -> &'static [&'static str] {
        match self {
            Rt::Crun => &["crun", "unshare"],
            Rt::Containerd => &["containerd", "ctr", "containerd-shim-runc-v2", "runc"],
            Rt::Podman => &["podman", "conmon", "runc"],
        }
    }

    /// Host paths the runtime creates whatever private directories it is given.
    fn host_dirs(self) -> &'static [&'static str] {
        match self {
            Rt::Crun => &[],
            // containerd-shim-runc-v2 sockets: /run/containerd/s
            Rt::Containerd => &["/run/containerd"],
            Rt::Podman => &[
                "/run/containers",
                // runc's default root: podman's cleanup deletes through it
                "/run/runc",
                "/etc/containers/networks",
                "/var/lib/containers/cache",
                "/var/lib/containers",
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host paths shared by the tests of this process.

struct HostDir {
    path: &'static str,
    users: usize,
    existed: bool,
}

static HOST_DIRS: Mutex<Vec<HostDir>> = Mutex::new(Vec::new());

/// A test's use of host paths a runtime creates on its own. Each path is removed when the last
/// test using it drops its claim, and only if it did not exist when the first of them claimed it.
/// Tests run in parallel threads of one process; the mutex makes claim and removal atomic.
struct HostDirClaim(&'static [&'static str]);

impl HostDirClaim {
    fn new(paths: &'static [&'static str]) -> HostDirClaim {
        let mut dirs = HOST_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        for &p in paths {
            let exists = Path::new(p).exists();
            match dirs.iter_mut().find(|d| d.path == p) {
                Some(d) => {
                    if d.users == 0 {
                        d.existed = exists;
                    }
                    d.users += 1;
                }
                None => dirs.push(HostDir {
                    path: p,
                    users: 1,
                    existed: exists,
                }),
            }
        }
        HostDirClaim(paths)
    }
}

impl Drop for HostDirClaim {
    fn drop(&mut self) {
        let mut dirs = HOST_DIRS.lock().unwrap_or_else(|e| e.into_inner());
        for &p in self.0 {
            if let Some(d) = dirs.iter_mut().find(|d| d.path == p) {
                d.users -= 1;
                if d.users == 0 && !d.existed {
                    let _ = fs::remove_dir_all(p);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
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
fn run_logged(cmd: &mut Command, log: &Path) -> (bool, String) {
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

fn ip(args: &[&str]) -> String {
    must(Command::new("ip").args(args))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn write_executable(path: &Path, body: &str) {
    fs::write(path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Waits until `f` holds, up to `limit`.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
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

/// Pids of processes (other than this one) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// CSV-quotes a value for podman's `--annotation`, a string-slice flag that splits on commas and
/// refuses bare quotes: JSON port mappings must be passed as `"k=[{""containerPort"":80}]"`.
fn podman_csv(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

// ---------------------------------------------------------------------------------------------
// The shipped hook files.

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

/// The `hooks` object of a shipped spec fragment (runc-hooks.json, containerd/*.json), localized.
fn hooks_from_spec_fragment(rel: &str, state_dir: &Path, config: &Path) -> Value {
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
fn hooks_from_ctr_fragment(state_dir: &Path, config: &Path) -> Value {
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
fn oci_hooks_d_files(state_dir: &Path, config: &Path) -> Vec<(String, Value)> {
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
        assert_eq!(stages.len(), 1, "{name}: exactly one stage per file");
        let stage = stages[0].as_str().expect("stage name").to_string();
        v["hook"] = localize_hook(&v["hook"], &stage, state_dir, config);
        let file_name = f.file_name().expect("file name").to_string_lossy();
        out.push((file_name.into_owned(), v));
    }
    out
}

/// The runtime-spec `hooks` the oci-hooks.d files amount to (how podman applies them).
fn hooks_from_oci_hooks_d(state_dir: &Path, config: &Path) -> Value {
    let mut out = serde_json::Map::new();
    for (name, v) in oci_hooks_d_files(state_dir, config) {
        let stage = v["stages"][0].as_str().expect("stage").to_string();
        let prev = out.insert(stage.clone(), json!([v["hook"]]));
        assert!(prev.is_none(), "{name}: stage {stage} defined twice");
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// One test's world.

/// A container this test made: the runtime's name for it and the id in netshim's state (podman's
/// 64-hex id; the name for the others).
#[derive(Clone, Debug)]
struct Ctr {
    name: String,
    id: String,
}

struct Lab {
    rt: Rt,
    prefix: String,
    host_ns: String,
    client_ns: String,
    /// H's address on the H–C link: what the client connects to.
    host_addr: String,
    dir: PathBuf,
    /// Spec hooks for crun and containerd bundles (podman uses the hooks dir).
    hooks: RefCell<Value>,
    /// Names of every container started (failed ones too), for cleanup.
    names: RefCell<Vec<String>>,
    containerd: RefCell<Option<Child>>,
    host_dirs: Option<HostDirClaim>,
}

impl Lab {
    fn new(rt: Rt) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the {rt:?} e2e tests need root (network namespaces, runtimes, nftables)"
        );
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        for b in rt.binaries() {
            assert!(
                which(b).is_some(),
                "{rt:?} e2e: `{b}` is not installed, so netshim cannot be proven under {rt:?}: \
                 run scripts/deps.sh (apt-get install -y crun containerd podman)"
            );
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("nsr{}x{}", std::process::id(), n);
        // Link and netns names are the prefix plus one letter; the kernel allows 15 characters.
        assert!(prefix.len() < 15, "prefix {prefix} too long for link names");
        let dir = std::env::temp_dir().join(format!("netshim-rt-{prefix}"));
        let third = n % 250 + 1;
        let lab = Lab {
            rt,
            host_ns: format!("{prefix}h"),
            client_ns: format!("{prefix}c"),
            host_addr: format!("172.31.{third}.1"),
            prefix,
            dir,
            hooks: RefCell::new(Value::Null),
            names: RefCell::new(Vec::new()),
            containerd: RefCell::new(None),
            host_dirs: Some(HostDirClaim::new(rt.host_dirs())),
        };
        // From here on, Drop cleans up whatever was made.
        let _ = fs::remove_dir_all(&lab.dir);
        fs::create_dir_all(lab.state_dir()).expect("create temp dirs");
        let range = format!("{}-{}", DYNAMIC_RANGE.0, DYNAMIC_RANGE.1);
        fs::write(
            lab.config(),
            format!("[ports]\ndynamic_range = \"{range}\"\n"),
        )
        .expect("write config");

        let (h, c) = (lab.host_ns.as_str(), lab.client_ns.as_str());
        let (hv, cv) = (format!("{}a", lab.prefix), format!("{}b", lab.prefix));
        let host_cidr = format!("{}/30", lab.host_addr);
        let client_addr = format!("172.31.{third}.2");
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
        // Like a real host, H has a default route (its source is the load-balancer target).
        ip(&["-n", h, "route", "add", "default", "via", &client_addr]);

        let (sd, cfg) = (lab.state_dir(), lab.config());
        match rt {
            Rt::Crun => {
                let crun = which("crun").expect("crun");
                // RUNTIMES.md's wrapper; `umount -n` so libmount does not create /run/mount.
                write_executable(
                    &lab.crun_wrapper(),
                    &format!(
                        "#!/bin/sh\n\
                         # crun refuses hybrid cgroups: hide the cgroup2 mount in a private mount ns\n\
                         if [ \"$(stat -fc %T /sys/fs/cgroup)\" = tmpfs ] && \
                         [ -n \"$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)\" ]; then\n  \
                         exec unshare -m --propagation private sh -c \
                         'umount -n -l /sys/fs/cgroup/unified 2>/dev/null; exec {crun} \"$@\"' crun \"$@\"\n\
                         fi\n\
                         exec {crun} \"$@\"\n",
                        crun = crun.display()
                    ),
                );
                *lab.hooks.borrow_mut() =
                    hooks_from_spec_fragment("hooks/runc-hooks.json", &sd, &cfg);
            }
            Rt::Containerd => {
                *lab.hooks.borrow_mut() = hooks_from_ctr_fragment(&sd, &cfg);
                lab.start_containerd();
            }
            Rt::Podman => {
                let hooks_d = lab.dir.join("hooks.d");
                fs::create_dir_all(&hooks_d).expect("create hooks.d");
                for (name, v) in oci_hooks_d_files(&sd, &cfg) {
                    fs::write(
                        hooks_d.join(name),
                        serde_json::to_vec_pretty(&v).expect("serialize"),
                    )
                    .expect("write hooks.d file");
                }
                // File locks in --tmpdir instead of the global /dev/shm/libpod_lock.
                fs::write(
                    lab.dir.join("containers.conf"),
                    "[engine]\nlock_type = \"file\"\n",
                )
                .expect("write containers.conf");
            }
        }
        lab
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn crun_wrapper(&self) -> PathBuf {
        self.dir.join("crun-nsw")
    }

    fn ctrd_sock(&self) -> PathBuf {
        self.dir.join("ctrd.sock")
    }

    /// A command run inside H (network namespace only).
    fn in_host(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns))
            .arg("--")
            .arg(prog);
        c
    }

    fn crun(&self) -> Command {
        let mut c = self.in_host(self.crun_wrapper());
        c.arg("--root").arg(self.dir.join("crun"));
        c
    }

    fn ctr(&self) -> Command {
        let mut c = self.in_host("ctr");
        c.arg("-a").arg(self.ctrd_sock());
        c
    }

    fn podman(&self) -> Command {
        let d = &self.dir;
        let mut c = self.in_host("podman");
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("podman-root"))
            .arg("--runroot")
            .arg(d.join("podman-run"))
            .arg("--tmpdir")
            .arg(d.join("podman-tmp"))
            .arg("--network-config-dir")
            .arg(d.join("podman-net"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            // podman's default runtime is crun, which refuses this host's hybrid cgroups.
            .args(["--runtime", "runc", "--hooks-dir"])
            .arg(d.join("hooks.d"));
        c
    }

    fn shim(&self) -> Command {
        let mut c = self.in_host(SHIM);
        c.env("NETSHIM_STATE_DIR", self.state_dir())
            .env("NETSHIM_CONFIG", self.config());
        c
    }

    /// A private containerd in H; everything it keeps is in the temp dir except the shim sockets
    /// in /run/containerd/s (claimed in `Rt::host_dirs`).
    fn start_containerd(&self) {
        let d = self.dir.join("ctrd");
        let toml = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             # the opt plugin creates /opt/containerd otherwise\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = self.ctrd_sock().display(),
            opt = d.join("opt").display(),
        );
        fs::create_dir_all(&d).expect("create containerd dir");
        let conf = self.dir.join("containerd.toml");
        fs::write(&conf, toml).expect("write containerd.toml");
        let log = File::create(self.dir.join("containerd.log")).expect("containerd.log");
        let child = self
            .in_host("containerd")
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        // nsenter execs containerd (no --fork): the child's pid is the daemon's.
        *self.containerd.borrow_mut() = Some(child);
        let up = wait_for(Duration::from_secs(10), || {
            run(self.ctr().arg("version")).status.success()
        });
        assert!(
            up,
            "private containerd did not come up: {}",
            fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
    }

    /// Container name for a short name; unique across tests and test processes.
    fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// A rootfs with busybox and a page naming the container.
    fn rootfs(&self, short: &str) -> PathBuf {
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

    /// A bundle `config.json` for crun and `ctr run --config`, hooks from the shipped files.
    fn write_bundle(&self, short: &str, port_mappings: &str, args: &[&str]) -> PathBuf {
        let bundle = self.dir.join(short);
        let rootfs = self.rootfs(short);
        let mut annotations = json!({
            "netshim.network-mode": "bridge",
            "netshim.port-mappings": port_mappings
        });
        if self.rt == Rt::Crun {
            // crun sends hook output nowhere unless told: keep it to check the shim's message.
            annotations["run.oci.hooks.stderr"] = json!(bundle.join("hooks.err"));
        }
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "cwd": "/",
                "args": args,
                "env": ["PATH=/bin"],
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
            "hooks": *self.hooks.borrow(),
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
            ]}
        });
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).expect("serialize spec"),
        )
        .expect("write config.json");
        bundle
    }

    /// Creates and starts a bridge container running httpd on :80, inside H. Returns the
    /// container, whether the runtime succeeded, and what it (and, for crun, the hook) printed.
    fn start(&self, short: &str, port_mappings: &str) -> (Ctr, bool, String) {
        self.start_process(short, port_mappings, &HTTPD)
    }

    /// Like [`Lab::start`] with another container process.
    fn start_process(
        &self,
        short: &str,
        port_mappings: &str,
        args: &[&str],
    ) -> (Ctr, bool, String) {
        let name = self.name(short);
        self.names.borrow_mut().push(name.clone());
        let log = self.dir.join(format!("{short}.out"));
        let (ok, out, id) = match self.rt {
            Rt::Crun => {
                let bundle = self.write_bundle(short, port_mappings, args);
                let (ok, out) = run_logged(
                    self.crun()
                        .args(["run", "-d", "-b"])
                        .arg(&bundle)
                        .arg(&name),
                    &log,
                );
                let hook_err = fs::read_to_string(bundle.join("hooks.err")).unwrap_or_default();
                (ok, format!("{out}{hook_err}"), name.clone())
            }
            Rt::Containerd => {
                let bundle = self.write_bundle(short, port_mappings, args);
                let (ok, out) = run_logged(
                    self.ctr()
                        .args(["run", "-d", "--null-io", "--runc-root"])
                        .arg(self.dir.join("runc"))
                        .arg("--config")
                        .arg(bundle.join("config.json"))
                        .arg(&name),
                    &log,
                );
                (ok, out, name.clone())
            }
            Rt::Podman => {
                let rootfs = self.rootfs(short);
                let (ok, out) = run_logged(
                    self.podman()
                        .args(["run", "-d", "--name", &name, "--network", "none"])
                        .args(["--annotation", "netshim.network-mode=bridge"])
                        .arg("--annotation")
                        .arg(podman_csv(&format!(
                            "netshim.port-mappings={port_mappings}"
                        )))
                        // no CAP_SYS_RESOURCE here: podman's default rlimits cannot be set
                        .args([
                            "--ulimit",
                            "nofile=1024:1024",
                            "--ulimit",
                            "nproc=4096:4096",
                        ])
                        .arg("--rootfs")
                        .arg(&rootfs)
                        .args(args),
                    &log,
                );
                // A container whose create failed stays known (Created) and has an id too.
                let id = run(self
                    .podman()
                    .args(["inspect", "--format", "{{.Id}}", &name]));
                let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
                (ok, out, id)
            }
        };
        (Ctr { name, id }, ok, out)
    }

    fn start_ok(&self, short: &str, port_mappings: &str) -> Ctr {
        let (c, ok, out) = self.start(short, port_mappings);
        assert!(ok, "{:?}: starting {short} failed: {out}", self.rt);
        assert!(!c.id.is_empty(), "{:?}: no id for {short}", self.rt);
        c
    }

    /// The runtime's delete of a (running or failed) container, inside H: crun `delete -f`,
    /// ctr `task kill` + `task rm` + `container rm`, podman `rm -f -t 0`.
    fn delete(&self, name: &str) -> (bool, String) {
        match self.rt {
            Rt::Crun => {
                let out = run(self.crun().args(["delete", "-f", name]));
                (out.status.success(), text(&out))
            }
            Rt::Containerd => {
                let mut all = String::new();
                let kill = run(self.ctr().args(["task", "kill", "-s", "KILL", name]));
                all += &text(&kill);
                // The task must have stopped before `task rm`; a missing task is fine.
                let mut task_gone = false;
                wait_for(Duration::from_secs(5), || {
                    let out = run(self.ctr().args(["task", "rm", name]));
                    let t = text(&out);
                    task_gone = out.status.success() || t.contains("not found");
                    if task_gone {
                        all += &t;
                    }
                    task_gone
                });
                let rm = run(self.ctr().args(["container", "rm", name]));
                all += &text(&rm);
                (task_gone && rm.status.success(), all)
            }
            Rt::Podman => {
                let out = run(self.podman().args(["rm", "-f", "-t", "0", name]));
                (out.status.success(), text(&out))
            }
        }
    }

    /// Whether the runtime still has a record of the container.
    fn knows(&self, name: &str) -> bool {
        let out = match self.rt {
            Rt::Crun => run(self.crun().args(["state", name])),
            Rt::Containerd => run(self.ctr().args(["container", "info", name])),
            Rt::Podman => run(self.podman().args(["container", "exists", name])),
        };
        out.status.success()
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

    /// GET / from the client netns through H's address and `port`, retrying for ~5 s while
    /// httpd starts.
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
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let last = match get(addr) {
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
        .join()
        .expect("client thread")
    }

    fn assert_serves(&self, port: u16, c: &Ctr) {
        match self.fetch(port) {
            Ok(r) => assert!(
                r.contains(&format!("hello from {}<", c.name)),
                "{:?}: page through {}:{port} is not {}'s: {r}",
                self.rt,
                self.host_addr,
                c.name
            ),
            Err(e) => panic!(
                "{:?}: no page from {} through {}:{port}: {e}",
                self.rt, c.name, self.host_addr
            ),
        }
    }

    /// Nothing of netshim's is left: no veth, no nft elements, no ports, no records.
    fn assert_all_released(&self, when: &str) {
        let rt = self.rt;
        assert_eq!(self.links("nsh"), Vec::<String>::new(), "{rt:?} {when}");
        assert_eq!(
            self.nft_elements("map", "ports"),
            Vec::<Value>::new(),
            "{rt:?} {when}"
        );
        assert_eq!(
            self.nft_elements("set", "mapped"),
            Vec::<Value>::new(),
            "{rt:?} {when}"
        );
        assert_eq!(self.ports(), Vec::<Value>::new(), "{rt:?} {when}");
        assert_eq!(self.recorded(), Vec::<String>::new(), "{rt:?} {when}");
    }

    /// Only `first` is set up: its one link, its record, its one port and map element, its page.
    fn assert_only(&self, first: &Ctr, links: &[String], when: &str) {
        let rt = self.rt;
        assert_eq!(self.links("nsh"), links, "{rt:?} {when}: a link is left");
        assert_eq!(self.recorded(), vec![first.id.clone()], "{rt:?} {when}");
        let ports = self.ports();
        assert_eq!(ports.len(), 1, "{rt:?} {when}: {ports:#?}");
        assert_eq!(ports[0]["containerId"], first.id.as_str(), "{rt:?} {when}");
        assert_eq!(ports[0]["hostPort"], STATIC_PORT, "{rt:?} {when}");
        assert_eq!(
            self.nft_elements("map", "ports").len(),
            1,
            "{rt:?} {when}: nft map elements"
        );
        self.assert_serves(STATIC_PORT, first);
    }

    fn dump(&self) {
        for name in self.names.borrow().iter() {
            let short = name.trim_start_matches(&format!("{}-", self.prefix));
            let out = fs::read_to_string(self.dir.join(format!("{short}.out")));
            eprintln!(
                "--- {:?} output for {name}: {}",
                self.rt,
                out.unwrap_or_default()
            );
        }
        if let Ok(s) = fs::read_to_string(self.dir.join("containerd.log")) {
            let tail: Vec<&str> = s.lines().rev().take(30).collect();
            eprintln!("--- containerd.log (last lines, newest first):");
            for l in tail {
                eprintln!("{l}");
            }
        }
        if let Ok(s) = fs::read_to_string(self.state_dir().join("state.json")) {
            eprintln!("--- state.json: {s}");
        }
    }

    fn stop_containerd(&self) {
        let Some(mut child) = self.containerd.borrow_mut().take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let exited = wait_for(Duration::from_secs(5), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Unmounts whatever a runtime left mounted below the temp dir (podman's shm, on failure).
    fn unmount_below_dir(&self) {
        let prefix = format!("{}/", self.dir.display());
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            if let Ok(c) = std::ffi::CString::new(p) {
                // SAFETY: a valid C string; MNT_DETACH only detaches this mount.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
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
        if std::thread::panicking() {
            self.dump();
        }
        let names = self.names.borrow().clone();
        for name in names.iter().rev() {
            let _ = self.delete(name);
        }
        self.stop_containerd();
        // conmon's `podman container cleanup` and containerd shims may still be finishing;
        // they must not recreate the host paths after the claim is dropped.
        let dir = self.dir.display().to_string();
        if !wait_for(Duration::from_secs(10), || {
            processes_mentioning(&dir).is_empty()
        }) {
            eprintln!(
                "warning: processes still mention {dir}: {:?}",
                processes_mentioning(&dir)
            );
        }
        self.unmount_below_dir();
        for ns in [&self.client_ns, &self.host_ns] {
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = fs::remove_dir_all(&self.dir);
        drop(self.host_dirs.take());
    }
}

fn host_port(entry: &Value) -> u16 {
    entry["hostPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("hostPort in {entry}"))
}

// ---------------------------------------------------------------------------------------------
// The cases, each run under every runtime.

/// Two containers with a dynamic port each serve their own page through their own host port.
fn dynamic_ports_serve_through_host_ports(rt: Rt) {
    let lab = Lab::new(rt);
    let a = lab.start_ok("web1", DYNAMIC);
    let b = lab.start_ok("web2", DYNAMIC);
    let ports = lab.ports();
    assert_eq!(ports.len(), 2, "{rt:?}: {ports:#?}");
    let find = |c: &Ctr| {
        ports
            .iter()
            .find(|p| p["containerId"] == c.id.as_str())
            .unwrap_or_else(|| panic!("{rt:?}: {} not in ports list: {ports:#?}", c.id))
    };
    let (pa, pb) = (find(&a), find(&b));
    for p in [pa, pb] {
        assert_eq!(p["networkMode"], "bridge", "{p}");
        assert_eq!(p["protocol"], "tcp", "{p}");
        assert_eq!(p["containerPort"], 80, "{p}");
        assert_eq!(p["dynamic"], true, "{p}");
        assert_eq!(p["targetIP"], lab.host_addr.as_str(), "{p}");
        assert_eq!(p["targetPort"], p["hostPort"], "{p}");
        let hp = u64::from(host_port(p));
        assert!(
            (DYNAMIC_RANGE.0..=DYNAMIC_RANGE.1).contains(&hp),
            "{rt:?}: host port {hp} outside the configured dynamic range: {p}"
        );
    }
    assert_ne!(pa["hostPort"], pb["hostPort"], "{ports:#?}");
    assert_ne!(pa["containerIP"], pb["containerIP"], "{ports:#?}");
    lab.assert_serves(host_port(pa), &a);
    lab.assert_serves(host_port(pb), &b);
    assert_eq!(lab.links("nsh").len(), 2, "{:?}", lab.links("nsh"));
    assert_eq!(lab.nft_elements("map", "ports").len(), 2);
}

/// A second container on a taken static port fails to start; the first keeps serving; nothing
/// of the second is left, neither right after the failure nor after the runtime's cleanup of it.
/// crun and podman never run poststop after a failed create, so this is netshim's own rollback.
fn static_port_conflict_leaves_no_trace(rt: Rt) {
    let lab = Lab::new(rt);
    let first = lab.start_ok("web1", STATIC);
    lab.assert_serves(STATIC_PORT, &first);
    let links = lab.links("nsh");
    assert_eq!(links.len(), 1, "{links:?}");

    let (second, ok, out) = lab.start("web2", STATIC);
    assert!(
        !ok,
        "{rt:?}: a second container on host port {STATIC_PORT} must not start: {out}"
    );
    assert!(
        out.contains("shim: ") && out.contains(&format!("host port {STATIC_PORT}/tcp")),
        "{rt:?}: the failure must carry the shim's message naming the port: {out}"
    );
    lab.assert_only(&first, &links, "right after the failed create");

    match rt {
        Rt::Crun => {
            assert!(
                out.contains("error executing hook"),
                "crun names the failing hook: {out}"
            );
            assert!(!lab.knows(&second.name), "crun still knows {}", second.name);
        }
        Rt::Containerd => {
            // runc (under the containerd shim) ran poststop for the failed container; ctr keeps
            // the container record until `container rm`.
            assert!(
                lab.knows(&second.name),
                "ctr keeps the record of a failed create"
            );
            let (ok, out) = lab.delete(&second.name);
            assert!(ok, "removing the failed container: {out}");
        }
        Rt::Podman => {
            // podman keeps the failed container as Created; `podman rm` runs no poststop.
            assert!(lab.knows(&second.name), "podman keeps a failed container");
            let (ok, out) = lab.delete(&second.name);
            assert!(ok, "podman rm of the failed container: {out}");
        }
    }
    assert!(!lab.knows(&second.name), "{rt:?}: {} is gone", second.name);
    lab.assert_only(&first, &links, "after the failed container was removed");
}

/// Deleting the container runs poststop, which releases everything netshim made.
fn delete_releases_everything(rt: Rt) {
    let lab = Lab::new(rt);
    let c = lab.start_ok("web1", DYNAMIC);
    let ports = lab.ports();
    assert_eq!(ports.len(), 1, "{rt:?}: {ports:#?}");
    lab.assert_serves(host_port(&ports[0]), &c);
    assert_eq!(lab.links("nsh").len(), 1);
    assert_eq!(lab.nft_elements("map", "ports").len(), 1);
    assert_eq!(lab.nft_elements("set", "mapped").len(), 1);
    assert_eq!(lab.recorded(), vec![c.id.clone()]);

    if rt == Rt::Podman {
        // podman runs poststop itself when the container exits (conmon starts `podman container
        // cleanup`), before and without any `podman rm`.
        let out = run(lab.podman().args(["kill", &c.name]));
        assert!(out.status.success(), "podman kill: {}", text(&out));
        let released = wait_for(Duration::from_secs(10), || lab.recorded().is_empty());
        assert!(
            released,
            "podman: the container exited but netshim still holds it: {:?}",
            lab.recorded()
        );
        assert!(
            lab.knows(&c.name),
            "the exited container is still there: released at exit, not at rm"
        );
        lab.assert_all_released("after the container exited");
    }
    let (ok, out) = lab.delete(&c.name);
    assert!(ok, "{rt:?}: delete: {out}");
    assert!(
        !out.contains("error"),
        "{rt:?}: delete reports an error: {out}"
    );
    assert!(!lab.knows(&c.name), "{rt:?}: {} is gone", c.name);
    lab.assert_all_released("after delete");
}

/// The runtime fails after netshim's setup succeeded (the container's program does not exist).
/// runc (under containerd) then runs poststop; crun and podman do not, and the setup stays
/// recorded (its veth went with the container's netns, its host port is still claimed) until
/// `shim gc`, which must release it. Either way the static port is usable again afterwards.
fn failure_after_setup_is_released(rt: Rt) {
    let lab = Lab::new(rt);
    let (bad, ok, out) = lab.start_process("bad", STATIC, &["/bin/no-such-program"]);
    assert!(
        !ok,
        "{rt:?}: a container with a missing program must not start: {out}"
    );
    let state = read_json(&lab.state_dir().join("state.json"));
    assert_eq!(
        state["cursors"]["ip"], "10.213.0.2",
        "{rt:?}: netshim's setup ran before the failure: {state}"
    );
    let left = lab.recorded();
    match rt {
        Rt::Containerd => lab.assert_all_released("runc ran poststop after the failed start"),
        Rt::Crun | Rt::Podman => {
            if !left.is_empty() {
                eprintln!(
                    "{rt:?}: no poststop after the failed start; left until `shim gc`: {left:?}"
                );
            }
            let gc = must(lab.shim().arg("gc"));
            for id in &left {
                assert!(
                    gc.contains(id.as_str()),
                    "{rt:?}: shim gc did not release {id}: {gc}"
                );
            }
            assert!(left.iter().all(|id| *id == bad.id), "{rt:?}: {left:?}");
            lab.assert_all_released("after shim gc");
        }
    }
    let c = lab.start_ok("web1", STATIC);
    lab.assert_serves(STATIC_PORT, &c);
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn shipped_containerd_and_oci_hooks_files_register_the_runc_hooks() {
    // Pure file checks (no root): every shipped registration runs the same two hooks.
    let (sd, cfg) = (Path::new("/s"), Path::new("/c.toml"));
    let runc = hooks_from_spec_fragment("hooks/runc-hooks.json", sd, cfg);
    assert_eq!(
        hooks_from_ctr_fragment(sd, cfg),
        runc,
        "ctr-run-config.json"
    );
    assert_eq!(
        hooks_from_spec_fragment("hooks/containerd/cri-base-runtime-spec.hooks.json", sd, cfg),
        runc,
        "cri-base-runtime-spec.hooks.json"
    );
    assert_eq!(hooks_from_oci_hooks_d(sd, cfg), runc, "oci-hooks.d");
    let toml = fs::read_to_string(repo_file("hooks/containerd/cri-config.toml"))
        .expect("hooks/containerd/cri-config.toml");
    for needle in [
        "base_runtime_spec",
        "pod_annotations = [\"netshim.*\"]",
        "UNTESTED",
    ] {
        assert!(toml.contains(needle), "cri-config.toml lacks {needle}");
    }
}

#[test]
fn crun_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Crun);
}

#[test]
fn crun_static_port_conflict_is_rolled_back_by_netshim_alone() {
    static_port_conflict_leaves_no_trace(Rt::Crun);
}

#[test]
fn crun_delete_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Crun);
}

#[test]
fn crun_failure_after_setup_is_released_by_shim_gc() {
    failure_after_setup_is_released(Rt::Crun);
}

#[test]
fn containerd_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Containerd);
}

#[test]
fn containerd_static_port_conflict_leaves_no_trace() {
    static_port_conflict_leaves_no_trace(Rt::Containerd);
}

#[test]
fn containerd_task_rm_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Containerd);
}

#[test]
fn containerd_failure_after_setup_is_released_by_poststop() {
    failure_after_setup_is_released(Rt::Containerd);
}

#[test]
fn podman_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Podman);
}

#[test]
fn podman_static_port_conflict_is_rolled_back_by_netshim_alone() {
    static_port_conflict_leaves_no_trace(Rt::Podman);
}

#[test]
fn podman_container_exit_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Podman);
}

#[test]
fn podman_failure_after_setup_is_released_by_shim_gc() {
    failure_after_setup_is_released(Rt::Podman);
}
