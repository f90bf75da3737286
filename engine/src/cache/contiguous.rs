//! [`KvCache`], the simple per-sequence cache: per layer, one K and one V buffer of
//! `(capacity, kv_heads, head_dim)` allocated up front (the same row layout as a paged
//! block, `(block_size, kv_heads, head_dim)`), sized with the planner's
//! `kv_bytes_per_token`. Invariant: rows `0..len` hold the keys and values of positions
//! `0..len`; the model writes rows `cached_len..cached_len + query_len` in a pass and the
//! cache advances once after all layers wrote. A paged cache replaces it without touching
//! the layers, since the model only calls [`KvCache::write`].

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct KvCache {
    /// Per layer: (capacity, kv_heads, head_dim).
    k: Vec<Tensor>,
    /// Per layer: (capacity, kv_heads, head_dim).
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    bytes: u64,
}

impl KvCache {
    /// Allocate a cache for `capacity` tokens of a model of `shape`, in `dtype`.
    pub fn new(shape: &ModelShape, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (nkv, hd) = (shape.num_key_value_heads as usize, shape.head_dim as usize);
        let layers = shape.num_hidden_layers as usize;
        let _kv = crate::heap::scope(crate::heap::Component::KvCache);
        let alloc = || Tensor::zeros((capacity, nkv, hd), dtype, device);
        let k = (0..layers)
            .map(|_| alloc())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = (0..layers)
            .map(|_| alloc())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bytes = (capacity as u64)
            .checked_mul(shape.kv_bytes_per_token(dtype.size_in_bytes() as u64))
            .ok_or_else(|| {
                Error::InvalidInput(format!("KV cache of {capacity} tokens overflows"))
            })?;
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
            bytes,
        })
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated for K and V: capacity x `ModelShape::kv_bytes_per_token`.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Write the new keys and values of layer `layer` at rows `offset..offset + n` and
    /// return views of rows `0..offset + n` of K and V. k_new, v_new: (n, kv_heads,
    /// head_dim), contiguous.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        offset: usize,
        k_new: &Tensor,
        v_new: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = k_new.dim(0)?;
        let (k, v) = (&self.k[layer], &self.v[layer]);
        k.slice_set(&k_new.to_dtype(k.dtype())?, 0, offset)?;
        v.slice_set(&v_new.to_dtype(v.dtype())?, 0, offset)?;
        Ok((k.narrow(0, 0, offset + n)?, v.narrow(0, 0, offset + n)?))
    }

    /// Forget every token from position `len` on (no-op if `len >= self.len()`); the next
    /// pass writes from there. Lets a benchmark or a retry rewind a sequence.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Record that a pass appended `n` tokens to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
