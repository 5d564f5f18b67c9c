//! Run with: `cargo run --example quickstart`
//!
//! The whole path in one run: tunnel up, pool, migration, queries, health events, a metrics
//! snapshot, a dropped bastion and the automatic recovery, and a clean shutdown.
//!
//! With no configuration it starts a throwaway PostgreSQL and an in-process SSH bastion on
//! loopback (`testkit::Sandbox`: strict host-key checking against a private known_hosts, a
//! generated client key). With `DATABASE_URL` and `SSH_HOST` set (see the README's table, or a
//! `.env.local`) it uses your own bastion and database instead; the fault-injection step is then
//! skipped.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sea_orm_tunnel::config::{self, Config, HostKeyPolicy};
use sea_orm_tunnel::manager::{ConnectionManager, HealthEvent};
use sea_orm_tunnel::observe::events::AcquireTimeLayer;
use sea_orm_tunnel::observe::metrics::describe_metrics;
use sea_orm_tunnel::testkit::Sandbox;
use sea_orm_tunnel::tunnel::TunnelEvent;
use sea_orm_tunnel_migration::{Migrator, MigratorTrait};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nquickstart failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Metrics: the library only records through the `metrics` facade; the application installs
    // a recorder. Here: Prometheus text, rendered at the end.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    describe_metrics();
    // Tracing: errors on stderr (RUST_LOG overrides; the filter is the fmt layer's own, so it
    // does not decide what the metrics see), plus the layer that turns sqlx's acquire timings
    // into the `db_connection_acquire_seconds` histogram.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(AcquireTimeLayer::filtered())
        .init();

    step("configuration");
    // Same lookup as `Config::from_env`: the environment, then `.env.local`, then `.env`.
    let own = config::is_set("DATABASE_URL")? && config::is_set("SSH_HOST")?;
    let (sandbox, config) = if own {
        let config = Config::from_env()?;
        println!("   using DATABASE_URL / SSH_HOST from the environment (or .env.local / .env)");
        (None, config)
    } else {
        println!("   no DATABASE_URL / SSH_HOST: starting a throwaway PostgreSQL and an SSH bastion on loopback");
        let sandbox = Sandbox::start().await?;
        let config = sandbox
            .config()
            .map_pool(|p| p.max_connections(8))
            .map_health(|h| h.interval(Duration::from_secs(2)));
        (Some(sandbox), config)
    };

    step("tunnel and pool");
    let started = Instant::now();
    let manager = ConnectionManager::new(config).await?;
    println!("   connected in {:?}", started.elapsed());
    print_summary(&manager, sandbox.as_ref());
    if let Some(tunnel) = manager.tunnel() {
        let mut events = tunnel.subscribe();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    TunnelEvent::Connected { session, reconnect, .. } => {
                        println!(
                            "   [tunnel] session {session} up{}",
                            if reconnect { " (reconnected)" } else { "" }
                        )
                    }
                    TunnelEvent::Disconnected { session, reason, .. } => {
                        println!("   [tunnel] session {session} down: {reason}")
                    }
                    TunnelEvent::Reconnecting { attempt, delay, .. } => {
                        println!("   [tunnel] reconnect attempt {attempt} in {delay:?}")
                    }
                    TunnelEvent::Closed => break,
                    _ => {}
                }
            }
        });
    }
    let mut health_events = manager.subscribe_health();
    tokio::spawn(async move {
        while let Ok(event) = health_events.recv().await {
            let s = event.status();
            match &event {
                HealthEvent::HealthCheck(_) if s.healthy => println!(
                    "   [health] healthy: tunnel {}, SELECT 1 in {:?}, pool {} ({} idle)",
                    s.tunnel,
                    s.latency.unwrap_or_default(),
                    s.pool_size,
                    s.idle
                ),
                HealthEvent::HealthCheckFailed(_) => {
                    println!(
                        "   [health] UNHEALTHY: tunnel {}, {}",
                        s.tunnel,
                        s.error.as_deref().unwrap_or("?")
                    )
                }
                _ => {}
            }
        }
    });

    step("migration (connection_logs + log_connection_event)");
    let db = manager.connection().clone();
    Migrator::up(&db, None).await?;
    db.execute_unprepared("SELECT log_connection_event('quickstart', 'connected', NULL, '{\"demo\": true}')")
        .await?;
    let count = scalar_i64(&db, "SELECT count(*) FROM connection_logs").await?;
    println!("   migrated; connection_logs has {count} row(s)");

    step("queries");
    let version = scalar_string(&db, "SELECT split_part(version(), ',', 1)").await?;
    println!("   server: {version}");
    let mut latencies = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        scalar_i64(&db, "SELECT 1::int8").await?;
        latencies.push(t.elapsed());
    }
    print_latencies("200 x SELECT 1", &mut latencies);
    let concurrent = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            scalar_i64(&db, &format!("SELECT {i}::int8 FROM pg_sleep(0.05)")).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!("   8 concurrent 50 ms queries took {:?}", concurrent.elapsed());
    let stats = manager.stats();
    println!(
        "   pool: {} open, {} idle, max {}, {} checkouts",
        stats.size, stats.idle, stats.max, stats.acquired_total
    );

    if let Some(sandbox) = &sandbox {
        step("fault: the bastion drops every SSH session");
        let dropped = sandbox.bastion().drop_sessions();
        let t = Instant::now();
        println!("   dropped {dropped} session(s)");
        // Idempotent read: let the manager retry transient failures with its backoff.
        let n = manager
            .retry(|db| async move { scalar_i64(&db, "SELECT 42::int8").await })
            .await?;
        println!(
            "   query after the drop returned {n}, {:?} after the fault",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = manager.check_health().await;
        println!("   health now: healthy = {}, tunnel {}", status.healthy, status.tunnel);
        let mut latencies = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = Instant::now();
            scalar_i64(&db, "SELECT 1::int8").await?;
            latencies.push(t.elapsed());
        }
        print_latencies("on the new session, 200 x SELECT 1", &mut latencies);
    }

    step("metrics snapshot (Prometheus text, excerpt)");
    let rendered = prometheus.render();
    for line in rendered.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("db_pool_connections")
                || l.starts_with("db_health_checks_total")
                || l.starts_with("db_connection_acquire_seconds_count")
                || l.starts_with("db_connection_acquire_seconds{") && l.contains("quantile=\"0.5\"")
                || l.starts_with("ssh_tunnel_up")
                || l.starts_with("ssh_tunnel_sessions")
                || l.starts_with("ssh_tunnel_reconnects_total")
                || l.starts_with("ssh_tunnel_bytes_total"))
    }) {
        println!("   {line}");
    }

    step("graceful shutdown");
    let report = manager.shutdown(Duration::from_secs(5)).await;
    println!(
        "   drained {}, forced {}, took {:?}",
        report.drained, report.forced, report.duration
    );
    drop(sandbox);
    println!("\ndone.");
    Ok(())
}

/// What the run is connected to, one line per part (the whole `Config` is `{:?}` away).
fn print_summary(manager: &ConnectionManager, sandbox: Option<&Sandbox>) {
    let config = manager.config();
    let origin = if sandbox.is_some() { "throwaway" } else { "yours" };
    match (manager.tunnel(), config.tunnel.as_ref()) {
        (Some(tunnel), Some(t)) => {
            println!(
                "   PostgreSQL   {}:{} ({origin}), reached from the bastion",
                t.remote_host, t.remote_port
            );
            let bastion_kind = if sandbox.is_some() { "in-process" } else { "yours" };
            println!("   bastion      {}@{}:{} ({bastion_kind})", t.user, t.host, t.port);
            println!(
                "   host key     {}",
                host_key_summary(&t.host_key_policy, &t.known_hosts)
            );
            if let Some(sandbox) = sandbox {
                println!(
                    "                the bastion's key is {}",
                    sandbox.bastion().host_key_fingerprint()
                );
            }
            println!(
                "   tunnel       local endpoint {} -> {}:{}, up to {} SSH session(s) x {} channels",
                tunnel.local_endpoint(),
                t.remote_host,
                t.remote_port,
                t.max_sessions,
                t.max_channels
            );
        }
        _ => println!("   PostgreSQL   {} ({origin}), direct", config.redacted_database_url()),
    }
    println!(
        "   pool         up to {} connections (min {}), acquire timeout {:?}, health check every {:?}",
        config.pool.max_connections, config.pool.min_connections, config.pool.acquire_timeout, config.health.interval
    );
}

/// The host-key policy in words.
fn host_key_summary(policy: &HostKeyPolicy, known_hosts: &std::path::Path) -> String {
    match policy {
        HostKeyPolicy::Strict => format!("strict: the bastion's key must be in {}", known_hosts.display()),
        HostKeyPolicy::AcceptNew => format!(
            "accept-new: an unknown key is learnt into {}, a changed one refused",
            known_hosts.display()
        ),
        HostKeyPolicy::Fingerprint(fingerprint) => format!("pinned: the bastion's key must be {fingerprint}"),
        HostKeyPolicy::InsecureAcceptAny => "insecure-accept-any: any key is accepted (not for production)".to_owned(),
        other => other.to_string(),
    }
}

fn print_latencies(what: &str, latencies: &mut [Duration]) {
    latencies.sort();
    println!(
        "   {what}: p50 {:?}, p99 {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );
}

fn step(title: &str) {
    println!("\n== {title}");
}

async fn scalar_i64(db: &impl ConnectionTrait, sql: &str) -> Result<i64, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(sql.to_owned()))?;
    row.try_get_by_index(0)
}

async fn scalar_string(db: &impl ConnectionTrait, sql: &str) -> Result<String, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(sql.to_owned()))?;
    row.try_get_by_index(0)
}
