//! Measuring a model: perplexity over a text, and `llmem sweep` over precisions.

pub mod perplexity;
pub mod sweep;
