//! Model shapes: the one description of a Llama-family model that both the planner and
//! the engine use.
//!
//! A Hugging Face `config.json` is parsed into [`RawConfig`] (every field optional, both
//! the older flat layout and the newer `rope_parameters` / `dtype` layout) and resolved
//! into a [`ModelShape`], which has no optional sizes left. Parameter counts are exact:
//! every matrix, bias and norm vector is counted once, tied embeddings once.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// The supported architectures. They share one forward pass and differ in biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM`: `attention_bias` puts biases on q, k, v and o.
    Llama,
    /// `MistralForCausalLM`: no biases.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q, k and v, none on o.
    Qwen2,
}

impl Architecture {
    /// Accepted `architectures[0]` values of a config.json.
    pub const ACCEPTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Rotary scaling, as `rope_scaling` (or `rope_parameters`) describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (or the older `type`): "llama3", "linear", "dynamic", "yarn", ...
    pub rope_type: String,
    pub factor: f64,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<u64>,
}

/// A resolved Llama-family model shape: no optional sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// A name for reports: the preset name or the directory name.
    pub name: String,
    pub architecture: Architecture,
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    /// Per-head size; may differ from hidden_size / num_attention_heads.
    pub head_dim: u64,
    pub max_position_embeddings: u64,
    pub tie_word_embeddings: bool,
    /// Biases on q_proj, k_proj, v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with attention_bias only).
    pub o_bias: bool,
    /// Biases on gate_proj, up_proj, down_proj.
    pub mlp_bias: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// The dtype the checkpoint says it is stored in (`torch_dtype` or `dtype`), if any.
    pub torch_dtype: Option<String>,
}

/// Exact parameter counts, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCounts {
    /// `embed_tokens`: vocab x hidden.
    pub embedding: u64,
    /// All decoder layers together (attention + MLP + the two norms of each layer).
    pub layers: u64,
    /// One decoder layer.
    pub per_layer: u64,
    /// One layer's attention: q, k, v, o and their biases.
    pub per_layer_attention: u64,
    /// One layer's MLP: gate, up, down and their biases.
    pub per_layer_mlp: u64,
    /// One layer's two RMSNorm weight vectors.
    pub per_layer_norms: u64,
    /// A separate LM head (0 when tied to the embedding).
    pub lm_head: u64,
    /// The final RMSNorm (`model.norm`).
    pub final_norm: u64,
    /// All norm vectors: per-layer norms of every layer plus the final norm.
    pub norms: u64,
    /// Everything, tied embeddings counted once.
    pub total: u64,
}

impl ModelShape {
    /// Query width: heads x head_dim.
    pub fn q_dim(&self) -> u64 {
        self.num_attention_heads * self.head_dim
    }

    /// Key (or value) width: kv_heads x head_dim.
    pub fn kv_dim(&self) -> u64 {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads that share one KV head.
    pub fn gqa_group(&self) -> u64 {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Exact parameter counts.
    pub fn params(&self) -> ParamCounts {
        let h = self.hidden_size;
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let mut attention = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attention += q + 2 * kv;
        }
        if self.o_bias {
            attention += h;
        }
        let i = self.intermediate_size;
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let per_layer_norms = 2 * h;
        let per_layer = attention + mlp + per_layer_norms;
        let layers = per_layer * self.num_hidden_layers;
        let embedding = self.vocab_size * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        let final_norm = h;
        ParamCounts {
            embedding,
            layers,
            per_layer,
            per_layer_attention: attention,
            per_layer_mlp: mlp,
            per_layer_norms,
            lm_head,
            final_norm,
            norms: per_layer_norms * self.num_hidden_layers + final_norm,
            total: embedding + layers + lm_head + final_norm,
        }
    }

    /// Bytes of K and V for one token over all layers:
    /// 2 x layers x kv_heads x head_dim x kv_dtype_bytes.
    ///
    /// The engine sizes its KV blocks with this same function.
    pub fn kv_bytes_per_token(&self, kv_dtype_bytes: u64) -> u64 {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * kv_dtype_bytes
    }

    /// Bytes of K and V for one token over all layers in `kv`, block scales included:
    /// 2 x layers x kv_heads x `kv.row_bytes(head_dim)`. Equal to
    /// [`ModelShape::kv_bytes_per_token`] for the element formats.
    pub fn kv_bytes_per_token_in(&self, kv: crate::KvDtype) -> u64 {
        2 * self.num_hidden_layers * self.num_key_value_heads * kv.row_bytes(self.head_dim)
    }

    /// Check the invariants a forward pass relies on.
    pub fn validate(&self) -> Result<(), PlanError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(PlanError::Config(format!(
                    "{field} is 0 in model {}; it must be a positive integer",
                    self.name
                )));
            }
            if value > (1 << 32) {
                return Err(PlanError::Config(format!(
                    "{field} = {value} in model {} is implausibly large (limit 2^32)",
                    self.name
                )));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(PlanError::Config(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {} in model {}",
                self.num_attention_heads, self.num_key_value_heads, self.name
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(PlanError::Config(format!(
                "rope_theta = {} in model {} must be a positive number",
                self.rope_theta, self.name
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(PlanError::Config(format!(
                "rms_norm_eps = {} in model {} must be a positive number",
                self.rms_norm_eps, self.name
            )));
        }
        Ok(())
    }

    /// Parse a config.json text. `name` labels the model in reports and errors.
    pub fn from_config_str(name: &str, text: &str) -> Result<Self, PlanError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| PlanError::Config(format!("{name}: not a valid config.json: {e}")))?;
        let raw: RawConfig = serde_json::from_value(value.clone()).map_err(|e| {
            // Name the offending field: deserialize each field on its own.
            let field = value.as_object().and_then(|obj| {
                obj.iter().find(|(k, v)| {
                    let one = serde_json::json!({ k.as_str(): v });
                    serde_json::from_value::<RawConfig>(one).is_err()
                })
            });
            match field {
                Some((k, v)) => {
                    PlanError::Config(format!("{name}: field `{k}` has value {v}: {e}"))
                }
                None => PlanError::Config(format!("{name}: not a valid config.json: {e}")),
            }
        })?;
        raw.resolve(name)
    }

    /// Read a config.json file, or the config.json inside a model directory.
    pub fn from_path(path: &Path) -> Result<Self, PlanError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| PlanError::Io(format!("reading {}: {e}", file.display())))?;
        let mut shape = Self::from_config_str(&file.display().to_string(), &text)?;
        shape.name = model_name_for(path);
        Ok(shape)
    }
}

/// The name a model directory or config file is reported under.
fn model_name_for(path: &Path) -> String {
    let dir = if path.is_dir() {
        Some(path)
    } else {
        path.parent()
    };
    dir.and_then(|d| d.canonicalize().ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| path.display().to_string())
}

/// A config.json as written, every field optional. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: Option<u64>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub max_position_embeddings: Option<u64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub hidden_act: Option<String>,
}

fn required(name: &str, field: &str, value: Option<u64>) -> Result<u64, PlanError> {
    value.ok_or_else(|| {
        PlanError::Config(format!(
            "{name}: field `{field}` is missing; a Llama-family config.json must give it"
        ))
    })
}

fn parse_rope_scaling(name: &str, v: &serde_json::Value) -> Result<Option<RopeScaling>, PlanError> {
    if v.is_null() {
        return Ok(None);
    }
    let obj = v.as_object().ok_or_else(|| {
        PlanError::Config(format!(
            "{name}: field `rope_scaling` must be an object or null"
        ))
    })?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default")
        .to_string();
    if kind == "default" {
        return Ok(None);
    }
    let num = |key: &str| obj.get(key).and_then(|x| x.as_f64());
    let factor = num("factor").ok_or_else(|| {
        PlanError::Config(format!(
            "{name}: rope_scaling of type {kind:?} has no numeric `factor`"
        ))
    })?;
    if !(factor.is_finite() && factor > 0.0) {
        return Err(PlanError::Config(format!(
            "{name}: rope_scaling.factor = {factor} must be positive"
        )));
    }
    Ok(Some(RopeScaling {
        rope_type: kind,
        factor,
        low_freq_factor: num("low_freq_factor"),
        high_freq_factor: num("high_freq_factor"),
        original_max_position_embeddings: obj
            .get("original_max_position_embeddings")
            .and_then(|x| x.as_u64()),
    }))
}

impl RawConfig {
    /// Resolve defaults and check the result. `name` labels errors.
    pub fn resolve(&self, name: &str) -> Result<ModelShape, PlanError> {
        let arch_name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| {
                self.model_type.as_deref().map(|t| match t {
                    "llama" => "LlamaForCausalLM".to_string(),
                    "mistral" => "MistralForCausalLM".to_string(),
                    "qwen2" => "Qwen2ForCausalLM".to_string(),
                    other => other.to_string(),
                })
            })
            .ok_or_else(|| {
                PlanError::Config(format!(
                    "{name}: neither `architectures` nor `model_type` is set; accepted: {}",
                    Architecture::ACCEPTED
                ))
            })?;
        let architecture = Architecture::from_hf_name(&arch_name).ok_or_else(|| {
            PlanError::Config(format!(
                "{name}: architecture {arch_name:?} is not supported; accepted: {}",
                Architecture::ACCEPTED
            ))
        })?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(PlanError::Config(format!(
                    "{name}: hidden_act {act:?} is not supported; accepted: \"silu\""
                )));
            }
        }
        let hidden_size = required(name, "hidden_size", self.hidden_size)?;
        let num_attention_heads = required(name, "num_attention_heads", self.num_attention_heads)?;
        if num_attention_heads == 0 {
            return Err(PlanError::Config(format!(
                "{name}: num_attention_heads is 0; it must be a positive integer"
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(PlanError::Config(format!(
                        "{name}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
            // Qwen2 always has q/k/v biases and never an o bias.
            Architecture::Qwen2 => (true, false),
        };
        // Newer transformers nest the rotary settings in `rope_parameters`.
        let rope_params = match &self.rope_parameters {
            None | Some(serde_json::Value::Null) => None,
            Some(v) if v.is_object() => Some(v),
            Some(v) => {
                return Err(PlanError::Config(format!(
                    "{name}: field `rope_parameters` has value {v}: it must be an object"
                )))
            }
        };
        let nested_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            None => None,
            Some(t) => Some(t.as_f64().ok_or_else(|| {
                PlanError::Config(format!(
                    "{name}: field `rope_parameters.rope_theta` has value {t}: it must be a number"
                ))
            })?),
        };
        let rope_theta = self.rope_theta.or(nested_theta).unwrap_or(10_000.0);
        let rope_scaling = match (&self.rope_scaling, rope_params) {
            (Some(v), _) => parse_rope_scaling(name, v)?,
            (None, Some(p)) => parse_rope_scaling(name, p)?,
            (None, None) => None,
        };
        let shape = ModelShape {
            name: name.to_string(),
            architecture,
            vocab_size: required(name, "vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size: required(name, "intermediate_size", self.intermediate_size)?,
            num_hidden_layers: required(name, "num_hidden_layers", self.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            torch_dtype: self.torch_dtype.clone().or_else(|| self.dtype.clone()),
        };
        shape.validate()?;
        Ok(shape)
    }
}
