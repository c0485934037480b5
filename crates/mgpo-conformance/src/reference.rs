//! An independent float64 reference of SPEC.md, written for clarity, not
//! speed: the weight-space direction D_i = s_i (m_B A + B m_A) and the
//! gradient image are materialised as out x in matrices, and the
//! perturbation is removed by restoring a saved clean copy. It shares no
//! code with mgpo-core's algorithm (only the `Config` type), and its own
//! test runs it on every conformance vector.

use mgpo_core::{Config, Scope, Space};

/// A row-major matrix (plain tensors of any shape are stored as 1 x n).
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
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
    pub name: String,
    pub a: usize,
    pub b: usize,
    pub scale: f64,
    pub w0: Option<Mat>,
}

/// The float64 reference optimizer, holding its own copy of every tensor.
#[derive(Debug, Clone)]
pub struct Reference {
    pub config: Config,
    pub params: Vec<Mat>,
    pub names: Vec<String>,
    pub adapters: Vec<RefAdapter>,
    /// Trainable tensors outside adapters.
    pub plain: Vec<usize>,
    pub m: Vec<Mat>,
    pub v: Vec<Mat>,
    pub t: u64,
    /// g_bar per group, groups as [`Reference::group_names`].
    pub g_bar: Vec<Option<f64>>,
    /// What the last perturb added: per trainable tensor and per W0.
    pub added: Vec<Mat>,
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
    pub fn new(config: Config, params: Vec<Mat>, names: Vec<String>, adapters: Vec<RefAdapter>, plain: Vec<usize>) -> Self {
        let n_groups = groups(&config, &adapters, &plain, &names).len();
        let zeros: Vec<Mat> = params.iter().map(|p| Mat::zeros(p.rows, p.cols)).collect();
        Reference {
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

    pub fn group_names(&self) -> Vec<String> {
        groups(&self.config, &self.adapters, &self.plain, &self.names).into_iter().map(|g| g.0).collect()
    }

    /// SPEC step 1.
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
                    for &i in ads {
                        d.push((self.adapters[i].a, self.m[self.adapters[i].a].clone()));
                        d.push((self.adapters[i].b, self.m[self.adapters[i].b].clone()));
                    }
                    for &p in plain {
                        d.push((p, self.m[p].clone()));
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

    /// SPEC step 3. Returns whether the step was skipped.
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
            let (p, m, v) = (&mut self.params[i], &mut self.m[i], &mut self.v[i]);
            for j in 0..p.data.len() {
                let g = g.data[j] * clip;
                p.data[j] *= 1.0 - lr * a.weight_decay;
                m.data[j] = a.beta1 * m.data[j] + (1.0 - a.beta1) * g;
                v.data[j] = a.beta2 * v.data[j] + (1.0 - a.beta2) * g * g;
                p.data[j] -= (lr / bc1) * m.data[j] / (v.data[j].sqrt() / bc2.sqrt() + a.eps);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_dir, project_vectors_dir, shared_vectors_dir, Tolerance};

    /// The reference reproduces every vector: it is as trustworthy as they are.
    #[test]
    fn reference_passes_every_vector() {
        let tol = Tolerance { rtol: 1e-9, atol: 1e-12 };
        for dir in [project_vectors_dir(), shared_vectors_dir()] {
            for (path, v) in load_dir(&dir).unwrap() {
                let v = v.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let mut params = Vec::new();
                let mut names = Vec::new();
                let mut ads = Vec::new();
                for (i, a) in v.adapters.iter().enumerate() {
                    params.push(Mat::new(a.a.shape[0], a.a.shape[1], a.a.data.clone()));
                    params.push(Mat::new(a.b.shape[0], a.b.shape[1], a.b.data.clone()));
                    names.extend([format!("{}.a", a.name), format!("{}.b", a.name)]);
                    let w0 = a.w0.as_ref().map(|w| Mat::new(w.shape[0], w.shape[1], w.data.clone()));
                    ads.push(RefAdapter { name: a.name.clone(), a: 2 * i, b: 2 * i + 1, scale: v.scale(i), w0 });
                }
                let mut r = Reference::new(v.config, params, names, ads, vec![]);
                let groups = r.group_names();
                for (k, s) in v.steps.iter().enumerate() {
                    r.perturb();
                    let grads: Vec<Mat> = v
                        .adapters
                        .iter()
                        .flat_map(|a| {
                            let g = &s.grads[&a.name];
                            [Mat::new(g.a.shape[0], g.a.shape[1], g.a.data.clone()), Mat::new(g.b.shape[0], g.b.shape[1], g.b.data.clone())]
                        })
                        .collect();
                    let skipped = r.step(&grads, s.lr.unwrap_or(v.config.adamw.lr));
                    let ctx = format!("{} step {}", path.display(), k + 1);
                    assert_eq!(skipped, s.expect.skipped, "{ctx}");
                    for (i, a) in v.adapters.iter().enumerate() {
                        let e = &s.expect.params[&a.name];
                        for (got, want) in [(&r.params[2 * i], &e.a), (&r.params[2 * i + 1], &e.b)] {
                            for (x, y) in got.data.iter().zip(&want.data) {
                                assert!(tol.accepts(*x, *y), "{ctx} {}: {x} vs {y}", a.name);
                            }
                        }
                    }
                    for (key, want) in &s.expect.grad_norm_ema {
                        let gi = groups.iter().position(|g| g == key).unwrap_or_else(|| panic!("{ctx}: group {key}"));
                        match (r.g_bar[gi], want) {
                            (Some(x), Some(w)) => assert!(tol.accepts(x, w.0), "{ctx} g_bar {x} vs {}", w.0),
                            (None, None) => {}
                            (x, w) => panic!("{ctx}: g_bar {x:?} vs {w:?}"),
                        }
                    }
                }
            }
        }
    }
}
