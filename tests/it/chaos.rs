//! Chaos: writers insert rows with unique ids through the manager and through an axum server
//! with the layers, while a schedule injects faults — sshd sessions dropped, sshd stopped and
//! started, a blackhole between tunnel and sshd, PostgreSQL fast restarts, pool-exhausting
//! bursts, connection resets, a failover to a second bastion and back. The database accepts only
//! TLS (`hostssl`), which the tunnel holds with `sslmode=verify-full` against its own name. At the end every acknowledged write is in the table exactly once,
//! every failed write has a clear error, the system recovered within the bound after each fault,
//! pool connections / channels / SSH sessions / tasks / file descriptors are back at their
//! baseline, graceful shutdown meets its deadline, and no secret appeared in any log record (at
//! TRACE) or error.
//!
//! Runs about a minute (`CHAOS_SECONDS` of faults, default 45) and prints one line:
//! `chaos: faults=N attempted=N acknowledged=N failed=N lost=N duplicated=N max_recovery_ms=N fds_baseline=N fds_final=N`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::support::*;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait};
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, Config, HealthConfig, HostKeyPolicy, TunnelConfig};
use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer, RecoveryLayer};
use sea_orm_tunnel::testkit::{FaultProxy, KeyKind, OpenSshd, TempPostgres, TestCa};
use sea_orm_tunnel::{ConnectionManager, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Seconds of fault injection by default; `CHAOS_SECONDS` overrides.
const DEFAULT_SECONDS: u64 = 45;
/// After a fault is healed, the system must be healthy again within this bound. Generous: it
/// proves recovery, not speed (recovery times are measured in the benches).
const RECOVERY_BOUND: Duration = Duration::from_secs(20);
/// Pool size the pool shrinks back to when idle (`min_connections`).
const MIN_CONNECTIONS: u32 = 2;
const MAX_CONNECTIONS: u32 = 8;
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// `shutdown` may spend this much beyond the drain deadline on forcing (manager/shutdown.rs
/// `FORCE_BUDGET` is 3 s per step); with nothing checked out it needs none of it.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(3);

/// One write as its caller saw it.
#[derive(Debug)]
struct Outcome {
    id: i64,
    via: &'static str,
    /// The write returned success to its caller.
    acknowledged: bool,
    /// The error the caller got, when not acknowledged.
    error: Option<String>,
}

/// Inserts row `id` unless it is already there, so a retry after an ambiguous failure (the
/// COMMIT reached PostgreSQL but its answer was lost) never inserts it twice. The table has no
/// unique constraint on `id`: a duplicate from anywhere else stays visible.
///
/// The advisory lock makes the check and the insert one step even when an earlier attempt's
/// transaction is still finishing on the server (its connection died on our side first).
pub(super) async fn write_row(db: &DatabaseConnection, id: i64, via: &str) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    txn.execute_unprepared("SET LOCAL lock_timeout = '3s'").await?;
    txn.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)::text",
        [id.into()],
    ))
    .await?;
    let exists = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 FROM chaos_rows WHERE id = $1",
            [id.into()],
        ))
        .await?
        .is_some();
    if !exists {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO chaos_rows (id, via) VALUES ($1, $2)",
            [id.into(), via.into()],
        ))
        .await?;
    }
    txn.commit().await
}

async fn insert_handler(Db(db): Db, body: String) -> Result<StatusCode, Error> {
    let id: i64 = body
        .trim()
        .parse()
        .map_err(|_| Error::config("body", "expected a row id"))?;
    write_row(&db, id, "http").await?;
    Ok(StatusCode::CREATED)
}

/// `POST /rows` with the id as the body over a fresh HTTP/1.1 connection; the status and the
/// whole response text (head and body).
async fn post_row(addr: SocketAddr, id: i64) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let body = id.to_string();
    let request = format!(
        "POST /rows HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\nx-request-id: row-{id}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    Ok((status, text))
}

/// What must be back to baseline once the system is idle again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    pool_size: u32,
    pool_active: u32,
    channels: usize,
    sessions: usize,
    sshd_session_processes: usize,
    backends: i64,
    tasks: usize,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    DropSessions,
    SshdRestart,
    Blackhole,
    PostgresRestart,
    PoolBurst,
    ProxyCut,
    /// The preferred bastion goes down: the tunnel fails over to the fallback bastion, traffic
    /// continues there; then the preferred one is back and the fallback goes, so it returns.
    BastionFailover,
}

const SCHEDULE: [Fault; 7] = [
    Fault::DropSessions,
    Fault::PoolBurst,
    Fault::Blackhole,
    Fault::PostgresRestart,
    Fault::SshdRestart,
    Fault::ProxyCut,
    Fault::BastionFailover,
];

struct Lab {
    pg: TempPostgres,
    sshd: OpenSshd,
    /// The fallback bastion (`TunnelConfig::fallback_host`) on 127.0.0.2, reached directly. It
    /// runs only during [`Fault::BastionFailover`], so every other fault still hits `sshd`.
    fallback: OpenSshd,
    proxy: FaultProxy,
    manager: ConnectionManager,
    _dir: tempfile::TempDir,
    /// The database's CA: PostgreSQL accepts only TLS (`hostssl`), verified by the tunnel
    /// against the name `db.internal`.
    _ca: TestCa,
}

impl Lab {
    /// Our connections' server processes, counted over a direct (untunnelled) connection.
    async fn backends(&self) -> i64 {
        use sea_orm::sqlx::{Connection, Row};
        let mut conn = sea_orm::sqlx::PgConnection::connect(&format!("{}?sslmode=require", self.pg.url()))
            .await
            .expect("direct connection");
        let row = sea_orm::sqlx::query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'chaos-%' AND backend_type = 'client backend'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let n: i64 = row.get(0);
        conn.close().await.unwrap();
        n
    }

    /// Waits until the system is idle and shrunk back (nothing checked out, the pool at its
    /// minimum, one channel per pooled connection, every background step done), then measures.
    async fn quiesce(&self) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            let stats = self.manager.stats();
            let tunnel = self.manager.tunnel().unwrap().stats();
            let ready = stats.active == 0
                && stats.size == MIN_CONNECTIONS
                && tunnel.channels_active == stats.size as usize
                && tunnel.sessions == 1;
            if ready {
                // Two equal readings a moment apart: nothing is still winding down.
                let snap = self.snapshot().await;
                tokio::time::sleep(Duration::from_millis(700)).await;
                let again = self.snapshot().await;
                if snap == again {
                    return snap;
                }
                last = Some(again);
            } else {
                last = Some(self.snapshot().await);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("the system did not settle back to idle within 30 s: {last:?}");
    }

    async fn snapshot(&self) -> Snapshot {
        let backends = self.backends().await;
        let stats = self.manager.stats();
        let tunnel = self.manager.tunnel().unwrap().stats();
        Snapshot {
            pool_size: stats.size,
            pool_active: stats.active,
            channels: tunnel.channels_active,
            sessions: tunnel.sessions,
            sshd_session_processes: self.sshd.session_pids().len(),
            backends,
            tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        }
    }

    /// Injects `fault` and returns once it has been healed (the moment recovery is timed from).
    async fn inject(&self, fault: Fault) {
        match fault {
            Fault::DropSessions => {
                let sshd = &self.sshd;
                tokio::task::block_in_place(|| sshd.drop_sessions());
            }
            Fault::SshdRestart => {
                self.sshd.stop().await.expect("sshd stops");
                tokio::time::sleep(Duration::from_millis(800)).await;
                self.sshd.start_again().await.expect("sshd starts again");
            }
            Fault::Blackhole => {
                self.proxy.blackhole();
                // Long enough for keepalive (300 ms × 2) to declare the link dead.
                tokio::time::sleep(Duration::from_millis(2000)).await;
                self.proxy.restore();
            }
            Fault::PostgresRestart => self.pg.restart().await.expect("PostgreSQL restarts"),
            Fault::PoolBurst => {
                let mut burst = tokio::task::JoinSet::new();
                for _ in 0..MAX_CONNECTIONS * 3 {
                    let db = self.manager.connection().clone();
                    burst.spawn(async move {
                        tokio::time::timeout(LIVENESS, db.execute_unprepared("SELECT pg_sleep(0.5)"))
                            .await
                            .expect("a burst query never hangs")
                    });
                }
                while let Some(r) = burst.join_next().await {
                    // Some time out waiting for the pool; that is the point of a burst.
                    let _ = r.expect("burst task does not panic");
                }
            }
            Fault::ProxyCut => self.proxy.cut(),
            Fault::BastionFailover => {
                let tunnel = self.manager.tunnel().unwrap();
                let fallback = self.fallback.addr().to_string();
                self.fallback.start_again().await.expect("the fallback bastion starts");
                self.sshd.stop().await.expect("the preferred bastion stops");
                assert!(
                    holds_within(RECOVERY_BOUND, || tunnel.bastion().as_deref()
                        == Some(fallback.as_str()))
                    .await,
                    "the tunnel failed over to {fallback}: {:?}",
                    tunnel.bastion()
                );
                // Traffic continues through the fallback.
                tokio::time::timeout(
                    RECOVERY_BOUND,
                    self.manager
                        .retry(|db| async move { db.execute_unprepared("SELECT 1").await.map(drop) }),
                )
                .await
                .expect("a query through the fallback finishes")
                .expect("a query through the fallback works");
                self.sshd
                    .start_again()
                    .await
                    .expect("the preferred bastion starts again");
                // The preferred bastion's failure must be older than reconnect.max_delay (1 s)
                // for it to be first again; then the fallback goes away.
                tokio::time::sleep(Duration::from_millis(1200)).await;
                self.fallback.stop().await.expect("the fallback bastion stops");
                let preferred = format!("127.0.0.1:{}", self.proxy.addr().port());
                assert!(
                    holds_within(RECOVERY_BOUND, || tunnel.bastion().as_deref()
                        == Some(preferred.as_str()))
                    .await,
                    "the tunnel returned to {preferred}: {:?}",
                    tunnel.bastion()
                );
            }
        }
    }

    /// Time until the manager reports healthy and a query succeeds, after a fault was healed.
    async fn recovery(&self) -> Duration {
        let started = Instant::now();
        loop {
            if self.manager.status().healthy
                && tokio::time::timeout(
                    Duration::from_secs(2),
                    self.manager.connection().execute_unprepared("SELECT 1"),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < RECOVERY_BOUND,
                "not healthy within {RECOVERY_BOUND:?} after a fault: {:?}",
                self.manager.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn setup(passphrase: &str, scanner: &SecretScanner) -> Lab {
    let ca = TestCa::new("chaos CA").await.expect("test CA");
    let server = ca.server_cert("db.internal").await.expect("server certificate");
    let (pg, sshd) = tokio::join!(TempPostgres::start_tls(&server), OpenSshd::start());
    let (pg, sshd) = (pg.expect("PostgreSQL with TLS starts"), sshd.expect("sshd starts"));
    let fallback = OpenSshd::builder()
        .address("127.0.0.2".parse().unwrap())
        .start()
        .await
        .expect("the fallback sshd starts");
    scanner.add_secret(pg.password());
    let proxy = FaultProxy::start(sshd.addr()).await.expect("fault proxy starts");
    let key = sshd
        .generate_key(KeyKind::Ed25519, Some(passphrase))
        .await
        .expect("encrypted client key");
    sshd.authorize_key(&key).unwrap();
    fallback.authorize_key(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    // The tunnel reaches sshd through the proxy, so sshd's key is recorded for the proxy's port.
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{} {}\n{}\n",
            proxy.addr().port(),
            sshd.host_public_key(),
            fallback.known_hosts_line()
        ),
    )
    .unwrap();
    // Down until the failover fault: a stopped fallback refuses at once, so it costs the other
    // faults' reconnects one refused TCP connect.
    fallback.stop().await.unwrap();

    let tunnel = TunnelConfig::new("127.0.0.1", sshd.user())
        .port(proxy.addr().port())
        .auth(AuthConfig::key_file(&key).passphrase(passphrase).use_agent(false))
        .known_hosts(&known_hosts)
        .host_key_policy(HostKeyPolicy::Strict)
        .remote("127.0.0.1", pg.port())
        .fallback_host(fallback.host(), fallback.port())
        .max_channels(10)
        .max_sessions(2)
        .keepalive_interval(Duration::from_millis(300))
        .keepalive_max(2)
        .connect_timeout(Duration::from_secs(2))
        .reconnect(
            BackoffPolicy::new(Duration::from_millis(100))
                .max_delay(Duration::from_secs(1))
                .max_retries(0),
        );
    // The database by its own name, verify-full: the tunnel holds TLS (the bastion dials
    // 127.0.0.1; nothing resolves db.internal).
    let url = format!(
        "postgres://{}:{}@db.internal:{}/{}?sslmode=verify-full&sslrootcert={}",
        pg.user(),
        pg.password(),
        pg.port(),
        pg.database(),
        ca.cert_path().display()
    );
    let config = Config::new(url)
        .tunnel(tunnel)
        .map_pool(|p| {
            p.max_connections(MAX_CONNECTIONS)
                .min_connections(MIN_CONNECTIONS)
                .connect_timeout(Duration::from_secs(2))
                .idle_timeout(Duration::from_secs(2))
                .application_name("chaos")
        })
        .health(
            HealthConfig::default()
                .interval(Duration::from_secs(1))
                .timeout(Duration::from_secs(2))
                .recheck(BackoffPolicy::new(Duration::from_millis(200)).max_delay(Duration::from_secs(1))),
        )
        .recovery(
            BackoffPolicy::new(Duration::from_millis(100))
                .max_delay(Duration::from_secs(1))
                .max_retries(10)
                .max_elapsed(Duration::from_secs(10)),
        )
        .map_session(|s| {
            s.statement_timeout(Duration::from_secs(10))
                .idle_in_transaction_session_timeout(Duration::from_secs(5))
        })
        .shutdown_drain_timeout(DRAIN_DEADLINE);
    let manager = ConnectionManager::new(config).await.expect("manager starts");
    manager
        .connection()
        .execute_unprepared(
            "CREATE TABLE chaos_rows (seq bigserial PRIMARY KEY, id bigint NOT NULL, via text NOT NULL, \
             at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
    Lab {
        pg,
        sshd,
        fallback,
        proxy,
        manager,
        _dir: dir,
        _ca: ca,
    }
}

/// Whether a manager-side error is a clear one: a known kind, a message, no control characters.
fn clear_error(e: &Error) -> bool {
    let text = e.to_string();
    let known_kind = matches!(
        e,
        Error::Timeout { .. }
            | Error::TunnelLost { .. }
            | Error::TunnelFailed(_)
            | Error::SshConnect { .. }
            | Error::Database(_)
            | Error::ChannelRefused { .. }
            | Error::Io { .. }
            | Error::AllBastionsFailed { .. }
    );
    known_kind && text.len() > 10 && !has_raw_control(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_chaos() {
    // A global subscriber and `log` logger, and a count of this process's file descriptors.
    if run_alone(module_path!(), "every_acknowledged_write_survives_chaos") {
        return;
    }
    let passphrase = format!("ChaosKeyPass{}", fastrand::u64(..));
    let seconds = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);

    // Every record of the whole run, setup included, is checked for the secrets. This process holds
    // this one test: a global subscriber and `log` logger see every thread.
    let scanner = SecretScanner::new(vec![passphrase.clone()], Vec::new());
    tracing::subscriber::set_global_default(scanner.subscriber()).expect("no other global subscriber");
    scanner.capture_log_records();
    let lab = setup(&passphrase, &scanner).await;
    let lab = Arc::new(lab);

    // The axum server with the layers.
    let app = Router::new().route("/rows", post(insert_handler)).layer(
        tower::ServiceBuilder::new()
            .layer(InjectDatabaseLayer::new(lab.manager.clone()))
            .layer(RecoveryLayer::new(lab.manager.clone()).max_wait(Duration::from_secs(2))),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let server_stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = server_stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .expect("axum serves")
        }
    });

    // Warm up both paths, then let everything shrink back to idle: the baseline.
    write_row(lab.manager.connection(), -1, "warmup").await.unwrap();
    let (status, response) = post_row(http_addr, -2).await.unwrap();
    assert_eq!(status, 201, "{response}");
    let baseline = lab.quiesce().await;
    let fds_baseline = open_fds();

    // Writers.
    let next_id = Arc::new(AtomicI64::new(1));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stop = CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (lab, next_id, outcomes, stop) = (lab.clone(), next_id.clone(), outcomes.clone(), stop.clone());
        writers.spawn(async move {
            while !stop.is_cancelled() {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                // Three writers retry through the manager; one writes once, without retry.
                let (via, result) = if w < 3 {
                    let r = lab
                        .manager
                        .retry(|db| async move { write_row(&db, id, "manager").await })
                        .await;
                    ("manager", r)
                } else {
                    (
                        "plain",
                        write_row(lab.manager.connection(), id, "plain")
                            .await
                            .map_err(Error::from),
                    )
                };
                let outcome = match result {
                    Ok(()) => Outcome {
                        id,
                        via,
                        acknowledged: true,
                        error: None,
                    },
                    Err(e) => {
                        assert!(clear_error(&e), "unclear error for write {id}: {e:?}");
                        Outcome {
                            id,
                            via,
                            acknowledged: false,
                            error: Some(format!("{e} | {e:?}")),
                        }
                    }
                };
                outcomes.lock().unwrap().push(outcome);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        });
    }
    for _ in 0..2 {
        let (next_id, outcomes, stop) = (next_id.clone(), outcomes.clone(), stop.clone());
        writers.spawn(async move {
            while !stop.is_cancelled() {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let mut last = None;
                let mut acknowledged = false;
                // The handler's write is safe to repeat, so the client retries a 503.
                for _ in 0..5 {
                    let r = tokio::time::timeout(LIVENESS, post_row(http_addr, id))
                        .await
                        .expect("an HTTP write never hangs");
                    match r {
                        Ok((201, _)) => {
                            acknowledged = true;
                            break;
                        }
                        Ok((status, response)) => {
                            // Clear: 503 says when to come back (shed by the recovery layer, or a
                            // transient database error); anything else says what happened.
                            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
                            let head = head.to_ascii_lowercase();
                            let clear = match status {
                                503 => head.contains("\r\nretry-after: "),
                                500..600 => !body.trim().is_empty(),
                                _ => false,
                            };
                            assert!(clear, "unclear HTTP failure for write {id}: {response:?}");
                            last = Some(format!("HTTP {status}: {}", body.trim()));
                            if status != 503 {
                                break;
                            }
                        }
                        Err(e) => panic!("the axum server itself failed for write {id}: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                outcomes.lock().unwrap().push(Outcome {
                    id,
                    via: "http",
                    acknowledged,
                    error: if acknowledged { None } else { last },
                });
            }
        });
    }

    // The fault schedule.
    let chaos_started = Instant::now();
    let mut faults = 0u32;
    let mut max_recovery = Duration::ZERO;
    let mut recoveries: Vec<(Fault, Duration)> = Vec::new();
    while chaos_started.elapsed() < Duration::from_secs(seconds) {
        let fault = SCHEDULE[faults as usize % SCHEDULE.len()];
        lab.inject(fault).await;
        faults += 1;
        let took = lab.recovery().await;
        max_recovery = max_recovery.max(took);
        recoveries.push((fault, took));
        // Calm: writes succeed between faults.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // Run on a healthy system a moment longer, then stop the writers.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.cancel();
    while let Some(r) = writers.join_next().await {
        r.expect("a writer panicked");
    }

    // Every acknowledged write exactly once; nothing that was never attempted.
    let rows = lab
        .manager
        .retry(|db| async move {
            db.query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT id, count(*)::int8 AS n FROM chaos_rows WHERE id > 0 GROUP BY id",
            ))
            .await
        })
        .await
        .expect("read the table back");
    let mut counts: HashMap<i64, i64> = HashMap::new();
    for row in rows {
        counts.insert(row.try_get("", "id").unwrap(), row.try_get("", "n").unwrap());
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let attempted = outcomes.len();
    let acknowledged: Vec<&Outcome> = outcomes.iter().filter(|o| o.acknowledged).collect();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.acknowledged).collect();
    let lost: Vec<i64> = acknowledged
        .iter()
        .filter(|o| !counts.contains_key(&o.id))
        .map(|o| o.id)
        .collect();
    let duplicated: Vec<i64> = counts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    let attempted_ids: std::collections::HashSet<i64> = outcomes.iter().map(|o| o.id).collect();
    let phantom: Vec<i64> = counts
        .keys()
        .filter(|id| !attempted_ids.contains(id))
        .copied()
        .collect();
    let failed_but_committed = failed.iter().filter(|o| counts.contains_key(&o.id)).count();
    for o in &failed {
        let e = o.error.as_deref().unwrap_or("");
        assert!(
            !e.trim().is_empty(),
            "write {} ({}) failed without an error",
            o.id,
            o.via
        );
        scanner.scan(e);
    }

    // Healthy after the last fault, then back to baseline.
    assert!(
        holds_within(RECOVERY_BOUND, || lab.manager.status().healthy).await,
        "{:?}",
        lab.manager.status()
    );
    let final_snapshot = lab.quiesce().await;
    let fds_final = open_fds();

    // Graceful shutdown within its deadline.
    server_stop.cancel();
    server.await.expect("axum server task");
    let report = tokio::time::timeout(
        DRAIN_DEADLINE + SHUTDOWN_SLACK + LIVENESS,
        lab.manager.shutdown_default(),
    )
    .await
    .expect("shutdown finishes");

    println!(
        "chaos: faults={faults} attempted={attempted} acknowledged={} failed={} lost={} duplicated={} \
         max_recovery_ms={} fds_baseline={fds_baseline} fds_final={fds_final}",
        acknowledged.len(),
        failed.len(),
        lost.len(),
        duplicated.len(),
        max_recovery.as_millis(),
    );
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for o in &failed {
        let e = o.error.as_deref().unwrap_or("");
        let kind: String = e.split(['|', ':']).next().unwrap_or("").chars().take(60).collect();
        *kinds.entry(format!("{}: {kind}", o.via)).or_default() += 1;
    }
    eprintln!(
        "chaos details: recoveries {recoveries:?}; failed but committed {failed_but_committed}; \
         failures {kinds:?}; baseline {baseline:?}; final {final_snapshot:?}; shutdown {report:?}; \
         log records scanned {} ({} bytes)",
        scanner.records(),
        scanner.bytes()
    );

    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(duplicated.is_empty(), "writes duplicated: {duplicated:?}");
    assert!(phantom.is_empty(), "rows nobody wrote: {phantom:?}");
    assert!(faults >= SCHEDULE.len() as u32, "every kind of fault ran ({faults})");
    assert!(acknowledged.len() > 100, "writes went through between faults");
    assert!(!failed.is_empty(), "the faults were felt by some writer");
    assert!(max_recovery < RECOVERY_BOUND);
    assert_eq!(
        final_snapshot, baseline,
        "pool, channels, sessions, backends and tasks back at baseline"
    );
    assert_eq!(fds_final, fds_baseline, "open file descriptors back at baseline");
    assert_eq!(report.forced, 0, "{report:?}");
    assert!(report.duration <= DRAIN_DEADLINE + SHUTDOWN_SLACK, "{report:?}");
    assert!(!lab.manager.tunnel().unwrap().is_connected());
    let offenders = scanner.offenders();
    assert!(
        offenders.is_empty(),
        "secrets in log records or errors:\n{}",
        offenders.join("\n")
    );
    assert!(
        scanner.records() > 1000,
        "the scan saw the run ({} records)",
        scanner.records()
    );
}
