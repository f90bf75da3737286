//! In-process tests of the router (no socket): every endpoint and every error, on the
//! default model (fetched into the cache like the golden tests when missing; set
//! LLMEM_SKIP_GOLDEN=1 to skip offline). Greedy output through HTTP is checked against
//! the independent float32 reference in ../shared/reference.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::AppState;
use crate::serve::{start, ServeArgs};

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: ServeArgs,
}

/// A server on the default model with a small cache; `extra` are more serve flags.
/// A server on the built-in model's f32 conversion (`--dtype f32`, what the reference
/// was computed at) unless `extra` names a --dtype.
fn server(extra: &[&str]) -> Option<(Arc<AppState>, axum::Router)> {
    if extra.contains(&"--dtype") {
        return server_as(extra);
    }
    let mut with_dtype = vec!["--dtype", "f32"];
    with_dtype.extend_from_slice(extra);
    server_as(&with_dtype)
}

/// A server with exactly `extra` (no --dtype: the shipped Q4_1 GGUF, natively).
fn server_as(extra: &[&str]) -> Option<(Arc<AppState>, axum::Router)> {
    if std::env::var("LLMEM_SKIP_GOLDEN").as_deref() == Ok("1")
        && llmem_engine::weights::hub::cached_default_model_dir(None).is_none()
    {
        eprintln!("serve tests skipped: LLMEM_SKIP_GOLDEN=1 and no cached model");
        return None;
    }
    let mut argv = vec!["serve", "--max-model-len", "256"];
    if !extra.contains(&"--max-num-seqs") {
        argv.extend_from_slice(&["--max-num-seqs", "8"]);
    }
    if !extra.contains(&"--memory-budget") && !extra.contains(&"--kv-blocks") {
        argv.extend_from_slice(&["--kv-blocks", "64"]);
    }
    argv.extend_from_slice(extra);
    let args = Wrap::parse_from(argv).args;
    let server = start(&args).expect("server starts");
    let limit = usize::try_from(args.max_body_bytes).unwrap();
    let router = super::router(
        server.state.clone(),
        limit,
        std::time::Duration::from_secs(args.body_timeout),
    );
    Some((server.state, router))
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    (status, headers, bytes.to_vec())
}

async fn post_json(router: &axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, bytes) = call(router, "POST", path, Some(body), None).await;
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

/// The JSON payloads of a server-sent event stream; asserts it ends with [DONE].
fn sse_payloads(bytes: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    assert_eq!(
        data.last(),
        Some(&"[DONE]"),
        "stream must end with [DONE]: {text}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn assert_error(v: &Value, needle: &str) {
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"));
    assert!(v["error"]["type"].is_string(), "{v}");
    assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
}

fn reference() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/reference/smollm2_135m_instruct.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A field of a reference case, stored as JSON text.
fn field(case: &Value, key: &str) -> Value {
    match &case[key] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        v => v.clone(),
    }
}

#[tokio::test]
async fn greedy_completions_match_the_reference_with_logprobs() {
    let Some((_state, router)) = server(&[]) else {
        return;
    };
    let reference = reference();
    for case in reference["cases"].as_array().unwrap().iter().take(3) {
        let ids = field(case, "prompt_ids");
        let greedy = field(case, "greedy_ids");
        let top5 = field(case, "generated_steps_top5_logprobs");
        let n = greedy.as_array().unwrap().len();
        let (status, v) = post_json(
            &router,
            "/v1/completions",
            json!({"model": "smollm2-135m", "prompt": ids, "max_tokens": n, "temperature": 0,
                   "logprobs": 5, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let name = case["name"].as_str().unwrap();
        let want = case["greedy_text"].as_str().unwrap();
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want, "{name}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], n);
        assert_eq!(v["usage"]["prompt_tokens"], ids.as_array().unwrap().len());
        let lp = &v["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
        let joined: String = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(joined, want, "{name}: the tokens spell the text");
        // The chosen token's log-probability is the reference's top-1 at every step.
        for (step, (got, want)) in lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(top5.as_array().unwrap())
            .enumerate()
        {
            let (got, want) = (got.as_f64().unwrap(), want[0][1].as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-3,
                "{name} step {step}: {got} vs {want}"
            );
        }
        for m in lp["top_logprobs"].as_array().unwrap() {
            assert_eq!(m.as_object().unwrap().len(), 5, "{m}");
        }
    }
}

#[tokio::test]
async fn streams_carry_the_same_text_and_end_with_usage_and_done() {
    let Some((_state, router)) = server(&[]) else {
        return;
    };
    let body = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let (_, whole) = post_json(&router, "/v1/completions", body.clone()).await;
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let (status, headers, bytes) =
        call(&router, "POST", "/v1/completions", Some(stream_body), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let chunks = sse_payloads(&bytes);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .expect("a chunk with finish_reason");
    assert!(
        finish.get("usage").is_none(),
        "usage is sent once: {finish}"
    );
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"],
        json!([]),
        "include_usage adds a usage-only chunk"
    );
    assert_eq!(last["usage"]["completion_tokens"], 12);
    assert_eq!(
        last["usage"]["total_tokens"],
        whole["usage"]["total_tokens"]
    );
    let with_usage = chunks.iter().filter(|c| c.get("usage").is_some()).count();
    assert_eq!(with_usage, 1);

    // Chat, streamed: a role delta first, content deltas, a finish chunk.
    let (status, _, bytes) = call(
        &router,
        "POST",
        "/v1/chat/completions",
        Some(
            json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 16, "temperature": 0, "stream": true}),
        ),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_payloads(&bytes);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("Paris"), "{text}");
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn chat_logprobs_stop_strings_and_echo() {
    let Some((_state, router)) = server(&[]) else {
        return;
    };
    let (status, v) = post_json(
        &router,
        "/v1/chat/completions",
        json!({"model": "smollm2-135m",
               "messages": [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
               "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry["logprob"], top[0]["logprob"], "{entry}");
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }

    // A stop string ends the text before it, with finish_reason "stop".
    let (_, free) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(4).take(3).collect();
    let (_, stopped) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
               "stop": [stop.clone()]}),
    )
    .await;
    let cut = stopped["choices"][0]["text"].as_str().unwrap();
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert!(
        !cut.contains(&stop) && text.starts_with(cut),
        "{cut:?} / {text:?} / {stop:?}"
    );

    // Echo puts the prompt in front.
    let (_, echoed) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
               "echo": true}),
    )
    .await;
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("The capital of France is{text}")
    );

    // Seeded sampling is reproducible.
    let sampled = json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.9,
                         "top_p": 0.95, "top_k": 40, "seed": 7});
    let (_, a) = post_json(&router, "/v1/completions", sampled.clone()).await;
    let (_, b) = post_json(&router, "/v1/completions", sampled).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_that_name_the_problem() {
    let Some((_state, router)) = server(&["--max-body-bytes", "2KiB"]) else {
        return;
    };
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"prompt": "hi", "model": "gpt-4"}),
            StatusCode::NOT_FOUND,
            "gpt-4",
        ),
        (
            json!({"prompt": "hi", "n": 2}),
            StatusCode::BAD_REQUEST,
            "n = 2",
        ),
        (
            json!({"prompt": "hi", "logprobs": 21}),
            StatusCode::BAD_REQUEST,
            "at most 20",
        ),
        (
            json!({"prompt": "hi", "temperature": 3}),
            StatusCode::BAD_REQUEST,
            "temperature",
        ),
        (
            json!({"prompt": "hi", "top_p": 0}),
            StatusCode::BAD_REQUEST,
            "top_p",
        ),
        (
            json!({"prompt": "hi", "max_tokens": 0}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
        ),
        (
            json!({"prompt": "hi", "max_tokens": 300}),
            StatusCode::BAD_REQUEST,
            "256 tokens",
        ),
        (
            json!({"prompt": "hi", "max_tokens": u64::MAX}),
            StatusCode::BAD_REQUEST,
            "256 tokens",
        ),
        (
            json!({"prompt": [1, 2, 999999]}),
            StatusCode::BAD_REQUEST,
            "999999",
        ),
        (json!({"prompt": ""}), StatusCode::BAD_REQUEST, "empty"),
        (
            json!({"prompt": ["a", "b"]}),
            StatusCode::BAD_REQUEST,
            "one prompt per request",
        ),
        (json!({"max_tokens": 3}), StatusCode::BAD_REQUEST, "prompt"),
        (
            json!({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            StatusCode::BAD_REQUEST,
            "at most 4",
        ),
        (
            json!({"prompt": "hi", "echo": true, "logprobs": 1}),
            StatusCode::BAD_REQUEST,
            "echo",
        ),
        (
            json!({"prompt": "x".repeat(4000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "--max-body-bytes",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, v) = post_json(&router, "/v1/completions", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_error(&v, needle);
    }
    let chat_cases: Vec<(Value, &str)> = vec![
        (json!({"messages": []}), "messages is empty"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            "logprobs = true",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "`image_url`; only text parts are supported",
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role is `wizard`; valid roles: system, developer, user",
        ),
    ];
    for (body, needle) in chat_cases {
        let (got, v) = post_json(&router, "/v1/chat/completions", body.clone()).await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_error(&v, needle);
    }
    let (status, _, bytes) = call(&router, "POST", "/v1/completions", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(
        &serde_json::from_slice(&bytes).unwrap(),
        "invalid request body",
    );
    let (status, _, bytes) = call(&router, "GET", "/v2/nothing", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&serde_json::from_slice(&bytes).unwrap(), "/v2/nothing");
}

#[tokio::test]
async fn api_key_guards_everything_but_health_and_the_page() {
    let Some((_state, router)) = server(&["--api-key", "sekrit"]) else {
        return;
    };
    for path in ["/v1/models", "/v1/memory", "/metrics"] {
        let (status, _, bytes) = call(&router, "GET", path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_error(&serde_json::from_slice(&bytes).unwrap(), "API key");
        let (status, _, _) = call(&router, "GET", path, None, Some("wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _, _) = call(&router, "GET", path, None, Some("sekrit")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, _, _) = call(
        &router,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": "hi", "max_tokens": 1})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, body) = call(&router, "GET", "/health", None, None).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"ok".as_slice())
    );
    let (status, _, page) = call(&router, "GET", "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(
        page.contains("<canvas") && !page.contains("http://") && !page.contains("https://"),
        "the dashboard is self-contained"
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let Some((_state, router)) = server(&["--max-waiting", "0", "--max-num-seqs", "1"]) else {
        return;
    };
    // An idle server serves even with no waiting room.
    let (ok, _) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(ok, StatusCode::OK);
    // Take the only sequence slot with a long stream, then ask again.
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"prompt": "Tell me a story.", "max_tokens": 200, "stream": true,
                   "ignore_eos": true})
            .to_string(),
        ))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let mut data = resp.into_body().into_data_stream();
    let mut seen = String::new();
    while !seen.contains("\"text\"") {
        let chunk = data.next().await.expect("stream open").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (status, headers, bytes) = call(
        &router,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": "hi", "max_tokens": 1})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_error(&serde_json::from_slice(&bytes).unwrap(), "--max-waiting");
    drop(data);
}

/// A 4-token greedy completion of a short prompt, which must succeed.
async fn four_greedy_tokens(router: &axum::Router) -> Value {
    let (status, v) = post_json(
        router,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn memory(router: &axum::Router) -> Value {
    let (status, _, bytes) = call(router, "GET", "/v1/memory", None, None).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_blocks_at_once() {
    let Some((_state, router)) = server(&[]) else {
        return;
    };
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"prompt": "Tell me a long story.", "max_tokens": 200, "stream": true,
                   "ignore_eos": true})
            .to_string(),
        ))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let mut data = resp.into_body().into_data_stream();
    // Read until a token arrives: the request is running and holds blocks.
    let mut seen = String::new();
    while !seen.contains("\"text\"") {
        let chunk = data.next().await.expect("stream open").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let m = memory(&router).await;
    assert!(m["kv_blocks"]["used"].as_u64().unwrap() > 0, "{m}");
    assert!(m["ranks"][0]["kv_cache_used_bytes"].as_u64().unwrap() > 0);
    drop(data);
    let mut freed = false;
    for _ in 0..100 {
        let m = memory(&router).await;
        if m["kv_blocks"]["used"] == 0 && m["requests"]["running"] == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "blocks still used after the client left: {}",
        memory(&router).await
    );
    let (_, _, metrics) = call(&router, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("llmem_requests_total{outcome=\"aborted\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn memory_and_metrics_follow_the_contract_and_the_plan() {
    let Some((state, router)) = server(&["--memory-budget", "1GiB"]) else {
        return;
    };
    let (_, v) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4}),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let m = memory(&router).await;
    let rank = &m["ranks"][0];
    for key in [
        "rank",
        "weights_bytes",
        "kv_cache_reserved_bytes",
        "kv_cache_used_bytes",
        "activation_bytes",
        "activation_peak_bytes",
        "runtime_overhead_bytes",
        "unaccounted_bytes",
        "device_total_bytes",
        "device_used_bytes",
    ] {
        assert!(rank[key].is_number(), "ranks[0].{key} missing: {m}");
    }
    for key in [
        "total",
        "used",
        "free",
        "cached",
        "block_size_tokens",
        "bytes_per_block",
    ] {
        assert!(
            m["kv_blocks"][key].is_number(),
            "kv_blocks.{key} missing: {m}"
        );
    }
    assert_eq!(m["device"], "cpu");
    // Weights: the engine's accounting equals the planner's prediction exactly.
    assert_eq!(rank["weights_bytes"], m["plan"]["weights_bytes"]);
    assert_eq!(rank["weights_bytes"], 538_060_032u64);
    // Reserved KV is whole blocks of the planner's bytes per token.
    let blocks = m["kv_blocks"]["total"].as_u64().unwrap();
    let per_block = m["kv_blocks"]["bytes_per_block"].as_u64().unwrap();
    assert_eq!(
        per_block,
        16 * m["plan"]["kv_bytes_per_token"].as_u64().unwrap()
    );
    assert_eq!(
        rank["kv_cache_reserved_bytes"].as_u64().unwrap(),
        blocks * per_block
    );
    assert!(rank["activation_peak_bytes"].as_u64().unwrap() > 0);
    // Measured by the counting allocator this binary installs: the KV buffers to the
    // byte, the weights plus their tensors' bookkeeping, the passes' working sets.
    assert_eq!(rank["activations_measured"], true, "{m}");
    assert_eq!(rank["kv_cache_heap_bytes"], rank["kv_cache_reserved_bytes"]);
    let (wb, wh) = (
        rank["weights_bytes"].as_u64().unwrap(),
        rank["weights_heap_bytes"].as_u64().unwrap(),
    );
    assert!(
        wh >= wb && wh - wb < 512 * 1024,
        "weights {wb} B, heap {wh} B"
    );
    assert!(rank["activation_last_pass_bytes"].is_number());
    let parts = &rank["runtime_parts"];
    let parts_sum: u64 = [
        "runtime_heap_bytes",
        "other_heap_bytes",
        "allocator_bytes",
        "code_and_files_bytes",
        "mapped_weight_files_bytes",
    ]
    .iter()
    .map(|k| {
        parts[k]
            .as_u64()
            .unwrap_or_else(|| panic!("runtime_parts.{k}: {m}"))
    })
    .sum();
    assert_eq!(rank["runtime_overhead_bytes"].as_u64().unwrap(), parts_sum);
    // Every part is measured, so what is left is small (stacks, maps outside malloc).
    let rss = rank["process_rss_bytes"].as_i64().unwrap();
    let unaccounted = rank["unaccounted_bytes"].as_i64().unwrap();
    println!("unaccounted {unaccounted} B of {rss} B resident");
    assert!(
        unaccounted.abs() < rss / 10,
        "unaccounted {unaccounted} of {rss}"
    );
    // The KV the engine reserved is the plan's, or the plan names why not.
    if rank["kv_cache_reserved_bytes"] != m["plan"]["kv_cache_reserved_bytes"] {
        let why = m["plan"]["kv_cache_reserved_explained"]
            .as_str()
            .unwrap_or_default();
        println!("{why}");
        assert!(
            why.contains("whole blocks") && why.contains("max_model_len"),
            "{m}"
        );
    }
    assert_eq!(
        m["kv_blocks"]["used"], 0,
        "finished requests hold no blocks"
    );
    assert_eq!(m["tokens"]["generated_total"], 4);
    // The budget is 1 GiB: weights + activations + overhead + KV stay within it.
    let used = rank["weights_bytes"].as_u64().unwrap()
        + rank["kv_cache_reserved_bytes"].as_u64().unwrap()
        + rank["runtime_overhead_bytes"].as_u64().unwrap();
    assert!(used <= 1 << 30, "{used}");
    assert_eq!(
        state.ledger.ranks[0].kv_cache_reserved_bytes,
        blocks * per_block
    );

    let (status, headers, bytes) = call(&router, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(bytes).unwrap();
    for needle in [
        "llmem_memory_bytes{component=\"weights\",rank=\"0\"} 538060032",
        "llmem_memory_planned_bytes{component=\"weights\",rank=\"0\"} 538060032",
        "llmem_kv_blocks{state=\"used\"} 0",
        "llmem_kv_blocks{state=\"free\"}",
        "llmem_kv_blocks{state=\"cached\"}",
        "llmem_requests{state=\"running\"} 0",
        "llmem_requests{state=\"waiting\"} 0",
        "llmem_preemptions_total 0",
        "llmem_generation_tokens_total 4",
        "llmem_time_to_first_token_seconds_count 1",
        "llmem_inter_token_latency_seconds_count 3",
        "# TYPE llmem_time_to_first_token_seconds histogram",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let (status, _, models) = call(&router, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_slice(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m");
}

/// A rank of a TP/PP server in `/v1/memory`: its weights and KV equal its plan's, and its
/// own pass was measured on its own heap slot.
fn rank_matches_its_plan(r: &Value) {
    assert_eq!(r["weights_bytes"], r["planned"]["weights_bytes"], "{r}");
    assert_eq!(
        r["kv_cache_reserved_bytes"], r["planned"]["kv_cache_reserved_bytes"],
        "{r}"
    );
    assert!(r["activation_peak_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["activations_measured"], true, "{r}");
}

#[tokio::test]
async fn tensor_parallel_serving_reports_every_rank_beside_the_planner() {
    let Some((_state, router)) = server(&["--tp", "3"]) else {
        return;
    };
    let reference = reference();
    let case = &reference["cases"][0];
    let (status, v) = post_json(
        &router,
        "/v1/completions",
        json!({"prompt": field(case, "prompt_ids"), "max_tokens": 12, "temperature": 0,
               "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let want = case["greedy_text"].as_str().unwrap();
    let got = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        want.starts_with(got) && !got.is_empty(),
        "TP=3 {got:?} vs {want:?}"
    );
    let m = memory(&router).await;
    let ranks = m["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3, "{m}");
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["tp_rank"], i, "{r}");
        rank_matches_its_plan(r);
    }
    // `llmem plan --model smollm2-135m --precision fp32 --tp 3`: 254,944,512 B of weights per GPU.
    assert_eq!(ranks[0]["weights_bytes"], 254_944_512u64);
    let (_, _, metrics) = call(&router, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("llmem_memory_bytes{component=\"weights\",rank=\"2\"} 254944512"));
}

/// `serve --tp 3 --memory-budget 400MiB`: every rank fits its weights, its planned
/// activations and the shared blocks in its own 400 MiB, and one more block would not fit
/// the tightest rank.
#[tokio::test]
async fn tensor_parallel_serving_sizes_every_rank_from_its_budget() {
    let Some((_state, router)) = server(&["--tp", "3", "--memory-budget", "400MiB"]) else {
        return;
    };
    let m = memory(&router).await;
    let budget = 400u64 << 20;
    let blocks = m["kv_blocks"]["total"].as_u64().unwrap();
    let ranks = m["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3, "{m}");
    // The runtime overhead given to the sizing (the resident set before loading) comes
    // off every rank's budget.
    let overhead = m["plan"]["runtime_overhead_bytes"].as_u64().unwrap();
    let mut tightest = u64::MAX;
    for r in ranks {
        let n = |k: &str| r[k].as_u64().unwrap();
        let used = n("weights_bytes")
            + n("kv_cache_reserved_bytes")
            + r["planned"]["activation_bytes"].as_u64().unwrap()
            + overhead;
        assert!(used <= budget, "{r}");
        // The rank's own planned terms are what it holds.
        assert_eq!(r["weights_bytes"], r["planned"]["weights_bytes"], "{r}");
        tightest = tightest.min(budget - used);
    }
    // What is left on the tightest rank is less than one of its blocks.
    let block = ranks[0]["kv_cache_reserved_bytes"].as_u64().unwrap() / blocks;
    assert!(tightest < block, "{tightest} B left, a block is {block} B");
    assert!(blocks > 0);
}

#[tokio::test]
async fn pipeline_serving_reports_each_stage_beside_the_planner() {
    let Some((_state, router)) = server(&["--pp", "2"]) else {
        return;
    };
    four_greedy_tokens(&router).await;
    let m = memory(&router).await;
    let ranks = m["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2, "{m}");
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["stage"], i, "{r}");
        rank_matches_its_plan(r);
    }
    // Stage 0 holds the embedding, stage 1 its own copy of the tied head and the final
    // norm: the same layer count, different bytes.
    assert_ne!(ranks[0]["weights_bytes"], ranks[1]["weights_bytes"], "{m}");
    let (_, _, metrics) = call(&router, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(metrics).unwrap();
    for needle in [
        "llmem_memory_bytes{component=\"weights\",rank=\"1\"}",
        "llmem_memory_planned_bytes{component=\"activations\",rank=\"1\"}",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}

#[tokio::test]
async fn quantized_serving_plans_the_bytes_it_holds() {
    let Some((_state, router)) = server(&["--dtype", "q8_0"]) else {
        return;
    };
    let v = four_greedy_tokens(&router).await;
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let m = memory(&router).await;
    // `llmem sweep` measured and planned 143,025,408 B for q8_0 SmolLM2 (embedding included).
    assert_eq!(m["ranks"][0]["weights_bytes"], 143_025_408u64, "{m}");
    assert_eq!(m["plan"]["weights_bytes"], m["ranks"][0]["weights_bytes"]);
}

#[tokio::test]
async fn chat_without_max_tokens_fits_a_small_cache() {
    // 4 blocks of 16 tokens hold 64 tokens, far below max_model_len = 256.
    let Some((_state, router)) = server(&["--kv-blocks", "4"]) else {
        return;
    };
    let (status, v) = post_json(
        &router,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let used = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used <= 65, "{v}");
}

/// `llmem serve` with no --dtype runs the built-in model's shipped Q4_1 GGUF natively,
/// under its own name, with the planner's weight bytes for that file and the kernel level
/// in `/v1/memory`.
#[tokio::test]
async fn the_default_serves_the_shipped_gguf_natively() {
    let Some((state, router)) = server_as(&[]) else {
        return;
    };
    assert_eq!(state.model_id, "smollm2-135m");
    let (status, v) = post_json(
        &router,
        "/v1/completions",
        json!({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let m = memory(&router).await;
    assert_eq!(m["cpu_kernels"], llmem_kernels::cpu::level().name());
    let weights = m["ranks"][0]["weights_bytes"].as_u64().unwrap();
    assert_eq!(Some(weights), m["plan"]["weights_bytes"].as_u64());
    // The Q4_1 file, not the f32 conversion's 538 MB.
    assert!(weights < 100_000_000, "{weights}");
}
