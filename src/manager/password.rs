//! A rotating database password ([`PasswordSource`]) kept current in the pools' connect options.
//!
//! sqlx reads the pool's connect options for every new connection, and
//! `Pool::set_connect_options` replaces them: that is the hook (sqlx has no `before_connect`).
//! A file is checked every `check_interval` (metadata only; read when it changed), a provider is
//! asked ahead of its credential's expiry, and both are read again at once when PostgreSQL
//! rejects the password (SQLSTATE 28P01). A rejection that outlives `rejection_grace` with
//! fresh reads is [`Error::PasswordRejected`] (permanent), naming the source.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::config::{PasswordSource, PasswordSourceKind};
use crate::error::{Error, Result};
use crate::observe::events::TARGET_MANAGER;
use crate::sync::lock;

/// A file's identity and version: a rotation by rename (Kubernetes' `..data` symlink swap, Vault
/// Agent's write-then-rename) changes the inode, an in-place write the mtime or length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct State {
    current: SecretString,
    /// Bumped whenever a read returned a different password.
    version: u64,
    stamp: Option<FileStamp>,
    expires_at: Option<SystemTime>,
    /// When PostgreSQL first rejected the current version.
    rejected_since: Option<Instant>,
}

pub(crate) struct Rotation {
    source: PasswordSource,
    state: Mutex<State>,
    refresh_now: Notify,
}

impl Rotation {
    /// Reads the source once; an unreadable or empty file (or a failing provider) is an error now,
    /// at startup, not a stream of failed logins later.
    pub(crate) async fn start(source: PasswordSource) -> Result<Arc<Rotation>> {
        let (current, expires_at, stamp) = read(&source).await?;
        Ok(Arc::new(Rotation {
            source,
            state: Mutex::new(State {
                current,
                version: 0,
                stamp,
                expires_at,
                rejected_since: None,
            }),
            refresh_now: Notify::new(),
        }))
    }

    pub(crate) fn current(&self) -> SecretString {
        lock(&self.state).current.clone()
    }

    pub(crate) fn describe(&self) -> String {
        self.source.describe()
    }

    /// PostgreSQL rejected the password (28P01): ask for a fresh read, and say whether to keep
    /// trying (within `rejection_grace` of the first rejection of this version) or give up.
    pub(crate) fn rejected(&self, error: Error) -> Error {
        let since = *lock(&self.state).rejected_since.get_or_insert_with(Instant::now);
        self.refresh_now.notify_one();
        let elapsed = since.elapsed();
        let transient = elapsed < self.source.rejection_grace;
        Error::PasswordRejected {
            source_name: self.describe(),
            message: format!(
                "{error}{}",
                if transient {
                    String::new()
                } else {
                    format!(
                        "; still rejected {:.1} s after the first rejection, with fresh reads",
                        elapsed.as_secs_f64()
                    )
                }
            ),
            transient,
        }
    }

    /// Reads the source again when due (or forced); returns the new password when it changed.
    async fn poll(&self, forced: bool) -> Result<Option<SecretString>> {
        if let PasswordSourceKind::File(path) = &self.source.kind
            && !forced
        {
            let stamp = stamp(path).ok();
            if stamp.is_some() && stamp == lock(&self.state).stamp {
                return Ok(None);
            }
        }
        let (password, expires_at, stamp) = read(&self.source).await?;
        let mut state = lock(&self.state);
        state.stamp = stamp;
        state.expires_at = expires_at;
        if state.current.expose_secret() == password.expose_secret() {
            return Ok(None);
        }
        state.current = password.clone();
        state.version += 1;
        state.rejected_since = None;
        Ok(Some(password))
    }

    /// How long until the next scheduled read.
    fn next_wait(&self) -> Duration {
        match &self.source.kind {
            PasswordSourceKind::File(_) => self.source.check_interval,
            PasswordSourceKind::Provider(_) => match lock(&self.state).expires_at {
                None => self.source.refresh_interval,
                Some(at) => {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    left.saturating_sub(self.source.refresh_ahead.min(left / 2))
                        .max(Duration::from_millis(100))
                }
            },
        }
    }
}

/// Reads the password: a file's content without one trailing newline, or the provider's.
async fn read(source: &PasswordSource) -> Result<(SecretString, Option<SystemTime>, Option<FileStamp>)> {
    match &source.kind {
        PasswordSourceKind::File(path) => {
            let file_error = |message: String, e: Option<std::io::Error>| Error::File {
                what: "database password file (DATABASE_PASSWORD_FILE)",
                path: path.clone(),
                message,
                source: e.map(|e| Arc::new(e) as crate::error::SharedError),
            };
            let stamp = stamp(path).map_err(|e| file_error(format!("cannot be read: {e}"), Some(e)))?;
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| file_error(format!("cannot be read: {e}"), Some(e)))?;
            let text = String::from_utf8(bytes).map_err(|_| file_error("is not UTF-8 text".to_owned(), None))?;
            let password = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text);
            if password.is_empty() {
                return Err(file_error("is empty (expected the database password)".to_owned(), None));
            }
            Ok((SecretString::from(password.to_owned()), None, Some(stamp)))
        }
        PasswordSourceKind::Provider(provider) => {
            let credential = provider.credential().await?;
            Ok((credential.password, credential.expires_at, None))
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks: Kubernetes swaps the `..data` link the file points through.
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Keeps the pools' password current until the manager stops.
pub(crate) async fn run(inner: Weak<Inner>, rotation: Arc<Rotation>, cancel: CancellationToken) {
    let mut failing_since: Option<Instant> = None;
    loop {
        let forced = tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(rotation.next_wait()) => false,
            () = rotation.refresh_now.notified() => true,
        };
        match rotation.poll(forced).await {
            Ok(None) => failing_since = None,
            Ok(Some(password)) => {
                failing_since = None;
                let Some(inner) = inner.upgrade() else { return };
                inner.apply_password(&password);
                let version = lock(&rotation.state).version;
                crate::observe::events::password_rotated(inner.hooks.pool_label(), &rotation.describe(), version);
                if let Some(over) = rotation.source.recycle_over {
                    let generation = inner.generation.clone();
                    let cancel = cancel.clone();
                    drop(inner);
                    tokio::spawn(recycle(generation, over, cancel));
                }
            }
            Err(e) => {
                // Keep the last good password; say so once per failure streak.
                if failing_since.is_none() {
                    tracing::warn!(
                        target: TARGET_MANAGER,
                        source = %rotation.describe(),
                        error = %e,
                        "cannot read the database password; new connections keep the last one"
                    );
                    failing_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Retires the connections opened before a rotation over `over`, oldest first: the cutoff walks
/// from `rotation − over` to the rotation instant in ten steps.
async fn recycle(generation: Arc<crate::generation::Generation>, over: Duration, cancel: CancellationToken) {
    let rotated = Instant::now();
    let start = rotated.checked_sub(over).unwrap_or(rotated);
    for step in 1..=10u32 {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(over / 10) => {}
        }
        generation.retire_before(start + (rotated - start) * step / 10);
    }
}

impl Inner {
    /// New connections of both pools log in with `password` from now on.
    pub(crate) fn apply_password(&self, password: &SecretString) {
        let pools = std::iter::once(&self.db).chain(self.sink_db.as_ref());
        for db in pools {
            let pool = db.get_postgres_connection_pool();
            let options = pool
                .connect_options()
                .as_ref()
                .clone()
                .password(password.expose_secret());
            pool.set_connect_options(options);
        }
    }
}

/// Whether `error` is PostgreSQL's "password authentication failed" (SQLSTATE 28P01).
pub(crate) fn is_password_rejected(error: &Error) -> bool {
    matches!(error, Error::Database(db) if crate::error::sqlstate(db).as_deref() == Some("28P01"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Credential;

    #[tokio::test]
    async fn a_file_is_read_without_its_trailing_newline_and_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "first\n").unwrap();
        let rotation = Rotation::start(PasswordSource::file(&path)).await.unwrap();
        assert_eq!(rotation.current().expose_secret(), "first");
        assert!(rotation.poll(false).await.unwrap().is_none(), "unchanged");
        // A rename over the file, as Vault Agent and Kubernetes rotate it.
        let next = dir.path().join("pw.new");
        std::fs::write(&next, "second\r\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let new = rotation.poll(false).await.unwrap().expect("rotated");
        assert_eq!(new.expose_secret(), "second");
        assert_eq!(rotation.current().expose_secret(), "second");
        // A failing read keeps the last good password.
        std::fs::remove_file(&path).unwrap();
        let e = rotation.poll(false).await.unwrap_err().to_string();
        assert!(e.contains("DATABASE_PASSWORD_FILE") && e.contains("pw"), "{e}");
        assert_eq!(rotation.current().expose_secret(), "second");
    }

    #[tokio::test]
    async fn an_empty_or_missing_file_fails_at_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let e = Rotation::start(PasswordSource::file(&path)).await.err().unwrap();
        assert!(!e.is_transient());
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, "\n").unwrap();
        let e = Rotation::start(PasswordSource::file(&path))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
    }

    #[tokio::test]
    async fn a_rejection_is_transient_within_the_grace_then_permanent_naming_the_source() {
        let source = PasswordSource::provider(|| async { Ok(Credential::new("token")) })
            .rejection_grace(Duration::from_millis(200));
        let rotation = Rotation::start(source).await.unwrap();
        let rejected = || Error::Database(sea_orm::DbErr::Custom("password authentication failed".into()));
        let first = rotation.rejected(rejected());
        assert!(first.is_transient(), "{first}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = rotation.rejected(rejected());
        assert!(!later.is_transient(), "{later}");
        let text = later.to_string();
        assert!(
            text.contains("password provider") && text.contains("still rejected"),
            "{text}"
        );
        assert!(!text.contains("token"), "{text}");
    }

    #[tokio::test]
    async fn an_expiring_credential_is_fetched_again_ahead_of_its_expiry() {
        let source = PasswordSource::provider(|| async {
            Ok(Credential::new("t").expires_at(SystemTime::now() + Duration::from_secs(900)))
        });
        let rotation = Rotation::start(source).await.unwrap();
        let wait = rotation.next_wait();
        // 15 minutes left, refreshed 60 s ahead.
        assert!(
            wait > Duration::from_secs(835) && wait <= Duration::from_secs(840),
            "{wait:?}"
        );
        let short = PasswordSource::provider(|| async {
            Ok(Credential::new("t").expires_at(SystemTime::now() + Duration::from_secs(10)))
        });
        let rotation = Rotation::start(short).await.unwrap();
        // Never later than half the remaining life.
        assert!(
            rotation.next_wait() <= Duration::from_secs(5),
            "{:?}",
            rotation.next_wait()
        );
    }
}
