//! One error type for every handler: status + `{"error":{"code","message"}}`. Malformed JSON,
//! oversized bodies and bad paths get the same shape; 5xx answers hide internals (they are
//! logged instead).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::sched::SchedError;
use crate::spec::api::{ErrorBody, ErrorDetail};
use crate::spec::toml_source::{Problem, SourceError};

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub problems: Vec<Problem>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, error = %self.message, "request failed");
        }
        let message = if self.status.is_server_error() {
            "internal error; see the daemon's log".to_string()
        } else {
            self.message
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message,
                problems: self.problems,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"jobd\""),
            );
        }
        response
    }
}

impl From<SchedError> for ApiError {
    fn from(e: SchedError) -> Self {
        let (status, code) = match &e {
            SchedError::NotFound(_) | SchedError::ScheduleNotFound(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            SchedError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            SchedError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_job"),
            SchedError::Infeasible(_) => (StatusCode::UNPROCESSABLE_ENTITY, "never_fits"),
            SchedError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            // Not 422 `never_fits`: the same request succeeds once some of the user's jobs end.
            SchedError::TooManyJobs(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs"),
            SchedError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            SchedError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<SourceError> for ApiError {
    fn from(e: SourceError) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_job",
            message: e.to_string(),
            problems: e.problems,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        // The body's deadline (`api::ServeLimits`) passed while it was being read.
        if r.body_text().contains("did not arrive within") {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", r.body_text());
        }
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_json",
        };
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        // axum says "Failed to deserialize the JSON body into the target type: priority: …";
        // the field and the reason are what the caller needs.
        let text = r.body_text();
        let reason = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the {} KiB jobd takes",
                super::MAX_BODY_BYTES >> 10
            )
        } else {
            text.strip_prefix("Failed to deserialize the JSON body into the target type: ")
                .map(|r| format!("invalid request body: {r}"))
                .unwrap_or(text)
        };
        ApiError::new(status, code, reason)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_query", r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitSource, SubmitLimit};
    use crate::sched::LimitReached;

    /// A user at `max_submitted` gets 429 with its own code (a client can tell it from a job
    /// that never fits, 422, and retry later), and the whole message.
    #[test]
    fn the_submit_limit_is_429_too_many_jobs() {
        let e = ApiError::from(SchedError::TooManyJobs(LimitReached {
            user: "alice".into(),
            unfinished: 3,
            adding: 1,
            limit: SubmitLimit {
                max: 3,
                source: LimitSource::Default,
            },
        }));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::TOO_MANY_REQUESTS, "too_many_jobs")
        );
        assert_eq!(
            e.message,
            "alice has 3 unfinished jobs; [scheduler.limits.default] max_submitted allows 3: \
             wait for some to finish or cancel some"
        );
    }
}
