//! `shim hook <stage>`: the OCI hook. Setup in createRuntime/prestart, teardown in poststop.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};

use std::fs::File;

use crate::commands::{Globals, gc};
use crate::config::Config;
use crate::kernel::netns;
use crate::kernel::probe::BindProbe;
use crate::modes::{HostKernel, Kernel, awsvpc, bridge, host};
use crate::oci::{self, OciState};
use crate::request::{self, EniSpec, NetworkMode, NetworkRequest};
use crate::state::{ContainerRecord, State};
use crate::trace;

/// Hook stages netshim acts on; other stages are accepted and ignored.
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
fn annotations(st: &OciState) -> anyhow::Result<std::collections::HashMap<String, String>> {
    if let Some(a) = &st.annotations
        && a.contains_key(request::MODE)
    {
        return Ok(a.clone());
    }
    match &st.bundle {
        Some(b) if b.join("config.json").exists() => oci::bundle_annotations(b),
        _ => Ok(st.annotations.clone().unwrap_or_default()),
    }
}

fn setup(g: &Globals, st: &OciState) -> anyhow::Result<()> {
    let ann = annotations(st)?;
    let Some(req) = request::from_annotations(&ann)? else {
        return Ok(());
    };
    let cfg = g.load_config()?;
    let pid = st.host_pid().ok_or_else(|| {
        anyhow!("container {}: the OCI state has no pid: register netshim as a createRuntime or prestart hook", st.id)
    })?;
    let ns = netns::open_pid(pid).map_err(|e| {
        anyhow!("container {}: pid {pid}: cannot open its network namespace ({e}): is the container process running?", st.id)
    })?;
    let inode = netns::inode(&ns).context("stat the container's netns")?;
    let shares_host = netns::self_inode().ok() == Some(inode);
    match (req.mode, shares_host) {
        (NetworkMode::Host, false) => bail!(
            "container {}: host mode needs the host's network namespace, but the container has one of its own: remove {{\"type\": \"network\"}} from linux.namespaces in config.json (podman: --network host)",
            st.id
        ),
        (NetworkMode::Bridge | NetworkMode::None | NetworkMode::Awsvpc, true) => bail!(
            "container {}: {} mode needs a network namespace of its own, but the container shares the host's: add {{\"type\": \"network\"}} to linux.namespaces in config.json",
            st.id,
            req.mode
        ),
        _ => {}
    }

    // An ENI given by MAC alone is looked up before the lock: no network wait inside it.
    let eni = match &req.eni {
        Some(e) => Some(
            awsvpc::resolve(&cfg.awsvpc, e.clone())
                .with_context(|| format!("awsvpc setup for container {}", st.id))?,
        ),
        None => None,
    };
    trace::mark("parse");
    let sd = g.state();
    let lock = sd.lock()?;
    trace::mark("lock");
    let mut state = sd.load()?;
    trace::mark("load-state");
    let mut k = HostKernel::new();
    if let Some(old) = state.containers.get(&st.id) {
        if old.netns_inode == Some(inode) && old.pid == Some(pid) {
            // prestart and createRuntime both registered: the second call finds it done.
            return Ok(());
        }
        // An earlier container with the same id that nobody tore down (crun and podman skip
        // poststop after a failed create): release it first.
        let old = old.clone();
        let errs = release(&mut k, &state, &old);
        if !errs.is_empty() {
            bail!(
                "container {}: releasing the stale earlier setup failed: {}",
                st.id,
                errs.join("; ")
            );
        }
        state.containers.remove(&st.id);
    }

    let mut rec = ContainerRecord {
        id: st.id.clone(),
        mode: req.mode,
        service: req.service.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pid: Some(pid),
        netns_inode: Some(inode),
        ip: None,
        veth: None,
        bridge: None,
        ports: Vec::new(),
        eni: None,
        lb: Default::default(),
    };
    let ctx = ModeCtx {
        cfg: &cfg,
        state_dir: &sd.dir,
        req: &req,
        eni: eni.as_ref(),
        ns: &ns,
        pid,
    };
    if let Err(first) = apply_mode(&ctx, &mut k, &mut state, &mut rec) {
        // Containers that died without a poststop (crun and podman skip it after a failed
        // create) may hold the port, address or ENI this one needs: release them, try again.
        let (reaped, _) = gc::reap_dead(&mut k, &mut state);
        if reaped.is_empty() {
            return Err(first);
        }
        if let Err(again) = apply_mode(&ctx, &mut k, &mut state, &mut rec) {
            sd.store(&state, &lock)?;
            return Err(again);
        }
    }
    state.containers.insert(st.id.clone(), rec.clone());
    if let Err(e) = sd.store(&state, &lock) {
        state.containers.remove(&st.id);
        let _ = release(&mut k, &state, &rec);
        return Err(e.into());
    }
    trace::mark("store-state");
    Ok(())
}

/// What a mode's setup needs besides the ledger and the record.
struct ModeCtx<'a> {
    cfg: &'a Config,
    state_dir: &'a std::path::Path,
    req: &'a NetworkRequest,
    eni: Option<&'a EniSpec>,
    ns: &'a File,
    pid: i32,
}

/// Runs the mode's setup, filling `rec`; on error everything it did is undone.
fn apply_mode(
    c: &ModeCtx,
    k: &mut HostKernel,
    state: &mut State,
    rec: &mut ContainerRecord,
) -> anyhow::Result<()> {
    let (cfg, req, ns, pid) = (c.cfg, c.req, c.ns, c.pid);
    let what = format!("{} setup for container {}", req.mode, rec.id);
    match req.mode {
        NetworkMode::Bridge => {
            let plan = bridge::plan(cfg, state, &rec.id, req, &BindProbe).context(what.clone())?;
            bridge::apply(k, cfg, state, &plan, ns).context(what.clone())?;
            rec.ip = Some(plan.ip);
            rec.veth = Some(plan.veth);
            rec.bridge = Some(cfg.bridge_name.clone());
            rec.ports = plan.ports;
            if req.ingress.is_some()
                && let Err(e) = awsvpc::task_firewall(ns, req.ingress.as_deref(), true)
            {
                let _ = release(k, state, rec);
                return Err(e.context(what));
            }
        }
        NetworkMode::Awsvpc => {
            let eni = c.eni.ok_or_else(|| anyhow!("{what}: no ENI"))?;
            let s = awsvpc::setup(
                &cfg.awsvpc,
                state,
                c.state_dir,
                &rec.id,
                pid,
                ns,
                eni,
                req.ingress.as_deref(),
            )
            .context(what)?;
            rec.ip = Some(s.ip);
            rec.eni = Some(s.eni);
            rec.ports = awsvpc::ports(&req.mappings);
        }
        NetworkMode::Host => {
            rec.ports = host::plan(cfg, state, &rec.id, req, &BindProbe).context(what)?;
        }
        NetworkMode::None => {
            k.loopback_up(ns).context("bring lo up").context(what)?;
        }
    }
    Ok(())
}

/// Undoes one record's kernel state (whatever its mode); returns the failures.
pub fn release(k: &mut dyn Kernel, state: &State, rec: &ContainerRecord) -> Vec<String> {
    match rec.mode {
        NetworkMode::Bridge => bridge::teardown(k, state, rec),
        NetworkMode::Awsvpc => match &rec.eni {
            Some(e) => awsvpc::teardown(e, rec.ip, state, &rec.id),
            None => Vec::new(),
        },
        // Host claims live only in the ledger; none mode's lo goes with its netns.
        NetworkMode::Host | NetworkMode::None => Vec::new(),
    }
}

/// Poststop: from the state alone; idempotent; unknown ids are no-ops.
pub fn teardown(g: &Globals, id: &str) -> anyhow::Result<()> {
    let sd = g.state();
    if !sd.state_path().exists() {
        return Ok(());
    }
    let lock = sd.lock()?;
    let mut state = sd.load()?;
    let Some(rec) = state.containers.get(id).cloned() else {
        return Ok(());
    };
    let mut k = HostKernel::new();
    // The kernel makes a veth deletion wait 20 ms or more for RCU grace periods. The bridge veth
    // is deleted after the ledger is committed and the lock released, so concurrent teardowns
    // and setups do not queue behind that wait. Its address is not handed out again at once
    // (next-fit), and a veth left by a crash in between is swept by `shim gc`.
    let mut quick = rec.clone();
    let veth = match rec.mode {
        NetworkMode::Bridge => quick.veth.take(),
        _ => None,
    };
    let errs = release(&mut k, &state, &quick);
    if !errs.is_empty() {
        // Keep the record so `shim gc` can finish the job.
        bail!(
            "teardown of container {id}: {} (kept in the state; `shim gc` retries)",
            errs.join("; ")
        );
    }
    state.containers.remove(id);
    sd.store(&state, &lock)?;
    drop(lock);
    if let Some(v) = veth {
        k.del_link(&v).with_context(|| {
            format!("teardown of container {id}: delete veth {v} (`shim gc` deletes it later)")
        })?;
    }
    Ok(())
}
