//! `sea-orm-tunnel forward` as a production sidecar, against real sshd and PostgreSQL: its own
//! session defaults (pgbench with more clients than the pool profile's cap), `--max-connections`
//! refusals as PostgreSQL errors psql prints, the `--http` probes across an sshd outage, and the
//! SIGTERM drain.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};

use super::support::{env_block, servers};

/// Generous liveness bound for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running `forward`; killed when dropped unless it exited.
pub(super) struct Forward {
    child: Option<Child>,
    /// `host:port` of the local endpoint.
    addr: String,
    /// `host:port` of `--http`, when given.
    http: Option<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Its stdout after the `listening on` line.
    lines: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Forward {
    /// Starts `forward` configured for `sshd` + `pg` through the environment (plus `env`), with
    /// `args`, and waits for its `listening on` line.
    pub(super) fn start(sshd: &OpenSshd, pg: &TempPostgres, args: &[&str], env: &[(&str, &str)]) -> Forward {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sea-orm-tunnel"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", sshd.dir())
            .current_dir(sshd.dir())
            .envs(env_block(sshd, pg))
            .env("SSH_KNOWN_HOSTS", sshd.known_hosts_path())
            .env("SSH_HOST_KEY_POLICY", "strict")
            .env("POSTGRES_CONNECTION_TIMEOUT", "10000")
            .envs(env.iter().copied())
            .arg("forward")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start forward");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut all);
            all
        });
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Read to the end even when nobody listens any more: a closed pipe would make
            // forward's next println fail.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut forward = Forward {
            child: Some(child),
            addr: String::new(),
            http: None,
            stderr: Some(stderr),
            lines: std::sync::Mutex::new(rx),
        };
        loop {
            let next = forward.lines.lock().unwrap().recv_timeout(DEADLINE);
            let line = match next {
                Ok(line) => line,
                Err(_) => {
                    let (_, stderr) = forward.kill();
                    panic!("forward printed no `listening on` line; stderr:\n{stderr}");
                }
            };
            if let Some(addr) = line.strip_prefix("http on ") {
                forward.http = Some(addr.to_owned());
            }
            if let Some(addr) = line.strip_prefix("listening on ") {
                forward.addr = addr.to_owned();
                return forward;
            }
        }
    }

    /// The stdout lines after `listening on`, up to and with the first that starts with `last`.
    pub(super) fn lines_through(&mut self, last: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let next = self.lines.lock().unwrap().recv_timeout(DEADLINE);
            match next {
                Ok(line) => {
                    let done = line.starts_with(last);
                    lines.push(line);
                    if done {
                        return lines;
                    }
                }
                Err(_) => {
                    let (_, stderr) = self.kill();
                    panic!("forward printed no {last:?} line after {lines:?}; stderr:\n{stderr}");
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn host_port(&self) -> (String, String) {
        let (host, port) = self.addr.rsplit_once(':').unwrap();
        (host.to_owned(), port.to_owned())
    }

    pub(super) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit (bounded); returns the status and everything on stderr.
    pub(super) fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("forward did not exit within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.stderr.take().unwrap().join().unwrap())
    }

    pub(super) fn kill(&mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.child.take().map(|mut c| {
            let _ = c.kill();
            c.wait().unwrap()
        });
        (
            status,
            self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default(),
        )
    }

    /// `GET path` on `--http`: the status code and body.
    fn get(&self, path: &str) -> (u16, String) {
        let addr = self.http.as_deref().expect("started with --http");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to --http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).expect("an HTTP response");
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// Polls `path` until it answers `code`.
    fn wait_for(&self, path: &str, code: u16) -> String {
        let started = Instant::now();
        loop {
            let (got, body) = self.get(path);
            if got == code {
                return body;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{path} still answers {got} ({body:?}), not {code}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL client program (psql, pgbench) for `pg`'s user and password.
fn pg_client(program: &str, pg: &TempPostgres) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PGPASSWORD", pg.password())
        .env("PGUSER", pg.user())
        .env("PGDATABASE", pg.database())
        .env("PGCONNECT_TIMEOUT", "20")
        .stdin(Stdio::null());
    cmd
}

/// `psql -c sql` through `forward`.
fn psql(forward: &Forward, pg: &TempPostgres, sql: &str) -> Command {
    let (host, port) = forward.host_port();
    let mut cmd = pg_client("psql", pg);
    cmd.args([
        "-h",
        &host,
        "-p",
        &port,
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    cmd
}

fn output(mut cmd: Command) -> Output {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("the client runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_serves_pgbench_100_clients_with_default_settings() {
    let (pg, sshd) = servers().await;
    // pgbench's tables, made directly on the server.
    let mut init = pg_client("pgbench", &pg);
    init.args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", &pg.port().to_string()]);
    let out = tokio::task::spawn_blocking(move || output(init)).await.unwrap();
    assert!(out.status.success(), "pgbench -i: {}", text(&out));

    // Default settings: the development profile has 10 channels per session (and capped the
    // pool at 4 sessions = 40); forward opens sessions as clients need them.
    let mut forward = Forward::start(&sshd, &pg, &[], &[]);
    let clients = 100;
    let transactions = 10;
    let (host, port) = forward.host_port();
    let run = |host: String, port: String| {
        let mut bench = pg_client("pgbench", &pg);
        bench.args([
            "-n",
            "-S",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &transactions.to_string(),
            "-h",
            &host,
            "-p",
            &port,
        ]);
        bench
    };
    let bench = run(host, port);
    let out = tokio::task::spawn_blocking(move || output(bench)).await.unwrap();
    let report = text(&out);
    if !out.status.success() {
        let (_, stderr) = forward.kill();
        panic!("pgbench through forward: {report}\nforward:\n{stderr}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains(&format!("number of clients: {clients}")), "{report}");
    let all = clients * transactions;
    assert!(
        stdout.contains(&format!("number of transactions actually processed: {all}/{all}")),
        "{report}"
    );
    // The same run through OpenSSH `ssh -N -L`, for comparison (shown with --nocapture).
    let ssh = sshd.ssh_forward("127.0.0.1", pg.port()).await.expect("ssh -N -L");
    let bench = run("127.0.0.1".to_owned(), ssh.local_port().to_string());
    let openssh = tokio::task::spawn_blocking(move || output(bench)).await.unwrap();
    assert!(
        openssh.status.success(),
        "pgbench through ssh -N -L: {}",
        text(&openssh)
    );
    let tps = |out: &str| out.lines().find(|l| l.starts_with("tps")).unwrap_or("").to_owned();
    println!(
        "pgbench -S -c {clients} -t {transactions}: forward {} | ssh -N -L {}",
        tps(&stdout),
        tps(&String::from_utf8_lossy(&openssh.stdout))
    );
    forward.signal("TERM");
    let (status, stderr) = tokio::task::spawn_blocking(move || forward.wait()).await.unwrap();
    assert!(status.success(), "exit {status:?}\n{stderr}");
    assert!(stderr.contains("SSH sessions opened as needed"), "{stderr}");
    // More than the old cap of 4 sessions were opened.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("additional SSH session") && l.contains("(10 open)")),
        "{stderr}"
    );
    assert!(!stderr.contains("a client was refused"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refusal_is_a_postgres_error_psql_prints() {
    let (pg, sshd) = servers().await;
    let forward = Forward::start(&sshd, &pg, &["--max-connections", "2"], &[]);
    // Two clients hold the two places (connected, nothing sent yet).
    let held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&forward.addr).unwrap())
        .collect();
    // Let the tunnel accept both before the third.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cmd = psql(&forward, &pg, "SELECT 1");
    let out = tokio::task::spawn_blocking(move || output(cmd)).await.unwrap();
    let report = text(&out);
    println!("{report}");
    let mut forward = forward;
    if out.status.code() != Some(2) {
        let (_, stderr) = forward.kill();
        panic!("{report}\nforward:\n{stderr}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !(stderr.contains("too many connections") && stderr.contains("limit of 2 local connections")) {
        let (status, stderr) = forward.kill();
        panic!("{report}\nforward ({status:?}):\n{stderr}");
    }

    // A freed place serves the next client.
    drop(held);
    let started = Instant::now();
    loop {
        let cmd = psql(&forward, &pg, "SELECT 40 + 2");
        let out = tokio::task::spawn_blocking(move || output(cmd)).await.unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "never served again: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refusal is in forward's log (summed once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    forward.signal("TERM");
    let (_, stderr) = tokio::task::spawn_blocking(move || forward.wait()).await.unwrap();
    assert!(
        stderr.contains("local connections refused (--max-connections 2)"),
        "{stderr}"
    );
    // With the library's own warning.
    assert!(
        stderr.contains("warning: local connection refused: max_local_connections reached max=2"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probes_follow_the_tunnel_across_an_sshd_outage() {
    let (pg, sshd) = servers().await;
    let forward = Forward::start(
        &sshd,
        &pg,
        &["--http", "127.0.0.1:0"],
        &[
            ("SSH_KEEPALIVE_INTERVAL", "500"),
            ("SSH_KEEPALIVE_MAX", "2"),
            ("SSH_RETRY_DELAY", "100"),
            ("SSH_MAX_RETRIES", "0"),
        ],
    );
    let forward = std::sync::Arc::new(forward);
    let f = forward.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(f.get("/startup").0, 200);
        assert_eq!(f.get("/liveness").0, 200);
        assert_eq!(f.get("/readiness").0, 200);
        assert_eq!(f.get("/nothing-here").0, 404);
        let (code, metrics) = f.get("/metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("sea_orm_tunnel_forward_ready 1"), "{metrics}");
        assert!(metrics.contains("ssh_tunnel_up"), "{metrics}");
    })
    .await
    .unwrap();

    sshd.stop().await.unwrap();
    let f = forward.clone();
    tokio::task::spawn_blocking(move || {
        let body = f.wait_for("/readiness", 503);
        assert!(body.contains("tunnel down"), "{body}");
        // Down is not dead: liveness stays 200, startup stays done.
        assert_eq!(f.get("/liveness").0, 200);
        assert_eq!(f.get("/startup").0, 200);
        let (_, metrics) = f.get("/metrics");
        assert!(metrics.contains("sea_orm_tunnel_forward_ready 0"), "{metrics}");
    })
    .await
    .unwrap();

    sshd.start_again().await.unwrap();
    let f = forward.clone();
    tokio::task::spawn_blocking(move || {
        f.wait_for("/readiness", 200);
        assert_eq!(f.get("/liveness").0, 200);
    })
    .await
    .unwrap();
    // And the tunnel serves again.
    let cmd = psql(&forward, &pg, "SELECT 1");
    let out = tokio::task::spawn_blocking(move || output(cmd)).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_query_in_flight_then_exits_0() {
    let (pg, sshd) = servers().await;
    let forward = Forward::start(
        &sshd,
        &pg,
        &["--http", "127.0.0.1:0", "--max-sigterm-delay", "20s"],
        &[],
    );
    let forward = std::sync::Arc::new(std::sync::Mutex::new(forward));
    let f = forward.clone();
    let pg_ = std::sync::Arc::new(pg);
    let pg = pg_.clone();
    tokio::task::spawn_blocking(move || {
        let mut slow = {
            let forward = f.lock().unwrap();
            psql(&forward, &pg, "SELECT 'slept' FROM pg_sleep(2)")
        };
        let slow = slow.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // Wait until the query's connection went through the tunnel.
        {
            let forward = f.lock().unwrap();
            let started = Instant::now();
            while !forward
                .get("/metrics")
                .1
                .contains("sea_orm_tunnel_forward_connections_total 1")
            {
                assert!(started.elapsed() < DEADLINE, "psql never connected");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
            forward.signal("TERM");
            // Not ready at once, but still serving: a new client during the drain works.
            forward.wait_for("/readiness", 503);
            let late = output(psql(&forward, &pg, "SELECT 'late'"));
            assert!(late.status.success(), "a client during the drain: {}", text(&late));
            assert_eq!(String::from_utf8_lossy(&late.stdout).trim(), "late");
        }
        let slow = slow.wait_with_output().unwrap();
        assert!(slow.status.success(), "the query in flight: {}", text(&slow));
        assert_eq!(String::from_utf8_lossy(&slow.stdout).trim(), "slept");
        let (status, stderr) = f.lock().unwrap().wait();
        assert!(status.success(), "exit {status:?}\n{stderr}");
        assert!(stderr.contains("SIGTERM: stopping; readiness answers 503"), "{stderr}");
        assert!(stderr.contains("drained"), "{stderr}");
    })
    .await
    .unwrap();
    drop(sshd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_beyond_the_tunnels_capacity_gets_a_postgres_error_too() {
    let (pg, sshd) = servers().await;
    // One session of one channel: the second client waits for the connection timeout, then is
    // told why instead of being closed bare. Both forward paths: the startup read by the tunnel
    // (it holds TLS, sslmode=prefer) and bytes passed untouched (sslmode=disable).
    let url = pg.url();
    let plain = format!("{url}{}sslmode=disable", if url.contains('?') { '&' } else { '?' });
    for database_url in [url, plain] {
        let forward = Forward::start(
            &sshd,
            &pg,
            &["--max-sessions", "1"],
            &[
                ("SSH_MAX_CHANNELS", "1"),
                ("POSTGRES_CONNECTION_TIMEOUT", "1500"),
                ("DATABASE_URL", &database_url),
            ],
        );
        let held = std::net::TcpStream::connect(&forward.addr).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cmd = psql(&forward, &pg, "SELECT 1");
        let out = tokio::task::spawn_blocking(move || output(cmd)).await.unwrap();
        let report = text(&out);
        println!("{report}");
        assert_eq!(out.status.code(), Some(2), "{report}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no free SSH channel"), "{report}");
        assert!(stderr.contains("max_channels 1 x max_sessions 1"), "{report}");
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_win_over_the_environment_which_wins_over_dotenv_files_and_json_logs() {
    let (pg, sshd) = servers().await;
    std::fs::write(
        sshd.dir().join(".env"),
        "FORWARD_MAX_CONNECTIONS=1\nFORWARD_JSON_LOGS=true\nFORWARD_MAX_SIGTERM_DELAY=7s\n",
    )
    .unwrap();
    std::fs::write(sshd.dir().join(".env.local"), "FORWARD_MAX_CONNECTIONS=4\n").unwrap();
    let stderr_of = |args: &[&str], env: &[(&str, &str)]| {
        let mut forward = Forward::start(&sshd, &pg, args, env);
        forward.signal("TERM");
        let (status, stderr) = forward.wait();
        assert!(status.success(), "exit {status:?}\n{stderr}");
        stderr
    };
    // .env.local wins over .env; the rest comes from .env, JSON logs included.
    let stderr = stderr_of(&[], &[]);
    assert!(stderr.contains("at most 4 clients"), "{stderr}");
    assert!(stderr.contains("up to 7s"), "{stderr}");
    for line in stderr.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["message"].is_string() && value["level"].is_string(), "{line}");
        assert!(value["time"].as_f64().unwrap() > 1.0e9, "{line}");
    }
    assert!(stderr.contains(r#""message":"tunnel connected"#), "{stderr}");
    // The environment wins over both files.
    let stderr = stderr_of(&[], &[("FORWARD_MAX_CONNECTIONS", "3"), ("FORWARD_JSON_LOGS", "false")]);
    assert!(stderr.contains("at most 3 clients"), "{stderr}");
    assert!(!stderr.trim_start().starts_with('{'), "{stderr}");
    // A flag wins over the environment.
    let stderr = stderr_of(
        &["--max-connections", "2", "--max-sigterm-delay", "1s"],
        &[("FORWARD_MAX_CONNECTIONS", "3")],
    );
    assert!(stderr.contains("at most 2 clients"), "{stderr}");
    assert!(stderr.contains("up to 1s"), "{stderr}");
}

/// `psql -c sql` with a libpq connection string or URL.
fn psql_conninfo(pg: &TempPostgres, conninfo: &str, sql: &str) -> Command {
    let mut cmd = pg_client("psql", pg);
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, conninfo]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_gets_an_endpoint_per_server_and_libpq_follows_the_promoted_standby() {
    let ((primary, standby), sshd) = tokio::join!(super::multihost::primary_and_standby(), async {
        OpenSshd::start().await.unwrap()
    });
    // The standby listed first: read-write must skip it.
    let url = super::multihost::multi_url(
        &primary,
        &[standby.port(), primary.port()],
        "target_session_attrs=read-write",
    );
    let mut forward = Forward::start(&sshd, &primary, &[], &[("DATABASE_URL", &url)]);
    let lines = forward.lines_through("psql: ");
    let endpoints: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("endpoint ")?.split_once(" for "))
        .collect();
    let names = [standby.port(), primary.port()].map(|p| format!("127.0.0.1:{p}"));
    assert_eq!(endpoints.len(), 2, "{lines:?}");
    assert_eq!(
        endpoints[0].0, forward.addr,
        "the first server has the main endpoint: {lines:?}"
    );
    assert_eq!([endpoints[0].1, endpoints[1].1], [names[0].as_str(), names[1].as_str()]);
    let printed = lines
        .iter()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap_or_else(|| panic!("no DATABASE_URL line in {lines:?}"));
    assert_eq!(
        printed,
        format!(
            // The tunnel holds TLS (sslmode=prefer): the private local side is plaintext.
            "postgres://{}:***@{},{}/postgres?sslmode=disable&target_session_attrs=read-write",
            primary.user(),
            endpoints[0].0,
            endpoints[1].0
        )
    );
    let ports: Vec<&str> = endpoints.iter().map(|(e, _)| e.rsplit_once(':').unwrap().1).collect();
    let conninfo = lines
        .iter()
        .find_map(|l| l.strip_prefix("psql: psql \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no psql line in {lines:?}"))
        .to_owned();
    assert_eq!(
        conninfo,
        format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname=postgres sslmode=disable target_session_attrs=read-write",
            ports[0],
            ports[1],
            primary.user()
        )
    );
    let full_url = printed.replace(":***@", &format!(":{}@", primary.password()));
    let server = |conninfo: String| {
        let cmd = psql_conninfo(
            &primary,
            &conninfo,
            "SELECT pg_is_in_recovery()::text || ' ' || current_setting('port')",
        );
        async move {
            let out = tokio::task::spawn_blocking(move || output(cmd)).await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                text(&out),
            )
        }
    };
    // libpq skips the standby behind the first endpoint and takes the primary behind the second,
    // from the printed URL and from the psql line alike.
    let on_primary = format!("false {}", primary.port());
    for how in [full_url.clone(), conninfo.clone()] {
        let (ok, got, report) = server(how).await;
        assert!(ok && got == on_primary, "{report}");
    }

    // The same through private Unix sockets: one 0700 directory per server, listed as libpq's
    // host and port lists.
    let mut unix = Forward::start(&sshd, &primary, &["--unix"], &[("DATABASE_URL", &url)]);
    let lines = unix.lines_through("psql: ");
    let unix_conninfo = lines
        .iter()
        .find_map(|l| l.strip_prefix("psql: psql \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no psql line in {lines:?}"))
        .to_owned();
    let dirs = unix_conninfo
        .strip_prefix("host=")
        .and_then(|rest| rest.split_once(' '))
        .map(|(dirs, _)| dirs.split(',').map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(
        dirs.len() == 2 && dirs.iter().all(|d| d.starts_with('/')),
        "{unix_conninfo}"
    );
    assert!(
        unix_conninfo.contains(&format!("port={},{}", standby.port(), primary.port()))
            && unix_conninfo.ends_with("target_session_attrs=read-write"),
        "{unix_conninfo}"
    );
    let unix_url = lines
        .iter()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap_or_else(|| panic!("no DATABASE_URL line in {lines:?}"))
        .replace(":***@", &format!(":{}@", primary.password()));
    for how in [unix_url, unix_conninfo] {
        let (ok, got, report) = server(how).await;
        assert!(ok && got == on_primary, "{report}");
    }
    drop(unix);

    // The failover: the primary stops, the standby is promoted. The same URL now reaches it; the
    // dead server's endpoint fails fast enough for libpq to move on when it is listed first.
    primary.stop().await.unwrap();
    standby.promote().await.unwrap();
    let on_promoted = format!("false {}", standby.port());
    let reversed = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname=postgres sslmode=disable target_session_attrs=read-write",
        ports[1],
        ports[0],
        primary.user()
    );
    let started = Instant::now();
    for how in [full_url, reversed] {
        loop {
            let (ok, got, report) = server(how.clone()).await;
            if ok && got == on_promoted {
                break;
            }
            if started.elapsed() > DEADLINE {
                let (_, stderr) = forward.kill();
                panic!("never reached the promoted standby: {report}\nforward:\n{stderr}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    forward.signal("TERM");
    let (status, stderr) = tokio::task::spawn_blocking(move || forward.wait()).await.unwrap();
    assert!(status.success(), "exit {status:?}\n{stderr}");
    assert!(!stderr.contains(primary.password()), "no secret in {stderr}");

    // --max-connections counts the clients of every endpoint together: one held on the first
    // endpoint leaves none for the second.
    let mut forward = Forward::start(&sshd, &primary, &["--max-connections", "1"], &[("DATABASE_URL", &url)]);
    let lines = forward.lines_through("psql: ");
    let second = lines
        .iter()
        .filter_map(|l| l.strip_prefix("endpoint ")?.split_once(" for "))
        .nth(1)
        .map(|(e, _)| e.to_owned())
        .unwrap_or_else(|| panic!("two endpoints in {lines:?}"));
    let _held = std::net::TcpStream::connect(&forward.addr).unwrap();
    let (host, port) = second.rsplit_once(':').unwrap();
    // Until forward has accepted the held connection, the second may still get through.
    let started = Instant::now();
    loop {
        let (ok, _, report) = server(format!("host={host} port={port} sslmode=disable")).await;
        if !ok && report.contains("too many connections") {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the second endpoint was not refused: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
