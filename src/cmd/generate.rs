//! `llmem generate`: not built yet (engine issue).

#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`llmem generate` is not implemented yet")
}
