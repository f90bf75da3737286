//! One module per subcommand: clap arguments plus a `run` that returns `anyhow::Result`.
//! Shared argument parsers live here so every subcommand reads sizes the same way.

pub mod bench;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod perplexity;
pub mod plan;
pub mod sweep;

/// Output formats shared by the subcommands.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

/// A positive integer; zero and negative values get a message that says so.
pub fn positive_arg(s: &str) -> Result<u64, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if n > 0 && n <= u64::MAX as i128 => Ok(n as u64),
        Ok(n) if n <= 0 => Err(format!("{n} is not allowed: it must be a positive integer")),
        _ => Err(format!("{s:?} is not a positive integer")),
    }
}

/// A byte size such as 80GB, 80GiB or 1073741824.
pub fn bytes_arg(s: &str) -> Result<u64, String> {
    llmem_planner::parse_bytes(s).map_err(|e| e.to_string())
}

/// A fraction between 0 and 1.
pub fn fraction_arg(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "{s:?} must be a fraction between 0 and 1 (0.1 = 10%)"
        )),
    }
}

/// A fraction above 0 and at most 1 (a share of memory to use).
pub fn utilization_arg(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{s:?} must be a fraction above 0 and at most 1 (0.5 = half of physical memory)"
        )),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// Physical memory of this machine (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn physical_memory_bytes() -> anyhow::Result<u64> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {path} to find the physical memory ({e}); \
             use --memory-budget or --kv-blocks instead"
        )
    })?;
    parse_mem_total(&text).ok_or_else(|| {
        anyhow::anyhow!("no MemTotal line in {path}; use --memory-budget or --kv-blocks instead")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_is_above_zero_and_at_most_one() {
        assert_eq!(utilization_arg("0.5"), Ok(0.5));
        assert_eq!(utilization_arg("1"), Ok(1.0));
        for bad in ["0", "-0.1", "1.01", "NaN", "half"] {
            assert!(
                utilization_arg(bad).unwrap_err().contains("above 0"),
                "{bad}"
            );
        }
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemFree:  10 kB\nMemTotal:       16384 kB\nMemAvailable: 5 kB\n";
        assert_eq!(parse_mem_total(text), Some(16384 * 1024));
        assert_eq!(parse_mem_total("MemFree: 10 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
    }
}
