//! Everything read from disk or the network before a model runs: weight files
//! (safetensors, GGUF, generated), load-time quantization formats, tokenizers, the
//! default model's download and cache.

pub mod files;
pub mod gguf;
pub mod hub;
pub mod pages;
pub mod quant;
pub mod random;
pub mod source;
pub mod tokenizer;
