//! tonic integration (feature `tonic`): [`Error`] as a [`tonic::Status`].
//!
//! | error | code |
//! |---|---|
//! | [`Error::Timeout`] | `DEADLINE_EXCEEDED` |
//! | other [transient](Error::is_transient) errors (lost tunnel, PostgreSQL restarting), [`Error::ShutDown`] | `UNAVAILABLE` (clients may retry) |
//! | [`Error::Config`], [`Error::NotInitialized`] | `FAILED_PRECONDITION` |
//! | anything else | `INTERNAL` |
//!
//! The status message is generic; the error's details go to the log, in the request's span.
//!
//! ```
//! use sea_orm::ConnectionTrait;
//! use sea_orm_tunnel::ConnectionManager;
//!
//! async fn handler(request: tonic::Request<()>) -> Result<tonic::Response<()>, tonic::Status> {
//!     let manager = request
//!         .extensions()
//!         .get::<ConnectionManager>()
//!         .ok_or_else(|| tonic::Status::internal("InjectDatabaseLayer is missing"))?;
//!     manager
//!         .connection()
//!         .execute_unprepared("SELECT 1")
//!         .await
//!         .map_err(sea_orm_tunnel::Error::from)?;
//!     Ok(tonic::Response::new(()))
//! }
//! ```

use tonic::{Code, Status};

use super::TARGET_LAYER;
use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let (code, message) = match &error {
            Error::Timeout { .. } => (Code::DeadlineExceeded, "database operation timed out"),
            Error::ShutDown(_) => (Code::Unavailable, "service is shutting down"),
            e if e.is_transient() => (Code::Unavailable, "database temporarily unavailable, retry later"),
            Error::Config { .. } | Error::NotInitialized(_) => (Code::FailedPrecondition, "database is not configured"),
            _ => (Code::Internal, "database error"),
        };
        if code == Code::Internal || code == Code::FailedPrecondition {
            tracing::error!(target: TARGET_LAYER, error = %error, grpc_code = ?code, "request failed: database error");
        } else {
            tracing::warn!(target: TARGET_LAYER, error = %error, grpc_code = ?code, "request failed: database unavailable");
        }
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::TimeoutKind;

    #[test]
    fn errors_map_to_grpc_codes_without_details() {
        let timeout = Error::Timeout {
            kind: TimeoutKind::Acquire,
            after: Duration::from_secs(3),
            detail: " (pool max 4)".into(),
        };
        assert_eq!(Status::from(timeout).code(), Code::DeadlineExceeded);
        let lost = Error::TunnelLost {
            host: "bastion.internal".into(),
            reason: "keepalive".into(),
        };
        let status = Status::from(lost);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("bastion.internal"), "{status:?}");
        assert_eq!(
            Status::from(Error::ShutDown("ConnectionManager")).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(Error::config("SSH_PORT", "bad")).code(),
            Code::FailedPrecondition
        );
        let auth = Error::Auth {
            user: "deploy".into(),
            host: "h".into(),
            tried: "publickey".into(),
        };
        assert_eq!(Status::from(auth).code(), Code::Internal);
        let sql = Error::Database(sea_orm::DbErr::Custom("syntax error".into()));
        assert_eq!(Status::from(sql).code(), Code::Internal);
    }
}
