//! End-to-end tests of `llmem serve`: the real binary on a loopback port, driven by
//! headless Chromium (the dashboard draws its chart), by the official `openai` Python
//! client (completion, streamed chat, logprobs), and by Ctrl-C (running requests drain,
//! then the process exits cleanly).
//!
//! `scripts/test` (the README's test command) installs Chromium and the client's venv
//! and points LLMEM_CHROMIUM / LLMEM_OPENAI_PYTHON at them. Without them these tests
//! fail and say what to install; LLMEM_SKIP_BROWSER=1 / LLMEM_SKIP_OPENAI=1 skip them on
//! purpose. The model comes from the cache like the golden tests (LLMEM_SKIP_GOLDEN=1
//! skips when it is absent).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_llmem");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_available() -> bool {
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1")
        && llmem_engine::weights::hub::cached_default_model_dir(None).is_none()
    {
        eprintln!("skipped: LLMEM_SKIP_GOLDEN=1 and no cached model");
        return false;
    }
    true
}

/// A running `llmem serve`, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--kv-blocks",
            "256",
            "--max-model-len",
            "512",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmem serve");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    break rest.split_whitespace().next().unwrap().to_string();
                }
            }
            _ => {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("llmem serve exited before listening: {err}");
            }
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

/// Run a checker script; panic with its output unless it succeeds.
fn run_checker(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
}

#[test]
fn dashboard_draws_in_headless_chromium() {
    if std::env::var("LLMEM_SKIP_BROWSER").as_deref() == Ok("1") || !model_available() {
        return;
    }
    let chromium = std::env::var("LLMEM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run the tests with scripts/test (it installs Debian's \
         chromium), set LLMEM_CHROMIUM, or LLMEM_SKIP_BROWSER=1 to skip"
    );
    let server = serve(&[]);
    // Some traffic first, so the page has tokens and used blocks to show.
    let _ = http(
        &server.addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 8}"#,
    );
    let out_dir = tempfile_dir("dashboard");
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("tests/browser/check_dashboard.py"))
        .arg(format!("http://{}/", server.addr))
        .arg(&out_dir)
        .args(["--chromium", &chromium]);
    run_checker(cmd, "tests/browser/check_dashboard.py");
    assert!(out_dir.join("dashboard.png").exists());
}

/// A PP 2 server (2 ranks) and a TP 3 server: the dashboard offers every rank, lists
/// them, and charts the one asked for in the address.
#[test]
fn dashboard_shows_every_rank_of_a_parallel_server() {
    if std::env::var("LLMEM_SKIP_BROWSER").as_deref() == Ok("1") || !model_available() {
        return;
    }
    let chromium = std::env::var("LLMEM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "no Chromium at {chromium}");
    for (flag, ranks) in [("--pp", "2"), ("--tp", "3")] {
        let server = serve(&[flag, ranks]);
        let _ = http(
            &server.addr,
            "POST",
            "/v1/completions",
            r#"{"prompt": "The capital of France is", "max_tokens": 4}"#,
        );
        let out_dir = tempfile_dir(&format!("dashboard{flag}{ranks}"));
        let mut cmd = Command::new("python3");
        cmd.arg(repo().join("tests/browser/check_dashboard.py"))
            .arg(format!("http://{}/", server.addr))
            .arg(&out_dir)
            .args(["--chromium", &chromium, "--ranks", ranks]);
        run_checker(
            cmd,
            &format!("tests/browser/check_dashboard.py --ranks {ranks} ({flag} {ranks})"),
        );
    }
}

#[test]
fn the_official_openai_client_works() {
    if std::env::var("LLMEM_SKIP_OPENAI").as_deref() == Ok("1") || !model_available() {
        return;
    }
    let python = std::env::var("LLMEM_OPENAI_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("LLMEM_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/llmem")
            });
        home.join("venv-openai/bin/python").display().to_string()
    });
    let has_client = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_client,
        "no Python with the `openai` package at {python}: run the tests with scripts/test \
         (it makes the venv), set LLMEM_OPENAI_PYTHON, or LLMEM_SKIP_OPENAI=1 to skip"
    );
    let server = serve(&["--api-key", "e2e-key"]);
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/openai_client/check_openai.py"))
        .arg(format!("http://{}/v1", server.addr))
        .arg("smollm2-135m")
        .args(["--api-key", "e2e-key"]);
    run_checker(cmd, "tests/openai_client/check_openai.py");
}

#[test]
fn ctrl_c_drains_running_requests_then_exits() {
    drains_then_exits("-INT");
}

/// What a service manager sends (`systemctl stop`, `docker stop`, Kubernetes).
#[test]
fn sigterm_drains_running_requests_then_exits() {
    drains_then_exits("-TERM");
}

/// The server gets `signal` while a stream runs: the stream finishes, then it exits 0.
fn drains_then_exits(signal: &str) {
    if !model_available() {
        return;
    }
    let mut server = serve(&[]);
    // A streamed request that runs for a while.
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    let body =
        r#"{"prompt": "Once upon a time", "max_tokens": 48, "stream": true, "ignore_eos": true}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    while !first.contains("\"text\"") {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream closed early"
        );
        first.push_str(&line);
    }
    let pid = server.child.id().to_string();
    let killed = Command::new("kill").args([signal, &pid]).status().unwrap();
    assert!(killed.success());
    // The running request still completes.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    // Then the process exits by itself, successfully.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "llmem serve did not exit after kill {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let mut err = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("draining") && err.contains("stopped"), "{err}");
    // New connections are refused once it is gone.
    assert!(TcpStream::connect(&server.addr).is_err());
}

/// One HTTP/1.1 request with `Connection: close`; returns the raw response.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmem-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads what the server sends until it closes the connection or `within` passes: the
/// bytes, and how long until the close (`None`: still open).
fn until_closed(s: &mut TcpStream, within: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into(), Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // Reset by the server: closed.
            Err(_) => return (String::from_utf8_lossy(&got).into(), Some(start.elapsed())),
        }
    }
    (String::from_utf8_lossy(&got).into(), None)
}

/// Hostile clients against a real server on loopback, with 1-second timeouts and a cap
/// of 6 connections: an idle connection, a half-sent head and a Slowloris client (a
/// header line every 300 ms) are closed within the header timeout, a half-sent body gets
/// 408 within the body timeout, a connection past the cap gets 503 with Retry-After,
/// `/health` answers throughout, and no KV block is left in use.
#[test]
fn hostile_connections_are_closed_within_the_timeouts() {
    if !model_available() {
        return;
    }
    let server = serve(&[
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-connections",
        "6",
    ]);
    let addr = server.addr.clone();
    let limit = Duration::from_secs(4);

    // Past the cap: 6 idle connections are open, the 7th is refused at once.
    let idle: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut seventh = TcpStream::connect(&addr).unwrap();
    let (text, closed) = until_closed(&mut seventh, limit);
    assert!(closed.is_some(), "the 7th connection stayed open");
    assert!(
        text.starts_with("HTTP/1.1 503") && text.contains("Retry-After: 1"),
        "{text}"
    );
    // The idle ones are closed by the header timeout.
    for mut s in idle {
        let (_, closed) = until_closed(&mut s, limit);
        let t = closed.expect("an idle connection stayed open");
        assert!(t < Duration::from_millis(2500), "closed after {t:?}");
    }

    // A head without its blank line.
    let mut half_head = TcpStream::connect(&addr).unwrap();
    half_head
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Slowloris: a header line every 300 ms, never the end of the head.
    let slow_addr = addr.clone();
    let slowloris = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&slow_addr).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
        let start = Instant::now();
        for i in 0..40 {
            std::thread::sleep(Duration::from_millis(300));
            if s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .is_err()
            {
                return Some(start.elapsed());
            }
            // A closed connection shows on read before a write fails.
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let mut b = [0u8; 64];
            if matches!(s.read(&mut b), Ok(0)) {
                return Some(start.elapsed());
            }
        }
        None
    });
    // A body that stops half-way.
    let mut half_body = TcpStream::connect(&addr).unwrap();
    half_body
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\": \"hi",
        )
        .unwrap();
    // Meanwhile the server answers.
    let health = http(&addr, "GET", "/health", "");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let (_, closed) = until_closed(&mut half_head, limit);
    let t = closed.expect("a half-sent head stayed open");
    assert!(
        t < Duration::from_millis(2500),
        "half head closed after {t:?}"
    );
    let (text, _) = until_closed(&mut half_body, limit);
    assert!(text.starts_with("HTTP/1.1 408"), "half body: {text:?}");
    assert!(text.contains("--body-timeout"), "{text}");
    let t = slowloris
        .join()
        .unwrap()
        .expect("the Slowloris client was never cut off");
    assert!(t < Duration::from_secs(3), "Slowloris cut off after {t:?}");

    // Still serving, and nothing held in the KV cache.
    let done = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 4}"#,
    );
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    let memory = http(&addr, "GET", "/v1/memory", "");
    let body = memory.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["kv_blocks"]["used"], 0, "{v}");
}

/// `--request-timeout 1`: a whole response that would run longer gets 504 naming the
/// option, a stream ends with an error event and `[DONE]`, both within about a second, and
/// the stopped sequences give their KV blocks back.
#[test]
fn a_request_past_its_deadline_is_stopped() {
    if !model_available() {
        return;
    }
    let server = serve(&["--request-timeout", "1"]);
    let long = r#"{"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": true"#;
    let start = Instant::now();
    let whole = http(
        &server.addr,
        "POST",
        "/v1/completions",
        &format!("{long}}}"),
    );
    let took = start.elapsed();
    assert!(whole.starts_with("HTTP/1.1 504"), "{whole}");
    assert!(
        whole.contains("--request-timeout") && whole.contains("request_timeout"),
        "{whole}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let start = Instant::now();
    let stream = http(
        &server.addr,
        "POST",
        "/v1/completions",
        &format!("{long}, \"stream\": true}}"),
    );
    let took = start.elapsed();
    assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
    let (error, done) = (stream.find("request_timeout"), stream.find("data: [DONE]"));
    assert!(
        matches!((error, done), (Some(e), Some(d)) if e < d),
        "{stream}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // The engine frees the stopped sequences at its next step.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let memory = http(&server.addr, "GET", "/v1/memory", "");
        let body = memory.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        if v["kv_blocks"]["used"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still used: {}",
            v["kv_blocks"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
