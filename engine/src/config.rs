//! Engine-only settings read from a Hugging Face model directory, next to the model
//! shape that `llmem_planner::ModelShape` owns: which token ids end a generation
//! (`generation_config.json`, then `config.json`), the special-token strings and the chat
//! template (`tokenizer_config.json` or `chat_template.jinja`).
//!
//! Raw files are parsed with every field optional; [`GenerationConfig::from_dir`] (or
//! [`GenerationConfig::from_values`], for a GGUF's metadata) resolves
//! them into values with nothing left to guess. A file that is absent is not an error
//! (the field falls back); a file that is present but malformed is, and names the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// What the engine needs beyond the model shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Token ids that end a sequence (from `generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// The BOS token id, if any file gives it (SmolLM2 adds none to prompts).
    pub bos_token_id: Option<u32>,
    /// The BOS token as text, for chat templates (`tokenizer_config.json`).
    pub bos_token: Option<String>,
    /// The EOS token as text, for chat templates (`tokenizer_config.json`).
    pub eos_token: Option<String>,
    /// A Jinja chat template, from `tokenizer_config.json` or `chat_template.jinja`.
    pub chat_template: Option<String>,
}

/// An id field that may be one integer or a list (`eos_token_id: 2` or `[1, 2]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// The token fields of `generation_config.json` and `config.json`.
#[derive(Debug, Default, Deserialize)]
struct RawTokenIds {
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<OneOrMany>,
}

/// A special token in `tokenizer_config.json`: a string or an AddedToken object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawSpecialToken {
    Text(String),
    Object { content: String },
}

impl RawSpecialToken {
    fn into_string(self) -> String {
        match self {
            RawSpecialToken::Text(s) => s,
            RawSpecialToken::Object { content } => content,
        }
    }
}

/// A chat template: one string, or a list of named templates (we use "default").
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawChatTemplate {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Default, Deserialize)]
struct RawTokenizerConfig {
    bos_token: Option<RawSpecialToken>,
    eos_token: Option<RawSpecialToken>,
    chat_template: Option<RawChatTemplate>,
}

/// Parse a JSON file if it exists; `Ok(None)` when it does not.
fn read_optional_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("not a valid JSON file of the expected form: {e}"),
        })
}

impl GenerationConfig {
    /// Read the engine settings of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let generation: Option<RawTokenIds> =
            read_optional_json(&dir.join("generation_config.json"))?;
        let model: Option<RawTokenIds> = read_optional_json(&dir.join("config.json"))?;
        let tokenizer: Option<RawTokenizerConfig> =
            read_optional_json(&dir.join("tokenizer_config.json"))?;
        let mut config = Self::resolve(generation, model, tokenizer);
        let jinja_path: PathBuf = dir.join("chat_template.jinja");
        if config.chat_template.is_none() {
            match std::fs::read_to_string(&jinja_path) {
                Ok(text) => config.chat_template = Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(jinja_path, e)),
            }
        }
        Ok(config)
    }

    /// The same settings from the three documents as JSON values (a GGUF's metadata turned
    /// into `generation_config.json`, `config.json` and `tokenizer_config.json`); the
    /// error says which document has the wrong form.
    pub fn from_values(
        generation_config: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
        tokenizer_config: Option<serde_json::Value>,
    ) -> std::result::Result<Self, String> {
        fn parse<T: for<'de> Deserialize<'de>>(
            what: &str,
            v: Option<serde_json::Value>,
        ) -> std::result::Result<Option<T>, String> {
            v.map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("{what}: not of the expected form: {e}"))
        }
        Ok(Self::resolve(
            parse("generation_config", generation_config)?,
            parse("config", config)?,
            parse("tokenizer_config", tokenizer_config)?,
        ))
    }

    /// Resolve the parsed documents (any may be absent) into settings.
    fn resolve(
        generation: Option<RawTokenIds>,
        model: Option<RawTokenIds>,
        tokenizer: Option<RawTokenizerConfig>,
    ) -> Self {
        let pick = |f: fn(&RawTokenIds) -> &Option<OneOrMany>| -> Vec<u32> {
            generation
                .as_ref()
                .and_then(|g| f(g).clone())
                .or_else(|| model.as_ref().and_then(|m| f(m).clone()))
                .map(OneOrMany::into_vec)
                .unwrap_or_default()
        };
        let eos_token_ids = pick(|r| &r.eos_token_id);
        let bos_token_id = pick(|r| &r.bos_token_id).first().copied();

        let tokenizer = tokenizer.unwrap_or_default();
        let chat_template = match tokenizer.chat_template {
            Some(RawChatTemplate::One(t)) => Some(t),
            Some(RawChatTemplate::Named(list)) => {
                let default = list.iter().find(|t| t.name == "default").or(list.first());
                default.map(|t| t.template.clone())
            }
            None => None,
        };
        GenerationConfig {
            eos_token_ids,
            bos_token_id,
            bos_token: tokenizer.bos_token.map(RawSpecialToken::into_string),
            eos_token: tokenizer.eos_token.map(RawSpecialToken::into_string),
            chat_template,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmem-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generation_config_wins_over_config_json() {
        let dir = temp_dir("gen");
        write(
            &dir,
            "config.json",
            r#"{"eos_token_id": 7, "bos_token_id": 1}"#,
        );
        write(
            &dir,
            "generation_config.json",
            r#"{"eos_token_id": [2, 0]}"#,
        );
        let cfg = GenerationConfig::from_dir(&dir).unwrap();
        assert_eq!(cfg.eos_token_ids, vec![2, 0]);
        assert_eq!(cfg.bos_token_id, Some(1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn template_from_jinja_file_and_token_objects() {
        let dir = temp_dir("jinja");
        write(
            &dir,
            "tokenizer_config.json",
            r#"{"eos_token": {"content": "<|im_end|>"}, "bos_token": "<s>"}"#,
        );
        write(&dir, "chat_template.jinja", "{{ messages[0]['content'] }}");
        let cfg = GenerationConfig::from_dir(&dir).unwrap();
        assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(cfg.bos_token.as_deref(), Some("<s>"));
        assert_eq!(
            cfg.chat_template.as_deref(),
            Some("{{ messages[0]['content'] }}")
        );
        assert!(cfg.eos_token_ids.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn malformed_file_is_an_error_naming_it() {
        let dir = temp_dir("bad");
        write(&dir, "generation_config.json", "{ not json");
        let err = GenerationConfig::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("generation_config.json"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
