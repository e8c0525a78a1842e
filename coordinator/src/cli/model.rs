//! `switchyard model ...` and `switchyard generate` (in progress).
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Print what a checkpoint holds.
    Info {
        #[arg(long)]
        model: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: std::path::PathBuf,
}

pub fn run(_c: ModelCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

pub fn generate(_a: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
