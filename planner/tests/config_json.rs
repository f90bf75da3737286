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
