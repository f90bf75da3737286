//! The HTTP surface: OpenAI-compatible completions and chat completions, models,
//! health, the memory ledger, Prometheus metrics and the dashboard page.
//!
//! Handlers do the cheap, fallible work (parse, validate, tokenise, check limits) and
//! hand the engine thread a [`NewRequest`]; every refusal happens here, before anything
//! is queued, and comes back in OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}` with the right status: 400 for a bad
//! or over-long request (the message names the field and the limit), 401 without the API
//! key, 404 for another model's name, 503 with `Retry-After` when the waiting queue is
//! full.
//!
//! Bodies are parsed by hand from bytes (not axum's `Json` extractor) so that a malformed
//! body also gets the OpenAI error shape. Every response carries `usage`; in a stream,
//! once: on the chunk that carries `finish_reason`, or, when
//! `stream_options.include_usage` asks, in a usage-only chunk after it (as OpenAI sends it).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use llmem_engine::chat::{render_chat, ChatMessage};
use llmem_engine::engine::scheduler::StopConditions;
use llmem_engine::sample::sampler::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::ledger::Ledger;
use super::metrics::Shared;
use super::worker::{Command, Event, NewRequest, TokenEvent};

/// Most alternatives per token OpenAI allows (and we compute).
pub const MAX_LOGPROBS: u32 = 20;
/// Most stop strings per request, as OpenAI.
pub const MAX_STOP: usize = 4;

/// Everything the handlers share.
pub struct AppState {
    pub model_id: String,
    pub commands: std::sync::Mutex<std::sync::mpsc::Sender<Command>>,
    pub shared: Arc<Shared>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub vocab_size: u64,
    pub max_model_len: usize,
    /// Requests allowed to wait before new ones get 503.
    pub max_waiting: usize,
    /// Sequences the engine runs at once (a request beyond them waits).
    pub max_num_seqs: usize,
    /// Tokens the KV cache holds in all (blocks x block size).
    pub cache_tokens: usize,
    pub api_key: Option<String>,
    pub ledger: Ledger,
    /// A request still running this long after it arrived is stopped (`--request-timeout`).
    pub request_timeout: Option<std::time::Duration>,
    pub started: Instant,
    pub next_id: AtomicU64,
}

/// The message roles OpenAI's chat API accepts (`developer` is its newer name for
/// `system`); anything else is a 400, as OpenAI answers.
const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The router over `state`, with `max_body_bytes` as the request body limit and
/// `body_timeout` as the time a body has to arrive in.
pub fn router(
    state: Arc<AppState>,
    max_body_bytes: usize,
    body_timeout: std::time::Duration,
) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/memory", get(memory))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        // The page holds no data; what it shows comes from the protected endpoints, to
        // which it sends the key typed into it.
        .route("/", get(dashboard))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(move |request, next| {
            super::listen::body_deadline(body_timeout, max_body_bytes, request, next)
        }))
        .with_state(state)
}

// ---- errors ----------------------------------------------------------------------------

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..ApiError::bad(message)
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            ..ApiError::bad(message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::bad(format!(
            "no route for {} {}",
            req.method(),
            req.uri().path()
        ))
    }
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "authentication_error",
                code: Some("invalid_api_key"),
                ..ApiError::bad(
                    "missing or wrong API key: send `Authorization: Bearer <key>` (the key \
                     given to `llmem serve --api-key` or LLMEM_API_KEY)",
                )
            }
            .into_response();
        }
    }
    next.run(req).await
}

// ---- simple endpoints ------------------------------------------------------------------

async fn health() -> &'static str {
    "ok"
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "llmem",
            "max_model_len": state.max_model_len,
        }],
    }))
}

async fn memory(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(state.ledger.memory_json(
        &state.shared,
        &state.model_id,
        state.started.elapsed().as_secs_f64(),
    ))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.ledger.prometheus(&state.shared),
    )
}

// ---- request bodies --------------------------------------------------------------------

/// `prompt`: a string, a list of token ids, or a one-element list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Option<Prompt>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: Common,
}

/// Message content: a string or a list of parts (`{"type": "text", "text": ...}`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

/// The body as JSON; an over-long body (413) and bad JSON (400) in OpenAI's shape.
fn parse_body<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::bad(format!(
            "cannot read the request body: {} (limit: --max-body-bytes)",
            e.body_text()
        ))
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

// ---- shared request handling -----------------------------------------------------------

/// A validated request, ready for the engine thread.
struct Prepared {
    id: String,
    created: u64,
    prompt_ids: Vec<u32>,
    sampling: SamplingParams,
    stop: StopConditions,
    stop_strings: Vec<String>,
    top_logprobs: usize,
    stream: bool,
    include_usage: bool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != &self.model_id => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: Some("model_not_found"),
                param: Some("model"),
                ..ApiError::bad(format!(
                    "the model `{m}` does not exist here; this server serves `{}`",
                    self.model_id
                ))
            }),
            _ => Ok(()),
        }
    }

    /// Validate the common fields against `prompt_ids`; `default_max_tokens` applies
    /// when the request gives none.
    fn prepare(
        &self,
        prefix: &str,
        c: &Common,
        prompt_ids: Vec<u32>,
        default_max_tokens: Option<u64>,
        top_logprobs: usize,
    ) -> Result<Prepared, ApiError> {
        if let Some(n) = c.n {
            if n != 1 {
                return Err(ApiError::bad_param(
                    "n",
                    format!("n = {n} is not supported: this server returns one choice (n = 1)"),
                ));
            }
        }
        let temperature = c.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_param(
                "temperature",
                format!("temperature = {temperature} must be between 0 and 2"),
            ));
        }
        if let Some(p) = c.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad_param(
                    "top_p",
                    format!("top_p = {p} must be above 0 and at most 1"),
                ));
            }
        }
        let top_k = match c.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::bad_param(
                    "top_k",
                    format!("top_k = {k} must be positive (or -1 / 0 for no limit)"),
                ))
            }
        };
        let stop_strings = match &c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_strings.len() > MAX_STOP {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "{} stop sequences given; at most {MAX_STOP} are allowed",
                    stop_strings.len()
                ),
            ));
        }
        llmem_engine::request::check_prompt(&prompt_ids, self.vocab_size)
            .map_err(|e| ApiError::bad_param("prompt", e.to_string()))?;
        let p = prompt_ids.len();
        let limit = self.max_model_len;
        let max_tokens = match c
            .max_tokens
            .or(c.max_completion_tokens)
            .or(default_max_tokens)
        {
            Some(0) => {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    "max_tokens = 0: it must be at least 1",
                ))
            }
            Some(m) => m,
            // The rest of the context, but no more than the whole cache holds (the
            // last sampled token takes no slot), so a request that asked for no
            // particular length is not refused for the cache's size.
            None => (limit as u64)
                .min(self.cache_tokens as u64 + 1)
                .saturating_sub(p as u64)
                .max(1),
        };
        let total = (p as u64).checked_add(max_tokens);
        if total.is_none_or(|t| t > limit as u64) || p >= limit {
            return Err(ApiError::bad_param(
                "max_tokens",
                format!(
                    "this model's maximum context length is {limit} tokens, but the request \
                     asks for {p} in the prompt + {max_tokens} to generate; shorten the \
                     prompt or lower max_tokens"
                ),
            ));
        }
        let mut stop_token_ids = self.eos_token_ids.clone();
        if c.ignore_eos {
            stop_token_ids.clear();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Prepared {
            id: format!("{prefix}-{n}"),
            created: unix_now(),
            prompt_ids,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p: c.top_p,
                seed: c.seed.unwrap_or(n),
            },
            stop: StopConditions {
                max_tokens: max_tokens as usize,
                stop_token_ids,
                ignore_eos: c.ignore_eos,
            },
            stop_strings,
            top_logprobs,
            stream: c.stream,
            include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }

    /// Queue `p` in the engine; returns its event stream.
    async fn submit(
        &self,
        p: &Prepared,
        arrived: Instant,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let waiting = self.shared.waiting();
        // A request waits when others already do or every sequence slot is taken.
        let would_wait = waiting > 0 || self.shared.snapshot().stats.running >= self.max_num_seqs;
        if would_wait && waiting >= self.max_waiting {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: Some("overloaded"),
                retry_after: Some(1),
                ..ApiError::bad(format!(
                    "the server is busy: {waiting} requests are waiting (limit --max-waiting \
                     = {}); retry shortly",
                    self.max_waiting
                ))
            });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, accepted) = oneshot::channel();
        let request = NewRequest {
            prompt_ids: p.prompt_ids.clone(),
            sampling: p.sampling.clone(),
            stop: p.stop.clone(),
            stop_strings: p.stop_strings.clone(),
            top_logprobs: p.top_logprobs,
            arrived,
            events,
        };
        // The guard lives in this block only: the future must stay Send across awaits.
        let sent = {
            let commands = self
                .commands
                .lock()
                .map_err(|_| ApiError::internal("the engine thread is gone"))?;
            self.shared.pending.fetch_add(1, Ordering::Relaxed);
            commands.send(Command::Add {
                request: Box::new(request),
                reply,
            })
        };
        if sent.is_err() {
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::internal("the engine thread has stopped"));
        }
        match accepted.await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(message)) => Err(ApiError::bad(message)),
            Err(_) => Err(ApiError::internal("the engine thread has stopped")),
        }
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::bad(format!("cannot tokenise the prompt: {e}")))
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Gather a whole generation (non-streaming responses).
struct Collected {
    text: String,
    tokens: Vec<TokenEvent>,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// The error of a request stopped by `--request-timeout`.
fn timed_out(timeout: std::time::Duration) -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        code: Some("request_timeout"),
        ..ApiError::internal(format!(
            "the request ran past --request-timeout = {} s and was stopped",
            timeout.as_secs_f64()
        ))
    }
}

/// When a request that arrived at `arrived` runs out of time, if it can.
fn deadline(
    state: &AppState,
    arrived: Instant,
) -> Option<(tokio::time::Instant, std::time::Duration)> {
    state
        .request_timeout
        .map(|t| (tokio::time::Instant::from_std(arrived + t), t))
}

/// The next engine event, or `Err` with the timeout once the deadline has passed.
async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Result<Option<Event>, std::time::Duration> {
    match deadline {
        Some((at, t)) => tokio::time::timeout_at(at, rx.recv()).await.map_err(|_| t),
        None => Ok(rx.recv().await),
    }
}

/// Dropping `rx` (on an error or a timeout) is what stops the request in the engine.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = next_event(&mut rx, deadline).await.map_err(timed_out)? {
        match ev {
            Event::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    tokens,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                })
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// How one endpoint turns engine events into JSON chunks of a stream.
trait ChunkFormat: Send {
    /// The chunk for one token, or None when it adds nothing (no text, no logprobs).
    fn token(&mut self, t: &TokenEvent) -> Option<Value>;
    /// The closing chunk (finish_reason and usage), and a usage-only chunk if asked.
    fn done(&mut self, finish_reason: &'static str, usage: Value) -> Vec<Value>;
}

/// The finish chunk, then: with `stream_options.include_usage`, a usage-only chunk (the
/// same envelope with no choices, as OpenAI sends it); without, `usage` on the finish
/// chunk itself. Usage is sent once either way, so clients that add chunks up count it
/// once.
fn closing_chunks(mut last: Value, include_usage: bool, usage: Value) -> Vec<Value> {
    if include_usage {
        let mut u = last.clone();
        u["choices"] = json!([]);
        u["usage"] = usage;
        vec![last, u]
    } else {
        last["usage"] = usage;
        vec![last]
    }
}

struct SseState {
    rx: mpsc::UnboundedReceiver<Event>,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
    queue: std::collections::VecDeque<String>,
    finished: bool,
    format: Box<dyn ChunkFormat>,
}

/// Server-sent events from the engine's events, ending in `data: [DONE]`. Dropping the
/// stream (the client went away) drops `rx`, which the engine thread sees as closed and
/// aborts the request.
fn sse_response(
    rx: mpsc::UnboundedReceiver<Event>,
    first: Vec<Value>,
    format: Box<dyn ChunkFormat>,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Response {
    let state = SseState {
        rx,
        deadline,
        queue: first.iter().map(Value::to_string).collect(),
        finished: false,
        format,
    };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.finished {
                return None;
            }
            let event = match next_event(&mut st.rx, st.deadline).await {
                Ok(event) => event,
                Err(t) => {
                    // The stream ends here; dropping the receiver stops the request.
                    let e = timed_out(t);
                    let body = json!({"error": {"message": e.message, "type": e.kind,
                                                "param": null, "code": e.code}});
                    st.queue.push_back(body.to_string());
                    st.queue.push_back("[DONE]".into());
                    st.finished = true;
                    continue;
                }
            };
            match event {
                Some(Event::Token(t)) => {
                    if let Some(v) = st.format.token(&t) {
                        st.queue.push_back(v.to_string());
                    }
                }
                Some(Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let u = usage(prompt_tokens, completion_tokens);
                    for v in st.format.done(finish_reason, u) {
                        st.queue.push_back(v.to_string());
                    }
                    st.queue.push_back("[DONE]".into());
                    st.finished = true;
                }
                Some(Event::Error(e)) => {
                    let body = json!({"error": {"message": e, "type": "server_error",
                                                "param": null, "code": null}});
                    st.queue.push_back(body.to_string());
                    st.queue.push_back("[DONE]".into());
                    st.finished = true;
                }
                None => {
                    // The engine dropped the request without an ending: say so.
                    let body = json!({"error": {"message": "the engine stopped this request",
                                                "type": "server_error", "param": null,
                                                "code": null}});
                    st.queue.push_back(body.to_string());
                    st.queue.push_back("[DONE]".into());
                    st.finished = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---- /v1/completions ------------------------------------------------------------------

/// Legacy completions `logprobs`: parallel lists, `top_logprobs` as token -> logprob maps.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    fn push(&mut self, t: &TokenEvent, k: usize, offset: usize) {
        let Some(lp) = &t.logprobs else { return };
        self.tokens.push(t.token_text.clone().unwrap_or_default());
        self.token_logprobs.push(lp.logprob);
        // A map keyed by text: alternatives that decode alike (byte pieces of one
        // character) collapse, so the engine was asked for spares and k distinct are kept.
        let mut top = serde_json::Map::new();
        for ((_, p), text) in lp.top.iter().zip(&t.top_texts) {
            if top.len() == k {
                break;
            }
            top.entry(text.clone()).or_insert(json!(p));
        }
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(offset);
    }

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    /// Some(k) when `logprobs` was asked.
    logprobs: Option<usize>,
    /// Offset of the next token in the returned text.
    offset: usize,
    include_usage: bool,
}

impl CompletionFormat {
    fn chunk(&self, text: &str, logprobs: Value, finish: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}],
        })
    }
}

impl ChunkFormat for CompletionFormat {
    fn token(&mut self, t: &TokenEvent) -> Option<Value> {
        let logprobs = match self.logprobs {
            Some(k) => {
                let mut lp = CompletionLogprobs::default();
                lp.push(t, k, self.offset);
                self.offset += t.token_text.as_deref().map_or(0, str::len);
                lp.json()
            }
            None if t.text.is_empty() => return None,
            None => Value::Null,
        };
        Some(self.chunk(&t.text, logprobs, Value::Null))
    }

    fn done(&mut self, finish_reason: &'static str, usage: Value) -> Vec<Value> {
        closing_chunks(
            self.chunk("", Value::Null, json!(finish_reason)),
            self.include_usage,
            usage,
        )
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let b: CompletionBody = parse_body(body)?;
    state.check_model(&b.common.model)?;
    if let Some(k) = b.logprobs {
        if k > MAX_LOGPROBS {
            return Err(ApiError::bad_param(
                "logprobs",
                format!("logprobs = {k}: at most {MAX_LOGPROBS} are allowed"),
            ));
        }
    }
    let (ids, prompt_text) = match b.prompt {
        None => {
            return Err(ApiError::bad_param(
                "prompt",
                "the field `prompt` is missing",
            ))
        }
        Some(Prompt::Text(s)) => (state.encode(&s, true)?, Some(s)),
        Some(Prompt::Texts(v)) if v.len() == 1 => (state.encode(&v[0], true)?, v.first().cloned()),
        Some(Prompt::Ids(v)) => (v, None),
        Some(Prompt::IdLists(mut v)) if v.len() == 1 => (v.remove(0), None),
        Some(Prompt::Texts(v)) => return Err(batch_refused(v.len())),
        Some(Prompt::IdLists(v)) => return Err(batch_refused(v.len())),
    };
    if b.echo && b.logprobs.is_some() {
        return Err(ApiError::bad_param(
            "echo",
            "echo together with logprobs is not supported (prompt log-probabilities are not              computed); drop one of them",
        ));
    }
    let echo = if b.echo {
        match prompt_text {
            Some(t) => t,
            None => state
                .tokenizer
                .decode(&ids, false)
                .map_err(|e| ApiError::bad(format!("cannot decode the prompt ids: {e}")))?,
        }
    } else {
        String::new()
    };
    let k = b.logprobs.map(|k| k as usize);
    let p = state.prepare("cmpl", &b.common, ids, Some(16), engine_top(k))?;
    let rx = state.submit(&p, arrived).await?;
    let mut format = CompletionFormat {
        id: p.id.clone(),
        created: p.created,
        model: state.model_id.clone(),
        logprobs: k,
        offset: echo.len(),
        include_usage: p.include_usage,
    };
    if p.stream {
        let first = if echo.is_empty() {
            Vec::new()
        } else {
            vec![format.chunk(&echo, Value::Null, Value::Null)]
        };
        return Ok(sse_response(
            rx,
            first,
            Box::new(format),
            deadline(&state, arrived),
        ));
    }
    let c = collect(rx, deadline(&state, arrived)).await?;
    let logprobs = match k {
        Some(k) => {
            let mut lp = CompletionLogprobs::default();
            for t in &c.tokens {
                lp.push(t, k, format.offset);
                format.offset += t.token_text.as_deref().map_or(0, str::len);
            }
            lp.json()
        }
        None => Value::Null,
    };
    let mut out = format.chunk(
        &format!("{echo}{}", c.text),
        logprobs,
        json!(c.finish_reason),
    );
    out["usage"] = usage(c.prompt_tokens, c.completion_tokens);
    Ok(Json(out).into_response())
}

/// Alternatives the engine computes for `logprobs = k`: a few spare ones, since the
/// completions format keys them by text and alternatives can decode alike; at least one,
/// which is what makes the engine report the chosen token's log-probability.
fn engine_top(k: Option<usize>) -> usize {
    k.map_or(0, |k| k + 8)
}

fn batch_refused(n: usize) -> ApiError {
    ApiError::bad_param(
        "prompt",
        format!("{n} prompts in one request are not supported: send one prompt per request"),
    )
}

// ---- /v1/chat/completions -------------------------------------------------------------

fn chat_logprob_entry(t: &TokenEvent, k: usize) -> Option<Value> {
    let lp = t.logprobs.as_ref()?;
    let entry = |text: &str, p: f64| json!({"token": text, "logprob": p, "bytes": text.as_bytes()});
    let text = t.token_text.as_deref().unwrap_or_default();
    let mut e = entry(text, lp.logprob);
    e["top_logprobs"] = lp
        .top
        .iter()
        .zip(&t.top_texts)
        .take(k)
        .map(|((_, p), s)| entry(s, *p))
        .collect::<Vec<_>>()
        .into();
    Some(e)
}

struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    logprobs: Option<usize>,
    include_usage: bool,
}

impl ChatFormat {
    fn chunk(&self, delta: Value, logprobs: Value, finish: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}],
        })
    }
}

impl ChunkFormat for ChatFormat {
    fn token(&mut self, t: &TokenEvent) -> Option<Value> {
        let logprobs = match self.logprobs {
            Some(k) => json!({"content": chat_logprob_entry(t, k).into_iter().collect::<Vec<_>>()}),
            None if t.text.is_empty() => return None,
            None => Value::Null,
        };
        Some(self.chunk(json!({"content": t.text}), logprobs, Value::Null))
    }

    fn done(&mut self, finish_reason: &'static str, usage: Value) -> Vec<Value> {
        closing_chunks(
            self.chunk(json!({}), Value::Null, json!(finish_reason)),
            self.include_usage,
            usage,
        )
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let b: ChatBody = parse_body(body)?;
    state.check_model(&b.common.model)?;
    let k = match (b.logprobs, b.top_logprobs) {
        (_, Some(k)) if k > MAX_LOGPROBS => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                format!("top_logprobs = {k}: at most {MAX_LOGPROBS} are allowed"),
            ))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs needs logprobs = true",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    if b.messages.is_empty() {
        return Err(ApiError::bad_param("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => s.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_param(
                                "messages",
                                format!(
                                    "messages[{i}] has a content part of type `{kind}`; only \
                                     text parts are supported"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_param(
                "messages",
                format!(
                    "messages[{i}].role is `{}`; valid roles: {}",
                    m.role,
                    CHAT_ROLES.join(", ")
                ),
            ));
        }
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
        });
    }
    let template = state.chat_template.as_deref().ok_or_else(|| {
        ApiError::bad(format!(
            "the model `{}` has no chat template; use /v1/completions",
            state.model_id
        ))
    })?;
    let text = render_chat(
        template,
        &messages,
        state.bos_token.as_deref(),
        state.eos_token.as_deref(),
        true,
    )
    .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    // The template already holds the special tokens.
    let ids = state.encode(&text, false)?;
    let p = state.prepare("chatcmpl", &b.common, ids, None, engine_top(k))?;
    let rx = state.submit(&p, arrived).await?;
    let format = ChatFormat {
        id: p.id.clone(),
        created: p.created,
        model: state.model_id.clone(),
        logprobs: k,
        include_usage: p.include_usage,
    };
    if p.stream {
        let first = format.chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        );
        return Ok(sse_response(
            rx,
            vec![first],
            Box::new(format),
            deadline(&state, arrived),
        ));
    }
    let c = collect(rx, deadline(&state, arrived)).await?;
    let logprobs = match k {
        Some(k) => json!({"content": c.tokens.iter().filter_map(|t| chat_logprob_entry(t, k))
                                     .collect::<Vec<_>>()}),
        None => Value::Null,
    };
    Ok(Json(json!({
        "id": p.id,
        "object": "chat.completion",
        "created": p.created,
        "model": state.model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }))
    .into_response())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
