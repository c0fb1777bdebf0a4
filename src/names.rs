//! The names netshim gives kernel objects, and how it tells its own from anyone else's: the
//! prefixes of its veths, the hashed link names, the link aliases it sets, where it pins a
//! task's netns. Modes, reaping, the record check and `shim gc` all decide "is this ours" here.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::types::MacAddr;

/// Prefix of the host end of every bridge veth (`nsh` + 8 hex digits).
pub const BRIDGE_VETH_PREFIX: &str = "nsh";
/// Prefix of the host end of a shared-ENI task's veth (`nsa` + 8 hex digits).
pub const SHARED_VETH_PREFIX: &str = "nsa";
/// MAC of every shared-ENI host veth end (each is its own point-to-point link).
pub const SHARED_VETH_MAC: MacAddr = MacAddr([0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
/// Shared-ENI route tables are `SHARED_TABLE_BASE + <ENI ifindex>`.
pub const SHARED_TABLE_BASE: u32 = 10000;
/// Link alias of an ENI given to a task: this prefix and its name on the host.
pub const ALIAS_PREFIX: &str = "netshim:";

/// FNV-1a: short, stable names (veths) and MACs derived from ids and names.
pub fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `prefix` + 8 hex digits of the id's hash, salted until `taken` says no.
pub fn link_name(prefix: &str, id: &str, taken: &dyn Fn(&str) -> bool) -> String {
    (0u32..)
        .map(|salt| {
            let key = if salt == 0 {
                id.to_string()
            } else {
                format!("{id}#{salt}")
            };
            format!("{prefix}{:08x}", fnv(&key))
        })
        .find(|n| !taken(n))
        .unwrap_or_else(|| format!("{prefix}00000000"))
}

/// Whether `name` has the shape of a link netshim names with `prefix`.
pub fn is_our_name(prefix: &str, name: &str) -> bool {
    name.len() == prefix.len() + 8
        && name.starts_with(prefix)
        && name[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The alias netshim gives the shared-ENI veths of this instance (its bridge names it).
pub fn owner_alias(cfg: &Config) -> String {
    format!("{ALIAS_PREFIX}{}", cfg.bridge_name)
}

/// The alias an exclusive ENI carries while a task has it: its name on the host.
pub fn eni_alias(host_name: &str) -> String {
    format!("{ALIAS_PREFIX}{host_name}")
}

/// Where an exclusive or branch task's netns is pinned: under the state dir, named by the id
/// (container ids are checked to be safe file names).
pub fn pin_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("netns").join(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_salt_until_free() {
        let first = link_name(BRIDGE_VETH_PREFIX, "abc", &|_| false);
        assert_eq!(first, format!("nsh{:08x}", fnv("abc")));
        let taken = first.clone();
        let second = link_name(BRIDGE_VETH_PREFIX, "abc", &|n| n == taken);
        assert_eq!(second, format!("nsh{:08x}", fnv("abc#1")));
        let (t1, t2) = (first.clone(), second.clone());
        let third = link_name(BRIDGE_VETH_PREFIX, "abc", &|n| n == t1 || n == t2);
        assert_eq!(third, format!("nsh{:08x}", fnv("abc#2")));
    }

    #[test]
    fn our_names_have_the_prefix_and_eight_hex_digits() {
        assert!(is_our_name(SHARED_VETH_PREFIX, "nsa0123abcd"));
        assert!(!is_our_name(SHARED_VETH_PREFIX, "nsh0123abcd"));
        assert!(!is_our_name(BRIDGE_VETH_PREFIX, "nsh1234567"));
        assert!(!is_our_name(BRIDGE_VETH_PREFIX, "nsh123456789"));
        assert!(!is_our_name(BRIDGE_VETH_PREFIX, "nsh0123abcg"));
        assert!(!is_our_name(BRIDGE_VETH_PREFIX, "eth012345678"));
    }

    #[test]
    fn aliases_and_pins() {
        let cfg = Config::default();
        assert_eq!(owner_alias(&cfg), format!("netshim:{}", cfg.bridge_name));
        assert_eq!(eni_alias("eth1"), "netshim:eth1");
        assert_eq!(
            pin_path(Path::new("/run/netshim"), "a"),
            Path::new("/run/netshim/netns/a")
        );
    }
}
