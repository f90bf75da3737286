//! Text a person reads: aligned tables with labelled units, a bar of each term's share,
//! markdown, and the `--explain` walkthrough of a capacity review.
//!
//! Binary units are labelled GiB/MiB/KiB; decimal units (the ones on a GPU's box) GB.
//! Rendering never changes a number: it only formats what [`Plan`] holds.

use std::fmt::Write;

use crate::fit::{Candidate, FitReport, Lever};
use crate::gpu::{grouped, human_bytes, human_gb, Gpu};
use crate::plan::{AttentionImpl, Plan, Terms};
use crate::precision::Precision;
use crate::shape::ModelShape;

const BAR_WIDTH: usize = 60;

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn term_rows(t: &Terms, headroom_fraction: f64) -> Vec<(String, u64, char)> {
    vec![
        ("weights".to_string(), t.weights_bytes, 'W'),
        ("kv_cache".to_string(), t.kv_cache_bytes, 'K'),
        ("activations".to_string(), t.activation_bytes, 'A'),
        (
            "runtime_overhead".to_string(),
            t.runtime_overhead_bytes,
            'O',
        ),
        (
            format!("headroom ({:.0}%)", headroom_fraction * 100.0),
            t.headroom_bytes,
            'H',
        ),
    ]
}

/// A bar as wide as the GPU's memory (or the total, when it does not fit), one letter per
/// term, `.` for free memory and `|` at the memory limit when the bill runs over it.
pub fn bar(t: &Terms, headroom_fraction: f64, memory: u64) -> String {
    let scale = t.total_bytes.max(memory).max(1) as f64;
    let mut out = String::new();
    let mut used = 0usize;
    let mut acc = 0u64;
    for (_, bytes, c) in term_rows(t, headroom_fraction) {
        acc += bytes;
        let upto = ((acc as f64 / scale) * BAR_WIDTH as f64).round() as usize;
        for _ in used..upto {
            out.push(c);
        }
        used = used.max(upto);
    }
    let mem_mark = ((memory as f64 / scale) * BAR_WIDTH as f64).round() as usize;
    while out.chars().count() < BAR_WIDTH {
        out.push('.');
    }
    if t.total_bytes > memory {
        let mut chars: Vec<char> = out.chars().collect();
        if mem_mark < chars.len() {
            chars.insert(mem_mark, '|');
        }
        out = chars.into_iter().collect();
    }
    format!("[{out}]")
}

fn deployment_line(p: &Plan) -> String {
    let d = &p.deployment;
    let mut s = format!(
        "{} x {} ({}), TP {}, PP {}",
        p.gpus, d.gpu.name, d.gpu.description, d.tp, d.pp
    );
    if d.replicas > 1 {
        let _ = write!(s, ", {} replicas", d.replicas);
    }
    s
}

fn verdict(p: &Plan) -> String {
    if p.fits {
        format!(
            "FITS: {} free per GPU ({:.1}% of its memory)",
            human_bytes(p.margin_bytes as u64),
            pct(p.margin_bytes as u64, p.gpu_memory_bytes)
        )
    } else {
        format!(
            "DOES NOT FIT: {} over per GPU ({:.1}% more than its memory)",
            human_bytes(p.margin_bytes.unsigned_abs()),
            pct(p.margin_bytes.unsigned_abs(), p.gpu_memory_bytes)
        )
    }
}

/// The plan as aligned text.
pub fn plan_text(p: &Plan) -> String {
    let d = &p.deployment;
    let w = &p.workload;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "llmem plan: {} ({} params) on {}",
        p.model.name,
        grouped(p.model.params_total),
        deployment_line(p)
    );
    let _ = writeln!(
        s,
        "  weights {}, KV cache {}; {} sequences x {} tokens; {} tokens per forward pass\n",
        d.precision,
        d.kv_dtype,
        grouped(w.concurrency),
        grouped(w.context_tokens),
        grouped(w.max_batched_tokens)
    );
    let _ = writeln!(
        s,
        "  {:<22} {:>20} {:>12} {:>7}",
        "per GPU (most loaded)", "bytes", "binary", "share"
    );
    for (name, bytes, _) in term_rows(&p.per_gpu, d.headroom_fraction) {
        let _ = writeln!(
            s,
            "  {:<22} {:>20} {:>12} {:>6.1}%",
            name,
            grouped(bytes),
            human_bytes(bytes),
            pct(bytes, p.per_gpu.total_bytes)
        );
    }
    let _ = writeln!(s, "  {}", "-".repeat(64));
    let _ = writeln!(
        s,
        "  {:<22} {:>20} {:>12}",
        "total",
        grouped(p.per_gpu.total_bytes),
        human_bytes(p.per_gpu.total_bytes)
    );
    let _ = writeln!(
        s,
        "  {:<22} {:>20} {:>12} ({})",
        "GPU memory",
        grouped(p.gpu_memory_bytes),
        human_bytes(p.gpu_memory_bytes),
        human_gb(p.gpu_memory_bytes)
    );
    let _ = writeln!(
        s,
        "\n  {}  W weights K kv A act O overhead H headroom . free",
        bar(&p.per_gpu, d.headroom_fraction, p.gpu_memory_bytes)
    );
    let _ = writeln!(s, "  {}\n", verdict(p));

    let _ = writeln!(
        s,
        "  whole model: weights {} B ({}) at {}; KV {} B per token x {} x {} = {} B ({})",
        grouped(p.weights_bytes_model),
        human_bytes(p.weights_bytes_model),
        d.precision,
        grouped(p.kv_bytes_per_token),
        grouped(w.concurrency),
        grouped(w.context_tokens),
        grouped(p.kv_cache_bytes_model),
        human_bytes(p.kv_cache_bytes_model)
    );
    let _ = writeln!(
        s,
        "  all {} GPUs together: {} ({})",
        p.gpus,
        human_bytes(p.total_bytes),
        human_gb(p.total_bytes)
    );
    let a = &p.activations;
    let _ = writeln!(
        s,
        "  activations: peak {} in the {} phase of a {}-token pass (attention {}, MLP {}, logits {}); lesson's simple form {}",
        human_bytes(a.peak_bytes),
        a.peak_phase,
        grouped(a.tokens),
        human_bytes(a.attention_phase_bytes),
        human_bytes(a.mlp_phase_bytes),
        human_bytes(a.logits_phase_bytes),
        human_bytes(a.simple_form_bytes)
    );
    let sp = &p.speed;
    if let (Some(b1), Some(full)) = (
        sp.decode_tokens_per_s_batch1,
        sp.decode_tokens_per_s_full_batch,
    ) {
        let _ = writeln!(
            s,
            "  speed bounds (memory bandwidth): decode <= {b1:.1} tokens/s at batch 1, <= {full:.0} tokens/s aggregate at full concurrency"
        );
    }
    if d.tp > 1 {
        let _ = write!(
            s,
            "  TP all-reduce traffic: {} sent per GPU per token",
            human_bytes(sp.allreduce_bytes_per_token_per_gpu)
        );
        if let Some(ms) = sp.allreduce_ms_per_token {
            let _ = write!(
                s,
                " (>= {ms:.3} ms per token at the interconnect's bandwidth)"
            );
        }
        s.push('\n');
    }
    if p.stages.len() > 1 || d.tp > 1 {
        let _ = writeln!(
            s,
            "\n  {:<6} {:>8} {:>10} {:>14} {:>14} {:>14}",
            "stage", "layers", "holds", "weights", "kv_cache", "total"
        );
        for st in &p.stages {
            let holds = match (st.holds_embedding, st.holds_lm_head) {
                (true, true) => "emb+head",
                (true, false) => "emb",
                (false, true) => "head",
                (false, false) => "-",
            };
            let _ = writeln!(
                s,
                "  {:<6} {:>8} {:>10} {:>14} {:>14} {:>14}",
                st.stage,
                format!(
                    "{}-{}",
                    st.first_layer,
                    st.first_layer + st.num_layers.max(1) - 1
                ),
                holds,
                human_bytes(st.per_gpu.weights_bytes),
                human_bytes(st.per_gpu.kv_cache_bytes),
                human_bytes(st.per_gpu.total_bytes)
            );
        }
    }
    let _ = writeln!(s, "\n  weight tensors by stored precision (whole model):");
    for g in &p.tensor_precisions {
        let _ = writeln!(
            s,
            "    {:>4} x {:<26} at {:<5} {:>17} params {:>12}",
            g.tensors,
            g.kind,
            g.precision.name(),
            grouped(g.params),
            human_bytes(g.bytes)
        );
    }
    let _ = writeln!(s, "\n  assumptions:");
    for a in &p.assumptions {
        let _ = writeln!(s, "  - {a}");
    }
    s
}

/// The plan as a markdown section.
pub fn plan_markdown(p: &Plan) -> String {
    let d = &p.deployment;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## {} on {}\n\nWeights {}, KV cache {}, {} sequences x {} tokens.\n",
        p.model.name,
        deployment_line(p),
        d.precision,
        d.kv_dtype,
        grouped(p.workload.concurrency),
        grouped(p.workload.context_tokens)
    );
    let _ = writeln!(s, "| term (per GPU) | bytes | binary | share |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for (name, bytes, _) in term_rows(&p.per_gpu, d.headroom_fraction) {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {:.1}% |",
            grouped(bytes),
            human_bytes(bytes),
            pct(bytes, p.per_gpu.total_bytes)
        );
    }
    let _ = writeln!(
        s,
        "| **total** | **{}** | **{}** | |\n| GPU memory | {} | {} | |\n",
        grouped(p.per_gpu.total_bytes),
        human_bytes(p.per_gpu.total_bytes),
        grouped(p.gpu_memory_bytes),
        human_bytes(p.gpu_memory_bytes)
    );
    let _ = writeln!(s, "**{}**\n\nAssumptions:\n", verdict(p));
    for a in &p.assumptions {
        let _ = writeln!(s, "- {a}");
    }
    s
}

/// The capacity-review walkthrough: each term in prose with its numbers. `answer` is the
/// smallest deployment at the same precision that fits (from the fit search), if any.
pub fn explain(p: &Plan, shape: &ModelShape, answer: Option<&Plan>) -> String {
    let d = &p.deployment;
    let w = &p.workload;
    let pc = &p.model.params;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "The question: can {} serve {} concurrent sequences of {} tokens on {} x {}?\n",
        p.model.name,
        grouped(w.concurrency),
        grouped(w.context_tokens),
        p.gpus,
        d.gpu.name
    );
    let _ = writeln!(
        s,
        "The formula, per GPU:\n\n    total_gpu_memory >= weights + kv_cache + activations + runtime_overhead + headroom\n"
    );
    let _ = writeln!(
        s,
        "1. Weights. {} has {} parameters: embedding {} ({} x {}), {} layers of {} each \
         (attention {}, MLP {}, norms {}), {}final norm {}. At {} ({} bits per weight) the whole \
         model is {} B ({}, {}).",
        p.model.name,
        grouped(pc.total),
        grouped(pc.embedding),
        grouped(shape.vocab_size),
        grouped(shape.hidden_size),
        shape.num_hidden_layers,
        grouped(pc.per_layer),
        grouped(pc.per_layer_attention),
        grouped(pc.per_layer_mlp),
        grouped(pc.per_layer_norms),
        if shape.tie_word_embeddings {
            "an LM head tied to the embedding (counted once), ".to_string()
        } else {
            format!("an LM head {}, ", grouped(pc.lm_head))
        },
        grouped(pc.final_norm),
        d.precision,
        d.precision.bits_per_weight(),
        grouped(p.weights_bytes_model),
        human_bytes(p.weights_bytes_model),
        human_gb(p.weights_bytes_model)
    );
    if d.tp > 1 || d.pp > 1 {
        let _ = writeln!(
            s,
            "   Split TP {} x PP {}, the most loaded GPU holds {} of weights.",
            d.tp,
            d.pp,
            human_bytes(p.per_gpu.weights_bytes)
        );
    }
    let _ = writeln!(
        s,
        "\n2. KV cache. Each token keeps a key and a value per layer per KV head: \
         2 x {} layers x {} KV heads x {} head_dim x {} ({}) = {} B ({}) per token. \
         For {} sequences x {} tokens that is {} B ({}). Per GPU: {}.",
        shape.num_hidden_layers,
        shape.num_key_value_heads,
        shape.head_dim,
        d.kv_dtype.describe_bytes(),
        d.kv_dtype,
        grouped(p.kv_bytes_per_token),
        human_bytes(p.kv_bytes_per_token),
        grouped(w.concurrency),
        grouped(w.context_tokens),
        grouped(p.kv_cache_bytes_model),
        human_bytes(p.kv_cache_bytes_model),
        human_bytes(p.per_gpu.kv_cache_bytes)
    );
    let a = &p.activations;
    let _ = writeln!(
        s,
        "\n3. Activations. The largest set of tensors alive at once in one forward pass of {} tokens \
         (the --max-batched-tokens budget): the attention phase holds {} ({}), the MLP phase {}, \
         the logits phase {} ({} rows of {} vocabulary logits in fp32). Peak: {} in the {} phase. \
         The lesson's rough form, batch x seq x hidden x 2 bytes = {} x {} x {} x 2 = {}, assumes \
         the whole batch in one pass; chunked prefill keeps the real peak far below it.",
        grouped(a.tokens),
        human_bytes(a.attention_phase_bytes),
        match w.attention {
            AttentionImpl::Fused => "fused attention, no score matrix",
            AttentionImpl::Unfused => "including fp32 attention scores",
        },
        human_bytes(a.mlp_phase_bytes),
        human_bytes(a.logits_phase_bytes),
        grouped(a.logit_rows),
        grouped(shape.vocab_size),
        human_bytes(a.peak_bytes),
        a.peak_phase,
        grouped(w.concurrency),
        grouped(w.context_tokens),
        grouped(shape.hidden_size),
        human_bytes(a.simple_form_bytes)
    );
    let _ = writeln!(
        s,
        "\n4. Runtime overhead: {} per GPU for the CUDA context and library workspaces \
         (cuBLAS, NCCL); replace it with a measured figure using --runtime-overhead.",
        human_bytes(p.per_gpu.runtime_overhead_bytes)
    );
    let _ = writeln!(
        s,
        "\n5. Headroom: {:.0}% on top, {} per GPU, for fragmentation and surprises.",
        d.headroom_fraction * 100.0,
        human_bytes(p.per_gpu.headroom_bytes)
    );
    let _ = writeln!(
        s,
        "\nTotal per GPU: {} B ({}) against {} B ({}) of memory. {}",
        grouped(p.per_gpu.total_bytes),
        human_bytes(p.per_gpu.total_bytes),
        grouped(p.gpu_memory_bytes),
        human_bytes(p.gpu_memory_bytes),
        verdict(p)
    );
    let whole = p.weights_bytes_model + p.kv_cache_bytes_model;
    let _ = writeln!(
        s,
        "\nWeights and KV alone come to {} ({}), {:.2} GPUs' worth of {}; \
         with activations, overhead and headroom on every GPU the deployment needs more.",
        human_bytes(whole),
        human_gb(whole),
        whole as f64 / p.gpu_memory_bytes as f64,
        d.gpu.name
    );
    if !p.fits && p.per_gpu.weights_bytes <= p.gpu_memory_bytes {
        let rest = p.per_gpu.total_bytes - p.per_gpu.weights_bytes;
        let _ = writeln!(
            s,
            "\nThe trap: the weights alone fit, {} of {} per GPU ({:.0}%). What pushes the GPU over is \
             the rest of the bill, {} per GPU: KV cache {}, activations {}, runtime overhead {}, headroom {}.",
            human_bytes(p.per_gpu.weights_bytes),
            human_bytes(p.gpu_memory_bytes),
            pct(p.per_gpu.weights_bytes, p.gpu_memory_bytes),
            human_bytes(rest),
            human_bytes(p.per_gpu.kv_cache_bytes),
            human_bytes(p.per_gpu.activation_bytes),
            human_bytes(p.per_gpu.runtime_overhead_bytes),
            human_bytes(p.per_gpu.headroom_bytes)
        );
    }
    if !p.fits {
        match answer {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "\nThe answer: {} x {} with TP {}{} at {}: {} per GPU, {} free on each.",
                    a.gpus,
                    a.deployment.gpu.name,
                    a.deployment.tp,
                    if a.deployment.pp > 1 {
                        format!(" and PP {}", a.deployment.pp)
                    } else {
                        String::new()
                    },
                    a.deployment.precision,
                    human_bytes(a.per_gpu.total_bytes),
                    human_bytes(a.margin_bytes.max(0) as u64)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "\nNo deployment at {} on {} fits with TP within a node or PP up to 16 stages; \
                     try --fit with a lower --min-precision, or cut the workload (--solve).",
                    d.precision, d.gpu.name
                );
            }
        }
    }
    s
}

/// The result of a `--fit` search.
pub fn fit_text(r: &FitReport, gpu: &Gpu) -> String {
    let mut s = String::new();
    match &r.best {
        Some(best) => {
            let d = &best.deployment;
            let _ = writeln!(
                s,
                "Cheapest deployment that fits on {}: {} GPU(s), {} weights, TP {}, PP {} ({} per GPU, {} free).\n",
                gpu.name,
                best.gpus,
                d.precision,
                d.tp,
                d.pp,
                human_bytes(best.per_gpu.total_bytes),
                human_bytes(best.margin_bytes.max(0) as u64)
            );
            let cheaper: Vec<&Candidate> =
                r.candidates.iter().filter(|c| c.gpus < best.gpus).collect();
            if !cheaper.is_empty() {
                let _ = writeln!(s, "Why the cheaper ones fail:");
                for c in cheaper {
                    let _ = writeln!(
                        s,
                        "  - {} GPU(s), {}, TP {}, PP {}: needs {} per GPU, {} over",
                        c.gpus,
                        c.precision,
                        c.tp,
                        c.pp,
                        human_bytes(c.per_gpu_total_bytes),
                        human_bytes(c.margin_bytes.unsigned_abs())
                    );
                }
                s.push('\n');
            }
        }
        None => {
            let _ = writeln!(
                s,
                "Nothing tried fits on {}: the model and workload need more than the levers here provide.\n",
                gpu.name
            );
        }
    }
    let _ = writeln!(
        s,
        "  {:<18} {:>6} {:>3} {:>3} {:>5} {:>13} {:>15}",
        "lever", "prec", "TP", "PP", "GPUs", "per GPU", "margin"
    );
    // The search up to the winner; every candidate is in the JSON output.
    let shown = r.best.as_ref().map_or(u64::MAX, |b| b.gpus);
    for c in r.candidates.iter().filter(|c| c.gpus <= shown) {
        let margin = if c.fits {
            format!("+{}", human_bytes(c.margin_bytes as u64))
        } else {
            format!("-{}", human_bytes(c.margin_bytes.unsigned_abs()))
        };
        let _ = writeln!(
            s,
            "  {:<18} {:>6} {:>3} {:>3} {:>5} {:>13} {:>15}",
            c.lever,
            c.precision.name(),
            c.tp,
            c.pp,
            c.gpus,
            human_bytes(c.per_gpu_total_bytes),
            margin
        );
    }
    if let Some(cut) = &r.workload_cut {
        let _ = writeln!(
            s,
            "\nCut the workload instead: at {} with TP {} the largest concurrency that fits the asked context is {}, \
             and the longest context that fits the asked concurrency is {} tokens.",
            cut.precision, cut.tp, cut.max_concurrency_at_context, grouped(cut.max_context_at_concurrency)
        );
    }
    s
}

/// The trade-off table.
pub fn levers_text(rows: &[Lever]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<18} {:>12} {:>12} {:>13}  {:<58} latency",
        "lever", "before/GPU", "after/GPU", "change", "quality"
    );
    for r in rows {
        let change = if !r.applies {
            "n/a".to_string()
        } else if r.delta_bytes <= 0 {
            format!("-{}", human_bytes(r.delta_bytes.unsigned_abs()))
        } else {
            format!("+{}", human_bytes(r.delta_bytes as u64))
        };
        let _ = writeln!(
            s,
            "  {:<18} {:>12} {:>12} {:>13}  {:<58} {}",
            r.lever,
            human_bytes(r.before_bytes),
            human_bytes(r.after_bytes),
            change,
            r.quality,
            r.latency
        );
        if !r.note.is_empty() {
            let _ = writeln!(s, "  {:<18} ({})", "", r.note);
        }
    }
    s
}

/// The `llmem inspect` parameter table.
pub fn inspect_text(shape: &ModelShape, precision: Precision) -> Result<String, crate::PlanError> {
    use crate::precision::{matrix_bytes, vector_bytes};
    let pc = shape.params();
    let (h, i) = (shape.hidden_size, shape.intermediate_size);
    let p = precision;
    let layer = crate::plan::layer_bytes(shape, p, 1, 0)?;
    let (attn_bytes, mlp_bytes, norm_bytes) = (layer.attention, layer.mlp, layer.norms);
    let layer_bytes = layer.total();
    let emb_bytes = matrix_bytes(p, shape.vocab_size, h)?;
    let head_bytes = if shape.tie_word_embeddings {
        0
    } else {
        emb_bytes
    };
    let final_norm = vector_bytes(p, h)?;
    let l = shape.num_hidden_layers;
    let total = emb_bytes + layer_bytes * l + head_bytes + final_norm;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}): {} layers, hidden {}, {} heads / {} KV heads x head_dim {}, MLP {}, vocab {}",
        shape.name,
        shape.architecture.hf_name(),
        l,
        h,
        shape.num_attention_heads,
        shape.num_key_value_heads,
        shape.head_dim,
        i,
        shape.vocab_size
    );
    let _ = writeln!(
        s,
        "rope_theta {}, max_position_embeddings {}, tie_word_embeddings {}\n",
        shape.rope_theta, shape.max_position_embeddings, shape.tie_word_embeddings
    );
    let _ = writeln!(
        s,
        "  {:<38} {:>17} {:>7} {:>14}",
        "part",
        "parameters",
        "share",
        format!("bytes @ {p}")
    );
    let mut line = |name: &str, params: u64, bytes: u64| {
        let _ = writeln!(
            s,
            "  {:<38} {:>17} {:>6.2}% {:>14}",
            name,
            grouped(params),
            pct(params, pc.total),
            human_bytes(bytes)
        );
    };
    line(
        &format!("embedding ({} x {})", shape.vocab_size, h),
        pc.embedding,
        emb_bytes,
    );
    line(&format!("{l} layers"), pc.layers, layer_bytes * l);
    line("  one layer", pc.per_layer, layer_bytes);
    line(
        "    attention (q, k, v, o)",
        pc.per_layer_attention,
        attn_bytes,
    );
    line("    MLP (gate, up, down)", pc.per_layer_mlp, mlp_bytes);
    line("    norms (2 x RMSNorm)", pc.per_layer_norms, norm_bytes);
    line(
        if shape.tie_word_embeddings {
            "LM head (tied: shares the embedding)"
        } else {
            "LM head"
        },
        pc.lm_head,
        head_bytes,
    );
    line("final norm", pc.final_norm, final_norm);
    line(
        "all norms (2 per layer + final)",
        pc.norms,
        norm_bytes * l + final_norm,
    );
    line("total", pc.total, total);
    Ok(s)
}

/// The GPU catalog.
pub fn gpus_text(gpus: &[Gpu]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<15} {:>18} {:>11} {:>11} {:>12} {:>10}  description",
        "name", "memory bytes", "binary", "bandwidth", "interconnect", "overhead"
    );
    for g in gpus {
        let _ = writeln!(
            s,
            "  {:<15} {:>18} {:>11} {:>8.2} TB/s {:>7} GB/s {:>10}  {}",
            g.name,
            grouped(g.memory_bytes),
            human_bytes(g.memory_bytes),
            g.bandwidth_bytes_per_s as f64 / 1e12,
            g.interconnect_bytes_per_s / 1_000_000_000,
            human_bytes(g.runtime_overhead_bytes),
            g.description
        );
    }
    s.push_str("\n  memory: the total the driver reports; bandwidths: NVIDIA datasheet peaks; overhead: default runtime overhead per GPU\n");
    s
}
