//! host and none modes against real namespaces: one host-port ledger across all modes.

#[macro_use]
mod common;

use common::*;

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn second_host_mode_claim_fails_while_the_first_keeps_serving() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.host_container(), rig.host_container());
    must_succeed(
        &rig.setup_mode(a, "host", r#"[{"containerPort":18181}]"#),
        "first host claim",
    );
    // The first container's service, on the host's port.
    tcp_server(&rig.host, 18181, "host mode a");
    let id_a = rig.containers[a].id.clone();
    must_fail_with(
        &rig.setup_mode(b, "host", r#"[{"containerPort":18181}]"#),
        &["18181/tcp", &id_a],
    );
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, 18181, PATIENT).unwrap(),
        "host mode a"
    );
    let ports = rig.ports();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["networkMode"], "host");
    assert_eq!(ports[0]["hostPort"], 18181);
    assert_eq!(ports[0]["targetPort"], 18181);
    assert_eq!(
        ports[0]["targetIP"],
        HOST_IP.to_string(),
        "the host's address on its default route"
    );
    // After poststop the claim is free again.
    must_succeed(&rig.poststop(a), "poststop");
    must_succeed(&rig.poststop(a), "poststop again");
    assert!(rig.ports().is_empty());
    rig.containers[a].destroy();
    let c = rig.host_container();
    // Port 18181 is still bound by the test's server standing in for a's process: that is a host
    // listener now, and must be refused as one.
    must_fail_with(
        &rig.setup_mode(c, "host", r#"[{"containerPort":18181}]"#),
        &["in use on the host"],
    );
    must_succeed(
        &rig.setup_mode(c, "host", r#"[{"containerPort":18182}]"#),
        "claim after release",
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn host_claim_and_bridge_static_mapping_exclude_each_other_in_both_orders() {
    let mut rig = Rig::new(CFG);
    let (h, br) = (rig.host_container(), rig.container());
    must_succeed(
        &rig.setup_mode(h, "host", r#"[{"containerPort":8080}]"#),
        "host claim",
    );
    must_fail_with(
        &rig.setup(br, r#"[{"containerPort":80,"hostPort":8080}]"#),
        &["8080/tcp", &rig.containers[h].id.clone()],
    );
    assert!(
        rig.veths().is_empty(),
        "the refused bridge setup left a veth"
    );
    must_succeed(&rig.poststop(h), "release host claim");

    must_succeed(
        &rig.setup(br, r#"[{"containerPort":80,"hostPort":8080}]"#),
        "bridge static",
    );
    let h2 = rig.host_container();
    must_fail_with(
        &rig.setup_mode(h2, "host", r#"[{"containerPort":8080}]"#),
        &["8080/tcp", &rig.containers[br].id.clone()],
    );
    assert_eq!(rig.recorded(), vec![rig.containers[br].id.clone()]);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn host_mode_refuses_listeners_reserved_ports_remaps_and_namespaced_containers() {
    let mut rig = Rig::new(CFG);
    let h = rig.host_container();
    let _l = in_ns(&rig.host, || {
        std::net::TcpListener::bind(("0.0.0.0", 18183)).expect("bind")
    });
    must_fail_with(
        &rig.setup_mode(h, "host", r#"[{"containerPort":18183}]"#),
        &["18183/tcp", "in use on the host"],
    );
    must_fail_with(
        &rig.setup_mode(h, "host", r#"[{"containerPort":22}]"#),
        &["22/tcp", "reserved"],
    );
    must_fail_with(
        &rig.setup_mode(h, "host", r#"[{"containerPort":80,"hostPort":8080}]"#),
        &["hostPort must be absent, 0 or equal"],
    );
    let own = rig.container();
    must_fail_with(
        &rig.setup_mode(own, "host", r#"[{"containerPort":80}]"#),
        &[
            "host mode needs the host's network namespace",
            "linux.namespaces",
        ],
    );
    assert!(rig.recorded().is_empty());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn none_mode_has_only_loopback_up_and_takes_no_mappings() {
    let mut rig = Rig::new(CFG);
    let n = rig.container();
    must_fail_with(
        &rig.setup_mode(n, "none", r#"[{"containerPort":80}]"#),
        &["none takes no port mappings"],
    );
    must_succeed(&rig.setup_mode(n, "none", "[]"), "none");
    let out = std::process::Command::new("/usr/sbin/ip")
        .args(["-n", &rig.containers[n].ns, "-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    // lo really works: a server and a client on 127.0.0.1 inside.
    tcp_server(&rig.containers[n].ns, 7000, "loopback ok");
    assert_eq!(
        tcp_get(
            &rig.containers[n].ns,
            "127.0.0.1".parse().unwrap(),
            7000,
            PATIENT
        )
        .unwrap(),
        "loopback ok"
    );
    let h = rig.host_container();
    must_fail_with(
        &rig.setup_mode(h, "none", "[]"),
        &["needs a network namespace of its own"],
    );
    must_succeed(&rig.poststop(n), "poststop");
    assert!(rig.recorded().is_empty());
}
