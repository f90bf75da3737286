//! The KV cache flags `serve` and `bench` share, and the one place that turns them into
//! a [`KvSizing`]: a block count, or a memory budget the planner's arithmetic splits
//! into weights, activations, runtime overhead and whole blocks.

use llmem_engine::cache::paged::KvDtype;
use llmem_engine::device::OpenedDevice;
use llmem_engine::engine::{KvSizing, DEFAULT_BLOCK_SIZE};

use super::load::DtypeArg;

/// How big the KV cache is and what it stores. `--kv-blocks`, `--memory-budget` and
/// `--memory-utilization` exclude each other; without any, each command has its default.
#[derive(clap::Args, Debug, Clone)]
pub struct KvArgs {
    /// KV cache size in blocks (no budget arithmetic). Default: `serve` sizes from a
    /// 2GiB budget; `bench` gives every sequence of its largest run its full length.
    #[arg(long, conflicts_with_all = ["memory_budget", "memory_utilization"],
          value_parser = super::positive_arg)]
    pub kv_blocks: Option<u64>,
    /// Size everything from this memory budget (e.g. 2GiB): weights, activations and the
    /// runtime overhead are subtracted first, the rest becomes KV blocks.
    #[arg(long, conflicts_with = "memory_utilization", value_parser = super::bytes_arg)]
    pub memory_budget: Option<u64>,
    /// Size the budget as this share (0 < F <= 1) of physical memory (MemTotal of
    /// /proc/meminfo), or of the device's total on a GPU, then as --memory-budget.
    #[arg(long, value_parser = super::utilization_arg, allow_hyphen_values = true)]
    pub memory_utilization: Option<f64>,
    /// Runtime overhead subtracted from the budget. Default on a GPU: the CUDA context
    /// measured at start-up; on the CPU: `serve` measures the resident set before the
    /// model loads, `bench` counts 0.
    #[arg(long, value_parser = super::bytes_arg)]
    pub runtime_overhead: Option<u64>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE as u64, value_parser = super::positive_arg)]
    pub block_size: u64,
    /// Tokens per sequence at most, prompt included. Default: `serve`, the model's
    /// context; `bench`, its longest request, capped by the model's context.
    #[arg(long, value_parser = super::positive_arg)]
    pub max_model_len: Option<u64>,
    /// Tokens in one forward pass at most (prefill chunks plus decodes).
    #[arg(long, default_value_t = 2048, value_parser = super::positive_arg)]
    pub max_batched_tokens: u64,
    /// KV cache element type: f32, f16, bf16, or the block formats q8_0 and q4_0 (CPU)
    /// (default: the weights' dtype; f32 under a block format or a GGUF run as stored).
    #[arg(long, value_parser = parse_kv_dtype)]
    pub kv_dtype: Option<KvDtype>,
}

impl KvArgs {
    /// `--kv-dtype`, else the dtype of the weights `--dtype` asks for (block formats and
    /// GGUF files as stored compute in f32).
    pub fn kv_dtype_for(&self, dtype: Option<DtypeArg>) -> KvDtype {
        self.kv_dtype.unwrap_or(match dtype {
            Some(DtypeArg::Bf16) => KvDtype::Bf16,
            Some(DtypeArg::F16) => KvDtype::F16,
            _ => KvDtype::F32,
        })
    }

    /// With --memory-utilization: the fraction and the memory it applies to, physical
    /// memory on the CPU, the device's total on a GPU (as vLLM's gpu_memory_utilization).
    pub fn utilization(&self, opened: &OpenedDevice) -> anyhow::Result<Option<(f64, u64)>> {
        Ok(match (self.memory_utilization, opened.after) {
            (Some(f), Some(mem)) => Some((f, mem.total_bytes)),
            (Some(f), None) => Some((f, super::physical_memory_bytes()?)),
            (None, _) => None,
        })
    }

    /// The runtime overhead: as given, else the CUDA context on a GPU, else `cpu_default`.
    pub fn overhead(&self, opened: &OpenedDevice, cpu_default: u64) -> u64 {
        match (self.runtime_overhead, opened.after) {
            (Some(o), _) => o,
            (None, Some(_)) => opened.context_bytes(),
            (None, None) => cpu_default,
        }
    }

    /// How to size the cache: --kv-blocks, else the budget, else `otherwise`.
    pub fn sizing(&self, utilization: Option<(f64, u64)>, otherwise: KvSizing) -> KvSizing {
        match (self.kv_blocks, self.memory_budget, utilization) {
            (Some(n), _, _) => KvSizing::Blocks(n as usize),
            (None, Some(b), _) => KvSizing::Budget(b),
            // f is in (0, 1]: the product fits u64.
            (None, None, Some((f, total))) => KvSizing::Budget((total as f64 * f) as u64),
            (None, None, None) => otherwise,
        }
    }
}

/// `--kv-dtype`, checked before anything loads.
pub fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    KvDtype::parse(s).map_err(|e| e.to_string())
}
