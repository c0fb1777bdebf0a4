//! `shim gc`, `shim reload`, `shim reset`: maintenance from the state alone.

use anyhow::bail;

use crate::commands::Globals;
use crate::firewall::{self, Layout};
use crate::kernel::{HostKernel, Kernel};
use crate::modes;
use crate::reap;
use crate::types::NetworkMode;

/// Releases every container whose process is gone, and deletes this instance's links no record
/// knows. Says what it did, one line each.
pub fn gc(g: &Globals) -> anyhow::Result<()> {
    let sd = g.state()?;
    if !sd.state_path().exists() {
        return Ok(());
    }
    let cfg = g.load_config()?;
    let lock = sd.lock()?;
    let mut state = sd.load()?;
    let mut k = HostKernel::new();
    let reaped = reap::reap_dead(&mut k, &mut state);
    for id in &reaped.released {
        println!("released {}", crate::output::escape_controls(id));
    }
    let mut failed: Vec<String> = reaped
        .failed
        .iter()
        .map(|(id, e)| format!("{}: {e}", crate::output::escape_controls(id)))
        .collect();
    for name in reap::stray_links(&mut k, &cfg, &state)? {
        match k.del_link(&name) {
            Ok(_) => println!("deleted stray link {name}"),
            Err(e) => failed.push(format!("stray link {name}: {e}")),
        }
    }
    // The firewall against the ledger: a damaged table rebuilt, stray or lost elements fixed.
    match modes::bridge::repair_firewall(&mut k, &cfg, &state) {
        Ok(fixed) => fixed.iter().for_each(|f| println!("{f}")),
        Err(e) => failed.push(format!("firewall: {e:#}")),
    }
    sd.store(&state, &lock)?;
    if !failed.is_empty() {
        bail!("gc: {}", failed.join("; "));
    }
    Ok(())
}

/// Re-applies the firewall from the state (after a firewall reload wiped it).
pub fn reload(g: &Globals) -> anyhow::Result<()> {
    let cfg = g.load_config()?;
    let sd = g.state()?;
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
    let sd = g.state()?;
    let lock = sd.lock()?;
    let mut state = sd.load()?;
    if !state.containers.is_empty() && !force {
        bail!(
            "{} container(s) still recorded: delete them first (poststop releases them) or pass --force",
            state.containers.len()
        );
    }
    let mut k = HostKernel::new();
    let mut failed = Vec::new();
    for rec in state.containers.values() {
        if let Err(e) = modes::release(&mut k, &state, rec) {
            failed.push(format!("{}: {e}", crate::output::escape_controls(&rec.id)));
        }
    }
    state.containers.clear();
    let table = firewall::table_name(&cfg.bridge_name);
    if let Err(e) = k.nft(&firewall::delete_table(&table))
        && !e.is_missing()
    {
        failed.push(format!("delete table {table}: {e}"));
    }
    // Only netshim's own bridge: a link of that name that is not it is left alone.
    match k.link(&cfg.bridge_name)? {
        Some(l)
            if l.kind.as_deref() == Some("bridge")
                && l.mac == Some(modes::bridge::bridge_mac(&cfg.bridge_name)) =>
        {
            k.del_link(&cfg.bridge_name)?;
        }
        Some(_) => failed.push(format!(
            "{} is not netshim's bridge: left alone",
            cfg.bridge_name
        )),
        None => {}
    }
    sd.store(&state, &lock)?;
    if !failed.is_empty() {
        bail!(
            "reset: {} (the ledger is cleared; what is listed is left in the kernel)",
            failed.join("; ")
        );
    }
    Ok(())
}
