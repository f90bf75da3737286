//! Parallelism below the model: the collectives ([`comm`]), how a model is split over
//! ranks ([`spec`]) and the all-reduce that completes a row-parallel projection ([`tp`]).
//! The rank threads that run a split model live above it, in `crate::engine::runner`.

pub mod comm;
pub mod spec;
pub mod tp;
