//! `llmem import MODEL.gguf OUT_DIR [--dtype f32|f16|bf16]`: convert a llama-architecture
//! GGUF file into a Hugging Face model directory that every other subcommand can load.

use std::path::PathBuf;

use llmem_engine::weights::gguf::convert::{convert_gguf, ConvertOptions, OutDtype};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The GGUF file to convert (llama architecture; any ggml quantization candle reads).
    pub gguf: PathBuf,
    /// Output directory: config.json, model.safetensors, tokenizer.json, ... are written here.
    pub out_dir: PathBuf,
    /// Dtype of the written weights (quantized tensors are dequantized exactly to f32 first).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: OutDtype,
}

fn parse_dtype(s: &str) -> Result<OutDtype, String> {
    s.parse()
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let opts = ConvertOptions {
        dtype: args.dtype,
        progress: true,
    };
    // The engine's errors already name the file, tensor or key.
    let summary = convert_gguf(&args.gguf, &args.out_dir, &opts)?;
    let p = &summary.params;
    println!(
        "imported {} -> {}",
        args.gguf.display(),
        summary.out_dir.display()
    );
    println!(
        "  model:   llama, {} layers, hidden {}, heads {}/{} (kv), head_dim {}, vocab {}, rope_theta {}{}",
        p.num_hidden_layers,
        p.hidden_size,
        p.num_attention_heads,
        p.num_key_value_heads,
        p.head_dim,
        p.vocab_size,
        p.rope_theta,
        if p.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        }
    );
    println!(
        "  weights: {} tensors, {} parameters, {} ({} bytes) as {}",
        summary.tensors,
        summary.parameters,
        human_bytes(summary.safetensors_bytes),
        summary.safetensors_bytes,
        summary.dtype
    );
    for f in &summary.files {
        println!("  wrote    {}", f.display());
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
