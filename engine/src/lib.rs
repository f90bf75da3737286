//! llmem's runtime half: model loading, the Llama forward pass and generation.

pub mod block_manager;
pub mod chat;
pub mod comm;
pub mod config;
pub mod convert;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gguf_weights;
mod host_ops;
pub mod hub;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod model;
pub mod parallel;
pub mod perplexity;
pub mod quant;
pub mod request;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod spec;
pub mod sweep;
pub mod tokenizer_gguf;

pub use error::{Error, Result};
