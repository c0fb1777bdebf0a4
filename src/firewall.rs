//! netshim's nftables layout as typed transactions ([`Batch`]) for [`crate::kernel::nft`].
//! Pure: the batches are unit-tested here and applied by the modes through the `Kernel` trait.
//!
//! One table per instance, `ip netshim` for the default bridge ([`table_name`]), owned by netshim
//! alone. Port mappings are map elements, not rules: the per-packet lookup is one hash lookup
//! whatever the number of mappings, and a setup or teardown adds or deletes only its own elements
//! (their identity, protocol + host port + host address, is stored in the state, so teardown
//! never depends on the config). Names (bridge, table) go into the messages as bytes and are
//! never parsed as nft syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network};

use crate::kernel::nft::{
    Addr, BaseChain, Batch, CT_ESTABLISHED, CT_NEW, CT_RELATED, CT_STATUS_DNAT, Chain, ChainType,
    CmpOp, CtKey, DataType, Element, Expr, Family, Field, HookPoint, IPPROTO_TCP, IPPROTO_UDP,
    Iface, MetaKey, NFPROTO_IPV4, NFPROTO_IPV6, NftError, Op, PRIO_DSTNAT, PRIO_FILTER, PRIO_RAW,
    PRIO_SRCNAT, Register, Rule, Set, TableRef, Typeof, TypeofExpr, Verdict, ct_any, dport,
    fib_daddr_local, ifname, ip_addr, ip_daddr_in, ip6_addr, ip6_daddr, l4proto, l4proto_in,
    load_ip_daddr, load_th_dport, nfproto,
};
use crate::request::IngressRule;
use crate::state::{ContainerRecord, PortRecord};
use crate::types::Protocol;

/// The table of the default instance.
pub const TABLE: &str = "netshim";
/// The bridge of the default instance (the config's default `bridge.name`).
pub const DEFAULT_BRIDGE: &str = "netshim0";

/// The table of the instance whose bridge is `bridge`: `netshim` for the default bridge,
/// `netshim_<bridge>` otherwise, so two instances in one netns never share (or wipe) a table.
pub fn table_name(bridge: &str) -> String {
    if bridge == DEFAULT_BRIDGE {
        TABLE.to_string()
    } else {
        format!("{TABLE}_{bridge}")
    }
}

/// The host table `name`.
pub fn host_table(name: &str) -> TableRef {
    TableRef::new(Family::Ip, name)
}

/// `protocol . host port -> container address . port`, for all host addresses.
pub fn ports_map() -> Set {
    Set {
        name: "ports".into(),
        key: vec![DataType::InetProto, DataType::InetService],
        data: Some(vec![DataType::Ipv4Addr, DataType::InetService]),
        comment: Some(
            "protocol . host port -> container address . port (all host addresses)".into(),
        ),
        timeout: true,
        typeof_: None,
    }
}

/// `host address . protocol . host port -> container address . port`, for one host address.
pub fn ports_ip_map() -> Set {
    Set {
        name: "ports_ip".into(),
        key: vec![
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ],
        data: Some(vec![DataType::Ipv4Addr, DataType::InetService]),
        comment: Some(
            "host address . protocol . host port -> container address . port (one host address)"
                .into(),
        ),
        timeout: true,
        typeof_: None,
    }
}

/// `protocol . host port` of every mapping, for the loopback guard.
pub fn mapped_set() -> Set {
    Set {
        name: "mapped".into(),
        key: vec![DataType::InetProto, DataType::InetService],
        data: None,
        comment: Some("protocol . host port of every mapping, for the loopback guard".into()),
        timeout: true,
        typeof_: None,
    }
}

/// `udp dport -> ct zone`: the conntrack zone of each UDP mapping on all host addresses.
pub fn zones_map() -> Set {
    Set {
        name: "zones".into(),
        key: vec![DataType::InetService],
        data: Some(vec![DataType::CtZone]),
        comment: Some("UDP host port -> conntrack zone of its mapping (all host addresses)".into()),
        timeout: true,
        typeof_: Some(Typeof {
            key: vec![TypeofExpr::UdpDport],
            data: TypeofExpr::CtZone,
        }),
    }
}

/// `ip daddr . udp dport -> ct zone`, for UDP mappings on one host address.
pub fn zones_ip_map() -> Set {
    Set {
        name: "zones_ip".into(),
        key: vec![DataType::Ipv4Addr, DataType::InetService],
        data: Some(vec![DataType::CtZone]),
        comment: Some(
            "host address . UDP host port -> conntrack zone of its mapping (one host address)"
                .into(),
        ),
        timeout: true,
        typeof_: Some(Typeof {
            key: vec![TypeofExpr::IpDaddr, TypeofExpr::UdpDport],
            data: TypeofExpr::CtZone,
        }),
    }
}

/// The maps and the set of the host table.
pub fn sets() -> [Set; 5] {
    [
        ports_map(),
        ports_ip_map(),
        mapped_set(),
        zones_map(),
        zones_ip_map(),
    ]
}

fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

fn chain(name: &str, base: Option<(ChainType, HookPoint, i32)>, comment: Option<&str>) -> Chain {
    Chain {
        name: name.into(),
        base: base.map(|(kind, hook, priority)| BaseChain {
            kind,
            hook,
            priority,
        }),
        comment: comment.map(str::to_string),
    }
}

fn rule(chain: &str, parts: Vec<Vec<Expr>>, comment: Option<&str>) -> Rule {
    Rule {
        chain: chain.into(),
        exprs: parts.into_iter().flatten().collect(),
        comment: comment.map(str::to_string),
    }
}

fn verdict(v: Verdict) -> Vec<Expr> {
    vec![Expr::Verdict(v)]
}

/// `meta l4proto . th dport` into `first` and `second`: a concatenated key is loaded into
/// consecutive 32-bit registers, as nft does.
fn proto_port_key(first: Register, second: Register) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: first,
        },
        load_th_dport(second),
    ]
}

/// Whether the host table is whole: the chains and rule counts its definition has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// No such table.
    Missing,
    /// The table exists but rules or chains are missing or extra (e.g. `nft flush table`).
    Damaged(String),
}

/// Base chains and maps, parameterised by the table name and the bridge they serve.
pub struct Layout<'a> {
    pub table: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Network,
}

impl Layout<'_> {
    pub fn table_ref(&self) -> TableRef {
        host_table(self.table)
    }

    /// The whole table definition (chains, maps, rules, no elements).
    pub fn table_definition(&self) -> Result<Batch, NftError> {
        let (br, net, t) = (self.bridge, self.subnet, self.table_ref());
        let loopback: Ipv4Network = Ipv4Network::new(Ipv4Addr::new(127, 0, 0, 0), 8)
            .map_err(|e| NftError::invalid(e.to_string()))?;
        let mut b = Batch::new();
        b.push(Op::AddTable(t.clone()));
        for c in [
            chain(
                "guard",
                Some((ChainType::Filter, HookPoint::Prerouting, PRIO_RAW)),
                Some(GUARD_COMMENT),
            ),
            chain(
                "zone_out",
                Some((ChainType::Filter, HookPoint::Output, PRIO_RAW)),
                Some(ZONE_COMMENT),
            ),
            chain("udp_zone", None, None),
            chain(
                "prerouting",
                Some((ChainType::Nat, HookPoint::Prerouting, PRIO_DSTNAT)),
                None,
            ),
            chain(
                "output",
                Some((ChainType::Nat, HookPoint::Output, -100)),
                None,
            ),
            chain("dnat_ports", None, None),
            chain(
                "postrouting",
                Some((ChainType::Nat, HookPoint::Postrouting, PRIO_SRCNAT)),
                None,
            ),
            chain(
                "forward",
                Some((ChainType::Filter, HookPoint::Forward, PRIO_FILTER)),
                None,
            ),
        ] {
            b.push(Op::AddChain(t.clone(), c));
        }
        for s in sets() {
            b.push(Op::AddSet(t.clone(), s));
        }
        let out = |op| ifname(Iface::Out, op, br);
        let jump = || verdict(Verdict::Jump("dnat_ports".into()));
        let to_zone = || {
            // Every packet passes here, not only a flow's first: the protocol first, then the
            // route lookup, so TCP pays one compare.
            vec![
                l4proto(IPPROTO_UDP),
                fib_daddr_local(),
                verdict(Verdict::Jump("udp_zone".into())),
            ]
        };
        let rules = [
            rule(
                "guard",
                vec![
                    ifname(Iface::In, CmpOp::NotEqual, "lo")?,
                    ip_addr(Addr::Daddr, loopback),
                    proto_port_key(Register::Reg1, Register::Reg32_01),
                    vec![
                        Expr::Lookup {
                            set: "mapped".into(),
                            sreg: Register::Reg1,
                            dreg: None,
                        },
                        Expr::Counter,
                    ],
                    verdict(Verdict::Drop),
                ],
                None,
            ),
            // The guard's chain (same hook and priority): one base chain less for every packet.
            rule("guard", to_zone(), None),
            rule("zone_out", to_zone(), None),
            rule(
                "udp_zone",
                vec![
                    l4proto(IPPROTO_UDP),
                    vec![
                        load_ip_daddr(Register::Reg1),
                        load_th_dport(Register::Reg32_01),
                    ],
                    zone_via("zones_ip"),
                ],
                None,
            ),
            rule(
                "udp_zone",
                vec![
                    l4proto(IPPROTO_UDP),
                    vec![load_th_dport(Register::Reg1)],
                    zone_via("zones"),
                ],
                None,
            ),
            rule(
                "prerouting",
                vec![
                    fib_daddr_local(),
                    l4proto_in(&[IPPROTO_TCP, IPPROTO_UDP]),
                    jump(),
                ],
                None,
            ),
            rule(
                "output",
                vec![
                    fib_daddr_local(),
                    l4proto_in(&[IPPROTO_TCP, IPPROTO_UDP]),
                    jump(),
                ],
                None,
            ),
            rule(
                "dnat_ports",
                vec![
                    vec![load_ip_daddr(Register::Reg1)],
                    proto_port_key(Register::Reg32_01, Register::Reg32_02),
                    dnat_via("ports_ip"),
                ],
                None,
            ),
            rule(
                "dnat_ports",
                vec![
                    proto_port_key(Register::Reg1, Register::Reg32_01),
                    dnat_via("ports"),
                ],
                None,
            ),
            rule(
                "postrouting",
                vec![
                    out(CmpOp::Equal)?,
                    ip_addr(Addr::Saddr, loopback),
                    vec![Expr::Masquerade],
                ],
                Some("host to 127.0.0.1:hostPort"),
            ),
            rule(
                "postrouting",
                vec![
                    out(CmpOp::Equal)?,
                    ip_addr(Addr::Saddr, net),
                    ct_any(CtKey::Status, CT_STATUS_DNAT),
                    vec![Expr::Masquerade],
                ],
                Some("hairpin: container to a host port"),
            ),
            rule(
                "postrouting",
                vec![
                    ip_addr(Addr::Saddr, net),
                    out(CmpOp::NotEqual)?,
                    vec![Expr::Masquerade],
                ],
                Some("egress"),
            ),
            rule(
                "forward",
                vec![
                    out(CmpOp::Equal)?,
                    ct_any(CtKey::State, CT_ESTABLISHED | CT_RELATED),
                    verdict(Verdict::Accept),
                ],
                None,
            ),
            rule(
                "forward",
                vec![
                    out(CmpOp::Equal)?,
                    ct_any(CtKey::Status, CT_STATUS_DNAT),
                    verdict(Verdict::Accept),
                ],
                None,
            ),
            rule(
                "forward",
                vec![
                    ifname(Iface::In, CmpOp::Equal, br)?,
                    verdict(Verdict::Accept),
                ],
                None,
            ),
        ];
        for r in rules {
            b.push(Op::AddRule(t.clone(), r));
        }
        Ok(b)
    }

    /// Replaces the table atomically with the definition plus every mapping in `records`
    /// (used when the table is missing or damaged, e.g. after a firewall reload or a flush, and
    /// by `shim reload`).
    pub fn rebuild<'r>(
        &self,
        records: impl IntoIterator<Item = &'r ContainerRecord>,
    ) -> Result<Batch, NftError> {
        let t = self.table_ref();
        let mut b = Batch::new();
        b.push(Op::AddTable(t.clone())).push(Op::DelTable(t));
        b.extend(self.table_definition()?);
        let mut by_set: BTreeMap<&'static str, BTreeSet<Element>> = BTreeMap::new();
        for r in records {
            if let Some(ip) = r.ip {
                for p in &r.ports {
                    for (set, e) in elements_of(ip, p) {
                        by_set.entry(set).or_default().insert(e);
                    }
                    by_set
                        .entry("mapped")
                        .or_default()
                        .insert(mapped_element(p));
                }
            }
        }
        for (set, elems) in by_set {
            b.push(Op::AddElements(
                self.table_ref(),
                set.into(),
                elems.into_iter().collect(),
            ));
        }
        Ok(b)
    }

    /// Rules per chain the definition has.
    pub fn expected_rules(&self) -> Result<BTreeMap<String, usize>, NftError> {
        let mut m = BTreeMap::new();
        for op in self.table_definition()?.ops {
            match op {
                Op::AddChain(_, c) => {
                    m.entry(c.name).or_insert(0);
                }
                Op::AddRule(_, r) => *m.entry(r.chain).or_insert(0) += 1,
                _ => {}
            }
        }
        Ok(m)
    }

    /// Compares a rule count of the table (`None`: no table) with the definition.
    pub fn health(&self, counts: Option<&BTreeMap<String, usize>>) -> Result<Health, NftError> {
        let Some(counts) = counts else {
            return Ok(Health::Missing);
        };
        let want = self.expected_rules()?;
        let mut wrong = Vec::new();
        for (chain, n) in &want {
            let have = counts.get(chain).copied().unwrap_or(0);
            if have != *n {
                wrong.push(format!("chain {chain} has {have} of {n} rules"));
            }
        }
        for (chain, n) in counts {
            if !want.contains_key(chain) {
                wrong.push(format!("unknown chain {chain} with {n} rules"));
            }
        }
        Ok(if wrong.is_empty() {
            Health::Ok
        } else {
            Health::Damaged(wrong.join(", "))
        })
    }
}

/// What the `guard` chain does, before conntrack.
const GUARD_COMMENT: &str = "drop packets for a mapped port sent to 127.0.0.0/8 from outside the host; UDP to a mapped port: its conntrack zone";
/// What `zone_out` does: why UDP to a mapped host port gets a zone.
const ZONE_COMMENT: &str = "UDP to a mapped host port: looked up in its mapping's conntrack zone, so no entry made before the mapping catches it";

/// `ct original zone set ... map @map`, the key already in register 1.
fn zone_via(map: &str) -> Vec<Expr> {
    vec![
        Expr::Lookup {
            set: map.into(),
            sreg: Register::Reg1,
            dreg: Some(Register::Reg1),
        },
        Expr::CtSetOriginalZone {
            sreg: Register::Reg1,
        },
    ]
}

fn dnat_via(map: &str) -> Vec<Expr> {
    vec![
        Expr::Lookup {
            set: map.into(),
            sreg: Register::Reg1,
            dreg: Some(Register::Reg1),
        },
        Expr::DnatIp {
            addr: Register::Reg1,
            proto: Register::Reg32_01,
        },
    ]
}

/// The map (`ports` or `ports_ip`) and element of one mapping to container address `ip`.
pub fn map_element(ip: Ipv4Addr, p: &PortRecord) -> (&'static str, Element) {
    let (set, mut e) = map_key(p);
    e.data = Some(vec![Field::Ipv4(ip), Field::Port(p.container_port)]);
    (set, e)
}

/// The map and key (no data) of a mapping: what identifies it for a delete.
fn map_key(p: &PortRecord) -> (&'static str, Element) {
    let pp = [
        Field::Proto(proto_num(p.protocol)),
        Field::Port(p.host_port),
    ];
    match p.host_ip {
        Some(hip) => (
            "ports_ip",
            Element {
                key: [&[Field::Ipv4(hip)][..], &pp].concat(),
                data: None,
            },
        ),
        None => (
            "ports",
            Element {
                key: pp.to_vec(),
                data: None,
            },
        ),
    }
}

/// The conntrack-zone element of a UDP mapping given a zone (`zones` or `zones_ip`).
fn zone_element(p: &PortRecord) -> Option<(&'static str, Element)> {
    let zone = p.ct_zone.filter(|_| p.protocol == Protocol::Udp)?;
    let port = Field::Port(p.host_port);
    let (set, key) = match p.host_ip {
        Some(hip) => ("zones_ip", vec![Field::Ipv4(hip), port]),
        None => ("zones", vec![port]),
    };
    Some((
        set,
        Element {
            key,
            data: Some(vec![Field::Zone(zone)]),
        },
    ))
}

/// The map elements of one mapping to container address `ip`: its DNAT element and, for UDP
/// with a zone, its zone element (the `mapped` set entry apart: it may be shared).
fn elements_of(ip: Ipv4Addr, p: &PortRecord) -> impl Iterator<Item = (&'static str, Element)> {
    std::iter::once(map_element(ip, p)).chain(zone_element(p))
}

/// The `mapped` element (protocol . host port) of a mapping.
pub fn mapped_element(p: &PortRecord) -> Element {
    Element {
        key: vec![
            Field::Proto(proto_num(p.protocol)),
            Field::Port(p.host_port),
        ],
        data: None,
    }
}

/// Adds one container's mappings (an empty batch if none).
pub fn add_elements(table: &str, ip: Ipv4Addr, ports: &[PortRecord]) -> Batch {
    let t = host_table(table);
    let mut by_set: BTreeMap<&'static str, Vec<Element>> = BTreeMap::new();
    for p in ports {
        for (set, e) in elements_of(ip, p) {
            by_set.entry(set).or_default().push(e);
        }
        by_set.entry("mapped").or_default().push(mapped_element(p));
    }
    let mut b = Batch::new();
    for (set, elems) in by_set {
        b.push(Op::AddElements(t.clone(), set.into(), elems));
    }
    b
}

/// Deletes one container's mappings, one batch per element (so a caller can retry one by one).
///
/// The `mapped` set entry (protocol . port) may be shared by mappings of other containers on
/// other host addresses; `still_mapped` says which of them must stay.
pub fn delete_elements(
    table: &str,
    ports: &[PortRecord],
    still_mapped: &dyn Fn(&PortRecord) -> bool,
) -> Vec<Batch> {
    let t = host_table(table);
    let one = |set: &str, e: Element| {
        let mut b = Batch::new();
        b.push(Op::DelElements(t.clone(), set.into(), vec![e]));
        b
    };
    let mut out = Vec::new();
    for p in ports {
        let (set, e) = map_key(p);
        out.push(one(set, e));
        if let Some((set, e)) = zone_element(p) {
            out.push(one(set, Element { data: None, ..e }));
        }
        if !still_mapped(p) {
            out.push(one("mapped", mapped_element(p)));
        }
    }
    out
}

/// Retires one container's mappings ([`Op::RetireElements`], kernels that
/// [`crate::kernel::nft::retires_elements`]): what [`delete_elements`] deletes, as one
/// transaction that frees nothing, so the hook does not wait out an RCU grace period. The map
/// elements carry their data: the kernel updates an element only if it matches.
pub fn retire_elements(
    table: &str,
    ip: Ipv4Addr,
    ports: &[PortRecord],
    still_mapped: &dyn Fn(&PortRecord) -> bool,
) -> Batch {
    let t = host_table(table);
    let mut by_set: BTreeMap<&'static str, Vec<Element>> = BTreeMap::new();
    for p in ports {
        for (set, e) in elements_of(ip, p) {
            by_set.entry(set).or_default().push(e);
        }
        if !still_mapped(p) {
            by_set.entry("mapped").or_default().push(mapped_element(p));
        }
    }
    let mut b = Batch::new();
    for (set, elems) in by_set {
        b.push(Op::RetireElements(t.clone(), set.into(), elems));
    }
    b
}

/// Several batches as one transaction.
pub fn concat(batches: &[Batch]) -> Batch {
    let mut b = Batch::new();
    for x in batches {
        b.extend(x.clone());
    }
    b
}

/// Deletes the whole table, whether it exists or not (for `shim reset`).
pub fn delete_table(table: &str) -> Batch {
    let t = host_table(table);
    let mut b = Batch::new();
    b.push(Op::AddTable(t.clone())).push(Op::DelTable(t));
    b
}

/// How an element reads in `nft list` (`tcp . 8080 : 10.213.0.2 . 80`).
pub fn describe(e: &Element) -> String {
    e.to_string()
}

/// What `shim gc` changes so the maps and the set hold exactly the ledger's mappings: elements
/// no record knows (a setup killed between its transaction and storing its record) are deleted,
/// elements a record needs and the kernel lacks are added back. `listed` is each set's elements.
pub fn reconcile<'r>(
    table: &str,
    listed: &[(Set, Vec<Element>)],
    records: impl IntoIterator<Item = &'r ContainerRecord>,
) -> (Batch, Vec<String>) {
    let mut want: BTreeMap<String, BTreeSet<Element>> = BTreeMap::new();
    for r in records {
        if let Some(ip) = r.ip {
            for p in &r.ports {
                for (set, e) in elements_of(ip, p) {
                    want.entry(set.into()).or_default().insert(e);
                }
                want.entry("mapped".into())
                    .or_default()
                    .insert(mapped_element(p));
            }
        }
    }
    let t = host_table(table);
    let (mut b, mut report) = (Batch::new(), Vec::new());
    for (set, have) in listed {
        let have: BTreeSet<&Element> = have.iter().collect();
        let wanted = want.remove(&set.name).unwrap_or_default();
        let stray: Vec<Element> = have
            .iter()
            .filter(|e| !wanted.contains(**e))
            .map(|e| (*e).clone())
            .collect();
        let lacking: Vec<Element> = wanted
            .iter()
            .filter(|e| !have.contains(e))
            .cloned()
            .collect();
        for e in &stray {
            report.push(format!(
                "deleted stray element {} {{ {} }}",
                set.name,
                describe(e)
            ));
        }
        for e in &lacking {
            report.push(format!(
                "restored element {} {{ {} }}",
                set.name,
                describe(e)
            ));
        }
        if !stray.is_empty() {
            // A map element is deleted by key; a wrong one is then added back right.
            let keys = stray
                .into_iter()
                .map(|e| Element {
                    key: e.key,
                    data: None,
                })
                .collect();
            b.push(Op::DelElements(t.clone(), set.name.clone(), keys));
        }
        if !lacking.is_empty() {
            b.push(Op::AddElements(t.clone(), set.name.clone(), lacking));
        }
    }
    (b, report)
}

/// The table netshim puts inside a task's own network namespace.
pub const TASK_TABLE: &str = "netshim_task";

/// Instance-metadata addresses a task must not reach unless allowed.
pub const METADATA_V4: [Ipv4Addr; 2] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(100, 100, 100, 200),
];
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The firewall inside a task's netns: metadata blocked (unless `allow_metadata`), and with
/// `ingress` rules, new inbound connections dropped unless a rule admits them. `None` when
/// there is nothing to enforce. Replaces any earlier version of the table atomically.
pub fn task_batch(
    ingress: Option<&[IngressRule]>,
    allow_metadata: bool,
) -> Result<Option<Batch>, NftError> {
    if ingress.is_none() && allow_metadata {
        return Ok(None);
    }
    let t = TableRef::new(Family::Inet, TASK_TABLE);
    let mut b = Batch::new();
    b.push(Op::AddTable(t.clone()))
        .push(Op::DelTable(t.clone()))
        .push(Op::AddTable(t.clone()));
    let mut rules = Vec::new();
    if !allow_metadata {
        b.push(Op::AddChain(
            t.clone(),
            chain(
                "output",
                Some((ChainType::Filter, HookPoint::Output, PRIO_FILTER)),
                None,
            ),
        ));
        rules.push(rule(
            "output",
            vec![
                nfproto(NFPROTO_IPV4),
                ip_daddr_in(&METADATA_V4),
                verdict(Verdict::Drop),
            ],
            None,
        ));
        rules.push(rule(
            "output",
            vec![
                nfproto(NFPROTO_IPV6),
                ip6_daddr(METADATA_V6),
                verdict(Verdict::Drop),
            ],
            None,
        ));
    }
    if let Some(ingress) = ingress {
        b.push(Op::AddChain(
            t.clone(),
            chain(
                "input",
                Some((ChainType::Filter, HookPoint::Input, PRIO_FILTER)),
                None,
            ),
        ));
        rules.push(rule(
            "input",
            vec![
                ct_any(CtKey::State, CT_ESTABLISHED | CT_RELATED),
                verdict(Verdict::Accept),
            ],
            None,
        ));
        rules.push(rule(
            "input",
            vec![
                ifname(Iface::In, CmpOp::Equal, "lo")?,
                verdict(Verdict::Accept),
            ],
            None,
        ));
        for r in ingress {
            let src = match r.cidr {
                IpNetwork::V4(n) => [nfproto(NFPROTO_IPV4), ip_addr(Addr::Saddr, n)].concat(),
                IpNetwork::V6(n) => [nfproto(NFPROTO_IPV6), ip6_addr(Addr::Saddr, n)].concat(),
            };
            rules.push(rule(
                "input",
                vec![
                    src,
                    l4proto(proto_num(r.protocol)),
                    dport(r.ports.start, r.ports.end),
                    verdict(Verdict::Accept),
                ],
                None,
            ));
        }
        rules.push(rule(
            "input",
            vec![ct_any(CtKey::State, CT_NEW), verdict(Verdict::Drop)],
            None,
        ));
    }
    for r in rules {
        b.push(Op::AddRule(t.clone(), r));
    }
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NetworkMode;

    fn rec(proto: Protocol, host: u16, hip: Option<Ipv4Addr>) -> PortRecord {
        PortRecord {
            protocol: proto,
            container_port: 80,
            host_port: host,
            host_ip: hip,
            name: None,
            dynamic: false,
            ct_zone: None,
        }
    }

    fn layout() -> Layout<'static> {
        Layout {
            table: "netshim",
            bridge: "br7",
            subnet: "10.7.0.0/16".parse().unwrap(),
        }
    }

    fn container(ip: Ipv4Addr, ports: Vec<PortRecord>) -> ContainerRecord {
        let mut r = ContainerRecord::new("a", NetworkMode::Bridge);
        r.ip = Some(ip);
        r.bridge = Some("br7".into());
        r.ports = ports;
        r
    }

    fn elements_of(b: &Batch) -> Vec<(String, String)> {
        b.ops
            .iter()
            .flat_map(|op| match op {
                Op::AddElements(_, s, es) | Op::DelElements(_, s, es) => {
                    es.iter().map(|e| (s.clone(), describe(e))).collect()
                }
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn elements_are_keyed_by_protocol_and_port() {
        let b = add_elements(
            "netshim",
            Ipv4Addr::new(10, 213, 0, 2),
            &[
                rec(Protocol::Tcp, 8080, None),
                rec(Protocol::Udp, 53, Some(Ipv4Addr::LOCALHOST)),
            ],
        );
        let e = elements_of(&b);
        assert!(e.contains(&("ports".into(), "tcp . 8080 : 10.213.0.2 . 80".into())));
        assert!(e.contains(&(
            "ports_ip".into(),
            "127.0.0.1 . udp . 53 : 10.213.0.2 . 80".into()
        )));
        assert!(e.contains(&("mapped".into(), "udp . 53".into())));
        assert!(e.contains(&("mapped".into(), "tcp . 8080".into())));
        assert_eq!(e.len(), 4);
        assert!(add_elements("netshim", Ipv4Addr::LOCALHOST, &[]).is_empty());
    }

    #[test]
    fn delete_keeps_shared_guard_entries() {
        let d = delete_elements(
            "netshim",
            &[rec(Protocol::Tcp, 8080, Some(Ipv4Addr::LOCALHOST))],
            &|_| true,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(
            elements_of(&d[0]),
            vec![("ports_ip".to_string(), "127.0.0.1 . tcp . 8080".to_string())]
        );
        let d = delete_elements("netshim", &[rec(Protocol::Tcp, 8080, None)], &|_| false);
        assert_eq!(d.len(), 2);
        assert_eq!(concat(&d).ops.len(), 2);
    }

    #[test]
    fn task_table_blocks_metadata_and_admits_only_listed_sources() {
        assert_eq!(task_batch(None, true).unwrap(), None);
        let rules = crate::request::parse_ingress(r#"[{"protocol":"tcp","port":80,"cidr":"10.0.1.50/32"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"}]"#).unwrap();
        let b = task_batch(Some(&rules), false).unwrap().unwrap();
        let chain_rules = |c: &str| -> Vec<Rule> {
            b.ops
                .iter()
                .filter_map(|op| match op {
                    Op::AddRule(_, r) if r.chain == c => Some(r.clone()),
                    _ => None,
                })
                .collect()
        };
        let out = chain_rules("output");
        assert_eq!(out.len(), 2);
        // IPv4: both metadata addresses dropped; IPv6: fd00:ec2::254 dropped.
        let v4: Vec<crate::kernel::nft::Field> = METADATA_V4
            .iter()
            .map(|a| crate::kernel::nft::Field::Ipv4(*a))
            .collect();
        assert!(
            out[0]
                .exprs
                .iter()
                .any(|e| matches!(e, Expr::LookupAnon { elements, .. } if *elements == v4)),
            "{:?}",
            out[0]
        );
        let v6 = ip6_daddr(METADATA_V6);
        assert!(
            out[1].exprs.windows(v6.len()).any(|w| w == v6.as_slice()),
            "{:?}",
            out[1]
        );
        for r in &out {
            assert_eq!(r.exprs.last(), Some(&Expr::Verdict(Verdict::Drop)), "{r:?}");
        }
        let input = chain_rules("input");
        // established, lo, two listed sources, then new connections dropped.
        assert_eq!(input.len(), 5);
        let udp_range = &input[3].exprs;
        assert!(udp_range.contains(&Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::GreatherThanEqual,
            data: 8000u16.to_be_bytes().to_vec()
        }));
        assert!(udp_range.contains(&Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::LessThanEqual,
            data: 8010u16.to_be_bytes().to_vec()
        }));
        assert_eq!(input[4].exprs.last(), Some(&Expr::Verdict(Verdict::Drop)));
        let only_meta = task_batch(None, false).unwrap().unwrap();
        assert!(
            !only_meta
                .ops
                .iter()
                .any(|op| matches!(op, Op::AddChain(_, c) if c.name == "input"))
        );
    }

    #[test]
    fn definition_has_every_chain_and_a_constant_number_of_rules() {
        let want = layout().expected_rules().unwrap();
        let v: Vec<(&str, usize)> = want.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            v,
            [
                ("dnat_ports", 2),
                ("forward", 3),
                ("guard", 2),
                ("output", 1),
                ("postrouting", 3),
                ("prerouting", 1),
                ("udp_zone", 2),
                ("zone_out", 1)
            ]
        );
        // A hostile bridge name is bytes in a comparison, or refused when it cannot be one.
        let l = Layout {
            table: "netshim",
            bridge: "bx0\"#",
            subnet: "10.7.0.0/16".parse().unwrap(),
        };
        assert!(l.table_definition().is_ok());
        let l = Layout {
            table: "netshim",
            bridge: "a-name-too-long-for-a-link",
            subnet: "10.7.0.0/16".parse().unwrap(),
        };
        assert!(l.table_definition().is_err());
    }

    #[test]
    fn health_tells_a_flushed_table_from_a_whole_one() {
        let l = layout();
        assert_eq!(l.health(None).unwrap(), Health::Missing);
        let whole = l.expected_rules().unwrap();
        assert_eq!(l.health(Some(&whole)).unwrap(), Health::Ok);
        let flushed = BTreeMap::new();
        assert!(
            matches!(l.health(Some(&flushed)).unwrap(), Health::Damaged(m) if m.contains("chain dnat_ports has 0 of 2"))
        );
        let mut extra = whole.clone();
        extra.insert("mine".into(), 1);
        assert!(matches!(
            l.health(Some(&extra)).unwrap(),
            Health::Damaged(_)
        ));
    }

    #[test]
    fn rebuild_replaces_the_table_and_restores_every_mapping() {
        let r = container(
            Ipv4Addr::new(10, 7, 0, 2),
            vec![
                rec(Protocol::Tcp, 8080, None),
                rec(Protocol::Tcp, 8080, Some(Ipv4Addr::LOCALHOST)),
            ],
        );
        let b = layout().rebuild([&r]).unwrap();
        assert!(matches!(&b.ops[0], Op::AddTable(_)));
        assert!(matches!(&b.ops[1], Op::DelTable(_)));
        let e = elements_of(&b);
        // The shared guard entry appears once.
        assert_eq!(e.iter().filter(|(s, _)| s == "mapped").count(), 1);
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn table_names_follow_the_bridge() {
        assert_eq!(table_name("netshim0"), "netshim");
        assert_eq!(table_name("br-b"), "netshim_br-b");
    }

    #[test]
    fn reconcile_deletes_strays_and_restores_what_is_lacking() {
        let ip = Ipv4Addr::new(10, 7, 0, 2);
        let known = rec(Protocol::Tcp, 8080, None);
        let lost = rec(Protocol::Udp, 53, None);
        let r = container(ip, vec![known.clone(), lost.clone()]);
        let stray = rec(Protocol::Tcp, 9090, None);
        let (_, k) = map_element(ip, &known);
        let (_, s) = map_element(Ipv4Addr::new(10, 7, 0, 9), &stray);
        let listed = vec![
            (ports_map(), vec![k, s]),
            (ports_ip_map(), vec![]),
            (
                mapped_set(),
                vec![
                    mapped_element(&known),
                    mapped_element(&stray),
                    mapped_element(&lost),
                ],
            ),
        ];
        let (b, report) = reconcile("netshim", &listed, [&r]);
        assert_eq!(report.len(), 3, "{report:?}");
        assert!(
            report.contains(
                &"deleted stray element ports { tcp . 9090 : 10.7.0.9 . 80 }".to_string()
            )
        );
        assert!(report.contains(&"deleted stray element mapped { tcp . 9090 }".to_string()));
        assert!(
            report.contains(&"restored element ports { udp . 53 : 10.7.0.2 . 80 }".to_string())
        );
        assert_eq!(b.ops.len(), 3);
        // Nothing to do when the kernel matches the ledger.
        let (_, l) = map_element(ip, &lost);
        let (_, k) = map_element(ip, &known);
        let listed = vec![
            (ports_map(), vec![k, l]),
            (ports_ip_map(), vec![]),
            (
                mapped_set(),
                vec![mapped_element(&known), mapped_element(&lost)],
            ),
        ];
        let (b, report) = reconcile("netshim", &listed, [&r]);
        assert!(b.is_empty() && report.is_empty(), "{report:?}");
    }

    /// The task table (metadata block and ingress) as netlink builds it equals the nft text it
    /// replaces, compared through `nft -j list` in two private namespaces.
    #[test]
    #[cfg_attr(not(root), ignore = "needs root: ./test.sh runs it as root")]
    fn task_table_matches_the_nft_text_it_replaces() {
        use crate::kernel::nft::{Nft, in_private_netns, nft_cli};
        let strip = |s: String| -> String {
            s.lines()
                .map(|l| {
                    // Handles differ; everything else must not.
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    fn norm(v: &mut serde_json::Value) {
                        match v {
                            serde_json::Value::Object(m) => {
                                m.remove("handle");
                                m.remove("metainfo");
                                m.values_mut().for_each(norm);
                                if let Some(serde_json::Value::Array(a)) = m.get_mut("set") {
                                    a.sort_by_key(|x| x.to_string());
                                }
                            }
                            serde_json::Value::Array(a) => a.iter_mut().for_each(norm),
                            _ => {}
                        }
                    }
                    norm(&mut v);
                    v.to_string()
                })
                .collect()
        };
        let rules = crate::request::parse_ingress(r#"[{"protocol":"tcp","port":80,"cidr":"10.0.1.50/32"},{"protocol":"udp","portRange":"8000-8010","cidr":"fd00::/8"},{"protocol":"tcp","port":22,"cidr":"0.0.0.0/0"}]"#).unwrap();
        let ours = in_private_netns(|| {
            let b = task_batch(Some(&rules), false).unwrap().unwrap();
            Nft::open().unwrap().apply(&b).unwrap();
            // Applying again replaces the table (no duplicate rules).
            Nft::open().unwrap().apply(&b).unwrap();
            nft_cli(&["-j", "list", "table", "inet", TASK_TABLE], None)
        });
        let text = "table inet netshim_task {
	chain output {
		type filter hook output priority filter; policy accept;
		ip daddr { 169.254.169.254, 100.100.100.200 } drop
		ip6 daddr fd00:ec2::254 drop
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
		iifname \"lo\" accept
		ip saddr 10.0.1.50/32 tcp dport 80 accept
		ip6 saddr fd00::/8 udp dport 8000-8010 accept
		ip saddr 0.0.0.0/0 tcp dport 22 accept
		ct state new drop
	}
}
";
        let old = in_private_netns(|| {
            nft_cli(&["-f", "-"], Some(text));
            nft_cli(&["-j", "list", "table", "inet", TASK_TABLE], None)
        });
        assert_eq!(strip(ours), strip(old));
    }

    /// Benchmark, not a check: one mapping's add and delete transactions (a `ports` element and
    /// its `mapped` entry each), timed over many rounds in a private netns. Run with
    /// `cargo test --release --bin shim -- --ignored --nocapture transaction_cost` (root).
    #[test]
    #[ignore]
    fn transaction_cost() {
        use crate::kernel::nft::{Nft, TableRef, in_private_netns};
        use crate::state::PortRecord;
        use crate::types::Protocol;
        in_private_netns(|| {
            let l = Layout {
                table: "netshim",
                bridge: "netshim0",
                subnet: "10.213.0.0/16".parse().unwrap(),
            };
            let mut n = Nft::open().unwrap();
            n.apply(&l.table_definition().unwrap()).unwrap();
            for preload in [0u16, 1000] {
                let filler: Vec<PortRecord> = (0..preload)
                    .map(|i| PortRecord {
                        protocol: Protocol::Tcp,
                        container_port: 80,
                        host_port: 20000 + i,
                        host_ip: None,
                        name: None,
                        dynamic: true,
                        ct_zone: None,
                    })
                    .collect();
                n.apply(&add_elements("netshim", [10, 213, 1, 1].into(), &filler))
                    .unwrap();
                let p = [PortRecord {
                    protocol: Protocol::Tcp,
                    container_port: 80,
                    host_port: 40000,
                    host_ip: None,
                    name: None,
                    dynamic: true,
                    ct_zone: None,
                }];
                let add = add_elements("netshim", [10, 213, 0, 2].into(), &p);
                let del = concat(&delete_elements("netshim", &p, &|_| false));
                let rounds = 2000;
                let (mut ta, mut td) = (0u128, 0u128);
                for _ in 0..rounds {
                    let t0 = std::time::Instant::now();
                    n.apply(&add).unwrap();
                    let t1 = std::time::Instant::now();
                    n.apply(&del).unwrap();
                    ta += (t1 - t0).as_nanos();
                    td += t1.elapsed().as_nanos();
                }
                println!(
                    "netlink, {preload} elements present: add {:.1} µs, delete {:.1} µs (mean of {rounds})",
                    ta as f64 / rounds as f64 / 1000.0,
                    td as f64 / rounds as f64 / 1000.0
                );
                let t = TableRef::new(Family::Ip, "netshim");
                let check = std::time::Instant::now();
                for _ in 0..rounds {
                    n.rule_counts(&t).unwrap();
                }
                println!(
                    "netlink, {preload} elements present: rule dump (health check) {:.1} µs",
                    check.elapsed().as_nanos() as f64 / rounds as f64 / 1000.0
                );
                let open = std::time::Instant::now();
                for _ in 0..rounds {
                    let _ = Nft::open().unwrap();
                }
                println!(
                    "netlink socket open: {:.1} µs",
                    open.elapsed().as_nanos() as f64 / rounds as f64 / 1000.0
                );
            }
        });
    }
}
