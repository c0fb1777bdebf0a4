//! `/etc/netshim/config.toml`: every key optional, the file itself optional, unknown keys refused.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::request::PortRange;

/// Defaults as in ECS: the kernel's ephemeral range is read at run time, this is the fallback.
pub const FALLBACK_DYNAMIC_RANGE: PortRange = PortRange {
    start: 49153,
    end: 65535,
};
/// Ports ECS never hands out or maps.
pub const DEFAULT_RESERVED: [u16; 5] = [22, 2375, 2376, 51678, 51679];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    bridge: RawBridge,
    #[serde(default)]
    ports: RawPorts,
    #[serde(default)]
    awsvpc: RawAwsvpc,
    #[serde(default)]
    lb: RawLb,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLb {
    instance_id: Option<String>,
    lease_seconds: Option<u64>,
}

/// `[lb]` settings: what the load-balancer exports and the registrar need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    /// `Id` / `ServerId` of bridge and host targets (default: instance metadata, else the host name).
    pub instance_id: Option<String>,
    /// TTL of this host's targets in a cluster store.
    pub lease_seconds: u64,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            instance_id: None,
            lease_seconds: 10,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAwsvpc {
    allowed_interfaces: Option<Vec<String>>,
    metadata_endpoint: Option<String>,
    metadata_layout: Option<String>,
    allow_metadata_access: Option<bool>,
    eni_wait_seconds: Option<f64>,
}

/// Which instance-metadata layout to read ENI facts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataLayout {
    Aws,
    Alibaba,
}

/// `[awsvpc]` settings.
#[derive(Debug, Clone)]
pub struct AwsvpcConfig {
    /// Empty: any interface but the default-route one and those given to tasks.
    pub allowed_interfaces: Vec<String>,
    /// `host:port` of the metadata service (http only).
    pub metadata_endpoint: String,
    pub metadata_layout: MetadataLayout,
    pub allow_metadata_access: bool,
    /// How long setup waits for the ENI to appear.
    pub eni_wait: std::time::Duration,
}

impl Default for AwsvpcConfig {
    fn default() -> Self {
        AwsvpcConfig {
            allowed_interfaces: vec![],
            metadata_endpoint: "169.254.169.254:80".into(),
            metadata_layout: MetadataLayout::Aws,
            allow_metadata_access: false,
            eni_wait: std::time::Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBridge {
    name: Option<String>,
    subnet: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    dynamic_range: Option<String>,
    reserved: Option<Vec<u16>>,
    host_address: Option<String>,
}

/// Typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub bridge_name: String,
    pub subnet: Ipv4Network,
    /// `None`: read `net.ipv4.ip_local_port_range` when needed.
    pub dynamic_range: Option<PortRange>,
    pub reserved: Vec<u16>,
    /// The address load balancers should target for host ports (default: the host's
    /// default-route source address).
    pub host_address: Option<Ipv4Addr>,
    pub awsvpc: AwsvpcConfig,
    pub lb: LbConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bridge_name: "netshim0".into(),
            subnet: Ipv4Network::new(Ipv4Addr::new(10, 213, 0, 0), 16)
                .expect("valid default subnet"),
            dynamic_range: None,
            reserved: DEFAULT_RESERVED.to_vec(),
            host_address: None,
            awsvpc: AwsvpcConfig::default(),
            lb: LbConfig::default(),
        }
    }
}

impl Config {
    /// Loads the file if it exists; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|msg| ConfigError::Invalid {
                path: path.display().to_string(),
                msg,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| e.message().to_string() + &location(text, &e))?;
        let mut c = Config::default();
        if let Some(n) = raw.bridge.name {
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', '\0']) {
                return Err(format!(
                    "bridge.name {n:?} is not a valid interface name (1-15 chars, no '/' or spaces)"
                ));
            }
            c.bridge_name = n;
        }
        if let Some(s) = raw.bridge.subnet {
            let net: Ipv4Network = s.parse().map_err(|_| {
                format!("bridge.subnet {s:?} is not an IPv4 CIDR like \"10.213.0.0/16\"")
            })?;
            if net.prefix() > 30 {
                return Err(format!(
                    "bridge.subnet {s:?} is too small: use a /30 or larger"
                ));
            }
            if net.network() != net.ip() {
                return Err(format!(
                    "bridge.subnet {s:?} has host bits set: use {}/{}",
                    net.network(),
                    net.prefix()
                ));
            }
            c.subnet = net;
        }
        if let Some(r) = raw.ports.dynamic_range {
            c.dynamic_range =
                Some(PortRange::parse(&r).map_err(|e| format!("ports.dynamic_range: {e}"))?);
        }
        if let Some(r) = raw.ports.reserved {
            c.reserved = r;
        }
        if let Some(a) = raw.ports.host_address {
            c.host_address = Some(
                a.parse()
                    .map_err(|_| format!("ports.host_address {a:?} is not an IPv4 address"))?,
            );
        }
        let a = raw.awsvpc;
        if let Some(v) = a.allowed_interfaces {
            c.awsvpc.allowed_interfaces = v;
        }
        let layout = match a.metadata_layout.as_deref() {
            None | Some("aws") => MetadataLayout::Aws,
            Some("alibaba") => MetadataLayout::Alibaba,
            Some(o) => {
                return Err(format!(
                    "awsvpc.metadata_layout {o:?}: use \"aws\" or \"alibaba\""
                ));
            }
        };
        c.awsvpc.metadata_layout = layout;
        if layout == MetadataLayout::Alibaba {
            c.awsvpc.metadata_endpoint = "100.100.100.200:80".into();
        }
        if let Some(e) = a.metadata_endpoint {
            let hp = e
                .strip_prefix("http://")
                .ok_or_else(|| format!("awsvpc.metadata_endpoint {e:?}: use http://HOST[:PORT]"))?;
            let hp = hp.trim_end_matches('/');
            c.awsvpc.metadata_endpoint = if hp.contains(':') {
                hp.to_string()
            } else {
                format!("{hp}:80")
            };
        }
        if let Some(b) = a.allow_metadata_access {
            c.awsvpc.allow_metadata_access = b;
        }
        if let Some(w) = a.eni_wait_seconds {
            if !(0.0..=600.0).contains(&w) {
                return Err(format!("awsvpc.eni_wait_seconds {w}: use 0-600"));
            }
            c.awsvpc.eni_wait = std::time::Duration::from_secs_f64(w);
        }
        if let Some(id) = raw.lb.instance_id {
            // It goes into JSON exports only, but a stray newline or quote is a typo, not an id.
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "lb.instance_id {id:?}: use the instance id, e.g. \"i-0abc123\" (1-128 printable characters)"
                ));
            }
            c.lb.instance_id = Some(id);
        }
        if let Some(l) = raw.lb.lease_seconds {
            if !(1..=3600).contains(&l) {
                return Err(format!("lb.lease_seconds {l}: use 1-3600"));
            }
            c.lb.lease_seconds = l;
        }
        Ok(c)
    }

    /// The gateway: the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.bridge_name, "netshim0");
        assert_eq!(c.subnet.to_string(), "10.213.0.0/16");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(c.reserved, DEFAULT_RESERVED);
        assert_eq!(c.dynamic_range, None);
    }

    #[test]
    fn keys_are_read() {
        let c = Config::parse(
            "[bridge]\nname = \"br9\"\nsubnet = \"10.9.0.0/24\"\n[ports]\ndynamic_range = \"40000-40010\"\nreserved = [40001]\n",
        )
        .unwrap();
        assert_eq!(c.bridge_name, "br9");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(
            c.dynamic_range,
            Some(PortRange {
                start: 40000,
                end: 40010
            })
        );
        assert_eq!(c.reserved, vec![40001]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[ports]\ndynamic_rnage = \"1-2\"\n").unwrap_err();
        assert!(e.contains("dynamic_rnage"), "{e}");
        let e = Config::parse("[brige]\nname = \"x\"\n").unwrap_err();
        assert!(e.contains("brige"), "{e}");
    }

    #[test]
    fn awsvpc_keys() {
        let c = Config::parse("[awsvpc]\nmetadata_endpoint = \"http://127.0.0.1:8111\"\nmetadata_layout = \"alibaba\"\neni_wait_seconds = 1\nallowed_interfaces = [\"eth*\"]\n").unwrap();
        assert_eq!(c.awsvpc.metadata_endpoint, "127.0.0.1:8111");
        assert_eq!(c.awsvpc.metadata_layout, MetadataLayout::Alibaba);
        assert_eq!(c.awsvpc.eni_wait, std::time::Duration::from_secs(1));
        assert!(
            Config::parse("[awsvpc]\nallow_metdata_access = true\n")
                .unwrap_err()
                .contains("allow_metdata_access")
        );
    }

    #[test]
    fn lb_keys() {
        let c = Config::parse("[lb]\ninstance_id = \"i-0abc\"\nlease_seconds = 5\n").unwrap();
        assert_eq!(c.lb.instance_id.as_deref(), Some("i-0abc"));
        assert_eq!(c.lb.lease_seconds, 5);
        assert_eq!(Config::parse("").unwrap().lb, LbConfig::default());
        assert!(Config::parse("[lb]\ninstance_id = \"a b\"\n").is_err());
        assert!(
            Config::parse("[lb]\ninstanceid = \"x\"\n")
                .unwrap_err()
                .contains("instanceid")
        );
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(
            Config::parse("[bridge]\nsubnet = \"10.0.0.1/16\"\n")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(
            Config::parse("[ports]\ndynamic_range = \"90-80\"\n")
                .unwrap_err()
                .contains("reversed")
        );
        assert!(Config::parse("[bridge]\nname = \"averyveryverylongname\"\n").is_err());
    }
}
