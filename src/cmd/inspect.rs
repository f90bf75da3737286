//! `llmem inspect`.

#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("`llmem inspect` is not implemented yet")
}
