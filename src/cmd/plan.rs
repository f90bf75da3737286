//! `llmem plan`.

#[derive(clap::Args)]
pub struct PlanArgs {}

pub fn run(_args: PlanArgs) -> anyhow::Result<()> {
    anyhow::bail!("`llmem plan` is not implemented yet")
}
