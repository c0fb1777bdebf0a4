//! Bridge mode against real namespaces, veths and nftables, with real TCP and UDP traffic.
//! Needs root; each test runs in its own host namespace, so they run in parallel.

#[macro_use]
mod common;

use std::fs;
use std::time::Duration;

use common::*;

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn mapped_ports_carry_tcp_and_udp_from_every_source() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    let b = rig.container();
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#,
        ),
        "setup a",
    );
    must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup b");
    tcp_server(&rig.containers[a].ns, 80, "hello from a");
    tcp_server(&rig.containers[b].ns, 80, "hello from b");
    udp_server(&rig.containers[a].ns, 53, "udp from a");
    let (pa, pb, pu) = (
        rig.host_port(a, 80, "tcp"),
        rig.host_port(b, 80, "tcp"),
        rig.host_port(a, 53, "udp"),
    );
    assert_ne!(pa, pb);
    for p in [pa, pb, pu] {
        assert!(
            (40000..=40999).contains(&p),
            "{p} outside the dynamic range"
        );
    }

    // Another machine, through the host's address.
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(),
        "hello from a"
    );
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, pb, PATIENT).unwrap(),
        "hello from b"
    );
    let u = udp_client(&rig.client, 5555);
    assert_eq!(udp_ask(&u, HOST_IP, pu).unwrap(), "udp from a");
    // The host itself, via 127.0.0.1 and via the bridge's gateway address.
    assert_eq!(
        tcp_get(&rig.host, "127.0.0.1".parse().unwrap(), pa, PATIENT).unwrap(),
        "hello from a"
    );
    assert_eq!(
        tcp_get(&rig.host, GATEWAY, pb, PATIENT).unwrap(),
        "hello from b"
    );
    // Hairpin: a container to another container's and to its own host port.
    assert_eq!(
        tcp_get(&rig.containers[a].ns, GATEWAY, pb, PATIENT).unwrap(),
        "hello from b"
    );
    assert_eq!(
        tcp_get(&rig.containers[a].ns, HOST_IP, pa, PATIENT).unwrap(),
        "hello from a"
    );
    assert_eq!(
        tcp_get(&rig.containers[b].ns, HOST_IP, pa, PATIENT).unwrap(),
        "hello from a"
    );

    // Bridge ports carry no IPv6 link-local address (no per-port routes to walk).
    for v in rig.veths() {
        let out = std::process::Command::new("/usr/sbin/ip")
            .args(["-n", &rig.host, "-6", "addr", "show", "dev", &v])
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "{v} has IPv6: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Teardown releases everything, and the port stops answering.
    must_succeed(&rig.poststop(a), "poststop a");
    must_succeed(&rig.poststop(b), "poststop b");
    assert!(rig.veths().is_empty(), "veths left: {:?}", rig.veths());
    assert_eq!(rig.nft_elements(), "", "map elements left");
    assert!(rig.recorded().is_empty());
    assert!(rig.ports().is_empty());
    assert!(tcp_get(&rig.client, HOST_IP, pa, Duration::ZERO).is_err());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn loopback_addressed_packets_from_outside_are_dropped() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    tcp_server(&rig.containers[a].ns, 80, "secret");
    let p = rig.host_port(a, 80, "tcp");
    // The "other machine" crafts packets to 127.0.0.5 and routes them to the host.
    let (c, link) = (rig.client.clone(), rig.client_link());
    ip(&[
        "-n",
        &c,
        "route",
        "del",
        "local",
        "127.0.0.0/8",
        "dev",
        "lo",
        "table",
        "local",
    ]);
    ip(&[
        "-n",
        &c,
        "route",
        "add",
        "127.0.0.5/32",
        "via",
        &HOST_IP.to_string(),
    ]);
    let sysctl = format!("/proc/sys/net/ipv4/conf/{link}/route_localnet");
    in_ns(&c, move || fs::write(sysctl, "1").expect("route_localnet"));
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, p, PATIENT).unwrap(),
        "secret",
        "control: the mapping works"
    );
    let lo = "127.0.0.5".parse().unwrap();
    assert!(
        tcp_get(&rig.client, lo, p, SHORT).is_err(),
        "127/8 from outside must be dropped"
    );
    // The guard is what stops it: without it the same packets reach the container.
    rig.nft(&["flush", "chain", "ip", "netshim", "guard"]);
    assert_eq!(tcp_get(&rig.client, lo, p, PATIENT).unwrap(), "secret");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn static_conflicts_reserved_and_host_listeners_are_refused_and_leave_nothing() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.container(), rig.container());
    must_succeed(
        &rig.setup(a, r#"[{"containerPort":80,"hostPort":18080}]"#),
        "setup a",
    );
    tcp_server(&rig.containers[a].ns, 80, "first");
    let id_a = rig.containers[a].id.clone();
    must_fail_with(
        &rig.setup(b, r#"[{"containerPort":80,"hostPort":18080}]"#),
        &["18080/tcp", &id_a],
    );
    must_fail_with(
        &rig.setup(b, r#"[{"containerPort":80,"hostPort":22}]"#),
        &["22/tcp", "reserved"],
    );
    // A host process listening on the port.
    let _l = in_ns(&rig.host, || {
        std::net::TcpListener::bind(("0.0.0.0", 18090)).expect("bind")
    });
    must_fail_with(
        &rig.setup(b, r#"[{"containerPort":80,"hostPort":18090}]"#),
        &["18090/tcp", "in use on the host", "pid"],
    );
    let _u = in_ns(&rig.host, || {
        std::net::UdpSocket::bind(("0.0.0.0", 18091)).expect("bind")
    });
    must_fail_with(
        &rig.setup(
            b,
            r#"[{"containerPort":53,"hostPort":18091,"protocol":"udp"}]"#,
        ),
        &["18091/udp"],
    );
    // The first keeps serving; the refused one left nothing.
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, 18080, PATIENT).unwrap(),
        "first"
    );
    assert_eq!(rig.recorded(), vec![id_a]);
    assert_eq!(rig.veths().len(), 1);
    assert_eq!(rig.nft_elements().lines().count(), 1);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn dynamic_picks_skip_ports_host_processes_hold() {
    let mut rig = Rig::new("[ports]\ndynamic_range = \"41000-41002\"\n");
    let _l = in_ns(&rig.host, || {
        std::net::TcpListener::bind(("0.0.0.0", 41000)).expect("bind")
    });
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    assert_eq!(rig.host_port(a, 80, "tcp"), 41001);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let mut rig = Rig::new("[ports]\ndynamic_range = \"42000-42001\"\n");
    let ok = rig.container();
    must_succeed(
        &rig.setup(ok, r#"[{"containerPort":80}]"#),
        "baseline setup",
    );
    let bad = rig.container();
    let before = ledger_fingerprint(&rig.state_dir());
    let cases: &[(&str, &str, &[&str])] = &[
        ("bridge", r#"[{"containerPort":80"#, &["not valid JSON"]),
        ("overlay", "[]", &["unknown network mode \"overlay\""]),
        (
            "bridge",
            r#"[{"containerPort":0}]"#,
            &["containerPort", "1-65535"],
        ),
        ("bridge", r#"[{"containerPort":70000}]"#, &["1-65535"]),
        (
            "bridge",
            r#"[{"containerPort":"80"}]"#,
            &["drop the quotes"],
        ),
        (
            "bridge",
            r#"[{"containerPort":80,"protocol":"sctp"}]"#,
            &["unknown protocol \"sctp\""],
        ),
        (
            "bridge",
            r#"[{"containerPort":80},{"containerPort":80}]"#,
            &["already mapped"],
        ),
        (
            "bridge",
            r#"[{"containerPortRange":"90-80"}]"#,
            &["reversed"],
        ),
        (
            "bridge",
            r#"[{"containerPort":80,"hostPort":22}]"#,
            &["reserved"],
        ),
    ];
    for (mode, maps, needles) in cases {
        let st = rig.oci_state(
            bad,
            &[
                ("netshim.network-mode", mode),
                ("netshim.port-mappings", maps),
            ],
        );
        must_fail_with(&rig.shim(&["hook", "createRuntime"], &st), needles);
    }
    // Exhausted range: one port left, a request for two.
    must_fail_with(
        &rig.setup(bad, r#"[{"containerPort":80},{"containerPort":81}]"#),
        &["42000-42001", "widen ports.dynamic_range"],
    );
    // A pid that does not exist.
    let st = rig
        .oci_state(bad, &[("netshim.network-mode", "bridge")])
        .replace(
            &format!("\"pid\":{}", rig.containers[bad].pid()),
            "\"pid\":999999999",
        );
    must_fail_with(
        &rig.shim(&["hook", "createRuntime"], &st),
        &["pid 999999999"],
    );
    assert_eq!(
        ledger_fingerprint(&rig.state_dir()),
        before,
        "state changed"
    );
    assert_eq!(rig.veths().len(), 1);
    assert_eq!(rig.nft_elements().lines().count(), 1);

    // An unknown config key is named.
    fs::write(rig.config_path(), "[ports]\ndynamic_rnage = \"1-2\"\n").unwrap();
    must_fail_with(&rig.setup(bad, "[]"), &["dynamic_rnage"]);
    fs::write(rig.config_path(), CFG).unwrap();
    // A corrupt index is refused and left as it is.
    let index = rig.state_dir().join("index.json");
    let good = fs::read(&index).unwrap();
    fs::write(&index, b"{garbage").unwrap();
    must_fail_with(&rig.setup(bad, "[]"), &["corrupt"]);
    assert_eq!(fs::read(&index).unwrap(), b"{garbage");
    assert_eq!(rig.veths().len(), 1);
    fs::write(&index, &good).unwrap();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn containers_without_the_mode_annotation_are_left_alone() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(
        &rig.shim(
            &["hook", "createRuntime"],
            &rig.oci_state(a, &[("other", "x")]),
        ),
        "no annotation",
    );
    assert!(!rig.state_dir().exists() || rig.recorded().is_empty());
    assert!(rig.veths().is_empty());
    must_succeed(&rig.poststop(a), "poststop of an unknown container");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn poststop_works_from_state_alone_and_is_idempotent() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#,
        ),
        "setup",
    );
    // The runtime has already killed the process and destroyed the netns.
    rig.containers[a].destroy();
    must_succeed(&rig.poststop(a), "poststop");
    must_succeed(&rig.poststop(a), "second poststop");
    assert!(rig.veths().is_empty());
    assert_eq!(rig.nft_elements(), "");
    assert!(rig.recorded().is_empty());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn setup_twice_for_one_container_is_a_no_op_and_a_reused_id_is_replaced() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "createRuntime");
    let p = rig.host_port(a, 80, "tcp");
    must_succeed(
        &rig.shim(
            &["hook", "prestart"],
            &rig.oci_state(
                a,
                &[
                    ("netshim.network-mode", "bridge"),
                    ("netshim.port-mappings", r#"[{"containerPort":80}]"#),
                ],
            ),
        ),
        "prestart",
    );
    assert_eq!(rig.veths().len(), 1);
    assert_eq!(rig.host_port(a, 80, "tcp"), p);
    // Same id, new container (the earlier one never got its poststop).
    rig.containers[a].destroy();
    let b = rig.container();
    rig.containers[b].id = rig.containers[a].id.clone();
    must_succeed(
        &rig.setup(b, r#"[{"containerPort":80}]"#),
        "setup of the reused id",
    );
    tcp_server(&rig.containers[b].ns, 80, "new one");
    assert_eq!(rig.veths().len(), 1);
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, rig.host_port(b, 80, "tcp"), PATIENT).unwrap(),
        "new one"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_replacement_on_the_same_udp_host_port_gets_the_same_clients_traffic() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":53,"hostPort":15353,"protocol":"udp"}]"#,
        ),
        "setup a",
    );
    udp_server(&rig.containers[a].ns, 53, "old");
    let client = udp_client(&rig.client, 6666);
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "old");
    must_succeed(&rig.poststop(a), "poststop a");
    rig.containers[a].destroy();
    let b = rig.container();
    must_succeed(
        &rig.setup(
            b,
            r#"[{"containerPort":53,"hostPort":15353,"protocol":"udp"}]"#,
        ),
        "setup b",
    );
    udp_server(&rig.containers[b].ns, 53, "new");
    // Same client socket, same 5-tuple: a's entry is still there (nothing is flushed), in a's
    // conntrack zone, which b's mapping does not use.
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "new");
}

/// `n` containers are listed, each with its own host port, address and veth.
fn assert_distinct(rig: &Rig, n: usize) {
    let ports = rig.ports();
    assert_eq!(ports.len(), n);
    let mut hp: Vec<u64> = ports
        .iter()
        .map(|p| p["hostPort"].as_u64().unwrap())
        .collect();
    let mut ips: Vec<String> = ports
        .iter()
        .map(|p| p["containerIP"].as_str().unwrap().to_string())
        .collect();
    hp.sort();
    hp.dedup();
    ips.sort();
    ips.dedup();
    assert_eq!((hp.len(), ips.len()), (n, n), "duplicates: {ports:?}");
    assert_eq!(rig.veths().len(), n);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn concurrent_setups_get_distinct_addresses_and_ports() {
    let mut rig = Rig::new(CFG);
    let n = 8;
    for _ in 0..n {
        rig.container();
    }
    let states: Vec<String> = (0..n)
        .map(|i| {
            rig.oci_state(
                i,
                &[
                    ("netshim.network-mode", "bridge"),
                    ("netshim.port-mappings", r#"[{"containerPort":80}]"#),
                ],
            )
        })
        .collect();
    let rig = std::sync::Arc::new(rig);
    let handles: Vec<_> = states
        .into_iter()
        .map(|st| {
            let r = rig.clone();
            std::thread::spawn(move || r.shim(&["hook", "createRuntime"], &st))
        })
        .collect();
    for h in handles {
        must_succeed(&h.join().unwrap(), "parallel setup");
    }
    assert_distinct(&rig, n);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn reload_restores_mappings_after_a_firewall_wipe() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    tcp_server(&rig.containers[a].ns, 80, "back");
    let p = rig.host_port(a, 80, "tcp");
    assert_eq!(tcp_get(&rig.client, HOST_IP, p, PATIENT).unwrap(), "back");
    rig.nft(&["delete", "table", "ip", "netshim"]);
    assert!(tcp_get(&rig.client, HOST_IP, p, SHORT).is_err());
    must_succeed(&rig.shim(&["reload"], ""), "reload");
    assert_eq!(tcp_get(&rig.client, HOST_IP, p, PATIENT).unwrap(), "back");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn gc_releases_containers_whose_process_is_gone() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.container(), rig.container());
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup a");
    must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup b");
    rig.containers[a].destroy();
    // A veth left by a hook killed before it recorded anything: created on the bridge, as the
    // hook creates them (one message).
    ip(&[
        "-n",
        &rig.host,
        "link",
        "add",
        "nsh0badcafe",
        "master",
        "netshim0",
        "type",
        "veth",
        "peer",
        "name",
        "nshpeer0x",
    ]);
    // A link with netshim's name shape that is not on this instance's bridge (another
    // instance's, or someone else's) is never swept.
    ip(&[
        "-n",
        &rig.host,
        "link",
        "add",
        "nsh0000beef",
        "type",
        "veth",
        "peer",
        "name",
        "nshpeer1x",
    ]);
    must_succeed(&rig.shim(&["gc"], ""), "gc");
    assert!(
        !rig.veths().contains(&"nsh0badcafe".to_string()),
        "stray veth kept"
    );
    assert!(
        rig.veths().contains(&"nsh0000beef".to_string()),
        "a veth not on this bridge was swept"
    );
    ip(&["-n", &rig.host, "link", "del", "nsh0000beef"]);
    assert_eq!(rig.recorded(), vec![rig.containers[b].id.clone()]);
    assert_eq!(rig.veths().len(), 1);
    assert_eq!(rig.nft_elements().lines().count(), 1);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn port_ranges_and_host_ip_bindings_carry_traffic() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPortRange":"7000-7002"},{"containerPort":9000,"hostPort":19000,"hostIp":"127.0.0.1"}]"#,
        ),
        "setup",
    );
    for p in 7000..=7002 {
        tcp_server(&rig.containers[a].ns, p, &format!("range {p}"));
    }
    tcp_server(&rig.containers[a].ns, 9000, "loopback only");
    let hosts: Vec<u16> = (7000..=7002).map(|p| rig.host_port(a, p, "tcp")).collect();
    assert_eq!(hosts[1], hosts[0] + 1, "contiguous host range");
    assert_eq!(hosts[2], hosts[0] + 2, "contiguous host range");
    for (i, hp) in hosts.iter().enumerate() {
        assert_eq!(
            tcp_get(&rig.client, HOST_IP, *hp, PATIENT).unwrap(),
            format!("range {}", 7000 + i)
        );
    }
    // Bound to 127.0.0.1 on the host: reachable there, not on the host's other addresses.
    assert_eq!(
        tcp_get(&rig.host, "127.0.0.1".parse().unwrap(), 19000, PATIENT).unwrap(),
        "loopback only"
    );
    assert!(tcp_get(&rig.client, HOST_IP, 19000, SHORT).is_err());
    let entry = rig
        .ports()
        .into_iter()
        .find(|p| p["hostPort"] == 19000)
        .unwrap();
    assert_eq!(entry["bindIP"], "127.0.0.1");
    must_succeed(&rig.poststop(a), "poststop");
    let left = String::from_utf8_lossy(
        &rig.nft(&["list", "map", "ip", "netshim", "ports_ip"])
            .stdout,
    )
    .to_string();
    assert!(!left.contains("19000"), "{left}");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn ingress_rules_filter_new_connections_to_a_bridge_container() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    let st = rig.oci_state(
        a,
        &[
            ("netshim.network-mode", "bridge"),
            (
                "netshim.port-mappings",
                r#"[{"containerPort":80},{"containerPort":81}]"#,
            ),
            (
                "netshim.ingress",
                r#"[{"protocol":"tcp","port":80,"cidr":"192.168.77.2/32"}]"#,
            ),
        ],
    );
    must_succeed(&rig.shim(&["hook", "createRuntime"], &st), "setup");
    tcp_server(&rig.containers[a].ns, 80, "admitted");
    tcp_server(&rig.containers[a].ns, 81, "never");
    let (p80, p81) = (rig.host_port(a, 80, "tcp"), rig.host_port(a, 81, "tcp"));
    // The client machine on the listed port: admitted (DNAT keeps its source address).
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, p80, PATIENT).unwrap(),
        "admitted"
    );
    // The same client on an unlisted port, and the host (source: the gateway) on the listed one.
    assert!(tcp_get(&rig.client, HOST_IP, p81, SHORT).is_err());
    assert!(tcp_get(&rig.host, GATEWAY, p80, SHORT).is_err());
    // Replies to the container's own outbound connections still get in.
    tcp_server(&rig.client, 9999, "outbound ok");
    assert_eq!(
        tcp_get(&rig.containers[a].ns, CLIENT_IP, 9999, PATIENT).unwrap(),
        "outbound ok"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn dynamic_host_ports_are_kept_out_of_the_ephemeral_range_while_mapped() {
    let mut rig = Rig::new(CFG);
    // The host's own reservation stays, and is never handed out.
    rig.shim_reserved("40000-40001");
    let (a, b) = (rig.container(), rig.container());
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#,
        ),
        "setup a",
    );
    must_succeed(
        &rig.setup(b, r#"[{"containerPort":80,"hostPort":8080}]"#),
        "setup b",
    );
    let (t, u) = (rig.host_port(a, 80, "tcp"), rig.host_port(a, 53, "udp"));
    assert!(
        t > 40001 && u > 40001,
        "a host-reserved port was handed out: {t} {u}"
    );
    let mut want = vec![t, u];
    want.sort();
    let list = reserved_ports(&rig.host);
    for p in &want {
        assert!(
            list.split(',').any(|x| contains_port(x, *p)),
            "{p} not reserved: {list}"
        );
    }
    assert!(
        !list.split(',').any(|x| contains_port(x, 8080)),
        "a static port was reserved: {list}"
    );
    must_succeed(&rig.poststop(a), "poststop a");
    assert_eq!(
        reserved_ports(&rig.host),
        "40000-40001",
        "netshim's reservations stay after poststop"
    );
}

fn contains_port(item: &str, p: u16) -> bool {
    let (a, b) = item.split_once('-').unwrap_or((item, item));
    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= p && p <= b)
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn gc_says_when_a_host_process_binds_a_mapped_port() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    let port = rig.host_port(a, 80, "tcp");
    let _squatter = in_ns(&rig.host, move || {
        std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind the mapped port")
    });
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(&format!(
            "host port {port}/tcp is mapped to container {}",
            rig.containers[a].id
        )) && said.contains("gets no traffic there"),
        "{said}"
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn poststop_deletes_the_veth_when_something_keeps_the_netns() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    // The process dies, but the netns stays (its bind mount holds it, as a runtime's or a
    // pause container's would): the kernel would never delete the pair, so poststop must.
    if let Some(mut c) = rig.containers[a].child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    must_succeed(&rig.poststop(a), "poststop");
    let left = rig.veths();
    assert!(left.is_empty(), "veths left: {left:?}");
    let inside = ip(&["-n", &rig.containers[a].ns, "-o", "link", "show"]);
    assert!(
        !inside.contains("eth0"),
        "the container side is still there: {inside}"
    );
    assert!(rig.recorded().is_empty());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn poststop_after_the_netns_died_leaves_no_veth_and_frees_the_name() {
    let mut rig = Rig::new(CFG);
    for round in 0..5 {
        let a = rig.container();
        must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
        let id = rig.containers[a].id.clone();
        let veth = ledger_record(&rig.state_dir(), &id).expect("recorded")["veth"]
            .as_str()
            .expect("a veth")
            .to_string();
        rig.containers[a].destroy();
        must_succeed(&rig.poststop(a), "poststop");
        // Nothing holds a's netns any more: the kernel deletes the pair with it.
        assert!(
            rig.link_gone_within(&veth, Duration::from_secs(5)),
            "round {round}: {veth} left"
        );
        // The same id again at once: the veth name is the same, whatever the kernel's cleanup
        // of the old netns has done by now.
        let b = rig.container();
        rig.containers[b].id = id;
        must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup again");
        tcp_server(&rig.containers[b].ns, 80, "again");
        assert_eq!(
            tcp_get(&rig.client, HOST_IP, rig.host_port(b, 80, "tcp"), PATIENT).as_deref(),
            Ok("again"),
            "round {round}"
        );
        rig.containers[b].destroy();
        must_succeed(&rig.poststop(b), "poststop again");
    }
    // The test's own listening sockets still hold the b netns (as a process that joined a
    // container's netns would): their veths stay until `shim gc` sweeps them as strays.
    must_succeed(&rig.shim(&["gc"], ""), "gc");
    let left = rig.veths();
    assert!(left.is_empty(), "veths left: {left:?}");
    assert_eq!(rig.nft_elements(), "");
    assert!(rig.recorded().is_empty());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn reset_force_and_gc_delete_many_veths_at_once_and_only_theirs() {
    let mut rig = Rig::new(CFG);
    let ids: Vec<usize> = (0..6).map(|_| rig.container()).collect();
    for &i in &ids {
        must_succeed(&rig.setup(i, r#"[{"containerPort":80}]"#), "setup");
    }
    // Three strays for gc, deleted in one request, and a veth of someone else's in a group of
    // its own that neither gc nor reset touches.
    for n in ["nsh0000aaa1", "nsh0000aaa2", "nsh0000aaa3"] {
        ip(&[
            "-n",
            &rig.host,
            "link",
            "add",
            n,
            "master",
            "netshim0",
            "type",
            "veth",
            "peer",
            "name",
            &format!("p{n}"),
        ]);
    }
    ip(&[
        "-n", &rig.host, "link", "add", "othr0", "group", "7", "type", "veth", "peer", "name",
        "othr1",
    ]);
    must_succeed(&rig.shim(&["gc"], ""), "gc");
    assert_eq!(rig.veths().len(), ids.len(), "{:?}", rig.veths());
    must_succeed(&rig.shim(&["reset", "--force"], ""), "reset --force");
    let left = rig.veths();
    assert!(left.is_empty(), "veths left: {left:?}");
    for &i in &ids {
        let inside = ip(&["-n", &rig.containers[i].ns, "-o", "link", "show"]);
        assert!(!inside.contains("eth0"), "container side left: {inside}");
    }
    let other = ip(&["-n", &rig.host, "-o", "link", "show", "othr0"]);
    assert!(
        other.contains("group 7"),
        "someone else's veth changed: {other}"
    );
    assert!(rig.recorded().is_empty());
    let links = ip(&["-n", &rig.host, "-o", "link", "show"]);
    assert!(!links.contains("netshim0"), "bridge left: {links}");
}

/// Runs `f` for every item on a thread of its own, all at once; the results in order.
fn all_at_once<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let hs: Vec<_> = items.iter().map(|x| s.spawn(|| f(x))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn bridge_state(rig: &Rig, i: usize) -> String {
    rig.oci_state(
        i,
        &[
            ("netshim.network-mode", "bridge"),
            ("netshim.port-mappings", r#"[{"containerPort":80}]"#),
        ],
    )
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn sixty_four_concurrent_setups_then_teardowns_are_distinct_serve_and_leave_nothing() {
    let mut rig = Rig::new(CFG);
    let n = 64;
    let ids: Vec<usize> = (0..n).map(|_| rig.container()).collect();
    let states: Vec<String> = ids.iter().map(|&i| bridge_state(&rig, i)).collect();
    for (o, i) in all_at_once(&states, |st| rig.shim(&["hook", "createRuntime"], st))
        .iter()
        .zip(&ids)
    {
        must_succeed(o, &format!("setup of container {i}"));
    }
    assert_distinct(&rig, n);
    for &i in &ids {
        let reply = format!("c{i}");
        let server = tcp_serve_once(&rig.containers[i].ns, 80, &reply);
        let p = rig.host_port(i, 80, "tcp");
        assert_eq!(
            tcp_get(&rig.client, HOST_IP, p, PATIENT).as_deref(),
            Ok(reply.as_str()),
            "container {i}'s port {p}"
        );
        assert!(server.join().unwrap());
    }
    // As a runtime does: the processes die, then 64 poststops at once.
    for &i in &ids {
        rig.containers[i].destroy();
    }
    for (o, i) in all_at_once(&ids, |&i| rig.poststop(i)).iter().zip(&ids) {
        must_succeed(o, &format!("poststop of container {i}"));
    }
    assert_eq!(rig.veths(), Vec::<String>::new(), "veths left");
    assert_eq!(rig.nft_elements(), "", "map elements left");
    assert_eq!(rig.recorded(), Vec::<String>::new(), "records left");
    assert!(rig.ports().is_empty());
    let gc = rig.shim(&["gc"], "");
    must_succeed(&gc, "gc");
    assert_eq!(String::from_utf8_lossy(&gc.stdout), "", "gc had to repair");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_burst_of_setups_teardowns_gc_and_reload_all_succeed_and_ends_consistent() {
    let mut rig = Rig::new(CFG);
    let old: Vec<usize> = (0..16).map(|_| rig.container()).collect();
    for &i in &old {
        must_succeed(&rig.setup(i, r#"[{"containerPort":80}]"#), "setup");
    }
    let new: Vec<usize> = (0..16).map(|_| rig.container()).collect();
    for &i in &old {
        rig.containers[i].destroy();
    }
    // 16 setups, 16 poststops (of dead containers, which a concurrent gc may reap first),
    // 4 gc and 4 reload, all at once.
    let mut jobs: Vec<(String, Vec<&str>, String)> = Vec::new();
    for &i in &new {
        jobs.push((
            format!("setup {i}"),
            vec!["hook", "createRuntime"],
            bridge_state(&rig, i),
        ));
    }
    for &i in &old {
        let id = &rig.containers[i].id;
        jobs.push((
            format!("poststop {i}"),
            vec!["hook", "poststop"],
            format!(
                r#"{{"ociVersion":"1.0.2","id":"{id}","status":"stopped","bundle":"/nonexistent"}}"#
            ),
        ));
    }
    for k in 0..4 {
        jobs.push((format!("gc {k}"), vec!["gc"], String::new()));
        jobs.push((format!("reload {k}"), vec!["reload"], String::new()));
    }
    for ((what, _, _), o) in jobs
        .iter()
        .zip(all_at_once(&jobs, |(_, args, st)| rig.shim(args, st)))
    {
        must_succeed(&o, what);
    }
    // Consistent: exactly the new containers, each served, and nothing for gc to repair.
    let mut want: Vec<String> = new.iter().map(|&i| rig.containers[i].id.clone()).collect();
    want.sort();
    assert_eq!(rig.recorded(), want);
    assert_eq!(rig.veths().len(), new.len(), "{:?}", rig.veths());
    assert_eq!(rig.ports().len(), new.len());
    assert_eq!(
        rig.nft_element_counts().get("ports").copied(),
        Some(new.len())
    );
    let gc = rig.shim(&["gc"], "");
    must_succeed(&gc, "gc");
    assert_eq!(String::from_utf8_lossy(&gc.stdout), "", "gc had to repair");
    for &i in &new {
        let reply = format!("n{i}");
        let server = tcp_serve_once(&rig.containers[i].ns, 80, &reply);
        let p = rig.host_port(i, 80, "tcp");
        assert_eq!(
            tcp_get(&rig.client, HOST_IP, p, PATIENT).as_deref(),
            Ok(reply.as_str()),
            "container {i}'s port {p}"
        );
        assert!(server.join().unwrap());
    }
    for &i in &new {
        rig.containers[i].destroy();
        must_succeed(&rig.poststop(i), "poststop");
    }
    assert_eq!(rig.veths(), Vec::<String>::new(), "veths left");
    assert_eq!(rig.nft_elements(), "", "map elements left");
    assert_eq!(rig.recorded(), Vec::<String>::new(), "records left");
}

/// Writes `value` to `/proc/sys/<path>` in netns `ns`.
fn set_sysctl(ns: &str, path: &str, value: &str) {
    let path = format!("/proc/sys/{path}");
    let value = value.to_string();
    in_ns(ns, move || fs::write(&path, value).expect("write sysctl"));
}

/// The sysctls that differ between two snapshots, as (path, before, after).
fn sysctl_diff(
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| (k.clone(), before.get(k).cloned(), after.get(k).cloned()))
        .collect()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_setup_that_fails_after_its_sysctls_puts_back_exactly_what_it_changed() {
    let mut rig = Rig::new(CFG);
    // A host with forwarding off: the first setup turns it on (and route_localnet on the bridge
    // it creates), then fails (the container already has an eth0).
    set_sysctl(&rig.host, "net/ipv4/ip_forward", "0");
    let a = rig.container();
    occupy_eth0(&rig.containers[a].ns);
    let before = net_sysctls(&rig.host);
    let out = rig.setup(
        a,
        r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#,
    );
    must_fail_with(&out, &["eth0"]);
    assert_eq!(
        sysctl_diff(&before, &net_sysctls(&rig.host)),
        vec![],
        "sysctls changed by a failed setup"
    );
    assert_eq!(rig.veths(), Vec::<String>::new());
    assert!(rig.recorded().is_empty());

    // A bridge that exists (another container uses it) with route_localnet and forwarding
    // found off: a failed setup turns them on and off again; the good setup keeps them on.
    let b = rig.container();
    must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup b");
    set_sysctl(&rig.host, "net/ipv4/ip_forward", "0");
    set_sysctl(&rig.host, "net/ipv4/conf/netshim0/route_localnet", "0");
    let c = rig.container();
    occupy_eth0(&rig.containers[c].ns);
    let before = net_sysctls(&rig.host);
    must_fail_with(&rig.setup(c, r#"[{"containerPort":80}]"#), &["eth0"]);
    assert_eq!(
        sysctl_diff(&before, &net_sysctls(&rig.host)),
        vec![],
        "sysctls changed by a failed setup"
    );
    let d = rig.container();
    must_succeed(&rig.setup(d, r#"[{"containerPort":80}]"#), "setup d");
    let after = net_sysctls(&rig.host);
    assert_eq!(
        after
            .get("/proc/sys/net/ipv4/ip_forward")
            .map(String::as_str),
        Some("1")
    );
    assert_eq!(
        after
            .get("/proc/sys/net/ipv4/conf/netshim0/route_localnet")
            .map(String::as_str),
        Some("1")
    );
}
