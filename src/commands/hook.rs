//! `shim hook <stage>`: the OCI hook. Setup in createRuntime/prestart, teardown in poststop.
//!
//! Setup, step by step: [`read_request`] (stdin and annotations, validated) → [`open_netns`]
//! (the container's network namespace, of the right kind for the mode) → [`prepare_eni`]
//! (metadata and the wait for the ENI, before the lock) → lock → [`settle_earlier`] (a re-run,
//! or an earlier container of the same id) → [`plan_and_apply`] (with one retry after reaping
//! dead holders) → persist, or release everything on failure.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};

use crate::commands::Globals;
use crate::config::Config;
use crate::fault;
use crate::kernel::{HostKernel, Kernel, netns};
use crate::modes::{self, SetupCtx, awsvpc, with_rollback};
use crate::oci::{self, OciState};
use crate::reap;
use crate::request::{self, EniSpec, NetworkRequest};
use crate::state::{ContainerRecord, Lock, State, StateDir};
use crate::trace;
use crate::types::NetworkMode;

/// Hook stages netshim acts on; the others are accepted and ignored (see docs/runtimes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    #[value(name = "createRuntime")]
    CreateRuntime,
    #[value(name = "prestart")]
    Prestart,
    #[value(name = "poststop")]
    Poststop,
    #[value(name = "createContainer")]
    CreateContainer,
    #[value(name = "startContainer")]
    StartContainer,
    #[value(name = "poststart")]
    Poststart,
}

pub fn run(g: &Globals, stage: Stage) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("read OCI state from stdin")?;
    let st = OciState::parse(&input)?;
    match stage {
        Stage::CreateRuntime | Stage::Prestart => setup(g, &st),
        Stage::Poststop => teardown(g, &st.id),
        _ => Ok(()),
    }
}

/// The annotations of the request: the state's, falling back to the bundle's config.json.
fn annotations(st: &OciState) -> anyhow::Result<HashMap<String, String>> {
    if let Some(a) = &st.annotations
        && a.keys().any(|k| k.starts_with(request::PREFIX))
    {
        return Ok(a.clone());
    }
    match &st.bundle {
        Some(b) if b.join("config.json").exists() => oci::bundle_annotations(b),
        _ => Ok(st.annotations.clone().unwrap_or_default()),
    }
}

/// Step 1: the validated request; `None` when the container asks nothing of netshim.
fn read_request(st: &OciState) -> anyhow::Result<Option<NetworkRequest>> {
    let ann = annotations(st)?;
    request::from_annotations(&ann).with_context(|| format!("container {}", st.id))
}

/// The container's network namespace as setup found it.
struct Netns {
    file: File,
    inode: u64,
    pid: i32,
}

/// Step 2: opens the container's netns from its pid and checks it suits the mode.
fn open_netns(st: &OciState, stage_hint: &str, mode: NetworkMode) -> anyhow::Result<Netns> {
    let id = &st.id;
    let pid = st.host_pid().ok_or_else(|| {
        anyhow!(
            "container {id}: the OCI state has no pid{stage_hint}: register netshim as a createRuntime or prestart hook"
        )
    })?;
    let file = netns::open_pid(pid).map_err(|e| {
        anyhow!("container {id}: pid {pid}: cannot open its network namespace ({e}): is the container process running?")
    })?;
    let inode = netns::inode(&file).context("stat the container's netns")?;
    let shares_host = netns::self_inode().ok() == Some(inode);
    match (mode.own_netns(), shares_host) {
        (false, false) => bail!(
            "container {id}: host mode needs the host's network namespace, but the container has one of its own: remove {{\"type\": \"network\"}} from linux.namespaces in config.json (podman: --network host)"
        ),
        (true, true) => bail!(
            "container {id}: {mode} mode needs a network namespace of its own, but the container shares the host's: add {{\"type\": \"network\"}} to linux.namespaces in config.json (podman: --network none)"
        ),
        _ => {}
    }
    Ok(Netns { file, inode, pid })
}

/// Step 3: an ENI given by MAC alone is completed from instance metadata, and setup waits for
/// its interface to appear — both before the lock, so a slow metadata service or a bogus MAC
/// stalls only this container.
fn prepare_eni(
    k: &mut dyn Kernel,
    cfg: &Config,
    st: &OciState,
    req: &NetworkRequest,
    sd: &StateDir,
    ns: &Netns,
) -> anyhow::Result<Option<EniSpec>> {
    let Some(e) = &req.eni else {
        return Ok(None);
    };
    let what = || format!("awsvpc setup for container {}", st.id);
    let eni = awsvpc::resolve(&cfg.awsvpc, e.clone()).with_context(what)?;
    // A quick look at the ledger (no lock): an ENI another task holds will not appear on the
    // host, so say so now rather than after the whole wait. The check under the lock decides.
    if let Ok(state) = sd.load() {
        if state
            .record(&st.id)
            .is_some_and(|r| r.netns_inode == Some(ns.inode) && r.pid == Some(ns.pid))
        {
            // Set up already (prestart and createRuntime both registered): its ENI is in the
            // task, not on the host; the check under the lock ends this run.
            return Ok(Some(eni));
        }
        let f = SetupCtx {
            cfg,
            state_dir: &sd.dir,
            id: &st.id,
            req,
            eni: Some(&eni),
            ns: &File::open("/dev/null")?,
            pid: 0,
        };
        awsvpc::precheck(&f, &state).with_context(what)?;
    }
    awsvpc::wait_for(k, &cfg.awsvpc, &eni).with_context(what)?;
    Ok(Some(eni))
}

fn setup(g: &Globals, st: &OciState) -> anyhow::Result<()> {
    let Some(req) = read_request(st)? else {
        return Ok(());
    };
    let cfg = g.load_config()?;
    let stage_hint = if st.status.as_deref() == Some("stopped") {
        " (status \"stopped\": this looks like a poststop state)"
    } else {
        ""
    };
    let ns = open_netns(st, stage_hint, req.mode)?;
    let sd = g.state()?;
    let mut k = HostKernel::new();
    let eni = prepare_eni(&mut k, &cfg, st, &req, &sd, &ns)?;
    trace::mark("parse");
    let lock = sd
        .lock_within(cfg.lock_timeout)
        .with_context(|| format!("container {}", st.id))?;
    fault::point("setup-locked");
    trace::mark("lock");
    let mut state = sd.open(&lock)?;
    reap::recover(&mut k, &sd, &lock, &mut state)?;
    trace::mark("load-state");
    let ctx = SetupCtx {
        cfg: &cfg,
        state_dir: &sd.dir,
        id: &st.id,
        req: &req,
        eni: eni.as_ref(),
        ns: &ns.file,
        pid: ns.pid,
    };
    if settle_earlier(&mut k, &sd, &lock, &mut state, st, &ns)? {
        return Ok(());
    }
    let base = new_record(st, &req, &ns);
    plan_and_apply(&ctx, &mut k, &sd, &lock, &mut state, &base)?;
    trace::mark("store-state");
    Ok(())
}

fn new_record(st: &OciState, req: &NetworkRequest, ns: &Netns) -> ContainerRecord {
    let mut rec = ContainerRecord::new(&st.id, req.mode);
    rec.service = req.service.clone();
    rec.created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rec.pid = Some(ns.pid);
    rec.netns_inode = Some(ns.inode);
    rec
}

/// Step 4: an existing record for this id. The same container seen again (prestart and
/// createRuntime both registered) is done: `Ok(true)`. An earlier container of that id whose
/// process is provably gone (crun and podman skip poststop after a failed create) is released
/// first. One that is still alive is never touched: that is another, live container.
fn settle_earlier(
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
    st: &OciState,
    ns: &Netns,
) -> anyhow::Result<bool> {
    let old = state.record(&st.id);
    state.io_result()?;
    let Some(old) = old else {
        return Ok(false);
    };
    if old.netns_inode == Some(ns.inode) && old.pid == Some(ns.pid) {
        return Ok(true);
    }
    if reap::alive(&old) {
        bail!(
            "container {}: the id is already recorded for a live container (pid {}, {} mode): delete that container first, or use another id",
            st.id,
            old.pid.unwrap_or(0),
            old.mode
        );
    }
    if let Err(errs) = modes::release(k, state, &old) {
        bail!(
            "container {}: releasing the earlier container of this id failed: {errs} (`shim gc` retries)",
            st.id
        );
    }
    sd.forget(&old, state, lock)?;
    Ok(false)
}

/// One attempt: plan, record the intent (and claims), apply, commit. A failure after the
/// intent undoes the kernel side and abandons the intent, so nothing is left either way.
fn attempt(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
    base: &ContainerRecord,
) -> anyhow::Result<()> {
    let f = modes::plan(c, k, state)?;
    state.io_result()?;
    trace::mark("plan");
    let mut rec = base.clone();
    f.clone().fill(&mut rec);
    sd.begin(&rec, lock)?;
    fault::point("setup-intent");
    if let Err(e) = modes::apply(c, k, state, &f) {
        return Err(match sd.abandon(&rec, lock) {
            Ok(()) => e,
            Err(x) => anyhow!("{e:#} (and abandoning its intent failed: {x}; `shim gc` retries)"),
        });
    }
    fault::point("setup-applied");
    if let Err(e) = sd.commit(&rec, state, lock) {
        let left = modes::release(k, state, &rec);
        let _ = sd.abandon(&rec, lock);
        return Err(with_rollback(e.into(), left));
    }
    fault::point("setup-committed");
    Ok(())
}

/// Step 5: plan and apply; when that fails, containers that died without a poststop may hold
/// the port, address or ENI this one needs: release them and try once more.
fn plan_and_apply(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
    base: &ContainerRecord,
) -> anyhow::Result<()> {
    let what = || format!("{} setup for container {}", c.req.mode, c.id);
    let cursors = state.cursors.clone();
    match attempt(c, k, sd, lock, state, base) {
        Ok(()) => Ok(()),
        Err(first) => {
            state.cursors = cursors;
            let reaped = reap::reap_dead(k, sd, lock, state)?;
            if reaped.released.is_empty() {
                return Err(first.context(what()));
            }
            attempt(c, k, sd, lock, state, base).with_context(what)
        }
    }
}

/// Deletes a container's host veth, unless the kernel is about to: a runtime runs poststop
/// after the container's processes died, and when nothing else holds its netns the kernel
/// destroys the netns and the veth pair with it, a few milliseconds later. Meanwhile that
/// destruction holds the kernel's rtnl lock and waits for RCU grace periods; any link request
/// from here (a deletion, even setting it down) would wait 10 to 20 ms behind it. So a
/// container whose process is gone and whose netns no bind mount pins is left to the kernel
/// without a single link request. Should some other process hold that netns after all, its
/// veth is a stray `shim gc` deletes (as after a crash between the ledger commit and the
/// deletion), the next setup of that name replaces it, and its address is not handed out again
/// before the subnet's other addresses (next-fit). A netns pinned by a bind mount (podman,
/// CRI-O, `ip netns`) or a container still alive gets its veth deleted here.
fn delete_veth(
    k: &mut dyn Kernel,
    rec: &ContainerRecord,
    name: &str,
) -> Result<(), crate::kernel::NlError> {
    let released = !reap::alive(rec)
        && rec
            .netns_inode
            .is_some_and(|ino| !netns::held_by_mount(ino));
    if released {
        trace::mark("veth-goes-with-netns");
        return Ok(());
    }
    k.del_link(name)?;
    trace::mark("veth");
    Ok(())
}

/// Poststop: from the state alone; idempotent; unknown ids are no-ops.
pub fn teardown(g: &Globals, id: &str) -> anyhow::Result<()> {
    let sd = g.state()?;
    if !sd.exists() {
        return Ok(());
    }
    let cfg = g.load_config()?;
    let lock = sd
        .lock_within(cfg.lock_timeout)
        .with_context(|| format!("teardown of container {id}"))?;
    let mut state = sd.open(&lock)?;
    let mut k = HostKernel::new();
    reap::recover(&mut k, &sd, &lock, &mut state)?;
    let Some((rec, veth)) = release_recorded(&mut k, &sd, &lock, &mut state, id)? else {
        return Ok(());
    };
    drop(lock);
    trace::mark("ledger");
    if let Some(v) = veth {
        delete_veth(&mut k, &rec, &v).with_context(|| {
            format!("teardown of container {id}: delete veth {v} (`shim gc` deletes it later)")
        })?;
    }
    Ok(())
}

/// Poststop under the lock: releases the record of `id` from the kernel and forgets it. Returns
/// the record and, for a bridge container, the veth still to delete once the lock is released;
/// `None` for an id netshim does not know. A release that fails keeps the record for `shim gc`.
fn release_recorded(
    k: &mut dyn Kernel,
    sd: &StateDir,
    lock: &Lock,
    state: &mut State,
    id: &str,
) -> anyhow::Result<Option<(ContainerRecord, Option<String>)>> {
    let rec = state.record(id);
    state.io_result()?;
    let Some(rec) = rec else {
        return Ok(None);
    };
    // The kernel makes a veth deletion wait 20 ms or more for RCU grace periods. The bridge veth
    // is deleted after the ledger is committed and the lock released, so concurrent teardowns
    // and setups do not queue behind that wait. Its address is not handed out again at once
    // (next-fit), and a veth left by a crash in between is swept by `shim gc` and replaced by
    // the next setup of that name.
    let mut quick = rec.clone();
    let veth = match rec.mode {
        NetworkMode::Bridge => quick.veth.take(),
        _ => None,
    };
    if let Err(errs) = modes::release(k, state, &quick) {
        // Keep the record so `shim gc` can finish the job.
        bail!("teardown of container {id}: {errs} (kept in the state; `shim gc` retries)");
    }
    fault::point("teardown-released");
    sd.forget(&rec, state, lock)?;
    fault::point("teardown-forgotten");
    Ok(Some((rec, veth)))
}

#[cfg(test)]
mod tests {
    //! The setup and teardown steps one by one, over the fake kernel and a state dir of their
    //! own (no root).

    use super::*;
    use crate::kernel::fake::{Fake, netns as fake_netns};
    use std::path::PathBuf;

    /// A pid no process has (above the kernel's pid_max).
    const DEAD_PID: i32 = i32::MAX;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nshook-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn state_json(id: &str, pid: Option<i32>, ann: &[(&str, &str)]) -> OciState {
        let ann: HashMap<String, String> = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OciState {
            id: id.into(),
            status: Some("creating".into()),
            pid: pid.map(i64::from),
            bundle: None,
            annotations: Some(ann),
        }
    }

    fn bridge_req(maps: &str) -> NetworkRequest {
        let st = state_json(
            "x",
            None,
            &[(request::MODE, "bridge"), (request::PORT_MAPPINGS, maps)],
        );
        read_request(&st).unwrap().unwrap()
    }

    /// A world for the locked steps: a state dir, its lock, the hook's view, the fake kernel.
    struct World {
        sd: StateDir,
        lock: Lock,
        state: State,
        k: Fake,
        cfg: Config,
    }

    impl World {
        fn new(tag: &str) -> World {
            let sd = StateDir::new(tmpdir(tag));
            let lock = sd.lock().unwrap();
            let state = sd.open(&lock).unwrap();
            World {
                sd,
                lock,
                state,
                k: Fake::new(),
                cfg: Config::default(),
            }
        }

        /// Runs `f` with a setup context for `id` asking `req`.
        fn with_ctx<T>(
            &mut self,
            id: &str,
            req: &NetworkRequest,
            f: impl FnOnce(&SetupCtx, &mut Fake, &StateDir, &Lock, &mut State) -> T,
        ) -> T {
            let c = SetupCtx {
                cfg: &self.cfg,
                state_dir: &self.sd.dir,
                id,
                req,
                eni: None,
                ns: fake_netns(),
                pid: 1,
            };
            f(&c, &mut self.k, &self.sd, &self.lock, &mut self.state)
        }

        /// The base record of a container `id` whose process is `pid` in netns `inode`.
        fn base(id: &str, req: &NetworkRequest, pid: i32, inode: u64) -> ContainerRecord {
            let mut r = ContainerRecord::new(id, req.mode);
            r.pid = Some(pid);
            r.netns_inode = Some(inode);
            r
        }

        fn attempt(&mut self, id: &str, req: &NetworkRequest, pid: i32) -> anyhow::Result<()> {
            let base = World::base(id, req, pid, 7);
            self.with_ctx(id, req, |c, k, sd, lock, st| {
                attempt(c, k, sd, lock, st, &base)
            })
        }

        fn plan_and_apply(
            &mut self,
            id: &str,
            req: &NetworkRequest,
            pid: i32,
        ) -> anyhow::Result<()> {
            let base = World::base(id, req, pid, 7);
            self.with_ctx(id, req, |c, k, sd, lock, st| {
                plan_and_apply(c, k, sd, lock, st, &base)
            })
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.sd.dir);
        }
    }

    #[test]
    fn read_request_ignores_containers_that_ask_nothing() {
        assert!(read_request(&state_json("a", None, &[])).unwrap().is_none());
        let other = state_json("a", None, &[("io.kubernetes.pod", "x")]);
        assert!(read_request(&other).unwrap().is_none());
    }

    #[test]
    fn read_request_names_the_container_of_a_bad_request() {
        let st = state_json("web-1", None, &[(request::MODE, "bridged")]);
        let msg = format!("{:#}", read_request(&st).unwrap_err());
        assert!(msg.starts_with("container web-1: "), "{msg}");
        assert!(msg.contains("bridged"), "{msg}");
    }

    #[test]
    fn read_request_falls_back_to_the_bundle_config() {
        let dir = tmpdir("bundle");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"netshim.network-mode":"none"}}"#,
        )
        .unwrap();
        let mut st = state_json("a", None, &[]);
        st.bundle = Some(dir.clone());
        let req = read_request(&st).unwrap().expect("the bundle's request");
        assert_eq!(req.mode, NetworkMode::None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn open_netns_checks_the_namespace_suits_the_mode() {
        let me = std::process::id() as i32;
        // This process is in the host's netns (by definition of the check).
        let st = state_json("a", Some(me), &[]);
        let ns = open_netns(&st, "", NetworkMode::Host).unwrap();
        assert_eq!(ns.pid, me);
        assert_eq!(Some(ns.inode), netns::self_inode().ok());
        let msg = open_netns(&st, "", NetworkMode::Bridge)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("container a: bridge mode needs a network namespace of its own"),
            "{msg}"
        );
        let none = state_json("a", None, &[]);
        let msg = open_netns(&none, " (hint)", NetworkMode::Bridge)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.starts_with("container a: the OCI state has no pid (hint): "),
            "{msg}"
        );
        let gone = state_json("a", Some(DEAD_PID), &[]);
        let msg = open_netns(&gone, "", NetworkMode::Bridge)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("cannot open its network namespace"), "{msg}");
    }

    #[test]
    fn attempt_commits_a_record_and_leaves_no_intent() {
        let mut w = World::new("commit");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        let rec = w.state.record("a").expect("committed");
        assert!(rec.veth.is_some() && rec.ip.is_some(), "{rec:?}");
        assert!(w.k.host_link(rec.veth.as_deref().unwrap()).is_some());
        assert!(w.sd.pending().unwrap().is_empty());
    }

    #[test]
    fn a_failed_apply_abandons_its_intent_and_its_claims() {
        let mut w = World::new("abandon");
        let req = bridge_req(r#"[{"containerPort":80,"hostPort":47613}]"#);
        w.k.fail_at = Some("add_veth");
        w.attempt("a", &req, DEAD_PID).unwrap_err();
        assert!(w.state.record("a").is_none());
        assert!(w.sd.pending().unwrap().is_empty(), "no intent left");
        assert!(
            w.state
                .port_holders(crate::types::Protocol::Tcp, 47613)
                .is_empty(),
            "no claim left"
        );
        // So the same setup succeeds once the kernel does.
        w.k.fail_at = None;
        w.attempt("a", &req, DEAD_PID).unwrap();
    }

    #[test]
    fn plan_and_apply_retries_once_after_reaping_a_dead_holder() {
        let mut w = World::new("reap");
        let req = bridge_req(r#"[{"containerPort":80,"hostPort":47614}]"#);
        w.attempt("old", &req, DEAD_PID).unwrap();
        let old_veth = w.state.record("old").unwrap().veth.unwrap();
        w.plan_and_apply("new", &req, DEAD_PID).unwrap();
        assert!(
            w.state.record("old").is_none(),
            "the dead holder was reaped"
        );
        let new = w.state.record("new").expect("committed");
        assert_eq!(new.ports[0].host_port, 47614);
        assert!(w.k.host_link(&old_veth).is_none());
    }

    #[test]
    fn plan_and_apply_never_reaps_a_live_holder() {
        let mut w = World::new("live");
        let req = bridge_req(r#"[{"containerPort":80,"hostPort":47615}]"#);
        let me = std::process::id() as i32;
        let inode = netns::self_inode().unwrap();
        let base = World::base("old", &req, me, inode);
        w.with_ctx("old", &req, |c, k, sd, lock, st| {
            attempt(c, k, sd, lock, st, &base)
        })
        .unwrap();
        let msg = format!("{:#}", w.plan_and_apply("new", &req, me).unwrap_err());
        assert!(msg.starts_with("bridge setup for container new: "), "{msg}");
        assert!(msg.contains("47615"), "{msg}");
        assert!(w.state.record("old").is_some(), "the live holder stays");
        assert!(w.state.record("new").is_none());
    }

    #[test]
    fn settle_earlier_tells_a_rerun_a_dead_predecessor_and_a_live_one_apart() {
        let mut w = World::new("settle");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        let veth = w.state.record("a").unwrap().veth.unwrap();
        let st = state_json("a", Some(DEAD_PID), &[]);
        let same = Netns {
            file: File::open("/dev/null").unwrap(),
            inode: 7,
            pid: DEAD_PID,
        };
        // The same container again (prestart after createRuntime): done.
        assert!(settle_earlier(&mut w.k, &w.sd, &w.lock, &mut w.state, &st, &same).unwrap());
        assert!(w.state.record("a").is_some());
        // A new container of that id, the earlier one dead: released and forgotten.
        let new = Netns {
            file: File::open("/dev/null").unwrap(),
            inode: 8,
            pid: 12,
        };
        assert!(!settle_earlier(&mut w.k, &w.sd, &w.lock, &mut w.state, &st, &new).unwrap());
        assert!(w.state.record("a").is_none());
        assert!(w.k.host_link(&veth).is_none());
        // An earlier one still alive: refused, untouched.
        let me = std::process::id() as i32;
        let base = World::base("a", &req, me, netns::self_inode().unwrap());
        w.with_ctx("a", &req, |c, k, sd, lock, st| {
            attempt(c, k, sd, lock, st, &base)
        })
        .unwrap();
        let msg = settle_earlier(&mut w.k, &w.sd, &w.lock, &mut w.state, &st, &new)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!(
                "container a: the id is already recorded for a live container (pid {me}, bridge mode)"
            )),
            "{msg}"
        );
        assert!(w.state.record("a").is_some());
    }

    #[test]
    fn settle_earlier_reports_a_failed_release_and_keeps_the_record() {
        let mut w = World::new("settle-fail");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        let st = state_json("a", Some(DEAD_PID), &[]);
        let new = Netns {
            file: File::open("/dev/null").unwrap(),
            inode: 8,
            pid: 12,
        };
        w.k.fail_at = Some("del_link");
        let msg = settle_earlier(&mut w.k, &w.sd, &w.lock, &mut w.state, &st, &new)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "container a: releasing the earlier container of this id failed: delete veth "
            ),
            "{msg}"
        );
        assert!(msg.ends_with("(`shim gc` retries)"), "{msg}");
        assert!(w.state.record("a").is_some(), "kept for `shim gc`");
    }

    #[test]
    fn release_recorded_ignores_an_unknown_id() {
        let mut w = World::new("td-unknown");
        let r = release_recorded(&mut w.k, &w.sd, &w.lock, &mut w.state, "nope").unwrap();
        assert!(r.is_none());
        assert!(w.k.calls.is_empty(), "{:?}", w.k.calls);
    }

    #[test]
    fn release_recorded_forgets_the_record_and_leaves_the_veth_for_after_the_lock() {
        let mut w = World::new("td-bridge");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        let veth = w.state.record("a").unwrap().veth.unwrap();
        assert!(!w.k.elements().is_empty());
        let (rec, left) = release_recorded(&mut w.k, &w.sd, &w.lock, &mut w.state, "a")
            .unwrap()
            .expect("known");
        assert_eq!(rec.id, "a");
        assert_eq!(left.as_deref(), Some(veth.as_str()));
        assert!(w.state.record("a").is_none(), "forgotten");
        assert!(w.k.elements().is_empty(), "{:?}", w.k.elements());
        assert!(
            w.k.host_link(&veth).is_some(),
            "deleted only after the lock"
        );
    }

    #[test]
    fn a_failed_release_keeps_the_record_for_gc() {
        let mut w = World::new("td-fail");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        w.k.fail_at = Some("nft");
        let msg = release_recorded(&mut w.k, &w.sd, &w.lock, &mut w.state, "a")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("teardown of container a: "), "{msg}");
        assert!(
            msg.ends_with("(kept in the state; `shim gc` retries)"),
            "{msg}"
        );
        assert!(w.state.record("a").is_some());
    }

    #[test]
    fn delete_veth_leaves_a_dead_containers_veth_to_the_kernel_and_deletes_a_live_ones() {
        let mut w = World::new("td-veth");
        let req = bridge_req(r#"[{"containerPort":80}]"#);
        w.attempt("a", &req, DEAD_PID).unwrap();
        let rec = w.state.record("a").unwrap();
        let veth = rec.veth.clone().unwrap();
        // Dead, its netns pinned by no mount: the kernel takes the pair with the netns.
        w.k.calls.clear();
        delete_veth(&mut w.k, &rec, &veth).unwrap();
        assert!(w.k.calls.is_empty(), "no link request: {:?}", w.k.calls);
        // Alive (this process, in its own netns): deleted here.
        let mut live = rec.clone();
        live.pid = Some(std::process::id() as i32);
        live.netns_inode = Some(netns::self_inode().unwrap());
        delete_veth(&mut w.k, &live, &veth).unwrap();
        assert!(w.k.host_link(&veth).is_none());
    }
}
