//! The layer's element-wise steps on tensors: llmem's own kernels
//! (`llmem_kernels::ops`) for float tensors in host memory (f32 read in place; f16 and
//! bf16 widened to f32 a chunk of rows at a time and each result rounded once to their
//! dtype, as candle's ops compute them in f32 too), candle's ops otherwise (GPU tensors,
//! operands of mixed dtypes).
//!
//! The kernels take slices and write one fresh buffer per result; candle would allocate
//! as well, but also dispatch large element-wise ops to its own thread pool, which on a
//! 2-core machine competes with rayon's (see `llmem_kernels::ops`).

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::{bf16, f16};
use llmem_kernels::{ops, KernelError};

/// Calls `f` on the f32 elements of `ts` when all are f32 tensors in host memory (made
/// contiguous first when they are strided views); `None` when any is not.
pub(crate) fn on_host_f32<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<Option<R>> {
    if ts
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    // Copies only of the strided views: no allocation when every operand is contiguous
    // (a decode step calls this per norm and layer).
    let mut copies: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (copy, t) in copies.iter_mut().zip(ts) {
        if !t.is_contiguous() {
            *copy = Some(t.contiguous()?);
        }
    }
    let dense: [&Tensor; N] = std::array::from_fn(|i| copies[i].as_ref().unwrap_or(ts[i]));
    let guards = dense.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        *slot = &cpu.as_slice::<f32>()?[start..end];
    }
    Ok(Some(f(slices)))
}

/// The most f32 values a 16-bit operand's chunk is widened into (16 KiB) by [`by_rows`]
/// (one row at least): small beside a 16-bit dense product's staging, which the planner
/// counts (`staged_rows`) and which is alive at a later moment of the same phase.
pub(crate) const WIDEN_MAX: usize = 1 << 12;

/// A host tensor's elements as its storage holds them.
enum Data<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl Data<'_> {
    /// Elements `range` widened into `out` (of the range's length).
    fn widen(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        match self {
            Data::F32(v) => out.copy_from_slice(&v[range]),
            Data::F16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = x.to_f32()),
            Data::Bf16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = x.to_f32()),
        }
    }
}

/// A result being filled in its dtype.
enum Out {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Out {
    /// Append `values`, rounded to the result's dtype.
    fn push(&mut self, values: &[f32]) {
        match self {
            Out::F32(v) => v.extend_from_slice(values),
            Out::F16(v) => v.extend(values.iter().map(|&x| f16::from_f32(x))),
            Out::Bf16(v) => v.extend(values.iter().map(|&x| bf16::from_f32(x))),
        }
    }

    fn into_tensor(self, like: &Tensor) -> candle_core::Result<Tensor> {
        let (shape, device) = (like.shape(), like.device());
        match self {
            Out::F32(v) => Tensor::from_vec(v, shape, device),
            Out::F16(v) => Tensor::from_vec(v, shape, device),
            Out::Bf16(v) => Tensor::from_vec(v, shape, device),
        }
    }
}

/// `kernel(inputs, outputs)` over the rows of host tensors of one float dtype: operand
/// `i` is `ts[i].0` with `ts[i].1` elements per row (0: the whole tensor for every row, as
/// a norm's weight); `M` results shaped like the first operand, `width` elements per row.
/// f32 operands are read in place and the kernel writes the results in one call; f16 and
/// bf16 ones are widened to f32 a chunk of rows at a time (at most [`WIDEN_MAX`] values
/// of the widest row per operand) and each chunk's results rounded once to the dtype, so a
/// 16-bit pass holds what candle's ops would (its operands and results) plus a few
/// chunks. `None` for GPU tensors or operands of mixed dtypes.
fn by_rows<const N: usize, const M: usize>(
    ts: [(&Tensor, usize); N],
    width: usize,
    mut kernel: impl FnMut([&[f32]; N], [&mut [f32]; M]) -> Result<(), KernelError>,
) -> candle_core::Result<Option<[Tensor; M]>> {
    let like = ts[0].0;
    let dtype = like.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || ts
            .iter()
            .any(|(t, _)| !t.device().is_cpu() || t.dtype() != dtype)
    {
        return Ok(None);
    }
    let rows = like.elem_count() / width.max(1);
    let dense = ts
        .iter()
        .map(|(t, _)| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = dense.iter().map(|t| t.storage_and_layout()).collect();
    let mut data = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let (Storage::Cpu(cpu), Some((start, end))) = (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        data.push(match cpu {
            CpuStorage::F32(v) => Data::F32(&v[start..end]),
            CpuStorage::F16(v) => Data::F16(&v[start..end]),
            CpuStorage::BF16(v) => Data::Bf16(&v[start..end]),
            _ => return Ok(None),
        });
    }
    // The kernel on `inputs`, writing the first `len` values of each of `outputs`.
    let mut run = |inputs: [&[f32]; N], outputs: &mut [Vec<f32>], len: usize| {
        let mut it = outputs.iter_mut();
        let outs: [&mut [f32]; M] = std::array::from_fn(|_| match it.next() {
            Some(o) => &mut o[..len],
            None => &mut [],
        });
        kernel(inputs, outs).map_err(kernel_error)
    };
    if dtype == DType::F32 {
        let mut inputs: [&[f32]; N] = [&[]; N];
        for (slot, d) in inputs.iter_mut().zip(&data) {
            if let Data::F32(v) = d {
                *slot = v;
            }
        }
        let mut outputs: Vec<Vec<f32>> = (0..M).map(|_| vec![0f32; rows * width]).collect();
        run(inputs, &mut outputs, rows * width)?;
        return tensors(outputs.into_iter().map(|v| Out::F32(v).into_tensor(like))).map(Some);
    }
    let widest = ts
        .iter()
        .map(|(_, w)| *w)
        .chain([width])
        .max()
        .unwrap_or(1)
        .max(1);
    let chunk = (WIDEN_MAX / widest).clamp(1, rows.max(1));
    // Whole operands widened once; per-row ones into a chunk's scratch.
    let mut scratch: Vec<Vec<f32>> = ts
        .iter()
        .zip(&data)
        .map(|((t, w), d)| {
            let n = if *w == 0 { t.elem_count() } else { chunk * w };
            let mut v = vec![0f32; n];
            if *w == 0 {
                d.widen(0..n, &mut v);
            }
            v
        })
        .collect();
    let mut staged: Vec<Vec<f32>> = (0..M).map(|_| vec![0f32; chunk * width]).collect();
    let mut results: Vec<Out> = (0..M)
        .map(|_| match dtype {
            DType::F16 => Out::F16(Vec::with_capacity(rows * width)),
            _ => Out::Bf16(Vec::with_capacity(rows * width)),
        })
        .collect();
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk.min(rows - r0);
        for (((_, w), d), buf) in ts.iter().zip(&data).zip(scratch.iter_mut()) {
            if *w > 0 {
                d.widen(r0 * w..(r0 + n) * w, &mut buf[..n * w]);
            }
        }
        let inputs: [&[f32]; N] = std::array::from_fn(|i| match ts[i].1 {
            0 => scratch[i].as_slice(),
            w => &scratch[i][..n * w],
        });
        run(inputs, &mut staged, n * width)?;
        for (res, o) in results.iter_mut().zip(&staged) {
            res.push(&o[..n * width]);
        }
        r0 += n;
    }
    tensors(results.into_iter().map(|o| o.into_tensor(like))).map(Some)
}

/// `M` tensors from an iterator of `M` results.
fn tensors<const M: usize>(
    it: impl Iterator<Item = candle_core::Result<Tensor>>,
) -> candle_core::Result<[Tensor; M]> {
    let v = it.collect::<candle_core::Result<Vec<_>>>()?;
    v.try_into()
        .map_err(|_| candle_core::Error::Msg("host ops: wrong number of results".into()))
}

fn kernel_error(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The elements per row of an element-wise operand: its last dimension.
fn row_width(x: &Tensor) -> usize {
    x.dims().last().copied().unwrap_or(1)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let h = weight.elem_count();
    if x.dims().last() != Some(&h) {
        return candle_nn::ops::rms_norm(x, weight, eps); // candle's error names the shapes
    }
    match by_rows([(x, h), (weight, 0)], h, |[xs, w], [out]| {
        ops::rms_norm(xs, w, eps, out)
    })? {
        Some([y]) => Ok(y),
        None => candle_nn::ops::rms_norm(x, weight, eps),
    }
}

/// The residual add and the RMSNorm after it: `(x + y, rms_norm(x + y))`.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let h = weight.elem_count();
    if x.shape() != y.shape() || x.dims().last() != Some(&h) {
        let sum = (x + y)?;
        let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let fast = by_rows(
        [(x, h), (y, h), (weight, 0)],
        h,
        |[xs, ys, w], [sum, normed]| ops::add_rms_norm(xs, ys, w, eps, sum, normed),
    )?;
    match fast {
        Some([sum, normed]) => Ok((sum, normed)),
        None => {
            let sum = (x + y)?;
            let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
            Ok((sum, normed))
        }
    }
}

/// `x + y`, same shapes.
pub(crate) fn add(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    if x.shape() != y.shape() {
        return x + y; // candle's error names the shapes
    }
    let w = row_width(x);
    match by_rows([(x, w), (y, w)], w, |[xs, ys], [out]| ops::add(xs, ys, out))? {
        Some([sum]) => Ok(sum),
        None => x + y,
    }
}

/// SwiGLU's `silu(gate) * up`, same shapes.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    let w = row_width(gate);
    match by_rows([(gate, w), (up, w)], w, |[g, u], [out]| {
        ops::silu_mul(g, u, out)
    })? {
        Some([y]) => Ok(y),
        None => gate.silu()? * up,
    }
}

/// Rotary embeddings (rotate-half form) on `x`: (tokens, heads, head_dim); `cos`, `sin`:
/// (tokens, head_dim / 2), the rows at each token's position.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        // candle's error names the shapes
        return candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, cos, sin)?.squeeze(0);
    }
    let fast = by_rows(
        [(x, h * d), (cos, d / 2), (sin, d / 2)],
        h * d,
        |[xs, c, s], [out]| {
            out.copy_from_slice(xs);
            ops::rope_in_place(out, h, d, c, s)
        },
    )?;
    match fast {
        Some([y]) => Ok(y),
        None => candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, cos, sin)?.squeeze(0),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference between two tensors of one shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn values(n: usize, k: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * k).sin() * 3.0).collect()
    }

    /// The host kernels agree with candle's ops (the path f16/bf16 and GPU tensors take),
    /// on contiguous inputs and on a strided view.
    #[test]
    fn host_kernels_match_candle_ops() {
        let (rows, h, heads, d) = (5, 24, 3, 8);
        let x = t(&values(rows * h, 0.37), &[rows, h]);
        let y = t(&values(rows * h, 0.11), &[rows, h]);
        let w = t(&values(h, 0.7), &[h]);
        let eps = 1e-5;

        let want = candle_nn::ops::rms_norm(&x, &w, eps).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, eps).unwrap(), &want) < 1e-5);

        let (sum, normed) = add_rms_norm(&x, &y, &w, eps).unwrap();
        assert!(max_diff(&sum, &(&x + &y).unwrap()) == 0.0);
        let want = candle_nn::ops::rms_norm(&(&x + &y).unwrap(), &w, eps).unwrap();
        assert!(max_diff(&normed, &want) < 1e-5);

        assert!(max_diff(&add(&x, &y).unwrap(), &(&x + &y).unwrap()) == 0.0);
        let want = (x.silu().unwrap() * &y).unwrap();
        assert!(max_diff(&silu_mul(&x, &y).unwrap(), &want) < 1e-5);

        let q = t(&values(rows * heads * d, 0.23), &[rows, heads, d]);
        let cos = t(&values(rows * d / 2, 0.05), &[rows, d / 2])
            .cos()
            .unwrap();
        let sin = t(&values(rows * d / 2, 0.05), &[rows, d / 2])
            .sin()
            .unwrap();
        let want = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0).unwrap(), &cos, &sin)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert!(max_diff(&rope(&q, &cos, &sin).unwrap(), &want) < 1e-5);

        // A strided (transposed) operand is made contiguous first.
        let xt = t(&values(rows * h, 0.37), &[h, rows]).t().unwrap();
        let want = candle_nn::ops::rms_norm(&xt.contiguous().unwrap(), &w, eps).unwrap();
        assert!(max_diff(&rms_norm(&xt, &w, eps).unwrap(), &want) < 1e-5);

        // A weight that does not match the last dimension is an error, as in candle.
        let wide = t(&values(2 * h, 0.7), &[2 * h]);
        assert!(rms_norm(&x, &wide, eps).is_err());
        assert!(add_rms_norm(&x, &y, &wide, eps).is_err());

        // f16 and bf16 run the same kernels in f32, rounded once to the dtype: within
        // a 16-bit rounding of the f32 answer and of candle's 16-bit ops.
        for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 8e-2)] {
            let lo = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let wide = |t: Tensor| {
                assert_eq!(t.dtype(), dtype);
                t.to_dtype(DType::F32).unwrap()
            };
            let (x16, y16, w16) = (lo(&x), lo(&y), lo(&w));
            let got = wide(rms_norm(&x16, &w16, eps).unwrap());
            assert!(max_diff(&got, &rms_norm(&x, &w, eps).unwrap()) < tol);
            let want = wide(candle_nn::ops::rms_norm(&x16, &w16, eps).unwrap());
            assert!(max_diff(&got, &want) < tol);
            let (sum, normed) = add_rms_norm(&x16, &y16, &w16, eps).unwrap();
            assert_eq!(
                wide(sum).to_vec2::<f32>().unwrap(),
                wide((&x16 + &y16).unwrap()).to_vec2::<f32>().unwrap()
            );
            let want = rms_norm(&(&x + &y).unwrap(), &w, eps).unwrap();
            assert!(max_diff(&wide(normed), &want) < tol);
            let got = wide(silu_mul(&x16, &y16).unwrap());
            let want = wide((x16.silu().unwrap() * &y16).unwrap());
            assert!(max_diff(&got, &want) < 2.0 * tol);
            let got = wide(rope(&lo(&q), &lo(&cos), &lo(&sin)).unwrap());
            assert!(max_diff(&got, &rope(&q, &cos, &sin).unwrap()) < tol);
        }
        // Mixed dtypes take candle's path, which names the mismatch.
        assert!(rms_norm(&x.to_dtype(DType::F16).unwrap(), &w, eps).is_err());
        // 16-bit operands over WIDEN_MAX values go through in chunks of rows; each row's
        // result is the f32 kernel's on the widened row, rounded once: exactly.
        for dtype in [DType::F16, DType::BF16] {
            let rows = WIDEN_MAX / h + 5;
            let big = t(&values(rows * h, 0.013), &[rows, h])
                .to_dtype(dtype)
                .unwrap();
            let other = t(&values(rows * h, 0.007), &[rows, h])
                .to_dtype(dtype)
                .unwrap();
            let w16 = w.to_dtype(dtype).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let same = |got: Tensor, want: Tensor| {
                assert_eq!(got.dtype(), dtype);
                let want = want.to_dtype(dtype).unwrap();
                assert_eq!(
                    got.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                    want.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                );
            };
            same(
                rms_norm(&big, &w16, eps).unwrap(),
                rms_norm(&f(&big), &f(&w16), eps).unwrap(),
            );
            let (sum, normed) = add_rms_norm(&big, &other, &w16, eps).unwrap();
            let (want_sum, want_normed) =
                add_rms_norm(&f(&big), &f(&other), &f(&w16), eps).unwrap();
            same(sum, want_sum);
            same(normed, want_normed);
            same(
                silu_mul(&big, &other).unwrap(),
                silu_mul(&f(&big), &f(&other)).unwrap(),
            );
            same(
                add(&big, &other).unwrap(),
                add(&f(&big), &f(&other)).unwrap(),
            );
            let tokens = WIDEN_MAX / (heads * d) + 7;
            let q = t(&values(tokens * heads * d, 0.011), &[tokens, heads, d])
                .to_dtype(dtype)
                .unwrap();
            let angles = t(&values(tokens * d / 2, 0.05), &[tokens, d / 2]);
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let (c16, s16) = (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap());
            same(
                rope(&q, &c16, &s16).unwrap(),
                rope(&f(&q), &f(&c16), &f(&s16)).unwrap(),
            );
        }
    }
}
