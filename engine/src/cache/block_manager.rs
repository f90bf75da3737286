//! The KV block manager: bookkeeping on integers only, no tensors.
//!
//! The KV cache is a pool of `num_blocks` blocks of `block_size` token slots. Each
//! sequence owns a block table (the blocks holding its tokens in order); a token at
//! position `p` lives in slot `table[p / block_size] * block_size + p % block_size`.
//!
//! Prefix caching: a block that is full gets a hash chained over every token id up to
//! its end, and the ids themselves are kept so a hit is verified, not trusted. A new
//! prompt whose leading full blocks match shares them (ref counts) and skips their
//! prefill. A block is sealed (made findable) only by [`BlockManager::seal_computed`],
//! which the scheduler calls for the tokens a step computes, never at allocation: a
//! block allocated for a prompt chunk that has not run yet holds no K/V, and sharing it
//! would let another sequence read garbage. (Sealing the tokens of the step being
//! scheduled is safe: every layer writes the whole step's K/V before any query reads.)
//! Freed blocks keep their hash and stay findable until they are reused; reuse takes
//! blocks that never held a full block first, then cached ones least recently freed
//! first (LRU).
//!
//! Layouts ([`KvLayout`]): `Paged` is the above. `Contiguous` is the naive cache that
//! paging replaces, kept as a policy of the same pool to measure what paging buys: each
//! sequence reserves `ceil(max_model_len / block_size)` blocks at admission, whatever its
//! length, and nothing is shared (the prefix cache is off). The reserved but unused
//! slots count as waste ([`BlockManager::wasted_slots`]).
//!
//! Invariants (checked by `check_invariants` in tests): free + used = total; a block's
//! ref count equals the number of block tables that hold it; a free block has ref
//! count 0; the hash index points only at blocks carrying that hash; a block table holds
//! `max(ceil(tokens / block_size), reserved blocks)` blocks.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a block in the cache tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// A sequence known to the block manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// How sequences take KV blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvLayout {
    /// A block at a time as a sequence grows, with prefix sharing.
    #[default]
    Paged,
    /// `max_model_len` slots reserved per sequence at admission, no sharing.
    Contiguous,
}

impl KvLayout {
    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Paged => "paged",
            KvLayout::Contiguous => "contiguous",
        }
    }
}

/// A chained hash of a full block's tokens and every token before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(u64);

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set once the block is full: the hash and the token ids it holds.
    hash: Option<BlockHash>,
    tokens: Vec<u32>,
    /// When free and cached: the key of this block in `free_cached`.
    free_stamp: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    table: Vec<BlockId>,
    /// Tokens that have slots (the sequence's length as far as the cache knows).
    num_tokens: usize,
    /// Leading blocks of `table` that are sealed (full, computed, findable).
    sealed: usize,
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0:?} already has blocks")]
    AlreadyAllocated(SeqId),
    #[error("sequence {0:?} has no blocks")]
    UnknownSequence(SeqId),
}

/// Usage counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockStats {
    pub total: usize,
    /// Blocks held by at least one sequence.
    pub used: usize,
    /// Free blocks, cached ones included.
    pub free: usize,
    /// Free blocks that still hold a reusable full block (a subset of `free`).
    pub cached: usize,
    /// Prompt tokens served from the prefix cache, and prompt tokens looked up.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
}

/// The block pool, block tables and prefix cache.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks without a hash: reused first.
    free_plain: Vec<BlockId>,
    /// Free blocks with a hash, by the time they were freed: reused oldest first.
    free_cached: BTreeMap<u64, BlockId>,
    clock: u64,
    index: HashMap<BlockHash, BlockId>,
    seqs: HashMap<SeqId, SeqBlocks>,
    hit_tokens: u64,
    query_tokens: u64,
    /// Blocks every sequence takes at admission at least (0: paged, grow on demand).
    reserve_blocks: usize,
    /// Contiguous: no block is sealed or shared.
    layout: KvLayout,
}

fn chain_hash(prev: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    prev.map(|p| p.0).hash(&mut h);
    tokens.hash(&mut h);
    BlockHash(h.finish())
}

impl BlockManager {
    /// The paged layout: blocks on demand, prefix caching on.
    pub fn new(num_blocks: u32, block_size: usize) -> Self {
        Self::with_layout(num_blocks, block_size, KvLayout::Paged, 0)
    }

    /// `layout` over `num_blocks` blocks; a contiguous layout reserves `max_model_len`
    /// slots (rounded up to whole blocks) per sequence.
    pub fn with_layout(
        num_blocks: u32,
        block_size: usize,
        layout: KvLayout,
        max_model_len: usize,
    ) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let reserve_blocks = match layout {
            KvLayout::Paged => 0,
            KvLayout::Contiguous => max_model_len.div_ceil(block_size),
        };
        BlockManager {
            block_size,
            blocks: vec![Block::default(); num_blocks as usize],
            // Reversed so that `pop` hands out block 0 first.
            free_plain: (0..num_blocks).rev().map(BlockId).collect(),
            free_cached: BTreeMap::new(),
            clock: 0,
            index: HashMap::new(),
            seqs: HashMap::new(),
            hit_tokens: 0,
            query_tokens: 0,
            reserve_blocks,
            layout,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Blocks a sequence takes at admission at least (0 in the paged layout).
    pub fn reserve_blocks(&self) -> usize {
        self.reserve_blocks
    }

    /// Blocks a sequence of `tokens` tokens holds under this layout.
    fn table_len(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size).max(self.reserve_blocks)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_free(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    pub fn stats(&self) -> BlockStats {
        let free = self.num_free();
        BlockStats {
            total: self.blocks.len(),
            used: self.blocks.len() - free,
            free,
            cached: self.free_cached.len(),
            prefix_hit_tokens: self.hit_tokens,
            prefix_query_tokens: self.query_tokens,
        }
    }

    /// Blocks of the leading full blocks of `tokens` found in the cache and verified.
    fn cached_prefix(&self, tokens: &[u32]) -> Vec<BlockId> {
        let mut hits = Vec::new();
        if self.layout == KvLayout::Contiguous {
            return hits;
        }
        let mut prev = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let h = chain_hash(prev, chunk);
            match self.index.get(&h) {
                Some(&b) if self.blocks[b.0 as usize].tokens == chunk => hits.push(b),
                _ => break,
            }
            prev = Some(h);
        }
        // The last prompt token is always computed (its logits start generation), so a
        // prompt cached to its very end recomputes its last block.
        if hits.len() * self.block_size >= tokens.len() {
            hits.pop();
        }
        hits
    }

    /// New blocks a prompt of `tokens` would take, counting prefix-cache hits.
    pub fn blocks_needed(&self, tokens: &[u32]) -> usize {
        let hits = self.cached_prefix(tokens);
        // A cached hit that sits in the free list still takes a free block.
        let revived = hits
            .iter()
            .filter(|b| self.blocks[b.0 as usize].ref_count == 0)
            .count();
        self.table_len(tokens.len()) - hits.len() + revived
    }

    pub fn can_allocate(&self, tokens: &[u32]) -> bool {
        self.blocks_needed(tokens) <= self.num_free()
    }

    fn take_free(&mut self) -> Option<BlockId> {
        let id = match self.free_plain.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.free_cached.pop_first()?;
                // Evict: the block is about to hold other tokens.
                self.forget(id);
                id
            }
        };
        self.blocks[id.0 as usize].ref_count = 1;
        Some(id)
    }

    /// Make a block taken out of `free_cached` unfindable: drop its hash (and the index
    /// entry, if it still points here) and its token ids.
    fn forget(&mut self, id: BlockId) {
        let block = &mut self.blocks[id.0 as usize];
        block.free_stamp = None;
        if let Some(h) = block.hash.take() {
            if self.index.get(&h) == Some(&id) {
                self.index.remove(&h);
            }
        }
        block.tokens.clear();
    }

    fn release(&mut self, id: BlockId) {
        let block = &mut self.blocks[id.0 as usize];
        block.ref_count -= 1;
        if block.ref_count == 0 {
            if block.hash.is_some() {
                self.clock += 1;
                block.free_stamp = Some(self.clock);
                self.free_cached.insert(self.clock, id);
            } else {
                self.free_plain.push(id);
            }
        }
    }

    fn seal(&mut self, id: BlockId, prev: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let h = chain_hash(prev, tokens);
        let block = &mut self.blocks[id.0 as usize];
        block.hash = Some(h);
        block.tokens = tokens.to_vec();
        self.index.insert(h, id);
        h
    }

    fn hash_of(&self, table: &[BlockId], i: usize) -> Option<BlockHash> {
        i.checked_sub(1)
            .and_then(|j| self.blocks[table[j].0 as usize].hash)
    }

    /// Give `seq` blocks for its prompt `tokens`. Returns how many leading tokens are
    /// already in the cache (their K/V need not be computed).
    pub fn allocate(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, BlockError> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::AlreadyAllocated(seq));
        }
        let needed = self.blocks_needed(tokens);
        if needed > self.num_free() {
            return Err(BlockError::OutOfBlocks {
                needed,
                free: self.num_free(),
            });
        }
        let hits = self.cached_prefix(tokens);
        let mut table = Vec::with_capacity(self.table_len(tokens.len()));
        for &b in &hits {
            let block = &mut self.blocks[b.0 as usize];
            if block.ref_count == 0 {
                if let Some(stamp) = block.free_stamp.take() {
                    self.free_cached.remove(&stamp);
                }
            }
            block.ref_count += 1;
            table.push(b);
        }
        let cached_tokens = hits.len() * self.block_size;
        let sealed = hits.len();
        for _ in hits.len()..self.table_len(tokens.len()) {
            let id = self
                .take_free()
                .ok_or(BlockError::OutOfBlocks { needed: 1, free: 0 })?;
            table.push(id);
        }
        self.hit_tokens += cached_tokens as u64;
        self.query_tokens += tokens.len() as u64;
        self.seqs.insert(
            seq,
            SeqBlocks {
                table,
                num_tokens: tokens.len(),
                sealed,
            },
        );
        Ok(cached_tokens)
    }

    /// Whether `seq` can grow by one token (a new block only when its blocks are full).
    pub fn can_append(&self, seq: SeqId) -> bool {
        match self.seqs.get(&seq) {
            Some(s) => s.num_tokens < s.table.len() * self.block_size || self.num_free() > 0,
            None => false,
        }
    }

    /// Make room for one more token of `seq` (a new block only when its blocks are full).
    pub fn append_slot(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let (n, need_block) = match self.seqs.get(&seq) {
            Some(s) => (
                s.num_tokens,
                s.num_tokens >= s.table.len() * self.block_size,
            ),
            None => return Err(BlockError::UnknownSequence(seq)),
        };
        if need_block {
            let id = self
                .take_free()
                .ok_or(BlockError::OutOfBlocks { needed: 1, free: 0 })?;
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.table.push(id);
            }
        }
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        s.num_tokens = n + 1;
        Ok(())
    }

    /// Record that the K/V of the first `computed` tokens of `seq` are computed, or are
    /// written by the step being scheduled: seal every full block among them, so that
    /// later prompts can share it. `tokens` holds at least those tokens.
    pub fn seal_computed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        computed: usize,
    ) -> Result<(), BlockError> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        if self.layout == KvLayout::Contiguous {
            return Ok(());
        }
        let full = computed.min(tokens.len()).min(s.num_tokens) / self.block_size;
        let (from, table) = (s.sealed, s.table.clone());
        for i in from..full {
            let prev = self.hash_of(&table, i);
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            self.seal(table[i], prev, chunk);
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.sealed = s.sealed.max(full);
        }
        Ok(())
    }

    /// Release every block of `seq` (finished, aborted or preempted).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            // Tail first, so that under pressure the end of a sequence is evicted before
            // the prefix that others are likelier to share.
            for &b in s.table.iter().rev() {
                self.release(b);
            }
        }
    }

    /// Forget every free cached block (they become plain free blocks). Used after a
    /// failed step, whose sealed blocks may never have been written.
    pub fn drop_free_cached(&mut self) {
        while let Some((_, id)) = self.free_cached.pop_first() {
            self.forget(id);
            self.free_plain.push(id);
        }
    }

    /// Tokens of `seq` that have a slot.
    pub fn num_tokens(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.num_tokens)
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// The cache slot of token `pos` of `seq`.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Option<usize> {
        let s = self.seqs.get(&seq)?;
        if pos >= s.num_tokens {
            return None;
        }
        let block = s.table.get(pos / self.block_size)?;
        Some(block.0 as usize * self.block_size + pos % self.block_size)
    }

    /// Slots allocated but holding no token, over all sequences (KV waste; in the
    /// contiguous layout this includes every reserved slot not yet used).
    pub fn wasted_slots(&self) -> usize {
        self.seqs
            .values()
            .map(|s| s.table.len() * self.block_size - s.num_tokens)
            .sum()
    }

    /// Panics with a description when an invariant is broken (for tests).
    pub fn check_invariants(&self) {
        let free = self.num_free();
        let used = self.blocks.iter().filter(|b| b.ref_count > 0).count();
        assert_eq!(free + used, self.blocks.len(), "free + used != total");
        let mut holders = vec![0u32; self.blocks.len()];
        for s in self.seqs.values() {
            assert_eq!(s.table.len(), self.table_len(s.num_tokens));
            for b in &s.table {
                holders[b.0 as usize] += 1;
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            assert_eq!(b.ref_count, holders[i], "block {i}: ref count vs tables");
        }
        for id in self.free_plain.iter().chain(self.free_cached.values()) {
            assert_eq!(self.blocks[id.0 as usize].ref_count, 0, "free block in use");
        }
        for (h, id) in &self.index {
            assert_eq!(self.blocks[id.0 as usize].hash, Some(*h), "stale index");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table() {
        let mut m = BlockManager::new(8, 4);
        m.allocate(SeqId(1), &[1, 2, 3, 4, 5, 6]).unwrap();
        let t = m.block_table(SeqId(1)).unwrap().to_vec();
        assert_eq!(t.len(), 2);
        assert_eq!(m.slot(SeqId(1), 5), Some(t[1].0 as usize * 4 + 1));
        assert_eq!(m.slot(SeqId(1), 6), None);
        m.check_invariants();
    }

    #[test]
    fn shared_prefix_blocks_are_reused_and_verified() {
        let mut m = BlockManager::new(10, 2);
        let a = [1, 2, 3, 4, 5];
        assert_eq!(m.allocate(SeqId(1), &a).unwrap(), 0);
        m.seal_computed(SeqId(1), &a, a.len()).unwrap();
        // Same first two blocks, different tail: 4 tokens cached.
        assert_eq!(m.allocate(SeqId(2), &[1, 2, 3, 4, 9, 9]).unwrap(), 4);
        let (t1, t2) = (
            m.block_table(SeqId(1)).unwrap(),
            m.block_table(SeqId(2)).unwrap(),
        );
        assert_eq!(t1[..2], t2[..2]);
        assert_ne!(t1[2], t2[2]);
        m.check_invariants();
        // A whole-prompt hit still recomputes its last block.
        assert_eq!(m.allocate(SeqId(3), &[1, 2, 3, 4]).unwrap(), 2);
        m.check_invariants();
        let s = m.stats();
        assert_eq!(s.prefix_hit_tokens, 6);
        assert_eq!(s.prefix_query_tokens, 15);
    }

    #[test]
    fn freed_blocks_stay_cached_until_reused_lru() {
        let mut m = BlockManager::new(4, 2);
        m.allocate(SeqId(1), &[1, 2, 3, 4]).unwrap();
        m.seal_computed(SeqId(1), &[1, 2, 3, 4], 4).unwrap();
        m.free(SeqId(1));
        assert_eq!(m.stats().cached, 2);
        // Comes back from the cache.
        assert_eq!(m.allocate(SeqId(2), &[1, 2, 3, 4, 5]).unwrap(), 4);
        m.free(SeqId(2));
        // Fill the pool with other tokens: cached blocks are evicted last, oldest first.
        m.allocate(SeqId(3), &[7, 7, 8, 8, 9, 9, 6]).unwrap();
        assert_eq!(m.stats().free, 0);
        assert_eq!(
            m.allocate(SeqId(4), &[1, 2, 3]).unwrap_err(),
            BlockError::OutOfBlocks { needed: 2, free: 0 }
        );
        m.check_invariants();
    }

    #[test]
    fn append_seals_full_blocks() {
        let mut m = BlockManager::new(4, 2);
        let mut toks = vec![5, 6, 7];
        m.allocate(SeqId(1), &toks).unwrap();
        toks.push(8);
        m.append_slot(SeqId(1)).unwrap();
        toks.push(9);
        assert!(m.can_append(SeqId(1)));
        m.append_slot(SeqId(1)).unwrap();
        assert_eq!(m.block_table(SeqId(1)).unwrap().len(), 3);
        m.seal_computed(SeqId(1), &toks, toks.len()).unwrap();
        m.free(SeqId(1));
        // The appended block [7, 8] is findable now.
        assert_eq!(m.allocate(SeqId(2), &[5, 6, 7, 8, 1]).unwrap(), 4);
        m.check_invariants();
    }

    /// Regression: blocks used to be sealed at allocation, so a prompt preempted (or
    /// aborted) before its prefill ran left findable blocks holding no K/V, and the next
    /// identical prompt skipped computing them (found by the engine's batched-vs-alone
    /// test with chunked prefill and preemption).
    #[test]
    fn blocks_never_computed_are_not_shared() {
        let mut m = BlockManager::new(8, 2);
        let p = [1, 2, 3, 4, 5, 6];
        m.allocate(SeqId(1), &p).unwrap();
        // Only the first chunk (2 tokens) ran before the sequence was preempted.
        m.seal_computed(SeqId(1), &p, 2).unwrap();
        m.free(SeqId(1));
        assert_eq!(m.allocate(SeqId(2), &p).unwrap(), 2);
        m.check_invariants();
        assert_eq!(
            m.seal_computed(SeqId(9), &p, 2),
            Err(BlockError::UnknownSequence(SeqId(9)))
        );
        m.free(SeqId(2));
        assert!(m.stats().cached > 0);
        m.drop_free_cached();
        assert_eq!(m.stats().cached, 0);
        assert_eq!(m.allocate(SeqId(3), &p).unwrap(), 0);
        m.check_invariants();
    }

    #[test]
    fn contiguous_reserves_max_model_len_and_shares_nothing() {
        // 10 blocks of 4, max_model_len 10: every sequence reserves 3 blocks.
        let mut m = BlockManager::with_layout(10, 4, KvLayout::Contiguous, 10);
        assert_eq!(m.reserve_blocks(), 3);
        let p = [1, 2, 3, 4, 5];
        assert_eq!(m.blocks_needed(&p), 3);
        assert_eq!(m.allocate(SeqId(1), &p).unwrap(), 0);
        m.seal_computed(SeqId(1), &p, p.len()).unwrap();
        assert_eq!(m.block_table(SeqId(1)).unwrap().len(), 3);
        // 12 slots reserved, 5 used.
        assert_eq!(m.wasted_slots(), 7);
        // The same prompt shares nothing.
        assert_eq!(m.allocate(SeqId(2), &p).unwrap(), 0);
        let (t1, t2) = (
            m.block_table(SeqId(1)).unwrap(),
            m.block_table(SeqId(2)).unwrap(),
        );
        assert!(t1.iter().all(|b| !t2.contains(b)));
        // Growth within the reservation takes no block.
        for _ in 0..7 {
            assert!(m.can_append(SeqId(1)));
            m.append_slot(SeqId(1)).unwrap();
        }
        assert_eq!(m.num_free(), 4);
        assert_eq!(m.wasted_slots(), 7);
        m.check_invariants();
        // A third sequence fits; a fourth does not (1 block left, 3 needed).
        m.allocate(SeqId(3), &[9]).unwrap();
        assert_eq!(
            m.allocate(SeqId(4), &[9]).unwrap_err(),
            BlockError::OutOfBlocks { needed: 3, free: 1 }
        );
        for id in 1..=3 {
            m.free(SeqId(id));
        }
        let s = m.stats();
        assert_eq!((s.free, s.cached, s.prefix_hit_tokens), (10, 0, 0));
        m.check_invariants();
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Admit a prompt drawn from a few shared prefixes.
        Admit { prefix: u8, len: u8 },
        /// Grow a live sequence by one token.
        Append { pick: u8, token: u8 },
        /// Finish a live sequence.
        Free { pick: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 1u8..40).prop_map(|(prefix, len)| Op::Admit { prefix, len }),
            (any::<u8>(), 0u8..4).prop_map(|(pick, token)| Op::Append { pick, token }),
            any::<u8>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_schedule(
            ops in prop::collection::vec(op(), 1..200),
            block_size in prop::sample::select(vec![1usize, 2, 4, 16]),
            num_blocks in 1u32..64,
            contiguous in any::<bool>(),
            max_model_len in 1usize..48,
        ) {
            let layout = if contiguous { KvLayout::Contiguous } else { KvLayout::Paged };
            let mut m = BlockManager::with_layout(num_blocks, block_size, layout, max_model_len);
            let mut live: Vec<(SeqId, Vec<u32>)> = Vec::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Admit { prefix, len } => {
                        let tokens: Vec<u32> = (0..len as u32).map(|i| u32::from(prefix) * 1000 + i).collect();
                        let fits = m.can_allocate(&tokens);
                        let free_before = m.num_free();
                        let needed = m.blocks_needed(&tokens);
                        match m.allocate(SeqId(next), &tokens) {
                            Ok(cached) => {
                                m.seal_computed(SeqId(next), &tokens, tokens.len()).unwrap();
                                prop_assert!(fits);
                                prop_assert!(cached < tokens.len());
                                prop_assert_eq!(m.num_free(), free_before - needed);
                                live.push((SeqId(next), tokens));
                            }
                            Err(_) => prop_assert!(!fits),
                        }
                        next += 1;
                    }
                    Op::Append { pick, token } => {
                        if live.is_empty() { continue; }
                        let i = pick as usize % live.len();
                        let (id, toks) = &mut live[i];
                        if m.can_append(*id) {
                            toks.push(u32::from(token));
                            m.append_slot(*id).unwrap();
                            m.seal_computed(*id, toks, toks.len()).unwrap();
                        }
                    }
                    Op::Free { pick } => {
                        if live.is_empty() { continue; }
                        let (id, _) = live.swap_remove(pick as usize % live.len());
                        m.free(id);
                    }
                }
                m.check_invariants();
                // Slot mapping is injective across live sequences except shared blocks,
                // which hold identical tokens.
                let mut owner: HashMap<usize, u32> = HashMap::new();
                for (id, toks) in &live {
                    for (pos, tok) in toks.iter().enumerate() {
                        let slot = m.slot(*id, pos).unwrap();
                        if let Some(prev) = owner.insert(slot, *tok) {
                            prop_assert_eq!(prev, *tok, "slot {} holds two different tokens", slot);
                        }
                    }
                }
            }
            for (id, _) in live.drain(..) {
                m.free(id);
            }
            m.check_invariants();
            prop_assert_eq!(m.num_free(), num_blocks as usize);
        }
    }
}
