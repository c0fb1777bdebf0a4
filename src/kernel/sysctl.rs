//! The few sysctls netshim needs, read before written so an unchanged value costs no write.

use std::fs;
use std::io;

fn set(path: &str, value: &str) -> io::Result<()> {
    match fs::read_to_string(path) {
        Ok(cur) if cur.trim() == value => Ok(()),
        _ => fs::write(path, value),
    }
}

/// `net.ipv4.ip_forward = 1` in the current netns.
pub fn enable_ip_forward() -> io::Result<()> {
    set("/proc/sys/net/ipv4/ip_forward", "1")
}

/// `net.ipv4.conf.<dev>.route_localnet = 1`: lets 127.0.0.1:<hostPort> reach a container
/// through the bridge. Only set on netshim's own bridge; the firewall drops 127/8 arriving
/// from anywhere else.
pub fn enable_route_localnet(dev: &str) -> io::Result<()> {
    set(
        &format!("/proc/sys/net/ipv4/conf/{dev}/route_localnet"),
        "1",
    )
}

/// The kernel's ephemeral range, `net.ipv4.ip_local_port_range`.
pub fn local_port_range() -> Option<(u16, u16)> {
    let s = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b && a > 0 => Some((a, b)),
        _ => None,
    }
}

/// `net.ipv4.conf.<dev>.<key> = value`.
pub fn set_conf(dev: &str, key: &str, value: &str) -> io::Result<()> {
    set(&format!("/proc/sys/net/ipv4/conf/{dev}/{key}"), value)
}
