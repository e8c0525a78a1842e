//! `switchyard trace ...` (in progress).
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum TraceCommand {
    /// Summarise a trace.
    Stats {
        #[arg(long)]
        trace: std::path::PathBuf,
    },
}

pub fn run(_c: TraceCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
