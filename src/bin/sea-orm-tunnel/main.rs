//! `sea-orm-tunnel`: hold the managed SSH tunnel for any PostgreSQL client, or diagnose it.
//!
//! ```text
//! sea-orm-tunnel forward [--local-port PORT | --unix] [--max-sessions N] [--max-connections N]
//!                        [--http ADDR] [--max-sigterm-delay DURATION] [--json-logs]
//! sea-orm-tunnel check
//! ```
//!
//! Both read the same environment variables (and `.env.local` / `.env`) as
//! `Config::from_env`; run `sea-orm-tunnel --help` for the details. Built only with the `cli`
//! feature, so the argument parser is not in library users' builds.

mod check;
mod forward;
mod sidecar;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use sea_orm_tunnel::config::LocalEndpointConfig;

use crate::sidecar::SidecarFlags;

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 1;
/// Exit code for a runtime failure of `forward`.
const EXIT_FAILED: u8 = 1;

const AFTER_HELP: &str = "\
Exit codes:
  0        check: every step works; forward: stopped by Ctrl-C or SIGTERM
  1        configuration error, or forward could not hold the tunnel
  2        bad arguments
  11-18    check failed at a step: 11 TCP reach, 12 SSH handshake, 13 host key, 14 authentication,
           15 channel open, 18 TLS, 16 database login, 17 SELECT 1

Configuration (environment, then .env.local, then .env):
  DATABASE_URL        postgres://user:password@host:port/db; host:port as seen from the bastion;
                      libpq's sslmode/sslrootcert/sslcert/sslkey (TLS held by the tunnel), pgbouncer=true
  SSH_HOST (a host, an ssh_config alias, or a list a,b:2222), SSH_CONFIG (path | none),
  SSH_PROXY_JUMP (user@host:port,...), SSH_CERTIFICATE_PATH, SSH_CHANNEL_WINDOW, SSH_SPARE_CHANNEL (ms),
  SSH_PORT (22), SSH_USER, SSH_KEY_PATH (~/.ssh/id_ed25519), SSH_KEY_PASSPHRASE,
  SSH_USE_AGENT, SSH_KNOWN_HOSTS (~/.ssh/known_hosts),
  SSH_HOST_KEY_POLICY (strict | accept-new | SHA256:<fingerprint>), SSH_REMOTE_HOST/PORT,
  SSH_LOCAL_PORT (0 | PORT | unix), SSH_KEEPALIVE_INTERVAL/MAX, SSH_MAX_RETRIES, SSH_RETRY_DELAY,
  APP_ENV, POSTGRES_CONNECTION_TIMEOUT ... (see the README's configuration table)
  forward only: FORWARD_MAX_CONNECTIONS, FORWARD_HTTP, FORWARD_MAX_SIGTERM_DELAY, FORWARD_JSON_LOGS
  (flags win over the environment, which wins over .env.local, then .env)";

/// PostgreSQL through an SSH bastion
#[derive(Debug, Parser)]
#[command(
    name = "sea-orm-tunnel",
    version,
    override_usage = "sea-orm-tunnel forward [--local-port PORT | --unix] [--max-sessions N] [--max-connections N]\n                              \
                      [--http ADDR] [--max-sigterm-delay DURATION] [--json-logs]\n       \
                      sea-orm-tunnel check\n       \
                      sea-orm-tunnel --help | --version",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Verbatim: without clap's `wrap_help` feature the long help keeps these line breaks.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Hold the tunnel so any client (psql, pgbench, another language) can use it
    ///
    /// Holds the tunnel (host key verified, keepalive, reconnect with backoff) so any client
    /// (psql, pgbench, another language) can use it. Prints `listening on ADDR` and a ready
    /// DATABASE_URL (password redacted) once the local endpoint is bound; logs tunnel events to
    /// stderr; stops cleanly on Ctrl-C or SIGTERM (exit 0). After a reconnect round gives up on a
    /// transient error, starts another one instead of exiting.
    ///
    /// A multi-host DATABASE_URL (postgres://u@db1:5432,db2:5432/db?target_session_attrs=...)
    /// gets one local endpoint per server (`endpoint ADDR for HOST:PORT` lines) and a multi-host
    /// local URL for libpq clients, which choose the server themselves; a connection to the
    /// endpoint of a server the bastion cannot reach goes to the next server in the list.
    ///
    /// As a sidecar: SSH sessions are opened as clients need them (no cap unless --max-sessions
    /// or SSH_MAX_SESSIONS); --max-connections refuses clients beyond N with a PostgreSQL error
    /// (SQLSTATE 53300) that psql prints (N for all endpoints together); --http serves /startup, /liveness, /readiness (503
    /// while the tunnel is down or draining) and /metrics (Prometheus). On SIGTERM readiness
    /// turns 503 at once, connections (new ones too) are served until none is open or
    /// --max-sigterm-delay passes, then exit 0.
    #[command(verbatim_doc_comment)]
    Forward(ForwardArgs),
    /// Diagnose step by step, from TCP reach to SELECT 1; exit 11-18 names the failed step
    ///
    /// Diagnoses step by step: TCP reach, SSH handshake, host key, authentication, channel open,
    /// TLS, database login, SELECT 1 (through a jump chain the SSH steps name the hop). Prints each
    /// step with its time and a verdict. Exit 0 when everything works; when a step fails: 11 TCP
    /// reach, 12 SSH handshake, 13 host key, 14 authentication, 15 channel open, 18 TLS,
    /// 16 database login, 17 SELECT 1; 1 for a configuration error.
    #[command(verbatim_doc_comment)]
    Check,
}

#[derive(Debug, Args)]
struct ForwardArgs {
    /// Listen on 127.0.0.1:PORT (0 = ephemeral, the default; `unix` = --unix)
    #[arg(long, value_name = "PORT", env = "SSH_LOCAL_PORT", value_parser = parse_local_port)]
    local_port: Option<LocalPort>,
    /// Listen on a Unix socket in a private 0700 directory instead
    #[arg(long)]
    unix: bool,
    /// Cap SSH sessions at N (default: SSH_MAX_SESSIONS if set, else opened as needed, no cap)
    #[arg(long, value_name = "N", value_parser = sidecar::parse_sessions)]
    max_sessions: Option<usize>,
    /// Serve at most N clients at once; more get SQLSTATE 53300 (default 0 = unlimited)
    #[arg(long, value_name = "N", env = "FORWARD_MAX_CONNECTIONS", value_parser = sidecar::parse_count)]
    max_connections: Option<usize>,
    /// Serve /startup, /liveness, /readiness and /metrics (Prometheus) on ADDR, e.g. 127.0.0.1:9090
    #[arg(long, value_name = "ADDR", env = "FORWARD_HTTP", value_parser = sidecar::parse_http)]
    http: Option<std::net::SocketAddr>,
    /// After SIGTERM, keep serving until connections end or this passes (default 5s)
    #[arg(long, value_name = "DURATION", env = "FORWARD_MAX_SIGTERM_DELAY", value_parser = sidecar::parse_duration)]
    max_sigterm_delay: Option<Duration>,
    /// Log one JSON object per line on stderr
    #[arg(long, env = "FORWARD_JSON_LOGS")]
    json_logs: bool,
}

/// A `--local-port` / `SSH_LOCAL_PORT` value; `None` for an empty variable, which the
/// configuration treats as unset.
#[derive(Debug, Clone)]
struct LocalPort(Option<LocalEndpointConfig>);

/// The `SSH_LOCAL_PORT` spelling, as the configuration reads it: a port number or `unix`.
fn parse_local_port(value: &str) -> Result<LocalPort, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(LocalPort(None));
    }
    if value.eq_ignore_ascii_case("unix") {
        return Ok(LocalPort(Some(LocalEndpointConfig::Unix)));
    }
    value
        .parse::<u16>()
        .map(|port| LocalPort(Some(LocalEndpointConfig::Tcp(port))))
        .map_err(|_| "not a port number (0-65535, 0 = ephemeral) or `unix`".to_owned())
}

/// What to run, after parsing.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// `None`: where the configuration says (SSH_LOCAL_PORT in a `.env` file, else ephemeral).
    Forward {
        local: Option<LocalEndpointConfig>,
        /// The sidecar flags given (flag or process environment).
        sidecar: SidecarFlags,
    },
    Check,
}

/// Parses `args` (program name first) with `cli`; help, version and usage errors come back as
/// the clap error to print.
fn parse(
    mut cli: clap::Command,
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> clap::error::Result<Command> {
    let matches = cli.try_get_matches_from_mut(args)?;
    let parsed = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cli))?;
    Ok(match parsed.command {
        Cmd::Check => Command::Check,
        Cmd::Forward(args) => {
            // Not `conflicts_with`: clap counts a value from SSH_LOCAL_PORT as given, but the flag
            // overrides the variable, as it does for every other setting.
            let port_on_command_line = matches
                .subcommand_matches("forward")
                .and_then(|m| m.value_source("local_port"))
                == Some(ValueSource::CommandLine);
            if args.unix && port_on_command_line {
                let forward = cli.find_subcommand_mut("forward").expect("defined above");
                return Err(forward.error(ErrorKind::ArgumentConflict, "give either --local-port or --unix, once"));
            }
            let local = if args.unix {
                Some(LocalEndpointConfig::Unix)
            } else {
                args.local_port.and_then(|p| p.0)
            };
            let forward = matches.subcommand_matches("forward");
            let given = |id: &str| {
                forward
                    .and_then(|m| m.value_source(id))
                    .is_some_and(|s| s != ValueSource::DefaultValue)
            };
            let sidecar = SidecarFlags {
                max_sessions: args.max_sessions,
                max_connections: args.max_connections,
                http: args.http,
                max_sigterm_delay: args.max_sigterm_delay,
                json_logs: given("json_logs").then_some(args.json_logs),
            };
            Command::Forward { local, sidecar }
        }
    })
}

/// One thread by default: a forwarded query crosses the local socket, a channel task, the SSH
/// session task and the SSH socket, and on one thread each hand-off is a push onto the local run
/// queue instead of a wake-up of another worker (a futex and a context switch). The tunnel's
/// work is I/O, not CPU: one thread serves more transactions per CPU second (like `ssh -L`,
/// which is one thread too). `TOKIO_WORKER_THREADS=N` asks for tokio's multi-thread runtime
/// with N workers instead.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        // tokio reads the variable itself.
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
}

fn main() -> ExitCode {
    // clap prints help and version on stdout (exit 0) and usage errors on stderr (exit 2).
    let command = parse(Cli::command(), std::env::args_os()).unwrap_or_else(|e| e.exit());
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = runtime.block_on(async move {
        match command {
            Command::Forward { local, sidecar } => forward::run(local, sidecar).await,
            Command::Check => check::run().await,
        }
    });
    // Background work (a session closing) must not keep the process alive after the verdict.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser without the SSH_LOCAL_PORT fallback, so the developer's environment does not
    /// change the outcome.
    fn cli() -> clap::Command {
        Cli::command().mut_subcommand("forward", |f| {
            [
                "local_port",
                "max_connections",
                "http",
                "max_sigterm_delay",
                "json_logs",
            ]
            .into_iter()
            .fold(f, |f, id| f.mut_arg(id, |a| a.env(None)))
        })
    }

    fn parse_args(args: &[&str]) -> clap::error::Result<Command> {
        parse(cli(), std::iter::once("sea-orm-tunnel").chain(args.iter().copied()))
    }

    fn error_kind(args: &[&str]) -> Option<ErrorKind> {
        parse_args(args).err().map(|e| e.kind())
    }

    #[test]
    fn parses_commands_and_flags() {
        assert_eq!(parse_args(&["check"]).unwrap(), Command::Check);
        assert_eq!(
            parse_args(&["forward"]).unwrap(),
            Command::Forward {
                local: None,
                sidecar: SidecarFlags::default()
            }
        );
        assert_eq!(
            parse_args(&[
                "forward",
                "--max-sessions",
                "3",
                "--max-connections=2",
                "--http",
                ":9090",
                "--max-sigterm-delay",
                "30s",
                "--json-logs"
            ])
            .unwrap(),
            Command::Forward {
                local: None,
                sidecar: SidecarFlags {
                    max_sessions: Some(3),
                    max_connections: Some(2),
                    http: Some("127.0.0.1:9090".parse().unwrap()),
                    max_sigterm_delay: Some(Duration::from_secs(30)),
                    json_logs: Some(true),
                }
            }
        );
        assert_eq!(
            parse_args(&["forward", "--local-port", "6543"]).unwrap(),
            Command::Forward {
                local: Some(LocalEndpointConfig::Tcp(6543)),
                sidecar: SidecarFlags::default()
            }
        );
        assert_eq!(
            parse_args(&["forward", "--local-port=0"]).unwrap(),
            Command::Forward {
                local: Some(LocalEndpointConfig::Tcp(0)),
                sidecar: SidecarFlags::default()
            }
        );
        assert_eq!(
            parse_args(&["forward", "--unix"]).unwrap(),
            Command::Forward {
                local: Some(LocalEndpointConfig::Unix),
                sidecar: SidecarFlags::default()
            }
        );
        assert_eq!(error_kind(&["forward", "--help"]), Some(ErrorKind::DisplayHelp));
        assert_eq!(error_kind(&["help"]), Some(ErrorKind::DisplayHelp));
        assert_eq!(error_kind(&["--version"]), Some(ErrorKind::DisplayVersion));
        assert!(parse_args(&[]).is_err());
        assert!(parse_args(&["forward", "--local-port"]).is_err());
        assert!(parse_args(&["forward", "--local-port", "x"]).is_err());
        assert!(parse_args(&["forward", "--unix", "--local-port", "1"]).is_err());
        assert!(parse_args(&["check", "--unix"]).is_err());
        assert!(parse_args(&["frobnicate"]).is_err());
        // Usage errors exit 2; help and version exit 0.
        assert_eq!(parse_args(&["frobnicate"]).unwrap_err().exit_code(), 2);
        assert_eq!(
            parse_args(&["forward", "--local-port", "x"]).unwrap_err().exit_code(),
            2
        );
        assert_eq!(parse_args(&["forward", "--help"]).unwrap_err().exit_code(), 0);
    }

    #[test]
    fn local_port_reads_the_ssh_local_port_spelling() {
        assert_eq!(
            parse_local_port(" 6543 ").unwrap().0,
            Some(LocalEndpointConfig::Tcp(6543))
        );
        assert_eq!(parse_local_port("UNIX").unwrap().0, Some(LocalEndpointConfig::Unix));
        // Empty counts as unset, as in the configuration.
        assert_eq!(parse_local_port("").unwrap().0, None);
        assert!(parse_local_port("65536").is_err());
        assert!(parse_local_port("-1").is_err());
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
