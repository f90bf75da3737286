//! What a checkpoint on disk really stores, read from safetensors headers only.
//!
//! A safetensors file starts with an 8-byte little-endian header length and a JSON header
//! mapping each tensor name to its dtype, shape and byte range. Reading the headers of
//! every `*.safetensors` file of a directory gives the exact stored bytes and dtypes
//! without touching a weight byte, to set beside the count derived from config.json.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::PlanError;

/// Headers larger than this are refused (real headers are a few MB at most).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Stored tensors of one dtype.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DtypeTotal {
    pub tensors: u64,
    pub params: u64,
    pub bytes: u64,
}

/// Totals over the safetensors files of a directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckpointSummary {
    pub files: Vec<String>,
    pub tensors: u64,
    pub params: u64,
    pub bytes: u64,
    pub by_dtype: BTreeMap<String, DtypeTotal>,
}

#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header of one safetensors file, checked against the file's length: the error
/// names the file and, when one claims bytes past the end, the tensor.
pub fn read_safetensors_file(path: &Path) -> Result<CheckpointSummary, PlanError> {
    let mut summary = CheckpointSummary::default();
    add_file(path, &mut summary)?;
    Ok(summary)
}

/// Read one file's header and add its tensors to `summary`.
fn add_file(path: &Path, summary: &mut CheckpointSummary) -> Result<(), PlanError> {
    let name = path.display();
    let io = |e: std::io::Error| PlanError::Io(format!("reading {name}: {e}"));
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| PlanError::Config(format!("{name}: too short to be a safetensors file")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
        return Err(PlanError::Config(format!(
            "{name}: header length {header_len} is impossible for a file of {file_len} bytes (truncated or not safetensors)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| PlanError::Config(format!("{name}: header is not valid JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    for (tensor, value) in entries {
        if tensor == "__metadata__" {
            continue;
        }
        let entry: TensorEntry = serde_json::from_value(value)
            .map_err(|e| PlanError::Config(format!("{name}: tensor {tensor}: {e}")))?;
        let [begin, end] = entry.data_offsets;
        if begin > end || end > data_len {
            return Err(PlanError::Config(format!(
                "{name}: tensor {tensor} claims bytes {begin}..{end} but the file holds {data_len} data bytes (truncated?)"
            )));
        }
        let params = entry
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| PlanError::Overflow(format!("{name}: shape of {tensor}")))?;
        // Each tensor's count fits in u64; their sum may not (a header of a few hundred
        // bytes can declare several 2^63-element tensors with empty data ranges).
        let overflow = || PlanError::Overflow(format!("{name}: parameter count of {tensor}"));
        let t = summary.by_dtype.entry(entry.dtype).or_default();
        t.tensors += 1;
        t.params = t.params.checked_add(params).ok_or_else(overflow)?;
        t.bytes += end - begin;
        summary.tensors += 1;
        summary.params = summary.params.checked_add(params).ok_or_else(overflow)?;
        summary.bytes += end - begin;
    }
    summary.files.push(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    Ok(())
}

/// Summarise every `*.safetensors` file of `dir`; `None` when there is none.
pub fn read_checkpoint(dir: &Path) -> Result<Option<CheckpointSummary>, PlanError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| PlanError::Io(format!("listing {}: {e}", dir.display())))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    files.sort();
    let mut summary = CheckpointSummary::default();
    for file in files {
        add_file(&file, &mut summary)?;
    }
    Ok(Some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, header: &str, data_len: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("llmem-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sums_headers_without_reading_weights() {
        let dir = tmpdir("ok");
        write(
            &dir,
            "model.safetensors",
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}"#,
            28,
        );
        let s = read_checkpoint(&dir).unwrap().unwrap();
        assert_eq!((s.tensors, s.params, s.bytes), (2, 10, 28));
        assert_eq!(s.by_dtype["BF16"].bytes, 12);
        assert_eq!(s.by_dtype["F32"].params, 4);
    }

    #[test]
    fn truncated_files_are_named() {
        let dir = tmpdir("bad");
        write(
            &dir,
            "model.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        let err = read_checkpoint(&dir).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("tensor a"),
            "{err}"
        );
        std::fs::write(dir.join("model.safetensors"), [1u8, 2, 3]).unwrap();
        let err = read_checkpoint(&dir).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
    }

    /// Two tensors of 2^63 elements each (empty data ranges) overflow the sum: an
    /// error naming the file, not a wrapped count or a panic.
    #[test]
    fn parameter_counts_past_u64_are_refused() {
        let dir = tmpdir("overflow");
        write(
            &dir,
            "model.safetensors",
            r#"{"a":{"dtype":"F32","shape":[4294967296,2147483648],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[4294967296,2147483648],"data_offsets":[0,0]}}"#,
            0,
        );
        let err = read_checkpoint(&dir).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn no_files_is_none() {
        let dir = tmpdir("none");
        assert!(read_checkpoint(&dir).unwrap().is_none());
    }
}
