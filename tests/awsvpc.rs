//! awsvpc mode against real namespaces: ENIs (veth ends standing in for attached interfaces) in a
//! private "host" namespace, a "VPC" namespace whose bridge is the subnet switch and gateway, peer
//! machines on that subnet, and a fake instance-metadata service on the host's loopback.
//! Needs root; each test builds its own VPC, so they run in parallel.

mod common;

use std::collections::HashMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(1500);
const PATIENT: Duration = Duration::from_secs(4);

/// The subnet gateway (the VPC router's address on the subnet switch).
const SUBNET_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// Other machines in the subnet.
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 50);
const PEER2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 51);
/// The metadata addresses tasks must not reach (AWS, Alibaba).
const AWS_METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// The gateway shared-ENI tasks route through.
const SHARED_TASK_GW: &str = "169.254.1.1";

macro_rules! root_only {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Exclusive ENIs
// ---------------------------------------------------------------------------------------------

#[test]
fn exclusive_enis_give_each_task_its_own_address_in_the_subnet() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let (e1, e2) = (vpc.attach_eni(), vpc.attach_eni());
    let (a, b) = (vpc.task(), vpc.task());
    let mut spec_a = eni_spec(&e1.mac, &["10.0.1.23/24"], "exclusive");
    spec_a["mtu"] = json!(9001);
    vpc.must_setup(
        a,
        &spec_a.to_string(),
        r#"[{"containerPort":80},{"containerPortRange":"8000-8001","protocol":"udp"}]"#,
        None,
    );
    vpc.must_setup(
        b,
        &exclusive(&e2, &["10.0.1.24/24"]),
        r#"[{"containerPort":80,"hostPort":80}]"#,
        None,
    );

    // Each ENI moved into its task as eth0 (same MAC), with the MTU, address and routes asked for.
    assert_exclusive_task(&vpc, a, &e1, "10.0.1.23/24", 9001);
    assert_exclusive_task(&vpc, b, &e2, "10.0.1.24/24", 1500);
    for e in [&e1, &e2] {
        assert_eq!(
            link_by_mac(&vpc.host, &e.mac),
            None,
            "{} still in the host",
            e.name
        );
    }

    // Both bind port 80, each on its own address, and the peer reaches each directly.
    tcp_server(&vpc.ns(a), 80, "task a");
    tcp_server(&vpc.ns(b), 80, "task b");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "task a"
    );
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.24"), 80, PATIENT).unwrap(),
        "task b"
    );
    // And a task reaches the peer (its own outbound path, no NAT through the host).
    tcp_server(&vpc.peer, 9000, "peer");
    assert_eq!(tcp_get(&vpc.ns(a), PEER_IP, 9000, PATIENT).unwrap(), "peer");

    // Load balancers register the task address and the container port.
    let ports = vpc.ports();
    assert_eq!(ports.len(), 4, "{ports:?}");
    for cp in [8000, 8001] {
        let p = port_entry(&ports, &vpc.containers[a].id, cp);
        assert_eq!(p["protocol"], "udp", "{p}");
        assert_eq!(p["targetIP"], "10.0.1.23", "{p}");
        assert_eq!(p["targetPort"], cp, "{p}");
    }
    for (i, addr) in [(a, "10.0.1.23"), (b, "10.0.1.24")] {
        let p = port_entry(&ports, &vpc.containers[i].id, 80);
        assert_eq!(p["networkMode"], "awsvpc", "{p}");
        assert_eq!(p["targetIP"], addr, "{p}");
        assert_eq!(p["targetPort"], 80, "{p}");
        assert_eq!(p["protocol"], "tcp", "{p}");
    }

    must_succeed(&vpc.poststop(a), "poststop a");
    must_succeed(&vpc.poststop(b), "poststop b");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
    assert!(vpc.ports().is_empty());
}

#[test]
fn poststop_hands_the_eni_back_with_its_name_even_after_the_task_netns_is_gone() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let (e1, e2) = (vpc.attach_eni(), vpc.attach_eni());
    let (a, b) = (vpc.task(), vpc.task());
    vpc.must_setup(a, &exclusive(&e1, &["10.0.1.23/24"]), "", None);
    vpc.must_setup(b, &exclusive(&e2, &["10.0.1.24/24"]), "", None);

    // a: a plain teardown while the task's namespace still exists.
    tcp_server(&vpc.ns(a), 80, "task a");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "task a"
    );
    must_succeed(&vpc.poststop(a), "poststop a");
    assert_eni_home(&vpc, &e1, "after poststop a");
    assert!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, SHORT).is_err(),
        "the task still answers after poststop"
    );
    must_succeed(&vpc.poststop(a), "poststop a again");
    assert_eni_home(&vpc, &e1, "after the second poststop a");

    // b: the runtime killed the process and deleted the namespace's name before poststop. netshim
    // holds the namespace (a bind mount under its state dir), so the veth ENI is not destroyed.
    assert!(
        !mounts_under(&vpc.state_dir()).is_empty(),
        "netshim holds no task namespace under {}",
        vpc.state_dir().display()
    );
    vpc.containers[b].destroy();
    thread::sleep(Duration::from_millis(500)); // namespace cleanup is asynchronous
    assert!(
        link(&vpc.vpc, &e2.vpc_end).is_some(),
        "the ENI (veth) was destroyed with the task's namespace: nothing held it until poststop"
    );
    must_succeed(&vpc.poststop(b), "poststop b after its netns was deleted");
    assert_eni_home(&vpc, &e2, "after poststop b");
    must_succeed(&vpc.poststop(b), "poststop b again");
    assert_eni_home(&vpc, &e2, "after the second poststop b");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
    assert_eq!(
        mounts_under(&vpc.state_dir()),
        Vec::<String>::new(),
        "poststop left the task namespaces mounted"
    );

    // The returned ENI can be given to the next task.
    let c = vpc.task();
    vpc.must_setup(c, &exclusive(&e2, &["10.0.1.24/24"]), "", None);
    tcp_server(&vpc.ns(c), 80, "task c");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.24"), 80, PATIENT).unwrap(),
        "task c"
    );
    must_succeed(&vpc.poststop(c), "poststop c");
    assert_eni_home(&vpc, &e2, "after poststop c");
}

#[test]
fn poststop_finds_an_eni_the_kernel_pushed_back_when_the_task_netns_was_lost() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    vpc.must_setup(a, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    // A crash or reboot: the namespace netshim kept is lost, and (as for a physical ENI when its
    // namespace dies) the interface is back in the host under some other name.
    let host = vpc.host.clone();
    ip(&[
        "-n",
        &vpc.ns(a),
        "link",
        "set",
        "eth0",
        "netns",
        &host,
        "name",
        "dev7",
    ]);
    for m in mounts_under(&vpc.state_dir()).iter().rev() {
        let c = std::ffi::CString::new(m.as_str()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) },
            0,
            "umount {m}"
        );
    }
    vpc.containers[a].destroy();
    must_succeed(&vpc.poststop(a), "poststop with the task netns lost");
    assert_eni_home(&vpc, &e, "after poststop");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
    must_succeed(&vpc.poststop(a), "poststop again");
}

#[test]
fn prestart_after_create_runtime_sets_up_once() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let (e1, e2) = (vpc.attach_eni(), vpc.attach_eni());
    let (a, b) = (vpc.task(), vpc.task());
    let specs = [
        (a, exclusive(&e1, &["10.0.1.23/24"])),
        (b, shared(&e2, &["10.0.1.31/24", "10.0.1.32/24"])),
    ];
    for (i, spec) in &specs {
        let st = vpc.oci_state(
            *i,
            &[("netshim.network-mode", "awsvpc"), ("netshim.eni", spec)],
        );
        must_succeed(&vpc.shim(&["hook", "createRuntime"], &st), "createRuntime");
        must_succeed(&vpc.shim(&["hook", "prestart"], &st), "prestart");
    }
    assert_exclusive_task(&vpc, a, &e1, "10.0.1.23/24", 1500);
    let ip_b = shared_task_ip(&vpc, b);
    // The second call took no second address: one is still free for another task.
    let c = vpc.task();
    vpc.must_setup(c, &specs[1].1, "", None);
    assert_ne!(shared_task_ip(&vpc, c), ip_b);
    tcp_server(&vpc.ns(a), 80, "once a");
    tcp_server(&vpc.ns(b), 80, "once b");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "once a"
    );
    assert_eq!(tcp_get(&vpc.peer, ip_b, 80, PATIENT).unwrap(), "once b");
    for i in [a, b, c] {
        must_succeed(&vpc.poststop(i), "poststop");
    }
    assert_eni_home(&vpc, &e1, "after poststop");
    assert_eq!(netshim_links(&vpc.host), Vec::<String>::new(), "links left");
}

#[test]
fn an_eni_attached_while_setup_waits_is_used() {
    root_only!();
    let mut vpc = Vpc::new(&[("eni_wait_seconds", "5")]);
    let e = vpc.next_eni();
    let a = vpc.task();
    let spec = exclusive(&e, &["10.0.1.23/24"]);
    let out = thread::scope(|s| {
        let setup = s.spawn(|| vpc.setup(a, &spec, "", None));
        thread::sleep(Duration::from_millis(700));
        vpc.plug(&e);
        setup.join().expect("setup thread")
    });
    must_succeed(&out, "setup with an ENI that shows up late");
    assert_exclusive_task(&vpc, a, &e, "10.0.1.23/24", 1500);
    tcp_server(&vpc.ns(a), 80, "late");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "late"
    );
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc, &e, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// Ingress rules and metadata
// ---------------------------------------------------------------------------------------------

#[test]
fn ingress_rules_admit_only_listed_sources_and_ports() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let p2 = vpc.add_peer(PEER2_IP);
    let e = vpc.attach_eni();
    let a = vpc.task();
    let ingress = r#"[{"protocol":"tcp","port":80,"cidr":"10.0.1.50/32"},{"protocol":"tcp","portRange":"8000-8010","cidr":"10.0.1.0/24"},{"protocol":"udp","port":53,"cidr":"10.0.1.0/24"}]"#;
    vpc.must_setup(
        a,
        &exclusive(&e, &["10.0.1.23/24"]),
        r#"[{"containerPort":80}]"#,
        Some(ingress),
    );
    let ns = vpc.ns(a);
    for port in [80, 81, 8005, 8011] {
        tcp_server(&ns, port, &format!("port {port}"));
    }
    let task = ip4("10.0.1.23");
    // Control: P2 is on the subnet and reachable.
    assert!(
        tcp_get(&p2, SUBNET_GW, 80, PATIENT).is_ok(),
        "P2 has no path"
    );

    assert_eq!(tcp_get(&vpc.peer, task, 80, PATIENT).unwrap(), "port 80");
    assert!(
        tcp_get(&p2, task, 80, SHORT).is_err(),
        "10.0.1.51 is not in the port 80 rule's cidr"
    );
    assert!(
        tcp_get(&vpc.peer, task, 81, SHORT).is_err(),
        "port 81 is in no rule"
    );
    assert_eq!(tcp_get(&p2, task, 8005, PATIENT).unwrap(), "port 8005");
    assert_eq!(
        tcp_get(&vpc.peer, task, 8005, PATIENT).unwrap(),
        "port 8005"
    );
    assert!(
        tcp_get(&vpc.peer, task, 8011, SHORT).is_err(),
        "8011 is outside portRange 8000-8010"
    );
    udp_server(&ns, 53, "udp 53");
    udp_server(&ns, 54, "udp 54");
    let u = udp_client(&vpc.peer, 5353);
    assert_eq!(udp_ask(&u, task, 53).unwrap(), "udp 53");
    assert!(udp_ask(&u, task, 54).is_err(), "udp 54 is in no rule");
    // Connections the task opens get their answers (only new inbound connections are filtered).
    tcp_server(&vpc.peer, 9000, "peer");
    assert_eq!(tcp_get(&ns, PEER_IP, 9000, PATIENT).unwrap(), "peer");
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc, &e, "after poststop");
}

#[test]
fn tasks_cannot_reach_instance_metadata_unless_allowed() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    vpc.must_setup(a, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    let ns = vpc.ns(a);
    // Control: the VPC router's own address answers the task, and the peer reaches metadata.
    assert!(
        tcp_get(&ns, SUBNET_GW, 80, PATIENT)
            .unwrap()
            .contains("vpc")
    );
    assert!(
        tcp_get(&vpc.peer, AWS_METADATA, 80, PATIENT)
            .unwrap()
            .contains("vpc")
    );
    assert!(
        tcp_get(&ns, AWS_METADATA, 80, SHORT).is_err(),
        "the task reached 169.254.169.254"
    );
    assert!(
        tcp_get(&ns, ALIBABA_METADATA, 80, SHORT).is_err(),
        "the task reached 100.100.100.200"
    );
    // The task's firewall is what stops it: without it the same connection goes through.
    must_succeed(
        &command_in(&ns, "/usr/sbin/nft")
            .args(["flush", "ruleset"])
            .output()
            .expect("nft"),
        "flush the task's ruleset",
    );
    assert!(
        tcp_get(&ns, AWS_METADATA, 80, PATIENT)
            .unwrap()
            .contains("vpc"),
        "the task cannot reach 169.254.169.254 even without its firewall: the rig is broken"
    );
    must_succeed(&vpc.poststop(a), "poststop");

    let mut open = Vpc::new(&[("allow_metadata_access", "true")]);
    let e = open.attach_eni();
    let b = open.task();
    open.must_setup(b, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    assert!(
        tcp_get(&open.ns(b), AWS_METADATA, 80, PATIENT)
            .unwrap()
            .contains("vpc"),
        "allow_metadata_access = true, yet the task cannot reach metadata"
    );
    must_succeed(&open.poststop(b), "poststop");
}

// ---------------------------------------------------------------------------------------------
// Shared ENIs
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_eni_hands_each_task_a_free_secondary_address() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let spec = shared(&e, &["10.0.1.31/24", "10.0.1.32/24"]);
    let maps = r#"[{"containerPort":80}]"#;
    let (a, b, c) = (vpc.task(), vpc.task(), vpc.task());
    vpc.must_setup(a, &spec, maps, None);
    vpc.must_setup(b, &spec, maps, None);
    let (ip_a, ip_b) = (shared_task_ip(&vpc, a), shared_task_ip(&vpc, b));
    assert_ne!(ip_a, ip_b, "two tasks got the same address");
    for ip in [ip_a, ip_b] {
        assert!(
            [ip4("10.0.1.31"), ip4("10.0.1.32")].contains(&ip),
            "{ip} is not one of the ENI's addresses"
        );
    }
    // The ENI stays in the host.
    assert_eq!(
        link_by_mac(&vpc.host, &e.mac).as_deref(),
        Some(e.name.as_str()),
        "the shared ENI left the host"
    );

    tcp_server(&vpc.ns(a), 80, "shared a");
    tcp_server(&vpc.ns(b), 80, "shared b");
    assert_eq!(tcp_get(&vpc.peer, ip_a, 80, PATIENT).unwrap(), "shared a");
    assert_eq!(tcp_get(&vpc.peer, ip_b, 80, PATIENT).unwrap(), "shared b");
    // Outbound from a shared task works (policy routing out of the ENI); metadata does not.
    tcp_server(&vpc.peer, 9000, "peer");
    assert_eq!(tcp_get(&vpc.ns(a), PEER_IP, 9000, PATIENT).unwrap(), "peer");
    assert!(
        tcp_get(&vpc.ns(a), AWS_METADATA, 80, SHORT).is_err(),
        "a shared-ENI task reached 169.254.169.254"
    );
    let ports = vpc.ports();
    for (i, ip) in [(a, ip_a), (b, ip_b)] {
        let p = port_entry(&ports, &vpc.containers[i].id, 80);
        assert_eq!(p["networkMode"], "awsvpc", "{p}");
        assert_eq!(p["targetIP"], ip.to_string(), "{p}");
        assert_eq!(p["targetPort"], 80, "{p}");
    }

    // No address left.
    let links_before = netshim_links(&vpc.host);
    must_fail_with(
        &vpc.setup(c, &spec, maps, None),
        &["no free secondary IP on ENI", &e.mac, "(2 of 2 in use)"],
    );
    assert_not_recorded(&vpc, c);
    assert_eq!(link_names(&vpc.ns(c)), ["lo"], "the refused task got links");
    assert_eq!(
        netshim_links(&vpc.host),
        links_before,
        "the refusal left links"
    );

    // A freed address goes to the next task.
    must_succeed(&vpc.poststop(a), "poststop a");
    vpc.must_setup(c, &spec, maps, None);
    assert_eq!(
        shared_task_ip(&vpc, c),
        ip_a,
        "c did not get a's freed address"
    );
    tcp_server(&vpc.ns(c), 80, "shared c");
    assert_eq!(tcp_get(&vpc.peer, ip_a, 80, PATIENT).unwrap(), "shared c");
    assert_eq!(tcp_get(&vpc.peer, ip_b, 80, PATIENT).unwrap(), "shared b");

    // Teardown leaves no veth, rule or route behind, also for a task whose netns is gone.
    must_succeed(&vpc.poststop(b), "poststop b");
    vpc.containers[c].destroy();
    must_succeed(&vpc.poststop(c), "poststop c after its netns was deleted");
    must_succeed(&vpc.poststop(c), "poststop c again");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
    assert_eq!(netshim_links(&vpc.host), Vec::<String>::new(), "links left");
    let rules = ip_text(&vpc.host, &["rule", "show"]);
    assert!(!rules.contains("10.0.1.3"), "rules left:\n{rules}");
    let routes = ip_text(&vpc.host, &["route", "show", "table", "all"]);
    assert!(!routes.contains("10.0.1.3"), "routes left:\n{routes}");
    assert_eq!(
        link_by_mac(&vpc.host, &e.mac).as_deref(),
        Some(e.name.as_str()),
        "the shared ENI is gone from the host"
    );
}

#[test]
fn concurrent_setups_on_a_shared_eni_never_hand_out_one_address_twice() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let spec = shared(&e, &["10.0.1.31/24", "10.0.1.32/24"]);
    let tasks = [vpc.task(), vpc.task(), vpc.task()];
    let outs: Vec<Output> = thread::scope(|s| {
        let hs: Vec<_> = tasks
            .iter()
            .map(|&i| {
                let (vpc, spec) = (&vpc, &spec);
                s.spawn(move || vpc.setup(i, spec, "", None))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("setup")).collect()
    });
    let ok: Vec<usize> = tasks
        .iter()
        .zip(&outs)
        .filter(|(_, o)| o.status.success())
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        ok.len(),
        2,
        "{:?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    for (&i, o) in tasks.iter().zip(&outs) {
        if !ok.contains(&i) {
            must_fail_with(o, &["(2 of 2 in use)"]);
            assert_not_recorded(&vpc, i);
        }
    }
    assert_ne!(shared_task_ip(&vpc, ok[0]), shared_task_ip(&vpc, ok[1]));
    for i in ok {
        must_succeed(&vpc.poststop(i), "poststop");
    }
    assert_eq!(netshim_links(&vpc.host), Vec::<String>::new(), "links left");
}

#[test]
fn mac_addresses_match_whatever_their_case() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    let upper = eni_spec(&e.mac.to_ascii_uppercase(), &["10.0.1.23/24"], "exclusive");
    vpc.must_setup(a, &upper.to_string(), "", None);
    assert_exclusive_task(&vpc, a, &e, "10.0.1.23/24", 1500);
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc, &e, "after poststop");
}

#[test]
fn an_eni_shared_by_tasks_is_not_moved_into_another_task() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let (a, b) = (vpc.task(), vpc.task());
    vpc.must_setup(a, &shared(&e, &["10.0.1.31/24"]), "", None);
    let id_a = vpc.containers[a].id.clone();
    must_fail_with(
        &vpc.setup(b, &exclusive(&e, &["10.0.1.23/24"]), "", None),
        &["already given to task", &id_a],
    );
    assert_not_recorded(&vpc, b);
    assert_eq!(link_names(&vpc.ns(b)), ["lo"]);
    tcp_server(&vpc.ns(a), 80, "still shared");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.31"), 80, PATIENT).unwrap(),
        "still shared"
    );
}

// ---------------------------------------------------------------------------------------------
// ENIs given by MAC alone: the rest comes from instance metadata
// ---------------------------------------------------------------------------------------------

#[test]
fn an_eni_given_by_mac_alone_is_completed_from_aws_instance_metadata() {
    root_only!();
    eni_from_metadata("aws", ip4("10.0.1.41"));
}

#[test]
fn an_eni_given_by_mac_alone_is_completed_from_alibaba_instance_metadata() {
    root_only!();
    eni_from_metadata("alibaba", ip4("10.0.1.42"));
}

fn eni_from_metadata(layout: &str, addr: Ipv4Addr) {
    let mut vpc = Vpc::new(&[("metadata_layout", &format!("\"{layout}\""))]);
    let e = vpc.attach_eni();
    vpc.meta.know(&e.mac, &[addr]);
    let a = vpc.task();
    vpc.must_setup(
        a,
        &json!({ "macAddress": e.mac }).to_string(),
        r#"[{"containerPort":80}]"#,
        None,
    );
    assert_exclusive_task(&vpc, a, &e, &format!("{addr}/24"), 1500);
    tcp_server(&vpc.ns(a), 80, layout);
    assert_eq!(tcp_get(&vpc.peer, addr, 80, PATIENT).unwrap(), layout);
    let p = port_entry(&vpc.ports(), &vpc.containers[a].id, 80);
    assert_eq!(p["targetIP"], addr.to_string(), "{p}");
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc, &e, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// Refusals: one line, non-zero exit, nothing changed or recorded
// ---------------------------------------------------------------------------------------------

#[test]
fn the_primary_interface_and_an_eni_already_given_are_refused() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let primary = vpc.primary();
    let e = vpc.attach_eni();
    let (a, b) = (vpc.task(), vpc.task());
    must_fail_with(
        &vpc.setup(a, &exclusive(&primary, &["10.0.1.23/24"]), "", None),
        &["default route"],
    );
    assert_not_recorded(&vpc, a);
    assert_eq!(link_names(&vpc.ns(a)), ["lo"]);
    let l = link(&vpc.host, &primary.name).expect("the primary interface left the host");
    assert!(
        flags(&l).contains(&"UP".to_string()),
        "primary is down: {l}"
    );
    assert_eq!(addrs(&vpc.host, &primary.name, "-4"), ["192.168.77.1/30"]);

    vpc.must_setup(a, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    let id_a = vpc.containers[a].id.clone();
    must_fail_with(
        &vpc.setup(b, &exclusive(&e, &["10.0.1.24/24"]), "", None),
        &["already given to task", &id_a],
    );
    assert_eq!(vpc.recorded(), [id_a]);
    assert_eq!(link_names(&vpc.ns(b)), ["lo"]);
    tcp_server(&vpc.ns(a), 80, "first");
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "first"
    );
}

#[test]
fn a_mac_that_never_appears_is_refused_after_the_configured_wait() {
    root_only!();
    let mut vpc = Vpc::new(&[("eni_wait_seconds", "1")]);
    let ghost = vpc.next_eni(); // never plugged in
    let a = vpc.task();
    let t = Instant::now();
    let out = vpc.setup(a, &exclusive(&ghost, &["10.0.1.23/24"]), "", None);
    let took = t.elapsed();
    must_fail_with(
        &out,
        &["no interface with MAC", &ghost.mac, "appeared within"],
    );
    assert!(took < Duration::from_secs(5), "the hook took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the hook gave up after {took:?}, before eni_wait_seconds = 1"
    );
    assert_not_recorded(&vpc, a);
    assert_eq!(link_names(&vpc.ns(a)), ["lo"]);
}

#[test]
fn malformed_or_inconsistent_requests_are_refused_and_change_nothing() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    let ok = exclusive(&e, &["10.0.1.23/24"]);
    let mut bad_attachment = eni_spec(&e.mac, &["10.0.1.23/24"], "exclusive");
    bad_attachment["attachment"] = json!("sideways");
    let cases: Vec<(String, &str, Option<&str>, &[&str])> = vec![
        (r#"{"macAddress": 5}"#.into(), "", None, &["netshim.eni"]),
        ("not json".into(), "", None, &["netshim.eni"]),
        (
            r#"{"ipv4Addresses":["10.0.1.23/24"]}"#.into(),
            "",
            None,
            &["netshim.eni"],
        ),
        (
            r#"{"macAddress":"not-a-mac"}"#.into(),
            "",
            None,
            &["netshim.eni"],
        ),
        (bad_attachment.to_string(), "", None, &["netshim.eni"]),
        (
            exclusive(&e, &["10.0.2.5/24"]),
            "",
            None,
            &["not in the subnet"],
        ),
        (
            ok.clone(),
            r#"[{"containerPort":80,"hostPort":8080}]"#,
            None,
            &["must be absent, 0 or equal"],
        ),
        (
            ok.clone(),
            "",
            Some(r#"[{"protocol":"icmp","port":1,"cidr":"x"}]"#),
            &["netshim.ingress"],
        ),
        (ok.clone(), "", Some("not json"), &["netshim.ingress"]),
    ];
    for (eni, maps, ingress, needles) in &cases {
        let out = vpc.setup(a, eni, maps, *ingress);
        must_fail_with(&out, needles);
        assert_untouched(
            &vpc,
            a,
            &e,
            &format!("after refusing {eni} / {maps} / {ingress:?}"),
        );
    }
    // A task whose process is gone.
    let st = vpc
        .oci_state(
            a,
            &[("netshim.network-mode", "awsvpc"), ("netshim.eni", &ok)],
        )
        .replace(
            &format!("\"pid\":{}", vpc.containers[a].pid()),
            "\"pid\":999999999",
        );
    must_fail_with(
        &vpc.shim(&["hook", "createRuntime"], &st),
        &["pid 999999999"],
    );
    assert_untouched(&vpc, a, &e, "after refusing a dead pid");
    // Control: the same task and ENI with a sound request work.
    vpc.must_setup(a, &ok, r#"[{"containerPort":80,"hostPort":0}]"#, None);
    must_succeed(&vpc.poststop(a), "poststop");
}

#[test]
fn a_mac_unknown_to_instance_metadata_is_refused() {
    root_only!();
    for layout in ["aws", "alibaba"] {
        let mut vpc = Vpc::new(&[("metadata_layout", &format!("\"{layout}\""))]);
        let e = vpc.attach_eni(); // attached, but the metadata service does not list it
        let a = vpc.task();
        let out = vpc.setup(a, &json!({ "macAddress": e.mac }).to_string(), "", None);
        must_fail_with(&out, &["instance metadata"]);
        assert_untouched(&vpc, a, &e, layout);
    }
}

#[test]
fn allowed_interfaces_limits_which_interfaces_may_be_given() {
    root_only!();
    let mut vpc = Vpc::new(&[]);
    let (e1, e2) = (vpc.attach_eni(), vpc.attach_eni());
    vpc.configure(&[("allowed_interfaces", &format!("[\"{}e1*\"]", vpc.prefix))]);
    let (a, b) = (vpc.task(), vpc.task());
    let out = vpc.setup(b, &exclusive(&e2, &["10.0.1.24/24"]), "", None);
    must_fail_with(&out, &[]);
    let err = stderr(&out);
    assert!(
        err.contains(&e2.name) || err.contains(&e2.mac),
        "the refusal names neither the interface nor its MAC: {err:?}"
    );
    assert_untouched(&vpc, b, &e2, "after refusing an interface not allowed");
    vpc.must_setup(a, &exclusive(&e1, &["10.0.1.23/24"]), "", None);
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc, &e1, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------------

/// The ENI is eth0 in task `i`: its MAC, `mtu`, `addr`, up; default route via the subnet gateway;
/// lo up.
fn assert_exclusive_task(vpc: &Vpc, i: usize, eni: &Eni, addr: &str, mtu: u64) {
    let ns = vpc.ns(i);
    let l = link(&ns, "eth0")
        .unwrap_or_else(|| panic!("task {i} has no eth0; its links: {:?}", link_names(&ns)));
    assert_eq!(l["address"], eni.mac.as_str(), "eth0 is not the ENI: {l}");
    assert_eq!(l["mtu"], mtu, "eth0 mtu: {l}");
    assert!(flags(&l).contains(&"UP".to_string()), "eth0 is down: {l}");
    assert_eq!(addrs(&ns, "eth0", "-4"), [addr], "eth0 addresses");
    assert_eq!(
        default_route(&ns),
        Some((SUBNET_GW.to_string(), "eth0".to_string())),
        "task default route"
    );
    let lo = link(&ns, "lo").expect("lo");
    assert!(
        flags(&lo).contains(&"UP".to_string()),
        "lo is down in the task"
    );
}

/// The task's address on a shared ENI: eth0 holds exactly one /32, default via 169.254.1.1.
fn shared_task_ip(vpc: &Vpc, i: usize) -> Ipv4Addr {
    let ns = vpc.ns(i);
    let a = addrs(&ns, "eth0", "-4");
    assert_eq!(a.len(), 1, "task {i} eth0 addresses: {a:?}");
    let (ip, len) = a[0].split_once('/').expect("cidr");
    assert_eq!(len, "32", "a shared-ENI task address is a /32: {a:?}");
    assert_eq!(
        default_route(&ns),
        Some((SHARED_TASK_GW.to_string(), "eth0".to_string())),
        "shared task default route"
    );
    ip4(ip)
}

/// The ENI is back in the host under its own name, with its MAC, down, with no address.
fn assert_eni_home(vpc: &Vpc, eni: &Eni, when: &str) {
    let l = link(&vpc.host, &eni.name).unwrap_or_else(|| {
        panic!(
            "{when}: {} is not in the host namespace (host links: {:?}; by MAC: {:?})",
            eni.name,
            link_names(&vpc.host),
            link_by_mac(&vpc.host, &eni.mac)
        )
    });
    assert_eq!(l["address"], eni.mac.as_str(), "{when}: MAC changed: {l}");
    assert!(
        !flags(&l).contains(&"UP".to_string()),
        "{when}: left up: {l}"
    );
    assert_eq!(
        addrs(&vpc.host, &eni.name, ""),
        Vec::<String>::new(),
        "{when}: addresses left on {}",
        eni.name
    );
}

/// A refused request left no trace: nothing recorded, the task has only lo and no firewall, the
/// ENI is where it was.
fn assert_untouched(vpc: &Vpc, i: usize, eni: &Eni, when: &str) {
    assert_not_recorded(vpc, i);
    let ns = vpc.ns(i);
    assert_eq!(link_names(&ns), ["lo"], "{when}: the task got links");
    let out = command_in(&ns, "/usr/sbin/nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "{when}: nft tables left in the task"
    );
    assert_eni_home(vpc, eni, when);
}

fn assert_not_recorded(vpc: &Vpc, i: usize) {
    let id = &vpc.containers[i].id;
    assert!(
        !vpc.recorded().contains(id),
        "{id} is recorded: {:?}",
        vpc.recorded()
    );
}

fn port_entry(ports: &[Value], id: &str, container_port: u16) -> Value {
    ports
        .iter()
        .find(|p| p["containerId"] == id && p["containerPort"] == container_port)
        .unwrap_or_else(|| panic!("no port {container_port} of {id} in {ports:?}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// The rig: host H (from common::Rig, with a default route over its link to the client), a VPC
// namespace V whose bridge is the subnet switch, peers on it, veth "ENIs" and fake metadata.
// ---------------------------------------------------------------------------------------------

/// An interface standing in for an ENI: a veth whose host end is `name` (in H) with `mac`, and
/// whose other end `vpc_end` is a port of the subnet switch in V.
#[derive(Clone, Debug)]
struct Eni {
    name: String,
    mac: String,
    vpc_end: String,
}

struct Vpc {
    rig: Rig,
    /// The VPC namespace (V).
    vpc: String,
    /// The subnet switch in V.
    switch: String,
    /// The first peer machine (10.0.1.50).
    peer: String,
    peers: usize,
    enis: u8,
    mac_base: [u8; 2],
    meta: Metadata,
}

impl Deref for Vpc {
    type Target = Rig;
    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl DerefMut for Vpc {
    fn deref_mut(&mut self) -> &mut Rig {
        &mut self.rig
    }
}

impl Vpc {
    /// A rig with `[awsvpc]` config: the fake metadata endpoint, layout "aws", eni_wait_seconds 1,
    /// then `overrides` (key, TOML value).
    fn new(overrides: &[(&str, &str)]) -> Vpc {
        let mut rig = Rig::new("");
        let p = rig.prefix.clone();
        let host = rig.host.clone();
        // The host's primary interface: its link to the client, holding the default route.
        ip(&[
            "-n",
            &host,
            "route",
            "add",
            "default",
            "via",
            &CLIENT_IP.to_string(),
        ]);

        let vpc = format!("{p}vpc");
        ip(&["netns", "add", &vpc]);
        rig.extra_ns.push(vpc.clone());
        ip(&["-n", &vpc, "link", "set", "lo", "up"]);
        let mut h = DefaultHasher::new();
        p.hash(&mut h);
        let hv = h.finish().to_be_bytes();
        let mac_base = [hv[0], hv[1]];
        let switch = format!("{p}sw");
        ip(&["-n", &vpc, "link", "add", &switch, "type", "bridge"]);
        let switch_mac = format!("02:00:{:02x}:{:02x}:ff:fe", mac_base[0], mac_base[1]);
        ip(&["-n", &vpc, "link", "set", &switch, "address", &switch_mac]);
        for a in [
            format!("{SUBNET_GW}/24"),
            format!("{AWS_METADATA}/32"),
            format!("{ALIBABA_METADATA}/32"),
        ] {
            ip(&["-n", &vpc, "addr", "add", &a, "dev", &switch]);
        }
        ip(&["-n", &vpc, "link", "set", &switch, "up"]);
        // The metadata service in the VPC (and the router's own web page): answers on port 80.
        tcp_server(
            &vpc,
            80,
            "HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\nvpc metadata\n",
        );

        let layout = match overrides.iter().find(|(k, _)| *k == "metadata_layout") {
            Some((_, v)) if v.contains("alibaba") => Layout::Alibaba,
            _ => Layout::Aws,
        };
        let meta = metadata_server(&host, layout);
        let mut v = Vpc {
            rig,
            vpc,
            switch,
            peer: String::new(),
            peers: 0,
            enis: 0,
            mac_base,
            meta,
        };
        v.configure(overrides);
        v.peer = v.add_peer(PEER_IP);
        v
    }

    /// Rewrites the config: the defaults of `new`, then `overrides`.
    fn configure(&self, overrides: &[(&str, &str)]) {
        let mut keys: Vec<(String, String)> = vec![
            (
                "metadata_endpoint".into(),
                format!("\"http://127.0.0.1:{}\"", self.meta.port),
            ),
            ("metadata_layout".into(), "\"aws\"".into()),
            ("eni_wait_seconds".into(), "1".into()),
        ];
        for (k, v) in overrides {
            match keys.iter_mut().find(|(key, _)| key == k) {
                Some(kv) => kv.1 = v.to_string(),
                None => keys.push((k.to_string(), v.to_string())),
            }
        }
        let mut text = String::from("[awsvpc]\n");
        for (k, v) in keys {
            text.push_str(&format!("{k} = {v}\n"));
        }
        fs::write(self.config_path(), text).expect("config");
    }

    /// Another machine on the subnet at `addr`/24 (default route via the subnet gateway).
    fn add_peer(&mut self, addr: Ipv4Addr) -> String {
        let n = self.peers;
        self.peers += 1;
        let p = self.prefix.clone();
        let ns = format!("{p}p{n}");
        ip(&["netns", "add", &ns]);
        self.rig.extra_ns.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let (port, inside) = (format!("{p}g{n}"), format!("{p}q{n}"));
        ip(&[
            "-n", &self.vpc, "link", "add", &port, "type", "veth", "peer", "name", &inside,
            "netns", &ns,
        ]);
        ip(&[
            "-n",
            &self.vpc,
            "link",
            "set",
            &port,
            "master",
            &self.switch,
        ]);
        ip(&["-n", &self.vpc, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inside,
        ]);
        ip(&["-n", &ns, "link", "set", &inside, "up"]);
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &SUBNET_GW.to_string(),
        ]);
        ns
    }

    /// Names and a MAC for the next ENI, without attaching it.
    fn next_eni(&mut self) -> Eni {
        self.enis += 1;
        let n = self.enis;
        let p = &self.rig.prefix;
        Eni {
            name: format!("{p}e{n}"),
            mac: format!(
                "02:00:{:02x}:{:02x}:00:{n:02x}",
                self.mac_base[0], self.mac_base[1]
            ),
            vpc_end: format!("{p}f{n}"),
        }
    }

    /// Attaches `eni` to the host: its end in H down with no address, the other on the switch.
    fn plug(&self, eni: &Eni) {
        let host = &self.rig.host;
        ip(&[
            "-n",
            &self.vpc,
            "link",
            "add",
            &eni.vpc_end,
            "type",
            "veth",
            "peer",
            "name",
            &eni.name,
            "netns",
            host,
        ]);
        ip(&[
            "-n", host, "link", "set", "dev", &eni.name, "address", &eni.mac,
        ]);
        ip(&[
            "-n",
            &self.vpc,
            "link",
            "set",
            &eni.vpc_end,
            "master",
            &self.switch,
        ]);
        ip(&["-n", &self.vpc, "link", "set", &eni.vpc_end, "up"]);
    }

    fn attach_eni(&mut self) -> Eni {
        let e = self.next_eni();
        self.plug(&e);
        e
    }

    /// H's primary interface (the one holding the default route) as an ENI.
    fn primary(&self) -> Eni {
        let name = format!("{}a", self.prefix);
        let l = link(&self.host, &name).expect("primary link");
        Eni {
            mac: l["address"].as_str().expect("mac").to_string(),
            vpc_end: String::new(),
            name,
        }
    }

    /// A new task: a container namespace with a process in it.
    fn task(&mut self) -> usize {
        self.rig.container()
    }

    fn ns(&self, i: usize) -> String {
        self.containers[i].ns.clone()
    }

    /// createRuntime for task `i` in awsvpc mode (`mappings` "" = no annotation).
    fn setup(&self, i: usize, eni: &str, mappings: &str, ingress: Option<&str>) -> Output {
        let mut ann = vec![("netshim.network-mode", "awsvpc"), ("netshim.eni", eni)];
        if !mappings.is_empty() {
            ann.push(("netshim.port-mappings", mappings));
        }
        if let Some(g) = ingress {
            ann.push(("netshim.ingress", g));
        }
        self.shim(&["hook", "createRuntime"], &self.oci_state(i, &ann))
    }

    fn must_setup(&self, i: usize, eni: &str, mappings: &str, ingress: Option<&str>) {
        let out = self.setup(i, eni, mappings, ingress);
        assert!(
            out.status.success(),
            "setup of task {i} with {eni}: {} (metadata requests: {:?})",
            stderr(&out),
            self.meta.requests()
        );
    }
}

impl Drop for Vpc {
    /// Task namespaces netshim still holds (a failed test skipped poststop) are unmounted so the
    /// state dir can go; `Rig`'s drop then removes the namespaces and the directory.
    fn drop(&mut self) {
        for m in mounts_under(&self.rig.dir).iter().rev() {
            if let Ok(c) = std::ffi::CString::new(m.as_str()) {
                // SAFETY: a valid NUL-terminated path; MNT_DETACH has no other preconditions.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 address")
}

/// An ENI spec with everything given.
fn eni_spec(mac: &str, ips: &[&str], attachment: &str) -> Value {
    json!({
        "macAddress": mac,
        "ipv4Addresses": ips,
        "ipv6Addresses": [],
        "subnetGatewayIpv4Address": SUBNET_GW.to_string(),
        "mtu": 1500,
        "attachment": attachment,
    })
}

fn exclusive(eni: &Eni, ips: &[&str]) -> String {
    eni_spec(&eni.mac, ips, "exclusive").to_string()
}

fn shared(eni: &Eni, ips: &[&str]) -> String {
    eni_spec(&eni.mac, ips, "shared").to_string()
}

// --- reading the kernel's view with `ip -j` ---

/// `ip -j -n ns args...` parsed; None when ip fails (no such device, no such namespace).
fn ip_json(ns: &str, args: &[&str]) -> Option<Value> {
    let out = Command::new("/usr/sbin/ip")
        .args(["-j", "-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn ip_text(ns: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/sbin/ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn link(ns: &str, name: &str) -> Option<Value> {
    ip_json(ns, &["link", "show", "dev", name]).and_then(|v| v.get(0).cloned())
}

fn links(ns: &str) -> Vec<Value> {
    ip_json(ns, &["link", "show"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn link_names(ns: &str) -> Vec<String> {
    links(ns)
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect()
}

fn link_by_mac(ns: &str, mac: &str) -> Option<String> {
    links(ns)
        .iter()
        .find(|l| {
            l["address"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case(mac))
        })
        .and_then(|l| l["ifname"].as_str().map(String::from))
}

/// Links in `ns` named like netshim's own (nsa…, nse…, nsh…); the rig's are nsi….
fn netshim_links(ns: &str) -> Vec<String> {
    link_names(ns)
        .into_iter()
        .filter(|n| ["nsa", "nse", "nsh"].iter().any(|p| n.starts_with(p)))
        .collect()
}

fn flags(l: &Value) -> Vec<String> {
    l["flags"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Addresses on `dev` as "addr/len"; `family` "-4", "-6" or "" for both.
fn addrs(ns: &str, dev: &str, family: &str) -> Vec<String> {
    let mut args = vec![];
    if !family.is_empty() {
        args.push(family);
    }
    args.extend(["addr", "show", "dev", dev]);
    ip_json(ns, &args)
        .and_then(|v| v.get(0).cloned())
        .and_then(|l| l["addr_info"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

/// The IPv4 default route as (gateway, dev).
fn default_route(ns: &str) -> Option<(String, String)> {
    let r = ip_json(ns, &["-4", "route", "show", "default"])?;
    let r = r.get(0)?;
    Some((r["gateway"].as_str()?.into(), r["dev"].as_str()?.into()))
}

/// Mount points at or under `dir` (in this process's mount namespace, which the shim shares).
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(String::from)
        .collect()
}

// --- fake instance metadata, on 127.0.0.1 inside H ---

#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    Aws,
    Alibaba,
}

const TOKEN: &str = "netshim-test-token";
const MACS_PATH: &str = "/latest/meta-data/network/interfaces/macs/";

/// The fake metadata service: which MACs it knows (with their IPv4 addresses), and a log of the
/// requests it answered ("METHOD path -> status"), for failure messages.
struct Metadata {
    port: u16,
    known: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Metadata {
    fn know(&self, mac: &str, ips: &[Ipv4Addr]) {
        self.known
            .lock()
            .unwrap()
            .insert(mac.to_ascii_lowercase(), ips.to_vec());
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Starts the metadata service on 127.0.0.1:<any> in netns `ns`; a thread per connection.
fn metadata_server(ns: &str, layout: Layout) -> Metadata {
    let l = in_ns(ns, || {
        TcpListener::bind(("127.0.0.1", 0)).expect("bind metadata")
    });
    let m = Metadata {
        port: l.local_addr().expect("local addr").port(),
        known: Arc::default(),
        log: Arc::default(),
    };
    let (known, log) = (m.known.clone(), m.log.clone());
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (known, log) = (known.clone(), log.clone());
            thread::spawn(move || serve_metadata(s, layout, &known, &log));
        }
    });
    m
}

struct HttpRequest {
    method: String,
    path: String,
    version: String,
    /// Lower-cased names.
    headers: HashMap<String, String>,
}

impl HttpRequest {
    fn keep_alive(&self) -> bool {
        let conn = self
            .headers
            .get("connection")
            .map(|c| c.to_ascii_lowercase())
            .unwrap_or_default();
        if self.version == "HTTP/1.0" {
            conn == "keep-alive"
        } else {
            conn != "close"
        }
    }
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve_metadata(
    s: TcpStream,
    layout: Layout,
    known: &Mutex<HashMap<String, Vec<Ipv4Addr>>>,
    log: &Mutex<Vec<String>>,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(r) = s.try_clone() else { return };
    let mut r = BufReader::new(r);
    let mut w = s;
    while let Some(req) = read_request(&mut r) {
        let (code, body) = metadata_answer(layout, &req, &known.lock().unwrap());
        log.lock()
            .unwrap()
            .push(format!("{} {} -> {code}", req.method, req.path));
        let keep = req.keep_alive();
        let reason = match code {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            405 => "Method Not Allowed",
            _ => "Not Found",
        };
        let head = format!(
            "{} {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
            req.version,
            body.len(),
            if keep { "keep-alive" } else { "close" }
        );
        if w.write_all(head.as_bytes()).is_err() || w.write_all(body.as_bytes()).is_err() {
            return;
        }
        if !keep {
            return;
        }
    }
}

fn read_request(r: &mut impl BufRead) -> Option<HttpRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let version = parts.next().unwrap_or("HTTP/1.0").to_string();
    // Origin form, or absolute form (http://host/path).
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(HttpRequest {
        method,
        path,
        version,
        headers,
    })
}

/// (status, body) for one request. AWS is IMDSv2: a token from `PUT /latest/api/token` (which
/// needs the TTL header) is required on every GET. Alibaba needs no token.
fn metadata_answer(
    layout: Layout,
    req: &HttpRequest,
    known: &HashMap<String, Vec<Ipv4Addr>>,
) -> (u16, String) {
    if req.path == "/latest/api/token" {
        if req.method != "PUT" {
            return (405, String::new());
        }
        let ttl = match layout {
            Layout::Aws => "x-aws-ec2-metadata-token-ttl-seconds",
            Layout::Alibaba => "x-aliyun-ecs-metadata-token-ttl-seconds",
        };
        if layout == Layout::Aws && !req.headers.contains_key(ttl) {
            return (400, format!("missing {ttl}"));
        }
        return (200, TOKEN.into());
    }
    if req.method != "GET" {
        return (405, String::new());
    }
    if layout == Layout::Aws
        && req
            .headers
            .get("x-aws-ec2-metadata-token")
            .map(String::as_str)
            != Some(TOKEN)
    {
        return (401, String::new());
    }
    let Some(rest) = req.path.strip_prefix(MACS_PATH) else {
        return (404, String::new());
    };
    if rest.is_empty() {
        let macs: Vec<String> = known.keys().map(|m| format!("{m}/")).collect();
        return (200, macs.join("\n"));
    }
    let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
    let mac = mac.to_ascii_lowercase();
    let Some(ips) = known.get(&mac) else {
        return (404, String::new());
    };
    let ips_s: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    let id = format!("eni-{}", mac.replace(':', ""));
    let ok = |b: String| (200, b);
    match (layout, key.trim_end_matches('/')) {
        (Layout::Aws, "") => ok(
            "device-number\ninterface-id\nlocal-ipv4s\nmac\nsubnet-id\nsubnet-ipv4-cidr-block\nvpc-ipv4-cidr-block"
                .into(),
        ),
        (Layout::Alibaba, "") => ok(
            "gateway\nmac\nnetmask\nnetwork-interface-id\nprimary-ip-address\nprivate-ipv4s\nvpc-cidr-block\nvswitch-cidr-block"
                .into(),
        ),
        (_, "mac") => ok(mac.clone()),
        (Layout::Aws, "local-ipv4s") => ok(ips_s.join("\n")),
        (Layout::Aws, "subnet-ipv4-cidr-block") => ok("10.0.1.0/24".into()),
        (Layout::Aws, "vpc-ipv4-cidr-block") => ok("10.0.0.0/16".into()),
        (Layout::Aws, "interface-id") => ok(id),
        (Layout::Aws, "device-number") => ok("1".into()),
        (Layout::Aws, "subnet-id") => ok("subnet-0123456789abcdef0".into()),
        (Layout::Alibaba, "private-ipv4s") => ok(serde_json::to_string(&ips_s).unwrap()),
        (Layout::Alibaba, "primary-ip-address") => ok(ips_s.first().cloned().unwrap_or_default()),
        (Layout::Alibaba, "netmask") => ok("255.255.255.0".into()),
        (Layout::Alibaba, "gateway") => ok(SUBNET_GW.to_string()),
        (Layout::Alibaba, "vswitch-cidr-block") => ok("10.0.1.0/24".into()),
        (Layout::Alibaba, "vpc-cidr-block") => ok("10.0.0.0/16".into()),
        (Layout::Alibaba, "network-interface-id") => ok(id),
        _ => (404, String::new()), // ipv6s among them: these ENIs have no IPv6 address
    }
}
