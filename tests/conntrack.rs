//! UDP conntrack flushes against real traffic: stale entries made by real clients go at setup
//! and teardown, while 20,000 unrelated entries and the containers' own traffic stay. Needs
//! root and `conntrack` (conntrack-tools) to inspect the table; each test has its own host
//! namespace.

#[macro_use]
mod common;

use std::net::UdpSocket;
use std::time::Instant;

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
fn udp_flushes_remove_exactly_the_stale_entries_among_20000_unrelated_ones() {
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
    // b's own traffic to a remote's port 15353, masqueraded: shares the number, must stay.
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
    assert_eq!(
        udp_ask(&local, "127.0.0.1".parse().unwrap(), 15353).unwrap(),
        "old",
        "via 127.0.0.1"
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
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 3);
    assert_eq!(entries(&rig, &egress_b), 1);
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len());

    // Teardown: what was DNATed to a goes, nothing else.
    must_succeed(&rig.poststop(a), "poststop a");
    rig.containers[a].destroy();
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 0);
    assert_eq!(
        entries(&rig, &egress_b),
        1,
        "b's egress survives a's teardown"
    );
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len());

    // While nothing maps 15353, the same client socket makes an entry to the host itself.
    client.send_to(b"ping", (HOST_IP, 15353)).unwrap();
    let to_host = [
        "-p",
        "udp",
        "--orig-src",
        "192.168.77.2",
        "--orig-port-src",
        "6666",
        "--orig-port-dst",
        "15353",
    ];
    assert_eq!(entries(&rig, &to_host), 1);
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len() + 1);

    // Setup of a replacement: that entry goes, the rest stays, and the same 5-tuple now
    // reaches the new container.
    let c = rig.container();
    must_succeed(&rig.setup(c, map), "setup c");
    udp_server(&rig.containers[c].ns, 53, "new");
    assert_eq!(entries(&rig, &to_host), 0, "stale entry to the host");
    assert_eq!(entries(&rig, &egress_b), 1, "b's egress survives c's setup");
    assert_eq!(entries(&rig, &TO_HOST), UNRELATED.len());
    assert_eq!(udp_ask(&client, HOST_IP, 15353).unwrap(), "new");
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
    assert_eq!(early(&rig, "33000") + early(&rig, "33999"), 0);
    udp_server(&rig.containers[a].ns, 3000, "first");
    udp_server(&rig.containers[a].ns, 3999, "last");
    assert_eq!(udp_ask(&first, HOST_IP, 33000).unwrap(), "first");
    assert_eq!(udp_ask(&last, HOST_IP, 33999).unwrap(), "last");
    let ip_a = container_ip(&rig, a);
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 2);

    let t = Instant::now();
    must_succeed(&rig.poststop(a), "poststop");
    let teardown = t.elapsed();
    assert_eq!(entries(&rig, &["-p", "udp", "--reply-src", &ip_a]), 0);
    assert_eq!(
        entries(&rig, &TO_HOST),
        UNRELATED.len(),
        "unrelated entries kept"
    );
    assert_eq!(rig.ports().len(), 1);
    eprintln!(
        "1,000-port UDP range with {} unrelated entries: setup {:.1} ms, teardown {:.1} ms (whole hook)",
        UNRELATED.len(),
        setup.as_secs_f64() * 1e3,
        teardown.as_secs_f64() * 1e3
    );
}
