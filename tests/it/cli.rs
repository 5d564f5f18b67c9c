//! The `sea-orm-tunnel` binary against real servers: OpenSSH `sshd` and PostgreSQL from the
//! test kit. `check` diagnoses, `forward` holds a tunnel other clients use, SIGTERM stops it.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sea_orm::{ConnectionTrait as _, Database};
use sea_orm_tunnel::config::Config;
use sea_orm_tunnel::testkit::{KeyKind, OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::diagnose::{Outcome, Route, StepKind, diagnose, diagnose_with};

use super::support::{env_block, servers};

/// Generous liveness bound for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sea-orm-tunnel"))
}

/// The environment that configures `sshd` + `pg`: what users set.
fn settings(sshd: &OpenSshd, pg: &TempPostgres, known_hosts: &Path) -> Vec<(&'static str, String)> {
    let mut vars: Vec<(&'static str, String)> = env_block(sshd, pg)
        .into_iter()
        .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
        .collect();
    vars.extend([
        ("SSH_KNOWN_HOSTS", known_hosts.display().to_string()),
        ("SSH_HOST_KEY_POLICY", "strict".to_owned()),
        ("POSTGRES_CONNECTION_TIMEOUT", "10000".to_owned()),
    ]);
    vars
}

/// The binary with an empty environment (only `PATH`, and `HOME` = `home`), in `home`, which
/// has no `.env` files.
fn isolated(home: &Path) -> Command {
    let mut cmd = binary();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .current_dir(home)
        .stdin(Stdio::null());
    cmd
}

/// The binary configured for `sshd` + `pg` through the environment only (the way users run it),
/// in a directory without `.env` files.
fn configured(sshd: &OpenSshd, pg: &TempPostgres, known_hosts: &Path) -> Command {
    let mut cmd = isolated(sshd.dir());
    cmd.envs(settings(sshd, pg, known_hosts));
    cmd
}

/// The same configuration as [`configured`], read by the library.
fn config_for(sshd: &OpenSshd, pg: &TempPostgres, known_hosts: &Path) -> Config {
    let vars: HashMap<_, _> = settings(sshd, pg, known_hosts).into_iter().collect();
    Config::from_env_with(|name| vars.get(name).cloned()).expect("valid configuration")
}

/// `known_hosts` recording another key for `sshd`: what a man in the middle looks like.
async fn wrong_known_hosts(sshd: &OpenSshd) -> PathBuf {
    let other = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut fields = other_pub.split_whitespace();
    let (kind, blob) = (fields.next().unwrap(), fields.next().unwrap());
    let known_hosts = sshd.dir().join("wrong_known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{} {kind} {blob}\n", sshd.port())).unwrap();
    known_hosts
}

/// Runs a command to completion, bounded by [`DEADLINE`].
fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sea-orm-tunnel");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait for sea-orm-tunnel"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("sea-orm-tunnel did not finish within {DEADLINE:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_walks_every_step_and_succeeds() {
    let (pg, sshd) = servers().await;
    let mut cmd = configured(&sshd, &pg, &sshd.known_hosts_path());
    cmd.arg("check");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Shown with --nocapture: what a user sees.
    println!("{stdout}");
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[1/8] TCP reach",
        "[2/8] SSH handshake",
        "[3/8] host key",
        "[4/8] authentication",
        "[5/8] channel open",
        "[6/8] TLS",
        "[7/8] database login",
        "[8/8] SELECT 1",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(step))
            .unwrap_or_else(|| panic!("no line for {step}:\n{stdout}"));
        assert!(line.contains(" ok "), "{step} not ok: {line}");
    }
    // Timed steps print their time.
    assert!(stdout.lines().filter(|l| l.contains(" ms ")).count() >= 5, "{stdout}");
    assert!(
        stdout.contains(&sshd.host_key_fingerprint()),
        "server key shown:\n{stdout}"
    );
    assert!(stdout.contains("verdict: OK"), "{stdout}");
    assert!(!stdout.contains(pg.password()), "the password leaked:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_changed_host_key_fails_at_the_host_key_step() {
    let (pg, sshd) = servers().await;
    let known_hosts = wrong_known_hosts(&sshd).await;

    let mut cmd = configured(&sshd, &pg, &known_hosts);
    cmd.arg("check");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(13), "exit code names step 3\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("[3/8] host key"))
        .expect("host key line");
    assert!(line.contains("FAILED"), "{line}");
    assert!(line.contains("CHANGED"), "{line}");
    assert!(stdout.contains("verdict: FAILED at step 3 (host key)"), "{stdout}");
    // The steps before passed; nothing after was attempted.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("[2/8] SSH handshake") && l.contains(" ok ")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("[4/8] authentication") && l.contains("not run")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_serves_clients_and_stops_cleanly_on_sigterm() {
    let (pg, sshd) = servers().await;
    let mut cmd = configured(&sshd, &pg, &sshd.known_hosts_path());
    cmd.arg("forward").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start forward");
    let pid = child.id();
    // Kill it if an assertion fails before SIGTERM.
    struct KillOnDrop(u32, bool);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if !self.1 {
                let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
            }
        }
    }
    let mut guard = KillOnDrop(pid, false);

    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let mut lines = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(DEADLINE).expect("forward prints `listening on ADDR`");
        lines.push(line.clone());
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    let url_line = rx.recv_timeout(DEADLINE).expect("a DATABASE_URL line");
    assert!(url_line.starts_with("DATABASE_URL=postgres://"), "{url_line}");
    assert!(url_line.contains(&addr), "{url_line}");
    assert!(!url_line.contains(pg.password()), "password redacted: {url_line}");

    // Any client can use the address: here SeaORM, twice, on two connections.
    let url = format!("postgres://{}:{}@{addr}/{}", pg.user(), pg.password(), pg.database());
    let db = Database::connect(url.as_str()).await.expect("connect through forward");
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_setting('port')::int AS port",
        ))
        .await
        .unwrap()
        .unwrap();
    let port: i32 = row.try_get("", "port").unwrap();
    assert_eq!(port, i32::from(pg.port()), "reached the test PostgreSQL");
    let db2 = Database::connect(url.as_str()).await.unwrap();
    db2.execute_unprepared("SELECT 1").await.unwrap();
    db.close().await.unwrap();
    db2.close().await.unwrap();

    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let (tx_exit, rx_exit) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx_exit.send(child.wait());
    });
    let exit = rx_exit
        .recv_timeout(DEADLINE)
        .expect("forward exits after SIGTERM")
        .unwrap();
    guard.1 = true;
    reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(exit.success(), "exit {exit:?}\nstderr:\n{stderr}");
    assert!(stderr.contains("tunnel connected"), "{stderr}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    // The port is released.
    assert!(
        tokio::net::TcpStream::connect(addr.as_str()).await.is_err(),
        "nothing listens on {addr} any more"
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let out = run({
        let mut c = binary();
        c.arg("frobnicate");
        c
    });
    assert_eq!(out.status.code(), Some(2));
    // clap's wording since the CLI moved to clap (was "unknown command").
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
    let out = run({
        let mut c = binary();
        c.arg("--help");
        c
    });
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("forward") && help.contains("check") && help.contains("--local-port"));
}

/// `check`'s steps come from the library: the same diagnosis, as data, for a working tunnel, a
/// changed host key, and a database without a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_returns_every_step_as_data() {
    let (pg, sshd) = servers().await;

    // Through the tunnel: every step works, reported in order, as they finish.
    let mut seen = Vec::new();
    let config = config_for(&sshd, &pg, &sshd.known_hosts_path());
    let diagnosis = diagnose_with(&config, |step| seen.push(step.kind)).await.unwrap();
    assert_eq!(seen, StepKind::ALL, "each step reported once, in order");
    assert_eq!(diagnosis.route, Route::Tunnel);
    assert_eq!(
        diagnosis.steps().iter().map(|s| s.kind).collect::<Vec<_>>(),
        StepKind::ALL
    );
    for step in diagnosis.steps() {
        assert_eq!(step.outcome, Outcome::Ok, "{step:?}");
        assert_eq!(step.exit_code(), None);
        assert!(!step.detail.contains(pg.password()), "the password leaked: {step:?}");
    }
    assert!(diagnosis.is_ok() && diagnosis.failure().is_none());
    assert_eq!(diagnosis.exit_code(), 0);
    // Timed steps carry their time (the host key is timed together with authentication).
    let timed: Vec<_> = diagnosis
        .steps()
        .iter()
        .filter(|s| s.elapsed.is_some())
        .map(|s| s.kind)
        .collect();
    assert_eq!(
        timed,
        [
            StepKind::TcpReach,
            StepKind::SshHandshake,
            StepKind::Authentication,
            StepKind::ChannelOpen,
            StepKind::Tls,
            StepKind::DatabaseLogin,
            StepKind::SelectOne
        ]
    );
    let handshake = diagnosis.step(StepKind::SshHandshake).unwrap();
    assert!(
        handshake.detail.contains(&sshd.host_key_fingerprint()),
        "server key shown: {handshake:?}"
    );
    assert!(diagnosis.total >= timed.iter().filter_map(|k| diagnosis.step(*k)?.elapsed).max().unwrap());

    // A changed host key: fails at step 3 with its documented exit code; nothing after it runs.
    let config = config_for(&sshd, &pg, &wrong_known_hosts(&sshd).await);
    let diagnosis = diagnose(&config).await.unwrap();
    let failed = diagnosis.failure().expect("a failed step");
    assert_eq!(failed.kind, StepKind::HostKey);
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(failed.detail.contains("CHANGED"), "{failed:?}");
    assert!(
        failed.hint.as_deref().is_some_and(|h| h.contains("man-in-the-middle")),
        "{failed:?}"
    );
    assert_eq!(failed.exit_code(), Some(13));
    assert_eq!(diagnosis.exit_code(), 13);
    assert!(!diagnosis.is_ok());
    let outcomes: Vec<_> = diagnosis.steps().iter().map(|s| (s.kind, s.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (StepKind::TcpReach, Outcome::Ok),
            (StepKind::SshHandshake, Outcome::Ok),
            (StepKind::HostKey, Outcome::Failed),
            (StepKind::Authentication, Outcome::NotRun),
            (StepKind::ChannelOpen, Outcome::NotRun),
            (StepKind::Tls, Outcome::NotRun),
            (StepKind::DatabaseLogin, Outcome::NotRun),
            (StepKind::SelectOne, Outcome::NotRun),
        ]
    );

    // No tunnel: PostgreSQL directly, the SSH steps skipped.
    let diagnosis = diagnose(&Config::new(pg.url())).await.unwrap();
    assert_eq!(diagnosis.route, Route::Direct);
    let outcomes: Vec<_> = diagnosis.steps().iter().map(|s| (s.kind, s.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (StepKind::TcpReach, Outcome::Ok),
            (StepKind::SshHandshake, Outcome::Skipped),
            (StepKind::HostKey, Outcome::Skipped),
            (StepKind::Authentication, Outcome::Skipped),
            (StepKind::ChannelOpen, Outcome::Skipped),
            (StepKind::Tls, Outcome::Skipped),
            (StepKind::DatabaseLogin, Outcome::Ok),
            (StepKind::SelectOne, Outcome::Ok),
        ]
    );
    assert_eq!(diagnosis.exit_code(), 0);

    // The documented exit codes (the TLS step, added later, is 18).
    assert_eq!(StepKind::ALL.map(StepKind::exit_code), [11, 12, 13, 14, 15, 18, 16, 17]);
}

#[test]
fn help_lists_both_subcommands_and_the_environment() {
    let home = tempfile::tempdir().unwrap();
    let out = run({
        let mut c = isolated(home.path());
        c.arg("--help");
        c
    });
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "forward",
        "Hold the tunnel",
        "check",
        "Diagnose step by step",
        "11-18",
        "DATABASE_URL",
        "SSH_CONFIG",
        "SSH_PROXY_JUMP",
        "SSH_HOST",
        "SSH_KEY_PATH",
        "SSH_KNOWN_HOSTS",
        "SSH_HOST_KEY_POLICY",
        "SSH_LOCAL_PORT",
        "POSTGRES_CONNECTION_TIMEOUT",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }

    // The subcommand's own help names its flags and the variable behind --local-port.
    let out = run({
        let mut c = isolated(home.path());
        c.args(["forward", "--help"]);
        c
    });
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["--local-port <PORT>", "--unix", "[env: SSH_LOCAL_PORT", "SIGTERM"] {
        assert!(help.contains(needle), "forward --help lacks {needle:?}:\n{help}");
    }

    let out = run({
        let mut c = isolated(home.path());
        c.arg("--version");
        c
    });
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sea-orm-tunnel {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_flags_give_clap_errors_and_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let stderr_of = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = isolated(home.path());
        c.args(args).envs(env.iter().copied());
        let out = run(c);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, stderr) = stderr_of(&[], &[]);
    assert_eq!(code, Some(2), "no subcommand: {stderr}");
    let (code, stderr) = stderr_of(&["forward", "--bogus"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unexpected argument '--bogus'"), "{stderr}");
    let (code, stderr) = stderr_of(&["forward", "--local-port", "x"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'x' for '--local-port <PORT>'"),
        "{stderr}"
    );
    let (code, stderr) = stderr_of(&["forward", "--unix", "--local-port", "1"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("either --local-port or --unix"), "{stderr}");
    let (code, stderr) = stderr_of(&["check", "--unix"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unexpected argument '--unix'"), "{stderr}");

    // --local-port falls back to SSH_LOCAL_PORT, so a bad value there is the same usage error...
    let (code, stderr) = stderr_of(&["forward"], &[("SSH_LOCAL_PORT", "nope")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("invalid value 'nope'"), "{stderr}");
    // ...and --unix overrides the variable instead of conflicting with it: this run gets past the
    // arguments and stops at the missing configuration (exit 1).
    let (code, stderr) = stderr_of(&["forward", "--unix"], &[("SSH_LOCAL_PORT", "6543")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
}
