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

/// A sysctl a setup changed and the value it had: what a setup that fails puts back, so it
/// leaves the host's sysctls exactly as it found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The file under `/proc/sys/net/`.
    pub path: String,
    pub was: String,
}

/// Sets `path` to `value`; `Some` with the old value when that changed it.
fn set_tracked(path: &str, value: &str) -> io::Result<Option<Changed>> {
    let was = set(path, value)?;
    Ok((was != value).then(|| Changed {
        path: path.to_string(),
        was,
    }))
}

/// Puts back what [`Changed`] says. A file that is gone (its interface was deleted since) is
/// fine: there is nothing left to restore.
pub fn restore(c: &Changed) -> io::Result<()> {
    if !c.path.starts_with("/proc/sys/net/") || c.path.contains("/../") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} is not a network sysctl", c.path),
        ));
    }
    match set(&c.path, &c.was) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map(|_| ()),
    }
}

/// `net.ipv4.ip_forward = 1` in the current netns; what it changed, if anything.
pub fn enable_ip_forward() -> io::Result<Option<Changed>> {
    set_tracked("/proc/sys/net/ipv4/ip_forward", "1")
}

/// `net.ipv4.conf.<dev>.route_localnet = 1`: lets 127.0.0.1:<hostPort> reach a container
/// through the bridge. Only set on netshim's own bridge; the firewall drops 127/8 arriving
/// from anywhere else. Returns what it changed, if anything.
pub fn enable_route_localnet(dev: &str) -> io::Result<Option<Changed>> {
    check_dev(dev)?;
    set_tracked(
        &format!("/proc/sys/net/ipv4/conf/{dev}/route_localnet"),
        "1",
    )
}

fn check_dev(dev: &str) -> io::Result<()> {
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{dev:?} is not an interface name"),
        ));
    }
    Ok(())
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
    check_dev(dev)?;
    set(&format!("/proc/sys/net/ipv4/conf/{dev}/{key}"), value)
}

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Parses `net.ipv4.ip_local_reserved_ports` ("8080,9000-9100").
pub fn parse_port_list(s: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>())
            && a <= b
        {
            out.extend(a..=b);
        }
    }
    out
}

/// Renders ports as the kernel's list, runs of consecutive ports as ranges.
pub fn render_port_list(ports: &std::collections::BTreeSet<u16>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = ports.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end.wrapping_add(1))) && end < u16::MAX {
            end += 1;
            it.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// The ports the host keeps out of the ephemeral range.
pub fn reserved_ports() -> io::Result<Vec<u16>> {
    fs::read_to_string(RESERVED)
        .map(|s| parse_port_list(&s))
        .map_err(|e| named(RESERVED, e))
}

/// Adds `add` to and removes `remove` from `net.ipv4.ip_local_reserved_ports`, keeping what
/// else is there; written only when it changes.
pub fn change_reserved_ports(add: &[u16], remove: &[u16]) -> io::Result<()> {
    let cur = fs::read_to_string(RESERVED).map_err(|e| named(RESERVED, e))?;
    let mut set: std::collections::BTreeSet<u16> = parse_port_list(&cur).into_iter().collect();
    let before = set.clone();
    set.extend(add.iter().copied());
    for p in remove {
        set.remove(p);
    }
    if set == before {
        return Ok(());
    }
    let text = render_port_list(&set);
    // An empty list is written as a newline (the kernel refuses an empty write).
    fs::write(RESERVED, if text.is_empty() { "\n".into() } else { text })
        .map_err(|e| named(RESERVED, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserved_list_round_trips_with_ranges() {
        let p = parse_port_list("22, 8080,9000-9003,bad,7-5\n");
        assert_eq!(p, vec![22, 8080, 9000, 9001, 9002, 9003]);
        let set = p.into_iter().collect();
        assert_eq!(render_port_list(&set), "22,8080,9000-9003");
        assert_eq!(
            render_port_list(&[65534u16, 65535].into_iter().collect()),
            "65534-65535"
        );
    }
}
