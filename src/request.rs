//! The container's network request: annotations in, a validated [`NetworkRequest`] out.
//!
//! This is the only module that knows annotation names. It is pure (no I/O) so every
//! validation rule is unit-tested without root.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Annotation naming the network mode; a container without it is left alone.
pub const MODE: &str = "netshim.network-mode";
/// Annotation holding the ECS `portMappings` JSON array.
pub const PORT_MAPPINGS: &str = "netshim.port-mappings";
/// Annotation naming the service / target group the ports belong to.
pub const SERVICE: &str = "netshim.service";
/// awsvpc: the task's ENI (JSON object).
pub const ENI: &str = "netshim.eni";
/// Per-task ingress rules (JSON array).
pub const INGRESS: &str = "netshim.ingress";

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
    #[error("annotation {ENI}: {0}")]
    Eni(String),
    #[error("annotation {INGRESS}: {0}")]
    Ingress(String),
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
    /// awsvpc: the task's ENI.
    pub eni: Option<EniSpec>,
    /// When present, new inbound connections not matching a rule are dropped.
    pub ingress: Option<Vec<IngressRule>>,
}

/// How the task gets its ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    /// The interface moves into the task (ECS awsvpc, Terway exclusive ENI).
    Exclusive,
    /// The interface stays on the host; the task takes one of its secondary addresses.
    Shared,
}

/// The `netshim.eni` request. Only `mac` is required; the rest may come from instance metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniSpec {
    pub mac: [u8; 6],
    pub ipv4: Vec<Ipv4Network>,
    pub ipv6: Vec<Ipv6Network>,
    pub gateway4: Option<Ipv4Addr>,
    pub gateway6: Option<Ipv6Addr>,
    pub mtu: Option<u32>,
    pub attachment: Attachment,
}

impl EniSpec {
    /// Only the MAC was given: look the rest up in instance metadata.
    pub fn needs_metadata(&self) -> bool {
        self.ipv4.is_empty() && self.ipv6.is_empty()
    }

    /// The IPv4 gateway: given, or the subnet base + 1 (the AWS convention).
    pub fn gateway4(&self) -> Option<Ipv4Addr> {
        self.gateway4.or_else(|| {
            self.ipv4
                .first()
                .map(|n| Ipv4Addr::from(u32::from(n.network()) + 1))
        })
    }

    /// Checks that every address lies in the gateway's subnet.
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(gw) = self.gateway4() {
            for a in &self.ipv4 {
                if !a.contains(gw) {
                    return Err(RequestError::Eni(format!(
                        "address {a} is not in the subnet of gateway {gw}: fix ipv4Addresses or subnetGatewayIpv4Address"
                    )));
                }
            }
        }
        if let Some(gw) = self.gateway6 {
            for a in &self.ipv6 {
                if !a.contains(gw) && !gw.is_unicast_link_local() {
                    return Err(RequestError::Eni(format!(
                        "address {a} is not in the subnet of gateway {gw}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Formats a MAC as `02:00:00:00:00:01`.
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:00:00:00:00:01` (also `-` separated, any case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// Parses the `netshim.eni` JSON object.
pub fn parse_eni(s: &str) -> Result<EniSpec, RequestError> {
    let e = |m: String| RequestError::Eni(m);
    let v: Value = serde_json::from_str(s).map_err(|x| e(format!("not valid JSON: {x}")))?;
    let Value::Object(o) = v else {
        return Err(e(
            "must be a JSON object like {\"macAddress\": \"02:...\"}".into()
        ));
    };
    let mut mac = None;
    let mut spec = EniSpec {
        mac: [0; 6],
        ipv4: vec![],
        ipv6: vec![],
        gateway4: None,
        gateway6: None,
        mtu: None,
        attachment: Attachment::Exclusive,
    };
    let strs = |k: &str, v: &Value| -> Result<Vec<String>, RequestError> {
        v.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| RequestError::Eni(format!("{k} must be an array of strings")))
    };
    for (k, v) in &o {
        match k.as_str() {
            "macAddress" => {
                mac = Some(v.as_str().and_then(parse_mac).ok_or_else(|| {
                    e(format!(
                        "macAddress {v} is not a MAC address like \"02:00:00:00:00:01\""
                    ))
                })?)
            }
            "ipv4Addresses" => {
                for a in strs(k, v)? {
                    spec.ipv4.push(a.parse().map_err(|_| {
                        e(format!(
                            "ipv4Addresses: {a:?} is not an IPv4 CIDR like \"10.0.1.23/24\""
                        ))
                    })?);
                }
            }
            "ipv6Addresses" => {
                for a in strs(k, v)? {
                    spec.ipv6.push(
                        a.parse()
                            .map_err(|_| e(format!("ipv6Addresses: {a:?} is not an IPv6 CIDR")))?,
                    );
                }
            }
            "subnetGatewayIpv4Address" => {
                let g = v.as_str().unwrap_or_default();
                spec.gateway4 = Some(g.parse().map_err(|_| {
                    e(format!(
                        "subnetGatewayIpv4Address {v} is not an IPv4 address"
                    ))
                })?);
            }
            "subnetGatewayIpv6Address" => {
                let g = v.as_str().unwrap_or_default();
                spec.gateway6 = Some(g.parse().map_err(|_| {
                    e(format!(
                        "subnetGatewayIpv6Address {v} is not an IPv6 address"
                    ))
                })?);
            }
            "mtu" => {
                spec.mtu = Some(match v.as_u64() {
                    Some(m) if (68..=65535).contains(&m) => m as u32,
                    _ => return Err(e(format!("mtu must be an integer 68-65535, got {v}"))),
                })
            }
            "attachment" => {
                spec.attachment = match v.as_str() {
                    Some("exclusive") => Attachment::Exclusive,
                    Some("shared") => Attachment::Shared,
                    _ => {
                        return Err(e(format!(
                            "attachment must be \"exclusive\" or \"shared\", got {v}"
                        )));
                    }
                }
            }
            // Accepted from the ECS task payload; DNS is the runtime's business.
            "domainNameServers"
            | "domainNameSearchList"
            | "privateDnsName"
            | "subnetGatewayIpv4AddressCidr" => {}
            other => return Err(e(format!("unknown key {other:?}"))),
        }
    }
    spec.mac = mac.ok_or_else(|| e("macAddress is required".into()))?;
    if spec.attachment == Attachment::Shared && spec.ipv4.is_empty() {
        return Err(e(
            "a shared ENI needs ipv4Addresses: the secondary addresses tasks may take".into(),
        ));
    }
    spec.validate()?;
    Ok(spec)
}

/// One ingress rule: new connections on `ports`/`protocol` from `cidr` are admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    pub protocol: Protocol,
    pub ports: PortRange,
    pub cidr: IpNetwork,
}

/// Parses the `netshim.ingress` JSON array.
pub fn parse_ingress(s: &str) -> Result<Vec<IngressRule>, RequestError> {
    let e = |m: String| RequestError::Ingress(m);
    let v: Value = serde_json::from_str(s).map_err(|x| e(format!("not valid JSON: {x}")))?;
    let Value::Array(items) = v else {
        return Err(e(
            "must be a JSON array of {\"protocol\", \"port\" or \"portRange\", \"cidr\"} objects"
                .into(),
        ));
    };
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let Value::Object(o) = it else {
            return Err(e(format!("entry {i}: must be an object")));
        };
        let protocol = match o
            .get("protocol")
            .and_then(|p| p.as_str())
            .map(|p| p.to_ascii_lowercase())
        {
            None => Protocol::Tcp,
            Some(p) if p == "tcp" => Protocol::Tcp,
            Some(p) if p == "udp" => Protocol::Udp,
            Some(p) => {
                return Err(e(format!(
                    "entry {i}: unknown protocol {p:?}: use \"tcp\" or \"udp\""
                )));
            }
        };
        let ports = match (o.get("port"), o.get("portRange")) {
            (Some(p), None) => {
                PortRange::single(json_port(p, i, "port", false).map_err(|x| e(x.to_string()))?)
            }
            (None, Some(r)) => PortRange::parse(r.as_str().unwrap_or_default())
                .map_err(|x| e(format!("entry {i}: portRange: {x}")))?,
            _ => {
                return Err(e(format!(
                    "entry {i}: give exactly one of port or portRange"
                )));
            }
        };
        let cidr_s = o
            .get("cidr")
            .and_then(|c| c.as_str())
            .ok_or_else(|| e(format!("entry {i}: cidr is required")))?;
        let cidr: IpNetwork = cidr_s.parse().map_err(|_| {
            e(format!(
                "entry {i}: cidr {cidr_s:?} is not a CIDR like \"10.0.0.0/16\""
            ))
        })?;
        if let Some(k) = o
            .keys()
            .find(|k| !["protocol", "port", "portRange", "cidr"].contains(&k.as_str()))
        {
            return Err(e(format!("entry {i}: unknown key {k:?}")));
        }
        out.push(IngressRule {
            protocol,
            ports,
            cidr,
        });
    }
    Ok(out)
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
    let eni = match ann.get(ENI) {
        Some(s) if mode == NetworkMode::Awsvpc => Some(parse_eni(s)?),
        Some(_) => {
            return Err(RequestError::Eni(format!(
                "only awsvpc mode takes an ENI, this container asks for {mode}"
            )));
        }
        None if mode == NetworkMode::Awsvpc => {
            return Err(RequestError::Eni(
                "awsvpc mode needs it: {\"macAddress\": \"02:...\", ...}".into(),
            ));
        }
        None => None,
    };
    let ingress = match ann.get(INGRESS) {
        Some(s) if mode == NetworkMode::Host => {
            let _ = s;
            return Err(RequestError::Ingress(
                "host mode has no network namespace of its own to filter".into(),
            ));
        }
        Some(s) => Some(parse_ingress(s)?),
        None => None,
    };
    Ok(Some(NetworkRequest {
        mode,
        mappings,
        service,
        eni,
        ingress,
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

#[cfg(test)]
mod eni_tests {
    use super::*;

    #[test]
    fn eni_full_and_mac_only() {
        let e = parse_eni(r#"{"macAddress":"02:00:00:00:00:0A","ipv4Addresses":["10.0.1.23/24"],"subnetGatewayIpv4Address":"10.0.1.1","mtu":9001}"#).unwrap();
        assert_eq!(e.mac, [2, 0, 0, 0, 0, 10]);
        assert_eq!(e.gateway4(), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(e.attachment, Attachment::Exclusive);
        let m = parse_eni(r#"{"macAddress":"02:00:00:00:00:0a"}"#).unwrap();
        assert!(m.needs_metadata());
        let d = parse_eni(r#"{"macAddress":"02:00:00:00:00:0a","ipv4Addresses":["10.0.4.9/22"]}"#)
            .unwrap();
        assert_eq!(
            d.gateway4(),
            Some(Ipv4Addr::new(10, 0, 4, 1)),
            "subnet base + 1"
        );
    }

    #[test]
    fn eni_errors_are_named() {
        for (bad, needle) in [
            ("not json", "not valid JSON"),
            (r#"{"macAddress":5}"#, "not a MAC"),
            (
                r#"{"ipv4Addresses":["10.0.1.2/24"]}"#,
                "macAddress is required",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","ipv4Addresses":["10.0.2.5/24"],"subnetGatewayIpv4Address":"10.0.1.1"}"#,
                "not in the subnet",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","attachment":"shared"}"#,
                "needs ipv4Addresses",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","mac":"x"}"#,
                "unknown key",
            ),
        ] {
            let e = parse_eni(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("annotation netshim.eni") && e.contains(needle),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ingress_rules() {
        let r = parse_ingress(r#"[{"protocol":"tcp","port":80,"cidr":"10.0.0.0/16"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"}]"#).unwrap();
        assert_eq!(r[0].ports, PortRange::single(80));
        assert_eq!(r[1].protocol, Protocol::Udp);
        for bad in [
            r#"[{"protocol":"icmp","port":1,"cidr":"x"}]"#,
            r#"[{"port":80}]"#,
            r#"[{"port":80,"portRange":"1-2","cidr":"1.0.0.0/8"}]"#,
            "{}",
        ] {
            assert!(
                parse_ingress(bad)
                    .unwrap_err()
                    .to_string()
                    .starts_with("annotation netshim.ingress"),
                "{bad}"
            );
        }
    }

    #[test]
    fn awsvpc_needs_an_eni_and_others_refuse_one() {
        let mut a = HashMap::new();
        a.insert(MODE.to_string(), "awsvpc".to_string());
        assert!(
            from_annotations(&a)
                .unwrap_err()
                .to_string()
                .contains("netshim.eni")
        );
        a.insert(MODE.to_string(), "bridge".to_string());
        a.insert(
            ENI.to_string(),
            r#"{"macAddress":"02:00:00:00:00:01"}"#.to_string(),
        );
        assert!(
            from_annotations(&a)
                .unwrap_err()
                .to_string()
                .contains("only awsvpc")
        );
    }
}
