#![no_main]
//! `llmem_engine::untrusted::gguf` on each input.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llmem_engine::untrusted::gguf(data));
