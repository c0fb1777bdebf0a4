//! Flushing UDP conntrack entries for a host port, so a replacement container gets the traffic
//! instead of a stale entry pointing at the old one.

use std::io;
use std::process::{Command, Stdio};

const CONNTRACK: &str = "/usr/sbin/conntrack";

/// Deletes conntrack entries whose original destination port is `port` (UDP). A missing
/// `conntrack` tool is reported, an empty match is not an error.
pub fn flush_udp_dport(port: u16) -> io::Result<()> {
    let st = Command::new(CONNTRACK)
        .args(["-D", "-p", "udp", "--orig-port-dst", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    // conntrack exits 1 when nothing matched.
    match st.code() {
        Some(0) | Some(1) => Ok(()),
        _ => Err(io::Error::other(format!("{CONNTRACK} exited with {st}"))),
    }
}
