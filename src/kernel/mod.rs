//! The only code that talks to the kernel: netlink, nftables, netns, sysctl, conntrack.

pub mod conntrack;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod sysctl;
