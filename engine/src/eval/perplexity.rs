//! Perplexity over non-overlapping windows, the method of the reference numbers in
//! `shared/reference/smollm2_135m_instruct_perplexity.json`.
//!
//! The caller tokenizes the whole text once (no BOS, no special tokens) and passes the
//! first N ids. They are cut into `N / window` full windows (a shorter tail is left out);
//! each window is one forward pass from an empty cache, positions `0..W-2` predict tokens
//! `1..W-1`, log-softmax in f64, and perplexity = exp(total NLL / predictions).

use serde::Serialize;

use crate::cache::contiguous::KvCache;
use crate::cache::paged::KvDtype;
use crate::error::{Error, Result};
use crate::model::{AttnMetadata, Model};
use crate::sample::sampler::log_softmax;

/// One line describing the method, for reports.
pub const METHOD: &str = "non-overlapping windows, each one forward pass from an empty \
    cache; positions 0..W-2 predict tokens 1..W-1; log-softmax in f64; \
    perplexity = exp(sum NLL / predictions)";

/// Result of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Tokens scored (windows x window).
    pub tokens: usize,
    pub window: usize,
    pub windows: usize,
    /// Predictions: windows x (window - 1).
    pub predictions: usize,
    /// Sum of negative log-likelihoods per window.
    pub window_nll: Vec<f64>,
    pub perplexity: f64,
}

/// Perplexity of `model` on `ids` over windows of `window` tokens.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    window: usize,
    on_window: impl FnMut(usize, f64),
) -> Result<PerplexityReport> {
    perplexity_kv(model, ids, window, None, on_window)
}

/// [`perplexity`] with the KV cache at level `kv` (`None`: the model's dtype). Each
/// window's attention reads its keys and values back from that cache, so the figure
/// carries the cache's rounding.
pub fn perplexity_kv(
    model: &Model,
    ids: &[u32],
    window: usize,
    kv: Option<KvDtype>,
    mut on_window: impl FnMut(usize, f64),
) -> Result<PerplexityReport> {
    if window < 2 {
        return Err(Error::InvalidInput(format!(
            "window = {window}: a window needs at least 2 tokens"
        )));
    }
    if window > model.max_context() {
        return Err(Error::InvalidInput(format!(
            "window = {window} exceeds the model's context of {} tokens",
            model.max_context()
        )));
    }
    let windows = ids.len() / window;
    if windows == 0 {
        return Err(Error::InvalidInput(format!(
            "only {} tokens, fewer than one window of {window}",
            ids.len()
        )));
    }
    let mut window_nll = Vec::with_capacity(windows);
    for w in 0..windows {
        let chunk = &ids[w * window..(w + 1) * window];
        let nll = window_nll_in(model, chunk, kv, |_| {})?;
        on_window(w, nll);
        window_nll.push(nll);
    }
    let predictions = windows * (window - 1);
    let total: f64 = window_nll.iter().sum();
    Ok(PerplexityReport {
        tokens: windows * window,
        window,
        windows,
        predictions,
        window_nll,
        perplexity: (total / predictions as f64).exp(),
    })
}

/// One window scored from an empty cache with the KV cache at level `kv` (`None`: the
/// model's dtype): the summed negative log-likelihood of tokens `1..W` given the ones
/// before, in f64. `on_position` sees each predicting position's log-softmax row (vocab
/// entries), in order. Shared by perplexity and `llmem sweep`.
pub fn window_nll_in(
    model: &Model,
    chunk: &[u32],
    kv: Option<KvDtype>,
    mut on_position: impl FnMut(&[f64]),
) -> Result<f64> {
    let w = chunk.len();
    let mut cache = match kv {
        Some(kv) => KvCache::new_in(model.shape(), w, kv, model.device())?,
        None => model.new_cache(w)?,
    };
    let logits = model.forward_all_logits(chunk, &AttnMetadata::single(0, w), &mut [&mut cache])?;
    let vocab = logits.dim(1)?;
    let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let mut nll = 0.0f64;
    for pos in 0..w.saturating_sub(1) {
        let lp = log_softmax(&flat[pos * vocab..(pos + 1) * vocab]);
        let target = chunk[pos + 1] as usize;
        nll -= lp.get(target).copied().ok_or_else(|| {
            Error::InvalidInput(format!(
                "token id {target} is outside the vocabulary of {vocab}"
            ))
        })?;
        on_position(&lp);
    }
    Ok(nll)
}
