//! Side-by-side comparison on the same PostgreSQL and the same OpenSSH `sshd`:
//!
//! - `direct`: SeaORM straight to PostgreSQL (the physical limit);
//! - `openssh`: SeaORM defaults through an OpenSSH `ssh -N -L` process (what users run today);
//! - `tunnel`: this crate, through the `ConnectionManager`;
//! - `tunnel_seaorm_defaults`: this crate's `SshTunnel` with a plain SeaORM pool (default
//!   settings), so the manager's own pool choices show.
//!
//! A TLS section (skip it with `COMPARE_TLS=0`) runs `SELECT 1` and the bulk query on a second,
//! `hostssl`-only PostgreSQL whose certificate names `db.internal` and `127.0.0.1`:
//!
//! - `direct_tls`: SeaORM straight to it with `sslmode=verify-full` (dialling and verifying
//!   `127.0.0.1`);
//! - `openssh_tls`: through `ssh -N -L` with sqlx's own TLS, `sslmode=verify-full` against the
//!   forwarded `127.0.0.1` (sqlx has no libpq `hostaddr`; the certificate's IP name stands in for
//!   libpq's `host=db.internal hostaddr=127.0.0.1`: the same handshake and cipher, another name);
//! - `tunnel_tls`: the `ConnectionManager` with `sslmode=verify-full` against `db.internal`
//!   (nothing resolves it; the bastion connects to 127.0.0.1), the tunnel holding the TLS;
//! - `tunnel_plain`: the same through the tunnel to the plaintext server with `sslmode=disable`,
//!   for the cost of TLS itself.
//!
//! The paths alternate within each workload (never one path's whole run after another's), so a
//! busy machine slows all of them alike; compare the ratios. Prints the tables and writes
//! `target/compare.json`.
//!
//! Run with: `cargo bench --bench compare` (`COMPARE_QUICK=1` for a short run, `COMPARE_TLS=0`
//! without the TLS section).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::{Config, HostKeyPolicy};
use sea_orm_tunnel::testkit::{FaultProxy, OpenSshd, TempPostgres, TestCa};
use sea_orm_tunnel::tunnel::{SshTunnel, TunnelEvent};
use serde_json::{Value, json};

const DIRECT: &str = "direct";
const OPENSSH: &str = "openssh";
const TUNNEL: &str = "tunnel";
const TUNNEL_DEFAULTS: &str = "tunnel_seaorm_defaults";
const PATHS: [&str; 4] = [DIRECT, OPENSSH, TUNNEL, TUNNEL_DEFAULTS];

const DIRECT_TLS: &str = "direct_tls";
const OPENSSH_TLS: &str = "openssh_tls";
const TUNNEL_TLS: &str = "tunnel_tls";
const TUNNEL_PLAIN: &str = "tunnel_plain";
const TLS_PATHS: [&str; 4] = [DIRECT_TLS, OPENSSH_TLS, TUNNEL_TLS, TUNNEL_PLAIN];
/// The name on the TLS server's certificate (with `127.0.0.1`); nothing resolves it.
const TLS_DB_NAME: &str = "db.internal";

/// `SELECT repeat('x', 1 MiB)` × 50: a 52.4 MB result.
const BULK_SQL: &str = "SELECT repeat('x', 1048576) AS payload FROM generate_series(1, 50)";
const BULK_BYTES: f64 = 50.0 * 1_048_576.0;

/// Workload sizes; `COMPARE_QUICK=1` shrinks them for a smoke run.
struct Sizes {
    select1: usize,
    chunk: usize,
    pool4_queries: usize,
    bulk_rounds: usize,
    concurrent_tasks: usize,
    concurrent_queries: usize,
    concurrent_rounds: usize,
    cold_rounds: usize,
    recovery_rounds: usize,
    blackhole_rounds: usize,
}

impl Sizes {
    fn from_env() -> (Sizes, bool) {
        let quick = std::env::var("COMPARE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let sizes = if quick {
            Sizes {
                select1: 500,
                chunk: 100,
                pool4_queries: 100,
                bulk_rounds: 2,
                concurrent_tasks: 16,
                concurrent_queries: 100,
                concurrent_rounds: 1,
                cold_rounds: 3,
                recovery_rounds: 1,
                blackhole_rounds: 2,
            }
        } else {
            Sizes {
                select1: 5_000,
                chunk: 250,
                pool4_queries: 400,
                bulk_rounds: 3,
                concurrent_tasks: 16,
                concurrent_queries: 500,
                concurrent_rounds: 3,
                cold_rounds: 7,
                recovery_rounds: 3,
                blackhole_rounds: 2,
            }
        };
        (sizes, quick)
    }
}

/// One path's pools: 16 connections for the main workloads, 4 for the delayed-ACK stall workload.
struct Pools {
    db16: DatabaseConnection,
    db4: DatabaseConnection,
}

/// SeaORM's default pool settings (what `Database::connect(url)` does) with a size.
fn seaorm_defaults(url: &str, max: u32) -> ConnectOptions {
    let mut o = ConnectOptions::new(url.to_owned());
    o.max_connections(max);
    o
}

async fn select1(db: &DatabaseConnection) {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT 1 AS one"))
        .await
        .expect("SELECT 1")
        .expect("a row");
    let one: i32 = row.try_get("", "one").expect("an int");
    assert_eq!(one, 1);
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Per-path results, in the JSON's key names.
#[derive(Default)]
struct Results(BTreeMap<&'static str, BTreeMap<&'static str, f64>>);

impl Results {
    fn set(&mut self, path: &'static str, key: &'static str, value: f64) {
        self.0.entry(path).or_default().insert(key, value);
    }

    fn get(&self, path: &str, key: &str) -> Option<f64> {
        self.0.get(path)?.get(key).copied()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument means "not this bench".
    if std::env::args().skip(1).any(|a| !a.starts_with("--")) {
        return;
    }
    let (sizes, quick) = Sizes::from_env();
    let load_before = loadavg();
    eprintln!("compare: starting PostgreSQL and sshd (load average {load_before})");
    let (pg, sshd) = tokio::join!(TempPostgres::start(), OpenSshd::start());
    let (pg, sshd) = (pg.expect("PostgreSQL"), sshd.expect("sshd"));

    // --- the four paths -------------------------------------------------------------------
    let forward = sshd.ssh_forward("127.0.0.1", pg.port()).await.expect("ssh -N -L");
    let openssh_cipher = forward.cipher().unwrap_or("?").to_owned();
    let url_at = |addr: SocketAddr| format!("postgres://{}:{}@{addr}/{}", pg.user(), pg.password(), pg.database());

    let tunnel_config = || sshd.tunnel_config("127.0.0.1", pg.port());
    let manager_config = || {
        Config::new(pg.url())
            .tunnel(tunnel_config())
            .map_pool(|p| p.max_connections(16))
    };
    let manager = ConnectionManager::new(manager_config()).await.expect("manager");
    let mut manager4_options = manager.connect_options();
    manager4_options.max_connections(4);
    let standalone = SshTunnel::connect(tunnel_config()).await.expect("tunnel");
    let standalone_url = url_at(standalone.local_endpoint().tcp_addr().expect("TCP endpoint"));

    let mut pools: BTreeMap<&'static str, Pools> = BTreeMap::new();
    pools.insert(
        DIRECT,
        Pools {
            db16: Database::connect(seaorm_defaults(&pg.url(), 16)).await.unwrap(),
            db4: Database::connect(seaorm_defaults(&pg.url(), 4)).await.unwrap(),
        },
    );
    let openssh_url = url_at(forward.local_addr());
    pools.insert(
        OPENSSH,
        Pools {
            db16: Database::connect(seaorm_defaults(&openssh_url, 16)).await.unwrap(),
            db4: Database::connect(seaorm_defaults(&openssh_url, 4)).await.unwrap(),
        },
    );
    pools.insert(
        TUNNEL,
        Pools {
            db16: manager.connection().clone(),
            db4: Database::connect(manager4_options).await.unwrap(),
        },
    );
    pools.insert(
        TUNNEL_DEFAULTS,
        Pools {
            db16: Database::connect(seaorm_defaults(&standalone_url, 16)).await.unwrap(),
            db4: Database::connect(seaorm_defaults(&standalone_url, 4)).await.unwrap(),
        },
    );
    let mut results = Results::default();

    // Warm-up: first connections, statement caches, CPU frequency.
    for _ in 0..100 {
        for path in PATHS {
            select1(&pools[path].db16).await;
        }
    }

    // --- sequential SELECT 1 ------------------------------------------------------------------
    eprintln!("compare: sequential SELECT 1 x {}", sizes.select1);
    let main16: Vec<(&'static str, DatabaseConnection)> = PATHS.map(|p| (p, pools[p].db16.clone())).to_vec();
    select1_latencies(&main16, &sizes, &mut results).await;

    // --- sequential queries over a pool of 4 (the delayed-ACK stall) ------------------------------------
    eprintln!("compare: sequential queries over a pool of 4");
    for path in PATHS {
        // Open all four connections, so sequential queries rotate over them (sqlx's idle queue is FIFO).
        hold_connections(&pools[path].db4, 4, "SELECT pg_sleep(0.05)").await;
    }
    let mut pool4: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..4 {
        for i in 0..PATHS.len() {
            let path = PATHS[(i + round) % PATHS.len()];
            let db = &pools[path].db4;
            let n = sizes.pool4_queries / 4;
            let t = Instant::now();
            for _ in 0..n {
                select1(db).await;
            }
            pool4
                .entry(path)
                .or_default()
                .push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
        }
    }
    for path in PATHS {
        results.set(path, "pool4_sequential_ms", median(pool4.remove(path).unwrap()));
    }

    // --- bulk transfer ------------------------------------------------------------------------
    eprintln!("compare: bulk transfer, best of {}", sizes.bulk_rounds);
    bulk_best(&main16, sizes.bulk_rounds, &mut results).await;

    // --- 16-way concurrent throughput ---------------------------------------------------------
    eprintln!(
        "compare: {} tasks x {} queries, best of {}",
        sizes.concurrent_tasks, sizes.concurrent_queries, sizes.concurrent_rounds
    );
    let mut concurrent: BTreeMap<&str, f64> = BTreeMap::new();
    for round in 0..sizes.concurrent_rounds {
        for i in 0..PATHS.len() {
            let path = PATHS[(i + round) % PATHS.len()];
            let db = pools[path].db16.clone();
            let t = Instant::now();
            let tasks: Vec<_> = (0..sizes.concurrent_tasks)
                .map(|_| {
                    let db = db.clone();
                    let n = sizes.concurrent_queries;
                    tokio::spawn(async move {
                        for _ in 0..n {
                            select1(&db).await;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("query task");
            }
            let qps = (sizes.concurrent_tasks * sizes.concurrent_queries) as f64 / t.elapsed().as_secs_f64();
            let best = concurrent.entry(path).or_insert(0.0);
            *best = best.max(qps);
        }
    }
    for (path, qps) in concurrent {
        let path = PATHS.into_iter().find(|p| *p == path).unwrap();
        results.set(path, "concurrent_qps", qps);
    }

    // --- cold connect to first row ------------------------------------------------------------
    eprintln!("compare: cold connect to first row x {}", sizes.cold_rounds);
    let mut cold: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..sizes.cold_rounds {
        for i in 0..PATHS.len() {
            let path = PATHS[(i + round) % PATHS.len()];
            let ms = match path {
                DIRECT => {
                    let t = Instant::now();
                    let db = Database::connect(seaorm_defaults(&pg.url(), 16)).await.unwrap();
                    select1(&db).await;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    db.close().await.unwrap();
                    ms
                }
                OPENSSH => cold_openssh(&sshd, pg.port(), &url_at).await,
                TUNNEL => {
                    let t = Instant::now();
                    let m = ConnectionManager::new(manager_config()).await.expect("manager");
                    select1(m.connection()).await;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    m.shutdown(Duration::from_secs(1)).await;
                    ms
                }
                _ => {
                    let t = Instant::now();
                    let tunnel = SshTunnel::connect(tunnel_config()).await.expect("tunnel");
                    let url = url_at(tunnel.local_endpoint().tcp_addr().unwrap());
                    let db = Database::connect(seaorm_defaults(&url, 16)).await.unwrap();
                    select1(&db).await;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    db.close().await.unwrap();
                    tunnel.disconnect().await;
                    ms
                }
            };
            cold.entry(path).or_default().push(ms);
        }
    }
    for path in PATHS {
        results.set(path, "cold_connect_ms", median(cold.remove(path).unwrap()));
    }

    // --- TLS to PostgreSQL: direct, ssh -N -L, the tunnel, the tunnel without TLS --------------
    let tls_enabled = !std::env::var("COMPARE_TLS").is_ok_and(|v| v == "0");
    let tls_meta = if tls_enabled {
        tls_section(&sshd, &pg, &sizes, &mut results).await
    } else {
        eprintln!("compare: TLS section skipped (COMPARE_TLS=0)");
        Value::Null
    };

    // --- blackholed link: time until keepalive declares it dead --------------------------------
    let keepalive = Duration::from_secs(1);
    let keepalive_max = 3usize;
    eprintln!(
        "compare: blackhole detection (keepalive {keepalive:?} x {keepalive_max}) x {}",
        sizes.blackhole_rounds
    );
    let proxy = FaultProxy::start(sshd.addr()).await.expect("fault proxy");
    let fingerprint = HostKeyPolicy::fingerprint(&sshd.host_key_fingerprint()).unwrap();
    let watched = SshTunnel::connect(
        tunnel_config()
            .host("127.0.0.1")
            .port(proxy.addr().port())
            .host_key_policy(fingerprint)
            .keepalive_interval(keepalive)
            .keepalive_max(keepalive_max)
            .map_reconnect(|r| r.initial_delay(Duration::from_millis(200)).max_retries(0)),
    )
    .await
    .expect("tunnel through the fault proxy");
    let mut detect = Vec::new();
    for _ in 0..sizes.blackhole_rounds {
        let mut events = watched.subscribe();
        let t = Instant::now();
        proxy.blackhole();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match events.recv().await {
                    Ok(TunnelEvent::Disconnected { .. }) => return,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("events: {e}"),
                }
            }
        })
        .await;
        if found.is_err() {
            eprintln!(
                "compare: blackhole NOT detected within 60 s: state {:?}, stats {:?}, proxy connections {}",
                *watched.state().borrow(),
                watched.stats(),
                proxy.connections()
            );
            detect.push(f64::NAN);
        } else {
            detect.push(t.elapsed().as_secs_f64() * 1e3);
        }
        proxy.restore();
        let mut state = watched.state();
        let back = tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| s.is_connected()))
            .await
            .map(|_| ());
        eprintln!(
            "compare: blackhole round took {:.0} ms; after restore: reconnected {}, {:?}",
            t.elapsed().as_secs_f64() * 1e3,
            back.is_ok(),
            watched.stats()
        );
    }
    watched.disconnect().await;
    results.set(TUNNEL, "blackhole_detect_ms", median(detect.clone()));

    // --- recovery after the bastion drops every session ----------------------------------------
    // Last: it also kills the OpenSSH forward's session.
    eprintln!("compare: recovery after drop_sessions x {}", sizes.recovery_rounds);
    let mut recovery = Vec::new();
    let mut failed_queries = 0;
    let db = manager.connection().clone();
    for _ in 0..sizes.recovery_rounds {
        // A few pooled connections, as a live application has.
        hold_connections(&db, 4, "SELECT pg_sleep(0.02)").await;
        let t = Instant::now();
        sshd.drop_sessions();
        loop {
            match db.execute_unprepared("SELECT 1").await {
                Ok(_) => break,
                Err(_) => {
                    failed_queries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no recovery within 60 s");
        }
        recovery.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    results.set(TUNNEL, "recovery_ms", median(recovery.clone()));
    let reconnect_initial = manager.config().tunnel.as_ref().unwrap().reconnect.initial_delay;

    let load_after = loadavg();
    let stats = manager.stats();
    manager.shutdown(Duration::from_secs(2)).await;
    standalone.disconnect().await;

    // --- report -------------------------------------------------------------------------------
    let aes = if cfg!(any(target_arch = "x86", target_arch = "x86_64")) {
        if std::arch::is_x86_feature_detected!("aes") {
            "AES-NI"
        } else {
            "no AES-NI"
        }
    } else {
        "non-x86"
    };
    println!();
    println!(
        "sea-orm-tunnel compare ({}), {} CPUs ({aes}), load average before {load_before} / after {load_after}",
        if quick { "COMPARE_QUICK" } else { "full run" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "OpenSSH `ssh -N -L` cipher: {openssh_cipher}; this crate prefers aes256-gcm where the CPU has AES \
         instructions, else chacha20-poly1305"
    );
    println!();
    print_table(&results);
    println!();
    if tls_enabled {
        print_tls_table(&results, &tls_meta);
        println!();
    }
    println!(
        "blackhole detection runs (keepalive {keepalive:?} x {keepalive_max}, bound {} ms): {:?} ms",
        (keepalive * keepalive_max as u32 + Duration::from_secs(1)).as_millis(),
        detect.iter().map(|v| v.round()).collect::<Vec<_>>()
    );
    println!(
        "recovery runs (reconnect initial delay {reconnect_initial:?}, bound {} ms): {:?} ms; {failed_queries} queries failed while recovering; pool: {} stale connections rejected",
        (reconnect_initial + Duration::from_secs(1)).as_millis(),
        recovery.iter().map(|v| v.round()).collect::<Vec<_>>(),
        stats.rejected_stale,
    );

    let mut json = serde_json::Map::new();
    for (path, values) in &results.0 {
        let obj: serde_json::Map<String, Value> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!((v * 100.0).round() / 100.0)))
            .collect();
        json.insert((*path).to_owned(), Value::Object(obj));
    }
    json.insert(
        "meta".into(),
        json!({
            "quick": quick,
            "select1_queries": sizes.select1,
            "openssh_cipher": openssh_cipher,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "blackhole_detect_runs_ms": detect,
            "recovery_runs_ms": recovery,
            "keepalive_ms": keepalive.as_millis() as u64,
            "keepalive_max": keepalive_max,
        }),
    );
    if tls_enabled {
        json.insert("tls_ratios".into(), Value::Object(tls_ratios(&results)));
        json.insert("tls_meta".into(), tls_meta);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = target.join("compare.json");
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(json)).unwrap()).expect("write compare.json");
    println!("wrote {}", out.display());
}

/// Cold start of an OpenSSH forward: process start, handshake, auth, bind, then first row.
async fn cold_openssh(sshd: &OpenSshd, pg_port: u16, url_at: &impl Fn(SocketAddr) -> String) -> f64 {
    let port = free_port();
    let local: SocketAddr = ([127, 0, 0, 1], port).into();
    let t = Instant::now();
    let mut cmd = sshd.ssh_command(&sshd.client_key_path());
    cmd.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{port}:127.0.0.1:{pg_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = KillOnDrop(cmd.spawn().expect("ssh"));
    // OpenSSH binds the local port only after authentication; poll it closely.
    loop {
        if tokio::net::TcpStream::connect(local).await.is_ok() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "ssh -N -L did not come up");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let db = Database::connect(seaorm_defaults(&url_at(local), 16)).await.unwrap();
    select1(&db).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    db.close().await.unwrap();
    drop(child);
    ms
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sql` on `n` connections of `db` at once, so the pool holds at least `n` connections.
async fn hold_connections(db: &DatabaseConnection, n: usize, sql: &'static str) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.execute_unprepared(sql).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        // During recovery a query on a dead connection may fail; that is what is measured next.
        let _ = task.await.expect("task");
    }
}

/// Sequential `SELECT 1` in chunks, the paths alternating (and rotating which goes first) chunk
/// by chunk; records p50, p99 and the share of queries over 10 ms (a delayed-ACK stall is ~40 ms).
async fn select1_latencies(paths: &[(&'static str, DatabaseConnection)], sizes: &Sizes, results: &mut Results) {
    let mut latencies: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    let mut done = 0;
    let mut round = 0;
    while done < sizes.select1 {
        let n = sizes.chunk.min(sizes.select1 - done);
        for i in 0..paths.len() {
            let (path, db) = &paths[(i + round) % paths.len()];
            let v = latencies.entry(*path).or_default();
            for _ in 0..n {
                let t = Instant::now();
                select1(db).await;
                v.push(t.elapsed());
            }
        }
        done += n;
        round += 1;
    }
    for (path, mut v) in latencies {
        v.sort();
        results.set(path, "select1_p50_us", percentile(&v, 50).as_secs_f64() * 1e6);
        results.set(path, "select1_p99_us", percentile(&v, 99).as_secs_f64() * 1e6);
        let stalled = v.iter().filter(|d| **d > Duration::from_millis(10)).count();
        results.set(path, "select1_over_10ms_pct", stalled as f64 * 100.0 / v.len() as f64);
    }
}

/// [`BULK_SQL`] `rounds` times per path, alternating; records the best MB/s.
async fn bulk_best(paths: &[(&'static str, DatabaseConnection)], rounds: usize, results: &mut Results) {
    let mut bulk: BTreeMap<&'static str, f64> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..paths.len() {
            let (path, db) = &paths[(i + round) % paths.len()];
            let t = Instant::now();
            let rows = db
                .query_all_raw(Statement::from_string(DbBackend::Postgres, BULK_SQL))
                .await
                .expect("bulk query");
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(rows.len(), 50);
            let mbps = BULK_BYTES / 1e6 / secs;
            let best = bulk.entry(*path).or_insert(0.0);
            *best = best.max(mbps);
        }
    }
    for (path, mbps) in bulk {
        results.set(path, "bulk_mbps", mbps);
    }
}

/// What the server sees of one pooled connection: `(ssl, version, cipher)` from `pg_stat_ssl`.
async fn backend_tls(db: &DatabaseConnection) -> (bool, String, String) {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT ssl, coalesce(version, '') AS version, coalesce(cipher, '') AS cipher \
             FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_ssl")
        .expect("a row for our own backend");
    (
        row.try_get("", "ssl").expect("ssl"),
        row.try_get("", "version").expect("version"),
        row.try_get("", "cipher").expect("cipher"),
    )
}

/// The TLS section: a `hostssl`-only PostgreSQL with its own CA, the four [`TLS_PATHS`] on pools
/// of 16, `SELECT 1` and bulk alternating. Returns the section's metadata for the JSON.
async fn tls_section(sshd: &OpenSshd, plain_pg: &TempPostgres, sizes: &Sizes, results: &mut Results) -> Value {
    let load_before = loadavg();
    eprintln!("compare: TLS section: starting a hostssl-only PostgreSQL (load average {load_before})");
    let ca = TestCa::new("sea-orm-tunnel compare CA").await.expect("test CA");
    // `127.0.0.1` too, so sqlx can verify the address it dials (direct and through `ssh -L`).
    let server = ca
        .server_cert_for_names(&[TLS_DB_NAME, "127.0.0.1"])
        .await
        .expect("server certificate");
    let pg = TempPostgres::start_tls(&server).await.expect("PostgreSQL with TLS");
    let verify_full = format!("sslmode=verify-full&sslrootcert={}", ca.cert_path().display());
    let url_at = |host: &str, port: u16| {
        format!(
            "postgres://{}:{}@{host}:{port}/{}?{verify_full}",
            pg.user(),
            pg.password(),
            pg.database()
        )
    };
    let forward = sshd
        .ssh_forward("127.0.0.1", pg.port())
        .await
        .expect("ssh -N -L to the TLS server");
    let openssh_cipher = forward.cipher().unwrap_or("?").to_owned();
    let manager_config = |url: String, pg: &TempPostgres| {
        Config::new(url)
            .tunnel(sshd.tunnel_config("127.0.0.1", pg.port()))
            .map_pool(|p| p.max_connections(16))
    };
    let tunnel_tls = ConnectionManager::new(manager_config(url_at(TLS_DB_NAME, pg.port()), &pg))
        .await
        .expect("manager with verify-full against db.internal");
    let tunnel_plain = ConnectionManager::new(manager_config(format!("{}?sslmode=disable", plain_pg.url()), plain_pg))
        .await
        .expect("manager with sslmode=disable");
    let direct_url = url_at("127.0.0.1", pg.port());
    let forward_addr = forward.local_addr();
    let openssh_url = url_at(&forward_addr.ip().to_string(), forward_addr.port());
    let paths: Vec<(&'static str, DatabaseConnection)> = vec![
        (
            DIRECT_TLS,
            Database::connect(seaorm_defaults(&direct_url, 16))
                .await
                .expect("direct with verify-full"),
        ),
        (
            OPENSSH_TLS,
            Database::connect(seaorm_defaults(&openssh_url, 16))
                .await
                .expect("ssh -N -L with verify-full"),
        ),
        (TUNNEL_TLS, tunnel_tls.connection().clone()),
        (TUNNEL_PLAIN, tunnel_plain.connection().clone()),
    ];
    debug_assert_eq!(paths.iter().map(|(p, _)| *p).collect::<Vec<_>>(), TLS_PATHS);

    // The server's view, so the table says what was measured (and a plaintext path would show).
    let mut seen = serde_json::Map::new();
    for (path, db) in &paths {
        let (ssl, version, cipher) = backend_tls(db).await;
        let expect_tls = *path != TUNNEL_PLAIN;
        assert_eq!(ssl, expect_tls, "{path}: TLS on the server side is {ssl}");
        let text = if ssl {
            format!("{version} {cipher}")
        } else {
            "plaintext".to_owned()
        };
        seen.insert((*path).to_owned(), json!(text));
    }

    for _ in 0..100 {
        for (_, db) in &paths {
            select1(db).await;
        }
    }
    eprintln!("compare: TLS section: sequential SELECT 1 x {}", sizes.select1);
    select1_latencies(&paths, sizes, results).await;
    eprintln!("compare: TLS section: bulk transfer, best of {}", sizes.bulk_rounds);
    bulk_best(&paths, sizes.bulk_rounds, results).await;

    for (path, db) in paths {
        if !matches!(path, TUNNEL_TLS | TUNNEL_PLAIN) {
            db.close().await.expect("closing a pool");
        }
    }
    tunnel_tls.shutdown(Duration::from_secs(2)).await;
    tunnel_plain.shutdown(Duration::from_secs(2)).await;
    drop(forward);
    json!({
        "server_side_tls": seen,
        "openssh_cipher": openssh_cipher,
        "openssh_tls_name_check": "sqlx verify-full against 127.0.0.1 (IP subjectAltName); \
            stands in for libpq host=db.internal hostaddr=127.0.0.1, which sqlx lacks",
        "tunnel_tls_name_check": "verify-full against db.internal, tunnel remote 127.0.0.1",
        "certificate_names": [TLS_DB_NAME, "127.0.0.1"],
        "load_average_before": load_before,
        "load_average_after": loadavg(),
    })
}

/// `(JSON key, numerator path, denominator path)` of the TLS ratios.
const TLS_RATIOS: [(&str, &str, &str); 3] = [
    ("tunnel_tls/tunnel_plain", TUNNEL_TLS, TUNNEL_PLAIN),
    ("tunnel_tls/openssh_tls", TUNNEL_TLS, OPENSSH_TLS),
    ("tunnel_tls/direct_tls", TUNNEL_TLS, DIRECT_TLS),
];
const TLS_KEYS: [(&str, &str, bool); 4] = [
    ("SELECT 1 p50 (us)", "select1_p50_us", false),
    ("SELECT 1 p99 (us)", "select1_p99_us", false),
    ("SELECT 1 > 10 ms (%)", "select1_over_10ms_pct", false),
    ("bulk 52 MB (MB/s)", "bulk_mbps", true),
];

fn ratio(results: &Results, key: &str, num: &str, den: &str) -> Option<f64> {
    match (results.get(num, key), results.get(den, key)) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// `{"select1_p50_us": {"tunnel_tls/tunnel_plain": 1.1, ...}, ...}`.
fn tls_ratios(results: &Results) -> serde_json::Map<String, Value> {
    TLS_KEYS
        .iter()
        .map(|(_, key, _)| {
            let by: serde_json::Map<String, Value> = TLS_RATIOS
                .iter()
                .filter_map(|(name, num, den)| {
                    let r = ratio(results, key, num, den)?;
                    Some(((*name).to_owned(), json!((r * 1000.0).round() / 1000.0)))
                })
                .collect();
            ((*key).to_owned(), Value::Object(by))
        })
        .collect()
}

fn print_tls_table(results: &Results, meta: &Value) {
    println!(
        "TLS to PostgreSQL (hostssl-only server, certificate for {TLS_DB_NAME} and 127.0.0.1), load average \
         before {} / after {}:",
        meta["load_average_before"].as_str().unwrap_or("?"),
        meta["load_average_after"].as_str().unwrap_or("?")
    );
    let seen = &meta["server_side_tls"];
    for path in TLS_PATHS {
        println!("  {path:<13} server sees: {}", seen[path].as_str().unwrap_or("?"));
    }
    println!(
        "  openssh_tls = `ssh -N -L` (cipher {}) + sqlx sslmode=verify-full against 127.0.0.1 (the \
         certificate's IP name: sqlx has no libpq hostaddr)",
        meta["openssh_cipher"].as_str().unwrap_or("?")
    );
    println!("  tunnel_tls  = ConnectionManager, sslmode=verify-full against {TLS_DB_NAME}, TLS held by the tunnel");
    println!("  tunnel_plain = ConnectionManager to the plaintext server, sslmode=disable");
    println!();
    print!("| {:<22} |", "workload");
    for path in TLS_PATHS {
        print!(" {path:>12} |");
    }
    for (name, _, _) in TLS_RATIOS {
        print!(" {name:>23} |");
    }
    println!();
    print!("|{:-<24}|", "");
    for _ in TLS_PATHS {
        print!("{:->14}|", "");
    }
    for _ in TLS_RATIOS {
        print!("{:->25}|", "");
    }
    println!();
    for (label, key, higher_is_better) in TLS_KEYS {
        let label = format!("{label} {}", if higher_is_better { "↑" } else { "↓" });
        print!("| {label:<22} |");
        for path in TLS_PATHS {
            let cell = results.get(path, key).map_or_else(
                || "-".to_owned(),
                |v| format!("{v:.*}", usize::from(key.ends_with("_pct"))),
            );
            print!(" {cell:>12} |");
        }
        for (_, num, den) in TLS_RATIOS {
            let cell = ratio(results, key, num, den).map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
            print!(" {cell:>23} |");
        }
        println!();
    }
}

fn print_table(results: &Results) {
    struct Row {
        label: &'static str,
        key: &'static str,
        higher_is_better: bool,
        decimals: usize,
    }
    let rows = [
        Row {
            label: "SELECT 1 p50 (us)",
            key: "select1_p50_us",
            higher_is_better: false,
            decimals: 0,
        },
        Row {
            label: "SELECT 1 p99 (us)",
            key: "select1_p99_us",
            higher_is_better: false,
            decimals: 0,
        },
        Row {
            label: "pool of 4, sequential (ms/query)",
            key: "pool4_sequential_ms",
            higher_is_better: false,
            decimals: 2,
        },
        Row {
            label: "bulk 52 MB (MB/s)",
            key: "bulk_mbps",
            higher_is_better: true,
            decimals: 0,
        },
        Row {
            label: "16 x 500 concurrent (queries/s)",
            key: "concurrent_qps",
            higher_is_better: true,
            decimals: 0,
        },
        Row {
            label: "cold connect to first row (ms)",
            key: "cold_connect_ms",
            higher_is_better: false,
            decimals: 1,
        },
        Row {
            label: "recovery after drop_sessions (ms)",
            key: "recovery_ms",
            higher_is_better: false,
            decimals: 0,
        },
        Row {
            label: "blackhole detection (ms)",
            key: "blackhole_detect_ms",
            higher_is_better: false,
            decimals: 0,
        },
    ];
    println!(
        "| {:<34} | {:>9} | {:>9} | {:>9} | {:>22} | {:>13} | {:>14} |",
        "workload", DIRECT, OPENSSH, TUNNEL, TUNNEL_DEFAULTS, "tunnel/direct", "tunnel/openssh"
    );
    println!(
        "|{:-<36}|{:->11}|{:->11}|{:->11}|{:->24}|{:->15}|{:->16}|",
        "", "", "", "", "", "", ""
    );
    for row in rows {
        let cell = |path: &str| {
            results
                .get(path, row.key)
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.*}", row.decimals))
        };
        let ratio = |other: &str| match (results.get(TUNNEL, row.key), results.get(other, row.key)) {
            (Some(t), Some(o)) if o > 0.0 => format!("{:.2}x", t / o),
            _ => "-".to_owned(),
        };
        let label = format!("{} {}", row.label, if row.higher_is_better { "↑" } else { "↓" });
        println!(
            "| {:<34} | {:>9} | {:>9} | {:>9} | {:>22} | {:>13} | {:>14} |",
            label,
            cell(DIRECT),
            cell(OPENSSH),
            cell(TUNNEL),
            cell(TUNNEL_DEFAULTS),
            ratio(DIRECT),
            ratio(OPENSSH)
        );
    }
}
