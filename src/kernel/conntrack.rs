//! Flushing UDP conntrack entries for a host port, so a replacement container gets the traffic
//! instead of a stale entry pointing at the old one. In-process ctnetlink: one dump of the IPv4
//! table, then one delete per matching entry, no process spawned.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;

/// Iterates the attributes in `buf`: (type without flags, whole attribute incl. header, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[off], buf[off + 1]]));
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let whole = &buf[off..off + len];
        off += (len + 3) & !3;
        Some((kind, whole, &whole[4..]))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _, _)| *k == kind).map(|(_, _, p)| p)
}

/// The original-direction tuple attribute (whole, to send back in a delete) of a UDP entry
/// whose original destination port is `port`.
fn matching_tuple(payload: &[u8], port: u16) -> Option<&[u8]> {
    let (_, whole, orig) = attrs(payload).find(|(k, _, _)| *k == CTA_TUPLE_ORIG)?;
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.first()?;
    let dport = find(proto, CTA_PROTO_DST_PORT)?;
    (num == IPPROTO_UDP && dport.len() >= 2 && u16::from_be_bytes([dport[0], dport[1]]) == port)
        .then_some(whole)
}

fn message(kind: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// Walks the netlink messages in `buf[..n]`; `f` gets (type, payload after the nfgenmsg).
/// Returns Some(errno) on an error message, and whether the dump/ack is complete.
fn walk(buf: &[u8], mut f: impl FnMut(u16, &[u8])) -> io::Result<bool> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < 16 || off + len > buf.len() {
            return Err(io::Error::other("truncated ctnetlink message"));
        }
        let body = &buf[off + 16..off + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                if code == 0 {
                    return Ok(true);
                }
                return Err(io::Error::from_raw_os_error(-code));
            }
            _ => f(kind, body.get(4..).unwrap_or(&[])),
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// Deletes the UDP conntrack entries whose original destination port is `port`.
pub fn flush_udp_dport(port: u16) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut buf = vec![0u8; 256 * 1024];
    sock.send(&message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, 1, &[]), 0)?;
    let mut stale: Vec<Vec<u8>> = Vec::new();
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let done = walk(&buf[..n], |_, payload| {
            if let Some(t) = matching_tuple(payload, port) {
                stale.push(t.to_vec());
            }
        })?;
        if done {
            break;
        }
    }
    for (i, tuple) in stale.iter().enumerate() {
        sock.send(
            &message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, i as u32 + 2, tuple),
            0,
        )?;
        let n = sock.recv(&mut &mut buf[..], 0)?;
        match walk(&buf[..n], |_, _| {}) {
            // Gone already (timed out, or deleted by someone else): that is the goal.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => {
                r?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn entry(proto: u8, dport: u16) -> Vec<u8> {
        let p = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(2, &1234u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        let tuple = [
            attr(1 | 0x8000, &attr(1, &[10, 0, 0, 1])),
            attr(CTA_TUPLE_PROTO | 0x8000, &p),
        ]
        .concat();
        [
            attr(CTA_TUPLE_ORIG | 0x8000, &tuple),
            attr(3, &[0, 0, 0, 1]),
        ]
        .concat()
    }

    #[test]
    fn only_udp_entries_for_the_port_match_and_the_whole_tuple_is_returned() {
        let e = entry(IPPROTO_UDP, 5353);
        let t = matching_tuple(&e, 5353).expect("match");
        assert_eq!(
            u16::from_ne_bytes([t[2], t[3]]) & NLA_TYPE_MASK,
            CTA_TUPLE_ORIG
        );
        assert_eq!(usize::from(u16::from_ne_bytes([t[0], t[1]])), t.len());
        assert!(matching_tuple(&e, 5354).is_none());
        assert!(matching_tuple(&entry(6, 5353), 5353).is_none());
    }

    #[test]
    fn walk_reports_errors_and_completion() {
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(walk(&done, |_, _| {}).unwrap());
        let mut err = vec![0u8; 36];
        err[..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(
            walk(&err, |_, _| {}).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}
