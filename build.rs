// Nothing to link: netshim speaks nf_tables over netlink itself (no libnftables).
//
// Tests that need root (network namespaces, nftables, runtimes) carry
// `#[cfg_attr(not(root), ignore = "needs root: ...")]`: built by root, `cfg(root)` is set and
// they run; built by anyone else, `cargo test` lists them as ignored, by name, instead of
// letting them pass without running.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(root)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=USER");
    println!("cargo:rerun-if-env-changed=SUDO_USER");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { geteuid() } == 0 {
        println!("cargo:rustc-cfg=root");
    }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
