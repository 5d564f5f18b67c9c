//! Step-by-step diagnosis of the path to PostgreSQL: TCP reach, SSH handshake, host key,
//! authentication, channel open, database login, `SELECT 1`.
//!
//! [`diagnose`] walks the steps in order against a [`Config`] and stops at the first failure; the
//! [`Diagnosis`] it returns has one [`Step`] for every [`StepKind`], each with its outcome, time,
//! detail and (for a failure) a hint. `sea-orm-tunnel check` prints exactly this.
//!
//! ```no_run
//! # async fn demo() -> sea_orm_tunnel::Result<()> {
//! use sea_orm_tunnel::config::Config;
//! use sea_orm_tunnel::tunnel::diagnose::{Outcome, diagnose};
//!
//! let config = Config::from_env()?;
//! let diagnosis = diagnose(&config).await?;
//! for step in diagnosis.steps() {
//!     println!("{:<15} {:?} {}", step.kind.name(), step.outcome, step.detail);
//! }
//! if let Some(failed) = diagnosis.failure() {
//!     assert_eq!(failed.outcome, Outcome::Failed);
//!     std::process::exit(i32::from(failed.kind.exit_code()));
//! }
//! # Ok(()) }
//! ```
//!
//! Nothing is sent before it is needed: the handshake step stops right after the server proved
//! its host key (no user name, no key), and the password only travels in the database login.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx::{self, Connection as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{Config, TunnelConfig};
use crate::tunnel::{LocalEndpoint, SshTunnel, TunnelEvent};
use crate::{Error, Result};

/// One step of a diagnosis, in the order they run.
///
/// Each step's number is stable, and so is the exit code `sea-orm-tunnel check` gives when it
/// fails ([`exit_code`](Self::exit_code), `10 +` the number). Steps added later get new numbers
/// after the existing ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StepKind {
    /// A TCP connection to the bastion (or, without a tunnel, to PostgreSQL) is accepted.
    TcpReach,
    /// The bastion speaks SSH and proves a host key in a key exchange.
    SshHandshake,
    /// The host key passes the configured policy and known_hosts.
    HostKey,
    /// The bastion accepts the user and credentials.
    Authentication,
    /// The bastion opens a `direct-tcpip` channel to the remote target, and PostgreSQL answers
    /// through it.
    ChannelOpen,
    /// PostgreSQL accepts the login from `DATABASE_URL`.
    DatabaseLogin,
    /// `SELECT 1` returns 1.
    SelectOne,
    /// The tunnel negotiates TLS with PostgreSQL as `DATABASE_URL`'s `sslmode` asks (protocol,
    /// cipher, what was verified, days until the server certificate expires). Runs after
    /// [`ChannelOpen`](Self::ChannelOpen); number 8 (exit code 18) because it was added later.
    Tls,
}

impl StepKind {
    /// Every step, in the order they run.
    pub const ALL: [StepKind; 8] = [
        StepKind::TcpReach,
        StepKind::SshHandshake,
        StepKind::HostKey,
        StepKind::Authentication,
        StepKind::ChannelOpen,
        StepKind::Tls,
        StepKind::DatabaseLogin,
        StepKind::SelectOne,
    ];

    /// The step's number, from 1.
    pub fn number(self) -> u8 {
        match self {
            StepKind::TcpReach => 1,
            StepKind::SshHandshake => 2,
            StepKind::HostKey => 3,
            StepKind::Authentication => 4,
            StepKind::ChannelOpen => 5,
            StepKind::DatabaseLogin => 6,
            StepKind::SelectOne => 7,
            StepKind::Tls => 8,
        }
    }

    /// The step's place in [`ALL`](Self::ALL) (the order they run), from 1.
    pub fn position(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).map_or(0, |i| i + 1)
    }

    /// The short name `sea-orm-tunnel check` prints, e.g. `host key`.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::TcpReach => "TCP reach",
            StepKind::SshHandshake => "SSH handshake",
            StepKind::HostKey => "host key",
            StepKind::Authentication => "authentication",
            StepKind::ChannelOpen => "channel open",
            StepKind::DatabaseLogin => "database login",
            StepKind::SelectOne => "SELECT 1",
            StepKind::Tls => "TLS",
        }
    }

    /// The process exit code for a failure at this step: 10 + [`number`](Self::number)
    /// (11 TCP reach ... 17 SELECT 1, 18 TLS).
    pub fn exit_code(self) -> u8 {
        10 + self.number()
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The step worked.
    Ok,
    /// The step failed; the diagnosis stopped here.
    Failed,
    /// The step does not apply (e.g. the SSH steps without a tunnel); the detail says why.
    Skipped,
    /// An earlier step failed, so this one was not attempted.
    NotRun,
}

/// One step's result.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Step {
    /// Which step.
    pub kind: StepKind,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took, for the steps that are timed on their own.
    pub elapsed: Option<Duration>,
    /// What was found (for a failure: the error), never containing a password. Empty for a step
    /// that was not run.
    pub detail: String,
    /// What to look at next, for a failure that has a likely fix.
    pub hint: Option<String>,
}

impl Step {
    /// The exit code for this step's failure ([`StepKind::exit_code`]); `None` unless it failed.
    pub fn exit_code(&self) -> Option<u8> {
        (self.outcome == Outcome::Failed).then(|| self.kind.exit_code())
    }
}

/// How the diagnosis reached PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// No tunnel is configured: PostgreSQL directly; the SSH steps are skipped.
    Direct,
    /// Through the SSH tunnel.
    Tunnel,
}

/// The result of [`diagnose`]: one [`Step`] per [`StepKind`], in order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Diagnosis {
    /// Directly or through the tunnel.
    pub route: Route,
    /// Every step, in [`StepKind::ALL`] order.
    pub steps: Vec<Step>,
    /// Wall time of the whole diagnosis.
    pub total: Duration,
}

impl Diagnosis {
    /// Every step, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The step for `kind`.
    pub fn step(&self, kind: StepKind) -> Option<&Step> {
        self.steps.iter().find(|s| s.kind == kind)
    }

    /// The failed step, if any (there is at most one: the diagnosis stops there).
    pub fn failure(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.outcome == Outcome::Failed)
    }

    /// Whether every step worked or was skipped.
    pub fn is_ok(&self) -> bool {
        self.failure().is_none()
    }

    /// The process exit code `sea-orm-tunnel check` gives: 0 when everything works, otherwise
    /// the failed step's [`StepKind::exit_code`].
    pub fn exit_code(&self) -> u8 {
        self.failure().and_then(Step::exit_code).unwrap_or(0)
    }
}

/// Diagnoses the path to PostgreSQL described by `config`, step by step.
///
/// Uses `config.pool.connect_timeout` as the bound of every network step, and one quick retry
/// of a transient SSH failure instead of the configured reconnect schedule, so the answer comes
/// promptly. Opens its own short-lived tunnel and database connection and closes both.
///
/// A failing step is part of the [`Diagnosis`], not an error: the `Err` case is only a
/// configuration error (`DATABASE_URL` does not parse).
pub async fn diagnose(config: &Config) -> Result<Diagnosis> {
    diagnose_with(config, |_| {}).await
}

/// [`diagnose`], calling `on_step` with each step as soon as its outcome is known (to show
/// progress while a slow step waits for its timeout).
pub async fn diagnose_with(config: &Config, on_step: impl FnMut(&Step) + Send) -> Result<Diagnosis> {
    let db_options = config.database_options()?.application_name("sea-orm-tunnel-check");
    let timeout = config.pool.connect_timeout;
    let mut rec = Recorder {
        steps: Vec::with_capacity(StepKind::ALL.len()),
        on_step,
    };
    let started = Instant::now();
    let route = match config.tunnel.clone() {
        Some(tunnel) => {
            let _ = tunnel_steps(&mut rec, config, tunnel, db_options, timeout).await;
            Route::Tunnel
        }
        None => {
            let _ = direct_steps(&mut rec, config, db_options, timeout).await;
            Route::Direct
        }
    };
    Ok(Diagnosis {
        route,
        steps: rec.steps,
        total: started.elapsed(),
    })
}

/// Marks that a step failed and the ones after it were recorded as not run.
struct Stopped;

type StepResult<T = ()> = std::result::Result<T, Stopped>;

/// Collects the steps in order and reports each one as it is recorded.
struct Recorder<F> {
    steps: Vec<Step>,
    on_step: F,
}

impl<F: FnMut(&Step)> Recorder<F> {
    fn push(&mut self, kind: StepKind, outcome: Outcome, elapsed: Option<Duration>, detail: String, hint: &str) {
        debug_assert_eq!(kind.position(), self.steps.len() + 1, "steps run in order");
        let step = Step {
            kind,
            outcome,
            elapsed,
            detail,
            hint: (!hint.is_empty()).then(|| hint.to_owned()),
        };
        (self.on_step)(&step);
        self.steps.push(step);
    }

    fn ok(&mut self, kind: StepKind, elapsed: Option<Duration>, detail: impl fmt::Display) {
        self.push(kind, Outcome::Ok, elapsed, detail.to_string(), "");
    }

    fn skipped(&mut self, kind: StepKind, why: &str) {
        self.push(kind, Outcome::Skipped, None, why.to_owned(), "");
    }

    /// Records the failure and every later step as not run.
    fn fail(&mut self, kind: StepKind, elapsed: Option<Duration>, error: impl fmt::Display, hint: &str) -> Stopped {
        self.push(kind, Outcome::Failed, elapsed, error.to_string(), hint);
        for later in StepKind::ALL.into_iter().skip(kind.position()) {
            self.push(later, Outcome::NotRun, None, String::new(), "");
        }
        Stopped
    }
}

async fn direct_steps<F: FnMut(&Step)>(
    rec: &mut Recorder<F>,
    config: &Config,
    db_options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> StepResult {
    match config.database_target() {
        Ok(Some((host, port))) => {
            let t = Instant::now();
            match tcp_reach(&host, port, timeout).await {
                Ok(addr) => rec.ok(
                    StepKind::TcpReach,
                    Some(t.elapsed()),
                    format_args!("{} accepts connections", show_addr(&host, port, addr)),
                ),
                Err(e) => {
                    return Err(rec.fail(
                        StepKind::TcpReach,
                        Some(t.elapsed()),
                        format_args!("{host}:{port}: {e}"),
                        "is PostgreSQL running, and is the host/port in DATABASE_URL right?",
                    ));
                }
            }
        }
        _ => rec.skipped(StepKind::TcpReach, "DATABASE_URL names a Unix socket"),
    }
    for kind in [
        StepKind::SshHandshake,
        StepKind::HostKey,
        StepKind::Authentication,
        StepKind::ChannelOpen,
    ] {
        rec.skipped(kind, "no tunnel");
    }
    rec.skipped(
        StepKind::Tls,
        &format!(
            "no tunnel: sqlx negotiates TLS itself (sslmode={})",
            crate::tls::PostgresTls::from_database_url(&config.database_url_str())
                .map_or_else(|_| "?".to_owned(), |t| t.mode.to_string())
        ),
    );
    database_steps(rec, db_options, timeout).await
}

async fn tunnel_steps<F: FnMut(&Step)>(
    rec: &mut Recorder<F>,
    config: &Config,
    tunnel_config: TunnelConfig,
    db_options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> StepResult {
    // TLS as the manager holds it; a problem with it (a missing sslrootcert) is the TLS step's
    // failure, after the SSH steps were checked over a tunnel without TLS.
    let (tunnel_config, tls_problem) = match crate::tls::resolve_tunnel(config, &tunnel_config) {
        Ok(t) => (t, None),
        Err(e) => (tunnel_config.postgres_tls(crate::tls::PostgresTls::disabled()), Some(e)),
    };
    let holds_tls = crate::tls::tunnel_holds_tls(&tunnel_config);
    let tls_settings = tunnel_config.postgres_tls.clone();
    // 1. TCP reach: the first hop of the chain (the first jump host, or the bastion). With
    //    several bastions and no jump host, the first one that answers (as the tunnel does).
    let t = Instant::now();
    let first_candidates: Vec<(String, u16)> = match tunnel_config.proxy_jump.first() {
        Some(j) => vec![(j.host.clone(), j.port.unwrap_or(22))],
        None => tunnel_config.bastions().into_iter().map(|b| (b.host, b.port)).collect(),
    };
    let hops = tunnel_config.proxy_jump.len() + 1;
    let mut unreachable = Vec::new();
    let mut reached = None;
    for (host, port) in &first_candidates {
        match tcp_reach(host, *port, timeout).await {
            Ok(addr) => {
                reached = Some((host.clone(), *port, addr));
                break;
            }
            Err(e) => unreachable.push(format!("{}: {e}", show_host_port(host, *port))),
        }
    }
    let addr = match reached {
        Some((host, port, addr)) => {
            let mut detail = format!("{} accepts connections", show_addr(&host, port, addr));
            if hops > 1 {
                let _ = write!(
                    detail,
                    " (jump host 1 of {hops}; the other hops are reached through it)"
                );
            }
            if !unreachable.is_empty() {
                let _ = write!(detail, "; unreachable first: {}", unreachable.join("; "));
            }
            rec.ok(StepKind::TcpReach, Some(t.elapsed()), detail);
            addr
        }
        None => {
            let hint = if hops > 1 {
                "check SSH_PROXY_JUMP (the first jump host), that its sshd runs, and firewalls on the way"
            } else {
                "check SSH_HOST / SSH_PORT, that sshd runs, and firewalls between here and the bastion"
            };
            return Err(rec.fail(StepKind::TcpReach, Some(t.elapsed()), unreachable.join("; "), hint));
        }
    };

    // 2. SSH handshake: banner and key exchange on a throwaway connection that stops right after
    //    the server proved its host key, before anything (no user name, no key) is sent.
    let t = Instant::now();
    match ssh_handshake(addr, timeout).await {
        Ok(h) => rec.ok(
            StepKind::SshHandshake,
            Some(t.elapsed()),
            format_args!("{}; server key {} {}", h.banner, h.key_type, h.fingerprint),
        ),
        Err(e) => {
            let hint = if e.contains(super::session::RSA_FEATURE) {
                "build with `--features rsa`, or give the bastion an ed25519 or ECDSA host key"
            } else {
                "the port answers but does not complete an SSH key exchange: is it really sshd?"
            };
            return Err(rec.fail(StepKind::SshHandshake, Some(t.elapsed()), e, hint));
        }
    }

    // 3 + 4. Host key and authentication: one real tunnel connect (the crate verifies the key
    //    before authenticating, and tells the two failures apart).
    let policy = tunnel_config.host_key_policy.clone();
    let known_hosts = tunnel_config.known_hosts.clone();
    let user = tunnel_config.user.clone();
    let auth_desc = describe_auth(&tunnel_config);
    let remote = tunnel_config.remote_target();
    // A diagnosis should answer promptly: one quick retry of a transient failure, not the
    // profile's reconnect schedule.
    let tunnel_config = tunnel_config.map_reconnect(|r| {
        r.max_retries(1)
            .initial_delay(Duration::from_millis(200))
            .max_elapsed(None)
    });
    let chain_desc = describe_chain(&tunnel_config);
    let t = Instant::now();
    let tunnel = match SshTunnel::connect_labeled(tunnel_config, config.pool.pool_label.clone()).await {
        Ok(tunnel) => {
            let elapsed = t.elapsed();
            // With several bastions, say which one the tunnel got to.
            let via = match tunnel.bastion() {
                Some(b) if !tunnel.config().fallback_hosts.is_empty() => format!(" via bastion {b}"),
                _ => String::new(),
            };
            rec.ok(
                StepKind::HostKey,
                None,
                format_args!("verified ({policy}; {}){chain_desc}{via}", known_hosts.display()),
            );
            rec.ok(
                StepKind::Authentication,
                Some(elapsed),
                format_args!(
                    "{user} with {auth_desc}{chain_desc} (time: SSH connect incl. handshake + host key + auth)"
                ),
            );
            tunnel
        }
        Err(e) => {
            let elapsed = Some(t.elapsed());
            let (cause, hop) = failed_step_cause(&e);
            let hop_note = match hop {
                Some((n, m)) if n > 1 => format!(" (hops 1 to {} of {m} were verified)", n - 1),
                _ => String::new(),
            };
            return Err(match cause {
                Error::HostKeyUnknown { .. } | Error::HostKeyChanged { .. } | Error::HostKeyRevoked { .. } => {
                    rec.fail(StepKind::HostKey, elapsed, &e, host_key_hint(cause))
                }
                Error::Auth { .. } | Error::KeyPassphrase { .. } | Error::File { .. } => {
                    rec.ok(StepKind::HostKey, None, format_args!("verified ({policy}){hop_note}"));
                    rec.fail(
                        StepKind::Authentication,
                        elapsed,
                        &e,
                        "check SSH_USER (or the jump host's user in SSH_PROXY_JUMP), SSH_KEY_PATH / SSH_KEY_PASSPHRASE, \
                         the agent, and the authorized_keys of the host named",
                    )
                }
                Error::ChannelRefused { .. } | Error::SshConnect { .. } | Error::Timeout { .. }
                    if hop.is_some_and(|(n, _)| n > 1) =>
                {
                    rec.fail(
                        StepKind::SshHandshake,
                        elapsed,
                        &e,
                        "the previous jump host could not reach this hop: check its AllowTcpForwarding / PermitOpen, \
                         and this hop's address as seen from that jump host",
                    )
                }
                _ => rec.fail(
                    StepKind::SshHandshake,
                    elapsed,
                    &e,
                    "the SSH connection failed after the key exchange worked once; retry, and look at the bastion's logs",
                ),
            });
        }
    };

    // 5. Channel open: a PostgreSQL SSLRequest through the tunnel must come back with one byte;
    //    through a tunnel that holds TLS, a startup message must come back with the server's first
    //    answer (the tunnel answers the SSLRequest itself).
    // 6. TLS: what the tunnel negotiated for that connection.
    let mut events = tunnel.subscribe();
    let t = Instant::now();
    let probe = if holds_tls {
        let user = db_options.get_username().to_owned();
        let database = db_options.get_database().unwrap_or(&user).to_owned();
        startup_probe(tunnel.local_endpoint(), &user, &database, timeout).await
    } else {
        channel_probe(tunnel.local_endpoint(), timeout)
            .await
            .map(Probe::Answered)
    };
    let result = match probe {
        Ok(answer) => {
            let elapsed = t.elapsed();
            let said = match &answer {
                Probe::Answered(a) => *a,
                Probe::TlsRefused(_) | Probe::Served => "through the tunnel's TLS negotiation",
            };
            rec.ok(
                StepKind::ChannelOpen,
                Some(elapsed),
                format_args!("direct-tcpip to {remote}; PostgreSQL answered ({said})"),
            );
            match (answer, tls_problem, &tls_settings) {
                (_, Some(problem), _) => {
                    let hint =
                        "fix the file or parameter named (DATABASE_URL sslrootcert / sslcert / sslkey / sslpassword)";
                    tunnel.disconnect().await;
                    return Err(rec.fail(StepKind::Tls, None, problem, hint));
                }
                (Probe::TlsRefused(message), None, _) => {
                    tunnel.disconnect().await;
                    return Err(rec.fail(StepKind::Tls, Some(elapsed), message, tls_hint(&tls_settings)));
                }
                (Probe::Served, None, Some(tls)) => match tls.last_session() {
                    Some(session) => rec.ok(StepKind::Tls, Some(elapsed), describe_session(&session)),
                    None => rec.ok(
                        StepKind::Tls,
                        Some(elapsed),
                        format_args!(
                            "plaintext: the server does not support TLS, and sslmode={} allows that",
                            tls.mode
                        ),
                    ),
                },
                _ => rec.skipped(StepKind::Tls, "sslmode=disable: the tunnel forwards bytes as they are"),
            }
            let endpoint = tunnel.local_endpoint().clone();
            // The tunnel holds TLS: plaintext to its private endpoint, as the pool does.
            let db_options = if holds_tls {
                db_options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
            } else {
                db_options
            };
            let db_options = match &endpoint {
                LocalEndpoint::Tcp(addr) => db_options.host(&addr.ip().to_string()).port(addr.port()),
                LocalEndpoint::Unix(_) => {
                    let port = tunnel.config().remote_port;
                    db_options
                        .socket(endpoint.unix_dir().expect("a Unix endpoint has a directory"))
                        .port(port)
                }
            };
            database_steps(rec, db_options, timeout).await
        }
        Err(e) => {
            let mut reason = String::new();
            while let Ok(event) = events.try_recv() {
                if let TunnelEvent::ChannelOpenFailed { reason: r, .. } = event {
                    reason = format!(": the bastion refused the channel ({r})");
                }
            }
            Err(rec.fail(
                StepKind::ChannelOpen,
                Some(t.elapsed()),
                format_args!("{e}{reason}"),
                "the bastion must allow TCP forwarding (AllowTcpForwarding, PermitOpen) to SSH_REMOTE_HOST:PORT, \
                 and that address must be PostgreSQL as seen from the bastion",
            ))
        }
    };
    tunnel.disconnect().await;
    result
}

/// Database login and `SELECT 1` over one plain sqlx connection.
async fn database_steps<F: FnMut(&Step)>(
    rec: &mut Recorder<F>,
    options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> StepResult {
    let user = options.get_username().to_owned();
    let database = options.get_database().unwrap_or(&user).to_owned();
    let t = Instant::now();
    let connected = tokio::time::timeout(timeout, sqlx::PgConnection::connect_with(&options)).await;
    let mut conn = match connected {
        Ok(Ok(conn)) => {
            rec.ok(
                StepKind::DatabaseLogin,
                Some(t.elapsed()),
                format_args!("as {user} to database {database}"),
            );
            conn
        }
        Ok(Err(e)) => {
            return Err(rec.fail(
                StepKind::DatabaseLogin,
                Some(t.elapsed()),
                e,
                "check the user, password and database name in DATABASE_URL, and pg_hba.conf",
            ));
        }
        Err(_) => {
            return Err(rec.fail(
                StepKind::DatabaseLogin,
                Some(t.elapsed()),
                format_args!("no answer within {timeout:?}"),
                "PostgreSQL accepted the connection but did not complete the login",
            ));
        }
    };
    let t = Instant::now();
    let result = tokio::time::timeout(timeout, sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn)).await;
    let kind = StepKind::SelectOne;
    let result = match result {
        Ok(Ok(1)) => {
            rec.ok(kind, Some(t.elapsed()), "returned 1");
            Ok(())
        }
        Ok(Ok(other)) => Err(rec.fail(kind, Some(t.elapsed()), format_args!("returned {other}, not 1"), "")),
        Ok(Err(e)) => Err(rec.fail(kind, Some(t.elapsed()), e, "")),
        Err(_) => Err(rec.fail(
            kind,
            Some(t.elapsed()),
            format_args!("no answer within {timeout:?}"),
            "",
        )),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    result
}

async fn tcp_reach(host: &str, port: u16, timeout: Duration) -> std::io::Result<SocketAddr> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    stream.peer_addr()
}

/// `host:port`, plus the resolved address when the host is a name.
fn show_addr(host: &str, port: u16, addr: SocketAddr) -> String {
    if addr.ip().to_string() == host.trim_matches(['[', ']']) {
        addr.to_string()
    } else {
        format!("{host}:{port} ({addr})")
    }
}

struct Handshake {
    banner: String,
    key_type: String,
    fingerprint: String,
}

/// Records the host key the server proves during key exchange, then stops the handshake.
struct CaptureKey(Arc<Mutex<Option<russh::keys::PublicKey>>>);

impl russh::client::Handler for CaptureKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &russh::keys::PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let key = match server_key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
                russh::keys::PublicKey::from(cert.public_key().clone())
            }
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        // Stop here: the real, verified connection is the next step.
        Ok(false)
    }
}

async fn ssh_handshake(addr: SocketAddr, timeout: Duration) -> std::result::Result<Handshake, String> {
    let banner = tokio::time::timeout(timeout, read_banner(addr))
        .await
        .map_err(|_| format!("no SSH banner within {timeout:?}"))?
        .map_err(|e| format!("reading the SSH banner: {e}"))?;
    let captured = Arc::new(Mutex::new(None));
    // The tunnel's host-key algorithms, so a server this build cannot verify fails here, by name.
    let config = Arc::new(russh::client::Config {
        preferred: russh::Preferred {
            key: std::borrow::Cow::Borrowed(super::session::preferred_host_key_algorithms()),
            ..russh::Preferred::default()
        },
        ..russh::client::Config::default()
    });
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("second TCP connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let result = tokio::time::timeout(
        timeout,
        russh::client::connect_stream(config, tcp, CaptureKey(captured.clone())),
    )
    .await;
    let key = captured.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (key, result) {
        (Some(key), _) => Ok(Handshake {
            banner,
            key_type: key.algorithm().as_str().to_owned(),
            fingerprint: key.fingerprint(russh::keys::HashAlg::Sha256).to_string(),
        }),
        (None, Err(_)) => Err(format!("{banner}: no key exchange within {timeout:?}")),
        (None, Ok(Err(e))) => Err(match super::session::rsa_only_host_keys(cfg!(feature = "rsa"), &e) {
            Some(offered) => format!(
                "{banner}: the server offers only RSA host keys ({offered}) and this build has no RSA: {}",
                super::session::RSA_FEATURE
            ),
            None => format!("{banner}: key exchange failed: {e}"),
        }),
        (None, Ok(Ok(_))) => Err(format!("{banner}: the server never proved a host key")),
    }
}

/// Reads the server's identification line (`SSH-2.0-...`); servers may send other lines first.
async fn read_banner(addr: SocketAddr) -> std::io::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    loop {
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before an SSH banner",
            ));
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            if line.starts_with("SSH-") {
                return Ok(line);
            }
            buf.clear();
        } else if buf.len() < 1024 {
            buf.push(byte[0]);
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an SSH server (no banner line)",
            ));
        }
    }
}

/// What a probe through the tunnel found.
enum Probe {
    /// The server answered the `SSLRequest` (a tunnel without TLS).
    Answered(&'static str),
    /// The tunnel refused TLS to the server (its `ErrorResponse`'s message).
    TlsRefused(String),
    /// The server answered the startup message through the tunnel's TLS (or plaintext).
    Served,
}

/// Sends a startup message through a tunnel that holds TLS and reads the first answer: the
/// tunnel's own refusal (TLS failed), or anything from the server (TLS worked; a login error is
/// the login step's business).
async fn startup_probe(
    endpoint: &LocalEndpoint,
    user: &str,
    database: &str,
    timeout: Duration,
) -> std::io::Result<Probe> {
    use super::pgwire;
    let message = pgwire::startup_message(&[
        ("user", user),
        ("database", database),
        ("application_name", "sea-orm-tunnel-check"),
    ]);
    async fn probe<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        message: &[u8],
    ) -> std::io::Result<Probe> {
        s.write_all(message).await?;
        let first = pgwire::read_first_server_message(&mut s)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the tunnel closed the connection")
                }
                _ => e,
            })?;
        if let Some(fields) = pgwire::error_fields(&first)
            && fields
                .iter()
                .any(|(k, v)| *k == b'R' && v == crate::error::TUNNEL_TLS_ROUTINE)
        {
            let message = fields
                .into_iter()
                .find(|(k, _)| *k == b'M')
                .map(|(_, v)| v)
                .unwrap_or_default();
            let message = message.strip_prefix("sea-orm-tunnel: ").unwrap_or(&message).to_owned();
            return Ok(Probe::TlsRefused(message));
        }
        Ok(Probe::Served)
    }
    let attempt = async {
        match endpoint {
            LocalEndpoint::Tcp(addr) => probe(tokio::net::TcpStream::connect(addr).await?, &message).await,
            #[cfg(unix)]
            LocalEndpoint::Unix(path) => probe(tokio::net::UnixStream::connect(path).await?, &message).await,
            #[cfg(not(unix))]
            LocalEndpoint::Unix(_) => Err(std::io::Error::other("Unix sockets are not supported here")),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))?
}

/// `TLSv1_3, TLS13_AES_256_GCM_SHA384, chain and name verified for db.internal; the server
/// certificate expires in 364 days (2027-12-01 00:00:00 UTC)`.
fn describe_session(session: &crate::tls::TlsSession) -> String {
    let mut out = format!(
        "{}, {}, {} for {}",
        session.protocol, session.cipher, session.verification, session.server_name
    );
    if let (Some(left), Some(at)) = (session.expires_in_secs(), session.not_after) {
        let days = left.div_euclid(86_400);
        out.push_str(&format!(
            "; the server certificate expires in {days} days ({})",
            crate::tls::format_unix(at.max(0) as u64)
        ));
        if left < crate::tls::EXPIRY_WARNING_DAYS * 86_400 {
            out.push_str(&format!(
                " - WARNING: less than {} days left",
                crate::tls::EXPIRY_WARNING_DAYS
            ));
        }
    }
    out
}

fn tls_hint(settings: &Option<crate::tls::PostgresTls>) -> &'static str {
    match settings.as_ref().map(|t| t.mode) {
        Some(crate::tls::SslMode::VerifyFull) => {
            "check sslrootcert (the CA that signed the server's certificate), the name on the certificate              (sslservername when DATABASE_URL names the server by address or alias) and its dates"
        }
        _ => "check that PostgreSQL has ssl=on, sslrootcert, and the client certificate (sslcert/sslkey)",
    }
}

/// Opens one connection through the tunnel and sends a PostgreSQL `SSLRequest`: any server
/// answers with one byte (`S` or `N`) before authentication.
async fn channel_probe(endpoint: &LocalEndpoint, timeout: Duration) -> std::io::Result<&'static str> {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    async fn probe<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> std::io::Result<&'static str> {
        s.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        match s.read(&mut answer).await? {
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the tunnel closed the connection",
            )),
            _ => Ok(match answer[0] {
                b'S' => "TLS available",
                b'N' => "no TLS",
                b'E' => "with an error message",
                _ => "with an unexpected byte: is it PostgreSQL?",
            }),
        }
    }
    let attempt = async {
        match endpoint {
            LocalEndpoint::Tcp(addr) => probe(tokio::net::TcpStream::connect(addr).await?).await,
            #[cfg(unix)]
            LocalEndpoint::Unix(path) => probe(tokio::net::UnixStream::connect(path).await?).await,
            #[cfg(not(unix))]
            LocalEndpoint::Unix(_) => Err(std::io::Error::other("Unix sockets are not supported here")),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))?
}

/// `""` without jump hosts; else `" on 2 hops: jump host u@h:p, bastion u@h:p"`.
fn describe_chain(config: &TunnelConfig) -> String {
    if config.proxy_jump.is_empty() {
        return String::new();
    }
    let hops: Vec<String> = config
        .proxy_jump
        .iter()
        .map(|j| {
            let user = j.user.as_deref().unwrap_or(&config.user);
            format!("jump host {user}@{}", show_host_port(&j.host, j.port.unwrap_or(22)))
        })
        .collect();
    format!(
        " on {} hops: {}, bastion {}@{}",
        hops.len() + 1,
        hops.join(", "),
        config.user,
        show_host_port(&config.host, config.port)
    )
}

use crate::url::host_port as show_host_port;

/// What decides the failed step: the error inside the tunnel's context, and the hop (n of m) it
/// happened on. Of several bastions' errors, the first that got furthest (a host key or an
/// authentication failure) decides.
fn failed_step_cause(e: &Error) -> (&Error, Option<(usize, usize)>) {
    fn hop_of(e: &Error) -> (&Error, Option<(usize, usize)>) {
        match e {
            Error::TunnelFailed(inner) => hop_of(inner),
            Error::Hop { hop, hops, source, .. } => (source.cause(), Some((*hop, *hops))),
            other => (other, None),
        }
    }
    let (cause, hop) = hop_of(e);
    if let Error::AllBastionsFailed { errors } = cause {
        let decisive = |c: &Error| {
            matches!(
                c,
                Error::HostKeyUnknown { .. }
                    | Error::HostKeyChanged { .. }
                    | Error::HostKeyRevoked { .. }
                    | Error::Auth { .. }
                    | Error::KeyPassphrase { .. }
                    | Error::File { .. }
            )
        };
        return errors
            .iter()
            .map(|(_, e)| hop_of(e))
            .find(|(c, _)| decisive(c))
            .unwrap_or((cause, hop));
    }
    (cause, hop)
}

fn describe_auth(config: &TunnelConfig) -> String {
    let mut parts = Vec::new();
    if let Some(path) = &config.auth.key_path {
        parts.push(format!("key {}", path.display()));
    }
    if config.auth.use_agent {
        parts.push("ssh-agent".to_owned());
    }
    if parts.is_empty() {
        "no credentials".to_owned()
    } else {
        parts.join(" / ")
    }
}

fn host_key_hint(e: &Error) -> &'static str {
    match e {
        Error::HostKeyUnknown { .. } => {
            "add the bastion's key to SSH_KNOWN_HOSTS (compare its fingerprint out of band), or use \
             SSH_HOST_KEY_POLICY=accept-new to learn it on first use"
        }
        Error::HostKeyChanged { .. } => {
            "the bastion's key differs from the recorded one: possible man-in-the-middle. Only if the \
             change is legitimate (key rotation, rebuilt host), update the known_hosts entry"
        }
        _ => "the key is revoked in known_hosts: do not connect",
    }
}
