//! Tensor and pipeline parallelism on CPU rank threads.
//!
//! Fast tier (tiny random models written here, even heads: 4 query / 2 KV heads, an
//! intermediate size and vocabulary that TP = 4 does not divide, biases on): every
//! TP/PP/vocab-parallel layout gives the single model's logits (within 1e-4 of their
//! scale) on prefill and greedy decode steps and the same greedy tokens through the
//! `Engine`; each rank's weight and KV bytes equal the planner's per-GPU figures; bad
//! degrees are refused naming the valid ones; a bad pass is an error, not a hang.
//!
//! Golden tier (SmolLM2-135M, f32, the reference prompts): TP = 3, PP = 2 and TP = 3 x
//! PP = 2 give TP = 1's greedy tokens and logits; the rank bytes at TP = 3 and TP = 9
//! (KV heads replicated) equal `llmem_planner::plan`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llmem_engine::cache::block_manager::{KvLayout, SeqId};
use llmem_engine::cache::paged::{KvDtype, PagedKvCache};
use llmem_engine::engine::runner::{ParallelRunner, Runner};
use llmem_engine::engine::scheduler::{ScheduledBatch, ScheduledSeq, StopConditions};
use llmem_engine::engine::{Engine, EngineConfig};
use llmem_engine::model::Model;
use llmem_engine::parallel::spec::ParallelSpec;
use llmem_engine::sample::sampler::{SamplingParams, SplitMix64};
use llmem_engine::weights::files::WeightFiles;
use llmem_engine::weights::quant::WeightFormat;
use llmem_planner::ModelShape;
use serde_json::json;

// ---- a tiny model with even heads ------------------------------------------------------

struct Tiny {
    tie: bool,
    bias: bool,
    seed: u64,
}

const HIDDEN: usize = 32;
const INTER: usize = 50; // 13/13/12/12 under TP = 4
const LAYERS: usize = 3; // PP = 2 -> [1, 2]
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const VOCAB: usize = 42; // 11/11/10/10 under vocab-parallel TP = 4

fn write_tiny(t: &Tiny) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("llmem-tp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = SplitMix64::new(t.seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| (offset + scale * (rng.next_f64() as f32 * 2.0 - 1.0)).to_le_bytes())
            .collect();
        tensors.push((name, shape, bytes));
    };
    let (h, q, kv) = (HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    add("model.embed_tokens.weight".into(), vec![VOCAB, h], 1.0, 0.0);
    add("model.norm.weight".into(), vec![h], 0.2, 1.0);
    if !t.tie {
        add("lm_head.weight".into(), vec![VOCAB, h], 0.3, 0.0);
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
        );
        for (name, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", INTER, h),
            ("mlp.up_proj", INTER, h),
            ("mlp.down_proj", h, INTER),
        ] {
            add(format!("{p}.{name}.weight"), vec![out, inp], 0.3, 0.0);
            if t.bias {
                add(format!("{p}.{name}.bias"), vec![out], 0.3, 0.0);
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": t.tie, "attention_bias": t.bias,
        "mlp_bias": t.bias, "hidden_act": "silu", "eos_token_id": 3,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn shape_of(dir: &Path) -> ModelShape {
    ModelShape::from_path(dir).unwrap()
}

fn spec(tp: usize, pp: usize, vocab_parallel: bool) -> ParallelSpec {
    ParallelSpec {
        tp,
        pp,
        vocab_parallel,
    }
}

// ---- driving a runner by hand ------------------------------------------------------------

/// One sequence through `runner`: a prefill of `prompt` (logits of every row), then
/// `steps` greedy decode steps. Returns the logits of every pass and the tokens chosen.
fn greedy_logits(
    runner: &mut Runner,
    prompt: &[u32],
    steps: usize,
    block_size: usize,
) -> (Vec<Vec<Vec<f32>>>, Vec<u32>) {
    let mut tokens = prompt.to_vec();
    let mut passes = Vec::new();
    let mut cached = 0;
    for step in 0..=steps {
        let feed = tokens[cached..].to_vec();
        let end = tokens.len();
        let batch = ScheduledBatch {
            seqs: vec![ScheduledSeq {
                seq: SeqId(0),
                tokens: feed.clone(),
                start_pos: cached,
                slots: (cached..end).collect(),
                block_table: (0..end.div_ceil(block_size) as u32).collect(),
                sample: true,
            }],
        };
        let meta = llmem_engine::engine::paged_metadata(&batch);
        let positions: Vec<u32> = (cached..end).map(|p| p as u32).collect();
        let rows: Vec<usize> = if step == 0 {
            (0..feed.len()).collect()
        } else {
            vec![feed.len() - 1]
        };
        let logits: Vec<Vec<f32>> = runner
            .forward_paged(&feed, &positions, &meta, &rows)
            .unwrap()
            .to_vec2()
            .unwrap();
        let last = logits.last().unwrap();
        let next = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        passes.push(logits);
        cached = end;
        tokens.push(next);
    }
    (passes, tokens[prompt.len()..].to_vec())
}

fn single_runner(dir: &Path, num_blocks: usize, block_size: usize) -> Runner {
    let model = Model::load_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let cache = PagedKvCache::new(model.shape(), num_blocks, block_size, KvDtype::F32).unwrap();
    Runner::Single {
        model: Box::new(model),
        cache,
        pass_heap: 0,
    }
}

fn parallel_runner(dir: &Path, s: ParallelSpec, num_blocks: usize, block_size: usize) -> Runner {
    let weights = Arc::new(WeightFiles::open_dir(dir).unwrap());
    Runner::Parallel(Box::new(
        ParallelRunner::new(
            &shape_of(dir),
            weights,
            WeightFormat::dense(DType::F32).unwrap(),
            s,
            num_blocks,
            block_size,
            KvDtype::F32,
        )
        .unwrap(),
    ))
}

/// max |a - b| over every logit, relative to the largest |b|.
fn relative_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    assert_eq!(a.len(), b.len());
    for (pa, pb) in a.iter().zip(b) {
        assert_eq!(pa.len(), pb.len());
        for (ra, rb) in pa.iter().zip(pb) {
            assert_eq!(ra.len(), rb.len());
            for (&x, &y) in ra.iter().zip(rb) {
                diff = diff.max((x as f64 - y as f64).abs());
                scale = scale.max((y as f64).abs());
            }
        }
    }
    diff / scale.max(1e-30)
}

const LAYOUTS: [(usize, usize, bool); 8] = [
    (2, 1, false),
    (4, 1, false),
    (2, 1, true),
    (4, 1, true),
    (1, 2, false),
    (1, 3, true),
    (2, 2, true),
    (4, 2, false),
];

#[test]
fn tiny_layouts_give_the_single_models_logits_and_tokens() {
    for tiny in [
        Tiny {
            tie: false,
            bias: true,
            seed: 11,
        },
        Tiny {
            tie: true,
            bias: false,
            seed: 12,
        },
    ] {
        let dir = write_tiny(&tiny);
        let prompt = [5u32, 17, 2, 39, 11, 0, 23, 8, 30, 41, 1];
        let (want, want_tokens) = greedy_logits(&mut single_runner(&dir, 8, 4), &prompt, 6, 4);
        for (tp, pp, vp) in LAYOUTS {
            let (got, tokens) = greedy_logits(
                &mut parallel_runner(&dir, spec(tp, pp, vp), 8, 4),
                &prompt,
                6,
                4,
            );
            let rel = relative_diff(&got, &want);
            assert!(
                rel <= 1e-4,
                "tie {} bias {}: TP {tp} PP {pp} vocab-parallel {vp}: relative diff {rel}",
                tiny.tie,
                tiny.bias
            );
            assert_eq!(tokens, want_tokens, "TP {tp} PP {pp} vocab-parallel {vp}");
        }
    }
}

/// Greedy tokens of every prompt, all requests in one engine.
fn engine_greedy(engine: &mut Engine, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let stop = StopConditions {
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    };
    let ids: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .add_request(p.clone(), SamplingParams::default(), stop.clone())
                .unwrap()
        })
        .collect();
    let mut out = HashMap::<_, Vec<u32>>::new();
    while engine.has_work() {
        for o in engine.step().unwrap() {
            out.entry(o.id).or_default().push(o.token);
        }
    }
    ids.iter().map(|id| out.remove(id).unwrap()).collect()
}

fn engine_config(
    num_blocks: usize,
    max_num_seqs: usize,
    max_batched_tokens: usize,
) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks,
        kv_dtype: KvDtype::F32,
        max_num_seqs,
        max_batched_tokens,
        max_model_len: 48,
        kv_layout: KvLayout::Paged,
    }
}

#[test]
fn engine_over_ranks_gives_every_request_the_single_models_tokens() {
    let dir = write_tiny(&Tiny {
        tie: false,
        bias: true,
        seed: 21,
    });
    let mut rng = SplitMix64::new(5);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..5 + 3 * i)
                .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
                .collect()
        })
        .collect();
    let model = Model::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    // Chunked prefill (8 tokens per pass) and a cache small enough to preempt.
    let config = engine_config(14, 6, 8);
    let want = engine_greedy(&mut Engine::new(model, config).unwrap(), &prompts, 10);
    for (tp, pp, vp) in [(2, 1, false), (4, 1, true), (2, 2, false), (1, 2, true)] {
        let weights = WeightFiles::open_dir(&dir).unwrap();
        let mut engine = Engine::new_parallel(
            &shape_of(&dir),
            weights,
            DType::F32,
            spec(tp, pp, vp),
            config,
        )
        .unwrap();
        let got = engine_greedy(&mut engine, &prompts, 10);
        assert_eq!(got, want, "TP {tp} PP {pp} vocab-parallel {vp}");
        assert!(engine.stats().preemptions > 0, "the test meant to preempt");
        let comm = engine.comm_stats();
        assert_eq!(comm.len(), tp * pp);
        if tp > 1 {
            // Two all-reduces per layer per pass (plus one for a vocab-parallel lookup).
            assert!(comm.iter().all(|c| c.all_reduce_count > 0), "{comm:?}");
        }
    }
}

/// Every rank's weights and KV bytes equal the planner's per-GPU figures.
fn assert_ranks_match_planner(engine: &Engine, what: &str) {
    let ranks = engine.rank_memory();
    let planned = engine.planned_rank_memory().unwrap();
    assert_eq!(ranks.len(), planned.len(), "{what}");
    for (m, p) in ranks.iter().zip(&planned) {
        assert_eq!(
            (m.weights_bytes, m.kv_cache_bytes),
            (p.weights_bytes, p.kv_cache_bytes),
            "{what}: stage {} rank {}",
            m.stage,
            m.tp_rank
        );
        assert!(m.kv_cache_bytes > 0 && m.weights_bytes > 0);
    }
}

#[test]
fn tiny_rank_bytes_equal_the_planner() {
    for tiny in [
        Tiny {
            tie: false,
            bias: true,
            seed: 31,
        },
        Tiny {
            tie: true,
            bias: false,
            seed: 32,
        },
    ] {
        let dir = write_tiny(&tiny);
        for (tp, pp, vp) in LAYOUTS.into_iter().chain([(1, 1, false)]) {
            let weights = WeightFiles::open_dir(&dir).unwrap();
            let engine = Engine::new_parallel(
                &shape_of(&dir),
                weights,
                DType::F32,
                spec(tp, pp, vp),
                engine_config(10, 4, 16),
            )
            .unwrap();
            assert_ranks_match_planner(
                &engine,
                &format!("tie {} TP {tp} PP {pp} vocab-parallel {vp}", tiny.tie),
            );
        }
    }
}

#[test]
fn uneven_shares_differ_by_rank_as_the_planner_says() {
    // TP = 4 with vocab-parallel: 50 intermediate rows and 42 vocabulary rows split
    // 13/13/12/12 and 11/11/10/10, so ranks 0-1 hold more than ranks 2-3.
    let dir = write_tiny(&Tiny {
        tie: false,
        bias: false,
        seed: 41,
    });
    let weights = WeightFiles::open_dir(&dir).unwrap();
    let engine = Engine::new_parallel(
        &shape_of(&dir),
        weights,
        DType::F32,
        spec(4, 1, true),
        engine_config(10, 4, 16),
    )
    .unwrap();
    let w: Vec<u64> = engine
        .rank_memory()
        .iter()
        .map(|m| m.weights_bytes)
        .collect();
    assert_eq!(w[0], w[1]);
    assert_eq!(w[2], w[3]);
    // Per layer: one intermediate row of gate and up, one column of down (3 x 32 x 4 B);
    // plus one vocabulary row of the embedding and of the untied head (2 x 32 x 4 B).
    assert_eq!(w[0] - w[2], (LAYERS * 3 * 32 * 4 + 2 * 32 * 4) as u64);
}

#[test]
fn bad_degrees_are_refused_naming_the_valid_ones() {
    let dir = write_tiny(&Tiny {
        tie: true,
        bias: false,
        seed: 51,
    });
    let shape = shape_of(&dir);
    let err = spec(3, 1, false).validate(&shape).unwrap_err().to_string();
    assert!(
        err.contains("--tp 3") && err.contains("valid TP degrees: 1, 2, 4"),
        "{err}"
    );
    let err = spec(1, 4, false).validate(&shape).unwrap_err().to_string();
    assert!(err.contains("--pp 4") && err.contains("3 layers"), "{err}");
    let weights = WeightFiles::open_dir(&dir).unwrap();
    let refused = Engine::new_parallel(
        &shape,
        weights,
        DType::F32,
        spec(3, 1, false),
        engine_config(10, 4, 16),
    );
    assert!(refused.is_err());

    // SmolLM2-135M: 9 query heads, 3 KV heads.
    let smol = llmem_planner::preset("smollm2-135m").unwrap();
    let err = spec(2, 1, false).validate(&smol).unwrap_err().to_string();
    assert!(
        err.contains("--tp 2") && err.contains("valid TP degrees: 1, 3, 9"),
        "{err}"
    );
    for tp in [1, 3, 9] {
        spec(tp, 2, false).validate(&smol).unwrap();
    }
}

#[test]
fn a_bad_pass_is_an_error_and_the_ranks_keep_serving() {
    let dir = write_tiny(&Tiny {
        tie: true,
        bias: false,
        seed: 61,
    });
    let mut runner = parallel_runner(&dir, spec(2, 2, true), 8, 4);
    let batch = |ids: Vec<u32>| {
        let n = ids.len();
        let b = ScheduledBatch {
            seqs: vec![ScheduledSeq {
                seq: SeqId(0),
                tokens: ids,
                start_pos: 0,
                slots: (0..n).collect(),
                block_table: (0..n.div_ceil(4) as u32).collect(),
                sample: true,
            }],
        };
        llmem_engine::engine::paged_metadata(&b)
    };
    // A token outside the vocabulary, then a sample row outside the batch.
    let meta = batch(vec![1, 2, 99]);
    let err = runner
        .forward_paged(&[1, 2, 99], &[0, 1, 2], &meta, &[2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("99") && err.contains("vocabulary"), "{err}");
    let meta = batch(vec![1, 2, 3]);
    assert!(runner
        .forward_paged(&[1, 2, 3], &[0, 1, 2], &meta, &[7])
        .is_err());
    // The group is still usable.
    let logits = runner
        .forward_paged(&[1, 2, 3], &[0, 1, 2], &meta, &[2])
        .unwrap();
    assert_eq!(logits.dims(), &[1, VOCAB]);
    let _: Tensor = logits;
}

// ---- SmolLM2-135M, f32 -----------------------------------------------------------------

fn smol_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LLMEM_MODEL_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = llmem_engine::weights::hub::cached_default_model_dir(None) {
        return Some(dir);
    }
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1") {
        eprintln!("SmolLM2 tests skipped: LLMEM_SKIP_GOLDEN=1 and no converted model");
        return None;
    }
    Some(
        llmem_engine::weights::hub::default_model_dir(None).unwrap_or_else(|e| {
            panic!("these tests need SmolLM2-135M-Instruct (or LLMEM_SKIP_GOLDEN=1): {e}")
        }),
    )
}

fn reference_prompts(count: usize) -> Vec<Vec<u32>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/smollm2_135m_instruct.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .take(count)
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// Three reference prompts of 12 tokens each at once, with room to spare.
fn smol_config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: 40,
        kv_dtype: KvDtype::F32,
        max_num_seqs: 3,
        max_batched_tokens: 512,
        max_model_len: 256,
        kv_layout: KvLayout::Paged,
    }
}

#[test]
fn smollm2_tp3_pp2_equal_tp1_tokens_logits_and_planner_bytes() {
    let Some(dir) = smol_dir() else { return };
    let shape = shape_of(&dir);
    let prompts = reference_prompts(3);
    let config = smol_config();
    let model = Model::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut single = Engine::new(model.clone(), config).unwrap();
    let want = engine_greedy(&mut single, &prompts, 12);
    let cache = PagedKvCache::new(model.shape(), 16, 16, KvDtype::F32).unwrap();
    let mut single_runner = Runner::Single {
        model: Box::new(model),
        cache,
        pass_heap: 0,
    };
    let (want_logits, _) = greedy_logits(&mut single_runner, &prompts[0], 2, 16);
    drop(single_runner);
    for (tp, pp) in [(3, 1), (1, 2), (3, 2)] {
        let s = spec(tp, pp, false);
        let weights = WeightFiles::open_dir(&dir).unwrap();
        let mut engine = Engine::new_parallel(&shape, weights, DType::F32, s, config).unwrap();
        assert_ranks_match_planner(&engine, &format!("SmolLM2 TP {tp} PP {pp}"));
        let got = engine_greedy(&mut engine, &prompts, 12);
        assert_eq!(
            got, want,
            "SmolLM2 TP {tp} PP {pp}: greedy tokens differ from TP 1"
        );
        drop(engine);
        let mut runner = parallel_runner(&dir, s, 16, 16);
        let (logits, _) = greedy_logits(&mut runner, &prompts[0], 2, 16);
        let rel = relative_diff(&logits, &want_logits);
        println!("SmolLM2 TP {tp} PP {pp}: logits relative diff {rel:.2e}");
        assert!(rel <= 1e-4, "SmolLM2 TP {tp} PP {pp}: relative diff {rel}");
    }
}

/// Block-quantized shards: TP 3, PP 2 and both at q8_0 and q4_k agree with TP 1 at the
/// same level ([`shards_agree_with_tp1`]; each rank quantizes its slices, on block
/// boundaries: the same blocks the unsharded model holds), and every rank holds the
/// planner's bytes.
#[test]
fn smollm2_quantized_shards_equal_tp1_at_the_same_level() {
    let Some(dir) = smol_dir() else { return };
    for precision in [
        llmem_planner::Precision::Q8_0,
        llmem_planner::Precision::Q4K,
    ] {
        let fmt = WeightFormat::new(precision).unwrap();
        let model = Model::load_dir_with(&dir, &fmt, &Device::Cpu).unwrap();
        let open = || (shape_of(&dir), WeightFiles::open_dir(&dir).unwrap());
        let layouts = [(3, 1, false), (1, 2, false), (3, 2, false), (3, 1, true)];
        shards_agree_with_tp1(model, &fmt, &open, &format!("{precision}"), &layouts);
    }
}

/// The default model's shipped GGUF (Q4_1, with q8_0/q6_K tensors where llama.cpp put
/// them), when cached.
fn smol_gguf() -> Option<PathBuf> {
    smol_dir()?;
    let root = llmem_engine::weights::hub::cache_root().ok()?;
    let path = llmem_engine::weights::hub::default_gguf_path(&root);
    if !path.is_file() {
        eprintln!("skipped: {} is not cached", path.display());
        return None;
    }
    Some(path)
}

#[test]
fn smollm2_native_gguf_shards_agree_with_tp1_and_hold_the_planned_bytes() {
    let Some(path) = smol_gguf() else { return };
    native_gguf_shards_agree_with_tp1(&path, "Q4_1");
}

/// Rewrite the GGUF at `src` into `dst` with every matrix requantized to `ty_of(name,
/// cols)` (rows kept in the file's order; norms stay f32), as llama-quantize would.
fn requantized_gguf(
    src: &Path,
    dst: &Path,
    ty_of: &dyn Fn(&str, usize) -> candle_core::quantized::GgmlDType,
) {
    use candle_core::quantized::{gguf_file, QTensor};
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let t = q.dequantize(&Device::Cpu).unwrap();
            let out = match t.dims() {
                [_, cols] => QTensor::quantize(&t, ty_of(name, *cols)).unwrap(),
                _ => q,
            };
            (name.clone(), out)
        })
        .collect();
    let meta: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &meta, &refs).unwrap();
}

/// The same check on the default model requantized to Q8_0, and to a Q4_K_M-like mix
/// (q4_K where a row holds whole 256-value blocks, that is `down_proj`; q8_0 for
/// `attn_v`, the embedding and `down_proj`'s fallback; q5_0 elsewhere).
#[test]
fn smollm2_native_q8_0_and_k_mix_gguf_shards_agree_with_tp1() {
    use candle_core::quantized::GgmlDType;
    let Some(path) = smol_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("smol-q8_0.gguf");
    requantized_gguf(&path, &q8, &|_, _| GgmlDType::Q8_0);
    native_gguf_shards_agree_with_tp1(&q8, "Q8_0");
    let mix = dir.path().join("smol-k-mix.gguf");
    requantized_gguf(&path, &mix, &|name, cols| {
        if cols % 256 == 0 {
            GgmlDType::Q4K
        } else if name.contains("attn_v") || name.contains("token_embd") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q5_0
        }
    });
    native_gguf_shards_agree_with_tp1(&mix, "Q4_K mix");
}

/// A GGUF run as stored, split natively: every rank reads its slices in their stored
/// types, and TP 3, PP 2 and both agree with TP 1 ([`shards_agree_with_tp1`]).
fn native_gguf_shards_agree_with_tp1(path: &Path, label: &str) {
    use llmem_engine::weights::source::GgufModel;
    let (model, _) = Model::load_gguf(path, None, &Device::Cpu).unwrap();
    let fmt = *model.weight_format();
    assert!(fmt.as_stored);
    let layouts = [(3, 1, false), (1, 2, false), (3, 2, true)];
    let open = || {
        let g = GgufModel::open(path).unwrap();
        (g.shape, g.weights)
    };
    shards_agree_with_tp1(
        model,
        &fmt,
        &open,
        &format!("{label} GGUF as stored"),
        &layouts,
    );
}

/// The grid of `layouts` against TP 1 (`model`), teacher-forced: fed the reference
/// prompts followed by TP 1's greedy continuation, every rank holds the planner's bytes,
/// the logits stay within 10% of the largest, and the grid's top-1 at every continued
/// position equals TP 1's except at a near-tie: where TP 1's own logits put the grid's
/// choice within 2% of the largest logit of its best (the flips measured 0.04-0.5%). Greedy tokens alone cannot be held
/// equal: row-parallel partial sums add in another order, and a last-bit change in an
/// activation can flip its rounding when the next layer quantizes it to 8 bits, which
/// compounds over 30 layers (measured 3.6% on the shipped file; shards of `--dtype q8_0`
/// from the same file measure the same 3.7%, while f32 shards agree to 1e-4), so a
/// change of rounding anywhere (an attention kernel's order of sums, say) moves which
/// near-tie flips.
fn shards_agree_with_tp1(
    model: Model,
    fmt: &WeightFormat,
    open: &dyn Fn() -> (llmem_planner::ModelShape, WeightFiles),
    label: &str,
    layouts: &[(usize, usize, bool)],
) {
    let prompts = reference_prompts(3);
    let config = smol_config();
    let mut single = Engine::new(model.clone(), config).unwrap();
    let greedy = engine_greedy(&mut single, &prompts, 12);
    drop(single);
    // Each prompt followed by TP 1's continuation, and TP 1's logits at every position.
    let fed: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&greedy)
        .map(|(p, g)| p.iter().chain(g).copied().collect())
        .collect();
    let cache = PagedKvCache::new(model.shape(), 16, 16, KvDtype::F32).unwrap();
    let mut single_runner = Runner::Single {
        model: Box::new(model),
        cache,
        pass_heap: 0,
    };
    let want: Vec<_> = fed
        .iter()
        .map(|f| greedy_logits(&mut single_runner, f, 0, 16).0)
        .collect();
    drop(single_runner);
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    for &(tp, pp, vp) in layouts {
        let what = format!("SmolLM2 {label}, TP {tp} PP {pp} vocab-parallel {vp}");
        let (shape, weights) = open();
        let engine =
            Engine::new_parallel_with(&shape, weights, fmt, spec(tp, pp, vp), config).unwrap();
        assert_ranks_match_planner(&engine, &what);
        drop(engine);
        let (shape, weights) = open();
        let mut runner = Runner::Parallel(Box::new(
            ParallelRunner::new(
                &shape,
                Arc::new(weights),
                *fmt,
                spec(tp, pp, vp),
                16,
                16,
                KvDtype::F32,
            )
            .unwrap(),
        ));
        let (mut agree, mut positions, mut rel) = (0, 0, 0f64);
        for ((f, p), w) in fed.iter().zip(&prompts).zip(&want) {
            let got = greedy_logits(&mut runner, f, 0, 16).0;
            rel = rel.max(relative_diff(&got, w));
            for pos in p.len() - 1..f.len() - 1 {
                let (row, mine) = (&w[0][pos], argmax(&got[0][pos]));
                let best = argmax(row);
                positions += 1;
                if mine == best {
                    agree += 1;
                    continue;
                }
                let largest = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let margin = (row[best] - row[mine]) / largest;
                println!("{what}: position {pos} picks {mine}, TP 1 {best}: margin {margin:.4}");
                assert!(
                    margin <= 0.02,
                    "{what}: at position {pos} the grid picks {mine} where TP 1 picks {best}, \
                     {margin:.4} of the largest logit below it (not a near-tie)"
                );
            }
        }
        println!(
            "{what}: teacher-forced top-1 {agree}/{positions}, logits relative diff {rel:.2e}"
        );
        assert!(rel < 0.1, "{what}: logits relative diff {rel}");
    }
}

#[test]
fn smollm2_rank_bytes_equal_the_planner_at_tp3_and_tp9() {
    let Some(dir) = smol_dir() else { return };
    let shape = shape_of(&dir);
    let config = EngineConfig {
        block_size: 16,
        num_blocks: 8,
        kv_dtype: KvDtype::F32,
        max_num_seqs: 2,
        max_batched_tokens: 64,
        max_model_len: 64,
        kv_layout: KvLayout::Paged,
    };
    for (tp, vp) in [(3, false), (9, false), (3, true)] {
        let weights = WeightFiles::open_dir(&dir).unwrap();
        let engine =
            Engine::new_parallel(&shape, weights, DType::F32, spec(tp, 1, vp), config).unwrap();
        assert_ranks_match_planner(&engine, &format!("SmolLM2 TP {tp} vocab-parallel {vp}"));
        // TP 9 > 3 KV heads: each rank keeps one whole KV head, as TP 3 does.
        let kv: Vec<u64> = engine
            .rank_memory()
            .iter()
            .map(|m| m.kv_cache_bytes)
            .collect();
        assert!(kv.iter().all(|&b| b == 8 * 16 * 2 * 30 * 64 * 4), "{kv:?}");
    }
}

/// Every rank sized from its budget: its weights and its stage's activations are the
/// planner's (`llmem plan --tp 3 --pp 2`) for the same deployment, its blocks what is
/// left of its budget, and the grid takes the fewest; a budget one byte short of one
/// sequence on the tightest rank is refused naming that rank.
#[test]
fn every_rank_is_sized_from_its_budget_as_the_planner_sizes_a_gpu() {
    let shape = llmem_planner::preset("smollm2-135m").unwrap();
    let config = EngineConfig {
        block_size: 16,
        num_blocks: 0,
        kv_dtype: KvDtype::F16,
        max_num_seqs: 8,
        max_batched_tokens: 512,
        max_model_len: 1024,
        kv_layout: KvLayout::Paged,
    };
    let budget = 300u64 << 20;
    for precision in [
        llmem_planner::Precision::Fp32,
        llmem_planner::Precision::Q8_0,
    ] {
        let fmt = WeightFormat::new(precision).unwrap();
        let s = spec(3, 2, false);
        let pb =
            llmem_engine::engine::parallel_budget(&shape, &fmt, None, s, &config, budget, 1 << 20)
                .unwrap();
        let mut d = llmem_planner::Deployment::new(precision, llmem_planner::custom_gpu(budget));
        d.tp = 3;
        d.pp = 2;
        d.kv_dtype = llmem_planner::KvDtype::Fp16;
        d.activation_bytes = Some(4);
        let mut w = llmem_planner::Workload::new(1024, 8);
        w.max_batched_tokens = 512;
        let plan = llmem_planner::plan(&shape, &w, &d).unwrap();
        assert_eq!(pb.ranks.len(), 6);
        for r in &pb.ranks {
            let stage = &plan.stages[r.stage];
            assert_eq!(
                r.weights_bytes, stage.rank_weights_bytes[r.tp_rank],
                "{r:?}"
            );
            if r.tp_rank == 0 {
                assert_eq!(r.activation_bytes, stage.per_gpu.activation_bytes, "{r:?}");
            }
            // The planner's KV bytes per token of this stage's GPU, per block.
            assert_eq!(r.block_bytes, stage.kv_bytes_per_token * 16, "{r:?}");
            let fixed = r.weights_bytes + r.activation_bytes + (1 << 20);
            assert_eq!(r.blocks_fit, (budget - fixed) / r.block_bytes, "{r:?}");
        }
        let fewest = pb.ranks.iter().map(|r| r.blocks_fit).min().unwrap();
        assert_eq!(pb.num_blocks as u64, fewest);
        // One byte short of one 1024-token sequence (64 blocks) on the tightest rank.
        let tight = pb.ranks.iter().min_by_key(|r| r.blocks_fit).unwrap();
        let short =
            tight.weights_bytes + tight.activation_bytes + (1 << 20) + 64 * tight.block_bytes - 1;
        let err =
            llmem_engine::engine::parallel_budget(&shape, &fmt, None, s, &config, short, 1 << 20)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(&format!(
                "1 B short on stage {} TP rank {}",
                tight.stage, tight.tp_rank
            )),
            "{precision}: {err}"
        );
    }
}

/// Pipeline micro-batching: PP 2 and TP 2 x PP 2 cut every pass into 1 to 6
/// micro-batches of whole sequences (chunked prefill, decode, preemption) and give every
/// request the single model's tokens; a bad micro-batch is an error, its queued
/// neighbours are drained, and the grid keeps serving.
#[test]
fn micro_batches_keep_the_tokens_and_the_grid() {
    let dir = write_tiny(&Tiny {
        tie: false,
        bias: true,
        seed: 23,
    });
    let mut rng = SplitMix64::new(9);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..4 + 2 * i)
                .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
                .collect()
        })
        .collect();
    let model = Model::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let config = engine_config(14, 6, 16);
    let want = engine_greedy(&mut Engine::new(model, config).unwrap(), &prompts, 10);
    for (tp, pp) in [(1, 2), (2, 2), (1, 3)] {
        for mb in [1, 2, 3, 6] {
            let weights = WeightFiles::open_dir(&dir).unwrap();
            let mut engine = Engine::new_parallel(
                &shape_of(&dir),
                weights,
                DType::F32,
                spec(tp, pp, false),
                config,
            )
            .unwrap();
            engine.set_micro_batches(mb).unwrap();
            assert_eq!(engine.micro_batches(), mb);
            let got = engine_greedy(&mut engine, &prompts, 10);
            assert_eq!(got, want, "TP {tp} PP {pp} micro-batches {mb}");
        }
    }

    // Two sequences in two micro-batches, the second with a token outside the vocabulary.
    let mut runner = parallel_runner(&dir, spec(1, 2, false), 8, 4);
    if let Runner::Parallel(p) = &mut runner {
        p.set_micro_batches(2).unwrap();
        assert!(p.set_micro_batches(0).is_err());
    }
    let two = |second: u32| {
        let b = ScheduledBatch {
            seqs: vec![
                ScheduledSeq {
                    seq: SeqId(0),
                    tokens: vec![1, 2, 3],
                    start_pos: 0,
                    slots: vec![0, 1, 2],
                    block_table: vec![0],
                    sample: true,
                },
                ScheduledSeq {
                    seq: SeqId(1),
                    tokens: vec![4, second],
                    start_pos: 0,
                    slots: vec![4, 5],
                    block_table: vec![1],
                    sample: true,
                },
            ],
        };
        llmem_engine::engine::paged_metadata(&b)
    };
    let Runner::Parallel(p) = &mut runner else {
        unreachable!()
    };
    let err = p
        .forward_paged(&[1, 2, 3, 4, 99], &[0, 1, 2, 0, 1], &two(99), &[2, 4])
        .unwrap_err()
        .to_string();
    assert!(err.contains("99"), "{err}");
    let logits = p
        .forward_paged(&[1, 2, 3, 4, 5], &[0, 1, 2, 0, 1], &two(5), &[2, 4])
        .unwrap();
    assert_eq!(logits.dims(), &[2, VOCAB]);
    // The same two rows as one micro-batch.
    p.set_micro_batches(1).unwrap();
    let whole = p
        .forward_paged(&[1, 2, 3, 4, 5], &[0, 1, 2, 0, 1], &two(5), &[2, 4])
        .unwrap();
    let diff = (logits - whole).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}
