//! One sequence's generation: prefill the prompt in one pass, then decode one token per
//! pass over a per-sequence KV cache, sampling, detokenizing and stopping as asked.

use std::time::Instant;

use serde::Serialize;
use tokenizers::Tokenizer;

pub use crate::cache::contiguous::KvCache;
use crate::cache::paged::KvDtype;
use crate::error::{Error, Result};
use crate::model::{AttnMetadata, Model};
use crate::request::check_prompt;
pub use crate::request::FinishReason;
use crate::sample::detok::{IncrementalDecoder, StopStrings};
use crate::sample::sampler::{top_logprobs, Sampler, SamplingParams};

/// A contiguous per-sequence KV cache.
/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (EOS from generation_config.json).
    pub eos_token_ids: Vec<u32>,
    /// Further token ids that end generation, even with `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; they and what follows are not part of the text.
    pub stop_strings: Vec<String>,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
    /// Record the top K log-probabilities at every generated position (0: none).
    pub top_logprobs: usize,
    /// KV cache element type; `None`: the model's dtype.
    pub kv_dtype: Option<KvDtype>,
}

/// Wall-clock time per phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Decode passes (generated tokens after the first) per second of decode time.
    pub decode_tokens_per_s: f64,
}

/// The engine's own memory accounting for one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// Bytes of the weight tensors the model holds (tied LM head once).
    pub weights_bytes: u64,
    /// Bytes allocated for this sequence's KV cache.
    pub kv_cache_bytes: u64,
    /// [`Model::contiguous_activation_peak_bytes`] of the largest pass: the planner's
    /// formula (an estimate).
    pub activation_peak_bytes: u64,
    /// The largest working set of one pass as the counting allocator saw it (the heap's
    /// activations above where they stood before the pass); `None` where
    /// [`crate::heap::CountingAlloc`] is not the global allocator.
    pub activation_peak_measured_bytes: Option<u64>,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, including a final EOS or stop token.
    pub token_ids: Vec<u32>,
    /// Generated text, without special tokens, cut before any stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    pub memory: MemoryReport,
    /// Per generated position, the top K `(token_id, logprob)`; empty unless asked.
    pub top_logprobs: Vec<Vec<(u32, f64)>>,
}

fn rate(tokens: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        tokens as f64 / (ms / 1000.0)
    } else {
        0.0
    }
}

/// Generate from `req.prompt_ids`, calling `on_text` with each piece of text as soon as it
/// is final (whole characters, never part of a stop string).
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput> {
    let prompt_len = req.prompt_ids.len();
    check_prompt(&req.prompt_ids, model.shape().vocab_size)?;
    let max_context = model.max_context();
    if prompt_len >= max_context {
        return Err(Error::InvalidInput(format!(
            "the prompt is {prompt_len} tokens but the model's context \
             (max_position_embeddings) is {max_context} tokens; shorten the prompt"
        )));
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    // The whole sequence (prompt + generated) fits the context; the cache holds all of it
    // but the last generated token, which is never fed back.
    let capacity =
        (prompt_len + req.max_tokens.saturating_sub(1)).clamp(prompt_len, max_context - 1);
    let mut cache = match req.kv_dtype {
        Some(kv) => KvCache::new_in(model.shape(), capacity, kv, model.device())?,
        None => model.new_cache(capacity)?,
    };

    let prefill_meta = AttnMetadata::single(0, prompt_len);
    let start = Instant::now();
    let mut measured_peak = 0u64;
    let mut pass = |ids: &[u32], meta: &AttnMetadata, cache: &mut KvCache| {
        let (out, peak) = crate::heap::measure(crate::heap::Component::Activations, 0, || {
            model.forward(ids, meta, &mut [cache])
        });
        measured_peak = measured_peak.max(peak);
        out
    };
    let logits = pass(&req.prompt_ids, &prefill_meta, &mut cache)?;
    let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;

    let mut decoder = IncrementalDecoder::new(tokenizer, true);
    let mut stops = StopStrings::new(req.stop_strings.clone());
    let mut token_ids = Vec::new();
    let mut all_top = Vec::new();
    let mut decode_ms = 0.0;
    let mut decode_passes = 0usize;
    let finish_reason = loop {
        if token_ids.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        let token = sampler.sample(&logits)?;
        if req.top_logprobs > 0 {
            all_top.push(top_logprobs(&logits, req.top_logprobs));
        }
        token_ids.push(token);
        let is_eos = !req.ignore_eos && req.eos_token_ids.contains(&token);
        if is_eos || req.stop_token_ids.contains(&token) {
            break FinishReason::Stop;
        }
        let piece = decoder.push(token)?;
        let shown = stops.push(&piece);
        if !shown.is_empty() {
            on_text(&shown);
        }
        if stops.stopped() {
            break FinishReason::Stop;
        }
        if token_ids.len() >= req.max_tokens || prompt_len + token_ids.len() >= max_context {
            break FinishReason::Length;
        }
        let step = Instant::now();
        let meta = AttnMetadata::single(cache.len(), 1);
        let out = pass(&[token], &meta, &mut cache)?;
        logits = out.squeeze(0)?.to_vec1()?;
        decode_ms += step.elapsed().as_secs_f64() * 1e3;
        decode_passes += 1;
    };
    if !stops.stopped() {
        let rest = decoder.flush()?;
        let mut shown = stops.push(&rest);
        shown.push_str(&stops.finish());
        if !shown.is_empty() {
            on_text(&shown);
        }
    }

    let activation_peak_bytes = model
        .contiguous_activation_peak_bytes(&cache, prompt_len, prompt_len)
        .max(model.contiguous_activation_peak_bytes(&cache, 1, capacity));
    Ok(GenerateOutput {
        prompt_token_ids: req.prompt_ids.clone(),
        token_ids,
        text: stops.text().to_string(),
        finish_reason,
        timings: Timings {
            prefill_ms,
            decode_ms,
            prefill_tokens_per_s: rate(prompt_len, prefill_ms),
            decode_tokens_per_s: rate(decode_passes, decode_ms),
        },
        memory: MemoryReport {
            weights_bytes: model.weights_bytes(),
            kv_cache_bytes: cache.bytes(),
            activation_peak_bytes,
            activation_peak_measured_bytes: crate::heap::installed().then_some(measured_peak),
        },
        top_logprobs: all_top,
    })
}
