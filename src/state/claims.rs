//! Claims: what each container holds (addresses, host ports, link names, ENIs, VLANs) as one
//! small file per claimed thing under `<state dir>/claims/`, so a setup asks "who holds port
//! 40001/tcp?" with one `open` instead of reading every record. Claims are derived from the
//! records ([`claims_of`]) and can always be rebuilt from them (`shim gc` does); they are
//! written and read only under the lock.
//!
//! A claim file has one line per holder, `<container id> <detail>` (the detail: a port's bind
//! address or `*`; an ENI's role), and for a host port its last holder leaves `~ <seconds>`: when
//! it was released, for the reuse delay.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::record::ContainerRecord;
use crate::types::{Attachment, MacAddr, NetworkMode, Protocol};

/// Something one or more containers hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Claim {
    /// A container or task address.
    Ip(IpAddr),
    /// A host port (bridge and host mode; awsvpc tasks listen on their own address).
    Port(Protocol, u16),
    /// A host link name netshim created.
    Link(String),
    /// An interface given to a task; the detail says how (exclusive, shared, branch, trunk).
    Eni(MacAddr),
    /// A VLAN id on a trunk.
    Vlan(MacAddr, u16),
}

impl Claim {
    /// The claim's file, relative to the claims directory.
    pub fn rel_path(&self) -> PathBuf {
        match self {
            Claim::Ip(ip) => Path::new("ip").join(ip.to_string()),
            Claim::Port(p, n) => Path::new("port").join(format!("{p}-{n}")),
            Claim::Link(n) => Path::new("link").join(n),
            Claim::Eni(m) => Path::new("eni").join(m.to_string()),
            Claim::Vlan(m, v) => Path::new("vlan").join(format!("{m}-{v}")),
        }
    }
}

/// One holder of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    pub detail: String,
}

/// The role an ENI claim's detail names for a trunk.
pub const TRUNK: &str = "trunk";

/// Every claim a record makes, with its detail.
pub fn claims_of(rec: &ContainerRecord) -> Vec<(Claim, String)> {
    let mut out = Vec::new();
    if let Some(ip) = rec.ip {
        out.push((Claim::Ip(IpAddr::V4(ip)), String::new()));
    }
    if let Some(ip) = rec.ip6 {
        out.push((Claim::Ip(IpAddr::V6(ip)), String::new()));
    }
    if rec.mode != NetworkMode::Awsvpc {
        for p in &rec.ports {
            let detail = p
                .host_ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "*".into());
            out.push((Claim::Port(p.protocol, p.host_port), detail));
        }
    }
    if let Some(v) = &rec.veth {
        out.push((Claim::Link(v.clone()), String::new()));
    }
    if let Some(e) = &rec.eni {
        out.push((Claim::Eni(e.mac), e.attachment.to_string()));
        if let Some(v) = &e.veth {
            out.push((Claim::Link(v.clone()), String::new()));
        }
        if let (Attachment::Branch, Some(t)) = (e.attachment, e.trunk) {
            out.push((Claim::Eni(t), TRUNK.into()));
            if let Some(vlan) = e.vlan {
                out.push((Claim::Vlan(t, vlan), String::new()));
            }
        }
    }
    out
}

/// A claim file's content: holders and, for a released host port, when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimFile {
    pub holders: Vec<Holder>,
    pub released: Option<u64>,
}

impl ClaimFile {
    fn parse(text: &str) -> ClaimFile {
        let mut f = ClaimFile::default();
        for line in text.lines() {
            let (a, b) = line.split_once(' ').unwrap_or((line, ""));
            if a == "~" {
                f.released = b.trim().parse().ok();
            } else if !a.is_empty() {
                f.holders.push(Holder {
                    id: a.to_string(),
                    detail: b.to_string(),
                });
            }
        }
        f
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for h in &self.holders {
            s += &format!("{} {}\n", h.id, h.detail);
        }
        if self.holders.is_empty()
            && let Some(t) = self.released
        {
            s += &format!("~ {t}\n");
        }
        s
    }
}

/// The claims directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDir {
    pub root: PathBuf,
}

impl ClaimDir {
    pub fn read(&self, c: &Claim) -> io::Result<ClaimFile> {
        match fs::read_to_string(self.root.join(c.rel_path())) {
            Ok(t) => Ok(ClaimFile::parse(&t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ClaimFile::default()),
            Err(e) => Err(e),
        }
    }

    fn write(&self, c: &Claim, f: &ClaimFile) -> io::Result<()> {
        let path = self.root.join(c.rel_path());
        let text = f.render();
        if text.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let dir = path.parent().unwrap_or(&self.root);
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("claim")
        ));
        let _ = fs::remove_file(&tmp);
        let mut file = match create_excl(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
                create_excl(&tmp)?
            }
            r => r?,
        };
        if let Err(e) = file.write_all(text.as_bytes()) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(file);
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Adds `id` as a holder of `c` (idempotent).
    pub fn add(&self, c: &Claim, id: &str, detail: &str) -> io::Result<()> {
        let mut f = self.read(c)?;
        if f.holders.iter().any(|h| h.id == id && h.detail == detail) {
            return Ok(());
        }
        f.holders.push(Holder {
            id: id.into(),
            detail: detail.into(),
        });
        f.released = None;
        self.write(c, &f)
    }

    /// Drops `id` from `c`; a host port whose last holder goes remembers when (`now`; `None`
    /// for a claim that was never used, as an abandoned setup's).
    pub fn remove(&self, c: &Claim, id: &str, now: Option<u64>) -> io::Result<()> {
        let mut f = self.read(c)?;
        let before = f.holders.len();
        f.holders.retain(|h| h.id != id);
        if f.holders.len() == before {
            return Ok(());
        }
        if f.holders.is_empty() && matches!(c, Claim::Port(..)) {
            f.released = now;
        }
        self.write(c, &f)
    }

    /// Every claim file: (claim path relative to the root, content).
    pub fn all(&self) -> io::Result<Vec<(PathBuf, ClaimFile)>> {
        let mut out = Vec::new();
        for kind in ["ip", "port", "link", "eni", "vlan"] {
            let dir = self.root.join(kind);
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let name = e.file_name();
                if name.to_string_lossy().starts_with('.') {
                    let _ = fs::remove_file(e.path());
                    continue;
                }
                let text = fs::read_to_string(e.path())?;
                out.push((Path::new(kind).join(name), ClaimFile::parse(&text)));
            }
        }
        Ok(out)
    }

    /// Replaces every claim with exactly those of `records`, keeping the release times of
    /// ports; returns what differed (claims added, holders dropped), for `shim gc` to report.
    pub fn rebuild<'a>(
        &self,
        records: impl IntoIterator<Item = &'a ContainerRecord>,
    ) -> io::Result<Vec<String>> {
        use std::collections::BTreeMap;
        let mut want: BTreeMap<PathBuf, ClaimFile> = BTreeMap::new();
        for r in records {
            for (c, detail) in claims_of(r) {
                let f = want.entry(c.rel_path()).or_default();
                if !f.holders.iter().any(|h| h.id == r.id && h.detail == detail) {
                    f.holders.push(Holder {
                        id: r.id.clone(),
                        detail,
                    });
                }
            }
        }
        let mut changes = Vec::new();
        let have = self.all()?;
        for (rel, f) in &have {
            let wanted = want.get(rel);
            for h in &f.holders {
                if !wanted.is_some_and(|w| w.holders.contains(h)) {
                    changes.push(format!(
                        "dropped claim {} of {} (no record holds it)",
                        rel.display(),
                        crate::output::escape_controls(&h.id)
                    ));
                }
            }
            let keep_release = f.released.filter(|_| wanted.is_none());
            let path = self.root.join(rel);
            match (wanted, keep_release) {
                (Some(_), _) => {}
                (None, Some(t)) if !f.holders.is_empty() => {
                    fs::write(&path, format!("~ {t}\n"))?;
                }
                (None, Some(_)) => {}
                (None, None) => fs::remove_file(&path)?,
            }
        }
        for (rel, f) in &want {
            let had = have.iter().find(|(p, _)| p == rel).map(|(_, f)| f);
            for h in &f.holders {
                if !had.is_some_and(|x| x.holders.contains(h)) {
                    changes.push(format!(
                        "restored claim {} of {}",
                        rel.display(),
                        crate::output::escape_controls(&h.id)
                    ));
                }
            }
            let path = self.root.join(rel);
            if let Some(dir) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            if had.map(|x| &x.holders) != Some(&f.holders) {
                fs::write(&path, f.render())?;
            }
        }
        Ok(changes)
    }
}

use std::os::unix::fs::DirBuilderExt;

/// Creates `path` for writing, failing if anything (a symlink included) is already there.
pub fn create_excl(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::{EniRecord, PortRecord};
    use std::net::Ipv4Addr;

    fn tmp(tag: &str) -> ClaimDir {
        let d = std::env::temp_dir().join(format!("nsclaims-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        ClaimDir { root: d }
    }

    #[test]
    fn holders_are_added_and_removed_and_a_port_remembers_its_release() {
        let c = tmp("add");
        let p = Claim::Port(Protocol::Tcp, 40001);
        c.add(&p, "a", "*").unwrap();
        c.add(&p, "b", "127.0.0.1").unwrap();
        c.add(&p, "b", "127.0.0.1").unwrap();
        let f = c.read(&p).unwrap();
        assert_eq!(f.holders.len(), 2);
        c.remove(&p, "a", Some(7)).unwrap();
        c.remove(&p, "b", Some(9)).unwrap();
        let f = c.read(&p).unwrap();
        assert!(f.holders.is_empty());
        assert_eq!(f.released, Some(9));
        // A new holder clears the release time.
        c.add(&p, "c", "*").unwrap();
        assert_eq!(c.read(&p).unwrap().released, None);
        let l = Claim::Link("nsh00000001".into());
        c.add(&l, "a", "").unwrap();
        c.remove(&l, "a", Some(1)).unwrap();
        assert!(!c.root.join("link/nsh00000001").exists());
        fs::remove_dir_all(&c.root).unwrap();
    }

    #[test]
    fn rebuild_makes_the_claims_exactly_those_of_the_records() {
        let c = tmp("rebuild");
        let mut r = ContainerRecord::new("a", NetworkMode::Bridge);
        r.ip = Some(Ipv4Addr::new(10, 213, 0, 2));
        r.veth = Some("nsh00000001".into());
        r.ports = vec![PortRecord {
            protocol: Protocol::Udp,
            container_port: 53,
            host_port: 40053,
            host_ip: None,
            name: None,
            dynamic: true,
            ct_zone: None,
        }];
        let mut t = ContainerRecord::new("t", NetworkMode::Awsvpc);
        t.eni = Some(EniRecord {
            mac: "02:00:00:00:01:05".parse().unwrap(),
            attachment: Attachment::Branch,
            trunk: Some("02:00:00:00:01:00".parse().unwrap()),
            vlan: Some(105),
            ..EniRecord::default()
        });
        // A stale claim of a container that has no record, and a missing one.
        c.add(&Claim::Link("nsh0000dead".into()), "gone", "")
            .unwrap();
        let changes = c.rebuild([&r, &t]).unwrap();
        assert!(
            changes
                .iter()
                .any(|x| x.contains("dropped claim link/nsh0000dead of gone")),
            "{changes:?}"
        );
        assert!(
            changes
                .iter()
                .any(|x| x.contains("restored claim port/udp-40053 of a")),
            "{changes:?}"
        );
        let trunk: MacAddr = "02:00:00:00:01:00".parse().unwrap();
        assert_eq!(c.read(&Claim::Vlan(trunk, 105)).unwrap().holders[0].id, "t");
        assert_eq!(c.read(&Claim::Eni(trunk)).unwrap().holders[0].detail, TRUNK);
        // Rebuilding again changes nothing.
        assert!(c.rebuild([&r, &t]).unwrap().is_empty());
        fs::remove_dir_all(&c.root).unwrap();
    }
}
