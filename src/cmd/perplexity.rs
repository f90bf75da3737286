//! `llmem perplexity`: perplexity of a model on a text file over non-overlapping windows
//! (the method of `llmem_engine::eval::perplexity`).

use std::path::PathBuf;

use anyhow::Context;
use llmem_engine::eval::perplexity::{perplexity, METHOD};

use super::generate::OutputFormat;
use super::load::{load, DtypeArg};

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    /// A Hugging Face model directory, a llama .gguf file, or the built-in `smollm2-135m`.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Score the first N tokens of the file.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Tokens per window; each window is one forward pass from an empty cache.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Weight dtype (see `llmem generate --help`). Default: f32 for a model directory,
    /// each tensor as stored for a .gguf file.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let loaded = load(&args.model, args.dtype)?;
    let encoding = loaded
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", args.text.display()))?;
    let ids = encoding.get_ids();
    if ids.len() < args.tokens {
        anyhow::bail!(
            "{} has {} tokens, fewer than --tokens {}",
            args.text.display(),
            ids.len(),
            args.tokens
        );
    }
    let ids = &ids[..args.tokens];
    let text_mode = args.format == OutputFormat::Text;
    if text_mode {
        println!("method: {METHOD}");
        println!(
            "model {} ({}), {} tokens, window {}",
            loaded.dir.display(),
            loaded.dtype_name,
            ids.len(),
            args.window
        );
    }
    let start = std::time::Instant::now();
    let report = perplexity(&loaded.model, ids, args.window, |w, nll| {
        eprintln!("window {w}: nll sum {nll:.6}");
    })?;
    let elapsed_s = start.elapsed().as_secs_f64();
    if text_mode {
        if report.tokens < ids.len() {
            println!(
                "({} trailing tokens do not fill a window and are left out)",
                ids.len() - report.tokens
            );
        }
        println!(
            "perplexity: {:.4} over {} predictions in {} windows ({elapsed_s:.1} s)",
            report.perplexity, report.predictions, report.windows
        );
    } else {
        let json = serde_json::json!({
            "model": loaded.dir.display().to_string(),
            "dtype": loaded.dtype_name,
            "method": METHOD,
            "report": report,
            "seconds": elapsed_s,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}
