//! A GGUF file opened to run (`--model file.gguf`): its tensors under Hugging Face names,
//! the [`ModelShape`] and tokenizer and generation settings read from its metadata.

use std::path::{Path, PathBuf};

use llmem_planner::ModelShape;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::weights::files::WeightFiles;
use crate::weights::gguf::convert::{config_json, generation_config_json, OutDtype};
use crate::weights::gguf::tensors::GgufWeights;
use crate::weights::gguf::vocab::{tokenizer_from_json, GgufVocab};

/// Everything a GGUF carries to run it: shape, weights, tokenizer and generation settings.
pub struct GgufModel {
    pub path: PathBuf,
    pub shape: ModelShape,
    pub weights: WeightFiles,
    pub tokenizer: tokenizers::Tokenizer,
    pub config: GenerationConfig,
}

impl GgufModel {
    /// Open a llama GGUF: the hyper-parameters become a [`ModelShape`] (through the
    /// config.json `llmem import` would write), the vocabulary a tokenizer, the special
    /// tokens and chat template a [`GenerationConfig`].
    pub fn open(path: &Path) -> Result<Self> {
        let (shape, weights, vocab, config) = Self::read(path)?;
        let max_positions = weights.params().max_position_embeddings;
        let tokenizer = tokenizer_from_json(&vocab.tokenizer_json()?, path)?;
        let generation = GenerationConfig::from_values(
            Some(generation_config_json(&vocab)),
            Some(config),
            Some(vocab.tokenizer_config_json(max_positions)),
        )
        .map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(GgufModel {
            path: path.to_path_buf(),
            shape,
            weights: WeightFiles::from_gguf(weights),
            tokenizer,
            config: generation,
        })
    }

    /// The shape and tensor table of a llama GGUF, without building its tokenizer
    /// (`llmem plan` and `llmem inspect` need nothing else).
    pub fn shape_and_tensors(path: &Path) -> Result<(ModelShape, GgufWeights)> {
        let (shape, weights, _, _) = Self::read(path)?;
        Ok((shape, weights))
    }

    /// Header, tensor table and vocabulary read and checked; the config.json that
    /// `llmem import` would write from them, and the shape it gives.
    fn read(path: &Path) -> Result<(ModelShape, GgufWeights, GgufVocab, serde_json::Value)> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such GGUF file"),
            ));
        }
        let weights = GgufWeights::open(path)?;
        let params = weights.params().clone();
        let vocab = GgufVocab::for_embedding(weights.file(), params.vocab_size)?;
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let config = config_json(&params, &vocab, OutDtype::F32, &source);
        let mut shape =
            ModelShape::from_config_str(&path.display().to_string(), &config.to_string()).map_err(
                |e| Error::Config {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                },
            )?;
        shape.name = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(source);
        Ok((shape, weights, vocab, config))
    }
}

/// True when `path` names a GGUF file by extension (`.gguf`, any case).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
