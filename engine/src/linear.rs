//! Linear layers, `y = x W^T + b`, with the weight kept in the checkpoint's
//! `(out_features, in_features)` layout.
//!
//! Two paths. Many rows (prefill) go through candle's matmul (the `gemm` crate); candle
//! 0.11's CPU matmul rejects bf16 and its f16 kernel is slow, so a half-precision weight
//! is widened to f32 for that call (the cost is amortised over the rows).
//! Few rows (decode, up to [`MATVEC_MAX_ROWS`]) go through [`matvec`], which streams each
//! weight row once across the rayon pool and dots it with every input row, accumulating
//! in f32 (AVX2 when the CPU has it, chosen at run time). Batch-1 decode is bound by
//! weight bytes per token, and this path reads each byte once with no packing (on the
//! 2-core dev machine, f32 decode went from ~38 to ~44 tok/s against gemm's m=1 path, and
//! it is the only bf16 path at all). `LLMEM_MATVEC=0` sends every call to gemm, to
//! compare. [`matvec_slow`] is the plain reference the fast path is tested against.
//! Half-precision results are rounded to the weight dtype, as a bf16/f16 matmul with f32
//! accumulation does.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;
use crate::loader::WeightFiles;

/// Rows up to which [`Linear::forward`] uses [`matvec`] instead of gemm, by weight
/// dtype. Measured with `llmem bench` at 1-32 sequences (2 threads): for f32 weights gemm
/// overtakes the matvec from 3-4 rows on (at 8 rows gemm was 1.5x faster); for bf16/f16
/// weights gemm first widens the whole matrix to f32, so the matvec stays ahead up to at
/// least 32 rows.
pub fn matvec_max_rows(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 2,
        _ => 32,
    }
}

/// The largest threshold of [`matvec_max_rows`] (tests cover both sides of it).
pub const MATVEC_MAX_ROWS: usize = 32;

/// A dense projection. `weight`: (out_features, in_features); `bias`: (out_features,).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Load `{prefix}.weight` (and `{prefix}.bias` when `bias`), checking shapes.
    pub fn load(
        w: &WeightFiles,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = w.load(
            &format!("{prefix}.weight"),
            &[out_features, in_features],
            dtype,
            device,
        )?;
        let bias = if bias {
            Some(w.load(&format!("{prefix}.bias"), &[out_features], dtype, device)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Wrap an existing weight (a tied LM head shares the embedding's storage).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The dense weight and bias, for tensor parallelism to slice into shards.
    pub fn dense_parts(&self) -> (&Tensor, Option<&Tensor>) {
        (&self.weight, self.bias.as_ref())
    }

    /// Bytes held by the weight and bias.
    pub fn bytes(&self) -> u64 {
        let b = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        b(&self.weight) + self.bias.as_ref().map_or(0, b)
    }

    /// x: (rows, in_features) -> (rows, out_features), in the weight's dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let y = if rows <= matvec_max_rows(self.weight.dtype())
            && self.weight.device().is_cpu()
            && matvec_enabled()
        {
            matvec_tensor(x, &self.weight)?
        } else if self.weight.dtype() != DType::F32 {
            // candle's CPU gemm has no bf16, and its f16 kernel is far slower than f32.
            x.to_dtype(DType::F32)?
                .matmul(&self.weight.to_dtype(DType::F32)?.t()?)?
                .to_dtype(self.weight.dtype())?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `LLMEM_MATVEC=0` sends every linear through gemm (for comparing the two paths).
fn matvec_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LLMEM_MATVEC").as_deref() != Ok("0"))
}

/// A weight element the matvec kernel can widen to f32.
pub trait WeightElem: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Dot product of an f32 row with a weight row, accumulating in f32.
    #[inline]
    fn dot(x: &[f32], w: &[Self]) -> f32 {
        dot(x, w)
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    /// bf16 is the top half of an f32: a shift, which vectorises.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    /// half's per-element conversion does not vectorise; use F16C when present.
    #[inline]
    fn dot(x: &[f32], w: &[Self]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // Safety: the CPU features were checked just above.
                return unsafe { dot_f16_f16c(x, w) };
            }
        }
        dot_body(x, w)
    }
}

/// f16 weights: `vcvtph2ps` widens 8 halves at once, four accumulators hide FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_f16c(x: &[f32], w: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len().min(w.len());
    let (xp, wp) = (x.as_ptr(), w.as_ptr() as *const u16);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (j, a) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(off) as *const __m128i));
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(off)), wv, *a);
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total: f32 = lanes.iter().sum();
    for j in i..k {
        total += x[j] * w[j].to_f32();
    }
    total
}

/// Contiguous f32 copy of a CPU tensor's data (a view when it is f32 already).
fn with_f32_rows<R>(
    x: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let x = x.contiguous()?.to_dtype(DType::F32)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("matvec: input is not on the CPU")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("matvec: input is not contiguous".into()))?;
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// `x @ w^T` for a CPU weight `w` (n, k) and few rows `x` (m, k), via [`matvec`].
fn matvec_tensor(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if k != wk {
        candle_core::bail!("matvec: input has {k} features, weight expects {wk}")
    }
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("matvec: weight is not on the CPU")
    };
    let (ws, we) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("matvec: weight is not contiguous".into()))?;
    let out = with_f32_rows(x, |xs| {
        let mut out = vec![0f32; m * n];
        match cpu {
            CpuStorage::F32(w) => matvec(xs, m, &w[ws..we], n, k, &mut out),
            CpuStorage::BF16(w) => matvec(xs, m, &w[ws..we], n, k, &mut out),
            CpuStorage::F16(w) => matvec(xs, m, &w[ws..we], n, k, &mut out),
            _ => candle_core::bail!("matvec: unsupported weight dtype {:?}", w.dtype()),
        }
        Ok(out)
    })?;
    let y = Tensor::from_vec(out, (m, n), w.device())?;
    if w.dtype() == DType::F32 {
        Ok(y)
    } else {
        y.to_dtype(w.dtype())
    }
}

/// Weight rows per rayon task: enough work to amortise scheduling, enough tasks to
/// balance two to sixteen threads.
const ROWS_PER_TASK: usize = 32;

/// `out[r * n + o] = sum_i x[r * k + i] * w[o * k + i]` for `r < m`, `o < n`.
///
/// x: (m, k) f32 row-major; w: (n, k) row-major; out: (m, n). Each weight row is read
/// once from memory and dotted with all `m` input rows while it is in L1.
pub fn matvec<W: WeightElem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    // (n, m) results so that tasks own disjoint chunks; for m == 1 that is `out` itself.
    let mut scratch = Vec::new();
    let t: &mut [f32] = if m == 1 {
        &mut out[..n]
    } else {
        scratch.resize(n * m, 0f32);
        &mut scratch
    };
    t.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, dst)| {
            let first = task * ROWS_PER_TASK;
            for (j, ys) in dst.chunks_mut(m).enumerate() {
                let o = first + j;
                let row = &w[o * k..(o + 1) * k];
                for (r, y) in ys.iter_mut().enumerate() {
                    *y = W::dot(&x[r * k..(r + 1) * k], row);
                }
            }
        });
    if m > 1 {
        for o in 0..n {
            for r in 0..m {
                out[r * n + o] = scratch[o * m + r];
            }
        }
    }
}

/// Dot product with f32 accumulation; AVX2 code when the CPU supports it.
#[inline]
fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safety: the CPU supports AVX2, checked just above.
            return unsafe { dot_avx2(x, w) };
        }
    }
    dot_body(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    dot_body(x, w)
}

/// 32 independent lanes, which the compiler turns into four 8-wide vector accumulators.
#[inline(always)]
fn dot_body<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = 32;
    let k = x.len().min(w.len());
    let mut acc = [0f32; LANES];
    let (xc, xt) = x[..k].split_at(k - k % LANES);
    let (wc, wt) = w[..k].split_at(k - k % LANES);
    for (xs, ws) in xc.chunks_exact(LANES).zip(wc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += xs[l] * ws[l].widen();
        }
    }
    let mut tail = 0f32;
    for (a, b) in xt.iter().zip(wt) {
        tail += a * b.widen();
    }
    // Pairwise reduction of the lanes.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + tail
}

/// Reference for [`matvec`]: one f64 dot per output, no threads, no tricks.
pub fn matvec_slow<W: WeightElem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for o in 0..n {
            let mut s = 0f64;
            for i in 0..k {
                s += x[r * k + i] as f64 * w[o * k + i].widen() as f64;
            }
            out[r * n + o] = s as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SplitMix64;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn matvec_matches_slow_reference_for_all_dtypes_and_ragged_sizes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 70, 33),
            (3, 65, 96),
            (8, 200, 577),
            (2, 31, 5),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0f32; m * n];
            matvec(&x, m, &w, n, k, &mut out);
            let want = matvec_slow(&x, m, &w, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "f32 {m}x{n}x{k}: {a} vs {b}"
                );
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            matvec(&x, m, &wb, n, k, &mut out);
            let want = matvec_slow(&x, m, &wb, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "bf16: {a} vs {b}");
            }
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            matvec(&x, m, &wh, n, k, &mut out);
            let want = matvec_slow(&x, m, &wh, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "f16: {a} vs {b}");
            }
        }
    }

    #[test]
    fn linear_paths_agree() {
        let dev = Device::Cpu;
        let (n, k) = (48, 40);
        let w = Tensor::from_vec(data(n * k, 3), (n, k), &dev).unwrap();
        let b = Tensor::from_vec(data(n, 4), n, &dev).unwrap();
        let lin = Linear::from_weight(w.clone(), Some(b.clone()));
        for m in [1, 3, MATVEC_MAX_ROWS + 1] {
            let x = Tensor::from_vec(data(m * k, 5 + m as u64), (m, k), &dev).unwrap();
            let got: Vec<Vec<f32>> = lin.forward(&x).unwrap().to_vec2().unwrap();
            let want: Vec<Vec<f32>> = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4, "rows {m}: {g} vs {w}");
            }
        }
    }
}
