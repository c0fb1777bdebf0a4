//! Load-balancer registration: the exports of `shim ports list --format`, the sinks a
//! registrar keeps equal to the ledger (HAProxy runtime API, an nginx include, a Prometheus
//! file-sd file, etcd), the cluster view read back from etcd, the registrars' status files and
//! the connection count `shim drain` waits on.
//!
//! Everything here reads the ledger through [`crate::state::StateDir`] (or, for the cluster
//! view, etcd); nothing in the hook's path calls into this module.

pub mod cluster;
pub mod conns;
pub mod entries;
pub mod etcd;
pub mod export;
pub mod filesd;
pub mod haproxy;
pub mod nginx;
pub mod registrar;
pub mod status;

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::lb::entries::PortEntry;
use crate::state::LbState;

/// An address as the host part of `host:port`: an IPv6 address in brackets, anything else as
/// it is.
pub fn bracket(ip: &str) -> std::borrow::Cow<'_, str> {
    if ip.contains(':') {
        format!("[{ip}]").into()
    } else {
        ip.into()
    }
}

/// Whether a name may go into a load-balancer format: `[A-Za-z0-9_.-]{1,64}`. Such a name
/// cannot break out of an HAProxy command, an nginx directive or a JSON string.
pub fn safe_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One target a load balancer sends traffic to, in the group (HAProxy backend, nginx upstream)
/// it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub group: String,
    pub addr: SocketAddrV4,
    pub draining: bool,
    pub container: String,
}

/// The group names of every TCP target: `<service>` for each container's first TCP mapping,
/// and `<service>.<name>` for every named TCP mapping (so a container's second port can have a
/// backend of its own). Targets without a service, or whose group name is not a
/// [`safe_name`], are left out. Sorted by group, then address; no duplicates.
pub fn targets(entries: &[PortEntry]) -> Vec<Target> {
    let mut out = Vec::new();
    let mut firsts: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for e in entries {
        if e.protocol != "tcp" {
            continue;
        }
        let Some(svc) = e.service.as_deref() else {
            continue;
        };
        let Ok(ip) = e.target_ip.parse::<Ipv4Addr>() else {
            continue;
        };
        if ip.is_unspecified() {
            continue;
        }
        let addr = SocketAddrV4::new(ip, e.target_port);
        let draining = e.state == LbState::Draining;
        let mut push = |group: String| {
            if safe_name(&group) {
                out.push(Target {
                    group,
                    addr,
                    draining,
                    container: e.container_id.clone(),
                });
            }
        };
        if firsts.insert(e.container_id.as_str()) {
            push(svc.to_string());
        }
        if let Some(n) = e.name.as_deref() {
            push(format!("{svc}.{n}"));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.group == b.group && a.addr == b.addr);
    out
}

#[cfg(test)]
pub(crate) mod testdata {
    //! A ledger with every mode and state the exports handle, for the golden tests.
    use std::net::Ipv4Addr;

    use crate::state::{ContainerRecord, EniRecord, LbState, PortRecord, State};
    use crate::types::{Attachment, MacAddr, NetworkMode, Protocol};

    fn port(proto: Protocol, cport: u16, hport: u16, name: Option<&str>) -> PortRecord {
        PortRecord {
            protocol: proto,
            container_port: cport,
            host_port: hport,
            host_ip: None,
            name: name.map(String::from),
            dynamic: hport >= 49153,
            ct_zone: None,
        }
    }

    fn rec(
        id: &str,
        mode: NetworkMode,
        svc: Option<&str>,
        ports: Vec<PortRecord>,
    ) -> ContainerRecord {
        let mut r = ContainerRecord::new(id, mode);
        r.service = svc.map(String::from);
        r.created = 1;
        r.ports = ports;
        r
    }

    /// web: two bridge replicas (one draining, one with a named metrics port), a host-mode
    /// replica; api: an awsvpc task; a UDP-only container, one with no service, one whose
    /// service name is unsafe.
    pub fn state() -> State {
        let mut st = State::default();
        let mut add = |r: ContainerRecord| {
            st.containers.insert(r.id.clone(), r);
        };
        let mut a = rec(
            "web-a",
            NetworkMode::Bridge,
            Some("web"),
            vec![
                port(Protocol::Tcp, 80, 49153, None),
                port(Protocol::Tcp, 9100, 49154, Some("metrics")),
            ],
        );
        a.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
        add(a);
        let mut b = rec(
            "web-b",
            NetworkMode::Bridge,
            Some("web"),
            vec![port(Protocol::Tcp, 80, 49155, None)],
        );
        b.ip = Some(Ipv4Addr::new(10, 213, 0, 3));
        b.lb = LbState::Draining;
        add(b);
        add(rec(
            "web-h",
            NetworkMode::Host,
            Some("web"),
            vec![port(Protocol::Tcp, 8080, 8080, None)],
        ));
        let mut t = rec(
            "api-1",
            NetworkMode::Awsvpc,
            Some("api"),
            vec![port(Protocol::Tcp, 443, 443, None)],
        );
        t.ip = Some(Ipv4Addr::new(10, 0, 1, 23));
        t.eni = Some(EniRecord {
            mac: MacAddr([2, 0, 0, 0, 1, 0x23]),
            name: "eth1".into(),
            attachment: Attachment::Exclusive,
            netns_pin: None,
            veth: None,
            table: None,
            subnet: None,
            gateway: None,
            mtu: None,
            trunk: None,
            vlan: None,
        });
        add(t);
        let mut d = rec(
            "dns-1",
            NetworkMode::Bridge,
            Some("dns"),
            vec![port(Protocol::Udp, 53, 5353, None)],
        );
        d.ip = Some(Ipv4Addr::new(10, 213, 0, 4));
        add(d);
        let mut n = rec(
            "loose",
            NetworkMode::Bridge,
            None,
            vec![port(Protocol::Tcp, 80, 49156, None)],
        );
        n.ip = Some(Ipv4Addr::new(10, 213, 0, 5));
        add(n);
        let mut bad = rec(
            "evil",
            NetworkMode::Bridge,
            Some("x;\nset server a/b state ready"),
            vec![port(Protocol::Tcp, 80, 49157, None)],
        );
        bad.ip = Some(Ipv4Addr::new(10, 213, 0, 6));
        add(bad);
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::entries::entries;

    #[test]
    fn safe_names() {
        for ok in ["web", "a", "web.metrics", "my_svc-2", &"x".repeat(64)] {
            assert!(safe_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a;b",
            "a\nb",
            "a/b",
            "a{b",
            "é",
            "a\"b",
            &"x".repeat(65),
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn targets_group_by_service_and_port_name() {
        let st = testdata::state();
        let e = entries(&st, Ipv4Addr::new(192, 0, 2, 2), None, None);
        let t: Vec<(String, String, bool)> = targets(&e)
            .into_iter()
            .map(|t| (t.group, t.addr.to_string(), t.draining))
            .collect();
        assert_eq!(
            t,
            vec![
                ("api".into(), "10.0.1.23:443".into(), false),
                ("web".into(), "192.0.2.2:8080".into(), false),
                ("web".into(), "192.0.2.2:49153".into(), false),
                ("web".into(), "192.0.2.2:49155".into(), true),
                ("web.metrics".into(), "192.0.2.2:49154".into(), false),
            ]
        );
    }
}
