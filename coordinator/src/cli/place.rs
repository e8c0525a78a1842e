//! `switchyard place ...` (in progress).
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum PlaceCommand {
    /// Evaluate a placement on a trace.
    Eval {
        #[arg(long)]
        placement: std::path::PathBuf,
    },
}

pub fn run(_c: PlaceCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
