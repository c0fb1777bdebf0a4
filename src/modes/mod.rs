//! The network modes. Each turns a request into kernel changes through [`Kernel`] and knows how
//! to undo them from its [`ContainerRecord`] alone.

pub mod awsvpc;
pub mod bridge;
pub mod host;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;

use crate::kernel::netlink::{Netlink, NlError};
use crate::kernel::nft::{Batch, Element, Nft, NftError, Set, TableRef};
use crate::kernel::{conntrack, sysctl};

/// What the modes need from the kernel, small enough to fake in unit tests.
pub trait Kernel {
    /// Index of the link `name` in the host netns, `None` if absent.
    fn link_index(&mut self, name: &str) -> Result<Option<u32>, NlError>;
    /// Creates bridge `name` (up, fixed MAC) with `gateway/prefix` on it.
    fn create_bridge(
        &mut self,
        name: &str,
        mac: [u8; 6],
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, NlError>;
    /// Host sysctls the bridge needs (forwarding; route_localnet on the bridge).
    fn bridge_sysctls(&mut self, bridge: &str) -> io::Result<()>;
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
    /// One nftables transaction: all of `batch` applies, or none of it.
    fn nft(&mut self, batch: &Batch) -> Result<(), NftError>;
    /// Rules per chain of `table` (one dump); `None` when the table does not exist.
    fn nft_rule_counts(
        &mut self,
        table: &TableRef,
    ) -> Result<Option<BTreeMap<String, usize>>, NftError>;
    /// Every element of `set` in `table` (one dump).
    fn nft_elements(&mut self, table: &TableRef, set: &Set) -> Result<Vec<Element>, NftError>;
    /// Drops UDP conntrack entries for a host port.
    fn flush_udp(&mut self, port: u16) -> io::Result<()>;
}

/// The real kernel, in the current (host) network namespace.
pub struct HostKernel {
    nl: Option<Netlink>,
    nft: Option<Nft>,
}

impl HostKernel {
    pub fn new() -> Self {
        HostKernel {
            nl: None,
            nft: None,
        }
    }

    fn nl(&mut self) -> Result<&mut Netlink, NlError> {
        if self.nl.is_none() {
            self.nl = Some(Netlink::open()?);
        }
        // Set just above.
        self.nl
            .as_mut()
            .ok_or_else(|| NlError::Decode("netlink socket".into()))
    }
}

impl HostKernel {
    fn nft_socket(&mut self) -> Result<&mut Nft, NftError> {
        if self.nft.is_none() {
            self.nft = Some(Nft::open()?);
        }
        // Set just above.
        self.nft
            .as_mut()
            .ok_or_else(|| NftError::os(libc::EBADF, "nftables socket"))
    }
}

impl Default for HostKernel {
    fn default() -> Self {
        Self::new()
    }
}

impl Kernel for HostKernel {
    fn link_index(&mut self, name: &str) -> Result<Option<u32>, NlError> {
        self.nl()?.index_of(name)
    }

    fn create_bridge(
        &mut self,
        name: &str,
        mac: [u8; 6],
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, NlError> {
        let nl = self.nl()?;
        nl.add_bridge(name, mac)?;
        let idx = nl
            .index_of(name)?
            .ok_or_else(|| NlError::Io(io::Error::from_raw_os_error(libc::ENODEV)))?;
        match nl.add_addr4(idx, gateway, prefix) {
            Err(e) if !e.is(libc::EEXIST) => return Err(e),
            _ => {}
        }
        Ok(idx)
    }

    fn bridge_sysctls(&mut self, bridge: &str) -> io::Result<()> {
        sysctl::enable_ip_forward()?;
        sysctl::enable_route_localnet(bridge)
    }

    fn add_veth(
        &mut self,
        host: &str,
        master: u32,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        use std::os::fd::AsFd;
        let nl = self.nl()?;
        nl.add_veth(host, Some(master), None, peer, netns.as_fd())?;
        if let Err(e) = nl.ready_bridge_port(host) {
            let _ = nl.del_link(host);
            return Err(e);
        }
        Ok(())
    }

    fn configure_container(
        &mut self,
        netns: &File,
        ifname: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), NlError> {
        use std::os::fd::AsFd;
        let mut nl = Netlink::open_in(netns.as_fd())?;
        nl.set_up("lo")?;
        let idx = nl
            .index_of(ifname)?
            .ok_or_else(|| NlError::Io(io::Error::from_raw_os_error(libc::ENODEV)))?;
        nl.set_up(ifname)?;
        nl.add_addr4(idx, ip, prefix)?;
        nl.add_route4(Ipv4Addr::UNSPECIFIED, 0, Some(gateway), idx)
    }

    fn loopback_up(&mut self, netns: &File) -> Result<(), NlError> {
        use std::os::fd::AsFd;
        Netlink::open_in(netns.as_fd())?.set_up("lo")
    }

    fn del_link(&mut self, name: &str) -> Result<bool, NlError> {
        self.nl()?.del_link(name)
    }

    fn nft(&mut self, batch: &Batch) -> Result<(), NftError> {
        self.nft_socket()?.apply(batch)
    }

    fn nft_rule_counts(
        &mut self,
        table: &TableRef,
    ) -> Result<Option<BTreeMap<String, usize>>, NftError> {
        self.nft_socket()?.rule_counts(table)
    }

    fn nft_elements(&mut self, table: &TableRef, set: &Set) -> Result<Vec<Element>, NftError> {
        self.nft_socket()?.elements(table, set)
    }

    fn flush_udp(&mut self, port: u16) -> io::Result<()> {
        conntrack::flush_udp_dport(port)
    }
}
