//! L3: the HTTP API `/api/v1` and the web dashboard at `/` — the only user of axum.
//!
//! The same [`router`] serves the unix socket and the TCP listener; the identity middleware
//! turns the connection (peer uid) or the bearer token into a [`Caller`], and the scheduler
//! decides what that caller may do. Handlers are thin: parse, ask the scheduler or read its
//! snapshot, answer. The dashboard's files ([`web`]) are public and outside the middleware: the
//! page holds no data, it reads `/api/v1` (and its push streams, [`stream`]) with the token
//! the user gives it.

mod error;
pub mod follow;
pub mod identity;
mod jobs;
mod schedules;
mod stream;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use identity::{AuthPolicy, UnixPeer};

use crate::sched::SchedHandle;
use crate::spec::api::{Health, Whoami};
use crate::spec::{Caller, JobState, Millis, now_ms};

/// Largest request body accepted (job files are at most 256 KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub sched: SchedHandle,
    pub auth: Arc<AuthPolicy>,
    pub jobs_dir: Arc<std::path::PathBuf>,
    pub watcher: Arc<follow::DirWatcher>,
    pub started_at: Millis,
    /// The daemon's default Ollama models directory.
    pub ollama_models: Arc<Option<std::path::PathBuf>>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/whoami", get(whoami))
        .route("/jobs", get(jobs::list).post(jobs::submit))
        .route("/jobs/validate", post(jobs::validate))
        .route("/jobs/{id}", get(jobs::get_job))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/requeue", post(jobs::requeue))
        .route("/jobs/{id}/priority", post(jobs::set_priority))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/jobs/{id}/logs", get(jobs::logs))
        .route("/jobs/{id}/explain", get(jobs::explain))
        .route("/jobs/{id}/publish", post(jobs::publish))
        .route("/jobs/{id}/metrics", get(jobs::metrics))
        .route("/jobs/{id}/stream", get(stream::job_stream))
        .route("/queue", get(jobs::queue))
        .route("/stream", get(stream::queue_stream))
        .route("/models", get(jobs::models))
        .route("/gpus", get(jobs::gpus))
        .route("/schedules", get(schedules::list).post(schedules::create))
        .route(
            "/schedules/{id}",
            get(schedules::get_one).delete(schedules::delete),
        )
        .route("/schedules/{id}/{action}", post(schedules::action))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
        // A known path with another method: the API's error shape, not an empty 405.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this endpoint does not take {method}"),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), identify));
    web::routes()
        .nest(crate::spec::api::PREFIX, api)
        .fallback(|| async { ApiError::not_found("not found") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Establishes the [`Caller`] of every request.
async fn identify(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<UnixPeer>>() {
        st.auth.for_uid(peer.uid)
    } else {
        match req.headers().get(AUTHORIZATION) {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    // The scheme name is case-insensitive (RFC 9110).
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim());
                match token.and_then(|t| st.auth.for_token(t)) {
                    Some(c) => c,
                    None => return ApiError::unauthorized("invalid bearer token").into_response(),
                }
            }
            None if st.auth.anonymous_read => Caller::anonymous(),
            None => {
                return ApiError::unauthorized(
                    "this listener needs a bearer token (Authorization: Bearer ...)",
                )
                .into_response();
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Refuses anonymous callers for requests that change something.
pub(crate) fn require_user(caller: &Caller) -> Result<&str, ApiError> {
    caller.user.as_deref().ok_or_else(|| {
        ApiError::unauthorized("changing jobs needs a bearer token on TCP (or use the unix socket)")
    })
}

async fn health(State(st): State<AppState>) -> Json<Health> {
    let view = st.sched.view();
    let counts = JobState::ALL
        .iter()
        .map(|s| (*s, view.jobs.values().filter(|j| j.state == *s).count()))
        .filter(|(_, n)| *n > 0)
        .collect();
    let _ = now_ms();
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: st.started_at,
        counts,
    })
}

async fn whoami(axum::Extension(caller): axum::Extension<Caller>) -> Json<Whoami> {
    Json(Whoami {
        user: caller.user.clone(),
        uid: caller.uid,
        admin: caller.admin,
        can_submit: caller.can_submit,
    })
}

/// Serves `router` on the connections `accept` yields until `stop`: HTTP/1.1 by hyper, with a
/// limit on how long a client may take to send a request's headers (`axum::serve` has none, so
/// a client trickling a header a byte at a time held its connection, and a file descriptor,
/// for as long as it liked). A unix socket's peer is given to the handlers as `ConnectInfo`.
pub async fn serve<S, A, F>(
    mut accept: A,
    router: axum::Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<(S, Option<UnixPeer>)>>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower_service::Service;
    loop {
        let (io, peer) = tokio::select! {
            accepted = accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let router = router.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(p) = &peer {
                        req.extensions_mut().insert(ConnectInfo(*p));
                    }
                    // A Router is always ready, so it is called without `poll_ready`.
                    router.clone().call(req.map(axum::body::Body::new))
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
