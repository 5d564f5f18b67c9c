//! `sea-orm-tunnel forward`: hold the tunnel for other clients until Ctrl-C or SIGTERM.

use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sea_orm_tunnel::config::{Config, LocalEndpointConfig, TargetSessionAttrs, TunnelConfig};
use sea_orm_tunnel::tunnel::{LocalEndpoint, SshTunnel, TunnelEvent, TunnelState};
use sea_orm_tunnel::url::{local_database_url_hosts, redact_url};
use sea_orm_tunnel::{Error, Result};
use secrecy::ExposeSecret as _;
use tokio::sync::broadcast;

use crate::sidecar::{self, Health, SidecarFlags};
use crate::{EXIT_CONFIG, EXIT_FAILED};

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

/// Runs `forward`; returns the process exit code.
pub(crate) async fn run(local: Option<LocalEndpointConfig>, flags: SidecarFlags) -> ExitCode {
    let settings = match sidecar::resolve(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    sidecar::set_json_logs(settings.json_logs);
    sidecar::install_warning_log();
    // The probes answer from the start: /liveness 200, /startup and /readiness 503 until the
    // tunnel is up.
    let health = Arc::new(Health::new(settings.http.and_then(|_| sidecar::install_metrics())));
    if let Some(addr) = settings.http {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener
                    .local_addr()
                    .map_or_else(|_| addr.to_string(), |a| a.to_string());
                println!("http on {bound}");
                let _ = std::io::stdout().flush();
                log(format_args!(
                    "health and metrics on http://{bound}/ (startup, liveness, readiness, metrics)"
                ));
                tokio::spawn(sidecar::serve_http(listener, health.clone()));
            }
            Err(e) => {
                error(format_args!("binding --http / FORWARD_HTTP {addr}: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let (mut tunnel_config, config) = match forward_config() {
        Ok(c) => c,
        Err(e) => {
            error(format_args!("{e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(local) = local {
        tunnel_config = tunnel_config.local(local);
    }
    // forward's own defaults, not the pool's: sessions opened as clients need them.
    match settings.max_sessions {
        Some(n) => tunnel_config = tunnel_config.max_sessions(n),
        None if sea_orm_tunnel::config::is_set("SSH_MAX_SESSIONS").unwrap_or(false) => {}
        None => tunnel_config = tunnel_config.max_sessions(usize::MAX),
    }
    tunnel_config = tunnel_config.max_local_connections(settings.max_connections);
    let sessions = if tunnel_config.max_sessions == usize::MAX {
        "SSH sessions opened as needed".to_owned()
    } else {
        format!("at most {} SSH sessions", tunnel_config.max_sessions)
    };
    let clients = settings
        .max_connections
        .map_or_else(|| "no client limit".to_owned(), |n| format!("at most {n} clients"));
    log(format_args!(
        "{sessions} x {} channels; {clients}; drain after SIGTERM up to {:?}",
        tunnel_config.max_channels, settings.max_sigterm_delay
    ));
    // TLS to PostgreSQL per DATABASE_URL's sslmode, held by the tunnel; files read now.
    if let Some(config) = &config {
        // A multi-host DATABASE_URL: one local endpoint per server, so that a libpq client given
        // the printed multi-host URL chooses among them with its own target_session_attrs, as it
        // would without the bastion (unless SSH_REMOTE_HOST / SSH_REMOTE_PORT pick one server).
        let before = tunnel_config.alternate_targets.len();
        tunnel_config = match config.with_alternate_targets(tunnel_config) {
            Ok(t) => t,
            Err(e) => {
                error(format_args!("{e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let hosts = config.database_hosts().map_or(0, |h| h.len());
        if tunnel_config.alternate_targets.len() > before {
            // libpq moves to the next host only when its TCP connect fails, which a local
            // endpoint never does: a dead server's endpoint passes the client on instead.
            tunnel_config.alternate_fallthrough = true;
        } else if hosts > 1 && tunnel_config.alternate_targets.is_empty() {
            log(format_args!(
                "DATABASE_URL lists {hosts} hosts; SSH_REMOTE_HOST/SSH_REMOTE_PORT choose one: forwarding to {}",
                tunnel_config.remote_target()
            ));
        }
        tunnel_config = match sea_orm_tunnel::tls::resolve_tunnel(config, &tunnel_config) {
            // PgBouncer mode (`pgbouncer=true` / POSTGRES_PGBOUNCER): named statements rewritten.
            Ok(t) => t.pgbouncer(config.pgbouncer_mode()),
            Err(e) => {
                error(format_args!("{e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    }
    let holds_tls = sea_orm_tunnel::tls::tunnel_holds_tls(&tunnel_config);
    if let Some(tls) = tunnel_config.postgres_tls.as_ref().filter(|_| holds_tls) {
        log(format_args!(
            "TLS to PostgreSQL held by the tunnel: sslmode={}, server name {:?}; local clients connect with sslmode=disable",
            tls.mode, tls.server_name
        ));
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
            error(format_args!("{e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    health.started(tunnel.clone());
    let mut events = tunnel.subscribe();
    let mut state = tunnel.state();
    // The first `Connected` event fired inside `connect`, before anyone could subscribe.
    log(format_args!(
        "tunnel connected ({} SSH session)",
        tunnel.stats().sessions
    ));
    // Installed before anything says we are up: a SIGTERM right after must drain, not kill.
    let mut signals = Signals::install();
    let endpoint = tunnel.local_endpoint().clone();
    println!("listening on {endpoint}");
    // Every server and its local endpoint, the configured remote target first.
    let targets: Vec<(String, LocalEndpoint, u16)> = tunnel
        .target_endpoints()
        .into_iter()
        .zip(
            std::iter::once(tunnel.config().remote_port)
                .chain(tunnel.config().alternate_targets.iter().map(|(_, port)| *port)),
        )
        .map(|((name, endpoint), port)| (name, endpoint, port))
        .collect();
    if targets.len() > 1 {
        for (name, endpoint, _) in &targets {
            println!("endpoint {endpoint} for {name}");
        }
    }
    let attrs = config
        .as_ref()
        .and_then(|c| c.resolve_target_session_attrs().ok())
        .unwrap_or(TargetSessionAttrs::Any);
    let endpoints: Vec<(LocalEndpoint, u16)> = targets.iter().map(|(_, e, port)| (e.clone(), *port)).collect();
    let local_url = config.as_ref().and_then(|config| {
        local_database_url_hosts(config.database_url.expose_secret(), &endpoints, holds_tls, attrs).ok()
    });
    if let Some(url) = &local_url {
        println!("DATABASE_URL={}", redact_url(url));
    }
    let options = config.as_ref().and_then(|c| c.database_options().ok());
    let user = options
        .as_ref()
        .map(|o| o.get_username().to_owned())
        .filter(|u| !u.is_empty());
    let dbname = options.as_ref().and_then(|o| o.get_database().map(str::to_owned));
    let mut psql = psql_target(&endpoints);
    if !psql.is_empty() {
        if let Some(user) = user {
            psql.push_str(&format!(" user={user}"));
        }
        if let Some(dbname) = dbname {
            psql.push_str(&format!(" dbname={dbname}"));
        }
        // The tunnel holds TLS upstream: the private local side is plaintext.
        if holds_tls {
            psql.push_str(" sslmode=disable");
        }
        if endpoints.len() > 1 && attrs != TargetSessionAttrs::Any {
            psql.push_str(&format!(" target_session_attrs={attrs}"));
        }
        println!("psql: psql \"{psql}\"");
    }
    let _ = std::io::stdout().flush();

    // Refusals (the --max-connections limit, or no channel in time), summed once a second.
    let mut refusals = tokio::time::interval(Duration::from_secs(1));
    let mut refused = 0;
    let code = loop {
        tokio::select! {
            _ = refusals.tick() => {
                let now = tunnel.stats().refused_connections;
                if now > refused {
                    let limit = settings
                        .max_connections
                        .map_or_else(String::new, |n| format!(" (--max-connections {n})"));
                    log(format_args!(
                        "{} local connections refused{limit}; {now} since the start",
                        now - refused
                    ));
                    refused = now;
                }
            }
            signal = signals.recv() => {
                health.drain();
                log(format_args!("{signal}: stopping; readiness answers 503"));
                drain(&tunnel, &mut events, settings.max_sigterm_delay, &mut signals).await;
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
                        self::error(format_args!("the tunnel stopped: {error}"));
                        break ExitCode::from(EXIT_FAILED);
                    }
                    // The tunnel starts the next round by itself after that pause.
                    log(format_args!("reconnect attempts exhausted; next round in about {round_pause:?}"));
                }
            }
        }
    };
    tunnel.disconnect().await;
    if code == ExitCode::SUCCESS {
        log(format_args!("stopped"));
    }
    code
}

/// `host=... port=...` for psql: the endpoints in order (libpq's comma-separated lists), socket
/// directories for Unix endpoints; empty when an endpoint cannot be named that way.
fn psql_target(endpoints: &[(LocalEndpoint, u16)]) -> String {
    let mut hosts = Vec::with_capacity(endpoints.len());
    let mut ports = Vec::with_capacity(endpoints.len());
    for (endpoint, remote_port) in endpoints {
        match (endpoint, endpoint.unix_dir()) {
            (LocalEndpoint::Unix(_), Some(dir)) => {
                hosts.push(dir.display().to_string());
                ports.push(remote_port.to_string());
            }
            (LocalEndpoint::Tcp(addr), _) => {
                hosts.push(addr.ip().to_string());
                ports.push(addr.port().to_string());
            }
            _ => return String::new(),
        }
    }
    if hosts.is_empty() {
        return String::new();
    }
    format!("host={} port={}", hosts.join(","), ports.join(","))
}

/// Keeps serving (new connections included) until no forwarded connection is open or `delay`
/// has passed, or a second signal arrives.
async fn drain(
    tunnel: &SshTunnel,
    events: &mut broadcast::Receiver<TunnelEvent>,
    delay: Duration,
    signals: &mut Signals,
) {
    let deadline = tokio::time::Instant::now() + delay;
    let mut announced = false;
    loop {
        let open = tunnel.stats().channels_active;
        if open == 0 {
            if announced {
                log(format_args!("drained: no connection open"));
            }
            return;
        }
        if !announced {
            log(format_args!(
                "draining: {open} connections open; serving until they end or {delay:?} passes"
            ));
            announced = true;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                log(format_args!("max-sigterm-delay {delay:?} passed with {open} connections open; closing them"));
                return;
            }
            signal = signals.recv() => {
                log(format_args!("{signal} again: closing {open} connections now"));
                return;
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            event = events.recv() => if let Ok(event) = event { log_event(&event) },
        }
    }
}

/// SIGINT and SIGTERM, registered when created (a lazily registered handler would miss a signal
/// sent right after the process said it was up).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// The next Ctrl-C or SIGTERM, by name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.int) => "interrupted",
                () = next(&mut self.term) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

fn log_event(event: &TunnelEvent) {
    match event {
        TunnelEvent::Connected {
            session,
            reconnect,
            bastion,
            ..
        } => {
            if *reconnect {
                log(format_args!(
                    "tunnel reconnected (session {session}, bastion {bastion})"
                ));
            } else {
                log(format_args!("tunnel connected (session {session}, bastion {bastion})"));
            }
        }
        TunnelEvent::SessionOpened { session, sessions, .. } => log(format_args!(
            "additional SSH session {session} opened ({sessions} open)"
        )),
        TunnelEvent::SessionClosed { session, sessions, .. } => {
            log(format_args!("idle SSH session {session} closed ({sessions} open)"))
        }
        TunnelEvent::Disconnected {
            session,
            reason,
            bastion,
            ..
        } => log(format_args!("SSH session {session} (bastion {bastion}) lost: {reason}")),
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
        TunnelEvent::BastionFailed {
            bastion,
            error,
            permanent,
        } => log(format_args!(
            "bastion {bastion} failed{}: {error}",
            if *permanent {
                " for good (not tried again)"
            } else {
                "; trying the next"
            }
        )),
        TunnelEvent::Closed => log(format_args!("tunnel closed")),
        other => log(format_args!("{other:?}")),
    }
}

/// One log line on stderr, prefixed with the time since the start (or JSON, `--json-logs`).
fn log(message: fmt::Arguments<'_>) {
    sidecar::log_line("info", message);
}

/// An error line on stderr: `error: ...` (or JSON, `--json-logs`).
fn error(message: fmt::Arguments<'_>) {
    sidecar::log_line("error", message);
}
