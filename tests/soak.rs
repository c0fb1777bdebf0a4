//! Soak: 500 create/delete cycles of bridge containers with a TCP and a UDP mapping, four in
//! flight at a time, real traffic through the host ports every 25th cycle, and at the end
//! nothing of them left: no link of netshim's, no map or set element, no record, intent or
//! claim, no host port reserved, no UDP conntrack entry that could catch a datagram (only
//! entries in the zones of containers that are gone) and no open TCP flow for the
//! container subnet, no mount under the state dir, only the files an idle ledger holds, and
//! a `shim gc` with nothing to repair. `bench/soak.py` is the long version (10,000 cycles).
#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CYCLES: usize = 500;
const IN_FLIGHT: usize = 4;
const TRAFFIC_EVERY: usize = 25;
const MAPS: &str = r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#;
/// Wide enough that the 60 s reuse delay never runs the range dry.
const SOAK_CFG: &str = "[ports]\ndynamic_range = \"40000-47999\"\n";

/// Serves one TCP connection on :80 and one UDP datagram on :53 inside netns `ns`, then closes
/// both (nothing of the test keeps the namespace alive afterwards). Returns once bound.
fn serve_once(ns: &str, reply: &str) -> thread::JoinHandle<()> {
    let path = format!("/run/netns/{ns}");
    let reply = reply.to_string();
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let f = File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid netns fd.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let l = TcpListener::bind(("0.0.0.0", 80)).expect("bind tcp");
        let u = UdpSocket::bind(("0.0.0.0", 53)).expect("bind udp");
        l.set_nonblocking(true).expect("nonblocking");
        u.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tx.send(()).expect("ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut tcp_done, mut udp_done) = (false, false);
        while !(tcp_done && udp_done) && Instant::now() < deadline {
            if !tcp_done {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(reply.as_bytes());
                        tcp_done = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            if !udp_done {
                let mut buf = [0u8; 64];
                if let Ok((_, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(reply.as_bytes(), from);
                    udp_done = true;
                }
            }
        }
    });
    rx.recv().expect("server ready");
    h
}

/// From the client namespace: one TCP connection and one UDP exchange through the host ports.
fn ask(rig: &Rig, tcp: u16, udp: u16) -> (Result<String, String>, Result<String, String>) {
    let t = tcp_get(&rig.client, HOST_IP, tcp, PATIENT);
    let u = in_ns(&rig.client, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).expect("bind udp client");
        udp_ask(&s, HOST_IP, udp)
    });
    (t, u)
}

/// Conntrack entries in the host namespace that involve a container address (10.213/16 but
/// the bridge's own gateway address, whose IGMP reports the host sends itself), as their
/// `conntrack -L` lines.
fn subnet_conntrack(rig: &Rig) -> Vec<String> {
    let out = command_in(&rig.host, "/usr/sbin/conntrack")
        .arg("-L")
        .output()
        .expect("conntrack");
    assert!(out.status.success(), "conntrack -L: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace().any(|w| {
                let a = w.strip_prefix("src=").or_else(|| w.strip_prefix("dst="));
                a.is_some_and(|a| a.starts_with("10.213.") && a != GATEWAY.to_string())
            })
        })
        .map(String::from)
        .collect()
}

/// Every path under the state dir (directories with a trailing `/`), sorted.
fn state_files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read state dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            if p.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn five_hundred_create_delete_cycles_leave_nothing_behind() {
    let mut rig = Rig::new(SOAK_CFG);
    let started = Instant::now();
    let mut served = 0;
    let mut cycle = 0;
    while cycle < CYCLES {
        let batch: Vec<usize> = (0..IN_FLIGHT.min(CYCLES - cycle))
            .map(|_| rig.container())
            .collect();
        let states: Vec<String> = batch
            .iter()
            .map(|&i| {
                rig.oci_state(
                    i,
                    &[
                        ("netshim.network-mode", "bridge"),
                        ("netshim.port-mappings", MAPS),
                    ],
                )
            })
            .collect();
        let outs: Vec<_> = thread::scope(|s| {
            let hs: Vec<_> = states
                .iter()
                .map(|st| s.spawn(|| rig.shim(&["hook", "createRuntime"], st)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, o) in outs.iter().enumerate() {
            must_succeed(o, &format!("cycle {}: setup", cycle + k));
        }
        for (k, &i) in batch.iter().enumerate() {
            if (cycle + k) % TRAFFIC_EVERY == 0 {
                let reply = format!("c{}", cycle + k);
                let server = serve_once(&rig.containers[i].ns, &reply);
                let (tcp, udp) = (rig.host_port(i, 80, "tcp"), rig.host_port(i, 53, "udp"));
                let (t, u) = ask(&rig, tcp, udp);
                assert_eq!(t.as_deref(), Ok(reply.as_str()), "cycle {}: tcp", cycle + k);
                assert_eq!(u.as_deref(), Ok(reply.as_str()), "cycle {}: udp", cycle + k);
                server.join().expect("server");
                served += 1;
            }
        }
        // As a runtime does: the process dies and its netns goes, then poststop.
        for &i in &batch {
            rig.containers[i].destroy();
        }
        let outs: Vec<_> = thread::scope(|s| {
            let hs: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let r = &rig;
                    s.spawn(move || r.poststop(i))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, o) in outs.iter().enumerate() {
            must_succeed(o, &format!("cycle {}: poststop", cycle + k));
        }
        cycle += batch.len();
    }
    eprintln!(
        "soak: {CYCLES} cycles ({served} with traffic) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    assert_eq!(
        rig.pair.links("nsh"),
        Vec::<String>::new(),
        "bridge veths left"
    );
    assert_eq!(
        rig.pair.links("nsa"),
        Vec::<String>::new(),
        "shared-ENI veths left"
    );
    assert_eq!(
        rig.nft_element_counts(),
        BTreeMap::new(),
        "map/set elements left"
    );
    assert_eq!(rig.recorded(), Vec::<String>::new(), "records left");
    assert_eq!(
        held_claims(&rig.state_dir()),
        Vec::<String>::new(),
        "claims left"
    );
    assert!(rig.ports().is_empty(), "ports listed");
    assert_eq!(reserved_ports(&rig.host), "", "host ports left reserved");
    assert_eq!(
        mounts_under(&rig.state_dir()),
        Vec::<String>::new(),
        "pins left"
    );
    // A UDP entry stays until it times out, in the zone of its container: with the zone maps
    // empty (above) no datagram is looked up there any more. A TCP connection that ended leaves
    // its entry to time out (TIME_WAIT), but none may still be open.
    let ct = subnet_conntrack(&rig);
    let live: Vec<&String> = ct
        .iter()
        .filter(|l| {
            if l.starts_with("udp") {
                !l.contains("zone-orig=")
            } else {
                !l.starts_with("tcp") || l.contains("ESTABLISHED")
            }
        })
        .collect();
    assert!(live.is_empty(), "conntrack entries left: {live:#?}");
    // An idle ledger: its lock, index and (empty) directories, and claims that only say when
    // a port was released.
    let files = state_files(&rig.state_dir());
    let unexpected: Vec<&String> = files
        .iter()
        .filter(|f| {
            !(["lock", "index.json"].contains(&f.as_str())
                || f.ends_with('/')
                || (f.starts_with("claims/") && !f.contains(".tmp")))
        })
        .collect();
    assert!(unexpected.is_empty(), "unexpected files: {unexpected:#?}");
    let gc = rig.shim(&["gc"], "");
    must_succeed(&gc, "gc");
    assert_eq!(
        String::from_utf8_lossy(&gc.stdout),
        "",
        "gc found something to repair"
    );
    eprintln!(
        "soak: left: 0 links, 0 elements, 0 records, 0 claims held; {} conntrack entries timing out (closed TCP, UDP in released zones); state dir: {} files, {} of them released-port claims",
        ct.len(),
        files.iter().filter(|f| !f.ends_with('/')).count(),
        files
            .iter()
            .filter(|f| f.starts_with("claims/port/"))
            .count()
    );
    // And the host still serves: one more container's ports answer.
    let i = rig.container();
    must_succeed(&rig.setup(i, MAPS), "last setup");
    let server = serve_once(&rig.containers[i].ns, "last");
    let (t, u) = ask(
        &rig,
        rig.host_port(i, 80, "tcp"),
        rig.host_port(i, 53, "udp"),
    );
    assert_eq!((t.as_deref(), u.as_deref()), (Ok("last"), Ok("last")));
    server.join().expect("server");
}
