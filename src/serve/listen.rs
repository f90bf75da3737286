//! The accept loop: hyper's HTTP/1 connections with the limits a server on a shared
//! machine needs, which `axum::serve` does not set.
//!
//! - a header-read timeout: the whole request head must arrive within it, and it also
//!   runs while a kept-alive connection waits for its next request, so idle connections,
//!   half-sent heads and Slowloris clients (a header line now and then) are closed;
//! - a body-read timeout ([`body_deadline`], a middleware): a request whose body does not
//!   arrive within it gets 408;
//! - a cap on open connections: one past it gets a 503 with `Retry-After` and is closed,
//!   so a flood cannot use up the process's file descriptors;
//! - graceful shutdown: on the signal no connection is accepted, each open one finishes
//!   its request in flight (streams included) and closes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The connection limits of `llmem serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The request head must arrive within this; also the idle keep-alive timeout.
    pub header_timeout: Duration,
    /// The request body must arrive within this.
    pub body_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// The answer to a connection past the cap (written raw: no hyper connection exists).
const TOO_MANY: &str = "{\"error\":{\"message\":\"too many open connections; retry shortly\",\
\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";

/// Accept on `listener` and serve `app` within `limits` until `shutdown` resolves, then
/// drain: no new connection, each open one finishes its request in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tasks = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors or the like: wait a little instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let app = app.clone();
                let stop = stop_rx.clone();
                tasks.spawn(async move {
                    connection(stream, app, limits.header_timeout, stop).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tasks.spawn(refuse(stream));
            }
        }
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

/// One HTTP/1 connection until it closes, or until `stop` asks it to finish.
async fn connection(
    stream: TcpStream,
    app: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// A connection past the cap: a 503 with `Retry-After`, then close.
async fn refuse(mut stream: TcpStream) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{TOO_MANY}",
        TOO_MANY.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// Middleware: read the whole request body within `timeout` (and `limit` bytes) before
/// the handler runs; 408 when it does not arrive in time, 413 past the limit.
pub async fn body_deadline(
    timeout: Duration,
    limit: usize,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {limit} bytes (--max-body-bytes), or cut off"),
            "body_too_large",
        ),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s (--body-timeout)",
                timeout.as_secs_f64()
            ),
            "body_timeout",
        ),
    }
}

fn error(status: StatusCode, message: String, code: &str) -> Response {
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": code,
    }});
    (status, axum::Json(body)).into_response()
}
