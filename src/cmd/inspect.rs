//! `llmem inspect`: the parameter table of any model, with bytes at a precision, and
//! for a model directory the exact stored bytes read from its safetensors headers.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use llmem_planner::checkpoint::read_checkpoint;
use llmem_planner::gpu::grouped;
use llmem_planner::{human_bytes, report, Precision};
use serde_json::json;

use super::Format;

#[derive(Args)]
pub struct InspectArgs {
    /// A preset name, a config.json, a model directory or a llama .gguf file.
    #[arg(default_value = "smollm2-135m")]
    pub model: String,
    /// Precision for the bytes column.
    #[arg(long, default_value = "fp16")]
    pub precision: String,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// List the built-in presets and exit.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    if args.list {
        for name in llmem_planner::preset_names() {
            let shape = llmem_planner::preset(name)?;
            println!(
                "  {:<16} {:>17} params",
                name,
                grouped(shape.params().total)
            );
        }
        return Ok(());
    }
    let precision: Precision = args.precision.parse()?;
    let (shape, stored) = match super::load::gguf_shape(&args.model)? {
        // A GGUF: its own tensor table, summed per ggml type by the planner.
        Some(t) => (t.shape, Some(t.summary)),
        None => {
            let shape = llmem_planner::resolve_shape(&args.model)?;
            let path = Path::new(&args.model);
            let dir = if path.is_dir() {
                Some(path)
            } else if path.is_file() {
                path.parent()
            } else {
                None
            };
            let stored = match dir {
                Some(d) => read_checkpoint(d)?,
                None => None,
            };
            (shape, stored)
        }
    };
    match args.format {
        Format::Json => {
            let value = json!({
                "model": shape,
                "params_total": shape.params().total,
                "params": shape.params(),
                "precision": precision,
                "checkpoint": stored,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Text | Format::Markdown => {
            print!("{}", report::inspect_text(&shape, precision)?);
            if let Some(s) = stored {
                println!();
                print!("{}", stored_text(&s));
                let derived = shape.params().total;
                if s.params != derived {
                    println!(
                        "  note: the checkpoint stores {} params, config.json implies {} ({})",
                        grouped(s.params),
                        grouped(derived),
                        if s.params > derived {
                            "extra tensors such as a stored copy of a tied LM head or rotary buffers"
                        } else {
                            "tensors missing from the checkpoint"
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// The stored bytes of a checkpoint or GGUF file, in all and per dtype, one line each.
pub fn stored_text(s: &llmem_planner::checkpoint::CheckpointSummary) -> String {
    let mut out = format!(
        "  stored in {} file(s): {} tensors, {} params, {} B ({})\n",
        s.files.len(),
        s.tensors,
        grouped(s.params),
        grouped(s.bytes),
        human_bytes(s.bytes)
    );
    for (dtype, t) in &s.by_dtype {
        out.push_str(&format!(
            "    {:<6} {:>5} tensors {:>17} params {:>17} B\n",
            dtype,
            t.tensors,
            grouped(t.params),
            grouped(t.bytes)
        ));
    }
    out
}
