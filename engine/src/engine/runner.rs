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
//! all-reduces of [`crate::parallel::comm::ThreadComm`]. With
//! [`ParallelRunner::set_micro_batches`] above 1 a pass is cut into micro-batches of
//! whole sequences that follow each other through the stages, so the stages work at
//! the same time; the default is 1 (while one stage works the others wait), because on
//! the CPU the stages share the cores and each stage's kernels already use them all
//! (measured 0.83x with 2 micro-batches at PP 2 on 2 cores; docs/results.md section 15).
//!
//! Failure: a rank whose pass fails after its input checks aborts its communicator, so
//! its peers return an error instead of waiting forever; the runner then refuses every
//! later pass (the caches of the ranks may disagree).
//!
//! [`RankMemory`] is what each rank holds; [`planned_rank_memory`] is the planner's
//! prediction for the same TP/PP/vocab split, the same dtypes and the same KV tokens:
//! weights and KV agree to the byte (tested), activations come from one formula.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use llmem_planner::{AttentionImpl, ModelShape, StoredTensor, Workload};

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
    stored: Option<Arc<Vec<StoredTensor>>>,
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
    let mut d = crate::engine::sizing::engine_deployment(fmt, spec, kv_dtype, 1 << 50, 0);
    d.stored_tensors = stored;
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

impl Batch {
    /// Up to `parts` micro-batches of whole sequences, cut where the tokens split most
    /// evenly; the whole batch when it cannot be cut (one sequence, or tokens or sampled
    /// rows out of sequence order).
    fn split(self, parts: usize) -> Vec<Batch> {
        let m = &self.meta;
        let rows = m.block_tables.len() / m.max_blocks_per_seq.max(1);
        let n = self.ids.len();
        let in_order = m.query_seq.windows(2).all(|w| w[0] <= w[1])
            && self.sample_rows.windows(2).all(|w| w[0] < w[1]);
        if parts <= 1 || rows <= 1 || !in_order || m.query_seq.len() != n {
            return vec![self];
        }
        // First token of each sequence row (every scheduled sequence feeds a token).
        let mut starts = vec![n; rows + 1];
        for (t, &r) in m.query_seq.iter().enumerate().rev() {
            starts[r as usize] = t;
        }
        if starts[..rows].contains(&n) {
            return vec![self];
        }
        let parts = parts.min(rows);
        let mut cuts = vec![0usize];
        for k in 1..parts {
            let target = n * k / parts;
            let last = *cuts.last().unwrap_or(&0);
            // The row boundary nearest the even share, leaving a row for every later part.
            let best = (last + 1..=rows - (parts - k))
                .min_by_key(|&r| starts[r].abs_diff(target))
                .unwrap_or(last + 1);
            cuts.push(best);
        }
        cuts.push(rows);
        cuts.windows(2)
            .map(|w| {
                let (r0, r1) = (w[0], w[1]);
                let (t0, t1) = (starts[r0], starts[r1]);
                let mb = m.max_blocks_per_seq;
                Batch {
                    ids: self.ids[t0..t1].to_vec(),
                    positions: self.positions[t0..t1].to_vec(),
                    meta: PagedMetadata {
                        slot_mapping: m.slot_mapping[t0..t1].to_vec(),
                        block_tables: m.block_tables[r0 * mb..r1 * mb].to_vec(),
                        max_blocks_per_seq: mb,
                        query_seq: m.query_seq[t0..t1].iter().map(|&r| r - r0 as u32).collect(),
                        context_lens: m.context_lens[t0..t1].to_vec(),
                    },
                    sample_rows: self
                        .sample_rows
                        .iter()
                        .filter(|&&r| (t0..t1).contains(&r))
                        .map(|&r| r - t0)
                        .collect(),
                }
            })
            .collect()
    }
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
    /// Micro-batches a pass is cut into under PP (1: none).
    micro_batches: usize,
    /// A GGUF loaded as stored: its tensor table (the planner cuts each rank's bytes).
    stored_tensors: Option<Arc<Vec<StoredTensor>>>,
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
        let stored_tensors = match (format.as_stored, weights.gguf()) {
            (true, Some(g)) => Some(Arc::new(g.stored_tensors()?)),
            _ => None,
        };
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
            micro_batches: 1,
            stored_tensors,
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

    /// A GGUF loaded as stored: its tensor table.
    pub fn stored_tensors(&self) -> Option<Arc<Vec<StoredTensor>>> {
        self.stored_tensors.clone()
    }

    /// Micro-batches a pass is cut into under PP (default 1: none).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Cut each pass into up to `n` micro-batches of whole sequences under PP, so the
    /// stages work at the same time; 1 runs the stages one after the other. Without PP it
    /// changes nothing. An error for 0.
    pub fn set_micro_batches(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidInput(
                "micro-batches is 0; it must be a positive integer (1: none)".into(),
            ));
        }
        self.micro_batches = n;
        Ok(())
    }

    /// One paged pass through every stage; the logits of `sample_rows` (rows x vocab).
    ///
    /// With PP > 1 and more than one sequence in the batch, the batch is cut into up to
    /// [`ParallelRunner::micro_batches`] micro-batches of whole sequences, all sent to
    /// stage 0 at once: each stage passes a micro-batch on as soon as it is done and
    /// starts the next, so the stages work at the same time (GPipe's schedule, forward
    /// only). The logits come back in the order of `sample_rows`.
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
        let whole = Batch {
            ids: ids.to_vec(),
            positions: positions.to_vec(),
            meta: meta.clone(),
            sample_rows: sample_rows.to_vec(),
        };
        let parts = if self.spec.pp > 1 {
            whole.split(self.micro_batches)
        } else {
            vec![whole]
        };
        let parts: Vec<Arc<Batch>> = parts.into_iter().map(Arc::new).collect();
        self.pass_heap.iter_mut().for_each(|h| *h = 0);
        // Jobs sent to each stage and not yet answered.
        let mut pending = vec![0usize; self.spec.pp];
        let result = self.pipeline(&parts, &mut pending);
        if result.is_err() && self.broken.is_none() {
            // Micro-batches still queued on a stage run and answer: take their replies,
            // so the next pass reads its own.
            for (stage, &n) in pending.iter().enumerate() {
                for _ in 0..n {
                    let _ = self.receive(stage);
                }
            }
        }
        let mut outputs = result?;
        if outputs.len() == 1 {
            return Ok(outputs.swap_remove(0));
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Every micro-batch to stage 0 at once, each on to the next stage as it returns;
    /// the last stage's outputs in micro-batch order.
    fn pipeline(&mut self, parts: &[Arc<Batch>], pending: &mut [usize]) -> Result<Vec<Tensor>> {
        for part in parts {
            self.send(0, part, None)?;
            pending[0] += 1;
        }
        let mut outputs = Vec::with_capacity(parts.len());
        for part in parts {
            let mut hidden = None;
            for (stage, waiting) in pending.iter_mut().enumerate() {
                if stage > 0 {
                    self.send(stage, part, hidden.take())?;
                    *waiting += 1;
                }
                *waiting -= 1;
                hidden = Some(self.receive(stage)?);
            }
            outputs
                .push(hidden.ok_or_else(|| Error::InvalidInput("no pipeline stage ran".into()))?);
        }
        Ok(outputs)
    }

    /// Send `batch` (with the previous stage's hidden states) to every rank of `stage`.
    fn send(&mut self, stage: usize, batch: &Arc<Batch>, hidden: Option<Tensor>) -> Result<()> {
        let tp = self.spec.tp;
        for w in &self.workers[stage * tp..(stage + 1) * tp] {
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
        Ok(())
    }

    /// The next reply of every rank of `stage`: rank 0's output (hidden states, or the
    /// logits on the last stage), or the first error.
    fn receive(&mut self, stage: usize) -> Result<Tensor> {
        let tp = self.spec.tp;
        let mut first_err: Option<Error> = None;
        let mut out = None;
        let mut aborted = false;
        for rank in 0..tp {
            match self.workers[stage * tp + rank].replies.recv() {
                Ok((Ok(t), _, heap_peak)) => {
                    let h = &mut self.pass_heap[stage * tp + rank];
                    *h = (*h).max(heap_peak);
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
        out.ok_or_else(|| {
            Error::InvalidInput(format!("stage {stage} TP rank 0 returned no output"))
        })
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
                    true, // the ranks run on the CPU
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

    /// A GGUF loaded as stored: its tensor table (see [`Model::stored_tensors`]).
    pub fn stored_tensors(&self) -> Option<Arc<Vec<StoredTensor>>> {
        match self {
            Runner::Single { model, .. } => model.stored_tensors(),
            Runner::Parallel(p) => p.stored_tensors(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Three sequences of 5, 1 and 2 tokens (rows 0, 1, 2; two block-table entries each),
    /// the last token of each sampled.
    fn batch() -> Batch {
        Batch {
            ids: (10..18).collect(),
            positions: vec![0, 1, 2, 3, 4, 7, 3, 4],
            meta: PagedMetadata {
                slot_mapping: (0..8).map(Some).collect(),
                block_tables: vec![0, 1, 2, 0, 3, 4],
                max_blocks_per_seq: 2,
                query_seq: vec![0, 0, 0, 0, 0, 1, 2, 2],
                context_lens: vec![1, 2, 3, 4, 5, 8, 4, 5],
            },
            sample_rows: vec![4, 5, 7],
        }
    }

    #[test]
    fn a_batch_splits_into_whole_sequences() {
        let parts = batch().split(2);
        assert_eq!(parts.len(), 2);
        // 8 tokens: the cut nearest 4 at a sequence boundary is after row 0 (5 tokens).
        assert_eq!(parts[0].ids, vec![10, 11, 12, 13, 14]);
        assert_eq!(parts[0].sample_rows, vec![4]);
        assert_eq!(parts[1].ids, vec![15, 16, 17]);
        assert_eq!(parts[1].positions, vec![7, 3, 4]);
        assert_eq!(parts[1].meta.query_seq, vec![0, 1, 1]);
        assert_eq!(parts[1].meta.block_tables, vec![2, 0, 3, 4]);
        assert_eq!(parts[1].meta.context_lens, vec![8, 4, 5]);
        assert_eq!(parts[1].sample_rows, vec![0, 2]);
        // One part per sequence at most; one part is the batch itself.
        let each = batch().split(9);
        assert_eq!(each.len(), 3);
        assert_eq!(each[1].ids, vec![15]);
        assert_eq!(each[2].sample_rows, vec![1]);
        assert_eq!(batch().split(1).len(), 1);
        // Sampled rows out of order: not cut.
        let mut b = batch();
        b.sample_rows = vec![7, 4];
        assert_eq!(b.split(2).len(), 1);
    }
}
