//! [`KvCache`], the simple per-sequence cache: per layer, one K and one V buffer of
//! `(capacity, kv_heads, head_dim)` allocated up front (the same row layout as a paged
//! block, `(block_size, kv_heads, head_dim)`), sized with the planner's
//! `kv_bytes_per_token`. Invariant: rows `0..len` hold the keys and values of positions
//! `0..len`; the model writes rows `cached_len..cached_len + query_len` in a pass and the
//! cache advances once after all layers wrote. A paged cache replaces it without touching
//! the layers, since the model only calls [`KvCache::write`].
//!
//! A q8_0 or q4_0 cache ([`KvCache::new_in`] with `KvDtype::Q8_0` or `Q4_0`) is a
//! [`PagedKvCache`] whose blocks are the sequence's rows in order (block `b` holds
//! positions `16b..16b + 16`): candle's tensors cannot hold quantized blocks, and the
//! paged attention kernel reads them directly, so the layers attend through it
//! ([`KvCache::attend_blocks`]) instead of [`KvCache::write`].

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::cache::paged::{KvDtype, PagedKvCache, PagedMetadata};
use crate::error::{Error, Result};

/// Tokens per block of a quantized contiguous cache.
const ROWS_PER_BLOCK: usize = 16;

pub struct KvCache {
    /// Per layer: (capacity, kv_heads, head_dim); empty for a quantized cache.
    k: Vec<Tensor>,
    /// Per layer: (capacity, kv_heads, head_dim); empty for a quantized cache.
    v: Vec<Tensor>,
    /// The quantized form's blocks (q8_0 or q4_0).
    blocks: Option<PagedKvCache>,
    len: usize,
    capacity: usize,
    bytes: u64,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("kv_dtype", &self.blocks.as_ref().map(|c| c.dtype().name()))
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes)
            .finish()
    }
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
            blocks: None,
            len: 0,
            capacity,
            bytes,
        })
    }

    /// [`KvCache::new`] for a KV cache level: f32, f16 and bf16 as tensors of that
    /// dtype; q8_0 and q4_0 as blocks on the CPU (their bytes round `capacity` up to
    /// whole blocks of 16 tokens).
    pub fn new_in(
        shape: &ModelShape,
        capacity: usize,
        kv: KvDtype,
        device: &Device,
    ) -> Result<Self> {
        if let Some(dtype) = kv.dtype() {
            return Self::new(shape, capacity, dtype, device);
        }
        if !device.is_cpu() {
            return Err(Error::InvalidInput(format!(
                "--kv-dtype {} runs on the CPU only; on a GPU use f16 or bf16",
                kv.name()
            )));
        }
        let blocks = capacity.div_ceil(ROWS_PER_BLOCK).max(1);
        let cache = PagedKvCache::new(shape, blocks, ROWS_PER_BLOCK, kv)?;
        Ok(KvCache {
            k: Vec::new(),
            v: Vec::new(),
            bytes: cache.bytes(),
            blocks: Some(cache),
            len: 0,
            capacity,
        })
    }

    /// Whether the layers must attend through [`KvCache::attend_blocks`].
    pub(crate) fn is_blocks(&self) -> bool {
        self.blocks.is_some()
    }

    /// Whether the layers attend over this cache with score matrices and a causal mask (a
    /// float cache off the CPU); the block caches and every cache on the CPU run the
    /// fused paged kernel instead. The forward pass, its masks and the activation
    /// estimate all ask this.
    pub(crate) fn makes_scores(&self) -> bool {
        self.k.first().is_some_and(|k| !k.device().is_cpu())
    }

    /// The quantized form of [`KvCache::write`] plus attention: write k, v (`(n, kv_heads,
    /// head_dim)`) of layer `layer` at positions `offset..offset + n`, then attend q
    /// (`(n, heads, head_dim)`, causal) over positions `0..offset + n` with the paged
    /// kernel. Returns `(n, heads * head_dim)` f32.
    pub(crate) fn attend_blocks(
        &mut self,
        layer: usize,
        offset: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let n = q.dim(0)?;
        let capacity = self.capacity;
        let Some(cache) = self.blocks.as_mut() else {
            return Err(Error::InvalidInput("not a block-quantized cache".into()));
        };
        if offset + n > capacity {
            return Err(Error::InvalidInput(format!(
                "KV cache of {capacity} tokens cannot hold positions {offset}..{}",
                offset + n
            )));
        }
        let blocks = cache.shape().num_blocks;
        let meta = PagedMetadata {
            slot_mapping: (offset..offset + n).map(Some).collect(),
            block_tables: (0..blocks as u32).collect(),
            max_blocks_per_seq: blocks,
            query_seq: vec![0; n],
            context_lens: (offset + 1..=offset + n).map(|c| c as u32).collect(),
        };
        cache.write_and_attend_tensors(layer, q, k, v, &meta)
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
        let (Some(k), Some(v)) = (self.k.get(layer), self.v.get(layer)) else {
            candle_core::bail!(
                "no tensor cache for layer {layer} (a quantized cache attends by blocks)"
            )
        };
        k.slice_set(&k_new.to_dtype(k.dtype())?, 0, offset)?;
        v.slice_set(&v_new.to_dtype(v.dtype())?, 0, offset)?;
        Ok((k.narrow(0, 0, offset + n)?, v.narrow(0, 0, offset + n)?))
    }

    /// Layer `layer`'s whole K and V tensors, `(capacity, kv_heads, head_dim)`, when this
    /// is a float cache in host memory (`None` for a block cache or one on a GPU).
    pub(crate) fn host_layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) if k.device().is_cpu() => Some((k, v)),
            _ => None,
        }
    }

    /// [`KvCache::write`] from host slices, in place and without tensors: the f32 keys
    /// and values `k_new`, `v_new` (n, kv_heads, head_dim) of layer `layer`, rounded to
    /// the cache's dtype as `to_dtype` rounds them, go to rows `offset..offset + n`.
    pub(crate) fn write_host(
        &mut self,
        layer: usize,
        offset: usize,
        k_new: &[f32],
        v_new: &[f32],
    ) -> candle_core::Result<()> {
        let Some((k, v)) = self.host_layer(layer) else {
            candle_core::bail!("no host tensor cache for layer {layer}")
        };
        let row: usize = k.dims().iter().skip(1).product();
        if k_new.len() != v_new.len() || row == 0 || k_new.len() % row != 0 {
            candle_core::bail!(
                "KV write: {} keys and {} values for rows of {row}",
                k_new.len(),
                v_new.len()
            )
        }
        let end = offset + k_new.len() / row;
        if end > self.capacity {
            candle_core::bail!(
                "KV cache of {} tokens cannot hold positions {offset}..{end}",
                self.capacity
            )
        }
        k.inplace_op1(&WriteRows {
            at: offset * row,
            src: k_new,
        })?;
        v.inplace_op1(&WriteRows {
            at: offset * row,
            src: v_new,
        })
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

/// Writes f32 values into a host tensor from element `at` of its (contiguous) layout,
/// rounded to the tensor's dtype: [`KvCache::write_host`].
struct WriteRows<'a> {
    at: usize,
    src: &'a [f32],
}

impl candle_core::InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("KV write: the cache tensor is not contiguous")
        };
        let range = start + self.at..start + self.at + self.src.len();
        if range.end > end {
            candle_core::bail!("KV write: elements {range:?} lie past the tensor's {end}")
        }
        match storage {
            CpuStorage::F32(d) => d[range].copy_from_slice(self.src),
            CpuStorage::F16(d) => d[range]
                .iter_mut()
                .zip(self.src)
                .for_each(|(o, &x)| *o = half::f16::from_f32(x)),
            CpuStorage::BF16(d) => d[range]
                .iter_mut()
                .zip(self.src)
                .for_each(|(o, &x)| *o = half::bf16::from_f32(x)),
            other => candle_core::bail!(
                "KV write: unsupported cache dtype {:?}",
                candle_core::backend::BackendStorage::dtype(&*other)
            ),
        }
        Ok(())
    }
}
