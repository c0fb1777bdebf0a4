//! One module per verb; `main.rs` only parses arguments and dispatches here. Commands never
//! import each other: what two of them share lives in the library modules.

pub mod drain;
pub mod gc;
pub mod hook;
pub mod ports;
pub mod registrar;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::kernel::netlink::Netlink;
use crate::lb;
use crate::state::StateDir;

/// Where the config is read from when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/netshim/config.toml";

/// Options every command shares (flags or environment).
#[derive(Debug, Clone)]
pub struct Globals {
    pub state_dir: PathBuf,
    /// `None`: the default path, which may be absent.
    pub config: Option<PathBuf>,
}

impl Globals {
    /// The state directory (its ownership and permissions are checked when it is used).
    pub fn state(&self) -> anyhow::Result<StateDir> {
        Ok(StateDir::new(&self.state_dir))
    }
    pub fn load_config(&self) -> anyhow::Result<Config> {
        Ok(match &self.config {
            Some(p) => Config::load(p, true)?,
            None => Config::load(Path::new(DEFAULT_CONFIG), false)?,
        })
    }

    /// The address load balancers target for host ports.
    pub fn host_address(&self) -> anyhow::Result<Ipv4Addr> {
        let cfg = self.load_config()?;
        if let Some(a) = cfg.host_address {
            return Ok(a);
        }
        let found = Netlink::open().ok().and_then(|mut nl| {
            nl.default_route_source(&|ip| !cfg.subnet.contains(ip))
                .ok()
                .flatten()
        });
        Ok(found.unwrap_or(Ipv4Addr::LOCALHOST))
    }

    /// The instance id exports name bridge and host targets by: `[lb] instance_id`, else instance
    /// metadata, else the host name.
    pub fn instance_id(&self) -> anyhow::Result<String> {
        let cfg = self.load_config()?;
        if let Some(id) = cfg.lb.instance_id {
            return Ok(id);
        }
        if let Some(id) = crate::metadata::quick_value(&cfg.awsvpc, "instance-id")
            && lb::safe_name(&id)
        {
            return Ok(id);
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(host.trim().to_string())
    }
}

/// An error that ends the process with its own exit code (drain's timeout exits 3).
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub msg: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Exit {}
