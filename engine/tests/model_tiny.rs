//! Fast tier, no download: tiny random Llama-family models written as safetensors by the
//! test itself, checked against a naive f64 reference forward pass written below (no
//! cache, no batching, one loop per formula), and against the engine's own paths
//! (prefill + decode == full pass, batched == unbatched). Also: load errors name the file
//! and tensor and never panic; generation honours max_tokens, EOS, stop tokens and seeds.
//! The paged path: `forward_paged` == the contiguous forward (prefill, chunked prefill,
//! decode; block sizes 1/2/16, shuffled block ids, f32/bf16/f16 caches), and the
//! `Engine` gives every request the tokens it gets alone, whatever the concurrency,
//! chunking or preemption, and the same tokens under the contiguous KV layout, which
//! runs fewer sequences at once; budget sizing adds up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use llmem_engine::cache::block_manager::{KvLayout, SeqId};
use llmem_engine::cache::paged::{KvDtype, PagedKvCache};
use llmem_engine::engine::generate::{generate, FinishReason, GenerateRequest};
use llmem_engine::engine::scheduler::{
    FinishReason as EngineFinish, ScheduledBatch, ScheduledSeq, StopConditions,
};
use llmem_engine::engine::{Engine, EngineConfig, EngineStats, KvSizing};
use llmem_engine::layers::rope::rope_inv_freq;
use llmem_engine::model::{AttnMetadata, Model};
use llmem_engine::sample::sampler::{SamplingParams, SplitMix64};
use llmem_planner::ModelShape;
use serde_json::json;

/// Options of a tiny model.
#[derive(Clone)]
struct Spec {
    arch: &'static str,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tie: bool,
    attention_bias: bool,
    mlp_bias: bool,
    rope_scaling: Option<serde_json::Value>,
    seed: u64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            arch: "LlamaForCausalLM",
            hidden: 32,
            inter: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            vocab: 40,
            tie: true,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            seed: 7,
        }
    }
}

type Weights = HashMap<String, (Vec<f32>, Vec<usize>)>;

fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("llmem-tiny-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Spec {
    fn qkv_bias(&self) -> bool {
        self.arch == "Qwen2ForCausalLM" || self.attention_bias
    }

    fn o_bias(&self) -> bool {
        self.arch == "LlamaForCausalLM" && self.attention_bias
    }

    fn weights(&self) -> Weights {
        let mut rng = SplitMix64::new(self.seed);
        let mut w = Weights::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|_| offset + scale * (rng.next_f64() as f32 * 2.0 - 1.0))
                .collect();
            w.insert(name, (data, shape));
        };
        let (h, i, q, kv) = (
            self.hidden,
            self.inter,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        add(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            1.0,
            0.0,
        );
        add("model.norm.weight".into(), vec![h], 0.2, 1.0);
        if !self.tie {
            add("lm_head.weight".into(), vec![self.vocab, h], 0.3, 0.0);
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.2,
                1.0,
            );
            for (name, out, inp) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                add(
                    format!("{p}.self_attn.{name}.weight"),
                    vec![out, inp],
                    0.3,
                    0.0,
                );
                let bias = if name == "o_proj" {
                    self.o_bias()
                } else {
                    self.qkv_bias()
                };
                if bias {
                    add(format!("{p}.self_attn.{name}.bias"), vec![out], 0.3, 0.0);
                }
            }
            for (name, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                add(format!("{p}.mlp.{name}.weight"), vec![out, inp], 0.3, 0.0);
                if self.mlp_bias {
                    add(format!("{p}.mlp.{name}.bias"), vec![out], 0.3, 0.0);
                }
            }
        }
        w
    }

    fn config(&self) -> serde_json::Value {
        let mut c = json!({
            "architectures": [self.arch],
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "eos_token_id": 3,
        });
        if let Some(rs) = &self.rope_scaling {
            c["rope_scaling"] = rs.clone();
        }
        c
    }

    /// Write config.json, model.safetensors and a word-level tokenizer.json.
    fn write(&self, tag: &str) -> (PathBuf, Weights) {
        let dir = temp_dir(tag);
        let weights = self.weights();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        write_safetensors(&dir.join("model.safetensors"), &weights);
        let vocab: serde_json::Map<String, serde_json::Value> = (0..self.vocab)
            .map(|i| (format!("w{i}"), json!(i)))
            .collect();
        let tok = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        (dir, weights)
    }
}

fn write_safetensors(path: &Path, weights: &Weights) {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = weights
        .iter()
        .map(|(n, (d, s))| {
            (
                n.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                s.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

// ---- the naive reference -------------------------------------------------------------

fn matvec(w: &(Vec<f32>, Vec<usize>), x: &[f64]) -> Vec<f64> {
    let (rows, cols) = (w.1[0], w.1[1]);
    assert_eq!(cols, x.len());
    (0..rows)
        .map(|r| (0..cols).map(|c| w.0[r * cols + c] as f64 * x[c]).sum())
        .collect()
}

fn add_bias(w: &Weights, name: &str, mut y: Vec<f64>) -> Vec<f64> {
    if let Some((b, _)) = w.get(name) {
        y.iter_mut().zip(b).for_each(|(y, b)| *y += *b as f64);
    }
    y
}

fn rmsnorm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * *w as f64).collect()
}

/// HF-style rotary (rotate_half): pairs (i, i + hd/2).
fn rope(x: &mut [f64], pos: usize, inv_freq: &[f64]) {
    let half = inv_freq.len();
    for i in 0..half {
        let a = pos as f64 * inv_freq[i];
        let (c, s) = (a.cos(), a.sin());
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x1 * s + x2 * c;
    }
}

/// Llama-3 frequency scaling, written from the formula in f64.
fn reference_inv_freq(spec: &Spec) -> Vec<f64> {
    let hd = spec.head_dim;
    let mut inv: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64))
        .collect();
    if let Some(rs) = &spec.rope_scaling {
        let factor = rs["factor"].as_f64().unwrap();
        let low = rs["low_freq_factor"].as_f64().unwrap();
        let high = rs["high_freq_factor"].as_f64().unwrap();
        let old = rs["original_max_position_embeddings"].as_f64().unwrap();
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen < old / high {
            } else if wavelen > old / low {
                *f /= factor;
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
    inv
}

/// Logits of every position of `ids`, (len, vocab), in f64.
fn reference_forward(spec: &Spec, w: &Weights, ids: &[u32]) -> Vec<Vec<f64>> {
    let (hd, nh, nkv) = (spec.head_dim, spec.heads, spec.kv_heads);
    let group = nh / nkv;
    let inv = reference_inv_freq(spec);
    let emb = &w["model.embed_tokens.weight"];
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| {
            let r = id as usize * spec.hidden;
            emb.0[r..r + spec.hidden]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let lin = |name: &str, x: &[f64]| {
            add_bias(
                w,
                &format!("{p}.{name}.bias"),
                matvec(&w[&format!("{p}.{name}.weight")], x),
            )
        };
        let normed: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| rmsnorm(x, &w[&format!("{p}.input_layernorm.weight")].0, 1e-5))
            .collect();
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in normed.iter().enumerate() {
            let mut q = lin("self_attn.q_proj", x);
            let mut k = lin("self_attn.k_proj", x);
            for h in 0..nh {
                rope(&mut q[h * hd..(h + 1) * hd], pos, &inv);
            }
            for h in 0..nkv {
                rope(&mut k[h * hd..(h + 1) * hd], pos, &inv);
            }
            qs.push(q);
            ks.push(k);
            vs.push(lin("self_attn.v_proj", x));
        }
        for t in 0..xs.len() {
            let mut attn = vec![0.0; nh * hd];
            for h in 0..nh {
                let kvh = h / group;
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qs[t][h * hd + d] * ks[j][kvh * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..=t {
                    for d in 0..hd {
                        attn[h * hd + d] += e[j] / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = lin("self_attn.o_proj", &attn);
            xs[t].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h2 = rmsnorm(
                &xs[t],
                &w[&format!("{p}.post_attention_layernorm.weight")].0,
                1e-5,
            );
            let g = lin("mlp.gate_proj", &h2);
            let u = lin("mlp.up_proj", &h2);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = lin("mlp.down_proj", &act);
            xs[t].iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
    }
    let head = if spec.tie {
        &w["model.embed_tokens.weight"]
    } else {
        &w["lm_head.weight"]
    };
    xs.iter()
        .map(|x| matvec(head, &rmsnorm(x, &w["model.norm.weight"].0, 1e-5)))
        .collect()
}

// ---- helpers -------------------------------------------------------------------------

fn load(dir: &Path, dtype: DType) -> Model {
    Model::load_dir(dir, dtype, &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

fn full_logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(ids.len()).unwrap();
    rows(
        &model
            .forward_all_logits(ids, &AttnMetadata::single(0, ids.len()), &mut [&mut cache])
            .unwrap(),
    )
}

const IDS: [u32; 9] = [5, 17, 2, 39, 11, 0, 23, 8, 30];

fn check_against_reference(spec: &Spec, tag: &str) {
    let (dir, w) = spec.write(tag);
    let model = load(&dir, DType::F32);
    let got = full_logits(&model, &IDS);
    let want = reference_forward(spec, &w, &IDS);
    assert_eq!(got.len(), IDS.len());
    for (pos, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), spec.vocab);
        let d = max_diff(g, r);
        assert!(
            d < 1e-3,
            "{tag}: position {pos}: max |engine - reference| = {d}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- tests ---------------------------------------------------------------------------

#[test]
fn gqa_tied_matches_reference() {
    check_against_reference(&Spec::default(), "gqa");
}

#[test]
fn mha_untied_matches_reference() {
    let spec = Spec {
        kv_heads: 4,
        tie: false,
        seed: 11,
        ..Spec::default()
    };
    check_against_reference(&spec, "mha");
}

#[test]
fn multi_query_matches_reference() {
    let spec = Spec {
        kv_heads: 1,
        heads: 4,
        head_dim: 16,
        seed: 12,
        ..Spec::default()
    };
    check_against_reference(&spec, "mqa");
}

#[test]
fn qwen2_qkv_biases_match_reference() {
    let spec = Spec {
        arch: "Qwen2ForCausalLM",
        seed: 13,
        ..Spec::default()
    };
    check_against_reference(&spec, "qwen2");
}

#[test]
fn llama_attention_and_mlp_biases_match_reference() {
    let spec = Spec {
        attention_bias: true,
        mlp_bias: true,
        tie: false,
        seed: 14,
        ..Spec::default()
    };
    check_against_reference(&spec, "bias");
}

#[test]
fn llama3_rope_scaling_matches_reference() {
    let spec = Spec {
        head_dim: 16,
        heads: 2,
        kv_heads: 1,
        rope_scaling: Some(json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16
        })),
        seed: 15,
        ..Spec::default()
    };
    // The scaling must actually change some frequencies for this test to mean anything.
    let (dir, _) = spec.write("rope-freq");
    let shape = ModelShape::from_path(&dir).unwrap();
    let scaled = rope_inv_freq(&shape).unwrap();
    let plain = reference_inv_freq(&Spec {
        rope_scaling: None,
        ..spec.clone()
    });
    let reference = reference_inv_freq(&spec);
    assert!(scaled
        .iter()
        .zip(&plain)
        .any(|(s, p)| (*s as f64 - p).abs() > 1e-6));
    for (s, r) in scaled.iter().zip(&reference) {
        assert!(
            (*s as f64 - r).abs() <= 1e-6 * r.abs().max(1e-3),
            "{s} vs {r}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
    check_against_reference(&spec, "llama3");
}

#[test]
fn prefill_then_decode_equals_full_pass() {
    let spec = Spec::default();
    let (dir, _) = spec.write("kv");
    let model = load(&dir, DType::F32);
    let full = full_logits(&model, &IDS);
    let mut cache = model.new_cache(IDS.len()).unwrap();
    let split = 4;
    let first = rows(
        &model
            .forward(
                &IDS[..split],
                &AttnMetadata::single(0, split),
                &mut [&mut cache],
            )
            .unwrap(),
    );
    assert_eq!(first.len(), 1, "forward returns one row per sequence");
    assert!(
        max_diff(
            &first[0],
            &full[split - 1]
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>()
        ) < 1e-5
    );
    for pos in split..IDS.len() {
        let step = rows(
            &model
                .forward(
                    &IDS[pos..pos + 1],
                    &AttnMetadata::single(pos, 1),
                    &mut [&mut cache],
                )
                .unwrap(),
        );
        let want: Vec<f64> = full[pos].iter().map(|&x| x as f64).collect();
        let d = max_diff(&step[0], &want);
        assert!(d < 1e-4, "decode at position {pos}: diff {d}");
    }
    assert_eq!(cache.len(), IDS.len());
    // A chunked prefill (3 tokens after 4 cached) also matches.
    let mut cache = model.new_cache(IDS.len()).unwrap();
    model
        .forward(&IDS[..4], &AttnMetadata::single(0, 4), &mut [&mut cache])
        .unwrap();
    let chunk = rows(
        &model
            .forward(&IDS[4..7], &AttnMetadata::single(4, 3), &mut [&mut cache])
            .unwrap(),
    );
    assert!(
        max_diff(
            &chunk[0],
            &full[6].iter().map(|&x| x as f64).collect::<Vec<_>>()
        ) < 1e-4
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn batched_equals_unbatched() {
    let spec = Spec::default();
    let (dir, _) = spec.write("batch");
    let model = load(&dir, DType::F32);
    let a: &[u32] = &[1, 2, 3, 4, 5];
    let b: &[u32] = &[9, 8, 7];
    // alone
    let mut ca = model.new_cache(8).unwrap();
    let mut cb = model.new_cache(8).unwrap();
    let la = rows(
        &model
            .forward(a, &AttnMetadata::single(0, 5), &mut [&mut ca])
            .unwrap(),
    );
    let lb = rows(
        &model
            .forward(b, &AttnMetadata::single(0, 3), &mut [&mut cb])
            .unwrap(),
    );
    let la2 = rows(
        &model
            .forward(&[6], &AttnMetadata::single(5, 1), &mut [&mut ca])
            .unwrap(),
    );
    let lb2 = rows(
        &model
            .forward(&[6], &AttnMetadata::single(3, 1), &mut [&mut cb])
            .unwrap(),
    );
    // together
    let mut xa = model.new_cache(8).unwrap();
    let mut xb = model.new_cache(8).unwrap();
    let ids: Vec<u32> = a.iter().chain(b).copied().collect();
    let meta = AttnMetadata {
        query_lens: vec![5, 3],
        cached_lens: vec![0, 0],
    };
    let both = rows(&model.forward(&ids, &meta, &mut [&mut xa, &mut xb]).unwrap());
    let meta = AttnMetadata {
        query_lens: vec![1, 1],
        cached_lens: vec![5, 3],
    };
    let both2 = rows(
        &model
            .forward(&[6, 6], &meta, &mut [&mut xa, &mut xb])
            .unwrap(),
    );
    let f = |v: &Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    for (got, want) in [
        (&both[0], &la[0]),
        (&both[1], &lb[0]),
        (&both2[0], &la2[0]),
        (&both2[1], &lb2[0]),
    ] {
        let d = max_diff(got, &f(want));
        assert!(d < 1e-4, "batched differs from unbatched by {d}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn half_precision_dtypes_run_and_stay_close() {
    let spec = Spec::default();
    let (dir, _) = spec.write("dtypes");
    let f32_logits = full_logits(&load(&dir, DType::F32), &IDS);
    for dtype in [DType::BF16, DType::F16] {
        let model = load(&dir, dtype);
        assert_eq!(
            model.weights_bytes() * 2,
            load(&dir, DType::F32).weights_bytes()
        );
        let got = full_logits(&model, &IDS);
        let mut kv = model.new_cache(IDS.len()).unwrap();
        model
            .forward(&IDS[..5], &AttnMetadata::single(0, 5), &mut [&mut kv])
            .unwrap();
        model
            .forward(&IDS[5..6], &AttnMetadata::single(5, 1), &mut [&mut kv])
            .unwrap();
        // bf16 keeps 8 significant bits, f16 11: bound the error relative to the logits.
        let rel = if dtype == DType::BF16 { 0.05 } else { 0.01 };
        for (g, w) in got.iter().zip(&f32_logits) {
            let scale = w.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let d = max_diff(g, &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(
                d < rel * scale,
                "{dtype:?}: differs from f32 by {d} (logit scale {scale})"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memory_accounting_uses_the_shape() {
    let spec = Spec {
        tie: false,
        ..Spec::default()
    };
    let (dir, w) = spec.write("mem");
    let model = load(&dir, DType::F32);
    let params: usize = w.values().map(|(d, _)| d.len()).sum();
    assert_eq!(model.weights_bytes(), 4 * params as u64);
    assert_eq!(model.shape().params().total, params as u64);
    let cache = model.new_cache(10).unwrap();
    assert_eq!(cache.bytes(), 10 * model.shape().kv_bytes_per_token(4));
    assert_eq!(cache.bytes(), 10 * 2 * 2 * 2 * 8 * 4);
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- load errors ---------------------------------------------------------------------

fn load_err(dir: &Path) -> String {
    match Model::load_dir(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_shape_is_an_error_naming_file_and_tensor() {
    let spec = Spec::default();
    let (dir, mut w) = spec.write("shape");
    w.insert(
        "model.layers.1.self_attn.k_proj.weight".into(),
        (vec![0.0; 32 * 32], vec![32, 32]),
    );
    write_safetensors(&dir.join("model.safetensors"), &w);
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("model.layers.1.self_attn.k_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("expected shape [16, 32], found [32, 32]"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let spec = Spec::default();
    let (dir, mut w) = spec.write("missing");
    w.remove("model.layers.0.mlp.up_proj.weight");
    write_safetensors(&dir.join("model.safetensors"), &w);
    let err = load_err(&dir);
    assert!(
        err.contains("model.layers.0.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_bias_of_a_qwen2_model_is_an_error() {
    let spec = Spec {
        arch: "Qwen2ForCausalLM",
        ..Spec::default()
    };
    let (dir, mut w) = spec.write("nobias");
    w.remove("model.layers.1.self_attn.v_proj.bias");
    write_safetensors(&dir.join("model.safetensors"), &w);
    let err = load_err(&dir);
    assert!(
        err.contains("model.layers.1.self_attn.v_proj.bias"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_and_garbage_files_are_errors() {
    let spec = Spec::default();
    let (dir, _) = spec.write("trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 7, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_err(&dir);
        assert!(err.contains("model.safetensors"), "cut at {cut}: {err}");
    }
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));
    std::fs::remove_file(&path).unwrap();
    assert!(load_err(&dir).contains("no model.safetensors"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_dtype_in_file_is_an_error() {
    let spec = Spec::default();
    let (dir, w) = spec.write("i32");
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = w
        .iter()
        .map(|(n, (d, s))| {
            (
                n.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
                s.clone(),
                safetensors::Dtype::F32,
            )
        })
        .collect();
    for b in bytes.iter_mut().filter(|b| b.0 == "model.norm.weight") {
        b.3 = safetensors::Dtype::I32;
    }
    let views: Vec<_> = bytes
        .iter()
        .map(|(n, b, s, t)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*t, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.norm.weight") && err.contains("I32"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let spec = Spec::default();
    let (dir, w) = spec.write("shards");
    let single = full_logits(&load(&dir, DType::F32), &IDS);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut shard1 = Weights::new();
    let mut shard2 = Weights::new();
    let mut map = serde_json::Map::new();
    for (name, t) in &w {
        let (file, shard) = if name.contains("layers.1")
            || name.contains("norm.weight") && !name.contains("layers")
        {
            ("model-00002-of-00002.safetensors", &mut shard2)
        } else {
            ("model-00001-of-00002.safetensors", &mut shard1)
        };
        shard.insert(name.clone(), t.clone());
        map.insert(name.clone(), json!(file));
    }
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &shard1);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &shard2);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    assert_eq!(full_logits(&load(&dir, DType::F32), &IDS), single);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn forward_rejects_inconsistent_metadata_without_panicking() {
    let (dir, _) = Spec::default().write("meta");
    let model = load(&dir, DType::F32);
    let mut cache = model.new_cache(4).unwrap();
    let err = |r: llmem_engine::Result<Tensor>| r.unwrap_err().to_string();
    assert!(
        err(model.forward(&[1, 2], &AttnMetadata::single(0, 3), &mut [&mut cache]))
            .contains("3 tokens")
    );
    assert!(
        err(model.forward(&[1, 2], &AttnMetadata::single(1, 2), &mut [&mut cache]))
            .contains("cached")
    );
    assert!(err(model.forward(
        &[1, 2, 3, 4, 5],
        &AttnMetadata::single(0, 5),
        &mut [&mut cache]
    ))
    .contains("capacity"));
    assert!(
        err(model.forward(&[99], &AttnMetadata::single(0, 1), &mut [&mut cache]))
            .contains("vocabulary")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- generation ----------------------------------------------------------------------

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
        stop_token_ids: vec![],
        stop_strings: vec![],
        ignore_eos: false,
        top_logprobs: 0,
        kv_dtype: None,
    }
}

#[test]
fn greedy_generation_follows_the_full_pass_argmax() {
    let (dir, _) = Spec::default().write("gen");
    let model = load(&dir, DType::F32);
    let tok = llmem_engine::weights::tokenizer::load_tokenizer(&dir).unwrap();
    let mut req = request(vec![5, 17, 2], 6);
    req.top_logprobs = 3;
    let mut streamed = String::new();
    let out = generate(&model, &tok, &req, |s| streamed.push_str(s)).unwrap();
    assert_eq!(out.token_ids.len(), 6);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(streamed, out.text);
    assert_eq!(out.top_logprobs.len(), 6);
    // Each greedy token is the argmax of a full, cache-free pass over everything before it.
    let mut seq = req.prompt_ids.clone();
    for (i, &t) in out.token_ids.iter().enumerate() {
        let logits = full_logits(&model, &seq);
        let last = logits.last().unwrap();
        let best = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(t as usize, best, "step {i}");
        assert_eq!(out.top_logprobs[i][0].0, t);
        seq.push(t);
    }
    assert!(out.memory.kv_cache_bytes > 0 && out.memory.activation_peak_bytes > 0);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kv_dtype` picks the cache's element type apart from the model's: half the bytes in
/// f16 and bf16, and the same log-probabilities as the f32 cache within the rounding of
/// K/V to 16 bits (compared on the f32 run's tokens, teacher-forced via the prompt).
#[test]
fn generation_with_a_16_bit_kv_cache() {
    use llmem_engine::cache::paged::KvDtype;
    let (dir, _) = Spec::default().write("kvdtype");
    let model = load(&dir, DType::F32);
    let tok = llmem_engine::weights::tokenizer::load_tokenizer(&dir).unwrap();
    let mut req = request(vec![5, 17, 2, 9, 30, 4], 1);
    req.top_logprobs = 4;
    let full = generate(&model, &tok, &req, |_| {}).unwrap();
    for kv in [KvDtype::F16, KvDtype::Bf16] {
        req.kv_dtype = Some(kv);
        let out = generate(&model, &tok, &req, |_| {}).unwrap();
        assert_eq!(
            out.memory.kv_cache_bytes * 2,
            full.memory.kv_cache_bytes,
            "{kv:?}"
        );
        let tol = if kv == KvDtype::F16 { 2e-2 } else { 1e-1 };
        for ((id, lp), (want_id, want)) in out.top_logprobs[0].iter().zip(&full.top_logprobs[0]) {
            assert_eq!(id, want_id, "{kv:?}");
            assert!((lp - want).abs() < tol, "{kv:?}: {lp} vs {want}");
        }
    }
    // A longer run decodes from the 16-bit cache (the single-query kernel path): each
    // step's top log-probabilities match the f32 cache's while the tokens agree.
    req.max_tokens = 8;
    req.kv_dtype = None;
    let full = generate(&model, &tok, &req, |_| {}).unwrap();
    for (kv, tol) in [(KvDtype::F16, 2e-2), (KvDtype::Bf16, 1e-1)] {
        req.kv_dtype = Some(kv);
        let out = generate(&model, &tok, &req, |_| {}).unwrap();
        assert_eq!(out.token_ids.len(), 8);
        let same = out
            .token_ids
            .iter()
            .zip(&full.token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            same >= 1,
            "{kv:?}: {:?} vs {:?}",
            out.token_ids,
            full.token_ids
        );
        for step in 0..same {
            let (got, want) = (&out.top_logprobs[step][0], &full.top_logprobs[step][0]);
            assert_eq!(got.0, want.0, "{kv:?} step {step}");
            assert!(
                (got.1 - want.1).abs() < tol,
                "{kv:?} step {step}: {got:?} vs {want:?}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eos_stop_tokens_and_seeds() {
    let (dir, _) = Spec::default().write("stop");
    let model = load(&dir, DType::F32);
    let tok = llmem_engine::weights::tokenizer::load_tokenizer(&dir).unwrap();
    let free = generate(&model, &tok, &request(vec![5, 17], 8), |_| {}).unwrap();
    let first = free.token_ids[0];
    // Declaring the first greedy token EOS stops at once (and keeps it in token_ids).
    let mut req = request(vec![5, 17], 8);
    req.eos_token_ids = vec![first];
    let out = generate(&model, &tok, &req, |_| {}).unwrap();
    assert_eq!(
        (out.token_ids.clone(), out.finish_reason),
        (vec![first], FinishReason::Stop)
    );
    assert_eq!(out.text, "");
    req.ignore_eos = true;
    assert_eq!(
        generate(&model, &tok, &req, |_| {})
            .unwrap()
            .token_ids
            .len(),
        8
    );
    req.stop_token_ids = vec![first];
    assert_eq!(
        generate(&model, &tok, &req, |_| {}).unwrap().finish_reason,
        FinishReason::Stop
    );
    // Seeded sampling is reproducible.
    let mut req = request(vec![5, 17], 8);
    req.sampling = SamplingParams {
        temperature: 1.5,
        top_k: Some(10),
        top_p: Some(0.95),
        seed: 3,
    };
    let a = generate(&model, &tok, &req, |_| {}).unwrap().token_ids;
    let b = generate(&model, &tok, &req, |_| {}).unwrap().token_ids;
    assert_eq!(a, b);
    // A prompt that fills the context is a clear error.
    let err = generate(&model, &tok, &request(vec![1; 64], 4), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("context"), "{err}");
    // Generation that reaches the context end stops with "length".
    let out = generate(&model, &tok, &request(vec![1; 60], 100), |_| {}).unwrap();
    assert_eq!(
        (out.token_ids.len(), out.finish_reason),
        (4, FinishReason::Length)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- the paged path ------------------------------------------------------------------

/// Feed `seqs` through `Model::forward_paged` in the given `steps` (each a list of
/// `(sequence, tokens fed)`), over a cache of `block_size` whose blocks are handed out in a
/// shuffled order. Returns the logits of every position of every sequence.
fn paged_logits(
    model: &Model,
    seqs: &[&[u32]],
    steps: &[Vec<(usize, usize)>],
    block_size: usize,
    kv_dtype: KvDtype,
) -> Vec<Vec<Vec<f32>>> {
    let per_seq: Vec<usize> = seqs.iter().map(|s| s.len().div_ceil(block_size)).collect();
    let num_blocks = per_seq.iter().sum::<usize>() + 3;
    // Fisher-Yates with the test's own generator: block ids in no particular order.
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    let mut rng = SplitMix64::new(block_size as u64 + 99);
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut tables = Vec::new();
    let mut next = order.into_iter();
    for &n in &per_seq {
        tables.push(next.by_ref().take(n).collect::<Vec<u32>>());
    }
    let mut cache = PagedKvCache::new(model.shape(), num_blocks, block_size, kv_dtype).unwrap();
    let mut cached = vec![0usize; seqs.len()];
    let mut out: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| vec![vec![]; s.len()]).collect();
    for step in steps {
        let mut batch = ScheduledBatch::default();
        for &(s, n) in step {
            let start = cached[s];
            let table = &tables[s];
            batch.seqs.push(ScheduledSeq {
                seq: SeqId(s as u64),
                tokens: seqs[s][start..start + n].to_vec(),
                start_pos: start,
                slots: (start..start + n)
                    .map(|p| table[p / block_size] as usize * block_size + p % block_size)
                    .collect(),
                block_table: table[..(start + n).div_ceil(block_size)].to_vec(),
                sample: true,
            });
            cached[s] += n;
        }
        let meta = llmem_engine::engine::paged_metadata(&batch);
        let ids: Vec<u32> = batch.seqs.iter().flat_map(|e| e.tokens.clone()).collect();
        let positions: Vec<u32> = batch
            .seqs
            .iter()
            .flat_map(|e| (e.start_pos..e.start_pos + e.tokens.len()).map(|p| p as u32))
            .collect();
        let all_rows: Vec<usize> = (0..ids.len()).collect();
        let logits = rows(
            &model
                .forward_paged(&ids, &positions, &meta, &mut cache, &all_rows)
                .unwrap(),
        );
        let mut row = logits.into_iter();
        for e in &batch.seqs {
            let seq_out = &mut out[e.seq.0 as usize];
            for slot in seq_out.iter_mut().skip(e.start_pos).take(e.tokens.len()) {
                *slot = row.next().unwrap();
            }
        }
    }
    out
}

/// Steps of a paged run: per step, `(sequence, tokens fed)`.
type Steps = Vec<Vec<(usize, usize)>>;

/// Two sequences A (`IDS`) and B and a schedule for `paged_logits`: a prefill of A's 4
/// tokens and B's 3 together, a chunk of A beside a one-token B, then decodes.
fn two_sequences() -> ([&'static [u32]; 2], Steps) {
    const B: [u32; 5] = [4, 4, 19, 33, 1];
    let steps = vec![
        vec![(0, 4), (1, 3)],
        vec![(0, 3), (1, 1)],
        vec![(1, 1), (0, 1)],
        vec![(0, 1)],
    ];
    ([&IDS, &B], steps)
}

#[test]
fn paged_forward_equals_contiguous_forward() {
    let spec = Spec::default();
    let (dir, _) = spec.write("paged");
    let ([a, b], steps) = two_sequences();
    for model_dtype in [DType::F32, DType::BF16] {
        let model = load(&dir, model_dtype);
        let want = [full_logits(&model, a), full_logits(&model, b)];
        for block_size in [1, 2, 16] {
            for kv in [KvDtype::F32, KvDtype::Bf16, KvDtype::F16] {
                let got = paged_logits(&model, &[a, b], &steps, block_size, kv);
                for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (pos, (g, w)) in g.iter().zip(w).enumerate() {
                        let scale = w.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                        // Same math in f32; a 16-bit cache (or model) rounds K and V.
                        let tol = match (model_dtype, kv) {
                            (DType::F32, KvDtype::F32) => 1e-4,
                            (_, KvDtype::F16) | (DType::F16, _) => 0.02 * scale,
                            _ => 0.05 * scale,
                        };
                        let d = max_diff(g, &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
                        assert!(
                            d < tol,
                            "{model_dtype:?} model, {kv:?} cache, block {block_size}: \
                             seq {s} pos {pos}: paged differs by {d}"
                        );
                    }
                }
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A q8_0 KV cache (a model with head_dim 64: two blocks per head), paged and
/// contiguous: both read the blocks through the paged kernel, give the same logits as
/// each other, and stay close to the f32 cache's; its bytes are 34/32 per value.
/// A block-quantized KV cache (`kv`, blocks of `block_bytes` per 32 values) in the paged
/// engine and the contiguous cache: close to the f32 logits within `tolerance` of the
/// largest logit, and the two forms equal.
fn quantized_kv_cache_paged_and_contiguous(kv: KvDtype, block_bytes: u64, tolerance: f64) {
    use llmem_engine::cache::contiguous::KvCache;
    let spec = Spec {
        hidden: 128,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        ..Spec::default()
    };
    let (dir, _) = spec.write(&format!("{}kv", kv.name()));
    let model = load(&dir, DType::F32);
    let ([a, b], steps) = two_sequences();
    let want = [full_logits(&model, a), full_logits(&model, b)];
    let paged = paged_logits(&model, &[a, b], &steps, 16, kv);
    for (s, (g, w)) in paged.iter().zip(&want).enumerate() {
        let mut worst = 0f64;
        for (g, w) in g.iter().zip(w) {
            let scale = w.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let d = max_diff(g, &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(
                d < tolerance * scale,
                "seq {s}: {kv:?} paged differs by {d} of {scale}"
            );
            worst = worst.max(d);
        }
        assert!(worst > 0.0, "seq {s}: a {kv:?} cache changed nothing");
    }
    // The contiguous cache at the same level: prefill then one decode, against the
    // paged run.
    let mut cache = KvCache::new_in(model.shape(), a.len(), kv, model.device()).unwrap();
    // K, V x 2 layers x 2 blocks per row x rows rounded up to blocks of 16 tokens.
    let bytes = 2 * 2 * 2 * block_bytes * a.len().div_ceil(16) as u64 * 16;
    assert_eq!(cache.bytes(), bytes);
    let n = a.len() - 1;
    let pre = model
        .forward_all_logits(&a[..n], &AttnMetadata::single(0, n), &mut [&mut cache])
        .unwrap();
    let pre = rows(&pre);
    let last = model
        .forward(&a[n..], &AttnMetadata::single(n, 1), &mut [&mut cache])
        .unwrap();
    let last = rows(&last.reshape((1, ())).unwrap());
    for (pos, got) in pre.iter().chain(&last).enumerate() {
        let w: Vec<f64> = paged[0][pos].iter().map(|&x| x as f64).collect();
        let d = max_diff(got, &w);
        assert!(
            d < 1e-3,
            "pos {pos}: contiguous {kv:?} differs from paged {kv:?} by {d}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn q8_0_kv_cache_paged_and_contiguous() {
    // An 8-bit step of the block's largest value (bf16 keeps 8 bits of each value):
    // measured up to 1.9% of the largest logit here, bf16 0.5%.
    quantized_kv_cache_paged_and_contiguous(KvDtype::Q8_0, 34, 0.04);
}

#[test]
fn q4_0_kv_cache_paged_and_contiguous() {
    // A 4-bit step, 16 times q8_0's: measured up to 28% of the largest logit on this
    // random model (whose attention is far more sensitive than a trained one's; the
    // golden perplexity test holds q4_0 to the real model).
    quantized_kv_cache_paged_and_contiguous(KvDtype::Q4_0, 18, 0.4);
}

#[test]
fn paged_forward_rejects_inconsistent_inputs_without_panicking() {
    let (dir, _) = Spec::default().write("paged-bad");
    let model = load(&dir, DType::F32);
    let mut cache = PagedKvCache::new(model.shape(), 4, 4, KvDtype::F32).unwrap();
    let batch = ScheduledBatch {
        seqs: vec![ScheduledSeq {
            seq: SeqId(0),
            tokens: vec![1, 2],
            start_pos: 0,
            slots: vec![0, 1],
            block_table: vec![0],
            sample: true,
        }],
    };
    let meta = llmem_engine::engine::paged_metadata(&batch);
    let err = |r: llmem_engine::Result<Tensor>| r.unwrap_err().to_string();
    let mut fwd = |ids: &[u32], pos: &[u32], rows: &[usize]| {
        err(model.forward_paged(ids, pos, &meta, &mut cache, rows))
    };
    assert!(fwd(&[1], &[0], &[0]).contains("positions"));
    assert!(fwd(&[1, 2], &[0, 1], &[2]).contains("sample row"));
    assert!(fwd(&[1, 99], &[0, 1], &[1]).contains("vocabulary"));
    assert!(fwd(&[1, 2], &[0, 64], &[1]).contains("max_position_embeddings"));
    // A step of prefill chunks only samples nothing: no logits rows.
    let none = model
        .forward_paged(&[1, 2], &[0, 1], &meta, &mut cache, &[])
        .unwrap();
    assert_eq!(none.dims(), &[0, 40]);
    let other = ModelShape {
        num_hidden_layers: 3,
        ..model.shape().clone()
    };
    let mut wrong = PagedKvCache::new(&other, 4, 4, KvDtype::F32).unwrap();
    assert!(err(model.forward_paged(&[1, 2], &[0, 1], &meta, &mut wrong, &[1])).contains("layers"));
    std::fs::remove_dir_all(dir).unwrap();
}

// ---- the engine ----------------------------------------------------------------------

fn greedy_stop(max_tokens: usize) -> StopConditions {
    StopConditions {
        max_tokens,
        stop_token_ids: vec![3],
        ignore_eos: true,
    }
}

fn engine_config(
    model: &Model,
    num_blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_batched_tokens: usize,
) -> EngineConfig {
    EngineConfig {
        block_size,
        num_blocks,
        kv_dtype: KvDtype::F32,
        max_num_seqs,
        max_batched_tokens,
        max_model_len: model.max_context(),
        kv_layout: KvLayout::Paged,
    }
}

/// Run every prompt through one engine to the end; returns each prompt's generated
/// tokens and the engine's final stats. Checks that each request finishes exactly once,
/// with `max_tokens` tokens, and that every block is free at the end.
fn run_engine(
    model: &Model,
    config: EngineConfig,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> (Vec<Vec<u32>>, EngineStats) {
    run_engine_sampling(model, config, prompts, max_tokens, |_| {
        SamplingParams::default()
    })
}

/// [`run_engine`] with the sampling parameters of each request (by index).
fn run_engine_sampling(
    model: &Model,
    config: EngineConfig,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    params: impl Fn(usize) -> SamplingParams,
) -> (Vec<Vec<u32>>, EngineStats) {
    let mut engine = Engine::new(model.clone(), config).unwrap();
    let ids: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine
                .add_request(p.clone(), params(i), greedy_stop(max_tokens))
                .unwrap()
        })
        .collect();
    let mut out: HashMap<_, Vec<u32>> = HashMap::new();
    let mut finished = HashMap::new();
    let mut steps = 0;
    while engine.has_work() {
        for o in engine.step().unwrap() {
            assert!(!finished.contains_key(&o.id), "token after finish");
            out.entry(o.id).or_default().push(o.token);
            if let Some(r) = o.finished {
                finished.insert(o.id, r);
            }
        }
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    let stats = engine.stats();
    assert_eq!(stats.blocks_used, 0, "blocks still held at the end");
    assert_eq!(stats.blocks_free, config.num_blocks);
    assert_eq!(finished.len(), prompts.len());
    let tokens: Vec<Vec<u32>> = ids.iter().map(|id| out.remove(id).unwrap()).collect();
    for t in &tokens {
        assert_eq!(t.len(), max_tokens);
    }
    assert!(finished.values().all(|r| *r == EngineFinish::Length));
    (tokens, stats)
}

/// 32 prompts of mixed lengths (1 to 24 tokens); some share a prefix, so the prefix
/// cache is exercised too.
fn mixed_prompts() -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(2024);
    let shared: Vec<u32> = (0..9).map(|_| (rng.next_u64() % 40) as u32).collect();
    (0..32)
        .map(|i| {
            let len = 1 + (rng.next_u64() % 24) as usize;
            let mut p: Vec<u32> = if i % 4 == 0 && len > shared.len() {
                shared.clone()
            } else {
                vec![]
            };
            while p.len() < len {
                p.push((rng.next_u64() % 40) as u32);
            }
            p
        })
        .collect()
}

#[test]
fn engine_batches_preempts_and_matches_each_sequence_run_alone() {
    let (dir, _) = Spec::default().write("engine");
    let model = load(&dir, DType::F32);
    let prompts = mixed_prompts();
    let max_tokens = 12;
    // Alone: one request per engine, a roomy cache.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            run_engine(
                &model,
                engine_config(&model, 64, 4, 1, 64),
                std::slice::from_ref(p),
                max_tokens,
            )
            .0
            .remove(0)
        })
        .collect();
    // The paged engine alone generates what the contiguous `generate` does.
    let tok = llmem_engine::weights::tokenizer::load_tokenizer(&dir).unwrap();
    for (p, want) in prompts.iter().zip(&alone).take(4) {
        let mut req = request(p.clone(), max_tokens);
        req.ignore_eos = true;
        assert_eq!(
            &generate(&model, &tok, &req, |_| {}).unwrap().token_ids,
            want
        );
    }
    // (num_blocks, block_size, max_num_seqs, max_batched_tokens, expect preemption)
    let cases = [
        (256, 4, 1, 64, false),
        (256, 4, 8, 64, false),
        (256, 16, 32, 512, false),
        (256, 1, 32, 16, false),
        // 12 blocks of 4 hold one 36-token sequence with 3 blocks to spare: 32 requests
        // must take turns, and running sequences get preempted as they grow.
        (12, 4, 32, 64, true),
        (40, 1, 8, 8, true),
    ];
    let mut prefix_hits = 0;
    for (num_blocks, block_size, seqs, budget, expect_preemption) in cases {
        let config = engine_config(&model, num_blocks, block_size, seqs, budget);
        let (got, stats) = run_engine(&model, config, &prompts, max_tokens);
        prefix_hits += stats.prefix_hit_tokens;
        for (i, (g, w)) in got.iter().zip(&alone).enumerate() {
            assert_eq!(g, w, "{config:?}: request {i} differs from its run alone");
        }
        assert!(stats.peak_running <= seqs);
        if expect_preemption {
            assert!(stats.preemptions > 0, "{config:?}: no preemption");
        }
        if seqs > 1 {
            assert!(stats.peak_running > 1, "{config:?}: never batched");
        }
    }
    assert!(
        prefix_hits > 0,
        "the shared prefixes never hit the prefix cache"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// At the same KV budget, the contiguous layout (max_model_len slots reserved per
/// sequence) runs fewer sequences at once than the paged one, and both generate the same
/// greedy tokens.
#[test]
fn contiguous_layout_admits_fewer_sequences_with_the_same_tokens() {
    let (dir, _) = Spec::default().write("engine-layouts");
    let model = load(&dir, DType::F32);
    let prompts = mixed_prompts();
    let max_tokens = 12;
    // 36 blocks of 4; max_model_len 36 (longest prompt 24 + 12): contiguous reserves 9
    // blocks per sequence, so 4 fit at once.
    let paged = EngineConfig {
        max_model_len: 36,
        ..engine_config(&model, 36, 4, 32, 256)
    };
    let contiguous = EngineConfig {
        kv_layout: KvLayout::Contiguous,
        ..paged
    };
    let (got_paged, paged_stats) = run_engine(&model, paged, &prompts, max_tokens);
    let (got_contiguous, contiguous_stats) = run_engine(&model, contiguous, &prompts, max_tokens);
    assert_eq!(got_paged, got_contiguous);
    assert_eq!(contiguous_stats.peak_running, 4);
    assert!(
        paged_stats.peak_running > contiguous_stats.peak_running,
        "paged {paged_stats:?} vs contiguous {contiguous_stats:?}"
    );
    // Reservations never grow, so nothing is preempted; nothing is shared either.
    assert_eq!(contiguous_stats.preemptions, 0);
    assert_eq!(contiguous_stats.prefix_hit_tokens, 0);
    assert!(paged_stats.prefix_hit_tokens > 0);
    // A cache that cannot hold one reservation is refused up front.
    let err = Engine::new(
        model.clone(),
        EngineConfig {
            num_blocks: 8,
            ..contiguous
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("reserves 9 blocks"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn seeded_sampling_is_per_request_and_survives_preemption() {
    let (dir, _) = Spec::default().write("engine-seed");
    let model = load(&dir, DType::F32);
    let prompts: Vec<Vec<u32>> = mixed_prompts().into_iter().take(8).collect();
    let params = |i: usize| SamplingParams {
        temperature: 1.3,
        top_k: Some(20),
        top_p: Some(0.95),
        seed: 100 + i as u64,
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let config = engine_config(&model, 64, 4, 1, 64);
            run_engine_sampling(&model, config, std::slice::from_ref(p), 10, |_| params(i))
                .0
                .remove(0)
        })
        .collect();
    let config = engine_config(&model, 12, 4, 8, 64);
    let (got, stats) = run_engine_sampling(&model, config, &prompts, 10, params);
    assert!(stats.preemptions > 0);
    assert_eq!(got, alone);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn engine_rejects_requests_it_cannot_serve() {
    let (dir, _) = Spec::default().write("engine-bad");
    let model = load(&dir, DType::F32);
    let mut engine = Engine::new(model.clone(), engine_config(&model, 4, 4, 4, 64)).unwrap();
    let mut add = |p: Vec<u32>, max_tokens: usize| {
        engine
            .add_request(p, SamplingParams::default(), greedy_stop(max_tokens))
            .unwrap_err()
            .to_string()
    };
    assert!(add(vec![], 4).contains("empty"));
    assert!(add(vec![1; 64], 4).contains("max_model_len"));
    assert!(add(vec![40], 4).contains("vocabulary"));
    // 4 blocks of 4 hold 16 tokens; 10 + 8 - 1 = 17 slots can never fit.
    let err = add(vec![1; 10], 8);
    assert!(
        err.contains("5 KV blocks") && err.contains("only 4"),
        "{err}"
    );
    assert!(!engine.has_work());
    // 10 + 7 - 1 = 16 fits exactly.
    let id = engine
        .add_request(vec![1; 10], SamplingParams::default(), greedy_stop(7))
        .unwrap();
    assert!(engine.has_work());
    engine.step().unwrap();
    assert!(engine.abort(id));
    assert!(!engine.abort(id));
    assert!(!engine.has_work());
    assert_eq!(engine.stats().blocks_used, 0);
    for bad in [
        engine_config(&model, 0, 4, 4, 64),
        engine_config(&model, 4, 0, 4, 64),
        engine_config(&model, 4, 4, 0, 64),
        engine_config(&model, 4, 4, 4, 0),
        EngineConfig {
            max_model_len: 65,
            ..engine_config(&model, 4, 4, 4, 64)
        },
    ] {
        assert!(Engine::new(model.clone(), bad).is_err(), "{bad:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn budget_sizing_subtracts_weights_activations_and_overhead() {
    let (dir, _) = Spec::default().write("budget");
    let model = load(&dir, DType::F32);
    let config = engine_config(&model, 0, 4, 8, 32);
    let per_block = llmem_engine::cache::paged::block_bytes(model.shape(), 4, KvDtype::F32);
    let fixed = model.weights_bytes() + model.paged_activation_peak_bytes(32, 8) + 1000;
    let budget = fixed + 100 * per_block + 7;
    let (blocks, report) = KvSizing::Budget(budget)
        .resolve(&model, &config, 1000)
        .unwrap();
    let report = report.unwrap();
    assert_eq!(blocks, 100);
    assert_eq!(report.unused_bytes, 7);
    assert_eq!(
        report.weights_bytes
            + report.activation_bytes
            + report.runtime_overhead_bytes
            + report.kv_cache_bytes
            + report.unused_bytes,
        budget
    );
    let planned = report.planned.clone().unwrap();
    assert_eq!(planned.weights_bytes, model.weights_bytes());
    // One activation formula: the engine reserves what the planner plans.
    assert_eq!(planned.activation_bytes, report.activation_bytes);
    // 100 blocks hold 6 sequences of max_model_len = 64 tokens (16 blocks each).
    assert_eq!(report.max_concurrency, 6);
    assert!(planned.max_concurrency >= 1);
    assert_eq!(planned.kv_bytes_per_token * 4, per_block);
    let shown = report.to_string();
    for line in [
        "weights",
        "activations",
        "runtime overhead",
        "KV cache",
        "planner",
        "fit at once: 6",
    ] {
        assert!(shown.contains(line), "{shown}");
    }
    assert_eq!(
        KvSizing::Blocks(9).resolve(&model, &config, 0).unwrap(),
        (9, None)
    );
    // One sequence of max_model_len = 64 tokens needs 16 blocks: 1 byte short fails.
    let err = KvSizing::Budget(fixed + 16 * per_block - 1)
        .resolve(&model, &config, 1000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 B short"), "{err}");
    assert!(err.contains("--max-batched-tokens") && err.contains("--kv-dtype bf16"));
    std::fs::remove_dir_all(dir).unwrap();
}

mod engine_properties {
    //! Random interleavings of add, abort and step on a small cache: the engine never
    //! panics, never emits for a finished or aborted request, never exceeds max_tokens,
    //! keeps its block counts consistent, and ends with every block free.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Add { len: usize, max_tokens: usize },
        Abort { pick: usize },
        Step,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..30, 1usize..12).prop_map(|(len, max_tokens)| Op::Add { len, max_tokens }),
            any::<usize>().prop_map(|pick| Op::Abort { pick }),
            Just(Op::Step),
            Just(Op::Step),
        ]
    }

    fn model() -> &'static Model {
        static MODEL: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
        MODEL.get_or_init(|| {
            let (dir, _) = Spec::default().write("engine-prop");
            let model = load(&dir, DType::F32);
            std::fs::remove_dir_all(dir).unwrap();
            model
        })
    }

    type Id = llmem_engine::engine::RequestId;

    /// One step; checks every output against the live requests `(id, max_tokens)`.
    fn step(
        engine: &mut Engine,
        live: &mut Vec<(Id, usize)>,
        emitted: &mut HashMap<Id, usize>,
        max_num_seqs: usize,
    ) -> Result<(), TestCaseError> {
        for o in engine.step().unwrap() {
            let Some(i) = live.iter().position(|(id, _)| *id == o.id) else {
                return Err(TestCaseError::fail(format!(
                    "token for a dead request {:?}",
                    o.id
                )));
            };
            let n = emitted.entry(o.id).or_default();
            *n += 1;
            prop_assert!(*n <= live[i].1, "more than max_tokens");
            if o.finished.is_some() {
                prop_assert_eq!(*n, live[i].1);
                live.swap_remove(i);
            }
        }
        let s = engine.stats();
        prop_assert_eq!(s.blocks_used + s.blocks_free, s.blocks_total);
        prop_assert!(s.running <= max_num_seqs);
        Ok(())
    }

    fn check_interleaving(
        ops: Vec<Op>,
        num_blocks: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_batched_tokens: usize,
    ) -> Result<(), TestCaseError> {
        let model = model();
        let config = engine_config(
            model,
            num_blocks,
            block_size,
            max_num_seqs,
            max_batched_tokens,
        );
        let mut engine = Engine::new(model.clone(), config).unwrap();
        let mut live: Vec<(Id, usize)> = Vec::new();
        let mut emitted: HashMap<Id, usize> = HashMap::new();
        let mut next_token = 0u32;
        for op in ops {
            match op {
                Op::Add { len, max_tokens } => {
                    let prompt: Vec<u32> = (0..len as u32).map(|i| (next_token + i) % 7).collect();
                    next_token += 1;
                    let stop = greedy_stop(max_tokens);
                    match engine.add_request(prompt, SamplingParams::default(), stop) {
                        Ok(id) => live.push((id, max_tokens)),
                        Err(e) => prop_assert!(e.to_string().contains("KV blocks"), "{}", e),
                    }
                }
                Op::Abort { pick } => {
                    if !live.is_empty() {
                        let (id, _) = live.swap_remove(pick % live.len());
                        prop_assert!(engine.abort(id));
                    }
                }
                Op::Step => step(&mut engine, &mut live, &mut emitted, max_num_seqs)?,
            }
        }
        let mut guard = 0;
        while engine.has_work() {
            step(&mut engine, &mut live, &mut emitted, max_num_seqs)?;
            guard += 1;
            prop_assert!(guard < 5_000, "the engine does not finish");
        }
        prop_assert!(live.is_empty(), "requests never finished: {:?}", live);
        let s = engine.stats();
        prop_assert_eq!(s.blocks_used, 0);
        prop_assert_eq!(s.blocks_free, num_blocks);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn engine_invariants_hold_under_any_interleaving(
            ops in prop::collection::vec(op(), 1..60),
            num_blocks in 4usize..24,
            block_size in prop::sample::select(vec![1usize, 2, 4, 16]),
            max_num_seqs in 1usize..5,
            max_batched_tokens in 1usize..20,
        ) {
            check_interleaving(ops, num_blocks, block_size, max_num_seqs, max_batched_tokens)?;
        }
    }
}

// ---- quantized weights (engine/src/quant.rs) -----------------------------------------

/// Every engine precision, with and without --keep-embeddings, on tied and untied tiny
/// models with biases: the engine's measured weight bytes equal the planner's. The tiny
/// shapes (hidden 32, intermediate 48) make every k-quant fall back to a 32-block format
/// and `down_proj` (rows of 48) fall back to f16, so the fallback rule is covered too.
#[test]
fn quantized_weight_bytes_equal_the_planner() {
    use llmem_engine::weights::quant::{WeightFormat, ENGINE_PRECISIONS};
    for (tag, spec) in [
        ("qbytes-tied", Spec::default()),
        (
            "qbytes-untied",
            Spec {
                tie: false,
                attention_bias: true,
                mlp_bias: true,
                hidden: 64,
                inter: 256,
                head_dim: 16,
                ..Spec::default()
            },
        ),
    ] {
        let (dir, _) = spec.write(tag);
        for p in ENGINE_PRECISIONS {
            for keep_embeddings in [false, true] {
                let fmt = WeightFormat {
                    precision: p,
                    keep_embeddings,
                    as_stored: false,
                };
                let model = Model::load_dir_with(&dir, &fmt, &Device::Cpu).unwrap();
                let planned =
                    llmem_planner::model_weights_bytes(model.shape(), p, keep_embeddings).unwrap();
                assert_eq!(
                    model.weights_bytes(),
                    planned,
                    "{tag} {p} keep_embeddings={keep_embeddings}"
                );
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// A quantized tiny model still computes the same function: its logits stay close to
/// f32's (relative to the logit scale), prefill + decode equals the full pass, and the
/// error grows as the bits shrink (q8_0 closer than q4_0).
#[test]
fn quantized_models_stay_close_to_f32_and_decode_like_prefill() {
    use llmem_engine::weights::quant::WeightFormat;
    use llmem_planner::Precision;
    let spec = Spec {
        hidden: 64,
        inter: 256,
        head_dim: 16,
        ..Spec::default()
    };
    let (dir, _) = spec.write("qclose");
    let f32_logits = full_logits(&load(&dir, DType::F32), &IDS);
    let mut errors = Vec::new();
    for (p, rel) in [
        // Random uniform weights through two layers: measured 0.04 (q8_0) and 0.42
        // (4-bit) of the logit scale; activations are also quantized to 8 bits.
        (Precision::Q8_0, 0.08),
        (Precision::Q4_0, 0.6),
        (Precision::Q4K, 0.6),
    ] {
        let fmt = WeightFormat {
            precision: p,
            keep_embeddings: false,
            as_stored: false,
        };
        let model = Model::load_dir_with(&dir, &fmt, &Device::Cpu).unwrap();
        assert_eq!(model.dtype(), DType::F32);
        let got = full_logits(&model, &IDS);
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&f32_logits) {
            let scale = w.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let d = max_diff(g, &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
            worst = worst.max(d / scale);
        }
        println!("{p}: worst logit error {worst:.4} of the logit scale");
        assert!(worst < rel, "{p}: relative logit error {worst} >= {rel}");
        errors.push(worst);
        // Prefill of 5 tokens, then 4 single-token decodes, against the full pass.
        let mut kv = model.new_cache(IDS.len()).unwrap();
        model
            .forward(&IDS[..5], &AttnMetadata::single(0, 5), &mut [&mut kv])
            .unwrap();
        for i in 5..IDS.len() {
            let step = rows(
                &model
                    .forward(&IDS[i..i + 1], &AttnMetadata::single(i, 1), &mut [&mut kv])
                    .unwrap(),
            );
            let full: Vec<f64> = got[i].iter().map(|&x| x as f64).collect();
            // Decode quantizes one activation row, prefill many: same blocks, same math.
            assert!(
                max_diff(&step[0], &full) < 1e-3,
                "{p}: decode vs prefill at {i}"
            );
        }
    }
    assert!(
        errors[0] < errors[1],
        "q8_0 {} vs q4_0 {}",
        errors[0],
        errors[1]
    );
    std::fs::remove_dir_all(dir).unwrap();
}
