//! Running a GGUF natively (`Model::load_gguf`, `--model file.gguf`) on small random llama
//! GGUF files written here with candle's GGUF writer: the same logits as the existing
//! import-then-load path, the same quantized blocks as quantizing at load, weight bytes
//! equal to the planner's sum of the tensor table, and errors that name the file and the
//! tensor or key.
//!
//! The files hold q/k rows in llama.cpp's permuted order (whatever the writer is given is
//! the file's order; the import path un-permutes it, so agreeing with it checks the native
//! un-permutation, including for block formats where whole rows of blocks are moved).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llmem_engine::model::{AttnMetadata, Model};
use llmem_engine::weights::gguf::convert::{convert_gguf, ConvertOptions};
use llmem_engine::weights::quant::WeightFormat;
use llmem_engine::weights::source::GgufModel;
use llmem_engine::Error;
use llmem_planner::Precision;

mod common;

// 256 columns so every block format (k-quants: 256-value blocks) fits every matrix.
const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 512;
const LAYERS: usize = 2;

/// Deterministic pseudo-random values in [-scale, scale] (xorshift).
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The tensors of a `LAYERS`-layer model: (name, shape, values). Norms near 1.
fn tensors(untied: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let v = common::byte_vocab().len();
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, HIDDEN], 0.5),
        ("output_norm.weight".to_string(), vec![HIDDEN], 0.0),
    ];
    if untied {
        out.push(("output.weight".to_string(), vec![v, HIDDEN], 0.1));
    }
    for l in 0..LAYERS {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        out.extend([
            (b("attn_norm"), vec![HIDDEN], 0.0),
            (b("ffn_norm"), vec![HIDDEN], 0.0),
            (b("attn_q"), vec![q, HIDDEN], 0.12),
            (b("attn_k"), vec![kv, HIDDEN], 0.12),
            (b("attn_v"), vec![kv, HIDDEN], 0.1),
            (b("attn_output"), vec![HIDDEN, q], 0.06),
            (b("ffn_gate"), vec![FFN, HIDDEN], 0.1),
            (b("ffn_up"), vec![FFN, HIDDEN], 0.1),
            (b("ffn_down"), vec![HIDDEN, FFN], 0.05),
        ]);
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (name, shape, scale))| {
            let n = shape.iter().product();
            let vals = if scale == 0.0 {
                random(n, i as u64 + 1, 0.1)
                    .into_iter()
                    .map(|x| 1.0 + x)
                    .collect()
            } else {
                random(n, i as u64 + 1, scale)
            };
            (name, shape, vals)
        })
        .collect()
}

fn metadata(arch: &str) -> Vec<(String, Value)> {
    let tokens = common::byte_vocab();
    let u = |x: usize| Value::U32(x as u32);
    let mut meta = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u(LAYERS)),
        (format!("{arch}.context_length"), u(128)),
        (format!("{arch}.embedding_length"), u(HIDDEN)),
        (format!("{arch}.feed_forward_length"), u(FFN)),
        (format!("{arch}.attention.head_count"), u(HEADS)),
        (format!("{arch}.attention.head_count_kv"), u(KV_HEADS)),
        (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                (0..tokens.len())
                    .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}".into(),
            ),
        ),
    ];
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta
}

/// Write a GGUF of `tensors(untied)`, each stored as `dtype_of(name)`; `skip` leaves one
/// tensor out.
fn write_gguf(
    path: &Path,
    arch: &str,
    untied: bool,
    dtype_of: &dyn Fn(&str) -> GgmlDType,
    skip: Option<&str>,
) {
    let meta = metadata(arch);
    let qs: Vec<(String, QTensor)> = tensors(untied)
        .into_iter()
        .filter(|(name, _, _)| Some(name.as_str()) != skip)
        .map(|(name, shape, vals)| {
            let t = Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu).unwrap();
            let dtype = if shape.len() == 1 {
                GgmlDType::F32
            } else {
                dtype_of(&name)
            };
            let q = QTensor::quantize(&t, dtype).unwrap();
            (name, q)
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Which ggml type each matrix of a test file gets, by tensor name.
type DtypeOf<'a> = &'a dyn Fn(&str) -> GgmlDType;

fn all(d: GgmlDType) -> impl Fn(&str) -> GgmlDType {
    move |_| d
}

/// A Q4_K_M-like mix: a different type per kind of matrix.
fn mixed(name: &str) -> GgmlDType {
    let kinds = [
        ("token_embd", GgmlDType::Q6K),
        ("attn_output", GgmlDType::Q4_0),
        ("output.", GgmlDType::F16),
        ("attn_q", GgmlDType::Q4K),
        ("attn_k", GgmlDType::Q5_0),
        ("attn_v", GgmlDType::Q8_0),
        ("ffn_gate", GgmlDType::Q4_1),
        ("ffn_up", GgmlDType::Q5K),
        ("ffn_down", GgmlDType::Q6K),
    ];
    kinds
        .iter()
        .find(|(k, _)| name.contains(k))
        .map_or(GgmlDType::F32, |(_, d)| *d)
}

/// Prompts: 7 tokens (the few-row quantized matvec), 40 tokens (candle's matmul), and
/// one decode step after each.
fn logits(model: &Model) -> Vec<f32> {
    let mut out = Vec::new();
    for n in [7usize, 40] {
        let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 5) % 258) as u32).collect();
        let mut cache = model.new_cache(n + 1).unwrap();
        let l = model
            .forward_all_logits(&ids, &AttnMetadata::single(0, n), &mut [&mut cache])
            .unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let l = model
            .forward(&[9], &AttnMetadata::single(n, 1), &mut [&mut cache])
            .unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn native(path: &Path) -> Model {
    Model::load_gguf(path, None, &Device::Cpu).unwrap().0
}

/// The existing path: `llmem import` to an f32 safetensors directory, then load that.
fn imported(path: &Path, dir: &Path, fmt: &WeightFormat) -> Model {
    convert_gguf(path, dir, &ConvertOptions::default()).unwrap();
    Model::load_dir_with(dir, fmt, &Device::Cpu).unwrap()
}

fn f32_fmt() -> WeightFormat {
    WeightFormat::new(Precision::Fp32).unwrap()
}

#[test]
fn f32_gguf_native_gives_the_logits_of_the_imported_model() {
    let tmp = tempfile::tempdir().unwrap();
    for untied in [false, true] {
        let path = tmp.path().join(format!("f32-{untied}.gguf"));
        write_gguf(&path, "llama", untied, &all(GgmlDType::F32), None);
        let a = logits(&native(&path));
        let dir = tmp.path().join(format!("f32-{untied}"));
        let b = logits(&imported(&path, &dir, &f32_fmt()));
        // Same f32 weights in the same layout, same kernels: identical.
        assert_eq!(max_abs_diff(&a, &b), 0.0, "untied = {untied}");
    }
}

#[test]
fn q8_0_gguf_native_equals_safetensors_quantized_at_load() {
    // The imported directory holds the exact f32 dequantization of the file's q8_0
    // blocks; quantizing those values again at load gives back the same blocks (the
    // block maximum is 127 * d, so the scale and every q come out unchanged), so both
    // models hold identical weights and must give identical logits.
    let tmp = tempfile::tempdir().unwrap();
    for (d, p) in [
        (GgmlDType::Q8_0, Precision::Q8_0),
        (GgmlDType::Q4_0, Precision::Q4_0),
    ] {
        let path = tmp.path().join(format!("{d:?}.gguf"));
        write_gguf(&path, "llama", false, &all(d), None);
        let nat = native(&path);
        let dir = tmp.path().join(format!("{d:?}"));
        let at_load = imported(&path, &dir, &WeightFormat::new(p).unwrap());
        assert_eq!(nat.weights_bytes(), at_load.weights_bytes(), "{d:?}");
        let diff = max_abs_diff(&logits(&nat), &logits(&at_load));
        println!("{d:?}: native vs quantized at load, max |logit difference| = {diff}");
        assert_eq!(diff, 0.0, "{d:?}");
    }
}

#[test]
fn mixed_and_f16_files_match_the_imported_model_within_activation_rounding() {
    // Native block-format matmuls quantize the activations to 8-bit blocks (q8_0 /
    // q8_1 / q8_K, as llama.cpp does); the imported f32 model does not, and an f16
    // weight's outputs are rounded to f16. So logits agree to a tolerance, not exactly:
    // a wrong row order for q/k (the un-permutation) would be off by the logits' scale.
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, DtypeOf); 2] = [("mixed", &mixed), ("f16", &all(GgmlDType::F16))];
    for (name, dtype_of) in cases {
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&path, "llama", true, dtype_of, None);
        let a = logits(&native(&path));
        let b = logits(&imported(&path, &tmp.path().join(name), &f32_fmt()));
        let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
        let diff = max_abs_diff(&a, &b);
        println!("{name}: max |logit difference| {diff:.5} at logit scale {scale:.3}");
        assert!(scale > 0.5, "{name}: degenerate logits ({scale})");
        // Measured: 1.6% of the scale (mixed), 0.06% (f16); with q/k rows left in the
        // file's permuted order the mixed file is off by 64%.
        assert!(diff <= 0.05 * scale, "{name}: {diff} vs scale {scale}");
    }
}

#[test]
fn measured_weight_bytes_equal_the_planner_sum_of_the_tensor_table() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, DtypeOf, bool); 6] = [
        ("f32", &all(GgmlDType::F32), false),
        ("f16", &all(GgmlDType::F16), true),
        ("q8_0", &all(GgmlDType::Q8_0), false),
        ("q4_0", &all(GgmlDType::Q4_0), true),
        ("q4_k", &all(GgmlDType::Q4K), false),
        ("mixed", &mixed, true),
    ];
    for (name, dtype_of, untied) in cases {
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(&path, "llama", untied, dtype_of, None);
        let (model, g) = Model::load_gguf(&path, None, &Device::Cpu).unwrap();
        let planned = model.stored_weights().expect("a GGUF as stored");
        assert_eq!(model.weights_bytes(), planned.bytes, "{name}");
        assert_eq!(
            g.weights.gguf().unwrap().summary().unwrap().bytes,
            planned.bytes
        );
        // Independently: every tensor's byte length as candle reads it.
        let file = g.weights.gguf().unwrap().file();
        let read: u64 = file
            .tensor_names()
            .iter()
            .map(|n| file.read_tensor(n).unwrap().storage_size_in_bytes() as u64)
            .sum();
        assert_eq!(read, planned.bytes, "{name}");
        println!(
            "{name}: {} B in {:?}",
            planned.bytes,
            planned.by_dtype.keys()
        );
    }
}

#[test]
fn explicit_dtype_requantizes_a_gguf_like_a_safetensors_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q8.gguf");
    write_gguf(&path, "llama", false, &all(GgmlDType::Q8_0), None);
    let fmt = WeightFormat::new(Precision::Q4_0).unwrap();
    let (model, g) = Model::load_gguf(&path, Some(&fmt), &Device::Cpu).unwrap();
    assert!(model.stored_weights().is_none());
    let planned = llmem_planner::model_weights_bytes(&g.shape, Precision::Q4_0, false).unwrap();
    assert_eq!(model.weights_bytes(), planned);
    // The GGUF's tokenizer and chat template come along.
    assert_eq!(g.config.eos_token_ids, vec![0]);
    assert!(g.config.chat_template.is_some());
    assert_eq!(g.tokenizer.get_vocab_size(true), 258);
}

/// Overwrite the ggml type id of `tensor` in a GGUF written by candle (v2 header:
/// name, u32 dims count, u64 dims, u32 type, u64 offset).
fn patch_type(path: &Path, tensor: &str, new_type: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut key = (tensor.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(tensor.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap()
        + key.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims;
    bytes[ty..ty + 4].copy_from_slice(&new_type.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Overwrite the u32 value of metadata `key` in a GGUF (key string, u32 type 4, value).
fn patch_u32_key(path: &Path, key: &str, value: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    pat.extend_from_slice(&4u32.to_le_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap()
        + pat.len();
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn open_err(path: &Path) -> Error {
    match Model::load_gguf(path, None, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn check(err: &Error, path: &Path, words: &[&str]) {
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    for w in words {
        assert!(text.contains(w), "{text} lacks {w:?}");
    }
}

#[test]
fn errors_name_the_file_and_the_tensor_or_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { tmp.path().join(n) };

    let missing = p("absent.gguf");
    check(&open_err(&missing), &missing, &["no such"]);

    let text = p("notes.gguf");
    std::fs::write(&text, b"hello, this is not a GGUF file at all").unwrap();
    check(&open_err(&text), &text, &["not a readable GGUF"]);

    let arch = p("gpt2.gguf");
    write_gguf(&arch, "gpt2", false, &all(GgmlDType::F32), None);
    let e = open_err(&arch);
    assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e:?}");
    check(&e, &arch, &["gpt2", "general.architecture"]);

    let no_up = p("no-up.gguf");
    let up = "blk.1.ffn_up.weight";
    write_gguf(&no_up, "llama", false, &all(GgmlDType::Q8_0), Some(up));
    check(&open_err(&no_up), &no_up, &[up, "missing"]);

    // ggml type 16 is IQ2_XXS, which candle (and so llmem) cannot read.
    let iq = p("iq.gguf");
    write_gguf(&iq, "llama", false, &all(GgmlDType::Q8_0), None);
    patch_type(&iq, "blk.0.attn_v.weight", 16);
    check(&open_err(&iq), &iq, &["blk.0.attn_v.weight", "16"]);

    // A block count the tensor table cannot hold is refused before anything is listed
    // per layer (the fuzzer's file declared 2 billion layers and a load ran out of
    // memory naming them).
    let layers = p("layers.gguf");
    write_gguf(&layers, "llama", false, &all(GgmlDType::Q8_0), None);
    patch_u32_key(&layers, "llama.block_count", 2_080_407_041);
    check(
        &open_err(&layers),
        &layers,
        &["llama.block_count", "2080407041", "at most 2"],
    );

    let truncated = p("truncated.gguf");
    write_gguf(&truncated, "llama", false, &all(GgmlDType::Q8_0), None);
    let len = std::fs::metadata(&truncated).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap();
    f.set_len(len - 1000).unwrap();
    drop(f);
    check(&open_err(&truncated), &truncated, &["tensor"]);

    // The bundle opener reports the same errors (the CLI's path).
    assert!(GgufModel::open(&missing).is_err());
}

/// One prompt prefilled in a single paged pass, every row sampled: what the TP grid
/// tests feed a runner and the whole model alike.
struct Prompt {
    ids: Vec<u32>,
    positions: Vec<u32>,
    meta: llmem_engine::cache::paged::PagedMetadata,
    rows: Vec<usize>,
}

impl Prompt {
    fn new(n: usize) -> Prompt {
        use llmem_engine::cache::block_manager::SeqId;
        use llmem_engine::engine::scheduler::{ScheduledBatch, ScheduledSeq};
        let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 5) % 258) as u32).collect();
        let batch = ScheduledBatch {
            seqs: vec![ScheduledSeq {
                seq: SeqId(0),
                tokens: ids.clone(),
                start_pos: 0,
                slots: (0..n).collect(),
                block_table: (0..n.div_ceil(16) as u32).collect(),
                sample: true,
            }],
        };
        Prompt {
            ids,
            positions: (0..n as u32).collect(),
            meta: llmem_engine::engine::paged_metadata(&batch),
            rows: (0..n).collect(),
        }
    }

    /// Every row's logits from a TP x PP grid.
    fn grid_logits(&self, runner: &mut llmem_engine::engine::runner::ParallelRunner) -> Vec<f32> {
        runner
            .forward_paged(&self.ids, &self.positions, &self.meta, &self.rows)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Every row's logits from the whole model, through the same paged pass as the grid
    /// (blocks of 16). Block formats quantize the activations to bytes, so float order
    /// alone (the contiguous cache's one block of every key against the grid's blocks of
    /// 16 in the running softmax) can move a logit by a quantization step.
    fn whole_logits(&self, model: &Model) -> Vec<f32> {
        let blocks = self.ids.len().div_ceil(16);
        let mut cache = model
            .new_paged_cache(blocks, 16, llmem_engine::cache::paged::KvDtype::F32)
            .unwrap();
        model
            .forward_paged(
                &self.ids,
                &self.positions,
                &self.meta,
                &mut cache,
                &self.rows,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// Regression test for the GGUF + `--tp` load race (issue 19): the ranks of a TP grid
/// read one Q8_0 GGUF's tensors from their own threads at once. Loaded eight times, the
/// grid gives bit-identical logits every time (a load that read a tensor at another
/// rank's file offset would not), and they match the whole model dequantized from the
/// same file within float summation order.
#[test]
fn a_tp_grid_loads_a_gguf_the_same_way_every_time() {
    use llmem_engine::cache::paged::KvDtype;
    use llmem_engine::engine::runner::ParallelRunner;
    use llmem_engine::parallel::spec::ParallelSpec;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8.gguf");
    write_gguf(&path, "llama", true, &all(GgmlDType::Q8_0), None);
    let prompt = Prompt::new(24);
    let spec = ParallelSpec {
        tp: 2,
        pp: 2,
        vocab_parallel: false,
    };
    let mut first: Option<Vec<f32>> = None;
    for load in 0..8 {
        let g = GgufModel::open(&path).unwrap();
        let mut runner = ParallelRunner::new(
            &g.shape,
            Arc::new(g.weights),
            WeightFormat::dense(candle_core::DType::F32).unwrap(),
            spec,
            4,
            16,
            KvDtype::F32,
        )
        .unwrap();
        let got = prompt.grid_logits(&mut runner);
        assert!(got.iter().all(|x| x.is_finite()), "load {load}: NaN logits");
        match &first {
            None => first = Some(got),
            Some(want) => assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "load {load} gave other logits than load 0: weights read wrong"
            ),
        }
    }
    // The whole model, dequantized from the same file, agrees up to summation order.
    let whole = Model::load_gguf(&path, Some(&f32_fmt()), &Device::Cpu)
        .unwrap()
        .0;
    let want = prompt.whole_logits(&whole);
    let diff = max_abs_diff(first.as_ref().unwrap(), &want);
    assert!(diff < 1e-3, "TP 2 x PP 2 vs whole model: max |diff| {diff}");
}

/// Issue 19: a GGUF run as stored splits across TP ranks and PP stages natively, each
/// rank reading its slices from the map in their stored types (Q8_0, and a mix of nine
/// types including k-quants). The grid's logits equal the whole native model's up to
/// float summation order, and every rank holds exactly the weight bytes the planner cuts
/// from the file's tensor table.
#[test]
fn a_stored_gguf_splits_natively_and_every_rank_holds_the_planned_bytes() {
    use llmem_engine::cache::paged::KvDtype;
    use llmem_engine::engine::runner::{planned_rank_memory, ParallelRunner};
    use llmem_engine::parallel::spec::ParallelSpec;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let prompt = Prompt::new(24);
    let n = prompt.ids.len();
    let q8 = all(GgmlDType::Q8_0);
    let files: [(&str, DtypeOf, bool); 3] = [
        ("q8_0", &q8, false),
        ("mixed", &mixed, true),
        ("mixed-tied", &mixed, false),
    ];
    for (label, dtype_of, untied) in files {
        let path = dir.path().join(format!("{label}.gguf"));
        write_gguf(&path, "llama", untied, dtype_of, None);
        let whole = native(&path);
        let want = prompt.whole_logits(&whole);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (tp, pp, vocab_parallel) in [(2, 1, false), (2, 1, true), (1, 2, false), (2, 2, true)] {
            let what = format!("{label}: TP {tp} PP {pp} vocab-parallel {vocab_parallel}");
            let spec = ParallelSpec {
                tp,
                pp,
                vocab_parallel,
            };
            let g = GgufModel::open(&path).unwrap();
            let fmt = WeightFormat::gguf_as_stored(g.weights.gguf().unwrap().main_precision());
            let stored = Arc::new(g.weights.gguf().unwrap().stored_tensors().unwrap());
            let mut runner = ParallelRunner::new(
                &g.shape,
                Arc::new(g.weights),
                fmt,
                spec,
                4,
                16,
                KvDtype::F32,
            )
            .unwrap();
            let got = prompt.grid_logits(&mut runner);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-3 * scale, "{what}: max |diff| {diff} of {scale}");
            let planned = planned_rank_memory(
                &g.shape,
                &fmt,
                Some(stored),
                spec,
                KvDtype::F32,
                64,
                n as u64,
            )
            .unwrap();
            let held = runner.rank_memory(n, n);
            assert_eq!(held.len(), planned.len(), "{what}");
            for (h, p) in held.iter().zip(&planned) {
                assert_eq!(
                    h.weights_bytes, p.weights_bytes,
                    "{what}: stage {} rank {}",
                    h.stage, h.tp_rank
                );
            }
            // Split ranks hold less than the whole model.
            assert!(held.iter().all(|h| h.weights_bytes < whole.weights_bytes()));
        }
    }
    // TP 4 would keep 128 of down_proj's 512 columns per rank: half a 256-value q6_K
    // block. The load and the plan both refuse, naming the tensor.
    let path = dir.path().join("mixed.gguf");
    let g = GgufModel::open(&path).unwrap();
    let fmt = WeightFormat::gguf_as_stored(g.weights.gguf().unwrap().main_precision());
    let stored = Arc::new(g.weights.gguf().unwrap().stored_tensors().unwrap());
    let spec = ParallelSpec {
        tp: 4,
        pp: 1,
        vocab_parallel: false,
    };
    let e = planned_rank_memory(&g.shape, &fmt, Some(stored), spec, KvDtype::F32, 64, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ffn_down") && e.contains("256"), "{e}");
    let e = ParallelRunner::new(
        &g.shape,
        Arc::new(g.weights),
        fmt,
        spec,
        4,
        16,
        KvDtype::F32,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("ffn_down") && e.contains("cuts"), "{e}");
}

/// A rank's part of a matrix, read alone (`WeightFiles::load_part`), equals the same
/// rows or columns of the whole matrix: from a GGUF (dequantizing only the part's
/// blocks, q/k rows un-permuted per head; a column range that cuts blocks falls back to
/// the whole matrix) and from the safetensors directory `llmem import` writes.
#[test]
fn a_part_read_alone_equals_the_same_part_of_the_whole_matrix() {
    use llmem_engine::weights::files::WeightFiles;
    use llmem_engine::weights::gguf::tensors::Part;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8.gguf");
    write_gguf(&path, "llama", true, &all(GgmlDType::Q8_0), None);
    let out = dir.path().join("imported");
    convert_gguf(&path, &out, &ConvertOptions::default()).unwrap();
    let gguf = GgufModel::open(&path).unwrap().weights;
    let st = WeightFiles::open_dir(&out).unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let o = "model.layers.0.self_attn.o_proj.weight";
    let down = "model.layers.0.mlp.down_proj.weight";
    let cases = [
        (
            q,
            HIDDEN,
            HIDDEN,
            Part::Rows {
                start: HEAD_DIM,
                len: 2 * HEAD_DIM,
            },
        ),
        (
            o,
            HIDDEN,
            HIDDEN,
            Part::Cols {
                start: 128,
                len: 64,
            },
        ),
        (
            o,
            HIDDEN,
            HIDDEN,
            Part::Cols {
                start: 40,
                len: 100,
            },
        ),
        (
            down,
            HIDDEN,
            FFN,
            Part::Cols {
                start: 256,
                len: 256,
            },
        ),
    ];
    for w in [&gguf, &st] {
        for (name, rows, cols, part) in cases {
            let whole = w
                .load(name, &[rows, cols], candle_core::DType::F32, &Device::Cpu)
                .unwrap();
            let want = match part {
                Part::Rows { start, len } => whole.narrow(0, start, len),
                Part::Cols { start, len } => whole.narrow(1, start, len),
            }
            .unwrap();
            let got = w
                .load_part(
                    name,
                    rows,
                    cols,
                    part,
                    candle_core::DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
            assert_eq!(got.dims(), want.dims(), "{name} {part:?}");
            let (g, w): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(g, w, "{name} {part:?}");
        }
        // Out of range: an error naming the tensor, not a panic.
        let e = w
            .load_part(
                o,
                HIDDEN,
                HIDDEN,
                Part::Rows {
                    start: 200,
                    len: 100,
                },
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("o_proj") || e.contains("attn_output"), "{e}");
    }
}
