//! One module per subcommand: clap arguments plus a `run` that returns `anyhow::Result`.
//! Shared argument parsers live here so every subcommand reads sizes the same way.

pub mod bench;
pub mod generate;
pub mod gpucheck;
pub mod import;
pub mod info;
pub mod inspect;
pub mod kv;
pub mod load;
pub mod perplexity;
pub mod plan;
pub mod sweep;
pub mod trace;

use llmem_engine::engine::Engine;
use llmem_engine::parallel::spec::ParallelSpec;

/// A progress bar on stderr for `total` tokens with a live message, drawn only when stdout
/// and stderr are terminals (hidden when output goes to a file or a pipe).
pub fn live_bar(total: u64, prefix: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:24}] {pos}/{len} tokens {per_sec} | {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// One line of live memory: KV blocks in use and their bytes, requests, and the
/// process's resident set.
pub fn memory_line(s: &llmem_engine::engine::EngineStats, block_bytes: u64) -> String {
    let rss = rss_text();
    format!(
        "KV {}/{} blocks ({}) | running {} waiting {} | preempted {} | rss {rss}",
        s.blocks_used,
        s.blocks_total,
        llmem_planner::human_bytes(s.blocks_used as u64 * block_bytes),
        s.running,
        s.waiting,
        s.preemptions,
    )
}

/// The process's resident set, human-readable ("?" where /proc cannot tell).
/// The kernel level every report names (`"cpu_kernels"` in JSON): `scalar`, `avx2`,
/// `avx512` or `neon`, after `LLMEM_CPU`'s cap.
pub fn cpu_kernels() -> &'static str {
    llmem_kernels::cpu::level().name()
}

pub fn rss_text() -> String {
    crate::procfs::process_rss_bytes()
        .map(llmem_planner::human_bytes)
        .unwrap_or_else(|| "?".into())
}

/// Output formats shared by the subcommands.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

/// `--tp N --pp M [--vocab-parallel]`, shared by `generate`, `bench` (and `serve`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ParallelArgs {
    /// Tensor-parallel degree: ranks (threads on the CPU) each holding a shard of every
    /// layer and its own KV heads; must divide the attention heads.
    #[arg(long, default_value_t = 1, value_parser = positive_arg)]
    pub tp: u64,
    /// Pipeline-parallel stages: consecutive layers per stage, stage 0 holds the
    /// embedding and the last the LM head.
    #[arg(long, default_value_t = 1, value_parser = positive_arg)]
    pub pp: u64,
    /// Split the embedding and LM head by vocabulary across TP ranks instead of
    /// replicating them.
    #[arg(long)]
    pub vocab_parallel: bool,
    /// Under PP: cut each pass into up to N micro-batches of whole sequences so the
    /// stages work at the same time. Default 1 (stages one after the other): on the CPU
    /// the stages share the cores, and each already uses them all (docs/parallel.md).
    #[arg(long, default_value_t = 1, value_parser = positive_arg)]
    pub micro_batches: u64,
}

impl ParallelArgs {
    /// `--micro-batches`.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches as usize
    }

    /// Whether these flags ask for more than one rank.
    pub fn is_parallel(&self) -> bool {
        self.tp > 1 || self.pp > 1
    }

    /// The checked spec for `shape`: a TP degree that does not split the heads is
    /// refused with the degrees that would.
    pub fn spec(&self, shape: &llmem_planner::ModelShape) -> anyhow::Result<ParallelSpec> {
        let spec = ParallelSpec {
            tp: usize::try_from(self.tp)?,
            pp: usize::try_from(self.pp)?,
            vocab_parallel: self.vocab_parallel,
        };
        spec.validate(shape)?;
        Ok(spec)
    }
}

/// `--device` and `--random-weights`, shared by `generate`, `bench` and `serve`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// Where the model, its KV cache and activations live: cpu, cuda or cuda:N (CUDA
    /// needs a build with the `cuda` feature: scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Instead of loading --model, build a model of this shape with random weights
    /// seeded by --seed: a planner preset (`llama-3-8b`, `smollm2-135m`, ...) or a
    /// config.json (or its directory). There is no tokenizer: prompts are token ids.
    #[arg(long, value_name = "PRESET_OR_CONFIG")]
    pub random_weights: Option<String>,
}

impl RuntimeArgs {
    /// The device asked for, opened (on CUDA: with the context's cost measured).
    pub fn open_device(&self) -> anyhow::Result<llmem_engine::device::OpenedDevice> {
        let spec = llmem_engine::device::DeviceSpec::parse(&self.device)?;
        Ok(llmem_engine::device::open_measured(spec)?)
    }

    /// The shape of `--random-weights`, if given: a preset name first, then a path.
    pub fn random_shape(&self) -> anyhow::Result<Option<llmem_planner::ModelShape>> {
        let Some(name) = &self.random_weights else {
            return Ok(None);
        };
        if let Ok(shape) = llmem_planner::preset(name) {
            return Ok(Some(shape));
        }
        let path = std::path::Path::new(name);
        if path.exists() {
            return Ok(Some(llmem_planner::ModelShape::from_path(path)?));
        }
        anyhow::bail!(
            "--random-weights {name:?} is neither a planner preset ({}) nor a config.json path",
            llmem_planner::preset_names().join(", ")
        )
    }
}

/// The PP split and each rank's weights, KV cache and activation peak, with the
/// planner's per-GPU prediction for the same split beside each.
pub fn rank_report(engine: &Engine) -> String {
    use llmem_planner::human_bytes as h;
    let spec = engine.parallel_spec();
    let mut out = format!(
        "TP {} x PP {} ({} embedding); {}\n",
        spec.tp,
        spec.pp,
        if spec.vocab_parallel {
            "vocab-parallel"
        } else {
            "replicated"
        },
        spec.describe_split(engine.shape())
    );
    let planned = engine.planned_rank_memory();
    out.push_str(
        "stage rank  layers     weights (planner)              KV cache (planner)             activations (planner)\n",
    );
    for (i, m) in engine.rank_memory().iter().enumerate() {
        let p = planned.as_ref().ok().and_then(|p| p.get(i));
        let beside = |v: Option<u64>| v.map_or("-".to_string(), h);
        out.push_str(&format!(
            "{:>5} {:>4}  {:>2}-{:<4}  {:>12} ({:>12})  {:>12} ({:>12})  {:>12} ({:>12})\n",
            m.stage,
            m.tp_rank,
            m.first_layer,
            m.first_layer + m.num_layers - 1,
            h(m.weights_bytes),
            beside(p.map(|p| p.weights_bytes)),
            h(m.kv_cache_bytes),
            beside(p.map(|p| p.kv_cache_bytes)),
            h(m.activation_peak_bytes),
            beside(p.map(|p| p.activation_bytes)),
        ));
    }
    if let Err(e) = planned {
        out.push_str(&format!("planner: no prediction ({e})\n"));
    }
    out.trim_end().to_string()
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

/// A fraction above 0 and at most 1 (a share of memory to use).
pub fn utilization_arg(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{s:?} must be a fraction above 0 and at most 1 (0.5 = half of physical memory)"
        )),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    crate::procfs::proc_kib_field(meminfo, "MemTotal")
}

/// Physical memory of this machine (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn physical_memory_bytes() -> anyhow::Result<u64> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {path} to find the physical memory ({e}); \
             use --memory-budget or --kv-blocks instead"
        )
    })?;
    parse_mem_total(&text).ok_or_else(|| {
        anyhow::anyhow!("no MemTotal line in {path}; use --memory-budget or --kv-blocks instead")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_above_zero_and_at_most_one() {
        assert_eq!(utilization_arg("0.5"), Ok(0.5));
        assert_eq!(utilization_arg("1"), Ok(1.0));
        for bad in ["0", "-0.1", "1.01", "NaN", "half"] {
            assert!(
                utilization_arg(bad).unwrap_err().contains("above 0"),
                "{bad}"
            );
        }
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemFree:  10 kB\nMemTotal:       16384 kB\nMemAvailable: 5 kB\n";
        assert_eq!(parse_mem_total(text), Some(16384 * 1024));
        assert_eq!(parse_mem_total("MemFree: 10 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
    }
}
