//! Every input the fuzzers ever crashed, hung or leaked on (`fuzz/regressions/<target>/`)
//! and every seed (`llmem_engine::untrusted::seeds`, `llmem::serve::untrusted::seeds`),
//! replayed through the same entry the fuzz target calls. A regression here is a crash
//! found once and fixed since; see docs/fuzzing.md.

use std::path::Path;

use llmem::serve::untrusted as server;
use llmem_engine::untrusted as engine;

/// The entry of a target, by its name in fuzz/fuzz_targets.
fn entry(target: &str) -> fn(&[u8]) {
    match target {
        "gguf" => engine::gguf,
        "safetensors" => engine::safetensors,
        "configs" => engine::configs,
        "chat_template" => engine::chat_template,
        "gguf_vocab" => engine::gguf_vocab,
        "http" => server::http,
        other => panic!("fuzz/regressions/{other}: no such fuzz target"),
    }
}

#[test]
fn every_saved_crash_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for dir in std::fs::read_dir(&root)
        .expect("fuzz/regressions exists")
        .flatten()
    {
        if !dir.path().is_dir() {
            continue;
        }
        let target = dir.file_name().to_string_lossy().into_owned();
        if target == "http" && !server::http_available() {
            eprintln!("fuzz/regressions/http skipped: the tiny model could not be written");
            continue;
        }
        let run = entry(&target);
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("a target's folder is readable")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("a regression input is readable");
            eprintln!("{}", file.display());
            run(&data);
            replayed += 1;
        }
    }
    eprintln!("{replayed} regression inputs replayed");
    // The gguf crashes of issue 20 are there: none replayed means the walk went wrong.
    assert!(
        replayed >= 2,
        "only {replayed} inputs found under {}",
        root.display()
    );
}

#[test]
fn every_seed_is_handled() {
    for seed in engine::seeds() {
        entry(seed.target)(&seed.bytes);
    }
    if server::http_available() {
        for (name, bytes) in server::seeds() {
            eprintln!("http seed {name}");
            server::http(&bytes);
        }
    }
}
