//! The network modes. Each turns a request into kernel changes through [`Kernel`] and knows how
//! to undo them from its [`ContainerRecord`] alone.

pub mod awsvpc;
pub mod bridge;
pub mod host;

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;

use crate::kernel::netlink::{Netlink, NlError};
use crate::kernel::nft::{Nft, NftError};
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
    /// One nftables transaction.
    fn nft(&mut self, script: &str) -> Result<(), NftError>;
    /// Drops stale UDP conntrack entries (all of a setup's ports, or a container's) at once.
    fn flush_udp(&mut self, stale: conntrack::Stale<'_>) -> io::Result<()>;
}

/// The real kernel, in the current (host) network namespace.
pub struct HostKernel {
    nl: Option<Netlink>,
    nft: Option<Nft>,
    ct: conntrack::Conntrack,
}

impl HostKernel {
    pub fn new() -> Self {
        HostKernel {
            nl: None,
            nft: None,
            ct: conntrack::Conntrack::default(),
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

    fn nft(&mut self, script: &str) -> Result<(), NftError> {
        if self.nft.is_none() {
            self.nft = Some(Nft::new().map_err(|e| NftError { msg: e.to_string() })?);
        }
        match self.nft.as_mut() {
            Some(n) => n.run(script).map(|_| ()),
            None => Err(NftError {
                msg: "no nftables context".into(),
            }),
        }
    }

    fn flush_udp(&mut self, stale: conntrack::Stale<'_>) -> io::Result<()> {
        self.ct.flush(stale).map(|_| ())
    }
}
