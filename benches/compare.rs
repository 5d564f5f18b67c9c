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
//! Outside clients (pgbench, `/usr/bin/pgbench` or on `PATH`), all through the same sshd:
//!
//! - `forward`: `sea-orm-tunnel forward` as a child process (the workspace's binary, which
//!   `cargo bench` builds in the bench profile next to this bench: `CARGO_BIN_EXE_sea-orm-tunnel`);
//! - `openssh`: an `ssh -N -L` process; `direct`: straight to the server.
//!
//! `pgbench -S -n -c 8 -j 2 -M simple -T <secs>` tps, and the CPU (utime + stime from
//! `/proc/<pid>/stat`) of the client-side forwarding process per 1,000 transactions; the same
//! against sshds that allow only `chacha20-poly1305@openssh.com`, then only `aes256-gcm@openssh.com`
//! (russh prefers AES-GCM on a CPU with AES instructions, OpenSSH 9.2's ssh chacha20), and with PgBouncer (transaction mode) behind the bastion (`forward`
//! with `pgbouncer=true`). The negotiated ciphers are read from `ssh -v` and from the debug log
//! of a probe sshd with the same configuration. RSS: `VmRSS` of `forward` and of `ssh`, idle and
//! with 100 open connections.
//!
//! `COMPARE_RTT_MS=<ms>`: the long round trip mode. A `DelayProxy` adding that RTT sits between
//! the client side and sshd (`ssh -L`, the tunnel and `forward` all connect to it; its
//! `[127.0.0.1]:PORT` is added to the sshd's known_hosts, so host keys are verified strictly);
//! measures sequential `SELECT 1` (÷ RTT), the bulk query (÷ channel window ÷ RTT), and a new
//! connection + first query, then the outside clients through the proxy, and writes
//! `target/compare-rtt<ms>.json`. The loopback sections are skipped in this mode. New connections
//! are also measured with the optimisations that are off by default: `tunnel_fast` (the manager
//! with `spare_channel` and `connection_ids(false)`) and `forward_fast` (`forward` with `SSH_SPARE_CHANNEL` and
//! `sslmode=disable` in its `DATABASE_URL`, so it answers the client's `SSLRequest` itself; the
//! client keeps sqlx's default `prefer`, as through `ssh -L`).
//!
//! `COMPARE_WINDOW=<bytes>` sets the channel window of the tunnel paths and of `forward`.
//!
//! The paths alternate within each workload (never one path's whole run after another's), so a
//! busy machine slows all of them alike; compare the ratios. Prints the tables and writes
//! `target/compare.json`.
//!
//! Run with: `cargo bench --bench compare` (`COMPARE_QUICK=1` for a short run, `COMPARE_TLS=0`
//! without the TLS section, `COMPARE_RTT_MS=50` for the long round trip mode).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::{Config, HostKeyPolicy};
use sea_orm_tunnel::testkit::{
    DelayProxy, FaultProxy, OpenSshd, PgBouncer, PoolMode, SshForward, TempPostgres, TestCa,
};
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
    if let Some(rtt) = rtt_from_env() {
        rtt_mode(&pg, &sshd, rtt, quick).await;
        return;
    }

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
    // Client-side CPU: this whole process (SeaORM/sqlx, and for the tunnel paths the tunnel),
    // plus the `ssh` process for the OpenSSH path.
    let ticks = clock_ticks();
    let ssh_pid = forward.pid().to_string();
    let mut client_cpu: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for round in 0..sizes.concurrent_rounds {
        for i in 0..PATHS.len() {
            let path = PATHS[(i + round) % PATHS.len()];
            let db = pools[path].db16.clone();
            let cpu_before = cpu_secs("self", ticks) + cpu_secs(&ssh_pid, ticks);
            let ssh_before = cpu_secs(&ssh_pid, ticks);
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
            let ssh_cpu = cpu_secs(&ssh_pid, ticks) - ssh_before;
            let all_cpu = cpu_secs("self", ticks) + cpu_secs(&ssh_pid, ticks) - cpu_before;
            let cpu = if path == OPENSSH { all_cpu } else { all_cpu - ssh_cpu };
            let entry = client_cpu.entry(path).or_default();
            entry.0 += cpu;
            entry.1 += (sizes.concurrent_tasks * sizes.concurrent_queries) as f64;
            let best = concurrent.entry(path).or_insert(0.0);
            *best = best.max(qps);
        }
    }
    for (path, qps) in concurrent {
        let path = PATHS.into_iter().find(|p| *p == path).unwrap();
        results.set(path, "concurrent_qps", qps);
    }
    for (path, (cpu, queries)) in client_cpu {
        let path = PATHS.into_iter().find(|p| *p == path).unwrap();
        results.set(path, "concurrent_client_cpu_ms_per_1k", cpu * 1e6 / queries);
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

    // --- outside clients: pgbench through forward / ssh -N -L / direct, CPU, RSS, PgBouncer -----
    let (outside, outside_text) = outside_clients(&sshd, &pg, None, quick).await;

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
    println!(
        "client CPU = utime+stime of this bench process (SeaORM/sqlx for every path, the tunnel for the \
         tunnel paths) plus the ssh process for openssh, during the concurrent workload"
    );
    println!();
    print!("{outside_text}");
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
    json.insert("outside_clients".into(), outside);
    if tls_enabled {
        json.insert("tls_ratios".into(), Value::Object(tls_ratios(&results)));
        json.insert("tls_meta".into(), tls_meta);
    }
    let out = target_dir().join("compare.json");
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
            label: "client CPU ms / 1,000 queries",
            key: "concurrent_client_cpu_ms_per_1k",
            higher_is_better: false,
            decimals: 1,
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

// === outside clients: pgbench, CPU, RSS, ciphers, PgBouncer, a long round trip ====================

/// `FORWARD`: `sea-orm-tunnel forward` (this workspace's binary, built by `cargo bench` in the
/// bench profile) as a child process, clients connecting to its local port.
const FORWARD: &str = "forward";
/// Long round trip mode, new connections only: the manager with `spare_channel` on and
/// `connection_ids(false)` (no `SET application_name` round trip).
const TUNNEL_FAST: &str = "tunnel_fast";
/// Long round trip mode, new connections only: `forward` with `SSH_SPARE_CHANNEL` on and
/// `sslmode=disable` in its `DATABASE_URL` (it answers the client's `SSLRequest` itself).
const FORWARD_FAST: &str = "forward_fast";
/// How long a spare channel waits in those two paths.
const SPARE_TTL: Duration = Duration::from_secs(30);

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 if that fails, which is
/// what Linux uses on every common architecture).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (all its threads) so far; `pid` "self" for this one.
fn cpu_secs(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15)) as f64 / ticks
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A bastion as the clients reach it: the sshd's own address, or a [`DelayProxy`] in front of it
/// (then its known_hosts also lists the key for the proxy's `[127.0.0.1]:PORT`, so `ssh`, the
/// tunnel and `forward` verify the same host key strictly).
struct Reach<'a> {
    sshd: &'a OpenSshd,
    addr: SocketAddr,
    _proxy: Option<DelayProxy>,
}

impl<'a> Reach<'a> {
    async fn new(sshd: &'a OpenSshd, rtt: Option<Duration>) -> Reach<'a> {
        let Some(rtt) = rtt else {
            return Reach {
                sshd,
                addr: sshd.addr(),
                _proxy: None,
            };
        };
        let proxy = DelayProxy::start(sshd.addr(), rtt).await.expect("delay proxy");
        sshd.trust_host_key_at(proxy.addr())
            .expect("known_hosts line for the proxy");
        Reach {
            sshd,
            addr: proxy.addr(),
            _proxy: Some(proxy),
        }
    }

    fn tunnel_config(&self, remote_port: u16) -> sea_orm_tunnel::config::TunnelConfig {
        let config = self
            .sshd
            .tunnel_config("127.0.0.1", remote_port)
            .host(self.addr.ip().to_string())
            .port(self.addr.port());
        match window_from_env() {
            Some(bytes) => config.channel_window(bytes),
            None => config,
        }
    }

    async fn ssh_forward(&self, remote_port: u16) -> SshForward {
        self.sshd
            .ssh_forward_via(self.addr, "127.0.0.1", remote_port, &[])
            .await
            .expect("ssh -N -L")
    }

    /// Starts `sea-orm-tunnel forward` for `database_url` (its host:port is the remote side).
    /// `env`: more environment for it (e.g. `SSH_SPARE_CHANNEL`).
    async fn forward(&self, database_url: &str, env: &[(&str, String)]) -> ForwardProcess {
        ForwardProcess::start(self, database_url, env).await
    }
}

/// A running `sea-orm-tunnel forward`; killed on drop.
struct ForwardProcess {
    child: Child,
    addr: SocketAddr,
}

impl ForwardProcess {
    async fn start(reach: &Reach<'_>, database_url: &str, env: &[(&str, String)]) -> ForwardProcess {
        let sshd = reach.sshd;
        let n = FORWARDS_STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = sshd.dir().join(format!("forward-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("forward log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sea-orm-tunnel"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // No ~/.ssh, no .env files: the sshd's temp dir.
            .env("HOME", sshd.dir())
            .current_dir(sshd.dir())
            .env("DATABASE_URL", database_url)
            .env("SSH_HOST", reach.addr.ip().to_string())
            .env("SSH_PORT", reach.addr.port().to_string())
            .env("SSH_USER", sshd.user())
            .env("SSH_KEY_PATH", sshd.client_key_path())
            .env("SSH_USE_AGENT", "false")
            .env("SSH_CONFIG", "none")
            .env("SSH_KNOWN_HOSTS", sshd.known_hosts_path())
            .env("SSH_HOST_KEY_POLICY", "strict")
            .envs(window_from_env().map(|w| ("SSH_CHANNEL_WINDOW", w.to_string())))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("forward")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("start sea-orm-tunnel forward");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            // Read to the end: a closed pipe would fail forward's next line.
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = rx.recv().await {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return addr.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "forward printed no `listening on HOST:PORT`; log {}:\n{}",
                log_path.display(),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        };
        ForwardProcess { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ForwardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static FORWARDS_STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One `pgbench` run's figures.
struct PgbenchRun {
    tps: f64,
    transactions: f64,
}

/// `pgbench -S -n -c 8 -j 2 -T secs -M simple` against `addr` (plaintext, the server's user).
async fn pgbench(pg: &TempPostgres, addr: SocketAddr, secs: u32) -> PgbenchRun {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.env("PGPASSWORD", pg.password())
        .env("PGUSER", pg.user())
        .env("PGDATABASE", pg.database())
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "20")
        .args(["-S", "-n", "-c", "8", "-j", "2", "-M", "simple", "-T"])
        .arg(secs.to_string())
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("pgbench task")
        .expect("running pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (
        out.status.success(),
        value("tps ="),
        value("number of transactions actually processed:"),
    ) {
        (true, Some(tps), Some(transactions)) => PgbenchRun { tps, transactions },
        _ => panic!(
            "pgbench against {addr} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `pgbench -i -s 1` directly on the server (the tables `-S` reads).
async fn pgbench_init(pg: &TempPostgres) {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.env("PGPASSWORD", pg.password())
        .env("PGUSER", pg.user())
        .env("PGDATABASE", pg.database())
        .env("PGSSLMODE", "disable")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
        .arg(pg.port().to_string())
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("pgbench -i task")
        .expect("running pgbench -i");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client path for pgbench: where it connects and which process forwards (`None`: direct).
struct BenchPath {
    name: &'static str,
    addr: SocketAddr,
    forwarder: Option<u32>,
}

/// pgbench `rounds` × `secs` on every path, the paths alternating (first path rotating); per
/// path the median tps and the forwarding process's CPU per 1,000 transactions over all rounds.
/// Returns `{path: {tps, cpu_ms_per_1k_txns, transactions}}`.
async fn pgbench_paths(
    pg: &TempPostgres,
    paths: &[BenchPath],
    secs: u32,
    rounds: usize,
    ticks: f64,
) -> serde_json::Map<String, Value> {
    let mut tps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, f64> = BTreeMap::new();
    let mut txns: BTreeMap<&str, f64> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..paths.len() {
            let path = &paths[(i + round) % paths.len()];
            let before = path.forwarder.map(|p| cpu_secs(&p.to_string(), ticks));
            let run = pgbench(pg, path.addr, secs).await;
            if let (Some(pid), Some(before)) = (path.forwarder, before) {
                *cpu.entry(path.name).or_default() += cpu_secs(&pid.to_string(), ticks) - before;
            }
            tps.entry(path.name).or_default().push(run.tps);
            *txns.entry(path.name).or_default() += run.transactions;
        }
    }
    paths
        .iter()
        .map(|p| {
            let mut o = serde_json::Map::new();
            o.insert("tps".into(), json!(round2(median(tps[p.name].clone()))));
            o.insert("transactions".into(), json!(txns[p.name]));
            if let Some(cpu) = cpu.get(p.name) {
                o.insert("cpu_ms_per_1k_txns".into(), json!(round2(cpu * 1e6 / txns[p.name])));
            }
            (p.name.to_owned(), Value::Object(o))
        })
        .collect()
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn num(v: &Value, path: &str, key: &str) -> Option<f64> {
    v.get(path)?.get(key)?.as_f64()
}

fn fmt_ratio(n: Option<f64>, d: Option<f64>) -> String {
    match (n, d) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}x", n / d),
        _ => "-".to_owned(),
    }
}

/// A pgbench table: tps and forwarder CPU per path, then `forward`'s ratios.
fn pgbench_table(out: &mut String, title: &str, v: &Value, paths: &[&str], ratios_to: &[&str]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "{title}");
    let _ = write!(out, "| {:<34} |", "pgbench -S -c 8 -j 2");
    for p in paths {
        let _ = write!(out, " {p:>12} |");
    }
    for r in ratios_to {
        let _ = write!(out, " {:>17} |", format!("{FORWARD}/{r}"));
    }
    let _ = writeln!(out);
    let _ = write!(out, "|{:-<36}|", "");
    for _ in paths {
        let _ = write!(out, "{:->14}|", "");
    }
    for _ in ratios_to {
        let _ = write!(out, "{:->19}|", "");
    }
    let _ = writeln!(out);
    for (label, key) in [
        ("tps ↑", "tps"),
        ("transactions (all rounds)", "transactions"),
        ("forwarder CPU ms / 1,000 txns ↓", "cpu_ms_per_1k_txns"),
    ] {
        let _ = write!(out, "| {label:<34} |");
        for p in paths {
            let decimals = if key == "transactions" { 0 } else { 1 };
            let cell = num(v, p, key).map_or_else(|| "-".to_owned(), |x| format!("{x:.decimals$}"));
            let _ = write!(out, " {cell:>12} |");
        }
        for r in ratios_to {
            let _ = write!(out, " {:>17} |", fmt_ratio(num(v, FORWARD, key), num(v, r, key)));
        }
        let _ = writeln!(out);
    }
}

/// VmRSS of `pid` idle, then with 100 client connections through `addr`, each past startup and
/// a query and kept open (a SeaORM pool of 100 filled by 100 concurrent `pg_sleep`s).
async fn rss_100(pid: u32, url: &str) -> (f64, f64) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = rss_kib(pid);
    let mut o = ConnectOptions::new(url.to_owned());
    o.max_connections(100)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(60))
        .idle_timeout(Duration::from_secs(600));
    let db = Database::connect(o).await.expect("pool of 100");
    // Each sleep outlasts opening all 100 (at a long round trip the extra SSH sessions take a
    // while), so no connection is reused before the last one opened.
    // A connection that fails to open (at a long round trip many SSH sessions start at once, and
    // sshd drops some past `MaxStartups`) is opened by the next round; the pool keeps the others.
    for _ in 0..5 {
        hold_connections(&db, 100, "SELECT pg_sleep(3)").await;
        if db.get_postgres_connection_pool().size() >= 100 {
            break;
        }
    }
    let open = db.get_postgres_connection_pool().size();
    assert_eq!(
        open,
        100,
        "100 connections open through {}",
        sea_orm_tunnel::config::redact_url(url)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = rss_kib(pid);
    db.close().await.expect("closing the pool of 100");
    (idle, loaded)
}

/// The ciphers sshd negotiated with this crate's tunnel and with `ssh`, read from the debug log
/// of a probe sshd configured as the measured one plus `LogLevel DEBUG1` (the measured sshd logs
/// at VERBOSE, which has no kex lines; this crate does not expose the negotiated cipher).
/// Returns `(tunnel, ssh)`.
async fn probe_ciphers(extra: &[&str], pg_port: u16) -> (String, String) {
    let mut builder = OpenSshd::builder().config_line("LogLevel DEBUG1");
    for line in extra {
        builder = builder.config_line(*line);
    }
    let sshd = builder.start().await.expect("probe sshd");
    let tunnel = SshTunnel::connect(sshd.tunnel_config("127.0.0.1", pg_port))
        .await
        .expect("probe tunnel");
    tunnel.disconnect().await;
    let ssh = sshd.ssh_forward("127.0.0.1", pg_port).await.expect("probe ssh -L");
    let ssh_reported = ssh.cipher().unwrap_or("?").to_owned();
    drop(ssh);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = std::fs::read_to_string(sshd.log_path()).unwrap_or_default();
    let mut software = String::new();
    let mut tunnel_cipher = None;
    for line in log.lines() {
        if let Some(rest) = line.split("remote software version ").nth(1) {
            software = rest.split_whitespace().next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.split("kex: server->client cipher: ").nth(1) {
            let cipher = rest.split_whitespace().next().unwrap_or("?").to_owned();
            if software.to_ascii_lowercase().contains("russh") && tunnel_cipher.is_none() {
                tunnel_cipher = Some(cipher);
            }
        }
    }
    (tunnel_cipher.unwrap_or_else(|| "?".to_owned()), ssh_reported)
}

/// Outside clients through `forward` and `ssh -N -L` (and direct): pgbench tps and forwarder CPU
/// (default ciphers, chacha20-poly1305 on both sides, PgBouncer behind), and RSS per 100
/// connections. Returns the JSON and the printed tables.
async fn outside_clients(sshd: &OpenSshd, pg: &TempPostgres, rtt: Option<Duration>, quick: bool) -> (Value, String) {
    use std::fmt::Write as _;
    let ticks = clock_ticks();
    // Over a long round trip a transaction takes ~RTT: longer runs, so the CPU (10 ms ticks) counts.
    let (secs, rounds) = match (quick, rtt.is_some()) {
        (true, _) => (2, 1),
        (false, false) => (6, 3),
        (false, true) => (10, 3),
    };
    let mut text = String::new();
    let mut json = serde_json::Map::new();
    let rtt_note = rtt.map_or_else(
        || "loopback".to_owned(),
        |r| format!("+{} ms RTT to sshd", r.as_millis()),
    );
    eprintln!("compare: outside clients ({rtt_note}): pgbench -i, forward, ssh -N -L");
    pgbench_init(pg).await;

    // Ciphers, as negotiated with this sshd configuration and with the chacha20-only one.
    let chacha_line = "Ciphers chacha20-poly1305@openssh.com";
    let (tunnel_cipher, ssh_cipher) = probe_ciphers(&[], pg.port()).await;
    let (tunnel_chacha, ssh_chacha) = probe_ciphers(&[chacha_line], pg.port()).await;
    let aes_line = "Ciphers aes256-gcm@openssh.com";
    let (tunnel_aes, ssh_aes) = probe_ciphers(&[aes_line], pg.port()).await;
    json.insert(
        "ciphers".into(),
        json!({
            "default": {"tunnel": tunnel_cipher, "forward": tunnel_cipher, "openssh": ssh_cipher, "direct": "none"},
            "chacha20_sshd": {"tunnel": tunnel_chacha, "forward": tunnel_chacha, "openssh": ssh_chacha},
            "aes256gcm_sshd": {"tunnel": tunnel_aes, "forward": tunnel_aes, "openssh": ssh_aes},
            "how": "tunnel/forward: sshd DEBUG1 kex line of a probe sshd with the same configuration; openssh: ssh -v",
        }),
    );
    let _ = writeln!(
        text,
        "Ciphers: tunnel and forward (russh) {tunnel_cipher}, ssh -N -L {ssh_cipher}; against the \
         chacha20-only sshd: russh {tunnel_chacha}, ssh {ssh_chacha}; against the aes256-gcm-only sshd: russh \
         {tunnel_aes}, ssh {ssh_aes}"
    );

    let reach = Reach::new(sshd, rtt).await;
    let url = |addr: SocketAddr| format!("postgres://{}:{}@{addr}/{}", pg.user(), pg.password(), pg.database());
    let fwd = reach.forward(&pg.url(), &[]).await;
    let ssh = reach.ssh_forward(pg.port()).await;

    // RSS first, on fresh processes.
    eprintln!("compare: RSS of forward and ssh with 100 open connections");
    let (fwd_idle, fwd_100) = rss_100(fwd.pid(), &url(fwd.addr)).await;
    let (ssh_idle, ssh_100) = rss_100(ssh.pid(), &url(ssh.local_addr())).await;
    let per = |idle: f64, loaded: f64| (loaded - idle) / 100.0;
    json.insert(
        "rss_kib".into(),
        json!({
            FORWARD: {"idle": fwd_idle, "with_100_connections": fwd_100, "per_connection": round2(per(fwd_idle, fwd_100))},
            OPENSSH: {"idle": ssh_idle, "with_100_connections": ssh_100, "per_connection": round2(per(ssh_idle, ssh_100))},
        }),
    );
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "Client-side forwarder RSS (VmRSS), idle and with 100 open connections:"
    );
    let _ = writeln!(
        text,
        "| {:<10} | {:>10} | {:>16} | {:>14} |",
        "process", "idle KiB", "100 conns KiB", "KiB / conn ↓"
    );
    let _ = writeln!(text, "|{:-<12}|{:->12}|{:->18}|{:->16}|", "", "", "", "");
    for (name, idle, loaded) in [(FORWARD, fwd_idle, fwd_100), ("ssh", ssh_idle, ssh_100)] {
        let _ = writeln!(
            text,
            "| {name:<10} | {idle:>10.0} | {loaded:>16.0} | {:>14.1} |",
            per(idle, loaded)
        );
    }
    let _ = writeln!(
        text,
        "forward/ssh KiB per connection: {}",
        fmt_ratio(Some(per(fwd_idle, fwd_100)), Some(per(ssh_idle, ssh_100)))
    );

    // pgbench with the default ciphers.
    eprintln!("compare: pgbench -S -c 8 -j 2, {rounds} x {secs} s per path");
    let mut paths = vec![
        BenchPath {
            name: FORWARD,
            addr: fwd.addr,
            forwarder: Some(fwd.pid()),
        },
        BenchPath {
            name: OPENSSH,
            addr: ssh.local_addr(),
            forwarder: Some(ssh.pid()),
        },
    ];
    if rtt.is_none() {
        paths.push(BenchPath {
            name: DIRECT,
            addr: SocketAddr::from(([127, 0, 0, 1], pg.port())),
            forwarder: None,
        });
    }
    let default = Value::Object(pgbench_paths(pg, &paths, secs, rounds, ticks).await);
    let _ = writeln!(text);
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    let ratio_to: Vec<&str> = names[1..].to_vec();
    pgbench_table(
        &mut text,
        &format!(
            "pgbench -S ({rtt_note}), {rounds} x {secs} s per path, median tps; CPU = utime+stime of the \
             forwarding process ({FORWARD} {tunnel_cipher}, ssh {ssh_cipher}):"
        ),
        &default,
        &names,
        &ratio_to,
    );
    json.insert("pgbench".into(), default);
    drop(paths);
    drop(ssh);
    drop(fwd);

    // pgbench with one cipher forced by sshd: chacha20-poly1305, then aes256-gcm, on both sides.
    for (key, line, tunnel_c, ssh_c) in [
        ("pgbench_chacha20", chacha_line, &tunnel_chacha, &ssh_chacha),
        ("pgbench_aes256gcm", aes_line, &tunnel_aes, &ssh_aes),
    ] {
        eprintln!("compare: pgbench against an sshd with `{line}`");
        let forced_sshd = OpenSshd::builder()
            .config_line(line)
            .start()
            .await
            .expect("sshd with one cipher");
        let forced = Reach::new(&forced_sshd, rtt).await;
        let fwd = forced.forward(&pg.url(), &[]).await;
        let ssh = forced.ssh_forward(pg.port()).await;
        let paths = [
            BenchPath {
                name: FORWARD,
                addr: fwd.addr,
                forwarder: Some(fwd.pid()),
            },
            BenchPath {
                name: OPENSSH,
                addr: ssh.local_addr(),
                forwarder: Some(ssh.pid()),
            },
        ];
        let v = Value::Object(pgbench_paths(pg, &paths, secs, rounds, ticks).await);
        let _ = writeln!(text);
        pgbench_table(
            &mut text,
            &format!("pgbench -S ({rtt_note}), sshd `{line}` ({FORWARD} {tunnel_c}, ssh {ssh_c}):"),
            &v,
            &[FORWARD, OPENSSH],
            &[OPENSSH],
        );
        json.insert(key.into(), v);
    }

    // pgbench through PgBouncer (transaction mode) behind the bastion.
    eprintln!("compare: pgbench through PgBouncer (transaction mode)");
    let bouncer = PgBouncer::builder()
        .mode(PoolMode::Transaction)
        .default_pool_size(8)
        .start(pg)
        .await
        .expect("PgBouncer");
    let fwd = reach.forward(&format!("{}?pgbouncer=true", bouncer.url()), &[]).await;
    let ssh = reach.ssh_forward(bouncer.port()).await;
    let mut paths = vec![
        BenchPath {
            name: FORWARD,
            addr: fwd.addr,
            forwarder: Some(fwd.pid()),
        },
        BenchPath {
            name: OPENSSH,
            addr: ssh.local_addr(),
            forwarder: Some(ssh.pid()),
        },
    ];
    if rtt.is_none() {
        paths.push(BenchPath {
            name: DIRECT,
            addr: SocketAddr::from(([127, 0, 0, 1], bouncer.port())),
            forwarder: None,
        });
    }
    let pgb = Value::Object(pgbench_paths(pg, &paths, secs, rounds, ticks).await);
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    let _ = writeln!(text);
    pgbench_table(
        &mut text,
        &format!(
            "pgbench -S -M simple ({rtt_note}) to PgBouncer (transaction mode, pool 8): {FORWARD} with \
             DATABASE_URL=...?pgbouncer=true vs ssh -N -L to PgBouncer's port{}:",
            if rtt.is_none() { " vs direct to PgBouncer" } else { "" }
        ),
        &pgb,
        &names,
        &names[1..],
    );
    json.insert("pgbench_pgbouncer".into(), pgb);
    drop(paths);
    drop(ssh);
    drop(fwd);
    drop(bouncer);

    let goal_tps = num(&json["pgbench"], FORWARD, "tps")
        .zip(num(&json["pgbench"], OPENSSH, "tps"))
        .map(|(f, s)| f / s);
    let goal_cpu = num(&json["pgbench"], FORWARD, "cpu_ms_per_1k_txns")
        .zip(num(&json["pgbench"], OPENSSH, "cpu_ms_per_1k_txns"))
        .map(|(f, s)| f / s);
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "goals (not asserted){}: pgbench -S 8 clients forward/ssh {} (goal >= 1.25x at loopback); forwarder CPU \
         per 1,000 txns forward/ssh {} (goal <= 0.70x)",
        if rtt.is_some() {
            ", measured here with the RTT"
        } else {
            ""
        },
        goal_tps.map_or("-".into(), |r| format!("{r:.2}x")),
        goal_cpu.map_or("-".into(), |r| format!("{r:.2}x")),
    );
    json.insert(
        "meta".into(),
        json!({"secs": secs, "rounds": rounds, "clients": 8, "threads": 2, "clock_ticks": ticks, "rtt": rtt_note}),
    );
    (Value::Object(json), text)
}

/// SeaORM's defaults without sqlx's ping before every checkout, which costs a round trip per query
/// over a long link whatever carries it.
fn no_ping(url: &str, max: u32) -> ConnectOptions {
    let mut o = seaorm_defaults(url, max);
    o.test_before_acquire(false);
    o
}

/// `COMPARE_WINDOW=<bytes>`: the channel window of every tunnel path and of `forward` (default:
/// the crate's).
fn window_from_env() -> Option<u32> {
    let v = std::env::var("COMPARE_WINDOW").ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("COMPARE_WINDOW={v:?} is not a number of bytes")),
    )
}

/// `COMPARE_RTT_MS`: the round-trip time a [`DelayProxy`] adds between the client side and sshd.
fn rtt_from_env() -> Option<Duration> {
    let v = std::env::var("COMPARE_RTT_MS").ok()?;
    let ms: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("COMPARE_RTT_MS={v:?} is not a number of milliseconds"));
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The long round trip mode: every SSH path reaches sshd through a [`DelayProxy`] adding `rtt`.
/// Bulk, new connection + first query and sequential `SELECT 1` for `ssh -N -L`, the
/// `ConnectionManager`, `SshTunnel` + SeaORM defaults and `forward`; then the outside clients.
async fn rtt_mode(pg: &TempPostgres, sshd: &OpenSshd, rtt: Duration, quick: bool) {
    let load_before = loadavg();
    let (select1_n, bulk_rounds, connect_rounds) = if quick { (20, 1, 3) } else { (100, 3, 9) };
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    eprintln!("compare: long round trip mode, +{rtt_ms:.0} ms to sshd (load average {load_before})");
    let reach = Reach::new(sshd, Some(rtt)).await;
    let url_at = |addr: SocketAddr| format!("postgres://{}:{}@{addr}/{}", pg.user(), pg.password(), pg.database());

    let ssh = reach.ssh_forward(pg.port()).await;
    let openssh_cipher = ssh.cipher().unwrap_or("?").to_owned();
    let manager = ConnectionManager::new(
        Config::new(pg.url())
            .tunnel(reach.tunnel_config(pg.port()))
            .map_pool(|p| p.max_connections(16)),
    )
    .await
    .expect("manager through the delay proxy");
    let window = manager.config().tunnel.as_ref().expect("a tunnel").channel_window;
    let standalone = SshTunnel::connect(reach.tunnel_config(pg.port()))
        .await
        .expect("tunnel through the delay proxy");
    let standalone_url = url_at(standalone.local_endpoint().tcp_addr().expect("TCP endpoint"));
    let fwd = reach.forward(&pg.url(), &[]).await;
    let openssh_url = url_at(ssh.local_addr());
    let forward_url = url_at(fwd.addr);
    // The new-connection optimisations that are off by default, for that workload only.
    let manager_fast = ConnectionManager::new(
        Config::new(pg.url())
            .tunnel(reach.tunnel_config(pg.port()).spare_channel(Some(SPARE_TTL)))
            .map_pool(|p| p.max_connections(16).connection_ids(false)),
    )
    .await
    .expect("manager with spare channels through the delay proxy");
    let fwd_fast = reach
        .forward(
            &format!("{}?sslmode=disable", pg.url()),
            &[("SSH_SPARE_CHANNEL", SPARE_TTL.as_millis().to_string())],
        )
        .await;
    let forward_fast_url = url_at(fwd_fast.addr);
    let paths: Vec<(&'static str, DatabaseConnection)> = vec![
        (OPENSSH, Database::connect(no_ping(&openssh_url, 16)).await.unwrap()),
        (TUNNEL, manager.connection().clone()),
        (
            TUNNEL_DEFAULTS,
            Database::connect(no_ping(&standalone_url, 16)).await.unwrap(),
        ),
        (FORWARD, Database::connect(no_ping(&forward_url, 16)).await.unwrap()),
    ];
    for _ in 0..3 {
        for (_, db) in &paths {
            select1(db).await;
        }
    }
    let mut results = Results::default();

    eprintln!("compare: sequential SELECT 1 x {select1_n}");
    let sizes = Sizes {
        select1: select1_n,
        chunk: 10,
        ..Sizes::from_env().0
    };
    select1_latencies(&paths, &sizes, &mut results).await;

    eprintln!("compare: bulk transfer, best of {bulk_rounds}");
    bulk_best(&paths, bulk_rounds, &mut results).await;

    eprintln!("compare: new connection + first query x {connect_rounds}");
    let mut connect: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let connect_paths = [OPENSSH, TUNNEL, TUNNEL_DEFAULTS, FORWARD, TUNNEL_FAST, FORWARD_FAST];
    for round in 0..connect_rounds {
        for i in 0..connect_paths.len() {
            let path = connect_paths[(i + round) % connect_paths.len()];
            let options = match path {
                OPENSSH => no_ping(&openssh_url, 1),
                TUNNEL | TUNNEL_FAST => {
                    let m = if path == TUNNEL { &manager } else { &manager_fast };
                    let mut o = m.connect_options();
                    o.max_connections(1);
                    o
                }
                TUNNEL_DEFAULTS => no_ping(&standalone_url, 1),
                FORWARD_FAST => no_ping(&forward_fast_url, 1),
                _ => no_ping(&forward_url, 1),
            };
            // sqlx opens the first connection inside `connect`: TCP connect to the local
            // endpoint, startup and SCRAM, then the query.
            let t = Instant::now();
            let db = Database::connect(options).await.expect("a new connection");
            select1(&db).await;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            db.close().await.expect("closing");
            connect.entry(path).or_default().push(ms);
        }
    }
    for path in connect_paths {
        results.set(
            path,
            "new_connection_first_query_ms",
            median(connect.remove(path).unwrap()),
        );
    }
    let spares_used = manager_fast.tunnel().map_or(0, |t| t.stats().spare_channels_used);

    // --- report -------------------------------------------------------------------------------
    let window_per_rtt = window as f64 / 1e6 / rtt.as_secs_f64();
    let keys: [(&str, &str, usize); 4] = [
        ("SELECT 1 p50 (ms) ↓", "select1_p50_us", 1),
        ("SELECT 1 p50 ÷ RTT ↓", "select1_p50_us", 3),
        ("bulk 52 MB (MB/s) ↑", "bulk_mbps", 1),
        ("new connection + 1st query (ms) ↓", "new_connection_first_query_ms", 1),
    ];
    let names: Vec<&str> = paths.iter().map(|(p, _)| *p).collect();
    println!();
    println!(
        "sea-orm-tunnel compare, long round trip: +{rtt_ms:.0} ms RTT to sshd through DelayProxy ({}), load \
         average before {load_before} / after {}",
        if quick { "COMPARE_QUICK" } else { "full run" },
        loadavg()
    );
    println!(
        "ssh -N -L cipher {openssh_cipher}; channel window {} KiB ÷ RTT = {window_per_rtt:.1} MB/s",
        window / 1024
    );
    println!(
        "pools: tunnel = ConnectionManager; openssh, tunnel_seaorm_defaults (SshTunnel) and forward = SeaORM \
         defaults with test_before_acquire off (sqlx's default pings before every checkout: one more round trip \
         per query)"
    );
    println!();
    print!("| {:<34} |", "workload");
    for p in &names {
        print!(" {p:>22} |");
    }
    for p in &names[1..] {
        print!(" {:>26} |", format!("{p}/openssh"));
    }
    println!();
    print!("|{:-<36}|", "");
    for _ in &names {
        print!("{:->24}|", "");
    }
    for _ in &names[1..] {
        print!("{:->28}|", "");
    }
    println!();
    let value = |path: &str, label: &str, key: &str| {
        let v = results.get(path, key)?;
        Some(match (label, key) {
            (l, "select1_p50_us") if l.contains('÷') => v / 1e3 / rtt_ms,
            (_, "select1_p50_us") => v / 1e3,
            _ => v,
        })
    };
    for (label, key, decimals) in keys {
        print!("| {label:<34} |");
        for p in &names {
            let cell = value(p, label, key).map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"));
            print!(" {cell:>22} |");
        }
        for p in &names[1..] {
            print!(" {:>26} |", fmt_ratio(value(p, label, key), value(OPENSSH, label, key)));
        }
        println!();
    }
    print!("| {:<34} |", "bulk ÷ (window ÷ RTT) ↑");
    for p in &names {
        let cell = if *p == OPENSSH {
            "-".to_owned()
        } else {
            results
                .get(p, "bulk_mbps")
                .map_or_else(|| "-".to_owned(), |v| format!("{:.2}", v / window_per_rtt))
        };
        print!(" {cell:>22} |");
    }
    println!();
    println!();
    let connect_ms = |p: &str| results.get(p, "new_connection_first_query_ms");
    println!(
        "new connection + 1st query with spare channels ({} s): tunnel with connection_ids(false) {} ms ({} of \
         ssh -L; {spares_used} of {connect_rounds} on a spare), forward with sslmode=disable in its DATABASE_URL (answers the SSLRequest \
         itself) {} ms ({} of ssh -L)",
        SPARE_TTL.as_secs(),
        connect_ms(TUNNEL_FAST).map_or("-".to_owned(), |v| format!("{v:.0}")),
        fmt_ratio(connect_ms(TUNNEL_FAST), connect_ms(OPENSSH)),
        connect_ms(FORWARD_FAST).map_or("-".to_owned(), |v| format!("{v:.0}")),
        fmt_ratio(connect_ms(FORWARD_FAST), connect_ms(OPENSSH)),
    );
    println!();
    let r = |p: &str, key: &str| ratio(&results, key, p, OPENSSH).map_or("-".to_owned(), |r| format!("{r:.2}x"));
    for p in [TUNNEL, FORWARD] {
        println!(
            "goals for {p} (not asserted): bulk {} of ssh -L (>= 4x at +50 ms) and {} of window/RTT (>= 0.80); \
             new connection + first query {} of ssh -L (<= 0.85x); sequential SELECT 1 {} x RTT (<= 1.05)",
            r(p, "bulk_mbps"),
            results
                .get(p, "bulk_mbps")
                .map_or("-".to_owned(), |v| format!("{:.2}", v / window_per_rtt)),
            r(p, "new_connection_first_query_ms"),
            results
                .get(p, "select1_p50_us")
                .map_or("-".to_owned(), |v| format!("{:.3}", v / 1e3 / rtt_ms)),
        );
    }
    for (path, db) in paths {
        if path != TUNNEL {
            db.close().await.expect("closing a pool");
        }
    }
    manager.shutdown(Duration::from_secs(2)).await;
    manager_fast.shutdown(Duration::from_secs(2)).await;
    standalone.disconnect().await;
    drop(fwd);
    drop(fwd_fast);
    drop(ssh);
    drop(reach);

    let (outside, text) = outside_clients(sshd, pg, Some(rtt), quick).await;
    println!();
    print!("{text}");

    let mut json = serde_json::Map::new();
    for (path, values) in &results.0 {
        let obj: serde_json::Map<String, Value> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(round2(*v))))
            .collect();
        json.insert((*path).to_owned(), Value::Object(obj));
    }
    json.insert("outside_clients".into(), outside);
    json.insert(
        "meta".into(),
        json!({
            "quick": quick,
            "rtt_ms": rtt_ms,
            "channel_window_bytes": window,
            "window_per_rtt_mbps": round2(window_per_rtt),
            "openssh_cipher": openssh_cipher,
            "select1_queries": select1_n,
            "bulk_rounds": bulk_rounds,
            "new_connection_rounds": connect_rounds,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "load_average_before": load_before,
            "load_average_after": loadavg(),
        }),
    );
    let out = target_dir().join(format!("compare-rtt{}.json", rtt.as_millis()));
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(json)).unwrap()).expect("write JSON");
    println!("wrote {}", out.display());
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}
