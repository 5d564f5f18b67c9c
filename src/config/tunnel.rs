//! The SSH tunnel's settings: [`TunnelConfig`], [`AuthConfig`], [`HostKeyPolicy`],
//! [`LocalEndpointConfig`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::{BackoffPolicy, Profile, profile};
#[cfg(doc)]
use super::{Config, ProfileDefaults};
use crate::ssh_config::SshConfigSource;
use crate::{Error, Result};

/// The SSH tunnel.
///
/// Build it with [`TunnelConfig::new`] or [`TunnelConfig::for_profile`]; the remote side is set
/// with [`remote`](TunnelConfig::remote) or taken from `DATABASE_URL` by [`Config::tunnel`].
#[derive(Clone)]
#[non_exhaustive]
pub struct TunnelConfig {
    /// `SSH_HOST`.
    pub host: String,
    /// `SSH_PORT`, default 22.
    pub port: u16,
    /// `SSH_USER`.
    pub user: String,
    /// How to authenticate.
    pub auth: AuthConfig,
    /// `SSH_HOST_KEY_POLICY`, default strict.
    pub host_key_policy: HostKeyPolicy,
    /// `SSH_KNOWN_HOSTS`, default `~/.ssh/known_hosts`.
    pub known_hosts: PathBuf,
    /// `SSH_REMOTE_HOST`: target as seen from the bastion (default: host of DATABASE_URL).
    /// Empty = not set yet.
    pub remote_host: String,
    /// `SSH_REMOTE_PORT`: default: port of DATABASE_URL. 0 = not set yet.
    pub remote_port: u16,
    /// More database servers (`host`, `port`, as the bastion sees them), each forwarded from its
    /// own local endpoint ([`SshTunnel::target_endpoints`](crate::SshTunnel::target_endpoints)),
    /// with TLS (when the tunnel holds it) checked against its own name. The
    /// [`ConnectionManager`](crate::ConnectionManager) and `forward` fill this from a multi-host
    /// `DATABASE_URL` (the hosts after the first, or their `hostaddr`; see
    /// [`Config::with_alternate_targets`](crate::config::Config::with_alternate_targets)) unless
    /// `SSH_REMOTE_HOST` overrides the target. Default none.
    pub alternate_targets: Vec<(String, u16)>,
    /// The name each of [`alternate_targets`](Self::alternate_targets) is checked against when
    /// the tunnel holds TLS, where the bastion dials an address instead (libpq's `hostaddr`
    /// list; [`Config::with_alternate_targets`](crate::config::Config::with_alternate_targets)
    /// fills it). Empty (the default): each target's own host, or `sslservername` for all. Else
    /// one name per alternate target.
    pub alternate_server_names: Vec<String>,
    /// With [`alternate_targets`](Self::alternate_targets): a connection to a server's endpoint
    /// whose server refuses TCP (the bastion answers `connect failed`: the server is down or not
    /// listening) is forwarded to the next server in the list instead (after the last, the
    /// first), TLS checked against that server's name. For libpq clients given every endpoint
    /// as a host list (`forward` turns it on): libpq tries the next host only when its own TCP
    /// connect fails, and a local endpoint always accepts, so without this a dead server would
    /// end the client's attempt instead of being skipped. With the hosts in the printed order
    /// the result is the server libpq would have picked directly (the first reachable one that
    /// passes its `target_session_attrs`); in any order it is a reachable server, whose role
    /// libpq then checks. Default off: the
    /// [`ConnectionManager`](crate::ConnectionManager) chooses among the servers itself, and
    /// its [`Config::validate`](crate::config::Config::validate) refuses a tunnel with this on.
    pub alternate_fallthrough: bool,
    /// `SSH_LOCAL_PORT`: where the local endpoint listens.
    pub local: LocalEndpointConfig,
    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session.
    pub max_channels: usize,
    /// `SSH_MAX_SESSIONS`: SSH sessions opened on demand, default 4 (production: 5, see
    /// [`ProfileDefaults`]).
    pub max_sessions: usize,
    /// Reconnect backoff; `initial_delay` = `SSH_RETRY_DELAY`, `max_retries` = `SSH_MAX_RETRIES` (0 = forever).
    pub reconnect: BackoffPolicy,
    /// `SSH_KEEPALIVE_INTERVAL`, default 5 s.
    pub keepalive_interval: Duration,
    /// `SSH_KEEPALIVE_MAX`: missed replies before the link counts as dead, default 3.
    pub keepalive_max: usize,
    /// TCP connect + handshake + auth timeout; also bounds how long a local connection waits for
    /// a session or capacity. Defaults to the pool connection timeout.
    pub connect_timeout: Duration,
    /// How long an extra SSH session opened for capacity may stay without channels before it is
    /// closed; the last session is always kept. Default 60 s.
    pub session_idle_timeout: Duration,
    /// `SSH_PROXY_JUMP` (OpenSSH `ProxyJump`): jump hosts to pass through, in order, before
    /// [`host`](Self::host). Empty = connect directly. Default empty.
    pub proxy_jump: Vec<JumpHost>,
    /// ssh_config `HostKeyAlias`: the name to look up and record in known_hosts instead of
    /// [`host`](Self::host) (the port is then not part of the lookup). Default `None`.
    pub host_key_alias: Option<String>,
    /// More known_hosts files to read, after [`known_hosts`](Self::known_hosts) (ssh_config's
    /// further `UserKnownHostsFile`s and `GlobalKnownHostsFile`). Only read: `accept-new` appends
    /// to [`known_hosts`](Self::known_hosts). Default empty.
    pub extra_known_hosts: Vec<PathBuf>,
    /// `SSH_CONFIG`: the ssh_config files [`host`](Self::host) was resolved in (and where jump
    /// host names are looked up). Default [`SshConfigSource::Disabled`] for code-built configs:
    /// `TunnelConfig::new` never reads `~/.ssh/config`; [`TunnelConfig::from_ssh_config`] and
    /// [`Config::from_env`] do.
    pub ssh_config: SshConfigSource,
    /// The ssh_config `Host` alias [`host`](Self::host) was resolved from, for messages. `None`
    /// when no ssh_config was applied. Default `None`.
    pub ssh_alias: Option<String>,
    /// More bastions after [`host`](Self::host):[`port`](Self::port), tried in order when the
    /// ones before are unreachable or their sessions die (`SSH_HOST=a,b:2222`: everything after
    /// the first). Each is reached through the same [`proxy_jump`](Self::proxy_jump) chain, with
    /// the same user, credentials and host-key policy. Default empty. See
    /// [`fallback_host`](Self::fallback_host) for the failover rule.
    pub fallback_hosts: Vec<BastionHost>,
    /// TLS from the tunnel to PostgreSQL for every forwarded connection (see [`crate::tls`]).
    /// `None` (the default): the [`ConnectionManager`](crate::ConnectionManager) and
    /// `sea-orm-tunnel forward` take it from `DATABASE_URL`; a tunnel used on its own copies
    /// bytes untouched.
    pub postgres_tls: Option<crate::tls::PostgresTls>,
    /// PgBouncer (transaction pooling) compatibility in the forward path: named prepared
    /// statements are rewritten to the unnamed one (see [`Config::pgbouncer`]). The manager and
    /// `forward` set it from the configuration. Default false.
    pub pgbouncer: bool,
    /// `SSH_CHANNEL_WINDOW`: bytes the bastion may send on one channel before we acknowledge
    /// them, which bounds one connection's throughput over a long round trip. russh tops the
    /// window up when half of it is used, so about 0.4 × window moves per round trip (measured:
    /// 8 MiB → 68 MB/s at +50 ms). Default 8 MiB; between 64 KiB and 1 GiB.
    pub channel_window: u32,
    /// `SSH_SPARE_CHANNEL` (ms): after a local connection gets its channel, open one more to the
    /// same database server and keep it ready for up to this long, so that the next local
    /// connection skips the channel-open round trip to the bastion (50 ms with the bastion 50 ms
    /// away). The bastion connects a spare to the server at once: PostgreSQL forks a backend that
    /// waits for a startup message (up to its `authentication_timeout`, 60 s by default, so keep
    /// this below that; PgBouncer's limit is `client_login_timeout`) and logs nothing when the
    /// spare is closed unused, unless `log_connections` is on. Only a served connection asks for a
    /// spare, so an idle tunnel holds none once this has passed; a spare is checked before use,
    /// and spares are discarded when the tunnel reconnects or shuts down and, with the
    /// [`ConnectionManager`](crate::ConnectionManager), on every failover signal
    /// ([`SshTunnel::discard_spares`](crate::SshTunnel::discard_spares)). `None` (the default):
    /// no spares. At most 600 s.
    pub spare_channel: Option<Duration>,
    /// Local connections served at once, on all local endpoints together; one more is answered
    /// with a PostgreSQL `ErrorResponse` (SQLSTATE 53300, too many connections) and closed. `None` = no limit
    /// (the default; `sea-orm-tunnel forward --max-connections` sets it).
    pub max_local_connections: Option<usize>,
}

/// The default [`TunnelConfig::channel_window`]: 8 MiB.
pub const DEFAULT_CHANNEL_WINDOW: u32 = 8 * 1024 * 1024;

/// A bastion address, `host:port` (see [`TunnelConfig::fallback_hosts`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct BastionHost {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// One hop of a ProxyJump chain: `[user@]host[:port]`.
///
/// `user` and `port` unset mean the tunnel's user and port 22 (OpenSSH's meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JumpHost {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port; `None` = 22.
    pub port: Option<u16>,
    /// Login name; `None` = the tunnel's [`user`](TunnelConfig::user).
    pub user: Option<String>,
}

/// SSH authentication sources, tried in order: key file, then agent.
///
/// `Debug` shows whether a passphrase is set, never the passphrase.
#[derive(Clone)]
#[non_exhaustive]
pub struct AuthConfig {
    /// `SSH_KEY_PATH` (`~` expanded). `None` = no key file.
    pub key_path: Option<PathBuf>,
    /// `SSH_KEY_PASSPHRASE`.
    pub passphrase: Option<SecretString>,
    /// `SSH_USE_AGENT`: try the agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
    /// The ssh-agent socket to use instead of `SSH_AUTH_SOCK` (read when the tunnel connects).
    /// Default `None`.
    pub agent_socket: Option<PathBuf>,
    /// More private keys to offer after [`key_path`](Self::key_path), in order (ssh_config's
    /// further `IdentityFile`s). Default empty.
    pub extra_key_paths: Vec<PathBuf>,
    /// `SSH_CERTIFICATE_PATH` (ssh_config `CertificateFile`): an OpenSSH user certificate for
    /// the key. `None` = `<key>-cert.pub` when that file exists. Default `None`.
    pub certificate_path: Option<PathBuf>,
    /// ssh_config `IdentitiesOnly`: offer agent keys only when they match a configured key
    /// file. Default false.
    pub identities_only: bool,
}

/// How the bastion's host key is verified.
///
/// Parses from the `SSH_HOST_KEY_POLICY` spellings: `strict`, `accept-new`, `SHA256:<base64>`
/// and `insecure-accept-any`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Must be in known_hosts (OpenSSH `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Learn an unknown host (append to known_hosts), reject a changed key.
    AcceptNew,
    /// Must match this `SHA256:...` fingerprint (with the prefix, base64 unpadded, as
    /// `ssh-keygen -lf` prints it).
    Fingerprint(String),
    /// Accept any key. Insecure: logs a warning on every connect.
    InsecureAcceptAny,
}

/// Where the tunnel's local endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalEndpointConfig {
    /// `127.0.0.1:port`; 0 = ephemeral.
    Tcp(u16),
    /// A Unix socket in a private 0700 directory (created in the temp dir).
    Unix,
}

impl TunnelConfig {
    /// A tunnel through `user@host:22` with the development profile's defaults.
    ///
    /// The remote side is unset until [`remote`](Self::remote) sets it or [`Config::tunnel`]
    /// takes it from `DATABASE_URL`. Authentication defaults to [`AuthConfig::new`]
    /// (`~/.ssh/id_ed25519` if it exists, and the agent if `SSH_AUTH_SOCK` points at a socket).
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> Self {
        Self::for_profile(Profile::Development, host, user)
    }

    /// A tunnel through `user@host:22` with `profile`'s defaults (see [`ProfileDefaults`]).
    pub fn for_profile(profile: Profile, host: impl Into<String>, user: impl Into<String>) -> Self {
        let d = profile.defaults();
        TunnelConfig {
            host: host.into(),
            port: profile::SSH_PORT,
            user: user.into(),
            auth: AuthConfig::new(),
            // Verify like OpenSSH does by default; anything weaker must be chosen explicitly.
            host_key_policy: HostKeyPolicy::Strict,
            known_hosts: home_dir().map_or_else(|| PathBuf::from(".ssh/known_hosts"), |h| h.join(".ssh/known_hosts")),
            remote_host: String::new(),
            remote_port: 0,
            alternate_targets: Vec::new(),
            alternate_server_names: Vec::new(),
            alternate_fallthrough: false,
            // An ephemeral loopback port never collides with another process or a second tunnel.
            local: LocalEndpointConfig::Tcp(0),
            max_channels: d.max_channels,
            max_sessions: d.max_sessions,
            reconnect: BackoffPolicy::reconnect(profile),
            keepalive_interval: profile::KEEPALIVE_INTERVAL,
            keepalive_max: profile::KEEPALIVE_MAX,
            connect_timeout: d.connect_timeout,
            session_idle_timeout: Duration::from_secs(60),
            proxy_jump: Vec::new(),
            host_key_alias: None,
            extra_known_hosts: Vec::new(),
            fallback_hosts: Vec::new(),
            ssh_config: SshConfigSource::Disabled,
            ssh_alias: None,
            postgres_tls: None,
            pgbouncer: false,
            channel_window: DEFAULT_CHANNEL_WINDOW,
            spare_channel: None,
            max_local_connections: None,
        }
    }

    /// `SSH_PROXY_JUMP`: pass through these jump hosts, in order (empty = connect directly).
    #[must_use]
    pub fn proxy_jump(mut self, hops: impl IntoIterator<Item = JumpHost>) -> Self {
        self.proxy_jump = hops.into_iter().collect();
        self
    }

    /// ssh_config `HostKeyAlias`: verify and record the host key under this name.
    #[must_use]
    pub fn host_key_alias(mut self, alias: impl Into<String>) -> Self {
        self.host_key_alias = Some(alias.into());
        self
    }

    /// Also read these known_hosts files (read-only), after [`known_hosts`](Self::known_hosts).
    #[must_use]
    pub fn extra_known_hosts(mut self, files: impl IntoIterator<Item = PathBuf>) -> Self {
        self.extra_known_hosts = files.into_iter().collect();
        self
    }

    /// `SSH_HOST`: the bastion.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// `SSH_PORT`. Default 22, the SSH standard port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// `SSH_USER`.
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// Authentication sources. Default [`AuthConfig::new`].
    #[must_use]
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// Changes the authentication sources in place.
    #[must_use]
    pub fn map_auth(mut self, f: impl FnOnce(AuthConfig) -> AuthConfig) -> Self {
        self.auth = f(self.auth);
        self
    }

    /// `SSH_HOST_KEY_POLICY`. Default [`HostKeyPolicy::Strict`]: the key must already be in
    /// known_hosts, as OpenSSH requires by default; TOFU and pinning are opt-in.
    #[must_use]
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.host_key_policy = policy;
        self
    }

    /// `SSH_KNOWN_HOSTS` (a leading `~/` is expanded with `$HOME`). Default `~/.ssh/known_hosts`,
    /// the file OpenSSH uses, so hosts the user already trusts are trusted here.
    #[must_use]
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_hosts = expand_home(path.into());
        self
    }

    /// `SSH_REMOTE_HOST` / `SSH_REMOTE_PORT`: the PostgreSQL server as seen from the bastion.
    /// Default: host and port of `DATABASE_URL` (filled in by [`Config::tunnel`]).
    #[must_use]
    pub fn remote(mut self, host: impl Into<String>, port: u16) -> Self {
        self.remote_host = host.into();
        self.remote_port = port;
        self
    }

    /// `SSH_LOCAL_PORT`: where the local endpoint listens. Default `Tcp(0)`: an ephemeral
    /// loopback port, which never collides with another process or another tunnel.
    #[must_use]
    pub fn local(mut self, local: LocalEndpointConfig) -> Self {
        self.local = local;
        self
    }

    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session. Default from the profile
    /// (10 / 20): sshd serves each session in one process, so this
    /// bounds how much crypto one process does.
    #[must_use]
    pub fn max_channels(mut self, max: usize) -> Self {
        self.max_channels = max;
        self
    }

    /// `SSH_MAX_SESSIONS`: SSH sessions opened on demand when every session is full. Default 4
    /// (production 5, see [`ProfileDefaults`]): enough for the profile's pool, few enough not to
    /// look like a connection flood to the bastion.
    #[must_use]
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Reconnect backoff. Default [`BackoffPolicy::reconnect`] for the profile.
    #[must_use]
    pub fn reconnect(mut self, policy: BackoffPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Changes the reconnect backoff in place.
    #[must_use]
    pub fn map_reconnect(mut self, f: impl FnOnce(BackoffPolicy) -> BackoffPolicy) -> Self {
        self.reconnect = f(self.reconnect);
        self
    }

    /// `SSH_KEEPALIVE_INTERVAL`. Default 5 s: with 3 missed replies a silent dead link is found
    /// in about 20 s, long before the 30–60 s health interval, at one tiny packet per 5 s.
    #[must_use]
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = interval;
        self
    }

    /// `SSH_KEEPALIVE_MAX`: missed keepalive replies before the link counts as dead. Default 3
    /// (OpenSSH's `ServerAliveCountMax`): one lost packet on a busy link is not an outage.
    #[must_use]
    pub fn keepalive_max(mut self, max: usize) -> Self {
        self.keepalive_max = max;
        self
    }

    /// TCP connect + handshake + auth timeout, also the bound on how long a local connection
    /// waits for a session or a free channel. Default: the profile's connection timeout (2 s /
    /// 3 s), so the tunnel never waits longer than the pool would for a connection.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an extra SSH session opened for capacity may stay without channels before it is
    /// closed (SSH disconnect); the last session is always kept. Default 60 s: a burst that needed
    /// more sessions does not leave idle sshd processes behind for the tunnel's whole life, and a
    /// pool that cycles its connections does not reopen a session for every one. Must be above zero.
    #[must_use]
    pub fn session_idle_timeout(mut self, timeout: Duration) -> Self {
        self.session_idle_timeout = timeout;
        self
    }

    /// Adds a bastion to fail over to, after [`host`](Self::host) and the fallbacks added
    /// before (`SSH_HOST=a,b:2222`).
    ///
    /// # Failover rule
    ///
    /// - Every connect (the first one, each reconnect attempt, a session opened for capacity)
    ///   walks the bastions in configuration order and uses the first that works; a bastion
    ///   that failed recently (a transient connect error, or a session on it was lost) is tried
    ///   only after the others, until `reconnect.max_delay` has passed since that failure. So
    ///   after the first bastion dies the next reconnect goes straight to the next one, and the
    ///   first is preferred again for sessions opened once it has been quiet for that long.
    /// - Live sessions are never moved: a session on a fallback stays until it dies or is
    ///   retired idle.
    /// - A permanent error on one bastion (host key unknown or changed, authentication refused)
    ///   takes that bastion out for the tunnel's life (logged, and reported in the error of a
    ///   round that fails) but does not stop failover to the others. The tunnel fails for good
    ///   only when every bastion has failed permanently.
    #[must_use]
    pub fn fallback_host(mut self, host: impl Into<String>, port: u16) -> Self {
        self.fallback_hosts.push(BastionHost {
            host: host.into(),
            port,
        });
        self
    }

    /// Every bastion in the order they are tried: [`host`](Self::host):[`port`](Self::port),
    /// then the [`fallback_hosts`](Self::fallback_hosts).
    pub fn bastions(&self) -> Vec<BastionHost> {
        std::iter::once(BastionHost {
            host: self.host.clone(),
            port: self.port,
        })
        .chain(self.fallback_hosts.iter().cloned())
        .collect()
    }

    /// `SSH_CHANNEL_WINDOW`: the SSH channel window in bytes (see
    /// [`channel_window`](Self::channel_window)). Default 8 MiB.
    #[must_use]
    pub fn channel_window(mut self, bytes: u32) -> Self {
        self.channel_window = bytes;
        self
    }

    /// `SSH_SPARE_CHANNEL`: keep one channel ready for up to `ttl` after each forwarded
    /// connection (see [`spare_channel`](Self::spare_channel)); `None` turns spares off (the
    /// default).
    #[must_use]
    pub fn spare_channel(mut self, ttl: Option<Duration>) -> Self {
        self.spare_channel = ttl;
        self
    }

    /// PgBouncer (transaction pooling) compatibility in the forward path (see
    /// [`pgbouncer`](Self::pgbouncer)). Default false.
    #[must_use]
    pub fn pgbouncer(mut self, enabled: bool) -> Self {
        self.pgbouncer = enabled;
        self
    }

    /// A connection to an endpoint whose server refuses TCP goes to the next server (see
    /// [`alternate_fallthrough`](Self::alternate_fallthrough)). Default false.
    #[must_use]
    pub fn alternate_fallthrough(mut self, on: bool) -> Self {
        self.alternate_fallthrough = on;
        self
    }

    /// Local connections served at once (see
    /// [`max_local_connections`](Self::max_local_connections)); `None` = no limit.
    #[must_use]
    pub fn max_local_connections(mut self, max: Option<usize>) -> Self {
        self.max_local_connections = max;
        self
    }

    /// TLS to PostgreSQL held by the tunnel (see [`crate::tls`]); overrides what
    /// `DATABASE_URL` says.
    #[must_use]
    pub fn postgres_tls(mut self, tls: crate::tls::PostgresTls) -> Self {
        self.postgres_tls = Some(tls);
        self
    }

    /// The remote target as `host:port` (IPv6 hosts in brackets), for logs and errors.
    pub fn remote_target(&self) -> String {
        crate::url::host_port(&self.remote_host, self.remote_port)
    }
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("auth", &self.auth)
            .field("host_key_policy", &self.host_key_policy)
            .field("known_hosts", &self.known_hosts)
            .field("remote_host", &self.remote_host)
            .field("remote_port", &self.remote_port)
            .field("alternate_targets", &self.alternate_targets)
            .field("alternate_server_names", &self.alternate_server_names)
            .field("alternate_fallthrough", &self.alternate_fallthrough)
            .field("local", &self.local)
            .field("max_channels", &self.max_channels)
            .field("max_sessions", &self.max_sessions)
            .field("reconnect", &self.reconnect)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_max", &self.keepalive_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .field("proxy_jump", &self.proxy_jump)
            .field("host_key_alias", &self.host_key_alias)
            .field("extra_known_hosts", &self.extra_known_hosts)
            .field("fallback_hosts", &self.fallback_hosts)
            .field("ssh_config", &self.ssh_config)
            .field("ssh_alias", &self.ssh_alias)
            .field("postgres_tls", &self.postgres_tls)
            .field("pgbouncer", &self.pgbouncer)
            .field("channel_window", &self.channel_window)
            .field("spare_channel", &self.spare_channel)
            .field("max_local_connections", &self.max_local_connections)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// AuthConfig
// ---------------------------------------------------------------------------------------------

impl AuthConfig {
    /// What `ssh` would try: `~/.ssh/id_ed25519` if that file exists, and the agent if
    /// `SSH_AUTH_SOCK` points at an existing socket. Reads `HOME` and `SSH_AUTH_SOCK` from the
    /// process environment.
    pub fn new() -> Self {
        let key = home_dir().map(|h| h.join(".ssh/id_ed25519")).filter(|p| p.exists());
        let agent = std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| Path::new(&s).exists());
        AuthConfig {
            key_path: key,
            passphrase: None,
            use_agent: agent,
            agent_socket: None,
            extra_key_paths: Vec::new(),
            certificate_path: None,
            identities_only: false,
        }
    }

    /// Only this private key (a leading `~/` is expanded with `$HOME`), no agent.
    pub fn key_file(path: impl Into<PathBuf>) -> Self {
        AuthConfig {
            key_path: Some(expand_home(path.into())),
            passphrase: None,
            use_agent: false,
            agent_socket: None,
            extra_key_paths: Vec::new(),
            certificate_path: None,
            identities_only: false,
        }
    }

    /// Only the agent at `SSH_AUTH_SOCK`, no key file.
    pub fn agent() -> Self {
        AuthConfig {
            key_path: None,
            passphrase: None,
            use_agent: true,
            agent_socket: None,
            extra_key_paths: Vec::new(),
            certificate_path: None,
            identities_only: false,
        }
    }

    /// `SSH_KEY_PATH`: the private key to offer first (a leading `~/` is expanded with `$HOME`).
    #[must_use]
    pub fn key_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_path = Some(expand_home(path.into()));
        self
    }

    /// Offers no key file (agent only, if enabled).
    #[must_use]
    pub fn without_key(mut self) -> Self {
        self.key_path = None;
        self.passphrase = None;
        self
    }

    /// `SSH_KEY_PASSPHRASE`: decrypts an encrypted key. Default none.
    #[must_use]
    pub fn passphrase(mut self, passphrase: impl Into<String>) -> Self {
        self.passphrase = Some(SecretString::from(passphrase.into()));
        self
    }

    /// `SSH_USE_AGENT`: also try the keys of the agent at `SSH_AUTH_SOCK`. Default: on when that
    /// socket exists, as `ssh` does.
    #[must_use]
    pub fn use_agent(mut self, enabled: bool) -> Self {
        self.use_agent = enabled;
        self
    }

    /// `SSH_CERTIFICATE_PATH`: the OpenSSH user certificate to present with the key (default:
    /// `<key>-cert.pub` when that file exists). A leading `~/` is expanded with `$HOME`.
    #[must_use]
    pub fn certificate(mut self, path: impl Into<PathBuf>) -> Self {
        self.certificate_path = Some(expand_home(path.into()));
        self
    }

    /// More private keys to offer after [`key_path`](Self::key_path), in order.
    #[must_use]
    pub fn extra_key_paths(mut self, paths: impl IntoIterator<Item = PathBuf>) -> Self {
        self.extra_key_paths = paths.into_iter().map(expand_home).collect();
        self
    }

    /// ssh_config `IdentitiesOnly`: offer agent keys only when they match a configured key file.
    #[must_use]
    pub fn identities_only(mut self, only: bool) -> Self {
        self.identities_only = only;
        self
    }

    /// Use the ssh-agent listening on `socket` instead of the one `SSH_AUTH_SOCK` names, and
    /// enable the agent. For services that run their own agent, and for tests.
    #[must_use]
    pub fn agent_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.agent_socket = Some(socket.into());
        self.use_agent = true;
        self
    }
}

impl Default for AuthConfig {
    /// Same as [`AuthConfig::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("key_path", &self.key_path)
            .field("passphrase", &self.passphrase.as_ref().map(|_| Redacted))
            .field("use_agent", &self.use_agent)
            .field("agent_socket", &self.agent_socket)
            .field("extra_key_paths", &self.extra_key_paths)
            .field("certificate_path", &self.certificate_path)
            .field("identities_only", &self.identities_only)
            .finish()
    }
}

/// `$HOME` from the process environment.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// Expands a leading `~` / `~/` with the process's `$HOME`; other paths are returned unchanged.
pub(crate) fn expand_home(path: PathBuf) -> PathBuf {
    match (path.strip_prefix("~"), home_dir()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path,
    }
}

// ---------------------------------------------------------------------------------------------
// HostKeyPolicy, LocalEndpointConfig
// ---------------------------------------------------------------------------------------------

impl HostKeyPolicy {
    /// Pins a `SHA256:<base64>` fingerprint as `ssh-keygen -lf KEY` prints it. Base64 padding
    /// (`=`) is removed; anything that is not a SHA-256 fingerprint is an error.
    pub fn fingerprint(fingerprint: &str) -> Result<Self> {
        let fp = fingerprint.trim();
        let body = fp.strip_prefix("SHA256:").or_else(|| {
            fp.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("sha256:"))
                .map(|_| &fp[7..])
        });
        match body.map(|b| b.trim_end_matches('=')) {
            Some(b) if is_sha256_base64(b) => Ok(HostKeyPolicy::Fingerprint(format!("SHA256:{b}"))),
            _ => Err(Error::config(
                "SSH_HOST_KEY_POLICY",
                format!(
                    "{fp:?} is not a host key fingerprint of the form SHA256:<43 base64 characters> \
                     (see `ssh-keygen -lf KEY`), nor one of strict, accept-new, insecure-accept-any"
                ),
            )),
        }
    }
}

/// Whether `b` is the unpadded base64 of 32 bytes: 43 characters of the standard alphabet, the
/// last of which carries only 2 data bits (so a typo in it is caught too).
pub(crate) fn is_sha256_base64(b: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = b.as_bytes();
    bytes.len() == 43
        && bytes.iter().all(|c| ALPHABET.contains(c))
        && ALPHABET
            .iter()
            .position(|c| *c == bytes[42])
            .is_some_and(|i| i % 4 == 0)
}

impl FromStr for HostKeyPolicy {
    type Err = Error;

    /// `strict`, `accept-new`, `insecure-accept-any` (case-insensitive) or `SHA256:<base64>`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(HostKeyPolicy::Strict),
            "accept-new" => Ok(HostKeyPolicy::AcceptNew),
            "insecure-accept-any" => Ok(HostKeyPolicy::InsecureAcceptAny),
            _ => HostKeyPolicy::fingerprint(s),
        }
    }
}

impl fmt::Display for HostKeyPolicy {
    /// The `SSH_HOST_KEY_POLICY` spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyPolicy::Strict => f.write_str("strict"),
            HostKeyPolicy::AcceptNew => f.write_str("accept-new"),
            HostKeyPolicy::Fingerprint(fp) => f.write_str(fp),
            HostKeyPolicy::InsecureAcceptAny => f.write_str("insecure-accept-any"),
        }
    }
}

impl JumpHost {
    /// A hop `host` with the tunnel's user and port 22.
    pub fn new(host: impl Into<String>) -> Self {
        JumpHost {
            host: host.into(),
            port: None,
            user: None,
        }
    }

    /// The port of this hop.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The login name on this hop.
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Parses OpenSSH `ProxyJump` syntax: comma-separated `[user@]host[:port]` or
    /// `ssh://[user@]host[:port]`, IPv6 addresses in brackets; `none` (or empty) = no hops.
    /// `variable` names the setting in errors (e.g. `SSH_PROXY_JUMP`).
    pub fn parse_list(value: &str, variable: &str) -> Result<Vec<JumpHost>> {
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("none") {
            return Ok(Vec::new());
        }
        value
            .split(',')
            .map(|hop| JumpHost::parse_one(hop.trim(), variable))
            .collect()
    }

    fn parse_one(hop: &str, variable: &str) -> Result<JumpHost> {
        let bad = |why: &str| Error::config(variable, format!("jump host {hop:?} {why}"));
        let rest = hop.strip_prefix("ssh://").unwrap_or(hop);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, hostport) = match rest.rsplit_once('@') {
            Some(("", _)) => return Err(bad("has an empty user name before '@'")),
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(|| bad("has '[' without ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("has text after ']'"))?),
                ),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h, Some(p)),
                // A bare IPv6 address without brackets and without a port.
                Some(_) => (hostport, None),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host name"));
        }
        if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c == '/' || c == '\\') {
            return Err(bad("is not a valid host name"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad("has a port that is not a number from 1 to 65535")),
                Ok(p) => Some(p),
            },
        };
        Ok(JumpHost {
            host: host.to_owned(),
            port,
            user,
        })
    }
}

impl fmt::Display for JumpHost {
    /// `[user@]host[:port]`, IPv6 hosts in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match (self.host.contains(':'), self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (_, None) => f.write_str(&self.host),
        }
    }
}

impl BastionHost {
    /// A bastion at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        BastionHost {
            host: host.into(),
            port,
        }
    }

    /// Parses the `SSH_HOST` list: comma-separated `host[:port]`, IPv6 addresses in brackets
    /// when a port follows. Entries without a port get `None` (the caller applies `SSH_PORT`).
    /// `variable` names the setting in errors.
    pub(crate) fn parse_list(value: &str, variable: &str) -> Result<Vec<(String, Option<u16>)>> {
        let value = value.trim();
        if value.is_empty() {
            return Err(Error::config(variable, "names no bastion"));
        }
        value
            .split(',')
            .map(|entry| {
                let hop = JumpHost::parse_one(entry.trim(), variable)?;
                if hop.user.is_some() {
                    return Err(Error::config(
                        variable,
                        format!(
                            "bastion {:?} has a user name: set SSH_USER (it applies to every bastion)",
                            entry.trim()
                        ),
                    ));
                }
                Ok((hop.host, hop.port))
            })
            .collect()
    }
}

impl fmt::Display for BastionHost {
    /// `host:port`, IPv6 hosts in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::url::host_port(&self.host, self.port))
    }
}

impl Default for LocalEndpointConfig {
    /// `Tcp(0)`: an ephemeral loopback port.
    fn default() -> Self {
        LocalEndpointConfig::Tcp(0)
    }
}

impl fmt::Display for LocalEndpointConfig {
    /// The `SSH_LOCAL_PORT` spelling: a port number or `unix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalEndpointConfig::Tcp(port) => write!(f, "{port}"),
            LocalEndpointConfig::Unix => f.write_str("unix"),
        }
    }
}

struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_shape() {
        let good = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        assert_eq!(
            HostKeyPolicy::from_str(good).unwrap(),
            HostKeyPolicy::Fingerprint(good.into())
        );
        assert_eq!(
            HostKeyPolicy::from_str(&format!("{good}=")).unwrap(),
            HostKeyPolicy::Fingerprint(good.into())
        );
        // Last character carries bits that a 32-byte value cannot have.
        assert!(HostKeyPolicy::from_str("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2t").is_err());
        assert!(HostKeyPolicy::from_str("SHA256:short").is_err());
        assert!(HostKeyPolicy::from_str("MD5:aa:bb").is_err());
    }

    #[test]
    fn bastion_list_syntax() {
        let list = BastionHost::parse_list("a, b:2222,[::1]:23,fe80::1", "SSH_HOST").unwrap();
        assert_eq!(
            list,
            vec![
                ("a".to_owned(), None),
                ("b".to_owned(), Some(2222)),
                ("::1".to_owned(), Some(23)),
                ("fe80::1".to_owned(), None),
            ]
        );
        for bad in ["", "a,,b", "a:0", "u@a", "a b"] {
            let e = BastionHost::parse_list(bad, "SSH_HOST").unwrap_err().to_string();
            assert!(e.contains("SSH_HOST"), "{bad}: {e}");
        }
        let config = TunnelConfig::new("a", "u").port(2200).fallback_host("::1", 22);
        let all: Vec<String> = config.bastions().iter().map(ToString::to_string).collect();
        assert_eq!(all, ["a:2200", "[::1]:22"]);
        let bad = TunnelConfig::new("a", "u")
            .remote("db", 5432)
            .fallback_host("", 22)
            .validate()
            .unwrap_err();
        assert!(bad.to_string().contains("tunnel.fallback_hosts"), "{bad}");
        assert!(
            TunnelConfig::new("a", "u")
                .remote("db", 5432)
                .fallback_host("b", 0)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn proxy_jump_syntax() {
        let hops =
            JumpHost::parse_list("alice@jump1:2222, jump2,ssh://bob@[::1]:23,[fe80::1]", "SSH_PROXY_JUMP").unwrap();
        assert_eq!(
            hops,
            vec![
                JumpHost::new("jump1").user("alice").port(2222),
                JumpHost::new("jump2"),
                JumpHost::new("::1").user("bob").port(23),
                JumpHost::new("fe80::1"),
            ]
        );
        assert_eq!(hops[2].to_string(), "bob@[::1]:23");
        assert_eq!(hops[0].to_string(), "alice@jump1:2222");
        assert!(JumpHost::parse_list("none", "X").unwrap().is_empty());
        for bad in ["jump:0", "jump:http", "@jump", "a,,b", "[::1", "-oProxyCommand=x"] {
            let e = JumpHost::parse_list(bad, "SSH_PROXY_JUMP").unwrap_err().to_string();
            assert!(e.contains("SSH_PROXY_JUMP"), "{bad}: {e}");
        }
    }
}
