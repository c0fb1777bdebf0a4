//! The ledger flattened into port entries: what `shim ports list` prints, what every export
//! and registrar sink is built from. Pure: the host's address comes from the caller.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::lb;
use crate::state::{LbState, State};
use crate::types::NetworkMode;

/// One mapped port, as the contract names its fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortEntry {
    pub container_id: String,
    pub service: Option<String>,
    pub network_mode: NetworkMode,
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
    #[serde(rename = "bindIP")]
    pub bind_ip: String,
    #[serde(rename = "containerIP")]
    pub container_ip: Option<String>,
    #[serde(rename = "targetIP")]
    pub target_ip: String,
    pub target_port: u16,
    pub name: Option<String>,
    pub dynamic: bool,
    /// `serving`, or `draining` once `shim drain` marked the container.
    pub state: LbState,
    /// awsvpc: the MAC of the task's ENI (for exports that name the ENI).
    #[serde(skip)]
    pub eni_mac: Option<String>,
}

/// Flattens the state into entries (pure: `host_ip` is the host's address for LB targets).
pub fn entries(
    state: &State,
    host_ip: Ipv4Addr,
    container: Option<&str>,
    service: Option<&str>,
) -> Vec<PortEntry> {
    let mut out = Vec::new();
    for c in state.containers.values() {
        if container.is_some_and(|id| id != c.id)
            || service.is_some_and(|s| c.service.as_deref() != Some(s))
        {
            continue;
        }
        // An awsvpc task's own address: its IPv4 one, else (an IPv6-only ENI) its IPv6 one.
        let task_ip: Option<IpAddr> = c.ip.map(IpAddr::V4).or(c.ip6.map(IpAddr::V6));
        for p in &c.ports {
            let (target_ip, target_port) = match c.mode {
                NetworkMode::Awsvpc => (
                    task_ip.map(|i| i.to_string()).unwrap_or_default(),
                    p.container_port,
                ),
                _ => (p.host_ip.unwrap_or(host_ip).to_string(), p.host_port),
            };
            out.push(PortEntry {
                container_id: c.id.clone(),
                // Only names that are safe in every load-balancer format are shown.
                service: c.service.clone().filter(|s| lb::safe_name(s)),
                network_mode: c.mode,
                protocol: p.protocol.to_string(),
                container_port: p.container_port,
                host_port: p.host_port,
                // An awsvpc task listens on its own ENI address.
                bind_ip: match c.mode {
                    NetworkMode::Awsvpc => task_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    _ => IpAddr::V4(p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)),
                }
                .to_string(),
                container_ip: match c.mode {
                    NetworkMode::Awsvpc => task_ip.map(|i| i.to_string()),
                    _ => c.ip.map(|i| i.to_string()),
                },
                target_ip,
                target_port,
                name: p.name.clone(),
                dynamic: p.dynamic,
                state: c.lb,
                eni_mac: c.eni.as_ref().map(|e| e.mac.to_string()),
            });
        }
    }
    out
}

/// Two bridge containers (one of service "web" on dynamic port 49153, one on static 8080), for
/// the tests of what reads entries.
#[cfg(test)]
pub fn sample_state() -> State {
    use crate::state::{ContainerRecord, PortRecord};
    use crate::types::Protocol;
    let mut st = State::default();
    for (id, svc, port) in [("aaa", Some("web"), 49153), ("bbb", None, 8080)] {
        let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
        r.service = svc.map(String::from);
        r.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
        r.ports = vec![PortRecord {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port: port,
            host_ip: None,
            name: None,
            dynamic: port == 49153,
            ct_zone: None,
        }];
        st.containers.insert(id.into(), r);
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        sample_state()
    }

    #[test]
    fn json_has_the_contract_fields() {
        let rows = entries(&state(), Ipv4Addr::new(192, 0, 2, 2), None, None);
        let v = serde_json::to_value(&rows).unwrap();
        for k in [
            "containerId",
            "service",
            "networkMode",
            "protocol",
            "containerPort",
            "hostPort",
            "bindIP",
            "containerIP",
            "targetIP",
            "targetPort",
            "state",
        ] {
            assert!(v[0].get(k).is_some(), "missing {k}: {v}");
        }
        assert_eq!(v[0]["targetIP"], "192.0.2.2");
        assert_eq!(v[0]["targetPort"], 49153);
        assert_eq!(v[0]["networkMode"], "bridge");
        assert_eq!(v[1]["service"], serde_json::Value::Null);
        assert_eq!(v[0]["state"], "serving");
        assert!(v[0].get("eniMac").is_none(), "{v}");
    }

    #[test]
    fn filters_by_container_and_service() {
        let st = state();
        assert_eq!(
            entries(&st, Ipv4Addr::LOCALHOST, Some("bbb"), None).len(),
            1
        );
        assert_eq!(
            entries(&st, Ipv4Addr::LOCALHOST, None, Some("web"))[0].container_id,
            "aaa"
        );
        assert!(entries(&st, Ipv4Addr::LOCALHOST, None, Some("nope")).is_empty());
    }
}
