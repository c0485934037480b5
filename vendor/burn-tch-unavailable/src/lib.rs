//! Placeholder for burn-tch (see this crate's Cargo.toml): only compiled
//! when something enables burn's `tch` feature, which this workspace
//! cannot offer next to its own tch backend.

compile_error!("burn's LibTorch backend (burn feature `tch`) is not available in the lora-mgpo workspace: its tch 0.22 conflicts with mgpo-tch's tch 0.26 (both link libtorch); use mgpo-tch, or another burn backend");
