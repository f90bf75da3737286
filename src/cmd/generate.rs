//! `llmem generate`: load a model, generate from a prompt, stream text or print JSON.
//!
//! The JSON keys (`prompt_token_ids`, `token_ids`, `text`, `finish_reason`,
//! `timings.*`, `memory.*`, `top_logprobs`) are a contract for scripts; see the README.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use llmem_engine::cache::paged::KvDtype;
use llmem_engine::chat::{render_chat, ChatMessage};
use llmem_engine::config::GenerationConfig;
use llmem_engine::engine::generate::{generate, GenerateRequest};
use llmem_engine::sample::sampler::SamplingParams;

use super::load::{load_on, shard_format, DtypeArg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Stream the generated text to stdout; a summary line goes to stderr.
    Text,
    /// One JSON object on stdout when done.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model directory, a llama .gguf file (run natively: quantized tensors
    /// stay in their block format), or the built-in `smollm2-135m` (fetched on first use).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler's random generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable); it is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Stop at this token id (repeatable), even with --ignore-eos.
    #[arg(long = "stop-token-id")]
    pub stop_token_ids: Vec<u32>,
    /// Weight dtype: f32/bf16/f16, or a GGUF block format quantized at load (norms,
    /// biases and activations stay f32; rows that do not fit a block fall back).
    /// Default: f32 for a model directory; for a .gguf file and for the built-in model
    /// (its shipped Q4_1 GGUF), each tensor as the file stores it. With --dtype the
    /// built-in model loads from its f32 conversion, a .gguf file is dequantized first.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// With a block format: keep the embedding and LM head at f16 instead of quantizing
    /// them like the other matrices.
    #[arg(long)]
    pub keep_embeddings: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Report the top K log-probabilities at each generated position (JSON only).
    #[arg(long)]
    pub top_logprobs: Option<usize>,
    /// Do not stop at the model's EOS tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// KV cache element type: f32, f16, bf16, or the block formats q8_0 and q4_0 (CPU)
    /// (default: the model's activation dtype; f32 for quantized weights).
    #[arg(long, value_parser = super::kv::parse_kv_dtype)]
    pub kv_dtype: Option<KvDtype>,
    #[command(flatten)]
    pub parallel: super::ParallelArgs,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.runtime.random_weights.is_some() {
        anyhow::bail!(
            "--random-weights has no tokenizer, and generate needs one for its text prompt; \
             use `llmem bench --random-weights ...` (random token ids) instead"
        );
    }
    let spec = llmem_engine::device::DeviceSpec::parse(&args.runtime.device)?;
    if args.parallel.is_parallel() {
        if spec.is_cuda() {
            anyhow::bail!(
                "--tp/--pp run on CPU rank threads; on CUDA they are not wired yet \
                 (NcclComm compiles but no runner uses it)"
            );
        }
        return run_parallel(args);
    }
    let device = args.runtime.open_device()?.device;
    let loaded = load_on(&args.model, args.dtype, args.keep_embeddings, &device)?;
    let (prompt, add_special) = prompt_text(&args, &loaded.dir, &loaded.config)?;
    let encoding = loaded
        .tokenizer
        .encode(prompt.as_str(), add_special)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let req = GenerateRequest {
        prompt_ids: encoding.get_ids().to_vec(),
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        eos_token_ids: loaded.config.eos_token_ids.clone(),
        stop_token_ids: args.stop_token_ids.clone(),
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        top_logprobs: args.top_logprobs.unwrap_or(0),
        kv_dtype: args.kv_dtype,
    };
    let stream = args.format == OutputFormat::Text;
    // With JSON output nothing shows until the end: a live line on a terminal meanwhile.
    let bar = if stream {
        indicatif::ProgressBar::hidden()
    } else {
        super::live_bar(0, "generating")
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} {elapsed} | {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut stdout = std::io::stdout().lock();
    let mut pieces = 0u64;
    let out = generate(&loaded.model, &loaded.tokenizer, &req, |piece| {
        if stream {
            // A closed pipe (e.g. `| head`) is not worth failing the generation for.
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        } else {
            pieces += 1;
            bar.set_message(format!(
                "{pieces} pieces of text | rss {}",
                super::rss_text()
            ));
            bar.tick();
        }
    })?;
    bar.finish_and_clear();
    match args.format {
        OutputFormat::Text => {
            let _ = writeln!(stdout);
            let t = &out.timings;
            let m = &out.memory;
            eprintln!(
                "[{} prompt + {} generated tokens, finish: {}; load {:.0} ms, prefill {:.1} tok/s, \
                 decode {:.1} tok/s; memory: weights {}, KV {}, activations peak {}, rss {}]",
                out.prompt_token_ids.len(),
                out.token_ids.len(),
                serde_json::to_value(out.finish_reason)?
                    .as_str()
                    .unwrap_or_default(),
                loaded.load_ms,
                t.prefill_tokens_per_s,
                t.decode_tokens_per_s,
                llmem_planner::human_bytes(m.weights_bytes),
                llmem_planner::human_bytes(m.kv_cache_bytes),
                match m.activation_peak_measured_bytes {
                    Some(b) => format!(
                        "{} measured ({} planned)",
                        llmem_planner::human_bytes(b),
                        llmem_planner::human_bytes(m.activation_peak_bytes)
                    ),
                    None => format!("{} planned", llmem_planner::human_bytes(m.activation_peak_bytes)),
                },
                super::rss_text(),
            );
        }
        OutputFormat::Json => {
            let mut json = serde_json::json!({
                "cpu_kernels": super::cpu_kernels(),
                "model": loaded.dir.display().to_string(),
                "dtype": loaded.dtype_name,
                "prompt_token_ids": out.prompt_token_ids,
                "token_ids": out.token_ids,
                "text": out.text,
                "finish_reason": out.finish_reason,
                "timings": {
                    "load_ms": loaded.load_ms,
                    "prefill_ms": out.timings.prefill_ms,
                    "decode_ms": out.timings.decode_ms,
                    "prefill_tokens_per_s": out.timings.prefill_tokens_per_s,
                    "decode_tokens_per_s": out.timings.decode_tokens_per_s,
                },
                "memory": out.memory,
                "huge_pages": loaded.model.huge_pages(),
            });
            if args.top_logprobs.is_some() {
                json["top_logprobs"] = serde_json::to_value(&out.top_logprobs)?;
            }
            writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?;
        }
    }
    Ok(())
}

/// The prompt as the model sees it: the chat template applied when asked.
fn prompt_text(
    args: &GenerateArgs,
    dir: &std::path::Path,
    config: &GenerationConfig,
) -> anyhow::Result<(String, bool)> {
    if !args.chat {
        return Ok((args.prompt.clone(), true));
    }
    let template = config.chat_template.as_deref().with_context(|| {
        format!(
            "{}: --chat needs a chat template (tokenizer_config.json `chat_template`, \
             chat_template.jinja, or a GGUF's tokenizer.chat_template) and this model has none",
            dir.display()
        )
    })?;
    let text = render_chat(
        template,
        &[ChatMessage::user(&args.prompt)],
        config.bos_token.as_deref(),
        config.eos_token.as_deref(),
        true,
    )?;
    // The template already holds the special tokens.
    Ok((text, false))
}

/// `--tp/--pp > 1`: the same request through the paged [`Engine`] over rank threads.
///
/// The text is decoded once at the end (no streaming) and cut before the first stop
/// string; `--top-logprobs` is not available on this path. The PP split and the
/// per-rank memory beside the planner's prediction go to stderr.
fn run_parallel(args: GenerateArgs) -> anyhow::Result<()> {
    use llmem_engine::engine::scheduler::StopConditions;
    use llmem_engine::engine::{Engine, EngineConfig, DEFAULT_BLOCK_SIZE};

    if args.top_logprobs.is_some() {
        anyhow::bail!("--top-logprobs is not available with --tp/--pp > 1");
    }
    let start = Instant::now();
    let parts = super::load::open_model(&args.model)?;
    let (dir, shape, weights, tokenizer, config) = (
        parts.path,
        parts.shape,
        parts.weights,
        parts.tokenizer,
        parts.config,
    );
    let spec = args.parallel.spec(&shape)?;
    let (prompt, add_special) = prompt_text(&args, &dir, &config)?;
    let encoding = tokenizer
        .encode(prompt.as_str(), add_special)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids = encoding.get_ids().to_vec();
    let max_context = shape.max_position_embeddings as usize;
    let max_model_len = (prompt_ids.len() + args.max_tokens + 1)
        .min(max_context)
        .max(2);
    let block_size = DEFAULT_BLOCK_SIZE;
    let fmt = shard_format(args.dtype, &weights);
    let dtype = fmt.activation_dtype();
    let paged = EngineConfig {
        block_size,
        num_blocks: max_model_len.div_ceil(block_size),
        kv_dtype: args.kv_dtype.unwrap_or(match dtype {
            candle_core::DType::F16 => KvDtype::F16,
            candle_core::DType::BF16 => KvDtype::Bf16,
            _ => KvDtype::F32,
        }),
        max_num_seqs: 1,
        max_batched_tokens: max_model_len,
        max_model_len,
        kv_layout: llmem_engine::cache::block_manager::KvLayout::Paged,
    };
    let mut engine =
        Engine::new_parallel_with(&shape, weights, &fmt, spec, paged).with_context(|| {
            format!(
                "loading model {} as {} ranks",
                dir.display(),
                spec.tp * spec.pp
            )
        })?;
    engine.set_micro_batches(args.parallel.micro_batches())?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    eprintln!("{}", super::rank_report(&engine));
    let mut stop_ids = args.stop_token_ids.clone();
    if !args.ignore_eos {
        stop_ids.extend(&config.eos_token_ids);
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let stop = StopConditions {
        max_tokens: args.max_tokens,
        stop_token_ids: stop_ids,
        ignore_eos: false,
    };
    let t0 = Instant::now();
    let id = engine.add_request(prompt_ids.clone(), sampling, stop)?;
    let mut token_ids = Vec::new();
    let mut finish = None;
    let mut first_token_ms = 0.0;
    while engine.has_work() {
        for o in engine.step()? {
            if o.id == id {
                if token_ids.is_empty() {
                    first_token_ms = t0.elapsed().as_secs_f64() * 1e3;
                }
                token_ids.push(o.token);
                finish = o.finished.or(finish);
            }
        }
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut text = tokenizer
        .decode(&token_ids, true)
        .map_err(|e| anyhow::anyhow!("decoding the output: {e}"))?;
    let mut finish_reason = match finish {
        Some(llmem_engine::engine::scheduler::FinishReason::Length) | None => "length",
        Some(_) => "stop",
    };
    if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
        finish_reason = "stop";
    }
    let decode_ms = total_ms - first_token_ms;
    let rate = |n: usize, ms: f64| if ms > 0.0 { n as f64 / (ms / 1e3) } else { 0.0 };
    let prefill_rate = rate(prompt_ids.len(), first_token_ms);
    let decode_rate = rate(token_ids.len().saturating_sub(1), decode_ms);
    let comm: f64 = engine
        .comm_stats()
        .iter()
        .map(|c| c.total_seconds())
        .fold(0.0, f64::max);
    let mut stdout = std::io::stdout().lock();
    match args.format {
        OutputFormat::Text => {
            writeln!(stdout, "{text}")?;
            eprintln!(
                "[{} prompt + {} generated tokens, finish: {finish_reason}; load {:.0} ms, \
                 prefill {:.1} tok/s, decode {:.1} tok/s; collectives {:.1}% of the time]",
                prompt_ids.len(),
                token_ids.len(),
                load_ms,
                prefill_rate,
                decode_rate,
                100.0 * comm * 1e3 / total_ms.max(1e-9),
            );
        }
        OutputFormat::Json => {
            let planned = engine.planned_rank_memory().ok();
            let ranks: Vec<serde_json::Value> = engine
                .rank_memory()
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let p = planned.as_ref().and_then(|p| p.get(i));
                    serde_json::json!({
                        "planned": p.map(|p| serde_json::json!({
                            "weights_bytes": p.weights_bytes,
                            "kv_cache_bytes": p.kv_cache_bytes,
                            "activation_bytes": p.activation_bytes,
                        })),
                        "stage": m.stage,
                        "tp_rank": m.tp_rank,
                        "first_layer": m.first_layer,
                        "num_layers": m.num_layers,
                        "weights_bytes": m.weights_bytes,
                        "kv_cache_bytes": m.kv_cache_bytes,
                        "activation_peak_bytes": m.activation_peak_bytes,
                    })
                })
                .collect();
            let json = serde_json::json!({
                "cpu_kernels": super::cpu_kernels(),
                "model": dir.display().to_string(),
                "dtype": args.dtype.unwrap_or(DtypeArg::F32).name(),
                "tp": spec.tp,
                "pp": spec.pp,
                "vocab_parallel": spec.vocab_parallel,
                "prompt_token_ids": prompt_ids,
                "token_ids": token_ids,
                "text": text,
                "finish_reason": finish_reason,
                "timings": {
                    "load_ms": load_ms,
                    "prefill_ms": first_token_ms,
                    "decode_ms": decode_ms,
                    "prefill_tokens_per_s": prefill_rate,
                    "decode_tokens_per_s": decode_rate,
                },
                "ranks": ranks,
            });
            writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?;
        }
    }
    Ok(())
}
