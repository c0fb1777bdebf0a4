//! Is a host port held by a process on the host? Asked by trying to bind it (one syscall pair,
//! no /proc scan); the holder is named only on the error path.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};

use crate::alloc::PortProbe;
use crate::types::Protocol;

/// Probes by binding in the current network namespace.
pub struct BindProbe;

impl PortProbe for BindProbe {
    fn holder(&self, proto: Protocol, port: u16, ip: Option<Ipv4Addr>) -> Option<String> {
        let addr = SocketAddrV4::new(ip.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
        let taken = match proto {
            // std sets SO_REUSEADDR on TCP listeners: TIME_WAIT leftovers do not count, a
            // listener does.
            Protocol::Tcp => match TcpListener::bind(addr) {
                Ok(_) => false,
                Err(e) => e.kind() == std::io::ErrorKind::AddrInUse,
            },
            Protocol::Udp => match UdpSocket::bind(addr) {
                Ok(_) => false,
                Err(e) => e.kind() == std::io::ErrorKind::AddrInUse,
            },
        };
        taken.then(|| describe_holder(proto, port))
    }
}

/// "pid 123 (nginx)" for the process owning the socket on `port`, or "a process" if unknown.
pub fn describe_holder(proto: Protocol, port: u16) -> String {
    let files: &[&str] = match proto {
        Protocol::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let mut inodes = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let lport = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // TCP: only listeners (state 0A); UDP: any bound socket.
            if lport == Some(port) && (proto == Protocol::Udp || cols[3] == "0A") {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                if let Ok(target) = fs::read_link(fd.path())
                    && inodes.iter().any(|i| target.as_os_str() == i.as_str())
                {
                    let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    return format!("pid {pid} ({})", comm.trim());
                }
            }
        }
    }
    "a process".to_string()
}
