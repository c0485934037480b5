//! `mgpo conformance`: every requested backend and dtype on every vector.

use std::path::{Path, PathBuf};

use mgpo_conformance::{run_dir, table, Row};

use crate::Dtype;

type Runner = Box<dyn Fn(&Path) -> Result<Vec<Row>, String>>;

/// The compiled backends: (name, dtype, runner).
fn backends() -> Vec<(&'static str, Dtype, Runner)> {
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Dtype, Runner)> = vec![
        ("ndarray", Dtype::F32, Box::new(|d: &Path| run_dir(&mgpo_ndarray::NdBackend::<f32>::new(), d))),
        ("ndarray", Dtype::F64, Box::new(|d: &Path| run_dir(&mgpo_ndarray::NdBackend::<f64>::new(), d))),
    ];
    #[cfg(feature = "candle")]
    {
        v.push(("candle", Dtype::F32, Box::new(|d: &Path| run_dir(&mgpo_candle::cpu_f32(), d))));
        v.push(("candle", Dtype::F64, Box::new(|d: &Path| run_dir(&mgpo_candle::cpu_f64(), d))));
    }
    #[cfg(feature = "tch")]
    {
        v.push(("tch", Dtype::F32, Box::new(|d: &Path| run_dir(&mgpo_tch::cpu_f32(), d))));
        v.push(("tch", Dtype::F64, Box::new(|d: &Path| run_dir(&mgpo_tch::cpu_f64(), d))));
    }
    #[cfg(feature = "dfdx")]
    {
        v.push(("dfdx", Dtype::F32, Box::new(|d: &Path| run_dir(&mgpo_dfdx::cpu_f32(), d))));
        v.push(("dfdx", Dtype::F64, Box::new(|d: &Path| run_dir(&mgpo_dfdx::cpu_f64(), d))));
    }
    #[cfg(feature = "burn")]
    {
        v.push(("burn", Dtype::F32, Box::new(|d: &Path| run_dir(&mgpo_burn::cpu_f32(), d))));
        v.push(("burn", Dtype::F64, Box::new(|d: &Path| run_dir(&mgpo_burn::cpu_f64(), d))));
    }
    v
}

/// Prints one table per vector directory; Ok(false) when anything failed.
pub fn run(dirs: &[PathBuf], backend: &str, dtype: Dtype) -> Result<bool, String> {
    let all = backends();
    let names: Vec<&str> = {
        let mut n: Vec<&str> = all.iter().map(|b| b.0).collect();
        n.dedup();
        n
    };
    if backend != "all" && !names.contains(&backend) {
        return Err(format!(
            "backend `{backend}` is not compiled into this binary (compiled: {}; enable a cargo feature of mgpo-cli for the others)",
            names.join(", ")
        ));
    }
    let chosen: Vec<_> = all
        .iter()
        .filter(|(n, d, _)| (backend == "all" || *n == backend) && (dtype == Dtype::All || *d == dtype))
        .collect();
    let mut ok = true;
    for dir in dirs {
        println!("vectors: {}", dir.display());
        let mut rows: Vec<(String, Row)> = Vec::new();
        for (name, d, runner) in &chosen {
            let label = format!("{name}/{}", if *d == Dtype::F32 { "f32" } else { "f64" });
            let rs = runner(dir).map_err(|e| format!("cannot read vectors: {e}"))?;
            rows.extend(rs.into_iter().map(|r| (label.clone(), r)));
        }
        rows.sort_by(|a, b| (&a.1.file, &a.0).cmp(&(&b.1.file, &b.0)));
        print!("{}", table(&rows.iter().map(|(l, r)| (l.as_str(), r)).collect::<Vec<_>>()));
        let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
        let failed = rows.iter().filter(|r| !r.passed()).count();
        println!("{} passed, {} failed\n", rows.len() - failed, failed);
        ok &= failed == 0;
    }
    Ok(ok)
}
