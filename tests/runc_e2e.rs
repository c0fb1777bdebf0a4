//! End to end under runc 1.1, runc's own cases: host and none modes, and awsvpc tasks on veth
//! "ENIs" of a VPC rig serving a peer in the subnet (ingress rules, instance metadata, shared
//! ENIs, refusals). The shim is registered from the shipped hook file (`hooks/runc-hooks.json`),
//! the containers are real busybox httpd ones. The cases every runtime shares (dynamic ports,
//! a static-port conflict, delete, a failure after setup) run under runc too, in the runtime
//! matrix of `runtimes_e2e.rs`.
//!
//! Every test builds its own little world and never touches the real host network:
//!
//! ```text
//!   netns C (client) 172.30.n.2/30 ---veth--- 172.30.n.1/30 netns H (the "host")
//! ```
//!
//! runc runs inside H (`nsenter --net`), so the hooks run there too and netshim0, the nsh* veths
//! and the nftables table `ip netshim` are created in H. The client connects from C to
//! 172.30.n.1:<hostPort>. The world and the hook files are `common::lab`'s, the VPC rig
//! `common::vpc`'s.
//!
//! Needs root, runc, iproute2, nftables and a static busybox at /bin/busybox (see
//! docs/runtimes.md). Tests are independent (own prefix, namespaces, temp dir, state dir, runc
//! root) and run in parallel. Cleanup is in `Lab`'s and `World`'s `Drop`, so it runs on panic too.

mod common;

use std::cell::RefCell;
use std::fs;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use common::lab::*;
use common::vpc::{
    AWS_METADATA, Eni, PEER2_IP, SUBNET_GW, VpcNet, addrs, assert_eni_home, eni_annotation,
    exclusive, flags, ip_text, link, link_by_mac, shared,
};
use common::{PATIENT, SHORT, mounts_under, tcp_get};

const FLAVOUR: Flavour = Flavour {
    tag: "nse",
    net: "172.30",
    patience: Duration::from_secs(3),
};

/// One test's world (H, C, the temp dir) with the localized hooks, a runc root and bundles.
struct Lab {
    world: World,
    hooks: Value,
    /// Every container id ever started (even failed ones), for cleanup.
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
        let (state_dir, config) = (world.state_dir(), world.config_path());
        let hooks = hooks_from_spec_fragment(RUNC_HOOKS, &state_dir, &config);
        let lab = Lab {
            world,
            hooks,
            containers: RefCell::new(Vec::new()),
        };
        fs::create_dir_all(lab.runc_root()).expect("create temp dirs");
        lab
    }

    fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    fn runc(&self) -> Command {
        let mut c = self.in_host("runc");
        c.arg("--root").arg(self.runc_root());
        c
    }

    /// Container id for a short name; unique across tests and test processes.
    fn id(&self, name: &str) -> String {
        self.name(name)
    }

    /// Starts a container in network `mode` (host mode: no network namespace of its own).
    fn start_mode(
        &self,
        name: &str,
        mode: &str,
        port_mappings: &str,
        args: &[&str],
    ) -> (bool, String) {
        let annotations = json!({
            "netshim.network-mode": mode,
            "netshim.port-mappings": port_mappings
        });
        self.start_annotated(name, annotations, args, mode != "host")
    }

    /// Starts an awsvpc task serving its page on port 80; `eni` is the `netshim.eni` request.
    fn start_awsvpc(&self, name: &str, eni: &str) -> (bool, String) {
        let annotations = json!({
            "netshim.network-mode": "awsvpc",
            "netshim.eni": eni
        });
        self.start_annotated(name, annotations, &HTTPD, true)
    }

    fn start_annotated(
        &self,
        name: &str,
        annotations: Value,
        args: &[&str],
        own_netns: bool,
    ) -> (bool, String) {
        let id = self.id(name);
        let bundle = self.write_bundle(name, annotations, &self.hooks, args, own_netns);
        self.containers.borrow_mut().push(id.clone());
        // runc hands its own stdio to a detached container: never a pipe (docs/runtimes.md).
        run_logged(
            self.runc().args(["run", "-d", "-b"]).arg(&bundle).arg(&id),
            &bundle.join("runc.out"),
        )
    }

    /// Starts an awsvpc task serving its page on port 80 with `netshim.ingress` rules.
    fn start_awsvpc_ingress(&self, name: &str, eni: &str, ingress: &str) -> (bool, String) {
        let annotations = json!({
            "netshim.network-mode": "awsvpc",
            "netshim.eni": eni,
            "netshim.ingress": ingress
        });
        self.start_annotated(name, annotations, &HTTPD, true)
    }

    /// An awsvpc world: `[awsvpc]` config (short ENI wait) and the VPC rig around H.
    fn vpc(&self) -> VpcNet {
        self.set_config("[awsvpc]\neni_wait_seconds = 2\ninterface_kinds = [\"veth\"]\n");
        VpcNet::new(&self.prefix, &self.host)
    }

    /// The pid of running container `id` (from `runc state`).
    fn pid(&self, id: &str) -> i64 {
        let state: Value =
            serde_json::from_str(&must(self.runc().args(["state", id]))).expect("runc state json");
        state["pid"].as_i64().expect("pid")
    }

    /// `ip -j link show` inside container `id`'s network namespace.
    fn task_links(&self, id: &str) -> Vec<Value> {
        let out = must(
            Command::new("/usr/bin/nsenter")
                .arg(format!("--net=/proc/{}/ns/net", self.pid(id)))
                .args(["/usr/sbin/ip", "-j", "link", "show"]),
        );
        let v: Value = serde_json::from_str(&out).expect("ip -j link json");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Whether the ENI (by MAC) is inside container `id`'s network namespace.
    fn task_has(&self, id: &str, eni: &Eni) -> bool {
        self.task_links(id).iter().any(|l| {
            l["address"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(&eni.mac))
        })
    }

    /// `runc exec id args...`, output captured.
    fn exec(&self, id: &str, args: &[&str]) -> Output {
        output(self.runc().arg("exec").arg(id).args(args))
    }

    /// Asserts the page at `addr`:80, fetched from netns `from`, is container `name`'s.
    fn assert_page(&self, from: &str, addr: &str, name: &str) {
        let to: SocketAddr = format!("{addr}:80").parse().expect("address");
        match self.fetch_from(from, to) {
            Ok(r) => assert!(r.contains(&page_of(&self.id(name))), "{to}: {r}"),
            Err(e) => panic!("no page from {name} at {to} for {from}: {e}"),
        }
    }

    /// Starts a container that must come up.
    /// `runc delete -f` inside H (so poststop runs in H).
    fn delete(&self, id: &str) -> Output {
        output(self.runc().args(["delete", "-f", id]))
    }
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
            self.dump_state();
        }
        for id in ids.iter().rev() {
            let _ = self.delete(id);
        }
        // `world` drops next: the namespaces and the temp dir.
    }
}

#[test]
fn shipped_hook_files_agree_and_name_their_stages() {
    // Pure file checks (no root): both formats register the same hooks.
    let (sd, cfg) = (Path::new("/s"), Path::new("/c.toml"));
    assert_eq!(
        hooks_from_spec_fragment(RUNC_HOOKS, sd, cfg),
        hooks_from_oci_hooks_d(sd, cfg)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn host_mode_second_claim_is_refused_while_the_first_keeps_serving() {
    let lab = Lab::new();
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn none_mode_container_has_only_loopback_up() {
    let lab = Lab::new();
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

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn two_awsvpc_tasks_serve_the_subnet_and_runc_delete_hands_their_enis_back() {
    // H keeps its default route over the link to C, so no ENI is the primary interface.
    let lab = Lab::new();
    lab.set_config("[awsvpc]\neni_wait_seconds = 2\ninterface_kinds = [\"veth\"]\n");
    let mut vpc = VpcNet::new(&lab.prefix, &lab.host);
    let tasks = [
        ("task1", vpc.attach_eni(), "10.0.1.23"),
        ("task2", vpc.attach_eni(), "10.0.1.24"),
    ];
    for (name, eni, addr) in &tasks {
        let (ok, out) = lab.start_awsvpc(name, &eni_annotation(eni, &format!("{addr}/24")));
        assert!(ok, "runc run {name} (awsvpc on {}): {out}", eni.mac);
        assert_eq!(
            link_by_mac(&lab.host, &eni.mac),
            None,
            "{name}: the ENI {} is still in H",
            eni.name
        );
    }
    // Both serve port 80 on their own address, to a peer in the subnet.
    for (name, _, addr) in &tasks {
        let to: SocketAddr = format!("{addr}:80").parse().expect("address");
        match lab.fetch_from(&vpc.peer, to) {
            Ok(r) => assert!(r.contains(&page_of(&lab.id(name))), "{to}: {r}"),
            Err(e) => panic!("no page from {name} at {to} for the peer: {e}"),
        }
    }
    assert_eq!(lab.recorded(), vec![lab.id("task1"), lab.id("task2")]);
    assert_eq!(
        mounts_under(&lab.state_dir()).len(),
        2,
        "netshim pins each task's netns"
    );

    for (name, eni, _) in &tasks {
        let out = lab.delete(&lab.id(name));
        assert!(
            out.status.success(),
            "runc delete -f {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "runc delete reports a hook error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eni_home(&lab.host, eni, &format!("after runc delete -f {name}"));
    }
    assert_eq!(lab.recorded(), Vec::<String>::new());
    assert_eq!(
        mounts_under(&lab.state_dir()),
        Vec::<String>::new(),
        "netns pins left"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn awsvpc_ingress_rules_under_runc_admit_only_the_listed_peer() {
    let lab = Lab::new();
    let mut vpc = lab.vpc();
    let p2 = vpc.add_peer(PEER2_IP);
    let eni = vpc.attach_eni();
    let ingress = r#"[{"protocol":"tcp","port":80,"cidr":"10.0.1.50/32"}]"#;
    let (ok, out) = lab.start_awsvpc_ingress("ing1", &exclusive(&eni, &["10.0.1.23/24"]), ingress);
    assert!(ok, "runc run ing1 (awsvpc with ingress): {out}");
    lab.assert_page(&vpc.peer, "10.0.1.23", "ing1");
    // Control: P2 is on the subnet and has a path.
    assert!(
        tcp_get(&p2, SUBNET_GW, 80, PATIENT).is_ok(),
        "P2 has no path"
    );
    let to: SocketAddr = "10.0.1.23:80".parse().expect("address");
    let r = fetch_page(&p2, to, SHORT);
    assert!(
        r.is_err(),
        "10.0.1.51 is not in the port 80 rule's cidr, yet got: {r:?}"
    );
    // The listed peer still gets through afterwards.
    lab.assert_page(&vpc.peer, "10.0.1.23", "ing1");
    let out = lab.delete(&lab.id("ing1"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
    assert_eni_home(&lab.host, &eni, "after runc delete -f ing1");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn awsvpc_task_under_runc_cannot_reach_instance_metadata_but_the_peer_can() {
    let lab = Lab::new();
    let mut vpc = lab.vpc();
    let eni = vpc.attach_eni();
    let (ok, out) = lab.start_awsvpc("meta1", &exclusive(&eni, &["10.0.1.23/24"]));
    assert!(ok, "runc run meta1: {out}");
    let id = lab.id("meta1");
    lab.assert_page(&vpc.peer, "10.0.1.23", "meta1");
    // busybox-static 1.35's wget segfaults before it connects (also on the host), so the task
    // asks with busybox nc: connect, read the greeting, exit (stdin is /dev/null).
    let ask = |host: &str| lab.exec(&id, &["/bin/busybox", "nc", "-w", "2", host, "80"]);
    // Control: the VPC router (same server, the subnet gateway) answers the task.
    let gw = ask(&SUBNET_GW.to_string());
    assert!(
        gw.status.success() && String::from_utf8_lossy(&gw.stdout).contains("vpc metadata"),
        "the task cannot reach the subnet gateway ({}): {}",
        gw.status,
        text(&gw)
    );
    // The peer reaches metadata.
    let r = tcp_get(&vpc.peer, AWS_METADATA, 80, PATIENT);
    assert!(
        r.as_deref().is_ok_and(|r| r.contains("vpc metadata")),
        "the peer cannot reach metadata: {r:?}"
    );
    let m = ask(&AWS_METADATA.to_string());
    assert!(
        !m.status.success(),
        "the task reached 169.254.169.254: {}",
        text(&m)
    );
    assert!(
        !String::from_utf8_lossy(&m.stdout).contains("vpc"),
        "{}",
        text(&m)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn shared_eni_tasks_under_runc_get_their_own_addresses_until_none_is_free() {
    let lab = Lab::new();
    let mut vpc = lab.vpc();
    let eni = vpc.attach_eni();
    let spec = shared(&eni, &["10.0.1.31/24", "10.0.1.32/24"]);
    for name in ["sh1", "sh2"] {
        let (ok, out) = lab.start_awsvpc(name, &spec);
        assert!(ok, "runc run {name} (shared ENI): {out}");
    }
    assert_eq!(
        link_by_mac(&lab.host, &eni.mac).as_deref(),
        Some(eni.name.as_str()),
        "the shared ENI left H"
    );
    // Each address serves one task's page, and not the same task's.
    let owner = |addr: &str| {
        let to: SocketAddr = format!("{addr}:80").parse().expect("address");
        let r = lab
            .fetch_from(&vpc.peer, to)
            .unwrap_or_else(|e| panic!("no page at {to} for the peer: {e}"));
        ["sh1", "sh2"]
            .into_iter()
            .find(|n| r.contains(&page_of(&lab.id(n))))
            .unwrap_or_else(|| panic!("{to} serves no task's page: {r}"))
    };
    let (o31, o32) = (owner("10.0.1.31"), owner("10.0.1.32"));
    assert_ne!(o31, o32, "one task answers on both addresses");
    assert_eq!(lab.recorded(), vec![lab.id("sh1"), lab.id("sh2")]);

    let links_before = lab.links("nsa");
    let (ok, out) = lab.start_awsvpc("sh3", &spec);
    assert!(
        !ok,
        "a third task on a 2-address shared ENI must not start: {out}"
    );
    assert!(
        out.contains("no free secondary IP on ENI") && out.contains("(2 of 2 in use)"),
        "runc's output lacks the shim's refusal: {out}"
    );
    assert_eq!(lab.recorded(), vec![lab.id("sh1"), lab.id("sh2")]);
    assert_eq!(lab.links("nsa"), links_before, "the refusal left links");
    lab.assert_page(&vpc.peer, "10.0.1.31", o31);
    lab.assert_page(&vpc.peer, "10.0.1.32", o32);

    for name in ["sh1", "sh2", "sh3"] {
        let out = lab.delete(&lab.id(name));
        if name != "sh3" {
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "runc delete -f {name}: {}",
                text(&out)
            );
        }
    }
    assert_eq!(lab.recorded(), Vec::<String>::new());
    assert_eq!(lab.links("nsa"), Vec::<String>::new(), "nsa links left");
    let rules = ip_text(&lab.host, &["rule", "show"]);
    assert!(!rules.contains("10.0.1.3"), "rules left:\n{rules}");
    let routes = ip_text(&lab.host, &["route", "show", "table", "all"]);
    assert!(!routes.contains("10.0.1.3"), "routes left:\n{routes}");
    assert_eq!(
        link_by_mac(&lab.host, &eni.mac).as_deref(),
        Some(eni.name.as_str()),
        "the shared ENI is gone from H"
    );
    assert_eq!(
        mounts_under(&lab.state_dir()),
        Vec::<String>::new(),
        "netns pins left"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn runc_refuses_the_primary_interface_and_an_eni_already_given() {
    let lab = Lab::new();
    let mut vpc = lab.vpc();
    let eni = vpc.attach_eni();
    let (ok, out) = lab.start_awsvpc("ref1", &exclusive(&eni, &["10.0.1.23/24"]));
    assert!(ok, "runc run ref1: {out}");
    let first = lab.id("ref1");
    lab.assert_page(&vpc.peer, "10.0.1.23", "ref1");
    let unchanged = |when: &str| {
        assert_eq!(lab.recorded(), vec![first.clone()], "{when}");
        assert_eq!(
            link_by_mac(&lab.host, &eni.mac),
            None,
            "{when}: the ENI is back in H"
        );
        assert!(lab.task_has(&first, &eni), "{when}: the ENI left ref1");
        assert_eq!(lab.links("nsa"), Vec::<String>::new(), "{when}");
        assert_eq!(
            mounts_under(&lab.state_dir()).len(),
            1,
            "{when}: netns pins"
        );
    };

    // H's default-route interface (its link to C).
    let primary_name = format!("{}a", lab.prefix);
    let primary = link(&lab.host, &primary_name).expect("H's primary link");
    let primary = Eni {
        mac: primary["address"].as_str().expect("mac").to_string(),
        name: primary_name.clone(),
        vpc_end: String::new(),
    };
    let (ok, out) = lab.start_awsvpc("ref2", &exclusive(&primary, &["10.0.1.24/24"]));
    assert!(
        !ok,
        "a task on H's default-route interface must not start: {out}"
    );
    assert!(out.contains("default route"), "{out}");
    unchanged("after refusing the primary interface");
    let l = link(&lab.host, &primary_name).expect("the primary interface left H");
    assert!(
        flags(&l).contains(&"UP".to_string()),
        "primary is down: {l}"
    );
    assert_eq!(
        addrs(&lab.host, &primary_name, "-4"),
        [format!("{}/30", lab.host_ip)]
    );

    let (ok, out) = lab.start_awsvpc("ref3", &exclusive(&eni, &["10.0.1.24/24"]));
    assert!(!ok, "a task on an ENI given to ref1 must not start: {out}");
    assert!(
        out.contains("already given to task") && out.contains(&first),
        "{out}"
    );
    unchanged("after refusing the ENI already given");
    lab.assert_page(&vpc.peer, "10.0.1.23", "ref1");
    for name in ["ref2", "ref3"] {
        let state = output(lab.runc().args(["state", &lab.id(name)]));
        assert!(!state.status.success(), "runc still knows {name}");
    }
}
