//! Exclusive ENI: the host interface moves into the task as `eth0` with the ENI's addresses,
//! MTU and gateways; the task's netns is pinned until poststop hands the interface back under
//! its own name. A failed setup restores exactly what it changed: name, alias, state, MTU.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, anyhow, bail};

use crate::kernel::{At, Kernel, Link, LinkChange, MAIN_TABLE, Route};
use crate::modes::awsvpc::eligible::{self, Use};
use crate::modes::awsvpc::find;
use crate::modes::{ModeFields, ReleaseErrors, SetupCtx, with_rollback};
use crate::names::{eni_alias, pin_path};
use crate::request::EniSpec;
use crate::state::{EniRecord, State};
use crate::types::Attachment;

/// The task's interface name.
pub const TASK_IF: &str = "eth0";

/// Checks the interface may be given and records what will be done with it.
pub fn plan(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    state: &State,
    eni: &EniSpec,
    link: &Link,
) -> anyhow::Result<ModeFields> {
    eligible::check(k, c.cfg, state, c.id, link, Use::Exclusive)?;
    let ip = eni.ipv4.first().map(|n| n.ip());
    let ip6 = eni.ipv6.first().map(|n| n.ip());
    if ip.is_none() && ip6.is_none() {
        bail!("ENI {} has no address", eni.mac);
    }
    Ok(ModeFields {
        ip,
        ip6,
        eni: Some(EniRecord {
            mac: eni.mac,
            name: link.name.clone(),
            attachment: Attachment::Exclusive,
            netns_pin: Some(pin_path(c.state_dir, c.id)),
            mtu: link.mtu,
            ..EniRecord::default()
        }),
        ..ModeFields::default()
    })
}

/// Refuses a task whose netns already has an interface named [`TASK_IF`]: the ENI could not
/// take that name (the kernel would move it in under its own name and then fail the rename).
/// Shared by the exclusive and branch attachments.
pub fn task_if_free(k: &mut dyn Kernel, ns: &std::fs::File) -> anyhow::Result<()> {
    let links = k.links(At::Netns(ns)).context("list the task's links")?;
    if let Some(l) = links.iter().find(|l| l.name == TASK_IF) {
        let mac = l.mac.map(|m| format!(" ({m})")).unwrap_or_default();
        bail!(
            "the task's network namespace already has an interface named {TASK_IF}{mac}: an awsvpc task gets its ENI as {TASK_IF}; start it in a network namespace of its own without one"
        );
    }
    Ok(())
}

/// What the setup changed so far, undone in reverse on failure.
#[derive(Default)]
struct Done {
    pinned: bool,
    alias: Option<Option<String>>,
    moved: bool,
}

/// Moves the ENI into the task and configures it; on error restores what it changed.
pub fn apply(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    eni: &EniSpec,
    rec: &EniRecord,
) -> anyhow::Result<()> {
    let link = find(k, At::Host, eni.mac)?
        .ok_or_else(|| anyhow!("ENI {} vanished from the host", eni.mac))?;
    let mut done = Done::default();
    let r = steps(k, c, eni, rec, &link, &mut done);
    let Err(e) = r else { return Ok(()) };
    let left = undo(k, c, eni, rec, &link, done);
    Err(with_rollback(e, left))
}

fn steps(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    eni: &EniSpec,
    rec: &EniRecord,
    link: &Link,
    done: &mut Done,
) -> anyhow::Result<()> {
    let pin = rec
        .netns_pin
        .as_deref()
        .ok_or_else(|| anyhow!("no netns pin path"))?;
    k.pin_netns(c.pid, pin)
        .with_context(|| format!("pin the task's netns at {}", pin.display()))?;
    done.pinned = true;
    crate::fault::point("awsvpc-pinned");
    // The original name travels with the interface too, for whoever finds it later.
    k.set_alias(link.index, &eni_alias(&link.name))
        .context("record the original name in the link alias")?;
    done.alias = Some(link.alias.clone());
    let moved = k.move_link(At::Host, link.index, At::Netns(c.ns), TASK_IF);
    // A failed move may still have moved the link (the rename into the task is what failed):
    // then the rollback must fetch it from there.
    done.moved = moved.is_ok() || matches!(find(k, At::Netns(c.ns), eni.mac), Ok(Some(_)));
    moved.with_context(|| format!("move {} into the task's netns as {TASK_IF}", link.name))?;
    crate::fault::point("awsvpc-moved");
    configure(k, c.ns, eni).context("configure the ENI in the task")?;
    super::firewall(k, c)
}

/// Inside the task: `lo` up, the interface with `eni`'s MTU, addresses, state and gateways.
/// Shared by the exclusive and branch attachments.
pub fn configure(k: &mut dyn Kernel, ns: &std::fs::File, eni: &EniSpec) -> anyhow::Result<()> {
    let at = At::Netns(ns);
    let links = k.links(at).context("list the task's links")?;
    if let Some(lo) = links.iter().find(|l| l.loopback) {
        k.set_link(
            at,
            lo.index,
            LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        )
        .context("bring lo up")?;
    }
    let idx = links
        .iter()
        .find(|l| l.mac == Some(eni.mac))
        .map(|l| l.index)
        .ok_or_else(|| anyhow!("the ENI is not in the task's netns"))?;
    if let Some(mtu) = eni.mtu {
        k.set_link(
            at,
            idx,
            LinkChange {
                mtu: Some(mtu),
                ..LinkChange::default()
            },
        )
        .with_context(|| format!("set the MTU to {mtu}"))?;
    }
    for a in &eni.ipv4 {
        k.add_addr(at, idx, IpAddr::V4(a.ip()), a.prefix())
            .with_context(|| format!("add {a}"))?;
    }
    for a in &eni.ipv6 {
        k.add_addr(at, idx, IpAddr::V6(a.ip()), a.prefix())
            .with_context(|| format!("add {a}"))?;
    }
    k.set_link(
        at,
        idx,
        LinkChange {
            up: Some(true),
            ..LinkChange::default()
        },
    )
    .with_context(|| format!("bring {TASK_IF} up"))?;
    if let Some(gw) = eni.gateway4().filter(|_| !eni.ipv4.is_empty()) {
        let r = Route {
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: 0,
            via: Some(IpAddr::V4(gw)),
            oif: idx,
            table: MAIN_TABLE,
        };
        k.add_route(at, &r)
            .with_context(|| format!("default route via {gw}"))?;
    }
    if let Some(gw) = eni.gateway6 {
        let r = Route {
            dst: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            prefix: 0,
            via: Some(IpAddr::V6(gw)),
            oif: idx,
            table: MAIN_TABLE,
        };
        k.add_route(at, &r)
            .with_context(|| format!("IPv6 default route via {gw}"))?;
    }
    Ok(())
}

/// Restores what [`steps`] changed, newest first.
fn undo(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    eni: &EniSpec,
    rec: &EniRecord,
    link: &Link,
    done: Done,
) -> Result<(), ReleaseErrors> {
    let mut left = ReleaseErrors::default();
    let mut index = link.index;
    if done.moved {
        let inside = find(k, At::Netns(c.ns), eni.mac).ok().flatten();
        match inside {
            Some(l) => {
                if let Err(e) = k.move_link(At::Netns(c.ns), l.index, At::Host, &link.name) {
                    left.push("return ENI to the host", &link.name, e);
                }
            }
            None => left.push(
                "return ENI to the host",
                &link.name,
                "not found in the task's netns",
            ),
        }
        if let Ok(Some(l)) = find(k, At::Host, eni.mac) {
            index = l.index;
            let change = LinkChange {
                up: Some(link.up),
                name: None,
                mtu: (l.mtu != link.mtu).then_some(link.mtu).flatten(),
            };
            if let Err(e) = k.set_link(At::Host, index, change) {
                left.push("restore the state of", &link.name, e);
            }
        }
    }
    if let Some(alias) = done.alias
        && let Err(e) = k.set_alias(index, alias.as_deref().unwrap_or(""))
    {
        left.push("restore the alias of", &link.name, e);
    }
    if done.pinned
        && let Some(p) = &rec.netns_pin
        && let Err(e) = k.unpin_netns(p)
    {
        left.push("release netns pin", p.display(), e);
    }
    left.into_result()
}

/// Hands an exclusive ENI back to the host from its record: from the pinned netns if it still
/// exists, else (the kernel already returned it) by restoring its name; down, its MTU and alias
/// as before. Then releases the pin. Idempotent.
pub fn give_back(k: &mut dyn Kernel, rec: &EniRecord, errs: &mut ReleaseErrors) {
    let pinned = match &rec.netns_pin {
        Some(p) => match k.open_pin(p) {
            Ok(f) => f,
            Err(e) => {
                errs.push("open netns pin", p.display(), e);
                None
            }
        },
        None => None,
    };
    if let Some(ns) = &pinned {
        match find(k, At::Netns(ns), rec.mac) {
            // Moving drops every address; the interface arrives down under its old name.
            Ok(Some(l)) => {
                if let Err(e) = k.move_link(At::Netns(ns), l.index, At::Host, &rec.name) {
                    errs.push("return ENI to the host", rec.mac, e);
                }
            }
            Ok(None) => {}
            Err(e) => errs.push("look for the ENI in the task's netns", rec.mac, e),
        }
    }
    // Already on the host (pin gone, or returned above): down, named right, as before.
    match find(k, At::Host, rec.mac) {
        Ok(Some(l)) => {
            let change = LinkChange {
                up: Some(false),
                name: (l.name != rec.name).then_some(rec.name.as_str()),
                mtu: rec.mtu.filter(|m| l.mtu != Some(*m)),
            };
            if let Err(e) = k.set_link(At::Host, l.index, change) {
                errs.push("restore ENI on the host", rec.mac, e);
            }
            if l.alias.is_some()
                && let Err(e) = k.set_alias(l.index, "")
            {
                errs.push("clear the alias of ENI", rec.mac, e);
            }
        }
        Ok(None) => {}
        Err(e) => errs.push("look for the ENI on the host", rec.mac, e),
    }
    if let Some(p) = &rec.netns_pin
        && let Err(e) = k.unpin_netns(p)
    {
        errs.push("release netns pin", p.display(), e);
    }
}
