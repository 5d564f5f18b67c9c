//! Security checks as tests: the database password never leaves the process before the bastion's
//! host key is verified; no secret appears in any log line (at TRACE) or error during a run full
//! of failures; a Unix-socket endpoint refuses every other OS user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::support::*;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, Config, HostKeyPolicy, LocalEndpointConfig, TunnelConfig};
use sea_orm_tunnel::testkit::{Bastion, TempPostgres};
use sea_orm_tunnel::tunnel::{LocalEndpoint, SshTunnel};
use sea_orm_tunnel::{ConnectionManager, Error};

/// A client key authorised on a fresh bastion that forwards to `target_port` on loopback.
async fn bastion_for(dir: &Path, target_port: u16) -> (Bastion, PathBuf) {
    let (key, public) = Bastion::generate_client_key(dir).unwrap();
    let bastion = Bastion::builder()
        .authorize_key(public)
        .allow_target("127.0.0.1", target_port)
        .start()
        .await
        .expect("bastion starts");
    (bastion, key)
}

fn tunnel_config(bastion: &Bastion, key: &Path, known_hosts: &Path, policy: HostKeyPolicy) -> TunnelConfig {
    TunnelConfig::new("127.0.0.1", bastion.user())
        .port(bastion.port())
        .auth(AuthConfig::key_file(key).use_agent(false))
        .known_hosts(known_hosts)
        .host_key_policy(policy)
        .connect_timeout(Duration::from_secs(3))
        .keepalive_interval(Duration::from_millis(300))
        .keepalive_max(2)
        .reconnect(BackoffPolicy::new(Duration::from_millis(50)).jitter(0.0).max_retries(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_is_never_sent_before_the_host_key_is_verified() {
    let recorder = RecordingPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bastion, key) = bastion_for(dir.path(), recorder.port()).await;
    let password = format!("PgPw{}", fastrand::u64(..));
    let url = format!("postgres://app:{password}@127.0.0.1:{}/app", recorder.port());

    // Another bastion's key, recorded for this one's address: the key "changed".
    let impostor = Bastion::builder().start().await.unwrap();
    let changed = dir.path().join("known_hosts_changed");
    std::fs::write(
        &changed,
        format!(
            "{}\n",
            impostor
                .known_hosts_line()
                .replace(&impostor.port().to_string(), &bastion.port().to_string())
        ),
    )
    .unwrap();
    let empty = dir.path().join("known_hosts_empty");
    std::fs::write(&empty, "").unwrap();
    let good = dir.path().join("known_hosts_good");
    bastion.write_known_hosts(&good).unwrap();

    let bad_cases = [
        (
            "changed key (strict)",
            tunnel_config(&bastion, &key, &changed, HostKeyPolicy::Strict),
        ),
        (
            "unknown host (strict)",
            tunnel_config(&bastion, &key, &empty, HostKeyPolicy::Strict),
        ),
        (
            "changed key (accept-new)",
            tunnel_config(&bastion, &key, &changed, HostKeyPolicy::AcceptNew),
        ),
        (
            "pinned fingerprint of another key",
            tunnel_config(
                &bastion,
                &key,
                &empty,
                HostKeyPolicy::fingerprint(&impostor.host_key_fingerprint()).unwrap(),
            ),
        ),
    ];
    for (case, tunnel) in bad_cases {
        let config = Config::new(url.clone()).tunnel(tunnel);
        let result = tokio::time::timeout(LIVENESS, ConnectionManager::new(config))
            .await
            .unwrap_or_else(|_| panic!("{case}: connect hangs"));
        let error = result.expect_err("a host key that does not verify stops the connect");
        assert!(
            matches!(error, Error::HostKeyChanged { .. } | Error::HostKeyUnknown { .. }),
            "{case}: {error:?}"
        );
        assert!(!error.is_transient(), "{case}");
        // Nothing was authenticated, forwarded or delivered.
        assert_eq!(
            bastion.sessions_accepted(),
            0,
            "{case}: our key was offered to an unverified host"
        );
        assert_eq!(bastion.channels_opened(), 0, "{case}");
        assert_eq!(recorder.connections(), 0, "{case}: the database was reached");
        assert!(recorder.received().is_empty(), "{case}: bytes reached the database");
        assert_no_secret(&format!("{error} {error:?}"), &[&password], case);
    }

    // Control: with the right key the same setup does reach the database, and the password
    // arrives there (the fake server asks for it in clear), so the checks above can fail.
    let config = Config::new(url.clone())
        .tunnel(tunnel_config(&bastion, &key, &good, HostKeyPolicy::Strict))
        .map_pool(|p| p.connect_timeout(Duration::from_secs(3)));
    let result = tokio::time::timeout(LIVENESS, ConnectionManager::new(config))
        .await
        .expect("connect finishes");
    let error = result.expect_err("the fake server refuses the password");
    assert_no_secret(&format!("{error} {error:?}"), &[&password], "the control's error");
    assert_eq!(bastion.sessions_accepted(), 1);
    assert!(recorder.connections() > 0);
    let received = recorder.received();
    assert!(
        received.windows(password.len()).any(|w| w == password.as_bytes()),
        "the password reaches a verified database ({} bytes received)",
        received.len()
    );
    recorder.shutdown().await;
}

/// Encrypts `key` in place with `passphrase` (`ssh-keygen -p`).
fn encrypt_key(key: &Path, passphrase: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "", "-N", passphrase, "-f"])
        .arg(key)
        .output()
        .expect("ssh-keygen runs (openssh-client)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Guards, among others, against SeaORM's `SqlxPostgresConnector::connect`: it is
/// `#[instrument(level = "trace")]` without `skip(options)`, so its span records `ConnectOptions`'
/// derived `Debug`, `url` included; a password inside that URL is logged at TRACE.
#[test]
fn no_secret_appears_in_any_log_line_or_error() {
    // A global subscriber and `log` logger are one per process.
    if run_alone(module_path!(), "no_secret_appears_in_any_log_line_or_error") {
        return;
    }
    let capture = LogCapture::new();
    // A global subscriber, not `set_default`: a thread-local one missed most events (callsite
    // interest is cached process-wide), e.g. every `tunnel_connected`. The current-thread runtime
    // keeps the run on this thread.
    tracing::subscriber::set_global_default(capture.subscriber()).expect("no other global subscriber");
    capture_log_records(&capture);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secrets = runtime.block_on(run_with_failures(&capture));
    drop(runtime);

    let text = capture.text();
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&text, &refs, "the captured log and errors");
    // The capture really holds the run, at every level, with the events that carry errors.
    for needle in [
        " TRACE ",
        " DEBUG ",
        " INFO ",
        " WARN ",
        "tunnel_connected",
        "tunnel_disconnected",
        "KeyPassphrase",
    ] {
        assert!(
            text.contains(needle),
            "the capture lacks {needle:?} ({} bytes)",
            text.len()
        );
    }
    eprintln!("captured {} records, {} bytes", capture.records(), capture.len());
}

/// A run full of failures: wrong passphrases, a wrong database password, lost sessions, a
/// blackholed link, refused channels, a PostgreSQL restart, SQL errors. Every error and config is
/// written into `capture` too. Returns the secrets used.
async fn run_with_failures(capture: &LogCapture) -> Vec<String> {
    let pg = TempPostgres::start().await.expect("PostgreSQL starts");
    let dir = tempfile::tempdir().unwrap();
    let (bastion, key) = bastion_for(dir.path(), pg.port()).await;
    let passphrase = format!("KeyPass{}", fastrand::u64(..));
    encrypt_key(&key, &passphrase);
    let known_hosts = dir.path().join("known_hosts");
    bastion.write_known_hosts(&known_hosts).unwrap();
    let wrong_passphrase = format!("WrongPass{}", fastrand::u64(..));
    let wrong_db_password = format!("WrongDbPw{}", fastrand::u64(..));
    let secrets = vec![
        pg.password().to_owned(),
        passphrase.clone(),
        wrong_passphrase.clone(),
        wrong_db_password.clone(),
    ];
    let record = |what: &str, text: String| capture.push(&format!("{what}: {text}"));
    let tunnel = |phrase: Option<&str>| {
        let t = tunnel_config(&bastion, &key, &known_hosts, HostKeyPolicy::Strict);
        match phrase {
            Some(p) => t.map_auth(|a| a.passphrase(p)),
            None => t,
        }
    };
    let config = |url: String, phrase: Option<&str>| {
        Config::new(url)
            .tunnel(tunnel(phrase))
            .map_pool(|p| p.max_connections(4).connect_timeout(Duration::from_secs(3)))
            .map_health(|h| h.interval(Duration::from_millis(300)).timeout(Duration::from_secs(2)))
    };

    // Key problems: no passphrase, a wrong one.
    for phrase in [None, Some(wrong_passphrase.as_str())] {
        let c = config(pg.url(), phrase);
        record("config", format!("{c:?}"));
        let e = ConnectionManager::new(c)
            .await
            .expect_err("the key cannot be decrypted");
        assert!(matches!(e, Error::KeyPassphrase { .. }), "{e:?}");
        record("error", format!("{e} / {e:?}"));
    }
    // A wrong database password through a good tunnel.
    let wrong_url = format!(
        "postgres://{}:{wrong_db_password}@127.0.0.1:{}/postgres",
        pg.user(),
        pg.port()
    );
    let e = ConnectionManager::new(config(wrong_url, Some(&passphrase)))
        .await
        .expect_err("PostgreSQL refuses the password");
    record("error", format!("{e} / {e:?}"));
    // Errors of the configuration readers, with secrets in the environment.
    let env_url = format!("postgres://u:{wrong_db_password}@h/db");
    let lookup = |name: &str| match name {
        "DATABASE_URL" => Some(env_url.clone()),
        "SSH_HOST" => Some("bastion".into()),
        "SSH_USER" => Some("u".into()),
        "SSH_KEY_PATH" => Some(key.display().to_string()),
        "SSH_KEY_PASSPHRASE" => Some(passphrase.clone()),
        "SSH_MAX_CHANNELS" => Some("not a number".into()),
        _ => None,
    };
    let e = Config::from_env_with(lookup).expect_err("SSH_MAX_CHANNELS is not a number");
    record("error", format!("{e} / {e:?}"));

    // The good run, with faults.
    let c = config(pg.url(), Some(&passphrase));
    record("config", format!("{c:?} / {:?}", c.tunnel));
    let manager = ConnectionManager::new(c).await.expect("manager starts");
    record("manager", format!("{manager:?} / {:?}", manager.tunnel()));
    let db = manager.connection().clone();
    db.execute_unprepared("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    db.execute_unprepared("INSERT INTO t VALUES (1)").await.unwrap();
    let mut errors = Vec::new();
    errors.push(
        db.execute_unprepared("INSERT INTO t VALUES (1)")
            .await
            .err()
            .map(Error::from),
    );
    errors.push(db.execute_unprepared("SELEKT nonsense").await.err().map(Error::from));
    let txn = manager.begin().await.unwrap();
    txn.execute_unprepared("INSERT INTO t VALUES (2)").await.unwrap();
    txn.rollback().await.unwrap();

    bastion.drop_sessions();
    errors.push(db.execute_unprepared("SELECT 1").await.err().map(Error::from));
    errors.push(
        manager
            .retry(|db| async move { db.execute_unprepared("SELECT 1").await })
            .await
            .err(),
    );
    bastion.blackhole();
    errors.push(
        tokio::time::timeout(Duration::from_secs(5), db.execute_unprepared("SELECT 1"))
            .await
            .ok()
            .and_then(|r| r.err().map(Error::from)),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bastion.restore();
    bastion.refuse_channels(true);
    bastion.drop_sessions();
    errors.push(db.execute_unprepared("SELECT 1").await.err().map(Error::from));
    bastion.refuse_channels(false);
    pg.restart().await.expect("PostgreSQL restarts");
    errors.push(db.execute_unprepared("SELECT 1").await.err().map(Error::from));
    assert!(holds_within(LIVENESS, || manager.status().healthy).await);
    manager
        .retry(|db| async move { db.execute_unprepared("SELECT 1").await })
        .await
        .expect("healthy again");
    let status = manager.status();
    record("status", format!("{status:?}"));
    for e in errors.into_iter().flatten() {
        record("error", format!("{e} / {e:?}"));
    }
    let report = manager.shutdown(Duration::from_secs(5)).await;
    record("report", format!("{report:?}"));
    bastion.shutdown().await;
    secrets
}

/// Runs a tiny socket client as `uid`/`gid`, printing `connected` or the errno name.
fn connect_as(uid: u32, gid: u32, socket: &Path) -> String {
    const SCRIPT: &str = "import socket, sys, errno\n\
        s = socket.socket(socket.AF_UNIX)\n\
        try:\n    s.connect(sys.argv[1]); print('connected')\n\
        except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e.errno)))\n";
    // A system interpreter: a user-local one (pyenv under /root) is not reachable by `nobody`.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a system python3 (/usr/bin/python3) to act as another OS user");
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(socket)
        .current_dir("/")
        .uid(uid)
        // Supplementary groups stay root's (setgroups is unstable in std); the directory grants its
        // group nothing, so they do not open it either.
        .gid(gid)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_endpoint_refuses_other_os_users() {
    let recorder = RecordingPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bastion, key) = bastion_for(dir.path(), recorder.port()).await;
    let known_hosts = dir.path().join("known_hosts");
    bastion.write_known_hosts(&known_hosts).unwrap();
    let config = tunnel_config(&bastion, &key, &known_hosts, HostKeyPolicy::Strict)
        .remote("127.0.0.1", recorder.port())
        .local(LocalEndpointConfig::Unix);
    let tunnel = SshTunnel::connect(config).await.expect("tunnel connects");
    let LocalEndpoint::Unix(socket) = tunnel.local_endpoint().clone() else {
        panic!("a Unix endpoint: {:?}", tunnel.local_endpoint());
    };
    let socket_dir = tunnel.local_endpoint().unix_dir().unwrap().to_owned();

    // The directory is private to us.
    let meta = std::fs::metadata(&socket_dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{}", socket_dir.display());
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(meta.uid(), me, "owned by this process's user");

    // We can connect (and the connection rides the tunnel to the recorder).
    assert_eq!(
        connect_as(me, std::fs::metadata("/proc/self").unwrap().gid(), &socket),
        "connected"
    );
    assert!(holds_within(LIVENESS, || recorder.connections() == 1).await);
    // Another OS user cannot, and no connection is forwarded for it.
    let nobody = 65534;
    assert_ne!(me, nobody);
    assert_eq!(connect_as(nobody, nobody, &socket), "EACCES");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        recorder.connections(),
        1,
        "another user's attempt reached the remote side"
    );
    assert_eq!(tunnel.stats().connections_total, 1, "{:?}", tunnel.stats());

    // The directory goes away with the tunnel.
    tunnel.disconnect().await;
    assert!(!socket_dir.exists(), "{} left behind", socket_dir.display());
    recorder.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_endpoint_listens_on_loopback_only() {
    let recorder = RecordingPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bastion, key) = bastion_for(dir.path(), recorder.port()).await;
    let known_hosts = dir.path().join("known_hosts");
    bastion.write_known_hosts(&known_hosts).unwrap();
    let config =
        tunnel_config(&bastion, &key, &known_hosts, HostKeyPolicy::Strict).remote("127.0.0.1", recorder.port());
    let tunnel = SshTunnel::connect(config).await.expect("tunnel connects");
    let addr = tunnel.local_endpoint().tcp_addr().expect("TCP endpoint");
    assert!(addr.ip().is_loopback(), "{addr}");
    // Not reachable on another local address of the host (if it has one besides loopback).
    let listening: String = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_hex = format!(":{:04X} ", addr.port());
    let ours: Vec<&str> = listening
        .lines()
        .filter(|l| l.contains(&port_hex) && l.contains(" 0A "))
        .collect();
    assert!(!ours.is_empty(), "listener not found in /proc/net/tcp");
    for line in ours {
        let local = line.split_whitespace().nth(1).unwrap();
        assert!(local.starts_with("0100007F:"), "listens on {local}, not 127.0.0.1");
    }
    tunnel.disconnect().await;
    recorder.shutdown().await;
}
