//! Which host interfaces may be given to a task. An ENI is a NIC of an eligible kind (a
//! physical NIC, or a kind the config lists for a test rig), and never: loopback, a bridge, bond
//! or team, a port of one, anything netshim created (its veths, VLAN branches, its bridge),
//! anything carrying a default route in any table or an address of the host, the trunk of
//! VLANs, or an interface another task holds. Annotations are written by tenants: a MAC they
//! name must never reach the host's own plumbing.

use std::net::IpAddr;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::kernel::{At, Kernel, Link};
use crate::modes::bridge::bridge_mac;
use crate::names::{BRIDGE_VETH_PREFIX, SHARED_VETH_PREFIX, is_our_name};
use crate::names::{SHARED_TABLE_BASE, SHARED_VETH_MAC};
use crate::state::State;
use crate::state::claims::TRUNK;
use crate::types::Attachment;

/// What the interface is wanted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Moved into the task.
    Exclusive,
    /// Stays on the host; the task takes a secondary address.
    Shared,
    /// Stays on the host; the task gets a VLAN of it.
    Trunk,
}

/// `*` and `?` globs, for `awsvpc.allowed_interfaces`.
pub fn glob(pat: &str, s: &str) -> bool {
    match (pat.chars().next(), s.chars().next()) {
        (None, None) => true,
        (Some('*'), _) => {
            glob(&pat[1..], s)
                || (!s.is_empty() && glob(pat, &s[s.chars().next().map_or(0, char::len_utf8)..]))
        }
        (Some('?'), Some(c)) => glob(&pat[1..], &s[c.len_utf8()..]),
        (Some(a), Some(b)) if a == b => glob(&pat[a.len_utf8()..], &s[b.len_utf8()..]),
        _ => false,
    }
}

/// Refuses `link` unless it may be given to task `id` for `purpose`.
pub fn check(
    k: &mut dyn Kernel,
    cfg: &Config,
    state: &State,
    id: &str,
    link: &Link,
    purpose: Use,
) -> anyhow::Result<()> {
    let mac = link
        .mac
        .map(|m| m.to_string())
        .unwrap_or_else(|| "?".into());
    let name = &link.name;
    let what = match purpose {
        Use::Trunk => "trunk",
        _ => "ENI",
    };
    let refuse = |why: String| -> anyhow::Result<()> { bail!("{what} {mac} is {name}, {why}") };
    if link.loopback || name == "lo" {
        return refuse("the loopback interface: only an ENI can be given to a task".into());
    }
    if is_our_name(BRIDGE_VETH_PREFIX, name)
        || is_our_name(SHARED_VETH_PREFIX, name)
        || link.mac == Some(SHARED_VETH_MAC)
        || name == &cfg.bridge_name
        || link.mac == Some(bridge_mac(&cfg.bridge_name))
    {
        return refuse(
            "an interface netshim created for its own plumbing: it is never given to a task".into(),
        );
    }
    if let Some(kind) = &link.kind
        && !cfg.awsvpc.interface_kinds.iter().any(|k| k == kind)
    {
        return refuse(format!(
            "a {kind} interface, not an ENI: only physical NICs are given to tasks (awsvpc.interface_kinds lists other kinds to allow)"
        ));
    }
    if let Some(m) = link.master {
        return refuse(format!(
            "a port of another interface (index {m}: a bridge, bond or team member): it is never given to a task"
        ));
    }
    if !cfg.awsvpc.allowed_interfaces.is_empty()
        && !cfg.awsvpc.allowed_interfaces.iter().any(|p| glob(p, name))
    {
        return refuse("not in awsvpc.allowed_interfaces".into());
    }
    // netshim's own table for a shared ENI carries a default route through it: not the host's.
    let own_table = SHARED_TABLE_BASE + link.index;
    let defaults = k
        .default_route_links()
        .context("list the host's default routes")?;
    if defaults
        .iter()
        .any(|(i, table)| *i == link.index && *table != own_table)
    {
        return refuse(
            "which holds a default route of the host: the host's uplinks are never given to a task"
                .into(),
        );
    }
    let addrs = k.addresses(At::Host).context("list the host's addresses")?;
    if let Some(a) = addrs.iter().find(|a| {
        a.index == link.index && !matches!(a.ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
    }) {
        return refuse(format!(
            "which carries the host's address {}: an interface the host uses is never given to a task",
            a.ip
        ));
    }
    let links = k.links(At::Host).context("list links")?;
    // IFLA_LINK of a veth names its peer; only the stacked kinds name a lower device.
    if purpose != Use::Trunk
        && let Some(v) = links.iter().find(|l| {
            l.lower == Some(link.index)
                && matches!(
                    l.kind.as_deref(),
                    Some("vlan" | "macvlan" | "ipvlan" | "macvtap")
                )
        })
    {
        return refuse(format!(
            "the trunk of VLAN {}: a trunk stays on the host",
            v.name
        ));
    }
    in_use(state, id, link, purpose)
}

/// Refuses an interface another task holds in a way that excludes `purpose`.
pub fn in_use(state: &State, id: &str, link: &Link, purpose: Use) -> anyhow::Result<()> {
    let Some(this) = link.mac else {
        return Ok(());
    };
    let what = match purpose {
        Use::Trunk => "trunk",
        _ => "ENI",
    };
    for h in state.eni_holders(this, id) {
        let role = h.detail.as_str();
        let compatible = match purpose {
            Use::Shared => role == Attachment::Shared.as_str(),
            Use::Trunk => role == TRUNK,
            Use::Exclusive => false,
        };
        if !compatible {
            let how = if role == TRUNK {
                "as the trunk of its branch ENI".to_string()
            } else {
                format!("as its {role} ENI")
            };
            let svc = state
                .record(&h.id)
                .and_then(|r| r.service)
                .map(|s| format!(" (service {s})"))
                .unwrap_or_default();
            bail!(
                "{what} {this} is already given to task {}{svc} {how}: an interface serves one task unless both share it",
                crate::output::escape_controls(&h.id)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("eth*", "eth1"));
        assert!(glob("ens?", "ens5"));
        assert!(!glob("eth*", "ens5"));
        assert!(glob("*", ""));
        assert!(glob("e*1", "eth1"));
    }
}
