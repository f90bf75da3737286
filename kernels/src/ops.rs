//! The element-wise steps of a Llama layer on f32 rows: RMSNorm (alone and fused with the
//! residual add before it), rotary embeddings in place, SwiGLU's `silu(gate) * up`, and a
//! residual add.
//!
//! Why here and not candle's ops: in a decode step these run on a few rows each, a few
//! hundred times per step. candle hands large element-wise ops to its own thread pool
//! (beside rayon's, so on 2 cores the two pools take turns spinning), and allocates and
//! dispatches per op. These functions write into buffers the caller owns and split rows
//! over rayon's pool only when there is enough work to pay for it.
//!
//! Each matches the plain formula it documents (tests below, against straightforward
//! f64 loops).

use rayon::prelude::*;

use crate::{check_len, KernelError};

/// Below this many elements an op runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Runs `f(row_index, row_chunks...)` over rows of `width` elements, in parallel when the
/// op is large.
fn rows_mut<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() >= PAR_MIN {
        let rows_per_task = (PAR_MIN / width).max(1);
        out.par_chunks_mut(width * rows_per_task)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, row) in chunk.chunks_mut(width).enumerate() {
                    f(c * rows_per_task + i, row)
                }
            });
    } else {
        for (i, row) in out.chunks_mut(width).enumerate() {
            f(i, row)
        }
    }
}

fn check_rows(name: &'static str, len: usize, width: usize) -> Result<usize, KernelError> {
    if width == 0 || len % width != 0 {
        return Err(KernelError::Invalid(format!(
            "{name} has {len} elements, not a whole number of rows of {width}"
        )));
    }
    Ok(len / width)
}

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for every row `r` of `x`
/// (rows of `weight.len()` elements).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), KernelError> {
    let h = weight.len();
    let rows = check_rows("rms_norm input", x.len(), h)?;
    check_len("rms_norm output", out.len(), x.len(), || {
        format!("({rows}, {h})")
    })?;
    rows_mut(out, h, |r, o| norm_row(&x[r * h..][..h], weight, eps, o));
    Ok(())
}

/// The residual add and the norm after it, in one pass over the rows:
/// `sum = x + y`, `normed = rms_norm(sum)`.
pub fn add_rms_norm(
    x: &[f32],
    y: &[f32],
    weight: &[f32],
    eps: f32,
    sum: &mut [f32],
    normed: &mut [f32],
) -> Result<(), KernelError> {
    let h = weight.len();
    let rows = check_rows("add_rms_norm input", x.len(), h)?;
    let shape = || format!("({rows}, {h})");
    check_len("add_rms_norm residual", y.len(), x.len(), shape)?;
    check_len("add_rms_norm sum", sum.len(), x.len(), shape)?;
    check_len("add_rms_norm output", normed.len(), x.len(), shape)?;
    let work = |(r, (s, o)): (usize, (&mut [f32], &mut [f32]))| {
        let (xr, yr) = (&x[r * h..][..h], &y[r * h..][..h]);
        s.iter_mut()
            .zip(xr.iter().zip(yr))
            .for_each(|(s, (a, b))| *s = a + b);
        norm_row(s, weight, eps, o);
    };
    if x.len() >= PAR_MIN {
        sum.par_chunks_mut(h)
            .zip(normed.par_chunks_mut(h))
            .enumerate()
            .with_min_len((PAR_MIN / h).max(1))
            .for_each(work);
    } else {
        sum.chunks_mut(h)
            .zip(normed.chunks_mut(h))
            .enumerate()
            .for_each(work);
    }
    Ok(())
}

#[inline]
fn norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Eight partial sums: the loop vectorizes and the sum is less order-sensitive.
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let ss = acc.iter().sum::<f32>() + tail;
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    out.iter_mut()
        .zip(x.iter().zip(weight))
        .for_each(|(o, (v, w))| *o = v * inv * w);
}

/// `out = x + y`.
pub fn add(x: &[f32], y: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check_len("add: second operand", y.len(), x.len(), || {
        format!("({},)", x.len())
    })?;
    check_len("add: output", out.len(), x.len(), || {
        format!("({},)", x.len())
    })?;
    let width = 1024.min(x.len()).max(1);
    rows_mut(out, width, |r, o| {
        let base = r * width;
        o.iter_mut()
            .zip(x[base..].iter().zip(&y[base..]))
            .for_each(|(o, (a, b))| *o = a + b);
    });
    Ok(())
}

/// SwiGLU's gate: `out = silu(gate) * up`, with `silu(g) = g / (1 + exp(-g))`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    let n = gate.len();
    check_len("silu_mul: up", up.len(), n, || format!("({n},)"))?;
    check_len("silu_mul: output", out.len(), n, || format!("({n},)"))?;
    let width = 1024.min(n).max(1);
    #[cfg(target_arch = "x86_64")]
    let wide = crate::cpu::level().has_kernels();
    rows_mut(out, width, |r, o| {
        let base = r * width;
        let (g, u) = (&gate[base..][..o.len()], &up[base..][..o.len()]);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the avx2 and avx512 levels have AVX2 and FMA.
            unsafe { silu_mul_avx2(g, u, o) };
            return;
        }
        silu_mul_plain(g, u, o);
    });
    Ok(())
}

#[inline(always)]
fn silu_mul_plain(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.iter_mut()
        .zip(gate.iter().zip(up))
        .for_each(|(o, (g, u))| *o = silu(*g) * u);
}

/// [`silu_mul_plain`] compiled for AVX2 and FMA (8 lanes instead of SSE2's 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_plain(gate, up, out)
}

/// `silu(g) = g * sigmoid(g)`, with the exponential taken of `-|g|` only (never
/// overflows): `sigmoid(g) = 1 / (1 + e)` for `g >= 0`, `e / (1 + e)` below, `e = exp(-|g|)`.
#[inline(always)]
fn silu(g: f32) -> f32 {
    let e = exp_nonpos(-g.abs());
    let num = if g >= 0.0 { 1.0 } else { e };
    g * num / (1.0 + e)
}

/// `exp(x)` for `x <= 0`, without branches so loops over it vectorize: `exp(x) = 2^n *
/// exp(r)` with `n = round(x / ln 2)`, `|r| <= ln 2 / 2`, and a degree-6 polynomial for
/// `exp(r)` (relative error about 2e-7, checked against `f32::exp` in the attention
/// tests). Below -87 the result is 0 (the true value is under f32's smallest normal).
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let v = x.max(-87.0);
    let shifted = v * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = v - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The integer n sits in the low mantissa bits of `shifted` (its exponent is fixed by
    // ROUND): integer arithmetic on the bits gives 2^n without a float-to-int conversion,
    // whose saturating semantics would keep the loop from vectorizing.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Rotary embeddings in place, rotate-half form (Hugging Face Llama): `x` is
/// `(tokens, heads, head_dim)`; `cos`, `sin` are `(tokens, head_dim / 2)`, the rows of
/// each token's position. For `i < head_dim / 2`, with `a = x[i]`, `b = x[i + head_dim/2]`:
/// `x[i] = a cos - b sin`, `x[i + head_dim/2] = b cos + a sin`.
pub fn rope_in_place(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) -> Result<(), KernelError> {
    if head_dim == 0 || head_dim % 2 != 0 || heads == 0 {
        return Err(KernelError::Invalid(format!(
            "rope: head_dim {head_dim} must be even and positive, heads {heads} positive"
        )));
    }
    let row = heads * head_dim;
    let tokens = check_rows("rope input", x.len(), row)?;
    let half = head_dim / 2;
    let shape = || format!("({tokens}, {half})");
    check_len("rope cos", cos.len(), tokens * half, shape)?;
    check_len("rope sin", sin.len(), tokens * half, shape)?;
    rows_mut(x, row, |t, xr| {
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for head in xr.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.uniform() * 2.0 - 1.0) * scale)
            .collect()
    }

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let err = (*x as f64 - y).abs();
            assert!(err <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    fn norm_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
        x.chunks(w.len())
            .flat_map(|r| {
                let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / r.len() as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                r.iter()
                    .zip(w)
                    .map(move |(v, w)| *v as f64 * inv * *w as f64)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn rms_norm_and_fused_add_match_the_formula() {
        // Small (one thread) and large (split over rows) cases, odd widths.
        for (rows, h) in [(1, 576), (3, 13), (70, 576), (200, 257)] {
            let x = random(rows * h, 1 + rows as u64, 3.0);
            let y = random(rows * h, 2 + rows as u64, 1.0);
            let w = random(h, 3, 1.0);
            let mut out = vec![0f32; rows * h];
            rms_norm(&x, &w, 1e-5, &mut out).unwrap();
            close(&out, &norm_ref(&x, &w, 1e-5), 1e-5);

            let (mut sum, mut normed) = (vec![0f32; rows * h], vec![0f32; rows * h]);
            add_rms_norm(&x, &y, &w, 1e-5, &mut sum, &mut normed).unwrap();
            let s: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            assert_eq!(sum, s);
            close(&normed, &norm_ref(&s, &w, 1e-5), 1e-5);

            let mut added = vec![0f32; rows * h];
            add(&x, &y, &mut added).unwrap();
            assert_eq!(added, s);
        }
    }

    #[test]
    fn silu_mul_matches_the_formula_without_overflow() {
        for n in [1, 7, 1536, 70_000] {
            let mut g = random(n, 5, 12.0);
            if n > 4 {
                // The extremes: exp(-g) overflows f32 below about -88.7.
                g[..4].copy_from_slice(&[-200.0, -89.0, 90.0, 0.0]);
            }
            let u = random(n, 6, 2.0);
            let mut out = vec![0f32; n];
            silu_mul(&g, &u, &mut out).unwrap();
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| {
                    let g = *g as f64;
                    g / (1.0 + (-g).exp()) * *u as f64
                })
                .collect();
            close(&out, &want, 1e-6);
            assert!(out.iter().all(|v| v.is_finite()));
            // The portable loop (what runs without AVX2) gives the same numbers.
            let mut plain = vec![0f32; n];
            silu_mul_plain(&g, &u, &mut plain);
            assert_eq!(plain, out);
        }
    }

    #[test]
    fn rope_rotates_each_half_pair() {
        for (tokens, heads, hd) in [(1, 9, 64), (5, 3, 8), (100, 9, 64)] {
            let half = hd / 2;
            let x = random(tokens * heads * hd, 7, 1.0);
            let angles: Vec<f64> = (0..tokens * half).map(|i| i as f64 * 0.37).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
            let mut y = x.clone();
            rope_in_place(&mut y, heads, hd, &cos, &sin).unwrap();
            let mut want = vec![0f64; x.len()];
            for t in 0..tokens {
                for h in 0..heads {
                    let base = (t * heads + h) * hd;
                    for i in 0..half {
                        let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                        let (a, b) = (x[base + i] as f64, x[base + half + i] as f64);
                        want[base + i] = a * c - b * s;
                        want[base + half + i] = b * c + a * s;
                    }
                }
            }
            close(&y, &want, 1e-6);
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let mut out = vec![0f32; 10];
        let err = rms_norm(&[0.0; 10], &[1.0; 4], 1e-5, &mut out).unwrap_err();
        assert!(err.to_string().contains("10 elements"), "{err}");
        let err = silu_mul(&[0.0; 10], &[0.0; 9], &mut out).unwrap_err();
        assert!(err.to_string().contains("up has 9"), "{err}");
        let err = rope_in_place(&mut out, 1, 5, &[0.0; 2], &[0.0; 2]).unwrap_err();
        assert!(err.to_string().contains("head_dim 5"), "{err}");
        let mut x = vec![0f32; 16];
        let err = rope_in_place(&mut x, 2, 4, &[0.0; 3], &[0.0; 4]).unwrap_err();
        assert!(err.to_string().contains("cos has 3"), "{err}");
    }
}
