//! `shim drain <id> [--timeout S]`: the pre-stop step. Marks the container draining in the
//! ledger (under the lock), waits until every running registrar on this host has applied that
//! revision (their status files), then until the container has no open inbound connection
//! through its mappings, and exits 0; exit 3 when the timeout passes first. Idempotent: a
//! container already draining is not written again.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::commands::{Exit, Globals};
use crate::lb::{conns, status};
use crate::reap::alive;
use crate::state::{ContainerRecord, LbState};
use crate::types::{NetworkMode, Protocol};

/// How often the registrars' files and the sockets are looked at.
const TICK: Duration = Duration::from_millis(10);
/// Idle must be seen this many times in a row (a connection HAProxy picked the server for just
/// before the drain reached it shows up within microseconds).
const IDLE_CHECKS: u32 = 3;

/// The ports whose inbound connections count: container ports in the container's own netns,
/// host ports in host mode.
fn ports(rec: &ContainerRecord) -> Vec<u16> {
    rec.ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| match rec.mode {
            NetworkMode::Host => p.host_port,
            _ => p.container_port,
        })
        .collect()
}

fn timed_out(id: &str, timeout: Duration, why: String) -> anyhow::Error {
    Exit {
        code: 3,
        msg: format!(
            "drain {id}: timed out after {} s: {why}",
            timeout.as_secs_f64()
        ),
    }
    .into()
}

pub fn drain(g: &Globals, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let sd = g.state()?;
    let (revision, rec) = {
        let lock = sd.lock()?;
        let st = sd.open(&lock)?;
        let Some(mut rec) = st.record(id) else {
            st.io_result()?;
            bail!(
                "drain {id}: no such container in the ledger at {}: it was not set up by netshim or is already released",
                sd.dir.display()
            );
        };
        if rec.lb == LbState::Draining {
            (st.revision, rec)
        } else {
            rec.lb = LbState::Draining;
            // The revision the registrars must reach: the one this write makes.
            let rev = sd.put(&rec, &lock)?;
            (rev, rec)
        }
    };

    // Every registrar running on this host has applied it (stale status files are skipped).
    let registrars = loop {
        let live = status::live(&sd.dir);
        let behind: Vec<&status::Status> = live.iter().filter(|s| s.revision < revision).collect();
        if behind.is_empty() {
            break live.len();
        }
        if Instant::now() >= deadline {
            let who: Vec<String> = behind
                .iter()
                .map(|s| {
                    format!(
                        "registrar {} ({}) is at revision {}",
                        s.pid,
                        s.sinks.join(", "),
                        s.revision
                    )
                })
                .collect();
            return Err(timed_out(
                id,
                timeout,
                format!(
                    "the load balancers have not applied revision {revision}: {}",
                    who.join("; ")
                ),
            ));
        }
        std::thread::sleep(TICK);
    };

    let applied = t0.elapsed();

    // Then no inbound connection is left.
    let ports = ports(&rec);
    let mut idle = 0;
    loop {
        let open = match rec.pid {
            Some(pid) if alive(&rec) => conns::count(pid, &ports).unwrap_or(0),
            _ => 0,
        };
        if open == 0 {
            idle += 1;
            if idle >= IDLE_CHECKS {
                break;
            }
        } else {
            idle = 0;
            if Instant::now() >= deadline {
                return Err(timed_out(
                    id,
                    timeout,
                    format!("{open} connection(s) still open to its ports"),
                ));
            }
        }
        std::thread::sleep(TICK);
    }
    let id = crate::output::escape_controls(id);
    println!(
        "drained {id} in {:.3} s: {registrars} registrar(s) applied revision {revision} after {:.3} s, no open connection after {:.3} s",
        t0.elapsed().as_secs_f64(),
        applied.as_secs_f64(),
        (t0.elapsed() - applied).as_secs_f64()
    );
    Ok(())
}
