//! The `neon` level of the packed block products (aarch64). A 128-bit register holds 4
//! weights of 4 rows, a quarter of a 64-byte run, so the 16-row tiles of the x86 kernels
//! serve as four quarters, one after the other (the later ones read the group's tiles
//! from L1).
//!
//! The 4-byte dot per row is `sdot` where the CPU has the dot-product extension (one
//! instruction: 16 multiply-adds into the 4 rows' 32-bit lanes, the form llama.cpp's
//! ARM kernels use too), and `smull` + `smull2` + `addp` + `sadalp` where it has not (the
//! ARMv8.0 sequence). Both take signed bytes: Q8_0's stored `q + 128` is flipped back
//! to `q`, the nibble formats' unsigned `q` are small enough to read as signed and keep
//! the bias correction of the x86 kernels. `sdot` goes through `asm!` (its intrinsic is
//! unstable in this Rust), as does the f16 scale widening (`fcvtl`, base ARMv8 SIMD,
//! whose intrinsic needs the unstable f16 vector types).

use std::arch::aarch64::*;
use std::arch::asm;

use super::{has_min, high_bits, qh_offset, PackedMatrix, QuantRows, GROUP, K_Q8_0, QK, SCALES};

/// `acc + (w . a)` per 32-bit lane, four bytes each, with `sdot`.
#[target_feature(enable = "neon,dotprod")]
#[inline]
pub(super) unsafe fn dot_sdot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: the function's `dotprod` feature is on the CPU (its callers are the
    // `NeonDot` path only); the instruction touches registers only.
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        a = in(vreg) a,
        options(pure, nomem, nostack)
    );
    acc
}

/// `acc + (w . a)` per 32-bit lane without `sdot`: byte products into i16 (at most
/// 128 x 127 each), adjacent pairs summed (still within i16), then pairs of pairs
/// accumulated into i32.
#[target_feature(enable = "neon")]
#[inline]
pub(super) unsafe fn dot_smull(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
    let hi = vmull_high_s8(w, a);
    vpadalq_s16(acc, vpaddq_s16(lo, hi))
}

/// Four f16 (as bits) to f32.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) unsafe fn widen_f16(bits: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: base ARMv8 SIMD; registers only.
    asm!(
        "fcvtl {o:v}.4s, {i:v}.4h",
        o = lateout(vreg) out,
        i = in(vreg) bits,
        options(pure, nomem, nostack)
    );
    out
}

macro_rules! neon_kernels {
    ($group:ident, $tile:ident, $features:literal, $dot:ident) => {
        /// Rows `r0..r0 + rows` of the output, columns of group `g`, in register tiles of
        /// up to 4 rows, for each quarter of the group.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $group<const KIND: u8>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            r0: usize,
            rows: usize,
            out: *mut f32,
            n: usize,
        ) {
            for quarter in 0..4 {
                row_tiles!(r0, rows, [4, 3, 2, 1], |r, R| $tile::<R, KIND>(
                    w, qa, g, quarter, r, out, n
                ));
            }
        }

        /// One register tile: R activation rows from `r` times rows `4q..4q + 4` of group
        /// `g`, over every block; stored to `out[r.., g*16 + 4q..]`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize, const KIND: u8>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            q: usize,
            r: usize,
            out: *mut f32,
            n: usize,
        ) {
            let k = w.cols;
            let kb = k / QK;
            let tb = w.format.tile_bytes();
            let bias = w.format.bias();
            let wbase = w.data.as_ptr().add(g * kb * tb);
            let abase = qa.q.as_ptr().add(r * k);
            let dbase = qa.d.as_ptr().add(r * kb);
            let sbase = qa.sum.as_ptr().add(r * kb);
            let act = |i: usize, b: usize, col: usize| {
                vreinterpretq_s8_s32(vld1q_dup_s32(abase.add(i * k + b * QK + col) as *const i32))
            };
            let mut acc = [vdupq_n_f32(0.0); R];
            for b in 0..kb {
                let t = wbase.add(b * tb);
                let wd = widen_f16(vld1_u16(t.add(8 * q) as *const u16));
                let runs = t.add(GROUP * w.format.head() + 16 * q);
                let mut dots = [vdupq_n_s32(0); R];
                if KIND == K_Q8_0 {
                    for j in 0..QK / 4 {
                        let v = veorq_u8(vld1q_u8(runs.add(j * 4 * GROUP)), vdupq_n_u8(0x80));
                        let v = vreinterpretq_s8_u8(v);
                        for (i, dot) in dots.iter_mut().enumerate() {
                            *dot = $dot(*dot, v, act(i, b, 4 * j));
                        }
                    }
                } else {
                    let qh = if high_bits(KIND) {
                        vld1q_u32(t.add(qh_offset(KIND) + 16 * q) as *const u32)
                    } else {
                        vdupq_n_u32(0)
                    };
                    for j in 0..QK / 8 {
                        let v = vld1q_u8(runs.add(j * 4 * GROUP));
                        let mut lo = vandq_u8(v, vdupq_n_u8(0x0F));
                        let mut hi = vshrq_n_u8::<4>(v);
                        if high_bits(KIND) {
                            // The fifth bits to bit 4 of each byte (see the x86 kernels).
                            let five = vdupq_n_u8(0x10);
                            let lo_bits = vshlq_u32(qh, vdupq_n_s32(4 - 2 * j as i32));
                            let hi_bits = vshlq_u32(qh, vdupq_n_s32(3 - 2 * j as i32));
                            lo = vorrq_u8(lo, vandq_u8(vreinterpretq_u8_u32(lo_bits), five));
                            hi = vorrq_u8(hi, vandq_u8(vreinterpretq_u8_u32(hi_bits), five));
                        }
                        let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                        for (i, dot) in dots.iter_mut().enumerate() {
                            *dot = $dot(*dot, lo, act(i, b, 4 * j));
                            *dot = $dot(*dot, hi, act(i, b, 16 + 4 * j));
                        }
                    }
                }
                for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
                    let sum = *sbase.add(i * kb + b);
                    let da = *dbase.add(i * kb + b);
                    let s = if KIND == K_Q8_0 || has_min(KIND) {
                        *dot
                    } else {
                        vsubq_s32(*dot, vdupq_n_s32(bias * sum))
                    };
                    *acc = vfmaq_f32(*acc, vcvtq_f32_s32(s), vmulq_n_f32(wd, da));
                    if has_min(KIND) {
                        let wm = widen_f16(vld1_u16(t.add(SCALES + 8 * q) as *const u16));
                        *acc = vfmaq_f32(*acc, wm, vdupq_n_f32(da * sum as f32));
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                vst1q_f32(out.add((r + i) * n + g * GROUP + 4 * q), *acc);
            }
        }
    };
}

neon_kernels!(group_rows, tile, "neon", dot_smull);
neon_kernels!(group_rows_dot, tile_dot, "neon,dotprod", dot_sdot);

/// One block of `quantize_rows` with NEON (the same bytes as the scalar form: `fcvtns`
/// rounds to nearest, ties to even): returns the scale and the sum of the bytes.
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    debug_assert!(xs.len() == QK && q.len() == QK);
    let p = xs.as_ptr();
    let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
    let mut m = vabsq_f32(v[0]);
    for x in &v[1..] {
        m = vmaxq_f32(m, vabsq_f32(*x));
    }
    let scale = vmaxvq_f32(m) / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let (lo, hi) = (vdupq_n_f32(-127.0), vdupq_n_f32(127.0));
    let r: [int32x4_t; 8] = std::array::from_fn(|i| {
        vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_n_f32(v[i], inv), lo), hi))
    });
    for h in 0..2 {
        let a = vcombine_s16(vqmovn_s32(r[4 * h]), vqmovn_s32(r[4 * h + 1]));
        let b = vcombine_s16(vqmovn_s32(r[4 * h + 2]), vqmovn_s32(r[4 * h + 3]));
        vst1q_s8(
            q.as_mut_ptr().add(16 * h),
            vcombine_s8(vqmovn_s16(a), vqmovn_s16(b)),
        );
    }
    let total = r[1..].iter().fold(r[0], |t, x| vaddq_s32(t, *x));
    (scale, vaddvq_s32(total))
}
