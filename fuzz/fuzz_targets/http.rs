#![no_main]
//! `llmem::serve::untrusted::http` on each input: one request to a server on the
//! cached built-in model.
libfuzzer_sys::fuzz_target!(|data: &[u8]| llmem::serve::untrusted::http(data));
