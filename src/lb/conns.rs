//! Open inbound connections of a container, for `shim drain`: TCP sockets in the container's
//! network namespace whose local port is one of its mapped ports, asked of the kernel by
//! sock_diag (`kernel::sockdiag`), with `/proc/<pid>/net/tcp{,6}` as the fallback. In host mode
//! the namespace is the host's and the ports are the host ports. Sockets, not conntrack: they
//! are what the application still serves, whatever path (DNAT, hairpin, direct) they came by.

use std::fs;
use std::io;

/// Socket states that are an inbound connection still being served: ESTABLISHED, SYN_RECV
/// (the handshake under way) and CLOSE_WAIT (the peer is done, the server still answers).
const BUSY: [u8; 3] = [0x01, 0x03, 0x08];

/// Connections in `text` (the format of `/proc/net/tcp`) whose local port is in `ports`.
pub fn count_in(text: &str, ports: &[u16]) -> usize {
    text.lines()
        .skip(1)
        .filter(|l| {
            let mut f = l.split_whitespace();
            let (Some(_sl), Some(local), Some(_rem), Some(st)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return false;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let st = u8::from_str_radix(st, 16).ok();
            matches!((port, st), (Some(p), Some(s)) if ports.contains(&p) && BUSY.contains(&s))
        })
        .count()
}

/// Connections to `ports` in the network namespace of process `pid`; a process that is gone
/// has none.
pub fn count(pid: i32, ports: &[u16]) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    match crate::kernel::netns::open_pid(pid) {
        Ok(ns) => {
            use std::os::fd::AsFd;
            if let Ok(n) = crate::kernel::sockdiag::busy_on_ports(ns.as_fd(), ports) {
                return Ok(n);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(_) => {}
    }
    count_proc(pid, ports)
}

/// [`count`] by reading `/proc/<pid>/net/tcp` and `tcp6` (which show that process's netns).
pub fn count_proc(pid: i32, ports: &[u16]) -> io::Result<usize> {
    let mut n = 0;
    for f in ["tcp", "tcp6"] {
        match fs::read_to_string(format!("/proc/{pid}/net/{f}")) {
            Ok(t) => n += count_in(&t, ports),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // The process exited between the two reads.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const SAMPLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0200D50A:0050 0100D50A:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0200D50A:0050 0100D50A:A1B3 06 00000000:00000000 03:00000F9A 00000000     0        0 0 3 0000000000000000
   3: 0200D50A:0050 0100D50A:A1B4 08 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
   4: 0200D50A:9C41 0A000001:0050 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn counts_busy_sockets_on_the_ports_only() {
        // Listener (0A), TIME_WAIT (06) and an outbound socket to remote port 80 do not count.
        assert_eq!(count_in(SAMPLE, &[80]), 2);
        assert_eq!(count_in(SAMPLE, &[8080]), 0);
        assert_eq!(count_in(SAMPLE, &[0x9C41]), 1);
        assert_eq!(count_in("", &[80]), 0);
    }

    #[test]
    fn sees_a_real_connection_of_this_process() {
        // The wildcard address: no other socket of this netns (another test's listener on
        // another address, say) can then have the same local port; only loopback connects.
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let pid = std::process::id() as i32;
        assert_eq!(count(pid, &[port]).unwrap(), 0);
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(count(pid, &[port]).unwrap(), 1);
        assert_eq!(count_proc(pid, &[port]).unwrap(), 1);
        drop(c);
        drop(s);
        // A test of this process that forks at this moment holds a copy of the socket until
        // its exec, so the close may take effect a little later.
        assert!(soon(|| count(pid, &[port]).unwrap() == 0));
        assert!(soon(|| count_proc(pid, &[port]).unwrap() == 0));
    }

    /// Whether `f` holds within two seconds.
    fn soon(mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !f() {
            if std::time::Instant::now() > end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }
}
