//! llmem-planner: the math half of llmem.
//!
//! Turns a model shape, a workload and a deployment into a per-GPU memory bill:
//!
//! ```text
//! total_gpu_memory >= weights + kv_cache + activations + runtime_overhead + headroom
//! ```
//!
//! Pure arithmetic on integers: no tensors, no I/O except reading config.json and
//! safetensors headers (a GGUF's tensor table is read by the engine and summed here).
//! Every sum is overflow-checked. The engine sizes its KV cache
//! with [`ModelShape::kv_bytes_per_token`], so planned and measured compare like with like.

pub mod checkpoint;
pub mod fit;
pub mod gguf;
pub mod gpu;
pub mod plan;
pub mod precision;
pub mod presets;
pub mod report;
pub mod shape;

pub use fit::{fit, levers, max_concurrency, max_context, FitLimits, FitReport};
pub use gguf::{
    gguf_rank_weights, gguf_tensor_bytes, gguf_weights, GgmlType, RankPart, StoredTensor,
};
pub use gpu::{catalog, custom_gpu, gpu, human_bytes, parse_bytes, Gpu};
pub use plan::{
    model_weights_bytes, pass_phases, plan, AttentionImpl, Deployment, PassPhases, Plan, RankPass,
    Terms, Workload,
};
pub use precision::{matrix_bytes, vector_bytes, KvDtype, Precision};
pub use presets::{preset, preset_names, resolve_shape};
pub use shape::{Architecture, ModelShape, ParamCounts, RawConfig, RopeScaling};

/// Everything that can go wrong in the planner. Each message names the field and value.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PlanError {
    /// A config.json, preset or model shape that cannot be used.
    #[error("{0}")]
    Config(String),
    /// A workload or deployment value out of range (zero sizes, TP not dividing heads...).
    #[error("{0}")]
    Invalid(String),
    /// A sum that does not fit in 64 bits.
    #[error("arithmetic overflow while computing {0}")]
    Overflow(String),
    /// A file that could not be read.
    #[error("{0}")]
    Io(String),
}
