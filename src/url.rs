//! Database URLs: validation, redaction for logs, the URL through the tunnel's local endpoint,
//! and the password taken out of a URL.
//!
//! Every function here reads a `postgres://` URL the way sqlx's parser (the `url` crate) does, so
//! a rewritten URL means to sqlx what the original meant: the authority ends at the first `/`,
//! `?` or `#` after `://`, the user info ends at the *last* `@` inside the authority, and the
//! password starts after the first `:` of the user info. A password may therefore hold `@` and
//! `:` as they are; `/`, `?`, `#` and `%` must be percent-encoded (`%2F`, `%3F`, `%23`, `%25`).
//! [`redact_url`] is the exception: it must hide a password in *any* input, so where a URL is
//! malformed it hides more rather than less.
//!
//! ```
//! use sea_orm_tunnel::LocalEndpoint;
//! use sea_orm_tunnel::url::{local_database_url, redact_url};
//!
//! let endpoint = LocalEndpoint::Tcp(([127, 0, 0, 1], 40000).into());
//! let url = local_database_url("postgres://app:s3cret@db.internal:5432/app?sslmode=disable", &endpoint, 5432)?;
//! assert_eq!(url, "postgres://app:s3cret@127.0.0.1:40000/app?sslmode=disable");
//! assert_eq!(redact_url(&url), "postgres://app:***@127.0.0.1:40000/app?sslmode=disable");
//! # Ok::<(), sea_orm_tunnel::Error>(())
//! ```

use std::borrow::Cow;
use std::str::FromStr;

use sea_orm::sqlx::postgres::PgConnectOptions;
use secrecy::SecretString;

use crate::config::TargetSessionAttrs;
use crate::tunnel::LocalEndpoint;
use crate::{Error, Result};

/// Query parameters that choose the server (sqlx reads `host`, `hostaddr` and `port` from the
/// query and lets them override the authority); dropped when the URL is pointed elsewhere.
const TARGET_PARAMS: [&str; 3] = ["host", "hostaddr", "port"];

/// Query parameters only this crate reads; never passed on to sqlx (which would log an
/// unknown one with its value). `target_session_attrs` is libpq's, which sqlx does not implement.
const CRATE_PARAMS: [&str; 4] = ["sslpassword", "sslservername", "pgbouncer", "target_session_attrs"];

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses a `postgres://` URL, naming `field` in errors and never echoing the password.
pub(crate) fn parse_database_url(url: &str, field: &str) -> Result<PgConnectOptions> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::config(
            field,
            "is not set (expected postgres://user:password@host:port/database)",
        ));
    }
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") => {}
        Some(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) => {
            return Err(Error::config(
                field,
                format!("scheme {s:?} is not postgres:// or postgresql:// (PostgreSQL is the only database supported)"),
            ));
        }
        _ => {
            return Err(Error::config(
                field,
                "is not a URL: expected postgres://user:password@host:port/database (value not shown: it may contain a password)",
            ));
        }
    }
    // Several hosts (`a:5432,b:5433`, `host=a,b`): sqlx reads one, so it is given the first;
    // the list itself is checked here so a bad entry fails where the URL is read. The crate's
    // own parameters never reach sqlx, which logs an unknown one with its value (`sslpassword`).
    let hosts = url_hosts(url, field)?;
    url_host_addrs(url, field)?;
    let stripped = without_crate_params(url);
    let first;
    let url = match hosts.as_slice() {
        [first_host, _, ..] => {
            first = with_host(&stripped, &first_host.0, first_host.1);
            first.as_str()
        }
        _ => stripped.as_str(),
    };
    PgConnectOptions::from_str(url).map_err(|e| {
        // sqlx's messages name the part that failed (port, sslmode, UTF-8), never the password.
        // An '@' after the authority usually means a '/', '?' or '#' in the password ended it early.
        let hint = match Parts::split(url) {
            Some(p) if p.after_authority().contains('@') => {
                "; a '/', '?' or '#' in the password must be percent-encoded (%2F, %3F, %23)"
            }
            _ => "",
        };
        Error::config(
            field,
            format!("is not a valid PostgreSQL URL: {e}{hint} (value not shown: it may contain a password)"),
        )
    })
}

/// TCP host and port of parsed options; `None` for a Unix socket.
pub(crate) fn tcp_target(options: &PgConnectOptions) -> Option<(String, u16)> {
    if options.get_socket().is_some() {
        return None;
    }
    let host = options.get_host();
    // sqlx falls back to a socket directory (e.g. /var/run/postgresql) as the "host" when the
    // URL names none and a local server's socket exists.
    if host.is_empty() || host.starts_with('/') {
        return None;
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((host.to_owned(), options.get_port()))
}

// ---------------------------------------------------------------------------------------------
// The URL through the local endpoint
// ---------------------------------------------------------------------------------------------

/// `database_url` pointed at the tunnel's local endpoint, everything else kept: user, password,
/// database, query parameters and fragment, byte for byte.
///
/// - [`LocalEndpoint::Tcp`]: `host[:port]` becomes the endpoint's address (`127.0.0.1:40000`,
///   or `[::1]:40000`).
/// - [`LocalEndpoint::Unix`]: the authority becomes `localhost:<remote_port>` and the socket's
///   directory is added as a percent-encoded `host=` query parameter, which libpq and sqlx read
///   as a socket directory. The port names the socket file (`.s.PGSQL.<remote_port>`), so it must
///   be the remote port the tunnel was opened for.
///
/// `host`, `hostaddr` and `port` query parameters of the original are dropped: sqlx lets them
/// override the authority, which would bypass the endpoint.
///
/// The result contains the password: pass it to [`redact_url`] before showing it. Errors are
/// [`Error::Config`] for `database_url` (the URL must be a valid `postgres://` URL) and never
/// repeat the password.
pub fn local_database_url(database_url: &str, endpoint: &LocalEndpoint, remote_port: u16) -> Result<String> {
    local_url(database_url, endpoint, remote_port, false)
}

/// [`local_database_url`] for a tunnel that holds TLS to PostgreSQL itself (see
/// [`crate::tls`]): the TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
/// `sslpassword`, every other `ssl*` one, and `gssencmode`) are dropped and `sslmode=disable`
/// is added. The pool speaks plaintext to the tunnel's private local endpoint; the tunnel speaks
/// TLS to the server, checking the name the user wrote.
///
/// ```
/// use sea_orm_tunnel::LocalEndpoint;
/// use sea_orm_tunnel::url::local_database_url_tls_in_tunnel;
///
/// let endpoint = LocalEndpoint::Tcp(([127, 0, 0, 1], 40000).into());
/// let url = local_database_url_tls_in_tunnel(
///     "postgres://app@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
///     &endpoint,
///     5432,
/// )?;
/// assert_eq!(url, "postgres://app@127.0.0.1:40000/app?application_name=x&sslmode=disable");
/// # Ok::<(), sea_orm_tunnel::Error>(())
/// ```
pub fn local_database_url_tls_in_tunnel(
    database_url: &str,
    endpoint: &LocalEndpoint,
    remote_port: u16,
) -> Result<String> {
    local_url(database_url, endpoint, remote_port, true)
}

/// Whether a query parameter configures TLS or GSSAPI encryption (dropped from the local URL
/// when the tunnel holds TLS).
fn is_encryption_param(name: &str) -> bool {
    name.starts_with("ssl") || matches!(name, "gssencmode" | "requiressl")
}

/// The URL of [`local_database_url`] for a tunnel that forwards to several database servers
/// (a multi-host `DATABASE_URL`, [`SshTunnel::target_endpoints`](crate::SshTunnel::target_endpoints)),
/// in libpq's multi-host syntax: every `(endpoint, remote port)` in order, so that a libpq
/// client (psql, pgbench, psycopg, JDBC's own list) tries them as it would have tried the
/// servers, and `target_session_attrs` (the attribute in force, e.g.
/// [`Config::resolve_target_session_attrs`](crate::config::Config::resolve_target_session_attrs),
/// written into the URL unless it is `any`) chooses among them.
///
/// - TCP endpoints: the authority lists them, `127.0.0.1:40001,127.0.0.1:40002`.
/// - Unix sockets: the authority is `localhost`; `host=` lists the socket directories and
///   `port=` the remote ports that name the socket files, in the same order.
///
/// `tls_in_tunnel` drops the TLS parameters and adds `sslmode=disable`, as
/// [`local_database_url_tls_in_tunnel`] does. With one endpoint this is exactly
/// [`local_database_url`] or [`local_database_url_tls_in_tunnel`] (no `target_session_attrs`:
/// the one server is the choice). sqlx reads one host only:
/// this URL is for libpq clients, a SeaORM pool uses the manager, which fails over by itself.
///
/// ```
/// use sea_orm_tunnel::LocalEndpoint;
/// use sea_orm_tunnel::config::TargetSessionAttrs;
/// use sea_orm_tunnel::url::local_database_url_hosts;
///
/// let a = LocalEndpoint::Tcp(([127, 0, 0, 1], 40001).into());
/// let b = LocalEndpoint::Tcp(([127, 0, 0, 1], 40002).into());
/// let url = local_database_url_hosts(
///     "postgres://app@db1:5432,db2:5432/app?target_session_attrs=read-write",
///     &[(a, 5432), (b, 5432)],
///     false,
///     TargetSessionAttrs::ReadWrite,
/// )?;
/// assert_eq!(url, "postgres://app@127.0.0.1:40001,127.0.0.1:40002/app?target_session_attrs=read-write");
/// # Ok::<(), sea_orm_tunnel::Error>(())
/// ```
pub fn local_database_url_hosts(
    database_url: &str,
    endpoints: &[(LocalEndpoint, u16)],
    tls_in_tunnel: bool,
    target_session_attrs: TargetSessionAttrs,
) -> Result<String> {
    match endpoints {
        [] => Err(Error::config("local endpoint", "no local endpoint to point the URL at")),
        [(endpoint, remote_port)] => local_url(database_url, endpoint, *remote_port, tls_in_tunnel),
        _ => local_url_hosts(database_url, endpoints, tls_in_tunnel, target_session_attrs),
    }
}

/// The query of the local URL: the original's, less what chooses the server, the crate's own
/// parameters and, when the tunnel holds TLS, the encryption ones.
fn local_query<'a>(parts: &Parts<'a>, tunnel_tls: bool) -> Vec<Cow<'a, str>> {
    let mut query: Vec<Cow<'_, str>> = parts
        .query_pairs()
        .filter(|pair| {
            let name = param_name(pair);
            let dropped = TARGET_PARAMS.contains(&name.as_str())
                || CRATE_PARAMS.contains(&name.as_str())
                || (tunnel_tls && is_encryption_param(&name));
            !dropped
        })
        .map(Cow::Borrowed)
        .collect();
    if tunnel_tls {
        query.push(Cow::Borrowed("sslmode=disable"));
    }
    query
}

/// The URL's parts, once [`parse_database_url`] accepted it.
fn checked_parts(database_url: &str) -> Result<Parts<'_>> {
    parse_database_url(database_url, "database_url")?;
    // Validation above accepted the URL, so it has a scheme and an authority.
    Parts::split(database_url.trim()).ok_or_else(|| {
        Error::config(
            "database_url",
            "expected postgres://[user[:password]@]host[:port]/database",
        )
    })
}

/// A Unix endpoint's socket directory, as a URL names it, after checking that `remote_port`
/// names its socket file.
fn socket_dir(endpoint: &LocalEndpoint, path: &std::path::Path, remote_port: u16) -> Result<String> {
    let socket_port = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(".s.PGSQL."))
        .and_then(|p| p.parse::<u16>().ok());
    if socket_port.is_some_and(|p| p != remote_port) {
        return Err(Error::config(
            "remote_port",
            format!(
                "{remote_port} does not name the socket {} (the port is part of its file name)",
                path.display()
            ),
        ));
    }
    endpoint
        .unix_dir()
        .filter(|d| !d.as_os_str().is_empty())
        .and_then(|d| d.to_str())
        .map(percent_encode)
        .ok_or_else(|| {
            Error::config(
                "local endpoint",
                format!("{} has no UTF-8 directory to name in a URL", path.display()),
            )
        })
}

fn local_url(database_url: &str, endpoint: &LocalEndpoint, remote_port: u16, tunnel_tls: bool) -> Result<String> {
    let parts = checked_parts(database_url)?;
    let mut query = local_query(&parts, tunnel_tls);
    let host_port = match endpoint {
        LocalEndpoint::Tcp(addr) => addr.to_string(),
        LocalEndpoint::Unix(path) => {
            query.push(Cow::Owned(format!("host={}", socket_dir(endpoint, path, remote_port)?)));
            format!("localhost:{remote_port}")
        }
    };
    Ok(parts.join(parts.userinfo, &host_port, &query))
}

fn local_url_hosts(
    database_url: &str,
    endpoints: &[(LocalEndpoint, u16)],
    tunnel_tls: bool,
    attrs: TargetSessionAttrs,
) -> Result<String> {
    let parts = checked_parts(database_url)?;
    let mut query = local_query(&parts, tunnel_tls);
    if attrs != TargetSessionAttrs::Any {
        query.push(Cow::Owned(format!("target_session_attrs={attrs}")));
    }
    let mut tcp = Vec::new();
    let (mut dirs, mut ports) = (Vec::new(), Vec::new());
    for (endpoint, remote_port) in endpoints {
        match endpoint {
            LocalEndpoint::Tcp(addr) => tcp.push(addr.to_string()),
            LocalEndpoint::Unix(path) => {
                let dir = socket_dir(endpoint, path, *remote_port)?;
                // libpq splits the list at commas after percent-decoding.
                if dir.contains("%2C") {
                    return Err(Error::config(
                        "local endpoint",
                        format!(
                            "{} has a comma in its directory, which a host list cannot hold",
                            path.display()
                        ),
                    ));
                }
                dirs.push(dir);
                ports.push(remote_port.to_string());
            }
        }
    }
    let host_port = match (tcp.is_empty(), dirs.is_empty()) {
        (false, true) => tcp.join(","),
        (true, false) => {
            query.push(Cow::Owned(format!("host={}", dirs.join(","))));
            query.push(Cow::Owned(format!("port={}", ports.join(","))));
            "localhost".to_owned()
        }
        _ => {
            return Err(Error::config(
                "local endpoint",
                "mixes TCP ports and Unix sockets, which one URL cannot list",
            ));
        }
    };
    Ok(parts.join(parts.userinfo, &host_port, &query))
}

// ---------------------------------------------------------------------------------------------
// The password out of the URL
// ---------------------------------------------------------------------------------------------

/// Takes the password out of a URL: returns the URL without it (no `:password` in the user
/// info, no `password=` query parameter) and the percent-decoded password, for code that hands
/// the password to sqlx separately so the URL it keeps (and may log) has none.
///
/// As in sqlx, a `password=` query parameter wins over the user info's, and the last one wins.
/// A string that is not a `scheme://` URL is returned unchanged, without a password.
pub(crate) fn split_password(url: &str) -> (String, Option<SecretString>) {
    let url = url.trim();
    let Some(parts) = Parts::split(url) else {
        return (url.to_owned(), None);
    };
    let mut password = None;
    let user = parts.userinfo.map(|info| match info.split_once(':') {
        Some((user, pw)) => {
            // As the URL parser does, an empty password is none.
            password = Some(percent_decode(pw, false)).filter(|p| !p.is_empty());
            user
        }
        None => info,
    });
    let query: Vec<Cow<'_, str>> = parts
        .query_pairs()
        .filter(|pair| {
            if param_name(pair) != "password" {
                return true;
            }
            let value = pair.split_once('=').map_or("", |(_, v)| v);
            password = Some(percent_decode(value, true));
            false
        })
        .map(Cow::Borrowed)
        .collect();
    (
        parts.join(user, parts.host_port, &query),
        password.map(SecretString::from),
    )
}

// ---------------------------------------------------------------------------------------------
// Parts
// ---------------------------------------------------------------------------------------------

/// A `scheme://` URL cut into slices by sqlx's rules (see the module docs).
#[derive(Debug, PartialEq, Eq)]
struct Parts<'a> {
    /// Up to and including `://`.
    scheme: &'a str,
    /// Before the last `@` of the authority, without it.
    userinfo: Option<&'a str>,
    /// The rest of the authority: `host`, `host:port`, `[v6]:port`.
    host_port: &'a str,
    /// From the end of the authority up to `?` or `#`.
    path: &'a str,
    /// After `?`, up to `#`.
    query: Option<&'a str>,
    /// From `#` on, with it.
    fragment: &'a str,
}

impl<'a> Parts<'a> {
    fn split(url: &'a str) -> Option<Self> {
        let scheme_end = url.find("://")? + 3;
        let (scheme, rest) = url.split_at(scheme_end);
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_port) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (tail, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        Some(Parts {
            scheme,
            userinfo,
            host_port,
            path,
            query,
            fragment,
        })
    }

    /// Everything after the authority.
    fn after_authority(&self) -> String {
        let query = self.query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{}{query}{}", self.path, self.fragment)
    }

    /// The `name=value` pairs of the query, as written; empty pairs (`a=1&&b=2`) skipped.
    fn query_pairs(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
    }

    /// The URL with this user info, authority and query, and the original path and fragment.
    fn join(&self, userinfo: Option<&str>, host_port: &str, query: &[Cow<'_, str>]) -> String {
        let mut out = String::with_capacity(self.scheme.len() + host_port.len() + 64);
        out.push_str(self.scheme);
        if let Some(info) = userinfo {
            out.push_str(info);
            out.push('@');
        }
        out.push_str(host_port);
        out.push_str(self.path);
        if !query.is_empty() {
            out.push('?');
            out.push_str(&query.join("&"));
        }
        out.push_str(self.fragment);
        out
    }
}

/// The decoded name of a `name=value` query pair, as sqlx matches it.
fn param_name(pair: &str) -> String {
    percent_decode(pair.split_once('=').map_or(pair, |(name, _)| name), true)
}

/// Decodes `%XX` escapes (an invalid escape stays as written); with `plus_is_space`, `+` is a
/// space, as in a query string.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(match bytes[i] {
            b'+' if plus_is_space => b' ',
            b => b,
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes every byte except the unreserved ones (`A-Z a-z 0-9 - . _ ~`).
fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Query parameters and the host as written (for the TLS settings)
// ---------------------------------------------------------------------------------------------

/// The decoded `(name, value)` query parameters, in order, as sqlx's parser decodes them.
pub(crate) fn query_params(url: &str) -> Vec<(String, String)> {
    let Some(parts) = Parts::split(url.trim()) else {
        return Vec::new();
    };
    parts
        .query_pairs()
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name, true), percent_decode(value, true))
        })
        .collect()
}

/// The host of the URL's authority as written (percent-decoded, IPv6 brackets removed); `None`
/// when the authority names none.
pub(crate) fn authority_host(url: &str) -> Option<String> {
    let parts = Parts::split(url.trim())?;
    let hp = parts.host_port;
    let host = if let Some(rest) = hp.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        hp.rsplit_once(':').map_or(hp, |(h, _)| h)
    };
    let host = percent_decode(host, false);
    (!host.is_empty()).then_some(host)
}

/// The URL without the parameters only this crate reads ([`CRATE_PARAMS`]), for a direct
/// connection: sqlx would log an unknown parameter with its value.
pub(crate) fn without_crate_params(url: &str) -> String {
    let url = url.trim();
    let Some(parts) = Parts::split(url) else {
        return url.to_owned();
    };
    let query: Vec<Cow<'_, str>> = parts
        .query_pairs()
        .filter(|pair| !CRATE_PARAMS.contains(&param_name(pair).as_str()))
        .map(Cow::Borrowed)
        .collect();
    parts.join(parts.userinfo, parts.host_port, &query)
}

/// `pgbouncer=true|false` in `DATABASE_URL` (the parameter other tools use), if present. An
/// unreadable value is an error naming it.
pub(crate) fn pgbouncer_param(url: &str) -> Result<Option<bool>> {
    let Some(parts) = Parts::split(url.trim()) else {
        return Ok(None);
    };
    let mut found = None;
    for pair in parts.query_pairs() {
        if param_name(pair) != "pgbouncer" {
            continue;
        }
        let value = pair.split_once('=').map_or("", |(_, v)| v);
        found = Some(match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                return Err(Error::config(
                    "DATABASE_URL",
                    format!("pgbouncer={value:?} is not true or false"),
                ));
            }
        });
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Several hosts
// ---------------------------------------------------------------------------------------------

/// `host:port` for logs and errors, an IPv6 host in brackets (`[::1]:5432`).
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The TCP servers a URL names, in order, as libpq reads them: the authority's comma-separated
/// list (`a:5432,b:5433`, `[::1]:5432,b`), or the `host=` query list (`host=a,b`, which wins
/// over the authority, as it does for one host) with `port=` giving one port for all or one per
/// host. A host without a port takes the URL's single port, else 5432.
///
/// Empty unless the URL lists several hosts (one host is sqlx's to read, as before). Several
/// hosts with a socket directory among them, an empty entry, a bad port, a `port=` list of the
/// wrong length, or `hostaddr` (libpq's per-host address list is not supported) are errors
/// naming `field`; no part of the URL is repeated (it may hold the password).
pub(crate) fn url_hosts(url: &str, field: &str) -> Result<Vec<(String, u16)>> {
    let Some(parts) = Parts::split(url.trim()) else {
        return Ok(Vec::new());
    };
    let params = query_params(url);
    let last = |name: &str| params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let listed = match last("host") {
        Some(hosts) => hosts.contains(','),
        None => parts.host_port.contains(','),
    };
    if !listed {
        return Ok(Vec::new());
    }
    let bad = |what: String| Error::config(field, what);
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("lists a port that is not a port number (1-65535)".to_owned()))
    };
    let query_ports: Vec<String> = last("port")
        .map(|p| p.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_default();
    let entries: Vec<(String, Option<u16>)> = match last("host") {
        Some(hosts) => {
            let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
            if query_ports.len() > 1 && query_ports.len() != hosts.len() {
                return Err(bad(format!(
                    "port= lists {} ports for {} hosts (give one port for all, or one per host)",
                    query_ports.len(),
                    hosts.len()
                )));
            }
            let mut out = Vec::with_capacity(hosts.len());
            for (i, host) in hosts.iter().enumerate() {
                let port = match query_ports.get(if query_ports.len() > 1 { i } else { 0 }) {
                    Some(p) if !p.is_empty() => Some(parse_port(p)?),
                    _ => None,
                };
                out.push(((*host).to_owned(), port));
            }
            out
        }
        None => {
            let mut out = Vec::new();
            for entry in parts.host_port.split(',') {
                let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
                    match rest.split_once(']') {
                        Some((h, "")) => (h, None),
                        Some((h, p)) if p.starts_with(':') => (h, Some(&p[1..])),
                        _ => return Err(bad("lists an IPv6 host that is not [address]:port".to_owned())),
                    }
                } else {
                    match entry.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (entry, None),
                    }
                };
                let port = match port {
                    Some(p) => Some(parse_port(p)?),
                    None => None,
                };
                out.push((percent_decode(host, false), port));
            }
            out
        }
    };
    let default_port = match query_ports.as_slice() {
        [one] if !one.is_empty() => parse_port(one)?,
        _ => 5432,
    };
    let mut hosts = Vec::with_capacity(entries.len());
    for (host, port) in entries {
        if host.is_empty() {
            return Err(bad("has an empty entry in its host list".to_owned()));
        }
        if host.starts_with('/') {
            return Err(bad(
                "lists a socket directory among several hosts (only TCP hosts can be listed)".to_owned(),
            ));
        }
        hosts.push((host, port.unwrap_or(default_port)));
    }
    Ok(hosts)
}

/// libpq's `hostaddr` list for a multi-host URL: one entry per host of [`url_hosts`], in order,
/// `None` where the entry is empty (that host is dialled by its name). Empty unless the URL lists
/// several hosts and has `hostaddr`. A list of another length, or an entry that is not an IP
/// address, is an error naming `field`; no part of the URL is repeated.
pub(crate) fn url_host_addrs(url: &str, field: &str) -> Result<Vec<Option<String>>> {
    let hosts = url_hosts(url, field)?;
    let Some(list) = query_params(url)
        .into_iter()
        .rev()
        .find(|(k, _)| k == "hostaddr")
        .map(|(_, v)| v)
    else {
        return Ok(Vec::new());
    };
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    let addrs: Vec<&str> = list.split(',').map(str::trim).collect();
    if addrs.len() != hosts.len() {
        return Err(Error::config(
            field,
            format!(
                "hostaddr= lists {} addresses for {} hosts (give one per host, empty to dial that host by name)",
                addrs.len(),
                hosts.len()
            ),
        ));
    }
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| match *addr {
            "" => Ok(None),
            addr if addr.parse::<std::net::IpAddr>().is_ok() => Ok(Some(addr.to_owned())),
            _ => Err(Error::config(
                field,
                format!(
                    "hostaddr= entry {} (for host {}) is not an IP address",
                    i + 1,
                    hosts[i].0
                ),
            )),
        })
        .collect()
}

/// The URL naming one server: `url` itself, or for a multi-host URL its first host (with that
/// host's `hostaddr`, when the list gives one), as sqlx, which reads one host, is given it.
pub(crate) fn first_host_url(url: &str) -> Cow<'_, str> {
    match url_hosts(url, "database_url") {
        Ok(hosts) if hosts.len() > 1 => {
            let first = with_host(url, &hosts[0].0, hosts[0].1);
            // The first host's hostaddr, as for a one-host URL: the tunnel dials it and TLS
            // checks the name.
            let addr = url_host_addrs(url, "database_url")
                .ok()
                .and_then(|addrs| addrs.into_iter().next().flatten());
            Cow::Owned(match addr {
                Some(addr) => with_param(&first, "hostaddr", &addr),
                None => first,
            })
        }
        _ => Cow::Borrowed(url),
    }
}

/// `url` with `name=value` added to its query (the value percent-encoded).
pub(crate) fn with_param(url: &str, name: &str, value: &str) -> String {
    let url = url.trim();
    let Some(parts) = Parts::split(url) else {
        return url.to_owned();
    };
    let mut query: Vec<Cow<'_, str>> = parts.query_pairs().map(Cow::Borrowed).collect();
    query.push(Cow::Owned(format!("{name}={}", percent_encode(value))));
    parts.join(parts.userinfo, parts.host_port, &query)
}

/// The URL naming only `host:port` (in the authority): the host list, `host=`, `hostaddr=` and
/// `port=` are gone, everything else is kept as written.
pub(crate) fn with_host(url: &str, host: &str, port: u16) -> String {
    let url = url.trim();
    let Some(parts) = Parts::split(url) else {
        return url.to_owned();
    };
    let query: Vec<Cow<'_, str>> = parts
        .query_pairs()
        .filter(|pair| !TARGET_PARAMS.contains(&param_name(pair).as_str()))
        .map(Cow::Borrowed)
        .collect();
    let host_port = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{}:{port}", percent_encode_host(host))
    };
    parts.join(parts.userinfo, &host_port, &query)
}

/// A host name as an authority holds it: only characters that would end or split it are encoded.
fn percent_encode_host(host: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(host.len());
    for c in host.chars() {
        if matches!(c, '/' | '?' | '#' | '@' | ':' | ',' | '%' | '[' | ']') || c.is_whitespace() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `target_session_attrs=` in the URL (libpq's parameter), if present; an unknown value is an
/// error naming it and the accepted ones.
pub(crate) fn target_session_attrs_param(url: &str, field: &str) -> Result<Option<crate::config::TargetSessionAttrs>> {
    match query_params(url)
        .into_iter()
        .rev()
        .find(|(k, _)| k == "target_session_attrs")
    {
        None => Ok(None),
        Some((_, v)) => v.parse().map(Some).map_err(|e: Error| match e {
            Error::Config { message, .. } => Error::config(field, message),
            other => other,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------

/// A URL with its password replaced by `***`, safe to log.
///
/// Handles `scheme://user:password@host/...`, a `password=` query parameter, and malformed input
/// conservatively: when it is unclear where a password ends, more is hidden rather than less.
///
/// ```
/// use sea_orm_tunnel::config::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/app"), "postgres://app:***@db:5432/app");
/// assert_eq!(redact_url("postgres://db/app?user=app&password=s3cret"), "postgres://db/app?user=app&password=***");
/// assert_eq!(redact_url("postgres://app@db/app"), "postgres://app@db/app");
/// ```
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let mut out = String::with_capacity(url.len() + 3);
    out.push_str(head);

    // A password-like query parameter hides everything from its value to the end: an unencoded
    // '&', '#' or '@' may sit inside it, and nothing after it is worth a leak.
    let (rest, hide_tail) = match secret_param_value(rest) {
        Some(value_start) => (&rest[..value_start], true),
        None => (rest, false),
    };

    if let Some(at) = rest.rfind('@') {
        // The last '@' (before any password parameter) ends the user info even when an
        // unencoded '@', '/', '?' or '#' sits in the password.
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) => {
                out.push_str(&userinfo[..colon]);
                out.push_str(":***");
                // The password repeated after the user info (a mangled or doubled URL) is hidden
                // there too.
                let password = &userinfo[colon + 1..];
                if !password.is_empty() {
                    out.push_str(&rest[at..].replace(password, "***"));
                } else {
                    out.push_str(&rest[at..]);
                }
            }
            None => {
                out.push_str(userinfo);
                out.push_str(&rest[at..]);
            }
        }
    } else {
        // No '@': `user:password` without a host looks like `host:port`. Keep a numeric port (or
        // an IPv6 literal); otherwise hide everything after the colon, since the password may
        // start with '/', '?' or '#'.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        match authority.find(':') {
            Some(colon)
                if !authority.starts_with('[')
                    && (colon + 1 == authority.len()
                        || !authority[colon + 1..].bytes().all(|b| b.is_ascii_digit())) =>
            {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                return out;
            }
            _ => out.push_str(rest),
        }
    }
    if hide_tail {
        out.push_str("***");
        // Parameters after the password stay visible only when they are unmistakably
        // parameters (`&name=value`, no '#', '@' or stray '&'); otherwise they may be the rest of
        // an unencoded password and stay hidden.
        let value = &url[start + rest.len()..];
        if let Some(amp) = value.find('&') {
            let tail = &value[amp + 1..];
            if tail.split('&').all(is_plain_param) {
                out.push_str(&value[amp..]);
            }
        }
    }
    out
}

fn is_plain_param(pair: &str) -> bool {
    let Some((key, value)) = pair.split_once('=') else {
        return false;
    };
    !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !key.to_ascii_lowercase().contains("pass")
        && !value.contains(['#', '@', '='])
}

/// Start of the value of the first query parameter whose name contains "pass" (any case).
fn secret_param_value(rest: &str) -> Option<usize> {
    rest.char_indices()
        .filter(|&(_, c)| c == '?' || c == '&')
        .find_map(|(i, _)| {
            let tail = &rest[i + 1..];
            let eq = tail.find(['=', '&'])?;
            (tail.as_bytes()[eq] == b'=' && tail[..eq].to_ascii_lowercase().contains("pass")).then_some(i + 1 + eq + 1)
        })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn tls_in_tunnel_drops_encryption_parameters_and_says_disable() {
        let url = "postgres://app:pw@db.internal:5432/app?sslmode=verify-full&ssl-root-cert=%2Fca.pem&sslcert=/c&sslkey=/k\
                   &sslpassword=x&sslservername=db&gssencmode=prefer&options=-c%20a%3Db&hostaddr=10.0.0.5";
        assert_eq!(
            local_database_url_tls_in_tunnel(url, &tcp(40000), 5432).unwrap(),
            "postgres://app:pw@127.0.0.1:40000/app?options=-c%20a%3Db&sslmode=disable"
        );
        let local = local_database_url_tls_in_tunnel("postgres://app@db/app", &unix("/tmp/s", 5432), 5432).unwrap();
        assert_eq!(
            local,
            "postgres://app@localhost:5432/app?sslmode=disable&host=%2Ftmp%2Fs"
        );
        assert!(matches!(
            options(&local).get_ssl_mode(),
            sea_orm::sqlx::postgres::PgSslMode::Disable
        ));
    }

    #[test]
    fn query_params_authority_host_and_crate_params() {
        let url = "postgres://u:p@[::1]:5432/db?sslrootcert=%2Fetc%2Fca.pem&application_name=a+b&x";
        assert_eq!(
            query_params(url),
            [
                ("sslrootcert".to_owned(), "/etc/ca.pem".to_owned()),
                ("application_name".to_owned(), "a b".to_owned()),
                ("x".to_owned(), String::new())
            ]
        );
        assert_eq!(authority_host(url).as_deref(), Some("::1"));
        assert_eq!(
            authority_host("postgres://u@db.internal/db").as_deref(),
            Some("db.internal")
        );
        assert_eq!(authority_host("postgres:///db"), None);
        assert_eq!(
            without_crate_params("postgres://u@h/db?sslmode=require&sslpassword=s&sslservername=n"),
            "postgres://u@h/db?sslmode=require"
        );
    }

    #[test]
    fn several_endpoints_make_a_libpq_host_list_with_the_attribute_in_force() {
        use crate::config::TargetSessionAttrs::{Any, ReadWrite, Standby};
        let url = "postgres://app:pw@db1:5432,db2:5433/app?target_session_attrs=read-write\
                   &application_name=x&sslmode=require&pgbouncer=false#f";
        let two = [(tcp(40001), 5432), (tcp(40002), 5433)];
        assert_eq!(
            local_database_url_hosts(url, &two, false, ReadWrite).unwrap(),
            "postgres://app:pw@127.0.0.1:40001,127.0.0.1:40002/app?application_name=x&sslmode=require\
             &target_session_attrs=read-write#f"
        );
        // The attribute in force is written (here from PGTARGETSESSIONATTRS); `any` is libpq's default.
        assert_eq!(
            local_database_url_hosts("postgres://app@db1,db2/app", &two, true, Standby).unwrap(),
            "postgres://app@127.0.0.1:40001,127.0.0.1:40002/app?sslmode=disable&target_session_attrs=standby"
        );
        assert_eq!(
            local_database_url_hosts("postgres://app@db1,db2/app?target_session_attrs=any", &two, false, Any).unwrap(),
            "postgres://app@127.0.0.1:40001,127.0.0.1:40002/app"
        );
        let v6 = [
            (LocalEndpoint::Tcp("[::1]:40001".parse().unwrap()), 5432),
            (tcp(40002), 5432),
        ];
        assert_eq!(
            local_database_url_hosts("postgres://app@db1,db2/app", &v6, false, Any).unwrap(),
            "postgres://app@[::1]:40001,127.0.0.1:40002/app"
        );
        // Unix sockets: directories and the ports that name their socket files, in order.
        let socks = [(unix("/run/a b", 5432), 5432), (unix("/run/c", 5433), 5433)];
        assert_eq!(
            local_database_url_hosts("postgres://app@db1,db2:5433/app", &socks, false, ReadWrite).unwrap(),
            "postgres://app@localhost/app?target_session_attrs=read-write&host=%2Frun%2Fa%20b,%2Frun%2Fc&port=5432,5433"
        );
        // One endpoint: exactly the single-server URL, whatever the attribute.
        assert_eq!(
            local_database_url_hosts(url, &two[..1], false, ReadWrite).unwrap(),
            local_database_url(url, &tcp(40001), 5432).unwrap()
        );
        assert_eq!(
            local_database_url_hosts(url, &socks[..1], true, ReadWrite).unwrap(),
            local_database_url_tls_in_tunnel(url, &unix("/run/a b", 5432), 5432).unwrap()
        );
        // What a list cannot say is an error naming the endpoint, never the password.
        let comma = [(unix("/run/a,b", 5432), 5432), (unix("/run/c", 5432), 5432)];
        let e = local_database_url_hosts(url, &comma, false, Any)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/run/a,b") && e.contains("comma") && !e.contains("pw"),
            "{e}"
        );
        let mixed = [(tcp(40001), 5432), (unix("/run/c", 5432), 5432)];
        let e = local_database_url_hosts(url, &mixed, false, Any)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mixes TCP ports and Unix sockets"), "{e}");
        let e = local_database_url_hosts(url, &[], false, Any).unwrap_err().to_string();
        assert!(e.contains("no local endpoint"), "{e}");
        let wrong_port = [(unix("/run/a", 5432), 5433), (unix("/run/c", 5432), 5432)];
        let e = local_database_url_hosts(url, &wrong_port, false, Any)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5433 does not name the socket"), "{e}");
    }

    fn tcp(port: u16) -> LocalEndpoint {
        LocalEndpoint::Tcp(([127, 0, 0, 1], port).into())
    }

    fn unix(dir: &str, port: u16) -> LocalEndpoint {
        LocalEndpoint::Unix(PathBuf::from(dir).join(format!(".s.PGSQL.{port}")))
    }

    fn options(url: &str) -> PgConnectOptions {
        url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn tcp_replaces_the_authority_and_keeps_the_rest() {
        let cases = [
            (
                "postgres://u:p@db.internal:5432/app?sslmode=disable",
                "postgres://u:p@127.0.0.1:4000/app?sslmode=disable",
            ),
            ("postgres://db/app", "postgres://127.0.0.1:4000/app"),
            ("postgres://h", "postgres://127.0.0.1:4000"),
            ("postgresql://u@h:1/app#frag", "postgresql://u@127.0.0.1:4000/app#frag"),
            (
                "postgres://u@h?sslmode=disable",
                "postgres://u@127.0.0.1:4000?sslmode=disable",
            ),
            // IPv6 literal in the original.
            (
                "postgres://u:p%40x@[::1]:5432/app",
                "postgres://u:p%40x@127.0.0.1:4000/app",
            ),
            // Surrounding whitespace is not part of the URL (as for validation).
            (" postgres://u@h/app\n", "postgres://u@127.0.0.1:4000/app"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                local_database_url(input, &tcp(4000), 5432).unwrap(),
                expected,
                "{input}"
            );
            let o = options(expected);
            assert_eq!((o.get_host(), o.get_port()), ("127.0.0.1", 4000), "{expected}");
        }
        let v6 = LocalEndpoint::Tcp("[::1]:4001".parse().unwrap());
        let url = local_database_url("postgres://u:p@db:5432/app", &v6, 5432).unwrap();
        assert_eq!(url, "postgres://u:p@[::1]:4001/app");
        assert_eq!(options(&url).get_port(), 4001);
    }

    #[test]
    fn passwords_with_url_delimiters_survive() {
        // '@' and ':' may stand as they are (the last '@' ends the user info); '/', '#' and '?'
        // are percent-encoded. sqlx must read the same password from the rewritten URL.
        let original = "postgres://us%3Aer:p@ss:w%2Fo%23r%3Fd%25@db.internal:5432/app?application_name=x#f";
        let expected = "postgres://us%3Aer:p@ss:w%2Fo%23r%3Fd%25@127.0.0.1:4000/app?application_name=x#f";
        let url = local_database_url(original, &tcp(4000), 5432).unwrap();
        assert_eq!(url, expected);
        let before = options(original);
        let after = options(&url);
        assert_eq!(after.get_username(), "us:er");
        assert_eq!(after.get_username(), before.get_username());
        assert_eq!(after.get_database(), before.get_database());
        assert_eq!((after.get_host(), after.get_port()), ("127.0.0.1", 4000));

        let (without, pw) = split_password(&url);
        assert_eq!(without, "postgres://us%3Aer@127.0.0.1:4000/app?application_name=x#f");
        assert_eq!(pw.unwrap().expose_secret(), "p@ss:w/o#r?d%");
    }

    #[test]
    fn unix_socket_dir_goes_into_the_query() {
        let url = local_database_url("postgres://u:pw@db:5432/app?x=1#f", &unix("/tmp/a b", 6543), 6543).unwrap();
        assert_eq!(url, "postgres://u:pw@localhost:6543/app?x=1&host=%2Ftmp%2Fa%20b#f");
        let o = options(&url);
        assert_eq!(o.get_socket().map(|p| p.to_str().unwrap()), Some("/tmp/a b"));
        assert_eq!(o.get_port(), 6543, "the port names the socket file");

        // Characters that mean something in a query (or to a form decoder) are encoded.
        let dir = "/tmp/x%y+z&w=v#q?é";
        let url = local_database_url("postgres://u@db/app", &unix(dir, 5432), 5432).unwrap();
        assert_eq!(
            options(&url).get_socket().map(|p| p.to_str().unwrap()),
            Some(dir),
            "{url}"
        );

        // No query yet: one is started.
        let url = local_database_url("postgres://db/app", &unix("/run/t", 5432), 5432).unwrap();
        assert_eq!(url, "postgres://localhost:5432/app?host=%2Frun%2Ft");

        // The remote port must be the one in the socket's name.
        let e = local_database_url("postgres://db/app", &unix("/run/t", 5432), 5433).unwrap_err();
        assert!(e.to_string().contains(".s.PGSQL.5432"), "{e}");
    }

    #[test]
    fn target_parameters_of_the_original_are_dropped() {
        // sqlx lets `host`/`hostaddr`/`port` in the query override the authority: kept, they would
        // send the connection past the tunnel.
        let original = "postgres://u@db/app?host=/var/run/postgresql&sslmode=disable&port=6000&hostaddr=10.0.0.1";
        let url = local_database_url(original, &tcp(4000), 5432).unwrap();
        assert_eq!(url, "postgres://u@127.0.0.1:4000/app?sslmode=disable");
        let o = options(&url);
        assert!(o.get_socket().is_none());
        assert_eq!((o.get_host(), o.get_port()), ("127.0.0.1", 4000));

        let url = local_database_url("postgres://u@db/app?ho%73t=/elsewhere", &unix("/run/t", 5432), 5432).unwrap();
        assert_eq!(url, "postgres://u@localhost:5432/app?host=%2Frun%2Ft");
    }

    #[test]
    fn errors_never_repeat_the_password() {
        for bad in [
            "postgres://u:s3cretpw@db:notaport/app",
            "mysql://u:s3cretpw@db/app",
            "u:s3cretpw@db/app",
            "postgres://u:s3cret/pw@db:5432/app",
            "",
        ] {
            let e = local_database_url(bad, &tcp(4000), 5432).unwrap_err().to_string();
            assert!(e.contains("database_url"), "{e}");
            assert!(!e.contains("s3cret"), "{bad}: {e}");
        }
        // An unencoded '/' in the password gets a hint.
        let e = local_database_url("postgres://u:s3cret/pw@db:5432/app", &tcp(4000), 5432)
            .unwrap_err()
            .to_string();
        assert!(e.contains("percent-encoded"), "{e}");
    }

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
        // An unencoded '@' in the password: the last '@' of the authority ends the user info.
        let (url, pw) = split_password("postgres://u:p@ss@[::1]:5432/app#f");
        assert_eq!(url, "postgres://u@[::1]:5432/app#f");
        assert_eq!(pw.unwrap().expose_secret(), "p@ss");
        // As in sqlx: the query's password wins over the user info's, the last one wins, and
        // '+' in a query value is a space.
        let (url, pw) = split_password("postgres://u:a@h/app?password=b&x=1&password=c+d");
        assert_eq!(url, "postgres://u@h/app?x=1");
        assert_eq!(pw.unwrap().expose_secret(), "c d");
        // Not a URL: unchanged.
        let (url, pw) = split_password("not a url");
        assert_eq!(url, "not a url");
        assert!(pw.is_none());
        // An empty password in the user info is none (the URL parser drops it); in the query it
        // is an empty password.
        let (url, pw) = split_password("postgres://u:@h/app");
        assert_eq!(url, "postgres://u@h/app");
        assert!(pw.is_none());
        let (url, pw) = split_password("postgres://u@h/app?password=");
        assert_eq!(url, "postgres://u@h/app");
        assert_eq!(pw.unwrap().expose_secret(), "");
    }

    #[test]
    fn the_cli_line_is_redacted() {
        let url = local_database_url("postgres://app:s3cret@db.internal:5432/app", &tcp(4000), 5432).unwrap();
        assert_eq!(redact_url(&url), "postgres://app:***@127.0.0.1:4000/app");
    }

    #[test]
    fn url_parts() {
        let p = Parts::split("postgres://u:p@h:1/db?a=1&&b=2#f").unwrap();
        assert_eq!(
            p,
            Parts {
                scheme: "postgres://",
                userinfo: Some("u:p"),
                host_port: "h:1",
                path: "/db",
                query: Some("a=1&&b=2"),
                fragment: "#f",
            }
        );
        assert_eq!(p.query_pairs().collect::<Vec<_>>(), ["a=1", "b=2"]);
        assert_eq!(p.after_authority(), "/db?a=1&&b=2#f");
        assert!(Parts::split("h:1/db").is_none());
        assert_eq!(param_name("ho%73t=x"), "host");
        assert_eq!(percent_decode("a%2", false), "a%2");
        assert_eq!(percent_decode("a+%zz%41", false), "a+%zzA");
        assert_eq!(percent_encode("/a-b_c.d~e f"), "%2Fa-b_c.d~e%20f");
    }

    #[test]
    fn redact_url_hides_every_password_form() {
        let cases = [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://h:5432/db?sslmode=disable",
                "postgres://h:5432/db?sslmode=disable",
            ),
            ("postgres://u:p@ss/w#rd@h/db", "postgres://u:***@h/db"),
            // The password repeated after the host (a mangled URL) is hidden there too.
            (
                "postgres://app:Secret9@db.intestgres://app:Secret9:5432/app",
                "postgres://app:***@db.intestgres://app:***:5432/app",
            ),
            ("postgres://u:pw", "postgres://u:***"),
            ("postgres://[::1]:5432/db", "postgres://[::1]:5432/db"),
            (
                "postgres://h/db?user=u&password=pw&x=1",
                "postgres://h/db?user=u&password=***&x=1",
            ),
            // '#' may be part of an unencoded password: hidden with it.
            ("postgres://h/db?PassWord=pw#frag", "postgres://h/db?PassWord=***"),
            ("postgres://h/db?password=pw&Secret", "postgres://h/db?password=***"),
            ("postgres://h/db?password=p&w=x#y", "postgres://h/db?password=***"),
            ("u:pw@h/db", "u:***@h/db"),
        ];
        for (input, expected) in cases {
            let got = redact_url(input);
            assert_eq!(got, expected, "{input}");
            assert!(!got.contains("pw"), "{got}");
        }
    }

    #[test]
    fn several_hosts_are_read_as_libpq_reads_them() {
        let h = |url: &str| url_hosts(url, "database_url").unwrap();
        let pair = |host: &str, port: u16| (host.to_owned(), port);
        assert!(h("postgres://u:p@db:5432/app").is_empty(), "one host is sqlx's");
        assert_eq!(
            h("postgres://u:p,w@a:5433,b,[::1]:6000/app"),
            vec![pair("a", 5433), pair("b", 5432), pair("::1", 6000)]
        );
        assert_eq!(
            h("postgres://u@x/app?host=a,b&port=1,2"),
            vec![pair("a", 1), pair("b", 2)],
            "host= wins over the authority"
        );
        assert_eq!(h("postgres://u@/app?host=a,b&port=7"), vec![pair("a", 7), pair("b", 7)]);
        for (bad, says) in [
            ("postgres://u:secret@a:5432,b:nope/app", "not a port number"),
            ("postgres://u:secret@a,,b/app", "empty entry"),
            ("postgres://u:secret@x/app?host=a,b&port=1,2,3", "3 ports for 2 hosts"),
            ("postgres://u:secret@x/app?host=a,/tmp", "socket directory"),
        ] {
            let e = url_hosts(bad, "DATABASE_URL").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("DATABASE_URL"), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn a_hostaddr_list_gives_each_host_its_address() {
        let a = |url: &str| url_host_addrs(url, "database_url").unwrap();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            a("postgres://u@db-a:1,db-b:2/app?hostaddr=10.0.0.5,::1"),
            vec![some("10.0.0.5"), some("::1")]
        );
        assert_eq!(
            a("postgres://u@x/app?host=a,b,c&hostaddr=10.0.0.5,,10.0.0.7"),
            vec![some("10.0.0.5"), None, some("10.0.0.7")],
            "an empty entry dials that host by name"
        );
        assert!(a("postgres://u@db-a:1,db-b:2/app").is_empty());
        assert!(
            a("postgres://u@db/app?hostaddr=10.0.0.5").is_empty(),
            "one host: hostaddr is the URL's own"
        );
        for (bad, says) in [
            (
                "postgres://u:secret@a,b/app?hostaddr=127.0.0.9",
                "1 addresses for 2 hosts",
            ),
            (
                "postgres://u:secret@a,b/app?hostaddr=1.2.3.4,db-b",
                "entry 2 (for host b) is not an IP address",
            ),
        ] {
            let e = url_host_addrs(bad, "DATABASE_URL").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("DATABASE_URL"), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
            // Found where the URL is read, too.
            let e = parse_database_url(bad, "DATABASE_URL").unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(
            with_param("postgres://u:p@a:1/app?sslmode=require#f", "hostaddr", "10.0.0.5"),
            "postgres://u:p@a:1/app?sslmode=require&hostaddr=10.0.0.5#f"
        );
    }

    #[test]
    fn sqlx_is_given_the_first_host_without_the_crates_parameters() {
        assert_eq!(
            with_host(
                &without_crate_params("postgres://u:p@a:1,b:2/app?target_session_attrs=read-write&sslmode=require"),
                "a",
                1
            ),
            "postgres://u:p@a:1/app?sslmode=require"
        );
        assert_eq!(
            with_host("postgres://u@x/app?host=a,b&port=1,2&application_name=z", "::1", 5),
            "postgres://u@[::1]:5/app?application_name=z"
        );
        let options = parse_database_url("postgres://u:p@a:1,b:2/app", "database_url").unwrap();
        assert_eq!((options.get_host(), options.get_port()), ("a", 1));
        assert!(
            target_session_attrs_param("postgres://a/b?target_session_attrs=writable", "DATABASE_URL")
                .unwrap_err()
                .to_string()
                .contains("read-write")
        );
    }
}
