//! host mode: the container shares the host's network namespace; netshim only claims its ports in
//! the ledger, so a host-mode container and a bridge mapping never both hold one host port.

use anyhow::bail;

use crate::alloc::{self, PortProbe};
use crate::config::Config;
use crate::kernel::Kernel;
use crate::modes::ModeFields;
use crate::modes::bridge::{check_host_ips, port_policy};
use crate::request::{HostPorts, NetworkRequest, PortMapping};
use crate::state::State;

/// Claims `containerPort` on the host for every mapping (ECS: `hostPort` absent, 0 or equal).
/// Checks the ledger (any mode), the reserved list and host listeners.
pub fn plan(
    cfg: &Config,
    state: &mut State,
    id: &str,
    req: &NetworkRequest,
    k: &mut dyn Kernel,
    probe: &dyn PortProbe,
) -> anyhow::Result<ModeFields> {
    let claims: Vec<PortMapping> = req
        .mappings
        .iter()
        .map(|m| PortMapping {
            host: HostPorts::Static(m.container),
            ..m.clone()
        })
        .collect();
    for m in &req.mappings {
        if let HostPorts::Static(h) = m.host
            && h != m.container
        {
            bail!(
                "in host mode hostPort must be absent, 0 or equal to containerPort ({h} != {})",
                m.container
            );
        }
    }
    check_host_ips(k, req)?;
    let mut ports = alloc::allocate_ports(state, id, &claims, &port_policy(cfg, &[]), probe)?;
    for p in &mut ports {
        p.dynamic = false;
    }
    Ok(ModeFields {
        ports,
        ..ModeFields::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::NoProbe;
    use crate::kernel::fake::Fake;
    use crate::request::from_annotations;
    use crate::state::{ContainerRecord, PortRecord};
    use crate::types::NetworkMode;
    use std::collections::HashMap;

    fn req(mode: &str, maps: &str) -> NetworkRequest {
        let mut a = HashMap::new();
        a.insert("netshim.network-mode".to_string(), mode.to_string());
        a.insert("netshim.port-mappings".to_string(), maps.to_string());
        from_annotations(&a).unwrap().unwrap()
    }

    fn hold(state: &mut State, id: &str, mode: NetworkMode, ports: Vec<PortRecord>) {
        let mut r = ContainerRecord::new(id, mode);
        r.ports = ports;
        state.containers.insert(id.into(), r);
    }

    #[test]
    fn host_claims_the_container_port() {
        let mut st = State::default();
        let p = plan(
            &Config::default(),
            &mut st,
            "a",
            &req(
                "host",
                r#"[{"containerPort":18181},{"containerPort":53,"hostPort":53,"protocol":"udp"}]"#,
            ),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap()
        .ports;
        let mut got: Vec<u16> = p.iter().map(|r| r.host_port).collect();
        got.sort();
        assert_eq!(got, vec![53, 18181]);
        assert!(
            p.iter()
                .all(|r| !r.dynamic && r.host_port == r.container_port)
        );
    }

    #[test]
    fn one_ledger_across_modes_in_both_orders() {
        let cfg = Config::default();
        // bridge static first, host second
        let mut st = State::default();
        let b = crate::modes::bridge::plan(
            &cfg,
            &mut st,
            "br",
            &req("bridge", r#"[{"containerPort":80,"hostPort":8080}]"#),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap();
        hold(&mut st, "br", NetworkMode::Bridge, b.ports);
        let e = plan(
            &cfg,
            &mut st,
            "h",
            &req("host", r#"[{"containerPort":8080}]"#),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("8080/tcp is already allocated to container br"),
            "{e}"
        );
        // host first, bridge static second
        let mut st = State::default();
        let h = plan(
            &cfg,
            &mut st,
            "h",
            &req("host", r#"[{"containerPort":8080}]"#),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap()
        .ports;
        hold(&mut st, "h", NetworkMode::Host, h);
        let e = crate::modes::bridge::plan(
            &cfg,
            &mut st,
            "br",
            &req("bridge", r#"[{"containerPort":80,"hostPort":8080}]"#),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("already allocated to container h"),
            "{e}"
        );
    }

    #[test]
    fn reserved_ports_cannot_be_claimed() {
        let e = plan(
            &Config::default(),
            &mut State::default(),
            "a",
            &req("host", r#"[{"containerPort":22}]"#),
            &mut Fake::new(),
            &NoProbe,
        )
        .unwrap_err();
        assert!(e.to_string().contains("22/tcp is reserved"), "{e}");
    }
}
