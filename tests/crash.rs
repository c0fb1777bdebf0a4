//! Crash consistency: a hook killed at any instant leaves nothing `shim gc` cannot find and
//! repair. With the `fault-injection` feature (test.sh builds it) the hook aborts, as a kill -9
//! would end it, at each named point of setup and teardown in turn; then `shim gc` (container
//! dead) or `poststop` + `gc` (container alive) must leave no link, no map element, no record,
//! no intent, no claim and a valid ledger, and the next container's port must answer. A loop of
//! kill -9 at random instants is the second net.
#[macro_use]
mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::vpc::*;
use common::*;

const MAPS: &str = r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#;

/// The fault points the binary under test knows (empty without the feature).
fn points() -> Vec<String> {
    let out = Command::new(SHIM)
        .arg("--version")
        .env("NETSHIM_FAULT", "list")
        .output()
        .expect("run shim");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pts: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("shim "))
        .map(String::from)
        .collect();
    assert!(
        !pts.is_empty(),
        "the shim under test has no fault points: build with --features fault-injection"
    );
    pts
}

fn killed(o: &std::process::Output) -> bool {
    o.status.signal() == Some(libc::SIGABRT) || o.status.signal() == Some(libc::SIGKILL)
}

fn pending(rig: &Rig) -> Vec<String> {
    ledger_fingerprint(&rig.state_dir())
        .into_iter()
        .filter(|(p, _)| p.starts_with("pending/"))
        .map(|(p, _)| p)
        .collect()
}

/// Nothing of netshim's is left for containers: no veth, element, record, intent or claim, and
/// `ports list` reads a valid, empty ledger.
fn assert_clean(rig: &Rig, when: &str) {
    assert_eq!(rig.veths(), Vec::<String>::new(), "{when}: veths left");
    assert_eq!(rig.nft_elements(), "", "{when}: map elements left");
    assert_eq!(rig.recorded(), Vec::<String>::new(), "{when}: records left");
    assert_eq!(pending(rig), Vec::<String>::new(), "{when}: intents left");
    assert_eq!(
        held_claims(&rig.state_dir()),
        Vec::<String>::new(),
        "{when}: claims left"
    );
    assert!(rig.ports().is_empty(), "{when}: ports listed");
    assert_eq!(
        reserved_ports(&rig.host),
        "",
        "{when}: host ports left reserved"
    );
}

/// A fresh container gets a port that answers through the host.
fn assert_next_container_serves(rig: &mut Rig, when: &str) {
    let n = rig.container();
    must_succeed(&rig.setup(n, r#"[{"containerPort":80}]"#), when);
    tcp_server(&rig.containers[n].ns, 80, "next");
    let port = rig.host_port(n, 80, "tcp");
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, port, PATIENT).as_deref(),
        Ok("next"),
        "{when}: the next container's port does not answer"
    );
    must_succeed(&rig.poststop(n), "poststop of the next container");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs --features fault-injection (test.sh builds it)"
)]
fn a_setup_killed_at_any_step_leaves_nothing_gc_cannot_repair() {
    let pts: Vec<String> = points()
        .into_iter()
        .filter(|p| p.starts_with("setup") || p.starts_with("bridge"))
        .collect();
    for p in &pts {
        for alive in [false, true] {
            let when = format!(
                "killed at {p}, container {}",
                if alive { "alive" } else { "dead" }
            );
            let mut rig = Rig::new(CFG);
            let a = rig.container();
            let st = rig.oci_state(
                a,
                &[
                    ("netshim.network-mode", "bridge"),
                    ("netshim.port-mappings", MAPS),
                ],
            );
            let out = rig.shim_env(&["hook", "createRuntime"], &st, &[("NETSHIM_FAULT", p)]);
            assert!(
                killed(&out),
                "{when}: the hook was not killed: {}",
                stderr(&out)
            );
            if alive {
                must_succeed(&rig.poststop(a), &format!("{when}: poststop"));
            } else {
                rig.containers[a].destroy();
            }
            must_succeed(&rig.shim(&["gc"], ""), &format!("{when}: gc"));
            assert_clean(&rig, &when);
            assert_next_container_serves(&mut rig, &when);
        }
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs --features fault-injection (test.sh builds it)"
)]
fn a_teardown_killed_at_any_step_leaves_nothing_gc_cannot_repair() {
    for p in points().iter().filter(|p| p.starts_with("teardown")) {
        let when = format!("poststop killed at {p}");
        let mut rig = Rig::new(CFG);
        let a = rig.container();
        must_succeed(&rig.setup(a, MAPS), "setup");
        // Runtimes kill the container and release its netns before poststop.
        rig.containers[a].destroy();
        let out = rig.shim_env(
            &["hook", "poststop"],
            &format!(
                r#"{{"ociVersion":"1.0.2","id":"{}","status":"stopped"}}"#,
                rig.containers[a].id
            ),
            &[("NETSHIM_FAULT", p)],
        );
        assert!(killed(&out), "{when}: not killed: {}", stderr(&out));
        must_succeed(&rig.shim(&["gc"], ""), &format!("{when}: gc"));
        assert_clean(&rig, &when);
        assert_next_container_serves(&mut rig, &when);
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs --features fault-injection (test.sh builds it)"
)]
fn an_awsvpc_setup_killed_at_any_step_gives_the_eni_back_after_gc() {
    for p in points()
        .iter()
        .filter(|p| p.starts_with("setup") || p.starts_with("awsvpc"))
    {
        for shared_eni in [false, true] {
            if p == "awsvpc-shared-veth" && !shared_eni
                || p.starts_with("awsvpc-") && p != "awsvpc-shared-veth" && shared_eni
            {
                continue;
            }
            let when = format!(
                "killed at {p} ({})",
                if shared_eni { "shared" } else { "exclusive" }
            );
            let mut vpc = Vpc::new(&[]);
            let e = vpc.attach_eni();
            let a = vpc.task();
            let spec = if shared_eni {
                shared(&e, &["10.0.1.31/24"])
            } else {
                exclusive(&e, &["10.0.1.23/24"])
            };
            let st = vpc.oci_state(
                a,
                &[("netshim.network-mode", "awsvpc"), ("netshim.eni", &spec)],
            );
            let out = vpc.shim_env(&["hook", "createRuntime"], &st, &[("NETSHIM_FAULT", p)]);
            assert!(killed(&out), "{when}: not killed: {}", stderr(&out));
            vpc.containers[a].destroy();
            thread::sleep(Duration::from_millis(200));
            must_succeed(&vpc.shim(&["gc"], ""), &format!("{when}: gc"));
            assert!(vpc.recorded().is_empty(), "{when}: {:?}", vpc.recorded());
            assert_eq!(
                held_claims(&vpc.state_dir()),
                Vec::<String>::new(),
                "{when}: claims left"
            );
            assert_eq!(
                mounts_under(&vpc.state_dir()),
                Vec::<String>::new(),
                "{when}: task namespaces still pinned"
            );
            assert_eq!(
                netshim_links(&vpc.host),
                Vec::<String>::new(),
                "{when}: links left"
            );
            let rules = ip_text(&vpc.host, &["rule", "show"]);
            assert!(
                !rules.contains("lookup 10"),
                "{when}: policy rules left: {rules}"
            );
            if !shared_eni {
                assert_eni_home(&vpc.host, &e, &when);
            }
            // The ENI can be given again.
            let b = vpc.task();
            vpc.must_setup(b, &spec, "", None);
            must_succeed(&vpc.poststop(b), "poststop of the next task");
        }
    }
}

/// Tiny deterministic generator for the kill instants.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn kill_9_at_random_instants_of_setup_and_teardown_is_repaired_by_gc() {
    let mut rig = Rig::new(CFG);
    let mut rng = Lcg(u64::from(std::process::id()));
    let mut killed_mid = 0;
    for trial in 0..40 {
        let a = rig.container();
        let st = rig.oci_state(
            a,
            &[
                ("netshim.network-mode", "bridge"),
                ("netshim.port-mappings", MAPS),
            ],
        );
        let mut child = command_in(&rig.host, SHIM)
            .args(["hook", "createRuntime"])
            .env_clear()
            .env("NETSHIM_STATE_DIR", rig.state_dir())
            .env("NETSHIM_CONFIG", rig.config_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn shim");
        {
            use std::io::Write;
            let mut i = child.stdin.take().expect("stdin");
            let _ = i.write_all(st.as_bytes());
        }
        thread::sleep(Duration::from_micros(rng.next(8000)));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if status.signal() == Some(libc::SIGKILL) {
            killed_mid += 1;
        }
        if trial % 2 == 0 {
            must_succeed(&rig.poststop(a), "poststop after the kill");
        }
        rig.containers[a].destroy();
        must_succeed(&rig.shim(&["gc"], ""), "gc after the kill");
        assert_clean(&rig, &format!("trial {trial}"));
    }
    eprintln!("{killed_mid} of 40 setups were killed before they finished");
    assert_next_container_serves(&mut rig, "after 40 kills");
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_bridge_left_without_its_address_is_repaired_by_the_next_setup() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "first setup");
    must_succeed(&rig.poststop(a), "poststop");
    // What a kill during first-use creation leaves: netshim's bridge, down, without its address.
    ip(&["-n", &rig.host, "addr", "flush", "dev", "netshim0"]);
    ip(&["-n", &rig.host, "link", "set", "netshim0", "down"]);
    assert_next_container_serves(&mut rig, "after the bridge lost its address");
    // And `shim gc` repairs it too, saying so.
    ip(&["-n", &rig.host, "addr", "flush", "dev", "netshim0"]);
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("repaired bridge netshim0: added its address 10.213.0.1/16"),
        "{said}"
    );
    assert!(ip(&["-n", &rig.host, "addr", "show", "dev", "netshim0"]).contains("10.213.0.1/16"));
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn stray_map_elements_and_claims_no_record_knows_are_removed_by_gc() {
    let mut rig = Rig::new(CFG);
    let a = rig.container();
    must_succeed(&rig.setup(a, r#"[{"containerPort":80}]"#), "setup");
    // A DNAT element and a claim nobody holds (what a crash of an older netshim could leave).
    rig.nft(&[
        "add",
        "element",
        "ip",
        "netshim",
        "ports",
        "{ tcp . 40999 : 10.213.9.9 . 80 }",
    ]);
    let claim = rig.state_dir().join("claims/port/tcp-40998");
    fs::write(&claim, "ghost *\n").unwrap();
    let out = rig.shim(&["gc"], "");
    must_succeed(&out, "gc");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("dropped claim port/tcp-40998 of ghost"),
        "{said}"
    );
    let elements = rig.nft_elements();
    assert!(
        !elements.contains("40999"),
        "stray element kept: {elements}"
    );
    assert_eq!(elements.lines().count(), 1, "{elements}");
    assert_eq!(rig.recorded(), vec![rig.containers[a].id.clone()]);
}
