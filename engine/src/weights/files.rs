//! Weight files and tokenizer of a Hugging Face model directory.
//!
//! [`WeightFiles`] memory-maps `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, parses every header once, and hands out tensors
//! by name after checking them: the tensor must exist, have exactly the expected shape and
//! a floating dtype (f32, bf16 or f16); it is then converted to the dtype the model runs
//! in. Invariants: a file whose header does not describe exactly its own length (a
//! truncated or padded file) is rejected when opened, before any tensor is read; every
//! error names the file and the tensor. A GGUF file can stand in for the safetensors
//! files ([`WeightFiles::from_gguf`], see `crate::weights::gguf::tensors`): `load` then dequantizes.
//!
//! [`WeightFiles::random`] stands in for a checkpoint (`--random-weights`): every tensor
//! asked for is generated on the spot, seeded by the seed and the tensor's name, directly
//! in the requested dtype (no f32 copy of the model is ever made), with the shape the
//! model asks for. Norm weights are ones, biases zeros, matrices uniform in
//! ±1/sqrt(columns). The model built from it has exactly the bytes a real checkpoint of
//! that shape would give, so memory behaviour can be studied without a download.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::weights::gguf::tensors::{GgufWeights, Part};
use crate::weights::quant::{dense_dtype, store_matrix, StoredMatrix};
use crate::weights::random::random_tensor;
use llmem_planner::Precision;

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// The weights of a model, indexed by Hugging Face tensor name: memory-mapped safetensors
/// files, or one GGUF file whose tensors are read (and renamed, and for `attn_q`/`attn_k`
/// un-permuted) on request.
pub struct WeightFiles {
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    /// Set instead of `files` when the weights are a GGUF file.
    gguf: Option<GgufWeights>,
    /// Seed of generated weights ([`WeightFiles::random`]); `None` for real files.
    random_seed: Option<u64>,
}

/// The safetensors dtypes the engine can load.
fn candle_dtype(dtype: StDtype) -> Option<DType> {
    match dtype {
        StDtype::F32 => Some(DType::F32),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// The JSON `weight_map` of a sharded checkpoint.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Why a safetensors file cannot be read: the planner's header check names the tensor
/// that runs past the end of a truncated file, which the safetensors crate does not.
fn unreadable_safetensors(path: &Path, e: safetensors::SafeTensorError) -> String {
    match llmem_planner::checkpoint::read_safetensors_file(path) {
        Err(planner) => {
            let text = planner.to_string();
            let prefix = format!("{}: ", path.display());
            let detail = text
                .find(&prefix)
                .map_or(text.as_str(), |i| &text[i + prefix.len()..]);
            format!("not a readable safetensors file: {detail}")
        }
        Ok(_) => format!("not a readable safetensors file (truncated or damaged?): {e}"),
    }
}

impl WeightFiles {
    /// Open the weights of a model directory: `model.safetensors`, or the shards named in
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: index_path.clone(),
                message: format!("not a safetensors index (expected a `weight_map`): {e}"),
            })?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            // A shard is a file of this directory: no other folder, no absolute path.
            if let Some(bad) = shards.iter().find(|s| {
                let p = Path::new(s.as_str());
                p.file_name().and_then(|n| n.to_str()) != Some(s.as_str())
            }) {
                return Err(Error::Config {
                    path: index_path.clone(),
                    message: format!(
                        "weight_map names shard {bad:?}, which is not a file name in this \
                         directory"
                    ),
                });
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::Weights {
                path: dir.to_path_buf(),
                message: "no model.safetensors and no model.safetensors.index.json in this \
                          directory"
                    .to_string(),
            });
        };
        Self::open_files(&paths)
    }

    /// Open the given safetensors files. A tensor name present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // Safety: the map is read-only and the engine does not write model files; as
            // with every mmap-based loader, another process truncating the file while it
            // is mapped is outside what we can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
                    path: path.clone(),
                    message: unreadable_safetensors(path, e),
                })?;
            let file_idx = files.len();
            for name in metadata.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), file_idx) {
                    let prev: &MappedFile = &files[prev];
                    return Err(Error::Weights {
                        path: path.clone(),
                        message: format!("tensor `{name}` also appears in {}", prev.path.display()),
                    });
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(WeightFiles {
            files,
            index,
            gguf: None,
            random_seed: None,
        })
    }

    /// The tensors of a llama GGUF, already checked against `params` (every required
    /// tensor present with its shape, no unknown tensor), under their Hugging Face names.
    pub fn from_gguf(gguf: GgufWeights) -> Self {
        WeightFiles {
            files: Vec::new(),
            index: HashMap::new(),
            gguf: Some(gguf),
            random_seed: None,
        }
    }

    /// The GGUF behind these weights, if they come from one.
    pub fn gguf(&self) -> Option<&GgufWeights> {
        self.gguf.as_ref()
    }

    /// Seeded random weights of whatever shape each tensor is asked for (see the module
    /// documentation).
    pub fn random(seed: u64) -> Self {
        WeightFiles {
            files: Vec::new(),
            index: HashMap::new(),
            gguf: None,
            random_seed: Some(seed),
        }
    }

    /// The seed, for generated weights.
    pub fn random_seed(&self) -> Option<u64> {
        self.random_seed
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.gguf {
            Some(g) => g.contains(name),
            None => self.index.contains_key(name),
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        if let Some(g) = &self.gguf {
            return g.names();
        }
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// The path of the first file (for messages about missing tensors).
    fn first_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|f| f.path.clone())
            .unwrap_or_default()
    }

    /// Load `name` (rows, cols) and store it at `precision`; with `as_stored` and GGUF
    /// weights, in the type the file stores instead.
    pub fn load_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        precision: Precision,
        as_stored: bool,
        device: &Device,
    ) -> Result<StoredMatrix> {
        if let (true, Some(g)) = (as_stored, self.gguf()) {
            return g.load_stored(name, rows, cols, device);
        }
        // Float targets load straight into their dtype; block formats quantize from f32.
        let load_dtype = dense_dtype(precision.for_row_len(cols as u64)).unwrap_or(DType::F32);
        let t = self.load(name, &[rows, cols], load_dtype, device)?;
        if dense_dtype(precision.for_row_len(cols as u64)).is_some() {
            return Ok(StoredMatrix::Dense(t));
        }
        store_matrix(&t, precision, name)
    }

    /// Part of the matrix `name` (rows, cols) in `dtype`: a TP rank's output rows or
    /// input columns, read from the mapped file without converting the rest (a GGUF
    /// dequantizes only the part's blocks; random weights are generated whole, so a part
    /// holds the same values the whole matrix does).
    pub fn load_part(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        part: Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(g) = &self.gguf {
            return g.load_dense_part(name, rows, cols, part, dtype, device);
        }
        let bad = |message: String| Error::Weights {
            path: self.first_path(),
            message: format!("loading {name}: {message}"),
        };
        let (dim, start, len, total) = match part {
            Part::Rows { start, len } => (0, start, len, rows),
            Part::Cols { start, len } => (1, start, len, cols),
        };
        if len == 0 || start.checked_add(len).is_none_or(|end| end > total) {
            return Err(bad(format!(
                "part {start}..+{len} of dimension {dim} ({total} long)"
            )));
        }
        if self.random_seed.is_some() {
            return self
                .load(name, &[rows, cols], dtype, device)?
                .narrow(dim, start, len)
                .and_then(|t| t.force_contiguous())
                .map_err(|e| bad(e.to_string()));
        }
        let (file, stored, bytes) = self.raw(name, &[rows, cols])?;
        let bad = |message: String| Error::Weights {
            path: file.path.clone(),
            message: format!("loading {name}: {message}"),
        };
        let elem = stored.size_in_bytes();
        let (data, shape) = match part {
            Part::Rows { start, len } => (
                bytes[start * cols * elem..(start + len) * cols * elem].to_vec(),
                [len, cols],
            ),
            Part::Cols { start, len } => {
                let mut data = Vec::with_capacity(rows * len * elem);
                for row in bytes.chunks_exact(cols * elem) {
                    data.extend_from_slice(&row[start * elem..(start + len) * elem]);
                }
                (data, [rows, len])
            }
        };
        let t = Tensor::from_raw_buffer(&data, stored, &shape, device)
            .map_err(|e| bad(format!("inconsistent tensor record: {e}")))?;
        if stored == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
                .map_err(|e| bad(format!("converting {stored:?} to {dtype:?}: {e}")))
        }
    }

    /// The file, stored dtype and bytes of safetensors tensor `name`, checked to have
    /// exactly `shape`.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(&MappedFile, DType, &[u8])> {
        let Some(&file_idx) = self.index.get(name) else {
            let path = if self.files.len() == 1 {
                self.first_path()
            } else {
                self.first_path()
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            };
            return Err(Error::Weights {
                path,
                message: format!("tensor `{name}` is missing (expected shape {shape:?})"),
            });
        };
        let file = &self.files[file_idx];
        let bad = |message: String| Error::Weights {
            path: file.path.clone(),
            message: format!("loading {name}: {message}"),
        };
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| bad("tensor listed in the index but absent from the header".into()))?;
        if info.shape != shape {
            return Err(bad(format!(
                "expected shape {shape:?}, found {:?}",
                info.shape
            )));
        }
        let stored = candle_dtype(info.dtype).ok_or_else(|| {
            bad(format!(
                "dtype {:?} is not supported; expected F32, BF16 or F16",
                info.dtype
            ))
        })?;
        let (begin, end) = info.data_offsets;
        let bytes = file
            .mmap
            .get(file.data_start + begin..file.data_start + end)
            .ok_or_else(|| bad(format!("data offsets {begin}..{end} lie outside the file")))?;
        let want = shape
            .iter()
            .try_fold(stored.size_in_bytes(), |n, &d| n.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(bad(format!(
                "{} bytes do not hold shape {shape:?} in {stored:?}",
                bytes.len()
            )));
        }
        Ok((file, stored, bytes))
    }

    /// Load tensor `name`, check that its shape is exactly `shape`, and convert it to
    /// `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(g) = &self.gguf {
            return g.load_dense(name, shape, dtype, device);
        }
        if let Some(seed) = self.random_seed {
            return random_tensor(name, shape, dtype, device, seed).map_err(|e| Error::Tensor {
                context: format!("generating random weight {name}"),
                message: crate::error::candle_message(e),
            });
        }
        let (file, stored, bytes) = self.raw(name, shape)?;
        let bad = |message: String| Error::Weights {
            path: file.path.clone(),
            message: format!("loading {name}: {message}"),
        };
        let tensor = Tensor::from_raw_buffer(bytes, stored, shape, device)
            .map_err(|e| bad(format!("inconsistent tensor record: {e}")))?;
        debug_assert_eq!(tensor.dtype(), stored);
        if stored == dtype {
            Ok(tensor)
        } else {
            tensor
                .to_dtype(dtype)
                .map_err(|e| bad(format!("converting {stored:?} to {dtype:?}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard index pointing outside its directory is refused, naming the shard.
    #[test]
    fn shards_outside_the_directory_are_refused() {
        let dir = std::env::temp_dir().join(format!("llmem-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for bad in ["../model.safetensors", "/etc/passwd", "sub/x.safetensors"] {
            let index = serde_json::json!({"weight_map": {"a.weight": bad}});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
            let Err(err) = WeightFiles::open_dir(&dir) else {
                panic!("{bad} accepted");
            };
            let err = err.to_string();
            assert!(
                err.contains("not a file name") && err.contains(bad),
                "{err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn random_weights_are_seeded_in_the_asked_dtype() {
        let w = WeightFiles::random(7);
        let dev = Device::Cpu;
        let a = w.load("x.weight", &[3, 70_000], DType::BF16, &dev).unwrap();
        assert_eq!(a.dtype(), DType::BF16);
        assert_eq!(a.dims(), &[3, 70_000]);
        let b = w.load("x.weight", &[3, 70_000], DType::BF16, &dev).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0, "same seed, same name: same values");
        let other = WeightFiles::random(8)
            .load("x.weight", &[3, 70_000], DType::BF16, &dev)
            .unwrap();
        assert!(diff(&a, &other) > 0.0, "another seed: other values");
        // Uniform in +-1/sqrt(cols).
        let bound = 1.0 / (70_000f32).sqrt();
        let max = a
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(max.to_scalar::<f32>().unwrap() <= bound * 1.01);
        let norm = w.load("model.norm.weight", &[5], DType::F16, &dev).unwrap();
        assert_eq!(
            norm.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 5]
        );
    }
}
