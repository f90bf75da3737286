//! The counting allocator (`llmem_engine::heap`) installed as this test binary's global
//! allocator: attribution per component and rank, blocks freed on other threads,
//! reallocation, the pass meter, and the engine's own tags on a tiny random model
//! (weights, KV cache, activations, per rank under TP and PP).
//!
//! Each test works on rank slots no other test of this file uses, so the counts stay
//! apart when the tests share a process.

use candle_core::{DType, Device};
use llmem_engine::cache::paged::{KvDtype, PagedKvCache};
use llmem_engine::engine::{Engine, EngineConfig};
use llmem_engine::heap::{self, Component, CountingAlloc, PassMeter};
use llmem_engine::model::Model;
use llmem_engine::parallel::spec::ParallelSpec;
use llmem_engine::request::{SamplingParams, StopConditions};
use llmem_engine::weights::files::WeightFiles;
use llmem_engine::weights::quant::WeightFormat;
use llmem_planner::ModelShape;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A small Llama: 4 layers, hidden 256 (a multiple of the k-quants' 256), GQA 4:2.
fn tiny_shape() -> ModelShape {
    let mut s = llmem_planner::preset("smollm2-135m").unwrap();
    s.name = "tiny".into();
    s.vocab_size = 512;
    s.hidden_size = 256;
    s.intermediate_size = 512;
    s.num_hidden_layers = 4;
    s.num_attention_heads = 4;
    s.num_key_value_heads = 2;
    s.head_dim = 64;
    s.max_position_embeddings = 256;
    s
}

#[test]
fn blocks_are_counted_on_their_tag_and_freed_from_any_thread() {
    assert!(heap::installed());
    let rank = 9;
    let before = heap::live(Component::Weights, rank);
    let v = {
        let _s = heap::rank_scope(Component::Weights, rank);
        vec![7u8; 1000]
    };
    assert_eq!(heap::live(Component::Weights, rank), before + 1000);
    // Growing and shrinking in place keeps the block on its tag.
    let mut v = {
        let _s = heap::rank_scope(Component::Runtime, rank);
        let mut v = v;
        v.reserve_exact(3000);
        v
    };
    assert_eq!(
        heap::live(Component::Weights, rank),
        before + v.capacity() as u64
    );
    v.shrink_to_fit();
    assert_eq!(heap::live(Component::Weights, rank), before + 1000);
    // Freed by another thread, under another tag.
    std::thread::spawn(move || {
        let _s = heap::rank_scope(Component::KvCache, 3);
        drop(v);
    })
    .join()
    .unwrap();
    assert_eq!(heap::live(Component::Weights, rank), before);
    // Alignment above the header's 16 bytes is honoured.
    let _s = heap::rank_scope(Component::Runtime, rank);
    let layout = std::alloc::Layout::from_size_align(100, 4096).unwrap();
    let p = unsafe { std::alloc::alloc(layout) };
    assert_eq!(p as usize % 4096, 0);
    unsafe { std::alloc::dealloc(p, layout) };
}

#[test]
fn the_pass_meter_sees_the_peak_above_the_start() {
    let rank = 10;
    let _s = heap::rank_scope(Component::Activations, rank);
    let held = vec![0u8; 4096];
    let meter = PassMeter::start(Component::Activations, rank);
    let a = vec![1u8; 10_000];
    let b = vec![2u8; 20_000];
    drop(a);
    let kept = vec![3u8; 100];
    drop(b);
    let (peak, still) = meter.finish();
    assert_eq!(peak, 30_000);
    assert_eq!(still, 100);
    drop((held, kept));
}

/// Queue a greedy request of `prompt` and 2 generated tokens.
fn add(engine: &mut Engine, prompt: Vec<u32>) {
    engine
        .add_request(
            prompt,
            SamplingParams::default(),
            StopConditions {
                max_tokens: 2,
                stop_token_ids: vec![],
                ignore_eos: true,
            },
        )
        .unwrap();
}

/// Load on a fresh thread tagged with `rank`, so nothing else counts there.
fn on_rank<T: Send>(rank: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            heap::tag_thread(Component::Other, rank);
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn weights_kv_and_activations_of_a_model_are_measured_on_its_rank() {
    let shape = tiny_shape();
    for (i, fmt) in [
        WeightFormat::dense(DType::F32).unwrap(),
        WeightFormat::new(llmem_planner::Precision::Q8_0).unwrap(),
        WeightFormat::new(llmem_planner::Precision::Q4K).unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let rank = 11 + i;
        on_rank(rank, || {
            let model =
                Model::load_with(&shape, &WeightFiles::random(3), &fmt, &Device::Cpu).unwrap();
            let measured = heap::live(Component::Weights, rank);
            let bytes = model.weights_bytes();
            // Tensor data plus each tensor's bookkeeping (candle's shape, strides and
            // reference counts; our Arc around a packed matrix): a few hundred bytes per
            // tensor, never less than the data.
            let tensors = 2 + 9 * shape.num_hidden_layers;
            println!(
                "{:?}: weights {bytes} B, measured {measured} B (+{} B over {tensors} tensors)",
                fmt.precision,
                measured as i64 - bytes as i64
            );
            assert!(measured >= bytes, "{measured} < {bytes}");
            assert!(measured - bytes <= 1024 * tensors, "{measured} vs {bytes}");

            let cache = PagedKvCache::new(model.local_shape(), 8, 16, KvDtype::F32).unwrap();
            assert_eq!(heap::live(Component::KvCache, rank), cache.bytes());

            let before = heap::live(Component::Activations, rank);
            let config = EngineConfig::for_model(&model, 8);
            let mut engine = Engine::new(model, config).unwrap();
            let _ = cache;
            add(&mut engine, (1..=39).collect());
            engine.step().unwrap();
            let measured = engine.measured_activation_bytes().unwrap();
            let estimate = engine.activation_bytes().0;
            println!(
                "{:?}: a 39-token pass: measured {} B, estimated {estimate} B",
                fmt.precision, measured[0].0
            );
            assert!(measured[0].0 > 0 && measured[0].1 >= measured[0].0);
            while engine.has_work() {
                engine.step().unwrap();
            }
            assert_eq!(engine.measured_activation_bytes().unwrap()[0].0, 0);
            // The passes' blocks are freed (the engine's pass runs on rank 0's slot).
            let _ = before;
        });
    }
}

#[test]
fn every_rank_of_a_grid_counts_its_own_shard() {
    let shape = tiny_shape();
    for (tp, pp, vocab_parallel) in [(2, 1, false), (2, 1, true), (1, 2, false)] {
        let spec = ParallelSpec {
            tp,
            pp,
            vocab_parallel,
        };
        let config = EngineConfig {
            block_size: 16,
            num_blocks: 8,
            kv_dtype: KvDtype::F32,
            max_num_seqs: 4,
            max_batched_tokens: 64,
            max_model_len: 128,
            kv_layout: Default::default(),
        };
        let weights_before: Vec<u64> = (0..2).map(|r| heap::live(Component::Weights, r)).collect();
        let mut engine =
            Engine::new_parallel(&shape, WeightFiles::random(4), DType::F32, spec, config).unwrap();
        let ranks = engine.rank_memory();
        for (r, m) in ranks.iter().enumerate() {
            let measured = heap::live(Component::Weights, r) - weights_before[r];
            println!(
                "{spec:?} rank {r}: weights {} B, measured {measured} B",
                m.weights_bytes
            );
            // Shards count exactly like a whole model: data plus a few hundred bytes of
            // bookkeeping per tensor (a shard that kept its whole matrix alive, as
            // candle's `copy` of a row slice did, would be off by megabytes).
            assert!(
                measured >= m.weights_bytes && measured - m.weights_bytes <= 1024 * 40,
                "{spec:?} rank {r}: {measured} vs {}",
                m.weights_bytes
            );
        }
        add(&mut engine, (1..=29).collect());
        engine.step().unwrap();
        let measured = engine.measured_activation_bytes().unwrap();
        assert_eq!(measured.len(), 2);
        for (r, (last, _)) in measured.iter().enumerate() {
            println!("{spec:?} rank {r}: pass working set {last} B");
            assert!(*last > 0, "rank {r}");
        }
        drop(engine);
        for (r, before) in weights_before.iter().enumerate() {
            assert_eq!(heap::live(Component::Weights, r), *before, "rank {r} freed");
        }
    }
}

/// SmolLM2-135M's widths with 2 layers (a pass's working set does not grow with depth).
fn smol_2_layers() -> ModelShape {
    let mut s = llmem_planner::preset("smollm2-135m").unwrap();
    s.num_hidden_layers = 2;
    s
}

/// One engine step over `seqs` sequences of `tokens / seqs` prompt tokens each: the
/// measured working set of that pass, and the engine's estimate.
fn measure_pass(engine: &mut Engine, tokens: usize, seqs: usize) -> (u64, u64) {
    for s in 0..seqs {
        let n = tokens / seqs;
        add(
            engine,
            (0..n).map(|i| ((i * 7 + s) % 1000) as u32 + 1).collect(),
        );
    }
    engine.step().unwrap();
    let m = engine.measured_activation_bytes().unwrap();
    let est = engine.activation_bytes().0;
    while engine.has_work() {
        engine.step().unwrap();
    }
    (m.iter().map(|x| x.0).max().unwrap(), est)
}

/// The engine's activation estimate against the measured working set over a grid of pass
/// sizes, f32 and q8_0 weights (docs/results.md section 14 lists the ratios): measured /
/// estimate within 0.97-1.06 everywhere but dense f32 weights on short multi-token passes
/// (candle's gemm workspace, printed, not held). The planner's formula is not yet the
/// engine's.
#[test]
fn activation_estimate_against_the_measured_grid() {
    let shape = smol_2_layers();
    for prec in [
        llmem_planner::Precision::Fp32,
        llmem_planner::Precision::Q8_0,
    ] {
        let fmt = WeightFormat::new(prec).unwrap();
        let model = Model::load_with(&shape, &WeightFiles::random(5), &fmt, &Device::Cpu).unwrap();
        let mut config = EngineConfig::for_model(&model, 256);
        config.max_model_len = 4096;
        let mut engine = Engine::new(model, config).unwrap();
        for (tokens, seqs) in [
            (1, 1),
            (16, 1),
            (16, 16),
            (128, 1),
            (128, 32),
            (512, 1),
            (2048, 1),
            (2048, 32),
        ] {
            let (m, est) = measure_pass(&mut engine, tokens, seqs);
            let ratio = m as f64 / est as f64;
            println!("{prec:?} tokens {tokens} seqs {seqs}: measured {m} estimate {est} ratio {ratio:.3}");
            assert!(m > 0, "{prec:?} {tokens}/{seqs}");
            // Dense f32 weights on a short multi-token pass go through candle's gemm,
            // whose packing workspace (about 2 MB) the estimate does not model.
            let gemm_workspace =
                prec == llmem_planner::Precision::Fp32 && seqs == 1 && tokens > 1 && tokens < 128;
            if !gemm_workspace {
                assert!(
                    (0.97..=1.06).contains(&ratio),
                    "{prec:?} {tokens}/{seqs}: {ratio}"
                );
            }
        }
    }
}
