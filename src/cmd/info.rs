//! `llmem info`: what this build runs on this machine (version, CPU model, kernel level
//! and the levels `LLMEM_CPU` may pick, threads, memory), as text or JSON.

use clap::{Args, ValueEnum};
use llmem_kernels::cpu::{self, CpuLevel};
use serde_json::json;

#[derive(Args)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// The CPU's name from /proc/cpuinfo: its `model name` line (x86) or `Model` line (some
/// ARM kernels).
fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let level = cpu::level();
    let available: Vec<&str> = CpuLevel::available().iter().map(|l| l.name()).collect();
    let threads = rayon::current_num_threads();
    let memory = super::physical_memory_bytes().ok();
    let model = cpu_model();
    match args.format {
        Format::Json => {
            let v = json!({
                "version": env!("CARGO_PKG_VERSION"),
                "arch": std::env::consts::ARCH,
                "cpu_model": model,
                "cpu_kernels": level.name(),
                "cpu_kernels_detail": level.describe(),
                "cpu_kernels_detected": CpuLevel::detected().name(),
                "cpu_kernels_available": available,
                "threads": threads,
                "memory_bytes": memory,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Text => {
            println!("llmem {}", env!("CARGO_PKG_VERSION"));
            println!(
                "cpu:          {} ({})",
                model.as_deref().unwrap_or("unknown model"),
                std::env::consts::ARCH
            );
            println!("cpu kernels:  {}", level.describe());
            println!(
                "levels:       {} (LLMEM_CPU picks one at or below {})",
                available.join(", "),
                CpuLevel::detected()
            );
            println!("threads:      {threads} (RAYON_NUM_THREADS sets them)");
            if let Some(m) = memory {
                println!("memory:       {}", llmem_planner::human_bytes(m));
            }
        }
    }
    Ok(())
}
