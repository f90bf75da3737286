//! The layer's element-wise steps on tensors: llmem's own kernels
//! (`llmem_kernels::ops`) for float tensors in host memory (f32 read in place; f16 and
//! bf16 of up to [`WIDEN_MAX`] elements widened to f32 for the kernel and the result
//! rounded back to their dtype, as candle's ops compute them in f32 too), candle's ops
//! otherwise (larger 16-bit tensors, GPU tensors, operands of mixed dtypes).
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
    if ts.iter().any(|t| t.dtype() != DType::F32) {
        return Ok(None);
    }
    on_host(ts, f)
}

/// The most elements of a 16-bit operand [`on_host`] widens (256 KiB as f32): a decode
/// step's rows and small batches. Larger ones (a prefill) take candle's ops, so that the
/// f32 copies never add more than a few hundred KiB to a pass's working set, which the
/// planner's activation formula does not count.
pub(crate) const WIDEN_MAX: usize = 1 << 16;

/// Calls `f` on the elements of `ts` as f32 when all are host tensors of one float dtype
/// (f32 read in place; f16 and bf16 of at most [`WIDEN_MAX`] elements each widened into
/// scratch buffers); `None` otherwise.
fn on_host<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<Option<R>> {
    let dtype = ts.first().map_or(DType::F32, |t| t.dtype());
    let small = |t: &&Tensor| dtype == DType::F32 || t.elem_count() <= WIDEN_MAX;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        || ts
            .iter()
            .any(|t| !t.device().is_cpu() || t.dtype() != dtype || !small(t))
    {
        return Ok(None);
    }
    let dense = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = dense.iter().map(|t| t.storage_and_layout()).collect();
    // The 16-bit operands widened first, so that every slice below can borrow.
    let mut widened: Vec<Vec<f32>> = Vec::new();
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        match cpu {
            CpuStorage::F16(v) => widened.push(v[start..end].iter().map(|x| x.to_f32()).collect()),
            CpuStorage::BF16(v) => widened.push(v[start..end].iter().map(|x| x.to_f32()).collect()),
            _ => {}
        }
    }
    let mut slices: [&[f32]; N] = [&[]; N];
    let mut next = widened.iter();
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        *slot = match cpu {
            CpuStorage::F32(v) => match layout.contiguous_offsets() {
                Some((start, end)) => &v[start..end],
                None => return Ok(None),
            },
            _ => match next.next() {
                Some(w) => w.as_slice(),
                None => return Ok(None),
            },
        };
    }
    Ok(Some(f(slices)))
}

/// `values` (f32) as a tensor of `dtype` (f32, f16 or bf16) shaped like `like`.
fn tensor_as(values: Vec<f32>, dtype: DType, like: &Tensor) -> candle_core::Result<Tensor> {
    let (shape, device) = (like.shape(), like.device());
    match dtype {
        DType::F16 => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            Tensor::from_vec(v, shape, device)
        }
        DType::BF16 => {
            let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
            Tensor::from_vec(v, shape, device)
        }
        _ => Tensor::from_vec(values, shape, device),
    }
}

fn kernel_error(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A fresh buffer of `like`'s element count and dtype filled by `fill` (in f32), shaped
/// like `like`.
fn fresh(
    like: &Tensor,
    fill: impl FnOnce(&mut [f32]) -> Result<(), KernelError>,
) -> candle_core::Result<Tensor> {
    let mut out = vec![0f32; like.elem_count()];
    fill(&mut out).map_err(kernel_error)?;
    tensor_as(out, like.dtype(), like)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.dims().last() != Some(&weight.elem_count()) {
        return candle_nn::ops::rms_norm(x, weight, eps); // candle's error names the shapes
    }
    match on_host([x, weight], |[xs, w]| {
        fresh(x, |out| ops::rms_norm(xs, w, eps, out))
    })? {
        Some(y) => y,
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
    if x.shape() != y.shape() || x.dims().last() != Some(&weight.elem_count()) {
        let sum = (x + y)?;
        let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let fast = on_host([x, y, weight], |[xs, ys, w]| {
        let mut sum = vec![0f32; xs.len()];
        let mut normed = vec![0f32; xs.len()];
        ops::add_rms_norm(xs, ys, w, eps, &mut sum, &mut normed).map_err(kernel_error)?;
        Ok::<_, candle_core::Error>((
            tensor_as(sum, x.dtype(), x)?,
            tensor_as(normed, x.dtype(), x)?,
        ))
    })?;
    match fast {
        Some(pair) => pair,
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
    match on_host([x, y], |[xs, ys]| fresh(x, |out| ops::add(xs, ys, out)))? {
        Some(sum) => sum,
        None => x + y,
    }
}

/// SwiGLU's `silu(gate) * up`, same shapes.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    match on_host([gate, up], |[g, u]| {
        fresh(gate, |out| ops::silu_mul(g, u, out))
    })? {
        Some(y) => y,
        None => gate.silu()? * up,
    }
}

/// Rotary embeddings (rotate-half form) on `x`: (tokens, heads, head_dim); `cos`, `sin`:
/// (tokens, head_dim / 2), the rows at each token's position.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, d) = x.dims3()?;
    let fast = on_host([x, cos, sin], |[xs, c, s]| {
        let mut out = xs.to_vec();
        ops::rope_in_place(&mut out, h, d, c, s).map_err(kernel_error)?;
        tensor_as(out, x.dtype(), x)
    })?;
    match fast {
        Some(y) => y,
        None => candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, cos, sin)?.squeeze(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
        // A 16-bit operand over WIDEN_MAX elements is not widened (candle's op), one
        // within it is.
        let big = Tensor::ones((WIDEN_MAX / 8 + 1, 8), DType::BF16, &Device::Cpu).unwrap();
        assert!(on_host([&big], |_| ()).unwrap().is_none());
        let fits = big.narrow(0, 0, WIDEN_MAX / 8).unwrap();
        assert!(on_host([&fits], |_| ()).unwrap().is_some());
        let wide = Tensor::ones((WIDEN_MAX / 8 + 1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(on_host([&wide], |_| ()).unwrap().is_some());
    }
}
