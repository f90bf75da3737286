//! GGUF (llama architecture) to a Hugging Face model directory: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
//!
//! Owns: the tensor-name map from llama.cpp to Hugging Face names, the shape checks, the
//! un-permutation of `attn_q`/`attn_k` rows ([`crate::weights::gguf::file::unpermute_rows`]), the output
//! dtype, and the JSON files. Everything that can be validated (architecture, hyper-parameters,
//! tensor table, vocabulary) is validated before the first byte is written; weights are then
//! dequantized and written one tensor at a time, so peak memory is about one f32 tensor,
//! not the model.
//!
//! Invariant: the written weights are the exact f32 dequantization of the GGUF (then rounded
//! to f16/bf16 if asked). Tied embeddings (no `output.weight`) are written once, as
//! `model.embed_tokens.weight`, with `tie_word_embeddings: true` and no `lm_head.weight`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::weights::gguf::file::{unpermute_rows, GgufFile, LlamaParams};
use crate::weights::gguf::vocab::{tokenizer_from_json, GgufVocab};

/// The dtype of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl OutDtype {
    /// The name Hugging Face's `config.json` uses (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::Bf16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::Bf16 => 2,
        }
    }

    fn safetensors_dtype(self) -> safetensors::Dtype {
        match self {
            OutDtype::F32 => safetensors::Dtype::F32,
            OutDtype::F16 => safetensors::Dtype::F16,
            OutDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }

    /// Little-endian bytes of `xs` in this dtype (round to nearest even for f16/bf16).
    pub fn encode(self, xs: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(xs.len() * self.size_bytes());
        match self {
            OutDtype::F32 => xs.iter().for_each(|x| out.extend(x.to_le_bytes())),
            OutDtype::F16 => xs
                .iter()
                .for_each(|x| out.extend(half::f16::from_f32(*x).to_le_bytes())),
            OutDtype::Bf16 => xs
                .iter()
                .for_each(|x| out.extend(half::bf16::from_f32(*x).to_le_bytes())),
        }
        out
    }
}

impl fmt::Display for OutDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutDtype::F32 => "f32",
            OutDtype::F16 => "f16",
            OutDtype::Bf16 => "bf16",
        })
    }
}

impl FromStr for OutDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutDtype::F32),
            "f16" | "float16" => Ok(OutDtype::F16),
            "bf16" | "bfloat16" => Ok(OutDtype::Bf16),
            _ => Err(format!("unknown dtype {s:?}: expected f32, f16 or bf16")),
        }
    }
}

/// How to convert.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    pub dtype: OutDtype,
    /// Show a progress bar over tensors (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    pub dtype: OutDtype,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Parameters written (tied embeddings counted once).
    pub parameters: u64,
    /// Size of `model.safetensors` in bytes (header included).
    pub safetensors_bytes: u64,
    pub params: LlamaParams,
    /// Files written, in order.
    pub files: Vec<PathBuf>,
}

/// The Hugging Face name of a llama.cpp tensor name, or `None` for names this converter
/// does not know.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// One tensor to write: where it comes from, where it goes, its checked shape, and whether
/// its rows must be un-permuted (with how many heads).
#[derive(Debug, Clone)]
pub(crate) struct TensorPlan {
    pub(crate) gguf: String,
    pub(crate) hf: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) unpermute_heads: Option<usize>,
}

/// The expected Hugging Face shape of every tensor a llama GGUF must (or may) have.
fn expected_tensors(p: &LlamaParams) -> Vec<(String, Vec<usize>, Option<usize>, bool)> {
    let (h, i, v, hd) = (p.hidden_size, p.intermediate_size, p.vocab_size, p.head_dim);
    let (q_rows, kv_rows) = (p.num_attention_heads * hd, p.num_key_value_heads * hd);
    // (gguf name, shape, unpermute heads, required)
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, h], None, true),
        ("output_norm.weight".to_string(), vec![h], None, true),
        ("output.weight".to_string(), vec![v, h], None, false),
    ];
    for l in 0..p.num_hidden_layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        out.extend([
            (b("attn_norm"), vec![h], None, true),
            (b("ffn_norm"), vec![h], None, true),
            (
                b("attn_q"),
                vec![q_rows, h],
                Some(p.num_attention_heads),
                true,
            ),
            (
                b("attn_k"),
                vec![kv_rows, h],
                Some(p.num_key_value_heads),
                true,
            ),
            (b("attn_v"), vec![kv_rows, h], None, true),
            (b("attn_output"), vec![h, q_rows], None, true),
            (b("ffn_gate"), vec![i, h], None, true),
            (b("ffn_up"), vec![i, h], None, true),
            (b("ffn_down"), vec![h, i], None, true),
        ]);
    }
    out
}

/// Check the tensor table against the hyper-parameters: every required tensor present with
/// the right shape, no unknown tensor.
pub(crate) fn plan_tensors(g: &GgufFile, p: &LlamaParams) -> Result<Vec<TensorPlan>> {
    let expected = expected_tensors(p);
    let known: HashMap<&str, usize> = expected
        .iter()
        .enumerate()
        .map(|(k, e)| (e.0.as_str(), k))
        .collect();
    let tensor_err = |tensor: &str, message: String| Error::GgufTensor {
        path: g.path().to_path_buf(),
        tensor: tensor.to_string(),
        message,
    };
    for name in g.tensor_names() {
        if !known.contains_key(name) {
            return Err(tensor_err(
                name,
                format!(
                    "not a tensor of a {}-layer Llama model (unknown name or layer out of range)",
                    p.num_hidden_layers
                ),
            ));
        }
    }
    let mut plans = Vec::with_capacity(expected.len());
    for (gguf, shape, unpermute_heads, required) in expected {
        let found = match g.content().tensor_infos.get(&gguf) {
            Some(info) => info.shape.dims().to_vec(),
            None if required => return Err(tensor_err(&gguf, "missing".to_string())),
            None => continue,
        };
        if found != shape {
            return Err(tensor_err(
                &gguf,
                format!("shape {found:?}, expected {shape:?} from the llama.* metadata"),
            ));
        }
        let hf = hf_tensor_name(&gguf)
            .ok_or_else(|| tensor_err(&gguf, "no Hugging Face name".to_string()))?;
        plans.push(TensorPlan {
            gguf,
            hf,
            shape,
            unpermute_heads,
        });
    }
    Ok(plans)
}

/// Read, dequantize, un-permute if needed, and encode one tensor.
fn tensor_bytes(g: &GgufFile, plan: &TensorPlan, dtype: OutDtype) -> Result<Vec<u8>> {
    let data = g.dequantize_f32(&plan.gguf)?;
    let data = match plan.unpermute_heads {
        Some(heads) => unpermute_rows(&data, plan.shape[0], plan.shape[1], heads).map_err(|m| {
            Error::GgufTensor {
                path: g.path().to_path_buf(),
                tensor: plan.gguf.clone(),
                message: format!("un-permuting rows: {m}"),
            }
        })?,
        None => data,
    };
    Ok(dtype.encode(&data))
}

/// A tensor that is read from the GGUF only when the safetensors writer asks for its bytes.
/// `View::data` cannot fail, so the first error is parked in `failed` (and zeros are
/// returned); the caller checks it after writing and deletes the file.
struct LazyTensor<'a> {
    g: &'a GgufFile,
    plan: &'a TensorPlan,
    dtype: OutDtype,
    failed: &'a RefCell<Option<Error>>,
    bar: &'a ProgressBar,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.safetensors_dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.bar.set_message(self.plan.hf.clone());
        let bytes = if self.failed.borrow().is_some() {
            vec![0; self.data_len()]
        } else {
            match tensor_bytes(self.g, self.plan, self.dtype) {
                Ok(b) if b.len() == self.data_len() => b,
                Ok(b) => {
                    *self.failed.borrow_mut() = Some(Error::GgufTensor {
                        path: self.g.path().to_path_buf(),
                        tensor: self.plan.gguf.clone(),
                        message: format!("{} bytes, expected {}", b.len(), self.data_len()),
                    });
                    vec![0; self.data_len()]
                }
                Err(e) => {
                    *self.failed.borrow_mut() = Some(e);
                    vec![0; self.data_len()]
                }
            }
        };
        self.bar.inc(1);
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// An f32 as the JSON number with its shortest decimal form (`1e-5`, not
/// `9.999999747378752e-6`): the value Hugging Face configs carry, and the same f32.
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Hugging Face `config.json` for these hyper-parameters.
pub fn config_json(p: &LlamaParams, vocab: &GgufVocab, dtype: OutDtype, source: &str) -> Value {
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "vocab_size": p.vocab_size,
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": f32_json(p.rms_norm_eps),
        "rope_theta": f32_json(p.rope_theta),
        "rope_scaling": null,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": p.tie_word_embeddings,
        "bos_token_id": vocab.bos_token_id,
        "eos_token_id": vocab.eos_token_id,
        "torch_dtype": dtype.torch_name(),
        "llmem_converted_from": source,
    });
    if let Some(obj) = cfg.as_object_mut() {
        if p.head_dim * p.num_attention_heads != p.hidden_size {
            obj.insert("head_dim".into(), json!(p.head_dim));
        }
        if let Some(factor) = p.rope_linear_scaling {
            obj.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "type": "linear", "factor": f32_json(factor)}),
            );
        }
        if let Some(pad) = vocab.padding_token_id {
            obj.insert("pad_token_id".into(), json!(pad));
        }
    }
    cfg
}

/// Hugging Face `generation_config.json`.
pub fn generation_config_json(vocab: &GgufVocab) -> Value {
    let mut g = serde_json::Map::new();
    if let Some(b) = vocab.bos_token_id {
        g.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = vocab.eos_token_id {
        g.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = vocab.padding_token_id {
        g.insert("pad_token_id".into(), json!(p));
    }
    Value::Object(g)
}

fn progress_bar(enabled: bool, len: usize) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "converting [{bar:30}] {pos}/{len} tensors {elapsed_precise} {wide_msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Convert a llama-architecture GGUF into a Hugging Face model directory `out_dir`
/// (created if missing; files of the same names are replaced).
pub fn convert_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    let g = GgufFile::open(gguf_path)?;
    let params = LlamaParams::from_gguf(&g)?;
    let vocab = GgufVocab::for_embedding(&g, params.vocab_size)?;
    let tokenizer = vocab.tokenizer_json()?;
    tokenizer_from_json(&tokenizer, gguf_path)?;
    let plans = plan_tensors(&g, &params)?;

    let created_out_dir = !out_dir.exists();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let st_path = out_dir.join("model.safetensors");
    let failed = RefCell::new(None);
    let bar = progress_bar(opts.progress, plans.len());
    let views: Vec<(&str, LazyTensor<'_>)> = plans
        .iter()
        .map(|plan| {
            (
                plan.hf.as_str(),
                LazyTensor {
                    g: &g,
                    plan,
                    dtype: opts.dtype,
                    failed: &failed,
                    bar: &bar,
                },
            )
        })
        .collect();
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(views, Some(info), &st_path);
    bar.finish_and_clear();
    let failure = match (written, failed.into_inner()) {
        (_, Some(e)) => Some(e),
        (Err(e), None) => Some(Error::SafetensorsWrite {
            path: st_path.clone(),
            message: e.to_string(),
        }),
        (Ok(()), None) => None,
    };
    if let Some(e) = failure {
        // Best effort: a half-written file must not look like a model.
        let _ = std::fs::remove_file(&st_path);
        if created_out_dir {
            let _ = std::fs::remove_dir(out_dir);
        }
        return Err(e);
    }
    let safetensors_bytes = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();

    let source = gguf_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut files = vec![st_path];
    for (name, value) in [
        (
            "config.json",
            config_json(&params, &vocab, opts.dtype, &source),
        ),
        ("generation_config.json", generation_config_json(&vocab)),
        ("tokenizer.json", tokenizer),
        (
            "tokenizer_config.json",
            vocab.tokenizer_config_json(params.max_position_embeddings),
        ),
    ] {
        let path = out_dir.join(name);
        write_json(&path, &value)?;
        files.push(path);
    }
    let parameters = plans
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64)
        .sum();
    Ok(ConvertSummary {
        out_dir: out_dir.to_path_buf(),
        dtype: opts.dtype,
        tensors: plans.len(),
        parameters,
        safetensors_bytes,
        params,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_hugging_face() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.ffn_gate_exps.weight"), None);
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }

    #[test]
    fn dtype_parses_and_encodes() {
        assert_eq!("BF16".parse::<OutDtype>(), Ok(OutDtype::Bf16));
        assert_eq!("float16".parse::<OutDtype>(), Ok(OutDtype::F16));
        assert!("int8".parse::<OutDtype>().is_err());
        assert_eq!(OutDtype::F32.encode(&[1.0]), 1.0f32.to_le_bytes());
        assert_eq!(OutDtype::F16.encode(&[1.0]), [0x00, 0x3c]);
        assert_eq!(OutDtype::Bf16.encode(&[1.0]), [0x80, 0x3f]);
    }
}
