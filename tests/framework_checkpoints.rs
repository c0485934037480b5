//! A checkpoint written by each framework wrapper loads in each other one
//! and resumes. For every ordered pair (X, Y) of the compiled frameworks
//! (candle, tch, dfdx, burn, each through its own `MgpoOptimizer` and
//! `LoraLinear`, and mgpo-ndarray's `Mgpo` with the forward and backward
//! pass written out), in f32 and f64, in adapter space (`paper_nlu`) and
//! weight space (`trainer_nlu`):
//!
//! 1. the same model (LoRA linears 6 -> 5 -> 3, rank 2, B non-zero) is
//!    built in X from fixed host values and trained 3 steps on a fixed
//!    batch, in X's own loop (perturb, forward, MSE, backward, step);
//! 2. X's optimizer writes a checkpoint;
//! 3. the model is built in Y with X's current parameters, and Y's
//!    optimizer loads the checkpoint: step, skip count, every m and v and
//!    g_bar of every group are X's bit for bit;
//! 4. X and Y each take 3 more steps: their parameters agree within the
//!    conformance tolerance (bit for bit when X = Y). The largest
//!    differences are printed (`-- --nocapture`).
//!
//! And a checkpoint is refused, naming the tensors, by an optimizer whose
//! adapters are named otherwise, which keeps its state. `tests/cross_backend.rs`
//! checks the same at the level of the `TensorOps` backends.
//!
//! dfdx and burn name an adapter by its module path, so the model is a
//! 2-tuple in both (adapters `0` and `1`, tensors `0.a`, `0.b`, `1.a`,
//! `1.b`), and the model with other names is that tuple nested once more
//! (`0.0`, `0.1`); candle, tch and ndarray take those names as given.

#![cfg(any(feature = "ndarray", feature = "candle", feature = "tch", feature = "dfdx", feature = "burn"))]

use std::time::Instant;

use lora_mgpo::backend::{HostIo, TensorOps};
use lora_mgpo::{CheckpointError, Config, Mgpo, MgpoError, Moments, State};
use mgpo_conformance::props::default_tolerance;
use mgpo_conformance::{Dtype, Tolerance};

const IN: usize = 6;
const HID: usize = 5;
const OUT: usize = 3;
/// (in, out) of the two layers.
const SHAPES: [(usize, usize); 2] = [(IN, HID), (HID, OUT)];
const R: usize = 2;
const ALPHA: f64 = 3.0;
const BATCH: usize = 8;
const LR: f64 = 2e-2;
/// Steps before the checkpoint, and after it on each side.
const STEPS: usize = 3;
/// The layout names every framework gives the model.
const NAMES: [&str; 4] = ["0.a", "0.b", "1.a", "1.b"];
const DTYPES: [Dtype; 2] = [Dtype::F32, Dtype::F64];

/// s = alpha / r of every adapter.
fn scale() -> f64 {
    lora_mgpo::lora_scale(ALPHA, R, false)
}

/// `n` fixed values in (-amp, amp), exact in f32.
fn det(n: usize, seed: usize, amp: f64) -> Vec<f64> {
    (0..n).map(|i| (((i * 7 + seed * 13) as f64 * 0.61).sin() * amp) as f32 as f64).collect()
}

/// Host values of one layer, row-major: W0 (out x in), bias, A (r x in), B (out x r).
#[derive(Debug, Clone)]
struct LayerInit {
    inp: usize,
    out: usize,
    w0: Vec<f64>,
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// Host values of the model's two layers.
#[derive(Debug, Clone)]
struct Init([LayerInit; 2]);

impl Init {
    fn new() -> Self {
        Init(std::array::from_fn(|k| {
            let ((inp, out), s) = (SHAPES[k], 10 * k);
            LayerInit { inp, out, w0: det(out * inp, s + 1, 0.5), bias: det(out, s + 2, 0.1), a: det(R * inp, s + 3, 0.4), b: det(out * R, s + 4, 0.3) }
        }))
    }

    /// The same base layers with the adapters `params` (in layout order).
    fn with_adapters(&self, params: &[Vec<f64>]) -> Self {
        let mut next = self.clone();
        for (k, l) in next.0.iter_mut().enumerate() {
            (l.a, l.b) = (params[2 * k].clone(), params[2 * k + 1].clone());
        }
        next
    }
}

/// The fixed batch, row-major: inputs (BATCH x IN) and targets (BATCH x OUT).
struct Batch {
    x: Vec<f64>,
    y: Vec<f64>,
}

fn batch() -> Batch {
    Batch { x: det(BATCH * IN, 90, 1.0), y: det(BATCH * OUT, 91, 1.0) }
}

/// An optimizer's state on the host: what a checkpoint holds.
#[derive(Debug, Clone)]
struct HostState {
    step: u64,
    skipped: u64,
    /// m and v per trainable tensor.
    moments: Vec<[Vec<f64>; 2]>,
    g_bar: Vec<Option<f64>>,
}

impl HostState {
    /// Every m, v and g_bar value (NaN for a g_bar not set yet).
    fn values(&self) -> Vec<f64> {
        let mv = self.moments.iter().flat_map(|[m, v]| m.iter().chain(v)).copied();
        mv.chain(self.g_bar.iter().map(|g| g.unwrap_or(f64::NAN))).collect()
    }

    /// The counts and the bits of every value.
    fn bits(&self) -> Vec<u64> {
        [self.step, self.skipped, self.moments.len() as u64, self.g_bar.len() as u64].into_iter().chain(self.values().iter().map(|x| x.to_bits())).collect()
    }
}

/// What the test needs of the core optimizer behind each wrapper (all of
/// them dereference to a `Mgpo`).
trait Core {
    fn bytes(&self) -> Vec<u8>;
    fn load(&mut self, bytes: &[u8]) -> lora_mgpo::Result<()>;
    fn host_state(&self) -> HostState;
    /// Sets a state of its own (step 7, one skip, fixed moments), so that a
    /// refused checkpoint has something to leave alone.
    fn seed(&mut self);
    fn tensor_names(&self) -> Vec<String>;
    /// The sum of the groups' perturbation norms in the last step.
    fn last_perturbation(&self) -> f64;
}

impl<B: TensorOps + HostIo> Core for Mgpo<B> {
    fn bytes(&self) -> Vec<u8> {
        self.checkpoint_bytes().expect("checkpoint bytes")
    }

    fn load(&mut self, bytes: &[u8]) -> lora_mgpo::Result<()> {
        self.load_checkpoint_bytes(bytes)
    }

    fn host_state(&self) -> HostState {
        let (be, s) = (self.backend(), self.state());
        let host = |t: &B::Tensor| be.to_f64(t).expect("host values");
        let moments = s.moments.iter().map(|mv| [host(&mv.m), host(&mv.v)]).collect();
        HostState { step: s.step, skipped: s.skipped, moments, g_bar: s.g_bar.clone() }
    }

    fn seed(&mut self) {
        let be = self.backend();
        let tensor = |shape: &[usize], seed: usize| be.from_f64(shape, &det(shape.iter().product(), seed, 0.2)).expect("tensor");
        let moments = self.layout().tensors().iter().enumerate().map(|(i, t)| Moments { m: tensor(&t.shape, 50 + i), v: tensor(&t.shape, 60 + i) }).collect();
        let g_bar = vec![Some(0.75); self.groups().len()];
        self.set_state(State { step: 7, skipped: 1, moments, g_bar }).expect("set_state");
    }

    fn tensor_names(&self) -> Vec<String> {
        self.layout().tensors().iter().map(|t| t.name.clone()).collect()
    }

    fn last_perturbation(&self) -> f64 {
        self.last_report().map_or(0.0, |r| r.groups.iter().map(|g| g.perturbation_norm).sum())
    }
}

/// Something holding an optimizer.
trait Holder {
    fn core(&self) -> &dyn Core;
    fn core_mut(&mut self) -> &mut dyn Core;
}

/// A model of one framework with its optimizer.
trait Side: Holder {
    /// One step on the batch, in the framework's own loop.
    fn train(&mut self, batch: &Batch);
    /// A and B of both adapters on the host, in layout order.
    fn params(&self) -> Vec<Vec<f64>>;
}

/// `Holder` for a type whose field `opt` dereferences to `Mgpo<$backend>`.
macro_rules! holder {
    ($ty:ty, $backend:ty) => {
        impl Holder for $ty {
            fn core(&self) -> &dyn Core {
                let m: &Mgpo<$backend> = &self.opt;
                m
            }
            fn core_mut(&mut self) -> &mut dyn Core {
                let m: &mut Mgpo<$backend> = &mut self.opt;
                m
            }
        }
    };
}

/// One framework: the model with adapters `0` and `1`, and the same model
/// with adapters `0.0` and `0.1`.
struct Framework {
    name: &'static str,
    build: fn(&Init, Config, Dtype) -> Box<dyn Side>,
    renamed: fn(&Init, Config, Dtype) -> Box<dyn Holder>,
}

fn frameworks() -> Vec<Framework> {
    let mut all = Vec::new();
    #[cfg(feature = "ndarray")]
    all.push(nd::framework());
    #[cfg(feature = "candle")]
    all.push(candle_side::framework());
    #[cfg(feature = "tch")]
    all.push(tch_side::framework());
    #[cfg(feature = "dfdx")]
    all.push(dfdx_side::framework());
    #[cfg(feature = "burn")]
    all.push(burn_side::framework());
    all
}

/// `build`, `renamed` and `framework()` of a framework whose adapters are
/// named as given: `Run::new(init, config, dtype, prefix)` names them
/// `{prefix}0` and `{prefix}1` (candle, tch).
#[cfg(any(feature = "candle", feature = "tch"))]
macro_rules! named_framework {
    ($name:literal) => {
        fn build(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Side> {
            Box::new(Run::new(init, config, dtype, ""))
        }

        fn renamed(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Holder> {
            Box::new(Run::new(init, config, dtype, "0."))
        }

        pub fn framework() -> Framework {
            Framework { name: $name, build, renamed }
        }
    };
}

/// The optimizer's trainable tensors on the host (candle, tch).
#[cfg(any(feature = "candle", feature = "tch"))]
fn bound_params<B: lora_mgpo::Shares + HostIo>(opt: &lora_mgpo::Bound<B>) -> Vec<Vec<f64>> {
    opt.params().iter().map(|(_, t)| opt.backend().to_f64(t).expect("host values")).collect()
}

/// The row-major transpose of a rows x cols matrix.
#[cfg(feature = "burn")]
fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|i| v[(i % rows) * cols + i / rows]).collect()
}

/// The largest |a - b| over paired values, after checking each pair against `tol`.
fn max_diff(what: &str, a: &[f64], b: &[f64], tol: Tolerance) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut max = 0.0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(tol.accepts(*y, *x), "{what}: value {i} is {y} resumed, {x} straight (tolerance {tol:?})");
        max = max.max((x - y).abs());
    }
    max
}

/// What one pair gave after the resume.
struct Outcome {
    params_diff: f64,
    state_diff: f64,
    bit_identical: bool,
}

/// Steps 1 to 4 of the module docs for one ordered pair.
fn resume(x: &Framework, y: &Framework, config: Config, dtype: Dtype, label: &str) -> Outcome {
    let (init, batch) = (Init::new(), batch());
    let mut a = (x.build)(&init, config, dtype);
    assert_eq!(a.core().tensor_names(), NAMES, "{label}: layout names in {}", x.name);
    for _ in 0..STEPS {
        a.train(&batch);
    }
    assert!(a.core().last_perturbation() > 0.0, "{label}: {} never perturbed", x.name);
    let (bytes, saved, params) = (a.core().bytes(), a.core().host_state(), a.params());
    assert_eq!((saved.step, saved.skipped), (STEPS as u64, 0), "{label}");
    assert_ne!(params, [init.0[0].a.clone(), init.0[0].b.clone(), init.0[1].a.clone(), init.0[1].b.clone()], "{label}: training moved nothing");

    let mut b = (y.build)(&init.with_adapters(&params), config, dtype);
    assert_eq!(b.core().tensor_names(), NAMES, "{label}: layout names in {}", y.name);
    let bits = |p: &[Vec<f64>]| p.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&b.params()), bits(&params), "{label}: {} does not hold the parameters of {}", y.name, x.name);
    b.core_mut().load(&bytes).unwrap_or_else(|e| panic!("{label}: {} refuses the checkpoint of {}: {e}", y.name, x.name));
    let loaded = b.core().host_state();
    assert_eq!(loaded.bits(), saved.bits(), "{label}: the loaded state differs from the saved one:\n{loaded:?}\n{saved:?}");

    for _ in 0..STEPS {
        a.train(&batch);
        b.train(&batch);
    }
    let (pa, pb) = (a.params(), b.params());
    let (sa, sb) = (a.core().host_state(), b.core().host_state());
    assert_eq!(sb.step, 2 * STEPS as u64, "{label}");
    assert_ne!(bits(&pa), bits(&params), "{label}: the steps after the resume moved nothing");
    let tol = default_tolerance(dtype);
    let (flat_a, flat_b): (Vec<f64>, Vec<f64>) = (pa.concat(), pb.concat());
    Outcome {
        params_diff: max_diff(&format!("{label}: parameters"), &flat_a, &flat_b, tol),
        state_diff: max_diff(&format!("{label}: m, v, g_bar"), &sa.values(), &sb.values(), tol),
        bit_identical: bits(&pa) == bits(&pb) && sa.bits() == sb.bits(),
    }
}

/// Every ordered pair of compiled frameworks, f32 and f64, under `config`.
fn every_pair(config: Config, space: &str) {
    let all = frameworks();
    let start = Instant::now();
    let mut identical = 0;
    for dtype in DTYPES {
        for x in &all {
            for y in &all {
                let label = format!("{space} {dtype:?} {} -> {}", x.name, y.name);
                let o = resume(x, y, config, dtype, &label);
                if x.name == y.name {
                    assert!(o.bit_identical, "{label}: resuming on the same framework is not bit-identical (parameters {:e}, state {:e})", o.params_diff, o.state_diff);
                }
                identical += usize::from(o.bit_identical);
                let same = if o.bit_identical { "bit-identical" } else { "not bit-identical" };
                println!("{label}: loaded state bit-identical; after {STEPS} more steps {same}, max |diff| parameters {:.3e}, m/v/g_bar {:.3e}", o.params_diff, o.state_diff);
            }
        }
    }
    let pairs = DTYPES.len() * all.len() * all.len();
    println!("{space}: {pairs} pairs, {identical} bit-identical after the resume, {:.1} s", start.elapsed().as_secs_f64());
}

#[test]
fn checkpoints_move_between_frameworks_in_adapter_space() {
    every_pair(Config::paper_nlu(LR), "adapter");
}

#[test]
fn checkpoints_move_between_frameworks_in_weight_space() {
    every_pair(Config::trainer_nlu(LR), "weight");
}

/// A checkpoint of adapters `0`, `1` is refused by an optimizer of adapters
/// `0.0`, `0.1` (same shapes, same order), naming the tensors, and the
/// refusing optimizer keeps its state bit for bit.
#[test]
fn a_checkpoint_is_refused_by_adapters_of_other_names() {
    let (init, batch) = (Init::new(), batch());
    let all = frameworks();
    for config in [Config::paper_nlu(LR), Config::trainer_nlu(LR)] {
        for dtype in DTYPES {
            for x in &all {
                let mut a = (x.build)(&init, config, dtype);
                a.train(&batch);
                let bytes = a.core().bytes();
                for y in &all {
                    let label = format!("{:?} {dtype:?} {} -> renamed {}", config.space, x.name, y.name);
                    let mut b = (y.renamed)(&init, config, dtype);
                    assert_eq!(b.core().tensor_names(), ["0.0.a", "0.0.b", "0.1.a", "0.1.b"], "{label}");
                    b.core_mut().seed();
                    let before = b.core().host_state().bits();
                    match b.core_mut().load(&bytes) {
                        Err(MgpoError::Checkpoint(CheckpointError::LayoutMismatch(msg))) => {
                            assert!(msg.contains("\"0.a\"") && msg.contains("\"0.0.a\""), "{label}: the error names neither side's tensors: {msg}")
                        }
                        other => panic!("{label}: expected a layout mismatch, got {other:?}"),
                    }
                    assert_eq!(b.core().host_state().bits(), before, "{label}: a refused checkpoint changed the state");
                }
            }
        }
    }
}

/// mgpo-ndarray's optimizer over named arrays: the forward and backward
/// pass of the two layers are written out here. As the other frameworks'
/// layers do, the forward pass adds the weight-space perturbation in
/// factored form (`Mgpo::weight_perturbation`), A and B held constant in
/// it, and W0 is never written (registered with W0, the optimizer would
/// perturb W0 in place and give it back only within rounding).
#[cfg(feature = "ndarray")]
mod nd {
    use super::*;
    use lora_mgpo::ndarray::{Element, NdBackend};
    use lora_mgpo::Layout;
    use ndarray::{Array2, ArrayD, Ix2};

    pub struct Run<F: Element> {
        opt: Mgpo<NdBackend<F>>,
        /// 0.a, 0.b, 1.a, 1.b.
        tensors: Vec<(String, ArrayD<F>)>,
        w0: Vec<Array2<F>>,
        bias: Vec<Array2<F>>,
    }
    holder!(Run<f32>, NdBackend<f32>);
    holder!(Run<f64>, NdBackend<f64>);

    fn array<F: Element>(v: &[f64], shape: &[usize]) -> ArrayD<F> {
        NdBackend::<F>::new().from_f64(shape, v).expect("array")
    }

    fn matrix<F: Element>(t: &ArrayD<F>) -> Array2<F> {
        t.clone().into_dimensionality::<Ix2>().expect("a matrix")
    }

    /// x s, in F.
    fn times<F: Element>(t: Array2<F>, s: f64) -> Array2<F> {
        let s: F = array::<F>(&[s], &[1]).iter().copied().next().expect("one value");
        t.mapv(|v| v * s)
    }

    impl<F: Element> Run<F> {
        fn new(init: &Init, config: Config, prefix: &str) -> Self {
            let mut layout = Layout::builder();
            let mut tensors = Vec::new();
            for (k, l) in init.0.iter().enumerate() {
                let name = format!("{prefix}{k}");
                layout = layout.adapter(&name, ALPHA, &[R, l.inp], &[l.out, R], false);
                tensors.push((format!("{name}.a"), array(&l.a, &[R, l.inp])));
                tensors.push((format!("{name}.b"), array(&l.b, &[l.out, R])));
            }
            let w0 = init.0.iter().map(|l| matrix(&array(&l.w0, &[l.out, l.inp]))).collect();
            let bias = init.0.iter().map(|l| matrix(&array(&l.bias, &[1, l.out]))).collect();
            let opt = Mgpo::new(NdBackend::new(), config, layout.build().expect("layout")).expect("optimizer");
            Run { opt, tensors, w0, bias }
        }

        /// The gradients of the mean squared error at the current tensors.
        fn grads(&self, batch: &Batch) -> Vec<(String, ArrayD<F>)> {
            let t = |i: usize| matrix(&self.tensors[i].1);
            let weight = |k: usize| {
                let w = &self.w0[k] + &times(t(2 * k + 1).dot(&t(2 * k)), scale());
                match self.opt.weight_perturbation(k) {
                    Some(p) => &w + &times(matrix(p.m_b).dot(&t(2 * k)) + t(2 * k + 1).dot(&matrix(p.m_a)), p.coef),
                    None => w,
                }
            };
            let weights: Vec<Array2<F>> = (0..2).map(weight).collect();
            let mut h = vec![matrix(&array(&batch.x, &[BATCH, IN]))];
            for (w, b) in weights.iter().zip(&self.bias) {
                let next = &h[h.len() - 1].dot(&w.t()) + b;
                h.push(next);
            }
            let mut g = times(&h[2] - &matrix(&array::<F>(&batch.y, &[BATCH, OUT])), 2.0 / (BATCH * OUT) as f64);
            let mut grads = vec![None, None, None, None];
            for k in (0..2).rev() {
                let dw = g.t().dot(&h[k]);
                grads[2 * k] = Some(times(t(2 * k + 1).t().dot(&dw), scale()));
                grads[2 * k + 1] = Some(times(dw.dot(&t(2 * k).t()), scale()));
                g = g.dot(&weights[k]);
            }
            self.tensors.iter().zip(grads).map(|((n, _), g)| (n.clone(), g.expect("every gradient").into_dyn())).collect()
        }
    }

    impl<F: Element> Side for Run<F>
    where
        Run<F>: Holder,
    {
        fn train(&mut self, batch: &Batch) {
            self.opt.perturb(&mut self.tensors).expect("ndarray perturb");
            let grads = self.grads(batch);
            self.opt.step(&mut self.tensors, &grads).expect("ndarray step");
        }

        fn params(&self) -> Vec<Vec<f64>> {
            let be = self.opt.backend();
            self.tensors[..4].iter().map(|(_, t)| be.to_f64(t).expect("host values")).collect()
        }
    }

    fn build(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Side> {
        match dtype {
            Dtype::F32 => Box::new(Run::<f32>::new(init, config, "")),
            Dtype::F64 => Box::new(Run::<f64>::new(init, config, "")),
        }
    }

    fn renamed(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Holder> {
        match dtype {
            Dtype::F32 => Box::new(Run::<f32>::new(init, config, "0.")),
            Dtype::F64 => Box::new(Run::<f64>::new(init, config, "0.")),
        }
    }

    pub fn framework() -> Framework {
        Framework { name: "ndarray", build, renamed }
    }
}

#[cfg(feature = "candle")]
mod candle_side {
    use super::*;
    use candle_core::{DType, Device, Module, Tensor, Var};
    use lora_mgpo::candle::{CandleBackend, LoraLinear, MgpoOptimizer};

    pub struct Run {
        layers: Vec<LoraLinear>,
        opt: MgpoOptimizer,
        dtype: DType,
    }
    holder!(Run, CandleBackend);

    fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("candle tensor")
    }

    impl Run {
        fn new(init: &Init, config: Config, dtype: Dtype, prefix: &str) -> Self {
            let dtype = if dtype == Dtype::F32 { DType::F32 } else { DType::F64 };
            let var = |v: &[f64], shape: &[usize]| Var::from_tensor(&tensor(v, shape, dtype)).expect("candle var");
            let layer = |(k, l): (usize, &LayerInit)| {
                let base = candle_nn::Linear::new(tensor(&l.w0, &[l.out, l.inp], dtype), Some(tensor(&l.bias, &[l.out], dtype)));
                LoraLinear::from_parts(base, &format!("{prefix}{k}"), var(&l.a, &[R, l.inp]), var(&l.b, &[l.out, R]), scale(), 0.0).expect("candle layer")
            };
            let layers: Vec<LoraLinear> = init.0.iter().enumerate().map(layer).collect();
            let opt = MgpoOptimizer::for_lora(&layers, config).expect("candle optimizer");
            Run { layers, opt, dtype }
        }
    }

    impl Side for Run {
        fn train(&mut self, batch: &Batch) {
            let (x, y) = (tensor(&batch.x, &[BATCH, IN], self.dtype), tensor(&batch.y, &[BATCH, OUT], self.dtype));
            let layers = &self.layers;
            let loss = || candle_nn::loss::mse(&layers.iter().try_fold(x, |h, l| l.forward(&h))?, &y);
            self.opt.training_step(loss).expect("candle step");
        }

        fn params(&self) -> Vec<Vec<f64>> {
            bound_params(&self.opt)
        }
    }

    named_framework!("candle");
}

#[cfg(feature = "tch")]
mod tch_side {
    use super::*;
    use lora_mgpo::tch::tch::nn::{self, Module};
    use lora_mgpo::tch::tch::{Kind, Reduction, Tensor};
    use lora_mgpo::tch::{LoraLinear, MgpoOptimizer, TchBackend};

    pub struct Run {
        layers: Vec<LoraLinear>,
        opt: MgpoOptimizer,
        kind: Kind,
    }
    holder!(Run, TchBackend);

    fn tensor(v: &[f64], shape: &[usize], kind: Kind) -> Tensor {
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(v).to_kind(kind).reshape(shape.as_slice()).copy()
    }

    impl Run {
        fn new(init: &Init, config: Config, dtype: Dtype, prefix: &str) -> Self {
            let kind = if dtype == Dtype::F32 { Kind::Float } else { Kind::Double };
            let var = |v: &[f64], shape: &[usize]| tensor(v, shape, kind).set_requires_grad(true);
            let layer = |(k, l): (usize, &LayerInit)| {
                let base = nn::Linear { ws: tensor(&l.w0, &[l.out, l.inp], kind), bs: Some(tensor(&l.bias, &[l.out], kind)) };
                LoraLinear::from_parts(base, &format!("{prefix}{k}"), var(&l.a, &[R, l.inp]), var(&l.b, &[l.out, R]), scale(), 0.0).expect("tch layer")
            };
            let layers: Vec<LoraLinear> = init.0.iter().enumerate().map(layer).collect();
            let opt = MgpoOptimizer::for_lora(&layers, config).expect("tch optimizer");
            Run { layers, opt, kind }
        }
    }

    impl Side for Run {
        fn train(&mut self, batch: &Batch) {
            let (x, y) = (tensor(&batch.x, &[BATCH, IN], self.kind), tensor(&batch.y, &[BATCH, OUT], self.kind));
            let layers = &self.layers;
            let loss = || layers.iter().fold(x, |h, l| l.forward(&h)).mse_loss(&y, Reduction::Mean);
            let (_loss, _report) = self.opt.training_step(loss).expect("tch step");
        }

        fn params(&self) -> Vec<Vec<f64>> {
            bound_params(&self.opt)
        }
    }

    named_framework!("tch");
}

/// dfdx's layer has its sizes and element type as type parameters, so the
/// model is built once per element type (`dfdx_run!`).
#[cfg(feature = "dfdx")]
mod dfdx_side {
    use super::{scale, Batch, Config, Framework, Holder, Init, LayerInit, Side, ALPHA, BATCH, HID, IN, OUT, R};
    use mgpo_conformance::Dtype as Precision;

    /// A dfdx model and its optimizer.
    pub struct Run<M, E: lora_mgpo::dfdx::Element> {
        dev: dfdx::prelude::Cpu,
        model: M,
        opt: lora_mgpo::dfdx::MgpoOptimizer<M, E>,
    }

    macro_rules! dfdx_run {
        ($m:ident, $e:ty) => {
            mod $m {
                use super::super::{Core, Mgpo};
                use super::*;
                use dfdx::nn::{Module, ZeroGrads};
                use dfdx::prelude::*;
                use lora_mgpo::dfdx::{DfdxBackend, LoraLinear, MgpoOptimizer};
                use lora_mgpo::LoraConfig;

                pub type Net = (LoraLinear<IN, HID, R, $e, Cpu>, LoraLinear<HID, OUT, R, $e, Cpu>);
                holder!(Run<Net, $e>, DfdxBackend<$e>);
                holder!(Run<(Net,), $e>, DfdxBackend<$e>);

                fn cast(v: &[f64]) -> Vec<$e> {
                    v.iter().map(|&x| x as $e).collect()
                }

                fn layer<const I: usize, const O: usize>(dev: &Cpu, l: &LayerInit) -> LoraLinear<I, O, R, $e, Cpu> {
                    let mut m = LoraLinear::try_new(dev, LoraConfig::new(R, ALPHA)).expect("dfdx layer");
                    assert_eq!(m.scale(), scale());
                    m.weight.copy_from(&cast(&l.w0));
                    m.bias.copy_from(&cast(&l.bias));
                    m.lora_a.copy_from(&cast(&l.a));
                    m.lora_b.copy_from(&cast(&l.b));
                    m
                }

                pub fn net(dev: &Cpu, init: &Init) -> Net {
                    (layer(dev, &init.0[0]), layer(dev, &init.0[1]))
                }

                pub fn run<M: dfdx::nn::tensor_collection::TensorCollection<$e, Cpu>>(dev: Cpu, model: M, config: Config) -> Run<M, $e> {
                    let opt = MgpoOptimizer::new(&model, config).expect("dfdx optimizer");
                    Run { dev, model, opt }
                }

                impl Side for Run<Net, $e> {
                    fn train(&mut self, batch: &Batch) {
                        let x: Tensor<Rank2<BATCH, IN>, $e, Cpu> = self.dev.tensor_from_vec(cast(&batch.x), Default::default());
                        let y: Tensor<Rank2<BATCH, OUT>, $e, Cpu> = self.dev.tensor_from_vec(cast(&batch.y), Default::default());
                        self.opt.perturb(&mut self.model).expect("dfdx perturb");
                        let grads = mse_loss(self.model.forward(x.traced(self.model.alloc_grads())), y).backward();
                        self.opt.step(&mut self.model, &grads).expect("dfdx step");
                    }

                    fn params(&self) -> Vec<Vec<f64>> {
                        let (l0, l1) = &self.model;
                        let host = |v: Vec<$e>| v.into_iter().map(|x| x as f64).collect();
                        vec![host(l0.lora_a.as_vec()), host(l0.lora_b.as_vec()), host(l1.lora_a.as_vec()), host(l1.lora_b.as_vec())]
                    }
                }
            }
        };
    }
    dfdx_run!(f32_run, f32);
    dfdx_run!(f64_run, f64);

    fn build(init: &Init, config: Config, dtype: Precision) -> Box<dyn Side> {
        let dev = dfdx::prelude::Cpu::default();
        match dtype {
            Precision::F32 => Box::new(f32_run::run(dev.clone(), f32_run::net(&dev, init), config)),
            Precision::F64 => Box::new(f64_run::run(dev.clone(), f64_run::net(&dev, init), config)),
        }
    }

    /// The model nested once more: adapters `0.0` and `0.1`.
    fn renamed(init: &Init, config: Config, dtype: Precision) -> Box<dyn Holder> {
        let dev = dfdx::prelude::Cpu::default();
        match dtype {
            Precision::F32 => Box::new(f32_run::run(dev.clone(), (f32_run::net(&dev, init),), config)),
            Precision::F64 => Box::new(f64_run::run(dev.clone(), (f64_run::net(&dev, init),), config)),
        }
    }

    pub fn framework() -> Framework {
        Framework { name: "dfdx", build, renamed }
    }
}

#[cfg(feature = "burn")]
mod burn_side {
    use super::*;
    use burn::module::{Module, ModuleVisitor, Param, ParamId};
    use burn::nn::Linear;
    use burn::optim::GradientsParams;
    use burn::tensor::{DType, Device, Tensor, TensorData};
    use lora_mgpo::burn::{ndarray_device, BurnBackend, LoraLinear, MgpoOptimizer};

    type Net = (LoraLinear, LoraLinear);

    /// A burn model (moved through the optimizer by value) and its optimizer.
    pub struct Run<M> {
        model: Option<M>,
        opt: MgpoOptimizer,
        dtype: DType,
    }
    holder!(Run<Net>, BurnBackend);
    holder!(Run<Vec<Net>>, BurnBackend);

    fn device() -> Device {
        ndarray_device().clone().autodiff()
    }

    fn tensor<const D: usize>(v: &[f64], shape: [usize; D], dtype: DType) -> Tensor<D> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape).convert_dtype(dtype), (&device(), dtype))
    }

    /// burn's `Linear` stores W0 as in x out.
    fn net(init: &Init, dtype: DType) -> Net {
        let layer = |l: &LayerInit| {
            let weight = Param::from_tensor(tensor(&transpose(&l.w0, l.out, l.inp), [l.inp, l.out], dtype));
            let base = Linear { weight, bias: Some(Param::from_tensor(tensor(&l.bias, [l.out], dtype))) };
            LoraLinear::from_parts(base, tensor(&l.a, [R, l.inp], dtype), tensor(&l.b, [l.out, R], dtype), scale(), 0.0).expect("burn layer")
        };
        (layer(&init.0[0]), layer(&init.0[1]))
    }

    fn dtype_of(dtype: Dtype) -> DType {
        if dtype == Dtype::F32 { DType::F32 } else { DType::F64 }
    }

    /// The values of the parameters `ids`, in that order.
    struct Values<'a>(&'a [ParamId], Vec<Vec<f64>>);

    impl ModuleVisitor for Values<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(i) = self.0.iter().position(|&id| id == p.id) {
                self.1[i] = p.val().try_to_vec_as::<f64>().expect("host values");
            }
        }
    }

    impl Side for Run<Net> {
        fn train(&mut self, batch: &Batch) {
            let model = self.opt.perturb(self.model.take().expect("the model")).expect("burn perturb");
            let (x, y) = (tensor(&batch.x, [BATCH, IN], self.dtype), tensor(&batch.y, [BATCH, OUT], self.dtype));
            let loss = (model.1.forward(model.0.forward(x)) - y).square().mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let lr = self.opt.lr();
            self.model = Some(self.opt.step(lr, model, grads).expect("burn step"));
        }

        fn params(&self) -> Vec<Vec<f64>> {
            let mut v = Values(self.opt.param_ids(), vec![Vec::new(); self.opt.param_ids().len()]);
            self.model.as_ref().expect("the model").visit(&mut v);
            v.1
        }
    }

    fn build(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Side> {
        let model = net(init, dtype_of(dtype));
        let opt = MgpoOptimizer::builder(config).lora(&model.0).lora(&model.1).build(&model).expect("burn optimizer");
        Box::new(Run { model: Some(model), opt, dtype: dtype_of(dtype) })
    }

    /// The model in a one-element `Vec`: adapters `0.0` and `0.1`.
    fn renamed(init: &Init, config: Config, dtype: Dtype) -> Box<dyn Holder> {
        let model = vec![net(init, dtype_of(dtype))];
        let opt = MgpoOptimizer::builder(config).lora(&model[0].0).lora(&model[0].1).build(&model).expect("burn optimizer");
        Box::new(Run { model: Some(model), opt, dtype: dtype_of(dtype) })
    }

    pub fn framework() -> Framework {
        Framework { name: "burn", build, renamed }
    }
}
