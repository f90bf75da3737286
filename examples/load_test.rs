//! A load test for an OpenAI-compatible server: `--clients` concurrent streaming clients
//! send completions for `--duration` seconds on loopback, then the run reports requests
//! completed, errors, time to first token and inter-token latency (p50/p99), aggregate
//! streamed tokens per second, and (for `llmem serve`) whether the KV blocks used went
//! back to zero afterwards.
//!
//! ```sh
//! cargo run --release -- serve --port 8000 &
//! cargo run --release --example load_test -- --url http://127.0.0.1:8000 --clients 64 --duration 30
//! ```
//!
//! `--scenario` picks what the clients do (default `steady`, the above):
//! - `burst`: `--clients` requests sent at the same instant, once;
//! - `disconnect`: a storm of streams dropped after 0 to 3 tokens, for `--duration`;
//! - `slow-readers`: half the clients read their stream 250 ms per chunk, the other half
//!   at full speed (their latency is the figure);
//! - `slowloris`: `--clients` connections send one header line every 2 s and never end the
//!   head, while /health and a completion are probed every second: the run reports how
//!   long the server let them live, and fails if any is still open 5 s after `--duration`
//!   (make it longer than the server's `--header-timeout`) or a probe fails;
//! - `soak`: `steady`, with the server's RSS sampled every 5 s from /v1/memory; the drift
//!   from the first sample after a minute to the last is reported.
//!
//! Every scenario ends by checking that no KV block is left in use.
//!
//! The same command measures llama.cpp's `llama-server` (add `--no-memory-check`): both
//! speak `/v1/completions` with `stream: true`. A token is one streamed chunk with text.
//! The client is a minimal HTTP/1.1 one (chunked transfer decoding, `Connection: close`)
//! so the measurement adds no client library of its own. Clients stop starting requests
//! at the deadline; requests in flight finish (they are bounded by `--max-tokens`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    host_port: String,
    clients: usize,
    duration: Duration,
    max_tokens: usize,
    model: Option<String>,
    api_key: Option<String>,
    memory_check: bool,
    scenario: Scenario,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Scenario {
    Steady,
    Burst,
    Disconnect,
    SlowReaders,
    Slowloris,
    Soak,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        host_port: "127.0.0.1:8000".into(),
        clients: 64,
        duration: Duration::from_secs(30),
        max_tokens: 32,
        model: None,
        api_key: std::env::var("LLMEM_API_KEY").ok(),
        memory_check: true,
        scenario: Scenario::Steady,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--url" => {
                let url = value("--url")?;
                args.host_port = url
                    .strip_prefix("http://")
                    .ok_or(format!("--url {url}: only http:// URLs are supported"))?
                    .trim_end_matches('/')
                    .to_string();
            }
            "--clients" => args.clients = num(&value("--clients")?, "--clients")?,
            "--duration" => {
                args.duration =
                    Duration::from_secs(num(&value("--duration")?, "--duration")? as u64)
            }
            "--max-tokens" => args.max_tokens = num(&value("--max-tokens")?, "--max-tokens")?,
            "--model" => args.model = Some(value("--model")?),
            "--api-key" => args.api_key = Some(value("--api-key")?),
            "--no-memory-check" => args.memory_check = false,
            "--scenario" => {
                args.scenario = match value("--scenario")?.as_str() {
                    "steady" => Scenario::Steady,
                    "burst" => Scenario::Burst,
                    "disconnect" => Scenario::Disconnect,
                    "slow-readers" => Scenario::SlowReaders,
                    "slowloris" => Scenario::Slowloris,
                    "soak" => Scenario::Soak,
                    other => {
                        return Err(format!(
                            "--scenario {other:?}: one of steady, burst, disconnect, \
                             slow-readers, slowloris, soak"
                        ))
                    }
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn num(s: &str, name: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{name} {s:?}: expected a positive integer")),
    }
}

/// What one request measured.
#[derive(Default)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
}

/// Send one request; return the status, headers and a reader positioned at the body.
async fn send(
    args: &Args,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, bool, BufReader<TcpStream>), String> {
    let mut stream = TcpStream::connect(&args.host_port)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let auth = args
        .api_key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        args.host_port,
        body.len()
    );
    stream
        .write_all(format!("{head}{body}").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status line {line:?}"))?;
    let mut chunked = false;
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked, reader))
}

/// The next piece of the body (de-chunked), or None at its end.
async fn next_piece(
    reader: &mut BufReader<TcpStream>,
    chunked: bool,
) -> Result<Option<Vec<u8>>, String> {
    let io = |e: std::io::Error| format!("read: {e}");
    if !chunked {
        let mut buf = vec![0u8; 4096];
        let n = reader.read(&mut buf).await.map_err(io)?;
        buf.truncate(n);
        return Ok((n > 0).then_some(buf));
    }
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).await.map_err(io)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| format!("bad chunk size {size_line:?}"))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; size + 2];
    reader.read_exact(&mut buf).await.map_err(io)?;
    buf.truncate(size);
    Ok(Some(buf))
}

/// How a client reads its stream.
#[derive(Clone, Copy)]
enum Reading {
    /// As fast as it comes.
    Full,
    /// Waiting this long before each chunk.
    Slow(Duration),
    /// Dropping the connection after this many tokens.
    DropAfter(usize),
}

async fn one_request(args: &Args, prompt: &str) -> Outcome {
    request_with(args, prompt, Reading::Full).await
}

async fn request_with(args: &Args, prompt: &str, reading: Reading) -> Outcome {
    let mut body = serde_json::json!({
        "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
        "stream": true, "ignore_eos": true,
    });
    if let Some(m) = &args.model {
        body["model"] = m.clone().into();
    }
    let start = Instant::now();
    let mut out = Outcome::default();
    let (status, chunked, mut reader) =
        match send(args, "POST", "/v1/completions", &body.to_string()).await {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
    if status != 200 {
        out.error = Some(format!("HTTP {status}"));
        return out;
    }
    let mut pending = String::new();
    let mut last = None;
    loop {
        match reading {
            Reading::Slow(d) => tokio::time::sleep(d).await,
            Reading::DropAfter(n) if out.tokens >= n => {
                // Hang up mid-stream: the server must notice and free the sequence.
                out.ok = true;
                return out;
            }
            _ => {}
        }
        let piece = match next_piece(&mut reader, chunked).await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
        pending.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    out.ok = true;
                    continue;
                }
                let v: serde_json::Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => {
                        out.error = Some(format!("bad event {data:?}: {e}"));
                        return out;
                    }
                };
                if v.get("error").is_some() {
                    out.error = Some(format!("error event: {data}"));
                    return out;
                }
                let text = v["choices"][0]["text"].as_str().unwrap_or("");
                if !text.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => out.ttft = Some(now - start),
                        Some(prev) => out.gaps.push(now - prev),
                    }
                    last = Some(now);
                    out.tokens += 1;
                }
            }
        }
    }
    if !out.ok {
        out.error = Some("the stream ended without [DONE]".into());
    }
    out
}

fn fail_setup(message: &str) -> ! {
    eprintln!("load_test: {message}");
    std::process::exit(2);
}

fn percentile_ms(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1e3
}

/// Prompts of different lengths (a shared opening, so prefix caching has something to do).
fn prompt(client: usize, n: usize) -> String {
    let topics = [
        "the sea",
        "a city at night",
        "bread",
        "mountains",
        "an old clock",
        "rain",
    ];
    let mut p = format!(
        "Write a short paragraph about {}.",
        topics[(client + n) % topics.len()]
    );
    for _ in 0..(client * 7 + n) % 5 {
        p.push_str(" Use plain words and keep it calm.");
    }
    p
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            eprintln!("load_test: {e}");
            std::process::exit(2);
        }
    };
    // Wait for the server (a model may still be loading).
    let ready_by = Instant::now() + Duration::from_secs(120);
    loop {
        match send(&args, "GET", "/health", "").await {
            Ok((200, ..)) => break,
            _ if Instant::now() < ready_by => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok((status, ..)) => fail_setup(&format!("GET /health: HTTP {status}")),
            Err(e) => fail_setup(&format!("GET /health: {e}")),
        }
    }
    let start = Instant::now();
    let mut failed = false;
    let all = match args.scenario {
        Scenario::Steady => clients(&args, Reading::Full, args.clients).await,
        Scenario::Burst => {
            let tasks: Vec<_> = (0..args.clients)
                .map(|c| {
                    let args = args.clone();
                    tokio::spawn(async move { one_request(&args, &prompt(c, 0)).await })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.ok());
            }
            all
        }
        Scenario::Disconnect => {
            let drop = |c, n| Reading::DropAfter((c + n) % 4);
            let all = clients_with(&args, drop, args.clients).await;
            println!("{} streams dropped after 0-3 tokens", all.len());
            all
        }
        Scenario::SlowReaders => {
            let slow = args.clients / 2;
            let (a, b) = tokio::join!(
                clients(&args, Reading::Slow(Duration::from_millis(250)), slow),
                clients(&args, Reading::Full, args.clients - slow),
            );
            let mut fast_ttft: Vec<Duration> = b.iter().filter_map(|o| o.ttft).collect();
            let mut fast_gaps: Vec<Duration> = b.iter().flat_map(|o| o.gaps.clone()).collect();
            println!(
                "{} slow readers ({} requests), {} full-speed clients ({} requests): \
                 full-speed TTFT p50 {:.0} ms p99 {:.0} ms, inter-token p50 {:.1} ms p99 {:.1} ms",
                slow,
                a.len(),
                args.clients - slow,
                b.len(),
                percentile_ms(&mut fast_ttft, 50.0),
                percentile_ms(&mut fast_ttft, 99.0),
                percentile_ms(&mut fast_gaps, 50.0),
                percentile_ms(&mut fast_gaps, 99.0),
            );
            a.into_iter().chain(b).collect()
        }
        Scenario::Slowloris => {
            let (all, ok) = slowloris(&args).await;
            failed |= !ok;
            all
        }
        Scenario::Soak => {
            let sampler = {
                let args = args.clone();
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    while start.elapsed() < args.duration {
                        if let Some(rss) = server_rss(&args).await {
                            samples.push((start.elapsed(), rss));
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    samples
                })
            };
            let all = clients(&args, Reading::Full, args.clients).await;
            let samples = sampler.await.unwrap_or_default();
            report_rss(&samples);
            all
        }
    };
    let wall = start.elapsed();
    let completed = all.iter().filter(|o| o.ok && o.error.is_none()).count();
    let errors: Vec<&String> = all.iter().filter_map(|o| o.error.as_ref()).collect();
    let mut ttft: Vec<Duration> = all.iter().filter_map(|o| o.ttft).collect();
    let mut gaps: Vec<Duration> = all.iter().flat_map(|o| o.gaps.iter().copied()).collect();
    let tokens: usize = all.iter().map(|o| o.tokens).sum();
    println!(
        "{} clients for {:.1} s (wall {:.1} s): {} requests completed, {} errors; {} tokens streamed, \
         {:.1} tok/s aggregate; TTFT p50 {:.0} ms p99 {:.0} ms; inter-token p50 {:.1} ms p99 {:.1} ms",
        args.clients,
        args.duration.as_secs_f64(),
        wall.as_secs_f64(),
        completed,
        errors.len(),
        tokens,
        tokens as f64 / wall.as_secs_f64(),
        percentile_ms(&mut ttft, 50.0),
        percentile_ms(&mut ttft, 99.0),
        percentile_ms(&mut gaps, 50.0),
        percentile_ms(&mut gaps, 99.0),
    );
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    failed |= !errors.is_empty();
    if args.memory_check {
        // Give the engine one iteration to publish the last frees.
        tokio::time::sleep(Duration::from_millis(300)).await;
        match send(&args, "GET", "/v1/memory", "").await {
            Ok((200, chunked, mut reader)) => {
                let mut body = Vec::new();
                while let Ok(Some(p)) = next_piece(&mut reader, chunked).await {
                    body.extend(p);
                }
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let used = &v["kv_blocks"]["used"];
                println!(
                    "after the run: KV blocks used {used} of {}, running {}, waiting {}, preemptions {}",
                    v["kv_blocks"]["total"], v["requests"]["running"], v["requests"]["waiting"],
                    v["preemptions_total"]
                );
                failed |= used.as_u64() != Some(0);
            }
            Ok((status, ..)) => {
                println!("GET /v1/memory: HTTP {status}");
                failed = true;
            }
            Err(e) => {
                println!("GET /v1/memory: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// `n` clients sending requests one after another until `--duration` has passed.
async fn clients(args: &std::sync::Arc<Args>, reading: Reading, n: usize) -> Vec<Outcome> {
    clients_with(args, move |_, _| reading, n).await
}

/// [`clients`], reading request `i` of client `c` as `reading(c, i)` says.
async fn clients_with(
    args: &std::sync::Arc<Args>,
    reading: impl Fn(usize, usize) -> Reading + Copy + Send + 'static,
    n: usize,
) -> Vec<Outcome> {
    let deadline = Instant::now() + args.duration;
    let tasks: Vec<_> = (0..n)
        .map(|c| {
            let args = args.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let o = request_with(&args, &prompt(c, i), reading(c, i)).await;
                    if o.error.is_some() {
                        // No tight loop of failures: count it, pause, go on.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    outcomes.push(o);
                    i += 1;
                }
                outcomes
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// GET a path; its JSON body.
async fn get_json(args: &Args, path: &str) -> Option<serde_json::Value> {
    let (status, chunked, mut reader) = send(args, "GET", path, "").await.ok()?;
    if status != 200 {
        return None;
    }
    let mut body = Vec::new();
    while let Ok(Some(p)) = next_piece(&mut reader, chunked).await {
        body.extend(p);
    }
    serde_json::from_slice(&body).ok()
}

/// The server's resident memory, from the first `process_rss_bytes` in /v1/memory.
async fn server_rss(args: &Args) -> Option<u64> {
    fn find(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => m
                .get("process_rss_bytes")
                .and_then(|x| x.as_u64())
                .or_else(|| m.values().find_map(find)),
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(&get_json(args, "/v1/memory").await?)
}

fn report_rss(samples: &[(Duration, u64)]) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let Some(&(_, last)) = samples.last() else {
        println!("RSS: no samples (is the server llmem serve?)");
        return;
    };
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= Duration::from_secs(60))
        .or(samples.first())
        .map_or(last, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(last);
    println!(
        "RSS: {} samples, first {:.1} MiB, after 1 min {:.1} MiB, last {:.1} MiB, max {:.1} MiB; \
         drift from 1 min to the end {:+.1} MiB",
        samples.len(),
        mib(samples[0].1),
        mib(warm),
        mib(last),
        mib(max),
        mib(last) - mib(warm),
    );
}

/// Slowloris: connections that never finish their head, while the server is probed.
/// Returns the probes' completions and whether every connection was cut in time and
/// every probe answered.
async fn slowloris(args: &std::sync::Arc<Args>) -> (Vec<Outcome>, bool) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let args = args.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(&args.host_port).await.ok()?;
                let head = format!(
                    "POST /v1/completions HTTP/1.1\r\nHost: {}\r\n",
                    args.host_port
                );
                s.write_all(head.as_bytes()).await.ok()?;
                let opened = Instant::now();
                let mut buf = [0u8; 256];
                loop {
                    // One header line every 2 s; the server closing (read 0 or an
                    // error) ends it.
                    let tick = tokio::time::sleep(Duration::from_secs(2));
                    tokio::select! {
                        r = s.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return Some(opened.elapsed()),
                            Ok(_) => {}
                        },
                        _ = tick => {
                            if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                return Some(opened.elapsed());
                            }
                        }
                    }
                    if opened.elapsed() > args.duration + Duration::from_secs(5) {
                        return None;
                    }
                }
            })
        })
        .collect();
    let mut probes = Vec::new();
    let (mut health_ok, mut health_n) = (0, 0);
    while start.elapsed() < args.duration {
        health_n += 1;
        if matches!(send(args, "GET", "/health", "").await, Ok((200, ..))) {
            health_ok += 1;
        }
        probes.push(one_request(args, "Hello").await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut cut: Vec<Duration> = Vec::new();
    let mut open = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => cut.push(d),
            None => open += 1,
        }
    }
    let longest = cut.iter().max().copied().unwrap_or_default();
    println!(
        "slowloris: {} connections, {} cut by the server (longest open {:.1} s), {} still open \
         past the run; /health answered {health_ok}/{health_n}",
        args.clients,
        cut.len(),
        longest.as_secs_f64(),
        open
    );
    (probes, open == 0 && health_ok == health_n)
}
