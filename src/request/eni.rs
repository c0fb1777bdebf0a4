//! `netshim.eni`: the task's ENI, in the shape ECS's agent receives it (MAC, addresses, gateways,
//! MTU, attachment; for a branch ENI its trunk and VLAN). Only unicast MACs and addresses a NIC
//! can really carry get through; whether the host lets the task have them is decided at setup.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};

use super::ports::short;
use super::{RequestError, quote};
use crate::types::{Attachment, MacAddr};

/// Most addresses of one family an ENI request may list.
const MAX_ADDRESSES: usize = 256;
/// The smallest MTU a link carrying IPv6 may have (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;

/// A branch ENI's place on its trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchSpec {
    /// MAC of the trunk ENI the VLAN is created on.
    pub trunk_mac: MacAddr,
    /// 802.1Q VLAN id, 1-4094.
    pub vlan: u16,
}

/// The `netshim.eni` request. Only `mac` is required; the rest may come from instance metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniSpec {
    pub mac: MacAddr,
    pub ipv4: Vec<Ipv4Network>,
    pub ipv6: Vec<Ipv6Network>,
    pub gateway4: Option<Ipv4Addr>,
    pub gateway6: Option<Ipv6Addr>,
    pub mtu: Option<u32>,
    pub attachment: Attachment,
    /// Set exactly when `attachment` is [`Attachment::Branch`].
    pub branch: Option<BranchSpec>,
}

fn err(m: String) -> RequestError {
    RequestError::Eni(m)
}

impl EniSpec {
    /// Only the MAC was given: look the rest up in instance metadata.
    pub fn needs_metadata(&self) -> bool {
        self.ipv4.is_empty() && self.ipv6.is_empty()
    }

    /// The IPv4 gateway: given, or the subnet base + 1 (the AWS convention) when that lies
    /// inside the subnet.
    pub fn gateway4(&self) -> Option<Ipv4Addr> {
        self.gateway4.or_else(|| {
            let n = self.ipv4.first()?;
            let gw = Ipv4Addr::from(u32::from(n.network()).checked_add(1)?);
            (n.prefix() <= 30 && n.contains(gw)).then_some(gw)
        })
    }

    /// Checks the addresses and gateways: unicast, inside one another's subnets, never the
    /// subnet's network or broadcast address, never the gateway itself.
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.ipv4.len() > MAX_ADDRESSES || self.ipv6.len() > MAX_ADDRESSES {
            return Err(err(format!("at most {MAX_ADDRESSES} addresses per family")));
        }
        for a in &self.ipv4 {
            check_v4(a)?;
        }
        for a in &self.ipv6 {
            let ip = a.ip();
            if ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_unicast_link_local()
            {
                return Err(err(format!(
                    "address {a} is not a unicast address an ENI can carry"
                )));
            }
        }
        if !self.ipv4.is_empty() {
            let gw = self.gateway4().ok_or_else(|| {
                err(format!(
                    "no gateway inside {}: give subnetGatewayIpv4Address",
                    self.ipv4[0]
                ))
            })?;
            if !is_unicast_v4(gw) {
                return Err(err(format!(
                    "subnetGatewayIpv4Address {gw} is not a unicast address"
                )));
            }
            for a in &self.ipv4 {
                if !a.contains(gw) {
                    return Err(err(format!(
                        "address {a} is not in the subnet of gateway {gw}: fix ipv4Addresses or subnetGatewayIpv4Address"
                    )));
                }
                if a.ip() == gw {
                    return Err(err(format!(
                        "address {a} is the subnet gateway: a task never takes the gateway's address"
                    )));
                }
            }
        }
        if let Some(mtu) = self.mtu
            && !self.ipv6.is_empty()
            && mtu < IPV6_MIN_MTU
        {
            return Err(err(format!(
                "mtu {mtu} is below {IPV6_MIN_MTU}, the least IPv6 allows (the kernel turns IPv6 off on such a link): raise mtu or drop ipv6Addresses"
            )));
        }
        if let Some(gw) = self.gateway6 {
            if gw.is_multicast() || gw.is_unspecified() || gw.is_loopback() {
                return Err(err(format!(
                    "subnetGatewayIpv6Address {gw} is not a unicast address"
                )));
            }
            for a in &self.ipv6 {
                if !a.contains(gw) && !gw.is_unicast_link_local() {
                    return Err(err(format!(
                        "address {a} is not in the subnet of gateway {gw}"
                    )));
                }
                if a.ip() == gw {
                    return Err(err(format!("address {a} is the subnet gateway")));
                }
            }
        }
        Ok(())
    }
}

fn is_unicast_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local()
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240)
}

fn check_v4(a: &Ipv4Network) -> Result<(), RequestError> {
    let ip = a.ip();
    if !is_unicast_v4(ip) {
        return Err(err(format!(
            "address {a} is not a unicast address an ENI can carry"
        )));
    }
    if a.prefix() <= 30 && (ip == a.network() || ip == a.broadcast()) {
        return Err(err(format!(
            "address {a} is the {} address of its subnet: give the ENI's own address",
            if ip == a.network() {
                "network"
            } else {
                "broadcast"
            }
        )));
    }
    Ok(())
}

fn parse_mac_value(key: &str, v: &Value) -> Result<MacAddr, RequestError> {
    let mac: MacAddr = v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        err(format!(
            "{key} {} is not a MAC address like \"02:00:00:00:00:01\"",
            short(v)
        ))
    })?;
    if !mac.is_unicast() {
        return Err(err(format!(
            "{key} {mac} is not a unicast MAC address: give the ENI's own MAC"
        )));
    }
    Ok(mac)
}

fn strs(k: &str, v: &Value) -> Result<Vec<String>, RequestError> {
    let a = v
        .as_array()
        .ok_or_else(|| err(format!("{k} must be an array of strings")))?;
    if a.len() > MAX_ADDRESSES {
        return Err(err(format!("{k}: at most {MAX_ADDRESSES} entries")));
    }
    a.iter()
        .map(|x| x.as_str().map(String::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| err(format!("{k} must be an array of strings")))
}

fn parse_vlan(v: &Value) -> Result<u16, RequestError> {
    // ECS sends the VLAN id as a string; accept both.
    let n = match v {
        Value::String(s) => s.trim().parse::<u64>().ok(),
        other => other.as_u64(),
    };
    match n {
        Some(n) if (1..=4094).contains(&n) => Ok(n as u16),
        _ => Err(err(format!(
            "vlanId {} is out of range: an 802.1Q VLAN id is 1-4094",
            short(v)
        ))),
    }
}

/// The branch facts, given as `trunkMacAddress` + `vlanId` or as ECS's
/// `interfaceVlanProperties: {vlanId, trunkInterfaceMacAddress}`.
#[derive(Default)]
struct BranchParts {
    trunk: Option<MacAddr>,
    vlan: Option<u16>,
    /// `attachment` as given, to catch one that contradicts `interfaceAssociationProtocol`.
    attachment: Option<Attachment>,
    /// `interfaceAssociationProtocol: "vlan"` was given.
    vlan_protocol: bool,
}

fn parse_vlan_properties(v: &Value, b: &mut BranchParts) -> Result<(), RequestError> {
    let Value::Object(o) = v else {
        return Err(err("interfaceVlanProperties must be an object".into()));
    };
    for (k, v) in o {
        match k.as_str() {
            "vlanId" => b.vlan = Some(parse_vlan(v)?),
            "trunkInterfaceMacAddress" => b.trunk = Some(parse_mac_value(k, v)?),
            other => {
                return Err(err(format!(
                    "interfaceVlanProperties: unknown key {}",
                    quote(other)
                )));
            }
        }
    }
    Ok(())
}

fn parse_key(
    spec: &mut EniSpec,
    mac: &mut Option<MacAddr>,
    b: &mut BranchParts,
    k: &str,
    v: &Value,
) -> Result<(), RequestError> {
    match k {
        "macAddress" => *mac = Some(parse_mac_value(k, v)?),
        "ipv4Addresses" => {
            for a in strs(k, v)? {
                spec.ipv4.push(a.parse().map_err(|_| {
                    err(format!(
                        "ipv4Addresses: {} is not an IPv4 CIDR like \"10.0.1.23/24\"",
                        quote(&a)
                    ))
                })?);
            }
        }
        "ipv6Addresses" => {
            for a in strs(k, v)? {
                spec.ipv6.push(a.parse().map_err(|_| {
                    err(format!(
                        "ipv6Addresses: {} is not an IPv6 CIDR like \"2600:1f14::5/64\"",
                        quote(&a)
                    ))
                })?);
            }
        }
        "subnetGatewayIpv4Address" => {
            spec.gateway4 = Some(
                v.as_str()
                    .and_then(|g| g.parse().ok())
                    .ok_or_else(|| err(format!("{k} {} is not an IPv4 address", short(v))))?,
            );
        }
        "subnetGatewayIpv6Address" => {
            spec.gateway6 = Some(
                v.as_str()
                    .and_then(|g| g.parse().ok())
                    .ok_or_else(|| err(format!("{k} {} is not an IPv6 address", short(v))))?,
            );
        }
        "mtu" => {
            spec.mtu = Some(match v.as_u64() {
                Some(m) if (68..=65535).contains(&m) => m as u32,
                _ => {
                    return Err(err(format!(
                        "mtu must be an integer 68-65535, got {}",
                        short(v)
                    )));
                }
            })
        }
        "attachment" => {
            let a: Attachment = v.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                err(format!(
                    "attachment must be \"exclusive\", \"shared\" or \"branch\", got {}",
                    short(v)
                ))
            })?;
            spec.attachment = a;
            b.attachment = Some(a);
        }
        "trunkMacAddress" => b.trunk = Some(parse_mac_value(k, v)?),
        "vlanId" => b.vlan = Some(parse_vlan(v)?),
        "interfaceVlanProperties" => parse_vlan_properties(v, b)?,
        "interfaceAssociationProtocol" => match v.as_str() {
            Some("vlan") => {
                spec.attachment = Attachment::Branch;
                b.vlan_protocol = true;
            }
            Some("default") => {}
            _ => {
                return Err(err(format!(
                    "interfaceAssociationProtocol must be \"default\" or \"vlan\", got {}",
                    short(v)
                )));
            }
        },
        // Accepted from the ECS task payload; DNS is the runtime's business.
        "domainNameServers"
        | "domainNameSearchList"
        | "privateDnsName"
        | "subnetGatewayIpv4AddressCidr" => {}
        other => return Err(err(format!("unknown key {}", quote(other)))),
    }
    Ok(())
}

/// Parses the `netshim.eni` JSON object.
pub fn parse_eni(s: &str) -> Result<EniSpec, RequestError> {
    let v: Value = serde_json::from_str(s).map_err(|x| err(format!("not valid JSON: {x}")))?;
    let Value::Object(o) = v else {
        return Err(err(
            "must be a JSON object like {\"macAddress\": \"02:...\"}".into(),
        ));
    };
    let mut mac = None;
    let mut branch = BranchParts::default();
    let mut spec = EniSpec {
        mac: MacAddr([0; 6]),
        ipv4: vec![],
        ipv6: vec![],
        gateway4: None,
        gateway6: None,
        mtu: None,
        attachment: Attachment::Exclusive,
        branch: None,
    };
    let o: Map<String, Value> = o;
    for (k, v) in &o {
        parse_key(&mut spec, &mut mac, &mut branch, k, v)?;
    }
    spec.mac = mac.ok_or_else(|| err("macAddress is required".into()))?;
    spec.branch = finish_branch(&spec, branch)?;
    if spec.attachment == Attachment::Shared && spec.ipv4.is_empty() {
        return Err(err(
            "a shared ENI needs ipv4Addresses: the secondary addresses tasks may take".into(),
        ));
    }
    spec.validate()?;
    Ok(spec)
}

fn finish_branch(spec: &EniSpec, b: BranchParts) -> Result<Option<BranchSpec>, RequestError> {
    if let Some(a) = b
        .attachment
        .filter(|a| b.vlan_protocol && *a != Attachment::Branch)
    {
        return Err(err(format!(
            "interfaceAssociationProtocol \"vlan\" makes a branch ENI, but attachment is {a}: remove one of them"
        )));
    }
    match (spec.attachment, b.trunk, b.vlan) {
        (Attachment::Branch, Some(trunk_mac), Some(vlan)) => {
            if trunk_mac == spec.mac {
                return Err(err(
                    "macAddress is the trunk's: a branch ENI has a MAC of its own".into(),
                ));
            }
            Ok(Some(BranchSpec { trunk_mac, vlan }))
        }
        (Attachment::Branch, None, _) => Err(err(
            "a branch ENI needs trunkMacAddress: the MAC of the trunk ENI it is a VLAN of".into(),
        )),
        (Attachment::Branch, _, None) => Err(err("a branch ENI needs vlanId (1-4094)".into())),
        (_, None, None) => Ok(None),
        (a, _, _) => Err(err(format!(
            "trunkMacAddress and vlanId belong to a branch ENI, this one is {a}: add \"attachment\": \"branch\" or remove them"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eni_full_and_mac_only() {
        let e = parse_eni(r#"{"macAddress":"02:00:00:00:00:0A","ipv4Addresses":["10.0.1.23/24"],"subnetGatewayIpv4Address":"10.0.1.1","mtu":9001}"#).unwrap();
        assert_eq!(e.mac, MacAddr([2, 0, 0, 0, 0, 10]));
        assert_eq!(e.gateway4(), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(e.attachment, Attachment::Exclusive);
        assert_eq!(e.branch, None);
        let m = parse_eni(r#"{"macAddress":"02:00:00:00:00:0a"}"#).unwrap();
        assert!(m.needs_metadata());
        let d = parse_eni(r#"{"macAddress":"02:00:00:00:00:0a","ipv4Addresses":["10.0.4.9/22"]}"#)
            .unwrap();
        assert_eq!(
            d.gateway4(),
            Some(Ipv4Addr::new(10, 0, 4, 1)),
            "subnet base + 1"
        );
    }

    #[test]
    fn eni_errors_are_named() {
        for (bad, want) in [
            (
                "not json",
                "not valid JSON: expected ident at line 1 column 2",
            ),
            (
                r#"{"macAddress":5}"#,
                "macAddress 5 is not a MAC address like \"02:00:00:00:00:01\"",
            ),
            (
                r#"{"ipv4Addresses":["10.0.1.2/24"]}"#,
                "macAddress is required",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","ipv4Addresses":["10.0.2.5/24"],"subnetGatewayIpv4Address":"10.0.1.1"}"#,
                "address 10.0.2.5/24 is not in the subnet of gateway 10.0.1.1: fix ipv4Addresses or subnetGatewayIpv4Address",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","attachment":"shared"}"#,
                "a shared ENI needs ipv4Addresses: the secondary addresses tasks may take",
            ),
            (
                r#"{"macAddress":"02:00:00:00:00:01","mac":"x"}"#,
                "unknown key \"mac\"",
            ),
        ] {
            assert_eq!(
                parse_eni(bad).unwrap_err().to_string(),
                format!("annotation netshim.eni: {want}"),
                "{bad}"
            );
        }
    }

    #[test]
    fn macs_that_name_no_nic_are_refused() {
        for mac in [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:fb",
        ] {
            let e = parse_eni(&format!(r#"{{"macAddress":"{mac}"}}"#))
                .unwrap_err()
                .to_string();
            assert!(e.contains("is not a unicast MAC address"), "{mac}: {e}");
        }
    }

    #[test]
    fn addresses_no_nic_can_carry_are_refused() {
        for (addr, needle) in [
            ("255.255.255.255/32", "not a unicast address"),
            ("127.0.0.5/8", "not a unicast address"),
            ("169.254.169.254/16", "not a unicast address"),
            ("224.0.0.1/24", "not a unicast address"),
            ("10.0.1.0/24", "network address of its subnet"),
            ("10.0.1.255/24", "broadcast address of its subnet"),
            ("10.0.1.1/24", "is the subnet gateway"),
            ("10.0.1.7/32", "no gateway inside 10.0.1.7/32"),
        ] {
            let e = parse_eni(&format!(
                r#"{{"macAddress":"02:00:00:00:00:01","ipv4Addresses":["{addr}"]}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{addr}: {e}");
        }
        let e = parse_eni(r#"{"macAddress":"02:00:00:00:00:01","ipv6Addresses":["fe80::5/64"]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("not a unicast address"), "{e}");
    }

    #[test]
    fn an_mtu_too_small_for_ipv6_is_refused_only_with_ipv6() {
        let e = parse_eni(
            r#"{"macAddress":"02:00:00:00:00:01","ipv6Addresses":["2001:db8::5/64"],"mtu":1279}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation netshim.eni: mtu 1279 is below 1280, the least IPv6 allows (the kernel turns IPv6 off on such a link): raise mtu or drop ipv6Addresses"
        );
        assert!(
            parse_eni(
                r#"{"macAddress":"02:00:00:00:00:01","ipv6Addresses":["2001:db8::5/64"],"mtu":1280}"#
            )
            .is_ok()
        );
        assert!(
            parse_eni(
                r#"{"macAddress":"02:00:00:00:00:01","ipv4Addresses":["10.0.1.5/24"],"mtu":576}"#
            )
            .is_ok(),
            "an IPv4-only ENI may have a small MTU"
        );
    }

    #[test]
    fn branch_enis_carry_their_trunk_and_vlan() {
        let b = parse_eni(r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","trunkMacAddress":"02:00:00:00:01:00","vlanId":105,"ipv4Addresses":["10.0.1.40/24"]}"#).unwrap();
        assert_eq!(
            b.branch,
            Some(BranchSpec {
                trunk_mac: "02:00:00:00:01:00".parse().unwrap(),
                vlan: 105
            })
        );
        // The ECS agent's shape of the same facts.
        let ecs = parse_eni(r#"{"macAddress":"02:00:00:00:01:05","interfaceAssociationProtocol":"vlan","interfaceVlanProperties":{"vlanId":"105","trunkInterfaceMacAddress":"02:00:00:00:01:00"},"ipv4Addresses":["10.0.1.40/24"]}"#).unwrap();
        assert_eq!(ecs.attachment, Attachment::Branch);
        assert_eq!(ecs.branch, b.branch);
        // Both ways of saying "branch" at once agree.
        let both = parse_eni(r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","interfaceAssociationProtocol":"vlan","interfaceVlanProperties":{"vlanId":105,"trunkInterfaceMacAddress":"02:00:00:00:01:00"},"ipv4Addresses":["10.0.1.40/24"]}"#).unwrap();
        assert_eq!(both.branch, b.branch);
        for (bad, needle) in [
            (
                r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","vlanId":5}"#,
                "needs trunkMacAddress",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","trunkMacAddress":"02:00:00:00:01:00"}"#,
                "needs vlanId",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","trunkMacAddress":"02:00:00:00:01:00","vlanId":4095}"#,
                "vlanId 4095 is out of range",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:05","attachment":"branch","trunkMacAddress":"02:00:00:00:01:00","vlanId":0}"#,
                "vlanId 0 is out of range",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:05","trunkMacAddress":"02:00:00:00:01:00","vlanId":5}"#,
                "belong to a branch ENI, this one is exclusive",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:00","attachment":"branch","trunkMacAddress":"02:00:00:00:01:00","vlanId":5}"#,
                "macAddress is the trunk's",
            ),
            (
                r#"{"macAddress":"02:00:00:00:01:05","attachment":"shared","interfaceAssociationProtocol":"vlan","interfaceVlanProperties":{"vlanId":5,"trunkInterfaceMacAddress":"02:00:00:00:01:00"},"ipv4Addresses":["10.0.1.40/24"]}"#,
                "interfaceAssociationProtocol \"vlan\" makes a branch ENI, but attachment is shared",
            ),
            (
                r#"{"interfaceAssociationProtocol":"vlan","attachment":"exclusive","macAddress":"02:00:00:00:01:05","interfaceVlanProperties":{"vlanId":5,"trunkInterfaceMacAddress":"02:00:00:00:01:00"}}"#,
                "but attachment is exclusive",
            ),
        ] {
            let e = parse_eni(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
