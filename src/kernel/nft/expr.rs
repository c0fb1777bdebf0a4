//! nf_tables rule expressions, typed, and their netlink encoding.
//!
//! `netlink-packet-netfilter` gives meta, payload, cmp, bitwise, lookup and immediate; the rest
//! (fib, ct, nat, masq, counter, the accept/drop verdict codes) is encoded here as the kernel's
//! uapi defines it (`linux/netfilter/nf_tables.h`), checked against `nft --debug=netlink`.
//! The statement helpers at the end compile a match the way nft does (same registers, same
//! prefix and range forms), so `nft list` shows the rules as if written in nft syntax.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_core::DefaultNla;
use netlink_packet_netfilter::nftables::{
    Bitwise, Cmp, DataAttribute, ExpressionAttribute, Expressions, Immediate, ListAttribute,
    Lookup, Meta, Payload, Verdict as NlVerdict, VerdictAttribute,
};

pub use netlink_packet_netfilter::nftables::{MetaKey, Operator as CmpOp, Register};

use super::NftError;

/// Where a payload load starts (`enum nft_payload_bases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Network = 1,
    Transport = 2,
}

/// Conntrack keys netshim reads (`enum nft_ct_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtKey {
    State = 0,
    Status = 2,
}

/// `ct state` bits (`NF_CT_STATE_BIT(IP_CT_*)`).
pub const CT_ESTABLISHED: u32 = 1 << 1;
pub const CT_RELATED: u32 = 1 << 2;
pub const CT_NEW: u32 = 1 << 3;
/// `ct status dnat` (`IPS_DST_NAT`).
pub const CT_STATUS_DNAT: u32 = 1 << 5;

/// `meta nfproto` values.
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
/// `meta l4proto` values.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The value types of set keys and map data (nft's datatype ids, which `nft list` uses to
/// print elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Ipv4Addr,
    InetProto,
    InetService,
    /// `ct zone`: a 16-bit integer in host byte order (nft's `integer` type; a set with it
    /// says so in its [`Typeof`]).
    CtZone,
}

impl DataType {
    fn id(self) -> u32 {
        match self {
            DataType::Ipv4Addr => 7,
            DataType::InetProto => 12,
            DataType::InetService => 13,
            DataType::CtZone => 4,
        }
    }
    fn len(self) -> usize {
        match self {
            DataType::Ipv4Addr => 4,
            DataType::InetProto => 1,
            DataType::InetService => 2,
            DataType::CtZone => 2,
        }
    }
}

/// Type id and byte length of a key or data of `fields`: one field is itself; a concatenation
/// packs 6 bits of type per field and pads each field to 4 bytes (nft's `concat_type_alloc`).
pub fn type_of(fields: &[DataType]) -> (u32, u32) {
    if let [one] = fields {
        return (one.id(), one.len() as u32);
    }
    let id = fields.iter().fold(0u32, |t, f| (t << 6) | f.id());
    let len = fields
        .iter()
        .map(|f| f.len().div_ceil(4) * 4)
        .sum::<usize>();
    (id, len as u32)
}

/// One field of a set element's key or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Ipv4(Ipv4Addr),
    Proto(u8),
    Port(u16),
    /// A conntrack zone (host byte order).
    Zone(u16),
}

impl Field {
    fn bytes(self) -> Vec<u8> {
        match self {
            Field::Ipv4(a) => a.octets().to_vec(),
            Field::Proto(p) => vec![p],
            Field::Port(p) => p.to_be_bytes().to_vec(),
            Field::Zone(z) => z.to_ne_bytes().to_vec(),
        }
    }
}

/// The bytes of a key or data made of `fields` (padded per field when concatenated).
pub fn encode_fields(fields: &[Field]) -> Vec<u8> {
    let concat = fields.len() > 1;
    let mut out = Vec::new();
    for f in fields {
        let mut b = f.bytes();
        if concat {
            b.resize(b.len().div_ceil(4) * 4, 0);
        }
        out.extend_from_slice(&b);
    }
    out
}

/// Reads back `bytes` as fields of `types`; `None` if the length does not fit.
pub fn decode_fields(types: &[DataType], bytes: &[u8]) -> Option<Vec<Field>> {
    let concat = types.len() > 1;
    let mut off = 0;
    let mut out = Vec::with_capacity(types.len());
    for t in types {
        let b = bytes.get(off..off + t.len())?;
        out.push(match t {
            DataType::Ipv4Addr => Field::Ipv4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            DataType::InetProto => Field::Proto(b[0]),
            DataType::InetService => Field::Port(u16::from_be_bytes([b[0], b[1]])),
            DataType::CtZone => Field::Zone(u16::from_ne_bytes([b[0], b[1]])),
        });
        off += if concat {
            t.len().div_ceil(4) * 4
        } else {
            t.len()
        };
    }
    (off == bytes.len()).then_some(out)
}

/// A rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
}

/// One expression of a rule, at the level of `nft --debug=netlink`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `[ meta load KEY => reg ]`
    Meta { key: MetaKey, dreg: Register },
    /// `[ payload load LEN @ BASE + OFFSET => reg ]`
    Payload {
        base: Base,
        offset: u32,
        len: u32,
        dreg: Register,
    },
    /// `[ cmp OP reg DATA ]`
    Cmp {
        sreg: Register,
        op: CmpOp,
        data: Vec<u8>,
    },
    /// `[ bitwise reg = (reg & MASK) ^ XOR ]`
    Bitwise {
        reg: Register,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `[ lookup reg set NAME (dreg) ]`: a named set or map of the same table.
    Lookup {
        set: String,
        sreg: Register,
        dreg: Option<Register>,
    },
    /// A lookup in an anonymous constant set (`{ a, b }` in nft syntax), created with the rule.
    LookupAnon {
        key: DataType,
        sreg: Register,
        elements: Vec<Field>,
    },
    /// `[ ct load KEY => reg ]`
    Ct { key: CtKey, dreg: Register },
    /// `[ ct set zone with reg , dir original ]`: a packet without a conntrack entry yet is
    /// looked up (and its entry created) in that zone, original direction only, so its replies
    /// match as ever (`ct original zone set`; needs a chain before conntrack, priority raw).
    CtSetOriginalZone { sreg: Register },
    /// `[ fib daddr type => reg ]`
    FibDaddrType { dreg: Register },
    /// `[ nat dnat ip addr_min reg proto_min reg ]`
    DnatIp { addr: Register, proto: Register },
    /// `[ masq ]`
    Masquerade,
    /// `[ counter ]`
    Counter,
    /// `[ immediate reg 0 VERDICT ]`
    Verdict(Verdict),
}

// Attribute numbers of the expressions the crate does not have (nf_tables.h).
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_DIRECTION: u16 = 3;
const NFTA_CT_SREG: u16 = 4;
const NFT_CT_ZONE: u32 = 17;
const IP_CT_DIR_ORIGINAL: u8 = 0;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFT_NAT_DNAT: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// `RTN_LOCAL`, the route type `fib daddr type local` compares with.
const RTN_LOCAL: u32 = 2;

fn be32(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

fn other(name: &str, attributes: Vec<DefaultNla>) -> Expressions {
    Expressions::Other {
        expression_type: name.to_string(),
        attributes,
    }
}

impl Expr {
    /// The netlink form; `anon_set` names the anonymous set a [`Expr::LookupAnon`] refers to
    /// (its name template and transaction id).
    pub(super) fn encode(&self, anon_set: Option<u32>) -> ListAttribute<ExpressionAttribute> {
        let reg = |r: Register| u32::from(r);
        let ex = match self {
            Expr::Meta { key, dreg } => {
                Expressions::Meta(vec![Meta::Key(*key), Meta::DestinationRegister(*dreg)])
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => Expressions::Payload(vec![
                Payload::DestinationRegister(*dreg),
                Payload::Base(*base as u32),
                Payload::Offset(*offset),
                Payload::Len(*len),
            ]),
            Expr::Cmp { sreg, op, data } => Expressions::Cmp(vec![
                Cmp::SourceRegister(*sreg),
                Cmp::Op(*op),
                Cmp::Data(DataAttribute::Value(data.clone())),
            ]),
            Expr::Bitwise { reg, mask, xor } => Expressions::Bitwise(vec![
                Bitwise::SourceRegister(*reg),
                Bitwise::DestinationRegister(*reg),
                Bitwise::Length(mask.len() as u32),
                Bitwise::Mask(DataAttribute::Value(mask.clone())),
                Bitwise::Xor(DataAttribute::Value(xor.clone())),
            ]),
            Expr::Lookup { set, sreg, dreg } => {
                let mut l = vec![Lookup::SourceRegister(*sreg)];
                if let Some(d) = dreg {
                    l.push(Lookup::DestinationRegister(*d));
                }
                l.push(Lookup::Set(set.clone()));
                Expressions::Lookup(l)
            }
            Expr::LookupAnon { sreg, .. } => {
                let mut l = vec![
                    Lookup::SourceRegister(*sreg),
                    Lookup::Set(super::ANON_SET.to_string()),
                ];
                if let Some(id) = anon_set {
                    l.push(Lookup::SetId(id));
                }
                Expressions::Lookup(l)
            }
            Expr::Ct { key, dreg } => other(
                "ct",
                vec![
                    be32(NFTA_CT_KEY, *key as u32),
                    be32(NFTA_CT_DREG, reg(*dreg)),
                ],
            ),
            Expr::CtSetOriginalZone { sreg } => other(
                "ct",
                vec![
                    be32(NFTA_CT_KEY, NFT_CT_ZONE),
                    DefaultNla::new(NFTA_CT_DIRECTION, vec![IP_CT_DIR_ORIGINAL]),
                    be32(NFTA_CT_SREG, reg(*sreg)),
                ],
            ),
            Expr::FibDaddrType { dreg } => other(
                "fib",
                vec![
                    be32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR),
                    be32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
                    be32(NFTA_FIB_DREG, reg(*dreg)),
                ],
            ),
            Expr::DnatIp { addr, proto } => other(
                "nat",
                vec![
                    be32(NFTA_NAT_TYPE, NFT_NAT_DNAT),
                    be32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4)),
                    be32(NFTA_NAT_REG_ADDR_MIN, reg(*addr)),
                    be32(NFTA_NAT_REG_PROTO_MIN, reg(*proto)),
                ],
            ),
            Expr::Masquerade => other("masq", vec![]),
            Expr::Counter => other("counter", vec![]),
            Expr::Verdict(v) => {
                let code = match v {
                    Verdict::Accept => VerdictAttribute::Code(NlVerdict::Other(NF_ACCEPT)),
                    Verdict::Drop => VerdictAttribute::Code(NlVerdict::Other(NF_DROP)),
                    Verdict::Jump(_) => VerdictAttribute::Code(NlVerdict::Jump),
                };
                let mut data = vec![code];
                if let Verdict::Jump(chain) = v {
                    data.push(VerdictAttribute::Chain(chain.clone()));
                }
                Expressions::Immediate(vec![
                    Immediate::DestinationRegister(Register::Verdict),
                    Immediate::Data(DataAttribute::Verdict(data)),
                ])
            }
        };
        ListAttribute::from(ex)
    }
}

/// Userdata TLVs (libnftnl's `nftnl_udata`): type, length, value.
pub(super) fn udata(kind: u8, text: &str) -> Result<Vec<u8>, NftError> {
    if text.len() > 254 {
        return Err(NftError::invalid(format!(
            "comment longer than 254 bytes: {text:?}"
        )));
    }
    if text.contains('\0') {
        return Err(NftError::invalid("comment contains a NUL byte".into()));
    }
    Ok(tlv(kind, &[text.as_bytes(), &[0]].concat()))
}

/// What a set's key or data was declared from in nft's `typeof` syntax. The kernel ignores it
/// (it is userdata); `nft list` reads it to print the set as `typeof udp dport : ct zone` and its
/// elements in the right byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeofExpr {
    /// `ip daddr`
    IpDaddr,
    /// `udp dport`
    UdpDport,
    /// `ct zone`
    CtZone,
}

/// A set declared with `typeof KEY : DATA` (a concatenated key when `key` has several parts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typeof {
    pub key: Vec<TypeofExpr>,
    pub data: TypeofExpr,
}

// libnftnl's set userdata types (`enum nftnl_udata_set_types`) and nft's typeof records
// (`enum nftnl_udata_set_typeof_types`, expression types and their own attributes).
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
const UDATA_TYPEOF_EXPR: u8 = 0;
const UDATA_TYPEOF_DATA: u8 = 1;
const EXPR_PAYLOAD: u32 = 7;
const EXPR_CT: u32 = 12;
const EXPR_CONCAT: u32 = 13;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
// nft's protocol descriptions and header fields (`enum proto_desc_id`, `enum ip_hdr_fields`,
// `enum udp_hdr_fields`).
const PROTO_DESC_UDP: u32 = 6;
const PROTO_DESC_IP: u32 = 12;
const IPHDR_DADDR: u32 = 12;
const UDPHDR_DPORT: u32 = 2;
// A payload's typeof record: description, field; ct's: key, direction (-1: none).
const UDATA_PAYLOAD_DESC: u8 = 0;
const UDATA_PAYLOAD_TYPE: u8 = 1;
const UDATA_CT_KEY: u8 = 0;
const UDATA_CT_DIR: u8 = 1;

/// One userdata record; `value` is at most 255 bytes (comments are checked, typeof records are a
/// few words).
fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, value.len() as u8];
    out.extend_from_slice(value);
    out
}

fn tlv32(kind: u8, v: u32) -> Vec<u8> {
    tlv(kind, &v.to_ne_bytes())
}

impl TypeofExpr {
    fn record(self) -> Vec<u8> {
        let (expr, data) = match self {
            TypeofExpr::IpDaddr => (
                EXPR_PAYLOAD,
                [
                    tlv32(UDATA_PAYLOAD_DESC, PROTO_DESC_IP),
                    tlv32(UDATA_PAYLOAD_TYPE, IPHDR_DADDR),
                ]
                .concat(),
            ),
            TypeofExpr::UdpDport => (
                EXPR_PAYLOAD,
                [
                    tlv32(UDATA_PAYLOAD_DESC, PROTO_DESC_UDP),
                    tlv32(UDATA_PAYLOAD_TYPE, UDPHDR_DPORT),
                ]
                .concat(),
            ),
            TypeofExpr::CtZone => (
                EXPR_CT,
                [
                    tlv32(UDATA_CT_KEY, NFT_CT_ZONE),
                    tlv32(UDATA_CT_DIR, u32::MAX),
                ]
                .concat(),
            ),
        };
        [
            tlv32(UDATA_TYPEOF_EXPR, expr),
            tlv(UDATA_TYPEOF_DATA, &data),
        ]
        .concat()
    }

    fn byteorder(self) -> u32 {
        match self {
            TypeofExpr::IpDaddr | TypeofExpr::UdpDport => BYTEORDER_BIG,
            TypeofExpr::CtZone => BYTEORDER_HOST,
        }
    }
}

impl Typeof {
    /// The set userdata nft writes for this declaration (checked byte for byte against nft).
    pub(super) fn udata(&self) -> Vec<u8> {
        let (key_order, key) = match self.key.as_slice() {
            [one] => (one.byteorder(), one.record()),
            parts => {
                let members: Vec<u8> = parts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, p)| tlv(i as u8, &p.record()))
                    .collect();
                (
                    0,
                    [
                        tlv32(UDATA_TYPEOF_EXPR, EXPR_CONCAT),
                        tlv(UDATA_TYPEOF_DATA, &members),
                    ]
                    .concat(),
                )
            }
        };
        [
            tlv32(UDATA_SET_KEYBYTEORDER, key_order),
            tlv32(UDATA_SET_DATABYTEORDER, self.data.byteorder()),
            tlv(UDATA_SET_KEY_TYPEOF, &key),
            tlv(UDATA_SET_DATA_TYPEOF, &self.data.record()),
            tlv32(UDATA_SET_DATA_INTERVAL, 0),
        ]
        .concat()
    }
}

// ---- Statements, compiled as nft compiles them ------------------------------------------------

/// Direction of an interface match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iface {
    /// `iifname`
    In,
    /// `oifname`
    Out,
}

/// `iifname/oifname OP "name"`. The name is matched as bytes (never parsed); it must fit an
/// interface name (at most 15 bytes, no NUL).
pub fn ifname(dir: Iface, op: CmpOp, name: &str) -> Result<Vec<Expr>, NftError> {
    if name.is_empty() || name.len() > 15 || name.contains('\0') {
        return Err(NftError::invalid(format!(
            "{name:?} is not an interface name (1 to 15 bytes, no NUL)"
        )));
    }
    let mut data = name.as_bytes().to_vec();
    data.resize(16, 0);
    let key = match dir {
        Iface::In => MetaKey::Iifname,
        Iface::Out => MetaKey::Oifname,
    };
    Ok(vec![
        Expr::Meta {
            key,
            dreg: Register::Reg1,
        },
        Expr::Cmp {
            sreg: Register::Reg1,
            op,
            data,
        },
    ])
}

/// Source or destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Saddr,
    Daddr,
}

/// A prefix match on `len` address bytes at `offset`: whole bytes are compared directly, a
/// prefix that ends inside a byte (or /0) loads the whole address and masks it, as nft does.
fn prefix_match(offset: u32, addr: &[u8], prefix: u8) -> Vec<Expr> {
    let load = |len: usize| Expr::Payload {
        base: Base::Network,
        offset,
        len: len as u32,
        dreg: Register::Reg1,
    };
    if prefix > 0 && prefix.is_multiple_of(8) {
        let n = usize::from(prefix / 8);
        return vec![
            load(n),
            Expr::Cmp {
                sreg: Register::Reg1,
                op: CmpOp::Equal,
                data: addr[..n].to_vec(),
            },
        ];
    }
    let mask: Vec<u8> = (0..addr.len())
        .map(|i| {
            let bits = usize::from(prefix).saturating_sub(i * 8).min(8);
            (0xffu16 << (8 - bits)) as u8
        })
        .collect();
    let masked: Vec<u8> = addr.iter().zip(&mask).map(|(a, m)| a & m).collect();
    vec![
        load(addr.len()),
        Expr::Bitwise {
            reg: Register::Reg1,
            mask,
            xor: vec![0; addr.len()],
        },
        Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::Equal,
            data: masked,
        },
    ]
}

/// `ip saddr/daddr NET`.
pub fn ip_addr(which: Addr, net: Ipv4Network) -> Vec<Expr> {
    let offset = match which {
        Addr::Saddr => 12,
        Addr::Daddr => 16,
    };
    prefix_match(offset, &net.network().octets(), net.prefix())
}

/// `ip6 saddr/daddr NET`.
pub fn ip6_addr(which: Addr, net: Ipv6Network) -> Vec<Expr> {
    let offset = match which {
        Addr::Saddr => 8,
        Addr::Daddr => 24,
    };
    prefix_match(offset, &net.network().octets(), net.prefix())
}

/// `ip6 daddr ADDR` (a single address).
pub fn ip6_daddr(a: Ipv6Addr) -> Vec<Expr> {
    prefix_match(24, &a.octets(), 128)
}

/// `[ payload load 4b @ network header + 16 => dreg ]`: the IPv4 destination address.
pub fn load_ip_daddr(dreg: Register) -> Expr {
    Expr::Payload {
        base: Base::Network,
        offset: 16,
        len: 4,
        dreg,
    }
}

/// `[ payload load 2b @ transport header + 2 => dreg ]`: the TCP/UDP destination port.
pub fn load_th_dport(dreg: Register) -> Expr {
    Expr::Payload {
        base: Base::Transport,
        offset: 2,
        len: 2,
        dreg,
    }
}

/// `ip daddr { A, B, ... }`.
pub fn ip_daddr_in(addrs: &[Ipv4Addr]) -> Vec<Expr> {
    vec![
        load_ip_daddr(Register::Reg1),
        Expr::LookupAnon {
            key: DataType::Ipv4Addr,
            sreg: Register::Reg1,
            elements: addrs.iter().map(|a| Field::Ipv4(*a)).collect(),
        },
    ]
}

fn meta_eq(key: MetaKey, v: u8) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key,
            dreg: Register::Reg1,
        },
        Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::Equal,
            data: vec![v],
        },
    ]
}

/// `meta nfproto F`: the dependency nft adds before an `ip`/`ip6` match in an inet table.
pub fn nfproto(f: u8) -> Vec<Expr> {
    meta_eq(MetaKey::Nfproto, f)
}

/// `meta l4proto P`: the dependency of a `tcp`/`udp` match.
pub fn l4proto(p: u8) -> Vec<Expr> {
    meta_eq(MetaKey::L4Proto, p)
}

/// `meta l4proto { P, Q, ... }`.
pub fn l4proto_in(protos: &[u8]) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::L4Proto,
            dreg: Register::Reg1,
        },
        Expr::LookupAnon {
            key: DataType::InetProto,
            sreg: Register::Reg1,
            elements: protos.iter().map(|p| Field::Proto(*p)).collect(),
        },
    ]
}

/// Destination port `start` (or `start-end`), after an [`l4proto`] match.
pub fn dport(start: u16, end: u16) -> Vec<Expr> {
    let mut v = vec![load_th_dport(Register::Reg1)];
    let cmp = |op, p: u16| Expr::Cmp {
        sreg: Register::Reg1,
        op,
        data: p.to_be_bytes().to_vec(),
    };
    if start == end {
        v.push(cmp(CmpOp::Equal, start));
    } else {
        v.push(cmp(CmpOp::GreatherThanEqual, start));
        v.push(cmp(CmpOp::LessThanEqual, end));
    }
    v
}

/// `ct state/status BITS` (any of the bits set).
pub fn ct_any(key: CtKey, bits: u32) -> Vec<Expr> {
    vec![
        Expr::Ct {
            key,
            dreg: Register::Reg1,
        },
        Expr::Bitwise {
            reg: Register::Reg1,
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::NotEqual,
            data: vec![0; 4],
        },
    ]
}

/// `fib daddr type local`.
pub fn fib_daddr_local() -> Vec<Expr> {
    vec![
        Expr::FibDaddrType {
            dreg: Register::Reg1,
        },
        Expr::Cmp {
            sreg: Register::Reg1,
            op: CmpOp::Equal,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_types_pack_six_bits_a_field_and_pad_to_words() {
        // Values nft itself sends for these types (nft --debug=mnl).
        assert_eq!(
            type_of(&[DataType::InetProto, DataType::InetService]),
            (0x30d, 8)
        );
        assert_eq!(
            type_of(&[
                DataType::Ipv4Addr,
                DataType::InetProto,
                DataType::InetService
            ]),
            (0x730d, 12)
        );
        assert_eq!(
            type_of(&[DataType::Ipv4Addr, DataType::InetService]),
            (0x1cd, 8)
        );
        assert_eq!(type_of(&[DataType::InetProto]), (12, 1));
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn typeof_userdata_is_what_nft_writes() {
        // nft --debug=mnl for `map zones { typeof udp dport : ct zone; }`, x86_64.
        let zones = Typeof {
            key: vec![TypeofExpr::UdpDport],
            data: TypeofExpr::CtZone,
        };
        assert_eq!(
            zones.udata(),
            hex("00 04 02 00 00 00  01 04 01 00 00 00
                 03 14 00 04 07 00 00 00 01 0c 00 04 06 00 00 00 01 04 02 00 00 00
                 04 14 00 04 0c 00 00 00 01 0c 00 04 11 00 00 00 01 04 ff ff ff ff
                 06 04 00 00 00 00")
        );
        // ... and for `typeof ip daddr . udp dport : ct zone`.
        let zones_ip = Typeof {
            key: vec![TypeofExpr::IpDaddr, TypeofExpr::UdpDport],
            data: TypeofExpr::CtZone,
        };
        assert_eq!(
            zones_ip.udata(),
            hex("00 04 00 00 00 00  01 04 01 00 00 00
                 03 34 00 04 0d 00 00 00 01 2c
                   00 14 00 04 07 00 00 00 01 0c 00 04 0c 00 00 00 01 04 0c 00 00 00
                   01 14 00 04 07 00 00 00 01 0c 00 04 06 00 00 00 01 04 02 00 00 00
                 04 14 00 04 0c 00 00 00 01 0c 00 04 11 00 00 00 01 04 ff ff ff ff
                 06 04 00 00 00 00")
        );
        assert_eq!(type_of(&[DataType::CtZone]), (4, 2));
        assert_eq!(
            decode_fields(&[DataType::CtZone], &encode_fields(&[Field::Zone(65535)])),
            Some(vec![Field::Zone(65535)])
        );
    }

    #[test]
    fn fields_round_trip_with_padding() {
        let f = [
            Field::Ipv4(Ipv4Addr::LOCALHOST),
            Field::Proto(17),
            Field::Port(53),
        ];
        let b = encode_fields(&f);
        assert_eq!(b, [127, 0, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0]);
        let types = [
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ];
        assert_eq!(decode_fields(&types, &b).unwrap(), f);
        assert_eq!(decode_fields(&types, &b[..8]), None);
        assert_eq!(encode_fields(&[Field::Proto(6)]), [6]);
    }

    #[test]
    fn prefixes_compile_as_nft_does() {
        // ip saddr 10.7.0.0/16: two bytes compared.
        let e = ip_addr(Addr::Saddr, "10.7.0.0/16".parse().unwrap());
        assert_eq!(e.len(), 2);
        assert!(matches!(
            e[0],
            Expr::Payload {
                offset: 12,
                len: 2,
                ..
            }
        ));
        // ip saddr 10.0.0.0/20: whole address, masked.
        let e = ip_addr(Addr::Saddr, "10.0.0.0/20".parse().unwrap());
        assert_eq!(
            e[1],
            Expr::Bitwise {
                reg: Register::Reg1,
                mask: vec![255, 255, 240, 0],
                xor: vec![0; 4]
            }
        );
        // ip saddr 0.0.0.0/0: masked to nothing.
        let e = ip_addr(Addr::Saddr, "0.0.0.0/0".parse().unwrap());
        assert!(matches!(&e[1], Expr::Bitwise { mask, .. } if mask == &vec![0; 4]));
        // ip6 saddr fd00:1234:5678::/57
        let e = ip6_addr(Addr::Saddr, "fd00:1234:5678::/57".parse().unwrap());
        assert!(
            matches!(&e[1], Expr::Bitwise { mask, .. } if mask[7] == 0x80 && mask[6] == 0xff && mask[8] == 0)
        );
    }

    #[test]
    fn interface_names_are_bytes_that_must_fit() {
        assert!(ifname(Iface::In, CmpOp::Equal, "br0").is_ok());
        assert!(ifname(Iface::In, CmpOp::Equal, "a-very-long-name0").is_err());
        assert!(ifname(Iface::In, CmpOp::Equal, "").is_err());
        assert!(ifname(Iface::In, CmpOp::Equal, "a\0b").is_err());
        // Quotes and nft syntax are just bytes: nothing is ever parsed.
        let e = ifname(Iface::Out, CmpOp::NotEqual, "bx0\"#").unwrap();
        assert!(
            matches!(&e[1], Expr::Cmp { data, .. } if data.starts_with(b"bx0\"#") && data.len() == 16)
        );
    }

    #[test]
    fn udata_is_a_tlv_with_nul() {
        assert_eq!(udata(0, "hi").unwrap(), vec![0, 3, b'h', b'i', 0]);
        assert!(udata(0, &"x".repeat(300)).is_err());
    }
}
