//! Helpers of the integration tests: deterministic tensors and their values.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};

/// Deterministic values in [-1, 1) (splitmix64).
pub fn det(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            2.0 * ((z >> 11) as f64 / (1u64 << 53) as f64) - 1.0
        })
        .collect()
}

/// A tensor of `shape` with the values of [`det`], in `dtype`.
pub fn tensor(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Tensor::from_vec(det(shape.iter().product(), seed), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// A variable holding [`tensor`].
pub fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
    Var::from_tensor(&tensor(shape, seed, dtype)).unwrap()
}

/// The values of `t`, row-major, in f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}
