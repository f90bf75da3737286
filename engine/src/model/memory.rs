//! What one forward pass holds at its peak, estimated (not measured) by the planner's
//! activation formula, the one formula: the figure the engine reserves for activations
//! when it sizes the KV cache from a budget, the one it reports per rank as planned, and
//! the contiguous cache's (one-rank `llmem generate`), with score matrices where that path
//! computes them (off the CPU).

use llmem_planner::ModelShape;

use crate::cache::contiguous::KvCache;
use crate::parallel::spec::ShardSpec;

use super::Model;
use candle_core::DType;

impl Model {
    /// Estimated peak bytes of activations alive at once in one pass of a single
    /// sequence through the contiguous cache `cache`: `query_len` new tokens over a
    /// context of `context_len` tokens, logits for one row. The planner's formula
    /// ([`llmem_planner::pass_phases`]) with unfused attention where this path computes
    /// score matrices ([`KvCache::makes_scores`]: a float cache off the CPU); on the CPU,
    /// and for the block-quantized caches, the fused kernel runs.
    pub fn contiguous_activation_peak_bytes(
        &self,
        cache: &KvCache,
        query_len: usize,
        context_len: usize,
    ) -> u64 {
        let mut pass = rank_pass(
            self.dtype,
            self.spec,
            self.format.precision.is_quantized(),
            self.device.is_cpu(),
            query_len,
            1,
        );
        pass.unfused_keys = cache.makes_scores().then_some(context_len as u64);
        peak(&self.shape, &pass)
    }

    /// Estimated peak bytes of activations alive at once in one paged pass of
    /// `num_tokens` tokens that computes logits for `logits_rows` rows: the activation
    /// formula of the planner ([`llmem_planner::pass_phases`]) for this model's shard,
    /// dtype and weight format. The paged kernel keeps no score matrix (a running softmax
    /// per query), so attention holds q, k, v, their rotated and f32 copies and the
    /// kernel's output.
    pub fn paged_activation_peak_bytes(&self, num_tokens: usize, logits_rows: usize) -> u64 {
        rank_activation_peak_bytes(
            &self.shape,
            self.dtype,
            self.spec,
            self.format.precision.is_quantized(),
            self.device.is_cpu(),
            num_tokens,
            logits_rows,
        )
    }
}

/// Estimated peak activation bytes of one rank in a paged pass of `num_tokens` tokens
/// computing `logits_rows` rows: the planner's activation formula
/// ([`llmem_planner::pass_phases`], the one formula; its terms are listed there) with this
/// rank's widths and `dtype` as the compute dtype, the logits phase on the ranks that
/// compute logits (the last stage; all its ranks when the vocabulary is split, else rank
/// 0). `block_quantized`: the weights are in a block format, whose kernels take the
/// activations quantized to bytes. `on_cpu`: the rank runs on the CPU, whose 16-bit
/// products stage their rows through f32. A figure that overflows 64 bits reads as
/// `u64::MAX` (no budget holds it).
pub fn rank_activation_peak_bytes(
    shape: &ModelShape,
    dtype: DType,
    spec: ShardSpec,
    block_quantized: bool,
    on_cpu: bool,
    num_tokens: usize,
    logits_rows: usize,
) -> u64 {
    peak(
        shape,
        &rank_pass(
            dtype,
            spec,
            block_quantized,
            on_cpu,
            num_tokens,
            logits_rows,
        ),
    )
}

/// The peak of `pass`; a figure that overflows 64 bits reads as `u64::MAX`.
fn peak(shape: &ModelShape, pass: &llmem_planner::RankPass) -> u64 {
    llmem_planner::pass_phases(shape, pass).map_or(u64::MAX, |phases| phases.peak().0)
}

/// One rank's pass as the planner's formula takes it (fused attention).
fn rank_pass(
    dtype: DType,
    spec: ShardSpec,
    block_quantized: bool,
    on_cpu: bool,
    num_tokens: usize,
    logits_rows: usize,
) -> llmem_planner::RankPass {
    // 16-bit rows times 16-bit dense weights on the CPU go through f32 a chunk at a time
    // (`crate::layers::linear`).
    let staged = on_cpu && matches!(dtype, DType::BF16 | DType::F16) && !block_quantized;
    let p = spec.parallel;
    llmem_planner::RankPass {
        tokens: num_tokens as u64,
        logit_rows: logits_rows as u64,
        value_bytes: dtype.size_in_bytes() as u64,
        tp: p.tp as u64,
        tp_rank: spec.tp_rank as u64,
        holds_layers: true,
        // Without a vocabulary split, rank 0 of the last stage alone computes logits.
        holds_lm_head: spec.pp_stage == p.pp - 1 && (p.vocab_parallel || spec.tp_rank == 0),
        vocab_parallel: p.vocab_parallel,
        block_quantized,
        unfused_keys: None,
        staged_rows: if staged {
            crate::layers::linear::STAGED_ROWS as u64
        } else {
            0
        },
    }
}
