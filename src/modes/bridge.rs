//! bridge mode: a veth pair on netshim's Linux bridge, NAT for egress, host ports as DNAT map
//! elements.
//!
//! Setup order (each step has its undo pushed before the next runs): allocate address and host
//! ports in the ledger → bridge (created on first use) → veth pair with `eth0` created directly in
//! the container's netns → address, default route and `lo` inside → map elements (one nftables
//! transaction) → UDP conntrack flush. Any error rolls back the steps done so far.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, anyhow, bail};

use crate::alloc::{self, PortPolicy, PortProbe};
use crate::config::{Config, FALLBACK_DYNAMIC_RANGE};
use crate::firewall::{self, Health, Layout};
use crate::kernel::conntrack::{HostPort, Stale};
use crate::kernel::nft::Batch;
use crate::kernel::{At, Kernel, sysctl};
use crate::modes::{ModeFields, ReleaseErrors, SetupCtx, task_firewall, with_rollback};
use crate::names::{BRIDGE_VETH_PREFIX as VETH_PREFIX, fnv, link_name};
use crate::request::NetworkRequest;
use crate::state::{ContainerRecord, PortRecord, State};
use crate::trace;
use crate::types::{MacAddr, NetworkMode, PortRange, Protocol};

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

/// The port policy in force: the dynamic range, the config's reserved ports plus those the host
/// keeps out of its ephemeral range, and the reuse delay of `cfg`.
pub fn port_policy(cfg: &Config, host_reserved: &[u16]) -> PortPolicy {
    let mut reserved = cfg.reserved.clone();
    reserved.extend_from_slice(host_reserved);
    PortPolicy {
        dynamic: dynamic_range(cfg),
        reserved,
        reuse_delay: cfg.reuse_delay.as_secs(),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// Host-side veth name: stable for an id, 11 characters, unique in the ledger.
pub fn veth_name(id: &str, state: &State) -> String {
    link_name(VETH_PREFIX, id, &|n| state.link_holder(n, id).is_some())
}

/// The bridge's fixed MAC: containers' ARP entries for the gateway survive a bridge re-creation,
/// and it tells netshim's bridge from any other link of that name.
pub fn bridge_mac(name: &str) -> MacAddr {
    let h = fnv(name).to_be_bytes();
    MacAddr([0x02, 0x6e, 0x73, h[1], h[2], h[3]])
}

/// Checks that every `hostIp` of the request is an address the host holds now: a mapping bound
/// to someone else's address would be a load-balancer target that is not this host.
pub fn check_host_ips(k: &mut dyn Kernel, req: &NetworkRequest) -> anyhow::Result<()> {
    let wanted: Vec<Ipv4Addr> = req.mappings.iter().filter_map(|m| m.host_ip).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let held = k.addresses(At::Host).context("list the host's addresses")?;
    for ip in wanted {
        if !held.iter().any(|a| a.ip == IpAddr::V4(ip)) {
            bail!(
                "annotation netshim.port-mappings: hostIp {ip} is not an address of this host: give one the host holds, or omit hostIp for all"
            );
        }
    }
    Ok(())
}

/// The host's reserved ports, read only when the request has a dynamic mapping: netshim adds
/// the ports it picks there itself, so a dynamic pick must not take one the host reserved.
pub fn host_reserved(k: &mut dyn Kernel, req: &NetworkRequest) -> anyhow::Result<Vec<u16>> {
    let dynamic = req
        .mappings
        .iter()
        .any(|m| m.host == crate::request::HostPorts::Dynamic);
    if !dynamic {
        return Ok(Vec::new());
    }
    k.reserved_ports()
        .context("read net.ipv4.ip_local_reserved_ports")
}

/// Dynamic host ports of `ports`: netshim keeps them out of the kernel's ephemeral range.
fn dynamic_ports(ports: &[PortRecord]) -> Vec<u16> {
    let mut v: Vec<u16> = ports
        .iter()
        .filter(|p| p.dynamic)
        .map(|p| p.host_port)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Allocates address, veth name and host ports in `state` (the kernel is only read: host
/// addresses for `hostIp`, and the port probe).
pub fn plan(
    cfg: &Config,
    state: &mut State,
    id: &str,
    req: &NetworkRequest,
    k: &mut dyn Kernel,
    probe: &dyn PortProbe,
) -> anyhow::Result<ModeFields> {
    check_host_ips(k, req)?;
    let host_reserved = host_reserved(k, req)?;
    let policy = port_policy(cfg, &host_reserved);
    let mut ports = alloc::allocate_ports(state, id, &req.mappings, &policy, probe)?;
    if ports.iter().any(|p| p.protocol == Protocol::Udp) {
        // Its own conntrack zone: entries made before the mapping (to the host, or to an
        // earlier holder of the port) are in another one and catch none of its datagrams.
        let zone = alloc::allocate_zone(state);
        for p in ports.iter_mut().filter(|p| p.protocol == Protocol::Udp) {
            p.ct_zone = Some(zone);
        }
    }
    let ip = alloc::allocate_ip(state, cfg.subnet)?;
    let veth = veth_name(id, state);
    Ok(ModeFields {
        ip: Some(ip),
        veth: Some(veth),
        bridge: Some(cfg.bridge_name.clone()),
        ports,
        ..ModeFields::default()
    })
}

enum Undo {
    DelLink(String),
    /// Dynamic ports this run added to `ip_local_reserved_ports`.
    Unreserve(Vec<u16>),
    Nft(Batch),
    /// The table was created by this run with nothing else in it.
    DelTable(String),
    /// A host sysctl this run changed, and its old value.
    Sysctl(sysctl::Changed),
}

/// Applies the plan `f` for the container of `c`; on error undoes what it did.
pub fn apply(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    state: &State,
    f: &ModeFields,
) -> anyhow::Result<()> {
    let (Some(ip), Some(veth)) = (f.ip, f.veth.as_deref()) else {
        bail!("bridge plan without an address or a veth name");
    };
    let mut undo = Vec::new();
    let r = apply_steps(k, c.cfg, state, ip, veth, &f.ports, c.ns, &mut undo).and_then(|()| {
        // Bridge containers get the same ingress filter as awsvpc tasks; metadata stays
        // reachable through the host as before.
        match &c.req.ingress {
            Some(rules) => task_firewall(k, c.ns, Some(rules), true),
            None => Ok(()),
        }
    });
    let Err(e) = r else {
        return Ok(());
    };
    let mut left = ReleaseErrors::default();
    for u in undo.into_iter().rev() {
        match &u {
            Undo::DelLink(n) => {
                if let Err(x) = k.del_link(n) {
                    left.push("delete link", n, x);
                }
            }
            Undo::Nft(b) => {
                if let Err(x) = k.nft(b) {
                    left.push("delete map elements", "", x);
                }
            }
            Undo::Unreserve(p) => {
                if let Err(x) = k.change_reserved_ports(&[], p) {
                    left.push("unreserve host ports", "", x);
                }
            }
            Undo::DelTable(t) => {
                if let Err(x) = k.nft(&firewall::delete_table(t)) {
                    left.push("delete table", t, x);
                }
            }
            Undo::Sysctl(c) => {
                if let Err(x) = k.restore_sysctl(c) {
                    left.push("restore sysctl", &c.path, x);
                }
            }
        }
    }
    Err(with_rollback(e, left.into_result()))
}

/// The bridge, created on first use; an existing one is checked to be netshim's and repaired
/// (up, with its gateway address) instead of trusted by name. Returns its index.
fn ensure_bridge(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
    undo: &mut Vec<Undo>,
) -> anyhow::Result<u32> {
    let br = cfg.bridge_name.as_str();
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    match k.link(br).context("look up bridge")? {
        Some(l) => {
            if l.kind.as_deref() != Some("bridge") || l.mac != Some(bridge_mac(br)) {
                bail!(
                    "bridge.name {br} names an existing interface netshim did not create ({}): choose another bridge.name in the config",
                    l.kind.as_deref().unwrap_or("a physical NIC")
                );
            }
            let fixed = k
                .repair_bridge(l.index, l.up, gw, prefix)
                .with_context(|| format!("repair bridge {br}"))?;
            if !fixed.is_empty() {
                eprintln!(
                    "shim: note: bridge {br} was incomplete: {}",
                    fixed.join(", ")
                );
            }
            Ok(l.index)
        }
        None => {
            let i = k
                .create_bridge(br, bridge_mac(br), gw, prefix)
                .with_context(|| format!("create bridge {br}"))?;
            // First use (rare): whether any record names this bridge.
            let others = state
                .records()
                .iter()
                .any(|c| c.bridge.as_deref() == Some(br));
            if !others {
                undo.push(Undo::DelLink(br.to_string()));
            }
            Ok(i)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_steps(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
    ip: Ipv4Addr,
    veth: &str,
    ports: &[PortRecord],
    netns: &std::fs::File,
    undo: &mut Vec<Undo>,
) -> anyhow::Result<()> {
    let br = cfg.bridge_name.as_str();
    let gw = cfg.gateway();
    let prefix = cfg.subnet.prefix();
    let master = ensure_bridge(k, cfg, state, undo)?;
    crate::fault::point("bridge-created");
    let changed = k.bridge_sysctls(br).context("set forwarding sysctls")?;
    undo.extend(changed.into_iter().map(Undo::Sysctl));
    trace::mark("bridge");

    match k.add_veth(veth, master, CONTAINER_IF, netns) {
        Err(e) if e.is(libc::EEXIST) => {
            // A stale host link of ours (the ledger does not know it: a crash between apply and
            // persist) is replaced; anything else of that name is left alone.
            let stale = k
                .link(veth)
                .context("look up the existing link")?
                .is_some_and(|l| l.master == Some(master));
            if stale && k.del_link(veth).unwrap_or(false) {
                k.add_veth(veth, master, CONTAINER_IF, netns)
                    .with_context(|| format!("create veth {veth}"))?;
            } else if stale {
                bail!("create veth {veth}: a stale link of that name could not be deleted");
            } else if k.link(veth).ok().flatten().is_some() {
                bail!(
                    "create veth {veth}: an interface of that name exists and is not on bridge {br}: rename or delete it"
                );
            } else {
                return Err(anyhow!(
                    "create veth {veth}: the container already has an interface named {CONTAINER_IF}: give it a fresh network namespace"
                ));
            }
        }
        r => r.with_context(|| format!("create veth {veth}"))?,
    }
    undo.push(Undo::DelLink(veth.to_string()));
    crate::fault::point("bridge-veth");
    trace::mark("veth");

    k.configure_container(netns, CONTAINER_IF, ip, prefix, gw)
        .with_context(|| {
            format!("configure {CONTAINER_IF} ({ip}/{prefix} via {gw}) in the container")
        })?;
    crate::fault::point("bridge-container");
    trace::mark("container-side");
    // The bridge port turns forwarding when the kernel handles the veth's carrier event, which
    // it does later, from a work queue; a packet sent before (a load balancer's first check and
    // its ARP) is dropped, and ARP asks again only a second later. Getting the link runs that
    // event now (the kernel syncs link state on a single-link RTM_GETLINK), so the container is
    // reachable once the hook returns. Best effort: without it the port comes up all the same.
    let _ = k.link(veth);
    trace::mark("port-forwarding");

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
    let add = firewall::add_elements(&table, ip, ports);
    let added = health == Health::Ok
        && match k.nft(&add) {
            Ok(()) => true,
            // A mapping of this host port retired by a teardown less than a clock tick ago
            // still holds the key with its old container's address. The ledger, under the
            // lock, says the port is this container's: the old element goes, then the add.
            Err(e) if e.errno == Some(libc::EEXIST) => {
                let stale = firewall::delete_elements(&table, ports, &|_| true);
                for d in &stale {
                    let _ = k.nft(d);
                }
                k.nft(&add).is_ok()
            }
            Err(_) => false,
        };
    if !added {
        // Rare (first use, a firewall reload or flush): the whole ledger is read.
        let records = state.records();
        let others = records.iter().any(|c| c.bridge.as_deref() == Some(br));
        let mut batch = layout.rebuild(records.iter())?;
        batch.extend(add);
        k.nft(&batch)
            .map_err(|e| anyhow!("{e} (the table was {})", describe(&health)))
            .context("program the firewall table")?;
        if health == Health::Missing && !others {
            undo.push(Undo::DelTable(table.clone()));
        }
    }
    crate::fault::point("bridge-nft");
    trace::mark("nft");
    if !ports.is_empty() {
        let del = firewall::delete_elements(&table, ports, &|p| still_mapped(state, "", p));
        undo.push(Undo::Nft(firewall::concat(&del)));
        let dynamic = dynamic_ports(ports);
        if !dynamic.is_empty() {
            // Never the source port of an outgoing connection of the host while mapped.
            k.change_reserved_ports(&dynamic, &[])
                .context("reserve the dynamic host ports (net.ipv4.ip_local_reserved_ports)")?;
            undo.push(Undo::Unreserve(dynamic));
        }
        // No conntrack flush: the plan gave every UDP mapping this container's zone, where no
        // entry made before it is looked up.
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

/// `shim gc`'s part for the bridge: netshim's bridge repaired (up, with its gateway address)
/// when it exists, and the firewall made to match the ledger ([`repair_firewall`]). Returns
/// what it did.
pub fn reconcile(
    k: &mut dyn Kernel,
    cfg: &Config,
    records: &[ContainerRecord],
) -> anyhow::Result<Vec<String>> {
    let br = cfg.bridge_name.as_str();
    let mut out = Vec::new();
    if let Some(l) = k.link(br).context("look up bridge")?
        && l.kind.as_deref() == Some("bridge")
        && l.mac == Some(bridge_mac(br))
    {
        let fixed = k
            .repair_bridge(l.index, l.up, cfg.gateway(), cfg.subnet.prefix())
            .with_context(|| format!("repair bridge {br}"))?;
        if !fixed.is_empty() {
            out.push(format!("repaired bridge {br}: {}", fixed.join(", ")));
        }
    }
    out.extend(repair_firewall(k, cfg, records).context("firewall")?);
    Ok(out)
}

/// Makes the firewall table match the ledger: rebuilt atomically when missing (while bridge
/// containers need it) or damaged (chains or rules missing, found with one rule dump);
/// otherwise map and set elements no record knows (a crash between the kernel and the ledger)
/// are deleted and those a record needs are added back. Returns what it fixed.
pub fn repair_firewall(
    k: &mut dyn Kernel,
    cfg: &Config,
    records: &[ContainerRecord],
) -> anyhow::Result<Vec<String>> {
    let table = firewall::table_name(&cfg.bridge_name);
    let layout = Layout {
        table: &table,
        bridge: &cfg.bridge_name,
        subnet: cfg.subnet,
    };
    let t = layout.table_ref();
    let bridged: Vec<&ContainerRecord> = records
        .iter()
        .filter(|c| c.mode == NetworkMode::Bridge)
        .collect();
    let health = layout.health(k.nft_rule_counts(&t)?.as_ref())?;
    match &health {
        Health::Missing if bridged.is_empty() => return Ok(vec![]),
        Health::Ok => {}
        h => {
            k.nft(&layout.rebuild(bridged.iter().copied())?)
                .context("rebuild the firewall table from the ledger")?;
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

/// The UDP host ports whose stale conntrack entries must be flushed: those without a zone of
/// their own (records made before zones). A mapping with a zone needs no flush: entries made
/// before it are in another zone, and its own stop matching when its zone element goes.
fn unzoned_udp_ports(ports: &[PortRecord]) -> Vec<HostPort> {
    ports
        .iter()
        .filter(|p| p.protocol == Protocol::Udp && p.ct_zone.is_none())
        .map(|p| HostPort {
            addr: p.host_ip,
            port: p.host_port,
        })
        .collect()
}

/// Whether another container (not `except`) still maps `p`'s protocol and host port.
fn still_mapped(state: &State, except: &str, p: &PortRecord) -> bool {
    state
        .port_holders(p.protocol, p.host_port)
        .iter()
        .any(|(_, id)| id != except)
}

/// Undoes a container's bridge setup from its record alone. Missing pieces (already deleted,
/// never created) are fine; real failures are collected, not fatal to the other steps.
pub fn teardown(
    k: &mut dyn Kernel,
    state: &State,
    rec: &ContainerRecord,
    errs: &mut ReleaseErrors,
) {
    if !rec.ports.is_empty() {
        let table = firewall::table_name(rec.bridge.as_deref().unwrap_or(firewall::DEFAULT_BRIDGE));
        let others = |p: &PortRecord| still_mapped(state, &rec.id, p);
        // Retired in one update where the kernel can (nothing left for it to free, so the
        // hook's exit does not wait out an RCU grace period); deleted otherwise, or when the
        // update is refused (a table from before the maps had timeouts, elements gone).
        let retired = k.nft_retires_elements()
            && rec.ip.is_some_and(|ip| {
                k.nft(&firewall::retire_elements(&table, ip, &rec.ports, &others))
                    .is_ok()
            });
        let dels = firewall::delete_elements(&table, &rec.ports, &others);
        if !retired && k.nft(&firewall::concat(&dels)).is_err() {
            // Some element or the table is already gone: delete one by one, ignoring absent ones.
            for d in &dels {
                if let Err(e) = k.nft(d)
                    && !e.is_missing()
                {
                    errs.push("delete map element", &table, e);
                }
            }
        }
        trace::mark("nft");
        // Its dynamic ports leave the reserved list unless another mapping (the other
        // protocol) still holds the number.
        let free: Vec<u16> = dynamic_ports(&rec.ports)
            .into_iter()
            .filter(|p| {
                [Protocol::Tcp, Protocol::Udp].iter().all(|proto| {
                    state
                        .port_holders(*proto, *p)
                        .iter()
                        .all(|(_, id)| id == &rec.id)
                })
            })
            .collect();
        if !free.is_empty()
            && let Err(e) = k.change_reserved_ports(&[], &free)
        {
            errs.push("unreserve host ports of", &rec.id, e);
        }
        // A record from before zones: everything DNATed to this container goes, all ports in
        // one request.
        let udp = unzoned_udp_ports(&rec.ports);
        let stale = rec.ip.map_or(Stale::HostPorts(&udp), Stale::RepliesFrom);
        if !udp.is_empty()
            && let Err(e) = k.flush_udp(stale)
        {
            errs.push("flush UDP conntrack entries of", &rec.id, e);
        }
    }
    if let Some(v) = &rec.veth
        && let Err(e) = k.del_link(v)
    {
        errs.push("delete veth", v, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::NoProbe;
    use crate::kernel::Link;
    use crate::kernel::fake::{Fake, netns};
    use crate::kernel::nft::Op;
    use crate::request::from_annotations;
    use crate::types::NetworkMode;
    use std::collections::HashMap;
    use std::path::Path;

    fn request(maps: &str) -> NetworkRequest {
        let mut a = HashMap::new();
        a.insert("netshim.network-mode".to_string(), "bridge".to_string());
        a.insert("netshim.port-mappings".to_string(), maps.to_string());
        from_annotations(&a).unwrap().unwrap()
    }

    fn cfg() -> Config {
        Config::parse("[ports]\ndynamic_range = \"40000-40100\"\n").unwrap()
    }

    fn record(id: &str, f: &ModeFields) -> ContainerRecord {
        let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
        f.clone().fill(&mut r);
        r
    }

    /// Plans and applies a setup of `id` with `maps`; returns the plan and the result.
    fn setup(
        k: &mut Fake,
        st: &mut State,
        id: &str,
        maps: &str,
    ) -> (ModeFields, anyhow::Result<()>) {
        let (cfg, req, ns) = (cfg(), request(maps), netns());
        let f = plan(&cfg, st, id, &req, k, &NoProbe).unwrap();
        let c = SetupCtx {
            cfg: &cfg,
            state_dir: Path::new("/nonexistent"),
            id,
            req: &req,
            eni: None,
            ns,
            pid: 1,
        };
        let r = apply(k, &c, st, &f);
        (f, r)
    }

    const TCP_UDP: &str = r#"[{"containerPort":80},{"containerPort":53,"protocol":"udp"}]"#;

    #[test]
    fn setup_then_teardown_leaves_nothing() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", TCP_UDP);
        r.unwrap();
        let veth = p.veth.clone().unwrap();
        assert!(k.host_link(&veth).is_some());
        // TCP and UDP: map and guard set each, and the UDP mapping's zone.
        assert_eq!(k.elements().len(), 5, "{:?}", k.elements());
        assert!(!k.calls.contains(&"flush_udp".to_string()));
        let rec = record("a", &p);
        st.containers.insert("a".into(), rec.clone());
        let mut errs = ReleaseErrors::default();
        teardown(&mut k, &st, &rec, &mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(k.host_link_names(), vec!["netshim0".to_string()]);
        assert!(k.elements().is_empty(), "{:?}", k.elements());
        // Idempotent: a second teardown finds nothing and reports nothing.
        teardown(&mut k, &st, &rec, &mut errs);
        assert!(errs.is_empty(), "{errs}");
    }

    /// The element operations of the transactions `k` applied from `from` on.
    fn element_ops(k: &Fake, from: usize) -> Vec<&'static str> {
        k.nft_log[from..]
            .iter()
            .flat_map(|b| &b.ops)
            .filter_map(|o| match o {
                Op::AddElements(..) => Some("add"),
                Op::DelElements(..) => Some("delete"),
                Op::RetireElements(..) => Some("retire"),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_teardown_retires_its_elements_where_the_kernel_can_and_deletes_them_elsewhere() {
        for old_kernel in [false, true] {
            let (mut st, mut k) = (State::default(), Fake::new());
            k.no_retire = old_kernel;
            let (p, r) = setup(&mut k, &mut st, "a", TCP_UDP);
            r.unwrap();
            let rec = record("a", &p);
            st.containers.insert("a".into(), rec.clone());
            let from = k.nft_log.len();
            let mut errs = ReleaseErrors::default();
            teardown(&mut k, &st, &rec, &mut errs);
            assert!(errs.is_empty(), "{errs}");
            assert!(k.elements().is_empty(), "{:?}", k.elements());
            // Deleted one transaction per element (TCP and UDP: map and guard set each, and
            // the UDP zone), or retired in one, one operation per set.
            let want: &[&str] = if old_kernel {
                &["delete"; 5]
            } else {
                &["retire", "retire", "retire"]
            };
            assert_eq!(
                element_ops(&k, from),
                want,
                "6.12 or later: {}",
                !old_kernel
            );
        }
    }

    #[test]
    fn a_refused_retirement_falls_back_to_deletion() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", TCP_UDP);
        r.unwrap();
        // The kernel's element points elsewhere than the record says (an update must match).
        let mut rec = record("a", &p);
        rec.ip = Some(Ipv4Addr::new(10, 213, 9, 9));
        st.containers.insert("a".into(), rec.clone());
        let from = k.nft_log.len();
        let mut errs = ReleaseErrors::default();
        teardown(&mut k, &st, &rec, &mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert!(k.elements().is_empty(), "{:?}", k.elements());
        assert_eq!(element_ops(&k, from), ["delete"; 5]);
    }

    #[test]
    fn a_setup_takes_over_a_host_port_whose_retired_element_still_lingers() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let maps = r#"[{"containerPort":80,"hostPort":8080}]"#;
        let (p, r) = setup(&mut k, &mut st, "a", maps);
        r.unwrap();
        // The kernel still holds a's element (retired less than a tick ago), the ledger not.
        let lingering = k.elements();
        let from = k.nft_log.len();
        let (q, r) = setup(&mut k, &mut st, "b", maps);
        r.unwrap();
        assert_ne!(p.ip, q.ip);
        let now = k.elements();
        assert_eq!(now.len(), lingering.len(), "{now:?}");
        let want = q.ip.unwrap().to_string();
        assert!(
            now.iter().any(|e| e.contains("8080") && e.contains(&want)),
            "{now:?}"
        );
        // Not a table rebuild: the stale key was deleted, then the add retried.
        assert_eq!(element_ops(&k, from), ["delete", "add", "add"]);
        let rebuilt = k.nft_log[from..]
            .iter()
            .any(|b| b.ops.iter().any(|o| matches!(o, Op::AddTable(_))));
        assert!(!rebuilt);
    }

    #[test]
    fn udp_mappings_get_one_zone_a_container_and_no_conntrack_flush() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let maps = r#"[{"containerPort":80},{"containerPortRange":"5000-5009","protocol":"udp"},{"containerPort":53,"hostPort":15353,"protocol":"udp"}]"#;
        let (p, r) = setup(&mut k, &mut st, "a", maps);
        r.unwrap();
        assert!(k.flushes.is_empty(), "{:?}", k.flushes);
        let zones: Vec<Option<u16>> = p.ports.iter().map(|x| x.ct_zone).collect();
        let mut want = vec![Some(1); 12];
        want[0] = None; // TCP
        assert_eq!(zones, want);
        let zoned = k.elements();
        let zoned: Vec<&String> = zoned.iter().filter(|e| e.starts_with("zones ")).collect();
        assert_eq!(zoned.len(), 11, "{zoned:?}");
        assert!(
            zoned.iter().any(|e| *e == "zones { 15353 : 1 }"),
            "{zoned:?}"
        );
        // The next container gets the next zone; a TCP-only one none.
        let (q, r) = setup(
            &mut k,
            &mut st,
            "b",
            r#"[{"containerPort":53,"protocol":"udp"}]"#,
        );
        r.unwrap();
        assert_eq!(q.ports[0].ct_zone, Some(2));
        let (t, r) = setup(&mut k, &mut st, "c", r#"[{"containerPort":80}]"#);
        r.unwrap();
        assert_eq!(t.ports[0].ct_zone, None);
        assert_eq!(st.cursors.zone, Some(2));
        let mut errs = ReleaseErrors::default();
        for (id, f) in [("a", &p), ("b", &q), ("c", &t)] {
            let rec = record(id, f);
            st.containers.insert(id.into(), rec.clone());
            teardown(&mut k, &st, &rec, &mut errs);
            st.containers.remove(id);
        }
        assert!(errs.is_empty(), "{errs}");
        assert!(k.flushes.is_empty(), "{:?}", k.flushes);
        assert!(k.elements().is_empty(), "{:?}", k.elements());
    }

    #[test]
    fn a_record_from_before_zones_is_flushed_at_teardown_all_ports_at_once() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let maps = r#"[{"containerPort":80},{"containerPortRange":"5000-5009","protocol":"udp"}]"#;
        let (p, r) = setup(&mut k, &mut st, "a", maps);
        r.unwrap();
        let mut rec = record("a", &p);
        // As an older netshim stored it (and a rebuilt table holds it): no zones.
        for x in &mut rec.ports {
            x.ct_zone = None;
        }
        let (cfg, table) = (cfg(), firewall::table_name(firewall::DEFAULT_BRIDGE));
        let layout = Layout {
            table: &table,
            bridge: &cfg.bridge_name,
            subnet: cfg.subnet,
        };
        k.nft(&layout.rebuild([&rec]).unwrap()).unwrap();
        st.containers.insert("a".into(), rec.clone());
        let mut errs = ReleaseErrors::default();
        teardown(&mut k, &st, &rec, &mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(
            k.flushes,
            [format!("{:?}", Stale::RepliesFrom(p.ip.unwrap()))]
        );
        assert!(k.elements().is_empty(), "{:?}", k.elements());
    }

    #[test]
    fn every_failing_step_rolls_back_completely() {
        for step in ["create_bridge", "sysctls", "add_veth", "configure", "nft"] {
            let (mut st, mut k) = (State::default(), Fake::new());
            k.fail_at = Some(step);
            let (_, r) = setup(&mut k, &mut st, "a", TCP_UDP);
            assert!(r.is_err(), "{step} must fail the setup");
            assert!(
                k.host_link_names().is_empty(),
                "{step}: links left: {:?}",
                k.host_link_names()
            );
            assert!(
                k.elements().is_empty(),
                "{step}: elements left: {:?}",
                k.elements()
            );
        }
    }

    #[test]
    fn a_rollback_that_cannot_delete_the_veth_says_so_and_what_retries() {
        let (mut st, mut k) = (State::default(), Fake::new());
        k.fail_at = Some("configure");
        k.fail_also = Some("del_link");
        let (p, r) = setup(&mut k, &mut st, "a", TCP_UDP);
        let msg = format!("{:#}", r.unwrap_err());
        let veth = p.veth.unwrap();
        assert!(
            msg.contains(&format!(
                "(rollback incomplete: delete link {veth}: Device or resource busy (os error 16); delete link netshim0: Device or resource busy (os error 16); `shim gc` retries)"
            )),
            "{msg}"
        );
        // The bridge this setup created is undone too (and fails alike); the rest still ran.
        assert!(k.elements().is_empty(), "{:?}", k.elements());
        assert!(k.reserved.is_empty(), "{:?}", k.reserved);
    }

    #[test]
    fn rollback_keeps_the_bridge_other_containers_use() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
        r.unwrap();
        st.containers.insert("a".into(), record("a", &p));
        k.fail_at = Some("configure");
        let (_, r) = setup(&mut k, &mut st, "b", r#"[{"containerPort":80}]"#);
        assert!(r.is_err());
        assert_eq!(
            k.host_link_names(),
            vec!["netshim0".to_string(), p.veth.clone().unwrap()]
        );
        assert_eq!(k.elements().len(), 2);
    }

    #[test]
    fn missing_table_is_rebuilt_from_the_ledger() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
        r.unwrap();
        st.containers.insert("a".into(), record("a", &p));
        // A firewall reload wipes the table.
        k.nft.tables.clear();
        let (_, r) = setup(&mut k, &mut st, "b", r#"[{"containerPort":80}]"#);
        r.unwrap();
        assert_eq!(
            k.elements().len(),
            4,
            "a's mappings restored along with b's: {:?}",
            k.elements()
        );
    }

    fn host_table() -> crate::kernel::nft::TableRef {
        firewall::host_table(firewall::TABLE)
    }

    #[test]
    fn a_flushed_table_is_noticed_and_rebuilt_with_every_mapping() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
        r.unwrap();
        st.containers.insert("a".into(), record("a", &p));
        let whole = k.nft.rule_counts(&host_table());
        // `nft flush table ip netshim`: rules gone, maps and their elements kept.
        k.nft.flush(&host_table());
        let (_, r) = setup(&mut k, &mut st, "b", r#"[{"containerPort":80}]"#);
        r.unwrap();
        assert_eq!(k.nft.rule_counts(&host_table()), whole, "rules are back");
        assert_eq!(k.elements().len(), 4, "{:?}", k.elements());
    }

    #[test]
    fn a_container_without_ports_still_gets_the_table_for_egress() {
        let (mut st, mut k) = (State::default(), Fake::new());
        let (_, r) = setup(&mut k, &mut st, "a", "[]");
        r.unwrap();
        let counts = k.nft.rule_counts(&host_table()).expect("table created");
        assert_eq!(counts.get("postrouting"), Some(&3));
        assert!(k.elements().is_empty());
    }

    #[test]
    fn gc_repair_deletes_strays_and_rebuilds_a_damaged_table() {
        let (cfg, mut st, mut k) = (cfg(), State::default(), Fake::new());
        let (p, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
        r.unwrap();
        // A setup killed after its transaction and before its record was stored.
        let (_, r) = setup(
            &mut k,
            &mut st,
            "b",
            r#"[{"containerPort":81,"protocol":"udp"}]"#,
        );
        r.unwrap();
        st.containers.insert("a".into(), record("a", &p));
        assert_eq!(k.elements().len(), 5);
        let fixed = repair_firewall(&mut k, &cfg, &st.records()).unwrap();
        assert_eq!(fixed.len(), 3, "{fixed:?}");
        assert!(fixed.iter().all(|f| f.starts_with("deleted stray element")));
        assert_eq!(k.elements().len(), 2, "{:?}", k.elements());
        assert!(
            repair_firewall(&mut k, &cfg, &st.records())
                .unwrap()
                .is_empty()
        );
        // A flushed table is rebuilt, with the ledger's mappings.
        k.nft.flush(&host_table());
        let fixed = repair_firewall(&mut k, &cfg, &st.records()).unwrap();
        assert!(
            fixed[0].contains("rebuilt firewall table ip netshim (damaged"),
            "{fixed:?}"
        );
        assert_eq!(k.elements().len(), 2);
        assert!(
            repair_firewall(&mut k, &cfg, &st.records())
                .unwrap()
                .is_empty()
        );
        // No table and no bridge container: nothing to create.
        let mut empty = Fake::new();
        assert!(repair_firewall(&mut empty, &cfg, &[]).unwrap().is_empty());
        assert!(empty.nft.tables.is_empty());
    }

    #[test]
    fn a_bridge_left_without_its_address_or_down_is_repaired() {
        let (mut st, mut k) = (State::default(), Fake::new());
        // A setup killed during first-use bridge creation: the bridge exists, down, no address.
        let idx = k.add_host_link(Link {
            name: "netshim0".into(),
            kind: Some("bridge".into()),
            mac: Some(bridge_mac("netshim0")),
            up: false,
            ..Link::default()
        });
        let (_, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
        r.unwrap();
        let br = k.host_link("netshim0").unwrap();
        assert!(br.up, "bridge brought up");
        assert!(
            k.state(At::Host)
                .addrs
                .iter()
                .any(|a| a.index == idx && a.ip == IpAddr::V4(Ipv4Addr::new(10, 213, 0, 1))),
            "gateway address added"
        );
    }

    #[test]
    fn a_bridge_name_that_is_not_netshims_bridge_is_refused_and_left_alone() {
        for (kind, mac) in [
            (None, Some(MacAddr([2, 0, 0, 0, 0, 1]))),
            (Some("bridge"), Some(MacAddr([2, 0, 0, 0, 0, 1]))),
            (Some("veth"), Some(bridge_mac("netshim0"))),
        ] {
            let (mut st, mut k) = (State::default(), Fake::new());
            k.add_host_link(Link {
                name: "netshim0".into(),
                kind: kind.map(String::from),
                mac,
                up: true,
                ..Link::default()
            });
            let (_, r) = setup(&mut k, &mut st, "a", r#"[{"containerPort":80}]"#);
            let e = format!("{:#}", r.unwrap_err());
            assert!(
                e.contains("names an existing interface netshim did not create"),
                "{e}"
            );
            assert_eq!(k.host_link_names(), vec!["netshim0".to_string()]);
            assert!(!k.calls.contains(&"repair_bridge".to_string()));
        }
    }

    #[test]
    fn veth_names_are_short_stable_and_unique() {
        let mut st = State::default();
        let n = veth_name("abc", &st);
        assert_eq!(n.len(), 11);
        assert!(crate::names::is_our_name(VETH_PREFIX, &n));
        assert_eq!(n, veth_name("abc", &st));
        assert_ne!(n, veth_name("abd", &st));
        // Another container already holds the name "abc" hashes to: the salt picks another.
        let mut other = ContainerRecord::new("zzz", NetworkMode::Bridge);
        other.veth = Some(n.clone());
        st.containers.insert("zzz".into(), other);
        let salted = veth_name("abc", &st);
        assert_ne!(salted, n);
        assert_eq!(salted, format!("nsh{:08x}", fnv("abc#1")));
    }
}
