//! The nftables netshim programs over netlink is the one it used to write as nft text: the
//! host table and a task table are compared, normalised, with the text loaded by `nft -f` into
//! a namespace of their own. Plus what the health check and the element listing are for: a
//! flushed table is noticed and rebuilt by the next setup, stray and lost map elements are
//! fixed by `shim gc`, and two instances in one namespace keep separate tables.

#[macro_use]
mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;
use serde_json::Value;

/// The host table exactly as netshim wrote it in nft syntax (bridge and subnet filled in).
/// What `zone_out` says.
const ZONE: &str = "UDP to a mapped host port: looked up in its mapping's conntrack zone, so no entry made before the mapping catches it";

fn old_host_table(br: &str, net: &str) -> String {
    let zone = ZONE;
    format!(
        r#"table ip netshim {{
	map ports {{
		comment "protocol . host port -> container address . port (all host addresses)"
		type inet_proto . inet_service : ipv4_addr . inet_service
		flags timeout
	}}
	map ports_ip {{
		comment "host address . protocol . host port -> container address . port (one host address)"
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		flags timeout
	}}
	set mapped {{
		comment "protocol . host port of every mapping, for the loopback guard"
		type inet_proto . inet_service
		flags timeout
	}}
	map zones {{
		comment "UDP host port -> conntrack zone of its mapping (all host addresses)"
		typeof udp dport : ct zone
		flags timeout
	}}
	map zones_ip {{
		comment "host address . UDP host port -> conntrack zone of its mapping (one host address)"
		typeof ip daddr . udp dport : ct zone
		flags timeout
	}}
	chain guard {{
		comment "drop packets for a mapped port sent to 127.0.0.0/8 from outside the host; UDP to a mapped port: its conntrack zone"
		type filter hook prerouting priority raw; policy accept;
		iifname != "lo" ip daddr 127.0.0.0/8 meta l4proto . th dport @mapped counter drop
		meta l4proto udp fib daddr type local jump udp_zone
	}}
	chain zone_out {{
		comment "{zone}"
		type filter hook output priority raw; policy accept;
		meta l4proto udp fib daddr type local jump udp_zone
	}}
	chain udp_zone {{
		ct original zone set ip daddr . udp dport map @zones_ip
		ct original zone set udp dport map @zones
	}}
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local meta l4proto {{ tcp, udp }} jump dnat_ports
	}}
	chain output {{
		type nat hook output priority -100; policy accept;
		fib daddr type local meta l4proto {{ tcp, udp }} jump dnat_ports
	}}
	chain dnat_ports {{
		dnat ip to ip daddr . meta l4proto . th dport map @ports_ip
		dnat ip to meta l4proto . th dport map @ports
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "{br}" ip saddr 127.0.0.0/8 masquerade comment "host to 127.0.0.1:hostPort"
		oifname "{br}" ip saddr {net} ct status dnat masquerade comment "hairpin: container to a host port"
		ip saddr {net} oifname != "{br}" masquerade comment "egress"
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		oifname "{br}" ct state established,related accept
		oifname "{br}" ct status dnat accept
		iifname "{br}" accept
	}}
}}
"#
    )
}

/// The old `add element` lines for one mapping (as `ports list --json` reports it).
/// The elements of mapping `p`; a UDP one's zone is `zone`.
fn old_elements(p: &Value, zone: u16) -> String {
    let (proto, host, cport) = (
        p["protocol"].as_str().unwrap(),
        p["hostPort"].as_u64().unwrap(),
        p["containerPort"].as_u64().unwrap(),
    );
    let ip = p["containerIP"].as_str().unwrap();
    let bind = p["bindIP"].as_str().unwrap();
    let element = if bind == "0.0.0.0" {
        format!("add element ip netshim ports {{ {proto} . {host} : {ip} . {cport} }}\n")
    } else {
        format!(
            "add element ip netshim ports_ip {{ {bind} . {proto} . {host} : {ip} . {cport} }}\n"
        )
    };
    let zone = match (proto, bind) {
        ("udp", "0.0.0.0") => format!("add element ip netshim zones {{ {host} : {zone} }}\n"),
        ("udp", _) => {
            format!("add element ip netshim zones_ip {{ {bind} . {host} : {zone} }}\n")
        }
        _ => String::new(),
    };
    element + &zone + &format!("add element ip netshim mapped {{ {proto} . {host} }}\n")
}

/// Loads nft text into netns `ns`.
fn nft_load(ns: &str, text: &str) {
    let mut c = command_in(ns, "/usr/sbin/nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "nft -f: {}\n{text}", stderr(&out));
}

/// `nft -j list table FAMILY NAME` in `ns`, without what differs between two equal tables:
/// handles, counters' values, the order of elements in a set.
fn listed(ns: &str, family: &str, table: &str) -> Value {
    let out = command_in(ns, "/usr/sbin/nft")
        .args(["-j", "list", "table", family, table])
        .output()
        .expect("nft");
    assert!(out.status.success(), "nft list: {}", stderr(&out));
    let mut v: Value = serde_json::from_slice(&out.stdout).expect("nft json");
    fn norm(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                m.remove("metainfo");
                if let Some(Value::Object(c)) = m.get_mut("counter") {
                    c.insert("packets".into(), 0.into());
                    c.insert("bytes".into(), 0.into());
                }
                m.values_mut().for_each(norm);
                for k in ["elem", "set"] {
                    if let Some(Value::Array(a)) = m.get_mut(k) {
                        a.sort_by_key(|x| x.to_string());
                    }
                }
            }
            Value::Array(a) => {
                a.iter_mut().for_each(norm);
                a.retain(|x| !matches!(x, Value::Object(m) if m.is_empty()));
            }
            _ => {}
        }
    }
    norm(&mut v);
    v
}

fn assert_same(ours: &Value, old: &Value) {
    assert!(
        ours == old,
        "tables differ\nnetlink:\n{}\ntext:\n{}",
        serde_json::to_string_pretty(ours).unwrap(),
        serde_json::to_string_pretty(old).unwrap()
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn tables_match_the_nft_text_they_replace() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.container(), rig.container());
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"},{"containerPortRange":"7000-7001"}]"#,
        ),
        "setup a",
    );
    let ingress = r#"[{"protocol":"tcp","port":80,"cidr":"192.168.77.2/32"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"},{"protocol":"tcp","port":22,"cidr":"10.0.0.0/20"},{"protocol":"udp","portRange":"1-65535","cidr":"fd00:1234:5678::/57"}]"#;
    let st = rig.oci_state(
        b,
        &[
            ("netshim.network-mode", "bridge"),
            (
                "netshim.port-mappings",
                r#"[{"containerPort":9000,"hostPort":19000,"hostIp":"127.0.0.1"},{"containerPort":9001,"protocol":"udp","hostPort":19001,"hostIp":"192.168.77.1"}]"#,
            ),
            ("netshim.ingress", ingress),
        ],
    );
    must_succeed(&rig.shim(&["hook", "createRuntime"], &st), "setup b");

    // The same table written as text, with every mapping the ledger reports.
    let text_ns = format!("{}t", rig.prefix);
    ip(&["netns", "add", &text_ns]);
    rig.extra_ns.push(text_ns.clone());
    let mut text = old_host_table("netshim0", "10.213.0.0/16");
    let ports = rig.ports();
    assert_eq!(ports.len(), 6, "{ports:?}");
    // Zones go round from 1: a's UDP mappings share the first, b's the second.
    let ida = rig.containers[a].id.clone();
    for p in &ports {
        let zone = if p["containerId"] == ida.as_str() {
            1
        } else {
            2
        };
        text += &old_elements(p, zone);
    }
    nft_load(&text_ns, &text);
    let ours = listed(&rig.host, "ip", "netshim");
    assert_same(&ours, &listed(&text_ns, "ip", "netshim"));
    // The comparison sees elements: one missing mapping is a difference.
    rig.nft(&[
        "delete",
        "element",
        "ip",
        "netshim",
        "mapped",
        "{ udp . 19001 }",
    ]);
    assert_ne!(
        listed(&rig.host, "ip", "netshim"),
        listed(&text_ns, "ip", "netshim")
    );

    // b's task table (ingress only: a bridge container keeps metadata access).
    nft_load(
        &text_ns,
        "table inet netshim_task {
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
		iifname \"lo\" accept
		ip saddr 192.168.77.2/32 tcp dport 80 accept
		ip6 saddr fd00::/8 udp dport 8000-8010 accept
		ip saddr 10.0.0.0/20 tcp dport 22 accept
		ip6 saddr fd00:1234:5678::/57 udp dport 1-65535 accept
		ct state new drop
	}
}
",
    );
    assert_same(
        &listed(&rig.containers[b].ns, "inet", "netshim_task"),
        &listed(&text_ns, "inet", "netshim_task"),
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_flushed_table_is_noticed_and_the_next_setup_rebuilds_it() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.container(), rig.container());
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup a");
    tcp_server(&rig.containers[a].ns, 80, "a");
    let pa = rig.host_port(a, 80, "tcp");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "a");
    // Rules gone, maps and elements kept: nothing answers.
    rig.nft(&["flush", "table", "ip", "netshim"]);
    assert!(tcp_get(&rig.client, HOST_IP, pa, SHORT).is_err());
    must_succeed(&rig.setup(b, r#"[{"containerPort":80}]"#), "setup b");
    tcp_server(&rig.containers[b].ns, 80, "b");
    let pb = rig.host_port(b, 80, "tcp");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "a");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pb, PATIENT).unwrap(), "b");
    // gc does the same for a flushed table with no setup coming.
    rig.nft(&["flush", "table", "ip", "netshim"]);
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(
            "rebuilt firewall table ip netshim (damaged: chain dnat_ports has 0 of 2 rules"
        ),
        "{said}"
    );
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "a");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn gc_deletes_map_elements_no_record_knows_and_restores_lost_ones() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup a");
    tcp_server(&rig.containers[a].ns, 80, "a");
    let pa = rig.host_port(a, 80, "tcp");
    // What a setup killed after its transaction leaves: elements with no record.
    rig.nft(&[
        "add",
        "element",
        "ip",
        "netshim",
        "ports",
        "{ tcp . 40999 : 10.213.0.250 . 80 }",
    ]);
    rig.nft(&[
        "add",
        "element",
        "ip",
        "netshim",
        "mapped",
        "{ tcp . 40999 }",
    ]);
    // And a mapping the kernel lost.
    let key = format!("{{ tcp . {pa} }}");
    rig.nft(&["delete", "element", "ip", "netshim", "ports", &key]);
    assert!(tcp_get(&rig.client, HOST_IP, pa, SHORT).is_err());
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    for line in [
        "deleted stray element ports { tcp . 40999 : 10.213.0.250 . 80 }".to_string(),
        "deleted stray element mapped { tcp . 40999 }".to_string(),
        format!("restored element ports {{ tcp . {pa} : "),
    ] {
        assert!(said.contains(&line), "{said:?} lacks {line:?}");
    }
    let els = rig.nft_elements();
    assert!(!els.contains("40999"), "{els}");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "a");
    // Nothing left to fix.
    let out = rig.shim(&["gc"], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn two_instances_in_one_namespace_keep_separate_tables() {
    let mut rig = Rig::new(CFG);
    let (a, b) = (rig.container(), rig.container());
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup a");
    tcp_server(&rig.containers[a].ns, 80, "first");
    let pa = rig.host_port(a, 80, "tcp");
    // A second instance: its own bridge, subnet, state and config.
    let dir = rig.dir.join("second");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        "[bridge]\nname = \"nsb2\"\nsubnet = \"10.214.0.0/16\"\n[ports]\ndynamic_range = \"41000-41999\"\n",
    )
    .unwrap();
    let second = |args: &[&str], stdin: &str| {
        let mut c = command_in(&rig.host, SHIM);
        c.args(args)
            .env_clear()
            .env("NETSHIM_STATE_DIR", dir.join("state"))
            .env("NETSHIM_CONFIG", &cfg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let st = rig.oci_state(
        b,
        &[
            ("netshim.network-mode", "bridge"),
            ("netshim.port-mappings", r#"[{"containerPort":80}]"#),
        ],
    );
    must_succeed(&second(&["hook", "createRuntime"], &st), "setup b");
    tcp_server(&rig.containers[b].ns, 80, "second");
    let listed = String::from_utf8_lossy(&rig.nft(&["list", "tables"]).stdout).to_string();
    assert!(listed.contains("table ip netshim\n"), "{listed}");
    assert!(listed.contains("table ip netshim_nsb2\n"), "{listed}");
    let ports: Value =
        serde_json::from_slice(&second(&["ports", "list", "--json"], "").stdout).unwrap();
    let pb = ports[0]["hostPort"].as_u64().unwrap() as u16;
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, pb, PATIENT).unwrap(),
        "second"
    );
    // One instance's reload and reset leave the other alone.
    must_succeed(&second(&["reload"], ""), "reload second");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "first");
    must_succeed(&second(&["reset", "--force"], ""), "reset second");
    assert_eq!(tcp_get(&rig.client, HOST_IP, pa, PATIENT).unwrap(), "first");
    let listed = String::from_utf8_lossy(&rig.nft(&["list", "tables"]).stdout).to_string();
    assert!(!listed.contains("netshim_nsb2"), "{listed}");
}
