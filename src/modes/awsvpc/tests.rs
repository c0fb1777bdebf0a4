//! awsvpc setup, rollback and teardown over the fake kernel: every kernel step of every
//! attachment made to fail in turn, and what each one leaves behind.

use std::collections::HashMap;
use std::net::IpAddr;

use super::testkit::*;
use super::*;
use crate::kernel::At;
use crate::request::NetworkRequest;

/// Every kernel call a successful apply of `req` makes, each with its occurrence number
/// (`("set_link", 2)`: the second `set_link`), in order.
fn apply_steps(req: fn() -> NetworkRequest, prepare: fn(&mut Kit)) -> Vec<(&'static str, usize)> {
    let mut kit = Kit::new();
    prepare(&mut kit);
    let mut t = kit.task("a", req());
    kit.plan(&mut t).unwrap();
    kit.k.calls.clear();
    kit.apply(&t).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    kit.k
        .calls
        .iter()
        .map(|c| {
            let n = seen.entry(c.clone()).or_default();
            *n += 1;
            (&*Box::leak(c.clone().into_boxed_str()), *n)
        })
        .collect()
}

/// Plans `req` for task "a", then applies it with the `nth` call of `step` failing.
fn fail_apply(kit: &mut Kit, req: NetworkRequest, step: &'static str, nth: usize) -> Task {
    let mut t = kit.task("a", req);
    kit.plan(&mut t).unwrap();
    kit.k.fail_call(step, nth);
    let e = kit
        .apply(&t)
        .expect_err(&format!("{step} #{nth} must fail the setup"));
    let msg = format!("{e:#}");
    assert!(
        !msg.contains("rollback incomplete"),
        "{step} #{nth}: the rollback must finish: {msg}"
    );
    t
}

fn nothing(_: &mut Kit) {}

#[test]
fn awsvpc_ports_are_the_container_ports() {
    let m = crate::request::parse_mappings(
        r#"[{"containerPort":80},{"containerPort":81,"hostPort":81}]"#,
    )
    .unwrap();
    let p = ports(&m);
    assert_eq!(p.len(), 2);
    assert!(
        p.iter()
            .all(|r| r.host_port == r.container_port && !r.dynamic)
    );
}

// ---- exclusive ------------------------------------------------------------------------------

#[test]
fn exclusive_setup_configures_the_eni_in_the_task() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", exclusive());
    kit.setup(&mut t).unwrap();
    assert!(kit.host_link(ENI_MAC).is_none(), "the ENI left the host");
    let inside = kit.task_links(&t);
    assert_eq!(inside.len(), 1, "{inside:?}");
    let eth0 = &inside[0];
    assert_eq!(
        (eth0.name.as_str(), eth0.mac, eth0.up, eth0.mtu),
        ("eth0", Some(ENI_MAC), true, Some(9001))
    );
    let ns = kit.k.state(At::Netns(t.ns));
    assert_eq!(ns.addrs.len(), 2, "{:?}", ns.addrs);
    assert_eq!(ns.routes.len(), 2, "both default routes: {:?}", ns.routes);
    assert!(ns.links.iter().any(|l| l.loopback && l.up), "lo up");
    assert_eq!(kit.k.count("nft_in"), 1, "the task's firewall");
    assert_eq!(kit.k.pins.len(), 1);
}

#[test]
fn exclusive_eni_failing_at_each_step_goes_home_as_it_was() {
    let steps = apply_steps(exclusive, nothing);
    for want in [
        "pin",
        "set_alias",
        "move_link",
        "add_addr",
        "add_route",
        "nft_in",
    ] {
        assert!(
            steps.iter().any(|(s, _)| *s == want),
            "{want} not among {steps:?}"
        );
    }
    for (step, nth) in steps {
        let mut kit = Kit::new();
        let t = fail_apply(&mut kit, exclusive(), step, nth);
        let what = format!("{step} #{nth}");
        kit.assert_eni_home(&what);
        assert!(
            kit.task_links(&t).is_empty(),
            "{what}: left in the task: {:?}",
            kit.task_links(&t)
        );
    }
}

#[test]
fn a_failing_exclusive_step_is_named_in_the_error() {
    for (step, nth, want) in [
        ("pin", 1, "pin the task's netns at /run/netshim-kit/netns/a"),
        ("set_alias", 1, "record the original name in the link alias"),
        ("move_link", 1, "move eth1 into the task's netns as eth0"),
        ("set_link", 2, "set the MTU to 9001"),
        ("add_addr", 2, "add 2600:1f14::23/64"),
        ("add_route", 1, "default route via 10.0.1.1"),
        ("nft_in", 1, "program the task's firewall"),
    ] {
        let mut kit = Kit::new();
        let mut t = kit.task("a", exclusive());
        kit.plan(&mut t).unwrap();
        kit.k.fail_call(step, nth);
        let msg = format!("{:#}", kit.apply(&t).unwrap_err());
        assert!(msg.contains(want), "{step} #{nth}: {msg}");
    }
}

#[test]
fn an_exclusive_eni_meeting_a_taken_name_in_the_task_goes_home() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", exclusive());
    kit.plan(&mut t).unwrap();
    // Something called eth0 appears in the task after the plan checked: the kernel moves the
    // ENI in under its own name, then refuses the rename (EEXIST). The rollback must fetch it
    // back from the task rather than look for it on the host.
    kit.k.at(At::Netns(t.ns)).links.push(Link {
        index: 900,
        name: "eth0".into(),
        kind: Some("dummy".into()),
        ..Link::default()
    });
    let msg = format!("{:#}", kit.apply(&t).unwrap_err());
    assert!(
        msg.contains("move eth1 into the task's netns as eth0") && msg.contains("os error 17"),
        "{msg}"
    );
    assert!(!msg.contains("rollback incomplete"), "{msg}");
    kit.assert_eni_home("taken eth0");
}

#[test]
fn exclusive_teardown_hands_the_eni_back_down_under_its_name() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", exclusive());
    kit.setup(&mut t).unwrap();
    kit.teardown("a").unwrap();
    let l = kit.host_link(ENI_MAC).expect("on the host");
    assert_eq!(
        (l.name.as_str(), l.up, l.mtu),
        (ENI_NAME, false, Some(ENI_MTU))
    );
    assert_eq!(l.alias, None);
    assert!(kit.k.pins.is_empty());
    assert!(kit.task_links(&t).is_empty());
    // Idempotent.
    kit.state.insert(t.record());
    kit.teardown("a").unwrap();
}

#[test]
fn exclusive_teardown_after_the_netns_died_renames_what_the_kernel_returned() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", exclusive());
    kit.setup(&mut t).unwrap();
    // The pin was lost and the netns died: the kernel hands the NIC back as it was named inside.
    kit.k.destroy_netns(t.ns);
    assert_eq!(kit.host_link(ENI_MAC).unwrap().name, "eth0");
    kit.teardown("a").unwrap();
    let l = kit.host_link(ENI_MAC).unwrap();
    assert_eq!(
        (l.name.as_str(), l.up, l.mtu),
        (ENI_NAME, false, Some(ENI_MTU))
    );
    assert!(kit.k.pins.is_empty());
}

#[test]
fn exclusive_teardown_reports_a_name_taken_on_the_host_and_keeps_going() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", exclusive());
    kit.setup(&mut t).unwrap();
    kit.k.destroy_netns(t.ns);
    // Meanwhile another interface took the ENI's name on the host.
    kit.k.add_host_link(Link {
        name: ENI_NAME.into(),
        mac: Some(MacAddr([0x02, 0, 0, 0, 0, 0x99])),
        ..Link::default()
    });
    let errs = kit.teardown("a").unwrap_err();
    let msg = errs.to_string();
    assert!(
        msg.contains("restore ENI on the host 02:00:00:00:00:11") && msg.contains("os error 17"),
        "{msg}"
    );
    assert!(kit.k.pins.is_empty(), "the pin is released all the same");
}

// ---- shared ---------------------------------------------------------------------------------

fn eni_down(kit: &mut Kit) {
    for l in &mut kit.k.at(At::Host).links {
        if l.mac == Some(ENI_MAC) {
            l.up = false;
        }
    }
}

/// The host as a shared ENI's first task found it: no veth, rule or route of netshim's.
fn assert_shared_clean(kit: &Kit, what: &str) {
    let names = kit.k.host_link_names();
    assert_eq!(names, vec![ENI_NAME, TRUNK_NAME], "{what}: links left");
    assert!(
        kit.k.rules.is_empty(),
        "{what}: rules left: {:?}",
        kit.k.rules
    );
    let routes = kit.k.state(At::Host).routes;
    assert!(routes.is_empty(), "{what}: routes left: {routes:?}");
}

#[test]
fn shared_eni_failing_at_each_step_restores_the_host() {
    let steps = apply_steps(shared, eni_down);
    for want in ["set_conf", "add_pair", "add_rule", "add_neigh", "nft_in"] {
        assert!(steps.iter().any(|(s, _)| *s == want), "{want}: {steps:?}");
    }
    for (step, nth) in steps {
        let mut kit = Kit::new();
        eni_down(&mut kit);
        let t = fail_apply(&mut kit, shared(), step, nth);
        let what = format!("{step} #{nth}");
        assert_shared_clean(&kit, &what);
        let eni = kit.host_link(ENI_MAC).unwrap();
        assert!(!eni.up, "{what}: the ENI was down before");
        let proxy = kit.k.sysctls.get("eth1/proxy_arp").map(String::as_str);
        assert!(
            matches!(proxy, None | Some("0")),
            "{what}: proxy_arp {proxy:?}"
        );
        assert!(kit.task_links(&t).is_empty(), "{what}");
    }
}

#[test]
fn a_failing_second_user_keeps_the_first_users_table() {
    let mut kit = Kit::new();
    let mut a = kit.task("a", shared());
    kit.setup(&mut a).unwrap();
    let routes = kit.k.state(At::Host).routes;
    let rules = kit.k.rules.clone();
    let mut b = kit.task("b", shared());
    kit.plan(&mut b).unwrap();
    kit.k.fail_call("nft_in", 1);
    kit.apply(&b).unwrap_err();
    assert_eq!(kit.k.state(At::Host).routes, routes);
    assert_eq!(kit.k.rules, rules);
    assert!(kit.host_link(ENI_MAC).unwrap().up);
}

#[test]
fn only_the_last_user_of_a_shared_eni_removes_its_table() {
    let mut kit = Kit::new();
    let mut a = kit.task("a", shared());
    let mut b = kit.task("b", shared());
    kit.setup(&mut a).unwrap();
    kit.setup(&mut b).unwrap();
    let table = a
        .plan
        .as_ref()
        .unwrap()
        .eni
        .as_ref()
        .unwrap()
        .table
        .unwrap();
    let in_table = |kit: &Kit| {
        kit.k
            .state(At::Host)
            .routes
            .iter()
            .filter(|r| r.table == table)
            .count()
    };
    assert_eq!(in_table(&kit), 2, "the subnet and the default route");
    assert_eq!(kit.k.rules.len(), 2);
    let (ip_a, ip_b) = (a.record().ip.unwrap(), b.record().ip.unwrap());
    assert_ne!(ip_a, ip_b);

    kit.teardown("a").unwrap();
    assert_eq!(in_table(&kit), 2, "b still routes through the table");
    assert_eq!(kit.k.rules, vec![(ip_b, table, shared::RULE_PRIORITY)]);
    let host_routes: Vec<_> = kit
        .k
        .state(At::Host)
        .routes
        .into_iter()
        .filter(|r| r.table == crate::kernel::MAIN_TABLE)
        .map(|r| r.dst)
        .collect();
    assert_eq!(host_routes, vec![IpAddr::V4(ip_b)]);

    kit.teardown("b").unwrap();
    assert_eq!(in_table(&kit), 0, "the last user takes the table with it");
    assert_shared_clean(&kit, "after both");
}

#[test]
fn an_exhausted_shared_eni_says_how_many_are_in_use() {
    let mut kit = Kit::new();
    let mut a = kit.task("a", shared());
    let mut b = kit.task("b", shared());
    kit.setup(&mut a).unwrap();
    kit.setup(&mut b).unwrap();
    let mut c = kit.task("c", shared());
    let msg = format!("{:#}", kit.plan(&mut c).unwrap_err());
    assert_eq!(
        msg,
        "no free secondary IP on ENI 02:00:00:00:00:11 (2 of 2 in use): add secondary addresses to the ENI or use another one"
    );
    // One leaves: its address is free again.
    kit.teardown("a").unwrap();
    kit.plan(&mut c).unwrap();
    assert_eq!(c.record().ip, a.record().ip);
}

#[test]
fn a_failed_veth_deletion_is_reported_and_the_rest_still_released() {
    let mut kit = Kit::new();
    let mut a = kit.task("a", shared());
    kit.setup(&mut a).unwrap();
    let veth = a.record().eni.unwrap().veth.unwrap();
    kit.k.fail_call("del_link", 1);
    let errs = kit.teardown("a").unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].step, "delete veth");
    assert_eq!(errs.0[0].object, veth);
    assert!(kit.k.rules.is_empty(), "the rule went all the same");
    assert!(kit.state.record("a").is_some(), "kept for `shim gc`");
    // The retry finishes the job.
    kit.teardown("a").unwrap();
    assert_shared_clean(&kit, "after the retry");
}

// ---- branch ---------------------------------------------------------------------------------

fn assert_no_branch(kit: &Kit, t: &Task, what: &str) {
    assert!(
        kit.task_links(t).is_empty(),
        "{what}: {:?}",
        kit.task_links(t)
    );
    assert!(kit.host_link(BRANCH_MAC).is_none(), "{what}");
    let trunk = kit.host_link(TRUNK_MAC).unwrap();
    assert!(!trunk.up, "{what}: the trunk was down before");
    assert!(kit.k.pins.is_empty(), "{what}: pins left");
}

#[test]
fn branch_failing_at_each_step_deletes_its_vlan() {
    let steps = apply_steps(branch, nothing);
    for want in ["pin", "add_vlan", "add_addr", "nft_in"] {
        assert!(steps.iter().any(|(s, _)| *s == want), "{want}: {steps:?}");
    }
    for (step, nth) in steps {
        let mut kit = Kit::new();
        let t = fail_apply(&mut kit, branch(), step, nth);
        assert_no_branch(&kit, &t, &format!("{step} #{nth}"));
    }
}

#[test]
fn branch_setup_then_teardown() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", branch());
    kit.setup(&mut t).unwrap();
    let inside = kit.task_links(&t);
    assert_eq!(inside.len(), 1);
    assert_eq!(
        (inside[0].kind.as_deref(), inside[0].vlan_id, inside[0].mac),
        (Some("vlan"), Some(42), Some(BRANCH_MAC))
    );
    assert!(kit.host_link(TRUNK_MAC).unwrap().up, "the trunk carries it");
    kit.teardown("a").unwrap();
    assert!(kit.task_links(&t).is_empty());
    assert!(kit.k.pins.is_empty());
}

#[test]
fn a_taken_vlan_is_refused_by_name() {
    let mut kit = Kit::new();
    let mut a = kit.task("a", branch());
    kit.setup(&mut a).unwrap();
    let other = request(
        r#"{"macAddress":"02:00:00:00:00:44","attachment":"branch","trunkMacAddress":"02:00:00:00:00:22","vlanId":42,"ipv4Addresses":["10.0.2.8/24"]}"#,
    );
    let mut b = kit.task("b", other);
    let msg = format!("{:#}", kit.plan(&mut b).unwrap_err());
    assert_eq!(
        msg,
        "VLAN 42 on trunk 02:00:00:00:00:22 (eth2) is already in use by task a: each branch ENI has its own VLAN id"
    );
}

#[test]
fn branch_teardown_after_the_netns_died_only_releases_the_pin() {
    let mut kit = Kit::new();
    let mut t = kit.task("a", branch());
    kit.setup(&mut t).unwrap();
    kit.k.destroy_netns(t.ns);
    kit.k.calls.clear();
    kit.teardown("a").unwrap();
    assert!(
        !kit.k.calls.iter().any(|c| c == "del_link_at"),
        "{:?}",
        kit.k.calls
    );
    assert!(kit.k.pins.is_empty());
    assert!(
        kit.host_link(BRANCH_MAC).is_none(),
        "the VLAN died with its netns"
    );
}

// ---- a rollback that cannot finish ------------------------------------------------------------

#[test]
fn an_incomplete_rollback_names_what_is_left_for_each_attachment() {
    for (req, fail_also, want) in [
        (
            exclusive as fn() -> NetworkRequest,
            "unpin",
            "(rollback incomplete: release netns pin /run/netshim-kit/netns/a: Device or resource busy (os error 16); `shim gc` retries)",
        ),
        (shared, "del_link", "(rollback incomplete: delete veth nsa"),
        (
            branch,
            "del_link_at",
            "(rollback incomplete: delete branch ENI 02:00:00:00:00:33: Device or resource busy (os error 16); `shim gc` retries)",
        ),
    ] {
        let mut kit = Kit::new();
        let mut t = kit.task("a", req());
        kit.plan(&mut t).unwrap();
        kit.k.fail_call("nft_in", 1);
        kit.k.fail_also = Some(fail_also);
        let msg = format!("{:#}", kit.apply(&t).unwrap_err());
        assert!(msg.starts_with("program the task's firewall: "), "{msg}");
        assert!(msg.contains(want), "{fail_also}: {msg}");
        assert!(msg.ends_with("; `shim gc` retries)"), "{msg}");
    }
}

// ---- a task netns that already has an eth0 ----------------------------------------------------

/// A task whose netns already has an `eth0` (a veth end of someone else's making).
fn task_with_eth0(kit: &mut Kit, req: NetworkRequest) -> Task {
    let t = kit.task("a", req);
    kit.k.at(At::Netns(t.ns)).links.push(crate::kernel::Link {
        index: 900,
        name: "eth0".into(),
        mac: Some("02:00:00:00:09:00".parse().unwrap()),
        ..crate::kernel::Link::default()
    });
    t
}

#[test]
fn a_task_that_already_has_an_eth0_is_refused_by_every_attachment_before_any_change() {
    for (what, req) in [
        ("exclusive", exclusive()),
        ("shared", shared()),
        ("branch", branch()),
    ] {
        let mut kit = Kit::new();
        let before = format!("{:?}", kit.k.state(At::Host));
        let mut t = task_with_eth0(&mut kit, req);
        let e = format!("{:#}", kit.plan(&mut t).unwrap_err());
        assert!(
            e.contains("already has an interface named eth0 (02:00:00:00:09:00)")
                && e.contains("a network namespace of its own"),
            "{what}: {e}"
        );
        assert_eq!(
            format!("{:?}", kit.k.state(At::Host)),
            before,
            "{what}: the host is unchanged"
        );
        kit.assert_eni_home(what);
    }
}
