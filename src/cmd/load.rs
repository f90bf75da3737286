//! Opening and loading what `--model` names, shared by every command: a Hugging Face
//! directory, the built-in default, or a GGUF file (run as stored, or requantized by
//! `--dtype`), and the `--dtype` flag itself.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use llmem_engine::config::GenerationConfig;
use llmem_engine::model::Model;
use llmem_engine::weights::files::WeightFiles;
use llmem_engine::weights::quant::{fallback_notes, WeightFormat};
use llmem_planner::{ModelShape, Precision};

/// The precision weights are stored in. f32/bf16/f16 keep every tensor (and the
/// activations) in that dtype; the GGUF block formats quantize the matrices at load and
/// keep norms, biases and activations in f32 (see `llmem_engine::weights::quant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q6_k")]
    Q6K,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl DtypeArg {
    pub fn precision(self) -> Precision {
        match self {
            DtypeArg::F32 => Precision::Fp32,
            DtypeArg::Bf16 => Precision::Bf16,
            DtypeArg::F16 => Precision::Fp16,
            DtypeArg::Q8_0 => Precision::Q8_0,
            DtypeArg::Q6K => Precision::Q6K,
            DtypeArg::Q4_1 => Precision::Q4_1,
            DtypeArg::Q4_0 => Precision::Q4_0,
            DtypeArg::Q4K => Precision::Q4K,
        }
    }

    pub fn name(self) -> &'static str {
        llmem_engine::weights::quant::cli_name(self.precision())
    }
}

/// A model as `--model` names it, opened but not loaded: a Hugging Face directory (or the
/// built-in name) or a GGUF file, whose metadata supplies the shape, tokenizer and chat
/// template.
pub struct ModelParts {
    /// The directory or the .gguf file.
    pub path: std::path::PathBuf,
    pub shape: llmem_planner::ModelShape,
    pub weights: llmem_engine::weights::files::WeightFiles,
    pub tokenizer: tokenizers::Tokenizer,
    pub config: llmem_engine::config::GenerationConfig,
}

/// A GGUF's shape and its tensor table summed per ggml type by the planner, when `model`
/// names a file (`llmem plan` / `llmem inspect`); `None` for presets, config.json files
/// and directories, which the planner resolves itself.
pub fn gguf_shape(model: &str) -> anyhow::Result<Option<GgufTable>> {
    let path = std::path::Path::new(model);
    let is_config = path.extension().is_some_and(|e| e == "json");
    if is_config || !(path.is_file() || llmem_engine::weights::source::is_gguf_path(path)) {
        return Ok(None);
    }
    let (shape, weights) = llmem_engine::weights::source::GgufModel::shape_and_tensors(path)?;
    Ok(Some(GgufTable {
        shape,
        summary: weights.summary()?,
        main: weights.main_precision(),
        tensors: weights.stored_tensors()?,
    }))
}

/// What the planner reads of a GGUF: its shape, tensor table (summed per type, and
/// tensor by tensor for per-rank bytes) and the precision holding most of its bytes.
pub struct GgufTable {
    pub shape: llmem_planner::ModelShape,
    pub summary: llmem_planner::checkpoint::CheckpointSummary,
    pub main: llmem_planner::Precision,
    pub tensors: Vec<llmem_planner::StoredTensor>,
}

/// Open what `--model` names. A path to a file (or any path ending in `.gguf`) is read
/// as a GGUF; a directory as a Hugging Face model; else the built-in name.
pub fn open_model(model: &str) -> anyhow::Result<ModelParts> {
    let path = std::path::Path::new(model);
    if path.is_file() || llmem_engine::weights::source::is_gguf_path(path) {
        let g = llmem_engine::weights::source::GgufModel::open(path)?;
        return Ok(ModelParts {
            path: g.path,
            shape: g.shape,
            weights: g.weights,
            tokenizer: g.tokenizer,
            config: g.config,
        });
    }
    let dir = llmem_engine::weights::hub::resolve_model(model)?;
    let shape = llmem_planner::ModelShape::from_path(&dir)?;
    let weights = llmem_engine::weights::files::WeightFiles::open_dir(&dir)?;
    let tokenizer = llmem_engine::weights::tokenizer::load_tokenizer(&dir)?;
    let config = llmem_engine::config::GenerationConfig::from_dir(&dir)?;
    Ok(ModelParts {
        path: dir,
        shape,
        weights,
        tokenizer,
        config,
    })
}

/// [`open_model`] for a command that runs one model on one rank: the built-in name without
/// `--dtype` opens its shipped GGUF (Q4_1), run with its tensors as stored, which is the
/// fast path; with `--dtype` the f32 conversion is the source of the level asked for
/// (requantizing from Q4_1 would compound two roundings).
pub fn open_model_for(model: &str, dtype: Option<DtypeArg>) -> anyhow::Result<ModelParts> {
    if dtype.is_none() && llmem_engine::weights::hub::is_default_name(model) {
        let gguf = llmem_engine::weights::hub::default_gguf()?;
        return open_model(&gguf.to_string_lossy());
    }
    open_model(model)
}

/// What `run` needs loaded: the model, its tokenizer and engine settings.
pub struct Loaded {
    /// The model directory or .gguf file.
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub config: GenerationConfig,
    pub load_ms: f64,
    /// How the weights were loaded, for reports: `--dtype`'s name, or `as-stored:<type>`
    /// for a GGUF kept in its own types (`<type>` the one holding most bytes).
    pub dtype_name: String,
}

/// Resolve a model name, directory or .gguf file and load it on the CPU. `None` is the
/// default: f32 for a directory, the file's own tensor types for a GGUF.
pub fn load(model: &str, dtype: Option<DtypeArg>) -> anyhow::Result<Loaded> {
    load_with(model, dtype, false)
}

/// The format `--dtype` / `--keep-embeddings` ask for, given what the model is. A GGUF
/// without `--dtype` keeps its stored types (`--keep-embeddings` is refused: the file
/// already says how its embedding is stored); with `--dtype` it is dequantized and
/// requantized (or cast) like a safetensors model.
pub fn weight_format(
    weights: &WeightFiles,
    path: &Path,
    dtype: Option<DtypeArg>,
    keep_embeddings: bool,
) -> anyhow::Result<WeightFormat> {
    match (dtype, weights.gguf()) {
        (None, Some(g)) => {
            if keep_embeddings {
                anyhow::bail!(
                    "--keep-embeddings applies when quantizing at load; {} is loaded with its \
                     tensors as stored (embedding included). Add --dtype to requantize it.",
                    path.display()
                );
            }
            Ok(WeightFormat::gguf_as_stored(g.main_precision()))
        }
        (d, _) => Ok(WeightFormat {
            precision: d.unwrap_or(DtypeArg::F32).precision(),
            keep_embeddings,
            as_stored: false,
        }),
    }
}

/// The format of every rank's shard under `--tp/--pp`: `--dtype` (f32 by default), each
/// rank's slices stored at that level (a block format quantizes them). A GGUF is
/// dequantized first, which a note on stderr says: its blocks are not sliced as stored
/// yet.
pub fn shard_format(dtype: Option<DtypeArg>, weights: &WeightFiles) -> WeightFormat {
    if let Some(g) = weights.gguf() {
        match dtype {
            // Each rank reads its slices of the file's tensors, in their stored types.
            None => return WeightFormat::gguf_as_stored(g.main_precision()),
            Some(d) => eprintln!(
                "note: {}: --tp/--pp with --dtype {}: the GGUF is dequantized and every \
                 rank's slices are stored as {}",
                g.path().display(),
                d.name(),
                d.name()
            ),
        }
    }
    let d = dtype.unwrap_or(DtypeArg::F32);
    WeightFormat {
        precision: d.precision(),
        keep_embeddings: false,
        as_stored: false,
    }
}

/// The tensor table the planner cuts per rank when `fmt` runs a GGUF as stored.
pub fn stored_tensors(
    fmt: &WeightFormat,
    weights: &WeightFiles,
) -> anyhow::Result<Option<std::sync::Arc<Vec<llmem_planner::StoredTensor>>>> {
    Ok(match (fmt.as_stored, weights.gguf()) {
        (true, Some(g)) => Some(std::sync::Arc::new(g.stored_tensors()?)),
        _ => None,
    })
}

/// The report name of a loaded model's format: `--dtype`'s name, or for a GGUF kept as
/// stored `as-stored:<type>`, the ggml type holding most of its bytes.
pub fn format_name(model: &Model) -> String {
    match model.stored_weights() {
        Some(s) => {
            let main = s
                .by_dtype
                .iter()
                .max_by_key(|(_, t)| t.bytes)
                .map_or("?", |(ty, _)| ty.as_str());
            format!("as-stored:{main}")
        }
        None => llmem_engine::weights::quant::cli_name(model.weight_format().precision).to_string(),
    }
}

/// Load `parts` as `fmt` says, printing the format notes on stderr: for a GGUF kept as
/// stored, its tensors per type; else the matrices that fall back to another format.
pub fn load_parts(
    shape: &ModelShape,
    weights: &WeightFiles,
    path: &Path,
    fmt: &WeightFormat,
    device: &candle_core::Device,
) -> anyhow::Result<Model> {
    let model = Model::load_with(shape, weights, fmt, device)
        .with_context(|| format!("loading model {}", path.display()))?;
    if let Some(s) = model.stored_weights() {
        let types: Vec<String> = s
            .by_dtype
            .iter()
            .map(|(ty, t)| {
                format!(
                    "{} {ty} ({})",
                    t.tensors,
                    llmem_planner::human_bytes(t.bytes)
                )
            })
            .collect();
        eprintln!(
            "note: {}: tensors as stored: {}",
            path.display(),
            types.join(", ")
        );
    } else {
        if weights.gguf().is_some() {
            eprintln!(
                "note: {}: dequantized and stored as {} (--dtype)",
                path.display(),
                llmem_engine::weights::quant::cli_name(fmt.precision)
            );
        }
        for note in fallback_notes(model.shape(), fmt) {
            eprintln!("note: {note}");
        }
    }
    Ok(model)
}

/// [`load`] with the embedding and LM head kept at f16 when `keep_embeddings`. Matrices
/// that fall back to another format are reported on stderr, one line per kind.
pub fn load_with(
    model: &str,
    dtype: Option<DtypeArg>,
    keep_embeddings: bool,
) -> anyhow::Result<Loaded> {
    load_on(model, dtype, keep_embeddings, &candle_core::Device::Cpu)
}

/// [`load_with`] on `device`.
pub fn load_on(
    model: &str,
    dtype: Option<DtypeArg>,
    keep_embeddings: bool,
    device: &candle_core::Device,
) -> anyhow::Result<Loaded> {
    let start = Instant::now();
    let parts = open_model_for(model, dtype)?;
    let fmt = weight_format(&parts.weights, &parts.path, dtype, keep_embeddings)?;
    let model = load_parts(&parts.shape, &parts.weights, &parts.path, &fmt, device)?;
    let dtype_name = format_name(&model);
    Ok(Loaded {
        dir: parts.path,
        model,
        tokenizer: parts.tokenizer,
        config: parts.config,
        load_ms: start.elapsed().as_secs_f64() * 1e3,
        dtype_name,
    })
}
