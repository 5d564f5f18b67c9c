//! The crate's one error type.
//!
//! Variants are grouped by the phase that failed (configuration, SSH transport, host key,
//! authentication, forwarding, database, lifecycle). [`Error::is_transient`] tells whether
//! retrying can help: permanent errors (a changed host key, a refused key, bad configuration)
//! are surfaced at once and never spin in a retry loop.
//!
//! Foreign errors are kept behind `#[source]` as shared trait objects so they are not part of
//! this crate's public API, and so [`Error`] is `Clone`: one failure can be kept as the tunnel's
//! state, sent to every event subscriber and returned to every waiting caller, source included.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error, as request bodies and other foreign APIs produce them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A foreign error kept as the source of one of ours, shared between clones.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// TCP connect plus SSH handshake to the bastion.
    SshConnect,
    /// Opening a `direct-tcpip` channel.
    ChannelOpen,
    /// Waiting for a free slot (channel or SSH session) in the tunnel.
    TunnelCapacity,
    /// Waiting for a pooled database connection.
    Acquire,
    /// A health-check probe.
    HealthCheck,
    /// Waiting for checked-out connections during shutdown.
    Drain,
    /// Writing queued connection-log events (`LogSink::flush`).
    LogFlush,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SshConnect => "SSH connect",
            Self::ChannelOpen => "channel open",
            Self::TunnelCapacity => "waiting for tunnel capacity",
            Self::Acquire => "connection acquire",
            Self::HealthCheck => "health check",
            Self::Drain => "shutdown drain",
            Self::LogFlush => "connection log flush",
        })
    }
}

/// Every error this crate returns.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing, malformed or contradicts another one.
    ///
    /// `field` names the environment variable or config field; `message` says what is wrong
    /// (and, for non-secret values, repeats the bad value).
    #[error("invalid configuration: {field}: {message}")]
    Config {
        /// The variable or field that is wrong, e.g. `POSTGRES_MAX_CONNECTIONS` or `pool.max_connections`.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// A key or known_hosts file is missing, unreadable or malformed.
    // Paths are printed quoted and escaped (`{:?}`): a newline or escape sequence in a configured
    // path must not forge a log line.
    #[error("{what} {path:?}: {message}")]
    File {
        /// What the file is for, e.g. "SSH private key" or "known_hosts file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<SharedError>,
    },

    /// The passphrase for an encrypted private key is missing or wrong.
    #[error("SSH private key {path:?} is encrypted and {problem}")]
    KeyPassphrase {
        /// The key file.
        path: PathBuf,
        /// "no passphrase was given" or "the passphrase is wrong".
        problem: &'static str,
    },

    /// The bastion presented a host key that is not in known_hosts (strict policy).
    #[error(
        "host key for {host} is not known: {fingerprint} is not in {known_hosts:?} \
         (add it, e.g. with `ssh-keyscan -p PORT HOST >> known_hosts`, or use SSH_HOST_KEY_POLICY=accept-new)"
    )]
    HostKeyUnknown {
        /// `host` or `[host]:port` as looked up.
        host: String,
        /// The presented key's `SHA256:` fingerprint.
        fingerprint: String,
        /// The known_hosts file consulted.
        known_hosts: PathBuf,
    },

    /// The bastion presented a host key that differs from the recorded one. Possible
    /// man-in-the-middle: nothing was sent after the key exchange.
    #[error(
        "HOST KEY CHANGED for {host}: expected {expected}, got {actual}; refusing to connect \
         (if the change is legitimate, update {source_of_expected})"
    )]
    HostKeyChanged {
        /// `host` or `[host]:port` as looked up.
        host: String,
        /// The fingerprint(s) on record.
        expected: String,
        /// The presented key's fingerprint.
        actual: String,
        /// Where the expected key came from (the known_hosts path or "the pinned fingerprint").
        source_of_expected: String,
    },

    /// The presented host key is marked `@revoked` in known_hosts.
    #[error("host key {fingerprint} for {host} is revoked in {known_hosts:?}")]
    HostKeyRevoked {
        /// `host` or `[host]:port` as looked up.
        host: String,
        /// The presented key's fingerprint.
        fingerprint: String,
        /// The known_hosts file that revokes it.
        known_hosts: PathBuf,
    },

    /// The bastion refused every authentication method that was tried.
    #[error("SSH authentication failed for {user}@{host}: tried {tried}")]
    Auth {
        /// The SSH user.
        user: String,
        /// The bastion.
        host: String,
        /// The methods tried, in order, with their outcome, e.g. "publickey /root/.ssh/id_ed25519 (refused), ssh-agent (no agent)".
        tried: String,
    },

    /// PostgreSQL rejected the password (SQLSTATE 28P01) from a rotating
    /// [`PasswordSource`](crate::config::PasswordSource). Transient while the source is being
    /// re-read (within its `rejection_grace`), permanent after that.
    #[error("PostgreSQL rejected the password from {source_name}: {message}")]
    PasswordRejected {
        /// The source, e.g. `DATABASE_PASSWORD_FILE (/run/secrets/db)`; never the password.
        source_name: String,
        /// The server's error, and how long it has been rejected.
        message: String,
        /// Whether a fresh read may still fix it.
        transient: bool,
    },

    /// The database moved under the pool: a demoted primary answered SQLSTATE 25006 to a
    /// read-write pool. Transient: the pool generation was retired, so a retry gets a new
    /// connection, which reaches the current primary.
    #[error("database failover: {signal}: {source}")]
    Failover {
        /// What showed it.
        signal: &'static str,
        /// The database error.
        #[source]
        source: sea_orm::DbErr,
    },

    /// No host of a multi-host `DATABASE_URL` (or the one host) satisfied
    /// `target_session_attrs` just now: each was unreachable or of the wrong kind (during a
    /// failover, no server is the primary for a while). Transient: the hosts are tried again.
    #[error("no database host is {target_session_attrs} (target_session_attrs): {}", tried.iter().map(|(h, why)| format!("{h}: {why}")).collect::<Vec<_>>().join("; "))]
    NoSuitableHost {
        /// The attribute asked for.
        target_session_attrs: crate::config::TargetSessionAttrs,
        /// Each host tried (`host:port`) and what it was or why it failed.
        tried: Vec<(String, String)>,
    },

    /// The database answered like a transaction pooler (PgBouncer, pgcat, Supavisor, RDS Proxy)
    /// while PgBouncer mode is off: an unsupported startup parameter, or a prepared statement
    /// that already exists (42P05) or does not exist (26000) on the server connection the pooler
    /// lent. Transient exactly when the database error is.
    #[error(
        "{source}: this looks like a transaction pooler (PgBouncer, pgcat, RDS Proxy); set \
         pgbouncer=true in DATABASE_URL (or POSTGRES_PGBOUNCER=true)"
    )]
    TransactionPooler {
        /// The database error.
        #[source]
        source: sea_orm::DbErr,
    },

    /// The bastion needs an algorithm this build leaves out: an optional cargo feature is off.
    #[error("SSH connection to {host}:{port} needs {needs}: enable the `{feature}` feature of sea-orm-tunnel")]
    FeatureRequired {
        /// The bastion host.
        host: String,
        /// The bastion port.
        port: u16,
        /// What the bastion requires, e.g. "RSA host keys (the bastion offers only rsa-sha2-512)".
        needs: String,
        /// The cargo feature that provides it, e.g. `rsa`.
        feature: &'static str,
    },

    /// TCP connect, handshake or I/O on the SSH transport failed. Usually transient.
    #[error("SSH connection to {host}:{port} failed: {message}")]
    SshConnect {
        /// The bastion host.
        host: String,
        /// The bastion port.
        port: u16,
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<SharedError>,
    },

    /// The SSH link was lost (keepalive unanswered, reset, closed by the server).
    #[error("SSH tunnel to {host} lost: {reason}")]
    TunnelLost {
        /// The bastion host.
        host: String,
        /// Why the link is considered dead.
        reason: String,
    },

    /// The bastion refused to open a forwarding channel to the remote target.
    ///
    /// `administratively prohibited` (AllowTcpForwarding / PermitOpen) is permanent;
    /// `connect failed` (the target is down) is transient.
    #[error("bastion refused a channel to {target}: {reason}")]
    ChannelRefused {
        /// The remote `host:port` the channel was for.
        target: String,
        /// The server's reason.
        reason: String,
        /// Whether retrying may help.
        transient: bool,
    },

    /// The tunnel gave up reconnecting or hit a permanent error.
    #[error("SSH tunnel failed: {0}")]
    TunnelFailed(#[source] Box<Error>),

    /// A timeout fired.
    #[error("{kind} timed out after {after:?}{detail}")]
    Timeout {
        /// Which timeout.
        kind: TimeoutKind,
        /// The configured limit.
        after: Duration,
        /// Extra context, e.g. " (pool max 20 connections, all checked out)". Empty or starting with a space.
        detail: String,
    },

    /// A database operation failed.
    #[error("database error: {0}")]
    Database(#[source] sea_orm::DbErr),

    /// The singleton facade was used before `initialize_instance`.
    #[error("{0} is not initialized: call initialize_instance(config) or initialize_from_env() first")]
    NotInitialized(&'static str),

    /// The tunnel or manager is shutting down or has shut down.
    #[error("{0} is shut down")]
    ShutDown(&'static str),

    /// TLS between the tunnel and PostgreSQL failed (see [`crate::tls`]): a certificate that
    /// does not verify, a server without TLS when `sslmode` requires it, a refused client
    /// certificate. Permanent, except [`TlsErrorKind::Io`] (the connection broke mid-handshake).
    /// File problems (a missing `sslrootcert`) are [`Error::File`].
    #[error("TLS to PostgreSQL at {host}: {message}")]
    Tls {
        /// The name the certificate was checked against (`sslservername`, else the URL's host).
        host: String,
        /// What failed.
        kind: TlsErrorKind,
        /// What happened and what to change.
        message: String,
    },

    /// An I/O error outside the SSH transport (local listener, files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The bastion presented an OpenSSH host certificate signed by a CA that known_hosts trusts
    /// for it (`@cert-authority`), and the certificate is not acceptable: expired or not yet
    /// valid, not issued for this host name, not a host certificate, a bad CA signature, an
    /// unknown critical option, or a CA marked `@revoked`. Permanent.
    #[error("host certificate for {host} refused: {problem} (CA listed in {known_hosts:?})")]
    HostCertificate {
        /// The host name the certificate was checked for (`host`, or the HostKeyAlias).
        host: String,
        /// What is wrong, with the certificate's key id, serial and validity window.
        problem: String,
        /// The known_hosts file holding the `@cert-authority` (or `@revoked`) line.
        known_hosts: PathBuf,
    },

    /// The OpenSSH user certificate is outside its validity window, also after being read again
    /// from disk. Transient: a renewal written to the file (Vault, step-ca) is picked up by the
    /// next attempt.
    #[error(
        "SSH user certificate {path:?} is not valid now ({now}): it is valid from {valid_after} to {valid_before}; renew it (the file is read again on every connection attempt)"
    )]
    UserCertificateExpired {
        /// The certificate file.
        path: PathBuf,
        /// Start of the validity window (UTC).
        valid_after: String,
        /// End of the validity window (UTC).
        valid_before: String,
        /// The time of the check (UTC).
        now: String,
    },
    /// One hop of a ProxyJump chain failed (`SSH_PROXY_JUMP`): `source` is what failed there
    /// (TCP, handshake, host key, authentication). Transient exactly when `source` is.
    #[error("hop {hop} of {hops} ({role} {target}): {source}")]
    Hop {
        /// 1-based position in the chain; the last hop is the bastion itself.
        hop: usize,
        /// Hops in the chain (jump hosts + the bastion).
        hops: usize,
        /// `"jump host"` or `"bastion"`.
        role: &'static str,
        /// `user@host:port` of that hop.
        target: String,
        /// What failed.
        #[source]
        source: Box<Error>,
    },

    /// Every configured bastion (`SSH_HOST=a,b:2222`) failed in one connect attempt, or was
    /// skipped for an earlier permanent error. Transient when at least one failure is.
    #[error("all {} bastions failed: {}", .errors.len(), join_errors(.errors))]
    AllBastionsFailed {
        /// `(bastion as host:port, its error)` per bastion, in the order they were tried (the
        /// ones skipped for an earlier permanent error last).
        errors: Vec<(String, Error)>,
    },
}

fn join_errors(errors: &[(String, Error)]) -> String {
    errors
        .iter()
        .map(|(bastion, e)| format!("{bastion}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Whether retrying the failed operation may succeed.
    ///
    /// Transient: I/O errors, timeouts, lost links, SSH connect failures, PostgreSQL
    /// `57P01`/`57P02`/`57P03` (admin shutdown, crash shutdown, cannot connect now) and class `08`
    /// (connection exceptions), pool timeouts.
    ///
    /// Permanent: configuration, files, passphrases, host keys, authentication, a missing feature,
    /// administratively refused channels, other database errors (syntax, constraint, permission).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Config { .. }
            | Error::File { .. }
            | Error::KeyPassphrase { .. }
            | Error::HostKeyUnknown { .. }
            | Error::HostKeyChanged { .. }
            | Error::HostKeyRevoked { .. }
            | Error::Auth { .. }
            | Error::FeatureRequired { .. }
            | Error::HostCertificate { .. }
            | Error::NotInitialized(_)
            | Error::ShutDown(_) => false,
            Error::ChannelRefused { transient, .. } | Error::PasswordRejected { transient, .. } => *transient,
            Error::TunnelFailed(inner) => inner.is_transient(),
            Error::Tls { kind, .. } => *kind == TlsErrorKind::Io,
            Error::Hop { source, .. } => source.is_transient(),
            Error::AllBastionsFailed { errors } => errors.iter().any(|(_, e)| e.is_transient()),
            Error::SshConnect { .. }
            | Error::TunnelLost { .. }
            | Error::Timeout { .. }
            | Error::Io { .. }
            | Error::Failover { .. }
            | Error::NoSuitableHost { .. } => true,
            // A renewed certificate on disk heals it: the file is read again on every attempt.
            Error::UserCertificateExpired { .. } => true,
            Error::Database(e) | Error::TransactionPooler { source: e } => db_err_is_transient(e),
        }
    }

    /// The error without the context this crate wraps around it ([`Error::TunnelFailed`],
    /// [`Error::Hop`]): e.g. the [`Error::HostKeyChanged`] inside "hop 2 of 2 (...)". Other
    /// errors (an [`Error::AllBastionsFailed`] too) are returned as they are.
    pub fn cause(&self) -> &Error {
        match self {
            Error::TunnelFailed(inner) | Error::Hop { source: inner, .. } => inner.cause(),
            other => other,
        }
    }

    /// Shorthand for a [`Error::Config`].
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<sea_orm::DbErr> for Error {
    /// [`Error::Database`]; inside a request served through
    /// [`InjectDatabaseLayer`](crate::layer::InjectDatabaseLayer), a failover signal (SQLSTATE
    /// 25006 on a read-write pool) becomes [`Error::Failover`] and retires the pool generation.
    fn from(e: sea_orm::DbErr) -> Self {
        crate::manager::failover::observe_in_scope(e)
    }
}

/// Whether a SeaORM error is worth retrying: connection-level failures and PostgreSQL
/// SQLSTATEs that mean "the server is going away or not there yet".
pub fn db_err_is_transient(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let runtime = match err {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(r) | DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return false,
    };
    match runtime {
        RuntimeErr::SqlxError(e) => sqlx_err_is_transient(e),
        RuntimeErr::Internal(_) => false,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

fn sqlx_err_is_transient(err: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error as E;
    match err {
        // sqlx's rustls reports a certificate that does not verify as an I/O error.
        E::Io(e) => !e.get_ref().is_some_and(|inner| tls_error_is_permanent(inner)),
        E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Protocol(_) => true,
        // sqlx's own TLS messages ("server does not support TLS", unreadable files) are
        // configuration problems; only a broken connection is worth another try.
        E::Tls(e) => !tls_error_is_permanent(e.as_ref()) && e.downcast_ref::<std::io::Error>().is_some(),
        // The tunnel's own refusal (a certificate that does not verify, ...) is permanent,
        // whatever its class-08 SQLSTATE says.
        E::Database(db)
            if db
                .try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.routine())
                == Some(TUNNEL_TLS_ROUTINE) =>
        {
            false
        }
        E::Database(db) => db.code().is_some_and(|c| sqlstate_is_transient(&c)),
        _ => false,
    }
}

/// The `routine` field of the `ErrorResponse` the tunnel sends for a permanent TLS failure.
pub(crate) const TUNNEL_TLS_ROUTINE: &str = "sea_orm_tunnel::tls";

/// Whether `error` is the `ErrorResponse` the tunnel sends for a permanent TLS failure.
pub(crate) fn is_tunnel_tls_refusal(error: &Error) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let Error::Database(
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)),
    ) = error
    else {
        return false;
    };
    match &**e {
        sea_orm::sqlx::Error::Database(db) => {
            db.try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.routine())
                == Some(TUNNEL_TLS_ROUTINE)
        }
        _ => false,
    }
}

/// Whether an error from sqlx's own TLS (a direct connection) is a verification or
/// configuration failure rather than a broken connection: a rustls certificate error, or sqlx
/// saying the server does not support TLS.
fn tls_error_is_permanent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::InconsistentKeys(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.get_ref().is_none())
        {
            return false;
        }
        next = err.source();
    }
    false
}

/// What failed in an [`Error::Tls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// The server's certificate is not signed by a trusted CA (wrong `sslrootcert`).
    UnknownIssuer,
    /// The server's certificate has expired.
    Expired,
    /// The server's certificate is not valid yet.
    NotYetValid,
    /// The server's certificate does not carry the expected name (`verify-full`).
    NameMismatch,
    /// Another certificate problem (bad encoding, unsupported algorithm, ...).
    Certificate,
    /// The server does not support TLS and `sslmode` requires it.
    NotSupported,
    /// The server refused our client certificate, or wants one and none was configured.
    ClientCertificate,
    /// The handshake failed for another protocol reason.
    Handshake,
    /// The connection broke during the handshake (transient).
    Io,
}

/// The SQLSTATE of a database error, if PostgreSQL sent one.
pub(crate) fn sqlstate(e: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    let runtime = match e {
        DbErr::Conn(r) | DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return None,
    };
    match runtime {
        RuntimeErr::SqlxError(e) => match e.as_ref() {
            sea_orm::sqlx::Error::Database(e) => e.code().map(|c| c.into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// PostgreSQL SQLSTATEs that mean "try again": class 08 (connection exception),
/// 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 40001/40P01
/// (serialization failure, deadlock) are retryable transactions.
pub fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_and_transient() {
        assert!(!Error::config("SSH_PORT", "\"x\" is not a port").is_transient());
        assert!(
            !Error::HostKeyChanged {
                host: "h".into(),
                expected: "a".into(),
                actual: "b".into(),
                source_of_expected: "k".into()
            }
            .is_transient()
        );
        assert!(
            Error::Timeout {
                kind: TimeoutKind::Acquire,
                after: Duration::from_secs(1),
                detail: String::new()
            }
            .is_transient()
        );
        assert!(
            Error::TunnelFailed(Box::new(Error::TunnelLost {
                host: "h".into(),
                reason: "keepalive".into()
            }))
            .is_transient()
        );
        assert!(sqlstate_is_transient("57P01"));
        assert!(sqlstate_is_transient("08006"));
        assert!(!sqlstate_is_transient("23505"));
    }

    #[test]
    fn hop_and_bastion_context_keep_the_cause_and_its_transience() {
        let changed = Error::HostKeyChanged {
            host: "[10.0.0.5]:22".into(),
            expected: "SHA256:a".into(),
            actual: "SHA256:b".into(),
            source_of_expected: "known_hosts".into(),
        };
        let hop = Error::Hop {
            hop: 2,
            hops: 2,
            role: "bastion",
            target: "ops@10.0.0.5:22".into(),
            source: Box::new(changed),
        };
        assert!(!hop.is_transient());
        assert!(
            hop.to_string()
                .starts_with("hop 2 of 2 (bastion ops@10.0.0.5:22): HOST KEY CHANGED"),
            "{hop}"
        );
        let wrapped = Error::TunnelFailed(Box::new(hop.clone()));
        assert!(matches!(wrapped.cause(), Error::HostKeyChanged { .. }));
        let down = Error::SshConnect {
            host: "b".into(),
            port: 2222,
            message: "TCP connect failed".into(),
            source: None,
        };
        let all = Error::AllBastionsFailed {
            errors: vec![("a:22".into(), hop.clone()), ("b:2222".into(), down)],
        };
        assert!(all.is_transient(), "b may come back");
        assert!(
            all.to_string().starts_with("all 2 bastions failed: a:22: hop 2 of 2"),
            "{all}"
        );
        assert!(
            all.to_string().contains("; b:2222: SSH connection to b:2222 failed"),
            "{all}"
        );
        let all_permanent = Error::AllBastionsFailed {
            errors: vec![("a:22".into(), hop)],
        };
        assert!(!all_permanent.is_transient());
    }

    #[test]
    fn tls_failures_are_permanent_except_a_broken_connection() {
        let tls = |kind| Error::Tls {
            host: "db.internal".into(),
            kind,
            message: "m".into(),
        };
        for kind in [
            TlsErrorKind::UnknownIssuer,
            TlsErrorKind::Expired,
            TlsErrorKind::NameMismatch,
            TlsErrorKind::NotSupported,
            TlsErrorKind::ClientCertificate,
        ] {
            assert!(!tls(kind).is_transient(), "{kind:?}");
        }
        assert!(tls(TlsErrorKind::Io).is_transient());
        // sqlx's own rustls: a certificate that does not verify arrives as an I/O error.
        let cert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(!sqlx_err_is_transient(&sea_orm::sqlx::Error::Io(cert)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(sqlx_err_is_transient(&sea_orm::sqlx::Error::Io(reset)));
        assert!(!sqlx_err_is_transient(&sea_orm::sqlx::Error::Tls(
            "server does not support TLS".into()
        )));
    }

    #[test]
    fn a_clone_keeps_its_variant_and_shares_its_source() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let original = Error::SshConnect {
            host: "bastion".into(),
            port: 22,
            message: "TCP connect failed".into(),
            source: Some(Arc::new(io)),
        };
        let copy = original.clone();
        assert!(matches!(copy, Error::SshConnect { port: 22, .. }), "{copy:?}");
        assert!(copy.is_transient());
        assert_eq!(copy.to_string(), original.to_string());
        let source = copy.source().expect("the clone keeps its source");
        assert_eq!(source.to_string(), "refused");
        let (Error::SshConnect { source: Some(a), .. }, Error::SshConnect { source: Some(b), .. }) = (&original, &copy)
        else {
            unreachable!("checked above")
        };
        assert!(Arc::ptr_eq(a, b), "one shared source, not a copy");
    }
}
