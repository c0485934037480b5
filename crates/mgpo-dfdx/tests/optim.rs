//! The dfdx optimizer on a real dfdx model: the same numbers as mgpo-core on
//! ndarray fed the same gradients, step by step, in both spaces; the frozen
//! base weight never changes; and its refusals, each a typed error that
//! leaves the model clean.

mod common;

use common::{net, Net, HID, IN, OUT};
use dfdx::nn::{Module, ZeroGrads};
use dfdx::optim::{Optimizer, OptimizerUpdateError};
use dfdx::prelude::*;
use mgpo_core::{Config, Direction, LoraConfig, MgpoError, Scope, Space};
use mgpo_dfdx::{LoraLinear, MgpoOptimizer};
use mgpo_ndarray::NdBackend;
use ndarray::{ArrayD, IxDyn};

const BATCH: usize = 6;

fn nd<S: Shape>(t: &Tensor<S, f64, Cpu>) -> ArrayD<f64> {
    let shape: Vec<usize> = t.shape().concrete().into();
    ArrayD::from_shape_vec(IxDyn(&shape), t.as_vec()).unwrap()
}

const NAMES: [&str; 4] = ["0.a", "0.b", "2.weight", "2.bias"];

/// The trainable tensors in layout order, by layout name.
fn trainables(m: &Net) -> Vec<(String, ArrayD<f64>)> {
    let t = [nd(&m.0.lora_a), nd(&m.0.lora_b), nd(&m.2.weight), nd(&m.2.bias)];
    NAMES.iter().map(|n| n.to_string()).zip(t).collect()
}

fn grads_of(m: &Net, g: &Gradients<f64, Cpu>) -> Vec<(String, ArrayD<f64>)> {
    let t = [nd(&g.get(&m.0.lora_a)), nd(&g.get(&m.0.lora_b)), nd(&g.get(&m.2.weight)), nd(&g.get(&m.2.bias))];
    NAMES.iter().map(|n| n.to_string()).zip(t).collect()
}

fn assert_close(what: &str, a: &[(String, ArrayD<f64>)], b: &[(String, ArrayD<f64>)], tol: f64) {
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!((n, x.shape()), (m, y.shape()));
        for (p, q) in x.iter().zip(y.iter()) {
            assert!((p - q).abs() <= tol * (1.0 + q.abs()), "{what}: {n}: {p} vs {q}");
        }
    }
}

fn config(space: Space, scope: Scope, direction: Direction) -> Config {
    let mut c = Config::paper_nlu(1e-2);
    c.space = space;
    c.scope = scope;
    c.direction = direction;
    c.rho = 0.2;
    c.max_grad_norm = Some(1.0);
    c.adamw.weight_decay = 0.01;
    c
}

/// Layer 0's output with W0 replaced by W0 + coef (m_B A + B m_A), on the host.
fn layer0_with_perturbed_w0(m: &Net, x: &[f64], coef: f64, mb: &ArrayD<f64>, ma: &ArrayD<f64>) -> Vec<f64> {
    let l = &m.0;
    let (a, b) = (nd(&l.lora_a), nd(&l.lora_b));
    let mut w = nd(&l.weight);
    for o in 0..HID {
        for i in 0..IN {
            let d: f64 = (0..2).map(|k| mb[[o, k]] * a[[k, i]] + b[[o, k]] * ma[[k, i]]).sum();
            w[[o, i]] += coef * d;
        }
    }
    let (bias, s) = (l.bias.as_vec(), l.scale());
    let mut out = Vec::new();
    for xr in x.chunks(IN) {
        let ax: Vec<f64> = (0..2).map(|k| (0..IN).map(|i| a[[k, i]] * xr[i]).sum()).collect();
        for o in 0..HID {
            let y: f64 = (0..IN).map(|i| w[[o, i]] * xr[i]).sum::<f64>() + bias[o] + s * (0..2).map(|k| b[[o, k]] * ax[k]).sum::<f64>();
            out.push(y);
        }
    }
    out
}

fn matches_core(cfg: Config) {
    let dev = Cpu::seed_from_u64(7);
    let mut model = net(&dev);
    let mut opt = MgpoOptimizer::new(&model, cfg).unwrap();
    assert_eq!(opt.layout().names().collect::<Vec<_>>(), NAMES);
    let layout = opt.layout().clone();
    assert_eq!(layout.adapters().len(), 1);
    assert_eq!(layout.adapters()[0].name, "0");
    assert_eq!(layout.adapters()[0].scale, 1.5);
    assert_eq!(layout.adapters()[0].w0, None, "W0 is never registered");
    let mut core = mgpo_core::Mgpo::new(NdBackend::<f64>::new(), cfg, layout).unwrap();
    let mut p = trainables(&model);
    let w0 = model.0.weight.as_vec();
    let x: Tensor<Rank2<BATCH, IN>, f64, Cpu> = dev.sample_normal();
    let y: Tensor<Rank2<BATCH, OUT>, f64, Cpu> = dev.sample_normal();
    let mut grads = model.alloc_grads();
    let mut perturbed_steps = 0;
    for step in 0..6 {
        let clean = p.clone();
        opt.perturb(&mut model).unwrap();
        core.perturb(&mut p).unwrap();
        assert_close(&format!("step {step} perturbed"), &trainables(&model), &p, 1e-12);
        match core.weight_perturbation(0) {
            Some(wp) => {
                assert_eq!(cfg.space, Space::Weight);
                assert!(model.0.is_perturbed());
                let want = layer0_with_perturbed_w0(&model, &x.as_vec(), wp.coef, wp.m_b, wp.m_a);
                let got = model.0.forward(x.clone()).as_vec();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-12 * (1.0 + w.abs()), "step {step}: factored forward {g} vs dense {w}");
                }
                perturbed_steps += 1;
            }
            None if cfg.space == Space::Weight => assert!(!model.0.is_perturbed()),
            None => {
                if step > 0 {
                    assert_ne!(trainables(&model), clean, "step {step}: adapter space must move A and B");
                    perturbed_steps += 1;
                }
            }
        }
        let loss = dfdx::losses::mse_loss(model.forward(x.clone().traced(grads)), y.clone());
        grads = loss.backward();
        let g = grads_of(&model, &grads);
        opt.update(&mut model, &grads).unwrap();
        let rep = core.step(&mut p, &g).unwrap();
        let got = opt.last_report().unwrap();
        assert_eq!((got.step, got.skipped, got.groups.len()), (rep.step, rep.skipped, rep.groups.len()));
        for (a, b) in got.groups.iter().zip(&rep.groups) {
            for (x, y) in [(a.direction_norm, b.direction_norm), (a.perturbation_norm, b.perturbation_norm), (a.grad_norm, b.grad_norm)] {
                assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "step {step} report: {a:?} vs {b:?}");
            }
        }
        assert_close(&format!("step {step} after"), &trainables(&model), &p, 1e-12);
        for (a, b) in opt.state().g_bar.iter().zip(&core.state().g_bar) {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!((a - b).abs() <= 1e-12 * b, "step {step}: g_bar {a} vs {b}");
        }
        assert!(!model.0.is_perturbed(), "update leaves the model clean");
        assert_eq!(model.0.weight.as_vec(), w0, "W0 must never change");
        model.zero_grads(&mut grads);
    }
    assert!(perturbed_steps >= 4, "the perturbation was exercised only {perturbed_steps} times");
}

#[test]
fn adapter_space_matches_core_on_ndarray() {
    matches_core(config(Space::Adapter, Scope::Global, Direction::Ascent));
}

#[test]
fn weight_space_matches_core_on_ndarray() {
    matches_core(config(Space::Weight, Scope::PerAdapter, Direction::Descent));
}

#[test]
fn weight_space_global_ascent_matches_core_on_ndarray() {
    matches_core(config(Space::Weight, Scope::Global, Direction::Ascent));
}

/// A model (from a device seeded with `seed`) and its optimizer in adapter
/// space after one clean step, so that the next perturbation is not zero,
/// then perturbed; with the input and the clean trainables.
fn perturbed(seed: u64) -> (Net, MgpoOptimizer<Net, f64>, Tensor<Rank2<BATCH, IN>, f64, Cpu>, Vec<(String, ArrayD<f64>)>) {
    let dev = Cpu::seed_from_u64(seed);
    let mut model = net(&dev);
    let mut opt = MgpoOptimizer::new(&model, config(Space::Adapter, Scope::Global, Direction::Ascent)).unwrap();
    let x: Tensor<Rank2<BATCH, IN>, f64, Cpu> = dev.sample_normal();
    let grads = model.forward(x.clone().traced(model.alloc_grads())).sum().backward();
    opt.step(&mut model, &grads).unwrap();
    let clean = trainables(&model);
    opt.perturb(&mut model).unwrap();
    assert_ne!(trainables(&model), clean, "the perturbation moves the trainables");
    (model, opt, x, clean)
}

#[test]
fn missing_gradient_is_a_typed_error_naming_it_and_leaves_the_model_clean() {
    let (mut model, mut opt, x, clean) = perturbed(1);
    // A leaky tape through layer 0 only: the head gets no gradient at all.
    let grads = model.0.forward(x.leaky_trace()).sum().backward();
    assert_eq!(opt.step(&mut model, &grads), Err(MgpoError::MissingGradient("2.weight".into())));
    assert!(!opt.is_perturbed());
    assert_close("after the refused step", &trainables(&model), &clean, 1e-14);
    assert_eq!(opt.state().step, 1);
    // dfdx's own update names both head tensors as unused.
    match opt.update(&mut model, &grads) {
        Err(OptimizerUpdateError::UnusedParams(u)) => assert_eq!(u.ids.len(), 2),
        other => panic!("expected UnusedParams, got {other:?}"),
    }
    assert_eq!(opt.last_error(), Some(&MgpoError::MissingGradient("2.weight".into())));
    assert_close("after the refused update", &trainables(&model), &clean, 1e-14);
    assert_eq!(opt.state().step, 1);
}

#[test]
fn non_finite_gradient_skips_and_restores_the_clean_point() {
    let (mut model, mut opt, x, clean) = perturbed(2);
    let bad = x.clone() * f64::NAN;
    let grads = model.forward(bad.traced(model.alloc_grads())).sum().backward();
    opt.update(&mut model, &grads).unwrap();
    let rep = opt.last_report().unwrap();
    assert!(rep.skipped);
    assert_eq!(rep.step, 1);
    assert_close("restored", &trainables(&model), &clean, 1e-14);
}

#[test]
fn merged_layers_and_changed_scaling_are_refused() {
    let dev = Cpu::seed_from_u64(3);
    let mut model = net(&dev);
    let mut opt = MgpoOptimizer::new(&model, Config::paper_nlu(1e-2)).unwrap();
    model.0.merge().unwrap();
    let e = opt.perturb(&mut model).unwrap_err();
    assert!(e.to_string().contains("merged"), "{e}");
    let x: Tensor<Rank2<BATCH, IN>, f64, Cpu> = dev.sample_normal();
    let grads = model.forward(x.trace(model.alloc_grads())).sum().backward();
    let before = trainables(&model);
    // No dfdx error says "merged": every trainable tensor is reported unchanged.
    match opt.update(&mut model, &grads) {
        Err(OptimizerUpdateError::UnusedParams(u)) => assert_eq!(u.ids.len(), 4),
        other => panic!("expected UnusedParams, got {other:?}"),
    }
    assert!(opt.last_error().unwrap().to_string().contains("merged"));
    assert_eq!(trainables(&model), before);
    model.0.unmerge().unwrap();
    model.0.set_config(LoraConfig::new(2, 5.0)).unwrap();
    let e = opt.perturb(&mut model).unwrap_err();
    assert!(e.to_string().contains("scaling changed"), "{e}");
    assert!(!opt.is_perturbed());
    assert_eq!(opt.state().step, 0);
}

#[test]
fn perturb_twice_is_refused_and_unperturb_restores() {
    let (mut model, mut opt, _, clean) = perturbed(4);
    assert_eq!(opt.perturb(&mut model), Err(MgpoError::AlreadyPerturbed));
    opt.unperturb(&mut model).unwrap();
    assert_close("unperturbed", &trainables(&model), &clean, 1e-14);
}

#[test]
fn an_invalid_learning_rate_is_refused_at_once() {
    let model = net(&Cpu::default());
    let mut opt = MgpoOptimizer::new(&model, Config::paper_nlu(1e-2)).unwrap();
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let e = opt.set_lr(bad).unwrap_err();
        assert!(matches!(e, MgpoError::InvalidConfig { field: "lr", .. }), "{e}");
    }
    assert_eq!(opt.lr(), 1e-2);
    opt.set_lr(3e-3).unwrap();
    assert_eq!(opt.lr(), 3e-3);
}

#[test]
fn a_bare_layer_is_one_adapter_named_lora() {
    let dev = Cpu::seed_from_u64(5);
    let layer = LoraLinear::<IN, HID, 2, f64, Cpu>::try_new(&dev, LoraConfig::new(2, 4.0).rslora()).unwrap();
    let opt = MgpoOptimizer::new(&layer, Config::trainer_nlu(1e-3)).unwrap();
    assert_eq!(opt.layout().names().collect::<Vec<_>>(), ["lora.a", "lora.b"]);
    let l = opt.layout();
    assert_eq!((l.adapters()[0].name.as_str(), l.adapters()[0].scale), ("lora", 4.0 / 2f64.sqrt()));
    assert!(l.plain().is_empty());
}

#[test]
fn the_optimizer_can_move_between_threads() {
    fn send<T: Send>(_: &T) {}
    let model = net(&Cpu::default());
    send(&MgpoOptimizer::new(&model, Config::paper_nlu(1e-2)).unwrap());
}

/// A home-made adapter module: `lora_a`, `lora_b` and a rank-0 `lora_scale`,
/// but none of the factored-perturbation tensors.
#[derive(Clone)]
struct Bare {
    lora_a: Tensor<Rank2<2, IN>, f64, Cpu>,
    lora_b: Tensor<Rank2<HID, 2>, f64, Cpu>,
    lora_scale: Tensor<Rank0, f64, Cpu>,
}

impl dfdx::nn::TensorCollection<f64, Cpu> for Bare {
    type To<E2: Dtype, D2: Device<E2>> = Bare;
    fn iter_tensors<V: dfdx::nn::ModuleVisitor<Self, f64, Cpu>>(v: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        use dfdx::nn::TensorOptions;
        v.visit_fields(
            (
                Self::tensor("lora_a", |s| &s.lora_a, |s| &mut s.lora_a, TensorOptions::reset_to_ones()),
                Self::tensor("lora_b", |s| &s.lora_b, |s| &mut s.lora_b, TensorOptions::reset_to_zeros()),
                Self::tensor("lora_scale", |s| &s.lora_scale, |s| &mut s.lora_scale, TensorOptions::detached(|t| t.try_fill_with_ones())),
            ),
            |_| unreachable!("never rebuilt in this test"),
        )
    }
}

#[test]
fn weight_space_needs_the_factored_tensors_adapter_space_does_not() {
    let dev = Cpu::default();
    let bare = Bare { lora_a: dev.ones(), lora_b: dev.zeros(), lora_scale: dev.tensor(2.0) };
    let e = MgpoOptimizer::new(&bare, Config::trainer_nlu(1e-3)).err().expect("weight space must be refused");
    assert!(e.to_string().contains("mgpo_coef"), "{e}");
    let opt = MgpoOptimizer::new(&bare, Config::paper_nlu(1e-3)).unwrap();
    assert_eq!(opt.layout().adapters()[0].scale, 2.0);
}
