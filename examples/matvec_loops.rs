//! Run with: `RAYON_NUM_THREADS=2 cargo run --release --example matvec_loops`
//!
//! A batch-1 decode step's dense products, SmolLM2-135M's 30 layers of f16 weights
//! (212 MB, beyond any cache), two ways on the level `LLMEM_CPU` allows: one parallel
//! loop per matrix (7 per layer), against one `matvec_many` loop for q/k/v and one for
//! gate/up (4 per layer), as the engine's `Linear::forward_many` runs them. The two
//! alternate step by step, 20 rounds of 50 steps each, so that a host whose speed drifts
//! slows both alike; each round prints both mean step times and their ratio. It runs on
//! a rayon worker, as a forward pass does.

use std::time::{Duration, Instant};

use half::f16;
use llmem_kernels::matvec::{matvec, matvec_many};

const LAYERS: usize = 30;
const ROUNDS: usize = 20;
const STEPS: u32 = 50;

fn main() {
    let level = llmem_kernels::cpu::init().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let (h, kv, i) = (576, 192, 1536);
    // (rows, cols) of q, k, v, o, gate, up, down.
    let shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)];
    let mut seed = 0x5EEDu64;
    let mut value = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * 0.1
    };
    let layers: Vec<Vec<Vec<f16>>> = (0..LAYERS)
        .map(|_| {
            shapes
                .iter()
                .map(|&(n, k)| (0..n * k).map(|_| f16::from_f32(value())).collect())
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..i).map(|_| value()).collect();
    let mut out = vec![0f32; 2 * i];

    let per_matrix = |out: &mut [f32]| {
        for ws in &layers {
            for (w, &(n, k)) in ws.iter().zip(&shapes) {
                matvec(&x[..k], 1, w, n, k, &mut out[..n]);
            }
        }
    };
    let many = |out: &mut [f32]| {
        for ws in &layers {
            let w = |j: usize| (ws[j].as_slice(), shapes[j].0);
            let (q, rest) = out.split_at_mut(h);
            let (k, rest) = rest.split_at_mut(kv);
            matvec_many(
                &x[..h],
                1,
                &[w(0), w(1), w(2)],
                h,
                &mut [q, k, &mut rest[..kv]],
            );
            matvec(&x[..h], 1, &ws[3], h, h, &mut out[..h]);
            let (gate, up) = out.split_at_mut(i);
            matvec_many(&x[..h], 1, &[w(4), w(5)], h, &mut [gate, &mut up[..i]]);
            matvec(&x[..i], 1, &ws[6], h, i, &mut out[..h]);
        }
    };
    let timed = |f: &dyn Fn(&mut [f32]), out: &mut [f32]| {
        let t = Instant::now();
        f(out);
        t.elapsed()
    };
    println!(
        "level {}, {} threads: mean step time, one loop per matrix / matvec_many",
        level.name(),
        rayon::current_num_threads()
    );
    rayon::scope(|_| {
        let (mut all_one, mut all_many, mut wins) = (Duration::ZERO, Duration::ZERO, 0);
        for round in 0..ROUNDS {
            let (mut one, mut fused) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..STEPS {
                one += timed(&per_matrix, &mut out);
                fused += timed(&many, &mut out);
            }
            all_one += one;
            all_many += fused;
            wins += usize::from(fused < one);
            println!(
                "round {round:2}: {:.3} ms / {:.3} ms = {:.3}",
                (one / STEPS).as_secs_f64() * 1e3,
                (fused / STEPS).as_secs_f64() * 1e3,
                one.as_secs_f64() / fused.as_secs_f64()
            );
        }
        println!(
            "all rounds: {:.3}; matvec_many faster in {wins} of {ROUNDS} rounds",
            all_one.as_secs_f64() / all_many.as_secs_f64()
        );
    });
}
