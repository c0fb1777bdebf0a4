//! `shim gc`, `shim reload`, `shim reset`: maintenance from the state alone.

use anyhow::bail;

use crate::commands::Globals;
use crate::commands::hook::release;
use crate::firewall::{self, Layout};
use crate::kernel::netlink::{Netlink, link_name};
use crate::kernel::netns;
use crate::modes::{HostKernel, Kernel, bridge};
use crate::request::NetworkMode;
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

/// Releases every container whose process is gone (missed poststop, crash).
pub fn gc(g: &Globals) -> anyhow::Result<()> {
    let sd = g.state();
    if !sd.state_path().exists() {
        return Ok(());
    }
    let lock = sd.lock()?;
    let mut state = sd.load()?;
    let mut k = HostKernel::new();
    let (released, mut failed) = reap_dead(&mut k, &mut state);
    for id in released {
        println!("released {id}");
    }
    // Host veth ends no record knows (a hook killed between creating and recording them).
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
    let mut nl = Netlink::open()?;
    for l in nl.links()? {
        if let Some(name) = link_name(&l)
            && is_ours(&name)
            && !known.contains(&name.as_str())
        {
            match nl.del_link(&name) {
                Ok(_) => println!("deleted stray link {name}"),
                Err(e) => failed.push(format!("stray link {name}: {e}")),
            }
        }
    }
    // The firewall against the ledger: a damaged table rebuilt, stray or lost elements fixed.
    match g.load_config() {
        Ok(cfg) => match bridge::repair_firewall(&mut k, &cfg, &state) {
            Ok(fixed) => fixed.iter().for_each(|f| println!("{f}")),
            Err(e) => failed.push(format!("firewall: {e:#}")),
        },
        Err(e) => failed.push(format!("firewall: {e:#}")),
    }
    sd.store(&state, &lock)?;
    if !failed.is_empty() {
        bail!("gc: {}", failed.join(" | "));
    }
    Ok(())
}

/// Names netshim gives host veth ends: `nsh` (bridge) or `nsa` (shared ENI) + 8 hex digits.
fn is_ours(name: &str) -> bool {
    name.len() == 11
        && (name.starts_with("nsh") || name.starts_with("nsa"))
        && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Releases every record whose process is gone and drops it from `state`. Returns the released
/// ids and the failures; a record whose release fails stays, for a later run.
pub fn reap_dead(k: &mut dyn Kernel, state: &mut State) -> (Vec<String>, Vec<String>) {
    let dead: Vec<ContainerRecord> = state
        .containers
        .values()
        .filter(|r| !alive(r))
        .cloned()
        .collect();
    let (mut released, mut failed) = (Vec::new(), Vec::new());
    for rec in &dead {
        let errs = release(k, state, rec);
        if errs.is_empty() {
            state.containers.remove(&rec.id);
            released.push(rec.id.clone());
        } else {
            failed.push(format!("{}: {}", rec.id, errs.join("; ")));
        }
    }
    (released, failed)
}

/// Re-applies the firewall from the state (after a firewall reload wiped it).
pub fn reload(g: &Globals) -> anyhow::Result<()> {
    let cfg = g.load_config()?;
    let sd = g.state();
    let _lock = sd.lock()?;
    let state = sd.load()?;
    let table = firewall::table_name(&cfg.bridge_name);
    let layout = Layout {
        table: &table,
        bridge: &cfg.bridge_name,
        subnet: cfg.subnet,
    };
    let bridged = state
        .containers
        .values()
        .filter(|c| c.mode == NetworkMode::Bridge);
    HostKernel::new().nft(&layout.rebuild(bridged)?)?;
    Ok(())
}

/// Removes the bridge and the firewall table; refuses while containers are recorded unless forced.
pub fn reset(g: &Globals, force: bool) -> anyhow::Result<()> {
    let cfg = g.load_config()?;
    let sd = g.state();
    let lock = sd.lock()?;
    let mut state = sd.load()?;
    if !state.containers.is_empty() && !force {
        bail!(
            "{} container(s) still recorded: delete them first (poststop releases them) or pass --force",
            state.containers.len()
        );
    }
    let mut k = HostKernel::new();
    for rec in state.containers.values() {
        let _ = release(&mut k, &state, rec);
    }
    state.containers.clear();
    let _ = k.nft(&firewall::delete_table(&firewall::table_name(
        &cfg.bridge_name,
    )));
    k.del_link(&cfg.bridge_name)?;
    sd.store(&state, &lock)?;
    Ok(())
}
