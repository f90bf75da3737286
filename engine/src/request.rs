//! What a request asks for, in the words every front end shares: how to sample
//! ([`SamplingParams`]), when to stop ([`StopConditions`]), why it stopped
//! ([`FinishReason`]), and the checks every prompt passes before it reaches a model
//! ([`check_prompt`], [`check_token_ids`]). The CLI, `llmem bench`, the server, sweep
//! and perplexity all go through these, so a bad prompt gets the same message everywhere.

use serde::Serialize;

use crate::error::{Error, Result};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (None: 1).
    pub top_p: Option<f32>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Reject values that make no distribution.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidInput(format!(
                "temperature = {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidInput(format!(
                    "top_p = {p} must be in (0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence or stop token, or a stop string.
    Stop,
    /// `max_tokens` generated, or the context is full.
    Length,
    /// The caller aborted it (a client went away).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What the scheduler needs to know about a request to finish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopConditions {
    pub max_tokens: usize,
    /// Token ids that end generation (EOS ids and explicit stop ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past stop tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Every id of `ids` must lie inside a vocabulary of `vocab` tokens; `what` names the ids
/// in the message ("prompt token", "token").
pub fn check_token_ids(what: &str, ids: &[u32], vocab: u64) -> Result<()> {
    match ids.iter().find(|&&t| u64::from(t) >= vocab) {
        Some(bad) => Err(Error::InvalidInput(format!(
            "{what} id {bad} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// A prompt a model of `vocab` tokens can take: at least one token, every id inside the
/// vocabulary. (Its length against a context limit is the caller's: the limit differs.)
pub fn check_prompt(ids: &[u32], vocab: u64) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::InvalidInput(
            "the prompt is empty: it encodes to no tokens".into(),
        ));
    }
    check_token_ids("prompt token", ids, vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_checks_name_the_problem() {
        let e = check_prompt(&[], 10).unwrap_err().to_string();
        assert!(e.contains("the prompt is empty"), "{e}");
        let e = check_prompt(&[1, 10], 10).unwrap_err().to_string();
        assert_eq!(e, "prompt token id 10 is outside the vocabulary of 10");
        assert!(check_prompt(&[0, 9], 10).is_ok());
        let e = check_token_ids("token", &[3, 99], 50)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "token id 99 is outside the vocabulary of 50");
    }

    #[test]
    fn finish_reasons_serialize_lowercase() {
        for r in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Abort,
        ] {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }
}
