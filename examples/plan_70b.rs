//! The lesson's question through the library API: how many 80 GB GPUs does Llama-3-70B
//! need in fp16 to serve 32 sequences of 4,096 tokens, and with what tensor parallelism?
//!
//! Run: `cargo run --release --example plan_70b`

use llmem_planner::fit::{fit, FitLimits};
use llmem_planner::{gpu, human_bytes, plan, preset, Deployment, Precision, Workload};

fn main() -> Result<(), llmem_planner::PlanError> {
    let model = preset("llama-3-70b")?;
    let workload = Workload::new(4096, 32);
    let one_gpu = Deployment::new(Precision::Fp16, gpu("h100-80gb")?);

    let p = plan(&model, &workload, &one_gpu)?;
    println!("KV per token: {} B", p.kv_bytes_per_token);
    println!(
        "KV cache:     {} B ({})",
        p.kv_cache_bytes_model,
        human_bytes(p.kv_cache_bytes_model)
    );
    println!(
        "weights:      {} B ({})",
        p.weights_bytes_model,
        human_bytes(p.weights_bytes_model)
    );
    println!(
        "on one GPU:   {} needed, fits: {}",
        human_bytes(p.per_gpu.total_bytes),
        p.fits
    );

    // Keep fp16 (no quantization): the cheapest TP that fits.
    let limits = FitLimits {
        min_bits: 16.0,
        ..FitLimits::default()
    };
    if let Some(best) = fit(&model, &workload, &one_gpu, &limits)?.best {
        println!(
            "answer:       {} x {} with TP {} ({} per GPU)",
            best.gpus,
            best.deployment.gpu.name,
            best.deployment.tp,
            human_bytes(best.per_gpu.total_bytes)
        );
    }
    Ok(())
}
