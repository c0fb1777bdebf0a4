//! The container's network request: annotations in, a validated [`NetworkRequest`] out.
//!
//! This is the only module that knows annotation names. It is pure (no I/O) so every
//! validation rule is unit-tested without root.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Annotation naming the network mode; a container without it is left alone.
pub const MODE: &str = "netshim.network-mode";
/// Annotation holding the ECS `portMappings` JSON array.
pub const PORT_MAPPINGS: &str = "netshim.port-mappings";
/// Annotation naming the service / target group the ports belong to.
pub const SERVICE: &str = "netshim.service";

/// Errors in the request: each names the annotation and, where it helps, the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("annotation {MODE}: unknown network mode {0:?}: use one of bridge, host, awsvpc, none")]
    UnknownMode(String),
    #[error("annotation {PORT_MAPPINGS}: not valid JSON: {0}")]
    Json(String),
    #[error("annotation {PORT_MAPPINGS}: {0}")]
    Mapping(String),
    #[error("annotation {SERVICE}: {0}")]
    Service(String),
}

/// One of the ECS network modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Bridge,
    Host,
    Awsvpc,
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::Awsvpc => "awsvpc",
            NetworkMode::None => "none",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(p: u16) -> Self {
        PortRange { start: p, end: p }
    }
    pub fn count(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.start <= o.end && o.start <= self.end
    }
    pub fn contains(&self, p: u16) -> bool {
        self.start <= p && p <= self.end
    }

    /// Parses `"8000-8010"` (or `"8000"`), requiring 1 ≤ start ≤ end ≤ 65535.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let p = |x: &str| -> Result<u16, String> {
            match x.parse::<u32>() {
                Ok(v) if (1..=65535).contains(&v) => Ok(v as u16),
                _ => Err(format!(
                    "{s:?} is not a port range: use \"START-END\" with ports 1-65535"
                )),
            }
        };
        let (start, end) = (p(a)?, p(b)?);
        if start > end {
            return Err(format!(
                "range {s:?} is reversed: write it low-high, e.g. \"{end}-{start}\""
            ));
        }
        Ok(PortRange { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

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
    pub host_ip: Option<Ipv4Addr>,
    pub name: Option<String>,
}

/// The validated network request of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    pub mode: NetworkMode,
    pub mappings: Vec<PortMapping>,
    pub service: Option<String>,
    /// Annotations the mode modules read themselves (`netshim.eni`, `netshim.ingress`).
    pub extra: BTreeMap<String, String>,
}

/// Reads the request from annotations. `Ok(None)`: no mode annotation, leave the container alone.
pub fn from_annotations(
    ann: &HashMap<String, String>,
) -> Result<Option<NetworkRequest>, RequestError> {
    let Some(mode) = ann.get(MODE) else {
        return Ok(None);
    };
    let mode = match mode.trim() {
        "bridge" => NetworkMode::Bridge,
        "host" => NetworkMode::Host,
        "awsvpc" => NetworkMode::Awsvpc,
        "none" => NetworkMode::None,
        other => return Err(RequestError::UnknownMode(other.to_string())),
    };
    let mappings = match ann.get(PORT_MAPPINGS) {
        None => Vec::new(),
        Some(s) if s.trim().is_empty() => Vec::new(),
        Some(s) => parse_mappings(s)?,
    };
    validate(mode, &mappings)?;
    let service = match ann.get(SERVICE).map(|s| s.trim()) {
        None | Some("") => None,
        Some(s) if s.len() > 255 || s.chars().any(|c| c.is_control()) => {
            return Err(RequestError::Service(
                "must be at most 255 printable characters".into(),
            ));
        }
        Some(s) => Some(s.to_string()),
    };
    let extra = ann
        .iter()
        .filter(|(k, _)| {
            k.starts_with("netshim.") && ![MODE, PORT_MAPPINGS, SERVICE].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Some(NetworkRequest {
        mode,
        mappings,
        service,
        extra,
    }))
}

fn merr(i: usize, msg: impl fmt::Display) -> RequestError {
    RequestError::Mapping(format!("entry {i}: {msg}"))
}

/// An integer port from JSON, refusing strings, fractions and out-of-range values.
fn json_port(v: &Value, i: usize, key: &str, allow_zero: bool) -> Result<u16, RequestError> {
    let lo = if allow_zero { 0 } else { 1 };
    match v.as_u64() {
        Some(n) if n >= lo && n <= 65535 => Ok(n as u16),
        _ => Err(merr(
            i,
            format!(
                "{key} must be an integer {lo}-65535, got {v}{}",
                if v.is_string() {
                    " (a string: drop the quotes)"
                } else {
                    ""
                }
            ),
        )),
    }
}

fn json_str<'a>(v: &'a Value, i: usize, key: &str) -> Result<&'a str, RequestError> {
    v.as_str()
        .ok_or_else(|| merr(i, format!("{key} must be a string, got {v}")))
}

/// Parses the ECS `portMappings` array.
pub fn parse_mappings(s: &str) -> Result<Vec<PortMapping>, RequestError> {
    let v: Value = serde_json::from_str(s).map_err(|e| RequestError::Json(e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(RequestError::Mapping(
            "must be a JSON array of portMappings objects".into(),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
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
                "containerPort" => container = Some(PortRange::single(json_port(v, i, k, false)?)),
                "containerPortRange" => {
                    let r = PortRange::parse(json_str(v, i, k)?)
                        .map_err(|e| merr(i, format!("{k}: {e}")))?;
                    container = Some(r);
                    if obj.contains_key("containerPort") {
                        return Err(merr(
                            i,
                            "give containerPort or containerPortRange, not both",
                        ));
                    }
                }
                "hostPort" => host_port = Some(json_port(v, i, k, true)?),
                "hostPortRange" => {
                    host_range = Some(
                        PortRange::parse(json_str(v, i, k)?)
                            .map_err(|e| merr(i, format!("{k}: {e}")))?,
                    )
                }
                "protocol" => {
                    protocol = match json_str(v, i, k)?.to_ascii_lowercase().as_str() {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        other => {
                            return Err(merr(
                                i,
                                format!("unknown protocol {other:?}: use \"tcp\" or \"udp\""),
                            ));
                        }
                    }
                }
                "hostIp" => {
                    let s = json_str(v, i, k)?;
                    if !s.is_empty() && s != "0.0.0.0" {
                        host_ip = Some(s.parse::<Ipv4Addr>().map_err(|_| {
                            merr(i, format!("hostIp {s:?} is not an IPv4 address"))
                        })?);
                    }
                }
                "name" => name = Some(json_str(v, i, k)?.to_string()),
                // ECS fields netshim accepts and does not act on.
                "appProtocol" => {}
                other => {
                    return Err(merr(
                        i,
                        format!(
                            "unknown key {other:?} (known: containerPort, containerPortRange, hostPort, hostPortRange, protocol, hostIp, name)"
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
                        format!(
                            "hostPortRange {r} and container range {container} differ in length"
                        ),
                    ));
                }
                HostPorts::Static(r)
            }
        };
        out.push(PortMapping {
            protocol,
            container,
            host,
            host_ip,
            name,
        });
    }
    Ok(out)
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
    use super::*;

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
    fn no_mode_annotation_means_leave_alone() {
        assert_eq!(from_annotations(&HashMap::new()).unwrap(), None);
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
    fn unknown_mode_is_refused() {
        let e = from_annotations(&ann("overlay", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown network mode \"overlay\""), "{e}");
    }

    #[test]
    fn bad_ports_are_refused() {
        assert!(err("bridge", r#"[{"containerPort":0}]"#).contains("1-65535"));
        assert!(err("bridge", r#"[{"containerPort":70000}]"#).contains("1-65535"));
        assert!(err("bridge", r#"[{"containerPort":"80"}]"#).contains("drop the quotes"));
        assert!(err("bridge", r#"[{"containerPort":80,"hostPort":70000}]"#).contains("hostPort"));
        assert!(err("bridge", r#"[{"containerPort":80.5}]"#).contains("integer"));
        assert!(err("bridge", r#"[{"hostPort":80}]"#).contains("required"));
    }

    #[test]
    fn unknown_protocol_and_keys_are_refused() {
        assert!(
            err("bridge", r#"[{"containerPort":80,"protocol":"sctp"}]"#)
                .contains("unknown protocol \"sctp\"")
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
    fn host_ip_must_be_ipv4() {
        assert!(err("bridge", r#"[{"containerPort":80,"hostIp":"nope"}]"#).contains("not an IPv4"));
    }
}
