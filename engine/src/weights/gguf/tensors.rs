//! Running a GGUF file directly (`--model file.gguf`): its tensors, config, tokenizer and
//! chat template, without converting it to a model directory first.
//!
//! Owns: [`GgufWeights`], the tensor table of a llama GGUF under Hugging Face names, which
//! hands out each matrix either in its stored ggml type ([`GgufWeights::load_stored`]:
//! block formats stay `QTensor`s, f32/f16/bf16 become dense tensors) or dequantized
//! ([`GgufWeights::load_dense`], for `--dtype` requantization and for sharding); and
//! [`GgufModel::open`], which adds the [`ModelShape`], tokenizer and [`GenerationConfig`] read
//! from the file's metadata through the same code `llmem import` uses.
//!
//! Invariants: the table is checked once at open (every required tensor present with the
//! shape the `llama.*` metadata implies, no unknown tensor: `convert::plan_tensors`);
//! `attn_q`/`attn_k` rows are returned in Hugging Face order. llama.cpp's converter
//! permutes those rows within each head ([`crate::weights::gguf::file::unpermute_rows`]); a row of a
//! block format is a whole number of blocks, an independent byte range, so un-permuting
//! the rows' bytes is exact for every type. Loaded as stored, the model's weight bytes are
//! the file's tensor bytes, which [`GgufWeights::summary`] computes with the planner's
//! [`llmem_planner::gguf_weights`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use llmem_planner::checkpoint::CheckpointSummary;
use llmem_planner::{GgmlType, Precision, StoredTensor};

use crate::error::candle_message;
use crate::error::{Error, Result};
use crate::weights::gguf::convert::{plan_tensors, TensorPlan};
use crate::weights::gguf::file::{unpermute_rows, GgufFile, LlamaParams};
use crate::weights::quant::StoredMatrix;

/// The planner's name for a candle ggml type (the two enums list the same types).
pub fn ggml_type(d: GgmlDType) -> GgmlType {
    match d {
        GgmlDType::F32 => GgmlType::F32,
        GgmlDType::F16 => GgmlType::F16,
        GgmlDType::BF16 => GgmlType::Bf16,
        GgmlDType::Q4_0 => GgmlType::Q4_0,
        GgmlDType::Q4_1 => GgmlType::Q4_1,
        GgmlDType::Q5_0 => GgmlType::Q5_0,
        GgmlDType::Q5_1 => GgmlType::Q5_1,
        GgmlDType::Q8_0 => GgmlType::Q8_0,
        GgmlDType::Q8_1 => GgmlType::Q8_1,
        GgmlDType::Q2K => GgmlType::Q2K,
        GgmlDType::Q3K => GgmlType::Q3K,
        GgmlDType::Q4K => GgmlType::Q4K,
        GgmlDType::Q5K => GgmlType::Q5K,
        GgmlDType::Q6K => GgmlType::Q6K,
        GgmlDType::Q8K => GgmlType::Q8K,
    }
}

/// Which part of a matrix a TP rank reads: output rows or input columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Rows { start: usize, len: usize },
    Cols { start: usize, len: usize },
}

impl Part {
    /// Whether a column range starts and ends on blocks of `block` values (rows always
    /// do: a row holds whole blocks).
    pub fn on_blocks(self, block: usize) -> bool {
        match self {
            Part::Rows { .. } => true,
            Part::Cols { start, len } => start % block == 0 && len % block == 0,
        }
    }
}

/// A ggml tensor's bytes (a GGUF map's, or a copy) kept in the type they hold: f32/f16/bf16
/// straight into a dense tensor, a block format through [`StoredMatrix::from_ggml_bytes`]
/// (repacked straight from them where it packs). No `QTensor` copy on the way.
fn stored_from_bytes(
    dtype: GgmlDType,
    raw: &[u8],
    shape: Vec<usize>,
    device: &Device,
) -> candle_core::Result<StoredMatrix> {
    match dense_of(dtype) {
        Some(d) => Ok(StoredMatrix::Dense(Tensor::from_raw_buffer(
            raw, d, &shape, device,
        )?)),
        None => StoredMatrix::from_ggml_bytes(dtype, raw, shape, device),
    }
}

/// The candle dtype of a float ggml type; `None` for the block formats.
fn dense_of(d: GgmlDType) -> Option<DType> {
    match d {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// The tensors of a llama GGUF, by Hugging Face name.
pub struct GgufWeights {
    file: GgufFile,
    params: LlamaParams,
    /// Hugging Face name -> where it is in the file and how to reorder its rows.
    plans: HashMap<String, TensorPlan>,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("path", &self.file.path())
            .field("tensors", &self.plans.len())
            .finish()
    }
}

impl GgufWeights {
    /// Open a GGUF and check its architecture, hyper-parameters and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let params = LlamaParams::from_gguf(&file)?;
        let plans = plan_tensors(&file, &params)?
            .into_iter()
            .map(|p| (p.hf.clone(), p))
            .collect();
        Ok(GgufWeights {
            file,
            params,
            plans,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn params(&self) -> &LlamaParams {
        &self.params
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub(crate) fn contains(&self, hf_name: &str) -> bool {
        self.plans.contains_key(hf_name)
    }

    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.plans.keys().cloned().collect();
        names.sort();
        names
    }

    fn tensor_err(&self, tensor: &str, message: String) -> Error {
        Error::GgufTensor {
            path: self.path().to_path_buf(),
            tensor: tensor.to_string(),
            message,
        }
    }

    /// The plan of `hf_name`, checked to have `shape`.
    fn plan(&self, hf_name: &str, shape: &[usize]) -> Result<&TensorPlan> {
        let plan = self.plans.get(hf_name).ok_or_else(|| {
            self.tensor_err(
                hf_name,
                format!("missing (expected shape {shape:?}; no llama.cpp tensor maps to it)"),
            )
        })?;
        if plan.shape != shape {
            return Err(self.tensor_err(
                &plan.gguf,
                format!("shape {:?}, expected {shape:?} ({hf_name})", plan.shape),
            ));
        }
        Ok(plan)
    }

    /// `hf_name` dequantized to f32, rows in Hugging Face order, then cast to `dtype`.
    pub(crate) fn load_dense(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let plan = self.plan(hf_name, shape)?;
        let data = self.file.dequantize_f32(&plan.gguf)?;
        let data = self.reorder_rows(plan, data)?;
        let wrap = |e: candle_core::Error| {
            self.tensor_err(
                &plan.gguf,
                format!("building the tensor: {}", candle_message(e)),
            )
        };
        let t = Tensor::from_vec(data, shape, device).map_err(wrap)?;
        if dtype == DType::F32 {
            Ok(t)
        } else {
            t.to_dtype(dtype).map_err(wrap)
        }
    }

    /// Undo the q/k row permutation of `data` (any element type: values or bytes),
    /// `plan.shape[0]` rows of equal length; other tensors pass through.
    fn reorder_rows<T: Copy>(&self, plan: &TensorPlan, data: Vec<T>) -> Result<Vec<T>> {
        let Some(heads) = plan.unpermute_heads else {
            return Ok(data);
        };
        let rows = plan.shape[0];
        if rows == 0 || data.len() % rows != 0 {
            return Err(self.tensor_err(
                &plan.gguf,
                format!("{} values do not split into {rows} rows", data.len()),
            ));
        }
        let row_len = data.len() / rows;
        unpermute_rows(&data, rows, row_len, heads)
            .map_err(|m| self.tensor_err(&plan.gguf, format!("un-permuting rows: {m}")))
    }

    /// The matrix `hf_name` (rows, cols) in the type the file stores: a block format as a
    /// `QTensor` (rows un-permuted as whole byte ranges for q/k), f32/f16/bf16 as a dense
    /// tensor of that dtype.
    pub fn load_stored(
        &self,
        hf_name: &str,
        rows: usize,
        cols: usize,
        device: &Device,
    ) -> Result<StoredMatrix> {
        let plan = self.plan(hf_name, &[rows, cols])?;
        let (dtype, bytes) = self.file.tensor_data(&plan.gguf)?;
        let wrap = |e: candle_core::Error| {
            self.tensor_err(
                &plan.gguf,
                format!("loading {dtype:?} data: {}", candle_message(e)),
            )
        };
        // q/k rows un-permuted: one owned copy of the bytes, whatever the type.
        let reordered = match plan.unpermute_heads {
            None => None,
            Some(_) => Some(self.reorder_rows(plan, bytes.to_vec())?),
        };
        let raw = reordered.as_deref().unwrap_or(bytes);
        stored_from_bytes(dtype, raw, vec![rows, cols], device).map_err(wrap)
    }

    /// The file's tensor table as the planner reads it (llama.cpp names, ggml types,
    /// shapes in Hugging Face order), for per-rank bytes ([`llmem_planner::gguf_rank_weights`]).
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor>> {
        let mut plans: Vec<&TensorPlan> = self.plans.values().collect();
        plans.sort_by(|a, b| a.gguf.cmp(&b.gguf));
        plans
            .into_iter()
            .map(|p| {
                let info = self.file.tensor_info(&p.gguf)?;
                Ok(StoredTensor {
                    name: p.gguf.clone(),
                    ty: ggml_type(info.ggml_dtype),
                    dims: info.shape.dims().iter().map(|&d| d as u64).collect(),
                })
            })
            .collect()
    }

    /// The bytes of part of the matrix `hf_name` (rows, cols) as the file stores them,
    /// read from the map without touching the rest of the tensor: whole rows
    /// (`Part::Rows`, a TP rank's output rows; q/k rows un-permuted within the heads
    /// kept) or a range of columns of every row (`Part::Cols`, a rank's input columns),
    /// which must start and end on the type's blocks. Returns the type, the bytes and
    /// the part's shape.
    fn part_data(
        &self,
        hf_name: &str,
        rows: usize,
        cols: usize,
        part: Part,
    ) -> Result<(GgmlDType, Vec<u8>, Vec<usize>)> {
        let plan = self.plan(hf_name, &[rows, cols])?;
        let (dtype, bytes) = self.file.tensor_data(&plan.gguf)?;
        let (block, type_size) = (dtype.block_size(), dtype.type_size());
        let err = |m: String| self.tensor_err(&plan.gguf, m);
        if cols % block != 0 || bytes.len() != rows * (cols / block) * type_size {
            return Err(err(format!(
                "{} bytes do not hold {rows} rows of {cols} {dtype:?} values",
                bytes.len()
            )));
        }
        let row_bytes = cols / block * type_size;
        Ok(match part {
            Part::Rows { start, len } => {
                let Some(range) = start
                    .checked_add(len)
                    .filter(|&end| end <= rows && len > 0)
                    .map(|end| start * row_bytes..end * row_bytes)
                else {
                    return Err(err(format!("rows {start}..+{len} of {rows}")));
                };
                let data = bytes[range].to_vec();
                let data = match plan.unpermute_heads {
                    None => data,
                    Some(heads) => {
                        let head_rows = rows / heads.max(1);
                        if head_rows == 0 || start % head_rows != 0 || len % head_rows != 0 {
                            return Err(err(format!(
                                "rows {start}..+{len} are not whole heads of {head_rows} rows"
                            )));
                        }
                        unpermute_rows(&data, len, row_bytes, len / head_rows)
                            .map_err(|m| err(format!("un-permuting rows: {m}")))?
                    }
                };
                (dtype, data, vec![len, cols])
            }
            Part::Cols { start, len } => {
                if !part.on_blocks(block) || len == 0 || start + len > cols {
                    return Err(err(format!(
                        "a tensor-parallel split keeps columns {start}..{} of {cols}, which \
                         cuts its {block}-value {dtype:?} blocks (use a TP size whose share \
                         of the columns is a multiple of {block}, or --dtype to requantize)",
                        start + len
                    )));
                }
                let (from, n) = (start / block * type_size, len / block * type_size);
                let mut data = Vec::with_capacity(rows * n);
                for row in bytes.chunks_exact(row_bytes) {
                    data.extend_from_slice(&row[from..from + n]);
                }
                (dtype, data, vec![rows, len])
            }
        })
    }

    /// [`GgufWeights::part_data`] kept in the type the file stores: a block format as
    /// a (packed) quantized matrix, f32/f16/bf16 as a dense tensor of that dtype.
    pub fn load_stored_part(
        &self,
        hf_name: &str,
        rows: usize,
        cols: usize,
        part: Part,
        device: &Device,
    ) -> Result<StoredMatrix> {
        let (dtype, data, shape) = self.part_data(hf_name, rows, cols, part)?;
        let wrap = |e: candle_core::Error| {
            self.tensor_err(
                hf_name,
                format!("loading {dtype:?} data: {}", candle_message(e)),
            )
        };
        stored_from_bytes(dtype, &data, shape, device).map_err(wrap)
    }

    /// [`GgufWeights::part_data`] dequantized to f32 and cast to `dtype` (a rank's
    /// slice for `--dtype`). A column range that cuts the type's blocks dequantizes the
    /// whole matrix and keeps the columns.
    pub(crate) fn load_dense_part(
        &self,
        hf_name: &str,
        rows: usize,
        cols: usize,
        part: Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let plan = self.plan(hf_name, &[rows, cols])?;
        let block = self.file.tensor_info(&plan.gguf)?.ggml_dtype.block_size();
        if let Part::Cols { start, len } = part {
            if !part.on_blocks(block) {
                let whole = self.load_dense(hf_name, &[rows, cols], dtype, device)?;
                return whole
                    .narrow(1, start, len)
                    .and_then(|t| t.force_contiguous())
                    .map_err(|e| self.tensor_err(&plan.gguf, candle_message(e)));
            }
        }
        let (ty, data, shape) = self.part_data(hf_name, rows, cols, part)?;
        let wrap = |e: candle_core::Error| {
            self.tensor_err(
                &plan.gguf,
                format!("loading {ty:?} data: {}", candle_message(e)),
            )
        };
        let t = match dense_of(ty) {
            Some(d) => Tensor::from_raw_buffer(&data, d, &shape, device).map_err(wrap)?,
            None => qtensor_from_ggml(ty, &data, shape, &Device::Cpu)
                .and_then(|q| q.dequantize(device))
                .map_err(wrap)?,
        };
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype).map_err(wrap)
        }
    }

    /// The planner's figure for this file's weights: its tensor table summed per type.
    /// A model loaded as stored holds exactly these bytes.
    pub fn summary(&self) -> Result<CheckpointSummary> {
        let file_name = self
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let table = self.stored_tensors()?;
        let rows = table
            .iter()
            .map(|t| (t.name.as_str(), t.ty, t.dims.clone()));
        llmem_planner::gguf_weights(&file_name, rows).map_err(|e| Error::GgufRead {
            path: self.path().to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The precision holding most of the file's matrix bytes (for reports and the
    /// planner's activation and KV defaults); f32 when that type has no planner precision.
    pub fn main_precision(&self) -> Precision {
        let mut bytes: HashMap<GgmlType, u64> = HashMap::new();
        for p in self.plans.values() {
            if let Ok(info) = self.file.tensor_info(&p.gguf) {
                let ty = ggml_type(info.ggml_dtype);
                // Dimensions come from the file: saturate rather than overflow (the
                // figure only ranks the types; `summary` refuses such a file).
                let elems = info
                    .shape
                    .dims()
                    .iter()
                    .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
                let (be, bb) = ty.block();
                let entry = bytes.entry(ty).or_default();
                *entry = entry.saturating_add((elems / be.max(1)).saturating_mul(bb));
            }
        }
        let mut by: Vec<(GgmlType, u64)> = bytes.into_iter().collect();
        by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by.first()
            .and_then(|(ty, _)| ty.precision())
            .unwrap_or(Precision::Fp32)
    }
}
