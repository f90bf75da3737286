//! The paged attention kernel against its slow reference, one decode step: batch 8,
//! 9 query heads over 3 KV heads, head_dim 64, 512 tokens of context each, blocks of 16,
//! an f32 cache (SmolLM2-135M's attention geometry). The block tables are shuffled so
//! the kernel reads scattered blocks, as it does after a while of serving.
//!
//! Second: the packed block-quantized matmul (`llmem_kernels::packed`) against candle's
//! quantized matmul on the same blocks, for SmolLM2-135M's gate projection (1536 x 576)
//! at 1, 32 and 512 input rows, Q8_0 and Q4_1 (candle has no SIMD Q4_1 dot).
//!
//! With it, prefill's attention: one 512-token prompt attending causally over its own
//! keys, in blocks of 16 (the paged cache) and as one block (the contiguous cache), f32
//! and f16 caches.
//!
//! Third: the dense gemm's register tiles (`llmem_kernels::gemm`) against the matvec and
//! candle's f32 matmul (with the transposed weight it takes), f32 and f16 weights, the
//! gate projection's shape at 2, 32 and 512 input rows, on the level `LLMEM_CPU` allows.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llmem_kernels::{paged_attention, paged_attention_reference, AttentionParams, CacheShape};

const BATCH: usize = 8;
const NUM_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const CONTEXT: usize = 512;
const BLOCK_SIZE: usize = 16;

/// A seeded xorshift stream of values in [-1, 1).
struct Values(u64);

impl Values {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn bench(c: &mut Criterion) {
    let blocks_per_seq = CONTEXT / BLOCK_SIZE;
    let cache = CacheShape {
        num_blocks: BATCH * blocks_per_seq,
        block_size: BLOCK_SIZE,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let p = AttentionParams {
        num_heads: NUM_HEADS,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        cache,
        max_blocks_per_seq: blocks_per_seq,
    };
    let mut rng = Values(0x5EED);
    let key_cache: Vec<f32> = (0..cache.elems()).map(|_| rng.next_f32()).collect();
    let value_cache: Vec<f32> = (0..cache.elems()).map(|_| rng.next_f32()).collect();
    let query: Vec<f32> = (0..BATCH * NUM_HEADS * HEAD_DIM)
        .map(|_| rng.next_f32())
        .collect();
    // Every block id once, shuffled (Fisher-Yates), 32 per sequence.
    let mut block_tables: Vec<u32> = (0..cache.num_blocks as u32).collect();
    for i in (1..block_tables.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        block_tables.swap(i, j);
    }
    let query_seq: Vec<u32> = (0..BATCH as u32).collect();
    let context_lens = vec![CONTEXT as u32; BATCH];
    let mut out = vec![0f32; query.len()];

    // The two agree before anything is timed.
    paged_attention(
        &mut out,
        &query,
        &key_cache,
        &value_cache,
        &block_tables,
        &query_seq,
        &context_lens,
        &p,
    )
    .unwrap();
    let want = paged_attention_reference(
        &query,
        &key_cache,
        &value_cache,
        &block_tables,
        &query_seq,
        &context_lens,
        &p,
    );
    let diff = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "kernel and reference differ by {diff}");

    let mut group = c.benchmark_group("paged_attention/decode_b8_h9_kv3_d64_ctx512_bs16_f32");
    // One element = one token of context read by one sequence.
    group.throughput(Throughput::Elements((BATCH * CONTEXT) as u64));
    group.bench_function("kernel", |b| {
        b.iter(|| {
            paged_attention(
                &mut out,
                &query,
                &key_cache,
                &value_cache,
                &block_tables,
                &query_seq,
                &context_lens,
                &p,
            )
            .unwrap()
        })
    });
    group.sample_size(10);
    group.bench_function("reference", |b| {
        b.iter(|| {
            paged_attention_reference(
                &query,
                &key_cache,
                &value_cache,
                &block_tables,
                &query_seq,
                &context_lens,
                &p,
            )
        })
    });
    group.finish();
    bench_prefill_attention(c, &key_cache, &value_cache, &p);
}

/// One sequence's 512-token prompt attending causally over its own keys (query `i` over
/// keys `0..=i`), with f32 and f16 caches, in blocks of 16 (the paged cache of `serve`
/// and `bench`) and as one block of 512 (the contiguous cache of `generate`): prefill's
/// attention. One element = one (query head, key) pair: a score and its weighted value,
/// 2 x 64 multiply-adds.
fn bench_prefill_attention(
    c: &mut Criterion,
    key_cache: &[f32],
    value_cache: &[f32],
    p: &AttentionParams,
) {
    use half::f16;
    let mut rng = Values(0xCA05A1);
    let query: Vec<f32> = (0..CONTEXT * NUM_HEADS * HEAD_DIM)
        .map(|_| rng.next_f32())
        .collect();
    let query_seq = vec![0u32; CONTEXT];
    let context_lens: Vec<u32> = (1..=CONTEXT as u32).collect();
    let mut out = vec![0f32; query.len()];
    let pairs: u64 = (1..=CONTEXT as u64).sum::<u64>() * NUM_HEADS as u64;
    let kh: Vec<f16> = key_cache.iter().map(|&v| f16::from_f32(v)).collect();
    let vh: Vec<f16> = value_cache.iter().map(|&v| f16::from_f32(v)).collect();
    for block_size in [BLOCK_SIZE, CONTEXT] {
        let blocks = CONTEXT / block_size;
        let block_tables: Vec<u32> = (0..blocks as u32).collect();
        let p = AttentionParams {
            cache: CacheShape {
                num_blocks: blocks,
                block_size,
                ..p.cache
            },
            max_blocks_per_seq: blocks,
            ..*p
        };
        let elems = p.cache.elems();
        let mut group = c.benchmark_group(format!(
            "paged_attention/prefill_512_h9_kv3_d64_bs{block_size}"
        ));
        group.throughput(Throughput::Elements(pairs));
        group.sample_size(10);
        let (tables, seqs, lens) = (&block_tables[..], &query_seq[..], &context_lens[..]);
        let (k32, v32) = (&key_cache[..elems], &value_cache[..elems]);
        group.bench_function("f32_cache", |b| {
            b.iter(|| attend(&mut out, &query, k32, v32, tables, seqs, lens, &p))
        });
        let (k16, v16) = (&kh[..elems], &vh[..elems]);
        group.bench_function("f16_cache", |b| {
            b.iter(|| attend(&mut out, &query, k16, v16, tables, seqs, lens, &p))
        });
        group.finish();
    }
}

/// One [`paged_attention`] call that must succeed.
#[allow(clippy::too_many_arguments)]
fn attend<T: llmem_kernels::CacheStore>(
    out: &mut [f32],
    query: &[f32],
    key_cache: &[T],
    value_cache: &[T],
    block_tables: &[u32],
    query_seq: &[u32],
    context_lens: &[u32],
    p: &AttentionParams,
) {
    paged_attention(
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_seq,
        context_lens,
        p,
    )
    .unwrap()
}

fn bench_packed(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use llmem_kernels::packed::{matmul, BlockFormat, PackedMatrix};

    if !PackedMatrix::fast_path_available() {
        eprintln!("no packed kernel at this kernel level: the reference would run");
        return;
    }
    let mut rng = Values(0xB10C);
    // The gate projection's shape; the k-quants need rows of a multiple of 256 columns,
    // so they take the down projection's.
    for (format, ggml, (n, k)) in [
        (BlockFormat::Q8_0, GgmlDType::Q8_0, (1536, 576)),
        (BlockFormat::Q4_1, GgmlDType::Q4_1, (1536, 576)),
        (BlockFormat::Q5_0, GgmlDType::Q5_0, (1536, 576)),
        (BlockFormat::Q4K, GgmlDType::Q4K, (576, 1536)),
        (BlockFormat::Q5K, GgmlDType::Q5K, (576, 1536)),
        (BlockFormat::Q6K, GgmlDType::Q6K, (576, 1536)),
    ] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32() * 0.1).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, ggml).unwrap();
        let packed = PackedMatrix::from_blocks(format, n, k, &q.data().unwrap()).unwrap();
        let candle = QMatMul::QTensor(std::sync::Arc::new(q));
        for m in [1usize, 32, 512] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let mut out = vec![0f32; m * n];
            let mut group = c.benchmark_group(format!("qmatmul/{}_{n}x{k}_rows{m}", format.name()));
            // One element = one multiply-add.
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.sample_size(10);
            group.bench_function("packed", |b| {
                b.iter(|| matmul(&x, m, &packed, &mut out).unwrap())
            });
            group.bench_function("candle", |b| b.iter(|| candle.forward(&xt).unwrap()));
            group.finish();
        }
    }
}

fn bench_gemm(c: &mut Criterion) {
    use candle_core::{Device, Tensor};
    use half::f16;
    use llmem_kernels::{gemm::gemm, matvec::matvec};

    let level = llmem_kernels::cpu::init().unwrap();
    if !llmem_kernels::gemm::tiled() {
        eprintln!(
            "no gemm tiles at the {} level: gemm would be the matvec",
            level.name()
        );
        return;
    }
    let (n, k) = (1536, 576);
    let mut rng = Values(0x6E33);
    let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32() * 0.1).collect();
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let wt = wt.t().unwrap();
    for m in [2usize, 32, 512] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let mut out = vec![0f32; m * n];
        let mut group = c.benchmark_group(format!("gemm/{}_{n}x{k}_rows{m}", level.name()));
        group.throughput(Throughput::Elements((m * n * k) as u64));
        group.sample_size(10);
        group.bench_function("tiles_f32", |b| b.iter(|| gemm(&x, m, &w, n, k, &mut out)));
        group.bench_function("tiles_f16", |b| b.iter(|| gemm(&x, m, &wh, n, k, &mut out)));
        group.bench_function("matvec_f32", |b| {
            b.iter(|| matvec(&x, m, &w, n, k, &mut out))
        });
        group.bench_function("candle_f32", |b| b.iter(|| xt.matmul(&wt).unwrap()));
        group.finish();
    }
}

criterion_group!(benches, bench, bench_packed, bench_gemm);
criterion_main!(benches);
