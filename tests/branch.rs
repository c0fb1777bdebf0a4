//! Branch ENIs (ENI trunking) end to end: the trunk is a veth whose end in the test's host
//! namespace H plays the trunk ENI, and whose other end sits in the "VPC" namespace V, where
//! VLAN sub-interfaces with the same ids play each branch's subnet and gateway. netshim creates
//! the branch (a VLAN of the trunk with the branch's MAC) inside the task as `eth0`.
//!
//! 802.1Q links need a kernel with the 8021q module: these tests are marked
//! `#[ignore = "needs 802.1Q: runs in the VM lab"]` and run on Debian's 6.1 kernel in the VM lab
//! (tests/vm.rs, step `branch`). The one test that is not ignored proves the refusal on a kernel
//! without 802.1Q: this machine's (6.18) has none, and the lab runs it once more with 8021q
//! unloaded and module loading disabled (step `branch_without_8021q`).

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::vpc::*;
use common::*;
use serde_json::{Value, json};

/// A VPC rig with a trunk ENI attached to H (up, no address), its other end in V (up).
struct Branches {
    vpc: Vpc,
    trunk: Eni,
}

impl std::ops::Deref for Branches {
    type Target = Vpc;
    fn deref(&self) -> &Vpc {
        &self.vpc
    }
}

impl std::ops::DerefMut for Branches {
    fn deref_mut(&mut self) -> &mut Vpc {
        &mut self.vpc
    }
}

impl Branches {
    fn new() -> Branches {
        let mut vpc = Vpc::new(&[]);
        let trunk = plug_trunk(&mut vpc);
        Branches { vpc, trunk }
    }

    /// V's end of VLAN `id` on the trunk (`<prefix>v<id in hex>`), up, with `addrs` (IPv6
    /// ones without duplicate address detection).
    fn vpc_vlan(&self, id: u16, addrs: &[&str]) -> String {
        vpc_vlan(&self.vpc, &self.trunk, id, addrs)
    }

    /// A MAC for a branch (never attached to any namespace by the rig).
    fn branch_mac(&mut self) -> String {
        self.vpc.next_eni().mac
    }

    /// The trunk as H sees it: (name, MAC, up, MTU, addresses).
    fn trunk_state(&self) -> (String, String, bool, u64, Vec<String>) {
        trunk_state(&self.vpc.host, &self.trunk)
    }
}

/// Another trunk on `vpc`: a veth, the H end with a fresh MAC and up, the V end up (on no
/// bridge: V's VLAN sub-interfaces of it are the branch subnets).
fn plug_trunk(vpc: &mut Vpc) -> Eni {
    let t = vpc.next_eni();
    let (h, v) = (vpc.host.clone(), vpc.net.ns.clone());
    ip(&[
        "-n", &v, "link", "add", &t.vpc_end, "type", "veth", "peer", "name", &t.name, "netns", &h,
    ]);
    ip(&["-n", &h, "link", "set", "dev", &t.name, "address", &t.mac]);
    ip(&["-n", &h, "link", "set", &t.name, "up"]);
    ip(&["-n", &v, "link", "set", &t.vpc_end, "up"]);
    t
}

fn vpc_vlan(vpc: &Vpc, trunk: &Eni, id: u16, addrs: &[&str]) -> String {
    let v = &vpc.net.ns;
    let name = format!("{}v{id:03x}", vpc.prefix);
    ip(&[
        "-n",
        v,
        "link",
        "add",
        "link",
        &trunk.vpc_end,
        "name",
        &name,
        "type",
        "vlan",
        "id",
        &id.to_string(),
    ]);
    for a in addrs {
        let mut args = vec!["-n", v, "addr", "add", a, "dev", &name];
        if a.contains(':') {
            args.push("nodad");
        }
        ip(&args);
    }
    ip(&["-n", v, "link", "set", &name, "up"]);
    name
}

fn trunk_state(host: &str, trunk: &Eni) -> (String, String, bool, u64, Vec<String>) {
    let l = link(host, &trunk.name).unwrap_or_else(|| {
        panic!(
            "trunk {} is gone from the host (host links: {:?})",
            trunk.name,
            link_names(host)
        )
    });
    (
        l["ifname"].as_str().unwrap_or_default().to_string(),
        l["address"].as_str().unwrap_or_default().to_string(),
        flags(&l).contains(&"UP".to_string()),
        l["mtu"].as_u64().unwrap_or(0),
        addrs(host, &trunk.name, ""),
    )
}

/// A branch request in netshim's own words.
fn branch(mac: &str, trunk: &Eni, vlan: u16, cidr: &str, gw: &str) -> Value {
    json!({
        "macAddress": mac,
        "attachment": "branch",
        "trunkMacAddress": trunk.mac,
        "vlanId": vlan,
        "ipv4Addresses": [cidr],
        "subnetGatewayIpv4Address": gw,
    })
}

fn ipa(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// `ip -d -j link show dev eth0` in `ns`.
fn eth0_details(ns: &str) -> Value {
    ip_json(ns, &["-d", "link", "show", "dev", "eth0"])
        .and_then(|v| v.get(0).cloned())
        .unwrap_or_else(|| panic!("no eth0 in {ns}; links: {:?}", link_names(ns)))
}

/// Task `i`'s eth0 is VLAN `vlan` (802.1Q) with `mac`, `mtu`, up, holding `addr`, with the
/// default route via `gw`.
fn assert_branch_task(b: &Branches, i: usize, mac: &str, vlan: u16, addr: &str, gw: &str) {
    let ns = b.ns(i);
    let l = eth0_details(&ns);
    assert_eq!(l["address"], mac, "eth0 has not the branch's MAC: {l}");
    assert_eq!(
        l["linkinfo"]["info_kind"], "vlan",
        "eth0 is not a VLAN: {l}"
    );
    assert_eq!(l["linkinfo"]["info_data"]["protocol"], "802.1Q", "{l}");
    assert_eq!(l["linkinfo"]["info_data"]["id"], vlan, "{l}");
    assert!(flags(&l).contains(&"UP".to_string()), "eth0 is down: {l}");
    assert_eq!(addrs(&ns, "eth0", "-4"), [addr], "eth0 addresses");
    assert_eq!(
        default_route(&ns),
        Some((gw.to_string(), "eth0".to_string())),
        "task default route"
    );
    let lo = link(&ns, "lo").expect("lo");
    assert!(flags(&lo).contains(&"UP".to_string()), "lo is down");
}

fn assert_not_recorded(v: &Vpc, i: usize) {
    let id = &v.containers[i].id;
    assert!(
        !v.recorded().contains(id),
        "{id} is recorded: {:?}",
        v.recorded()
    );
}

/// The ledger's files, H's links and the netns pins under the state dir.
type Snapshot = (Vec<(String, Vec<u8>)>, Vec<String>, Vec<String>);

/// What a refusal must leave as it was.
fn snapshot(b: &Branches) -> Snapshot {
    (
        ledger_fingerprint(&b.state_dir()),
        link_names(&b.host),
        mounts_under(&b.state_dir()),
    )
}

// ---------------------------------------------------------------------------------------------
// Setup, traffic, teardown
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn a_branch_eni_is_a_vlan_of_the_trunk_in_the_task_as_eth0_and_carries_tcp() {
    let mut b = Branches::new();
    b.vpc_vlan(105, &["10.0.105.1/24"]);
    let mac = b.branch_mac();
    let a = b.task();
    let mut spec = branch(&mac, &b.trunk, 105, "10.0.105.10/24", "10.0.105.1");
    spec["mtu"] = json!(1400);
    let trunk_before = b.trunk_state();
    let t = Instant::now();
    b.must_setup(a, &spec.to_string(), r#"[{"containerPort":80}]"#, None);
    let setup = t.elapsed();
    assert_branch_task(&b, a, &mac, 105, "10.0.105.10/24", "10.0.105.1");
    assert_eq!(eth0_details(&b.ns(a))["mtu"], 1400, "the branch's MTU");
    // prestart after createRuntime (both registered) finds the task set up: one VLAN.
    let st = b.oci_state(
        a,
        &[
            ("netshim.network-mode", "awsvpc"),
            ("netshim.eni", &spec.to_string()),
            ("netshim.port-mappings", r#"[{"containerPort":80}]"#),
        ],
    );
    must_succeed(&b.shim(&["hook", "prestart"], &st), "prestart");
    assert_eq!(link_names(&b.ns(a)), ["lo", "eth0"], "after prestart");
    assert_branch_task(&b, a, &mac, 105, "10.0.105.10/24", "10.0.105.1");
    // The branch lives only in the task; the trunk stays on the host as it was.
    assert_eq!(
        link_by_mac(&b.host, &mac),
        None,
        "the branch is on the host"
    );
    assert_eq!(b.trunk_state(), trunk_before, "setup changed the trunk");

    // Real TCP both ways over the VLAN: the task to its gateway, the VPC side to the task.
    let ns = b.ns(a);
    tcp_server(&ns, 80, "branch a");
    assert!(
        tcp_get(&ns, ip4("10.0.105.1"), 80, PATIENT)
            .unwrap()
            .contains("vpc"),
        "the task does not reach its gateway over VLAN 105"
    );
    assert_eq!(
        tcp_get(&b.net.ns, ip4("10.0.105.10"), 80, PATIENT).unwrap(),
        "branch a"
    );
    // Load balancers register the branch address and the container port.
    let ports = b.ports();
    let p = ports
        .iter()
        .find(|p| p["containerPort"] == 80)
        .unwrap_or_else(|| panic!("no port 80: {ports:?}"));
    assert_eq!(p["targetIP"], "10.0.105.10", "{p}");
    assert_eq!(p["networkMode"], "awsvpc", "{p}");
    let rec = ledger_record(&b.state_dir(), &b.containers[a].id).expect("record");
    assert_eq!(rec["eni"]["attachment"], "branch", "{rec}");
    assert_eq!(rec["eni"]["vlan"], 105, "{rec}");

    let t = Instant::now();
    must_succeed(&b.poststop(a), "poststop");
    eprintln!(
        "branch setup {:.0} ms, poststop {:.0} ms",
        setup.as_secs_f64() * 1000.0,
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(link_names(&ns), ["lo"], "the branch outlived poststop");
    assert_eq!(b.trunk_state(), trunk_before, "poststop changed the trunk");
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn a_branch_reaches_only_the_vpc_side_of_its_own_vlan_id() {
    let mut b = Branches::new();
    let mac = b.branch_mac();
    let a = b.task();
    let spec = branch(&mac, &b.trunk, 107, "10.0.107.10/24", "10.0.107.1");
    b.must_setup(a, &spec.to_string(), "", None);
    let (ns, v) = (b.ns(a), b.net.ns.clone());
    tcp_server(&ns, 80, "vlan 107");
    // The gateway's address untagged on V's end of the trunk: frames tagged 107 never reach it.
    ip(&[
        "-n",
        &v,
        "addr",
        "add",
        "10.0.107.1/24",
        "dev",
        &b.trunk.vpc_end,
    ]);
    assert!(
        tcp_get(&ns, ip4("10.0.107.1"), 80, SHORT).is_err(),
        "the branch reached an untagged address on the trunk"
    );
    ip(&[
        "-n",
        &v,
        "addr",
        "del",
        "10.0.107.1/24",
        "dev",
        &b.trunk.vpc_end,
    ]);
    // On VLAN 108: another tag, still nothing.
    let wrong = b.vpc_vlan(108, &["10.0.107.1/24"]);
    assert!(
        tcp_get(&ns, ip4("10.0.107.1"), 80, SHORT).is_err(),
        "VLAN 107 reached VLAN 108"
    );
    assert!(
        tcp_get(&v, ip4("10.0.107.10"), 80, SHORT).is_err(),
        "VLAN 108 reached the task on VLAN 107"
    );
    ip(&["-n", &v, "link", "del", &wrong]);
    // The same address on VLAN 107: through, both ways.
    b.vpc_vlan(107, &["10.0.107.1/24"]);
    assert!(
        tcp_get(&ns, ip4("10.0.107.1"), 80, PATIENT)
            .unwrap()
            .contains("vpc")
    );
    assert_eq!(
        tcp_get(&v, ip4("10.0.107.10"), 80, PATIENT).unwrap(),
        "vlan 107"
    );
    must_succeed(&b.poststop(a), "poststop");
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn two_branches_on_one_trunk_are_isolated_from_each_other() {
    let mut b = Branches::new();
    b.vpc_vlan(201, &["10.0.201.1/24"]);
    b.vpc_vlan(202, &["10.0.202.1/24"]);
    let v = b.net.ns.clone();
    let forwarding = |on: &str| {
        must_succeed(
            &command_in(&v, "/sbin/sysctl")
                .args(["-q", "-w", &format!("net.ipv4.ip_forward={on}")])
                .output()
                .expect("sysctl"),
            "set forwarding in V",
        )
    };
    forwarding("0");
    let (mac_a, mac_b) = (b.branch_mac(), b.branch_mac());
    let (a, c) = (b.task(), b.task());
    let spec_a = branch(&mac_a, &b.trunk, 201, "10.0.201.11/24", "10.0.201.1");
    let spec_c = branch(&mac_b, &b.trunk, 202, "10.0.202.12/24", "10.0.202.1");
    b.must_setup(a, &spec_a.to_string(), "", None);
    b.must_setup(c, &spec_c.to_string(), "", None);
    let (ns_a, ns_c) = (b.ns(a), b.ns(c));
    assert_branch_task(&b, a, &mac_a, 201, "10.0.201.11/24", "10.0.201.1");
    assert_branch_task(&b, c, &mac_b, 202, "10.0.202.12/24", "10.0.202.1");
    tcp_server(&ns_a, 80, "task a");
    tcp_server(&ns_c, 80, "task c");
    // Each reaches its own gateway.
    assert!(tcp_get(&ns_a, ip4("10.0.201.1"), 80, PATIENT).is_ok());
    assert!(tcp_get(&ns_c, ip4("10.0.202.1"), 80, PATIENT).is_ok());
    // a treats c's subnet as on its own link: its ARP goes out tagged 201 and never reaches c.
    ip(&["-n", &ns_a, "route", "add", "10.0.202.0/24", "dev", "eth0"]);
    assert!(
        tcp_get(&ns_a, ip4("10.0.202.12"), 80, SHORT).is_err(),
        "a reached c across VLANs on one trunk"
    );
    ip(&["-n", &ns_a, "route", "del", "10.0.202.0/24", "dev", "eth0"]);
    // Through its gateway with V not routing, neither.
    assert!(
        tcp_get(&ns_a, ip4("10.0.202.12"), 80, SHORT).is_err(),
        "a reached c with V not forwarding"
    );
    // Control: once the VPC routes between the two subnets, a reaches c (so c was reachable;
    // what kept them apart was the VLANs).
    forwarding("1");
    assert_eq!(
        tcp_get(&ns_a, ip4("10.0.202.12"), 80, PATIENT).unwrap(),
        "task c"
    );
    assert_eq!(
        tcp_get(&ns_c, ip4("10.0.201.11"), 80, PATIENT).unwrap(),
        "task a"
    );
    must_succeed(&b.poststop(a), "poststop a");
    must_succeed(&b.poststop(c), "poststop c");
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn poststop_deletes_the_vlan_and_leaves_the_trunk_as_it_was() {
    let mut b = Branches::new();
    b.vpc_vlan(301, &["10.0.31.1/24"]);
    b.vpc_vlan(302, &["10.0.32.1/24"]);
    // Let the trunk's link-local address settle, so "as it was" compares like with like.
    thread::sleep(Duration::from_millis(300));
    let trunk_before = b.trunk_state();
    assert!(trunk_before.2, "the rig's trunk is down");
    let (mac_a, mac_c) = (b.branch_mac(), b.branch_mac());
    let (a, c) = (b.task(), b.task());
    let spec_a = branch(&mac_a, &b.trunk, 301, "10.0.31.10/24", "10.0.31.1");
    let spec_c = branch(&mac_c, &b.trunk, 302, "10.0.32.10/24", "10.0.32.1");
    b.must_setup(a, &spec_a.to_string(), "", None);
    b.must_setup(c, &spec_c.to_string(), "", None);

    // a: a plain poststop while its netns exists.
    must_succeed(&b.poststop(a), "poststop a");
    assert_eq!(link_names(&b.ns(a)), ["lo"], "the VLAN outlived poststop a");
    assert_eq!(b.trunk_state(), trunk_before, "after poststop a");
    assert!(
        tcp_get(&b.ns(c), ip4("10.0.32.1"), 80, PATIENT).is_ok(),
        "c lost its branch when a's went"
    );
    must_succeed(&b.poststop(a), "poststop a again");

    // c: the runtime deleted the netns before poststop; netshim's pin still held it.
    b.containers[c].destroy();
    thread::sleep(Duration::from_millis(300));
    must_succeed(&b.poststop(c), "poststop c after its netns was deleted");
    must_succeed(&b.poststop(c), "poststop c again");
    assert_eq!(b.trunk_state(), trunk_before, "after poststop c");
    assert!(b.recorded().is_empty(), "{:?}", b.recorded());
    assert_eq!(
        mounts_under(&b.state_dir()),
        Vec::<String>::new(),
        "task namespaces still pinned"
    );
    // Nothing of the branches anywhere on the host, and VLAN 301 can be given again.
    for m in [&mac_a, &mac_c] {
        assert_eq!(link_by_mac(&b.host, m), None, "branch {m} on the host");
    }
    let d = b.task();
    b.must_setup(d, &spec_a.to_string(), "", None);
    assert_branch_task(&b, d, &mac_a, 301, "10.0.31.10/24", "10.0.31.1");
    assert!(tcp_get(&b.ns(d), ip4("10.0.31.1"), 80, PATIENT).is_ok());
    // d dies without a poststop (crun and podman skip it after a failed start): the next setup
    // asking for VLAN 301 finds d's process gone, releases d and takes the VLAN.
    let id_d = b.containers[d].id.clone();
    b.containers[d].destroy();
    let e = b.task();
    b.must_setup(e, &spec_a.to_string(), "", None);
    assert!(
        !b.recorded().contains(&id_d),
        "the dead task is still recorded: {:?}",
        b.recorded()
    );
    assert_branch_task(&b, e, &mac_a, 301, "10.0.31.10/24", "10.0.31.1");
    assert!(tcp_get(&b.ns(e), ip4("10.0.31.1"), 80, PATIENT).is_ok());
    must_succeed(&b.poststop(e), "poststop e");
    assert_eq!(b.trunk_state(), trunk_before, "after poststop e");
    assert_eq!(
        mounts_under(&b.state_dir()),
        Vec::<String>::new(),
        "pins left"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: one line, nothing changed
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn branch_requests_that_cannot_be_met_are_refused_and_change_nothing() {
    let mut b = Branches::new();
    b.vpc_vlan(400, &["10.0.40.1/24"]);
    let (mac_a, mac_x) = (b.branch_mac(), b.branch_mac());
    let ghost = b.next_eni(); // a trunk never attached
    let a = b.task();
    let spec_a = branch(&mac_a, &b.trunk, 400, "10.0.40.10/24", "10.0.40.1");
    b.must_setup(a, &spec_a.to_string(), "", None);
    let id_a = b.containers[a].id.clone();
    // A VLAN the host made itself on the trunk, and a second trunk carrying only such a VLAN.
    let host_vlan = format!("{}h401", b.prefix);
    let host = b.host.clone();
    ip(&[
        "-n",
        &host,
        "link",
        "add",
        "link",
        &b.trunk.name,
        "name",
        &host_vlan,
        "type",
        "vlan",
        "id",
        "401",
    ]);
    let t2 = plug_trunk(&mut b);
    let t2_vlan = format!("{}h402", b.prefix);
    ip(&[
        "-n", &host, "link", "add", "link", &t2.name, "name", &t2_vlan, "type", "vlan", "id", "402",
    ]);
    let primary = b.primary();
    // VLAN 405 of the trunk, made by hand and moved into a namespace of its own: invisible
    // from the host, still taken on the trunk (the kernel refuses a second one).
    let elsewhere = format!("{}x", b.prefix);
    ip(&["netns", "add", &elsewhere]);
    b.extra_ns.push(elsewhere.clone());
    let hidden = format!("{}h405", b.prefix);
    ip(&[
        "-n",
        &host,
        "link",
        "add",
        "link",
        &b.trunk.name,
        "name",
        &hidden,
        "type",
        "vlan",
        "id",
        "405",
    ]);
    ip(&["-n", &host, "link", "set", &hidden, "netns", &elsewhere]);
    // Another task's exclusive ENI (moved into that task) as a trunk.
    let e = b.attach_eni();
    let x = b.task();
    b.must_setup(x, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    let id_x = b.containers[x].id.clone();

    let at = |vlan: u16| branch(&mac_x, &b.trunk, vlan, "10.0.40.20/24", "10.0.40.1");
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            branch(&mac_x, &ghost, 400, "10.0.40.20/24", "10.0.40.1").to_string(),
            vec!["no trunk with MAC", &ghost.mac, "appeared within"],
        ),
        (
            with(at(400), "vlanId", json!(0)).to_string(),
            vec!["vlanId 0 is out of range", "1-4094"],
        ),
        (
            with(at(400), "vlanId", json!(4095)).to_string(),
            vec!["vlanId 4095 is out of range", "1-4094"],
        ),
        (
            at(400).to_string(),
            vec!["VLAN 400", "already in use by task", &id_a],
        ),
        (
            at(401).to_string(),
            vec!["VLAN 401", "already in use on the host by", &host_vlan],
        ),
        (
            // The trunk as an exclusive ENI, while it carries a's branch.
            exclusive(&b.trunk, &["10.0.1.23/24"]),
            vec![
                "already given to task",
                &id_a,
                "as the trunk of its branch ENI",
            ],
        ),
        (
            // A trunk that carries a host VLAN, as an exclusive ENI.
            exclusive(&t2, &["10.0.1.23/24"]),
            vec!["the trunk of VLAN", &t2_vlan, "a trunk stays on the host"],
        ),
        (
            // a's branch as the trunk of another branch.
            json!({"macAddress": mac_x, "attachment": "branch", "trunkMacAddress": mac_a,
                   "vlanId": 410, "ipv4Addresses": ["10.0.41.20/24"]})
            .to_string(),
            vec!["already given to task", &id_a, "as its branch ENI"],
        ),
        (
            // a's branch as an exclusive ENI.
            eni_spec(&mac_a, &["10.0.1.23/24"], "exclusive").to_string(),
            vec!["already given to task", &id_a],
        ),
        (
            // a's branch MAC for a second branch.
            branch(&mac_a, &b.trunk, 403, "10.0.43.20/24", "10.0.43.1").to_string(),
            vec!["branch ENI", &mac_a, "already held by task", &id_a],
        ),
        (
            // A MAC a host interface has.
            branch(&primary.mac, &b.trunk, 403, "10.0.43.20/24", "10.0.43.1").to_string(),
            vec!["an interface with that MAC already exists on the host"],
        ),
        (
            with(at(403), "mtu", json!(9001)).to_string(),
            vec!["asks for MTU 9001", "at most its trunk's"],
        ),
        (
            // The host's uplink as a trunk.
            branch(&mac_x, &primary, 403, "10.0.43.20/24", "10.0.43.1").to_string(),
            vec!["trunk", "holds a default route of the host"],
        ),
        (
            // Taken on the trunk where the host cannot see it: the kernel says so, and the
            // setup is rolled back.
            at(405).to_string(),
            vec!["create VLAN 405 on trunk", "already in use on that trunk"],
        ),
        (
            branch(&mac_x, &e, 406, "10.0.46.20/24", "10.0.46.1").to_string(),
            vec![
                "trunk",
                &e.mac,
                "already given to task",
                &id_x,
                "as its exclusive ENI",
            ],
        ),
        (
            // The trunk as a shared ENI.
            shared(&b.trunk, &["10.0.1.31/24"]),
            vec![
                "already given to task",
                &id_a,
                "as the trunk of its branch ENI",
            ],
        ),
    ];
    let c = b.task();
    let before = snapshot(&b);
    let trunk_before = b.trunk_state();
    let links_a = link_names(&b.ns(a));
    for (spec, needles) in &cases {
        let out = b.setup(c, spec, "", None);
        must_fail_with(&out, needles);
        assert!(
            snapshot(&b) == before,
            "refusing {spec} changed the ledger, H's links or the pins"
        );
        assert_not_recorded(&b, c);
        assert_eq!(
            link_names(&b.ns(c)),
            ["lo"],
            "refusing {spec}: the task got links"
        );
        assert_eq!(
            b.trunk_state(),
            trunk_before,
            "refusing {spec}: the trunk changed"
        );
        assert_eq!(
            link_names(&b.ns(a)),
            links_a,
            "refusing {spec}: a's links changed"
        );
    }
    // a still works, and c with a sound request too.
    assert!(tcp_get(&b.ns(a), ip4("10.0.40.1"), 80, PATIENT).is_ok());
    b.vpc_vlan(404, &["10.0.44.1/24"]);
    let ok = branch(&mac_x, &b.trunk, 404, "10.0.44.20/24", "10.0.44.1");
    b.must_setup(c, &ok.to_string(), "", None);
    assert!(tcp_get(&b.ns(c), ip4("10.0.44.1"), 80, PATIENT).is_ok());
    must_succeed(&b.poststop(a), "poststop a");
    must_succeed(&b.poststop(c), "poststop c");
    must_succeed(&b.poststop(x), "poststop x");
    assert_eni_home(&b.host, &e, "after poststop x");
}

/// Whether this kernel can make a VLAN link (tried on a scratch veth in `ns`).
fn kernel_has_8021q(ns: &str, prefix: &str) -> bool {
    let (x, y) = (format!("{prefix}px"), format!("{prefix}py"));
    ip(&[
        "-n", ns, "link", "add", &x, "type", "veth", "peer", "name", &y,
    ]);
    let ok = Command::new("/usr/sbin/ip")
        .args([
            "-n",
            ns,
            "link",
            "add",
            "link",
            &x,
            "name",
            &format!("{prefix}pv"),
        ])
        .args(["type", "vlan", "id", "9"])
        .output()
        .expect("ip")
        .status
        .success();
    ip(&["-n", ns, "link", "del", &x]);
    ok
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_kernel_without_8021q_refuses_branch_enis_clearly_and_changes_nothing() {
    let mut b = Branches::new();
    let host = b.host.clone();
    assert!(
        !kernel_has_8021q(&host, &b.prefix),
        "this test needs a kernel without 802.1Q: this machine's 6.18 has none, and the VM lab \
         runs it with 8021q unloaded and module loading disabled (step branch_without_8021q)"
    );
    // The trunk down: setup raises it before creating the VLAN, and the rollback lowers it.
    ip(&["-n", &host, "link", "set", &b.trunk.name, "down"]);
    let trunk_before = b.trunk_state();
    let mac = b.branch_mac();
    let a = b.task();
    let before = snapshot(&b);
    let out = b.setup(
        a,
        &branch(&mac, &b.trunk, 105, "10.0.105.10/24", "10.0.105.1").to_string(),
        "",
        None,
    );
    must_fail_with(
        &out,
        &[
            &format!("create VLAN 105 on trunk {}", b.trunk.name),
            "this kernel has no 802.1Q VLAN support",
            "modprobe 8021q",
            "exclusive ENI",
        ],
    );
    assert!(
        snapshot(&b) == before,
        "the refusal changed the ledger, links or pins"
    );
    assert_eq!(b.trunk_state(), trunk_before, "the trunk was left changed");
    assert_eq!(link_names(&b.ns(a)), ["lo"], "the task got links");
    let out = command_in(&b.ns(a), "/usr/sbin/nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "nft left in the task"
    );
}

// ---------------------------------------------------------------------------------------------
// Crashes, ingress, the ECS shape
// ---------------------------------------------------------------------------------------------

/// The fault points of a branch setup (the shim under test must be built with
/// `--features fault-injection`).
fn setup_points() -> Vec<String> {
    let out = Command::new(SHIM)
        .arg("--version")
        .env("NETSHIM_FAULT", "list")
        .output()
        .expect("run shim");
    let pts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|p| p.starts_with("setup-") || p.starts_with("branch-"))
        .map(String::from)
        .collect();
    assert!(
        pts.iter().any(|p| p.starts_with("branch-")),
        "the shim under test has no branch fault points: build with --features fault-injection \
         ({pts:?})"
    );
    pts
}

fn killed(o: &Output) -> bool {
    matches!(o.status.signal(), Some(libc::SIGABRT) | Some(libc::SIGKILL))
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn a_branch_setup_killed_at_any_step_is_repaired_by_shim_gc() {
    let mut b = Branches::new();
    b.vpc_vlan(501, &["10.0.51.1/24"]);
    let trunk_before = b.trunk_state();
    let mac = b.branch_mac();
    let spec = branch(&mac, &b.trunk, 501, "10.0.51.10/24", "10.0.51.1").to_string();
    let pts = setup_points();
    for p in &pts {
        for alive in [false, true] {
            let when = format!(
                "killed at {p}, task {}",
                if alive { "alive" } else { "dead" }
            );
            let a = b.task();
            let st = b.oci_state(
                a,
                &[("netshim.network-mode", "awsvpc"), ("netshim.eni", &spec)],
            );
            let out = b.shim_env(&["hook", "createRuntime"], &st, &[("NETSHIM_FAULT", p)]);
            assert!(killed(&out), "{when}: not killed: {}", stderr(&out));
            if alive {
                must_succeed(&b.poststop(a), &format!("{when}: poststop"));
                assert_eq!(
                    link_names(&b.ns(a)),
                    ["lo"],
                    "{when}: the VLAN outlived poststop"
                );
            } else {
                b.containers[a].destroy();
                thread::sleep(Duration::from_millis(200));
            }
            must_succeed(&b.shim(&["gc"], ""), &format!("{when}: gc"));
            assert!(b.recorded().is_empty(), "{when}: {:?}", b.recorded());
            let fp = ledger_fingerprint(&b.state_dir());
            let left: Vec<String> = fp
                .iter()
                .filter(|(f, c)| {
                    f.starts_with("pending/")
                        || (f.starts_with("claims/")
                            && String::from_utf8_lossy(c)
                                .lines()
                                .any(|l| !l.starts_with('~')))
                })
                .map(|(f, _)| f.clone())
                .collect();
            assert_eq!(left, Vec::<String>::new(), "{when}: intents or claims left");
            assert_eq!(
                mounts_under(&b.state_dir()),
                Vec::<String>::new(),
                "{when}: task namespaces still pinned"
            );
            assert_eq!(
                link_by_mac(&b.host, &mac),
                None,
                "{when}: the branch is on the host"
            );
            assert_eq!(b.trunk_state(), trunk_before, "{when}: the trunk changed");
            // The same VLAN goes to the next task, and carries traffic.
            let n = b.task();
            b.must_setup(n, &spec, "", None);
            assert!(
                tcp_get(&b.ns(n), ip4("10.0.51.1"), 80, PATIENT).is_ok(),
                "{when}: the next task's branch carries nothing"
            );
            must_succeed(
                &b.poststop(n),
                &format!("{when}: poststop of the next task"),
            );
        }
    }
    eprintln!(
        "branch setups killed at {} points, each repaired by gc",
        pts.len()
    );
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn a_branch_teardown_killed_at_any_step_is_finished_by_shim_gc() {
    let mut b = Branches::new();
    b.vpc_vlan(502, &["10.0.52.1/24"]);
    let trunk_before = b.trunk_state();
    let mac = b.branch_mac();
    let spec = branch(&mac, &b.trunk, 502, "10.0.52.10/24", "10.0.52.1").to_string();
    let out = Command::new(SHIM)
        .arg("--version")
        .env("NETSHIM_FAULT", "list")
        .output()
        .expect("run shim");
    let pts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|p| p.starts_with("teardown-"))
        .map(String::from)
        .collect();
    assert!(
        !pts.is_empty(),
        "no teardown fault points: build with --features fault-injection"
    );
    for p in &pts {
        let when = format!("poststop killed at {p}");
        let a = b.task();
        b.must_setup(a, &spec, "", None);
        // Runtimes end the task and delete its netns before poststop; netshim's pin holds it.
        b.containers[a].destroy();
        let id = b.containers[a].id.clone();
        let out = b.shim_env(
            &["hook", "poststop"],
            &format!(r#"{{"ociVersion":"1.0.2","id":"{id}","status":"stopped"}}"#),
            &[("NETSHIM_FAULT", p)],
        );
        assert!(killed(&out), "{when}: not killed: {}", stderr(&out));
        must_succeed(&b.shim(&["gc"], ""), &format!("{when}: gc"));
        assert!(b.recorded().is_empty(), "{when}: {:?}", b.recorded());
        assert_eq!(
            mounts_under(&b.state_dir()),
            Vec::<String>::new(),
            "{when}: task namespaces still pinned"
        );
        assert_eq!(b.trunk_state(), trunk_before, "{when}: the trunk changed");
        // VLAN 502 is free again (the kernel would refuse it while the old one existed).
        let n = b.task();
        b.must_setup(n, &spec, "", None);
        assert!(
            tcp_get(&b.ns(n), ip4("10.0.52.1"), 80, PATIENT).is_ok(),
            "{when}: the next task's branch carries nothing"
        );
        must_succeed(
            &b.poststop(n),
            &format!("{when}: poststop of the next task"),
        );
    }
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn ingress_rules_and_the_metadata_block_apply_to_a_branch_task() {
    let mut b = Branches::new();
    b.vpc_vlan(601, &["10.0.61.1/24", "10.0.61.2/24"]);
    let mac = b.branch_mac();
    let a = b.task();
    let spec = branch(&mac, &b.trunk, 601, "10.0.61.10/24", "10.0.61.1");
    let ingress = r#"[{"protocol":"tcp","port":80,"cidr":"10.0.61.1/32"}]"#;
    b.must_setup(a, &spec.to_string(), "", Some(ingress));
    let ns = b.ns(a);
    tcp_server(&ns, 80, "port 80");
    tcp_server(&ns, 81, "port 81");
    let (v, task) = (b.net.ns.clone(), ipa("10.0.61.10"));
    assert_eq!(
        tcp_get_ip(&v, Some(ipa("10.0.61.1")), task, 80, PATIENT).unwrap(),
        "port 80"
    );
    assert!(
        tcp_get_ip(&v, Some(ipa("10.0.61.2")), task, 80, SHORT).is_err(),
        "10.0.61.2 is not in the rule's /32"
    );
    assert!(
        tcp_get_ip(&v, Some(ipa("10.0.61.1")), task, 81, SHORT).is_err(),
        "port 81 is in no rule"
    );
    // Metadata (V's 169.254.169.254, routed through the branch's gateway) is blocked; the
    // gateway itself answers.
    assert!(tcp_get(&ns, ip4("10.0.61.1"), 80, PATIENT).is_ok());
    assert!(
        tcp_get(&ns, AWS_METADATA, 80, SHORT).is_err(),
        "a branch task reached 169.254.169.254"
    );
    // Control: without the task's firewall both get through.
    must_succeed(
        &command_in(&ns, "/usr/sbin/nft")
            .args(["flush", "ruleset"])
            .output()
            .expect("nft"),
        "flush the task's ruleset",
    );
    assert!(tcp_get_ip(&v, Some(ipa("10.0.61.2")), task, 80, PATIENT).is_ok());
    assert!(tcp_get(&ns, AWS_METADATA, 80, PATIENT).is_ok());
    must_succeed(&b.poststop(a), "poststop");
}

#[test]
#[ignore = "needs 802.1Q: runs in the VM lab"]
fn an_ecs_shaped_dual_stack_branch_request_works() {
    let mut b = Branches::new();
    let gw6_ll = "fe80::1";
    b.vpc_vlan(
        701,
        &["10.0.71.1/24", "2001:db8:71::1/64", &format!("{gw6_ll}/64")],
    );
    let mac = b.branch_mac();
    let a = b.task();
    // As the ECS agent's task payload carries a branch ENI: the VLAN id as a string, the
    // trunk under interfaceVlanProperties, an IPv6 link-local gateway, DNS fields.
    let spec = json!({
        "macAddress": mac.to_ascii_uppercase(),
        "interfaceAssociationProtocol": "vlan",
        "interfaceVlanProperties": {
            "vlanId": "701",
            "trunkInterfaceMacAddress": b.trunk.mac.to_ascii_uppercase(),
        },
        "ipv4Addresses": ["10.0.71.10/24"],
        "ipv6Addresses": ["2001:db8:71::10/64"],
        "subnetGatewayIpv4Address": "10.0.71.1",
        "subnetGatewayIpv6Address": gw6_ll,
        "domainNameServers": ["10.0.0.2"],
        "domainNameSearchList": ["example.internal"],
        "privateDnsName": "ip-10-0-71-10.example.internal",
    });
    b.must_setup(a, &spec.to_string(), r#"[{"containerPort":80}]"#, None);
    assert_branch_task(&b, a, &mac, 701, "10.0.71.10/24", "10.0.71.1");
    let ns = b.ns(a);
    let a6 = global_addrs6(&ns, "eth0");
    assert_eq!(a6.len(), 1, "{a6:?}");
    assert_eq!(a6[0]["local"], "2001:db8:71::10", "{a6:?}");
    assert!(a6[0].get("tentative").is_none(), "tentative: {a6:?}");
    assert_eq!(
        default_route6(&ns),
        Some((gw6_ll.to_string(), "eth0".to_string())),
        "IPv6 default route"
    );
    let task6: Ipv6Addr = "2001:db8:71::10".parse().expect("v6");
    tcp_server_on(
        &ns,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80),
        "ecs branch",
    );
    assert_eq!(
        tcp_get(&b.net.ns, ip4("10.0.71.10"), 80, PATIENT).unwrap(),
        "ecs branch"
    );
    assert_eq!(
        tcp_get_ip(&b.net.ns, None, IpAddr::V6(task6), 80, PATIENT).unwrap(),
        "ecs branch",
        "no IPv6 over the branch"
    );
    must_succeed(&b.poststop(a), "poststop");
    assert_eq!(link_names(&ns), ["lo"]);
}
