//! The transformer task through the sweep: paired seeds, evaluations on
//! schedule, MGPO's perturbation on and plain LoRA's off, the sweep's files,
//! determinism, and typed errors for a bad setup.

use std::path::PathBuf;

use mgpo_experiments::sweep::{run_sweep_with, Quiet};
use mgpo_experiments::transformer::{TransformerSetup, TransformerTask, TASK};
use mgpo_experiments::{Error, Method, SweepSpec};
use mgpo_finetune::data::PerClass;

fn setup() -> TransformerSetup {
    let model_dir = std::env::var_os("MGPO_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../out/models/all-MiniLM-L6-v2"));
    assert!(model_dir.join("model.safetensors").is_file(), "no model at {} (run scripts/fetch-minilm.sh)", model_dir.display());
    let wordnet = PathBuf::from("/usr/share/wordnet/data.noun");
    assert!(wordnet.is_file(), "no WordNet at {} (run scripts/setup-wordnet.sh)", wordnet.display());
    TransformerSetup { model_dir, wordnet, per_class: PerClass { train: 3, val: 2, test: 2 }, max_len: 10, adapt_from: 5, clean_subset: 12, data_seed: 0 }
}

fn spec(methods: Vec<Method>) -> SweepSpec {
    SweepSpec {
        tasks: vec![TASK.into()],
        backend: "candle".into(),
        methods,
        ranks: vec![2],
        lrs: vec![0.01],
        seeds: vec![0, 1],
        steps: 4,
        batch: 4,
        eval_every: 2,
        smooth: 2,
        min_rise: 0.02,
        task_seed: 0,
        alpha: None,
    }
}

#[test]
fn sweep_on_the_transformer_is_paired_and_complete() {
    let task = TransformerTask::prepare(setup()).unwrap();
    assert_eq!(task.sizes(), [30, 12, 20, 20]);
    let spec = spec(vec![Method::Lora, Method::MgpoTrainer, Method::LoraRandomWeight]);
    let out = std::env::temp_dir().join(format!("mgpo-transformer-sweep-{}", std::process::id()));
    let res = run_sweep_with(&spec, &out, 2, &mut Quiet, &|rs, on_step| task.run(rs, on_step)).unwrap();
    assert_eq!(res.runs.len(), 6);
    assert!(res.pairing_errors.is_empty(), "{:?}", res.pairing_errors);
    for r in &res.runs {
        // Evaluations at 0, 2 and 4 steps; the selected one is among them.
        assert!([0, 2, 4].contains(&r.outcome.selected.step), "{:?}", r.outcome.selected);
        assert_eq!(r.outcome.last.step, 4);
        assert!(r.outcome.final_logged.is_finite() && r.outcome.last.train_loss.is_finite());
    }
    // Seeds differ in their initialisation; methods of one seed do not.
    assert_ne!(res.runs[0].init_digest, res.runs[1].init_digest);
    assert_eq!(res.runs[0].init_digest, res.runs[2].init_digest);
    let steps = std::fs::read_to_string(&res.outputs.steps_csv).unwrap();
    let pn = |method: &str| -> f64 {
        steps.lines().filter(|l| l.starts_with(&format!("{TASK},{method},"))).map(|l| l.split(',').nth(10).unwrap().parse::<f64>().unwrap()).sum()
    };
    assert_eq!(pn("lora"), 0.0);
    assert!(pn("mgpo-trainer") > 0.0 && pn("lora-random-weight") > 0.0);
    assert_eq!(steps.lines().count(), 1 + 6 * 4);
    assert_eq!(std::fs::read_to_string(&res.outputs.evals_csv).unwrap().lines().count(), 1 + 6 * 3);
    assert!(res.outputs.plots.iter().all(|p| p.is_file()) && res.outputs.plots.len() == 3);
    // A run is a pure function of its spec.
    let again = task.run(&res.runs[3].spec, &mut |_| {}).unwrap();
    let first = task.run(&res.runs[3].spec, &mut |_| {}).unwrap();
    assert_eq!(again.steps, first.steps);
    assert_eq!(again.evals, first.evals);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_setups_and_specs_are_typed_errors() {
    let mut s = setup();
    s.wordnet = PathBuf::from("/nonexistent/data.noun");
    assert!(matches!(TransformerTask::prepare(s), Err(Error::Finetune(m)) if m.contains("/nonexistent/data.noun")));
    let mut s = setup();
    s.clean_subset = 0;
    assert!(matches!(TransformerTask::prepare(s), Err(Error::InvalidSpec(_))));
    let mut s = setup();
    s.adapt_from = 6;
    assert!(matches!(TransformerTask::prepare(s), Err(Error::Finetune(m)) if m.contains("adapt-from")));
    let task = TransformerTask::prepare(setup()).unwrap();
    let mut rs = spec(vec![Method::Lora]).runs()[0].clone();
    rs.task = "digits-rot".into();
    assert!(matches!(task.run(&rs, &mut |_| {}), Err(Error::InvalidSpec(_))));
    rs.task = TASK.into();
    rs.steps = 0;
    assert!(matches!(task.run(&rs, &mut |_| {}), Err(Error::InvalidSpec(_))));
}
