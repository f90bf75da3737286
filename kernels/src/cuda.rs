//! The CUDA twins of [`crate::reshape_and_cache`] and [`crate::paged_attention`] (feature
//! `cuda`): same parameters, same layouts, same checks, on device buffers.
//!
//! The kernels (`paged.cu`, our own source) are compiled with NVRTC at first use and
//! loaded once per device through candle's module cache; no PTX is committed or built
//! at compile time. Host-side metadata (slot mapping, block tables, query rows, context
//! lengths) is checked on the host with the CPU kernels' own checks, then copied to the
//! device, so a kernel never indexes outside its buffers.
//!
//! Numbers: inputs and outputs are f32 (as on the CPU); the cache holds f32, f16 or bf16;
//! every dot product and the softmax run in f32. Results match the CPU kernels up to
//! summation order (tested in `tests` below, on a GPU, and skipped without one).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaDevice;
use half::{bf16, f16};

use crate::attention::{check, Checked, Lens};
use crate::{AttentionParams, CacheElem, CacheShape, KernelError};

/// The kernels' source, compiled by NVRTC at first use.
pub const SOURCE: &str = include_str!("paged.cu");
const MODULE: &str = "llmem_paged";
/// The CUDA kernel keeps one query row per warp lane group in registers: 8 per lane.
pub const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the attention kernel (4 warps, as `WARPS` in paged.cu).
const ATTENTION_THREADS: u32 = 128;

/// A cache element the CUDA kernels store: f32, f16 or bf16 (`paged.cu`'s suffixes).
pub trait CudaCacheElem: CacheElem + DeviceRepr {
    const SUFFIX: &'static str;
}

impl CudaCacheElem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaCacheElem for f16 {
    const SUFFIX: &'static str = "f16";
}
impl CudaCacheElem for bf16 {
    const SUFFIX: &'static str = "bf16";
}

fn driver_err(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Invalid(format!("CUDA {what}: {e}"))
}

/// The PTX of [`SOURCE`], compiled once per process (NVRTC needs no device).
pub fn ptx() -> Result<&'static str, KernelError> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = CompileOptions {
            name: Some("paged.cu".to_string()),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile paged.cu: {e}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(|e| KernelError::Invalid(e.clone()))
}

fn func(
    dev: &CudaDevice,
    name: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction, KernelError> {
    let f = dev
        .get_or_load_custom_func(name, MODULE, ptx()?)
        .map_err(|e| driver_err("loading the paged kernels", e))?;
    Ok(f.into_cuda_function())
}

/// Write `key`, `value` (`[num_tokens, kv_heads, head_dim]`, f32, on `dev`) into
/// `key_cache`, `value_cache` (`[num_blocks, block_size, kv_heads, head_dim]`) at the
/// slots `slot_mapping[t]` (host, `[num_tokens]`; `None` skips the token).
pub fn reshape_and_cache_cuda<T: CudaCacheElem>(
    dev: &CudaDevice,
    key: &CudaView<'_, f32>,
    value: &CudaView<'_, f32>,
    key_cache: &mut CudaSlice<T>,
    value_cache: &mut CudaSlice<T>,
    slot_mapping: &[Option<usize>],
    shape: CacheShape,
) -> Result<(), KernelError> {
    crate::cache::check_cache_write(
        key.len(),
        value.len(),
        key_cache.len(),
        value_cache.len(),
        slot_mapping,
        shape,
    )?;
    let n = shape.token_elems();
    let tokens = slot_mapping.len();
    let slots: Vec<i64> = slot_mapping
        .iter()
        .map(|s| s.map_or(-1, |s| s as i64))
        .collect();
    if tokens == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let slots = stream
        .clone_htod(&slots)
        .map_err(|e| driver_err("copying the slot mapping", e))?;
    let f = func(dev, &format!("reshape_and_cache_{}", T::SUFFIX))?;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (n.clamp(1, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let token_elems = n as i32;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(key)
        .arg(value)
        .arg(key_cache)
        .arg(value_cache)
        .arg(&slots)
        .arg(&token_elems);
    // SAFETY: the argument list matches `reshape_and_cache_<T>` in paged.cu; every slot
    // was checked against the cache above and the inputs hold `tokens` rows of `n`.
    unsafe { launch.launch(cfg) }.map_err(|e| driver_err("launching reshape_and_cache", e))?;
    Ok(())
}

/// `out[q] = softmax(scale * query[q] . K[0..len]) V[0..len]` per head, on the device.
///
/// - `out`, `query`: `[num_queries, num_heads, head_dim]`, f32, on `dev`
/// - `key_cache`, `value_cache`: `[num_blocks, block_size, kv_heads, head_dim]`
/// - `block_tables` (host): `[num_seqs, max_blocks_per_seq]`
/// - `query_seq`, `context_lens` (host): `[num_queries]`
///
/// Covers decode (one query per sequence) and prefill (causal `context_lens`), as the CPU
/// kernel does; `head_dim` up to [`MAX_HEAD_DIM`].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_cuda<T: CudaCacheElem>(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    query: &CudaView<'_, f32>,
    key_cache: &CudaSlice<T>,
    value_cache: &CudaSlice<T>,
    block_tables: &[u32],
    query_seq: &[u32],
    context_lens: &[u32],
    p: &AttentionParams,
) -> Result<(), KernelError> {
    let lens = Lens {
        out: out.len(),
        query: query.len(),
        key_cache: key_cache.len(),
        value_cache: value_cache.len(),
    };
    let checked = Checked {
        block_tables,
        query_seq,
        context_lens,
    };
    check(lens, &checked, p)?;
    let c = p.cache;
    if c.head_dim > MAX_HEAD_DIM {
        return Err(KernelError::Invalid(format!(
            "head_dim {} is above the CUDA kernel's {MAX_HEAD_DIM}",
            c.head_dim
        )));
    }
    let queries = query_seq.len();
    if queries == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let copy = |name: &str, v: &[u32]| {
        stream
            .clone_htod(v)
            .map_err(|e| driver_err(&format!("copying {name}"), e))
    };
    let tables = copy("block_tables", block_tables)?;
    let rows = copy("query_seq", query_seq)?;
    let lens = copy("context_lens", context_lens)?;
    let f = func(dev, &format!("paged_attention_{}", T::SUFFIX))?;
    let cfg = LaunchConfig {
        grid_dim: (queries as u32, p.num_heads as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let ints = [
        p.num_heads as i32,
        c.kv_heads as i32,
        c.head_dim as i32,
        c.block_size as i32,
        p.max_blocks_per_seq as i32,
    ];
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(out)
        .arg(query)
        .arg(key_cache)
        .arg(value_cache)
        .arg(&tables)
        .arg(&rows)
        .arg(&lens);
    for i in &ints {
        launch.arg(i);
    }
    launch.arg(&p.scale);
    // SAFETY: the argument list matches `paged_attention_<T>` in paged.cu; `check` proved
    // every block id, row and context length in range for these buffers.
    unsafe { launch.launch(cfg) }.map_err(|e| driver_err("launching paged_attention", e))?;
    Ok(())
}

/// The comparison the tests and `llmem gpu-check` run: random K/V written into random
/// slots of a cache on both devices, then decode and causal-prefill queries attended
/// over it, for f32, f16 and bf16 caches and several head sizes. Cache bytes must match
/// exactly; outputs within a per-dtype tolerance (both sides compute in f32 on the same
/// stored values, so only summation order and `exp` differ). One line per case; an error
/// names the first case out of tolerance.
pub fn self_test(dev: &CudaDevice) -> Result<Vec<String>, KernelError> {
    let mut lines = Vec::new();
    for (head_dim, block_size) in [(64, 16), (128, 16), (80, 32), (256, 8)] {
        lines.push(compare::<f32>(dev, 2e-5, head_dim, block_size)?);
        lines.push(compare::<f16>(dev, 5e-5, head_dim, block_size)?);
        lines.push(compare::<bf16>(dev, 5e-5, head_dim, block_size)?);
    }
    Ok(lines)
}

/// xorshift64*: deterministic inputs for [`self_test`].
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn upload<T: DeviceRepr>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>, KernelError> {
    dev.cuda_stream()
        .clone_htod(v)
        .map_err(|e| driver_err("copying to the device", e))
}

fn download<T: DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    s: &CudaSlice<T>,
) -> Result<Vec<T>, KernelError> {
    dev.cuda_stream()
        .clone_dtoh(s)
        .map_err(|e| driver_err("copying from the device", e))
}

fn compare<T: CudaCacheElem + PartialEq>(
    dev: &CudaDevice,
    tol: f32,
    head_dim: usize,
    block_size: usize,
) -> Result<String, KernelError> {
    use crate::{paged_attention, reshape_and_cache};
    let shape = CacheShape {
        num_blocks: 64,
        block_size,
        kv_heads: 2,
        head_dim,
    };
    let num_heads = 6;
    let mut rng = Rng((head_dim as u64 * 131 + block_size as u64) | 1);
    // Three sequences: one token, a block and a bit, five blocks less one.
    let seq_lens = [1, block_size + 3, 5 * block_size - 1];
    let max_blocks = 5;
    let mut free: Vec<u32> = (0..shape.num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let mut tables = vec![0u32; seq_lens.len() * max_blocks];
    let mut slot_mapping = Vec::new();
    for (s, &len) in seq_lens.iter().enumerate() {
        for b in 0..len.div_ceil(block_size) {
            tables[s * max_blocks + b] = free.pop().unwrap_or(0);
        }
        for t in 0..len {
            let block = tables[s * max_blocks + t / block_size] as usize;
            slot_mapping.push(Some(block * block_size + t % block_size));
        }
    }
    // A padded token: its slot stays zero in both caches.
    slot_mapping[2] = None;
    let tokens = slot_mapping.len();
    let n = shape.token_elems();
    let key: Vec<f32> = (0..tokens * n).map(|_| rng.uniform()).collect();
    let value: Vec<f32> = (0..tokens * n).map(|_| rng.uniform()).collect();

    let mut kc = vec![T::default(); shape.elems()];
    let mut vc = vec![T::default(); shape.elems()];
    reshape_and_cache(&key, &value, &mut kc, &mut vc, &slot_mapping, shape)?;
    let (dk, dv) = (upload(dev, &key)?, upload(dev, &value)?);
    let mut dkc = upload(dev, &vec![T::default(); shape.elems()])?;
    let mut dvc = upload(dev, &vec![T::default(); shape.elems()])?;
    reshape_and_cache_cuda(
        dev,
        &dk.slice(..),
        &dv.slice(..),
        &mut dkc,
        &mut dvc,
        &slot_mapping,
        shape,
    )?;
    let case = format!("{} head_dim {head_dim} block_size {block_size}", T::NAME);
    if download(dev, &dkc)? != kc || download(dev, &dvc)? != vc {
        return Err(KernelError::Invalid(format!(
            "reshape_and_cache {case}: the CUDA cache differs from the CPU cache"
        )));
    }

    // Sequence 0 decodes; 1 prefills causally; 2 decodes at its end.
    let mut query_seq = vec![0u32];
    let mut context_lens = vec![1u32];
    for t in 0..seq_lens[1] {
        query_seq.push(1);
        context_lens.push(t as u32 + 1);
    }
    query_seq.push(2);
    context_lens.push(seq_lens[2] as u32);
    let p = AttentionParams {
        num_heads,
        scale: 1.0 / (head_dim as f32).sqrt(),
        cache: shape,
        max_blocks_per_seq: max_blocks,
    };
    let q: Vec<f32> = (0..query_seq.len() * num_heads * head_dim)
        .map(|_| rng.uniform())
        .collect();
    let mut out = vec![0f32; q.len()];
    paged_attention(
        &mut out,
        &q,
        &kc,
        &vc,
        &tables,
        &query_seq,
        &context_lens,
        &p,
    )?;
    let dq = upload(dev, &q)?;
    let mut dout = upload(dev, &vec![0f32; q.len()])?;
    paged_attention_cuda(
        dev,
        &mut dout,
        &dq.slice(..),
        &dkc,
        &dvc,
        &tables,
        &query_seq,
        &context_lens,
        &p,
    )?;
    let got = download(dev, &dout)?;
    let worst = out
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    if worst > tol {
        return Err(KernelError::Invalid(format!(
            "paged_attention {case}: max |cpu - cuda| = {worst:e} > {tol:e}"
        )));
    }
    Ok(format!(
        "ok: reshape_and_cache + paged_attention {case}: cache bytes equal, max |cpu - cuda| = {worst:.2e} (tolerance {tol:.0e})"
    ))
}

#[cfg(test)]
mod tests {
    //! The CUDA kernels against their CPU twins ([`self_test`]). Without a CUDA device
    //! the tests print why and pass (they run on the GPU machine: `llmem gpu-check` runs
    //! the same comparison); the NVRTC compile needs no device and always runs.
    use super::*;

    fn device() -> Option<CudaDevice> {
        match candle_core::Device::new_cuda(0) {
            Ok(candle_core::Device::Cuda(d)) => Some(d),
            Ok(other) => panic!("new_cuda gave {other:?}"),
            Err(e) => {
                // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
                let cause = e.to_string();
                eprintln!(
                    "SKIPPED: no CUDA device ({})",
                    cause.lines().next().unwrap_or("")
                );
                None
            }
        }
    }

    #[test]
    fn nvrtc_compiles_the_kernels() {
        match ptx() {
            Ok(ptx) => {
                for k in ["reshape_and_cache_bf16", "paged_attention_f16"] {
                    assert!(ptx.contains(k), "{k} missing from the PTX");
                }
            }
            // NVRTC is a library of the toolkit; without it there is nothing to test.
            Err(e) if e.to_string().contains("libnvrtc") => eprintln!("SKIPPED: {e}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn cuda_kernels_match_the_cpu_kernels() {
        let Some(dev) = device() else { return };
        for line in self_test(&dev).unwrap() {
            eprintln!("{line}");
        }
    }

    #[test]
    fn cuda_kernels_reject_what_the_cpu_kernels_reject() {
        let Some(dev) = device() else { return };
        let shape = CacheShape {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let (k, v) = (
            upload(&dev, &[0f32; 2]).unwrap(),
            upload(&dev, &[0f32; 2]).unwrap(),
        );
        let mut kc = upload(&dev, &[0f32; 16]).unwrap();
        let mut vc = upload(&dev, &[0f32; 16]).unwrap();
        let err = reshape_and_cache_cuda(
            &dev,
            &k.slice(..),
            &v.slice(..),
            &mut kc,
            &mut vc,
            &[Some(8)],
            shape,
        )
        .unwrap_err();
        assert!(err.to_string().contains("slot_mapping[0] = 8"), "{err}");
        let p = AttentionParams {
            num_heads: 1,
            scale: 1.0,
            cache: shape,
            max_blocks_per_seq: 1,
        };
        let q = upload(&dev, &[0f32; 2]).unwrap();
        let mut out = upload(&dev, &[0f32; 2]).unwrap();
        let err =
            paged_attention_cuda(&dev, &mut out, &q.slice(..), &kc, &vc, &[5], &[0], &[1], &p)
                .unwrap_err();
        assert!(err.to_string().contains("names block 5"), "{err}");
    }
}
