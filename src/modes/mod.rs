//! The network modes, side by side: [`plan`] decides what a container gets (allocations and
//! lookups, no kernel change), [`apply`] makes it so through the [`Kernel`] port with rollback,
//! and [`release`] undoes it from the container's record alone. Each mode lives in its own file
//! and returns its own record fields ([`ModeFields`]).

pub mod awsvpc;
pub mod bridge;
pub mod host;

use std::fmt;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::kernel::Kernel;
use crate::kernel::probe::BindProbe;
use crate::request::{EniSpec, IngressRule, NetworkRequest};
use crate::state::{ContainerRecord, EniRecord, PortRecord, State};
use crate::types::NetworkMode;

/// What a mode's setup needs besides the kernel and the ledger.
pub struct SetupCtx<'a> {
    pub cfg: &'a Config,
    pub state_dir: &'a Path,
    pub id: &'a str,
    pub req: &'a NetworkRequest,
    /// awsvpc: the ENI, completed from instance metadata when it was given by MAC alone.
    pub eni: Option<&'a EniSpec>,
    /// The container's network namespace.
    pub ns: &'a File,
    pub pid: i32,
}

/// The parts of a container's record a mode fills in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModeFields {
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub veth: Option<String>,
    pub bridge: Option<String>,
    pub ports: Vec<PortRecord>,
    pub eni: Option<EniRecord>,
}

impl ModeFields {
    /// Copies the fields into `rec`.
    pub fn fill(self, rec: &mut ContainerRecord) {
        rec.ip = self.ip;
        rec.ip6 = self.ip6;
        rec.veth = self.veth;
        rec.bridge = self.bridge;
        rec.ports = self.ports;
        rec.eni = self.eni;
    }
}

/// Decides what the container gets: addresses, host ports, names, the ENI (allocated in
/// `state`, which the caller persists as the pending record before [`apply`] touches the
/// kernel). Reads the kernel, never changes it.
pub fn plan(c: &SetupCtx, k: &mut dyn Kernel, state: &mut State) -> anyhow::Result<ModeFields> {
    match c.req.mode {
        NetworkMode::Bridge => bridge::plan(c.cfg, state, c.id, c.req, k, &BindProbe),
        NetworkMode::Host => host::plan(c.cfg, state, c.id, c.req, k, &BindProbe),
        NetworkMode::Awsvpc => awsvpc::plan(c, k, state),
        NetworkMode::None => Ok(ModeFields::default()),
    }
}

/// Makes the plan so. On error everything it did is undone (or the error says what is left).
pub fn apply(
    c: &SetupCtx,
    k: &mut dyn Kernel,
    state: &State,
    f: &ModeFields,
) -> anyhow::Result<()> {
    match c.req.mode {
        NetworkMode::Bridge => bridge::apply(k, c, state, f),
        NetworkMode::Awsvpc => awsvpc::apply(k, c, state, f),
        // Host claims live only in the ledger.
        NetworkMode::Host => Ok(()),
        NetworkMode::None => k.loopback_up(c.ns).context("bring lo up"),
    }
}

/// Undoes one record's kernel state (whatever its mode, however far its setup got). Missing
/// pieces are fine; real failures are all reported, none stops the others.
pub fn release(
    k: &mut dyn Kernel,
    state: &State,
    rec: &ContainerRecord,
) -> Result<(), ReleaseErrors> {
    let mut errs = ReleaseErrors::default();
    match rec.mode {
        NetworkMode::Bridge => bridge::teardown(k, state, rec, &mut errs),
        NetworkMode::Awsvpc => awsvpc::teardown(k, state, rec, &mut errs),
        // Host claims live only in the ledger; none mode's lo goes with its netns.
        NetworkMode::Host | NetworkMode::None => {}
    }
    errs.into_result()
}

/// Applies the task's own firewall inside `ns`: instance metadata blocked (unless allowed) and,
/// with `netshim.ingress`, new inbound connections admitted only by a rule.
pub fn task_firewall(
    k: &mut dyn Kernel,
    ns: &File,
    ingress: Option<&[IngressRule]>,
    allow_metadata: bool,
) -> anyhow::Result<()> {
    let Some(batch) = crate::firewall::task_batch(ingress, allow_metadata)? else {
        return Ok(());
    };
    k.nft_in(ns, &batch).context("program the task's firewall")
}

/// One thing a release could not undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseError {
    /// What was being done, e.g. "delete veth".
    pub step: &'static str,
    /// What it was done to, e.g. "nsh1a2b3c4d".
    pub object: String,
    /// The kernel's (or the file system's) answer.
    pub cause: String,
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}: {}", self.step, self.cause)
        } else {
            write!(f, "{} {}: {}", self.step, self.object, self.cause)
        }
    }
}

/// Everything a release could not undo, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseErrors(pub Vec<ReleaseError>);

impl ReleaseErrors {
    pub fn push(
        &mut self,
        step: &'static str,
        object: impl fmt::Display,
        cause: impl fmt::Display,
    ) {
        self.0.push(ReleaseError {
            step,
            object: object.to_string(),
            cause: cause.to_string(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn into_result(self) -> Result<(), ReleaseErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ReleaseErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ReleaseErrors {}

/// A setup error, with what its rollback could not undo (the one phrasing used everywhere).
pub fn with_rollback(e: anyhow::Error, left: Result<(), ReleaseErrors>) -> anyhow::Error {
    match left {
        Ok(()) => e,
        Err(left) => anyhow::anyhow!("{e:#} (rollback incomplete: {left}; `shim gc` retries)"),
    }
}
