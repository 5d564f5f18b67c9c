//! `validate()`: contradictions are errors, not surprises.
//!
//! Each check names the setting that is wrong. A configuration read by `from_env` names the
//! environment variable (`POSTGRES_MIN_CONNECTIONS`); one built in code names the field
//! (`pool.min_connections`), and settings without a variable are always named by field.

use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::tunnel::is_sha256_base64;
use super::{
    AuthConfig, BackoffPolicy, Config, HealthConfig, HostKeyPolicy, PoolConfig, SessionSettings, TunnelConfig,
};
use crate::url::{parse_database_url, tcp_target};
use crate::{Error, Result};

/// Whether errors name environment variables or config fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Naming {
    /// Built in code: `pool.max_connections`.
    Code,
    /// Read by `from_env`: `POSTGRES_MAX_CONNECTIONS`.
    Env,
}

impl Naming {
    fn pick(self, code: &'static str, env: &'static str) -> &'static str {
        match self {
            Naming::Code => code,
            Naming::Env => env,
        }
    }
}

/// PostgreSQL stores these timeouts as an `int` of milliseconds.
const PG_MAX_TIMEOUT_MS: u128 = i32::MAX as u128;
/// Longest `application_name` prefix; the connection id follows it within PostgreSQL's 63 bytes.
const MAX_APPLICATION_NAME: usize = 40;

impl Config {
    /// Checks the whole configuration for values that cannot work and for contradictions:
    /// min > max connections, zero max, zero timeouts, keepalive of 0, a backoff factor below 1
    /// or jitter outside 0..=1, a pool larger than the tunnel can carry
    /// (`max_connections > max_channels × max_sessions`), a tunnel without a user or remote
    /// side, a key file that does not exist or cannot be read, a malformed fingerprint, an
    /// invalid `DATABASE_URL`.
    ///
    /// Errors are [`Error::Config`] naming the field (or [`Error::File`] naming the key file)
    /// and never contain a secret.
    pub fn validate(&self) -> Result<()> {
        self.validate_as(Naming::Code)
    }

    pub(crate) fn validate_as(&self, n: Naming) -> Result<()> {
        let url_field = n.pick("database_url", "DATABASE_URL");
        let options = parse_database_url(self.database_url.expose_secret(), url_field)?;
        validate_pool(&self.pool, n)?;
        validate_health(&self.health, n)?;
        validate_backoff(&self.recovery, &|f| format!("recovery.{f}"))?;
        validate_session(&self.session, n)?;
        if self.resolve_pgbouncer()? {
            validate_pgbouncer(&self.session, n)?;
        }
        let attrs = crate::url::target_session_attrs_param(self.database_url.expose_secret(), url_field)?
            .unwrap_or(self.target_session_attrs);
        if self.session.read_only && attrs == crate::config::TargetSessionAttrs::ReadWrite {
            return Err(Error::config(
                "session.read_only",
                "makes every session read-only, so no server can satisfy target_session_attrs=read-write \
                 (use primary to pick the primary for read-only sessions)",
            ));
        }
        if self.tunnel.as_ref().is_some_and(|t| t.alternate_fallthrough) {
            return Err(Error::config(
                "tunnel.alternate_fallthrough",
                "is for libpq clients of a tunnel's endpoints; the manager chooses among the servers itself, \
                 and a connection passed on to another server would be counted as the one it asked for",
            ));
        }
        if let Some(source) = &self.password_source {
            let has_password = crate::url::split_password(self.database_url.expose_secret())
                .1
                .is_some();
            validate_password_source(source, has_password, url_field, n)?;
        }
        if let Some(tunnel) = &self.tunnel {
            if tunnel.remote_host.is_empty() && tcp_target(&options).is_none() {
                return Err(Error::config(
                    n.pick("tunnel.remote_host", "SSH_REMOTE_HOST"),
                    format!(
                        "is not set, and {url_field} names no TCP host to take it from (a Unix socket \
                         cannot be reached through the bastion): set the PostgreSQL host as seen from the bastion"
                    ),
                ));
            }
            validate_tunnel(tunnel, n)?;
            let capacity = tunnel.max_channels.saturating_mul(tunnel.max_sessions);
            if self.pool.max_connections as usize > capacity {
                return Err(Error::config(
                    n.pick("pool.max_connections", "POSTGRES_MAX_CONNECTIONS"),
                    format!(
                        "{} connections do not fit through the tunnel: SSH_MAX_CHANNELS (tunnel.max_channels) {} \
                         × SSH_MAX_SESSIONS (tunnel.max_sessions) {} = {capacity}; raise SSH_MAX_SESSIONS or \
                         SSH_MAX_CHANNELS, or lower POSTGRES_MAX_CONNECTIONS",
                        self.pool.max_connections, tunnel.max_channels, tunnel.max_sessions
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl TunnelConfig {
    /// Checks the tunnel alone: host, user, ports and remote side set, channel and session caps
    /// above zero, keepalive and timeouts above zero, the reconnect backoff, the fingerprint
    /// format, and that the key file exists and can be read (or the agent is enabled).
    pub fn validate(&self) -> Result<()> {
        self.validate_as(Naming::Code)
    }

    pub(crate) fn validate_as(&self, n: Naming) -> Result<()> {
        validate_tunnel(self, n)
    }
}

impl BackoffPolicy {
    /// Checks that the policy makes sense: a first delay above zero, `factor >= 1` (finite),
    /// `max_delay >= initial_delay`, `jitter` within `0.0..=1.0`, and a `max_elapsed` above zero.
    pub fn validate(&self) -> Result<()> {
        validate_backoff(self, &|f| f.to_owned())
    }
}

/// Session settings would stay on the pooler's server connection and leak to its other clients.
fn validate_pgbouncer(session: &super::SessionSettings, n: Naming) -> Result<()> {
    let mut refused = Vec::new();
    if session.role.is_some() {
        refused.push(n.pick("session.role", "the session role"));
    }
    if session.statement_timeout.is_some() {
        refused.push(n.pick("session.statement_timeout", "POSTGRES_STATEMENT_TIMEOUT"));
    }
    if session.idle_in_transaction_session_timeout.is_some() {
        refused.push(n.pick(
            "session.idle_in_transaction_session_timeout",
            "the idle-in-transaction timeout",
        ));
    }
    if session.read_only {
        refused.push(n.pick("session.read_only", "the read-only session setting"));
    }
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        n.pick("pgbouncer", "POSTGRES_PGBOUNCER"),
        format!(
            "is on, and {} cannot be used with a transaction pooler: they are per-session settings \
             that would stay on the pooler's server connection for its other clients; set them on \
             the database role instead (ALTER ROLE ... SET ...)",
            refused.join(", ")
        ),
    ))
}

/// A rotating password replaces the URL's: both at once would leave one of them unused.
fn validate_password_source(
    source: &super::PasswordSource,
    url_has_password: bool,
    url_field: &str,
    n: Naming,
) -> Result<()> {
    let field = n.pick("password_source", "DATABASE_PASSWORD_FILE");
    if url_has_password {
        return Err(Error::config(
            field,
            format!(
                "is set and {url_field} carries a password too: remove the password from {url_field}                  (the {} is used for every new connection)",
                source.describe()
            ),
        ));
    }
    nonzero(source.check_interval, &format!("{field}.check_interval"))?;
    nonzero(source.refresh_interval, &format!("{field}.refresh_interval"))?;
    if let super::PasswordSourceKind::File(path) = &source.kind
        && path.as_os_str().is_empty()
    {
        return Err(Error::config(field, "is empty: give the path of the password file"));
    }
    Ok(())
}

fn nonzero(value: Duration, field: &str) -> Result<()> {
    if value.is_zero() {
        return Err(Error::config(field, "must be greater than zero"));
    }
    Ok(())
}

fn validate_pool(p: &PoolConfig, n: Naming) -> Result<()> {
    let max = n.pick("pool.max_connections", "POSTGRES_MAX_CONNECTIONS");
    let min = n.pick("pool.min_connections", "POSTGRES_MIN_CONNECTIONS");
    if p.max_connections == 0 {
        return Err(Error::config(max, "must be at least 1"));
    }
    if p.min_connections > p.max_connections {
        return Err(Error::config(
            min,
            format!("{} is more than {max} ({})", p.min_connections, p.max_connections),
        ));
    }
    nonzero(p.idle_timeout, n.pick("pool.idle_timeout", "POSTGRES_IDLE_TIMEOUT"))?;
    nonzero(
        p.connect_timeout,
        n.pick("pool.connect_timeout", "POSTGRES_CONNECTION_TIMEOUT"),
    )?;
    nonzero(p.acquire_timeout, "pool.acquire_timeout")?;
    nonzero(p.max_lifetime, n.pick("pool.max_lifetime", "POSTGRES_MAX_LIFETIME"))?;
    if let Some(t) = p.leak_detection_threshold {
        nonzero(
            t,
            n.pick("pool.leak_detection_threshold", "POSTGRES_LEAK_DETECTION_THRESHOLD"),
        )?;
    }
    let name_field = n.pick("pool.application_name", "POSTGRES_APPLICATION_NAME");
    let name = &p.application_name;
    if name.is_empty() {
        return Err(Error::config(name_field, "must not be empty"));
    }
    if !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::config(
            name_field,
            format!("{name:?} must be printable ASCII (PostgreSQL replaces other characters with '?')"),
        ));
    }
    if name.len() > MAX_APPLICATION_NAME {
        return Err(Error::config(
            name_field,
            format!(
                "{name:?} is {} characters; at most {MAX_APPLICATION_NAME} leave room for the connection id \
                 within PostgreSQL's 63-byte application_name",
                name.len()
            ),
        ));
    }
    let label = &p.pool_label;
    if label.is_empty() || !label.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::config(
            "pool.pool_label",
            format!("{label:?} must be non-empty printable ASCII without spaces (it is the `pool` metric label)"),
        ));
    }
    Ok(())
}

fn validate_health(h: &HealthConfig, n: Naming) -> Result<()> {
    nonzero(h.interval, n.pick("health.interval", "POSTGRES_HEALTH_CHECK_INTERVAL"))?;
    nonzero(h.timeout, "health.timeout")?;
    validate_backoff(&h.recheck, &|f| format!("health.recheck.{f}"))
}

fn validate_session(s: &SessionSettings, n: Naming) -> Result<()> {
    if let Some(role) = &s.role
        && (role.is_empty() || role.contains('\0'))
    {
        return Err(Error::config("session.role", format!("{role:?} is not a role name")));
    }
    let timeouts = [
        (
            s.statement_timeout,
            n.pick("session.statement_timeout", "POSTGRES_STATEMENT_TIMEOUT"),
        ),
        (
            s.idle_in_transaction_session_timeout,
            "session.idle_in_transaction_session_timeout",
        ),
    ];
    for (timeout, field) in timeouts {
        let Some(t) = timeout else { continue };
        if t.is_zero() {
            return Err(Error::config(
                field,
                "must be greater than zero (leave it unset for no timeout)",
            ));
        }
        if t.as_millis() > PG_MAX_TIMEOUT_MS {
            return Err(Error::config(
                field,
                format!(
                    "{} ms is more than PostgreSQL accepts ({PG_MAX_TIMEOUT_MS} ms)",
                    t.as_millis()
                ),
            ));
        }
    }
    Ok(())
}

fn validate_backoff(b: &BackoffPolicy, name: &dyn Fn(&str) -> String) -> Result<()> {
    if b.initial_delay.is_zero() {
        return Err(Error::config(
            name("initial_delay"),
            "must be greater than zero (a zero delay retries in a busy loop)",
        ));
    }
    if !b.factor.is_finite() || b.factor < 1.0 {
        return Err(Error::config(
            name("factor"),
            format!("{} must be a number >= 1.0 (delays must not shrink)", b.factor),
        ));
    }
    if b.max_delay < b.initial_delay {
        return Err(Error::config(
            name("max_delay"),
            format!("{:?} is less than initial_delay {:?}", b.max_delay, b.initial_delay),
        ));
    }
    if !(0.0..=1.0).contains(&b.jitter) {
        return Err(Error::config(
            name("jitter"),
            format!("{} is outside 0.0..=1.0", b.jitter),
        ));
    }
    if b.max_elapsed.is_some_and(|d| d.is_zero()) {
        return Err(Error::config(
            name("max_elapsed"),
            "must be greater than zero (use None for no limit)",
        ));
    }
    Ok(())
}

fn validate_tunnel(t: &TunnelConfig, n: Naming) -> Result<()> {
    if !(64 * 1024..=1 << 30).contains(&t.channel_window) {
        return Err(Error::config(
            n.pick("tunnel.channel_window", "SSH_CHANNEL_WINDOW"),
            format!(
                "{} bytes is outside 65536 (64 KiB) to 1073741824 (1 GiB)",
                t.channel_window
            ),
        ));
    }
    if let Some(ttl) = t.spare_channel
        && (ttl.is_zero() || ttl > Duration::from_secs(600))
    {
        return Err(Error::config(
            n.pick("tunnel.spare_channel", "SSH_SPARE_CHANNEL"),
            format!(
                "{} ms is outside 1 ms to 600000 ms (600 s){}",
                ttl.as_millis(),
                if ttl.is_zero() { "; use None for no spare" } else { "" }
            ),
        ));
    }
    for b in &t.fallback_hosts {
        if b.host.trim().is_empty() || b.port == 0 {
            return Err(Error::config(
                n.pick("tunnel.fallback_hosts", "SSH_HOST"),
                format!("bastion {b} needs a host name and a port from 1 to 65535"),
            ));
        }
    }
    if t.host.trim().is_empty() {
        return Err(Error::config(n.pick("tunnel.host", "SSH_HOST"), "must not be empty"));
    }
    if t.port == 0 {
        return Err(Error::config(
            n.pick("tunnel.port", "SSH_PORT"),
            "0 is not a port number (1-65535)",
        ));
    }
    if t.user.trim().is_empty() {
        return Err(Error::config(
            n.pick("tunnel.user", "SSH_USER"),
            "is required with an SSH tunnel (the login name on the bastion)",
        ));
    }
    if t.remote_host.trim().is_empty() {
        return Err(Error::config(
            n.pick("tunnel.remote_host", "SSH_REMOTE_HOST"),
            "is not set: set the PostgreSQL host as seen from the bastion (`TunnelConfig::remote`), \
             or add the tunnel to a Config with `Config::tunnel` to take it from DATABASE_URL",
        ));
    }
    if t.remote_port == 0 {
        return Err(Error::config(
            n.pick("tunnel.remote_port", "SSH_REMOTE_PORT"),
            "is not set: set the PostgreSQL port as seen from the bastion (`TunnelConfig::remote`), \
             or add the tunnel to a Config with `Config::tunnel` to take it from DATABASE_URL",
        ));
    }
    if !t.alternate_server_names.is_empty() && t.alternate_server_names.len() != t.alternate_targets.len() {
        return Err(Error::config(
            "tunnel.alternate_server_names",
            format!(
                "has {} names for {} alternate targets (give none, or one per target)",
                t.alternate_server_names.len(),
                t.alternate_targets.len()
            ),
        ));
    }
    for (i, (host, port)) in t.alternate_targets.iter().enumerate() {
        if host.trim().is_empty() || *port == 0 {
            return Err(Error::config(
                format!("tunnel.alternate_targets[{i}]"),
                "needs a host and a port (1-65535) as seen from the bastion",
            ));
        }
    }
    if t.max_channels == 0 {
        return Err(Error::config(
            n.pick("tunnel.max_channels", "SSH_MAX_CHANNELS"),
            "must be at least 1",
        ));
    }
    if t.max_sessions == 0 {
        return Err(Error::config(
            n.pick("tunnel.max_sessions", "SSH_MAX_SESSIONS"),
            "must be at least 1",
        ));
    }
    nonzero(
        t.keepalive_interval,
        n.pick("tunnel.keepalive_interval", "SSH_KEEPALIVE_INTERVAL"),
    )?;
    if t.keepalive_max == 0 {
        return Err(Error::config(
            n.pick("tunnel.keepalive_max", "SSH_KEEPALIVE_MAX"),
            "must be at least 1 (missed keepalive replies before the link counts as dead)",
        ));
    }
    nonzero(
        t.connect_timeout,
        n.pick("tunnel.connect_timeout", "POSTGRES_CONNECTION_TIMEOUT"),
    )?;
    // Zero would close a session opened for capacity before its waiter could use it.
    nonzero(t.session_idle_timeout, "tunnel.session_idle_timeout")?;
    validate_backoff(&t.reconnect, &|f| match (n, f) {
        (Naming::Env, "initial_delay") => "SSH_RETRY_DELAY".to_owned(),
        _ => format!("tunnel.reconnect.{f}"),
    })?;
    if let HostKeyPolicy::Fingerprint(fp) = &t.host_key_policy {
        let ok = fp.strip_prefix("SHA256:").is_some_and(is_sha256_base64);
        if !ok {
            return Err(Error::config(
                n.pick("tunnel.host_key_policy", "SSH_HOST_KEY_POLICY"),
                format!(
                    "{fp:?} is not a fingerprint of the form SHA256:<43 base64 characters> (see `ssh-keygen -lf KEY`)"
                ),
            ));
        }
    }
    validate_auth(&t.auth, n)
}

fn validate_auth(a: &AuthConfig, n: Naming) -> Result<()> {
    match &a.key_path {
        Some(path) => check_key_file(path, n),
        None if a.use_agent => Ok(()),
        None => Err(Error::config(
            n.pick("tunnel.auth", "SSH_KEY_PATH"),
            "no SSH authentication method: set a key file (SSH_KEY_PATH) or enable the agent (SSH_USE_AGENT)",
        )),
    }
}

/// The key file must be a readable regular file. Its contents are checked when the tunnel loads
/// it (that needs the passphrase and the key parser).
fn check_key_file(path: &Path, n: Naming) -> Result<()> {
    let file_error = |message: String, source: Option<std::io::Error>| Error::File {
        what: "SSH private key",
        path: path.to_owned(),
        message,
        source: source.map(|e| std::sync::Arc::new(e) as crate::error::SharedError),
    };
    let setting = n.pick("tunnel.auth.key_path", "SSH_KEY_PATH");
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(file_error(format!("is a directory, not a key file ({setting})"), None)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(file_error(format!("does not exist ({setting})"), Some(e)));
        }
        Err(e) => return Err(file_error(format!("cannot be read ({setting}): {e}"), Some(e))),
    }
    // Opening proves read permission (metadata does not).
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| file_error(format!("cannot be read ({setting}): {e}"), Some(e)))
}
