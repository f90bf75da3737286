//! The tokenizer of a model directory (`tokenizer.json`). A GGUF's vocabulary becomes a
//! tokenizer in `crate::weights::gguf::vocab`.

use std::path::Path;

use crate::error::{Error, Result};

/// Load `tokenizer.json` from a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(Error::Config {
            path,
            message: "tokenizer.json is missing; a model directory needs one".to_string(),
        });
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Config {
        path,
        message: format!("not a usable tokenizer.json: {e}"),
    })
}
