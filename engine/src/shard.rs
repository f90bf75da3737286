//! One rank's share of the model under tensor (TP) and pipeline (PP) parallelism.
//!
//! Megatron's split, the same one the planner counts (`llmem_planner::plan::layer_bytes`
//! and `rank_weights`), so the engine's per-rank bytes and the plan's per-GPU bytes are
//! one computation done twice:
//! - q/k/v and gate/up are column-parallel (each rank holds some output rows), o_proj
//!   and down_proj row-parallel (the matching input columns), each followed by one
//!   all-reduce, so a layer costs two all-reduces of (tokens x hidden);
//! - the heads split evenly (TP must divide them); KV heads split too, or, once TP
//!   exceeds them, every rank holds the one KV head its query heads read (replicated);
//! - the intermediate size splits as evenly as possible (first ranks one row more);
//! - norms, the o/down biases and rotary tables are replicated; the o/down biases are
//!   added once, after the all-reduce;
//! - the embedding and LM head are replicated, or split by vocabulary rows
//!   (`vocab_parallel`): the lookup zeroes ids outside the rank's rows and one
//!   all-reduce completes it; the head's partial logits are all-gathered;
//! - PP stage `s` holds the consecutive layers `llmem_planner::plan::stage_layers`
//!   gives it; stage 0 the embedding, the last stage the final norm and LM head (its
//!   own copy when tied and PP > 1).
//!
//! With a replicated head only TP rank 0 computes logits (the others would compute the
//! same numbers), so the other ranks' head is memory the plan counts but never reads.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::kv_cache::{check_paged_pass, PagedKvCache, PagedMetadata};
use crate::linear::Linear;
use crate::loader::WeightFiles;
use crate::model::{load_norm, tensor_bytes, DecoderLayer, RmsNorm, Rope, TpShard};

/// How a model is split: TP degree, PP stages and the embedding layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelSpec {
    pub tp: usize,
    pub pp: usize,
    /// Split the embedding and LM head by vocabulary rows instead of replicating them.
    pub vocab_parallel: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            pp: 1,
            vocab_parallel: false,
        }
    }
}

impl ParallelSpec {
    /// Refuse a TP degree that does not split the heads (naming the degrees that do) and
    /// more stages than layers.
    pub fn validate(&self, shape: &ModelShape) -> Result<()> {
        let valid = llmem_planner::plan::valid_tp_degrees(shape);
        if self.tp == 0 || !valid.contains(&(self.tp as u64)) {
            let list: Vec<String> = valid.iter().map(u64::to_string).collect();
            return Err(Error::InvalidInput(format!(
                "--tp {} does not split {}: it has {} attention heads and {} KV heads; \
                 valid TP degrees: {}",
                self.tp,
                shape.name,
                shape.num_attention_heads,
                shape.num_key_value_heads,
                list.join(", ")
            )));
        }
        if self.pp == 0 || self.pp as u64 > shape.num_hidden_layers {
            return Err(Error::InvalidInput(format!(
                "--pp {} must be between 1 and the {} layers of {}",
                self.pp, shape.num_hidden_layers, shape.name
            )));
        }
        Ok(())
    }

    /// Layers per stage: the planner's split, so both put the same layers on a GPU.
    pub fn stage_layers(&self, shape: &ModelShape) -> Vec<usize> {
        llmem_planner::plan::stage_layers(shape.num_hidden_layers, self.pp as u64)
            .into_iter()
            .map(|l| l as usize)
            .collect()
    }

    /// "stage 0: layers 0-14 (+ embedding), stage 1: layers 15-29 (+ LM head)".
    pub fn describe_split(&self, shape: &ModelShape) -> String {
        let split = self.stage_layers(shape);
        let last = split.len() - 1;
        let mut first = 0;
        let mut parts = Vec::new();
        for (s, &n) in split.iter().enumerate() {
            let mut extra = Vec::new();
            if s == 0 {
                extra.push("embedding");
            }
            if s == last {
                extra.push("LM head");
            }
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(" (+ {})", extra.join(", "))
            };
            parts.push(format!(
                "stage {s}: layers {first}-{}{extra}",
                first + n - 1
            ));
            first += n;
        }
        parts.join("; ")
    }
}

/// Where one rank sits in the TP x PP grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub tp_rank: usize,
    pub pp_stage: usize,
    pub parallel: ParallelSpec,
}

/// One rank's shard of the model.
pub struct ShardedModel {
    shape: ModelShape,
    /// The shard as the KV cache sees it: this stage's layers, this rank's heads.
    local_shape: ModelShape,
    dtype: DType,
    device: Device,
    spec: ShardSpec,
    /// (vocab, hidden) or this rank's vocabulary rows; stage 0 only.
    embed_tokens: Option<Tensor>,
    /// First vocabulary row this rank holds (0 unless vocab-parallel).
    vocab_start: usize,
    layers: Vec<DecoderLayer>,
    /// Final norm and LM head: the last stage only.
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rope: Rope,
    comm: Arc<dyn Communicator>,
    weights_bytes: u64,
}

impl ShardedModel {
    /// Load rank `spec`'s shard. Every tensor is read whole, checked, and sliced.
    pub fn load(
        shape: &ModelShape,
        w: &WeightFiles,
        dtype: DType,
        device: &Device,
        spec: ShardSpec,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let p = spec.parallel;
        p.validate(shape)?;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidInput(format!(
                "dtype {dtype:?} is not supported for the model; use f32, bf16 or f16"
            )));
        }
        if comm.world_size() != p.tp || comm.rank() != spec.tp_rank {
            return Err(Error::InvalidInput(format!(
                "shard of TP rank {} of {} given communicator rank {} of {}",
                spec.tp_rank,
                p.tp,
                comm.rank(),
                comm.world_size()
            )));
        }
        let split = p.stage_layers(shape);
        let first_layer: usize = split[..spec.pp_stage].iter().sum();
        let num_layers = split[spec.pp_stage];
        let (holds_embedding, holds_head) = (spec.pp_stage == 0, spec.pp_stage == p.pp - 1);
        let shard = TpShard {
            rank: spec.tp_rank,
            tp: p.tp,
            comm: comm.clone(),
        };
        let layers = (first_layer..first_layer + num_layers)
            .map(|i| DecoderLayer::load_shard(w, i, shape, dtype, device, &shard))
            .collect::<Result<Vec<_>>>()?;

        let (vocab, h) = (shape.vocab_size as usize, shape.hidden_size as usize);
        let (vocab_start, vocab_len) = if p.vocab_parallel {
            TpShard::share(vocab, p.tp, spec.tp_rank)
        } else {
            (0, vocab)
        };
        let rows = |t: Tensor| -> Result<Tensor> {
            if vocab_len == vocab {
                return Ok(t);
            }
            // A deep copy, so the whole table is freed.
            Ok(t.narrow(0, vocab_start, vocab_len)?.copy()?)
        };
        let embed_tokens = if holds_embedding || (holds_head && shape.tie_word_embeddings) {
            Some(rows(w.load(
                "model.embed_tokens.weight",
                &[vocab, h],
                dtype,
                device,
            )?)?)
        } else {
            None
        };
        let (norm, lm_head) = if holds_head {
            let head = if shape.tie_word_embeddings {
                // Shares the embedding's storage (on stage 0) or is this stage's copy.
                embed_tokens.clone().map(|e| Linear::from_weight(e, None))
            } else {
                let weight = w.load("lm_head.weight", &[vocab, h], dtype, device)?;
                Some(Linear::from_weight(rows(weight)?, None))
            };
            (
                Some(load_norm(
                    w,
                    "model.norm.weight",
                    shape,
                    &crate::quant::WeightFormat::dense(dtype)?,
                    device,
                )?),
                head,
            )
        } else {
            (None, None)
        };
        let embed_tokens = if holds_embedding { embed_tokens } else { None };

        // Bytes as the planner counts them: a tied head shared with the embedding once.
        let mut weights_bytes = layers.iter().map(DecoderLayer::weights_bytes).sum::<u64>();
        weights_bytes += embed_tokens.as_ref().map_or(0, tensor_bytes);
        if let Some(n) = &norm {
            weights_bytes += tensor_bytes(n.weight());
        }
        if let Some(head) = &lm_head {
            if !(shape.tie_word_embeddings && holds_embedding) {
                weights_bytes += head.bytes();
            }
        }

        let mut local_shape = shape.clone();
        local_shape.num_hidden_layers = num_layers as u64;
        local_shape.num_attention_heads = shape.num_attention_heads / p.tp as u64;
        local_shape.num_key_value_heads =
            llmem_planner::plan::kv_heads_per_rank(shape, p.tp as u64);
        let rope = Rope::new(shape, shape.max_position_embeddings as usize, dtype, device)?;
        Ok(ShardedModel {
            shape: shape.clone(),
            local_shape,
            dtype,
            device: device.clone(),
            spec,
            embed_tokens,
            vocab_start,
            layers,
            norm,
            lm_head,
            rope,
            comm,
            weights_bytes,
        })
    }

    pub fn spec(&self) -> ShardSpec {
        self.spec
    }

    /// The shape of this shard's KV cache: this stage's layers, this rank's KV heads.
    pub fn local_shape(&self) -> &ModelShape {
        &self.local_shape
    }

    /// Bytes of the weights this rank holds.
    pub fn weights_bytes(&self) -> u64 {
        self.weights_bytes
    }

    /// A KV cache for this shard's layers and heads.
    pub fn new_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: crate::kv_cache::KvDtype,
    ) -> Result<PagedKvCache> {
        PagedKvCache::new(&self.local_shape, num_blocks, block_size, dtype)
    }

    /// The embedding lookup; under vocab-parallel, ids outside this rank's rows give
    /// zero rows and one all-reduce assembles the full embedding on every rank.
    fn embed(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let rows = table.dim(0)?;
        if !self.spec.parallel.vocab_parallel || self.spec.parallel.tp == 1 {
            return Ok(table.index_select(&Tensor::new(ids, &self.device)?, 0)?);
        }
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
        self.comm.all_reduce_sum(&x.broadcast_mul(&mask)?)
    }

    /// This stage's part of one paged pass.
    ///
    /// Stage 0 starts from `ids`; a later stage from `hidden`, the (num_tokens, hidden)
    /// output of the stage before. Returns the hidden states for the next stage, or on
    /// the last stage the logits of `sample_rows` (rows x vocab, f32) on TP rank 0 (on
    /// every rank when vocab-parallel) and `None` on the other ranks.
    pub fn forward_paged(
        &self,
        ids: &[u32],
        positions: &[u32],
        hidden: Option<&Tensor>,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Option<Tensor>> {
        self.check(ids, positions, meta, cache, sample_rows)?;
        self.forward_checked(ids, positions, hidden, meta, cache, sample_rows)
    }

    /// [`ShardedModel::forward_paged`] after [`ShardedModel::check`] passed.
    pub(crate) fn forward_checked(
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
        let first: usize = self.spec.parallel.stage_layers(&self.shape)[..self.spec.pp_stage]
            .iter()
            .sum();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&x, |attn, h| {
                    attn.forward_paged(h, &cos, &sin, i, meta, cache)
                })
                .map_err(|e| match e {
                    Error::Tensor { message, .. } => Error::Tensor {
                        context: format!(
                            "paged forward pass, layer {} (stage {}, TP rank {})",
                            first + i,
                            self.spec.pp_stage,
                            self.spec.tp_rank
                        ),
                        message,
                    },
                    other => other,
                })?;
        }
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            return Ok(Some(x));
        };
        let vocab_parallel = self.spec.parallel.vocab_parallel && self.spec.parallel.tp > 1;
        if !vocab_parallel && self.spec.tp_rank != 0 {
            return Ok(None);
        }
        if sample_rows.is_empty() {
            let vocab = self.shape.vocab_size as usize;
            return Ok(Some(Tensor::zeros((0, vocab), DType::F32, &self.device)?));
        }
        let rows: Vec<u32> = sample_rows.iter().map(|&r| r as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        let h = norm.forward(&x.index_select(&rows, 0)?)?;
        let logits = head.forward(&h)?.to_dtype(DType::F32)?;
        if vocab_parallel {
            Ok(Some(self.comm.all_gather(&logits, 1)?))
        } else {
            Ok(Some(logits))
        }
    }

    /// Input checks that fail the same way on every rank (so before any collective).
    pub(crate) fn check(
        &self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        cache: &PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<()> {
        check_paged_pass(
            ids,
            positions,
            meta,
            sample_rows,
            self.shape.max_position_embeddings,
            cache,
            &self.local_shape,
            "this shard",
        )?;
        let vocab = self.shape.vocab_size;
        if let Some(&t) = ids.iter().find(|&&t| u64::from(t) >= vocab) {
            return Err(Error::InvalidInput(format!(
                "paged forward pass: token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
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
