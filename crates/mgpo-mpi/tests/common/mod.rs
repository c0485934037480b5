//! What the mpirun tests share: the example binary and how Open MPI is
//! started on one machine (see tests/mpirun.rs for why each setting).

use std::process::Command;
use std::sync::Mutex;

/// One mpirun at a time: 4-rank jobs side by side on 2 cores only slow each other.
pub static MPIRUN: Mutex<()> = Mutex::new(());

/// The example examples/data_parallel.rs, built by cargo as the binary
/// `mgpo-data-parallel` before the tests run.
pub fn example() -> &'static str {
    env!("CARGO_BIN_EXE_mgpo-data-parallel")
}

/// `mpirun -np N <example>`, configured for this machine through the environment.
pub fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string(), "--timeout", "300"]).arg(example());
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_btl", "self,vader")
        .env("RAYON_NUM_THREADS", "1");
    c
}
