//! The CPU kernel level: which instruction set the kernels of this crate run, detected
//! once at run time so that one binary (a plain `cargo build --release`, no
//! `target-cpu=native`) runs the best code each CPU has.
//!
//! Levels, lowest first on each architecture:
//! - `scalar`: plain Rust as the baseline target compiles it (SSE2 on x86-64); runs
//!   anywhere and is the reference the others are tested against;
//! - `avx2` (x86-64): AVX2, FMA and F16C, all three required. Where the CPU also has
//!   AVX-VNNI (Intel Alder Lake and later, AMD Zen 5), the quantized dot products use its
//!   256-bit `vpdpbusd`; without it (or with `LLMEM_AVX_VNNI=0`), `vpmaddubsw` +
//!   `vpmaddwd`;
//! - `avx512` (x86-64): the `avx2` set plus AVX-512 F, BW and VNNI (Intel Ice Lake and
//!   later servers, AMD Zen 4 and later);
//! - `neon` (aarch64): Advanced SIMD, which every aarch64 CPU has; the block products use
//!   `sdot` where the CPU has the dot-product extension, `smull` + `sadalp` where not.
//!
//! `LLMEM_CPU=scalar|avx2|avx512|neon` caps the level: it can lower it (to compare
//! levels, or to run the AVX2 code on an AVX-512 machine) and never raises it. A value
//! that is unknown, of another architecture, or above what the CPU has is an error from
//! [`init`], which programs call at start-up; [`level`] alone never fails (it warns once
//! on standard error and keeps the detected level).

use std::sync::OnceLock;

use crate::KernelError;

/// A kernel level; see the module docs. Ordered: a higher level runs everything a lower
/// one does, on the same architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    Scalar,
    Neon,
    Avx2,
    Avx512,
}

/// Every level, in the order `LLMEM_CPU`'s error lists them.
pub const LEVELS: [CpuLevel; 4] = [
    CpuLevel::Scalar,
    CpuLevel::Avx2,
    CpuLevel::Avx512,
    CpuLevel::Neon,
];

impl CpuLevel {
    /// The name `LLMEM_CPU` takes and reports print (`"cpu_kernels"` in JSON).
    pub const fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Neon => "neon",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512 => "avx512",
        }
    }

    /// True when this CPU has every feature the level needs.
    pub fn qualifies(self) -> bool {
        match self {
            CpuLevel::Scalar => true,
            CpuLevel::Avx2 => x86_has_avx2(),
            CpuLevel::Avx512 => x86_has_avx2() && x86_has_avx512(),
            CpuLevel::Neon => cfg!(target_arch = "aarch64"),
        }
    }

    /// The best level this CPU qualifies for.
    pub fn detected() -> CpuLevel {
        static DETECTED: OnceLock<CpuLevel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            [CpuLevel::Avx512, CpuLevel::Avx2, CpuLevel::Neon]
                .into_iter()
                .find(|l| l.qualifies())
                .unwrap_or(CpuLevel::Scalar)
        })
    }

    /// Every level this CPU can run, lowest first (the tests run each).
    pub fn available() -> Vec<CpuLevel> {
        let mut v: Vec<CpuLevel> = LEVELS.into_iter().filter(|l| l.qualifies()).collect();
        v.sort();
        v
    }

    /// True on the levels whose SIMD kernels exist (`avx2`, `avx512`, `neon`): the block
    /// matrix products pack their weights. On x86-64 the f32/f16/bf16 loops also run
    /// 256-bit code; on aarch64 they are the plain loops as the compiler vectorises them.
    pub fn has_kernels(self) -> bool {
        matches!(self, CpuLevel::Avx2 | CpuLevel::Avx512 | CpuLevel::Neon)
    }

    /// The level with its optional features as the kernels use them, e.g.
    /// `"avx2 (avx-vnni)"`, for start-up lines and `llmem info`.
    pub fn describe(self) -> String {
        let extra: Vec<&str> = match self {
            CpuLevel::Avx2 if x86_has_avx_vnni() => vec!["avx-vnni"],
            CpuLevel::Avx2 => vec!["no avx-vnni: vpmaddubsw"],
            CpuLevel::Avx512 => vec!["vnni"],
            CpuLevel::Neon if neon_dotprod() => vec!["dotprod"],
            CpuLevel::Neon => vec!["no dotprod: smull"],
            CpuLevel::Scalar => vec![],
        };
        if extra.is_empty() {
            self.name().to_string()
        } else {
            format!("{} ({})", self.name(), extra.join(", "))
        }
    }

    /// True when the `avx2` level's quantized dots can use AVX-VNNI's 256-bit form.
    pub fn avx_vnni(self) -> bool {
        self == CpuLevel::Avx2 && x86_has_avx_vnni()
    }
}

impl std::fmt::Display for CpuLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CpuLevel {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, KernelError> {
        LEVELS
            .into_iter()
            .find(|l| l.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                KernelError::Invalid(format!(
                    "LLMEM_CPU={s:?} is not a kernel level; valid: {}",
                    level_names()
                ))
            })
    }
}

fn level_names() -> String {
    LEVELS.map(CpuLevel::name).join(", ")
}

/// The level a `LLMEM_CPU` value asks for, checked against this CPU: unknown names,
/// levels of another architecture and levels above the detected one are errors that say
/// what this CPU can run.
pub fn capped(value: Option<&str>) -> Result<CpuLevel, KernelError> {
    let best = CpuLevel::detected();
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(best);
    };
    let asked: CpuLevel = value.parse()?;
    if asked.qualifies() && asked <= best {
        return Ok(asked);
    }
    let can: Vec<&str> = CpuLevel::available().iter().map(|l| l.name()).collect();
    Err(KernelError::Invalid(format!(
        "LLMEM_CPU={value:?}: this CPU cannot run the {} level (it lacks {}); it can run: {}",
        asked.name(),
        missing_features(asked),
        can.join(", ")
    )))
}

/// What the CPU lacks for `level`, for error messages.
fn missing_features(level: CpuLevel) -> String {
    match level {
        CpuLevel::Neon if !cfg!(target_arch = "aarch64") => "an aarch64 CPU".into(),
        CpuLevel::Avx2 | CpuLevel::Avx512 if !cfg!(target_arch = "x86_64") => {
            "an x86-64 CPU".into()
        }
        CpuLevel::Avx2 => "AVX2, FMA or F16C".into(),
        CpuLevel::Avx512 if !x86_has_avx2() => "AVX2, FMA or F16C".into(),
        CpuLevel::Avx512 => "AVX-512 F, BW or VNNI".into(),
        _ => "nothing".into(),
    }
}

static LEVEL: OnceLock<Result<CpuLevel, KernelError>> = OnceLock::new();

fn resolve() -> &'static Result<CpuLevel, KernelError> {
    LEVEL.get_or_init(|| capped(std::env::var("LLMEM_CPU").ok().as_deref()))
}

/// Resolve the level from the CPU and `LLMEM_CPU` (once): call at start-up so that a bad
/// `LLMEM_CPU` stops the program with its message before any work.
pub fn init() -> Result<CpuLevel, KernelError> {
    resolve().clone()
}

/// The level every kernel of this crate runs. With a bad `LLMEM_CPU` (which [`init`]
/// reports) this warns once and keeps the detected level.
pub fn level() -> CpuLevel {
    match resolve() {
        Ok(l) => *l,
        Err(e) => {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| eprintln!("warning: {e}; running {}", CpuLevel::detected()));
            CpuLevel::detected()
        }
    }
}

/// True on aarch64 CPUs with the dot-product extension (`sdot`; ARMv8.2 and later: Apple
/// M1+, Graviton 2+, Cortex-A55/A76+), which the `neon` level's block kernels use.
pub fn neon_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn x86_has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// AVX-VNNI, unless `LLMEM_AVX_VNNI=0` turns it off (to run, on a CPU that has it, the
/// `avx2` code of CPUs that have not: Intel before Alder Lake, AMD before Zen 5).
#[cfg(target_arch = "x86_64")]
fn x86_has_avx_vnni() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avxvnni")
            && std::env::var("LLMEM_AVX_VNNI").as_deref() != Ok("0")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_has_avx512() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn x86_has_avx_vnni() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for l in LEVELS {
            assert_eq!(l.name().parse::<CpuLevel>().unwrap(), l);
        }
        assert_eq!(" AVX2 ".parse::<CpuLevel>().unwrap(), CpuLevel::Avx2);
        let e = "sse9".parse::<CpuLevel>().unwrap_err().to_string();
        assert!(
            e.contains("\"sse9\"") && e.contains("scalar, avx2, avx512, neon"),
            "{e}"
        );
    }

    #[test]
    fn the_cap_lowers_and_never_raises() {
        let best = CpuLevel::detected();
        assert_eq!(capped(None).unwrap(), best);
        assert_eq!(capped(Some("")).unwrap(), best);
        assert_eq!(capped(Some("scalar")).unwrap(), CpuLevel::Scalar);
        for l in LEVELS {
            match capped(Some(l.name())) {
                Ok(got) => assert!(got == l && l <= best && l.qualifies()),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!l.qualifies() || l > best, "{l}: {e}");
                    assert!(e.contains("it can run: scalar"), "{e}");
                }
            }
        }
        // The other architecture's level is always refused.
        let foreign = if cfg!(target_arch = "aarch64") {
            "avx2"
        } else {
            "neon"
        };
        assert!(capped(Some(foreign)).is_err());
    }

    #[test]
    fn available_levels_start_at_scalar_and_end_at_the_detected_one() {
        let v = CpuLevel::available();
        assert_eq!(v.first(), Some(&CpuLevel::Scalar));
        assert_eq!(v.last(), Some(&CpuLevel::detected()));
        eprintln!("this CPU: {}", CpuLevel::detected().describe());
    }
}
