//! `self_attn`: q/k/v/o projections, rotary embeddings and grouped-query attention over
//! either cache layout (one contiguous cache per sequence, or the paged block pool), with
//! the attention metadata of one pass ([`AttnMetadata`]) passed explicitly.

use candle_core::{DType, Device, Tensor};
use llmem_planner::ModelShape;

use crate::cache::contiguous::KvCache;
use crate::cache::paged::{PagedKvCache, PagedMetadata};
use crate::error::Result;
use crate::layers::linear::Linear;
use crate::parallel::spec::TpShard;
use crate::parallel::tp::TpReduce;
use crate::weights::files::WeightFiles;
use crate::weights::gguf::tensors::Part;
use crate::weights::quant::WeightFormat;

/// Attention bookkeeping for one forward pass, passed explicitly (no global context).
///
/// The pass's tokens are the concatenation, in order, of `query_lens[s]` new tokens of
/// each sequence `s`; sequence `s` already holds `cached_lens[s]` tokens in its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnMetadata {
    /// New tokens per sequence in this pass (prefill: the prompt; decode: 1).
    pub query_lens: Vec<usize>,
    /// Tokens already cached per sequence, before this pass.
    pub cached_lens: Vec<usize>,
}

impl AttnMetadata {
    /// A single sequence feeding `query_len` tokens after `cached_len` cached ones.
    pub fn single(cached_len: usize, query_len: usize) -> Self {
        AttnMetadata {
            query_lens: vec![query_len],
            cached_lens: vec![cached_len],
        }
    }

    /// Number of sequences in the pass.
    pub fn num_seqs(&self) -> usize {
        self.query_lens.len()
    }

    /// Total tokens in the pass (rows of the flattened batch).
    pub fn num_tokens(&self) -> usize {
        self.query_lens.iter().sum()
    }

    /// Context length of sequence `s` after this pass.
    pub fn context_len(&self, s: usize) -> usize {
        self.cached_lens[s] + self.query_lens[s]
    }

    /// The absolute position of every token of the pass: `cached_lens[s] + i`.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for (&cached, &q) in self.cached_lens.iter().zip(&self.query_lens) {
            out.extend((cached..cached + q).map(|p| p as u32));
        }
        out
    }

    /// Row index of each sequence's last token in the flattened batch.
    pub fn last_token_rows(&self) -> Vec<u32> {
        let mut rows = Vec::with_capacity(self.num_seqs());
        let mut end = 0usize;
        for &q in &self.query_lens {
            end += q;
            rows.push((end - 1) as u32);
        }
        rows
    }
}

/// `self_attn`: q/k/v/o projections and grouped-query attention over the cache.
///
/// Under tensor parallelism (`tp` set) this is one rank's shard, as in Megatron: q/k/v
/// hold this rank's heads (column-parallel), `o_proj` the matching input columns
/// (row-parallel), so its output is a partial sum that one all-reduce completes; the
/// `num_heads` / `num_kv_heads` fields are then the rank's own counts.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) tp: Option<TpReduce>,
}

/// Per-pass tensors every layer shares: rotary rows and causal masks.
pub(crate) struct PassInputs<'a> {
    /// (num_tokens, head_dim / 2): rope rows gathered at `positions`.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Per sequence: `(query_len, context_len)` additive f32 mask, `None` for one token.
    pub(crate) masks: Vec<Option<Tensor>>,
    pub(crate) meta: &'a AttnMetadata,
}

impl Attention {
    pub(crate) fn load(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let (h, q, kv) = (
            shape.hidden_size as usize,
            shape.q_dim() as usize,
            shape.kv_dim() as usize,
        );
        let lin = |name: &str, out_dim: usize, in_dim: usize, bias: bool| {
            Linear::load(
                w,
                &format!("{prefix}.{name}"),
                out_dim,
                in_dim,
                bias,
                fmt,
                device,
            )
        };
        Ok(Attention {
            q_proj: lin("q_proj", q, h, shape.qkv_bias)?,
            k_proj: lin("k_proj", kv, h, shape.qkv_bias)?,
            v_proj: lin("v_proj", kv, h, shape.qkv_bias)?,
            o_proj: lin("o_proj", h, q, shape.o_bias)?,
            num_heads: shape.num_attention_heads as usize,
            num_kv_heads: shape.num_key_value_heads as usize,
            head_dim: shape.head_dim as usize,
            tp: None,
        })
    }

    /// One TP rank's shard: its `heads / tp` query heads, the KV heads they read (split
    /// when TP divides the KV heads, the one shared head replicated when TP exceeds
    /// them), and the matching columns of `o_proj`. A GGUF run as stored gives each
    /// rank its slices as the file stores them, read from the map alone (a column split
    /// must fall on the type's blocks). Otherwise each slice is read alone in the compute
    /// dtype (f32 for a block format) and then stored as `fmt` says: a block format
    /// quantizes each slice, so a slice on block boundaries holds the same blocks the
    /// unsharded model does.
    pub(crate) fn load_shard(
        w: &WeightFiles,
        prefix: &str,
        shape: &ModelShape,
        fmt: &WeightFormat,
        device: &Device,
        shard: &TpShard,
    ) -> Result<Self> {
        let (nh, nkv, hd) = (
            shape.num_attention_heads as usize,
            shape.num_key_value_heads as usize,
            shape.head_dim as usize,
        );
        let heads_r = nh / shard.tp;
        let kv_r = (nkv / shard.tp).max(1);
        let group = nh / nkv;
        let q0 = shard.rank * heads_r;
        let kv0 = q0 / group;
        let reduce = |bias| {
            Some(TpReduce {
                comm: shard.comm.clone(),
                bias,
            })
        };
        // A GGUF run as stored: each matrix's slice read from the map in its own type
        // (a llama GGUF has no attention biases).
        if let (true, Some(g)) = (fmt.as_stored, w.gguf()) {
            let h = shape.hidden_size as usize;
            let rows = |name: &str, total: usize, start: usize, len: usize| {
                let part = Part::Rows {
                    start: start * hd,
                    len: len * hd,
                };
                g.load_stored_part(
                    &format!("{prefix}.{name}.weight"),
                    total * hd,
                    h,
                    part,
                    device,
                )
                .map(|m| Linear::new(m, None))
            };
            let cols = Part::Cols {
                start: q0 * hd,
                len: heads_r * hd,
            };
            let o =
                g.load_stored_part(&format!("{prefix}.o_proj.weight"), h, nh * hd, cols, device)?;
            return Ok(Attention {
                q_proj: rows("q_proj", nh, q0, heads_r)?,
                k_proj: rows("k_proj", nkv, kv0, kv_r)?,
                v_proj: rows("v_proj", nkv, kv0, kv_r)?,
                o_proj: Linear::new(o, None),
                num_heads: heads_r,
                num_kv_heads: kv_r,
                head_dim: hd,
                tp: reduce(None),
            });
        }
        // Otherwise each slice is read alone in the compute dtype, then stored as `fmt`
        // says.
        let dense = WeightFormat::dense(fmt.activation_dtype())?;
        let h = shape.hidden_size as usize;
        let load = |name: &str, dims: (usize, usize), part: Part, bias: bool| {
            let prefix = format!("{prefix}.{name}");
            Linear::load_part(w, &prefix, dims, part, bias, &dense, fmt.precision, device)
        };
        let heads = |name: &str, total: usize, start: usize, len: usize| {
            let part = Part::Rows {
                start: start * hd,
                len: len * hd,
            };
            Ok::<_, crate::error::Error>(load(name, (total * hd, h), part, shape.qkv_bias)?.0)
        };
        let cols = Part::Cols {
            start: q0 * hd,
            len: heads_r * hd,
        };
        let (o_proj, o_bias) = load("o_proj", (h, nh * hd), cols, shape.o_bias)?;
        Ok(Attention {
            q_proj: heads("q_proj", nh, q0, heads_r)?,
            k_proj: heads("k_proj", nkv, kv0, kv_r)?,
            v_proj: heads("v_proj", nkv, kv0, kv_r)?,
            o_proj,
            num_heads: heads_r,
            num_kv_heads: kv_r,
            head_dim: hd,
            tp: reduce(o_bias),
        })
    }

    /// `o_proj`, completed by the TP all-reduce when sharded.
    pub(crate) fn project_out(&self, o: Tensor) -> candle_core::Result<Tensor> {
        let y = self.o_proj.forward(&o)?;
        // Dead before a TP all-reduce, whose sums would otherwise sit beside it.
        drop(o);
        match &self.tp {
            Some(r) => r.apply(y),
            None => Ok(y),
        }
    }

    /// The projections with rotary embeddings applied, shared by both cache layouts.
    ///
    /// x: (T, hidden); cos, sin: (T, head_dim / 2) rope rows at each token's position.
    /// Returns q: (T, heads, head_dim), k and v: (T, kv_heads, head_dim), model dtype.
    pub(crate) fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_many(x, [&self.q_proj, &self.k_proj, &self.v_proj])?;
        let q = q.reshape((t, nh, hd))?;
        let k = k.reshape((t, nkv, hd))?;
        let v = v.reshape((t, nkv, hd))?;
        let q = crate::layers::host_ops::rope(&q, cos, sin)?;
        let k = crate::layers::host_ops::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Paged attention: x: (T, hidden) -> (T, hidden).
    ///
    /// q, k, v go to the kernels as contiguous f32 `(T, heads | kv_heads, head_dim)`;
    /// the cache stores K/V in its own dtype and returns (T, heads * head_dim) f32, cast
    /// back to the model dtype before `o_proj`.
    pub(crate) fn forward_paged(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer_idx: usize,
        meta: &PagedMetadata,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let o = {
            let (q, k, v) = self.qkv(x, cos, sin)?;
            cache
                .write_and_attend_tensors(layer_idx, &q, &k, &v, meta)?
                .to_dtype(x.dtype())?
        };
        Ok(self.project_out(o)?)
    }

    /// Contiguous per-sequence caches: x: (T, hidden) -> (T, hidden).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pass: &PassInputs<'_>,
        layer_idx: usize,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(x, &pass.cos, &pass.sin)?;

        let meta = pass.meta;
        let mut outs = Vec::with_capacity(meta.num_seqs());
        let mut start = 0;
        for (s, cache) in caches.iter_mut().enumerate() {
            let qlen = meta.query_lens[s];
            if cache.is_blocks() {
                let o = cache
                    .attend_blocks(
                        layer_idx,
                        meta.cached_lens[s],
                        &q.narrow(0, start, qlen)?,
                        &k.narrow(0, start, qlen)?,
                        &v.narrow(0, start, qlen)?,
                    )
                    .map_err(candle_core::Error::wrap)?;
                outs.push(o.to_dtype(x.dtype())?);
                start += qlen;
                continue;
            }
            let (k_all, v_all) = cache.write(
                layer_idx,
                meta.cached_lens[s],
                &k.narrow(0, start, qlen)?,
                &v.narrow(0, start, qlen)?,
            )?;
            let q_s = q.narrow(0, start, qlen)?;
            // The fused kernel reads host memory; a GPU takes the general path.
            outs.push(if cache.makes_scores() {
                Self::attend(&q_s, &k_all, &v_all, pass.masks[s].as_ref())?
            } else {
                attend_fused(&q_s, &k_all, &v_all, meta.cached_lens[s])?
            });
            start += qlen;
        }
        let o = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.project_out(o)
    }

    /// Scaled dot-product attention of one sequence.
    ///
    /// q: (qlen, heads, head_dim); k, v: (ctx, kv_heads, head_dim), possibly strided views
    /// of the cache; mask: (qlen, ctx) or None. Returns (qlen, heads * head_dim) in the
    /// dtype of q. The `group` query heads of one KV head are stacked as rows, so one
    /// batched matmul per KV head covers them without repeating K or V.
    pub(crate) fn attend(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (qlen, nh, hd) = q.dims3()?;
        let (ctx, nkv, _) = k.dims3()?;
        let group = nh / nkv;
        let out_dtype = q.dtype();
        let scale = 1.0 / (hd as f64).sqrt();
        // (qlen, nkv, group, hd) -> (nkv, group * qlen, hd); free when qlen == 1.
        let q = q
            .reshape((qlen, nkv, group, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((nkv, group * qlen, hd))?
            .to_dtype(DType::F32)?;
        let q = (q * scale)?;
        // (ctx, nkv, hd) -> (nkv, ctx, hd), a strided view (the f32 cast copies). cuBLAS
        // takes only packed matrices: on a GPU the views are made contiguous.
        let mut k = k.transpose(0, 1)?.to_dtype(DType::F32)?;
        let mut v = v.transpose(0, 1)?.to_dtype(DType::F32)?;
        if !k.device().is_cpu() {
            (k, v) = (k.contiguous()?, v.contiguous()?);
        }
        let mut scores = q.matmul(&k.t()?)?; // (nkv, group * qlen, ctx)
        if let Some(mask) = mask {
            scores = scores
                .reshape((nkv, group, qlen, ctx))?
                .broadcast_add(mask)?
                .reshape((nkv, group * qlen, ctx))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (nkv, group * qlen, hd)
        out.reshape((nkv, group, qlen, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((qlen, nh * hd))?
            .to_dtype(out_dtype)
    }
}

/// Attention of a sequence's new queries over the contiguous cache, by the paged kernel
/// (SIMD, f32 accumulation, K/V read in the cache's dtype, a running softmax per query:
/// no score matrix, no mask).
///
/// q: (qlen, heads, head_dim), the queries at positions `cached..cached + qlen`; k, v:
/// (cached + qlen, kv_heads, head_dim) contiguous views of the cache. Returns (qlen,
/// heads * head_dim) in q's dtype. Same math as [`Attention::attend`] with its causal
/// mask: query `i` sees the first `cached + i + 1` positions. It exists because gemm's
/// setup cost on the tiny per-head products dominated decode at long contexts, and the
/// score matrices, their softmax and the mask were most of a prefill's time outside the
/// projections. Tested against the general path below, on random tensors.
pub(crate) fn attend_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cached: usize,
) -> candle_core::Result<Tensor> {
    let (qlen, nh, hd) = q.dims3()?;
    let ctx = k.dim(0)?;
    if ctx != cached + qlen {
        candle_core::bail!("attention: {ctx} cached keys for {cached} + {qlen} positions")
    }
    let q32: Vec<f32> = q.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let mut out = vec![0f32; q32.len()];
    attend_cache_rows(&mut out, &q32, nh, k, v, cached)?;
    Tensor::from_vec(out, (qlen, nh * hd), q.device())?.to_dtype(q.dtype())
}

/// The work of [`attend_fused`] on slices: `out` (qlen, heads * head_dim) f32 from the
/// f32 queries `q` (qlen, heads, head_dim) at positions `cached..cached + qlen`, over the
/// first `cached + qlen` rows of `k`, `v`: contiguous host tensors (rows, kv_heads,
/// head_dim) in the cache's dtype, such as a contiguous cache's whole layer.
pub(crate) fn attend_cache_rows(
    out: &mut [f32],
    q: &[f32],
    num_heads: usize,
    k: &Tensor,
    v: &Tensor,
    cached: usize,
) -> candle_core::Result<()> {
    use candle_core::{CpuStorage, Storage};
    use llmem_kernels::{AttentionParams, CacheShape};

    let (rows, nkv, hd) = k.dims3()?;
    let row = num_heads * hd;
    if row == 0 || q.len() % row != 0 || v.dims3()? != (rows, nkv, hd) {
        candle_core::bail!(
            "attention: {} query values for {num_heads} heads of {hd}, keys {:?}, values {:?}",
            q.len(),
            k.dims(),
            v.dims()
        )
    }
    let qlen = q.len() / row;
    let ctx = cached + qlen;
    if ctx > rows {
        candle_core::bail!("attention: {rows} cached keys for {cached} + {qlen} positions")
    }
    // The cache rows 0..ctx are one block of `ctx` tokens in the paged kernel's layout
    // (token, kv head, dim), so the paged kernel runs over them as they are.
    let params = AttentionParams {
        num_heads,
        scale: 1.0 / (hd as f32).sqrt(),
        cache: CacheShape {
            num_blocks: 1,
            block_size: ctx,
            kv_heads: nkv,
            head_dim: hd,
        },
        max_blocks_per_seq: 1,
    };
    // One query (decode) needs no allocation here.
    let (one_seq, one_len) = ([0u32], [ctx as u32]);
    let (many_seq, many_lens): (Vec<u32>, Vec<u32>) = match qlen {
        1 => (Vec::new(), Vec::new()),
        _ => (
            vec![0; qlen],
            (cached + 1..=ctx).map(|c| c as u32).collect(),
        ),
    };
    let (query_seq, context_lens): (&[u32], &[u32]) = match qlen {
        1 => (&one_seq, &one_len),
        _ => (&many_seq, &many_lens),
    };
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("attention: the cache is not on the CPU")
    };
    let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets()) else {
        candle_core::bail!("attention: cache views must be contiguous")
    };
    let n = ctx * nkv * hd;
    let (kr, vr) = (k0..k0 + n, v0..v0 + n);
    let lens = (query_seq, context_lens);
    match (kc, vc) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => run(out, q, &k[kr], &v[vr], lens, &params),
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => run(out, q, &k[kr], &v[vr], lens, &params),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => run(out, q, &k[kr], &v[vr], lens, &params),
        _ => candle_core::bail!("attention: unsupported cache dtype {:?}", k.dtype()),
    }
}

/// The paged kernel over one block of cache rows, for [`attend_cache_rows`].
fn run<T: llmem_kernels::CacheElem>(
    out: &mut [f32],
    q: &[f32],
    k: &[T],
    v: &[T],
    (query_seq, context_lens): (&[u32], &[u32]),
    params: &llmem_kernels::AttentionParams,
) -> candle_core::Result<()> {
    llmem_kernels::paged_attention(out, q, k, v, &[0], query_seq, context_lens, params)
        .map_err(|e| candle_core::Error::Msg(format!("attention: {e}")))
}

/// Additive causal mask of one sequence: (query_len, cached_len + query_len) f32, with
/// -inf where key position > query position; `None` for a single query token.
pub(crate) fn causal_mask(
    cached_len: usize,
    query_len: usize,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if query_len <= 1 {
        return Ok(None);
    }
    let ctx = cached_len + query_len;
    let data: Vec<f32> = (0..query_len)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j > cached_len + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (query_len, ctx), device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused path (every CPU pass) against the general one (score matrices and a
    /// causal mask; a GPU's contiguous prefill): prefills, a chunk after cached
    /// positions and single decode steps, grouped and ungrouped heads, f32 and f16
    /// caches.
    #[test]
    fn fused_attention_equals_the_general_path() {
        let dev = Device::Cpu;
        for (nh, nkv, hd) in [(4, 2, 8), (3, 3, 16), (9, 3, 64)] {
            for (cached, qlen) in [(0, 1), (0, 7), (5, 3), (20, 1), (16, 16)] {
                let ctx = cached + qlen;
                let q = Tensor::randn(0f32, 1.0, (qlen, nh, hd), &dev).unwrap();
                let k = Tensor::randn(0f32, 1.0, (ctx, nkv, hd), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (ctx, nkv, hd), &dev).unwrap();
                for dtype in [DType::F32, DType::F16] {
                    let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
                    let mask = causal_mask(cached, qlen, &dev).unwrap();
                    let want = Attention::attend(&q, &k, &v, mask.as_ref()).unwrap();
                    let got = attend_fused(&q, &k, &v, cached).unwrap();
                    let diff = crate::layers::host_ops::tests::max_diff(&got, &want);
                    assert!(
                        diff < 1e-4,
                        "heads {nh}/{nkv} x {hd}, {cached} cached + {qlen} {dtype:?}: {diff}"
                    );
                }
            }
        }
    }
}
