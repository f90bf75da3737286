//! The paged KV cache tensors and the per-step attention metadata that index them.
//!
//! The runner owns one [`PagedKvCache`]: per layer a K and a V buffer of shape
//! `(num_blocks, block_size, kv_heads, head_dim)`, allocated once, in the KV dtype, and
//! sized by the planner's own `kv_bytes_per_token`, so the bytes the engine reports and
//! the bytes the plan predicts are the same product. The block manager decides which
//! slots a sequence owns; this module only writes and reads them through the kernels.

use half::{bf16, f16};
use llmem_kernels::{
    paged_attention, reshape_and_cache, AttentionParams, CacheElem, CacheShape, KernelError,
};
use llmem_planner::ModelShape;

use crate::error::{Error, Result};
use crate::scheduler::ScheduledBatch;

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(KvDtype::F32),
            "f16" | "fp16" | "float16" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            other => Err(Error::InvalidInput(format!(
                "unknown KV cache dtype {other:?}; accepted: f32, f16, bf16"
            ))),
        }
    }
}

/// Bytes of one block: block_size x the planner's kv_bytes_per_token.
pub fn block_bytes(shape: &ModelShape, block_size: usize, dtype: KvDtype) -> u64 {
    block_size as u64 * shape.kv_bytes_per_token(dtype.bytes())
}

/// Blocks that fit in `budget_bytes` (floor).
pub fn blocks_for_budget(
    shape: &ModelShape,
    block_size: usize,
    dtype: KvDtype,
    budget_bytes: u64,
) -> u64 {
    budget_bytes / block_bytes(shape, block_size, dtype).max(1)
}

enum Buffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Buffer {
    /// A zeroed buffer whose pages are all resident: a zeroed `Vec` comes from `calloc`,
    /// whose pages the OS maps only when first written, so without the touch a
    /// reservation would not show in the process's RSS until sequences fill it, and the
    /// memory ledger could not tell reserved from used. A GPU allocation is resident at
    /// once; this makes the CPU cache behave the same.
    fn zeros(dtype: KvDtype, n: usize) -> Self {
        fn resident<T: Copy>(mut v: Vec<T>, zero: T) -> Vec<T> {
            let step = (4096 / std::mem::size_of::<T>()).max(1);
            for i in (0..v.len()).step_by(step) {
                // black_box: the compiler knows calloc memory is zero and would drop a
                // plain store of zero.
                v[i] = std::hint::black_box(zero);
            }
            v
        }
        match dtype {
            KvDtype::F32 => Buffer::F32(resident(vec![0.0; n], 0.0)),
            KvDtype::F16 => Buffer::F16(resident(vec![f16::ZERO; n], f16::ZERO)),
            KvDtype::Bf16 => Buffer::Bf16(resident(vec![bf16::ZERO; n], bf16::ZERO)),
        }
    }
}

struct Layer {
    k: Buffer,
    v: Buffer,
}

/// Attention metadata of one step, built from a [`ScheduledBatch`]: one query row per
/// fed token, in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagedMetadata {
    /// `[num_tokens]`: the cache slot each fed token's K/V is written to.
    pub slot_mapping: Vec<Option<usize>>,
    /// `[num_seqs, max_blocks_per_seq]`, flattened; unused tail entries are 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// `[num_tokens]`: the block-table row of each token's sequence.
    pub query_seq: Vec<u32>,
    /// `[num_tokens]`: tokens each query attends to (its position + 1: causal).
    pub context_lens: Vec<u32>,
}

impl PagedMetadata {
    pub fn from_batch(batch: &ScheduledBatch) -> Self {
        let max_blocks = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut m = PagedMetadata {
            max_blocks_per_seq: max_blocks,
            ..Default::default()
        };
        for (row, s) in batch.seqs.iter().enumerate() {
            let mut table = s.block_table.clone();
            table.resize(max_blocks, 0);
            m.block_tables.extend(table);
            for (i, slot) in s.slots.iter().enumerate() {
                m.slot_mapping.push(Some(*slot));
                m.query_seq.push(row as u32);
                m.context_lens.push((s.start_pos + i + 1) as u32);
            }
        }
        m
    }
}

/// Check a paged pass's inputs against each other, the model's context and the cache:
/// tokens, positions, slots and context lengths agree in number, every position is
/// inside `max_positions`, every sampled row inside the batch, and `cache` fits
/// `cache_shape` (the model's, or one shard's, which `who` names in the message).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_paged_pass(
    ids: &[u32],
    positions: &[u32],
    meta: &PagedMetadata,
    sample_rows: &[usize],
    max_positions: u64,
    cache: &PagedKvCache,
    cache_shape: &ModelShape,
    who: &str,
) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidInput(format!("paged forward pass: {m}")));
    let n = ids.len();
    if n == 0 {
        return bad("the batch feeds no token".to_string());
    }
    if positions.len() != n || meta.slot_mapping.len() != n || meta.context_lens.len() != n {
        return bad(format!(
            "{n} tokens but {} positions, {} slots and {} context lengths",
            positions.len(),
            meta.slot_mapping.len(),
            meta.context_lens.len()
        ));
    }
    if let Some(&p) = positions.iter().find(|&&p| u64::from(p) >= max_positions) {
        return bad(format!(
            "position {p} is beyond the model's max_position_embeddings = {max_positions}"
        ));
    }
    if let Some(&r) = sample_rows.iter().find(|&&r| r >= n) {
        return bad(format!("sample row {r} is outside the batch of {n} tokens"));
    }
    if let Err(m) = cache.check_fits(cache_shape, who) {
        return bad(m);
    }
    Ok(())
}

/// The cache tensors of every layer.
pub struct PagedKvCache {
    layers: Vec<Layer>,
    shape: CacheShape,
    num_heads: usize,
    dtype: KvDtype,
    bytes: u64,
}

fn kernel_err(e: KernelError) -> Error {
    Error::InvalidInput(format!("paged attention: {e}"))
}

impl PagedKvCache {
    /// Allocate `num_blocks` blocks of `block_size` tokens for every layer of `model`.
    pub fn new(
        model: &ModelShape,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        let shape = CacheShape {
            num_blocks,
            block_size,
            kv_heads: model.num_key_value_heads as usize,
            head_dim: model.head_dim as usize,
        };
        let bytes = (num_blocks as u64)
            .checked_mul(block_bytes(model, block_size, dtype))
            .ok_or_else(|| Error::InvalidInput("KV cache size overflows".to_string()))?;
        let layers = (0..model.num_hidden_layers)
            .map(|_| Layer {
                k: Buffer::zeros(dtype, shape.elems()),
                v: Buffer::zeros(dtype, shape.elems()),
            })
            .collect();
        Ok(PagedKvCache {
            layers,
            shape,
            num_heads: model.num_attention_heads as usize,
            dtype,
            bytes,
        })
    }

    /// Bytes allocated for K and V over all layers.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Layers the cache holds K/V for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether this cache fits `shape` (layers, KV heads, head size); otherwise a message
    /// saying what the cache has and what `who` ("the model", "this shard") needs.
    pub fn check_fits(&self, shape: &ModelShape, who: &str) -> std::result::Result<(), String> {
        let c = self.shape;
        if self.num_layers() != shape.num_hidden_layers as usize
            || c.kv_heads != shape.num_key_value_heads as usize
            || c.head_dim != shape.head_dim as usize
        {
            return Err(format!(
                "the cache has {} layers of {} KV heads x {} dims; {who} needs {} x {} x {}",
                self.num_layers(),
                c.kv_heads,
                c.head_dim,
                shape.num_hidden_layers,
                shape.num_key_value_heads,
                shape.head_dim
            ));
        }
        Ok(())
    }

    /// Write this step's K/V of layer `layer` into its slots, then attend every query
    /// over its sequence's cached context.
    ///
    /// q: `[num_tokens, num_heads, head_dim]`; k, v: `[num_tokens, kv_heads, head_dim]`,
    /// all f32, contiguous. Returns `[num_tokens, num_heads, head_dim]`.
    pub fn write_and_attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        meta: &PagedMetadata,
    ) -> Result<Vec<f32>> {
        let params = AttentionParams {
            num_heads: self.num_heads,
            scale: 1.0 / (self.shape.head_dim as f32).sqrt(),
            cache: self.shape,
            max_blocks_per_seq: meta.max_blocks_per_seq,
        };
        let shape = self.shape;
        let Some(l) = self.layers.get_mut(layer) else {
            return Err(Error::InvalidInput(format!("no cache for layer {layer}")));
        };
        let mut out = vec![0f32; q.len()];
        fn run<T: CacheElem>(
            kc: &mut [T],
            vc: &mut [T],
            (q, k, v, out): (&[f32], &[f32], &[f32], &mut [f32]),
            meta: &PagedMetadata,
            shape: CacheShape,
            params: &AttentionParams,
        ) -> std::result::Result<(), KernelError> {
            reshape_and_cache(k, v, kc, vc, &meta.slot_mapping, shape)?;
            paged_attention(
                out,
                q,
                kc,
                vc,
                &meta.block_tables,
                &meta.query_seq,
                &meta.context_lens,
                params,
            )
        }
        let io = (q, k, v, out.as_mut_slice());
        match (&mut l.k, &mut l.v) {
            (Buffer::F32(kc), Buffer::F32(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::F16(kc), Buffer::F16(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::Bf16(kc), Buffer::Bf16(vc)) => run(kc, vc, io, meta, shape, &params),
            _ => unreachable!("K and V buffers share a dtype"),
        }
        .map_err(kernel_err)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_sizing_uses_the_planners_bytes_per_token() {
        let shape = llmem_planner::preset("smollm2-135m").unwrap();
        // 2 x 30 x 3 x 64 x 4 = 46,080 B per token in f32; 16 tokens per block.
        assert_eq!(block_bytes(&shape, 16, KvDtype::F32), 737_280);
        assert_eq!(blocks_for_budget(&shape, 16, KvDtype::F32, 1 << 30), 1456);
        let cache = PagedKvCache::new(&shape, 10, 16, KvDtype::Bf16).unwrap();
        assert_eq!(cache.bytes(), 10 * 16 * shape.kv_bytes_per_token(2));
    }
}
