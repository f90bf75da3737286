//! The paged KV cache tensors and the per-step attention metadata that index them.
//!
//! The runner owns one [`PagedKvCache`]: per layer a K and a V buffer of shape
//! `(num_blocks, block_size, kv_heads, head_dim)`, allocated once, in the KV dtype, and
//! sized by the planner's own `kv_bytes_per_token`, so the bytes the engine reports and
//! the bytes the plan predicts are the same product. The block manager decides which
//! slots a sequence owns; this module only writes and reads them through the kernels.
//!
//! On a CUDA device (feature `cuda`) the buffers are device allocations of the same
//! layout and the kernels are `llmem_kernels::cuda`'s twins; q, k, v then stay on the
//! device ([`PagedKvCache::write_and_attend_tensors`]). The CPU path is unchanged.

use half::{bf16, f16};
use llmem_kernels::{
    paged_attention, reshape_and_cache, AttentionParams, BlockQ4, BlockQ8, CacheShape, CacheStore,
    KernelError,
};
use llmem_planner::ModelShape;

use crate::error::{Error, Result};

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
    /// ggml's q8_0 blocks ([`BlockQ8`]: 32 int8 values and an f16 scale per block of
    /// one head's row), read directly by the attention kernel; CPU only, and `head_dim`
    /// a multiple of 32.
    Q8_0,
    /// ggml's q4_0 blocks ([`BlockQ4`]: 32 4-bit values and an f16 scale), under the same
    /// terms as q8_0.
    Q4_0,
}

impl KvDtype {
    /// The planner's name for the same element type.
    pub fn planner(self) -> llmem_planner::KvDtype {
        match self {
            KvDtype::F32 => llmem_planner::KvDtype::Fp32,
            KvDtype::F16 => llmem_planner::KvDtype::Fp16,
            KvDtype::Bf16 => llmem_planner::KvDtype::Bf16,
            KvDtype::Q8_0 => llmem_planner::KvDtype::Q8_0,
            KvDtype::Q4_0 => llmem_planner::KvDtype::Q4_0,
        }
    }

    /// Every level, in the order `llmem sweep` reports them.
    pub const ALL: [KvDtype; 5] = [
        KvDtype::F32,
        KvDtype::F16,
        KvDtype::Bf16,
        KvDtype::Q8_0,
        KvDtype::Q4_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
        }
    }

    /// Values per block of a block format (q8_0, q4_0); `None` for the element types.
    pub fn block_values(self) -> Option<usize> {
        match self {
            KvDtype::Q8_0 => Some(BlockQ8::ELEMS),
            KvDtype::Q4_0 => Some(BlockQ4::ELEMS),
            _ => None,
        }
    }

    /// The candle dtype of the same element type; `None` for q8_0 and q4_0, which
    /// candle's tensors do not hold (their caches are [`PagedKvCache`] buffers).
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            KvDtype::F32 => Some(candle_core::DType::F32),
            KvDtype::F16 => Some(candle_core::DType::F16),
            KvDtype::Bf16 => Some(candle_core::DType::BF16),
            KvDtype::Q8_0 | KvDtype::Q4_0 => None,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(KvDtype::F32),
            "f16" | "fp16" | "float16" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "q8_0" | "q8" => Ok(KvDtype::Q8_0),
            "q4_0" | "q4" => Ok(KvDtype::Q4_0),
            other => Err(Error::InvalidInput(format!(
                "unknown KV cache dtype {other:?}; accepted: f32, f16, bf16, q8_0, q4_0"
            ))),
        }
    }
}

/// Bytes of one block: block_size x the planner's kv_bytes_per_token (q8_0's and
/// q4_0's scales included).
pub fn block_bytes(shape: &ModelShape, block_size: usize, dtype: KvDtype) -> u64 {
    block_size as u64 * shape.kv_bytes_per_token_in(dtype.planner())
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
    /// q8_0 blocks: `elems / 32` of them.
    Q8(Vec<BlockQ8>),
    /// q4_0 blocks: `elems / 32` of them.
    Q4(Vec<BlockQ4>),
    /// Device memory on a CUDA GPU, zeroed at allocation.
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceBuffer),
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
            KvDtype::Q8_0 => Buffer::Q8(resident(
                vec![BlockQ8::default(); n / BlockQ8::ELEMS],
                BlockQ8::default(),
            )),
            KvDtype::Q4_0 => Buffer::Q4(resident(
                vec![BlockQ4::default(); n / BlockQ4::ELEMS],
                BlockQ4::default(),
            )),
        }
    }
}

struct Layer {
    k: Buffer,
    v: Buffer,
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The cache on a CUDA device: per layer a K and a V device buffer, written and read
    //! by `llmem_kernels::cuda`.
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Storage, Tensor};
    use half::{bf16, f16};
    use llmem_kernels::cuda::{paged_attention_cuda, reshape_and_cache_cuda, CudaCacheElem};
    use llmem_kernels::{AttentionParams, CacheShape, KernelError};

    use super::{KvDtype, PagedMetadata};
    use crate::error::{Error, Result};

    pub(super) enum DeviceBuffer {
        F32(CudaSlice<f32>),
        F16(CudaSlice<f16>),
        Bf16(CudaSlice<bf16>),
    }

    impl DeviceBuffer {
        pub(super) fn zeros(dev: &CudaDevice, dtype: KvDtype, n: usize) -> Result<Self> {
            Ok(match dtype {
                KvDtype::F32 => DeviceBuffer::F32(dev.alloc_zeros(n)?),
                KvDtype::F16 => DeviceBuffer::F16(dev.alloc_zeros(n)?),
                KvDtype::Bf16 => DeviceBuffer::Bf16(dev.alloc_zeros(n)?),
                KvDtype::Q8_0 | KvDtype::Q4_0 => {
                    return Err(Error::InvalidInput(format!(
                        "--kv-dtype {} runs on the CPU only; on a GPU use f16 or bf16",
                        dtype.name()
                    )))
                }
            })
        }
    }

    fn kernel_err(e: KernelError) -> Error {
        Error::InvalidInput(format!("paged attention (CUDA): {e}"))
    }

    /// A contiguous f32 copy of `t` on the device, with its element range.
    fn f32_on_device(t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.contiguous()?)
    }

    fn view<'a>(
        storage: &'a Storage,
        layout: &candle_core::Layout,
        what: &str,
    ) -> Result<CudaView<'a, f32>> {
        let Storage::Cuda(c) = storage else {
            return Err(Error::InvalidInput(format!(
                "paged attention (CUDA): {what} is not on the GPU"
            )));
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            Error::InvalidInput(format!("paged attention (CUDA): {what} is not contiguous"))
        })?;
        Ok(c.as_cuda_slice::<f32>()?.slice(start..end))
    }

    /// Write k, v into the cache of one layer, then attend q over it; see
    /// [`super::PagedKvCache::write_and_attend_tensors`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_and_attend(
        dev: &CudaDevice,
        kc: &mut DeviceBuffer,
        vc: &mut DeviceBuffer,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        meta: &PagedMetadata,
        shape: CacheShape,
        params: &AttentionParams,
    ) -> Result<Tensor> {
        let (q, k, v) = (f32_on_device(q)?, f32_on_device(k)?, f32_on_device(v)?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qv, kv, vv) = (
            view(&qs, ql, "q")?,
            view(&ks, kl, "k")?,
            view(&vs, vl, "v")?,
        );
        let mut out = dev.alloc_zeros::<f32>(qv.len())?;
        fn run<T: CudaCacheElem>(
            dev: &CudaDevice,
            kc: &mut CudaSlice<T>,
            vc: &mut CudaSlice<T>,
            (q, k, v, out): (
                &CudaView<'_, f32>,
                &CudaView<'_, f32>,
                &CudaView<'_, f32>,
                &mut CudaSlice<f32>,
            ),
            meta: &PagedMetadata,
            shape: CacheShape,
            params: &AttentionParams,
        ) -> std::result::Result<(), KernelError> {
            reshape_and_cache_cuda(dev, k, v, kc, vc, &meta.slot_mapping, shape)?;
            paged_attention_cuda(
                dev,
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
        let io = (&qv, &kv, &vv, &mut out);
        match (kc, vc) {
            (DeviceBuffer::F32(kc), DeviceBuffer::F32(vc)) => {
                run(dev, kc, vc, io, meta, shape, params)
            }
            (DeviceBuffer::F16(kc), DeviceBuffer::F16(vc)) => {
                run(dev, kc, vc, io, meta, shape, params)
            }
            (DeviceBuffer::Bf16(kc), DeviceBuffer::Bf16(vc)) => {
                run(dev, kc, vc, io, meta, shape, params)
            }
            _ => return Err(Error::InvalidInput("K and V caches differ in dtype".into())),
        }
        .map_err(kernel_err)?;
        let dims = q.dims().to_vec();
        drop((qs, ks, vs));
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        Ok(Tensor::from_storage(
            storage,
            dims,
            BackpropOp::none(),
            false,
        ))
    }
}

/// Attention metadata of one step, built by the engine from the scheduler's batch
/// (`crate::engine::paged_metadata`): one query row per fed token, in batch order.
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
    device: candle_core::Device,
}

fn kernel_err(e: KernelError) -> Error {
    Error::InvalidInput(format!("paged attention: {e}"))
}

impl PagedKvCache {
    /// Allocate `num_blocks` blocks of `block_size` tokens for every layer of `model`, in
    /// host memory.
    pub fn new(
        model: &ModelShape,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        Self::new_on(
            model,
            num_blocks,
            block_size,
            dtype,
            &candle_core::Device::Cpu,
        )
    }

    /// [`PagedKvCache::new`] on `device`: host memory for the CPU, device memory on a
    /// CUDA GPU (a build with the `cuda` feature).
    pub fn new_on(
        model: &ModelShape,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let shape = CacheShape {
            num_blocks,
            block_size,
            kv_heads: model.num_key_value_heads as usize,
            head_dim: model.head_dim as usize,
        };
        if let Some(n) = dtype.block_values() {
            if shape.head_dim % n != 0 {
                return Err(Error::InvalidInput(format!(
                    "--kv-dtype {} stores blocks of {n} values of one head; this model's \
                     head_dim {} is not a multiple of {n} (use f16 or bf16)",
                    dtype.name(),
                    shape.head_dim
                )));
            }
        }
        let bytes = (num_blocks as u64)
            .checked_mul(block_bytes(model, block_size, dtype))
            .ok_or_else(|| Error::InvalidInput("KV cache size overflows".to_string()))?;
        let alloc = || -> Result<Buffer> {
            // Only the buffers count as the KV cache (`crate::heap`): its heap bytes are
            // then exactly `bytes`.
            let _kv = crate::heap::scope(crate::heap::Component::KvCache);
            match device {
                candle_core::Device::Cpu => Ok(Buffer::zeros(dtype, shape.elems())),
                #[cfg(feature = "cuda")]
                candle_core::Device::Cuda(dev) => Ok(Buffer::Cuda(cuda::DeviceBuffer::zeros(
                    dev,
                    dtype,
                    shape.elems(),
                )?)),
                #[allow(unreachable_patterns)]
                other => Err(Error::InvalidInput(format!(
                    "the paged KV cache cannot live on {other:?}"
                ))),
            }
        };
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                Ok(Layer {
                    k: alloc()?,
                    v: alloc()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PagedKvCache {
            layers,
            shape,
            num_heads: model.num_attention_heads as usize,
            dtype,
            bytes,
            device: device.clone(),
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

    /// Where the buffers live.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
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

    fn params(&self, meta: &PagedMetadata) -> AttentionParams {
        AttentionParams {
            num_heads: self.num_heads,
            scale: 1.0 / (self.shape.head_dim as f32).sqrt(),
            cache: self.shape,
            max_blocks_per_seq: meta.max_blocks_per_seq,
        }
    }

    /// [`PagedKvCache::write_and_attend`] on tensors: q `(T, num_heads, head_dim)`, k, v
    /// `(T, kv_heads, head_dim)`, any float dtype, on the cache's device. Returns
    /// `(T, num_heads * head_dim)` f32 on that device. On the CPU this copies through
    /// host vectors; on CUDA nothing leaves the GPU but the small metadata.
    pub fn write_and_attend_tensors(
        &mut self,
        layer: usize,
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        meta: &PagedMetadata,
    ) -> Result<candle_core::Tensor> {
        use candle_core::{DType, Tensor};
        let t = q.dim(0)?;
        let row = self.num_heads * self.shape.head_dim;
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = &self.device {
            let params = self.params(meta);
            let shape = self.shape;
            let Some(l) = self.layers.get_mut(layer) else {
                return Err(Error::InvalidInput(format!("no cache for layer {layer}")));
            };
            let (Buffer::Cuda(kc), Buffer::Cuda(vc)) = (&mut l.k, &mut l.v) else {
                return Err(Error::InvalidInput(
                    "the cache is on a GPU but its buffers are not".into(),
                ));
            };
            let out = cuda::write_and_attend(dev, kc, vc, (q, k, v), meta, shape, &params)?;
            return Ok(out.reshape((t, row))?);
        }
        let flat = |a: &Tensor| -> candle_core::Result<Vec<f32>> {
            a.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
        };
        let out = self.write_and_attend(layer, &flat(q)?, &flat(k)?, &flat(v)?, meta)?;
        Ok(Tensor::from_vec(out, (t, row), q.device())?)
    }

    /// Write this step's K/V of layer `layer` into its slots, then attend every query
    /// over its sequence's cached context (host buffers).
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
        let mut out = vec![0f32; q.len()];
        self.write_and_attend_into(layer, q, k, v, meta, &mut out)?;
        Ok(out)
    }

    /// [`PagedKvCache::write_and_attend`] into `out` (of q's length).
    pub fn write_and_attend_into(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        meta: &PagedMetadata,
        out: &mut [f32],
    ) -> Result<()> {
        let params = self.params(meta);
        let shape = self.shape;
        let Some(l) = self.layers.get_mut(layer) else {
            return Err(Error::InvalidInput(format!("no cache for layer {layer}")));
        };
        fn run<T: CacheStore>(
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
        let io = (q, k, v, out);
        match (&mut l.k, &mut l.v) {
            (Buffer::F32(kc), Buffer::F32(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::F16(kc), Buffer::F16(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::Bf16(kc), Buffer::Bf16(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::Q8(kc), Buffer::Q8(vc)) => run(kc, vc, io, meta, shape, &params),
            (Buffer::Q4(kc), Buffer::Q4(vc)) => run(kc, vc, io, meta, shape, &params),
            _ => {
                return Err(Error::InvalidInput(
                    "write_and_attend takes host slices; this cache is on a GPU".into(),
                ))
            }
        }
        .map_err(kernel_err)
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
        // q8_0: 64 values of a head are two 34-byte blocks: 2 x 30 x 3 x 68 per token.
        assert_eq!(block_bytes(&shape, 16, KvDtype::Q8_0), 16 * 12_240);
        let q8 = PagedKvCache::new(&shape, 10, 16, KvDtype::Q8_0).unwrap();
        assert_eq!(q8.bytes(), 10 * 16 * 12_240);
        let Buffer::Q8(blocks) = &q8.layers[0].k else {
            panic!("a q8_0 cache holds q8_0 blocks")
        };
        // What the cache holds is what it reports: 30 layers x K and V.
        assert_eq!(
            60 * std::mem::size_of_val(blocks.as_slice()) as u64,
            q8.bytes()
        );
        // q4_0: two 18-byte blocks per head row.
        assert_eq!(block_bytes(&shape, 16, KvDtype::Q4_0), 16 * 2 * 30 * 3 * 36);
        let q4 = PagedKvCache::new(&shape, 10, 16, KvDtype::Q4_0).unwrap();
        let Buffer::Q4(blocks) = &q4.layers[0].k else {
            panic!("a q4_0 cache holds q4_0 blocks")
        };
        assert_eq!(
            60 * std::mem::size_of_val(blocks.as_slice()) as u64,
            q4.bytes()
        );
    }

    #[test]
    fn q8_0_needs_a_head_dim_of_whole_blocks() {
        let mut shape = llmem_planner::preset("smollm2-135m").unwrap();
        shape.head_dim = 48;
        let e = PagedKvCache::new(&shape, 2, 16, KvDtype::Q8_0)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("head_dim 48"), "{e}");
    }
}
