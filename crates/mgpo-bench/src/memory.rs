//! Peak resident memory of optimizer steps, measured in a child process
//! (`mgpo bench --rss-probe KIND`) so each probe starts from a clean heap:
//! the inputs (parameters, gradients, W0) are built first, the peak is
//! reset to the current RSS (`/proc/self/clear_refs` = 5, Linux >= 4.0),
//! then the optimizer is built and runs its steps; the probe reports the
//! RSS before and the peak after. Peak minus before is what the optimizer
//! (its state and any temporaries) added.

use std::ffi::OsString;
use std::process::Command;

use mgpo_ndarray::NdBackend;
use serde::{Deserialize, Serialize};

use crate::sizes::LoraShape;
use crate::step::{LoraTensors, StepBench, Variant};
use crate::weight::{Materialised, RankDecomposed};

/// One probe's result (also the JSON line the child prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RssProbe {
    /// What was probed: `step:<variant>` or `weight:<variant>`.
    pub kind: String,
    /// Trainable parameters.
    pub params: usize,
    /// RSS once the inputs exist, bytes.
    pub base_rss: u64,
    /// Peak RSS over the measured steps, bytes.
    pub peak_rss: u64,
    /// Whether the peak could be reset after building the inputs (if not,
    /// the peak includes the input building).
    pub reset_ok: bool,
}

impl RssProbe {
    /// Bytes the measured part added over the inputs.
    pub fn added(&self) -> u64 {
        self.peak_rss.saturating_sub(self.base_rss)
    }
}

/// (VmRSS, VmHWM) of this process in bytes; zeros where /proc is missing.
pub fn rss_now() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS; false where refused.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs the probe `kind` in this process:
/// `step:none|adamw|mgpo-adapter|mgpo-weight` (the LoRA split of `params`,
/// `steps` steps on ndarray f32) or `weight:none|ours|materialised`
/// (one `dim` x `dim` W0 at `rank`, `steps` steps' weight-space work).
pub fn probe(kind: &str, params: usize, dim: usize, rank: usize, steps: usize) -> Result<RssProbe, String> {
    let be = NdBackend::<f32>::new();
    // Warm up on a small case first, so code pages, the thread pool and
    // allocator arenas exist before the measured span.
    warm_up(kind)?;
    let (count, base, ok);
    if let Some(v) = kind.strip_prefix("step:") {
        let shape = LoraShape::for_params(params);
        let variant = if v == "none" { None } else { Some(Variant::parse(v).ok_or(format!("unknown variant {v:?}"))?) };
        let t = LoraTensors::new(&be, shape, variant.is_some_and(Variant::with_w0))?;
        base = rss_now().0;
        ok = reset_peak();
        if let Some(v) = variant {
            let mut b = StepBench::with_tensors(be, shape, v, t)?;
            for _ in 0..steps {
                b.step()?;
            }
        } else {
            std::hint::black_box(&t);
        }
        count = shape.params();
    } else if let Some(w) = kind.strip_prefix("weight:") {
        // One value per probe process: its size does not matter.
        #[allow(clippy::large_enum_variant)]
        enum Case {
            None,
            Ours(RankDecomposed<NdBackend<f32>>),
            Mat(Materialised),
        }
        let mut case = match w {
            "none" => Case::None,
            "ours" => Case::Ours(RankDecomposed::new(be, dim, dim, rank)?),
            "materialised" => Case::Mat(Materialised::new(dim, dim, rank)),
            _ => return Err(format!("unknown weight probe {w:?}")),
        };
        base = rss_now().0;
        ok = reset_peak();
        for _ in 0..steps {
            match &mut case {
                Case::None => {}
                Case::Ours(c) => c.in_place()?,
                Case::Mat(c) => c.step()?,
            }
        }
        count = 2 * dim * rank;
    } else {
        return Err(format!("unknown probe {kind:?}"));
    }
    Ok(RssProbe { kind: kind.to_string(), params: count, base_rss: base, peak_rss: rss_now().1, reset_ok: ok })
}

fn warm_up(kind: &str) -> Result<(), String> {
    let small = LoraShape { dim: 256, rank: 8, adapters: 2 };
    if let Some(v) = kind.strip_prefix("step:").and_then(Variant::parse) {
        StepBench::new(NdBackend::<f32>::new(), small, v)?.step()?;
    }
    match kind.strip_prefix("weight:") {
        Some("ours") => RankDecomposed::new(NdBackend::<f32>::new(), 256, 256, 8)?.in_place()?,
        Some("materialised") => Materialised::new(256, 256, 8).step()?,
        _ => {}
    }
    Ok(())
}

/// Runs a probe in a child: `cmd` (program and leading arguments) plus
/// `--rss-probe KIND --params N --weight-dim D --rank R`, which must print
/// the probe's JSON as its last line.
pub fn probe_child(cmd: &[OsString], kind: &str, params: usize, dim: usize, rank: usize) -> Result<RssProbe, String> {
    let (prog, lead) = cmd.split_first().ok_or("no command for the RSS probe")?;
    let out = Command::new(prog)
        .args(lead)
        .args(["--rss-probe", kind, "--params", &params.to_string(), "--weight-dim", &dim.to_string(), "--rank", &rank.to_string()])
        .output()
        .map_err(|e| format!("RSS probe {kind}: {e}"))?;
    parse_last_line(&out, kind)
}

/// The last stdout line of a finished probe as an [`RssProbe`].
pub fn parse_last_line(out: &std::process::Output, kind: &str) -> Result<RssProbe, String> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("RSS probe {kind} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).ok_or(format!("RSS probe {kind}: no output"))?;
    serde_json::from_str(line).map_err(|e| format!("RSS probe {kind}: {e} in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimizer state of AdamW is visible in the probe: 8 bytes per
    /// parameter on 4M parameters is 32 MB over the inputs.
    #[test]
    fn probe_sees_the_moments() {
        let _lock = crate::test_lock();
        let p = probe("step:adamw", 4_000_000, 0, 0, 2).unwrap();
        assert!(p.base_rss > 0 && p.reset_ok, "{p:?}");
        let added = p.added() as f64 / p.params as f64;
        assert!((7.0..12.0).contains(&added), "{added} bytes per parameter");
        let none = probe("step:none", 4_000_000, 0, 0, 2).unwrap();
        assert!((none.added() as f64) < 0.5 * p.params as f64, "{none:?}");
        assert!(probe("bogus", 1, 0, 0, 1).is_err());
    }
}
