//! The only code that talks to the kernel: netlink, nftables, netns, sysctl, conntrack,
//! socket diagnostics.

pub mod conntrack;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod probe;
pub mod sockdiag;
pub mod sysctl;
