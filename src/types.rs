//! The vocabulary every module shares: network modes, protocols, port ranges, ENI attachments and
//! MAC addresses. Each has one parser (`FromStr`) and one spelling (`Display`, serde), so the
//! ledger, the config and the allocator do not depend on the annotation parser.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the ECS network modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Bridge,
    Host,
    Awsvpc,
    None,
}

impl NetworkMode {
    /// Every mode, in the order error messages list them.
    pub const ALL: [NetworkMode; 4] = [
        NetworkMode::Bridge,
        NetworkMode::Host,
        NetworkMode::Awsvpc,
        NetworkMode::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Host => "host",
            NetworkMode::Awsvpc => "awsvpc",
            NetworkMode::None => "none",
        }
    }

    /// Whether the mode gives the container a network namespace of its own.
    pub fn own_netns(self) -> bool {
        self != NetworkMode::Host
    }
}

impl FromStr for NetworkMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        NetworkMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a mapping or an ingress rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl FromStr for Protocol {
    type Err = ();
    /// `tcp` or `udp`, any case.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(p: u16) -> Self {
        PortRange { start: p, end: p }
    }
    pub fn count(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.start <= o.end && o.start <= self.end
    }
    pub fn contains(&self, p: u16) -> bool {
        self.start <= p && p <= self.end
    }

    /// Parses `"8000-8010"` (or `"8000"`), requiring 1 ≤ start ≤ end ≤ 65535.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let p = |x: &str| -> Result<u16, String> {
            match x.parse::<u32>() {
                Ok(v) if (1..=65535).contains(&v) => Ok(v as u16),
                _ => Err(format!(
                    "{s:?} is not a port range: use \"START-END\" with ports 1-65535"
                )),
            }
        };
        let (start, end) = (p(a)?, p(b)?);
        if start > end {
            return Err(format!(
                "range {s:?} is reversed: write it low-high, e.g. \"{end}-{start}\""
            ));
        }
        Ok(PortRange { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// How an awsvpc task gets its ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attachment {
    /// The interface moves into the task (ECS awsvpc, Terway exclusive ENI).
    Exclusive,
    /// The interface stays on the host; the task takes one of its secondary addresses.
    Shared,
    /// A VLAN of a trunk ENI, created for the task and moved into it (ECS ENI trunking).
    Branch,
}

impl Attachment {
    pub const ALL: [Attachment; 3] = [
        Attachment::Exclusive,
        Attachment::Shared,
        Attachment::Branch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Attachment::Exclusive => "exclusive",
            Attachment::Shared => "shared",
            Attachment::Branch => "branch",
        }
    }
}

impl FromStr for Attachment {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Attachment::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A 48-bit MAC address, written `02:00:00:00:00:01` (parsed in any case, `:` or `-`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
    /// A unicast address a NIC can carry: not all-zero, not multicast or broadcast.
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }
}

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        Ok(MacAddr(m))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a MAC address")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_word_has_one_spelling_and_parses_back() {
        for m in NetworkMode::ALL {
            assert_eq!(m.as_str().parse::<NetworkMode>(), Ok(m));
        }
        for a in Attachment::ALL {
            assert_eq!(a.as_str().parse::<Attachment>(), Ok(a));
        }
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("sctp".parse::<Protocol>().is_err());
        assert!("overlay".parse::<NetworkMode>().is_err());
    }

    #[test]
    fn macs_parse_in_any_case_and_print_lowercase() {
        let m: MacAddr = "02:AA:bb:00:00:0A".parse().unwrap();
        assert_eq!(m.to_string(), "02:aa:bb:00:00:0a");
        assert_eq!("02-aa-bb-00-00-0a".parse::<MacAddr>(), Ok(m));
        for bad in [
            "02:aa:bb:00:00",
            "02:aa:bb:00:00:0g",
            "2:aa:bb:00:00:0a",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:aa:bb:00:00:0a\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
    }

    #[test]
    fn only_unicast_macs_can_name_a_nic() {
        assert!("02:00:00:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        for bad in [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
        ] {
            assert!(!bad.parse::<MacAddr>().unwrap().is_unicast(), "{bad}");
        }
    }

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            PortRange::parse("8000-8010"),
            Ok(PortRange {
                start: 8000,
                end: 8010
            })
        );
        assert!(PortRange::parse("0-5").is_err());
        assert!(PortRange::parse("9-5").unwrap_err().contains("reversed"));
    }
}
