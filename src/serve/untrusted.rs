//! Untrusted bytes into the server: the `http` fuzz target's entry.
//!
//! Owns: one server, started once per process, on a one-layer GGUF model of width 32
//! (`llmem_engine::untrusted::tiny_gguf`: Q8_0 matrices, a 33-token byte-level BPE
//! vocabulary and a chat template), so that a request generating its whole context
//! takes milliseconds and the fuzzer spends its time on the request handling; and
//! [`http`], which sends one input to it as a request and reads the whole answer.
//!
//! Invariants: every input gets an answer (any status; a panic in a handler is a bug),
//! and once the answer is read every KV block is free again: a request that leaks
//! blocks fails here, as a crash the fuzzer saves.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use clap::Parser;
use tower::ServiceExt;

use super::api::AppState;
use super::{start, ServeArgs};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: ServeArgs,
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    router: axum::Router,
}

/// The server, started on first use; `None` when its model file cannot be written.
fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            use llmem_engine::untrusted::{scratch_dir, tiny_gguf};
            let bytes = tiny_gguf(32, candle_core::quantized::GgmlDType::Q8_0, false)?;
            let path = scratch_dir("http").join("tiny.gguf");
            std::fs::write(&path, bytes).ok()?;
            let model = path.to_str()?.to_string();
            let args = Wrap::parse_from([
                "serve",
                "--model",
                &model,
                "--max-model-len",
                "64",
                "--kv-blocks",
                "12",
                "--max-num-seqs",
                "4",
                "--max-body-bytes",
                "65536",
                "--request-timeout",
                "20",
            ])
            .args;
            let server = start(&args).expect("the server starts on the tiny model");
            let router = super::api::router(
                server.state.clone(),
                usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX),
                Duration::from_secs(args.body_timeout),
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            Some(Fixture {
                runtime,
                state: server.state,
                router,
            })
        })
        .as_ref()
}

/// True when [`http`] has a server to send to.
pub fn http_available() -> bool {
    fixture().is_some()
}

/// One request: the first byte picks the endpoint (completions, chat completions, or a
/// GET of the path the rest spells), the rest is the body. Panics when a handler
/// panics or when KV blocks are still in use a second after the answer was read.
pub fn http(data: &[u8]) {
    let Some(fx) = fixture() else {
        return;
    };
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let request = match which % 3 {
        0 => post("/v1/completions", rest),
        1 => post("/v1/chat/completions", rest),
        _ => {
            let path = String::from_utf8_lossy(rest);
            match Request::builder()
                .uri(format!("/{path}"))
                .body(Body::empty())
            {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    fx.runtime.block_on(async {
        let response = fx
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router answers every request");
        let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
    });
    let since = Instant::now();
    loop {
        let used = fx.state.shared.snapshot().stats.blocks_used;
        if used == 0 && fx.state.shared.waiting() == 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "{used} KV blocks still in use a second after the answer was read"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn post(path: &str, body: &[u8]) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a fixed path and header make a request")
}

/// The `http` target's seed corpus: one request of each kind the API takes (text and
/// token prompts, chat with string and part contents, streaming, logprobs, stops) and
/// a few GET paths; the first byte picks the endpoint as [`http`] reads it.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let bodies: [(&str, u8, &str); 10] = [
        (
            "completion-text",
            0,
            r#"{"prompt":"Hello","max_tokens":4,"temperature":0}"#,
        ),
        (
            "completion-ids",
            0,
            r#"{"prompt":[1,2,3],"max_tokens":2,"logprobs":2,"echo":true}"#,
        ),
        (
            "completion-stream",
            0,
            r#"{"prompt":["Hi"],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true},"stop":["\n"]}"#,
        ),
        (
            "completion-sampled",
            0,
            r#"{"prompt":"Hi","max_tokens":3,"temperature":0.8,"top_p":0.9,"top_k":5,"seed":7,"n":1}"#,
        ),
        (
            "chat-text",
            1,
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_tokens":3}"#,
        ),
        (
            "chat-parts",
            1,
            r#"{"model":"smollm2-135m","messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_completion_tokens":2,"logprobs":true,"top_logprobs":2}"#,
        ),
        (
            "chat-stream",
            1,
            r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"stream":true,"ignore_eos":true}"#,
        ),
        ("models", 2, "v1/models"),
        ("memory", 2, "v1/memory"),
        ("metrics", 2, "metrics"),
    ];
    bodies
        .iter()
        .map(|(name, which, body)| (name.to_string(), [&[*which][..], body.as_bytes()].concat()))
        .collect()
}
