//! The decision rule of the sweeps (docs/results.md states it before the
//! runs it judges), over paired seeds: for a given seed every method starts
//! from the same adapters and sees the same batches, so differences are
//! taken seed by seed.
//!
//! At each setting (everything but the method and the seed):
//!
//! - the setting **rebounds** when plain `lora`'s clean training loss shows
//!   the three phases ([`crate::metrics`]) in more than half of the seeds;
//! - a variant **mitigates the rebound** there when its clean-loss rebound
//!   is lower than that of `lora` and of `lora-clip` in every paired seed;
//! - a variant **generalises better** than a method B there when its
//!   validation-selected test accuracy is higher than B's in at least 80%
//!   of the paired seeds (4 of 5) and the mean paired difference exceeds the
//!   seed spread (the larger of the two methods' standard deviations over
//!   seeds); "better" means better than both `lora` and `lora-clip`;
//! - the **direction matters** when the variant passes the same tests
//!   against its random control (the same configuration with a Gaussian
//!   direction of the same norm, [`Method::random_control`]).
//!
//! Per variant, the rebound verdicts are taken over the settings that
//! rebound (none: untestable), the accuracy verdicts over every setting.
//! Nothing here knows the model: any sweep that produces [`Scores`] per
//! (setting, method, seed) is judged the same way.

use serde::{Deserialize, Serialize};

use crate::method::Method;
use crate::metrics::mean_std;

/// What the rule reads from one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Everything that defines the run but the method and the seed.
    pub setting: String,
    /// The method of the run.
    pub method: Method,
    /// The seed of the run; runs of one setting pair up by it.
    pub seed: u64,
    /// Rebound of the clean training loss.
    pub clean_rebound: f64,
    /// Whether the clean training loss showed the three phases.
    pub clean_three_phases: bool,
    /// Test accuracy at the checkpoint the validation split selected.
    pub test_at_val: f64,
}

/// The rule's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// A setting rebounds when more than this fraction of `lora`'s seeds show the three phases.
    pub rebounding: f64,
    /// Fraction of paired seeds in which the accuracy must be higher.
    pub most: f64,
}

impl Rule {
    /// The thresholds written in docs/results.md before the runs.
    pub const PREREGISTERED: Rule = Rule { rebounding: 0.5, most: 0.8 };
}

/// One paired difference, method minus reference, over the seeds both have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Seeds both methods ran, ascending.
    pub seeds: Vec<u64>,
    /// Per seed, in `seeds` order.
    pub diffs: Vec<f64>,
    /// Mean of `diffs`.
    pub mean: f64,
    /// Standard deviation of `diffs`.
    pub std: f64,
    /// Seeds in which the method is better (lower rebound, higher accuracy).
    pub wins: usize,
    /// The larger of the two methods' standard deviations over these seeds.
    pub spread: f64,
}

/// A variant against one reference at one setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The setting compared ([`Scores::setting`]).
    pub setting: String,
    /// The variant judged.
    pub method: Method,
    /// The reference it is judged against (a baseline or its random control).
    pub against: Method,
    /// Clean rebound, method minus reference.
    pub rebound: Paired,
    /// Test accuracy at the validation-selected checkpoint, method minus reference.
    pub accuracy: Paired,
    /// Lower clean rebound in every seed; None where the setting does not rebound.
    pub lower_rebound: Option<bool>,
    /// Whether the accuracy difference passes [`Rule::higher_accuracy`].
    pub higher_accuracy: bool,
}

/// A verdict over settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// At every setting it applies to.
    Yes,
    /// At none.
    No,
    /// At `k` of `of`.
    Some {
        /// Settings where it holds.
        k: usize,
        /// Settings it applies to.
        of: usize,
    },
    /// No setting it applies to (no rebounding setting, or a reference missing).
    Untestable,
}

impl Answer {
    fn of(results: &[bool]) -> Answer {
        let k = results.iter().filter(|&&b| b).count();
        match (k, results.len()) {
            (_, 0) => Answer::Untestable,
            (0, _) => Answer::No,
            (k, n) if k == n => Answer::Yes,
            (k, of) => Answer::Some { k, of },
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Yes => f.write_str("yes"),
            Answer::No => f.write_str("no"),
            Answer::Some { k, of } => write!(f, "at {k} of {of} settings"),
            Answer::Untestable => f.write_str("untestable"),
        }
    }
}

/// The verdicts on one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The variant judged.
    pub method: Method,
    /// Lower rebound than both baselines in every seed, over the rebounding settings.
    pub mitigates_rebound: Answer,
    /// Better accuracy than both baselines, over all settings.
    pub generalises_better: Answer,
    /// Against its random control: rebound (rebounding settings) and accuracy (all).
    pub direction_rebound: Option<Answer>,
    /// Against its random control, on accuracy; None where the method has no random control.
    pub direction_accuracy: Option<Answer>,
}

/// Everything the rule found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The thresholds applied.
    pub rule: Rule,
    /// Per setting (first-seen order): seeds of `lora` with the three phases, seeds of `lora`, rebounds.
    pub settings: Vec<(String, usize, usize, bool)>,
    /// Every paired comparison made, per setting and reference.
    pub comparisons: Vec<Comparison>,
    /// One verdict per MGPO variant in the sweep.
    pub verdicts: Vec<Verdict>,
}

fn find<'a>(scores: &'a [Scores], setting: &str, method: Method, seed: u64) -> Option<&'a Scores> {
    scores.iter().find(|s| s.setting == setting && s.method == method && s.seed == seed)
}

/// `method` minus `against` at `setting` over the seeds both have; `lower`
/// says whether lower is better. None without a common seed.
fn paired(scores: &[Scores], setting: &str, method: Method, against: Method, value: fn(&Scores) -> f64, lower: bool) -> Option<Paired> {
    let mut seeds: Vec<u64> = scores.iter().filter(|s| s.setting == setting && s.method == method).map(|s| s.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let pairs: Vec<(u64, f64, f64)> = seeds
        .iter()
        .filter_map(|&seed| Some((seed, value(find(scores, setting, method, seed)?), value(find(scores, setting, against, seed)?))))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let diffs: Vec<f64> = pairs.iter().map(|&(_, a, b)| a - b).collect();
    let wins = pairs.iter().filter(|&&(_, a, b)| if lower { a < b } else { a > b }).count();
    let (mean, std) = mean_std(&diffs);
    let sd = |i: usize| mean_std(&pairs.iter().map(|p| if i == 0 { p.1 } else { p.2 }).collect::<Vec<_>>()).1;
    Some(Paired { seeds: pairs.iter().map(|p| p.0).collect(), diffs, mean, std, wins, spread: sd(0).max(sd(1)) })
}

impl Rule {
    /// Whether the accuracy difference passes: higher in at least `most` of
    /// the seeds and a mean above the seed spread.
    pub fn higher_accuracy(&self, p: &Paired) -> bool {
        let n = p.seeds.len();
        n > 0 && p.wins as f64 >= (self.most * n as f64).ceil() && p.mean > p.spread
    }

    /// Applies the rule to the runs in `scores`.
    pub fn decide(&self, scores: &[Scores]) -> Decision {
        let mut names: Vec<&str> = Vec::new();
        for s in scores {
            if !names.contains(&s.setting.as_str()) {
                names.push(&s.setting);
            }
        }
        let settings: Vec<(String, usize, usize, bool)> = names
            .iter()
            .map(|&name| {
                let lora: Vec<&Scores> = scores.iter().filter(|s| s.setting == name && s.method == Method::Lora).collect();
                let k = lora.iter().filter(|s| s.clean_three_phases).count();
                (name.to_string(), k, lora.len(), !lora.is_empty() && k as f64 > self.rebounding * lora.len() as f64)
            })
            .collect();
        let mut variants: Vec<Method> = scores.iter().map(|s| s.method).filter(|m| m.is_variant()).collect();
        variants.sort_unstable();
        variants.dedup();

        let mut comparisons = Vec::new();
        for (name, _, _, rebounds) in &settings {
            for &v in &variants {
                for against in Method::BASELINES.into_iter().chain(v.random_control()) {
                    let rebound = paired(scores, name, v, against, |s| s.clean_rebound, true);
                    let accuracy = paired(scores, name, v, against, |s| s.test_at_val, false);
                    if let (Some(rebound), Some(accuracy)) = (rebound, accuracy) {
                        let lower_rebound = rebounds.then(|| rebound.wins == rebound.seeds.len());
                        let higher_accuracy = self.higher_accuracy(&accuracy);
                        comparisons.push(Comparison { setting: name.clone(), method: v, against, rebound, accuracy, lower_rebound, higher_accuracy });
                    }
                }
            }
        }

        let get = |name: &str, v: Method, against: Method| comparisons.iter().find(|c| c.setting == name && c.method == v && c.against == against);
        let verdicts = variants
            .iter()
            .map(|&v| {
                // Per setting, against every reference in `refs`: Some(passes) or None if one is missing.
                let over = |refs: &[Method], only_rebounding: bool, test: fn(&Comparison) -> bool| -> Answer {
                    let mut results = Vec::new();
                    for (name, _, _, rebounds) in &settings {
                        if only_rebounding && !rebounds {
                            continue;
                        }
                        let found: Option<Vec<bool>> = refs.iter().map(|&r| get(name, v, r).map(test)).collect();
                        if let Some(found) = found {
                            results.push(found.iter().all(|&b| b));
                        }
                    }
                    Answer::of(&results)
                };
                let lower = |c: &Comparison| c.lower_rebound == Some(true);
                let higher = |c: &Comparison| c.higher_accuracy;
                let control = v.random_control();
                Verdict {
                    method: v,
                    mitigates_rebound: over(&Method::BASELINES, true, lower),
                    generalises_better: over(&Method::BASELINES, false, higher),
                    direction_rebound: control.map(|c| over(&[c], true, lower)),
                    direction_accuracy: control.map(|c| over(&[c], false, higher)),
                }
            })
            .collect();
        Decision { rule: *self, settings, comparisons, verdicts }
    }
}

fn pm(p: &Paired, digits: usize) -> String {
    if p.mean.is_infinite() {
        return format!("{}inf", if p.mean < 0.0 { "-" } else { "+" });
    }
    format!("{:+.*} ± {:.*}", digits, p.mean, digits, p.std)
}

fn mark(b: bool) -> &'static str {
    if b {
        "**yes**"
    } else {
        "no"
    }
}

impl Decision {
    /// The rebounding settings, the paired differences and the verdicts, as markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::from("Settings (three phases in plain `lora`'s clean training loss):\n\n| setting | lora seeds with three phases | rebounds |\n|---|---|---|\n");
        for (name, k, n, r) in &self.settings {
            s += &format!("| {name} | {k} of {n} | {} |\n", if *r { "yes" } else { "no" });
        }
        s += "\nPaired differences, variant minus reference, mean ± std over seeds; wins = seeds in which the variant is better (lower rebound, higher accuracy); spread = the larger std over seeds of the two methods' accuracies.\n\n";
        s += "| setting | variant | vs | Δ clean rebound | wins | lower in every seed | Δ test acc at val | wins | spread | higher (rule) |\n|---|---|---|---|---|---|---|---|---|---|\n";
        for c in &self.comparisons {
            let n = c.rebound.seeds.len();
            s += &format!(
                "| {} | {} | {} | {} | {}/{n} | {} | {} | {}/{} | {:.4} | {} |\n",
                c.setting,
                c.method,
                c.against,
                pm(&c.rebound, 3),
                c.rebound.wins,
                c.lower_rebound.map_or("(setting does not rebound)", mark),
                pm(&c.accuracy, 4),
                c.accuracy.wins,
                c.accuracy.seeds.len(),
                c.accuracy.spread,
                mark(c.higher_accuracy)
            );
        }
        s += "\nVerdicts:\n\n| variant | mitigates the rebound (vs lora and lora-clip) | generalises better (vs lora and lora-clip) | random control | direction matters: rebound | direction matters: accuracy |\n|---|---|---|---|---|---|\n";
        for v in &self.verdicts {
            let opt = |a: Option<Answer>| a.map_or("-".to_string(), |a| a.to_string());
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                v.method,
                v.mitigates_rebound,
                v.generalises_better,
                v.method.random_control().map_or("-".to_string(), |m| m.to_string()),
                opt(v.direction_rebound),
                opt(v.direction_accuracy)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(setting: &str, method: Method, seed: u64, clean_rebound: f64, test_at_val: f64) -> Scores {
        Scores { setting: setting.into(), method, seed, clean_rebound, clean_three_phases: clean_rebound >= 0.1, test_at_val }
    }

    /// Five seeds at two settings: "hi" where lora rebounds in 3 of 5 seeds, "lo" where it never does.
    fn scores() -> Vec<Scores> {
        let mut v = Vec::new();
        for seed in 0..5u64 {
            let e = seed as f64 * 0.001;
            let lora_hi = if seed < 3 { 0.5 } else { 0.05 };
            v.push(sc("hi", Method::Lora, seed, lora_hi, 0.90 + e));
            v.push(sc("hi", Method::LoraClip, seed, 0.3 - e, 0.90 + e));
            // Lower rebound than both baselines in every seed, accuracy higher by 0.02 in every seed.
            v.push(sc("hi", Method::MgpoTrainer, seed, 0.01, 0.92 + e));
            // Its random control: the same rebound, so the direction does not matter for it.
            v.push(sc("hi", Method::LoraRandomWeight, seed, 0.01, 0.90 + e));
            // Higher accuracy in 3 of 5 seeds only; rebound lower than lora but not than lora-clip in seed 4.
            v.push(sc("hi", Method::MgpoPaper, seed, if seed == 4 { 0.4 } else { 0.02 }, 0.90 + e + if seed < 3 { 0.05 } else { -0.01 }));
            for m in [Method::Lora, Method::LoraClip, Method::MgpoTrainer, Method::LoraRandomWeight, Method::MgpoPaper] {
                v.push(sc("lo", m, seed, 0.0, 0.8 + e));
            }
        }
        v
    }

    #[test]
    fn rule_on_hand_made_scores() {
        let d = Rule::PREREGISTERED.decide(&scores());
        assert_eq!(d.settings, vec![("hi".to_string(), 3, 5, true), ("lo".to_string(), 0, 5, false)]);
        let c = |s: &str, m: Method, a: Method| d.comparisons.iter().find(|c| c.setting == s && c.method == m && c.against == a).unwrap().clone();
        let t = c("hi", Method::MgpoTrainer, Method::LoraClip);
        assert_eq!((t.lower_rebound, t.rebound.wins, t.accuracy.wins, t.higher_accuracy), (Some(true), 5, 5, true));
        assert!((t.accuracy.mean - 0.02).abs() < 1e-12 && (t.accuracy.spread - 0.0015811).abs() < 1e-6, "{t:?}");
        assert_eq!(c("lo", Method::MgpoTrainer, Method::Lora).lower_rebound, None, "lo does not rebound");
        assert!(!c("lo", Method::MgpoTrainer, Method::Lora).higher_accuracy, "equal accuracies are not higher");
        // Direction: the control is as good on the rebound; on accuracy the variant is better.
        let r = c("hi", Method::MgpoTrainer, Method::LoraRandomWeight);
        assert_eq!((r.lower_rebound, r.higher_accuracy), (Some(false), true));
        let p = c("hi", Method::MgpoPaper, Method::LoraClip);
        assert_eq!((p.lower_rebound, p.rebound.wins, p.accuracy.wins, p.higher_accuracy), (Some(false), 4, 3, false));
        assert_eq!(c("hi", Method::MgpoPaper, Method::Lora).lower_rebound, Some(false), "0.4 is not below 0.05 in seed 4");

        let v = |m: Method| d.verdicts.iter().find(|v| v.method == m).unwrap().clone();
        let t = v(Method::MgpoTrainer);
        assert_eq!((t.mitigates_rebound, t.generalises_better), (Answer::Yes, Answer::Some { k: 1, of: 2 }));
        assert_eq!((t.direction_rebound, t.direction_accuracy), (Some(Answer::No), Some(Answer::Some { k: 1, of: 2 })));
        let p = v(Method::MgpoPaper);
        assert_eq!((p.mitigates_rebound, p.generalises_better), (Answer::No, Answer::No));
        assert_eq!(p.direction_rebound, Some(Answer::Untestable), "its control did not run");
        assert_eq!(d.verdicts.len(), 2, "baselines and controls are not judged");
        let md = d.markdown();
        assert!(md.contains("| hi | 3 of 5 | yes |") && md.contains("| mgpo-trainer | yes | at 1 of 2 settings | lora-random-weight | no |"), "{md}");

        // Without a rebounding setting the rebound question is untestable.
        let lo: Vec<Scores> = scores().into_iter().filter(|s| s.setting == "lo").collect();
        assert_eq!(Rule::PREREGISTERED.decide(&lo).verdicts[0].mitigates_rebound, Answer::Untestable);
    }
}
