//! The few sysctls netshim needs, read before written so an unchanged value costs no write.
//! Errors name the file, so a failure says which sysctl it was.

use std::fs;
use std::io;

fn named(path: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{path}: {e}"))
}

/// Sets `path` to `value`; returns what it was before.
fn set(path: &str, value: &str) -> io::Result<String> {
    match fs::read_to_string(path) {
        Ok(cur) if cur.trim() == value => Ok(value.to_string()),
        Ok(cur) => {
            fs::write(path, value).map_err(|e| named(path, e))?;
            Ok(cur.trim().to_string())
        }
        Err(e) => Err(named(path, e)),
    }
}

/// `net.ipv4.ip_forward = 1` in the current netns.
pub fn enable_ip_forward() -> io::Result<()> {
    set("/proc/sys/net/ipv4/ip_forward", "1").map(|_| ())
}

/// `net.ipv4.conf.<dev>.route_localnet = 1`: lets 127.0.0.1:<hostPort> reach a container
/// through the bridge. Only set on netshim's own bridge; the firewall drops 127/8 arriving
/// from anywhere else.
pub fn enable_route_localnet(dev: &str) -> io::Result<()> {
    set_conf(dev, "route_localnet", "1").map(|_| ())
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

/// `net.ipv4.conf.<dev>.<key> = value`; returns the value it had. `dev` must be a link name
/// (no path separators): the caller got it from the kernel or checked it.
pub fn set_conf(dev: &str, key: &str, value: &str) -> io::Result<String> {
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{dev:?} is not an interface name"),
        ));
    }
    set(&format!("/proc/sys/net/ipv4/conf/{dev}/{key}"), value)
}
