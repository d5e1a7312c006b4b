//! Errors of the E2B HTTP surface, in E2B's error shape
//! (`{"code": <http status>, "message": "..."}`), and how daemon errors map
//! onto HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use forkd_ipc::{ClientError, ErrorCode};

/// An HTTP error answer. The message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404 for a sandbox this caller cannot see (absent, ended, or another
    /// tenant's: the answers are the same so ids do not leak).
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} not found: it was killed, timed out, or never existed"),
        )
    }

    /// 501 for an E2B feature forkd does not provide.
    pub fn unsupported(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not supported by the forkd gateway (see docs/e2b.md)"),
        )
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Server(reply) => {
                let status = match reply.code {
                    ErrorCode::InvalidRequest
                    | ErrorCode::MalformedFrame
                    | ErrorCode::FrameTooLarge
                    | ErrorCode::UnknownPolicy => StatusCode::BAD_REQUEST,
                    ErrorCode::LimitExceedsPolicy => StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::UnknownZygote => StatusCode::BAD_REQUEST,
                    ErrorCode::UnknownSession | ErrorCode::SessionEnded | ErrorCode::NotFound => {
                        StatusCode::NOT_FOUND
                    }
                    ErrorCode::SessionPaused => StatusCode::CONFLICT,
                    ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
                    ErrorCode::FileError => StatusCode::BAD_REQUEST,
                    ErrorCode::ZygoteUnavailable | ErrorCode::ShuttingDown => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    ErrorCode::Cancelled => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, format!("forkd: {}", reply.message))
            }
            ClientError::Timeout { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())
            }
            _ => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = crate::openapi::ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}
