//! Rotary position embeddings: the inverse frequencies, computed once at load in f32 the
//! way Hugging Face computes them (with Llama-3 / linear `rope_scaling`), and the cos/sin
//! rows of each pass's positions, computed per pass. No table of every position is kept:
//! its size would follow the model's declared context (a damaged or hostile header
//! declaring 600 million positions made a load allocate and compute for minutes, found
//! by the gguf fuzz target), and a pass needs only its own rows.

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::error::{Error, Result};

/// Rotary embeddings: cos/sin rows for any absolute position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// head_dim / 2 inverse frequencies.
    inv: Vec<f32>,
    dtype: DType,
    device: Device,
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
    pub(crate) fn new(shape: &ModelShape, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Rope {
            inv: rope_inv_freq(shape)?,
            dtype,
            device: device.clone(),
        })
    }

    /// The cos and sin rows of `positions`: two `(positions.len(), head_dim / 2)`
    /// tensors in the model's dtype, on its device.
    pub(crate) fn at(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let (n, half) = (positions.len(), self.inv.len());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in positions {
            self.push_row(p, &mut cos, &mut sin);
        }
        let table = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, half), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((table(cos)?, table(sin)?))
    }

    /// The f32 cos and sin rows (head_dim / 2 each) of position `p`, appended to `cos` and
    /// `sin`: one row of [`Rope::at`]'s tables (before their cast to the model's dtype).
    pub(crate) fn push_row(&self, p: u32, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        for &f in &self.inv {
            // The angle is rounded to f32 as in HF; its cosine is then exact.
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
}
