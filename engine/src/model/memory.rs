//! What one forward pass holds at its peak, estimated from the pass's own tensors (not
//! measured): the figure the engine reserves for activations when it sizes the KV cache
//! from a budget, and the one it reports per rank. The paged figure is the planner's
//! formula; the contiguous cache's (`Model::activation_peak_bytes`, with score matrices)
//! is its own.

use llmem_planner::ModelShape;

use crate::layers::attention::AttnMetadata;
use crate::parallel::spec::ShardSpec;

use super::Model;
use candle_core::DType;

impl Model {
    /// Estimated peak bytes of activations alive at once in one pass of `meta` that
    /// computes logits for `logits_rows` rows.
    ///
    /// This is arithmetic over this forward pass's own tensors, not a measurement: the
    /// residual stream and its normed copy are alive throughout; on top of them the
    /// largest of (a) attention: q, k, v, their rotated copies, and per sequence the f32
    /// scores and probabilities of the longest sequence plus its output, (b) MLP: gate,
    /// up, silu(gate) x up (one fused step) and the down output, (c) LM head: the selected rows,
    /// the logits in the model dtype and their f32 copy. Rope tables and masks are small
    /// and left out.
    pub fn activation_peak_bytes(&self, meta: &AttnMetadata, logits_rows: usize) -> u64 {
        let s = &self.shape;
        let e = self.dtype.size_in_bytes() as u64;
        let t = meta.num_tokens() as u64;
        let (h, q, kv, i, v) = (
            s.hidden_size,
            s.q_dim(),
            s.kv_dim(),
            s.intermediate_size,
            s.vocab_size,
        );
        let resident = 2 * t * h * e;
        let longest_scores = (0..meta.num_seqs())
            .map(|n| {
                let (ql, ctx) = (meta.query_lens[n] as u64, meta.context_len(n) as u64);
                // f32 q, scores, probs, output
                4 * (ql * q + 2 * s.num_attention_heads * ql * ctx + ql * q + 2 * ctx * kv)
            })
            .max()
            .unwrap_or(0);
        let attention = 2 * t * (q + 2 * kv) * e + longest_scores + t * q * e;
        let mlp = t * (3 * i + h) * e;
        let rows = logits_rows as u64;
        // The f32 copy for sampling is the same tensor when the model dtype is f32.
        let f32_copy = if e == 4 { 0 } else { rows * v * 4 };
        let logits = rows * h * e + rows * v * e + f32_copy;
        resident + attention.max(mlp).max(logits)
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
/// activations quantized to bytes. A figure that overflows 64 bits reads as `u64::MAX`
/// (no budget holds it).
pub fn rank_activation_peak_bytes(
    shape: &ModelShape,
    dtype: DType,
    spec: ShardSpec,
    block_quantized: bool,
    num_tokens: usize,
    logits_rows: usize,
) -> u64 {
    let p = spec.parallel;
    let pass = llmem_planner::RankPass {
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
    };
    llmem_planner::pass_phases(shape, &pass).map_or(u64::MAX, |phases| phases.peak().0)
}
