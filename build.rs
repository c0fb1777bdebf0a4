// netshim talks to nf_tables through libnftables (in-process, one transaction per call).
fn main() {
    println!("cargo:rustc-link-lib=nftables");
}
