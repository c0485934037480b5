//! The module optimizer: parameters matched by `ParamId` and named by
//! module path, checkpoints moving between burn and mgpo-ndarray in both
//! directions, in-place updates, and errors that leave the module clean.

// The in-place test reads the address of ndarray tensors, a backend burn
// 0.22 deprecates in favour of burn-flex.
#![allow(deprecated)]

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use mgpo_burn::{ndarray_device, LoraConfig, LoraLinear, MgpoOptimizer};
use mgpo_core::{Config, MgpoError, NoFrozen};
use mgpo_ndarray::NdBackend;
use ndarray::{ArrayD, IxDyn};

#[derive(Module, Debug)]
struct Net {
    q: LoraLinear,
    v: LoraLinear,
    head: Linear,
}

fn device() -> Device {
    ndarray_device().clone().autodiff()
}

/// A small f64 model: two adapters (B non-zero, so the weight-space
/// direction is) and a trainable head.
fn net() -> Net {
    let d = device();
    let lin = |i, o| LinearConfig::new(i, o).init(&d).map(&mut CastF64);
    let lora = |i, o, r| {
        let mut l = LoraLinear::new(lin(i, o), &LoraConfig::new(r, 2.0 * r as f64)).unwrap();
        l.lora_b = Param::from_tensor(Tensor::<2>::ones([o, r], (&d, DType::F64)).mul_scalar(0.1));
        l
    };
    Net { q: lora(5, 4, 2), v: lora(4, 3, 1), head: lin(3, 2) }
}

/// Casts every float parameter to f64 (ids kept).
struct CastF64;
impl ModuleMapper for CastF64 {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        p.map(|t| {
            let (rg, ad) = (t.is_require_grad(), t.is_autodiff());
            let t = t.inner().cast(DType::F64);
            let t = if ad { Tensor::from_inner(t) } else { t };
            if rg {
                t.require_grad()
            } else {
                t
            }
        })
    }
}

/// Host values of the parameters with the given ids, in that order.
fn values(m: &impl Module, ids: &[ParamId]) -> Vec<Vec<f64>> {
    struct V<'a>(&'a [ParamId], Vec<Option<Vec<f64>>>);
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(i) = self.0.iter().position(|&id| id == p.id) {
                self.1[i] = Some(p.val().try_to_vec_as::<f64>().unwrap());
            }
        }
    }
    let mut v = V(ids, vec![None; ids.len()]);
    m.visit(&mut v);
    v.1.into_iter().map(|x| x.expect("every id is in the module")).collect()
}

/// Sets the parameters with the given ids to host values (ids, autodiff
/// state kept).
fn set_values<M: Module>(m: M, ids: &[ParamId], vals: &[Vec<f64>]) -> M {
    struct S<'a>(&'a [ParamId], &'a [Vec<f64>]);
    impl ModuleMapper for S<'_> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(i) = self.0.iter().position(|&id| id == p.id) else { return p };
            let vals = self.1[i].clone();
            p.map(|t| {
                let t2 = Tensor::<D>::from_data(TensorData::new(vals, t.shape()), (&t.device(), t.dtype()));
                if t.is_require_grad() {
                    t2.require_grad()
                } else {
                    t2
                }
            })
        }
    }
    m.map(&mut S(ids, vals))
}

/// Deterministic gradient `k` of tensor `t` with `n` elements.
fn grad(step: usize, t: usize, n: usize) -> Vec<f64> {
    (0..n).map(|i| ((step * 31 + t * 7 + i) as f64 * 0.37).sin() * 0.1).collect()
}

/// `GradientsParams` holding [`grad`] for every id.
fn grads_for(m: &impl Module, ids: &[ParamId], step: usize) -> GradientsParams {
    struct G<'a>(&'a [ParamId], usize, GradientsParams);
    impl ModuleVisitor for G<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(i) = self.0.iter().position(|&id| id == p.id) {
                let t = p.val().inner();
                let g = grad(self.1, i, t.shape().num_elements());
                self.2.register(p.id, Tensor::<D>::from_data(TensorData::new(g, t.shape()), (&t.device(), t.dtype())));
            }
        }
    }
    let mut g = G(ids, step, GradientsParams::new());
    m.visit(&mut g);
    g.2
}

fn burn_opt(config: Config, m: &Net) -> MgpoOptimizer {
    MgpoOptimizer::builder(config).lora(&m.q).lora(&m.v).build(m).unwrap()
}

fn burn_step(opt: &mut MgpoOptimizer, m: Net, step: usize) -> Net {
    let m = opt.perturb(m).unwrap();
    let g = grads_for(&m, &opt.param_ids().to_vec(), step);
    opt.step(1e-2, m, g).unwrap()
}

fn nd_step(opt: &mut mgpo_ndarray::Mgpo<f64>, p: &mut Vec<ArrayD<f64>>, step: usize) {
    opt.set_lr(1e-2).unwrap();
    opt.perturb(p, &mut NoFrozen).unwrap();
    let g: Vec<ArrayD<f64>> = p.iter().enumerate().map(|(i, x)| ArrayD::from_shape_vec(IxDyn(x.shape()), grad(step, i, x.len())).unwrap()).collect();
    opt.step(p, &mut NoFrozen, &g).unwrap();
}

fn nd_params(opt: &MgpoOptimizer, vals: &[Vec<f64>]) -> Vec<ArrayD<f64>> {
    opt.layout().tensors().iter().zip(vals).map(|(t, v)| ArrayD::from_shape_vec(IxDyn(&t.shape), v.clone()).unwrap()).collect()
}

/// Largest absolute difference of two tensor lists.
fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn bits(v: &[Vec<f64>]) -> Vec<u64> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

#[test]
fn names_are_module_paths_in_module_order() {
    let m = net();
    let opt = burn_opt(Config::trainer_nlu(1e-2), &m);
    let names: Vec<&str> = opt.layout().tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["q.a", "q.b", "v.a", "v.b", "head.weight", "head.bias"]);
    assert_eq!(opt.param_ids()[0], m.q.lora_a.id);
    assert_eq!(opt.param_ids()[3], m.v.lora_b.id);
    let scales: Vec<f64> = opt.layout().adapters().iter().map(|a| a.scale).collect();
    assert_eq!(scales, [2.0, 2.0]);
}

/// N steps on one framework, checkpoint, load on the other, N more: the
/// same bits as 2N steps on either, both ways, in both spaces.
#[test]
fn checkpoints_move_between_burn_and_ndarray() {
    for config in [Config::trainer_nlu(1e-2), Config::paper_nlu(1e-2)] {
        let m0 = net();
        let ids = burn_opt(config, &m0).param_ids().to_vec();
        let init = values(&m0, &ids);

        // Straight runs, 6 steps each.
        let mut bo = burn_opt(config, &m0);
        let mut m = m0.clone();
        for s in 0..6 {
            m = burn_step(&mut bo, m, s);
        }
        let burn_straight = values(&m, &ids);
        let mut no = mgpo_ndarray::Mgpo::<f64>::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        let mut p = nd_params(&bo, &init);
        for s in 0..6 {
            nd_step(&mut no, &mut p, s);
        }
        let nd_straight: Vec<Vec<f64>> = p.iter().map(|x| x.iter().copied().collect()).collect();
        assert_eq!(bits(&burn_straight), bits(&nd_straight), "burn and ndarray differ ({:?})", config.space);

        // ndarray -> burn.
        let mut no = mgpo_ndarray::Mgpo::<f64>::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        let mut p = nd_params(&bo, &init);
        for s in 0..3 {
            nd_step(&mut no, &mut p, s);
        }
        let ckpt = no.checkpoint_bytes().unwrap();
        let mut m = set_values(m0.clone(), &ids, &p.iter().map(|x| x.iter().copied().collect()).collect::<Vec<_>>());
        let mut bo = burn_opt(config, &m);
        bo.load_checkpoint_bytes(&ckpt).unwrap();
        assert_eq!(bo.state().step, 3);
        for s in 3..6 {
            m = burn_step(&mut bo, m, s);
        }
        assert_eq!(bits(&values(&m, &ids)), bits(&nd_straight), "ndarray -> burn resume ({:?})", config.space);

        // burn -> ndarray, through a file.
        let dir = std::env::temp_dir().join(format!("mgpo-burn-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("opt.safetensors");
        let mut bo = burn_opt(config, &m0);
        let mut m = m0.clone();
        for s in 0..3 {
            m = burn_step(&mut bo, m, s);
        }
        bo.save_checkpoint(&path).unwrap();
        let mut no = mgpo_ndarray::Mgpo::<f64>::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        no.load_checkpoint(&path).unwrap();
        let mut p = nd_params(&bo, &values(&m, &ids));
        for s in 3..6 {
            nd_step(&mut no, &mut p, s);
        }
        let got: Vec<Vec<f64>> = p.iter().map(|x| x.iter().copied().collect()).collect();
        assert_eq!(bits(&got), bits(&nd_straight), "burn -> ndarray resume ({:?})", config.space);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The address of a parameter's memory.
fn address(m: &Net, id: ParamId) -> usize {
    struct A(ParamId, usize);
    impl ModuleVisitor for A {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if p.id == self.0 {
                let t = p.val().inner();
                let n = t.shape().num_elements();
                let prim = t.reshape([n]).try_into_primitive::<NdArray>().unwrap();
                self.1 = match prim {
                    burn::backend::ndarray::NdArrayTensor::F64(s) => s.into_owned().as_ptr() as usize,
                    _ => 0,
                };
            }
        }
    }
    let mut a = A(id, 0);
    m.visit(&mut a);
    a.1
}

/// After a forward and backward pass, perturb and step update every
/// parameter where it is: no copy, no new allocation.
#[test]
fn steps_update_parameters_in_place() {
    let d = device();
    let m = net();
    let mut opt = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).lora(&m.q).lora(&m.v).build(&m).unwrap();
    let ids = opt.param_ids().to_vec();
    let x = Tensor::<2>::ones([3, 5], (&d, DType::F64));
    let mut m = m;
    for _ in 0..3 {
        let before: Vec<usize> = ids.iter().map(|&id| address(&m, id)).collect();
        m = opt.perturb(m).unwrap();
        let y = m.head.forward(m.v.forward(m.q.forward(x.clone())));
        let g = GradientsParams::from_grads(y.square().sum().backward(), &m);
        m = opt.step(1e-2, m, g).unwrap();
        let after: Vec<usize> = ids.iter().map(|&id| address(&m, id)).collect();
        assert!(!opt.last_report().unwrap().skipped);
        assert_eq!(before, after);
    }
}

#[test]
fn a_missing_gradient_leaves_the_module_clean() {
    let m = net();
    let ids = burn_opt(Config::paper_nlu(1e-2), &m).param_ids().to_vec();
    let mut opt = burn_opt(Config::paper_nlu(1e-2), &m);
    let mut m = burn_step(&mut opt, m, 0);
    let clean = values(&m, &ids);
    m = opt.perturb(m).unwrap();
    assert!(max_diff(&values(&m, &ids), &clean) > 1e-4, "not perturbed");
    let mut g = grads_for(&m, &ids, 1);
    g.remove::<1>(m.head.bias.as_ref().unwrap().id);
    let f = opt.step(1e-2, m, g).unwrap_err();
    assert!(matches!(f.error, MgpoError::MissingGradient(ref n) if n == "head.bias"), "{}", f.error);
    // Clean again: p + c m - c m, within the rounding of that subtraction.
    assert!(max_diff(&values(&f.module, &ids), &clean) < 1e-15);
    assert!(!opt.is_perturbed());
    assert_eq!(opt.state().step, 1);

    // A bad learning rate: refused, module clean again.
    let m = opt.perturb(f.module).unwrap();
    let g = grads_for(&m, &ids, 1);
    let f = opt.step(-1.0, m, g).unwrap_err();
    assert!(matches!(f.error, MgpoError::InvalidConfig { .. }), "{}", f.error);
    assert!(max_diff(&values(&f.module, &ids), &clean) < 1e-15);
    assert!(!opt.is_perturbed());
}

#[test]
fn a_module_without_the_parameters_is_refused_unchanged() {
    let m = net();
    let mut opt = burn_opt(Config::paper_nlu(1e-2), &m);
    let other = net();
    let ids: Vec<ParamId> = [other.q.lora_a.id, other.head.weight.id].into();
    let before = values(&other, &ids);
    let f = opt.perturb(other).unwrap_err();
    assert!(matches!(f.error, MgpoError::UnknownName(ref n) if n.contains("q.a")), "{}", f.error);
    assert_eq!(bits(&values(&f.module, &ids)), bits(&before));
    assert!(!opt.is_perturbed());
}

#[test]
fn builder_errors_are_typed() {
    let m = net();
    let stranger = net();
    let e = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).lora(&stranger.q).build(&m).unwrap_err();
    assert!(matches!(e, MgpoError::UnknownName(_)), "{e}");
    let e = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).lora(&m.q).lora(&m.q).build(&m).unwrap_err();
    assert!(matches!(e, MgpoError::DuplicateName(_)), "{e}");
    let frozen = net().no_grad();
    let e = MgpoOptimizer::new(Config::paper_nlu(1e-2), &frozen).unwrap_err();
    assert_eq!(e, MgpoError::Empty);
}
