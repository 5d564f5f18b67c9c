//! Measures `sea-orm-tunnel forward` against `ssh -N -L` on this machine:
//!
//! ```text
//! cargo build --release --features cli --bin sea-orm-tunnel
//! cargo run --release --example forward_bench -- [ROUNDS] [SECONDS]
//! ```
//!
//! Starts a throwaway PostgreSQL and OpenSSH sshd (loopback), then per round runs
//! `pgbench -S -c 8 -j 2 -T SECONDS` through `forward` and through `ssh -N -L` (alternating),
//! and prints transactions per second, the client process's CPU (utime+stime from
//! `/proc/PID/stat`) per 1,000 transactions, and the CPU of sshd's session processes (the
//! bastion's share) per 1,000 transactions. Then times "new connection + first query" with
//! `psql` (its default sslmode=prefer) through both, with 50 ms added round-trip time in front
//! of sshd.
//!
//! Environment: `FORWARD_BIN` (default `target/release/sea-orm-tunnel` under
//! `CARGO_TARGET_DIR`), `FORWARD_SSLMODE` (appended to DATABASE_URL as `sslmode=...`, default
//! none, i.e. libpq's prefer), `FORWARD_ENV` (extra `NAME=VALUE,...` for forward),
//! `BENCH_CONNECT_ONLY=1` / `BENCH_PGBENCH_ONLY=1`, `BENCH_HOLD=1` (prints the endpoints and
//! waits for Enter before stopping, for profiling by hand).

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm_tunnel::testkit::{DelayProxy, OpenSshd, TempPostgres};

const CLIENTS: &str = "8";
const THREADS: &str = "2";

fn forward_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FORWARD_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let bin = target.join("release").join("sea-orm-tunnel");
    // forward runs in the test sshd's directory: a relative path would not be found from there.
    std::path::absolute(&bin).unwrap_or(bin)
}

/// utime + stime of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    process_cpu_ms(pid).expect("read /proc/PID/stat")
}

/// utime + stime of `pid`, in milliseconds; `None` once it has exited.
fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line; index 11 and 12 after the name (state is field 3).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100.0; // USER_HZ on Linux
    Some(ticks as f64 * 1000.0 / hz)
}

/// utime + stime of every sshd session process (the bastion's side of every path), in ms.
fn bastion_cpu_ms(sshd: &OpenSshd) -> f64 {
    sshd.session_pids().into_iter().filter_map(process_cpu_ms).sum()
}

struct Forward {
    child: Child,
    port: u16,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_forward(sshd: &OpenSshd, ssh_port: u16, url: &str) -> Forward {
    let mut cmd = Command::new(forward_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", sshd.dir())
        .current_dir(sshd.dir())
        .env("DATABASE_URL", url)
        .env("SSH_HOST", sshd.host())
        .env("SSH_PORT", ssh_port.to_string())
        .env("SSH_USER", sshd.user())
        .env("SSH_KEY_PATH", sshd.client_key_path())
        .env("SSH_USE_AGENT", "false")
        .env("SSH_CONFIG", "none")
        .env("SSH_HOST_KEY_POLICY", sshd.host_key_fingerprint())
        .env("POSTGRES_CONNECTION_TIMEOUT", "10000");
    if let Ok(extra) = std::env::var("FORWARD_ENV") {
        for kv in extra.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').expect("FORWARD_ENV is NAME=VALUE,...");
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .arg("forward")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start forward (build it first)");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines.next().expect("forward printed `listening on`").unwrap();
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.rsplit_once(':').unwrap().1.parse().unwrap();
        }
    };
    // Keep draining stdout so forward never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Forward { child, port }
}

/// `(tps, transactions)` of one pgbench run.
fn pgbench(pg: &TempPostgres, port: u16, seconds: u32) -> (f64, u64) {
    let out = Command::new("pgbench")
        .args(["-S", "-n", "-c", CLIENTS, "-j", THREADS, "-T", &seconds.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            pg.user(),
            &pg.database(),
        ])
        .env("PGPASSWORD", pg.password())
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tps = 0.0;
    let mut txns = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("number of transactions actually processed: ") {
            txns = rest.split('/').next().unwrap().trim().parse().unwrap();
        }
        if let Some(rest) = line.strip_prefix("tps = ") {
            tps = rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    (tps, txns)
}

/// Median wall time of `psql -c 'SELECT 1'` (a new connection and a first query), sslmode=prefer.
fn connect_time(pg: &TempPostgres, port: u16, runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let out = Command::new("psql")
                .args(["-X", "-q", "-A", "-t", "-c", "SELECT 1"])
                .arg(format!(
                    "postgresql://{}@127.0.0.1:{port}/{}?sslmode=prefer",
                    pg.user(),
                    pg.database()
                ))
                .env("PGPASSWORD", pg.password())
                .output()
                .expect("run psql");
            assert!(
                out.status.success(),
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(3, |a| a.parse().unwrap());
    let seconds: u32 = args.get(2).map_or(10, |a| a.parse().unwrap());
    let (pg, sshd) = tokio::join!(TempPostgres::start(), OpenSshd::start());
    let (pg, sshd) = (pg.unwrap(), sshd.unwrap());
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            pg.user(),
        ])
        .arg(pg.database())
        .env("PGPASSWORD", pg.password())
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut url = pg.url();
    if let Ok(mode) = std::env::var("FORWARD_SSLMODE") {
        url = format!("{url}?sslmode={mode}");
    }
    let hold = std::env::var_os("BENCH_HOLD").is_some();

    if std::env::var_os("BENCH_CONNECT_ONLY").is_none() {
        let forward = start_forward(&sshd, sshd.port(), &url);
        let ssh = sshd.ssh_forward("127.0.0.1", pg.port()).await.expect("ssh -N -L");
        let ssh_port = ssh.local_port();
        if hold {
            println!(
                "forward pid {} port {}; ssh pid {} port {ssh_port}; pg port {} user {} db {} password {}",
                forward.child.id(),
                forward.port,
                ssh.pid(),
                pg.port(),
                pg.user(),
                pg.database(),
                pg.password()
            );
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        // Warm-up: sessions and channels opened, caches hot.
        pgbench(&pg, forward.port, 2);
        pgbench(&pg, ssh_port, 2);
        let mut sum = [(0.0, 0.0, 0.0); 2];
        for round in 0..rounds {
            for (i, (name, pid, port)) in [
                ("forward", forward.child.id(), forward.port),
                ("ssh -L", ssh.pid(), ssh_port),
            ]
            .into_iter()
            .enumerate()
            {
                let before = cpu_ms(pid);
                let bastion_before = bastion_cpu_ms(&sshd);
                let (tps, txns) = pgbench(&pg, port, seconds);
                let used = cpu_ms(pid) - before;
                let bastion = bastion_cpu_ms(&sshd) - bastion_before;
                let per_k = used * 1000.0 / txns as f64;
                let bastion_per_k = bastion * 1000.0 / txns as f64;
                println!(
                    "round {round} {name:8} tps {tps:8.1}  txns {txns:7}  cpu {used:7.0} ms  cpu/1000 txn {per_k:6.2} ms  \
                     sshd cpu/1000 txn {bastion_per_k:6.2} ms"
                );
                sum[i].0 += tps;
                sum[i].1 += per_k;
                sum[i].2 += bastion_per_k;
            }
        }
        let n = rounds as f64;
        let (ft, fc, fb) = (sum[0].0 / n, sum[0].1 / n, sum[0].2 / n);
        let (st, sc, sb) = (sum[1].0 / n, sum[1].1 / n, sum[1].2 / n);
        println!(
            "mean forward tps {ft:.1} cpu/1000 {fc:.2} ms sshd {fb:.2} ms | ssh -L tps {st:.1} cpu/1000 {sc:.2} ms sshd {sb:.2} ms"
        );
        println!(
            "ratios: tps forward/ssh {:.3}, cpu forward/ssh {:.3}, sshd cpu forward/ssh {:.3}",
            ft / st,
            fc / sc,
            fb / sb
        );
        drop(ssh);
    }

    if std::env::var_os("BENCH_PGBENCH_ONLY").is_none() {
        let far = DelayProxy::start(sshd.addr(), Duration::from_millis(50)).await.unwrap();
        let forward = start_forward(&sshd, far.addr().port(), &url);
        sshd.trust_host_key_at(far.addr())
            .expect("known_hosts line for the proxy");
        let ssh = sshd
            .ssh_forward_via(far.addr(), "127.0.0.1", pg.port(), &[])
            .await
            .expect("ssh -N -L through the proxy");
        let ssh_port = ssh.local_port();
        // The first connection opens forward's session (already up) and warms both.
        connect_time(&pg, forward.port, 1);
        connect_time(&pg, ssh_port, 1);
        let f = connect_time(&pg, forward.port, 9);
        let s = connect_time(&pg, ssh_port, 9);
        println!(
            "connect + SELECT 1 at +50 ms RTT (median of 9): forward {:.1} ms, ssh -L {:.1} ms, ratio {:.3}",
            f.as_secs_f64() * 1000.0,
            s.as_secs_f64() * 1000.0,
            f.as_secs_f64() / s.as_secs_f64()
        );
        drop(ssh);
    }
}
