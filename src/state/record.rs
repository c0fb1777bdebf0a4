//! The ledger's data model: one [`ContainerRecord`] per container netshim set up, with the
//! addresses, host ports, links and ENI it holds — enough to undo everything with no pid and no
//! netns.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{Attachment, MacAddr, NetworkMode, Protocol};

/// One host port held by a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRecord {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// `None`: all host addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Picked by netshim (true) or asked for (false).
    pub dynamic: bool,
    /// UDP, bridge: the conntrack zone its traffic is tracked in (the container's, one for all
    /// its UDP mappings), so that no entry made before the mapping catches its datagrams.
    /// `None`: TCP, other modes, or a record made before zones (its setup flushed instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_zone: Option<u16>,
}

/// Everything netshim did for one container: enough to undo it with no pid and no netns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    pub id: String,
    pub mode: NetworkMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Seconds since the epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Inode of the container's netns at setup: tells a re-run (same netns) from a reused id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// awsvpc: the task's first IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Host end of the veth pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    /// Bridge the veth was attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortRecord>,
    /// awsvpc: the ENI the task holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<EniRecord>,
    /// What load balancers should do with the container's targets.
    #[serde(default, skip_serializing_if = "LbState::is_serving")]
    pub lb: LbState,
}

/// A container's targets: serving, or draining before the container stops (`shim drain`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbState {
    #[default]
    Serving,
    Draining,
}

impl LbState {
    pub fn is_serving(&self) -> bool {
        *self == LbState::Serving
    }
    #[allow(dead_code)] // the load-balancer exports spell it
    pub fn as_str(self) -> &'static str {
        match self {
            LbState::Serving => "serving",
            LbState::Draining => "draining",
        }
    }
}

impl ContainerRecord {
    /// A record with nothing allocated yet.
    pub fn new(id: &str, mode: NetworkMode) -> Self {
        ContainerRecord {
            id: id.to_string(),
            mode,
            service: None,
            created: 0,
            pid: None,
            netns_inode: None,
            ip: None,
            ip6: None,
            veth: None,
            bridge: None,
            ports: Vec::new(),
            eni: None,
            lb: LbState::Serving,
        }
    }

    /// Refuses a record whose fields could make teardown touch something that is not
    /// netshim's: a state file is input too (a forged or damaged one must not make poststop
    /// delete an arbitrary link or file).
    pub fn check(&self, state_dir: &Path) -> Result<(), String> {
        use crate::names::{
            BRIDGE_VETH_PREFIX as VETH_PREFIX, SHARED_VETH_PREFIX as SHARED, is_our_name,
        };
        if !crate::oci::valid_id(&self.id) {
            return Err("the container id is not one a runtime makes".into());
        }
        if let Some(v) = &self.veth
            && !is_our_name(VETH_PREFIX, v)
        {
            return Err(format!("veth {v:?} is not a name netshim gives"));
        }
        if let Some(b) = &self.bridge
            && !crate::config::valid_link_name(b)
        {
            return Err(format!("bridge {b:?} is not an interface name"));
        }
        if let Some(e) = &self.eni {
            if let Some(v) = &e.veth
                && !is_our_name(SHARED, v)
            {
                return Err(format!("veth {v:?} is not a name netshim gives"));
            }
            if !e.name.is_empty() && !crate::config::valid_link_name(&e.name) {
                return Err(format!("interface {:?} is not an interface name", e.name));
            }
            let pin = crate::names::pin_path(state_dir, &self.id);
            if let Some(p) = &e.netns_pin
                && *p != pin
            {
                return Err(format!(
                    "netns pin {} is not where netshim pins this task ({})",
                    p.display(),
                    pin.display()
                ));
            }
        }
        Ok(())
    }
}

/// What an awsvpc setup did with the task's ENI, enough to hand it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniRecord {
    pub mac: MacAddr,
    /// The interface's name on the host before the task took it (branch: the trunk's name).
    pub name: String,
    pub attachment: Attachment,
    /// Exclusive: the bind mount keeping the task's netns alive until poststop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_pin: Option<PathBuf>,
    /// Shared: host end of the task's veth, the policy-routing table and the subnet gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Exclusive: the interface's MTU before the task took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Branch: the trunk's MAC and the VLAN id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

impl Default for EniRecord {
    fn default() -> Self {
        EniRecord {
            mac: MacAddr([0; 6]),
            name: String::new(),
            attachment: Attachment::Exclusive,
            netns_pin: None,
            veth: None,
            table: None,
            subnet: None,
            gateway: None,
            mtu: None,
            trunk: None,
            vlan: None,
        }
    }
}
