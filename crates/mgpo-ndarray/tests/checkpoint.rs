//! Checkpoints: exact resume, and every kind of bad file refused with a
//! typed error that leaves the optimizer as it was.

mod common;

use std::collections::HashMap;

use common::{build, same_state, train};
use mgpo_conformance::props::{case_strategy, Case};
use mgpo_core::checkpoint::{checksum, FORMAT};
use mgpo_core::{CheckpointError, Config, Layout, MgpoError, ParamGroup, Space};
use mgpo_ndarray::{Element, MgpoOptimizer, NdBackend};
use proptest::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// 2N steps straight, or N steps, save, load into a fresh optimizer, N
/// steps: the same bits.
fn exact_resume<F: Element>(case: &Case, n: usize) -> Result<(), TestCaseError> {
    let (mut a, mut ta) = build::<F>(case, case.config);
    train(&mut a, &mut ta, case, 0..2 * n);

    let (mut b, mut tb) = build::<F>(case, case.config);
    train(&mut b, &mut tb, case, 0..n);
    let bytes = b.checkpoint_bytes().unwrap();
    let (mut c, _) = build::<F>(case, case.config);
    c.load_checkpoint_bytes(&bytes).unwrap();
    train(&mut c, &mut tb, case, n..2 * n);
    prop_assert!(ta == tb, "parameters or W0 differ after resume");
    prop_assert!(same_state(a.state(), c.state()), "state differs after resume");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn resume_is_bit_identical_f32(case in case_strategy(), n in 1usize..6) {
        exact_resume::<f32>(&case, n)?;
    }

    #[test]
    fn resume_is_bit_identical_f64(case in case_strategy(), n in 1usize..6) {
        exact_resume::<f64>(&case, n)?;
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Random bytes, and valid checkpoints with random bytes changed or
    /// cut off: never a panic; an error leaves the state as it was.
    #[test]
    fn loader_survives_garbage(seed in any::<u64>(), edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), cut in any::<prop::sample::Index>(), random in prop::collection::vec(any::<u8>(), 0..256), mode in 0u8..3) {
        let case = Case::from_seed(seed);
        let (mut opt, mut t) = build::<f32>(&case, case.config);
        train(&mut opt, &mut t, &case, 0..2);
        let mut bytes = opt.checkpoint_bytes().unwrap();
        match mode {
            0 => bytes = random,
            1 => for (i, b) in &edits { let j = i.index(bytes.len()); bytes[j] ^= b | 1; },
            _ => bytes.truncate(cut.index(bytes.len())),
        }
        let before = opt.state().clone();
        let (mut fresh, _) = build::<f32>(&case, case.config);
        match fresh.load_checkpoint_bytes(&bytes) {
            // an edit the format cannot see (JSON whitespace, say) may load, but only as the original
            Ok(()) => prop_assert!(same_state(fresh.state(), &before), "a damaged checkpoint loaded as something else"),
            Err(_) => prop_assert!(fresh.state().step == 0 && fresh.state().moments.is_empty()),
        }
        let _ = opt.load_checkpoint_bytes(&bytes);
        prop_assert!(same_state(opt.state(), &before));
    }
}

/// A trained f32 optimizer in weight space and its checkpoint.
fn trained() -> (Case, MgpoOptimizer<f32>, Vec<u8>) {
    let mut case = Case::from_seed(11);
    case.config = Config { space: Space::Weight, ..case.config };
    let (mut opt, mut t) = build::<f32>(&case, case.config);
    train(&mut opt, &mut t, &case, 0..3);
    let bytes = opt.checkpoint_bytes().unwrap();
    (case, opt, bytes)
}

/// Rewrites a checkpoint: `edit` changes its metadata and tensors, and the
/// checksum is recomputed so that only the intended defect remains.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> Vec<u8> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: Vec<_> = st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut meta, &mut tensors);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<&[u8]> = vec![meta["config"].as_bytes(), meta["state"].as_bytes()];
    parts.extend(tensors.iter().map(|t| t.3.as_slice()));
    let sum = checksum(&parts);
    meta.insert("checksum".into(), format!("{sum:016x}"));
    let views: Vec<_> = tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn refused(bytes: &[u8]) -> CheckpointError {
    let (case, mut opt, _) = trained();
    let before = opt.state().clone();
    let e = opt.load_checkpoint_bytes(bytes).unwrap_err();
    assert!(same_state(opt.state(), &before), "a refused checkpoint changed the state");
    let (mut fresh, _) = build::<f32>(&case, case.config);
    assert!(fresh.load_checkpoint_bytes(bytes).is_err());
    assert_eq!(fresh.state().step, 0);
    match e {
        MgpoError::Checkpoint(c) => c,
        other => panic!("not a checkpoint error: {other}"),
    }
}

#[test]
fn each_defect_has_its_own_error() {
    let (_, _, good) = trained();
    let e = refused(&good[..good.len() / 2]);
    assert!(matches!(e, CheckpointError::Malformed(_)), "truncated: {e}");
    assert!(matches!(refused(&[]), CheckpointError::Malformed(_)));

    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    let e = refused(&flipped);
    assert!(matches!(e, CheckpointError::Checksum { .. }), "corrupted: {e}");

    let e = refused(&rewrite(&good, |m, _| {
        m.insert("version".into(), "99".into());
    }));
    assert!(matches!(&e, CheckpointError::Version { found, .. } if found == "99"), "{e}");

    let e = refused(&rewrite(&good, |m, _| {
        m.insert("format".into(), "something-else".into());
    }));
    assert!(matches!(e, CheckpointError::Format(_)), "{e}");

    let e = refused(&rewrite(&good, |_, t| {
        t[0].1 = Dtype::I32;
    }));
    assert!(matches!(e, CheckpointError::Dtype { .. }), "wrong dtype: {e}");

    let e = refused(&rewrite(&good, |_, t| {
        t.remove(0);
    }));
    assert!(matches!(e, CheckpointError::MissingTensor(_)), "missing: {e}");

    let e = refused(&rewrite(&good, |_, t| {
        t.push(("m.stranger".into(), Dtype::F32, vec![1], vec![0; 4]));
    }));
    assert!(matches!(&e, CheckpointError::ExtraTensor(n) if n == "m.stranger"), "extra: {e}");

    let e = refused(&rewrite(&good, |_, t| {
        let n = t[0].2.iter().product::<usize>();
        t[0].2 = vec![n];
    }));
    assert!(matches!(e, CheckpointError::Shape { .. }), "shape: {e}");

    let e = refused(&rewrite(&good, |m, _| {
        let mut c: Config = serde_json::from_str(&m["config"]).unwrap();
        c.rho *= 2.0;
        m.insert("config".into(), serde_json::to_string(&c).unwrap());
    }));
    assert!(matches!(e, CheckpointError::ConfigMismatch { field: "rho", .. }), "config: {e}");

    let e = refused(&rewrite(&good, |m, _| {
        m.insert("state".into(), "{not json".into());
    }));
    assert!(matches!(e, CheckpointError::Metadata { field: "state", .. }), "{e}");
}

#[test]
fn a_checkpoint_for_other_tensors_is_refused() {
    let (_, _, good) = trained();
    let layout = Layout::builder().adapter("other", 4.0, &[2, 3], &[3, 2], true).build().unwrap();
    let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), serde_json::from_str(&{
        let (_, m) = SafeTensors::read_metadata(&good).unwrap();
        m.metadata().as_ref().unwrap()["config"].clone()
    }).unwrap(), layout).unwrap();
    let e = opt.load_checkpoint_bytes(&good).unwrap_err();
    assert!(matches!(e, MgpoError::Checkpoint(CheckpointError::LayoutMismatch(_))), "{e}");
}

#[test]
fn learning_rate_may_differ_and_is_kept() {
    let (case, trained_opt, good) = trained();
    let mut cfg = case.config;
    cfg.space = Space::Weight;
    cfg.adamw.lr = 0.123;
    let (mut opt, _) = build::<f32>(&case, cfg);
    opt.load_checkpoint_bytes(&good).unwrap();
    assert_eq!(opt.lr(), 0.123);
    assert!(opt.state().step > 0);
    assert!(same_state(opt.state(), trained_opt.state()));
}

#[test]
fn f64_checkpoint_loads_into_f32_and_back() {
    let case = Case::from_seed(5);
    let (mut a, mut t) = build::<f64>(&case, case.config);
    train(&mut a, &mut t, &case, 0..4);
    let (mut b, _) = build::<f32>(&case, case.config);
    b.load_checkpoint_bytes(&a.checkpoint_bytes().unwrap()).unwrap();
    let (mut c, _) = build::<f64>(&case, case.config);
    c.load_checkpoint_bytes(&b.checkpoint_bytes().unwrap()).unwrap();
    assert_eq!(c.state().step, 4);
    for (x, y) in a.state().moments.iter().zip(&c.state().moments) {
        for (u, w) in x.m.iter().zip(y.m.iter()) {
            assert!((u - w).abs() <= 1e-6 * (1.0 + u.abs()), "{u} vs {w}");
        }
    }
}

#[test]
fn save_is_atomic_and_refused_while_perturbed() {
    let dir = std::env::temp_dir().join(format!("mgpo-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    let case = Case::from_seed(3);
    let (mut opt, mut t) = build::<f32>(&case, case.config);
    train(&mut opt, &mut t, &case, 0..2);
    opt.save_checkpoint(&path).unwrap();
    opt.perturb(&mut t).unwrap();
    assert_eq!(opt.save_checkpoint(&path).unwrap_err(), MgpoError::AlreadyPerturbed);
    opt.unperturb(&mut t).unwrap();
    let (mut fresh, _) = build::<f32>(&case, case.config);
    fresh.load_checkpoint(&path).unwrap();
    assert!(same_state(fresh.state(), opt.state()));
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let e = fresh.load_checkpoint(dir.join("absent")).unwrap_err();
    assert!(matches!(e, MgpoError::Checkpoint(CheckpointError::Io { .. })), "{e}");
    assert_eq!(FORMAT, "lora-mgpo-optimizer");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The case's layout with its first adapter's tensors in parameter group `group`.
fn grouped(case: &Case, group: ParamGroup, first_only: bool) -> MgpoOptimizer<f32> {
    let a = &case.adapters[0].name;
    let mut members = vec![format!("{a}.a"), format!("{a}.b")];
    if first_only {
        members.pop();
    }
    let names: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut lb = Layout::builder();
    let weight = case.config.space == Space::Weight;
    for ad in &case.adapters {
        lb = lb.adapter(&ad.name, ad.alpha, &[ad.rank, ad.fan_in], &[ad.fan_out, ad.rank], weight);
    }
    for (name, shape, _) in &case.plain {
        lb = lb.plain(name, shape);
    }
    MgpoOptimizer::<f32>::new(NdBackend::new(), case.config, lb.param_group(group, &names).build().unwrap()).unwrap()
}

/// Parameter groups are part of what a checkpoint must match: another
/// group's weight decay or learning-rate multiplier, or a tensor moved to
/// another group, is refused with a message naming it, and the optimizer
/// is left as it was; the same groups load.
#[test]
fn parameter_groups_must_match() {
    let (case, src, _) = trained();
    let mut opt = grouped(&case, ParamGroup::no_decay(), false);
    // Train the grouped optimizer a little so its checkpoint has moments.
    let (_, mut t) = build::<f32>(&case, case.config);
    train(&mut opt, &mut t, &case, 0..2);
    let good = opt.checkpoint_bytes().unwrap();

    grouped(&case, ParamGroup::no_decay(), false).load_checkpoint_bytes(&good).unwrap();
    let mismatch = |mut other: MgpoOptimizer<f32>, bytes: &[u8], needle: &str| {
        let before = other.state().clone();
        let e = other.load_checkpoint_bytes(bytes).unwrap_err();
        assert!(matches!(&e, MgpoError::Checkpoint(CheckpointError::LayoutMismatch(m)) if m.contains(needle)), "expected a mismatch naming {needle:?}: {e}");
        assert!(same_state(other.state(), &before), "a refused checkpoint changed the state");
    };
    mismatch(grouped(&case, ParamGroup::no_decay().weight_decay(0.5), false), &good, "no_decay");
    mismatch(grouped(&case, ParamGroup::no_decay().lr_scale(0.5), false), &good, "no_decay");
    let moved = format!("{}.b", case.adapters[0].name);
    mismatch(grouped(&case, ParamGroup::no_decay(), true), &good, &moved);
    // A grouped checkpoint into an ungrouped optimizer, and the reverse.
    mismatch(build::<f32>(&case, case.config).0, &good, "no_decay");
    mismatch(grouped(&case, ParamGroup::no_decay(), false), &src.checkpoint_bytes().unwrap(), "no_decay");

    // A checkpoint written before groups were recorded (no `param_groups`
    // in its state) still loads into an optimizer with only the default group.
    let legacy = rewrite(&src.checkpoint_bytes().unwrap(), |m, _| {
        let mut state: serde_json::Value = serde_json::from_str(&m["state"]).unwrap();
        assert!(state.as_object_mut().unwrap().remove("param_groups").is_some());
        m.insert("state".into(), state.to_string());
    });
    let (mut fresh, _) = build::<f32>(&case, case.config);
    fresh.load_checkpoint_bytes(&legacy).unwrap();
    assert!(same_state(fresh.state(), src.state()));
    mismatch(grouped(&case, ParamGroup::no_decay(), false), &legacy, "only the default parameter group");
}
