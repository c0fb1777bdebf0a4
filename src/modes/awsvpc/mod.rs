//! awsvpc mode: the task gets its own ENI, in one of three attachments.
//!
//! - **exclusive** ([`exclusive`]): the host interface with the ENI's MAC moves into the task's
//!   netns as `eth0` with the ENI's addresses and gateways. The task's netns is pinned under the
//!   state dir until poststop, which hands the interface back under its original name.
//! - **shared** ([`shared`]): the ENI stays on the host; the task takes one of its secondary
//!   addresses through a veth pair and policy routing through the ENI's own table.
//! - **branch** ([`branch`]): a VLAN of a trunk ENI, created with the branch's MAC directly in
//!   the task's netns as `eth0`, deleted at poststop; the trunk stays on the host.
//!
//! Which host interfaces may be given at all is decided in [`eligible`]. In every attachment the
//! task's own firewall blocks instance metadata (unless allowed) and enforces `netshim.ingress`.

pub mod branch;
pub mod eligible;
pub mod exclusive;
pub mod shared;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::AwsvpcConfig;
use crate::kernel::{At, Kernel, Link};
use crate::metadata;
use crate::modes::{ModeFields, ReleaseErrors, SetupCtx, task_firewall};
use crate::request::{EniSpec, HostPorts, PortMapping};
use crate::state::{ContainerRecord, PortRecord, State};
use crate::types::{Attachment, MacAddr};

/// Fills in an ENI given by MAC alone from instance metadata (before the lock: a network wait).
pub fn resolve(cfg: &AwsvpcConfig, mut eni: EniSpec) -> anyhow::Result<EniSpec> {
    if eni.needs_metadata() {
        let f = metadata::lookup(cfg, &eni.mac)?;
        eni.ipv4 = f.ipv4;
        eni.ipv6 = f.ipv6;
        eni.gateway4 = eni.gateway4.or(f.gateway4);
        eni.validate()?;
        if eni.ipv4.is_empty() && eni.ipv6.is_empty() {
            bail!("instance metadata lists no address for ENI {}", eni.mac);
        }
    }
    shared::check_listed(cfg, &eni)?;
    Ok(eni)
}

/// The MAC setup looks for on the host: the ENI's own, or a branch's trunk.
fn host_mac(eni: &EniSpec) -> MacAddr {
    eni.branch.map(|b| b.trunk_mac).unwrap_or(eni.mac)
}

/// The host link with `mac`, if any.
pub fn find(k: &mut dyn Kernel, at: At, mac: MacAddr) -> anyhow::Result<Option<Link>> {
    Ok(k.links(at)
        .context("list links")?
        .into_iter()
        .find(|l| l.mac == Some(mac)))
}

/// Waits (bounded by `awsvpc.eni_wait_seconds`) for the interface the ENI needs to appear on
/// the host. Runs before the lock, so a bogus MAC stalls only its own container.
pub fn wait_for(k: &mut dyn Kernel, cfg: &AwsvpcConfig, eni: &EniSpec) -> anyhow::Result<()> {
    let mac = host_mac(eni);
    let deadline = Instant::now() + cfg.eni_wait;
    loop {
        if find(k, At::Host, mac)?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let what = if eni.branch.is_some() {
                "trunk"
            } else {
                "interface"
            };
            bail!(
                "no {what} with MAC {mac} appeared within {:.1}s: check that the ENI is attached to this host (awsvpc.eni_wait_seconds sets the wait)",
                cfg.eni_wait.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
                ct_zone: None,
            });
        }
    }
    out
}

/// Refuses at once, from the ledger alone, an ENI (or trunk) another task holds in a way that
/// excludes this request: such an interface will not appear on the host, so waiting for it is
/// pointless. The full check runs under the lock.
pub fn precheck(c: &SetupCtx, state: &State) -> anyhow::Result<()> {
    let Some(eni) = c.eni else { return Ok(()) };
    let purpose = match eni.attachment {
        Attachment::Exclusive => eligible::Use::Exclusive,
        Attachment::Shared => eligible::Use::Shared,
        Attachment::Branch => eligible::Use::Trunk,
    };
    let link = Link {
        mac: Some(host_mac(eni)),
        ..Link::default()
    };
    eligible::in_use(state, c.id, &link, purpose)
}

/// Decides the task's ENI: finds the interface (no waiting: [`wait_for`] ran before the lock),
/// checks that it may be given, picks the address. Reads the kernel, changes nothing.
pub fn plan(c: &SetupCtx, k: &mut dyn Kernel, state: &mut State) -> anyhow::Result<ModeFields> {
    let eni = c
        .eni
        .ok_or_else(|| anyhow::anyhow!("awsvpc request without an ENI"))?;
    let mac = host_mac(eni);
    let link = find(k, At::Host, mac)?.ok_or_else(|| {
        anyhow::anyhow!(
            "the interface with MAC {mac} disappeared from the host while setup waited for the lock"
        )
    })?;
    let mut f = match eni.attachment {
        Attachment::Exclusive => exclusive::plan(c, k, state, eni, &link)?,
        Attachment::Shared => shared::plan(c, k, state, eni, &link)?,
        Attachment::Branch => branch::plan(c, k, state, eni, &link)?,
    };
    exclusive::task_if_free(k, c.ns)?;
    f.ports = ports(&c.req.mappings);
    Ok(f)
}

/// Applies the plan, the task's firewall last; on error the attachment's own rollback undoes
/// everything, restoring what the task's record alone does not know (an ENI's or trunk's
/// state and alias, proxy ARP).
pub fn apply(
    k: &mut dyn Kernel,
    c: &SetupCtx,
    state: &State,
    f: &ModeFields,
) -> anyhow::Result<()> {
    let (Some(eni), Some(rec)) = (c.eni, f.eni.as_ref()) else {
        bail!("awsvpc plan without an ENI");
    };
    match rec.attachment {
        Attachment::Exclusive => exclusive::apply(k, c, eni, rec),
        Attachment::Shared => shared::apply(k, c, state, eni, rec, f),
        Attachment::Branch => branch::apply(k, c, eni, rec),
    }
}

/// The last step of every attachment's setup: the task's own firewall.
fn firewall(k: &mut dyn Kernel, c: &SetupCtx) -> anyhow::Result<()> {
    task_firewall(
        k,
        c.ns,
        c.req.ingress.as_deref(),
        c.cfg.awsvpc.allow_metadata_access,
    )
}

/// Undoes an awsvpc setup from its record; idempotent.
pub fn teardown(
    k: &mut dyn Kernel,
    state: &State,
    rec: &ContainerRecord,
    errs: &mut ReleaseErrors,
) {
    let Some(e) = &rec.eni else {
        return;
    };
    match e.attachment {
        Attachment::Exclusive => exclusive::give_back(k, e, errs),
        Attachment::Shared => shared::release(k, state, rec, e, errs),
        Attachment::Branch => branch::release(k, e, errs),
    }
}

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
