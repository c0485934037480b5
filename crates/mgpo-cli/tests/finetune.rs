//! `mgpo finetune` end to end on the real all-MiniLM-L6-v2 and WordNet:
//! a tiny run writes peft-format adapters (every key and shape), a JSONL
//! log with a line per step and per validation, a summary and a
//! checkpoint; `--eval-only --adapter` reads the best adapter back and
//! reproduces the run's test figures; bad options fail with a message.
//! The model comes from `MGPO_MINILM_DIR` (or `out/models/all-MiniLM-L6-v2`,
//! where scripts/fetch-minilm.sh puts it) and WordNet from
//! scripts/setup-wordnet.sh; missing, the test fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// peft's `target_modules` of the adapted linears (mgpo_finetune::PEFT_TARGET_MODULES).
const TARGET_MODULES: [&str; 6] = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];
/// The module paths under `bert.encoder.layer.<i>.` and their (out, in) in MiniLM-L6 (hidden 384, intermediate 1536).
const MODULES: [(&str, usize, usize); 6] = [
    ("attention.self.query", 384, 384),
    ("attention.self.key", 384, 384),
    ("attention.self.value", 384, 384),
    ("attention.output.dense", 384, 384),
    ("intermediate.dense", 1536, 384),
    ("output.dense", 384, 1536),
];
const WORDNET: &str = "/usr/share/wordnet/data.noun";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let d = std::env::var_os("MGPO_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("out/models/all-MiniLM-L6-v2"));
    assert!(d.join("model.safetensors").is_file(), "no model at {} (run scripts/fetch-minilm.sh, or set MGPO_MINILM_DIR)", d.display());
    assert!(Path::new(WORDNET).is_file(), "no {WORDNET} (run scripts/setup-wordnet.sh)");
    d
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mgpo-cli-ft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn mgpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mgpo")).args(args).output().expect("running mgpo")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "mgpo failed: {}\nstdout: {}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The safetensors header (name -> {dtype, shape, data_offsets}) and the data bytes.
fn safetensors(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.remove("__metadata__");
    (header, bytes[8 + n..].to_vec())
}

/// Checks an adapter directory written by `mgpo finetune` (rank 8, alpha
/// 16, layers 4 and 5, 10 labels) as peft reads it; returns whether any
/// lora_B holds a nonzero entry (peft starts B at zero).
fn check_adapter(dir: &Path, model: &Path) -> bool {
    let c = json(&dir.join("adapter_config.json"));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "SEQ_CLS");
    assert_eq!((c["r"].as_u64(), c["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    assert_eq!((&c["use_rslora"], &c["bias"]), (&Value::Bool(false), &Value::from("none")));
    assert_eq!(c["target_modules"], Value::from(TARGET_MODULES.to_vec()));
    assert_eq!(c["layers_to_transform"], Value::from(vec![4, 5]));
    assert_eq!(c["layers_pattern"], "layer");
    assert_eq!(c["modules_to_save"], Value::from(vec!["classifier"]));
    assert_eq!(c["base_model_name_or_path"].as_str(), Some(model.display().to_string().as_str()));

    let (header, data) = safetensors(&dir.join("adapter_model.safetensors"));
    let mut want: Vec<(String, Vec<u64>)> = Vec::new();
    for layer in [4, 5] {
        for (m, out, inp) in MODULES {
            let p = format!("base_model.model.bert.encoder.layer.{layer}.{m}");
            want.push((format!("{p}.lora_A.weight"), vec![8, inp as u64]));
            want.push((format!("{p}.lora_B.weight"), vec![out as u64, 8]));
        }
    }
    want.push(("base_model.model.classifier.weight".into(), vec![10, 384]));
    want.push(("base_model.model.classifier.bias".into(), vec![10]));
    let mut got: Vec<&String> = header.keys().collect();
    got.sort();
    let mut names: Vec<&String> = want.iter().map(|(k, _)| k).collect();
    names.sort();
    assert_eq!(got, names, "the adapter's tensors");
    let mut b_nonzero = false;
    for (k, shape) in &want {
        let t = &header[k];
        assert_eq!(t["dtype"], "F32", "{k}");
        assert_eq!(t["shape"], Value::from(shape.clone()), "{k}");
        let off: Vec<usize> = t["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(off[1] - off[0], 4 * shape.iter().product::<u64>() as usize, "{k}: byte length");
        let vals: Vec<f32> = data[off[0]..off[1]].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(vals.iter().all(|v| v.is_finite()), "{k}: non-finite entries");
        if k.ends_with("lora_A.weight") {
            assert!(vals.iter().any(|v| *v != 0.0), "{k}: all zero (peft initialises A at random)");
        }
        if k.ends_with("lora_B.weight") {
            b_nonzero |= vals.iter().any(|v| *v != 0.0);
        }
    }
    b_nonzero
}

#[test]
fn tiny_run_writes_peft_adapters_and_a_log_that_eval_only_reads_back() {
    let model = model_dir();
    let m = model.to_str().unwrap();
    let out = tmp("run");
    let o = out.to_str().unwrap();
    let common = ["finetune", "--model-dir", m, "--per-class", "4,2,2", "--max-len", "16", "--seed", "3"];
    let run: Vec<&str> = common.iter().copied().chain(["--steps", "4", "--batch", "4", "--eval-every", "2", "--checkpoint-every", "2", "--out", o, "--quiet"]).collect();
    let stdout = ok(&mgpo(&run));
    assert!(stdout.contains("steps 4: best val acc") && stdout.contains("examples/s"), "{stdout}");

    // The log: one train line per step in order, a validation after steps 2 and 4.
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line `{l}`: {e}"))).collect();
    assert!(!lines.is_empty(), "empty log.jsonl");
    let steps = |kind: &str| -> Vec<u64> { lines.iter().filter(|l| l["kind"] == kind).map(|l| l["step"].as_u64().unwrap()).collect() };
    assert_eq!(steps("train"), [1, 2, 3, 4]);
    assert_eq!(steps("val"), [2, 4]);
    for l in &lines {
        let (loss, acc) = (l["loss"].as_f64().unwrap(), l["acc"].as_f64().unwrap());
        assert!(loss.is_finite() && loss > 0.0 && (0.0..=1.0).contains(&acc), "{l}");
    }
    // Step 1 runs at learning rate 0 (the warm-up), the later ones do not.
    let lrs: Vec<f64> = lines.iter().filter(|l| l["kind"] == "train").map(|l| l["lr"].as_f64().unwrap()).collect();
    assert!(lrs[0] == 0.0 && lrs[1..].iter().all(|&lr| lr > 0.0), "{lrs:?}");

    // The adapters in peft's format: the best by validation, the last, the checkpoint's.
    check_adapter(&out.join("best"), &model);
    assert!(check_adapter(&out.join("adapter"), &model), "every lora_B is still zero after three steps at lr > 0");
    check_adapter(&out.join("checkpoint"), &model);
    assert!(out.join("checkpoint/optimizer.safetensors").is_file());
    assert_eq!(json(&out.join("checkpoint/trainer.json"))["step"], 4);

    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 4);
    let best_step = s["best_step"].as_u64().unwrap();
    assert!(best_step == 2 || best_step == 4, "{s}");
    let val_at_best = lines.iter().find(|l| l["kind"] == "val" && l["step"] == best_step).unwrap()["acc"].as_f64().unwrap();
    assert_eq!(s["best_val_acc"].as_f64().unwrap(), val_at_best);
    let (test_acc, test_loss) = (s["test_acc"].as_f64().unwrap(), s["test_loss"].as_f64().unwrap());

    // The best adapter read back: the same test figures (printed to 4 decimals).
    let best = out.join("best");
    let eval: Vec<&str> = common.iter().copied().chain(["--adapter", best.to_str().unwrap(), "--eval-only", "--quiet"]).collect();
    let stdout = ok(&mgpo(&eval));
    let line = stdout.lines().find(|l| l.starts_with("test: ")).unwrap_or_else(|| panic!("no `test:` line in {stdout}"));
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert!((nums[0] - test_loss).abs() < 1e-4 && (nums[1] - test_acc).abs() < 1e-4, "eval-only `{line}` vs the run's test loss {test_loss}, acc {test_acc}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_options_fail_with_a_message() {
    let model = model_dir();
    let m = model.to_str().unwrap();
    let out = tmp("bad");
    let o = out.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["finetune", "--model-dir", m, "--method", "sgd", "--out", o], "unknown method `sgd`"),
        (&["finetune", "--model-dir", o, "--out", o], "fetch-minilm.sh"),
        (&["finetune", "--model-dir", m, "--per-class", "4,2", "--out", o], "--per-class takes three numbers"),
    ];
    for (args, want) in cases {
        let r = mgpo(args);
        let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert!(!r.status.success(), "{args:?} succeeded: {text}");
        assert!(text.contains(want), "{args:?}: no `{want}` in {text}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
