//! The built-in fine-tuning tasks. Each one is a base network trained on
//! one data distribution (cached as safetensors) and a shifted task its
//! adapters are fine-tuned on, all drawn deterministically from a task seed:
//!
//! - `digits-rot` (real data): the UCI handwritten digits. The base network
//!   learns upright digits from one half of the images; the adapters learn
//!   the other half's images rotated by a quarter turn (a change of input
//!   domain, same labels), from a small training set, and are evaluated on
//!   held-out rotated images.
//! - `teacher` (synthetic): Gaussian inputs labelled by a random ReLU
//!   teacher network. The base network learns teacher T0; the adapters
//!   learn T1 = T0 plus a rank-4 change of every layer, from 1000 samples
//!   with 10% of their labels replaced by random classes, and are evaluated
//!   on clean T1 labels.
//!
//! Each task's fine-tuning data is split, by the task seed, into a training
//! set and a validation split that selects the checkpoint whose test
//! accuracy is reported; the test set is never used to choose anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backend::candle::{pretrain, PretrainRecipe};
use crate::data::{digits, rotate90, split, Dataset, Teacher};
use crate::error::{Error, Result};
use crate::model::{BaseModel, CLASSES, DIMS, HIDDEN, INPUT};
use crate::rng::{derive, mix, Rng};

/// Names of the built-in tasks.
pub const TASKS: [&str; 2] = ["digits-rot", "teacher"];

/// A task: pre-training data for the base network, and the fine-tuning
/// train, validation and test sets.
#[derive(Debug, Clone)]
pub struct Task {
    /// The name `--task` selects it by.
    pub name: &'static str,
    /// One line on what it is, for listings.
    pub description: &'static str,
    /// Seed of the data, the splits and the base network.
    pub seed: u64,
    /// Data the base network is pre-trained on.
    pub pretrain: Dataset,
    /// Fine-tuning training set.
    pub train: Dataset,
    /// Held out from the fine-tuning data, fixed by the task seed.
    pub val: Dataset,
    /// Fine-tuning test set.
    pub test: Dataset,
    /// How the base network is pre-trained.
    pub recipe: PretrainRecipe,
}

/// Builds task `name` from `seed` (the data split, the teacher networks
/// and the base network's initialisation depend on it).
pub fn task(name: &str, seed: u64) -> Result<Task> {
    match name {
        "digits-rot" => Ok(digits_rot(seed)),
        "teacher" => Ok(teacher(seed)),
        _ => Err(Error::InvalidSpec(format!("unknown task `{name}`; one of {}", TASKS.join(", ")))),
    }
}

/// Splits fine-tuning data into (train, validation) of `n_val` samples, by `seed`.
fn hold_out(d: &Dataset, n_val: usize, seed: u64) -> (Dataset, Dataset) {
    let parts = split(d.len(), &[d.len() - n_val, n_val], &mut Rng::new(seed));
    (d.subset(&parts[0]), d.subset(&parts[1]))
}

fn digits_rot(seed: u64) -> Task {
    let all = digits();
    let mut rng = Rng::new(derive(seed, "digits-split"));
    let parts = split(all.len(), &[897, 400, 500], &mut rng);
    let rot = |d: Dataset| d.map_rows(rotate90);
    let (train, val) = hold_out(&rot(all.subset(&parts[1])), 100, derive(seed, "digits-val"));
    Task {
        name: "digits-rot",
        description: "UCI digits: base on upright digits, adapters on quarter-turned digits (300 train, 100 validation, 500 test)",
        seed,
        pretrain: all.subset(&parts[0]),
        train,
        val,
        test: rot(all.subset(&parts[2])),
        recipe: PretrainRecipe { epochs: 30, batch: 64, lr: 2e-3, weight_decay: 0.1 },
    }
}

fn teacher(seed: u64) -> Task {
    let mut rng = Rng::new(derive(seed, "teacher"));
    let t0 = Teacher::random(INPUT, 2 * HIDDEN, CLASSES, &mut rng);
    let t1 = t0.shifted(4, 0.3, &mut rng);
    let pretrain = t0.sample(4000, 0.0, &mut rng);
    let (train, val) = hold_out(&t1.sample(1200, 0.1, &mut rng), 200, derive(seed, "teacher-val"));
    Task {
        name: "teacher",
        description: "teacher network: base on teacher T0, adapters on T1 = T0 + rank-4 shift (1000 train and 200 validation with 10% label noise, 2000 clean test)",
        seed,
        pretrain,
        train,
        val,
        test: t1.sample(2000, 0.0, &mut rng),
        recipe: PretrainRecipe { epochs: 30, batch: 64, lr: 2e-3, weight_decay: 0.1 },
    }
}

impl Task {
    /// A key that changes whenever anything that determines the base
    /// network changes (task, seed, data, architecture, recipe).
    pub fn cache_key(&self) -> String {
        let mut h = derive(self.seed, self.name);
        let mut feed = |v: u64| h = mix(h ^ v);
        for &(o, i) in &DIMS {
            feed(o as u64);
            feed(i as u64);
        }
        for v in self.pretrain.x.iter().step_by(7) {
            feed(v.to_bits() as u64);
        }
        self.pretrain.y.iter().for_each(|&c| feed(c as u64));
        let r = &self.recipe;
        [r.epochs as u64, r.batch as u64, r.lr.to_bits(), r.weight_decay.to_bits()].into_iter().for_each(&mut feed);
        format!("{}-seed{}-{:016x}", self.name, self.seed, h)
    }

    /// The base network: loaded from `cache_dir` when cached, otherwise
    /// trained (deterministically) and cached there. Returns the model and
    /// whether it came from the cache.
    pub fn base_model(&self, cache_dir: &Path) -> Result<(BaseModel, bool)> {
        let path: PathBuf = cache_dir.join(format!("base-{}.safetensors", self.cache_key()));
        if path.exists() {
            if let Ok(m) = BaseModel::load(&path) {
                return Ok((m, true));
            }
        }
        let (m, acc) = pretrain(&self.pretrain.x, &self.pretrain.y, &self.recipe, derive(self.seed, "base"))?;
        let meta = HashMap::from([
            ("task".to_string(), self.name.to_string()),
            ("seed".to_string(), self.seed.to_string()),
            ("pretrain_accuracy".to_string(), format!("{acc:.4}")),
        ]);
        m.save(&path, meta)?;
        Ok((m, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_deterministic_and_disjoint_from_pretraining() {
        let a = task("digits-rot", 0).unwrap();
        let b = task("digits-rot", 0).unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!(a.cache_key(), b.cache_key());
        assert_ne!(task("digits-rot", 1).unwrap().cache_key(), a.cache_key());
        assert_eq!((a.pretrain.len(), a.train.len(), a.val.len(), a.test.len()), (897, 300, 100, 500));
        assert_eq!(a.val, b.val);
        assert_ne!(task("digits-rot", 1).unwrap().val, a.val);
        // The validation split is held out of the training data: no image in both.
        assert!((0..a.val.len()).all(|i| (0..a.train.len()).all(|j| a.val.row(i) != a.train.row(j))));
        let t = task("teacher", 0).unwrap();
        assert_eq!((t.train.len(), t.val.len(), t.test.len()), (1000, 200, 2000));
        assert!(task("nope", 0).is_err());
    }
}
