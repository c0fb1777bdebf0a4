//! The only code that talks to the kernel: netlink, nftables, netns, sysctl, conntrack, socket
//! diagnostics (`sockdiag`, for `shim drain`).
//!
//! The modes reach it through one port, [`Kernel`]: the bridge composites (bridge, bridge port,
//! container side) and the narrow primitives awsvpc needs (links, addresses, routes, rules,
//! neighbours, netns pins, sysctls, the task's firewall), each acting in the host's network
//! namespace or in a container's ([`At`]). [`HostKernel`] is the real one; `fake::Fake` (tests)
//! records calls, keeps a model of each namespace and fails at a named step, so every mode's
//! setup and rollback is unit-tested without root.

pub mod conntrack;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod sockdiag;
pub mod sysctl;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

pub use host::HostKernel;
pub use netlink::NlError;
pub use nft::NftError;

use nft::{Batch, Element, Set, TableRef};

use crate::types::MacAddr;

/// Where an operation acts: the host's network namespace, or the one an open netns file names.
#[derive(Clone, Copy, Debug)]
pub enum At<'a> {
    Host,
    Netns(&'a File),
}

/// What netshim needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `vlan`, `bond`, …); `None` for a physical NIC.
    pub kind: Option<String>,
    /// The bridge, bond or team this link is a port of.
    pub master: Option<u32>,
    /// `IFLA_LINK`: a VLAN's lower device (in the same namespace).
    pub lower: Option<u32>,
    /// A VLAN's id.
    pub vlan_id: Option<u16>,
    pub up: bool,
    pub loopback: bool,
    pub mtu: Option<u32>,
    pub alias: Option<String>,
    /// `IFLA_GROUP` (0 unless set).
    pub group: u32,
}

/// A change to a link's state; `None` fields are left as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkChange<'a> {
    pub up: Option<bool>,
    pub name: Option<&'a str>,
    pub mtu: Option<u32>,
}

/// A route: `dst/prefix` (prefix 0: default) via `via` out of `oif` in `table` (254: main).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub via: Option<IpAddr>,
    pub oif: u32,
    pub table: u32,
}

/// An address assigned to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// What the modes need from the kernel, small enough to fake in unit tests.
pub trait Kernel {
    // ---- bridge mode ----------------------------------------------------------------------
    /// The link `name` in the host netns, `None` if absent.
    fn link(&mut self, name: &str) -> Result<Option<Link>, NlError>;
    /// Creates bridge `name` (up, fixed MAC) with `gateway/prefix` on it.
    fn create_bridge(
        &mut self,
        name: &str,
        mac: MacAddr,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, NlError>;
    /// Makes an existing bridge usable: up, with `gateway/prefix` (what a crash during its
    /// creation, or a hand, may have left out). Returns what it had to repair.
    fn repair_bridge(
        &mut self,
        index: u32,
        up: bool,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<Vec<String>, NlError>;
    /// Host sysctls the bridge needs (forwarding; route_localnet on the bridge). Returns those
    /// it changed, with their old values; on error it has changed nothing.
    fn bridge_sysctls(&mut self, bridge: &str) -> io::Result<Vec<sysctl::Changed>>;
    /// Puts a sysctl back as [`Kernel::bridge_sysctls`] or [`Kernel::enable_forwarding`] found it.
    fn restore_sysctl(&mut self, c: &sysctl::Changed) -> io::Result<()>;
    /// Ports the host keeps out of its ephemeral range (`ip_local_reserved_ports`).
    fn reserved_ports(&mut self) -> io::Result<Vec<u16>>;
    /// Adds and removes ports of `ip_local_reserved_ports`, keeping the rest.
    fn change_reserved_ports(&mut self, add: &[u16], remove: &[u16]) -> io::Result<()>;
    /// veth pair: `host` on `master` here (up, hairpin on, no IPv6), `peer` inside `netns`.
    fn add_veth(
        &mut self,
        host: &str,
        master: u32,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError>;
    /// Inside `netns`: `lo` up, `ip/prefix` on `ifname`, default route via `gateway`.
    fn configure_container(
        &mut self,
        netns: &File,
        ifname: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), NlError>;
    /// Inside `netns`: `lo` up (none mode).
    fn loopback_up(&mut self, netns: &File) -> Result<(), NlError>;
    /// Deletes a host link; `Ok(false)` if it was gone.
    fn del_link(&mut self, name: &str) -> Result<bool, NlError>;
    /// Deletes many host links (absent ones are fine); returns those that failed, with why.
    /// The host kernel does it in one request, so the RCU grace periods a deletion waits for
    /// are paid once for all of them.
    fn del_links(&mut self, names: &[String]) -> Vec<(String, NlError)> {
        names
            .iter()
            .filter_map(|n| self.del_link(n).err().map(|e| (n.clone(), e)))
            .collect()
    }
    /// One nftables transaction in the host netns: all of `batch` applies, or none of it.
    fn nft(&mut self, batch: &Batch) -> Result<(), NftError>;
    /// Whether [`nft::Op::RetireElements`] takes effect here (Linux 6.12 and later).
    fn nft_retires_elements(&self) -> bool;
    /// Rules per chain of a host table (one dump); `None` when the table does not exist.
    fn nft_rule_counts(
        &mut self,
        table: &TableRef,
    ) -> Result<Option<BTreeMap<String, usize>>, NftError>;
    /// Every element of `set` in a host table (one dump).
    fn nft_elements(&mut self, table: &TableRef, set: &Set) -> Result<Vec<Element>, NftError>;
    /// Drops stale UDP conntrack entries (all of a setup's ports, or a container's) at once.
    fn flush_udp(&mut self, stale: conntrack::Stale<'_>) -> io::Result<()>;

    // ---- primitives (awsvpc, checks, gc) ---------------------------------------------------
    /// Every link in a namespace.
    fn links(&mut self, at: At) -> Result<Vec<Link>, NlError>;
    /// Interfaces of the host that carry a default route, with the route's table (IPv4 or
    /// IPv6, any table, every next hop of a multipath route).
    fn default_route_links(&mut self) -> Result<Vec<(u32, u32)>, NlError>;
    /// Every address in a namespace.
    fn addresses(&mut self, at: At) -> Result<Vec<Addr>, NlError>;
    fn set_link(&mut self, at: At, index: u32, change: LinkChange) -> Result<(), NlError>;
    /// Sets (or with "" clears) a host link's alias.
    fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NlError>;
    /// Moves link `index` from `from` into `to`, renamed `name` (it arrives down, without
    /// addresses).
    fn move_link(&mut self, from: At, index: u32, to: At, name: &str) -> Result<(), NlError>;
    fn add_addr(&mut self, at: At, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NlError>;
    /// Adds a route; EEXIST is passed up.
    fn add_route(&mut self, at: At, r: &Route) -> Result<(), NlError>;
    /// Deletes a route; `Ok(false)` if it was not there.
    fn del_route(&mut self, at: At, r: &Route) -> Result<bool, NlError>;
    /// Host: `from <ip>/32 lookup <table> priority <priority>`.
    fn add_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<(), NlError>;
    fn del_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<bool, NlError>;
    /// A permanent neighbour entry.
    fn add_neigh(&mut self, at: At, index: u32, ip: Ipv4Addr, mac: MacAddr) -> Result<(), NlError>;
    /// A plain veth pair: `host` here (with `mac` if given, down), `peer` inside `netns`.
    fn add_pair(
        &mut self,
        host: &str,
        mac: Option<MacAddr>,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError>;
    /// A VLAN `vlan` of host link `trunk`, with `mac`, created directly inside `netns` as
    /// `name` (down).
    fn add_vlan(
        &mut self,
        trunk: u32,
        vlan: u16,
        mac: MacAddr,
        name: &str,
        netns: &File,
    ) -> Result<(), NlError>;
    /// Deletes link `index` in a namespace; `Ok(false)` if it was gone.
    fn del_link_at(&mut self, at: At, index: u32) -> Result<bool, NlError>;
    /// `net.ipv4.conf.<dev>.<key>` in the host netns: returns the value it had.
    fn set_conf(&mut self, dev: &str, key: &str, value: &str) -> io::Result<String>;
    /// `net.ipv4.ip_forward = 1` in the host netns; what it changed, if anything.
    fn enable_forwarding(&mut self) -> io::Result<Option<sysctl::Changed>>;
    /// Keeps the netns of `pid` alive at `path` (a bind mount).
    fn pin_netns(&mut self, pid: i32, path: &Path) -> io::Result<()>;
    /// Opens a pin made by [`Kernel::pin_netns`]; `None` when it is gone or no longer a
    /// namespace (lost bind mount).
    fn open_pin(&mut self, path: &Path) -> io::Result<Option<File>>;
    /// Releases a pin; a missing one is fine.
    fn unpin_netns(&mut self, path: &Path) -> io::Result<()>;
    /// One nftables transaction inside `netns` (the task's own firewall).
    fn nft_in(&mut self, netns: &File, batch: &Batch) -> Result<(), NftError>;
}
