//! Adapters in peft's format, so `peft.PeftModel.from_pretrained` loads
//! what `mgpo finetune` trains and the other way round:
//!
//! - `adapter_config.json`: `peft_type` "LORA", `task_type` "SEQ_CLS", `r`,
//!   `lora_alpha`, `use_rslora`, `target_modules` ([`PEFT_TARGET_MODULES`]),
//!   `layers_to_transform` (the adapted layers) with `layers_pattern`
//!   "layer", `modules_to_save` ["classifier"], `lora_dropout`, `bias` "none",
//!   `base_model_name_or_path`, ...
//! - `adapter_model.safetensors` (f32): `base_model.model.<module>.lora_A.weight`
//!   (r x in) and `.lora_B.weight` (out x r) for every adapted module, and
//!   the head as peft saves a `modules_to_save` module,
//!   `base_model.model.classifier.weight` / `.bias`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use mgpo_core::LoraConfig;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;

use crate::error::{io, FinetuneError, Result};
use crate::model::{LoraBert, PEFT_TARGET_MODULES};

/// The prefix peft puts before module paths.
const PREFIX: &str = "base_model.model.";

/// What `adapter_config.json` says about the adapter's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank, alpha and rsLoRA (dropout is training-only).
    pub lora: LoraConfig,
    /// The lowest adapted layer (the adapted layers run from it to the top).
    pub first_adapted: usize,
    /// The model it was trained on.
    pub base_model: String,
}

/// The adapter's tensors under peft's keys, f32 row-major.
fn tensors(model: &LoraBert) -> Result<Vec<(String, Vec<usize>, Vec<u8>)>> {
    let mut out = Vec::new();
    let bytes = |t: &Tensor| -> Result<Vec<u8>> {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    for t in &model.targets {
        out.push((format!("{PREFIX}{}.lora_A.weight", t.name), t.a.dims().to_vec(), bytes(t.a.as_tensor())?));
        out.push((format!("{PREFIX}{}.lora_B.weight", t.name), t.b.dims().to_vec(), bytes(t.b.as_tensor())?));
    }
    let (w, b) = &model.classifier;
    out.push((format!("{PREFIX}classifier.weight"), w.dims().to_vec(), bytes(w.as_tensor())?));
    out.push((format!("{PREFIX}classifier.bias"), b.dims().to_vec(), bytes(b.as_tensor())?));
    Ok(out)
}

/// Writes `model`'s adapters and head to `dir` in peft's format;
/// `base_model` goes to `base_model_name_or_path`. Each file is written
/// beside and renamed into place, so a crash leaves the old one whole.
pub fn write_adapter(model: &LoraBert, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lora = model.lora();
    let layers: Vec<usize> = (model.first_adapted()..model.config().num_hidden_layers).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": PEFT_TARGET_MODULES,
        "layers_to_transform": layers,
        "layers_pattern": "layer",
        "modules_to_save": ["classifier"],
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "revision": null,
    });
    let blobs = tensors(model)?;
    let views = blobs
        .iter()
        .map(|(n, s, d)| TensorView::new(Dtype::F32, s.clone(), d).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| FinetuneError::Adapter { dir: dir.into(), detail: e.to_string() })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(views, Some(meta)).map_err(|e| FinetuneError::Adapter { dir: dir.into(), detail: e.to_string() })?;
    atomic_write(&dir.join("adapter_model.safetensors"), &st)?;
    atomic_write(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).expect("JSON value").as_bytes())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads `adapter_config.json` of a peft LoRA adapter for sequence
/// classification on BERT. Refused (typed): another `peft_type`, DoRA,
/// rank or alpha patterns, bias training, target modules other than
/// [`PEFT_TARGET_MODULES`], adapted layers that are not a top range.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let bad = |detail: String| FinetuneError::Adapter { dir: dir.into(), detail };
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("adapter_config.json: {e}")))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    if field("peft_type").and_then(|x| x.as_str()) != Some("LORA") {
        return Err(bad(format!("peft_type {:?}, not \"LORA\"", field("peft_type"))));
    }
    if field("use_dora").and_then(|x| x.as_bool()).unwrap_or(false) {
        return Err(bad("DoRA adapters are not supported".into()));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k).and_then(|x| x.as_object()).is_some_and(|o| !o.is_empty()) {
            return Err(bad(format!("`{k}` (per-module ranks or alphas) is not supported")));
        }
    }
    if field("bias").and_then(|x| x.as_str()).unwrap_or("none") != "none" {
        return Err(bad("bias must be \"none\"".into()));
    }
    let rank = field("r").and_then(|x| x.as_u64()).ok_or_else(|| bad("no integer `r`".into()))? as usize;
    let alpha = field("lora_alpha").and_then(|x| x.as_f64()).ok_or_else(|| bad("no number `lora_alpha`".into()))?;
    let rslora = field("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
    let mut targets: Vec<String> = match field("target_modules") {
        Some(serde_json::Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad("target_modules holds a non-string".into()))).collect::<Result<_>>()?,
        other => return Err(bad(format!("target_modules {other:?}: a list of module names is expected"))),
    };
    targets.sort();
    let mut want: Vec<String> = PEFT_TARGET_MODULES.iter().map(|s| s.to_string()).collect();
    want.sort();
    if targets != want {
        return Err(bad(format!("target_modules {targets:?}; this model adapts {want:?}")));
    }
    let first_adapted = match field("layers_to_transform") {
        None => 0,
        Some(serde_json::Value::Array(a)) => {
            let l: Vec<u64> = a.iter().map(|x| x.as_u64().ok_or_else(|| bad("layers_to_transform holds a non-integer".into()))).collect::<Result<_>>()?;
            let first = *l.iter().min().ok_or_else(|| bad("layers_to_transform is empty".into()))?;
            if l.iter().enumerate().any(|(i, &x)| x != first + i as u64) {
                return Err(bad(format!("layers_to_transform {l:?}: the adapted layers must be consecutive, ascending, up to the top")));
            }
            first as usize
        }
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(|| bad("layers_to_transform is not an index".into()))? as usize,
        Some(other) => return Err(bad(format!("layers_to_transform {other}"))),
    };
    let lora = LoraConfig { rslora, ..LoraConfig::new(rank, alpha) };
    lora.validate().map_err(|e| bad(e.to_string()))?;
    let base_model = field("base_model_name_or_path").and_then(|x| x.as_str()).unwrap_or("").to_string();
    Ok(AdapterConfig { lora, first_adapted, base_model })
}

/// Loads the adapters and head of `dir` into `model`, which must have been
/// built with the adapter's configuration ([`read_adapter_config`]).
/// Every tensor is checked (present, f32/f16/bf16/f64, shape) and no
/// unknown key is accepted before anything is written, so on error the
/// model is unchanged.
pub fn load_adapter(model: &LoraBert, dir: &Path) -> Result<()> {
    let bad = |detail: String| FinetuneError::Adapter { dir: dir.into(), detail };
    let cfg = read_adapter_config(dir)?;
    let lora = model.lora();
    if (cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora, cfg.first_adapted) != (lora.rank, lora.alpha, lora.rslora, model.first_adapted()) {
        return Err(bad(format!(
            "r {} alpha {} rslora {} from layer {}; the model's adapters: r {} alpha {} rslora {} from layer {}",
            cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora, cfg.first_adapted, lora.rank, lora.alpha, lora.rslora, model.first_adapted()
        )));
    }
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("adapter_model.safetensors: {e}")))?;
    let mut wanted: HashMap<String, (&candle_core::Var, &str)> = HashMap::new();
    for t in &model.targets {
        wanted.insert(format!("{PREFIX}{}.lora_A.weight", t.name), (&t.a, "lora_A"));
        wanted.insert(format!("{PREFIX}{}.lora_B.weight", t.name), (&t.b, "lora_B"));
    }
    wanted.insert(format!("{PREFIX}classifier.weight"), (&model.classifier.0, "classifier"));
    wanted.insert(format!("{PREFIX}classifier.bias"), (&model.classifier.1, "classifier"));
    if let Some(k) = st.names().into_iter().find(|k| !wanted.contains_key(*k)) {
        return Err(bad(format!("unexpected tensor `{k}` (not an adapter of this model)")));
    }
    let mut staged = Vec::with_capacity(wanted.len());
    for (key, (var, _)) in &wanted {
        let view = st.tensor(key).map_err(|_| bad(format!("no tensor `{key}`")))?;
        if view.shape() != var.dims() {
            return Err(bad(format!("`{key}` is {:?}, the model's {:?} (a different number of labels?)", view.shape(), var.dims())));
        }
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            Dtype::F64 => view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            Dtype::F16 => view.data().chunks_exact(2).map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]]), false)).collect(),
            Dtype::BF16 => view.data().chunks_exact(2).map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]]), true)).collect(),
            d => return Err(bad(format!("`{key}` is {d:?}; a float type is expected"))),
        };
        if data.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("`{key}` holds a non-finite value")));
        }
        staged.push((*var, Tensor::from_vec(data, view.shape(), model.device())?));
    }
    for (var, t) in staged {
        var.set(&t)?;
    }
    model.sync()
}

/// An f16 (or, with `bf16`, a bfloat16) bit pattern as f32.
fn half_to_f32(h: u16, bf16: bool) -> f32 {
    if bf16 {
        return f32::from_bits((h as u32) << 16);
    }
    let (sign, exp, man) = (((h >> 15) as u32) << 31, ((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise the mantissa.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::half_to_f32;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(half_to_f32(0x3c00, false), 1.0);
        assert_eq!(half_to_f32(0xc000, false), -2.0);
        assert_eq!(half_to_f32(0x0001, false), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x7c00, false), f32::INFINITY);
        assert_eq!(half_to_f32(0x3f80, true), 1.0);
    }
}
