//! A container that died without a poststop (crun and podman skip it after a failed create)
//! must not keep its host port, address or ENI from the next container.

#[macro_use]
mod common;

use common::*;

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn a_dead_holder_without_poststop_is_released_when_its_port_is_asked_for() {
    let mut rig = Rig::new("[ports]\ndynamic_range = \"43000-43001\"\n");
    let (a, b, live) = (rig.container(), rig.container(), rig.container());
    must_succeed(
        &rig.setup(live, r#"[{"containerPort":80}]"#),
        "live container",
    );
    must_succeed(
        &rig.setup(
            a,
            r#"[{"containerPort":80,"hostPort":18081},{"containerPort":81}]"#,
        ),
        "setup a",
    );
    // a's runtime failed after the hook: the process and netns are gone, no poststop came.
    rig.containers[a].destroy();
    let dead = rig.containers[a].id.clone();
    assert!(rig.recorded().contains(&dead));
    // b asks for a's static port: a is released and b gets it.
    must_succeed(
        &rig.setup(b, r#"[{"containerPort":80,"hostPort":18081}]"#),
        "setup b",
    );
    tcp_server(&rig.containers[b].ns, 80, "b has it");
    assert_eq!(
        tcp_get(&rig.client, HOST_IP, 18081, PATIENT).unwrap(),
        "b has it"
    );
    let ids = rig.recorded();
    assert!(
        !ids.contains(&dead),
        "the dead holder is still recorded: {ids:?}"
    );
    assert_eq!(ids.len(), 2);
    assert_eq!(
        rig.veths().len(),
        2,
        "a's veth went with its netns, and no other was left"
    );
    // A live holder is never taken from.
    let c = rig.container();
    must_fail_with(
        &rig.setup(c, r#"[{"containerPort":80,"hostPort":18081}]"#),
        &["18081/tcp", &rig.containers[b].id.clone()],
    );
}
