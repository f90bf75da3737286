//! The `llmem` command line: a thin layer over the `llmem-planner` and `llmem-engine`
//! libraries. Each subcommand lives in `src/cmd/`; `main` only parses, dispatches and
//! turns errors into one line on stderr with exit code 2.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use llmem::{cmd, serve};

#[derive(Parser)]
#[command(
    name = "llmem",
    version,
    about = "An LLM inference engine that is also a memory lab",
    long_about = "llmem turns a model into GPU memory twice: the math (a capacity planner) \
                  and the benchmark (a small Llama runtime that reports where memory went)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Plan GPU memory for a model, a workload and a deployment.
    Plan(cmd::plan::PlanArgs),
    /// Show a model's parameter table (embedding, layers, LM head, norms) and bytes.
    Inspect(cmd::inspect::InspectArgs),
    /// Generate text with a model, streaming tokens as they come.
    Generate(cmd::generate::GenerateArgs),
    /// Measure perplexity over non-overlapping windows of a text file.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Convert a llama-architecture GGUF file into a Hugging Face model directory.
    Import(cmd::import::ImportArgs),
    /// Benchmark the paged engine: throughput, latency and KV use at several concurrencies.
    Bench(cmd::bench::BenchArgs),
    /// Serve the model over OpenAI's HTTP API, with live memory per component (`/v1/memory`,
    /// `/metrics`, a dashboard at `/`).
    Serve(serve::ServeArgs),
    /// Measure each weight precision: bytes, load time, perplexity, KL and top-1
    /// agreement with the highest precision, prefill and decode speed.
    Sweep(cmd::sweep::SweepArgs),
    /// Show this build and this machine: version, CPU, kernel level (and the levels
    /// `LLMEM_CPU` may choose), threads, memory.
    Info(cmd::info::InfoArgs),
    /// Check a GPU without model files: the CUDA kernels against the CPU kernels and a
    /// random-weights model on the GPU against the same model on the CPU.
    GpuCheck(cmd::gpucheck::GpuCheckArgs),
}

fn main() -> ExitCode {
    llmem::procfs::keep_freed_blocks();
    // The kernel level first: a bad LLMEM_CPU stops here, before any work.
    let level = match llmem_kernels::cpu::init() {
        Ok(l) => l,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = llmem_engine::weights::pages::check_env() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    llmem_engine::weights::pages::use_by_default();
    let version = format!(
        "{} (cpu kernels: {})",
        env!("CARGO_PKG_VERSION"),
        level.describe()
    );
    // clap takes a `'static` version; this string lives as long as the process anyway.
    let version: &'static str = Box::leak(version.into_boxed_str());
    let matches = Cli::command()
        .version(version)
        .long_version(version)
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Plan(args) => cmd::plan::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Import(args) => cmd::import::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Sweep(args) => cmd::sweep::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::GpuCheck(args) => cmd::gpucheck::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
