//! The weight-space perturbation of one adapter with its W0 (out x in):
//! what the optimizer computes per step besides AdamW, three ways.
//!
//! - **rank-decomposed** (this project, any backend): the direction norm
//!   ||s (m_B A + B m_A)|| and the gradient-image norm ||s (g_B A + B g_A)||
//!   through r x r Gram matrices (`mgpo_core::lowrank`), and, with W0 in
//!   place, `add_low_rank(+c)` at `perturb` and `add_low_rank(-c)` at
//!   `step`. In factored form (the LoRA layers of candle, tch, dfdx) only
//!   the norms remain: the layer adds c (m_B (A x) + B (m_A x)) instead.
//! - **materialised** (the authors' trainer, `lora_mgpo/trainer.py`,
//!   written with ndarray here and with PyTorch in `benches/peers`): per
//!   step the out x in direction is built and normed at perturb time,
//!   scaled into a second out x in perturbation and added to W0, built
//!   again to subtract it after the backward pass, and the gradient image
//!   is built to take its norm.

use mgpo_core::backend::{HostIo, TensorOps};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, Zip};
use rayon::prelude::*;

use crate::step::filled;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// rho of the trainer presets, and a fixed 1 / g_bar.
const RHO: f64 = 0.05;
const INV_SCALE: f64 = 2.0;

/// The tensors of one adapter: W0 (out x in), A and m_A, g_A (r x in),
/// B and m_B, g_B (out x r), as f64 host values.
struct Host {
    w: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    ma: Vec<f64>,
    mb: Vec<f64>,
    ga: Vec<f64>,
    gb: Vec<f64>,
}

fn host(out: usize, inn: usize, r: usize) -> Host {
    Host {
        w: filled(out * inn, 11, 0.02),
        a: filled(r * inn, 12, 1.0 / (inn as f64).sqrt()),
        b: filled(out * r, 13, 0.01),
        ma: filled(r * inn, 14, 1e-3),
        mb: filled(out * r, 15, 1e-3),
        ga: filled(r * inn, 16, 1e-3),
        gb: filled(out * r, 17, 1e-3),
    }
}

/// The rank-decomposed computation on backend `B`.
pub struct RankDecomposed<B: TensorOps + HostIo> {
    be: B,
    w: B::Tensor,
    a: B::Tensor,
    b: B::Tensor,
    ma: B::Tensor,
    mb: B::Tensor,
    ga: B::Tensor,
    gb: B::Tensor,
    scale: f64,
}

impl<B: TensorOps + HostIo> RankDecomposed<B> {
    /// One adapter, W0 out x inn and rank `rank`, with deterministic values, on `be`.
    pub fn new(be: B, out: usize, inn: usize, rank: usize) -> Result<Self, String> {
        let h = host(out, inn, rank);
        let t = |shape: &[usize], d: &[f64]| be.from_f64(shape, d).map_err(err);
        Ok(RankDecomposed {
            w: t(&[out, inn], &h.w)?,
            a: t(&[rank, inn], &h.a)?,
            b: t(&[out, rank], &h.b)?,
            ma: t(&[rank, inn], &h.ma)?,
            mb: t(&[out, rank], &h.mb)?,
            ga: t(&[rank, inn], &h.ga)?,
            gb: t(&[out, rank], &h.gb)?,
            scale: 2.0,
            be,
        })
    }

    /// Both norms of a step: (||s (m_B A + B m_A)||, ||s (g_B A + B g_A)||).
    pub fn norms(&self) -> Result<(f64, f64), String> {
        let s2 = self.scale * self.scale;
        let d = s2 * self.be.low_rank_norm_sq(&self.mb, &self.a, &self.b, &self.ma).map_err(err)?;
        let g = s2 * self.be.low_rank_norm_sq(&self.gb, &self.a, &self.b, &self.ga).map_err(err)?;
        Ok((d.sqrt(), g.sqrt()))
    }

    /// A whole step's weight-space work with W0 in place: the norms, the
    /// perturbation added (`perturb`) and subtracted (`step`).
    pub fn in_place(&mut self) -> Result<(), String> {
        let (n, _) = self.norms()?;
        let c = -RHO * INV_SCALE / (n + 1e-12) * self.scale;
        self.be.add_low_rank(&mut self.w, c, &self.mb, &self.a, &self.b, &self.ma).map_err(err)?;
        self.be.add_low_rank(&mut self.w, -c, &self.mb, &self.a, &self.b, &self.ma).map_err(err)
    }

    /// W0 as f64, to check what a run did to it.
    pub fn w0(&self) -> Result<Vec<f64>, String> {
        self.be.to_f64(&self.w).map_err(err)
    }
}

fn arr(shape: (usize, usize), d: &[f64]) -> Array2<f32> {
    Array2::from_shape_vec(shape, d.iter().map(|&x| x as f32).collect()).expect("length matches shape")
}

fn sum_sq(x: &Array2<f32>) -> f64 {
    x.as_slice().expect("standard layout").par_chunks(1 << 13).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).sum()
}

/// The authors' materialised computation, with ndarray (matrixmultiply
/// GEMMs, rayon element-wise passes).
pub struct Materialised {
    w: Array2<f32>,
    a: Array2<f32>,
    b: Array2<f32>,
    ma: Array2<f32>,
    mb: Array2<f32>,
    ga: Array2<f32>,
    gb: Array2<f32>,
    scale: f32,
}

impl Materialised {
    /// One adapter, W0 out x inn and rank `rank`, with deterministic values (the same as [`RankDecomposed::new`]).
    pub fn new(out: usize, inn: usize, rank: usize) -> Materialised {
        let h = host(out, inn, rank);
        Materialised {
            w: arr((out, inn), &h.w),
            a: arr((rank, inn), &h.a),
            b: arr((out, rank), &h.b),
            ma: arr((rank, inn), &h.ma),
            mb: arr((out, rank), &h.mb),
            ga: arr((rank, inn), &h.ga),
            gb: arr((out, rank), &h.gb),
            scale: 2.0,
        }
    }

    /// s (P Q + R S) as a new out x in matrix.
    fn image(&self, p: &Array2<f32>, q: &Array2<f32>, r: &Array2<f32>, s: &Array2<f32>) -> Array2<f32> {
        let mut d = Array2::zeros((p.nrows(), q.ncols()));
        general_mat_mul(self.scale, p, q, 0.0, &mut d);
        general_mat_mul(self.scale, r, s, 1.0, &mut d);
        d
    }

    /// The trainer's `_compute_mgpo_perturbation`: the direction, its
    /// finiteness and norm, and the scaled perturbation (a new matrix).
    fn perturbation(&self) -> Option<Array2<f32>> {
        let d = self.image(&self.mb, &self.a, &self.b, &self.ma);
        if !d.as_slice().expect("standard layout").par_iter().all(|x| x.is_finite()) {
            return None;
        }
        let n = sum_sq(&d).sqrt();
        let c = (-RHO / (n + 1e-12) * INV_SCALE) as f32;
        let mut e = Array2::zeros(d.raw_dim());
        Zip::from(&mut e).and(&d).par_for_each(|e, &d| *e = c * d);
        Some(e)
    }

    /// One step's weight-space work as the trainer does it.
    pub fn step(&mut self) -> Result<(), String> {
        let e = self.perturbation().ok_or("non-finite direction")?;
        Zip::from(&mut self.w).and(&e).par_for_each(|w, &e| *w += e);
        drop(e);
        let e = self.perturbation().ok_or("non-finite direction")?;
        Zip::from(&mut self.w).and(&e).par_for_each(|w, &e| *w -= e);
        drop(e);
        let g = self.image(&self.gb, &self.a, &self.b, &self.ga);
        std::hint::black_box(sum_sq(&g).sqrt());
        Ok(())
    }

    /// Only the two norms, materialised (for the norms-only comparison).
    pub fn norms(&self) -> (f64, f64) {
        let d = self.image(&self.mb, &self.a, &self.b, &self.ma);
        let nd = sum_sq(&d).sqrt();
        drop(d);
        let g = self.image(&self.gb, &self.a, &self.b, &self.ga);
        (nd, sum_sq(&g).sqrt())
    }

    /// s (m_B A + B m_A), materialised: the exact value the norms check against.
    pub fn direction(&self) -> Vec<f32> {
        self.image(&self.mb, &self.a, &self.b, &self.ma).into_raw_vec_and_offset().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpo_ndarray::NdBackend;

    /// The Gram norms equal the norms of the materialised matrices, and an
    /// in-place perturb/unperturb round trip gives W0 back within rounding.
    #[test]
    fn three_ways_agree() {
        let _lock = crate::test_lock();
        let (out, inn, r) = (96, 80, 4);
        let mut rd = RankDecomposed::new(NdBackend::<f32>::new(), out, inn, r).unwrap();
        let mat = Materialised::new(out, inn, r);
        let (a, b) = rd.norms().unwrap();
        let (c, d) = mat.norms();
        assert!((a - c).abs() <= 1e-5 * c && (b - d).abs() <= 1e-5 * d, "{a} {c} {b} {d}");
        let exact: f64 = mat.direction().iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((a - exact).abs() <= 1e-5 * exact);
        let w0 = rd.w0().unwrap();
        rd.in_place().unwrap();
        let w1 = rd.w0().unwrap();
        assert!(w0.iter().zip(&w1).all(|(x, y)| (x - y).abs() < 1e-6));
        let mut m = Materialised::new(out, inn, r);
        m.step().unwrap();
        assert!(m.w.iter().zip(&w0).all(|(&x, y)| (x as f64 - y).abs() < 1e-6));
    }
}
