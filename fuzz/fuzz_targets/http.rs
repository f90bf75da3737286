#![no_main]
//! `llmem::serve::untrusted::http` on each input: one request to a server on a tiny
//! one-layer GGUF model written at start-up.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llmem::serve::untrusted::http(data));
