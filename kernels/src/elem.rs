//! Element types the KV cache can hold: f32, f16 and bf16. Arithmetic is always in f32.

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
