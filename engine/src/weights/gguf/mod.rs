//! GGUF files: the reader ([`file`]), the tensor table under Hugging Face names
//! ([`tensors`]), the vocabulary as a tokenizer ([`vocab`]) and the converter to a model
//! directory ([`convert`], `llmem import`).

pub mod convert;
pub mod file;
pub mod tensors;
pub mod vocab;
