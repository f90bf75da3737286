//! Truncated and bit-flipped model files, table-driven: every tiny seed model
//! (`llmem_engine::untrusted::seeds`: GGUF in f32, Q8_0, Q4_0 and Q4_K; safetensors in
//! f32 and bf16) cut at 48 points and flipped at 64 bits. A cut file is always refused
//! with an error naming the file (and the tensor, when the cut falls in tensor data);
//! a flipped one loads (a flip in weight values is not detectable: GGUF and safetensors
//! carry no checksum) or is refused naming the file; nothing panics.

use std::path::Path;

use candle_core::{DType, Device};
use llmem_engine::model::Model;
use llmem_engine::untrusted::{scratch_dir, seeds, TINY_CONFIG};

/// Load `bytes` as the seed's kind of file; the error text if refused.
fn load(kind: &str, dir: &Path, bytes: &[u8]) -> Result<(), String> {
    match kind {
        "gguf" => {
            let path = dir.join("model.gguf");
            std::fs::write(&path, bytes).unwrap();
            Model::load_gguf(&path, None, &Device::Cpu)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        _ => {
            std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
            std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
            Model::load_dir(dir, DType::F32, &Device::Cpu)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

/// Offsets spread over the file, denser over the first 4 KiB (the header).
fn points(len: usize, n: usize) -> Vec<usize> {
    let head = len.min(4096);
    let mut v: Vec<usize> = (0..n / 2).map(|i| i * head / (n / 2)).collect();
    v.extend((0..n / 2).map(|i| head + i * (len - head) / (n / 2)));
    v.retain(|&p| p < len);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn truncated_and_flipped_model_files_are_refused_by_name_or_load() {
    let dir = scratch_dir("damaged");
    let mut cases = 0;
    for seed in seeds()
        .into_iter()
        .filter(|s| s.name.starts_with("tiny-") && matches!(s.target, "gguf" | "safetensors"))
    {
        let file = if seed.target == "gguf" {
            "model.gguf"
        } else {
            "model.safetensors"
        };
        load(seed.target, &dir, &seed.bytes)
            .unwrap_or_else(|e| panic!("{}: the intact seed does not load: {e}", seed.name));
        for cut in points(seed.bytes.len(), 48) {
            cases += 1;
            match load(seed.target, &dir, &seed.bytes[..cut]) {
                Ok(()) => panic!("{} cut to {cut} bytes loaded", seed.name),
                Err(e) => assert!(
                    e.contains(file),
                    "{} cut to {cut} bytes: the error does not name {file}: {e}",
                    seed.name
                ),
            }
        }
        for (i, at) in points(seed.bytes.len(), 64).into_iter().enumerate() {
            cases += 1;
            let mut bytes = seed.bytes.clone();
            bytes[at] ^= 1 << (i % 8);
            if let Err(e) = load(seed.target, &dir, &bytes) {
                assert!(
                    e.contains(file),
                    "{} with bit {} of byte {at} flipped: the error does not name {file}: {e}",
                    seed.name,
                    i % 8
                );
            }
        }
    }
    assert!(cases >= 500, "{cases} cases");
    let _ = std::fs::remove_dir_all(dir);
}

/// A cut inside tensor data names the tensor, not only the file.
#[test]
fn a_cut_in_tensor_data_names_the_tensor() {
    let dir = scratch_dir("damaged-tensor");
    for seed in seeds()
        .into_iter()
        .filter(|s| s.name.starts_with("tiny-") && matches!(s.target, "gguf" | "safetensors"))
    {
        let cut = seed.bytes.len() - 7;
        let e = load(seed.target, &dir, &seed.bytes[..cut]).unwrap_err();
        assert!(
            e.contains(".weight"),
            "{} cut 7 bytes short: no tensor named: {e}",
            seed.name
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
