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
use crate::firewall::{self, Health, Layout};
use crate::kernel::nft::Batch;
use crate::kernel::sysctl;
use crate::modes::Kernel;
use crate::request::{NetworkMode, NetworkRequest, PortRange, Protocol};
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
    Nft(Batch),
    /// The table was created by this run with nothing else in it.
    DelTable(String),
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
                    Undo::Nft(b) => k.nft(b).map_err(|e| e.to_string()),
                    Undo::DelTable(t) => {
                        k.nft(&firewall::delete_table(t)).map_err(|e| e.to_string())
                    }
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

    // The table (NAT for egress, DNAT maps): checked with one rule dump, rebuilt from the ledger
    // when missing or damaged (a firewall reload, `nft flush table`), else only this
    // container's elements are added.
    let table = firewall::table_name(br);
    let layout = Layout {
        table: &table,
        bridge: br,
        subnet: cfg.subnet,
    };
    let health = match k.nft_rule_counts(&layout.table_ref()) {
        Ok(counts) => layout.health(counts.as_ref())?,
        Err(e) => Health::Damaged(e.to_string()),
    };
    let add = firewall::add_elements(&table, plan.ip, &plan.ports);
    let added = health == Health::Ok && k.nft(&add).is_ok();
    if !added {
        let others = state
            .containers
            .values()
            .any(|c| c.bridge.as_deref() == Some(br));
        let mut batch = layout.rebuild(state.containers.values())?;
        batch.extend(add);
        k.nft(&batch)
            .map_err(|e| anyhow!("{e} (table was {})", describe(&health)))
            .context("program the firewall table")?;
        if health == Health::Missing && !others {
            undo.push(Undo::DelTable(table.clone()));
        }
    }
    trace::mark("nft");
    if !plan.ports.is_empty() {
        let del = firewall::delete_elements(&table, &plan.ports, &|p| still_mapped(state, "", p));
        undo.push(Undo::Nft(firewall::concat(&del)));
        for p in plan.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            k.flush_udp(p.host_port).with_context(|| {
                format!("flush UDP conntrack entries for host port {}", p.host_port)
            })?;
        }
    }
    Ok(())
}

fn describe(h: &Health) -> String {
    match h {
        Health::Ok => "whole".into(),
        Health::Missing => "missing".into(),
        Health::Damaged(why) => format!("damaged: {why}"),
    }
}

/// Makes the firewall table match the ledger (for `shim gc`): rebuilt when missing (while
/// bridge containers need it) or damaged; otherwise map and set elements no record knows are
/// deleted and those a record needs are added back. Returns what it fixed.
pub fn repair_firewall(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
) -> anyhow::Result<Vec<String>> {
    let table = firewall::table_name(&cfg.bridge_name);
    let layout = Layout {
        table: &table,
        bridge: &cfg.bridge_name,
        subnet: cfg.subnet,
    };
    let t = layout.table_ref();
    let bridged: Vec<&ContainerRecord> = state
        .containers
        .values()
        .filter(|c| c.mode == NetworkMode::Bridge)
        .collect();
    let health = layout.health(k.nft_rule_counts(&t)?.as_ref())?;
    match &health {
        Health::Missing if bridged.is_empty() => return Ok(vec![]),
        Health::Ok => {}
        h => {
            k.nft(&layout.rebuild(bridged.iter().copied())?)
                .context("rebuild the firewall table")?;
            return Ok(vec![format!(
                "rebuilt firewall table {t} ({})",
                describe(h)
            )]);
        }
    }
    let mut listed = Vec::new();
    for s in firewall::sets() {
        let elems = k.nft_elements(&t, &s)?;
        listed.push((s, elems));
    }
    let (batch, report) = firewall::reconcile(&table, &listed, bridged);
    if !batch.is_empty() {
        k.nft(&batch).context("fix firewall map elements")?;
    }
    Ok(report)
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
        let table = firewall::table_name(rec.bridge.as_deref().unwrap_or(firewall::DEFAULT_BRIDGE));
        let dels =
            firewall::delete_elements(&table, &rec.ports, &|p| still_mapped(state, &rec.id, p));
        if k.nft(&firewall::concat(&dels)).is_err() {
            // Some element or the table is already gone: delete one by one, ignoring absent ones.
            for d in &dels {
                if let Err(e) = k.nft(d)
                    && !e.is_missing()
                {
                    errors.push(e.to_string());
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
    use crate::kernel::nft::fake::Tables;
    use crate::kernel::nft::{Element, NftError, TableRef};
    use crate::request::from_annotations;
    use std::collections::{BTreeMap, HashMap};
    use std::io;

    /// Records every kernel call and fails the one named in `fail_at`.
    #[derive(Default)]
    struct Fake {
        links: Vec<String>,
        nft: Tables,
        calls: Vec<String>,
        fail_at: Option<&'static str>,
    }

    impl Fake {
        fn elements(&self) -> Vec<String> {
            self.nft.all_elements()
        }

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
        fn nft(&mut self, batch: &Batch) -> Result<(), NftError> {
            self.calls.push("nft".into());
            if self.fail_at == Some("nft") {
                return Err(NftError::os(libc::EPERM, "fake"));
            }
            self.nft.apply(batch)
        }
        fn nft_rule_counts(
            &mut self,
            table: &TableRef,
        ) -> Result<Option<BTreeMap<String, usize>>, NftError> {
            Ok(self.nft.rule_counts(table))
        }
        fn nft_elements(
            &mut self,
            table: &TableRef,
            set: &crate::kernel::nft::Set,
        ) -> Result<Vec<Element>, NftError> {
            self.nft.elements(table, set)
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
        assert_eq!(k.elements().len(), 4, "{:?}", k.elements());
        assert!(k.calls.contains(&"flush_udp".to_string()));
        let rec = record("a", &p);
        st.containers.insert("a".into(), rec.clone());
        assert!(teardown(&mut k, &st, &rec).is_empty());
        assert_eq!(k.links, vec!["netshim0".to_string()]);
        assert!(k.elements().is_empty(), "{:?}", k.elements());
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
                k.elements().is_empty(),
                "{step}: elements left: {:?}",
                k.elements()
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
        assert_eq!(k.elements().len(), 2);
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
        k.nft.tables.clear();
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
            k.elements().len(),
            4,
            "a's mappings restored along with b's: {:?}",
            k.elements()
        );
    }

    fn host_table() -> TableRef {
        firewall::host_table(firewall::TABLE)
    }

    #[test]
    fn a_flushed_table_is_noticed_and_rebuilt_with_every_mapping() {
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
        let whole = k.nft.rule_counts(&host_table());
        // `nft flush table ip netshim`: rules gone, maps and their elements kept.
        k.nft.flush(&host_table());
        let p2 = plan(
            &cfg,
            &mut st,
            "b",
            &request(r#"[{"containerPort":80}]"#),
            &NoProbe,
        )
        .unwrap();
        apply(&mut k, &cfg, &st, &p2, &netns()).unwrap();
        assert_eq!(k.nft.rule_counts(&host_table()), whole, "rules are back");
        assert_eq!(k.elements().len(), 4, "{:?}", k.elements());
    }

    #[test]
    fn a_container_without_ports_still_gets_the_table_for_egress() {
        let (cfg, mut st, mut k) = (cfg(), State::default(), Fake::default());
        let p = plan(&cfg, &mut st, "a", &request("[]"), &NoProbe).unwrap();
        apply(&mut k, &cfg, &st, &p, &netns()).unwrap();
        let counts = k.nft.rule_counts(&host_table()).expect("table created");
        assert_eq!(counts.get("postrouting"), Some(&3));
        assert!(k.elements().is_empty());
    }

    #[test]
    fn gc_repair_deletes_strays_and_rebuilds_a_damaged_table() {
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
        // A setup killed after its transaction and before its record was stored.
        let p2 = plan(
            &cfg,
            &mut st,
            "b",
            &request(r#"[{"containerPort":81,"protocol":"udp"}]"#),
            &NoProbe,
        )
        .unwrap();
        apply(&mut k, &cfg, &st, &p2, &netns()).unwrap();
        st.containers.insert("a".into(), record("a", &p));
        assert_eq!(k.elements().len(), 4);
        let fixed = repair_firewall(&mut k, &cfg, &st).unwrap();
        assert_eq!(fixed.len(), 2, "{fixed:?}");
        assert!(fixed.iter().all(|f| f.starts_with("deleted stray element")));
        assert_eq!(k.elements().len(), 2, "{:?}", k.elements());
        assert!(repair_firewall(&mut k, &cfg, &st).unwrap().is_empty());
        // A flushed table is rebuilt, with the ledger's mappings.
        k.nft.flush(&host_table());
        let fixed = repair_firewall(&mut k, &cfg, &st).unwrap();
        assert!(
            fixed[0].contains("rebuilt firewall table ip netshim (damaged"),
            "{fixed:?}"
        );
        assert_eq!(k.elements().len(), 2);
        assert!(repair_firewall(&mut k, &cfg, &st).unwrap().is_empty());
        // No table and no bridge container: nothing to create.
        let mut empty = Fake::default();
        assert!(
            repair_firewall(&mut empty, &cfg, &State::default())
                .unwrap()
                .is_empty()
        );
        assert!(empty.nft.tables.is_empty());
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
