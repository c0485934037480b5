//! With the `tch` feature, gives the `mgpo` binary an rpath to libtorch's
//! `lib/`, so that it starts without LD_LIBRARY_PATH (without it the loader
//! fails with "libtorch_cpu.so: cannot open shared object file").
//!
//! The directory comes from mgpo-tch's build script
//! (`DEP_MGPO_TCH_LIBTORCH_LIB`, see crates/mgpo-tch/build.rs): the one
//! torch-sys linked against. Without the `tch` feature, on targets other
//! than Linux and macOS, and under docs.rs (`DOCS_RS`) there is nothing to
//! do.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DOCS_RS");
    if env::var_os("CARGO_FEATURE_TCH").is_none() || env::var_os("DOCS_RS").is_some() {
        return;
    }
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "macos" {
        return;
    }
    // Cargo reruns this script when mgpo-tch's rpath changes only through
    // this file, which mgpo-tch's build script rewrites on each run.
    if let Ok(stamp) = env::var("DEP_MGPO_TCH_LIBTORCH_LIB_STAMP") {
        println!("cargo:rerun-if-changed={stamp}");
    }
    match env::var("DEP_MGPO_TCH_LIBTORCH_LIB") {
        Ok(dir) if !dir.is_empty() => println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}"),
        _ => println!("cargo:warning=mgpo-cli: mgpo-tch passed no libtorch lib/; `mgpo` will need LD_LIBRARY_PATH"),
    }
}
