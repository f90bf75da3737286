//! Sizing the KV cache the planner's way: from a memory budget subtract the weights (the
//! model's own accounting), the activation peak of the largest pass and the runtime
//! overhead; what is left becomes whole KV blocks. Beside it, the planner's own figures
//! for the same model and workload ([`planned_terms`]), so start-up can print both.

use std::fmt;
use std::sync::Arc;

use llmem_planner::{human_bytes, AttentionImpl, Deployment, StoredTensor, Workload};

use crate::cache::paged::block_bytes;
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::Model;

// ---- sizing --------------------------------------------------------------------------

/// How many KV blocks to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSizing {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as fit in this many bytes after weights, activations and the
    /// runtime overhead.
    Budget(u64),
}

/// The planner's prediction for the same model, workload and dtypes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTerms {
    pub weights_bytes: u64,
    /// Fused attention (the paged kernel never materialises scores).
    pub activation_bytes: u64,
    /// KV for `max_num_seqs` sequences of `max_model_len` tokens (the demand, not what
    /// the budget holds).
    pub kv_cache_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// The largest number of `max_model_len`-token sequences the planner fits in the
    /// budget (`llmem_planner::max_concurrency`).
    pub max_concurrency: u64,
}

/// A memory budget broken into the planner's terms, as the engine measured them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetReport {
    pub budget_bytes: u64,
    /// The model's own accounting of the tensors it holds.
    pub weights_bytes: u64,
    /// `Model::paged_activation_peak_bytes` of the largest pass, `pass_tokens` tokens.
    pub activation_bytes: u64,
    /// `max_batched_tokens`, capped (as the planner caps it) by what `max_num_seqs`
    /// sequences of `max_model_len` tokens could ever feed at once.
    pub pass_tokens: usize,
    /// Stated, not measured: 0 on the CPU unless given.
    pub runtime_overhead_bytes: u64,
    pub block_bytes: u64,
    pub block_size: usize,
    pub num_blocks: usize,
    /// num_blocks x block_bytes.
    pub kv_cache_bytes: u64,
    /// Budget left over: less than one block.
    pub unused_bytes: u64,
    pub max_model_len: usize,
    /// Sequences of `max_model_len` tokens the blocks hold at once:
    /// `num_blocks / ceil(max_model_len / block_size)`.
    pub max_concurrency: usize,
    /// The planner's figures, or why it could not plan.
    pub planned: std::result::Result<PlannedTerms, String>,
}

impl KvSizing {
    /// The number of blocks for `config` (whose `num_blocks` is ignored), and for a
    /// budget the report of how it was split. Errors when a budget cannot hold one
    /// sequence of `max_model_len` tokens, saying how many bytes are missing.
    pub fn resolve(
        self,
        model: &Model,
        config: &EngineConfig,
        runtime_overhead_bytes: u64,
    ) -> Result<(usize, Option<BudgetReport>)> {
        match self {
            KvSizing::Blocks(n) => Ok((n, None)),
            KvSizing::Budget(bytes) => {
                let report = budget_report(model, config, bytes, runtime_overhead_bytes)?;
                Ok((report.num_blocks, Some(report)))
            }
        }
    }
}

/// The planner's view of an engine: weights stored as `fmt` says (the embedding kept at
/// f16 when it asks), the `spec` grid, `kv_dtype`, activations in the dtype the engine
/// computes in (f32 for block formats on the CPU), on a device of `gpu_bytes` with
/// `overhead` bytes of runtime and no headroom. Every plan the engine asks for starts here.
pub fn engine_deployment(
    fmt: &crate::weights::quant::WeightFormat,
    spec: crate::parallel::spec::ParallelSpec,
    kv_dtype: crate::cache::paged::KvDtype,
    gpu_bytes: u64,
    overhead: u64,
) -> Deployment {
    let mut d = Deployment::new(fmt.precision, llmem_planner::custom_gpu(gpu_bytes));
    d.keep_embeddings = fmt.keep_embeddings && fmt.precision.is_quantized();
    d.tp = spec.tp as u64;
    d.pp = spec.pp as u64;
    d.vocab_parallel = spec.vocab_parallel;
    d.kv_dtype = kv_dtype.planner();
    d.runtime_overhead_bytes = Some(overhead);
    d.headroom_fraction = 0.0;
    d.activation_bytes = Some(fmt.activation_dtype().size_in_bytes() as u64);
    d
}

/// What `config` serves, as the planner counts it: `max_num_seqs` sequences of
/// `max_model_len` tokens, passes of `max_batched_tokens`, the fused paged kernel.
fn engine_workload(config: &EngineConfig) -> Workload {
    Workload {
        context_tokens: config.max_model_len as u64,
        concurrency: config.max_num_seqs as u64,
        max_batched_tokens: config.max_batched_tokens as u64,
        attention: AttentionImpl::Fused,
    }
}

/// The planner's figures for `model` under `config` in a device of `budget_bytes`.
pub fn planned_terms(
    model: &Model,
    config: &EngineConfig,
    budget_bytes: u64,
    overhead: u64,
) -> std::result::Result<PlannedTerms, String> {
    // The weights' own format (a block format computes in f32 but stores its blocks).
    let workload = engine_workload(config);
    let mut deployment = engine_deployment(
        model.weight_format(),
        model.spec().parallel,
        config.kv_dtype,
        budget_bytes,
        overhead,
    );
    // A GGUF kept as stored (possibly mixed types): the planner's sum of its tensor table,
    // cut per rank.
    deployment.stored_weights_bytes = model.stored_weights().map(|s| s.bytes);
    deployment.stored_tensors = model.stored_tensors();
    let plan =
        llmem_planner::plan(model.shape(), &workload, &deployment).map_err(|e| e.to_string())?;
    let max_concurrency = llmem_planner::max_concurrency(model.shape(), &workload, &deployment)
        .map_err(|e| e.to_string())?;
    Ok(PlannedTerms {
        max_concurrency,
        weights_bytes: plan.per_gpu.weights_bytes,
        activation_bytes: plan.per_gpu.activation_bytes,
        kv_cache_bytes: plan.per_gpu.kv_cache_bytes,
        kv_bytes_per_token: plan.kv_bytes_per_token,
    })
}

/// The activation bytes the sizing reserves for `config`, and the pass they are for:
/// [`Model::paged_activation_peak_bytes`] of a pass of `max_batched_tokens` tokens,
/// capped (as the planner caps it) by what `max_num_seqs` sequences of `max_model_len`
/// tokens could ever feed at once.
pub fn pass_activation_bytes(model: &Model, config: &EngineConfig) -> (u64, usize) {
    let (pass_tokens, rows) = config.largest_pass();
    (
        model.paged_activation_peak_bytes(pass_tokens, rows),
        pass_tokens,
    )
}

/// Split `budget_bytes` into weights, activations, overhead and whole KV blocks.
pub fn budget_report(
    model: &Model,
    config: &EngineConfig,
    budget_bytes: u64,
    runtime_overhead_bytes: u64,
) -> Result<BudgetReport> {
    if config.block_size == 0 {
        return Err(Error::InvalidInput(
            "engine: block_size is 0; it must be a positive integer".into(),
        ));
    }
    let weights = model.weights_bytes();
    let (activations, pass_tokens) = pass_activation_bytes(model, config);
    let per_block = block_bytes(model.shape(), config.block_size, config.kv_dtype);
    let min_blocks = config.max_model_len.div_ceil(config.block_size) as u64;
    let overflow = || Error::InvalidInput("memory budget: the terms overflow 64 bits".into());
    let fixed = [weights, activations, runtime_overhead_bytes]
        .iter()
        .try_fold(0u64, |acc, x| acc.checked_add(*x))
        .ok_or_else(overflow)?;
    let needed = min_blocks
        .checked_mul(per_block)
        .and_then(|kv| kv.checked_add(fixed))
        .ok_or_else(overflow)?;
    if budget_bytes < needed {
        return Err(Error::InvalidInput(format!(
            "memory budget of {} ({budget_bytes} B) is {} B short: weights {} + activations {} \
             (one pass of {} tokens) + runtime overhead {} + KV for one sequence of \
             max_model_len = {} tokens ({min_blocks} blocks of {}) = {}; use a smaller \
             --max-batched-tokens, --kv-dtype bf16, a smaller --max-model-len, or a larger \
             budget",
            human_bytes(budget_bytes),
            needed - budget_bytes,
            human_bytes(weights),
            human_bytes(activations),
            pass_tokens,
            human_bytes(runtime_overhead_bytes),
            config.max_model_len,
            human_bytes(per_block),
            human_bytes(needed),
        )));
    }
    let kv_budget = budget_bytes - fixed;
    let num_blocks = (kv_budget / per_block).min(u64::from(u32::MAX));
    let kv_cache_bytes = num_blocks * per_block;
    Ok(BudgetReport {
        budget_bytes,
        weights_bytes: weights,
        activation_bytes: activations,
        pass_tokens,
        runtime_overhead_bytes,
        block_bytes: per_block,
        block_size: config.block_size,
        num_blocks: num_blocks as usize,
        kv_cache_bytes,
        unused_bytes: kv_budget - kv_cache_bytes,
        max_model_len: config.max_model_len,
        // min_blocks >= 1: max_model_len >= 1 and block_size > 0.
        max_concurrency: (num_blocks / min_blocks.max(1)) as usize,
        planned: planned_terms(model, config, budget_bytes, runtime_overhead_bytes),
    })
}

impl fmt::Display for BudgetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = human_bytes;
        let planned = self.planned.as_ref().ok();
        let beside = |v: Option<u64>| match v {
            Some(v) => format!("planner {}", h(v)),
            None => "planner -".to_string(),
        };
        writeln!(f, "memory budget        {:>12}", h(self.budget_bytes))?;
        writeln!(
            f,
            "  weights            {:>12}   ({})",
            h(self.weights_bytes),
            beside(planned.map(|p| p.weights_bytes))
        )?;
        writeln!(
            f,
            "  activations        {:>12}   ({}; one pass of {} tokens)",
            h(self.activation_bytes),
            beside(planned.map(|p| p.activation_bytes)),
            self.pass_tokens
        )?;
        writeln!(
            f,
            "  runtime overhead   {:>12}   (as given to the sizing)",
            h(self.runtime_overhead_bytes)
        )?;
        writeln!(
            f,
            "  KV cache           {:>12}   ({} blocks x {} tokens x {} per block = {} tokens)",
            h(self.kv_cache_bytes),
            self.num_blocks,
            self.block_size,
            h(self.block_bytes),
            self.num_blocks * self.block_size
        )?;
        writeln!(f, "  unused             {:>12}", h(self.unused_bytes))?;
        writeln!(
            f,
            "sequences of max_model_len = {} tokens that fit at once: {} ({})",
            self.max_model_len,
            self.max_concurrency,
            match planned {
                Some(p) => format!("planner {}", p.max_concurrency),
                None => "planner -".to_string(),
            }
        )?;
        match &self.planned {
            Ok(p) => write!(
                f,
                "planner: {} KV bytes per token; max_num_seqs x max_model_len would need {} of KV",
                p.kv_bytes_per_token,
                h(p.kv_cache_bytes)
            ),
            Err(e) => write!(f, "planner: no prediction ({e})"),
        }
    }
}

// ---- every rank of a TP x PP grid ------------------------------------------------------

/// One rank's share of a memory budget under TP/PP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankBudget {
    pub stage: usize,
    pub tp_rank: usize,
    /// The planner's weight bytes for this rank, which the loaded shard holds to the byte.
    pub weights_bytes: u64,
    /// The activation formula for this rank's largest pass.
    pub activation_bytes: u64,
    /// Bytes of one KV block on this rank: its layers, its KV heads.
    pub block_bytes: u64,
    /// Blocks this rank's budget holds after its weights, activations and the overhead.
    pub blocks_fit: u64,
}

/// A memory budget per rank (per GPU, as the planner counts it) split on every rank of a
/// TP x PP grid. The blocks are shared (every rank holds its layers and heads of each
/// block), so the engine allocates the fewest any rank fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelBudget {
    pub budget_bytes: u64,
    pub runtime_overhead_bytes: u64,
    pub pass_tokens: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_model_len: usize,
    /// Stage-major, as `Engine::rank_memory`.
    pub ranks: Vec<RankBudget>,
}

/// Size the shared KV blocks of a TP x PP grid from `budget_bytes` per rank: each rank's
/// planner weights, its activations (the one formula) and `runtime_overhead_bytes` come
/// off its budget, the rest is whole blocks of its own size, and the grid takes the
/// minimum. The same arithmetic as `llmem plan --tp N --pp M` per GPU. Errors name the
/// rank that cannot hold one sequence of `max_model_len` tokens and by how much.
pub fn parallel_budget(
    shape: &llmem_planner::ModelShape,
    fmt: &crate::weights::quant::WeightFormat,
    stored: Option<Arc<Vec<StoredTensor>>>,
    spec: crate::parallel::spec::ParallelSpec,
    config: &EngineConfig,
    budget_bytes: u64,
    runtime_overhead_bytes: u64,
) -> Result<ParallelBudget> {
    use crate::parallel::spec::ShardSpec;
    spec.validate(shape)?;
    if config.block_size == 0 {
        return Err(Error::InvalidInput(
            "engine: block_size is 0; it must be a positive integer".into(),
        ));
    }
    let (pass_tokens, rows) = config.largest_pass();
    let mut d = engine_deployment(
        fmt,
        spec,
        config.kv_dtype,
        budget_bytes,
        runtime_overhead_bytes,
    );
    d.stored_tensors = stored;
    let plan = llmem_planner::plan(shape, &engine_workload(config), &d)
        .map_err(|e| Error::InvalidInput(format!("planner: {e}")))?;
    let min_blocks = config.max_model_len.div_ceil(config.block_size) as u64;
    let mut ranks = Vec::new();
    for (stage, s) in plan.stages.iter().enumerate() {
        for (tp_rank, &weights) in s.rank_weights_bytes.iter().enumerate() {
            let shard = ShardSpec {
                tp_rank,
                pp_stage: stage,
                parallel: spec,
            };
            let activations = crate::model::rank_activation_peak_bytes(
                shape,
                fmt.activation_dtype(),
                shard,
                fmt.precision.is_quantized(),
                true, // the ranks run on the CPU
                pass_tokens,
                rows,
            );
            let mut local = shape.clone();
            local.num_hidden_layers = s.num_layers;
            local.num_key_value_heads =
                llmem_planner::plan::kv_heads_per_rank(shape, spec.tp as u64);
            let per_block = block_bytes(&local, config.block_size, config.kv_dtype);
            let fixed = weights
                .saturating_add(activations)
                .saturating_add(runtime_overhead_bytes);
            let needed = fixed.saturating_add(min_blocks.saturating_mul(per_block));
            if budget_bytes < needed {
                return Err(Error::InvalidInput(format!(
                    "memory budget of {} per rank is {} B short on stage {stage} TP rank \
                     {tp_rank}: weights {} + activations {} (one pass of {pass_tokens} \
                     tokens) + runtime overhead {} + KV for one sequence of max_model_len = \
                     {} tokens ({min_blocks} blocks of {}) = {}; use a larger budget, more \
                     ranks, a smaller --max-model-len or --max-batched-tokens",
                    human_bytes(budget_bytes),
                    needed - budget_bytes,
                    human_bytes(weights),
                    human_bytes(activations),
                    human_bytes(runtime_overhead_bytes),
                    config.max_model_len,
                    human_bytes(per_block),
                    human_bytes(needed),
                )));
            }
            ranks.push(RankBudget {
                stage,
                tp_rank,
                weights_bytes: weights,
                activation_bytes: activations,
                block_bytes: per_block,
                blocks_fit: (budget_bytes - fixed) / per_block,
            });
        }
    }
    let num_blocks = ranks
        .iter()
        .map(|r| r.blocks_fit)
        .min()
        .unwrap_or(0)
        .min(u64::from(u32::MAX)) as usize;
    Ok(ParallelBudget {
        budget_bytes,
        runtime_overhead_bytes,
        pass_tokens,
        block_size: config.block_size,
        num_blocks,
        max_model_len: config.max_model_len,
        ranks,
    })
}

impl fmt::Display for ParallelBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = human_bytes;
        writeln!(
            f,
            "memory budget {} per rank (runtime overhead {} each; activations of one pass of \
             {} tokens):",
            h(self.budget_bytes),
            h(self.runtime_overhead_bytes),
            self.pass_tokens
        )?;
        writeln!(
            f,
            "  stage  tp  {:>12}  {:>12}  {:>12}  {:>10}  {:>12}",
            "weights", "activations", "KV block", "blocks fit", "KV reserved"
        )?;
        for r in &self.ranks {
            writeln!(
                f,
                "  {:>5}  {:>2}  {:>12}  {:>12}  {:>12}  {:>10}  {:>12}",
                r.stage,
                r.tp_rank,
                h(r.weights_bytes),
                h(r.activation_bytes),
                h(r.block_bytes),
                r.blocks_fit,
                h(r.block_bytes * self.num_blocks as u64)
            )?;
        }
        let per_seq = self.max_model_len.div_ceil(self.block_size).max(1);
        write!(
            f,
            "KV blocks: {} (the fewest any rank fits; blocks are shared) x {} tokens; \
             sequences of max_model_len = {} tokens that fit at once: {}",
            self.num_blocks,
            self.block_size,
            self.max_model_len,
            self.num_blocks / per_seq
        )
    }
}
