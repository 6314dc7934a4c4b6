//! Handlers of `/api/v1/schedules...`: recurring jobs.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::jobs::{redact, submission_as};
use super::{ApiError, AppState, require_user, submitter};
use crate::sched::{ScheduleAction, View};
use crate::spec::Caller;
use crate::spec::api::{ScheduleView, SchedulesResponse, SubmitRequest};
use crate::spec::schedule::ScheduleRecord;

fn view_of(rec: &ScheduleRecord, caller: &Caller, view: &View) -> ScheduleView {
    let mut record = rec.clone();
    redact(
        caller,
        &rec.owner.user,
        &mut record.spec,
        &mut record.source,
    );
    ScheduleView {
        last_state: rec
            .last_job
            .and_then(|j| view.jobs.get(&j))
            .map(|j| j.state),
        record,
    }
}

fn schedule_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad_request(format!("{raw:?} is not a schedule id")))
}

pub async fn create(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SubmitRequest>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let owner = submitter(&st, &caller)?;
    let Json(req) = body?;
    let sub = submission_as(&caller, req).await?;
    if sub.spec.schedule.is_none() {
        return Err(ApiError::bad_request(
            "this job file has no schedule = \"...\": submit it as a job (POST /api/v1/jobs)",
        ));
    }
    let rec = st.sched.create_schedule(&caller, owner, sub).await?;
    Ok((
        StatusCode::CREATED,
        Json(view_of(&rec, &caller, &st.sched.view())),
    ))
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<SchedulesResponse> {
    let view = st.sched.view();
    Json(SchedulesResponse {
        schedules: view
            .schedules
            .values()
            .map(|s| view_of(s, &caller, &view))
            .collect(),
    })
}

pub async fn get_one(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(raw): UrlPath<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    let id = schedule_id(&raw)?;
    let view = st.sched.view();
    let rec = view
        .schedules
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("schedule {id} not found")))?;
    Ok(Json(view_of(rec, &caller, &view)))
}

pub async fn action(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath((raw, action)): UrlPath<(String, String)>,
) -> Result<Json<ScheduleView>, ApiError> {
    require_user(&caller)?;
    let id = schedule_id(&raw)?;
    let action = match action.as_str() {
        "pause" => ScheduleAction::Pause,
        "resume" => ScheduleAction::Resume,
        "run-now" => ScheduleAction::RunNow,
        "delete" => ScheduleAction::Delete,
        other => {
            return Err(ApiError::not_found(format!(
                "no schedule action {other:?} (pause, resume, run-now, delete)"
            )));
        }
    };
    let rec = st.sched.schedule_action(&caller, id, action).await?;
    Ok(Json(view_of(&rec, &caller, &st.sched.view())))
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    UrlPath(raw): UrlPath<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    require_user(&caller)?;
    let id = schedule_id(&raw)?;
    let rec = st
        .sched
        .schedule_action(&caller, id, ScheduleAction::Delete)
        .await?;
    Ok(Json(view_of(&rec, &caller, &st.sched.view())))
}
