//! Chaos where the database itself moves: writers insert rows with unique ids through
//! `manager.retry` while a schedule fails the database over between two real PostgreSQL servers
//! (the primary is made read-only and a switch that stands for the database's DNS name moves to
//! the other one, and back on the next failover), and
//! - through a real PgBouncer in transaction mode in front of each server (`pgbouncer=true`):
//!   restarts PgBouncer (every client and server connection killed), pauses it (`PAUSE`, then
//!   `RESUME`) and drops the SSH sessions;
//! - straight to the servers as a role whose password comes from a password file: rotates the
//!   password (`ALTER ROLE` on both servers first, the file a moment later) and restarts the
//!   primary.
//!
//! At the end every acknowledged write is stored exactly once across both servers, no row exists
//! that nobody wrote, no write failed (every one of these faults is transient to `manager.retry`),
//! writes landed on both servers, and after each fault the system recovered within the bound.
//!
//! Each runs `CHAOS_SECONDS` of faults (default 16, and at least one of each kind) and prints one
//! line: `chaos(NAME): faults=N attempted=N acknowledged=N failed=N lost=N duplicated=N on_a=N on_b=N max_recovery_ms=N`

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::testkit::{FaultProxy, OpenSshd, PgBouncer, PoolMode, TempPostgres, fast_config};
use tokio_util::sync::CancellationToken;

/// Seconds of fault injection by default; `CHAOS_SECONDS` overrides.
const DEFAULT_SECONDS: u64 = 16;
/// After a fault is healed, the system must be healthy (and, after a failover, writing on the new
/// primary; after a rotation, logging in with the new password) within this bound.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// PgBouncer's server connections per server: fewer than the manager's pool.
const BOUNCER_POOL: u32 = 3;
const MAX_CONNECTIONS: u32 = 6;
const WRITERS: usize = 4;
/// The login role of the rotation test.
const ROLE: &str = "chaos_app";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fault {
    /// PgBouncer in front of the primary is killed and started again.
    BouncerRestart,
    /// `PAUSE` on the primary's PgBouncer for 1.5 s, then `RESUME`.
    BouncerPause,
    /// The primary is made read-only, the other server writable, and the name moves there.
    Failover,
    /// sshd kills every session: all tunnelled connections die at once.
    DropSessions,
    /// The role's password changes on both servers, then in the password file.
    PasswordRotation,
    /// The primary PostgreSQL fast-restarts.
    PostgresRestart,
}

const POOLER_SCHEDULE: &[Fault] = &[
    Fault::BouncerRestart,
    Fault::Failover,
    Fault::BouncerPause,
    Fault::DropSessions,
];

const ROTATION_SCHEDULE: &[Fault] = &[Fault::PasswordRotation, Fault::Failover, Fault::PostgresRestart];

/// One PostgreSQL server, a superuser connection to it that does not go through the code under
/// test, and (in the pooler test) the PgBouncer in front of it.
struct Side {
    pg: TempPostgres,
    admin: DatabaseConnection,
    bouncer: Option<PgBouncer>,
}

impl Side {
    /// Where the database's name points when this side is the primary.
    fn addr(&self) -> SocketAddr {
        let port = self.bouncer.as_ref().map_or(self.pg.port(), PgBouncer::port);
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn bouncer(&self) -> &PgBouncer {
        self.bouncer
            .as_ref()
            .expect("the pooler test has a PgBouncer per server")
    }

    async fn rows(&self) -> i64 {
        scalar(&self.admin, "SELECT count(*) FROM chaos_rows").await
    }
}

/// The password file and every password it has held.
struct Rotation {
    file: PathBuf,
    passwords: Mutex<Vec<String>>,
}

impl Rotation {
    fn next_password(&self) -> String {
        let mut passwords = self.passwords.lock().unwrap();
        let password = format!("chaos-pw-{}-{:016x}", passwords.len(), fastrand::u64(..));
        passwords.push(password.clone());
        password
    }
}

struct Lab {
    name: &'static str,
    sides: [Side; 2],
    /// Which side the switch points at.
    primary: AtomicUsize,
    switch: FaultProxy,
    sshd: OpenSshd,
    manager: ConnectionManager,
    rotation: Option<Rotation>,
    _dir: tempfile::TempDir,
}

/// Writes the file as secret agents do: a new file renamed over the old one.
fn rotate_file(path: &Path, password: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, format!("{password}\n")).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// Makes the server read-only (a demoted primary) or writable again, and waits until a fresh
/// transaction sees it: the postmaster passes the reload on to the backends asynchronously.
async fn set_read_only(admin: &DatabaseConnection, read_only: bool) {
    let sql = if read_only {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    admin.execute_unprepared(sql).await.unwrap();
    let _: bool = scalar(admin, "SELECT pg_reload_conf()").await;
    let want = if read_only { "on" } else { "off" };
    eventually("the read-only setting in force", || async {
        scalar::<String>(admin, "SHOW default_transaction_read_only").await == want
    })
    .await;
}

/// Inserts row `id` unless it is already there (the chaos suite's idempotent write).
async fn write_row(db: &DatabaseConnection, id: i64) -> Result<(), DbErr> {
    super::chaos::write_row(db, id, "retry").await
}

impl Lab {
    async fn start(name: &'static str, pooler: bool) -> Lab {
        let (a, b, sshd) = tokio::join!(TempPostgres::start(), TempPostgres::start(), OpenSshd::start());
        let (a, b, sshd) = (
            a.expect("PostgreSQL A starts"),
            b.expect("PostgreSQL B starts"),
            sshd.expect("sshd starts"),
        );
        assert_eq!(a.password(), b.password(), "the test kit's servers share credentials");
        let dir = tempfile::tempdir().unwrap();
        let rotation = (!pooler).then(|| Rotation {
            file: dir.path().join("db-password"),
            passwords: Mutex::new(Vec::new()),
        });
        let first_password = rotation.as_ref().map(Rotation::next_password);
        let mut sides = Vec::new();
        for pg in [a, b] {
            let admin = checker(&format!("{}?application_name=checker", pg.url())).await;
            admin
                .execute_unprepared(
                    "CREATE TABLE chaos_rows (seq bigserial PRIMARY KEY, id bigint NOT NULL, via text NOT NULL)",
                )
                .await
                .unwrap();
            if let Some(password) = &first_password {
                admin
                    .execute_unprepared(&format!(
                        "CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'; \
                         GRANT SELECT, INSERT ON chaos_rows TO {ROLE}; \
                         GRANT USAGE ON SEQUENCE chaos_rows_seq_seq TO {ROLE}"
                    ))
                    .await
                    .unwrap();
            }
            let bouncer = if pooler {
                Some(
                    PgBouncer::builder()
                        .mode(PoolMode::Transaction)
                        .default_pool_size(BOUNCER_POOL)
                        .start(&pg)
                        .await
                        .expect("PgBouncer starts"),
                )
            } else {
                None
            };
            sides.push(Side { pg, admin, bouncer });
        }
        let [a, b]: [Side; 2] = sides.try_into().ok().unwrap();
        let switch = FaultProxy::start(a.addr()).await.expect("the switch starts");

        let url = match &a.bouncer {
            Some(bouncer) => format!("{}?pgbouncer=true", bouncer.url()),
            None => format!("postgres://{ROLE}@127.0.0.1:{}/{}", a.pg.port(), a.pg.database()),
        };
        let tunnel = sshd
            .tunnel_config("127.0.0.1", switch.addr().port())
            .keepalive_interval(Duration::from_millis(500))
            .keepalive_max(2)
            .connect_timeout(Duration::from_secs(3))
            .map_reconnect(|r| {
                r.initial_delay(Duration::from_millis(100))
                    .max_delay(Duration::from_millis(500))
                    .max_retries(0)
            });
        let mut config = fast_config(url, name)
            .map_pool(|p| {
                let p = p.max_connections(MAX_CONNECTIONS);
                // Short lifetimes in the rotation test: new logins run under load all the time.
                if pooler {
                    p
                } else {
                    p.max_lifetime(Duration::from_millis(800))
                }
            })
            .recovery(
                BackoffPolicy::new(Duration::from_millis(50))
                    .max_delay(Duration::from_millis(500))
                    .max_retries(80)
                    .max_elapsed(Duration::from_secs(20)),
            )
            .tunnel(tunnel);
        if let (Some(rotation), Some(password)) = (&rotation, &first_password) {
            rotate_file(&rotation.file, password);
            config = config.password_file(&rotation.file);
        }
        let manager = ConnectionManager::new(config).await.expect("manager starts");
        Lab {
            name,
            sides: [a, b],
            primary: AtomicUsize::new(0),
            switch,
            sshd,
            manager,
            rotation,
            _dir: dir,
        }
    }

    fn primary(&self) -> &Side {
        &self.sides[self.primary.load(Ordering::SeqCst)]
    }

    /// Injects `fault`, heals it, and returns how long the system took to recover afterwards.
    async fn inject(&self, fault: Fault) -> Duration {
        match fault {
            Fault::BouncerRestart => {
                self.primary().bouncer().restart().await.expect("PgBouncer restarts");
                self.recovery().await
            }
            Fault::BouncerPause => {
                let bouncer = self.primary().bouncer();
                bouncer.pause().await.expect("PAUSE");
                tokio::time::sleep(Duration::from_millis(1500)).await;
                bouncer.resume().await.expect("RESUME");
                self.recovery().await
            }
            Fault::DropSessions => {
                let sshd = &self.sshd;
                let killed = tokio::task::block_in_place(|| sshd.drop_sessions());
                assert!(killed > 0, "there were SSH sessions to drop");
                self.recovery().await
            }
            Fault::PostgresRestart => {
                self.primary().pg.restart().await.expect("PostgreSQL restarts");
                self.recovery().await
            }
            Fault::Failover => {
                let from = self.primary.load(Ordering::SeqCst);
                let to = 1 - from;
                // Before the demotion: its read-only errors retire the pool at once.
                let stale_before = self.manager.stats().rejected_stale;
                // The other server was demoted by an earlier failover: it is the primary again.
                set_read_only(&self.sides[to].admin, false).await;
                set_read_only(&self.sides[from].admin, true).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let before = self.sides[to].rows().await;
                self.switch.retarget(self.sides[to].addr());
                self.primary.store(to, Ordering::SeqCst);
                let switched = Instant::now();
                // Recovered when acknowledged writes land on the new primary.
                loop {
                    if self.sides[to].rows().await > before {
                        break;
                    }
                    assert!(
                        switched.elapsed() < RECOVERY_BOUND,
                        "{}: no write reached the new primary within {RECOVERY_BOUND:?} of the failover",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let took = switched.elapsed().max(self.recovery().await);
                // The old primary's pooled connections are retired (counted when the pool next
                // offers one). The rotation test's short lifetimes may replace them before that,
                // so only the pooler test counts rejections.
                if self.rotation.is_none() {
                    let manager = &self.manager;
                    assert!(
                        holds_within(RECOVERY_BOUND, || manager.stats().rejected_stale > stale_before).await,
                        "{}: the failover retired the connections on the old primary: {:?}",
                        self.name,
                        self.manager.stats()
                    );
                }
                took
            }
            Fault::PasswordRotation => {
                let rotation = self.rotation.as_ref().expect("the rotation test has a password file");
                let password = rotation.next_password();
                // The worst order: the servers first, the file a moment later. (The demoted
                // server gets it too, as a replica would; explicitly read-write there.)
                for side in &self.sides {
                    side.admin
                        .execute_unprepared(&format!(
                            "BEGIN READ WRITE; ALTER ROLE {ROLE} PASSWORD '{password}'; COMMIT"
                        ))
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let opened = self.manager.stats().connections_opened;
                rotate_file(&rotation.file, &password);
                let rotated = Instant::now();
                // Recovered when two logins with the new password have been made and queries work.
                loop {
                    if self.manager.stats().connections_opened >= opened + 2 {
                        break;
                    }
                    assert!(
                        rotated.elapsed() < RECOVERY_BOUND,
                        "{}: no new login within {RECOVERY_BOUND:?} of the rotation",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                rotated.elapsed().max(self.recovery().await)
            }
        }
    }

    /// Time until the manager reports healthy and a query succeeds.
    async fn recovery(&self) -> Duration {
        let started = Instant::now();
        loop {
            if self.manager.status().healthy
                && tokio::time::timeout(Duration::from_secs(2), select_one(self.manager.connection()))
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < RECOVERY_BOUND,
                "{}: not healthy within {RECOVERY_BOUND:?} after a fault: {:?}",
                self.name,
                self.manager.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many rows each id has on each server: `id -> [on A, on B]`.
    async fn stored(&self) -> HashMap<i64, [i64; 2]> {
        let mut counts: HashMap<i64, [i64; 2]> = HashMap::new();
        for (i, side) in self.sides.iter().enumerate() {
            let rows = side
                .admin
                .query_all_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT id, count(*)::int8 AS n FROM chaos_rows GROUP BY id",
                ))
                .await
                .expect("read the table back");
            for row in rows {
                let id: i64 = row.try_get("", "id").unwrap();
                counts.entry(id).or_default()[i] = row.try_get("", "n").unwrap();
            }
        }
        counts
    }
}

/// One write as its caller saw it.
#[derive(Debug)]
struct Outcome {
    id: i64,
    error: Option<String>,
}

async fn run_chaos(name: &'static str, pooler: bool, schedule: &[Fault]) {
    let seconds = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    let test_started = Instant::now();
    let lab = Arc::new(Lab::start(name, pooler).await);
    write_row(lab.manager.connection(), -1).await.expect("a first write");

    let next_id = Arc::new(AtomicI64::new(1));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stop = CancellationToken::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (lab, next_id, outcomes, stop) = (lab.clone(), next_id.clone(), outcomes.clone(), stop.clone());
        writers.spawn(async move {
            while !stop.is_cancelled() {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let result = tokio::time::timeout(
                    LIVENESS,
                    lab.manager.retry(|db| async move { write_row(&db, id).await }),
                )
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "write {id} hung for {LIVENESS:?} (started {:?} into the test)",
                        test_started.elapsed() - LIVENESS
                    )
                });
                let error = result.err().map(|e| format!("{e} | {e:?}"));
                outcomes.lock().unwrap().push(Outcome { id, error });
                // A steady load, not a flood: the suite shares two cores.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let chaos_started = Instant::now();
    let mut recoveries: Vec<(Fault, Duration)> = Vec::new();
    while recoveries.len() < schedule.len() || chaos_started.elapsed() < Duration::from_secs(seconds) {
        let fault = schedule[recoveries.len() % schedule.len()];
        eprintln!("chaos({name}): {fault:?} at {:?}", test_started.elapsed());
        let took = lab.inject(fault).await;
        recoveries.push((fault, took));
        // Calm: writes succeed between faults.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    while let Some(r) = writers.join_next().await {
        r.expect("a writer panicked");
    }

    let counts = lab.stored().await;
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let attempted = outcomes.len();
    let acknowledged: Vec<i64> = outcomes.iter().filter(|o| o.error.is_none()).map(|o| o.id).collect();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let total = |id: &i64| counts.get(id).map_or(0, |[a, b]| a + b);
    let lost: Vec<i64> = acknowledged.iter().filter(|id| total(id) == 0).copied().collect();
    let duplicated: Vec<(i64, [i64; 2])> = counts
        .iter()
        .filter(|(_, [a, b])| a + b > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    let attempted_ids: HashSet<i64> = outcomes.iter().map(|o| o.id).chain([-1]).collect();
    let phantom: Vec<i64> = counts
        .keys()
        .filter(|id| !attempted_ids.contains(id))
        .copied()
        .collect();
    let on_a: i64 = counts.values().map(|[a, _]| a).sum();
    let on_b: i64 = counts.values().map(|[_, b]| b).sum();
    let max_recovery = recoveries.iter().map(|(_, d)| *d).max().unwrap_or_default();

    // The rotation test's connections live only on the current primary: the old one's are gone.
    if !pooler {
        let old = &lab.sides[1 - lab.primary.load(Ordering::SeqCst)];
        let prefix = format!("{name}-%");
        eventually("no connection of ours left on the old primary", || async {
            scalar::<i64>(
                &old.admin,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{prefix}'"),
            )
            .await
                == 0
        })
        .await;
        let user: String = scalar(lab.manager.connection(), "SELECT current_user::text").await;
        assert_eq!(user, ROLE);
    }
    let stats = lab.manager.stats();
    let report = lab.manager.shutdown(Duration::from_secs(3)).await;

    println!(
        "chaos({name}): faults={} attempted={attempted} acknowledged={} failed={} lost={} duplicated={} \
         on_a={on_a} on_b={on_b} max_recovery_ms={}",
        recoveries.len(),
        acknowledged.len(),
        failed.len(),
        lost.len(),
        duplicated.len(),
        max_recovery.as_millis(),
    );
    eprintln!(
        "chaos({name}) details: recoveries {:?}; failures {:?}; stats {stats:?}; shutdown {report:?}; \
         runtime {:?}",
        recoveries
            .iter()
            .map(|(f, d)| format!("{f:?} {}ms", d.as_millis()))
            .collect::<Vec<_>>(),
        failed.iter().take(5).collect::<Vec<_>>(),
        test_started.elapsed()
    );

    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        duplicated.is_empty(),
        "writes stored more than once ([on A, on B]): {duplicated:?}"
    );
    assert!(phantom.is_empty(), "rows nobody wrote: {phantom:?}");
    assert!(
        failed.is_empty(),
        "writes failed through manager.retry: {:?}",
        failed.iter().take(10).collect::<Vec<_>>()
    );
    assert_eq!(acknowledged.len(), attempted);
    assert!(acknowledged.len() > 200, "writes went through between faults");
    for kind in schedule {
        assert!(
            recoveries.iter().any(|(f, _)| f == kind),
            "{kind:?} ran: {recoveries:?}"
        );
    }
    assert!(
        on_a > 0 && on_b > 0,
        "writes landed on both servers: {on_a} on A, {on_b} on B"
    );
    assert!(max_recovery < RECOVERY_BOUND);
    if let Some(rotation) = &lab.rotation {
        let passwords = rotation.passwords.lock().unwrap();
        assert!(passwords.len() >= 2, "the password rotated");
        for o in &failed {
            for p in passwords.iter() {
                assert!(
                    !o.error.as_deref().unwrap_or("").contains(p.as_str()),
                    "a password in an error"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_through_pgbouncer_restarts_pauses_and_failovers_loses_no_acknowledged_write() {
    run_chaos("chaospgb", true, POOLER_SCHEDULE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_password_rotations_failovers_and_restarts_loses_no_acknowledged_write() {
    run_chaos("chaosrot", false, ROTATION_SCHEDULE).await;
}
