//! Kernels for llmem: paged attention and KV cache writes.
//!
//! Empty for now: the paged KV cache issue fills it. Kernels here are free functions
//! that know nothing of requests; each fast kernel gets a slow reference beside it.
