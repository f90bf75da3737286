//! Invariants of the planner over many models, workloads and deployments.

use llmem_planner::plan::{layer_bytes, stage_layers, valid_tp_degrees};
use llmem_planner::{
    gpu, matrix_bytes, plan, preset, preset_names, Deployment, KvDtype, Precision, Workload,
};
use proptest::prelude::*;

fn deployment(p: Precision, tp: u64, pp: u64) -> Deployment {
    Deployment {
        tp,
        pp,
        ..Deployment::new(p, gpu("h100-80gb").unwrap())
    }
}

/// Weights of all ranks add back to the model's weights plus what TP replicates.
#[test]
fn tp_and_pp_splits_add_back_to_the_total() {
    for name in preset_names() {
        let shape = preset(name).unwrap();
        let w = Workload::new(1024, 4);
        for p in [Precision::Fp16, Precision::Q4K, Precision::Int4] {
            let whole = plan(&shape, &w, &deployment(p, 1, 1)).unwrap();
            let h = shape.hidden_size;
            let norm = llmem_planner::vector_bytes(p, h).unwrap();
            for tp in valid_tp_degrees(&shape).into_iter().filter(|t| *t <= 16) {
                for pp in [1, 2, 3] {
                    let d = deployment(p, tp, pp);
                    let pl = plan(&shape, &w, &d).unwrap();
                    let sum: u64 = pl
                        .stages
                        .iter()
                        .flat_map(|s| s.rank_weights_bytes.iter())
                        .sum();
                    // Expected: every layer's matrices once (when the row lengths keep the
                    // same block format), norms replicated tp times, KV projections
                    // replicated when tp exceeds the KV heads, embedding replicated, and a
                    // tied head copied onto the last stage under PP.
                    let layers = shape.num_hidden_layers;
                    let ranks: u64 = (0..tp)
                        .map(|r| layer_bytes(&shape, p, tp, r).unwrap().total())
                        .sum();
                    let emb = matrix_bytes(p, shape.vocab_size, h).unwrap();
                    let heads = if shape.tie_word_embeddings && pp == 1 {
                        1
                    } else {
                        2
                    };
                    let expected = ranks * layers + tp * (emb * heads + norm);
                    assert_eq!(sum, expected, "{name} {p} tp={tp} pp={pp}");
                    if tp == 1 && pp == 1 {
                        assert_eq!(sum, whole.weights_bytes_model, "{name} {p}");
                    }
                    // Layers add back too.
                    let l: u64 = pl.stages.iter().map(|s| s.num_layers).sum();
                    assert_eq!(l, layers);
                }
            }
        }
    }
}

#[test]
fn float_splits_without_replication_are_exact() {
    // llama-3-8b at fp16, TP 8 (= KV heads): layer matrices split exactly.
    let shape = preset("llama-3-8b").unwrap();
    let one = layer_bytes(&shape, Precision::Fp16, 1, 0).unwrap();
    let eight: u64 = (0..8)
        .map(|r| layer_bytes(&shape, Precision::Fp16, 8, r).unwrap())
        .map(|b| b.attention + b.mlp)
        .sum();
    assert_eq!(eight, one.attention + one.mlp);
}

#[test]
fn smollm2_tp3_splits_kv_heads_and_tp9_replicates_them() {
    let shape = preset("smollm2-135m").unwrap();
    let w = Workload::new(2048, 1);
    let p3 = plan(&shape, &w, &deployment(Precision::Fp32, 3, 1)).unwrap();
    let p9 = plan(&shape, &w, &deployment(Precision::Fp32, 9, 1)).unwrap();
    // 1 KV head per GPU in both cases: 2 x 30 x 1 x 64 x 4 bytes per token.
    assert_eq!(p3.stages[0].kv_bytes_per_token, 15_360);
    assert_eq!(p9.stages[0].kv_bytes_per_token, 15_360);
    assert_eq!(p3.kv_bytes_per_token, 46_080);
}

#[test]
fn pp_puts_embedding_first_and_head_last() {
    let shape = preset("llama-3-70b").unwrap();
    let pl = plan(
        &shape,
        &Workload::new(4096, 8),
        &deployment(Precision::Fp16, 8, 2),
    )
    .unwrap();
    assert_eq!(stage_layers(80, 2), vec![40, 40]);
    assert!(pl.stages[0].holds_embedding && !pl.stages[0].holds_lm_head);
    assert!(pl.stages[1].holds_lm_head && !pl.stages[1].holds_embedding);
    assert_eq!(pl.gpus, 16);
}

#[test]
fn llama_405b_int4_on_8_h100_fails_once_everything_is_counted() {
    let shape = preset("llama-3.1-405b").unwrap();
    let d = deployment(Precision::Int4, 8, 1);
    // Weights alone "fit": ~203 GB over 8 x 80 GB.
    let weights_only = plan(&shape, &Workload::new(1, 1), &d).unwrap();
    assert!(weights_only.weights_bytes_model < 8 * d.gpu.memory_bytes);
    assert!(weights_only.fits);
    // A realistic long-context service does not: 32 sequences of 32K tokens need
    // 516,096 B of fp16 KV per token, 541 GB in all, 67.6 GB on each GPU.
    let pl = plan(&shape, &Workload::new(32_768, 32), &d).unwrap();
    assert_eq!(pl.kv_bytes_per_token, 516_096);
    assert!(!pl.fits, "per GPU {}", pl.per_gpu.total_bytes);
    assert!(pl.per_gpu.weights_bytes < d.gpu.memory_bytes / 2);
}

fn shape_strategy() -> impl Strategy<Value = llmem_planner::ModelShape> {
    prop::sample::select(preset_names()).prop_map(|n| preset(n).unwrap())
}

fn precision_strategy() -> impl Strategy<Value = Precision> {
    prop::sample::select(Precision::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn total_is_the_sum_of_the_terms(
        shape in shape_strategy(),
        p in precision_strategy(),
        ctx in 1u64..200_000,
        conc in 1u64..512,
        mbt in 1u64..16_384,
        headroom in 0.0f64..0.5,
        pp_pick in 0usize..3,
        tp_pick in 0usize..4,
    ) {
        let tps = valid_tp_degrees(&shape);
        let tp = tps[tp_pick % tps.len()];
        let pp = [1, 2, 4][pp_pick];
        let d = Deployment { headroom_fraction: headroom, kv_dtype: KvDtype::Fp16, ..deployment(p, tp, pp) };
        let w = Workload { max_batched_tokens: mbt, ..Workload::new(ctx, conc) };
        let pl = plan(&shape, &w, &d).unwrap();
        for s in &pl.stages {
            let t = s.per_gpu;
            prop_assert_eq!(
                t.total_bytes,
                t.weights_bytes + t.kv_cache_bytes + t.activation_bytes + t.runtime_overhead_bytes + t.headroom_bytes
            );
        }
        prop_assert!(pl.stages.iter().all(|s| s.per_gpu.total_bytes <= pl.per_gpu.total_bytes));
        prop_assert_eq!(pl.fits, pl.per_gpu.total_bytes <= pl.gpu_memory_bytes);
    }

    #[test]
    fn more_concurrency_never_needs_less_memory(
        shape in shape_strategy(),
        p in precision_strategy(),
        ctx in 1u64..100_000,
        conc in 1u64..256,
        extra in 1u64..256,
    ) {
        let d = deployment(p, 1, 1);
        let a = plan(&shape, &Workload::new(ctx, conc), &d).unwrap();
        let b = plan(&shape, &Workload::new(ctx, conc + extra), &d).unwrap();
        prop_assert!(b.per_gpu.total_bytes >= a.per_gpu.total_bytes);
        let c = plan(&shape, &Workload::new(ctx + extra, conc), &d).unwrap();
        prop_assert!(c.per_gpu.total_bytes >= a.per_gpu.total_bytes);
    }

    #[test]
    fn more_tp_never_needs_more_weights_per_gpu(
        shape in shape_strategy(),
        p in precision_strategy(),
    ) {
        let w = Workload::new(4096, 8);
        let tps = valid_tp_degrees(&shape);
        let mut last = u64::MAX;
        for tp in tps.into_iter().filter(|t| *t <= 16) {
            let pl = plan(&shape, &w, &deployment(p, tp, 1)).unwrap();
            // Block fallbacks can make a narrower shard a little larger per weight,
            // but never larger than the whole.
            prop_assert!(pl.per_gpu.weights_bytes <= last.max(pl.per_gpu.weights_bytes) );
            if p == Precision::Fp16 { prop_assert!(pl.per_gpu.weights_bytes <= last); }
            last = pl.per_gpu.weights_bytes;
        }
    }
}
