//! Advice: which deployment fits, how far a deployment stretches, and what each lever buys.
//!
//! The levers are pulled in the order production teams pull them: quantize the weights,
//! add tensor parallelism, cut context or concurrency, and add pipeline parallelism only
//! when nothing else fits. Every candidate is a full [`plan`], so advice and plan never
//! disagree.

use serde::Serialize;

use crate::plan::{plan, valid_tp_degrees, Deployment, Plan, Workload};
use crate::precision::{KvDtype, Precision};
use crate::shape::ModelShape;
use crate::PlanError;

/// One deployment tried by the fit search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// The lever that produced it: "as asked", "quantize", "tensor parallel", "pipeline parallel".
    pub lever: String,
    pub precision: Precision,
    pub tp: u64,
    pub pp: u64,
    pub gpus: u64,
    pub per_gpu_total_bytes: u64,
    pub fits: bool,
    pub margin_bytes: i64,
}

/// What `--fit` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    /// The cheapest (fewest GPUs, then highest precision, then least PP) that fits.
    pub best: Option<Plan>,
    /// Every candidate, cheapest first.
    pub candidates: Vec<Candidate>,
    /// When nothing fits at the asked workload: the largest concurrency and context that
    /// fit on the largest deployment tried.
    pub workload_cut: Option<WorkloadCut>,
}

/// How far the workload must shrink to fit a deployment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadCut {
    pub precision: Precision,
    pub tp: u64,
    pub pp: u64,
    pub max_concurrency_at_context: u64,
    pub max_context_at_concurrency: u64,
}

/// Limits of the fit search.
#[derive(Debug, Clone, PartialEq)]
pub struct FitLimits {
    /// GPUs in one node: TP stays within it.
    pub max_tp: u64,
    /// Largest pipeline depth to try.
    pub max_pp: u64,
    /// Do not quantize below this many bits per weight.
    pub min_bits: f64,
}

impl Default for FitLimits {
    fn default() -> Self {
        FitLimits {
            max_tp: 8,
            max_pp: 16,
            min_bits: 4.0,
        }
    }
}

/// The quantization ladder from the asked precision down: fp32 -> fp16 -> int8 -> int4.
/// bf16 stands in for fp16 when asked; block formats and fp8 are a ladder of their own.
pub fn precision_ladder(start: Precision, min_bits: f64) -> Vec<Precision> {
    let rungs: &[Precision] = match start {
        Precision::Fp32 => &[
            Precision::Fp32,
            Precision::Fp16,
            Precision::Int8,
            Precision::Int4,
        ],
        Precision::Fp16 => &[Precision::Fp16, Precision::Int8, Precision::Int4],
        Precision::Bf16 => &[Precision::Bf16, Precision::Int8, Precision::Int4],
        Precision::Fp8 => &[Precision::Fp8, Precision::Int4],
        Precision::Int8 => &[Precision::Int8, Precision::Int4],
        Precision::Q8_0 => &[Precision::Q8_0, Precision::Q6K, Precision::Q4K],
        Precision::Q6K => &[Precision::Q6K, Precision::Q4K],
        other => return vec![other],
    };
    rungs
        .iter()
        .copied()
        .filter(|p| *p == start || p.bits_per_weight() >= min_bits)
        .collect()
}

fn with(d: &Deployment, precision: Precision, tp: u64, pp: u64) -> Deployment {
    let kv_dtype = if precision == d.precision {
        d.kv_dtype
    } else {
        // Quantizing weights does not quantize the cache: keep the asked KV dtype unless
        // it was fp32 (fp32 weights), which follows the weights down to fp16.
        match d.kv_dtype {
            KvDtype::Fp32 => KvDtype::default_for(precision),
            k => k,
        }
    };
    Deployment {
        precision,
        kv_dtype,
        tp,
        pp,
        replicas: 1,
        // A file's stored bytes hold only at its own precision.
        stored_weights_bytes: d.stored_weights_bytes.filter(|_| precision == d.precision),
        stored_tensors: d
            .stored_tensors
            .clone()
            .filter(|_| precision == d.precision),
        ..d.clone()
    }
}

/// Search deployments on `d.gpu` for the cheapest that serves `w`.
pub fn fit(
    shape: &ModelShape,
    w: &Workload,
    d: &Deployment,
    limits: &FitLimits,
) -> Result<FitReport, PlanError> {
    crate::plan::validate(shape, w, &with(d, d.precision, 1, 1))?;
    let ladder = precision_ladder(d.precision, limits.min_bits);
    let tps: Vec<u64> = valid_tp_degrees(shape)
        .into_iter()
        .filter(|tp| *tp <= limits.max_tp)
        .collect();
    let max_tp = tps.last().copied().unwrap_or(1);
    let mut tried: Vec<(usize, Plan, &'static str)> = Vec::new();
    let mut order = 0usize;
    let mut push = |p: Plan, lever: &'static str, tried: &mut Vec<(usize, Plan, &'static str)>| {
        tried.push((order, p, lever));
        order += 1;
    };
    // Lever 1: quantize on one GPU.
    for (i, &precision) in ladder.iter().enumerate() {
        let lever = if i == 0 {
            "as asked (1 GPU)"
        } else {
            "quantize"
        };
        push(
            plan(shape, w, &with(d, precision, 1, 1))?,
            lever,
            &mut tried,
        );
    }
    // Lever 2: tensor parallelism within a node.
    for &precision in &ladder {
        for &tp in tps.iter().filter(|tp| **tp > 1) {
            push(
                plan(shape, w, &with(d, precision, tp, 1))?,
                "tensor parallel",
                &mut tried,
            );
        }
    }
    // Lever 4: pipeline parallelism across nodes, on top of the largest TP.
    let mut pp = 2;
    while pp <= limits.max_pp.min(shape.num_hidden_layers) {
        for &precision in &ladder {
            push(
                plan(shape, w, &with(d, precision, max_tp, pp))?,
                "pipeline parallel",
                &mut tried,
            );
        }
        pp *= 2;
    }
    // Cheapest: fewest GPUs, then the order the levers were pulled in.
    tried.sort_by_key(|(order, p, _)| (p.gpus, *order));
    let best = tried
        .iter()
        .find(|(_, p, _)| p.fits)
        .map(|(_, p, _)| p.clone());
    let candidates = tried
        .iter()
        .map(|(_, p, lever)| Candidate {
            lever: lever.to_string(),
            precision: p.deployment.precision,
            tp: p.deployment.tp,
            pp: p.deployment.pp,
            gpus: p.gpus,
            per_gpu_total_bytes: p.per_gpu.total_bytes,
            fits: p.fits,
            margin_bytes: p.margin_bytes,
        })
        .collect();
    // Lever 3, reported when nothing fits: how far context or concurrency must come down
    // on the largest single-node deployment at the lowest precision allowed.
    let workload_cut = if best.is_none() {
        let lowest = *ladder.last().unwrap_or(&d.precision);
        let dd = with(d, lowest, max_tp, 1);
        Some(WorkloadCut {
            precision: lowest,
            tp: max_tp,
            pp: 1,
            max_concurrency_at_context: max_concurrency(shape, w, &dd)?,
            max_context_at_concurrency: max_context(shape, w, &dd)?,
        })
    } else {
        None
    };
    Ok(FitReport {
        best,
        candidates,
        workload_cut,
    })
}

/// The largest `n` in `1..=limit` for which `fits(n)` holds, given that `fits` is
/// monotone (true then false); 0 when even 1 does not fit.
fn largest_fitting(
    limit: u64,
    mut fits: impl FnMut(u64) -> Result<bool, PlanError>,
) -> Result<u64, PlanError> {
    if !fits(1)? {
        return Ok(0);
    }
    let (mut lo, mut hi) = (1u64, limit.max(1));
    if fits(hi)? {
        return Ok(hi);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn fits_or_overflow(r: Result<Plan, PlanError>) -> Result<bool, PlanError> {
    match r {
        Ok(p) => Ok(p.fits),
        Err(PlanError::Overflow(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The largest concurrency that fits `d` at the workload's context (0 if none).
pub fn max_concurrency(shape: &ModelShape, w: &Workload, d: &Deployment) -> Result<u64, PlanError> {
    largest_fitting(1 << 24, |n| {
        fits_or_overflow(plan(
            shape,
            &Workload {
                concurrency: n,
                ..w.clone()
            },
            d,
        ))
    })
}

/// The longest context that fits `d` at the workload's concurrency (0 if none).
pub fn max_context(shape: &ModelShape, w: &Workload, d: &Deployment) -> Result<u64, PlanError> {
    largest_fitting(1 << 26, |n| {
        fits_or_overflow(plan(
            shape,
            &Workload {
                context_tokens: n,
                ..w.clone()
            },
            d,
        ))
    })
}

/// One row of the trade-off table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lever {
    pub lever: String,
    /// Per-GPU total before and after (the most loaded GPU).
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub delta_bytes: i64,
    /// None when the lever does not apply (say why in `note`).
    pub applies: bool,
    pub quality: String,
    pub latency: String,
    pub note: String,
}

/// The trade-off table for this model and workload: each lever applied to `d` alone.
pub fn levers(shape: &ModelShape, w: &Workload, d: &Deployment) -> Result<Vec<Lever>, PlanError> {
    let base = plan(shape, w, d)?;
    let mut rows = Vec::new();
    let mut row = |lever: &str,
                   before: Result<Plan, PlanError>,
                   after: Result<Plan, PlanError>,
                   quality: &str,
                   latency: &str|
     -> Result<(), PlanError> {
        let (applies, before_bytes, after_bytes, note) = match (before, after) {
            (Ok(b), Ok(a)) => (
                true,
                b.per_gpu.total_bytes,
                a.per_gpu.total_bytes,
                String::new(),
            ),
            (Ok(b), Err(PlanError::Invalid(msg))) | (Err(PlanError::Invalid(msg)), Ok(b)) => {
                (false, b.per_gpu.total_bytes, b.per_gpu.total_bytes, msg)
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        rows.push(Lever {
            lever: lever.to_string(),
            before_bytes,
            after_bytes,
            delta_bytes: after_bytes as i64 - before_bytes as i64,
            applies,
            quality: quality.to_string(),
            latency: latency.to_string(),
            note,
        });
        Ok(())
    };
    let at = |p: Precision| plan(shape, w, &with_kv(d, p));
    row(
        "FP16 -> INT8",
        at(Precision::Fp16),
        at(Precision::Int8),
        "typically under 1% worse (lesson's range, not measured here)",
        "faster decode: half the weight bytes read per token",
    )?;
    row(
        "INT8 -> INT4",
        at(Precision::Int8),
        at(Precision::Int4),
        "typically 1-3% worse (lesson's range, not measured here)",
        "faster decode: half the weight bytes again, some dequantization cost",
    )?;
    let tp2 = Deployment {
        tp: d.tp * 2,
        ..d.clone()
    };
    row(
        "TP x2",
        Ok(base.clone()),
        plan(shape, w, &tp2),
        "none",
        "lower per-token compute, plus all-reduce time per layer (interconnect overhead)",
    )?;
    let half_ctx = Workload {
        context_tokens: (w.context_tokens / 2).max(1),
        ..w.clone()
    };
    row(
        "halve context",
        Ok(base.clone()),
        plan(shape, &half_ctx, d),
        "shorter prompts and answers fit; long-document tasks suffer",
        "slightly faster decode: less KV read per step",
    )?;
    let half_conc = Workload {
        concurrency: (w.concurrency / 2).max(1),
        ..w.clone()
    };
    row(
        "halve concurrency",
        Ok(base.clone()),
        plan(shape, &half_conc, d),
        "none",
        "same per-token latency or better, half the aggregate throughput",
    )?;
    let pp2 = Deployment {
        pp: d.pp * 2,
        ..d.clone()
    };
    row(
        "PP x2",
        Ok(base),
        plan(shape, w, &pp2),
        "none",
        "slower per token: stages run in series, plus a hand-off between GPUs",
    )?;
    Ok(rows)
}

fn with_kv(d: &Deployment, p: Precision) -> Deployment {
    Deployment {
        precision: p,
        stored_weights_bytes: d.stored_weights_bytes.filter(|_| p == d.precision),
        stored_tensors: d.stored_tensors.clone().filter(|_| p == d.precision),
        ..d.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::gpu;
    use crate::presets::preset;

    #[test]
    fn seventy_b_fp16_needs_four_h100_with_tp4() {
        let shape = preset("llama-3-70b").unwrap();
        let w = Workload::new(4096, 32);
        let d = Deployment::new(Precision::Fp16, gpu("h100-80gb").unwrap());
        let report = fit(
            &shape,
            &w,
            &d,
            &FitLimits {
                min_bits: 16.0,
                ..FitLimits::default()
            },
        )
        .unwrap();
        let best = report.best.unwrap();
        assert_eq!(
            (best.deployment.tp, best.deployment.pp, best.gpus),
            (4, 1, 4)
        );
        assert_eq!(best.deployment.precision, Precision::Fp16);
    }

    #[test]
    fn ladder_respects_min_bits() {
        assert_eq!(
            precision_ladder(Precision::Fp16, 8.0),
            vec![Precision::Fp16, Precision::Int8]
        );
        assert_eq!(
            precision_ladder(Precision::Q4_0, 4.0),
            vec![Precision::Q4_0]
        );
    }

    #[test]
    fn inverse_questions_are_the_edges_of_fitting() {
        let shape = preset("llama-3-8b").unwrap();
        let w = Workload::new(8192, 1);
        let d = Deployment::new(Precision::Fp16, gpu("l4-24gb").unwrap());
        let n = max_concurrency(&shape, &w, &d).unwrap();
        assert!(n > 0);
        let fits = |c| {
            plan(
                &shape,
                &Workload {
                    concurrency: c,
                    ..w.clone()
                },
                &d,
            )
            .unwrap()
            .fits
        };
        assert!(fits(n) && !fits(n + 1));
        let ctx = max_context(&shape, &w, &d).unwrap();
        let fits = |c| {
            plan(
                &shape,
                &Workload {
                    context_tokens: c,
                    ..w.clone()
                },
                &d,
            )
            .unwrap()
            .fits
        };
        assert!(fits(ctx) && !fits(ctx + 1));
    }
}
