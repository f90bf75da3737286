//! Linear layers, `y = x W^T + b`, with the weight kept in the checkpoint's
//! `(out_features, in_features)` layout.
//!
//! Dense weights (f32, bf16, f16) on the CPU take one of two kernels of ours. Few rows
//! (decode, up to [`matvec_max_rows`]) go through `llmem_kernels::matvec`, which streams
//! each weight row once across the rayon pool and dots it with every input row. More rows
//! (prefill, batched decode) go through `llmem_kernels::gemm`'s register tiles, which read
//! the weight as stored (f16 and bf16 widened in registers, no f32 copy of the matrix).
//! Both accumulate in f32. On a level without the tiles (`scalar`, `neon`) many rows go
//! through candle's matmul (the `gemm` crate) instead; candle 0.11's CPU matmul rejects
//! bf16 and its f16 kernel is slow, so a half-precision weight is widened to f32 for that
//! call. `LLMEM_MATVEC=0` sends every dense call to candle's matmul, to compare.
//! Half-precision results are rounded to the weight dtype, as a bf16/f16 matmul with f32
//! accumulation does.
//!
//! A third kind of weight is a GGUF block format (q8_0, q4_0, q4_1, q4_k, q6_k; and
//! q5_0, q5_1, q2_k, q3_k, q5_k from a GGUF loaded as stored) held as a
//! candle [`QTensor`]: f32 activations in, f32 out, through candle's quantized matmul
//! (it quantizes the activations to q8 blocks and runs integer dot products, AVX2/VNNI
//! where candle has them). See `crate::weights::quant` for which tensors get which format.
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are instead repacked at load into
//! the interleaved layout of `llmem_kernels::packed` (same bytes) when the kernel level has
//! packed kernels (`avx2`, `avx512`, `neon`; not `scalar`), whose kernels serve every row
//! count.

use std::mem::MaybeUninit;

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};

use llmem_kernels::matvec::{matvec, matvec_many, par_weight_rows};
use llmem_kernels::packed::PackedMatrix;
use llmem_kernels::OutElem;

use crate::error::Result;
use crate::weights::files::WeightFiles;
use crate::weights::gguf::tensors::Part;
use crate::weights::quant::{StoredMatrix, WeightFormat};

/// Rows up to which [`Linear::forward`] uses `llmem_kernels::matvec` instead of a gemm,
/// by weight dtype. With `llmem_kernels::gemm`'s register tiles, one row: they were ahead
/// from two rows on in a timing loop (`cargo bench --bench kernels -- gemm` times both).
/// Without them, candle's gemm, chosen from `llmem bench` runs at 1-32 sequences: for f32
/// weights it overtakes the matvec after a few rows; for bf16/f16 weights it first widens
/// the whole matrix to f32, so the matvec stays ahead up to at least 32 rows.
pub fn matvec_max_rows(dtype: DType) -> usize {
    match dtype {
        _ if llmem_kernels::gemm::tiled() => 1,
        DType::F32 => 2,
        _ => 32,
    }
}

/// The largest threshold of [`matvec_max_rows`] (tests cover both sides of it).
pub const MATVEC_MAX_ROWS: usize = 32;

/// A projection. `weight`: (out_features, in_features), dense or block-quantized;
/// `bias`: (out_features,), dense.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: StoredMatrix,
    bias: Option<Tensor>,
}

impl Linear {
    /// Load `{prefix}.weight` (and `{prefix}.bias` when `bias`) as a projection stored
    /// as `fmt` says, checking shapes.
    pub fn load(
        w: &WeightFiles,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let weight = w.load_matrix(
            &format!("{prefix}.weight"),
            out_features,
            in_features,
            fmt.precision,
            fmt.as_stored,
            device,
        )?;
        let bias = Self::load_bias(w, prefix, out_features, bias, fmt, device)?;
        Ok(Linear::new(weight, bias))
    }

    /// `{prefix}.bias` (out_features,) in `fmt`'s vector dtype, when `bias`.
    fn load_bias(
        w: &WeightFiles,
        prefix: &str,
        out_features: usize,
        bias: bool,
        fmt: &WeightFormat,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if !bias {
            return Ok(None);
        }
        let name = format!("{prefix}.bias");
        Ok(Some(w.load(
            &name,
            &[out_features],
            fmt.vector_dtype(),
            device,
        )?))
    }

    /// One TP rank's part of `{prefix}.weight` (out_features, in_features), read alone
    /// from the file in `dense`'s dtype ([`WeightFiles::load_part`]), then stored at
    /// `precision` (a block format quantizes the slice). Output rows take the same rows
    /// of the bias; input columns leave the bias whole, returned beside the projection to
    /// be added once after the all-reduce that sums the shards.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_part(
        w: &WeightFiles,
        prefix: &str,
        (out_features, in_features): (usize, usize),
        part: Part,
        bias: bool,
        dense: &WeightFormat,
        precision: llmem_planner::Precision,
        device: &Device,
    ) -> Result<(Linear, Option<Tensor>)> {
        let name = format!("{prefix}.weight");
        let weight = w.load_part(
            &name,
            out_features,
            in_features,
            part,
            dense.activation_dtype(),
            device,
        )?;
        let bias = Self::load_bias(w, prefix, out_features, bias, dense, device)?;
        let (own_bias, reduce_bias) = match (part, bias) {
            (Part::Rows { start, len }, Some(b)) => (Some(narrow_copy(&b, 0, start, len)?), None),
            (_, b) => (None, b),
        };
        let stored = crate::weights::quant::store_matrix(&weight, precision, &name)?;
        Ok((Linear::new(stored, own_bias), reduce_bias))
    }

    /// A projection over a stored matrix (a tied LM head shares the embedding's storage).
    pub fn new(weight: StoredMatrix, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// Wrap an existing weight (a tied LM head shares the embedding's storage).
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::new(StoredMatrix::Dense(weight), bias)
    }

    /// The weight as stored.
    pub(crate) fn weight(&self) -> &StoredMatrix {
        &self.weight
    }

    /// True when the weight is held in a GGUF block format (packed or not).
    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            StoredMatrix::Quant(_) | StoredMatrix::Packed(_)
        )
    }

    /// Bytes held by the weight and bias (block formats: blocks with their scales).
    pub fn bytes(&self) -> u64 {
        let b = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.weight.bytes() + self.bias.as_ref().map_or(0, b)
    }

    /// Several linears of the same input (a layer's q/k/v, or gate and up): the same
    /// answers as one [`Linear::forward`] each. When all hold packed block weights and no
    /// bias, one kernel call quantizes `x` once and covers every matrix; when all hold
    /// dense CPU weights of one dtype, no bias, and `x` is f32 rows few enough for the
    /// matvec, one [`matvec_many`] loop covers them (one meeting of the pool's threads
    /// instead of one per matrix).
    pub fn forward_many<const N: usize>(
        x: &Tensor,
        ls: [&Linear; N],
    ) -> candle_core::Result<[Tensor; N]> {
        let host_rows = x.dtype() == DType::F32 && x.device().is_cpu();
        let out = match host_kernel(&ls, x.dim(0)?) {
            Some(HostKernel::Packed) if N >= 2 => packed_products(x, &packed_of(&ls))?,
            Some(HostKernel::Matvec) if N >= 2 && host_rows => dense_matvecs(x, &dense_of(&ls))?,
            _ => ls
                .iter()
                .map(|l| l.forward(x))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("forward_many: count".into()))
    }

    /// x: (rows, in_features) -> (rows, out_features), in x's dtype. A dense weight's
    /// product is f32 for f32 rows (an f16 matrix in an f32 model) and rounded to the
    /// weight's dtype otherwise; a quantized weight takes and returns f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            StoredMatrix::Dense(w) => {
                let y = dense_forward(x, w)?;
                if y.dtype() != x.dtype() {
                    y.to_dtype(x.dtype())?
                } else {
                    y
                }
            }
            StoredMatrix::Quant(q) => {
                let x32 = x.to_dtype(DType::F32)?.contiguous()?;
                let y = if x32.dim(0)? <= MATVEC_MAX_ROWS && matvec_enabled() {
                    match qmatvec_tensor(&x32, q)? {
                        Some(y) => y,
                        None => QMatMul::QTensor(q.clone()).forward(&x32)?,
                    }
                } else {
                    QMatMul::QTensor(q.clone()).forward(&x32)?
                };
                if x.dtype() != DType::F32 {
                    y.to_dtype(x.dtype())?
                } else {
                    y
                }
            }
            StoredMatrix::Packed(p) => packed_products(x, &[&**p])?.remove(0),
        };
        match &self.bias {
            Some(b) if b.dtype() != y.dtype() => y.broadcast_add(&b.to_dtype(y.dtype())?),
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// x: (rows, in_features) @ w^T, f32 for f32 rows and in w's dtype otherwise: the matvec
/// for few rows, the tiled gemm (or candle's where the level has no tiles) otherwise.
fn dense_forward(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.dim(0)?;
    if rows <= matvec_max_rows(w.dtype()) && w.device().is_cpu() && matvec_enabled() {
        dense_product(x, w, false)
    } else if w.device().is_cpu() && matvec_enabled() && llmem_kernels::gemm::tiled() {
        dense_product(x, w, true)
    } else if !w.device().is_cpu() {
        // A GPU multiplies bf16/f16 natively (cuBLAS, f32 accumulation): no f32 copy of
        // the weight, which would cost its bytes twice over on every pass.
        x.to_dtype(w.dtype())?.contiguous()?.matmul(&w.t()?)
    } else if w.dtype() != DType::F32 {
        // candle's CPU gemm has no bf16, and its f16 kernel is far slower than f32.
        let y = x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?;
        match x.dtype() {
            DType::F32 => Ok(y),
            _ => y.to_dtype(w.dtype()),
        }
    } else {
        x.to_dtype(DType::F32)?.matmul(&w.t()?)
    }
}

/// A kernel that serves a set of linears' products in one call ([`host_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKernel {
    /// One `llmem_kernels::packed::matmul_many` call.
    Packed,
    /// One [`matvec_many`] loop.
    Matvec,
}

/// The one-call kernel that serves the products of `ls` on `m` f32 rows in host memory,
/// as their own [`Linear::forward`]s would: no bias anywhere, and every weight packed, or
/// every weight dense on the CPU in one dtype of f32, bf16 or f16 with `m` within
/// [`matvec_max_rows`]. (16-bit rows stay one product at a time: their f32 staging is
/// what the planner counts.) `None` for any other set.
fn host_kernel(ls: &[&Linear], m: usize) -> Option<HostKernel> {
    if ls.iter().any(|l| l.bias.is_some()) {
        return None;
    }
    match &ls.first()?.weight {
        StoredMatrix::Packed(_) => ls
            .iter()
            .all(|l| matches!(l.weight, StoredMatrix::Packed(_)))
            .then_some(HostKernel::Packed),
        StoredMatrix::Dense(w0) => {
            let dtype = w0.dtype();
            let same = ls.iter().all(|l| {
                matches!(&l.weight, StoredMatrix::Dense(w) if w.dtype() == dtype && w.device().is_cpu())
            });
            let kernel = matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
            (same && kernel && matvec_enabled() && m <= matvec_max_rows(dtype))
                .then_some(HostKernel::Matvec)
        }
        StoredMatrix::Quant(_) => None,
    }
}

/// The packed weights of `ls` (those that are).
fn packed_of<'a>(ls: &[&'a Linear]) -> Vec<&'a PackedMatrix> {
    ls.iter()
        .filter_map(|l| match &l.weight {
            StoredMatrix::Packed(p) => Some(&**p),
            _ => None,
        })
        .collect()
}

/// The dense weights of `ls` (those that are).
fn dense_of<'a>(ls: &[&'a Linear]) -> Vec<&'a Tensor> {
    ls.iter()
        .filter_map(|l| match &l.weight {
            StoredMatrix::Dense(w) => Some(w),
            _ => None,
        })
        .collect()
}

/// `x @ w^T` for f32 rows `x` (m, k) and each dense CPU weight of `ws` (n_i, k), all of
/// one dtype, through one [`matvec_many`] loop: the f32 answers [`dense_product`] gives
/// one weight at a time.
fn dense_matvecs(x: &Tensor, ws: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
    let m = x.dim(0)?;
    let ns = ws
        .iter()
        .map(|w| w.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let outs = with_f32_rows(x, |xs| {
        let mut outs: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        dense_matvecs_into(xs, m, ws, &mut views)?;
        Ok(outs)
    })?;
    outs.into_iter()
        .zip(ns)
        .map(|(o, n)| Tensor::from_vec(o, (m, n), x.device()))
        .collect()
}

/// [`dense_matvecs`] on f32 rows `xs` (m, k) in host memory, into `outs[i]` (m, n_i).
fn dense_matvecs_into(
    xs: &[f32],
    m: usize,
    ws: &[&Tensor],
    outs: &mut [&mut [f32]],
) -> candle_core::Result<()> {
    let k = match ws.first() {
        Some(w) => w.dims2()?.1,
        None => return Ok(()),
    };
    let held: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(ws.len());
    for ((w, (storage, layout)), out) in ws.iter().zip(&held).zip(outs.iter()) {
        let (n, wk) = w.dims2()?;
        if k != wk || xs.len() != m * k || out.len() != m * n {
            candle_core::bail!(
                "matvec: input of {} values for {m} rows, weight ({n}, {wk}), output of {}",
                xs.len(),
                out.len()
            )
        }
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("matvec: weight is not on the CPU")
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("matvec: weight is not contiguous".into()))?;
        parts.push((cpu, start..end, n));
    }
    /// Each part's elements, when all are `W`s.
    fn typed<'a, W>(
        parts: &[(&'a CpuStorage, std::ops::Range<usize>, usize)],
        pick: impl Fn(&'a CpuStorage) -> Option<&'a [W]>,
    ) -> Option<Vec<(&'a [W], usize)>> {
        parts
            .iter()
            .map(|(c, range, n)| pick(c).and_then(|v| v.get(range.clone())).map(|v| (v, *n)))
            .collect()
    }
    if let Some(w) = typed(&parts, |c| match c {
        CpuStorage::F32(v) => Some(v.as_slice()),
        _ => None,
    }) {
        matvec_many(xs, m, &w, k, outs);
    } else if let Some(w) = typed(&parts, |c| match c {
        CpuStorage::BF16(v) => Some(v.as_slice()),
        _ => None,
    }) {
        matvec_many(xs, m, &w, k, outs);
    } else if let Some(w) = typed(&parts, |c| match c {
        CpuStorage::F16(v) => Some(v.as_slice()),
        _ => None,
    }) {
        matvec_many(xs, m, &w, k, outs);
    } else {
        candle_core::bail!("matvec: the weights of one call need one dtype of f32, bf16 or f16")
    }
    Ok(())
}

/// `outs[i] = x ls[i]^T` on f32 rows `x` (m, in_features) in host memory, into
/// `outs[i]` (m, out_features_i), through the kernel [`Linear::forward_many`] picks for
/// f32 rows ([`host_kernel`]). `Ok(false)`, nothing written, when none serves the set: the
/// caller takes the tensor path. For a decode step without tensors between the kernels
/// (`crate::model`).
pub(crate) fn host_products(
    x: &[f32],
    m: usize,
    ls: &[&Linear],
    outs: &mut [&mut [f32]],
) -> candle_core::Result<bool> {
    if ls.len() != outs.len() {
        return Ok(false);
    }
    match host_kernel(ls, m) {
        Some(HostKernel::Packed) => llmem_kernels::packed::matmul_many(x, m, &packed_of(ls), outs)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        Some(HostKernel::Matvec) => dense_matvecs_into(x, m, &dense_of(ls), outs)?,
        None => return Ok(false),
    }
    Ok(true)
}

/// Whether [`host_products`] serves `ls` for one f32 row (without running them).
pub(crate) fn host_ready(ls: &[&Linear]) -> bool {
    host_kernel(ls, 1).is_some()
}

/// A deep copy of `t.narrow(dim, start, len)` in storage of its own size, so the full
/// tensor's storage is freed.
pub(crate) fn narrow_copy(
    t: &Tensor,
    dim: usize,
    start: usize,
    len: usize,
) -> candle_core::Result<Tensor> {
    // Neither `contiguous` (a no-op on a row slice) nor candle's `copy` (a clone of the
    // whole storage, the slice's offset kept) would free the rest of the tensor: a
    // column-parallel shard held the full matrix until the heap counts showed it.
    t.narrow(dim, start, len)?.force_contiguous()
}

/// `LLMEM_MATVEC=0` sends every dense linear through candle's gemm (for comparing the
/// paths).
fn matvec_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LLMEM_MATVEC").as_deref() != Ok("0"))
}

/// `x @ w^T` for each packed `w` (all with x's width), through one kernel call; each
/// answer in x's dtype.
fn packed_products(x: &Tensor, ws: &[&PackedMatrix]) -> candle_core::Result<Vec<Tensor>> {
    let (m, k) = x.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.cols() != k) {
        candle_core::bail!(
            "packed matmul: input has {k} features, weight expects {}",
            w.cols()
        )
    }
    let mut outs: Vec<Box<[MaybeUninit<f32>]>> = ws
        .iter()
        .map(|p| Box::new_uninit_slice(m * p.rows()))
        .collect();
    with_f32_rows(x, |xs| {
        let mut slices: Vec<&mut [MaybeUninit<f32>]> =
            outs.iter_mut().map(|o| &mut o[..]).collect();
        llmem_kernels::packed::matmul_many(xs, m, ws, &mut slices)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    })?;
    // SAFETY: `matmul_many` returned Ok, so it wrote every element of every output (each
    // exactly (m, rows); its contract, tested with NaN-filled outputs of both kinds).
    outs.into_iter()
        .map(|o| unsafe { o.assume_init() }.into_vec())
        .zip(ws)
        .map(|(out, p)| {
            let y = Tensor::from_vec(out, (m, p.rows()), x.device())?;
            if x.dtype() != DType::F32 {
                y.to_dtype(x.dtype())
            } else {
                Ok(y)
            }
        })
        .collect()
}

/// `f` over a CPU tensor's data as contiguous f32 (a view when it is f32 already).
fn with_f32_rows<R>(
    x: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let x = x.to_dtype(DType::F32)?;
    match crate::layers::host_ops::on_host_f32([&x], |[xs]| f(xs))? {
        Some(r) => r,
        None => candle_core::bail!("matvec: input is not on the CPU"),
    }
}

/// `x @ w^T` for a CPU weight `w` (n, k) and rows `x` (m, k), via [`matvec`] (few rows)
/// or, with `tiles`, [`llmem_kernels::gemm::gemm`] (many).
fn dense_product(x: &Tensor, w: &Tensor, tiles: bool) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if k != wk {
        candle_core::bail!("matvec: input has {k} features, weight expects {wk}")
    }
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("matvec: weight is not on the CPU")
    };
    let (ws, we) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("matvec: weight is not contiguous".into()))?;
    if x.dtype() == w.dtype() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        // 16-bit rows times a 16-bit weight: staged through f32 a chunk at a time.
        let x = x.contiguous()?;
        let (xst, xl) = x.storage_and_layout();
        if let (Storage::Cpu(xc), Some((xs, xe))) = (&*xst, xl.contiguous_offsets()) {
            let device = w.device();
            match (xc, cpu) {
                (CpuStorage::BF16(xv), CpuStorage::BF16(wv)) => {
                    let y = product_16(&xv[xs..xe], m, &wv[ws..we], n, k, tiles);
                    return Tensor::from_vec(y, (m, n), device);
                }
                (CpuStorage::F16(xv), CpuStorage::F16(wv)) => {
                    let y = product_16(&xv[xs..xe], m, &wv[ws..we], n, k, tiles);
                    return Tensor::from_vec(y, (m, n), device);
                }
                _ => {}
            }
        }
    }
    let out = with_f32_rows(x, |xs| {
        let mut out = Box::new_uninit_slice(m * n);
        match cpu {
            CpuStorage::F32(w) => product(tiles, xs, m, &w[ws..we], n, k, &mut out),
            CpuStorage::BF16(w) => product(tiles, xs, m, &w[ws..we], n, k, &mut out),
            CpuStorage::F16(w) => product(tiles, xs, m, &w[ws..we], n, k, &mut out),
            _ => candle_core::bail!("matvec: unsupported weight dtype {:?}", w.dtype()),
        }
        // SAFETY: `product` wrote every element of `out`, exactly (m, n) (its contract).
        Ok(unsafe { out.assume_init() }.into_vec())
    })?;
    // f32 sums: kept for f32 activations (a 16-bit weight in an f32 model, as a GGUF
    // stores it), rounded to the weight's dtype for 16-bit ones, as a 16-bit matmul with
    // f32 accumulation does.
    let y = Tensor::from_vec(out, (m, n), w.device())?;
    if w.dtype() == DType::F32 || x.dtype() == DType::F32 {
        Ok(y)
    } else {
        y.to_dtype(w.dtype())
    }
}

/// `x @ w^T` into `out`, (m, n), every element written: the tiled gemm with `tiles`
/// (into uncleared cells as they are), else the matvec (on cells cleared first).
fn product<W: llmem_kernels::gemm::TileElem, O: OutElem>(
    tiles: bool,
    xs: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    out: &mut [O],
) {
    match tiles {
        true => llmem_kernels::gemm::gemm(xs, m, w, n, k, out),
        false => matvec(xs, m, w, n, k, O::cleared(out)),
    }
}

/// Rows per chunk of [`product_16`] (the gemm's block of input rows): the planner's
/// `staged_rows` for a 16-bit model on the CPU.
pub(crate) const STAGED_ROWS: usize = 64;

/// A 16-bit weight's dtype, widened and rounded per element.
trait Half: llmem_kernels::gemm::TileElem {
    fn from_f32(v: f32) -> Self;
}

impl Half for half::bf16 {
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Half for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// `x @ w^T` for 16-bit rows `x` (m, k) and weight `w` (n, k), rounded to 16 bits, a
/// chunk of [`STAGED_ROWS`] rows at a time: each chunk's rows are widened to f32 and
/// multiplied into an f32 chunk, which is rounded into the result. The f32 staging is a
/// chunk's (under 1 MiB for a 2048-wide product) rather than the whole input's and
/// output's, which the planner's activation formula does not count (it counts the
/// 16-bit result). The same sums as widening the whole input: each row's products do
/// not depend on the others.
fn product_16<H: Half>(x: &[H], m: usize, w: &[H], n: usize, k: usize, tiles: bool) -> Vec<H> {
    let chunk = STAGED_ROWS.min(m);
    let (mut xf, mut of) = (vec![0f32; chunk * k], vec![0f32; chunk * n]);
    let mut out = Vec::with_capacity(m * n);
    for r0 in (0..m).step_by(STAGED_ROWS) {
        let rows = STAGED_ROWS.min(m - r0);
        for (d, s) in xf.iter_mut().zip(&x[r0 * k..(r0 + rows) * k]) {
            *d = s.widen();
        }
        product(tiles, &xf[..rows * k], rows, w, n, k, &mut of[..rows * n]);
        out.extend(of[..rows * n].iter().map(|&v| H::from_f32(v)));
    }
    out
}

/// `x @ w^T` for few rows `x` (m, k) f32 and a block-quantized CPU weight `w` (n, k),
/// through [`qmatvec`]; `None` when the weight is not a CPU block format we handle (the
/// caller then uses candle's quantized matmul).
fn qmatvec_tensor(x: &Tensor, w: &QTensor) -> candle_core::Result<Option<Tensor>> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
        BlockQ6K, BlockQ8_0,
    };
    use candle_core::quantized::GgmlDType;
    if !x.device().is_cpu() || !w.device().is_cpu() {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (n, wk) = w.shape().dims2()?;
    if k != wk {
        candle_core::bail!("quantized matvec: input has {k} features, weight expects {wk}")
    }
    let data = w.data()?;
    let bytes: &[u8] = &data;
    let out = with_f32_rows(x, |xs| {
        let mut out = vec![0f32; m * n];
        let done = match w.dtype() {
            GgmlDType::Q8_0 => qmatvec_bytes::<BlockQ8_0>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q4_0 => qmatvec_bytes::<BlockQ4_0>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q4_1 => qmatvec_bytes::<BlockQ4_1>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q4K => qmatvec_bytes::<BlockQ4K>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q6K => qmatvec_bytes::<BlockQ6K>(xs, m, bytes, n, k, &mut out),
            // Types a GGUF may hold that `--dtype` never produces (Q4_K_M files use q5_0
            // where rows do not fit q4_K's 256-value block, for instance).
            GgmlDType::Q5_0 => qmatvec_bytes::<BlockQ5_0>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q5_1 => qmatvec_bytes::<BlockQ5_1>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q2K => qmatvec_bytes::<BlockQ2K>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q3K => qmatvec_bytes::<BlockQ3K>(xs, m, bytes, n, k, &mut out),
            GgmlDType::Q5K => qmatvec_bytes::<BlockQ5K>(xs, m, bytes, n, k, &mut out),
            _ => false,
        };
        Ok(done.then_some(out))
    })?;
    out.map(|o| Tensor::from_vec(o, (m, n), x.device()))
        .transpose()
}

/// View `bytes` as blocks of `T` and run [`qmatvec`]; false when the bytes are not a
/// whole, aligned `(n, k / block)` array of blocks.
fn qmatvec_bytes<T: GgmlType>(
    x: &[f32],
    m: usize,
    bytes: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> bool {
    let size = std::mem::size_of::<T>();
    if k % T::BLCK_SIZE != 0
        || bytes.len() != n * (k / T::BLCK_SIZE) * size
        || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        return false;
    }
    // Safety: the block types are plain `repr(C)` data (f16 scales and byte arrays), the
    // length and alignment were checked just above, and `bytes` outlives the view.
    let blocks: &[T] =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
    qmatvec(x, m, blocks, n, k, out);
    true
}

/// `out[r * n + o] = dot(x row r, w row o)` for a block-quantized `w`: (n, k / block)
/// blocks, row-major. Each input row is quantized once to the format's dot-product type
/// (q8 blocks, as candle and llama.cpp do), then weight rows are split across the rayon
/// pool in tasks of `llmem_kernels::matvec::ROWS_PER_TASK`, four rows at a time through candle's SIMD
/// `vec_dot_4`. Same arithmetic as candle's quantized matmul, on the rayon pool the rest
/// of the forward pass uses: candle's own spinning barrier pool fought rayon for the two
/// cores of the dev machine and made batch-1 decode 10x slower under load.
pub fn qmatvec<T: GgmlType>(x: &[f32], m: usize, w: &[T], n: usize, k: usize, out: &mut [f32]) {
    let kb = k / T::BLCK_SIZE;
    assert!(x.len() >= m * k && w.len() >= n * kb && out.len() >= m * n);
    let mut xq: Vec<T::VecDotType> = (0..m * kb).map(|_| T::VecDotType::zeros()).collect();
    for r in 0..m {
        T::VecDotType::from_float(&x[r * k..(r + 1) * k], &mut xq[r * kb..(r + 1) * kb]);
    }
    par_weight_rows(out, m, n, |first, dst| {
        let rows = dst.len() / m;
        let row = |o: usize| &w[o * kb..(o + 1) * kb];
        let mut j = 0;
        while j + 4 <= rows {
            let o = first + j;
            for r in 0..m {
                let xr = &xq[r * kb..(r + 1) * kb];
                let (a, b, c, d) = T::vec_dot_4(k, row(o), row(o + 1), row(o + 2), row(o + 3), xr);
                dst[j * m + r] = a;
                dst[(j + 1) * m + r] = b;
                dst[(j + 2) * m + r] = c;
                dst[(j + 3) * m + r] = d;
            }
            j += 4;
        }
        for jj in j..rows {
            for r in 0..m {
                dst[jj * m + r] = T::vec_dot(k, row(first + jj), &xq[r * kb..(r + 1) * kb]);
            }
        }
    });
}

/// Bytes of a dense tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::weights::quant::tests::random;
    use crate::weights::quant::{packed_kernel_enabled, store_matrix};
    use candle_core::quantized::GgmlDType;
    use llmem_planner::Precision;
    use std::sync::Arc;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn quantized_matvec_matches_candles_quantized_matmul() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let (n, k) = (70, 512);
        let w = Tensor::from_vec(data(n * k, 8), (n, k), &dev).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            for m in [1, 3, MATVEC_MAX_ROWS] {
                let x = Tensor::from_vec(data(m * k, 30 + m as u64), (m, k), &dev).unwrap();
                let got: Vec<f32> = qmatvec_tensor(&x, &q)
                    .unwrap()
                    .expect("a CPU block format")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want: Vec<f32> = QMatMul::QTensor(q.clone())
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{dtype:?} m={m}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_paths_agree() {
        let dev = Device::Cpu;
        let (n, k) = (48, 40);
        let w = Tensor::from_vec(data(n * k, 3), (n, k), &dev).unwrap();
        let b = Tensor::from_vec(data(n, 4), n, &dev).unwrap();
        let lin = Linear::from_weight(w.clone(), Some(b.clone()));
        for m in [1, 3, MATVEC_MAX_ROWS + 1] {
            let x = Tensor::from_vec(data(m * k, 5 + m as u64), (m, k), &dev).unwrap();
            let got: Vec<Vec<f32>> = lin.forward(&x).unwrap().to_vec2().unwrap();
            let want: Vec<Vec<f32>> = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4, "rows {m}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn quantized_linear_matches_its_dequantized_weight() {
        let (n, k) = (64, 256);
        let w = Tensor::from_vec(random(n, k, 11), (n, k), &Device::Cpu).unwrap();
        for p in [
            Precision::Q8_0,
            Precision::Q4_0,
            Precision::Q4_1,
            Precision::Q4K,
            Precision::Q6K,
        ] {
            let stored = store_matrix(&w, p, "w").unwrap();
            assert!(
                !matches!(stored, StoredMatrix::Dense(_)),
                "{p} should be quantized at 256 columns"
            );
            let dense = stored.dequantize().unwrap();
            let lin = Linear::new(stored, None);
            assert_matches_dense(&lin, &dense, &[1, 5], 20, &p.to_string());
        }
    }

    /// A GGUF's Q5_0 matrix (what llama.cpp's Q4_K_M keeps for 576-wide rows), a Q4_K
    /// and a Q6_K one go to the packed kernels when the level has them, and their products
    /// match their own dequantization (the packing keeps the file's weights exactly).
    #[test]
    fn q5_0_q4_k_and_q6_k_matrices_are_packed_and_match_their_dequantized_weight() {
        for ty in [
            candle_core::quantized::GgmlDType::Q5_0,
            candle_core::quantized::GgmlDType::Q5_1,
            candle_core::quantized::GgmlDType::Q4K,
            candle_core::quantized::GgmlDType::Q6K,
        ] {
            packed_matches_dequantized(ty);
        }
    }

    fn packed_matches_dequantized(ty: candle_core::quantized::GgmlDType) {
        use candle_core::quantized::QTensor;
        let (n, k) = (32, 512);
        let w = Tensor::from_vec(random(n, k, 12), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, ty).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let stored = StoredMatrix::from_qtensor(q).unwrap();
        if PackedMatrix::fast_path_available() && packed_kernel_enabled() {
            assert!(matches!(stored, StoredMatrix::Packed(_)), "{stored:?}");
        }
        let unpacked = stored.dequantize().unwrap();
        let diff: f32 = (&unpacked - &dense)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "packing must keep the file's weights exactly");
        let name = format!("{ty:?}");
        assert_matches_dense(&Linear::new(stored, None), &dense, &[1, 5, 40], 21, &name);
    }

    /// `Linear::forward_many` gives each linear exactly its own `forward`'s answer: through
    /// the shared packed call (q8_0/q4_0/q4_1 matrices together), the shared matvec (f16
    /// matrices, at one row) and the one-by-one fallback (a mix with a k-quant and a dense
    /// matrix; the f16 set at seven rows).
    #[test]
    fn forward_many_equals_forward_each() {
        let k = 256;
        let lin = |n: usize, p: Precision, seed: u64| {
            let w = Tensor::from_vec(random(n, k, seed), (n, k), &Device::Cpu).unwrap();
            Linear::new(store_matrix(&w, p, "w").unwrap(), None)
        };
        let packed = [
            lin(48, Precision::Q8_0, 1),
            lin(16, Precision::Q4_0, 2),
            lin(32, Precision::Q4_1, 3),
        ];
        let mixed = [
            lin(48, Precision::Q8_0, 4),
            lin(32, Precision::Q4K, 5),
            lin(16, Precision::Fp32, 6),
        ];
        // Dense weights of one dtype go through one matvec loop at one row.
        let dense = [
            lin(48, Precision::Fp16, 7),
            lin(16, Precision::Fp16, 8),
            lin(33, Precision::Fp16, 9),
        ];
        for set in [&packed, &mixed, &dense] {
            for m in [1, 7] {
                let x =
                    Tensor::from_vec(random(m, k, 30 + m as u64), (m, k), &Device::Cpu).unwrap();
                let many = Linear::forward_many(&x, [&set[0], &set[1], &set[2]]).unwrap();
                for (l, got) in set.iter().zip(&many) {
                    let want = l.forward(&x).unwrap();
                    assert_eq!(
                        got.to_vec2::<f32>().unwrap(),
                        want.to_vec2::<f32>().unwrap()
                    );
                }
            }
        }
    }

    /// `lin` against the plain product with its dequantized weight `dense`, for inputs of
    /// `rows` rows (seeded `seed + rows`), within 2% of the largest output: the
    /// activations are quantized to 8 bits per block on the way in.
    fn assert_matches_dense(lin: &Linear, dense: &Tensor, rows: &[usize], seed: u64, what: &str) {
        let k = dense.dim(1).unwrap();
        for &m in rows {
            let x = Tensor::from_vec(random(m, k, seed + m as u64), (m, k), &Device::Cpu)
                .unwrap()
                .affine(10.0, 0.0)
                .unwrap();
            let got: Vec<f32> = lin
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = x
                .matmul(&dense.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 0.02 * scale, "{what} m={m}: {a} vs {b}");
            }
        }
    }

    /// The ggml types only a GGUF loaded as stored brings (no `--dtype` makes them) go
    /// through the same quantized matvec; checked against the dequantized weight.
    #[test]
    fn gguf_only_block_types_match_their_dequantized_weight() {
        let (n, k) = (40, 512);
        let w = Tensor::from_vec(random(n, k, 5), (n, k), &Device::Cpu).unwrap();
        for g in [
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q5K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, g).unwrap());
            let dense = q.dequantize(&Device::Cpu).unwrap();
            let lin = Linear::new(StoredMatrix::Quant(q), None);
            assert_matches_dense(&lin, &dense, &[1, 3], 30, &format!("{g:?}"));
        }
    }
}
