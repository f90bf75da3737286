//! Reading GGUF files (llama.cpp's single-file model format) on top of candle's parser.
//!
//! Owns: opening a GGUF with errors that name the file, typed access to its metadata
//! (`llama.block_count`, `tokenizer.ggml.tokens`, ...), reading one tensor and dequantizing
//! it to f32, the Llama hyper-parameters a GGUF declares ([`LlamaParams`]), and the one
//! layout difference between GGUF and Hugging Face Llama weights: [`unpermute_rows`].
//!
//! Invariants: tensor shapes are given in Hugging Face order, `[rows, cols]` (candle reverses
//! GGUF's ggml order on read); nothing here panics on a damaged file, every failure is an
//! [`Error`] naming the file and the key or tensor. Dequantization is candle's, which for
//! Q4_0/Q4_1/Q8_0 computes `q * d (+ m)` in f32 exactly as llama.cpp does (checked against an
//! independent decoder in the tests below).
//!
//! Format reference: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{candle_message, Error, Result};
use crate::weights::quant::ggml_bytes;

/// An open GGUF file: its parsed header (metadata and tensor table) and the file mapped
/// into memory, from which tensor data is read on demand.
///
/// Reads go through their own cursor over the mapping, never through a shared file
/// position: the ranks of a tensor-parallel load read tensors of one file from several
/// threads at once, and a shared `seek` + `read` let one thread's seek move another's
/// read (weights silently taken from the wrong offset, or "failed to fill whole buffer").
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("metadata_keys", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

/// A short description of a metadata value for error messages (arrays are summarised).
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 60 => {
            format!("string {:?}...", s.chars().take(60).collect::<String>())
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("array of {} values", a.len()),
        other => format!("{other:?}"),
    }
}

/// Integer value of any GGUF integer type, if it is one.
fn as_i128(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => i128::from(*x),
        Value::I8(x) => i128::from(*x),
        Value::U16(x) => i128::from(*x),
        Value::I16(x) => i128::from(*x),
        Value::U32(x) => i128::from(*x),
        Value::I32(x) => i128::from(*x),
        Value::U64(x) => i128::from(*x),
        Value::I64(x) => i128::from(*x),
        _ => return None,
    })
}

impl GgufFile {
    /// Open and parse the header of a GGUF file. Tensor data is read later, on demand.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let content = {
            let mut reader = BufReader::new(&file);
            match Content::read(&mut reader) {
                Ok(c) => c,
                Err(e) => {
                    // candle names only the type id of a tensor type it cannot read;
                    // walk the header again to name the tensor too.
                    if let Some((tensor, id)) = unreadable_tensor_type(&file) {
                        return Err(Error::GgufTensor {
                            path,
                            tensor,
                            message: format!(
                                "stored as ggml type {id} ({}), which llmem cannot read; \
                                 supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, \
                                 q2_K, q3_K, q4_K, q5_K, q6_K",
                                ggml_type_name(id)
                            ),
                        });
                    }
                    return Err(Error::GgufRead {
                        path,
                        message: candle_message(e),
                    });
                }
            }
        };
        // Safety: the mapping is read-only and private to this process; as with every
        // mmap-ed model file, truncating it while it is open is not supported.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(GgufFile { path, map, content })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// candle's parsed header, for anything the typed accessors do not cover.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::GgufMissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    fn bad(&self, key: &str, v: &Value, expected: &str) -> Error {
        Error::GgufBadValue {
            path: self.path.clone(),
            key: key.to_string(),
            found: describe(v),
            expected: expected.to_string(),
        }
    }

    /// `general.architecture` (e.g. `llama`).
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")
    }

    /// A non-negative integer that fits in u32, stored as any GGUF integer type.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        as_i128(v)
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| self.bad(key, v, "an integer in 0..=4294967295"))
    }

    /// Like [`Self::opt_u32`], but the key must be present.
    pub fn u32(&self, key: &str) -> Result<u32> {
        self.opt_u32(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float stored as f32 or f64 (or an integer, which some writers use for rope bases).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = match v {
            Value::F32(x) => *x,
            Value::F64(x) => *x as f32,
            other => match as_i128(other) {
                Some(i) => i as f32,
                None => return Err(self.bad(key, v, "a number")),
            },
        };
        if !x.is_finite() {
            return Err(self.bad(key, v, "a finite number"));
        }
        Ok(Some(x))
    }

    /// Like [`Self::opt_f32`], but the key must be present.
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    /// A boolean, if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, v, "a bool")),
        }
    }

    /// A string, if present.
    pub fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(key, v, "a string")),
        }
    }

    /// Like [`Self::opt_string`], but the key must be present.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.opt_string(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(key, v, "an array")),
        }
    }

    /// An array of strings, if present.
    pub fn opt_string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad(&format!("{key}[{i}]"), other, "a string")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers (any GGUF integer type) that fit in i32, if present.
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                as_i128(v)
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| self.bad(&format!("{key}[{i}]"), v, "a 32-bit integer"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of floats, if present.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.opt_array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(self.bad(&format!("{key}[{i}]"), other, "a float")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// The table entry of one tensor (type, shape in `[rows, cols]` order, offset).
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::GgufTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: "not in the file".to_string(),
            })
    }

    /// Shape in Hugging Face order (`[rows, cols]` for a matrix).
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.tensor_info(name)?.shape.dims().to_vec())
    }

    /// Read one tensor as stored (quantized or not).
    pub fn read_tensor(&self, name: &str) -> Result<QTensor> {
        let info = self.tensor_info(name)?;
        self.tensor_data(name)?;
        let mut reader = std::io::Cursor::new(&self.map[..]);
        info.read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.tensor_error(name, info.ggml_dtype, e))
    }

    /// The bytes of one tensor in the map, with its type: checked to have elements, a
    /// whole number of blocks and to lie inside the file. Rank loaders read only their
    /// slices of it.
    pub fn tensor_data(&self, name: &str) -> Result<(GgmlDType, &[u8])> {
        let info = self.tensor_info(name)?;
        // candle views the bytes of an empty tensor through a dangling pointer of the
        // wrong alignment (a panic with debug assertions); no model has such a tensor.
        if info.shape.dims().contains(&0) {
            return Err(Error::GgufTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: format!("has shape {:?}: no elements", info.shape.dims()),
            });
        }
        // candle multiplies the dimensions unchecked (an overflow panics with debug
        // assertions and wraps without): check the element count and that the bytes lie
        // inside the file before it reads.
        let dims = info.shape.dims();
        let bytes = ggml_bytes(info.ggml_dtype, dims);
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(usize::try_from(self.content.tensor_data_offset).ok()?));
        let range = match (start, bytes) {
            (Some(start), Some(bytes)) => start.checked_add(bytes).map(|end| start..end),
            _ => None,
        };
        match range {
            Some(range) if range.end <= self.map.len() => Ok((info.ggml_dtype, &self.map[range])),
            _ => Err(Error::GgufTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: format!(
                    "shape {dims:?} of {:?} at data offset {} does not fit the file's {} \
                     bytes (truncated or damaged)",
                    info.ggml_dtype,
                    info.offset,
                    self.map.len()
                ),
            }),
        }
    }

    /// Read one tensor and dequantize it to f32, row-major, in Hugging Face shape.
    pub fn dequantize_f32(&self, name: &str) -> Result<Vec<f32>> {
        let q = self.read_tensor(name)?;
        let dtype = q.dtype();
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.tensor_error(name, dtype, e))
    }

    fn tensor_error(&self, name: &str, dtype: GgmlDType, e: candle_core::Error) -> Error {
        Error::GgufTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            message: format!("reading {dtype:?} data: {}", candle_message(e)),
        }
    }
}

/// ggml's name of a tensor type id (ggml.h `enum ggml_type`), for messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        6 => "q5_0",
        7 => "q5_1",
        8 => "q8_0",
        9 => "q8_1",
        10 => "q2_K",
        11 => "q3_K",
        12 => "q4_K",
        13 => "q5_K",
        14 => "q6_K",
        15 => "q8_K",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        30 => "bf16",
        34 => "tq1_0",
        35 => "tq2_0",
        39 => "mxfp4",
        _ => "unknown",
    }
}

/// Tensors each Llama layer holds in a GGUF: two norms, q, k, v, o, gate, up, down.
const LAYER_TENSORS: usize = 9;

/// The type ids candle 0.11 reads (`GgmlDType`).
const CANDLE_TYPE_IDS: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// Walk a GGUF v2/v3 header (metadata skipped value by value) and return the first
/// tensor whose type id candle cannot read. `None` when the header cannot be walked or
/// every type is readable: the caller then reports candle's own error.
fn unreadable_tensor_type(file: &File) -> Option<(String, u32)> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata().ok()?.len();
    let mut r = BufReader::new(file);
    r.seek(SeekFrom::Start(0)).ok()?;
    fn u32_(r: &mut impl Read) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    /// Skip `n` bytes; `None` past the end of the file (seeking there would succeed,
    /// and a count from a damaged header would then be walked to its end).
    fn skip(r: &mut (impl Read + Seek), n: u64, len: u64) -> Option<()> {
        let pos = r.stream_position().ok()?;
        if n > len.saturating_sub(pos) {
            return None;
        }
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()
            .map(|_| ())
    }
    fn string(r: &mut (impl Read + Seek)) -> Option<String> {
        let len = u64_(r)?;
        if len > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; len as usize];
        r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }
    /// The size of a fixed-size metadata value of type `t`.
    fn fixed(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    /// Skip one metadata value of type `t`. Every step reads or skips at least one byte
    /// within the file, so a damaged count ends the walk at the file's end.
    fn value(r: &mut (impl Read + Seek), t: u32, depth: u32, len: u64) -> Option<()> {
        if let Some(size) = fixed(t) {
            return skip(r, size, len);
        }
        match t {
            8 => {
                let n = u64_(r)?;
                skip(r, n, len)
            }
            9 if depth < 4 => {
                let et = u32_(r)?;
                let n = u64_(r)?;
                if let Some(size) = fixed(et) {
                    return skip(r, n.checked_mul(size)?, len);
                }
                for _ in 0..n {
                    value(r, et, depth + 1, len)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    if u32_(&mut r)? != 0x4655_4747 {
        return None;
    }
    if !matches!(u32_(&mut r)?, 2 | 3) {
        return None;
    }
    let n_tensors = u64_(&mut r)?;
    let n_kv = u64_(&mut r)?;
    for _ in 0..n_kv {
        string(&mut r)?;
        let t = u32_(&mut r)?;
        value(&mut r, t, 0, len)?;
    }
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let n_dims = u32_(&mut r)?;
        if n_dims > 8 {
            return None;
        }
        skip(&mut r, 8 * u64::from(n_dims), len)?;
        let t = u32_(&mut r)?;
        u64_(&mut r)?;
        if !CANDLE_TYPE_IDS.contains(&t) {
            return Some((name, t));
        }
    }
    None
}

/// The Llama hyper-parameters a GGUF declares, resolved (no `Option`s left except the
/// truly optional ones).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    /// Linear RoPE scaling factor (`llama.rope.scaling.type = "linear"`), if any.
    pub rope_linear_scaling: Option<f32>,
    /// True when the file has no `output.weight`: the LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaParams {
    /// Read the `llama.*` keys, cross-checked against the tensor table. Errors if the file
    /// is not a llama-architecture GGUF, naming the architecture found.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.architecture()?;
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture {
                path: g.path().to_path_buf(),
                found: arch.to_string(),
            });
        }
        let n = |key: &str| g.u32(key).map(|x| x as usize);
        let hidden_size = n("llama.embedding_length")?;
        let num_attention_heads = n("llama.attention.head_count")?;
        let num_key_value_heads = g
            .opt_u32("llama.attention.head_count_kv")?
            .map_or(num_attention_heads, |x| x as usize);
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: key.to_string(),
                    found: "0".to_string(),
                    expected: "a positive integer".to_string(),
                })
            } else {
                Ok(v)
            }
        };
        positive("llama.embedding_length", hidden_size)?;
        positive("llama.attention.head_count", num_attention_heads)?;
        positive("llama.attention.head_count_kv", num_key_value_heads)?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::GgufBadValue {
                path: g.path().to_path_buf(),
                key: "llama.attention.head_count_kv".to_string(),
                found: num_key_value_heads.to_string(),
                expected: format!(
                    "a divisor of llama.attention.head_count = {num_attention_heads}"
                ),
            });
        }
        let head_dim = match g.opt_u32("llama.attention.key_length")? {
            Some(k) => k as usize,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::GgufBadValue {
                        path: g.path().to_path_buf(),
                        key: "llama.embedding_length".to_string(),
                        found: hidden_size.to_string(),
                        expected: format!(
                            "a multiple of llama.attention.head_count = {num_attention_heads} \
                             (or an explicit llama.attention.key_length)"
                        ),
                    });
                }
                hidden_size / num_attention_heads
            }
        };
        positive("llama.attention.key_length", head_dim)?;
        if head_dim % 2 != 0 {
            return Err(Error::GgufBadValue {
                path: g.path().to_path_buf(),
                key: "llama.attention.key_length".to_string(),
                found: head_dim.to_string(),
                expected: "an even head dimension (rotary embeddings rotate pairs)".to_string(),
            });
        }
        if let Some(v) = g.opt_u32("llama.attention.value_length")? {
            if v as usize != head_dim {
                return Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: "llama.attention.value_length".to_string(),
                    found: v.to_string(),
                    expected: format!("equal to the key length {head_dim}"),
                });
            }
        }
        if let Some(r) = g.opt_u32("llama.rope.dimension_count")? {
            if r as usize != head_dim {
                return Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: "llama.rope.dimension_count".to_string(),
                    found: r.to_string(),
                    expected: format!(
                        "the head dimension {head_dim} (partial rotary is not supported)"
                    ),
                });
            }
        }
        if let Some(e) = g.opt_u32("llama.expert_count")? {
            if e > 0 {
                return Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: "llama.expert_count".to_string(),
                    found: e.to_string(),
                    expected: "0 (mixture-of-experts models are not supported)".to_string(),
                });
            }
        }
        let rope_linear_scaling = match g.opt_string("llama.rope.scaling.type")? {
            None | Some("none") => None,
            Some("linear") => Some(g.f32("llama.rope.scaling.factor")?),
            Some(other) => {
                return Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: "llama.rope.scaling.type".to_string(),
                    found: format!("{other:?}"),
                    expected: "\"none\" or \"linear\"".to_string(),
                })
            }
        };
        if g.content().tensor_infos.contains_key("rope_freqs.weight") {
            return Err(Error::GgufTensor {
                path: g.path().to_path_buf(),
                tensor: "rope_freqs.weight".to_string(),
                message: "per-frequency RoPE scaling (Llama 3.1 style) is not supported"
                    .to_string(),
            });
        }

        let embd = g.tensor_shape("token_embd.weight")?;
        let vocab_size = match embd.as_slice() {
            [rows, cols] if *cols == hidden_size => *rows,
            _ => {
                return Err(Error::GgufTensor {
                    path: g.path().to_path_buf(),
                    tensor: "token_embd.weight".to_string(),
                    message: format!("shape {embd:?}, expected [vocab_size, {hidden_size}]"),
                })
            }
        };
        if let Some(v) = g.opt_u32("llama.vocab_size")? {
            if v as usize != vocab_size {
                return Err(Error::GgufBadValue {
                    path: g.path().to_path_buf(),
                    key: "llama.vocab_size".to_string(),
                    found: v.to_string(),
                    expected: format!("the rows of token_embd.weight, {vocab_size}"),
                });
            }
        }
        let num_hidden_layers = positive("llama.block_count", n("llama.block_count")?)?;
        // Every layer has 9 tensors of its own: a block count the tensor table cannot hold
        // is refused here, before anything is sized or listed per layer.
        let tensors = g.content().tensor_infos.len();
        if num_hidden_layers > tensors / LAYER_TENSORS {
            return Err(Error::GgufBadValue {
                path: g.path().to_path_buf(),
                key: "llama.block_count".to_string(),
                found: num_hidden_layers.to_string(),
                expected: format!(
                    "at most {} (the file has {tensors} tensors, {LAYER_TENSORS} per layer)",
                    tensors / LAYER_TENSORS
                ),
            });
        }
        let intermediate_size = n("llama.feed_forward_length")?;
        let max_position_embeddings = n("llama.context_length")?;
        let rms_norm_eps = g.f32("llama.attention.layer_norm_rms_epsilon")?;
        // llama.cpp's default when the key is absent; SmolLM2 stores 100000.
        let rope_theta = g.opt_f32("llama.rope.freq_base")?.unwrap_or(10_000.0);
        let tie_word_embeddings = !g.content().tensor_infos.contains_key("output.weight");
        Ok(LlamaParams {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_linear_scaling,
            tie_word_embeddings,
        })
    }
}

/// Undo llama.cpp's permutation of the rows of `attn_q` / `attn_k`.
///
/// llama.cpp applies rotary embeddings to adjacent pairs `(x[2i], x[2i+1])`; Hugging Face
/// Llama rotates `(x[i], x[i + hd/2])`. The GGUF converter therefore reorders the output rows
/// of the q and k projections within each head of `hd = rows / n_heads` rows:
/// GGUF row `2i + j` holds Hugging Face row `j * hd/2 + i` (`i < hd/2`, `j` in {0, 1}).
///
/// `data` is row-major `[rows, cols]`; the result is the same matrix in Hugging Face row
/// order. Use `n_heads = num_attention_heads` for q and `num_key_value_heads` for k.
pub fn unpermute_rows<T: Copy>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_heads: usize,
) -> std::result::Result<Vec<T>, String> {
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(format!(
            "{} values is not {rows} rows x {cols} columns",
            data.len()
        ));
    }
    if n_heads == 0 || rows % n_heads != 0 || (rows / n_heads) % 2 != 0 {
        return Err(format!(
            "{rows} rows do not split into {n_heads} heads of an even size"
        ));
    }
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        // Hugging Face row r = j*half + i within the head comes from GGUF row 2i + j.
        for j in 0..2 {
            for i in 0..half {
                let src = h * hd + 2 * i + j;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use half::f16;

    /// Regression test for the TP GGUF load race (weights read at another thread's file
    /// offset): many threads reading the tensors of one open file at once get exactly
    /// the bytes a lone reader gets, every time.
    #[test]
    fn concurrent_reads_of_one_file_get_the_same_bytes() {
        use candle_core::quantized::gguf_file;
        use candle_core::Tensor;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.gguf");
        let tensors: Vec<(String, QTensor)> = (0..12)
            .map(|i| {
                let vals: Vec<f32> = (0..64 * 96)
                    .map(|j| ((i * 7919 + j) % 251) as f32 / 25.0 - 5.0)
                    .collect();
                let t = Tensor::from_vec(vals, (64, 96), &Device::Cpu).unwrap();
                let dtype = if i % 2 == 0 {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F32
                };
                (
                    format!("t{i}.weight"),
                    QTensor::quantize(&t, dtype).unwrap(),
                )
            })
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &[], &refs).unwrap();
        drop(f);
        let g = GgufFile::open(&path).unwrap();
        let want: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(n, _)| g.read_tensor(n).unwrap().data().unwrap().to_vec())
            .collect();
        std::thread::scope(|s| {
            for t in 0..6 {
                let (g, tensors, want) = (&g, &tensors, &want);
                s.spawn(move || {
                    for round in 0..40 {
                        // Each thread walks the tensors in its own order.
                        for k in 0..tensors.len() {
                            let i = (k * (t + 1) + round) % tensors.len();
                            let got = g.read_tensor(&tensors[i].0).unwrap();
                            assert!(
                                *got.data().unwrap() == want[i][..],
                                "thread {t}, round {round}: {} read wrong bytes",
                                tensors[i].0
                            );
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn unpermute_one_head_of_four_rows() {
        // hd = 4, half = 2. GGUF rows: [HF0, HF2, HF1, HF3] (row 2i+j = HF row j*2+i).
        let gguf = [0, 0, 20, 20, 10, 10, 30, 30];
        let hf = unpermute_rows(&gguf, 4, 2, 1).unwrap();
        assert_eq!(hf, vec![0, 0, 10, 10, 20, 20, 30, 30]);
    }

    #[test]
    fn unpermute_two_heads_of_six_rows() {
        // Build HF rows 0..12 (value = row index), permute them the llama.cpp way, undo.
        let (heads, hd, cols) = (2, 6, 1);
        let hf: Vec<usize> = (0..heads * hd).collect();
        let mut gguf = vec![0; hf.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        assert_eq!(gguf[..6], [0, 3, 1, 4, 2, 5]);
        assert_eq!(unpermute_rows(&gguf, heads * hd, cols, heads).unwrap(), hf);
    }

    #[test]
    fn unpermute_rejects_bad_shapes() {
        assert!(unpermute_rows(&[1, 2, 3], 2, 2, 1).is_err());
        assert!(unpermute_rows(&[1, 2, 3, 4, 5, 6], 6, 1, 2).is_err()); // head of 3 rows
        assert!(unpermute_rows(&[1, 2], 2, 1, 0).is_err());
    }

    /// An independent reading of ggml's block layouts, to check candle's dequantization.
    pub(crate) fn reference_dequant(dtype: GgmlDType, raw: &[u8]) -> Vec<f32> {
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut out = Vec::new();
        match dtype {
            GgmlDType::Q8_0 => {
                for block in raw.chunks_exact(34) {
                    let d = h(&block[0..2]);
                    out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
                }
            }
            GgmlDType::Q4_1 => {
                for block in raw.chunks_exact(20) {
                    let (d, m) = (h(&block[0..2]), h(&block[2..4]));
                    let qs = &block[4..];
                    out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                }
            }
            GgmlDType::Q4_0 => {
                for block in raw.chunks_exact(18) {
                    let d = h(&block[0..2]);
                    let qs = &block[2..];
                    out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d));
                    out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
                }
            }
            other => panic!("no reference decoder for {other:?}"),
        }
        out
    }

    /// Deterministic pseudo-random bytes (xorshift), with sane f16 scales patched in.
    fn blocks(dtype: GgmlDType, n_blocks: usize) -> Vec<u8> {
        let size = dtype.type_size();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut raw: Vec<u8> = (0..n_blocks * size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let scales: &[usize] = match dtype {
            GgmlDType::Q4_1 => &[0, 2],
            _ => &[0],
        };
        for (b, block) in raw.chunks_exact_mut(size).enumerate() {
            for (k, &at) in scales.iter().enumerate() {
                let v = f16::from_f32(0.013 * (b as f32 + 1.0) * if k == 0 { 1.0 } else { -7.5 });
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        raw
    }

    #[test]
    fn candle_dequantizes_q8_0_q4_1_q4_0_exactly() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let (rows, cols) = (3, 64);
            let raw = blocks(dtype, rows * cols / dtype.block_size());
            let q = qtensor_from_ggml(dtype, &raw, vec![rows, cols], &Device::Cpu).unwrap();
            let got = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = reference_dequant(dtype, &raw);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{dtype:?} element {i}: {a} vs {b}"
                );
            }
        }
    }
}
