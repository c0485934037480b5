//! Gives this crate's tests, examples and benches an rpath to libtorch's
//! `lib/`, so that `cargo test -p mgpo-tch` runs without LD_LIBRARY_PATH.
//!
//! The directory is found as torch-sys finds it: with `LIBTORCH_USE_PYTORCH`,
//! from the `torch` package of the Python that torch-sys runs
//! (`MGPO_TORCH_PYTHON` first, which the setup script points at that same
//! venv python, else `python` inside a virtual environment, else `python3`);
//! otherwise `$LIBTORCH_LIB/lib`, else `$LIBTORCH/lib`. Not finding it is
//! not an error here: torch-sys itself fails the build loudly then.
//! (`rustc-link-arg` reaches only this package's own link targets; other
//! binaries rely on LD_LIBRARY_PATH from `scripts/setup-libtorch.sh`.)
//! Under docs.rs (`DOCS_RS` set) it does nothing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn torch_lib_dir() -> Option<PathBuf> {
    if var("LIBTORCH_USE_PYTORCH").is_none() {
        // torch-sys's own order: LIBTORCH_LIB, else LIBTORCH, each with lib/.
        return var("LIBTORCH_LIB").or_else(|| var("LIBTORCH")).map(|d| PathBuf::from(d).join("lib"));
    }
    let python = var("MGPO_TORCH_PYTHON").unwrap_or_else(|| {
        if var("VIRTUAL_ENV").is_some() { "python" } else { "python3" }.to_string()
    });
    let out = Command::new(python)
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
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
    match torch_lib_dir() {
        Some(dir) if dir.is_dir() => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
        _ => println!("cargo:warning=mgpo-tch: libtorch's lib/ not found; run `source scripts/setup-libtorch.sh`"),
    }
}
