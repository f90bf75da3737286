//! The `llmem` command line's subcommands and HTTP server, as a library: the binary
//! (`src/main.rs`) parses and dispatches; the fuzz targets (`fuzz/`) and the tests reach
//! the server's request handling through here.

pub mod cmd;
pub mod procfs;
pub mod serve;

/// Every heap block is counted per component and rank (`llmem_engine::heap`), in every
/// binary linking this crate (the `llmem` command and the tests).
#[cfg(feature = "heap-stats")]
#[global_allocator]
static ALLOC: llmem_engine::heap::CountingAlloc = llmem_engine::heap::CountingAlloc;
