//! `llmem serve`: the main job. One engine thread runs continuous batching over the
//! paged KV cache; an axum server in front speaks OpenAI's API, streams tokens as
//! server-sent events, and shows live, per component, where memory went next to what the
//! planner predicted (`/v1/memory`, `/metrics`, the dashboard at `/`).
//!
//! Start-up: measure the process's resident set before anything loads (the CPU's
//! runtime overhead), load the model, size the KV cache from the memory budget with the
//! planner's arithmetic (printed line by line, planned beside measured), allocate it
//! resident, spawn the engine thread, bind (127.0.0.1 unless `--host` says otherwise),
//! print `listening on http://ADDR` and serve. Ctrl-C stops accepting connections, lets
//! running requests finish, and exits; a second Ctrl-C exits at once.

pub mod api;
pub mod ledger;
pub mod listen;
pub mod metrics;
pub mod untrusted;
pub mod worker;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use llmem_engine::cache::block_manager::KvLayout;
use llmem_engine::engine::{Engine, EngineConfig, KvSizing};
use llmem_planner::human_bytes;

use crate::cmd::load::{load_parts, shard_format, weight_format, DtypeArg};
use api::AppState;
use ledger::Ledger;
use llmem_engine::model::Model;
use metrics::{Shared, Snapshot};

/// Default memory budget when none of --memory-budget, --memory-utilization and
/// --kv-blocks is given: room for the default model in f32 and a few thousand tokens of
/// KV, without taking a shared machine's memory.
pub const DEFAULT_MEMORY_BUDGET: &str = "2GiB";

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A Hugging Face model directory, a llama .gguf file (run with its tensors as stored),
    /// or the built-in `smollm2-135m` (fetched on first use).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The model id clients send and see (default: the --model name, or the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Weight dtype: a float (weights and activations) or a GGUF block format
    /// (activations in f32). Default: f32 for a model directory; for a .gguf file and
    /// the built-in model (its shipped Q4_1 GGUF), each tensor as the file stores it
    /// (--dtype loads the built-in model's f32 conversion, or requantizes a .gguf file).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// With a block format, keep the embedding and LM head at f16.
    #[arg(long)]
    pub keep_embeddings: bool,
    #[command(flatten)]
    pub kv: crate::cmd::kv::KvArgs,
    /// Sequences in one step at most.
    #[arg(long, default_value_t = 32, value_parser = crate::cmd::positive_arg)]
    pub max_num_seqs: u64,
    /// Requests allowed to wait for a sequence slot; more get 503 with Retry-After (0: a
    /// request is served only if a slot is free now).
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Address to bind. The default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint except /health and the page.
    #[arg(long, env = "LLMEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value = "1MiB", value_parser = crate::cmd::bytes_arg)]
    pub max_body_bytes: u64,
    /// Seconds a client has to send a request's head; also how long a kept-alive
    /// connection may sit idle. Then the connection is closed.
    #[arg(long, default_value_t = 10, value_parser = crate::cmd::positive_arg)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body (else 408).
    #[arg(long, default_value_t = 30, value_parser = crate::cmd::positive_arg)]
    pub body_timeout: u64,
    /// Seconds a request may run (waiting included) before it is stopped: 504 for a
    /// whole response, an error event then `[DONE]` for a stream. Default: no limit.
    #[arg(long, value_parser = crate::cmd::positive_arg)]
    pub request_timeout: Option<u64>,
    /// Open connections at most; one more gets 503 with Retry-After and is closed.
    #[arg(long, default_value_t = 512, value_parser = crate::cmd::positive_arg)]
    pub max_connections: u64,
    #[command(flatten)]
    pub parallel: crate::cmd::ParallelArgs,
    /// Where the model, its KV cache and activations live: cpu, cuda or cuda:N (CUDA
    /// needs a build with the `cuda` feature: scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// A running engine thread and the state the router serves.
pub struct Server {
    pub state: Arc<AppState>,
    pub worker: std::thread::JoinHandle<()>,
    /// The start-up budget text.
    pub startup: String,
}

/// What start-up decided: the engine, its sizing text and the plan beside it.
struct Built {
    engine: Engine,
    startup: String,
    overhead: u64,
    planned: Result<llmem_engine::engine::PlannedTerms, String>,
}

/// One model in this process: size the KV cache from the budget with the planner's
/// arithmetic, then allocate it.
fn build_single(
    args: &ServeArgs,
    model: Model,
    mut config: EngineConfig,
    baseline_rss: u64,
    opened: &llmem_engine::device::OpenedDevice,
) -> anyhow::Result<Built> {
    // On a GPU: a share of the device's total, and the CUDA context measured at start-up
    // as the overhead; on the CPU: physical memory and the resident set before loading.
    let utilization = args.kv.utilization(opened)?;
    let overhead = args.kv.overhead(opened, baseline_rss);
    let default_budget =
        llmem_planner::parse_bytes(DEFAULT_MEMORY_BUDGET).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sizing = args
        .kv
        .sizing(utilization, KvSizing::Budget(default_budget));
    let budget = match sizing {
        KvSizing::Budget(b) => Some(b),
        KvSizing::Blocks(_) => None,
    };
    let (num_blocks, report) = sizing
        .resolve(&model, &config, overhead)
        .context("sizing the KV cache")?;
    config.num_blocks = num_blocks;
    // With --kv-blocks the plan is for the budget those blocks imply.
    let planned_budget = match budget {
        Some(b) => b,
        None => {
            let per_block = llmem_engine::cache::paged::block_bytes(
                model.shape(),
                config.block_size,
                config.kv_dtype,
            );
            model.weights_bytes()
                + llmem_engine::engine::pass_activation_bytes(&model, &config).0
                + overhead
                + per_block.saturating_mul(num_blocks as u64)
        }
    };
    let planned = llmem_engine::engine::planned_terms(&model, &config, planned_budget, overhead);
    let mut startup = String::new();
    if let Some((f, total)) = utilization {
        let of = if opened.after.is_some() {
            "the device's total"
        } else {
            "physical memory (MemTotal)"
        };
        startup.push_str(&format!(
            "--memory-utilization {f} x {of} {}\n",
            human_bytes(total)
        ));
    }
    match &report {
        Some(r) => startup.push_str(&r.to_string()),
        None => startup.push_str(&format!(
            "KV cache: {num_blocks} blocks given (--kv-blocks); weights {}",
            human_bytes(model.weights_bytes())
        )),
    }
    let engine = Engine::new(model, config).context("allocating the KV cache")?;
    Ok(Built {
        engine,
        startup,
        overhead,
        planned,
    })
}

/// Load the model, size and allocate the cache, start the engine thread.
pub fn start(args: &ServeArgs) -> anyhow::Result<Server> {
    let spec = llmem_engine::device::DeviceSpec::parse(&args.device)?;
    if spec.is_cuda() && args.parallel.is_parallel() {
        anyhow::bail!(
            "--tp/--pp run on CPU rank threads; on CUDA they are not wired yet \
             (NcclComm compiles but no runner uses it)"
        );
    }
    // This thread's blocks (tokenizer, settings) are the runtime's; loading counts the
    // weights and the KV cache as theirs (`llmem_engine::heap`).
    llmem_engine::heap::tag_thread(llmem_engine::heap::Component::Runtime, 0);
    let opened = llmem_engine::device::open_measured(spec)?;
    let baseline_rss = crate::procfs::process_rss_bytes().unwrap_or(0);
    let kv_dtype = args.kv.kv_dtype_for(args.dtype);
    let crate::cmd::load::ModelParts {
        path: dir,
        shape,
        weights,
        tokenizer,
        config: settings,
    } = if args.parallel.is_parallel() {
        // Ranks shard float weights: the f32 conversion, not the dequantized Q4_1.
        crate::cmd::load::open_model(&args.model)?
    } else {
        crate::cmd::load::open_model_for(&args.model, args.dtype)?
    };
    let is_gguf = weights.gguf().is_some();
    let max_model_len = match args.kv.max_model_len {
        Some(l) => l as usize,
        None => shape.max_position_embeddings as usize,
    };
    let config = EngineConfig {
        block_size: args.kv.block_size as usize,
        num_blocks: 0,
        kv_dtype,
        max_num_seqs: args.max_num_seqs as usize,
        max_batched_tokens: args.kv.max_batched_tokens as usize,
        max_model_len,
        kv_layout: KvLayout::Paged,
    };
    let built = if args.parallel.is_parallel() {
        let spec = args.parallel.spec(&shape)?;
        let fmt = shard_format(args.dtype, &weights);
        // Each rank sized from the budget (per rank, as the planner's per GPU): the blocks
        // are shared, so the grid takes the fewest any rank fits. --kv-blocks overrides.
        let overhead = args.kv.overhead(&opened, baseline_rss);
        // Without a size, the default budget is the whole process's, split evenly.
        let ranks = (spec.tp * spec.pp) as u64;
        let default_budget = llmem_planner::parse_bytes(DEFAULT_MEMORY_BUDGET)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            / ranks;
        let sizing = args.kv.sizing(
            args.kv.utilization(&opened)?,
            KvSizing::Budget(default_budget),
        );
        let (blocks, budget_text) = match sizing {
            KvSizing::Blocks(n) => (n, None),
            KvSizing::Budget(b) => {
                let stored = crate::cmd::load::stored_tensors(&fmt, &weights)?;
                let pb = llmem_engine::engine::parallel_budget(
                    &shape, &fmt, stored, spec, &config, b, overhead,
                )
                .context("sizing every rank's KV cache")?;
                (pb.num_blocks, Some(pb.to_string()))
            }
        };
        let config = EngineConfig {
            num_blocks: blocks,
            ..config
        };
        let mut engine = Engine::new_parallel_with(&shape, weights, &fmt, spec, config)
            .with_context(|| format!("loading {} across ranks", dir.display()))?;
        engine.set_micro_batches(args.parallel.micro_batches())?;
        let startup = match budget_text {
            Some(t) => format!("{t}\n{}", crate::cmd::rank_report(&engine)),
            None => crate::cmd::rank_report(&engine),
        };
        Built {
            engine,
            startup,
            overhead,
            planned: Err("per-rank plans are beside each rank".into()),
        }
    } else {
        let fmt = weight_format(&weights, &dir, args.dtype, args.keep_embeddings)?;
        let model = load_parts(&shape, &weights, &dir, &fmt, &opened.device)?;
        drop(weights);
        build_single(args, model, config, baseline_rss, &opened)?
    };
    let Built {
        engine,
        mut startup,
        overhead,
        planned,
    } = built;
    startup.push_str(&format!(
        "\nruntime overhead: {} ({})",
        human_bytes(overhead),
        if args.kv.runtime_overhead.is_some() {
            "given"
        } else {
            "measured: resident set before the model loaded"
        }
    ));
    if let Some(h) = engine.model().and_then(|m| m.huge_pages()) {
        startup.push_str(&format!("\n{}", huge_pages_text(&h)));
    }
    let model_id = args.served_model_name.clone().unwrap_or_else(|| {
        if llmem_engine::weights::hub::is_default_name(&args.model) {
            // The built-in model keeps its name, whichever of its files runs.
            args.model.clone()
        } else if is_gguf {
            dir.file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| args.model.clone())
        } else if std::path::Path::new(&args.model).is_dir() {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| args.model.clone())
        } else {
            args.model.clone()
        }
    });
    let parallel = engine.parallel_spec().tp * engine.parallel_spec().pp > 1;
    let planned_ranks = if parallel {
        engine.planned_rank_memory().ok()
    } else {
        None
    };
    let ranks = engine
        .rank_memory()
        .iter()
        .enumerate()
        .map(|(i, r)| ledger::RankLedger {
            stage: r.stage,
            tp_rank: r.tp_rank,
            weights_bytes: r.weights_bytes,
            kv_cache_reserved_bytes: r.kv_cache_bytes,
            planned: planned_ranks.as_ref().and_then(|p| p.get(i).copied()),
        })
        .collect();
    let gpu = opened.before.map(|before| ledger::GpuLedger {
        probe: Arc::new(opened.device.clone()),
        other_processes_bytes: before.used_bytes(),
        cuda_context_bytes: opened.context_bytes(),
    });
    let ledger = Ledger {
        device: opened.device_label(),
        device_total_bytes: match opened.after {
            Some(m) => m.total_bytes,
            None => crate::cmd::physical_memory_bytes().unwrap_or(0),
        },
        gpu,
        ranks,
        block_bytes: engine.block_bytes(),
        block_size: config.block_size,
        runtime_overhead_bytes: overhead,
        max_model_len,
        plan_error: planned.as_ref().err().cloned(),
        planned: planned.ok(),
    };
    let engine_cache_tokens = engine.config().num_blocks * engine.config().block_size;
    let shared = Arc::new(Shared {
        snapshot: Mutex::new(Snapshot::new(engine.stats())),
        pending: AtomicUsize::new(0),
    });
    let tokenizer = Arc::new(tokenizer);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let shared = shared.clone();
        let tokenizer = (*tokenizer).clone();
        std::thread::Builder::new()
            .name("llmem-engine".into())
            .spawn(move || worker::run(engine, tokenizer, rx, shared))
            .context("starting the engine thread")?
    };
    let state = Arc::new(AppState {
        model_id,
        commands: Mutex::new(tx),
        shared,
        tokenizer,
        chat_template: settings.chat_template.clone(),
        bos_token: settings.bos_token.clone(),
        eos_token: settings.eos_token.clone(),
        eos_token_ids: settings.eos_token_ids.clone(),
        vocab_size: shape.vocab_size,
        max_model_len,
        max_waiting: args.max_waiting,
        max_num_seqs: args.max_num_seqs as usize,
        cache_tokens: engine_cache_tokens,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        ledger,
        request_timeout: args.request_timeout.map(Duration::from_secs),
        started: Instant::now(),
        next_id: AtomicU64::new(1),
    });
    Ok(Server {
        state,
        worker,
        startup,
    })
}

/// One line on the weights' 2 MiB pages (`llmem_engine::weights::pages`).
fn huge_pages_text(h: &llmem_engine::weights::pages::HugePages) -> String {
    format!(
        "weights in 2 MiB pages: {} ({} refused by the kernel), {:.0} ms at load \
         (LLMEM_HUGE_PAGES=0 skips it)",
        human_bytes(h.collapsed_bytes),
        human_bytes(h.refused_bytes),
        h.ms
    )
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let server = start(&args)?;
    println!(
        "llmem serve: cpu kernels {}",
        llmem_kernels::cpu::level().describe()
    );
    println!("{}", server.startup);
    let max_body = usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| {
            llmem_engine::heap::tag_thread(llmem_engine::heap::Component::Runtime, 0)
        })
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let state = server.state.clone();
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local: SocketAddr = listener.local_addr()?;
        println!(
            "llmem serve: model `{}` listening on http://{local} (dashboard: http://{local}/)",
            state.model_id
        );
        let status = tokio::spawn(status_line(state.clone()));
        let limits = listen::Limits {
            header_timeout: Duration::from_secs(args.header_timeout),
            body_timeout: Duration::from_secs(args.body_timeout),
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        };
        let app = api::router(state.clone(), max_body, limits.body_timeout);
        listen::serve(listener, app, limits, shutdown_signal(state.clone())).await;
        status.abort();
        anyhow::Ok(())
    })?;
    // Dropping the runtime drops its tasks (the status line) and their handles.
    drop(runtime);
    // The last handle to the command channel goes with `server.state`; the engine thread
    // then finishes what it holds and returns.
    let Server { state, worker, .. } = server;
    drop(state);
    let _ = worker.join();
    eprintln!("llmem serve: stopped");
    Ok(())
}

/// Resolves on the first Ctrl-C (or SIGTERM); a second Ctrl-C exits at once.
async fn shutdown_signal(state: Arc<AppState>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    let s = state.shared.snapshot().stats;
    eprintln!(
        "\nllmem serve: shutting down: no new connections; draining {} running and {} \
         waiting requests (Ctrl-C again to exit now)",
        s.running,
        state.shared.waiting()
    );
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("llmem serve: exiting without draining");
        std::process::exit(130);
    });
}

/// One live line on stderr when it is a terminal: requests, KV blocks, memory, speed.
async fn status_line(state: Arc<AppState>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snap = state.shared.snapshot();
        let s = &snap.stats;
        let now = Instant::now();
        let rate = (snap.generated_tokens_total - last.1) as f64
            / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, snap.generated_tokens_total);
        let rss = crate::procfs::process_rss_bytes().unwrap_or(0);
        eprint!(
            "\r\x1b[2Krunning {} | waiting {} | KV {}/{} blocks ({} cached) | rss {} | {:.1} tok/s | {} tokens",
            s.running,
            state.shared.waiting(),
            s.blocks_used,
            s.blocks_total,
            s.blocks_cached,
            human_bytes(rss),
            rate,
            snap.generated_tokens_total,
        );
    }
}
