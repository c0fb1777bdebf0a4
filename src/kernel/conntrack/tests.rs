//! Tests of the conntrack flush: the encoding and decoding byte by byte, the predicate, and (as
//! root) real entries in a private network namespace, through each of the kernel paths.

use super::*;

const IPS_DST_NAT: u32 = 1 << 5;

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    put(&mut a, kind, payload);
    a
}

fn header(m: &[u8]) -> (u32, u16, u16, u8) {
    (
        u32::from_ne_bytes([m[0], m[1], m[2], m[3]]),
        u16::from_ne_bytes([m[4], m[5]]),
        u16::from_ne_bytes([m[6], m[7]]),
        m[16],
    )
}

/// The top-level attributes of a request: (type with flags, payload).
fn top(m: &[u8]) -> Vec<(u16, Vec<u8>)> {
    attrs(&m[20..])
        .map(|(_, whole, p)| (u16::from_ne_bytes([whole[2], whole[3]]), p.to_vec()))
        .collect()
}

#[test]
#[cfg(target_endian = "little")]
fn teardown_is_one_filtered_delete_laid_out_as_the_kernel_expects() {
    let reqs = filtered_deletes(Stale::RepliesFrom(Ipv4Addr::new(10, 213, 0, 5))).unwrap();
    assert_eq!(reqs.len(), 1);
    #[rustfmt::skip]
    let want: Vec<u8> = vec![
        60, 0, 0, 0,  2, 1,  5, 0,  0, 0, 0, 0,  0, 0, 0, 0, // nlmsghdr: DELETE, REQUEST|ACK
        2, 0, 0, 0,                                          // nfgenmsg: AF_INET
        28, 0, 2, 0x80,                                      // CTA_TUPLE_REPLY (nested)
          12, 0, 1, 0x80,                                    //   CTA_TUPLE_IP
            8, 0, 1, 0,  10, 213, 0, 5,                      //     CTA_IP_V4_SRC
          12, 0, 2, 0x80,                                    //   CTA_TUPLE_PROTO
            5, 0, 1, 0,  17, 0, 0, 0,                        //     CTA_PROTO_NUM udp
        12, 0, 25, 0x80,                                     // CTA_FILTER
          8, 0, 2, 0,  9, 0, 0, 0,                           //   REPLY_FLAGS: IP_SRC|PROTO_NUM
    ];
    assert_eq!(reqs[0], want);
}

#[test]
fn a_single_host_port_is_one_delete_of_what_is_not_source_nated_with_the_address_when_given() {
    let hp = [HostPort {
        addr: Some(Ipv4Addr::new(192, 0, 2, 1)),
        port: 5353,
    }];
    let reqs = filtered_deletes(Stale::HostPorts(&hp)).unwrap();
    assert_eq!(reqs.len(), 1);
    for m in &reqs {
        assert_eq!(
            header(m),
            (
                m.len() as u32,
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                AF_INET
            )
        );
        let a = top(m);
        let kinds: Vec<u16> = a.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                CTA_TUPLE_ORIG | NLA_F_NESTED,
                CTA_FILTER | NLA_F_NESTED,
                CTA_STATUS,
                CTA_STATUS_MASK
            ]
        );
        let orig = &a[0].1;
        let ip = find(orig, CTA_TUPLE_IP).unwrap();
        assert_eq!(find(ip, CTA_IP_V4_DST), Some(&[192, 0, 2, 1][..]));
        assert_eq!(find(ip, CTA_IP_V4_SRC), None);
        let proto = find(orig, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(find(proto, CTA_PROTO_NUM), Some(&[17][..]));
        assert_eq!(
            find(proto, CTA_PROTO_DST_PORT),
            Some(&5353u16.to_be_bytes()[..])
        );
        let flags = find(&a[1].1, CTA_FILTER_ORIG_FLAGS).unwrap();
        assert_eq!(
            flags,
            (F_IP_DST | F_PROTO_NUM | F_PROTO_DST_PORT).to_ne_bytes()
        );
        assert_eq!(find(&a[1].1, CTA_FILTER_REPLY_FLAGS), None);
        assert_eq!(a[2].1, 0u32.to_be_bytes());
        assert_eq!(a[3].1, IPS_SRC_NAT.to_be_bytes());
    }
}

#[test]
fn no_request_can_be_read_as_a_flush_of_the_whole_table() {
    // A kernel that does not know CTA_FILTER ignores it: every filtered delete must then still
    // carry a tuple, which the kernel refuses as incomplete instead of flushing everything.
    let one = [HostPort {
        addr: None,
        port: 53,
    }];
    // A host port is matched on the original direction (the client's packets to it), a
    // container's replies on the reply direction (its address as their source).
    for (stale, tuple, not) in [
        (Stale::HostPorts(&one), CTA_TUPLE_ORIG, CTA_TUPLE_REPLY),
        (
            Stale::RepliesFrom(Ipv4Addr::new(10, 0, 0, 2)),
            CTA_TUPLE_REPLY,
            CTA_TUPLE_ORIG,
        ),
    ] {
        for m in filtered_deletes(stale).unwrap() {
            let kinds: Vec<u16> = top(&m).iter().map(|(k, _)| k & NLA_TYPE_MASK).collect();
            assert!(kinds.contains(&tuple), "{stale:?}: {kinds:?}");
            assert!(!kinds.contains(&not), "{stale:?}: {kinds:?}");
            assert!(kinds.contains(&CTA_FILTER));
        }
    }
}

#[test]
fn several_ports_go_to_one_dump_filtered_on_what_they_share() {
    let a = Ipv4Addr::new(192, 0, 2, 1);
    let range: Vec<HostPort> = (30000..31000)
        .map(|port| HostPort { addr: None, port })
        .collect();
    assert!(filtered_deletes(Stale::HostPorts(&range)).is_none());
    let flags = |f: &[u8]| {
        let filter = find(f, CTA_FILTER).unwrap();
        let b = find(filter, CTA_FILTER_ORIG_FLAGS).unwrap();
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    };
    let f = dump_filter(Stale::HostPorts(&range));
    assert_eq!(flags(&f), F_PROTO_NUM);
    assert_eq!(find(&f, CTA_STATUS), Some(&0u32.to_be_bytes()[..]));
    assert_eq!(
        find(&f, CTA_STATUS_MASK),
        Some(&IPS_SRC_NAT.to_be_bytes()[..])
    );
    let same_addr = [
        HostPort {
            addr: Some(a),
            port: 1,
        },
        HostPort {
            addr: Some(a),
            port: 2,
        },
    ];
    let f = dump_filter(Stale::HostPorts(&same_addr));
    assert_eq!(flags(&f), F_PROTO_NUM | F_IP_DST);
    let orig = find(&f, CTA_TUPLE_ORIG).unwrap();
    assert_eq!(
        find(orig, CTA_TUPLE_IP).and_then(|i| find(i, CTA_IP_V4_DST)),
        Some(&a.octets()[..])
    );
    let same_port = [
        HostPort {
            addr: Some(a),
            port: 7,
        },
        HostPort {
            addr: None,
            port: 7,
        },
    ];
    assert_eq!(
        flags(&dump_filter(Stale::HostPorts(&same_port))),
        F_PROTO_NUM | F_PROTO_DST_PORT
    );
    let r = dump_filter(Stale::RepliesFrom(a));
    let filter = find(&r, CTA_FILTER).unwrap();
    assert_eq!(
        find(filter, CTA_FILTER_REPLY_FLAGS),
        Some(&(F_IP_SRC | F_PROTO_NUM).to_ne_bytes()[..])
    );
}

fn tuple(kind: u16, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    nest(&mut t, kind, |t| {
        nest(t, CTA_TUPLE_IP, |i| {
            put(i, CTA_IP_V4_SRC, &src.octets());
            put(i, CTA_IP_V4_DST, &dst.octets());
        });
        nest(t, CTA_TUPLE_PROTO, |p| {
            put(p, CTA_PROTO_NUM, &[proto]);
            put(p, 2, &sport.to_be_bytes());
            put(p, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
        });
    });
    t
}

const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CTR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 9);

/// An entry as the kernel dumps it (attribute order and extras included).
fn dumped(proto: u8, dport: u16, reply_src: Ipv4Addr, status: u32, zone: Option<u16>) -> Vec<u8> {
    let mut e = tuple(CTA_TUPLE_ORIG, CLIENT, HOST, proto, 40000, dport);
    e.extend(tuple(CTA_TUPLE_REPLY, reply_src, CLIENT, proto, 53, 40000));
    if let Some(z) = zone {
        e.extend(attr(CTA_ZONE, &z.to_be_bytes()));
    }
    e.extend(attr(CTA_STATUS, &status.to_be_bytes()));
    e.extend(attr(8, &0u32.to_be_bytes())); // CTA_MARK
    e.extend(attr(CTA_ID, &0xdead_beefu32.to_be_bytes()));
    e.extend(attr(7, &30u32.to_be_bytes())); // CTA_TIMEOUT
    e
}

#[test]
fn a_dumped_entry_yields_its_fields_and_the_key_to_delete_it() {
    let raw = dumped(IPPROTO_UDP, 5353, CTR, IPS_DST_NAT | 0x8, Some(3));
    let e = parse_entry(&raw).unwrap();
    assert_eq!(e.proto, IPPROTO_UDP);
    assert_eq!(e.orig_dst, Some(HOST));
    assert_eq!(e.dport, Some(5353));
    assert_eq!(e.reply_src, Some(CTR));
    assert_eq!(e.status, IPS_DST_NAT | 0x8);
    // The key: the original tuple first, then zone and id; no reply tuple, status or timeout.
    let key = e.key.concat();
    let kinds: Vec<u16> = attrs(&key).map(|(k, _, _)| k).collect();
    assert_eq!(kinds, [CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID]);
    assert_eq!(
        find(&key, CTA_TUPLE_ORIG),
        Some(&tuple(CTA_TUPLE_ORIG, CLIENT, HOST, IPPROTO_UDP, 40000, 5353)[4..])
    );
    // Garbage and truncation are skipped, not trusted.
    assert!(parse_entry(&raw[..raw.len() / 3]).is_none());
    assert!(parse_entry(&[0xff; 7]).is_none());
    assert!(parse_entry(&attr(CTA_STATUS, &[0; 4])).is_none());
}

#[test]
fn the_setup_predicate_takes_nat_to_earlier_containers_and_to_the_host_not_masqueraded_egress() {
    let ports: Vec<HostPort> = (30000..31000)
        .map(|port| HostPort { addr: None, port })
        .chain([HostPort {
            addr: Some(HOST),
            port: 5353,
        }])
        .collect();
    let m = Matcher::new(Stale::HostPorts(&ports));
    let check = |proto, dport, status| {
        m.matches(&parse_entry(&dumped(proto, dport, CTR, status, None)).unwrap())
    };
    for port in [30000, 30500, 30999] {
        assert!(check(IPPROTO_UDP, port, IPS_DST_NAT), "{port} DNATed");
        // Hairpin and host-via-127.0.0.1 are source-NATed: their container's teardown's.
        assert!(
            !check(IPPROTO_UDP, port, IPS_DST_NAT | IPS_SRC_NAT),
            "{port} hairpin"
        );
        assert!(check(IPPROTO_UDP, port, 0), "{port} to the host itself");
        assert!(
            !check(IPPROTO_UDP, port, IPS_SRC_NAT),
            "{port} masqueraded egress"
        );
        assert!(!check(6, port, IPS_DST_NAT), "{port} tcp");
    }
    for port in [29999, 31000, 0, 65535, 5354] {
        assert!(!check(IPPROTO_UDP, port, IPS_DST_NAT), "{port}");
    }
    // On one address only: the entry must be addressed to it.
    assert!(check(IPPROTO_UDP, 5353, 0));
    let other_addr = HostPort {
        addr: Some(Ipv4Addr::new(198, 51, 100, 2)),
        port: 5353,
    };
    let m2 = Matcher::new(Stale::HostPorts(std::slice::from_ref(&other_addr)));
    assert!(!m2.matches(&parse_entry(&dumped(IPPROTO_UDP, 5353, CTR, 0, None)).unwrap()));
    let edge = [
        HostPort {
            addr: None,
            port: 65535,
        },
        HostPort {
            addr: None,
            port: 0,
        },
    ];
    let m3 = Matcher::new(Stale::HostPorts(&edge));
    assert!(m3.matches(&parse_entry(&dumped(IPPROTO_UDP, 65535, CTR, 0, None)).unwrap()));
    assert!(m3.matches(&parse_entry(&dumped(IPPROTO_UDP, 0, CTR, 0, None)).unwrap()));
    assert!(!m3.matches(&parse_entry(&dumped(IPPROTO_UDP, 65534, CTR, 0, None)).unwrap()));
}

#[test]
fn the_teardown_predicate_takes_every_udp_entry_answered_by_the_container() {
    let m = Matcher::new(Stale::RepliesFrom(CTR));
    let ok = |proto, reply_src, status| {
        m.matches(&parse_entry(&dumped(proto, 80, reply_src, status, None)).unwrap())
    };
    assert!(ok(IPPROTO_UDP, CTR, IPS_DST_NAT));
    assert!(ok(IPPROTO_UDP, CTR, IPS_DST_NAT | IPS_SRC_NAT));
    assert!(!ok(6, CTR, IPS_DST_NAT));
    assert!(!ok(IPPROTO_UDP, Ipv4Addr::new(10, 213, 0, 10), IPS_DST_NAT));
}

#[test]
fn walk_reports_data_acks_errors_and_the_end_of_a_dump() {
    let msg = |kind: u16, seq: u32, body: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    };
    let mut buf = msg(0x100, 7, &[2, 0, 0, 0, 9, 9, 9, 9]);
    buf.extend(msg(NLMSG_ERROR, 7, &(-libc::ENOENT).to_ne_bytes()));
    buf.extend(msg(NLMSG_ERROR, 8, &0i32.to_ne_bytes()));
    buf.extend(msg(NLMSG_DONE, 9, &0i32.to_ne_bytes()));
    buf.extend(msg(NLMSG_DONE, 10, &(-libc::EINTR).to_ne_bytes()));
    let mut data = Vec::new();
    let replies = walk(&buf, |seq, p| data.push((seq, p.to_vec()))).unwrap();
    assert_eq!(data, [(7, vec![9, 9, 9, 9])]);
    assert_eq!(
        replies,
        [
            Reply::Ack(7, libc::ENOENT),
            Reply::Ack(8, 0),
            Reply::Done(9, 0),
            Reply::Done(10, libc::EINTR)
        ]
    );
    let mut cut = msg(NLMSG_DONE, 1, &[0; 4]);
    cut[0] = 40;
    assert!(walk(&cut, |_, _| {}).is_err());
    assert!(walk(&[], |_, _| {}).unwrap().is_empty());
}

// ---- Root: real entries in a private network namespace ----

const IPCTNL_MSG_CT_NEW: u16 = 0;
const NLM_F_CREATE: u16 = 0x400;
const CTA_TIMEOUT: u16 = 7;
const CTA_NAT_SRC: u16 = 6;
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
const IPPROTO_TCP: u8 = 6;

/// Runs `f` on a thread in a new, unnamed network namespace: it and all its conntrack
/// entries vanish when the thread ends, whatever happens.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("test thread panicked")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nat {
    None,
    /// DNAT to a container address and port.
    Dst(Ipv4Addr, u16),
    /// Source NAT to the host's address (masquerade).
    Src(Ipv4Addr),
    /// Both: a container reaching a host port of a container (hairpin).
    Both(Ipv4Addr, u16, Ipv4Addr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    nat: Nat,
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, nat: Nat) -> Spec {
    Spec {
        proto: IPPROTO_UDP,
        src,
        sport,
        dst,
        dport,
        nat,
    }
}

fn nat_attr(a: &mut Vec<u8>, kind: u16, ip: Ipv4Addr, port: Option<u16>) {
    nest(a, kind, |n| {
        put(n, CTA_NAT_V4_MINIP, &ip.octets());
        put(n, CTA_NAT_V4_MAXIP, &ip.octets());
        if let Some(p) = port {
            nest(n, CTA_NAT_PROTO, |q| {
                put(q, CTA_PROTONAT_PORT_MIN, &p.to_be_bytes());
                put(q, CTA_PROTONAT_PORT_MAX, &p.to_be_bytes());
            });
        }
    });
}

/// `conntrack -I` in-process: the reply tuple is the inverse of the original, then the NAT
/// bindings rewrite it and set the status bits, as for real NATed traffic.
fn new_entry(s: &Spec) -> Vec<u8> {
    let mut a = tuple(CTA_TUPLE_ORIG, s.src, s.dst, s.proto, s.sport, s.dport);
    a.extend(tuple(
        CTA_TUPLE_REPLY,
        s.dst,
        s.src,
        s.proto,
        s.dport,
        s.sport,
    ));
    a.extend(attr(CTA_TIMEOUT, &600u32.to_be_bytes()));
    if s.proto == IPPROTO_TCP {
        // CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE: established } }
        nest(&mut a, 4, |p| nest(p, 1, |t| put(t, 1, &[3])));
    }
    match s.nat {
        Nat::None => {}
        Nat::Dst(ip, port) => nat_attr(&mut a, CTA_NAT_DST, ip, Some(port)),
        Nat::Src(ip) => nat_attr(&mut a, CTA_NAT_SRC, ip, None),
        Nat::Both(ip, port, host) => {
            nat_attr(&mut a, CTA_NAT_DST, ip, Some(port));
            nat_attr(&mut a, CTA_NAT_SRC, host, None);
        }
    }
    message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_ACK, &a)
}

fn create(ct: &mut Ctnetlink, specs: &[Spec]) {
    for chunk in specs.chunks(DELETE_BATCH) {
        let msgs: Vec<Vec<u8>> = chunk.iter().map(new_entry).collect();
        ct.requests(&msgs)
            .unwrap_or_else(|e| panic!("create {:?}…: {e}", chunk[0]));
    }
}

/// Whether the entry with this original tuple exists (a lookup by tuple, not a dump).
fn exists(ct: &mut Ctnetlink, s: &Spec) -> bool {
    let t = tuple(CTA_TUPLE_ORIG, s.src, s.dst, s.proto, s.sport, s.dport);
    let seq = ct
        .send(&[message(IPCTNL_MSG_CT_GET, NLM_F_ACK, &t)])
        .unwrap();
    let mut found = false;
    loop {
        ct.recv().unwrap();
        for r in walk(&ct.buf, |s, _| found |= s == seq).unwrap() {
            if let Reply::Ack(s, errno) = r
                && s == seq
            {
                assert!(errno == 0 || errno == libc::ENOENT, "get: errno {errno}");
                return found;
            }
        }
    }
}

fn count() -> usize {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// 20,000 UDP entries that no flush here may touch: clients to other host ports, and the
/// containers' own traffic out.
fn unrelated() -> Vec<Spec> {
    (0..20_000u32)
        .map(|i| {
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 2, 0)) + i % 200);
            let port = 1024 + (i / 200) as u16;
            if i % 2 == 0 {
                udp(client, port, HOST, 20_000 + (i % 97) as u16, Nat::None)
            } else {
                let c = Ipv4Addr::new(10, 213, 1, (i % 250) as u8 + 1);
                udp(c, port, Ipv4Addr::new(203, 0, 113, 5), 443, Nat::Src(HOST))
            }
        })
        .collect()
}

/// The kernel's version as (major, minor).
fn kernel() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut it = r.trim().split(['.', '-']).map(|x| x.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn expected_method(allow: Allow, kernel_filter_possible: bool, deleted: usize) -> Method {
    let k = kernel();
    match allow {
        Allow::All if kernel_filter_possible && k >= (6, 12) => Method::KernelFilter,
        Allow::PlainDump => Method::Dump {
            filtered: false,
            deleted,
        },
        _ => Method::Dump {
            filtered: k >= (5, 8),
            deleted,
        },
    }
}

/// Builds the table, flushes, and checks that exactly `stale` went.
fn run(stale_specs: Vec<Spec>, keep: Vec<Spec>, what: Stale<'static>, allow: Allow) -> Method {
    let kernel_filter_possible = filtered_deletes(what).is_some();
    in_private_netns(move || {
        let mut ct = Ctnetlink::open().unwrap();
        let unrelated = unrelated();
        create(&mut ct, &unrelated);
        create(&mut ct, &stale_specs);
        create(&mut ct, &keep);
        let before = count();
        assert_eq!(before, unrelated.len() + stale_specs.len() + keep.len());
        let m = flush_with(&mut ct, what, allow).unwrap();
        for s in &stale_specs {
            assert!(!exists(&mut ct, s), "{allow:?}: stale entry left: {s:?}");
        }
        for s in keep.iter().chain(unrelated.iter().step_by(97)) {
            assert!(exists(&mut ct, s), "{allow:?}: entry removed: {s:?}");
        }
        assert_eq!(
            count(),
            before - stale_specs.len(),
            "{allow:?}: exactly the stale ones go"
        );
        assert_eq!(
            m,
            expected_method(allow, kernel_filter_possible, stale_specs.len())
        );
        // A second flush finds nothing left.
        let again = flush_with(&mut Ctnetlink::open().unwrap(), what, allow).unwrap();
        if let Method::Dump { deleted, .. } = again {
            assert_eq!(deleted, 0);
        }
        assert_eq!(count(), before - stale_specs.len());
        m
    })
}

const OLD: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 8);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 10);

/// For the host ports `ports`: what a setup must remove, and what shares a port and stays.
fn setup_table(ports: &[u16]) -> (Vec<Spec>, Vec<Spec>) {
    let mut stale = Vec::new();
    let mut keep = Vec::new();
    for (i, &p) in ports.iter().enumerate() {
        let s = 50_000 + i as u16;
        stale.push(udp(CLIENT, s, HOST, p, Nat::None));
        stale.push(udp(CLIENT, s + 1000, HOST, p, Nat::Dst(OLD, 53)));
        // A neighbour's hairpin to the earlier container goes with that container's teardown.
        keep.push(udp(CTR, s, HOST, p, Nat::Both(OLD, 53, HOST)));
        stale.push(udp(
            Ipv4Addr::LOCALHOST,
            s,
            Ipv4Addr::LOCALHOST,
            p,
            Nat::None,
        ));
        keep.push(udp(
            CTR,
            s + 2000,
            Ipv4Addr::new(203, 0, 113, 9),
            p,
            Nat::Src(HOST),
        ));
        keep.push(Spec {
            proto: IPPROTO_TCP,
            ..udp(CLIENT, s, HOST, p, Nat::Dst(OLD, 53))
        });
    }
    (stale, keep)
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn setup_of_one_udp_port_removes_exactly_its_stale_entries_on_every_kernel_path() {
    let ports = leak(vec![HostPort {
        addr: None,
        port: 5353,
    }]);
    for allow in [Allow::All, Allow::DumpOnly, Allow::PlainDump] {
        let (stale, keep) = setup_table(&[5353]);
        let m = run(stale, keep, Stale::HostPorts(ports), allow);
        eprintln!("{allow:?}: {m:?}");
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn setup_of_a_1000_port_range_is_one_dump_and_removes_exactly_its_stale_entries() {
    let ports: Vec<HostPort> = (30000..31000)
        .map(|port| HostPort { addr: None, port })
        .collect();
    let ports = leak(ports);
    for allow in [Allow::All, Allow::PlainDump] {
        // Stale entries on a few ports across the range (all of them would be 4,000 entries).
        let (stale, keep) = setup_table(&[30000, 30001, 30500, 30998, 30999]);
        let m = run(stale, keep, Stale::HostPorts(ports), allow);
        eprintln!("{allow:?}: {m:?}");
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn setup_of_a_port_on_one_host_address_leaves_the_other_addresses_alone() {
    let other = Ipv4Addr::new(198, 51, 100, 2);
    let ports = leak(vec![HostPort {
        addr: Some(HOST),
        port: 5353,
    }]);
    for allow in [Allow::All, Allow::DumpOnly, Allow::PlainDump] {
        let stale = vec![
            udp(CLIENT, 1000, HOST, 5353, Nat::None),
            udp(CLIENT, 1001, HOST, 5353, Nat::Dst(OLD, 53)),
        ];
        let keep = vec![
            udp(CLIENT, 1000, other, 5353, Nat::None),
            udp(CLIENT, 1001, other, 5353, Nat::Dst(OTHER, 53)),
        ];
        run(stale, keep, Stale::HostPorts(ports), allow);
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
fn teardown_removes_everything_dnated_to_the_container_and_nothing_else() {
    for allow in [Allow::All, Allow::DumpOnly, Allow::PlainDump] {
        let mut stale = Vec::new();
        let mut keep = Vec::new();
        for i in 0..50u16 {
            // Clients through two mappings of the container, and a hairpin from a neighbour.
            stale.push(udp(CLIENT, 1000 + i, HOST, 40_000, Nat::Dst(CTR, 53)));
            stale.push(udp(CLIENT, 1000 + i, HOST, 40_001, Nat::Dst(CTR, 5353)));
            stale.push(udp(OTHER, 1000 + i, HOST, 40_000, Nat::Both(CTR, 53, HOST)));
            // Another container on the same host port number of another address.
            keep.push(udp(CLIENT, 1000 + i, OTHER, 40_000, Nat::Dst(OTHER, 53)));
            // The container's own traffic out is answered by the remote, not by it.
            keep.push(udp(
                CTR,
                1000 + i,
                Ipv4Addr::new(203, 0, 113, 9),
                53,
                Nat::Src(HOST),
            ));
            // TCP to the container is not this flush's business.
            keep.push(Spec {
                proto: IPPROTO_TCP,
                ..udp(CLIENT, 2000 + i, HOST, 40_002, Nat::Dst(CTR, 80))
            });
        }
        let m = run(stale, keep, Stale::RepliesFrom(CTR), allow);
        eprintln!("{allow:?}: {m:?}");
    }
}

#[test]
fn an_empty_port_list_asks_the_kernel_nothing() {
    assert_eq!(
        Conntrack::default().flush(Stale::HostPorts(&[])).unwrap(),
        Method::Nothing
    );
}
