//! The API's one error type and the mapping of every rejection to
//! `{"error": {"code", "message"}}` with a fitting status.

use std::convert::Infallible;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: a malformed request (query, header, body that is not JSON).
    BadRequest {
        code: &'static str,
        message: String,
    },
    /// 401: `API_TOKEN` is set and the request lacks it.
    Unauthorized,
    /// 403: a browser request from another site (a foreign `Origin`).
    Forbidden(String),
    NotFound(String),
    MethodNotAllowed,
    /// 409: the request conflicts with the resource's state.
    Conflict(String),
    /// 409: an idempotency key was reused for a different message.
    IdempotencyConflict(String),
    PayloadTooLarge,
    /// 415: a body that is not `application/json`.
    UnsupportedMediaType,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 422: well-formed JSON with a bad value; names the field and, in a list, the index.
    Validation {
        message: String,
        field: Option<String>,
        index: Option<usize>,
    },
    /// 503: a dependency is down; the client may retry.
    Unavailable(String),
    /// 503 with `Retry-After`: the replica is still preparing the database schema.
    NotReady,
    Internal(String),
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            code: "bad_request",
            message: message.into(),
        }
    }

    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            message: message.into(),
            field: Some(field.into()),
            index: None,
        }
    }

    /// The same error, located at `index` of a list.
    pub fn at_index(self, index: usize) -> Self {
        match self {
            Self::Validation { message, field, .. } => Self::Validation {
                message: format!("[{index}] {message}"),
                field,
                index: Some(index),
            },
            other => other,
        }
    }

    pub fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::BadRequest { code, message } => (StatusCode::BAD_REQUEST, code, message),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API token (send Authorization: Bearer <API_TOKEN>)".into(),
            ),
            Self::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not accept that method".into(),
            ),
            Self::Forbidden(message) => (StatusCode::FORBIDDEN, "forbidden", message),
            Self::Conflict(message) => (StatusCode::CONFLICT, "conflict", message),
            Self::IdempotencyConflict(message) => {
                (StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than 1 MiB".into(),
            ),
            Self::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time".into(),
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ),
            Self::NotReady => {
                let body = json!({"error": {
                    "code": "not_ready",
                    "message": "the database schema is being prepared (migrations); try again shortly",
                }});
                let mut response = warp::reply::with_status(
                    warp::reply::json(&body),
                    StatusCode::SERVICE_UNAVAILABLE,
                )
                .into_response();
                response.headers_mut().insert(
                    warp::http::header::RETRY_AFTER,
                    warp::http::HeaderValue::from_static("2"),
                );
                return response;
            }
            Self::Validation {
                message,
                field,
                index,
            } => {
                let body = json!({"error": {
                    "code": "validation_failed",
                    "message": message,
                    "field": field,
                    "index": index,
                }});
                return warp::reply::with_status(
                    warp::reply::json(&body),
                    StatusCode::UNPROCESSABLE_ENTITY,
                )
                .into_response();
            }
            Self::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
            Self::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the replica's log".into(),
                )
            }
        };
        let body = json!({"error": {"code": code, "message": message}});
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        if err.is_unavailable() {
            Self::Unavailable("database unavailable; try again shortly".into())
        } else if err.is_bad_data() {
            // Validation should have caught it; the database is the last line.
            tracing::warn!(error = %err, "the database refused request data");
            Self::Validation {
                message: format!("the database refused the data: {err}"),
                field: None,
                index: None,
            }
        } else {
            Self::Internal(err.to_string())
        }
    }
}

/// Turns whatever rejected a request into the JSON error shape.
pub async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let error = if let Some(err) = rejection.find::<ApiError>() {
        // Rebuild rather than clone: the rejection owns the original.
        match err {
            ApiError::Unauthorized => ApiError::Unauthorized,
            ApiError::Forbidden(message) => ApiError::Forbidden(message.clone()),
            ApiError::PayloadTooLarge => ApiError::PayloadTooLarge,
            ApiError::UnsupportedMediaType => ApiError::UnsupportedMediaType,
            ApiError::RequestTimeout => ApiError::RequestTimeout,
            ApiError::NotReady => ApiError::NotReady,
            ApiError::Unavailable(message) => ApiError::Unavailable(message.clone()),
            ApiError::Validation {
                message,
                field,
                index,
            } => ApiError::Validation {
                message: message.clone(),
                field: field.clone(),
                index: *index,
            },
            ApiError::BadRequest { code, message } => ApiError::BadRequest {
                code,
                message: message.clone(),
            },
            other => ApiError::Internal(format!("unexpected rejection {other:?}")),
        }
    } else if rejection.is_not_found() {
        ApiError::NotFound("no such route".into())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::PayloadTooLarge
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::bad_request("invalid query string")
    } else if let Some(err) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(format!("invalid header {}", err.name()))
    } else if let Some(err) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request(format!("missing header {}", err.name()))
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        ApiError::UnsupportedMediaType
    } else {
        ApiError::Internal(format!("unhandled rejection: {rejection:?}"))
    };
    Ok(error.into_response())
}
