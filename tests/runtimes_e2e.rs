//! End to end under runc, crun, containerd and podman: the shim registered from the shipped hook
//! files (runc: `hooks/oci-hooks.d/`; crun: `hooks/runc-hooks.json`; containerd:
//! `hooks/containerd/ctr-run-config.json`; podman: `hooks/oci-hooks.d/`), real busybox httpd
//! containers, real TCP from a client network namespace through the host ports. The same cases
//! under every runtime (two dynamic ports serving, a refused static-port conflict leaving
//! nothing, delete releasing everything, a failure after setup released; for crun, containerd
//! and podman an awsvpc task on a veth "ENI" serving a peer in the subnet and handing the ENI
//! back), with each runtime's own failed-create and poststop behaviour: runc (alone or under
//! containerd) runs poststop after a failed start, crun and podman never do (netshim's rollback
//! must leave nothing; a failure after its hook is left to `shim gc`), podman runs poststop when
//! the container exits. runc's own cases (host and none modes, awsvpc tasks, ingress, metadata,
//! shared ENIs) are in `runc_e2e.rs`. See docs/runtimes.md.
//!
//! ```text
//!   netns C (client) 172.31.n.2/30 ---veth--- 172.31.n.1/30 netns H (the "host")
//! ```
//!
//! Every runtime runs inside H (`nsenter --net`; the world, the hook files and the bundles are
//! `common::lab`'s, the VPC rig `common::vpc`'s), so its hooks run there and netshim0, the nsh*
//! veths and the nftables table `ip netshim` are made in H, never on the real host. Containers
//! get their own network namespaces from the runtime.
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

mod common;

use std::cell::RefCell;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use common::lab::*;
use common::mounts_under_in;
use common::vpc::{VpcNet, assert_eni_home, eni_annotation, link_by_mac};

const FLAVOUR: Flavour = Flavour {
    tag: "nsr",
    net: "172.31",
    patience: Duration::from_secs(5),
};
const STATIC_PORT: u16 = 18080;
const DYNAMIC: &str = r#"[{"containerPort":80}]"#;
const STATIC: &str = r#"[{"containerPort":80,"hostPort":18080}]"#;
/// Run by the holder of crun's mount namespace (in it): the cgroup2 mount hidden as by the
/// default wrapper, and the copies of every nsfs mount detached (a copy would keep another
/// test's network namespace alive after `ip netns del` as long as the holder lives).
const HOLD_CRUN_MOUNT_NS: &str = r#"umount -n -l /sys/fs/cgroup/unified 2>/dev/null
for m in $(sed -n 's/^\([^ ]* \)\{4\}\([^ ]*\) .* - nsfs .*/\2/p' /proc/self/mountinfo); do
  umount -n -l "$m"
done
exec sleep 600"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rt {
    Runc,
    Crun,
    Containerd,
    Podman,
}

impl Rt {
    fn binaries(self) -> &'static [&'static str] {
        match self {
            Rt::Runc => &["runc"],
            Rt::Crun => &["crun", "unshare"],
            Rt::Containerd => &["containerd", "ctr", "containerd-shim-runc-v2", "runc"],
            Rt::Podman => &["podman", "conmon", "runc"],
        }
    }

    /// Host paths the runtime creates whatever private directories it is given.
    fn host_dirs(self) -> &'static [&'static str] {
        match self {
            // Its root is in the temp dir.
            Rt::Runc | Rt::Crun => &[],
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

/// One `--annotation` value for podman: `key=value`, CSV-quoted when it holds quotes or commas.
fn podman_annotation(key: &str, value: &str) -> String {
    let kv = format!("{key}={value}");
    if kv.contains(['"', ',']) {
        podman_csv(&kv)
    } else {
        kv
    }
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

/// The world (H, C, the temp dir) with one runtime set up in it.
struct Lab {
    rt: Rt,
    world: World,
    /// Spec hooks for crun and containerd bundles (podman uses the hooks dir).
    hooks: Value,
    /// Names of every container started (failed ones too), for cleanup.
    names: RefCell<Vec<String>>,
    containerd: RefCell<Option<Child>>,
    /// The process holding crun's mount namespace, once [`Lab::hold_crun_mount_ns`] made one.
    crun_mount_ns: RefCell<Option<Child>>,
    /// Dropped after `world`, so after the runtime's leftovers in the temp dir are gone.
    _host_dirs: HostDirClaim,
}

impl Deref for Lab {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Lab {
    fn new(rt: Rt) -> Lab {
        for b in rt.binaries() {
            assert!(
                which(b).is_some(),
                "{rt:?} e2e: `{b}` is not installed, so netshim cannot be proven under {rt:?}: \
                 run scripts/deps.sh (apt-get install -y crun containerd podman)"
            );
        }
        let world = World::new(&FLAVOUR, &format!("{rt:?}"));
        let (sd, cfg) = (world.state_dir(), world.config_path());
        let hooks = match rt {
            // Registered from the oci-hooks.d files, so both shipped formats run under runc.
            Rt::Runc => hooks_from_oci_hooks_d(&sd, &cfg),
            Rt::Crun => hooks_from_spec_fragment(RUNC_HOOKS, &sd, &cfg),
            Rt::Containerd => hooks_from_ctr_fragment(&sd, &cfg),
            Rt::Podman => Value::Null,
        };
        let lab = Lab {
            rt,
            world,
            hooks,
            names: RefCell::new(Vec::new()),
            containerd: RefCell::new(None),
            crun_mount_ns: RefCell::new(None),
            _host_dirs: HostDirClaim::new(rt.host_dirs()),
        };
        match rt {
            Rt::Runc => fs::create_dir_all(lab.dir.join("runc")).expect("create the runc root"),
            Rt::Crun => {
                let crun = which("crun").expect("crun");
                // docs/runtimes.md's wrapper; `umount -n` so libmount does not create /run/mount.
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
            }
            Rt::Containerd => lab.start_containerd(),
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

    fn crun_wrapper(&self) -> PathBuf {
        self.dir.join("crun-nsw")
    }

    fn ctrd_sock(&self) -> PathBuf {
        self.dir.join("ctrd.sock")
    }

    /// From now on crun runs in one private mount namespace (the cgroup2 mount hidden, as by the
    /// default wrapper) held by a `sleep` for the rest of the test, not in a new one per call. A
    /// mount a hook makes (an awsvpc task's netns pin) then outlives the `crun run` whose hook
    /// made it and is there for the poststop of `crun delete`; with the default wrapper it goes
    /// with the wrapper's namespace when `crun run` exits.
    fn hold_crun_mount_ns(&self) {
        assert_eq!(
            self.rt,
            Rt::Crun,
            "only crun runs in a mount namespace of its own"
        );
        let crun = which("crun").expect("crun");
        let holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(HOLD_CRUN_MOUNT_NS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the holder of crun's mount namespace");
        // unshare and sh exec, so the pid is the holder's from the start.
        let pid = holder.id();
        *self.crun_mount_ns.borrow_mut() = Some(holder);
        let ready = wait_for(Duration::from_secs(5), || {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        assert!(ready, "the holder of crun's mount namespace did not start");
        write_executable(
            &self.crun_wrapper(),
            &format!(
                "#!/bin/sh\nexec nsenter --mount=/proc/{pid}/ns/mnt -- {crun} \"$@\"\n",
                crun = crun.display()
            ),
        );
    }

    /// netshim's netns pins (mounts under the state dir) in the mount namespace the hooks run in.
    fn pins(&self) -> Vec<String> {
        let mountinfo = match &*self.crun_mount_ns.borrow() {
            Some(holder) => format!("/proc/{}/mountinfo", holder.id()),
            None => "/proc/self/mountinfo".to_string(),
        };
        mounts_under_in(Path::new(&mountinfo), &self.state_dir())
    }

    fn runc(&self) -> Command {
        let mut c = self.in_host("runc");
        c.arg("--root").arg(self.dir.join("runc"));
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
            output(self.ctr().arg("version")).status.success()
        });
        assert!(
            up,
            "private containerd did not come up: {}",
            fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
    }

    /// A bundle `config.json` for crun and `ctr run --config`, hooks from the shipped files.
    fn write_bundle(&self, short: &str, annotations: &[(&str, &str)], args: &[&str]) -> PathBuf {
        let mut ann: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        if self.rt == Rt::Crun {
            // crun sends hook output nowhere unless told: keep it to check the shim's message.
            ann.insert(
                "run.oci.hooks.stderr".into(),
                json!(self.dir.join(short).join("hooks.err")),
            );
        }
        self.world
            .write_bundle(short, Value::Object(ann), &self.hooks, args, true)
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
        let annotations = [
            ("netshim.network-mode", "bridge"),
            ("netshim.port-mappings", port_mappings),
        ];
        self.start_annotated(short, &annotations, args)
    }

    /// Creates and starts an awsvpc task running httpd on :80; `eni` is the `netshim.eni` request.
    fn start_awsvpc(&self, short: &str, eni: &str) -> (Ctr, bool, String) {
        let annotations = [("netshim.network-mode", "awsvpc"), ("netshim.eni", eni)];
        self.start_annotated(short, &annotations, &HTTPD)
    }

    /// Creates and starts a container with `annotations` running `args`, inside H.
    fn start_annotated(
        &self,
        short: &str,
        annotations: &[(&str, &str)],
        args: &[&str],
    ) -> (Ctr, bool, String) {
        let name = self.name(short);
        self.names.borrow_mut().push(name.clone());
        let log = self.dir.join(format!("{short}.out"));
        let (ok, out, id) = match self.rt {
            Rt::Runc => {
                let bundle = self.write_bundle(short, annotations, args);
                // runc hands its own stdio to a detached container: never a pipe.
                let (ok, out) = run_logged(
                    self.runc()
                        .args(["run", "-d", "-b"])
                        .arg(&bundle)
                        .arg(&name),
                    &log,
                );
                (ok, out, name.clone())
            }
            Rt::Crun => {
                let bundle = self.write_bundle(short, annotations, args);
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
                let bundle = self.write_bundle(short, annotations, args);
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
                let mut cmd = self.podman();
                cmd.args(["run", "-d", "--name", &name, "--network", "none"]);
                for (k, v) in annotations {
                    cmd.arg("--annotation").arg(podman_annotation(k, v));
                }
                let (ok, out) = run_logged(
                    // no CAP_SYS_RESOURCE here: podman's default rlimits cannot be set
                    cmd.args([
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
                let id = output(
                    self.podman()
                        .args(["inspect", "--format", "{{.Id}}", &name]),
                );
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

    /// The runtime's delete of a (running or failed) container, inside H: runc and crun `delete -f`,
    /// ctr `task kill` + `task rm` + `container rm`, podman `rm -f -t 0`.
    fn delete(&self, name: &str) -> (bool, String) {
        match self.rt {
            Rt::Runc => {
                let out = output(self.runc().args(["delete", "-f", name]));
                (out.status.success(), text(&out))
            }
            Rt::Crun => {
                let out = output(self.crun().args(["delete", "-f", name]));
                (out.status.success(), text(&out))
            }
            Rt::Containerd => {
                let mut all = String::new();
                let kill = output(self.ctr().args(["task", "kill", "-s", "KILL", name]));
                all += &text(&kill);
                // The task must have stopped before `task rm`; a missing task is fine.
                let mut task_gone = false;
                wait_for(Duration::from_secs(5), || {
                    let out = output(self.ctr().args(["task", "rm", name]));
                    let t = text(&out);
                    task_gone = out.status.success() || t.contains("not found");
                    if task_gone {
                        all += &t;
                    }
                    task_gone
                });
                let rm = output(self.ctr().args(["container", "rm", name]));
                all += &text(&rm);
                (task_gone && rm.status.success(), all)
            }
            Rt::Podman => {
                let out = output(self.podman().args(["rm", "-f", "-t", "0", name]));
                (out.status.success(), text(&out))
            }
        }
    }

    /// The runtime's delete of `c` succeeds, reports no error, and the runtime forgets `c`.
    fn delete_cleanly(&self, c: &Ctr) {
        let rt = self.rt;
        let (ok, out) = self.delete(&c.name);
        assert!(ok, "{rt:?}: delete: {out}");
        assert!(
            !out.contains("error"),
            "{rt:?}: delete reports an error: {out}"
        );
        assert!(!self.knows(&c.name), "{rt:?}: {} is gone", c.name);
    }

    /// podman runs poststop itself when the container exits (conmon starts `podman container
    /// cleanup`), before and without any `podman rm`: kills `c`, waits until netshim no longer
    /// holds it, and checks podman still has it.
    fn podman_kill_releases(&self, c: &Ctr) {
        let out = output(self.podman().args(["kill", &c.name]));
        assert!(out.status.success(), "podman kill: {}", text(&out));
        let released = wait_for(Duration::from_secs(10), || self.recorded().is_empty());
        assert!(
            released,
            "podman: the container exited but netshim still holds it: {:?}",
            self.recorded()
        );
        assert!(
            self.knows(&c.name),
            "the exited container is still there: released at exit, not at rm"
        );
    }

    /// Whether the runtime still has a record of the container.
    fn knows(&self, name: &str) -> bool {
        let out = match self.rt {
            Rt::Runc => output(self.runc().args(["state", name])),
            Rt::Crun => output(self.crun().args(["state", name])),
            Rt::Containerd => output(self.ctr().args(["container", "info", name])),
            Rt::Podman => output(self.podman().args(["container", "exists", name])),
        };
        out.status.success()
    }

    fn assert_serves(&self, port: u16, c: &Ctr) {
        self.world.assert_serves(port, &c.name);
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
        self.dump_state();
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
        if let Some(mut holder) = self.crun_mount_ns.borrow_mut().take() {
            // Its mount namespace, and any pin left in it, goes with it.
            let _ = holder.kill();
            let _ = holder.wait();
        }
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
        // Then `world` drops (mounts below the temp dir, the namespaces, the temp dir), then
        // `_host_dirs`.
    }
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
        assert_eq!(p["targetIP"], lab.host_ip.to_string(), "{p}");
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
        Rt::Runc => {
            assert!(!lab.knows(&second.name), "runc still knows {}", second.name);
        }
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
        lab.podman_kill_releases(&c);
        lab.assert_all_released("after the container exited");
    }
    lab.delete_cleanly(&c);
    lab.assert_all_released("after delete");
}

/// The runtime fails after netshim's setup succeeded (the container's program does not exist).
/// runc (alone or under containerd) then runs poststop; crun and podman do not, and the setup stays
/// recorded (its veth went with the container's netns, its host port is still claimed) until
/// `shim gc`, which must release it. Either way the static port is usable again afterwards.
fn failure_after_setup_is_released(rt: Rt) {
    let lab = Lab::new(rt);
    let (bad, ok, out) = lab.start_process("bad", STATIC, &["/bin/no-such-program"]);
    assert!(
        !ok,
        "{rt:?}: a container with a missing program must not start: {out}"
    );
    let state = common::ledger_index(&lab.state_dir());
    assert_eq!(
        state["cursors"]["ip"], "10.213.0.2",
        "{rt:?}: netshim's setup ran before the failure: {state}"
    );
    let left = lab.recorded();
    match rt {
        Rt::Runc | Rt::Containerd => {
            lab.assert_all_released("runc ran poststop after the failed start")
        }
        Rt::Crun | Rt::Podman => {
            // These runtimes skip poststop after a failed start (docs/runtimes.md): the record
            // is left for `shim gc`, which must be the one releasing it.
            assert_eq!(
                left,
                vec![bad.id.clone()],
                "{rt:?}: expected the failed container left for gc (no poststop)"
            );
            let gc = must(lab.shim().arg("gc"));
            assert!(
                gc.contains(&format!("released {}", bad.id)),
                "{rt:?}: shim gc did not release {}: {gc}",
                bad.id
            );
            lab.assert_all_released("after shim gc");
        }
    }
    let c = lab.start_ok("web1", STATIC);
    lab.assert_serves(STATIC_PORT, &c);
}

/// An awsvpc task gets the ENI and serves its page to a peer in the subnet on its own address;
/// the runtime's delete (podman: the task exiting) runs poststop, which hands the ENI back to H
/// under its own name, with its MAC, down, without addresses.
fn awsvpc_task_serves_the_subnet_and_hands_its_eni_back(rt: Rt) {
    // H keeps its default route over the link to C, so the ENI is not the primary interface.
    let lab = Lab::new(rt);
    if rt == Rt::Crun {
        // netshim pins the task's netns with a bind mount made by the createRuntime hook, in
        // crun's mount namespace: it must outlive `crun run` (see `hold_crun_mount_ns`).
        lab.hold_crun_mount_ns();
    }
    lab.set_config("[awsvpc]\neni_wait_seconds = 2\ninterface_kinds = [\"veth\"]\n");
    let mut vpc = VpcNet::new(&lab.prefix, &lab.host);
    let eni = vpc.attach_eni();
    let (c, ok, out) = lab.start_awsvpc("task1", &eni_annotation(&eni, "10.0.1.23/24"));
    assert!(ok, "{rt:?}: starting an awsvpc task on {}: {out}", eni.mac);
    assert!(!c.id.is_empty(), "{rt:?}: no id for {}", c.name);
    assert_eq!(
        link_by_mac(&lab.host, &eni.mac),
        None,
        "{rt:?}: the ENI {} is still in H",
        eni.name
    );
    let to: SocketAddr = "10.0.1.23:80".parse().expect("address");
    match lab.fetch_from(&vpc.peer, to) {
        Ok(r) => assert!(r.contains(&page_of(&c.name)), "{rt:?}: {to}: {r}"),
        Err(e) => panic!("{rt:?}: no page from {} at {to} for the peer: {e}", c.name),
    }
    assert_eq!(lab.recorded(), vec![c.id.clone()], "{rt:?}");
    assert_eq!(lab.pins().len(), 1, "{rt:?}: netshim pins the task's netns");

    if rt == Rt::Podman {
        lab.podman_kill_releases(&c);
        assert_eni_home(&lab.host, &eni, "podman: after the task exited");
    }
    lab.delete_cleanly(&c);
    assert_eni_home(&lab.host, &eni, &format!("{rt:?}: after delete"));
    assert_eq!(lab.recorded(), Vec::<String>::new(), "{rt:?}");
    assert_eq!(lab.pins(), Vec::<String>::new(), "{rt:?}: netns pins left");
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Runc);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_static_port_conflict_leaves_no_trace() {
    static_port_conflict_leaves_no_trace(Rt::Runc);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_delete_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Runc);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_failure_after_setup_is_released_by_poststop() {
    failure_after_setup_is_released(Rt::Runc);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn crun_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Crun);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn crun_static_port_conflict_is_rolled_back_by_netshim_alone() {
    static_port_conflict_leaves_no_trace(Rt::Crun);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn crun_delete_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Crun);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn crun_failure_after_setup_is_released_by_shim_gc() {
    failure_after_setup_is_released(Rt::Crun);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containerd_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Containerd);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containerd_static_port_conflict_leaves_no_trace() {
    static_port_conflict_leaves_no_trace(Rt::Containerd);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containerd_task_rm_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Containerd);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containerd_failure_after_setup_is_released_by_poststop() {
    failure_after_setup_is_released(Rt::Containerd);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn podman_dynamic_host_ports_serve_pages_to_a_client() {
    dynamic_ports_serve_through_host_ports(Rt::Podman);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn podman_static_port_conflict_is_rolled_back_by_netshim_alone() {
    static_port_conflict_leaves_no_trace(Rt::Podman);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn podman_container_exit_runs_poststop_and_releases_everything() {
    delete_releases_everything(Rt::Podman);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn podman_failure_after_setup_is_released_by_shim_gc() {
    failure_after_setup_is_released(Rt::Podman);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn crun_awsvpc_task_serves_the_subnet_and_delete_hands_its_eni_back() {
    awsvpc_task_serves_the_subnet_and_hands_its_eni_back(Rt::Crun);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containerd_awsvpc_task_serves_the_subnet_and_task_rm_hands_its_eni_back() {
    awsvpc_task_serves_the_subnet_and_hands_its_eni_back(Rt::Containerd);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn podman_awsvpc_task_serves_the_subnet_and_its_exit_hands_the_eni_back() {
    awsvpc_task_serves_the_subnet_and_hands_its_eni_back(Rt::Podman);
}
