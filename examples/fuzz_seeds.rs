//! Write the fuzz targets' seed corpus: `cargo run --example fuzz_seeds -- DIR` makes
//! DIR/<target>/<name> for every seed (`llmem_engine::untrusted::seeds`, and the HTTP
//! target's requests). scripts/fuzz runs it before fuzzing.

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".to_string()),
    );
    let mut n = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
        n += 1;
        Ok(())
    };
    for s in llmem_engine::untrusted::seeds() {
        write(s.target, &s.name, &s.bytes)?;
    }
    for (name, bytes) in llmem::serve::untrusted::seeds() {
        write("http", &name, &bytes)?;
    }
    println!("{n} seeds written under {}", dir.display());
    Ok(())
}
