//! The layer's element-wise steps on tensors: llmem's own kernels
//! (`llmem_kernels::ops`) when every operand is f32 in host memory, candle's ops
//! otherwise (f16/bf16 models, GPU tensors).
//!
//! The kernels take slices and write one fresh buffer per result; candle would allocate
//! as well, but also dispatch large element-wise ops to its own thread pool, which on a
//! 2-core machine competes with rayon's (see `llmem_kernels::ops`).

use candle_core::{DType, Storage, Tensor};
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
    let dense = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = dense.iter().map(|t| t.storage_and_layout()).collect();
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

fn kernel_error(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A fresh f32 buffer of `like`'s element count filled by `fill`, shaped like `like`.
fn fresh(
    like: &Tensor,
    fill: impl FnOnce(&mut [f32]) -> Result<(), KernelError>,
) -> candle_core::Result<Tensor> {
    let mut out = vec![0f32; like.elem_count()];
    fill(&mut out).map_err(kernel_error)?;
    Tensor::from_vec(out, like.shape(), like.device())
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.dims().last() != Some(&weight.elem_count()) {
        return candle_nn::ops::rms_norm(x, weight, eps); // candle's error names the shapes
    }
    match on_host_f32([x, weight], |[xs, w]| {
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
    let fast = on_host_f32([x, y, weight], |[xs, ys, w]| {
        let mut sum = vec![0f32; xs.len()];
        let mut normed = vec![0f32; xs.len()];
        ops::add_rms_norm(xs, ys, w, eps, &mut sum, &mut normed).map_err(kernel_error)?;
        Ok::<_, candle_core::Error>((
            Tensor::from_vec(sum, x.shape(), x.device())?,
            Tensor::from_vec(normed, x.shape(), x.device())?,
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
    match on_host_f32([x, y], |[xs, ys]| fresh(x, |out| ops::add(xs, ys, out)))? {
        Some(sum) => sum,
        None => x + y,
    }
}

/// SwiGLU's `silu(gate) * up`, same shapes.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    match on_host_f32([gate, up], |[g, u]| {
        fresh(gate, |out| ops::silu_mul(g, u, out))
    })? {
        Some(y) => y,
        None => gate.silu()? * up,
    }
}

/// Rotary embeddings (rotate-half form) on `x`: (tokens, heads, head_dim); `cos`, `sin`:
/// (tokens, head_dim / 2), the rows at each token's position.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    let fast = on_host_f32([x, cos, sin], |[xs, c, s]| {
        let mut out = xs.to_vec();
        ops::rope_in_place(&mut out, h, d, c, s).map_err(kernel_error)?;
        Tensor::from_vec(out, (t, h, d), x.device())
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

        // f16 takes candle's path and gives the same answer within f16 precision.
        let x16 = x.to_dtype(DType::F16).unwrap();
        let w16 = w.to_dtype(DType::F16).unwrap();
        let got = rms_norm(&x16, &w16, eps)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let want = rms_norm(&x, &w, eps).unwrap();
        assert!(max_diff(&got, &want) < 1e-2);
    }
}
