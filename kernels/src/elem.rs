//! Element types the KV cache can hold: f32, f16 and bf16, and ggml's q8_0 and q4_0
//! blocks. Arithmetic is always in f32.

use half::{bf16, f16};

/// A cache element: converted to f32 to compute, and back to store.
pub trait CacheElem: Copy + Send + Sync + Default + 'static {
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Which of the three it is, for kernels with a SIMD path per element type.
    const KIND: ElemKind;
}

/// The element types of [`CacheElem`], by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F16,
    Bf16,
}

impl CacheElem for f32 {
    const NAME: &'static str = "f32";
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl CacheElem for f16 {
    const NAME: &'static str = "f16";
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl CacheElem for bf16 {
    const NAME: &'static str = "bf16";
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// What a KV cache buffer is made of: single elements (every [`CacheElem`]: f32, f16,
/// bf16) or blocks of 32 values ([`BlockQ8`], [`BlockQ4`]). The kernels index a buffer in units of `Self`:
/// the value at element offset `e` lies in unit `e / ELEMS`. A row (one KV head of one
/// token, `head_dim` values) starts on a unit boundary, so `head_dim` must be a multiple
/// of `ELEMS` (checked by the kernels).
pub trait CacheStore: Copy + Send + Sync + Default + 'static {
    const NAME: &'static str;
    /// Values per unit.
    const ELEMS: usize;
    /// Store the values `src` (`dst.len() * ELEMS` of them) into `dst`.
    fn store(src: &[f32], dst: &mut [Self]);
    /// Read the values of `row` into `out` (`row.len() * ELEMS` of them), as f32.
    fn load(row: &[Self], out: &mut [f32]);
    /// `s[t] = scale * q . k_t` for the `s.len()` keys of one cache block, key `t` at
    /// unit `t * stride` of `rows`; `simd` when the caller checked that the CPU has AVX2,
    /// FMA and F16C.
    fn scores(q: &[f32], rows: &[Self], stride: usize, scale: f32, s: &mut [f32], simd: bool);
    /// `acc += sum_t w[t] * v_t` over the values of one cache block, value `t` at unit
    /// `t * stride` of `rows`.
    fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize, simd: bool);
    /// [`CacheStore::scores`] for `nq` query rows at once (row `r` at `q[r * hd..]`,
    /// `hd = q.len() / nq`) against the same keys: `s[r * n + t]` for the `n = s.len() /
    /// nq` keys. Per row by default; element caches share each key read across the rows.
    fn scores_rows(
        q: &[f32],
        nq: usize,
        rows: &[Self],
        stride: usize,
        scale: f32,
        s: &mut [f32],
        simd: bool,
    ) {
        scores_by_row(q, nq, rows, stride, scale, s, simd)
    }
    /// [`CacheStore::weighted_sum`] for `nq` rows at once: row `r` of `acc` (`hd =
    /// acc.len() / nq` values) gains `sum_t w[r * n + t] * v_t`, `n = w.len() / nq`.
    fn weighted_sum_rows(
        acc: &mut [f32],
        nq: usize,
        w: &[f32],
        rows: &[Self],
        stride: usize,
        simd: bool,
    ) {
        weighted_sum_by_row(acc, nq, w, rows, stride, simd)
    }
}

/// [`CacheStore::scores_rows`] as one [`CacheStore::scores`] per row.
pub(crate) fn scores_by_row<T: CacheStore>(
    q: &[f32],
    nq: usize,
    rows: &[T],
    stride: usize,
    scale: f32,
    s: &mut [f32],
    simd: bool,
) {
    let (hd, n) = (q.len() / nq, s.len() / nq);
    for (qr, sr) in q.chunks_exact(hd).zip(s.chunks_exact_mut(n)) {
        T::scores(qr, rows, stride, scale, sr, simd);
    }
}

/// [`CacheStore::weighted_sum_rows`] as one [`CacheStore::weighted_sum`] per row.
pub(crate) fn weighted_sum_by_row<T: CacheStore>(
    acc: &mut [f32],
    nq: usize,
    w: &[f32],
    rows: &[T],
    stride: usize,
    simd: bool,
) {
    let (hd, n) = (acc.len() / nq, w.len() / nq);
    for (ar, wr) in acc.chunks_exact_mut(hd).zip(w.chunks_exact(n)) {
        T::weighted_sum(ar, wr, rows, stride, simd);
    }
}

/// Values in one [`BlockQ8`].
pub const Q8_BLOCK: usize = 32;

/// 32 cache values as `d * qs[i]`: ggml's q8_0 block (34 bytes; `d` in f16), the unit of
/// the q8_0 KV cache. A row of `head_dim` values is `head_dim / 32` blocks, each with its
/// own scale, so a quantized key or value keeps about 8 significant bits per value
/// relative to the largest of its 32.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockQ8 {
    pub d: f16,
    pub qs: [i8; Q8_BLOCK],
}

impl BlockQ8 {
    /// Quantize 32 values: the scale maps the largest magnitude to 127, each value
    /// rounds to the nearest step (the stored f16 scale is the one divided by, so
    /// `d * qs[i]` is what the quantization chose).
    #[inline]
    pub fn quantize(x: &[f32]) -> BlockQ8 {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let mut qs = [0i8; Q8_BLOCK];
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        BlockQ8 { d, qs }
    }
}

impl ScaledBlock for BlockQ8 {
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }

    #[inline(always)]
    fn levels(&self) -> [f32; BLOCK] {
        self.qs.map(f32::from)
    }
}

impl CacheStore for BlockQ8 {
    const NAME: &'static str = "q8_0";
    const ELEMS: usize = Q8_BLOCK;

    fn store(src: &[f32], dst: &mut [Self]) {
        for (b, x) in dst.iter_mut().zip(src.chunks_exact(Q8_BLOCK)) {
            *b = BlockQ8::quantize(x);
        }
    }

    fn load(row: &[Self], out: &mut [f32]) {
        block_load(row, out)
    }

    #[inline(always)]
    fn scores(q: &[f32], rows: &[Self], stride: usize, scale: f32, s: &mut [f32], _simd: bool) {
        block_scores(q, rows, stride, scale, s)
    }

    #[inline(always)]
    fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize, _simd: bool) {
        block_weighted_sum(acc, w, rows, stride)
    }
}

/// Values in one [`BlockQ4`].
pub const Q4_BLOCK: usize = 32;

/// 32 cache values as `d * (q - 8)` with 4-bit `q`: ggml's q4_0 block (18 bytes; `d` in
/// f16), the unit of the q4_0 KV cache. Value `i < 16` is the low nibble of `qs[i]`,
/// value `i + 16` its high nibble (ggml's order). The scale maps the value of largest
/// magnitude to -8, so that value is exact and the others keep 4 bits relative to it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockQ4 {
    pub d: f16,
    pub qs: [u8; Q4_BLOCK / 2],
}

impl BlockQ4 {
    /// Quantize 32 values (ggml's rule: `d = max / -8` for the signed value `max` of
    /// largest magnitude; `q = round(x / d) + 8`, clamped to 0..=15).
    #[inline]
    pub fn quantize(x: &[f32]) -> BlockQ4 {
        let max = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = f16::from_f32(max / -8.0);
        let inv = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
        let mut qs = [0u8; Q4_BLOCK / 2];
        for (i, b) in qs.iter_mut().enumerate() {
            *b = q(x[i]) | (q(x[i + Q4_BLOCK / 2]) << 4);
        }
        BlockQ4 { d, qs }
    }
}

impl ScaledBlock for BlockQ4 {
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }

    /// The 32 values as `q - 8`.
    #[inline(always)]
    fn levels(&self) -> [f32; BLOCK] {
        let mut out = [0f32; BLOCK];
        let (lo, hi) = out.split_at_mut(BLOCK / 2);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(&self.qs) {
            *l = f32::from(b & 0x0F) - 8.0;
            *h = f32::from(b >> 4) - 8.0;
        }
        out
    }
}

impl CacheStore for BlockQ4 {
    const NAME: &'static str = "q4_0";
    const ELEMS: usize = Q4_BLOCK;

    fn store(src: &[f32], dst: &mut [Self]) {
        for (b, x) in dst.iter_mut().zip(src.chunks_exact(Q4_BLOCK)) {
            *b = BlockQ4::quantize(x);
        }
    }

    fn load(row: &[Self], out: &mut [f32]) {
        block_load(row, out)
    }

    #[inline(always)]
    fn scores(q: &[f32], rows: &[Self], stride: usize, scale: f32, s: &mut [f32], _simd: bool) {
        block_scores(q, rows, stride, scale, s)
    }

    #[inline(always)]
    fn weighted_sum(acc: &mut [f32], w: &[f32], rows: &[Self], stride: usize, _simd: bool) {
        block_weighted_sum(acc, w, rows, stride)
    }
}

/// Values in one block of either quantized cache format.
const BLOCK: usize = 32;

/// A block of 32 values stored as `scale * levels[i]`: what the quantized caches' loops
/// need of their blocks.
trait ScaledBlock {
    fn scale(&self) -> f32;
    /// The 32 values before scaling, in f32. Widening the whole block once, then one
    /// f32 loop, is the form the compiler vectorizes (in the kernel's AVX2 form too).
    fn levels(&self) -> [f32; BLOCK];
}

/// `q . b` over one block's values.
#[inline(always)]
fn block_dot<B: ScaledBlock>(b: &B, q: &[f32]) -> f32 {
    let k = b.levels();
    let mut lanes = [0f32; 8];
    for (qc, kc) in q.chunks_exact(8).zip(k.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] = qc[i].mul_add(kc[i], lanes[i]);
        }
    }
    lanes.iter().sum::<f32>() * b.scale()
}

/// [`CacheStore::load`] for block formats.
fn block_load<B: ScaledBlock>(row: &[B], out: &mut [f32]) {
    for (b, o) in row.iter().zip(out.chunks_exact_mut(BLOCK)) {
        let d = b.scale();
        for (o, l) in o.iter_mut().zip(b.levels()) {
            *o = d * l;
        }
    }
}

/// [`CacheStore::scores`] for block formats.
#[inline(always)]
fn block_scores<B: ScaledBlock>(q: &[f32], rows: &[B], stride: usize, scale: f32, s: &mut [f32]) {
    let blocks = q.len() / BLOCK;
    for (t, s) in s.iter_mut().enumerate() {
        let row = &rows[t * stride..][..blocks];
        let mut sum = 0f32;
        for (b, qb) in row.iter().zip(q.chunks_exact(BLOCK)) {
            sum += block_dot(b, qb);
        }
        *s = sum * scale;
    }
}

/// [`CacheStore::weighted_sum`] for block formats.
#[inline(always)]
fn block_weighted_sum<B: ScaledBlock>(acc: &mut [f32], w: &[f32], rows: &[B], stride: usize) {
    let blocks = acc.len() / BLOCK;
    for (t, &wt) in w.iter().enumerate() {
        let row = &rows[t * stride..][..blocks];
        for (b, a) in row.iter().zip(acc.chunks_exact_mut(BLOCK)) {
            let wd = wt * b.scale();
            for (a, l) in a.iter_mut().zip(b.levels()) {
                *a = wd.mul_add(l, *a);
            }
        }
    }
}

/// A cache of `T` can hold rows of `head_dim` values only when they start on a unit.
pub(crate) fn check_units<T: CacheStore>(
    shape: &crate::CacheShape,
) -> Result<(), crate::KernelError> {
    if shape.head_dim % T::ELEMS != 0 {
        return Err(crate::KernelError::Invalid(format!(
            "a {} cache stores blocks of {} values; head_dim {} is not a multiple of it",
            T::NAME,
            T::ELEMS,
            shape.head_dim
        )));
    }
    Ok(())
}
