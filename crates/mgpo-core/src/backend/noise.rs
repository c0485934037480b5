//! Counter-based Gaussian noise for the random-direction baseline (the
//! paper's Table 4 ablation): z_i is a pure function of (seed, i), so every
//! backend draws the same numbers, in parallel, and the perturbation can be
//! removed by drawing them again instead of keeping a buffer.

/// splitmix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A standard normal z(seed, index) (Box-Muller on two hashed uniforms).
#[inline(always)]
pub fn gaussian(seed: u64, index: u64) -> f64 {
    let h = mix(seed ^ mix(index.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    let u1 = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = (mix(h) >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The seed of tensor `tensor` at step `step` under the configured seed.
pub fn tensor_seed(seed: u64, step: u64, tensor: usize) -> u64 {
    mix(mix(seed ^ step.wrapping_mul(0xd1b5_4a32_d192_ed03)) ^ tensor as u64)
}

/// sum_i z(seed, i)^2 for i < n: the squared norm of the noise of an
/// n-element tensor, computed on the host so backends need only draw it.
pub fn sum_sq(seed: u64, n: usize) -> f64 {
    (0..n as u64).map(|i| gaussian(seed, i).powi(2)).sum()
}

/// y <- y + alpha z(seed) for backends that draw the noise on the host: a
/// tensor-sized buffer per call, acceptable for this ablation baseline but
/// not for a hot path (the CPU paths of ndarray, candle and dfdx draw in
/// place with [`super::cpu::axpy_noise`]).
pub fn axpy_noise_via_host<B>(be: &B, y: &mut B::Tensor, alpha: f64, seed: u64) -> crate::Result<()>
where
    B: super::FusedUpdate + super::HostIo,
{
    let shape = be.shape(y);
    let n: usize = shape.iter().product();
    let z: Vec<f64> = (0..n as u64).map(|i| gaussian(seed, i)).collect();
    let z = be.from_f64(&shape, &z)?;
    be.axpy(y, alpha, &z)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_standard_normal_and_deterministic() {
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| gaussian(42, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        assert_eq!(gaussian(42, 7), xs[7]);
        assert_ne!(gaussian(43, 7), xs[7]);
        assert_ne!(tensor_seed(1, 2, 0), tensor_seed(1, 2, 1));
        assert_ne!(tensor_seed(1, 2, 0), tensor_seed(1, 3, 0));
    }
}
