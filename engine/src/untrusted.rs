//! Untrusted bytes into every parser of the engine: one entry per fuzz target.
//!
//! Owns: the code each target of `fuzz/` runs on one input, so the fuzzer and the
//! regression test (`tests/fuzz_regressions.rs`, which replays every saved crash in CI)
//! exercise the same calls. Each entry writes the bytes where the real reader expects
//! them (a file in a scratch directory: the readers map and open files, and that is the
//! path a damaged download takes) and runs the reader end to end.
//!
//! Invariants: an entry returns `Ok` or `Err` for any input; a panic, an abort, a
//! hang or an allocation past the fuzzer's limit is a bug in the reader it calls. The
//! errors are discarded here: their wording is tested where each reader lives.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::chat::{render_chat, ChatMessage};
use crate::config::GenerationConfig;
use crate::model::Model;
use crate::weights::gguf::file::{GgufFile, LlamaParams};
use crate::weights::gguf::vocab::{tokenizer_from_json, GgufVocab};
use crate::weights::source::GgufModel;

/// A scratch directory of this process and this target, created on first use. Inputs
/// overwrite the same files, so a long fuzzing run leaves one small directory behind.
pub fn scratch_dir(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "llmem-fuzz-{target}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Replace `dir`'s files by `files` (name, bytes).
fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("the scratch directory is writable");
    }
}

/// A model small enough that every tensor of a fuzzed file may be loaded: what the
/// `safetensors` target's files are read against.
pub const TINY_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
"num_key_value_heads":1,"vocab_size":16,"max_position_embeddings":32,"rms_norm_eps":1e-5,
"rope_theta":10000.0,"tie_word_embeddings":true,"torch_dtype":"float32"}"#;

/// A GGUF file: header, metadata, tensor table, the llama hyper-parameters, the
/// vocabulary turned into a tokenizer, the generation settings and chat template, and
/// (when the header makes a model) every tensor loaded as stored and dequantized.
pub fn gguf(data: &[u8]) {
    let dir = scratch_dir("gguf");
    write_files(&dir, &[("model.gguf", data)]);
    let path = dir.join("model.gguf");
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    let _ = LlamaParams::from_gguf(&file);
    if let Ok(vocab) = GgufVocab::from_gguf(&file) {
        if let Ok(doc) = vocab.tokenizer_json() {
            if let Ok(tok) = tokenizer_from_json(&doc, &path) {
                if let Ok(enc) = tok.encode("Hello, world! <|im_start|>", true) {
                    let _ = tok.decode(enc.get_ids(), false);
                }
            }
        }
    }
    for name in file.tensor_names() {
        let _ = file.dequantize_f32(name);
    }
    drop(file);
    if let Ok(g) = GgufModel::open(&path) {
        if let Some(t) = &g.config.chat_template {
            let _ = render_chat(t, &messages("hi"), None, None, true);
        }
        let _ = Model::load_gguf(&path, None, &Device::Cpu);
    }
}

/// A safetensors file read against [`TINY_CONFIG`]: the planner's header reader
/// (`llmem plan` on a directory) and the engine's loader, f32 and bf16.
pub fn safetensors(data: &[u8]) {
    let dir = scratch_dir("safetensors");
    write_files(
        &dir,
        &[
            ("config.json", TINY_CONFIG.as_bytes()),
            ("model.safetensors", data),
        ],
    );
    let _ = llmem_planner::checkpoint::read_checkpoint(&dir);
    let _ = Model::load_dir(&dir, DType::F32, &Device::Cpu);
    let _ = Model::load_dir(&dir, DType::BF16, &Device::Cpu);
}

/// The JSON documents of a model directory. The first byte picks the file the rest
/// becomes (`config.json`, `generation_config.json`, `tokenizer_config.json` or
/// `chat_template.jinja`), the others are the tiny model's; then the planner's shape,
/// the generation settings and the chat template they give are read.
pub fn configs(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let name = match which % 4 {
        0 => "config.json",
        1 => "generation_config.json",
        2 => "tokenizer_config.json",
        _ => "chat_template.jinja",
    };
    let dir = scratch_dir("configs");
    let mut files: Vec<(&str, &[u8])> = vec![(name, rest)];
    if name != "config.json" {
        files.push(("config.json", TINY_CONFIG.as_bytes()));
    }
    write_files(&dir, &files);
    if let Ok(shape) = llmem_planner::ModelShape::from_path(&dir) {
        let _ = shape.validate();
    }
    if let Ok(config) = GenerationConfig::from_dir(&dir) {
        if let Some(t) = &config.chat_template {
            let bos = config.bos_token.clone();
            let _ = render_chat(t, &messages("hi"), bos.as_deref(), None, true);
        }
    }
}

/// A chat template (the bytes before the first NUL) rendered over a conversation
/// whose messages are the bytes after it.
pub fn chat_template(data: &[u8]) {
    let (template, content) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let template = String::from_utf8_lossy(template);
    let content = String::from_utf8_lossy(content);
    let _ = render_chat(
        &template,
        &messages(&content),
        Some("<s>"),
        Some("</s>"),
        true,
    );
}

/// A system, user, assistant and user turn, each carrying `content`.
fn messages(content: &str) -> Vec<ChatMessage> {
    ["system", "user", "assistant", "user"]
        .iter()
        .map(|role| ChatMessage {
            role: (*role).to_string(),
            content: content.to_string(),
        })
        .collect()
}

/// A GGUF vocabulary, made from the input: a tokenizer model name, token strings,
/// types, scores and merges, special ids; turned into a tokenizer that then encodes
/// and decodes text from the input. The GGUF around the vocabulary is well formed, so
/// the fuzzer spends its time on the vocabulary builder, not on the header.
pub fn gguf_vocab(data: &[u8]) {
    use candle_core::quantized::gguf_file::Value;
    // Sections separated by 0xFF: model, tokens (\n-separated), merges (\n-separated),
    // types (one byte each), text to encode; then 4 special ids from the last bytes.
    let mut parts = data.split(|&b| b == 0xFF);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
    let model = next();
    let tokens: Vec<String> = next().split('\n').map(str::to_string).collect();
    let merges: Vec<String> = next()
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let types: Vec<i32> = next().bytes().map(|b| i32::from(b % 8)).collect();
    let text = next();
    let id = |k: usize| {
        let b = data
            .get(data.len().wrapping_sub(k + 1))
            .copied()
            .unwrap_or(0);
        Value::U32(u32::from(b))
    };
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String(model)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", id(0)),
        ("tokenizer.ggml.eos_token_id", id(1)),
        ("tokenizer.ggml.padding_token_id", id(2)),
        ("tokenizer.ggml.unknown_token_id", id(3)),
    ];
    if !merges.is_empty() {
        md.push((
            "tokenizer.ggml.merges",
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ));
    }
    if !types.is_empty() {
        md.push((
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ));
        md.push((
            "tokenizer.ggml.scores",
            Value::Array((0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect()),
        ));
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    if candle_core::quantized::gguf_file::write(&mut bytes, &md_refs, &[]).is_err() {
        return;
    }
    let dir = scratch_dir("gguf_vocab");
    write_files(&dir, &[("vocab.gguf", bytes.get_ref())]);
    let path = dir.join("vocab.gguf");
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    let Ok(vocab) = GgufVocab::from_gguf(&file) else {
        return;
    };
    let _ = vocab.tokenizer_config_json(32);
    let Ok(doc) = vocab.tokenizer_json() else {
        return;
    };
    let Ok(tok) = tokenizer_from_json(&doc, &path) else {
        return;
    };
    if let Ok(enc) = tok.encode(text.as_str(), true) {
        let _ = tok.decode(enc.get_ids(), false);
        let _ = tok.decode(enc.get_ids(), true);
    }
}

/// One starting input of a fuzz target.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The target (`fuzz/fuzz_targets/<target>.rs`).
    pub target: &'static str,
    /// A file name for it in the seed directory.
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The seed corpus of the engine's targets: small well-formed files of every kind
/// (GGUF models in f32, Q8_0, Q4_0 and Q4_K with gpt2 and llama vocabularies,
/// safetensors in f32 and bf16 for [`TINY_CONFIG`], the presets' configs), and, when
/// the built-in model is cached, its GGUF header, config files and chat template.
pub fn seeds() -> Vec<Seed> {
    use candle_core::quantized::GgmlDType;
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push(Seed {
            target,
            name: name.to_string(),
            bytes,
        })
    };
    for (name, hidden, dtype, spm) in [
        ("tiny-f32-gpt2", 32, GgmlDType::F32, false),
        ("tiny-q8_0-gpt2", 32, GgmlDType::Q8_0, false),
        ("tiny-q4_0-llama", 32, GgmlDType::Q4_0, true),
        ("tiny-q4_k-gpt2", 256, GgmlDType::Q4K, false),
    ] {
        if let Some(bytes) = tiny_gguf(hidden, dtype, spm) {
            add("gguf", name, bytes);
        }
    }
    for (name, dtype) in [
        ("tiny-f32", safetensors::Dtype::F32),
        ("tiny-bf16", safetensors::Dtype::BF16),
    ] {
        add("safetensors", name, tiny_safetensors(dtype));
    }
    add(
        "configs",
        "tiny-config",
        [&[0u8][..], TINY_CONFIG.as_bytes()].concat(),
    );
    for (i, preset) in llmem_planner::preset_names().into_iter().enumerate() {
        if let Ok(shape) = llmem_planner::preset(preset) {
            let doc = serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": shape.hidden_size,
                "intermediate_size": shape.intermediate_size,
                "num_hidden_layers": shape.num_hidden_layers,
                "num_attention_heads": shape.num_attention_heads,
                "num_key_value_heads": shape.num_key_value_heads,
                "vocab_size": shape.vocab_size,
                "max_position_embeddings": shape.max_position_embeddings,
                "tie_word_embeddings": shape.tie_word_embeddings,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
            });
            let mut bytes = vec![(i * 4) as u8];
            bytes.extend(doc.to_string().into_bytes());
            add("configs", &format!("preset-{preset}"), bytes);
        }
    }
    add(
        "configs",
        "generation-config",
        [
            &[1u8][..],
            br#"{"bos_token_id":1,"eos_token_id":[2,3],"do_sample":false}"#,
        ]
        .concat(),
    );
    add(
        "configs",
        "tokenizer-config",
        [
            &[2u8][..],
            br#"{"bos_token":{"content":"<s>"},"eos_token":"</s>","chat_template":[{"name":"default","template":"{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}]}"#,
        ]
        .concat(),
    );
    add(
        "chat_template",
        "roles",
        b"{% for m in messages %}{% if m.role == 'system' %}[{{ m.content }}]{% else %}{{ bos_token }}{{ m.role }}: {{ m.content | trim }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}\0hello"
            .to_vec(),
    );
    add(
        "gguf_vocab",
        "gpt2",
        b"gpt2\xff<s>\n</s>\na\nb\nab\n\xc4\xa0\nhello\xffa b\n\xc4\xa0 a\xff\x03\x03\x01\x01\x01\x01\x01\xffab hello\x00\x01\x00\x01".to_vec(),
    );
    add(
        "gguf_vocab",
        "llama",
        b"llama\xff<unk>\n<s>\n</s>\n\xe2\x96\x81a\na\nb\n<0x41>\xff\xff\x02\x03\x03\x01\x01\x01\x06\xffa b A\x00\x01\x02\x00".to_vec(),
    );
    if let Some(dir) = crate::weights::hub::cached_default_model_dir(None) {
        for (i, file) in [
            "config.json",
            "generation_config.json",
            "tokenizer_config.json",
        ]
        .into_iter()
        .enumerate()
        {
            if let Ok(text) = std::fs::read(dir.join(file)) {
                add(
                    "configs",
                    &format!("default-{file}"),
                    [&[i as u8][..], &text].concat(),
                );
            }
        }
        if let Ok(config) = GenerationConfig::from_dir(&dir) {
            if let Some(t) = config.chat_template {
                add(
                    "chat_template",
                    "default",
                    [t.as_bytes(), b"\0hello"].concat(),
                );
            }
        }
    }
    if let Ok(root) = crate::weights::hub::cache_root() {
        if let Ok(bytes) = std::fs::read(crate::weights::hub::default_gguf_path(&root)) {
            // The header only: metadata and vocabulary, the tensor table cut short.
            add(
                "gguf",
                "default-header-256k",
                bytes[..bytes.len().min(256 << 10)].to_vec(),
            );
        }
    }
    out
}

/// Deterministic values, distinct per tensor.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 1000.0)
        .collect()
}

/// A one-layer llama GGUF of width `hidden` (2 heads, 1 KV head, FFN 2 x hidden),
/// matrices in `dtype`, with a gpt2 (byte-level BPE) or llama (SentencePiece)
/// vocabulary of 32 tokens.
pub fn tiny_gguf(
    hidden: usize,
    dtype: candle_core::quantized::GgmlDType,
    spm: bool,
) -> Option<Vec<u8>> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;
    let mut tokens: Vec<String> = if spm {
        ["<unk>", "<s>", "</s>", "\u{2581}"]
            .map(String::from)
            .to_vec()
    } else {
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u{120}"]
            .map(String::from)
            .to_vec()
    };
    tokens.extend(('a'..='z').map(String::from));
    tokens.extend(["he", "ll"].map(String::from));
    let vocab = tokens.len();
    let (heads, kv_heads, ffn) = (2usize, 1usize, 2 * hidden);
    let head_dim = hidden / heads;
    let u32v = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u32v(1)),
        ("llama.context_length".into(), u32v(64)),
        ("llama.embedding_length".into(), u32v(hidden)),
        ("llama.feed_forward_length".into(), u32v(ffn)),
        ("llama.attention.head_count".into(), u32v(heads)),
        ("llama.attention.head_count_kv".into(), u32v(kv_heads)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        (
            "tokenizer.ggml.model".into(),
            Value::String(if spm { "llama" } else { "gpt2" }.into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..vocab)
                    .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                    .into(),
            ),
        ),
    ];
    if spm {
        meta.push((
            "tokenizer.ggml.scores".into(),
            Value::Array((0..vocab).map(|i| Value::F32(-(i as f32))).collect()),
        ));
    } else {
        meta.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(
                ["h e", "l l"]
                    .iter()
                    .map(|m| Value::String((*m).into()))
                    .collect(),
            ),
        ));
    }
    let q = |rows: usize, cols: usize, seed: usize, dt: GgmlDType| -> Option<QTensor> {
        let t = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).ok()?;
        QTensor::quantize(&t, dt).ok()
    };
    let norm = |seed: usize| -> Option<QTensor> {
        let t = Tensor::from_vec(values(hidden, seed), hidden, &Device::Cpu).ok()?;
        QTensor::quantize(&t, GgmlDType::F32).ok()
    };
    let tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", q(vocab, hidden, 1, GgmlDType::F32)?),
        ("output_norm.weight", norm(2)?),
        ("blk.0.attn_norm.weight", norm(3)?),
        ("blk.0.ffn_norm.weight", norm(4)?),
        (
            "blk.0.attn_q.weight",
            q(heads * head_dim, hidden, 5, dtype)?,
        ),
        (
            "blk.0.attn_k.weight",
            q(kv_heads * head_dim, hidden, 6, dtype)?,
        ),
        (
            "blk.0.attn_v.weight",
            q(kv_heads * head_dim, hidden, 7, dtype)?,
        ),
        (
            "blk.0.attn_output.weight",
            q(hidden, heads * head_dim, 8, dtype)?,
        ),
        ("blk.0.ffn_gate.weight", q(ffn, hidden, 9, dtype)?),
        ("blk.0.ffn_up.weight", q(ffn, hidden, 10, dtype)?),
        ("blk.0.ffn_down.weight", q(hidden, ffn, 11, dtype)?),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &meta_refs, &tensor_refs).ok()?;
    Some(bytes.into_inner())
}

/// The safetensors file of [`TINY_CONFIG`] in `dtype` (f32 or bf16).
fn tiny_safetensors(dtype: safetensors::Dtype) -> Vec<u8> {
    let shapes: [(&str, &[usize]); 11] = [
        ("model.embed_tokens.weight", &[16, 8]),
        ("model.norm.weight", &[8]),
        ("model.layers.0.input_layernorm.weight", &[8]),
        ("model.layers.0.post_attention_layernorm.weight", &[8]),
        ("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", &[4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", &[4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", &[8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.up_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.down_proj.weight", &[8, 16]),
    ];
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let xs = values(shape.iter().product(), i);
            let bytes = match dtype {
                safetensors::Dtype::BF16 => xs
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (name.to_string(), shape.to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                .expect("shape and bytes agree");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("a valid tensor list serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is read without a panic, and the well-formed model seeds load: the
    /// corpus the fuzzer starts from reaches past the headers.
    #[test]
    fn seeds_run_and_the_model_seeds_load() {
        let seeds = seeds();
        for s in &seeds {
            match s.target {
                "gguf" => gguf(&s.bytes),
                "safetensors" => safetensors(&s.bytes),
                "configs" => configs(&s.bytes),
                "chat_template" => chat_template(&s.bytes),
                "gguf_vocab" => gguf_vocab(&s.bytes),
                other => panic!("seed for unknown target {other}"),
            }
        }
        let dir = scratch_dir("seed-check");
        for s in seeds.iter().filter(|s| s.name.starts_with("tiny-")) {
            match s.target {
                "gguf" => {
                    write_files(&dir, &[("m.gguf", &s.bytes)]);
                    Model::load_gguf(&dir.join("m.gguf"), None, &Device::Cpu)
                        .unwrap_or_else(|e| panic!("{}: {e}", s.name));
                }
                "safetensors" => {
                    write_files(
                        &dir,
                        &[
                            ("config.json", TINY_CONFIG.as_bytes()),
                            ("model.safetensors", &s.bytes),
                        ],
                    );
                    Model::load_dir(&dir, DType::F32, &Device::Cpu)
                        .unwrap_or_else(|e| panic!("{}: {e}", s.name));
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The entries accept empty and tiny inputs (the fuzzer's first inputs).
    #[test]
    fn entries_take_empty_and_small_inputs() {
        for data in [
            &b""[..],
            b"\0",
            b"GGUF",
            b"{}",
            b"\x03{{ messages }}",
            b"gpt2\xffa\nb",
        ] {
            gguf(data);
            safetensors(data);
            configs(data);
            chat_template(data);
            gguf_vocab(data);
        }
    }
}
