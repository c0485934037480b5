//! The module optimizer: parameters matched by `ParamId` and named by
//! module path, checkpoints moving between burn and mgpo-ndarray in both
//! directions, in-place updates, and errors that leave the module clean.

// The in-place test reads the address of ndarray tensors, a backend burn
// 0.22 deprecates in favour of burn-flex.
#![allow(deprecated)]

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{DType, Device, Tensor, TensorData};
use mgpo_burn::{ndarray_device, LoraLinear, MgpoOptimizer};
use mgpo_core::backend::HostIo;
use mgpo_core::{is_bias_or_norm, CheckpointError, Config, Layout, LoraConfig, Mgpo, MgpoError, ParamGroup};
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

impl Net {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.v.forward(self.q.forward(x)))
    }
}

/// Two adapters of one shape: only their identity tells them apart.
#[derive(Module, Debug)]
struct Twin {
    q: LoraLinear,
    v: LoraLinear,
}

/// An f64 linear layer on the autodiff device.
fn lin(i: usize, o: usize) -> Linear {
    LinearConfig::new(i, o).init(&device()).map(&mut CastF64)
}

/// An f64 LoRA layer with B non-zero (so the weight-space direction is).
fn lora(i: usize, o: usize, r: usize) -> LoraLinear {
    let mut l = LoraLinear::new(lin(i, o), &LoraConfig::new(r, 2.0 * r as f64)).unwrap();
    l.lora_b = Param::from_tensor(Tensor::<2>::ones([o, r], (&device(), DType::F64)).mul_scalar(0.1));
    l
}

/// A small f64 model: two adapters and a trainable head.
fn net() -> Net {
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

fn burn_step<M: Module>(opt: &mut MgpoOptimizer, m: M, step: usize) -> M {
    let m = opt.perturb(m).unwrap();
    let g = grads_for(&m, &opt.param_ids().to_vec(), step);
    opt.step(1e-2, m, g).unwrap()
}

type NdMgpo = Mgpo<NdBackend<f64>>;

fn nd_step(opt: &mut NdMgpo, p: &mut Vec<(String, ArrayD<f64>)>, step: usize) {
    opt.set_lr(1e-2).unwrap();
    opt.perturb(p).unwrap();
    let g: Vec<(String, ArrayD<f64>)> = p.iter().enumerate().map(|(i, (n, x))| (n.clone(), ArrayD::from_shape_vec(IxDyn(x.shape()), grad(step, i, x.len())).unwrap())).collect();
    opt.step(p, &g).unwrap();
}

fn nd_params(opt: &MgpoOptimizer, vals: &[Vec<f64>]) -> Vec<(String, ArrayD<f64>)> {
    opt.layout().tensors().iter().zip(vals).map(|(t, v)| (t.name.clone(), ArrayD::from_shape_vec(IxDyn(&t.shape), v.clone()).unwrap())).collect()
}

fn nd_values(p: &[(String, ArrayD<f64>)]) -> Vec<Vec<f64>> {
    p.iter().map(|(_, x)| x.iter().copied().collect()).collect()
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
        let mut no = NdMgpo::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        let mut p = nd_params(&bo, &init);
        for s in 0..6 {
            nd_step(&mut no, &mut p, s);
        }
        let nd_straight = nd_values(&p);
        assert_eq!(bits(&burn_straight), bits(&nd_straight), "burn and ndarray differ ({:?})", config.space);

        // ndarray -> burn.
        let mut no = NdMgpo::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        let mut p = nd_params(&bo, &init);
        for s in 0..3 {
            nd_step(&mut no, &mut p, s);
        }
        let ckpt = no.checkpoint_bytes().unwrap();
        let mut m = set_values(m0.clone(), &ids, &nd_values(&p));
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
        let mut no = NdMgpo::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
        no.load_checkpoint(&path).unwrap();
        let mut p = nd_params(&bo, &values(&m, &ids));
        for s in 3..6 {
            nd_step(&mut no, &mut p, s);
        }
        let got = nd_values(&p);
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
    let e = MgpoOptimizer::new(&frozen, Config::paper_nlu(1e-2)).unwrap_err();
    assert_eq!(e, MgpoError::Empty);
}

/// burn matches parameters by `ParamId`: a module whose two same-shape
/// adapters changed places is updated exactly as the original (each tensor
/// with its own moments and its own name), not mixed up by position.
#[test]
fn same_shape_adapters_are_matched_by_identity_not_position() {
    for config in [Config::trainer_nlu(1e-2), Config::paper_nlu(1e-2)] {
        let m = Twin { q: lora(4, 4, 2), v: lora(4, 4, 2) };
        let build = |m: &Twin| MgpoOptimizer::builder(config).lora(&m.q).lora(&m.v).build(m).unwrap();
        let (mut o1, mut o2) = (build(&m), build(&m));
        let ids = o1.param_ids().to_vec();
        let mut straight = m.clone();
        let mut swapped = Twin { q: m.v.clone(), v: m.q.clone() };
        for s in 0..4 {
            straight = burn_step(&mut o1, straight, s);
            swapped = burn_step(&mut o2, swapped, s);
        }
        assert_eq!(bits(&values(&straight, &ids)), bits(&values(&swapped, &ids)), "{:?}", config.space);
        assert_ne!(bits(&values(&straight, &ids)), bits(&values(&m, &ids)), "nothing moved");
        // The same moments under the same names (the checkpoint's metadata order may differ).
        let moments = |o: &MgpoOptimizer| o.state().moments.iter().flat_map(|m| [o.backend().to_f64(&m.m).unwrap(), o.backend().to_f64(&m.v).unwrap()]).collect::<Vec<_>>();
        assert_eq!(bits(&moments(&o1)), bits(&moments(&o2)));
        assert_eq!(o1.state().g_bar, o2.state().g_bar);

        // A checkpoint whose tensors are named in another order is refused, naming them.
        let other = Layout::builder().adapter_scaled("v", 2.0, &[2, 4], &[4, 2], false).adapter_scaled("q", 2.0, &[2, 4], &[4, 2], false).build().unwrap();
        let mut nd = NdMgpo::new(NdBackend::new(), config, other).unwrap();
        let mut p: Vec<(String, ArrayD<f64>)> = nd.layout().tensors().iter().map(|t| (t.name.clone(), ArrayD::from_elem(IxDyn(&t.shape), 0.1))).collect();
        nd_step(&mut nd, &mut p, 0);
        let e = o1.load_checkpoint_bytes(&nd.checkpoint_bytes().unwrap()).unwrap_err();
        assert!(matches!(e, MgpoError::Checkpoint(CheckpointError::LayoutMismatch(ref s)) if s.contains("\"v.a\"")), "{e}");
        assert_eq!(o1.state().step, 4);
    }
}

/// Parameter groups by module path (no decay on biases, a slower adapter)
/// give mgpo-ndarray's bits with the same layout, and do change the run.
#[test]
fn parameter_groups_by_module_path_match_ndarray() {
    let mut config = Config::paper_nlu(1e-2);
    config.adamw.weight_decay = 0.1;
    let m0 = net();
    let grouped = |m: &Net| MgpoOptimizer::builder(config).lora(&m.q).lora(&m.v).param_group_where(ParamGroup::no_decay(), is_bias_or_norm).param_group(ParamGroup::new("slow").lr_scale(0.5), &["q.a"]).build(m).unwrap();
    let mut bo = grouped(&m0);
    let groups: Vec<(&str, &str)> = bo.layout().tensors().iter().map(|t| (t.name.as_str(), bo.layout().param_groups()[t.param_group].name.as_str())).collect();
    assert_eq!(groups, [("q.a", "slow"), ("q.b", "default"), ("v.a", "default"), ("v.b", "default"), ("head.weight", "default"), ("head.bias", "no_decay")]);
    let ids = bo.param_ids().to_vec();
    let init = values(&m0, &ids);
    let mut nd = NdMgpo::new(NdBackend::new(), config, bo.layout().clone()).unwrap();
    let mut p = nd_params(&bo, &init);
    let (mut m, mut plain_m) = (m0.clone(), m0.clone());
    let mut plain = burn_opt(config, &m0);
    for s in 0..5 {
        m = burn_step(&mut bo, m, s);
        nd_step(&mut nd, &mut p, s);
        plain_m = burn_step(&mut plain, plain_m, s);
    }
    assert_eq!(bits(&values(&m, &ids)), bits(&nd_values(&p)));
    let (got, ungrouped) = (values(&m, &ids), values(&plain_m, &ids));
    assert_ne!(got[0], ungrouped[0], "the slow group changed nothing");
    assert_ne!(got[5], ungrouped[5], "the no-decay group changed nothing");
    assert_eq!(got[1..5], ungrouped[1..5], "groups leaked into other tensors");
}

/// Gradient accumulation with burn's `GradientsAccumulator`: perturb once,
/// k micro-batches at the perturbed point (each loss divided by k), one
/// step: the same as one step on the whole batch, within f64 rounding.
#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let d = device();
    let x = Tensor::<2>::random([8, 5], burn::tensor::Distribution::Normal(0.0, 1.0), (&d, DType::F64));
    let y = Tensor::<2>::random([8, 2], burn::tensor::Distribution::Normal(0.0, 1.0), (&d, DType::F64));
    let mse = |m: &Net, x: Tensor<2>, y: Tensor<2>| (m.forward(x) - y).square().mean();
    for config in [Config::trainer_nlu(1e-2), Config::paper_nlu(1e-2)] {
        let m0 = net();
        let (mut big_opt, mut acc_opt) = (burn_opt(config, &m0), burn_opt(config, &m0));
        let ids = big_opt.param_ids().to_vec();
        let (mut big, mut acc) = (m0.clone(), m0.clone());
        for _ in 0..4 {
            big = big_opt.perturb(big).unwrap();
            let g = GradientsParams::from_grads(mse(&big, x.clone(), y.clone()).backward(), &big);
            big = big_opt.step(1e-2, big, g).unwrap();

            acc = acc_opt.perturb(acc).unwrap();
            let mut sum = GradientsAccumulator::<Net>::new();
            for k in 0..4 {
                let (xs, ys) = (x.clone().slice([2 * k..2 * k + 2]), y.clone().slice([2 * k..2 * k + 2]));
                let loss = mse(&acc, xs, ys).div_scalar(4.0);
                sum.accumulate(&acc, GradientsParams::from_grads(loss.backward(), &acc));
            }
            acc = acc_opt.step(1e-2, acc, sum.grads()).unwrap();
        }
        let (a, b) = (values(&big, &ids), values(&acc, &ids));
        assert!(max_diff(&a, &b) < 1e-12, "{:?}: accumulated differs by {}", config.space, max_diff(&a, &b));
        assert!(max_diff(&a, &values(&m0, &ids)) > 1e-3, "nothing moved");
        assert_eq!(acc_opt.state().step, 4);
    }
}
