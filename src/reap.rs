//! Containers that are gone without a poststop (crun and podman skip it after a failed create; a
//! crash skips everything): telling them from live ones, releasing them, and finding kernel
//! objects of netshim's that no record knows. Used by setup (retry after reaping) and `shim gc`.

use crate::config::Config;
use crate::kernel::{At, Kernel, netns};
use crate::modes::{self, ReleaseErrors};
use crate::names::{BRIDGE_VETH_PREFIX, SHARED_VETH_PREFIX, is_our_name, owner_alias};
use crate::state::{ContainerRecord, Lock, State, StateDir, StateError};
use crate::types::NetworkMode;

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

/// Releases every committed record whose process is gone, and forgets it.
pub fn reap_dead(
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
) -> Result<Reaped, StateError> {
    let records = state.records();
    state.io_result()?;
    let mut out = Reaped::default();
    // Their bridge veths go together once the records are forgotten (one kernel request); one
    // left by a crash in between is a stray the next sweep deletes.
    let mut veths = Vec::new();
    for rec in records.iter().filter(|r| !alive(r)) {
        let mut quick = rec.clone();
        let veth = match rec.mode {
            NetworkMode::Bridge => quick.veth.take(),
            _ => None,
        };
        match modes::release(k, state, &quick) {
            Ok(()) => {
                sd.forget(rec, state, lock)?;
                out.released.push(rec.id.clone());
                veths.extend(veth);
            }
            Err(e) => out.failed.push((rec.id.clone(), e)),
        }
    }
    for (name, e) in k.del_links(&veths) {
        eprintln!("shim: note: delete veth {name}: {e} (`shim gc` retries)");
    }
    Ok(out)
}

/// Rolls back the intents of setups whose writer died (killed between recording its intent and
/// committing): the kernel side from the intent, then its claims. Runs after every writer takes
/// the lock, before it allocates anything, so what a dead setup held is never handed out twice.
/// Returns the ids rolled back; one that cannot be undone now stays (with its claims) and is
/// reported, so `shim gc` retries.
pub fn recover(
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
) -> Result<Vec<String>, StateError> {
    let mut done = Vec::new();
    sd.sweep_temp(lock)?;
    for p in sd.pending()? {
        let committed = state
            .record(&p.id)
            .is_some_and(|c| c.pid == p.pid && c.netns_inode == p.netns_inode);
        if committed {
            sd.drop_intent(&p.id, lock)?;
            continue;
        }
        match modes::release(k, state, &p) {
            Ok(()) => {
                sd.abandon(&p, lock)?;
                done.push(p.id.clone());
            }
            Err(e) => eprintln!(
                "shim: note: the unfinished setup of container {} could not be undone yet: {e} (`shim gc` retries)",
                crate::output::escape_controls(&p.id)
            ),
        }
    }
    Ok(done)
}

/// Host veths of this instance that no record knows (a hook killed between creating and
/// recording them): bridge veths on this instance's bridge, shared-ENI veths with netshim's
/// name and MAC. Another instance's links are never listed.
pub fn stray_links(
    k: &mut dyn Kernel,
    cfg: &Config,
    records: &[ContainerRecord],
) -> anyhow::Result<Vec<String>> {
    let known: Vec<&str> = records
        .iter()
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
            (is_our_name(BRIDGE_VETH_PREFIX, &l.name) && bridge.is_some() && l.master == bridge)
                || (is_our_name(SHARED_VETH_PREFIX, &l.name)
                    && l.mac == shared_mac
                    && l.alias.as_deref() == Some(&owner_alias(cfg)))
        })
        .map(|l| l.name.clone())
        .collect())
}
