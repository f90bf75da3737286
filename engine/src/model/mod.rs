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

mod host_step;
mod memory;

pub use memory::rank_activation_peak_bytes;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llmem_planner::checkpoint::CheckpointSummary;
use llmem_planner::{ModelShape, StoredTensor};

use crate::cache::contiguous::KvCache;
use crate::cache::paged::{check_paged_pass, PagedKvCache, PagedMetadata};
use crate::error::{Error, Result};
use crate::heap::{self, Component};
pub use crate::layers::attention::AttnMetadata;
use crate::layers::attention::{causal_mask, PassInputs};
use crate::layers::decoder::DecoderLayer;
use crate::layers::linear::tensor_bytes;
use crate::layers::linear::Linear;
use crate::layers::norm::{load_norm, RmsNorm};
use crate::layers::rope::Rope;
use crate::parallel::comm::Communicator;
use crate::parallel::spec::{ShardSpec, TpShard};
use crate::weights::files::WeightFiles;
use crate::weights::gguf::tensors::Part;
use crate::weights::quant::{StoredMatrix, WeightFormat};

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
/// Shards run float and block formats: a block format quantizes each rank's slices of
/// the dense tensors, so slices on block boundaries hold the unsharded model's blocks.
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
    /// The same file's tensor table, from which the planner cuts each rank's bytes.
    stored_tensors: Option<Arc<Vec<StoredTensor>>>,
    /// What moving the weights into 2 MiB pages did, on the CPU.
    huge_pages: Option<crate::weights::pages::HugePages>,
}

impl Model {
    /// Load a model directory (config.json plus safetensors) in `dtype` on `device`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, &WeightFormat::dense(dtype)?, device)
    }

    /// Load a model directory with its weights stored as `fmt` says (see `crate::weights::quant`).
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
    /// (float dtypes, or GGUF block formats quantized at load; see `crate::weights::quant`).
    pub fn load_with(
        shape: &ModelShape,
        w: &WeightFiles,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        Self::load_part(shape, w, fmt, device, ShardSpec::single(), None)
    }

    /// Load rank `spec`'s shard stored as `fmt` says, its TP group meeting through
    /// `comm`. Each rank reads only its slices of the split matrices (see
    /// [`crate::weights::files::WeightFiles::load_part`]); a block format quantizes each
    /// slice. A GGUF kept as
    /// stored gives each rank its slices in their stored types, read from the map alone
    /// (see `crate::weights::gguf::tensors::GgufWeights::load_stored_part`).
    pub fn load_shard(
        shape: &ModelShape,
        w: &WeightFiles,
        fmt: &WeightFormat,
        device: &Device,
        spec: ShardSpec,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        if comm.world_size() != spec.parallel.tp || comm.rank() != spec.tp_rank {
            return Err(Error::InvalidInput(format!(
                "shard of TP rank {} of {} given communicator rank {} of {}",
                spec.tp_rank,
                spec.parallel.tp,
                comm.rank(),
                comm.world_size()
            )));
        }
        Self::load_part(shape, w, fmt, device, spec, Some(comm))
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
        // Every block the weights keep is counted as theirs (`crate::heap`), on this
        // thread's rank; the rope tables and the file summary below are not weights. Rayon's
        // global pool, made on first use (by the packing below, say), is the runtime's.
        {
            let _runtime = heap::scope(Component::Runtime);
            rayon::current_num_threads();
        }
        let weights_scope = heap::scope(Component::Weights);
        let layers = (first_layer..first_layer + num_layers)
            .map(|i| match &shard {
                None => DecoderLayer::load(w, i, shape, fmt, device),
                Some(s) => DecoderLayer::load_shard(w, i, shape, fmt, device, s),
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
        // rows, so the whole table is freed, stored at the embedding's precision.
        let load_rows = |name: &str| -> Result<StoredMatrix> {
            if vocab_len == vocab {
                return w.load_matrix(name, vocab, h, ep, fmt.as_stored, device);
            }
            if let (true, Some(g)) = (fmt.as_stored, w.gguf()) {
                let part = Part::Rows {
                    start: vocab_start,
                    len: vocab_len,
                };
                return g.load_stored_part(name, vocab, h, part, device);
            }
            let part = Part::Rows {
                start: vocab_start,
                len: vocab_len,
            };
            let rows = w.load_part(name, vocab, h, part, dtype, device)?;
            crate::weights::quant::store_matrix(&rows, ep, name)
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
        drop(weights_scope);
        let _runtime = heap::scope(Component::Runtime);

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
        let (stored, stored_tensors) = match (fmt.as_stored, w.gguf()) {
            (true, Some(g)) => (Some(g.summary()?), Some(Arc::new(g.stored_tensors()?))),
            _ => (None, None),
        };

        let mut local_shape = shape.clone();
        local_shape.num_hidden_layers = num_layers as u64;
        local_shape.num_attention_heads = shape.num_attention_heads / p.tp as u64;
        local_shape.num_key_value_heads =
            llmem_planner::plan::kv_heads_per_rank(shape, p.tp as u64);
        let rope = Rope::new(shape, dtype, device)?;
        let mut model = Model {
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
            stored_tensors,
            huge_pages: None,
        };
        if device.is_cpu() && crate::weights::pages::enabled() {
            let ranges = model.weight_ranges();
            model.huge_pages = Some(crate::weights::pages::back_with_huge_pages(&ranges));
        }
        Ok(model)
    }

    /// Where each weight matrix lies in host memory, (address, length): the layers'
    /// projections, the embedding and an untied head (norm vectors are too small to
    /// matter).
    fn weight_ranges(&self) -> Vec<(usize, usize)> {
        let mut mats: Vec<&StoredMatrix> = Vec::new();
        for l in &self.layers {
            mats.extend(l.matrices().into_iter().map(|lin| lin.weight()));
        }
        mats.extend(self.embed_tokens.as_ref());
        mats.extend(self.lm_head.as_ref().map(|h| h.weight()));
        mats.iter().filter_map(|m| m.host_range()).collect()
    }

    /// What the load did to put the weights in 2 MiB pages (`crate::weights::pages`);
    /// `None` on a GPU or with `LLMEM_HUGE_PAGES=0`.
    pub fn huge_pages(&self) -> Option<crate::weights::pages::HugePages> {
        self.huge_pages
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

    /// For a GGUF loaded as stored: its tensor table, for the planner's per-rank bytes.
    pub fn stored_tensors(&self) -> Option<Arc<Vec<StoredTensor>>> {
        self.stored_tensors.clone()
    }

    /// Open a GGUF file and load it: as stored when `fmt` is `None` (block formats stay
    /// blocks, see `crate::weights::gguf::tensors`), else dequantized and stored as `fmt` says.
    pub fn load_gguf(
        path: &Path,
        fmt: Option<&WeightFormat>,
        device: &Device,
    ) -> Result<(Self, crate::weights::source::GgufModel)> {
        let g = crate::weights::source::GgufModel::open(path)?;
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
        positions: &[u32],
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
        positions: &[u32],
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let num_tokens = input_ids.dim(0)?;
        let (embed_tokens, norm) = self.whole()?;
        self.check_pass(num_tokens, meta, caches)?;
        let (cos, sin) = self.rope.at(positions)?;
        // Only the general path (score matrices) takes a mask; see `KvCache::makes_scores`.
        let masks = (0..meta.num_seqs())
            .map(|s| match caches.get(s).is_some_and(|c| c.makes_scores()) {
                true => causal_mask(meta.cached_lens[s], meta.query_lens[s], &self.device),
                false => Ok(None),
            })
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
                .forward(x, |attn, h| attn.forward(h, &pass, i, caches))
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

    /// The matrix products of one batch-1 decode step and nothing else: per layer q/k/v
    /// together, o, gate/up together and down, then the LM head, on rows of ones, through
    /// the same [`Linear`] calls, kernels, weights and worker threads as a step. Beside a
    /// decode step (`benches/engine.rs`) it shows how much of the step the products are;
    /// the rest is attention, the element-wise steps and the tensors around them. A whole
    /// model only (an error names a shard).
    pub fn decode_products(&self) -> Result<()> {
        self.whole()?;
        let hidden = self.shape.hidden_size as usize;
        on_worker(&self.device, || {
            let x = Tensor::ones((1, hidden), self.dtype, &self.device)?;
            for layer in &self.layers {
                let (a, m) = (&layer.self_attn, &layer.mlp);
                let [q, _, _] = Linear::forward_many(&x, [&a.q_proj, &a.k_proj, &a.v_proj])?;
                a.o_proj.forward(&q)?;
                let [gate, _] = Linear::forward_many(&x, [&m.gate_proj, &m.up_proj])?;
                m.down_proj.forward(&gate)?;
            }
            if let Some(head) = &self.lm_head {
                head.forward(&x)?;
            }
            Ok(())
        })
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
    ///
    /// One token of one sequence over a float cache on the CPU (a decode step of
    /// `generate`) runs through `host_step`, with no tensors between the kernels; every
    /// other pass through the general loop. Both give the same logits.
    pub fn forward(
        &self,
        input_ids: &[u32],
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if let ([id], [cache]) = (input_ids, &*caches) {
            if cache.host_layer(0).is_some() && self.host_step_ready() {
                crate::request::check_token_ids("token", input_ids, self.shape.vocab_size)?;
                self.check_pass(1, meta, caches)?;
                let (pos, cache) = (meta.cached_lens[0], &mut *caches[0]);
                let heads = self.shape.num_attention_heads as usize;
                let logits = on_worker(&self.device, || {
                    self.host_step(*id, pos, host_step::attend_contiguous(cache, pos, heads))
                })?;
                cache.advance(1);
                return Ok(logits);
            }
        }
        self.forward_general(input_ids, meta, caches)
    }

    /// [`Model::forward`] through the general loop, whatever the pass.
    pub(crate) fn forward_general(
        &self,
        input_ids: &[u32],
        meta: &AttnMetadata,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let ids = self.token_tensor(input_ids)?;
        let hidden = self.forward_hidden(&ids, &meta.positions(), meta, caches)?;
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
        let hidden = self.forward_hidden(&ids, &meta.positions(), meta, caches)?;
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

    /// [`Model::forward_stage`] after [`Model::check_paged`] passed.
    ///
    /// One token of a whole model on the CPU, sampled, runs through `host_step` (as
    /// [`Model::forward`]'s decode steps do); every other pass through the general loop.
    pub(crate) fn forward_stage_checked(
        &self,
        ids: &[u32],
        positions: &[u32],
        hidden: Option<&Tensor>,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
        sample_rows: &[usize],
    ) -> Result<Option<Tensor>> {
        if let ([id], [pos], None, [0]) = (ids, positions, hidden, sample_rows) {
            if cache.device().is_cpu() && self.host_step_ready() {
                let attend = host_step::attend_paged(cache, meta);
                return Ok(Some(self.host_step(*id, *pos as usize, attend)?));
            }
        }
        self.forward_stage_general(ids, positions, hidden, meta, cache, sample_rows)
    }

    /// [`Model::forward_stage_checked`] through the general loop, whatever the pass.
    pub(crate) fn forward_stage_general(
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
        let (cos, sin) = self.rope.at(positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(x, |attn, h| {
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
        let (true, Some(tp)) = (vocab_parallel, &self.tp) else {
            return Ok(table.rows(&Tensor::new(ids, &self.device)?, self.dtype)?);
        };
        let rows = table.num_rows()?;
        let start = self.vocab_start as u32;
        let (local, mask): (Vec<u32>, Vec<f32>) = ids
            .iter()
            .map(|&id| match id.checked_sub(start) {
                Some(i) if (i as usize) < rows => (i, 1.0),
                _ => (0, 0.0),
            })
            .unzip();
        let n = ids.len();
        let x = table.rows(&Tensor::new(local.as_slice(), &self.device)?, self.dtype)?;
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
        dtype: crate::cache::paged::KvDtype,
    ) -> Result<PagedKvCache> {
        PagedKvCache::new_on(
            &self.local_shape,
            num_blocks,
            block_size,
            dtype,
            &self.device,
        )
    }
}

/// Runs `f` on a worker of rayon's global pool (directly when already on one).
///
/// A pass calls the kernels' parallel loops hundreds of times. Called from outside the
/// pool, each call wakes the workers and parks this thread on a latch until they finish:
/// two context switches per call on a 2-core machine. From a worker, a parallel loop is
/// a plain join that this thread takes part in (its effect on `llmem bench` is in
/// docs/results.md). Not for the tensor-parallel ranks, which block on each other inside a pass and could
/// wait forever for a worker held by another rank. On a GPU the pass stays on the calling
/// thread (nothing to gain, and the CUDA context is bound there).
fn on_worker<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        f()
    } else {
        // The worker counts its allocations as this thread would (`crate::heap`).
        let tag = crate::heap::Tag::current();
        rayon::scope(|_| {
            let _tag = tag.enter();
            f()
        })
    }
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
            // The products of a step alone run on the same layers and leave the cache.
            model.decode_products().unwrap();
            let again = model
                .forward_all_logits(&[4], &AttnMetadata::single(3, 1), &mut [&mut cache])
                .unwrap();
            assert_eq!(again.dims2().unwrap().0, 1, "{dtype:?}");
        }
    }
}
