//! `mgpo demo` and `mgpo experiment` (issue 6: being written).

#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {}

pub fn demo(_args: DemoArgs) -> Result<bool, String> {
    Err("`mgpo demo` is not available yet".into())
}

pub fn experiment(_args: ExperimentArgs) -> Result<bool, String> {
    Err("`mgpo experiment` is not available yet".into())
}
