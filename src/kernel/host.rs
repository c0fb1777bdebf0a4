//! [`HostKernel`]: the real [`Kernel`], over netlink sockets opened on first use and kept for
//! the rest of the invocation (one in the host's netns, one in the container's).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::netlink::{self, Netlink, NlError};
use super::nft::{Batch, Element, Nft, NftError, Set, TableRef};
use super::{Addr, At, Kernel, Link, LinkChange, Route, conntrack, netns, sysctl};
use crate::types::MacAddr;

/// The real kernel, in the current (host) network namespace.
#[derive(Default)]
pub struct HostKernel {
    nl: Option<Netlink>,
    /// A socket inside a container's netns, with that netns' inode.
    inner: Option<(u64, Netlink)>,
    nft: Option<Nft>,
    home: Option<File>,
    ct: conntrack::Conntrack,
}

/// High bits of the link group a batch deletion puts its links in (the low 16 bits are the
/// process id's): "ns" in ASCII, far from the small numbers administrators give groups.
const DOOMED_GROUP_BASE: u32 = 0x6e73_0000;

fn enodev() -> NlError {
    NlError::Io(io::Error::from_raw_os_error(libc::ENODEV))
}

impl HostKernel {
    pub fn new() -> Self {
        Self::default()
    }

    fn nl(&mut self) -> Result<&mut Netlink, NlError> {
        if self.nl.is_none() {
            self.nl = Some(Netlink::open()?);
        }
        self.nl.as_mut().ok_or_else(enodev)
    }

    fn nft_socket(&mut self) -> Result<&mut Nft, NftError> {
        if self.nft.is_none() {
            self.nft = Some(Nft::open()?);
        }
        // Set just above.
        self.nft
            .as_mut()
            .ok_or_else(|| NftError::os(libc::EBADF, "nftables socket"))
    }

    /// A socket acting in `at`: the host's, or one opened inside the netns (kept while the same
    /// namespace is asked for).
    fn sock(&mut self, at: At) -> Result<&mut Netlink, NlError> {
        match at {
            At::Host => self.nl(),
            At::Netns(f) => {
                let ino = f.metadata().map_err(NlError::Io)?.ino();
                if self.inner.as_ref().map(|(i, _)| *i) != Some(ino) {
                    self.inner = Some((ino, Netlink::open_in(f.as_fd())?));
                }
                match self.inner.as_mut() {
                    Some((_, nl)) => Ok(nl),
                    None => Err(enodev()),
                }
            }
        }
    }

    fn home(&mut self) -> io::Result<&File> {
        if self.home.is_none() {
            self.home = Some(File::open("/proc/thread-self/ns/net")?);
        }
        self.home
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }
}

impl Kernel for HostKernel {
    fn link(&mut self, name: &str) -> Result<Option<Link>, NlError> {
        match self.nl()?.link_by_name(name) {
            Ok(l) => Ok(Some(super::netlink::link_of(&l))),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create_bridge(
        &mut self,
        name: &str,
        mac: MacAddr,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, NlError> {
        let nl = self.nl()?;
        nl.add_bridge(name, mac.octets())?;
        let idx = nl.index_of(name)?.ok_or_else(enodev)?;
        match nl.add_addr4(idx, gateway, prefix) {
            Err(e) if !e.is(libc::EEXIST) => return Err(e),
            _ => {}
        }
        Ok(idx)
    }

    fn repair_bridge(
        &mut self,
        index: u32,
        up: bool,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<Vec<String>, NlError> {
        let nl = self.nl()?;
        let mut fixed = Vec::new();
        // Adding the gateway is the cheapest check that it is there: EEXIST when it is.
        match nl.add_addr4(index, gateway, prefix) {
            Ok(()) => fixed.push(format!("added its address {gateway}/{prefix}")),
            Err(e) if e.is(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        if !up {
            nl.set_link(index, Some(true), None, None)?;
            fixed.push("brought it up".into());
        }
        Ok(fixed)
    }

    fn bridge_sysctls(&mut self, bridge: &str) -> io::Result<Vec<sysctl::Changed>> {
        let forward = sysctl::enable_ip_forward()?;
        match sysctl::enable_route_localnet(bridge) {
            Ok(localnet) => Ok(forward.into_iter().chain(localnet).collect()),
            Err(e) => {
                if let Some(c) = &forward {
                    let _ = sysctl::restore(c);
                }
                Err(e)
            }
        }
    }

    fn restore_sysctl(&mut self, c: &sysctl::Changed) -> io::Result<()> {
        sysctl::restore(c)
    }

    fn reserved_ports(&mut self) -> io::Result<Vec<u16>> {
        sysctl::reserved_ports()
    }

    fn change_reserved_ports(&mut self, add: &[u16], remove: &[u16]) -> io::Result<()> {
        sysctl::change_reserved_ports(add, remove)
    }

    fn add_veth(
        &mut self,
        host: &str,
        master: u32,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError> {
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
        let nl = self.sock(At::Netns(netns))?;
        nl.set_up("lo")?;
        let idx = nl.index_of(ifname)?.ok_or_else(enodev)?;
        nl.set_up(ifname)?;
        nl.add_addr4(idx, ip, prefix)?;
        nl.add_route(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(gateway)),
            idx,
            super::MAIN_TABLE,
        )
    }

    fn loopback_up(&mut self, netns: &File) -> Result<(), NlError> {
        self.sock(At::Netns(netns))?.set_up("lo")
    }

    fn del_link(&mut self, name: &str) -> Result<bool, NlError> {
        self.nl()?.del_link(name)
    }

    fn del_links(&mut self, names: &[String]) -> Vec<(String, NlError)> {
        let one_by_one = |k: &mut Self, names: &[String]| {
            names
                .iter()
                .filter_map(|n| k.del_link(n).err().map(|e| (n.clone(), e)))
                .collect()
        };
        if names.len() < 2 {
            return one_by_one(self, names);
        }
        // The links join a group of their own, then one request deletes the group. Only when no
        // other link already carries that group number.
        let group = DOOMED_GROUP_BASE | (std::process::id() & 0xffff);
        let foreign = match self.nl().and_then(|nl| nl.links()) {
            Ok(ls) => ls
                .iter()
                .map(netlink::link_of)
                .any(|l| l.group == group && !names.contains(&l.name)),
            Err(_) => true,
        };
        if foreign {
            return one_by_one(self, names);
        }
        let Ok(nl) = self.nl() else {
            return one_by_one(self, names);
        };
        let mut failed = Vec::new();
        let mut grouped = Vec::new();
        for n in names {
            match nl.set_group(n, group) {
                Ok(true) => grouped.push(n.clone()),
                Ok(false) => {}
                Err(e) => failed.push((n.clone(), e)),
            }
        }
        if nl.del_group(group).is_err() {
            failed.extend(one_by_one(self, &grouped));
        }
        failed
    }

    fn nft(&mut self, batch: &Batch) -> Result<(), NftError> {
        self.nft_socket()?.apply(batch)
    }

    fn nft_retires_elements(&self) -> bool {
        super::nft::retires_elements()
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

    fn flush_udp(&mut self, stale: conntrack::Stale<'_>) -> io::Result<()> {
        self.ct.flush(stale).map(|_| ())
    }

    fn links(&mut self, at: At) -> Result<Vec<Link>, NlError> {
        self.sock(at)?.link_list()
    }

    fn default_route_links(&mut self) -> Result<Vec<(u32, u32)>, NlError> {
        self.nl()?.default_route_links()
    }

    fn addresses(&mut self, at: At) -> Result<Vec<Addr>, NlError> {
        self.sock(at)?.addresses()
    }

    fn set_link(&mut self, at: At, index: u32, c: LinkChange) -> Result<(), NlError> {
        self.sock(at)?.set_link(index, c.up, c.name, c.mtu)
    }

    fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NlError> {
        self.nl()?.set_alias(index, alias)
    }

    fn move_link(&mut self, from: At, index: u32, to: At, name: &str) -> Result<(), NlError> {
        let target = match to {
            At::Netns(f) => f.try_clone().map_err(NlError::Io)?,
            At::Host => self.home().and_then(File::try_clone).map_err(NlError::Io)?,
        };
        self.sock(from)?.move_to_netns(index, target.as_fd(), name)
    }

    fn add_addr(&mut self, at: At, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NlError> {
        self.sock(at)?.add_addr(index, ip, prefix)
    }

    fn add_route(&mut self, at: At, r: &Route) -> Result<(), NlError> {
        self.sock(at)?
            .add_route(r.dst, r.prefix, r.via, r.oif, r.table)
    }

    fn del_route(&mut self, at: At, r: &Route) -> Result<bool, NlError> {
        self.sock(at)?
            .del_route(r.dst, r.prefix, r.via, r.oif, r.table)
    }

    fn add_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<(), NlError> {
        self.nl()?.add_rule(from, table, priority)
    }

    fn del_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<bool, NlError> {
        self.nl()?.del_rule(from, table, priority)
    }

    fn add_neigh(&mut self, at: At, index: u32, ip: Ipv4Addr, mac: MacAddr) -> Result<(), NlError> {
        self.sock(at)?.add_neigh(index, ip, mac.octets())
    }

    fn add_pair(
        &mut self,
        host: &str,
        mac: Option<MacAddr>,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        self.nl()?
            .add_veth(host, None, mac.map(|m| m.octets()), peer, netns.as_fd())
    }

    fn add_vlan(
        &mut self,
        trunk: u32,
        vlan: u16,
        mac: MacAddr,
        name: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        self.nl()?.add_vlan(trunk, vlan, mac, name, netns.as_fd())
    }

    fn del_link_at(&mut self, at: At, index: u32) -> Result<bool, NlError> {
        self.sock(at)?.del_link_index(index)
    }

    fn set_conf(&mut self, dev: &str, key: &str, value: &str) -> io::Result<String> {
        sysctl::set_conf(dev, key, value)
    }

    fn enable_forwarding(&mut self) -> io::Result<Option<sysctl::Changed>> {
        sysctl::enable_ip_forward()
    }

    fn pin_netns(&mut self, pid: i32, path: &Path) -> io::Result<()> {
        netns::pin(pid, path)
    }

    fn open_pin(&mut self, path: &Path) -> io::Result<Option<File>> {
        netns::open_pin(path)
    }

    fn unpin_netns(&mut self, path: &Path) -> io::Result<()> {
        netns::unpin(path)
    }

    fn nft_in(&mut self, netns: &File, batch: &Batch) -> Result<(), NftError> {
        // The socket is bound to the task's netns when it is opened there.
        Nft::open_in(netns.as_fd())?.apply(batch)
    }
}
