//! Reading Hugging Face config.json files of the Llama family, both layouts.

use llmem_planner::{Architecture, ModelShape};

/// SmolLM2-135M-Instruct's config in the newer layout (`rope_parameters`, `dtype`).
const SMOLLM2_NEW: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "tie_word_embeddings": true,
  "attention_bias": false, "mlp_bias": false, "hidden_act": "silu",
  "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
  "dtype": "bfloat16"
}"#;

#[test]
fn newer_layout_keeps_rope_theta() {
    let s = ModelShape::from_config_str("smollm2", SMOLLM2_NEW).unwrap();
    assert_eq!(s.rope_theta, 100_000.0);
    assert_eq!(s.rope_scaling, None);
    assert_eq!(s.torch_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(s.head_dim, 64);
    assert_eq!(s.params().total, 134_515_008);
}

#[test]
fn older_layout_with_llama3_scaling() {
    let text = r#"{
      "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
      "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
      "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    }"#;
    let s = ModelShape::from_config_str("llama-3.2-1b", text).unwrap();
    let r = s.rope_scaling.clone().unwrap();
    assert_eq!(r.rope_type, "llama3");
    assert_eq!(r.factor, 32.0);
    assert_eq!(r.original_max_position_embeddings, Some(8192));
    assert_eq!(s.params().total, 1_235_814_400);
}

#[test]
fn explicit_head_dim_that_differs_from_hidden_over_heads() {
    // Mistral-Nemo style: hidden 5120, 32 heads of 128 (not 160).
    let text = r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 5120,
      "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
      "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072}"#;
    let s = ModelShape::from_config_str("nemo", text).unwrap();
    assert_eq!(s.architecture, Architecture::Mistral);
    assert_eq!(s.q_dim(), 4096);
    // Mistral-Nemo-Base-2407: 12,247,782,400 parameters.
    assert_eq!(s.params().total, 12_247_782_400);
}

#[test]
fn qwen2_has_qkv_biases_and_llama_attention_bias_has_four() {
    let qwen = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": true,
      "rope_theta": 1000000.0}"#;
    let s = ModelShape::from_config_str("qwen", qwen).unwrap();
    assert!(s.qkv_bias && !s.o_bias);
    assert_eq!(s.params().total, 494_032_768);
    let llama_bias = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "vocab_size": 100, "attention_bias": true, "mlp_bias": true}"#;
    let s = ModelShape::from_config_str("tiny", llama_bias).unwrap();
    assert!(s.qkv_bias && s.o_bias && s.mlp_bias);
    // Per layer: 4 x 64x64 + 4 x 64 (q,k,v,o biases) + 3 x 64x128 + (2 x 128 + 64) + 2 x 64.
    assert_eq!(
        s.params().per_layer,
        4 * 64 * 64 + 4 * 64 + 3 * 64 * 128 + 2 * 128 + 64 + 2 * 64
    );
    assert_eq!(s.num_key_value_heads, 4, "kv heads default to heads");
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        (
            r#"{"architectures": ["GPT2LMHeadModel"]}"#,
            "GPT2LMHeadModel",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#,
            "num_attention_heads",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 10, "num_hidden_layers": 0, "vocab_size": 5}"#,
            "num_hidden_layers",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 63, "num_attention_heads": 4,
             "intermediate_size": 10, "num_hidden_layers": 1, "vocab_size": 5}"#,
            "head_dim",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 3, "intermediate_size": 10, "num_hidden_layers": 1,
             "vocab_size": 5}"#,
            "num_key_value_heads",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "big"}"#,
            "hidden_size",
        ),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 10, "num_hidden_layers": 1, "vocab_size": 5,
             "hidden_act": "gelu"}"#,
            "hidden_act",
        ),
        ("{", "not a valid config.json"),
    ];
    for (text, needle) in cases {
        let err = ModelShape::from_config_str("m", text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn reads_a_model_directory() {
    let dir = std::env::temp_dir().join(format!("llmem-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), SMOLLM2_NEW).unwrap();
    let s = ModelShape::from_path(&dir).unwrap();
    assert_eq!(s.params().total, 134_515_008);
    assert!(s.name.starts_with("llmem-cfg-"));
    let err = ModelShape::from_path(&dir.join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

/// A table of broken config.json files, made by breaking one field (or one relation
/// between fields) of SmolLM2's config at a time: zero, negative, fractional, huge, wrong
/// type or missing sizes; heads that do not divide the hidden size; KV heads of 0 or
/// not dividing the heads; vocabularies of 2^40; bad rope and norm constants; garbage
/// rope scaling; another architecture. Every one is refused with an error that names
/// the field (or the value), and none panics; the shape is never built, so nothing is
/// sized from it. (An unknown rope_scaling type is the engine's to refuse, at load: the
/// plan's bytes do not depend on it.)
#[test]
fn a_hundred_broken_configs_are_refused_naming_the_field() {
    let base: serde_json::Value = serde_json::from_str(SMOLLM2_NEW).unwrap();
    let mut cases: Vec<(serde_json::Value, String)> = Vec::new();
    let with = |edits: &[(&str, serde_json::Value)]| {
        let mut v = base.clone();
        for (k, x) in edits {
            if x.is_null() && *k != "rope_scaling" {
                v.as_object_mut().unwrap().remove(*k);
            } else {
                v[*k] = x.clone();
            }
        }
        v
    };
    let sizes = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "head_dim",
    ];
    use serde_json::json;
    for field in sizes {
        for bad in [
            json!(0),
            json!(-1),
            json!(-4096),
            json!(1.5),
            json!(1u64 << 40),
            json!(u64::MAX),
            json!("576"),
            json!(true),
            json!([576]),
            json!({"n": 576}),
        ] {
            // head_dim 0 and the like; a missing head_dim is allowed (derived).
            cases.push((with(&[(field, bad)]), field.to_string()));
        }
        // Missing: required, except those with a default (head_dim from the hidden size,
        // KV heads = heads, max_position_embeddings 2048 as transformers' LlamaConfig).
        if !["head_dim", "num_key_value_heads", "max_position_embeddings"].contains(&field) {
            cases.push((with(&[(field, serde_json::Value::Null)]), field.to_string()));
        }
    }
    // Relations between fields.
    for (edits, needle) in [
        (vec![("hidden_size", json!(577))], "hidden_size"),
        (
            vec![("num_attention_heads", json!(7))],
            "num_attention_heads",
        ),
        (
            vec![("num_key_value_heads", json!(2))],
            "num_key_value_heads",
        ),
        (
            vec![("num_key_value_heads", json!(4))],
            "num_key_value_heads",
        ),
        (
            vec![("num_key_value_heads", json!(18))],
            "num_key_value_heads",
        ),
        (
            vec![
                ("num_attention_heads", json!(10)),
                ("num_key_value_heads", json!(3)),
            ],
            "num_attention_heads",
        ),
        (vec![("vocab_size", json!(1u64 << 40))], "vocab_size"),
        (vec![("hidden_size", json!(1u64 << 33))], "hidden_size"),
        (
            vec![("max_position_embeddings", json!(1u64 << 40))],
            "max_position_embeddings",
        ),
        (vec![("rms_norm_eps", json!(0.0))], "rms_norm_eps"),
        (vec![("rms_norm_eps", json!(-1e-5))], "rms_norm_eps"),
        (vec![("rms_norm_eps", json!("small"))], "rms_norm_eps"),
        (
            vec![("rope_parameters", json!({"rope_theta": 0.0}))],
            "rope_theta",
        ),
        (
            vec![("rope_parameters", json!({"rope_theta": -1.0}))],
            "rope_theta",
        ),
        (
            vec![("rope_parameters", json!({"rope_theta": "x"}))],
            "rope",
        ),
        (vec![("rope_scaling", json!("linear"))], "rope_scaling"),
        (
            vec![(
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 0.0}),
            )],
            "factor",
        ),
        (
            vec![(
                "rope_scaling",
                json!({"rope_type": "linear", "factor": -2.0}),
            )],
            "factor",
        ),
        (
            vec![("rope_scaling", json!({"rope_type": "llama3"}))],
            "factor",
        ),
        (
            vec![("architectures", json!(["GPTNeoXForCausalLM"]))],
            "GPTNeoXForCausalLM",
        ),
        (
            vec![("rope_parameters", json!("default"))],
            "rope_parameters",
        ),
        (
            vec![("architectures", json!("LlamaForCausalLM"))],
            "architectures",
        ),
        (vec![("hidden_act", json!("gelu"))], "hidden_act"),
        (
            vec![("tie_word_embeddings", json!("yes"))],
            "tie_word_embeddings",
        ),
    ] {
        cases.push((with(&edits), needle.to_string()));
    }
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut refused = 0;
    for (config, needle) in &cases {
        let text = config.to_string();
        let got = std::panic::catch_unwind(|| ModelShape::from_config_str("m", &text));
        let result = got.unwrap_or_else(|_| panic!("panicked on {text}"));
        match result {
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(needle.as_str()), "{needle}: {e}\n{text}");
                refused += 1;
            }
            Ok(s) => panic!("accepted ({needle}): {s:?}\n{text}"),
        }
    }
    println!("{refused} broken configs refused");
}
