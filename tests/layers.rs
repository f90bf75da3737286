//! The layering check as a test: `scripts/check-layers` must pass its own self-test (which
//! builds crates with a deliberate file cycle and a deliberate folder cycle and expects
//! both to fail) and must find no import cycle in this workspace.

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/check-layers"))
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("python3 runs scripts/check-layers");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_checker_fails_on_deliberate_cycles() {
    let (ok, text) = run(&["--self-test"]);
    assert!(ok, "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[test]
fn the_workspace_has_no_import_cycle() {
    let (ok, text) = run(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("no import cycle"), "{text}");
}
