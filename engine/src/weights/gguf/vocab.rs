//! Hugging Face `tokenizer.json` (and `tokenizer_config.json`) from the vocabulary a GGUF
//! file carries under `tokenizer.ggml.*`.
//!
//! Two vocabulary kinds are handled, the two llama.cpp uses for Llama-family models:
//! - `gpt2`: byte-level BPE (tokens already in GPT-2's byte-to-unicode form, plus merges).
//!   The pre-tokenizer follows `tokenizer.ggml.pre`; e.g. `smollm` first isolates every
//!   numeric character (`\p{N}`, one by one) and then applies GPT-2's byte-level split.
//! - `llama`: SentencePiece BPE (scores instead of merges, `<0xNN>` byte-fallback tokens,
//!   `▁` for spaces). Merges are rebuilt from the scores the way Hugging Face's converter
//!   does: every split of a vocabulary piece into two pieces that are both in the
//!   vocabulary is a merge, ranked by the score of the merged piece.
//!
//! Token types (llama.cpp's `llama_token_type`): 1 normal, 2 unknown, 3 control,
//! 4 user-defined, 5 unused, 6 byte. Control and unknown tokens become added *special*
//! tokens; user-defined ones become added non-special tokens. Both are matched in the raw
//! text before pre-tokenization, so `<|im_start|>` is always one token.
//!
//! The output is plain JSON built here and checked by loading it with the `tokenizers`
//! crate ([`tokenizer_from_json`]); nothing is written unless it loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::weights::gguf::file::GgufFile;

const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// The regex of Llama 3's pre-tokenizer (llama.cpp `llama3` / `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values this module knows, for error messages.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "llama3",
    "llama-v3",
    "llama-bpe",
];

/// The vocabulary section of a GGUF, as read from `tokenizer.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// The file it came from (for error messages).
    pub source: PathBuf,
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre` (gpt2 vocabularies): the pre-tokenizer name.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// One per token; normal (1) when the file has none.
    pub token_types: Vec<i32>,
    /// SentencePiece scores (llama vocabularies).
    pub scores: Option<Vec<f32>>,
    /// BPE merges, `"left right"` (gpt2 vocabularies).
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// SentencePiece's "prepend a space"; defaults to true for llama vocabularies.
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// [`GgufVocab::from_gguf`], refused when it lists more tokens than the embedding's
    /// `vocab_size` rows (an id past them would index outside the table).
    pub fn for_embedding(g: &GgufFile, vocab_size: usize) -> Result<Self> {
        let vocab = Self::from_gguf(g)?;
        if vocab.tokens.len() > vocab_size {
            return Err(Error::Tokenizer {
                path: g.path().to_path_buf(),
                message: format!(
                    "{} tokens but token_embd.weight has only {vocab_size} rows",
                    vocab.tokens.len()
                ),
            });
        }
        Ok(vocab)
    }

    /// Read `tokenizer.ggml.*` and `tokenizer.chat_template` from an open GGUF.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let source = g.path().to_path_buf();
        let model = g.string("tokenizer.ggml.model")?.to_string();
        let tokens: Vec<String> = g
            .opt_string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::GgufMissingKey {
                path: source.clone(),
                key: "tokenizer.ggml.tokens".to_string(),
            })?
            .into_iter()
            .map(str::to_string)
            .collect();
        let n = tokens.len();
        let token_types = g
            .opt_i32_array("tokenizer.ggml.token_type")?
            .unwrap_or_else(|| vec![TOKEN_TYPE_NORMAL; n]);
        let scores = g.opt_f32_array("tokenizer.ggml.scores")?;
        let merges = g
            .opt_string_array("tokenizer.ggml.merges")?
            .map(|m| m.into_iter().map(str::to_string).collect());
        let vocab = GgufVocab {
            source,
            pre: g.opt_string("tokenizer.ggml.pre")?.map(str::to_string),
            tokens,
            token_types,
            scores,
            merges,
            bos_token_id: g.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: g.opt_u32("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: g.opt_u32("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: g.opt_u32("tokenizer.ggml.padding_token_id")?,
            add_bos_token: g
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(model == "llama"),
            add_eos_token: g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: g
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(model == "llama"),
            chat_template: g.opt_string("tokenizer.chat_template")?.map(str::to_string),
            model,
        };
        vocab.validate()?;
        Ok(vocab)
    }

    fn err(&self, message: impl Into<String>) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            message: message.into(),
        }
    }

    /// Lengths agree and the special token ids are in range.
    fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(self.err("tokenizer.ggml.tokens is empty"));
        }
        if self.token_types.len() != n {
            return Err(self.err(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                self.token_types.len()
            )));
        }
        if let Some(s) = &self.scores {
            if s.len() != n {
                return Err(self.err(format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    s.len()
                )));
            }
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos_token_id),
            ("tokenizer.ggml.eos_token_id", self.eos_token_id),
            ("tokenizer.ggml.unknown_token_id", self.unknown_token_id),
            ("tokenizer.ggml.padding_token_id", self.padding_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(Error::GgufBadValue {
                        path: self.source.clone(),
                        key: key.to_string(),
                        found: id.to_string(),
                        expected: format!("a token id below the vocabulary size {n}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The text of a token id, if in range.
    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// `{token: id}`; where a string occurs twice the first id wins.
    fn vocab_map(&self) -> HashMap<&str, u32> {
        let mut map = HashMap::with_capacity(self.tokens.len());
        for (id, t) in self.tokens.iter().enumerate() {
            map.entry(t.as_str()).or_insert(id as u32);
        }
        map
    }

    fn vocab_json(&self) -> Value {
        let map: Map<String, Value> = self
            .vocab_map()
            .into_iter()
            .map(|(t, id)| (t.to_string(), json!(id)))
            .collect();
        Value::Object(map)
    }

    fn added_tokens_json(&self) -> Vec<Value> {
        self.tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter_map(|(id, (t, &ty))| {
                let special = match ty {
                    TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => true,
                    TOKEN_TYPE_USER_DEFINED => false,
                    _ => return None,
                };
                Some(json!({
                    "id": id,
                    "content": t,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                }))
            })
            .collect()
    }

    /// A `TemplateProcessing` post-processor adding BOS/EOS, or `None` if neither is added.
    fn template_post_processor(&self) -> Result<Option<Value>> {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special = Map::new();
        let mut push_special = |key: &str, id: Option<u32>| -> Result<Value> {
            let tok = self
                .token(id)
                .ok_or_else(|| self.err(format!("{key} is requested but {key}_id is missing")))?;
            special.insert(
                tok.to_string(),
                json!({"id": tok, "ids": [id], "tokens": [tok]}),
            );
            Ok(json!({"SpecialToken": {"id": tok, "type_id": 0}}))
        };
        let bos = if self.add_bos_token {
            Some(push_special("bos_token", self.bos_token_id)?)
        } else {
            None
        };
        let eos = if self.add_eos_token {
            Some(push_special("eos_token", self.eos_token_id)?)
        } else {
            None
        };
        if bos.is_none() && eos.is_none() {
            return Ok(None);
        }
        for (seq, type_id, out) in [("A", 0, &mut single), ("A", 0, &mut pair)] {
            out.extend(bos.clone());
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            out.extend(eos.clone());
        }
        pair.extend(bos.clone());
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        pair.extend(eos.clone());
        Ok(Some(json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special,
        })))
    }

    fn gpt2_pre_tokenizer(&self) -> Result<Value> {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre = self.pre.as_deref().unwrap_or("default");
        Ok(match pre {
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            "smollm" => json!({
                "type": "Sequence",
                "pretokenizers": [split(r"\p{N}"), byte_level(true)],
            }),
            "llama3" | "llama-v3" | "llama-bpe" => json!({
                "type": "Sequence",
                "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)],
            }),
            other => {
                return Err(Error::GgufBadValue {
                    path: self.source.clone(),
                    key: "tokenizer.ggml.pre".to_string(),
                    found: format!("{other:?}"),
                    expected: format!("one of {SUPPORTED_PRE:?}"),
                })
            }
        })
    }

    fn gpt2_tokenizer_json(&self) -> Result<Value> {
        let merges = self.merges.as_ref().ok_or_else(|| {
            self.err("tokenizer.ggml.merges is missing (needed for a gpt2 vocabulary)")
        })?;
        let merges: Vec<Value> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok(json!([a, b]))
                }
                _ => Err(self.err(format!(
                    "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens_json(),
            "normalizer": null,
            "pre_tokenizer": self.gpt2_pre_tokenizer()?,
            "post_processor": self.template_post_processor()?.unwrap_or_else(|| json!({
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
            })),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": self.vocab_json(),
                "merges": merges,
            },
        }))
    }

    /// SentencePiece BPE merges rebuilt from scores: every split of a normal or
    /// user-defined piece into two vocabulary pieces, best-scoring merged piece first.
    fn spm_merges(&self) -> Result<Vec<Value>> {
        let scores = self.scores.as_ref().ok_or_else(|| {
            self.err("tokenizer.ggml.scores is missing (needed for a llama vocabulary)")
        })?;
        let vocab = self.vocab_map();
        // (score of merged piece, merged id, left id, right id, left, right)
        let mut merges: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
        for (id, (piece, &ty)) in self.tokens.iter().zip(&self.token_types).enumerate() {
            if ty != TOKEN_TYPE_NORMAL && ty != TOKEN_TYPE_USER_DEFINED {
                continue;
            }
            for (at, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(at);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    merges.push((scores[id], id as u32, li, ri, l, r));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        Ok(merges
            .into_iter()
            .map(|(_, _, _, _, l, r)| json!([l, r]))
            .collect())
    }

    fn llama_tokenizer_json(&self) -> Result<Value> {
        let unk = self
            .token(self.unknown_token_id)
            .or_else(|| {
                self.token_types
                    .iter()
                    .position(|&t| t == TOKEN_TYPE_UNKNOWN)
                    .map(|i| self.tokens[i].as_str())
            })
            .map(str::to_string);
        let has_bytes = self.token_types.contains(&TOKEN_TYPE_BYTE);
        let mut normalizers = Vec::new();
        if self.add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens_json(),
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": self.template_post_processor()?,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": has_bytes,
                "ignore_merges": false,
                "vocab": self.vocab_json(),
                "merges": self.spm_merges()?,
            },
        }))
    }

    /// The `tokenizer.json` document for this vocabulary.
    pub fn tokenizer_json(&self) -> Result<Value> {
        match self.model.as_str() {
            "gpt2" => self.gpt2_tokenizer_json(),
            "llama" => self.llama_tokenizer_json(),
            other => Err(Error::GgufBadValue {
                path: self.source.clone(),
                key: "tokenizer.ggml.model".to_string(),
                found: format!("{other:?}"),
                expected: "\"gpt2\" (byte-level BPE) or \"llama\" (SentencePiece)".to_string(),
            }),
        }
    }

    /// The `tokenizer_config.json` document: special tokens, BOS/EOS policy, chat template.
    pub fn tokenizer_config_json(&self, model_max_length: usize) -> Value {
        let mut cfg = Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("add_bos_token".into(), json!(self.add_bos_token));
        cfg.insert("add_eos_token".into(), json!(self.add_eos_token));
        for (key, id) in [
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_id),
            ("unk_token", self.unknown_token_id),
            ("pad_token", self.padding_token_id),
        ] {
            cfg.insert(key.into(), json!(self.token(id)));
        }
        cfg.insert("model_max_length".into(), json!(model_max_length));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        Value::Object(cfg)
    }
}

/// Load a `tokenizer.json` document with the `tokenizers` crate, as a check that it is valid.
pub fn tokenizer_from_json(doc: &Value, source: &Path) -> Result<tokenizers::Tokenizer> {
    let text = serde_json::to_string(doc).map_err(|e| Error::Tokenizer {
        path: source.to_path_buf(),
        message: e.to_string(),
    })?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer {
            path: source.to_path_buf(),
            message: format!("the generated tokenizer.json does not load: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's byte-to-unicode map, for building a tiny byte-level vocabulary by hand.
    fn byte_char(b: u8) -> char {
        let printable = (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        if printable {
            char::from(b)
        } else {
            let mut n = 0u32;
            for x in 0..b {
                let p = (b'!'..=b'~').contains(&x) || (0xa1..=0xac).contains(&x) || x >= 0xae;
                if !p {
                    n += 1;
                }
            }
            char::from_u32(256 + n).unwrap()
        }
    }

    fn tiny_gpt2(pre: &str) -> GgufVocab {
        // Special tokens, then all 256 byte symbols, then a few merged tokens.
        let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
        let mut types = vec![TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(byte_char(b).to_string());
            types.push(TOKEN_TYPE_NORMAL);
        }
        let sp = byte_char(b' ');
        let merges = vec![
            format!("{sp} h"),
            "h e".to_string(),
            format!("{sp}h e"),
            "1 2".to_string(),
        ];
        for m in &merges {
            tokens.push(m.replace(' ', ""));
            types.push(TOKEN_TYPE_NORMAL);
        }
        GgufVocab {
            source: PathBuf::from("tiny.gguf"),
            model: "gpt2".into(),
            pre: Some(pre.into()),
            token_types: types,
            tokens,
            scores: None,
            merges: Some(merges),
            bos_token_id: Some(1),
            eos_token_id: Some(0),
            unknown_token_id: None,
            padding_token_id: None,
            add_bos_token: false,
            add_eos_token: false,
            add_space_prefix: false,
            chat_template: Some("{{ messages }}".into()),
        }
    }

    fn ids(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn tiny_gpt2_vocab_builds_and_round_trips() {
        let v = tiny_gpt2("default");
        let tok = tokenizer_from_json(&v.tokenizer_json().unwrap(), &v.source).unwrap();
        let id = |s: &str| v.tokens.iter().position(|t| t == s).unwrap() as u32;
        let sp = byte_char(b' ');
        // " he" merges fully; special tokens are single tokens; "12" merges (no digit split).
        assert_eq!(ids(&tok, " he"), vec![id(&format!("{sp}he"))]);
        assert_eq!(ids(&tok, "<|im_start|>he"), vec![1, id("he")]);
        assert_eq!(ids(&tok, "12"), vec![id("12")]);
        for text in ["hello world 12 ½ héllo 日本\n\n  x", " ½ 123 héllo 日本"] {
            let enc = ids(&tok, text);
            assert_eq!(tok.decode(&enc, false).unwrap(), text);
        }
    }

    #[test]
    fn smollm_pre_tokenizer_isolates_every_digit() {
        let v = tiny_gpt2("smollm");
        let tok = tokenizer_from_json(&v.tokenizer_json().unwrap(), &v.source).unwrap();
        let id = |s: &str| v.tokens.iter().position(|t| t == s).unwrap() as u32;
        assert_eq!(ids(&tok, "12"), vec![id("1"), id("2")]);
        // ½ is \p{N} (No): isolated, so the space before it stays a token of its own.
        let half: Vec<u32> = "½".bytes().map(|b| id(&byte_char(b).to_string())).collect();
        let mut want = vec![id(&byte_char(b' ').to_string())];
        want.extend(half);
        assert_eq!(ids(&tok, " ½"), want);
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error_naming_the_key() {
        let v = tiny_gpt2("mystery");
        let err = v.tokenizer_json().unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.pre") && err.contains("mystery"),
            "{err}"
        );
    }

    #[test]
    fn bad_merge_is_an_error_naming_its_index() {
        let mut v = tiny_gpt2("default");
        v.merges.as_mut().unwrap().push("nospace".into());
        let err = v.tokenizer_json().unwrap_err().to_string();
        assert!(err.contains("merges[4]"), "{err}");
    }

    #[test]
    fn tiny_sentencepiece_vocab_with_byte_fallback() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "▁h",
        ];
        let mut scores = vec![0.0; tokens.len()];
        for (k, p) in pieces.iter().enumerate() {
            tokens.push(p.to_string());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(-(k as f32));
        }
        let v = GgufVocab {
            source: PathBuf::from("spm.gguf"),
            model: "llama".into(),
            pre: None,
            tokens,
            token_types: types,
            scores: Some(scores),
            merges: None,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            padding_token_id: None,
            add_bos_token: true,
            add_eos_token: false,
            add_space_prefix: true,
            chat_template: None,
        };
        let tok = tokenizer_from_json(&v.tokenizer_json().unwrap(), &v.source).unwrap();
        let id = |s: &str| v.tokens.iter().position(|t| t == s).unwrap() as u32;
        let enc = tok.encode("hello", true).unwrap();
        assert_eq!(enc.get_ids(), &[1, id("▁hello")]);
        // "é" is not in the vocabulary: byte fallback to its two UTF-8 bytes.
        let enc = ids(&tok, "hé");
        assert_eq!(enc, vec![id("▁h"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&enc, false).unwrap(), "hé");
        let cfg = v.tokenizer_config_json(4096);
        assert_eq!(cfg["bos_token"], "<s>");
        assert_eq!(cfg["add_bos_token"], true);
    }

    #[test]
    fn out_of_range_special_id_is_an_error() {
        let mut v = tiny_gpt2("default");
        v.eos_token_id = Some(100_000);
        let err = v.validate().unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.eos_token_id") && err.contains("100000"),
            "{err}"
        );
    }
}
