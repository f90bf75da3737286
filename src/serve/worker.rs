//! The engine thread: one thread owns the [`Engine`] and the tokenizer, takes new
//! requests from a channel, steps the engine while there is work, turns tokens into text
//! (incremental detokenisation, stop strings) and sends each request its events.
//!
//! Why a plain thread and not a tokio task: a step is a blocking, CPU-bound forward pass
//! (tens of milliseconds); it must not sit on the async runtime's workers, which keep
//! answering HTTP (health, metrics, the dashboard) while the model runs.
//!
//! Cancellation: a request's event channel is its lifeline. When the HTTP side drops the
//! receiver (the client went away, or the handler finished), the next loop iteration sees
//! the channel closed and aborts the request in the engine, which frees its KV blocks at
//! once. Every request therefore ends exactly one way: finished, failed or aborted.
//!
//! After each iteration the thread publishes a [`Snapshot`] (engine gauges, counters,
//! latency histograms) that `/v1/memory`, `/metrics` and the status line read.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmem_engine::engine::scheduler::{FinishReason, StopConditions};
use llmem_engine::engine::{Engine, RequestId, TokenLogprobs};
use llmem_engine::request::SamplingParams;
use llmem_engine::sample::detok::{IncrementalDecoder, StopStrings};
use tokio::sync::{mpsc, oneshot};

use super::metrics::{Shared, Snapshot};

/// A request as the HTTP layer hands it to the engine thread.
pub struct NewRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub stop_strings: Vec<String>,
    /// Alternatives to report per token (0: no log-probabilities).
    pub top_logprobs: usize,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What a request hears back, in order: zero or more `Token`s, then one `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    Token(TokenEvent),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// One generated token and the text it releases (possibly empty: an unfinished
/// character, or text that may be the start of a stop string, is held back).
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub text: String,
    /// The token alone, decoded (for `logprobs.tokens`), when log-probabilities were asked.
    pub token_text: Option<String>,
    pub logprobs: Option<TokenLogprobs>,
    /// Decoded alternatives, parallel to `logprobs.top`.
    pub top_texts: Vec<String>,
}

pub enum Command {
    Add {
        request: Box<NewRequest>,
        /// Ok once queued in the engine; Err(message) if the engine refused it.
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A live request on the engine thread.
struct Live<'t> {
    events: mpsc::UnboundedSender<Event>,
    decoder: IncrementalDecoder<'t>,
    stops: StopStrings,
    want_logprobs: bool,
    prompt_tokens: usize,
    /// The last token fed or generated (context for decoding one token's text).
    prev_id: u32,
    generated: usize,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// Run the engine loop until every command sender is gone and no work is left.
pub fn run(
    mut engine: Engine,
    tokenizer: tokenizers::Tokenizer,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
) {
    // Scheduling, sampling and detokenizing are the runtime's; the passes count
    // themselves as activations (`llmem_engine::heap`).
    llmem_engine::heap::tag_thread(llmem_engine::heap::Component::Runtime, 0);
    let tok = &tokenizer;
    let mut live: HashMap<RequestId, Live<'_>> = HashMap::new();
    let mut counters = Snapshot::new(engine.stats());
    let mut disconnected = false;
    loop {
        // Take every command waiting; block (briefly, to notice shutdown) only when idle.
        loop {
            let cmd = if engine.has_work() || disconnected {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            } else {
                match commands.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            };
            match cmd {
                Command::Add { request, reply } => {
                    let r = *request;
                    let prompt_tokens = r.prompt_ids.len();
                    let prev_id = r.prompt_ids.last().copied().unwrap_or(0);
                    let added = engine.add_request_with_logprobs(
                        r.prompt_ids,
                        r.sampling,
                        r.stop,
                        r.top_logprobs,
                    );
                    shared.pending.fetch_sub(1, Ordering::Relaxed);
                    match added {
                        Ok(id) => {
                            counters.prompt_tokens_total += prompt_tokens as u64;
                            live.insert(
                                id,
                                Live {
                                    events: r.events,
                                    decoder: IncrementalDecoder::new(tok, true),
                                    stops: StopStrings::new(r.stop_strings),
                                    want_logprobs: r.top_logprobs > 0,
                                    prompt_tokens,
                                    prev_id,
                                    generated: 0,
                                    arrived: r.arrived,
                                    last_token: None,
                                },
                            );
                            let _ = reply.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
        // Publish now too: requests just moved from `pending` into the engine's queue
        // stay counted as waiting while the next step runs.
        counters.stats = engine.stats();
        *shared
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = counters.clone();
        // Clients that went away: abort at once, which frees their blocks.
        let gone: Vec<RequestId> = live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.abort(id);
            live.remove(&id);
            counters.requests_aborted += 1;
        }
        // Events are sent after the snapshot is published, so a client that has its last
        // token already sees its blocks freed in /v1/memory.
        let mut outbox: Vec<(mpsc::UnboundedSender<Event>, Event)> = Vec::new();
        if engine.has_work() {
            match engine.step() {
                Ok(outputs) => {
                    let now = Instant::now();
                    for out in outputs {
                        handle_output(
                            &mut engine,
                            tok,
                            &mut live,
                            &mut counters,
                            &mut outbox,
                            out,
                            now,
                        );
                    }
                }
                Err(e) => {
                    // The failed step's sequences were aborted by the engine; tell them.
                    let failed: Vec<RequestId> = live
                        .keys()
                        .filter(|id| engine.tokens(**id).is_none())
                        .copied()
                        .collect();
                    for id in failed {
                        if let Some(l) = live.remove(&id) {
                            outbox
                                .push((l.events, Event::Error(format!("generation failed: {e}"))));
                            counters.requests_failed += 1;
                        }
                    }
                }
            }
        }
        counters.stats = engine.stats();
        counters.rank_activation = engine.rank_activation_bytes();
        counters.rank_activation_measured = engine.measured_activation_bytes();
        *shared
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = counters.clone();
        for (to, event) in outbox {
            // A closed channel is noticed (and the request aborted) next iteration.
            let _ = to.send(event);
        }
        if disconnected && !engine.has_work() {
            return;
        }
    }
}

fn handle_output<'t>(
    engine: &mut Engine,
    tok: &'t tokenizers::Tokenizer,
    live: &mut HashMap<RequestId, Live<'t>>,
    counters: &mut Snapshot,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
    out: llmem_engine::engine::StepOutput,
    now: Instant,
) {
    let Some(l) = live.get_mut(&out.id) else {
        // Not ours (cannot happen: every request comes through Command::Add).
        engine.abort(out.id);
        return;
    };
    counters.generated_tokens_total += 1;
    l.generated += 1;
    match l.last_token {
        None => counters
            .ttft
            .observe(now.duration_since(l.arrived).as_secs_f64()),
        Some(prev) => counters.itl.observe(now.duration_since(prev).as_secs_f64()),
    }
    l.last_token = Some(now);
    let decode_err = |e: llmem_engine::Error| format!("detokenising: {e}");
    let mut text = match l.decoder.push(out.token) {
        Ok(piece) => l.stops.push(&piece),
        Err(e) => {
            fail(engine, live, counters, outbox, out.id, decode_err(e));
            return;
        }
    };
    let mut finish = out.finished;
    if finish.is_none() && l.stops.stopped() {
        // A stop string: the engine does not know; end the request here.
        engine.abort(out.id);
        finish = Some(FinishReason::Stop);
    }
    if finish.is_some() && !l.stops.stopped() {
        match l.decoder.flush() {
            Ok(rest) => text.push_str(&l.stops.push(&rest)),
            Err(e) => {
                fail(engine, live, counters, outbox, out.id, decode_err(e));
                return;
            }
        }
        text.push_str(&l.stops.finish());
    }
    if l.stops.stopped() {
        // A stop string in the last token (or the flushed tail) ends it as "stop" too.
        finish = Some(FinishReason::Stop);
    }
    let (token_text, top_texts) = if l.want_logprobs {
        // Each token's text in context: decode(previous, token) minus decode(previous).
        // Alone, a SentencePiece token loses its leading space ("▁the" -> "the").
        let prev = l.prev_id;
        let before = tok.decode(&[prev], false).unwrap_or_default();
        let one = |id: u32| {
            let both = tok.decode(&[prev, id], false).unwrap_or_default();
            match both.strip_prefix(before.as_str()) {
                Some(rest) => rest.to_string(),
                None => tok.decode(&[id], false).unwrap_or_default(),
            }
        };
        (
            Some(one(out.token)),
            out.logprobs
                .as_ref()
                .map(|lp| lp.top.iter().map(|&(id, _)| one(id)).collect())
                .unwrap_or_default(),
        )
    } else {
        (None, Vec::new())
    };
    l.prev_id = out.token;
    outbox.push((
        l.events.clone(),
        Event::Token(TokenEvent {
            text,
            token_text,
            logprobs: out.logprobs,
            top_texts,
        }),
    ));
    if let Some(reason) = finish {
        outbox.push((
            l.events.clone(),
            Event::Done {
                finish_reason: reason.as_str(),
                prompt_tokens: l.prompt_tokens,
                completion_tokens: l.generated,
            },
        ));
        live.remove(&out.id);
        counters.requests_finished += 1;
    }
}

fn fail(
    engine: &mut Engine,
    live: &mut HashMap<RequestId, Live<'_>>,
    counters: &mut Snapshot,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
    id: RequestId,
    message: String,
) {
    engine.abort(id);
    if let Some(l) = live.remove(&id) {
        outbox.push((l.events, Event::Error(message)));
    }
    counters.requests_failed += 1;
}
