//! `llmem perplexity`: not built yet (engine issue).

#[derive(clap::Args)]
pub struct PerplexityArgs {}

pub fn run(_args: PerplexityArgs) -> anyhow::Result<()> {
    anyhow::bail!("`llmem perplexity` is not implemented yet")
}
