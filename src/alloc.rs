//! Allocation rules over the ledger: container addresses and host ports. Pure: the only outside
//! fact, "does a host process hold this port", comes through [`PortProbe`], so every rule is
//! unit-tested without root.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;

use crate::request::{HostPorts, PortMapping};
use crate::state::{PortRecord, State};
use crate::types::{PortRange, Protocol};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error(
        "host port {port}/{proto} is reserved (ports.reserved in the config): pick another hostPort, or omit it for a dynamic port"
    )]
    Reserved { proto: Protocol, port: u16 },
    #[error(
        "host port {port}/{proto} is already allocated to container {holder}{}: pick another hostPort, or omit it for a dynamic port",
        service.as_deref().map(|s| format!(" (service {s})")).unwrap_or_default()
    )]
    Held {
        proto: Protocol,
        port: u16,
        holder: String,
        service: Option<String>,
    },
    #[error(
        "host port {port}/{proto} is in use on the host by {holder}: stop it or pick another hostPort"
    )]
    HostInUse {
        proto: Protocol,
        port: u16,
        holder: String,
    },
    #[error(
        "no {need} free contiguous host port(s) for {proto} in dynamic range {range} ({held} held by containers, {reserved} reserved, {busy} in use on the host): widen ports.dynamic_range in the config or stop some containers"
    )]
    Exhausted {
        proto: Protocol,
        need: u32,
        range: PortRange,
        held: u32,
        reserved: u32,
        busy: u32,
    },
    #[error(
        "no free address left in subnet {subnet} ({used} in use): use a larger bridge.subnet in the config"
    )]
    NoAddress { subnet: Ipv4Network, used: usize },
}

/// Tells whether a process on the host holds a port (a listener, or a bound UDP socket).
pub trait PortProbe {
    /// `Some(description)` if the port is taken on the host, e.g. `"pid 123 (nginx)"`.
    fn holder(&self, proto: Protocol, port: u16, ip: Option<Ipv4Addr>) -> Option<String>;
}

/// A probe that sees nothing (unit tests).
#[cfg(test)]
pub struct NoProbe;
#[cfg(test)]
impl PortProbe for NoProbe {
    fn holder(&self, _: Protocol, _: u16, _: Option<Ipv4Addr>) -> Option<String> {
        None
    }
}

/// Claims on one protocol/port: (host address or all, container id).
type Claims = Vec<(Option<Ipv4Addr>, String)>;

/// Who holds which host port: the ledger (asked port by port), plus what this request has
/// claimed so far.
pub struct PortLedger<'a> {
    state: &'a State,
    local: HashMap<(Protocol, u16), Claims>,
}

impl<'a> PortLedger<'a> {
    pub fn new(state: &'a State) -> Self {
        PortLedger {
            state,
            local: HashMap::new(),
        }
    }

    /// The container holding `port` in a way that conflicts with a claim on `ip`.
    pub fn holder(&self, proto: Protocol, port: u16, ip: Option<Ipv4Addr>) -> Option<String> {
        let conflicts =
            |(hip, _): &&(Option<Ipv4Addr>, String)| hip.is_none() || ip.is_none() || *hip == ip;
        if let Some(c) = self.local.get(&(proto, port))
            && let Some((_, id)) = c.iter().find(conflicts)
        {
            return Some(id.clone());
        }
        self.state
            .port_holders(proto, port)
            .iter()
            .find(conflicts)
            .map(|(_, id)| id.clone())
    }

    fn claim(&mut self, proto: Protocol, port: u16, ip: Option<Ipv4Addr>, id: &str) {
        self.local
            .entry((proto, port))
            .or_default()
            .push((ip, id.to_string()));
    }
}

/// Inputs of port allocation.
pub struct PortPolicy {
    pub dynamic: PortRange,
    pub reserved: Vec<u16>,
    /// A port released less than this long ago is handed out only when nothing else is free.
    pub reuse_delay: u64,
    /// Now, in seconds since the epoch.
    pub now: u64,
}

/// Assigns host ports to every mapping (ranges expanded), static ones checked, dynamic ones
/// picked next-fit from the cursor. On success the cursor is advanced in `state`.
pub fn allocate_ports(
    state: &mut State,
    id: &str,
    mappings: &[PortMapping],
    policy: &PortPolicy,
    probe: &dyn PortProbe,
) -> Result<Vec<PortRecord>, AllocError> {
    let mut ledger = PortLedger::new(state);
    let reserved: HashSet<u16> = policy.reserved.iter().copied().collect();
    let mut cursor = state.cursors.port;
    let mut out = Vec::new();
    // Static mappings first, so a dynamic pick never takes a port the same request names.
    let mut order: Vec<&PortMapping> = mappings
        .iter()
        .filter(|m| matches!(m.host, HostPorts::Static(_)))
        .collect();
    order.extend(mappings.iter().filter(|m| m.host == HostPorts::Dynamic));
    for m in order {
        let host = match m.host {
            HostPorts::Static(r) => {
                for port in r.start..=r.end {
                    check_static(&ledger, &reserved, probe, m.protocol, port, m.host_ip)?;
                }
                r
            }
            HostPorts::Dynamic => {
                let recent = |p: u16| {
                    state
                        .released_at(m.protocol, p)
                        .is_some_and(|t| policy.now < t.saturating_add(policy.reuse_delay))
                };
                let r = pick_dynamic(
                    &ledger,
                    &reserved,
                    probe,
                    m,
                    policy.dynamic,
                    cursor,
                    &recent,
                )
                .or_else(|_| {
                    pick_dynamic(
                        &ledger,
                        &reserved,
                        probe,
                        m,
                        policy.dynamic,
                        cursor,
                        &|_| false,
                    )
                })?;
                cursor = Some(r.end);
                r
            }
        };
        for (i, port) in (host.start..=host.end).enumerate() {
            ledger.claim(m.protocol, port, m.host_ip, id);
            out.push(PortRecord {
                protocol: m.protocol,
                container_port: m.container.start + i as u16,
                host_port: port,
                host_ip: m.host_ip,
                name: m.name.clone(),
                dynamic: m.host == HostPorts::Dynamic,
                ct_zone: None,
            });
        }
    }
    out.sort_by_key(|p| (p.protocol, p.container_port));
    state.cursors.port = cursor;
    Ok(out)
}

/// Checks one claimed port against the ledger, the reserved list and the host (ledger first:
/// it names the holder precisely).
pub fn check_static(
    ledger: &PortLedger,
    reserved: &HashSet<u16>,
    probe: &dyn PortProbe,
    proto: Protocol,
    port: u16,
    ip: Option<Ipv4Addr>,
) -> Result<(), AllocError> {
    if reserved.contains(&port) {
        return Err(AllocError::Reserved { proto, port });
    }
    if let Some(h) = ledger.holder(proto, port, ip) {
        let service = ledger.state.record(&h).and_then(|r| r.service);
        return Err(AllocError::Held {
            proto,
            port,
            holder: crate::output::escape_controls(&h),
            service,
        });
    }
    if let Some(holder) = probe.holder(proto, port, ip) {
        return Err(AllocError::HostInUse {
            proto,
            port,
            holder,
        });
    }
    Ok(())
}

/// A next-fit pick of a contiguous run; `avoid` skips ports too (recently released ones).
fn pick_dynamic(
    ledger: &PortLedger,
    reserved: &HashSet<u16>,
    probe: &dyn PortProbe,
    m: &PortMapping,
    range: PortRange,
    cursor: Option<u16>,
    avoid: &dyn Fn(u16) -> bool,
) -> Result<PortRange, AllocError> {
    let need = m.container.count();
    let size = range.count();
    let free = |p: u16| {
        !reserved.contains(&p)
            && !avoid(p)
            && ledger.holder(m.protocol, p, m.host_ip).is_none()
            && probe.holder(m.protocol, p, m.host_ip).is_none()
    };
    if need <= size {
        // Next-fit: start just after the cursor, wrap once around the range.
        let first = match cursor {
            Some(c) if range.contains(c) => u32::from(c) + 1 - u32::from(range.start),
            _ => 0,
        };
        let mut k = 0;
        while k < size {
            let start = u32::from(range.start) + (first + k) % size;
            if start + need - 1 > u32::from(range.end) {
                // A run cannot wrap past the end of the range; jump to the range start.
                k += u32::from(range.end) + 1 - start;
                continue;
            }
            match (start..start + need).find(|&p| !free(p as u16)) {
                None => {
                    return Ok(PortRange {
                        start: start as u16,
                        end: (start + need - 1) as u16,
                    });
                }
                // Skip past the blocked port.
                Some(bad) => k += bad - start + 1,
            }
        }
    }
    let (mut held, mut res, mut busy) = (0, 0, 0);
    for p in range.start..=range.end {
        if reserved.contains(&p) {
            res += 1;
        } else if ledger.holder(m.protocol, p, m.host_ip).is_some() {
            held += 1;
        } else if probe.holder(m.protocol, p, m.host_ip).is_some() {
            busy += 1;
        }
    }
    Err(AllocError::Exhausted {
        proto: m.protocol,
        need,
        range,
        held,
        reserved: res,
        busy,
    })
}

/// Picks a container address next-fit: never the network, gateway or broadcast address, never
/// one in the ledger. Advances the cursor in `state`.
pub fn allocate_ip(state: &mut State, subnet: Ipv4Network) -> Result<Ipv4Addr, AllocError> {
    let base = u32::from(subnet.network());
    let size: u64 = 1u64 << (32 - subnet.prefix());
    // Usable offsets: 2 ..= size-2 (0 network, 1 gateway, size-1 broadcast).
    let (lo, hi) = (2u64, size.saturating_sub(2));
    if hi < lo {
        return Err(AllocError::NoAddress { subnet, used: 0 });
    }
    let n = hi - lo + 1;
    let start = match state.cursors.ip {
        Some(c) if subnet.contains(c) => {
            let off = u64::from(u32::from(c) - base);
            if (lo..=hi).contains(&off) {
                off - lo + 1
            } else {
                0
            }
        }
        _ => 0,
    };
    for k in 0..n {
        let off = lo + (start + k) % n;
        let ip = Ipv4Addr::from(base + off as u32);
        if state.ip_holder(IpAddr::V4(ip), "").is_none() {
            state.cursors.ip = Some(ip);
            return Ok(ip);
        }
    }
    Err(AllocError::NoAddress {
        subnet,
        used: n as usize,
    })
}

/// The conntrack zone of a container's UDP mappings: the next after the last one given, 1 to
/// 65,535 and round again (0 is the host's default zone). A zone comes back only after 65,534
/// other containers with UDP mappings, long after the entries of its last holder expired: they
/// stop being refreshed at its teardown (its zone elements go) and UDP entries live 30 s
/// unreplied, 120 s assured, so a new holder of the same host port never shares a zone with an
/// entry of the old one.
pub fn allocate_zone(state: &mut State) -> u16 {
    let next = match state.cursors.zone {
        Some(z) if z < u16::MAX => z + 1,
        _ => 1,
    };
    state.cursors.zone = Some(next);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_mappings;
    use crate::state::ContainerRecord;
    use crate::types::NetworkMode;

    struct Busy(Vec<u16>);
    impl PortProbe for Busy {
        fn holder(&self, _: Protocol, port: u16, _: Option<Ipv4Addr>) -> Option<String> {
            self.0.contains(&port).then(|| "pid 1 (test)".to_string())
        }
    }

    fn policy(r: &str) -> (PortRange, Vec<u16>) {
        (PortRange::parse(r).unwrap(), vec![22])
    }

    fn add(state: &mut State, id: &str, recs: Vec<PortRecord>, ip: Option<Ipv4Addr>) {
        let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
        r.ip = ip;
        r.ports = recs;
        state.containers.insert(id.into(), r);
    }

    fn alloc(
        state: &mut State,
        id: &str,
        maps: &str,
        range: &str,
        probe: &dyn PortProbe,
    ) -> Result<Vec<PortRecord>, AllocError> {
        let (dynamic, reserved) = policy(range);
        let m = parse_mappings(maps).unwrap();
        let r = allocate_ports(
            state,
            id,
            &m,
            &PortPolicy {
                dynamic,
                reserved,
                reuse_delay: 60,
                now: 1000,
            },
            probe,
        )?;
        add(state, id, r.clone(), None);
        Ok(r)
    }

    #[test]
    fn dynamic_ports_are_distinct_and_next_fit() {
        let mut st = State::default();
        let a = alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        let b = alloc(
            &mut st,
            "b",
            r#"[{"containerPort":80}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        assert_eq!(a[0].host_port, 40000);
        assert_eq!(b[0].host_port, 40001);
        assert!(a[0].dynamic);
        // Releasing a does not make the next pick reuse it at once (next-fit).
        st.remove("a", 990);
        let c = alloc(
            &mut st,
            "c",
            r#"[{"containerPort":80}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        assert_eq!(c[0].host_port, 40002);
    }

    #[test]
    fn dynamic_skips_reserved_held_and_host_busy_and_wraps() {
        let mut st = State::default();
        st.cursors.port = Some(40008);
        let probe = Busy(vec![40009, 40000]);
        add(
            &mut st,
            "x",
            vec![PortRecord {
                protocol: Protocol::Tcp,
                container_port: 1,
                host_port: 40001,
                host_ip: None,
                name: None,
                dynamic: false,
                ct_zone: None,
            }],
            None,
        );
        let r = alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80}]"#,
            "40000-40009",
            &probe,
        )
        .unwrap();
        assert_eq!(r[0].host_port, 40002);
        let mut st = State::default();
        let r = alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80}]"#,
            "20-23",
            &Busy(vec![20, 21]),
        )
        .unwrap();
        assert_eq!(r[0].host_port, 23, "22 is reserved");
    }

    #[test]
    fn udp_and_tcp_are_separate() {
        let mut st = State::default();
        alloc(
            &mut st,
            "a",
            r#"[{"containerPort":53,"hostPort":5353}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        assert!(
            alloc(
                &mut st,
                "b",
                r#"[{"containerPort":53,"hostPort":5353,"protocol":"udp"}]"#,
                "40000-40009",
                &NoProbe
            )
            .is_ok()
        );
    }

    #[test]
    fn static_conflicts_name_the_holder() {
        let mut st = State::default();
        alloc(
            &mut st,
            "first",
            r#"[{"containerPort":80,"hostPort":8080}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        let e = alloc(
            &mut st,
            "second",
            r#"[{"containerPort":80,"hostPort":8080}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap_err();
        assert_eq!(
            e,
            AllocError::Held {
                proto: Protocol::Tcp,
                port: 8080,
                holder: "first".into(),
                service: None,
            }
        );
        st.containers.get_mut("first").unwrap().service = Some("web".into());
        let e = alloc(
            &mut st,
            "second",
            r#"[{"containerPort":80,"hostPort":8080}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "host port 8080/tcp is already allocated to container first (service web): pick another hostPort, or omit it for a dynamic port"
        );
        assert!(e.to_string().contains("8080/tcp") && e.to_string().contains("first"));
        let e = alloc(
            &mut st,
            "third",
            r#"[{"containerPort":80,"hostPort":9090}]"#,
            "40000-40009",
            &Busy(vec![9090]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("in use on the host by pid 1 (test)"),
            "{e}"
        );
        let e = alloc(
            &mut st,
            "fourth",
            r#"[{"containerPort":80,"hostPort":22}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap_err();
        assert_eq!(
            e,
            AllocError::Reserved {
                proto: Protocol::Tcp,
                port: 22
            }
        );
    }

    #[test]
    fn host_ip_claims_conflict_only_when_addresses_overlap() {
        let mut st = State::default();
        alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80,"hostPort":8080,"hostIp":"127.0.0.1"}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        assert!(
            alloc(
                &mut st,
                "b",
                r#"[{"containerPort":80,"hostPort":8080,"hostIp":"127.0.0.2"}]"#,
                "40000-40009",
                &NoProbe
            )
            .is_ok()
        );
        assert!(
            alloc(
                &mut st,
                "c",
                r#"[{"containerPort":80,"hostPort":8080}]"#,
                "40000-40009",
                &NoProbe
            )
            .is_err()
        );
    }

    #[test]
    fn exhausted_range_is_explained() {
        let mut st = State::default();
        alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80}]"#,
            "40000-40001",
            &NoProbe,
        )
        .unwrap();
        alloc(
            &mut st,
            "b",
            r#"[{"containerPort":80}]"#,
            "40000-40001",
            &NoProbe,
        )
        .unwrap();
        let e = alloc(
            &mut st,
            "c",
            r#"[{"containerPort":80}]"#,
            "40000-40001",
            &NoProbe,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AllocError::Exhausted {
                    held: 2,
                    need: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("40000-40001"));
        assert!(!st.containers.contains_key("c"));
    }

    #[test]
    fn range_gets_a_contiguous_run() {
        let mut st = State::default();
        let r = alloc(
            &mut st,
            "a",
            r#"[{"containerPortRange":"8000-8002"}]"#,
            "40000-40009",
            &Busy(vec![40001]),
        )
        .unwrap();
        let ports: Vec<u16> = r.iter().map(|p| p.host_port).collect();
        assert_eq!(ports, vec![40002, 40003, 40004]);
        assert_eq!(r[2].container_port, 8002);
        // A run that does not fit before the end restarts at the range start.
        let e = alloc(
            &mut st,
            "b",
            r#"[{"containerPortRange":"8000-8010"}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap_err();
        assert!(matches!(e, AllocError::Exhausted { need: 11, .. }));
    }

    #[test]
    fn one_request_never_gets_a_port_twice() {
        let mut st = State::default();
        let r = alloc(
            &mut st,
            "a",
            r#"[{"containerPort":80},{"containerPort":81,"hostPort":40000},{"containerPort":82}]"#,
            "40000-40009",
            &NoProbe,
        )
        .unwrap();
        let mut ports: Vec<u16> = r.iter().map(|p| p.host_port).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn addresses_skip_gateway_and_used_and_wrap() {
        let net: Ipv4Network = "10.9.0.0/29".parse().unwrap();
        let mut st = State::default();
        let mut got = vec![];
        for i in 0..5 {
            let ip = allocate_ip(&mut st, net).unwrap();
            add(&mut st, &format!("c{i}"), vec![], Some(ip));
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
        let e = allocate_ip(&mut st, net).unwrap_err();
        assert!(e.to_string().contains("no free address"), "{e}");
        st.containers.remove("c1");
        assert_eq!(
            allocate_ip(&mut st, net).unwrap(),
            Ipv4Addr::new(10, 9, 0, 3)
        );
    }

    #[test]
    fn zones_go_round_from_one_and_never_give_zero() {
        let mut st = State::default();
        assert_eq!(allocate_zone(&mut st), 1);
        assert_eq!(allocate_zone(&mut st), 2);
        st.cursors.zone = Some(u16::MAX - 1);
        assert_eq!(allocate_zone(&mut st), u16::MAX);
        assert_eq!(allocate_zone(&mut st), 1, "0 is the host's zone");
        assert_eq!(st.cursors.zone, Some(1));
    }

    #[test]
    fn a_recently_released_port_waits_unless_nothing_else_is_free() {
        let mut st = State::default();
        let maps = r#"[{"containerPort":80}]"#;
        let a = alloc(&mut st, "a", maps, "40000-40001", &NoProbe).unwrap();
        assert_eq!(a[0].host_port, 40000);
        st.remove("a", 990);
        // The cursor would wrap to 40000 after 40001, but 40000 was released 10 s ago.
        let b = alloc(&mut st, "b", maps, "40000-40001", &NoProbe).unwrap();
        assert_eq!(b[0].host_port, 40001);
        st.remove("b", 995);
        st.cursors.port = Some(40001);
        let c = alloc(&mut st, "c", maps, "40000-40001", &NoProbe).unwrap();
        assert_eq!(
            c[0].host_port, 40000,
            "next-fit wraps: both are recent, 40000 first"
        );
        // Exhausted but for a recent release: it is handed out rather than failing.
        let d = alloc(&mut st, "d", maps, "40000-40001", &NoProbe).unwrap();
        assert_eq!(d[0].host_port, 40001);
    }
}
