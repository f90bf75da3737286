//! The `llmem` binary as scripts see it: JSON contracts, exit codes, error messages.
//! Planner commands need no model download.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

fn llmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmem"))
        .args(args)
        .output()
        .expect("run llmem")
}

fn json(args: &[&str]) -> Value {
    let out = llmem(args);
    assert!(
        out.status.success(),
        "llmem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON on stdout")
}

fn fails(args: &[&str]) -> String {
    let out = llmem(args);
    assert_eq!(out.status.code(), Some(2), "llmem {args:?} should exit 2");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn plan_json_contract_on_the_lesson_question() {
    let v = json(&[
        "plan",
        "--model",
        "llama-3-70b",
        "--precision",
        "fp16",
        "--context",
        "4096",
        "--concurrency",
        "32",
        "--format",
        "json",
    ]);
    assert_eq!(v["model"]["params_total"], 70_553_706_496u64);
    for key in ["embedding", "layers", "per_layer", "lm_head", "norms"] {
        assert!(v["model"]["params"][key].is_u64(), "model.params.{key}");
    }
    assert_eq!(v["kv_bytes_per_token"], 327_680);
    let per_gpu = &v["per_gpu"];
    let terms = [
        "weights_bytes",
        "kv_cache_bytes",
        "activation_bytes",
        "runtime_overhead_bytes",
        "headroom_bytes",
    ];
    let sum: u64 = terms.iter().map(|k| per_gpu[k].as_u64().unwrap()).sum();
    assert_eq!(per_gpu["total_bytes"].as_u64().unwrap(), sum);
    assert_eq!(per_gpu["weights_bytes"], 141_107_412_992u64);
    assert_eq!(per_gpu["kv_cache_bytes"], 42_949_672_960u64);
    assert_eq!(v["gpus"], 1);
    assert_eq!(v["gpu_memory_bytes"], 85_520_809_984u64);
    assert_eq!(v["fits"], false);
    assert!(v["total_bytes"].is_u64());
    assert!(v["assumptions"].as_array().unwrap().len() >= 3);
}

/// `--activation-bytes 4` plans what the CPU engine computes in: `llmem bench` on a
/// q8_0 model reserves exactly the planner's activations for the same pass.
#[test]
fn plan_activation_bytes_match_the_cpu_engine() {
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--model",
            "smollm2-135m",
            "--precision",
            "q8_0",
            "--context",
            "512",
            "--concurrency",
            "4",
            "--max-batched-tokens",
            "512",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        json(&args)["per_gpu"]["activation_bytes"].as_u64().unwrap()
    };
    let (two, four) = (plan(&[]), plan(&["--activation-bytes", "4"]));
    assert!(four > two, "{four} vs {two}");
    let v = json(&[
        "bench",
        "--random-weights",
        "smollm2-135m",
        "--dtype",
        "q8_0",
        "--concurrency",
        "4",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--max-model-len",
        "512",
        "--max-batched-tokens",
        "512",
        "--memory-budget",
        "1GiB",
        "--format",
        "json",
    ]);
    assert_eq!(v["budget"]["activation_bytes"], four, "{}", v["budget"]);
    assert_eq!(v["budget"]["planned"]["activation_bytes"], four);
    let err = fails(&["plan", "--model", "smollm2-135m", "--activation-bytes", "8"]);
    assert!(err.contains("--activation-bytes"), "{err}");
}

#[test]
fn plan_tp4_fits_and_fit_search_agrees() {
    let v = json(&[
        "plan",
        "--model",
        "llama-3-70b",
        "--context",
        "4096",
        "--concurrency",
        "32",
        "--tp",
        "4",
        "--format",
        "json",
    ]);
    assert_eq!(v["fits"], true);
    assert_eq!(v["gpus"], 4);
    let v = json(&[
        "plan",
        "--model",
        "llama-3-70b",
        "--context",
        "4096",
        "--concurrency",
        "32",
        "--fit",
        "--min-precision",
        "fp16",
        "--format",
        "json",
    ]);
    assert_eq!(v["fit"]["best"]["gpus"], 4);
    assert_eq!(v["fit"]["best"]["deployment"]["tp"], 4);
}

#[test]
fn explain_answers_the_lesson_question() {
    let out = llmem(&[
        "plan",
        "--model",
        "llama-3-70b",
        "--precision",
        "fp16",
        "--context",
        "4096",
        "--concurrency",
        "32",
        "--explain",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "327,680 B",
        "42,949,672,960 B (40.00 GiB)",
        "141,107,412,992 B",
        "4 x h100-80gb with TP 4",
        "total_gpu_memory >= weights + kv_cache + activations + runtime_overhead + headroom",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn explain_shows_the_405b_int4_trap() {
    let out = llmem(&[
        "plan",
        "--model",
        "llama-3.1-405b",
        "--precision",
        "int4",
        "--tp",
        "8",
        "--context",
        "32768",
        "--concurrency",
        "32",
        "--explain",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("The trap: the weights alone fit"), "{text}");
    assert!(text.contains("DOES NOT FIT"), "{text}");
}

#[test]
fn levers_solve_markdown_and_catalog() {
    let v = json(&[
        "plan",
        "--model",
        "llama-3-8b",
        "--gpu",
        "l4-24gb",
        "--context",
        "8192",
        "--concurrency",
        "4",
        "--levers",
        "--solve",
        "concurrency",
        "--format",
        "json",
    ]);
    let levers = v["levers"].as_array().unwrap();
    assert_eq!(levers.len(), 6);
    assert!(levers
        .iter()
        .all(|l| l["delta_bytes"].as_i64().unwrap() <= 0));
    assert!(v["solve"]["max_concurrency"].as_u64().unwrap() >= 1);
    let md = llmem(&["plan", "--model", "llama-3-8b", "--format", "markdown"]);
    assert!(String::from_utf8_lossy(&md.stdout).contains("| weights |"));
    let gpus = json(&["plan", "--list-gpus", "--format", "json"]);
    assert_eq!(gpus.as_array().unwrap().len(), 10);
}

#[test]
fn inspect_json_counts() {
    let v = json(&["inspect", "smollm2-135m", "--format", "json"]);
    assert_eq!(v["params_total"], 134_515_008);
    assert_eq!(v["params"]["lm_head"], 0);
}

#[test]
fn bad_input_exits_2_with_a_named_problem() {
    assert!(fails(&["plan", "--model", "smollm2-135m", "--tp", "2"])
        .contains("valid TP degrees: 1, 3, 9"));
    assert!(fails(&["plan", "--model", "no-such-model"]).contains("smollm2-135m"));
    assert!(fails(&["plan", "--gpu", "b200"]).contains("h100-80gb"));
    assert!(fails(&["plan", "--precision", "int3"]).contains("q4_k"));
    assert!(fails(&["plan", "--kv-dtype", "int2"]).contains("fp16"));
    assert!(fails(&["plan", "--context", "0"]).contains("positive"));
    assert!(fails(&["plan", "--concurrency", "-3"]).contains("positive"));
    assert!(fails(&["plan", "--gpu-memory", "80XB"]).contains("byte size"));
    assert!(fails(&["plan", "--headroom", "1.5"]).contains("fraction"));
    assert!(fails(&["plan", "--pp", "31"]).contains("30 layers"));
    assert!(fails(&["plan", "--gpus", "3", "--tp", "3", "--pp", "2"]).contains("multiple"));
    let dir = std::env::temp_dir().join(format!("llmem-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, r#"{"architectures": ["BertModel"]}"#).unwrap();
    let err = fails(&["plan", "--model", cfg.to_str().unwrap()]);
    assert!(
        err.contains("config.json") && err.contains("BertModel"),
        "{err}"
    );
}

#[test]
fn bench_rejects_bad_arguments_before_loading_a_model() {
    assert!(fails(&["bench", "--concurrency", "1,0"]).contains("positive"));
    assert!(fails(&["bench", "--kv-dtype", "int2"]).contains("bf16"));
    assert!(fails(&["bench", "--kv-blocks", "4", "--memory-budget", "1GiB"]).contains("cannot"));
    for f in ["0", "1.5", "-0.2"] {
        let err = fails(&["bench", "--memory-utilization", f]);
        assert!(err.contains("above 0 and at most 1"), "{err}");
    }
    for other in [["--kv-blocks", "4"], ["--memory-budget", "1GiB"]] {
        let err = fails(&["bench", "--memory-utilization", "0.5", other[0], other[1]]);
        assert!(err.contains("cannot"), "{err}");
    }
    assert!(fails(&["bench", "--kv-layout", "paged,flat"]).contains("contiguous"));
}

/// The default model is cached, or fetched into the cache now (as `llmem` does on first
/// use); false only when it is missing and `LLMEM_SKIP_GOLDEN=1` asks to skip such tests.
fn default_model_available() -> bool {
    if llmem_engine::weights::hub::cached_default_model_dir(None).is_some() {
        return true;
    }
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1") {
        eprintln!("skipped: LLMEM_SKIP_GOLDEN=1 and smollm2-135m is not cached");
        return false;
    }
    if let Err(e) = llmem_engine::weights::hub::default_model_dir(None) {
        panic!("smollm2-135m is not cached and could not be fetched: {e}");
    }
    true
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn bench_runs_both_kv_layouts_side_by_side() {
    if !default_model_available() {
        return;
    }
    // 16 blocks of 4; max_model_len 32: contiguous reserves 8 blocks per sequence (2 fit),
    // while paged sequences of 8 + 4 tokens take 3 blocks each (all 4 fit).
    let args = [
        "bench",
        "--concurrency",
        "4",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--block-size",
        "4",
        "--max-model-len",
        "32",
        "--kv-blocks",
        "16",
        "--kv-layout",
        "paged,contiguous",
        "--format",
        "json",
    ];
    let out = llmem(&args);
    assert!(out.status.success());
    // The start-up budget goes to stderr, keeping stdout JSON.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("16 blocks") && err.contains("fit at once: 2"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let (paged, contiguous) = (&runs[0], &runs[1]);
    assert_eq!(paged["kv_layout"], "paged");
    assert_eq!(contiguous["kv_layout"], "contiguous");
    assert_eq!(paged["peak_running_sequences"], 4);
    assert_eq!(contiguous["peak_running_sequences"], 2);
    assert_eq!(paged["generated_tokens"], contiguous["generated_tokens"]);
    let waste = |r: &Value| r["kv_waste_fraction"].as_f64().unwrap();
    assert!(waste(contiguous) > waste(paged));
    assert_eq!(contiguous["preemptions"], 0);
}

/// Needs the default model (fetched into the cache when missing). Mixed lengths (prompts
/// of 1..=15 tokens, 1..=7 generated): the paged layout holds all 8 sequences in 48
/// blocks of 4 while the contiguous one reserves max_model_len = 64 tokens (16 blocks)
/// per sequence, so 3 fit; both generate the same drawn number of tokens.
#[test]
fn bench_mixed_lengths_paged_against_contiguous() {
    if !default_model_available() {
        return;
    }
    let v = json(&[
        "bench",
        "--concurrency",
        "8",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--mixed-lengths",
        "--block-size",
        "4",
        "--max-model-len",
        "64",
        "--kv-blocks",
        "48",
        "--kv-layout",
        "paged,contiguous",
        "--format",
        "json",
    ]);
    assert_eq!(v["mixed_lengths"], true);
    let runs = v["runs"].as_array().unwrap();
    let (paged, contiguous) = (&runs[0], &runs[1]);
    assert_eq!(paged["peak_running_sequences"], 8);
    assert_eq!(contiguous["peak_running_sequences"], 3);
    let generated = paged["generated_tokens"].as_u64().unwrap();
    assert_eq!(generated, contiguous["generated_tokens"].as_u64().unwrap());
    // Drawn lengths, not 8 x 4 (the chance that 8 draws from 1..=7 sum to 32 is small
    // but not zero: the seed is fixed, so this checks the draw happened at all).
    assert!((8..=56).contains(&generated), "{generated}");
    assert_ne!(generated, 32, "lengths were not drawn");
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn bench_json_contract_with_forced_preemption() {
    if !default_model_available() {
        return;
    }
    // Two sequences of 8 + 3 tokens need 3 blocks of 4 each; 4 blocks force preemption.
    let v = json(&[
        "bench",
        "--concurrency",
        "1,2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--block-size",
        "4",
        "--kv-blocks",
        "4",
        "--format",
        "json",
    ]);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, c) in runs.iter().zip([1, 2]) {
        assert_eq!(run["concurrency"], c);
        assert_eq!(run["kv_layout"], "paged");
        assert_eq!(run["kv_blocks_total"], 4);
        assert_eq!(run["generated_tokens"], 4 * c);
        for key in [
            "aggregate_tokens_per_s",
            "kv_waste_fraction",
            "prefix_cache_hit_rate",
        ] {
            assert!(run[key].as_f64().is_some(), "{key}");
        }
        for key in ["ttft_ms", "itl_ms"] {
            assert!(run[key]["p50"].as_f64().unwrap() <= run[key]["p99"].as_f64().unwrap());
        }
        assert!(run["peak_kv_blocks_used"].as_u64().unwrap() <= 4);
        // Measured per component by the counting allocator the binary installs.
        let m = &run["memory_per_rank"][0];
        assert_eq!(m["kv_cache_heap_bytes"], m["kv_cache_bytes"], "{m}");
        let (w, wh) = (
            m["weights_bytes"].as_u64().unwrap(),
            m["weights_heap_bytes"].as_u64().unwrap(),
        );
        assert!(wh >= w && wh - w < 512 * 1024, "{m}");
        assert!(
            m["activation_peak_measured_bytes"].as_u64().unwrap() > 0,
            "{m}"
        );
        assert!(
            m["activation_peak_estimate_bytes"].as_u64().unwrap() > 0,
            "{m}"
        );
    }
    assert_eq!(runs[0]["preemptions"], 0);
    assert!(runs[1]["preemptions"].as_u64().unwrap() > 0);
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn generate_refuses_tp2_on_smollm2_naming_the_valid_degrees() {
    if !default_model_available() {
        return;
    }
    let err = fails(&["generate", "--prompt", "Hi", "--tp", "2"]);
    assert!(
        err.contains("--tp 2") && err.contains("valid TP degrees: 1, 3, 9"),
        "{err}"
    );
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn generate_tp3_pp2_prints_the_split_and_equals_tp1() {
    if !default_model_available() {
        return;
    }
    let base = [
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--format",
        "json",
    ];
    // The ranks shard the f32 conversion; one rank runs the shipped Q4_1 GGUF unless
    // --dtype asks for f32.
    let single_args: Vec<&str> = base.iter().copied().chain(["--dtype", "f32"]).collect();
    let single = json(&single_args);
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--tp", "3", "--pp", "2"])
        .collect();
    let out = llmem(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stage 0: layers 0-14 (+ embedding); stage 1: layers 15-29 (+ LM head)"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"], single["token_ids"]);
    assert_eq!(v["text"], single["text"]);
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 6);
    // Stage 0 holds the embedding, stage 1 a copy of it as the tied LM head plus the
    // final norm: 15 layers each, so stage 1 is the final norm's 576 x 4 B heavier.
    let w = |i: usize| ranks[i]["weights_bytes"].as_u64().unwrap();
    assert_eq!(w(3) - w(0), 576 * 4);
    // Quantized shards: TP 3 at q8_0 (each rank quantizes its slices) generates what PP 2
    // at q8_0 (whole matrices, the same paged engine) does. (The one-rank `generate` runs
    // the contiguous cache, whose different float order moves q8_0's byte-quantized
    // activations enough to flip a near tie on this prompt: not a fair reference.)
    let q8: Vec<&str> = base.iter().copied().chain(["--dtype", "q8_0"]).collect();
    let whole: Vec<&str> = q8.iter().copied().chain(["--pp", "2"]).collect();
    let whole = json(&whole);
    let sharded: Vec<&str> = q8.iter().copied().chain(["--tp", "3"]).collect();
    let v = json(&sharded);
    assert_eq!(v["token_ids"], whole["token_ids"]);
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    for r in ranks {
        assert_eq!(r["weights_bytes"], r["planned"]["weights_bytes"], "{r}");
    }
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn bench_tp3_reports_the_collective_share() {
    if !default_model_available() {
        return;
    }
    let v = json(&[
        "bench",
        "--concurrency",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "3",
        "--tp",
        "3",
        "--format",
        "json",
    ]);
    let run = &v["runs"][0];
    assert_eq!(run["tp"], 3);
    // Every rank's shard measured on its own: a third of the layers' matrices each, the
    // embedding and head replicated; the KV buffers to the byte.
    let ranks = run["memory_per_rank"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    for m in ranks {
        let (w, wh) = (
            m["weights_bytes"].as_u64().unwrap(),
            m["weights_heap_bytes"].as_u64().unwrap(),
        );
        assert!(wh >= w && wh - w < 512 * 1024, "{m}");
        assert_eq!(m["kv_cache_heap_bytes"], m["kv_cache_bytes"], "{m}");
        assert!(
            m["activation_peak_measured_bytes"].as_u64().unwrap() > 0,
            "{m}"
        );
    }
    assert!(run["all_reduce_count"].as_u64().unwrap() > 0);
    let share = run["comm_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{share}");
    // A budget per rank: each rank's planner weights, activations and overhead come off
    // its own; the shared blocks are the fewest any rank fits.
    let v = json(&[
        "bench",
        "--concurrency",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--tp",
        "3",
        "--memory-budget",
        "400MiB",
        "--max-model-len",
        "1024",
        "--format",
        "json",
    ]);
    let pb = &v["budget_per_rank"];
    let ranks = pb["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    let budget = 400u64 << 20;
    let blocks = pb["num_blocks"].as_u64().unwrap();
    for (r, m) in ranks
        .iter()
        .zip(v["runs"][0]["memory_per_rank"].as_array().unwrap())
    {
        let n = |k: &str| r[k].as_u64().unwrap();
        assert_eq!(
            n("blocks_fit"),
            (budget - n("weights_bytes") - n("activation_bytes")) / n("block_bytes"),
            "{r}"
        );
        assert!(blocks <= n("blocks_fit"), "{r}");
        // What the rank holds is what its share of the budget said.
        assert_eq!(m["weights_bytes"], r["weights_bytes"], "{m}");
        assert_eq!(
            m["kv_cache_bytes"].as_u64().unwrap(),
            blocks * n("block_bytes"),
            "{m}"
        );
    }
    assert_eq!(v["runs"][0]["kv_blocks_total"], blocks);
    let err = fails(&["bench", "--tp", "3", "--memory-budget", "200MiB"]);
    assert!(err.contains("short on stage 0 TP rank 0"), "{err}");
}

/// Per-rank JSON at TP 2 and PP 2: random weights of SmolLM2's widths with 8 query and 4
/// KV heads (its own 9 and 3 do not split in 2) and 2 layers. Every rank's heap holds its
/// planned weights (to a few KiB of bookkeeping) and its KV to the byte, and the measured
/// peak of a 256-token prefill is within 5% of the planner's activation formula.
#[test]
fn bench_reports_every_rank_at_tp2_and_pp2_beside_the_plan() {
    let dir = std::env::temp_dir().join(format!("llmem-even-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 49152,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "hidden_act": "silu", "eos_token_id": 2}"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for (flag, degree) in [("--tp", "2"), ("--pp", "2")] {
        let v = json(&[
            "bench",
            "--random-weights",
            config,
            flag,
            degree,
            "--concurrency",
            "1",
            "--prompt-tokens",
            "256",
            "--gen-tokens",
            "2",
            "--format",
            "json",
        ]);
        let plan = json(&[
            "plan",
            "--model",
            config,
            "--precision",
            "fp32",
            flag,
            degree,
            "--format",
            "json",
        ]);
        let ranks = v["runs"][0]["memory_per_rank"].as_array().unwrap();
        assert_eq!(ranks.len(), 2, "{flag} {degree}: {v}");
        for (i, m) in ranks.iter().enumerate() {
            let n = |k: &str| m[k].as_u64().unwrap();
            let planned_weights = if flag == "--tp" {
                assert_eq!(m["tp_rank"], i, "{m}");
                &plan["per_gpu"]["weights_bytes"]
            } else {
                assert_eq!(m["stage"], i, "{m}");
                &plan["stages"][i]["per_gpu"]["weights_bytes"]
            };
            assert_eq!(&m["weights_bytes"], planned_weights, "{flag} rank {i}: {m}");
            assert!(
                n("weights_heap_bytes") >= n("weights_bytes")
                    && n("weights_heap_bytes") - n("weights_bytes") < 64 << 10,
                "{flag} rank {i}: {m}"
            );
            assert_eq!(m["kv_cache_heap_bytes"], m["kv_cache_bytes"], "{m}");
            let ratio = n("activation_peak_measured_bytes") as f64
                / n("activation_peak_estimate_bytes") as f64;
            assert!(
                (0.95..=1.05).contains(&ratio),
                "{flag} rank {i}: {ratio} {m}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--memory-trace` and `--plot` on random SmolLM2 weights: a cache of 3 blocks for 2
/// sequences of 40 tokens preempts, and the trace shows the KV growing and freed.
#[test]
fn bench_memory_trace_follows_every_step() {
    let dir = std::env::temp_dir().join(format!("llmem-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, svg) = (dir.join("trace.csv"), dir.join("trace.svg"));
    let v = json(&[
        "bench",
        "--random-weights",
        "smollm2-135m",
        "--concurrency",
        "2",
        "--prompt-tokens",
        "24",
        "--gen-tokens",
        "16",
        "--kv-blocks",
        "4",
        "--format",
        "json",
        "--memory-trace",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let steps = v["runs"][0]["steps"].as_u64().unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // One row per step (one rank).
    assert_eq!(rows.len() as u64, steps, "{text}");
    let num = |r: &Vec<&str>, c: &str| r[col(c)].parse::<u64>().unwrap();
    let kv: Vec<u64> = rows.iter().map(|r| num(r, "kv_used_bytes")).collect();
    let reserved = num(&rows[0], "kv_reserved_bytes");
    assert!(kv.iter().all(|&b| b <= reserved), "{kv:?}");
    assert!(kv.iter().any(|&b| b > 0), "{kv:?}");
    // The first step is a prefill: its measured working set is the largest.
    let act: Vec<u64> = rows
        .iter()
        .map(|r| num(r, "activation_measured_bytes"))
        .collect();
    assert!(
        act[0] > 0 && act[0] >= *act.iter().max().unwrap() / 2,
        "{act:?}"
    );
    assert!(num(&rows[0], "pass_tokens") >= 24, "{text}");
    // 4 blocks of 16 hold 64 tokens; two sequences reach 80: a preemption.
    let preempted = num(rows.last().unwrap(), "preemptions");
    assert_eq!(preempted, v["runs"][0]["preemptions"].as_u64().unwrap());
    assert!(preempted > 0, "{text}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("rank 0"), "{svg}");
    std::fs::remove_dir_all(&dir).unwrap();
    let err = fails(&[
        "bench",
        "--random-weights",
        "smollm2-135m",
        "--memory-trace",
        "/nonexistent-dir/trace.csv",
    ]);
    assert!(
        err.contains("--memory-trace") && err.contains("/nonexistent-dir/trace.csv"),
        "{err}"
    );
}

#[test]
fn unknown_weight_dtypes_list_the_valid_ones() {
    let err = fails(&["sweep", "--dtypes", "f32,q3_k"]);
    assert!(
        err.contains("q3_k") && err.contains("q4_k") && err.contains("q8_0"),
        "{err}"
    );
    let err = fails(&["sweep", "--dtypes", "int4"]);
    assert!(err.contains("planner") && err.contains("q4_0"), "{err}");
    let err = fails(&["sweep", "--kv-dtypes", "f16,q2_k"]);
    assert!(
        err.contains("--kv-dtypes") && err.contains("q2_k") && err.contains("q4_0"),
        "{err}"
    );
    // clap lists the accepted values of --dtype itself.
    let out = llmem(&["generate", "--prompt", "x", "--dtype", "q3_k"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("q4_k") && err.contains("q6_k"), "{err}");
}

/// Needs the default model (fetched into the cache when missing).
#[test]
fn sweep_json_contract_and_plot() {
    if !default_model_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmem-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("sweep.svg");
    let v = json(&[
        "sweep",
        "--dtypes",
        "q4_0,f32,q8_0",
        "--tokens",
        "64",
        "--window",
        "32",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--format",
        "json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(v["reference"], "f32");
    let levels = v["levels"].as_array().unwrap();
    let names: Vec<&str> = levels
        .iter()
        .map(|l| l["dtype"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["q4_0", "f32", "q8_0"], "levels in the order given");
    for l in levels {
        for key in [
            "weights_bytes_planned",
            "weights_bytes_measured",
            "load_ms",
            "perplexity",
            "kl_divergence",
            "top1_agreement",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_tokens_per_s_batch16",
        ] {
            assert!(l[key].is_number(), "{}: {key} missing in {l}", l["dtype"]);
        }
        assert_eq!(l["weights_bytes_planned"], l["weights_bytes_measured"]);
        assert!(l["perplexity"].as_f64().unwrap() > 1.0);
        assert!(l["decode_tokens_per_s_batch16"].as_f64().unwrap() > 0.0);
    }
    let f32_level = &levels[1];
    assert_eq!(f32_level["kl_divergence"].as_f64().unwrap(), 0.0);
    assert_eq!(f32_level["top1_agreement"].as_f64().unwrap(), 1.0);
    let bytes = |i: usize| levels[i]["weights_bytes_measured"].as_u64().unwrap();
    assert!(bytes(0) < bytes(2) && bytes(2) < bytes(1));
    // q4_0 drifts further from f32 than q8_0 does.
    assert!(levels[0]["kl_divergence"].as_f64() > levels[2]["kl_divergence"].as_f64());
    // The KV levels (the default list) with the reference weights, f32 first.
    let kv = v["kv_levels"].as_array().unwrap();
    let kv_names: Vec<&str> = kv.iter().map(|l| l["kv_dtype"].as_str().unwrap()).collect();
    assert_eq!(kv_names, ["f32", "f16", "q8_0", "q4_0"]);
    for l in kv {
        assert_eq!(l["weights"], "f32");
        for key in [
            "kv_bytes_per_token",
            "perplexity",
            "kl_divergence",
            "top1_agreement",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_tokens_per_s_batch16",
        ] {
            assert!(
                l[key].is_number(),
                "{}: {key} missing in {l}",
                l["kv_dtype"]
            );
        }
    }
    // f32 KV with f32 weights is the f32 weight level itself.
    assert_eq!(kv[0]["perplexity"], f32_level["perplexity"]);
    assert_eq!(kv[0]["kl_divergence"].as_f64().unwrap(), 0.0);
    // SmolLM2: 30 layers x 3 KV heads x 64 values, K and V.
    let per_token = |i: usize| kv[i]["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(
        [per_token(0), per_token(1), per_token(2), per_token(3)],
        [46_080, 23_040, 12_240, 6_480]
    );
    let kl = |i: usize| kv[i]["kl_divergence"].as_f64().unwrap();
    assert!(kl(1) < kl(2) && kl(2) < kl(3), "KL by KV level: {kv:?}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("q4_0") && chart.ends_with("</svg>\n"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The cached default-model GGUF (the Q4_1 file the default model is converted from),
/// fetched with the model when missing.
fn default_gguf() -> Option<String> {
    if !default_model_available() {
        return None;
    }
    let root = llmem_engine::weights::hub::cache_root().ok()?;
    let path = llmem_engine::weights::hub::default_gguf_path(&root);
    if !path.is_file() {
        eprintln!("skipped: {} is not cached", path.display());
        return None;
    }
    Some(path.to_str()?.to_string())
}

/// Needs the default model's GGUF (fetched into the cache with the model).
#[test]
fn gguf_runs_natively_and_plan_inspect_and_generate_agree_on_its_bytes() {
    let Some(g) = default_gguf() else { return };
    let v = json(&[
        "generate",
        "--model",
        &g,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--format",
        "json",
    ]);
    assert_eq!(v["dtype"], "as-stored:q4_1");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let measured = v["memory"]["weights_bytes"].as_u64().unwrap();
    let plan = json(&["plan", "--model", &g, "--format", "json"]);
    assert_eq!(plan["per_gpu"]["weights_bytes"].as_u64(), Some(measured));
    assert_eq!(plan["gguf"]["bytes"].as_u64(), Some(measured));
    let inspect = json(&["inspect", &g, "--format", "json"]);
    assert_eq!(inspect["checkpoint"]["bytes"].as_u64(), Some(measured));
    // An explicit --dtype requantizes: the planner's figure at that precision.
    let v = json(&[
        "generate",
        "--model",
        &g,
        "--prompt",
        "Hi",
        "--max-tokens",
        "1",
        "--dtype",
        "q8_0",
        "--format",
        "json",
    ]);
    assert_eq!(v["dtype"], "q8_0");
    let plan = json(&["plan", "--precision", "q8_0", "--format", "json"]);
    assert_eq!(
        plan["per_gpu"]["weights_bytes"],
        v["memory"]["weights_bytes"]
    );
    let err = fails(&[
        "generate",
        "--model",
        &g,
        "--prompt",
        "x",
        "--keep-embeddings",
    ]);
    assert!(
        err.contains("--keep-embeddings") && err.contains(".gguf"),
        "{err}"
    );
}

#[test]
fn gguf_errors_name_the_file() {
    let err = fails(&[
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "x",
    ]);
    assert!(err.contains("/no/such/model.gguf"), "{err}");
    let dir = std::env::temp_dir().join(format!("llmem-cli-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("fake.gguf");
    std::fs::write(&fake, b"not a gguf").unwrap();
    let fake = fake.to_str().unwrap();
    for cmd in [
        &["generate", "--model", fake, "--prompt", "x"][..],
        &["plan", "--model", fake],
        &["inspect", fake],
    ] {
        let err = fails(cmd);
        assert!(err.contains(fake) && err.contains("GGUF"), "{cmd:?}: {err}");
    }
    let err = fails(&["sweep", "--dtypes", "stored,f32", "--model", "/no/such/dir"]);
    assert!(err.contains("/no/such/dir"), "{err}");
}

/// `LLMEM_CPU` picks the kernel level at or below the CPU's own; a bad value stops every
/// command at start-up with the valid ones; `llmem info` and `--version` name the level.
#[test]
fn llmem_cpu_caps_the_kernel_level_and_reports_it() {
    let with = |level: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_llmem"))
            .args(args)
            .env("LLMEM_CPU", level)
            .output()
            .expect("run llmem")
    };
    let info = json(&["info", "--format", "json"]);
    let available: Vec<String> = info["cpu_kernels_available"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(available[0], "scalar");
    assert_eq!(info["cpu_kernels"], info["cpu_kernels_detected"]);
    for level in &available {
        let out = with(level, &["info", "--format", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cpu_kernels"], level.as_str());
        let out = with(level, &["--version"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("cpu kernels: {level}")), "{text}");
    }
    for bad in [
        "sse9",
        if cfg!(target_arch = "aarch64") {
            "avx2"
        } else {
            "neon"
        },
    ] {
        let out = with(bad, &["plan", "--format", "json"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("LLMEM_CPU=\"{bad}\"")) && err.contains("scalar"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// The built-in model runs its shipped Q4_1 GGUF natively by default, and the f32
/// conversion with --dtype f32; both report the kernel level.
#[test]
fn the_default_model_runs_its_gguf_natively_unless_dtype_asks() {
    if !default_model_available() {
        return;
    }
    let base = [
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--format",
        "json",
    ];
    let native = json(&base);
    assert_eq!(native["dtype"], "as-stored:q4_1");
    assert!(native["model"].as_str().unwrap().ends_with(".gguf"));
    let info = json(&["info", "--format", "json"]);
    assert_eq!(native["cpu_kernels"], info["cpu_kernels"]);
    let args: Vec<&str> = base.iter().copied().chain(["--dtype", "f32"]).collect();
    let f32 = json(&args);
    assert_eq!(f32["dtype"], "f32");
    assert!(!f32["model"].as_str().unwrap().ends_with(".gguf"));
}

/// The default model's conversion into the cache, killed (SIGKILL) at 20 pseudo-random
/// points: afterwards the cache holds either no converted model or a complete one (its
/// files the size of a full conversion), never a partial one that loads; a later run
/// clears what the killed ones left and converts. Needs the default model's GGUF (fetched
/// into the cache when missing); the conversion runs in a scratch cache that links to it.
#[test]
fn a_conversion_killed_at_any_point_never_leaves_a_cache_that_loads_wrong() {
    if !default_model_available() {
        return;
    }
    let real = llmem_engine::weights::hub::cache_root().unwrap();
    let gguf = llmem_engine::weights::hub::default_gguf_path(&real);
    let full = llmem_engine::weights::hub::default_model_path(&real);
    assert!(gguf.is_file(), "{}", gguf.display());
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let home = std::env::temp_dir().join(format!("llmem-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(home.join("gguf")).unwrap();
    std::os::unix::fs::symlink(&gguf, home.join("gguf").join(gguf.file_name().unwrap())).unwrap();
    let dir = llmem_engine::weights::hub::default_model_path(&home);
    let run = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_llmem"));
        c.args([
            "generate",
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
            "--dtype",
            "f32",
        ])
        .args(["--format", "json"])
        .env("LLMEM_HOME", &home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        c
    };
    // Kill points spread over the whole conversion (about 2 s here), from a fixed seed.
    let mut rng = llmem_engine::sample::sampler::SplitMix64::new(20);
    let mut completed = 0;
    for i in 0..20 {
        let mut child = run().spawn().unwrap();
        let wait = Duration::from_millis(50 + rng.next_u64() % 2500);
        std::thread::sleep(wait);
        let _ = child.kill();
        let _ = child.wait();
        if dir.exists() {
            // Complete, or not there at all.
            assert!(
                llmem_engine::weights::hub::is_model_dir(&dir),
                "kill {i} after {wait:?}: a partial model directory"
            );
            for f in ["model.safetensors", "config.json", "tokenizer.json"] {
                assert_eq!(size(&dir.join(f)), size(&full.join(f)), "kill {i}: {f}");
            }
            completed += 1;
            // Convert again next time, to kill it somewhere else.
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // At most the temporary of the run just killed is left.
        let temporaries = std::fs::read_dir(home.join("models"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                    .count()
            })
            .unwrap_or(0);
        assert!(temporaries <= 1, "kill {i}: {temporaries} temporaries");
    }
    // A run to the end converts, loads, and leaves nothing else behind.
    let out = run().output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 2);
    assert_eq!(
        size(&dir.join("model.safetensors")),
        size(&full.join("model.safetensors"))
    );
    let left: Vec<String> = std::fs::read_dir(home.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["smollm2-135m-instruct".to_string()], "{left:?}");
    println!("{completed} of 20 killed runs had finished converting");
    std::fs::remove_dir_all(&home).unwrap();
}
