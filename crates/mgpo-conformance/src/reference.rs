//! An independent float64 reference of [the spec](mgpo_core::spec), written for clarity,
//! not speed: the weight-space direction D_i = s_i (m_B A + B m_A) and the
//! gradient image are materialised as out x in matrices, the perturbation
//! is removed by restoring a saved clean copy, and the Gaussian direction's
//! z(seed, i) is computed here from the spec's definition. It shares no code
//! with mgpo-core's algorithm (only the `Config` type), and its own test
//! runs it on every conformance vector.

use mgpo_core::{Config, Perturbation, Scope, Space};

use crate::vector::Vector;

/// A row-major matrix (plain tensors of any shape are stored as 1 x n).
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The entries, row-major.
    pub data: Vec<f64>,
}

impl Mat {
    /// A `rows` x `cols` matrix of row-major `data` (panics unless it holds rows cols entries: the reference is test code fed by this crate).
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(rows * cols, data.len(), "reference matrix data");
        Mat { rows, cols, data }
    }
    fn zeros(rows: usize, cols: usize) -> Self {
        Mat::new(rows, cols, vec![0.0; rows * cols])
    }
    fn matmul(&self, o: &Mat) -> Mat {
        assert_eq!(self.cols, o.rows);
        let mut out = Mat::zeros(self.rows, o.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let x = self.data[i * self.cols + k];
                for j in 0..o.cols {
                    out.data[i * o.cols + j] += x * o.data[k * o.cols + j];
                }
            }
        }
        out
    }
    fn add(&self, o: &Mat) -> Mat {
        Mat::new(self.rows, self.cols, self.data.iter().zip(&o.data).map(|(a, b)| a + b).collect())
    }
    fn scaled(&self, c: f64) -> Mat {
        Mat::new(self.rows, self.cols, self.data.iter().map(|x| c * x).collect())
    }
    fn sq(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum()
    }
}

/// One adapter: indices of A and B among the trainable tensors, scaling, W0.
#[derive(Debug, Clone)]
pub struct RefAdapter {
    /// The adapter's name.
    pub name: String,
    /// Index of A among the trainable tensors.
    pub a: usize,
    /// Index of B among the trainable tensors.
    pub b: usize,
    /// alpha / r.
    pub scale: f64,
    /// W0 (weight space only), updated in place by perturb and step.
    pub w0: Option<Mat>,
}

/// The float64 reference optimizer, holding its own copy of every tensor.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The configuration.
    pub config: Config,
    /// The trainable tensors, in layout order.
    pub params: Vec<Mat>,
    /// Their names (`<adapter>.a`, `<adapter>.b`, plain names).
    pub names: Vec<String>,
    /// The adapters.
    pub adapters: Vec<RefAdapter>,
    /// Trainable tensors outside adapters.
    pub plain: Vec<usize>,
    /// Per trainable tensor: its parameter group's lr multiplier and weight
    /// decay (1 and the config's weight decay in the default group).
    pub lr_scale: Vec<f64>,
    /// See `lr_scale`.
    pub weight_decay: Vec<f64>,
    /// AdamW's first moment per trainable tensor.
    pub m: Vec<Mat>,
    /// AdamW's second moment per trainable tensor.
    pub v: Vec<Mat>,
    /// Steps taken (skipped steps excluded).
    pub t: u64,
    /// g_bar per group, groups as [`Reference::group_names`].
    pub g_bar: Vec<Option<f64>>,
    /// What the last perturb added: per trainable tensor and per W0.
    pub added: Vec<Mat>,
    /// What the last perturb added to each W0 (weight space).
    pub added_w0: Vec<Option<Mat>>,
    clean: Option<(Vec<Mat>, Vec<Option<Mat>>)>,
}

/// What the groups are: for each, (name, adapters in it, plain tensors in it).
fn groups(config: &Config, adapters: &[RefAdapter], plain: &[usize], names: &[String]) -> Vec<(String, Vec<usize>, Vec<usize>)> {
    let plain_in = config.space == Space::Adapter;
    match config.scope {
        Scope::Global => vec![("global".into(), (0..adapters.len()).collect(), if plain_in { plain.to_vec() } else { vec![] })],
        Scope::PerAdapter => {
            let mut g: Vec<_> = adapters.iter().enumerate().map(|(i, a)| (a.name.clone(), vec![i], vec![])).collect();
            if plain_in {
                g.extend(plain.iter().map(|&p| (names[p].clone(), vec![], vec![p])));
            }
            g
        }
    }
}

impl Reference {
    /// A reference at step 0: `params` named `names`, `adapters` over them, `plain` the indices of the trainable tensors outside adapters, zero moments, one parameter group per scope.
    pub fn new(config: Config, params: Vec<Mat>, names: Vec<String>, adapters: Vec<RefAdapter>, plain: Vec<usize>) -> Self {
        let n_groups = groups(&config, &adapters, &plain, &names).len();
        let zeros: Vec<Mat> = params.iter().map(|p| Mat::zeros(p.rows, p.cols)).collect();
        Reference {
            lr_scale: vec![1.0; params.len()],
            weight_decay: vec![config.adamw.weight_decay; params.len()],
            config,
            m: zeros.clone(),
            v: zeros.clone(),
            added: zeros,
            added_w0: adapters.iter().map(|_| None).collect(),
            params,
            names,
            adapters,
            plain,
            t: 0,
            g_bar: vec![None; n_groups],
            clean: None,
        }
    }

    /// The reference of a vector: its adapters, plain tensors and parameter groups.
    pub fn from_vector(v: &Vector) -> Self {
        let mut params = Vec::new();
        let mut ads = Vec::new();
        for (i, a) in v.adapters.iter().enumerate() {
            params.push(Mat::new(a.a.shape[0], a.a.shape[1], a.a.data.clone()));
            params.push(Mat::new(a.b.shape[0], a.b.shape[1], a.b.data.clone()));
            let w0 = a.w0.as_ref().filter(|_| v.config.space == Space::Weight).map(|w| Mat::new(w.shape[0], w.shape[1], w.data.clone()));
            ads.push(RefAdapter { name: a.name.clone(), a: 2 * i, b: 2 * i + 1, scale: v.scale(i), w0 });
        }
        for p in &v.plain {
            params.push(Mat::new(1, p.tensor.data.len(), p.tensor.data.clone()));
        }
        let plain = (2 * v.adapters.len()..params.len()).collect();
        let names = v.tensor_names();
        let mut r = Reference::new(v.config, params, names.clone(), ads, plain);
        for (i, n) in names.iter().enumerate() {
            let (lr_scale, wd) = v.param_group_of(n);
            r.set_param_group(i, lr_scale, wd);
        }
        r
    }

    /// Puts trainable tensor `i` in a parameter group: it steps with lr *
    /// `lr_scale` and weight decay `weight_decay`.
    pub fn set_param_group(&mut self, i: usize, lr_scale: f64, weight_decay: f64) {
        self.lr_scale[i] = lr_scale;
        self.weight_decay[i] = weight_decay;
    }

    /// The groups' names, in g_bar's order: `global`, or one per adapter (and per plain tensor in adapter space).
    pub fn group_names(&self) -> Vec<String> {
        groups(&self.config, &self.adapters, &self.plain, &self.names).into_iter().map(|g| g.0).collect()
    }

    /// [the spec](mgpo_core::spec), step 1 (perturb).
    pub fn perturb(&mut self) {
        let c = self.config;
        self.clean = Some((self.params.clone(), self.adapters.iter().map(|a| a.w0.clone()).collect()));
        for a in self.added.iter_mut() {
            a.data.iter_mut().for_each(|x| *x = 0.0);
        }
        self.added_w0 = self.adapters.iter().map(|_| None).collect();
        if self.t == 0 {
            return;
        }
        let gs = groups(&c, &self.adapters, &self.plain, &self.names);
        for (gi, (_, ads, plain)) in gs.iter().enumerate() {
            let mut d: Vec<(usize, Mat)> = Vec::new();
            let mut dw: Vec<(usize, Mat)> = Vec::new();
            match c.space {
                Space::Adapter => {
                    let tensors = ads.iter().flat_map(|&i| [self.adapters[i].a, self.adapters[i].b]).chain(plain.iter().copied());
                    for t in tensors {
                        let dir = match c.perturbation {
                            Perturbation::Momentum => self.m[t].clone(),
                            Perturbation::Gaussian { seed } => {
                                let p = &self.params[t];
                                let s = tensor_seed(seed, self.t + 1, t as u64);
                                Mat::new(p.rows, p.cols, (0..p.data.len() as u64).map(|i| gaussian(s, i)).collect())
                            }
                        };
                        d.push((t, dir));
                    }
                }
                Space::Weight => {
                    for &i in ads {
                        let ad = &self.adapters[i];
                        let (a, b) = (&self.params[ad.a], &self.params[ad.b]);
                        let dd = self.m[ad.b].matmul(a).add(&b.matmul(&self.m[ad.a])).scaled(ad.scale);
                        dw.push((i, dd));
                    }
                }
            }
            let n = d.iter().chain(&dw).map(|(_, x)| x.sq()).sum::<f64>().sqrt();
            if n <= c.eps {
                continue;
            }
            let mut k = match (c.adaptive_norm, self.g_bar[gi]) {
                (true, Some(g)) => 1.0 / (g + c.eps),
                _ => 1.0,
            };
            if let Some(cap) = c.max_inv_scale {
                k = k.min(cap);
            }
            let coef = c.direction.sign() * c.rho * k / (n + c.eps);
            for (t, x) in d {
                let e = x.scaled(coef);
                self.params[t] = self.params[t].add(&e);
                self.added[t] = e;
            }
            for (i, x) in dw {
                let e = x.scaled(coef);
                let w = self.adapters[i].w0.as_ref().expect("weight space needs W0");
                self.adapters[i].w0 = Some(w.add(&e));
                self.added_w0[i] = Some(e);
            }
        }
    }

    /// [the spec](mgpo_core::spec), step 3 (step). Returns whether the step was skipped.
    pub fn step(&mut self, grads: &[Mat], lr: f64) -> bool {
        let c = self.config;
        if let Some((p, w)) = self.clean.take() {
            self.params = p;
            for (ad, w) in self.adapters.iter_mut().zip(w) {
                ad.w0 = w;
            }
        }
        if grads.iter().any(|g| g.data.iter().any(|x| !x.is_finite())) {
            return true;
        }
        let gs = groups(&c, &self.adapters, &self.plain, &self.names);
        for (gi, (_, ads, plain)) in gs.iter().enumerate() {
            let sq: f64 = match c.space {
                Space::Adapter => {
                    ads.iter().flat_map(|&i| [self.adapters[i].a, self.adapters[i].b]).chain(plain.iter().copied()).map(|t| grads[t].sq()).sum()
                }
                Space::Weight => ads
                    .iter()
                    .map(|&i| {
                        let ad = &self.adapters[i];
                        let (a, b) = (&self.params[ad.a], &self.params[ad.b]);
                        grads[ad.b].matmul(a).add(&b.matmul(&grads[ad.a])).scaled(ad.scale).sq()
                    })
                    .sum(),
            };
            let n = sq.sqrt();
            self.g_bar[gi] = Some(match self.g_bar[gi] {
                None => n,
                Some(g) => c.beta * g + (1.0 - c.beta) * n,
            });
        }
        let total = grads.iter().map(Mat::sq).sum::<f64>().sqrt();
        let clip = match c.max_grad_norm {
            Some(mx) => (mx / (total + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.t += 1;
        let a = c.adamw;
        let bc1 = 1.0 - a.beta1.powi(self.t as i32);
        let bc2 = 1.0 - a.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            let (lr, wd) = (lr * self.lr_scale[i], self.weight_decay[i]);
            let (p, m, v) = (&mut self.params[i], &mut self.m[i], &mut self.v[i]);
            for j in 0..p.data.len() {
                let g = g.data[j] * clip;
                p.data[j] *= 1.0 - lr * wd;
                m.data[j] = a.beta1 * m.data[j] + (1.0 - a.beta1) * g;
                v.data[j] = a.beta2 * v.data[j] + (1.0 - a.beta2) * g * g;
                p.data[j] -= (lr / bc1) * m.data[j] / (v.data[j].sqrt() / bc2.sqrt() + a.eps);
            }
        }
        false
    }
}

/// splitmix64's finaliser ([the spec](mgpo_core::spec), "The Gaussian direction").
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// z(seed, i): Box-Muller on two uniforms hashed from (seed, i).
fn gaussian(seed: u64, i: u64) -> f64 {
    let h = mix(seed ^ mix(i.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    let u1 = ((h >> 11) as f64 + 0.5) / 9_007_199_254_740_992.0;
    let u2 = (mix(h) >> 11) as f64 / 9_007_199_254_740_992.0;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The seed of tensor t's noise at the step that will be AdamW step `step`.
fn tensor_seed(seed: u64, step: u64, t: u64) -> u64 {
    mix(mix(seed ^ step.wrapping_mul(0xd1b5_4a32_d192_ed03)) ^ t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::{TensorData, Tolerance};

    struct Check<'a> {
        tol: Tolerance,
        ctx: &'a str,
        compared: usize,
    }

    impl Check<'_> {
        fn values(&mut self, what: &str, got: &[f64], want: &TensorData) {
            assert_eq!(got.len(), want.data.len(), "{} {what}: length", self.ctx);
            for (j, (x, y)) in got.iter().zip(&want.data).enumerate() {
                assert!(self.tol.accepts(*x, *y), "{} {what}[{j}]: {x:e} vs {y:e} (tolerance {:?})", self.ctx, self.tol);
            }
            self.compared += got.len();
        }
    }

    /// The reference reproduces every embedded vector within the vector's
    /// own f64 tolerance, every quantity the vector states: it is as
    /// trustworthy as the independent generator, and the f64 tolerances
    /// are reachable by an f64 implementation that sums in another order.
    #[test]
    fn reference_passes_every_vector() {
        let mut n_vectors = 0;
        for (name, v) in crate::vectors::all() {
            let tol = v.tolerances.f64;
            let mut r = Reference::from_vector(&v);
            let groups = r.group_names();
            assert_eq!(groups, v.group_names(), "{name}");
            let n_ad = v.adapters.len();
            let mut compared = 0;
            for (k, s) in v.steps.iter().enumerate() {
                let ctx = format!("{name} step {}", k + 1);
                let mut c = Check { tol, ctx: &ctx, compared: 0 };
                r.perturb();
                for (i, a) in v.adapters.iter().enumerate() {
                    let Some(e) = s.expect.perturbation.get(&a.name) else { continue };
                    let w0 = r.added_w0[i].as_ref().map_or_else(|| vec![0.0; a.b.shape[0] * a.a.shape[1]], |m| m.data.clone());
                    for (got, want, part) in [(&r.added[2 * i].data, &e.a, "a"), (&r.added[2 * i + 1].data, &e.b, "b"), (&w0, &e.w0, "w0")] {
                        if let Some(want) = want {
                            c.values(&format!("perturbation {}.{part}", a.name), got, want);
                        }
                    }
                }
                for (j, p) in v.plain.iter().enumerate() {
                    if let Some(want) = s.expect.plain_perturbation.get(&p.name) {
                        c.values(&format!("plain_perturbation {}", p.name), &r.added[2 * n_ad + j].data, want);
                    }
                }
                let mut grads = Vec::new();
                for a in &v.adapters {
                    let g = &s.grads[&a.name];
                    grads.push(Mat::new(g.a.shape[0], g.a.shape[1], g.a.data.clone()));
                    grads.push(Mat::new(g.b.shape[0], g.b.shape[1], g.b.data.clone()));
                }
                for p in &v.plain {
                    grads.push(Mat::new(1, p.tensor.data.len(), s.plain_grads[&p.name].data.clone()));
                }
                let skipped = r.step(&grads, s.lr.unwrap_or(v.config.adamw.lr));
                assert_eq!(skipped, s.expect.skipped, "{ctx}");
                for (i, a) in v.adapters.iter().enumerate() {
                    if let Some(e) = s.expect.params.get(&a.name) {
                        c.values(&format!("{}.a", a.name), &r.params[2 * i].data, &e.a);
                        c.values(&format!("{}.b", a.name), &r.params[2 * i + 1].data, &e.b);
                    }
                    if let Some(e) = s.expect.w0.get(&a.name) {
                        c.values(&format!("{}.w0", a.name), &r.adapters[i].w0.as_ref().expect("weight space").data, e);
                    }
                }
                for (j, p) in v.plain.iter().enumerate() {
                    if let Some(e) = s.expect.plain_params.get(&p.name) {
                        c.values(&p.name, &r.params[2 * n_ad + j].data, e);
                    }
                }
                for (key, want) in &s.expect.grad_norm_ema {
                    let gi = groups.iter().position(|g| g == key).unwrap_or_else(|| panic!("{ctx}: group {key}"));
                    match (r.g_bar[gi], want) {
                        (Some(x), Some(w)) => assert!(tol.accepts(x, w.0), "{ctx} g_bar[{key}] {x:e} vs {:e}", w.0),
                        (None, None) => {}
                        (x, w) => panic!("{ctx}: g_bar {x:?} vs {w:?}"),
                    }
                }
                compared += c.compared;
            }
            assert!(compared > 0, "{name}: nothing compared");
            n_vectors += 1;
        }
        assert!(n_vectors >= 30, "only {n_vectors} embedded vectors");
    }

    /// The reference's z(seed, i) and per-tensor seeds, written from the
    /// spec, give the bits mgpo-core's noise gives.
    #[test]
    fn noise_matches_the_core_bit_for_bit() {
        for seed in [0u64, 7, 12345, u64::MAX, 1 << 63] {
            for i in [0u64, 1, 2, 8191, 8192, 9999, u64::MAX] {
                assert_eq!(gaussian(seed, i).to_bits(), mgpo_core::backend::noise::gaussian(seed, i).to_bits(), "z({seed}, {i})");
            }
            for (step, t) in [(1u64, 0u64), (2, 1), (3, 2), (1 << 40, 5)] {
                assert_eq!(tensor_seed(seed, step, t), mgpo_core::backend::noise::tensor_seed(seed, step, t as usize));
            }
        }
    }

    /// A parameter group changes exactly what the spec says: lr_g = lr
    /// lr_scale, decay 1 - lr_g wd_g.
    #[test]
    fn param_group_scales_lr_and_replaces_weight_decay() {
        let mut config = Config::adamw(mgpo_core::AdamWConfig { lr: 0.1, weight_decay: 0.3, ..Default::default() });
        config.rho = 0.0;
        let p = || vec![Mat::new(1, 2, vec![1.0, -2.0]), Mat::new(1, 2, vec![1.0, -2.0])];
        let mut r = Reference::new(config, p(), vec!["x".into(), "y".into()], vec![], vec![0, 1]);
        r.set_param_group(1, 0.5, 0.0);
        let g = vec![Mat::new(1, 2, vec![0.5, 0.25]), Mat::new(1, 2, vec![0.5, 0.25])];
        r.perturb();
        assert!(!r.step(&g, 0.1));
        // t = 1: m / (sqrt(v) / sqrt(1 - beta2) + eps) = sign(g) (up to eps), step size lr / (1 - beta1) * (1 - beta1)
        for (j, x0) in [1.0f64, -2.0].into_iter().enumerate() {
            let default = x0 * (1.0 - 0.1 * 0.3) - 0.1;
            let grouped = x0 - 0.05;
            assert!((r.params[0].data[j] - default).abs() < 1e-7, "{}", r.params[0].data[j]);
            assert!((r.params[1].data[j] - grouped).abs() < 1e-7, "{}", r.params[1].data[j]);
        }
    }
}
