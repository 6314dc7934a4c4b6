//! Handlers of `/api/v1/sweeps...`: one job file, a job for every combination of the values
//! given for some of its keys (`jobctl submit --sweep`), and the jobs compared side by side.

use std::path::Path;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::jobs::{JobIdPath, job_view, submission_with_rights_of};
use super::{ApiError, AppState, submitter};
use crate::sched::Submission;
use crate::spec::api::{SubmitRequest, SweepJobView, SweepRequest, SweepView};
use crate::spec::contract::files;
use crate::spec::sweep::{self, SweepValue};
use crate::spec::{Caller, JobKind, JobRecord};

/// Queues a sweep: the file with each combination of the swept values (and its own name and
/// Ollama tag, `spec::sweep::member_overrides`), every job checked as a submitted one would
/// be, with the caller's file rights; then all of them at once, or none.
pub async fn submit(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SweepRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let owner = submitter(&st, &caller)?;
    let Json(req) = body?;
    let SweepRequest { job: req, sweep } = req;
    let origin = req
        .source_path
        .as_deref()
        .and_then(Path::file_name)
        .map_or_else(
            || "job.toml".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    let stem = req
        .source_path
        .as_deref()
        .and_then(Path::file_stem)
        .map_or_else(|| "job".into(), |n| n.to_string_lossy().into_owned());
    let made = sweep::members(&req.toml, &origin, &stem, &sweep, &[])
        .map_err(|e| ApiError::bad_request(e.0))?;
    let mut members: Vec<(Submission, Vec<SweepValue>)> = Vec::with_capacity(made.len());
    for member in made {
        let request = SubmitRequest {
            toml: member.text,
            base_dir: req.base_dir.clone(),
            source_path: req.source_path.clone(),
            hold: req.hold,
        };
        let sub =
            submission_with_rights_of(caller.user.clone(), request, Some((member.origin, true)))
                .await?;
        if sub.spec.schedule.is_some() {
            return Err(ApiError::bad_request(sweep::NO_SCHEDULE));
        }
        members.push((sub, member.values));
    }
    let recs = st.sched.submit_sweep(&caller, owner, members).await?;
    let view = st.sched.view();
    let jobs = recs
        .iter()
        .filter_map(|r| SweepJobView::of(job_view(r, &caller, &view, &st.jobs_dir), None))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(SweepView {
            id: recs[0].id,
            keys: keys_of(&recs[0]),
            jobs,
        }),
    ))
}

/// A sweep's jobs side by side, with what each train job reached; any of its jobs' ids finds
/// it.
pub async fn get_one(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobIdPath(id): JobIdPath,
) -> Result<Json<SweepView>, ApiError> {
    let view = st.sched.view();
    let sweep_id = match view.jobs.get(&id) {
        Some(rec) => rec.sweep.as_ref().map(|s| s.id).ok_or_else(|| {
            ApiError::not_found(format!(
                "job {id} is not part of a sweep (jobctl submit --sweep makes one)"
            ))
        })?,
        // Its first job (whose id is the sweep's) may have been cleaned away.
        None if view
            .jobs
            .values()
            .any(|r| r.sweep.as_ref().is_some_and(|s| s.id == id)) =>
        {
            id
        }
        None => {
            return Err(ApiError::not_found(format!("sweep {id} not found")));
        }
    };
    let mut members: Vec<&JobRecord> = view
        .jobs
        .values()
        .filter(|r| r.sweep.as_ref().is_some_and(|s| s.id == sweep_id))
        .map(|r| &**r)
        .collect();
    members.sort_by_key(|r| (r.sweep.as_ref().map(|s| s.index), r.id));
    let jobs = members
        .iter()
        .map(|r| job_view(r, &caller, &view, &st.jobs_dir))
        .collect::<Vec<_>>();
    let keys = keys_of(members[0]);
    // Only train jobs log metrics; each file is read from where the last request stopped
    // (a page refreshes while they run), all in one task off the async threads.
    let paths: Vec<(crate::spec::JobId, Option<std::path::PathBuf>)> = members
        .iter()
        .map(|r| {
            let path = (r.kind == JobKind::Train && r.attempts > 0)
                .then(|| r.dir(&st.jobs_dir).join(files::METRICS));
            (r.id, path)
        })
        .collect();
    let known = st.train_results.clone();
    let alive: std::collections::HashSet<crate::spec::JobId> = view.jobs.keys().copied().collect();
    let results = tokio::task::spawn_blocking(move || {
        known.retain(|id| alive.contains(&id));
        known.of(&paths)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    Ok(Json(SweepView {
        id: sweep_id,
        keys,
        jobs: jobs
            .into_iter()
            .zip(results)
            .filter_map(|(job, result)| SweepJobView::of(job, result))
            .collect(),
    }))
}

fn keys_of(rec: &JobRecord) -> Vec<String> {
    rec.sweep
        .as_ref()
        .map(|s| s.values.iter().map(|v| v.key.clone()).collect())
        .unwrap_or_default()
}
