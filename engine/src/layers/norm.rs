//! RMSNorm, and the residual add fused with the norm after it.

use candle_core::{Device, Tensor};
use llmem_planner::ModelShape;

use crate::error::Result;
use crate::weights::files::WeightFiles;
use crate::weights::quant::WeightFormat;

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    pub(crate) weight: Tensor,
    pub(crate) eps: f32,
}

impl RmsNorm {
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::layers::host_ops::rms_norm(x, &self.weight, self.eps)
    }

    /// The residual add before the norm, fused: `(x + y, norm(x + y))`.
    pub(crate) fn add_forward(
        &self,
        x: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        crate::layers::host_ops::add_rms_norm(x, y, &self.weight, self.eps)
    }
}

pub(crate) fn load_norm(
    w: &WeightFiles,
    name: &str,
    shape: &ModelShape,
    fmt: &WeightFormat,
    device: &Device,
) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.load(
            name,
            &[shape.hidden_size as usize],
            fmt.vector_dtype(),
            device,
        )?,
        eps: shape.rms_norm_eps as f32,
    })
}
