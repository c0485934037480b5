//! Agreement with Python: the loaded model against transformers' AutoModel,
//! adapters written here loaded by peft (unmerged and merged), adapters
//! trained by peft loaded here. Needs the torch venv with peft and
//! transformers (`MGPO_TORCH_PYTHON`, set by scripts/setup-libtorch.sh;
//! scripts/test-finetune.sh installs the rest) and the model
//! (scripts/fetch-minilm.sh). Missing, the tests fail; they never skip.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use candle_core::{Device, Tensor};
use mgpo_core::LoraConfig;
use mgpo_finetune::data::Example;
use mgpo_finetune::peft::{load_adapter, read_adapter_config, write_adapter};
use mgpo_finetune::{LoraBert, ModelFiles};
use serde_json::{json, Value};

const TEXTS: [&str; 5] = [
    "a domestic animal kept for companionship",
    "the act of running quickly",
    "a tool with a heavy head used for driving nails, and also a rather long sentence that the truncation cuts",
    "Paris",
    "an edible fruit of a tree",
];
const MAX_LEN: usize = 16;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let d = std::env::var_os("MGPO_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("out/models/all-MiniLM-L6-v2"));
    assert!(d.join("model.safetensors").is_file(), "no model at {} (run scripts/fetch-minilm.sh, or set MGPO_MINILM_DIR)", d.display());
    d
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mgpo-ft-py-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One Python (torch and transformers, several threads each) at a time:
/// the tests of this file hold it while they run.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs tools/peft_check.py `cmd` on `req`; panics with its stderr on failure.
fn python(cmd: &str, req: Value, dir: &PathBuf) -> Value {
    let py = std::env::var("MGPO_TORCH_PYTHON").expect("MGPO_TORCH_PYTHON is not set: `source scripts/setup-libtorch.sh` (scripts/test-finetune.sh does)");
    let (req_path, out_path) = (dir.join(format!("{cmd}-req.json")), dir.join(format!("{cmd}-out.json")));
    std::fs::write(&req_path, req.to_string()).unwrap();
    let out = Command::new(&py).arg(root().join("tools/peft_check.py")).arg(cmd).arg(&req_path).arg(&out_path).output().expect("running the venv's python");
    assert!(out.status.success(), "peft_check.py {cmd} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| {
        assert_eq!(x.len(), y.len());
        x.iter().zip(y).map(|(p, q)| (p - q).abs())
    }).fold(0.0, f64::max)
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(candle_core::DType::F64).unwrap().to_vec2().unwrap()
}

#[test]
fn hidden_states_match_transformers() {
    let _one = one_at_a_time();
    let files = ModelFiles::open(&model_dir()).unwrap();
    let enc = files.tokenizer(MAX_LEN).unwrap();
    let dir = tmp("hidden");
    let py = python("hidden", json!({"model": files.dir, "texts": TEXTS, "max_len": MAX_LEN}), &dir);
    let e = enc.encode(&TEXTS, &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = e.ids.to_vec2().unwrap();
    let py_ids: Vec<Vec<u32>> = py["ids"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    assert_eq!(ids, py_ids, "token ids differ from AutoTokenizer's");
    let py_h = &py["hidden"];
    // Both splits of the model (all layers adapted, and only the top two)
    // give transformers' hidden states: the fresh adapters add B A = 0.
    for first in [0, 4] {
        let model = LoraBert::load(&files, LoraConfig::new(4, 8.0), first, 3, 0, &Device::Cpu).unwrap();
        let h = model.hidden(&model.encode_frozen(&e).unwrap(), &e.mask).unwrap();
        let mut worst = 0f64;
        for (i, t) in TEXTS.iter().enumerate() {
            let d = max_diff(&rows(&h.get(i).unwrap()), &matrix(&py_h[i]));
            worst = worst.max(d);
            assert!(d < 1e-4, "first adapted {first}, `{t}`: max |rust - transformers| = {d:e}");
        }
        println!("first adapted layer {first}: max |hidden - transformers| = {worst:e}");
    }
}

fn examples() -> Vec<Example> {
    TEXTS.iter().enumerate().map(|(i, t)| Example { text: t.to_string(), label: i % 3 }).collect()
}

#[test]
fn a_rust_adapter_loads_in_peft_with_the_same_outputs() {
    let _one = one_at_a_time();
    let files = ModelFiles::open(&model_dir()).unwrap();
    let enc = files.tokenizer(MAX_LEN).unwrap();
    let lora = LoraConfig::new(4, 8.0);
    let model = LoraBert::load(&files, lora, 4, 3, 1, &Device::Cpu).unwrap();
    // Adapters as training leaves them (B != 0): drawn from a seeded generator.
    let dir = tmp("rust2peft");
    let mut rng = mgpo_finetune::SplitMix64::new(3);
    for t in &model.targets {
        let b: Vec<f32> = (0..t.b.elem_count()).map(|_| (0.05 * rng.normal()) as f32).collect();
        t.b.set(&Tensor::from_vec(b, t.b.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    model.sync().unwrap();
    let adapter = dir.join("adapter");
    write_adapter(&model, &adapter, &files.dir.display().to_string()).unwrap();
    let rust = rows(&model.predict(&enc, &TEXTS, 8).unwrap());
    let py = python("logits", json!({"model": files.dir, "adapter": adapter, "texts": TEXTS, "max_len": MAX_LEN, "num_labels": 3}), &dir);
    let (unmerged, merged) = (matrix(&py["unmerged"]), matrix(&py["merged"]));
    let (d_un, d_m, d_um) = (max_diff(&rust, &unmerged), max_diff(&rust, &merged), max_diff(&unmerged, &merged));
    println!("rust -> peft: max |rust - peft| = {d_un:e}, |rust - peft merged| = {d_m:e}, |peft - peft merged| = {d_um:e}");
    assert!(d_un < 1e-4 && d_m < 1e-4 && d_um < 1e-4, "{d_un:e} {d_m:e} {d_um:e}");
    // And the logits moved away from the fresh model's (the test could fail).
    let fresh = LoraBert::load(&files, lora, 4, 3, 1, &Device::Cpu).unwrap();
    assert!(max_diff(&rust, &rows(&fresh.predict(&enc, &TEXTS, 8).unwrap())) > 1e-3);
}

#[test]
fn a_peft_adapter_loads_here_with_the_same_outputs() {
    let _one = one_at_a_time();
    let files = ModelFiles::open(&model_dir()).unwrap();
    let enc = files.tokenizer(MAX_LEN).unwrap();
    let dir = tmp("peft2rust");
    let adapter = dir.join("adapter");
    let labels: Vec<usize> = examples().iter().map(|e| e.label).collect();
    let req = json!({"model": files.dir, "adapter": adapter, "texts": TEXTS, "labels": labels, "max_len": MAX_LEN,
        "num_labels": 3, "r": 4, "alpha": 16, "rslora": true, "first_layer": 3, "steps": 3, "lr": 1e-2});
    let py = python("train", req, &dir);
    let cfg = read_adapter_config(&adapter).unwrap();
    assert_eq!((cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora, cfg.first_adapted), (4, 16.0, true, 3));
    let model = LoraBert::load(&files, cfg.lora, cfg.first_adapted, 3, 7, &Device::Cpu).unwrap();
    load_adapter(&model, &adapter).unwrap();
    let d = max_diff(&rows(&model.predict(&enc, &TEXTS, 8).unwrap()), &matrix(&py["logits"]));
    println!("peft -> rust: max |rust - peft| = {d:e}");
    assert!(d < 1e-4, "{d:e}");
    // A model of another shape refuses the adapter and stays as it was.
    let other = LoraBert::load(&files, LoraConfig::new(4, 16.0), 3, 3, 7, &Device::Cpu).unwrap();
    let before = rows(&other.predict(&enc, &TEXTS, 8).unwrap());
    assert!(load_adapter(&other, &adapter).is_err());
    assert_eq!(before, rows(&other.predict(&enc, &TEXTS, 8).unwrap()));
}
