//! Kernels for llmem: KV cache writes and paged attention, the block-quantized (Q8_0,
//! Q4_0, Q4_1, Q5_0) matrix product ([`packed`]), the dense matvec of decode
//! ([`matvec`]) and the layer's element-wise steps ([`ops`]), on the CPU.
//!
//! Kernels are free functions over slices: they know nothing of requests, sequences or
//! schedulers, only of block tables, slot mappings and context lengths (vLLM's
//! vocabulary). The cache layout is `(num_blocks, block_size, kv_heads, head_dim)` for K
//! and for V, so one slot (`block * block_size + offset`) holds every KV head of one token
//! contiguously. Every fast kernel has a slow reference beside it (`*_reference`) and is
//! tested against it for f32, f16 and bf16.
//!
//! The CUDA twins (feature `cuda`, module [`cuda`]) take the same parameters on device
//! buffers and share these checks; they are tested against the CPU kernels.

mod attention;
mod cache;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod elem;
pub mod gemm;
pub mod matvec;
pub mod ops;
pub mod packed;

pub use attention::{paged_attention, paged_attention_reference, AttentionParams};
pub use cache::{reshape_and_cache, reshape_and_cache_reference, CacheShape};
pub use elem::{BlockQ4, BlockQ8, CacheElem, CacheStore, ElemKind, Q4_BLOCK, Q8_BLOCK};

/// An element of a product's output: `f32`, or `MaybeUninit<f32>` for an output made
/// uncleared, which the product fills completely. The tiled products write their outputs
/// through raw pointers and never read them, so both kinds take the same code. Prefill and
/// batched decode make outputs of megabytes per product; clearing each (`vec![0.0; n]` is
/// `calloc`) was 2-3% of their samples (docs/results.md 13 (r)).
pub trait OutElem: sealed::Sealed + Send + Sync {
    /// `s` as f32 cells, each set to 0.0 first where they may be uninitialized: for the
    /// paths that write through a `&mut [f32]`.
    fn cleared(s: &mut [Self]) -> &mut [f32]
    where
        Self: Sized;
}

impl OutElem for f32 {
    fn cleared(s: &mut [f32]) -> &mut [f32] {
        s
    }
}

impl OutElem for std::mem::MaybeUninit<f32> {
    fn cleared(s: &mut [Self]) -> &mut [f32] {
        for c in s.iter_mut() {
            c.write(0.0);
        }
        // SAFETY: every cell was initialized just above, and `MaybeUninit<f32>` has the
        // layout of `f32`.
        unsafe { &mut *(s as *mut [Self] as *mut [f32]) }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for std::mem::MaybeUninit<f32> {}
}

/// Errors: a shape or index that does not match the parameters. Kernels check their
/// inputs up front and never index out of bounds.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    #[error("{name} has {actual} elements, expected {expected} ({shape})")]
    Length {
        name: &'static str,
        actual: usize,
        expected: usize,
        shape: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn check_len(
    name: &'static str,
    actual: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            name,
            actual,
            expected,
            shape: shape(),
        })
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A small deterministic generator for test inputs (xorshift64*).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in [-1, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }
}
