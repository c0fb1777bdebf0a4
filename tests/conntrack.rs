//! UDP mappings and conntrack against real traffic: each bridge container's UDP mappings have a
//! conntrack zone of their own, so entries made before a mapping (clients that tried while
//! nothing or an earlier container held the port) catch none of its datagrams, and its own
//! entries catch nothing once it is gone; nothing is flushed, so 20,000 unrelated entries and
//! the containers' own traffic stay. Needs root and `conntrack` (conntrack-tools) to inspect
//! the table; each test has its own host namespace.

#[macro_use]
mod common;

use std::net::UdpSocket;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
/// How many entries `conntrack -L ARGS` lists in the rig's host namespace.
fn entries(rig: &Rig, args: &[&str]) -> usize {
    let out = command_in(&rig.host, "/usr/sbin/conntrack")
        .arg("-L")
        .args(args)
        .output()
        .expect("conntrack");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "conntrack -L {args:?}: {err}");
    // "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown."
    err.split("): ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("conntrack output: {err}"))
}

/// One datagram from a fresh socket in the client namespace to each host port in `ports`
/// (nothing listens there): an unreplied entry to the host itself per port.
fn knock(rig: &Rig, ports: std::ops::Range<u16>) {
    in_ns(&rig.client, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        for p in ports {
            s.send_to(b"x", (HOST_IP, p)).expect("send");
        }
    });
}

fn container_ip(rig: &Rig, i: usize) -> String {
    let id = &rig.containers[i].id;
    rig.ports()
        .iter()
        .find(|p| p["containerId"] == id.as_str())
        .and_then(|p| p["containerIP"].as_str())
        .map(String::from)
        .unwrap_or_else(|| panic!("no address for {id}"))
}

/// Host ports nothing maps or listens on in these tests (above the rig's dynamic range).
const UNRELATED: std::ops::Range<u16> = 41_000..61_000;

/// A socket of the host itself on UDP `port` that answers `reply` to the first datagram and then
/// closes (so a later setup may claim the port).
fn host_answers_once(rig: &Rig, port: u16, reply: &'static str) -> thread::JoinHandle<bool> {
    let s = in_ns(&rig.host, move || {
        UdpSocket::bind(("0.0.0.0", port)).expect("bind udp on the host")
    });
    thread::spawn(move || {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 1500];
        match s.recv_from(&mut buf) {
            Ok((_, from)) => s.send_to(reply.as_bytes(), from).is_ok(),
            Err(_) => false,
        }
    })
}

/// Unreplied, un-NATed UDP entries to the rig's host address: the knocks, plus any early try.
const TO_HOST: [&str; 6] = [
    "-p",
    "udp",
    "--orig-dst",
    "192.168.77.1",
    "--reply-src",
    "192.168.77.1",
];

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn udp_mappings_have_their_own_zone_so_stale_entries_catch_nothing_and_none_is_flushed() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    let b = rig.container();
    let map = r#"[{"containerPort":53,"hostPort":15353,"protocol":"udp"}]"#;
    must_succeed(&rig.setup(a, map), "setup a");
    must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup b");
    udp_server(&rig.containers[a].ns, 53, "old");
    let (ip_a, ip_b) = (container_ip(&rig, a), container_ip(&rig, b));

    // A client through the mapping: an entry DNATed to a.
    let client = udp_client(&rig.client, 6666);
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "old");
    // b's own traffic to a remote's port 15353, masqueraded: shares the number, not the zone.
    udp_server(&rig.client, 15353, "remote");
    let from_b = udp_client(&rig.containers[b].ns, 7777);
    assert_eq!(
        udp_ask(&from_b, CLIENT_IP, 15353).unwrap(),
        "remote",
        "egress from b"
    );
    // b through the host port (hairpin), and the host itself through 127.0.0.1: both
    // source-NATed, both answered by a.
    let hairpin = udp_client(&rig.containers[b].ns, 7778);
    assert_eq!(udp_ask(&hairpin, HOST_IP, 15353).unwrap(), "old", "hairpin");
    let local = udp_client(&rig.host, 7779);
    let loopback = "127.0.0.1".parse().unwrap();
    assert_eq!(
        udp_ask(&local, loopback, 15353).unwrap(),
        "old",
        "127.0.0.1"
    );
    knock(&rig, UNRELATED);
    let egress_b = [
        "-p",
        "udp",
        "--orig-src",
        &ip_b,
        "--orig-dst",
        "192.168.77.2",
        "--orig-port-dst",
        "15353",
    ];
    // The three ways in are tracked in a's zone (the first given: 1), b's egress in the
    // host's default zone.
    let to_a = ["-p", "udp", "--reply-src", &ip_a];
    assert_eq!(entries(&rig, &to_a), 3);
    let in_zone_1 = ["-p", "udp", "--reply-src", &ip_a, "--orig-zone", "1"];
    assert_eq!(entries(&rig, &in_zone_1), 3);
    assert_eq!(entries(&rig, &egress_b), 1);
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len());

    // Teardown flushes nothing; a's entries stay until they time out, and catch nothing: the
    // same client socket now reaches the host itself, which listens on 15353.
    must_succeed(&rig.poststop(a), "poststop a");
    rig.containers[a].destroy();
    assert_eq!(entries(&rig, &to_a), 3, "nothing flushed");
    assert_eq!(entries(&rig, &egress_b), 1, "b's egress untouched");
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len());
    let host = host_answers_once(&rig, 15353, "host");
    assert_eq!(
        udp_ask(&client, HOST_IP, 15353).unwrap(),
        "host",
        "a's entry still caught the client's datagrams"
    );
    assert!(host.join().unwrap());
    // That made an entry to the host itself, in the default zone.
    let to_host = [
        "-p",
        "udp",
        "--orig-src",
        "192.168.77.2",
        "--orig-port-src",
        "6666",
        "--orig-port-dst",
        "15353",
        "--reply-src",
        "192.168.77.1",
    ];
    assert_eq!(entries(&rig, &to_host), 1);

    // A replacement gets the next zone: the entry to the host stays and catches nothing, and
    // the same 5-tuples (client, hairpin, 127.0.0.1) reach the new container.
    let c = rig.container();
    must_succeed(&rig.setup(c, map), "setup c");
    udp_server(&rig.containers[c].ns, 53, "new");
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "new");
    assert_eq!(udp_ask(&hairpin, HOST_IP, 15353).unwrap(), "new", "hairpin");
    assert_eq!(
        udp_ask(&local, loopback, 15353).unwrap(),
        "new",
        "127.0.0.1"
    );
    assert_eq!(entries(&rig, &to_host), 1, "nothing flushed");
    let ip_c = container_ip(&rig, c);
    let in_zone_2 = ["-p", "udp", "--reply-src", &ip_c, "--orig-zone", "2"];
    assert_eq!(entries(&rig, &in_zone_2), 3);
    assert_eq!(entries(&rig, &egress_b), 1, "b's egress untouched");
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len() + 1);
    assert_eq!(udp_ask(&from_b, CLIENT_IP, 15353).unwrap(), "remote");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_1000_port_udp_range_sets_up_and_tears_down_with_20000_unrelated_entries() {
    let mut rig = Rig::new(CFG);
    // A first container brings netshim's table, and with it connection tracking in this netns.
    let z = rig.container();
    must_succeed(&rig.setup(z, r#"[{"containerPort":80}]"#), "setup z");
    let a = rig.container();
    knock(&rig, UNRELATED);
    // Clients that tried the range's ends before it was mapped: entries to the host itself.
    let first = udp_client(&rig.client, 6001);
    let last = udp_client(&rig.client, 6002);
    first.send_to(b"early", (HOST_IP, 33000)).unwrap();
    last.send_to(b"early", (HOST_IP, 33999)).unwrap();
    let early = |rig: &Rig, port: &str| {
        let mut args = TO_HOST.to_vec();
        args.extend(["--orig-port-dst", port]);
        entries(rig, &args)
    };
    assert_eq!(early(&rig, "33000") + early(&rig, "33999"), 2);

    let t = Instant::now();
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPortRange":"3000-3999","hostPortRange":"33000-33999","protocol":"udp"}]"#,
        ),
        "setup of 1,000 UDP ports",
    );
    let setup = t.elapsed();
    assert_eq!(rig.ports().len(), 1001);
    // The early entries stay (nothing is flushed) and catch nothing.
    assert_eq!(early(&rig, "33000") + early(&rig, "33999"), 2);
    udp_server(&rig.containers[a].ns, 3000, "first");
    udp_server(&rig.containers[a].ns, 3999, "last");
    assert_eq!(udp_ask(&first, HOST_IP, 33000).unwrap(), "first");
    assert_eq!(udp_ask(&last, HOST_IP, 33999).unwrap(), "last");
    let ip_a = container_ip(&rig, a);
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 2);

    let t = Instant::now();
    must_succeed(&rig.poststop(a), "poststop");
    let teardown = t.elapsed();
    assert_eq!(
        entries(&rig, &TO_HOST),
        UNRELATED.len() + 2,
        "unrelated entries kept"
    );
    assert_eq!(rig.ports().len(), 1);
    // a's entries catch nothing once it is gone: the host gets the same client's datagrams.
    let host = host_answers_once(&rig, 33000, "host");
    assert_eq!(udp_ask(&first, HOST_IP, 33000).unwrap(), "host");
    assert!(host.join().unwrap());
    eprintln!(
        "1,000-port UDP range with {} unrelated entries: setup {:.1} ms, teardown {:.1} ms (whole hook)",
        UNRELATED.len(),
        setup.as_secs_f64() * 1e3,
        teardown.as_secs_f64() * 1e3
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_container_set_up_before_zones_is_flushed_at_teardown_so_the_port_frees_at_once() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    let map = r#"[{"containerPort":53,"hostPort":15353,"protocol":"udp"}]"#;
    must_succeed(&rig.setup(a, map), "setup a");
    udp_server(&rig.containers[a].ns, 53, "old");
    // As an older netshim left it: a record without zones, a table rebuilt from the ledger
    // (`shim reload`), so a's datagrams are tracked in the host's default zone.
    let file = rig
        .state_dir()
        .join("containers")
        .join(format!("{}.json", rig.containers[a].id));
    let text = std::fs::read_to_string(&file).expect("a's record");
    assert!(text.contains("\"ctZone\":1"), "{text}");
    std::fs::write(&file, text.replace(",\"ctZone\":1", "")).expect("rewrite a's record");
    must_succeed(&rig.shim(&["reload"], ""), "reload");
    let zones = rig.nft(&["list", "map", "ip", "netshim", "zones"]);
    let zones = String::from_utf8_lossy(&zones.stdout).to_string();
    assert!(
        zones.contains("typeof udp dport") && !zones.contains("elements"),
        "{zones}"
    );
    let client = udp_client(&rig.client, 6666);
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "old");
    let ip_a = container_ip(&rig, a);
    let default_zone = ["-p", "udp", "--reply-src", &ip_a, "--orig-zone", "0"];
    assert_eq!(entries(&rig, &default_zone), 1);

    // Its teardown flushes what was DNATed to it: the same client socket reaches the host.
    must_succeed(&rig.poststop(a), "poststop a");
    rig.containers[a].destroy();
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 0);
    let host = host_answers_once(&rig, 15353, "host");
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "host");
    assert!(host.join().unwrap());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_udp_mapping_on_one_host_address_has_its_zone_too() {
    let mut rig = Rig::new(CFG);
    // A first container brings netshim's table, and with it connection tracking in this netns.
    let z = rig.container();
    must_succeed(&rig.setup(z, r#"[{"containerPort":80}]"#), "setup z");
    // A client that tried before the mapping: an entry to the host itself, default zone.
    let client = udp_client(&rig.client, 6667);
    client.send_to(b"early", (HOST_IP, 15354)).unwrap();
    let early = [
        "-p",
        "udp",
        "--orig-port-dst",
        "15354",
        "--reply-src",
        "192.168.77.1",
    ];
    assert_eq!(entries(&rig, &early), 1);
    let a = rig.container();
    let map = r#"[{"containerPort":53,"hostPort":15354,"hostIp":"192.168.77.1","protocol":"udp"}]"#;
    must_succeed(&rig.setup(a, map), "setup a");
    udp_server(&rig.containers[a].ns, 53, "a");
    assert_eq!(udp_ask(&client, HOST_IP, 15354).unwrap(), "a");
    let ip_a = container_ip(&rig, a);
    let zoned = ["-p", "udp", "--reply-src", &ip_a, "--orig-zone", "1"];
    assert_eq!(entries(&rig, &zoned), 1, "tracked in a's zone (zones_ip)");
    assert_eq!(entries(&rig, &early), 1, "nothing flushed");
    must_succeed(&rig.poststop(a), "poststop a");
    rig.containers[a].destroy();
    let host = host_answers_once(&rig, 15354, "host");
    assert_eq!(udp_ask(&client, HOST_IP, 15354).unwrap(), "host");
    assert!(host.join().unwrap());
}
