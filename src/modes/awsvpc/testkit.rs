//! A test world for awsvpc over the fake kernel: a host with an ENI and a trunk, task network
//! namespaces, the config and the ledger, and setup and teardown run the way the hook runs them
//! (plan, then apply; release from the committed record).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::config::Config;
use crate::kernel::fake::Fake;
use crate::kernel::{At, Link};
use crate::modes::{self, ModeFields, ReleaseErrors, SetupCtx};
use crate::request::{self, NetworkRequest};
use crate::state::{ContainerRecord, State};
use crate::types::{MacAddr, NetworkMode};

/// The ENI's MAC (exclusive and shared tests).
pub const ENI_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
/// The trunk's MAC (branch tests).
pub const TRUNK_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x22]);
/// A branch ENI's own MAC.
pub const BRANCH_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x33]);
/// The ENI's name on the host.
pub const ENI_NAME: &str = "eth1";
/// The trunk's name on the host.
pub const TRUNK_NAME: &str = "eth2";
/// What the ENI looks like before any task takes it: up, MTU 1500, an operator's alias (so a
/// rollback that merely "sets it down and clears the alias" is told from one that restores it).
pub const ENI_MTU: u32 = 1500;
pub const ENI_ALIAS: &str = "spare uplink";

/// The world: the fake kernel, the ledger, the config.
pub struct Kit {
    pub k: Fake,
    pub state: State,
    pub cfg: Config,
}

/// One task's setup as the hook would have run it.
pub struct Task {
    pub id: String,
    pub ns: &'static File,
    pub req: NetworkRequest,
    /// The plan, when planning succeeded.
    pub plan: Option<ModeFields>,
}

impl Task {
    /// The record the hook commits after a successful setup.
    pub fn record(&self) -> ContainerRecord {
        let mut r = ContainerRecord::new(&self.id, NetworkMode::Awsvpc);
        if let Some(f) = &self.plan {
            f.clone().fill(&mut r);
        }
        r
    }
}

/// An awsvpc request with `eni` as its `netshim.eni` JSON.
pub fn request(eni: &str) -> NetworkRequest {
    let mut a = HashMap::new();
    a.insert(request::MODE.to_string(), "awsvpc".to_string());
    a.insert(request::ENI.to_string(), eni.to_string());
    request::from_annotations(&a)
        .expect("valid request")
        .expect("a request")
}

/// An exclusive ENI with IPv4 and IPv6, its own MTU and both gateways: every step of
/// `configure` runs.
pub fn exclusive() -> NetworkRequest {
    request(
        r#"{"macAddress":"02:00:00:00:00:11","ipv4Addresses":["10.0.1.23/24"],"ipv6Addresses":["2600:1f14::23/64"],"subnetGatewayIpv4Address":"10.0.1.1","subnetGatewayIpv6Address":"2600:1f14::1","mtu":9001}"#,
    )
}

/// A shared ENI with two secondary addresses.
pub fn shared() -> NetworkRequest {
    request(
        r#"{"macAddress":"02:00:00:00:00:11","attachment":"shared","ipv4Addresses":["10.0.1.50/24","10.0.1.51/24"],"subnetGatewayIpv4Address":"10.0.1.1","mtu":9001}"#,
    )
}

/// A branch ENI on the trunk, VLAN 42.
pub fn branch() -> NetworkRequest {
    request(
        r#"{"macAddress":"02:00:00:00:00:33","attachment":"branch","trunkMacAddress":"02:00:00:00:00:22","vlanId":42,"ipv4Addresses":["10.0.2.7/24"],"subnetGatewayIpv4Address":"10.0.2.1","mtu":1500}"#,
    )
}

impl Kit {
    /// A host with `lo`, the ENI (up, MTU 1500, an alias) and the trunk (down, MTU 9001).
    pub fn new() -> Kit {
        let mut k = Fake::new();
        k.add_host_link(Link {
            name: ENI_NAME.into(),
            mac: Some(ENI_MAC),
            up: true,
            mtu: Some(ENI_MTU),
            alias: Some(ENI_ALIAS.into()),
            ..Link::default()
        });
        k.add_host_link(Link {
            name: TRUNK_NAME.into(),
            mac: Some(TRUNK_MAC),
            mtu: Some(9001),
            ..Link::default()
        });
        Kit {
            k,
            state: State::default(),
            cfg: Config::default(),
        }
    }

    /// A task with its own new netns, not yet set up.
    pub fn task(&mut self, id: &str, req: NetworkRequest) -> Task {
        Task {
            id: id.into(),
            ns: self.k.new_netns(),
            req,
            plan: None,
        }
    }

    fn ctx<'a>(cfg: &'a Config, t: &'a Task) -> SetupCtx<'a> {
        SetupCtx {
            cfg,
            state_dir: Path::new("/run/netshim-kit"),
            id: &t.id,
            req: &t.req,
            eni: t.req.eni.as_ref(),
            ns: t.ns,
            // The fake pins the namespace whose file has this fd.
            pid: t.ns.as_raw_fd(),
        }
    }

    /// Plans the task (reads the kernel only).
    pub fn plan(&mut self, t: &mut Task) -> anyhow::Result<()> {
        let mut state = std::mem::take(&mut self.state);
        let r = modes::plan(&Kit::ctx(&self.cfg, t), &mut self.k, &mut state);
        self.state = state;
        t.plan = Some(r?);
        Ok(())
    }

    /// Applies a planned task (with its rollback on failure).
    pub fn apply(&mut self, t: &Task) -> anyhow::Result<()> {
        let f = t.plan.clone().expect("planned");
        let state = std::mem::take(&mut self.state);
        let r = modes::apply(&Kit::ctx(&self.cfg, t), &mut self.k, &state, &f);
        self.state = state;
        r
    }

    /// Plans and applies; commits the record on success.
    pub fn setup(&mut self, t: &mut Task) -> anyhow::Result<()> {
        self.plan(t)?;
        self.apply(t)?;
        self.state.insert(t.record());
        Ok(())
    }

    /// Poststop: releases the committed record, then forgets it.
    pub fn teardown(&mut self, id: &str) -> Result<(), ReleaseErrors> {
        let rec = self.state.record(id).expect("committed");
        let r = modes::release(&mut self.k, &self.state, &rec);
        if r.is_ok() {
            self.state.containers.remove(id);
        }
        r
    }

    /// The host link with `mac`.
    pub fn host_link(&self, mac: MacAddr) -> Option<Link> {
        self.k
            .state(At::Host)
            .links
            .into_iter()
            .find(|l| l.mac == Some(mac))
    }

    /// The links of a task's netns, other than `lo`.
    pub fn task_links(&self, t: &Task) -> Vec<Link> {
        self.k
            .state(At::Netns(t.ns))
            .links
            .into_iter()
            .filter(|l| !l.loopback)
            .collect()
    }

    /// Asserts the ENI is on the host exactly as before any task took it.
    pub fn assert_eni_home(&self, what: &str) {
        let l = self
            .host_link(ENI_MAC)
            .unwrap_or_else(|| panic!("{what}: the ENI is not on the host"));
        assert_eq!(l.name, ENI_NAME, "{what}: its name");
        assert!(l.up, "{what}: it was up before");
        assert_eq!(l.mtu, Some(ENI_MTU), "{what}: its MTU");
        assert_eq!(l.alias.as_deref(), Some(ENI_ALIAS), "{what}: its alias");
        let addrs: Vec<_> = self
            .k
            .state(At::Host)
            .addrs
            .into_iter()
            .filter(|a| a.index == l.index)
            .collect();
        assert!(addrs.is_empty(), "{what}: addresses left on it: {addrs:?}");
        assert!(
            self.k.pins.is_empty(),
            "{what}: pins left: {:?}",
            self.k.pins
        );
    }
}
