//! The API error type: one small enum, mapped to a gRPC status in exactly one place.

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::{domain::FieldError, storage::StoreError};

/// Everything an RPC can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input; each violation names its field.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldError>),
    /// The object does not exist for this tenant (other tenants' objects look the same).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A duplicate name or an idempotency-key conflict.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No tenant or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Storage is unreachable: nothing was accepted.
    #[error("storage unavailable")]
    Unavailable,
    /// A bug or an unexpected failure; details go to the log, never to the caller.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn describe(violations: &[FieldError]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldError::new(field, description)])
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(violations: Vec<FieldError>) -> Self {
        Self::InvalidArgument(violations)
    }
}

impl From<FieldError> for ApiError {
    fn from(violation: FieldError) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Conflict(what) => Self::AlreadyExists(what),
            StoreError::WrongState(what) => Self::FailedPrecondition(what),
            StoreError::Unavailable(_) => Self::Unavailable,
            StoreError::Other(e) => Self::Internal(e),
        }
    }
}

impl From<crate::routing::RoutingError> for ApiError {
    fn from(err: crate::routing::RoutingError) -> Self {
        use crate::routing::RoutingError;
        match err {
            RoutingError::NotFound(what) => Self::NotFound(what),
            RoutingError::Inactive(_) => Self::FailedPrecondition(err.to_string()),
            RoutingError::Store(e) => e.into(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument(violations) => {
                let message = format!("invalid argument: {}", describe(&violations));
                let mut details = ErrorDetails::new();
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                tonic::Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::NotFound(what) => tonic::Status::not_found(format!("{what} not found")),
            ApiError::AlreadyExists(msg) => tonic::Status::already_exists(msg),
            ApiError::FailedPrecondition(msg) => tonic::Status::failed_precondition(msg),
            ApiError::Unauthenticated(msg) => tonic::Status::unauthenticated(msg),
            ApiError::Unavailable => tonic::Status::unavailable(
                "storage is unavailable; nothing was accepted, retry later",
            ),
            ApiError::Internal(source) => {
                let correlation_id = uuid::Uuid::new_v4();
                tracing::error!(%correlation_id, error = format!("{source:#}"), "internal error");
                tonic::Status::internal(format!("internal error (correlation id {correlation_id})"))
            }
        }
    }
}
