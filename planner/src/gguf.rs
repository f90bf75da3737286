//! Bytes of a GGUF file's weights, from its tensor table alone.
//!
//! A GGUF tensor is stored in one ggml type: a float type (one element per "block") or a
//! block format that packs `block_elems` consecutive values of a row with their scales
//! into `block_bytes`. Its bytes are therefore `elements / block_elems * block_bytes`,
//! with no padding between rows. [`gguf_weights`] sums that over a tensor table, per type;
//! the engine loads every tensor of such a file in its stored type and its measured weight
//! bytes must equal this sum exactly (a tied LM head is absent from the file and shared in
//! the engine, so both count it once).
//!
//! Pure arithmetic: the caller reads the table (the engine does, with candle's parser).
//! Type sizes follow ggml's `ggml_type_traits` (ggml/src/ggml.c).

use crate::checkpoint::{CheckpointSummary, DtypeTotal};
use crate::{PlanError, Precision};

/// The ggml tensor types a GGUF weight can have (those candle 0.11 reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ];

    /// The name llama.cpp prints (`q4_K`, `f16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q8_1 => "q8_1",
            Self::Q2K => "q2_K",
            Self::Q3K => "q3_K",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
            Self::Q8K => "q8_K",
        }
    }

    /// `(elements per block, bytes per block)`, scales included.
    pub fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8K => (256, 292),
        }
    }

    /// The planner precision with the same storage, where there is one.
    pub fn precision(self) -> Option<Precision> {
        match self {
            Self::F32 => Some(Precision::Fp32),
            Self::F16 => Some(Precision::Fp16),
            Self::Bf16 => Some(Precision::Bf16),
            Self::Q8_0 => Some(Precision::Q8_0),
            Self::Q6K => Some(Precision::Q6K),
            Self::Q4_1 => Some(Precision::Q4_1),
            Self::Q4_0 => Some(Precision::Q4_0),
            Self::Q4K => Some(Precision::Q4K),
            _ => None,
        }
    }
}

/// Bytes of one tensor of shape `dims` (any order; the row length is checked by the
/// reader) stored as `ty`. An element count that is not a whole number of blocks is an
/// error naming `tensor`.
pub fn gguf_tensor_bytes(tensor: &str, ty: GgmlType, dims: &[u64]) -> Result<u64, PlanError> {
    let elems = dims
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| PlanError::Overflow(format!("elements of {tensor}")))?;
    let (block_elems, block_bytes) = ty.block();
    if elems % block_elems != 0 {
        return Err(PlanError::Config(format!(
            "tensor {tensor}: {elems} elements is not a whole number of {}-element {} blocks",
            block_elems,
            ty.name()
        )));
    }
    (elems / block_elems)
        .checked_mul(block_bytes)
        .ok_or_else(|| PlanError::Overflow(format!("bytes of {tensor}")))
}

/// Totals of a GGUF tensor table `(name, type, dims)`, per type (keyed by
/// [`GgmlType::name`]), in the form `llmem inspect` prints for safetensors headers.
pub fn gguf_weights<'a>(
    file_name: &str,
    tensors: impl IntoIterator<Item = (&'a str, GgmlType, Vec<u64>)>,
) -> Result<CheckpointSummary, PlanError> {
    let mut s = CheckpointSummary {
        files: vec![file_name.to_string()],
        ..CheckpointSummary::default()
    };
    let overflow = || PlanError::Overflow(format!("weight bytes of {file_name}"));
    for (name, ty, dims) in tensors {
        let bytes = gguf_tensor_bytes(name, ty, &dims)?;
        let params = dims.iter().product::<u64>();
        let t = s.by_dtype.entry(ty.name().to_string()).or_default();
        *t = DtypeTotal {
            tensors: t.tensors + 1,
            params: t.params.checked_add(params).ok_or_else(overflow)?,
            bytes: t.bytes.checked_add(bytes).ok_or_else(overflow)?,
        };
        s.tensors += 1;
        s.params = s.params.checked_add(params).ok_or_else(overflow)?;
        s.bytes = s.bytes.checked_add(bytes).ok_or_else(overflow)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_formats_count_their_scales() {
        // q8_0: 34 bytes per 32 values; q4_K: 144 per 256; f16: 2 per value.
        assert_eq!(
            gguf_tensor_bytes("a", GgmlType::Q8_0, &[64, 3]).unwrap(),
            6 * 34
        );
        assert_eq!(
            gguf_tensor_bytes("b", GgmlType::Q4K, &[512, 2]).unwrap(),
            4 * 144
        );
        assert_eq!(gguf_tensor_bytes("c", GgmlType::F16, &[5, 7]).unwrap(), 70);
        let e = gguf_tensor_bytes("blk.0.x", GgmlType::Q4_0, &[40]).unwrap_err();
        assert!(e.to_string().contains("blk.0.x"), "{e}");
    }

    #[test]
    fn totals_are_per_type_and_sum_to_the_whole() {
        let s = gguf_weights(
            "m.gguf",
            [
                ("w1", GgmlType::Q6K, vec![256, 4]),
                ("w2", GgmlType::Q6K, vec![256, 2]),
                ("n", GgmlType::F32, vec![256]),
            ],
        )
        .unwrap();
        assert_eq!(s.by_dtype["q6_K"].bytes, 6 * 210);
        assert_eq!(s.by_dtype["q6_K"].tensors, 2);
        assert_eq!(s.by_dtype["f32"].bytes, 1024);
        assert_eq!(s.bytes, 6 * 210 + 1024);
        assert_eq!((s.tensors, s.params), (3, 256 * 7));
    }

    #[test]
    fn shared_precisions_agree_with_the_planner_storage() {
        use crate::precision::Storage;
        for ty in GgmlType::ALL {
            if let Some(p) = ty.precision() {
                let (elems, bytes) = ty.block();
                let want = match p.storage() {
                    Storage::Bits(b) => (1, b / 8),
                    Storage::Block { elems, bytes } => (elems, bytes),
                };
                assert_eq!((elems, bytes), want, "{ty:?}");
            }
        }
    }
}
