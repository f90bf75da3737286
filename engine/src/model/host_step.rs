//! One decode step of one sequence on the CPU with no tensor between the kernels.
//!
//! [`Model::forward`]'s general loop wraps every kernel in candle tensors: a step of the
//! default model made about 4,300 heap allocations (docs/results.md, 13 (p)), and the
//! work around them was a tenth or more of a quantized step. One token of one sequence
//! of a whole model on the CPU runs here instead, over a float contiguous cache
//! (`generate`) or over the paged cache (`serve`, `bench`), the way llama.cpp's static
//! graph runs it: each layer on f32 buffers made once per step, with the same kernels in
//! the same order and the same roundings (the K/V rounding to the cache's dtype
//! included), so its logits equal the general loop's; the tests below hold them to it.
//!
//! Anything else takes the general loop: several tokens or sequences in one pass, a
//! shard, a GPU, 16-bit activations, a block-quantized contiguous cache, a bias, or a
//! weight without a host kernel (candle's quantized matrices on the `scalar` level).
//! `LLMEM_HOST_STEP=0` sends every pass there, to compare the two.

use candle_core::{DType, Tensor};
use llmem_kernels::{ops, KernelError};

use super::Model;
use crate::cache::contiguous::KvCache;
use crate::cache::paged::{PagedKvCache, PagedMetadata};
use crate::error::{Error, Result};
use crate::layers::attention::attend_cache_rows;
use crate::layers::host_ops::on_host_f32;
use crate::layers::linear::{host_products, host_ready, Linear};
use crate::layers::norm::RmsNorm;

/// `LLMEM_HOST_STEP=0` turns the host step off.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LLMEM_HOST_STEP").as_deref() != Ok("0"))
}

/// Calls `f` on the elements of an f32 tensor in host memory; an error naming `what`
/// for any other.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    on_host_f32([t], |[v]| f(v))
        .map_err(|e| failed(what, crate::error::candle_message(e)))?
        .ok_or_else(|| failed(what, "not f32 in host memory"))
}

fn host_norm(n: &RmsNorm) -> bool {
    n.weight.dtype() == DType::F32 && n.weight.device().is_cpu()
}

/// A step's error, named like the general loop's.
fn failed(context: &str, message: impl std::fmt::Display) -> Error {
    Error::Tensor {
        context: format!("host decode step, {context}"),
        message: message.to_string(),
    }
}

fn kernel(context: &str) -> impl Fn(KernelError) -> Error + '_ {
    move |e| failed(context, e)
}

/// `outs[i] = x ls[i]^T` through [`host_products`]; an error if it declines.
fn products(x: &[f32], ls: &[&Linear], outs: &mut [&mut [f32]], context: &str) -> Result<()> {
    match host_products(x, 1, ls, outs) {
        Ok(true) => Ok(()),
        Ok(false) => Err(failed(context, "no host kernel for these weights")),
        Err(e) => Err(failed(context, crate::error::candle_message(e))),
    }
}

impl Model {
    /// Whether this model's one-token passes can run through [`Model::host_step`]: a
    /// whole model on the CPU with f32 activations, f32 norms and a host kernel for
    /// every matrix (the cache is the caller's to check).
    pub(super) fn host_step_ready(&self) -> bool {
        let whole = self.spec.is_single() && self.tp.is_none();
        let (Some(_), Some(norm), Some(head)) = (&self.embed_tokens, &self.norm, &self.lm_head)
        else {
            return false;
        };
        enabled()
            && whole
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && host_norm(norm)
            && host_ready(&[head])
            && self.layers.iter().all(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                a.tp.is_none()
                    && m.tp.is_none()
                    && host_norm(&l.input_layernorm)
                    && host_norm(&l.post_attention_layernorm)
                    && host_ready(&[&a.q_proj, &a.k_proj, &a.v_proj])
                    && host_ready(&[&a.o_proj])
                    && host_ready(&[&m.gate_proj, &m.up_proj])
                    && host_ready(&[&m.down_proj])
            })
    }

    /// The logits (1, vocab) f32 of token `id` at position `pos`. `attend(layer, q, k, v, out)`
    /// is the cache's part: it stores layer `layer`'s rotated keys `k` and values `v` (f32,
    /// (kv_heads, head_dim)) at the token's place and writes into `out` the attention of
    /// the rotated queries `q` (heads, head_dim) over the sequence, this token included.
    /// Only after [`Model::host_step_ready`] and the pass checks.
    pub(super) fn host_step(&self, id: u32, pos: usize, mut attend: impl Attend) -> Result<Tensor> {
        let (Some(table), Some(norm), Some(head)) = (&self.embed_tokens, &self.norm, &self.lm_head)
        else {
            return Err(failed("setup", "a shard has no host step"));
        };
        let hidden = self.shape.hidden_size as usize;
        let inter = self.shape.intermediate_size as usize;
        let vocab = self.shape.vocab_size as usize;
        let embedded = self.embed(table, &[id])?;
        let mut x = with_f32(&embedded, "embedding", <[f32]>::to_vec)?;
        drop(embedded);
        if x.len() != hidden {
            return Err(failed(
                "embedding",
                format!("{} values, not {hidden}", x.len()),
            ));
        }
        let mut sum = vec![0f32; hidden];
        let mut normed = vec![0f32; hidden];
        let mut o = vec![0f32; hidden];
        let (mut gate, mut up, mut act) = (vec![0f32; inter], vec![0f32; inter], vec![0f32; inter]);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.rope.push_row(pos as u32, &mut cos, &mut sin);
        let (nh, nkv, hd) = (
            self.shape.num_attention_heads as usize,
            self.shape.num_key_value_heads as usize,
            self.shape.head_dim as usize,
        );
        let (mut q, mut att) = (vec![0f32; nh * hd], vec![0f32; nh * hd]);
        let (mut k, mut v) = (vec![0f32; nkv * hd], vec![0f32; nkv * hd]);
        for (i, layer) in self.layers.iter().enumerate() {
            let context = format!("layer {i}");
            let c = context.as_str();
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let w = &layer.input_layernorm;
            with_f32(&w.weight, c, |wv| ops::rms_norm(&x, wv, w.eps, &mut normed))?
                .map_err(kernel(c))?;
            let qkv = [&a.q_proj, &a.k_proj, &a.v_proj];
            products(&normed, &qkv, &mut [&mut q, &mut k, &mut v], c)?;
            ops::rope_in_place(&mut q, nh, hd, &cos, &sin).map_err(kernel(c))?;
            ops::rope_in_place(&mut k, nkv, hd, &cos, &sin).map_err(kernel(c))?;
            attend(i, &q, &k, &v, &mut att).map_err(|e| match e {
                Error::Tensor { message, .. } => failed(c, message),
                other => other,
            })?;
            products(&att, &[&a.o_proj], &mut [&mut o], c)?;
            let post = &layer.post_attention_layernorm;
            with_f32(&post.weight, c, |w| {
                ops::add_rms_norm(&x, &o, w, post.eps, &mut sum, &mut normed)
            })?
            .map_err(kernel(c))?;
            std::mem::swap(&mut x, &mut sum);
            products(
                &normed,
                &[&m.gate_proj, &m.up_proj],
                &mut [&mut gate, &mut up],
                c,
            )?;
            ops::silu_mul(&gate, &up, &mut act).map_err(kernel(c))?;
            products(&act, &[&m.down_proj], &mut [&mut o], c)?;
            ops::add(&x, &o, &mut sum).map_err(kernel(c))?;
            std::mem::swap(&mut x, &mut sum);
        }
        // The layers' buffers go before the logits come, as in the general loop: the
        // head's phase holds the normed row, its quantized form and the logits only.
        drop((sum, o, gate, up, act, q, k, v, att));
        with_f32(&norm.weight, "final norm", |w| {
            ops::rms_norm(&x, w, norm.eps, &mut normed)
        })?
        .map_err(kernel("final norm"))?;
        let mut logits = vec![0f32; vocab];
        products(&normed, &[head], &mut [&mut logits], "LM head")?;
        Ok(Tensor::from_vec(logits, (1, vocab), &self.device)?)
    }
}

/// The cache's part of [`Model::host_step`]: `attend(layer, q, k, v, out)`.
pub(super) trait Attend:
    FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) -> Result<()>
{
}

impl<F: FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) -> Result<()>> Attend for F {}

/// [`Model::host_step`]'s `attend` over a float contiguous cache in host memory: the
/// token's keys and values go to row `pos`, its queries attend over rows `0..=pos`.
pub(super) fn attend_contiguous(
    cache: &mut KvCache,
    pos: usize,
    num_heads: usize,
) -> impl Attend + '_ {
    move |layer, q, k, v, out| {
        let tensor = |e| failed(&format!("layer {layer}"), crate::error::candle_message(e));
        cache.write_host(layer, pos, k, v).map_err(tensor)?;
        let (kc, vc) = cache
            .host_layer(layer)
            .ok_or_else(|| failed("KV cache", "not a float cache in host memory"))?;
        attend_cache_rows(out, q, num_heads, kc, vc, pos).map_err(tensor)
    }
}

/// [`Model::host_step`]'s `attend` over the paged cache: one token, whose slot and
/// context `meta` gives.
pub(super) fn attend_paged<'a>(
    cache: &'a mut PagedKvCache,
    meta: &'a PagedMetadata,
) -> impl Attend + 'a {
    move |layer, q, k, v, out| cache.write_and_attend_into(layer, q, k, v, meta, out)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use llmem_planner::Precision;

    use super::*;
    use crate::cache::paged::{PagedKvCache, PagedMetadata};
    use crate::model::AttnMetadata;
    use crate::weights::files::WeightFiles;
    use crate::weights::quant::WeightFormat;

    /// Two caches fed the same prompt by the general loop, then the same tokens one at a
    /// time: one by the host step, one by the general loop. The logits must be the same
    /// numbers, at every step, for a block format, dense f32 and dense f16 weights, over
    /// f32 and f16 caches.
    #[test]
    fn the_host_step_gives_the_general_loops_logits() {
        let mut shape = llmem_planner::preset("smollm2-135m").unwrap();
        shape.num_hidden_layers = 2;
        let formats = [
            WeightFormat::new(Precision::Q8_0).unwrap(),
            WeightFormat::dense(DType::F32).unwrap(),
            WeightFormat::gguf_as_stored(Precision::Fp16),
        ];
        for fmt in formats {
            // Without packed kernels (the `scalar` level) a block format has no host step.
            let ready =
                !fmt.precision.is_quantized() || crate::weights::quant::packed_kernel_enabled();
            let model =
                Model::load_with(&shape, &WeightFiles::random(7), &fmt, &Device::Cpu).unwrap();
            for kv in [DType::F32, DType::F16] {
                let what = format!("{:?} weights, {kv:?} cache", fmt.precision);
                let new = || KvCache::new(&shape, 16, kv, &Device::Cpu).unwrap();
                let (mut fast, mut slow) = (new(), new());
                assert_eq!(model.host_step_ready(), ready, "{what}: ready");
                let prompt = [1u32, 20, 300];
                for cache in [&mut fast, &mut slow] {
                    model
                        .forward(&prompt, &AttnMetadata::single(0, 3), &mut [cache])
                        .unwrap();
                }
                for (n, &id) in [4000u32, 5, 49_000, 17].iter().enumerate() {
                    let meta = AttnMetadata::single(3 + n, 1);
                    let a = model.forward(&[id], &meta, &mut [&mut fast]).unwrap();
                    let b = model
                        .forward_general(&[id], &meta, &mut [&mut slow])
                        .unwrap();
                    let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
                    assert_eq!(a, b, "{what}: logits at step {n}");
                    assert_eq!(fast.len(), slow.len(), "{what}: cache length");
                }
            }
        }
    }

    #[test]
    fn a_block_cache_and_a_bf16_model_take_the_general_loop() {
        let mut shape = llmem_planner::preset("smollm2-135m").unwrap();
        shape.num_hidden_layers = 1;
        let f32_model = Model::load_with(
            &shape,
            &WeightFiles::random(3),
            &WeightFormat::dense(DType::F32).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        let blocks =
            KvCache::new_in(&shape, 8, crate::cache::paged::KvDtype::Q8_0, &Device::Cpu).unwrap();
        assert!(f32_model.host_step_ready() && blocks.host_layer(0).is_none());
        let bf16 = Model::load_with(
            &shape,
            &WeightFiles::random(3),
            &WeightFormat::dense(DType::BF16).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        assert!(!bf16.host_step_ready());
    }

    /// The paged form of the test above: a decode step of the engine's cache (f16 and
    /// q8_0 blocks) through the host step and through the general loop.
    #[test]
    fn the_paged_host_step_gives_the_general_loops_logits() {
        use crate::cache::paged::KvDtype;
        let mut shape = llmem_planner::preset("smollm2-135m").unwrap();
        shape.num_hidden_layers = 2;
        let fmt = match crate::weights::quant::packed_kernel_enabled() {
            true => WeightFormat::new(Precision::Q4_0).unwrap(),
            false => WeightFormat::dense(DType::F32).unwrap(),
        };
        let model = Model::load_with(&shape, &WeightFiles::random(11), &fmt, &Device::Cpu).unwrap();
        assert!(model.host_step_ready());
        let (blocks, bs) = (3usize, 4usize);
        let meta = |first: usize, n: usize| PagedMetadata {
            slot_mapping: (first..first + n).map(Some).collect(),
            block_tables: (0..blocks as u32).collect(),
            max_blocks_per_seq: blocks,
            query_seq: vec![0; n],
            context_lens: (first + 1..=first + n).map(|c| c as u32).collect(),
        };
        for kv in [KvDtype::F16, KvDtype::Q8_0] {
            let new = || PagedKvCache::new(&shape, blocks, bs, kv).unwrap();
            let (mut fast, mut slow) = (new(), new());
            let prompt = [2u32, 30, 400, 5000, 6];
            let positions: Vec<u32> = (0..5).collect();
            for cache in [&mut fast, &mut slow] {
                model
                    .forward_paged(&prompt, &positions, &meta(0, 5), cache, &[4])
                    .unwrap();
            }
            for (n, &id) in [7u32, 48_000, 80, 9].iter().enumerate() {
                let (pos, m) = (5 + n, meta(5 + n, 1));
                let p = [pos as u32];
                let a = model.forward_paged(&[id], &p, &m, &mut fast, &[0]).unwrap();
                let b = model
                    .forward_stage_general(&[id], &p, None, &m, &mut slow, &[0])
                    .unwrap()
                    .unwrap();
                let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
                assert_eq!(a, b, "{kv:?} cache: logits at step {n}");
            }
        }
    }
}
