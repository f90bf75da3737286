//! llmem's runtime half: model loading, the Llama forward pass and generation.

pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod loader;
pub mod model;
pub mod perplexity;
pub mod sampler;
pub mod tokenizer_gguf;

pub use error::{Error, Result};
