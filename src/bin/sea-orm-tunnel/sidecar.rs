//! `forward` as a sidecar: its own settings (flags > environment > `.env.local` / `.env`), the
//! health and metrics endpoints of `--http`, and JSON log lines.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sea_orm_tunnel::tunnel::SshTunnel;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `--max-sigterm-delay` unless set.
pub(crate) const DEFAULT_SIGTERM_DELAY: Duration = Duration::from_secs(5);

/// The sidecar flags as given on the command line (or by their variable in the process
/// environment, through clap); `None` = not given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SidecarFlags {
    pub(crate) max_sessions: Option<usize>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) max_sigterm_delay: Option<Duration>,
    pub(crate) json_logs: Option<bool>,
}

/// The resolved sidecar settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sidecar {
    /// `None`: SSH_MAX_SESSIONS if set, else no cap.
    pub(crate) max_sessions: Option<usize>,
    /// `None`: no limit.
    pub(crate) max_connections: Option<usize>,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) max_sigterm_delay: Duration,
    pub(crate) json_logs: bool,
}

/// Fills what the flags (and the process environment, read by clap) left open from
/// `.env.local`, then `.env`, in the current directory.
pub(crate) fn resolve(flags: SidecarFlags) -> Result<Sidecar, String> {
    let files = dotenv_files();
    let file_var = |name: &str| -> Option<String> {
        files
            .iter()
            .find_map(|f| f.get(name))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let max_connections = match flags.max_connections {
        Some(n) => Some(n),
        None => file_var("FORWARD_MAX_CONNECTIONS")
            .map(|v| parse_count(&v).map_err(|e| format!("FORWARD_MAX_CONNECTIONS: {e}")))
            .transpose()?,
    };
    let http = match flags.http {
        Some(a) => Some(a),
        None => file_var("FORWARD_HTTP")
            .map(|v| parse_http(&v).map_err(|e| format!("FORWARD_HTTP: {e}")))
            .transpose()?,
    };
    let max_sigterm_delay = match flags.max_sigterm_delay {
        Some(d) => d,
        None => file_var("FORWARD_MAX_SIGTERM_DELAY")
            .map(|v| parse_duration(&v).map_err(|e| format!("FORWARD_MAX_SIGTERM_DELAY: {e}")))
            .transpose()?
            .unwrap_or(DEFAULT_SIGTERM_DELAY),
    };
    let json_logs = match flags.json_logs {
        Some(b) => b,
        None => file_var("FORWARD_JSON_LOGS")
            .map(|v| parse_bool(&v).map_err(|e| format!("FORWARD_JSON_LOGS: {e}")))
            .transpose()?
            .unwrap_or(false),
    };
    Ok(Sidecar {
        max_sessions: flags.max_sessions,
        // 0 = unlimited, as for the other counts.
        max_connections: max_connections.filter(|&n| n > 0),
        http,
        max_sigterm_delay,
        json_logs,
    })
}

fn dotenv_files() -> Vec<HashMap<String, String>> {
    [".env.local", ".env"]
        .iter()
        .filter_map(|name| dotenvy::from_path_iter(name).ok())
        .map(|iter| {
            let mut map = HashMap::new();
            for (k, v) in iter.flatten() {
                // The first definition wins, as in the library.
                map.entry(k).or_insert(v);
            }
            map
        })
        .collect()
}

/// A whole number.
pub(crate) fn parse_count(value: &str) -> Result<usize, String> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|_| format!("{value:?} is not a whole number"))
}

/// A session count: at least 1.
pub(crate) fn parse_sessions(value: &str) -> Result<usize, String> {
    match parse_count(value)? {
        0 => Err("must be at least 1".to_owned()),
        n => Ok(n),
    }
}

/// `ADDR:PORT` to serve HTTP on (`:PORT` = 127.0.0.1:PORT).
pub(crate) fn parse_http(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    let full = if value.starts_with(':') {
        format!("127.0.0.1{value}")
    } else {
        value.to_owned()
    };
    full.parse::<SocketAddr>()
        .map_err(|_| format!("{value:?} is not an address like 127.0.0.1:9090 (or :9090)"))
}

/// `30s`, `500ms`, `2m`, `1h`; a bare number is seconds.
pub(crate) fn parse_duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let bad = || format!("{value:?} is not a duration like 30s, 500ms or 2m");
    let n: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not a boolean (true/false)")),
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

static JSON_LOGS: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_json_logs(on: bool) {
    JSON_LOGS.store(on, Ordering::Relaxed);
}

/// One log line on stderr: `[  1.234s] message`, or with `--json-logs` one JSON object
/// (`time` = Unix seconds, `level`, `message`).
pub(crate) fn log_line(level: &str, message: fmt::Arguments<'_>) {
    write_line(level, false, message);
}

/// `log_line`; `timed` puts the time in front of error lines too (the library's, which do not
/// end the process).
fn write_line(level: &str, timed: bool, message: fmt::Arguments<'_>) {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    if JSON_LOGS.load(Ordering::Relaxed) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let line = serde_json::json!({
            "time": (now * 1000.0).round() / 1000.0,
            "level": level,
            "message": message.to_string(),
            "target": "sea_orm_tunnel::forward",
        });
        eprintln!("{line}");
    } else if level == "error" && !timed {
        eprintln!("error: {message}");
    } else if level == "error" {
        eprintln!("[{:>9.3}s] error: {message}", t.as_secs_f64());
    } else if level == "warn" {
        eprintln!("[{:>9.3}s] warning: {message}", t.as_secs_f64());
    } else {
        eprintln!("[{:>9.3}s] {message}", t.as_secs_f64());
    }
}

/// Shows the library's warnings and errors (`tracing` events: a refused client, a failed
/// channel open) as log lines of the same format; quieter events stay hidden, the tunnel's
/// state changes are logged from its events instead.
pub(crate) fn install_warning_log() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(WarningLog));
}

struct WarningLog;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningLog {
    fn register_callsite(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if metadata.is_event() && *metadata.level() <= tracing::Level::WARN {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        metadata.is_event() && *metadata.level() <= tracing::Level::WARN
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String, String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                } else {
                    self.1.push_str(&format!(" {}={value:?}", field.name()));
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.0 = value.to_owned();
                } else {
                    self.1.push_str(&format!(" {}={value}", field.name()));
                }
            }
        }
        let mut fields = Fields(String::new(), String::new());
        event.record(&mut fields);
        let level = if *event.metadata().level() == tracing::Level::ERROR {
            "error"
        } else {
            "warn"
        };
        write_line(level, true, format_args!("{}{}", fields.0, fields.1));
    }
}

// ---------------------------------------------------------------------------------------------
// Health and metrics
// ---------------------------------------------------------------------------------------------

/// What the probes read.
#[derive(Default)]
pub(crate) struct Health {
    /// Set once the tunnel first connected.
    tunnel: OnceLock<SshTunnel>,
    /// SIGTERM (or Ctrl-C) arrived: not ready any more.
    draining: AtomicBool,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Health {
    /// With `metrics`, `/metrics` renders it.
    pub(crate) fn new(metrics: Option<metrics_exporter_prometheus::PrometheusHandle>) -> Self {
        Health {
            metrics,
            ..Health::default()
        }
    }

    pub(crate) fn started(&self, tunnel: SshTunnel) {
        let _ = self.tunnel.set(tunnel);
    }

    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Status and body of one probe; never dials anything.
    fn answer(&self, path: &str) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match path {
            "/startup" => match self.tunnel.get() {
                Some(_) => (200, TEXT, "started\n".into()),
                None => (503, TEXT, "starting: the tunnel has not connected yet\n".into()),
            },
            // Answering at all is the test: the runtime runs and the tunnel is held (a fatal
            // tunnel error ends the process instead).
            "/liveness" => (200, TEXT, "ok\n".into()),
            "/readiness" => {
                if self.draining.load(Ordering::SeqCst) {
                    return (503, TEXT, "draining: shutting down\n".into());
                }
                match self.tunnel.get() {
                    None => (503, TEXT, "starting: the tunnel has not connected yet\n".into()),
                    Some(t) => {
                        let state = t.state().borrow().clone();
                        if state.is_connected() {
                            (200, TEXT, "ready\n".into())
                        } else {
                            (503, TEXT, format!("tunnel down: {state:?}\n"))
                        }
                    }
                }
            }
            "/metrics" => {
                let mut body = self.metrics.as_ref().map(|m| m.render()).unwrap_or_default();
                let ready = self.answer("/readiness").0 == 200;
                body.push_str(&format!(
                    "# HELP sea_orm_tunnel_forward_ready 1 while /readiness answers 200.\n\
                     # TYPE sea_orm_tunnel_forward_ready gauge\n\
                     sea_orm_tunnel_forward_ready {}\n",
                    u8::from(ready)
                ));
                if let Some(t) = self.tunnel.get() {
                    let s = t.stats();
                    body.push_str(&format!(
                        "# HELP sea_orm_tunnel_forward_connections_total Local connections accepted.\n\
                         # TYPE sea_orm_tunnel_forward_connections_total counter\n\
                         sea_orm_tunnel_forward_connections_total {}\n\
                         # HELP sea_orm_tunnel_forward_refused_total Local connections refused.\n\
                         # TYPE sea_orm_tunnel_forward_refused_total counter\n\
                         sea_orm_tunnel_forward_refused_total {}\n",
                        s.connections_total, s.refused_connections
                    ));
                }
                (200, "text/plain; version=0.0.4; charset=utf-8", body)
            }
            _ => (
                404,
                TEXT,
                "not found: /startup, /liveness, /readiness, /metrics\n".into(),
            ),
        }
    }
}

/// Installs the Prometheus recorder for `/metrics`; `None` if another one is installed.
pub(crate) fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    sea_orm_tunnel::observe::metrics::describe_metrics();
    Some(handle)
}

/// Serves the probes on `listener` until the process ends.
pub(crate) async fn serve_http(listener: TcpListener, health: Arc<Health>) {
    if let Some(handle) = health.metrics.clone() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        });
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, health.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One HTTP/1.x request, answered and closed.
async fn answer(mut stream: TcpStream, health: Arc<Health>) {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        std::io::Result::Ok(())
    };
    if !matches!(tokio::time::timeout(Duration::from_secs(5), read).await, Ok(Ok(()))) {
        return;
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match method {
        "GET" | "HEAD" => health.answer(path),
        _ => (405, "text/plain; charset=utf-8", "only GET and HEAD\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_addresses_and_counts() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_http(":9090").unwrap(), "127.0.0.1:9090".parse().unwrap());
        // An explicit address is taken as given (here another loopback address).
        assert_eq!(parse_http("[::1]:9091").unwrap(), "[::1]:9091".parse().unwrap());
        assert!(parse_http("localhost").is_err());
        assert!(parse_sessions("0").is_err());
        assert_eq!(parse_sessions("3").unwrap(), 3);
    }

    #[test]
    fn probes_before_the_tunnel_and_while_draining() {
        let health = Health::new(None);
        assert_eq!(health.answer("/startup").0, 503);
        assert_eq!(health.answer("/liveness").0, 200);
        assert_eq!(health.answer("/readiness").0, 503);
        assert_eq!(health.answer("/nope").0, 404);
        let (code, _, body) = health.answer("/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("sea_orm_tunnel_forward_ready 0"), "{body}");
        health.drain();
        assert!(health.answer("/readiness").2.contains("draining"));
    }
}
