//! The runner behind the [`crate::engine::Engine`]: one model and cache, or a TP x PP
//! grid of ranks, each a thread owning its weight shard and its own paged KV cache.
//!
//! [`ParallelRunner`] spawns `tp x pp` threads. Stage `s`, TP rank `r` holds the shard
//! [`Model::load_shard`] loads and a [`PagedKvCache`] of its layers and KV heads (the
//! block tables are the scheduler's and identical on every rank: a block index means
//! the same tokens everywhere, only the heads stored in it differ). A pass is a
//! sequential hand-off: the batch (ids, positions, metadata, sample rows) goes to every
//! rank of stage 0; the hidden states of its rank 0 go to every rank of stage 1; and so
//! on; the last stage's rank 0 returns the logits. The TP ranks of a stage meet in the
//! all-reduces of [`crate::parallel::comm::ThreadComm`]. No micro-batching: while one stage works
//! the others wait (correctness first; on a 2-core machine overlap would buy nothing).
//!
//! Failure: a rank whose pass fails after its input checks aborts its communicator, so
//! its peers return an error instead of waiting forever; the runner then refuses every
//! later pass (the caches of the ranks may disagree).
//!
//! [`RankMemory`] is what each rank holds; [`planned_rank_memory`] is the planner's
//! prediction for the same TP/PP/vocab split, the same dtypes and the same KV tokens:
//! weights and KV agree to the byte (tested), activations are estimates on both sides.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use llmem_planner::{AttentionImpl, Deployment, ModelShape, Workload};

use crate::cache::paged::{KvDtype, PagedKvCache, PagedMetadata};
use crate::error::{Error, Result};
use crate::heap::{self, Component};
use crate::model::rank_activation_peak_bytes;
use crate::model::Model;
use crate::parallel::comm::{CommStats, Communicator, ThreadComm};
use crate::parallel::spec::{ParallelSpec, ShardSpec};
use crate::weights::files::WeightFiles;
use crate::weights::quant::WeightFormat;

/// Memory one rank holds, as the engine counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMemory {
    pub stage: usize,
    pub tp_rank: usize,
    pub first_layer: usize,
    pub num_layers: usize,
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Estimated peak of one pass (see [`rank_activation_peak_bytes`]).
    pub activation_peak_bytes: u64,
}

/// The planner's per-GPU terms for the same rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRank {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
}

/// The planner's prediction for every rank (stage-major, like
/// [`ParallelRunner::rank_memory`]): a cache of `kv_tokens` tokens (one sequence of
/// that context, the same bytes as `num_blocks x block_size` slots) and passes of
/// `pass_tokens` tokens.
pub fn planned_rank_memory(
    shape: &ModelShape,
    fmt: &WeightFormat,
    spec: ParallelSpec,
    kv_dtype: KvDtype,
    kv_tokens: u64,
    pass_tokens: u64,
) -> Result<Vec<PlannedRank>> {
    let workload = Workload {
        context_tokens: kv_tokens.max(1),
        concurrency: 1,
        max_batched_tokens: pass_tokens.max(1),
        attention: AttentionImpl::Fused,
    };
    let mut d = Deployment::new(fmt.precision, llmem_planner::custom_gpu(1 << 50));
    d.keep_embeddings = fmt.keep_embeddings && fmt.precision.is_quantized();
    d.tp = spec.tp as u64;
    d.pp = spec.pp as u64;
    d.vocab_parallel = spec.vocab_parallel;
    d.kv_dtype = kv_dtype.planner();
    d.runtime_overhead_bytes = Some(0);
    d.headroom_fraction = 0.0;
    d.activation_bytes = Some(fmt.activation_dtype().size_in_bytes() as u64);
    let plan = llmem_planner::plan(shape, &workload, &d)
        .map_err(|e| Error::InvalidInput(format!("planner: {e}")))?;
    let mut out = Vec::new();
    for stage in &plan.stages {
        for &weights in &stage.rank_weights_bytes {
            out.push(PlannedRank {
                weights_bytes: weights,
                // kv_tokens may be 0 (an empty cache): the planner needs a context >= 1.
                kv_cache_bytes: if kv_tokens == 0 {
                    0
                } else {
                    stage.per_gpu.kv_cache_bytes
                },
                activation_bytes: stage.per_gpu.activation_bytes,
            });
        }
    }
    Ok(out)
}

/// One pass's inputs, shared by every rank.
struct Batch {
    ids: Vec<u32>,
    positions: Vec<u32>,
    meta: PagedMetadata,
    sample_rows: Vec<usize>,
}

struct Job {
    batch: Arc<Batch>,
    hidden: Option<Tensor>,
}

/// A rank's answer: its output (hidden states or logits, `None` when it has nothing to
/// hand on), whether the failure, if any, happened after the collectives began, and the
/// pass's activation peak on the rank's heap ([`crate::heap::PassMeter`]).
type Reply = (Result<Option<Tensor>>, bool, u64);

struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    replies: mpsc::Receiver<Reply>,
    handle: Option<JoinHandle<()>>,
    comm: Arc<dyn Communicator>,
}

/// A TP x PP grid of rank threads on the CPU.
pub struct ParallelRunner {
    shape: ModelShape,
    format: WeightFormat,
    spec: ParallelSpec,
    /// Stage-major: stage s, rank r at `s * tp + r`.
    workers: Vec<Worker>,
    memory: Vec<RankMemory>,
    /// Per rank: the heap peak of its last pass above what it held before.
    pass_heap: Vec<u64>,
    /// Why the grid refuses further passes.
    broken: Option<String>,
}

impl ParallelRunner {
    /// Load every rank's shard (in parallel, one thread per rank) and allocate its
    /// cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        shape: &ModelShape,
        weights: Arc<WeightFiles>,
        format: WeightFormat,
        spec: ParallelSpec,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDtype,
    ) -> Result<Self> {
        spec.validate(shape)?;
        let split = spec.stage_layers(shape);
        let mut workers = Vec::with_capacity(spec.tp * spec.pp);
        let mut ready = Vec::with_capacity(spec.tp * spec.pp);
        for stage in 0..spec.pp {
            for (rank, comm) in ThreadComm::group(spec.tp)?.into_iter().enumerate() {
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let (job_tx, job_rx) = mpsc::channel::<Job>();
                let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
                let (ready_tx, ready_rx) = mpsc::channel::<Result<(u64, u64)>>();
                let shard = ShardSpec {
                    tp_rank: rank,
                    pp_stage: stage,
                    parallel: spec,
                };
                let (shape, weights, thread_comm) = (shape.clone(), weights.clone(), comm.clone());
                // The rank's slot in the heap counts: its place in the grid, stage-major.
                let heap_rank = workers.len();
                let handle = std::thread::Builder::new()
                    .name(format!("llmem-pp{stage}-tp{rank}"))
                    .spawn(move || {
                        heap::tag_thread(Component::Other, heap_rank);
                        let loaded = Model::load_shard(
                            &shape,
                            &weights,
                            &format,
                            &Device::Cpu,
                            shard,
                            thread_comm.clone(),
                        )
                        .and_then(|m| {
                            let cache = m.new_paged_cache(num_blocks, block_size, kv_dtype)?;
                            Ok((m, cache))
                        });
                        drop(weights);
                        let (model, mut cache) = match loaded {
                            Ok(mc) => {
                                let _ = ready_tx.send(Ok((mc.0.weights_bytes(), mc.1.bytes())));
                                mc
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        rank_loop(
                            &model,
                            &mut cache,
                            &*thread_comm,
                            heap_rank,
                            job_rx,
                            reply_tx,
                        );
                    })
                    .map_err(|e| Error::InvalidInput(format!("spawning a rank thread: {e}")))?;
                workers.push(Worker {
                    jobs: Some(job_tx),
                    replies: reply_rx,
                    handle: Some(handle),
                    comm,
                });
                ready.push(ready_rx);
            }
        }
        let mut memory = Vec::with_capacity(workers.len());
        let mut first_err = None;
        for (i, rx) in ready.into_iter().enumerate() {
            let (stage, tp_rank) = (i / spec.tp, i % spec.tp);
            match rx.recv() {
                Ok(Ok((weights_bytes, kv_cache_bytes))) => memory.push(RankMemory {
                    stage,
                    tp_rank,
                    first_layer: split[..stage].iter().sum(),
                    num_layers: split[stage],
                    weights_bytes,
                    kv_cache_bytes,
                    activation_peak_bytes: 0,
                }),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::InvalidInput(format!(
                        "stage {stage} TP rank {tp_rank}: the rank thread died while loading"
                    )));
                }
            }
        }
        let runner = ParallelRunner {
            shape: shape.clone(),
            format,
            spec,
            pass_heap: vec![0; workers.len()],
            workers,
            memory,
            broken: None,
        };
        match first_err {
            // Dropping the runner stops the threads that did load.
            Some(e) => Err(e),
            None => Ok(runner),
        }
    }

    pub fn spec(&self) -> ParallelSpec {
        self.spec
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// How every rank stores its weights.
    pub fn format(&self) -> &WeightFormat {
        &self.format
    }

    /// One paged pass through every stage; the logits of `sample_rows` (rows x vocab).
    pub fn forward_paged(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        sample_rows: &[usize],
    ) -> Result<Tensor> {
        if let Some(why) = &self.broken {
            return Err(Error::InvalidInput(format!(
                "the tensor/pipeline-parallel ranks stopped after an earlier failure: {why}"
            )));
        }
        let batch = Arc::new(Batch {
            ids: ids.to_vec(),
            positions: positions.to_vec(),
            meta: meta.clone(),
            sample_rows: sample_rows.to_vec(),
        });
        let tp = self.spec.tp;
        let mut hidden: Option<Tensor> = None;
        for stage in 0..self.spec.pp {
            let ranks = &self.workers[stage * tp..(stage + 1) * tp];
            for w in ranks {
                let sent = w.jobs.as_ref().map(|tx| {
                    tx.send(Job {
                        batch: batch.clone(),
                        hidden: hidden.clone(),
                    })
                });
                if !matches!(sent, Some(Ok(()))) {
                    let why = "a rank thread has exited".to_string();
                    self.broken = Some(why.clone());
                    return Err(Error::InvalidInput(why));
                }
            }
            let mut first_err: Option<Error> = None;
            let mut out = None;
            let mut aborted = false;
            for (rank, w) in ranks.iter().enumerate() {
                match w.replies.recv() {
                    Ok((Ok(t), _, heap_peak)) => {
                        self.pass_heap[stage * tp + rank] = heap_peak;
                        if rank == 0 {
                            out = t;
                        }
                    }
                    Ok((Err(e), after_start, _)) => {
                        aborted |= after_start;
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        aborted = true;
                        first_err.get_or_insert(Error::InvalidInput(format!(
                            "stage {stage} TP rank {rank}: the rank thread died"
                        )));
                    }
                }
            }
            if let Some(e) = first_err {
                if aborted {
                    self.broken = Some(e.to_string());
                }
                return Err(e);
            }
            hidden = Some(out.ok_or_else(|| {
                Error::InvalidInput(format!("stage {stage} TP rank 0 returned no output"))
            })?);
        }
        hidden.ok_or_else(|| Error::InvalidInput("no pipeline stage ran".into()))
    }

    /// What every rank holds, stage-major, with the activation peak of a pass of
    /// `pass_tokens` tokens sampling `logits_rows` rows.
    pub fn rank_memory(&self, pass_tokens: usize, logits_rows: usize) -> Vec<RankMemory> {
        self.memory
            .iter()
            .map(|m| RankMemory {
                activation_peak_bytes: rank_activation_peak_bytes(
                    &self.shape,
                    self.format.activation_dtype(),
                    ShardSpec {
                        tp_rank: m.tp_rank,
                        pp_stage: m.stage,
                        parallel: self.spec,
                    },
                    self.format.precision.is_quantized(),
                    pass_tokens,
                    logits_rows,
                ),
                ..*m
            })
            .collect()
    }

    /// Collective timings of every rank, stage-major.
    pub fn comm_stats(&self) -> Vec<CommStats> {
        self.workers.iter().map(|w| w.comm.stats()).collect()
    }

    pub fn reset_comm_stats(&self) {
        for w in &self.workers {
            w.comm.reset_stats();
        }
    }
}

/// A rank's service loop: run each job, reply, until the runner hangs up.
fn rank_loop(
    model: &Model,
    cache: &mut PagedKvCache,
    comm: &dyn Communicator,
    heap_rank: usize,
    jobs: mpsc::Receiver<Job>,
    replies: mpsc::Sender<Reply>,
) {
    for job in jobs {
        let b = &job.batch;
        // Input checks fail identically on every rank, before any collective: the
        // group stays usable.
        if let Err(e) = model.check_paged(&b.ids, &b.positions, &b.meta, cache, &b.sample_rows) {
            if replies.send((Err(e), false, 0)).is_err() {
                return;
            }
            continue;
        }
        let (out, heap_peak) = heap::measure(Component::Activations, heap_rank, || {
            model.forward_stage_checked(
                &b.ids,
                &b.positions,
                job.hidden.as_ref(),
                &b.meta,
                cache,
                &b.sample_rows,
            )
        });
        let failed = out.is_err();
        if failed {
            comm.abort();
        }
        if replies.send((out, failed, heap_peak)).is_err() {
            return;
        }
    }
}

impl Drop for ParallelRunner {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// What the engine runs a pass on: one model and its cache, or a grid of ranks.
pub enum Runner {
    Single {
        model: Box<Model>,
        cache: PagedKvCache,
        /// The heap peak of the last pass above what was held before it (rank 0).
        pass_heap: u64,
    },
    Parallel(Box<ParallelRunner>),
}

impl Runner {
    pub fn shape(&self) -> &ModelShape {
        match self {
            Runner::Single { model, .. } => model.shape(),
            Runner::Parallel(p) => p.shape(),
        }
    }

    /// How the weights are stored (every rank alike).
    pub fn format(&self) -> &WeightFormat {
        match self {
            Runner::Single { model, .. } => model.weight_format(),
            Runner::Parallel(p) => p.format(),
        }
    }

    pub fn max_context(&self) -> usize {
        self.shape().max_position_embeddings as usize
    }

    /// The parallel layout (TP = PP = 1 for a single model).
    pub fn spec(&self) -> ParallelSpec {
        match self {
            Runner::Single { .. } => ParallelSpec::default(),
            Runner::Parallel(p) => p.spec(),
        }
    }

    pub fn forward_paged(
        &mut self,
        ids: &[u32],
        positions: &[u32],
        meta: &PagedMetadata,
        sample_rows: &[usize],
    ) -> Result<Tensor> {
        match self {
            Runner::Single {
                model,
                cache,
                pass_heap,
            } => {
                let (out, peak) = heap::measure(Component::Activations, 0, || {
                    model.forward_paged(ids, positions, meta, cache, sample_rows)
                });
                *pass_heap = peak;
                out
            }
            Runner::Parallel(p) => p.forward_paged(ids, positions, meta, sample_rows),
        }
    }

    /// KV cache bytes over every rank.
    pub fn cache_bytes(&self) -> u64 {
        match self {
            Runner::Single { cache, .. } => cache.bytes(),
            Runner::Parallel(p) => p.memory.iter().map(|m| m.kv_cache_bytes).sum(),
        }
    }

    /// Weight bytes over every rank (replicated tensors counted on each).
    pub fn weights_bytes(&self) -> u64 {
        match self {
            Runner::Single { model, .. } => model.weights_bytes(),
            Runner::Parallel(p) => p.memory.iter().map(|m| m.weights_bytes).sum(),
        }
    }

    /// Per-rank memory; one entry for a single model.
    pub fn rank_memory(&self, pass_tokens: usize, logits_rows: usize) -> Vec<RankMemory> {
        match self {
            Runner::Single { model, cache, .. } => vec![RankMemory {
                stage: 0,
                tp_rank: 0,
                first_layer: 0,
                num_layers: model.shape().num_hidden_layers as usize,
                weights_bytes: model.weights_bytes(),
                kv_cache_bytes: cache.bytes(),
                activation_peak_bytes: model.paged_activation_peak_bytes(pass_tokens, logits_rows),
            }],
            Runner::Parallel(p) => p.rank_memory(pass_tokens, logits_rows),
        }
    }

    /// Per rank (stage-major): the heap peak of its last pass above what it held before,
    /// as [`crate::heap::CountingAlloc`] counts it; zeros where that allocator is not
    /// installed ([`crate::heap::installed`]).
    pub fn last_pass_heap(&self) -> Vec<u64> {
        match self {
            Runner::Single { pass_heap, .. } => vec![*pass_heap],
            Runner::Parallel(p) => p.pass_heap.clone(),
        }
    }

    /// Collective timings per rank (empty for a single model: it communicates nothing).
    pub fn comm_stats(&self) -> Vec<CommStats> {
        match self {
            Runner::Single { .. } => Vec::new(),
            Runner::Parallel(p) => p.comm_stats(),
        }
    }
}
