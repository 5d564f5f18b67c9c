//! Soak: a `ConnectionManager` through real sshd to real PostgreSQL under steady load for
//! `SOAK_SECONDS` (default 60), with forwarded channels churning (a short pool `max_lifetime`, and
//! connections opened and closed straight through the tunnel's endpoint). Memory must plateau,
//! and once the manager is shut down the file descriptors and tokio tasks must return to their
//! baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database};
use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::testkit::fast_config;

use super::support::*;

/// Concurrent query loops on the pool.
const WORKERS: usize = 6;
/// File descriptors and tasks may sit this much above the baseline after shutdown (a lazily
/// opened file of the runtime or the allocator, a task between its last poll and its drop).
const FD_SLACK: usize = 2;
const TASK_SLACK: usize = 2;
/// How long the resources get to come back after the shutdown.
const SETTLE: Duration = Duration::from_secs(10);

fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(60);
    Duration::from_secs(secs.max(8))
}

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

fn median(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    tasks: usize,
}

fn sample() -> Sample {
    Sample {
        rss_kib: rss_kib(),
        fds: open_fds(),
        tasks: alive_tasks(),
    }
}

async fn manager(servers: &Servers) -> ConnectionManager {
    let tunnel = servers
        .sshd
        .tunnel_config("127.0.0.1", servers.pg.port())
        .connect_timeout(Duration::from_secs(10))
        .map_reconnect(|r| r.initial_delay(Duration::from_millis(100)).max_retries(0));
    let config = fast_config(servers.pg.url(), "soak")
        .map_pool(|p| {
            // Every pooled connection is replaced every few seconds: its channel closes and a
            // new one opens.
            p.max_connections(4)
                .min_connections(2)
                .max_lifetime(Duration::from_secs(3))
                .idle_timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_secs(10))
        })
        .tunnel(tunnel)
        .recovery(BackoffPolicy::new(Duration::from_millis(50)).max_retries(4));
    ConnectionManager::new(config).await.expect("manager starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_and_channel_churn_do_not_leak() {
    // Counts this process's memory and file descriptors: no other test may share it.
    if run_alone(module_path!(), "steady_load_and_channel_churn_do_not_leak") {
        return;
    }
    let duration = soak_duration();
    let servers = Servers::start().await;
    // The baseline: servers up, no manager, no tunnel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = sample();

    let manager = manager(&servers).await;
    let tunnel = manager.tunnel().expect("a tunnel").clone();
    let direct_url = url_via(&tunnel, &servers.pg);
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    let mut load = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let db = manager.connection().clone();
        let (stop, queries, errors) = (stop.clone(), queries.clone(), errors.clone());
        load.spawn(async move {
            let mut n = 0i32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                // A result of a few KiB now and then, so copies of different sizes run.
                let sql = if n % 20 == 0 {
                    "SELECT repeat('x', 8000) AS v".to_owned()
                } else {
                    format!("SELECT {} AS v", worker as i32 * 1000 + n % 1000)
                };
                match db
                    .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql))
                    .await
                {
                    Ok(Some(_)) => {
                        queries.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    // Connections opened and closed straight through the endpoint: one channel each.
    {
        let (stop, churned, errors) = (stop.clone(), churned.clone(), errors.clone());
        load.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match Database::connect(direct_url.as_str()).await {
                    Ok(db) => {
                        if select_one(&db).await.is_ok() {
                            churned.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = db.close().await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    let started = Instant::now();
    let interval = duration / 60;
    let mut samples: Vec<(Duration, Sample)> = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(interval).await;
        samples.push((started.elapsed(), sample()));
    }
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let opened = tunnel.stats();
    drop(tunnel);
    let report = manager.shutdown(Duration::from_secs(5)).await;
    drop(manager);

    // Back to the baseline within SETTLE.
    let settle_started = Instant::now();
    let after = loop {
        let now = sample();
        if (now.fds <= baseline.fds + FD_SLACK && now.tasks <= baseline.tasks + TASK_SLACK)
            || settle_started.elapsed() > SETTLE
        {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let quarter = samples.len() / 4;
    let rss: Vec<u64> = samples.iter().map(|(_, s)| s.rss_kib).collect();
    let (q2, q4) = (median(&rss[quarter..2 * quarter]), median(&rss[3 * quarter..]));
    let fds: Vec<u64> = samples.iter().map(|(_, s)| s.fds as u64).collect();
    let tasks: Vec<u64> = samples.iter().map(|(_, s)| s.tasks as u64).collect();
    let (queries, churned, errors) = (
        queries.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    );
    println!(
        "soak {duration:?}: {queries} pooled queries, {churned} connections through the endpoint, {errors} errors; \
         {} forwarded connections in all; {} samples",
        opened.connections_total,
        samples.len()
    );
    println!(
        "RSS KiB: baseline {}, quarter medians {} / {q2} / {} / {q4}, max {}",
        baseline.rss_kib,
        median(&rss[..quarter]),
        median(&rss[2 * quarter..3 * quarter]),
        rss.iter().max().unwrap()
    );
    println!(
        "fds: baseline {}, under load median {} max {}, after shutdown {}; tasks: baseline {}, under load median {} max {}, after shutdown {}",
        baseline.fds,
        median(&fds),
        fds.iter().max().unwrap(),
        after.fds,
        baseline.tasks,
        median(&tasks),
        tasks.iter().max().unwrap(),
        after.tasks
    );
    println!("shutdown: {report:?}");

    assert!(
        queries > 100 && churned > 10,
        "the load ran: {queries} queries, {churned} churned connections"
    );
    assert!(
        errors * 100 <= queries + churned,
        "errors under steady load: {errors} of {}",
        queries + churned
    );
    assert!(
        opened.connections_total > churned,
        "channels churned: {} forwarded connections",
        opened.connections_total
    );
    assert!(
        q4 * 100 <= q2 * 105,
        "RSS grew under steady load: second quarter median {q2} KiB, last quarter {q4} KiB"
    );
    assert!(
        after.fds <= baseline.fds + FD_SLACK,
        "file descriptors leaked: baseline {}, after shutdown {}",
        baseline.fds,
        after.fds
    );
    assert!(
        after.tasks <= baseline.tasks + TASK_SLACK,
        "tokio tasks leaked: baseline {}, after shutdown {}",
        baseline.tasks,
        after.tasks
    );
}
