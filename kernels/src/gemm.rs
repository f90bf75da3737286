//! Dense matrix times many rows: `x @ w^T` for an f32, bf16 or f16 weight `w` (n, k) and
//! `m` f32 input rows, the product of prefill and batched decode.
//!
//! Both operands are read along `k` (the weight's stored row order, no repacking), in
//! register tiles of a few weight rows by a few input rows: per vector step along `k`,
//! each weight row's vector is loaded (and widened to f32) once and meets every input
//! row's vector of the tile, so one load feeds several fused multiply-adds instead of one
//! as in the matvec. Each accumulator is summed across its lanes once, at the end of `k`.
//! The rayon pool's tasks are blocks of 48 weight rows by 64 input rows, input blocks
//! fastest, so that a thread's weight block stays in its L2 while the input blocks pass
//! over it; each task writes its cells of the output directly. Within a task, a strip of
//! one tile's input rows stays in L1 while the task's weight rows pass it from L2.
//!
//! Tiles per level: `avx2`, 256-bit vectors, 3 weight rows x 4 input rows (12
//! accumulators, 3 weight vectors and an input vector fill AVX2's 16 registers);
//! `avx512`, 512-bit vectors, 4 x 6 (24 accumulators of AVX-512's 32 registers); `neon`,
//! 128-bit vectors, 4 x 4 (16 of NEON's 32 registers; `gemm/neon.rs`). F16 weights widen
//! with F16C (`vcvtph2ps`) or `fcvtl`, bf16 with a shift. On the `scalar` level [`gemm`]
//! is the matvec's row-by-row dot, which is correct but not tiled: the engine keeps
//! candle's gemm for dense matrices there. [`crate::matvec::matvec_slow`] is the
//! reference every path is tested against.

use crate::matvec::{matvec, WeightElem};

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// Which register tiles [`gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiles {
    /// None: the matvec's dot per output.
    Dot,
    /// 256-bit tiles (AVX2, FMA, F16C).
    Ymm,
    /// 512-bit tiles (AVX-512 F/BW as well).
    Zmm,
    /// 128-bit NEON tiles (aarch64).
    Neon,
}

/// The tiles of this CPU's kernel level.
pub fn tiles() -> Tiles {
    match crate::cpu::level() {
        crate::cpu::CpuLevel::Avx512 if cfg!(target_arch = "x86_64") => Tiles::Zmm,
        crate::cpu::CpuLevel::Avx2 if cfg!(target_arch = "x86_64") => Tiles::Ymm,
        crate::cpu::CpuLevel::Neon if cfg!(target_arch = "aarch64") => Tiles::Neon,
        _ => Tiles::Dot,
    }
}

/// True when [`gemm`] runs register tiles on this CPU's level (else it is the matvec's
/// dot per output, and callers with a tiled product of their own keep it).
pub fn tiled() -> bool {
    tiles() != Tiles::Dot
}

/// `out[r * n + o] = sum_i x[r * k + i] * w[o * k + i]` for `r < m`, `o < n`.
///
/// x: (m, k) f32 row-major; w: (n, k) row-major; out: (m, n), every cell of `out[..m * n]`
/// written (an uncleared `MaybeUninit` output is filled; see [`crate::OutElem`]).
pub fn gemm<W: TileElem, O: crate::OutElem>(
    x: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    out: &mut [O],
) {
    gemm_with(tiles(), x, m, w, n, k, out)
}

/// [`gemm`] with `tiles`, which this CPU must run.
fn gemm_with<W: TileElem, O: crate::OutElem>(
    tiles: Tiles,
    x: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    out: &mut [O],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if tiles == Tiles::Dot || cfg!(not(any(target_arch = "x86_64", target_arch = "aarch64"))) {
        return matvec(x, m, w, n, k, O::cleared(&mut out[..m * n]));
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        use rayon::prelude::*;
        // Tasks are (weight block, input block) pairs, input blocks fastest: a thread's
        // consecutive tasks share a weight block, which stays in its L2.
        let (wb, xb) = (n.div_ceil(BLOCK_W), m.div_ceil(BLOCK_X));
        // `O` has f32's layout (`OutElem`); the tiles only write through it.
        let dst = SharedOut(out.as_mut_ptr() as *mut f32);
        (0..wb * xb).into_par_iter().for_each(|t| {
            let (bw, bx) = (t / xb, t % xb);
            let (w0, x0) = (bw * BLOCK_W, bx * BLOCK_X);
            let (rows, xr) = (BLOCK_W.min(n - w0), BLOCK_X.min(m - x0));
            let dst = &dst;
            // Safety: the CPU runs `tiles` (AVX2, FMA and F16C; AVX-512 F/BW for
            // `Zmm`; NEON); the slices hold the rows asked for (checked above); each task
            // writes only the cells of rows x0..x0 + xr and columns w0..w0 + rows of
            // `out`, which no other task writes, and `out` outlives the parallel loop.
            unsafe {
                W::task(
                    &x[x0 * k..(x0 + xr) * k],
                    xr,
                    &w[w0 * k..(w0 + rows) * k],
                    rows,
                    k,
                    dst.0.add(x0 * n + w0),
                    n,
                    tiles,
                )
            }
        });
    }
}

/// Weight rows per parallel task (16 register tiles of 3 rows, 12 of 4).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BLOCK_W: usize = 48;
/// Input rows per parallel task (16 tiles of 4 rows, or 10 of 6 and a rest of 4): with
/// `k` up to a few thousand they stay in L2 while the task's weight rows pass over them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BLOCK_X: usize = 64;

/// The output of [`gemm`], written by the parallel tasks into disjoint cells.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct SharedOut(*mut f32);
// Safety: the tasks write disjoint cells (see `gemm_with`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe impl Sync for SharedOut {}

/// A weight element the register tiles can load, widened to f32.
pub trait TileElem: WeightElem {
    /// One parallel task: `dst[r * ld + j]` = row `r` of `x` dotted with row `j` of `w`
    /// (`rows` rows of `k`), for every `r < m`, with `tiles` (the 256-bit ones for any
    /// x86 `tiles` but `Zmm`).
    ///
    /// # Safety
    /// The CPU runs `tiles`: AVX2, FMA and F16C, and AVX-512 F/BW for `Zmm`, on x86; on
    /// aarch64 every CPU does. `x` holds `m * k` values, `w` `rows * k`, and `dst` is
    /// writable at `r * ld + j` for `r < m`, `j < rows`.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[allow(clippy::too_many_arguments)]
    unsafe fn task(
        x: &[f32],
        m: usize,
        w: &[Self],
        rows: usize,
        k: usize,
        dst: *mut f32,
        ld: usize,
        tiles: Tiles,
    );
}

/// The register tiles of one vector width for one weight type: a module with `task`
/// (see [`TileElem::task`]), compiled for `$features`. `$tw` x `$tx` tile; `$lanes` values
/// per vector; `$zero`, `$fma(a, b, acc)`, `$loadx(ptr)` (f32), `$loadw(ptr)` (weights,
/// widened) and `$hsum(v)` are the width's operations.
macro_rules! tiles {
    (
        $name:ident, $t:ty, $features:literal, $tw:literal x $tx:literal, $lanes:literal,
        zero: $zero:expr, fma: $fma:path, loadx: $loadx:path,
        loadw: |$p:ident| $loadw:expr, hsum: |$v:ident| $hsum:expr
    ) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            /// `TW` weight rows (from `w0`) by `TX` input rows (from `x0`), all of `k`.
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn tile<const TW: usize, const TX: usize>(
                x: &[f32],
                x0: usize,
                w: &[$t],
                w0: usize,
                k: usize,
                dst: *mut f32,
                ld: usize,
            ) {
                let mut acc = [[$zero; TX]; TW];
                let mut i = 0;
                while i + $lanes <= k {
                    let mut wv = [$zero; TW];
                    for (j, v) in wv.iter_mut().enumerate() {
                        let $p = w.as_ptr().add((w0 + j) * k + i);
                        *v = $loadw;
                    }
                    for r in 0..TX {
                        let xv = $loadx(x.as_ptr().add((x0 + r) * k + i));
                        for j in 0..TW {
                            acc[j][r] = $fma(xv, wv[j], acc[j][r]);
                        }
                    }
                    i += $lanes;
                }
                for (j, row) in acc.iter().enumerate() {
                    for (r, &$v) in row.iter().enumerate() {
                        let mut s: f32 = $hsum;
                        for t in i..k {
                            s += x[(x0 + r) * k + t]
                                * <$t as crate::matvec::WeightElem>::widen(w[(w0 + j) * k + t]);
                        }
                        *dst.add((x0 + r) * ld + w0 + j) = s;
                    }
                }
            }

            /// `TX` input rows from `x0` against every weight row: full tiles of `TW`
            /// weight rows, then the rest.
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn strip<const TX: usize>(
                x: &[f32],
                x0: usize,
                w: &[$t],
                rows: usize,
                k: usize,
                dst: *mut f32,
                ld: usize,
            ) {
                let mut j = 0;
                while j + $tw <= rows {
                    tile::<$tw, TX>(x, x0, w, j, k, dst, ld);
                    j += $tw;
                }
                match rows - j {
                    0 => {}
                    1 => tile::<1, TX>(x, x0, w, j, k, dst, ld),
                    2 => tile::<2, TX>(x, x0, w, j, k, dst, ld),
                    _ => tile::<3, TX>(x, x0, w, j, k, dst, ld),
                }
            }

            /// Input rows outermost: a strip's few input rows stay in L1 while the
            /// task's weight rows (in L2) pass them. Per vector step, a tile's loads from
            /// L2 are then its `TW` weight vectors (256-bit tiles: 3 x 32 bytes, or 3 x 16
            /// for 16-bit weights) instead of its `TX` input vectors (4 x 32 bytes) in the
            /// other order.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn task(
                x: &[f32],
                m: usize,
                w: &[$t],
                rows: usize,
                k: usize,
                dst: *mut f32,
                ld: usize,
            ) {
                let mut r = 0;
                while r + $tx <= m {
                    strip::<$tx>(x, r, w, rows, k, dst, ld);
                    r += $tx;
                }
                match m - r {
                    0 => {}
                    1 => strip::<1>(x, r, w, rows, k, dst, ld),
                    2 => strip::<2>(x, r, w, rows, k, dst, ld),
                    3 => strip::<3>(x, r, w, rows, k, dst, ld),
                    4 => strip::<4>(x, r, w, rows, k, dst, ld),
                    _ => strip::<5>(x, r, w, rows, k, dst, ld),
                }
            }
        }
    };
}

/// The 256-bit tiles (the avx2 level, 16 registers: 12 accumulators, 3 weight vectors,
/// one input vector) and the 512-bit ones (the avx512 level, 32 registers: 24
/// accumulators, 4 weight vectors, one input vector) for one weight type, and its
/// [`TileElem`].
macro_rules! tile_elem {
    ($t:ty, $ymm:ident, $zmm:ident, ymm: |$p:ident| $y:expr, zmm: |$q:ident| $z:expr) => {
        tiles!(
            $ymm, $t, "avx2,fma,f16c", 3 x 4, 8,
            zero: _mm256_setzero_ps(), fma: _mm256_fmadd_ps, loadx: _mm256_loadu_ps,
            loadw: |$p| $y,
            hsum: |a| {
                let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
            }
        );
        tiles!(
            $zmm, $t, "avx512f,avx512bw,avx2,fma,f16c", 4 x 6, 16,
            zero: _mm512_setzero_ps(), fma: _mm512_fmadd_ps, loadx: _mm512_loadu_ps,
            loadw: |$q| $z,
            hsum: |a| _mm512_reduce_add_ps(a)
        );

        impl TileElem for $t {
            #[cfg(target_arch = "x86_64")]
            unsafe fn task(
                x: &[f32],
                m: usize,
                w: &[Self],
                rows: usize,
                k: usize,
                dst: *mut f32,
                ld: usize,
                tiles: Tiles,
            ) {
                match tiles {
                    Tiles::Zmm => $zmm::task(x, m, w, rows, k, dst, ld),
                    _ => $ymm::task(x, m, w, rows, k, dst, ld),
                }
            }

            #[cfg(target_arch = "aarch64")]
            unsafe fn task(
                x: &[f32],
                m: usize,
                w: &[Self],
                rows: usize,
                k: usize,
                dst: *mut f32,
                ld: usize,
                _tiles: Tiles,
            ) {
                neon::task(x, m, w, rows, k, dst, ld)
            }
        }
    };
}

tile_elem!(
    f32, f32_ymm, f32_zmm,
    ymm: |p| _mm256_loadu_ps(p),
    zmm: |p| _mm512_loadu_ps(p)
);
tile_elem!(
    half::bf16, bf16_ymm, bf16_zmm,
    ymm: |p| {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    },
    zmm: |p| {
        let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
    }
);
tile_elem!(
    half::f16, f16_ymm, f16_zmm,
    ymm: |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    zmm: |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matvec::matvec_slow;
    use crate::testutil::Rng;

    fn check<W: TileElem>(
        tiles: Tiles,
        conv: impl Fn(f32) -> W,
        m: usize,
        n: usize,
        k: usize,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
        let w: Vec<W> = (0..n * k).map(|_| conv(rng.uniform())).collect();
        let want = matvec_slow(&x, m, &w, n, k);
        let mut got = vec![f32::NAN; m * n];
        gemm_with(tiles, &x, m, &w, n, k, &mut got);
        // The uncleared-output form (`MaybeUninit` cells, set to NaN here so that the test
        // reads no uninitialized memory) writes the same value into every cell.
        let mut fresh = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
        gemm_with(tiles, &x, m, &w, n, k, &mut fresh);
        // SAFETY: every cell was initialized (NaN, or the product's value).
        let fresh: Vec<f32> = fresh.iter().map(|c| unsafe { c.assume_init() }).collect();
        assert!(
            fresh
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{tiles:?} m {m} n {n} k {k}: the MaybeUninit output differs"
        );
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            // f32 sums of k products of values below 1 in another order.
            let tol = 1e-5 * (k as f32).sqrt() + 1e-6 * e.abs();
            assert!(
                (g - e).abs() <= tol,
                "{} m {m} n {n} k {k}: out[{i}] = {g}, reference {e}",
                std::any::type_name::<W>()
            );
        }
    }

    /// Every tile and remainder: input rows 1-13 (full tiles of 4 or 6 and each rest)
    /// and 33, weight rows around a task's 48 and the tiles' 3 and 4, and k with and
    /// without a vector's tail; the 256-bit tiles where this CPU has AVX2 (under
    /// `qemu-x86_64 -cpu Haswell` too), the 512-bit ones where it has AVX-512, the NEON
    /// ones on aarch64 (under `qemu-aarch64`), and the dot every level has.
    #[test]
    fn gemm_matches_the_f64_reference_for_every_remainder() {
        use crate::cpu::CpuLevel;
        let mut paths = vec![Tiles::Dot];
        if cfg!(target_arch = "aarch64") {
            paths.push(Tiles::Neon);
        }
        if cfg!(target_arch = "x86_64") {
            if CpuLevel::Avx2.qualifies() {
                paths.push(Tiles::Ymm);
            } else {
                eprintln!("the 256-bit gemm tiles are not tested: this CPU lacks AVX2/FMA/F16C");
            }
            if CpuLevel::Avx512.qualifies() {
                paths.push(Tiles::Zmm);
            } else {
                eprintln!("the 512-bit gemm tiles are not tested: this CPU lacks AVX-512");
            }
        }
        for tiles in paths {
            let mut seed = 1;
            for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 33, 70] {
                for (n, k) in [
                    (1, 8),
                    (2, 7),
                    (3, 16),
                    (4, 17),
                    (5, 33),
                    (47, 64),
                    (50, 100),
                    (97, 576),
                ] {
                    seed += 1;
                    check(tiles, |v| v, m, n, k, seed);
                    check(tiles, half::f16::from_f32, m, n, k, seed);
                    check(tiles, half::bf16::from_f32, m, n, k, seed);
                }
            }
        }
    }
}
