//! `llmem bench`: a seeded end-to-end benchmark of the paged engine.
//!
//! For each concurrency C, a fresh [`Engine`] gets C requests at once (seeded random
//! prompts of `--prompt-tokens` ids, `--gen-tokens` greedy tokens each, EOS ignored) and
//! is stepped until all finish. Reported per run: aggregate generated tokens per second
//! of wall time, time to first token and inter-token latency percentiles (nearest rank,
//! over every request / every gap between a request's consecutive tokens), the peak
//! running sequences and KV blocks, preemptions, the prefix-cache hit rate (prompt
//! tokens served from cache / prompt tokens looked up), and `kv_waste_fraction`: over
//! all steps, the slots allocated to sequences but holding no token, divided by the
//! slots of the blocks in use (internal fragmentation of the last block of each
//! sequence; under `--kv-layout contiguous` also every reserved slot not yet used). The
//! JSON keys are a contract for scripts.
//!
//! `--kv-layout paged,contiguous` runs every concurrency level under each layout with the
//! same KV blocks: the contiguous layout reserves `max_model_len` slots per sequence at
//! admission and shares nothing, so the pair shows what paging buys (sequences that fit
//! at once, throughput). The cache is sized by `--kv-blocks`, `--memory-budget` or
//! `--memory-utilization` (a share of physical memory, then the budget path); the
//! start-up budget is printed to stdout in text mode and to stderr with `--format json`.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use llmem_engine::cache::block_manager::KvLayout;
use llmem_engine::engine::scheduler::StopConditions;
use llmem_engine::engine::{BudgetReport, Engine, EngineConfig, KvSizing, RequestId};
use llmem_engine::model::Model;
use llmem_engine::parallel::spec::ParallelSpec;
use llmem_engine::sample::sampler::{SamplingParams, SplitMix64};
use serde_json::{json, Value};

use super::load::DtypeArg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    Text,
    Json,
}

/// `--kv-layout` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvLayoutArg {
    Paged,
    Contiguous,
}

impl KvLayoutArg {
    fn layout(self) -> KvLayout {
        match self {
            KvLayoutArg::Paged => KvLayout::Paged,
            KvLayoutArg::Contiguous => KvLayout::Contiguous,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A Hugging Face model directory, a llama .gguf file, or the built-in `smollm2-135m`.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Concurrent requests per run, comma-separated: one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32",
          value_parser = super::positive_arg)]
    pub concurrency: Vec<u64>,
    /// Prompt length of every request, in tokens.
    #[arg(long, default_value_t = 128, value_parser = super::positive_arg)]
    pub prompt_tokens: u64,
    /// Tokens generated per request (EOS is ignored).
    #[arg(long, default_value_t = 64, value_parser = super::positive_arg)]
    pub gen_tokens: u64,
    /// Mixed lengths: each request's prompt length is drawn uniformly from
    /// 1..=2*P-1 and its generated length from 1..=2*G-1 (P, G: --prompt-tokens,
    /// --gen-tokens, which stay the means; seeded by --seed), instead of all at P and G.
    #[arg(long)]
    pub mixed_lengths: bool,
    #[command(flatten)]
    pub kv: super::kv::KvArgs,
    /// KV cache layout(s), comma-separated: every concurrency runs under each.
    /// `contiguous` reserves --max-model-len slots per sequence and shares nothing.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "paged")]
    pub kv_layout: Vec<KvLayoutArg>,
    /// Weight dtype (see `llmem generate --help`). Default: f32 for a model directory,
    /// each tensor as stored for a .gguf file and the built-in model's Q4_1 GGUF.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = BenchFormat::Text)]
    pub format: BenchFormat,
    /// Write memory per component and rank after every engine step to FILE (CSV: KV in
    /// use, weights, the pass's measured and estimated activations, preemptions).
    #[arg(long, value_name = "FILE")]
    pub memory_trace: Option<std::path::PathBuf>,
    /// Draw that trace as an SVG chart in FILE (one panel per run and rank).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub parallel: super::ParallelArgs,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

/// What each run's engine is built from: the loaded model, or the parts every rank of
/// a TP/PP grid loads its shard from.
// One per `llmem bench` run: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Single(Model),
    Parallel {
        shape: llmem_planner::ModelShape,
        /// What `--model` said (a directory, built-in name or .gguf file), or `None`
        /// for seeded random weights.
        model: Option<String>,
        seed: u64,
        /// How every rank stores its shard.
        format: llmem_engine::weights::quant::WeightFormat,
        spec: ParallelSpec,
        /// `--micro-batches` under PP.
        micro_batches: usize,
        /// A GGUF run as stored: its tensor table (the planner's per-rank bytes).
        stored: Option<std::sync::Arc<Vec<llmem_planner::StoredTensor>>>,
    },
}

impl Source {
    fn engine(&self, config: EngineConfig) -> anyhow::Result<Engine> {
        Ok(match self {
            Source::Single(model) => Engine::new(model.clone(), config)?,
            Source::Parallel {
                shape,
                model,
                seed,
                format,
                spec,
                micro_batches,
                ..
            } => {
                let weights = match model {
                    Some(m) => super::load::open_model(m)?.weights,
                    None => llmem_engine::weights::files::WeightFiles::random(*seed),
                };
                let mut engine = Engine::new_parallel_with(shape, weights, format, *spec, config)?;
                engine.set_micro_batches(*micro_batches)?;
                engine
            }
        })
    }
}

/// Nearest-rank percentile of `values` (sorted here); 0 when empty.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// One benchmark request: random prompt token ids and the tokens it generates.
struct BenchRequest {
    prompt: Vec<u32>,
    gen: usize,
}

/// `count` seeded requests of `prompt_len` + `gen` tokens, or with `mixed`, of lengths
/// drawn uniformly from `1..=2 * prompt_len - 1` and `1..=2 * gen - 1`, each request cut
/// to `max_len` tokens in all (prompt first, at least one token generated). Prompt ids
/// are drawn uniformly from the vocabulary; the same seed gives the same requests.
fn random_requests(
    count: usize,
    (prompt_len, gen): (usize, usize),
    mixed: bool,
    max_len: usize,
    vocab: u64,
    seed: u64,
) -> Vec<BenchRequest> {
    let mut rng = SplitMix64::new(seed ^ 0x6c65_6e67_7468_7321);
    let mut draw = |mean: usize| 1 + (rng.next_u64() % (2 * mean as u64 - 1)) as usize;
    let lengths: Vec<(usize, usize)> = (0..count)
        .map(|_| {
            if mixed {
                let p = draw(prompt_len).min(max_len.saturating_sub(1).max(1));
                let g = draw(gen).min(max_len.saturating_sub(p).max(1));
                (p, g)
            } else {
                (prompt_len, gen)
            }
        })
        .collect();
    let mut rng = SplitMix64::new(seed);
    lengths
        .into_iter()
        .map(|(p, g)| BenchRequest {
            prompt: (0..p).map(|_| (rng.next_u64() % vocab) as u32).collect(),
            gen: g,
        })
        .collect()
}

/// One run: `requests.len()` requests at once through a fresh engine.
/// The driver's reading at the end of a GPU run and its measured activation peak.
type GpuAtEnd = (llmem_engine::device::DeviceMemory, Option<u64>);

/// Returns the run's JSON and, on a GPU, the driver's memory reading at the end of the
/// run, while its engine (weights, KV cache) is still alive, with the activation peak
/// measured from the memory pool's high-water mark.
fn run_one(
    source: &Source,
    config: EngineConfig,
    requests: &[BenchRequest],
    device: &candle_core::Device,
    trace: Option<(&mut Vec<super::trace::TraceRow>, usize)>,
) -> anyhow::Result<(Value, Option<GpuAtEnd>)> {
    let mut engine = source.engine(config)?;
    // On a GPU: the pool's high-water mark from here on, over the weights and KV already
    // allocated, is the run's measured activation peak.
    let pool_base = if llmem_engine::device::reset_pool_high_water(device) {
        llmem_engine::device::pool_usage(device)
    } else {
        None
    };
    let bar = super::live_bar(
        requests.iter().map(|r| r.gen as u64).sum(),
        &format!("concurrency {} {}", requests.len(), config.kv_layout.name()),
    );
    let start = Instant::now();
    for r in requests {
        let stop = StopConditions {
            max_tokens: r.gen,
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        };
        engine.add_request(r.prompt.clone(), SamplingParams::default(), stop)?;
    }
    let label = format!("concurrency {} {}", requests.len(), config.kv_layout.name());
    let mut trace = trace;
    let mut last_token_at: HashMap<RequestId, f64> = HashMap::new();
    let mut ttft_ms = Vec::new();
    let mut itl_ms = Vec::new();
    let mut generated = 0usize;
    let (mut wasted, mut allocated) = (0u64, 0u64);
    while engine.has_work() {
        let outputs = engine.step()?;
        let now = start.elapsed().as_secs_f64() * 1e3;
        if let Some((rows, run)) = trace.as_mut() {
            rows.extend(super::trace::sample(&engine, *run, &label, now));
        }
        for o in &outputs {
            generated += 1;
            match last_token_at.insert(o.id, now) {
                Some(prev) => itl_ms.push(now - prev),
                None => ttft_ms.push(now),
            }
        }
        let s = engine.stats();
        wasted += s.wasted_slots as u64;
        allocated += (s.blocks_used * config.block_size) as u64;
        bar.set_position(generated as u64);
        bar.set_message(super::memory_line(&s, engine.block_bytes()));
    }
    bar.finish_and_clear();
    let at_end = llmem_engine::device::device_memory(device);
    let activation_peak_measured = match (pool_base, llmem_engine::device::pool_usage(device)) {
        (Some(base), Some(end)) => Some(end.high_water_bytes.saturating_sub(base.current_bytes)),
        _ => None,
    };
    let wall_s = start.elapsed().as_secs_f64();
    let s = engine.stats();
    // The busiest rank's time in collectives (waiting for its peers included), as a
    // share of the run's wall time: what TP costs on this interconnect.
    let comm = engine.comm_stats();
    let busiest = comm
        .iter()
        .max_by(|a, b| a.total_seconds().total_cmp(&b.total_seconds()))
        .copied()
        .unwrap_or_default();
    let spec = engine.parallel_spec();
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    let memory = rank_memory_json(&engine);
    Ok((
        json!({
            "memory_per_rank": memory,
            "concurrency": requests.len(),
            "kv_layout": config.kv_layout.name(),
            "generated_tokens": generated,
            "wall_s": wall_s,
            "aggregate_tokens_per_s": if wall_s > 0.0 { generated as f64 / wall_s } else { 0.0 },
            "ttft_ms": { "p50": percentile(&mut ttft_ms, 50.0), "p99": percentile(&mut ttft_ms, 99.0) },
            "itl_ms": { "p50": percentile(&mut itl_ms, 50.0), "p99": percentile(&mut itl_ms, 99.0) },
            "steps": s.steps,
            "peak_running_sequences": s.peak_running,
            "peak_kv_blocks_used": s.peak_blocks_used,
            "kv_blocks_total": s.blocks_total,
            "kv_waste_fraction": ratio(wasted, allocated),
            "preemptions": s.preemptions,
            "prefix_cache_hit_rate": ratio(s.prefix_hit_tokens, s.prefix_query_tokens),
            "tp": spec.tp,
            "pp": spec.pp,
            "micro_batches": engine.micro_batches(),
            "all_reduce_count": busiest.all_reduce_count,
            "all_reduce_s": busiest.all_reduce_nanos as f64 * 1e-9,
            "all_gather_s": busiest.all_gather_nanos as f64 * 1e-9,
            "comm_share": if wall_s > 0.0 { busiest.total_seconds() / wall_s } else { 0.0 },
        }),
        at_end.map(|m| (m, activation_peak_measured)),
    ))
}

/// Per rank, at the end of a run with its engine alive: the engine's byte counts of
/// weights and KV beside the heap the counting allocator attributes to them, and the
/// largest pass working set measured beside the engine's estimate. `null` measured
/// figures where the allocator is not installed (a build without `heap-stats`) or the
/// memory is a GPU's.
fn rank_memory_json(engine: &Engine) -> Value {
    use llmem_engine::heap::{self, Component};
    let counted = super::trace::heap_counted(engine);
    let measured = super::trace::measured_activations(engine);
    let estimates = engine.rank_activation_bytes();
    engine
        .rank_memory()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let heap_of = |c| counted.then(|| heap::live(c, i));
            json!({
                "rank": i,
                "stage": r.stage,
                "tp_rank": r.tp_rank,
                "weights_bytes": r.weights_bytes,
                "weights_heap_bytes": heap_of(Component::Weights),
                "kv_cache_bytes": r.kv_cache_bytes,
                "kv_cache_heap_bytes": heap_of(Component::KvCache),
                "activation_peak_measured_bytes": measured.as_ref().and_then(|m| m.get(i)).map(|m| m.1),
                "activation_peak_estimate_bytes": estimates.get(i).map(|e| e.1),
            })
        })
        .collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let kv_dtype = args.kv.kv_dtype_for(args.dtype);
    let parallel = args.parallel.is_parallel();
    let spec = llmem_engine::device::DeviceSpec::parse(&args.runtime.device)?;
    if parallel && spec.is_cuda() {
        anyhow::bail!(
            "--tp/--pp run on CPU rank threads; on CUDA they are not wired yet \
             (NcclComm compiles but no runner uses it)"
        );
    }
    let opened = args.runtime.open_device()?;
    let on_gpu = opened.after.is_some();
    // With --memory-utilization: the fraction and the memory it applies to, physical
    // memory on the CPU, the device's total on a GPU (as vLLM's gpu_memory_utilization).
    let utilization = args.kv.utilization(&opened)?;
    // On a GPU the runtime overhead defaults to the CUDA context + libraries measured
    // at start-up; on the CPU to 0.
    let runtime_overhead = args.kv.overhead(&opened, 0);
    let (model, label, dir) = {
        // Under --tp/--pp the driver's whole copy of the model (for its shape and the
        // report) is no rank's: its heap counts on the last slot, not on rank 0's.
        let _driver = parallel.then(|| {
            llmem_engine::heap::rank_scope(
                llmem_engine::heap::Component::Other,
                llmem_engine::heap::MAX_RANKS - 1,
            )
        });
        load_model(&args, &opened.device)?
    };
    let model = &model;
    let source = if parallel {
        let shape = model.shape().clone();
        let spec = args.parallel.spec(&shape)?;
        let (format, stored) = match dir {
            Some(_) => {
                let weights = super::load::open_model(&args.model)?.weights;
                let format = super::load::shard_format(args.dtype, &weights);
                let stored = super::load::stored_tensors(&format, &weights)?;
                (format, stored)
            }
            None => (
                llmem_engine::weights::quant::WeightFormat::new(
                    args.dtype.unwrap_or(DtypeArg::F32).precision(),
                )?,
                None,
            ),
        };
        Source::Parallel {
            shape,
            model: dir.as_ref().map(|_| args.model.clone()),
            seed: args.seed,
            format,
            spec,
            micro_batches: args.parallel.micro_batches(),
            stored,
        }
    } else {
        Source::Single(model.clone())
    };
    let (prompt_len, gen) = (args.prompt_tokens as usize, args.gen_tokens as usize);
    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1) as usize;
    let block_size = args.kv.block_size as usize;
    let max_model_len = match args.kv.max_model_len {
        Some(l) => l as usize,
        None if args.mixed_lengths => (2 * prompt_len + 2 * gen - 2).min(model.max_context()),
        None => (prompt_len + gen).min(model.max_context()),
    };
    let mut config = EngineConfig {
        block_size,
        num_blocks: 0,
        kv_dtype,
        max_num_seqs: max_concurrency,
        max_batched_tokens: args.kv.max_batched_tokens as usize,
        max_model_len,
        kv_layout: KvLayout::Paged,
    };
    // Without a size: every sequence of the largest run at full length, no preemption.
    let sizing = args.kv.sizing(
        utilization,
        KvSizing::Blocks(max_concurrency * max_model_len.div_ceil(block_size)),
    );
    // Under TP/PP a budget is per rank: every rank's weights, activations and overhead
    // come off its own, and the shared blocks are the fewest any rank fits.
    let (num_blocks, report, per_rank) = match (&source, sizing) {
        (
            Source::Parallel {
                shape,
                format,
                spec,
                stored,
                ..
            },
            KvSizing::Budget(b),
        ) => {
            let pb = llmem_engine::engine::parallel_budget(
                shape,
                format,
                stored.clone(),
                *spec,
                &config,
                b,
                runtime_overhead,
            )
            .context("sizing every rank's KV cache")?;
            (pb.num_blocks, None, Some(pb))
        }
        _ => {
            let (n, r) = sizing
                .resolve(model, &config, runtime_overhead)
                .context("sizing the KV cache")?;
            (n, r, None)
        }
    };
    config.num_blocks = num_blocks;
    let mut startup = match &per_rank {
        Some(pb) => pb.to_string(),
        None => startup_text(report.as_ref(), utilization, &config, model),
    };
    if on_gpu {
        startup = format!("{}\n{startup}", device_text(&opened));
    }
    if parallel {
        // One engine just for the report: the per-rank bytes do not depend on the run.
        let engine = source.engine(EngineConfig {
            max_num_seqs: max_concurrency,
            ..config
        })?;
        startup = format!("{startup}\n{}", super::rank_report(&engine));
    }
    match args.format {
        BenchFormat::Text => println!("{startup}"),
        BenchFormat::Json => eprintln!("{startup}"),
    }
    let requests = random_requests(
        max_concurrency,
        (prompt_len, gen),
        args.mixed_lengths,
        max_model_len,
        model.shape().vocab_size,
        args.seed,
    );
    let mut layouts: Vec<KvLayout> = Vec::new();
    for l in &args.kv_layout {
        if !layouts.contains(&l.layout()) {
            layouts.push(l.layout());
        }
    }
    let reserve = max_model_len.div_ceil(block_size);
    if layouts.contains(&KvLayout::Contiguous) && num_blocks < reserve {
        anyhow::bail!(
            "--kv-layout contiguous reserves {reserve} blocks per sequence (max_model_len = \
             {max_model_len} / block_size = {block_size}) but the cache has only {num_blocks}; \
             give it more --kv-blocks or lower --max-model-len"
        );
    }
    let tracing = args.memory_trace.is_some() || args.plot.is_some();
    // Open the output files now, so a bad path fails before the runs, not after them.
    let open = |path: &Option<std::path::PathBuf>, what: &str| -> anyhow::Result<_> {
        path.as_ref()
            .map(|p| {
                std::fs::File::create(p)
                    .with_context(|| format!("{what} {}: cannot create the file", p.display()))
                    .map(|f| (p.clone(), f))
            })
            .transpose()
    };
    let trace_file = open(&args.memory_trace, "--memory-trace")?;
    let plot_file = open(&args.plot, "--plot")?;
    let mut trace_rows = Vec::new();
    let mut runs = Vec::new();
    let mut ledgers = Vec::new();
    for &c in &args.concurrency {
        let c = c as usize;
        for &kv_layout in &layouts {
            let run_config = EngineConfig {
                max_num_seqs: c,
                kv_layout,
                ..config
            };
            let device = model.device();
            let run_index = runs.len();
            let trace = tracing.then_some((&mut trace_rows, run_index));
            let (mut run, at_end) = run_one(&source, run_config, &requests[..c], device, trace)
                .with_context(|| {
                    format!(
                        "benchmark run at concurrency {c}, {} layout",
                        kv_layout.name()
                    )
                })?;
            if on_gpu {
                let ledger = gpu_ledger(&opened, at_end, model, &run_config, c, prompt_len + gen);
                run["device_memory"] = ledger.json();
                ledgers.push((c, ledger));
            }
            if args.format == BenchFormat::Text {
                println!(
                    "concurrency {:>3} {:<10}: {:>8.1} tok/s  ttft p50 {:>8.1} ms p99 {:>8.1} ms  \
                 itl p50 {:>7.1} ms p99 {:>7.1} ms  peak running {:>3}  peak blocks {}/{}  \
                 waste {:.3}  preemptions {}{}",
                    c,
                    kv_layout.name(),
                    run["aggregate_tokens_per_s"].as_f64().unwrap_or(0.0),
                    run["ttft_ms"]["p50"].as_f64().unwrap_or(0.0),
                    run["ttft_ms"]["p99"].as_f64().unwrap_or(0.0),
                    run["itl_ms"]["p50"].as_f64().unwrap_or(0.0),
                    run["itl_ms"]["p99"].as_f64().unwrap_or(0.0),
                    run["peak_running_sequences"],
                    run["peak_kv_blocks_used"],
                    run["kv_blocks_total"],
                    run["kv_waste_fraction"].as_f64().unwrap_or(0.0),
                    run["preemptions"],
                    if parallel {
                        format!(
                            "  TP {} x PP {}: collectives {:.1}% of wall ({} all-reduces)",
                            run["tp"],
                            run["pp"],
                            100.0 * run["comm_share"].as_f64().unwrap_or(0.0),
                            run["all_reduce_count"]
                        )
                    } else {
                        String::new()
                    },
                );
            }
            runs.push(run);
        }
    }
    for (file, text) in [
        (trace_file, super::trace::csv(&trace_rows)),
        (plot_file, super::trace::svg(&trace_rows)),
    ] {
        if let Some((path, mut f)) = file {
            use std::io::Write as _;
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} trace rows)", path.display(), trace_rows.len());
        }
    }
    if args.format == BenchFormat::Text {
        for (c, ledger) in &ledgers {
            println!(
                "device memory after the concurrency {c} run:\n{}",
                ledger.text()
            );
        }
    }
    if args.format == BenchFormat::Json {
        let budget = report.map(|r| {
            json!({
                "budget_bytes": r.budget_bytes,
                "weights_bytes": r.weights_bytes,
                "activation_bytes": r.activation_bytes,
                "runtime_overhead_bytes": r.runtime_overhead_bytes,
                "kv_cache_bytes": r.kv_cache_bytes,
                "unused_bytes": r.unused_bytes,
                "max_concurrency": r.max_concurrency,
                "planned": r.planned.as_ref().ok().map(|p| json!({
                    "weights_bytes": p.weights_bytes,
                    "activation_bytes": p.activation_bytes,
                    "kv_bytes_per_token": p.kv_bytes_per_token,
                    "max_concurrency": p.max_concurrency,
                })),
            })
        });
        let out = json!({
            "cpu_kernels": super::cpu_kernels(),
            "model": label,
            "random_weights": args.runtime.random_weights.is_some(),
            "device": opened.device_label(),
            "dtype": super::load::format_name(model),
            "kv_dtype": kv_dtype.name(),
            "block_size": block_size,
            "max_model_len": max_model_len,
            "max_batched_tokens": args.kv.max_batched_tokens,
            "prompt_tokens": prompt_len,
            "gen_tokens": gen,
            "mixed_lengths": args.mixed_lengths,
            "seed": args.seed,
            "memory_utilization": args.kv.memory_utilization,
            "kv_cache_bytes": num_blocks as u64
                * llmem_engine::cache::paged::block_bytes(model.shape(), block_size, kv_dtype),
            "budget": budget,
            "budget_per_rank": per_rank.as_ref().map(|pb| json!({
                "budget_bytes": pb.budget_bytes,
                "runtime_overhead_bytes": pb.runtime_overhead_bytes,
                "num_blocks": pb.num_blocks,
                "ranks": pb.ranks.iter().map(|r| json!({
                    "stage": r.stage,
                    "tp_rank": r.tp_rank,
                    "weights_bytes": r.weights_bytes,
                    "activation_bytes": r.activation_bytes,
                    "block_bytes": r.block_bytes,
                    "blocks_fit": r.blocks_fit,
                })).collect::<Vec<_>>(),
            })),
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// The device line of a GPU run: name, total memory, what others used before us, and
/// the measured CUDA context + libraries.
fn device_text(d: &llmem_engine::device::OpenedDevice) -> String {
    use llmem_planner::human_bytes as h;
    let (Some(before), Some(after)) = (d.before, d.after) else {
        return "device: cpu".to_string();
    };
    format!(
        "device: {}, {} total, {} in use before llmem (other processes), CUDA context + \
         cuBLAS measured at start-up: {} (runtime overhead of the budget)",
        d.device_label(),
        h(after.total_bytes),
        h(before.used_bytes()),
        h(d.context_bytes()),
    )
}

/// Device memory by component after a run: the driver's `used` beside the engine's
/// own accounting, the rest unaccounted.
struct GpuLedger {
    device_used_bytes: u64,
    device_total_bytes: u64,
    others_bytes: u64,
    context_bytes: u64,
    weights_bytes: u64,
    kv_cache_bytes: u64,
    /// The engine's activation estimate of the largest pass (not a measured peak:
    /// allocations are freed at the end of every step).
    activation_bytes: u64,
    /// The memory pool's high-water mark over the run minus what was in use when it
    /// started (weights, KV): every transient tensor the passes allocated.
    activation_peak_measured_bytes: Option<u64>,
    planned: Option<llmem_engine::engine::PlannedTerms>,
}

impl GpuLedger {
    fn accounted(&self) -> u64 {
        self.others_bytes + self.context_bytes + self.weights_bytes + self.kv_cache_bytes
    }

    /// used - (others + context + weights + KV); activations are transient, so they are
    /// shown but not subtracted from a between-steps reading.
    fn unaccounted(&self) -> i128 {
        self.device_used_bytes as i128 - self.accounted() as i128
    }

    fn json(&self) -> Value {
        json!({
            "device_used_bytes": self.device_used_bytes,
            "device_total_bytes": self.device_total_bytes,
            "other_processes_bytes": self.others_bytes,
            "cuda_context_bytes": self.context_bytes,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_estimate_bytes": self.activation_bytes,
            "activation_peak_measured_bytes": self.activation_peak_measured_bytes,
            "unaccounted_bytes": self.unaccounted(),
            "planned": self.planned.as_ref().map(|p| json!({
                "weights_bytes": p.weights_bytes,
                "activation_bytes": p.activation_bytes,
                "kv_cache_bytes": p.kv_cache_bytes,
                "kv_bytes_per_token": p.kv_bytes_per_token,
            })),
        })
    }

    fn text(&self) -> String {
        use llmem_planner::human_bytes as h;
        let planned = |v: Option<u64>| v.map_or("-".to_string(), h);
        let p = self.planned.as_ref();
        let unaccounted = self.unaccounted();
        format!(
            "  component            measured/engine      planner\n\
             \x20 other processes      {:>12}\n\
             \x20 CUDA context+libs    {:>12}\n\
             \x20 weights              {:>12}  {:>12}\n\
             \x20 KV cache             {:>12}  {:>12} (demand of the run)\n\
             \x20 activations (est.)   {:>12}  {:>12}\n\
             \x20 activation peak      {:>12} (measured: memory pool high-water mark)\n\
             \x20 unaccounted          {:>12}\n\
             \x20 device used/total    {:>12} / {}",
            h(self.others_bytes),
            h(self.context_bytes),
            h(self.weights_bytes),
            planned(p.map(|p| p.weights_bytes)),
            h(self.kv_cache_bytes),
            planned(p.map(|p| p.kv_cache_bytes)),
            h(self.activation_bytes),
            planned(p.map(|p| p.activation_bytes)),
            self.activation_peak_measured_bytes
                .map_or("-".to_string(), h),
            if unaccounted < 0 {
                format!("-{}", h(unaccounted.unsigned_abs() as u64))
            } else {
                h(unaccounted as u64)
            },
            h(self.device_used_bytes),
            h(self.device_total_bytes),
        )
    }
}

/// The driver's reading at the end of a run (engine alive) beside the engine's figures.
fn gpu_ledger(
    d: &llmem_engine::device::OpenedDevice,
    at_end: Option<GpuAtEnd>,
    model: &Model,
    config: &EngineConfig,
    concurrency: usize,
    seq_len: usize,
) -> GpuLedger {
    let now = at_end.map(|(m, _)| m);
    let activation_peak_measured_bytes = at_end.and_then(|(_, p)| p);
    let kv = config.num_blocks as u64
        * llmem_engine::cache::paged::block_bytes(
            model.shape(),
            config.block_size,
            config.kv_dtype,
        );
    let pass = config.max_batched_tokens.min(concurrency * seq_len).max(1);
    let total = now.map_or(0, |m| m.total_bytes);
    let planned = llmem_engine::engine::planned_terms(model, config, total, d.context_bytes()).ok();
    GpuLedger {
        device_used_bytes: now.map_or(0, |m| m.used_bytes()),
        device_total_bytes: now.map_or(0, |m| m.total_bytes),
        others_bytes: d.before.map_or(0, |m| m.used_bytes()),
        context_bytes: d.context_bytes(),
        weights_bytes: model.weights_bytes(),
        kv_cache_bytes: kv,
        activation_bytes: model.paged_activation_peak_bytes(pass, concurrency),
        activation_peak_measured_bytes,
        planned,
    }
}

/// The model of `--model`, or of `--random-weights` (seeded by `--seed`), on `device`;
/// with its label for the report and its directory (`None` for random weights).
fn load_model(
    args: &BenchArgs,
    device: &candle_core::Device,
) -> anyhow::Result<(Model, String, Option<std::path::PathBuf>)> {
    match args.runtime.random_shape()? {
        Some(shape) => {
            let start = Instant::now();
            let fmt = llmem_engine::weights::quant::WeightFormat {
                precision: args.dtype.unwrap_or(DtypeArg::F32).precision(),
                keep_embeddings: false,
                as_stored: false,
            };
            let weights = llmem_engine::weights::files::WeightFiles::random(args.seed);
            let model = Model::load_with(&shape, &weights, &fmt, device)
                .with_context(|| format!("building random weights of {}", shape.name))?;
            eprintln!(
                "random weights: {} ({} in {:.1} s, seed {})",
                shape.name,
                llmem_planner::human_bytes(model.weights_bytes()),
                start.elapsed().as_secs_f64(),
                args.seed
            );
            Ok((model, format!("random:{}", shape.name), None))
        }
        None => {
            let loaded = super::load::load_on(&args.model, args.dtype, false, device)?;
            let label = loaded.dir.display().to_string();
            Ok((loaded.model, label, Some(loaded.dir)))
        }
    }
}

/// The start-up budget: the planner's terms for a budget, or the block count given.
fn startup_text(
    report: Option<&BudgetReport>,
    utilization: Option<(f64, u64)>,
    config: &EngineConfig,
    model: &Model,
) -> String {
    match report {
        Some(r) => match utilization {
            Some((f, total)) => format!(
                "--memory-utilization {f} x physical memory {} (MemTotal)\n{r}",
                llmem_planner::human_bytes(total)
            ),
            None => r.to_string(),
        },
        None => {
            let per_block = llmem_engine::cache::paged::block_bytes(
                model.shape(),
                config.block_size,
                config.kv_dtype,
            );
            let bytes = per_block.saturating_mul(config.num_blocks as u64);
            let per_seq = config.max_model_len.div_ceil(config.block_size).max(1);
            format!(
                "KV cache {} ({} blocks x {} tokens = {} tokens); weights {}; sequences of \
                 max_model_len = {} tokens that fit at once: {}",
                llmem_planner::human_bytes(bytes),
                config.num_blocks,
                config.block_size,
                config.num_blocks * config.block_size,
                llmem_planner::human_bytes(model.weights_bytes()),
                config.max_model_len,
                config.num_blocks / per_seq,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&mut v, 50.0), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }

    #[test]
    fn prompts_are_seeded() {
        let ids = |n, mixed, seed| -> Vec<(Vec<u32>, usize)> {
            random_requests(n, (4, 3), mixed, 64, 100, seed)
                .into_iter()
                .map(|r| (r.prompt, r.gen))
                .collect()
        };
        assert_eq!(ids(2, false, 1), ids(2, false, 1));
        assert_ne!(ids(1, false, 1), ids(1, false, 2));
        assert!(ids(3, false, 1)
            .iter()
            .all(|(p, g)| p.len() == 4 && *g == 3));
        // Mixed: lengths within 1..=2P-1 and 1..=2G-1, not all equal, reproducible.
        let mixed = ids(64, true, 5);
        assert_eq!(mixed, ids(64, true, 5));
        assert!(mixed
            .iter()
            .all(|(p, g)| (1..=7).contains(&p.len()) && (1..=5).contains(g)));
        assert!(mixed.iter().any(|(p, _)| p.len() != mixed[0].0.len()));
        assert!(mixed.iter().any(|(_, g)| g != &mixed[0].1));
        // Cut to max_len in all: the prompt first, one generated token at least.
        let cut = random_requests(64, (4, 3), true, 6, 100, 5);
        assert!(cut
            .iter()
            .all(|r| r.prompt.len() + r.gen <= 6 && r.gen >= 1));
    }
}
