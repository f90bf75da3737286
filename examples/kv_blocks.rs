//! Run with: `cargo run --example kv_blocks`
//!
//! A walk-through of the paged KV bookkeeping, integers only (no model, no tensors):
//! three requests share a pool of 16 blocks of 4 token slots, grow one token per step
//! (a stand-in model "samples" 100 + position), a fourth request arrives whose prompt
//! starts with the first one's (a prefix-cache hit: it shares those blocks and skips
//! their prefill), and all finish, leaving every block free. Each step prints what was
//! fed, every live sequence's block table, the shared blocks and the free list.

use std::collections::{BTreeMap, HashMap};

use llmem_engine::cache::block_manager::{BlockManager, SeqId};
use llmem_engine::engine::scheduler::{Scheduler, SchedulerConfig, StopConditions};

const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: u32 = 16;

fn stop(max_tokens: usize) -> StopConditions {
    StopConditions {
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: true,
    }
}

fn show_table(table: &[u32]) -> String {
    let ids: Vec<String> = table.iter().map(|b| format!("{b:>2}")).collect();
    format!("[{}]", ids.join(" "))
}

fn holders_any(s: &Scheduler, names: &BTreeMap<SeqId, &str>, block: u32) -> bool {
    names.keys().any(|&id| {
        s.blocks()
            .block_table(id)
            .is_some_and(|t| t.iter().any(|b| b.0 == block))
    })
}

/// Block tables of the live sequences, the blocks held by more than one, and the pool.
fn show_state(s: &Scheduler, names: &BTreeMap<SeqId, &str>) {
    let blocks = s.blocks();
    let mut holders: HashMap<u32, usize> = HashMap::new();
    for (&id, name) in names {
        let Some(table) = blocks.block_table(id) else {
            continue;
        };
        let table: Vec<u32> = table.iter().map(|b| b.0).collect();
        for b in &table {
            *holders.entry(*b).or_default() += 1;
        }
        let tokens = blocks.num_tokens(id).unwrap_or(0);
        println!(
            "    {name}: {tokens:>2} tokens, table {}",
            show_table(&table)
        );
    }
    let mut shared: Vec<u32> = holders
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(b, _)| b)
        .collect();
    shared.sort_unstable();
    // Free blocks are the ones no table holds.
    let free: Vec<u32> = (0..NUM_BLOCKS)
        .filter(|b| !holders_any(s, names, *b))
        .collect();
    let st = blocks.stats();
    println!(
        "    shared {}  free {} ({} cached for prefix hits)  empty slots {}",
        show_table(&shared),
        show_table(&free),
        st.cached,
        blocks.wasted_slots()
    );
}

fn main() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 4,
            max_batched_tokens: 64,
            max_model_len: 64,
        },
        BlockManager::new(NUM_BLOCKS, BLOCK_SIZE),
    );
    println!(
        "{NUM_BLOCKS} blocks of {BLOCK_SIZE} slots; token p of a sequence lives in slot \
         table[p / {BLOCK_SIZE}] * {BLOCK_SIZE} + p % {BLOCK_SIZE}\n"
    );
    let mut names: BTreeMap<SeqId, &str> = BTreeMap::new();
    let prompt_a: Vec<u32> = (1..=10).collect();
    for (id, name, prompt, max_tokens) in [
        (SeqId(0), "A", prompt_a.clone(), 6),
        (SeqId(1), "B", vec![20, 21, 22, 23, 24], 9),
        (SeqId(2), "C", vec![30, 31, 32], 4),
    ] {
        println!(
            "add {name}: prompt of {} tokens, {max_tokens} to generate",
            prompt.len()
        );
        s.add(id, prompt, stop(max_tokens));
        names.insert(id, name);
    }
    let mut step = 0;
    while s.has_work() {
        step += 1;
        if step == 3 {
            // D starts with A's first 8 tokens: A's two full prompt blocks, computed in
            // step 1, are found by hash and shared instead of recomputed.
            let mut prompt_d = prompt_a[..8].to_vec();
            prompt_d.extend([60, 61]);
            println!("\nadd D: prompt of 10 tokens whose first 8 are A's, 3 to generate");
            s.add(SeqId(3), prompt_d, stop(3));
            names.insert(SeqId(3), "D");
        }
        let batch = s.schedule();
        println!("\nstep {step}:");
        for e in &batch.seqs {
            let what = if e.tokens.len() > 1 {
                "prefill"
            } else {
                "decode"
            };
            let skipped = if e.start_pos > 0 && e.tokens.len() > 1 {
                format!(" (the first {} came from the prefix cache)", e.start_pos)
            } else {
                String::new()
            };
            println!(
                "  {}: {what} {} token(s) at positions {}..{}{skipped}",
                names[&e.seq],
                e.tokens.len(),
                e.start_pos,
                e.start_pos + e.tokens.len()
            );
        }
        show_state(&s, &names);
        // The stand-in model: the next token of a sequence is 100 + its position.
        let sampled: Vec<u32> = batch
            .seqs
            .iter()
            .filter(|e| e.sample)
            .map(|e| (100 + e.start_pos + e.tokens.len()) as u32)
            .collect();
        for f in s.postprocess(&batch, &sampled) {
            println!(
                "  {} finished ({}): its blocks go back to the pool",
                names[&f.seq],
                f.reason.as_str()
            );
            names.remove(&f.seq);
        }
    }
    let st = s.blocks().stats();
    println!(
        "\nall done after {step} steps: {} of {} blocks free, {} prompt tokens of {} served \
         from the prefix cache",
        st.free, st.total, st.prefix_hit_tokens, st.prefix_query_tokens
    );
    assert_eq!(st.free, st.total, "every block is free at the end");
}
