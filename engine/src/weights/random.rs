//! Generated weights (`--random-weights`): every tensor asked for is made on the spot,
//! seeded by the seed and the tensor's name, directly in the requested dtype.

use candle_core::{DType, Device, Tensor};

/// One generated weight (see [`WeightFiles::random`]): filled in parallel chunks, each
/// from its own SplitMix64 stream, so the values depend only on (seed, name, index).
pub(crate) fn random_tensor(
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
    seed: u64,
) -> candle_core::Result<Tensor> {
    use half::{bf16, f16};
    use rayon::prelude::*;

    if shape.len() == 1 && name.ends_with("norm.weight") {
        return Tensor::ones(shape, dtype, device);
    }
    if name.ends_with(".bias") {
        return Tensor::zeros(shape, dtype, device);
    }
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let bound = 1.0 / (cols as f64).sqrt();
    // FNV-1a of the name, mixed with the seed: one stream per tensor.
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let base = seed ^ name_hash;
    let n: usize = shape.iter().product();
    const CHUNK: usize = 1 << 16;
    fn fill<T: Copy + Send + Sync>(
        n: usize,
        base: u64,
        bound: f64,
        conv: fn(f32) -> T,
        zero: T,
    ) -> Vec<T> {
        let mut v = vec![zero; n];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
            // One mixed seed per chunk: streams of neighbouring chunks do not overlap.
            let chunk_seed =
                crate::rng::SplitMix64::new(base ^ (i as u64).rotate_left(32)).next_u64();
            let mut rng = crate::rng::SplitMix64::new(chunk_seed);
            for x in chunk {
                *x = conv(((rng.next_f64() * 2.0 - 1.0) * bound) as f32);
            }
        });
        v
    }
    match dtype {
        DType::F32 => Tensor::from_vec(fill(n, base, bound, |x| x, 0f32), shape, device),
        DType::BF16 => Tensor::from_vec(
            fill(n, base, bound, bf16::from_f32, bf16::ZERO),
            shape,
            device,
        ),
        DType::F16 => Tensor::from_vec(
            fill(n, base, bound, f16::from_f32, f16::ZERO),
            shape,
            device,
        ),
        other => candle_core::bail!("random weights in {other:?}: only f32, bf16 and f16"),
    }
}
