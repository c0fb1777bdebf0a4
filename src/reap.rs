//! Containers that are gone without a poststop (crun and podman skip it after a failed create; a
//! crash skips everything): telling them from live ones, releasing them, and finding kernel
//! objects of netshim's that no record knows. Used by setup (retry after reaping) and `shim gc`.

use crate::config::Config;
use crate::kernel::{At, Kernel, netns};
use crate::modes::awsvpc::shared::VETH_PREFIX as SHARED_PREFIX;
use crate::modes::bridge::{VETH_PREFIX, is_our_name};
use crate::modes::{self, ReleaseErrors};
use crate::state::{ContainerRecord, State};

/// Whether the container's process still holds the netns recorded at setup.
pub fn alive(rec: &ContainerRecord) -> bool {
    match (rec.pid, rec.netns_inode) {
        (Some(pid), Some(ino)) => netns::open_pid(pid)
            .and_then(|f| netns::inode(&f))
            .map(|i| i == ino)
            .unwrap_or(false),
        _ => false,
    }
}

/// What a reaping did.
#[derive(Debug, Default)]
pub struct Reaped {
    pub released: Vec<String>,
    /// Records whose release failed (they stay, for a later run), with what failed.
    pub failed: Vec<(String, ReleaseErrors)>,
}

/// Releases every record whose process is gone and drops it from `state`.
pub fn reap_dead(k: &mut dyn Kernel, state: &mut State) -> Reaped {
    let dead: Vec<ContainerRecord> = state
        .containers
        .values()
        .filter(|r| !alive(r))
        .cloned()
        .collect();
    let mut out = Reaped::default();
    for rec in &dead {
        match modes::release(k, state, rec) {
            Ok(()) => {
                state.containers.remove(&rec.id);
                out.released.push(rec.id.clone());
            }
            Err(e) => out.failed.push((rec.id.clone(), e)),
        }
    }
    out
}

/// Host veths of this instance that no record knows (a hook killed between creating and
/// recording them): bridge veths on this instance's bridge, shared-ENI veths with netshim's
/// name and MAC. Another instance's links are never listed.
pub fn stray_links(k: &mut dyn Kernel, cfg: &Config, state: &State) -> anyhow::Result<Vec<String>> {
    let known: Vec<&str> = state
        .containers
        .values()
        .flat_map(|c| {
            [
                c.veth.as_deref(),
                c.eni.as_ref().and_then(|e| e.veth.as_deref()),
            ]
        })
        .flatten()
        .collect();
    let links = k.links(At::Host)?;
    let bridge = links
        .iter()
        .find(|l| l.name == cfg.bridge_name)
        .map(|l| l.index);
    let shared_mac = Some(modes::awsvpc::shared::HOST_VETH_MAC);
    Ok(links
        .iter()
        .filter(|l| !known.contains(&l.name.as_str()))
        .filter(|l| {
            (is_our_name(VETH_PREFIX, &l.name) && bridge.is_some() && l.master == bridge)
                || (is_our_name(SHARED_PREFIX, &l.name)
                    && l.mac == shared_mac
                    && l.alias.as_deref() == Some(&owner_alias(cfg)))
        })
        .map(|l| l.name.clone())
        .collect())
}

/// The alias netshim gives the shared-ENI veths of this instance (its bridge names it).
pub fn owner_alias(cfg: &Config) -> String {
    format!("netshim:{}", cfg.bridge_name)
}
