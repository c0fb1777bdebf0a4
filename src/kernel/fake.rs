//! A fake [`Kernel`] for unit tests: a small model of each network namespace (links with their
//! addresses, routes, neighbours; the host's rules, sysctls, pins and nftables elements), every
//! call recorded, and one named step made to fail once, so setup, rollback and teardown of every
//! mode are tested without root.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use super::nft::fake::Tables;
use super::nft::{Batch, Element, Set, TableRef};
use super::{Addr, At, Kernel, Link, LinkChange, NftError, NlError, Route, sysctl};
use crate::types::MacAddr;

/// Which namespace: the host, or a container's (by the fd its file was opened as; a pin opened
/// later is mapped onto the namespace it pins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ns {
    Host,
    Fd(i32),
}

/// One namespace's state.
#[derive(Default, Debug, Clone)]
pub struct NsState {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    pub neighs: Vec<(u32, Ipv4Addr, MacAddr)>,
    /// nftables inside (task firewalls).
    pub nft: Tables,
}

/// The fake kernel.
#[derive(Default)]
pub struct Fake {
    pub ns: HashMap<Ns, NsState>,
    /// Host policy rules: (from, table, priority).
    pub rules: Vec<(Ipv4Addr, u32, u32)>,
    /// Host links carrying a default route, with its table.
    pub default_links: Vec<(u32, u32)>,
    /// Host sysctls set, by "dev/key" (and "ip_forward").
    pub sysctls: HashMap<String, String>,
    /// `ip_local_reserved_ports`.
    pub reserved: std::collections::BTreeSet<u16>,
    /// Live pins: path → namespace.
    pub pins: HashMap<PathBuf, Ns>,
    /// Host nftables.
    pub nft: Tables,
    /// Every call, by step name.
    pub calls: Vec<String>,
    /// The step that fails: every call of it, or with `fail_once` only the first (so a
    /// rollback can use the same step).
    pub fail_at: Option<&'static str>,
    pub fail_once: bool,
    /// How many calls of `fail_at` succeed before it fails (0: the first call fails), to fail
    /// the second `set_link` of a setup rather than its first.
    pub fail_after: usize,
    /// The errno the failing step answers (EPERM unless set).
    pub fail_errno: Option<i32>,
    /// A second step that fails on every call (a setup failing at `fail_at` whose rollback
    /// then fails too).
    pub fail_also: Option<&'static str>,
    /// Each conntrack flush asked for.
    pub flushes: Vec<String>,
    /// A kernel older than 6.12, which cannot retire set elements (teardowns delete them).
    pub no_retire: bool,
    /// Every nftables transaction applied, in order.
    pub nft_log: Vec<Batch>,
    /// Pins opened later, mapped onto their namespace.
    aliases: HashMap<i32, Ns>,
    /// Each veth end's peer (both ways): deleting one end deletes the other, as in the kernel.
    peers: HashMap<u32, (Ns, u32)>,
    next_index: u32,
}

fn enodev() -> NlError {
    NlError::Io(io::Error::from_raw_os_error(libc::ENODEV))
}

fn errno(e: i32) -> NlError {
    NlError::Io(io::Error::from_raw_os_error(e))
}

/// A netns stand-in for tests: an open file that stays open (and so keeps its fd, the fake's key
/// for the namespace) for the rest of the test process.
pub fn netns() -> &'static File {
    Box::leak(Box::new(File::open("/dev/null").expect("open /dev/null")))
}

impl Fake {
    pub fn new() -> Self {
        let mut f = Fake::default();
        f.ns.insert(Ns::Host, NsState::default());
        f.add_host_link(Link {
            name: "lo".into(),
            loopback: true,
            up: true,
            ..Link::default()
        });
        f
    }

    /// Records the call and fails it if it is the chosen step.
    pub fn step(&mut self, name: &'static str) -> Result<(), NlError> {
        self.calls.push(name.into());
        if self.fail_also == Some(name) {
            return Err(errno(libc::EBUSY));
        }
        if self.fail_at == Some(name) {
            if self.fail_after > 0 {
                self.fail_after -= 1;
                return Ok(());
            }
            if self.fail_once {
                self.fail_at = None;
            }
            return Err(errno(self.fail_errno.unwrap_or(libc::EPERM)));
        }
        Ok(())
    }

    /// Makes the `nth` call (1-based) of `step` fail, once.
    pub fn fail_call(&mut self, step: &'static str, nth: usize) {
        self.fail_at = Some(step);
        self.fail_once = true;
        self.fail_after = nth.saturating_sub(1);
    }

    /// How many times `step` was called.
    pub fn count(&self, step: &str) -> usize {
        self.calls.iter().filter(|c| *c == step).count()
    }

    /// A new, empty network namespace with its own `lo` (down, as the kernel makes it), for a
    /// task; its file stays open for the rest of the test process.
    pub fn new_netns(&mut self) -> &'static File {
        let f = netns();
        self.next_index += 1;
        let lo = Link {
            index: self.next_index,
            name: "lo".into(),
            loopback: true,
            ..Link::default()
        };
        self.at(At::Netns(f)).links.push(lo);
        f
    }

    /// What the kernel does when a namespace's last reference goes: its virtual links (veths,
    /// VLANs) are destroyed, its physical ones return to the host under their names there (or
    /// as `dev<index>` when the name is taken), down, without addresses.
    pub fn destroy_netns(&mut self, f: &File) {
        let k = self.key(At::Netns(f));
        let Some(st) = self.ns.remove(&k) else { return };
        for l in &st.links {
            if let Some((pk, peer)) = self.peers.remove(&l.index) {
                self.peers.remove(&peer);
                self.remove_in(pk, peer);
            }
        }
        let host_names: Vec<String> = self.host_link_names();
        for mut l in st
            .links
            .into_iter()
            .filter(|l| l.kind.is_none() && !l.loopback)
        {
            if host_names.contains(&l.name) {
                l.name = format!("dev{}", l.index);
            }
            l.up = false;
            self.at(At::Host).links.push(l);
        }
    }

    fn nft_step(&mut self, name: &'static str) -> Result<(), NftError> {
        self.step(name)
            .map_err(|_| NftError::os(libc::EPERM, format!("fake {name}")))
    }

    /// Every element of the host's tables, as `nft list` reads them (`set { key : data }`).
    pub fn elements(&self) -> Vec<String> {
        self.nft.all_elements()
    }

    fn io_step(&mut self, name: &'static str) -> io::Result<()> {
        self.step(name).map_err(|e| match e {
            NlError::Io(io) => io,
            _ => io::Error::from_raw_os_error(libc::EPERM),
        })
    }

    /// A namespace key for an open netns file.
    pub fn key(&self, at: At) -> Ns {
        match at {
            At::Host => Ns::Host,
            At::Netns(f) => {
                let fd = f.as_raw_fd();
                self.aliases.get(&fd).copied().unwrap_or(Ns::Fd(fd))
            }
        }
    }

    pub fn at(&mut self, at: At) -> &mut NsState {
        let k = self.key(at);
        self.ns.entry(k).or_default()
    }

    pub fn state(&self, at: At) -> NsState {
        self.ns.get(&self.key(at)).cloned().unwrap_or_default()
    }

    /// Adds a host link (indexes are unique across namespaces, as the fake needs no more).
    pub fn add_host_link(&mut self, mut l: Link) -> u32 {
        self.next_index += 1;
        l.index = self.next_index;
        let i = l.index;
        self.at(At::Host).links.push(l);
        i
    }

    fn add_link(&mut self, at: At, mut l: Link) -> Result<u32, NlError> {
        if self.at(at).links.iter().any(|x| x.name == l.name) {
            return Err(errno(libc::EEXIST));
        }
        self.next_index += 1;
        l.index = self.next_index;
        let i = l.index;
        self.at(at).links.push(l);
        Ok(i)
    }

    /// Names of the host's links other than `lo`.
    pub fn host_link_names(&self) -> Vec<String> {
        self.state(At::Host)
            .links
            .iter()
            .filter(|l| !l.loopback)
            .map(|l| l.name.clone())
            .collect()
    }

    pub fn host_link(&self, name: &str) -> Option<Link> {
        self.state(At::Host)
            .links
            .into_iter()
            .find(|l| l.name == name)
    }

    fn remove_link(&mut self, at: At, index: u32) -> Option<Link> {
        let k = self.key(at);
        let l = self.remove_in(k, index)?;
        if let Some((pk, peer)) = self.peers.remove(&index) {
            self.peers.remove(&peer);
            self.remove_in(pk, peer);
        }
        Some(l)
    }

    fn remove_in(&mut self, k: Ns, index: u32) -> Option<Link> {
        let st = self.ns.get_mut(&k)?;
        let pos = st.links.iter().position(|l| l.index == index)?;
        let l = st.links.remove(pos);
        st.addrs.retain(|a| a.index != index);
        st.routes.retain(|r| r.oif != index);
        st.neighs.retain(|n| n.0 != index);
        Some(l)
    }

    /// Records two new links as one veth pair.
    fn pair(&mut self, a: (At, u32), b: (At, u32)) {
        let (ka, kb) = (self.key(a.0), self.key(b.0));
        self.peers.insert(a.1, (kb, b.1));
        self.peers.insert(b.1, (ka, a.1));
    }

    fn link_mut(&mut self, at: At, index: u32) -> Result<&mut Link, NlError> {
        self.at(at)
            .links
            .iter_mut()
            .find(|l| l.index == index)
            .ok_or_else(enodev)
    }
}

impl Kernel for Fake {
    fn link(&mut self, name: &str) -> Result<Option<Link>, NlError> {
        Ok(self.host_link(name))
    }

    fn create_bridge(
        &mut self,
        name: &str,
        mac: MacAddr,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<u32, NlError> {
        self.step("create_bridge")?;
        let i = self.add_link(
            At::Host,
            Link {
                name: name.into(),
                mac: Some(mac),
                kind: Some("bridge".into()),
                up: true,
                ..Link::default()
            },
        )?;
        self.at(At::Host).addrs.push(Addr {
            index: i,
            ip: IpAddr::V4(gateway),
            prefix,
        });
        Ok(i)
    }

    fn repair_bridge(
        &mut self,
        index: u32,
        up: bool,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<Vec<String>, NlError> {
        self.step("repair_bridge")?;
        let mut fixed = Vec::new();
        let has = self
            .state(At::Host)
            .addrs
            .iter()
            .any(|a| a.index == index && a.ip == IpAddr::V4(gateway));
        if !has {
            self.at(At::Host).addrs.push(Addr {
                index,
                ip: IpAddr::V4(gateway),
                prefix,
            });
            fixed.push(format!("added its address {gateway}/{prefix}"));
        }
        if !up {
            self.link_mut(At::Host, index)?.up = true;
            fixed.push("brought it up".into());
        }
        Ok(fixed)
    }

    fn reserved_ports(&mut self) -> io::Result<Vec<u16>> {
        Ok(self.reserved.iter().copied().collect())
    }

    fn change_reserved_ports(&mut self, add: &[u16], remove: &[u16]) -> io::Result<()> {
        self.io_step("reserve_ports")?;
        self.reserved.extend(add.iter().copied());
        for p in remove {
            self.reserved.remove(p);
        }
        Ok(())
    }

    fn bridge_sysctls(&mut self, bridge: &str) -> io::Result<Vec<sysctl::Changed>> {
        self.io_step("sysctls")?;
        let mut changed = Vec::new();
        for key in ["ip_forward".to_string(), format!("{bridge}/route_localnet")] {
            let was = self.sysctls.insert(key.clone(), "1".into());
            let was = was.unwrap_or_else(|| "0".into());
            if was != "1" {
                changed.push(sysctl::Changed { path: key, was });
            }
        }
        Ok(changed)
    }

    fn restore_sysctl(&mut self, c: &sysctl::Changed) -> io::Result<()> {
        self.io_step("restore_sysctl")?;
        self.sysctls.insert(c.path.clone(), c.was.clone());
        Ok(())
    }

    fn add_veth(
        &mut self,
        host: &str,
        master: u32,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        self.step("add_veth")?;
        let h = self.add_link(
            At::Host,
            Link {
                name: host.into(),
                kind: Some("veth".into()),
                master: Some(master),
                up: true,
                ..Link::default()
            },
        )?;
        let p = self.add_link(
            At::Netns(netns),
            Link {
                name: peer.into(),
                kind: Some("veth".into()),
                ..Link::default()
            },
        )?;
        self.pair((At::Host, h), (At::Netns(netns), p));
        Ok(())
    }

    fn configure_container(
        &mut self,
        _: &File,
        _: &str,
        _: Ipv4Addr,
        _: u8,
        _: Ipv4Addr,
    ) -> Result<(), NlError> {
        self.step("configure")
    }

    fn loopback_up(&mut self, _: &File) -> Result<(), NlError> {
        self.step("lo")
    }

    fn del_link(&mut self, name: &str) -> Result<bool, NlError> {
        self.step("del_link")?;
        match self.host_link(name) {
            Some(l) => Ok(self.remove_link(At::Host, l.index).is_some()),
            None => Ok(false),
        }
    }

    fn nft(&mut self, batch: &Batch) -> Result<(), NftError> {
        self.nft_step("nft")?;
        self.nft.apply(batch)?;
        self.nft_log.push(batch.clone());
        Ok(())
    }

    fn nft_retires_elements(&self) -> bool {
        !self.no_retire
    }

    fn nft_rule_counts(
        &mut self,
        table: &TableRef,
    ) -> Result<Option<BTreeMap<String, usize>>, NftError> {
        self.nft_step("nft_rule_counts")?;
        Ok(self.nft.rule_counts(table))
    }

    fn nft_elements(&mut self, table: &TableRef, set: &Set) -> Result<Vec<Element>, NftError> {
        self.nft_step("nft_elements")?;
        self.nft.elements(table, set)
    }

    fn flush_udp(&mut self, stale: super::conntrack::Stale<'_>) -> io::Result<()> {
        self.flushes.push(format!("{stale:?}"));
        self.io_step("flush_udp")
    }

    fn links(&mut self, at: At) -> Result<Vec<Link>, NlError> {
        self.step("links")?;
        Ok(self.state(at).links)
    }

    fn default_route_links(&mut self) -> Result<Vec<(u32, u32)>, NlError> {
        let mut out = self.default_links.clone();
        for r in &self.state(At::Host).routes {
            if r.prefix == 0 {
                out.push((r.oif, r.table));
            }
        }
        Ok(out)
    }

    fn addresses(&mut self, at: At) -> Result<Vec<Addr>, NlError> {
        Ok(self.state(at).addrs)
    }

    fn set_link(&mut self, at: At, index: u32, c: LinkChange) -> Result<(), NlError> {
        self.step("set_link")?;
        if let Some(n) = c.name
            && self
                .state(at)
                .links
                .iter()
                .any(|l| l.name == n && l.index != index)
        {
            return Err(errno(libc::EEXIST));
        }
        let l = self.link_mut(at, index)?;
        if let Some(up) = c.up {
            l.up = up;
        }
        if let Some(n) = c.name {
            l.name = n.into();
        }
        if let Some(m) = c.mtu {
            l.mtu = Some(m);
        }
        Ok(())
    }

    fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), NlError> {
        self.step("set_alias")?;
        let l = self.link_mut(At::Host, index)?;
        l.alias = (!alias.is_empty()).then(|| alias.to_string());
        Ok(())
    }

    fn move_link(&mut self, from: At, index: u32, to: At, name: &str) -> Result<(), NlError> {
        self.step("move_link")?;
        let (fk, tk) = (self.key(from), self.key(to));
        if fk == tk {
            return Err(errno(libc::EINVAL));
        }
        let taken = |me: &Self, n: &str| me.state(to).links.iter().any(|l| l.name == n);
        let current = self
            .state(from)
            .links
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
            .ok_or_else(enodev)?;
        // As the kernel does: a link whose own name is taken in the target does not move; one
        // whose new name is taken moves under its own name, and the rename then fails.
        let renamed = !taken(self, name);
        if !renamed && taken(self, &current) {
            return Err(errno(libc::EEXIST));
        }
        let mut l = self.remove_in(fk, index).ok_or_else(enodev)?;
        if renamed {
            l.name = name.into();
        }
        l.up = false;
        self.at(to).links.push(l);
        // A moved veth end keeps its peer.
        if let Some((_, peer)) = self.peers.get(&index).copied() {
            self.peers.insert(peer, (tk, index));
        }
        if renamed {
            Ok(())
        } else {
            Err(errno(libc::EEXIST))
        }
    }

    fn add_addr(&mut self, at: At, index: u32, ip: IpAddr, prefix: u8) -> Result<(), NlError> {
        self.step("add_addr")?;
        self.link_mut(at, index)?;
        let st = self.at(at);
        if st.addrs.iter().any(|a| a.index == index && a.ip == ip) {
            return Err(errno(libc::EEXIST));
        }
        st.addrs.push(Addr { index, ip, prefix });
        Ok(())
    }

    fn add_route(&mut self, at: At, r: &Route) -> Result<(), NlError> {
        self.step("add_route")?;
        let st = self.at(at);
        if st
            .routes
            .iter()
            .any(|x| x.dst == r.dst && x.prefix == r.prefix && x.table == r.table)
        {
            return Err(errno(libc::EEXIST));
        }
        st.routes.push(*r);
        Ok(())
    }

    fn del_route(&mut self, at: At, r: &Route) -> Result<bool, NlError> {
        self.step("del_route")?;
        let st = self.at(at);
        let n = st.routes.len();
        st.routes.retain(|x| x != r);
        Ok(st.routes.len() != n)
    }

    fn add_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<(), NlError> {
        self.step("add_rule")?;
        if self.rules.contains(&(from, table, priority)) {
            return Err(errno(libc::EEXIST));
        }
        self.rules.push((from, table, priority));
        Ok(())
    }

    fn del_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> Result<bool, NlError> {
        self.step("del_rule")?;
        let n = self.rules.len();
        self.rules.retain(|r| *r != (from, table, priority));
        Ok(self.rules.len() != n)
    }

    fn add_neigh(&mut self, at: At, index: u32, ip: Ipv4Addr, mac: MacAddr) -> Result<(), NlError> {
        self.step("add_neigh")?;
        self.at(at).neighs.push((index, ip, mac));
        Ok(())
    }

    fn add_pair(
        &mut self,
        host: &str,
        mac: Option<MacAddr>,
        peer: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        self.step("add_pair")?;
        let h = self.add_link(
            At::Host,
            Link {
                name: host.into(),
                mac,
                kind: Some("veth".into()),
                ..Link::default()
            },
        )?;
        match self.add_link(
            At::Netns(netns),
            Link {
                name: peer.into(),
                kind: Some("veth".into()),
                ..Link::default()
            },
        ) {
            Ok(p) => {
                self.pair((At::Host, h), (At::Netns(netns), p));
                Ok(())
            }
            Err(e) => {
                // The kernel creates both ends in one request, or neither.
                self.remove_link(At::Host, h);
                Err(e)
            }
        }
    }

    fn add_vlan(
        &mut self,
        trunk: u32,
        vlan: u16,
        mac: MacAddr,
        name: &str,
        netns: &File,
    ) -> Result<(), NlError> {
        self.step("add_vlan")?;
        self.link_mut(At::Host, trunk)?;
        let taken = self.ns.values().any(|st| {
            st.links
                .iter()
                .any(|l| l.lower == Some(trunk) && l.vlan_id == Some(vlan))
        });
        if taken {
            return Err(errno(libc::EEXIST));
        }
        self.add_link(
            At::Netns(netns),
            Link {
                name: name.into(),
                mac: Some(mac),
                kind: Some("vlan".into()),
                lower: Some(trunk),
                vlan_id: Some(vlan),
                ..Link::default()
            },
        )?;
        Ok(())
    }

    fn del_link_at(&mut self, at: At, index: u32) -> Result<bool, NlError> {
        self.step("del_link_at")?;
        Ok(self.remove_link(at, index).is_some())
    }

    fn set_conf(&mut self, dev: &str, key: &str, value: &str) -> io::Result<String> {
        self.io_step("set_conf")?;
        let old = self
            .sysctls
            .insert(format!("{dev}/{key}"), value.into())
            .unwrap_or_else(|| "0".into());
        Ok(old)
    }

    fn enable_forwarding(&mut self) -> io::Result<Option<sysctl::Changed>> {
        self.io_step("forwarding")?;
        let was = self.sysctls.insert("ip_forward".into(), "1".into());
        let was = was.unwrap_or_else(|| "0".into());
        Ok((was != "1").then(|| sysctl::Changed {
            path: "ip_forward".into(),
            was,
        }))
    }

    fn pin_netns(&mut self, pid: i32, path: &Path) -> io::Result<()> {
        self.io_step("pin")?;
        // The fake's task namespace is the one opened for `pid` by the test: fd `pid`.
        self.pins.insert(path.to_path_buf(), Ns::Fd(pid));
        Ok(())
    }

    fn open_pin(&mut self, path: &Path) -> io::Result<Option<File>> {
        let Some(ns) = self.pins.get(path).copied() else {
            return Ok(None);
        };
        if !self.ns.contains_key(&ns) {
            return Ok(None);
        }
        let f = File::open("/dev/null")?;
        self.aliases.insert(f.as_raw_fd(), ns);
        Ok(Some(f))
    }

    fn unpin_netns(&mut self, path: &Path) -> io::Result<()> {
        self.io_step("unpin")?;
        self.pins.remove(path);
        Ok(())
    }

    fn nft_in(&mut self, netns: &File, batch: &Batch) -> Result<(), NftError> {
        self.nft_step("nft_in")?;
        self.at(At::Netns(netns)).nft.apply(batch)
    }
}
