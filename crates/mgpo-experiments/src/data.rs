//! Data sets: the UCI handwritten digits (shipped inside the `smartcore`
//! crate) and a synthetic teacher-network task, as dense f32 matrices with
//! integer class labels.

use crate::rng::Rng;

/// n samples of `dim` features (row-major) with labels in 0..classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Features, `len() x dim`, row-major.
    pub x: Vec<f32>,
    /// Class label of each sample, in 0..classes.
    pub y: Vec<u32>,
    /// Features per sample.
    pub dim: usize,
    /// Number of classes the labels range over.
    pub classes: usize,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the set holds no sample.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }

    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            x.extend_from_slice(self.row(i));
        }
        Dataset { x, y: idx.iter().map(|&i| self.y[i]).collect(), dim: self.dim, classes: self.classes }
    }

    /// Applies `f` to every row (a change of input domain).
    pub fn map_rows(&self, f: impl Fn(&[f32]) -> Vec<f32>) -> Dataset {
        let mut x = Vec::with_capacity(self.x.len());
        for i in 0..self.len() {
            let r = f(self.row(i));
            assert_eq!(r.len(), self.dim, "map_rows must keep the dimension");
            x.extend(r);
        }
        Dataset { x, ..self.clone() }
    }

    /// Relabels class `c` as `perm[c]`.
    pub fn permute_labels(&self, perm: &[u32]) -> Dataset {
        Dataset { y: self.y.iter().map(|&c| perm[c as usize]).collect(), ..self.clone() }
    }
}

/// Splits 0..n at random into parts of the given sizes (the rest is dropped).
pub fn split(n: usize, sizes: &[usize], rng: &mut Rng) -> Vec<Vec<usize>> {
    assert!(sizes.iter().sum::<usize>() <= n, "split sizes exceed {n}");
    let p = rng.permutation(n);
    let mut at = 0;
    sizes
        .iter()
        .map(|&s| {
            let part = p[at..at + s].to_vec();
            at += s;
            part
        })
        .collect()
}

/// The UCI "Optical Recognition of Handwritten Digits" test partition as
/// scikit-learn's `load_digits`: 1797 8x8 images, pixels 0..16 scaled to
/// [0, 1], 10 classes. Shipped inside the `smartcore` crate (feature
/// `datasets`); source <https://archive.ics.uci.edu/dataset/80>, licence
/// CC BY 4.0 (Alpaydin and Kaynak, 1998).
pub fn digits() -> Dataset {
    let d = smartcore::dataset::digits::load_dataset();
    Dataset {
        x: d.data.iter().map(|v| v / 16.0).collect(),
        y: d.target.iter().map(|&c| c as u32).collect(),
        dim: d.num_features,
        classes: 10,
    }
}

/// An 8x8 image rotated by 90 degrees counter-clockwise.
pub fn rotate90(img: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; 64];
    for r in 0..8 {
        for c in 0..8 {
            out[(7 - c) * 8 + r] = img[r * 8 + c];
        }
    }
    out
}

/// A random two-layer ReLU teacher, dim -> hidden -> classes, whose argmax
/// labels a synthetic classification task.
#[derive(Debug, Clone)]
pub struct Teacher {
    /// Input features.
    pub dim: usize,
    /// Width of the hidden ReLU layer.
    pub hidden: usize,
    /// Output classes (the argmax is the label).
    pub classes: usize,
    /// First layer, `hidden x dim`, row-major.
    pub w1: Vec<f64>,
    /// Second layer, `classes x hidden`, row-major.
    pub w2: Vec<f64>,
}

impl Teacher {
    /// A teacher with Gaussian weights scaled by 1/sqrt(fan-in), drawn from `rng`.
    pub fn random(dim: usize, hidden: usize, classes: usize, rng: &mut Rng) -> Self {
        let w1 = (0..hidden * dim).map(|_| rng.normal() / (dim as f64).sqrt()).collect();
        let w2 = (0..classes * hidden).map(|_| rng.normal() / (hidden as f64).sqrt()).collect();
        Teacher { dim, hidden, classes, w1, w2 }
    }

    /// The same teacher with a rank-`rank` change of relative size `size`
    /// added to each layer: a related but different task.
    pub fn shifted(&self, rank: usize, size: f64, rng: &mut Rng) -> Self {
        let shift = |w: &[f64], out: usize, inp: usize, rng: &mut Rng| -> Vec<f64> {
            let norm = (w.iter().map(|v| v * v).sum::<f64>()).sqrt();
            let u: Vec<f64> = (0..out * rank).map(|_| rng.normal()).collect();
            let v: Vec<f64> = (0..rank * inp).map(|_| rng.normal()).collect();
            let mut d = vec![0.0; out * inp];
            for i in 0..out {
                for k in 0..rank {
                    for j in 0..inp {
                        d[i * inp + j] += u[i * rank + k] * v[k * inp + j];
                    }
                }
            }
            let dn = d.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            w.iter().zip(&d).map(|(a, b)| a + size * norm / dn * b).collect()
        };
        Teacher {
            w1: shift(&self.w1, self.hidden, self.dim, rng),
            w2: shift(&self.w2, self.classes, self.hidden, rng),
            ..self.clone()
        }
    }

    /// argmax of the teacher's logits.
    pub fn label(&self, x: &[f32]) -> u32 {
        let h: Vec<f64> = (0..self.hidden)
            .map(|i| self.w1[i * self.dim..(i + 1) * self.dim].iter().zip(x).map(|(w, &v)| w * v as f64).sum::<f64>().max(0.0))
            .collect();
        (0..self.classes)
            .map(|c| self.w2[c * self.hidden..(c + 1) * self.hidden].iter().zip(&h).map(|(w, v)| w * v).sum::<f64>())
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (c, v)| if v > best.1 { (c, v) } else { best })
            .0 as u32
    }

    /// n Gaussian inputs labelled by the teacher, with a fraction `noise`
    /// of the labels replaced by uniformly random classes.
    pub fn sample(&self, n: usize, noise: f64, rng: &mut Rng) -> Dataset {
        let x: Vec<f32> = (0..n * self.dim).map(|_| rng.normal() as f32).collect();
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = self.label(&x[i * self.dim..(i + 1) * self.dim]);
            y.push(if rng.uniform() < noise { rng.below(self.classes) as u32 } else { c });
        }
        Dataset { x, y, dim: self.dim, classes: self.classes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_the_uci_set() {
        let d = digits();
        assert_eq!((d.len(), d.dim, d.classes), (1797, 64, 10));
        assert!(d.x.iter().all(|v| (0.0..=1.0).contains(v)));
        let mut counts = [0usize; 10];
        d.y.iter().for_each(|&c| counts[c as usize] += 1);
        assert!(counts.iter().all(|&c| (170..=185).contains(&c)), "{counts:?}");
    }

    #[test]
    fn rotation_is_a_quarter_turn() {
        let img: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let r4 = rotate90(&rotate90(&rotate90(&rotate90(&img))));
        assert_eq!(r4, img);
        assert_ne!(rotate90(&img), img);
        // The top-right pixel goes to the top-left.
        assert_eq!(rotate90(&img)[0], img[7]);
    }

    #[test]
    fn split_is_disjoint() {
        let parts = split(100, &[30, 50], &mut Rng::new(1));
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 80);
    }

    #[test]
    fn teacher_labels_use_all_classes_and_shift_changes_some() {
        let mut rng = Rng::new(5);
        let t = Teacher::random(16, 32, 4, &mut rng);
        let s = t.shifted(2, 0.5, &mut rng);
        let d = t.sample(2000, 0.0, &mut rng);
        let mut counts = [0usize; 4];
        d.y.iter().for_each(|&c| counts[c as usize] += 1);
        assert!(counts.iter().all(|&c| c > 100), "{counts:?}");
        let changed = (0..d.len()).filter(|&i| s.label(d.row(i)) != d.y[i]).count();
        assert!(changed > 100 && changed < 1500, "{changed}");
    }
}
