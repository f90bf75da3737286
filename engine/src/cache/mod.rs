//! The KV cache: block bookkeeping on integers ([`block_manager`]), the paged tensors the
//! kernels read and write ([`paged`]), and the per-sequence contiguous cache ([`contiguous`]).

pub mod block_manager;
pub mod contiguous;
pub mod paged;
