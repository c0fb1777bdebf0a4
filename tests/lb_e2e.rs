//! End to end behind real load balancers: busybox httpd replicas under runc (the shipped hook
//! files), `shim registrar` keeping a real HAProxy (Debian's 2.6, master-worker, admin socket,
//! the shipped `lb/haproxy.cfg`), nginx or a Prometheus file-sd file in step with the ledger, and
//! `shim drain` before each stop.
//!
//! ```text
//!   netns C (clients) 172.29.n.2 ---veth--- 172.29.n.1 netns H: HAProxy :8080 / nginx :8081,
//!                                                       the registrar, runc, the containers
//! ```
//!
//! HAProxy reaches each replica at its target, H's address and the replica's host port (DNAT to
//! the container), as a load balancer on a netshim host does. Everything lives in the test's own
//! namespaces and temp dir and is removed on drop.

#[macro_use]
mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::lab::*;
use common::lb::{Haproxy, Load, Proc, get_from, haproxy_config, nginx_config, nginx_test};

const FLAVOUR: Flavour = Flavour {
    tag: "nsl",
    dir: "netshim-lb",
    net: "172.29",
    patience: Duration::from_secs(3),
};
const HAPROXY_PORT: u16 = 8080;
const NGINX_PORT: u16 = 8081;

struct Lab {
    world: World,
    hooks: Value,
    containers: RefCell<Vec<String>>,
}

impl Deref for Lab {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Lab {
    fn new() -> Lab {
        let world = World::new(&FLAVOUR, "runc");
        let hooks = hooks_from_spec_fragment(RUNC_HOOKS, &world.state_dir(), &world.config());
        fs::create_dir_all(world.dir.join("runc")).expect("runc root");
        Lab {
            world,
            hooks,
            containers: RefCell::new(Vec::new()),
        }
    }

    fn runc(&self) -> Command {
        let mut c = self.in_host("runc");
        c.arg("--root").arg(self.dir.join("runc"));
        c
    }

    /// Starts replica `name` of `service` (httpd on port 80, dynamic host port); its id.
    fn start(&self, name: &str, service: &str) -> String {
        let id = self.name(name);
        let ann = json!({
            "netshim.network-mode": "bridge",
            "netshim.port-mappings": "[{\"containerPort\":80}]",
            "netshim.service": service,
        });
        let bundle = self.write_bundle(name, ann, &self.hooks, &HTTPD, true);
        self.containers.borrow_mut().push(id.clone());
        let (ok, out) = run_logged(
            self.runc().args(["run", "-d", "-b"]).arg(&bundle).arg(&id),
            &bundle.join("runc.out"),
        );
        assert!(ok, "runc run {id}: {out}");
        id
    }

    /// `runc delete -f` (the process is killed, poststop releases the network).
    fn stop(&self, id: &str) {
        let out = run(self.runc().args(["delete", "-f", id]));
        assert!(out.status.success(), "runc delete -f {id}: {}", text(&out));
    }

    /// `shim drain id --timeout t`.
    fn drain(&self, id: &str, timeout: f64) -> Output {
        run(self
            .shim()
            .args(["drain", id, "--timeout", &timeout.to_string()]))
    }

    /// The target (`H address:host port`) of container `id`.
    fn target(&self, id: &str) -> String {
        let p = self.ports();
        let e = p
            .iter()
            .find(|e| e["containerId"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {p:#?}"));
        format!("{}:{}", e["targetIP"].as_str().unwrap_or(""), host_port(e))
    }

    fn haproxy(&self, slots: u32) -> Haproxy {
        let bind = format!("0.0.0.0:{HAPROXY_PORT}");
        let cfg = haproxy_config(&self.dir.join("haproxy"), &bind, slots, &["web"]);
        Haproxy::start(&self.host_ns, &self.dir.join("haproxy"), &cfg)
    }

    /// `shim registrar` in H with `args`, its stderr in `<dir>/<log>`.
    fn registrar(&self, args: &[&str], log: &str) -> Proc {
        let mut cmd = self.shim();
        cmd.arg("registrar").args(args);
        Proc::spawn("registrar", &mut cmd, &self.dir.join(log))
    }

    fn registrar_for(&self, h: &Haproxy, log: &str) -> Proc {
        let sock = h.sock.display().to_string();
        let state = h.state_file.display().to_string();
        self.registrar(&["--haproxy", &sock, "--haproxy-state-file", &state], log)
    }

    /// The address clients in C use for a frontend in H.
    fn front(&self, port: u16) -> SocketAddr {
        format!("{}:{port}", self.host_addr)
            .parse()
            .expect("address")
    }

    /// Which container answered each of `n` sequential GETs through `port` (failures panic).
    fn served(&self, port: u16, n: usize) -> Vec<String> {
        let addr = self.front(port);
        (0..n)
            .map(|_| match get_from(&self.client_ns, addr) {
                Ok((200, body)) => self.who(&body),
                Ok((code, body)) => panic!("HTTP {code} through {addr}: {body}"),
                Err(e) => panic!("GET through {addr}: {e}"),
            })
            .collect()
    }

    /// The container whose page `body` is.
    fn who(&self, body: &str) -> String {
        body.split("hello from ")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .unwrap_or_else(|| panic!("not a replica's page: {body}"))
            .to_string()
    }

    fn status_files(&self) -> Vec<Value> {
        let d = self.state_dir().join("registrars");
        let mut v = Vec::new();
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.ends_with(".json") && !n.starts_with('.') {
                v.push(read_json(&e.path()));
            }
        }
        v
    }

    /// The ledger's revision (in `index.json`; `state.json` in the single-file layout).
    fn revision(&self) -> u64 {
        let d = self.state_dir();
        let f = ["index.json", "state.json"]
            .into_iter()
            .map(|n| d.join(n))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no index.json or state.json in {}", d.display()));
        read_json(&f)["revision"].as_u64().unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_state();
        }
        for id in self.containers.borrow().iter().rev() {
            let _ = run(self.runc().args(["delete", "-f", id]));
        }
    }
}

/// Waits until HAProxy's `web` backend has exactly these targets taking traffic (each in one
/// slot, ready), up to `limit`.
fn wait_ready(h: &Haproxy, want: &[String], limit: Duration) -> bool {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    wait_for(limit, || {
        let a = h.active("web");
        a.len() == want.len()
            && a.iter().all(|(_, _, m)| m == "ready")
            && a.iter().map(|(_, t, _)| t.clone()).collect::<BTreeSet<_>>() == want
    })
}

fn ready_lines(log: &str, id: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" ready (container ") && l.contains(id))
        .count()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn haproxy_serves_three_replicas_round_robin_then_a_new_one_and_drops_a_drained_one() {
    let lab = Lab::new();
    let h = lab.haproxy(5);
    let reg = lab.registrar_for(&h, "registrar.log");
    let ids: Vec<String> = (1..=3)
        .map(|i| lab.start(&format!("web{i}"), "web"))
        .collect();
    let targets: Vec<String> = ids.iter().map(|id| lab.target(id)).collect();
    assert!(
        wait_ready(&h, &targets, Duration::from_secs(10)),
        "HAProxy slots: {:?}, want {targets:?}",
        h.active("web")
    );
    // Round robin: every window of three consecutive answers has all three replicas.
    let seq = lab.served(HAPROXY_PORT, 30);
    for w in seq.windows(3) {
        let s: BTreeSet<&String> = w.iter().collect();
        assert_eq!(s.len(), 3, "not round robin: {seq:?}");
    }
    let counts: BTreeMap<&String, usize> = seq.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n).or_default() += 1;
        m
    });
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );

    // A new replica is reachable through HAProxy without any other step.
    let t0 = Instant::now();
    let new = lab.start("web4", "web");
    let addr = lab.front(HAPROXY_PORT);
    let reached = wait_for(
        Duration::from_secs(10),
        || matches!(get_from(&lab.client_ns, addr), Ok((200, b)) if b.contains(&page_of(&new))),
    );
    assert!(
        reached,
        "web4 never answered through HAProxy: {:?}",
        h.active("web")
    );
    eprintln!(
        "web4 reachable through HAProxy {:?} after runc run",
        t0.elapsed()
    );

    // A drained replica takes no new requests, and leaves its slot when stopped.
    let out = lab.drain(&ids[0], 10.0);
    assert!(out.status.success(), "drain: {}", text(&out));
    let slot = h.active("web");
    assert!(
        slot.iter()
            .any(|(_, t, m)| *t == targets[0] && m == "drain"),
        "{slot:?}"
    );
    let after = lab.served(HAPROXY_PORT, 20);
    assert!(
        !after.contains(&ids[0]),
        "a drained replica answered: {after:?}"
    );
    lab.stop(&ids[0]);
    let rest: Vec<String> = [&ids[1], &ids[2], &new]
        .iter()
        .map(|id| lab.target(id))
        .collect();
    assert!(
        wait_ready(&h, &rest, Duration::from_secs(5)),
        "{:?}",
        h.active("web")
    );
    // One log line per change: one `ready` per replica.
    let log = reg.log_text();
    for id in ids.iter().chain([&new]) {
        assert_eq!(ready_lines(&log, id), 1, "{id}:\n{log}");
    }
    assert!(
        log.contains(" drain (container ") && log.contains("maint (target gone)"),
        "{log}"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn rolling_replacement_under_load_with_drain_fails_no_request() {
    let lab = Lab::new();
    let mut h = lab.haproxy(6);
    let _reg = lab.registrar_for(&h, "registrar.log");
    let old: Vec<String> = (1..=3)
        .map(|i| lab.start(&format!("old{i}"), "web"))
        .collect();
    let targets: Vec<String> = old.iter().map(|id| lab.target(id)).collect();
    assert!(
        wait_ready(&h, &targets, Duration::from_secs(10)),
        "{:?}",
        h.active("web")
    );
    let worker = h.worker();
    let load = Load::start(&lab.client_ns, lab.front(HAPROXY_PORT), 6);
    std::thread::sleep(Duration::from_millis(300));
    let mut live: Vec<String> = old.clone();
    for (i, o) in old.iter().enumerate() {
        let n = lab.start(&format!("new{}", i + 1), "web");
        live.push(n.clone());
        let want: Vec<String> = live.iter().map(|id| lab.target(id)).collect();
        assert!(
            wait_ready(&h, &want, Duration::from_secs(10)),
            "{:?}",
            h.active("web")
        );
        let t = Instant::now();
        let out = lab.drain(o, 15.0);
        assert!(out.status.success(), "drain {o}: {}", text(&out));
        eprintln!(
            "{:?}: {}",
            t.elapsed(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        lab.stop(o);
        live.retain(|x| x != o);
        assert!(h.alive(), "the HAProxy master died");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, errors) = load.finish();
    eprintln!("rolling replacement: {ok} served, {failed} failed");
    assert_eq!(
        failed, 0,
        "failed requests during the replacement: {errors:?}"
    );
    assert!(ok > 100, "the load ran: {ok} requests");
    assert_eq!(
        h.worker(),
        worker,
        "the HAProxy worker changed (crash or restart)"
    );
    assert!(h.alive());
    let want: Vec<String> = live.iter().map(|id| lab.target(id)).collect();
    assert!(
        wait_ready(&h, &want, Duration::from_secs(5)),
        "{:?}",
        h.active("web")
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn registrar_killed_with_sigkill_restarts_and_converges_without_duplicates() {
    let lab = Lab::new();
    let h = lab.haproxy(5);
    let mut reg = lab.registrar_for(&h, "registrar1.log");
    let a = lab.start("web1", "web");
    let b = lab.start("web2", "web");
    assert!(wait_ready(
        &h,
        &[lab.target(&a), lab.target(&b)],
        Duration::from_secs(10)
    ));
    let dead_pid = reg.pid();
    reg.kill9();
    // While no registrar runs: one replica stops (no drain), one starts.
    let ta = lab.target(&a);
    lab.stop(&a);
    let c = lab.start("web3", "web");
    let want = vec![lab.target(&b), lab.target(&c)];
    assert!(
        h.active("web").iter().any(|(_, t, _)| *t == ta),
        "nothing should have changed HAProxy yet"
    );
    // The killed registrar's status file is stale: drain does not wait for it.
    let stale = lab.status_files();
    assert!(stale.iter().any(|s| s["pid"] == dead_pid), "{stale:?}");
    let reg2 = lab.registrar_for(&h, "registrar2.log");
    assert!(
        wait_ready(&h, &want, Duration::from_secs(10)),
        "{:?}",
        h.active("web")
    );
    let log = reg2.log_text();
    assert!(
        log.contains("removed the status file of registrar"),
        "{log}"
    );
    // web2 was already in its slot: the new registrar left it alone (no second slot).
    assert_eq!(ready_lines(&log, &b), 0, "{log}");
    assert_eq!(ready_lines(&log, &c), 1, "{log}");
    let files = lab.status_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["pid"], reg2.pid());
    // A third start over a converged HAProxy changes nothing.
    drop(reg2);
    let reg3 = lab.registrar_for(&h, "registrar3.log");
    assert!(wait_for(Duration::from_secs(5), || {
        lab.status_files()
            .iter()
            .any(|s| s["pid"] == reg3.pid() && s["revision"].as_u64() == Some(lab.revision()))
    }));
    let log3 = reg3.log_text();
    assert!(
        !log3.contains(" ready (") && !log3.contains(" maint"),
        "{log3}"
    );
    assert_eq!(h.active("web").len(), 2, "{:?}", h.active("web"));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn haproxy_reload_and_restart_are_detected_and_reapplied() {
    let lab = Lab::new();
    let mut h = lab.haproxy(5);
    let reg = lab.registrar_for(&h, "registrar.log");
    let a = lab.start("web1", "web");
    let b = lab.start("web2", "web");
    let want = vec![lab.target(&a), lab.target(&b)];
    assert!(wait_ready(&h, &want, Duration::from_secs(10)));
    // A reload under load: the new worker starts from the server-state file the registrar
    // keeps, so no request fails, and the registrar notices the new worker.
    let load = Load::start(&lab.client_ns, lab.front(HAPROXY_PORT), 4);
    std::thread::sleep(Duration::from_millis(300));
    let before = h.worker();
    h.reload();
    assert!(
        wait_for(Duration::from_secs(10), || h.try_cmd("show info").is_ok()
            && h.worker() != before),
        "no new worker after SIGUSR2"
    );
    assert!(
        wait_ready(&h, &want, Duration::from_secs(5)),
        "{:?}",
        h.active("web")
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed, errors) = load.finish();
    eprintln!("reload under load: {ok} served, {failed} failed");
    assert_eq!(failed, 0, "{errors:?}");
    assert!(
        wait_for(Duration::from_secs(3), || reg
            .log_text()
            .contains("new worker")),
        "{}",
        reg.log_text()
    );

    // A restart from a config with no state: all slots come back disabled, the registrar
    // fills them again.
    h.master.terminate();
    let _ = fs::remove_file(&h.state_file);
    let cfg = fs::read_to_string(&h.cfg).expect("cfg");
    let h2 = Haproxy::start(&lab.host_ns, &lab.dir.join("haproxy"), &cfg);
    assert!(
        wait_ready(&h2, &want, Duration::from_secs(5)),
        "after a restart: {:?}\n{}",
        h2.active("web"),
        reg.log_text()
    );
    let seq = lab.served(HAPROXY_PORT, 4);
    assert!(seq.contains(&a) && seq.contains(&b), "{seq:?}");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn drain_times_out_on_a_held_open_connection_and_is_idempotent() {
    let lab = Lab::new();
    let h = lab.haproxy(3);
    let mut reg = lab.registrar_for(&h, "registrar.log");
    let id = lab.start("web1", "web");
    let target = lab.target(&id);
    assert!(wait_ready(
        &h,
        std::slice::from_ref(&target),
        Duration::from_secs(10)
    ));
    let port = lab.ports()[0]["hostPort"].as_u64().expect("hostPort") as u16;
    // A client holding a connection to the replica open (half a request).
    let hold = |lab: &Lab| -> TcpStream {
        let addr: SocketAddr = format!("{}:{port}", lab.host_addr).parse().expect("addr");
        common::in_ns(&lab.client_ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            s.write_all(b"GET / HTTP/1.0\r\n").expect("write");
            s
        })
    };
    let held = hold(&lab);
    let t = Instant::now();
    let out = lab.drain(&id, 1.5);
    let took = t.elapsed();
    assert_eq!(
        out.status.code(),
        Some(3),
        "drain with a held connection: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("shim: drain ") && err.contains("still open"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Marked draining all the same: HAProxy sends it nothing new.
    assert!(
        h.active("web")
            .iter()
            .any(|(_, t, m)| *t == target && m == "drain")
    );
    drop(held);
    let rev = lab.revision();
    let out = lab.drain(&id, 5.0);
    assert!(
        out.status.success(),
        "second drain once idle: {}",
        text(&out)
    );
    assert_eq!(lab.revision(), rev, "a second drain rewrote the ledger");

    // SIGTERM: the registrar exits 0 and removes its status file.
    let st = reg.terminate().expect("registrar exited on SIGTERM");
    assert!(st.success(), "registrar exit status on SIGTERM: {st}");
    assert!(lab.status_files().is_empty(), "{:?}", lab.status_files());
    // With no registrar, drain still waits for idle.
    let held = hold(&lab);
    let out = lab.drain(&id, 1.0);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    drop(held);
    let out = lab.drain(&id, 5.0);
    assert!(out.status.success(), "{}", text(&out));
    // Unknown containers are an error, not a hang.
    let out = lab.drain("no-such-container", 1.0);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// Counts `reloaded` lines in a registrar log.
fn reloads(log: &str) -> usize {
    log.lines().filter(|l| l.ends_with(": reloaded")).count()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn nginx_sink_follows_the_ledger_with_at_most_one_reload_a_second() {
    let lab = Lab::new();
    let d = lab.dir.join("nginx");
    fs::create_dir_all(&d).expect("nginx dir");
    let ups = d.join("netshim-upstreams.conf");
    let server = format!(
        "server {{ listen {}:{NGINX_PORT}; location / {{ proxy_pass http://web; }} }}",
        lab.host_addr
    );
    let cfg = d.join("nginx.conf");
    fs::write(&cfg, nginx_config(&d, &ups, &server)).expect("write nginx.conf");
    let c = cfg.display().to_string();
    let reload = format!("/usr/sbin/nginx -e stderr -c {c} -s reload");
    let test = format!("/usr/sbin/nginx -e stderr -q -t -c {c}");
    let pid = d.join("nginx.pid").display().to_string();
    let upsf = ups.display().to_string();
    let reg = lab.registrar(
        &[
            "--nginx",
            &upsf,
            "--nginx-reload",
            &reload,
            "--nginx-test",
            &test,
            "--nginx-pid",
            &pid,
            "--nginx-upstream",
            "web",
        ],
        "registrar.log",
    );
    // The include exists (with its placeholder) before nginx starts, so nginx can start.
    assert!(
        wait_for(Duration::from_secs(5), || ups.exists()),
        "{}",
        reg.log_text()
    );
    let mut ncmd = lab.in_host("/usr/sbin/nginx");
    ncmd.args(["-e", "stderr", "-c", &c]);
    let _nginx = Proc::spawn("nginx", &mut ncmd, &d.join("nginx.out"));
    assert!(wait_for(Duration::from_secs(5), || d
        .join("nginx.pid")
        .exists()));

    let t0 = Instant::now();
    let ids: Vec<String> = (1..=3)
        .map(|i| lab.start(&format!("web{i}"), "web"))
        .collect();
    let all_in = |text: &str| {
        ids.iter()
            .all(|id| text.contains(&format!("server {};", lab.target(id))))
    };
    assert!(
        wait_for(Duration::from_secs(10), || all_in(
            &fs::read_to_string(&ups).unwrap_or_default()
        )),
        "{}",
        reg.log_text()
    );
    let addr = lab.front(NGINX_PORT);
    let seen = |lab: &Lab| -> BTreeSet<String> {
        (0..12)
            .filter_map(|_| match get_from(&lab.client_ns, addr) {
                Ok((200, b)) => Some(lab.who(&b)),
                _ => None,
            })
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(5), || seen(&lab).len() == 3),
        "nginx does not serve all three: {:?}\n{}",
        seen(&lab),
        reg.log_text()
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let n = reloads(&reg.log_text());
    assert!(
        n as f64 <= elapsed.ceil() + 1.0,
        "{n} reloads in {elapsed:.2} s:\n{}",
        reg.log_text()
    );
    // Drain: the server is `down` in the include and nginx stops sending to it.
    let out = lab.drain(&ids[0], 10.0);
    assert!(out.status.success(), "{}", text(&out));
    let text_now = fs::read_to_string(&ups).expect("include");
    assert!(
        text_now.contains(&format!("server {} down;", lab.target(&ids[0]))),
        "{text_now}"
    );
    let s = seen(&lab);
    assert!(!s.contains(&ids[0]) && s.len() == 2, "{s:?}");
    let gone = lab.target(&ids[0]);
    let two = |log: &str| log.matches("written (1 upstreams, 2 servers)").count();
    let written = two(&reg.log_text());
    lab.stop(&ids[0]);
    // Gone from the include, and that include checked (the registrar writes the file before it
    // checks it).
    assert!(
        wait_for(Duration::from_secs(5), || {
            let t = fs::read_to_string(&ups).unwrap_or_default();
            !t.contains(&gone)
                && t.matches("    server ").count() == 2
                && two(&reg.log_text()) > written
        }),
        "{}",
        fs::read_to_string(&ups).unwrap_or_default()
    );
    if let Err(e) = nginx_test(&lab.host_ns, &cfg) {
        panic!("the include fails nginx -t: {e}");
    }
    // A check that fails keeps the old include and reloads nothing.
    let before = fs::read_to_string(&ups).expect("include");
    let r0 = reloads(&reg.log_text());
    fs::write(
        &cfg,
        fs::read_to_string(&cfg)
            .expect("cfg")
            .replace("events {", "bogus_directive on;\nevents {"),
    )
    .expect("break cfg");
    lab.stop(&ids[1]);
    assert!(
        wait_for(Duration::from_secs(5), || reg
            .log_text()
            .contains("fails the check")),
        "{}",
        reg.log_text()
    );
    assert_eq!(fs::read_to_string(&ups).expect("include"), before);
    assert_eq!(reloads(&reg.log_text()), r0);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn file_sd_sink_follows_the_ledger_and_prometheus_lists_it() {
    let lab = Lab::new();
    let sd = lab.dir.join("netshim.json");
    let sdp = sd.display().to_string();
    let reg = lab.registrar(&["--file-sd", &sdp], "registrar.log");
    assert!(wait_for(Duration::from_secs(5), || fs::read_to_string(&sd)
        .is_ok_and(|t| t.trim() == "[]")));
    let prom_dir = lab.dir.join("prometheus");
    fs::create_dir_all(&prom_dir).expect("dir");
    let pcfg = prom_dir.join("prometheus.yml");
    fs::write(
        &pcfg,
        format!("global:\n  scrape_interval: 1h\nscrape_configs:\n  - job_name: netshim\n    file_sd_configs:\n      - files: ['{sdp}']\n        refresh_interval: 1s\n"),
    )
    .expect("write");
    let mut pc = lab.in_host("/usr/bin/prometheus");
    pc.arg(format!("--config.file={}", pcfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("tsdb").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090");
    let _prom = Proc::spawn("prometheus", &mut pc, &prom_dir.join("log"));
    let ids: Vec<String> = (1..=2)
        .map(|i| lab.start(&format!("m{i}"), "metrics"))
        .collect();
    let want: BTreeSet<String> = ids.iter().map(|id| lab.target(id)).collect();
    let listed = |lab: &Lab| -> BTreeSet<String> {
        let body = common::in_ns(&lab.host_ns, || {
            let mut s = TcpStream::connect("127.0.0.1:9090").ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            s.write_all(b"GET /api/v1/targets HTTP/1.0\r\n\r\n").ok()?;
            let mut b = String::new();
            std::io::Read::read_to_string(&mut s, &mut b).ok()?;
            b.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
        });
        let v: Value = body
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null);
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                t["discoveredLabels"]["__address__"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(60), || listed(&lab) == want),
        "Prometheus lists {:?}, want {want:?}\n{}",
        listed(&lab),
        reg.log_text()
    );
    for id in &ids {
        lab.stop(id);
    }
    assert!(wait_for(Duration::from_secs(5), || fs::read_to_string(&sd)
        .is_ok_and(|t| t.trim() == "[]")));
    assert!(
        wait_for(Duration::from_secs(30), || listed(&lab).is_empty()),
        "{:?}",
        listed(&lab)
    );
    assert!(
        Path::new(&sd).exists(),
        "the file-sd file must stay (as [])"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn too_few_slots_are_logged_and_the_excess_waits_for_one() {
    let lab = Lab::new();
    let h = lab.haproxy(2);
    let reg = lab.registrar_for(&h, "registrar.log");
    let ids: Vec<String> = (1..=3)
        .map(|i| lab.start(&format!("web{i}"), "web"))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || h.active("web").len() == 2
            && reg.log_text().contains("no free slot")),
        "{:?}\n{}",
        h.active("web"),
        reg.log_text()
    );
    let log = reg.log_text();
    assert!(
        log.contains("backend web has no free slot: 1 target(s) wait for one"),
        "{log}"
    );
    // The one left out takes the slot a drained and stopped replica frees.
    let active: Vec<String> = h.active("web").into_iter().map(|(_, t, _)| t).collect();
    let waiting = ids
        .iter()
        .find(|id| !active.contains(&lab.target(id)))
        .expect("a waiting replica")
        .clone();
    let leaving = ids
        .iter()
        .find(|id| **id != waiting)
        .expect("a served replica")
        .clone();
    let out = lab.drain(&leaving, 10.0);
    assert!(out.status.success(), "{}", text(&out));
    lab.stop(&leaving);
    let want: Vec<String> = ids
        .iter()
        .filter(|id| **id != leaving)
        .map(|id| lab.target(id))
        .collect();
    assert!(
        wait_ready(&h, &want, Duration::from_secs(5)),
        "{:?}\n{}",
        h.active("web"),
        reg.log_text()
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn drain_in_host_mode_waits_for_the_host_port() {
    let lab = Lab::new();
    let id = lab.name("h1");
    let ann = json!({
        "netshim.network-mode": "host",
        "netshim.port-mappings": "[{\"containerPort\":18182}]",
        "netshim.service": "web",
    });
    let httpd = ["/bin/busybox", "httpd", "-f", "-p", "18182", "-h", "/www"];
    let bundle = lab.write_bundle("h1", ann, &lab.hooks, &httpd, false);
    lab.containers.borrow_mut().push(id.clone());
    let (ok, out) = run_logged(
        lab.runc().args(["run", "-d", "-b"]).arg(&bundle).arg(&id),
        &bundle.join("runc.out"),
    );
    assert!(ok, "runc run {id}: {out}");
    lab.assert_serves(18182, &id);
    let addr: SocketAddr = format!("{}:18182", lab.host_addr).parse().expect("addr");
    let held = common::in_ns(&lab.client_ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n").expect("write");
        s
    });
    let out = lab.drain(&id, 1.0);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a held connection to the host port: {}",
        text(&out)
    );
    drop(held);
    let out = lab.drain(&id, 5.0);
    assert!(out.status.success(), "{}", text(&out));
    let p = lab.ports();
    assert_eq!(p[0]["state"], "draining", "{p:?}");
}
