//! How a model is split over ranks: the TP degree, the PP stages and the embedding
//! layout ([`ParallelSpec`]), where one rank sits in that grid ([`ShardSpec`]), and how
//! a tensor-parallel rank's share of a dimension is cut ([`TpShard`]). Pure integers and
//! the planner's own split functions, so the engine and the plan put the same rows and
//! layers on each rank.

use std::sync::Arc;

use llmem_planner::ModelShape;

use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;

/// How a model is split: TP degree, PP stages and the embedding layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelSpec {
    pub tp: usize,
    pub pp: usize,
    /// Split the embedding and LM head by vocabulary rows instead of replicating them.
    pub vocab_parallel: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            pp: 1,
            vocab_parallel: false,
        }
    }
}

impl ParallelSpec {
    /// Refuse a TP degree that does not split the heads (naming the degrees that do) and
    /// more stages than layers.
    pub fn validate(&self, shape: &ModelShape) -> Result<()> {
        let valid = llmem_planner::plan::valid_tp_degrees(shape);
        if self.tp == 0 || !valid.contains(&(self.tp as u64)) {
            let list: Vec<String> = valid.iter().map(u64::to_string).collect();
            return Err(Error::InvalidInput(format!(
                "--tp {} does not split {}: it has {} attention heads and {} KV heads; \
                 valid TP degrees: {}",
                self.tp,
                shape.name,
                shape.num_attention_heads,
                shape.num_key_value_heads,
                list.join(", ")
            )));
        }
        if self.pp == 0 || self.pp as u64 > shape.num_hidden_layers {
            return Err(Error::InvalidInput(format!(
                "--pp {} must be between 1 and the {} layers of {}",
                self.pp, shape.num_hidden_layers, shape.name
            )));
        }
        Ok(())
    }

    /// Layers per stage: the planner's split, so both put the same layers on a GPU.
    pub fn stage_layers(&self, shape: &ModelShape) -> Vec<usize> {
        llmem_planner::plan::stage_layers(shape.num_hidden_layers, self.pp as u64)
            .into_iter()
            .map(|l| l as usize)
            .collect()
    }

    /// "stage 0: layers 0-14 (+ embedding), stage 1: layers 15-29 (+ LM head)".
    pub fn describe_split(&self, shape: &ModelShape) -> String {
        let split = self.stage_layers(shape);
        let last = split.len() - 1;
        let mut first = 0;
        let mut parts = Vec::new();
        for (s, &n) in split.iter().enumerate() {
            let mut extra = Vec::new();
            if s == 0 {
                extra.push("embedding");
            }
            if s == last {
                extra.push("LM head");
            }
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(" (+ {})", extra.join(", "))
            };
            parts.push(format!(
                "stage {s}: layers {first}-{}{extra}",
                first + n - 1
            ));
            first += n;
        }
        parts.join("; ")
    }
}

/// Where one rank sits in the TP x PP grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub tp_rank: usize,
    pub pp_stage: usize,
    pub parallel: ParallelSpec,
}

impl ShardSpec {
    /// The whole model on one rank (TP = PP = 1).
    pub fn single() -> Self {
        ShardSpec {
            tp_rank: 0,
            pp_stage: 0,
            parallel: ParallelSpec::default(),
        }
    }

    /// True for the whole model on one rank.
    pub fn is_single(&self) -> bool {
        self.parallel.tp == 1 && self.parallel.pp == 1
    }
}

/// Where one tensor-parallel rank sits and how its shard is cut.
#[derive(Clone)]
pub struct TpShard {
    pub rank: usize,
    pub tp: usize,
    pub comm: Arc<dyn Communicator>,
}

impl std::fmt::Debug for TpShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpShard")
            .field("rank", &self.rank)
            .field("tp", &self.tp)
            .finish()
    }
}

impl TpShard {
    /// Rank `rank`'s slice `(start, len)` of `n` rows split over `tp`: the first `n % tp`
    /// ranks get one more (the planner's split, so both count the same bytes).
    pub fn share(n: usize, tp: usize, rank: usize) -> (usize, usize) {
        let (base, extra) = (n / tp, n % tp);
        (
            rank * base + rank.min(extra),
            base + usize::from(rank < extra),
        )
    }
}
