//! `/etc/netshim/config.toml`: every key optional, the file itself optional (unless named
//! explicitly), unknown keys refused, every value checked when the file is read.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::request::is_safe_name;
use crate::types::PortRange;

/// Defaults as in ECS: the kernel's ephemeral range is read at run time, this is the fallback.
pub const FALLBACK_DYNAMIC_RANGE: PortRange = PortRange {
    start: 49153,
    end: 65535,
};
/// Ports ECS never hands out or maps.
pub const DEFAULT_RESERVED: [u16; 5] = [22, 2375, 2376, 51678, 51679];
/// The default bridge, whose firewall table keeps the historical name `netshim`.
pub const DEFAULT_BRIDGE: &str = "netshim0";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("config {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error(
        "config {path} does not exist: create it, or drop --config / NETSHIM_CONFIG to use the defaults"
    )]
    Missing { path: String },
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
    #[serde(default)]
    hook: RawHook,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAwsvpc {
    allowed_interfaces: Option<Vec<String>>,
    interface_kinds: Option<Vec<String>>,
    metadata_endpoint: Option<String>,
    metadata_layout: Option<String>,
    allow_metadata_access: Option<bool>,
    eni_wait_seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLb {
    instance_id: Option<String>,
    lease_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    lock_timeout_seconds: Option<f64>,
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
    /// Empty: any eligible interface; non-empty: only these names/globs.
    pub allowed_interfaces: Vec<String>,
    /// Link kinds besides physical NICs that may be given as ENIs (a test rig's `veth`).
    pub interface_kinds: Vec<String>,
    /// `host:port` of the metadata service (http only).
    pub metadata_endpoint: String,
    pub metadata_layout: MetadataLayout,
    pub allow_metadata_access: bool,
    /// How long setup waits for the ENI to appear.
    pub eni_wait: Duration,
}

impl Default for AwsvpcConfig {
    fn default() -> Self {
        AwsvpcConfig {
            allowed_interfaces: vec![],
            interface_kinds: vec![],
            metadata_endpoint: "169.254.169.254:80".into(),
            metadata_layout: MetadataLayout::Aws,
            allow_metadata_access: false,
            eni_wait: Duration::from_secs(10),
        }
    }
}

/// `[lb]` settings: what load-balancer exports and the cluster view use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    /// The `Id` of bridge/host targets in exports (default: instance metadata, else host name).
    pub instance_id: Option<String>,
    /// TTL of this host's etcd lease.
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
    reuse_delay_seconds: Option<u64>,
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
    /// A released host port is not handed out again for this long (unless the range is
    /// otherwise exhausted).
    pub reuse_delay: Duration,
    pub awsvpc: AwsvpcConfig,
    pub lb: LbConfig,
    /// How long a hook waits for the netshim lock before giving up.
    pub lock_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bridge_name: DEFAULT_BRIDGE.into(),
            subnet: Ipv4Network::new(Ipv4Addr::new(10, 213, 0, 0), 16)
                .expect("valid default subnet"),
            dynamic_range: None,
            reserved: DEFAULT_RESERVED.to_vec(),
            host_address: None,
            reuse_delay: Duration::from_secs(60),
            awsvpc: AwsvpcConfig::default(),
            lb: LbConfig::default(),
            lock_timeout: Duration::from_secs(8),
        }
    }
}

/// The form each key takes, shown when a value has the wrong type.
const FORMS: [(&str, &str); 15] = [
    ("name", "name = \"netshim0\""),
    ("subnet", "subnet = \"10.213.0.0/16\""),
    ("dynamic_range", "dynamic_range = \"49153-65535\""),
    ("reserved", "reserved = [22, 2375]"),
    ("host_address", "host_address = \"192.0.2.2\""),
    ("reuse_delay_seconds", "reuse_delay_seconds = 60"),
    (
        "allowed_interfaces",
        "allowed_interfaces = [\"eth1\", \"ens*\"]",
    ),
    ("interface_kinds", "interface_kinds = [\"veth\"]"),
    (
        "metadata_endpoint",
        "metadata_endpoint = \"http://169.254.169.254\"",
    ),
    ("metadata_layout", "metadata_layout = \"aws\""),
    ("allow_metadata_access", "allow_metadata_access = false"),
    ("eni_wait_seconds", "eni_wait_seconds = 10"),
    ("instance_id", "instance_id = \"i-0abc\""),
    ("lease_seconds", "lease_seconds = 10"),
    ("lock_timeout_seconds", "lock_timeout_seconds = 8"),
];

/// Whether `n` is a link name netshim may create: `[A-Za-z0-9_.-]`, 1-15 bytes, not `.`/`..`.
pub fn valid_link_name(n: &str) -> bool {
    is_safe_name(n, 15) && n != "." && n != ".."
}

fn check_subnet(s: &str) -> Result<Ipv4Network, String> {
    let net: Ipv4Network = s
        .parse()
        .map_err(|_| format!("bridge.subnet {s:?} is not an IPv4 CIDR like \"10.213.0.0/16\""))?;
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
    let ip = net.network();
    let special = ip.is_loopback()
        || ip.is_multicast()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.octets()[0] >= 240
        || net.prefix() < 8;
    if special {
        return Err(format!(
            "bridge.subnet {s:?} is not a private unicast range: use one like \"10.213.0.0/16\" (a /8 or smaller, not 0/8, 127/8, 169.254/16, multicast or reserved)"
        ));
    }
    Ok(net)
}

impl Config {
    /// Loads the file. A missing file means all defaults unless the path was given explicitly.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|msg| ConfigError::Invalid {
                path: path.display().to_string(),
                msg,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ConfigError::Missing {
                path: path.display().to_string(),
            }),
            Err(cause) => Err(ConfigError::Read {
                path: path.display().to_string(),
                cause,
            }),
        }
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| e.message().to_string() + &location(text, &e))?;
        let mut c = Config::default();
        if let Some(n) = raw.bridge.name {
            if !valid_link_name(&n) {
                return Err(format!(
                    "bridge.name {n:?} is not a valid interface name: use 1-15 letters, digits, '_', '.' or '-'"
                ));
            }
            c.bridge_name = n;
        }
        if let Some(s) = raw.bridge.subnet {
            c.subnet = check_subnet(&s)?;
        }
        parse_ports(raw.ports, &mut c)?;
        parse_awsvpc(raw.awsvpc, &mut c)?;
        if let Some(id) = raw.lb.instance_id {
            if !is_safe_name(&id, 64) {
                return Err(format!(
                    "lb.instance_id {id:?}: use 1-64 letters, digits, '_', '.' or '-'"
                ));
            }
            c.lb.instance_id = Some(id);
        }
        if let Some(t) = raw.lb.lease_seconds {
            if !(2..=3600).contains(&t) {
                return Err(format!("lb.lease_seconds {t}: use 2-3600"));
            }
            c.lb.lease_seconds = t;
        }
        if let Some(t) = raw.hook.lock_timeout_seconds {
            if !(0.1..=600.0).contains(&t) {
                return Err(format!("hook.lock_timeout_seconds {t}: use 0.1-600"));
            }
            c.lock_timeout = Duration::from_secs_f64(t);
        }
        Ok(c)
    }

    /// The gateway: the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    #[allow(dead_code)] // the firewall layout takes it next
    /// The nftables table this instance owns: `netshim` for the default bridge, else derived
    /// from the bridge name, so two instances in one network namespace never share a table.
    pub fn table(&self) -> String {
        if self.bridge_name == DEFAULT_BRIDGE {
            "netshim".into()
        } else {
            format!("netshim_{}", self.bridge_name.replace(['.', '-'], "_"))
        }
    }
}

fn parse_ports(p: RawPorts, c: &mut Config) -> Result<(), String> {
    if let Some(r) = p.dynamic_range {
        c.dynamic_range =
            Some(PortRange::parse(&r).map_err(|e| format!("ports.dynamic_range: {e}"))?);
    }
    if let Some(r) = p.reserved {
        c.reserved = r;
    }
    if let Some(a) = p.host_address {
        c.host_address = Some(
            a.parse()
                .map_err(|_| format!("ports.host_address {a:?} is not an IPv4 address"))?,
        );
    }
    if let Some(d) = p.reuse_delay_seconds {
        if d > 86_400 {
            return Err(format!("ports.reuse_delay_seconds {d}: use 0-86400"));
        }
        c.reuse_delay = Duration::from_secs(d);
    }
    Ok(())
}

fn parse_awsvpc(a: RawAwsvpc, c: &mut Config) -> Result<(), String> {
    if let Some(v) = a.allowed_interfaces {
        c.awsvpc.allowed_interfaces = v;
    }
    if let Some(v) = a.interface_kinds {
        if let Some(bad) = v
            .iter()
            .find(|k| matches!(k.as_str(), "bridge" | "bond" | "team" | "vlan" | "loopback"))
        {
            return Err(format!(
                "awsvpc.interface_kinds: {bad:?} interfaces are never given to tasks"
            ));
        }
        c.awsvpc.interface_kinds = v;
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
        if hp.is_empty() || hp.contains(['/', '@', ' ', '?', '#']) {
            return Err(format!(
                "awsvpc.metadata_endpoint {e:?}: use http://HOST[:PORT]"
            ));
        }
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
        c.awsvpc.eni_wait = Duration::from_secs_f64(w);
    }
    Ok(())
}

fn location(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[..start].rsplit('\n').next().unwrap_or("").to_string()
        + text[start..].split('\n').next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let form = FORMS
        .iter()
        .find(|(k, _)| *k == key)
        .filter(|_| e.message().contains("invalid type"))
        .map(|(_, f)| format!(": write it as `{f}`"))
        .unwrap_or_default();
    format!(" (line {line_no}){form}")
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
        assert_eq!(
            Config::parse("[bridge]\nname = \"averyveryverylongname\"\n").unwrap_err(),
            "bridge.name \"averyveryverylongname\" is not a valid interface name: use 1-15 letters, digits, '_', '.' or '-'"
        );
    }

    #[test]
    fn bridge_names_that_could_reach_nft_text_or_paths_are_refused() {
        for bad in ["bx0\"#", "a b", "..", "x/y", "br;0", ""] {
            let e = Config::parse(&format!("[bridge]\nname = {bad:?}\n")).unwrap_err();
            assert!(e.contains("is not a valid interface name"), "{bad}: {e}");
        }
    }

    #[test]
    fn subnets_that_are_not_private_ranges_are_refused() {
        for bad in [
            "0.0.0.0/0",
            "127.0.0.0/8",
            "224.0.0.0/24",
            "169.254.0.0/16",
            "10.0.0.0/7",
        ] {
            let e = Config::parse(&format!("[bridge]\nsubnet = {bad:?}\n")).unwrap_err();
            assert!(e.contains("not a private unicast range"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_shows_the_expected_form() {
        let e = Config::parse("[ports]\nreserved = 22\n").unwrap_err();
        assert!(
            e.contains("(line 2): write it as `reserved = [22, 2375]`"),
            "{e}"
        );
        let e = Config::parse("[awsvpc]\neni_wait_seconds = \"5\"\n").unwrap_err();
        assert!(e.contains("eni_wait_seconds = 10"), "{e}");
    }

    #[test]
    fn an_explicit_config_path_must_exist_the_default_may_not() {
        let p = Path::new("/nonexistent/netshim.toml");
        assert!(Config::load(p, false).is_ok());
        let e = Config::load(p, true).unwrap_err().to_string();
        assert_eq!(
            e,
            "config /nonexistent/netshim.toml does not exist: create it, or drop --config / NETSHIM_CONFIG to use the defaults"
        );
    }

    #[test]
    fn each_bridge_gets_its_own_table() {
        assert_eq!(Config::default().table(), "netshim");
        let c = Config::parse("[bridge]\nname = \"br-7.a\"\n").unwrap();
        assert_eq!(c.table(), "netshim_br_7_a");
    }
}
