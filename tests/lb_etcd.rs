//! The cluster view in etcd, end to end: Debian's etcd 3.4 (one member on the loopback of
//! host A's namespace, free ports, its data in the test's temp dir), busybox httpd replicas
//! under runc with the shipped hooks, `shim registrar --etcd` publishing each host's ledger, and
//! `shim registrar --from-etcd` keeping a real HAProxy in step with the whole cluster.
//!
//! ```text
//!   netns C_A ---- netns H_A: etcd 127.0.0.1:<free>, HAProxy :8080, the registrars, runc (host a)
//!                        | 172.24.n.1/30
//!                        | 172.24.n.2/30
//!   netns C_B ---- netns H_B: runc, the containers of host b (target 172.24.n.2:<host port>)
//! ```
//!
//! Host b's registrar runs in H_A (it only needs etcd and b's state dir); its targets name
//! H_B's address on the A–B link, which HAProxy in H_A reaches. Everything lives in the test's
//! own namespaces and temp dirs and is removed on drop.

#[macro_use]
mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::ops::Deref;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::etcd::Etcd;
use common::lab::*;
use common::lb::{Haproxy, Proc, get_from, haproxy_config};

const FLAVOUR: Flavour = Flavour {
    tag: "ncl",
    net: "172.26",
    patience: Duration::from_secs(3),
};
const HAPROXY_PORT: u16 = 8080;
/// The lease TTL of the tests' registrars.
const TTL: u64 = 2;
const TARGETS: &str = "/netshim/v1/targets/";
const HOSTS: &str = "/netshim/v1/hosts/";

/// One simulated netshim host: a world, runc with the shipped hooks, its containers.
struct Host {
    world: World,
    id: String,
    hooks: Value,
    containers: RefCell<Vec<String>>,
}

impl Deref for Host {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Host {
    /// A host named `id`, its lease TTL [`TTL`].
    fn new(id: &str) -> Host {
        let world = World::new(&FLAVOUR, "runc");
        let hooks = hooks_from_spec_fragment(RUNC_HOOKS, &world.state_dir(), &world.config_path());
        fs::create_dir_all(world.dir.join("runc")).expect("runc root");
        let h = Host {
            world,
            id: id.to_string(),
            hooks,
            containers: RefCell::new(Vec::new()),
        };
        h.configure(TTL, "");
        h
    }

    /// The config: the test's dynamic range and `ports` (more `[ports]` keys), `[lb]` with
    /// lease TTL `ttl` (a registrar reads it when it starts).
    fn configure(&self, ttl: u64, ports: &str) {
        let range = format!("{}-{}", DYNAMIC_RANGE.0, DYNAMIC_RANGE.1);
        self.set_config(&format!(
            "[ports]\ndynamic_range = \"{range}\"\n{ports}\n[lb]\nlease_seconds = {ttl}\ninstance_id = \"i-{}\"\n",
            self.id
        ));
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
        let out = output(self.runc().args(["delete", "-f", id]));
        assert!(out.status.success(), "runc delete -f {id}: {}", text(&out));
    }

    /// This host's shim, its state dir and config, run inside netns `ns`.
    fn shim_in(&self, ns: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(common::SHIM)
            .env("NETSHIM_STATE_DIR", self.state_dir())
            .env("NETSHIM_CONFIG", self.config_path());
        c
    }

    /// `shim registrar args...` in netns `ns`, its stderr in `<dir>/<log>`.
    fn registrar_in(&self, ns: &str, args: &[&str], log: &str) -> Proc {
        let mut cmd = self.shim_in(ns);
        cmd.arg("registrar").args(args);
        Proc::spawn("registrar", &mut cmd, &self.dir.join(log))
    }

    /// The publishing registrar of this host, in `ns`, with `more` sinks beside etcd.
    fn publisher(&self, ns: &str, etcd: &Etcd, more: &[&str], log: &str) -> Proc {
        let url = etcd.url();
        let mut args = vec!["--etcd", &url, "--host-id", &self.id];
        args.extend_from_slice(more);
        self.registrar_in(ns, &args, log)
    }

    fn drain(&self, id: &str, timeout: f64) -> Output {
        output(
            self.shim()
                .args(["drain", id, "--timeout", &timeout.to_string()]),
        )
    }

    /// The ledger's entry of container `id`.
    fn entry(&self, id: &str) -> Value {
        let p = self.ports();
        p.into_iter()
            .find(|e| e["containerId"] == id)
            .unwrap_or_else(|| panic!("{id} not listed"))
    }

    /// `targetIP:targetPort` of container `id`.
    fn target(&self, id: &str) -> String {
        let e = self.entry(id);
        format!(
            "{}:{}",
            e["targetIP"].as_str().unwrap_or(""),
            e["targetPort"]
        )
    }

    /// The etcd key of container `id`'s port 80.
    fn key(&self, service: &str, id: &str) -> String {
        format!("{TARGETS}{service}/{}/{id}/tcp-80", self.id)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_state();
        }
        for id in self.containers.borrow().iter().rev() {
            let _ = output(self.runc().args(["delete", "-f", id]));
        }
    }
}

/// This host's keys in etcd: key → (value, lease).
fn host_keys(etcd: &Etcd, host: &str) -> Vec<(String, Value, i64)> {
    etcd.get_prefix("/netshim/v1/")
        .into_iter()
        .filter(|(k, _, _)| {
            k == &format!("{HOSTS}{host}")
                || k.split('/').nth(5) == Some(host) && k.starts_with(TARGETS)
        })
        .collect()
}

fn target_keys(etcd: &Etcd, host: &str) -> BTreeSet<String> {
    host_keys(etcd, host)
        .into_iter()
        .map(|(k, _, _)| k)
        .filter(|k| k.starts_with(TARGETS))
        .collect()
}

/// The lease every key of `host` is on (panics if they are on several or there are none).
fn one_lease(etcd: &Etcd, host: &str) -> i64 {
    let leases: BTreeSet<i64> = host_keys(etcd, host).iter().map(|k| k.2).collect();
    assert_eq!(leases.len(), 1, "{host}'s keys on leases {leases:?}");
    leases.into_iter().next().unwrap_or(0)
}

fn saved_lease(h: &Host) -> i64 {
    fs::read_to_string(h.state_dir().join("registrar-etcd.lease"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn set(items: &[&String]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn the_registrar_publishes_this_hosts_targets_on_one_lease_and_follows_the_ledger() {
    let a = Host::new("host-a");
    let etcd = Etcd::start(&a.host, &a.dir);
    let first = a.start("web1", "web");
    let file_sd = a.dir.join("sd.json");
    let _reg = a.publisher(
        &a.host,
        &etcd,
        &["--file-sd", &file_sd.display().to_string()],
        "registrar.log",
    );
    let k1 = a.key("web", &first);
    let took = etcd.until(Duration::from_secs(5), |e| {
        target_keys(e, "host-a").contains(&k1)
    });
    assert!(
        took.is_some(),
        "{k1} never appeared: {:?}",
        host_keys(&etcd, "host-a")
    );

    // The value is the `ports list --json` object with the host's id.
    let keys = host_keys(&etcd, "host-a");
    let (_, v, lease) = keys.iter().find(|k| k.0 == k1).cloned().unwrap_or_default();
    let mut want = a.entry(&first);
    want["hostId"] = json!("host-a");
    assert_eq!(v, want);
    assert_eq!(v["state"], "serving");
    // The host key, on the same lease.
    let (_, host, host_lease) = keys
        .iter()
        .find(|k| k.0 == format!("{HOSTS}host-a"))
        .cloned()
        .unwrap_or_else(|| panic!("no host key: {keys:?}"));
    assert_eq!(host_lease, lease);
    assert_eq!(host["hostId"], "host-a");
    assert_eq!(host["instanceId"], "i-host-a");
    assert_eq!(host["address"], v["targetIP"]);
    assert!(
        host["since"].as_u64().unwrap_or(0) > 1_700_000_000,
        "{host}"
    );
    // The lease: TTL [lb] lease_seconds, kept alive (never lower than a third used up twice).
    let (_, granted) = etcd.lease_ttl(lease).expect("the lease exists");
    assert_eq!(granted, TTL as i64);
    assert_eq!(
        saved_lease(&a),
        lease,
        "the lease id is saved in the state dir"
    );
    std::thread::sleep(Duration::from_secs(TTL * 2));
    assert!(
        etcd.lease_ttl(lease).is_some(),
        "the lease expired while kept alive"
    );
    assert_eq!(one_lease(&etcd, "host-a"), lease);

    // A new container appears, a stopped one goes; file-sd follows too.
    let t0 = Instant::now();
    let second = a.start("web2", "web");
    let k2 = a.key("web", &second);
    let took = etcd.until(Duration::from_secs(5), |e| {
        target_keys(e, "host-a").contains(&k2)
    });
    assert!(took.is_some(), "{k2} never appeared");
    eprintln!("runc run → key in etcd: {:?}", t0.elapsed());
    a.stop(&first);
    let took = etcd.until(Duration::from_secs(5), |e| {
        target_keys(e, "host-a") == set(&[&k2])
    });
    assert!(
        took.is_some(),
        "{k1} not removed after poststop: {:?}",
        target_keys(&etcd, "host-a")
    );
    let sd = fs::read_to_string(&file_sd).unwrap_or_default();
    assert!(sd.contains(&second) && !sd.contains(&first), "{sd}");

    // `ports list --etcd --json` lists it with its host.
    let out = output(
        a.shim()
            .args(["ports", "list", "--etcd", &etcd.url(), "--json"]),
    );
    assert!(out.status.success(), "{}", text(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<(&str, &str)> = listed
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["hostId"].as_str().unwrap_or(""),
                        e["containerId"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids, vec![("host-a", second.as_str())]);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_restart_after_kill_9_revokes_the_old_lease_without_duplicates_and_a_dead_hosts_keys_expire() {
    let a = Host::new("host-a");
    // A long lease first: the old one must be revoked, not merely expire.
    a.configure(10, "");
    let etcd = Etcd::start(&a.host, &a.dir);
    let ids: Vec<String> = (1..=3)
        .map(|i| a.start(&format!("web{i}"), "web"))
        .collect();
    let keys: Vec<String> = ids.iter().map(|id| a.key("web", id)).collect();
    let mut reg = a.publisher(&a.host, &etcd, &[], "registrar1.log");
    let all: BTreeSet<String> = keys.iter().cloned().collect();
    assert!(
        etcd.until(Duration::from_secs(5), |e| target_keys(e, "host-a") == all)
            .is_some(),
        "{:?}",
        host_keys(&etcd, "host-a")
    );
    let old = one_lease(&etcd, "host-a");

    // Killed; a container stops meanwhile (its key stays, on the old lease, for now).
    reg.kill9();
    let killed = Instant::now();
    a.stop(&ids[0]);
    let _reg2 = a.publisher(&a.host, &etcd, &[], "registrar2.log");
    let rest: BTreeSet<String> = keys[1..].iter().cloned().collect();
    // Well before the old lease could expire (it had at least 2/3 of 10 s left).
    let took = etcd.until(Duration::from_secs(4), |e| {
        target_keys(e, "host-a") == rest && e.lease_ttl(old).is_none()
    });
    assert!(
        took.is_some(),
        "after the restart: {:?}, old lease {old}: {:?}",
        host_keys(&etcd, "host-a"),
        etcd.lease_ttl(old)
    );
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "{:?}",
        killed.elapsed()
    );
    eprintln!("restart → republished and old lease revoked in {took:?}");
    let new = one_lease(&etcd, "host-a");
    assert_ne!(new, old);
    assert_eq!(saved_lease(&a), new);
    // Exactly one key per target and one host key: no duplicates.
    assert_eq!(host_keys(&etcd, "host-a").len(), rest.len() + 1);
    drop(_reg2);

    // A dead host: a registrar SIGKILLed and not restarted loses its keys within the TTL.
    a.configure(TTL, "");
    let mut reg3 = a.publisher(&a.host, &etcd, &[], "registrar3.log");
    assert!(
        etcd.until(Duration::from_secs(5), |e| {
            target_keys(e, "host-a") == rest && e.lease_ttl(new).is_none()
        })
        .is_some()
    );
    // Right after a keepalive the lease has its full TTL: kill then, to time the worst case.
    let lease = one_lease(&etcd, "host-a");
    etcd.until(Duration::from_secs(2), |e| {
        e.lease_ttl(lease).is_some_and(|(t, _)| t == TTL as i64)
    });
    reg3.kill9();
    let t0 = Instant::now();
    let gone = etcd.until(Duration::from_secs(TTL + 5), |e| {
        host_keys(e, "host-a").is_empty()
    });
    let gone =
        gone.unwrap_or_else(|| panic!("keys of a dead host still there after {:?}", t0.elapsed()));
    eprintln!("dead host's keys gone {gone:?} after kill -9 (TTL {TTL} s)");
    assert!(
        gone <= Duration::from_millis(TTL * 1000 + 1500),
        "gone after {gone:?}, TTL {TTL} s"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn with_etcd_down_local_sinks_follow_the_ledger_and_etcd_is_republished_when_back() {
    let a = Host::new("host-a");
    let mut etcd = Etcd::start(&a.host, &a.dir);
    let first = a.start("web1", "web");
    let file_sd = a.dir.join("sd.json");
    let reg = a.publisher(
        &a.host,
        &etcd,
        &["--file-sd", &file_sd.display().to_string()],
        "registrar.log",
    );
    let k1 = a.key("web", &first);
    assert!(
        etcd.until(Duration::from_secs(5), |e| target_keys(e, "host-a")
            .contains(&k1))
            .is_some()
    );
    let lease = one_lease(&etcd, "host-a");

    etcd.kill();
    // The ledger changes while etcd is down: file-sd follows at once.
    let t0 = Instant::now();
    let second = a.start("web2", "web");
    let followed = wait_for(Duration::from_secs(3), || {
        fs::read_to_string(&file_sd).is_ok_and(|s| s.contains(&second))
    });
    assert!(
        followed,
        "file-sd did not follow with etcd down:\n{}",
        reg.log_text()
    );
    eprintln!(
        "file-sd followed {:?} after runc run with etcd down",
        t0.elapsed()
    );
    // Down longer than the TTL: the lease survives (etcd re-arms leases when it starts).
    std::thread::sleep(Duration::from_secs(TTL + 1));
    etcd.restart();
    let k2 = a.key("web", &second);
    let took = etcd.until(Duration::from_secs(8), |e| {
        target_keys(e, "host-a") == set(&[&k1, &k2])
    });
    assert!(
        took.is_some(),
        "not republished: {:?}\n{}",
        host_keys(&etcd, "host-a"),
        reg.log_text()
    );
    eprintln!("etcd back → republished in {took:?}");
    assert_eq!(
        one_lease(&etcd, "host-a"),
        lease,
        "the lease was re-armed, not lost"
    );

    // A lease lost (expired in a partition, or revoked): a new one, everything republished.
    etcd.revoke(lease);
    let took = etcd.until(Duration::from_secs(5), |e| {
        target_keys(e, "host-a") == set(&[&k1, &k2])
    });
    assert!(
        took.is_some(),
        "not republished after the lease was lost:\n{}",
        reg.log_text()
    );
    let again = one_lease(&etcd, "host-a");
    assert_ne!(again, lease);
    eprintln!("lease lost → new lease and all keys back in {took:?}");
    assert!(reg.log_text().contains("is gone"), "{}", reg.log_text());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn after_an_etcd_restart_a_dead_hosts_lease_runs_its_full_ttl_again() {
    // What the cluster doc promises about etcd itself: measured, not assumed.
    let scratch = Scratch::new("ttl");
    let mut etcd = Etcd::start(&scratch.ns.name, &scratch.dir);
    let lease = etcd.grant(4);
    etcd.put("/netshim/v1/hosts/ghost", "{}", lease);
    std::thread::sleep(Duration::from_secs(1));
    let before = etcd.lease_ttl(lease).map(|t| t.0).unwrap_or(-1);
    etcd.kill();
    // Down for longer than the lease had left.
    std::thread::sleep(Duration::from_secs(5));
    let t0 = Instant::now();
    etcd.restart();
    let up = t0.elapsed();
    let after = etcd.lease_ttl(lease).map(|t| t.0);
    let gone = etcd
        .until(Duration::from_secs(10), |e| {
            e.get_prefix("/netshim/v1/hosts/").is_empty()
        })
        .map(|d| d + up);
    eprintln!(
        "lease TTL 4 s: {before} s left when etcd was killed, down 5 s, {after:?} s left after the restart ({up:?}); key gone {gone:?} after the restart began"
    );
    assert!(
        after.is_some_and(|t| t >= 3),
        "the lease was not re-armed: {after:?}"
    );
    let gone = gone.expect("the key of an un-renewed lease never went");
    assert!(gone >= Duration::from_secs(3), "gone after only {gone:?}");
}

/// A namespace with loopback only and a temp dir, for a test that needs only etcd; both
/// removed on drop (etcd, declared after it, is dropped first).
struct Scratch {
    ns: common::lb::PrivateNs,
    dir: std::path::PathBuf,
}

impl Scratch {
    fn new(what: &str) -> Scratch {
        let name = format!("ncl{}{what}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{name}.d"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        Scratch {
            ns: common::lb::PrivateNs::new(&name),
            dir,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// HAProxy in host a's namespace whose `web` backend has these targets taking traffic (mode
/// `ready` or `drain` as given).
fn wait_slots(h: &Haproxy, want: &[(String, &str)], limit: Duration) -> bool {
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(t, m)| (t.clone(), m.to_string()))
        .collect();
    wait_for(limit, || {
        h.active("web")
            .into_iter()
            .map(|(_, t, m)| (t, m))
            .collect::<BTreeSet<_>>()
            == want
    })
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_from_etcd_haproxy_routes_two_hosts_follows_drain_and_drops_a_dead_host_but_not_for_an_etcd_outage()
 {
    let a = Host::new("host-a");
    let b = Host::new("host-b");
    // The A–B link: H_B's address on it is host b's target address.
    let third = b.host_ip.octets()[2];
    let (la, lb) = (format!("{}p", b.prefix), format!("{}q", b.prefix));
    let (ipa, ipb) = (format!("172.24.{third}.1"), format!("172.24.{third}.2"));
    common::ip(&[
        "-n", &a.host, "link", "add", &la, "type", "veth", "peer", "name", &lb, "netns", &b.host,
    ]);
    common::ip(&[
        "-n",
        &a.host,
        "addr",
        "add",
        &format!("{ipa}/30"),
        "dev",
        &la,
    ]);
    common::ip(&["-n", &a.host, "link", "set", &la, "up"]);
    common::ip(&[
        "-n",
        &b.host,
        "addr",
        "add",
        &format!("{ipb}/30"),
        "dev",
        &lb,
    ]);
    common::ip(&["-n", &b.host, "link", "set", &lb, "up"]);
    b.configure(TTL, &format!("host_address = \"{ipb}\"\n"));

    let mut etcd = Etcd::start(&a.host, &a.dir);
    let hdir = a.dir.join("haproxy");
    let cfg = haproxy_config(&hdir, &format!("0.0.0.0:{HAPROXY_PORT}"), 6, &["web"]);
    let h = Haproxy::start(&a.host, &hdir, &cfg);
    let sock = h.sock.display().to_string();
    let url = etcd.url();
    // Two members named, the first one down: calls move on to the one that answers.
    let dead = common::lb::free_port(&a.host);
    let both = format!("http://127.0.0.1:{dead},{url}");
    let lb = a.registrar_in(
        &a.host,
        &["--from-etcd", &both, "--haproxy", &sock],
        "lb.log",
    );
    let _pa = a.publisher(&a.host, &etcd, &[], "registrar-a.log");
    let mut pb = b.publisher(&a.host, &etcd, &[], "registrar-b.log");

    let a1 = a.start("a1", "web");
    let b1 = b.start("b1", "web");
    let b2 = b.start("b2", "web");
    let (ta1, tb1, tb2) = (a.target(&a1), b.target(&b1), b.target(&b2));
    assert!(tb1.starts_with(&ipb), "{tb1}");
    let all = [
        (ta1.clone(), "ready"),
        (tb1.clone(), "ready"),
        (tb2.clone(), "ready"),
    ];
    assert!(
        wait_slots(&h, &all, Duration::from_secs(10)),
        "HAProxy: {:?}\n{}",
        h.active("web"),
        lb.log_text()
    );
    // Traffic reaches the containers of both hosts.
    let front: SocketAddr = format!("{}:{HAPROXY_PORT}", a.host_ip)
        .parse()
        .expect("addr");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        match get_from(&a.client, front) {
            Ok((200, body)) => {
                seen.insert(
                    body.split("hello from ")
                        .nth(1)
                        .and_then(|r| r.split('<').next())
                        .unwrap_or("")
                        .to_string(),
                );
            }
            other => panic!("GET through HAProxy: {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [a1.clone(), b1.clone(), b2.clone()].into_iter().collect(),
        "answered: {seen:?}"
    );

    // `ports list --etcd --json` lists both hosts.
    let out = output(a.shim().args(["ports", "list", "--etcd", &url, "--json"]));
    assert!(out.status.success(), "{}", text(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let hosts: BTreeSet<(String, String)> = listed
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["hostId"].as_str().unwrap_or("").to_string(),
                e["containerId"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [("host-a", &a1), ("host-b", &b1), ("host-b", &b2)]
        .into_iter()
        .map(|(h, c)| (h.to_string(), c.to_string()))
        .collect();
    assert_eq!(hosts, want);

    // A drain on host b reaches HAProxy through etcd.
    let out = b.drain(&b1, 10.0);
    assert!(out.status.success(), "drain: {}", text(&out));
    let drained = [
        (ta1.clone(), "ready"),
        (tb1.clone(), "drain"),
        (tb2.clone(), "ready"),
    ];
    assert!(
        wait_slots(&h, &drained, Duration::from_secs(3)),
        "{:?}",
        h.active("web")
    );
    let v = etcd
        .get_prefix(&b.key("web", &b1))
        .first()
        .map(|k| k.1.clone())
        .unwrap_or_default();
    assert_eq!(v["state"], "draining", "{v}");

    // etcd down: HAProxy keeps every target, and follows again once etcd is back.
    etcd.kill();
    std::thread::sleep(Duration::from_secs(TTL + 1));
    assert!(
        wait_slots(&h, &drained, Duration::from_millis(100)),
        "HAProxy changed while etcd was down: {:?}",
        h.active("web")
    );
    match get_from(&a.client, front) {
        Ok((200, _)) => {}
        other => panic!("no service while etcd was down: {other:?}"),
    }
    etcd.restart();
    let a2 = a.start("a2", "web");
    let ta2 = a.target(&a2);
    let back = [
        (ta1.clone(), "ready"),
        (ta2.clone(), "ready"),
        (tb1.clone(), "drain"),
        (tb2.clone(), "ready"),
    ];
    assert!(
        wait_slots(&h, &back, Duration::from_secs(10)),
        "after etcd came back: {:?}\n{}",
        h.active("web"),
        lb.log_text()
    );

    // Host b dies (its registrar killed, never restarted): its targets leave within the TTL.
    pb.kill9();
    let t0 = Instant::now();
    let alive = [(ta1.clone(), "ready"), (ta2.clone(), "ready")];
    assert!(
        wait_slots(&h, &alive, Duration::from_millis(TTL * 1000 + 3000)),
        "{:?}",
        h.active("web")
    );
    let took = t0.elapsed();
    eprintln!("dead host b left HAProxy {took:?} after kill -9 (TTL {TTL} s)");
    assert!(took <= Duration::from_millis(TTL * 1000 + 1500), "{took:?}");
}
