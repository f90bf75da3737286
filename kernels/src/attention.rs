//! Paged attention: each query attends over the first `context_len` tokens of its
//! sequence, whose K and V live in cache blocks listed by the sequence's block table.
//!
//! One kernel serves decode (one query per sequence, context = sequence length) and
//! prefill (one query per prompt token, context = its position + 1: causal), including
//! chunked prefill and prompts whose prefix is already cached: the new tokens' K/V must be
//! written with [`crate::reshape_and_cache`] first. Softmax runs block by block with a
//! running maximum (flash-attention style), so long contexts neither overflow nor
//! allocate anything the size of the context. Grouped-query attention: query head `h`
//! reads KV head `h / (num_heads / kv_heads)`; the heads of one group share each K/V read.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cache::CacheShape;
use crate::elem::check_units;
use crate::{check_len, CacheElem, CacheStore, KernelError};

/// Geometry and scale of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// Query heads (a multiple of `cache.kv_heads`).
    pub num_heads: usize,
    /// Score scale, usually 1 / sqrt(head_dim).
    pub scale: f32,
    pub cache: CacheShape,
    /// Columns of the flat block-table matrix.
    pub max_blocks_per_seq: usize,
}

/// Inputs that do not change per query, checked once.
pub(crate) struct Checked<'a> {
    pub block_tables: &'a [u32],
    pub query_seq: &'a [u32],
    pub context_lens: &'a [u32],
}

/// Element counts of the tensors a paged-attention call reads and writes (the CPU kernel
/// passes its slices' lengths, the CUDA kernel its buffers').
pub(crate) struct Lens {
    pub out: usize,
    pub query: usize,
    pub key_cache: usize,
    pub value_cache: usize,
}

/// Check every shape and index of a paged-attention call, so that the kernel (CPU or
/// CUDA) can index without bounds checks.
pub(crate) fn check(
    lens: Lens,
    checked: &Checked<'_>,
    p: &AttentionParams,
) -> Result<(), KernelError> {
    let c = p.cache;
    if c.kv_heads == 0 || p.num_heads % c.kv_heads != 0 {
        return Err(KernelError::Invalid(format!(
            "num_heads {} is not a multiple of kv_heads {}",
            p.num_heads, c.kv_heads
        )));
    }
    if c.block_size == 0 || p.max_blocks_per_seq == 0 {
        return Err(KernelError::Invalid(
            "block_size and max_blocks_per_seq must be positive".to_string(),
        ));
    }
    let queries = checked.query_seq.len();
    let row = p.num_heads * c.head_dim;
    check_len("query", lens.query, queries * row, || {
        format!("[{queries}, {}, {}]", p.num_heads, c.head_dim)
    })?;
    check_len("out", lens.out, queries * row, || {
        format!("[{queries}, {}, {}]", p.num_heads, c.head_dim)
    })?;
    check_len("context_lens", checked.context_lens.len(), queries, || {
        format!("[{queries}]")
    })?;
    check_len("key_cache", lens.key_cache, c.elems(), || c.describe())?;
    check_len("value_cache", lens.value_cache, c.elems(), || c.describe())?;
    if checked.block_tables.len() % p.max_blocks_per_seq != 0 {
        return Err(KernelError::Invalid(format!(
            "block_tables has {} entries, not a multiple of max_blocks_per_seq {}",
            checked.block_tables.len(),
            p.max_blocks_per_seq
        )));
    }
    let seqs = checked.block_tables.len() / p.max_blocks_per_seq;
    for (q, (&seq, &len)) in checked
        .query_seq
        .iter()
        .zip(checked.context_lens)
        .enumerate()
    {
        let seq = seq as usize;
        if seq >= seqs {
            return Err(KernelError::Invalid(format!(
                "query_seq[{q}] = {seq} but block_tables has {seqs} rows"
            )));
        }
        let blocks = (len as usize).div_ceil(c.block_size);
        if len == 0 || blocks > p.max_blocks_per_seq {
            return Err(KernelError::Invalid(format!(
                "context_lens[{q}] = {len} must be in 1..={}",
                p.max_blocks_per_seq * c.block_size
            )));
        }
        let table = &checked.block_tables[seq * p.max_blocks_per_seq..][..blocks];
        if let Some(b) = table.iter().find(|b| **b as usize >= c.num_blocks) {
            return Err(KernelError::Invalid(format!(
                "block_tables row {seq} names block {b}; the cache has {}",
                c.num_blocks
            )));
        }
    }
    Ok(())
}

/// `q . k` with four independent 8-lane accumulators (so the additions of one dot do
/// not wait on each other) and fused multiply-adds where the CPU has them.
#[inline(always)]
fn dot<T: CacheElem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    let (qc, kc) = (q.chunks_exact(32), k.chunks_exact(32));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for (j, acc) in acc.iter_mut().enumerate() {
            for i in 0..8 {
                acc[i] = a[8 * j + i].mul_add(b[8 * j + i].to_f32(), acc[i]);
            }
        }
    }
    let mut sum = 0f32;
    for (a, b) in qr.iter().zip(kr) {
        sum = a.mul_add(b.to_f32(), sum);
    }
    let mut lanes = [0f32; 8];
    for acc in &acc {
        for i in 0..8 {
            lanes[i] += acc[i];
        }
    }
    lanes.iter().sum::<f32>() + sum
}

/// `s[t] = scale * q . k_t` for the `s.len()` keys of one block, key `t` at
/// `rows[t * stride..][..q.len()]`; through AVX2/FMA/F16C intrinsics when `simd` (the
/// caller checked the CPU), eight keys at a time.
#[inline(always)]
fn scores_dispatch<T: CacheElem>(
    q: &[f32],
    rows: &[T],
    stride: usize,
    scale: f32,
    s: &mut [f32],
    simd: bool,
) {
    let hd = q.len();
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU has AVX2, FMA and F16C; every row read
        // lies inside `rows` (the caller slices it to the last key's end).
        unsafe { simd::scores(q, rows, stride, scale, s) };
        return;
    }
    let _ = simd;
    for (t, s) in s.iter_mut().enumerate() {
        *s = dot(q, &rows[t * stride..][..hd]) * scale;
    }
}

/// `acc += sum_t w[t] * v_t` over the values of one block, value `t` at
/// `rows[t * stride..][..acc.len()]` (as [`scores_dispatch`]).
#[inline(always)]
fn weighted_sum_dispatch<T: CacheElem>(
    acc: &mut [f32],
    w: &[f32],
    rows: &[T],
    stride: usize,
    simd: bool,
) {
    let hd = acc.len();
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `scores_dispatch`.
        unsafe { simd::weighted_sum(acc, w, rows, stride) };
        return;
    }
    let _ = simd;
    for (t, &wt) in w.iter().enumerate() {
        for (a, v) in acc.iter_mut().zip(&rows[t * stride..][..hd]) {
            *a = wt.mul_add(v.to_f32(), *a);
        }
    }
}

/// Single elements: the inner loops above, element by element.
impl<T: CacheElem> CacheStore for T {
    const NAME: &'static str = <T as CacheElem>::NAME;
    const ELEMS: usize = 1;

    fn store(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = T::from_f32(*s);
        }
    }

    fn load(row: &[Self], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(row) {
            *o = v.to_f32();
        }
    }

    #[inline(always)]
    fn scores(q: &[f32], rows: &[Self], stride: usize, scale: f32, s: &mut [f32], simd: bool) {
        scores_dispatch(q, rows, stride, scale, s, simd)
    }

    #[inline(always)]
    fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize, simd: bool) {
        weighted_sum_dispatch(acc, w, rows, stride, simd)
    }

    #[inline(always)]
    fn scores_rows(
        q: &[f32],
        nq: usize,
        rows: &[Self],
        stride: usize,
        scale: f32,
        s: &mut [f32],
        simd: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let (hd, n) = (q.len() / nq, s.len() / nq);
            if simd && hd % 8 == 0 && n > 0 {
                // SAFETY: `simd` is true only when the CPU has AVX2, FMA and F16C; `q`
                // holds `nq` rows of `hd`, `s` `nq` rows of `n`, and every key read lies
                // inside `rows` (the caller slices it to the last key's end).
                unsafe { simd::scores_rows(q, nq, hd, rows, stride, scale, s, n) };
                return;
            }
        }
        crate::elem::scores_by_row(q, nq, rows, stride, scale, s, simd)
    }

    #[inline(always)]
    fn weighted_sum_rows(
        acc: &mut [f32],
        nq: usize,
        w: &[f32],
        rows: &[Self],
        stride: usize,
        simd: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let (hd, n) = (acc.len() / nq, w.len() / nq);
            if simd && hd % 8 == 0 && n > 0 {
                // SAFETY: as in `scores_rows`; `acc` holds `nq` rows of `hd`, `w` `nq` of
                // `n`.
                unsafe { simd::weighted_sum_rows(acc, nq, hd, w, n, rows, stride) };
                return;
            }
        }
        crate::elem::weighted_sum_by_row(acc, nq, w, rows, stride, simd)
    }
}

/// AVX2 + FMA + F16C forms of the two inner loops, for every cache element type.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use crate::elem::{CacheElem, ElemKind};

    /// Eight cache elements at `p`, widened to f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<T: CacheElem>(p: *const T) -> __m256 {
        match T::KIND {
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            )),
        }
    }

    /// Eight dots of `q` at once (keys `t0..t0 + 8`), summed across lanes by a
    /// horizontal-add tree; `q.len()` a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot8<T: CacheElem>(q: &[f32], k: *const T, stride: usize) -> __m256 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < q.len() {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, load8(k.add(j * stride + i)), *a);
            }
            i += 8;
        }
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h45 = _mm256_hadd_ps(acc[4], acc[5]);
        let h67 = _mm256_hadd_ps(acc[6], acc[7]);
        let h0123 = _mm256_hadd_ps(h01, h23);
        let h4567 = _mm256_hadd_ps(h45, h67);
        _mm256_add_ps(
            _mm256_permute2f128_ps(h0123, h4567, 0x20),
            _mm256_permute2f128_ps(h0123, h4567, 0x31),
        )
    }

    /// One dot, four accumulators.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot1<T: CacheElem>(q: &[f32], k: *const T) -> f32 {
        let n = q.len();
        let qp = q.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(off)), load8(k.add(off)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8(k.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        let mut total = _mm_cvtss_f32(h);
        while i < n {
            total = q[i].mul_add((*k.add(i)).to_f32(), total);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn scores<T: CacheElem>(
        q: &[f32],
        rows: &[T],
        stride: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        let k = rows.as_ptr();
        let n = s.len();
        let mut t = 0;
        if q.len() % 8 == 0 {
            let sv = _mm256_set1_ps(scale);
            while t + 8 <= n {
                let d = dot8(q, k.add(t * stride), stride);
                _mm256_storeu_ps(s.as_mut_ptr().add(t), _mm256_mul_ps(d, sv));
                t += 8;
            }
        }
        while t < n {
            s[t] = dot1(q, k.add(t * stride)) * scale;
            t += 1;
        }
    }

    /// `acc += sum_t w[t] * v_t`, 64 (then 8) columns of `acc` held in registers while
    /// the block's values stream past.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn weighted_sum<T: CacheElem>(
        acc: &mut [f32],
        w: &[f32],
        rows: &[T],
        stride: usize,
    ) {
        let hd = acc.len();
        let (ap, vp) = (acc.as_mut_ptr(), rows.as_ptr());
        let mut i = 0;
        while i + 64 <= hd {
            let mut r = [_mm256_setzero_ps(); 8];
            for (j, r) in r.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(ap.add(i + 8 * j));
            }
            for (t, &wt) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(wt);
                for (j, r) in r.iter_mut().enumerate() {
                    *r = _mm256_fmadd_ps(wv, load8(vp.add(t * stride + i + 8 * j)), *r);
                }
            }
            for (j, r) in r.iter().enumerate() {
                _mm256_storeu_ps(ap.add(i + 8 * j), *r);
            }
            i += 64;
        }
        while i + 8 <= hd {
            let mut r = _mm256_loadu_ps(ap.add(i));
            for (t, &wt) in w.iter().enumerate() {
                r = _mm256_fmadd_ps(_mm256_set1_ps(wt), load8(vp.add(t * stride + i)), r);
            }
            _mm256_storeu_ps(ap.add(i), r);
            i += 8;
        }
        while i < hd {
            for (t, &wt) in w.iter().enumerate() {
                acc[i] = wt.mul_add((*vp.add(t * stride + i)).to_f32(), acc[i]);
            }
            i += 1;
        }
    }

    /// Query rows `0..TR` (at `q`, `hd` apart) against keys `0..TK` (at `k`, `stride`
    /// apart): `s[r * n + t] = scale * q_r . k_t`. Each key's vector is loaded (and
    /// widened) once per 8 columns and meets every row's, so `TR x TK` accumulators (12
    /// at most: with `TR` query and one key vector, 16 registers) take `TR + TK` loads
    /// per `TR * TK` multiply-adds; each row's `TK` sums come out of one horizontal-add
    /// tree.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_tile<T: CacheElem, const TR: usize, const TK: usize>(
        q: *const f32,
        hd: usize,
        k: *const T,
        stride: usize,
        scale: f32,
        s: *mut f32,
        n: usize,
    ) {
        let zero = _mm256_setzero_ps();
        let mut acc = [[zero; TK]; TR];
        let mut i = 0;
        while i < hd {
            let mut qv = [zero; TR];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(q.add(r * hd + i));
            }
            for t in 0..TK {
                let kv = load8(k.add(t * stride + i));
                for (row, &qr) in acc.iter_mut().zip(&qv) {
                    row[t] = _mm256_fmadd_ps(qr, kv, row[t]);
                }
            }
            i += 8;
        }
        let sv = _mm_set1_ps(scale);
        for (r, a) in acc.iter().enumerate() {
            let lane = |t: usize| if t < TK { a[t] } else { zero };
            // [a0 a1 a2 a3] per 128-bit half, then the halves added.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(lane(0), lane(1)),
                _mm256_hadd_ps(lane(2), lane(3)),
            );
            let sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let sum = _mm_mul_ps(sum, sv);
            if TK == 4 {
                _mm_storeu_ps(s.add(r * n), sum);
            } else {
                let mut lanes = [0f32; 4];
                _mm_storeu_ps(lanes.as_mut_ptr(), sum);
                for (t, &v) in lanes.iter().take(TK).enumerate() {
                    *s.add(r * n + t) = v;
                }
            }
        }
    }

    /// Rows `0..TR` of the query tile against all `n` keys, four at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_band<T: CacheElem, const TR: usize>(
        q: *const f32,
        hd: usize,
        k: *const T,
        stride: usize,
        scale: f32,
        s: *mut f32,
        n: usize,
    ) {
        let mut t = 0;
        while t + 4 <= n {
            score_tile::<T, TR, 4>(q, hd, k.add(t * stride), stride, scale, s.add(t), n);
            t += 4;
        }
        let (k, s) = (k.add(t * stride), s.add(t));
        match n - t {
            0 => {}
            1 => score_tile::<T, TR, 1>(q, hd, k, stride, scale, s, n),
            2 => score_tile::<T, TR, 2>(q, hd, k, stride, scale, s, n),
            _ => score_tile::<T, TR, 3>(q, hd, k, stride, scale, s, n),
        }
    }

    /// `s[r * n + t] = scale * q_r . k_t` for `nq` query rows of `hd` (a multiple of 8)
    /// and `n` keys, in tiles of 3 rows by 4 keys.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_rows<T: CacheElem>(
        q: &[f32],
        nq: usize,
        hd: usize,
        rows: &[T],
        stride: usize,
        scale: f32,
        s: &mut [f32],
        n: usize,
    ) {
        let (k, qp, sp) = (rows.as_ptr(), q.as_ptr(), s.as_mut_ptr());
        let mut r = 0;
        while r + 3 <= nq {
            score_band::<T, 3>(qp.add(r * hd), hd, k, stride, scale, sp.add(r * n), n);
            r += 3;
        }
        let (qp, sp) = (qp.add(r * hd), sp.add(r * n));
        match nq - r {
            0 => {}
            1 => score_band::<T, 1>(qp, hd, k, stride, scale, sp, n),
            _ => score_band::<T, 2>(qp, hd, k, stride, scale, sp, n),
        }
    }

    /// Rows `0..TR` of `acc` (`hd` apart), columns `0..8 * D`: `acc_r += sum_t w[r * n +
    /// t] * v_t` over `n` values (at `v`, `stride` apart). The accumulators stay in
    /// registers while the values pass; each value vector is loaded (and widened) once
    /// for all `TR` rows (12 accumulators, 2 value vectors and a broadcast weight at
    /// most: 15 registers).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sum_tile<T: CacheElem, const TR: usize, const D: usize>(
        acc: *mut f32,
        hd: usize,
        w: *const f32,
        n: usize,
        v: *const T,
        stride: usize,
    ) {
        let mut a = [[_mm256_setzero_ps(); D]; TR];
        for (r, row) in a.iter_mut().enumerate() {
            for (d, x) in row.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(r * hd + 8 * d));
            }
        }
        for t in 0..n {
            let mut vv = [_mm256_setzero_ps(); D];
            for (d, x) in vv.iter_mut().enumerate() {
                *x = load8(v.add(t * stride + 8 * d));
            }
            for (r, row) in a.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*w.add(r * n + t));
                for (x, &vd) in row.iter_mut().zip(&vv) {
                    *x = _mm256_fmadd_ps(b, vd, *x);
                }
            }
        }
        for (r, row) in a.iter().enumerate() {
            for (d, x) in row.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * hd + 8 * d), *x);
            }
        }
    }

    /// Every row of `acc`, columns `0..8 * D`, in tiles of 6 rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sum_columns<T: CacheElem, const D: usize>(
        acc: *mut f32,
        nq: usize,
        hd: usize,
        w: *const f32,
        n: usize,
        v: *const T,
        stride: usize,
    ) {
        let mut r = 0;
        while r + 6 <= nq {
            sum_tile::<T, 6, D>(acc.add(r * hd), hd, w.add(r * n), n, v, stride);
            r += 6;
        }
        let (acc, w) = (acc.add(r * hd), w.add(r * n));
        match nq - r {
            0 => {}
            1 => sum_tile::<T, 1, D>(acc, hd, w, n, v, stride),
            2 => sum_tile::<T, 2, D>(acc, hd, w, n, v, stride),
            3 => sum_tile::<T, 3, D>(acc, hd, w, n, v, stride),
            4 => sum_tile::<T, 4, D>(acc, hd, w, n, v, stride),
            _ => sum_tile::<T, 5, D>(acc, hd, w, n, v, stride),
        }
    }

    /// `acc_r += sum_t w[r * n + t] * v_t` for `nq` rows of `hd` (a multiple of 8) and
    /// `n` values: 16 columns at a time, then 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn weighted_sum_rows<T: CacheElem>(
        acc: &mut [f32],
        nq: usize,
        hd: usize,
        w: &[f32],
        n: usize,
        rows: &[T],
        stride: usize,
    ) {
        let (ap, wp, vp) = (acc.as_mut_ptr(), w.as_ptr(), rows.as_ptr());
        let mut c = 0;
        while c + 16 <= hd {
            sum_columns::<T, 2>(ap.add(c), nq, hd, wp, n, vp.add(c), stride);
            c += 16;
        }
        if c < hd {
            sum_columns::<T, 1>(ap.add(c), nq, hd, wp, n, vp.add(c), stride);
        }
    }
}

/// `out[q] = softmax(scale * query[q] . K[0..len]) V[0..len]` per head.
///
/// - `out`, `query`: `[num_queries, num_heads, head_dim]`, f32
/// - `key_cache`, `value_cache`: `[num_blocks, block_size, kv_heads, head_dim]` values,
///   in units of `T` (one value each, or blocks of 32 for [`crate::BlockQ8`] and
///   [`crate::BlockQ4`])
/// - `block_tables`: `[num_seqs, max_blocks_per_seq]`, block ids (unused tail ignored)
/// - `query_seq`: `[num_queries]`, the block-table row of each query
/// - `context_lens`: `[num_queries]`, tokens each query attends to (at least 1)
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: CacheStore>(
    out: &mut [f32],
    query: &[f32],
    key_cache: &[T],
    value_cache: &[T],
    block_tables: &[u32],
    query_seq: &[u32],
    context_lens: &[u32],
    p: &AttentionParams,
) -> Result<(), KernelError> {
    let checked = Checked {
        block_tables,
        query_seq,
        context_lens,
    };
    check_units::<T>(&p.cache)?;
    let lens = Lens {
        out: out.len(),
        query: query.len(),
        key_cache: key_cache.len().saturating_mul(T::ELEMS),
        value_cache: value_cache.len().saturating_mul(T::ELEMS),
    };
    check(lens, &checked, p)?;
    let group = p.num_heads / p.cache.kv_heads;
    let simd = simd_available();
    // One task per (tile of consecutive queries of one sequence, KV head): the tile's
    // query heads of that KV head share each K/V read.
    let per_tile = (TILE_ROWS / group).clamp(1, TILE_QUERIES);
    let tiles = query_tiles(checked.query_seq, checked.context_lens, per_tile);
    let kv_heads = p.cache.kv_heads;
    // Too few tasks for the pool (one decode query: one per KV head, 3 tasks on 2
    // threads for SmolLM2, a 2:1 split): one task per query head instead, each reading its
    // KV head's keys and values itself.
    let split = if tiles.len() * kv_heads < 2 * rayon::current_num_threads() {
        group
    } else {
        1
    };
    let per_kv = kv_heads * split;
    let dst = SharedOut(out.as_mut_ptr());
    (0..tiles.len() * per_kv).into_par_iter().for_each(|task| {
        let (q0, nq) = tiles[task / per_kv];
        let (kvh, part) = ((task % per_kv) / split, task % split);
        let heads = group / split;
        let io = TaskIo {
            out: &dst,
            query,
            key_cache,
            value_cache,
            checked: &checked,
        };
        let tile = Tile {
            q0,
            nq,
            kvh,
            h0: part * heads,
            heads,
        };
        // SAFETY: the task writes only the rows of its tile's queries and its KV head's
        // query heads, which no other task writes, and `out` (checked to hold every
        // query's heads) outlives the parallel loop.
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: also, the CPU has AVX2, FMA and F16C (checked by `simd_available`).
            unsafe { attend_avx2(tile, io, p) };
            return;
        }
        let _ = simd;
        unsafe { attend(tile, io, p, false) };
    });
    Ok(())
}

/// Queries per tile at most.
const TILE_QUERIES: usize = 8;
/// Query rows (heads of one KV head over a tile's queries) a tile aims at: 15 for 3 heads
/// per KV head (5 queries), 16 for 1, 2, 4 or 8.
const TILE_ROWS: usize = 16;

/// Consecutive queries of one sequence in tiles of at most `per`, as (first query,
/// count). A tile's queries walk the blocks up to its longest context, and each masks
/// the keys past its own; so a tile also ends at a query whose context differs from the
/// tile's first or last by more than `per` tokens (queries that are not consecutive
/// tokens), where the walk would be mostly masked.
fn query_tiles(query_seq: &[u32], context_lens: &[u32], per: usize) -> Vec<(usize, usize)> {
    let mut tiles: Vec<(usize, usize)> = Vec::with_capacity(query_seq.len().div_ceil(per));
    for (qi, (&seq, &len)) in query_seq.iter().zip(context_lens).enumerate() {
        if let Some((q0, nq)) = tiles.last_mut() {
            let (first, last) = (context_lens[*q0], context_lens[*q0 + *nq - 1]);
            let near = |a: u32| a.abs_diff(len) <= per as u32;
            if *nq < per && query_seq[*q0] == seq && near(first) && near(last) {
                *nq += 1;
                continue;
            }
        }
        tiles.push((qi, 1));
    }
    tiles
}

/// The attention output, written by the parallel tasks into disjoint rows.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint rows (see `paged_attention`).
unsafe impl Sync for SharedOut {}

/// Whether [`attend`] can run its AVX2 + FMA + F16C form on this CPU (chosen at run
/// time, so one binary runs everywhere; the portable build of the loops is SSE2-only).
fn simd_available() -> bool {
    #[cfg(test)]
    if tests::PORTABLE.with(|p| p.get()) {
        return false;
    }
    cfg!(target_arch = "x86_64") && crate::cpu::level().has_kernels()
}

/// What one attention task reads and writes.
struct TaskIo<'a, T> {
    out: &'a SharedOut,
    query: &'a [f32],
    key_cache: &'a [T],
    value_cache: &'a [T],
    checked: &'a Checked<'a>,
}

/// One task's queries (`q0..q0 + nq`, of one sequence), KV head, and that KV head's
/// query heads `h0..h0 + heads` (of its group).
#[derive(Clone, Copy)]
struct Tile {
    q0: usize,
    nq: usize,
    kvh: usize,
    h0: usize,
    heads: usize,
}

/// # Safety
/// As [`attend`], and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: CacheStore>(tile: Tile, io: TaskIo<'_, T>, p: &AttentionParams) {
    attend(tile, io, p, true)
}

/// One tile: its queries' heads `h0..h0 + heads` of one KV head (`rows` = queries x heads)
/// over the blocks up to the longest context among them, block by block with a running
/// maximum per row; keys past a row's own context weigh zero.
///
/// # Safety
/// The inputs passed [`check`]; no other task writes this tile's rows of the output.
#[inline(always)]
unsafe fn attend<T: CacheStore>(tile: Tile, io: TaskIo<'_, T>, p: &AttentionParams, simd: bool) {
    let c = p.cache;
    let (hd, bs) = (c.head_dim, c.block_size);
    let group = p.num_heads / c.kv_heads;
    // Strides and offsets in units of `T` (`head_dim` is a multiple of T::ELEMS).
    let (token_units, hd_units) = (c.token_elems() / T::ELEMS, hd / T::ELEMS);
    let TaskIo {
        out,
        query,
        key_cache,
        value_cache,
        checked,
    } = io;
    let Tile {
        q0,
        nq,
        kvh,
        h0,
        heads,
    } = tile;
    // The tile's first query head, and its rows: `heads` per query.
    let first = kvh * group + h0;
    let rows = nq * heads;
    let lens = &checked.context_lens[q0..q0 + nq];
    let longest = lens.iter().copied().max().unwrap_or(0) as usize;
    let table = &checked.block_tables[checked.query_seq[q0] as usize * p.max_blocks_per_seq..];
    // Rows of the tile's queries (gathered), their accumulators and scores, max and
    // denominator.
    let need = 2 * rows * hd + rows * bs + 2 * rows;
    let mut scratch = Scratch::new(need);
    let state = scratch.slice(need);
    let (q, rest) = state.split_at_mut(rows * hd);
    let (acc, rest) = rest.split_at_mut(rows * hd);
    let (scores, rest) = rest.split_at_mut(rows * bs);
    let (max, denom) = rest.split_at_mut(rows);
    for (i, qr) in q.chunks_exact_mut(heads * hd).enumerate() {
        qr.copy_from_slice(&query[((q0 + i) * p.num_heads + first) * hd..][..heads * hd]);
    }
    acc.fill(0.0);
    denom.fill(0.0);
    max.fill(f32::NEG_INFINITY);
    for (b, &block) in table[..longest.div_ceil(bs)].iter().enumerate() {
        let n = (longest - b * bs).min(bs);
        let base = block as usize * bs * token_units + kvh * hd_units;
        let end = base + (n - 1) * token_units + hd_units;
        let s = &mut scores[..rows * n];
        T::scores_rows(
            q,
            rows,
            &key_cache[base..end],
            token_units,
            p.scale,
            s,
            simd,
        );
        for (r, s) in s.chunks_exact_mut(n).enumerate() {
            // The keys of this block inside row r's context.
            let valid = (lens[r / heads] as usize).saturating_sub(b * bs).min(n);
            let (live, masked) = s.split_at_mut(valid);
            masked.fill(0.0);
            if valid == 0 {
                continue;
            }
            // Rescale what was accumulated when the running max grows.
            let new_max = max[r].max(max_of(live));
            let correction = (max[r] - new_max).exp();
            max[r] = new_max;
            if correction != 1.0 {
                acc[r * hd..][..hd]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
            live.iter_mut().for_each(|x| *x -= new_max);
            exp_in_place(live);
            denom[r] = denom[r] * correction + sum_of(live);
        }
        T::weighted_sum_rows(acc, rows, s, &value_cache[base..end], token_units, simd);
    }
    for (r, a) in acc.chunks_exact(hd).enumerate() {
        let (qi, g) = (q0 + r / heads, r % heads);
        let inv = 1.0 / denom[r];
        // SAFETY: (caller) the row lies inside `out` and only this task writes it.
        let dst =
            std::slice::from_raw_parts_mut(out.0.add((qi * p.num_heads + first + g) * hd), hd);
        for (d, a) in dst.iter_mut().zip(a) {
            *d = a * inv;
        }
    }
}

/// A task's scratch floats: on the stack for the usual shapes (a decode tile in 512, a
/// prefill tile or a decode over a contiguous cache's one block of up to ~1200 tokens in
/// 4096), else on the heap. Only the floats a task asks for are cleared, not all 16 KiB
/// of the large variant for every KV head of every layer (in a one-thread profile of a
/// Q4_0 decode step at 128 tokens of context, `memset` fell from 1.20% to 0.96% of the
/// samples). Not a closure over a stack array: a closure would not inherit the caller's
/// AVX2 target features.
#[allow(clippy::large_enum_variant)] // a stack buffer, by design
enum Scratch {
    Small([MaybeUninit<f32>; 512]),
    Large([MaybeUninit<f32>; 4096]),
    Heap(Vec<f32>),
}

impl Scratch {
    #[inline(always)]
    fn new(need: usize) -> Self {
        if need <= 512 {
            Scratch::Small([MaybeUninit::uninit(); 512])
        } else if need <= 4096 {
            Scratch::Large([MaybeUninit::uninit(); 4096])
        } else {
            Scratch::Heap(vec![0f32; need])
        }
    }

    /// The first `need` floats (at most what [`Scratch::new`] was given), zeroed.
    #[inline(always)]
    fn slice(&mut self, need: usize) -> &mut [f32] {
        let part = match self {
            Scratch::Small(a) => &mut a[..need],
            Scratch::Large(a) => &mut a[..need],
            Scratch::Heap(v) => return &mut v[..need],
        };
        for x in part.iter_mut() {
            x.write(0.0);
        }
        // SAFETY: every element of `part` was written just above, and `MaybeUninit<f32>`
        // has the layout of `f32`.
        unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
    }
}

/// The largest of `xs`, in eight independent lanes.
#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    rest.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `xs`, in eight independent lanes.
#[inline(always)]
fn sum_of(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    rest.iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// `x = exp(x)` for `x <= 0` (softmax weights after the maximum is subtracted), see
/// [`crate::ops::exp_nonpos`].
#[inline(always)]
fn exp_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = crate::ops::exp_nonpos(*x);
    }
}

/// The slow reference: gather each query's keys and values into contiguous rows, then
/// softmax(q K^T * scale) V in f64 with the maximum subtracted.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference<T: CacheStore>(
    query: &[f32],
    key_cache: &[T],
    value_cache: &[T],
    block_tables: &[u32],
    query_seq: &[u32],
    context_lens: &[u32],
    p: &AttentionParams,
) -> Vec<f32> {
    let c = p.cache;
    let hd = c.head_dim;
    let group = p.num_heads / c.kv_heads;
    let mut out = vec![0f32; query.len()];
    for (qi, (&seq, &len)) in query_seq.iter().zip(context_lens).enumerate() {
        let table = &block_tables[seq as usize * p.max_blocks_per_seq..];
        for h in 0..p.num_heads {
            let kvh = h / group;
            let gather = |cache: &[T], t: usize| -> Vec<f64> {
                let block = table[t / c.block_size] as usize;
                let slot = block * c.block_size + t % c.block_size;
                let mut row = vec![0f32; hd];
                let units = hd / T::ELEMS;
                T::load(
                    &cache[(slot * c.kv_heads + kvh) * units..][..units],
                    &mut row,
                );
                row.into_iter().map(f64::from).collect()
            };
            let q = &query[(qi * p.num_heads + h) * hd..][..hd];
            let scores: Vec<f64> = (0..len as usize)
                .map(|t| {
                    let k = gather(key_cache, t);
                    q.iter().zip(&k).map(|(a, b)| *a as f64 * b).sum::<f64>() * p.scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (t, w) in weights.iter().enumerate() {
                let v = gather(value_cache, t);
                for d in 0..hd {
                    out[(qi * p.num_heads + h) * hd + d] += (w / total * v[d]) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::Rng;
    use half::{bf16, f16};

    thread_local! {
        /// Set by a test to run the portable form of the kernel on this thread's calls.
        pub(crate) static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    struct Case {
        block_size: usize,
        num_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        seq_lens: Vec<usize>,
        /// Queries per sequence (1 = decode; more = the last tokens of a prefill chunk).
        queries_per_seq: usize,
        scale_up: f32,
    }

    fn run<T: CacheStore>(case: &Case, seed: u64, tol: f32) {
        let mut rng = Rng::new(seed);
        let max_blocks = case
            .seq_lens
            .iter()
            .map(|l| l.div_ceil(case.block_size))
            .max()
            .unwrap();
        // An odd number of blocks, more than needed, handed out in shuffled order.
        let needed: usize = case
            .seq_lens
            .iter()
            .map(|l| l.div_ceil(case.block_size))
            .sum();
        let num_blocks = needed + 3 + (needed % 2);
        let shape = CacheShape {
            num_blocks,
            block_size: case.block_size,
            kv_heads: case.kv_heads,
            head_dim: case.head_dim,
        };
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut tables = vec![0u32; case.seq_lens.len() * max_blocks];
        let mut next = 0;
        for (s, len) in case.seq_lens.iter().enumerate() {
            for b in 0..len.div_ceil(case.block_size) {
                tables[s * max_blocks + b] = ids[next];
                next += 1;
            }
        }
        let mut store = |scale: f32| {
            let values: Vec<f32> = (0..shape.elems()).map(|_| rng.uniform() * scale).collect();
            let mut cache = vec![T::default(); shape.elems() / T::ELEMS];
            T::store(&values, &mut cache);
            cache
        };
        let kc = store(case.scale_up);
        let vc = store(1.0);
        let (mut query_seq, mut context_lens) = (Vec::new(), Vec::new());
        for (s, &len) in case.seq_lens.iter().enumerate() {
            for i in (0..case.queries_per_seq.min(len)).rev() {
                query_seq.push(s as u32);
                context_lens.push((len - i) as u32);
            }
        }
        let row = case.num_heads * case.head_dim;
        let query: Vec<f32> = (0..query_seq.len() * row)
            .map(|_| rng.uniform() * case.scale_up)
            .collect();
        let p = AttentionParams {
            num_heads: case.num_heads,
            scale: 1.0 / (case.head_dim as f32).sqrt(),
            cache: shape,
            max_blocks_per_seq: max_blocks,
        };
        let expected =
            paged_attention_reference(&query, &kc, &vc, &tables, &query_seq, &context_lens, &p);
        // Both forms of the kernel: the SIMD one (where the CPU has it) and the portable.
        for portable in [false, true] {
            PORTABLE.with(|f| f.set(portable));
            let mut out = vec![f32::NAN; query.len()];
            paged_attention(
                &mut out,
                &query,
                &kc,
                &vc,
                &tables,
                &query_seq,
                &context_lens,
                &p,
            )
            .unwrap();
            PORTABLE.with(|f| f.set(false));
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    a.is_finite() && (a - b).abs() <= tol,
                    "{} bs {} portable {portable} element {i}: {a} vs {b}",
                    T::NAME,
                    case.block_size
                );
            }
        }
    }

    fn cases() -> Vec<Case> {
        let mut v = Vec::new();
        for block_size in [1, 16, 32] {
            v.push(Case {
                block_size,
                num_heads: 9,
                kv_heads: 3,
                head_dim: 64,
                seq_lens: vec![1, 17, 33, 5, 64, 100],
                queries_per_seq: 1,
                scale_up: 1.0,
            });
            v.push(Case {
                block_size,
                num_heads: 4,
                kv_heads: 4,
                head_dim: 12,
                seq_lens: vec![40, 3, 31],
                queries_per_seq: 7,
                scale_up: 1.0,
            });
            // 80 = 64 + 8 + 8: every column path of the SIMD weighted sum.
            v.push(Case {
                block_size,
                num_heads: 2,
                kv_heads: 1,
                head_dim: 80,
                seq_lens: vec![9, 26],
                queries_per_seq: 3,
                scale_up: 1.0,
            });
            // Prefill: tiles of 5 queries x 3 heads (rows in tiles of 3 for the scores,
            // 6, 6 and 3 for the weighted sum), contexts that end inside a block.
            v.push(Case {
                block_size,
                num_heads: 9,
                kv_heads: 3,
                head_dim: 64,
                seq_lens: vec![40, 7, 101],
                queries_per_seq: 37,
                scale_up: 1.0,
            });
            // One decode query: 3 tasks (one per KV head) are fewer than twice a pool of
            // two threads, so a task per query head (with a pool of one, per KV head).
            v.push(Case {
                block_size,
                num_heads: 9,
                kv_heads: 3,
                head_dim: 64,
                seq_lens: vec![77],
                queries_per_seq: 1,
                scale_up: 1.0,
            });
            // 40 = 16 + 16 + 8 columns; tiles of 4 queries x 4 heads, 16 rows.
            v.push(Case {
                block_size,
                num_heads: 8,
                kv_heads: 2,
                head_dim: 40,
                seq_lens: vec![20, 50, 3],
                queries_per_seq: 9,
                scale_up: 1.0,
            });
        }
        v
    }

    /// A decode query's heads split into a task each (a pool of four threads) give the
    /// bits of one task per KV head (a pool of one): each row's arithmetic does not
    /// depend on the rows beside it in a tile.
    #[test]
    fn per_head_tasks_give_the_per_kv_head_bits() {
        let shape = CacheShape {
            num_blocks: 6,
            block_size: 16,
            kv_heads: 3,
            head_dim: 64,
        };
        let mut rng = Rng::new(5);
        let mut cache = || -> Vec<f16> {
            (0..shape.elems())
                .map(|_| f16::from_f32(rng.uniform()))
                .collect()
        };
        let (kc, vc) = (cache(), cache());
        let query: Vec<f32> = (0..9 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = AttentionParams {
            num_heads: 9,
            scale: 0.125,
            cache: shape,
            max_blocks_per_seq: 6,
        };
        let tables: Vec<u32> = vec![4, 1, 5, 0, 2, 3];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![f32::NAN; query.len()];
            pool.install(|| {
                paged_attention(&mut out, &query, &kc, &vc, &tables, &[0], &[90], &p).unwrap()
            });
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn tiles_hold_consecutive_queries_of_one_sequence() {
        // Sequence 0: tokens 5..=11 (7 queries); sequence 1: 2 queries; sequence 0 again
        // with contexts that jump (a query far from the tile's others starts a new one).
        let seq = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0];
        let lens = [5, 6, 7, 8, 9, 10, 11, 3, 4, 20, 40, 41];
        assert_eq!(
            query_tiles(&seq, &lens, 4),
            vec![(0, 4), (4, 3), (7, 2), (9, 1), (10, 2)]
        );
        assert_eq!(query_tiles(&seq, &lens, 1).len(), seq.len());
        assert!(query_tiles(&[], &[], 4).is_empty());
    }

    #[test]
    fn matches_reference_f32() {
        for (i, c) in cases().iter().enumerate() {
            run::<f32>(c, i as u64, 1e-5);
        }
    }

    #[test]
    fn matches_reference_f16_and_bf16() {
        // The reference reads the same rounded cache, so only f32 accumulation differs.
        for (i, c) in cases().iter().enumerate() {
            run::<f16>(c, 100 + i as u64, 1e-4);
            run::<bf16>(c, 200 + i as u64, 1e-4);
        }
    }

    #[test]
    fn matches_reference_q8_0_and_q4_0() {
        // The reference dequantizes the same blocks: only f32 accumulation differs.
        for (i, c) in cases().iter().enumerate() {
            if c.head_dim % crate::Q8_BLOCK == 0 {
                run::<crate::BlockQ8>(c, 300 + i as u64, 1e-4);
                run::<crate::BlockQ4>(c, 400 + i as u64, 1e-4);
            }
        }
        let wide = Case {
            block_size: 16,
            num_heads: 8,
            kv_heads: 2,
            head_dim: 128,
            seq_lens: vec![3, 50, 129],
            queries_per_seq: 4,
            scale_up: 4.0,
        };
        run::<crate::BlockQ8>(&wide, 399, 1e-4);
        run::<crate::BlockQ4>(&wide, 499, 1e-4);
    }

    /// Attention over a block-quantized cache against attention over the f32 values it
    /// was quantized from: the largest error per output value.
    fn quantized_cache_error<T: CacheStore>() -> f32 {
        let shape = CacheShape {
            num_blocks: 8,
            block_size: 16,
            kv_heads: 2,
            head_dim: 64,
        };
        let mut rng = Rng::new(11);
        let k: Vec<f32> = (0..shape.elems()).map(|_| rng.uniform() * 3.0).collect();
        let v: Vec<f32> = (0..shape.elems()).map(|_| rng.uniform()).collect();
        let mut kq = vec![T::default(); shape.elems() / T::ELEMS];
        let mut vq = kq.clone();
        T::store(&k, &mut kq);
        T::store(&v, &mut vq);
        let p = AttentionParams {
            num_heads: 6,
            scale: 0.125,
            cache: shape,
            max_blocks_per_seq: 8,
        };
        let tables: Vec<u32> = (0..8).collect();
        let q: Vec<f32> = (0..2 * 6 * 64).map(|_| rng.uniform() * 3.0).collect();
        let (seq, lens) = ([0u32, 0], [100u32, 128]);
        let mut exact = vec![0f32; q.len()];
        let mut quant = vec![0f32; q.len()];
        paged_attention(&mut exact, &q, &k, &v, &tables, &seq, &lens, &p).unwrap();
        paged_attention(&mut quant, &q, &kq, &vq, &tables, &seq, &lens, &p).unwrap();
        exact
            .iter()
            .zip(&quant)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn q8_0_and_q4_0_caches_are_close_to_f32() {
        // Values in [-1, 1): a q8_0 step is at most 1/127 of the block's largest, a q4_0
        // step 1/8 of it. Keys of up to 3 move each score by about sqrt(64) x 3/16 x
        // 0.125 at q4_0, which moves the softmax weights: a q4_0 cache costs tenths.
        let q8 = quantized_cache_error::<crate::BlockQ8>();
        assert!(q8 < 0.01, "q8_0: largest difference {q8}");
        assert!(q8 > 0.0, "q8_0 changed nothing: is it stored as f32?");
        let q4 = quantized_cache_error::<crate::BlockQ4>();
        assert!(q4 < 0.25, "q4_0: largest difference {q4}");
        assert!(q4 > q8, "q4_0 ({q4}) should lose more than q8_0 ({q8})");
    }

    #[test]
    fn q8_0_needs_head_dim_a_multiple_of_32() {
        let shape = CacheShape {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 48,
        };
        let p = AttentionParams {
            num_heads: 1,
            scale: 1.0,
            cache: shape,
            max_blocks_per_seq: 2,
        };
        let kc = vec![crate::BlockQ8::default(); 12];
        let mut out = vec![0f32; 48];
        let e = paged_attention(&mut out, &[0.0; 48], &kc, &kc, &[0, 1], &[0], &[1], &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("head_dim 48 is not a multiple"), "{e}");
    }

    #[test]
    fn long_context_with_large_scores_stays_finite() {
        let case = Case {
            block_size: 16,
            num_heads: 2,
            kv_heads: 1,
            head_dim: 16,
            seq_lens: vec![4000],
            queries_per_seq: 2,
            scale_up: 30.0, // scores in the hundreds: exp() would overflow without the max
        };
        run::<f32>(&case, 7, 1e-4);
    }

    #[test]
    fn fast_exp_matches_the_library_exp() {
        let mut xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.005).collect();
        xs.extend([0.0, -0.0, -86.9, -87.5, -100.0, f32::NEG_INFINITY, -1e30]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = x.exp();
            assert!(
                (g - want).abs() <= 4e-7 * want + 1e-37,
                "exp({x}) = {g}, library {want}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let shape = CacheShape {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let p = AttentionParams {
            num_heads: 2,
            scale: 1.0,
            cache: shape,
            max_blocks_per_seq: 2,
        };
        let kc = vec![0f32; shape.elems()];
        let mut out = vec![0f32; 4];
        let q = vec![0f32; 4];
        let err = |tables: &[u32], lens: &[u32]| {
            paged_attention(&mut out.clone(), &q, &kc, &kc, tables, &[0], lens, &p)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[0, 1], &[9]).contains("context_lens[0] = 9"));
        assert!(err(&[0, 5], &[8]).contains("block 5"));
        assert!(err(&[0, 1], &[0]).contains("context_lens[0] = 0"));
        assert!(err(&[0], &[1]).contains("not a multiple"));
        let bad = AttentionParams {
            num_heads: 3,
            cache: CacheShape {
                kv_heads: 2,
                ..shape
            },
            ..p
        };
        let e = paged_attention(&mut out, &q, &kc, &kc, &[0, 1], &[0], &[1], &bad).unwrap_err();
        assert!(e.to_string().contains("num_heads 3"));
    }
}
