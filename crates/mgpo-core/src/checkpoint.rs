//! Optimizer checkpoints: the whole state (m and v of every trainable
//! tensor by name, the step and skip counts, g_bar per group) with the
//! configuration and layout it belongs to, as one safetensors file.
//!
//! - Written atomically: a temporary file beside the target, fsync, rename,
//!   fsync of the directory. A crash at any point leaves the previous
//!   checkpoint as it was.
//! - Portable: tensors are F32 or F64 (the writer's precision), g_bar is
//!   stored as exact f64 bits, so a checkpoint from one backend loads on any
//!   other, and on the same backend a resumed run is bit-identical.
//! - Verified before use: format, version, checksum, configuration (all
//!   fields but the learning rate, which schedules change), layout and
//!   parameter groups (each group's lr_scale and weight decay, each
//!   tensor's group), every
//!   tensor's presence, dtype and shape. Any problem is a typed
//!   [`CheckpointError`] and the optimizer is left exactly as it was.
//! - One format for one process and for a sharded run: a sharded run's
//!   driver gathers the whole state and writes it with
//!   [`Mgpo::checkpoint_bytes_of`]; loading gives each rank its own share.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::layout::Layout;
use crate::error::{CheckpointError, MgpoError, Result};
use crate::mgpo::{Mgpo, Moments, State};
use crate::backend::{HostIo, TensorOps};
use crate::shard::PartialSums;

/// The `format` metadata value of an optimizer checkpoint.
pub const FORMAT: &str = "lora-mgpo-optimizer";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Metadata beside the tensors.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    step: u64,
    skipped: u64,
    /// Group names, in the optimizer's order.
    groups: Vec<String>,
    /// g_bar per group as f64 bits in hex (exact, and infinities survive).
    g_bar: Vec<Option<String>>,
    /// (name, shape) of every trainable tensor, in layout order.
    tensors: Vec<(String, Vec<usize>)>,
    /// The parameter groups and each tensor's group. Absent from
    /// checkpoints written before groups were recorded, which had only the
    /// default group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param_groups: Option<StoredGroups>,
}

/// A layout's parameter groups as stored: (name, lr_scale, weight_decay)
/// per group, and the group index of every trainable tensor in layout order.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StoredGroups {
    groups: Vec<(String, f64, Option<f64>)>,
    of_tensor: Vec<usize>,
}

impl StoredGroups {
    fn of(layout: &Layout) -> Self {
        StoredGroups {
            groups: layout.param_groups().iter().map(|g| (g.name.clone(), g.lr_scale, g.weight_decay)).collect(),
            of_tensor: layout.tensors().iter().map(|t| t.param_group).collect(),
        }
    }

    /// What differs between the stored groups and `here`'s, in words.
    fn mismatch(stored: Option<&StoredGroups>, layout: &Layout) -> Option<String> {
        let here = StoredGroups::of(layout);
        let stored = match stored {
            Some(s) => s,
            None if here.groups.len() == 1 && here.groups[0].1 == 1.0 && here.groups[0].2.is_none() => return None,
            None => return Some(format!("the checkpoint records only the default parameter group; this optimizer has {:?}", here.groups)),
        };
        if stored.groups != here.groups {
            return Some(format!("parameter groups (name, lr_scale, weight_decay) {:?} in the checkpoint, {:?} here", stored.groups, here.groups));
        }
        let names = |g: &StoredGroups, i: usize| g.groups.get(g.of_tensor.get(i).copied().unwrap_or(usize::MAX)).map_or("?", |x| x.0.as_str()).to_string();
        (0..layout.tensors().len())
            .find(|&i| stored.of_tensor.get(i) != here.of_tensor.get(i))
            .map(|i| format!("tensor `{}` is in parameter group `{}` in the checkpoint, `{}` here", layout.tensors()[i].name, names(stored, i), names(&here, i)))
    }
}

fn bad(field: &'static str, reason: impl ToString) -> MgpoError {
    CheckpointError::Metadata { field, reason: reason.to_string() }.into()
}

/// A 64-bit checksum of the metadata and tensor bytes (FNV-style mixing of
/// 8-byte words) over the `config` and `state` metadata strings and then
/// every tensor's bytes in name order: not cryptographic, but any flipped
/// bit changes it.
pub fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        let mut words = p.chunks_exact(8);
        for w in &mut words {
            h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        h = (h ^ u64::from_le_bytes(last) ^ p.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h
}

fn tensor_name(kind: &str, name: &str) -> String {
    format!("{kind}.{name}")
}

impl<B: TensorOps + HostIo, S: PartialSums> Mgpo<B, S> {
    /// The checkpoint as bytes. Refused while the parameters are perturbed,
    /// and on a sharded optimizer, which holds only its own moments.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>> {
        let shard = self.shard();
        if shard.size() > 1 {
            return Err(MgpoError::InvalidConfig {
                field: "checkpoint",
                value: format!("rank {} of {}", shard.rank(), shard.size()),
                reason: "a sharded optimizer holds only its own moments: its driver gathers the whole state and writes it with checkpoint_bytes_of",
            });
        }
        self.checkpoint_bytes_of(self.state())
    }

    /// The checkpoint of `state`, a whole state (moments of every trainable
    /// tensor, or none) of this optimizer's configuration and layout: what a
    /// sharded run's driver writes after gathering the ranks' moments.
    pub fn checkpoint_bytes_of(&self, state: &State<B::Tensor>) -> Result<Vec<u8>> {
        if self.is_perturbed() {
            return Err(MgpoError::AlreadyPerturbed);
        }
        let n = self.layout().tensors().len();
        if !state.moments.is_empty() && state.moments.len() != n {
            return Err(MgpoError::WrongCount { what: "moment pairs", expected: n, got: state.moments.len() });
        }
        let be = self.backend();
        let f64_exact = be.f64_exact();
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (info, mv) in self.layout().tensors().iter().zip(&state.moments) {
            for (kind, t) in [("m", &mv.m), ("v", &mv.v)] {
                let values = be.to_f64(t)?;
                let bytes: Vec<u8> = if f64_exact {
                    values.iter().flat_map(|x| x.to_le_bytes()).collect()
                } else {
                    values.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
                };
                blobs.push((tensor_name(kind, &info.name), info.shape.clone(), bytes));
            }
        }
        let header = Header {
            step: state.step,
            skipped: state.skipped,
            groups: self.groups().iter().map(|g| g.name.clone()).collect(),
            g_bar: state.g_bar.iter().map(|g| g.map(|x| format!("{:016x}", x.to_bits()))).collect(),
            tensors: self.layout().tensors().iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
            param_groups: Some(StoredGroups::of(self.layout())),
        };
        let config = serde_json::to_string(self.config()).map_err(|e| bad("config", e))?;
        let header = serde_json::to_string(&header).map_err(|e| bad("state", e))?;
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut parts: Vec<&[u8]> = vec![config.as_bytes(), header.as_bytes()];
        parts.extend(blobs.iter().map(|b| b.2.as_slice()));
        let sum = checksum(&parts);
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("config".to_string(), config),
            ("state".to_string(), header),
            ("checksum".to_string(), format!("{sum:016x}")),
        ]);
        let dtype = if f64_exact { Dtype::F64 } else { Dtype::F32 };
        let views = blobs
            .iter()
            .map(|(n, s, d)| TensorView::new(dtype, s.clone(), d).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::Malformed(e.to_string()).into())
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomically(path.as_ref(), &self.checkpoint_bytes()?)
    }

    /// Loads a checkpoint written by [`Mgpo::save_checkpoint`] on any backend.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| CheckpointError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        self.load_checkpoint_bytes(&bytes)
    }

    /// Loads a checkpoint from bytes; on any error nothing changes.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if self.is_perturbed() {
            return Err(MgpoError::AlreadyPerturbed);
        }
        let malformed = |e: safetensors::SafeTensorError| MgpoError::from(CheckpointError::Malformed(e.to_string()));
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(malformed)?;
        let st = SafeTensors::deserialize(bytes).map_err(malformed)?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let field = |k: &'static str| meta.get(k).ok_or_else(|| bad(k, "missing"));

        let format = meta.get("format").cloned().unwrap_or_default();
        if format != FORMAT {
            return Err(CheckpointError::Format(format).into());
        }
        let version = field("version")?;
        if version.parse::<u32>().ok() != Some(VERSION) {
            return Err(CheckpointError::Version { found: version.clone(), expected: VERSION }.into());
        }

        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        let (config_text, header_text) = (field("config")?, field("state")?);
        let mut parts: Vec<&[u8]> = vec![config_text.as_bytes(), header_text.as_bytes()];
        for n in &names {
            parts.push(st.tensor(n).map_err(malformed)?.data());
        }
        let stored = u64::from_str_radix(field("checksum")?, 16).map_err(|e| bad("checksum", e))?;
        let computed = checksum(&parts);
        if stored != computed {
            return Err(CheckpointError::Checksum { stored, computed }.into());
        }

        let config: Config = serde_json::from_str(config_text).map_err(|e| bad("config", e))?;
        check_config(&config, self.config())?;
        let header: Header = serde_json::from_str(header_text).map_err(|e| bad("state", e))?;
        let mine: Vec<(String, Vec<usize>)> = self.layout().tensors().iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        if header.tensors != mine {
            let stored: Vec<&str> = header.tensors.iter().map(|t| t.0.as_str()).collect();
            let here: Vec<&str> = mine.iter().map(|t| t.0.as_str()).collect();
            return Err(CheckpointError::LayoutMismatch(format!("checkpoint has {stored:?} with shapes {:?}, optimizer has {here:?} with shapes {:?}",
                header.tensors.iter().map(|t| &t.1).collect::<Vec<_>>(), mine.iter().map(|t| &t.1).collect::<Vec<_>>())).into());
        }
        if let Some(reason) = StoredGroups::mismatch(header.param_groups.as_ref(), self.layout()) {
            return Err(CheckpointError::LayoutMismatch(reason).into());
        }
        let groups: Vec<String> = self.groups().iter().map(|g| g.name.clone()).collect();
        if header.groups != groups || header.g_bar.len() != groups.len() {
            return Err(CheckpointError::LayoutMismatch(format!("groups {:?} in the checkpoint, {groups:?} here", header.groups)).into());
        }
        let g_bar = header
            .g_bar
            .iter()
            .map(|g| g.as_ref().map(|h| u64::from_str_radix(h, 16).map(f64::from_bits).map_err(|e| bad("state", format!("g_bar {h:?}: {e}")))).transpose())
            .collect::<Result<Vec<_>>>()?;

        let expected: Vec<String> = if header.step == 0 {
            Vec::new()
        } else {
            mine.iter().flat_map(|(n, _)| [tensor_name("m", n), tensor_name("v", n)]).collect()
        };
        if let Some(extra) = names.iter().find(|n| !expected.iter().any(|e| e == *n)) {
            return Err(CheckpointError::ExtraTensor(extra.to_string()).into());
        }
        let be = self.backend();
        let mut moments = Vec::with_capacity(mine.len());
        if header.step > 0 {
            for (name, shape) in &mine {
                let load = |kind: &str| -> Result<B::Tensor> {
                    let n = tensor_name(kind, name);
                    let view = st.tensor(&n).map_err(|_| CheckpointError::MissingTensor(n.clone()))?;
                    if view.shape() != shape.as_slice() {
                        return Err(CheckpointError::Shape { name: n, expected: shape.clone(), got: view.shape().to_vec() }.into());
                    }
                    let values: Vec<f64> = match view.dtype() {
                        Dtype::F64 => view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
                        Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64).collect(),
                        other => return Err(CheckpointError::Dtype { name: n, dtype: format!("{other:?}") }.into()),
                    };
                    be.from_f64(shape, &values)
                };
                moments.push(Moments { m: load("m")?, v: load("v")? });
            }
        }
        self.set_state(State { step: header.step, skipped: header.skipped, moments, g_bar })
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync,
/// rename, fsync of the directory. A crash leaves the previous file as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |reason: std::io::Error| CheckpointError::Io { path: path.display().to_string(), reason: reason.to_string() };
    let file_name = path.file_name().ok_or_else(|| io(std::io::Error::other("not a file path")))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(e).into()
    })
}

/// Every field but the learning rate must match.
fn check_config(stored: &Config, current: &Config) -> Result<()> {
    let mut s = *stored;
    s.adamw.lr = current.adamw.lr;
    if s == *current {
        return Ok(());
    }
    let (a, b) = (stored, current);
    let d = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let fields: [(&'static str, String, String); 13] = [
        ("rho", d(&a.rho), d(&b.rho)),
        ("beta", d(&a.beta), d(&b.beta)),
        ("eps", d(&a.eps), d(&b.eps)),
        ("direction", d(&a.direction), d(&b.direction)),
        ("space", d(&a.space), d(&b.space)),
        ("scope", d(&a.scope), d(&b.scope)),
        ("adaptive_norm", d(&a.adaptive_norm), d(&b.adaptive_norm)),
        ("max_inv_scale", d(&a.max_inv_scale), d(&b.max_inv_scale)),
        ("max_grad_norm", d(&a.max_grad_norm), d(&b.max_grad_norm)),
        ("adamw.beta1", d(&a.adamw.beta1), d(&b.adamw.beta1)),
        ("adamw.beta2", d(&a.adamw.beta2), d(&b.adamw.beta2)),
        ("adamw.eps", d(&a.adamw.eps), d(&b.adamw.eps)),
        ("adamw.weight_decay", d(&a.adamw.weight_decay), d(&b.adamw.weight_decay)),
    ];
    let (field, stored, current) = fields.into_iter().find(|f| f.1 != f.2).unwrap_or(("config", d(a), d(b)));
    Err(CheckpointError::ConfigMismatch { field, stored, current }.into())
}
