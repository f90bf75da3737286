//! Q8_0 matrix products on the CPU, for weights in llama.cpp's Q8_0 block format (per
//! block of 32 weights along a row: one f16 scale `d` and 32 signed bytes `q`, the weight
//! being `d * q`).
//!
//! Why a kernel of our own: the row-by-row block dot (candle's `vec_dot`, and llama.cpp's
//! scalar-layout path) spends most of its instructions on per-block bookkeeping (scale
//! conversion, horizontal sums) rather than on multiply-adds. Here the weight matrix is
//! repacked once, at load, so that one 512-bit register holds 4 consecutive bytes of 16
//! different rows. A `vpdpbusd` (AVX-512 VNNI) against 4 bytes of one activation row,
//! broadcast, then does 64 multiply-adds that all land in their own row's lane: no
//! horizontal sums, and one scale step per block for 16 rows at once.
//!
//! Layout of [`PackedQ8`]: rows in groups of [`GROUP`] (16); for each group and each block
//! of 32 columns, 544 bytes: the 16 rows' f16 scales (32 bytes), then 8 runs of 64 bytes,
//! run `j` holding columns `4j..4j+4` of the block for the 16 rows in turn. Each weight
//! byte is stored as `q + 128` (an unsigned byte, the operand `vpdpbusd` multiplies as
//! unsigned), and the activations, quantized to signed bytes per block of 32 with an f32
//! scale, carry their block sums so that the `128 * sum(a)` this adds is taken off exactly
//! in integers. The bytes held equal the Q8_0 bytes (34 per 32 weights): the memory
//! planner's figure does not change.
//!
//! Products use integer arithmetic within a block, so the result equals
//! `sum_b d_w[b] * d_a[b] * sum_i q_w[i] * q_a[i]` up to f32 rounding of the block sums;
//! [`matmul_q8_reference`] computes that sum plainly and the tests hold the fast kernel to
//! it. Without AVX-512 VNNI ([`PackedQ8::fast_path_available`] is false) the reference is
//! what runs; the engine then keeps candle's layout instead of packing.

use half::f16;
use rayon::prelude::*;

use crate::KernelError;

/// Weights per block (the Q8_0 block length).
pub const QK: usize = 32;
/// Rows interleaved in one packed group.
pub const GROUP: usize = 16;
/// Bytes of one Q8_0 block: f16 scale + 32 signed bytes.
pub const Q8_BLOCK_BYTES: usize = 2 + QK;
/// Bytes of one packed (group, block) tile.
const TILE_BYTES: usize = GROUP * Q8_BLOCK_BYTES;
/// Activation rows processed together by the kernel (register tile).
const MR: usize = 8;
/// Activation rows per sequential chunk, so a chunk's quantized rows stay in cache while
/// every weight group streams past them.
const M_CHUNK: usize = 128;

/// A (rows, cols) Q8_0 matrix in the interleaved layout described in the module docs.
#[derive(Clone)]
pub struct PackedQ8 {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PackedQ8 {
    /// True when this CPU runs the fast kernel (x86-64 with AVX-512 F/BW/VNNI). Callers
    /// that have another layout to fall back on should pack only when this holds.
    pub fn fast_path_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether a (rows, cols) matrix can be packed: rows a multiple of 16, cols of 32.
    pub fn can_pack(rows: usize, cols: usize) -> bool {
        rows > 0 && cols > 0 && rows % GROUP == 0 && cols % QK == 0
    }

    /// Repack `blocks`, a row-major (rows, cols) matrix of Q8_0 blocks as GGUF and candle
    /// store them (per block: the f16 scale, little-endian, then 32 signed bytes).
    pub fn from_q8_0_blocks(rows: usize, cols: usize, blocks: &[u8]) -> Result<Self, KernelError> {
        if !Self::can_pack(rows, cols) {
            return Err(KernelError::Invalid(format!(
                "a packed Q8_0 matrix needs rows a multiple of {GROUP} and columns a multiple \
                 of {QK}; got ({rows}, {cols})"
            )));
        }
        let kb = cols / QK;
        crate::check_len(
            "Q8_0 blocks",
            blocks.len(),
            rows * kb * Q8_BLOCK_BYTES,
            || format!("({rows}, {cols}) at {Q8_BLOCK_BYTES} bytes per {QK} weights"),
        )?;
        let mut data = vec![0u8; blocks.len()];
        data.par_chunks_mut(kb * TILE_BYTES)
            .enumerate()
            .for_each(|(g, dst)| {
                for b in 0..kb {
                    let tile = &mut dst[b * TILE_BYTES..(b + 1) * TILE_BYTES];
                    for lane in 0..GROUP {
                        let src = &blocks[((g * GROUP + lane) * kb + b) * Q8_BLOCK_BYTES..]
                            [..Q8_BLOCK_BYTES];
                        tile[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                        for j in 0..QK / 4 {
                            for t in 0..4 {
                                tile[2 * GROUP + j * 4 * GROUP + lane * 4 + t] =
                                    src[2 + 4 * j + t] ^ 0x80;
                            }
                        }
                    }
                }
            });
        Ok(PackedQ8 { rows, cols, data })
    }

    /// Back to row-major Q8_0 blocks (the inverse of [`PackedQ8::from_q8_0_blocks`]).
    pub fn to_q8_0_blocks(&self) -> Vec<u8> {
        let kb = self.cols / QK;
        let mut out = vec![0u8; self.data.len()];
        for row in 0..self.rows {
            for b in 0..kb {
                let dst = &mut out[(row * kb + b) * Q8_BLOCK_BYTES..][..Q8_BLOCK_BYTES];
                let (tile, lane) = self.tile(row, b);
                dst[..2].copy_from_slice(&tile[2 * lane..2 * lane + 2]);
                for j in 0..QK / 4 {
                    for t in 0..4 {
                        dst[2 + 4 * j + t] = tile[2 * GROUP + j * 4 * GROUP + lane * 4 + t] ^ 0x80;
                    }
                }
            }
        }
        out
    }

    /// The tile holding block `b` of `row`, and the row's lane in it.
    fn tile(&self, row: usize, b: usize) -> (&[u8], usize) {
        let kb = self.cols / QK;
        let g = row / GROUP;
        let start = (g * kb + b) * TILE_BYTES;
        (&self.data[start..start + TILE_BYTES], row % GROUP)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: exactly the Q8_0 size, 34 bytes per 32 weights.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `row` in f32 (`d * q` per weight), into `out` (`cols` long). An embedding
    /// lookup uses this for the rows a pass needs.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if row >= self.rows {
            return Err(KernelError::Invalid(format!(
                "row {row} is out of range for a matrix of {} rows",
                self.rows
            )));
        }
        crate::check_len("row", out.len(), self.cols, || {
            format!("{} columns", self.cols)
        })?;
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate() {
            let (tile, lane) = self.tile(row, b);
            let d = f16::from_le_bytes([tile[2 * lane], tile[2 * lane + 1]]).to_f32();
            for (i, o) in chunk.iter_mut().enumerate() {
                let q = (tile[2 * GROUP + (i / 4) * 4 * GROUP + lane * 4 + i % 4] ^ 0x80) as i8;
                *o = d * q as f32;
            }
        }
        Ok(())
    }
}

/// Activation rows quantized per block of 32: signed bytes, an f32 scale and the sum of
/// the bytes, per block.
#[derive(Debug, Clone)]
pub struct QuantRows {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
}

/// Quantize `m` rows of `k` (a multiple of 32) values: per block, `d = max|x| / 127` and
/// `q = round(x / d)`.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> Result<QuantRows, KernelError> {
    if k == 0 || k % QK != 0 {
        return Err(KernelError::Invalid(format!(
            "rows of {k} values cannot be quantized in blocks of {QK}"
        )));
    }
    crate::check_len("activations", x.len(), m * k, || format!("({m}, {k})"))?;
    let kb = k / QK;
    let mut out = QuantRows {
        k,
        q: vec![0; m * k],
        d: vec![0.0; m * kb],
        sum: vec![0; m * kb],
    };
    let fast = PackedQ8::fast_path_available();
    let block = |xs: &[f32], q: &mut [i8], d: &mut f32, s: &mut i32| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX-512 F/BW present (checked); `xs` and `q` are QK long.
            (*d, *s) = unsafe { quantize_block_avx512(xs, q) };
            return;
        }
        let _ = fast;
        (*d, *s) = quantize_block_scalar(xs, q);
    };
    type Row<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]);
    let row = |(((xs, q), d), s): Row<'_>| {
        for (((xs, q), d), s) in xs
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(d.iter_mut())
            .zip(s.iter_mut())
        {
            block(xs, q, d, s);
        }
    };
    if m >= 16 {
        x.par_chunks(k)
            .zip(out.q.par_chunks_mut(k))
            .zip(out.d.par_chunks_mut(kb))
            .zip(out.sum.par_chunks_mut(kb))
            .with_min_len(8)
            .for_each(row);
    } else {
        x.chunks(k)
            .zip(out.q.chunks_mut(k))
            .zip(out.d.chunks_mut(kb))
            .zip(out.sum.chunks_mut(kb))
            .for_each(row);
    }
    Ok(out)
}

/// One block of [`quantize_rows`]: returns the scale and the sum of the bytes.
fn quantize_block_scalar(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut total = 0i32;
    for (o, v) in q.iter_mut().zip(xs) {
        let r = (v * inv).clamp(-127.0, 127.0).round_ties_even() as i8;
        *o = r;
        total += r as i32;
    }
    (scale, total)
}

/// One block of [`quantize_rows`] with AVX-512 (rounding to nearest, ties to even, as
/// the scalar form): returns the scale and the sum of the bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() == QK && q.len() == QK);
    let a = _mm512_loadu_ps(xs.as_ptr());
    let b = _mm512_loadu_ps(xs.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let scale = amax / 127.0;
    let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let lo = _mm512_set1_ps(-127.0);
    let hi = _mm512_set1_ps(127.0);
    let qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(a, inv), lo), hi));
    let qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(b, inv), lo), hi));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(qb),
    );
    (scale, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}

/// `out = x w^T`: `x` is (m, cols) f32, `w` (rows, cols) packed Q8_0, `out` (m, rows).
/// The activations are quantized per block of 32 first, as llama.cpp does for Q8_0.
pub fn matmul_q8(x: &[f32], m: usize, w: &PackedQ8, out: &mut [f32]) -> Result<(), KernelError> {
    let (n, k) = (w.rows, w.cols);
    crate::check_len("output", out.len(), m * n, || format!("({m}, {n})"))?;
    let qa = quantize_rows(x, m, k)?;
    if !PackedQ8::fast_path_available() {
        out.copy_from_slice(&matmul_q8_reference(&qa, m, w));
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let groups = n / GROUP;
        let out_ptr = OutPtr(out.as_mut_ptr());
        for r0 in (0..m).step_by(M_CHUNK) {
            let rows = M_CHUNK.min(m - r0);
            let run = |g: usize| {
                let out_ptr = &out_ptr;
                // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked above); task `g` writes
                // only columns g*16..g*16+16 of rows r0..r0+rows, which no other task
                // touches, and every index stays inside `out` (m * n, checked above),
                // `qa` (m rows of k) and `w` (groups * kb tiles).
                unsafe { group_rows(w, &qa, g, r0, rows, out_ptr.0, n) }
            };
            if rows * n * k >= 1 << 18 {
                (0..groups).into_par_iter().with_min_len(2).for_each(run);
            } else {
                (0..groups).for_each(run);
            }
        }
    }
    Ok(())
}

/// The plain form of [`matmul_q8`]'s arithmetic on already quantized rows, the reference
/// for the fast kernel (and what runs without AVX-512 VNNI).
pub fn matmul_q8_reference(qa: &QuantRows, m: usize, w: &PackedQ8) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let kb = k / QK;
    debug_assert_eq!(qa.k, k);
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for o in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let (tile, lane) = w.tile(o, b);
                let dw = f16::from_le_bytes([tile[2 * lane], tile[2 * lane + 1]]).to_f32();
                let mut s = 0i32;
                for i in 0..QK {
                    let qw =
                        (tile[2 * GROUP + (i / 4) * 4 * GROUP + lane * 4 + i % 4] ^ 0x80) as i8;
                    s += qw as i32 * qa.q[r * k + b * QK + i] as i32;
                }
                acc += s as f32 * (dw * qa.d[r * kb + b]);
            }
            out[r * n + o] = acc;
        }
    }
    out
}

/// The output pointer shared by the tasks of [`matmul_q8`], each writing its own columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul_q8`), and the buffer outlives them.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Rows `r0..r0 + rows` of the output, columns of group `g`, in register tiles of MR rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_rows(
    w: &PackedQ8,
    qa: &QuantRows,
    g: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
) {
    let mut r = r0;
    let end = r0 + rows;
    while r < end {
        let left = end - r;
        match left {
            8.. => tile::<8>(w, qa, g, r, out, n),
            7 => tile::<7>(w, qa, g, r, out, n),
            6 => tile::<6>(w, qa, g, r, out, n),
            5 => tile::<5>(w, qa, g, r, out, n),
            4 => tile::<4>(w, qa, g, r, out, n),
            3 => tile::<3>(w, qa, g, r, out, n),
            2 => tile::<2>(w, qa, g, r, out, n),
            _ => tile::<1>(w, qa, g, r, out, n),
        }
        r += left.min(MR);
    }
}

/// One register tile: R activation rows starting at `r` times the 16 rows of group `g`,
/// over every block; 16 results per activation row, stored to `out[r.., g*16..]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize>(
    w: &PackedQ8,
    qa: &QuantRows,
    g: usize,
    r: usize,
    out: *mut f32,
    n: usize,
) {
    use std::arch::x86_64::*;
    let k = w.cols;
    let kb = k / QK;
    let wbase = w.data.as_ptr().add(g * kb * TILE_BYTES);
    let abase = qa.q.as_ptr().add(r * k);
    let dbase = qa.d.as_ptr().add(r * kb);
    let sbase = qa.sum.as_ptr().add(r * kb);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let t = wbase.add(b * TILE_BYTES);
        let wd = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
        let mut dots = [_mm512_setzero_si512(); R];
        for j in 0..QK / 4 {
            let wv = _mm512_loadu_si512(t.add(2 * GROUP + j * 4 * GROUP) as *const __m512i);
            for (i, dot) in dots.iter_mut().enumerate() {
                let a = (abase.add(i * k + b * QK + 4 * j) as *const i32).read_unaligned();
                *dot = _mm512_dpbusd_epi32(*dot, wv, _mm512_set1_epi32(a));
            }
        }
        for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
            let s = _mm512_sub_epi32(*dot, _mm512_set1_epi32(128 * *sbase.add(i * kb + b)));
            let scale = _mm512_mul_ps(wd, _mm512_set1_ps(*dbase.add(i * kb + b)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((r + i) * n + g * GROUP), *acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// Row-major Q8_0 blocks for random weights (the usual quantizer: d = max|w| / 127).
    fn random_blocks(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let mut blocks = Vec::new();
        let mut deq = Vec::new();
        for _ in 0..rows * cols / QK {
            let xs: Vec<f32> = (0..QK).map(|_| rng.uniform() * 0.5).collect();
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            blocks.extend_from_slice(&d.to_le_bytes());
            for v in &xs {
                let q = (v / d.to_f32()).round().clamp(-127.0, 127.0) as i8;
                blocks.push(q as u8);
                deq.push(q as f32 * d.to_f32());
            }
        }
        (blocks, deq)
    }

    #[test]
    fn packing_round_trips_and_dequantizes_rows() {
        let (rows, cols) = (48, 96);
        let (blocks, deq) = random_blocks(rows, cols, 7);
        let p = PackedQ8::from_q8_0_blocks(rows, cols, &blocks).unwrap();
        assert_eq!(p.bytes(), rows * cols / QK * Q8_BLOCK_BYTES);
        assert_eq!(p.to_q8_0_blocks(), blocks);
        let mut row = vec![0f32; cols];
        for r in [0, 1, 15, 16, 47] {
            p.dequantize_row(r, &mut row).unwrap();
            assert_eq!(row, deq[r * cols..(r + 1) * cols]);
        }
        assert!(p.dequantize_row(48, &mut row).is_err());
    }

    #[test]
    fn bad_shapes_are_refused_with_the_numbers() {
        let e = PackedQ8::from_q8_0_blocks(10, 32, &[0; 340]).unwrap_err();
        assert!(e.to_string().contains("(10, 32)"), "{e}");
        let e = PackedQ8::from_q8_0_blocks(16, 32, &[0; 10]).unwrap_err();
        assert!(e.to_string().contains("544"), "{e}");
        let e = quantize_rows(&[0.0; 40], 1, 40).unwrap_err();
        assert!(e.to_string().contains("40"), "{e}");
    }

    #[test]
    fn quantized_rows_reconstruct_within_half_a_step() {
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..3 * 64).map(|_| rng.uniform() * 4.0).collect();
        let q = quantize_rows(&x, 3, 64).unwrap();
        for (i, v) in x.iter().enumerate() {
            let d = q.d[i / QK];
            assert!((q.q[i] as f32 * d - v).abs() <= 0.5 * d + 1e-6);
        }
        let zeros = quantize_rows(&[0.0; 32], 1, 32).unwrap();
        assert_eq!((zeros.d[0], zeros.sum[0]), (0.0, 0));
    }

    /// The fast kernel against the reference, and both against the f32 product of the
    /// dequantized matrices, for every tail of the 8-row register tile and for the
    /// chunking of long inputs.
    #[test]
    fn matmul_matches_reference_and_dequantized_product() {
        for &(m, n, k) in &[
            (1, 16, 32),
            (3, 32, 64),
            (8, 48, 96),
            (13, 16, 576),
            (131, 32, 64),
        ] {
            let (blocks, wdeq) = random_blocks(n, k, m as u64);
            let w = PackedQ8::from_q8_0_blocks(n, k, &blocks).unwrap();
            let mut rng = Rng::new(100 + m as u64);
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
            let mut out = vec![0f32; m * n];
            matmul_q8(&x, m, &w, &mut out).unwrap();
            let qa = quantize_rows(&x, m, k).unwrap();
            let reference = matmul_q8_reference(&qa, m, &w);
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "({m},{n},{k}) at {i}: {a} vs {b}"
                );
            }
            // Activation quantization error: at most half a step per value, so the
            // product moves by at most sum |w| * d_a / 2 per block.
            for r in 0..m {
                for o in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * wdeq[o * k + i]).sum();
                    let bound: f32 = (0..k)
                        .map(|i| wdeq[o * k + i].abs() * qa.d[r * (k / QK) + i / QK] * 0.5)
                        .sum::<f32>()
                        + 1e-4;
                    let got = out[r * n + o];
                    assert!(
                        (got - exact).abs() <= bound,
                        "({r},{o}): {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn vector_and_scalar_quantizers_agree() {
        if !PackedQ8::fast_path_available() {
            eprintln!("no AVX-512 VNNI here: only the scalar quantizer runs");
            return;
        }
        let mut rng = Rng::new(9);
        for scale in [1e-6f32, 1.0, 300.0] {
            let xs: Vec<f32> = (0..QK).map(|_| rng.uniform() * scale).collect();
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let fast = unsafe { quantize_block_avx512(&xs, &mut a) };
            let slow = quantize_block_scalar(&xs, &mut b);
            assert_eq!((fast, a), (slow, b), "scale {scale}");
        }
    }

    #[test]
    fn matmul_checks_lengths() {
        let (blocks, _) = random_blocks(16, 32, 1);
        let w = PackedQ8::from_q8_0_blocks(16, 32, &blocks).unwrap();
        let mut out = vec![0f32; 15];
        assert!(matmul_q8(&[0.0; 32], 1, &w, &mut out).is_err());
        let mut out = vec![0f32; 16];
        assert!(matmul_q8(&[0.0; 31], 1, &w, &mut out).is_err());
    }
}
