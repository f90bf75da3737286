//! One module per subcommand: clap arguments plus a `run` that returns `anyhow::Result`.
//! Shared argument parsers live here so every subcommand reads sizes the same way.

pub mod bench;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod perplexity;
pub mod plan;

/// Output formats shared by the subcommands.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

/// A positive integer; zero and negative values get a message that says so.
pub fn positive_arg(s: &str) -> Result<u64, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if n > 0 && n <= u64::MAX as i128 => Ok(n as u64),
        Ok(n) if n <= 0 => Err(format!("{n} is not allowed: it must be a positive integer")),
        _ => Err(format!("{s:?} is not a positive integer")),
    }
}

/// A byte size such as 80GB, 80GiB or 1073741824.
pub fn bytes_arg(s: &str) -> Result<u64, String> {
    llmem_planner::parse_bytes(s).map_err(|e| e.to_string())
}

/// A fraction between 0 and 1.
pub fn fraction_arg(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "{s:?} must be a fraction between 0 and 1 (0.1 = 10%)"
        )),
    }
}
