//! One module per subcommand: clap arguments plus a `run` that returns `anyhow::Result`.

pub mod generate;
pub mod import;
pub mod inspect;
pub mod perplexity;
pub mod plan;
