//! Branch ENI (ENI trunking): a VLAN of a trunk ENI with the branch's own MAC, created directly
//! in the task's netns as `eth0` and configured like an exclusive ENI. The trunk stays on the
//! host and is never given to a task; the task's netns is pinned until poststop deletes the VLAN.

use anyhow::{Context, anyhow, bail};

use crate::kernel::{At, Kernel, Link, LinkChange};
use crate::modes::awsvpc::eligible::{self, Use};
use crate::modes::awsvpc::exclusive::{TASK_IF, configure};
use crate::modes::awsvpc::find;
use crate::modes::{ModeFields, ReleaseErrors, SetupCtx, with_rollback};
use crate::names::pin_path;
use crate::request::EniSpec;
use crate::state::{EniRecord, State};
use crate::types::Attachment;

/// Checks the trunk and the VLAN id, and records the branch.
pub fn plan(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    state: &State,
    eni: &EniSpec,
    trunk: &Link,
) -> anyhow::Result<ModeFields> {
    let b = eni
        .branch
        .ok_or_else(|| anyhow!("branch ENI without trunk and VLAN"))?;
    eligible::check(k, c.cfg, state, c.id, trunk, Use::Trunk)?;
    if let Some(h) = state.vlan_holder(b.trunk_mac, b.vlan, c.id) {
        bail!(
            "VLAN {} on trunk {} ({}) is already in use by task {}: each branch ENI has its own VLAN id",
            b.vlan,
            b.trunk_mac,
            trunk.name,
            crate::output::escape_controls(&h)
        );
    }
    if let Some(h) = state.eni_holders(eni.mac, c.id).first() {
        bail!(
            "branch ENI {} is already held by task {}",
            eni.mac,
            crate::output::escape_controls(&h.id)
        );
    }
    let links = k.links(At::Host).context("list links")?;
    if let Some(v) = links
        .iter()
        .find(|l| l.lower == Some(trunk.index) && l.vlan_id == Some(b.vlan))
    {
        bail!(
            "VLAN {} on trunk {} ({}) is already in use on the host by {}: each branch ENI has its own VLAN id",
            b.vlan,
            b.trunk_mac,
            trunk.name,
            v.name
        );
    }
    if links.iter().any(|l| l.mac == Some(eni.mac)) {
        bail!(
            "branch ENI {}: an interface with that MAC already exists on the host",
            eni.mac
        );
    }
    if let (Some(want), Some(most)) = (eni.mtu, trunk.mtu)
        && want > most
    {
        bail!(
            "branch ENI {} asks for MTU {want}, more than its trunk {} ({}) carries ({most}): a VLAN's MTU is at most its trunk's; lower mtu or raise the trunk's",
            eni.mac,
            b.trunk_mac,
            trunk.name
        );
    }
    let ip = eni.ipv4.first().map(|n| n.ip());
    let ip6 = eni.ipv6.first().map(|n| n.ip());
    if ip.is_none() && ip6.is_none() {
        bail!("branch ENI {} has no address", eni.mac);
    }
    Ok(ModeFields {
        ip,
        ip6,
        eni: Some(EniRecord {
            mac: eni.mac,
            name: trunk.name.clone(),
            attachment: Attachment::Branch,
            netns_pin: Some(pin_path(c.state_dir, c.id)),
            trunk: Some(b.trunk_mac),
            vlan: Some(b.vlan),
            ..EniRecord::default()
        }),
        ..ModeFields::default()
    })
}

/// Creates the VLAN in the task and configures it; on error deletes it and restores the trunk.
pub fn apply(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    eni: &EniSpec,
    rec: &EniRecord,
) -> anyhow::Result<()> {
    let (Some(trunk_mac), Some(vlan)) = (rec.trunk, rec.vlan) else {
        bail!("branch plan without trunk and VLAN");
    };
    let trunk = find(k, At::Host, trunk_mac)?
        .ok_or_else(|| anyhow!("trunk {trunk_mac} vanished from the host"))?;
    let mut pinned = false;
    let mut raised = false;
    let r = (|| -> anyhow::Result<()> {
        let pin = rec
            .netns_pin
            .as_deref()
            .ok_or_else(|| anyhow!("no netns pin path"))?;
        k.pin_netns(c.pid, pin)
            .with_context(|| format!("pin the task's netns at {}", pin.display()))?;
        pinned = true;
        crate::fault::point("branch-pinned");
        if !trunk.up {
            k.set_link(
                At::Host,
                trunk.index,
                LinkChange {
                    up: Some(true),
                    ..LinkChange::default()
                },
            )
            .with_context(|| format!("bring trunk {} up", trunk.name))?;
            raised = true;
        }
        k.add_vlan(trunk.index, vlan, eni.mac, TASK_IF, c.ns)
            .map_err(|e| vlan_error(e, vlan, &trunk.name))?;
        crate::fault::point("branch-created");
        configure(k, c.ns, eni).context("configure the branch ENI in the task")?;
        super::firewall(k, c)
    })();
    let Err(e) = r else { return Ok(()) };
    let mut left = ReleaseErrors::default();
    delete_vlan(k, c.ns, rec, &mut left);
    if raised
        && let Err(x) = k.set_link(
            At::Host,
            trunk.index,
            LinkChange {
                up: Some(false),
                ..LinkChange::default()
            },
        )
    {
        left.push("restore the state of trunk", &trunk.name, x);
    }
    if pinned
        && let Some(p) = &rec.netns_pin
        && let Err(x) = k.unpin_netns(p)
    {
        left.push("release netns pin", p.display(), x);
    }
    Err(with_rollback(e, left.into_result()))
}

fn vlan_error(e: crate::kernel::NlError, vlan: u16, trunk: &str) -> anyhow::Error {
    match e.errno() {
        Some(libc::EEXIST) => anyhow!(
            "create VLAN {vlan} on trunk {trunk}: already in use on that trunk (each branch ENI has its own VLAN id)"
        ),
        Some(libc::EOPNOTSUPP) => anyhow!(
            "create VLAN {vlan} on trunk {trunk}: this kernel has no 802.1Q VLAN support ({e}): load it with `modprobe 8021q`, or give the task an exclusive ENI"
        ),
        Some(libc::ENOENT) | Some(libc::EINVAL) => anyhow!(
            "create VLAN {vlan} on trunk {trunk}: {e}: is 802.1Q available (modprobe 8021q)?"
        ),
        _ => anyhow!("create VLAN {vlan} on trunk {trunk}: {e}"),
    }
}

/// Deletes the branch's VLAN from the namespace `ns` if it is there.
fn delete_vlan(k: &mut dyn Kernel, ns: &std::fs::File, rec: &EniRecord, errs: &mut ReleaseErrors) {
    match find(k, At::Netns(ns), rec.mac) {
        Ok(Some(l)) if l.kind.as_deref() == Some("vlan") => {
            if let Err(e) = k.del_link_at(At::Netns(ns), l.index) {
                errs.push("delete branch ENI", rec.mac, e);
            }
        }
        Ok(_) => {}
        Err(e) => errs.push("look for the branch ENI", rec.mac, e),
    }
}

/// Deletes the branch from its record: from the pinned netns (a netns that is gone took the
/// VLAN with it), then releases the pin. Idempotent.
pub fn release(k: &mut dyn Kernel, rec: &EniRecord, errs: &mut ReleaseErrors) {
    let Some(p) = &rec.netns_pin else { return };
    match k.open_pin(p) {
        Ok(Some(ns)) => delete_vlan(k, &ns, rec, errs),
        Ok(None) => {}
        Err(e) => errs.push("open netns pin", p.display(), e),
    }
    // A VLAN the kernel handed to the host (it cannot, but a hand might have moved it): ours by
    // MAC and kind.
    if let Ok(Some(l)) = find(k, At::Host, rec.mac)
        && l.kind.as_deref() == Some("vlan")
        && let Err(e) = k.del_link_at(At::Host, l.index)
    {
        errs.push("delete branch ENI", rec.mac, e);
    }
    if let Err(e) = k.unpin_netns(p) {
        errs.push("release netns pin", p.display(), e);
    }
}
