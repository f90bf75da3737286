//! `reshape_and_cache`: write the new tokens' K and V into their cache slots.

use crate::elem::check_units;
use crate::{check_len, CacheStore, KernelError};

/// The cache geometry shared by the cache kernels and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Elements of one token's K (or V) over all KV heads.
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Slots in the cache: num_blocks x block_size.
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Elements of the whole K (or V) cache.
    pub fn elems(&self) -> usize {
        self.slots() * self.token_elems()
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "(num_blocks {}, block_size {}, kv_heads {}, head_dim {})",
            self.num_blocks, self.block_size, self.kv_heads, self.head_dim
        )
    }
}

/// Write `key` and `value` (each `[num_tokens, kv_heads, head_dim]`, f32, contiguous)
/// into `key_cache` and `value_cache` (each `[num_blocks, block_size, kv_heads, head_dim]`)
/// at the slots `slot_mapping[t]` (`[num_tokens]`; slot = block * block_size + offset).
/// A slot of `None` skips its token (padding). The caches are in units of `T` (values,
/// or blocks of 32 for [`crate::BlockQ8`], each head's row quantized on its own).
pub fn reshape_and_cache<T: CacheStore>(
    key: &[f32],
    value: &[f32],
    key_cache: &mut [T],
    value_cache: &mut [T],
    slot_mapping: &[Option<usize>],
    shape: CacheShape,
) -> Result<(), KernelError> {
    check_units::<T>(&shape)?;
    check_cache_write(
        key.len(),
        value.len(),
        key_cache.len().saturating_mul(T::ELEMS),
        value_cache.len().saturating_mul(T::ELEMS),
        slot_mapping,
        shape,
    )?;
    let n = shape.token_elems();
    let units = n / T::ELEMS;
    for (t, slot) in slot_mapping.iter().enumerate() {
        let Some(slot) = *slot else { continue };
        let src = t * n..(t + 1) * n;
        let dst = slot * units..(slot + 1) * units;
        T::store(&key[src.clone()], &mut key_cache[dst.clone()]);
        T::store(&value[src], &mut value_cache[dst]);
    }
    Ok(())
}

/// The checks of a cache write, before anything is written (CPU and CUDA kernels):
/// `key`/`value` hold `[num_tokens, kv_heads, head_dim]`, the caches `shape`, and every
/// slot lies inside the cache.
pub(crate) fn check_cache_write(
    key: usize,
    value: usize,
    key_cache: usize,
    value_cache: usize,
    slot_mapping: &[Option<usize>],
    shape: CacheShape,
) -> Result<(), KernelError> {
    let n = shape.token_elems();
    let tokens = slot_mapping.len();
    let token_shape = || format!("[{tokens}, {}, {}]", shape.kv_heads, shape.head_dim);
    check_len("key", key, tokens * n, token_shape)?;
    check_len("value", value, tokens * n, token_shape)?;
    check_len("key_cache", key_cache, shape.elems(), || shape.describe())?;
    check_len("value_cache", value_cache, shape.elems(), || {
        shape.describe()
    })?;
    for (t, slot) in slot_mapping.iter().enumerate() {
        if let Some(slot) = *slot {
            if slot >= shape.slots() {
                return Err(KernelError::Invalid(format!(
                    "slot_mapping[{t}] = {slot} is outside the cache's {} slots",
                    shape.slots()
                )));
            }
        }
    }
    Ok(())
}

/// The slow reference: the same write, head row by head row through explicit indices.
pub fn reshape_and_cache_reference<T: CacheStore>(
    key: &[f32],
    value: &[f32],
    key_cache: &mut [T],
    value_cache: &mut [T],
    slot_mapping: &[Option<usize>],
    shape: CacheShape,
) {
    for (t, slot) in slot_mapping.iter().enumerate() {
        let Some(slot) = *slot else { continue };
        let (block, offset) = (slot / shape.block_size, slot % shape.block_size);
        let units = shape.head_dim / T::ELEMS;
        for h in 0..shape.kv_heads {
            let src = (t * shape.kv_heads + h) * shape.head_dim;
            let src = src..src + shape.head_dim;
            let dst = ((block * shape.block_size + offset) * shape.kv_heads + h) * units;
            let dst = dst..dst + units;
            T::store(&key[src.clone()], &mut key_cache[dst.clone()]);
            T::store(&value[src], &mut value_cache[dst]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use half::{bf16, f16};

    fn check<T: CacheStore + PartialEq + std::fmt::Debug>(block_size: usize) {
        check_dim::<T>(block_size, 8)
    }

    fn check_dim<T: CacheStore + PartialEq + std::fmt::Debug>(block_size: usize, hd: usize) {
        let shape = CacheShape {
            num_blocks: 16,
            block_size,
            kv_heads: 3,
            head_dim: hd,
        };
        let mut rng = Rng::new(block_size as u64);
        let tokens = 11;
        let n = tokens * shape.token_elems();
        let key: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        let value: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        // Distinct random slots, one token padded.
        let mut slots: Vec<usize> = (0..shape.slots()).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.below(i + 1));
        }
        let mut mapping: Vec<Option<usize>> = slots[..tokens].iter().map(|s| Some(*s)).collect();
        mapping[4] = None;
        let mut kc = vec![T::default(); shape.elems() / T::ELEMS];
        let mut vc = vec![T::default(); shape.elems() / T::ELEMS];
        let (mut kr, mut vr) = (kc.clone(), vc.clone());
        reshape_and_cache(&key, &value, &mut kc, &mut vc, &mapping, shape).unwrap();
        reshape_and_cache_reference(&key, &value, &mut kr, &mut vr, &mapping, shape);
        assert_eq!(kc, kr, "{} block_size {block_size}", T::NAME);
        assert_eq!(vc, vr);
    }

    #[test]
    fn matches_reference_for_every_dtype_and_block_size() {
        for bs in [1, 16, 32] {
            check::<f32>(bs);
            check::<f16>(bs);
            check::<bf16>(bs);
            check_dim::<crate::BlockQ8>(bs, 64);
            check_dim::<crate::BlockQ4>(bs, 64);
        }
    }

    #[test]
    fn q8_0_blocks_round_trip_within_a_step() {
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..64).map(|_| rng.uniform() * 10.0).collect();
        let mut blocks = [crate::BlockQ8::default(); 2];
        crate::BlockQ8::store(&x, &mut blocks);
        let mut back = [0f32; 64];
        crate::BlockQ8::load(&blocks, &mut back);
        for (b, chunk) in blocks.iter().zip(x.chunks(32)) {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (b.d.to_f32() * 127.0 - amax).abs() <= amax * 1e-3,
                "scale {:?}",
                b.d
            );
            // The largest value maps to +-127; every value is within half a step.
            assert_eq!(b.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
        }
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            let step = blocks[i / 32].d.to_f32();
            assert!((a - b).abs() <= 0.5 * step * 1.01, "{i}: {a} vs {b}");
        }
        // All zeros stay zeros (no division by a zero scale).
        let zero = crate::BlockQ8::quantize(&[0.0; 32]);
        assert_eq!(zero, crate::BlockQ8::default());
    }

    #[test]
    fn q4_0_blocks_round_trip_within_a_step() {
        let mut rng = Rng::new(6);
        let x: Vec<f32> = (0..64).map(|_| rng.uniform() * 10.0 - 5.0).collect();
        let mut blocks = [crate::BlockQ4::default(); 2];
        crate::BlockQ4::store(&x, &mut blocks);
        let mut back = [0f32; 64];
        crate::BlockQ4::load(&blocks, &mut back);
        for (b, chunk) in blocks.iter().zip(x.chunks(32)) {
            // The value of largest magnitude is the scale times -8, exact up to f16.
            let max = chunk
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            assert!((b.d.to_f32() * -8.0 - max).abs() <= max.abs() * 1e-3);
        }
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            let step = blocks[i / 32].d.to_f32().abs();
            assert!((a - b).abs() <= 0.5 * step * 1.01, "{i}: {a} vs {b}");
        }
        // ggml's nibble order: value i in the low half of byte i, value i + 16 in the high.
        let mut ramp = [0f32; 32];
        ramp[0] = -8.0;
        ramp[16] = 7.0;
        let b = crate::BlockQ4::quantize(&ramp);
        assert_eq!(b.d.to_f32(), 1.0);
        assert_eq!(b.qs[0], 0x0F << 4);
        assert_eq!(b.qs[1], 0x88);
        let zero = crate::BlockQ4::quantize(&[0.0; 32]);
        let mut back = [1f32; 32];
        crate::BlockQ4::load(&[zero], &mut back);
        assert_eq!(back, [0f32; 32]);
    }

    #[test]
    fn bad_shapes_and_slots_are_errors() {
        let shape = CacheShape {
            num_blocks: 2,
            block_size: 4,
            kv_heads: 1,
            head_dim: 2,
        };
        let mut kc = vec![0f32; shape.elems()];
        let mut vc = vec![0f32; shape.elems()];
        let err = reshape_and_cache(&[0.0; 2], &[0.0; 2], &mut kc, &mut vc, &[Some(8)], shape)
            .unwrap_err();
        assert!(err.to_string().contains("slot_mapping[0] = 8"), "{err}");
        let err = reshape_and_cache(&[0.0; 3], &[0.0; 2], &mut kc, &mut vc, &[Some(0)], shape)
            .unwrap_err();
        assert!(err.to_string().contains("key has 3 elements"), "{err}");
    }
}
