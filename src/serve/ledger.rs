//! The memory ledger: where the server's memory went, per component, beside the
//! planner's prediction for the same deployment.
//!
//! On the CPU, with the counting allocator the binary installs (`llmem_engine::heap`),
//! every figure of the stack is measured and together they are the resident set
//! (`VmRSS` of /proc/self/status):
//! - per rank, the heap bytes counted as its weights, its KV cache and its activations
//!   (the live bytes now; `activation_peak_bytes` is the largest working set of one pass,
//!   its peak above what the rank held before it). `weights_bytes` and
//!   `kv_cache_reserved_bytes` stay the engine's tensor byte counts, the planner's unit;
//!   the heap figures add each tensor's bookkeeping (a few hundred bytes);
//! - `runtime_overhead` (rank 0): the heap counted as the runtime's (server, tokenizer,
//!   scheduler, rope tables) and as nothing's, the allocator's own bytes (block headers,
//!   what malloc holds free), and the file-backed resident pages (binary, libraries;
//!   mmap-ed weight files apart);
//! - `unaccounted`: the resident set minus all of the above (thread stacks, anonymous
//!   maps outside malloc). It can be negative when part of an allocation is not resident.
//!
//! Without the counting allocator (a build without the `heap-stats` feature) the figures
//! fall back to the engine's arithmetic: activation estimates, and as the runtime
//! overhead the resident set before the model loaded.
//!
//! On a CUDA GPU (`serve --device cuda`) the device's numbers come from the driver
//! (`cuMemGetInfo`) and from the memory pool candle allocates from: `device_used_bytes`
//! is the whole device's use; the activations now are the pool's bytes in use beyond the
//! weights and the KV cache (the estimate when the pool does not answer); the runtime
//! overhead is the CUDA context + libraries measured at start-up plus the pool's cached
//! bytes (reserved from the driver, not in use); and `unaccounted` is `(device used -
//! other processes' use at start-up) - (weights + kv_reserved + activations_now +
//! runtime_overhead)`: cuBLAS workspaces grown later, allocations outside the pool. The
//! device is read through [`DeviceProbe`], which a test fakes with fixed numbers.
//!
//! The planner's side (`plan`) comes from `llmem_engine::engine::planned_terms` for the
//! served model, dtypes and limits in a device of the memory budget; its
//! `kv_cache_reserved_bytes` is the KV of the most `max_model_len`-token sequences the
//! planner fits in the budget, and `kv_cache_demand_bytes` what `max_num_seqs` such
//! sequences would need.

use std::fmt::Write as _;

use std::sync::Arc;

use llmem_engine::device::DeviceProbe;
use llmem_engine::engine::runner::PlannedRank;
use llmem_engine::engine::PlannedTerms;
use serde_json::{json, Value};

use llmem_engine::heap::{self, Component};

use super::metrics::{Histogram, Shared};
use crate::procfs::{
    allocator_free_bytes, machine_used_bytes, mapped_files_resident_bytes, process_resident,
};

/// One rank's figures fixed at start-up, with the planner's per-GPU terms for it.
#[derive(Debug, Clone)]
pub struct RankLedger {
    pub stage: usize,
    pub tp_rank: usize,
    pub weights_bytes: u64,
    pub kv_cache_reserved_bytes: u64,
    /// The planner's weights / KV / activations for this rank (TP/PP runs).
    pub planned: Option<PlannedRank>,
}

/// The GPU's figures fixed at start-up (`serve --device cuda`), and the device to read.
#[derive(Debug, Clone)]
pub struct GpuLedger {
    pub probe: Arc<dyn DeviceProbe>,
    /// Device memory in use before llmem's context existed (estimated; see
    /// `llmem_engine::device`).
    pub other_processes_bytes: u64,
    /// The CUDA context + cuBLAS measured at start-up.
    pub cuda_context_bytes: u64,
}

/// Figures fixed at start-up.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub device: String,
    /// Set when serving on a CUDA GPU: the device's memory then comes from the driver.
    pub gpu: Option<GpuLedger>,
    /// Stage-major, as `Engine::rank_memory`; one entry unsharded.
    pub ranks: Vec<RankLedger>,
    /// Bytes of one block over all layers and ranks.
    pub block_bytes: u64,
    pub block_size: usize,
    pub runtime_overhead_bytes: u64,
    pub device_total_bytes: u64,
    pub max_model_len: usize,
    /// The planner's figures for the whole deployment in a device of the budget
    /// (unsharded runs).
    pub planned: Option<PlannedTerms>,
    /// Why there is no plan, when there is none.
    pub plan_error: Option<String>,
}

/// One rank's live figures.
struct RankNow {
    kv_used: u64,
    /// Measured: the rank's activation heap now. Without the counting allocator: the
    /// estimate of the last pass.
    activation: u64,
    /// Measured: the largest pass working set so far (else the estimate's largest).
    activation_peak: u64,
    /// Measured: the last pass's working set (0 when idle).
    activation_last_pass: Option<u64>,
    activation_estimate: u64,
    activation_estimate_peak: u64,
    activation_source: ActivationSource,
    heap: Option<RankHeap>,
    /// The process's gap, carried by rank 0 (ranks are threads of one process).
    unaccounted: i64,
}

/// A rank's heap bytes by component, as `llmem_engine::heap` counts them.
#[derive(Clone, Copy, Default)]
struct RankHeap {
    weights: u64,
    kv_cache: u64,
}

/// What the resident set holds besides the ranks' weights, KV and activations (CPU runs
/// with the counting allocator): together with them it sums to the RSS, `unaccounted`
/// being the rest.
#[derive(Clone, Copy, Default)]
struct ProcessParts {
    /// Heap counted as the runtime's: server, tokenizer, scheduler, rope tables.
    runtime_heap: u64,
    /// Heap nothing named (libraries' own allocations, rayon's workers).
    other_heap: u64,
    /// The allocator's own use: the counting headers plus what malloc holds free.
    allocator: u64,
    /// File-backed resident pages: the binary and its libraries (weight files apart).
    code_and_files: u64,
    /// Resident pages of mmap-ed weight files.
    mapped_weight_files: u64,
}

impl ProcessParts {
    fn total(&self) -> u64 {
        self.runtime_heap
            + self.other_heap
            + self.allocator
            + self.code_and_files
            + self.mapped_weight_files
    }
}

/// What `unaccounted` holds when the heap is counted.
const UNACCOUNTED_EXPLAINED: &str = "resident set minus every measured part: thread \
    stacks, anonymous maps outside malloc (the kernels' and libraries' own), pages of freed \
    malloc blocks the allocator has not returned and does not report as free";

/// What `unaccounted` holds on a GPU.
const GPU_UNACCOUNTED_EXPLAINED: &str = "device memory in use by this process (the device's \
    use minus the other processes' at start-up) minus every part: cuBLAS workspaces grown \
    after start-up, allocations outside the memory pool";

/// The live figures of one moment.
struct Now {
    ranks: Vec<RankNow>,
    rss: u64,
    device_used: u64,
    /// Set on the CPU when the counting allocator runs.
    parts: Option<ProcessParts>,
    /// Set on a GPU.
    gpu: Option<GpuParts>,
}

/// What a GPU's runtime overhead holds.
#[derive(Clone, Copy, Default)]
struct GpuParts {
    /// The CUDA context and libraries, measured at start-up.
    cuda_context: u64,
    /// The pool's reserved bytes not in use (`None`: the pool did not answer).
    pool_cached: Option<u64>,
}

/// Where a rank's "activations now" come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ActivationSource {
    /// The counting allocator (CPU).
    Heap,
    /// The device pool's bytes in use beyond weights and KV (GPU).
    DevicePool,
    /// The activation formula for the last pass.
    Estimate,
}

impl ActivationSource {
    fn name(self) -> &'static str {
        match self {
            ActivationSource::Heap => "heap",
            ActivationSource::DevicePool => "device_pool",
            ActivationSource::Estimate => "estimate",
        }
    }
}

impl Ledger {
    /// The KV the planner reserves: its largest concurrency of `max_model_len`-token
    /// sequences that fits the budget, times their bytes. (The engine reserves whole
    /// blocks of whatever is left, so it may hold a little more.)
    fn planned_kv_reserved(&self) -> u64 {
        self.planned.as_ref().map_or(0, |p| {
            p.max_concurrency
                .saturating_mul(self.max_model_len as u64)
                .saturating_mul(p.kv_bytes_per_token)
        })
    }

    fn now(&self, shared: &Shared) -> Now {
        let snap = shared.snapshot();
        let resident = process_resident().unwrap_or_default();
        let rss = resident.rss;
        let (used, total) = (
            snap.stats.blocks_used as u64,
            snap.stats.blocks_total as u64,
        );
        // Measured figures need the counting allocator, and a CPU (a GPU's memory is
        // the driver's).
        let counted = heap::installed() && self.gpu.is_none();
        let device = self
            .gpu
            .as_ref()
            .map(|g| (g.probe.memory(), g.probe.pool()));
        let pool = device.and_then(|d| d.1);
        let mut ranks: Vec<RankNow> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (estimate, estimate_peak) =
                    snap.rank_activation.get(i).copied().unwrap_or((0, 0));
                let measured = snap
                    .rank_activation_measured
                    .as_ref()
                    .and_then(|m| m.get(i).copied());
                let (activation, activation_peak, last_pass, source) = match (counted, measured) {
                    (true, Some((last, peak))) => (
                        heap::live(Component::Activations, i),
                        peak,
                        Some(last),
                        ActivationSource::Heap,
                    ),
                    // One device holds the one rank a GPU runs: what its pool hands out
                    // beyond the weights and the KV cache is the pass's tensors.
                    _ => match pool.filter(|_| self.ranks.len() == 1) {
                        Some(p) => (
                            p.current_bytes
                                .saturating_sub(r.weights_bytes + r.kv_cache_reserved_bytes),
                            estimate_peak,
                            None,
                            ActivationSource::DevicePool,
                        ),
                        None => (estimate, estimate_peak, None, ActivationSource::Estimate),
                    },
                };
                RankNow {
                    kv_used: crate::cmd::trace::kv_used_bytes(
                        r.kv_cache_reserved_bytes,
                        used,
                        total,
                    ),
                    activation,
                    activation_peak,
                    activation_last_pass: last_pass,
                    activation_estimate: estimate,
                    activation_estimate_peak: estimate_peak,
                    activation_source: source,
                    heap: counted.then(|| RankHeap {
                        weights: heap::live(Component::Weights, i),
                        kv_cache: heap::live(Component::KvCache, i),
                    }),
                    unaccounted: 0,
                }
            })
            .collect();
        let parts = counted.then(|| {
            let mapped = mapped_files_resident_bytes(&[".gguf", ".safetensors"]).unwrap_or(0);
            ProcessParts {
                runtime_heap: heap::live_all_ranks(Component::Runtime),
                other_heap: heap::live_all_ranks(Component::Other),
                allocator: heap::header_bytes() + allocator_free_bytes().unwrap_or(0),
                code_and_files: resident.file.saturating_sub(mapped),
                mapped_weight_files: mapped,
            }
        });
        let gpu = self.gpu.as_ref().map(|g| GpuParts {
            cuda_context: g.cuda_context_bytes,
            pool_cached: pool.map(|p| p.reserved_bytes.saturating_sub(p.current_bytes)),
        });
        let accounted: u64 = match &parts {
            Some(p) => {
                ranks
                    .iter()
                    .map(|n| {
                        let h = n.heap.unwrap_or_default();
                        h.weights + h.kv_cache + n.activation
                    })
                    .sum::<u64>()
                    + p.total()
            }
            None => {
                self.ranks
                    .iter()
                    .zip(&ranks)
                    .map(|(r, n)| r.weights_bytes + r.kv_cache_reserved_bytes + n.activation)
                    .sum::<u64>()
                    + gpu.map_or(self.runtime_overhead_bytes, |g| {
                        g.cuda_context + g.pool_cached.unwrap_or(0)
                    })
            }
        };
        let (ours, device_used) = match (&self.gpu, device) {
            (Some(g), Some((memory, _))) => {
                let used = memory.map_or(0, |m| m.used_bytes());
                (used.saturating_sub(g.other_processes_bytes), used)
            }
            _ => (rss, machine_used_bytes().unwrap_or(0)),
        };
        if let Some(first) = ranks.first_mut() {
            first.unaccounted = ours as i64 - accounted as i64;
        }
        Now {
            ranks,
            rss,
            device_used,
            parts,
            gpu,
        }
    }

    /// The runtime's measured share on rank 0 (everything but weights, KV, activations
    /// and the unaccounted rest), or the resident set before loading without the heap
    /// counts.
    fn runtime_overhead_now(&self, n: &Now) -> u64 {
        match (n.parts, n.gpu) {
            (Some(p), _) => p.total(),
            (None, Some(g)) => g.cuda_context + g.pool_cached.unwrap_or(0),
            (None, None) => self.runtime_overhead_bytes,
        }
    }

    /// Why the KV the engine reserved differs from the plan's, in numbers (`None` when
    /// they agree).
    fn kv_difference_explained(&self, p: &PlannedTerms) -> Option<String> {
        let engine: u64 = self.ranks.iter().map(|r| r.kv_cache_reserved_bytes).sum();
        let planned = self.planned_kv_reserved();
        if engine == planned {
            return None;
        }
        let diff = engine as i128 - planned as i128;
        Some(format!(
            "the engine reserves {engine} B, {diff:+} B against the plan: it fills what the \
             budget leaves after weights, activations and the runtime overhead with whole \
             blocks of {} tokens, while the planner counts whole sequences of max_model_len \
             = {} tokens ({} of them, {} B of KV per token) after the same activation figure \
             ({} B, one formula for both)",
            self.block_size,
            self.max_model_len,
            p.max_concurrency,
            p.kv_bytes_per_token,
            p.activation_bytes
        ))
    }

    /// The `plan` object: the planner's terms per GPU (rank 0's under TP/PP).
    fn plan_json(&self) -> Value {
        if let Some(p) = &self.planned {
            return json!({
                "weights_bytes": p.weights_bytes,
                "kv_cache_reserved_bytes": self.planned_kv_reserved(),
                "kv_cache_demand_bytes": p.kv_cache_bytes,
                "activation_bytes": p.activation_bytes,
                "activation_peak_bytes": p.activation_bytes,
                "runtime_overhead_bytes": self.runtime_overhead_bytes,
                "headroom_bytes": 0,
                "total_bytes": sum_bytes(&[p.weights_bytes, self.planned_kv_reserved(),
                                           p.activation_bytes, self.runtime_overhead_bytes]),
                "kv_bytes_per_token": p.kv_bytes_per_token,
                "max_concurrency": p.max_concurrency,
                "kv_cache_reserved_explained": self.kv_difference_explained(p),
            });
        }
        match self.ranks.first().and_then(|r| r.planned) {
            Some(p) => json!({
                "weights_bytes": p.weights_bytes,
                "kv_cache_reserved_bytes": p.kv_cache_bytes,
                "activation_bytes": p.activation_bytes,
                "activation_peak_bytes": p.activation_bytes,
                "runtime_overhead_bytes": self.runtime_overhead_bytes,
                "headroom_bytes": 0,
                "total_bytes": sum_bytes(&[p.weights_bytes, p.kv_cache_bytes,
                                           p.activation_bytes, self.runtime_overhead_bytes]),
                "per_rank": true,
            }),
            None => json!({"error": self.plan_error}),
        }
    }

    /// The `/v1/memory` document.
    /// `/v1/memory` of the model served as `model_id`, up `uptime_s` seconds.
    pub fn memory_json(&self, shared: &Shared, model_id: &str, uptime_s: f64) -> Value {
        let snap = shared.snapshot();
        let n = self.now(shared);
        let ranks: Vec<Value> = self
            .ranks
            .iter()
            .zip(&n.ranks)
            .enumerate()
            .map(|(i, (r, now))| {
                let mut v = json!({
                    "rank": i,
                    "stage": r.stage,
                    "tp_rank": r.tp_rank,
                    "weights_bytes": r.weights_bytes,
                    "kv_cache_reserved_bytes": r.kv_cache_reserved_bytes,
                    "kv_cache_used_bytes": now.kv_used,
                    "activation_bytes": now.activation,
                    "activation_peak_bytes": now.activation_peak,
                    "activation_estimate_bytes": now.activation_estimate,
                    "activation_estimate_peak_bytes": now.activation_estimate_peak,
                    "activations_measured": now.activation_last_pass.is_some(),
                    "activation_source": now.activation_source.name(),
                    "runtime_overhead_bytes": if i == 0 { self.runtime_overhead_now(&n) } else { 0 },
                    "unaccounted_bytes": now.unaccounted,
                    "device_total_bytes": self.device_total_bytes,
                    "device_used_bytes": n.device_used,
                    "process_rss_bytes": n.rss,
                });
                if let Some(last) = now.activation_last_pass {
                    v["activation_last_pass_bytes"] = json!(last);
                }
                if let Some(h) = now.heap {
                    v["weights_heap_bytes"] = json!(h.weights);
                    v["kv_cache_heap_bytes"] = json!(h.kv_cache);
                }
                if let (0, Some(p)) = (i, n.parts) {
                    v["runtime_parts"] = json!({
                        "runtime_heap_bytes": p.runtime_heap,
                        "other_heap_bytes": p.other_heap,
                        "allocator_bytes": p.allocator,
                        "code_and_files_bytes": p.code_and_files,
                        "mapped_weight_files_bytes": p.mapped_weight_files,
                    });
                    v["unaccounted_explained"] = json!(UNACCOUNTED_EXPLAINED);
                }
                if let (0, Some(g)) = (i, n.gpu) {
                    v["runtime_parts"] = json!({
                        "cuda_context_bytes": g.cuda_context,
                        "allocator_bytes": g.pool_cached,
                    });
                    v["unaccounted_explained"] = json!(GPU_UNACCOUNTED_EXPLAINED);
                }
                if let Some(p) = r.planned {
                    v["planned"] = json!({
                        "weights_bytes": p.weights_bytes,
                        "kv_cache_reserved_bytes": p.kv_cache_bytes,
                        "activation_bytes": p.activation_bytes,
                    });
                }
                v
            })
            .collect();
        json!({
            "cpu_kernels": llmem_kernels::cpu::level().name(),
            "model": model_id,
            "device": self.device,
            "gpu": self.gpu.as_ref().map(|g| json!({
                "other_processes_bytes": g.other_processes_bytes,
                "cuda_context_bytes": g.cuda_context_bytes,
            })),
            "uptime_s": uptime_s,
            "ranks": ranks,
            "plan": self.plan_json(),
            "kv_blocks": {
                "total": snap.stats.blocks_total,
                "used": snap.stats.blocks_used,
                "free": snap.stats.blocks_free,
                "cached": snap.stats.blocks_cached,
                "block_size_tokens": self.block_size,
                "bytes_per_block": self.block_bytes,
            },
            "requests": {
                "running": snap.stats.running,
                "waiting": shared.waiting(),
            },
            "tokens": {
                "prompt_total": snap.prompt_tokens_total,
                "generated_total": snap.generated_tokens_total,
            },
            "preemptions_total": snap.stats.preemptions,
        })
    }

    /// The `/metrics` page in Prometheus' text format.
    pub fn prometheus(&self, shared: &Shared) -> String {
        let snap = shared.snapshot();
        let n = self.now(shared);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let comp = |c: &str, rank: usize| format!("{{component=\"{c}\",rank=\"{rank}\"}}");
        let mut measured = Vec::new();
        let mut planned = Vec::new();
        for (i, (r, now)) in self.ranks.iter().zip(&n.ranks).enumerate() {
            measured.extend([
                (comp("weights", i), r.weights_bytes as f64),
                (
                    comp("kv_cache_reserved", i),
                    r.kv_cache_reserved_bytes as f64,
                ),
                (comp("kv_cache_used", i), now.kv_used as f64),
                (comp("activations", i), now.activation as f64),
                (comp("activations_peak", i), now.activation_peak as f64),
                (
                    comp("activations_estimate", i),
                    now.activation_estimate as f64,
                ),
            ]);
            if let Some(h) = now.heap {
                measured.extend([
                    (comp("weights_heap", i), h.weights as f64),
                    (comp("kv_cache_heap", i), h.kv_cache as f64),
                ]);
            }
            if let Some(last) = now.activation_last_pass {
                measured.push((comp("activations_last_pass", i), last as f64));
            }
            if let Some(p) = r.planned {
                planned.extend([
                    (comp("weights", i), p.weights_bytes as f64),
                    (comp("kv_cache_reserved", i), p.kv_cache_bytes as f64),
                    (comp("activations", i), p.activation_bytes as f64),
                ]);
            }
        }
        let rank0 = n.ranks.first().map_or(0, |r| r.unaccounted);
        if let Some(p) = n.parts {
            measured.extend([
                (comp("runtime_heap", 0), p.runtime_heap as f64),
                (comp("other_heap", 0), p.other_heap as f64),
                (comp("allocator", 0), p.allocator as f64),
                (comp("code_and_files", 0), p.code_and_files as f64),
                (comp("mapped_weight_files", 0), p.mapped_weight_files as f64),
            ]);
        }
        if let Some(g) = n.gpu {
            measured.push((comp("cuda_context", 0), g.cuda_context as f64));
            if let Some(cached) = g.pool_cached {
                measured.push((comp("allocator", 0), cached as f64));
            }
        }
        measured.extend([
            (
                comp("runtime_overhead", 0),
                self.runtime_overhead_now(&n) as f64,
            ),
            (comp("unaccounted", 0), rank0 as f64),
            (comp("process_rss", 0), n.rss as f64),
            (comp("device_total", 0), self.device_total_bytes as f64),
            (comp("device_used", 0), n.device_used as f64),
        ]);
        if let Some(p) = &self.planned {
            planned.extend([
                (comp("weights", 0), p.weights_bytes as f64),
                (
                    comp("kv_cache_reserved", 0),
                    self.planned_kv_reserved() as f64,
                ),
                (comp("activations", 0), p.activation_bytes as f64),
            ]);
        }
        if !planned.is_empty() {
            planned.push((
                comp("runtime_overhead", 0),
                self.runtime_overhead_bytes as f64,
            ));
        }
        family(
            "llmem_memory_bytes",
            "gauge",
            "Memory by component and rank: the engine's accounting, and the OS's resident set.",
            &measured,
        );
        family(
            "llmem_memory_planned_bytes",
            "gauge",
            "The capacity planner's prediction for the same deployment, per GPU.",
            &planned,
        );
        let s = &snap.stats;
        family(
            "llmem_kv_blocks",
            "gauge",
            "KV cache blocks: used by live sequences, free (including cached), cached \
             (free blocks still holding a reusable prefix).",
            &[
                ("{state=\"used\"}".into(), s.blocks_used as f64),
                ("{state=\"free\"}".into(), s.blocks_free as f64),
                ("{state=\"cached\"}".into(), s.blocks_cached as f64),
            ],
        );
        family(
            "llmem_kv_block_bytes",
            "gauge",
            "Bytes of one KV block over all layers (and ranks).",
            &[(String::new(), self.block_bytes as f64)],
        );
        family(
            "llmem_requests",
            "gauge",
            "Requests in the engine.",
            &[
                ("{state=\"running\"}".into(), s.running as f64),
                ("{state=\"waiting\"}".into(), shared.waiting() as f64),
            ],
        );
        family(
            "llmem_preemptions_total",
            "counter",
            "Sequences preempted (recomputed later) because KV blocks ran out.",
            &[(String::new(), s.preemptions as f64)],
        );
        family(
            "llmem_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            &[(String::new(), snap.prompt_tokens_total as f64)],
        );
        family(
            "llmem_generation_tokens_total",
            "counter",
            "Tokens generated.",
            &[(String::new(), snap.generated_tokens_total as f64)],
        );
        family(
            "llmem_requests_total",
            "counter",
            "Requests that ended, by how.",
            &[
                (
                    "{outcome=\"finished\"}".into(),
                    snap.requests_finished as f64,
                ),
                ("{outcome=\"aborted\"}".into(), snap.requests_aborted as f64),
                ("{outcome=\"failed\"}".into(), snap.requests_failed as f64),
            ],
        );
        histogram(
            &mut out,
            "llmem_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            &snap.ttft,
        );
        histogram(
            &mut out,
            "llmem_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &snap.itl,
        );
        out
    }
}

/// A sum of byte counts that saturates instead of overflowing.
fn sum_bytes(terms: &[u64]) -> u64 {
    terms.iter().fold(0u64, |a, b| a.saturating_add(*b))
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        cumulative += c;
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.5, 0.7, 3.0] {
            h.observe(s);
        }
        let mut out = String::new();
        histogram(&mut out, "x", "help", &h);
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    /// A GPU that reports fixed numbers.
    #[derive(Debug)]
    struct FakeGpu {
        memory: llmem_engine::device::DeviceMemory,
        pool: Option<llmem_engine::device::PoolUsage>,
    }

    impl DeviceProbe for FakeGpu {
        fn memory(&self) -> Option<llmem_engine::device::DeviceMemory> {
            Some(self.memory)
        }
        fn pool(&self) -> Option<llmem_engine::device::PoolUsage> {
            self.pool
        }
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn gpu_ledger(pool: Option<llmem_engine::device::PoolUsage>) -> (Ledger, Shared) {
        let probe = FakeGpu {
            // 30 GiB of 80 in use on the device.
            memory: llmem_engine::device::DeviceMemory {
                free_bytes: 50 * GIB,
                total_bytes: 80 * GIB,
            },
            pool,
        };
        let ledger = Ledger {
            device: "cuda:0 (fake)".into(),
            gpu: Some(GpuLedger {
                probe: Arc::new(probe),
                other_processes_bytes: 10 * GIB,
                cuda_context_bytes: 500 * MIB,
            }),
            ranks: vec![RankLedger {
                stage: 0,
                tp_rank: 0,
                weights_bytes: 2 * GIB,
                kv_cache_reserved_bytes: 15 * GIB,
                planned: None,
            }],
            block_bytes: MIB,
            block_size: 16,
            runtime_overhead_bytes: 500 * MIB,
            device_total_bytes: 80 * GIB,
            max_model_len: 4096,
            planned: None,
            plan_error: Some("no plan in this test".into()),
        };
        let mut snap = super::super::metrics::Snapshot::new(Default::default());
        snap.rank_activation = vec![(123 * MIB, 456 * MIB)];
        let shared = Shared {
            snapshot: std::sync::Mutex::new(snap),
            pending: Default::default(),
        };
        (ledger, shared)
    }

    /// The CUDA ledger's arithmetic on a fake device: the driver's use, the pool's bytes
    /// beyond weights and KV as the activations, the context and the pool's cached bytes
    /// as the runtime, and the rest unaccounted.
    #[test]
    fn a_gpu_ledger_reads_the_device_and_its_pool() {
        let pool = llmem_engine::device::PoolUsage {
            current_bytes: 17 * GIB + 300 * MIB,
            high_water_bytes: 18 * GIB,
            reserved_bytes: 18 * GIB + 300 * MIB,
        };
        let (ledger, shared) = gpu_ledger(Some(pool));
        let m = ledger.memory_json(&shared, "fake", 1.0);
        let r = &m["ranks"][0];
        assert_eq!(r["device_used_bytes"], 30 * GIB, "{r}");
        assert_eq!(r["activation_bytes"], 300 * MIB, "{r}");
        assert_eq!(r["activation_source"], "device_pool", "{r}");
        assert_eq!(r["activation_peak_bytes"], 456 * MIB, "{r}");
        assert_eq!(r["runtime_overhead_bytes"], 500 * MIB + GIB, "{r}");
        assert_eq!(r["runtime_parts"]["allocator_bytes"], GIB, "{r}");
        assert_eq!(r["runtime_parts"]["cuda_context_bytes"], 500 * MIB, "{r}");
        // (30 - 10) GiB of ours - (2 + 15 GiB + 300 MiB + 500 MiB + 1 GiB) = 1248 MiB.
        assert_eq!(r["unaccounted_bytes"], 1248 * MIB, "{r}");
        assert!(r["unaccounted_explained"]
            .as_str()
            .unwrap()
            .contains("cuBLAS"));
        let metrics = ledger.prometheus(&shared);
        for needle in [
            format!(
                "llmem_memory_bytes{{component=\"cuda_context\",rank=\"0\"}} {}",
                500 * MIB
            ),
            format!("llmem_memory_bytes{{component=\"allocator\",rank=\"0\"}} {GIB}"),
            format!(
                "llmem_memory_bytes{{component=\"unaccounted\",rank=\"0\"}} {}",
                1248 * MIB
            ),
        ] {
            assert!(metrics.contains(&needle), "missing {needle}");
        }
    }

    /// Without the pool's numbers the activations fall back to the estimate and the
    /// runtime to the context alone.
    #[test]
    fn a_gpu_ledger_without_pool_numbers_falls_back_to_the_estimate() {
        let (ledger, shared) = gpu_ledger(None);
        let m = ledger.memory_json(&shared, "fake", 1.0);
        let r = &m["ranks"][0];
        assert_eq!(r["activation_bytes"], 123 * MIB, "{r}");
        assert_eq!(r["activation_source"], "estimate", "{r}");
        assert_eq!(r["runtime_overhead_bytes"], 500 * MIB, "{r}");
        assert_eq!(r["runtime_parts"]["allocator_bytes"], Value::Null, "{r}");
        // 20 GiB - (17 GiB + 123 MiB + 500 MiB)
        assert_eq!(
            r["unaccounted_bytes"],
            20 * GIB - 17 * GIB - 623 * MIB,
            "{r}"
        );
    }
}
