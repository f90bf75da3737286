//! `mlp`: the SwiGLU block, whole or as one tensor-parallel rank's shard.

use candle_core::{Device, Tensor};
use llmem_planner::ModelShape;

use crate::error::Result;
use crate::layers::linear::Linear;
use crate::parallel::spec::TpShard;
use crate::parallel::tp::TpReduce;
use crate::weights::files::WeightFiles;
use crate::weights::gguf::tensors::Part;
use crate::weights::quant::WeightFormat;

/// `mlp`: SwiGLU, `down_proj(silu(gate_proj(x)) * up_proj(x))`. Under tensor
/// parallelism gate/up hold a slice of the intermediate rows and down the matching
/// columns, followed by one all-reduce.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
    pub(crate) tp: Option<TpReduce>,
}

impl Mlp {
    pub(crate) fn load(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let (h, i, b) = (
            shape.hidden_size as usize,
            shape.intermediate_size as usize,
            shape.mlp_bias,
        );
        let lin = |name: &str, out_dim: usize, in_dim: usize| {
            Linear::load(
                w,
                &format!("{prefix}.{name}"),
                out_dim,
                in_dim,
                b,
                fmt,
                device,
            )
        };
        Ok(Mlp {
            gate_proj: lin("gate_proj", i, h)?,
            up_proj: lin("up_proj", i, h)?,
            down_proj: lin("down_proj", h, i)?,
            tp: None,
        })
    }

    /// One TP rank's shard: its share of the intermediate rows of gate/up and the same
    /// columns of down (an uneven intermediate size gives the first ranks one more row).
    pub(crate) fn load_shard(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
        shard: &TpShard,
    ) -> Result<Self> {
        let (start, len) = TpShard::share(shape.intermediate_size as usize, shard.tp, shard.rank);
        // A GGUF run as stored: each slice read from the map in its own type (a llama
        // GGUF has no MLP biases).
        if let (true, Some(g)) = (fmt.as_stored, w.gguf()) {
            let (h, i) = (shape.hidden_size as usize, shape.intermediate_size as usize);
            let load = |name: &str, rows: usize, cols: usize, part: Part| {
                g.load_stored_part(&format!("{prefix}.{name}.weight"), rows, cols, part, device)
                    .map(|m| Linear::new(m, None))
            };
            let out_rows = Part::Rows { start, len };
            return Ok(Mlp {
                gate_proj: load("gate_proj", i, h, out_rows)?,
                up_proj: load("up_proj", i, h, out_rows)?,
                down_proj: load("down_proj", h, i, Part::Cols { start, len })?,
                tp: Some(TpReduce {
                    comm: shard.comm.clone(),
                    bias: None,
                }),
            });
        }
        // Otherwise each slice is read alone in the compute dtype, then stored as `fmt`
        // says.
        let dense = WeightFormat::dense(fmt.activation_dtype())?;
        let (h, i, b) = (
            shape.hidden_size as usize,
            shape.intermediate_size as usize,
            shape.mlp_bias,
        );
        let load = |name: &str, dims: (usize, usize), part: Part| {
            let prefix = format!("{prefix}.{name}");
            Linear::load_part(w, &prefix, dims, part, b, &dense, fmt.precision, device)
        };
        let rows = Part::Rows { start, len };
        let (down_proj, d_bias) = load("down_proj", (h, i), Part::Cols { start, len })?;
        Ok(Mlp {
            gate_proj: load("gate_proj", (i, h), rows)?.0,
            up_proj: load("up_proj", (i, h), rows)?.0,
            down_proj,
            tp: Some(TpReduce {
                comm: shard.comm.clone(),
                bias: d_bias,
            }),
        })
    }

    /// x: (T, hidden) -> (T, hidden). Gate and up are dropped before a TP all-reduce, so
    /// the reduction's sums are not alive beside them.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = {
            let [gate, up] = Linear::forward_many(x, [&self.gate_proj, &self.up_proj])?;
            self.down_proj
                .forward(&crate::layers::host_ops::silu_mul(&gate, &up)?)?
        };
        match &self.tp {
            Some(r) => r.apply(y),
            None => Ok(y),
        }
    }
}
