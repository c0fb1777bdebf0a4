//! Inbound TCP connections in a network namespace, by `NETLINK_SOCK_DIAG` (what `ss` uses): the
//! kernel filters by state, so a namespace with thousands of TIME_WAIT sockets answers as fast
//! as an idle one (reading `/proc/<pid>/net/tcp` walks them all, tens of milliseconds).

use std::io;
use std::os::fd::BorrowedFd;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::netns;

/// Sockets still serving a peer: ESTABLISHED, SYN_RECV (handshake under way), CLOSE_WAIT (the
/// peer is done, the server still answers).
fn busy() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::SYN_RECV | StateFlags::CLOSE_WAIT
}

/// TCP sockets in netns `ns` (IPv4 and IPv6) in a busy state whose local port is in `ports`.
pub fn busy_on_ports(ns: BorrowedFd<'_>, ports: &[u16]) -> io::Result<usize> {
    let mut sock = netns::with_netns(ns, || Socket::new(NETLINK_SOCK_DIAG))??;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut n = 0;
    for (seq, family) in [(1u32, AF_INET), (2, AF_INET6)] {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        hdr.sequence_number = seq;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut msg = NetlinkMessage::new(
            hdr,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: busy(),
                socket_id,
            })
            .into(),
        );
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        sock.send(&out, 0)?;
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            let size = sock.recv(&mut &mut buf[..], 0)?;
            let mut off = 0;
            while off < size {
                let m = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[off..size])
                    .map_err(|e| io::Error::other(format!("sock_diag answer: {e}")))?;
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                        if ports.contains(&r.header.socket_id.source_port) =>
                    {
                        n += 1;
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(io::Error::other(format!("sock_diag: {e:?}")));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    #[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
    fn counts_a_connection_in_this_namespace() {
        let ns = File::open("/proc/self/ns/net").unwrap();
        // The wildcard address: no other socket of this netns (another test's listener on
        // another address, say) can then have the same local port; only loopback connects.
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(busy_on_ports(ns.as_fd(), &[port]).unwrap(), 0);
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        // The accepted socket (local port = port); the client's local port is another.
        assert_eq!(busy_on_ports(ns.as_fd(), &[port]).unwrap(), 1);
        drop(c);
        // The server side now waits in CLOSE_WAIT: still busy.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(busy_on_ports(ns.as_fd(), &[port]).unwrap(), 1);
        drop(s);
        // A test of this process that forks at this moment holds a copy of the socket until
        // its exec, so the close may take effect a little later.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while busy_on_ports(ns.as_fd(), &[port]).unwrap() != 0 {
            assert!(
                std::time::Instant::now() < end,
                "the closed socket stays busy"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
