//! The GPU catalog, and parsing and printing of byte sizes.
//!
//! Memory is the total the driver reports for the card (nvidia-smi's "MiB" figure times
//! 2^20), which is what a serving engine can divide; bandwidths are NVIDIA's datasheet
//! peaks. The runtime overhead per GPU (CUDA context, cuBLAS/NCCL workspaces) is a
//! default to be replaced by a measurement (`--runtime-overhead`).

use serde::Serialize;

use crate::PlanError;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One GPU model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    pub description: String,
    pub memory_bytes: u64,
    /// Peak memory bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// GPU-to-GPU bandwidth per direction used for all-reduce estimates, bytes per second.
    pub interconnect_bytes_per_s: u64,
    /// Default runtime overhead per GPU: CUDA context plus library workspaces.
    pub runtime_overhead_bytes: u64,
}

struct Entry {
    name: &'static str,
    description: &'static str,
    memory_mib: u64,
    bandwidth_gb_s: u64,
    interconnect_gb_s: u64,
    overhead_mib: u64,
}

const CATALOG: &[Entry] = &[
    Entry {
        name: "h100-80gb",
        description: "NVIDIA H100 SXM5 80GB (HBM3, NVLink 4)",
        memory_mib: 81_559,
        bandwidth_gb_s: 3_350,
        interconnect_gb_s: 450,
        overhead_mib: 1_024,
    },
    Entry {
        name: "h100-pcie-80gb",
        description: "NVIDIA H100 PCIe 80GB (HBM2e, PCIe 5)",
        memory_mib: 81_559,
        bandwidth_gb_s: 2_000,
        interconnect_gb_s: 64,
        overhead_mib: 1_024,
    },
    Entry {
        name: "h200-141gb",
        description: "NVIDIA H200 SXM 141GB (HBM3e, NVLink 4)",
        memory_mib: 143_771,
        bandwidth_gb_s: 4_800,
        interconnect_gb_s: 450,
        overhead_mib: 1_024,
    },
    Entry {
        name: "a100-40gb",
        description: "NVIDIA A100 SXM4 40GB (HBM2, NVLink 3)",
        memory_mib: 40_960,
        bandwidth_gb_s: 1_555,
        interconnect_gb_s: 300,
        overhead_mib: 1_024,
    },
    Entry {
        name: "a100-80gb",
        description: "NVIDIA A100 SXM4 80GB (HBM2e, NVLink 3)",
        memory_mib: 81_920,
        bandwidth_gb_s: 2_039,
        interconnect_gb_s: 300,
        overhead_mib: 1_024,
    },
    Entry {
        name: "l40s-48gb",
        description: "NVIDIA L40S 48GB (GDDR6, PCIe 4)",
        memory_mib: 46_068,
        bandwidth_gb_s: 864,
        interconnect_gb_s: 32,
        overhead_mib: 768,
    },
    Entry {
        name: "l4-24gb",
        description: "NVIDIA L4 24GB (GDDR6, PCIe 4)",
        memory_mib: 23_034,
        bandwidth_gb_s: 300,
        interconnect_gb_s: 32,
        overhead_mib: 768,
    },
    Entry {
        name: "a10-24gb",
        description: "NVIDIA A10 24GB (GDDR6, PCIe 4)",
        memory_mib: 23_028,
        bandwidth_gb_s: 600,
        interconnect_gb_s: 32,
        overhead_mib: 768,
    },
    Entry {
        name: "rtx4090-24gb",
        description: "NVIDIA GeForce RTX 4090 24GB (GDDR6X, PCIe 4)",
        memory_mib: 24_564,
        bandwidth_gb_s: 1_008,
        interconnect_gb_s: 32,
        overhead_mib: 768,
    },
    Entry {
        name: "rtx3090-24gb",
        description: "NVIDIA GeForce RTX 3090 24GB (GDDR6X, PCIe 4)",
        memory_mib: 24_576,
        bandwidth_gb_s: 936,
        interconnect_gb_s: 32,
        overhead_mib: 768,
    },
];

fn entry_to_gpu(e: &Entry) -> Gpu {
    Gpu {
        name: e.name.to_string(),
        description: e.description.to_string(),
        memory_bytes: e.memory_mib * MIB,
        bandwidth_bytes_per_s: e.bandwidth_gb_s * 1_000_000_000,
        interconnect_bytes_per_s: e.interconnect_gb_s * 1_000_000_000,
        runtime_overhead_bytes: e.overhead_mib * MIB,
    }
}

/// Every GPU in the catalog.
pub fn catalog() -> Vec<Gpu> {
    CATALOG.iter().map(entry_to_gpu).collect()
}

/// A catalog GPU by name.
pub fn gpu(name: &str) -> Result<Gpu, PlanError> {
    let key = name.trim().to_ascii_lowercase();
    CATALOG
        .iter()
        .find(|e| e.name == key)
        .map(entry_to_gpu)
        .ok_or_else(|| {
            PlanError::Invalid(format!(
                "unknown GPU {name:?}; accepted: {} (or --gpu-memory BYTES for any other device)",
                CATALOG
                    .iter()
                    .map(|e| e.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// A device of a given memory size that is not in the catalog. Bandwidths are unknown
/// (0: speed bounds are then omitted); runtime overhead defaults to 1 GiB.
pub fn custom_gpu(memory_bytes: u64) -> Gpu {
    Gpu {
        name: "custom".to_string(),
        description: format!("a device with {} of memory", human_bytes(memory_bytes)),
        memory_bytes,
        bandwidth_bytes_per_s: 0,
        interconnect_bytes_per_s: 0,
        runtime_overhead_bytes: GIB,
    }
}

/// Parse a byte size: `80GB` (10^9), `80GiB` (2^30), `512MiB`, `1.5TB`, `1234` (bytes).
/// Units are case-insensitive; `G`/`M`/`K`/`T` alone mean the binary units.
pub fn parse_bytes(text: &str) -> Result<u64, PlanError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num = num.replace('_', "");
    let bad = || {
        PlanError::Invalid(format!(
            "cannot read {text:?} as a byte size; write e.g. 80GB, 80GiB, 512MiB or 1073741824"
        ))
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => MIB as f64,
        "g" | "gib" => GIB as f64,
        "t" | "tib" => (GIB as f64) * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Bytes in binary units with the unit labelled: `40.00 GiB`, `320.0 KiB`, `12 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Bytes in decimal gigabytes, the unit GPU vendors print on the box: `85.52 GB`.
pub fn human_gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// An integer with thousands separators: `42,949,672,960`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_binary_units() {
        assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("80GiB").unwrap(), 80 * GIB);
        assert_eq!(parse_bytes("80 gib").unwrap(), 80 * GIB);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 * MIB);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("1234").unwrap(), 1234);
        assert_eq!(parse_bytes("2G").unwrap(), 2 * GIB);
        for bad in ["", "GB", "-5GB", "80XB", "1e400GB"] {
            let err = parse_bytes(bad).unwrap_err().to_string();
            assert!(err.contains("byte size"), "{bad}: {err}");
        }
    }

    #[test]
    fn formats_units() {
        assert_eq!(human_bytes(42_949_672_960), "40.00 GiB");
        assert_eq!(human_bytes(327_680), "320.00 KiB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(grouped(42_949_672_960), "42,949,672,960");
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(100), "100");
    }

    #[test]
    fn catalog_names_resolve() {
        for g in catalog() {
            assert_eq!(gpu(&g.name).unwrap(), g);
        }
        let err = gpu("b200").unwrap_err().to_string();
        assert!(err.contains("b200") && err.contains("h100-80gb"), "{err}");
    }
}
