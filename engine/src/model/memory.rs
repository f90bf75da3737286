//! What one forward pass holds at its peak, estimated from the pass's own tensors (not
//! measured): the figure the engine reserves for activations when it sizes the KV cache
//! from a budget, and the one it reports per rank beside the planner's.

use llmem_planner::ModelShape;

use crate::layers::attention::AttnMetadata;
use crate::parallel::spec::{ShardSpec, TpShard};

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
    /// silu(gate), up, their product and the down output, (c) LM head: the selected rows,
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
        let mlp = t * (4 * i + h) * e;
        let rows = logits_rows as u64;
        // The f32 copy for sampling is the same tensor when the model dtype is f32.
        let f32_copy = if e == 4 { 0 } else { rows * v * 4 };
        let logits = rows * h * e + rows * v * e + f32_copy;
        resident + attention.max(mlp).max(logits)
    }

    /// Estimated peak bytes of activations alive at once in one paged pass of
    /// `num_tokens` tokens that computes logits for `logits_rows` rows.
    ///
    /// The same arithmetic as [`Model::activation_peak_bytes`] with the paged attention
    /// step in place of the contiguous one: the kernel keeps no score matrix (a running
    /// softmax per query), so attention holds q, k, v and their rotated copies in the
    /// model dtype, their f32 copies handed to the kernel, the f32 output and its cast
    /// back. The MLP and LM-head phases are unchanged.
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
/// computing `logits_rows` rows: [`crate::model::Model::paged_activation_peak_bytes`]
/// with this rank's widths (its heads, KV heads and intermediate share), the logits
/// phase on the last stage only (this rank's vocabulary rows in the model dtype plus
/// the gathered f32 logits over the whole vocabulary). `block_quantized`: the weights are
/// in a block format, whose kernels take the activations quantized to bytes.
pub fn rank_activation_peak_bytes(
    shape: &ModelShape,
    dtype: DType,
    spec: ShardSpec,
    block_quantized: bool,
    num_tokens: usize,
    logits_rows: usize,
) -> u64 {
    let p = spec.parallel;
    let tp = p.tp as u64;
    let e = dtype.size_in_bytes() as u64;
    let t = num_tokens as u64;
    let h = shape.hidden_size;
    let q = shape.num_attention_heads / tp * shape.head_dim;
    let kv = llmem_planner::plan::kv_heads_per_rank(shape, tp) * shape.head_dim;
    let i = TpShard::share(shape.intermediate_size as usize, p.tp, spec.tp_rank).1 as u64;
    let resident = 2 * t * h * e;
    let attention = 2 * t * (q + 2 * kv) * e + 4 * t * (q + 2 * kv) + 4 * t * q + t * q * e;
    // Block-quantized weights add the down projection's input quantized to bytes, with an
    // f32 scale per 32, while the MLP phase's tensors are alive (measured: +11% at 2048
    // tokens without this term).
    let quantized_input = if block_quantized { t * (i + i / 8) } else { 0 };
    let mlp = t * (4 * i + h) * e + quantized_input;
    let logits = if spec.pp_stage == p.pp - 1 {
        let rows = logits_rows as u64;
        let local = if p.vocab_parallel {
            TpShard::share(shape.vocab_size as usize, p.tp, spec.tp_rank).1 as u64
        } else {
            shape.vocab_size
        };
        // The f32 logits over the whole vocabulary: gathered from the ranks when the
        // vocabulary is split, the same tensor as the local ones when not and the model
        // dtype is f32 (the measured working set showed the estimate counting them twice).
        let full = if local == shape.vocab_size && e == 4 {
            0
        } else {
            rows * shape.vocab_size * 4
        };
        rows * h * e + rows * local * e + full
    } else {
        0
    };
    resident + attention.max(mlp).max(logits)
}
