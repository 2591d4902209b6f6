//! Marks the moto tests ignored (shown as such, with the reason, and counted in the summary)
//! when no moto server is configured, outside CI. Under `CI=true` they run, and fail without
//! one.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_moto)");
    println!("cargo::rerun-if-env-changed=KEYWARDEN_TEST_AWS_ENDPOINT");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-changed=build.rs");
    let endpoint = std::env::var("KEYWARDEN_TEST_AWS_ENDPOINT").is_ok_and(|v| !v.is_empty());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !endpoint && !ci {
        println!("cargo::rustc-cfg=no_moto");
    }
}
