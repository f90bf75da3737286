//! The k-quant formats in the packed layout: llama.cpp's Q4_K super-block (256 weights:
//! f16 `d` and `dmin`, 12 bytes holding eight 6-bit scales `sc` and minimums `m`, one per
//! sub-block of 32, and 128 bytes of nibbles; weight `i` of sub-block `j` is
//! `d * sc_j * q_i - dmin * m_j`).
//!
//! Tile of 16 rows and one super-block (16 x 144 bytes, the format's own size):
//! - `[0, 32)`: the 16 rows' `d`; `[32, 64)`: their `dmin` (f16);
//! - `[64, 256)`: per sub-block `j`, 24 bytes: the 16 rows' `sc_j & 15` as nibbles (row
//!   `l` in byte `l / 2`, low nibble for even `l`), then `m_j & 15` the same way, then
//!   `(sc_j >> 4) | (m_j >> 4) << 2` the same way. The file's 12-byte packing needs a
//!   dozen scalar steps per row to undo; this one widens the 16 rows' scales with a few
//!   vector instructions, in the same bytes;
//! - `[256, 2304)`: for each pair of sub-blocks `p` (the file's 32 bytes whose low
//!   nibbles are sub-block `2p` and high nibbles `2p + 1`), 8 runs of 64 bytes, run `r`
//!   holding bytes `4r..4r + 4` of each row in turn, as the Q4_0 tiles do.
//!
//! Q5_K (176 bytes: `d`, `dmin`, the same 12 scale bytes, 32 bytes `qh`, then the same
//! 128 bytes of nibbles) adds a fifth bit: bit `2p` of `qh[l]` tops weight `l` of
//! sub-block `2p`, bit `2p + 1` weight `l` of sub-block `2p + 1`. Its tile (16 x 176
//! bytes) is Q4_K's followed by `[2304, 2816)`: the rows' `qh` in 8 runs of 64 bytes laid
//! out as the nibbles are, so one load tops the nibbles of every pair of sub-blocks.
//!
//! Per sub-block the kernels take the integer dot of the weights with the quantized
//! activations, then add `d sc_j d_a dot - dmin m_j d_a sum(a)` in f32: the activations'
//! blocks of 32 line up with the sub-blocks.

use half::f16;

use super::{BlockFormat, PackedMatrix, QuantRows, GROUP};

/// Weights per super-block.
pub(super) const QK_K: usize = 256;
/// Bytes of a Q4_K super-block.
pub(super) const Q4K_BYTES: usize = 144;
/// Bytes of a Q5_K super-block.
pub(super) const Q5K_BYTES: usize = 176;

const DMIN: usize = 2 * GROUP;
const SC: usize = 4 * GROUP;
const SC_STEP: usize = 24;
const QS: usize = SC + 8 * SC_STEP;
/// Where a Q5_K tile's runs of `qh` start, after the nibbles.
const QH: usize = QS + 32 * 4 * GROUP;

/// Sub-block `j`'s 6-bit scale and minimum from the file's 12 bytes (llama.cpp's packing:
/// sub-blocks 0-3 in the low 6 bits of bytes 0-7, 4-7 split between bytes 8-11 and the
/// top 2 bits of bytes 0-7).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`scale_min_k4`] over all eight sub-blocks.
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    q
}

/// Write nibble `v` of `lane` into a 16-lane nibble plane.
fn put_nibble(plane: &mut [u8], lane: usize, v: u8) {
    let shift = 4 * (lane % 2);
    plane[lane / 2] = (plane[lane / 2] & !(0x0F << shift)) | ((v & 0x0F) << shift);
}

fn get_nibble(plane: &[u8], lane: usize) -> u8 {
    (plane[lane / 2] >> (4 * (lane % 2))) & 0x0F
}

/// Lay out the 16 rows' super-blocks `src` (the file's bytes) as one tile.
pub(super) fn pack_tile(format: BlockFormat, src: &[&[u8]; GROUP], tile: &mut [u8]) {
    let five = format == BlockFormat::Q5K;
    debug_assert!(five || format == BlockFormat::Q4K);
    for (lane, b) in src.iter().enumerate() {
        tile[2 * lane..2 * lane + 2].copy_from_slice(&b[0..2]);
        tile[DMIN + 2 * lane..DMIN + 2 * lane + 2].copy_from_slice(&b[2..4]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            let base = SC + SC_STEP * j;
            put_nibble(&mut tile[base..base + 8], lane, sc);
            put_nibble(&mut tile[base + 8..base + 16], lane, m);
            put_nibble(
                &mut tile[base + 16..base + 24],
                lane,
                (sc >> 4) | ((m >> 4) << 2),
            );
        }
        let qs = &b[if five { 48 } else { 16 }..];
        for p in 0..4 {
            for r in 0..8 {
                let dst = QS + (p * 8 + r) * 4 * GROUP + 4 * lane;
                tile[dst..dst + 4].copy_from_slice(&qs[32 * p + 4 * r..][..4]);
            }
        }
        if five {
            for r in 0..8 {
                let dst = QH + r * 4 * GROUP + 4 * lane;
                tile[dst..dst + 4].copy_from_slice(&b[16 + 4 * r..][..4]);
            }
        }
    }
}

/// Sub-block `j`'s scale and minimum (6 bits each) of `lane`.
fn lane_scale_min(tile: &[u8], lane: usize, j: usize) -> (u8, u8) {
    let base = SC + SC_STEP * j;
    let hh = get_nibble(&tile[base + 16..], lane);
    (
        get_nibble(&tile[base..], lane) | ((hh & 3) << 4),
        get_nibble(&tile[base + 8..], lane) | ((hh >> 2) << 4),
    )
}

/// `lane`'s super-block back in the file's bytes (the inverse of [`pack_tile`]).
pub(super) fn unpack_row(format: BlockFormat, tile: &[u8], lane: usize, dst: &mut [u8]) {
    let five = format == BlockFormat::Q5K;
    debug_assert!(five || format == BlockFormat::Q4K);
    dst[0..2].copy_from_slice(&tile[2 * lane..2 * lane + 2]);
    dst[2..4].copy_from_slice(&tile[DMIN + 2 * lane..DMIN + 2 * lane + 2]);
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = lane_scale_min(tile, lane, j);
    }
    dst[4..16].copy_from_slice(&pack_scales_k4(&sc, &m));
    let qs = if five { 48 } else { 16 };
    for p in 0..4 {
        for r in 0..8 {
            let src = QS + (p * 8 + r) * 4 * GROUP + 4 * lane;
            dst[qs + 32 * p + 4 * r..][..4].copy_from_slice(&tile[src..src + 4]);
        }
    }
    if five {
        for r in 0..8 {
            let src = QH + r * 4 * GROUP + 4 * lane;
            dst[16 + 4 * r..][..4].copy_from_slice(&tile[src..src + 4]);
        }
    }
}

/// Weight `i` (0..256) of `lane`: the unsigned nibble `q`, with Q5_K's fifth bit.
pub(super) fn weight(format: BlockFormat, tile: &[u8], lane: usize, i: usize) -> i8 {
    let (p, within) = (i / 64, i % 64);
    let idx = within % 32;
    let byte = tile[QS + (p * 8 + idx / 4) * 4 * GROUP + 4 * lane + idx % 4];
    let mut q = if within >= 32 { byte >> 4 } else { byte & 0x0F };
    if format == BlockFormat::Q5K {
        let qh = tile[QH + (idx / 4) * 4 * GROUP + 4 * lane + idx % 4];
        q |= ((qh >> (2 * p + usize::from(within >= 32))) & 1) << 4;
    }
    q as i8
}

/// The scale `d * sc_j` and minimum `-dmin * m_j` of the 16 weights `16 * g16..` of
/// `lane` (in f32, as llama.cpp's dequantization computes them).
pub(super) fn scale_min(format: BlockFormat, tile: &[u8], lane: usize, g16: usize) -> (f32, f32) {
    debug_assert!(matches!(format, BlockFormat::Q4K | BlockFormat::Q5K));
    let (sc, m) = lane_scale_min(tile, lane, g16 / 2);
    let d = f16::from_le_bytes([tile[2 * lane], tile[2 * lane + 1]]).to_f32();
    let dmin = f16::from_le_bytes([tile[DMIN + 2 * lane], tile[DMIN + 2 * lane + 1]]).to_f32();
    (d * sc as f32, -(dmin * m as f32))
}

/// The 16 rows' scales and minimums of sub-block `j` as 16 bytes each (SSE2).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scales_16(
    t: *const u8,
    j: usize,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    let base = t.add(SC + SC_STEP * j);
    let nib = _mm_set1_epi8(0x0F);
    let widen = |p: *const u8| {
        let x = _mm_loadl_epi64(p as *const __m128i);
        _mm_unpacklo_epi8(
            _mm_and_si128(x, nib),
            _mm_and_si128(_mm_srli_epi16::<4>(x), nib),
        )
    };
    let (sc, m, hh) = (widen(base), widen(base.add(8)), widen(base.add(16)));
    let three = _mm_set1_epi8(3);
    let sc = _mm_or_si128(sc, _mm_slli_epi16::<4>(_mm_and_si128(hh, three)));
    let m = _mm_or_si128(
        m,
        _mm_slli_epi16::<4>(_mm_and_si128(_mm_srli_epi16::<2>(hh), three)),
    );
    (sc, m)
}

/// AVX-512 VNNI: rows `r0..r0 + rows`, group `g`, tiles of up to 8 activation rows;
/// `Q5`: the weights are Q5_K (else Q4_K).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn group_rows_avx512<const Q5: bool>(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
) {
    row_tiles!(r0, rows, [8, 7, 6, 5, 4, 3, 2, 1], |r, R| tile_avx512::<
        R,
        Q5,
    >(
        w, qa, g, r, out, n
    ));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_avx512<const R: usize, const Q5: bool>(
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
    let sbase = qa.sum.as_ptr().add(r * kb);
    let nibble = _mm512_set1_epi8(0x0F);
    let act = |i: usize, col: usize| {
        _mm512_set1_epi32((abase.add(i * k + col) as *const i32).read_unaligned())
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for sb in 0..nsb {
        let t = wbase.add(sb * tb);
        let wd = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
        let wdm = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(DMIN) as *const __m256i));
        for p in 0..4 {
            let mut lo_dots = [_mm512_setzero_si512(); R];
            let mut hi_dots = [_mm512_setzero_si512(); R];
            let col = sb * QK_K + 64 * p;
            for run in 0..8 {
                let v = _mm512_loadu_si512(t.add(QS + (p * 8 + run) * 64) as *const __m512i);
                let mut lo = _mm512_and_si512(v, nibble);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                if Q5 {
                    let vh = _mm512_loadu_si512(t.add(QH + run * 64) as *const __m512i);
                    let sixteen = _mm512_set1_epi8(16);
                    let bit = _mm512_set1_epi8(1 << (2 * p));
                    lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(vh, bit), lo, sixteen);
                    let bit = _mm512_set1_epi8(2 << (2 * p));
                    hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(vh, bit), hi, sixteen);
                }
                for i in 0..R {
                    lo_dots[i] = _mm512_dpbusd_epi32(lo_dots[i], lo, act(i, col + 4 * run));
                    hi_dots[i] = _mm512_dpbusd_epi32(hi_dots[i], hi, act(i, col + 32 + 4 * run));
                }
            }
            for (half, dots) in [lo_dots, hi_dots].iter().enumerate() {
                let j = 2 * p + half;
                let (sc, m) = scales_16(t, j);
                let scale = _mm512_mul_ps(wd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                let min = _mm512_mul_ps(wdm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)));
                let b = sb * 8 + j;
                for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
                    let da = *dbase.add(i * kb + b);
                    let sum = *sbase.add(i * kb + b) as f32;
                    let s = _mm512_mul_ps(scale, _mm512_set1_ps(da));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*dot), s, *acc);
                    *acc = _mm512_fnmadd_ps(min, _mm512_set1_ps(da * sum), *acc);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((r + i) * n + g * GROUP), *acc);
    }
}

/// The 256-bit kernels, with `vpmaddubsw` (AVX2) and with AVX-VNNI: one macro so that
/// only the VNNI copy is compiled with `avxvnni` (see `packed::kernels_256`). Without
/// VNNI a sub-block's runs sum in i16 before they widen: all 8 for Q4_K (at most
/// 8 x 2 x 15 x 128 = 30720), 4 at a time for Q5_K (4 x 2 x 31 x 128 = 31744).
macro_rules! q4k_256 {
    ($group:ident, $tile:ident, $features:literal, $vnni:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $group<const Q5: bool>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            r0: usize,
            rows: usize,
            out: *mut f32,
            n: usize,
        ) {
            for h in 0..2 {
                row_tiles!(r0, rows, [4, 3, 2, 1], |r, R| $tile::<R, Q5>(
                    w, qa, g, h, r, out, n
                ));
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize, const Q5: bool>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            h: usize,
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
            let sbase = qa.sum.as_ptr().add(r * kb);
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let act = |i: usize, col: usize| {
                _mm256_set1_epi32((abase.add(i * k + col) as *const i32).read_unaligned())
            };
            let widen = |x: __m128i| {
                let x = if h == 0 { x } else { _mm_srli_si128::<8>(x) };
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x))
            };
            let mut acc = [_mm256_setzero_ps(); R];
            for sb in 0..nsb {
                let t = wbase.add(sb * tb);
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(t.add(16 * h) as *const __m128i));
                let wdm = _mm256_cvtph_ps(_mm_loadu_si128(t.add(DMIN + 16 * h) as *const __m128i));
                for p in 0..4 {
                    let mut lo_dots = [_mm256_setzero_si256(); R];
                    let mut hi_dots = [_mm256_setzero_si256(); R];
                    // Without VNNI: the i16 sums of the runs since the last widening.
                    let mut lo16 = [_mm256_setzero_si256(); R];
                    let mut hi16 = [_mm256_setzero_si256(); R];
                    let col = sb * QK_K + 64 * p;
                    for run in 0..8 {
                        let v = _mm256_loadu_si256(
                            t.add(QS + (p * 8 + run) * 64 + 32 * h) as *const __m256i
                        );
                        let mut lo = _mm256_and_si256(v, nibble);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                        if Q5 {
                            let vh =
                                _mm256_loadu_si256(t.add(QH + run * 64 + 32 * h) as *const __m256i);
                            let sixteen = _mm256_set1_epi8(16);
                            let top = |x: __m256i, bit: i32| {
                                let bit = _mm256_set1_epi8(bit as i8);
                                let set = _mm256_cmpeq_epi8(_mm256_and_si256(vh, bit), bit);
                                _mm256_or_si256(x, _mm256_and_si256(set, sixteen))
                            };
                            lo = top(lo, 1 << (2 * p));
                            hi = top(hi, 2 << (2 * p));
                        }
                        for i in 0..R {
                            let (a_lo, a_hi) = (act(i, col + 4 * run), act(i, col + 32 + 4 * run));
                            if $vnni {
                                lo_dots[i] = _mm256_dpbusd_avx_epi32(lo_dots[i], lo, a_lo);
                                hi_dots[i] = _mm256_dpbusd_avx_epi32(hi_dots[i], hi, a_hi);
                            } else {
                                lo16[i] = _mm256_add_epi16(lo16[i], _mm256_maddubs_epi16(lo, a_lo));
                                hi16[i] = _mm256_add_epi16(hi16[i], _mm256_maddubs_epi16(hi, a_hi));
                            }
                        }
                        if !$vnni && (run == 7 || (Q5 && run == 3)) {
                            for i in 0..R {
                                let (l, h) = (
                                    _mm256_madd_epi16(lo16[i], ones),
                                    _mm256_madd_epi16(hi16[i], ones),
                                );
                                lo_dots[i] = _mm256_add_epi32(lo_dots[i], l);
                                hi_dots[i] = _mm256_add_epi32(hi_dots[i], h);
                                lo16[i] = _mm256_setzero_si256();
                                hi16[i] = _mm256_setzero_si256();
                            }
                        }
                    }
                    for (half, dots) in [lo_dots, hi_dots].iter().enumerate() {
                        let j = 2 * p + half;
                        let (sc, m) = scales_16(t, j);
                        let scale = _mm256_mul_ps(wd, widen(sc));
                        let min = _mm256_mul_ps(wdm, widen(m));
                        let b = sb * 8 + j;
                        for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
                            let da = *dbase.add(i * kb + b);
                            let sum = *sbase.add(i * kb + b) as f32;
                            let s = _mm256_mul_ps(scale, _mm256_set1_ps(da));
                            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*dot), s, *acc);
                            *acc = _mm256_fnmadd_ps(min, _mm256_set1_ps(da * sum), *acc);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add((r + i) * n + g * GROUP + 8 * h), *acc);
            }
        }
    };
}

q4k_256!(group_rows_avx2, tile_avx2, "avx2,fma,f16c", false);
q4k_256!(
    group_rows_vnni256,
    tile_vnni256,
    "avx2,fma,f16c,avxvnni",
    true
);

#[cfg(target_arch = "aarch64")]
pub(super) use neon_q4k::{group_rows_neon, group_rows_neon_dot};

#[cfg(target_arch = "aarch64")]
mod neon_q4k {
    use std::arch::aarch64::*;

    use super::super::neon::{dot_sdot, dot_smull, widen_f16};
    use super::*;

    /// The 16 rows' scales and minimums of sub-block `j` as 16 bytes each.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn scales_16(t: *const u8, j: usize) -> (uint8x16_t, uint8x16_t) {
        let base = t.add(SC + SC_STEP * j);
        let widen = |p: *const u8| {
            let x = vld1_u8(p);
            let z = vzip_u8(vand_u8(x, vdup_n_u8(0x0F)), vshr_n_u8::<4>(x));
            vcombine_u8(z.0, z.1)
        };
        let (sc, m, hh) = (widen(base), widen(base.add(8)), widen(base.add(16)));
        let three = vdupq_n_u8(3);
        (
            vorrq_u8(sc, vshlq_n_u8::<4>(vandq_u8(hh, three))),
            vorrq_u8(m, vshlq_n_u8::<4>(vshrq_n_u8::<2>(hh))),
        )
    }

    /// Bytes `4q..4q + 4` of `x` as four f32.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn quarter_f32(x: uint8x16_t, q: usize) -> float32x4_t {
        let b = 4 * q as u8;
        let idx: [u8; 16] = [
            b,
            255,
            255,
            255,
            b + 1,
            255,
            255,
            255,
            b + 2,
            255,
            255,
            255,
            b + 3,
            255,
            255,
            255,
        ];
        let w = vqtbl1q_u8(x, vld1q_u8(idx.as_ptr()));
        vcvtq_f32_u32(vreinterpretq_u32_u8(w))
    }

    macro_rules! q4k_neon {
        ($group:ident, $tile:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn $group<const Q5: bool>(
                w: &PackedMatrix,
                qa: &QuantRows,
                g: usize,
                r0: usize,
                rows: usize,
                out: *mut f32,
                n: usize,
            ) {
                for quarter in 0..4 {
                    row_tiles!(r0, rows, [4, 3, 2, 1], |r, R| $tile::<R, Q5>(
                        w, qa, g, quarter, r, out, n
                    ));
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $tile<const R: usize, const Q5: bool>(
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
                let sbase = qa.sum.as_ptr().add(r * kb);
                let act = |i: usize, col: usize| {
                    vreinterpretq_s8_s32(vld1q_dup_s32(abase.add(i * k + col) as *const i32))
                };
                let mut acc = [vdupq_n_f32(0.0); R];
                for sb in 0..nsb {
                    let t = wbase.add(sb * tb);
                    let wd = widen_f16(vld1_u16(t.add(8 * q) as *const u16));
                    let wdm = widen_f16(vld1_u16(t.add(DMIN + 8 * q) as *const u16));
                    for p in 0..4 {
                        let mut lo_dots = [vdupq_n_s32(0); R];
                        let mut hi_dots = [vdupq_n_s32(0); R];
                        let col = sb * QK_K + 64 * p;
                        for run in 0..8 {
                            let v = vld1q_u8(t.add(QS + (p * 8 + run) * 64 + 16 * q));
                            let mut lo = vandq_u8(v, vdupq_n_u8(0x0F));
                            let mut hi = vshrq_n_u8::<4>(v);
                            if Q5 {
                                // Bit 2p (lo) and 2p + 1 (hi) of qh moved to bit 4.
                                let vh = vld1q_u8(t.add(QH + run * 64 + 16 * q));
                                let sixteen = vdupq_n_u8(16);
                                let s = 4 - 2 * p as i8;
                                lo = vorrq_u8(lo, vandq_u8(vshlq_u8(vh, vdupq_n_s8(s)), sixteen));
                                hi = vorrq_u8(
                                    hi,
                                    vandq_u8(vshlq_u8(vh, vdupq_n_s8(s - 1)), sixteen),
                                );
                            }
                            let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                            for i in 0..R {
                                lo_dots[i] = $dot(lo_dots[i], lo, act(i, col + 4 * run));
                                hi_dots[i] = $dot(hi_dots[i], hi, act(i, col + 32 + 4 * run));
                            }
                        }
                        for (half, dots) in [lo_dots, hi_dots].iter().enumerate() {
                            let j = 2 * p + half;
                            let (sc, m) = scales_16(t, j);
                            let scale = vmulq_f32(wd, quarter_f32(sc, q));
                            let min = vmulq_f32(wdm, quarter_f32(m, q));
                            let b = sb * 8 + j;
                            for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
                                let da = *dbase.add(i * kb + b);
                                let sum = *sbase.add(i * kb + b) as f32;
                                *acc = vfmaq_f32(*acc, vcvtq_f32_s32(*dot), vmulq_n_f32(scale, da));
                                *acc = vfmsq_f32(*acc, min, vdupq_n_f32(da * sum));
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

    q4k_neon!(group_rows_neon, tile_neon, "neon", dot_smull);
    q4k_neon!(group_rows_neon_dot, tile_neon_dot, "neon,dotprod", dot_sdot);
}
