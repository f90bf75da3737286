//! `llmem import`: not built yet (engine issue).

#[derive(clap::Args)]
pub struct ImportArgs {}

pub fn run(_args: ImportArgs) -> anyhow::Result<()> {
    anyhow::bail!("`llmem import` is not implemented yet")
}
