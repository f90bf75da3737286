//! The building blocks of a Llama layer, each with its loader: projections ([`linear`]),
//! attention, the MLP, norms, rotary embeddings, the decoder layer that composes them,
//! and the element-wise steps on host tensors ([`host_ops`]).

pub mod attention;
pub mod decoder;
pub(crate) mod host_ops;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;
