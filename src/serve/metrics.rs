//! The counters the engine thread publishes and the HTTP handlers read: one
//! [`Snapshot`] of the engine's gauges, request counters and latency histograms per
//! iteration, behind [`Shared`]. The ledger renders them (`/v1/memory`, `/metrics`);
//! nothing here knows about HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use llmem_engine::engine::EngineStats;

/// Latency histogram in Prometheus' cumulative form.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds in seconds; an implicit +Inf bucket follows.
    pub bounds: &'static [f64],
    /// Observations <= each bound (not cumulative here; summed when rendered).
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Time to first token buckets (seconds).
pub const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Inter-token latency buckets (seconds).
pub const ITL_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What the engine thread publishes after each iteration.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stats: EngineStats,
    /// Per rank: the activation estimate of the last pass and the largest.
    pub rank_activation: Vec<(u64, u64)>,
    /// Per rank: the measured working set of the last pass and the largest (`None`
    /// without the counting allocator).
    pub rank_activation_measured: Option<Vec<(u64, u64)>>,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    pub requests_finished: u64,
    pub requests_aborted: u64,
    pub requests_failed: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Snapshot {
    /// Zero counters and empty histograms beside the engine's gauges.
    pub fn new(stats: EngineStats) -> Self {
        Snapshot {
            stats,
            rank_activation: Vec::new(),
            rank_activation_measured: None,
            prompt_tokens_total: 0,
            generated_tokens_total: 0,
            requests_finished: 0,
            requests_aborted: 0,
            requests_failed: 0,
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
        }
    }
}

/// State shared between the engine thread and the HTTP handlers.
pub struct Shared {
    pub snapshot: Mutex<Snapshot>,
    /// Requests sent to the engine thread and not yet queued in the engine.
    pub pending: AtomicUsize,
}

impl Shared {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Requests waiting: in the engine's queue plus those on their way to it.
    pub fn waiting(&self) -> usize {
        self.snapshot().stats.waiting + self.pending.load(Ordering::Relaxed)
    }
}
