//! awsvpc mode against real namespaces: ENIs (veth ends standing in for attached interfaces) in a
//! private "host" namespace, a "VPC" namespace whose bridge is the subnet switch and gateway, peer
//! machines on that subnet, and a fake instance-metadata service on the host's loopback.
//! Needs root; each test builds its own VPC (`common::vpc::Vpc`), so they run in parallel.

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use common::vpc::*;
use common::*;
use serde_json::{Value, json};

/// The gateway shared-ENI tasks route through.
const SHARED_TASK_GW: &str = "169.254.1.1";

// ---------------------------------------------------------------------------------------------
// Exclusive ENIs
// ---------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn exclusive_enis_give_each_task_its_own_address_in_the_subnet() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn poststop_hands_the_eni_back_with_its_name_even_after_the_task_netns_is_gone() {
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
    assert_eni_home(&vpc.host, &e1, "after poststop a");
    assert!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, SHORT).is_err(),
        "the task still answers after poststop"
    );
    must_succeed(&vpc.poststop(a), "poststop a again");
    assert_eni_home(&vpc.host, &e1, "after the second poststop a");

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
        link(&vpc.net.ns, &e2.vpc_end).is_some(),
        "the ENI (veth) was destroyed with the task's namespace: nothing held it until poststop"
    );
    must_succeed(&vpc.poststop(b), "poststop b after its netns was deleted");
    assert_eni_home(&vpc.host, &e2, "after poststop b");
    must_succeed(&vpc.poststop(b), "poststop b again");
    assert_eni_home(&vpc.host, &e2, "after the second poststop b");
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
    assert_eni_home(&vpc.host, &e2, "after poststop c");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn poststop_finds_an_eni_the_kernel_pushed_back_when_the_task_netns_was_lost() {
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
    assert_eni_home(&vpc.host, &e, "after poststop");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
    must_succeed(&vpc.poststop(a), "poststop again");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn prestart_after_create_runtime_sets_up_once() {
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
    assert_eni_home(&vpc.host, &e1, "after poststop");
    assert_eq!(netshim_links(&vpc.host), Vec::<String>::new(), "links left");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn an_eni_attached_while_setup_waits_is_used() {
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
    assert_eni_home(&vpc.host, &e, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// Ingress rules and metadata
// ---------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn ingress_rules_admit_only_listed_sources_and_ports() {
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
    assert_eni_home(&vpc.host, &e, "after poststop");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn tasks_cannot_reach_instance_metadata_unless_allowed() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn shared_eni_hands_each_task_a_free_secondary_address() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn concurrent_setups_on_a_shared_eni_never_hand_out_one_address_twice() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn mac_addresses_match_whatever_their_case() {
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    let upper = eni_spec(&e.mac.to_ascii_uppercase(), &["10.0.1.23/24"], "exclusive");
    vpc.must_setup(a, &upper.to_string(), "", None);
    assert_exclusive_task(&vpc, a, &e, "10.0.1.23/24", 1500);
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc.host, &e, "after poststop");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn an_eni_shared_by_tasks_is_not_moved_into_another_task() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn an_eni_given_by_mac_alone_is_completed_from_aws_instance_metadata() {
    eni_from_metadata("aws", ip4("10.0.1.41"));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn an_eni_given_by_mac_alone_is_completed_from_alibaba_instance_metadata() {
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
    assert_eni_home(&vpc.host, &e, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// Refusals: one line, non-zero exit, nothing changed or recorded
// ---------------------------------------------------------------------------------------------

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn the_primary_interface_and_an_eni_already_given_are_refused() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_mac_that_never_appears_is_refused_after_the_configured_wait() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn malformed_or_inconsistent_requests_are_refused_and_change_nothing() {
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
        (
            json!({"macAddress": e.mac, "ipv6Addresses": ["2001:db8:1::23/64"], "mtu": 1200})
                .to_string(),
            "",
            None,
            &["mtu 1200 is below 1280, the least IPv6 allows"],
        ),
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_mac_unknown_to_instance_metadata_is_refused() {
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
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn allowed_interfaces_limits_which_interfaces_may_be_given() {
    let mut vpc = Vpc::new(&[]);
    let (e1, e2) = (vpc.attach_eni(), vpc.attach_eni());
    vpc.configure(&[("allowed_interfaces", &format!("[\"{}e1*\"]", vpc.prefix))]);
    let (a, b) = (vpc.task(), vpc.task());
    let out = vpc.setup(b, &exclusive(&e2, &["10.0.1.24/24"]), "", None);
    must_fail_with(&out, &[]);
    let err = stderr(&out);
    let lower = err.to_lowercase();
    assert!(
        lower.contains(&e2.name.to_lowercase())
            && lower.contains(&e2.mac.to_lowercase())
            && err.contains("not in awsvpc.allowed_interfaces"),
        "the refusal names the interface, its MAC and why: {err:?}"
    );
    assert_untouched(&vpc, b, &e2, "after refusing an interface not allowed");
    vpc.must_setup(a, &exclusive(&e1, &["10.0.1.23/24"]), "", None);
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc.host, &e1, "after poststop");
}

// ---------------------------------------------------------------------------------------------
// IPv6: IPv6-only and dual-stack exclusive ENIs (the VPC router on 2001:db8:1::1/64)
// ---------------------------------------------------------------------------------------------

const TASK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x23);

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// Task `i`'s eth0 holds exactly `TASK6`/64, not tentative (no duplicate address detection),
/// and its IPv6 default route is via the subnet's IPv6 gateway on eth0.
fn assert_ipv6_task(vpc: &Vpc, i: usize, eni: &Eni) {
    let ns = vpc.ns(i);
    let l = link(&ns, "eth0").expect("eth0");
    assert_eq!(l["address"], eni.mac.as_str(), "eth0 is not the ENI: {l}");
    let a = global_addrs6(&ns, "eth0");
    assert_eq!(a.len(), 1, "eth0 global IPv6 addresses: {a:?}");
    assert_eq!(a[0]["local"], TASK6.to_string(), "{a:?}");
    assert_eq!(a[0]["prefixlen"], 64, "{a:?}");
    for flag in ["tentative", "dadfailed"] {
        assert!(a[0].get(flag).is_none(), "{TASK6} is {flag}: {a:?}");
    }
    assert_eq!(
        default_route6(&ns),
        Some((SUBNET_GW6.to_string(), "eth0".to_string())),
        "task IPv6 default route"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn an_ipv6_only_exclusive_eni_is_usable_at_once_through_its_ipv6_gateway() {
    let mut vpc = Vpc::new(&[]);
    vpc.net.enable_ipv6();
    let e = vpc.attach_eni();
    let a = vpc.task();
    let spec = eni_spec_dual(&e.mac, &[], &[&format!("{TASK6}/64")], "exclusive");
    vpc.must_setup(a, &spec.to_string(), r#"[{"containerPort":80}]"#, None);
    let ns = vpc.ns(a);
    // Bound the moment setup returns: an address still in DAD could not be bound.
    tcp_server_on(&ns, SocketAddr::new(v6(TASK6), 80), "task v6");
    assert_ipv6_task(&vpc, a, &e);
    assert_eq!(
        addrs(&ns, "eth0", "-4"),
        Vec::<String>::new(),
        "IPv4 on eth0"
    );
    assert_eq!(
        default_route(&ns),
        None,
        "an IPv4 default route without IPv4"
    );
    // Real TCP both ways over IPv6: the VPC router reaches the task, the task its gateway.
    assert_eq!(
        tcp_get_ip(&vpc.net.ns, None, v6(TASK6), 80, PATIENT).unwrap(),
        "task v6"
    );
    assert_eq!(
        tcp_get_ip(&ns, None, v6(SUBNET_GW6), 80, PATIENT).unwrap(),
        format!("vpc6 {SUBNET_GW6}")
    );
    // Load balancers register the task's IPv6 address and the container port.
    let p = port_entry(&vpc.ports(), &vpc.containers[a].id, 80);
    assert_eq!(p["targetIP"], TASK6.to_string(), "{p}");
    assert_eq!(p["targetPort"], 80, "{p}");
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc.host, &e, "after poststop");
    assert!(vpc.recorded().is_empty(), "{:?}", vpc.recorded());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_dual_stack_exclusive_eni_carries_ipv4_and_ipv6() {
    let mut vpc = Vpc::new(&[]);
    vpc.net.enable_ipv6();
    let e = vpc.attach_eni();
    let a = vpc.task();
    let spec = eni_spec_dual(
        &e.mac,
        &["10.0.1.23/24"],
        &[&format!("{TASK6}/64")],
        "exclusive",
    );
    vpc.must_setup(a, &spec.to_string(), r#"[{"containerPort":80}]"#, None);
    let ns = vpc.ns(a);
    // [::] takes both families.
    tcp_server_on(&ns, SocketAddr::new(v6(Ipv6Addr::UNSPECIFIED), 80), "dual");
    assert_exclusive_task(&vpc, a, &e, "10.0.1.23/24", 1500);
    assert_ipv6_task(&vpc, a, &e);
    assert_eq!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 80, PATIENT).unwrap(),
        "dual"
    );
    assert_eq!(
        tcp_get_ip(&vpc.net.ns, None, v6(TASK6), 80, PATIENT).unwrap(),
        "dual"
    );
    assert!(
        tcp_get(&ns, SUBNET_GW, 80, PATIENT)
            .unwrap()
            .contains("vpc")
    );
    assert_eq!(
        tcp_get_ip(&ns, None, v6(SUBNET_GW6), 80, PATIENT).unwrap(),
        format!("vpc6 {SUBNET_GW6}")
    );
    // The IPv4 address stays the load-balancer target of a dual-stack task.
    let p = port_entry(&vpc.ports(), &vpc.containers[a].id, 80);
    assert_eq!(p["targetIP"], "10.0.1.23", "{p}");
    must_succeed(&vpc.poststop(a), "poststop");
    assert_eni_home(&vpc.host, &e, "after poststop");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn ingress_rules_admit_only_listed_ipv6_sources() {
    let mut vpc = Vpc::new(&[]);
    vpc.net.enable_ipv6();
    let e = vpc.attach_eni();
    let a = vpc.task();
    let spec = eni_spec_dual(
        &e.mac,
        &["10.0.1.23/24"],
        &[&format!("{TASK6}/64")],
        "exclusive",
    );
    let ingress = format!(
        r#"[{{"protocol":"tcp","port":80,"cidr":"{SUBNET_GW6}/128"}},{{"protocol":"tcp","port":8000,"cidr":"2001:db8:1::/64"}}]"#
    );
    vpc.must_setup(a, &spec.to_string(), "", Some(&ingress));
    let ns = vpc.ns(a);
    for port in [80, 8000, 8001] {
        tcp_server_on(
            &ns,
            SocketAddr::new(v6(Ipv6Addr::UNSPECIFIED), port),
            &format!("port {port}"),
        );
    }
    let (gw, other, vpc_ns) = (v6(SUBNET_GW6), v6(VPC_OTHER6), vpc.net.ns.clone());
    let task = v6(TASK6);
    assert_eq!(
        tcp_get_ip(&vpc_ns, Some(gw), task, 80, PATIENT).unwrap(),
        "port 80"
    );
    assert!(
        tcp_get_ip(&vpc_ns, Some(other), task, 80, SHORT).is_err(),
        "{VPC_OTHER6} is not in the port 80 rule's /128"
    );
    assert_eq!(
        tcp_get_ip(&vpc_ns, Some(other), task, 8000, PATIENT).unwrap(),
        "port 8000"
    );
    assert!(
        tcp_get_ip(&vpc_ns, Some(gw), task, 8001, SHORT).is_err(),
        "port 8001 is in no rule"
    );
    // The rules are IPv6 only: the same port over IPv4 from the subnet is dropped.
    assert!(
        tcp_get(&vpc.peer, ip4("10.0.1.23"), 8000, SHORT).is_err(),
        "IPv4 reached a port only an IPv6 rule admits"
    );
    // The task's own connections get their answers.
    assert!(
        tcp_get_ip(&ns, None, gw, 80, PATIENT)
            .unwrap()
            .contains("vpc6")
    );
    // Control: without the task's firewall the refused source gets through.
    must_succeed(
        &command_in(&ns, "/usr/sbin/nft")
            .args(["flush", "ruleset"])
            .output()
            .expect("nft"),
        "flush the task's ruleset",
    );
    assert_eq!(
        tcp_get_ip(&vpc_ns, Some(other), task, 80, PATIENT).unwrap(),
        "port 80",
        "the refused source cannot connect even without the firewall: the rig is broken"
    );
    must_succeed(&vpc.poststop(a), "poststop");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn tasks_cannot_reach_ipv6_instance_metadata_unless_allowed() {
    for allow in [false, true] {
        let allowed = if allow { "true" } else { "false" };
        let mut vpc = Vpc::new(&[("allow_metadata_access", allowed)]);
        vpc.net.enable_ipv6();
        let e = vpc.attach_eni();
        let a = vpc.task();
        let spec = eni_spec_dual(&e.mac, &[], &[&format!("{TASK6}/64")], "exclusive");
        vpc.must_setup(a, &spec.to_string(), "", None);
        let ns = vpc.ns(a);
        // Control: the VPC router answers on IPv6.
        assert!(
            tcp_get_ip(&ns, None, v6(SUBNET_GW6), 80, PATIENT).is_ok(),
            "no IPv6 path to the gateway"
        );
        let meta = tcp_get_ip(
            &ns,
            None,
            v6(AWS_METADATA6),
            80,
            if allow { PATIENT } else { SHORT },
        );
        if allow {
            assert_eq!(
                meta.as_deref(),
                Ok(format!("vpc6 {AWS_METADATA6}").as_str()),
                "allow_metadata_access = true, yet the task cannot reach fd00:ec2::254"
            );
        } else {
            assert!(meta.is_err(), "the task reached fd00:ec2::254: {meta:?}");
            // The task's firewall is what stops it.
            must_succeed(
                &command_in(&ns, "/usr/sbin/nft")
                    .args(["flush", "ruleset"])
                    .output()
                    .expect("nft"),
                "flush the task's ruleset",
            );
            assert!(
                tcp_get_ip(&ns, None, v6(AWS_METADATA6), 80, PATIENT).is_ok(),
                "fd00:ec2::254 is unreachable even without the firewall: the rig is broken"
            );
        }
        must_succeed(&vpc.poststop(a), "poststop");
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_shared_eni_refuses_ipv6_in_one_line_and_changes_nothing() {
    let mut vpc = Vpc::new(&[]);
    vpc.net.enable_ipv6();
    let e = vpc.attach_eni();
    let (a, b) = (vpc.task(), vpc.task());
    vpc.must_setup(a, &shared(&e, &["10.0.1.31/24", "10.0.1.32/24"]), "", None);
    // IPv4 routes only: the kernel adds IPv6 link-local routes by itself as addresses settle.
    let host_view = |vpc: &Vpc| {
        (
            link_names(&vpc.host),
            ip_text(&vpc.host, &["rule", "show"]),
            ip_text(&vpc.host, &["-6", "rule", "show"]),
            ip_text(&vpc.host, &["-4", "route", "show", "table", "all"]),
        )
    };
    let ledger_before = ledger_fingerprint(&vpc.state_dir());
    let host_before = host_view(&vpc);
    let spec = eni_spec_dual(
        &e.mac,
        &["10.0.1.31/24", "10.0.1.32/24"],
        &[&format!("{TASK6}/64")],
        "shared",
    );
    let out = vpc.setup(b, &spec.to_string(), "", None);
    must_fail_with(
        &out,
        &[
            &e.mac,
            "a shared ENI hands out IPv4 secondary addresses only",
            "exclusive or branch ENI",
        ],
    );
    assert!(
        ledger_fingerprint(&vpc.state_dir()) == ledger_before,
        "the refusal changed the ledger"
    );
    assert_eq!(host_view(&vpc), host_before, "the refusal changed the host");
    assert_eq!(link_names(&vpc.ns(b)), ["lo"], "the refused task got links");
    // The first task still serves from its secondary address.
    let ip_a = shared_task_ip(&vpc, a);
    tcp_server(&vpc.ns(a), 80, "still shared");
    assert_eq!(
        tcp_get(&vpc.peer, ip_a, 80, PATIENT).unwrap(),
        "still shared"
    );
    must_succeed(&vpc.poststop(a), "poststop");
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
    assert_eni_home(&vpc.host, eni, when);
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

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_failed_exclusive_setup_leaves_no_pin_and_no_empty_netns_directory() {
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    // The task already has a default route: the setup fails at the ENI's gateway, after the
    // netns was pinned and the ENI moved in.
    occupy_default_route(&vpc.ns(a));
    let out = vpc.setup(a, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    must_fail_with(&out, &["default route via"]);
    assert_eni_home(&vpc.host, &e, "after the failed gateway");
    assert_eq!(mounts_under(&vpc.state_dir()), Vec::<String>::new());
    let netns = vpc.state_dir().join("netns");
    assert!(!netns.exists(), "{} left", netns.display());
    assert!(vpc.recorded().is_empty());
    // A pin directory holding another task's pin stays, with that pin only.
    let b = vpc.task();
    let e1 = vpc.attach_eni();
    vpc.must_setup(b, &exclusive(&e1, &["10.0.1.24/24"]), "", None);
    let c = vpc.task();
    let e2 = vpc.attach_eni();
    occupy_default_route(&vpc.ns(c));
    must_fail_with(
        &vpc.setup(c, &exclusive(&e2, &["10.0.1.25/24"]), "", None),
        &["default route via"],
    );
    let pins: Vec<String> = std::fs::read_dir(&netns)
        .expect("the pin directory of b")
        .flatten()
        .map(|d| d.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(pins, vec![vpc.containers[b].id.clone()]);
    must_succeed(&vpc.poststop(b), "poststop b");
    assert!(
        !netns.exists(),
        "{} left after the last pin",
        netns.display()
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn shared_eni_addresses_instance_metadata_does_not_list_are_refused_and_change_nothing() {
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    // Metadata: primary .30, secondaries .31 and .32.
    vpc.meta.know(
        &e.mac,
        &[ip4("10.0.1.30"), ip4("10.0.1.31"), ip4("10.0.1.32")],
    );
    let (a, b) = (vpc.task(), vpc.task());
    let ledger_before = ledger_fingerprint(&vpc.state_dir());
    let host_before = (
        link_names(&vpc.host),
        ip_text(&vpc.host, &["rule", "show"]),
        ip_text(&vpc.host, &["-4", "route", "show", "table", "all"]),
    );
    for (bad, why) in [
        ("10.0.1.33", "not among the ENI's secondary addresses"),
        ("10.0.1.30", "primary address"),
    ] {
        let out = vpc.setup(
            a,
            &shared(&e, &["10.0.1.31/24", &format!("{bad}/24")]),
            "",
            None,
        );
        must_fail_with(&out, &[&e.mac, bad, why, "10.0.1.31, 10.0.1.32"]);
        assert!(
            ledger_fingerprint(&vpc.state_dir()) == ledger_before,
            "the refusal changed the ledger"
        );
        let host_after = (
            link_names(&vpc.host),
            ip_text(&vpc.host, &["rule", "show"]),
            ip_text(&vpc.host, &["-4", "route", "show", "table", "all"]),
        );
        assert_eq!(host_after, host_before, "the refusal changed the host");
        assert_eq!(link_names(&vpc.ns(a)), ["lo"], "the refused task got links");
    }
    // The listed secondaries are accepted.
    vpc.must_setup(b, &shared(&e, &["10.0.1.31/24", "10.0.1.32/24"]), "", None);
    must_succeed(&vpc.poststop(b), "poststop");
}

/// Gives a task's netns a default route of its own (through a veth pair that stays inside it),
/// so that an exclusive setup fails when it adds the ENI's gateway: after the pin and the move.
fn occupy_default_route(ns: &str) {
    ip(&[
        "-n", ns, "link", "add", "side0", "type", "veth", "peer", "name", "side1",
    ]);
    ip(&["-n", ns, "addr", "add", "198.51.100.2/24", "dev", "side0"]);
    ip(&["-n", ns, "link", "set", "side0", "up"]);
    ip(&["-n", ns, "link", "set", "side1", "up"]);
    ip(&["-n", ns, "route", "add", "default", "via", "198.51.100.1"]);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_task_that_already_has_an_eth0_is_refused_and_the_eni_stays_on_the_host() {
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let a = vpc.task();
    occupy_eth0(&vpc.ns(a));
    let before = link(&vpc.host, &e.name);
    let out = vpc.setup(a, &exclusive(&e, &["10.0.1.23/24"]), "", None);
    must_fail_with(&out, &["already has an interface named eth0"]);
    assert_eq!(link(&vpc.host, &e.name), before, "the ENI is untouched");
    assert_not_recorded(&vpc, a);
    assert!(!vpc.state_dir().join("netns").exists());
}
