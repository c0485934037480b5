//! Gives this crate's tests, examples and benches an rpath to libtorch's
//! `lib/`, so that `cargo test -p mgpo-tch` runs without LD_LIBRARY_PATH,
//! and passes that directory on to the crates that depend on this one.
//!
//! The directory is the one torch-sys itself linked against: torch-sys
//! (`links = "tch"`) publishes it as `cargo:libtorch_lib`, which cargo hands
//! to the build scripts of its direct dependents as `DEP_TCH_LIBTORCH_LIB`
//! (this crate depends on torch-sys directly for that reason alone).
//!
//! `rustc-link-arg` reaches only this package's own link targets, so the
//! directory is re-published as `cargo:libtorch_lib` under this crate's
//! `links = "mgpo-tch"`: a dependent's build script reads it as
//! `DEP_MGPO_TCH_LIBTORCH_LIB` (mgpo-cli's build.rs gives the `mgpo` binary
//! an rpath with it), beside `DEP_MGPO_TCH_LIBTORCH_LIB_STAMP`, a file in
//! OUT_DIR rewritten on each run, for the dependent's rerun-if-changed.
//! Other binaries still need LD_LIBRARY_PATH from
//! `scripts/setup-libtorch.sh`.
//!
//! Without the variable (torch-sys built with `doc-only`, or a target other
//! than Linux and macOS, where torch-sys does not publish it) there is
//! nothing to do. Under docs.rs (`DOCS_RS` set) it does nothing.

use std::env;
use std::path::PathBuf;

fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // docs.rs (which sets DOCS_RS) has no libtorch: nothing to link, no rpath.
    if var("DOCS_RS").is_some() {
        return;
    }
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "macos" {
        return;
    }
    // Set by cargo from torch-sys's output, which changes with it.
    let Some(dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    if !dir.is_dir() {
        println!("cargo:warning=mgpo-tch: torch-sys's libtorch lib/ {} is not a directory; no rpath", dir.display());
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    println!("cargo:libtorch_lib={}", dir.display());
    // Cargo does not rerun a dependent's build script when this metadata
    // changes (a new libtorch) and DEP_* cannot be named in
    // rerun-if-env-changed; this file, rewritten on every run of this
    // script, is what a dependent names in rerun-if-changed instead.
    if let Some(out) = env::var_os("OUT_DIR") {
        let stamp = PathBuf::from(out).join("libtorch_lib.txt");
        if std::fs::write(&stamp, dir.display().to_string()).is_ok() {
            println!("cargo:libtorch_lib_stamp={}", stamp.display());
        }
    }
}
