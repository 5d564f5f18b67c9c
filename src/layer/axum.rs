//! axum integration (feature `axum`): the [`Db`] extractor, extractors for the
//! [`ConnectionManager`] and the [`CorrelationId`], and [`Error`] as a response.
//!
//! ```
//! use axum::{Router, routing::get};
//! use sea_orm::ConnectionTrait;
//! use sea_orm_tunnel::layer::{CorrelationId, Db};
//!
//! async fn handler(Db(db): Db, id: CorrelationId) -> Result<String, sea_orm_tunnel::Error> {
//!     db.execute_unprepared("SELECT 1").await?;
//!     Ok(format!("ok ({id})"))
//! }
//!
//! let app: Router = Router::new().route("/", get(handler));
//! // ... .layer(InjectDatabaseLayer::new(manager))
//! ```
//!
//! # Errors as responses
//!
//! [`Error`] implements [`IntoResponse`]. The body never carries the error's details (they go
//! to the log, in the request's span):
//!
//! | error | status | extras |
//! |---|---|---|
//! | [`is_transient`](Error::is_transient) (lost tunnel, timeouts, pool exhausted, PostgreSQL restarting) | `503` | `Retry-After: 1`, [`TransientDbFailure`] extension |
//! | [`Error::ShutDown`] | `503` | `Retry-After: 1` |
//! | anything else (configuration, authentication, SQL errors) | `500` | |

use std::fmt;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use sea_orm::DatabaseConnection;

use super::{CorrelationId, TARGET_LAYER, TransientDbFailure};
use crate::error::Error;
use crate::manager::ConnectionManager;

/// Extractor: the managed [`DatabaseConnection`] put into the request by
/// [`InjectDatabaseLayer`](super::InjectDatabaseLayer).
///
/// Without that layer the request is answered with [`MissingInjectLayer`] (a 500 saying what to
/// add).
#[derive(Debug, Clone)]
pub struct Db(pub DatabaseConnection);

impl std::ops::Deref for Db {
    type Target = DatabaseConnection;

    fn deref(&self) -> &DatabaseConnection {
        &self.0
    }
}

/// Rejection of [`Db`], [`CorrelationId`] and [`ConnectionManager`] extractors when
/// [`InjectDatabaseLayer`](super::InjectDatabaseLayer) is not in the stack: a `500 Internal
/// Server Error` whose body names the missing layer.
#[derive(Debug, Clone, Copy)]
pub struct MissingInjectLayer {
    wanted: &'static str,
}

impl MissingInjectLayer {
    fn new(wanted: &'static str) -> Self {
        MissingInjectLayer { wanted }
    }
}

impl fmt::Display for MissingInjectLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "InjectDatabaseLayer is missing: add .layer(InjectDatabaseLayer::new(manager)) to the router \
             (the handler extracts {})",
            self.wanted
        )
    }
}

impl std::error::Error for MissingInjectLayer {}

impl IntoResponse for MissingInjectLayer {
    fn into_response(self) -> Response {
        tracing::error!(target: TARGET_LAYER, "{self}");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Db {
    type Rejection = MissingInjectLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<DatabaseConnection>()
            .cloned()
            .map(Db)
            .ok_or(MissingInjectLayer::new("Db"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = MissingInjectLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<CorrelationId>()
            .cloned()
            .ok_or(MissingInjectLayer::new("CorrelationId"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ConnectionManager {
    type Rejection = MissingInjectLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ConnectionManager>()
            .cloned()
            .ok_or(MissingInjectLayer::new("ConnectionManager"))
    }
}

/// `Retry-After` of a transient error: 1 s, the usual time to replace a lost SSH session.
const TRANSIENT_RETRY_AFTER: HeaderValue = HeaderValue::from_static("1");

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let transient = self.is_transient();
        let unavailable = transient || matches!(self, Error::ShutDown(_));
        if unavailable {
            tracing::warn!(target: TARGET_LAYER, error = %self, transient, "request failed: database unavailable");
        } else {
            tracing::error!(target: TARGET_LAYER, error = %self, "request failed: database error");
        }
        if !unavailable {
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response();
        }
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, TRANSIENT_RETRY_AFTER)],
            "database temporarily unavailable, retry later",
        )
            .into_response();
        if transient {
            response.extensions_mut().insert(TransientDbFailure);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::TimeoutKind;

    async fn body(response: Response) -> String {
        use http_body_util::BodyExt as _;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn transient_errors_are_503_with_retry_after_and_the_marker() {
        let response = Error::Timeout {
            kind: TimeoutKind::Acquire,
            after: Duration::from_secs(3),
            detail: " (pool max 4 connections, all checked out)".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(response.extensions().get::<TransientDbFailure>().is_some());
        assert!(!body(response).await.contains("pool max"));
    }

    #[tokio::test]
    async fn shutdown_is_503_without_the_retry_marker() {
        let response = Error::ShutDown("ConnectionManager").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.extensions().get::<TransientDbFailure>().is_none());
    }

    #[tokio::test]
    async fn permanent_errors_are_500_without_details() {
        let response = Error::Database(sea_orm::DbErr::Custom(
            "relation \"secret_table\" does not exist".into(),
        ))
        .into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.extensions().get::<TransientDbFailure>().is_none());
        assert_eq!(body(response).await, "internal server error");
    }
}
