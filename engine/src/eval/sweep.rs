//! What each weight precision costs and buys, measured in one process: bytes (planned by
//! `llmem_planner::model_weights_bytes` and measured on the loaded model), load time,
//! perplexity, agreement of the next-token distribution with a reference level, prefill
//! and decode speed.
//!
//! Method. The text's first `tokens` ids are cut into windows of `window` tokens, each
//! scored by one forward pass from an empty cache (the method of `crate::eval::perplexity`);
//! that pass also times prefill. The reference level's log-probabilities at every scored
//! position are kept (positions x vocab f32) and every other level is compared with them
//! at the same positions: mean KL(reference || level) in nats, and the fraction of
//! positions whose argmax agrees. Decode at batch 1 is greedy generation of
//! `decode_tokens` tokens after a prompt of the text's first ids through the contiguous
//! cache; decode at batch 16 runs 16 requests through the paged [`Engine`] and counts
//! only the steps in which every sequence decodes.
//!
//! KV levels. With `kv_levels`, the reference weight level is measured again with its
//! KV cache at each level (f32 first, the reference of KL and top-1): the windows attend
//! through that cache ([`window_nll_in`]), decode at batch 1 uses a contiguous cache of
//! that level and decode at batch 16 a paged one. The bytes per token are the planner's,
//! which the caches hold.

use std::time::Instant;

use llmem_planner::{ModelShape, Precision};
use serde::Serialize;

use crate::cache::block_manager::KvLayout;
use crate::cache::contiguous::KvCache;
use crate::cache::paged::KvDtype;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::eval::perplexity::window_nll_in;
use crate::model::{AttnMetadata, Model};
use crate::request::SamplingParams;
use crate::request::StopConditions;
use crate::sample::sampler::argmax;
use crate::weights::files::WeightFiles;
use crate::weights::quant::{cli_name, fallback_notes, WeightFormat};

/// Sequences in the batched decode measurement.
pub const BATCH: usize = 16;

/// One level of a sweep: the weights stored at a precision (quantized at load), or a
/// GGUF's tensors as the file stores them (`stored`; mixed files stay mixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    At(Precision),
    Stored,
}

impl Level {
    /// The name reports and `--dtypes` use.
    pub fn name(self) -> &'static str {
        match self {
            Level::At(p) => cli_name(p),
            Level::Stored => "stored",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Levels in the order to report them.
    pub levels: Vec<Level>,
    pub keep_embeddings: bool,
    /// Tokens scored for perplexity / KL (whole windows only).
    pub tokens: usize,
    pub window: usize,
    /// Prompt tokens before the decode measurements.
    pub decode_prompt_tokens: usize,
    /// Tokens generated per sequence in the decode measurements.
    pub decode_tokens: usize,
    /// KV cache levels to measure with the reference weights (empty: none); f32 is
    /// added first when missing, as their reference.
    pub kv_levels: Vec<KvDtype>,
}

/// One KV cache level's measurements with the reference weights; the field names are
/// the JSON contract.
#[derive(Debug, Clone, Serialize)]
pub struct KvLevelReport {
    pub kv_dtype: String,
    /// The weight level these ran with (the sweep's reference).
    pub weights: String,
    /// K and V of one token over all layers, block scales included (planner = held).
    pub kv_bytes_per_token: u64,
    pub perplexity: f64,
    /// Mean KL(f32 KV || this level) in nats per position; 0 for f32.
    pub kl_divergence: f64,
    /// Fraction of positions whose argmax equals the f32 KV cache's.
    pub top1_agreement: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub decode_tokens_per_s_batch16: f64,
}

/// One level's measurements; the field names are the JSON contract.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub dtype: String,
    pub weights_bytes_planned: u64,
    pub weights_bytes_measured: u64,
    pub load_ms: f64,
    pub perplexity: f64,
    /// Mean KL(reference || this level) in nats per position; 0 for the reference.
    pub kl_divergence: f64,
    /// Fraction of positions whose argmax equals the reference's.
    pub top1_agreement: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub decode_tokens_per_s_batch16: f64,
    /// Matrices stored in another format because their rows do not fit the block.
    pub fallbacks: Vec<String>,
}

/// The whole sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// The level the others are compared with (the most bits per weight).
    pub reference: String,
    pub tokens: usize,
    pub window: usize,
    pub positions: usize,
    pub keep_embeddings: bool,
    pub levels: Vec<LevelReport>,
    /// The KV cache levels, f32 first; empty when none were asked for.
    pub kv_levels: Vec<KvLevelReport>,
}

/// Progress of one level: a stage name, and steps done out of a total.
pub trait Progress {
    fn level_start(&mut self, dtype: &str, steps: u64);
    fn step(&mut self, message: &str);
    fn level_done(&mut self);
}

/// No progress output (tests, JSON to a pipe).
pub struct Quiet;

impl Progress for Quiet {
    fn level_start(&mut self, _: &str, _: u64) {}
    fn step(&mut self, _: &str) {}
    fn level_done(&mut self) {}
}

/// The reference level: the one with the most bits per weight (ties: the first given).
pub fn reference_level(precisions: &[Precision]) -> Option<Precision> {
    let mut best: Option<Precision> = None;
    for &p in precisions {
        if best.is_none_or(|b| p.bits_per_weight() > b.bits_per_weight()) {
            best = Some(p);
        }
    }
    best
}

/// Per-position log-probabilities of a window's predictions: (window - 1) x vocab.
struct WindowScores {
    log_probs: Vec<Vec<f32>>,
    nll: f64,
}

fn score_window(model: &Model, chunk: &[u32], kv: Option<KvDtype>) -> Result<(WindowScores, f64)> {
    let mut log_probs = Vec::with_capacity(chunk.len().saturating_sub(1));
    let start = Instant::now();
    let nll = window_nll_in(model, chunk, kv, |lp| {
        log_probs.push(lp.iter().map(|&x| x as f32).collect())
    })?;
    Ok((
        WindowScores { log_probs, nll },
        start.elapsed().as_secs_f64(),
    ))
}

/// A level's quality and prefill speed over the scored windows.
struct Quality {
    perplexity: f64,
    /// Mean KL(reference || level) per position; 0 for the reference.
    kl_divergence: f64,
    top1_agreement: f64,
    prefill_tokens_per_s: f64,
}

/// Score every whole window of `scored` with `model`, its cache at level `kv` (`None`:
/// the model's dtype). `(true, scores)`: this is the reference level, whose per-window
/// log-probabilities are pushed into `scores`; `(false, scores)`: compared with them.
fn score_level(
    model: &Model,
    scored: &[u32],
    window: usize,
    kv: Option<KvDtype>,
    (is_reference, reference): (bool, &mut Vec<Vec<Vec<f32>>>),
    progress: &mut dyn Progress,
) -> Result<Quality> {
    let (mut nll, mut prefill_s) = (0f64, 0f64);
    let (mut kl_sum, mut agree, mut positions) = (0f64, 0usize, 0usize);
    for (w, chunk) in scored.chunks_exact(window).enumerate() {
        let (scores, secs) = score_window(model, chunk, kv)?;
        nll += scores.nll;
        prefill_s += secs;
        if is_reference {
            agree += scores.log_probs.len();
            reference.push(scores.log_probs);
        } else {
            for (r, q) in reference[w].iter().zip(&scores.log_probs) {
                kl_sum += kl_divergence(r, q);
                agree += usize::from(argmax(r) == argmax(q));
            }
        }
        positions += window - 1;
        progress.step("perplexity window");
    }
    Ok(Quality {
        perplexity: (nll / positions as f64).exp(),
        kl_divergence: kl_sum / positions as f64,
        top1_agreement: agree as f64 / positions as f64,
        prefill_tokens_per_s: scored.len() as f64 / prefill_s,
    })
}

/// KL(p || q) for log-probabilities, in nats.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            if p > 0.0 {
                p * (lp as f64 - lq as f64)
            } else {
                0.0
            }
        })
        .sum()
}

/// Greedy decode of `n` tokens after `prompt` at batch 1, the cache at level `kv`
/// (`None`: the model's dtype); decode tokens per second.
fn decode_batch1(model: &Model, prompt: &[u32], n: usize, kv: Option<KvDtype>) -> Result<f64> {
    let mut cache = match kv {
        Some(kv) => KvCache::new_in(model.shape(), prompt.len() + n, kv, model.device())?,
        None => model.new_cache(prompt.len() + n)?,
    };
    let logits = model.forward(
        prompt,
        &AttnMetadata::single(0, prompt.len()),
        &mut [&mut cache],
    )?;
    let mut next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
    let start = Instant::now();
    for i in 0..n {
        let logits = model.forward(
            &[next],
            &AttnMetadata::single(prompt.len() + i, 1),
            &mut [&mut cache],
        )?;
        next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// [`BATCH`] sequences through the paged engine, its cache at level `kv`; tokens per
/// second over the steps in which all of them decode (prefill steps left out).
fn decode_batched(model: &Model, prompt: &[u32], n: usize, kv: KvDtype) -> Result<f64> {
    let block_size = 16;
    let max_model_len = prompt.len() + n;
    let config = EngineConfig {
        block_size,
        num_blocks: BATCH * max_model_len.div_ceil(block_size),
        kv_dtype: kv,
        max_num_seqs: BATCH,
        max_batched_tokens: (BATCH * prompt.len()).max(BATCH),
        max_model_len,
        kv_layout: KvLayout::Paged,
    };
    let mut engine = Engine::new(model.clone(), config)?;
    let stop = StopConditions {
        max_tokens: n,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    };
    for s in 0..BATCH {
        // Distinct prompts (rotated) so the prefix cache does not share them.
        let mut p = prompt.to_vec();
        p.rotate_left(s % prompt.len().max(1));
        engine.add_request(p, SamplingParams::default(), stop.clone())?;
    }
    let (mut tokens, mut seconds) = (0usize, 0f64);
    while engine.has_work() {
        let start = Instant::now();
        let out = engine.step()?;
        let dt = start.elapsed().as_secs_f64();
        // A step that emits one token per sequence of a full batch is a decode step
        // (the first step emits the prefill's tokens; it is left out).
        if out.len() == BATCH && engine.stats().steps > 1 {
            tokens += out.len();
            seconds += dt;
        }
    }
    Ok(if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    })
}

/// Run the sweep over `ids` (the tokenized text; at least `tokens` and the decode prompt).
pub fn sweep(
    shape: &ModelShape,
    weights: &WeightFiles,
    ids: &[u32],
    opts: &SweepOptions,
    progress: &mut dyn Progress,
) -> Result<SweepReport> {
    // A `stored` level counts its file's bits per weight (bytes over parameters).
    let stored = match (opts.levels.contains(&Level::Stored), weights.gguf()) {
        (false, _) => None,
        (true, Some(g)) => Some((g.summary()?, g.main_precision())),
        (true, None) => {
            return Err(Error::InvalidInput(
                "the `stored` level loads a GGUF's tensors as the file stores them; the \
                 model is not a .gguf file"
                    .into(),
            ))
        }
    };
    let bits = |l: Level| match (l, &stored) {
        (Level::At(p), _) => p.bits_per_weight(),
        (Level::Stored, Some((s, _))) => s.bytes as f64 * 8.0 / s.params.max(1) as f64,
        (Level::Stored, None) => 0.0,
    };
    let mut reference: Option<Level> = None;
    for &l in &opts.levels {
        if reference.is_none_or(|r| bits(l) > bits(r)) {
            reference = Some(l);
        }
    }
    let reference = reference
        .ok_or_else(|| Error::InvalidInput("the sweep needs at least one dtype".into()))?;
    if opts.window < 2 {
        return Err(Error::InvalidInput(format!(
            "window = {}: a window needs at least 2 tokens",
            opts.window
        )));
    }
    let windows = opts.tokens / opts.window;
    if windows == 0 || ids.len() < opts.tokens {
        return Err(Error::InvalidInput(format!(
            "the text has {} tokens; the sweep scores --tokens {} in windows of {} (at least \
             one whole window is needed)",
            ids.len(),
            opts.tokens,
            opts.window
        )));
    }
    if opts.decode_prompt_tokens == 0 || opts.decode_prompt_tokens > ids.len() {
        return Err(Error::InvalidInput(format!(
            "decode prompt of {} tokens: the text has {}",
            opts.decode_prompt_tokens,
            ids.len()
        )));
    }
    let scored = &ids[..windows * opts.window];
    let prompt = &ids[..opts.decode_prompt_tokens];
    // Reference first, then the others; reported in the order given.
    let mut order: Vec<usize> = (0..opts.levels.len()).collect();
    let ref_idx = opts
        .levels
        .iter()
        .position(|&l| l == reference)
        .unwrap_or(0);
    order.retain(|&i| i != ref_idx);
    order.insert(0, ref_idx);

    let mut ref_scores: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut reports: Vec<Option<LevelReport>> = vec![None; opts.levels.len()];
    let mut kv_levels = Vec::new();
    for i in order {
        let level = opts.levels[i];
        let name = level.name();
        progress.level_start(name, (windows + 3) as u64);
        let (fmt, planned, fallbacks) = match (level, &stored) {
            (Level::At(p), _) => {
                let fmt = WeightFormat {
                    precision: p,
                    keep_embeddings: opts.keep_embeddings,
                    as_stored: false,
                };
                let planned = llmem_planner::model_weights_bytes(shape, p, opts.keep_embeddings)
                    .map_err(|e| Error::InvalidInput(format!("planning {name}: {e}")))?;
                (fmt, planned, fallback_notes(shape, &fmt))
            }
            (Level::Stored, Some((summary, main))) => (
                WeightFormat::gguf_as_stored(*main),
                summary.bytes,
                Vec::new(),
            ),
            (Level::Stored, None) => {
                return Err(Error::InvalidInput("`stored` needs a .gguf model".into()))
            }
        };
        let start = Instant::now();
        let model = Model::load_with(shape, weights, &fmt, &candle_core::Device::Cpu)?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        progress.step("loaded");

        let quality = score_level(
            &model,
            scored,
            opts.window,
            None,
            (i == ref_idx, &mut ref_scores),
            progress,
        )?;
        let decode = decode_batch1(&model, prompt, opts.decode_tokens, None)?;
        progress.step("decode batch 1");
        let decode16 = decode_batched(&model, prompt, opts.decode_tokens, KvDtype::F32)?;
        progress.step("decode batch 16");
        reports[i] = Some(LevelReport {
            dtype: name.to_string(),
            weights_bytes_planned: planned,
            weights_bytes_measured: model.weights_bytes(),
            load_ms,
            perplexity: quality.perplexity,
            kl_divergence: quality.kl_divergence,
            top1_agreement: quality.top1_agreement,
            prefill_tokens_per_s: quality.prefill_tokens_per_s,
            decode_tokens_per_s: decode,
            decode_tokens_per_s_batch16: decode16,
            fallbacks,
        });
        progress.level_done();
        // The KV levels reuse the reference weights while they are loaded (measured
        // first), so no two levels' weights are ever held at once.
        if i == ref_idx && !opts.kv_levels.is_empty() {
            kv_levels = kv_sweep(&model, reference.name(), scored, prompt, opts, progress)?;
        }
    }
    Ok(SweepReport {
        reference: reference.name().to_string(),
        tokens: scored.len(),
        window: opts.window,
        positions: windows * (opts.window - 1),
        keep_embeddings: opts.keep_embeddings,
        levels: reports.into_iter().flatten().collect(),
        kv_levels,
    })
}

/// The KV levels of [`SweepOptions::kv_levels`] with `model` (the reference weights).
fn kv_sweep(
    model: &Model,
    weights: &str,
    scored: &[u32],
    prompt: &[u32],
    opts: &SweepOptions,
    progress: &mut dyn Progress,
) -> Result<Vec<KvLevelReport>> {
    let mut levels = vec![KvDtype::F32];
    for &kv in &opts.kv_levels {
        if !levels.contains(&kv) {
            levels.push(kv);
        }
    }
    let windows = scored.len() / opts.window;
    let mut ref_scores: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut out = Vec::with_capacity(levels.len());
    for kv in levels {
        progress.level_start(&format!("kv {}", kv.name()), (windows + 2) as u64);
        let quality = score_level(
            model,
            scored,
            opts.window,
            Some(kv),
            (kv == KvDtype::F32, &mut ref_scores),
            progress,
        )?;
        let decode = decode_batch1(model, prompt, opts.decode_tokens, Some(kv))?;
        progress.step("decode batch 1");
        let decode16 = decode_batched(model, prompt, opts.decode_tokens, kv)?;
        progress.step("decode batch 16");
        out.push(KvLevelReport {
            kv_dtype: kv.name().to_string(),
            weights: weights.to_string(),
            kv_bytes_per_token: model.shape().kv_bytes_per_token_in(kv.planner()),
            perplexity: quality.perplexity,
            kl_divergence: quality.kl_divergence,
            top1_agreement: quality.top1_agreement,
            prefill_tokens_per_s: quality.prefill_tokens_per_s,
            decode_tokens_per_s: decode,
            decode_tokens_per_s_batch16: decode16,
        });
        progress.level_done();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::sampler::log_softmax;

    #[test]
    fn reference_is_the_most_bits_per_weight() {
        use Precision::*;
        assert_eq!(reference_level(&[Q4_0, Bf16, Q8_0]), Some(Bf16));
        assert_eq!(reference_level(&[Q4K, Fp32, Bf16]), Some(Fp32));
        assert_eq!(reference_level(&[Q4_0, Q8_0]), Some(Q8_0));
        assert_eq!(reference_level(&[]), None);
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_for_different() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        let p: Vec<f32> = p.iter().map(|&x| x as f32).collect();
        let q: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        assert!(kl_divergence(&p, &p).abs() < 1e-7);
        assert!(kl_divergence(&p, &q) > 0.5);
    }
}
