//! `llmem plan`: the capacity planner on the command line.
//!
//! Parses flags into a planner `Workload` and `Deployment`, runs the plan (and, when
//! asked, the fit search, the inverse questions and the lever table) and prints text,
//! markdown or JSON. JSON keys are a contract (README, "JSON contracts").

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use llmem_planner::fit::{fit, levers, max_concurrency, max_context, FitLimits};
use llmem_planner::plan::{AttentionImpl, Deployment, Workload, DEFAULT_MAX_BATCHED_TOKENS};
use llmem_planner::{report, KvDtype, Precision};
use serde_json::json;

use super::{bytes_arg, fraction_arg, positive_arg, Format};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Solve {
    /// The largest concurrency that fits at --context.
    Concurrency,
    /// The longest context that fits at --concurrency.
    Context,
}

#[derive(Args)]
pub struct PlanArgs {
    /// A preset name (see `llmem inspect --list`), a config.json, a model directory, or a
    /// llama .gguf file (weights: its tensor table's bytes, as `llmem generate` loads it).
    #[arg(long, short, default_value = "smollm2-135m")]
    pub model: String,
    /// Weight precision: fp32, fp16, bf16, fp8, int8, int4, q8_0, q6_k, q4_1, q4_0, q4_k
    /// [default: fp16; for a .gguf, the file's own tensors, named after its main type].
    #[arg(long)]
    pub precision: Option<String>,
    /// KV cache dtype: fp32, fp16, bf16, fp8, int8 [default: fp16, fp32 for fp32 weights].
    #[arg(long)]
    pub kv_dtype: Option<String>,
    /// Tokens per sequence the KV cache holds (prompt + output).
    #[arg(long, default_value = "4096", value_parser = positive_arg, allow_hyphen_values = true)]
    pub context: u64,
    /// Sequences served at once.
    #[arg(long, default_value = "1", value_parser = positive_arg, allow_hyphen_values = true)]
    pub concurrency: u64,
    /// Tensor-parallel degree (must divide the attention heads).
    #[arg(long, default_value = "1", value_parser = positive_arg, allow_hyphen_values = true)]
    pub tp: u64,
    /// Pipeline-parallel stages.
    #[arg(long, default_value = "1", value_parser = positive_arg, allow_hyphen_values = true)]
    pub pp: u64,
    /// A GPU from the catalog (`--list-gpus`).
    #[arg(long, default_value = "h100-80gb", conflicts_with = "gpu_memory")]
    pub gpu: String,
    /// Memory of a device not in the catalog: 80GB, 80GiB, 24GiB, 1073741824...
    #[arg(long, value_parser = bytes_arg)]
    pub gpu_memory: Option<u64>,
    /// GPUs in all: a multiple of TP x PP; the rest are data-parallel replicas.
    #[arg(long, value_parser = positive_arg, allow_hyphen_values = true)]
    pub gpus: Option<u64>,
    /// Headroom as a fraction of the other terms (0.1 = 10%).
    #[arg(long, default_value = "0.1", value_parser = fraction_arg, allow_hyphen_values = true)]
    pub headroom: f64,
    /// Tokens in one forward pass (sizes the activations).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCHED_TOKENS, value_parser = positive_arg, allow_hyphen_values = true)]
    pub max_batched_tokens: u64,
    /// Runtime overhead per GPU (CUDA context, workspaces) instead of the GPU's default.
    #[arg(long, value_parser = bytes_arg)]
    pub runtime_overhead: Option<u64>,
    /// Split the embedding and LM head by vocabulary across TP ranks.
    #[arg(long)]
    pub vocab_parallel: bool,
    /// Keep the embedding and LM head at fp16 when quantizing.
    #[arg(long)]
    pub keep_embeddings: bool,
    /// Attention that materialises the fp32 score matrix (no fused kernel).
    #[arg(long)]
    pub unfused_attention: bool,
    /// Bytes per activation value: 2 (fp16/bf16 compute, what GPU kernels do for
    /// quantized weights) or 4 (f32, what llmem's CPU engine does for block formats).
    /// Default: 4 at fp32 weights, else 2.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4))]
    pub activation_bytes: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Walk through each term in prose with the numbers filled in.
    #[arg(long)]
    pub explain: bool,
    /// The trade-off table: what each lever changes per GPU.
    #[arg(long)]
    pub levers: bool,
    /// Search for the cheapest deployment on --gpu that fits (quantize, TP, then PP).
    #[arg(long)]
    pub fit: bool,
    /// Lowest precision --fit may quantize to.
    #[arg(long, default_value = "int4")]
    pub min_precision: String,
    /// Largest TP degree --fit tries (GPUs per node).
    #[arg(long, default_value = "8", value_parser = positive_arg, allow_hyphen_values = true)]
    pub max_tp: u64,
    /// Solve an inverse question for this deployment.
    #[arg(long, value_enum)]
    pub solve: Option<Solve>,
    /// Print the GPU catalog and exit.
    #[arg(long)]
    pub list_gpus: bool,
}

pub fn run(args: PlanArgs) -> Result<()> {
    if args.list_gpus {
        let gpus = llmem_planner::catalog();
        match args.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&gpus)?),
            _ => print!("{}", report::gpus_text(&gpus)),
        }
        return Ok(());
    }
    // A GGUF planned as stored: its own bytes, at the precision of its main type (which
    // sets the KV and activation defaults), unless --precision asks for another.
    let (shape, stored) = match super::load::gguf_shape(&args.model)? {
        Some(t) => (t.shape, Some((t.summary, t.main, t.tensors))),
        None => (llmem_planner::resolve_shape(&args.model)?, None),
    };
    let precision: Precision = match (&args.precision, &stored) {
        (Some(p), _) => p.parse()?,
        (None, Some((_, main, _))) => *main,
        (None, None) => Precision::Fp16,
    };
    // The file's own bytes (per rank: its tensors cut as the engine cuts them) unless
    // --precision asks for another level.
    let as_stored = stored
        .as_ref()
        .filter(|(_, main, _)| args.precision.is_none() || *main == precision);
    let stored_weights_bytes = as_stored.map(|(s, _, _)| s.bytes);
    let stored_tensors = as_stored.map(|(_, _, table)| std::sync::Arc::new(table.clone()));
    let kv_dtype = match &args.kv_dtype {
        Some(k) => k.parse::<KvDtype>()?,
        None => KvDtype::default_for(precision),
    };
    let gpu = match args.gpu_memory {
        Some(bytes) => llmem_planner::custom_gpu(bytes),
        None => llmem_planner::gpu(&args.gpu)?,
    };
    let group = args.tp * args.pp;
    let replicas = match args.gpus {
        None => 1,
        Some(n) if n % group == 0 => n / group,
        Some(n) => bail!(
            "--gpus {n} is not a multiple of --tp {} x --pp {} = {group}; the GPUs beyond one TP x PP group are data-parallel replicas",
            args.tp,
            args.pp
        ),
    };
    let workload = Workload {
        context_tokens: args.context,
        concurrency: args.concurrency,
        max_batched_tokens: args.max_batched_tokens,
        attention: if args.unfused_attention {
            AttentionImpl::Unfused
        } else {
            AttentionImpl::Fused
        },
    };
    let deployment = Deployment {
        precision,
        kv_dtype,
        tp: args.tp,
        pp: args.pp,
        replicas,
        gpu,
        runtime_overhead_bytes: args.runtime_overhead,
        headroom_fraction: args.headroom,
        vocab_parallel: args.vocab_parallel,
        keep_embeddings: args.keep_embeddings,
        stored_weights_bytes,
        stored_tensors,
        activation_bytes: args.activation_bytes,
    };
    let plan = llmem_planner::plan(&shape, &workload, &deployment)?;
    let fit_report = if args.fit {
        let min: Precision = args.min_precision.parse()?;
        let limits = FitLimits {
            max_tp: args.max_tp,
            min_bits: min.bits_per_weight(),
            ..FitLimits::default()
        };
        Some(fit(&shape, &workload, &deployment, &limits)?)
    } else {
        None
    };
    let lever_rows = if args.levers {
        Some(levers(&shape, &workload, &deployment)?)
    } else {
        None
    };
    let solved = match args.solve {
        Some(Solve::Concurrency) => Some((
            "max_concurrency",
            max_concurrency(&shape, &workload, &deployment)?,
        )),
        Some(Solve::Context) => Some((
            "max_context_tokens",
            max_context(&shape, &workload, &deployment)?,
        )),
        None => None,
    };

    match args.format {
        Format::Json => {
            let mut value = serde_json::to_value(&plan)?;
            if let Some(r) = &fit_report {
                value["fit"] = serde_json::to_value(r)?;
            }
            if let Some(rows) = &lever_rows {
                value["levers"] = serde_json::to_value(rows)?;
            }
            if let Some((key, n)) = solved {
                value["solve"] = json!({ key: n });
            }
            if let Some((summary, _, _)) = &stored {
                value["gguf"] = serde_json::to_value(summary)?;
            }
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Text | Format::Markdown => {
            let markdown = args.format == Format::Markdown;
            if args.explain {
                // The answer to "how many GPUs": the cheapest fit at the asked precision.
                let answer = if plan.fits {
                    None
                } else {
                    let limits = FitLimits {
                        max_tp: args.max_tp,
                        min_bits: precision.bits_per_weight(),
                        ..FitLimits::default()
                    };
                    fit(&shape, &workload, &deployment, &limits)?.best
                };
                println!("{}", report::explain(&plan, &shape, answer.as_ref()));
            }
            if markdown {
                print!("{}", report::plan_markdown(&plan));
            } else {
                print!("{}", report::plan_text(&plan));
            }
            if let Some(r) = &fit_report {
                println!("\n--fit on {}:\n", deployment.gpu.name);
                print!("{}", report::fit_text(r, &deployment.gpu));
            }
            if let Some(rows) = &lever_rows {
                println!("\n--levers (each applied alone to this plan):\n");
                print!("{}", report::levers_text(rows));
            }
            if let Some((key, n)) = solved {
                println!("\n--solve: {key} = {n}");
            }
            if let Some((summary, _, _)) = &stored {
                println!();
                print!("{}", super::inspect::stored_text(summary));
                match stored_weights_bytes {
                    Some(_) => println!(
                        "  (the weights term above is this sum for an unsplit model; \
                         --tp/--pp use the {precision} estimate)"
                    ),
                    None => println!("  (the plan above requantizes to {precision})"),
                }
            }
        }
    }
    Ok(())
}
