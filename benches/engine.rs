//! Engine benchmarks on the default model (SmolLM2-135M-Instruct), f32 and bf16 from its
//! converted directory and its GGUF files as stored: one batch-1 decode step at a
//! 128-token context, the same step's matrix products alone (`decode_products`: the rest
//! of a step is what it costs beyond them), and a 128-token prefill.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench engine` (the model must be converted
//! already: `llmem generate --prompt hi --max-tokens 1` does it, or set LLMEM_MODEL_DIR).
//! The GGUF files are the cached default (`Q4_1`) or those `LLMEM_BENCH_GGUF` lists
//! (paths separated by `:`). Weights go into 2 MiB pages as the `llmem` binary puts them.
//! Each part is skipped, with a note, when its files are absent.

use std::path::PathBuf;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmem_engine::model::{AttnMetadata, Model};

fn model_dir() -> Option<PathBuf> {
    match std::env::var_os("LLMEM_MODEL_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => llmem_engine::weights::hub::cached_default_model_dir(None),
    }
}

/// The GGUF files to run as stored: `LLMEM_BENCH_GGUF`, else the cached default.
fn gguf_files() -> Vec<PathBuf> {
    match std::env::var("LLMEM_BENCH_GGUF") {
        Ok(list) if !list.is_empty() => list.split(':').map(PathBuf::from).collect(),
        _ => llmem_engine::weights::hub::cache_root()
            .map(|root| llmem_engine::weights::hub::default_gguf_path(&root))
            .into_iter()
            .filter(|p| p.is_file())
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    llmem_engine::weights::pages::use_by_default();
    let mut models: Vec<(String, Model)> = Vec::new();
    match model_dir() {
        None => eprintln!(
            "benches/engine.rs: no converted model (LLMEM_MODEL_DIR or the cache); the f32 \
             and bf16 runs are skipped"
        ),
        Some(dir) => {
            for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
                match Model::load_dir(&dir, dtype, &Device::Cpu) {
                    Ok(m) => models.push((tag.to_string(), m)),
                    Err(e) => eprintln!(
                        "benches/engine.rs: cannot load {} as {tag}: {e}; skipped",
                        dir.display()
                    ),
                }
            }
        }
    }
    let files = gguf_files();
    if files.is_empty() {
        eprintln!("benches/engine.rs: no GGUF file (LLMEM_BENCH_GGUF or the cache); skipped");
    }
    for path in files {
        let tag = path
            .file_stem()
            .map_or("gguf".into(), |s| s.to_string_lossy().into_owned());
        match Model::load_gguf(&path, None, &Device::Cpu) {
            Ok((m, _)) => models.push((tag, m)),
            Err(e) => eprintln!(
                "benches/engine.rs: cannot load {}: {e}; skipped",
                path.display()
            ),
        }
    }
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + (i * 37) % 4000).collect();
    for (tag, model) in &models {
        let mut group = c.benchmark_group(format!("smollm2-135m/{tag}"));
        group.sample_size(10);

        group.throughput(Throughput::Elements(prompt.len() as u64));
        group.bench_function("prefill_128", |b| {
            b.iter(|| {
                let mut cache = model.new_cache(prompt.len()).unwrap();
                let meta = AttnMetadata::single(0, prompt.len());
                model.forward(&prompt, &meta, &mut [&mut cache]).unwrap()
            })
        });

        // A cache holding the prompt; each iteration rewinds it to 128 tokens and decodes
        // one token at position 128.
        group.throughput(Throughput::Elements(1));
        group.bench_function("decode_step_ctx128", |b| {
            let mut cache = model.new_cache(prompt.len() + 1).unwrap();
            let meta = AttnMetadata::single(0, prompt.len());
            model.forward(&prompt, &meta, &mut [&mut cache]).unwrap();
            let step = AttnMetadata::single(prompt.len(), 1);
            b.iter(|| {
                cache.truncate(prompt.len());
                model.forward(&[42], &step, &mut [&mut cache]).unwrap()
            })
        });
        group.bench_function("decode_products", |b| {
            b.iter(|| model.decode_products().unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
