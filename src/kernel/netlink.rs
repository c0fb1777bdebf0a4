//! A small synchronous rtnetlink client (netlink-sys + netlink-packet-route, no async runtime).
//!
//! A socket is bound to the network namespace it was opened in, so [`Netlink::open_in`] opens
//! one inside a container's netns and every call on it acts there. Kernel errors keep their errno
//! so callers can match ENODEV / EEXIST.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoPortKind, InfoVeth, InfoVlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// Room for one datagram of answers. Kept as spare capacity, never zeroed: `recv` writes into it,
/// so only the pages an answer fills become resident (a setup's few short answers touch one or
/// two pages instead of sixteen per socket).
pub const RECV_BUF: usize = 64 * 1024;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Interface alias attribute (linux/if_link.h).
const IFLA_IFALIAS: u16 = 20;

use super::{Addr, Link, netns};
use crate::types::MacAddr;

/// An error from the kernel (errno kept) or from decoding its answer.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("bad netlink message: {0}")]
    Decode(String),
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Io(e) => e.raw_os_error(),
            NlError::Decode(_) => None,
        }
    }
    pub fn is(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }
}

pub type NlResult<T> = Result<T, NlError>;

/// A synchronous rtnetlink socket.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the caller's current network namespace.
    pub fn open() -> NlResult<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Extended acks give the kernel's reason text on errors; harmless if unsupported.
        let _ = sock.set_ext_ack(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// A socket inside the network namespace `ns` (e.g. `/proc/<pid>/ns/net`).
    pub fn open_in(ns: BorrowedFd<'_>) -> NlResult<Self> {
        netns::with_netns(ns, Netlink::open).map_err(NlError::Io)?
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> NlResult<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Sends a request and collects the answers until the ack, error or end of dump.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let seq = self.send(msg, flags | if dump { 0 } else { NLM_F_ACK })?;
        // Non-dump requests carry NLM_F_ACK: their answer (if any) is followed by the ack.
        let mut out = Vec::new();
        loop {
            self.buf.clear();
            self.sock.recv(&mut self.buf, 0)?;
            let n = self.buf.len();
            let mut off = 0;
            while off < n {
                let len = NetlinkBuffer::new_checked(&self.buf[off..n])
                    .map_err(|e| NlError::Decode(e.to_string()))?
                    .length() as usize;
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..off + len])
                        .map_err(|e| NlError::Decode(e.to_string()))?;
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => return Err(io::Error::from_raw_os_error(-code.get()).into()),
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The link named `name`, or ENODEV.
    pub fn link_by_name(&mut self, name: &str) -> NlResult<LinkMessage> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        let seq_msgs = self.request(RouteNetlinkMessage::GetLink(m), 0)?;
        seq_msgs
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV).into())
    }

    /// Index of the link named `name`, `None` if it does not exist.
    pub fn index_of(&mut self, name: &str) -> NlResult<Option<u32>> {
        match self.link_by_name(name) {
            Ok(l) => Ok(Some(l.header.index)),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All links (a dump).
    pub fn links(&mut self) -> NlResult<Vec<LinkMessage>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Index of the interface holding the main table's IPv4 default route.
    pub fn default_route_oif(&mut self) -> NlResult<Option<u32>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let routes = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
        Ok(routes.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 0
                    && r.header.table == RouteHeader::RT_TABLE_MAIN =>
            {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }
            _ => None,
        }))
    }

    /// Moves link `index` (taken down) into the namespace `ns`, renamed `name`, in one message.
    pub fn move_to_netns(&mut self, index: u32, ns: BorrowedFd<'_>, name: &str) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request(RouteNetlinkMessage::SetLink(m), 0)?;
        Ok(())
    }

    /// Sets flags/name/MTU of link `index`: `up` brings it up or down; `name`, `mtu` if given.
    pub fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        name: Option<&str>,
        mtu: Option<u32>,
    ) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        if let Some(n) = name {
            m.attributes.push(LinkAttribute::IfName(n.to_string()));
        }
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(m), 0)?;
        Ok(())
    }

    /// Sets (or, with "", clears) the interface alias of link `index`.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if alias.is_empty() {
            // A zero-length IFLA_IFALIAS clears the alias ("" would be sent as one NUL byte).
            m.attributes
                .push(LinkAttribute::Other(DefaultNla::new(IFLA_IFALIAS, vec![])));
        } else {
            m.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
        }
        self.request(RouteNetlinkMessage::SetLink(m), 0)?;
        Ok(())
    }

    /// Adds an IPv6 address (no duplicate address detection: the address is usable at once).
    pub fn add_addr6(&mut self, index: u32, ip: Ipv6Addr, prefix: u8) -> NlResult<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes.push(AddressAttribute::Address(IpAddr::V6(ip)));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    fn route_msg(
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
        table: u32,
    ) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.destination_prefix_length = prefix;
        m.header.table = if table < 256 {
            table as u8
        } else {
            RouteHeader::RT_TABLE_UNSPEC
        };
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        m.header.kind = RouteType::Unicast;
        let ra = |ip: IpAddr| match ip {
            IpAddr::V4(a) => RouteAddress::Inet(a),
            IpAddr::V6(a) => RouteAddress::Inet6(a),
        };
        if prefix > 0 {
            m.attributes.push(RouteAttribute::Destination(ra(dst)));
        }
        if let Some(gw) = gateway {
            m.attributes.push(RouteAttribute::Gateway(ra(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        m.attributes.push(RouteAttribute::Table(table));
        m
    }

    /// Adds a route in `table` (254 = main); EEXIST passed up.
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
        table: u32,
    ) -> NlResult<()> {
        let m = Self::route_msg(dst, prefix, gateway, oif, table);
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)?;
        Ok(())
    }

    /// Deletes a route; `Ok(false)` if it was not there.
    pub fn del_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
        table: u32,
    ) -> NlResult<bool> {
        let mut m = Self::route_msg(dst, prefix, gateway, oif, table);
        m.header.scope = RouteScope::NoWhere;
        match self.request(RouteNetlinkMessage::DelRoute(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ESRCH) || e.is(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn rule_msg(from: Ipv4Addr, table: u32, priority: u32) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.src_len = 32;
        m.header.table = if table < 256 {
            table as u8
        } else {
            RouteHeader::RT_TABLE_UNSPEC
        };
        m.header.action = RuleAction::ToTable;
        m.attributes.push(RuleAttribute::Source(IpAddr::V4(from)));
        m.attributes.push(RuleAttribute::Table(table));
        m.attributes.push(RuleAttribute::Priority(priority));
        m
    }

    /// `ip rule add from <from>/32 lookup <table> priority <priority>`.
    pub fn add_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> NlResult<()> {
        self.request(
            RouteNetlinkMessage::NewRule(Self::rule_msg(from, table, priority)),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Deletes that rule; `Ok(false)` if it was not there.
    pub fn del_rule(&mut self, from: Ipv4Addr, table: u32, priority: u32) -> NlResult<bool> {
        match self.request(
            RouteNetlinkMessage::DelRule(Self::rule_msg(from, table, priority)),
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A permanent neighbour entry (no ARP needed for `ip` on `index`).
    pub fn add_neigh(&mut self, index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NlResult<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Creates a bridge, up, with a fixed MAC.
    pub fn add_bridge(&mut self, name: &str, mac: [u8; 6]) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            // No forwarding delay (STP is off by default): a container's port forwards at once.
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::ForwardDelay(0)])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        Ok(())
    }

    /// Creates a veth pair in one message: `host` (down; on bridge `master` and with MAC `mac`
    /// when given) in this namespace, `peer` (down) created directly inside the namespace
    /// `peer_ns`. The peer cannot be brought up here: the kernel opens it before the pair is
    /// linked (ENOTCONN); the caller brings it up inside its namespace.
    pub fn add_veth(
        &mut self,
        host: &str,
        master: Option<u32>,
        mac: Option<[u8; 6]>,
        peer: &str,
        peer_ns: BorrowedFd<'_>,
    ) -> NlResult<()> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.to_string()));
        p.attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(host.to_string()));
        if let Some(master) = master {
            m.attributes.push(LinkAttribute::Controller(master));
        }
        if let Some(mac) = mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        Ok(())
    }

    /// Readies a new bridge port and brings it up: hairpin mode on (with bridge netfilter active,
    /// a container's packet to its own host port is DNATed back out of the port it came in on),
    /// and no IPv6 link-local address (a bridge port needs none, and each one adds routes that
    /// later link changes walk). Two messages: the kernel applies flags before the address
    /// generation mode, so the port must still be down for the latter.
    pub fn ready_bridge_port(&mut self, port: &str) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(port.to_string()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )])),
        ]));
        m.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        match self.request(RouteNetlinkMessage::NewLink(m), 0) {
            Ok(_) => {}
            // No IPv6 on this host: hairpin alone.
            Err(e) if e.is(libc::EAFNOSUPPORT) => {
                let mut m = LinkMessage::default();
                m.attributes.push(LinkAttribute::IfName(port.to_string()));
                m.attributes.push(LinkAttribute::LinkInfo(vec![
                    LinkInfo::PortKind(InfoPortKind::Bridge),
                    LinkInfo::PortData(InfoPortData::BridgePort(vec![
                        InfoBridgePort::HairpinMode(true),
                    ])),
                ]));
                self.request(RouteNetlinkMessage::NewLink(m), 0)?;
            }
            Err(e) => return Err(e),
        }
        self.set_up(port)
    }

    /// Deletes a link by name; `Ok(false)` if it was already gone.
    pub fn del_link(&mut self, name: &str) -> NlResult<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Puts the link `name` into group `group`; false if it is absent.
    pub fn set_group(&mut self, name: &str, group: u32) -> NlResult<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Group(group));
        match self.request(RouteNetlinkMessage::SetLink(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes every link of group `group` in this netns in one request: the kernel unregisters
    /// them together and waits for one set of RCU grace periods instead of one per link.
    pub fn del_group(&mut self, group: u32) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::Group(group));
        match self.request(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(_) => Ok(()),
            Err(e) if e.is(libc::ENODEV) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Brings a link up by name.
    pub fn set_up(&mut self, name: &str) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request(RouteNetlinkMessage::SetLink(m), 0)?;
        Ok(())
    }

    /// Adds an IPv4 address; EEXIST is passed up for the caller to judge.
    pub fn add_addr4(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> NlResult<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.header.scope = AddressScope::Universe;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
        m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
        if prefix < 31 {
            let host_mask = u32::MAX >> prefix;
            m.attributes
                .push(AddressAttribute::Broadcast(Ipv4Addr::from(
                    u32::from(ip) | host_mask,
                )));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Every link, as netshim sees links.
    pub fn link_list(&mut self) -> NlResult<Vec<Link>> {
        Ok(self.links()?.iter().map(link_of).collect())
    }

    /// (index, table) of the links carrying a default route, IPv4 and IPv6, in any table, every
    /// next hop of a multipath route included.
    pub fn default_route_links(&mut self) -> NlResult<Vec<(u32, u32)>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            for r in self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRoute(r) = r else {
                    continue;
                };
                if r.header.destination_prefix_length != 0 || r.header.kind != RouteType::Unicast {
                    continue;
                }
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => out.push((*i, table)),
                        RouteAttribute::MultiPath(hops) => {
                            out.extend(hops.iter().map(|h| (h.interface_index, table)))
                        }
                        _ => {}
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Every IPv4 and IPv6 address.
    pub fn addresses(&mut self) -> NlResult<Vec<Addr>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut q = AddressMessage::default();
            q.header.family = family;
            for a in self.request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewAddress(a) = a else {
                    continue;
                };
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(addr) {
                    out.push(Addr {
                        index: a.header.index,
                        ip,
                        prefix: a.header.prefix_len,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Adds an address of either family (IPv6 without duplicate address detection).
    pub fn add_addr(&mut self, index: u32, ip: IpAddr, prefix: u8) -> NlResult<()> {
        match ip {
            IpAddr::V4(a) => self.add_addr4(index, a, prefix),
            IpAddr::V6(a) => self.add_addr6(index, a, prefix),
        }
    }

    /// Creates VLAN `vlan` on `trunk` with `mac`, directly inside the namespace `ns` as `name`.
    pub fn add_vlan(
        &mut self,
        trunk: u32,
        vlan: u16,
        mac: MacAddr,
        name: &str,
        ns: BorrowedFd<'_>,
    ) -> NlResult<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Link(trunk));
        m.attributes
            .push(LinkAttribute::Address(mac.octets().to_vec()));
        m.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(vlan)])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        Ok(())
    }

    /// Deletes link `index`; `Ok(false)` if it was already gone.
    pub fn del_link_index(&mut self, index: u32) -> NlResult<bool> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.is(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The first IPv4 address of the interface holding the default route (else the first global
    /// address) that `usable` accepts, for `ports list`.
    pub fn default_route_source(
        &mut self,
        usable: &dyn Fn(Ipv4Addr) -> bool,
    ) -> NlResult<Option<Ipv4Addr>> {
        let oif = self.default_route_oif()?;
        let mut q = AddressMessage::default();
        q.header.family = AddressFamily::Inet;
        let addrs = self.request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP)?;
        let mut first_global = None;
        for a in addrs {
            if let RouteNetlinkMessage::NewAddress(a) = a {
                let ip = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                let Some(ip) = ip.filter(|ip| usable(*ip)) else {
                    continue;
                };
                if Some(a.header.index) == oif {
                    return Ok(Some(ip));
                }
                if first_global.is_none() && a.header.scope == AddressScope::Universe {
                    first_global = Some(ip);
                }
            }
        }
        Ok(first_global)
    }
}

/// A link message as netshim sees links.
pub fn link_of(l: &LinkMessage) -> Link {
    let mut out = Link {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        loopback: l.header.flags.contains(LinkFlags::Loopback),
        ..Link::default()
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::Address(m) if m.len() == 6 => {
                let mut b = [0u8; 6];
                b.copy_from_slice(m);
                out.mac = Some(MacAddr(b));
            }
            LinkAttribute::Controller(i) => out.master = Some(*i),
            LinkAttribute::Link(i) => out.lower = Some(*i),
            LinkAttribute::Mtu(m) => out.mtu = Some(*m),
            LinkAttribute::IfAlias(s) => out.alias = Some(s.clone()),
            LinkAttribute::Group(g) => out.group = *g,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => out.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            out.vlan_id = v.iter().find_map(|x| match x {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            })
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    out
}
