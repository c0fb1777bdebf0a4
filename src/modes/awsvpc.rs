//! awsvpc mode: the task gets its own ENI.
//!
//! - **exclusive**: the host interface with the ENI's MAC moves into the task's netns as `eth0`
//!   with the ENI's addresses and a default route via the subnet gateway. The task's netns is
//!   pinned under the state dir until poststop, which hands the interface back under its original
//!   name, down and without addresses.
//! - **shared**: the ENI stays on the host; the task takes one of its secondary addresses through
//!   a veth pair (a /32 in the task, a link-local gateway with a permanent neighbour entry), a
//!   host route to the task address, and a policy rule sending traffic from it through the ENI's
//!   own route table. Proxy ARP on the ENI answers for the task's address in the subnet.
//!
//! In both, the task's own firewall blocks instance metadata (unless allowed) and enforces
//! `netshim.ingress`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ipnetwork::Ipv4Network;

use crate::config::AwsvpcConfig;
use crate::firewall;
use crate::kernel::netlink::Netlink;
use crate::kernel::nft::Nft;
use crate::kernel::{netns, sysctl};
use crate::metadata;
use crate::request::{
    Attachment, EniSpec, HostPorts, IngressRule, NetworkMode, PortMapping, mac_string, parse_mac,
};
use crate::state::{EniRecord, PortRecord, State};

/// Rule priority of the shared-ENI policy rules (`from <task ip> lookup <table>`).
pub const RULE_PRIORITY: u32 = 2000;
/// Shared-ENI route tables are `TABLE_BASE + <ENI ifindex>`.
pub const TABLE_BASE: u32 = 10000;
/// The link-local gateway shared-ENI tasks route through.
pub const LINK_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Link alias of an ENI given to a task: this prefix and its name on the host.
pub const ALIAS_PREFIX: &str = "netshim:";
/// MAC of every shared-ENI host veth end (each is its own point-to-point link).
pub const HOST_VETH_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

/// Fills in an ENI given by MAC alone from instance metadata.
pub fn resolve(cfg: &AwsvpcConfig, mut eni: EniSpec) -> anyhow::Result<EniSpec> {
    if eni.needs_metadata() {
        let f = metadata::lookup(cfg, &eni.mac)?;
        eni.ipv4 = f.ipv4;
        eni.ipv6 = f.ipv6;
        eni.gateway4 = eni.gateway4.or(f.gateway4);
        eni.validate()?;
        if eni.ipv4.is_empty() {
            bail!(
                "instance metadata lists no IPv4 address for ENI {}",
                mac_string(&eni.mac)
            );
        }
    }
    Ok(eni)
}

/// Port mappings in awsvpc mode are ECS's: the task's own port on its own address.
pub fn ports(mappings: &[PortMapping]) -> Vec<PortRecord> {
    let mut out = Vec::new();
    for m in mappings {
        for (i, p) in (m.container.start..=m.container.end).enumerate() {
            let host = match m.host {
                HostPorts::Static(h) => h.start + i as u16,
                HostPorts::Dynamic => p,
            };
            out.push(PortRecord {
                protocol: m.protocol,
                container_port: p,
                host_port: host,
                host_ip: None,
                name: m.name.clone(),
                dynamic: false,
            });
        }
    }
    out
}

fn glob(pat: &str, s: &str) -> bool {
    match (pat.chars().next(), s.chars().next()) {
        (None, None) => true,
        (Some('*'), _) => {
            glob(&pat[1..], s)
                || (!s.is_empty() && glob(pat, &s[s.chars().next().map_or(0, char::len_utf8)..]))
        }
        (Some('?'), Some(c)) => glob(&pat[1..], &s[c.len_utf8()..]),
        (Some(a), Some(b)) if a == b => glob(&pat[a.len_utf8()..], &s[b.len_utf8()..]),
        _ => false,
    }
}

/// Waits (bounded) for the interface with `mac` in the host netns and checks netshim may take it.
fn find_eni(
    nl: &mut Netlink,
    cfg: &AwsvpcConfig,
    state: &State,
    id: &str,
    eni: &EniSpec,
) -> anyhow::Result<(u32, String)> {
    let mac = mac_string(&eni.mac);
    for c in state.containers.values().filter(|c| c.id != id) {
        if let Some(e) = &c.eni
            && parse_mac(&e.mac) == Some(eni.mac)
            && (e.attachment == Attachment::Exclusive || eni.attachment == Attachment::Exclusive)
        {
            bail!(
                "ENI {mac} is already given to task {}: an exclusive ENI serves one task",
                c.id
            );
        }
    }
    let deadline = Instant::now() + cfg.eni_wait;
    let (index, name) = loop {
        if let Some(found) = nl.find_by_mac(&eni.mac)? {
            break found;
        }
        if Instant::now() >= deadline {
            bail!(
                "no interface with MAC {mac} appeared within {:.1}s: check that the ENI is attached to this host (awsvpc.eni_wait_seconds sets the wait)",
                cfg.eni_wait.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if nl.default_route_oif()? == Some(index) {
        bail!(
            "ENI {mac} is {name}, which holds the host's default route: the host's primary interface is never given to a task"
        );
    }
    if !cfg.allowed_interfaces.is_empty() && !cfg.allowed_interfaces.iter().any(|p| glob(p, &name))
    {
        bail!("ENI {mac} is {name}, which is not in awsvpc.allowed_interfaces");
    }
    Ok((index, name))
}

/// Applies the task's firewall (metadata block, ingress) inside its netns.
pub fn task_firewall(
    ns: &File,
    ingress: Option<&[IngressRule]>,
    allow_metadata: bool,
) -> anyhow::Result<()> {
    let Some(batch) = firewall::task_batch(ingress, allow_metadata)? else {
        return Ok(());
    };
    Nft::open_in(ns.as_fd())
        .and_then(|mut n| n.apply(&batch))
        .context("program the task's firewall")
}

/// The result of a setup: what goes into the record.
pub struct Setup {
    pub ip: Ipv4Addr,
    pub eni: EniRecord,
}

/// Sets up `eni` for the task whose netns is `ns` (pid `pid`). Rolls back on error.
#[allow(clippy::too_many_arguments)]
pub fn setup(
    cfg: &AwsvpcConfig,
    state: &State,
    state_dir: &Path,
    id: &str,
    pid: i32,
    ns: &File,
    eni: &EniSpec,
    ingress: Option<&[IngressRule]>,
) -> anyhow::Result<Setup> {
    let mut nl = Netlink::open()?;
    let (index, name) = find_eni(&mut nl, cfg, state, id, eni)?;
    let result = match eni.attachment {
        Attachment::Exclusive => exclusive(&mut nl, state_dir, id, pid, ns, eni, index, &name),
        Attachment::Shared => shared(&mut nl, state, id, ns, eni, index, &name),
    };
    let setup = result?;
    if let Err(e) = task_firewall(ns, ingress, cfg.allow_metadata_access) {
        let errs = teardown(&setup.eni, Some(setup.ip), state, id);
        return Err(e.context(if errs.is_empty() {
            "rolled back".to_string()
        } else {
            format!("rollback incomplete: {}", errs.join("; "))
        }));
    }
    Ok(setup)
}

fn pin_path(state_dir: &Path, id: &str) -> std::path::PathBuf {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir.join("netns").join(safe)
}

#[allow(clippy::too_many_arguments)]
fn exclusive(
    nl: &mut Netlink,
    state_dir: &Path,
    id: &str,
    pid: i32,
    ns: &File,
    eni: &EniSpec,
    index: u32,
    name: &str,
) -> anyhow::Result<Setup> {
    let ip = eni
        .ipv4
        .first()
        .map(|n| n.ip())
        .ok_or_else(|| anyhow!("ENI {} has no IPv4 address", mac_string(&eni.mac)))?;
    let pin = pin_path(state_dir, id);
    netns::pin(pid, &pin).with_context(|| format!("pin the task's netns at {}", pin.display()))?;
    let rec = EniRecord {
        mac: mac_string(&eni.mac),
        name: name.to_string(),
        attachment: Attachment::Exclusive,
        netns_pin: Some(pin.clone()),
        veth: None,
        table: None,
        subnet: None,
        gateway: None,
    };
    let r = (|| -> anyhow::Result<()> {
        // The original name travels with the interface too, for whoever finds it later.
        nl.set_alias(index, &format!("{ALIAS_PREFIX}{name}"))
            .context("record the original name in the link alias")?;
        nl.move_to_netns(index, ns.as_fd(), "eth0")
            .with_context(|| format!("move {name} into the task's netns as eth0"))?;
        let mut t = Netlink::open_in(ns.as_fd())?;
        t.set_up("lo")?;
        let idx = t
            .find_by_mac(&eni.mac)?
            .map(|(i, _)| i)
            .ok_or_else(|| anyhow!("ENI vanished while moving into the task"))?;
        t.set_link(idx, None, None, eni.mtu)
            .context("set the MTU")?;
        for a in &eni.ipv4 {
            t.add_addr4(idx, a.ip(), a.prefix())
                .with_context(|| format!("add {a}"))?;
        }
        for a in &eni.ipv6 {
            t.add_addr6(idx, a.ip(), a.prefix())
                .with_context(|| format!("add {a}"))?;
        }
        t.set_link(idx, Some(true), None, None)
            .context("bring eth0 up")?;
        if let Some(gw) = eni.gateway4() {
            t.add_route(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                0,
                Some(IpAddr::V4(gw)),
                idx,
                254,
            )
            .with_context(|| format!("default route via {gw}"))?;
        }
        if let Some(gw) = eni.gateway6 {
            t.add_route(
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                0,
                Some(IpAddr::V6(gw)),
                idx,
                254,
            )
            .with_context(|| format!("IPv6 default route via {gw}"))?;
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(Setup { ip, eni: rec }),
        Err(e) => {
            let errs = give_back(&rec);
            Err(if errs.is_empty() {
                e
            } else {
                e.context(format!("rollback incomplete: {}", errs.join("; ")))
            })
        }
    }
}

/// Hands an exclusive ENI back to the host: from the pinned netns if it still exists, else
/// (the kernel already returned it) by restoring its name. Then releases the pin.
fn give_back(rec: &EniRecord) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(mac) = parse_mac(&rec.mac) else {
        return vec![format!("bad MAC {:?} in the state", rec.mac)];
    };
    let host = match File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => return vec![format!("open own netns: {e}")],
    };
    // A pin whose bind mount is gone (reboot, another mount namespace) is only an empty file.
    let pinned = rec
        .netns_pin
        .as_ref()
        .and_then(|p| File::open(p).ok())
        .filter(netns::is_nsfs);
    if let Some(ns) = pinned {
        let r = (|| -> anyhow::Result<()> {
            let mut t = Netlink::open_in(ns.as_fd())?;
            if let Some((idx, _)) = t.find_by_mac(&mac)? {
                // Moving drops every address; the interface arrives down under its old name.
                t.move_to_netns(idx, host.as_fd(), &rec.name)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            errs.push(format!("return ENI {} to the host: {e:#}", rec.mac));
        }
    }
    // Already on the host (pin gone, or returned above): make sure it is down and named right.
    let r = (|| -> anyhow::Result<()> {
        let mut nl = Netlink::open()?;
        if let Some((idx, name)) = nl.find_by_mac(&mac)? {
            nl.set_link(
                idx,
                Some(false),
                (name != rec.name).then_some(rec.name.as_str()),
                None,
            )?;
            nl.set_alias(idx, "")?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        errs.push(format!("restore ENI {} on the host: {e:#}", rec.mac));
    }
    if let Some(p) = &rec.netns_pin
        && let Err(e) = netns::unpin(p)
    {
        errs.push(format!("release netns pin {}: {e}", p.display()));
    }
    errs
}

fn shared_veth_name(id: &str) -> String {
    format!("nsa{:08x}", crate::modes::bridge::fnv(id))
}

/// Tasks on the shared ENI `mac`, other than `except`.
fn shared_users<'a>(
    state: &'a State,
    mac: &'a str,
    except: &'a str,
) -> impl Iterator<Item = &'a crate::state::ContainerRecord> {
    state.containers.values().filter(move |c| {
        c.id != except
            && c.mode == NetworkMode::Awsvpc
            && c.eni
                .as_ref()
                .is_some_and(|e| e.mac == mac && e.attachment == Attachment::Shared)
    })
}

fn shared(
    nl: &mut Netlink,
    state: &State,
    id: &str,
    ns: &File,
    eni: &EniSpec,
    index: u32,
    name: &str,
) -> anyhow::Result<Setup> {
    let mac = mac_string(&eni.mac);
    let used: Vec<Ipv4Addr> = shared_users(state, &mac, id).filter_map(|c| c.ip).collect();
    let pick = eni
        .ipv4
        .iter()
        .find(|a| !used.contains(&a.ip()))
        .ok_or_else(|| anyhow!("no free secondary IP on ENI {mac} ({} of {} in use): add secondary addresses to the ENI or use another one", used.len(), eni.ipv4.len()))?;
    let ip = pick.ip();
    let subnet = Ipv4Network::new(pick.network(), pick.prefix())?;
    let gw = eni
        .gateway4()
        .ok_or_else(|| anyhow!("ENI {mac}: no gateway"))?;
    let table = TABLE_BASE + index;
    let veth = shared_veth_name(id);
    let rec = EniRecord {
        mac: mac.clone(),
        name: name.to_string(),
        attachment: Attachment::Shared,
        netns_pin: None,
        veth: Some(veth.clone()),
        table: Some(table),
        subnet: Some(subnet.to_string()),
        gateway: Some(gw),
    };
    let r = (|| -> anyhow::Result<()> {
        nl.set_link(index, Some(true), None, None)
            .with_context(|| format!("bring {name} up"))?;
        sysctl::enable_ip_forward()?;
        sysctl::set_conf(name, "proxy_arp", "1")?;
        for (dst, prefix, via) in [
            (subnet.network(), subnet.prefix(), None),
            (Ipv4Addr::UNSPECIFIED, 0, Some(IpAddr::V4(gw))),
        ] {
            match nl.add_route(IpAddr::V4(dst), prefix, via, index, table) {
                Err(e) if !e.is(libc::EEXIST) => {
                    return Err(
                        anyhow!(e).context(format!("route {dst}/{prefix} in table {table}"))
                    );
                }
                _ => {}
            }
        }
        nl.add_veth(&veth, None, Some(HOST_VETH_MAC), "eth0", ns.as_fd())
            .with_context(|| format!("create veth {veth}"))?;
        let vidx = nl
            .index_of(&veth)?
            .ok_or_else(|| anyhow!("veth {veth} vanished"))?;
        nl.set_link(vidx, Some(true), None, None)?;
        nl.add_route(IpAddr::V4(ip), 32, None, vidx, 254)
            .with_context(|| format!("host route to {ip}"))?;
        nl.add_rule(ip, table, RULE_PRIORITY)
            .with_context(|| format!("rule from {ip} lookup {table}"))?;
        let mut t = Netlink::open_in(ns.as_fd())?;
        t.set_up("lo")?;
        let tidx = t
            .index_of("eth0")?
            .ok_or_else(|| anyhow!("eth0 missing in the task"))?;
        t.set_link(tidx, Some(true), None, eni.mtu)?;
        t.add_addr4(tidx, ip, 32)?;
        t.add_route(IpAddr::V4(LINK_GATEWAY), 32, None, tidx, 254)?;
        t.add_route(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(LINK_GATEWAY)),
            tidx,
            254,
        )?;
        t.add_neigh(tidx, LINK_GATEWAY, HOST_VETH_MAC)?;
        Ok(())
    })();
    match r {
        Ok(()) => Ok(Setup { ip, eni: rec }),
        Err(e) => {
            let errs = release_shared(&rec, Some(ip), state, id);
            Err(if errs.is_empty() {
                e
            } else {
                e.context(format!("rollback incomplete: {}", errs.join("; ")))
            })
        }
    }
}

fn release_shared(rec: &EniRecord, ip: Option<Ipv4Addr>, state: &State, id: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let mut nl = match Netlink::open() {
        Ok(n) => n,
        Err(e) => return vec![e.to_string()],
    };
    if let (Some(ip), Some(table)) = (ip, rec.table)
        && let Err(e) = nl.del_rule(ip, table, RULE_PRIORITY)
    {
        errs.push(format!("delete rule from {ip}: {e}"));
    }
    if let Some(v) = &rec.veth
        && let Err(e) = nl.del_link(v)
    {
        errs.push(format!("delete veth {v}: {e}"));
    }
    // The ENI's table goes with its last task.
    if shared_users(state, &rec.mac, id).next().is_none()
        && let (Some(table), Some(subnet), Some(gw)) = (
            rec.table,
            rec.subnet
                .as_deref()
                .and_then(|s| s.parse::<Ipv4Network>().ok()),
            rec.gateway,
        )
        && let Some(mac) = parse_mac(&rec.mac)
        && let Ok(Some((index, _))) = nl.find_by_mac(&mac)
    {
        for (dst, prefix, via) in [
            (Ipv4Addr::UNSPECIFIED, 0, Some(IpAddr::V4(gw))),
            (subnet.network(), subnet.prefix(), None),
        ] {
            if let Err(e) = nl.del_route(IpAddr::V4(dst), prefix, via, index, table) {
                errs.push(format!("delete route {dst}/{prefix} table {table}: {e}"));
            }
        }
    }
    errs
}

/// Undoes an awsvpc setup from its record; idempotent.
pub fn teardown(rec: &EniRecord, ip: Option<Ipv4Addr>, state: &State, id: &str) -> Vec<String> {
    match rec.attachment {
        Attachment::Exclusive => give_back(rec),
        Attachment::Shared => release_shared(rec, ip, state, id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("eth*", "eth1"));
        assert!(glob("ens?", "ens5"));
        assert!(!glob("eth*", "ens5"));
        assert!(glob("*", ""));
        assert!(glob("e*1", "eth1"));
    }

    #[test]
    fn awsvpc_ports_are_the_container_ports() {
        let m = crate::request::parse_mappings(
            r#"[{"containerPort":80},{"containerPort":81,"hostPort":81}]"#,
        )
        .unwrap();
        let p = ports(&m);
        assert!(
            p.iter()
                .all(|r| r.host_port == r.container_port && !r.dynamic)
        );
    }
}
