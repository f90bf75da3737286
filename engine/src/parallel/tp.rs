//! The all-reduce that completes a row-parallel projection under tensor parallelism.

use std::sync::Arc;

use candle_core::Tensor;

use crate::parallel::comm::Communicator;

/// The all-reduce that completes a row-parallel projection, and the projection's bias,
/// added once after the sum (added on every rank before it, it would count TP times).
#[derive(Clone)]
pub(crate) struct TpReduce {
    pub(crate) comm: Arc<dyn Communicator>,
    pub(crate) bias: Option<Tensor>,
}

impl std::fmt::Debug for TpReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpReduce")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl TpReduce {
    /// y: this rank's partial (T, hidden) -> the full sum, plus the bias.
    pub(crate) fn apply(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let y = self
            .comm
            .all_reduce_sum(&y)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bias
            .as_ref()
            .map_or(0, |b| (b.elem_count() * b.dtype().size_in_bytes()) as u64)
    }
}
