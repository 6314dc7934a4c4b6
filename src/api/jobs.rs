//! Handlers of `/api/v1/jobs...` and `/api/v1/gpus`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, require_user, submitter};
use crate::sched::{self, Submission, View};
use crate::spec::api::{
    EventsResponse, GpuJob, GpuView, GpusResponse, JobSummary, JobView, ListQuery, ListResponse,
    PriorityRequest, QueueQuery, QueueResponse, QueueSort, ResubmitRequest, SortOrder,
    SubmitRequest,
};
use crate::spec::contract::files;
use crate::spec::job::parse_and_resolve_with;
use crate::spec::{Caller, JobId, JobRecord, JobSpec, JobState};

/// A job id from the URL, with a clear error for anything else.
pub struct JobIdPath(pub JobId);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for JobIdPath {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let UrlPath(raw) = UrlPath::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        // Digits only: `parse` would also take "+1".
        raw.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| raw.parse::<JobId>().ok())
            .flatten()
            .filter(|id| *id > 0)
            .map(JobIdPath)
            .ok_or_else(|| {
                ApiError::bad_request(format!("{raw:?} is not a job id (a positive number)"))
            })
    }
}

/// Hides environment values and a notifier's arguments (and so the job file text) from
/// callers who do not own the job: they may hold secrets such as API keys or a webhook's URL.
/// Whether anything was hidden.
pub(super) fn redact(
    caller: &Caller,
    owner: &str,
    spec: &mut JobSpec,
    source: &mut String,
) -> bool {
    if caller.may_change(owner) {
        return false;
    }
    let mut hidden = false;
    if let Some(cmd) = &mut spec.command
        && !cmd.env.is_empty()
    {
        for v in cmd.env.values_mut() {
            *v = "(hidden)".into();
        }
        hidden = true;
    }
    if let Some(notify) = &mut spec.notify {
        for arg in notify.argv.iter_mut().skip(1) {
            *arg = "(hidden)".into();
        }
        hidden = true;
    }
    if hidden {
        *source = "# hidden: this job file sets environment variables or a notifier; only its \
                   owner and admins see it\n"
            .into();
    }
    hidden
}

/// The job as `caller` may see it (see [`redact`]).
pub fn job_view(rec: &JobRecord, caller: &Caller, view: &View, jobs_dir: &Path) -> JobView {
    let mut record = rec.clone();
    let mut redacted = redact(
        caller,
        &rec.owner.user,
        &mut record.spec,
        &mut record.source,
    );
    if !caller.may_change(&rec.owner.user)
        && let Some(sweep) = &mut record.sweep
    {
        redacted |= sweep.hide_secrets();
    }
    // Train workers write it; a command job may too (`$JOBD_JOB_DIR/progress.json`).
    let progress = (rec.attempts > 0)
        .then(|| sched::read_progress(&rec.dir(jobs_dir)))
        .flatten();
    JobView {
        record,
        progress,
        waiting: view.waiting.get(&rec.id).map(|w| w.wait.short()),
        job_dir: Some(rec.dir(jobs_dir)),
        redacted,
    }
}

/// [`submission`], with the paths the job file names checked with `caller`'s file rights on a
/// root daemon: with root's, any local user could learn which files exist in directories
/// closed to them ("does not exist" vs "not executable").
pub(super) async fn submission_as(
    caller: &Caller,
    req: SubmitRequest,
) -> Result<Submission, ApiError> {
    submission_with_rights_of(caller.user.clone(), req, None).await
}

/// [`submission_named`] with `user`'s file rights (a root daemon checks the paths a job file
/// names as the user whose job it is).
pub(super) async fn submission_with_rights_of(
    user: Option<String>,
    req: SubmitRequest,
    named: Option<(String, bool)>,
) -> Result<Submission, ApiError> {
    let user = user.filter(|u| crate::config::running_as_root() && u != "root");
    tokio::task::spawn_blocking(move || {
        let creds = user
            .map(|u| crate::proc::RunAs::lookup(&u).map(|r| r.credentials()))
            .transpose()
            .map_err(|e| ApiError::forbidden(e.to_string()))?;
        let _as_caller = creds
            .as_ref()
            .map(crate::jobfs::Credentials::enter)
            .transpose()
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
        submission_named(req, named)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?
}

/// The job a submit request describes, parsed, resolved and checked; problems are said to be
/// in the file the request names, or in `named`'s origin instead, without line and column when
/// the text is no file's own (`rewritten`).
fn submission_named(
    req: SubmitRequest,
    named: Option<(String, bool)>,
) -> Result<Submission, ApiError> {
    let base = req.base_dir.ok_or_else(|| {
        ApiError::bad_request("base_dir is required: the absolute directory the job file's relative paths resolve against")
    })?;
    if !base.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "base_dir {} must be absolute",
            base.display()
        )));
    }
    let origin = req
        .source_path
        .as_deref()
        .and_then(Path::file_name)
        .map_or_else(
            || "job.toml".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    let more = |s: &crate::spec::JobSpec| {
        [crate::publish::base_issues(s), crate::chat::job_issues(s)].concat()
    };
    let spec = parse_and_resolve_with(&origin, &req.toml, &base, &more).map_err(|mut e| {
        if let Some((origin, rewritten)) = &named {
            e.origin.clone_from(origin);
            if *rewritten {
                for p in &mut e.problems {
                    (p.line, p.column) = (None, None);
                }
            }
        }
        e
    })?;
    let stem = req
        .source_path
        .as_deref()
        .and_then(Path::file_stem)
        .map_or_else(|| "job".to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Submission {
        name: spec.display_name(&stem),
        spec,
        source: req.toml,
        source_path: req.source_path,
        hold: req.hold,
        copy_of: None,
        sweep: None,
    })
}

pub async fn submit(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let owner = submitter(&st, &caller)?;
    let Json(req) = body?;
    let sub = submission_as(&caller, req).await?;
    let rec = st.sched.submit(&caller, owner, sub).await?;
    let view = st.sched.view();
    Ok((
        StatusCode::CREATED,
        Json(job_view(&rec, &caller, &view, &st.jobs_dir)),
    ))
}

/// Submits job `id`'s file again as a new job (`jobctl resubmit`, the dashboard's "Run
/// again"): the file as it was submitted (a schedule's run: as one job), with `set` changes,
/// its relative paths against the same directory. Only its owner or an admin may, and the
/// copy is its owner's, checked and run with the owner's rights, as a requeue would be: a copy
/// as the caller would run files its owner can change (`./train.sh`) as someone else.
pub async fn resubmit(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    require_user(&caller)?;
    // No body is `{}`: every field is optional, as for a requeue.
    let req: ResubmitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResubmitRequest::default()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v @ serde_json::Value::Object(_)) => serde_json::from_value(v)
                .map_err(|e| ApiError::bad_request(format!("invalid resubmit request: {e}")))?,
            Ok(_) => {
                return Err(ApiError::bad_request(
                    "invalid resubmit request: expected a JSON object such as {\"set\": [\"name=x\"], \"hold\": true}",
                ));
            }
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "invalid resubmit request: {e}"
                )));
            }
        }
    };
    let rec = st
        .sched
        .view()
        .jobs
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::from(sched::SchedError::NotFound(id)))?;
    if !caller.may_change(&rec.owner.user) {
        return Err(ApiError::forbidden(format!(
            "job {id} is {}'s: only its owner or an admin can resubmit it (the copy runs as its \
             owner); submit a job file of your own instead",
            rec.owner.user
        )));
    }
    // An admin reruns a job as its owner wrote it: a file changed by someone else would run
    // their commands with the owner's rights.
    if !req.set.is_empty() && caller.user.as_deref() != Some(rec.owner.user.as_str()) {
        return Err(ApiError::forbidden(format!(
            "job {id} is {}'s: only they can change its file (--set) when resubmitting it; \
             an admin's resubmit runs it unchanged",
            rec.owner.user
        )));
    }
    let base_dir =
        rec.spec.base_dir.clone().ok_or_else(|| {
            ApiError::bad_request(format!("job {id} has no base directory recorded"))
        })?;
    if !base_dir.is_dir() && req.set.is_empty() {
        let way_out = if caller.user.as_deref() == Some(rec.owner.user.as_str()) {
            "`--set command.workdir=DIR` gives a command job another one".to_string()
        } else {
            format!(
                "only {} can give it another one (`--set command.workdir=DIR`)",
                rec.owner.user
            )
        };
        return Err(ApiError::bad_request(format!(
            "job {id} was submitted from {}, which is gone: its relative paths (and a command's \
             default working directory) resolve there; {way_out}",
            base_dir.display()
        )));
    }
    let file = crate::spec::schedule::file_of_one_run(&rec).map_err(ApiError::bad_request)?;
    let name = rec
        .source_path
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| format!(" ({})", n.to_string_lossy()))
        .unwrap_or_default();
    let origin = format!("job {id}'s file{name}");
    let text = crate::spec::job::apply_overrides(&file, &origin, &req.set)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rewritten = text != rec.source;
    let origin = if req.set.is_empty() {
        origin
    } else {
        format!("{origin} with --set")
    };
    let request = SubmitRequest {
        toml: text,
        base_dir: Some(base_dir),
        source_path: rec.source_path.clone(),
        hold: req.hold,
    };
    let mut sub = submission_with_rights_of(
        Some(rec.owner.user.clone()),
        request,
        Some((origin, rewritten)),
    )
    .await?;
    let keys: Vec<String> = req
        .set
        .iter()
        .map(|s| {
            s.split_once('=')
                .map_or(s.as_str(), |(k, _)| k.trim())
                .to_string()
        })
        .collect();
    // A job of a sweep run again stays in it (JOBD_SWEEP_INDEX says which task it is), unless
    // `--set` changed a value the sweep gave it: then it is another point, of no sweep.
    sub.sweep = rec
        .sweep
        .clone()
        .filter(|s| crate::spec::sweep::values_hold(&sub.source, &s.values));
    sub.copy_of = Some((id, keys));
    let new = st.sched.submit(&caller, rec.owner.clone(), sub).await?;
    let view = st.sched.view();
    Ok((
        StatusCode::CREATED,
        Json(job_view(&new, &caller, &view, &st.jobs_dir)),
    ))
}

/// Validates a job file as submit would, without queueing it.
pub async fn validate(
    Extension(caller): Extension<Caller>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // Validation looks at the paths the file names, with the caller's rights: only known
    // callers may ask.
    require_user(&caller)?;
    let Json(req) = body?;
    let sub = submission_as(&caller, req).await?;
    Ok(Json(
        serde_json::json!({ "ok": true, "name": sub.name, "spec": sub.spec }),
    ))
}

/// The filters `GET /jobs` and `GET /queue` share.
struct JobFilter {
    states: Option<Vec<JobState>>,
    /// `state=held`: queued jobs on hold (a flag, not a state of its own).
    held: bool,
    owner: Option<String>,
    all: bool,
}

impl JobFilter {
    fn new(
        caller: &Caller,
        state: Option<&str>,
        owner: Option<&str>,
        mine: Option<bool>,
        all: Option<bool>,
    ) -> Result<JobFilter, ApiError> {
        // `state=` (empty) filters nothing, like no `state` at all.
        let mut held = false;
        let states: Option<Vec<JobState>> = state
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .filter(|p| {
                        let is_held = p.eq_ignore_ascii_case("held");
                        held |= is_held;
                        !is_held
                    })
                    .map(str::parse)
                    .collect::<Result<_, String>>()
            })
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("{e}, or held (queued jobs on hold)")))?;
        let owner = if mine == Some(true) {
            Some(
                caller
                    .user
                    .clone()
                    .ok_or_else(|| ApiError::bad_request("mine=true needs a known caller"))?,
            )
        } else {
            owner.map(str::to_string)
        };
        Ok(JobFilter {
            states,
            held,
            owner,
            all: all.unwrap_or(false),
        })
    }

    fn matches(&self, j: &JobRecord) -> bool {
        let held = self.held && j.state == JobState::Queued && j.held_by.is_some();
        let state_ok = held
            || match &self.states {
                Some(s) if s.is_empty() && self.held => false,
                Some(s) => s.contains(&j.state),
                None => self.all || !j.state.is_terminal(),
            };
        state_ok && self.owner.as_ref().is_none_or(|o| &j.owner.user == o)
    }
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(q) = query?;
    let filter = JobFilter::new(
        &caller,
        q.state.as_deref(),
        q.owner.as_deref(),
        q.mine,
        q.all,
    )?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let view = st.sched.view();
    let total = view.jobs.values().filter(|j| filter.matches(j)).count();
    let mut jobs = Vec::new();
    let mut next_before = None;
    let upper = q.before.unwrap_or(JobId::MAX);
    for rec in view
        .jobs
        .range(..upper)
        .rev()
        .map(|(_, r)| r)
        .filter(|j| filter.matches(j))
    {
        if jobs.len() == limit {
            next_before = jobs.last().map(|v: &JobView| v.record.id);
            break;
        }
        jobs.push(job_view(rec, &caller, &view, &st.jobs_dir));
    }
    Ok(Json(ListResponse {
        jobs,
        next_before,
        total,
    }))
}

/// Every job in `view` by state.
pub fn state_counts(view: &View) -> Vec<(JobState, usize)> {
    view.counts.clone()
}

/// A queue row. Reads `progress.json` of train jobs that have started (as `job_view` does).
pub fn job_summary(rec: &JobRecord, view: &View, jobs_dir: &Path) -> JobSummary {
    let placed = rec.state.holds_resources();
    let placement = rec.placement.as_ref().filter(|_| placed);
    let (vram_per_gpu, whole_gpu) = match placement {
        Some(p) if p.gpus.is_empty() => (None, false),
        Some(p) => (Some(p.vram_per_gpu), p.exclusive),
        None if rec.spec.resources.gpus == 0 => (None, false),
        None => match sched::plan::vram_need(rec) {
            sched::Need::Bytes(b) => (Some(b), false),
            sched::Need::Whole => (None, true),
        },
    };
    // Train workers write it; a command job may too (`$JOBD_JOB_DIR/progress.json`).
    let progress = (rec.attempts > 0)
        .then(|| sched::read_progress(&rec.dir(jobs_dir)))
        .flatten();
    JobSummary {
        id: rec.id,
        name: rec.name.clone(),
        owner: rec.owner.user.clone(),
        kind: rec.kind,
        state: rec.state,
        priority: rec.priority,
        gpus: rec.spec.resources.gpus,
        gpu_indices: placement
            .map(|p| p.gpus.iter().map(|g| g.index).collect())
            .unwrap_or_default(),
        vram_per_gpu,
        whole_gpu,
        progress,
        waiting: view.waiting.get(&rec.id).map(|w| w.wait.short()),
        reason: rec.reason.clone(),
        submitted_at: rec.submitted_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        attempts: rec.attempts,
        stopping: rec.stop.is_some() && placed,
        sweep: rec.sweep.as_ref().map(|s| s.id),
    }
}

/// The dashboard's queue page: compact rows, any sort order, offset pages, counts by state.
pub async fn queue(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<QueueQuery>, QueryRejection>,
) -> Result<Json<QueueResponse>, ApiError> {
    let Query(q) = query?;
    let filter = JobFilter::new(
        &caller,
        q.state.as_deref(),
        q.owner.as_deref(),
        q.mine,
        q.all,
    )?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let offset = q.offset.unwrap_or(0);
    let sort = q.sort.unwrap_or(QueueSort::Id);
    let order = q.order.unwrap_or_else(|| sort.default_order());
    let view = st.sched.view();
    // Newest first (descending id) is the map's reverse order: no sort needed.
    let mut matching: Vec<&JobRecord> = view
        .jobs
        .values()
        .rev()
        .map(|r| r.as_ref())
        .filter(|j| filter.matches(j))
        .collect();
    let total = matching.len();
    if sort != QueueSort::Id || order == SortOrder::Asc {
        let need = |j: &JobRecord| match sched::plan::vram_need(j) {
            _ if j.spec.resources.gpus == 0 => 0,
            sched::Need::Bytes(b) => b,
            sched::Need::Whole => u64::MAX,
        };
        let key = |a: &JobRecord, b: &JobRecord| match sort {
            QueueSort::Id => a.id.cmp(&b.id),
            QueueSort::Name => a.name.cmp(&b.name),
            QueueSort::State => a.state.cmp(&b.state),
            QueueSort::Owner => a.owner.user.cmp(&b.owner.user),
            QueueSort::Priority => a.priority.cmp(&b.priority),
            QueueSort::Kind => a.kind.as_str().cmp(b.kind.as_str()),
            QueueSort::Gpus => a.spec.resources.gpus.cmp(&b.spec.resources.gpus),
            QueueSort::Vram => need(a).cmp(&need(b)),
            // Older jobs were submitted earlier: "most age" first is ascending submit time.
            QueueSort::Age => b.submitted_at.cmp(&a.submitted_at),
        };
        // Stable sort over newest-first input: ties stay newest first.
        matching.sort_by(|a, b| match order {
            SortOrder::Asc => key(a, b),
            SortOrder::Desc => key(b, a),
        });
    }
    let jobs = matching
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|r| job_summary(r, &view, &st.jobs_dir))
        .collect();
    Ok(Json(QueueResponse {
        jobs,
        total,
        offset,
        counts: state_counts(&view),
    }))
}

pub async fn get_job(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobView>, ApiError> {
    let view = st.sched.view();
    let rec = view
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    Ok(Json(job_view(rec, &caller, &view, &st.jobs_dir)))
}

pub async fn cancel(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobView>, ApiError> {
    require_user(&caller)?;
    let rec = st.sched.cancel(&caller, id).await?;
    Ok(Json(job_view(
        &rec,
        &caller,
        &st.sched.view(),
        &st.jobs_dir,
    )))
}

/// `POST /jobs/clean`: removes finished jobs for good (record, history, job directory).
pub async fn clean(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<crate::spec::api::CleanRequest>, JsonRejection>,
) -> Result<Json<crate::spec::api::CleanResponse>, ApiError> {
    require_user(&caller)?;
    let Json(req) = body?;
    Ok(Json(st.sched.clean(&caller, req).await?))
}

/// `POST /jobs/{id}/hold`: a queued job keeps its place but does not start.
pub async fn hold(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobView>, ApiError> {
    hold_or_release(st, caller, id, true).await
}

/// `POST /jobs/{id}/release`: a held job may start again.
pub async fn release(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobView>, ApiError> {
    hold_or_release(st, caller, id, false).await
}

async fn hold_or_release(
    st: AppState,
    caller: Caller,
    id: JobId,
    hold: bool,
) -> Result<Json<JobView>, ApiError> {
    require_user(&caller)?;
    let rec = st.sched.hold(&caller, id, hold).await?;
    Ok(Json(job_view(
        &rec,
        &caller,
        &st.sched.view(),
        &st.jobs_dir,
    )))
}

pub async fn requeue(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobView>, ApiError> {
    require_user(&caller)?;
    let rec = st.sched.requeue(&caller, id).await?;
    Ok(Json(job_view(
        &rec,
        &caller,
        &st.sched.view(),
        &st.jobs_dir,
    )))
}

pub async fn set_priority(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
    body: Result<Json<PriorityRequest>, JsonRejection>,
) -> Result<Json<JobView>, ApiError> {
    require_user(&caller)?;
    let Json(req) = body?;
    // Out of i32 is out of range too: the scheduler's check gives the message.
    let priority =
        i32::try_from(req.priority).unwrap_or(if req.priority < 0 { i32::MIN } else { i32::MAX });
    let rec = st.sched.set_priority(&caller, id, priority).await?;
    Ok(Json(job_view(
        &rec,
        &caller,
        &st.sched.view(),
        &st.jobs_dir,
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Stream new events as server-sent events until the job finishes.
    #[serde(default)]
    follow: bool,
}

pub async fn events(
    State(st): State<AppState>,
    JobIdPath(id): JobIdPath,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    // Subscribe before reading the history so nothing falls between the two.
    let mut changes = st.sched.subscribe();
    let history = st.sched.events(id).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => ApiError::not_found(format!("job {id} not found")),
        e => ApiError::from(sched::SchedError::from(e)),
    })?;
    if !q.follow {
        return Ok(Json(EventsResponse { events: history }).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let sched = st.sched.clone();
    tokio::spawn(async move {
        let mut next_seq = 0;
        for e in history {
            next_seq = e.seq + 1;
            if tx.send(Ok(sse_event(&e))).await.is_err() {
                return;
            }
        }
        let finished = |sched: &sched::SchedHandle| {
            sched
                .view()
                .jobs
                .get(&id)
                .is_none_or(|j| j.state.is_terminal())
        };
        if finished(&sched) {
            return;
        }
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(c) if c.job.record.id == id => {
                        if let Some(e) = c.event.filter(|e| e.seq >= next_seq) {
                            next_seq = e.seq + 1;
                            if tx.send(Ok(sse_event(&e))).await.is_err() { return; }
                        }
                        if c.job.record.state.is_terminal() { return; }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed changes: resend from the store.
                        if let Ok(all) = sched.events(id) {
                            let from = next_seq;
                            for e in all.into_iter().filter(|e| e.seq >= from) {
                                next_seq = e.seq + 1;
                                if tx.send(Ok(sse_event(&e))).await.is_err() { return; }
                            }
                        }
                        if finished(&sched) { return; }
                    }
                    Err(_) => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(ReceiverStream::new(rx));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn sse_event(e: &crate::spec::JobEvent) -> Event {
    Event::default()
        .event("job-event")
        .data(serde_json::to_string(e).unwrap_or_default())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// "stdout" (default), "stderr", or "notify" (what the job's `[notify]` command printed).
    #[serde(default)]
    stream: Option<String>,
    /// Keep streaming until the job finishes.
    #[serde(default)]
    follow: bool,
    /// Start at this byte offset.
    #[serde(default)]
    offset: Option<u64>,
    /// Start this many bytes before the end.
    #[serde(default)]
    tail: Option<u64>,
}

pub async fn logs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let view = st.sched.view();
    let rec = view
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    if !st.auth.may_read_logs(&caller, &rec.owner.user) {
        return Err(ApiError::forbidden(format!(
            "the logs of job {id} are visible to its owner ({}) and admins only",
            rec.owner.user
        )));
    }
    let name = match q.stream.as_deref().unwrap_or("stdout") {
        "stdout" => files::STDOUT,
        "stderr" => files::STDERR,
        "notify" => files::NOTIFY_LOG,
        other => {
            return Err(ApiError::bad_request(format!(
                "stream must be stdout, stderr or notify, not {other:?}"
            )));
        }
    };
    if name == files::NOTIFY_LOG && rec.spec.notify.is_none() {
        return Err(ApiError::not_found(format!(
            "job {id} has no [notify] section: no command is run when it ends, so there is no \
             notify output"
        )));
    }
    // A notifier runs after the job, if at all: no log yet is no loss.
    let ran = rec.attempts > 0 && name != files::NOTIFY_LOG;
    let dir: PathBuf = rec.dir(&st.jobs_dir);
    let file = dir.join(name);
    let len = match crate::jobfs::open_regular(&file).and_then(|f| f.metadata()) {
        Ok(m) => m.len(),
        // A job that never started has none yet; one that ran had its job directory (or
        // this file) removed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && ran && !q.follow => {
            let what = if dir.exists() {
                format!("{} is gone", file.display())
            } else {
                format!("its job directory {} is gone", dir.display())
            };
            return Err(ApiError::not_found(format!(
                "job {id} ran, but {what}: its output cannot be shown"
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "unreadable",
                e.to_string(),
            ));
        }
    };
    let offset = match (q.offset, q.tail) {
        (Some(o), _) => o,
        (None, Some(t)) => len.saturating_sub(t),
        (None, None) => 0,
    };
    let rx = super::follow::stream_file(
        st.sched.clone(),
        st.watcher.clone(),
        id,
        dir,
        file,
        offset,
        match (q.follow, name == files::NOTIFY_LOG) {
            (false, _) => super::follow::Follow::No,
            (true, false) => super::follow::Follow::UntilJobEnds,
            (true, true) => super::follow::Follow::UntilNotified,
        },
    );
    let body = Body::from_stream(ReceiverStream::new(rx));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            // Where this body starts in the file (useful after `tail`): a client that loses
            // the connection resumes at this offset plus what it received.
            (
                header::HeaderName::from_static(crate::spec::api::LOG_OFFSET_HEADER),
                offset.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

pub async fn explain(
    State(st): State<AppState>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<sched::Explanation>, ApiError> {
    let view = st.sched.view();
    sched::explain(&view, id, crate::spec::now_ms())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

pub async fn gpus(State(st): State<AppState>) -> Json<GpusResponse> {
    Json(gpus_response(&st.sched.view(), st.sched.policy()))
}

/// The GPUs with what jobd reserved on each (for `/gpus` and the dashboard's stream).
pub fn gpus_response(view: &View, policy: &crate::config::SchedulerConfig) -> GpusResponse {
    let Some(snap) = &view.gpus else {
        return GpusResponse {
            source: "none".into(),
            driver_version: None,
            note: None,
            gpus: Vec::new(),
        };
    };
    let gpus = snap
        .gpus
        .iter()
        .map(|g| {
            let jobs: Vec<GpuJob> = view
                .jobs_on_gpu(&g.uuid)
                .map(|j| GpuJob {
                    id: j.id,
                    name: j.name.clone(),
                    owner: j.owner.user.clone(),
                    // A card held whole is the job's, all that other processes leave of it
                    // (`vram_per_gpu` is the smallest card's when they differ).
                    reserved_bytes: j.placement.as_ref().map_or(0, |p| {
                        if p.exclusive {
                            g.total_bytes
                                .saturating_sub(g.foreign_bytes)
                                .max(p.vram_per_gpu)
                        } else {
                            p.vram_per_gpu
                        }
                    }),
                })
                .collect();
            GpuView {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                total_bytes: g.total_bytes,
                free_bytes: g.free_bytes,
                foreign_bytes: g.foreign_bytes,
                reserved_bytes: jobs.iter().map(|j| j.reserved_bytes).sum(),
                jobs,
                compute_capability: g.compute_capability.clone(),
                utilization_percent: g.utilization_percent,
                excluded: !policy.allowed_gpus.is_empty()
                    && !policy.allowed_gpus.iter().any(|s| match s {
                        crate::spec::job::GpuSelector::Index(i) => *i == g.index,
                        crate::spec::job::GpuSelector::Uuid(u) => u.eq_ignore_ascii_case(&g.uuid),
                    }),
            }
        })
        .collect();
    GpusResponse {
        source: snap.source.to_string(),
        driver_version: snap.driver_version.clone(),
        note: snap.note.clone(),
        gpus,
    }
}

pub async fn publish(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
    body: Result<Json<sched::PublishOverrides>, JsonRejection>,
) -> Result<Json<JobView>, ApiError> {
    require_user(&caller)?;
    let Json(o) = body?;
    let rec = st.sched.publish(&caller, id, o).await?;
    Ok(Json(job_view(
        &rec,
        &caller,
        &st.sched.view(),
        &st.jobs_dir,
    )))
}

/// The daemon's default Ollama store, as `ollama list` shows it.
pub async fn models(
    State(st): State<AppState>,
) -> Result<Json<crate::spec::api::ModelsResponse>, ApiError> {
    let Some(dir) = st.ollama_models.as_ref().clone() else {
        return Ok(Json(crate::spec::api::ModelsResponse {
            models_dir: None,
            models: Vec::new(),
        }));
    };
    let d = dir.clone();
    let entries = tokio::task::spawn_blocking(move || crate::publish::list_models(&d))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                e.to_string(),
            )
        })?;
    let models = entries.into_iter().map(Into::into).collect();
    Ok(Json(crate::spec::api::ModelsResponse {
        models_dir: Some(dir),
        models,
    }))
}

/// The metrics a train worker logged (one object per logged step), oldest first.
pub async fn metrics(
    State(st): State<AppState>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let view = st.sched.view();
    let rec = view
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    let path = rec.dir(&st.jobs_dir).join(files::METRICS);
    // The newest records of a file its owner may have made any size, off the async threads.
    let read = tokio::task::spawn_blocking(move || super::metrics::read_all(&path))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    match read {
        Ok(records) => Ok(Json(records)),
        // `jobfs` refused what the job put in place of the file (a link, a FIFO).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(ApiError::new(
            StatusCode::CONFLICT,
            "unreadable",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io",
            e.to_string(),
        )),
    }
}
