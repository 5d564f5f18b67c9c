//! The SeaORM [`ConnectOptions`] of the managed pool.
//!
//! What is set, and why:
//!
//! - the URL points at the tunnel's local endpoint (loopback TCP, or the private Unix socket
//!   directory + the remote port), or stays as configured for a direct connection;
//! - `max_connections`, `min_connections`, `idle_timeout`, `acquire_timeout` (= sqlx's only
//!   connect bound, DESIGN §7.7), `max_lifetime` from [`PoolConfig`](crate::config::PoolConfig)
//!   (the hooks read the last two back, so a value set later on the SeaORM options wins);
//! - sqlx statement logging off (the crate's own events say what happened to connections);
//! - the session settings as PostgreSQL startup options (`-c role=...`, `statement_timeout`,
//!   `idle_in_transaction_session_timeout`, `default_transaction_read_only`): in force from the
//!   first statement, no round trip;
//! - `application_name` = the configured prefix at startup, then the connection id per connection;
//! - no ping on every acquire (`test_before_acquire` off, DESIGN §7.8): only connections idle
//!   longer than `pool.test_if_idle_for` are pinged;
//! - our per-connection hooks (see [`hooks`](super::hooks)): connection ids, the generation rule,
//!   jittered lifetimes, checkout tracking.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sea_orm::ConnectOptions;
use secrecy::{ExposeSecret, SecretString};

use super::hooks::{self, Hooks};
use crate::config::{Config, SessionSettings};
use crate::error::{Error, Result};
use crate::tunnel::LocalEndpoint;

/// Where the pool connects.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `DATABASE_URL` as configured.
    Direct,
    /// The tunnel's loopback listener.
    Tcp(SocketAddr),
    /// The tunnel's Unix socket: its directory, and the port in its file name.
    Unix { dir: PathBuf, port: u16 },
}

impl Endpoint {
    pub(crate) fn from_tunnel(endpoint: &LocalEndpoint, remote_port: u16) -> Endpoint {
        match endpoint {
            LocalEndpoint::Tcp(addr) => Endpoint::Tcp(*addr),
            LocalEndpoint::Unix(path) => Endpoint::Unix {
                dir: path.parent().map(PathBuf::from).unwrap_or_default(),
                port: remote_port,
            },
        }
    }
}

/// Builds the options; `hooks` are installed on the sqlx pool options.
pub(crate) fn connect_options(config: &Config, endpoint: &Endpoint, hooks: Arc<Hooks>) -> Result<ConnectOptions> {
    let pool = &config.pool;
    let mut options = base_options(config, endpoint)?;
    options
        .max_connections(pool.max_connections)
        .min_connections(pool.min_connections)
        .max_lifetime(pool.max_lifetime)
        .test_before_acquire(false)
        .set_application_name(pool.application_name.clone());
    options.map_sqlx_postgres_pool_opts(move |o| hooks::install(&hooks, o));
    Ok(options)
}

/// The connection log's own pool: one connection (opened when the first batch is written),
/// `application_name` `<prefix>-log`, the session settings (startup options, as for the managed
/// pool), and a ping before each use (the
/// writer is in the background, so a stale connection after a reconnect costs a round trip,
/// not an error).
///
/// Separate from the managed pool so that shutdown can refuse every application acquisition
/// at once while the log is still flushed, and so the log never takes an application's slot.
pub(crate) fn sink_connect_options(config: &Config, endpoint: &Endpoint) -> Result<ConnectOptions> {
    let mut options = base_options(config, endpoint)?;
    options
        .max_connections(1)
        .min_connections(0)
        .test_before_acquire(true)
        .set_application_name(format!("{}-log", config.pool.application_name));
    Ok(options)
}

/// What both pools share: the URL (pointed at the tunnel), the password handed over out of
/// band, the session settings, timeouts, quiet sqlx logging.
fn base_options(config: &Config, endpoint: &Endpoint) -> Result<ConnectOptions> {
    // Validates the URL (the error never repeats the password).
    config.database_options()?;
    let original = config.database_url_str();
    let url = match endpoint {
        Endpoint::Direct => original.to_string(),
        Endpoint::Tcp(addr) => rewrite_authority(original, &addr.to_string())?,
        Endpoint::Unix { dir, port } => {
            let url = rewrite_authority(original, &format!("localhost:{port}"))?;
            append_query(&url, "host", &percent_encode(&dir.to_string_lossy()))
        }
    };
    // The password never travels inside the URL: SeaORM keeps the URL in `ConnectOptions`, whose
    // derived `Debug` is recorded by its own trace-level instrumentation (and printed by anyone
    // who debug-prints the options). It is handed to sqlx directly instead.
    let (url, password) = split_password(&url);
    let pool = &config.pool;
    let mut options = ConnectOptions::new(url);
    options
        .idle_timeout(pool.idle_timeout)
        .connect_timeout(pool.connect_timeout)
        .acquire_timeout(pool.acquire_timeout)
        .sqlx_logging(false);
    // The URL above already points there; setting it on the parsed options as well keeps it
    // right even if the URL carries its own `host=`/`port=` query parameters.
    let target = endpoint.clone();
    let session = session_options(&config.session);
    options.map_sqlx_postgres_opts(move |o| {
        // Appended after what SeaORM set (its own `statement_timeout`), so ours win where both are set.
        let o = o.options(session.iter().map(|(k, v)| (k, v)));
        let o = match &target {
            Endpoint::Direct => o,
            Endpoint::Tcp(addr) => o.host(&addr.ip().to_string()).port(addr.port()),
            Endpoint::Unix { dir, port } => o.socket(dir).port(*port),
        };
        match &password {
            Some(password) => o.password(password.expose_secret()),
            None => o,
        }
    });
    Ok(options)
}

/// The session settings as startup options: `(name, value)` for `-c name=value`. PostgreSQL
/// applies each before the first statement; `role` takes the role's name as is (no quoting).
pub(crate) fn session_options(session: &SessionSettings) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(role) = &session.role {
        out.push(("role", role.clone()));
    }
    if let Some(t) = session.statement_timeout {
        out.push(("statement_timeout", t.as_millis().to_string()));
    }
    if let Some(t) = session.idle_in_transaction_session_timeout {
        out.push(("idle_in_transaction_session_timeout", t.as_millis().to_string()));
    }
    if session.read_only {
        out.push(("default_transaction_read_only", "on".to_owned()));
    }
    out
}

/// Replaces `host[:port]` of a `scheme://[userinfo@]host[:port]/...` URL.
fn rewrite_authority(url: &str, host_port: &str) -> Result<String> {
    let bad = || {
        Error::config(
            "database_url",
            "expected postgres://[user[:password]@]host[:port]/database",
        )
    };
    let scheme_end = url.find("://").ok_or_else(bad)? + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let userinfo_end = authority.rfind('@').map_or(0, |i| i + 1);
    Ok(format!(
        "{}{}{}{}",
        &url[..scheme_end],
        &authority[..userinfo_end],
        host_port,
        &rest[authority_end..]
    ))
}

/// Removes the password from a `scheme://user:password@host/...` URL (and a `password=` query
/// parameter), returning the URL without it and the percent-decoded password.
fn split_password(url: &str) -> (String, Option<SecretString>) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), None);
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut password = None;
    let mut out = url[..scheme_end].to_owned();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, pw)) => {
                    password = Some(percent_decode(pw));
                    out.push_str(user);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| match pair.strip_prefix("password=") {
                    Some(pw) => {
                        password = Some(percent_decode(pw));
                        false
                    }
                    None => true,
                })
                .collect();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    (out, password.map(SecretString::from))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn append_query(url: &str, key: &str, value: &str) -> String {
    let (base, fragment) = match url.find('#') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{key}={value}{fragment}")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_password_is_taken_out_of_the_url() {
        let (url, pw) = split_password("postgres://u:p%40ss@127.0.0.1:5432/app?sslmode=disable");
        assert_eq!(url, "postgres://u@127.0.0.1:5432/app?sslmode=disable");
        assert_eq!(pw.unwrap().expose_secret(), "p@ss");
        let (url, pw) = split_password("postgres://u@h/app?password=s%3Dcret&sslmode=disable");
        assert_eq!(url, "postgres://u@h/app?sslmode=disable");
        assert_eq!(pw.unwrap().expose_secret(), "s=cret");
        let (url, pw) = split_password("postgres://h/app?password=x");
        assert_eq!(url, "postgres://h/app");
        assert_eq!(pw.unwrap().expose_secret(), "x");
        let (url, pw) = split_password("postgres://u@h:1/app");
        assert_eq!(url, "postgres://u@h:1/app");
        assert!(pw.is_none());
    }

    #[test]
    fn connect_options_debug_has_no_password() {
        let config = Config::new("postgres://app:hunter2-secret@db.internal:5432/app");
        let hooks = Arc::new(Hooks::new(&config.pool, Default::default(), Default::default()));
        let options = connect_options(&config, &Endpoint::Tcp("127.0.0.1:40000".parse().unwrap()), hooks).unwrap();
        let debug = format!("{options:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("127.0.0.1:40000"), "{debug}");
    }

    #[test]
    fn session_settings_become_startup_options() {
        let s = SessionSettings::new()
            .role("app \"ro\"")
            .statement_timeout(Duration::from_secs(5))
            .idle_in_transaction_session_timeout(Duration::from_millis(1500))
            .read_only(true);
        let pg = sea_orm::sqlx::postgres::PgConnectOptions::new().options(session_options(&s));
        assert_eq!(
            pg.get_options(),
            Some(
                "-c role=app\\ \"ro\" -c statement_timeout=5000 \
                 -c idle_in_transaction_session_timeout=1500 -c default_transaction_read_only=on"
            )
        );
        assert!(session_options(&SessionSettings::new()).is_empty());
    }

    #[test]
    fn authority_is_replaced_and_the_rest_kept() {
        assert_eq!(
            rewrite_authority("postgres://u:p@db.internal:5432/app?sslmode=disable", "127.0.0.1:40000").unwrap(),
            "postgres://u:p@127.0.0.1:40000/app?sslmode=disable"
        );
        assert_eq!(
            rewrite_authority("postgres://u:p%40x@[::1]:5432/app", "127.0.0.1:1").unwrap(),
            "postgres://u:p%40x@127.0.0.1:1/app"
        );
        assert_eq!(
            rewrite_authority("postgres://h", "127.0.0.1:2").unwrap(),
            "postgres://127.0.0.1:2"
        );
        assert!(rewrite_authority("nonsense", "x").is_err());
    }

    #[test]
    fn unix_socket_dir_goes_into_the_query() {
        let url = append_query(
            "postgres://u@localhost:5432/app?x=1#f",
            "host",
            &percent_encode("/tmp/a b"),
        );
        assert_eq!(url, "postgres://u@localhost:5432/app?x=1&host=%2Ftmp%2Fa%20b#f");
        let parsed: sea_orm::sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        assert_eq!(
            parsed.get_socket().map(|p| p.to_string_lossy().into_owned()).as_deref(),
            Some("/tmp/a b")
        );
    }
}
