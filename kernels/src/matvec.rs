//! Dense matrix times a few rows: `x @ w^T` for an f32/bf16/f16 weight `w` (n, k) and
//! `m` f32 input rows, the product of batch-1 and small-batch decode. Decode is bound by
//! weight bytes per token, so each weight row is read once and dotted with every input
//! row while it is in L1, with f32 accumulation (AVX2, and F16C for f16 weights, on x86;
//! NEON on aarch64; chosen at run time). Weight rows are split across the rayon pool by [`par_weight_rows`],
//! which the engine also uses for its matvec over candle's quantized blocks.
//! [`matvec_slow`] is the plain reference the fast path is tested against.

use half::{bf16, f16};
use rayon::prelude::*;

/// A weight element the matvec kernel can widen to f32.
pub trait WeightElem: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// Dot product of an f32 row with a weight row (the shorter's length), accumulating
    /// in f32: [`WeightElem::dot_rows`] of one row.
    #[inline]
    fn dot(x: &[f32], w: &[Self]) -> f32 {
        let mut y = [0f32];
        Self::dot_rows(x, w, x.len().min(w.len()), &mut y);
        y[0]
    }

    /// `out[j] = x . w[j k..(j + 1) k]` for every `j < out.len()`: one task's weight rows
    /// against one input row, each type's AVX2 code on the x86 kernel levels and NEON code
    /// on `neon`, with the kernel level checked once per call rather than once per row.
    #[inline]
    fn dot_rows(x: &[f32], w: &[Self], k: usize, out: &mut [f32]) {
        dot_rows_portable(x, w, k, out)
    }
}

/// [`WeightElem::dot_rows`] in portable code (the `scalar` level).
#[inline]
fn dot_rows_portable<W: WeightElem>(x: &[f32], w: &[W], k: usize, out: &mut [f32]) {
    for (j, y) in out.iter_mut().enumerate() {
        *y = dot_body(&x[..k], &w[j * k..(j + 1) * k]);
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[inline]
    fn dot_rows(x: &[f32], w: &[Self], k: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::level().has_kernels() {
            // Safety: the avx2 and avx512 levels have AVX2 and FMA.
            return unsafe { dot_rows_f32_avx2(x, w, k, out) };
        }
        #[cfg(target_arch = "aarch64")]
        if crate::cpu::level().has_kernels() {
            // Safety: NEON is part of every aarch64 CPU.
            return unsafe { neon::dot_rows(x, w, k, out) };
        }
        dot_rows_portable(x, w, k, out)
    }
}

impl WeightElem for bf16 {
    /// bf16 is the top half of an f32: a shift, which vectorises.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[inline]
    fn dot_rows(x: &[f32], w: &[Self], k: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::level().has_kernels() {
            // Safety: the avx2 and avx512 levels have AVX2 and FMA.
            return unsafe { dot_rows_bf16_avx2(x, w, k, out) };
        }
        #[cfg(target_arch = "aarch64")]
        if crate::cpu::level().has_kernels() {
            // Safety: NEON is part of every aarch64 CPU.
            return unsafe { neon::dot_rows(x, w, k, out) };
        }
        dot_rows_portable(x, w, k, out)
    }
}

/// The body of the AVX2 dots: 8 weights widened by `$load(ptr)`, four accumulators
/// (32 weights per step) to hide the FMA latency, the tail in scalar code.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_avx2_body {
    ($x:expr, $w:expr, $load:expr) => {{
        use std::arch::x86_64::*;
        let (x, w) = ($x, $w);
        let k = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= k {
            for (j, a) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(off)), $load(wp.add(off)), *a);
            }
            i += 32;
        }
        while i + 8 <= k {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(wp.add(i)), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let mut total = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
        for j in i..k {
            total += x[j] * w[j].widen();
        }
        total
    }};
}

/// [`WeightElem::dot_rows`] on the AVX2 levels: `dot_avx2_body` row after row, inside
/// one function of the level's features.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_rows_avx2_body {
    ($x:expr, $w:expr, $k:expr, $out:expr, $load:expr) => {{
        let (x, w, k, out): (&[f32], &[_], usize, &mut [f32]) = ($x, $w, $k, $out);
        let x = &x[..k];
        for (r, y) in out.iter_mut().enumerate() {
            *y = dot_avx2_body!(x, &w[r * k..(r + 1) * k], $load);
        }
    }};
}

/// [`WeightElem::dot_rows`] of f32 weights with AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_f32_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    dot_rows_avx2_body!(x, w, k, out, |p: *const f32| _mm256_loadu_ps(p))
}

/// [`WeightElem::dot_rows`] of bf16 weights with AVX2 + FMA: 8 halves zero-extended to
/// 32 bits and shifted up.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_bf16_avx2(x: &[f32], w: &[bf16], k: usize, out: &mut [f32]) {
    dot_rows_avx2_body!(x, w, k, out, |p: *const half::bf16| {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    })
}

impl WeightElem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    fn dot_rows(x: &[f32], w: &[Self], k: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::level().has_kernels() {
            // Safety: the avx2 and avx512 levels have AVX2, FMA and F16C.
            return unsafe { dot_rows_f16_f16c(x, w, k, out) };
        }
        #[cfg(target_arch = "aarch64")]
        if crate::cpu::level().has_kernels() {
            // Safety: NEON is part of every aarch64 CPU.
            return unsafe { neon::dot_rows(x, w, k, out) };
        }
        dot_rows_portable(x, w, k, out)
    }
}

/// [`WeightElem::dot_rows`] of f16 weights: `vcvtph2ps` (F16C) widens 8 halves at once
/// (half's per-element conversion does not vectorise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_f16_f16c(x: &[f32], w: &[f16], k: usize, out: &mut [f32]) {
    dot_rows_avx2_body!(x, w, k, out, |p: *const half::f16| _mm256_cvtph_ps(
        _mm_loadu_si128(p as *const __m128i)
    ))
}

/// The `neon` level's weight loads and the matvec's dot (aarch64); the gemm's NEON
/// tiles (`crate::gemm`) load through the same [`neon::NeonLoad`].
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    use super::WeightElem;

    /// A weight element the NEON dot and gemm tiles load, 4 at a time, widened to f32.
    pub trait NeonLoad: WeightElem {
        /// Four weights at `p`, as f32.
        ///
        /// # Safety
        /// `p` is readable for 4 elements.
        unsafe fn load4(p: *const Self) -> float32x4_t;
    }

    impl NeonLoad for f32 {
        #[inline(always)]
        unsafe fn load4(p: *const Self) -> float32x4_t {
            vld1q_f32(p)
        }
    }

    impl NeonLoad for half::bf16 {
        #[inline(always)]
        unsafe fn load4(p: *const Self) -> float32x4_t {
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p as *const u16)))
        }
    }

    impl NeonLoad for half::f16 {
        #[inline(always)]
        unsafe fn load4(p: *const Self) -> float32x4_t {
            crate::packed::neon::widen_f16(vld1_u16(p as *const u16))
        }
    }

    /// [`WeightElem::dot_rows`] on the `neon` level: [`dot`] row after row inside one
    /// function of the level's features.
    ///
    /// # Safety
    /// None beyond the slices' (NEON is part of every aarch64 CPU).
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn dot_rows<W: NeonLoad>(x: &[f32], w: &[W], k: usize, out: &mut [f32]) {
        let x = &x[..k];
        for (r, y) in out.iter_mut().enumerate() {
            *y = dot(x, &w[r * k..(r + 1) * k]);
        }
    }

    /// `x . w` (the matvec's dot on the `neon` level): four 4-lane accumulators, 16 weights
    /// per step, the tail in scalar code.
    ///
    /// # Safety
    /// None beyond the slices' (NEON is part of every aarch64 CPU).
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn dot<W: NeonLoad>(x: &[f32], w: &[W]) -> f32 {
        let k = x.len().min(w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= k {
            for (j, a) in acc.iter_mut().enumerate() {
                let off = i + 4 * j;
                *a = vfmaq_f32(*a, vld1q_f32(xp.add(off)), W::load4(wp.add(off)));
            }
            i += 16;
        }
        while i + 4 <= k {
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(xp.add(i)), W::load4(wp.add(i)));
            i += 4;
        }
        let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut total = vaddvq_f32(sum);
        for j in i..k {
            total += x[j] * w[j].widen();
        }
        total
    }
}

/// Split the `n` weight rows into rayon tasks of [`ROWS_PER_TASK`]; `task(first, dst)`
/// fills `dst`, the (rows, m) results of weight rows `first..` (weight-row major, so
/// tasks own disjoint chunks), which are then laid out as `out`: (m, n). For m == 1 the
/// two layouts are the same and the tasks write into `out` directly.
pub fn par_weight_rows(
    out: &mut [f32],
    m: usize,
    n: usize,
    task: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    par_weight_rows_many(&mut [out], m, &[n], |_, first, dst| task(first, dst));
}

/// [`par_weight_rows`] for several matrices of the same input rows in one parallel loop
/// (a layer's q/k/v, or gate and up): matrix `i` has `ns[i]` weight rows and its results
/// go to `outs[i]`, (m, ns[i]); `task(i, first, dst)` fills one chunk of matrix `i`. One
/// loop instead of one per matrix: the pool's threads meet once, and the small matrices'
/// chunks balance the large ones'.
pub fn par_weight_rows_many(
    outs: &mut [&mut [f32]],
    m: usize,
    ns: &[usize],
    task: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    assert!(
        outs.len() == ns.len() && outs.iter().zip(ns).all(|(o, &n)| o.len() >= m * n),
        "par_weight_rows_many: an output is shorter than its (m, n)"
    );
    let mut scratch: Vec<Vec<f32>> = match m {
        1 => Vec::new(),
        _ => ns.iter().map(|&n| vec![0f32; n * m]).collect(),
    };
    // Nested parallel loops (matrices, then each one's chunks) rather than a list of
    // tasks: no allocation on the decode path, whose heap the planner's formula counts.
    let run = |i: usize, t: &mut [f32]| {
        t.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(c, dst)| task(i, c * ROWS_PER_TASK, dst))
    };
    if m == 1 {
        outs.par_iter_mut()
            .zip(ns)
            .enumerate()
            .for_each(|(i, (o, &n))| run(i, &mut o[..n]));
    } else {
        scratch
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, s)| run(i, s));
    }
    for ((out, s), &n) in outs.iter_mut().zip(&scratch).zip(ns) {
        for o in 0..n {
            for r in 0..m {
                out[r * n + o] = s[o * m + r];
            }
        }
    }
}

/// Weight rows per rayon task: enough work to amortise scheduling, enough tasks to
/// balance two to sixteen threads.
pub const ROWS_PER_TASK: usize = 32;

/// `out[r * n + o] = sum_i x[r * k + i] * w[o * k + i]` for `r < m`, `o < n`.
///
/// x: (m, k) f32 row-major; w: (n, k) row-major; out: (m, n). Each weight row is read
/// once from memory and dotted with all `m` input rows while it is in L1.
pub fn matvec<W: WeightElem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize, out: &mut [f32]) {
    matvec_many(x, m, &[(w, n)], k, &mut [out]);
}

/// [`matvec`] of the same rows `x` (m, k) with several weights at once: `ws[i]` is a
/// weight of `ws[i].1` rows of width `k`, and `outs[i]` gets its (m, ws[i].1) product.
/// One parallel loop covers every matrix ([`par_weight_rows_many`]).
pub fn matvec_many<W: WeightElem>(
    x: &[f32],
    m: usize,
    ws: &[(&[W], usize)],
    k: usize,
    outs: &mut [&mut [f32]],
) {
    assert!(
        x.len() >= m * k && ws.iter().all(|(w, n)| w.len() >= n * k),
        "matvec: an operand is shorter than its shape"
    );
    let ns: Vec<usize> = ws.iter().map(|&(_, n)| n).collect();
    par_weight_rows_many(outs, m, &ns, |i, first, dst| {
        let w = ws[i].0;
        if m == 1 {
            return W::dot_rows(x, &w[first * k..(first + dst.len()) * k], k, dst);
        }
        for (j, ys) in dst.chunks_mut(m).enumerate() {
            let o = first + j;
            let row = &w[o * k..(o + 1) * k];
            for (r, y) in ys.iter_mut().enumerate() {
                *y = W::dot(&x[r * k..(r + 1) * k], row);
            }
        }
    });
}

/// 32 independent lanes (the portable form; the compiler vectorises it as it can).
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

    /// Deterministic values in [-1, 1).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
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
            // NaN before each call: a cell the kernel skipped fails the comparison.
            let mut out = vec![f32::NAN; m * n];
            matvec(&x, m, &w, n, k, &mut out);
            let want = matvec_slow(&x, m, &w, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "f32 {m}x{n}x{k}: {a} vs {b}"
                );
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            out.fill(f32::NAN);
            matvec(&x, m, &wb, n, k, &mut out);
            let want = matvec_slow(&x, m, &wb, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "bf16: {a} vs {b}");
            }
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            out.fill(f32::NAN);
            matvec(&x, m, &wh, n, k, &mut out);
            let want = matvec_slow(&x, m, &wh, n, k);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "f16: {a} vs {b}");
            }
        }
    }

    /// A task's rows at once give what each row alone gives, bit for bit (the row
    /// offsets): odd and even row counts, widths with and without a 32-wide step, a
    /// tail, and none at all.
    #[test]
    fn dot_rows_equals_one_dot_per_row() {
        fn check<W: WeightElem + std::fmt::Debug>(w: &[W], x: &[f32], k: usize, what: &str) {
            for rows in [0, 1, 2, 3, 7] {
                let mut got = vec![f32::NAN; rows];
                W::dot_rows(x, w, k, &mut got);
                let want: Vec<f32> = (0..rows)
                    .map(|j| W::dot(&x[..k], &w[j * k..(j + 1) * k]))
                    .collect();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{what}: {rows} rows of {k}"
                );
            }
        }
        for k in [0, 1, 8, 31, 32, 67, 576] {
            let x = data(k + 3, 5);
            let w = data(7 * k, 6);
            check(&w, &x, k, "f32");
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            check(&wb, &x, k, "bf16");
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check(&wh, &x, k, "f16");
        }
    }

    /// Several matrices in one loop give each its own product, bit for bit (the same dot
    /// per output), at one and several rows, with matrices shorter than a task.
    #[test]
    fn matvec_many_equals_one_matvec_per_matrix() {
        let k = 67;
        let ns = [70, 5, 33, 96];
        for m in [1, 3] {
            let x = data(m * k, 7);
            let ws: Vec<Vec<f16>> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    data(n * k, 10 + i as u64)
                        .iter()
                        .map(|&v| f16::from_f32(v))
                        .collect()
                })
                .collect();
            let pairs: Vec<(&[f16], usize)> =
                ws.iter().zip(ns).map(|(w, n)| (w.as_slice(), n)).collect();
            let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matvec_many(&x, m, &pairs, k, &mut views);
            for ((w, n), got) in pairs.iter().zip(&outs) {
                let mut want = vec![0f32; m * n];
                matvec(&x, m, w, *n, k, &mut want);
                assert_eq!(got, &want, "m {m}, n {n}");
            }
        }
    }
}
