//! The Llama forward pass: one readable `forward` over a flattened batch of tokens.
//!
//! Covers the Llama family that `llmem_planner::ModelShape` describes (Llama 2/3,
//! SmolLM, Mistral without sliding windows, Qwen2): RMSNorm, rotary embeddings with
//! `rope_theta` and Llama-3 / linear `rope_scaling`, grouped-query attention, a SwiGLU
//! MLP, an LM head tied to the embedding or not, and the q/k/v (Qwen2) or q/k/v/o
//! (`attention_bias`) and MLP biases. Struct fields carry the checkpoint's names, so
//! `layers[3].self_attn.q_proj` is `model.layers.3.self_attn.q_proj.weight`.
//!
//! Batching follows vLLM: the tokens of every sequence in a pass are concatenated into
//! one `(num_tokens, hidden)` matrix, so all projections are a single matmul; only
//! attention looks at sequence boundaries, through [`AttnMetadata`] (how many tokens each
//! sequence feeds, how many it already has cached) and an explicit `positions` tensor.
//! Invariants: rows of the batch belong to sequences in metadata order; a sequence's
//! `cached_lens` entry equals the tokens its [`KvCache`] holds; positions come from the
//! caller, so the cache can change without touching the layers.
//!
//! Two caches, one set of layers: [`Model::forward`] attends over one contiguous
//! [`KvCache`] per sequence (`generate`, perplexity); [`Model::forward_paged`] writes and
//! attends through the shared block pool of a [`PagedKvCache`], indexed by a
//! [`PagedMetadata`] built from the scheduler's batch (the `Engine`). Both run the same
//! projections and rope (`Attention::qkv`) and the same decoder-layer residual code;
//! only the attention step differs.
//!
//! Rope tables are computed once at load, in f32 the way Hugging Face computes them.
//! Attention runs in f32 whatever the model dtype (as HF's eager softmax does), with
//! queries grouped per KV head so GQA never copies K or V; a one-token query (decode)
//! takes a direct loop over the cache rows instead of tiny matmuls.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llmem_planner::checkpoint::CheckpointSummary;
use llmem_planner::ModelShape;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::generate::KvCache;
use crate::kv_cache::{check_paged_pass, PagedKvCache, PagedMetadata};
use crate::linear::Linear;
use crate::loader::WeightFiles;
use crate::quant::{StoredMatrix, WeightFormat};
use crate::spec::{ShardSpec, TpShard};

/// Attention bookkeeping for one forward pass, passed explicitly (no global context).
///
/// The pass's tokens are the concatenation, in order, of `query_lens[s]` new tokens of
/// each sequence `s`; sequence `s` already holds `cached_lens[s]` tokens in its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnMetadata {
    /// New tokens per sequence in this pass (prefill: the prompt; decode: 1).
    pub query_lens: Vec<usize>,
    /// Tokens already cached per sequence, before this pass.
    pub cached_lens: Vec<usize>,
}

impl AttnMetadata {
    /// A single sequence feeding `query_len` tokens after `cached_len` cached ones.
    pub fn single(cached_len: usize, query_len: usize) -> Self {
        AttnMetadata {
            query_lens: vec![query_len],
            cached_lens: vec![cached_len],
        }
    }

    /// Number of sequences in the pass.
    pub fn num_seqs(&self) -> usize {
        self.query_lens.len()
    }

    /// Total tokens in the pass (rows of the flattened batch).
    pub fn num_tokens(&self) -> usize {
        self.query_lens.iter().sum()
    }

    /// Context length of sequence `s` after this pass.
    pub fn context_len(&self, s: usize) -> usize {
        self.cached_lens[s] + self.query_lens[s]
    }

    /// The absolute position of every token of the pass: `cached_lens[s] + i`.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for (&cached, &q) in self.cached_lens.iter().zip(&self.query_lens) {
            out.extend((cached..cached + q).map(|p| p as u32));
        }
        out
    }

    /// Row index of each sequence's last token in the flattened batch.
    pub fn last_token_rows(&self) -> Vec<u32> {
        let mut rows = Vec::with_capacity(self.num_seqs());
        let mut end = 0usize;
        for &q in &self.query_lens {
            end += q;
            rows.push((end - 1) as u32);
        }
        rows
    }
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::host_ops::rms_norm(x, &self.weight, self.eps)
    }

    /// The residual add before the norm, fused: `(x + y, norm(x + y))`.
    pub(crate) fn add_forward(
        &self,
        x: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        crate::host_ops::add_rms_norm(x, y, &self.weight, self.eps)
    }
}

/// Rotary embedding tables, indexed by absolute position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (max_positions, head_dim / 2), model dtype.
    pub(crate) cos: Tensor,
    /// (max_positions, head_dim / 2), model dtype.
    pub(crate) sin: Tensor,
}

/// Inverse frequencies, f32 as Hugging Face computes them, with `rope_scaling` applied.
pub fn rope_inv_freq(shape: &ModelShape) -> Result<Vec<f32>> {
    let hd = shape.head_dim as usize;
    let base = shape.rope_theta as f32;
    let mut inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / hd as f32))
        .collect();
    if let Some(scaling) = &shape.rope_scaling {
        let factor = scaling.factor as f32;
        match scaling.rope_type.as_str() {
            "linear" => inv.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                let missing = |field: &str| {
                    Error::InvalidInput(format!(
                        "model {}: rope_scaling of type \"llama3\" needs `{field}`",
                        shape.name
                    ))
                };
                let low = scaling
                    .low_freq_factor
                    .ok_or_else(|| missing("low_freq_factor"))? as f32;
                let high = scaling
                    .high_freq_factor
                    .ok_or_else(|| missing("high_freq_factor"))? as f32;
                let old_ctx = scaling
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?
                    as f32;
                let low_freq_wavelen = old_ctx / low;
                let high_freq_wavelen = old_ctx / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "model {}: rope_scaling type {other:?} is not supported (supported: \
                     \"llama3\", \"linear\")",
                    shape.name
                )))
            }
        }
    }
    Ok(inv)
}

impl Rope {
    pub(crate) fn new(
        shape: &ModelShape,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = rope_inv_freq(shape)?;
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                // The angle is rounded to f32 as in HF; its cosine is then exact.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }
}

/// `self_attn`: q/k/v/o projections and grouped-query attention over the cache.
///
/// Under tensor parallelism (`tp` set) this is one rank's shard, as in Megatron: q/k/v
/// hold this rank's heads (column-parallel), `o_proj` the matching input columns
/// (row-parallel), so its output is a partial sum that one all-reduce completes; the
/// `num_heads` / `num_kv_heads` fields are then the rank's own counts.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    tp: Option<TpReduce>,
}

/// `mlp`: SwiGLU, `down_proj(silu(gate_proj(x)) * up_proj(x))`. Under tensor
/// parallelism gate/up hold a slice of the intermediate rows and down the matching
/// columns, followed by one all-reduce.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    tp: Option<TpReduce>,
}

/// The all-reduce that completes a row-parallel projection, and the projection's bias,
/// added once after the sum (added on every rank before it, it would count TP times).
#[derive(Clone)]
pub(crate) struct TpReduce {
    comm: Arc<dyn Communicator>,
    bias: Option<Tensor>,
}

impl std::fmt::Debug for TpReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpReduce")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl TpReduce {
    /// y: this rank's partial (T, hidden) -> the full sum, plus the bias.
    fn apply(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let y = self
            .comm
            .all_reduce_sum(&y)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn bytes(&self) -> u64 {
        self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Per-pass tensors every layer shares: rotary rows and causal masks.
struct PassInputs<'a> {
    /// (num_tokens, head_dim / 2): rope rows gathered at `positions`.
    cos: Tensor,
    sin: Tensor,
    /// Per sequence: `(query_len, context_len)` additive f32 mask, `None` for one token.
    masks: Vec<Option<Tensor>>,
    meta: &'a AttnMetadata,
}

/// A loaded Llama-family model: the whole model, or one rank's shard of it under
/// tensor/pipeline parallelism (the whole model is the TP = PP = 1 shard). One struct,
/// one set of loaders, one paged forward loop for both.
///
/// The split is Megatron's, the one the planner counts (`llmem_planner::plan::layer_bytes`
/// and `rank_weights`), so the engine's per-rank bytes and the plan's per-GPU bytes are
/// one computation done twice:
/// - q/k/v and gate/up are column-parallel (each rank holds some output rows), o_proj
///   and down_proj row-parallel (the matching input columns), each followed by one
///   all-reduce, so a layer costs two all-reduces of (tokens x hidden);
/// - the heads split evenly (TP must divide them); KV heads split too, or, once TP
///   exceeds them, every rank holds the one KV head its query heads read (replicated);
/// - the intermediate size splits as evenly as possible (first ranks one row more);
/// - norms, the o/down biases and rotary tables are replicated; the o/down biases are
///   added once, after the all-reduce;
/// - the embedding and LM head are replicated, or split by vocabulary rows
///   (`vocab_parallel`): the lookup zeroes ids outside the rank's rows and one
///   all-reduce completes it; the head's partial logits are all-gathered;
/// - PP stage `s` holds the consecutive layers `llmem_planner::plan::stage_layers`
///   gives it; stage 0 the embedding, the last stage the final norm and LM head (its
///   own copy when tied and PP > 1).
///
/// With a replicated head only TP rank 0 computes logits (the others would compute the
/// same numbers), so the other ranks' head is memory the plan counts but never reads.
/// Shards run float weights only (block-quantized shards are not implemented).
#[derive(Debug, Clone)]
pub struct Model {
    shape: ModelShape,
    /// The model as this rank's KV cache sees it: this stage's layers, this rank's
    /// heads (the whole shape when unsharded).
    local_shape: ModelShape,
    dtype: DType,
    device: Device,
    spec: ShardSpec,
    /// (vocab, hidden), dense or block-quantized (rows dequantized on lookup), or this
    /// rank's vocabulary rows; stage 0 only.
    embed_tokens: Option<StoredMatrix>,
    /// First vocabulary row this rank holds (0 unless vocab-parallel).
    vocab_start: usize,
    layers: Vec<DecoderLayer>,
    /// Index of `layers[0]` in the whole model.
    first_layer: usize,
    /// Final norm and LM head (vocab, hidden): the last stage only. The head shares
    /// `embed_tokens`' storage when tied (and this rank holds the embedding).
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rope: Rope,
    /// This rank's place in its TP group; `None` without tensor parallelism.
    tp: Option<TpShard>,
    weights_bytes: u64,
    format: WeightFormat,
    /// For a GGUF loaded as stored: its tensor table summed per ggml type (the planner's
    /// figure for these weights, which `weights_bytes` equals).
    stored: Option<CheckpointSummary>,
}

pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

impl Attention {
    fn load(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let (h, q, kv) = (
            shape.hidden_size as usize,
            shape.q_dim() as usize,
            shape.kv_dim() as usize,
        );
        let lin = |name: &str, out_dim: usize, in_dim: usize, bias: bool| {
            Linear::load(
                w,
                &format!("{prefix}.{name}"),
                out_dim,
                in_dim,
                bias,
                fmt,
                device,
            )
        };
        Ok(Attention {
            q_proj: lin("q_proj", q, h, shape.qkv_bias)?,
            k_proj: lin("k_proj", kv, h, shape.qkv_bias)?,
            v_proj: lin("v_proj", kv, h, shape.qkv_bias)?,
            o_proj: lin("o_proj", h, q, shape.o_bias)?,
            num_heads: shape.num_attention_heads as usize,
            num_kv_heads: shape.num_key_value_heads as usize,
            head_dim: shape.head_dim as usize,
            tp: None,
        })
    }

    /// One TP rank's shard: its `heads / tp` query heads, the KV heads they read (split
    /// when TP divides the KV heads, the one shared head replicated when TP exceeds
    /// them), and the matching columns of `o_proj`.
    fn load_shard(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        dtype: DType,
        device: &Device,
        shard: &TpShard,
    ) -> Result<Self> {
        let full = Self::load(w, prefix, shape, &WeightFormat::dense(dtype)?, device)?;
        let (nh, nkv, hd) = (full.num_heads, full.num_kv_heads, full.head_dim);
        let heads_r = nh / shard.tp;
        let kv_r = (nkv / shard.tp).max(1);
        let group = nh / nkv;
        let q0 = shard.rank * heads_r;
        let kv0 = q0 / group;
        let heads = |l: &Linear, start: usize, len: usize| l.output_shard(start * hd, len * hd);
        let (o_proj, o_bias) = full.o_proj.input_shard(q0 * hd, heads_r * hd)?;
        Ok(Attention {
            q_proj: heads(&full.q_proj, q0, heads_r)?,
            k_proj: heads(&full.k_proj, kv0, kv_r)?,
            v_proj: heads(&full.v_proj, kv0, kv_r)?,
            o_proj,
            num_heads: heads_r,
            num_kv_heads: kv_r,
            head_dim: hd,
            tp: Some(TpReduce {
                comm: shard.comm.clone(),
                bias: o_bias,
            }),
        })
    }

    /// `o_proj`, completed by the TP all-reduce when sharded.
    fn project_out(&self, o: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.o_proj.forward(o)?;
        match &self.tp {
            Some(r) => r.apply(y),
            None => Ok(y),
        }
    }

    /// The projections with rotary embeddings applied, shared by both cache layouts.
    ///
    /// x: (T, hidden); cos, sin: (T, head_dim / 2) rope rows at each token's position.
    /// Returns q: (T, heads, head_dim), k and v: (T, kv_heads, head_dim), model dtype.
    fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_many(x, [&self.q_proj, &self.k_proj, &self.v_proj])?;
        let q = q.reshape((t, nh, hd))?;
        let k = k.reshape((t, nkv, hd))?;
        let v = v.reshape((t, nkv, hd))?;
        let q = crate::host_ops::rope(&q, cos, sin)?;
        let k = crate::host_ops::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Paged attention: x: (T, hidden) -> (T, hidden).
    ///
    /// q, k, v go to the kernels as contiguous f32 `(T, heads | kv_heads, head_dim)`;
    /// the cache stores K/V in its own dtype and returns (T, heads * head_dim) f32, cast
    /// back to the model dtype before `o_proj`.
    pub(crate) fn forward_paged(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer_idx: usize,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, cos, sin)?;
        let o = cache
            .write_and_attend_tensors(layer_idx, &q, &k, &v, meta)?
            .to_dtype(x.dtype())?;
        Ok(self.project_out(&o)?)
    }

    /// Contiguous per-sequence caches: x: (T, hidden) -> (T, hidden).
    fn forward(
        &self,
        x: &Tensor,
        pass: &PassInputs<'_>,
        layer_idx: usize,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(x, &pass.cos, &pass.sin)?;

        let meta = pass.meta;
        let mut outs = Vec::with_capacity(meta.num_seqs());
        let mut start = 0;
        for (s, cache) in caches.iter_mut().enumerate() {
            let qlen = meta.query_lens[s];
            let (k_all, v_all) = cache.write(
                layer_idx,
                meta.cached_lens[s],
                &k.narrow(0, start, qlen)?,
                &v.narrow(0, start, qlen)?,
            )?;
            let q_s = q.narrow(0, start, qlen)?;
            // The direct decode loop reads host memory; a GPU takes the general path.
            outs.push(if qlen == 1 && q_s.device().is_cpu() {
                attend_one_query(&q_s, &k_all, &v_all)?
            } else {
                self.attend(&q_s, &k_all, &v_all, pass.masks[s].as_ref())?
            });
            start += qlen;
        }
        let o = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.project_out(&o)
    }

    /// Scaled dot-product attention of one sequence.
    ///
    /// q: (qlen, heads, head_dim); k, v: (ctx, kv_heads, head_dim), possibly strided views
    /// of the cache; mask: (qlen, ctx) or None. Returns (qlen, heads * head_dim) in the
    /// dtype of q. The `group` query heads of one KV head are stacked as rows, so one
    /// batched matmul per KV head covers them without repeating K or V.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (qlen, nh, hd) = q.dims3()?;
        let (ctx, nkv, _) = k.dims3()?;
        let group = nh / nkv;
        let out_dtype = q.dtype();
        let scale = 1.0 / (hd as f64).sqrt();
        // (qlen, nkv, group, hd) -> (nkv, group * qlen, hd); free when qlen == 1.
        let q = q
            .reshape((qlen, nkv, group, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((nkv, group * qlen, hd))?
            .to_dtype(DType::F32)?;
        let q = (q * scale)?;
        // (ctx, nkv, hd) -> (nkv, ctx, hd), a strided view (the f32 cast copies). cuBLAS
        // takes only packed matrices: on a GPU the views are made contiguous.
        let mut k = k.transpose(0, 1)?.to_dtype(DType::F32)?;
        let mut v = v.transpose(0, 1)?.to_dtype(DType::F32)?;
        if !k.device().is_cpu() {
            (k, v) = (k.contiguous()?, v.contiguous()?);
        }
        let mut scores = q.matmul(&k.t()?)?; // (nkv, group * qlen, ctx)
        if let Some(mask) = mask {
            scores = scores
                .reshape((nkv, group, qlen, ctx))?
                .broadcast_add(mask)?
                .reshape((nkv, group * qlen, ctx))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (nkv, group * qlen, hd)
        out.reshape((nkv, group, qlen, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((qlen, nh * hd))?
            .to_dtype(out_dtype)
    }
}

/// Decode attention of one query token over the contiguous cache, by the paged decode
/// kernel (SIMD, f32 accumulation, K/V read in the cache's dtype).
///
/// q: (1, heads, head_dim); k, v: (ctx, kv_heads, head_dim) contiguous views of the cache.
/// Returns (1, heads * head_dim) in q's dtype. Same math as [`Attention::attend`] without
/// a mask (one query sees every cached position); it exists because gemm's setup cost on
/// these tiny per-head products dominated decode at long contexts. Tested against the
/// general path by the prefill-then-decode tests.
fn attend_one_query(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    use llmem_kernels::{AttentionParams, CacheElem, CacheShape};

    let (_, nh, hd) = q.dims3()?;
    let (ctx, nkv, _) = k.dims3()?;
    let q32: Vec<f32> = q.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    // The cache rows 0..ctx are one block of `ctx` tokens in the paged kernel's layout
    // (token, kv head, dim), so the paged decode kernel runs over them as they are.
    let params = AttentionParams {
        num_heads: nh,
        scale: 1.0 / (hd as f32).sqrt(),
        cache: CacheShape {
            num_blocks: 1,
            block_size: ctx,
            kv_heads: nkv,
            head_dim: hd,
        },
        max_blocks_per_seq: 1,
    };
    fn heads<T: CacheElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        p: &AttentionParams,
    ) -> candle_core::Result<Vec<f32>> {
        let mut out = vec![0f32; q.len()];
        let ctx = p.cache.block_size as u32;
        llmem_kernels::paged_attention(&mut out, q, k, v, &[0], &[0], &[ctx], p)
            .map_err(|e| candle_core::Error::Msg(format!("decode attention: {e}")))?;
        Ok(out)
    }

    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("decode attention: the cache is not on the CPU")
    };
    let (Some((k0, k1)), Some((v0, v1))) = (kl.contiguous_offsets(), vl.contiguous_offsets())
    else {
        candle_core::bail!("decode attention: cache views must be contiguous")
    };
    let out = match (kc, vc) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => heads(&q32, &k[k0..k1], &v[v0..v1], &params),
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => heads(&q32, &k[k0..k1], &v[v0..v1], &params),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => heads(&q32, &k[k0..k1], &v[v0..v1], &params),
        _ => candle_core::bail!("decode attention: unsupported cache dtype {:?}", k.dtype()),
    }?;
    Tensor::from_vec(out, (1, nh * hd), q.device())?.to_dtype(q.dtype())
}

impl Mlp {
    fn load(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let (h, i, b) = (
            shape.hidden_size as usize,
            shape.intermediate_size as usize,
            shape.mlp_bias,
        );
        let lin = |name: &str, out_dim: usize, in_dim: usize| {
            Linear::load(
                w,
                &format!("{prefix}.{name}"),
                out_dim,
                in_dim,
                b,
                fmt,
                device,
            )
        };
        Ok(Mlp {
            gate_proj: lin("gate_proj", i, h)?,
            up_proj: lin("up_proj", i, h)?,
            down_proj: lin("down_proj", h, i)?,
            tp: None,
        })
    }

    /// One TP rank's shard: its share of the intermediate rows of gate/up and the same
    /// columns of down (an uneven intermediate size gives the first ranks one more row).
    fn load_shard(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        dtype: DType,
        device: &Device,
        shard: &TpShard,
    ) -> Result<Self> {
        let full = Self::load(w, prefix, shape, &WeightFormat::dense(dtype)?, device)?;
        let (start, len) = TpShard::share(shape.intermediate_size as usize, shard.tp, shard.rank);
        let (down_proj, d_bias) = full.down_proj.input_shard(start, len)?;
        Ok(Mlp {
            gate_proj: full.gate_proj.output_shard(start, len)?,
            up_proj: full.up_proj.output_shard(start, len)?,
            down_proj,
            tp: Some(TpReduce {
                comm: shard.comm.clone(),
                bias: d_bias,
            }),
        })
    }

    /// x: (T, hidden) -> (T, hidden).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [gate, up] = Linear::forward_many(x, [&self.gate_proj, &self.up_proj])?;
        let y = self
            .down_proj
            .forward(&crate::host_ops::silu_mul(&gate, &up)?)?;
        match &self.tp {
            Some(r) => r.apply(y),
            None => Ok(y),
        }
    }
}

pub(crate) fn load_norm(
    w: &WeightFiles,
    name: &str,
    shape: &ModelShape,
    fmt: &WeightFormat,
    device: &Device,
) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.load(
            name,
            &[shape.hidden_size as usize],
            fmt.vector_dtype(),
            device,
        )?,
        eps: shape.rms_norm_eps as f32,
    })
}

impl DecoderLayer {
    fn load(
        w: &WeightFiles,
        idx: usize,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{idx}");
        Ok(DecoderLayer {
            input_layernorm: load_norm(
                w,
                &format!("{p}.input_layernorm.weight"),
                shape,
                fmt,
                device,
            )?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), shape, fmt, device)?,
            post_attention_layernorm: load_norm(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                shape,
                fmt,
                device,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), shape, fmt, device)?,
        })
    }

    /// Layer `idx` as TP rank `shard.rank` holds it: attention and MLP sharded, the two
    /// norms replicated. With TP = 1 it is the plain layer (no all-reduce at all).
    pub(crate) fn load_shard(
        w: &WeightFiles,
        idx: usize,
        shape: &ModelShape,
        dtype: DType,
        device: &Device,
        shard: &TpShard,
    ) -> Result<Self> {
        if shard.tp == 1 {
            return Self::load(w, idx, shape, &WeightFormat::dense(dtype)?, device);
        }
        let p = format!("model.layers.{idx}");
        let dense = WeightFormat::dense(dtype)?;
        let norm = |name: &str| load_norm(w, &format!("{p}.{name}.weight"), shape, &dense, device);
        Ok(DecoderLayer {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load_shard(
                w,
                &format!("{p}.self_attn"),
                shape,
                dtype,
                device,
                shard,
            )?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load_shard(w, &format!("{p}.mlp"), shape, dtype, device, shard)?,
        })
    }

    /// x: (T, hidden) -> (T, hidden). `attend` runs `self_attn` on the normed input,
    /// (T, hidden) -> (T, hidden), over whichever cache the pass uses.
    pub(crate) fn forward<E: From<candle_core::Error>>(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Attention, &Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Tensor, E> {
        let h = self.input_layernorm.forward(x)?;
        let h = attend(&self.self_attn, &h)?;
        let (x, h) = self.post_attention_layernorm.add_forward(x, &h)?;
        let h = self.mlp.forward(&h)?;
        Ok(crate::host_ops::add(&x, &h)?)
    }

    pub(crate) fn weights_bytes(&self) -> u64 {
        let a = &self.self_attn;
        let m = &self.mlp;
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
        .iter()
        .map(|l| l.bytes())
        .sum::<u64>()
            + tensor_bytes(&self.input_layernorm.weight)
            + tensor_bytes(&self.post_attention_layernorm.weight)
            + a.tp.as_ref().map_or(0, TpReduce::bytes)
            + m.tp.as_ref().map_or(0, TpReduce::bytes)
    }
}

impl Model {
    /// Load a model directory (config.json plus safetensors) in `dtype` on `device`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, &WeightFormat::dense(dtype)?, device)
    }

    /// Load a model directory with its weights stored as `fmt` says (see `crate::quant`).
    pub fn load_dir_with(dir: &Path, fmt: &WeightFormat, device: &Device) -> Result<Self> {
        let shape = ModelShape::from_path(dir).map_err(|e| {
            let path = dir.join("config.json");
            // The planner's messages already lead with the file; do not repeat it.
            let text = e.to_string();
            let shown = path.display();
            let message = text
                .strip_prefix(&format!("{shown}: "))
                .or_else(|| text.strip_prefix(&format!("reading {shown}: ")))
                .unwrap_or(&text)
                .to_string();
            Error::Config { path, message }
        })?;
        let weights = WeightFiles::open_dir(dir)?;
        Self::load_with(&shape, &weights, fmt, device)
    }

    /// Build the model from already opened weight files. Every tensor is checked for
    /// presence and exact shape before the model is usable.
    pub fn load(
        shape: &ModelShape,
        w: &WeightFiles,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(shape, w, &WeightFormat::dense(dtype)?, device)
    }

    /// Build the model from opened weight files, each matrix stored as `fmt` says
    /// (float dtypes, or GGUF block formats quantized at load; see `crate::quant`).
    pub fn load_with(
        shape: &ModelShape,
        w: &WeightFiles,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        Self::load_part(shape, w, fmt, device, ShardSpec::single(), None)
    }

    /// Load rank `spec`'s shard in `dtype` (f32, bf16 or f16), its TP group meeting
    /// through `comm`. Every tensor is read whole, checked, and sliced.
    pub fn load_shard(
        shape: &ModelShape,
        w: &WeightFiles,
        dtype: DType,
        device: &Device,
        spec: ShardSpec,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidInput(format!(
                "dtype {dtype:?} is not supported for the model; use f32, bf16 or f16"
            )));
        }
        if comm.world_size() != spec.parallel.tp || comm.rank() != spec.tp_rank {
            return Err(Error::InvalidInput(format!(
                "shard of TP rank {} of {} given communicator rank {} of {}",
                spec.tp_rank,
                spec.parallel.tp,
                comm.rank(),
                comm.world_size()
            )));
        }
        Self::load_part(
            shape,
            w,
            &WeightFormat::dense(dtype)?,
            device,
            spec,
            Some(comm),
        )
    }

    /// The one loader: the part of the model `spec` puts on this rank.
    fn load_part(
        shape: &ModelShape,
        w: &WeightFiles,
        fmt: &WeightFormat,
        device: &Device,
        spec: ShardSpec,
        comm: Option<Arc<dyn Communicator>>,
    ) -> Result<Self> {
        // Checks the precision is one the engine runs.
        WeightFormat::new(fmt.precision)?;
        let p = spec.parallel;
        p.validate(shape)?;
        let dtype = fmt.activation_dtype();
        let split = p.stage_layers(shape);
        let first_layer: usize = split[..spec.pp_stage].iter().sum();
        let num_layers = split[spec.pp_stage];
        let (holds_embedding, holds_head) = (spec.pp_stage == 0, spec.pp_stage == p.pp - 1);
        let shard = comm.filter(|_| p.tp > 1).map(|comm| TpShard {
            rank: spec.tp_rank,
            tp: p.tp,
            comm,
        });
        let layers = (first_layer..first_layer + num_layers)
            .map(|i| match &shard {
                None => DecoderLayer::load(w, i, shape, fmt, device),
                Some(s) => DecoderLayer::load_shard(w, i, shape, dtype, device, s),
            })
            .collect::<Result<Vec<_>>>()?;

        let (vocab, h) = (shape.vocab_size as usize, shape.hidden_size as usize);
        let (vocab_start, vocab_len) = if p.vocab_parallel && p.tp > 1 {
            TpShard::share(vocab, p.tp, spec.tp_rank)
        } else {
            (0, vocab)
        };
        let ep = fmt.embedding_precision();
        // This rank's vocabulary rows of a (vocab, hidden) matrix: a deep copy of the
        // rows, so the whole table is freed (vocab-parallel shards are dense).
        let load_rows = |name: &str| -> Result<StoredMatrix> {
            if vocab_len == vocab {
                return w.load_matrix(name, vocab, h, ep, fmt.as_stored, device);
            }
            let t = w.load(name, &[vocab, h], dtype, device)?;
            Ok(StoredMatrix::Dense(
                t.narrow(0, vocab_start, vocab_len)?.copy()?,
            ))
        };
        let embed_tokens = if holds_embedding || (holds_head && shape.tie_word_embeddings) {
            Some(load_rows("model.embed_tokens.weight")?)
        } else {
            None
        };
        let (norm, lm_head) = if holds_head {
            // Some tied checkpoints still ship an lm_head.weight copy; tied means we use
            // the embedding, as transformers does (its storage on stage 0, this stage's
            // own copy on a later one).
            let head = if shape.tie_word_embeddings {
                embed_tokens.clone().map(|e| Linear::new(e, None))
            } else {
                Some(Linear::new(load_rows("lm_head.weight")?, None))
            };
            (
                Some(load_norm(w, "model.norm.weight", shape, fmt, device)?),
                head,
            )
        } else {
            (None, None)
        };
        let embed_tokens = if holds_embedding { embed_tokens } else { None };

        // Bytes as the planner counts them: a tied head shared with the embedding once.
        let mut weights_bytes = layers.iter().map(DecoderLayer::weights_bytes).sum::<u64>();
        weights_bytes += embed_tokens.as_ref().map_or(0, StoredMatrix::bytes);
        if let Some(n) = &norm {
            weights_bytes += tensor_bytes(n.weight());
        }
        if let Some(head) = &lm_head {
            if !(shape.tie_word_embeddings && holds_embedding) {
                weights_bytes += head.bytes();
            }
        }
        // A GGUF kept as stored: the planner's figure is the file's own tensor table.
        let stored = match (fmt.as_stored, w.gguf()) {
            (true, Some(g)) => Some(g.summary()?),
            _ => None,
        };

        let mut local_shape = shape.clone();
        local_shape.num_hidden_layers = num_layers as u64;
        local_shape.num_attention_heads = shape.num_attention_heads / p.tp as u64;
        local_shape.num_key_value_heads =
            llmem_planner::plan::kv_heads_per_rank(shape, p.tp as u64);
        let rope = Rope::new(shape, shape.max_position_embeddings as usize, dtype, device)?;
        Ok(Model {
            shape: shape.clone(),
            local_shape,
            dtype,
            device: device.clone(),
            spec,
            embed_tokens,
            vocab_start,
            layers,
            first_layer,
            norm,
            lm_head,
            rope,
            tp: shard,
            weights_bytes,
            format: *fmt,
            stored,
        })
    }

    /// Where this model sits in the TP x PP grid ([`ShardSpec::single`] unsharded).
    pub fn spec(&self) -> ShardSpec {
        self.spec
    }

    /// The shape of this rank's KV cache: this stage's layers, this rank's KV heads.
    pub fn local_shape(&self) -> &ModelShape {
        &self.local_shape
    }

    /// How the weights are stored (precision, embeddings kept or not).
    pub fn weight_format(&self) -> &WeightFormat {
        &self.format
    }

    /// For a GGUF loaded with its tensors as stored: the file's tensor table summed per
    /// ggml type by the planner ([`llmem_planner::gguf_weights`]); its `bytes` equal
    /// [`Model::weights_bytes`].
    pub fn stored_weights(&self) -> Option<&CheckpointSummary> {
        self.stored.as_ref()
    }

    /// Open a GGUF file and load it: as stored when `fmt` is `None` (block formats stay
    /// blocks, see `crate::gguf_weights`), else dequantized and stored as `fmt` says.
    pub fn load_gguf(
        path: &Path,
        fmt: Option<&WeightFormat>,
        device: &Device,
    ) -> Result<(Self, crate::gguf_weights::GgufModel)> {
        let g = crate::gguf_weights::GgufModel::open(path)?;
        let fmt = match fmt {
            Some(f) => *f,
            None => {
                let main = g
                    .weights
                    .gguf()
                    .map_or(llmem_planner::Precision::Fp32, |w| w.main_precision());
                WeightFormat::gguf_as_stored(main)
            }
        };
        let model = Self::load_with(&g.shape, &g.weights, &fmt, device)?;
        Ok((model, g))
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest context (prompt + generated) this model supports.
    pub fn max_context(&self) -> usize {
        self.shape.max_position_embeddings as usize
    }

    /// Bytes of the weight tensors the model holds (a tied LM head counted once).
    pub fn weights_bytes(&self) -> u64 {
        self.weights_bytes
    }

    /// Check metadata against the tokens and caches of a pass.
    fn check_pass(
        &self,
        num_tokens: usize,
        meta: &AttnMetadata,
        caches: &[&mut KvCache],
    ) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(format!("forward pass: {m}")));
        if meta.query_lens.len() != meta.cached_lens.len() || meta.num_seqs() != caches.len() {
            return bad(format!(
                "metadata lists {} query lengths and {} cached lengths for {} caches",
                meta.query_lens.len(),
                meta.cached_lens.len(),
                caches.len()
            ));
        }
        if meta.num_tokens() != num_tokens {
            return bad(format!(
                "metadata covers {} tokens but the batch has {num_tokens}",
                meta.num_tokens()
            ));
        }
        for (s, cache) in caches.iter().enumerate() {
            if meta.query_lens[s] == 0 {
                return bad(format!("sequence {s} feeds no token"));
            }
            if cache.len() != meta.cached_lens[s] {
                return bad(format!(
                    "sequence {s}: metadata says {} cached tokens, its cache holds {}",
                    meta.cached_lens[s],
                    cache.len()
                ));
            }
            let ctx = meta.context_len(s);
            if ctx > self.max_context() {
                return bad(format!(
                    "sequence {s}: context of {ctx} tokens exceeds the model's \
                     max_position_embeddings = {}",
                    self.max_context()
                ));
            }
            if ctx > cache.capacity() {
                return bad(format!(
                    "sequence {s}: context of {ctx} tokens exceeds its KV cache capacity of {}",
                    cache.capacity()
                ));
            }
        }
        Ok(())
    }

    /// Run the decoder over one flattened batch and return the final-normed hidden states,
    /// (num_tokens, hidden), in the model dtype. Appends the pass's K and V to `caches`.
    ///
    /// `input_ids`: (num_tokens,) u32; `positions`: (num_tokens,) u32, normally
    /// `meta.positions()`; `caches[s]` belongs to sequence `s` of `meta`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        on_worker(&self.device, || {
            self.forward_hidden_here(input_ids, positions, meta, caches)
        })
    }

    fn forward_hidden_here(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let num_tokens = input_ids.dim(0)?;
        let (embed_tokens, norm) = self.whole()?;
        self.check_pass(num_tokens, meta, caches)?;
        let cos = self.rope.cos.index_select(positions, 0)?;
        let sin = self.rope.sin.index_select(positions, 0)?;
        let masks = (0..meta.num_seqs())
            .map(|s| causal_mask(meta.cached_lens[s], meta.query_lens[s], &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pass = PassInputs {
            cos,
            sin,
            masks,
            meta,
        };
        let mut x = embed_tokens.rows(input_ids, self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&x, |attn, h| attn.forward(h, &pass, i, caches))
                .map_err(|source| Error::Tensor {
                    context: format!("forward pass, layer {i}"),
                    message: crate::error::candle_message(source),
                })?;
        }
        for (s, cache) in caches.iter_mut().enumerate() {
            cache.advance(meta.query_lens[s]);
        }
        Ok(norm.forward(&x)?)
    }

    /// The embedding and final norm of a whole model; an error for a shard (the
    /// contiguous-cache path runs TP = PP = 1 only).
    fn whole(&self) -> Result<(&StoredMatrix, &RmsNorm)> {
        match (&self.embed_tokens, &self.norm, self.spec.is_single()) {
            (Some(e), Some(n), true) => Ok((e, n)),
            _ => Err(Error::InvalidInput(format!(
                "the per-sequence cache runs a whole model; this is a shard ({}): use the \
                 paged cache",
                self.spec.parallel.describe_split(&self.shape)
            ))),
        }
    }

    /// LM head: hidden (rows, hidden) -> logits (rows, vocab, or this rank's vocabulary
    /// rows when vocab-parallel) in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "pipeline stage {} holds no LM head; only the last stage computes logits",
                self.spec.pp_stage
            ))
        })?;
        Ok(head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// One pass, returning the logits of each sequence's last token: (num_seqs, vocab) f32.
    pub fn forward(
        &self,
        input_ids: &[u32],
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let ids = self.token_tensor(input_ids)?;
        let positions = Tensor::new(meta.positions().as_slice(), &self.device)?;
        let hidden = self.forward_hidden(&ids, &positions, meta, caches)?;
        let rows = Tensor::new(meta.last_token_rows().as_slice(), &self.device)?;
        self.logits(&hidden.index_select(&rows, 0)?)
    }

    /// One pass, returning the logits of every token: (num_tokens, vocab) f32.
    pub fn forward_all_logits(
        &self,
        input_ids: &[u32],
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let ids = self.token_tensor(input_ids)?;
        let positions = Tensor::new(meta.positions().as_slice(), &self.device)?;
        let hidden = self.forward_hidden(&ids, &positions, meta, caches)?;
        self.logits(&hidden)
    }

    /// One pass over the paged cache: returns the logits of the rows `sample_rows` of the
    /// flattened batch, (sample_rows.len(), vocab) f32.
    ///
    /// `ids`, `positions`: (num_tokens,), one entry per fed token, in the order of
    /// `meta`'s query rows (`meta.slot_mapping`, `meta.context_lens` have the same length);
    /// each token's K/V is written to its slot in every layer before attention reads it.
    /// `sample_rows`: indices into `0..num_tokens`, usually each sampled sequence's last
    /// token. Built from a `ScheduledBatch` by the engine, never by hand in production.
    pub fn forward_paged(
        &self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Tensor> {
        on_worker(&self.device, || {
            self.forward_paged_here(ids, positions, meta, cache, sample_rows)
        })
    }

    fn forward_paged_here(
        &self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Tensor> {
        self.check_paged(ids, positions, meta, cache, sample_rows)?;
        match self.forward_stage_checked(ids, positions, None, meta, cache, sample_rows)? {
            Some(logits) => Ok(logits),
            None => Err(Error::InvalidInput(format!(
                "paged forward pass: this rank ({}) returns no logits; run the whole grid",
                self.spec.parallel.describe_split(&self.shape)
            ))),
        }
    }

    /// This rank's part of one paged pass.
    ///
    /// Stage 0 starts from `ids`; a later stage from `hidden`, the (num_tokens, hidden)
    /// output of the stage before. Returns the hidden states for the next stage, or on
    /// the last stage the logits of `sample_rows` (rows x vocab, f32) on TP rank 0 (on
    /// every rank when vocab-parallel) and `None` on the other ranks. The whole model is
    /// the one stage whose TP rank 0 returns logits.
    pub fn forward_stage(
        &self,
        ids: &[u32],
        positions: &[u32],
        hidden: Option<&Tensor>,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Option<Tensor>> {
        self.check_paged(ids, positions, meta, cache, sample_rows)?;
        self.forward_stage_checked(ids, positions, hidden, meta, cache, sample_rows)
    }

    /// [`Model::forward_stage`] after [`Model::check_paged`] passed: the one paged loop.
    pub(crate) fn forward_stage_checked(
        &self,
        ids: &[u32],
        positions: &[u32],
        hidden: Option<&Tensor>,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Option<Tensor>> {
        let mut x = match (&self.embed_tokens, hidden) {
            (Some(table), _) => self.embed(table, ids)?,
            (None, Some(h)) => h.clone(),
            (None, None) => {
                return Err(Error::InvalidInput(format!(
                    "pipeline stage {} got no hidden states from the stage before",
                    self.spec.pp_stage
                )))
            }
        };
        let positions = Tensor::new(positions, &self.device)?;
        let cos = self.rope.cos.index_select(&positions, 0)?;
        let sin = self.rope.sin.index_select(&positions, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&x, |attn, h| {
                    attn.forward_paged(h, &cos, &sin, i, meta, cache)
                })
                .map_err(|e| match e {
                    Error::Tensor { message, .. } => Error::Tensor {
                        context: self.layer_context(i),
                        message,
                    },
                    other => other,
                })?;
        }
        let (Some(norm), Some(_)) = (&self.norm, &self.lm_head) else {
            return Ok(Some(x));
        };
        let vocab_parallel = self.spec.parallel.vocab_parallel && self.spec.parallel.tp > 1;
        if !vocab_parallel && self.spec.tp_rank != 0 {
            return Ok(None);
        }
        if sample_rows.is_empty() {
            // A step of prefill chunks only: the K/V are written, nothing is sampled. (On
            // the host: CUDA refuses zero-byte allocations.)
            let vocab = self.shape.vocab_size as usize;
            return Ok(Some(Tensor::zeros((0, vocab), DType::F32, &Device::Cpu)?));
        }
        let rows: Vec<u32> = sample_rows.iter().map(|&r| r as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        let logits = self.logits(&norm.forward(&x.index_select(&rows, 0)?)?)?;
        match (&self.tp, vocab_parallel) {
            (Some(tp), true) => Ok(Some(tp.comm.all_gather(&logits, 1)?)),
            _ => Ok(Some(logits)),
        }
    }

    /// "paged forward pass, layer 3", with the stage and TP rank for a shard.
    fn layer_context(&self, i: usize) -> String {
        if self.spec.is_single() {
            format!("paged forward pass, layer {i}")
        } else {
            format!(
                "paged forward pass, layer {} (stage {}, TP rank {})",
                self.first_layer + i,
                self.spec.pp_stage,
                self.spec.tp_rank
            )
        }
    }

    /// The embedding lookup; under vocab-parallel, ids outside this rank's rows give
    /// zero rows and one all-reduce assembles the full embedding on every rank.
    fn embed(&self, table: &StoredMatrix, ids: &[u32]) -> Result<Tensor> {
        let vocab_parallel = self.spec.parallel.vocab_parallel && self.spec.parallel.tp > 1;
        let (true, Some(tp), StoredMatrix::Dense(table)) = (vocab_parallel, &self.tp, table) else {
            return Ok(table.rows(&Tensor::new(ids, &self.device)?, self.dtype)?);
        };
        let rows = table.dim(0)?;
        let start = self.vocab_start as u32;
        let (local, mask): (Vec<u32>, Vec<f32>) = ids
            .iter()
            .map(|&id| match id.checked_sub(start) {
                Some(i) if (i as usize) < rows => (i, 1.0),
                _ => (0, 0.0),
            })
            .unzip();
        let n = ids.len();
        let x = table.index_select(&Tensor::new(local.as_slice(), &self.device)?, 0)?;
        let mask = Tensor::from_vec(mask, (n, 1), &self.device)?.to_dtype(self.dtype)?;
        tp.comm.all_reduce_sum(&x.broadcast_mul(&mask)?)
    }

    /// Input checks of a paged pass that fail the same way on every rank (so before any
    /// collective): the metadata against the tokens, the context and this rank's cache,
    /// and every id inside the vocabulary.
    pub(crate) fn check_paged(
        &self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        cache: &PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<()> {
        let who = if self.spec.is_single() {
            "the model"
        } else {
            "this shard"
        };
        check_paged_pass(
            ids,
            positions,
            meta,
            sample_rows,
            self.shape.max_position_embeddings,
            cache,
            &self.local_shape,
            who,
        )?;
        crate::request::check_token_ids("paged forward pass: token", ids, self.shape.vocab_size)
    }

    /// Token ids as a tensor, after checking each lies inside the vocabulary.
    fn token_tensor(&self, input_ids: &[u32]) -> Result<Tensor> {
        crate::request::check_token_ids("token", input_ids, self.shape.vocab_size)?;
        Ok(Tensor::new(input_ids, &self.device)?)
    }

    /// A fresh KV cache for one sequence of up to `capacity_tokens` tokens.
    pub fn new_cache(&self, capacity_tokens: usize) -> Result<KvCache> {
        KvCache::new(&self.shape, capacity_tokens, self.dtype, &self.device)
    }

    /// A paged KV cache of `num_blocks` blocks for this rank's layers and KV heads.
    pub fn new_paged_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: crate::kv_cache::KvDtype,
    ) -> Result<PagedKvCache> {
        PagedKvCache::new_on(
            &self.local_shape,
            num_blocks,
            block_size,
            dtype,
            &self.device,
        )
    }

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
        let logits = rows * h * e + rows * v * (e + 4);
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
        rank_activation_peak_bytes(&self.shape, self.dtype, self.spec, num_tokens, logits_rows)
    }
}

/// Estimated peak activation bytes of one rank in a paged pass of `num_tokens` tokens
/// computing `logits_rows` rows: [`crate::model::Model::paged_activation_peak_bytes`]
/// with this rank's widths (its heads, KV heads and intermediate share), the logits
/// phase on the last stage only (this rank's vocabulary rows in the model dtype plus
/// the gathered f32 logits over the whole vocabulary).
pub fn rank_activation_peak_bytes(
    shape: &ModelShape,
    dtype: DType,
    spec: ShardSpec,
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
    let mlp = t * (4 * i + h) * e;
    let logits = if spec.pp_stage == p.pp - 1 {
        let rows = logits_rows as u64;
        let local = if p.vocab_parallel {
            TpShard::share(shape.vocab_size as usize, p.tp, spec.tp_rank).1 as u64
        } else {
            shape.vocab_size
        };
        rows * h * e + rows * local * e + rows * shape.vocab_size * 4
    } else {
        0
    };
    resident + attention.max(mlp).max(logits)
}

/// Runs `f` on a worker of rayon's global pool (directly when already on one).
///
/// A pass calls the kernels' parallel loops hundreds of times. Called from outside the
/// pool, each call wakes the workers and parks this thread on a latch until they finish:
/// two context switches per call on a 2-core machine. From a worker, a parallel loop is
/// a plain join that this thread takes part in. Measured on SmolLM2-135M Q8_0 with 32
/// sequences: inter-token latency 69 -> 46..60 ms (`llmem bench`, interleaved runs).
/// Not for the tensor-parallel ranks, which block on each other inside a pass and could
/// wait forever for a worker held by another rank. On a GPU the pass stays on the calling
/// thread (nothing to gain, and the CUDA context is bound there).
fn on_worker<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Additive causal mask of one sequence: (query_len, cached_len + query_len) f32, with
/// -inf where key position > query position; `None` for a single query token.
fn causal_mask(
    cached_len: usize,
    query_len: usize,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if query_len <= 1 {
        return Ok(None);
    }
    let ctx = cached_len + query_len;
    let data: Vec<f32> = (0..query_len)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j > cached_len + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (query_len, ctx), device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_random_model_has_the_planners_weight_bytes() {
        let shape = llmem_planner::preset("smollm2-135m").unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let fmt = WeightFormat::dense(dtype).unwrap();
            let model =
                Model::load_with(&shape, &WeightFiles::random(1), &fmt, &Device::Cpu).unwrap();
            let planned = llmem_planner::model_weights_bytes(&shape, fmt.precision, false).unwrap();
            assert_eq!(model.weights_bytes(), planned, "{dtype:?}");
            let mut cache = model.new_cache(8).unwrap();
            let meta = AttnMetadata::single(0, 3);
            let logits = model
                .forward_all_logits(&[1, 2, 3], &meta, &mut [&mut cache])
                .unwrap();
            let finite = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                finite.iter().all(|x| x.is_finite()),
                "{dtype:?}: logits finite"
            );
        }
    }
}
