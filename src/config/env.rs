//! `Config::from_env`: the configuration variables, from the process environment, `.env.local` and
//! `.env`.
//!
//! The files are read into maps, never into the process environment: edition 2024 makes
//! `std::env::set_var` unsafe (other threads may read the environment), and this crate forbids
//! `unsafe`. Precedence: process environment, then `.env.local`, then `.env`; within one file
//! the first definition of a variable wins (as with `dotenvy::dotenv`). An empty value counts as
//! unset, so `SSH_HOST=` in a file disables the tunnel.

use std::collections::HashMap;
use std::num::{IntErrorKind, ParseIntError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::validate::Naming;
use super::{AuthConfig, Config, HostKeyPolicy, JumpHost, LocalEndpointConfig, Profile, TunnelConfig};
use crate::ssh_config::{Explicit, ResolvedHost, Resolver, SshConfigSource};
use crate::url::{parse_database_url, tcp_target};
use crate::{Error, Result};

/// The files `from_env` reads, highest precedence first.
const DOTENV_FILES: [&str; 2] = [".env.local", ".env"];

/// Every variable `from_env` reads, plus `HOME` and `SSH_AUTH_SOCK` for defaults.
pub const ENV_VARS: &[&str] = &[
    "APP_ENV",
    "DATABASE_URL",
    "POSTGRES_MAX_CONNECTIONS",
    "POSTGRES_MIN_CONNECTIONS",
    "POSTGRES_IDLE_TIMEOUT",
    "POSTGRES_CONNECTION_TIMEOUT",
    "POSTGRES_MAX_LIFETIME",
    "POSTGRES_HEALTH_CHECK_INTERVAL",
    "POSTGRES_STATEMENT_TIMEOUT",
    "POSTGRES_APPLICATION_NAME",
    "POSTGRES_CONNECTION_IDS",
    "POSTGRES_LEAK_DETECTION_THRESHOLD",
    "CONNECTION_LOG_TO_DB",
    "SHUTDOWN_DRAIN_TIMEOUT",
    "DATABASE_PASSWORD_FILE",
    "POSTGRES_PGBOUNCER",
    "PGTARGETSESSIONATTRS",
    "SSH_HOST",
    "SSH_PORT",
    "SSH_USER",
    "SSH_KEY_PATH",
    "SSH_KEY_PASSPHRASE",
    "SSH_USE_AGENT",
    "SSH_KNOWN_HOSTS",
    "SSH_HOST_KEY_POLICY",
    "SSH_REMOTE_HOST",
    "SSH_REMOTE_PORT",
    "SSH_LOCAL_PORT",
    "SSH_MAX_CHANNELS",
    "SSH_MAX_SESSIONS",
    "SSH_MAX_RETRIES",
    "SSH_RETRY_DELAY",
    "SSH_KEEPALIVE_INTERVAL",
    "SSH_KEEPALIVE_MAX",
    "SSH_PROXY_JUMP",
    "SSH_CERTIFICATE_PATH",
    "SSH_CHANNEL_WINDOW",
    "SSH_SPARE_CHANNEL",
    "SSH_CONFIG",
];

impl Config {
    /// Reads the configuration from the environment, after loading `.env.local` and
    /// `.env` from the current directory when present, and validates it.
    ///
    /// The process environment wins over `.env.local`, which wins over `.env`; the files never
    /// change the process environment. Errors name the variable and the bad value, except for
    /// secrets (`DATABASE_URL`'s password, `SSH_KEY_PASSPHRASE`), which are never repeated.
    ///
    /// | variable | default |
    /// |---|---|
    /// | `APP_ENV` (`development`/`production`) | development |
    /// | `DATABASE_URL` | required |
    /// | `POSTGRES_MAX_CONNECTIONS` | profile |
    /// | `POSTGRES_MIN_CONNECTIONS` | 0 |
    /// | `POSTGRES_IDLE_TIMEOUT`, `POSTGRES_CONNECTION_TIMEOUT` (ms) | profile |
    /// | `POSTGRES_MAX_LIFETIME` (ms) | 30 min |
    /// | `POSTGRES_HEALTH_CHECK_INTERVAL` (ms) | profile |
    /// | `POSTGRES_STATEMENT_TIMEOUT` (ms, 0 = none) | none |
    /// | `POSTGRES_APPLICATION_NAME` | `sea-orm-tunnel` |
    /// | `POSTGRES_CONNECTION_IDS` (a per-connection `application_name`: one `SET` per new connection) | true |
    /// | `POSTGRES_LEAK_DETECTION_THRESHOLD` (ms, 0 = off) | off |
    /// | `CONNECTION_LOG_TO_DB` | false |
    /// | `SHUTDOWN_DRAIN_TIMEOUT` (ms) | 5000 |
    /// | `POSTGRES_PGBOUNCER` (transaction pooler; `pgbouncer=true` in `DATABASE_URL` wins) | false |
    /// | `DATABASE_PASSWORD_FILE` (the password, re-read when the file changes; `DATABASE_URL` then has none) | none |
    /// | `PGTARGETSESSIONATTRS` (libpq's: which of `DATABASE_URL`'s hosts; `target_session_attrs=` in the URL wins) | any |
    /// | `SSH_HOST` (`host[:port],...`: bastions tried in order, failover to the next) | unset = no tunnel |
    /// | `SSH_PORT` | 22 |
    /// | `SSH_USER` | ssh_config `User`, else `USER` / `LOGNAME` |
    /// | `SSH_KEY_PATH` | `~/.ssh/id_ed25519` (skipped if absent and the agent is used) |
    /// | `SSH_KEY_PASSPHRASE` | none |
    /// | `SSH_USE_AGENT` | true when `SSH_AUTH_SOCK` names an existing socket |
    /// | `SSH_KNOWN_HOSTS` | `~/.ssh/known_hosts` |
    /// | `SSH_HOST_KEY_POLICY` (`strict`, `accept-new`, `SHA256:<fp>`, `insecure-accept-any`) | strict |
    /// | `SSH_REMOTE_HOST`, `SSH_REMOTE_PORT` | host and port of `DATABASE_URL` |
    /// | `SSH_LOCAL_PORT` (port, 0 = ephemeral, or `unix`) | 0 |
    /// | `SSH_MAX_CHANNELS` / `SSH_MAX_SESSIONS` | profile |
    /// | `SSH_MAX_RETRIES` (0 = forever) / `SSH_RETRY_DELAY` (ms) | profile |
    /// | `SSH_KEEPALIVE_INTERVAL` (ms) / `SSH_KEEPALIVE_MAX` | 5000 / 3 |
    /// | `SSH_PROXY_JUMP` (`[user@]host[:port],...`, OpenSSH `ProxyJump`) | none |
    /// | `SSH_CERTIFICATE_PATH` (OpenSSH user certificate) | `<key>-cert.pub` when present |
    /// | `SSH_CHANNEL_WINDOW` (bytes, 64 KiB to 1 GiB) | 8 MiB |
    /// | `SSH_SPARE_CHANNEL` (ms a ready spare channel is kept, 0 = none, up to 600000) | 0 |
    /// | `SSH_CONFIG` (ssh_config file for `SSH_HOST`, replacing both defaults; `none` = off) | `~/.ssh/config`, then `/etc/ssh/ssh_config` |
    ///
    /// Booleans accept `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (any case). `~` in paths
    /// is expanded with `$HOME`. The `SSH_*` variables are read only when `SSH_HOST` is set.
    ///
    /// `SSH_HOST` is looked up in ssh_config as `ssh` would (see [`crate::ssh_config`]): the
    /// file's `HostName`, `User`, `Port`, `IdentityFile`, known_hosts files,
    /// `StrictHostKeyChecking`, `ProxyJump`, … apply wherever the matching variable is not set.
    pub fn from_env() -> Result<Config> {
        Self::from_env_in(current_dir()?)
    }

    /// [`from_env`](Self::from_env) with `.env.local` and `.env` read from `dir` instead of the
    /// current directory.
    pub fn from_env_in(dir: impl AsRef<Path>) -> Result<Config> {
        let vars = Vars::load(&process_env, Some(dir.as_ref()))?;
        read_config(&vars)
    }

    /// [`from_env`](Self::from_env) with variables from `lookup` only: no process environment,
    /// no files. For tests and for configuration kept elsewhere.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use sea_orm_tunnel::config::Config;
    ///
    /// let vars = HashMap::from([
    ///     ("APP_ENV", "production"),
    ///     ("DATABASE_URL", "postgres://app:secret@db:5432/app"),
    ///     ("POSTGRES_MIN_CONNECTIONS", "5"),
    /// ]);
    /// let config = Config::from_env_with(|name| vars.get(name).map(|v| v.to_string())).unwrap();
    /// assert_eq!(config.pool.max_connections, 100);
    /// assert_eq!(config.pool.min_connections, 5);
    /// assert!(config.tunnel.is_none());
    /// ```
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let lookup = |name: &str| Ok(lookup(name));
        read_config(&Vars::load(&lookup, None)?)
    }

    /// Variables from `lookup`, then `dir/.env.local`, then `dir/.env`: `from_env` with a
    /// chosen environment, so tests need neither `set_var` nor `chdir`.
    pub fn from_env_in_with(dir: impl AsRef<Path>, lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let lookup = |name: &str| Ok(lookup(name));
        read_config(&Vars::load(&lookup, Some(dir.as_ref()))?)
    }
}

impl TunnelConfig {
    /// Reads only the tunnel from the environment (and `.env.local` / `.env` in the current
    /// directory), as [`Config::from_env`] does, and validates it. For
    /// `SshTunnel::initialize_from_env`.
    ///
    /// `SSH_HOST` is required here. `APP_ENV` selects the defaults, `DATABASE_URL` (optional)
    /// provides the default remote host and port, `POSTGRES_CONNECTION_TIMEOUT` the connect timeout.
    pub fn from_env() -> Result<TunnelConfig> {
        let vars = Vars::load(&process_env, Some(&current_dir()?))?;
        read_tunnel_only(&vars)
    }

    /// [`from_env`](Self::from_env) with variables from `lookup` only.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<TunnelConfig> {
        let lookup = |name: &str| Ok(lookup(name));
        read_tunnel_only(&Vars::load(&lookup, None)?)
    }

    /// Variables from `lookup`, then `dir/.env.local`, then `dir/.env`.
    pub fn from_env_in_with(dir: impl AsRef<Path>, lookup: impl Fn(&str) -> Option<String>) -> Result<TunnelConfig> {
        let lookup = |name: &str| Ok(lookup(name));
        read_tunnel_only(&Vars::load(&lookup, Some(dir.as_ref()))?)
    }
}

/// Whether `name` is set, as [`Config::from_env`] would see it: in the process environment, or
/// in `.env.local` / `.env` in the current directory. Never returns the value (it may be secret).
///
/// For programs that choose between "configured" and a built-in default, like the quick start.
pub fn is_set(name: &str) -> Result<bool> {
    let vars = Vars::load(&process_env, Some(&current_dir()?))?;
    Ok(vars.get(name)?.is_some())
}

/// Longest bad value repeated in full in an error message.
const MAX_ECHOED_VALUE: usize = 64;

/// An error that quotes a huge bad value (`{value:?}`) quotes only its start, so a malformed
/// variable cannot flood the log.
fn shorten_echoed_value(error: Error, value: &str) -> Error {
    match error {
        Error::Config { field, message } if value.chars().count() > MAX_ECHOED_VALUE => {
            let head: String = value.chars().take(MAX_ECHOED_VALUE).collect();
            let total = value.len();
            let short = format!("{head:?}... ({total} bytes)");
            Error::Config {
                message: message.replacen(&format!("{value:?}"), &short, 1),
                field,
            }
        }
        other => other,
    }
}

fn current_dir() -> Result<PathBuf> {
    std::env::current_dir().map_err(|source| Error::Io {
        context: "reading the current directory to find .env files".to_owned(),
        source: source.into(),
    })
}

/// The process environment; a value that is not UTF-8 is an error naming the variable.
fn process_env(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::config(name, "is not valid UTF-8")),
    }
}

type Lookup<'a> = &'a dyn Fn(&str) -> Result<Option<String>>;

/// Layered variables: the lookup first, then each file in precedence order.
struct Vars<'a> {
    lookup: Lookup<'a>,
    files: Vec<HashMap<String, String>>,
}

impl<'a> Vars<'a> {
    fn load(lookup: Lookup<'a>, dir: Option<&Path>) -> Result<Self> {
        let mut files = Vec::new();
        if let Some(dir) = dir {
            for name in DOTENV_FILES {
                if let Some(map) = read_dotenv(&dir.join(name))? {
                    files.push(map);
                }
            }
        }
        Ok(Vars { lookup, files })
    }

    /// The value of `name`, trimmed; empty counts as unset.
    fn get(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .get_raw(name)?
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty()))
    }

    /// The value of `name` untrimmed (for secrets, where spaces may matter); empty counts as unset.
    fn get_raw(&self, name: &str) -> Result<Option<String>> {
        if let Some(v) = (self.lookup)(name)?.filter(|v| !v.is_empty()) {
            return Ok(Some(v));
        }
        Ok(self
            .files
            .iter()
            .find_map(|f| f.get(name))
            .filter(|v| !v.is_empty())
            .cloned())
    }

    fn parse<T>(&self, name: &str, parse: impl FnOnce(&str, &str) -> Result<T>) -> Result<Option<T>> {
        self.get(name)?
            .map(|v| parse(name, &v).map_err(|e| shorten_echoed_value(e, &v)))
            .transpose()
    }

    fn count<T: FromStr<Err = ParseIntError> + std::fmt::Display>(&self, name: &str, max: T) -> Result<Option<T>> {
        self.parse(name, |name, v| parse_count(name, v, max, "a whole number"))
    }

    fn millis(&self, name: &str) -> Result<Option<Duration>> {
        self.parse(name, |name, v| {
            parse_count(name, v, u64::MAX, "a whole number of milliseconds").map(Duration::from_millis)
        })
    }

    fn bool(&self, name: &str) -> Result<Option<bool>> {
        self.parse(name, |name, v| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(Error::config(
                name,
                format!("{v:?} is not a boolean (true/false, 1/0, yes/no)"),
            )),
        })
    }

    fn port(&self, name: &str) -> Result<Option<u16>> {
        self.parse(name, |name, v| match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(Error::config(name, format!("{v:?} is not a port number (1-65535)"))),
        })
    }

    /// A path with `~` expanded from this environment's `HOME`.
    fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        match self.get(name)? {
            None => Ok(None),
            Some(v) => Ok(Some(self.expand(name, &v)?)),
        }
    }

    fn expand(&self, name: &str, value: &str) -> Result<PathBuf> {
        let rest = match value.strip_prefix('~') {
            None => return Ok(PathBuf::from(value)),
            Some("") => "",
            Some(rest) if rest.starts_with('/') => rest.trim_start_matches('/'),
            // `~user/...` is not expanded: it is a path like any other.
            Some(_) => return Ok(PathBuf::from(value)),
        };
        match self.home()? {
            Some(home) => Ok(home.join(rest)),
            None => Err(Error::config(
                name,
                format!("{value:?} starts with ~ but HOME is not set; give an absolute path"),
            )),
        }
    }

    fn home(&self) -> Result<Option<PathBuf>> {
        Ok(self.get("HOME")?.map(PathBuf::from))
    }
}

/// Reads one dotenv file into a map; `None` when it does not exist.
fn read_dotenv(path: &Path) -> Result<Option<HashMap<String, String>>> {
    let file_error = |message: String, source: Option<crate::error::BoxError>| Error::File {
        what: "environment file",
        path: path.to_owned(),
        message,
        source: source.map(Into::into),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(format!("cannot be read: {e}"), Some(Box::new(e)))),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut map = HashMap::new();
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok((key, value)) => {
                map.entry(key).or_insert(value);
            }
            Err(dotenvy::Error::LineParse(line, _)) => {
                // The line may hold a secret: say where it is, not what it says.
                let line_no = text.find(line.as_str()).map(|at| text[..at].lines().count() + 1);
                let at = line_no.map_or_else(String::new, |n| format!(" at line {n}"));
                return Err(file_error(
                    format!("cannot be parsed{at} (expected NAME=value; the line is not shown, it may hold a secret)"),
                    None,
                ));
            }
            Err(e) => return Err(file_error(format!("cannot be read: {e}"), Some(Box::new(e)))),
        }
    }
    Ok(Some(map))
}

fn parse_count<T: FromStr<Err = ParseIntError> + std::fmt::Display>(
    name: &str,
    value: &str,
    max: T,
    what: &str,
) -> Result<T> {
    value.parse::<T>().map_err(|e| {
        let message = match e.kind() {
            IntErrorKind::PosOverflow => format!("{value:?} is too large (at most {max})"),
            _ => format!("{value:?} is not {what}"),
        };
        Error::config(name, message)
    })
}

fn read_config(vars: &Vars<'_>) -> Result<Config> {
    let profile = read_profile(vars)?;
    let url = vars.get_raw("DATABASE_URL")?.ok_or_else(|| {
        Error::config(
            "DATABASE_URL",
            "is not set (expected postgres://user:password@host:port/database)",
        )
    })?;
    let mut config = Config::for_profile(profile, url.trim());

    let pool = &mut config.pool;
    if let Some(v) = vars.count("POSTGRES_MAX_CONNECTIONS", u32::MAX)? {
        pool.max_connections = v;
    }
    if let Some(v) = vars.count("POSTGRES_MIN_CONNECTIONS", u32::MAX)? {
        pool.min_connections = v;
    }
    if let Some(v) = vars.millis("POSTGRES_IDLE_TIMEOUT")? {
        pool.idle_timeout = v;
    }
    if let Some(v) = vars.millis("POSTGRES_CONNECTION_TIMEOUT")? {
        pool.connect_timeout = v;
        pool.acquire_timeout = v;
    }
    if let Some(v) = vars.millis("POSTGRES_MAX_LIFETIME")? {
        pool.max_lifetime = v;
    }
    if let Some(v) = vars.get("POSTGRES_APPLICATION_NAME")? {
        pool.application_name = v;
    }
    if let Some(v) = vars.bool("POSTGRES_CONNECTION_IDS")? {
        pool.connection_ids = v;
    }
    // 0 = off, like PostgreSQL's own timeouts.
    if let Some(v) = vars.millis("POSTGRES_LEAK_DETECTION_THRESHOLD")? {
        pool.leak_detection_threshold = Some(v).filter(|d| !d.is_zero());
    }
    if let Some(v) = vars.millis("POSTGRES_HEALTH_CHECK_INTERVAL")? {
        config.health.interval = v;
    }
    if let Some(v) = vars.millis("POSTGRES_STATEMENT_TIMEOUT")? {
        config.session.statement_timeout = Some(v).filter(|d| !d.is_zero());
    }
    if let Some(v) = vars.bool("CONNECTION_LOG_TO_DB")? {
        config.log_to_db = v;
    }
    if let Some(v) = vars.millis("SHUTDOWN_DRAIN_TIMEOUT")? {
        config.shutdown_drain_timeout = v;
    }
    if let Some(v) = vars.bool("POSTGRES_PGBOUNCER")? {
        config.pgbouncer = v;
    }
    if let Some(v) = vars.parse("PGTARGETSESSIONATTRS", |name, v| {
        v.parse::<super::TargetSessionAttrs>().map_err(|e| match e {
            Error::Config { message, .. } => Error::config(name, message),
            other => other,
        })
    })? {
        config.target_session_attrs = v;
    }
    if let Some(path) = vars.path("DATABASE_PASSWORD_FILE")? {
        config.password_source = Some(super::PasswordSource::file(path));
    }

    config.tunnel = read_tunnel(vars, profile, Some(&url), config.pool.connect_timeout)?;
    config.validate_as(Naming::Env)?;
    Ok(config)
}

fn read_profile(vars: &Vars<'_>) -> Result<Profile> {
    Ok(vars.parse("APP_ENV", |_, v| Profile::from_str(v))?.unwrap_or_default())
}

fn read_tunnel_only(vars: &Vars<'_>) -> Result<TunnelConfig> {
    let profile = read_profile(vars)?;
    let connect_timeout = vars
        .millis("POSTGRES_CONNECTION_TIMEOUT")?
        .unwrap_or(profile.defaults().connect_timeout);
    let url = vars.get_raw("DATABASE_URL")?;
    let tunnel = read_tunnel(vars, profile, url.as_deref(), connect_timeout)?
        .ok_or_else(|| Error::config("SSH_HOST", "is not set (the SSH bastion to tunnel through)"))?;
    tunnel.validate_as(Naming::Env)?;
    Ok(tunnel)
}

/// The `SSH_*` variables; `None` when `SSH_HOST` is unset.
fn read_tunnel(
    vars: &Vars<'_>,
    profile: Profile,
    database_url: Option<&str>,
    connect_timeout: Duration,
) -> Result<Option<TunnelConfig>> {
    let Some(host) = vars.get("SSH_HOST")? else {
        return Ok(None);
    };
    // `SSH_HOST=a,b:2222`: bastions in failover order; entries without a port take SSH_PORT.
    let mut bastions = super::tunnel::BastionHost::parse_list(&host, "SSH_HOST")?.into_iter();
    let (host, first_port) = bastions.next().expect("parse_list returns at least one bastion");
    let more_bastions: Vec<(String, Option<u16>)> = bastions.collect();
    // The first bastion may be an ssh_config alias (SSH_CONFIG): resolved here, applied at the
    // end. The fallback bastions are used as written.
    let ssh = resolve_ssh_config(vars, &host, first_port)?;
    let user = match vars.get("SSH_USER")? {
        Some(user) => user,
        None => ssh.resolved.default_user(ssh.local_user.as_deref()).ok_or_else(|| {
            Error::config(
                "SSH_USER",
                "is required when SSH_HOST is set (the login name on the bastion), unless ssh_config \
                 gives a User for the host or USER / LOGNAME names the local user",
            )
        })?,
    };
    let mut t = TunnelConfig::for_profile(profile, host, user);
    t.connect_timeout = connect_timeout;
    if let Some(port) = vars.port("SSH_PORT")? {
        t.port = port;
    }
    let default_port = t.port;
    if let Some(port) = first_port {
        t.port = port;
    }
    t.fallback_hosts = more_bastions
        .into_iter()
        .map(|(host, port)| super::tunnel::BastionHost::new(host, port.unwrap_or(default_port)))
        .collect();
    t.auth = read_auth(vars, &ssh.resolved)?;

    t.known_hosts = match vars.path("SSH_KNOWN_HOSTS")? {
        Some(path) => path,
        None => match vars.home()? {
            Some(home) => home.join(".ssh/known_hosts"),
            None => {
                return Err(Error::config(
                    "SSH_KNOWN_HOSTS",
                    "is not set and HOME is not set to find ~/.ssh/known_hosts; give the known_hosts path",
                ));
            }
        },
    };
    if let Some(policy) = vars.parse("SSH_HOST_KEY_POLICY", |_, v| HostKeyPolicy::from_str(v))? {
        t.host_key_policy = policy;
    }

    let remote_host = vars.get("SSH_REMOTE_HOST")?;
    let remote_port = vars.port("SSH_REMOTE_PORT")?;
    let from_url = match (&remote_host, remote_port, database_url) {
        (Some(_), Some(_), _) | (_, _, None) => None,
        (_, _, Some(url)) => tcp_target(&parse_database_url(url, "DATABASE_URL")?),
    };
    t.remote_host = remote_host
        .or_else(|| from_url.as_ref().map(|(h, _)| h.clone()))
        .unwrap_or_default();
    t.remote_port = remote_port
        .or(from_url.map(|(_, p)| p))
        // A remote host given without a port and without DATABASE_URL: PostgreSQL's port.
        .or(Some(super::profile::POSTGRES_PORT).filter(|_| !t.remote_host.is_empty()))
        .unwrap_or(0);

    if let Some(local) = vars.parse("SSH_LOCAL_PORT", |name, v| {
        if v.eq_ignore_ascii_case("unix") {
            return Ok(LocalEndpointConfig::Unix);
        }
        v.parse::<u16>().map(LocalEndpointConfig::Tcp).map_err(|_| {
            Error::config(
                name,
                format!("{v:?} is not a port number (0-65535, 0 = ephemeral) or `unix`"),
            )
        })
    })? {
        t.local = local;
    }
    if let Some(v) = vars.count("SSH_MAX_CHANNELS", usize::MAX)? {
        t.max_channels = v;
    }
    if let Some(v) = vars.count("SSH_MAX_SESSIONS", usize::MAX)? {
        t.max_sessions = v;
    }
    if let Some(v) = vars.count("SSH_MAX_RETRIES", u32::MAX)? {
        t.reconnect.max_retries = v;
    }
    if let Some(v) = vars.millis("SSH_RETRY_DELAY")? {
        t.reconnect.initial_delay = v;
        // A first delay above the default cap raises the cap rather than contradicting it.
        t.reconnect.max_delay = t.reconnect.max_delay.max(v);
    }
    if let Some(v) = vars.millis("SSH_KEEPALIVE_INTERVAL")? {
        t.keepalive_interval = v;
    }
    if let Some(v) = vars.count("SSH_KEEPALIVE_MAX", usize::MAX)? {
        t.keepalive_max = v;
    }
    if let Some(hops) = vars.parse("SSH_PROXY_JUMP", |name, v| JumpHost::parse_list(v, name))? {
        t.proxy_jump = hops;
    }
    if let Some(v) = vars.count("SSH_CHANNEL_WINDOW", u32::MAX)? {
        t.channel_window = v;
    }
    if let Some(v) = vars.millis("SSH_SPARE_CHANNEL")? {
        t.spare_channel = (!v.is_zero()).then_some(v);
    }
    if let Some(path) = vars.path("SSH_CERTIFICATE_PATH")? {
        t.auth.certificate_path = Some(path);
    }
    apply_ssh_config(&mut t, vars, ssh)?;
    Ok(Some(t))
}

/// An ssh_config lookup of `SSH_HOST`.
struct SshLookup {
    resolved: ResolvedHost,
    local_user: Option<String>,
    source: SshConfigSource,
    /// The `SSH_HOST` entry gave a port: it wins over the file's `Port`.
    explicit_port: bool,
}

/// Resolves `host` in the files `SSH_CONFIG` names (default `~/.ssh/config`, then
/// `/etc/ssh/ssh_config`; `none` = no file), with `HOME`, `USER` and `${VAR}`s from `vars`.
/// `port`: a port written in the `SSH_HOST` entry, which wins like `SSH_PORT`.
fn resolve_ssh_config(vars: &Vars<'_>, host: &str, port: Option<u16>) -> Result<SshLookup> {
    let source = match vars.get("SSH_CONFIG")? {
        None => SshConfigSource::Standard,
        Some(v) if v.eq_ignore_ascii_case("none") => SshConfigSource::Disabled,
        Some(_) => SshConfigSource::File(vars.path("SSH_CONFIG")?.unwrap_or_default()),
    };
    let resolver = Resolver::with_env(source.clone(), |name| vars.get_raw(name).ok().flatten())
        .user(vars.get("SSH_USER")?)
        .port(port.or(vars.port("SSH_PORT")?))
        .label("SSH_HOST");
    let resolved = resolver.resolve(host)?;
    Ok(SshLookup {
        local_user: resolver.local_user().map(str::to_owned),
        resolved,
        source,
        explicit_port: port.is_some(),
    })
}

/// What ssh_config says about the host, where no `SSH_*` variable (or
/// `POSTGRES_CONNECTION_TIMEOUT`) was set.
fn apply_ssh_config(t: &mut TunnelConfig, vars: &Vars<'_>, ssh: SshLookup) -> Result<()> {
    let set = |name: &str| -> Result<bool> { Ok(vars.get(name)?.is_some()) };
    let explicit = Explicit {
        port: set("SSH_PORT")? || ssh.explicit_port,
        user: set("SSH_USER")?,
        certificate: set("SSH_CERTIFICATE_PATH")?,
        known_hosts: set("SSH_KNOWN_HOSTS")?,
        policy: set("SSH_HOST_KEY_POLICY")?,
        proxy_jump: set("SSH_PROXY_JUMP")?,
        keepalive_interval: set("SSH_KEEPALIVE_INTERVAL")?,
        keepalive_max: set("SSH_KEEPALIVE_MAX")?,
        connect_timeout: set("POSTGRES_CONNECTION_TIMEOUT")?,
    };
    ssh.resolved.apply_to(t, explicit)?;
    t.ssh_config = ssh.source;
    Ok(())
}

fn read_auth(vars: &Vars<'_>, ssh: &ResolvedHost) -> Result<AuthConfig> {
    let agent_socket = vars.path("SSH_AUTH_SOCK")?;
    let agent_available = agent_socket.as_ref().is_some_and(|s| s.exists());
    // ssh_config `IdentityAgent` (used when SSH_USE_AGENT is not set).
    let ssh_agent = ssh.agent(agent_available);
    let use_agent = match vars.bool("SSH_USE_AGENT")? {
        Some(true) if !agent_available => {
            return Err(Error::config(
                "SSH_USE_AGENT",
                match &agent_socket {
                    None => "is true but SSH_AUTH_SOCK is not set (no ssh-agent to use)".to_owned(),
                    Some(s) => format!(
                        "is true but the agent socket {} (SSH_AUTH_SOCK) does not exist",
                        s.display()
                    ),
                },
            ));
        }
        Some(v) => v,
        None => ssh_agent.as_ref().map_or(agent_available, |(on, _)| *on),
    };
    let ssh_agent_socket = match vars.get("SSH_USE_AGENT")? {
        None => ssh_agent.and_then(|(_, socket)| socket),
        Some(_) => None,
    };
    // ssh_config `IdentityFile`s replace the default key (as in ssh).
    let ssh_keys = ssh.keys(use_agent);
    let mut extra_key_paths = Vec::new();

    let key_path = match vars.path("SSH_KEY_PATH")? {
        // An explicit key must exist; validate() reports it as a file error naming the path.
        Some(path) => Some(path),
        None if ssh_keys.is_some() => {
            let (key, extra) = ssh_keys.unwrap_or_default();
            extra_key_paths = extra;
            key
        }
        None => match vars.home()? {
            Some(home) => {
                let default = home.join(".ssh/id_ed25519");
                if default.exists() {
                    Some(default)
                } else if use_agent {
                    None
                } else {
                    return Err(Error::File {
                        what: "SSH private key",
                        path: default,
                        message: "does not exist (the default of SSH_KEY_PATH), and no ssh-agent is in use \
                                  (SSH_USE_AGENT / SSH_AUTH_SOCK): set SSH_KEY_PATH"
                            .to_owned(),
                        source: None,
                    });
                }
            }
            None if use_agent => None,
            None => {
                return Err(Error::config(
                    "SSH_KEY_PATH",
                    "is not set, HOME is not set to find ~/.ssh/id_ed25519, and no ssh-agent is in use",
                ));
            }
        },
    };
    // Not trimmed: spaces can be part of a passphrase.
    let passphrase = vars.get_raw("SSH_KEY_PASSPHRASE")?.map(SecretString::from);
    Ok(AuthConfig {
        key_path,
        passphrase,
        use_agent,
        agent_socket: ssh_agent_socket,
        extra_key_paths,
        certificate_path: None,
        identities_only: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_say_what_is_wrong() {
        let e = parse_count("X", "abc", u32::MAX, "a whole number")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "invalid configuration: X: \"abc\" is not a whole number");
        let e = parse_count("X", "-1", u32::MAX, "a whole number")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"-1\" is not a whole number"), "{e}");
        let e = parse_count("X", "99999999999", u32::MAX, "a whole number")
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large (at most 4294967295)"), "{e}");
    }
}
