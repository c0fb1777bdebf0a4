//! Containers that are gone without a poststop (crun and podman skip it after a failed create; a
//! crash skips everything): telling them from live ones, releasing them, and finding kernel
//! objects of netshim's that no record knows. Used by setup (retry after reaping) and `shim gc`.

use crate::config::Config;
use crate::kernel::{At, Kernel, netns};
use crate::modes::{self, ReleaseErrors};
use crate::names::{
    BRIDGE_VETH_PREFIX, SHARED_VETH_MAC, SHARED_VETH_PREFIX, is_our_name, owner_alias,
};
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
    let shared_mac = Some(SHARED_VETH_MAC);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Link;
    use crate::kernel::fake::Fake;
    use crate::state::EniRecord;
    use crate::types::{Attachment, MacAddr};

    /// A host with this instance's bridge, another bridge, and links of every kind `shim gc`
    /// must tell apart.
    fn host(cfg: &Config) -> Fake {
        let mut k = Fake::new();
        let ours = k.add_host_link(Link {
            name: cfg.bridge_name.clone(),
            kind: Some("bridge".into()),
            ..Link::default()
        });
        let theirs = k.add_host_link(Link {
            name: "docker0".into(),
            kind: Some("bridge".into()),
            ..Link::default()
        });
        let veth =
            |name: &str, master: Option<u32>, mac: Option<MacAddr>, alias: Option<String>| Link {
                name: name.into(),
                kind: Some("veth".into()),
                master,
                mac,
                alias,
                ..Link::default()
            };
        for l in [
            // Recorded: not a stray.
            veth("nsh0000000a", Some(ours), None, None),
            // On this instance's bridge, recorded nowhere: a stray.
            veth("nsh0000000b", Some(ours), None, None),
            // netshim's shape on another bridge (another instance's): not ours.
            veth("nsh0000000c", Some(theirs), None, None),
            // Not netshim's shape.
            veth("nsh123", Some(ours), None, None),
            veth("vethabcdef1", Some(ours), None, None),
            // Shared-ENI veths: ours only with netshim's MAC and this instance's alias.
            veth(
                "nsa0000000d",
                None,
                Some(SHARED_VETH_MAC),
                Some(owner_alias(cfg)),
            ),
            veth(
                "nsa0000000e",
                None,
                Some(SHARED_VETH_MAC),
                Some("netshim:other0".into()),
            ),
            veth(
                "nsa0000000f",
                None,
                Some(MacAddr([2, 0, 0, 0, 0, 1])),
                Some(owner_alias(cfg)),
            ),
            veth(
                "nsa00000010",
                None,
                Some(SHARED_VETH_MAC),
                Some(owner_alias(cfg)),
            ),
        ] {
            k.add_host_link(l);
        }
        k
    }

    #[test]
    fn strays_are_this_instances_unrecorded_links_only() {
        let cfg = Config::default();
        let mut k = host(&cfg);
        let mut bridge = ContainerRecord::new("a", NetworkMode::Bridge);
        bridge.veth = Some("nsh0000000a".into());
        let mut shared = ContainerRecord::new("b", NetworkMode::Awsvpc);
        shared.eni = Some(EniRecord {
            attachment: Attachment::Shared,
            veth: Some("nsa00000010".into()),
            ..EniRecord::default()
        });
        let strays = stray_links(&mut k, &cfg, &[bridge, shared]).unwrap();
        assert_eq!(strays, vec!["nsh0000000b", "nsa0000000d"]);
        // Without records, the recorded ones are strays too.
        let all = stray_links(&mut k, &cfg, &[]).unwrap();
        assert_eq!(
            all,
            vec!["nsh0000000a", "nsh0000000b", "nsa0000000d", "nsa00000010"]
        );
    }

    #[test]
    fn without_its_bridge_no_bridge_veth_is_a_stray() {
        let cfg = Config::default();
        let mut k = host(&cfg);
        let bridge = k.host_link(&cfg.bridge_name).unwrap();
        k.at(At::Host).links.retain(|l| l.index != bridge.index);
        let strays = stray_links(&mut k, &cfg, &[]).unwrap();
        assert_eq!(strays, vec!["nsa0000000d", "nsa00000010"]);
    }

    #[test]
    fn a_failed_link_listing_is_an_error_not_an_empty_sweep() {
        let cfg = Config::default();
        let mut k = host(&cfg);
        k.fail_at = Some("links");
        assert!(
            stray_links(&mut k, &cfg, &[])
                .unwrap_err()
                .to_string()
                .contains("Operation not permitted")
        );
    }

    fn state_dir(tag: &str) -> StateDir {
        let d = std::env::temp_dir().join(format!("nsreap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        StateDir::new(d)
    }

    #[test]
    fn recover_undoes_an_uncommitted_intent_and_keeps_a_committed_one() {
        let cfg = Config::default();
        let mut k = host(&cfg);
        let sd = state_dir("recover");
        let lock = sd.lock().unwrap();
        let mut state = sd.open(&lock).unwrap();
        // "b" was committed, then killed before its intent was dropped; "x" never committed.
        let mut b = ContainerRecord::new("b", NetworkMode::Bridge);
        b.veth = Some("nsh0000000b".into());
        b.pid = Some(12);
        sd.begin(&b, &lock).unwrap();
        sd.commit(&b, &mut state, &lock).unwrap();
        sd.begin(&b, &lock).unwrap();
        let mut x = ContainerRecord::new("x", NetworkMode::Bridge);
        x.veth = Some("nsh0000000a".into());
        sd.begin(&x, &lock).unwrap();
        assert_eq!(state.link_holder("nsh0000000a", ""), Some("x".into()));

        let done = recover(&mut k, &sd, &lock, &mut state).unwrap();
        assert_eq!(done, vec!["x".to_string()]);
        assert!(sd.pending().unwrap().is_empty(), "both intents are gone");
        assert!(k.host_link("nsh0000000a").is_none(), "x's veth was deleted");
        assert!(k.host_link("nsh0000000b").is_some(), "b's veth is b's");
        assert_eq!(
            state.link_holder("nsh0000000a", ""),
            None,
            "x's claim is gone"
        );
        assert!(state.record("b").is_some());
        drop(lock);
        let _ = std::fs::remove_dir_all(&sd.dir);
    }

    #[test]
    fn reap_dead_releases_the_dead_and_reports_what_it_could_not() {
        let cfg = Config::default();
        let mut k = host(&cfg);
        let sd = state_dir("reap");
        let lock = sd.lock().unwrap();
        let mut state = sd.open(&lock).unwrap();
        let mut dead = ContainerRecord::new("dead", NetworkMode::Bridge);
        dead.veth = Some("nsh0000000b".into());
        dead.pid = Some(i32::MAX);
        dead.netns_inode = Some(1);
        let mut alive = ContainerRecord::new("alive", NetworkMode::Bridge);
        alive.veth = Some("nsh0000000a".into());
        alive.pid = Some(std::process::id() as i32);
        alive.netns_inode = Some(netns::self_inode().unwrap());
        for r in [&dead, &alive] {
            sd.begin(r, &lock).unwrap();
            sd.commit(r, &mut state, &lock).unwrap();
        }
        let r = reap_dead(&mut k, &sd, &lock, &mut state).unwrap();
        assert_eq!(r.released, vec!["dead".to_string()]);
        assert!(r.failed.is_empty());
        assert!(state.record("dead").is_none());
        assert!(k.host_link("nsh0000000b").is_none());
        assert!(state.record("alive").is_some());
        assert!(k.host_link("nsh0000000a").is_some());

        // A release that fails keeps the record and says why.
        let mut shared = ContainerRecord::new("gone", NetworkMode::Awsvpc);
        shared.pid = Some(i32::MAX);
        shared.eni = Some(EniRecord {
            attachment: Attachment::Shared,
            veth: Some("nsa0000000d".into()),
            ..EniRecord::default()
        });
        sd.begin(&shared, &lock).unwrap();
        sd.commit(&shared, &mut state, &lock).unwrap();
        k.fail_at = Some("del_link");
        let r = reap_dead(&mut k, &sd, &lock, &mut state).unwrap();
        assert!(r.released.is_empty(), "{:?}", r.released);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "gone");
        assert_eq!(r.failed[0].1.0[0].step, "delete veth");
        assert!(state.record("gone").is_some(), "kept for `shim gc`");
        drop(lock);
        let _ = std::fs::remove_dir_all(&sd.dir);
    }
}
