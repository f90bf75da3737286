//! The engine: continuous batching over the paged KV cache, one step at a time.
//!
//! [`Engine`] owns the [`Model`] (or, under tensor/pipeline parallelism, a grid of
//! rank threads each holding a shard and its own cache: [`crate::engine::runner::Runner`]),
//! the [`Scheduler`] (which owns the sequences and the
//! block manager), the [`PagedKvCache`] tensors and one [`Sampler`] per live request.
//! Data flows one way through [`Engine::step`]: `Scheduler::schedule()` -> a
//! [`ScheduledBatch`] of integers -> [`PagedMetadata`] -> `Model::forward_paged` ->
//! logits of the sequences that reach their end this step -> each request's sampler ->
//! `Scheduler::postprocess`. The CLI and (later) the server drive it the same way:
//! `add_request`, then `step` while `has_work`.
//!
//! Invariants: a request is known to the engine (has a sampler) exactly while the
//! scheduler holds its sequence; every token a step returns is new (a preempted
//! sequence is recomputed from its kept tokens and only its next token is sampled, so
//! nothing is emitted twice and each sampler draws once per emitted token); a request
//! is admitted only if its longest possible sequence fits the whole cache, so the
//! oldest running sequence can always finish and preemption never livelocks. A step
//! that fails aborts the sequences it carried and drops the free prefix-cache blocks
//! (it may have sealed blocks it never wrote), leaving the rest consistent.
//!
//! [`EngineConfig::kv_layout`] picks the block manager's policy: `Paged`, or
//! `Contiguous` (each sequence reserves `max_model_len` slots at admission and nothing is
//! shared), the naive cache that `llmem bench --kv-layout` compares against at the same
//! KV budget. Same model, kernels and scheduler; only the bookkeeping differs.
//!
//! Sizing ([`KvSizing`]) follows the planner's formula: from a memory budget subtract
//! the weights (the model's own accounting), the activation peak of one pass of
//! `max_batched_tokens` ([`Model::paged_activation_peak_bytes`]; capped, as the planner
//! caps it, at `max_num_seqs x max_model_len`) and a stated runtime
//! overhead (0 on the CPU unless given); what is left, divided by the planner's bytes per
//! block, is the block count. [`BudgetReport`] prints those terms beside the planner's
//! own prediction for the same model, workload and dtypes.

pub mod generate;
pub mod runner;
pub mod scheduler;
pub mod sizing;

pub use sizing::{
    budget_report, parallel_budget, pass_activation_bytes, planned_terms, BudgetReport, KvSizing,
    ParallelBudget, PlannedTerms, RankBudget,
};

use std::collections::HashMap;

use candle_core::DType;

use crate::cache::block_manager::{BlockManager, KvLayout, SeqId};
use crate::cache::paged::{block_bytes, KvDtype, PagedKvCache, PagedMetadata};
use crate::engine::runner::{ParallelRunner, RankMemory, Runner};
use crate::engine::scheduler::{
    FinishReason, ScheduledBatch, Scheduler, SchedulerConfig, StopConditions,
};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::parallel::comm::CommStats;
use crate::parallel::spec::ParallelSpec;
use crate::sample::sampler::{log_softmax, top_of_logprobs, Sampler, SamplingParams};
use crate::weights::files::WeightFiles;
use crate::weights::quant::WeightFormat;

/// A request known to the engine (the scheduler's sequence id).
pub type RequestId = SeqId;

/// Cache geometry and scheduling limits of an [`Engine`]. (Not to be confused with
/// `config::EngineConfig`, the settings resolved from a model directory.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block (16 by default).
    pub block_size: usize,
    /// Blocks in the cache (see [`KvSizing`] to derive it from a memory budget).
    pub num_blocks: usize,
    pub kv_dtype: KvDtype,
    /// Sequences in one step at most.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most (prefill chunks plus decodes).
    pub max_batched_tokens: usize,
    /// Tokens one sequence may hold (prompt + generated), at most the model's context.
    pub max_model_len: usize,
    /// Paged (blocks on demand, prefix caching) or contiguous (`max_model_len` slots
    /// reserved per sequence at admission, no sharing: the baseline paging improves on).
    pub kv_layout: KvLayout,
}

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

impl EngineConfig {
    /// Defaults for `model`: blocks of 16, an f32 cache, 32 sequences, 2048 tokens per
    /// pass, the model's whole context; `num_blocks` as given.
    pub fn for_model(model: &Model, num_blocks: usize) -> Self {
        EngineConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            num_blocks,
            kv_dtype: KvDtype::F32,
            max_num_seqs: 32,
            max_batched_tokens: 2048,
            max_model_len: model.max_context(),
            kv_layout: KvLayout::Paged,
        }
    }

    /// Tokens and sampled rows of the largest pass: `max_batched_tokens`, capped (as the
    /// planner caps it) by what `max_num_seqs` sequences of `max_model_len` tokens could
    /// feed at once, with one sampled row per sequence.
    pub fn largest_pass(&self) -> (usize, usize) {
        let tokens = self
            .max_batched_tokens
            .min(self.max_num_seqs.saturating_mul(self.max_model_len));
        (tokens, self.max_num_seqs.min(tokens))
    }

    fn validate(&self, max_context: usize) -> Result<()> {
        let positive = [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidInput(format!(
                    "engine: {name} is 0; it must be a positive integer"
                )));
            }
        }
        if u32::try_from(self.num_blocks).is_err() {
            return Err(Error::InvalidInput(format!(
                "engine: num_blocks = {} exceeds {}",
                self.num_blocks,
                u32::MAX
            )));
        }
        if self.max_model_len < 2 || self.max_model_len > max_context {
            return Err(Error::InvalidInput(format!(
                "engine: max_model_len = {} must be between 2 and the model's \
                 max_position_embeddings = {}",
                self.max_model_len, max_context
            )));
        }
        let reserve = self.max_model_len.div_ceil(self.block_size);
        if self.kv_layout == KvLayout::Contiguous && reserve > self.num_blocks {
            return Err(Error::InvalidInput(format!(
                "engine: the contiguous layout reserves {reserve} blocks per sequence \
                 (max_model_len = {} / block_size = {}) but the cache has only {}; give the \
                 cache more blocks or lower max_model_len",
                self.max_model_len, self.block_size, self.num_blocks
            )));
        }
        Ok(())
    }
}

/// One token produced by a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    pub id: RequestId,
    pub token: u32,
    /// Set when this token ends the request (the token is part of its output).
    pub finished: Option<FinishReason>,
    /// For requests added with `top_logprobs > 0`: the chosen token's log-probability
    /// and the most likely alternatives, from the model's raw distribution (before
    /// temperature, top-k and top-p), as OpenAI's `logprobs` reports them.
    pub logprobs: Option<TokenLogprobs>,
}

/// Log-probabilities of one sampled position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token's log-probability.
    pub logprob: f64,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f64)>,
}

/// Counters and gauges for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Steps that ran a forward pass.
    pub steps: u64,
    pub preemptions: u64,
    pub peak_running: usize,
    pub peak_blocks_used: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    /// Free blocks that still hold a reusable prefix (a subset of `blocks_free`).
    pub blocks_cached: usize,
    /// Prompt tokens served from the prefix cache, and prompt tokens looked up.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    /// Slots allocated to live sequences but holding no token (now).
    pub wasted_slots: usize,
    pub running: usize,
    pub waiting: usize,
}

/// Continuous batching over a paged KV cache.
pub struct Engine {
    /// The model and its cache, or a tensor/pipeline-parallel grid of ranks.
    runner: Runner,
    config: EngineConfig,
    scheduler: Scheduler,
    samplers: HashMap<RequestId, Sampler>,
    /// Requests that asked for log-probabilities, and how many alternatives.
    top_logprobs: HashMap<RequestId, usize>,
    next_id: u64,
    steps: u64,
    /// (tokens, sampled rows) of the last forward pass ((0, 0) once idle).
    last_pass: (usize, usize),
    /// The pass shapes seen so far that no other seen shape dominates (as many tokens
    /// and as many rows, or more). The activation estimate grows with both, so the
    /// largest estimate is one of these; a step only compares integers, and the
    /// estimate is computed when someone asks ([`Engine::activation_bytes`]).
    frontier: Vec<(usize, usize)>,
    /// Per rank: the largest measured heap working set of a pass so far (`crate::heap`;
    /// zeros without the counting allocator). The last pass's is the runner's.
    pass_heap_peak: Vec<u64>,
}

impl Engine {
    /// Allocate the cache (`num_blocks` x `block_size` tokens, every layer) for `model`.
    pub fn new(model: Model, config: EngineConfig) -> Result<Self> {
        config.validate(model.max_context())?;
        let cache = PagedKvCache::new_on(
            model.shape(),
            config.num_blocks,
            config.block_size,
            config.kv_dtype,
            model.device(),
        )?;
        Ok(Self::with_runner(
            Runner::Single {
                model: Box::new(model),
                cache,
                pass_heap: 0,
            },
            config,
        ))
    }

    /// An engine over `spec.tp x spec.pp` rank threads, each loading its shard of the
    /// model in `weights` and allocating its own cache of `config.num_blocks` blocks (of
    /// its layers and KV heads). TP = PP = 1 is the plain [`Engine::new`] path.
    pub fn new_parallel(
        shape: &llmem_planner::ModelShape,
        weights: WeightFiles,
        dtype: DType,
        spec: ParallelSpec,
        config: EngineConfig,
    ) -> Result<Self> {
        Self::new_parallel_with(shape, weights, &WeightFormat::dense(dtype)?, spec, config)
    }

    /// [`Engine::new_parallel`] with the weights stored as `fmt` says: a block format
    /// quantizes each rank's slices (see [`Model::load_shard`]).
    pub fn new_parallel_with(
        shape: &llmem_planner::ModelShape,
        weights: WeightFiles,
        fmt: &WeightFormat,
        spec: ParallelSpec,
        config: EngineConfig,
    ) -> Result<Self> {
        spec.validate(shape)?;
        config.validate(shape.max_position_embeddings as usize)?;
        if spec.tp == 1 && spec.pp == 1 {
            let model = Model::load_with(shape, &weights, fmt, &candle_core::Device::Cpu)?;
            return Self::new(model, config);
        }
        let runner = ParallelRunner::new(
            shape,
            std::sync::Arc::new(weights),
            *fmt,
            spec,
            config.num_blocks,
            config.block_size,
            config.kv_dtype,
        )?;
        Ok(Self::with_runner(
            Runner::Parallel(Box::new(runner)),
            config,
        ))
    }

    fn with_runner(runner: Runner, config: EngineConfig) -> Self {
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_batched_tokens: config.max_batched_tokens,
                max_model_len: config.max_model_len,
            },
            // Fits u32: checked by validate.
            BlockManager::with_layout(
                config.num_blocks as u32,
                config.block_size,
                config.kv_layout,
                config.max_model_len,
            ),
        );
        Engine {
            runner,
            config,
            scheduler,
            samplers: HashMap::new(),
            top_logprobs: HashMap::new(),
            next_id: 0,
            steps: 0,
            last_pass: (0, 0),
            frontier: Vec::new(),
            pass_heap_peak: Vec::new(),
        }
    }

    /// The model, when it runs unsharded (`None` under TP/PP: no rank holds it whole).
    pub fn model(&self) -> Option<&Model> {
        match &self.runner {
            Runner::Single { model, .. } => Some(model),
            Runner::Parallel(_) => None,
        }
    }

    pub fn shape(&self) -> &llmem_planner::ModelShape {
        self.runner.shape()
    }

    /// TP degree, PP stages and embedding layout (1 x 1 for a single model).
    pub fn parallel_spec(&self) -> ParallelSpec {
        self.runner.spec()
    }

    /// What each rank holds (one entry unsharded), with the activation peak of the
    /// largest pass this configuration allows.
    pub fn rank_memory(&self) -> Vec<RankMemory> {
        let (tokens, rows) = self.config.largest_pass();
        self.runner.rank_memory(tokens, rows)
    }

    /// The planner's per-GPU terms for the same split, dtypes and KV tokens, beside
    /// [`Engine::rank_memory`] entry for entry.
    pub fn planned_rank_memory(&self) -> Result<Vec<crate::engine::runner::PlannedRank>> {
        let (tokens, _) = self.config.largest_pass();
        crate::engine::runner::planned_rank_memory(
            self.runner.shape(),
            self.runner.format(),
            self.runner.stored_tensors(),
            self.runner.spec(),
            self.config.kv_dtype,
            (self.config.num_blocks * self.config.block_size) as u64,
            tokens as u64,
        )
    }

    /// Micro-batches a pass is cut into under PP (1 without PP).
    pub fn micro_batches(&self) -> usize {
        match &self.runner {
            Runner::Parallel(p) if p.spec().pp > 1 => p.micro_batches(),
            _ => 1,
        }
    }

    /// Cut each pass into up to `n` micro-batches under PP
    /// ([`ParallelRunner::set_micro_batches`]); no effect without PP; an error for 0.
    pub fn set_micro_batches(&mut self, n: usize) -> Result<()> {
        match &mut self.runner {
            Runner::Parallel(p) => p.set_micro_batches(n),
            Runner::Single { .. } if n == 0 => Err(Error::InvalidInput(
                "micro-batches is 0; it must be a positive integer (1: none)".into(),
            )),
            Runner::Single { .. } => Ok(()),
        }
    }

    /// Time each rank spent in collectives (empty unsharded).
    pub fn comm_stats(&self) -> Vec<CommStats> {
        self.runner.comm_stats()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Bytes allocated for the KV cache, summed over every rank under TP/PP.
    pub fn cache_bytes(&self) -> u64 {
        self.runner.cache_bytes()
    }

    /// Queue a request. Errors (and queues nothing) if the prompt is empty, holds ids
    /// outside the vocabulary, leaves no room under `max_model_len`, or if the request's
    /// longest possible sequence could never fit the cache even alone.
    pub fn add_request(
        &mut self,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        stop: StopConditions,
    ) -> Result<RequestId> {
        self.add_request_with_logprobs(prompt_ids, params, stop, 0)
    }

    /// [`Engine::add_request`], and report log-probabilities with each token: the
    /// sampled token's and the `top_logprobs` most likely (0: none reported).
    pub fn add_request_with_logprobs(
        &mut self,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        stop: StopConditions,
        top_logprobs: usize,
    ) -> Result<RequestId> {
        let len = prompt_ids.len();
        crate::request::check_prompt(&prompt_ids, self.runner.shape().vocab_size)?;
        let max_len = self.config.max_model_len;
        if len >= max_len {
            return Err(Error::InvalidInput(format!(
                "the prompt is {len} tokens but max_model_len is {max_len}, which leaves no \
                 room to generate; shorten the prompt or raise --max-model-len"
            )));
        }
        if stop.max_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_tokens is 0; it must be at least 1".into(),
            ));
        }
        // The last sampled token is never fed back, so it takes no slot.
        let final_len = len.saturating_add(stop.max_tokens).min(max_len);
        let blocks = (final_len - 1).div_ceil(self.config.block_size);
        if blocks > self.config.num_blocks {
            return Err(Error::InvalidInput(format!(
                "the request needs up to {blocks} KV blocks ({len} prompt tokens + up to {} \
                 generated, {} tokens per block) but the cache has only {}; lower max_tokens, \
                 shorten the prompt or give the cache more blocks (--kv-blocks or \
                 --memory-budget)",
                final_len - len,
                self.config.block_size,
                self.config.num_blocks
            )));
        }
        let sampler = Sampler::new(params)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.scheduler.add(id, prompt_ids, stop);
        self.samplers.insert(id, sampler);
        if top_logprobs > 0 {
            self.top_logprobs.insert(id, top_logprobs);
        }
        Ok(id)
    }

    /// Run one step: schedule, one paged forward pass, sample, record. Returns one
    /// output per sequence that produced a token (empty when nothing is left to run or
    /// the step only advanced prefill chunks). On error the step's sequences are aborted.
    pub fn step(&mut self) -> Result<Vec<StepOutput>> {
        let batch = self.scheduler.schedule();
        if batch.is_empty() {
            self.last_pass = (0, 0);
            return Ok(Vec::new());
        }
        let rows = batch.seqs.iter().filter(|e| e.sample).count();
        self.last_pass = (batch.num_tokens(), rows);
        self.note_pass(self.last_pass);
        let result = self.run(&batch);
        let last = self.runner.last_pass_heap();
        self.pass_heap_peak.resize(last.len(), 0);
        for (peak, last) in self.pass_heap_peak.iter_mut().zip(last) {
            *peak = (*peak).max(last);
        }
        let sampled = match result {
            Ok(sampled) => sampled,
            Err(e) => {
                for entry in &batch.seqs {
                    self.samplers.remove(&entry.seq);
                    self.top_logprobs.remove(&entry.seq);
                }
                self.scheduler.abort_failed_step(&batch);
                return Err(e);
            }
        };
        self.steps += 1;
        let tokens: Vec<u32> = sampled.iter().map(|(t, _)| *t).collect();
        let finished = self.scheduler.postprocess(&batch, &tokens);
        let mut outputs: Vec<StepOutput> = batch
            .seqs
            .iter()
            .filter(|e| e.sample)
            .zip(sampled)
            .map(|(e, (token, logprobs))| StepOutput {
                id: e.seq,
                token,
                finished: None,
                logprobs,
            })
            .collect();
        if !self.has_work() {
            self.last_pass = (0, 0);
        }
        for f in finished {
            self.samplers.remove(&f.seq);
            self.top_logprobs.remove(&f.seq);
            if let Some(o) = outputs.iter_mut().find(|o| o.id == f.seq) {
                o.finished = Some(f.reason);
            }
        }
        Ok(outputs)
    }

    /// The forward pass and sampling of one batch: the sampled token (and, if asked,
    /// its log-probabilities) of each entry whose `sample` is true, in batch order.
    fn run(&mut self, batch: &ScheduledBatch) -> Result<Vec<(u32, Option<TokenLogprobs>)>> {
        let meta = paged_metadata(batch);
        let n = batch.num_tokens();
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut sample_rows = Vec::new();
        for entry in &batch.seqs {
            ids.extend_from_slice(&entry.tokens);
            positions.extend((0..entry.tokens.len()).map(|i| (entry.start_pos + i) as u32));
            if entry.sample {
                sample_rows.push(ids.len() - 1);
            }
        }
        let logits = self
            .runner
            .forward_paged(&ids, &positions, &meta, &sample_rows)?;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        batch
            .seqs
            .iter()
            .filter(|e| e.sample)
            .zip(&rows)
            .map(|(entry, row)| {
                let sampler = self.samplers.get_mut(&entry.seq).ok_or_else(|| {
                    Error::InvalidInput(format!("engine: no sampler for {:?}", entry.seq))
                })?;
                let token = sampler.sample(row)?;
                let logprobs = self.top_logprobs.get(&entry.seq).map(|&k| {
                    let lp = log_softmax(row);
                    TokenLogprobs {
                        logprob: lp.get(token as usize).copied().unwrap_or(f64::NEG_INFINITY),
                        top: top_of_logprobs(&lp, k),
                    }
                });
                Ok((token, logprobs))
            })
            .collect()
    }

    /// Drop a request wherever it is and free its blocks. Returns false if unknown.
    pub fn abort(&mut self, id: RequestId) -> bool {
        self.samplers.remove(&id);
        self.top_logprobs.remove(&id);
        self.scheduler.abort(id)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// A live request's tokens (prompt + generated so far).
    pub fn tokens(&self, id: RequestId) -> Option<&[u32]> {
        self.scheduler.tokens(id)
    }

    /// The last forward pass's tokens and logit rows ((0, 0) when idle).
    pub fn last_pass(&self) -> (usize, usize) {
        self.last_pass
    }

    /// Estimated activation bytes of the last forward pass (0 when idle), and the
    /// largest since start: [`Model::paged_activation_peak_bytes`] of each pass's shape.
    pub fn activation_bytes(&self) -> (u64, u64) {
        (
            self.pass_activation(self.last_pass),
            self.pass_activation(self.peak_pass()),
        )
    }

    /// Per rank (stage-major, as [`Engine::rank_memory`]): the heap working set of the
    /// last pass (0 when idle) and the largest since start, measured by
    /// [`crate::heap::CountingAlloc`] as the peak of the rank's activation bytes during
    /// the pass above what it held before. `None` where that allocator is not installed.
    pub fn measured_activation_bytes(&self) -> Option<Vec<(u64, u64)>> {
        if !crate::heap::installed() {
            return None;
        }
        let idle = self.last_pass.0 == 0;
        Some(
            self.runner
                .last_pass_heap()
                .into_iter()
                .enumerate()
                .map(|(i, last)| {
                    let last = if idle { 0 } else { last };
                    (last, self.pass_heap_peak.get(i).copied().unwrap_or(0))
                })
                .collect(),
        )
    }

    /// Keep `pass` in the frontier unless a seen pass dominates it.
    fn note_pass(&mut self, (t, r): (usize, usize)) {
        if self.frontier.iter().any(|&(ft, fr)| ft >= t && fr >= r) {
            return;
        }
        self.frontier.retain(|&(ft, fr)| !(t >= ft && r >= fr));
        self.frontier.push((t, r));
    }

    /// The seen pass with the largest activation estimate ((0, 0) before any).
    fn peak_pass(&self) -> (usize, usize) {
        self.frontier
            .iter()
            .copied()
            .max_by_key(|&p| self.pass_activation(p))
            .unwrap_or((0, 0))
    }

    /// Per rank (stage-major, as [`Engine::rank_memory`]): the activation estimate of the
    /// last pass (0 when idle) and of the largest so far.
    pub fn rank_activation_bytes(&self) -> Vec<(u64, u64)> {
        let peak_pass = self.peak_pass();
        let now = self.runner.rank_memory(self.last_pass.0, self.last_pass.1);
        let peak = self.runner.rank_memory(peak_pass.0, peak_pass.1);
        let bytes = |r: &RankMemory, pass: (usize, usize)| {
            if pass.0 == 0 {
                0
            } else {
                r.activation_peak_bytes
            }
        };
        now.iter()
            .zip(&peak)
            .map(|(n, p)| (bytes(n, self.last_pass), bytes(p, peak_pass)))
            .collect()
    }

    /// The largest per-rank activation estimate of a pass of (tokens, rows); 0 for none.
    fn pass_activation(&self, (tokens, rows): (usize, usize)) -> u64 {
        if tokens == 0 {
            return 0;
        }
        self.runner
            .rank_memory(tokens, rows)
            .iter()
            .map(|r| r.activation_peak_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Bytes of one KV block (all layers, K and V; all ranks together under TP/PP).
    pub fn block_bytes(&self) -> u64 {
        block_bytes(
            self.runner.shape(),
            self.config.block_size,
            self.config.kv_dtype,
        )
    }

    pub fn stats(&self) -> EngineStats {
        let s = self.scheduler.stats();
        let b = self.scheduler.blocks().stats();
        EngineStats {
            steps: self.steps,
            preemptions: s.preemptions,
            peak_running: s.peak_running,
            peak_blocks_used: s.peak_blocks_used,
            blocks_total: b.total,
            blocks_used: b.used,
            blocks_free: b.free,
            blocks_cached: b.cached,
            prefix_hit_tokens: b.prefix_hit_tokens,
            prefix_query_tokens: b.prefix_query_tokens,
            wasted_slots: self.scheduler.blocks().wasted_slots(),
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
        }
    }
}

/// The attention metadata of one scheduled step: one query row per fed token, in batch
/// order, each with the slot its K/V goes to and the context it attends over.
pub fn paged_metadata(batch: &ScheduledBatch) -> PagedMetadata {
    let max_blocks = batch
        .seqs
        .iter()
        .map(|s| s.block_table.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut m = PagedMetadata {
        max_blocks_per_seq: max_blocks,
        ..Default::default()
    };
    for (row, s) in batch.seqs.iter().enumerate() {
        let mut table = s.block_table.clone();
        table.resize(max_blocks, 0);
        m.block_tables.extend(table);
        for (i, slot) in s.slots.iter().enumerate() {
            m.slot_mapping.push(Some(*slot));
            m.query_seq.push(row as u32);
            m.context_lens.push((s.start_pos + i + 1) as u32);
        }
    }
    m
}
