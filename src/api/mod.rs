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
mod metrics;
mod schedules;
mod stream;
mod sweeps;
pub mod web;

use std::collections::HashMap;
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
    /// Train jobs' results so far, read incrementally for `/sweeps/{id}`.
    pub train_results: Arc<metrics::TrainResults>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/whoami", get(whoami))
        .route("/jobs", get(jobs::list).post(jobs::submit))
        .route("/jobs/validate", post(jobs::validate))
        .route("/jobs/clean", post(jobs::clean))
        .route("/jobs/{id}", get(jobs::get_job))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/requeue", post(jobs::requeue))
        .route("/jobs/{id}/resubmit", post(jobs::resubmit))
        .route("/jobs/{id}/hold", post(jobs::hold))
        .route("/jobs/{id}/release", post(jobs::release))
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
        .route("/sweeps", post(sweeps::submit))
        .route("/sweeps/{id}", get(sweeps::get_one))
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
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("the dashboard's files are read with GET, not {method}"),
            )
        })
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

/// Who a job submitted by `caller` belongs to; only known callers may submit.
pub(crate) fn submitter(st: &AppState, caller: &Caller) -> Result<crate::spec::Owner, ApiError> {
    require_user(caller)?;
    st.auth
        .owner_for(caller)
        .ok_or_else(|| ApiError::unauthorized("unknown caller"))
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

async fn whoami(
    State(st): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Json<Whoami> {
    let limits = caller.user.as_deref().map(|user| limits_of(&st, user));
    Json(Whoami {
        user: caller.user.clone(),
        uid: caller.uid,
        admin: caller.admin,
        can_submit: caller.can_submit,
        limits,
    })
}

/// `user`'s limits and their jobs counted against them, from the current view (one pass over
/// it: `whoami` is asked rarely).
fn limits_of(st: &AppState, user: &str) -> crate::spec::api::LimitsView {
    use crate::config::LimitSource;
    let policy = st.sched.policy();
    let l = policy.limits_for(user);
    let submit = policy.submit_limit(user);
    let view = st.sched.view();
    let mine = view.jobs.values().filter(|j| j.owner.user == user);
    let (mut unfinished, mut running) = (0u32, 0u32);
    for j in mine {
        unfinished += u32::from(!j.state.is_terminal());
        running += u32::from(matches!(j.state, JobState::Starting | JobState::Running));
    }
    crate::spec::api::LimitsView {
        max_running: l.max_running,
        max_gpus: l.max_gpus,
        max_vram: l.max_vram.map(|b| b.0),
        max_submitted: submit.max,
        max_submitted_set_in: match submit.source {
            LimitSource::User(u) => format!("[scheduler.limits.{u}]"),
            LimitSource::Default => "[scheduler.limits.default]".into(),
            LimitSource::BuiltIn => "built-in".into(),
        },
        unfinished,
        running,
    }
}

/// How [`serve`] protects a listener from clients that hold connections without using them.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// How long a client may take to send a request's headers, and then its body.
    pub request_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one unix-socket user (but root) may hold at once, so that one user's
    /// streams cannot take every connection from the others; more are answered 503.
    pub max_per_user: Option<usize>,
    /// Host names a request's `Host` may carry (port aside); `None`: any. A listener on a
    /// loopback address takes only its own names, so that a web page whose name an attacker
    /// points at 127.0.0.1 (DNS rebinding) cannot read it from the user's browser.
    pub allowed_hosts: Option<Vec<String>>,
}

impl ServeLimits {
    /// The host names a listener on `addr` answers to: for a loopback address, `localhost`,
    /// the address itself and `extra` (names a reverse proxy passes on); otherwise any.
    pub fn hosts_for(addr: std::net::SocketAddr, extra: &[String]) -> Option<Vec<String>> {
        if !addr.ip().is_loopback() {
            return None;
        }
        let mut hosts = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            addr.ip().to_string(),
        ];
        hosts.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
        Some(hosts)
    }
}

/// One connection counted against its unix user's share ([`ServeLimits::max_per_user`]).
struct UserSlot {
    counts: Arc<std::sync::Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl UserSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<HashMap<u32, usize>>>,
        uid: u32,
        max: usize,
    ) -> Option<Self> {
        let mut c = counts.lock().expect("connection counts");
        let n = c.entry(uid).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("connection counts");
        if let Some(n) = c.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

/// Answers a connection over its user's share with 503 and closes it.
async fn refuse_busy<S: tokio::io::AsyncWrite + Unpin>(mut io: S) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":{"code":"too_many_connections","message":"too many connections to jobd at once (yours, or all users together: log followers, streams); close some and try again","problems":[]}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), io.write_all(answer.as_bytes())).await;
}

/// Whether a `Host` header names one of `allowed` (any port; `[::1]:8470` is `::1`).
fn host_allowed(host: Option<&axum::http::HeaderValue>, allowed: &[String]) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let port_ok = |p: &str| p.is_empty() || p.bytes().all(|b| b.is_ascii_digit());
    // `[v6]` or `[v6]:port`; `name` or `name:port` — nothing else (no lists, no spaces).
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok) => {
                v6
            }
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((h, p)) if port_ok(p) && !p.is_empty() => h,
            Some(_) => return false,
            None => host.as_str(),
        },
    };
    let name = name.trim_end_matches('.');
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
    {
        return false;
    }
    allowed.iter().any(|a| a == name) || name.ends_with(".localhost")
}

/// A request body that must have arrived by a deadline: after its headers, a client could
/// otherwise send the body a byte at a time, or never, holding its connection as long as it
/// liked.
struct TimedBody {
    inner: hyper::body::Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl hyper::body::Body for TimedBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {}s",
                self.timeout.as_secs()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection may go on once serving stops, for a request already on its way.
const STOP_LINGER: Duration = Duration::from_millis(500);

/// Serves `router` on the connections `accept` yields until `stop`: HTTP/1.1 by hyper, within
/// `limits` (`axum::serve` has none: a client trickling its headers or body a byte at a time
/// held its connection, and a file descriptor, for as long as it liked, and enough of them
/// left the daemon none for `jobctl`). A unix socket's peer is given to the handlers as
/// `ConnectInfo`. Once stopped, it returns when the connections it served have ended
/// (streams that never end are the caller's to give up on).
pub async fn serve<S, A, F>(
    mut accept: A,
    router: axum::Router,
    limits: ServeLimits,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<(S, Option<UnixPeer>)>>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower_service::Service;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_user: Arc<std::sync::Mutex<HashMap<u32, usize>>> = Arc::default();
    let allowed_hosts = limits.allowed_hosts.clone().map(Arc::new);
    let timeout = limits.request_timeout;
    // The connections being served: when asked to stop, this returns once they have ended.
    let connections = tokio_util::task::TaskTracker::new();
    let stopped = async {
        connections.close();
        connections.wait().await;
    };
    loop {
        // Per-user shares (the unix socket): accept first, to know who it is — root is always
        // served, others only with a free slot (else a 503); TCP waits for a slot first.
        let slot = if limits.max_per_user.is_some() {
            None
        } else {
            tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(s) => Some(s),
                    Err(_) => return stopped.await,
                },
                () = stop.cancelled() => return stopped.await,
            }
        };
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
            () = stop.cancelled() => return stopped.await,
        };
        let router = router.clone();
        let stop = stop.clone();
        let allowed_hosts = allowed_hosts.clone();
        let user = peer
            .and_then(|p| p.uid)
            .filter(|uid| *uid != 0 && limits.max_per_user.is_some());
        let user_slot = match user {
            Some(uid) => match UserSlot::take(&per_user, uid, limits.max_per_user.unwrap_or(0)) {
                Some(s) => Some(s),
                None => {
                    tokio::spawn(refuse_busy(io));
                    continue;
                }
            },
            None => None,
        };
        let slot = match slot {
            Some(s) => Some(s),
            None if user.is_none() => None,
            None => match slots.clone().try_acquire_owned() {
                Ok(s) => Some(s),
                Err(_) => {
                    tokio::spawn(refuse_busy(io));
                    continue;
                }
            },
        };
        connections.spawn(async move {
            let _slot = slot;
            let _user_slot = user_slot;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(p) = &peer {
                        req.extensions_mut().insert(ConnectInfo(*p));
                    }
                    let misdirected = allowed_hosts.as_ref().is_some_and(|hosts| {
                        !host_allowed(req.headers().get(axum::http::header::HOST), hosts)
                    });
                    let req = req.map(|inner| {
                        axum::body::Body::new(TimedBody {
                            inner,
                            deadline: Box::pin(tokio::time::sleep(timeout)),
                            timeout,
                        })
                    });
                    // A Router is always ready, so it is called without `poll_ready`.
                    let call = router.clone().call(req);
                    async move {
                        if misdirected {
                            return Ok(error::ApiError::new(
                                axum::http::StatusCode::MISDIRECTED_REQUEST,
                                "misdirected",
                                "this listener answers only to its own host names (Host: \
                                 localhost or its address; a reverse proxy's name goes in \
                                 allowed_hosts in the daemon's config)",
                            )
                            .into_response());
                        }
                        call.await
                    }
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    // A client that has just connected has its request on the way: a
                    // connection closed before it is read would leave the client unsure
                    // whether its change was made. Answer what comes in a moment; then
                    // finish the request in progress and close, or, for a stream that does
                    // not end (a log follower, which reconnects), give up on it.
                    if tokio::time::timeout(STOP_LINGER, conn.as_mut()).await.is_err() {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(STOP_LINGER, conn).await;
                    }
                }
            }
        });
    }
}
