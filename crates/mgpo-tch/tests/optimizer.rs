//! The optimizer over a `VarStore`: adapters chosen by name, plain and
//! frozen variables, gradients read from `.grad()`, `zero_grad`, skipped
//! non-finite steps, typed errors that leave the parameters clean, and a
//! loss that goes down.

use mgpo_core::{is_bias_or_norm, AdamWConfig, CheckpointError, Config, LoraConfig, MgpoError, ParamGroup, Scope, Space, StepReport};
use mgpo_tch::{LoraLinear, MgpoOptimizer, VarStoreAdapters};
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

fn det(shape: &[i64], seed: f64, scale: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| scale * ((i as f64 + 1.0) * seed).sin()).collect();
    Tensor::from_slice(&v).reshape(shape)
}

fn store() -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    vs
}

fn host(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// A LoRA layer, a hand-made adapter `enc` (variables named as a LoRA
/// layer's, with its frozen base weight), a LayerNorm-like scale, a head
/// with a bias and a frozen embedding.
struct Net {
    lora: LoraLinear,
    enc_w0: Tensor,
    enc_a: Tensor,
    enc_b: Tensor,
    norm: Tensor,
    head_w: Tensor,
    head_b: Tensor,
    emb: Tensor,
}

impl Net {
    fn new(vs: &nn::VarStore) -> Net {
        let root = vs.root();
        let w0 = det(&[6, 4], 0.3, 0.5);
        let lora = LoraLinear::from_pretrained(&w0, None, &LoraConfig::new(2, 4.0), &(&root / "dec")).unwrap();
        let ad = lora.adapter().unwrap();
        tch::no_grad(|| {
            ad.a().shallow_clone().copy_(&det(&[2, 4], 0.35, 0.4));
            ad.b().shallow_clone().copy_(&det(&[6, 2], 0.8, 0.2));
        });
        let enc = &root / "enc";
        let enc_w0 = (&enc / "base").add("weight", det(&[4, 3], 0.5, 0.5), false);
        let enc_a = enc.var_copy("lora_a", &det(&[3, 3], 0.6, 0.3));
        let enc_b = enc.var_copy("lora_b", &det(&[4, 3], 0.9, 0.2));
        let norm = (&root / "norm").var_copy("weight", &(det(&[4], 0.7, 0.3) + 1.0));
        let head_w = (&root / "head").var_copy("weight", &det(&[2, 6], 0.4, 0.3));
        let head_b = (&root / "head").var_copy("bias", &det(&[2], 0.45, 0.1));
        let emb = root.add("emb", det(&[3, 3], 0.2, 1.0), false);
        Net { lora, enc_w0, enc_a, enc_b, norm, head_w, head_b, emb }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.matmul(&self.emb);
        let h = h.matmul(&self.enc_w0.tr()) + h.matmul(&self.enc_a.tr()).matmul(&self.enc_b.tr()) * 5.0;
        self.lora.forward(&(h.tanh() * &self.norm)).tanh().matmul(&self.head_w.tr()) + &self.head_b
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        self.forward(x).mse_loss(y, Reduction::Mean)
    }
}

fn data() -> (Tensor, Tensor) {
    (det(&[12, 3], 0.17, 1.0), det(&[12, 2], 0.23, 0.8))
}

fn spec(alpha: f64) -> VarStoreAdapters {
    VarStoreAdapters { alpha: Some(alpha), ..VarStoreAdapters::default() }
}

#[test]
fn adapters_are_chosen_by_name() {
    let vs = store();
    let net = Net::new(&vs);
    // Without the layer: both pairs are found by name and scaled alpha / r.
    let opt = MgpoOptimizer::builder(Config::default()).var_store(&vs, &spec(15.0)).build().unwrap();
    let l = opt.layout();
    let names: Vec<_> = l.adapters().iter().map(|a| (a.name.as_str(), a.scale)).collect();
    assert_eq!(names, [("dec", 7.5), ("enc", 5.0)]);
    let plain: Vec<_> = l.plain().iter().map(|&i| l.tensors()[i].name.as_str()).collect();
    assert_eq!(plain, ["head.bias", "head.weight", "norm.weight"], "frozen variables (W0s, emb) are not trained");
    assert_eq!(l.tensors().len(), 7);

    // With the layer first, its own scale (alpha / r = 2) wins; rsLoRA for the rest.
    let rs = VarStoreAdapters { rslora: true, ..spec(15.0) };
    let opt = MgpoOptimizer::builder(Config::default()).lora(&net.lora).var_store(&vs, &rs).build().unwrap();
    let names: Vec<_> = opt.layout().adapters().iter().map(|a| (a.name.as_str(), a.scale)).collect();
    assert_eq!(names, [("dec", 2.0), ("enc", 15.0 / 3f64.sqrt())]);

    // Without plain tensors.
    let no_plain = VarStoreAdapters { plain: false, ..spec(15.0) };
    let opt = MgpoOptimizer::builder(Config::default()).var_store(&vs, &no_plain).build().unwrap();
    assert!(opt.layout().plain().is_empty());
}

#[test]
fn var_store_mistakes_are_typed_errors() {
    let vs = store();
    let net = Net::new(&vs);
    // `enc` has no scaling unless alpha is given.
    let e = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::default(), None).unwrap_err();
    assert!(matches!(&e, MgpoError::AdapterShape { name, .. } if name == "enc"), "{e}");
    // A pair with a missing B.
    let vs2 = store();
    let _a = (vs2.root() / "x").var_copy("lora_a", &det(&[2, 3], 0.1, 1.0));
    let e = MgpoOptimizer::builder(Config::default()).var_store(&vs2, &spec(1.0)).build().unwrap_err();
    assert_eq!(e, MgpoError::UnknownName("x.lora_b".into()));
    // Weight space: `enc` needs its LoraLinear or its base weight.
    let e = MgpoOptimizer::builder(Config::trainer_nlu(1e-3)).lora(&net.lora).var_store(&vs, &spec(1.0)).build().unwrap_err();
    assert!(e.to_string().contains("weight space"), "{e}");
    let with_w0 = VarStoreAdapters { w0_suffix: Some("base.weight".into()), ..spec(1.0) };
    let opt = MgpoOptimizer::builder(Config::trainer_nlu(1e-3)).lora(&net.lora).var_store(&vs, &with_w0).build().unwrap();
    assert_eq!(opt.layout().adapters()[1].w0, Some(0), "enc perturbs its W0 in place");
    assert_eq!(opt.layout().adapters()[0].w0, None, "dec is perturbed by its layer");
    // The same tensor twice.
    let e = MgpoOptimizer::builder(Config::default()).plain("h", &net.head_w).plain("h2", &net.head_w).build().unwrap_err();
    assert_eq!(e, MgpoError::DuplicateName("h2".into()));
    let e = MgpoOptimizer::builder(Config::default()).lora(&net.lora).adapter("again", net.lora.adapter().unwrap().a(), &net.enc_b, 1.0).build().unwrap_err();
    assert_eq!(e, MgpoError::DuplicateName("again.a".into()));
    // Mixed dtypes, named.
    let f = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let e = MgpoOptimizer::builder(Config::default()).plain("h", &net.head_w).plain("f", &f).build().unwrap_err();
    assert!(matches!(&e, MgpoError::Backend(m) if m.contains("`f`")), "{e}");
    // Integer tensors.
    let i = Tensor::zeros([2], (Kind::Int64, Device::Cpu));
    assert!(MgpoOptimizer::builder(Config::default()).plain("i", &i).build().is_err());
    // An invalid configuration.
    let bad = Config { rho: -1.0, ..Config::default() };
    assert!(matches!(MgpoOptimizer::builder(bad).plain("h", &net.head_w).build(), Err(MgpoError::InvalidConfig { .. })));
}

#[test]
fn training_lowers_the_loss_in_every_mode() {
    let (x, y) = data();
    for (name, config) in [
        ("paper-nlu", Config::paper_nlu(2e-2)),
        ("trainer-nlu", Config::trainer_nlu(2e-2)),
        ("weight-global-ascent", Config { space: Space::Weight, scope: Scope::Global, ..Config::paper_nlu(2e-2) }),
        ("adamw", Config { rho: 0.0, ..Config::paper_nlu(2e-2) }),
    ] {
        let vs = store();
        let net = Net::new(&vs);
        let spec = VarStoreAdapters { w0_suffix: Some("base.weight".into()), ..spec(15.0) };
        let mut opt = MgpoOptimizer::builder(config).lora(&net.lora).var_store(&vs, &spec).build().unwrap();
        let frozen_before = (host(&net.enc_w0), host(&net.emb), host(&net.lora.base().ws));
        let first = f64::try_from(net.loss(&x, &y)).unwrap();
        for _ in 0..60 {
            let (loss, report) = opt.training_step(|| net.loss(&x, &y)).unwrap();
            assert!(!report.skipped && loss.double_value(&[]).is_finite());
        }
        let last = f64::try_from(net.loss(&x, &y)).unwrap();
        assert!(last < 0.5 * first, "{name}: loss {first} -> {last}");
        assert_eq!(opt.state().step, 60);
        assert!(!opt.is_perturbed());
        // Frozen tensors: the factored W0 and the embedding are exact; the
        // in-place W0 (weight space) is back within rounding.
        assert_eq!(host(&net.emb), frozen_before.1);
        assert_eq!(host(&net.lora.base().ws), frozen_before.2, "{name}: the LoraLinear's W0 was written");
        let drift = host(&net.enc_w0).iter().zip(&frozen_before.0).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(drift < 1e-12, "{name}: in-place W0 drifted by {drift}");
    }
}

#[test]
fn adapter_space_perturbation_is_removed_by_step() {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::paper_nlu(1e-2), Some(15.0)).unwrap();
    let _ = opt.training_step(|| net.loss(&x, &y)).unwrap();
    let clean: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    opt.zero_grad();
    opt.perturb().unwrap();
    assert!(opt.is_perturbed());
    let moved: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    let dist2: f64 = moved.iter().flatten().zip(clean.iter().flatten()).map(|(a, b)| (a - b) * (a - b)).sum();
    // ||eps|| = rho / (g_bar + eps): the adaptive radius of the paper.
    let g_bar = opt.state().g_bar[0].unwrap();
    assert!((dist2.sqrt() - 0.05 / g_bar).abs() < 1e-9 * (1.0 + 0.05 / g_bar), "{} vs {}", dist2.sqrt(), 0.05 / g_bar);
    assert_eq!(opt.perturb().unwrap_err(), MgpoError::AlreadyPerturbed);
    opt.unperturb().unwrap();
    let back: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    for (a, b) in back.iter().flatten().zip(clean.iter().flatten()) {
        assert!((a - b).abs() < 1e-15, "unperturb restores the clean point");
    }
}

#[test]
fn gradients_come_from_grad_and_zero_grad_clears_them() {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::paper_nlu(1e-2), Some(15.0)).unwrap();
    net.loss(&x, &y).backward();
    let g1: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(&p.grad())).collect();
    net.loss(&x, &y).backward(); // libtorch accumulates
    for ((_, p), g) in opt.params().iter().zip(&g1) {
        for (a, b) in host(&p.grad()).iter().zip(g) {
            assert!((a - 2.0 * b).abs() < 1e-12);
        }
    }
    opt.zero_grad();
    assert!(opt.params().iter().all(|(_, p)| host(&p.grad()).iter().all(|&v| v == 0.0)));
}

#[test]
fn a_missing_gradient_is_an_error_and_leaves_the_parameters_clean() {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    // A trainable variable that the loss never uses: it gets no .grad().
    let unused = vs.root().var_copy("unused", &det(&[2, 2], 0.5, 1.0));
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::paper_nlu(1e-2), Some(15.0)).unwrap();
    assert!(opt.layout().tensor_index("unused").is_ok());
    let e = opt.training_step(|| net.loss(&x, &y)).unwrap_err();
    assert_eq!(e, MgpoError::MissingGradient("unused".into()));

    // Give it a gradient once so that the optimizer has momentum.
    let before: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    let _ = opt.training_step(|| net.loss(&x, &y) + unused.sum(Kind::Double)).unwrap();
    let clean: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    assert_ne!(clean, before);
    opt.perturb().unwrap();
    let perturbed: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    assert_ne!(perturbed, clean, "the first perturbation after a step is non-zero");
    // A step with a wrong-shaped gradient (a backward pass of another
    // model) is refused before any parameter changes.
    let mut g = unused.grad();
    tch::no_grad(|| g.set_data(&Tensor::zeros([3], (Kind::Double, Device::Cpu))));
    let e = opt.step().unwrap_err();
    assert!(matches!(e, MgpoError::ShapeMismatch { .. }), "{e}");
    assert!(!opt.is_perturbed(), "an error leaves the parameters clean");
    let after: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    for (a, b) in after.iter().flatten().zip(clean.iter().flatten()) {
        assert!((a - b).abs() < 1e-15);
    }
    assert_eq!(opt.state().step, 1);
}

#[test]
fn non_finite_gradients_skip_the_step() {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::paper_nlu(1e-2), Some(15.0)).unwrap();
    for _ in 0..3 {
        let _ = opt.training_step(|| net.loss(&x, &y)).unwrap();
    }
    let clean: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    let m_before: Vec<Vec<f64>> = opt.state().moments.iter().map(|m| host(&m.m)).collect();
    let g_bar = opt.state().g_bar.clone();
    let (_, report) = opt.training_step(|| net.loss(&x, &y) * f64::NAN).unwrap();
    assert!(report.skipped);
    assert_eq!(report.skipped_total, 1);
    assert_eq!(opt.state().step, 3);
    assert_eq!(opt.state().g_bar, g_bar);
    let after: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    for (a, b) in after.iter().flatten().zip(clean.iter().flatten()) {
        assert!((a - b).abs() < 1e-15, "a skipped step changes no parameter");
    }
    let m_after: Vec<Vec<f64>> = opt.state().moments.iter().map(|m| host(&m.m)).collect();
    assert_eq!(m_after, m_before);
    // And training resumes.
    let (_, report) = opt.training_step(|| net.loss(&x, &y)).unwrap();
    assert!(!report.skipped && report.step == 4);
}

#[test]
fn learning_rate_is_validated() {
    let vs = store();
    let net = Net::new(&vs);
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&net.lora], Config::paper_nlu(1e-2), Some(15.0)).unwrap();
    assert!(opt.set_lr(f64::NAN).is_err());
    assert!(opt.set_lr(-1.0).is_err());
    assert_eq!(opt.lr(), 1e-2);
    opt.set_lr(3e-3).unwrap();
    assert_eq!(opt.lr(), 3e-3);
    assert_eq!(opt.weight_perturbation("nope").unwrap_err(), MgpoError::UnknownName("nope".into()));
    assert!(opt.weight_perturbation("dec").unwrap().is_none(), "adapter space has no weight perturbation");
}

fn bits(t: &Tensor) -> Vec<u64> {
    host(t).iter().map(|v| v.to_bits()).collect()
}

/// Every variable of the store (trainable and frozen), by name, bit by bit.
fn store_bits(vs: &nn::VarStore) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = vs.variables().into_iter().map(|(n, t)| (n, bits(&t))).collect();
    v.sort();
    v
}

fn checkpoint_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mgpo-tch-{name}-{}.safetensors", std::process::id()))
}

#[test]
fn a_checkpoint_resumes_bit_identically() {
    let (x, y) = data();
    for (name, config) in [("adapter", Config::paper_nlu(2e-2)), ("weight", Config::trainer_nlu(2e-2))] {
        let spec = VarStoreAdapters { w0_suffix: Some("base.weight".into()), ..spec(15.0) };
        let build = |vs: &nn::VarStore, net: &Net| {
            let b = MgpoOptimizer::builder(config).lora(&net.lora).var_store(vs, &spec);
            b.param_group_where(ParamGroup::no_decay(), is_bias_or_norm).build().unwrap()
        };
        let vs = store();
        let net = Net::new(&vs);
        let mut opt = build(&vs, &net);
        for _ in 0..3 {
            let _ = opt.training_step(|| net.loss(&x, &y)).unwrap();
        }
        let path = checkpoint_path(&format!("resume-{name}"));
        opt.save_checkpoint(&path).unwrap();

        // A fresh process: the model's weights (saved with the var store)
        // and the optimizer's state from the checkpoint.
        let mut vs2 = store();
        let net2 = Net::new(&vs2);
        vs2.copy(&vs).unwrap();
        let mut resumed = build(&vs2, &net2);
        resumed.load_checkpoint(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(resumed.state().step, 3);
        for step in 4..=7 {
            let (_, a) = opt.training_step(|| net.loss(&x, &y)).unwrap();
            let (_, b) = resumed.training_step(|| net2.loss(&x, &y)).unwrap();
            assert_eq!(a, b, "{name}: step {step} reports differ");
            assert!(a.groups.iter().any(|g| g.perturbation_norm > 0.0), "{name}: the resumed steps are perturbed");
        }
        assert_eq!(store_bits(&vs2), store_bits(&vs), "{name}: the resumed run differs");
    }
}

/// Two adapters of the same shape, `q` and `v`, over shared inputs.
fn two_adapters() -> [Tensor; 4] {
    let var = |shape: &[i64], seed| det(shape, seed, 0.5).set_requires_grad(true);
    [var(&[2, 3], 0.3), var(&[4, 2], 0.5), var(&[2, 3], 0.7), var(&[4, 2], 0.9)]
}

#[test]
fn a_checkpoint_refuses_swapped_same_shape_adapters() {
    let [qa, qb, va, vb] = two_adapters();
    let q_then_v = || MgpoOptimizer::builder(Config::paper_nlu(1e-2)).adapter("q", &qa, &qb, 2.0).adapter("v", &va, &vb, 2.0).build().unwrap();
    let mut opt = q_then_v();
    let x = det(&[5, 3], 0.11, 1.0);
    let report = opt.training_step(|| (x.matmul(&qa.tr()).matmul(&qb.tr()) * x.matmul(&va.tr()).matmul(&vb.tr())).sum(Kind::Double)).unwrap().1;
    assert_eq!(report.step, 1);
    let path = checkpoint_path("swapped");
    opt.save_checkpoint(&path).unwrap();

    let mut swapped = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).adapter("v", &va, &vb, 2.0).adapter("q", &qa, &qb, 2.0).build().unwrap();
    let e = swapped.load_checkpoint(&path).unwrap_err();
    assert!(
        matches!(&e, MgpoError::Checkpoint(CheckpointError::LayoutMismatch(m)) if m.contains("[\"q.a\", \"q.b\", \"v.a\", \"v.b\"]") && m.contains("[\"v.a\", \"v.b\", \"q.a\", \"q.b\"]")),
        "{e}"
    );
    assert_eq!(swapped.state().step, 0, "a refused checkpoint changes nothing");
    let mut same = q_then_v();
    same.load_checkpoint(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(same.state().step, 1);
}

#[test]
fn parameter_groups_change_exactly_their_tensors() {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    let config = Config::adamw(AdamWConfig { lr: 0.1, weight_decay: 0.5, ..AdamWConfig::default() });
    let mut opt = MgpoOptimizer::builder(config)
        .lora(&net.lora)
        .var_store(&vs, &spec(15.0))
        .param_group(ParamGroup::new("slow").lr_scale(0.5), &["enc.b"])
        .param_group_where(ParamGroup::no_decay(), is_bias_or_norm)
        .build()
        .unwrap();
    let l = opt.layout();
    let groups: Vec<(&str, &str)> = l.tensors().iter().map(|t| (t.name.as_str(), l.param_groups()[t.param_group].name.as_str())).collect();
    let want = [("dec.a", "default"), ("dec.b", "default"), ("enc.a", "default"), ("enc.b", "slow"), ("head.bias", "no_decay"), ("head.weight", "default"), ("norm.weight", "no_decay")];
    assert_eq!(groups, want);
    // With zero gradients AdamW's update m / (sqrt(v) + eps) is 0, so a
    // tensor moves only by its group's decay p <- p (1 - lr_g wd_g).
    let before: Vec<Vec<f64>> = opt.params().iter().map(|(_, p)| host(p)).collect();
    let _ = opt.training_step(|| net.loss(&x, &y) * 0.0).unwrap();
    for (((name, p), b), (_, group)) in opt.params().iter().zip(&before).zip(want) {
        let factor = match group {
            "default" => 1.0 - 0.1 * 0.5,
            "slow" => 1.0 - 0.05 * 0.5,
            _ => 1.0,
        };
        let decayed: Vec<u64> = b.iter().map(|v| (v * factor).to_bits()).collect();
        assert_eq!(bits(p), decayed, "{name} ({group})");
    }
}

/// One step on the 12 rows, or 3 micro-batches of 4 accumulated in
/// `.grad()` (each loss / 3) at one perturbed point, then one step.
fn run_batches(config: Config, micro: usize) -> (Vec<(String, Vec<u64>)>, Vec<StepReport>) {
    let (x, y) = data();
    let vs = store();
    let net = Net::new(&vs);
    let spec = VarStoreAdapters { w0_suffix: Some("base.weight".into()), ..spec(15.0) };
    let mut opt = MgpoOptimizer::builder(config).lora(&net.lora).var_store(&vs, &spec).build().unwrap();
    let rows = 12 / micro as i64;
    let mut reports = Vec::new();
    for _ in 0..4 {
        opt.zero_grad();
        opt.perturb().unwrap();
        for j in 0..micro as i64 {
            let (xb, yb) = (x.narrow(0, j * rows, rows), y.narrow(0, j * rows, rows));
            (net.loss(&xb, &yb) / micro as f64).backward();
        }
        reports.push(opt.step().unwrap());
    }
    (store_bits(&vs), reports)
}

#[test]
fn accumulated_micro_batches_equal_the_whole_batch() {
    for config in [Config::paper_nlu(2e-2), Config::trainer_nlu(2e-2)] {
        let ((whole, rw), (acc, ra)) = (run_batches(config, 1), run_batches(config, 3));
        for (a, b) in rw.iter().zip(&ra) {
            assert!(b.groups.iter().zip(&a.groups).all(|(x, y)| (x.perturbation_norm - y.perturbation_norm).abs() <= 1e-12 * y.perturbation_norm.max(1.0)));
            assert!((a.grad_norm - b.grad_norm).abs() <= 1e-12 * a.grad_norm);
        }
        assert!(ra[3].groups.iter().all(|g| g.perturbation_norm > 0.0), "the accumulated steps are perturbed");
        assert_ne!(whole, store_bits(&{
            let vs = store();
            Net::new(&vs);
            vs
        }), "the steps moved the weights");
        for ((n, w), (_, a)) in whole.iter().zip(&acc) {
            for (p, q) in w.iter().zip(a) {
                let (p, q) = (f64::from_bits(*p), f64::from_bits(*q));
                // Far inside the conformance vectors' tolerance (rtol 1e-4, atol 1e-6): f64 rounding only.
                assert!((p - q).abs() <= 1e-12 + 1e-10 * p.abs(), "{n}: whole batch {p} vs accumulated {q}");
            }
        }
    }
}
