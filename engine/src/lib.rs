//! llmem's runtime half: model loading, the Llama forward pass, the paged KV cache, the
//! serving engine and evaluation.
//!
//! Layers, bottom to top; a module imports only from its own layer or those below
//! (`scripts/check-layers` fails on an import cycle):
//!
//! - `error`, `request`, `rng`, `device`, `chat`, `config`, `heap`: the vocabulary every
//!   layer shares (`heap` counts heap bytes per component and rank);
//! - `weights`: files, formats, tokenizers, the default model;
//! - `cache`: block bookkeeping, the paged and the contiguous KV cache;
//! - `parallel`: collectives and how a model is split over ranks;
//! - `layers`: linear, attention, MLP, norm, rope, the decoder layer;
//! - `model`: the Llama model (whole, or one rank's shard) and its activation estimates;
//! - `sample`: sampling and detokenizing;
//! - `engine`: the serving engine, scheduler, rank runner, KV sizing, single-sequence generation;
//! - `eval`: perplexity and `llmem sweep`.

pub mod cache;
pub mod chat;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod heap;
pub mod layers;
pub mod model;
pub mod parallel;
pub mod request;
pub mod rng;
pub mod sample;
mod template_budget;
pub mod untrusted;
pub mod weights;

pub use error::{Error, Result};
