//! `llmem bench --memory-trace FILE` and `--plot FILE`: memory per component, per rank,
//! after every engine step of a run, as CSV rows and as an SVG chart (KV growing as
//! sequences decode, blocks freed by preemptions and finished requests, activations
//! spiking with prefill chunks).

use std::fmt::Write as _;

use llmem_engine::engine::Engine;

/// One rank after one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    /// The bench run (one per concurrency level and KV layout), and its label.
    pub run: usize,
    pub label: String,
    pub step: u64,
    pub t_ms: f64,
    pub rank: usize,
    /// The step's forward pass: tokens and logit rows (0 when it ran none).
    pub pass_tokens: usize,
    pub logit_rows: usize,
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    pub kv_blocks_used: usize,
    pub kv_used_bytes: u64,
    pub kv_reserved_bytes: u64,
    pub weights_bytes: u64,
    /// The pass's working set measured by the counting allocator (`None` without it).
    pub activation_measured_bytes: Option<u64>,
    /// The activation formula's figure for the same pass.
    pub activation_estimate_bytes: u64,
}

/// Whether the counting allocator measures `engine`'s memory: it is installed and the
/// model is on the CPU (a GPU's memory is the driver's).
pub fn heap_counted(engine: &Engine) -> bool {
    llmem_engine::heap::installed() && engine.model().is_none_or(|m| m.device().is_cpu())
}

/// Per rank, the pass working sets (last, largest) the counting allocator measured;
/// `None` where it does not count this engine's memory ([`heap_counted`]).
pub fn measured_activations(engine: &Engine) -> Option<Vec<(u64, u64)>> {
    engine
        .measured_activation_bytes()
        .filter(|_| heap_counted(engine))
}

/// The bytes of `blocks_used` of `blocks_total` shared blocks on a rank that reserves
/// `reserved` for all of them (every rank holds its own heads or layers of each block).
pub fn kv_used_bytes(reserved: u64, blocks_used: u64, blocks_total: u64) -> u64 {
    (u128::from(reserved) * u128::from(blocks_used) / u128::from(blocks_total.max(1))) as u64
}

/// The rows of every rank after the step `engine` just ran.
pub fn sample(engine: &Engine, run: usize, label: &str, t_ms: f64) -> Vec<TraceRow> {
    let s = engine.stats();
    let (pass_tokens, logit_rows) = engine.last_pass();
    let measured = measured_activations(engine);
    let estimates = engine.rank_activation_bytes();
    engine
        .rank_memory()
        .iter()
        .enumerate()
        .map(|(rank, m)| TraceRow {
            run,
            label: label.to_string(),
            step: s.steps,
            t_ms,
            rank,
            pass_tokens,
            logit_rows,
            running: s.running,
            waiting: s.waiting,
            preemptions: s.preemptions,
            kv_blocks_used: s.blocks_used,
            kv_used_bytes: kv_used_bytes(
                m.kv_cache_bytes,
                s.blocks_used as u64,
                s.blocks_total as u64,
            ),
            kv_reserved_bytes: m.kv_cache_bytes,
            weights_bytes: m.weights_bytes,
            activation_measured_bytes: measured.as_ref().and_then(|v| v.get(rank)).map(|x| x.0),
            activation_estimate_bytes: estimates.get(rank).map_or(0, |x| x.0),
        })
        .collect()
}

const CSV_HEADER: &str = "run,label,step,t_ms,rank,pass_tokens,logit_rows,running,waiting,\
preemptions,kv_blocks_used,kv_used_bytes,kv_reserved_bytes,weights_bytes,\
activation_measured_bytes,activation_estimate_bytes";

/// The trace as CSV with a header line; an unmeasured activation is an empty field.
pub fn csv(rows: &[TraceRow]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.run,
            r.label,
            r.step,
            r.t_ms,
            r.rank,
            r.pass_tokens,
            r.logit_rows,
            r.running,
            r.waiting,
            r.preemptions,
            r.kv_blocks_used,
            r.kv_used_bytes,
            r.kv_reserved_bytes,
            r.weights_bytes,
            r.activation_measured_bytes
                .map_or(String::new(), |b| b.to_string()),
            r.activation_estimate_bytes
        );
    }
    out
}

/// Colours of the stacked components, bottom to top.
const WEIGHTS: &str = "#3867d6";
const KV_USED: &str = "#e8590c";
const ACTIVATION: &str = "#d6336c";
const KV_RESERVED: &str = "#1d2330";
const PREEMPTION: &str = "#c0262d";

/// The trace as an SVG: one panel per run and rank (the first 12), step on x, MiB on y;
/// stacked areas of weights, KV in use and the pass's activations (measured where the
/// allocator counted them, else the estimate), a dashed line at weights + KV reserved,
/// and a red tick at each step that preempted a sequence.
pub fn svg(rows: &[TraceRow]) -> String {
    let mut panels: Vec<(usize, usize)> = Vec::new();
    for r in rows {
        if !panels.contains(&(r.run, r.rank)) {
            panels.push((r.run, r.rank));
        }
    }
    let shown = panels.len().min(12);
    let (w, ph, gap, top) = (860.0f64, 220.0f64, 70.0f64, 60.0f64);
    let (left, right) = (80.0, 30.0);
    let h = top + shown as f64 * (ph + gap) + 20.0;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Memory per engine \
         step: weights, KV cache in use, the pass's activations (stacked); dashed: weights + \
         KV reserved</text>\n",
        w / 2.0
    );
    let legend = [
        (WEIGHTS, "weights"),
        (KV_USED, "KV cache in use"),
        (ACTIVATION, "activations of the step's pass"),
        (PREEMPTION, "preemption"),
    ];
    for (i, (colour, name)) in legend.iter().enumerate() {
        let x = left + i as f64 * 190.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"34\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{}\" y=\"44\">{name}</text>",
            x + 16.0
        );
    }
    if panels.len() > shown {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#555\">{} more panels in the CSV</text>",
            w - right,
            h - 6.0,
            panels.len() - shown
        );
    }
    for (p, &(run, rank)) in panels.iter().take(shown).enumerate() {
        let pts: Vec<&TraceRow> = rows
            .iter()
            .filter(|r| r.run == run && r.rank == rank)
            .collect();
        let y0 = top + p as f64 * (ph + gap) + 24.0;
        let ymax = pts
            .iter()
            .map(|r| {
                mib(r.weights_bytes + r.kv_used_bytes + activation(r))
                    .max(mib(r.weights_bytes + r.kv_reserved_bytes))
            })
            .fold(1e-3, f64::max)
            * 1.08;
        let (s0, s1) = (
            pts.first().map_or(0, |r| r.step) as f64,
            pts.last().map_or(1, |r| r.step) as f64,
        );
        let span = (s1 - s0).max(1.0);
        let px = |step: u64| left + (step as f64 - s0) / span * (w - left - right);
        let py = |v: f64| y0 + ph - v / ymax * ph;
        let measured = pts.iter().any(|r| r.activation_measured_bytes.is_some());
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}, rank {rank} \
             ({} steps; activations {})</text>",
            y0 - 8.0,
            xml_escape(pts.first().map_or("", |r| r.label.as_str())),
            pts.len(),
            if measured { "measured" } else { "estimated" }
        );
        // Grid: five lines on y, labelled in MiB; steps on x.
        for i in 0..=4 {
            let v = ymax * i as f64 / 4.0;
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#e6e8ec\"/>\
                 <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.0} MiB</text>",
                py(v),
                w - right,
                left - 6.0,
                py(v) + 4.0,
                v
            );
            let step = s0 + span * i as f64 / 4.0;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>",
                left + (step - s0) / span * (w - left - right),
                y0 + ph + 16.0,
                step
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">engine step</text>",
            (left + w - right) / 2.0,
            y0 + ph + 32.0
        );
        // Stacked areas, bottom to top.
        let layers: [(&str, Component); 3] = [
            (WEIGHTS, |r| r.weights_bytes),
            (KV_USED, |r| r.kv_used_bytes),
            (ACTIVATION, activation),
        ];
        let mut base = vec![0u64; pts.len()];
        for (colour, value) in &layers {
            let tops: Vec<u64> = pts.iter().zip(&base).map(|(r, b)| b + value(r)).collect();
            let mut path = String::new();
            for (i, r) in pts.iter().enumerate() {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1} ",
                    if i == 0 { "M" } else { "L" },
                    px(r.step),
                    py(mib(tops[i]))
                );
            }
            for (i, r) in pts.iter().enumerate().rev() {
                let _ = write!(path, "L{:.1},{:.1} ", px(r.step), py(mib(base[i])));
            }
            let _ = writeln!(s, "<path d=\"{path}Z\" fill=\"{colour}\" stroke=\"none\"/>");
            base = tops;
        }
        // Weights + KV reserved: the cache's ceiling.
        let mut line = String::new();
        for (i, r) in pts.iter().enumerate() {
            let _ = write!(
                line,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                px(r.step),
                py(mib(r.weights_bytes + r.kv_reserved_bytes))
            );
        }
        let _ = writeln!(
            s,
            "<path d=\"{line}\" fill=\"none\" stroke=\"{KV_RESERVED}\" stroke-dasharray=\"6 4\" \
             stroke-width=\"1.5\"/>"
        );
        let mut previous = pts.first().map_or(0, |r| r.preemptions);
        for r in &pts {
            if r.preemptions > previous {
                let _ = writeln!(
                    s,
                    "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"{PREEMPTION}\" \
                     stroke-width=\"2\"/>",
                    px(r.step),
                    y0,
                    y0 + 10.0
                );
            }
            previous = r.preemptions;
        }
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y0}\" width=\"{}\" height=\"{ph}\" fill=\"none\" stroke=\"#8a93a3\"/>",
            w - left - right
        );
    }
    s.push_str("</svg>\n");
    s
}

/// One stacked component of a row.
type Component = fn(&TraceRow) -> u64;

/// A step's activations: measured where the allocator counted them, else the estimate.
fn activation(r: &TraceRow) -> u64 {
    r.activation_measured_bytes
        .unwrap_or(r.activation_estimate_bytes)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, rank: usize, kv_used: u64, preemptions: u64) -> TraceRow {
        TraceRow {
            run: 0,
            label: "concurrency 2 paged".into(),
            step,
            t_ms: step as f64,
            rank,
            pass_tokens: 3,
            logit_rows: 1,
            running: 1,
            waiting: 0,
            preemptions,
            kv_blocks_used: 1,
            kv_used_bytes: kv_used,
            kv_reserved_bytes: 4 << 20,
            weights_bytes: 8 << 20,
            activation_measured_bytes: (step % 2 == 0).then_some(1 << 20),
            activation_estimate_bytes: 1 << 19,
        }
    }

    #[test]
    fn csv_has_a_header_and_one_line_per_row() {
        let rows = [row(1, 0, 100, 0), row(2, 0, 200, 0)];
        let text = csv(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let fields = lines[0].split(',').count();
        for l in &lines[1..] {
            assert_eq!(l.split(',').count(), fields, "{l}");
        }
        // Step 1 was not measured: an empty field, then the estimate.
        assert!(lines[1].ends_with(",,524288"), "{}", lines[1]);
        assert!(lines[2].ends_with(",1048576,524288"), "{}", lines[2]);
    }

    #[test]
    fn svg_draws_a_panel_per_run_and_rank_and_marks_preemptions() {
        let rows = [
            row(1, 0, 100, 0),
            row(1, 1, 100, 0),
            row(2, 0, 1 << 20, 1),
            row(2, 1, 1 << 20, 1),
            row(3, 0, 0, 1),
            row(3, 1, 0, 1),
        ];
        let svg = svg(&rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches(", rank ").count(), 2, "{svg}");
        // Three stacked areas per panel, one preemption tick per panel.
        assert_eq!(
            svg.matches(&format!("fill=\"{WEIGHTS}\" stroke")).count(),
            2
        );
        assert_eq!(
            svg.matches(&format!("stroke=\"{PREEMPTION}\" stroke-width"))
                .count(),
            2
        );
        assert!(svg.contains("activations measured"));
    }
}
