//! `sea-orm-tunnel`: hold the managed SSH tunnel for any PostgreSQL client, or diagnose it.
//!
//! ```text
//! sea-orm-tunnel forward [--local-port PORT | --unix]
//! sea-orm-tunnel check
//! ```
//!
//! Both read the same environment variables (and `.env.local` / `.env`) as
//! `Config::from_env`; run `sea-orm-tunnel --help` for the details. Arguments are parsed by hand:
//! a `[[bin]]` shares the library's dependencies, and two subcommands with three flags do not
//! justify an argument-parser crate in every user's build.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx::{self, Connection as _};
use sea_orm_tunnel::config::{Config, LocalEndpointConfig, TunnelConfig, redact_url};
use sea_orm_tunnel::tunnel::{LocalEndpoint, SshTunnel, TunnelEvent, TunnelState};
use sea_orm_tunnel::{Error, Result};
use secrecy::ExposeSecret as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;

const USAGE: &str = "\
sea-orm-tunnel: PostgreSQL through an SSH bastion

USAGE:
    sea-orm-tunnel forward [--local-port PORT | --unix]
    sea-orm-tunnel check
    sea-orm-tunnel --help | --version

COMMANDS:
    forward   Hold the tunnel (host key verified, keepalive, reconnect with backoff) so any
              client (psql, pgbench, another language) can use it. Prints `listening on ADDR`
              and a ready DATABASE_URL (password redacted) once the local endpoint is bound;
              logs tunnel events to stderr; stops cleanly on Ctrl-C or SIGTERM (exit 0).
    check     Diagnose step by step: TCP reach, SSH handshake, host key, authentication,
              channel open, database login, SELECT 1. Prints each step with its time and a
              verdict. Exit 0 when everything works; 10 + the step number when a step fails
              (11 TCP reach ... 17 SELECT 1); 1 for a configuration error.

FORWARD OPTIONS:
    --local-port PORT   listen on 127.0.0.1:PORT (default: SSH_LOCAL_PORT, else ephemeral)
    --unix              listen on a Unix socket in a private 0700 directory instead

CONFIGURATION (environment, then .env.local, then .env):
    DATABASE_URL        postgres://user:password@host:port/db; host:port as seen from the bastion
    SSH_HOST, SSH_PORT (22), SSH_USER, SSH_KEY_PATH (~/.ssh/id_ed25519), SSH_KEY_PASSPHRASE,
    SSH_USE_AGENT, SSH_KNOWN_HOSTS (~/.ssh/known_hosts),
    SSH_HOST_KEY_POLICY (strict | accept-new | SHA256:<fingerprint>), SSH_REMOTE_HOST/PORT,
    SSH_LOCAL_PORT (0 | PORT | unix), SSH_KEEPALIVE_INTERVAL/MAX, SSH_MAX_RETRIES, SSH_RETRY_DELAY,
    APP_ENV, POSTGRES_CONNECTION_TIMEOUT ... (see the README's configuration table)
";

/// Exit code for configuration and usage errors.
const EXIT_CONFIG: u8 = 1;
/// Exit code for a runtime failure of `forward`.
const EXIT_FAILED: u8 = 1;
/// Exit code for bad arguments.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Help,
    Version,
    Forward { local: Option<LocalEndpointConfig> },
    Check,
}

fn parse_args(args: &[String]) -> std::result::Result<Command, String> {
    let mut it = args.iter();
    let Some(first) = it.next() else {
        return Err("no command given".into());
    };
    let command = match first.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "-V" | "--version" => return Ok(Command::Version),
        "forward" => {
            let mut local = None;
            while let Some(arg) = it.next() {
                let (flag, inline) = match arg.split_once('=') {
                    Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                    _ => (arg.as_str(), None),
                };
                match flag {
                    "-h" | "--help" => return Ok(Command::Help),
                    "--local-port" => {
                        let value = match inline {
                            Some(v) => v,
                            None => it.next().cloned().ok_or("--local-port needs a port number")?,
                        };
                        let port: u16 = value
                            .parse()
                            .map_err(|_| format!("--local-port: {value:?} is not a port number (0-65535)"))?;
                        if local.is_some() {
                            return Err("give either --local-port or --unix, once".into());
                        }
                        local = Some(LocalEndpointConfig::Tcp(port));
                    }
                    "--unix" if inline.is_none() => {
                        if local.is_some() {
                            return Err("give either --local-port or --unix, once".into());
                        }
                        local = Some(LocalEndpointConfig::Unix);
                    }
                    other => return Err(format!("forward: unknown argument {other:?}")),
                }
            }
            Command::Forward { local }
        }
        "check" => match it.next().map(String::as_str) {
            None => Command::Check,
            Some("-h" | "--help") => Command::Help,
            Some(other) => return Err(format!("check: unknown argument {other:?}")),
        },
        other => return Err(format!("unknown command {other:?}")),
    };
    Ok(command)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match command {
        Command::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("sea-orm-tunnel {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(async move {
        match command {
            Command::Forward { local } => forward(local).await,
            Command::Check => check().await,
            Command::Help | Command::Version => unreachable!("handled above"),
        }
    });
    // Background work (a session closing) must not keep the process alive after the verdict.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

/// Reads the configuration for `forward`: the whole [`Config`] when it is complete (so the
/// DATABASE_URL to print is known), the tunnel alone otherwise.
fn forward_config() -> Result<(TunnelConfig, Option<Config>)> {
    match Config::from_env() {
        Ok(config) => match config.tunnel.clone() {
            Some(tunnel) => Ok((tunnel, Some(config))),
            None => Err(Error::config("SSH_HOST", "is not set: there is no tunnel to hold")),
        },
        Err(config_error) => match TunnelConfig::from_env() {
            Ok(tunnel) => {
                log(format_args!(
                    "note: no ready DATABASE_URL will be printed ({config_error})"
                ));
                Ok((tunnel, None))
            }
            Err(_) => Err(config_error),
        },
    }
}

async fn forward(local: Option<LocalEndpointConfig>) -> ExitCode {
    let (mut tunnel_config, config) = match forward_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(local) = local {
        tunnel_config = tunnel_config.local(local);
    }
    // The delays of one reconnect round; after it gives up, `forward` starts another one after the
    // longest delay, like autossh, instead of exiting.
    let round_pause = tunnel_config.reconnect.max_delay;
    log(format_args!(
        "connecting to {}@{}:{} (host key policy {}, forwarding to {})",
        tunnel_config.user,
        tunnel_config.host,
        tunnel_config.port,
        tunnel_config.host_key_policy,
        tunnel_config.remote_target()
    ));
    let tunnel = match SshTunnel::connect(tunnel_config).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut events = tunnel.subscribe();
    let mut state = tunnel.state();
    // The first `Connected` event fired inside `connect`, before anyone could subscribe.
    log(format_args!(
        "tunnel connected ({} SSH session)",
        tunnel.stats().sessions
    ));
    let endpoint = tunnel.local_endpoint().clone();
    println!("listening on {endpoint}");
    if let Some(config) = &config
        && let Some(url) = local_database_url(config, &endpoint)
    {
        println!("DATABASE_URL={url}");
    }
    if let (LocalEndpoint::Unix(_), Some(dir)) = (&endpoint, endpoint.unix_dir()) {
        println!("psql: psql -h {} -p {} ...", dir.display(), tunnel.config().remote_port);
    }
    let _ = std::io::stdout().flush();

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let code = loop {
        tokio::select! {
            signal = &mut stop => {
                log(format_args!("{signal}: stopping"));
                break ExitCode::SUCCESS;
            }
            event = events.recv() => match event {
                Ok(event) => log_event(&event),
                Err(broadcast::error::RecvError::Lagged(n)) => log(format_args!("({n} tunnel events not shown)")),
                Err(broadcast::error::RecvError::Closed) => {}
            },
            changed = state.changed() => {
                if changed.is_err() {
                    break ExitCode::from(EXIT_FAILED);
                }
                let current = state.borrow_and_update().clone();
                if let TunnelState::Failed { error } = current {
                    if !error.is_transient() {
                        eprintln!("error: the tunnel stopped: {error}");
                        break ExitCode::from(EXIT_FAILED);
                    }
                    log(format_args!("reconnect attempts exhausted; next round in {round_pause:?}"));
                    retry_at = Some(tokio::time::Instant::now() + round_pause);
                }
            }
            () = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                retry_at = None;
                let tunnel = tunnel.clone();
                // `ensure_connected` starts a fresh round; its outcome arrives as state/events.
                tokio::spawn(async move { let _ = tunnel.ensure_connected().await; });
            }
        }
    };
    tunnel.disconnect().await;
    if code == ExitCode::SUCCESS {
        log(format_args!("stopped"));
    }
    code
}

/// Resolves on Ctrl-C or SIGTERM with the signal's name.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupted"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted"
    }
}

fn log_event(event: &TunnelEvent) {
    match event {
        TunnelEvent::Connected { session, reconnect } => {
            if *reconnect {
                log(format_args!("tunnel reconnected (session {session})"));
            } else {
                log(format_args!("tunnel connected (session {session})"));
            }
        }
        TunnelEvent::SessionOpened { session, sessions } => log(format_args!(
            "additional SSH session {session} opened ({sessions} open)"
        )),
        TunnelEvent::SessionClosed { session, sessions } => {
            log(format_args!("idle SSH session {session} closed ({sessions} open)"))
        }
        TunnelEvent::Disconnected { session, reason } => log(format_args!("SSH session {session} lost: {reason}")),
        TunnelEvent::Reconnecting { attempt, delay, error } => log(format_args!(
            "reconnecting: attempt {attempt} in {delay:?} (last error: {error})"
        )),
        TunnelEvent::Failed { error } => log(format_args!("tunnel failed: {error}")),
        TunnelEvent::ChannelOpenFailed { reason, permanent } => log(format_args!(
            "bastion refused a channel: {reason}{}",
            if *permanent {
                " (fix the bastion's configuration)"
            } else {
                ""
            }
        )),
        TunnelEvent::CapacityExhausted { channels, sessions } => log(format_args!(
            "no free channel: {channels} channels on {sessions} sessions in use; a client was refused"
        )),
        TunnelEvent::Closed => log(format_args!("tunnel closed")),
        other => log(format_args!("{other:?}")),
    }
}

/// One log line on stderr, prefixed with the time since the start.
fn log(message: fmt::Arguments<'_>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[{:>9.3}s] {message}", t.as_secs_f64());
}

/// `DATABASE_URL` pointed at the local endpoint, password redacted.
fn local_database_url(config: &Config, endpoint: &LocalEndpoint) -> Option<String> {
    let original = config.database_url.expose_secret();
    let url = match endpoint {
        LocalEndpoint::Tcp(addr) => replace_authority(original, &addr.to_string())?,
        LocalEndpoint::Unix(_) => {
            let port = config.tunnel.as_ref()?.remote_port;
            let url = replace_authority(original, &format!("localhost:{port}"))?;
            let dir = endpoint.unix_dir()?.to_string_lossy().replace('%', "%25");
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}host={dir}")
        }
    };
    Some(redact_url(&url))
}

/// Replaces `host[:port]` of a `scheme://[userinfo@]host[:port]/...` URL.
fn replace_authority(url: &str, host_port: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
    Some(format!("{}{userinfo}{host_port}{}", &url[..start], &rest[end..]))
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

const STEPS: [&str; 7] = [
    "TCP reach",
    "SSH handshake",
    "host key",
    "authentication",
    "channel open",
    "database login",
    "SELECT 1",
];

/// Prints the step lines and remembers the first failure.
struct Report {
    started: Instant,
}

impl Report {
    fn ok(&self, step: usize, time: Option<Duration>, detail: impl fmt::Display) {
        let time = time.map_or_else(|| "".to_owned(), |t| format!("{:.1} ms", t.as_secs_f64() * 1e3));
        println!("  [{step}/7] {:<15} ok      {time:>9}  {detail}", STEPS[step - 1]);
    }

    fn skipped(&self, step: usize, why: &str) {
        println!("  [{step}/7] {:<15} skipped {:>9}  {why}", STEPS[step - 1], "");
    }

    /// Prints the failure, the remaining steps as not run, and the verdict; returns the exit code.
    fn fail(&self, step: usize, time: Option<Duration>, error: impl fmt::Display, hint: &str) -> ExitCode {
        let time = time.map_or_else(|| "".to_owned(), |t| format!("{:.1} ms", t.as_secs_f64() * 1e3));
        println!("  [{step}/7] {:<15} FAILED  {time:>9}  {error}", STEPS[step - 1]);
        for later in step + 1..=STEPS.len() {
            println!("  [{later}/7] {:<15} not run", STEPS[later - 1]);
        }
        println!();
        println!("verdict: FAILED at step {step} ({})", STEPS[step - 1]);
        if !hint.is_empty() {
            println!("hint: {hint}");
        }
        ExitCode::from(10 + step as u8)
    }

    fn success(&self, through: &str) -> ExitCode {
        println!();
        println!(
            "verdict: OK: PostgreSQL answers {through} (total {:.1} ms)",
            self.started.elapsed().as_secs_f64() * 1e3
        );
        ExitCode::SUCCESS
    }
}

async fn check() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            println!("error: {e}");
            println!("verdict: FAILED: configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let db_options = match config.database_options() {
        Ok(o) => o.application_name("sea-orm-tunnel-check"),
        Err(e) => {
            println!("error: {e}");
            println!("verdict: FAILED: configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let timeout = config.pool.connect_timeout;
    let report = Report {
        started: Instant::now(),
    };
    println!("sea-orm-tunnel check");
    println!("  database  {}", config.redacted_database_url());
    match config.tunnel.clone() {
        Some(tunnel) => check_tunnel(&report, tunnel, db_options, timeout).await,
        None => check_direct(&report, &config, db_options, timeout).await,
    }
}

async fn check_direct(
    report: &Report,
    config: &Config,
    db_options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> ExitCode {
    println!("  tunnel    none (SSH_HOST is not set): connecting directly");
    println!();
    match config.database_target() {
        Ok(Some((host, port))) => {
            let t = Instant::now();
            match tcp_reach(&host, port, timeout).await {
                Ok(addr) => report.ok(
                    1,
                    Some(t.elapsed()),
                    format_args!("{} accepts connections", show_addr(&host, port, addr)),
                ),
                Err(e) => {
                    return report.fail(
                        1,
                        Some(t.elapsed()),
                        format_args!("{host}:{port}: {e}"),
                        "is PostgreSQL running, and is the host/port in DATABASE_URL right?",
                    );
                }
            }
        }
        _ => report.skipped(1, "DATABASE_URL names a Unix socket"),
    }
    for step in 2..=5 {
        report.skipped(step, "no tunnel");
    }
    database_steps(report, db_options, timeout, "directly").await
}

async fn check_tunnel(
    report: &Report,
    tunnel_config: TunnelConfig,
    db_options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
) -> ExitCode {
    println!(
        "  bastion   {}@{}:{} (host key policy {}, known_hosts {})",
        tunnel_config.user,
        tunnel_config.host,
        tunnel_config.port,
        tunnel_config.host_key_policy,
        tunnel_config.known_hosts.display()
    );
    println!(
        "  remote    {} (as seen from the bastion)",
        tunnel_config.remote_target()
    );
    println!();

    // 1. TCP reach.
    let t = Instant::now();
    let (host, port) = (tunnel_config.host.clone(), tunnel_config.port);
    let addr = match tcp_reach(&host, port, timeout).await {
        Ok(addr) => {
            report.ok(
                1,
                Some(t.elapsed()),
                format_args!("{} accepts connections", show_addr(&host, port, addr)),
            );
            addr
        }
        Err(e) => {
            return report.fail(
                1,
                Some(t.elapsed()),
                format_args!("{host}:{port}: {e}"),
                "check SSH_HOST / SSH_PORT, that sshd runs, and firewalls between here and the bastion",
            );
        }
    };

    // 2. SSH handshake: banner and key exchange on a throwaway connection that stops right after
    //    the server proved its host key, before anything (no user name, no key) is sent.
    let t = Instant::now();
    match ssh_handshake(addr, timeout).await {
        Ok(h) => report.ok(
            2,
            Some(t.elapsed()),
            format_args!("{}; server key {} {}", h.banner, h.key_type, h.fingerprint),
        ),
        Err(e) => {
            return report.fail(
                2,
                Some(t.elapsed()),
                e,
                "the port answers but does not complete an SSH key exchange: is it really sshd?",
            );
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
    let t = Instant::now();
    let tunnel = match SshTunnel::connect(tunnel_config).await {
        Ok(tunnel) => {
            let elapsed = t.elapsed();
            report.ok(3, None, format_args!("verified ({policy}; {})", known_hosts.display()));
            report.ok(
                4,
                Some(elapsed),
                format_args!("{user} with {auth_desc} (time: SSH connect incl. handshake + host key + auth)"),
            );
            tunnel
        }
        Err(e) => {
            let elapsed = Some(t.elapsed());
            let cause = match &e {
                Error::TunnelFailed(inner) => inner.as_ref(),
                other => other,
            };
            return match cause {
                Error::HostKeyUnknown { .. } | Error::HostKeyChanged { .. } | Error::HostKeyRevoked { .. } => {
                    report.fail(3, elapsed, &e, host_key_hint(&e))
                }
                Error::Auth { .. } | Error::KeyPassphrase { .. } | Error::File { .. } => {
                    report.ok(3, None, format_args!("verified ({policy})"));
                    report.fail(
                        4,
                        elapsed,
                        &e,
                        "check SSH_USER, SSH_KEY_PATH / SSH_KEY_PASSPHRASE, the agent, and the bastion's authorized_keys",
                    )
                }
                _ => report.fail(
                    2,
                    elapsed,
                    &e,
                    "the SSH connection failed after the key exchange worked once; retry, and look at the bastion's logs",
                ),
            };
        }
    };

    // 5. Channel open: a PostgreSQL SSLRequest through the tunnel must come back with one byte.
    let mut events = tunnel.subscribe();
    let t = Instant::now();
    let code = match channel_probe(tunnel.local_endpoint(), timeout).await {
        Ok(answer) => {
            report.ok(
                5,
                Some(t.elapsed()),
                format_args!("direct-tcpip to {remote}; PostgreSQL answered ({answer})"),
            );
            let endpoint = tunnel.local_endpoint().clone();
            let db_options = match &endpoint {
                LocalEndpoint::Tcp(addr) => db_options.host(&addr.ip().to_string()).port(addr.port()),
                LocalEndpoint::Unix(_) => {
                    let port = tunnel.config().remote_port;
                    db_options
                        .socket(endpoint.unix_dir().expect("a Unix endpoint has a directory"))
                        .port(port)
                }
            };
            database_steps(report, db_options, timeout, "through the tunnel").await
        }
        Err(e) => {
            let mut reason = String::new();
            while let Ok(event) = events.try_recv() {
                if let TunnelEvent::ChannelOpenFailed { reason: r, .. } = event {
                    reason = format!(": the bastion refused the channel ({r})");
                }
            }
            report.fail(
                5,
                Some(t.elapsed()),
                format_args!("{e}{reason}"),
                "the bastion must allow TCP forwarding (AllowTcpForwarding, PermitOpen) to SSH_REMOTE_HOST:PORT, \
                 and that address must be PostgreSQL as seen from the bastion",
            )
        }
    };
    tunnel.disconnect().await;
    code
}

/// Steps 6 and 7 over one plain sqlx connection.
async fn database_steps(
    report: &Report,
    options: sqlx::postgres::PgConnectOptions,
    timeout: Duration,
    through: &str,
) -> ExitCode {
    let user = options.get_username().to_owned();
    let database = options.get_database().unwrap_or(&user).to_owned();
    let t = Instant::now();
    let connected = tokio::time::timeout(timeout, sqlx::PgConnection::connect_with(&options)).await;
    let mut conn = match connected {
        Ok(Ok(conn)) => {
            report.ok(6, Some(t.elapsed()), format_args!("as {user} to database {database}"));
            conn
        }
        Ok(Err(e)) => {
            return report.fail(
                6,
                Some(t.elapsed()),
                e,
                "check the user, password and database name in DATABASE_URL, and pg_hba.conf",
            );
        }
        Err(_) => {
            return report.fail(
                6,
                Some(t.elapsed()),
                format_args!("no answer within {timeout:?}"),
                "PostgreSQL accepted the connection but did not complete the login",
            );
        }
    };
    let t = Instant::now();
    let result = tokio::time::timeout(timeout, sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn)).await;
    let code = match result {
        Ok(Ok(1)) => {
            report.ok(7, Some(t.elapsed()), "returned 1");
            report.success(through)
        }
        Ok(Ok(other)) => report.fail(7, Some(t.elapsed()), format_args!("returned {other}, not 1"), ""),
        Ok(Err(e)) => report.fail(7, Some(t.elapsed()), e, ""),
        Err(_) => report.fail(7, Some(t.elapsed()), format_args!("no answer within {timeout:?}"), ""),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    code
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
    let config = Arc::new(russh::client::Config::default());
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
        (None, Ok(Err(e))) => Err(format!("{banner}: key exchange failed: {e}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn parses_commands_and_flags() {
        assert_eq!(parse_args(&args(&["check"])), Ok(Command::Check));
        assert_eq!(parse_args(&args(&["forward"])), Ok(Command::Forward { local: None }));
        assert_eq!(
            parse_args(&args(&["forward", "--local-port", "6543"])),
            Ok(Command::Forward {
                local: Some(LocalEndpointConfig::Tcp(6543))
            })
        );
        assert_eq!(
            parse_args(&args(&["forward", "--local-port=0"])),
            Ok(Command::Forward {
                local: Some(LocalEndpointConfig::Tcp(0))
            })
        );
        assert_eq!(
            parse_args(&args(&["forward", "--unix"])),
            Ok(Command::Forward {
                local: Some(LocalEndpointConfig::Unix)
            })
        );
        assert_eq!(parse_args(&args(&["forward", "--help"])), Ok(Command::Help));
        assert_eq!(parse_args(&args(&["--version"])), Ok(Command::Version));
        assert!(parse_args(&args(&[])).is_err());
        assert!(parse_args(&args(&["forward", "--local-port"])).is_err());
        assert!(parse_args(&args(&["forward", "--local-port", "x"])).is_err());
        assert!(parse_args(&args(&["forward", "--unix", "--local-port", "1"])).is_err());
        assert!(parse_args(&args(&["check", "--unix"])).is_err());
        assert!(parse_args(&args(&["frobnicate"])).is_err());
    }

    #[test]
    fn local_url_keeps_user_db_and_query_and_hides_password() {
        assert_eq!(
            replace_authority(
                "postgres://app:pw@db.internal:5432/app?sslmode=disable",
                "127.0.0.1:4000"
            )
            .as_deref(),
            Some("postgres://app:pw@127.0.0.1:4000/app?sslmode=disable")
        );
        assert_eq!(
            replace_authority("postgres://db/app", "127.0.0.1:1").as_deref(),
            Some("postgres://127.0.0.1:1/app")
        );
        let config = Config::new("postgres://app:s3cret@db.internal:5432/app");
        let url = local_database_url(&config, &LocalEndpoint::Tcp(([127, 0, 0, 1], 4000).into())).unwrap();
        assert_eq!(url, "postgres://app:***@127.0.0.1:4000/app");
    }
}
