//! Block-quantized matrix products on the CPU, for weights in llama.cpp's Q8_0, Q4_0, Q4_1
//! and Q5_0 block formats (per block of 32 weights along a row: one f16 scale `d` and 32 signed
//! bytes `q` (Q8_0), or 16 bytes of 4-bit `q + 8` (Q4_0: element `i` in the low nibble of
//! byte `i`, element `16 + i` in its high nibble); the weight is `d * q`. Q4_1 adds an f16
//! minimum `m` per block and stores unsigned `q`: the weight is `d * q + m`; Q5_1 is Q4_1
//! with a fifth bit per weight, stored as Q5_0's), and the k-quants Q4_K, Q5_K and Q6_K
//! (super-blocks of 256, laid out by the `kquant` and `q6k` submodules).
//!
//! This module describes the AVX-512 form; the `avx2` level runs the same tiles as two
//! halves of 8 rows (256-bit registers), the `neon` level as four quarters of 4 rows
//! (`neon` submodule); see `crate::cpu` for the levels.
//!
//! Why a kernel of our own: the row-by-row block dot (candle's `vec_dot`, and llama.cpp's
//! plain-layout path) spends most of its instructions on per-block bookkeeping (scale
//! conversion, horizontal sums) rather than on multiply-adds. Here the weight matrix is
//! repacked once, at load, so that one 512-bit register holds 4 consecutive weights of 16
//! different rows. A `vpdpbusd` (AVX-512 VNNI) against 4 bytes of one activation row,
//! broadcast, then does 64 multiply-adds that all land in their own row's lane: no
//! horizontal sums, and one scale step per block for 16 rows at once.
//!
//! Layout of [`PackedMatrix`]: rows in groups of [`GROUP`] (16); for each group and each
//! block of 32 columns, one tile: the 16 rows' f16 scales (32 bytes; Q4_1: then their 16
//! minimums), then runs of 64 bytes, 4 bytes per row in turn. Q8_0: 8 runs, run `j` holding columns `4j..4j+4`, each
//! stored as `q + 128` (an unsigned byte, the operand `vpdpbusd` multiplies as unsigned).
//! Q4_0 and Q4_1: 4 runs, run `j` holding bytes `4j..4j+4` of the block as stored (columns
//! `4j..4j+4` in the low nibbles, `16+4j..16+4j+4` in the high ones). Q4_1's minimum
//! contributes `m * d_a * sum(q_a)` per block, one more multiply-add for 16 rows.
//! Q5_0 (the file's block: f16 `d`, 4 bytes `qh` with weight `i`'s fifth bit at bit `i`,
//! then Q4_0's 16 nibble bytes; the weight is `d * (q - 16)`) is laid out like Q4_0 with
//! the 16 rows' high bits between the scales and the runs, 4 bytes per row, reordered
//! so that one shift per run brings each weight's fifth bit beside its nibble
//! (`spread_high_bits`). Q5_0 is what llama.cpp's Q4_K_M and Q5_K_M files fall back to
//! for rows whose length is not a multiple of 256 (all of SmolLM2's 576-wide matrices).
//! The activations, quantized to signed bytes per block of 32 with an f32 scale, carry
//! their block sums so that the `128 * sum(a)` (or `8 * sum(a)`) the unsigned weights add
//! is taken off exactly in integers. The bytes held equal the block format's (34, 18, 20, 22
//! or 24 per 32 weights; 144, 176 and 210 per 256): the memory planner's figure does not change.
//!
//! Products use integer arithmetic within a block, so the result equals
//! `sum_b d_w[b] * d_a[b] * sum_i q_w[i] * q_a[i]` up to f32 rounding of the block sums;
//! [`matmul_reference`] computes that sum plainly and the tests hold the fast kernel to
//! it. At the `scalar` level ([`PackedMatrix::fast_path_available`] is false) the reference
//! is what runs; the engine then keeps candle's layout instead of packing.

use half::f16;
use rayon::prelude::*;

use crate::cpu::CpuLevel;
use crate::KernelError;

/// Weights per block (the Q8_0 block length).
pub const QK: usize = 32;
/// Rows interleaved in one packed group.
pub const GROUP: usize = 16;

/// Rows `r0..r0 + rows` of an output in register tiles, largest first: `$tile::<R>` with
/// `R` the tile's row count (a literal of the list; the largest repeats while it fits, the
/// others take the remainder exactly) and `$r` the tile's first row. The one walk every
/// kernel of every format and level shares; the tiles themselves differ.
macro_rules! row_tiles {
    ($r0:expr, $rows:expr, [$max:literal $(, $n:literal)*],
     |$r:ident, R| $tile:ident::<R $(, $k:ident)? $(,)?> $args:tt) => {
        row_tiles!(@walk $r0, $rows, $r, [$tile $(, $k)?] $args, $max, [$($n),*])
    };
    (@walk $r0:expr, $rows:expr, $r:ident, $call:tt $args:tt, $max:literal, [$($n:literal),*]) => {{
        let end = $r0 + $rows;
        let mut $r = $r0;
        while $r < end {
            let left = end - $r;
            if left >= $max {
                row_tiles!(@call $call $max $args);
                $r += $max;
            }
            $(else if left == $n {
                row_tiles!(@call $call $n $args);
                $r += $n;
            })*
        }
    }};
    (@call [$tile:ident $(, $k:ident)?] $n:literal $args:tt) => {
        $tile::<$n $(, $k)?> $args
    };
}

mod kquant;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
mod q6k;
/// Bytes of the 16 scales at the head of a tile.
const SCALES: usize = 2 * GROUP;

/// Kernel variants (a const parameter of the register tile).
const K_Q8_0: u8 = 0;
const K_Q4_0: u8 = 1;
const K_Q4_1: u8 = 2;
const K_Q5_0: u8 = 3;
const K_Q5_1: u8 = 4;

/// Kernels whose weights carry a fifth bit (Q5_0, Q5_1).
const fn high_bits(kind: u8) -> bool {
    kind == K_Q5_0 || kind == K_Q5_1
}

/// Kernels whose blocks carry a minimum (Q4_1, Q5_1): weights unsigned, no bias.
const fn has_min(kind: u8) -> bool {
    kind == K_Q4_1 || kind == K_Q5_1
}

/// Where a tile's spread fifth bits start: after the scales, and the minimums if any.
const fn qh_offset(kind: u8) -> usize {
    if kind == K_Q5_1 {
        2 * SCALES
    } else {
        SCALES
    }
}

/// The block formats the kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    /// llama.cpp's Q4_K: super-blocks of 256 (see [`kquant`]).
    Q4K,
    /// llama.cpp's Q5_K: Q4_K with a fifth bit (see [`kquant`]).
    Q5K,
    /// llama.cpp's Q6_K: super-blocks of 256 (see [`q6k`]).
    Q6K,
}

impl BlockFormat {
    /// Bytes of one block as GGUF stores it: 32 weights with their scale (and minimum),
    /// or a k-quant super-block of 256.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 2 + QK,
            BlockFormat::Q4_0 => 2 + QK / 2,
            BlockFormat::Q4_1 => 4 + QK / 2,
            BlockFormat::Q5_0 => 6 + QK / 2,
            BlockFormat::Q5_1 => 8 + QK / 2,
            BlockFormat::Q4K => kquant::Q4K_BYTES,
            BlockFormat::Q5K => kquant::Q5K_BYTES,
            BlockFormat::Q6K => q6k::Q6K_BYTES,
        }
    }

    /// Weights per block: 32, or 256 for the k-quants.
    pub const fn block_len(self) -> usize {
        match self {
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => kquant::QK_K,
            _ => QK,
        }
    }

    /// True for the formats with a minimum per block (Q4_1, Q5_1; Q4_K has its own).
    const fn has_min(self) -> bool {
        matches!(self, BlockFormat::Q4_1 | BlockFormat::Q5_1)
    }

    /// Where the file's `qh` starts in a block, and the spread bits in a tile (Q5_0, Q5_1).
    const fn high_bits_at(self) -> Option<(usize, usize)> {
        match self {
            BlockFormat::Q5_0 => Some((2, SCALES)),
            BlockFormat::Q5_1 => Some((4, 2 * SCALES)),
            _ => None,
        }
    }

    /// True for the k-quant formats (super-blocks, laid out by [`kquant`]).
    const fn is_k(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K)
    }

    /// Bytes before the weights, in a block (scale, and Q4_1's minimum) and per row in a
    /// tile.
    const fn head(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 4,
            BlockFormat::Q5_0 => 6,
            BlockFormat::Q5_1 => 8,
            _ => 2,
        }
    }

    const fn tile_bytes(self) -> usize {
        GROUP * self.block_bytes()
    }

    /// What the stored unsigned weight exceeds the signed one by.
    const fn bias(self) -> i32 {
        match self {
            BlockFormat::Q8_0 => 128,
            BlockFormat::Q4_0 => 8,
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => 0,
            BlockFormat::Q5_0 => 16,
            BlockFormat::Q6K => 32,
        }
    }

    /// What a stored weight byte is XORed with: Q8_0's signed bytes are kept unsigned
    /// (`q + 128`); the nibble formats are stored as the file has them.
    const fn flip(self) -> u8 {
        match self {
            BlockFormat::Q8_0 => 0x80,
            _ => 0,
        }
    }

    /// Bytes of weights per row and block (32 or 16): 4 per row in each 64-byte run.
    const fn runs(self) -> usize {
        (self.block_bytes() - self.head()) / 4
    }

    pub const fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "q8_0",
            BlockFormat::Q4_0 => "q4_0",
            BlockFormat::Q4_1 => "q4_1",
            BlockFormat::Q5_0 => "q5_0",
            BlockFormat::Q5_1 => "q5_1",
            BlockFormat::Q4K => "q4_k",
            BlockFormat::Q5K => "q5_k",
            BlockFormat::Q6K => "q6_k",
        }
    }
}
/// Activation rows per sequential chunk, so a chunk's quantized rows stay in cache while
/// every weight group streams past them.
const M_CHUNK: usize = 128;

/// A (rows, cols) block-quantized matrix in the interleaved layout of the module docs.
#[derive(Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl PackedMatrix {
    /// True when the kernel level ([`crate::cpu::level`]) has a packed kernel (`avx2` or
    /// `avx512`). Callers that have another layout to fall back on should pack only when
    /// this holds.
    pub fn fast_path_available() -> bool {
        crate::cpu::level().has_kernels()
    }

    /// Whether a (rows, cols) matrix can be packed: rows a multiple of 16, cols of 32.
    pub fn can_pack(rows: usize, cols: usize) -> bool {
        rows > 0 && cols > 0 && rows % GROUP == 0 && cols % QK == 0
    }

    /// Whether a (rows, cols) matrix of `format` can be packed: rows a multiple of 16,
    /// cols of the format's block (32, or 256 for the k-quants).
    pub fn can_pack_as(format: BlockFormat, rows: usize, cols: usize) -> bool {
        Self::can_pack(rows, cols) && cols % format.block_len() == 0
    }

    /// Repack `blocks`, a row-major (rows, cols) matrix of `format` blocks as GGUF and
    /// candle store them (per block: the f16 scale, little-endian, then the weights).
    pub fn from_blocks(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        blocks: &[u8],
    ) -> Result<Self, KernelError> {
        if !Self::can_pack_as(format, rows, cols) {
            return Err(KernelError::Invalid(format!(
                "a packed {} matrix needs rows a multiple of {GROUP} and columns a multiple \
                 of {}; got ({rows}, {cols})",
                format.name(),
                format.block_len()
            )));
        }
        let kb = cols / format.block_len();
        let bb = format.block_bytes();
        crate::check_len("blocks", blocks.len(), rows * kb * bb, || {
            format!(
                "({rows}, {cols}) {} at {bb} bytes per {} weights",
                format.name(),
                format.block_len()
            )
        })?;
        let flip = format.flip();
        let tb = format.tile_bytes();
        let mut data = vec![0u8; blocks.len()];
        data.par_chunks_mut(kb * tb)
            .enumerate()
            .for_each(|(g, dst)| {
                for b in 0..kb {
                    let tile = &mut dst[b * tb..(b + 1) * tb];
                    if format.is_k() {
                        let src: [&[u8]; GROUP] = std::array::from_fn(|lane| {
                            &blocks[((g * GROUP + lane) * kb + b) * bb..][..bb]
                        });
                        if format == BlockFormat::Q6K {
                            q6k::pack_tile(&src, tile);
                        } else {
                            kquant::pack_tile(format, &src, tile);
                        }
                        continue;
                    }
                    for lane in 0..GROUP {
                        let src = &blocks[((g * GROUP + lane) * kb + b) * bb..][..bb];
                        let h = format.head();
                        tile[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                        if format.has_min() {
                            tile[SCALES + 2 * lane..SCALES + 2 * lane + 2]
                                .copy_from_slice(&src[2..4]);
                        }
                        if let Some((from, to)) = format.high_bits_at() {
                            let qh = u32::from_le_bytes([
                                src[from],
                                src[from + 1],
                                src[from + 2],
                                src[from + 3],
                            ]);
                            tile[to + 4 * lane..to + 4 * lane + 4]
                                .copy_from_slice(&spread_high_bits(qh));
                        }
                        for j in 0..format.runs() {
                            for t in 0..4 {
                                tile[GROUP * h + j * 4 * GROUP + lane * 4 + t] =
                                    src[h + 4 * j + t] ^ flip;
                            }
                        }
                    }
                }
            });
        Ok(PackedMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Back to row-major blocks (the inverse of [`PackedMatrix::from_blocks`]).
    pub fn to_blocks(&self) -> Vec<u8> {
        let kb = self.cols / self.format.block_len();
        let bb = self.format.block_bytes();
        let flip = self.format.flip();
        let mut out = vec![0u8; self.data.len()];
        for row in 0..self.rows {
            for b in 0..kb {
                let dst = &mut out[(row * kb + b) * bb..][..bb];
                let (tile, lane) = self.tile(row, b);
                if self.format.is_k() {
                    if self.format == BlockFormat::Q6K {
                        q6k::unpack_row(tile, lane, dst);
                    } else {
                        kquant::unpack_row(self.format, tile, lane, dst);
                    }
                    continue;
                }
                let h = self.format.head();
                dst[..2].copy_from_slice(&tile[2 * lane..2 * lane + 2]);
                if self.format.has_min() {
                    dst[2..4].copy_from_slice(&tile[SCALES + 2 * lane..SCALES + 2 * lane + 2]);
                }
                if let Some((from, to)) = self.format.high_bits_at() {
                    let spread = &tile[to + 4 * lane..to + 4 * lane + 4];
                    let qh = gather_high_bits([spread[0], spread[1], spread[2], spread[3]]);
                    dst[from..from + 4].copy_from_slice(&qh.to_le_bytes());
                }
                for j in 0..self.format.runs() {
                    for t in 0..4 {
                        dst[h + 4 * j + t] = tile[GROUP * h + j * 4 * GROUP + lane * 4 + t] ^ flip;
                    }
                }
            }
        }
        out
    }

    /// The weight `i` (0..block_len) of a block, for `lane` of `tile`: signed (`q - bias`)
    /// for the formats without a minimum, `q` for Q4_1 and Q4_K.
    #[inline]
    fn weight(&self, tile: &[u8], lane: usize, i: usize) -> i8 {
        match self.format {
            BlockFormat::Q4K | BlockFormat::Q5K => kquant::weight(self.format, tile, lane, i),
            BlockFormat::Q6K => q6k::weight(tile, lane, i),
            BlockFormat::Q8_0 => {
                (tile[SCALES + (i / 4) * 4 * GROUP + lane * 4 + i % 4] ^ 0x80) as i8
            }
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let h = self.format.head();
                let byte = tile[GROUP * h + ((i % 16) / 4) * 4 * GROUP + lane * 4 + i % 4];
                let mut q = if i < 16 { byte & 0x0F } else { byte >> 4 };
                if let Some((_, at)) = self.format.high_bits_at() {
                    // Bit 2j (low half) or 2j + 1 (high half) of byte i % 4 of the lane's
                    // spread high bits, j = (i % 16) / 4.
                    let spread = tile[at + 4 * lane + i % 4];
                    let bit = 2 * ((i % 16) / 4) + usize::from(i >= 16);
                    q |= ((spread >> bit) & 1) << 4;
                }
                q as i8 - self.format.bias() as i8
            }
        }
    }

    /// The scale of `lane` in `tile`.
    #[inline]
    fn scale(tile: &[u8], lane: usize) -> f32 {
        f16::from_le_bytes([tile[2 * lane], tile[2 * lane + 1]]).to_f32()
    }

    /// The scale and minimum (0 without one) of the 16 weights `16 * g16..` of `lane`'s
    /// block in `tile`: a weight is `scale * weight(i) + min`.
    #[inline]
    fn scale_min(&self, tile: &[u8], lane: usize, g16: usize) -> (f32, f32) {
        match self.format {
            BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                (Self::scale(tile, lane), Self::scale(&tile[SCALES..], lane))
            }
            BlockFormat::Q4K | BlockFormat::Q5K => kquant::scale_min(self.format, tile, lane, g16),
            BlockFormat::Q6K => q6k::scale_min(tile, lane, g16),
            _ => (Self::scale(tile, lane), 0.0),
        }
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// The tile holding block `b` of `row`, and the row's lane in it.
    fn tile(&self, row: usize, b: usize) -> (&[u8], usize) {
        let kb = self.cols / self.format.block_len();
        let g = row / GROUP;
        let tb = self.format.tile_bytes();
        let start = (g * kb + b) * tb;
        (&self.data[start..start + tb], row % GROUP)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: exactly the block format's size (34, 18, 20 or 22 bytes per 32 weights).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes themselves (where they lie in memory, for the engine's paging).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
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
        for (b, chunk) in out.chunks_exact_mut(self.format.block_len()).enumerate() {
            let (tile, lane) = self.tile(row, b);
            for (g16, part) in chunk.chunks_exact_mut(16).enumerate() {
                let (d, m) = self.scale_min(tile, lane, g16);
                for (t, o) in part.iter_mut().enumerate() {
                    *o = d * self.weight(tile, lane, 16 * g16 + t) as f32 + m;
                }
            }
        }
        Ok(())
    }
}

/// Q5_0's 32 high bits (`qh`, bit `i` for weight `i`) in the packed order: byte `b` of the
/// lane holds, at bit `2j`, weight `4j + b`'s and, at bit `2j + 1`, weight `16 + 4j + b`'s
/// (j = 0..4). Byte `b` is the byte of the 4-byte run slot the weight's nibble sits in, so
/// for run `j` one shift of the whole lane brings every needed bit to bit 4 of its own
/// byte, without crossing into a neighbour (see `tile`). Same 4 bytes as the file's.
fn spread_high_bits(qh: u32) -> [u8; 4] {
    let mut out = [0u8; 4];
    for (b, byte) in out.iter_mut().enumerate() {
        for j in 0..4 {
            *byte |= (((qh >> (4 * j + b)) & 1) as u8) << (2 * j);
            *byte |= (((qh >> (16 + 4 * j + b)) & 1) as u8) << (2 * j + 1);
        }
    }
    out
}

/// The inverse of [`spread_high_bits`].
fn gather_high_bits(spread: [u8; 4]) -> u32 {
    let mut qh = 0u32;
    for (b, byte) in spread.iter().enumerate() {
        for j in 0..4 {
            qh |= u32::from((byte >> (2 * j)) & 1) << (4 * j + b);
            qh |= u32::from((byte >> (2 * j + 1)) & 1) << (16 + 4 * j + b);
        }
    }
    qh
}

/// Activation rows quantized per block of 32: signed bytes, an f32 scale and the sum of
/// the bytes, per block.
#[derive(Debug, Clone)]
pub struct QuantRows {
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
    /// Sums per 16 bytes (two per block), for formats with a scale or bias per 16.
    sum16: Vec<i32>,
}

/// Quantize `m` rows of `k` (a multiple of 32) values: per block, `d = max|x| / 127` and
/// `q = round(x / d)`.
pub fn quantize_rows(x: &[f32], m: usize, k: usize) -> Result<QuantRows, KernelError> {
    quantize_rows_at(Path::of(crate::cpu::level()), x, m, k)
}

/// [`quantize_rows`] with the block quantizer of `path` (every path gives the same bytes).
fn quantize_rows_at(path: Path, x: &[f32], m: usize, k: usize) -> Result<QuantRows, KernelError> {
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
        sum16: vec![0; 2 * m * kb],
    };
    let block = |xs: &[f32], q: &mut [i8], d: &mut f32, s: &mut i32| {
        // SAFETY: the path's features are on this CPU (`Path::qualifies`, checked by every
        // constructor of a path); `xs` and `q` are QK long.
        #[cfg(target_arch = "x86_64")]
        match path {
            Path::Avx512 => {
                (*d, *s) = unsafe { quantize_block_avx512(xs, q) };
                return;
            }
            Path::Avx2 | Path::AvxVnni => {
                (*d, *s) = unsafe { quantize_block_avx2(xs, q) };
                return;
            }
            _ => {}
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(path, Path::Neon | Path::NeonDot) {
            (*d, *s) = unsafe { neon::quantize_block(xs, q) };
            return;
        }
        (*d, *s) = quantize_block_scalar(xs, q);
    };
    type Row<'a> = (
        (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]),
        &'a mut [i32],
    );
    let row = |((((xs, q), d), s), s16): Row<'_>| {
        for ((((xs, q), d), s), s16) in xs
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(d.iter_mut())
            .zip(s.iter_mut())
            .zip(s16.chunks_exact_mut(2))
        {
            block(xs, q, d, s);
            s16[0] = q[..16].iter().map(|&v| v as i32).sum();
            s16[1] = *s - s16[0];
        }
    };
    if m >= 16 {
        x.par_chunks(k)
            .zip(out.q.par_chunks_mut(k))
            .zip(out.d.par_chunks_mut(kb))
            .zip(out.sum.par_chunks_mut(kb))
            .zip(out.sum16.par_chunks_mut(2 * kb))
            .with_min_len(8)
            .for_each(row);
    } else {
        x.chunks(k)
            .zip(out.q.chunks_mut(k))
            .zip(out.d.chunks_mut(kb))
            .zip(out.sum.chunks_mut(kb))
            .zip(out.sum16.chunks_mut(2 * kb))
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

/// One block of [`quantize_rows`] with AVX2 (the same bytes as the scalar form): returns
/// the scale and the sum of the bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() == QK && q.len() == QK);
    let p = xs.as_ptr();
    let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let a = v.map(|x| _mm256_and_ps(x, abs));
    let m8 = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
    let scale = amax / 127.0;
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let i =
        v.map(|x| _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, inv), lo), hi)));
    // Narrow 4 x 8 i32 to 32 i8: the packs interleave 128-bit lanes, the permute undoes it.
    let b = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    let s8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(s8),
        _mm256_extracti128_si256::<1>(s8),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
    (scale, _mm_cvtsi128_si32(s1))
}

/// `out = x w^T`: `x` is (m, cols) f32, `w` (rows, cols) packed, `out` (m, rows). The
/// activations are quantized per block of 32 first, as llama.cpp does for Q8_0 and Q4_0.
pub fn matmul(x: &[f32], m: usize, w: &PackedMatrix, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_many(x, m, &[w], &mut [out])
}

/// Several products of the same activations, `outs[i] = x ws[i]^T` (each (m, rows_i)):
/// the activations are quantized once and one parallel loop covers the row groups of
/// every matrix (a layer's q/k/v projections, or gate and up), so a decode step forks
/// and joins once instead of once per matrix. On `Ok`, every cell of every output is
/// written, so the outputs may be made uncleared ([`crate::OutElem`]).
pub fn matmul_many<O: crate::OutElem>(
    x: &[f32],
    m: usize,
    ws: &[&PackedMatrix],
    outs: &mut [&mut [O]],
) -> Result<(), KernelError> {
    matmul_many_at(Path::of(crate::cpu::level()), x, m, ws, outs)
}

/// Which code a product runs: from the kernel level, and at `avx2` from whether the CPU
/// has AVX-VNNI. The tests run every path this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// [`matmul_reference`] and the scalar quantizer (`scalar` and `neon` levels).
    Reference,
    /// AVX2: `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// AVX2 with AVX-VNNI's 256-bit `vpdpbusd`.
    AvxVnni,
    /// AVX-512 F/BW/VNNI.
    Avx512,
    /// NEON: `smull` + `sadalp` (aarch64 without the dot-product extension).
    Neon,
    /// NEON with `sdot` (the dot-product extension, ARMv8.2+).
    NeonDot,
}

impl Path {
    fn of(level: CpuLevel) -> Path {
        match level {
            CpuLevel::Avx512 => Path::Avx512,
            CpuLevel::Avx2 if level.avx_vnni() => Path::AvxVnni,
            CpuLevel::Avx2 => Path::Avx2,
            CpuLevel::Neon if crate::cpu::neon_dotprod() => Path::NeonDot,
            CpuLevel::Neon => Path::Neon,
            CpuLevel::Scalar => Path::Reference,
        }
    }

    /// Every path this CPU can run (a level's, and AVX2 without VNNI where it has VNNI).
    #[cfg(test)]
    fn available() -> Vec<Path> {
        let mut v = vec![Path::Reference];
        let levels = CpuLevel::available();
        if levels.contains(&CpuLevel::Avx2) {
            v.push(Path::Avx2);
            if CpuLevel::Avx2.avx_vnni() {
                v.push(Path::AvxVnni);
            }
        }
        if levels.contains(&CpuLevel::Avx512) {
            v.push(Path::Avx512);
        } else if cfg!(target_arch = "x86_64") {
            eprintln!("the avx512 path is not tested: this CPU lacks AVX-512 F/BW/VNNI");
        }
        if levels.contains(&CpuLevel::Neon) {
            v.push(Path::Neon);
            if crate::cpu::neon_dotprod() {
                v.push(Path::NeonDot);
            } else {
                eprintln!("the neon sdot path is not tested: this CPU lacks dotprod");
            }
        }
        v
    }
}

/// [`matmul_many`] on `path`, which must be one this CPU runs. When it returns `Ok`, it
/// has written every element of every output (each has exactly m x rows, checked, and the
/// tasks cover every group of 16 rows of every matrix for every input row).
fn matmul_many_at<O: crate::OutElem>(
    path: Path,
    x: &[f32],
    m: usize,
    ws: &[&PackedMatrix],
    outs: &mut [&mut [O]],
) -> Result<(), KernelError> {
    crate::check_len("outputs", outs.len(), ws.len(), || {
        format!("one per matrix, {}", ws.len())
    })?;
    let Some(first) = ws.first() else {
        return Ok(());
    };
    let k = first.cols;
    for (w, out) in ws.iter().zip(outs.iter()) {
        if w.cols != k {
            return Err(KernelError::Invalid(format!(
                "matrices of one product must have the same columns: {} and {k}",
                w.cols
            )));
        }
        crate::check_len("output", out.len(), m * w.rows, || {
            format!("({m}, {})", w.rows)
        })?;
    }
    let qa = quantize_rows_at(path, x, m, k)?;
    // Task `t` is group `t - starts[i]` of matrix `i`, for the last `starts[i] <= t`.
    let mut starts = Vec::with_capacity(ws.len());
    let mut total = 0;
    for w in ws {
        starts.push(total);
        total += w.rows / GROUP;
    }
    // `O` has f32's layout (`OutElem`); the tasks only write through these.
    let ptrs: Vec<OutPtr> = outs
        .iter_mut()
        .map(|o| OutPtr(o.as_mut_ptr() as *mut f32))
        .collect();
    let work: usize = ws.iter().map(|w| w.rows).sum::<usize>() * k;
    for r0 in (0..m).step_by(M_CHUNK) {
        let rows = M_CHUNK.min(m - r0);
        let run = |t: usize| {
            let i = starts.partition_point(|&s| s <= t) - 1;
            let (w, g, n) = (ws[i], t - starts[i], ws[i].rows);
            let out = ptrs[i].0;
            match kernel_for(path, w.format) {
                // SAFETY: the CPU has the path's features (every path comes from the
                // detected level or from `Path::available`); task `t` writes only columns
                // g*16..g*16+16 of rows r0..r0+rows of output `i`, which no other task
                // touches, and every index stays inside that output (m * n, checked
                // above), `qa` (m rows of k) and `w` (groups * kb tiles).
                Some(f) => unsafe { f(w, &qa, g, r0, rows, out, n) },
                None => group_rows_reference(w, &qa, g, r0, rows, out, n),
            }
        };
        if rows * work >= 1 << 18 {
            (0..total).into_par_iter().with_min_len(2).for_each(run);
        } else {
            (0..total).for_each(run);
        }
    }
    Ok(())
}

/// A kernel over one group of 16 weight rows: (weights, quantized activations, group,
/// first activation row, rows, output, output width).
type GroupFn = unsafe fn(&PackedMatrix, &QuantRows, usize, usize, usize, *mut f32, usize);

/// The kernel of `path` for `format`; `None` for the reference path.
fn kernel_for(path: Path, format: BlockFormat) -> Option<GroupFn> {
    use BlockFormat::*;
    #[cfg(target_arch = "x86_64")]
    let f: GroupFn = match (path, format) {
        (Path::Reference, _) => return None,
        (Path::Avx512, Q4K) => kquant::group_rows_avx512::<false>,
        (Path::AvxVnni, Q4K) => kquant::group_rows_vnni256::<false>,
        (_, Q4K) => kquant::group_rows_avx2::<false>,
        (Path::Avx512, Q5K) => kquant::group_rows_avx512::<true>,
        (Path::AvxVnni, Q5K) => kquant::group_rows_vnni256::<true>,
        (_, Q5K) => kquant::group_rows_avx2::<true>,
        (Path::Avx512, Q6K) => q6k::group_rows_avx512,
        (Path::AvxVnni, Q6K) => q6k::group_rows_vnni256,
        (_, Q6K) => q6k::group_rows_avx2,
        (Path::Avx512, Q8_0) => group_rows::<K_Q8_0>,
        (Path::Avx512, Q4_0) => group_rows::<K_Q4_0>,
        (Path::Avx512, Q4_1) => group_rows::<K_Q4_1>,
        (Path::Avx512, Q5_0) => group_rows::<K_Q5_0>,
        (Path::Avx512, Q5_1) => group_rows::<K_Q5_1>,
        (Path::AvxVnni, Q8_0) => group_rows_vnni256::<K_Q8_0>,
        (Path::AvxVnni, Q4_0) => group_rows_vnni256::<K_Q4_0>,
        (Path::AvxVnni, Q4_1) => group_rows_vnni256::<K_Q4_1>,
        (Path::AvxVnni, Q5_0) => group_rows_vnni256::<K_Q5_0>,
        (Path::AvxVnni, Q5_1) => group_rows_vnni256::<K_Q5_1>,
        (_, Q8_0) => group_rows_avx2::<K_Q8_0>,
        (_, Q4_0) => group_rows_avx2::<K_Q4_0>,
        (_, Q4_1) => group_rows_avx2::<K_Q4_1>,
        (_, Q5_0) => group_rows_avx2::<K_Q5_0>,
        (_, Q5_1) => group_rows_avx2::<K_Q5_1>,
    };
    #[cfg(target_arch = "aarch64")]
    let f: GroupFn = match (path, format) {
        (Path::Reference, _) => return None,
        (Path::NeonDot, Q4K) => kquant::group_rows_neon_dot::<false>,
        (_, Q4K) => kquant::group_rows_neon::<false>,
        (Path::NeonDot, Q5K) => kquant::group_rows_neon_dot::<true>,
        (_, Q5K) => kquant::group_rows_neon::<true>,
        (Path::NeonDot, Q6K) => q6k::group_rows_neon_dot,
        (_, Q6K) => q6k::group_rows_neon,
        (Path::NeonDot, Q8_0) => neon::group_rows_dot::<K_Q8_0>,
        (Path::NeonDot, Q4_0) => neon::group_rows_dot::<K_Q4_0>,
        (Path::NeonDot, Q4_1) => neon::group_rows_dot::<K_Q4_1>,
        (Path::NeonDot, Q5_0) => neon::group_rows_dot::<K_Q5_0>,
        (Path::NeonDot, Q5_1) => neon::group_rows_dot::<K_Q5_1>,
        (_, Q8_0) => neon::group_rows::<K_Q8_0>,
        (_, Q4_0) => neon::group_rows::<K_Q4_0>,
        (_, Q4_1) => neon::group_rows::<K_Q4_1>,
        (_, Q5_0) => neon::group_rows::<K_Q5_0>,
        (_, Q5_1) => neon::group_rows::<K_Q5_1>,
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let f: GroupFn = {
        let _ = (path, format);
        return None;
    };
    Some(f)
}

/// [`matmul_reference`]'s arithmetic for one group and a range of activation rows, into
/// the shared output (the reference path of [`matmul_many`]).
fn group_rows_reference(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
) {
    let kb = w.cols / QK;
    for r in r0..r0 + rows {
        for lane in 0..GROUP {
            let o = g * GROUP + lane;
            let v = dot_reference(qa, r, w, o, kb);
            // SAFETY: this task owns columns g*16..g*16+16 of its rows (see `matmul_many`).
            unsafe { *out.add(r * n + o) = v };
        }
    }
}

/// Row `r` of the quantized activations times weight row `o`, plainly: per 16 weights,
/// the integer dot times the weights' scale and the activations' block scale, plus the
/// minimum times the activations' sum.
fn dot_reference(qa: &QuantRows, r: usize, w: &PackedMatrix, o: usize, kb: usize) -> f32 {
    let k = w.cols;
    let bl = w.format.block_len();
    let mut acc = 0f32;
    for c in 0..k / 16 {
        let (tile, lane) = w.tile(o, c * 16 / bl);
        let g16 = c % (bl / 16);
        let mut s = 0i32;
        for t in 0..16 {
            let i = 16 * g16 + t;
            s += w.weight(tile, lane, i) as i32 * qa.q[r * k + c * 16 + t] as i32;
        }
        let (dw, min) = w.scale_min(tile, lane, g16);
        let da = qa.d[r * kb + c / 2];
        acc += min * (da * qa.sum16[r * 2 * kb + c] as f32);
        acc += s as f32 * (dw * da);
    }
    acc
}

/// The plain form of [`matmul`]'s arithmetic on already quantized rows, the reference for
/// the fast kernels (and what the `scalar` level runs).
pub fn matmul_reference(qa: &QuantRows, m: usize, w: &PackedMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let kb = k / QK;
    debug_assert_eq!(qa.k, k);
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for o in 0..n {
            out[r * n + o] = dot_reference(qa, r, w, o, kb);
        }
    }
    out
}

/// The output pointer shared by the tasks of [`matmul`], each writing its own columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul`), and the buffer outlives them.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Rows `r0..r0 + rows` of the output, columns of group `g`, in register tiles of up to 8
/// rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_rows<const KIND: u8>(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
) {
    row_tiles!(r0, rows, [8, 7, 6, 5, 4, 3, 2, 1], |r, R| tile::<R, KIND>(
        w, qa, g, r, out, n
    ));
}

/// Each 32-bit lane shifted left by `s` bits (right by `-s` when negative).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn shift_lanes(x: std::arch::x86_64::__m512i, s: i32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if s >= 0 {
        _mm512_sll_epi32(x, _mm_cvtsi32_si128(s))
    } else {
        _mm512_srl_epi32(x, _mm_cvtsi32_si128(-s))
    }
}

/// One register tile: R activation rows starting at `r` times the 16 rows of group `g`,
/// over every block; 16 results per activation row, stored to `out[r.., g*16..]`. `KIND`:
/// `K_Q8_0`, `K_Q4_0`, `K_Q4_1`, `K_Q5_0` or `K_Q5_1`, the weights' format.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize, const KIND: u8>(
    w: &PackedMatrix,
    qa: &QuantRows,
    g: usize,
    r: usize,
    out: *mut f32,
    n: usize,
) {
    use std::arch::x86_64::*;
    let k = w.cols;
    let kb = k / QK;
    let tb = w.format.tile_bytes();
    let bias = w.format.bias();
    let wbase = w.data.as_ptr().add(g * kb * tb);
    let abase = qa.q.as_ptr().add(r * k);
    let dbase = qa.d.as_ptr().add(r * kb);
    let sbase = qa.sum.as_ptr().add(r * kb);
    let nibble = _mm512_set1_epi8(0x0F);
    let act = |i: usize, b: usize, col: usize| {
        _mm512_set1_epi32((abase.add(i * k + b * QK + col) as *const i32).read_unaligned())
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let t = wbase.add(b * tb);
        let wd = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
        let mut dots = [_mm512_setzero_si512(); R];
        let runs = t.add(GROUP * w.format.head());
        if KIND != K_Q8_0 {
            // Q5_0: the 16 rows' spread high bits, one 32-bit lane per row.
            let qh = if high_bits(KIND) {
                _mm512_loadu_si512(t.add(qh_offset(KIND)) as *const __m512i)
            } else {
                _mm512_setzero_si512()
            };
            for j in 0..QK / 8 {
                let v = _mm512_loadu_si512(runs.add(j * 4 * GROUP) as *const __m512i);
                let mut lo = _mm512_and_si512(v, nibble);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                if high_bits(KIND) {
                    // Bit 2j (low nibbles) and 2j + 1 (high) of each byte moved to bit 4
                    // of the same byte, then OR-ed in: `x | (shifted & 0x10)`.
                    let five = _mm512_set1_epi8(0x10);
                    let lo_bits = shift_lanes(qh, 4 - 2 * j as i32);
                    let hi_bits = shift_lanes(qh, 3 - 2 * j as i32);
                    lo = _mm512_ternarylogic_epi32::<0xF8>(lo, lo_bits, five);
                    hi = _mm512_ternarylogic_epi32::<0xF8>(hi, hi_bits, five);
                }
                for (i, dot) in dots.iter_mut().enumerate() {
                    *dot = _mm512_dpbusd_epi32(*dot, lo, act(i, b, 4 * j));
                    *dot = _mm512_dpbusd_epi32(*dot, hi, act(i, b, 16 + 4 * j));
                }
            }
        } else {
            for j in 0..QK / 4 {
                let wv = _mm512_loadu_si512(runs.add(j * 4 * GROUP) as *const __m512i);
                for (i, dot) in dots.iter_mut().enumerate() {
                    *dot = _mm512_dpbusd_epi32(*dot, wv, act(i, b, 4 * j));
                }
            }
        }
        for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
            let sum = *sbase.add(i * kb + b);
            let da = *dbase.add(i * kb + b);
            let s = if has_min(KIND) {
                *dot
            } else {
                _mm512_sub_epi32(*dot, _mm512_set1_epi32(bias * sum))
            };
            let scale = _mm512_mul_ps(wd, _mm512_set1_ps(da));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
            if has_min(KIND) {
                let wm = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(SCALES) as *const __m256i));
                *acc = _mm512_fmadd_ps(wm, _mm512_set1_ps(da * sum as f32), *acc);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add((r + i) * n + g * GROUP), *acc);
    }
}

/// The 256-bit kernels, once with `vpmaddubsw` (AVX2) and once with AVX-VNNI's
/// `vpdpbusd`: a macro rather than a generic so that only the VNNI copy is compiled with
/// `avxvnni` enabled (the compiler could otherwise fuse the AVX2 copy's multiply-adds
/// into VNNI instructions the CPU lacks).
///
/// A 256-bit register holds 4 weights of 8 rows: the low or high 32 bytes of a 64-byte
/// run, so the 16-row tiles of the AVX-512 kernel serve as two halves, one after the
/// other (the second reads the group's tiles from cache).
///
/// Without VNNI the byte products go through `vpmaddubsw` (unsigned x signed bytes,
/// adjacent pairs summed into saturating i16), then `vpmaddwd` by ones into i32. The
/// nibble formats stay far from saturation (a pair is at most 2 x 31 x 127). Q8_0's
/// stored `q + 128` would not (2 x 255 x 127), so its weights are flipped back to signed
/// and the sign moves onto the activation (`|w| * (a * sign w)`, at most 2 x 128 x 127),
/// which also makes the bias correction unnecessary.
macro_rules! kernels_256 {
    ($group:ident, $tile:ident, $features:literal, $vnni:literal) => {
        /// Rows `r0..r0 + rows` of the output, columns of group `g`, in register tiles of
        /// up to 4 rows (3 for Q8_0 without VNNI), for each half of the group.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $group<const KIND: u8>(
            w: &PackedMatrix,
            qa: &QuantRows,
            g: usize,
            r0: usize,
            rows: usize,
            out: *mut f32,
            n: usize,
        ) {
            for h in 0..2 {
                // Q8_0's sign step holds two more registers per run than the nibble
                // formats: with four activation rows the tile spills to the stack.
                if KIND == K_Q8_0 && !$vnni {
                    row_tiles!(r0, rows, [3, 2, 1], |r, R| $tile::<R, KIND>(
                        w, qa, g, h, r, out, n
                    ));
                } else {
                    row_tiles!(r0, rows, [4, 3, 2, 1], |r, R| $tile::<R, KIND>(
                        w, qa, g, h, r, out, n
                    ));
                }
            }
        }

        /// One register tile: R activation rows from `r` times rows `8h..8h + 8` of group
        /// `g`, over every block; stored to `out[r.., g*16 + 8h..]`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const R: usize, const KIND: u8>(
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
            let kb = k / QK;
            let tb = w.format.tile_bytes();
            let bias = w.format.bias();
            let wbase = w.data.as_ptr().add(g * kb * tb);
            let abase = qa.q.as_ptr().add(r * k);
            let dbase = qa.d.as_ptr().add(r * kb);
            let sbase = qa.sum.as_ptr().add(r * kb);
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let act = |i: usize, b: usize, col: usize| {
                _mm256_set1_epi32((abase.add(i * k + b * QK + col) as *const i32).read_unaligned())
            };
            // `a . w` per 32-bit lane: 4 byte products, into i32 (VNNI) or into i16 pairs
            // (the caller widens them).
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let t = wbase.add(b * tb);
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(t.add(16 * h) as *const __m128i));
                let runs = t.add(GROUP * w.format.head() + 32 * h);
                let mut dots = [_mm256_setzero_si256(); R];
                if KIND == K_Q8_0 {
                    for j in 0..QK / 4 {
                        let v = _mm256_loadu_si256(runs.add(j * 4 * GROUP) as *const __m256i);
                        if $vnni {
                            for (i, dot) in dots.iter_mut().enumerate() {
                                *dot = _mm256_dpbusd_avx_epi32(*dot, v, act(i, b, 4 * j));
                            }
                        } else {
                            let sw = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                            let aw = _mm256_sign_epi8(sw, sw);
                            for (i, dot) in dots.iter_mut().enumerate() {
                                let sa = _mm256_sign_epi8(act(i, b, 4 * j), sw);
                                let p = _mm256_maddubs_epi16(aw, sa);
                                *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                } else {
                    let qh = if high_bits(KIND) {
                        _mm256_loadu_si256(t.add(qh_offset(KIND) + 32 * h) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    // Q4_0/Q4_1 without VNNI: i16 sums over the whole block (at most
                    // 8 x 2 x 15 x 127 = 30480), widened once.
                    let mut p16 = [_mm256_setzero_si256(); R];
                    for j in 0..QK / 8 {
                        let v = _mm256_loadu_si256(runs.add(j * 4 * GROUP) as *const __m256i);
                        let mut lo = _mm256_and_si256(v, nibble);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                        if high_bits(KIND) {
                            let five = _mm256_set1_epi8(0x10);
                            let lo_bits = shift_lanes_256(qh, 4 - 2 * j as i32);
                            let hi_bits = shift_lanes_256(qh, 3 - 2 * j as i32);
                            lo = _mm256_or_si256(lo, _mm256_and_si256(lo_bits, five));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(hi_bits, five));
                        }
                        for i in 0..R {
                            let (a_lo, a_hi) = (act(i, b, 4 * j), act(i, b, 16 + 4 * j));
                            if $vnni {
                                dots[i] = _mm256_dpbusd_avx_epi32(dots[i], lo, a_lo);
                                dots[i] = _mm256_dpbusd_avx_epi32(dots[i], hi, a_hi);
                            } else {
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, a_lo),
                                    _mm256_maddubs_epi16(hi, a_hi),
                                );
                                if high_bits(KIND) {
                                    // Up to 2 x 2 x 31 x 127 per run: widen every second
                                    // run (two runs, at most 31496).
                                    if j % 2 == 0 {
                                        p16[i] = p;
                                    } else {
                                        let p = _mm256_add_epi16(p16[i], p);
                                        dots[i] =
                                            _mm256_add_epi32(dots[i], _mm256_madd_epi16(p, ones));
                                    }
                                } else {
                                    p16[i] = _mm256_add_epi16(p16[i], p);
                                }
                            }
                        }
                    }
                    if !$vnni && !high_bits(KIND) {
                        for (dot, p) in dots.iter_mut().zip(p16) {
                            *dot = _mm256_madd_epi16(p, ones);
                        }
                    }
                }
                for (i, (dot, acc)) in dots.iter().zip(acc.iter_mut()).enumerate() {
                    let sum = *sbase.add(i * kb + b);
                    let da = *dbase.add(i * kb + b);
                    let signed = has_min(KIND) || (KIND == K_Q8_0 && !$vnni);
                    let s = if signed {
                        *dot
                    } else {
                        _mm256_sub_epi32(*dot, _mm256_set1_epi32(bias * sum))
                    };
                    let scale = _mm256_mul_ps(wd, _mm256_set1_ps(da));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                    if has_min(KIND) {
                        let wm = _mm256_cvtph_ps(_mm_loadu_si128(
                            t.add(SCALES + 16 * h) as *const __m128i
                        ));
                        *acc = _mm256_fmadd_ps(wm, _mm256_set1_ps(da * sum as f32), *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add((r + i) * n + g * GROUP + 8 * h), *acc);
            }
        }
    };
}

kernels_256!(group_rows_avx2, tile_avx2, "avx2,fma,f16c", false);
kernels_256!(
    group_rows_vnni256,
    tile_vnni256,
    "avx2,fma,f16c,avxvnni",
    true
);

/// Each 32-bit lane shifted left by `s` bits (right by `-s` when negative).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn shift_lanes_256(x: std::arch::x86_64::__m256i, s: i32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    if s >= 0 {
        _mm256_sll_epi32(x, _mm_cvtsi32_si128(s))
    } else {
        _mm256_srl_epi32(x, _mm_cvtsi32_si128(-s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    const FORMATS: [BlockFormat; 8] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Q4K,
        BlockFormat::Q5K,
        BlockFormat::Q6K,
    ];

    /// Random Q6_K super-blocks and what they decode to, following llama.cpp's
    /// `dequantize_row_q6_K` (written here from the format, independently of `q6k`).
    fn random_q6k(rows: usize, cols: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
        let (mut blocks, mut deq) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / 256 {
            let ql: Vec<u8> = (0..128).map(|_| rng.below(256) as u8).collect();
            let qh: Vec<u8> = (0..64).map(|_| rng.below(256) as u8).collect();
            let sc: Vec<i8> = (0..16).map(|_| rng.below(256) as u8 as i8).collect();
            let d = f16::from_f32((rng.uniform() + 1.5) * 1e-4);
            blocks.extend_from_slice(&ql);
            blocks.extend_from_slice(&qh);
            blocks.extend(sc.iter().map(|&v| v as u8));
            blocks.extend_from_slice(&d.to_le_bytes());
            let mut y = [0f32; 256];
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let dd = d.to_f32();
                    y[128 * n + l] = dd * sc[is] as f32 * q1 as f32;
                    y[128 * n + l + 32] = dd * sc[is + 2] as f32 * q2 as f32;
                    y[128 * n + l + 64] = dd * sc[is + 4] as f32 * q3 as f32;
                    y[128 * n + l + 96] = dd * sc[is + 6] as f32 * q4 as f32;
                }
            }
            deq.extend_from_slice(&y);
        }
        (blocks, deq)
    }

    /// A width for `format` near `k`: a multiple of its block (256 for the k-quants).
    fn width(format: BlockFormat, k: usize) -> usize {
        k.div_ceil(format.block_len()) * format.block_len()
    }

    /// Random Q4_K super-blocks (or Q5_K, `five`) and what they decode to, following
    /// llama.cpp's `dequantize_row_q4_K` and `dequantize_row_q5_K` (written here from the
    /// formats, independently of `kquant`).
    fn random_q4k(rows: usize, cols: usize, five: bool, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
        let (mut blocks, mut deq) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / 256 {
            let d = f16::from_f32((rng.uniform() + 1.5) * 1e-3);
            let dmin = f16::from_f32((rng.uniform() + 1.5) * 5e-4);
            let scales: Vec<u8> = (0..12).map(|_| rng.below(256) as u8).collect();
            let qh: Vec<u8> = (0..32).map(|_| rng.below(256) as u8).collect();
            let qs: Vec<u8> = (0..128).map(|_| rng.below(256) as u8).collect();
            blocks.extend_from_slice(&d.to_le_bytes());
            blocks.extend_from_slice(&dmin.to_le_bytes());
            blocks.extend_from_slice(&scales);
            if five {
                blocks.extend_from_slice(&qh);
            }
            blocks.extend_from_slice(&qs);
            // The fifth bit of weight l of sub-block j: bit j of qh[l] (0 for Q4_K).
            let top = |j: usize, l: usize| -> f32 {
                if five && qh[l] >> j & 1 == 1 {
                    16.0
                } else {
                    0.0
                }
            };
            let get = |j: usize| -> (f32, f32) {
                let (sc, m) = if j < 4 {
                    (scales[j] & 63, scales[j + 4] & 63)
                } else {
                    (
                        (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                        (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                    )
                };
                (d.to_f32() * sc as f32, dmin.to_f32() * m as f32)
            };
            for p in 0..4 {
                let (d1, m1) = get(2 * p);
                let (d2, m2) = get(2 * p + 1);
                let q = &qs[32 * p..32 * p + 32];
                deq.extend((0..32).map(|l| d1 * ((q[l] & 0xF) as f32 + top(2 * p, l)) - m1));
                deq.extend((0..32).map(|l| d2 * ((q[l] >> 4) as f32 + top(2 * p + 1, l)) - m2));
            }
        }
        (blocks, deq)
    }

    /// Row-major blocks of `format` for random weights, and the weights they decode to.
    fn random_blocks(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        if matches!(format, BlockFormat::Q4K | BlockFormat::Q5K) {
            return random_q4k(rows, cols, format == BlockFormat::Q5K, &mut rng);
        }
        if format == BlockFormat::Q6K {
            return random_q6k(rows, cols, &mut rng);
        }
        let mut blocks = Vec::new();
        let mut deq = Vec::new();
        for _ in 0..rows * cols / QK {
            let xs: Vec<f32> = (0..QK).map(|_| rng.uniform() * 0.5).collect();
            if format == BlockFormat::Q4_1 {
                let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (d, m) = (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo));
                blocks.extend_from_slice(&d.to_le_bytes());
                blocks.extend_from_slice(&m.to_le_bytes());
                let q: Vec<u8> = xs
                    .iter()
                    .map(|v| ((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0) as u8)
                    .collect();
                blocks.extend((0..QK / 2).map(|i| q[i] | (q[i + 16] << 4)));
                deq.extend(q.iter().map(|&v| v as f32 * d.to_f32() + m.to_f32()));
                continue;
            }
            if format == BlockFormat::Q5_1 {
                // Unsigned 5-bit weights over the block's range, every high bit exercised.
                let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (d, m) = (f16::from_f32((hi - lo) / 31.0), f16::from_f32(lo));
                let q: Vec<u8> = xs
                    .iter()
                    .map(|v| ((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 31.0) as u8)
                    .collect();
                let qh = (0..QK).fold(0u32, |h, i| h | (u32::from(q[i] >> 4) << i));
                blocks.extend_from_slice(&d.to_le_bytes());
                blocks.extend_from_slice(&m.to_le_bytes());
                blocks.extend_from_slice(&qh.to_le_bytes());
                blocks.extend((0..QK / 2).map(|i| (q[i] & 0x0F) | ((q[i + 16] & 0x0F) << 4)));
                deq.extend(q.iter().map(|&v| v as f32 * d.to_f32() + m.to_f32()));
                continue;
            }
            if format == BlockFormat::Q5_0 {
                // Signed weights in -16..=15 around zero, so every high bit is exercised.
                let xs: Vec<f32> = xs.iter().map(|v| v * 4.0 - 1.0).collect();
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = f16::from_f32(amax / 15.0);
                let q: Vec<u8> = xs
                    .iter()
                    .map(|v| ((v / d.to_f32()).round().clamp(-16.0, 15.0) + 16.0) as u8)
                    .collect();
                let qh = (0..QK).fold(0u32, |h, i| h | (u32::from(q[i] >> 4) << i));
                blocks.extend_from_slice(&d.to_le_bytes());
                blocks.extend_from_slice(&qh.to_le_bytes());
                blocks.extend((0..QK / 2).map(|i| (q[i] & 0x0F) | ((q[i + 16] & 0x0F) << 4)));
                deq.extend(q.iter().map(|&v| (v as f32 - 16.0) * d.to_f32()));
                continue;
            }
            let qmax = if format == BlockFormat::Q8_0 {
                127.0
            } else {
                7.0
            };
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / qmax);
            blocks.extend_from_slice(&d.to_le_bytes());
            let q: Vec<i8> = xs
                .iter()
                .map(|v| (v / d.to_f32()).round().clamp(-qmax - 1.0, qmax) as i8)
                .collect();
            match format {
                BlockFormat::Q4_0 => blocks.extend(
                    (0..QK / 2).map(|i| ((q[i] + 8) as u8) | (((q[i + 16] + 8) as u8) << 4)),
                ),
                _ => blocks.extend(q.iter().map(|&v| v as u8)),
            }
            deq.extend(q.iter().map(|&v| v as f32 * d.to_f32()));
        }
        (blocks, deq)
    }

    #[test]
    fn packing_round_trips_and_dequantizes_rows() {
        let rows = 48;
        for format in FORMATS {
            let cols = width(format, 96);
            let (blocks, deq) = random_blocks(format, rows, cols, 7);
            let p = PackedMatrix::from_blocks(format, rows, cols, &blocks).unwrap();
            assert_eq!(
                p.bytes(),
                rows * cols / format.block_len() * format.block_bytes()
            );
            assert_eq!(p.to_blocks(), blocks);
            let mut row = vec![0f32; cols];
            for r in [0, 1, 15, 16, 47] {
                p.dequantize_row(r, &mut row).unwrap();
                assert_eq!(row, deq[r * cols..(r + 1) * cols], "{format:?} row {r}");
            }
            assert!(p.dequantize_row(48, &mut row).is_err());
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_the_numbers() {
        let e = PackedMatrix::from_blocks(BlockFormat::Q8_0, 10, 32, &[0; 340]).unwrap_err();
        assert!(e.to_string().contains("(10, 32)"), "{e}");
        let e = PackedMatrix::from_blocks(BlockFormat::Q8_0, 16, 32, &[0; 10]).unwrap_err();
        assert!(e.to_string().contains("544"), "{e}");
        let e = PackedMatrix::from_blocks(BlockFormat::Q4_0, 16, 32, &[0; 544]).unwrap_err();
        assert!(e.to_string().contains("288"), "{e}");
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

    #[test]
    fn vector_and_scalar_quantizers_agree() {
        let mut rng = Rng::new(9);
        for path in Path::available() {
            for scale in [0.0f32, 1e-6, 1.0, 300.0] {
                let xs: Vec<f32> = (0..3 * QK).map(|_| rng.uniform() * scale).collect();
                let fast = quantize_rows_at(path, &xs, 1, 3 * QK).unwrap();
                let slow = quantize_rows_at(Path::Reference, &xs, 1, 3 * QK).unwrap();
                assert_eq!(
                    (fast.q, fast.d, fast.sum),
                    (slow.q, slow.d, slow.sum),
                    "{path:?} scale {scale}"
                );
            }
        }
    }

    /// The fast kernel against the reference, and both against the f32 product of the
    /// dequantized matrices, for both formats, every tail of the 8-row register tile and
    /// the chunking of long inputs.
    #[test]
    fn matmul_matches_reference_and_dequantized_product() {
        for path in Path::available() {
            matmul_matches_on(path);
        }
    }

    fn matmul_matches_on(path: Path) {
        for format in FORMATS {
            // Row counts that meet every register tile height of every level (1 to 8).
            for &(m, n, k) in &[
                (1, 16, 32),
                (2, 16, 32),
                (3, 32, 64),
                (6, 16, 64),
                (7, 32, 32),
                (8, 48, 96),
                (12, 16, 64),
                (13, 16, 576),
                (131, 32, 64),
            ] {
                let k = width(format, k);
                let (blocks, wdeq) = random_blocks(format, n, k, m as u64);
                let w = PackedMatrix::from_blocks(format, n, k, &blocks).unwrap();
                let mut rng = Rng::new(100 + m as u64);
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                // NaN first: a cell the kernel skipped fails the comparison.
                let mut out = vec![f32::NAN; m * n];
                matmul_many_at(path, &x, m, &[&w], &mut [&mut out]).unwrap();
                let qa = quantize_rows(&x, m, k).unwrap();
                let reference = matmul_reference(&qa, m, &w);
                for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-4 * (1.0 + b.abs()),
                        "{path:?} {format:?} ({m},{n},{k}) at {i}: {a} vs {b}"
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
                            "{path:?} {format:?} ({r},{o}): {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    /// The largest weights against the largest activations, of both signs: every
    /// integer sum the kernels keep (the 16-bit ones of `vpmaddubsw` included) must hold
    /// them, so each path equals the reference.
    #[test]
    fn extreme_weights_do_not_overflow_the_integer_sums() {
        let (m, n) = (3, 16);
        for format in FORMATS {
            let k = width(format, 512);
            let (mut blocks, _) = random_blocks(format, n, k, 5);
            let bb = format.block_bytes();
            // Where the f16 scale (and minimum) of a block end; Q6_K's `d` is its last two.
            let head = match format {
                BlockFormat::Q6K => 0,
                BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => 4,
                _ => 2,
            };
            let tail = if format == BlockFormat::Q6K { 2 } else { 0 };
            for block in blocks.chunks_mut(bb) {
                // Every other byte at its largest: weights, high bits, 6-bit scales.
                let top = if format == BlockFormat::Q8_0 {
                    0x7F
                } else {
                    0xFF
                };
                block[head..bb - tail].fill(top);
                if format == BlockFormat::Q6K {
                    block[192..208].fill(0x7F);
                }
            }
            let w = PackedMatrix::from_blocks(format, n, k, &blocks).unwrap();
            // Row 0 all +1, row 1 all -1, row 2 alternating.
            let x: Vec<f32> = (0..m * k)
                .map(|i| match i / k {
                    0 => 1.0,
                    1 => -1.0,
                    _ => [1.0, -1.0][i % 2],
                })
                .collect();
            let qa = quantize_rows(&x, m, k).unwrap();
            let reference = matmul_reference(&qa, m, &w);
            for path in Path::available() {
                let mut out = vec![f32::NAN; m * n];
                matmul_many_at(path, &x, m, &[&w], &mut [&mut out]).unwrap();
                for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-4 * (1.0 + b.abs()),
                        "{path:?} {format:?} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// One call over several matrices (of mixed formats and row counts) gives each the
    /// same numbers as its own call, at decode and at prefill row counts.
    #[test]
    fn matmul_many_equals_one_call_per_matrix() {
        let k = 256;
        let shapes = [
            (BlockFormat::Q8_0, 48),
            (BlockFormat::Q4_0, 16),
            (BlockFormat::Q4_1, 32),
            (BlockFormat::Q5_0, 16),
            (BlockFormat::Q5_1, 16),
            (BlockFormat::Q4K, 32),
            (BlockFormat::Q5K, 16),
            (BlockFormat::Q6K, 16),
        ];
        let ws: Vec<PackedMatrix> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(f, n))| {
                let (blocks, _) = random_blocks(f, n, k, 40 + i as u64);
                PackedMatrix::from_blocks(f, n, k, &blocks).unwrap()
            })
            .collect();
        let refs: Vec<&PackedMatrix> = ws.iter().collect();
        for (path, m) in Path::available()
            .into_iter()
            .flat_map(|p| [1, 9, 300].map(|m| (p, m)))
        {
            let mut rng = Rng::new(m as u64);
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
            let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many_at(path, &x, m, &refs, &mut slices).unwrap();
            // The uncleared-output form (`MaybeUninit` cells, NaN here so that the test
            // reads no uninitialized memory) fills every cell with the same values.
            let mut fresh: Vec<Vec<std::mem::MaybeUninit<f32>>> = ws
                .iter()
                .map(|w| vec![std::mem::MaybeUninit::new(f32::NAN); m * w.rows()])
                .collect();
            let mut views: Vec<&mut [std::mem::MaybeUninit<f32>]> =
                fresh.iter_mut().map(|o| o.as_mut_slice()).collect();
            matmul_many_at(path, &x, m, &refs, &mut views).unwrap();
            for ((w, got), fresh) in ws.iter().zip(&outs).zip(&fresh) {
                let mut want = vec![0f32; m * w.rows()];
                matmul_many_at(path, &x, m, &[w], &mut [&mut want]).unwrap();
                assert_eq!(got, &want, "{path:?} {:?} m={m}", w.format());
                // SAFETY: every cell was initialized (NaN, or the product's value).
                let fresh: Vec<f32> = fresh.iter().map(|c| unsafe { c.assume_init() }).collect();
                assert_eq!(
                    &fresh,
                    &want,
                    "{path:?} {:?} m={m}, MaybeUninit",
                    w.format()
                );
            }
        }
        // Matrices of different widths cannot share the quantized activations.
        let (blocks, _) = random_blocks(BlockFormat::Q8_0, 16, 32, 1);
        let narrow = PackedMatrix::from_blocks(BlockFormat::Q8_0, 16, 32, &blocks).unwrap();
        let (mut a, mut b) = (vec![0f32; 48], vec![0f32; 16]);
        let err =
            matmul_many(&[0.0; 256], 1, &[&ws[0], &narrow], &mut [&mut a, &mut b]).unwrap_err();
        assert!(err.to_string().contains("32 and 256"), "{err}");
    }

    #[test]
    fn matmul_checks_lengths() {
        let (blocks, _) = random_blocks(BlockFormat::Q8_0, 16, 32, 1);
        let w = PackedMatrix::from_blocks(BlockFormat::Q8_0, 16, 32, &blocks).unwrap();
        let mut out = vec![0f32; 15];
        assert!(matmul(&[0.0; 32], 1, &w, &mut out).is_err());
        let mut out = vec![0f32; 16];
        assert!(matmul(&[0.0; 31], 1, &w, &mut out).is_err());
    }
}
