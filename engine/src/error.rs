//! The engine's one error type. Every variant names what it was working on (file, tensor,
//! metadata key, value) so that a message read alone says what to fix.
//!
//! Several modules add variants here; keep each group together and keep messages in the
//! form "<file>: <what>: <why>".

use std::path::PathBuf;

/// Errors of the `llmem-engine` crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- files -------------------------------------------------------------------------
    /// An I/O error on a named file or directory. (The cause is in the message, not
    /// chained as `source`, so `{:#}` does not print it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A JSON file that could not be written or parsed.
    #[error("{}: {message}", path.display())]
    Json { path: PathBuf, message: String },

    // ---- GGUF import and loading (gguf.rs, convert.rs, tokenizer_gguf.rs, gguf_weights.rs)
    /// The file is not a GGUF file, or its header/metadata is damaged or truncated.
    #[error("{}: not a readable GGUF file: {message}", path.display())]
    GgufRead { path: PathBuf, message: String },
    /// A metadata key the converter needs is absent.
    #[error("{}: GGUF metadata key `{key}` is missing", path.display())]
    GgufMissingKey { path: PathBuf, key: String },
    /// A metadata key has a value of the wrong type or an unusable value.
    #[error("{}: GGUF metadata key `{key}` = {found}: expected {expected}", path.display())]
    GgufBadValue {
        path: PathBuf,
        key: String,
        found: String,
        expected: String,
    },
    /// The GGUF describes a model family the converter and loader do not handle.
    #[error(
        "{}: architecture `{found}` (general.architecture) is not supported: \
         llmem loads and converts only `llama` GGUF models",
        path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// A tensor is missing, has an unexpected name, type or shape, or cannot be read.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    GgufTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    /// The vocabulary in the GGUF cannot be turned into a tokenizer.json.
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// Writing the safetensors file failed.
    #[error("{}: writing safetensors: {message}", path.display())]
    SafetensorsWrite { path: PathBuf, message: String },

    // ---- model resolution and download (hub.rs) -----------------------------------------
    /// An HTTP(S) request failed or returned something unusable.
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    /// A downloaded file's checksum does not match the one published.
    #[error("{url}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    /// The default model is not cached and could not be downloaded.
    #[error("{message}")]
    ModelUnavailable { message: String },
    /// A model name that is neither a directory nor a built-in name.
    #[error(
        "model `{name}` not found: give a directory in Hugging Face layout (config.json, \
         *.safetensors, tokenizer.json), a llama .gguf file, or the built-in name \
         `smollm2-135m`"
    )]
    UnknownModel { name: String },

    // ---- model loading, forward pass, generation (config.rs, loader.rs, model.rs, ...) --
    /// A config file (config.json, generation_config.json, tokenizer_config.json) that
    /// cannot be used.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A weight file that is unreadable or truncated, or a tensor that is missing or has
    /// the wrong shape or dtype. `message` names the tensor.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    /// A tensor operation failed; `context` says where (layer, step). candle's message
    /// is kept without the backtrace candle adds when RUST_BACKTRACE is set, and is not
    /// chained as a source, so `{:#}` prints it once.
    #[error("{context}: {message}")]
    Tensor { context: String, message: String },
    /// A request the engine cannot serve: a prompt longer than the context, a sampling
    /// parameter out of range, a batch whose metadata does not match its tokens.
    #[error("{0}")]
    InvalidInput(String),
    /// Encoding or decoding text with a loaded tokenizer failed.
    #[error("tokenizer: {0}")]
    TokenizerRun(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

impl From<candle_core::Error> for Error {
    fn from(source: candle_core::Error) -> Self {
        Error::Tensor {
            context: "tensor operation".to_string(),
            message: candle_message(source),
        }
    }
}

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set.
pub(crate) fn candle_message(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(*inner),
        other => other.to_string(),
    }
}
