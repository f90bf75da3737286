//! Choosing the next token ([`sampler`]) and turning tokens back into text ([`detok`]).

pub mod detok;
pub mod sampler;
