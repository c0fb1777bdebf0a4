//! Fault injection for the crash tests: built with the `fault-injection` feature, the process
//! aborts (as a kill -9 would end it: no cleanup, no unwinding) at the numbered point named by
//! `NETSHIM_FAULT`. Release builds carry nothing of it.

/// Every point, in the order a setup or a teardown reaches them.
#[cfg(feature = "fault-injection")]
pub const POINTS: &[&str] = &[
    "setup-locked",
    "setup-intent",
    "bridge-created",
    "bridge-veth",
    "bridge-container",
    "bridge-nft",
    "awsvpc-pinned",
    "awsvpc-moved",
    "awsvpc-shared-veth",
    "branch-pinned",
    "branch-created",
    "setup-applied",
    "setup-committed",
    "teardown-released",
    "teardown-forgotten",
];

/// Aborts here if `NETSHIM_FAULT` names this point.
#[cfg(feature = "fault-injection")]
pub fn point(name: &'static str) {
    if std::env::var("NETSHIM_FAULT").as_deref() == Ok(name) {
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_: &'static str) {}

/// With `NETSHIM_FAULT=list`, prints the points and exits (how the crash test enumerates them).
#[cfg(feature = "fault-injection")]
pub fn list_if_asked() {
    if std::env::var("NETSHIM_FAULT").as_deref() == Ok("list") {
        for p in POINTS {
            println!("{p}");
        }
        std::process::exit(0);
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn list_if_asked() {}
