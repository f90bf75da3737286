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

/// One tensor of a GGUF as stored: its llama.cpp name, ggml type and shape in Hugging
/// Face order (`[rows, cols]` for a matrix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
}

/// What one rank of a TP x PP grid holds: TP rank `rank` of `tp`, the decoder layers
/// `first_layer..first_layer + layers`, the embedding and the LM head (with the final
/// norm) or not, the vocabulary split across TP ranks or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPart {
    pub tp: u64,
    pub rank: u64,
    pub first_layer: u64,
    pub layers: u64,
    pub holds_embedding: bool,
    pub holds_lm_head: bool,
    pub vocab_parallel: bool,
}

/// Bytes of `part`'s slices of a llama GGUF's tensors, each in its stored type, cut as the
/// engine cuts them: q/k/v and gate/up by output rows (q by heads, k and v by KV heads,
/// replicated when TP exceeds them), o and down by input columns, the embedding and LM
/// head by vocabulary rows when `vocab_parallel`, norms whole. A column cut that would
/// split a block of the tensor's type is an error naming the tensor (the engine refuses
/// to load it too). A tied LM head is the embedding: a last stage that does not hold the
/// embedding holds its rows as the head.
pub fn gguf_rank_weights(
    shape: &crate::ModelShape,
    tensors: &[StoredTensor],
    part: &RankPart,
) -> Result<u64, PlanError> {
    let tp = part.tp.max(1);
    let share = |n: u64| crate::plan::share(n, tp, part.rank);
    let hd = shape.head_dim;
    let q_rows = shape.num_attention_heads / tp * hd;
    let kv_rows = crate::plan::kv_heads_per_rank(shape, tp) * hd;
    let inter = share(shape.intermediate_size);
    let vocab = if part.vocab_parallel && tp > 1 {
        share(shape.vocab_size)
    } else {
        shape.vocab_size
    };
    let layers = part.first_layer..part.first_layer + part.layers;
    let overflow = |t: &str| PlanError::Overflow(format!("bytes of {t} on one rank"));
    let mut total = 0u64;
    for t in tensors {
        let whole = || gguf_tensor_bytes(&t.name, t.ty, &t.dims);
        // (rows, cols) this rank keeps of a matrix; None: the whole tensor.
        let keep: Option<(u64, u64)> = match t.name.as_str() {
            "token_embd.weight" => {
                let as_head = part.holds_lm_head && shape.tie_word_embeddings;
                if !(part.holds_embedding || as_head) {
                    continue;
                }
                Some((vocab, shape.hidden_size))
            }
            "output.weight" => {
                if !part.holds_lm_head {
                    continue;
                }
                Some((vocab, shape.hidden_size))
            }
            "output_norm.weight" => {
                if !part.holds_lm_head {
                    continue;
                }
                None
            }
            name => {
                let Some((layer, kind)) = name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(l, k)| Some((l.parse::<u64>().ok()?, k)))
                else {
                    return Err(PlanError::Config(format!(
                        "tensor {name}: not a tensor of a llama GGUF"
                    )));
                };
                if !layers.contains(&layer) {
                    continue;
                }
                let h = shape.hidden_size;
                match kind {
                    "attn_norm.weight" | "ffn_norm.weight" => None,
                    "attn_q.weight" => Some((q_rows, h)),
                    "attn_k.weight" | "attn_v.weight" => Some((kv_rows, h)),
                    "attn_output.weight" => Some((h, q_rows)),
                    "ffn_gate.weight" | "ffn_up.weight" => Some((inter, h)),
                    "ffn_down.weight" => Some((h, inter)),
                    _ => {
                        return Err(PlanError::Config(format!(
                            "tensor {name}: not a tensor of a llama GGUF"
                        )))
                    }
                }
            }
        };
        let bytes = match keep {
            None => whole()?,
            Some((rows, cols)) if tp == 1 || t.dims == [rows, cols] => whole()?,
            Some((rows, cols)) => {
                let (block_elems, block_bytes) = t.ty.block();
                if cols % block_elems != 0 {
                    return Err(PlanError::Config(format!(
                        "tensor {}: TP {tp} keeps {cols} of its {} columns per rank, which \
                         cuts its {block_elems}-value {} blocks",
                        t.name,
                        t.dims.get(1).copied().unwrap_or(0),
                        t.ty.name()
                    )));
                }
                rows.checked_mul(cols / block_elems * block_bytes)
                    .ok_or_else(|| overflow(&t.name))?
            }
        };
        total = total.checked_add(bytes).ok_or_else(|| overflow(&t.name))?;
    }
    Ok(total)
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

    /// SmolLM2-135M's tensors (30 layers, 9 query heads, 3 KV heads, 576 x 1536), in
    /// the types of the shipped Q4_1 file for the matrices and f32 norms.
    fn smollm_table(down: GgmlType) -> Vec<StoredTensor> {
        let t = |name: String, ty, dims: [u64; 2]| StoredTensor {
            name,
            ty,
            dims: dims.to_vec(),
        };
        let mut v = vec![
            t("token_embd.weight".into(), GgmlType::Q8_0, [49152, 576]),
            StoredTensor {
                name: "output_norm.weight".into(),
                ty: GgmlType::F32,
                dims: vec![576],
            },
        ];
        for l in 0..30 {
            let b = |k: &str| format!("blk.{l}.{k}.weight");
            for k in ["attn_norm", "ffn_norm"] {
                v.push(StoredTensor {
                    name: b(k),
                    ty: GgmlType::F32,
                    dims: vec![576],
                });
            }
            v.push(t(b("attn_q"), GgmlType::Q4_1, [576, 576]));
            v.push(t(b("attn_k"), GgmlType::Q4_1, [192, 576]));
            v.push(t(b("attn_v"), GgmlType::Q4_1, [192, 576]));
            v.push(t(b("attn_output"), GgmlType::Q4_1, [576, 576]));
            v.push(t(b("ffn_gate"), GgmlType::Q4_1, [1536, 576]));
            v.push(t(b("ffn_up"), GgmlType::Q4_1, [1536, 576]));
            v.push(t(b("ffn_down"), down, [576, 1536]));
        }
        v
    }

    #[test]
    fn rank_bytes_of_a_gguf_table_cut_each_tensor_as_the_engine_does() {
        let shape = crate::preset("smollm2-135m").unwrap();
        let table = smollm_table(GgmlType::Q6K);
        let whole_part = RankPart {
            tp: 1,
            rank: 0,
            first_layer: 0,
            layers: 30,
            holds_embedding: true,
            holds_lm_head: true,
            vocab_parallel: false,
        };
        let whole = gguf_rank_weights(&shape, &table, &whole_part).unwrap();
        let sum = gguf_weights(
            "x",
            table
                .iter()
                .map(|t| (t.name.as_str(), t.ty, t.dims.clone())),
        )
        .unwrap()
        .bytes;
        assert_eq!(whole, sum);
        // TP 3: a third of every matrix's rows or columns (q4_1: 20 bytes per 32; q6_K:
        // 210 per 256), K and V one head each, norms and the embedding whole.
        let row = |cols: u64, ty: GgmlType| cols / ty.block().0 * ty.block().1;
        let layer = 192 * row(576, GgmlType::Q4_1) // q
            + 2 * 64 * row(576, GgmlType::Q4_1) // k, v
            + 576 * row(192, GgmlType::Q4_1) // o
            + 2 * 512 * row(576, GgmlType::Q4_1) // gate, up
            + 576 * row(512, GgmlType::Q6K) // down
            + 2 * 576 * 4; // norms
        let embedding = 49152 * row(576, GgmlType::Q8_0);
        for rank in 0..3 {
            let part = RankPart {
                tp: 3,
                rank,
                ..whole_part
            };
            let got = gguf_rank_weights(&shape, &table, &part).unwrap();
            assert_eq!(got, 30 * layer + embedding + 576 * 4, "rank {rank}");
        }
        // A PP stage of layers 10..20 holds only those.
        let stage = RankPart {
            first_layer: 10,
            layers: 10,
            holds_embedding: false,
            holds_lm_head: false,
            ..whole_part
        };
        let per_layer = (whole - embedding - 576 * 4) / 30;
        assert_eq!(
            gguf_rank_weights(&shape, &table, &stage).unwrap(),
            10 * per_layer
        );
        // With 8 heads of 72, TP 4 would keep 144 of o's 576 columns: four and a half
        // q4_1 blocks. Refused, naming the tensor.
        let tp4 = RankPart {
            tp: 4,
            ..whole_part
        };
        let mut shape4 = shape.clone();
        shape4.num_attention_heads = 8;
        shape4.num_key_value_heads = 2;
        shape4.head_dim = 72;
        let e = gguf_rank_weights(&shape4, &table, &tp4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attn_output") && e.contains("144") && e.contains("q4_1"),
            "{e}"
        );
    }

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
