//! `convert_gguf` on small GGUF files written here with candle's GGUF writer: a tiny llama
//! model end to end (names, shapes, un-permuted q/k, tied head, dtypes, tokenizer), and
//! damaged or foreign files that must give an error naming the problem, never a panic.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llmem_engine::weights::gguf::convert::{convert_gguf, ConvertOptions, OutDtype};
use llmem_engine::weights::gguf::file::unpermute_rows;
use llmem_engine::Error;

mod common;

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 64;

fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens = common::byte_vocab();
    let mut types = vec![3, 3];
    types.extend([1; 256]);
    let merges = vec!["h e".to_string(), "l l".to_string()];
    tokens.extend(["he".to_string(), "ll".to_string()]);
    types.extend([1, 1]);
    (tokens, types, merges)
}

/// Deterministic values, distinct per tensor.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0)
        .collect()
}

fn qtensor(rows: usize, cols: Option<usize>, seed: usize, dtype: GgmlDType) -> QTensor {
    let t = match cols {
        Some(c) => Tensor::from_vec(values(rows * c, seed), (rows, c), &Device::Cpu),
        None => Tensor::from_vec(values(rows, seed), rows, &Device::Cpu),
    }
    .unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn strings(xs: &[String]) -> Value {
    Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect())
}

/// Write a GGUF; `arch` and `untied` vary the model.
fn write_gguf(path: &Path, arch: &str, untied: bool) {
    let (tokens, types, merges) = vocab();
    let vocab_size = tokens.len();
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(1)),
        (format!("{arch}.context_length"), Value::U32(256)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(HIDDEN as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(50_000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{{ messages }}".into()),
        ),
    ];
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let (q_rows, kv_rows) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let f32_ = GgmlDType::F32;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            qtensor(vocab_size, Some(HIDDEN), 1, GgmlDType::Q8_0),
        ),
        ("output_norm.weight".into(), qtensor(HIDDEN, None, 2, f32_)),
        (
            "blk.0.attn_norm.weight".into(),
            qtensor(HIDDEN, None, 3, f32_),
        ),
        (
            "blk.0.ffn_norm.weight".into(),
            qtensor(HIDDEN, None, 4, f32_),
        ),
        (
            "blk.0.attn_q.weight".into(),
            qtensor(q_rows, Some(HIDDEN), 5, f32_),
        ),
        (
            "blk.0.attn_k.weight".into(),
            qtensor(kv_rows, Some(HIDDEN), 6, f32_),
        ),
        (
            "blk.0.attn_v.weight".into(),
            qtensor(kv_rows, Some(HIDDEN), 7, f32_),
        ),
        (
            "blk.0.attn_output.weight".into(),
            qtensor(HIDDEN, Some(q_rows), 8, f32_),
        ),
        (
            "blk.0.ffn_gate.weight".into(),
            qtensor(FFN, Some(HIDDEN), 9, f32_),
        ),
        (
            "blk.0.ffn_up.weight".into(),
            qtensor(FFN, Some(HIDDEN), 10, f32_),
        ),
        (
            "blk.0.ffn_down.weight".into(),
            qtensor(HIDDEN, Some(FFN), 11, GgmlDType::Q4_1),
        ),
    ];
    if untied {
        tensors.push((
            "output.weight".into(),
            qtensor(vocab_size, Some(HIDDEN), 12, f32_),
        ));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Read a tensor from a safetensors file as f32 (converting f16/bf16).
fn read_st(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let data = t.data();
    let vals = match t.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.shape().to_vec(), vals)
}

fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn tiny_llama_converts_with_hf_names_and_unpermuted_qk() {
    let dir = tmp();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "llama", false);
    let out = dir.path().join("hf");
    let summary = convert_gguf(&gguf, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(summary.tensors, 11);
    let st = out.join("model.safetensors");
    let names = tensor_names(&st);
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight".to_string()));
    assert!(!names.iter().any(|n| n == "lm_head.weight"), "{names:?}");

    let (shape, q) = read_st(&st, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(shape, vec![HEADS * HEAD_DIM, HIDDEN]);
    let want = unpermute_rows(
        &values(HEADS * HEAD_DIM * HIDDEN, 5),
        HEADS * HEAD_DIM,
        HIDDEN,
        HEADS,
    )
    .unwrap();
    assert_eq!(q, want);
    let (_, k) = read_st(&st, "model.layers.0.self_attn.k_proj.weight");
    let kv_rows = KV_HEADS * HEAD_DIM;
    assert_eq!(
        k,
        unpermute_rows(&values(kv_rows * HIDDEN, 6), kv_rows, HIDDEN, KV_HEADS).unwrap()
    );
    // v is not permuted.
    let (_, v) = read_st(&st, "model.layers.0.self_attn.v_proj.weight");
    assert_eq!(v, values(kv_rows * HIDDEN, 7));
    // Quantized tensors come back as candle's dequantization.
    let (shape, down) = read_st(&st, "model.layers.0.mlp.down_proj.weight");
    assert_eq!(shape, vec![HIDDEN, FFN]);
    let q41 = qtensor(HIDDEN, Some(FFN), 11, GgmlDType::Q4_1)
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(down, q41);

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], HIDDEN);
    assert_eq!(cfg["num_key_value_heads"], KV_HEADS);
    assert_eq!(cfg["rope_theta"].as_f64(), Some(50_000.0));
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-6));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["vocab_size"], 260);
    assert_eq!(cfg["torch_dtype"], "float32");
    assert!(cfg.get("head_dim").is_none());

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok
        .encode("<|im_start|>hell1", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids, vec![1, 258, 259, 2 + u32::from(b'1')]);
    let tcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tcfg["chat_template"], "{{ messages }}");
    assert_eq!(tcfg["bos_token"], "<|im_start|>");
    assert!(out.join("generation_config.json").is_file());
}

#[test]
fn untied_model_gets_lm_head_and_half_dtypes() {
    let dir = tmp();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "llama", true);
    for (dtype, torch) in [(OutDtype::F16, "float16"), (OutDtype::Bf16, "bfloat16")] {
        let out = dir.path().join(torch);
        let opts = ConvertOptions {
            dtype,
            progress: false,
        };
        let summary = convert_gguf(&gguf, &out, &opts).unwrap();
        assert_eq!(summary.tensors, 12);
        let st = out.join("model.safetensors");
        assert!(tensor_names(&st).contains(&"lm_head.weight".to_string()));
        let (_, norm) = read_st(&st, "model.norm.weight");
        for (a, b) in norm.iter().zip(values(HIDDEN, 2)) {
            assert!((a - b).abs() <= b.abs() / 128.0, "{a} vs {b}");
        }
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(cfg.contains(torch) && cfg.contains("\"tie_word_embeddings\": false"));
    }
}

fn convert_err(gguf: &Path) -> (Error, PathBuf) {
    let out = gguf.with_extension("out");
    let err = convert_gguf(gguf, &out, &ConvertOptions::default()).unwrap_err();
    (err, out)
}

#[test]
fn non_llama_architecture_is_an_error_naming_file_and_architecture() {
    let dir = tmp();
    let gguf = dir.path().join("falcon.gguf");
    write_gguf(&gguf, "falcon", false);
    let (err, out) = convert_err(&gguf);
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("falcon.gguf") && msg.contains("`falcon`"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let dir = tmp();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, "llama", false);
    let bytes = std::fs::read(&good).unwrap();
    let len = bytes.len();
    for cut in [0, 3, 7, 20, 200, len / 3, len / 2, len - 100, len - 1] {
        let bad = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let (err, out) = convert_err(&bad);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("cut{cut}.gguf")),
            "cut at {cut}: {msg}"
        );
        assert!(
            !out.exists(),
            "cut at {cut}: a partial output was left behind"
        );
    }
    // Cut inside the tensor data: the error names the tensor.
    let bad = dir.path().join("data.gguf");
    std::fs::write(&bad, &bytes[..len - 100]).unwrap();
    let (err, _) = convert_err(&bad);
    assert!(matches!(err, Error::GgufTensor { .. }), "{err:?}");
}

#[test]
fn not_a_gguf_and_missing_file_are_errors() {
    let dir = tmp();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all, just text").unwrap();
    let (err, _) = convert_err(&junk);
    assert!(matches!(err, Error::GgufRead { .. }), "{err:?}");
    let (err, _) = convert_err(&dir.path().join("absent.gguf"));
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.gguf"));
}
