//! `sea-orm-tunnel forward`: hold the tunnel for other clients until Ctrl-C or SIGTERM.

use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use sea_orm_tunnel::config::{Config, LocalEndpointConfig, TunnelConfig};
use sea_orm_tunnel::tunnel::{LocalEndpoint, SshTunnel, TunnelEvent, TunnelState};
use sea_orm_tunnel::url::{local_database_url, local_database_url_tls_in_tunnel, redact_url};
use sea_orm_tunnel::{Error, Result};
use secrecy::ExposeSecret as _;
use tokio::sync::broadcast;

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
pub(crate) async fn run(local: Option<LocalEndpointConfig>) -> ExitCode {
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
    // TLS to PostgreSQL per DATABASE_URL's sslmode, held by the tunnel; files read now.
    if let Some(config) = &config {
        tunnel_config = match sea_orm_tunnel::tls::resolve_tunnel(config, &tunnel_config) {
            // PgBouncer mode (`pgbouncer=true` / POSTGRES_PGBOUNCER): named statements rewritten.
            Ok(t) => t.pgbouncer(config.pgbouncer_mode()),
            Err(e) => {
                eprintln!("error: {e}");
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
    let remote_port = tunnel.config().remote_port;
    let local_url = config.as_ref().and_then(|config| {
        let url = config.database_url.expose_secret();
        if holds_tls {
            local_database_url_tls_in_tunnel(url, &endpoint, remote_port).ok()
        } else {
            local_database_url(url, &endpoint, remote_port).ok()
        }
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
    let mut psql = match (&endpoint, endpoint.unix_dir()) {
        (LocalEndpoint::Unix(_), Some(dir)) => format!("host={} port={remote_port}", dir.display()),
        (LocalEndpoint::Tcp(addr), _) => format!("host={} port={}", addr.ip(), addr.port()),
        _ => String::new(),
    };
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
        println!("psql: psql \"{psql}\"");
    }
    let _ = std::io::stdout().flush();

    let stop = shutdown_signal();
    tokio::pin!(stop);
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

/// One log line on stderr, prefixed with the time since the start.
fn log(message: fmt::Arguments<'_>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[{:>9.3}s] {message}", t.as_secs_f64());
}
