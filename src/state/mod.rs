//! The ledger: every container netshim set up, with what it holds.
//!
//! On disk ([`dir`]): one file per container under `containers/` (replaced atomically, so a
//! reader never sees half a record and needs no lock), an intent file under `pending/` written
//! before a setup touches the kernel, claim files under `claims/` so a setup's questions ("who
//! holds port 40001?") cost one `open` whatever the number of containers, and `index.json`
//! (next-fit cursors and the revision registrars report). Writers hold one lock around
//! allocate → apply → persist.
//!
//! In memory, a [`State`] answers those questions either from a full snapshot (every record
//! loaded: `shim gc`, `ports list`, unit tests) or from the claim files (a hook). Both answer from
//! the same derivation of claims ([`claims::claims_of`]), so the unit tests over snapshots test
//! what the hook does.

pub mod claims;
pub mod dir;
pub mod record;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use claims::{Claim, ClaimDir, Holder};
pub use dir::{Lock, StateDir};
pub use record::{ContainerRecord, EniRecord, LbState, PortRecord};

use crate::types::{MacAddr, Protocol};

/// Version of the state format; a newer one is refused rather than misread.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state dir {path}: {cause}")]
    Dir { path: String, cause: io::Error },
    #[error(
        "state dir {path} is not safe: {why}: it must be a directory owned by root and writable by no one else (fix it, or choose another --state-dir)"
    )]
    Unsafe { path: String, why: String },
    #[error("state lock {path}: {cause}")]
    Lock { path: String, cause: io::Error },
    #[error(
        "state file {path} is corrupt ({msg}): it was left untouched; `shim gc` moves it aside and repairs what it held"
    )]
    Corrupt { path: String, msg: String },
    #[error(
        "state file {path} has version {found}, this shim understands {STATE_VERSION}: use the shim that wrote it"
    )]
    Version { path: String, found: u32 },
    #[error("state file {path}: {cause}")]
    Io { path: String, cause: io::Error },
    #[error(
        "the netshim lock {path} is held by {holder}, who did not release it within {waited:.1}s: is a hook or `shim gc` stuck? (hook.lock_timeout_seconds sets the wait)"
    )]
    Busy {
        path: String,
        holder: String,
        waited: f64,
    },
}

/// Next-fit cursors: where the last allocation ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cursors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The conntrack zone given last (bridge containers with UDP mappings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
}

/// Where a claims-backed [`State`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub claims: ClaimDir,
    pub records: PathBuf,
}

/// The ledger in memory: a full snapshot, or a view answering from the claim files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub cursors: Cursors,
    /// Bumped by every change of the committed records.
    #[serde(default)]
    pub revision: u64,
    /// Every committed record (a snapshot); empty in a claims-backed view.
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerRecord>,
    /// Snapshot: when each released host port ("tcp-40001") was released.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub released: BTreeMap<String, u64>,
    #[serde(skip)]
    backing: Option<Backing>,
    /// The first failed read of a claims-backed view (a read error must not pass for "free").
    #[serde(skip)]
    io_error: RefCell<Option<String>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            cursors: Cursors::default(),
            revision: 0,
            containers: BTreeMap::new(),
            released: BTreeMap::new(),
            backing: None,
            io_error: RefCell::new(None),
        }
    }
}

fn port_key(proto: Protocol, port: u16) -> String {
    format!("{proto}-{port}")
}

impl State {
    /// A view answering from claim files (the hook's).
    pub fn backed(backing: Backing, cursors: Cursors, revision: u64) -> State {
        State {
            cursors,
            revision,
            backing: Some(backing),
            ..State::default()
        }
    }

    fn note(&self, e: impl std::fmt::Display) {
        let mut slot = self.io_error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e.to_string());
        }
    }

    /// Fails if any read of the view failed (call after planning, before acting on it).
    pub fn io_result(&self) -> Result<(), StateError> {
        match self.io_error.borrow().as_ref() {
            None => Ok(()),
            Some(m) => Err(StateError::Io {
                path: self
                    .backing
                    .as_ref()
                    .map(|b| b.claims.root.display().to_string())
                    .unwrap_or_default(),
                cause: io::Error::other(m.clone()),
            }),
        }
    }

    /// Holders of `c`.
    pub fn holders(&self, c: &Claim) -> Vec<Holder> {
        match &self.backing {
            Some(b) => match b.claims.read(c) {
                Ok(f) => f.holders,
                Err(e) => {
                    self.note(format!("claim {}: {e}", c.rel_path().display()));
                    Vec::new()
                }
            },
            None => self
                .containers
                .values()
                .flat_map(|r| {
                    claims::claims_of(r)
                        .into_iter()
                        .filter(|(x, _)| x == c)
                        .map(|(_, detail)| Holder {
                            id: r.id.clone(),
                            detail,
                        })
                })
                .collect(),
        }
    }

    /// Holders of host port `port`/`proto`: (bind address, or `None` for all; container id).
    pub fn port_holders(&self, proto: Protocol, port: u16) -> Vec<(Option<Ipv4Addr>, String)> {
        self.holders(&Claim::Port(proto, port))
            .into_iter()
            .map(|h| (h.detail.parse().ok(), h.id))
            .collect()
    }

    /// When host port `port`/`proto` was last released (seconds since the epoch), if known.
    pub fn released_at(&self, proto: Protocol, port: u16) -> Option<u64> {
        match &self.backing {
            Some(b) => match b.claims.read(&Claim::Port(proto, port)) {
                Ok(f) => f.released,
                Err(e) => {
                    self.note(e);
                    None
                }
            },
            None => self.released.get(&port_key(proto, port)).copied(),
        }
    }

    /// The container holding address `ip`, other than `except`.
    pub fn ip_holder(&self, ip: IpAddr, except: &str) -> Option<String> {
        self.holders(&Claim::Ip(ip))
            .into_iter()
            .map(|h| h.id)
            .find(|id| id != except)
    }

    /// The container holding host link name `name`, other than `except`.
    pub fn link_holder(&self, name: &str, except: &str) -> Option<String> {
        self.holders(&Claim::Link(name.to_string()))
            .into_iter()
            .map(|h| h.id)
            .find(|id| id != except)
    }

    /// Tasks holding the interface `mac`, other than `except`, with their role (an attachment,
    /// or `trunk`).
    pub fn eni_holders(&self, mac: MacAddr, except: &str) -> Vec<Holder> {
        self.holders(&Claim::Eni(mac))
            .into_iter()
            .filter(|h| h.id != except)
            .collect()
    }

    /// The task holding VLAN `vlan` of trunk `trunk`, other than `except`.
    pub fn vlan_holder(&self, trunk: MacAddr, vlan: u16, except: &str) -> Option<String> {
        self.holders(&Claim::Vlan(trunk, vlan))
            .into_iter()
            .map(|h| h.id)
            .find(|id| id != except)
    }

    /// One committed record.
    pub fn record(&self, id: &str) -> Option<ContainerRecord> {
        match &self.backing {
            Some(b) => match dir::read_record(&b.records, id) {
                Ok(r) => r,
                Err(e) => {
                    self.note(e);
                    None
                }
            },
            None => self.containers.get(id).cloned(),
        }
    }

    /// Every committed record. Reads them all from disk in a claims-backed view: for the rare
    /// paths only (a table rebuild, the first container on a bridge, reaping).
    pub fn records(&self) -> Vec<ContainerRecord> {
        match &self.backing {
            Some(b) => match dir::read_records(&b.records) {
                Ok((recs, _)) => recs,
                Err(e) => {
                    self.note(e);
                    Vec::new()
                }
            },
            None => self.containers.values().cloned().collect(),
        }
    }

    /// Adds a record to a snapshot (tests, and a hook's own bookkeeping).
    pub fn insert(&mut self, rec: ContainerRecord) {
        self.containers.insert(rec.id.clone(), rec);
    }

    #[cfg(test)]
    /// Drops a record from a snapshot, remembering its host ports' release at `now`.
    pub fn remove(&mut self, id: &str, now: u64) -> Option<ContainerRecord> {
        let r = self.containers.remove(id)?;
        for (c, _) in claims::claims_of(&r) {
            if let Claim::Port(p, n) = c
                && self.port_holders(p, n).is_empty()
            {
                self.released.insert(port_key(p, n), now);
            }
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NetworkMode;

    fn rec(id: &str, port: u16, ip: Option<Ipv4Addr>) -> ContainerRecord {
        let mut r = ContainerRecord::new(id, NetworkMode::Bridge);
        r.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
        r.veth = Some(format!("nsh{:08x}", port));
        r.ports = vec![PortRecord {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port: port,
            host_ip: ip,
            name: None,
            dynamic: true,
            ct_zone: None,
        }];
        r
    }

    #[test]
    fn a_snapshot_and_the_claim_files_give_the_same_answers() {
        let root = std::env::temp_dir().join(format!("nsstate-eq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cd = ClaimDir {
            root: root.join("claims"),
        };
        let mut snap = State::default();
        for r in [
            rec("a", 40001, None),
            rec("b", 40002, Some(Ipv4Addr::LOCALHOST)),
            rec("c", 40002, Some(Ipv4Addr::new(192, 0, 2, 2))),
        ] {
            for (c, d) in claims::claims_of(&r) {
                cd.add(&c, &r.id, &d).unwrap();
            }
            snap.insert(r);
        }
        let view = State::backed(
            Backing {
                claims: cd,
                records: root.join("containers"),
            },
            Cursors::default(),
            0,
        );
        for port in [40001, 40002, 40003] {
            let mut a = snap.port_holders(Protocol::Tcp, port);
            let mut b = view.port_holders(Protocol::Tcp, port);
            a.sort();
            b.sort();
            assert_eq!(a, b, "port {port}");
        }
        assert_eq!(
            snap.link_holder("nsh00009c41", ""),
            view.link_holder("nsh00009c41", "")
        );
        assert_eq!(view.link_holder("nsh00009c41", "").as_deref(), Some("a"));
        assert!(view.io_result().is_ok());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_removed_record_leaves_its_ports_release_time() {
        let mut s = State::default();
        s.insert(rec("a", 40001, None));
        s.remove("a", 77);
        assert_eq!(s.released_at(Protocol::Tcp, 40001), Some(77));
        assert!(s.port_holders(Protocol::Tcp, 40001).is_empty());
    }
}
