//! The scheduler: continuous batching over a shared pool of KV blocks.
//!
//! Owns the sequences (by value) and the [`BlockManager`]. Each [`Scheduler::schedule`]
//! builds one step: running sequences first (decodes, and prompts part-way through a
//! chunked prefill), oldest first, then waiting prompts are admitted while
//! `max_num_seqs` and the `max_batched_tokens` budget allow. A prompt longer than the
//! budget is prefilled in chunks over several steps. When blocks run out, the newest
//! running sequence is preempted by recompute: its blocks are freed and it goes back to
//! the front of the waiting queue with its generated tokens kept, to be prefilled again
//! (prefix caching usually makes that cheap). Finished and aborted sequences free their
//! blocks at once. A full block becomes shareable through the prefix cache only once a
//! step that computes it is scheduled (`BlockManager::seal_computed`). Under the
//! contiguous [`KvLayout`](crate::cache::block_manager::KvLayout) the block manager reserves
//! `max_model_len` slots at admission, so the same loop admits fewer sequences and never
//! has to preempt; nothing else changes.
//!
//! Data flows one way: `schedule() -> ScheduledBatch` (integers only), the runner turns
//! it into tensors and samples, `postprocess(&batch, &tokens)` appends the tokens.

use std::collections::VecDeque;

use crate::cache::block_manager::{BlockManager, SeqId};
pub use crate::request::{FinishReason, StopConditions};

/// Limits of one step and of the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences in one step at most.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most (prefill chunks plus decodes).
    pub max_batched_tokens: usize,
    /// Tokens a sequence may hold (prompt + generated).
    pub max_model_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sequence {
    id: SeqId,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    stop: StopConditions,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    /// The tokens fed in this step (a prefill chunk, or the last sampled token).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; equals the tokens already cached.
    pub start_pos: usize,
    /// Cache slot of each fed token.
    pub slots: Vec<usize>,
    /// The sequence's block table after this step's allocations.
    pub block_table: Vec<u32>,
    /// True when this step reaches the end of the sequence: a token is sampled.
    pub sample: bool,
}

/// One step, integers only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduledBatch {
    pub seqs: Vec<ScheduledSeq>,
}

impl ScheduledBatch {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// A sequence that ended in `postprocess` (or by `abort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub seq: SeqId,
    pub reason: FinishReason,
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub preemptions: u64,
    pub peak_running: usize,
    pub peak_blocks_used: usize,
}

pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queue a request. The caller has checked that the prompt is not empty and fits
    /// `max_model_len` and the cache.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, stop: StopConditions) {
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            stop,
        });
    }

    /// The tokens of a known sequence (prompt + generated).
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
            .map(|s| s.tokens.as_slice())
    }

    /// Drop a sequence wherever it is and free its blocks. Returns false if unknown.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let found = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i);
            true
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            true
        } else {
            false
        };
        self.blocks.free(id);
        found
    }

    /// Abort every sequence of a step whose forward pass failed, and forget the free
    /// cached blocks: the step sealed blocks whose K/V it never wrote.
    pub fn abort_failed_step(&mut self, batch: &ScheduledBatch) {
        for entry in &batch.seqs {
            self.abort(entry.seq);
        }
        self.blocks.drop_free_cached();
    }

    fn preempt_newest(&mut self) {
        if let Some(mut victim) = self.running.pop() {
            self.blocks.free(victim.id);
            victim.computed = 0;
            self.stats.preemptions += 1;
            self.waiting.push_front(victim);
        }
    }

    fn entry(&self, s: &Sequence, n: usize, start: usize) -> ScheduledSeq {
        let slots = (start..start + n)
            .map(|p| self.blocks.slot(s.id, p).unwrap_or(usize::MAX))
            .collect();
        ScheduledSeq {
            seq: s.id,
            tokens: s.tokens[start..start + n].to_vec(),
            start_pos: start,
            slots,
            block_table: self
                .blocks
                .block_table(s.id)
                .map(|t| t.iter().map(|b| b.0).collect())
                .unwrap_or_default(),
            sample: start + n == s.tokens.len(),
        }
    }

    /// Build the next step. Empty when there is nothing to run.
    pub fn schedule(&mut self) -> ScheduledBatch {
        let mut budget = self.config.max_batched_tokens;
        let mut picked: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        let mut preempted = false;
        let mut i = 0;
        // Running sequences, oldest first: decodes and unfinished prefill chunks.
        while i < self.running.len() && budget > 0 {
            let (id, len, computed) = {
                let s = &self.running[i];
                (s.id, s.tokens.len(), s.computed)
            };
            // Every token fed this step needs a slot; decodes add one per step.
            let mut evicted_self = false;
            while self.blocks.num_tokens(id).unwrap_or(0) < len {
                if self.blocks.can_append(id) && self.blocks.append_slot(id).is_ok() {
                    continue;
                }
                // Out of blocks: preempt the newest running sequence (maybe this one).
                preempted = true;
                evicted_self = self.running.len() - 1 == i;
                self.preempt_newest();
                if evicted_self {
                    break;
                }
            }
            if evicted_self {
                break;
            }
            let n = (len - computed).min(budget);
            if n > 0 {
                // This step writes the K/V of tokens up to computed + n, so their full
                // blocks may be shared from now on. (Cannot fail: the sequence has blocks.)
                let _ = self
                    .blocks
                    .seal_computed(id, &self.running[i].tokens, computed + n);
                picked.push((i, n));
                budget -= n;
            }
            i += 1;
        }
        // Admit waiting prompts, unless this step already had to preempt.
        while !preempted && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            if !self.blocks.can_allocate(&seq.tokens) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            match self.blocks.allocate(seq.id, &seq.tokens) {
                Ok(cached) => seq.computed = cached,
                Err(_) => {
                    self.waiting.push_front(seq);
                    break;
                }
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            budget -= n;
            // As above: the blocks this step fills become shareable.
            let _ = self
                .blocks
                .seal_computed(seq.id, &seq.tokens, seq.computed + n);
            self.running.push(seq);
            picked.push((self.running.len() - 1, n));
        }
        let batch = ScheduledBatch {
            seqs: picked
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.entry(s, n, s.computed)
                })
                .collect(),
        };
        self.stats.peak_running = self.stats.peak_running.max(self.running.len());
        self.stats.peak_blocks_used = self.stats.peak_blocks_used.max(self.blocks.stats().used);
        batch
    }

    /// Record a step's results: `sampled[k]` is the token sampled for the k-th entry of
    /// `batch` whose `sample` is true, in order. Returns the sequences that finished.
    pub fn postprocess(&mut self, batch: &ScheduledBatch, sampled: &[u32]) -> Vec<Finished> {
        let mut next = sampled.iter();
        let mut finished = Vec::new();
        for entry in &batch.seqs {
            let Some(s) = self.running.iter_mut().find(|s| s.id == entry.seq) else {
                continue;
            };
            s.computed = entry.start_pos + entry.tokens.len();
            if !entry.sample {
                continue;
            }
            let Some(&token) = next.next() else { break };
            s.tokens.push(token);
            let reason = if !s.stop.ignore_eos && s.stop.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.stop.max_tokens
                || s.tokens.len() >= self.config.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                finished.push(Finished {
                    seq: entry.seq,
                    reason,
                });
            }
        }
        for f in &finished {
            if let Some(i) = self.running.iter().position(|s| s.id == f.seq) {
                self.running.remove(i);
            }
            self.blocks.free(f.seq);
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(max_tokens: usize) -> StopConditions {
        StopConditions {
            max_tokens,
            stop_token_ids: vec![0],
            ignore_eos: false,
        }
    }

    fn sched(blocks: u32, block_size: usize, max_seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: max_seqs,
                max_batched_tokens: budget,
                max_model_len: 1024,
            },
            BlockManager::new(blocks, block_size),
        )
    }

    /// Drive the scheduler with a fake model that samples `position + 1` (never 0).
    fn run_to_end(s: &mut Scheduler) -> (Vec<Finished>, usize) {
        let mut done = Vec::new();
        let mut steps = 0;
        while s.has_work() {
            let batch = s.schedule();
            assert!(!batch.is_empty(), "stuck with work left");
            assert!(batch.num_tokens() <= s.config.max_batched_tokens);
            for e in &batch.seqs {
                assert!(
                    e.slots.iter().all(|&x| x != usize::MAX),
                    "token without a slot"
                );
            }
            let sampled: Vec<u32> = batch
                .seqs
                .iter()
                .filter(|e| e.sample)
                .map(|e| (e.start_pos + e.tokens.len()) as u32)
                .collect();
            done.extend(s.postprocess(&batch, &sampled));
            s.blocks().check_invariants();
            steps += 1;
        }
        (done, steps)
    }

    #[test]
    fn decodes_first_then_admits_within_limits() {
        let mut s = sched(64, 4, 2, 100);
        for i in 0..3 {
            s.add(SeqId(i), vec![5 + i as u32; 6], stop(3));
        }
        let b = s.schedule();
        assert_eq!(b.seqs.len(), 2, "max_num_seqs");
        assert!(b.seqs.iter().all(|e| e.tokens.len() == 6 && e.sample));
        let (done, _) = run_to_end(&mut s);
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|f| f.reason == FinishReason::Length));
        assert_eq!(s.blocks().stats().used, 0);
    }

    #[test]
    fn shared_prompt_prefixes_skip_their_prefill() {
        let mut s = sched(64, 4, 4, 100);
        s.add(SeqId(1), vec![7; 10], stop(2));
        s.add(SeqId(2), vec![7; 10], stop(2));
        let b = s.schedule();
        // The second prompt finds the first's two full blocks, sealed because this very
        // step computes them.
        assert_eq!(b.seqs[0].tokens.len(), 10);
        assert_eq!(b.seqs[1].start_pos, 8);
        assert_eq!(b.seqs[0].block_table[..2], b.seqs[1].block_table[..2]);
        run_to_end(&mut s);
        assert_eq!(s.blocks().stats().used, 0);
    }

    #[test]
    fn long_prompts_are_chunked() {
        let mut s = sched(64, 4, 4, 8);
        s.add(SeqId(1), (1..=20).collect(), stop(2));
        let b = s.schedule();
        assert_eq!(b.seqs[0].tokens.len(), 8);
        assert!(!b.seqs[0].sample);
        s.postprocess(&b, &[]);
        let b = s.schedule();
        assert_eq!(b.seqs[0].start_pos, 8);
        let (done, _) = run_to_end(&mut s);
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn preempts_newest_when_blocks_run_out_and_still_finishes() {
        // 6 blocks of 4: two prompts of 8 take 4 blocks; growth forces preemption.
        let mut s = sched(6, 4, 4, 64);
        s.add(SeqId(1), vec![1; 8], stop(12));
        s.add(SeqId(2), vec![2; 8], stop(12));
        let (done, _) = run_to_end(&mut s);
        assert_eq!(done.len(), 2);
        assert!(s.stats().preemptions > 0);
        assert_eq!(s.blocks().stats().used, 0);
    }

    #[test]
    fn contiguous_reservations_admit_fewer_sequences_without_preemption() {
        use crate::cache::block_manager::KvLayout;
        // 12 blocks of 4, max_model_len 16: contiguous reserves 4 blocks a sequence.
        let peak = |layout| {
            let mut s = Scheduler::new(
                SchedulerConfig {
                    max_num_seqs: 8,
                    max_batched_tokens: 64,
                    max_model_len: 16,
                },
                BlockManager::with_layout(12, 4, layout, 16),
            );
            for i in 0..6 {
                s.add(SeqId(i), vec![1 + i as u32; 3], stop(5));
            }
            let (done, _) = run_to_end(&mut s);
            assert_eq!(done.len(), 6);
            assert_eq!(s.blocks().stats().used, 0);
            s.stats()
        };
        let (paged, contiguous) = (peak(KvLayout::Paged), peak(KvLayout::Contiguous));
        assert_eq!(contiguous.peak_running, 3);
        assert_eq!(contiguous.preemptions, 0);
        assert_eq!(paged.peak_running, 6);
    }

    #[test]
    fn stop_tokens_and_abort_free_blocks() {
        let mut s = sched(16, 4, 4, 64);
        s.add(SeqId(1), vec![3; 5], stop(10));
        let b = s.schedule();
        let done = s.postprocess(&b, &[0]);
        assert_eq!(
            done,
            vec![Finished {
                seq: SeqId(1),
                reason: FinishReason::Stop
            }]
        );
        s.add(SeqId(2), vec![3; 5], stop(10));
        s.schedule();
        assert!(s.abort(SeqId(2)));
        assert_eq!(s.blocks().stats().used, 0);
        assert!(!s.abort(SeqId(9)));
    }
}
