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
    let hd = p.cache.head_dim;
    let simd = simd_available();
    // One task per (query, KV head): the `group` query heads that share its K/V.
    out.par_chunks_mut(group * hd)
        .enumerate()
        .for_each(|(task, out_g)| {
            let io = TaskIo {
                out_g,
                query,
                key_cache,
                value_cache,
                checked: &checked,
            };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked by `simd_available`).
                unsafe { attend_avx2(task, io, p) };
                return;
            }
            let _ = simd;
            attend(task, io, p, false);
        });
    Ok(())
}

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
struct TaskIo<'a, 'b, T> {
    out_g: &'a mut [f32],
    query: &'b [f32],
    key_cache: &'b [T],
    value_cache: &'b [T],
    checked: &'b Checked<'b>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: CacheStore>(task: usize, io: TaskIo<'_, '_, T>, p: &AttentionParams) {
    attend(task, io, p, true)
}

/// Task `task` = (query, KV head): the group's query heads over the query's context,
/// block by block with a running maximum.
#[inline(always)]
fn attend<T: CacheStore>(task: usize, io: TaskIo<'_, '_, T>, p: &AttentionParams, simd: bool) {
    let c = p.cache;
    let hd = c.head_dim;
    let group = p.num_heads / c.kv_heads;
    // Strides and offsets in units of `T` (`head_dim` is a multiple of T::ELEMS).
    let (token_units, hd_units) = (c.token_elems() / T::ELEMS, hd / T::ELEMS);
    let TaskIo {
        out_g,
        query,
        key_cache,
        value_cache,
        checked,
    } = io;
    let (qi, kvh) = (task / c.kv_heads, task % c.kv_heads);
    let len = checked.context_lens[qi] as usize;
    let table = &checked.block_tables[checked.query_seq[qi] as usize * p.max_blocks_per_seq..];
    let q_g = &query[(qi * p.num_heads + kvh * group) * hd..][..group * hd];
    // Small per-task state on the stack for the usual shapes (up to 8 heads per KV head,
    // blocks up to 64 tokens); larger ones fall back to the heap.
    let mut stack = [0f32; 3 * 8 + 64];
    let mut heap = Vec::new();
    let state: &mut [f32] = if 2 * group + c.block_size <= stack.len() {
        &mut stack[..2 * group + c.block_size]
    } else {
        heap.resize(2 * group + c.block_size, 0f32);
        &mut heap
    };
    let (max, rest) = state.split_at_mut(group);
    let (denom, scores) = rest.split_at_mut(group);
    max.fill(f32::NEG_INFINITY);
    out_g.fill(0.0);
    for (b, &block) in table[..len.div_ceil(c.block_size)].iter().enumerate() {
        let n = (len - b * c.block_size).min(c.block_size);
        let base = block as usize * c.block_size * token_units + kvh * hd_units;
        let end = base + (n - 1) * token_units + hd_units;
        for g in 0..group {
            let q = &q_g[g * hd..][..hd];
            let s = &mut scores[..n];
            T::scores(q, &key_cache[base..end], token_units, p.scale, s, simd);
            // Rescale what was accumulated when the running max grows.
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[g].max(block_max);
            let correction = (max[g] - new_max).exp();
            max[g] = new_max;
            let acc = &mut out_g[g * hd..][..hd];
            if correction != 1.0 {
                acc.iter_mut().for_each(|a| *a *= correction);
            }
            s.iter_mut().for_each(|x| *x -= new_max);
            exp_in_place(s);
            denom[g] = denom[g] * correction + s.iter().sum::<f32>();
            T::weighted_sum(acc, s, &value_cache[base..end], token_units, simd);
        }
    }
    for g in 0..group {
        let inv = 1.0 / denom[g];
        out_g[g * hd..][..hd].iter_mut().for_each(|a| *a *= inv);
    }
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
        }
        v
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
