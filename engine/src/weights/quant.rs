//! Load-time weight formats: which precision each tensor of a model is stored in, and
//! the quantization of a dense matrix into a GGUF block format.
//!
//! The precisions are the planner's [`Precision`] (the same enum, so planned and
//! measured bytes speak of one object). The engine runs f32, f16, bf16 and the GGUF
//! block formats q8_0, q6_k, q4_1, q4_0, q4_k; fp8/int8/int4 are planner-only.
//!
//! What stays unquantized, by design and the same in the planner:
//! - norm weights and biases: f32 under a block format (as GGUF files keep them);
//! - a matrix whose rows are not a multiple of its format's block (256 for the k-quants,
//!   32 for the others) falls back, as [`Precision::for_row_len`] says: q4_k -> q4_0,
//!   q6_k -> q8_0, q8_0/q4_0/q4_1 -> f16. SmolLM2-135M (hidden 576 = 2.25 x 256) keeps
//!   q4_k only for `down_proj` (rows of 1536) and stores the rest as q4_0;
//! - the embedding (and the LM head, tied to it or not) is quantized like the other
//!   matrices unless `keep_embeddings`, which keeps both at f16. A quantized embedding
//!   dequantizes only the rows a pass looks up (candle's `QTensor::embedding`), so no
//!   dense copy is kept.
//!
//! Activations, the rope tables and the KV cache default run in f32 when the weights
//! are block-quantized: candle's quantized matmul takes and returns f32.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use llmem_kernels::packed::{BlockFormat, PackedMatrix};
use llmem_planner::{ModelShape, Precision};

use crate::error::{Error, Result};

/// The weight precisions the engine can load, in the order `--help` lists them.
pub const ENGINE_PRECISIONS: [Precision; 8] = [
    Precision::Fp32,
    Precision::Fp16,
    Precision::Bf16,
    Precision::Q8_0,
    Precision::Q6K,
    Precision::Q4_1,
    Precision::Q4_0,
    Precision::Q4K,
];

/// Short names of [`ENGINE_PRECISIONS`] as the CLI accepts them.
pub fn engine_precision_names() -> String {
    ENGINE_PRECISIONS
        .iter()
        .map(|p| cli_name(*p))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CLI spelling of a precision: f32/f16/bf16 for the float types, GGUF names else.
pub fn cli_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "f32",
        Precision::Fp16 => "f16",
        Precision::Bf16 => "bf16",
        other => other.name(),
    }
}

/// Parse a weight dtype the engine runs; an unknown or planner-only name is an error
/// that lists the valid ones.
pub fn parse_weight_dtype(s: &str) -> Result<Precision> {
    let valid = engine_precision_names();
    let p: Precision = s
        .parse()
        .map_err(|_| Error::InvalidInput(format!("unknown weight dtype {s:?}; valid: {valid}")))?;
    if !ENGINE_PRECISIONS.contains(&p) {
        return Err(Error::InvalidInput(format!(
            "weight dtype {s:?} is known to the planner but the engine does not run it; \
             valid: {valid}"
        )));
    }
    Ok(p)
}

/// How a model's weights are stored once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightFormat {
    /// The precision of the matrices (before per-matrix block fallbacks).
    pub precision: Precision,
    /// Keep the embedding and LM head at f16 when `precision` is quantized.
    pub keep_embeddings: bool,
    /// Weights from a GGUF file: keep every tensor in the ggml type the file stores
    /// (mixed files stay mixed); `precision` then only names the file's main type, for
    /// reports. Activations, norms and the KV cache default run in f32. Ignored for
    /// safetensors weights.
    pub as_stored: bool,
}

impl WeightFormat {
    /// Every tensor in one float dtype, the pre-quantization behaviour of `Model::load`.
    pub fn dense(dtype: DType) -> Result<Self> {
        let precision = match dtype {
            DType::F32 => Precision::Fp32,
            DType::F16 => Precision::Fp16,
            DType::BF16 => Precision::Bf16,
            other => {
                return Err(Error::InvalidInput(format!(
                    "dtype {other:?} is not supported for the model; use f32, bf16 or f16"
                )))
            }
        };
        Ok(WeightFormat {
            precision,
            keep_embeddings: false,
            as_stored: false,
        })
    }

    /// A format at `precision`, embeddings quantized too (the planner's default).
    pub fn new(precision: Precision) -> Result<Self> {
        if !ENGINE_PRECISIONS.contains(&precision) {
            return Err(Error::InvalidInput(format!(
                "weight dtype {precision} is not run by the engine; valid: {}",
                engine_precision_names()
            )));
        }
        Ok(WeightFormat {
            precision,
            keep_embeddings: false,
            as_stored: false,
        })
    }

    /// The dtype of activations, rope tables and the default KV cache: the float
    /// precision itself, f32 for the block formats.
    pub fn activation_dtype(&self) -> DType {
        if self.as_stored {
            return DType::F32;
        }
        dense_dtype(self.precision).unwrap_or(DType::F32)
    }

    /// The dtype of norm weights and biases ([`Precision::unquantized`]; f32 as stored).
    pub fn vector_dtype(&self) -> DType {
        if self.as_stored {
            return DType::F32;
        }
        dense_dtype(self.precision.unquantized()).unwrap_or(DType::F32)
    }

    /// A GGUF file's tensors as the file stores them; `main` names the file's main type.
    pub fn gguf_as_stored(main: Precision) -> Self {
        WeightFormat {
            precision: main,
            keep_embeddings: false,
            as_stored: true,
        }
    }

    /// The precision the embedding and LM head are asked for (before fallbacks).
    pub fn embedding_precision(&self) -> Precision {
        if self.keep_embeddings && self.precision.is_quantized() {
            Precision::Fp16
        } else {
            self.precision
        }
    }
}

/// The candle dtype of a float precision; `None` for block formats.
pub fn dense_dtype(p: Precision) -> Option<DType> {
    match p {
        Precision::Fp32 => Some(DType::F32),
        Precision::Fp16 => Some(DType::F16),
        Precision::Bf16 => Some(DType::BF16),
        _ => None,
    }
}

/// The candle block type of a GGUF precision; `None` for the others.
pub fn ggml_dtype(p: Precision) -> Option<GgmlDType> {
    match p {
        Precision::Q8_0 => Some(GgmlDType::Q8_0),
        Precision::Q6K => Some(GgmlDType::Q6K),
        Precision::Q4_1 => Some(GgmlDType::Q4_1),
        Precision::Q4_0 => Some(GgmlDType::Q4_0),
        Precision::Q4K => Some(GgmlDType::Q4K),
        _ => None,
    }
}

/// Bytes of a `dtype` tensor of `dims`: `None` when the element count overflows or is not
/// a whole number of the type's blocks (candle multiplies unchecked).
pub(crate) fn ggml_bytes(dtype: GgmlDType, dims: &[usize]) -> Option<usize> {
    let block = dtype.block_size();
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n % block == 0)
        .and_then(|n| (n / block).checked_mul(dtype.type_size()))
}

/// The packed format, rows and columns of a `dtype` matrix of `shape` on `device`, where
/// it is packed (see [`StoredMatrix::from_qtensor`]).
fn packable(
    dtype: GgmlDType,
    shape: &[usize],
    device: &Device,
) -> Option<(BlockFormat, usize, usize)> {
    let format = match dtype {
        GgmlDType::Q8_0 => BlockFormat::Q8_0,
        GgmlDType::Q4_0 => BlockFormat::Q4_0,
        GgmlDType::Q4_1 => BlockFormat::Q4_1,
        GgmlDType::Q5_0 => BlockFormat::Q5_0,
        GgmlDType::Q5_1 => BlockFormat::Q5_1,
        GgmlDType::Q4K => BlockFormat::Q4K,
        GgmlDType::Q5K => BlockFormat::Q5K,
        GgmlDType::Q6K => BlockFormat::Q6K,
        _ => return None,
    };
    let &[rows, cols] = shape else {
        return None;
    };
    (device.is_cpu() && packed_kernel_enabled() && PackedMatrix::can_pack_as(format, rows, cols))
        .then_some((format, rows, cols))
}

fn pack(
    format: BlockFormat,
    rows: usize,
    cols: usize,
    blocks: &[u8],
) -> candle_core::Result<StoredMatrix> {
    let packed = PackedMatrix::from_blocks(format, rows, cols, blocks)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(StoredMatrix::Packed(Arc::new(packed)))
}

/// False when `LLMEM_PACKED=0` or the kernel level has no packed kernels (`scalar`): the
/// packable formats then stay in candle's layout and run on its block dots.
pub fn packed_kernel_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("LLMEM_PACKED").as_deref() != Ok("0") && PackedMatrix::fast_path_available()
    })
}

/// A `(rows, cols)` matrix stored as `precision` after its row-length fallback.
#[derive(Debug, Clone)]
pub enum StoredMatrix {
    Dense(Tensor),
    Quant(Arc<QTensor>),
    /// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K repacked for the kernels of
    /// `llmem_kernels::packed` (same bytes as candle's layout); see
    /// [`StoredMatrix::from_qtensor`] for when.
    Packed(Arc<PackedMatrix>),
}

impl StoredMatrix {
    /// Where the matrix's bytes lie in host memory, (address, length); `None` on a GPU.
    pub(crate) fn host_range(&self) -> Option<(usize, usize)> {
        match self {
            StoredMatrix::Dense(t) => crate::weights::pages::tensor_range(t),
            StoredMatrix::Quant(q) if q.device().is_cpu() => {
                let data = q.data().ok()?;
                Some((data.as_ptr() as usize, data.len()))
            }
            StoredMatrix::Quant(_) => None,
            StoredMatrix::Packed(p) => Some((p.as_bytes().as_ptr() as usize, p.bytes())),
        }
    }

    /// Bytes held, block scales included.
    pub fn bytes(&self) -> u64 {
        match self {
            StoredMatrix::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            StoredMatrix::Quant(q) => q.storage_size_in_bytes() as u64,
            StoredMatrix::Packed(p) => p.bytes() as u64,
        }
    }

    /// Rows of the matrix (its first dimension).
    pub fn num_rows(&self) -> candle_core::Result<usize> {
        Ok(match self {
            StoredMatrix::Dense(t) => t.dim(0)?,
            StoredMatrix::Quant(q) => q.shape().dims2()?.0,
            StoredMatrix::Packed(p) => p.rows(),
        })
    }

    /// A block-quantized matrix on its device: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and
    /// Q6_K on a CPU whose kernel level has packed kernels (`avx2`, `avx512`, `neon`) are repacked for
    /// `llmem_kernels::packed` (`LLMEM_PACKED=0` keeps candle's layout and block dots, to
    /// compare); everything else stays candle's.
    pub fn from_qtensor(q: QTensor) -> candle_core::Result<StoredMatrix> {
        if let Some((format, rows, cols)) = packable(q.dtype(), q.shape().dims(), &q.device()) {
            return pack(format, rows, cols, &q.data()?);
        }
        Ok(StoredMatrix::Quant(Arc::new(q)))
    }

    /// [`StoredMatrix::from_qtensor`] from a ggml tensor's bytes (`shape` in candle's
    /// order, rows first): a matrix that packs is repacked straight from `bytes` (a
    /// GGUF file's map), with no `QTensor` copy on the way.
    pub fn from_ggml_bytes(
        dtype: GgmlDType,
        bytes: &[u8],
        shape: Vec<usize>,
        device: &Device,
    ) -> candle_core::Result<StoredMatrix> {
        let want = ggml_bytes(dtype, &shape);
        if want != Some(bytes.len()) {
            return Err(candle_core::Error::Msg(format!(
                "{} bytes of {dtype:?} do not hold a {shape:?} matrix ({})",
                bytes.len(),
                match want {
                    Some(n) => format!("{n} bytes"),
                    None => format!("not whole {}-value blocks", dtype.block_size()),
                }
            )));
        }
        match packable(dtype, &shape, device) {
            Some((format, rows, cols)) => pack(format, rows, cols, bytes),
            None => Self::from_qtensor(qtensor_from_ggml(dtype, bytes, shape, device)?),
        }
    }

    /// The whole matrix in f32 (tests and tools; the engine never needs it).
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        match self {
            StoredMatrix::Dense(t) => t.to_dtype(DType::F32),
            StoredMatrix::Quant(q) => q.dequantize(&Device::Cpu),
            StoredMatrix::Packed(p) => {
                let mut out = vec![0f32; p.rows() * p.cols()];
                for (r, row) in out.chunks_exact_mut(p.cols()).enumerate() {
                    p.dequantize_row(r, row)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                Tensor::from_vec(out, (p.rows(), p.cols()), &Device::Cpu)
            }
        }
    }

    /// Rows `ids` as a dense (ids.len(), cols) tensor in `dtype` (embedding lookup):
    /// a quantized matrix dequantizes only those rows.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let t = match self {
            StoredMatrix::Dense(t) => t.index_select(ids, 0)?,
            StoredMatrix::Quant(q) => q.embedding(ids)?,
            StoredMatrix::Packed(p) => {
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let cols = p.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
                    p.dequantize_row(id as usize, row)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?
            }
        };
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    }
}

/// Store `w` (rows, cols), any float dtype, at `precision` after the row-length
/// fallback. `name` is the checkpoint tensor, for messages.
pub fn store_matrix(w: &Tensor, precision: Precision, name: &str) -> Result<StoredMatrix> {
    let (_, cols) = w.dims2().map_err(|e| Error::Tensor {
        context: format!("storing {name}"),
        message: crate::error::candle_message(e),
    })?;
    let p = precision.for_row_len(cols as u64);
    let wrap = |e: candle_core::Error| Error::Tensor {
        context: format!("quantizing {name} to {p}"),
        message: crate::error::candle_message(e),
    };
    if let Some(dtype) = dense_dtype(p) {
        return Ok(StoredMatrix::Dense(w.to_dtype(dtype).map_err(wrap)?));
    }
    let g = ggml_dtype(p).ok_or_else(|| {
        Error::InvalidInput(format!(
            "{name}: weight dtype {p} is not run by the engine; valid: {}",
            engine_precision_names()
        ))
    })?;
    let w32 = w.to_dtype(DType::F32).map_err(wrap)?;
    let q = QTensor::quantize(&w32, g).map_err(wrap)?;
    StoredMatrix::from_qtensor(q).map_err(wrap)
}

/// One line per kind of fallback the format causes on this model's matrices, e.g.
/// "q4_k: 6 matrices per layer with rows of 576 (not a multiple of 256) are stored as
/// q4_0 (q_proj, ...)". Empty when every matrix keeps the requested format. Pure
/// arithmetic on the shape, the same rule [`store_matrix`] applies.
pub fn fallback_notes(shape: &ModelShape, fmt: &WeightFormat) -> Vec<String> {
    let h = shape.hidden_size;
    let layer: [(&str, u64); 7] = [
        ("q_proj", h),
        ("k_proj", h),
        ("v_proj", h),
        ("o_proj", shape.q_dim()),
        ("gate_proj", h),
        ("up_proj", h),
        ("down_proj", shape.intermediate_size),
    ];
    // (requested, stored, cols) -> names
    let mut groups: Vec<(Precision, Precision, u64, Vec<String>)> = Vec::new();
    let mut add = |want: Precision, cols: u64, name: String| {
        let got = want.for_row_len(cols);
        if got == want {
            return;
        }
        match groups
            .iter_mut()
            .find(|g| g.0 == want && g.1 == got && g.2 == cols)
        {
            Some(g) => g.3.push(name),
            None => groups.push((want, got, cols, vec![name])),
        }
    };
    for (name, cols) in layer {
        add(fmt.precision, cols, format!("{name} (every layer)"));
    }
    let ep = fmt.embedding_precision();
    add(ep, h, "embed_tokens".to_string());
    if !shape.tie_word_embeddings {
        add(ep, h, "lm_head".to_string());
    }
    groups
        .into_iter()
        .map(|(want, got, cols, names)| {
            let block = match want.storage() {
                llmem_planner::precision::Storage::Block { elems, .. } => elems,
                llmem_planner::precision::Storage::Bits(_) => 1,
            };
            format!(
                "{}: rows of {cols} values are not a multiple of its {block}-value block; \
                 stored as {} instead: {}",
                cli_name(want),
                cli_name(got),
                names.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    pub(crate) fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..rows * cols)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * 0.1)
            .collect()
    }

    /// Documented round-trip error of each block format on uniform random weights, as
    /// the root-mean-square error relative to the RMS of the weights. The bounds are
    /// about twice the measured figures (q8_0 0.4%, q6_k 1.3%, q4_k 5%, q4_0/q4_1
    /// 7-9%), which follow from the step size: max|x| / 127, / 31, / 7 per block.
    fn documented_rel_rms(p: Precision) -> f64 {
        match p {
            Precision::Q8_0 => 0.01,
            Precision::Q6K => 0.03,
            Precision::Q4K => 0.10,
            Precision::Q4_0 | Precision::Q4_1 => 0.16,
            Precision::Fp16 => 1e-3,
            Precision::Bf16 => 8e-3,
            _ => 1e-7,
        }
    }

    #[test]
    fn every_format_round_trips_within_its_documented_error() {
        let (rows, cols) = (16, 512);
        let data = random(rows, cols, 7);
        let w = Tensor::from_vec(data.clone(), (rows, cols), &Device::Cpu).unwrap();
        let rms = (data.iter().map(|x| (x * x) as f64).sum::<f64>() / data.len() as f64).sqrt();
        for p in ENGINE_PRECISIONS {
            let stored = store_matrix(&w, p, "test.weight").unwrap();
            let back: Vec<f32> = stored
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err = (data
                .iter()
                .zip(&back)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / data.len() as f64)
                .sqrt();
            let rel = err / rms;
            assert!(
                rel <= documented_rel_rms(p),
                "{p}: relative RMS error {rel:.4} above {}",
                documented_rel_rms(p)
            );
            // Quantized formats do lose something: a test that cannot fail is no test.
            if p.is_quantized() {
                assert!(rel > 1e-4, "{p}: suspiciously exact ({rel})");
            }
            let bytes = llmem_planner::matrix_bytes(p, rows as u64, cols as u64).unwrap();
            assert_eq!(stored.bytes(), bytes, "{p}: stored bytes vs planner");
        }
    }

    #[test]
    fn rows_that_do_not_fit_a_block_fall_back_like_the_planner() {
        let w = Tensor::from_vec(random(4, 96, 3), (4, 96), &Device::Cpu).unwrap();
        for p in ENGINE_PRECISIONS {
            let stored = store_matrix(&w, p, "x.weight").unwrap();
            let want = p.for_row_len(96);
            match (&stored, want) {
                (StoredMatrix::Dense(t), w) => assert_eq!(Some(t.dtype()), dense_dtype(w)),
                (StoredMatrix::Quant(q), w) => assert_eq!(Some(q.dtype()), ggml_dtype(w)),
                (StoredMatrix::Packed(p), w) => assert_eq!(p.format().name(), w.to_string()),
            }
            assert_eq!(
                stored.bytes(),
                llmem_planner::matrix_bytes(p, 4, 96).unwrap()
            );
        }
    }

    #[test]
    fn ggml_bytes_store_like_the_qtensor_they_make() {
        let (rows, cols) = (32, 256);
        let w = Tensor::from_vec(random(rows, cols, 11), (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let direct =
                StoredMatrix::from_ggml_bytes(dtype, &bytes, vec![rows, cols], &Device::Cpu)
                    .unwrap();
            let via = StoredMatrix::from_qtensor(q).unwrap();
            // Q3_K has no packed kernel: both stay candle's; the others pack where the
            // level has kernels.
            assert_eq!(
                std::mem::discriminant(&direct),
                std::mem::discriminant(&via),
                "{dtype:?}"
            );
            let packs = dtype != GgmlDType::Q3K
                && PackedMatrix::fast_path_available()
                && packed_kernel_enabled();
            assert_eq!(
                matches!(direct, StoredMatrix::Packed(_)),
                packs,
                "{dtype:?}"
            );
            assert_eq!(direct.bytes(), via.bytes(), "{dtype:?}");
            let (a, b) = (direct.dequantize().unwrap(), via.dequantize().unwrap());
            let diff: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "{dtype:?}");
            // A buffer one byte short is an error that names the sizes, not a panic.
            let short = StoredMatrix::from_ggml_bytes(
                dtype,
                &bytes[..bytes.len() - 1],
                vec![rows, cols],
                &Device::Cpu,
            );
            assert!(short.is_err(), "{dtype:?}");
        }
    }

    #[test]
    fn unknown_and_planner_only_dtypes_list_the_valid_ones() {
        let e = parse_weight_dtype("q3_k").unwrap_err().to_string();
        assert!(
            e.contains("q3_k") && e.contains("q4_k") && e.contains("bf16"),
            "{e}"
        );
        let e = parse_weight_dtype("int4").unwrap_err().to_string();
        assert!(e.contains("planner") && e.contains("q8_0"), "{e}");
        assert_eq!(parse_weight_dtype("Q4_K").unwrap(), Precision::Q4K);
        assert_eq!(parse_weight_dtype("f32").unwrap(), Precision::Fp32);
    }
}
