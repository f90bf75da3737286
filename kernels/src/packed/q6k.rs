//! llama.cpp's Q6_K in the packed layout. The file's super-block (210 bytes, 256 weights):
//! `ql` (128 bytes of low nibbles), `qh` (64 bytes of 2-bit high parts), 16 signed 8-bit
//! scales (one per 16 weights) and an f16 `d`; weight `i` is `d * sc[i / 16] * (q - 32)`
//! with `q` the 6-bit value. In the file, each half of 128 weights takes 64 bytes of `ql`
//! (byte `l` low nibble: weight `l`, high: `l + 64`; byte `32 + l`: weights `32 + l`,
//! `96 + l`) and 32 of `qh` (byte `l`: bits `2s..2s + 2` for weight `32 s + l`).
//!
//! Tile of 16 rows and one super-block (16 x 210 bytes, the format's own size):
//! - `[0, 32)`: the rows' `d` (f16);
//! - `[32, 288)`: per group of 16 weights `g`, the 16 rows' scales (16 signed bytes);
//! - `[288, 2336)`: the `ql` pairs as Q4_K's: pair `P = 2n + t` (half `n`, `t` 0 or 1) is
//!   the file's 32 bytes `ql[64n + 32t..]`, whose low nibbles are sub-block `4n + t` and
//!   high nibbles sub-block `4n + t + 2`, in 8 runs of 64 bytes (4 bytes per row in turn);
//! - `[2336, 3360)`: `qh` in runs the same way, run `(n, r)` holding bytes
//!   `32n + 4r..32n + 4r + 4` of each row: one run serves both pairs of its half.
//!
//! The kernels rebuild the unsigned 6-bit `q` per byte (nibble, then the two high bits
//! shifted into bits 4-5), take integer dots per 16 weights, and subtract the bias with
//! the activations' sums per 16.

use half::f16;

use super::kquant::QK_K;
use super::{PackedMatrix, QuantRows, GROUP};

/// Bytes of a Q6_K super-block.
pub(super) const Q6K_BYTES: usize = 210;

const SCALES: usize = 2 * GROUP;
const QL: usize = SCALES + 16 * GROUP;
const QH: usize = QL + 4 * 8 * 4 * GROUP;

/// Lay out the 16 rows' super-blocks `src` (the file's bytes) as one tile.
pub(super) fn pack_tile(src: &[&[u8]; GROUP], tile: &mut [u8]) {
    for (lane, b) in src.iter().enumerate() {
        let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], &b[208..210]);
        tile[2 * lane..2 * lane + 2].copy_from_slice(d);
        for g in 0..16 {
            tile[SCALES + g * GROUP + lane] = sc[g];
        }
        for p in 0..4 {
            for r in 0..8 {
                let dst = QL + (p * 8 + r) * 4 * GROUP + 4 * lane;
                tile[dst..dst + 4].copy_from_slice(&ql[32 * p + 4 * r..][..4]);
            }
        }
        for n in 0..2 {
            for r in 0..8 {
                let dst = QH + (n * 8 + r) * 4 * GROUP + 4 * lane;
                tile[dst..dst + 4].copy_from_slice(&qh[32 * n + 4 * r..][..4]);
            }
        }
    }
}

/// `lane`'s super-block back in the file's bytes (the inverse of [`pack_tile`]).
pub(super) fn unpack_row(tile: &[u8], lane: usize, dst: &mut [u8]) {
    for p in 0..4 {
        for r in 0..8 {
            let src = QL + (p * 8 + r) * 4 * GROUP + 4 * lane;
            dst[32 * p + 4 * r..][..4].copy_from_slice(&tile[src..src + 4]);
        }
    }
    for n in 0..2 {
        for r in 0..8 {
            let src = QH + (n * 8 + r) * 4 * GROUP + 4 * lane;
            dst[128 + 32 * n + 4 * r..][..4].copy_from_slice(&tile[src..src + 4]);
        }
    }
    for g in 0..16 {
        dst[192 + g] = tile[SCALES + g * GROUP + lane];
    }
    dst[208..210].copy_from_slice(&tile[2 * lane..2 * lane + 2]);
}

/// Weight `i` (0..256) of `lane`, signed: `q - 32`.
pub(super) fn weight(tile: &[u8], lane: usize, i: usize) -> i8 {
    let (n, w) = (i / 128, i % 128);
    let (s, l) = (w / 32, w % 32);
    // Sub-block s of the half: pair t = s % 2, high nibble when s >= 2.
    let p = 2 * n + s % 2;
    let lo = tile[QL + (p * 8 + l / 4) * 4 * GROUP + 4 * lane + l % 4];
    let nib = if s >= 2 { lo >> 4 } else { lo & 0x0F };
    let hb = tile[QH + (n * 8 + l / 4) * 4 * GROUP + 4 * lane + l % 4];
    let q = nib | (((hb >> (2 * s)) & 3) << 4);
    q as i8 - 32
}

/// The scale `d * sc[g16]` of the 16 weights `16 * g16..` of `lane` (no minimum).
pub(super) fn scale_min(tile: &[u8], lane: usize, g16: usize) -> (f32, f32) {
    let d = f16::from_le_bytes([tile[2 * lane], tile[2 * lane + 1]]).to_f32();
    (d * (tile[SCALES + g16 * GROUP + lane] as i8) as f32, 0.0)
}

/// The activation column and the 16-weight group of pair `p`'s low (`hi = 0`) or high
/// nibbles, first or second half of the sub-block (`part`), in super-block `sb`.
#[inline(always)]
fn group_of(p: usize, hi: usize, part: usize) -> usize {
    let (n, t) = (p / 2, p % 2);
    let s = t + 2 * hi;
    (128 * n + 32 * s + 16 * part) / 16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn group_rows_avx512(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
) {
    row_tiles!(r0, rows, [8, 7, 6, 5, 4, 3, 2, 1], |r, R| tile_avx512::<R>(
        w, qa, g, r, out, n
    ));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_avx512<const R: usize>(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r: usize,
    out: *mut f32,
    n: usize,
) {
    use std::arch::x86_64::*;
    let k = w.cols;
    let (nsb, kb) = (k / QK_K, k / 32);
    let tb = w.format.tile_bytes();
    let wbase = w.data.as_ptr().add(g * nsb * tb);
    let abase = qa.q.as_ptr().add(r * k);
    let dbase = qa.d.as_ptr().add(r * kb);
    let s16base = qa.sum16.as_ptr().add(r * 2 * kb);
    let nibble = _mm512_set1_epi8(0x0F);
    let bits = _mm512_set1_epi8(0x30);
    let act = |i: usize, col: usize| {
        _mm512_set1_epi32((abase.add(i * k + col) as *const i32).read_unaligned())
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for sb in 0..nsb {
        let t = wbase.add(sb * tb);
        let wd = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
        for p in 0..4 {
            let (half, pt) = (p / 2, p % 2);
            // One 16-weight group per part (4 runs) for the low nibbles and one for the
            // high ones: their dots and scale step, then the next part.
            for part in 0..2 {
                let mut dots = [[_mm512_setzero_si512(); R]; 2];
                for run in 4 * part..4 * part + 4 {
                    let v = _mm512_loadu_si512(t.add(QL + (p * 8 + run) * 64) as *const __m512i);
                    let h = _mm512_loadu_si512(t.add(QH + (half * 8 + run) * 64) as *const __m512i);
                    // Bits 2s..2s+2 of each qh byte to bits 4..6: s = pt (low), pt + 2 (high).
                    let (h_lo, h_hi) = if pt == 0 {
                        (_mm512_slli_epi16::<4>(h), h)
                    } else {
                        (_mm512_slli_epi16::<2>(h), _mm512_srli_epi16::<2>(h))
                    };
                    let lo =
                        _mm512_or_si512(_mm512_and_si512(v, nibble), _mm512_and_si512(h_lo, bits));
                    let hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble),
                        _mm512_and_si512(h_hi, bits),
                    );
                    let col_lo = sb * QK_K + 16 * group_of(p, 0, 0) + 4 * run;
                    let col_hi = sb * QK_K + 16 * group_of(p, 1, 0) + 4 * run;
                    let [lo_dots, hi_dots] = &mut dots;
                    for (i, (dl, dh)) in lo_dots.iter_mut().zip(hi_dots.iter_mut()).enumerate() {
                        *dl = _mm512_dpbusd_epi32(*dl, lo, act(i, col_lo));
                        *dh = _mm512_dpbusd_epi32(*dh, hi, act(i, col_hi));
                    }
                }
                for (hi, rows) in dots.iter().enumerate() {
                    let gi = group_of(p, hi, part);
                    let sc = _mm_loadu_si128(t.add(SCALES + gi * GROUP) as *const __m128i);
                    let scale = _mm512_mul_ps(wd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
                    let g16 = sb * 16 + gi;
                    for (i, (dot, acc)) in rows.iter().zip(acc.iter_mut()).enumerate() {
                        let da = *dbase.add(i * kb + g16 / 2);
                        let sum = *s16base.add(i * 2 * kb + g16);
                        let s = _mm512_sub_epi32(*dot, _mm512_set1_epi32(32 * sum));
                        let f = _mm512_mul_ps(scale, _mm512_set1_ps(da));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, *acc);
                    }
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((r + i) * n + g * GROUP), *acc);
    }
}

/// The 256-bit kernels (see `packed::kernels_256` for why a macro). Without VNNI each
/// run's `vpmaddubsw` pairs (at most 2 x 63 x 127) are widened at once.
macro_rules! q6k_256 {
    ($group:ident, $tile:ident, $features:literal, $vnni:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $group(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            r0: usize,
            rows: usize,
            out: *mut f32,
            n: usize,
        ) {
            for h in 0..2 {
                row_tiles!(r0, rows, [4, 3, 2, 1], |r, R| $tile::<R>(
                    w, qa, g, h, r, out, n
                ));
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            h8: usize,
            r: usize,
            out: *mut f32,
            n: usize,
        ) {
            use std::arch::x86_64::*;
            let k = w.cols;
            let (nsb, kb) = (k / QK_K, k / 32);
            let tb = w.format.tile_bytes();
            let wbase = w.data.as_ptr().add(g * nsb * tb);
            let abase = qa.q.as_ptr().add(r * k);
            let dbase = qa.d.as_ptr().add(r * kb);
            let s16base = qa.sum16.as_ptr().add(r * 2 * kb);
            let nibble = _mm256_set1_epi8(0x0F);
            let bits = _mm256_set1_epi8(0x30);
            let ones = _mm256_set1_epi16(1);
            let act = |i: usize, col: usize| {
                _mm256_set1_epi32((abase.add(i * k + col) as *const i32).read_unaligned())
            };
            let mut acc = [_mm256_setzero_ps(); R];
            for sb in 0..nsb {
                let t = wbase.add(sb * tb);
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(t.add(16 * h8) as *const __m128i));
                for p in 0..4 {
                    let (half, pt) = (p / 2, p % 2);
                    // One 16-weight group per part (4 runs) for the low nibbles and one
                    // for the high ones: their dots and scale step, then the next part.
                    for part in 0..2 {
                        let mut dots = [[_mm256_setzero_si256(); R]; 2];
                        // Runs in pairs: without VNNI two runs' `vpmaddubsw` pairs sum
                        // in i16 (at most 2 x 2 x 63 x 127 = 32004) before they widen.
                        for pair in 0..2 {
                            // q[u][hi]: run `2 pair + u`'s low (0) or high (1) nibbles.
                            let mut q = [[_mm256_setzero_si256(); 2]; 2];
                            for (u, run_q) in q.iter_mut().enumerate() {
                                let run = 4 * part + 2 * pair + u;
                                let v = _mm256_loadu_si256(
                                    t.add(QL + (p * 8 + run) * 64 + 32 * h8) as *const __m256i,
                                );
                                let hb =
                                    _mm256_loadu_si256(t.add(QH + (half * 8 + run) * 64 + 32 * h8)
                                        as *const __m256i);
                                let (h_lo, h_hi) = if pt == 0 {
                                    (_mm256_slli_epi16::<4>(hb), hb)
                                } else {
                                    (_mm256_slli_epi16::<2>(hb), _mm256_srli_epi16::<2>(hb))
                                };
                                run_q[0] = _mm256_or_si256(
                                    _mm256_and_si256(v, nibble),
                                    _mm256_and_si256(h_lo, bits),
                                );
                                run_q[1] = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
                                    _mm256_and_si256(h_hi, bits),
                                );
                            }
                            for (hi, rows) in dots.iter_mut().enumerate() {
                                let col = sb * QK_K + 16 * group_of(p, hi, part) + 8 * pair;
                                for (i, d) in rows.iter_mut().enumerate() {
                                    let (a0, a1) = (act(i, col), act(i, col + 4));
                                    *d = if $vnni {
                                        _mm256_dpbusd_avx_epi32(
                                            _mm256_dpbusd_avx_epi32(*d, q[0][hi], a0),
                                            q[1][hi],
                                            a1,
                                        )
                                    } else {
                                        let p16 = _mm256_add_epi16(
                                            _mm256_maddubs_epi16(q[0][hi], a0),
                                            _mm256_maddubs_epi16(q[1][hi], a1),
                                        );
                                        _mm256_add_epi32(*d, _mm256_madd_epi16(p16, ones))
                                    };
                                }
                            }
                        }
                        for (hi, rows) in dots.iter().enumerate() {
                            let gi = group_of(p, hi, part);
                            let sc = _mm_loadl_epi64(
                                t.add(SCALES + gi * GROUP + 8 * h8) as *const __m128i
                            );
                            let scale =
                                _mm256_mul_ps(wd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
                            let g16 = sb * 16 + gi;
                            for (i, (d, acc)) in rows.iter().zip(acc.iter_mut()).enumerate() {
                                let da = *dbase.add(i * kb + g16 / 2);
                                let sum = *s16base.add(i * 2 * kb + g16);
                                let s = _mm256_sub_epi32(*d, _mm256_set1_epi32(32 * sum));
                                let f = _mm256_mul_ps(scale, _mm256_set1_ps(da));
                                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), f, *acc);
                            }
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add((r + i) * n + g * GROUP + 8 * h8), *acc);
            }
        }
    };
}

q6k_256!(group_rows_avx2, tile_avx2, "avx2,fma,f16c", false);
q6k_256!(
    group_rows_vnni256,
    tile_vnni256,
    "avx2,fma,f16c,avxvnni",
    true
);

#[cfg(target_arch = "aarch64")]
pub(super) use neon_q6k::{group_rows_neon, group_rows_neon_dot};

#[cfg(target_arch = "aarch64")]
mod neon_q6k {
    use std::arch::aarch64::*;

    use super::super::neon::{dot_sdot, dot_smull, widen_f16};
    use super::*;

    /// Bytes `4q..4q + 4` of 16 signed bytes as four f32.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn quarter_i8_f32(p: *const u8, q: usize) -> float32x4_t {
        let b = vld1_s8(p.add(4 * q) as *const i8);
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))))
    }

    macro_rules! q6k_neon {
        ($group:ident, $tile:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn $group(
                w: &PackedMatrix,
                qa: &QuantRows,
                g: usize,
                r0: usize,
                rows: usize,
                out: *mut f32,
                n: usize,
            ) {
                for quarter in 0..4 {
                    row_tiles!(r0, rows, [2, 1], |r, R| $tile::<R>(
                        w, qa, g, quarter, r, out, n
                    ));
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $tile<const R: usize>(
                w: &PackedMatrix,
                qa: &QuantRows,
                g: usize,
                q: usize,
                r: usize,
                out: *mut f32,
                n: usize,
            ) {
                let k = w.cols;
                let (nsb, kb) = (k / QK_K, k / 32);
                let tb = w.format.tile_bytes();
                let wbase = w.data.as_ptr().add(g * nsb * tb);
                let abase = qa.q.as_ptr().add(r * k);
                let dbase = qa.d.as_ptr().add(r * kb);
                let s16base = qa.sum16.as_ptr().add(r * 2 * kb);
                let act = |i: usize, col: usize| {
                    vreinterpretq_s8_s32(vld1q_dup_s32(abase.add(i * k + col) as *const i32))
                };
                let (nibble, bits) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
                let mut acc = [vdupq_n_f32(0.0); R];
                for sb in 0..nsb {
                    let t = wbase.add(sb * tb);
                    let wd = widen_f16(vld1_u16(t.add(8 * q) as *const u16));
                    for p in 0..4 {
                        let (half, pt) = (p / 2, p % 2);
                        let mut dots = [[[vdupq_n_s32(0); R]; 2]; 2];
                        for run in 0..8 {
                            let v = vld1q_u8(t.add(QL + (p * 8 + run) * 64 + 16 * q));
                            let hb = vld1q_u8(t.add(QH + (half * 8 + run) * 64 + 16 * q));
                            let (h_lo, h_hi) = if pt == 0 {
                                (vshlq_n_u8::<4>(hb), hb)
                            } else {
                                (vshlq_n_u8::<2>(hb), vshrq_n_u8::<2>(hb))
                            };
                            let lo = vorrq_u8(vandq_u8(v, nibble), vandq_u8(h_lo, bits));
                            let hi = vorrq_u8(vshrq_n_u8::<4>(v), vandq_u8(h_hi, bits));
                            let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                            let part = run / 4;
                            for i in 0..R {
                                let col = sb * QK_K + 16 * group_of(p, 0, 0) + 4 * run;
                                dots[0][part][i] = $dot(dots[0][part][i], lo, act(i, col));
                                let col = sb * QK_K + 16 * group_of(p, 1, 0) + 4 * run;
                                dots[1][part][i] = $dot(dots[1][part][i], hi, act(i, col));
                            }
                        }
                        for (hi, parts) in dots.iter().enumerate() {
                            for (part, rows) in parts.iter().enumerate() {
                                let gi = group_of(p, hi, part);
                                let scale =
                                    vmulq_f32(wd, quarter_i8_f32(t.add(SCALES + gi * GROUP), q));
                                let g16 = sb * 16 + gi;
                                for (i, (d, acc)) in rows.iter().zip(acc.iter_mut()).enumerate() {
                                    let da = *dbase.add(i * kb + g16 / 2);
                                    let sum = *s16base.add(i * 2 * kb + g16);
                                    let s = vsubq_s32(*d, vdupq_n_s32(32 * sum));
                                    *acc =
                                        vfmaq_f32(*acc, vcvtq_f32_s32(s), vmulq_n_f32(scale, da));
                                }
                            }
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    vst1q_f32(out.add((r + i) * n + g * GROUP + 4 * q), *acc);
                }
            }
        };
    }

    q6k_neon!(group_rows_neon, tile_neon, "neon", dot_smull);
    q6k_neon!(group_rows_neon_dot, tile_neon_dot, "neon,dotprod", dot_sdot);
}
