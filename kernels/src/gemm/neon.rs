//! The `neon` level's register tiles for [`super::gemm`] (aarch64): 128-bit vectors of 4
//! f32 lanes, 4 weight rows x 4 input rows (16 accumulators, 4 weight vectors and an
//! input vector of NEON's 32 registers). F16 weights widen with `fcvtl` (base ARMv8 SIMD,
//! through `asm!`: its intrinsic needs the unstable f16 vector types), bf16 with a
//! widening shift (`ushll`). Each accumulator is summed across its lanes once, at the end
//! of `k` (`faddp`).

use std::arch::aarch64::*;

use crate::matvec::neon::NeonLoad;

/// `TW` weight rows (from `w0`) by `TX` input rows (from `x0`), all of `k`:
/// `dst[(x0 + r) * ld + w0 + j]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: NeonLoad, const TW: usize, const TX: usize>(
    x: &[f32],
    x0: usize,
    w: &[W],
    w0: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
) {
    let zero = vdupq_n_f32(0.0);
    let mut acc = [[zero; TX]; TW];
    let mut i = 0;
    while i + 4 <= k {
        let mut wv = [zero; TW];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = W::load4(w.as_ptr().add((w0 + j) * k + i));
        }
        for r in 0..TX {
            let xv = vld1q_f32(x.as_ptr().add((x0 + r) * k + i));
            for (row, &wj) in acc.iter_mut().zip(&wv) {
                row[r] = vfmaq_f32(row[r], xv, wj);
            }
        }
        i += 4;
    }
    for (j, row) in acc.iter().enumerate() {
        for (r, &a) in row.iter().enumerate() {
            let mut s = vaddvq_f32(a);
            for t in i..k {
                s += x[(x0 + r) * k + t] * w[(w0 + j) * k + t].widen();
            }
            *dst.add((x0 + r) * ld + w0 + j) = s;
        }
    }
}

/// Every input row against `TW` weight rows from `w0`: tiles of 4 input rows, then the
/// rest.
#[inline(always)]
unsafe fn band<W: NeonLoad, const TW: usize>(
    x: &[f32],
    m: usize,
    w: &[W],
    w0: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
) {
    let mut r = 0;
    while r + 4 <= m {
        tile::<W, TW, 4>(x, r, w, w0, k, dst, ld);
        r += 4;
    }
    match m - r {
        0 => {}
        1 => tile::<W, TW, 1>(x, r, w, w0, k, dst, ld),
        2 => tile::<W, TW, 2>(x, r, w, w0, k, dst, ld),
        _ => tile::<W, TW, 3>(x, r, w, w0, k, dst, ld),
    }
}

/// One parallel task of [`super::gemm`] (see [`super::TileElem::task`]).
///
/// # Safety
/// As [`super::TileElem::task`] (NEON is part of every aarch64 CPU).
#[target_feature(enable = "neon")]
pub unsafe fn task<W: NeonLoad>(
    x: &[f32],
    m: usize,
    w: &[W],
    rows: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
) {
    let mut j = 0;
    while j + 4 <= rows {
        band::<W, 4>(x, m, w, j, k, dst, ld);
        j += 4;
    }
    match rows - j {
        0 => {}
        1 => band::<W, 1>(x, m, w, j, k, dst, ld),
        2 => band::<W, 2>(x, m, w, j, k, dst, ld),
        _ => band::<W, 3>(x, m, w, j, k, dst, ld),
    }
}
