//! TLS to PostgreSQL held by the tunnel, with libpq's meaning of `DATABASE_URL`'s `ssl*`
//! parameters.
//!
//! # Why the tunnel holds TLS
//!
//! Through a tunnel the pool dials the tunnel's local endpoint (`127.0.0.1:port` or a private
//! Unix socket). sqlx checks the server certificate against the host it dialled, and has no
//! libpq `hostaddr`, so `sslmode=verify-full` through a bastion can never pass. So the tunnel
//! negotiates TLS with PostgreSQL itself for every forwarded connection (an `SSLRequest` over the
//! SSH channel, then rustls), checking the certificate against the host the user wrote in
//! `DATABASE_URL`, and offers plaintext only on its private local endpoint; the pool's local URL
//! says `sslmode=disable` ([`local_database_url_tls_in_tunnel`](crate::url::local_database_url_tls_in_tunnel)).
//! This is what Cloud SQL Auth Proxy does. Only the startup phase of each connection is read
//! (`src/tunnel/pgwire.rs`); after it, bytes are copied untouched.
//!
//! # `DATABASE_URL` parameters
//!
//! | parameter | meaning (libpq's) |
//! |---|---|
//! | `sslmode` | `disable`, `allow`, `prefer` (default), `require`, `verify-ca`, `verify-full` (env `PGSSLMODE`) |
//! | `sslrootcert` | PEM file of trusted CAs, or `system` (the Mozilla roots of `webpki-roots`; only with `verify-full`, which it then defaults to). Default `~/.postgresql/root.crt` when present (env `PGSSLROOTCERT`) |
//! | `sslcert` / `sslkey` | client certificate and key (pg_hba `cert`); default `~/.postgresql/postgresql.crt` / `.key` when present (env `PGSSLCERT` / `PGSSLKEY`) |
//! | `sslpassword` | passphrase of an encrypted PKCS#8 key (`BEGIN ENCRYPTED PRIVATE KEY`) |
//! | `sslsni` | `0` = send no server name indication (default `1`) |
//! | `sslservername` | **this crate's**: the name the certificate must carry, when the URL's host is an address or an alias (not a libpq parameter) |
//! | `hostaddr` | connect to this address (through the tunnel: the bastion connects to it), check the certificate against `host`; with several hosts, one address per host (`hostaddr=10.0.0.5,10.0.0.6`; an empty entry dials that host by name), each server checked against its own name |
//!
//! - `prefer` and `allow` ask for TLS and fall back to plaintext only when the server answers
//!   `N` to the `SSLRequest` (`allow` is not weaker than `prefer` through the tunnel: plaintext
//!   first would need a second connection).
//! - `require` never falls back to plaintext; like `prefer`, it verifies nothing unless a root
//!   certificate is present (explicit `sslrootcert`, or `~/.postgresql/root.crt`), in which case
//!   it verifies the chain as `verify-ca` does.
//! - `verify-ca` checks the chain against `sslrootcert`; `verify-full` also the name
//!   (`sslservername`, else `host`, else the URL's host).
//! - Encrypted keys in the legacy OpenSSL format (`Proc-Type: 4,ENCRYPTED`) are refused, naming
//!   `sslpassword`: convert them with `openssl pkcs8 -topk8 -v2 aes-256-cbc`.
//! - A key file readable by group or others is refused, as libpq does (0600, or 0640 when owned by
//!   root).
//!
//! Files are read once, when the tunnel starts (a missing or unreadable file fails the start);
//! a renewed certificate is picked up by a restart.
//!
//! ```
//! use sea_orm_tunnel::tls::{PostgresTls, SslMode};
//!
//! let tls = PostgresTls::from_database_url(
//!     "postgres://app@10.0.0.5/app?sslmode=require&sslservername=db.internal",
//! )?;
//! assert_eq!(tls.mode, SslMode::Require);
//! assert_eq!(tls.server_name, "db.internal");
//! # Ok::<(), sea_orm_tunnel::Error>(())
//! ```

mod load;
mod x509;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use secrecy::SecretString;

pub use crate::error::TlsErrorKind;
pub(crate) use load::Loaded;
pub(crate) use x509::format_unix;
pub use x509::not_after_unix;

use crate::config::{Config, TunnelConfig};
use crate::url::{authority_host, query_params};
use crate::{Error, Result};

/// The `DATABASE_URL` field name used in configuration errors.
const FIELD: &str = "DATABASE_URL";

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (through the tunnel: as [`Prefer`](Self::Prefer)).
    Allow,
    /// TLS when the server offers it, plaintext when it answers `N`. libpq's default.
    #[default]
    Prefer,
    /// TLS or nothing; the chain is verified only when a root certificate is present.
    Require,
    /// TLS, chain verified against the root certificates.
    VerifyCa,
    /// TLS, chain and server name verified.
    VerifyFull,
}

impl SslMode {
    /// The spelling in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether plaintext is refused (`require` and stronger).
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(Error::config(
                    format!("{FIELD} sslmode"),
                    format!("{s:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"),
                ));
            }
        })
    }
}

/// What the tunnel verifies of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verification {
    /// Nothing (`prefer`/`require` without a root certificate): encryption against a passive
    /// observer only, as libpq does.
    None,
    /// The chain, against the root certificates (`verify-ca`, or `require` with roots).
    Chain,
    /// The chain and the server name (`verify-full`).
    ChainAndName,
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verification::None => "not verified",
            Verification::Chain => "chain verified",
            Verification::ChainAndName => "chain and name verified",
        })
    }
}

/// One TLS session the tunnel negotiated with PostgreSQL (see [`PostgresTls::last_session`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSession {
    /// `TLSv1_3` or `TLSv1_2`.
    pub protocol: String,
    /// The cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// What was verified.
    pub verification: Verification,
    /// The name checked (and sent as SNI when it is a DNS name).
    pub server_name: String,
    /// The server certificate's `notAfter`, Unix seconds.
    pub not_after: Option<i64>,
}

impl TlsSession {
    /// Seconds until the server certificate expires (negative once it has), from now.
    pub fn expires_in_secs(&self) -> Option<i64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after.map(|t| t - now)
    }
}

/// A certificate expiring within this many days gets a warning (`check`, and the tunnel's log
/// once per start).
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RootCerts {
    /// `~/.postgresql/root.crt` when that file exists, else none (libpq's default).
    Default,
    /// A PEM file of CA certificates (`sslrootcert=<file>`).
    File(PathBuf),
    /// The Mozilla roots shipped in `webpki-roots` (`sslrootcert=system`).
    System,
}

/// TLS from the tunnel to PostgreSQL: the settings ([`from_database_url`](Self::from_database_url)
/// reads them with libpq's meaning). `Debug` never shows the key password.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_certs: RootCerts,
    /// `sslcert`: client certificate (PEM, the chain after it allowed). `None` =
    /// `~/.postgresql/postgresql.crt` when present.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's key (PEM: PKCS#8, PKCS#1 or SEC1; encrypted PKCS#8 with
    /// [`key_password`](Self::key_password)). `None` = `~/.postgresql/postgresql.key`.
    pub client_key: Option<PathBuf>,
    /// `sslpassword`.
    pub key_password: Option<SecretString>,
    /// The name the server certificate must carry (`verify-full`) and the SNI sent: the
    /// `sslservername` parameter, else the `host` parameter, else the URL's host. A DNS name or
    /// an IP address.
    pub server_name: String,
    /// `sslsni`: send the server name (TLS SNI) when it is a DNS name. Default true.
    pub sni: bool,
    /// The files, loaded once per tunnel (shared by clones).
    loaded: Arc<OnceLock<Arc<Loaded>>>,
}

impl fmt::Debug for PostgresTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTls")
            .field("mode", &self.mode)
            .field("root_certs", &self.root_certs)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("key_password", &self.key_password.as_ref().map(|_| "***"))
            .field("server_name", &self.server_name)
            .field("sni", &self.sni)
            .finish()
    }
}

impl PostgresTls {
    /// `mode` against `server_name`, with libpq's default files.
    pub fn new(mode: SslMode, server_name: impl Into<String>) -> Self {
        PostgresTls {
            mode,
            root_certs: RootCerts::Default,
            client_cert: None,
            client_key: None,
            key_password: None,
            server_name: server_name.into(),
            sni: true,
            loaded: Arc::default(),
        }
    }

    /// No TLS: the tunnel copies bytes untouched (and the pool's URL keeps its own `sslmode`).
    pub fn disabled() -> Self {
        Self::new(SslMode::Disable, "")
    }

    /// The settings `database_url` asks for (see the [module docs](self)), with libpq's
    /// environment fallbacks `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`.
    ///
    /// Errors are [`Error::Config`] naming the parameter (never a value that may be secret).
    /// Files are not read here; the tunnel reads them when it starts.
    pub fn from_database_url(database_url: &str) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_url_with_env(database_url, env)
    }

    pub(crate) fn from_url_with_env(database_url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let params = query_params(database_url);
        // sqlx's parser, like libpq's, lets the last occurrence win.
        let get = |names: &[&str]| {
            params
                .iter()
                .rev()
                .find(|(k, _)| names.contains(&k.as_str()))
                .map(|(_, v)| v.clone())
        };
        let mode_param = get(&["sslmode", "ssl-mode"]).or_else(|| env("PGSSLMODE"));
        let root = get(&["sslrootcert", "ssl-root-cert", "ssl-ca"]).or_else(|| env("PGSSLROOTCERT"));
        let root_certs = match root.as_deref() {
            None | Some("") => RootCerts::Default,
            Some("system") => RootCerts::System,
            Some(path) => RootCerts::File(expand_home(path)),
        };
        let mode = match mode_param.as_deref() {
            Some(m) => m.parse()?,
            // libpq: `sslrootcert=system` makes verify-full the default.
            None if root_certs == RootCerts::System => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root_certs == RootCerts::System && mode != SslMode::VerifyFull && mode != SslMode::Disable {
            return Err(Error::config(
                format!("{FIELD} sslrootcert"),
                format!(
                    "sslrootcert=system needs sslmode=verify-full (got sslmode={mode}): the public roots \
                     vouch for names, not for a particular server"
                ),
            ));
        }
        if let Some(neg) = get(&["sslnegotiation"])
            && neg != "postgres"
        {
            return Err(Error::config(
                format!("{FIELD} sslnegotiation"),
                format!(
                    "{neg:?} is not supported: the tunnel negotiates TLS with an SSLRequest (sslnegotiation=postgres)"
                ),
            ));
        }
        let sni = match get(&["sslsni"]).as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(Error::config(
                    format!("{FIELD} sslsni"),
                    format!("{other:?} is not 0 or 1"),
                ));
            }
        };
        let host_param = get(&["host"]).filter(|h| !h.is_empty() && !h.starts_with('/'));
        let server_name = get(&["sslservername"])
            .filter(|n| !n.is_empty())
            .or(host_param)
            .or_else(|| authority_host(database_url))
            .unwrap_or_default();
        Ok(PostgresTls {
            mode,
            root_certs,
            client_cert: get(&["sslcert", "ssl-cert"])
                .or_else(|| env("PGSSLCERT"))
                .map(|p| expand_home(&p)),
            client_key: get(&["sslkey", "ssl-key"])
                .or_else(|| env("PGSSLKEY"))
                .map(|p| expand_home(&p)),
            key_password: get(&["sslpassword"]).map(SecretString::from),
            server_name,
            sni,
            loaded: Arc::default(),
        })
    }

    /// `sslrootcert=<file>`.
    #[must_use]
    pub fn root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_certs = RootCerts::File(path.into());
        self.loaded = Arc::default();
        self
    }

    /// `sslrootcert=system`.
    #[must_use]
    pub fn system_roots(mut self) -> Self {
        self.root_certs = RootCerts::System;
        self.loaded = Arc::default();
        self
    }

    /// `sslcert` + `sslkey`: authenticate with this client certificate.
    #[must_use]
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some(cert.into());
        self.client_key = Some(key.into());
        self.loaded = Arc::default();
        self
    }

    /// `sslpassword`: the passphrase of an encrypted PKCS#8 client key.
    #[must_use]
    pub fn key_password(mut self, password: impl Into<String>) -> Self {
        self.key_password = Some(SecretString::from(password.into()));
        self.loaded = Arc::default();
        self
    }

    /// `sslservername`: the name the certificate must carry.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self.loaded = Arc::default();
        self
    }

    /// Whether the tunnel negotiates with the server at all (`sslmode` is not `disable`).
    pub fn is_enabled(&self) -> bool {
        self.mode != SslMode::Disable
    }

    /// Reads the files and builds the TLS client once (later calls, and clones, share it).
    /// Errors name the file or the parameter; they are permanent.
    pub fn validate(&self) -> Result<()> {
        self.load().map(|_| ())
    }

    /// The latest TLS session the tunnel negotiated with these settings, `None` before the
    /// first (or when every server answered `N` under `prefer`).
    pub fn last_session(&self) -> Option<TlsSession> {
        let loaded = self.loaded.get()?;
        load::lock(&loaded.last).clone()
    }

    pub(crate) fn load(&self) -> Result<Arc<Loaded>> {
        if let Some(loaded) = self.loaded.get() {
            return Ok(loaded.clone());
        }
        let loaded = Arc::new(Loaded::new(self)?);
        Ok(self.loaded.get_or_init(|| loaded).clone())
    }
}

/// The tunnel `config` runs with: `tunnel` with its [`postgres_tls`](TunnelConfig::postgres_tls)
/// taken from `DATABASE_URL` when unset (a `hostaddr` becomes the remote target when the remote
/// host came from the URL), and its files loaded, so a missing `sslrootcert` fails the start.
///
/// The [`ConnectionManager`](crate::ConnectionManager) and `sea-orm-tunnel forward` call this;
/// call it yourself before [`SshTunnel::connect`](crate::SshTunnel::connect) to get the same.
pub fn resolve_tunnel(config: &Config, tunnel: &TunnelConfig) -> Result<TunnelConfig> {
    let mut tunnel = tunnel.clone();
    if tunnel.postgres_tls.is_none() {
        let url = &*config.database_url_str();
        let tls = PostgresTls::from_database_url(url)?;
        if let Some(addr) = hostaddr(url)? {
            let written = authority_host(url).unwrap_or_default();
            if tunnel.remote_host == written || tunnel.remote_host == tls.server_name {
                tunnel.remote_host = addr;
            }
        }
        tunnel.postgres_tls = Some(tls);
    }
    if let Some(tls) = &tunnel.postgres_tls
        && tls.is_enabled()
    {
        tls.validate()?;
    }
    Ok(tunnel)
}

/// Whether the tunnel holds TLS to PostgreSQL (so a pool's URL must say `sslmode=disable`:
/// see [`local_database_url_tls_in_tunnel`](crate::url::local_database_url_tls_in_tunnel)).
pub fn tunnel_holds_tls(tunnel: &TunnelConfig) -> bool {
    tunnel.postgres_tls.as_ref().is_some_and(PostgresTls::is_enabled)
}

/// A direct connection (no tunnel) leaves TLS to sqlx, which verifies the host it dials: with
/// `hostaddr` that is the address, so `verify-full` cannot mean what libpq means. Refused.
pub(crate) fn check_direct(database_url: &str) -> Result<()> {
    // A multi-host URL's hostaddr list was checked where the URL is read: any address in it
    // is dialled directly.
    let listed = crate::url::url_host_addrs(database_url, FIELD)?
        .iter()
        .any(Option::is_some);
    if listed || hostaddr(&crate::url::first_host_url(database_url))?.is_some() {
        let tls = PostgresTls::from_database_url(database_url)?;
        if tls.mode == SslMode::VerifyFull {
            return Err(Error::config(
                format!("{FIELD} hostaddr"),
                "with sslmode=verify-full and no tunnel, sqlx would check the certificate against the \
                 hostaddr address instead of host: drop hostaddr, or connect through the tunnel (which \
                 connects to hostaddr and verifies host)",
            ));
        }
    }
    Ok(())
}

fn hostaddr(url: &str) -> Result<Option<String>> {
    let Some((_, addr)) = query_params(url).into_iter().rev().find(|(k, _)| k == "hostaddr") else {
        return Ok(None);
    };
    if addr.parse::<std::net::IpAddr>().is_err() {
        return Err(Error::config(
            format!("{FIELD} hostaddr"),
            format!("{addr:?} is not an IP address"),
        ));
    }
    Ok(Some(addr))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), home()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(path),
    }
}

/// `~/.postgresql/<name>` when it exists.
fn default_file(name: &str) -> Option<PathBuf> {
    home()
        .map(|h| h.join(".postgresql").join(name))
        .filter(|p| Path::new(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<PostgresTls> {
        PostgresTls::from_url_with_env(url, |_| None)
    }

    #[test]
    fn sslmode_spellings_and_default() {
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("VERIFY-FULL", SslMode::VerifyFull),
        ] {
            assert_eq!(s.parse::<SslMode>().unwrap(), m);
            assert_eq!(parse(&format!("postgres://u@h/db?sslmode={s}")).unwrap().mode, m);
        }
        assert_eq!(parse("postgres://u@h/db").unwrap().mode, SslMode::Prefer);
        let e = parse("postgres://u@h/db?sslmode=verify").unwrap_err();
        assert!(
            matches!(e, Error::Config { .. }) && e.to_string().contains("sslmode"),
            "{e}"
        );
        assert!(!e.is_transient());
        // The last one wins, as in sqlx.
        assert_eq!(
            parse("postgres://u@h/db?sslmode=disable&sslmode=require").unwrap().mode,
            SslMode::Require
        );
        assert!(SslMode::Require.requires_tls() && !SslMode::Prefer.requires_tls());
    }

    #[test]
    fn environment_fallbacks() {
        let env = |k: &str| match k {
            "PGSSLMODE" => Some("verify-ca".to_owned()),
            "PGSSLROOTCERT" => Some("/etc/ca.pem".to_owned()),
            _ => None,
        };
        let tls = PostgresTls::from_url_with_env("postgres://u@h/db", env).unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_certs, RootCerts::File("/etc/ca.pem".into()));
        let tls = PostgresTls::from_url_with_env("postgres://u@h/db?sslmode=require", env).unwrap();
        assert_eq!(tls.mode, SslMode::Require, "the URL wins over the environment");
    }

    #[test]
    fn server_name_override_host_and_authority() {
        assert_eq!(
            parse("postgres://u@db.internal:5432/db").unwrap().server_name,
            "db.internal"
        );
        assert_eq!(parse("postgres://u@[::1]:5432/db").unwrap().server_name, "::1");
        assert_eq!(
            parse("postgres://u@10.0.0.5/db?sslservername=db.internal")
                .unwrap()
                .server_name,
            "db.internal"
        );
        assert_eq!(
            parse("postgres://u@x/db?host=db.internal&hostaddr=10.0.0.5")
                .unwrap()
                .server_name,
            "db.internal"
        );
        assert_eq!(
            parse("postgres://u@x/db?host=/var/run/postgresql").unwrap().server_name,
            "x"
        );
    }

    #[test]
    fn files_and_password() {
        let tls =
            parse("postgres://u@h/db?sslrootcert=/ca.pem&sslcert=/c.crt&sslkey=/c.key&sslpassword=p%40ss&sslsni=0")
                .unwrap();
        assert_eq!(tls.root_certs, RootCerts::File("/ca.pem".into()));
        assert_eq!(tls.client_cert.as_deref(), Some(Path::new("/c.crt")));
        assert_eq!(tls.client_key.as_deref(), Some(Path::new("/c.key")));
        use secrecy::ExposeSecret;
        assert_eq!(tls.key_password.as_ref().unwrap().expose_secret(), "p@ss");
        assert!(!tls.sni);
        let debug = format!("{tls:?}");
        assert!(!debug.contains("p@ss"), "{debug}");
    }

    #[test]
    fn system_roots_mean_verify_full() {
        let tls = parse("postgres://u@h/db?sslrootcert=system").unwrap();
        assert_eq!((tls.mode, tls.root_certs), (SslMode::VerifyFull, RootCerts::System));
        let e = parse("postgres://u@h/db?sslrootcert=system&sslmode=require").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn unsupported_parameters_are_named() {
        let e = parse("postgres://u@h/db?sslnegotiation=direct").unwrap_err();
        assert!(e.to_string().contains("sslnegotiation"), "{e}");
        let e = parse("postgres://u@h/db?sslsni=yes").unwrap_err();
        assert!(e.to_string().contains("sslsni"), "{e}");
    }

    #[test]
    fn hostaddr_needs_the_tunnel_for_verify_full() {
        assert!(check_direct("postgres://u@db.internal/db?hostaddr=10.0.0.5&sslmode=require").is_ok());
        let e = check_direct("postgres://u@db.internal/db?hostaddr=10.0.0.5&sslmode=verify-full").unwrap_err();
        assert!(e.to_string().contains("hostaddr"), "{e}");
        let e = check_direct("postgres://u@db.internal/db?hostaddr=db").unwrap_err();
        assert!(e.to_string().contains("not an IP address"), "{e}");
    }
}
