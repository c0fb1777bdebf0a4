//! Annotations are written by tenants, the metadata service and the state dir are outside
//! netshim too: every attack here is reproduced against a real (private) host namespace and must
//! end in a one-line `shim:` refusal that changes nothing — the host's and the containers'
//! links, addresses, routes in every table, rules, neighbours, sysctls and nftables ruleset, and
//! the ledger, byte for byte before and after.
#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use common::vpc::*;
use common::*;
use serde_json::json;

/// Everything netshim could change in a namespace, as text.
fn kernel_view(ns: &str) -> String {
    let mut s = String::new();
    // Kernel-owned states that change by themselves (IPv6 duplicate address detection).
    // (IPv6 link-local addresses and their routes come and go by themselves; netshim sets none.)
    let calm = |t: String| {
        t.lines()
            .filter(|l| !l.contains("fe80:"))
            .map(|l| l.replace(" tentative", "").replace(" dadfailed", "") + "\n")
            .collect::<String>()
    };
    for args in [
        vec!["link", "show"],
        vec!["addr", "show"],
        vec!["route", "show", "table", "all"],
        vec!["-6", "route", "show", "table", "all"],
        vec!["rule", "show"],
        vec!["neigh", "show", "nud", "permanent"],
    ] {
        let mut a = vec!["-n", ns];
        a.extend(args);
        s += &calm(ip_text(ns, &a[2..]));
    }
    s += &nft_ruleset_settled(ns);
    // The sysctls netshim sets: forwarding, and per link proxy_arp and route_localnet.
    let sys = command_in(ns, "/bin/sh")
        .args([
            "-c",
            "cat /proc/sys/net/ipv4/ip_forward; for d in /proc/sys/net/ipv4/conf/*; do echo $d $(cat $d/proxy_arp $d/route_localnet); done",
        ])
        .output()
        .expect("sysctls");
    s += &String::from_utf8_lossy(&sys.stdout);
    s
}

/// The host, the given containers and the ledger, for before/after comparison.
/// (host view, container views, ledger files).
type World = (String, Vec<String>, Vec<(String, Vec<u8>)>);

fn world(rig: &Rig, tasks: &[usize]) -> World {
    (
        kernel_view(&rig.host),
        tasks
            .iter()
            .map(|i| kernel_view(&rig.containers[*i].ns))
            .collect(),
        ledger_fingerprint(&rig.state_dir()),
    )
}

/// Runs `attack` and checks it is refused with one line containing `needles`, changing nothing.
fn refused_and_nothing_changed(
    rig: &Rig,
    tasks: &[usize],
    what: &str,
    needles: &[&str],
    attack: impl FnOnce() -> std::process::Output,
) -> std::process::Output {
    let before = world(rig, tasks);
    let out = attack();
    must_fail_with(&out, needles);
    let after = world(rig, tasks);
    same(&before.0, &after.0, &format!("{what}: the host changed"));
    for (b, a) in before.1.iter().zip(&after.1) {
        same(b, a, &format!("{what}: a container changed"));
    }
    assert_eq!(before.2, after.2, "{what}: the ledger changed");
    out
}

/// Fails with the lines that differ.
fn same(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let gone: Vec<&str> = before
        .lines()
        .filter(|l| !after.lines().any(|x| x == *l))
        .collect();
    let new: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|x| x == *l))
        .collect();
    panic!("{what}:\n  gone: {gone:#?}\n  new: {new:#?}");
}

fn awsvpc_state(vpc: &Vpc, i: usize, eni: serde_json::Value) -> String {
    vpc.oci_state(
        i,
        &[
            ("netshim.network-mode", "awsvpc"),
            ("netshim.eni", &eni.to_string()),
        ],
    )
}

fn mac_of(ns: &str, dev: &str) -> String {
    link(ns, dev).expect("link")["address"]
        .as_str()
        .expect("mac")
        .to_string()
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn macs_of_the_host_s_own_plumbing_are_never_taken_as_an_eni() {
    let mut vpc = Vpc::new(&[("eni_wait_seconds", "0.2")]);
    // A bridge container, so netshim's bridge and a veth exist.
    let b = vpc.container();
    must_succeed(
        &vpc.rig.setup(b, r#"[{"containerPort":80}]"#),
        "bridge setup",
    );
    let veth = vpc.veths()[0].clone();
    let victim_eni = vpc.attach_eni();
    let victim = vpc.task();
    vpc.must_setup(victim, &shared(&victim_eni, &["10.0.1.31/24"]), "", None);
    let t = vpc.task();
    let host = vpc.host.clone();
    let cases: Vec<(String, String, Vec<&str>)> = vec![
        (
            "00:00:00:00:00:00".into(),
            "all-zero".into(),
            vec!["is not a unicast MAC address"],
        ),
        (
            mac_of(&host, "lo"),
            "lo".into(),
            vec!["is not a unicast MAC address"],
        ),
        (
            mac_of(&host, "netshim0"),
            "bridge".into(),
            vec!["netshim created"],
        ),
        (
            mac_of(&host, &veth),
            "bridge veth".into(),
            vec!["netshim created"],
        ),
        (
            "ee:ee:ee:ee:ee:ee".into(),
            "shared veth".into(),
            vec!["netshim created"],
        ),
        (
            vpc.primary().mac.clone(),
            "primary".into(),
            vec!["default route"],
        ),
    ];
    for (mac, what, needles) in cases {
        for att in ["exclusive", "shared"] {
            let st = awsvpc_state(
                &vpc,
                t,
                json!({"macAddress": mac, "ipv4Addresses": ["10.0.1.40/24"], "attachment": att}),
            );
            refused_and_nothing_changed(
                &vpc,
                &[b, victim, t],
                &format!("{what} {att}"),
                &needles,
                || vpc.shim(&["hook", "createRuntime"], &st),
            );
        }
    }
    // The shared-ENI veth of another task (its MAC is the fixed ee:…; by name pattern too).
    let nsa = netshim_links(&host)
        .into_iter()
        .find(|l| l.starts_with("nsa"))
        .expect("shared veth");
    ip(&[
        "-n",
        &host,
        "link",
        "set",
        &nsa,
        "address",
        "02:aa:00:00:00:01",
    ]);
    let st = awsvpc_state(
        &vpc,
        t,
        json!({"macAddress": "02:aa:00:00:00:01", "ipv4Addresses": ["10.0.1.40/24"]}),
    );
    refused_and_nothing_changed(
        &vpc,
        &[b, victim, t],
        "another task's veth",
        &["netshim created"],
        || vpc.shim(&["hook", "createRuntime"], &st),
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn interfaces_carrying_any_default_route_or_a_host_address_are_refused() {
    let mut vpc = Vpc::new(&[("eni_wait_seconds", "0.2")]);
    let (e1, e2, e3) = (vpc.attach_eni(), vpc.attach_eni(), vpc.attach_eni());
    let host = vpc.host.clone();
    // e1: a backup uplink, a second default route with a higher metric.
    ip(&[
        "-n",
        &host,
        "addr",
        "add",
        "192.168.90.1/30",
        "dev",
        &e2.name,
    ]);
    ip(&["-n", &host, "link", "set", &e1.name, "up"]);
    ip(&[
        "-n", &host, "route", "add", "default", "dev", &e1.name, "metric", "500",
    ]);
    // e3: a next hop of an ECMP default route in another table.
    ip(&["-n", &host, "link", "set", &e3.name, "up"]);
    ip(&[
        "-n", &host, "route", "add", "default", "table", "77", "nexthop", "dev", &e3.name,
        "nexthop", "dev", &e1.name,
    ]);
    let t = vpc.task();
    for (e, needle) in [
        (&e1, "holds a default route"),
        (&e3, "holds a default route"),
        (&e2, "carries the host's address 192.168.90.1"),
    ] {
        let st = awsvpc_state(
            &vpc,
            t,
            json!({"macAddress": e.mac, "ipv4Addresses": ["10.0.1.40/24"]}),
        );
        refused_and_nothing_changed(&vpc, &[t], &e.name, &[needle], || {
            vpc.shim(&["hook", "createRuntime"], &st)
        });
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn shared_eni_addresses_and_host_ips_must_belong_to_the_request() {
    let mut vpc = Vpc::new(&[]);
    let e = vpc.attach_eni();
    let t = vpc.task();
    let host = vpc.host.clone();
    // The host's own address, the gateway, the network and broadcast addresses.
    for (addr, needle) in [
        (format!("{HOST_IP}/30"), "an address of this host"),
        ("10.0.1.1/24".to_string(), "is the subnet gateway"),
        ("10.0.1.0/24".to_string(), "network address"),
        ("10.0.1.255/24".to_string(), "broadcast address"),
    ] {
        let gw = if addr.starts_with("192.168") {
            CLIENT_IP.to_string()
        } else {
            "10.0.1.1".to_string()
        };
        let spec = json!({"macAddress": e.mac, "attachment": "shared", "ipv4Addresses": [addr], "subnetGatewayIpv4Address": gw});
        let st = awsvpc_state(&vpc, t, spec);
        refused_and_nothing_changed(&vpc, &[t], &addr, &[needle], || {
            vpc.shim(&["hook", "createRuntime"], &st)
        });
    }
    // hostIp must be an address of the host.
    let c = vpc.container();
    for bad in ["8.8.8.8", "10.213.0.5", "255.255.255.255", "224.0.0.1"] {
        let maps = format!(r#"[{{"containerPort":80,"hostIp":"{bad}"}}]"#);
        refused_and_nothing_changed(&vpc, &[c], bad, &["hostIp"], || vpc.rig.setup(c, &maps));
    }
    let maps = format!(r#"[{{"containerPort":80,"hostIp":"{HOST_IP}"}}]"#);
    must_succeed(&vpc.rig.setup(c, &maps), "hostIp of the host");
    assert!(ip_text(&host, &["addr"]).contains(&HOST_IP.to_string()));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_setup_reusing_a_live_container_s_id_never_tears_it_down() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup a");
    tcp_server(&rig.containers[a].ns, 80, "victim");
    let port = rig.host_port(a, 80, "tcp");
    // An attacker's container (another netns and pid) sends the victim's id.
    let b = rig.container();
    let st = rig
        .oci_state(b, &[("netshim.network-mode", "bridge")])
        .replace(&rig.containers[b].id, &rig.containers[a].id);
    refused_and_nothing_changed(
        &rig,
        &[a, b],
        "reused id",
        &["already recorded for a live container"],
        || rig.shim(&["hook", "createRuntime"], &st),
    );
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, port, PATIENT).as_deref(),
        Ok("victim")
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_bogus_mac_waits_outside_the_lock_and_stalls_no_one_else() {
    let mut vpc = Vpc::new(&[("eni_wait_seconds", "3")]);
    let t = vpc.task();
    let st = awsvpc_state(
        &vpc,
        t,
        json!({"macAddress": "02:de:ad:00:00:01", "ipv4Addresses": ["10.0.1.40/24"]}),
    );
    let c = vpc.container();
    thread::scope(|s| {
        let waiting = s.spawn(|| vpc.shim(&["hook", "createRuntime"], &st));
        thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        must_succeed(
            &vpc.rig.setup(c, r#"[{"containerPort":80}]"#),
            "a bridge setup meanwhile",
        );
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the bridge setup waited {:?} behind the ENI wait",
            t0.elapsed()
        );
        must_fail_with(
            &waiting.join().expect("join"),
            &["no interface with MAC 02:de:ad:00:00:01"],
        );
    });
}

/// A metadata service that misbehaves in one way, on the host's loopback.
fn hostile_metadata(ns: &str, how: &'static str) -> u16 {
    let l = in_ns(ns, || TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.read(&mut buf);
                match how {
                    "huge" => {
                        let _ =
                            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 268435456\r\n\r\n");
                        let chunk = vec![b'1'; 65536];
                        for _ in 0..4096 {
                            if s.write_all(&chunk).is_err() {
                                break;
                            }
                        }
                    }
                    "drip" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
                        for _ in 0..100 {
                            thread::sleep(Duration::from_millis(1500));
                            if s.write_all(b"1").is_err() {
                                break;
                            }
                        }
                    }
                    "crlf" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\nabc\r\nX-Evil: 1\r\n\r\n");
                    }
                    _ => thread::sleep(Duration::from_secs(30)), // silent
                }
            });
        }
    });
    port
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_hostile_metadata_service_gets_a_bounded_short_refusal() {
    for how in ["huge", "drip", "silent", "crlf"] {
        let mut vpc = Vpc::new(&[]);
        let e = vpc.attach_eni();
        let port = hostile_metadata(&vpc.host, how);
        vpc.configure(&[("metadata_endpoint", &format!("\"http://127.0.0.1:{port}\""))]);
        let t = vpc.task();
        let st = awsvpc_state(&vpc, t, json!({"macAddress": e.mac}));
        let t0 = Instant::now();
        let out = refused_and_nothing_changed(&vpc, &[t], how, &["instance metadata"], || {
            vpc.shim(&["hook", "createRuntime"], &st)
        });
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(8),
            "{how}: the lookup took {took:?}"
        );
        let err = stderr(&out);
        assert!(err.len() < 600, "{how}: a {}-byte error line", err.len());
        if how == "crlf" {
            assert!(err.contains("not one a header can carry"), "{err}");
        }
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_state_dir_others_can_write_is_refused_and_forged_records_are_not_acted_on() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    // Writable by others: refused before anything is read from it.
    let sd = rig.state_dir();
    fs::set_permissions(&sd, fs::Permissions::from_mode(0o777)).unwrap();
    let b = rig.container();
    refused_and_nothing_changed(
        &rig,
        &[b],
        "world-writable state dir",
        &["is not safe", "writable by group or others"],
        || rig.setup(b, "[]"),
    );
    fs::set_permissions(&sd, fs::Permissions::from_mode(0o700)).unwrap();
    // A forged record naming a link and a pin that are not netshim's: poststop refuses it.
    let victim = sd.with_extension("victim");
    fs::write(&victim, b"keep").unwrap();
    let forged = json!({"id": "forged", "mode": "awsvpc", "created": 0,
        "veth": "lo",
        "eni": {"mac": "02:00:00:00:00:09", "name": "lo", "attachment": "exclusive",
                "netnsPin": victim}});
    fs::write(sd.join("containers/forged.json"), forged.to_string()).unwrap();
    let out = rig.shim(
        &["hook", "poststop"],
        r#"{"ociVersion":"1.0.2","id":"forged","status":"stopped"}"#,
    );
    must_fail_with(&out, &["corrupt", "is not a name netshim gives"]);
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(link(&rig.host, "lo").is_some());
    // gc moves it aside and says so.
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved corrupt record"));
    fs::remove_file(&victim).unwrap();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn ids_and_names_with_control_characters_never_reach_a_terminal_raw() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    for id in ["x\u{1b}]0;owned\u{7}", "y\u{9b}2J", "a/../b"] {
        let st = rig
            .oci_state(a, &[("netshim.network-mode", "bridge")])
            .replace(
                &rig.containers[a].id,
                &id.replace('\u{1b}', "\\u001b")
                    .replace('\u{9b}', "\\u009b")
                    .replace('\u{7}', "\\u0007"),
            );
        let out = refused_and_nothing_changed(
            &rig,
            &[a],
            "control id",
            &["is not a container id"],
            || rig.shim(&["hook", "createRuntime"], &st),
        );
        assert!(
            !stderr(&out).trim_end().chars().any(char::is_control),
            "{:?}",
            stderr(&out)
        );
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_bridge_name_that_names_another_interface_is_left_alone() {
    let mut rig = Rig::new(&format!("{CFG}[bridge]\nname = \"lo\"\n"));
    let a = rig.container();
    refused_and_nothing_changed(
        &rig,
        &[a],
        "bridge named lo",
        &["names an existing interface netshim did not create"],
        || rig.setup(a, r#"[{"containerPort":80}]"#),
    );
    fs::write(
        rig.config_path(),
        format!("{CFG}[bridge]\nname = \"{}a\"\n", rig.prefix),
    )
    .unwrap();
    refused_and_nothing_changed(
        &rig,
        &[a],
        "bridge named after the uplink",
        &["names an existing interface"],
        || rig.setup(a, r#"[{"containerPort":80}]"#),
    );
    // reset never deletes it either.
    let out = rig.shim(&["reset"], "");
    must_fail_with(&out, &["is not netshim's bridge"]);
    assert!(link(&rig.host, "lo").is_some());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn misuse_of_the_command_line_as_a_hook_ends_in_one_line() {
    let rig = Rig::new(CFG);
    for args in [
        vec!["hook", "foo"],
        vec!["hook"],
        vec!["hook", "createRuntime", "extra"],
    ] {
        let out = rig.shim(&args, "{}");
        let e = stderr(&out);
        assert!(!out.status.success());
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e:?}");
        assert!(e.starts_with("shim: hook: "), "{e}");
    }
}
