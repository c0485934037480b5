//! Where the time of a weight-space (factored) step goes, piece by piece:
//! the Gram matrices of one 4096 x 8 adapter on ndarray and on the
//! prototype kernels, and `perturb` and `step` of the whole 1e7 set.
//! `cargo run --release -p mgpo-bench --example profile_weight`

use std::time::Instant;

use mgpo_bench::proto::ProtoNd;
use mgpo_bench::sizes::LoraShape;
use mgpo_bench::step::{filled, StepBench, Variant};
use mgpo_core::{lowrank::sum_of_products_sq, HostIo, TensorOps};
use mgpo_ndarray::NdBackend;

fn per_call(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn grams<B: TensorOps + HostIo>(name: &str, be: B) {
    let (d, r) = (4096, 8);
    let b = be.from_f64(&[d, r], &filled(d * r, 1, 1.0)).unwrap();
    let mb = be.from_f64(&[d, r], &filled(d * r, 2, 1.0)).unwrap();
    let a = be.from_f64(&[r, d], &filled(d * r, 3, 1.0)).unwrap();
    let ma = be.from_f64(&[r, d], &filled(d * r, 4, 1.0)).unwrap();
    let gc = per_call(200, || drop(be.gram_cols(&mb, &b).unwrap()));
    let gcs = per_call(200, || drop(be.gram_cols(&b, &b).unwrap()));
    let gr = per_call(200, || drop(be.gram_rows(&a, &ma).unwrap()));
    let grs = per_call(200, || drop(be.gram_rows(&a, &a).unwrap()));
    let sp = per_call(100, || {
        std::hint::black_box(sum_of_products_sq(&be, &mb, &a, &b, &ma).unwrap());
    });
    println!("{name:10} gram_cols {:.1} us (sym {:.1}), gram_rows {:.1} us (sym {:.1}), one norm {:.1} us", gc * 1e6, gcs * 1e6, gr * 1e6, grs * 1e6, sp * 1e6);
}

fn main() {
    grams("ndarray", NdBackend::<f32>::new());
    grams("prototype", ProtoNd::new());
    let shape = LoraShape::for_params(10_000_000);
    for v in [Variant::Adamw, Variant::MgpoWeight] {
        let mut b = StepBench::new(ProtoNd::new(), shape, v).unwrap();
        let t = per_call(5, || b.step().unwrap());
        println!("prototype {} step at 1e7: {:.1} ms", v.name(), t * 1e3);
    }
}
