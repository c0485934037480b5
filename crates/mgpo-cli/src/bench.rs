//! `mgpo bench` (issue 7: being written).

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<bool, String> {
    Err("`mgpo bench` is not available yet".into())
}
