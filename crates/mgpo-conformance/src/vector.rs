//! The conformance-vector format of SPEC.md: parsing, with the string forms
//! "NaN", "Infinity" and "-Infinity" of non-finite numbers, and checks that
//! a vector is self-consistent before it is run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mgpo_core::{Config, Space};
use serde::{Deserialize, Deserializer};

/// A row-major tensor in float64.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TensorData {
    pub shape: Vec<usize>,
    #[serde(deserialize_with = "de_numbers")]
    pub data: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdapterData {
    pub name: String,
    pub alpha: f64,
    pub rank: usize,
    pub a: TensorData,
    pub b: TensorData,
    #[serde(default)]
    pub w0: Option<TensorData>,
}

/// Gradients (or expected values) of one adapter's A and B.
#[derive(Debug, Clone, Deserialize)]
pub struct Pair {
    pub a: TensorData,
    pub b: TensorData,
}

/// What step 1 of a step added: `a`/`b` in adapter space, `w0` in weight space.
#[derive(Debug, Clone, Deserialize)]
pub struct PerturbationData {
    #[serde(default)]
    pub a: Option<TensorData>,
    #[serde(default)]
    pub b: Option<TensorData>,
    #[serde(default)]
    pub w0: Option<TensorData>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Expect {
    pub skipped: bool,
    #[serde(default)]
    pub perturbation: BTreeMap<String, PerturbationData>,
    pub params: BTreeMap<String, Pair>,
    #[serde(default)]
    pub w0: BTreeMap<String, TensorData>,
    #[serde(default)]
    pub grad_norm_ema: BTreeMap<String, Option<Number>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepData {
    #[serde(default)]
    pub lr: Option<f64>,
    pub grads: BTreeMap<String, Pair>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    /// |x - ref| <= atol + rtol |ref|, with non-finite values equal only to themselves.
    pub fn accepts(&self, x: f64, reference: f64) -> bool {
        if !reference.is_finite() || !x.is_finite() {
            return x == reference || (x.is_nan() && reference.is_nan());
        }
        (x - reference).abs() <= self.atol + self.rtol * reference.abs()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Vector {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub config: Config,
    pub adapters: Vec<AdapterData>,
    pub steps: Vec<StepData>,
    pub tolerance: Tolerance,
}

/// A JSON number or one of the strings SPEC uses for non-finite numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            F(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::F(x) => Ok(Number(x)),
            Raw::S(s) => match s.as_str() {
                "NaN" => Ok(Number(f64::NAN)),
                "Infinity" => Ok(Number(f64::INFINITY)),
                "-Infinity" => Ok(Number(f64::NEG_INFINITY)),
                other => Err(serde::de::Error::custom(format!("not a number: {other:?}"))),
            },
        }
    }
}

fn de_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Number>::deserialize(d)?.into_iter().map(|n| n.0).collect())
}

impl Vector {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Vector = serde_json::from_str(text).map_err(|e| format!("invalid vector JSON: {e}"))?;
        v.validate()?;
        Ok(v)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        Self::from_json(&text)
    }

    /// Scaling s = alpha / r of adapter `i`.
    pub fn scale(&self, i: usize) -> f64 {
        self.adapters[i].alpha / self.adapters[i].rank as f64
    }

    /// Every tensor's data fits its shape, every step has every gradient of
    /// the right shape, and weight space has every W0.
    fn validate(&self) -> Result<(), String> {
        self.config.validate().map_err(|e| e.to_string())?;
        let check = |what: &str, t: &TensorData, shape: &[usize]| -> Result<(), String> {
            let n: usize = t.shape.iter().product();
            if t.data.len() != n {
                return Err(format!("{what}: shape {:?} needs {n} values, has {}", t.shape, t.data.len()));
            }
            if t.shape != shape {
                return Err(format!("{what}: shape {:?}, expected {shape:?}", t.shape));
            }
            Ok(())
        };
        for ad in &self.adapters {
            let (r, fan_in, fan_out) = (ad.rank, ad.a.shape.get(1).copied().unwrap_or(0), ad.b.shape.first().copied().unwrap_or(0));
            check(&format!("{}.a", ad.name), &ad.a, &[r, fan_in])?;
            check(&format!("{}.b", ad.name), &ad.b, &[fan_out, r])?;
            match (&ad.w0, self.config.space) {
                (Some(w), _) => check(&format!("{}.w0", ad.name), w, &[fan_out, fan_in])?,
                (None, Space::Weight) => return Err(format!("adapter {}: weight space needs w0", ad.name)),
                (None, Space::Adapter) => {}
            }
            for (k, s) in self.steps.iter().enumerate() {
                let g = s.grads.get(&ad.name).ok_or_else(|| format!("step {}: no gradient for {}", k + 1, ad.name))?;
                check(&format!("step {} grad {}.a", k + 1, ad.name), &g.a, &ad.a.shape)?;
                check(&format!("step {} grad {}.b", k + 1, ad.name), &g.b, &ad.b.shape)?;
            }
        }
        Ok(())
    }
}

/// Every `*.json` file of `dir`, sorted by name, each parsed or with the
/// reason it could not be.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, Result<Vector, String>)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("{}: no *.json vectors", dir.display()));
    }
    Ok(paths.into_iter().map(|p| {
        let v = Vector::load(&p);
        (p, v)
    }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_non_finite_strings_and_rejects_others() {
        let t: TensorData = serde_json::from_str(r#"{"shape": [3], "data": [1.5, "NaN", "-Infinity"]}"#).unwrap();
        assert_eq!(t.data[0], 1.5);
        assert!(t.data[1].is_nan());
        assert_eq!(t.data[2], f64::NEG_INFINITY);
        assert!(serde_json::from_str::<TensorData>(r#"{"shape": [1], "data": ["nan"]}"#).is_err());
    }

    #[test]
    fn tolerance_is_spec_formula() {
        let t = Tolerance { rtol: 1e-4, atol: 1e-6 };
        assert!(t.accepts(1.0001, 1.0));
        assert!(!t.accepts(1.0002, 1.0));
        assert!(t.accepts(f64::NAN, f64::NAN));
        assert!(!t.accepts(1.0, f64::NAN));
        assert!(!t.accepts(f64::INFINITY, f64::NEG_INFINITY));
    }
}
