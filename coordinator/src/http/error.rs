//! Errors of the HTTP API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
//! with the status OpenAI's clients act on (they retry 429 and 5xx, not 4xx).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing or invalid parameter (400).
    #[error("{message}")]
    BadRequest { message: String, param: Option<&'static str> },
    /// A `model` this server does not serve (404).
    #[error("the model `{0}` does not exist (GET /v1/models lists the served one)")]
    UnknownModel(String),
    /// Not the leader, or the cluster does not serve right now (503).
    #[error("{0}")]
    NotReady(String),
    /// `--max-queued-requests` reached (429).
    #[error("{0}")]
    QueueFull(String),
    /// The request's deadline passed (504).
    #[error("{0}")]
    Timeout(String),
    /// Anything else that went wrong on the way (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest { message: message.into(), param }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code, param) = match self {
            ApiError::BadRequest { param, .. } => ("invalid_request_error", None, *param),
            ApiError::UnknownModel(_) => ("invalid_request_error", Some("model_not_found"), Some("model")),
            ApiError::NotReady(_) => ("server_error", Some("service_unavailable"), None),
            ApiError::QueueFull(_) => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            ApiError::Timeout(_) => ("server_error", Some("timeout"), None),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        serde_json::json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

/// By the gRPC status code of the shared request path (never by its text).
impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::FailedPrecondition => ApiError::BadRequest { message: m, param: None },
            tonic::Code::ResourceExhausted => ApiError::QueueFull(m),
            tonic::Code::Unavailable => ApiError::NotReady(m),
            tonic::Code::DeadlineExceeded => ApiError::Timeout(m),
            _ => ApiError::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), [(axum::http::header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response();
        if matches!(self, ApiError::QueueFull(_) | ApiError::NotReady(_)) {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}
