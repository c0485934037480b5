//! Every compiled backend against every other, step by step, and
//! checkpoints moving between them. `cargo test --all-features` (the
//! README's test command) compiles all of them in.

use lora_mgpo::checkpoint::FORMAT;
use lora_mgpo::ndarray::NdBackend;
use lora_mgpo::backend::{HostIo, TensorOps};
use mgpo_conformance::props::{case_strategy, check_agree, Case, CaseRun};
use proptest::prelude::*;

/// Runs `$body` with `$b` bound to each compiled backend of one precision,
/// as a (name, backend) pair.
macro_rules! each_backend {
    ($f:ident, $ctor:ident, $b:ident => $body:expr) => {{
        let $b = ("ndarray", NdBackend::<$f>::new());
        $body;
        #[cfg(feature = "dfdx")]
        {
            let $b = ("dfdx", lora_mgpo::dfdx::$ctor());
            $body;
        }
        #[cfg(feature = "candle")]
        {
            let $b = ("candle", lora_mgpo::candle::$ctor());
            $body;
        }
        #[cfg(feature = "tch")]
        {
            let $b = ("tch", lora_mgpo::tch::$ctor());
            $body;
        }
        #[cfg(feature = "burn")]
        {
            let $b = ("burn", lora_mgpo::burn::$ctor());
            $body;
        }
    }};
}

fn agree_with_ndarray<B: TensorOps + HostIo + Clone>(name: &str, be: &B, reference: &NdBackend<impl lora_mgpo::ndarray::Element>, case: &Case) -> Result<(), TestCaseError> {
    check_agree(be, reference, case).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn all_backends_agree_f64(case in case_strategy()) {
        let reference = NdBackend::<f64>::new();
        each_backend!(f64, cpu_f64, b => agree_with_ndarray(b.0, &b.1, &reference, &case)?);
    }

    /// The random-direction baseline draws the same noise on every backend.
    #[test]
    fn all_backends_agree_gaussian(mut case in case_strategy(), seed in any::<u64>()) {
        case.config.space = lora_mgpo::Space::Adapter;
        case.config.perturbation = lora_mgpo::Perturbation::Gaussian { seed };
        let reference = NdBackend::<f64>::new();
        each_backend!(f64, cpu_f64, b => agree_with_ndarray(b.0, &b.1, &reference, &case)?);
    }

    #[test]
    fn all_backends_agree_f32(case in case_strategy()) {
        let reference = NdBackend::<f32>::new();
        each_backend!(f32, cpu_f32, b => agree_with_ndarray(b.0, &b.1, &reference, &case)?);
    }
}

/// N steps on backend X, checkpoint, load on backend Y, N more steps: the
/// same parameters as N + N steps on Y alone, within f64 rounding.
fn resume_across<X, Y>(x: &X, y: &Y, case: &Case) -> Result<(), String>
where
    X: TensorOps + HostIo + Clone,
    Y: TensorOps + HostIo + Clone,
{
    let n = case.steps.len();
    let mut straight = CaseRun::new(y, case)?;
    for s in case.steps.iter().chain(&case.steps) {
        straight.full_step(s)?;
    }
    let mut first = CaseRun::new(x, case)?;
    for s in &case.steps {
        first.full_step(s)?;
    }
    let bytes = first.opt.checkpoint_bytes().map_err(|e| e.to_string())?;
    let mut second = CaseRun::new(y, case)?;
    second.opt.load_checkpoint_bytes(&bytes).map_err(|e| e.to_string())?;
    let (p, f) = first.host_tensors()?;
    for ((_, t), d) in second.tensors.iter_mut().zip(p.iter().chain(&f)) {
        *t = y.from_f64(&y.shape(t), d).map_err(|e| e.to_string())?;
    }
    for s in &case.steps {
        second.full_step(s)?;
    }
    let (a, b) = (straight.host_tensors()?, second.host_tensors()?);
    for (u, v) in a.0.iter().flatten().zip(b.0.iter().flatten()).chain(a.1.iter().flatten().zip(b.1.iter().flatten())) {
        if (u - v).abs() > 1e-9 * (1.0 + v.abs()) {
            return Err(format!("after resume over {n}+{n} steps: {u} vs {v}"));
        }
    }
    Ok(())
}

#[test]
fn checkpoints_move_between_backends() {
    assert_eq!(FORMAT, "lora-mgpo-optimizer");
    for seed in 0..24 {
        let case = Case::from_seed(seed);
        let nd = NdBackend::<f64>::new();
        each_backend!(f64, cpu_f64, b => {
            resume_across(&b.1, &nd, &case).unwrap_or_else(|e| panic!("seed {seed}: {} -> ndarray: {e}", b.0));
            resume_across(&nd, &b.1, &case).unwrap_or_else(|e| panic!("seed {seed}: ndarray -> {}: {e}", b.0));
        });
    }
}

/// On one backend, N steps + checkpoint + N steps is bit-identical to 2N
/// steps: parameters, W0 and g_bar.
fn resume_is_exact<B: TensorOps + HostIo + Clone>(be: &B, case: &Case) -> Result<(), String> {
    let mut straight = CaseRun::new(be, case)?;
    for s in case.steps.iter().chain(&case.steps) {
        straight.full_step(s)?;
    }
    let mut resumed = CaseRun::new(be, case)?;
    for s in &case.steps {
        resumed.full_step(s)?;
    }
    let bytes = resumed.opt.checkpoint_bytes().map_err(|e| e.to_string())?;
    let tensors = std::mem::take(&mut resumed.tensors);
    resumed = CaseRun::new(be, case)?;
    resumed.tensors = tensors;
    resumed.opt.load_checkpoint_bytes(&bytes).map_err(|e| e.to_string())?;
    for s in &case.steps {
        resumed.full_step(s)?;
    }
    let bits = |r: &CaseRun<B>| -> Result<Vec<u64>, String> {
        let (p, f) = r.host_tensors()?;
        let g = r.opt.state().g_bar.iter().map(|g| g.map_or(u64::MAX, f64::to_bits));
        Ok(p.iter().chain(&f).flatten().map(|x| x.to_bits()).chain(g).collect())
    };
    if bits(&straight)? != bits(&resumed)? {
        return Err("resumed run differs from the straight one".into());
    }
    if straight.opt.state().step != resumed.opt.state().step {
        return Err("step counts differ".into());
    }
    Ok(())
}

#[test]
fn resume_is_bit_identical_on_every_backend() {
    for seed in 100..132 {
        let case = Case::from_seed(seed);
        each_backend!(f32, cpu_f32, b => resume_is_exact(&b.1, &case).unwrap_or_else(|e| panic!("seed {seed} on {} f32: {e}", b.0)));
        each_backend!(f64, cpu_f64, b => resume_is_exact(&b.1, &case).unwrap_or_else(|e| panic!("seed {seed} on {} f64: {e}", b.0)));
    }
}
