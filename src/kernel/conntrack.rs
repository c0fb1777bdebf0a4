//! Removing stale UDP conntrack entries, so mapped traffic reaches the container that holds the
//! host port now and not an earlier one. In-process ctnetlink, hand-encoded (the typed crate was
//! measured and set aside: docs/decisions.md), one request per setup or teardown whatever the
//! number of ports.
//!
//! UDP mappings now get a conntrack zone of their own (`firewall::zones_map`), which needs no
//! flush; this serves the teardown of a record made before zones, whose entries are in the
//! host's default zone.
//!
//! - Setup ([`Stale::HostPorts`]): entries whose original destination is one of the new host
//!   ports and that are not source-NATed: to the host itself (a client that tried before the
//!   mapping existed) or DNATed from outside to an earlier container. The containers' own
//!   masqueraded traffic to some remote's port of the same number stays.
//! - Teardown ([`Stale::RepliesFrom`]): entries whose replies come from the container's address,
//!   i.e. everything DNATed to it (hairpin and host-via-127.0.0.1 included), all ports at once.
//!   So a source-NATed entry to a host port is always its container's teardown's business.
//!
//! Where the kernel can delete by filter (a delete carrying `CTA_FILTER`, Linux 6.12) that is one
//! message and nothing is copied out. Otherwise one dump, filtered in the kernel where it can
//! (`CTA_FILTER` on dumps, Linux 5.8; an older kernel ignores it and sends every entry), and the
//! matching entries are deleted by tuple in batches. The same predicate is applied to every
//! dumped entry, so a kernel that ignores or rejects a filter costs time, never correctness.

use std::io;
use std::net::Ipv4Addr;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::trace;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_STATUS_MASK: u16 = 26;
// enum ctattr_tuple, ctattr_ip, ctattr_l4proto
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
// enum ctattr_filter and its flags (CTA_FILTER_F_*, net/netfilter/nf_internals.h)
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const F_IP_SRC: u32 = 1 << 0;
const F_IP_DST: u32 = 1 << 1;
const F_PROTO_NUM: u32 = 1 << 3;
const F_PROTO_DST_PORT: u32 = 1 << 5;
// enum ip_conntrack_status
const IPS_SRC_NAT: u32 = 1 << 4;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
/// Deletes sent before their acks are read: bounded so the acks always fit the socket buffer.
const DELETE_BATCH: usize = 64;
/// ctnetlink dump messages come in skbs of at most 32 KiB.
const RECV_BUF: usize = 32 * 1024;

/// A host port whose stale entries a setup removes; `addr` `None` means every host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort {
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
}

/// Which stale UDP entries one flush removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale<'a> {
    /// Setup: entries addressed to these host ports and not source-NATed (to the host itself,
    /// or DNATed to an earlier container); masqueraded egress sharing the number stays.
    HostPorts(&'a [HostPort]),
    /// Teardown: entries whose replies come from this container address (DNATed to it).
    RepliesFrom(Ipv4Addr),
}

/// How a flush was done (traces and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Nothing to look for.
    Nothing,
    /// The kernel deleted by filter, in one request.
    KernelFilter,
    /// One dump; `filtered` if the kernel applied the dump filter, `deleted` entries removed.
    Dump { filtered: bool, deleted: usize },
}

/// Which ways a flush may take; tests and benchmarks force the older kernels' paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allow {
    /// Filtered delete, else filtered dump, else plain dump.
    All,
    /// As on 5.8–6.11: no filtered delete.
    DumpOnly,
    /// As before 5.8: no kernel filter at all.
    PlainDump,
}

/// Flushes stale UDP entries in the network namespace it was first used in.
///
/// Keeps its socket until dropped: closing a netfilter socket right after an nftables deletion
/// (kernels before 6.12, which cannot retire elements, or a table rebuild) waits for its
/// deferred cleanup (an RCU grace period, in nf_tables' netlink release notifier), so the
/// socket goes with the hook's others at its end.
#[derive(Default)]
pub struct Conntrack {
    sock: Option<Ctnetlink>,
}

impl Conntrack {
    /// Removes the entries `stale` describes.
    ///
    /// `NETSHIM_CONNTRACK=dump` (or `plain`) takes an older kernel's way (filtered dump, or
    /// dump without kernel filter) on a newer kernel, to measure what those kernels get.
    pub fn flush(&mut self, stale: Stale<'_>) -> io::Result<Method> {
        if let Stale::HostPorts([]) = stale {
            return Ok(Method::Nothing);
        }
        let allow = match std::env::var_os("NETSHIM_CONNTRACK") {
            Some(v) if v == "dump" => Allow::DumpOnly,
            Some(v) if v == "plain" => Allow::PlainDump,
            _ => Allow::All,
        };
        let ct = match &mut self.sock {
            Some(ct) => ct,
            none => none.insert(Ctnetlink::open()?),
        };
        let m = flush_with(ct, stale, allow)?;
        trace::mark(match m {
            Method::Nothing => "conntrack-none",
            Method::KernelFilter => "conntrack-kernel-filter",
            Method::Dump { filtered: true, .. } => "conntrack-filtered-dump",
            Method::Dump { .. } => "conntrack-dump",
        });
        Ok(m)
    }
}

fn flush_with(ct: &mut Ctnetlink, stale: Stale<'_>, allow: Allow) -> io::Result<Method> {
    if let Stale::HostPorts([]) = stale {
        return Ok(Method::Nothing);
    }
    // An older kernel reads these as deletes by an incomplete tuple and refuses them (EINVAL),
    // so nothing is deleted and the dump below does the work.
    if allow == Allow::All
        && let Some(reqs) = filtered_deletes(stale)
        && ct.requests(&reqs).is_ok()
    {
        return Ok(Method::KernelFilter);
    }
    let want = Matcher::new(stale);
    let mut stale_entries = Vec::new();
    let mut filtered = false;
    if allow != Allow::PlainDump {
        match ct.dump(&dump_filter(stale), &want, &mut stale_entries) {
            Ok(()) => filtered = true,
            // EINVAL/EOPNOTSUPP from a kernel whose filter code is older or buggy: dump it all.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                stale_entries.clear();
            }
            Err(e) => return Err(e),
        }
    }
    if !filtered {
        ct.dump(&[], &want, &mut stale_entries)?;
    }
    let deleted = ct.delete(&stale_entries)?;
    Ok(Method::Dump { filtered, deleted })
}

/// The delete-by-filter request for `stale`, if one can say it: teardown always, setup for a
/// single host port. Several ports would need one kernel walk each, so they go to the dump.
fn filtered_deletes(stale: Stale<'_>) -> Option<Vec<Vec<u8>>> {
    match stale {
        Stale::RepliesFrom(ip) => {
            let mut a = Vec::new();
            nest(&mut a, CTA_TUPLE_REPLY, |t| {
                nest(t, CTA_TUPLE_IP, |i| put(i, CTA_IP_V4_SRC, &ip.octets()));
                nest(t, CTA_TUPLE_PROTO, |p| {
                    put(p, CTA_PROTO_NUM, &[IPPROTO_UDP])
                });
            });
            filter(&mut a, 0, F_IP_SRC | F_PROTO_NUM);
            Some(vec![message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, &a)])
        }
        Stale::HostPorts([hp]) => {
            let mut a = Vec::new();
            let flags = orig_port_tuple(&mut a, hp.addr, Some(hp.port));
            filter(&mut a, flags, 0);
            not_source_nated(&mut a);
            Some(vec![message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, &a)])
        }
        Stale::HostPorts(_) => None,
    }
}

/// Kernel-side dump filter attributes for `stale` (the entry is still checked here).
fn dump_filter(stale: Stale<'_>) -> Vec<u8> {
    let mut a = Vec::new();
    match stale {
        Stale::RepliesFrom(ip) => {
            nest(&mut a, CTA_TUPLE_REPLY, |t| {
                nest(t, CTA_TUPLE_IP, |i| put(i, CTA_IP_V4_SRC, &ip.octets()));
                nest(t, CTA_TUPLE_PROTO, |p| {
                    put(p, CTA_PROTO_NUM, &[IPPROTO_UDP])
                });
            });
            filter(&mut a, 0, F_IP_SRC | F_PROTO_NUM);
        }
        Stale::HostPorts(ports) => {
            let addr = ports.first().and_then(|f| f.addr);
            let addr = addr.filter(|a| ports.iter().all(|p| p.addr == Some(*a)));
            let port = ports.first().map(|f| f.port);
            let port = port.filter(|&p| ports.iter().all(|q| q.port == p));
            let flags = orig_port_tuple(&mut a, addr, port);
            filter(&mut a, flags, 0);
            // Keeps the containers' masqueraded egress (most UDP entries of a busy host: DNS)
            // in the kernel (5.15; ignored before).
            not_source_nated(&mut a);
        }
    }
    a
}

/// Status filter: (status & IPS_SRC_NAT) == 0.
fn not_source_nated(a: &mut Vec<u8>) {
    put(a, CTA_STATUS, &0u32.to_be_bytes());
    put(a, CTA_STATUS_MASK, &IPS_SRC_NAT.to_be_bytes());
}

/// `CTA_TUPLE_ORIG` with UDP and, when given, the destination address and port; returns the
/// matching `CTA_FILTER` flags.
fn orig_port_tuple(a: &mut Vec<u8>, addr: Option<Ipv4Addr>, port: Option<u16>) -> u32 {
    let mut flags = F_PROTO_NUM;
    nest(a, CTA_TUPLE_ORIG, |t| {
        if let Some(addr) = addr {
            flags |= F_IP_DST;
            nest(t, CTA_TUPLE_IP, |i| put(i, CTA_IP_V4_DST, &addr.octets()));
        }
        nest(t, CTA_TUPLE_PROTO, |p| {
            put(p, CTA_PROTO_NUM, &[IPPROTO_UDP]);
            if let Some(port) = port {
                flags |= F_PROTO_DST_PORT;
                put(p, CTA_PROTO_DST_PORT, &port.to_be_bytes());
            }
        });
    });
    flags
}

fn filter(a: &mut Vec<u8>, orig: u32, reply: u32) {
    nest(a, CTA_FILTER, |f| {
        if orig != 0 {
            put(f, CTA_FILTER_ORIG_FLAGS, &orig.to_ne_bytes());
        }
        if reply != 0 {
            put(f, CTA_FILTER_REPLY_FLAGS, &reply.to_ne_bytes());
        }
    });
}

/// Appends attribute `kind` carrying `payload`, padded to 4 bytes.
fn put(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + ((4 - len % 4) % 4), 0);
}

/// Appends a nested attribute whose content `f` writes.
fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// A ctnetlink request (sequence number 0, set when sent) for IPv4.
fn message(kind: u16, flags: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// Iterates the attributes in `buf`: (type without flags, whole attribute with header and
/// padding, so it can be copied into another message as is; payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let hdr = buf.get(off..off + 4)?;
        let len = usize::from(u16::from_ne_bytes([hdr[0], hdr[1]]));
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & NLA_TYPE_MASK;
        let payload = buf.get(off + 4..off + len).filter(|_| len >= 4)?;
        let padded = (len + 3) & !3;
        let whole = &buf[off..(off + padded).min(buf.len())];
        off += padded;
        Some((kind, whole, payload))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _, _)| *k == kind).map(|(_, _, p)| p)
}

fn ipv4(b: Option<&[u8]>) -> Option<Ipv4Addr> {
    let b: [u8; 4] = b?.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn be16(b: Option<&[u8]>) -> Option<u16> {
    let b = b?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// What the predicate needs from one dumped entry, plus what a delete sends back.
#[derive(Debug, Default, PartialEq, Eq)]
struct Entry<'a> {
    /// Whole `CTA_TUPLE_ORIG`, `CTA_ZONE` and `CTA_ID` attributes, to send back in a delete.
    key: Vec<&'a [u8]>,
    proto: u8,
    orig_dst: Option<Ipv4Addr>,
    dport: Option<u16>,
    reply_src: Option<Ipv4Addr>,
    status: u32,
}

/// Decodes the attributes of one ctnetlink entry (after the nfgenmsg); `None` if it has no
/// original tuple.
fn parse_entry(payload: &[u8]) -> Option<Entry<'_>> {
    let mut e = Entry::default();
    let mut orig = None;
    for (kind, whole, p) in attrs(payload) {
        match kind {
            CTA_TUPLE_ORIG => {
                orig = Some(p);
                e.key.insert(0, whole);
            }
            CTA_ZONE | CTA_ID => e.key.push(whole),
            CTA_TUPLE_REPLY => {
                e.reply_src = ipv4(find(p, CTA_TUPLE_IP).and_then(|i| find(i, CTA_IP_V4_SRC)))
            }
            CTA_STATUS => {
                e.status = p
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => {}
        }
    }
    let orig = orig?;
    e.orig_dst = ipv4(find(orig, CTA_TUPLE_IP).and_then(|i| find(i, CTA_IP_V4_DST)));
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    e.proto = *find(proto, CTA_PROTO_NUM)?.first()?;
    e.dport = be16(find(proto, CTA_PROTO_DST_PORT));
    Some(e)
}

/// The predicate of a [`Stale`], with the ports in a bitmap (a 1,000-port range costs one
/// lookup per entry, not a thousand comparisons).
struct Matcher {
    replies_from: Option<Ipv4Addr>,
    /// Ports mapped on every host address.
    any_addr: Box<[u64; 1024]>,
    /// Ports mapped on one host address.
    on_addr: Vec<(Ipv4Addr, u16)>,
}

impl Matcher {
    fn new(stale: Stale<'_>) -> Matcher {
        let mut m = Matcher {
            replies_from: None,
            any_addr: Box::new([0; 1024]),
            on_addr: Vec::new(),
        };
        match stale {
            Stale::RepliesFrom(ip) => m.replies_from = Some(ip),
            Stale::HostPorts(ports) => {
                for p in ports {
                    match p.addr {
                        None => m.any_addr[usize::from(p.port / 64)] |= 1 << (p.port % 64),
                        Some(a) => m.on_addr.push((a, p.port)),
                    }
                }
            }
        }
        m
    }

    fn matches(&self, e: &Entry<'_>) -> bool {
        if e.proto != IPPROTO_UDP {
            return false;
        }
        if let Some(ip) = self.replies_from {
            return e.reply_src == Some(ip);
        }
        // Masqueraded egress to a remote's port of the same number is not ours; hairpin and
        // host-via-127.0.0.1 entries are source-NATed too, and go with their container.
        if e.status & IPS_SRC_NAT != 0 {
            return false;
        }
        let Some(port) = e.dport else {
            return false;
        };
        self.any_addr[usize::from(port / 64)] & (1 << (port % 64)) != 0
            || self
                .on_addr
                .iter()
                .any(|&(a, p)| p == port && e.orig_dst == Some(a))
    }
}

/// Walks the netlink messages in `buf`; `f` gets (sequence, payload after the nfgenmsg) of each
/// data message; acks, errors and ends of dumps are returned in order.
fn walk(buf: &[u8], mut f: impl FnMut(u32, &[u8])) -> io::Result<Vec<Reply>> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some(h) = buf.get(off..off + 16) {
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        let body = buf
            .get(off + 16..off + len)
            .filter(|_| len >= 16)
            .ok_or_else(|| io::Error::other("truncated ctnetlink message"))?;
        match kind {
            // Both carry an int: the end of a dump its error (0 when complete), an ack its
            // negated errno (0 for success).
            NLMSG_DONE | NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                out.push(if kind == NLMSG_DONE {
                    Reply::Done(seq, -code)
                } else {
                    Reply::Ack(seq, -code)
                });
            }
            _ => f(seq, body.get(4..).unwrap_or(&[])),
        }
        off += (len + 3) & !3;
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// An ack (errno 0) or an error (errno) for the request with this sequence number.
    Ack(u32, i32),
    /// The end of a dump, with the error that cut it short (0 when complete).
    Done(u32, i32),
}

/// A ctnetlink socket in the current network namespace.
struct Ctnetlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Ctnetlink {
    fn open() -> io::Result<Ctnetlink> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Ctnetlink {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `msgs` (each asking for an ack) in one write, numbering them; returns the first
    /// sequence number used.
    fn send(&mut self, msgs: &[Vec<u8>]) -> io::Result<u32> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::with_capacity(msgs.iter().map(Vec::len).sum());
        for m in msgs {
            self.seq = self.seq.wrapping_add(1);
            let at = out.len();
            out.extend_from_slice(m);
            out[at + 8..at + 12].copy_from_slice(&self.seq.to_ne_bytes());
        }
        self.sock.send(&out, 0)?;
        Ok(first)
    }

    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.sock.recv(&mut self.buf, 0)?;
        Ok(())
    }

    /// Sends requests that each end in an ack and reads every ack; the first error wins
    /// (`ENOENT`, already gone, counts as done when `gone_ok`).
    fn acked(&mut self, msgs: &[Vec<u8>], gone_ok: bool) -> io::Result<()> {
        let first = self.send(msgs)?;
        let want = first..first.wrapping_add(msgs.len() as u32);
        let mut pending = msgs.len();
        let mut err = None;
        while pending > 0 {
            self.recv()?;
            for r in walk(&self.buf, |_, _| {})? {
                if let Reply::Ack(seq, errno) = r
                    && want.contains(&seq)
                {
                    pending -= 1;
                    let fine = errno == 0 || (gone_ok && errno == libc::ENOENT);
                    if !fine && err.is_none() {
                        err = Some(io::Error::from_raw_os_error(errno));
                    }
                }
            }
        }
        err.map_or(Ok(()), Err)
    }

    fn requests(&mut self, msgs: &[Vec<u8>]) -> io::Result<()> {
        self.acked(msgs, false)
    }

    /// Dumps the IPv4 table with the filter attributes `filter_attrs` and collects the delete
    /// keys of the entries `want` matches.
    fn dump(
        &mut self,
        filter_attrs: &[u8],
        want: &Matcher,
        found: &mut Vec<Vec<u8>>,
    ) -> io::Result<()> {
        let seq = self.send(&[message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, filter_attrs)])?;
        loop {
            self.recv()?;
            let replies = walk(&self.buf, |s, payload| {
                if s == seq
                    && let Some(e) = parse_entry(payload)
                    && want.matches(&e)
                {
                    found.push(e.key.concat());
                }
            })?;
            for r in replies {
                if let Reply::Done(s, errno) | Reply::Ack(s, errno) = r
                    && s == seq
                {
                    return match errno {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(e)),
                    };
                }
            }
        }
    }

    /// Deletes the entries with these keys (original tuple, zone, id), in acked batches.
    fn delete(&mut self, keys: &[Vec<u8>]) -> io::Result<usize> {
        let mut err = None;
        for chunk in keys.chunks(DELETE_BATCH) {
            let msgs: Vec<Vec<u8>> = chunk
                .iter()
                .map(|k| message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, k))
                .collect();
            // Gone already (timed out, or deleted by someone else): that is the goal.
            if let Err(e) = self.acked(&msgs, true) {
                err.get_or_insert(e);
            }
        }
        err.map_or(Ok(keys.len()), Err)
    }
}

#[cfg(test)]
mod tests;
