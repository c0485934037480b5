//! Training through the adapted layers: the differentiable forward equals
//! `BertEncoder`'s, MGPO steps lower the loss, a resumed run is exact.

use std::path::PathBuf;

use candle_core::Device;
use mgpo_core::{Config, LoraConfig};
use mgpo_finetune::data::Example;
use mgpo_finetune::train::{Features, Silent, TrainOptions, Trainer};
use mgpo_finetune::{LoraBert, ModelFiles};

fn model_dir() -> PathBuf {
    let d = std::env::var_os("MGPO_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../out/models/all-MiniLM-L6-v2"));
    assert!(d.join("model.safetensors").is_file(), "no model at {} (run scripts/fetch-minilm.sh)", d.display());
    d
}

fn examples() -> Vec<Example> {
    ["a small domestic cat", "a large wild dog", "a hammer for nails", "a saw for wood", "the city of Paris", "a river valley"]
        .iter().enumerate().map(|(i, t)| Example { text: t.to_string(), label: i / 2 }).collect()
}

#[test]
fn trains_and_resumes_exactly() {
    let files = ModelFiles::open(&model_dir()).unwrap();
    let enc = files.tokenizer(12).unwrap();
    let load = || LoraBert::load(&files, LoraConfig::new(4, 8.0), 4, 3, 0, &Device::Cpu).unwrap();
    let model = load();
    let f = Features::new(&model, &enc, &examples()).unwrap();
    let a = model.hidden(&f.frozen, &f.mask).unwrap();
    let b = model.hidden_trainable(&f.frozen, &f.mask).unwrap();
    let d: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(d < 1e-4, "differentiable forward vs BertEncoder: {d:e}");
    let (l0, _) = f.evaluate(&model).unwrap();
    let base = std::env::temp_dir().join(format!("mgpo-ft-train-{}", std::process::id()));
    let opts = TrainOptions { steps: 6, batch: 4, config: Config::paper_nlu(5e-3), eval_every: 3, checkpoint_every: 3, seed: 1 };
    let mut t = Trainer::new(&model, opts.clone(), &base.join("a"), "m", false).unwrap();
    t.run_until(6, &f, &f, &mut Silent).unwrap();
    let (l1, _) = f.evaluate(&model).unwrap();
    assert!(l1 < l0, "loss {l0} -> {l1}");
    let straight: Vec<Vec<f32>> = model.targets[0].b.as_tensor().to_vec2().unwrap();
    // Stop after 3 steps, resume in a fresh model from the checkpoint.
    let m2 = load();
    let mut t2 = Trainer::new(&m2, opts.clone(), &base.join("b"), "m", false).unwrap();
    t2.run_until(3, &f, &f, &mut Silent).unwrap();
    drop(t2);
    let m3 = load();
    let mut t3 = Trainer::new(&m3, opts, &base.join("b"), "m", true).unwrap();
    assert_eq!(t3.step(), 3);
    t3.run_until(6, &f, &f, &mut Silent).unwrap();
    assert_eq!(straight, m3.targets[0].b.as_tensor().to_vec2::<f32>().unwrap(), "resumed run differs");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn spread_takes_every_class_of_a_class_ordered_split() {
    let files = ModelFiles::open(&model_dir()).unwrap();
    let model = LoraBert::load(&files, LoraConfig::new(2, 2.0), 5, 3, 0, &Device::Cpu).unwrap();
    let f = Features::new(&model, &files.tokenizer(8).unwrap(), &examples()).unwrap();
    let labels = |f: &Features| f.labels.to_vec1::<u32>().unwrap();
    assert_eq!(labels(&f), [0, 0, 1, 1, 2, 2]);
    assert_eq!(labels(&f.spread(3).unwrap()), [0, 1, 2]);
    assert_eq!(labels(&f.spread(4).unwrap()), [0, 0, 1, 2]);
    assert_eq!(labels(&f.spread(99).unwrap()), labels(&f));
    let rows = |f: &Features| f.frozen.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(rows(&f.spread(6).unwrap()), rows(&f));
}
