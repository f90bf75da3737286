//! `llmem sweep`: load one model at several weight precisions in one process and show
//! what each costs (bytes, speed) and buys (perplexity, agreement with the reference).
//! The measuring is `llmem_engine::eval::sweep`; this file parses, draws progress bars and
//! writes the text table, JSON, markdown and the SVG chart.
//!
//! JSON contract: `levels[]` with `dtype`, `weights_bytes_planned`,
//! `weights_bytes_measured`, `load_ms`, `perplexity`, `kl_divergence`, `top1_agreement`,
//! `prefill_tokens_per_s`, `decode_tokens_per_s`, `decode_tokens_per_s_batch16`;
//! `kv_levels[]` (the reference weights with each KV cache level, f32 first) with
//! `kv_dtype`, `weights`, `kv_bytes_per_token`, `perplexity`, `kl_divergence`,
//! `top1_agreement`, `prefill_tokens_per_s`, `decode_tokens_per_s`,
//! `decode_tokens_per_s_batch16`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use llmem_engine::cache::paged::KvDtype;
use llmem_engine::eval::sweep::{sweep, Level, Progress, Quiet, SweepOptions, SweepReport};
use llmem_engine::weights::quant::parse_weight_dtype;
use llmem_planner::human_bytes;

use super::Format;

/// The default text: the first 16 KB of tinyshakespeare (see data/README.md).
const DEFAULT_TEXT: &str = include_str!("../../data/tinyshakespeare-sample.txt");

#[derive(clap::Args)]
pub struct SweepArgs {
    /// A Hugging Face model directory, a llama .gguf file (each level dequantizes and
    /// requantizes its tensors), or the built-in `smollm2-135m`.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Comma-separated weight dtypes: f32, f16, bf16, q8_0, q6_k, q4_1, q4_0, q4_k, and
    /// for a .gguf model `stored` (its tensors as the file stores them; the other levels
    /// dequantize and requantize them). The one with the most bits per weight is the
    /// reference for KL and top-1 agreement.
    #[arg(long, default_value = "f32,bf16,q8_0,q4_k,q4_0", value_delimiter = ',')]
    pub dtypes: Vec<String>,
    /// Comma-separated KV cache levels (f32, f16, bf16, q8_0, q4_0), each measured with
    /// the reference weights: perplexity, KL and top-1 against an f32 cache (measured
    /// first), bytes per token and decode speed. `none` skips them.
    #[arg(long, default_value = "f32,f16,q8_0,q4_0", value_delimiter = ',')]
    pub kv_dtypes: Vec<String>,
    /// Text to score (default: the tinyshakespeare sample shipped in data/).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens scored for perplexity and KL, in whole windows.
    #[arg(long, default_value_t = 1024, value_parser = parse_usize)]
    pub tokens: usize,
    /// Tokens per perplexity window (each one forward pass from an empty cache).
    #[arg(long, default_value_t = 512, value_parser = parse_usize)]
    pub window: usize,
    /// Tokens generated per sequence in the decode measurements (batch 1 and 16).
    #[arg(long, default_value_t = 64, value_parser = parse_usize)]
    pub decode_tokens: usize,
    /// Prompt tokens before decoding (taken from the start of the text).
    #[arg(long, default_value_t = 128, value_parser = parse_usize)]
    pub prompt_tokens: usize,
    /// Keep the embedding and LM head at f16 under block formats.
    #[arg(long)]
    pub keep_embeddings: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write an SVG chart (weight memory vs perplexity, labelled with decode tok/s).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

fn parse_usize(s: &str) -> Result<usize, String> {
    super::positive_arg(s).map(|n| n as usize)
}

/// One indicatif bar per level on a terminal, nothing otherwise.
struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn level_start(&mut self, dtype: &str, steps: u64) {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(dtype.to_string());
        bar.set_message("loading");
        self.bar = Some(bar);
    }
    fn step(&mut self, message: &str) {
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(message.to_string());
        }
    }
    fn level_done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_with_message("done");
        }
    }
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let mut levels: Vec<Level> = Vec::new();
    for d in &args.dtypes {
        let l = if d.eq_ignore_ascii_case("stored") {
            Level::Stored
        } else {
            Level::At(parse_weight_dtype(d).context("--dtypes")?)
        };
        if levels.contains(&l) {
            anyhow::bail!("--dtypes lists {d} twice");
        }
        levels.push(l);
    }
    let mut kv_levels: Vec<KvDtype> = Vec::new();
    for d in &args.kv_dtypes {
        if d.eq_ignore_ascii_case("none") {
            continue;
        }
        let kv = KvDtype::parse(d).context("--kv-dtypes")?;
        if kv_levels.contains(&kv) {
            anyhow::bail!("--kv-dtypes lists {d} twice");
        }
        kv_levels.push(kv);
    }
    let text = match &args.text {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => DEFAULT_TEXT.to_string(),
    };
    let super::load::ModelParts {
        path: dir,
        shape,
        weights,
        tokenizer,
        ..
    } = super::load::open_model(&args.model)?;
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the text: {e}"))?
        .get_ids()
        .to_vec();
    if levels.contains(&Level::Stored) && weights.gguf().is_none() {
        anyhow::bail!(
            "--dtypes stored: the `stored` level runs a GGUF's tensors as the file stores \
             them; {} is not a .gguf file",
            dir.display()
        );
    }
    let opts = SweepOptions {
        levels,
        keep_embeddings: args.keep_embeddings,
        tokens: args.tokens,
        window: args.window.min(args.tokens),
        decode_prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        kv_levels,
    };
    let report = if std::io::stderr().is_terminal() {
        sweep(&shape, &weights, &ids, &opts, &mut Bars { bar: None })?
    } else {
        sweep(&shape, &weights, &ids, &opts, &mut Quiet)?
    };
    let mut notes: Vec<&String> = Vec::new();
    for l in &report.levels {
        for n in &l.fallbacks {
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
    }
    match args.format {
        Format::Json => {
            let mut json = serde_json::to_value(&report)?;
            json["cpu_kernels"] = super::cpu_kernels().into();
            println!("{}", serde_json::to_string_pretty(&json)?)
        }
        Format::Text => {
            print!("{}", text_table(&report, &dir.display().to_string()));
            for n in notes {
                println!("note: {n}");
            }
        }
        Format::Markdown => {
            print!("{}", markdown_table(&report));
            for n in notes {
                println!("\n- {n}");
            }
        }
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg_chart(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn text_table(r: &SweepReport, model: &str) -> String {
    let mut out = format!(
        "model {model}: {} tokens in windows of {}, {} positions compared with {}\n",
        r.tokens, r.window, r.positions, r.reference
    );
    out.push_str(&format!(
        "{:<6} {:>12} {:>12} {:>8} {:>10} {:>9} {:>7} {:>10} {:>9} {:>10}\n",
        "dtype",
        "planned",
        "measured",
        "load ms",
        "perplexity",
        "KL nats",
        "top-1",
        "prefill/s",
        "decode/s",
        "decode16/s"
    ));
    for l in &r.levels {
        out.push_str(&format!(
            "{:<6} {:>12} {:>12} {:>8.0} {:>10.4} {:>9.5} {:>6.1}% {:>10.1} {:>9.1} {:>10.1}\n",
            l.dtype,
            human_bytes(l.weights_bytes_planned),
            human_bytes(l.weights_bytes_measured),
            l.load_ms,
            l.perplexity,
            l.kl_divergence,
            100.0 * l.top1_agreement,
            l.prefill_tokens_per_s,
            l.decode_tokens_per_s,
            l.decode_tokens_per_s_batch16
        ));
    }
    if let Some(first) = r.kv_levels.first() {
        out.push_str(&format!(
            "\nKV cache levels with {} weights, compared with an f32 cache:\n",
            first.weights
        ));
        out.push_str(&format!(
            "{:<6} {:>12} {:>10} {:>9} {:>7} {:>10} {:>9} {:>10}\n",
            "kv",
            "bytes/token",
            "perplexity",
            "KL nats",
            "top-1",
            "prefill/s",
            "decode/s",
            "decode16/s"
        ));
        for l in &r.kv_levels {
            out.push_str(&format!(
                "{:<6} {:>12} {:>10.4} {:>9.5} {:>6.1}% {:>10.1} {:>9.1} {:>10.1}\n",
                l.kv_dtype,
                l.kv_bytes_per_token,
                l.perplexity,
                l.kl_divergence,
                100.0 * l.top1_agreement,
                l.prefill_tokens_per_s,
                l.decode_tokens_per_s,
                l.decode_tokens_per_s_batch16
            ));
        }
    }
    out
}

fn markdown_table(r: &SweepReport) -> String {
    let mut out = format!(
        "Reference: {}; {} tokens in windows of {}; {} positions compared.\n\n",
        r.reference, r.tokens, r.window, r.positions
    );
    out.push_str(
        "| dtype | weights planned | weights measured | load ms | perplexity | KL (nats) \
         | top-1 | prefill tok/s | decode tok/s | decode tok/s (batch 16) |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for l in &r.levels {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.4} | {:.5} | {:.1}% | {:.1} | {:.1} | {:.1} |\n",
            l.dtype,
            l.weights_bytes_planned,
            l.weights_bytes_measured,
            l.load_ms,
            l.perplexity,
            l.kl_divergence,
            100.0 * l.top1_agreement,
            l.prefill_tokens_per_s,
            l.decode_tokens_per_s,
            l.decode_tokens_per_s_batch16
        ));
    }
    if let Some(first) = r.kv_levels.first() {
        out.push_str(&format!(
            "\nKV cache levels with {} weights, compared with an f32 cache.\n\n",
            first.weights
        ));
        out.push_str(
            "| KV cache | bytes per token | perplexity | KL (nats) | top-1 | prefill tok/s \
             | decode tok/s | decode tok/s (batch 16) |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for l in &r.kv_levels {
            out.push_str(&format!(
                "| {} | {} | {:.4} | {:.5} | {:.1}% | {:.1} | {:.1} | {:.1} |\n",
                l.kv_dtype,
                l.kv_bytes_per_token,
                l.perplexity,
                l.kl_divergence,
                100.0 * l.top1_agreement,
                l.prefill_tokens_per_s,
                l.decode_tokens_per_s,
                l.decode_tokens_per_s_batch16
            ));
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A hand-written scatter chart: weight memory (MiB) on x, perplexity on y, one point
/// per level labelled with its dtype and decode tok/s; the point's area grows with the
/// decode speed.
pub fn svg_chart(r: &SweepReport) -> String {
    let (w, h) = (720.0f64, 440.0f64);
    let (left, right, top, bottom) = (80.0, 40.0, 50.0, 60.0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let xs: Vec<f64> = r
        .levels
        .iter()
        .map(|l| mib(l.weights_bytes_measured))
        .collect();
    let ys: Vec<f64> = r.levels.iter().map(|l| l.perplexity).collect();
    let span = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.01).max(1e-6);
        (lo - pad, hi + pad)
    };
    // Memory starts at zero so that the distances between levels are proportional.
    let (x0, x1) = (0.0, span(&xs).1);
    let (y0, y1) = span(&ys);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let max_speed = r
        .levels
        .iter()
        .map(|l| l.decode_tokens_per_s)
        .fold(1e-9, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">Weight memory vs \
         perplexity ({} tokens, reference {}); circle area ~ decode tok/s</text>\n",
        w / 2.0,
        r.tokens,
        xml_escape(&r.reference)
    );
    // Axes with five ticks each.
    s.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    ));
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let xv = x0 + f * (x1 - x0);
        let yv = y0 + f * (y1 - y0);
        s.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ccc\"/>\n\
             <text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4:.0}</text>\n",
            px(xv),
            top,
            h - bottom,
            h - bottom + 18.0,
            xv
        ));
        s.push_str(&format!(
            "<line x1=\"{0}\" y1=\"{1:.1}\" x2=\"{2}\" y2=\"{1:.1}\" stroke=\"#ccc\"/>\n\
             <text x=\"{3}\" y=\"{4:.1}\" text-anchor=\"end\">{5:.2}</text>\n",
            left,
            py(yv),
            w - right,
            left - 6.0,
            py(yv) + 4.0,
            yv
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">weights (MiB)</text>\n\
         <text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">\
         perplexity</text>\n",
        (left + w - right) / 2.0,
        h - 18.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    ));
    for (i, l) in r.levels.iter().enumerate() {
        let radius = 4.0 + 10.0 * (l.decode_tokens_per_s / max_speed).sqrt();
        // Labels of points in the right quarter go to their left, inside the chart.
        let (label_x, anchor) = if px(xs[i]) > 0.75 * w {
            (px(xs[i]) - radius - 4.0, "end")
        } else {
            (px(xs[i]) + radius + 4.0, "start")
        };
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{radius:.1}\" fill=\"steelblue\" \
             fill-opacity=\"0.6\" stroke=\"navy\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{} ({:.0} tok/s)</text>\n",
            px(xs[i]),
            py(ys[i]),
            label_x,
            py(ys[i]) - 2.0,
            xml_escape(&l.dtype),
            l.decode_tokens_per_s
        ));
    }
    s.push_str("</svg>\n");
    s
}
