//! Where the database password comes from when it rotates: [`PasswordSource`].
//!
//! sqlx has no `before_connect`, so a pool keeps the password it was built with. With a
//! password source the manager keeps the pool's connect options current instead
//! (`Pool::set_connect_options`): every new connection uses the newest password, connections
//! already open stay (PostgreSQL checks the password only at login).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::Result;

/// A password and, when it is a short-lived token (an RDS IAM token lives 15 minutes, a Vault
/// lease its TTL), when it stops being accepted for new logins.
#[derive(Clone)]
pub struct Credential {
    /// The password. Never logged.
    pub password: SecretString,
    /// When new logins with it start to fail; `None` = until rotated.
    pub expires_at: Option<SystemTime>,
}

impl Credential {
    /// A password without an expiry.
    pub fn new(password: impl Into<String>) -> Self {
        Credential {
            password: SecretString::from(password.into()),
            expires_at: None,
        }
    }

    /// The instant new logins with this password start to fail.
    #[must_use]
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("password", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The future a [`PasswordProvider`] returns.
pub type CredentialFuture<'a> = Pin<Box<dyn Future<Output = Result<Credential>> + Send + 'a>>;

/// An async source of the database password: an RDS IAM token, a Vault lease, a secrets manager.
///
/// Called when the manager starts, ahead of the credential's expiry (see
/// [`PasswordSource::refresh_ahead`]), every [`refresh_interval`](PasswordSource::refresh_interval)
/// when the credential has no expiry, and at once when PostgreSQL rejects the password.
/// A closure `Fn() -> impl Future<Output = Result<Credential>>` is a provider.
pub trait PasswordProvider: Send + Sync + 'static {
    /// Fetches the current credential.
    fn credential(&self) -> CredentialFuture<'_>;

    /// What this source is, for errors and events (never the password). Default
    /// `"password provider"`.
    fn describe(&self) -> String {
        "password provider".to_owned()
    }
}

impl<F, Fut> PasswordProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Credential>> + Send + 'static,
{
    fn credential(&self) -> CredentialFuture<'_> {
        Box::pin(self())
    }
}

/// Where the password comes from: a file re-read when it changes (`DATABASE_PASSWORD_FILE`, as
/// Kubernetes and Vault Agent write them), or a [`PasswordProvider`].
///
/// Either replaces the password of `DATABASE_URL` (which must then have none). After a
/// rotation, connections already open are kept until their lifetime ends, unless
/// [`recycle_over`](Self::recycle_over) is set.
#[derive(Clone)]
#[non_exhaustive]
pub struct PasswordSource {
    /// The file or the provider.
    pub kind: PasswordSourceKind,
    /// How often the file's metadata is checked (it is read when it changed). Default 250 ms:
    /// a rotated file is in use for new connections within that.
    pub check_interval: Duration,
    /// A provider's credential without an expiry is fetched again this often. Default 5 min.
    pub refresh_interval: Duration,
    /// A provider's expiring credential is fetched again this long before it expires (at most
    /// half its remaining life). Default 60 s.
    pub refresh_ahead: Duration,
    /// After a rotation, retire the connections opened with the old password over this long,
    /// oldest first, instead of keeping them until their lifetime ends. Default `None`.
    pub recycle_over: Option<Duration>,
    /// How long a password PostgreSQL rejects (SQLSTATE 28P01) is retried, with fresh reads,
    /// before the rejection is a permanent error naming the source. Default 10 s.
    pub rejection_grace: Duration,
}

/// The two kinds of [`PasswordSource`].
#[derive(Clone)]
#[non_exhaustive]
pub enum PasswordSourceKind {
    /// `DATABASE_PASSWORD_FILE`: the whole file is the password, one trailing newline (`\n` or
    /// `\r\n`) stripped.
    File(PathBuf),
    /// An async provider.
    Provider(Arc<dyn PasswordProvider>),
}

impl PasswordSource {
    /// `DATABASE_PASSWORD_FILE`: the password is this file's content (a leading `~/` is
    /// expanded with `$HOME`).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::with_kind(PasswordSourceKind::File(super::tunnel::expand_home(path.into())))
    }

    /// An async provider (a closure returning a future of [`Credential`] will do).
    pub fn provider(provider: impl PasswordProvider) -> Self {
        Self::with_kind(PasswordSourceKind::Provider(Arc::new(provider)))
    }

    fn with_kind(kind: PasswordSourceKind) -> Self {
        PasswordSource {
            kind,
            check_interval: Duration::from_millis(250),
            refresh_interval: Duration::from_secs(300),
            refresh_ahead: Duration::from_secs(60),
            recycle_over: None,
            rejection_grace: Duration::from_secs(10),
        }
    }

    /// How often the file's metadata is checked. Default 250 ms.
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// How often a provider's credential without an expiry is fetched again. Default 5 min.
    #[must_use]
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// How long before its expiry a provider's credential is fetched again. Default 60 s.
    #[must_use]
    pub fn refresh_ahead(mut self, ahead: Duration) -> Self {
        self.refresh_ahead = ahead;
        self
    }

    /// Retire the connections opened with the old password over `over`, oldest first.
    #[must_use]
    pub fn recycle_over(mut self, over: Duration) -> Self {
        self.recycle_over = Some(over);
        self
    }

    /// How long a rejected password is retried with fresh reads before it is a permanent error.
    #[must_use]
    pub fn rejection_grace(mut self, grace: Duration) -> Self {
        self.rejection_grace = grace;
        self
    }

    /// What the source is, for errors and events: `DATABASE_PASSWORD_FILE ("/path")` or the
    /// provider's [`describe`](PasswordProvider::describe).
    pub fn describe(&self) -> String {
        match &self.kind {
            // Debug-quoted: a path from the environment may hold control characters.
            PasswordSourceKind::File(path) => format!("DATABASE_PASSWORD_FILE ({path:?})"),
            PasswordSourceKind::Provider(p) => p.describe(),
        }
    }
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordSource")
            .field("source", &self.describe())
            .field("check_interval", &self.check_interval)
            .field("refresh_interval", &self.refresh_interval)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("recycle_over", &self.recycle_over)
            .field("rejection_grace", &self.rejection_grace)
            .finish()
    }
}
