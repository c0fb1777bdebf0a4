//! Test rig for integration tests that need root: a private "host" network namespace where the
//! shim runs (its bridge and firewall table live there, never on the real host), container
//! namespaces with a process inside, and a "client machine" namespace routed to the host.
//! Everything is named with a unique prefix and removed on drop, also when a test fails.
//!
//! Tests that need root carry `#[cfg_attr(not(root), ignore = "needs root: ...")]` (build.rs sets
//! `cfg(root)` when root builds them), so an unprivileged `cargo test` lists them as ignored.
//! Test files use this module as `#[macro_use] mod common;`. Submodules: `vpc` (the
//! awsvpc rig: a VPC namespace, peers, veth ENIs, fake metadata), `etcd` (a real etcd member) and `lab` (the end-to-end
//! tests' world under real runtimes: shipped hook files, busybox bundles, page fetches).
#![allow(dead_code)]

/// Fails a test that runs without root (the `cfg_attr` ignore normally keeps it from running).
#[allow(unused_macros)]
macro_rules! root_only {
    () => {
        assert!($crate::common::is_root(), "this test needs root");
    };
}

pub mod etcd;
pub mod lab;
pub mod lb;
pub mod vpc;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub const SHIM: &str = env!("CARGO_BIN_EXE_shim");
/// The host's address on the link to the client namespace.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// A config with a known dynamic host-port range (40000-40999).
pub const CFG: &str = "[ports]\ndynamic_range = \"40000-40999\"\n";
/// How long a connection that must fail is tried.
pub const SHORT: Duration = Duration::from_millis(1500);
/// How long a connection that must succeed is retried.
pub const PATIENT: Duration = Duration::from_secs(4);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether this process may create namespaces (root). Root-only tests return early otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn must_output(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `ip args...`, which must succeed; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = must_output(Command::new("/usr/sbin/ip").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives netns `ns` an `eth0` of its own (a veth pair inside it), the name every mode gives
/// the container's interface.
pub fn occupy_eth0(ns: &str) {
    ip(&[
        "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
}

/// Runs `f` on a thread inside netns `ns` (sockets it creates stay in that namespace).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only, with a valid netns fd.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

/// `nft list ruleset` in netns `ns` once no element is retiring any more: a poststop retires map
/// elements with a 1 ms timeout (Linux 6.12+), and they are listed, with `expires`, until the
/// next clock tick. Waits at most 1 s, then answers what it lists (so an element that never
/// goes still fails the caller's check).
pub fn nft_ruleset_settled(ns: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let out = command_in(ns, "/usr/sbin/nft")
            .args(["list", "ruleset"])
            .output()
            .expect("nft");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !text.contains(" expires ") || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A command that starts inside netns `ns`.
pub fn command_in(ns: &str, program: &str) -> Command {
    let f = File::open(format!("/run/netns/{ns}")).expect("open netns");
    let mut c = Command::new(program);
    // SAFETY: only setns between fork and exec; f stays alive as it is moved into the closure.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// A process sleeping in netns `ns` (a container's process).
fn sleep_in(ns: &str) -> Child {
    command_in(ns, "/bin/sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep")
}

/// A container stand-in: a netns with a sleeping process whose pid the hook gets.
pub struct Container {
    pub id: String,
    pub ns: String,
    pub child: Option<Child>,
    /// False for host-mode containers, which live in the rig's host namespace.
    pub owns_ns: bool,
}

impl Container {
    pub fn pid(&self) -> i64 {
        self.child.as_ref().map(|c| i64::from(c.id())).unwrap_or(0)
    }
    /// Kills the process and deletes the netns (as a runtime does before poststop).
    pub fn destroy(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.owns_ns {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", &self.ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A "host" network namespace H (lo up) linked by a veth pair to a "client machine" namespace C,
/// and a temp dir for netshim's state dir and config: what every root test builds first. Names
/// are `prefix` plus one letter; dropping it deletes both namespaces and the temp dir.
pub struct HostPair {
    pub prefix: String,
    /// H, where netshim runs.
    pub host: String,
    /// C, the client machine.
    pub client: String,
    /// H's and C's addresses on their /30.
    pub host_ip: Ipv4Addr,
    pub client_ip: Ipv4Addr,
    pub dir: PathBuf,
}

impl HostPair {
    /// H–C on `host_ip`/`client_ip` (a /30); C routes via H; with `host_default`, H routes via
    /// C too (like a real host, whose default-route source is its load-balancer target).
    pub fn new(
        prefix: &str,
        client_letter: char,
        host_ip: Ipv4Addr,
        client_ip: Ipv4Addr,
        host_default: bool,
    ) -> HostPair {
        assert!(prefix.len() < 15, "prefix {prefix} too long for link names");
        let p = HostPair {
            prefix: prefix.to_string(),
            host: format!("{prefix}h"),
            client: format!("{prefix}{client_letter}"),
            host_ip,
            client_ip,
            dir: std::env::temp_dir().join(format!("{prefix}.d")),
        };
        // From here on, Drop cleans up whatever was made.
        let _ = fs::remove_dir_all(&p.dir);
        fs::create_dir_all(&p.dir).expect("temp dir");
        let (h, c) = (p.host.as_str(), p.client.as_str());
        for ns in [h, c] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (hv, cv) = (format!("{prefix}a"), format!("{prefix}b"));
        ip(&[
            "-n", h, "link", "add", &hv, "type", "veth", "peer", "name", &cv, "netns", c,
        ]);
        ip(&["-n", h, "addr", "add", &format!("{host_ip}/30"), "dev", &hv]);
        ip(&["-n", h, "link", "set", &hv, "up"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{client_ip}/30"),
            "dev",
            &cv,
        ]);
        ip(&["-n", c, "link", "set", &cv, "up"]);
        ip(&[
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ]);
        if host_default {
            ip(&[
                "-n",
                h,
                "route",
                "add",
                "default",
                "via",
                &client_ip.to_string(),
            ]);
        }
        p
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    /// C's end of the H–C link.
    pub fn client_link(&self) -> String {
        format!("{}b", self.prefix)
    }
    /// Replaces netshim's config.
    pub fn set_config(&self, text: &str) {
        fs::write(self.config_path(), text).expect("write config");
    }
    /// The ids of netshim's committed records (empty if there are none).
    /// Links in H whose name starts with `prefix`. One that no record knows and
    /// whose peer is in another netns belongs to a container whose netns the kernel is
    /// destroying (poststop leaves such a veth to the kernel): it is waited for, up to 5 s, and
    /// listed if it is still there then.
    pub fn links(&self, prefix: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let links = self.prefixed_links(prefix);
            let recorded: Vec<String> = ledger_ids(&self.state_dir())
                .iter()
                .filter_map(|id| ledger_record(&self.state_dir(), id))
                .filter_map(|r| r["veth"].as_str().map(str::to_string))
                .collect();
            let going = links
                .iter()
                .any(|(n, peer_elsewhere)| *peer_elsewhere && !recorded.contains(n));
            if !going || Instant::now() > deadline {
                return links.into_iter().map(|(n, _)| n).collect();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether link `name` in H is gone, or goes within `patience`.
    pub fn link_gone_within(&self, name: &str, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            if !self.prefixed_links(name).iter().any(|(n, _)| n == name) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Links in H named `prefix…`, each with whether its peer is in another netns.
    fn prefixed_links(&self, prefix: &str) -> Vec<(String, bool)> {
        let out = must_output(
            Command::new("/usr/sbin/ip").args(["-n", &self.host, "-j", "link", "show"]),
        );
        let links: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("ip -j link show prints JSON");
        links
            .iter()
            .filter_map(|l| {
                let name = l["ifname"].as_str()?;
                let elsewhere = l.get("link_netnsid").is_some();
                name.starts_with(prefix)
                    .then(|| (name.to_string(), elsewhere))
            })
            .collect()
    }

    pub fn recorded(&self) -> Vec<String> {
        ledger_ids(&self.state_dir())
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        unmount_under(&self.dir);
        for ns in [&self.client, &self.host] {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A [`HostPair`] with container stand-ins, running the shim directly (no runtime).
pub struct Rig {
    pub pair: HostPair,
    pub containers: Vec<Container>,
    pub extra_ns: Vec<String>,
}

impl std::ops::Deref for Rig {
    type Target = HostPair;
    fn deref(&self) -> &HostPair {
        &self.pair
    }
}

impl Rig {
    /// H linked to C, a private state dir and `config`.
    pub fn new(config: &str) -> Rig {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("nsi{}x{n}", std::process::id() % 100_000);
        let rig = Rig {
            pair: HostPair::new(&prefix, 'k', HOST_IP, CLIENT_IP, false),
            containers: vec![],
            extra_ns: vec![],
        };
        rig.set_config(config);
        rig
    }

    /// A new container namespace with a process in it.
    pub fn container(&mut self) -> usize {
        let i = self.containers.len();
        let ns = format!("{}c{i}", self.prefix);
        ip(&["netns", "add", &ns]);
        let child = sleep_in(&ns);
        self.containers.push(Container {
            id: format!("{}-ctr{i}", self.prefix),
            ns,
            child: Some(child),
            owns_ns: true,
        });
        i
    }

    /// A host-mode container: a process in the rig's host namespace.
    pub fn host_container(&mut self) -> usize {
        let i = self.containers.len();
        let child = sleep_in(&self.host);
        self.containers.push(Container {
            id: format!("{}-ctr{i}", self.prefix),
            ns: self.host.clone(),
            child: Some(child),
            owns_ns: false,
        });
        i
    }

    /// createRuntime for container `i` in `mode` with `mappings`.
    pub fn setup_mode(&self, i: usize, mode: &str, mappings: &str) -> Output {
        self.shim(
            &["hook", "createRuntime"],
            &self.oci_state(
                i,
                &[
                    ("netshim.network-mode", mode),
                    ("netshim.port-mappings", mappings),
                ],
            ),
        )
    }

    /// Sets the host namespace's `ip_local_reserved_ports` (what an admin reserved).
    pub fn shim_reserved(&self, list: &str) {
        let ok = command_in(&self.host, "/bin/sh")
            .args([
                "-c",
                &format!("echo {list} > /proc/sys/net/ipv4/ip_local_reserved_ports"),
            ])
            .status()
            .expect("sh");
        assert!(ok.success(), "set reserved ports");
    }

    /// Runs `shim` inside the host namespace with the rig's state dir and config.
    pub fn shim(&self, args: &[&str], stdin: &str) -> Output {
        self.shim_env(args, stdin, &[])
    }

    /// [`Rig::shim`] with more environment variables (e.g. `NETSHIM_FAULT`).
    pub fn shim_env(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        let mut c = command_in(&self.host, SHIM);
        c.args(args)
            .env_clear()
            .env("NETSHIM_STATE_DIR", self.state_dir())
            .env("NETSHIM_CONFIG", self.config_path())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn shim");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait shim")
    }

    /// The OCI state a runtime would send for container `i` with these annotations.
    pub fn oci_state(&self, i: usize, annotations: &[(&str, &str)]) -> String {
        let c = &self.containers[i];
        let ann: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        serde_json::json!({"ociVersion": "1.0.2", "id": c.id, "status": "creating", "pid": c.pid(), "bundle": "/nonexistent", "annotations": ann}).to_string()
    }

    /// createRuntime for container `i` in bridge mode with `mappings`.
    pub fn setup(&self, i: usize, mappings: &str) -> Output {
        self.shim(
            &["hook", "createRuntime"],
            &self.oci_state(
                i,
                &[
                    ("netshim.network-mode", "bridge"),
                    ("netshim.port-mappings", mappings),
                ],
            ),
        )
    }

    pub fn poststop(&self, i: usize) -> Output {
        let id = &self.containers[i].id;
        self.shim(
            &["hook", "poststop"],
            &format!(
                r#"{{"ociVersion":"1.0.2","id":"{id}","status":"stopped","bundle":"/nonexistent"}}"#
            ),
        )
    }

    /// `ports list --json` as values.
    pub fn ports(&self) -> Vec<serde_json::Value> {
        let out = self.shim(&["ports", "list", "--json"], "");
        assert!(
            out.status.success(),
            "ports list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ports list json")
    }

    /// Host port of container `i`'s mapping of `container_port`/`proto`.
    pub fn host_port(&self, i: usize, container_port: u16, proto: &str) -> u16 {
        let id = &self.containers[i].id;
        self.ports()
            .iter()
            .find(|p| {
                p["containerId"] == id.as_str()
                    && p["containerPort"] == container_port
                    && p["protocol"] == proto
            })
            .and_then(|p| p["hostPort"].as_u64())
            .unwrap_or_else(|| panic!("no {container_port}/{proto} mapping for {id}"))
            as u16
    }

    /// Links named like the shim's veths in the host namespace (see [`HostPair::links`]).
    pub fn veths(&self) -> Vec<String> {
        self.pair.links("nsh")
    }

    /// Elements of the shim's `ports` map in the host namespace ("" if the table is absent).
    pub fn nft_elements(&self) -> String {
        nft_ruleset_settled(&self.host);
        let out = command_in(&self.host, "/usr/sbin/nft")
            .args(["list", "map", "ip", "netshim", "ports"])
            .output()
            .expect("nft");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .filter(|l| l.contains(':') && !l.contains("type"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many elements each non-empty map and set of the shim's table holds, by name (empty
    /// if the table is absent).
    pub fn nft_element_counts(&self) -> std::collections::BTreeMap<String, usize> {
        nft_ruleset_settled(&self.host);
        let out = command_in(&self.host, "/usr/sbin/nft")
            .args(["-j", "list", "table", "ip", "netshim"])
            .output()
            .expect("nft");
        let mut found = std::collections::BTreeMap::new();
        if !out.status.success() {
            return found;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
        for o in v["nftables"].as_array().into_iter().flatten() {
            for kind in ["set", "map"] {
                if let Some(s) = o.get(kind) {
                    let n = s["elem"].as_array().map_or(0, Vec::len);
                    if n > 0 {
                        found.insert(s["name"].as_str().unwrap_or("?").to_string(), n);
                    }
                }
            }
        }
        found
    }

    /// `nft ARGS` in the host netns, once no element is retiring ([`nft_ruleset_settled`]).
    pub fn nft(&self, args: &[&str]) -> Output {
        nft_ruleset_settled(&self.host);
        must_output(command_in(&self.host, "/usr/sbin/nft").args(args))
    }
}

impl Drop for Rig {
    /// The containers and extra namespaces; the pair then goes by its own Drop.
    fn drop(&mut self) {
        for c in &mut self.containers {
            c.destroy();
        }
        for ns in &self.extra_ns {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A TCP server in netns `ns` answering every connection with `reply` (runs until the ns goes).
pub fn tcp_server(ns: &str, port: u16, reply: &str) {
    let reply = reply.to_string();
    let l = in_ns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind tcp")
    });
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(reply.as_bytes());
        }
    });
}

/// A TCP server in netns `ns` that answers one connection with `reply` (or gives up after 10 s)
/// and closes, so nothing of the test holds the namespace afterwards. Returns once listening;
/// join it to know it served.
pub fn tcp_serve_once(ns: &str, port: u16, reply: &str) -> thread::JoinHandle<bool> {
    let reply = reply.to_string();
    let l = in_ns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind tcp")
    });
    thread::spawn(move || {
        l.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    return s.write_all(reply.as_bytes()).is_ok();
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        false
    })
}

/// A UDP server in netns `ns` answering each datagram with `reply`.
pub fn udp_server(ns: &str, port: u16, reply: &str) {
    let reply = reply.to_string();
    let s = in_ns(ns, move || {
        UdpSocket::bind(("0.0.0.0", port)).expect("bind udp")
    });
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(reply.as_bytes(), from);
        }
    });
}

/// Connects from netns `ns` to `addr:port` and reads the greeting; retries until `patience`.
pub fn tcp_get(ns: &str, addr: Ipv4Addr, port: u16, patience: Duration) -> Result<String, String> {
    in_ns(ns, move || {
        let deadline = Instant::now() + patience;
        let target = SocketAddr::from((addr, port));
        loop {
            let r = TcpStream::connect_timeout(&target, Duration::from_millis(700)).and_then(
                |mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                },
            );
            match r {
                Ok(s) if !s.is_empty() => return Ok(s),
                Ok(_) if Instant::now() >= deadline => return Err("empty reply".into()),
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
    })
}

/// A TCP server in netns `ns` bound to `addr` (either family; `[::]` takes IPv4 too) answering
/// every connection with `reply`. Binding right after setup proves the address is usable (an
/// IPv6 address still in duplicate address detection cannot be bound).
pub fn tcp_server_on(ns: &str, addr: SocketAddr, reply: &str) {
    let reply = reply.to_string();
    let l = in_ns(ns, move || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    });
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(reply.as_bytes());
        }
    });
}

/// One connection from the calling thread's netns to `dst:port`, from source address `src`
/// when given, reading the greeting; the connect gives up after 700 ms.
fn tcp_once(src: Option<IpAddr>, dst: SocketAddr) -> std::io::Result<String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    use nix::sys::time::TimeVal;
    let fam = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // On Linux the send timeout bounds connect() too.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(0, 700_000))?;
    if let Some(s) = src {
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(s, 0)),
        )?;
    }
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Connects from netns `ns` to `dst:port` (either family), from `src` when given, and reads the
/// greeting; retries until `patience`.
pub fn tcp_get_ip(
    ns: &str,
    src: Option<IpAddr>,
    dst: IpAddr,
    port: u16,
    patience: Duration,
) -> Result<String, String> {
    in_ns(ns, move || {
        let deadline = Instant::now() + patience;
        loop {
            match tcp_once(src, SocketAddr::new(dst, port)) {
                Ok(s) if !s.is_empty() => return Ok(s),
                Ok(_) if Instant::now() >= deadline => return Err("empty reply".into()),
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
    })
}

/// Sends one datagram from `sock` and waits for an answer.
pub fn udp_ask(sock: &UdpSocket, addr: Ipv4Addr, port: u16) -> Result<String, String> {
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .map_err(|e| e.to_string())?;
    for _ in 0..3 {
        sock.send_to(b"ping", (addr, port))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    Err("no UDP answer".into())
}

/// A UDP socket in netns `ns`, bound to a fixed local port (so repeated asks share a 5-tuple).
pub fn udp_client(ns: &str, port: u16) -> UdpSocket {
    in_ns(ns, move || {
        UdpSocket::bind(("0.0.0.0", port)).expect("bind udp client")
    })
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn must_succeed(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}", stderr(o));
}

/// A failed hook: non-zero exit, exactly one stderr line `shim: ...` containing every `needle`.
pub fn must_fail_with(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success");
    assert_eq!(e.trim_end().lines().count(), 1, "one line expected: {e:?}");
    assert!(e.starts_with("shim: "), "{e:?}");
    for n in needles {
        assert!(e.contains(n), "{e:?} lacks {n:?}");
    }
}

/// `net.ipv4.ip_local_reserved_ports` of netns `ns`.
pub fn reserved_ports(ns: &str) -> String {
    let out = command_in(ns, "/bin/cat")
        .arg("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .output()
        .expect("cat");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every readable sysctl under `/proc/sys/net/ipv4` and `/proc/sys/net/ipv6/conf` of netns `ns`,
/// by path: equal before and after means nothing changed them.
pub fn net_sysctls(ns: &str) -> std::collections::BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if let Ok(v) = fs::read_to_string(&p) {
                out.insert(p.display().to_string(), v.trim().to_string());
            }
        }
    }
    in_ns(ns, || {
        let mut out = std::collections::BTreeMap::new();
        walk(Path::new("/proc/sys/net/ipv4"), &mut out);
        walk(Path::new("/proc/sys/net/ipv6/conf"), &mut out);
        out
    })
}

/// The ids of the committed records in a state dir, sorted.
pub fn ledger_ids(state_dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(state_dir.join("containers"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_suffix(".json")
                        .filter(|_| !n.starts_with('.'))
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A committed record, as JSON.
pub fn ledger_record(state_dir: &Path, id: &str) -> Option<serde_json::Value> {
    let b = fs::read(state_dir.join("containers").join(format!("{id}.json"))).ok()?;
    Some(serde_json::from_slice(&b).expect("record json"))
}

/// The ledger's index (cursors, revision), `null` if absent.
pub fn ledger_index(state_dir: &Path) -> serde_json::Value {
    fs::read(state_dir.join("index.json"))
        .map(|b| serde_json::from_slice(&b).expect("index json"))
        .unwrap_or(serde_json::Value::Null)
}

/// Every file of a state dir but the lock (whose content names its last holder), with its
/// Claim files that still name a holder, with what they hold (a released port keeps only its
/// release time, a `~` line).
pub fn held_claims(state_dir: &Path) -> Vec<String> {
    ledger_fingerprint(state_dir)
        .into_iter()
        .filter(|(p, b)| {
            p.starts_with("claims/")
                && String::from_utf8_lossy(b)
                    .lines()
                    .any(|l| !l.starts_with('~'))
        })
        .map(|(p, b)| format!("{p}: {}", String::from_utf8_lossy(&b).trim()))
        .collect()
}

/// bytes: equal before and after means nothing in the ledger changed.
pub fn ledger_fingerprint(state_dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            if p.is_dir() {
                walk(base, &p, out);
            } else if rel != "lock" {
                out.push((rel, fs::read(&p).unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    walk(state_dir, state_dir, &mut out);
    out.sort();
    out
}

/// Mount points at or under `dir` (in this process's mount namespace, which the shim shares).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    mounts_under_in(Path::new("/proc/self/mountinfo"), dir)
}

/// Mount points at or under `dir` listed in `mountinfo` (`/proc/<pid>/mountinfo`: that process's
/// mount namespace).
pub fn mounts_under_in(mountinfo: &Path, dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    fs::read_to_string(mountinfo)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(String::from)
        .collect()
}

/// Detaches every mount at or under `dir`, deepest first (netns pins netshim still holds, a
/// runtime's leftovers), so the directory can be removed.
pub fn unmount_under(dir: &Path) {
    let mut points = mounts_under(dir);
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH only detaches this mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
