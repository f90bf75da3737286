//! Storage precisions for weights and for the KV cache, and the one function that says
//! how many bytes a weight matrix takes at a precision.
//!
//! Block formats (GGUF's q8_0, q4_0, q4_1, q4_k, q6_k) store a block of consecutive
//! weights of one row with its scales, so their bits per weight include the scales:
//! q8_0 = 34 bytes per 32 weights = 8.5 bits. A row whose length is not a multiple of
//! the block falls back to a format it fits (see [`Precision::fallback`]); the planner
//! and the engine call the same [`matrix_bytes`], so planned and measured bytes agree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// How a format stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A fixed number of bits per element, no scales (fp32, fp16, bf16, fp8, int8, int4).
    Bits(u64),
    /// Blocks of `elems` consecutive elements of a row, `bytes` each, scales included.
    Block { elems: u64, bytes: u64 },
}

/// Weight precisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    Fp8,
    Int8,
    Int4,
    Q8_0,
    Q6K,
    Q4_1,
    Q4_0,
    Q4K,
}

impl Precision {
    pub const ALL: [Precision; 11] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Bf16,
        Precision::Fp8,
        Precision::Int8,
        Precision::Int4,
        Precision::Q8_0,
        Precision::Q6K,
        Precision::Q4_1,
        Precision::Q4_0,
        Precision::Q4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::Q4_1 => "q4_1",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
        }
    }

    pub fn storage(self) -> Storage {
        match self {
            Self::Fp32 => Storage::Bits(32),
            Self::Fp16 | Self::Bf16 => Storage::Bits(16),
            Self::Fp8 | Self::Int8 => Storage::Bits(8),
            Self::Int4 => Storage::Bits(4),
            // d (f16) + 32 x i8
            Self::Q8_0 => Storage::Block {
                elems: 32,
                bytes: 34,
            },
            // ql (128) + qh (64) + 16 x i8 scales + d (f16)
            Self::Q6K => Storage::Block {
                elems: 256,
                bytes: 210,
            },
            // d, m (f16) + 16 bytes of nibbles
            Self::Q4_1 => Storage::Block {
                elems: 32,
                bytes: 20,
            },
            // d (f16) + 16 bytes of nibbles
            Self::Q4_0 => Storage::Block {
                elems: 32,
                bytes: 18,
            },
            // d, dmin (f16) + 12 bytes of 6-bit scales + 128 bytes of nibbles
            Self::Q4K => Storage::Block {
                elems: 256,
                bytes: 144,
            },
        }
    }

    /// Bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        match self.storage() {
            Storage::Bits(b) => b as f64,
            Storage::Block { elems, bytes } => (bytes * 8) as f64 / elems as f64,
        }
    }

    /// True for formats that are not a plain float type the model was trained in.
    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::Fp32 | Self::Fp16 | Self::Bf16)
    }

    /// The precision of the tensors that stay unquantized (norm weights and biases):
    /// the float formats keep their own; GGUF block formats keep f32 (as GGUF files do);
    /// fp8/int8/int4 keep fp16.
    pub fn unquantized(self) -> Precision {
        match self {
            Self::Fp32 | Self::Fp16 | Self::Bf16 => self,
            Self::Fp8 | Self::Int8 | Self::Int4 => Self::Fp16,
            _ => Self::Fp32,
        }
    }

    /// The format a matrix falls back to when its row length is not a multiple of this
    /// format's block: k-quants (256) to the 32-block format of the same size class,
    /// 32-block formats to f16. `None` for formats without blocks.
    pub fn fallback(self) -> Option<Precision> {
        match self {
            Self::Q4K => Some(Self::Q4_0),
            Self::Q6K => Some(Self::Q8_0),
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => Some(Self::Fp16),
            _ => None,
        }
    }

    /// The precision a `[rows, cols]` matrix is actually stored in (after fallbacks).
    pub fn for_row_len(self, cols: u64) -> Precision {
        let mut p = self;
        loop {
            match p.storage() {
                Storage::Block { elems, .. } if cols % elems != 0 => match p.fallback() {
                    Some(next) => p = next,
                    None => return p,
                },
                _ => return p,
            }
        }
    }

    /// The activation (compute) dtype bytes for a forward pass at this weight precision:
    /// 4 for fp32, else 2 (fp16/bf16 compute, as GPU kernels for quantized weights do).
    pub fn activation_bytes(self) -> u64 {
        if self == Self::Fp32 {
            4
        } else {
            2
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn accepted_precisions() -> String {
    Precision::ALL.map(|p| p.name()).join(", ")
}

impl FromStr for Precision {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let p = match lower.as_str() {
            "f32" | "fp32" | "float32" => Self::Fp32,
            "f16" | "fp16" | "float16" => Self::Fp16,
            "bf16" | "bfloat16" => Self::Bf16,
            "fp8" | "f8" | "e4m3" => Self::Fp8,
            "int8" | "i8" => Self::Int8,
            "int4" | "i4" => Self::Int4,
            "q8_0" => Self::Q8_0,
            "q6_k" | "q6k" => Self::Q6K,
            "q4_1" => Self::Q4_1,
            "q4_0" => Self::Q4_0,
            "q4_k" | "q4k" | "q4_k_m" => Self::Q4K,
            _ => {
                return Err(PlanError::Invalid(format!(
                    "unknown precision {s:?}; accepted: {}",
                    accepted_precisions()
                )))
            }
        };
        Ok(p)
    }
}

/// Bytes of a `[rows, cols]` matrix stored at `precision`, after block fallbacks.
/// The one function the planner and the engine both use for weight bytes.
pub fn matrix_bytes(precision: Precision, rows: u64, cols: u64) -> Result<u64, PlanError> {
    let p = precision.for_row_len(cols);
    let overflow = || PlanError::Overflow(format!("bytes of a {rows}x{cols} matrix at {p}"));
    match p.storage() {
        Storage::Bits(bits) => {
            let bits_total = rows
                .checked_mul(cols)
                .and_then(|n| n.checked_mul(bits))
                .ok_or_else(overflow)?;
            Ok(bits_total.div_ceil(8))
        }
        Storage::Block { elems, bytes } => rows
            .checked_mul(cols / elems)
            .and_then(|n| n.checked_mul(bytes))
            .ok_or_else(overflow),
    }
}

/// Bytes of a vector (norm weight or bias); vectors are never block-quantized.
pub fn vector_bytes(precision: Precision, len: u64) -> Result<u64, PlanError> {
    matrix_bytes(precision.unquantized(), 1, len)
}

/// KV cache element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    Fp32,
    Fp16,
    Bf16,
    Fp8,
    Int8,
    /// ggml's q8_0 blocks: 32 int8 values and one f16 scale (34 bytes per 32 values),
    /// the quantized cache llmem's engine runs.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// ggml's q4_0 blocks: 32 4-bit values and one f16 scale (18 bytes per 32 values).
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl KvDtype {
    pub const ALL: [KvDtype; 7] = [
        KvDtype::Fp32,
        KvDtype::Fp16,
        KvDtype::Bf16,
        KvDtype::Fp8,
        KvDtype::Int8,
        KvDtype::Q8_0,
        KvDtype::Q4_0,
    ];

    /// Bytes per value, rounded down for the block formats (q8_0: 1, q4_0: 0; their
    /// scales and half bytes are in [`KvDtype::row_bytes`], which sizes the cache).
    pub fn bytes(self) -> u64 {
        match self {
            Self::Fp32 => 4,
            Self::Fp16 | Self::Bf16 => 2,
            Self::Fp8 | Self::Int8 | Self::Q8_0 => 1,
            Self::Q4_0 => 0,
        }
    }

    /// The block of a block format: (values, bytes).
    fn block(self) -> Option<(u64, u64)> {
        match self {
            Self::Q8_0 => Some((32, 34)),
            Self::Q4_0 => Some((32, 18)),
            _ => None,
        }
    }

    /// Bytes of a row of `values` values (one KV head of one token), scales included:
    /// q8_0 stores `ceil(values / 32)` blocks of 34 bytes, q4_0 blocks of 18.
    pub fn row_bytes(self, values: u64) -> u64 {
        match self.block() {
            Some((n, bytes)) => values.div_ceil(n) * bytes,
            None => values * self.bytes(),
        }
    }

    /// The size of one value in words: "2 bytes", or "34 bytes per 32 values" for q8_0.
    pub fn describe_bytes(self) -> String {
        match self.block() {
            Some((n, bytes)) => format!("{bytes} bytes per {n} values"),
            None => format!("{} bytes", self.bytes()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// The KV dtype that goes with a weight precision by default: the float formats
    /// keep their own; quantized weights keep an fp16 cache.
    pub fn default_for(p: Precision) -> KvDtype {
        match p {
            Precision::Fp32 => Self::Fp32,
            Precision::Bf16 => Self::Bf16,
            _ => Self::Fp16,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = PlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::Fp32),
            "f16" | "fp16" | "float16" => Ok(Self::Fp16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp8" | "f8" | "e4m3" => Ok(Self::Fp8),
            "int8" | "i8" => Ok(Self::Int8),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" | "q4" => Ok(Self::Q4_0),
            _ => Err(PlanError::Invalid(format!(
                "unknown KV cache dtype {s:?}; accepted: {}",
                KvDtype::ALL.map(|k| k.name()).join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_kv_rows_count_their_scales() {
        let q8: KvDtype = "q8_0".parse().unwrap();
        assert_eq!(q8, KvDtype::Q8_0);
        assert_eq!(q8.row_bytes(64), 68);
        assert_eq!(q8.row_bytes(128), 136);
        // A row that does not fill its last block still stores it whole.
        assert_eq!(q8.row_bytes(80), 102);
        assert_eq!(KvDtype::Fp16.row_bytes(64), 128);
        let q4: KvDtype = "q4_0".parse().unwrap();
        assert_eq!(q4.row_bytes(64), 36);
        assert_eq!(q4.row_bytes(80), 54);
        assert_eq!(q4.describe_bytes(), "18 bytes per 32 values");
        let shape = crate::preset("smollm2-135m").unwrap();
        assert_eq!(shape.kv_bytes_per_token_in(q8), 2 * 30 * 3 * 68);
        assert_eq!(
            shape.kv_bytes_per_token_in(KvDtype::Fp16),
            shape.kv_bytes_per_token(2)
        );
        assert_eq!(serde_json::to_string(&q8).unwrap(), "\"q8_0\"");
    }

    #[test]
    fn bits_per_weight_include_scales() {
        let bpw = |p: Precision| p.bits_per_weight();
        assert_eq!(bpw(Precision::Q8_0), 8.5);
        assert_eq!(bpw(Precision::Q4_0), 4.5);
        assert_eq!(bpw(Precision::Q4_1), 5.0);
        assert_eq!(bpw(Precision::Q4K), 4.5);
        assert_eq!(bpw(Precision::Q6K), 6.5625);
        assert_eq!(bpw(Precision::Int4), 4.0);
    }

    #[test]
    fn matrix_bytes_by_format() {
        assert_eq!(
            matrix_bytes(Precision::Fp16, 4096, 4096).unwrap(),
            33_554_432
        );
        assert_eq!(matrix_bytes(Precision::Int4, 3, 3).unwrap(), 5); // 36 bits -> 5 bytes
        assert_eq!(matrix_bytes(Precision::Q8_0, 2, 64).unwrap(), 2 * 2 * 34);
        assert_eq!(matrix_bytes(Precision::Q4K, 1, 512).unwrap(), 2 * 144);
    }

    #[test]
    fn rows_that_do_not_fit_a_block_fall_back() {
        // 576 = 18 x 32 but not a multiple of 256: q4_k falls back to q4_0.
        assert_eq!(Precision::Q4K.for_row_len(576), Precision::Q4_0);
        assert_eq!(Precision::Q6K.for_row_len(576), Precision::Q8_0);
        assert_eq!(Precision::Q4_0.for_row_len(100), Precision::Fp16);
        assert_eq!(Precision::Q4K.for_row_len(100), Precision::Fp16);
        assert_eq!(matrix_bytes(Precision::Q4K, 1, 576).unwrap(), 18 * 18);
    }

    #[test]
    fn parse_names_and_errors() {
        assert_eq!("Q4_K".parse::<Precision>().unwrap(), Precision::Q4K);
        assert_eq!("bf16".parse::<KvDtype>().unwrap(), KvDtype::Bf16);
        let err = "int3".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("int3") && err.contains("q6_k"), "{err}");
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
    }

    #[test]
    fn overflow_is_an_error() {
        assert!(matrix_bytes(Precision::Fp32, u64::MAX / 2, 4).is_err());
    }
}
