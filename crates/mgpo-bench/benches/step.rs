//! Criterion benches of the optimizer step on ndarray (and on candle, tch,
//! dfdx with this crate's features of the same names): AdamW, MGPO in
//! adapter space and in weight space (factored) on LoRA tensor sets of 1e4,
//! 1e6 and 1e7 f32 parameters, the in-place streaming kernel that bounds
//! them, and the weight-space work of one 4096 x 4096 adapter at r = 8.
//!
//! `cargo bench -p mgpo-bench` (add `-- step/1e6` to filter). Criterion
//! reports throughput in parameters per second; `mgpo bench` gives the same
//! measurements with GB/s, the fraction of the bound and the PyTorch peer.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mgpo_bench::sizes::{label, LoraShape};
use mgpo_bench::step::{StepBench, Variant};
use mgpo_bench::stream::Stream;
use mgpo_bench::weight::{Materialised, RankDecomposed};
use mgpo_core::{HostIo, TensorOps};

fn sizes() -> Vec<usize> {
    // MGPO_BENCH_PARAMS=1e4,1e6 to run fewer sizes.
    std::env::var("MGPO_BENCH_PARAMS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| mgpo_bench::sizes::parse_count(x).ok()).collect())
        .unwrap_or_else(|| vec![10_000, 1_000_000, 10_000_000])
}

fn backend_steps<B: TensorOps + HostIo>(c: &mut Criterion, name: &str, be: impl Fn() -> B) {
    for n in sizes() {
        let shape = LoraShape::for_params(n);
        let mut g = c.benchmark_group(format!("step/{}", label(n)));
        g.throughput(Throughput::Elements(shape.params() as u64));
        if n >= 1_000_000 {
            g.sample_size(20);
        }
        for v in [Variant::Adamw, Variant::MgpoAdapter, Variant::MgpoWeight] {
            let mut b = StepBench::new(be(), shape, v).expect("benchmark setup");
            g.bench_function(BenchmarkId::new(name, v.name()), |bch| bch.iter(|| b.step().expect("step")));
        }
        g.finish();
    }
}

fn steps(c: &mut Criterion) {
    for n in sizes() {
        let shape = LoraShape::for_params(n);
        let mut g = c.benchmark_group(format!("step/{}", label(n)));
        g.throughput(Throughput::Elements(shape.params() as u64));
        let mut s = Stream::new(shape.params());
        s.calibrate(3);
        g.bench_function("stream/in-place-bound", |b| b.iter(|| s.pass()));
        g.finish();
    }
    backend_steps(c, "ndarray", mgpo_ndarray::NdBackend::<f32>::new);
    #[cfg(feature = "candle")]
    backend_steps(c, "candle", mgpo_candle::cpu_f32);
    #[cfg(feature = "tch")]
    backend_steps(c, "tch", mgpo_tch::cpu_f32);
    #[cfg(feature = "dfdx")]
    backend_steps(c, "dfdx", mgpo_dfdx::cpu_f32);
}

fn weight(c: &mut Criterion) {
    let (d, r) = (4096, 8);
    let mut g = c.benchmark_group(format!("weight/{d}x{d}-r{r}"));
    g.sample_size(10);
    let mut ours = RankDecomposed::new(mgpo_ndarray::NdBackend::<f32>::new(), d, d, r).expect("setup");
    g.bench_function("ndarray/rank-decomposed-in-place", |b| b.iter(|| ours.in_place().expect("in place")));
    g.bench_function("ndarray/rank-decomposed-norms", |b| b.iter(|| ours.norms().expect("norms")));
    let mut mat = Materialised::new(d, d, r);
    g.bench_function("ndarray/materialised-authors", |b| b.iter(|| mat.step().expect("step")));
    g.finish();
}

criterion_group!(benches, steps, weight);
criterion_main!(benches);
