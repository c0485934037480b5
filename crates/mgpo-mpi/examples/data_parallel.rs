//! Data-parallel LoRA-MGPO fine-tuning of an MLP on ndarray, over MPI,
//! with the optimizer whole on every rank or sharded (ZeRO stage 1).
//!
//! Every rank builds the network (frozen base weights, a LoRA adapter on
//! every linear layer) and the optimizer, starts from rank 0's parameters
//! (broadcast), takes its share of each global batch, computes the gradient
//! of (sum of its examples' losses) / (global batch size) by hand-written
//! backpropagation, and sums the gradients across ranks in buckets; every
//! rank then takes the same MGPO step. The data are synthetic (a fixed random teacher labels uniform
//! inputs), generated from the example index, so every process count sees
//! the same global batches.
//!
//! Built as the binary `mgpo-data-parallel` (feature `example`):
//!
//! ```text
//! cargo build --release -p mgpo-mpi --features example
//! mpirun -np 4 target/release/mgpo-data-parallel --steps 20    (flags for one machine: docs/distributed.md)
//! target/release/mgpo-data-parallel --single --steps 20        (one process, no MPI)
//! ```
//!
//! Options: `--dtype f32|f64`, `--preset NAME` (mgpo_core::Config::preset),
//! `--lr X`, `--steps N`, `--batch N` (global), `--widths 64,128,128,10`
//! (the demo network's shape), `--rank R` (LoRA rank; 0 trains every weight
//! matrix in full instead, as plain tensors), `--bucket-elems N`,
//! `--warmup N` (steps left out of the timings), `--time-wait` (a barrier
//! before the gradient all-reduce, to time apart the wait for the slowest
//! rank and the transfer), `--fail-rank R` (rank R fails in its second
//! step, as a failing forward pass would: the job must end, not hang),
//! `--all-reduce native|scatter-gather` (mgpo_mpi::AllReduce), `--out FILE`
//! (rank 0 writes every rank's final tensors there: for each rank, its
//! trainable tensors then its base weights, as little-endian f64),
//! `--zero` (sharded optimizer state, ZeRO stage 1: mgpo_mpi::Zero instead
//! of the all-reduce), `--exact` (rank 0 takes the whole batch and the
//! others contribute zero gradients, so that the summed gradient is exact
//! and a run must equal one process bit for bit), `--save-at K --ckpt DIR`
//! (after step K, a single-process optimizer checkpoint DIR/opt.safetensors,
//! gathered from the shards under `--zero`, and the tensors DIR/params.bin),
//! `--resume DIR` (start from such a checkpoint, sharded or not), `--groups`
//! (AdamW parameter groups: fc1 at half the learning rate, no decay). Rank 0
//! prints one JSON line with the losses, the timings and the bytes
//! communicated.

use std::error::Error;
use std::time::Instant;

use mgpo_core::{Config, Layout, OneProcess, ParamGroup, PartialSums, Space};
use mgpo_mpi::{shard_range, AllReduce, Buf, BufMut, Collective, CollectiveSums, CommStats, DataParallel, MpiComm, Scalar, SingleProcess, Zero, DEFAULT_BUCKET_ELEMS};
use mgpo_ndarray::Element;
use ndarray::{linalg::general_mat_mul, Array1, Array2, ArrayD, ArrayView2, ArrayViewMut2, Axis, Ix2, IxDyn};

type Res<T> = Result<T, Box<dyn Error>>;

/// Every call into the optimizer, in one place.
mod optimizer {
    use mgpo_core::{Config, Layout, Mgpo, PartialSums, StepReport};
    use mgpo_ndarray::{Element, NdBackend};
    use ndarray::ArrayD;

    /// The optimizer of one rank: sharded over `sums`' ranks (ZeRO-1), or
    /// whole with [`mgpo_core::OneProcess`].
    pub type Opt<F, S> = Mgpo<NdBackend<F>, S>;

    pub fn build<F: Element, S: PartialSums>(config: Config, layout: Layout, sums: S) -> mgpo_core::Result<Opt<F, S>> {
        Mgpo::sharded(NdBackend::new(), config, layout, sums)
    }

    /// The layout's names (trainable tensors, then W0s), which every call checks.
    fn names<F: Element, S: PartialSums>(opt: &Opt<F, S>) -> Vec<String> {
        opt.layout().names().map(str::to_string).collect()
    }

    pub fn perturb<F: Element, S: PartialSums>(opt: &mut Opt<F, S>, params: &mut [ArrayD<F>], frozen: &mut [ArrayD<F>]) -> mgpo_core::Result<()> {
        let names = names(opt);
        let mut named: Vec<(&str, &mut ArrayD<F>)> = names.iter().map(String::as_str).zip(params.iter_mut().chain(frozen.iter_mut())).collect();
        opt.perturb(&mut named)
    }

    pub fn step<F: Element, S: PartialSums>(opt: &mut Opt<F, S>, params: &mut [ArrayD<F>], frozen: &mut [ArrayD<F>], grads: &[ArrayD<F>]) -> mgpo_core::Result<StepReport> {
        let names = names(opt);
        let grads: Vec<(&str, &ArrayD<F>)> = names.iter().map(String::as_str).zip(grads).collect();
        let mut named: Vec<(&str, &mut ArrayD<F>)> = names.iter().map(String::as_str).zip(params.iter_mut().chain(frozen.iter_mut())).collect();
        opt.step(&mut named, &grads)
    }
}

struct Args {
    single: bool,
    dtype: String,
    preset: String,
    lr: f64,
    steps: usize,
    batch: usize,
    widths: Vec<usize>,
    rank: usize,
    bucket_elems: usize,
    warmup: usize,
    time_wait: bool,
    fail_rank: Option<usize>,
    all_reduce: AllReduce,
    out: Option<String>,
    zero: bool,
    exact: bool,
    groups: bool,
    save_at: Option<usize>,
    ckpt: Option<String>,
    resume: Option<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        single: false,
        dtype: "f32".into(),
        preset: "paper-nlu".into(),
        lr: 5e-3,
        steps: 20,
        batch: 64,
        widths: vec![64, 128, 128, 10],
        rank: 8,
        bucket_elems: DEFAULT_BUCKET_ELEMS,
        warmup: 2,
        time_wait: false,
        fail_rank: None,
        all_reduce: AllReduce::Native,
        out: None,
        zero: false,
        exact: false,
        groups: false,
        save_at: None,
        ckpt: None,
        resume: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if ["--single", "--time-wait", "--zero", "--exact", "--groups"].contains(&flag.as_str()) {
            a.groups |= flag == "--groups";
            a.single |= flag == "--single";
            a.time_wait |= flag == "--time-wait";
            a.zero |= flag == "--zero";
            a.exact |= flag == "--exact";
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dtype" => a.dtype = v,
            "--preset" => a.preset = v,
            "--lr" => a.lr = v.parse()?,
            "--steps" => a.steps = v.parse()?,
            "--batch" => a.batch = v.parse()?,
            "--widths" => a.widths = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--rank" => a.rank = v.parse()?,
            "--bucket-elems" => a.bucket_elems = v.parse()?,
            "--warmup" => a.warmup = v.parse()?,
            "--out" => a.out = Some(v),
            "--fail-rank" => a.fail_rank = Some(v.parse()?),
            "--save-at" => a.save_at = Some(v.parse()?),
            "--ckpt" => a.ckpt = Some(v),
            "--resume" => a.resume = Some(v),
            "--all-reduce" => {
                a.all_reduce = match v.as_str() {
                    "native" => AllReduce::Native,
                    "scatter-gather" => AllReduce::ScatterGather,
                    _ => return Err(format!("--all-reduce must be native or scatter-gather, got {v}").into()),
                }
            }
            _ => return Err(format!("unknown option {flag}").into()),
        }
    }
    if a.widths.len() < 2 || a.widths.contains(&0) {
        return Err(format!("--widths needs at least two non-zero widths, got {:?}", a.widths).into());
    }
    if a.batch == 0 || a.steps == 0 {
        return Err("--batch and --steps must be at least 1".into());
    }
    if a.save_at.is_some() && a.ckpt.is_none() {
        return Err("--save-at needs --ckpt DIR".into());
    }
    Ok(a)
}

/// splitmix64 of (seed, a, b) as a uniform value in [-1, 1).
fn uniform(seed: u64, a: u64, b: u64) -> f64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

fn filled<F: Element>(shape: &[usize], seed: u64, bound: f64) -> ArrayD<F> {
    let cols = *shape.last().unwrap_or(&1) as u64;
    let mut k = 0u64;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        k += 1;
        F::from(bound * uniform(seed, (k - 1) / cols, (k - 1) % cols)).unwrap_or_else(F::nan)
    })
}

/// The synthetic task: example `i` is x_i ~ U(-1, 1)^in, labelled by the
/// arg-max of a fixed random teacher T x_i.
struct Data {
    inp: usize,
    teacher: Vec<f64>,
    classes: usize,
}

impl Data {
    fn new(inp: usize, classes: usize) -> Self {
        let teacher = (0..classes * inp).map(|k| uniform(7, (k / inp) as u64, (k % inp) as u64)).collect();
        Data { inp, teacher, classes }
    }

    /// Examples `range` as (x, labels).
    fn batch<F: Element>(&self, range: std::ops::Range<usize>) -> (Array2<F>, Vec<usize>) {
        let n = range.len();
        let mut x = Array2::<F>::zeros((n, self.inp));
        let mut labels = Vec::with_capacity(n);
        for (row, i) in range.enumerate() {
            let xi: Vec<f64> = (0..self.inp).map(|j| uniform(11, i as u64, j as u64)).collect();
            for (j, &v) in xi.iter().enumerate() {
                x[[row, j]] = F::from(v).unwrap_or_else(F::nan);
            }
            let score = |c: usize| xi.iter().zip(&self.teacher[c * self.inp..]).map(|(a, b)| a * b).sum::<f64>();
            labels.push((0..self.classes).max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap_or(0));
        }
        (x, labels)
    }
}

/// The network: `widths.len() - 1` linear layers, ReLU between them. With
/// LoRA (rank r > 0) layer l computes y = x W0^T + b + s (x A^T) B^T with W0
/// and b frozen, A (r x in) and B (out x r) trained, s = alpha / r; in full
/// fine-tuning it computes y = x W^T + b with W trained.
struct Net<F> {
    widths: Vec<usize>,
    rank: usize,
    scale: F,
    bias: Vec<Array1<F>>,
}

const ALPHA: f64 = 16.0;

/// A new network with its trainable tensors, base weights and layout.
type Built<F> = (Net<F>, Vec<ArrayD<F>>, Vec<ArrayD<F>>, Layout);

fn m2<F>(t: &ArrayD<F>) -> Res<ArrayView2<'_, F>> {
    Ok(t.view().into_dimensionality::<Ix2>()?)
}

fn g2<F>(t: &mut ArrayD<F>) -> Res<ArrayViewMut2<'_, F>> {
    Ok(t.view_mut().into_dimensionality::<Ix2>()?)
}

impl<F: Element> Net<F> {
    fn layers(&self) -> usize {
        self.widths.len() - 1
    }

    /// The network, its trainable tensors, its frozen base weights and the
    /// optimizer's layout (W0 registered when the preset perturbs in weight
    /// space). The adapters are drawn from `init_seed`, as a program whose
    /// ranks seed their generators differently would; the base weights are
    /// the same everywhere, as if loaded from one checkpoint.
    fn new(widths: &[usize], rank: usize, space: Space, init_seed: u64, groups: bool) -> Res<Built<F>> {
        let mut layout = Layout::builder();
        let (mut params, mut frozen, mut bias) = (Vec::new(), Vec::new(), Vec::new());
        for l in 0..widths.len() - 1 {
            let (inp, out) = (widths[l], widths[l + 1]);
            let bound = 1.0 / (inp as f64).sqrt();
            let w0 = filled::<F>(&[out, inp], 100 + l as u64, bound);
            bias.push(filled::<F>(&[out], 200 + l as u64, bound).into_dimensionality()?);
            let name = format!("fc{}", l + 1);
            if rank > 0 {
                params.push(filled::<F>(&[rank, inp], init_seed + 300 + l as u64, bound));
                params.push(filled::<F>(&[out, rank], init_seed + 400 + l as u64, 0.02));
                frozen.push(w0);
                layout = layout.adapter(&name, ALPHA, &[rank, inp], &[out, rank], space == Space::Weight);
            } else {
                params.push(w0);
                layout = layout.plain(&name, &[out, inp]);
            }
        }
        if groups {
            // AdamW's parameter groups: the first layer at half the learning rate, without weight decay.
            layout = layout.param_group_where(ParamGroup::new("first").lr_scale(0.5).weight_decay(0.0), |n| n.starts_with("fc1"));
        }
        let scale = F::from(ALPHA / rank.max(1) as f64).unwrap_or_else(F::nan);
        Ok((Net { widths: widths.to_vec(), rank, scale, bias }, params, frozen, layout.build()?))
    }

    /// Forward and backward over a slice of the batch: writes into `grads`
    /// the gradient of (sum of the slice's cross-entropy losses) / `n_global`
    /// and returns that same quantity, in f64.
    fn loss_and_grads(&self, params: &[ArrayD<F>], frozen: &[ArrayD<F>], x: Array2<F>, labels: &[usize], n_global: usize, grads: &mut [ArrayD<F>]) -> Res<f64> {
        let lora = self.rank > 0;
        let base = |l: usize| if lora { m2(&frozen[l]) } else { m2(&params[l]) };
        let mut acts = vec![x];
        let mut us = Vec::new();
        for l in 0..self.layers() {
            let xin = &acts[l];
            let mut y = xin.dot(&base(l)?.t());
            if lora {
                let (a, b) = (m2(&params[2 * l])?, m2(&params[2 * l + 1])?);
                let u = xin.dot(&a.t());
                general_mat_mul(self.scale, &u, &b.t(), F::one(), &mut y);
                us.push(u);
            }
            for mut row in y.rows_mut() {
                row.zip_mut_with(&self.bias[l], |v, &b| *v = *v + b);
            }
            if l + 1 < self.layers() {
                y.mapv_inplace(|v| v.max(F::zero()));
            }
            acts.push(y);
        }

        let inv_n = F::from(1.0 / n_global as f64).unwrap_or_else(F::nan);
        let mut dy = acts.pop().ok_or("no layers")?;
        let mut loss = 0.0;
        for (mut row, &label) in dy.axis_iter_mut(Axis(0)).zip(labels) {
            let max = row.fold(F::neg_infinity(), |m, &v| m.max(v));
            let lse = max + row.iter().map(|&v| (v - max).exp()).fold(F::zero(), |s, e| s + e).ln();
            loss += (lse - row[label]).to_f64().unwrap_or(f64::NAN);
            row.mapv_inplace(|v| (v - lse).exp() * inv_n);
            row[label] = row[label] - inv_n;
        }

        for l in (0..self.layers()).rev() {
            let xin = &acts[l];
            let mut dx = None;
            if lora {
                let (a, b) = (m2(&params[2 * l])?, m2(&params[2 * l + 1])?);
                let (ga, gb) = grads[2 * l..2 * l + 2].split_at_mut(1);
                general_mat_mul(self.scale, &dy.t(), &us[l], F::zero(), &mut g2(&mut gb[0])?);
                let dv = dy.dot(&b);
                general_mat_mul(self.scale, &dv.t(), xin, F::zero(), &mut g2(&mut ga[0])?);
                if l > 0 {
                    let mut d = dy.dot(&base(l)?);
                    general_mat_mul(self.scale, &dv, &a, F::one(), &mut d);
                    dx = Some(d);
                }
            } else {
                general_mat_mul(F::one(), &dy.t(), xin, F::zero(), &mut g2(&mut grads[l])?);
                if l > 0 {
                    dx = Some(dy.dot(&base(l)?));
                }
            }
            if let Some(mut d) = dx {
                d.zip_mut_with(xin, |g, &h| {
                    if h <= F::zero() {
                        *g = F::zero()
                    }
                });
                dy = d;
            }
        }
        Ok(loss / n_global as f64)
    }
}

/// CPU time of this process so far (user + system) in milliseconds, from
/// /proc/self/stat (Linux; clock ticks of 1/100 s); `None` elsewhere.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// Summed phase times of the timed steps, in milliseconds.
#[derive(Default)]
struct Clock {
    compute: f64,
    wait: f64,
    comm: f64,
    optimizer: f64,
    total: f64,
    steps: usize,
}

/// Both drivers' transfers so far.
fn traffic<C: Collective, F: Scalar>(dp: &DataParallel<C, F>, zero: &Option<Zero<C, F>>) -> CommStats {
    let (a, b) = (dp.stats(), zero.as_ref().map(Zero::stats).unwrap_or_default());
    CommStats { calls: a.calls + b.calls, elements: a.elements + b.elements, bytes: a.bytes + b.bytes }
}

/// The trainable tensors then the base weights, as little-endian f64.
fn tensors_bytes<F: Element>(params: &[ArrayD<F>], frozen: &[ArrayD<F>]) -> Vec<u8> {
    params.iter().chain(frozen).flat_map(|t| t.iter().map(|v| v.to_f64().unwrap_or(f64::NAN))).flat_map(f64::to_le_bytes).collect()
}

fn run<F: Element + Scalar, C: Collective, S: PartialSums>(comm: C, sums: S, args: &Args) -> Res<()> {
    let (rank, size) = (comm.rank(), comm.size());
    let config = Config::preset(&args.preset, args.lr).ok_or_else(|| format!("unknown preset {}; known: {:?}", args.preset, Config::PRESETS))?;
    let (net, mut params, mut frozen, layout) = Net::<F>::new(&args.widths, args.rank, config.space, 1000 * rank as u64, args.groups)?;
    let n_params = layout.num_params();
    let mut opt = optimizer::build::<F, S>(config, layout, sums)?;
    let mut grads: Vec<ArrayD<F>> = params.iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
    let mut dp = DataParallel::<_, F>::new(&comm, args.bucket_elems)?;
    // The ranks drew different adapters: start them all from rank 0's.
    dp.broadcast(&mut params, 0)?;
    dp.broadcast(&mut frozen, 0)?;
    let mut zero = if args.zero { Some(Zero::<_, F>::new(&comm, &opt, args.bucket_elems)?) } else { None };
    let data = Data::new(args.widths[0], *args.widths.last().unwrap_or(&1));

    let mut start = 0;
    if let Some(dir) = &args.resume {
        let dir = std::path::Path::new(dir);
        let bytes = std::fs::read(dir.join("params.bin"))?;
        let mut values = bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()));
        for t in params.iter_mut().chain(frozen.iter_mut()) {
            for x in t.iter_mut() {
                *x = F::from(values.next().ok_or("params.bin is too short")?).unwrap_or_else(F::nan);
            }
        }
        if values.next().is_some() {
            return Err("params.bin is too long".into());
        }
        opt.load_checkpoint(dir.join("opt.safetensors"))?;
        start = (opt.state().step + opt.state().skipped) as usize;
    }

    let mut losses = Vec::new();
    let mut clock = Clock::default();
    let mut stats_after_warmup = traffic(&dp, &zero);
    let mut cpu_after_warmup = None;
    for step in start..args.steps {
        if step == start + args.warmup {
            stats_after_warmup = traffic(&dp, &zero);
            cpu_after_warmup = cpu_ms();
        }
        let t0 = Instant::now();
        optimizer::perturb(&mut opt, &mut params, &mut frozen)?;
        let t1a = Instant::now();
        if let Some(z) = &mut zero {
            z.before_forward(&mut params)?;
        }
        let t1 = Instant::now();
        let first = step * args.batch;
        let mine = match args.exact {
            // One rank takes the whole batch and the others add zeros: the
            // sum is exact, so the runs must equal one process bit for bit.
            true if rank == 0 => 0..args.batch,
            true => 0..0,
            false => shard_range(args.batch, rank, size),
        };
        if args.fail_rank == Some(rank) && step == 1 {
            return Err(format!("rank {rank}: forward pass failed (--fail-rank)").into());
        }
        let mut loss = [0.0];
        if mine.is_empty() {
            grads.iter_mut().for_each(|g| g.fill(F::zero()));
        } else {
            let (x, labels) = data.batch::<F>(first + mine.start..first + mine.end);
            loss[0] = net.loss_and_grads(&params, &frozen, x, &labels, args.batch, &mut grads)?;
        }
        let t2 = Instant::now();
        if args.time_wait {
            comm.barrier()?;
        }
        let t2b = Instant::now();
        match &mut zero {
            Some(z) => z.reduce_scatter(&mut grads, 1.0)?,
            None => dp.all_reduce(&mut grads, 1.0)?,
        }
        let t3 = Instant::now();
        let report = optimizer::step(&mut opt, &mut params, &mut frozen, &grads)?;
        let t3b = Instant::now();
        if let Some(z) = &mut zero {
            z.after_step(&mut opt, &mut params)?;
        }
        let t4 = Instant::now();
        if report.skipped {
            return Err(format!("step {step} was skipped: non-finite gradients").into());
        }
        if step == start || step + 1 == args.steps {
            comm.all_reduce_partial_sums(&mut loss)?;
            losses.push(loss[0]);
        }
        if step >= start + args.warmup {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            clock.compute += ms(t1, t2);
            clock.wait += ms(t2, t2b);
            clock.comm += ms(t2b, t3) + ms(t1a, t1) + ms(t3b, t4);
            clock.optimizer += ms(t0, t1a) + ms(t3, t3b);
            clock.total += ms(t0, t4);
            clock.steps += 1;
        }
        if args.save_at == Some(step + 1) {
            let dir = std::path::Path::new(args.ckpt.as_deref().unwrap_or("."));
            std::fs::create_dir_all(dir)?;
            match &mut zero {
                Some(z) => {
                    // Adapter space: the tensors other ranks own are still perturbed here.
                    z.all_gather(&mut params)?;
                    z.save_checkpoint(&opt, &params, dir.join("opt.safetensors"))?
                }
                None if rank == 0 => opt.save_checkpoint(dir.join("opt.safetensors"))?,
                None => {}
            }
            if rank == 0 {
                std::fs::write(dir.join("params.bin"), tensors_bytes(&params, &frozen))?;
            }
            comm.barrier()?;
        }
    }

    let stats_at_end = traffic(&dp, &zero);
    if let Some(z) = &mut zero {
        // The clean parameters on every rank (adapter space: each rank's
        // copies of the tensors it does not own were last gathered perturbed).
        z.all_gather(&mut params)?;
    }
    let cpu_share = cpu_after_warmup.zip(cpu_ms()).map(|(a, b)| (b - a) / clock.total);
    // Every rank's final tensors, gathered on every rank, compared on rank 0.
    let mine: Vec<f64> = params.iter().chain(&frozen).flat_map(|t| t.iter().map(|v| v.to_f64().unwrap_or(f64::NAN))).collect();
    let mut all = vec![0.0; mine.len() * size];
    comm.all_gather(Buf::F64(&mine), BufMut::F64(&mut all))?;
    let identical = all.chunks(mine.len().max(1)).all(|r| r.iter().zip(&all[..mine.len()]).all(|(a, b)| a.to_bits() == b.to_bits()));

    // Per-rank compute time (imbalance and oversubscription show here) and
    // bytes of optimizer moments held.
    let mut per_rank = vec![0.0; 2 * size];
    let steps = clock.steps.max(1) as f64;
    per_rank[rank] = clock.compute / steps;
    per_rank[size + rank] = (opt.moment_elems() * std::mem::size_of::<F>()) as f64;
    comm.all_reduce_partial_sums(&mut per_rank)?;

    if rank == 0 {
        if let Some(path) = &args.out {
            let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(path, bytes)?;
        }
        let (now, before) = (stats_at_end, stats_after_warmup);
        let (timed, calls) = (now.bytes - before.bytes, now.calls - before.calls);
        // A reduce-scatter or all-gather sends (N - 1) / N of its buffer from
        // each rank, an all-reduce twice that.
        let sent_share = if args.zero { 1.0 } else { 2.0 } * (size - 1) as f64 / size as f64;
        let summary = serde_json::json!({
            "ranks": size,
            "mode": if args.zero { "zero1" } else { "data-parallel" },
            "dtype": args.dtype,
            "preset": args.preset,
            "trainable_params": n_params,
            "global_batch": args.batch,
            "steps": args.steps,
            "first_step": start,
            "loss_first": losses.first(),
            "loss_last": losses.last(),
            "identical_across_ranks": identical,
            "timed_steps": clock.steps,
            "step_ms": clock.total / steps,
            "compute_ms": clock.compute / steps,
            "wait_ms": clock.wait / steps,
            "comm_ms": clock.comm / steps,
            "optimizer_ms": clock.optimizer / steps,
            "compute_ms_per_rank": &per_rank[..size],
            "optimizer_bytes_per_rank": &per_rank[size..],
            "zero_block_elems": zero.as_ref().map(Zero::block_elems),
            "payload_bytes_per_step": timed as f64 / steps,
            "calls_per_step": calls as f64 / steps,
            "sent_bytes_per_rank_per_step": timed as f64 / steps * sent_share,
            "cpu_share_rank0": cpu_share,
            "samples_per_s": args.batch as f64 / (clock.total / steps / 1e3),
        });
        println!("{summary}");
    }
    Ok(())
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let f64 = match args.dtype.as_str() {
        "f32" => false,
        "f64" => true,
        d => return Err(format!("--dtype must be f32 or f64, got {d}").into()),
    };
    if args.single {
        return match (f64, args.zero) {
            (true, true) => run::<f64, _, _>(SingleProcess, CollectiveSums(SingleProcess), &args),
            (true, false) => run::<f64, _, _>(SingleProcess, OneProcess, &args),
            (false, true) => run::<f32, _, _>(SingleProcess, CollectiveSums(SingleProcess), &args),
            (false, false) => run::<f32, _, _>(SingleProcess, OneProcess, &args),
        };
    }
    let comm = MpiComm::init()?.with_all_reduce(args.all_reduce);
    let result = match (f64, args.zero) {
        (true, true) => run::<f64, _, _>(&comm, CollectiveSums(&comm), &args),
        (true, false) => run::<f64, _, _>(&comm, OneProcess, &args),
        (false, true) => run::<f32, _, _>(&comm, CollectiveSums(&comm), &args),
        (false, false) => run::<f32, _, _>(&comm, OneProcess, &args),
    };
    if let Err(e) = result {
        // Returning would leave the other ranks blocked in their next collective.
        eprintln!("rank {}: {e}", comm.rank());
        comm.abort(1);
    }
    Ok(())
}
