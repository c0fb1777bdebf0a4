//! `netshim.port-mappings`: the ECS `portMappings` array, and the mode-level rules over it.

use std::net::Ipv4Addr;

use serde_json::Value;

use super::{RequestError, is_safe_name, quote};
use crate::types::{NetworkMode, PortRange, Protocol};

/// What the request says about the host side of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPorts {
    /// `hostPort` absent or 0: netshim picks (a contiguous run for a range).
    Dynamic,
    /// `hostPort` (or `hostPortRange`) given.
    Static(PortRange),
}

/// One validated `portMappings` entry (a range stays a range here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container: PortRange,
    pub host: HostPorts,
    /// Bind address; whether the host really holds it is checked at setup.
    pub host_ip: Option<Ipv4Addr>,
    pub name: Option<String>,
}

/// Longest mapping `name`.
const NAME_MAX: usize = 64;
/// Most entries one request may carry (ranges count once).
const MAX_ENTRIES: usize = 256;

fn merr(i: usize, msg: impl std::fmt::Display) -> RequestError {
    RequestError::Mapping(format!("entry {i}: {msg}"))
}

/// An integer port from JSON, refusing strings, fractions and out-of-range values; the message
/// names `key` and says what was wrong.
pub(crate) fn json_port(v: &Value, key: &str, allow_zero: bool) -> Result<u16, String> {
    let lo = if allow_zero { 0 } else { 1 };
    match v.as_u64() {
        Some(n) if n >= lo && n <= 65535 => Ok(n as u16),
        _ => Err(format!(
            "{key} must be an integer {lo}-65535, got {}{}",
            short(v),
            if v.is_string() {
                " (a string: drop the quotes)"
            } else {
                ""
            }
        )),
    }
}

/// A JSON value for an error message, cut short and escaped.
pub(crate) fn short(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        other => {
            // serde_json escapes C0 controls inside strings but leaves C1 (U+0080-U+009F, e.g.
            // the one-byte CSI U+009B) as they are: escape them before they reach a terminal.
            let t = crate::output::escape_controls(&other.to_string());
            if t.chars().count() > 40 {
                format!("{}…", t.chars().take(40).collect::<String>())
            } else {
                t
            }
        }
    }
}

fn json_str<'a>(v: &'a Value, i: usize, key: &str) -> Result<&'a str, RequestError> {
    v.as_str()
        .ok_or_else(|| merr(i, format!("{key} must be a string, got {}", short(v))))
}

/// A bind address for a host port: unicast IPv4 (the host must hold it; setup checks).
fn parse_host_ip(s: &str, i: usize) -> Result<Option<Ipv4Addr>, RequestError> {
    if s.is_empty() || s == "0.0.0.0" {
        return Ok(None);
    }
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| merr(i, format!("hostIp {} is not an IPv4 address", quote(s))))?;
    if ip.is_multicast() || ip.is_broadcast() || ip.octets()[0] == 0 {
        return Err(merr(
            i,
            format!(
                "hostIp {ip} is not a unicast address: give an address of this host, or omit hostIp for all"
            ),
        ));
    }
    Ok(Some(ip))
}

/// Parses the ECS `portMappings` array.
pub fn parse_mappings(s: &str) -> Result<Vec<PortMapping>, RequestError> {
    let v: Value = serde_json::from_str(s).map_err(|e| RequestError::Json(e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(RequestError::Mapping(
            "must be a JSON array of portMappings objects".into(),
        ));
    };
    if items.len() > MAX_ENTRIES {
        return Err(RequestError::Mapping(format!(
            "{} entries, at most {MAX_ENTRIES}: use containerPortRange for many ports",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_entry(i, item))
        .collect()
}

fn parse_entry(i: usize, item: &Value) -> Result<PortMapping, RequestError> {
    let Value::Object(obj) = item else {
        return Err(merr(
            i,
            "must be a JSON object like {\"containerPort\": 80}",
        ));
    };
    let mut container = None;
    let mut host_port = None;
    let mut host_range = None;
    let mut protocol = Protocol::Tcp;
    let mut host_ip = None;
    let mut name = None;
    for (k, v) in obj {
        match k.as_str() {
            "containerPort" => {
                container = Some(PortRange::single(
                    json_port(v, k, false).map_err(|e| merr(i, e))?,
                ))
            }
            "containerPortRange" => {
                if obj.contains_key("containerPort") {
                    return Err(merr(
                        i,
                        "give containerPort or containerPortRange, not both",
                    ));
                }
                container = Some(
                    PortRange::parse(json_str(v, i, k)?)
                        .map_err(|e| merr(i, format!("{k}: {e}")))?,
                );
            }
            "hostPort" => host_port = Some(json_port(v, k, true).map_err(|e| merr(i, e))?),
            "hostPortRange" => {
                host_range = Some(
                    PortRange::parse(json_str(v, i, k)?)
                        .map_err(|e| merr(i, format!("{k}: {e}")))?,
                )
            }
            "protocol" => {
                let p = json_str(v, i, k)?;
                protocol = p.parse().map_err(|_| {
                    merr(
                        i,
                        format!("unknown protocol {}: use \"tcp\" or \"udp\"", quote(p)),
                    )
                })?;
            }
            "hostIp" => host_ip = parse_host_ip(json_str(v, i, k)?, i)?,
            "name" => {
                let n = json_str(v, i, k)?;
                if !is_safe_name(n, NAME_MAX) {
                    return Err(merr(
                        i,
                        format!(
                            "name {} is not a port name: use 1-{NAME_MAX} letters, digits, '_', '.' or '-'",
                            quote(n)
                        ),
                    ));
                }
                name = Some(n.to_string());
            }
            // ECS fields netshim accepts and does not act on.
            "appProtocol" => {}
            other => {
                return Err(merr(
                    i,
                    format!(
                        "unknown key {} (known: containerPort, containerPortRange, hostPort, hostPortRange, protocol, hostIp, name)",
                        quote(other)
                    ),
                ));
            }
        }
    }
    let container =
        container.ok_or_else(|| merr(i, "containerPort or containerPortRange is required"))?;
    let host = match (host_port, host_range) {
        (Some(_), Some(_)) => return Err(merr(i, "give hostPort or hostPortRange, not both")),
        (None | Some(0), None) => HostPorts::Dynamic,
        (Some(p), None) => {
            if container.count() != 1 {
                return Err(merr(
                    i,
                    "a containerPortRange takes hostPortRange (same length) or no host port, not hostPort",
                ));
            }
            HostPorts::Static(PortRange::single(p))
        }
        (None, Some(r)) => {
            if r.count() != container.count() {
                return Err(merr(
                    i,
                    format!("hostPortRange {r} and container range {container} differ in length"),
                ));
            }
            HostPorts::Static(r)
        }
    };
    Ok(PortMapping {
        protocol,
        container,
        host,
        host_ip,
        name,
    })
}

/// Mode-level rules (ECS): no duplicates, host/awsvpc keep host = container, none has no mappings.
pub fn validate(mode: NetworkMode, mappings: &[PortMapping]) -> Result<(), RequestError> {
    if mode == NetworkMode::None && !mappings.is_empty() {
        return Err(RequestError::Mapping(
            "network mode none takes no port mappings: remove them or use bridge mode".into(),
        ));
    }
    for (i, m) in mappings.iter().enumerate() {
        if matches!(mode, NetworkMode::Host | NetworkMode::Awsvpc)
            && let HostPorts::Static(h) = m.host
            && h != m.container
        {
            return Err(merr(
                i,
                format!(
                    "in {mode} mode hostPort must be absent, 0 or equal to containerPort ({} != {}): ports cannot be remapped in this mode",
                    h, m.container
                ),
            ));
        }
        for (j, o) in mappings.iter().enumerate().take(i) {
            if o.protocol == m.protocol && o.container.overlaps(&m.container) {
                return Err(merr(
                    i,
                    format!(
                        "container port {}/{} is already mapped by entry {j}: map each container port once per protocol",
                        m.container, m.protocol
                    ),
                ));
            }
            if let (HostPorts::Static(a), HostPorts::Static(b)) = (m.host, o.host)
                && o.protocol == m.protocol
                && a.overlaps(&b)
                && (m.host_ip.is_none() || o.host_ip.is_none() || m.host_ip == o.host_ip)
            {
                return Err(merr(
                    i,
                    format!("host port {a}/{} is also used by entry {j}", m.protocol),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{MODE, PORT_MAPPINGS, from_annotations};
    use super::*;
    use std::collections::HashMap;

    fn ann(mode: &str, maps: Option<&str>) -> HashMap<String, String> {
        let mut a = HashMap::new();
        a.insert(MODE.to_string(), mode.to_string());
        if let Some(m) = maps {
            a.insert(PORT_MAPPINGS.to_string(), m.to_string());
        }
        a
    }

    fn err(mode: &str, maps: &str) -> String {
        from_annotations(&ann(mode, Some(maps)))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn dynamic_when_host_port_absent_or_zero() {
        let r = from_annotations(&ann(
            "bridge",
            Some(r#"[{"containerPort":80},{"containerPort":81,"hostPort":0,"protocol":"udp"}]"#),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(r.mode, NetworkMode::Bridge);
        assert_eq!(r.mappings[0].host, HostPorts::Dynamic);
        assert_eq!(r.mappings[0].protocol, Protocol::Tcp);
        assert_eq!(r.mappings[1].host, HostPorts::Dynamic);
        assert_eq!(r.mappings[1].protocol, Protocol::Udp);
    }

    #[test]
    fn static_and_range_mappings() {
        let r = from_annotations(&ann(
            "bridge",
            Some(r#"[{"containerPort":80,"hostPort":8080,"hostIp":"127.0.0.1","name":"web"},{"containerPortRange":"9000-9002"},{"containerPortRange":"7000-7001","hostPortRange":"17000-17001","protocol":"UDP"}]"#),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            r.mappings[0].host,
            HostPorts::Static(PortRange::single(8080))
        );
        assert_eq!(r.mappings[0].host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(r.mappings[0].name.as_deref(), Some("web"));
        assert_eq!(
            r.mappings[1].container,
            PortRange {
                start: 9000,
                end: 9002
            }
        );
        assert_eq!(r.mappings[1].host, HostPorts::Dynamic);
        assert_eq!(
            r.mappings[2].host,
            HostPorts::Static(PortRange {
                start: 17000,
                end: 17001
            })
        );
    }

    #[test]
    fn malformed_json_is_refused() {
        assert!(err("bridge", "[{containerPort:80}").contains("not valid JSON"));
        assert!(err("bridge", r#"{"containerPort":80}"#).contains("JSON array"));
    }

    #[test]
    fn bad_ports_are_refused() {
        for (bad, want) in [
            (
                r#"[{"containerPort":0}]"#,
                "entry 0: containerPort must be an integer 1-65535, got 0",
            ),
            (
                r#"[{"containerPort":70000}]"#,
                "entry 0: containerPort must be an integer 1-65535, got 70000",
            ),
            (
                r#"[{"containerPort":"80"}]"#,
                "entry 0: containerPort must be an integer 1-65535, got \"80\" (a string: drop the quotes)",
            ),
            (
                r#"[{"containerPort":80,"hostPort":70000}]"#,
                "entry 0: hostPort must be an integer 0-65535, got 70000",
            ),
            (
                r#"[{"containerPort":80.5}]"#,
                "entry 0: containerPort must be an integer 1-65535, got 80.5",
            ),
            (
                r#"[{"hostPort":80}]"#,
                "entry 0: containerPort or containerPortRange is required",
            ),
        ] {
            assert_eq!(
                err("bridge", bad),
                format!("annotation netshim.port-mappings: {want}")
            );
        }
    }

    #[test]
    fn unknown_protocol_and_keys_are_refused() {
        assert!(
            err("bridge", r#"[{"containerPort":80,"protocol":"sctp"}]"#)
                .contains("unknown protocol \"sctp\"")
        );
        assert!(
            err("bridge", r#"[{"containerPort":80,"protocol":17}]"#)
                .contains("protocol must be a string, got 17")
        );
        assert!(
            err("bridge", r#"[{"containerPort":80,"hostport":80}]"#)
                .contains("unknown key \"hostport\"")
        );
    }

    #[test]
    fn duplicate_container_port_is_refused() {
        let e = err(
            "bridge",
            r#"[{"containerPort":80},{"containerPort":80,"hostPort":81}]"#,
        );
        assert!(e.contains("already mapped by entry 0"), "{e}");
        // same port, other protocol is fine
        assert!(
            from_annotations(&ann(
                "bridge",
                Some(r#"[{"containerPort":53},{"containerPort":53,"protocol":"udp"}]"#)
            ))
            .is_ok()
        );
        let e = err(
            "bridge",
            r#"[{"containerPortRange":"80-90"},{"containerPort":85}]"#,
        );
        assert!(e.contains("already mapped"), "{e}");
    }

    #[test]
    fn reversed_range_is_refused() {
        let e = err("bridge", r#"[{"containerPortRange":"90-80"}]"#);
        assert!(e.contains("reversed"), "{e}");
    }

    #[test]
    fn host_port_twice_is_refused() {
        let e = err(
            "bridge",
            r#"[{"containerPort":80,"hostPort":8080},{"containerPort":81,"hostPort":8080}]"#,
        );
        assert!(e.contains("host port 8080/tcp is also used"), "{e}");
    }

    #[test]
    fn host_mode_cannot_remap() {
        let e = err("host", r#"[{"containerPort":80,"hostPort":8080}]"#);
        assert!(e.contains("must be absent, 0 or equal"), "{e}");
        assert!(
            from_annotations(&ann(
                "host",
                Some(r#"[{"containerPort":80,"hostPort":80}]"#)
            ))
            .is_ok()
        );
    }

    #[test]
    fn none_mode_takes_no_mappings() {
        let e = err("none", r#"[{"containerPort":80}]"#);
        assert!(e.contains("takes no port mappings"), "{e}");
        assert!(from_annotations(&ann("none", Some("[]"))).is_ok());
    }

    #[test]
    fn host_ip_must_be_a_unicast_ipv4_address() {
        assert!(err("bridge", r#"[{"containerPort":80,"hostIp":"nope"}]"#).contains("not an IPv4"));
        for bad in ["255.255.255.255", "224.0.0.1", "0.1.2.3"] {
            let e = err(
                "bridge",
                &format!(r#"[{{"containerPort":80,"hostIp":"{bad}"}}]"#),
            );
            assert!(e.contains("is not a unicast address"), "{bad}: {e}");
        }
    }

    #[test]
    fn port_names_are_safe_identifiers() {
        let e = err("bridge", r#"[{"containerPort":80,"name":"a b\u001b"}]"#);
        assert!(
            e.contains("is not a port name") && e.contains("\\u001b"),
            "{e}"
        );
    }

    #[test]
    fn too_many_entries_are_refused() {
        let many = format!(
            "[{}]",
            (1..=300)
                .map(|p| format!(r#"{{"containerPort":{p}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(err("bridge", &many).contains("300 entries, at most 256"));
    }
}
