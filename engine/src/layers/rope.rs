//! Rotary position embeddings: the tables, computed once at load in f32 the way Hugging
//! Face computes them (with Llama-3 / linear `rope_scaling`).

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::error::{Error, Result};

/// Rotary embedding tables, indexed by absolute position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (max_positions, head_dim / 2), model dtype.
    pub(crate) cos: Tensor,
    /// (max_positions, head_dim / 2), model dtype.
    pub(crate) sin: Tensor,
}

/// Inverse frequencies, f32 as Hugging Face computes them, with `rope_scaling` applied.
pub fn rope_inv_freq(shape: &ModelShape) -> Result<Vec<f32>> {
    let hd = shape.head_dim as usize;
    let base = shape.rope_theta as f32;
    let mut inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / hd as f32))
        .collect();
    if let Some(scaling) = &shape.rope_scaling {
        let factor = scaling.factor as f32;
        match scaling.rope_type.as_str() {
            "linear" => inv.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                let missing = |field: &str| {
                    Error::InvalidInput(format!(
                        "model {}: rope_scaling of type \"llama3\" needs `{field}`",
                        shape.name
                    ))
                };
                let low = scaling
                    .low_freq_factor
                    .ok_or_else(|| missing("low_freq_factor"))? as f32;
                let high = scaling
                    .high_freq_factor
                    .ok_or_else(|| missing("high_freq_factor"))? as f32;
                let old_ctx = scaling
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?
                    as f32;
                let low_freq_wavelen = old_ctx / low;
                let high_freq_wavelen = old_ctx / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "model {}: rope_scaling type {other:?} is not supported (supported: \
                     \"llama3\", \"linear\")",
                    shape.name
                )))
            }
        }
    }
    Ok(inv)
}

impl Rope {
    pub(crate) fn new(
        shape: &ModelShape,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = rope_inv_freq(shape)?;
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                // The angle is rounded to f32 as in HF; its cosine is then exact.
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }
}
