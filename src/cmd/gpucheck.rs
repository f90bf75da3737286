//! `llmem gpu-check`: the GPU checks that need no model files and no Rust toolchain, for
//! the GPU machine (scripts/gpu-check.sh runs it with the carried binary).
//!
//! 1. The device: name, memory, the CUDA context + cuBLAS measured at start-up.
//! 2. The CUDA kernels against the CPU kernels (`llmem_kernels::cuda::self_test`): cache
//!    bytes equal, attention outputs within a per-dtype tolerance.
//! 3. The whole model on the GPU against the same model on the CPU: a SmolLM2-135M-shaped
//!    model with seeded random weights (the real checkpoint cannot travel to that
//!    machine), in f32 and bf16: prefill logits through the contiguous cache, then the
//!    paged forward pass (the CUDA kernels inside the model) over a prefill and seeded
//!    decode steps. Logits must agree within 1e-3 of their scale in f32, 5e-2 in bf16.
//!
//! Every check prints one line starting `ok:` or `FAIL:`; the exit code is 1 when any
//! failed, 2 when the device cannot be opened.

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use llmem_engine::cache::paged::{KvDtype, PagedKvCache, PagedMetadata};
use llmem_engine::model::{AttnMetadata, Model};
use llmem_engine::sample::sampler::SplitMix64;
use llmem_engine::weights::files::WeightFiles;
use llmem_engine::weights::quant::WeightFormat;

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// The device to check.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// The planner preset of the random-weights model compared CPU vs GPU.
    #[arg(long, default_value = "smollm2-135m")]
    pub preset: String,
    /// Prompt tokens of the comparison.
    #[arg(long, default_value_t = 24, value_parser = super::positive_arg)]
    pub prompt_tokens: u64,
    /// Decode steps compared.
    #[arg(long, default_value_t = 16, value_parser = super::positive_arg)]
    pub gen_tokens: u64,
}

/// Outcome of the checks: lines printed as they come, and whether any failed.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, ok: bool, line: String) {
        if ok {
            println!("ok: {line}");
        } else {
            println!("FAIL: {line}");
            self.failed += 1;
        }
    }
}

pub fn run(args: GpuCheckArgs) -> anyhow::Result<()> {
    let spec = llmem_engine::device::DeviceSpec::parse(&args.device)?;
    let opened = llmem_engine::device::open_measured(spec)?;
    let dev = &opened.device;
    let mut report = Report::default();
    if let (Some(before), Some(after)) = (opened.before, opened.after) {
        use llmem_planner::human_bytes as h;
        println!(
            "device: {}; total {}; used before llmem {}; CUDA context + cuBLAS measured {}; \
             free now {}",
            opened.device_label(),
            h(after.total_bytes),
            h(before.used_bytes()),
            h(opened.context_bytes()),
            h(after.free_bytes)
        );
    } else {
        println!(
            "device: {} (no driver memory figures)",
            opened.device_label()
        );
    }
    kernel_checks(dev, &mut report);

    let shape = llmem_planner::preset(&args.preset)?;
    let mut rng = SplitMix64::new(7);
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| (rng.next_u64() % shape.vocab_size) as u32)
        .collect();
    for (dtype, tol) in [(DType::F32, 1e-3f32), (DType::BF16, 5e-2)] {
        let fmt = WeightFormat::dense(dtype)?;
        let load = |d: &Device| {
            Model::load_with(&shape, &WeightFiles::random(0), &fmt, d)
                .with_context(|| format!("random {} in {dtype:?} on {d:?}", shape.name))
        };
        let (cpu, gpu) = (load(&Device::Cpu)?, load(dev)?);
        let name = format!("{} random weights {dtype:?}", shape.name);
        match (prefill_logits(&cpu, &prompt), prefill_logits(&gpu, &prompt)) {
            (Ok(a), Ok(b)) => {
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(
                        0f32,
                        |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                    );
                let rel = worst / scale;
                report.check(
                    rel <= tol,
                    format!(
                        "{name}: prefill logits, max |cpu - gpu| / max |logit| = {rel:.2e} \
                         (tolerance {tol:.0e})"
                    ),
                );
            }
            (a, b) => report.check(
                false,
                format!(
                    "{name}: prefill: cpu {:?}, gpu {:?}",
                    a.err().map(|e| e.to_string()),
                    b.err().map(|e| e.to_string())
                ),
            ),
        }
        let kv = if dtype == DType::F32 {
            KvDtype::F32
        } else {
            KvDtype::Bf16
        };
        // Decode inputs: seeded ids, the same on both devices (random weights tend to
        // repeat one token greedily, which would exercise little).
        let feed: Vec<u32> = (0..args.gen_tokens)
            .map(|_| (rng.next_u64() % shape.vocab_size) as u32)
            .collect();
        match (
            paged_logits(&cpu, &prompt, &feed, kv),
            paged_logits(&gpu, &prompt, &feed, kv),
        ) {
            (Ok(a), Ok(b)) => {
                let mut worst_rel = 0f32;
                for (x, y) in a.iter().zip(&b) {
                    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    let worst = x
                        .iter()
                        .zip(y)
                        .map(|(p, q)| (p - q).abs())
                        .fold(
                            0f32,
                            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                        );
                    worst_rel = worst_rel.max(worst / scale);
                }
                let argmax = |v: &Vec<f32>| {
                    v.iter()
                        .enumerate()
                        .max_by(|p, q| p.1.total_cmp(q.1))
                        .map_or(0, |(i, _)| i)
                };
                let same_top1 = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| argmax(x) == argmax(y))
                    .count();
                report.check(
                    worst_rel <= tol && a.len() == b.len(),
                    format!(
                        "{name}: paged engine (CUDA kernels), prefill + {} decode steps: max \
                         |cpu - gpu| / max |logit| = {worst_rel:.2e} (tolerance {tol:.0e}); \
                         top-1 equal at {same_top1} of {} steps",
                        feed.len(),
                        a.len()
                    ),
                );
            }
            (a, b) => report.check(
                false,
                format!(
                    "{name}: paged engine: cpu {:?}, gpu {:?}",
                    a.err().map(|e| e.to_string()),
                    b.err().map(|e| e.to_string())
                ),
            ),
        }
    }
    if report.failed > 0 {
        println!("gpu-check: {} check(s) FAILED", report.failed);
        std::process::exit(1);
    }
    println!("gpu-check: all checks passed");
    Ok(())
}

#[cfg(feature = "cuda")]
fn kernel_checks(dev: &Device, report: &mut Report) {
    let Device::Cuda(d) = dev else {
        report.check(
            false,
            "kernels: the device is not a CUDA device".to_string(),
        );
        return;
    };
    match llmem_kernels::cuda::self_test(d) {
        Ok(lines) => {
            for l in lines {
                report.check(true, l.trim_start_matches("ok: ").to_string());
            }
        }
        Err(e) => report.check(false, format!("CUDA kernels vs CPU kernels: {e}")),
    }
}

#[cfg(not(feature = "cuda"))]
fn kernel_checks(_dev: &Device, report: &mut Report) {
    report.check(
        false,
        "kernels: this build has no CUDA support; build with scripts/build-cuda.sh".to_string(),
    );
}

/// Logits of the last prompt position, f32, on the host.
fn prefill_logits(model: &Model, prompt: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut cache = model.new_cache(prompt.len() + 1)?;
    let meta = AttnMetadata::single(0, prompt.len());
    let logits = model.forward_all_logits(prompt, &meta, &mut [&mut cache])?;
    let last = logits.get(prompt.len() - 1)?;
    Ok(Tensor::to_dtype(&last, DType::F32)?.to_vec1()?)
}

/// Logits (f32, host) of the paged forward pass: the prompt's last position, then one
/// decode step per token of `feed`, one sequence whose slots are its positions.
fn paged_logits(
    model: &Model,
    prompt: &[u32],
    feed: &[u32],
    kv: KvDtype,
) -> anyhow::Result<Vec<Vec<f32>>> {
    const BLOCK: usize = 16;
    let len = prompt.len() + feed.len();
    let blocks = len.div_ceil(BLOCK);
    let mut cache = PagedKvCache::new_on(model.shape(), blocks, BLOCK, kv, model.device())?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let meta = |start: usize, n: usize| PagedMetadata {
        slot_mapping: (start..start + n).map(Some).collect(),
        block_tables: table.clone(),
        max_blocks_per_seq: blocks,
        query_seq: vec![0; n],
        context_lens: (start..start + n).map(|p| p as u32 + 1).collect(),
    };
    let positions =
        |start: usize, n: usize| (start..start + n).map(|p| p as u32).collect::<Vec<_>>();
    let row =
        |t: Tensor| -> anyhow::Result<Vec<f32>> { Ok(t.get(0)?.to_dtype(DType::F32)?.to_vec1()?) };
    let p = prompt.len();
    let mut out = vec![row(model.forward_paged(
        prompt,
        &positions(0, p),
        &meta(0, p),
        &mut cache,
        &[p - 1],
    )?)?];
    for (i, &tok) in feed.iter().enumerate() {
        let pos = p + i;
        out.push(row(model.forward_paged(
            &[tok],
            &positions(pos, 1),
            &meta(pos, 1),
            &mut cache,
            &[0],
        )?)?);
    }
    Ok(out)
}
