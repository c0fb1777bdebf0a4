//! Shared ENI: the ENI stays on the host; the task takes one of its secondary addresses through a
//! veth pair (a /32 in the task, a link-local gateway with a permanent neighbour entry), a host
//! route to the task address, and a policy rule sending traffic from it through the ENI's own
//! route table. Proxy ARP on the ENI answers for the task's address in the subnet.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, anyhow, bail};
use ipnetwork::Ipv4Network;

use crate::kernel::{At, Kernel, Link, LinkChange, MAIN_TABLE, Route};
use crate::modes::awsvpc::eligible::{self, Use};
use crate::modes::awsvpc::find;
use crate::modes::{ModeFields, ReleaseErrors, SetupCtx, with_rollback};
use crate::names::{
    SHARED_TABLE_BASE, SHARED_VETH_MAC, SHARED_VETH_PREFIX, link_name, owner_alias,
};
use crate::request::EniSpec;
use crate::state::{ContainerRecord, EniRecord, State};
use crate::types::{Attachment, MacAddr, NetworkMode};

/// Rule priority of the shared-ENI policy rules (`from <task ip> lookup <table>`).
pub const RULE_PRIORITY: u32 = 2000;
/// The link-local gateway shared-ENI tasks route through.
pub const LINK_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// With instance metadata answering for the ENI, every requested address must be one of its
/// secondary addresses (the ones metadata lists after the primary). Asked before the lock; a
/// host without a metadata service (or one that does not know the MAC) is not checked here.
pub fn check_listed(cfg: &crate::config::AwsvpcConfig, eni: &EniSpec) -> anyhow::Result<()> {
    if eni.attachment != Attachment::Shared {
        return Ok(());
    }
    let Some(listed) = crate::metadata::listed_ipv4(cfg, &eni.mac) else {
        return Ok(());
    };
    let secondary = &listed[1..];
    if let Some(a) = eni.ipv4.iter().find(|a| !secondary.contains(&a.ip())) {
        let what = if listed[0] == a.ip() {
            "the ENI's primary address".to_string()
        } else {
            "not among the ENI's secondary addresses in instance metadata".to_string()
        };
        bail!(
            "ENI {}: ipv4Addresses lists {}, {what}: list only its secondary addresses ({}), or assign {} to the ENI first",
            eni.mac,
            a.ip(),
            if secondary.is_empty() {
                "it has none".to_string()
            } else {
                secondary
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            a.ip()
        );
    }
    Ok(())
}

/// How many tasks other than `except` use the shared ENI `mac`.
pub fn users(state: &State, mac: MacAddr, except: &str) -> usize {
    state
        .eni_holders(mac, except)
        .iter()
        .filter(|h| h.detail == Attachment::Shared.as_str())
        .count()
}

/// Checks the ENI and picks a free secondary address: never the host's own, never one another
/// task holds.
pub fn plan(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    state: &State,
    eni: &EniSpec,
    link: &Link,
) -> anyhow::Result<ModeFields> {
    eligible::check(k, c.cfg, state, c.id, link, Use::Shared)?;
    if !eni.ipv6.is_empty() {
        bail!(
            "ENI {}: a shared ENI hands out IPv4 secondary addresses only: give IPv6 tasks an exclusive or branch ENI",
            eni.mac
        );
    }
    let host = k.addresses(At::Host).context("list the host's addresses")?;
    if let Some(a) = eni
        .ipv4
        .iter()
        .find(|a| host.iter().any(|h| h.ip == IpAddr::V4(a.ip())))
    {
        bail!(
            "ENI {}: ipv4Addresses lists {}, an address of this host: list only the ENI's secondary addresses",
            eni.mac,
            a.ip()
        );
    }
    let used = users(state, eni.mac, c.id);
    let pick = eni
        .ipv4
        .iter()
        .find(|a| state.ip_holder(IpAddr::V4(a.ip()), c.id).is_none())
        .ok_or_else(|| {
            anyhow!(
                "no free secondary IP on ENI {} ({used} of {} in use): add secondary addresses to the ENI or use another one",
                eni.mac,
                eni.ipv4.len()
            )
        })?;
    let ip = pick.ip();
    let subnet = Ipv4Network::new(pick.network(), pick.prefix())?;
    let gw = eni
        .gateway4()
        .ok_or_else(|| anyhow!("ENI {}: no gateway", eni.mac))?;
    let veth = link_name(SHARED_VETH_PREFIX, c.id, &|n| {
        state.link_holder(n, c.id).is_some()
    });
    Ok(ModeFields {
        ip: Some(ip),
        eni: Some(EniRecord {
            mac: eni.mac,
            name: link.name.clone(),
            attachment: Attachment::Shared,
            veth: Some(veth),
            table: Some(SHARED_TABLE_BASE + link.index),
            subnet: Some(subnet.to_string()),
            gateway: Some(gw),
            ..EniRecord::default()
        }),
        ..ModeFields::default()
    })
}

/// What the setup changed on the host that its release does not undo by itself.
#[derive(Default)]
struct Done {
    brought_up: bool,
    proxy_arp_was: Option<String>,
    /// `ip_forward` as this setup found it, when it changed it.
    forward_was: Option<crate::kernel::sysctl::Changed>,
}

fn table_routes(subnet: Ipv4Network, gw: Ipv4Addr, oif: u32, table: u32) -> [Route; 2] {
    [
        Route {
            dst: IpAddr::V4(subnet.network()),
            prefix: subnet.prefix(),
            via: None,
            oif,
            table,
        },
        Route {
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
            via: Some(IpAddr::V4(gw)),
            oif,
            table,
        },
    ]
}

/// Sets the task up on the shared ENI; on error undoes it.
pub fn apply(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    state: &State,
    eni: &EniSpec,
    rec: &EniRecord,
    f: &ModeFields,
) -> anyhow::Result<()> {
    let mut done = Done::default();
    let r = steps(k, c, eni, rec, f, &mut done);
    let Err(e) = r else { return Ok(()) };
    let mut left = ReleaseErrors::default();
    let mut full = ContainerRecord::new(c.id, NetworkMode::Awsvpc);
    f.clone().fill(&mut full);
    release(k, state, &full, rec, &mut left);
    let first_user = users(state, rec.mac, c.id) == 0;
    if first_user {
        if let Some(v) = &done.proxy_arp_was
            && let Err(x) = k.set_conf(&rec.name, "proxy_arp", v)
        {
            left.push("restore proxy_arp on", &rec.name, x);
        }
        if done.brought_up
            && let Ok(Some(l)) = find(k, At::Host, rec.mac)
            && let Err(x) = k.set_link(
                At::Host,
                l.index,
                LinkChange {
                    up: Some(false),
                    ..LinkChange::default()
                },
            )
        {
            left.push("restore the state of", &rec.name, x);
        }
    }
    // Forwarding was off before this setup turned it on: nothing else needed it.
    if let Some(c) = &done.forward_was
        && let Err(x) = k.restore_sysctl(c)
    {
        left.push("restore", "ip_forward", x);
    }
    Err(with_rollback(e, left.into_result()))
}

fn steps(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    eni: &EniSpec,
    rec: &EniRecord,
    f: &ModeFields,
    done: &mut Done,
) -> anyhow::Result<()> {
    let (Some(ip), Some(veth), Some(table), Some(gw)) =
        (f.ip, rec.veth.as_deref(), rec.table, rec.gateway)
    else {
        bail!("shared-ENI plan is incomplete");
    };
    let subnet: Ipv4Network = rec
        .subnet
        .as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("shared-ENI plan without a subnet"))?;
    let name = rec.name.as_str();
    let link = find(k, At::Host, rec.mac)?
        .ok_or_else(|| anyhow!("ENI {} vanished from the host", rec.mac))?;
    if !link.up {
        k.set_link(
            At::Host,
            link.index,
            LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        )
        .with_context(|| format!("bring {name} up"))?;
        done.brought_up = true;
    }
    done.forward_was = k.enable_forwarding().context("enable IPv4 forwarding")?;
    let was = k
        .set_conf(name, "proxy_arp", "1")
        .with_context(|| format!("enable proxy ARP on {name}"))?;
    if was != "1" {
        done.proxy_arp_was = Some(was);
    }
    for r in table_routes(subnet, gw, link.index, table) {
        match k.add_route(At::Host, &r) {
            Err(e) if !e.is(libc::EEXIST) => {
                return Err(
                    anyhow!(e).context(format!("route {}/{} in table {table}", r.dst, r.prefix))
                );
            }
            _ => {}
        }
    }
    k.add_pair(veth, Some(SHARED_VETH_MAC), "eth0", c.ns)
        .with_context(|| format!("create veth {veth}"))?;
    crate::fault::point("awsvpc-shared-veth");
    let vidx = k
        .link(veth)
        .context("look up the new veth")?
        .map(|l| l.index)
        .ok_or_else(|| anyhow!("veth {veth} vanished"))?;
    k.set_link(
        At::Host,
        vidx,
        LinkChange {
            up: Some(true),
            ..LinkChange::default()
        },
    )
    .with_context(|| format!("bring veth {veth} up"))?;
    // The alias tells this instance's veths from another's (`shim gc` sweeps only its own).
    k.set_alias(vidx, &owner_alias(c.cfg))
        .with_context(|| format!("mark veth {veth} as this netshim's"))?;
    k.add_route(
        At::Host,
        &Route {
            dst: IpAddr::V4(ip),
            prefix: 32,
            via: None,
            oif: vidx,
            table: MAIN_TABLE,
        },
    )
    .with_context(|| format!("host route to {ip}"))?;
    k.add_rule(ip, table, RULE_PRIORITY)
        .with_context(|| format!("rule from {ip} lookup {table}"))?;
    task_side(k, c, eni, ip).context("configure the task's side")?;
    super::firewall(k, c)
}

/// Inside the task: `lo` and `eth0` up, the /32, the link-local gateway and its neighbour entry.
fn task_side(k: &mut dyn Kernel, c: &SetupCtx, eni: &EniSpec, ip: Ipv4Addr) -> anyhow::Result<()> {
    let at = At::Netns(c.ns);
    let links = k.links(at).context("list the task's links")?;
    let up = LinkChange {
        up: Some(true),
        ..LinkChange::default()
    };
    if let Some(lo) = links.iter().find(|l| l.loopback) {
        k.set_link(at, lo.index, up).context("bring lo up")?;
    }
    let t = links
        .iter()
        .find(|l| l.name == "eth0")
        .map(|l| l.index)
        .ok_or_else(|| anyhow!("eth0 missing in the task"))?;
    k.set_link(
        at,
        t,
        LinkChange {
            up: Some(true),
            mtu: eni.mtu,
            ..LinkChange::default()
        },
    )
    .context("bring eth0 up")?;
    k.add_addr(at, t, IpAddr::V4(ip), 32)
        .with_context(|| format!("add {ip}/32"))?;
    k.add_route(
        at,
        &Route {
            dst: IpAddr::V4(LINK_GATEWAY),
            prefix: 32,
            via: None,
            oif: t,
            table: MAIN_TABLE,
        },
    )
    .with_context(|| format!("route to {LINK_GATEWAY}"))?;
    k.add_route(
        at,
        &Route {
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
            via: Some(IpAddr::V4(LINK_GATEWAY)),
            oif: t,
            table: MAIN_TABLE,
        },
    )
    .with_context(|| format!("default route via {LINK_GATEWAY}"))?;
    k.add_neigh(at, t, LINK_GATEWAY, SHARED_VETH_MAC)
        .with_context(|| format!("neighbour entry for {LINK_GATEWAY}"))
}

/// Undoes a shared-ENI task from its record: its rule and veth; with the ENI's last task, the
/// ENI's table routes. Idempotent.
pub fn release(
    k: &mut dyn Kernel,
    state: &State,
    task: &ContainerRecord,
    rec: &EniRecord,
    errs: &mut ReleaseErrors,
) {
    if let (Some(ip), Some(table)) = (task.ip, rec.table)
        && let Err(e) = k.del_rule(ip, table, RULE_PRIORITY)
    {
        errs.push("delete rule from", ip, e);
    }
    if let Some(v) = &rec.veth
        && let Err(e) = k.del_link(v)
    {
        errs.push("delete veth", v, e);
    }
    // The ENI's table goes with its last task.
    if users(state, rec.mac, &task.id) > 0 {
        return;
    }
    let (Some(table), Some(subnet), Some(gw)) = (
        rec.table,
        rec.subnet
            .as_deref()
            .and_then(|s| s.parse::<Ipv4Network>().ok()),
        rec.gateway,
    ) else {
        return;
    };
    match find(k, At::Host, rec.mac) {
        Ok(Some(l)) => {
            for r in table_routes(subnet, gw, l.index, table).iter().rev() {
                if let Err(e) = k.del_route(At::Host, r) {
                    errs.push(
                        "delete route",
                        format!("{}/{} table {table}", r.dst, r.prefix),
                        e,
                    );
                }
            }
        }
        Ok(None) => {}
        Err(e) => errs.push("look for the ENI on the host", rec.mac, e),
    }
}
