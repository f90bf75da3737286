//! The plan: one model, one workload, one deployment -> a per-GPU memory bill.
//!
//! ```text
//! total_gpu_memory >= weights + kv_cache + activations + runtime_overhead + headroom
//! ```
//!
//! Every GPU of the deployment is billed on its own: tensor parallelism (TP) splits the
//! layer matrices Megatron-style (q/k/v and gate/up by output rows, o/down by input
//! columns; norms replicated; KV heads split, replicated once TP exceeds them), pipeline
//! parallelism (PP) splits the layers (stage 0 holds the embedding, the last stage the
//! LM head and final norm). The plan reports the most loaded GPU, which is what must fit.
//! All sums are overflow-checked.

use serde::Serialize;

use crate::gpu::Gpu;
use crate::precision::{matrix_bytes, vector_bytes, KvDtype, Precision};
use crate::shape::{ModelShape, ParamCounts};
use crate::PlanError;

/// How attention is computed: fused kernels never materialise the score matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    Fused,
    Unfused,
}

/// What the deployment has to serve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    /// Tokens per sequence (prompt + generated) the KV cache must hold.
    pub context_tokens: u64,
    /// Sequences served at once (over all replicas).
    pub concurrency: u64,
    /// Tokens in one forward pass (the prefill chunk budget); sizes activations.
    pub max_batched_tokens: u64,
    pub attention: AttentionImpl,
}

impl Workload {
    pub fn new(context_tokens: u64, concurrency: u64) -> Self {
        Workload {
            context_tokens,
            concurrency,
            max_batched_tokens: DEFAULT_MAX_BATCHED_TOKENS,
            attention: AttentionImpl::Fused,
        }
    }
}

/// Default tokens per forward pass, as a chunked-prefill scheduler would use.
pub const DEFAULT_MAX_BATCHED_TOKENS: u64 = 2048;
/// Default headroom: 10% on top of the working set.
pub const DEFAULT_HEADROOM: f64 = 0.10;

/// How the model is laid out on hardware.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deployment {
    pub precision: Precision,
    pub kv_dtype: KvDtype,
    pub tp: u64,
    pub pp: u64,
    /// Data-parallel copies of the TP x PP group; concurrency is split between them.
    pub replicas: u64,
    pub gpu: Gpu,
    /// Overrides the GPU's default runtime overhead.
    pub runtime_overhead_bytes: Option<u64>,
    /// Fraction of the working set added as headroom (0.1 = 10%).
    pub headroom_fraction: f64,
    /// Split the embedding and LM head by vocabulary rows across TP ranks.
    pub vocab_parallel: bool,
    /// Keep the embedding and LM head at fp16 when the other weights are quantized.
    pub keep_embeddings: bool,
    /// The weight bytes of a file whose tensors are loaded as stored (a GGUF's tensor
    /// table summed by [`crate::gguf_weights`]; mixed types have no one precision). Used
    /// for a rank that holds the whole model (TP = PP = 1) instead of the estimate at
    /// `precision`; a split plan uses `stored_tensors` when given, else the estimate.
    pub stored_weights_bytes: Option<u64>,
    /// The tensor table of a GGUF loaded as stored: each rank's weight bytes are then the
    /// bytes of its slices of these tensors ([`crate::gguf_rank_weights`]), exact for
    /// files that mix types by layer or by tensor.
    #[serde(skip)]
    pub stored_tensors: Option<std::sync::Arc<Vec<crate::StoredTensor>>>,
    /// Bytes per activation value. `None`: the precision's ([`Precision::activation_bytes`]:
    /// 4 at fp32, else 2, as GPU kernels compute quantized weights in 16 bits). llmem's
    /// CPU engine computes block formats in f32 and sets 4.
    pub activation_bytes: Option<u64>,
}

impl Deployment {
    pub fn new(precision: Precision, gpu: Gpu) -> Self {
        Deployment {
            precision,
            kv_dtype: KvDtype::default_for(precision),
            tp: 1,
            pp: 1,
            replicas: 1,
            gpu,
            runtime_overhead_bytes: None,
            headroom_fraction: DEFAULT_HEADROOM,
            vocab_parallel: false,
            keep_embeddings: false,
            stored_weights_bytes: None,
            stored_tensors: None,
            activation_bytes: None,
        }
    }

    /// Bytes per activation value: the override, else the precision's.
    pub fn activation_value_bytes(&self) -> u64 {
        self.activation_bytes
            .unwrap_or_else(|| self.precision.activation_bytes())
    }

    pub fn gpus(&self) -> u64 {
        self.tp * self.pp * self.replicas
    }

    fn embedding_precision(&self) -> Precision {
        if self.keep_embeddings && self.precision.is_quantized() {
            Precision::Fp16
        } else {
            self.precision
        }
    }
}

/// The five terms of the formula for one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Terms {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    pub runtime_overhead_bytes: u64,
    pub headroom_bytes: u64,
    pub total_bytes: u64,
}

/// One pipeline stage (its most loaded TP rank).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    pub stage: u64,
    pub first_layer: u64,
    pub num_layers: u64,
    pub holds_embedding: bool,
    pub holds_lm_head: bool,
    /// KV bytes per token on one GPU of this stage.
    pub kv_bytes_per_token: u64,
    /// The most loaded rank of this stage.
    pub per_gpu: Terms,
    /// Weight bytes of each TP rank of this stage (they differ when a split is uneven).
    pub rank_weights_bytes: Vec<u64>,
}

/// The activation estimate: the exact peak of this engine's forward pass, and the
/// lesson's rough form beside it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Activations {
    /// Tokens in the forward pass that sets the peak.
    pub tokens: u64,
    /// Rows of logits computed (one per sequence sampled in that pass).
    pub logit_rows: u64,
    pub attention_phase_bytes: u64,
    pub mlp_phase_bytes: u64,
    pub logits_phase_bytes: u64,
    pub peak_bytes: u64,
    pub peak_phase: String,
    /// concurrency x context x hidden x 2 bytes, before any framework multiplier.
    pub simple_form_bytes: u64,
}

/// Speed bounds from first principles (upper bounds, not predictions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeedBounds {
    /// Batch 1 at full context: bandwidth / (weights + KV read per step), PP stages in series.
    pub decode_tokens_per_s_batch1: Option<f64>,
    /// All sequences of a replica decoding at full context, aggregate over all replicas.
    pub decode_tokens_per_s_full_batch: Option<f64>,
    /// Bytes one GPU sends for TP all-reduces per decoded token (ring all-reduce).
    pub allreduce_bytes_per_token_per_gpu: u64,
    /// Time those all-reduces take per token at the interconnect's bandwidth.
    pub allreduce_ms_per_token: Option<f64>,
}

/// Model facts carried into the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub architecture: String,
    pub params_total: u64,
    pub params: ParamCounts,
    pub layers: u64,
    pub hidden_size: u64,
    pub attention_heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
}

/// A complete plan. JSON keys named in the README are a contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub model: ModelSummary,
    pub workload: Workload,
    pub deployment: Deployment,
    /// KV bytes per token for the whole model: 2 x layers x kv_heads x head_dim x bytes.
    pub kv_bytes_per_token: u64,
    /// Weights of the whole model at this precision, stored once.
    pub weights_bytes_model: u64,
    /// KV cache of the whole workload, stored once: kv_bytes_per_token x concurrency x context.
    pub kv_cache_bytes_model: u64,
    /// The most loaded GPU.
    pub per_gpu: Terms,
    pub stages: Vec<StagePlan>,
    pub activations: Activations,
    pub speed: SpeedBounds,
    pub gpus: u64,
    pub gpu_memory_bytes: u64,
    pub fits: bool,
    /// gpu_memory_bytes - per_gpu.total_bytes (negative when it does not fit).
    pub margin_bytes: i64,
    /// Sum over every GPU of the deployment.
    pub total_bytes: u64,
    /// Weight tensors by stored precision over the whole model (after fallbacks).
    pub tensor_precisions: Vec<TensorGroup>,
    pub assumptions: Vec<String>,
}

/// Weight tensors sharing a stored precision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorGroup {
    pub precision: Precision,
    pub kind: String,
    pub tensors: u64,
    pub params: u64,
    pub bytes: u64,
}

fn ck(v: Option<u64>, what: &str) -> Result<u64, PlanError> {
    v.ok_or_else(|| PlanError::Overflow(what.to_string()))
}

fn sum(values: &[u64], what: &str) -> Result<u64, PlanError> {
    values
        .iter()
        .try_fold(0u64, |acc, v| acc.checked_add(*v))
        .ok_or_else(|| PlanError::Overflow(what.to_string()))
}

/// Rank `rank`'s share when `n` is split over `parts` (the first `n % parts` get one more).
pub(crate) fn share(n: u64, parts: u64, rank: u64) -> u64 {
    n / parts + u64::from(rank < n % parts)
}

/// Layers per pipeline stage: an even split, the remainder going to the middle stages
/// first (stage 0 carries the embedding and the last stage the LM head).
pub fn stage_layers(layers: u64, pp: u64) -> Vec<u64> {
    let mut split = vec![layers / pp; pp as usize];
    let extra = layers % pp;
    // Order: stages 1..pp-1, then 0.
    let order = (1..pp).chain(std::iter::once(0));
    for stage in order.take(extra as usize) {
        split[stage as usize] += 1;
    }
    split
}

/// TP degrees that split this model: divisors of the attention heads whose KV heads
/// either divide evenly or replicate evenly.
pub fn valid_tp_degrees(shape: &ModelShape) -> Vec<u64> {
    (1..=shape.num_attention_heads)
        .filter(|tp| tp_problem(shape, *tp).is_none())
        .collect()
}

fn tp_problem(shape: &ModelShape, tp: u64) -> Option<String> {
    let (heads, kv) = (shape.num_attention_heads, shape.num_key_value_heads);
    if tp == 0 || heads % tp != 0 {
        return Some(format!("{heads} attention heads are not divisible by {tp}"));
    }
    if tp <= kv && kv % tp != 0 {
        return Some(format!("{kv} KV heads are not divisible by {tp}"));
    }
    if tp > kv && tp % kv != 0 {
        return Some(format!(
            "{tp} ranks cannot replicate {kv} KV heads evenly ({tp} is not a multiple of {kv})"
        ));
    }
    None
}

/// Check a deployment against a model and a workload; every message names the value.
pub fn validate(shape: &ModelShape, w: &Workload, d: &Deployment) -> Result<(), PlanError> {
    shape.validate()?;
    let positive = [
        ("--context", w.context_tokens),
        ("--concurrency", w.concurrency),
        ("--max-batched-tokens", w.max_batched_tokens),
        ("--tp", d.tp),
        ("--pp", d.pp),
        ("replicas", d.replicas),
    ];
    for (flag, value) in positive {
        if value == 0 {
            return Err(PlanError::Invalid(format!(
                "{flag} is 0; it must be a positive integer"
            )));
        }
    }
    if let Some(problem) = tp_problem(shape, d.tp) {
        let valid: Vec<String> = valid_tp_degrees(shape).iter().map(u64::to_string).collect();
        return Err(PlanError::Invalid(format!(
            "--tp {} does not split {}: {problem}; valid TP degrees: {}",
            d.tp,
            shape.name,
            valid.join(", ")
        )));
    }
    if d.pp > shape.num_hidden_layers {
        return Err(PlanError::Invalid(format!(
            "--pp {} exceeds the {} layers of {}; at most one stage per layer",
            d.pp, shape.num_hidden_layers, shape.name
        )));
    }
    if !(0.0..=1.0).contains(&d.headroom_fraction) || d.headroom_fraction.is_nan() {
        return Err(PlanError::Invalid(format!(
            "--headroom {} must be a fraction between 0 and 1 (0.1 = 10%)",
            d.headroom_fraction
        )));
    }
    if d.gpu.memory_bytes == 0 {
        return Err(PlanError::Invalid("--gpu-memory is 0 bytes".to_string()));
    }
    // A context beyond max_position_embeddings is allowed (rope scaling may extend it);
    // the plan's assumptions say so.
    Ok(())
}

/// Weight bytes of one decoder layer on one TP rank, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBytes {
    /// q, k, v, o and their biases.
    pub attention: u64,
    /// gate, up, down and their biases.
    pub mlp: u64,
    /// input_layernorm and post_attention_layernorm.
    pub norms: u64,
}

impl LayerBytes {
    pub fn total(&self) -> u64 {
        self.attention + self.mlp + self.norms
    }
}

/// One layer's weight bytes on TP rank `rank` of `tp`: q/k/v and gate/up split by output
/// rows, o/down by input columns, norms (and the o/down biases) replicated.
pub fn layer_bytes(
    shape: &ModelShape,
    p: Precision,
    tp: u64,
    rank: u64,
) -> Result<LayerBytes, PlanError> {
    let h = shape.hidden_size;
    let q_r = shape.num_attention_heads / tp * shape.head_dim;
    let kv_r = kv_heads_per_rank(shape, tp) * shape.head_dim;
    let inter_r = share(shape.intermediate_size, tp, rank);
    let mut attention = vec![
        matrix_bytes(p, q_r, h)?,  // q_proj
        matrix_bytes(p, kv_r, h)?, // k_proj
        matrix_bytes(p, kv_r, h)?, // v_proj
        matrix_bytes(p, h, q_r)?,  // o_proj
    ];
    if shape.qkv_bias {
        attention.push(vector_bytes(p, q_r + 2 * kv_r)?);
    }
    if shape.o_bias {
        attention.push(vector_bytes(p, h)?);
    }
    let mut mlp = vec![
        matrix_bytes(p, inter_r, h)?, // gate_proj
        matrix_bytes(p, inter_r, h)?, // up_proj
        matrix_bytes(p, h, inter_r)?, // down_proj
    ];
    if shape.mlp_bias {
        mlp.push(vector_bytes(p, 2 * inter_r)?);
        mlp.push(vector_bytes(p, h)?);
    }
    Ok(LayerBytes {
        attention: sum(&attention, "attention bytes of a layer")?,
        mlp: sum(&mlp, "MLP bytes of a layer")?,
        norms: 2 * vector_bytes(p, h)?,
    })
}

/// Weight bytes of one TP rank of the stage holding layers `first_layer..first_layer +
/// layers`.
fn rank_weights(
    shape: &ModelShape,
    d: &Deployment,
    (first_layer, layers): (u64, u64),
    holds_embedding: bool,
    holds_lm_head: bool,
    rank: u64,
) -> Result<u64, PlanError> {
    if let Some(table) = &d.stored_tensors {
        let part = crate::RankPart {
            tp: d.tp,
            rank,
            first_layer,
            layers,
            holds_embedding,
            holds_lm_head,
            vocab_parallel: d.vocab_parallel,
        };
        return crate::gguf_rank_weights(shape, table, &part);
    }
    if let Some(bytes) = d.stored_weights_bytes {
        if d.tp == 1 && holds_embedding && holds_lm_head && layers == shape.num_hidden_layers {
            return Ok(bytes);
        }
    }
    let p = d.precision;
    let tp = d.tp;
    let h = shape.hidden_size;
    let per_layer = layer_bytes(shape, p, tp, rank)?.total();
    let mut parts = vec![ck(per_layer.checked_mul(layers), "bytes of the layers")?];

    let ep = d.embedding_precision();
    let vocab_rows = if d.vocab_parallel {
        share(shape.vocab_size, tp, rank)
    } else {
        shape.vocab_size
    };
    let embedding = matrix_bytes(ep, vocab_rows, h)?;
    if holds_embedding {
        parts.push(embedding);
    }
    if holds_lm_head {
        parts.push(vector_bytes(p, h)?); // model.norm
                                         // A tied head reuses the embedding when the same GPU holds both.
        if !shape.tie_word_embeddings || !holds_embedding {
            parts.push(embedding);
        }
    }
    sum(&parts, "weight bytes of a rank")
}

/// Weight bytes of the whole model on one device (no TP, no PP) at `precision`, the
/// embedding and LM head at fp16 when `keep_embeddings` and the precision is quantized.
/// The engine's measured bytes for the same load options must equal this exactly.
pub fn model_weights_bytes(
    shape: &ModelShape,
    precision: Precision,
    keep_embeddings: bool,
) -> Result<u64, PlanError> {
    let d = Deployment {
        keep_embeddings,
        ..Deployment::new(precision, crate::gpu::custom_gpu(0))
    };
    rank_weights(shape, &d, (0, shape.num_hidden_layers), true, true, 0)
}

/// KV heads one TP rank holds (one when TP exceeds the KV heads: replicated).
pub fn kv_heads_per_rank(shape: &ModelShape, tp: u64) -> u64 {
    (shape.num_key_value_heads / tp).max(1)
}

/// One rank's forward pass, as the activation formula sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPass {
    /// Tokens in the pass.
    pub tokens: u64,
    /// Rows of logits computed (one per sequence sampled).
    pub logit_rows: u64,
    /// Bytes per activation value (the compute dtype).
    pub value_bytes: u64,
    pub tp: u64,
    pub tp_rank: u64,
    /// The rank runs decoder layers (a pipeline stage may hold none).
    pub holds_layers: bool,
    /// The rank computes logits (the last pipeline stage).
    pub holds_lm_head: bool,
    /// The LM head is split by vocabulary rows across the TP ranks.
    pub vocab_parallel: bool,
    /// The weights are in a block format, whose kernels take the activations quantized
    /// to bytes.
    pub block_quantized: bool,
    /// Unfused attention: the f32 scores and probabilities of each local head over this
    /// many keys (the longest context in the pass). `None`: a fused kernel keeps no score
    /// matrix.
    pub unfused_keys: Option<u64>,
    /// Rows of a 16-bit dense product that llmem's CPU engine stages through f32 at a
    /// time (its input and output rows, widened and then rounded, a chunk of rows at a
    /// time), counted in the attention and MLP phases; 0 where products read and write
    /// 16 bits directly (a GPU's), or for f32 and block formats.
    pub staged_rows: u64,
}

/// The peak of one phase of a pass and the tensors behind it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassPhases {
    /// The residual stream and its normed copy, alive through every phase.
    pub resident: u64,
    /// Each phase's own tensors on top of `resident`.
    pub attention: u64,
    pub mlp: u64,
    pub logits: u64,
}

impl PassPhases {
    /// The peak phase's total (resident included) and its name.
    pub fn peak(&self) -> (u64, &'static str) {
        let (own, name) = [
            (self.attention, "attention"),
            (self.mlp, "mlp"),
            (self.logits, "logits"),
        ]
        .into_iter()
        .fold((0, "none"), |best, x| if x.0 > best.0 { x } else { best });
        (self.resident.saturating_add(own), name)
    }
}

/// The activation formula: what one rank's forward pass holds at once, phase by phase.
/// The planner sizes activations with it and the engine reserves (and reports) them with
/// it: there is no second formula. The terms follow the engine's tensors, checked against
/// the heap it measures (`engine/tests/heap_accounting.rs`, docs/results.md section 14):
///
/// - resident: the residual stream and its normed copy (`2 t h` values), the rope
///   tables gathered for the pass's positions (cos and sin, `t head_dim` values) and the
///   positions (`4 t` bytes);
/// - attention: q, k, v and their rotated copies (`2 t (q + 2 kv)` values), the f32 copies
///   handed to the paged kernel (`4 t (q + 2 kv)` bytes), its f32 output (`4 t q` bytes)
///   and the output cast back (`t q` values). Unfused attention (score matrices, as the
///   contiguous cache's prefill and eager implementations compute it) has no copies for a
///   kernel; it holds instead the f32 scores of each local head over the longest
///   context and their softmax, alive together, and the causal mask (`(2 x 4 heads + 4)
///   t keys` bytes), and with 16-bit values f32 copies of q and of the context's keys and
///   values (`4 t q + 8 keys kv` bytes);
/// - MLP: gate, up, silu(gate) x up (one fused step: `3 t i` values) and the down output
///   (`t h`); block formats add the down projection's input quantized to bytes with an
///   f32 scale per 32 (`t (i + i/8)` bytes);
/// - logits (the last stage): the selected rows' hidden states and this rank's logits in
///   the compute dtype, plus the f32 logits over the whole vocabulary for sampling
///   (gathered when the vocabulary is split; the same tensor when it is not and the
///   compute dtype is f32);
/// - the end of the attention and MLP phases: the row-parallel projection's output
///   (`t h` values) and, under TP, its all-reduce over the ranks (`t h` values per
///   addition, at most two alive at once: one at TP 2); the phase's other tensors are
///   dead by then, so each phase holds the larger of its two moments.
///
/// `q`, `kv` and `i` are this rank's widths (its heads, KV heads and intermediate
/// share). Rope tables and masks are small and left out.
pub fn pass_phases(shape: &ModelShape, p: &RankPass) -> Result<PassPhases, PlanError> {
    let e = p.value_bytes;
    let t = p.tokens;
    let h = shape.hidden_size;
    let tp = p.tp.max(1);
    let heads = shape.num_attention_heads / tp;
    let q = heads * shape.head_dim;
    let kv = kv_heads_per_rank(shape, tp) * shape.head_dim;
    let i = share(shape.intermediate_size, tp, p.tp_rank);
    // t x (values x e + bytes), checked
    let rows = |values: u64, bytes: u64, what: &str| {
        ck(
            values
                .checked_mul(e)
                .and_then(|v| v.checked_add(bytes))
                .and_then(|w| w.checked_mul(t)),
            what,
        )
    };
    let resident = rows(2 * h + shape.head_dim, 4, "resident activations")?;
    // f32 rows a 16-bit product stages on the CPU, for `count` rows of `width` values.
    let staging = |count: u64, width: u64| count.min(p.staged_rows).saturating_mul(width * 4);
    let projected = rows(h * (1 + (tp - 1).min(2)), 0, "all-reduce activations")?;
    let (attention, mlp) = if p.holds_layers {
        let attention = match p.unfused_keys {
            None => rows(
                2 * (q + 2 * kv) + q,
                4 * (q + 2 * kv) + 4 * q,
                "attention activations",
            )?,
            Some(keys) => {
                // Scores and probabilities of each local head, and the causal mask.
                let per_key = heads.checked_mul(2 * 4).and_then(|x| x.checked_add(4));
                let scores = per_key
                    .and_then(|x| x.checked_mul(t))
                    .and_then(|x| x.checked_mul(keys));
                // 16-bit values are multiplied in f32: a copy of q and of the context's
                // keys and values.
                let copies = if e == 4 {
                    Some(0)
                } else {
                    keys.checked_mul(8 * kv)
                        .and_then(|x| x.checked_add(4 * q * t))
                };
                let own = rows(2 * (q + 2 * kv) + q, 4 * q, "attention activations")?;
                ck(
                    scores
                        .zip(copies)
                        .and_then(|(s, c)| s.checked_add(c))
                        .and_then(|x| x.checked_add(own)),
                    "attention scores",
                )?
            }
        };
        let quantized_input = if p.block_quantized { i + i / 8 } else { 0 };
        let mlp = rows(3 * i + h, quantized_input, "MLP activations")?;
        // A product's staging: its widest input and output rows, as f32 (q, k, v and o
        // in attention; gate, up and down in the MLP).
        let attention = ck(
            attention.checked_add(staging(t, h + q)),
            "attention staging",
        )?;
        let mlp = ck(mlp.checked_add(staging(t, h + i)), "MLP staging")?;
        (attention.max(projected), mlp.max(projected))
    } else {
        (0, 0)
    };
    let logits = if p.holds_lm_head {
        let local = if p.vocab_parallel {
            share(shape.vocab_size, tp, p.tp_rank)
        } else {
            shape.vocab_size
        };
        let full = if local == shape.vocab_size && e == 4 {
            0
        } else {
            shape.vocab_size * 4
        };
        ck(
            h.checked_add(local)
                .and_then(|x| x.checked_mul(e))
                .and_then(|x| x.checked_add(full))
                .and_then(|x| x.checked_mul(p.logit_rows)),
            "logits activations",
        )?
    } else {
        0
    };
    Ok(PassPhases {
        resident,
        attention,
        mlp,
        logits,
    })
}

/// Activation phases of one stage's most loaded rank (rank 0: it holds the larger share
/// of an uneven split).
fn activations(
    shape: &ModelShape,
    w: &Workload,
    d: &Deployment,
    layers: u64,
    holds_lm_head: bool,
    concurrency: u64,
) -> Result<Activations, PlanError> {
    let all_tokens = ck(
        concurrency.checked_mul(w.context_tokens),
        "concurrency x context",
    )?;
    let t = w.max_batched_tokens.min(all_tokens);
    let logit_rows = concurrency.min(t);
    let phases = pass_phases(
        shape,
        &RankPass {
            tokens: t,
            logit_rows,
            value_bytes: d.activation_value_bytes(),
            tp: d.tp,
            tp_rank: 0,
            holds_layers: layers > 0,
            holds_lm_head,
            vocab_parallel: d.vocab_parallel,
            block_quantized: matches!(
                d.precision.storage(),
                crate::precision::Storage::Block { .. }
            ),
            unfused_keys: (w.attention == AttentionImpl::Unfused)
                .then(|| w.context_tokens.min(all_tokens)),
            staged_rows: 0,
        },
    )?;
    let (peak_bytes, peak_phase) = phases.peak();
    let with_resident = |own: u64| {
        if own == 0 {
            0
        } else {
            phases.resident.saturating_add(own)
        }
    };
    let simple = ck(
        concurrency
            .checked_mul(w.context_tokens)
            .and_then(|x| x.checked_mul(shape.hidden_size))
            .and_then(|x| x.checked_mul(2)),
        "the simple activation form",
    )?;
    Ok(Activations {
        tokens: t,
        logit_rows,
        attention_phase_bytes: with_resident(phases.attention),
        mlp_phase_bytes: with_resident(phases.mlp),
        logits_phase_bytes: with_resident(phases.logits),
        peak_bytes,
        peak_phase: peak_phase.to_string(),
        simple_form_bytes: simple,
    })
}

fn headroom(subtotal: u64, fraction: f64) -> Result<u64, PlanError> {
    let ppm = (fraction * 1e6).round() as u128;
    let value = (subtotal as u128 * ppm).div_ceil(1_000_000);
    u64::try_from(value).map_err(|_| PlanError::Overflow("headroom".to_string()))
}

fn finish_terms(mut t: Terms, fraction: f64) -> Result<Terms, PlanError> {
    let subtotal = sum(
        &[
            t.weights_bytes,
            t.kv_cache_bytes,
            t.activation_bytes,
            t.runtime_overhead_bytes,
        ],
        "per-GPU subtotal",
    )?;
    t.headroom_bytes = headroom(subtotal, fraction)?;
    t.total_bytes = ck(subtotal.checked_add(t.headroom_bytes), "per-GPU total")?;
    Ok(t)
}

/// Weight tensors of the whole model (TP 1) grouped by the precision they are stored in.
fn tensor_groups(shape: &ModelShape, d: &Deployment) -> Result<Vec<TensorGroup>, PlanError> {
    let p = d.precision;
    let (h, q, kv, i) = (
        shape.hidden_size,
        shape.q_dim(),
        shape.kv_dim(),
        shape.intermediate_size,
    );
    let l = shape.num_hidden_layers;
    let mut mats: Vec<(u64, u64, u64)> = vec![
        (q, h, l),
        (kv, h, 2 * l),
        (h, q, l),
        (i, h, 2 * l),
        (h, i, l),
    ];
    let mut groups: Vec<TensorGroup> = Vec::new();
    let mut add = |precision: Precision, kind: &str, tensors: u64, params: u64, bytes: u64| {
        if let Some(g) = groups
            .iter_mut()
            .find(|g| g.precision == precision && g.kind == kind)
        {
            g.tensors += tensors;
            g.params += params;
            g.bytes += bytes;
        } else {
            groups.push(TensorGroup {
                precision,
                kind: kind.to_string(),
                tensors,
                params,
                bytes,
            });
        }
    };
    for (rows, cols, count) in mats.drain(..) {
        let stored = p.for_row_len(cols);
        let bytes = ck(
            matrix_bytes(p, rows, cols)?.checked_mul(count),
            "tensor group bytes",
        )?;
        add(stored, "layer matrices", count, rows * cols * count, bytes);
    }
    let ep = d.embedding_precision();
    let emb_count = if shape.tie_word_embeddings { 1 } else { 2 };
    let emb = matrix_bytes(ep, shape.vocab_size, h)?;
    add(
        ep.for_row_len(h),
        if shape.tie_word_embeddings {
            "embedding (tied LM head)"
        } else {
            "embedding + LM head"
        },
        emb_count,
        shape.vocab_size * h * emb_count,
        emb * emb_count,
    );
    let norms = 2 * l + 1;
    add(
        p.unquantized(),
        "norm weights",
        norms,
        norms * h,
        norms * vector_bytes(p, h)?,
    );
    let bias_params = shape.params().total
        - shape.vocab_size * h * emb_count
        - (q * h + 2 * kv * h + h * q + 3 * i * h) * l
        - norms * h;
    if bias_params > 0 {
        let per_layer =
            u64::from(shape.qkv_bias) * 3 + u64::from(shape.o_bias) + u64::from(shape.mlp_bias) * 3;
        add(
            p.unquantized(),
            "biases",
            per_layer * l,
            bias_params,
            vector_bytes(p, bias_params)?,
        );
    }
    Ok(groups)
}

/// Plan one deployment. Pure: the same inputs always give the same plan.
pub fn plan(shape: &ModelShape, w: &Workload, d: &Deployment) -> Result<Plan, PlanError> {
    validate(shape, w, d)?;
    let params = shape.params();
    let kv_bytes_per_token = shape.kv_bytes_per_token_in(d.kv_dtype);
    let concurrency = w.concurrency.div_ceil(d.replicas);
    let overhead = d
        .runtime_overhead_bytes
        .unwrap_or(d.gpu.runtime_overhead_bytes);
    let a = d.activation_value_bytes();

    let split = stage_layers(shape.num_hidden_layers, d.pp);
    let mut stages = Vec::with_capacity(split.len());
    let mut first_layer = 0;
    let mut peak_act: Option<Activations> = None;
    let mut all_gpus_bytes: u64 = 0;
    for (stage, &layers) in split.iter().enumerate() {
        let stage = stage as u64;
        let holds_embedding = stage == 0;
        let holds_lm_head = stage == d.pp - 1;
        let kv_tok =
            2 * layers * kv_heads_per_rank(shape, d.tp) * d.kv_dtype.row_bytes(shape.head_dim);
        let kv_cache = ck(
            kv_tok
                .checked_mul(concurrency)
                .and_then(|x| x.checked_mul(w.context_tokens)),
            "KV cache bytes",
        )?;
        let act = activations(shape, w, d, layers, holds_lm_head, concurrency)?;
        let mut rank_weights_bytes = Vec::with_capacity(d.tp as usize);
        let mut worst = Terms::default();
        for rank in 0..d.tp {
            let weights = rank_weights(
                shape,
                d,
                (first_layer, layers),
                holds_embedding,
                holds_lm_head,
                rank,
            )?;
            rank_weights_bytes.push(weights);
            let terms = finish_terms(
                Terms {
                    weights_bytes: weights,
                    kv_cache_bytes: kv_cache,
                    activation_bytes: act.peak_bytes,
                    runtime_overhead_bytes: overhead,
                    ..Terms::default()
                },
                d.headroom_fraction,
            )?;
            all_gpus_bytes = ck(all_gpus_bytes.checked_add(terms.total_bytes), "total bytes")?;
            if terms.total_bytes > worst.total_bytes {
                worst = terms;
            }
        }
        if peak_act
            .as_ref()
            .is_none_or(|p| act.peak_bytes > p.peak_bytes)
        {
            peak_act = Some(act);
        }
        stages.push(StagePlan {
            stage,
            first_layer,
            num_layers: layers,
            holds_embedding,
            holds_lm_head,
            kv_bytes_per_token: kv_tok,
            per_gpu: worst,
            rank_weights_bytes,
        });
        first_layer += layers;
    }
    let total_bytes = ck(all_gpus_bytes.checked_mul(d.replicas), "total bytes")?;
    let per_gpu = stages
        .iter()
        .map(|s| s.per_gpu)
        .max_by_key(|t| t.total_bytes)
        .unwrap_or_default();
    let activations = peak_act.ok_or_else(|| PlanError::Invalid("no stages".to_string()))?;
    let memory = d.gpu.memory_bytes;
    let margin_bytes = memory as i128 - per_gpu.total_bytes as i128;
    let margin_bytes = margin_bytes.clamp(i64::MIN as i128, i64::MAX as i128) as i64;

    let whole = Deployment {
        tp: 1,
        pp: 1,
        vocab_parallel: false,
        ..d.clone()
    };
    let weights_bytes_model =
        rank_weights(shape, &whole, (0, shape.num_hidden_layers), true, true, 0)?;
    let kv_cache_bytes_model = ck(
        kv_bytes_per_token
            .checked_mul(w.concurrency)
            .and_then(|x| x.checked_mul(w.context_tokens)),
        "KV cache bytes of the model",
    )?;

    let speed = speed_bounds(shape, w, d, &stages, concurrency, a);
    let tensor_precisions = tensor_groups(shape, d)?;
    let assumptions = assumptions(shape, w, d, overhead, &tensor_precisions, &split);
    Ok(Plan {
        model: ModelSummary {
            name: shape.name.clone(),
            architecture: shape.architecture.hf_name().to_string(),
            params_total: params.total,
            params,
            layers: shape.num_hidden_layers,
            hidden_size: shape.hidden_size,
            attention_heads: shape.num_attention_heads,
            kv_heads: shape.num_key_value_heads,
            head_dim: shape.head_dim,
            vocab_size: shape.vocab_size,
            tie_word_embeddings: shape.tie_word_embeddings,
        },
        workload: w.clone(),
        deployment: d.clone(),
        kv_bytes_per_token,
        weights_bytes_model,
        kv_cache_bytes_model,
        per_gpu,
        stages,
        activations,
        speed,
        gpus: d.gpus(),
        gpu_memory_bytes: memory,
        fits: per_gpu.total_bytes <= memory,
        margin_bytes,
        total_bytes,
        tensor_precisions,
        assumptions,
    })
}

fn speed_bounds(
    shape: &ModelShape,
    w: &Workload,
    d: &Deployment,
    stages: &[StagePlan],
    concurrency: u64,
    a: u64,
) -> SpeedBounds {
    let bw = d.gpu.bandwidth_bytes_per_s as f64;
    let step_time = |batch: u64| -> Option<f64> {
        if bw <= 0.0 {
            return None;
        }
        // Stages run one after another for one token (no micro-batching).
        Some(
            stages
                .iter()
                .map(|s| {
                    let kv = s.kv_bytes_per_token as f64 * w.context_tokens as f64 * batch as f64;
                    (s.per_gpu.weights_bytes as f64 + kv) / bw
                })
                .sum(),
        )
    };
    let batch1 = step_time(1).map(|t| 1.0 / t);
    let full = step_time(concurrency).map(|t| concurrency as f64 * d.replicas as f64 / t);
    // Two all-reduces per layer (after o_proj and down_proj) of hidden x act bytes; a ring
    // all-reduce sends 2 (tp - 1) / tp of the buffer from each GPU.
    let tp = d.tp;
    let per_layer = 2 * shape.hidden_size * a;
    let max_layers = stages.iter().map(|s| s.num_layers).max().unwrap_or(0);
    let bytes = if tp > 1 {
        max_layers * per_layer * 2 * (tp - 1) / tp
    } else {
        0
    };
    let link = d.gpu.interconnect_bytes_per_s as f64;
    SpeedBounds {
        decode_tokens_per_s_batch1: batch1,
        decode_tokens_per_s_full_batch: full,
        allreduce_bytes_per_token_per_gpu: bytes,
        allreduce_ms_per_token: (link > 0.0 && tp > 1)
            .then(|| bytes as f64 * d.pp as f64 / link * 1e3),
    }
}

fn assumptions(
    shape: &ModelShape,
    w: &Workload,
    d: &Deployment,
    overhead: u64,
    groups: &[TensorGroup],
    split: &[u64],
) -> Vec<String> {
    use crate::gpu::human_bytes;
    let mut out = Vec::new();
    let p = d.precision;
    out.push(format!(
        "weights at {p} ({} bits per weight{}); norm weights and biases stay at {}",
        p.bits_per_weight(),
        if matches!(p.storage(), crate::precision::Storage::Block { .. }) {
            ", block scales included"
        } else {
            ""
        },
        p.unquantized()
    ));
    if p.is_quantized() {
        out.push(format!(
            "embedding and LM head stored at {} ({})",
            d.embedding_precision().for_row_len(shape.hidden_size),
            if d.keep_embeddings {
                "--keep-embeddings"
            } else {
                "quantized like the other matrices; --keep-embeddings keeps them at fp16"
            }
        ));
    }
    if matches!(p, Precision::Int8 | Precision::Int4 | Precision::Fp8) {
        out.push(format!(
            "{p} counts {} bits per weight and no scales; use q8_0/q4_0/q4_k for formats whose scales are counted",
            p.bits_per_weight()
        ));
    }
    for g in groups {
        if g.kind == "layer matrices" && g.precision != p {
            out.push(format!(
                "{} layer matrices fall back from {p} to {} because their rows are not a multiple of the {p} block",
                g.tensors, g.precision
            ));
        }
    }
    out.push(format!(
        "KV cache at {} ({} per element), sized for {} sequences x {} tokens",
        d.kv_dtype,
        d.kv_dtype.describe_bytes(),
        w.concurrency,
        w.context_tokens
    ));
    if w.context_tokens > shape.max_position_embeddings {
        out.push(format!(
            "context {} exceeds the model's max_position_embeddings {}",
            w.context_tokens, shape.max_position_embeddings
        ));
    }
    out.push(format!(
        "activations: peak of one forward pass over {} tokens (--max-batched-tokens), {} attention, {}-byte activations, logits only at sampled positions",
        w.max_batched_tokens.min(w.concurrency.saturating_mul(w.context_tokens)),
        match w.attention {
            AttentionImpl::Fused => "fused (no score matrix)",
            AttentionImpl::Unfused => "unfused (fp32 scores)",
        },
        d.activation_value_bytes()
    ));
    out.push(format!(
        "runtime overhead {} per GPU ({})",
        human_bytes(overhead),
        if d.runtime_overhead_bytes.is_some() {
            "--runtime-overhead".to_string()
        } else {
            format!(
                "default for {}: CUDA context and library workspaces",
                d.gpu.name
            )
        }
    ));
    out.push(format!(
        "headroom {:.0}% of the other four terms, for fragmentation and surprises",
        d.headroom_fraction * 100.0
    ));
    if d.tp > 1 {
        let kv_r = kv_heads_per_rank(shape, d.tp);
        out.push(format!(
            "TP {}: q/k/v and gate/up split by output rows, o/down by input columns, norms replicated; {} KV head(s) per GPU{}",
            d.tp,
            kv_r,
            if d.tp > shape.num_key_value_heads {
                " (replicated: TP exceeds the KV heads)"
            } else {
                ""
            }
        ));
        out.push(format!(
            "embedding and LM head {}",
            if d.vocab_parallel {
                "split by vocabulary rows across TP ranks (--vocab-parallel)"
            } else {
                "replicated on every TP rank (--vocab-parallel splits them)"
            }
        ));
        if shape.intermediate_size % d.tp != 0 {
            out.push(format!(
                "intermediate size {} does not divide by TP {}: ranks hold uneven MLP shards; the most loaded is billed",
                shape.intermediate_size, d.tp
            ));
        }
    }
    if d.pp > 1 {
        out.push(format!(
            "PP {}: layers per stage {:?}; stage 0 holds the embedding, the last stage the LM head{}",
            d.pp,
            split,
            if shape.tie_word_embeddings {
                " (a copy of the tied embedding)"
            } else {
                ""
            }
        ));
    }
    if d.replicas > 1 {
        out.push(format!(
            "{} data-parallel replicas share the {} sequences ({} each)",
            d.replicas,
            w.concurrency,
            w.concurrency.div_ceil(d.replicas)
        ));
    }
    out.push("speed figures are upper bounds from memory bandwidth, not predictions".to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu;
    use crate::presets::preset;

    fn h100() -> Gpu {
        gpu("h100-80gb").unwrap()
    }

    /// The activation formula's terms by hand on a small shape: h 64, 4 heads of 16 (q
    /// 64), 2 KV heads (kv 32), intermediate 128, vocabulary 100; 10 tokens, 2 logit rows,
    /// 2-byte values.
    #[test]
    fn pass_phases_by_hand() {
        let mut shape = preset("smollm2-135m").unwrap();
        shape.hidden_size = 64;
        shape.num_attention_heads = 4;
        shape.num_key_value_heads = 2;
        shape.head_dim = 16;
        shape.intermediate_size = 128;
        shape.vocab_size = 100;
        let pass = RankPass {
            tokens: 10,
            logit_rows: 2,
            value_bytes: 2,
            tp: 1,
            tp_rank: 0,
            holds_layers: true,
            holds_lm_head: true,
            vocab_parallel: false,
            block_quantized: false,
            unfused_keys: None,
            staged_rows: 0,
        };
        let p = pass_phases(&shape, &pass).unwrap();
        // 10 x ((2 x 64 + 16) x 2 + 4): residual, normed copy, rope rows, positions
        assert_eq!(p.resident, 2920);
        // 10 x ((2 x 128 + 64) x 2 + 4 x 128 + 4 x 64)
        assert_eq!(p.attention, 14080);
        // 10 x (3 x 128 + 64) x 2
        assert_eq!(p.mlp, 8960);
        // 2 x ((64 + 100) x 2 + 100 x 4)
        assert_eq!(p.logits, 1456);
        assert_eq!(p.peak(), (2920 + 14080, "attention"));
        // The CPU's 16-bit products staged 4 rows at a time: f32 input and output rows of
        // the widest product per phase, min(10, 4) x (64 + 64) x 4 in attention, 4 x (64 +
        // 128) x 4 in the MLP. The LM head's staging is not added: its f32 rows are gone
        // before the f32 copy of the logits the phase counts is made.
        let staged = pass_phases(
            &shape,
            &RankPass {
                staged_rows: 4,
                ..pass
            },
        )
        .unwrap();
        assert_eq!(staged.attention, 14080 + 2048);
        assert_eq!(staged.mlp, 8960 + 3072);
        assert_eq!(staged.logits, 1456);
        // Block weights add 10 x (128 + 16) bytes to the MLP. Unfused attention drops the
        // kernel's f32 copies of q, k and v (10 x 4 x 128 bytes) and adds the scores,
        // probabilities and mask ((2 x 4 heads x 4 + 4) x 10 tokens x 7 keys) and, with
        // 16-bit values, f32 copies of q (4 x 10 x 64) and of 7 keys' and values' 32
        // values each (8 x 7 x 32).
        let q = pass_phases(
            &shape,
            &RankPass {
                block_quantized: true,
                unfused_keys: Some(7),
                ..pass
            },
        )
        .unwrap();
        assert_eq!(q.mlp, 8960 + 1440);
        assert_eq!(q.attention, 14080 - 5120 + 36 * 70 + 2560 + 1792);
        // TP 2, rank 1, vocabulary split: q 32, kv 16 (one KV head), intermediate 64,
        // 50 vocabulary rows; the f32 logits stay whole.
        let r = pass_phases(
            &shape,
            &RankPass {
                tp: 2,
                tp_rank: 1,
                vocab_parallel: true,
                ..pass
            },
        )
        .unwrap();
        assert_eq!(r.attention, 10 * ((2 * 64 + 32) * 2 + 4 * 64 + 4 * 32));
        assert_eq!(r.mlp, 10 * (3 * 64 + 64) * 2);
        assert_eq!(r.logits, 2 * ((64 + 50) * 2 + 400));
        // TP 4: q 16, kv 16 (KV heads replicated), intermediate 32. The MLP's own tensors
        // (10 x 160 x 2) are fewer than the down output and two all-reduce sums at its end
        // (10 x 64 x 3 x 2): that moment is the phase's peak.
        let t4 = pass_phases(&shape, &RankPass { tp: 4, ..pass }).unwrap();
        assert_eq!(t4.mlp, 10 * 64 * 3 * 2);
        assert_eq!(t4.attention, 10 * ((2 * 48 + 16) * 2 + 4 * 48 + 4 * 16));
        // f32 values without a split: the f32 logits are the logits themselves.
        let f = pass_phases(
            &shape,
            &RankPass {
                value_bytes: 4,
                ..pass
            },
        )
        .unwrap();
        assert_eq!(f.logits, 2 * (64 + 100) * 4);
        // A middle pipeline stage has no logits.
        let mid = RankPass {
            holds_lm_head: false,
            ..pass
        };
        assert_eq!(pass_phases(&shape, &mid).unwrap().logits, 0);
        let huge = RankPass {
            tokens: u64::MAX / 3,
            ..pass
        };
        assert!(matches!(
            pass_phases(&shape, &huge),
            Err(PlanError::Overflow(_))
        ));
    }

    #[test]
    fn lesson_worked_example_to_the_byte() {
        let shape = preset("llama-3-70b").unwrap();
        let w = Workload::new(4096, 32);
        let d = Deployment::new(Precision::Fp16, h100());
        let plan = plan(&shape, &w, &d).unwrap();
        assert_eq!(plan.kv_bytes_per_token, 327_680);
        assert_eq!(plan.kv_cache_bytes_model, 42_949_672_960);
        assert_eq!(plan.weights_bytes_model, 141_107_412_992);
        assert!(!plan.fits);
    }

    #[test]
    fn stage_layer_splits() {
        assert_eq!(stage_layers(30, 2), vec![15, 15]);
        assert_eq!(stage_layers(31, 2), vec![15, 16]);
        assert_eq!(stage_layers(30, 4), vec![7, 8, 8, 7]);
        assert_eq!(stage_layers(126, 4), vec![31, 32, 32, 31]);
        assert_eq!(stage_layers(5, 5), vec![1; 5]);
        assert_eq!(stage_layers(7, 3), vec![2, 3, 2]);
    }

    #[test]
    fn stored_weight_bytes_replace_the_estimate_only_for_a_whole_model() {
        let shape = preset("smollm2-135m").unwrap();
        let w = Workload::new(1024, 1);
        let base = Deployment::new(Precision::Q8_0, h100());
        let stored = Deployment {
            stored_weights_bytes: Some(123_456_789),
            ..base.clone()
        };
        let p = plan(&shape, &w, &stored).unwrap();
        assert_eq!(p.per_gpu.weights_bytes, 123_456_789);
        assert_eq!(p.weights_bytes_model, 123_456_789);
        let split = Deployment { tp: 3, ..stored };
        let base_split = Deployment { tp: 3, ..base };
        assert_eq!(
            plan(&shape, &w, &split).unwrap().per_gpu.weights_bytes,
            plan(&shape, &w, &base_split).unwrap().per_gpu.weights_bytes
        );
    }

    #[test]
    fn valid_tp_for_smollm2() {
        let shape = preset("smollm2-135m").unwrap();
        assert_eq!(valid_tp_degrees(&shape), vec![1, 3, 9]);
        let d = Deployment {
            tp: 2,
            ..Deployment::new(Precision::Fp32, h100())
        };
        let err = plan(&shape, &Workload::new(1024, 1), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tp 2") && err.contains("1, 3, 9"), "{err}");
    }

    #[test]
    fn zero_sizes_are_refused() {
        let shape = preset("llama-3-8b").unwrap();
        let d = Deployment::new(Precision::Fp16, h100());
        let err = plan(&shape, &Workload::new(0, 1), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--context"), "{err}");
        let err = plan(&shape, &Workload::new(10, 0), &d)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--concurrency"), "{err}");
    }

    #[test]
    fn huge_workloads_overflow_cleanly() {
        let shape = preset("llama-3.1-405b").unwrap();
        let d = Deployment::new(Precision::Fp16, h100());
        let err = plan(&shape, &Workload::new(u64::MAX / 2, u64::MAX / 2), &d).unwrap_err();
        assert!(matches!(err, PlanError::Overflow(_)), "{err}");
    }
}
