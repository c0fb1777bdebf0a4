//! bridge mode: a veth pair on netshim's Linux bridge, NAT for egress, host ports as DNAT map
//! elements.
//!
//! Setup order (each step has its undo pushed before the next runs): allocate address and host
//! ports in the ledger → bridge (created on first use) → veth pair with `eth0` created directly in
//! the container's netns → address, default route and `lo` inside → map elements (one nftables
//! transaction) → UDP conntrack flush. Any error rolls back the steps done so far.

use std::fs::File;
use std::net::Ipv4Addr;

use anyhow::{Context, anyhow};

use crate::alloc::{self, PortPolicy, PortProbe};
use crate::config::{Config, FALLBACK_DYNAMIC_RANGE};
use crate::firewall::{self, Layout};
use crate::kernel::sysctl;
use crate::modes::Kernel;
use crate::request::{NetworkRequest, PortRange, Protocol};
use crate::state::{ContainerRecord, PortRecord, State};
use crate::trace;

/// Name of the container's interface.
pub const CONTAINER_IF: &str = "eth0";

/// The dynamic range in force: the config's, else the kernel's ephemeral range, else ECS's.
pub fn dynamic_range(cfg: &Config) -> PortRange {
    cfg.dynamic_range
        .unwrap_or_else(|| match sysctl::local_port_range() {
            Some((start, end)) => PortRange { start, end },
            None => FALLBACK_DYNAMIC_RANGE,
        })
}

/// FNV-1a: short, stable names (veths) and MACs derived from ids and names.
pub fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Host-side veth name: stable for an id, 11 characters, unique in the ledger.
pub fn veth_name(id: &str, state: &State) -> String {
    (0u32..)
        .map(|salt| {
            let key = if salt == 0 {
                id.to_string()
            } else {
                format!("{id}#{salt}")
            };
            format!("nsh{:08x}", fnv(&key))
        })
        .find(|n| {
            !state
                .containers
                .values()
                .any(|c| c.id != id && c.veth.as_deref() == Some(n))
        })
        .unwrap_or_else(|| "nsh00000000".into())
}

/// The bridge's fixed MAC: containers' ARP entries for the gateway survive a bridge re-creation.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let h = fnv(name).to_be_bytes();
    [0x02, 0x6e, 0x73, h[1], h[2], h[3]]
}

/// Where this container plugs in, decided before the kernel is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ip: Ipv4Addr,
    pub veth: String,
    pub ports: Vec<PortRecord>,
}

/// Allocates address, veth name and host ports in `state` (pure apart from the port probe).
pub fn plan(
    cfg: &Config,
    state: &mut State,
    id: &str,
    req: &NetworkRequest,
    probe: &dyn PortProbe,
) -> anyhow::Result<Plan> {
    let policy = PortPolicy {
        dynamic: dynamic_range(cfg),
        reserved: &cfg.reserved,
    };
    let ports = alloc::allocate_ports(state, id, &req.mappings, &policy, probe)?;
    let ip = alloc::allocate_ip(state, cfg.subnet)?;
    let veth = veth_name(id, state);
    Ok(Plan { ip, veth, ports })
}

enum Undo {
    DelLink(String),
    Nft(String),
    /// The table was created by this run with nothing else in it.
    DelTable,
}

/// Applies `plan` for container `id`; on error undoes what it did and returns the error.
pub fn apply(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
    plan: &Plan,
    netns: &File,
) -> anyhow::Result<()> {
    let mut undo = Vec::new();
    match apply_steps(k, cfg, state, plan, netns, &mut undo) {
        Ok(()) => Ok(()),
        Err(e) => {
            let mut failed = Vec::new();
            for u in undo.into_iter().rev() {
                let r = match &u {
                    Undo::DelLink(n) => k
                        .del_link(n)
                        .map(|_| ())
                        .map_err(|e| format!("delete link {n}: {e}")),
                    Undo::Nft(s) => k.nft(s).map_err(|e| e.to_string()),
                    Undo::DelTable => k
                        .nft(&firewall::delete_table_script())
                        .map_err(|e| e.to_string()),
                };
                if let Err(m) = r {
                    failed.push(m);
                }
            }
            if failed.is_empty() {
                Err(e)
            } else {
                Err(e.context(format!(
                    "rollback incomplete ({}); run `shim gc`",
                    failed.join("; ")
                )))
            }
        }
    }
}

fn apply_steps(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
    plan: &Plan,
    netns: &File,
    undo: &mut Vec<Undo>,
) -> anyhow::Result<()> {
    let br = cfg.bridge_name.as_str();
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    let master = match k.link_index(br).context("look up bridge")? {
        Some(i) => i,
        None => {
            let i = k
                .create_bridge(br, bridge_mac(br), gw, prefix)
                .with_context(|| format!("create bridge {br}"))?;
            let others = state
                .containers
                .values()
                .any(|c| c.bridge.as_deref() == Some(br));
            if !others {
                undo.push(Undo::DelLink(br.to_string()));
            }
            i
        }
    };
    k.bridge_sysctls(br).context("set forwarding sysctls")?;
    trace::mark("bridge");

    let veth = plan.veth.as_str();
    match k.add_veth(veth, master, CONTAINER_IF, netns) {
        Err(e) if e.is(libc::EEXIST) => {
            // Either a stale host link of ours (the ledger does not know it: a crash between
            // apply and persist), or the container already has an eth0.
            if k.del_link(veth).unwrap_or(false) {
                k.add_veth(veth, master, CONTAINER_IF, netns)
                    .with_context(|| format!("create veth {veth}"))?;
            } else {
                return Err(anyhow!(
                    "create veth {veth}: the container already has an interface named {CONTAINER_IF}: give it a fresh network namespace"
                ));
            }
        }
        r => r.with_context(|| format!("create veth {veth}"))?,
    }
    undo.push(Undo::DelLink(veth.to_string()));
    trace::mark("veth");

    k.configure_container(netns, CONTAINER_IF, plan.ip, prefix, gw)
        .with_context(|| {
            format!(
                "configure {CONTAINER_IF} ({}/{prefix} via {gw}) in the container",
                plan.ip
            )
        })?;
    trace::mark("container-side");

    if !plan.ports.is_empty() {
        let add = firewall::add_elements(plan.ip, &plan.ports);
        if let Err(first) = k.nft(&add) {
            // Table missing (first use, or wiped by a firewall reload) or out of step with the
            // ledger: rebuild it from the ledger plus this container, atomically.
            let layout = Layout {
                bridge: br,
                subnet: cfg.subnet,
            };
            let empty = state.containers.values().all(|c| c.ports.is_empty());
            let mut script = layout.rebuild_script(state.containers.values());
            script += &add;
            k.nft(&script)
                .map_err(|e| anyhow!("{e} (after: {first})"))
                .context("program port mappings")?;
            if empty {
                undo.push(Undo::DelTable);
            }
        }
        trace::mark("nft");
        let del = firewall::delete_elements(&plan.ports, &|p| still_mapped(state, "", p));
        undo.push(Undo::Nft(del.concat()));
        for p in plan.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            k.flush_udp(p.host_port).with_context(|| {
                format!("flush UDP conntrack entries for host port {}", p.host_port)
            })?;
        }
    }
    Ok(())
}

/// Whether another container (not `except`) still maps `p`'s protocol and host port.
fn still_mapped(state: &State, except: &str, p: &PortRecord) -> bool {
    state.containers.values().any(|c| {
        c.id != except
            && c.ports
                .iter()
                .any(|q| q.protocol == p.protocol && q.host_port == p.host_port)
    })
}

/// Undoes a container's bridge setup from its record alone. Missing pieces (already deleted,
/// never created) are fine; real failures are collected, not fatal to the other steps.
pub fn teardown(k: &mut dyn Kernel, state: &State, rec: &ContainerRecord) -> Vec<String> {
    let mut errors = Vec::new();
    if !rec.ports.is_empty() {
        let dels = firewall::delete_elements(&rec.ports, &|p| still_mapped(state, &rec.id, p));
        if k.nft(&dels.concat()).is_err() {
            // Some element or the table is already gone: delete one by one, ignoring absent ones.
            for d in &dels {
                if let Err(e) = k.nft(d)
                    && !e.is_missing()
                {
                    errors.push(format!("{}: {e}", d.trim()));
                }
            }
        }
        for p in rec.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            if let Err(e) = k.flush_udp(p.host_port) {
                errors.push(format!("flush UDP conntrack for port {}: {e}", p.host_port));
            }
        }
    }
    if let Some(v) = &rec.veth
        && let Err(e) = k.del_link(v)
    {
        errors.push(format!("delete veth {v}: {e}"));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::NoProbe;
    use crate::kernel::netlink::NlError;
    use crate::kernel::nft::NftError;
    use crate::request::{NetworkMode, from_annotations};
    use std::collections::HashMap;
    use std::io;

    /// Records every kernel call and fails the one named in `fail_at`.
    #[derive(Default)]
    struct Fake {
        links: Vec<String>,
        elements: Vec<String>,
        calls: Vec<String>,
        fail_at: Option<&'static str>,
        table: bool,
    }

    impl Fake {
        fn step(&mut self, name: &'static str) -> Result<(), NlError> {
            self.calls.push(name.into());
            if self.fail_at == Some(name) {
                return Err(NlError::Io(io::Error::from_raw_os_error(libc::EPERM)));
            }
            Ok(())
        }
    }

    impl Kernel for Fake {
        fn link_index(&mut self, name: &str) -> Result<Option<u32>, NlError> {
            Ok(self
                .links
                .iter()
                .position(|l| l == name)
                .map(|i| i as u32 + 1))
        }
        fn create_bridge(
            &mut self,
            name: &str,
            _: [u8; 6],
            _: Ipv4Addr,
            _: u8,
        ) -> Result<u32, NlError> {
            self.step("create_bridge")?;
            self.links.push(name.into());
            Ok(self.links.len() as u32)
        }
        fn bridge_sysctls(&mut self, _: &str) -> io::Result<()> {
            self.step("sysctls").map_err(|_| io::Error::other("sysctl"))
        }
        fn add_veth(&mut self, host: &str, _: u32, _: &str, _: &File) -> Result<(), NlError> {
            self.step("add_veth")?;
            self.links.push(host.into());
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
            let n = self.links.len();
            self.links.retain(|l| l != name);
            Ok(n != self.links.len())
        }
        fn nft(&mut self, script: &str) -> Result<(), NftError> {
            self.calls.push("nft".into());
            if self.fail_at == Some("nft") {
                return Err(NftError {
                    msg: "Operation not permitted".into(),
                });
            }
            for line in script.lines() {
                if line.starts_with("add table") || line.starts_with("table ip") {
                    self.table = true;
                } else if line.starts_with("delete table") {
                    self.table = false;
                    self.elements.clear();
                } else if let Some(rest) = line.strip_prefix("add element ") {
                    if !self.table {
                        return Err(NftError {
                            msg: "No such file or directory".into(),
                        });
                    }
                    self.elements.push(rest.into());
                } else if let Some(rest) = line.strip_prefix("delete element ") {
                    let key = rest.split(" }").next().unwrap_or("");
                    self.elements.retain(|e| !e.starts_with(key));
                }
            }
            Ok(())
        }
        fn flush_udp(&mut self, _: u16) -> io::Result<()> {
            self.step("flush_udp")
                .map_err(|_| io::Error::other("conntrack"))
        }
    }

    fn request(maps: &str) -> NetworkRequest {
        let mut a = HashMap::new();
        a.insert("netshim.network-mode".to_string(), "bridge".to_string());
        a.insert("netshim.port-mappings".to_string(), maps.to_string());
        from_annotations(&a).unwrap().unwrap()
    }

    fn cfg() -> Config {
        Config::parse("[ports]\ndynamic_range = \"40000-40100\"\n").unwrap()
    }

    fn record(id: &str, p: &Plan) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            mode: NetworkMode::Bridge,
            service: None,
            created: 0,
            pid: None,
            netns_inode: None,
            ip: Some(p.ip),
            veth: Some(p.veth.clone()),
            bridge: Some("netshim0".into()),
            ports: p.ports.clone(),
            eni: None,
            lb: Default::default(),
        }
    }

    fn netns() -> File {
        File::open("/dev/null").unwrap()
    }

    #[test]
    fn setup_then_teardown_leaves_nothing() {
        let (cfg, mut st, mut k) = (cfg(), State::default(), Fake::default());
        let req = request(r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#);
        let p = plan(&cfg, &mut st, "a", &req, &NoProbe).unwrap();
        apply(&mut k, &cfg, &st, &p, &netns()).unwrap();
        assert!(k.links.contains(&p.veth));
        assert_eq!(k.elements.len(), 4, "{:?}", k.elements);
        assert!(k.calls.contains(&"flush_udp".to_string()));
        let rec = record("a", &p);
        st.containers.insert("a".into(), rec.clone());
        assert!(teardown(&mut k, &st, &rec).is_empty());
        assert_eq!(k.links, vec!["netshim0".to_string()]);
        assert!(k.elements.is_empty(), "{:?}", k.elements);
        // Idempotent: a second teardown finds nothing and reports nothing.
        assert!(teardown(&mut k, &st, &rec).is_empty());
    }

    #[test]
    fn every_failing_step_rolls_back_completely() {
        for step in [
            "create_bridge",
            "sysctls",
            "add_veth",
            "configure",
            "nft",
            "flush_udp",
        ] {
            let (cfg, mut st, mut k) = (
                cfg(),
                State::default(),
                Fake {
                    fail_at: Some(step),
                    ..Default::default()
                },
            );
            let req = request(r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#);
            let p = plan(&cfg, &mut st, "a", &req, &NoProbe).unwrap();
            assert!(
                apply(&mut k, &cfg, &st, &p, &netns()).is_err(),
                "{step} must fail the setup"
            );
            assert!(k.links.is_empty(), "{step}: links left: {:?}", k.links);
            assert!(
                k.elements.is_empty(),
                "{step}: elements left: {:?}",
                k.elements
            );
        }
    }

    #[test]
    fn rollback_keeps_the_bridge_other_containers_use() {
        let (cfg, mut st, mut k) = (cfg(), State::default(), Fake::default());
        let p = plan(
            &cfg,
            &mut st,
            "a",
            &request(r#"[{"containerPort":80}]"#),
            &NoProbe,
        )
        .unwrap();
        apply(&mut k, &cfg, &st, &p, &netns()).unwrap();
        st.containers.insert("a".into(), record("a", &p));
        k.fail_at = Some("configure");
        let p2 = plan(
            &cfg,
            &mut st,
            "b",
            &request(r#"[{"containerPort":80}]"#),
            &NoProbe,
        )
        .unwrap();
        assert!(apply(&mut k, &cfg, &st, &p2, &netns()).is_err());
        assert_eq!(k.links, vec!["netshim0".to_string(), p.veth.clone()]);
        assert_eq!(k.elements.len(), 2);
    }

    #[test]
    fn missing_table_is_rebuilt_from_the_ledger() {
        let (cfg, mut st, mut k) = (cfg(), State::default(), Fake::default());
        let p = plan(
            &cfg,
            &mut st,
            "a",
            &request(r#"[{"containerPort":80}]"#),
            &NoProbe,
        )
        .unwrap();
        apply(&mut k, &cfg, &st, &p, &netns()).unwrap();
        st.containers.insert("a".into(), record("a", &p));
        // A firewall reload wipes the table.
        k.table = false;
        k.elements.clear();
        let p2 = plan(
            &cfg,
            &mut st,
            "b",
            &request(r#"[{"containerPort":80}]"#),
            &NoProbe,
        )
        .unwrap();
        apply(&mut k, &cfg, &st, &p2, &netns()).unwrap();
        assert_eq!(
            k.elements.len(),
            4,
            "a's mappings restored along with b's: {:?}",
            k.elements
        );
    }

    #[test]
    fn veth_names_are_short_stable_and_unique() {
        let st = State::default();
        let n = veth_name("abc", &st);
        assert_eq!(n.len(), 11);
        assert_eq!(n, veth_name("abc", &st));
        assert_ne!(n, veth_name("abd", &st));
    }
}
