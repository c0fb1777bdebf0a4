//! `shim gc`, `shim reload`, `shim reset`: maintenance from the state alone.

use anyhow::bail;

use crate::commands::Globals;
use crate::firewall::{self, Layout};
use crate::kernel::{HostKernel, Kernel};
use crate::modes;
use crate::reap;
use crate::types::NetworkMode;

/// Repairs whatever a crash, a firewall reload or a hand left behind, reconciling the kernel and
/// the ledger in both directions, and says what it did, one line each: unfinished setups rolled
/// back, corrupt records moved aside, containers whose process is gone released, claims no
/// record holds dropped (and missing ones restored), this instance's links no record knows
/// deleted, the bridge repaired, the firewall table rebuilt from the ledger when it is not whole.
pub fn gc(g: &Globals) -> anyhow::Result<()> {
    let sd = g.state()?;
    if !sd.exists() {
        return Ok(());
    }
    let cfg = g.load_config()?;
    let lock = sd.lock()?;
    let mut state = sd.open(&lock)?;
    let mut k = HostKernel::new();
    let mut failed: Vec<String> = Vec::new();
    sd.sweep_temp_everywhere(&lock)?;
    for id in reap::recover(&mut k, &sd, &lock, &mut state)? {
        println!(
            "rolled back the unfinished setup of {}",
            crate::output::escape_controls(&id)
        );
    }
    let (_, bad) = sd.load_lenient()?;
    for (path, e) in bad {
        let to = sd.quarantine(&path, &lock)?;
        println!(
            "moved corrupt record {} aside to {} ({e})",
            path.display(),
            to.display()
        );
    }
    let reaped = reap::reap_dead(&mut k, &sd, &lock, &mut state)?;
    for id in &reaped.released {
        println!("released {}", crate::output::escape_controls(id));
    }
    failed.extend(
        reaped
            .failed
            .iter()
            .map(|(id, e)| format!("{}: {e}", crate::output::escape_controls(id))),
    );
    let records = state.records();
    state.io_result()?;
    let mut claimed = records.clone();
    claimed.extend(sd.pending()?);
    for change in sd
        .claims()
        .rebuild(claimed.iter())
        .map_err(|e| anyhow::anyhow!("rebuild claims: {e}"))?
    {
        println!("{change}");
    }
    let strays = reap::stray_links(&mut k, &cfg, &records)?;
    let undeleted = k.del_links(&strays);
    for name in &strays {
        match undeleted.iter().find(|(n, _)| n == name) {
            Some((_, e)) => failed.push(format!("stray link {name}: {e}")),
            None => println!("deleted stray link {name}"),
        }
    }
    match modes::bridge::reconcile(&mut k, &cfg, &records) {
        Ok(fixed) => fixed.iter().for_each(|f| println!("{f}")),
        Err(e) => failed.push(format!("{e:#}")),
    }
    for note in shadowed_ports(&records) {
        println!("{note}");
    }
    if !failed.is_empty() {
        bail!("gc: {}", failed.join("; "));
    }
    Ok(())
}

/// Re-applies the firewall from the state (after a firewall reload wiped it).
pub fn reload(g: &Globals) -> anyhow::Result<()> {
    let cfg = g.load_config()?;
    let sd = g.state()?;
    let lock = sd.lock()?;
    let mut state = sd.open(&lock)?;
    reap::recover(&mut HostKernel::new(), &sd, &lock, &mut state)?;
    let records = state.records();
    state.io_result()?;
    let table = firewall::table_name(&cfg.bridge_name);
    let layout = Layout {
        table: &table,
        bridge: &cfg.bridge_name,
        subnet: cfg.subnet,
    };
    let bridged = records.iter().filter(|c| c.mode == NetworkMode::Bridge);
    HostKernel::new().nft(&layout.rebuild(bridged)?)?;
    Ok(())
}

/// Removes the bridge and the firewall table; refuses while containers are recorded unless forced.
pub fn reset(g: &Globals, force: bool) -> anyhow::Result<()> {
    let cfg = g.load_config()?;
    let sd = g.state()?;
    let lock = sd.lock()?;
    let mut state = sd.open(&lock)?;
    let mut k = HostKernel::new();
    reap::recover(&mut k, &sd, &lock, &mut state)?;
    let records = state.records();
    state.io_result()?;
    if !records.is_empty() && !force {
        bail!(
            "{} container(s) still recorded: delete them first (poststop releases them) or pass --force",
            records.len()
        );
    }
    let mut failed = Vec::new();
    // Bridge veths go together at the end, in one kernel request (one wait for RCU grace
    // periods instead of one per container); a crash before that leaves strays `shim gc` sweeps.
    let mut veths = Vec::new();
    for rec in &records {
        let mut quick = rec.clone();
        if rec.mode == NetworkMode::Bridge {
            veths.extend(quick.veth.take());
        }
        if let Err(e) = modes::release(&mut k, &state, &quick) {
            failed.push(format!("{}: {e}", crate::output::escape_controls(&rec.id)));
        }
        sd.forget(rec, &mut state, &lock)?;
    }
    for (name, e) in k.del_links(&veths) {
        failed.push(format!("delete veth {name}: {e}"));
    }
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
    if !failed.is_empty() {
        bail!(
            "reset: {} (the ledger is cleared; what is listed is left in the kernel)",
            failed.join("; ")
        );
    }
    Ok(())
}

/// Mapped host ports a host process has bound since (explicitly: dynamic ones are kept out of the
/// ephemeral range): the mapping wins, the process gets no traffic on them. Said, not changed.
fn shadowed_ports(records: &[crate::state::ContainerRecord]) -> Vec<String> {
    use crate::alloc::PortProbe;
    let probe = crate::kernel::probe::BindProbe;
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.mode == NetworkMode::Bridge) {
        for p in &r.ports {
            if let Some(h) = probe.holder(p.protocol, p.host_port, p.host_ip) {
                out.push(format!(
                    "note: host port {}/{} is mapped to container {} but {h} has bound it too: it gets no traffic there",
                    p.host_port,
                    p.protocol,
                    crate::output::escape_controls(&r.id)
                ));
            }
        }
    }
    out
}
