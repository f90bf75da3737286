//! Engine benchmarks on the default model (SmolLM2-135M-Instruct), f32 and bf16:
//! one batch-1 decode step at a 128-token context, and a 128-token prefill.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench engine` (the model must be converted
//! already: `llmem generate --prompt hi --max-tokens 1` does it, or set LLMEM_MODEL_DIR).
//! Skipped, with a note, when the model is absent.

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

fn bench(c: &mut Criterion) {
    let Some(dir) = model_dir() else {
        eprintln!("benches/engine.rs: no converted model (LLMEM_MODEL_DIR or the cache); skipped");
        return;
    };
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + (i * 37) % 4000).collect();
    for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let model = match Model::load_dir(&dir, dtype, &Device::Cpu) {
            Ok(m) => m,
            Err(e) => {
                eprintln!(
                    "benches/engine.rs: cannot load {}: {e}; skipped",
                    dir.display()
                );
                return;
            }
        };
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
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
