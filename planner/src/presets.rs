//! Built-in model shapes, by name, taken from each model's published config.json.
//!
//! Only the fields that size memory and compute are kept; the engine reads the real
//! config.json of a downloaded model. Parameter counts derived from these shapes match
//! the published totals exactly (see the tests).

use crate::shape::{Architecture, ModelShape, RopeScaling};
use crate::PlanError;

struct Preset {
    name: &'static str,
    arch: Architecture,
    vocab: u64,
    hidden: u64,
    inter: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    max_pos: u64,
    tied: bool,
    theta: f64,
    eps: f64,
    /// Llama-3.1-style scaling: (factor, low_freq_factor, high_freq_factor, original_max).
    llama3_scaling: Option<(f64, f64, f64, u64)>,
    dtype: &'static str,
}

const PRESETS: &[Preset] = &[
    Preset {
        name: "llama-2-7b",
        arch: Architecture::Llama,
        vocab: 32000,
        hidden: 4096,
        inter: 11008,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: 128,
        max_pos: 4096,
        tied: false,
        theta: 10_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "float16",
    },
    Preset {
        name: "llama-2-13b",
        arch: Architecture::Llama,
        vocab: 32000,
        hidden: 5120,
        inter: 13824,
        layers: 40,
        heads: 40,
        kv_heads: 40,
        head_dim: 128,
        max_pos: 4096,
        tied: false,
        theta: 10_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "float16",
    },
    Preset {
        name: "llama-2-70b",
        arch: Architecture::Llama,
        vocab: 32000,
        hidden: 8192,
        inter: 28672,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 4096,
        tied: false,
        theta: 10_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "float16",
    },
    Preset {
        name: "llama-3-8b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 4096,
        inter: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 8192,
        tied: false,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3-70b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 8192,
        inter: 28672,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 8192,
        tied: false,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3.1-8b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 4096,
        inter: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 131_072,
        tied: false,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: Some((8.0, 1.0, 4.0, 8192)),
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3.1-70b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 8192,
        inter: 28672,
        layers: 80,
        heads: 64,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 131_072,
        tied: false,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: Some((8.0, 1.0, 4.0, 8192)),
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3.1-405b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 16384,
        inter: 53248,
        layers: 126,
        heads: 128,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 131_072,
        tied: false,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: Some((8.0, 1.0, 4.0, 8192)),
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3.2-1b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 2048,
        inter: 8192,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        max_pos: 131_072,
        tied: true,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: Some((32.0, 1.0, 4.0, 8192)),
        dtype: "bfloat16",
    },
    Preset {
        name: "llama-3.2-3b",
        arch: Architecture::Llama,
        vocab: 128_256,
        hidden: 3072,
        inter: 8192,
        layers: 28,
        heads: 24,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 131_072,
        tied: true,
        theta: 500_000.0,
        eps: 1e-5,
        llama3_scaling: Some((32.0, 1.0, 4.0, 8192)),
        dtype: "bfloat16",
    },
    Preset {
        name: "mistral-7b",
        arch: Architecture::Mistral,
        vocab: 32000,
        hidden: 4096,
        inter: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        max_pos: 32768,
        tied: false,
        theta: 10_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "tinyllama-1.1b",
        arch: Architecture::Llama,
        vocab: 32000,
        hidden: 2048,
        inter: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
        max_pos: 2048,
        tied: false,
        theta: 10_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "smollm2-135m",
        arch: Architecture::Llama,
        vocab: 49152,
        hidden: 576,
        inter: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        max_pos: 8192,
        tied: true,
        theta: 100_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "smollm2-360m",
        arch: Architecture::Llama,
        vocab: 49152,
        hidden: 960,
        inter: 2560,
        layers: 32,
        heads: 15,
        kv_heads: 5,
        head_dim: 64,
        max_pos: 8192,
        tied: true,
        theta: 100_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "smollm2-1.7b",
        arch: Architecture::Llama,
        vocab: 49152,
        hidden: 2048,
        inter: 8192,
        layers: 24,
        heads: 32,
        kv_heads: 32,
        head_dim: 64,
        max_pos: 8192,
        tied: true,
        theta: 130_000.0,
        eps: 1e-5,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "qwen2.5-0.5b",
        arch: Architecture::Qwen2,
        vocab: 151_936,
        hidden: 896,
        inter: 4864,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        max_pos: 32768,
        tied: true,
        theta: 1_000_000.0,
        eps: 1e-6,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
    Preset {
        name: "qwen2.5-7b",
        arch: Architecture::Qwen2,
        vocab: 152_064,
        hidden: 3584,
        inter: 18944,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
        max_pos: 32768,
        tied: false,
        theta: 1_000_000.0,
        eps: 1e-6,
        llama3_scaling: None,
        dtype: "bfloat16",
    },
];

/// Names of all built-in presets, in catalog order.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// The model shape of a built-in preset.
pub fn preset(name: &str) -> Result<ModelShape, PlanError> {
    let key = name.trim().to_ascii_lowercase();
    let p = PRESETS.iter().find(|p| p.name == key).ok_or_else(|| {
        PlanError::Config(format!(
            "unknown model preset {name:?}; accepted: {} (or a config.json / model directory path)",
            preset_names().join(", ")
        ))
    })?;
    Ok(ModelShape {
        name: p.name.to_string(),
        architecture: p.arch,
        vocab_size: p.vocab,
        hidden_size: p.hidden,
        intermediate_size: p.inter,
        num_hidden_layers: p.layers,
        num_attention_heads: p.heads,
        num_key_value_heads: p.kv_heads,
        head_dim: p.head_dim,
        max_position_embeddings: p.max_pos,
        tie_word_embeddings: p.tied,
        qkv_bias: p.arch == Architecture::Qwen2,
        o_bias: false,
        mlp_bias: false,
        rms_norm_eps: p.eps,
        rope_theta: p.theta,
        rope_scaling: p
            .llama3_scaling
            .map(|(factor, low, high, orig)| RopeScaling {
                rope_type: "llama3".to_string(),
                factor,
                low_freq_factor: Some(low),
                high_freq_factor: Some(high),
                original_max_position_embeddings: Some(orig),
            }),
        torch_dtype: Some(p.dtype.to_string()),
    })
}

/// A preset name, a config.json file or a model directory.
pub fn resolve_shape(model: &str) -> Result<ModelShape, PlanError> {
    let path = std::path::Path::new(model);
    if path.exists() {
        ModelShape::from_path(path)
    } else {
        preset(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published totals (model cards, or the sum of the checkpoint's tensors).
    const EXPECTED: &[(&str, u64)] = &[
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-2-70b", 68_976_648_192),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3-70b", 70_553_706_496),
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.1-70b", 70_553_706_496),
        ("llama-3.1-405b", 405_853_388_800),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
        ("mistral-7b", 7_241_732_096),
        ("tinyllama-1.1b", 1_100_048_384),
        ("smollm2-135m", 134_515_008),
        ("smollm2-360m", 361_821_120),
        ("smollm2-1.7b", 1_711_376_384),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-7b", 7_615_616_512),
    ];

    #[test]
    fn every_preset_has_its_exact_parameter_count() {
        assert_eq!(EXPECTED.len(), PRESETS.len());
        for (name, total) in EXPECTED {
            let shape = preset(name).unwrap();
            shape.validate().unwrap();
            assert_eq!(shape.params().total, *total, "{name}");
        }
    }

    #[test]
    fn parts_add_up() {
        for name in preset_names() {
            let p = preset(name).unwrap().params();
            assert_eq!(p.embedding + p.layers + p.lm_head + p.final_norm, p.total);
            assert_eq!(
                p.per_layer,
                p.per_layer_attention + p.per_layer_mlp + p.per_layer_norms
            );
        }
    }

    #[test]
    fn unknown_preset_lists_the_accepted_names() {
        let err = preset("llama-9-1t").unwrap_err().to_string();
        assert!(
            err.contains("llama-9-1t") && err.contains("smollm2-135m"),
            "{err}"
        );
    }
}
