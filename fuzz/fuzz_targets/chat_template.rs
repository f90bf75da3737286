#![no_main]
//! `llmem_engine::untrusted::chat_template` on each input.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llmem_engine::untrusted::chat_template(data));
