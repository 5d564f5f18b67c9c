//! TLS to PostgreSQL held by the tunnel: `sslmode=verify-full` through a bastion against the
//! name the user wrote (`db.internal`, which nothing resolves: the bastion connects to
//! 127.0.0.1), refusals with their own errors, client certificates, `forward` + `psql`, and a
//! TLS PostgreSQL restarted under load. The servers allow only `hostssl`: a plaintext login
//! would be refused and logged as `no encryption`.

use std::path::Path;
use std::time::Duration;

use sea_orm::{ConnectionTrait as _, Database, TransactionTrait as _};
use sea_orm_tunnel::config::{BackoffPolicy, Config};
use sea_orm_tunnel::error::TlsErrorKind;
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{CertPair, OpenSshd, PgServerTls, TempPostgres, TestCa, fast_config};
use sea_orm_tunnel::{Error, tls::PostgresTls};

use super::support::*;

/// The name on the server certificate; nothing resolves it.
const DB_NAME: &str = "db.internal";

/// `DATABASE_URL` as a user behind a bastion writes it: the database's own name, TLS parameters.
fn url(pg: &TempPostgres, host: &str, params: &str) -> String {
    format!(
        "postgres://{}:{}@{host}:{}/postgres?{params}",
        pg.user(),
        pg.password(),
        pg.port()
    )
}

fn verify_full(ca: &Path) -> String {
    format!("sslmode=verify-full&sslrootcert={}", ca.display())
}

/// A manager config through `sshd` to `pg` (the bastion connects to 127.0.0.1, like
/// `SSH_REMOTE_HOST=127.0.0.1`).
fn config(sshd: &OpenSshd, pg: &TempPostgres, database_url: String, prefix: &str) -> Config {
    let tunnel = sshd
        .tunnel_config("127.0.0.1", pg.port())
        .connect_timeout(Duration::from_secs(5))
        .reconnect(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_millis(500)));
    fast_config(database_url, prefix).tunnel(tunnel)
}

/// A checker outside the code under test, with sqlx's own TLS (the server allows nothing else).
async fn tls_checker(pg: &TempPostgres) -> sea_orm::DatabaseConnection {
    checker(&format!("{}?sslmode=require", pg.url())).await
}

/// `(backends of ours, of which on TLS)`.
async fn tls_backends(checker: &sea_orm::DatabaseConnection, prefix: &str) -> (i64, i64) {
    // One snapshot: a connection the pool opens between two queries must not skew the counts.
    let both: String = scalar(
        checker,
        &format!(
            "SELECT count(*)::text || ',' || (count(*) FILTER (WHERE ssl))::text \
             FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name LIKE '{prefix}-%'"
        ),
    )
    .await;
    let (total, on_tls) = both.split_once(',').expect("two counts");
    (total.parse().unwrap(), on_tls.parse().unwrap())
}

/// The server log has no plaintext login attempt (pg_hba has only `hostssl` lines, so one would
/// be refused with "no encryption").
fn assert_no_plaintext(pg: &TempPostgres) {
    let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
    assert!(
        !log.contains("no encryption"),
        "a plaintext connection reached the server:\n{log}"
    );
}

struct TlsServers {
    ca: TestCa,
    pg: TempPostgres,
    sshd: OpenSshd,
}

async fn tls_servers() -> TlsServers {
    let ca = TestCa::new("sea-orm-tunnel test CA").await.expect("test CA");
    let server = ca.server_cert(DB_NAME).await.expect("server certificate");
    let (pg, sshd) = tokio::join!(TempPostgres::start_tls(&server), OpenSshd::start());
    TlsServers {
        ca,
        pg: pg.expect("PostgreSQL with TLS starts"),
        sshd: sshd.expect("sshd starts"),
    }
}

async fn refused(config: Config) -> Error {
    let started = tokio::time::timeout(Duration::from_secs(60), ConnectionManager::new(config))
        .await
        .expect("the manager gives up in time");
    match started {
        Ok(_) => panic!("the manager started although TLS must fail"),
        Err(e) => e,
    }
}

fn assert_tls(error: &Error, kind: TlsErrorKind, needle: &str) {
    match error {
        Error::Tls { kind: k, message, host } => {
            assert_eq!(*k, kind, "{error}");
            assert!(message.contains(needle), "{needle:?} not in {error}");
            assert!(!host.is_empty(), "{error}");
        }
        other => panic!("expected a TLS error of kind {kind:?}, got {other:?} ({other})"),
    }
    assert!(!error.is_transient(), "a TLS refusal is permanent: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_through_the_tunnel_to_a_hostssl_only_server() {
    let s = tls_servers().await;
    let database_url = url(&s.pg, DB_NAME, &verify_full(s.ca.cert_path()));
    let manager = ConnectionManager::new(config(&s.sshd, &s.pg, database_url, "tlsfull"))
        .await
        .expect("verify-full against db.internal through the bastion");
    // The pool speaks plaintext to the private local endpoint only.
    let local_url = manager.connect_options().get_url().to_owned();
    assert!(local_url.contains("sslmode=disable"), "{local_url}");
    assert!(!local_url.contains("sslrootcert"), "{local_url}");
    let db = manager.connection();
    let mut held = Vec::new();
    for _ in 0..3 {
        let txn = db.begin().await.unwrap();
        txn.execute_unprepared("SELECT 1").await.unwrap();
        held.push(txn);
    }
    let check = tls_checker(&s.pg).await;
    let (total, on_tls) = tls_backends(&check, "tlsfull").await;
    assert!(total >= 3, "{total} backends of ours");
    assert_eq!(on_tls, total, "every backend of ours is on TLS");
    for txn in held {
        txn.commit().await.unwrap();
    }
    manager.shutdown(Duration::from_secs(2)).await;

    // The private Unix socket endpoint, and libpq's default `prefer` (TLS, nothing verified).
    for (params, prefix) in [(verify_full(s.ca.cert_path()), "tlsunix"), (String::new(), "tlsprefer")] {
        let cfg = config(&s.sshd, &s.pg, url(&s.pg, DB_NAME, &params), prefix)
            .map_tunnel(|t| t.local(sea_orm_tunnel::config::LocalEndpointConfig::Unix));
        let manager = ConnectionManager::new(cfg).await.expect("served on the Unix endpoint");
        select_one(manager.connection()).await.unwrap();
        let (total, on_tls) = tls_backends(&check, prefix).await;
        assert!(total >= 1 && on_tls == total, "{prefix}: {on_tls} of {total} on TLS");
        manager.shutdown(Duration::from_secs(2)).await;
    }
    assert_no_plaintext(&s.pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_wrong_ca_name_mismatch_and_expired_certificate_are_refused_with_their_own_errors() {
    let s = tls_servers().await;
    // Wrong CA: the certificate is signed by another one.
    let other_ca = TestCa::new("another CA").await.unwrap();
    let e = refused(config(
        &s.sshd,
        &s.pg,
        url(&s.pg, DB_NAME, &verify_full(other_ca.cert_path())),
        "tlsca",
    ))
    .await;
    assert_tls(&e, TlsErrorKind::UnknownIssuer, "not signed by a CA");
    assert!(
        e.to_string().contains(&other_ca.cert_path().display().to_string()),
        "{e}"
    );
    // libpq: `require` with a root certificate verifies the chain (as verify-ca) ...
    let require_other = format!("sslmode=require&sslrootcert={}", other_ca.cert_path().display());
    let e = refused(config(&s.sshd, &s.pg, url(&s.pg, DB_NAME, &require_other), "tlsreqca")).await;
    assert_tls(&e, TlsErrorKind::UnknownIssuer, "not signed by a CA");
    // ... and without one it only encrypts.
    let manager = ConnectionManager::new(config(
        &s.sshd,
        &s.pg,
        url(&s.pg, "10.9.9.9", "sslmode=require"),
        "tlsreq",
    ))
    .await
    .expect("require without a root certificate verifies nothing");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;

    // Name mismatch: the URL names another host than the certificate.
    let e = refused(config(
        &s.sshd,
        &s.pg,
        url(&s.pg, "other.internal", &verify_full(s.ca.cert_path())),
        "tlsname",
    ))
    .await;
    assert_tls(&e, TlsErrorKind::NameMismatch, "other.internal");
    assert!(e.to_string().contains("sslservername"), "the fix is named: {e}");
    // ... which sslservername fixes.
    let fixed = url(
        &s.pg,
        "other.internal",
        &format!("{}&sslservername={DB_NAME}", verify_full(s.ca.cert_path())),
    );
    let manager = ConnectionManager::new(config(&s.sshd, &s.pg, fixed, "tlsalias"))
        .await
        .expect("sslservername names the certificate's host");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;
    // verify-ca checks the chain only: the other name passes.
    let ca_only = url(
        &s.pg,
        "other.internal",
        &format!("sslmode=verify-ca&sslrootcert={}", s.ca.cert_path().display()),
    );
    let manager = ConnectionManager::new(config(&s.sshd, &s.pg, ca_only, "tlsvca"))
        .await
        .expect("verify-ca ignores the name");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;

    // Expired: a server with an expired certificate.
    let expired = s.ca.expired_server_cert(DB_NAME).await.unwrap();
    let old = TempPostgres::start_tls(&expired).await.unwrap();
    let e = refused(config(
        &s.sshd,
        &old,
        url(&old, DB_NAME, &verify_full(s.ca.cert_path())),
        "tlsexp",
    ))
    .await;
    assert_tls(&e, TlsErrorKind::Expired, "expired");
    assert_no_plaintext(&s.pg);
    assert_no_plaintext(&old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_to_a_server_without_tls_is_refused_and_no_plaintext_is_sent() {
    let ca = TestCa::new("sea-orm-tunnel test CA").await.unwrap();
    let (pg, sshd) = servers().await;
    for (mode, prefix) in [("verify-full", "tlsnone"), ("require", "tlsreq")] {
        let params = format!("sslmode={mode}&sslrootcert={}", ca.cert_path().display());
        let e = refused(config(&sshd, &pg, url(&pg, DB_NAME, &params), prefix)).await;
        assert_tls(&e, TlsErrorKind::NotSupported, "does not support TLS");
        assert!(e.to_string().contains(mode), "{e}");
    }
    // No login was attempted: the server never saw a startup message of ours.
    let check = checker(&pg.url()).await;
    assert!(backends(&check, "tlsnone").await.is_empty());
    // `prefer` (libpq's default) falls back to plaintext when the server says N.
    let manager = ConnectionManager::new(config(&sshd, &pg, url(&pg, DB_NAME, "sslmode=prefer"), "tlspref"))
        .await
        .expect("prefer accepts a server without TLS");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_missing_files_fail_the_start_naming_the_file() {
    let (pg, sshd) = servers().await;
    let missing = sshd.dir().join("no-such-ca.pem");
    let e = refused(config(&sshd, &pg, url(&pg, DB_NAME, &verify_full(&missing)), "tlsfile")).await;
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    assert!(
        e.to_string().contains("sslrootcert") && e.to_string().contains("no-such-ca.pem"),
        "{e}"
    );
    assert!(!e.is_transient());
    // A key that does not belong to the certificate.
    let ca = TestCa::new("ca").await.unwrap();
    let a = ca.client_cert("a").await.unwrap();
    let b = ca.client_cert("b").await.unwrap();
    let tls = PostgresTls::from_database_url(&url(&pg, DB_NAME, &verify_full(ca.cert_path())))
        .unwrap()
        .client_cert(&a.cert, &b.key);
    let e = tls.validate().unwrap_err();
    assert!(e.to_string().contains("does not match the certificate"), "{e}");
    assert!(e.to_string().contains(&b.key.display().to_string()), "{e}");
    // An encrypted key without its password, and with a wrong one.
    let enc = ca.client_cert_encrypted("c", "right horse").await.unwrap();
    let base = PostgresTls::from_database_url(&url(&pg, DB_NAME, &verify_full(ca.cert_path()))).unwrap();
    let e = base.clone().client_cert(&enc.cert, &enc.key).validate().unwrap_err();
    assert!(e.to_string().contains("sslpassword"), "{e}");
    let e = base
        .client_cert(&enc.cert, &enc.key)
        .key_password("wrong")
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("wrong password"), "{e}");
    assert!(
        !e.to_string().contains("right horse") && !format!("{e:?}").contains("wrong\""),
        "{e:?}"
    );
}

/// The role `user` that logs in with a client certificate.
async fn cert_user(pg: &TempPostgres, user: &str) {
    let admin = tls_checker(pg).await;
    admin
        .execute_unprepared(&format!("CREATE ROLE \"{user}\" LOGIN"))
        .await
        .unwrap();
    admin.close().await.unwrap();
}

fn cert_url(pg: &TempPostgres, user: &str, ca: &Path, client: &CertPair, extra: &str) -> String {
    format!(
        "postgres://{user}@{DB_NAME}:{}/postgres?{}&sslcert={}&sslkey={}{extra}",
        pg.port(),
        verify_full(ca),
        client.cert.display(),
        client.key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificate_authentication_through_the_tunnel() {
    let ca = TestCa::new("sea-orm-tunnel test CA").await.unwrap();
    let server = ca.server_cert(DB_NAME).await.unwrap();
    let (pg, sshd) = tokio::join!(
        TempPostgres::start_tls_with(PgServerTls::new(&server).cert_auth(ca.cert_path(), "certuser")),
        OpenSshd::start()
    );
    let (pg, sshd) = (pg.unwrap(), sshd.unwrap());
    cert_user(&pg, "certuser").await;

    // No password anywhere: the certificate is the login. The key is encrypted (sslpassword).
    let client = ca.client_cert_encrypted("certuser", "s3cret-pass").await.unwrap();
    let database_url = cert_url(&pg, "certuser", ca.cert_path(), &client, "&sslpassword=s3cret-pass");
    let manager = ConnectionManager::new(config(&sshd, &pg, database_url, "tlscert"))
        .await
        .expect("client-certificate login through the tunnel");
    let who: String = scalar(manager.connection(), "SELECT current_user::text").await;
    assert_eq!(who, "certuser");
    let dn: String = scalar(
        manager.connection(),
        "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(dn.contains("certuser"), "{dn}");
    manager.shutdown(Duration::from_secs(2)).await;

    // A certificate from a CA the server does not trust: the server aborts the handshake (with
    // TLS 1.3, after it), and the tunnel says which side refused what.
    let stranger = TestCa::new("a CA the server does not know").await.unwrap();
    let foreign = stranger.client_cert("certuser").await.unwrap();
    let e = refused(config(
        &sshd,
        &pg,
        cert_url(&pg, "certuser", ca.cert_path(), &foreign, ""),
        "tlsforeign",
    ))
    .await;
    assert_tls(&e, TlsErrorKind::ClientCertificate, "client certificate");

    // Without a certificate the server refuses the login, and says so.
    let no_cert = format!(
        "postgres://certuser@{DB_NAME}:{}/postgres?{}",
        pg.port(),
        verify_full(ca.cert_path())
    );
    let e = refused(config(&sshd, &pg, no_cert, "tlsnocert")).await;
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(!e.is_transient(), "{e}");
    assert_no_plaintext(&pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_forward_serves_psql_with_tls_upstream() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let s = tls_servers().await;
    let database_url = url(&s.pg, DB_NAME, &verify_full(s.ca.cert_path()));
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sea-orm-tunnel"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .current_dir(home.path())
        .stdin(Stdio::null())
        .envs(env_block(&s.sshd, &s.pg))
        .env("DATABASE_URL", &database_url)
        .env("SSH_REMOTE_HOST", "127.0.0.1")
        .env("SSH_KNOWN_HOSTS", s.sshd.known_hosts_path())
        .env("SSH_HOST_KEY_POLICY", "strict")
        .arg("forward")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start forward");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let psql_line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("forward prints a psql line; stderr: {:?}", child.0.stderr.take()));
        if line.starts_with("DATABASE_URL=") {
            assert!(
                line.contains("sslmode=disable") && !line.contains("sslrootcert"),
                "{line}"
            );
            assert!(!line.contains(s.pg.password()), "{line}");
        }
        if let Some(rest) = line.strip_prefix("psql: psql ") {
            break rest.trim_matches('"').to_owned();
        }
    };
    assert!(psql_line.contains("sslmode=disable"), "{psql_line}");
    // psql with exactly that line (and the password from the environment).
    let out = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .arg(&psql_line)
            .args(["-XAtc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
            .env("PGPASSWORD", s.pg.password())
            .env("PGCONNECT_TIMEOUT", "30")
            .output()
            .map(|o| (o, s))
    })
    .await
    .unwrap()
    .expect("run psql");
    let (out, s) = out;
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "psql's backend is on TLS"
    );
    drop(child);
    assert_no_plaintext(&s.pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_postgres_restarted_mid_load_recovers_without_plaintext() {
    let s = tls_servers().await;
    let database_url = url(&s.pg, DB_NAME, &verify_full(s.ca.cert_path()));
    let manager = ConnectionManager::new(config(&s.sshd, &s.pg, database_url, "tlsload"))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (manager, stop, ok) = (manager.clone(), stop.clone(), ok.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if manager.retry(|db| async move { select_one(&db).await }).await.is_ok() {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.pg.restart().await.expect("PostgreSQL restarts");
    let before = ok.load(std::sync::atomic::Ordering::Relaxed);
    eventually("queries succeed again after the restart", || {
        let ok = ok.clone();
        async move { ok.load(std::sync::atomic::Ordering::Relaxed) > before + 20 }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    select_one(manager.connection())
        .await
        .expect("served after the restart");
    let check = tls_checker(&s.pg).await;
    let (total, on_tls) = tls_backends(&check, "tlsload").await;
    assert!(total >= 1);
    assert_eq!(on_tls, total, "every backend of ours is on TLS after the restart");
    manager.shutdown(Duration::from_secs(2)).await;
    assert_no_plaintext(&s.pg);
    let log = std::fs::read_to_string(s.pg.log_path()).unwrap();
    let authorized: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("tlsload"))
        .collect();
    assert!(!authorized.is_empty(), "log_connections lines:\n{log}");
    assert!(
        authorized.iter().all(|l| l.contains("SSL enabled")),
        "every login of ours was on TLS:\n{}",
        authorized.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_direct_connection_keeps_sqlx_tls_and_a_tls_error_is_permanent() {
    let s = tls_servers().await;
    // Without a tunnel sqlx verifies itself; it dials 127.0.0.1, which the certificate does not name.
    let direct = format!(
        "postgres://{}:{}@127.0.0.1:{}/postgres?{}",
        s.pg.user(),
        s.pg.password(),
        s.pg.port(),
        verify_full(s.ca.cert_path())
    );
    let e = refused(fast_config(direct, "tlsdirect")).await;
    assert!(
        !e.is_transient(),
        "a certificate that does not verify is permanent: {e:?}"
    );
    // hostaddr cannot mean what libpq means without the tunnel: refused up front.
    let hostaddr = format!(
        "{}&hostaddr=127.0.0.1",
        url(&s.pg, DB_NAME, &verify_full(s.ca.cert_path()))
    );
    let e = refused(fast_config(hostaddr.clone(), "tlsaddr")).await;
    assert!(e.to_string().contains("hostaddr"), "{e}");
    // Through the tunnel it does: connect to hostaddr, verify host.
    let tunnel = s.sshd.tunnel_config("", 0).connect_timeout(Duration::from_secs(5));
    let config = fast_config(hostaddr, "tlsaddr").tunnel(tunnel);
    let manager = ConnectionManager::new(config)
        .await
        .expect("hostaddr through the tunnel");
    assert_eq!(manager.tunnel().unwrap().config().remote_host, "127.0.0.1");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;
    let _ = Database::connect(format!("{}?sslmode=require", s.pg.url()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_reports_the_session_and_exits_18_on_a_tls_failure() {
    use sea_orm_tunnel::tunnel::diagnose::{Outcome, StepKind, diagnose};
    let s = tls_servers().await;
    let good = config(
        &s.sshd,
        &s.pg,
        url(&s.pg, DB_NAME, &verify_full(s.ca.cert_path())),
        "tlscheck",
    );
    let diagnosis = diagnose(&good).await.unwrap();
    assert!(diagnosis.is_ok(), "{diagnosis:#?}");
    let tls = diagnosis.step(StepKind::Tls).unwrap();
    assert_eq!(tls.outcome, Outcome::Ok);
    for needle in ["TLSv1_3", "chain and name verified for db.internal", "expires in 36"] {
        assert!(tls.detail.contains(needle), "{needle:?} not in {:?}", tls.detail);
    }
    assert!(!tls.detail.contains("WARNING"), "{tls:?}");
    assert_eq!(diagnosis.step(StepKind::DatabaseLogin).unwrap().outcome, Outcome::Ok);

    // The binary with another CA: fails at the TLS step, exit code 18.
    let other = TestCa::new("another CA").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sea-orm-tunnel"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .current_dir(home.path())
        .envs(env_block(&s.sshd, &s.pg))
        .env("DATABASE_URL", url(&s.pg, DB_NAME, &verify_full(other.cert_path())))
        .env("SSH_REMOTE_HOST", "127.0.0.1")
        .env("SSH_KNOWN_HOSTS", s.sshd.known_hosts_path())
        .env("POSTGRES_CONNECTION_TIMEOUT", "10000")
        .arg("check");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(18), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("[6/8] TLS")).expect("a TLS line");
    assert!(line.contains("FAILED") && line.contains("not signed by a CA"), "{line}");
    assert!(
        stdout.contains("[7/8] database login") && stdout.contains("not run"),
        "{stdout}"
    );
    assert!(!stdout.contains(s.pg.password()), "{stdout}");
    assert_no_plaintext(&s.pg);
}

#[test]
fn tls_certificate_expiring_within_14_days_warns_and_sets_the_expiry_gauge() {
    use sea_orm_tunnel::observe::metrics::DB_TLS_CERT_EXPIRY_SECONDS;
    use sea_orm_tunnel::tunnel::diagnose::{StepKind, diagnose};
    let recorder = TestMetrics::default();
    let capture = LogCapture::new();
    let _log = tracing::subscriber::set_default(capture.subscriber());
    recorder.run(async {
        let ca = TestCa::new("sea-orm-tunnel test CA").await.unwrap();
        let soon = ca.server_cert_expiring_in(DB_NAME, 5).await.unwrap();
        let (pg, sshd) = tokio::join!(TempPostgres::start_tls(&soon), OpenSshd::start());
        let (pg, sshd) = (pg.unwrap(), sshd.unwrap());
        let cfg = config(&sshd, &pg, url(&pg, DB_NAME, &verify_full(ca.cert_path())), "tlssoon")
            .map_pool(|p| p.pool_label("orders"));
        let diagnosis = diagnose(&cfg).await.unwrap();
        let tls = diagnosis.step(StepKind::Tls).unwrap();
        assert!(
            tls.detail.contains("expires in 4 days") || tls.detail.contains("expires in 5 days"),
            "{tls:?}"
        );
        assert!(tls.detail.contains("WARNING"), "{tls:?}");
        // The manager's tunnel sets the gauge (and warns) too.
        let manager = ConnectionManager::new(cfg).await.unwrap();
        select_one(manager.connection()).await.unwrap();
        manager.shutdown(Duration::from_secs(2)).await;
    });
    let left = recorder
        .gauge(&format!("{DB_TLS_CERT_EXPIRY_SECONDS}{{pool=orders}}"))
        .expect("the expiry gauge is set");
    assert!((4.0 * 86_400.0..=5.0 * 86_400.0).contains(&left), "{left}");
    let text = capture.text();
    assert!(text.contains("expires within 14 days"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_several_hosts_are_each_verified_through_the_tunnel_and_through_forward() {
    use std::process::Command;
    let ca = TestCa::new("sea-orm-tunnel test CA").await.unwrap();
    // A and B have certificates for the address the bastion dials; C's does not name it.
    let good = ca.server_cert_for_names(&[DB_NAME, "127.0.0.1"]).await.unwrap();
    let wrong = ca.server_cert(DB_NAME).await.unwrap();
    let (a, b, c, sshd) = tokio::join!(
        TempPostgres::start_tls(&good),
        TempPostgres::start_tls(&good),
        TempPostgres::start_tls(&wrong),
        OpenSshd::start()
    );
    let (a, b, c, sshd) = (a.unwrap(), b.unwrap(), c.unwrap(), sshd.unwrap());
    // A is read-only: read-write passes it by.
    let admin_a = tls_checker(&a).await;
    admin_a
        .execute_unprepared("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    let _: bool = scalar(&admin_a, "SELECT pg_reload_conf()").await;
    let multi = |ports: &[u16]| {
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!(
            "postgres://{}:{}@{}/postgres?{}&target_session_attrs=read-write",
            a.user(),
            a.password(),
            hosts.join(","),
            verify_full(ca.cert_path())
        )
    };
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // The manager: A is read-only, C fails verification (the tunnel logs it and sends nothing
    // else to C), B is verified and takes the pool.
    let manager = ConnectionManager::new(config(&sshd, &a, multi(&[a.port(), c.port(), b.port()]), "tlsmh"))
        .await
        .expect("B qualifies");
    let port: String = scalar(manager.connection(), "SELECT current_setting('port')").await;
    assert_eq!(port, b.port().to_string());
    let on_b = tls_checker(&b).await;
    let (total, on_tls) = tls_backends(&on_b, "tlsmh").await;
    assert!(total >= 1 && on_tls == total, "{on_tls} of {total} on TLS");
    manager.shutdown(Duration::from_secs(2)).await;
    // With no B, the error names every host and what it was, C's certificate included.
    let error = refused(config(&sshd, &a, multi(&[a.port(), c.port()]), "tlsmn")).await;
    let text = error.to_string();
    assert!(matches!(error, Error::NoSuitableHost { .. }), "{error:?}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", a.port())) && text.contains("read-only"),
        "{text}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}", c.port())) && text.contains("certificate"),
        "{text}"
    );
    assert!(!text.contains(a.password()), "no secret in {text}");

    // forward: libpq clients through the printed URL, TLS held upstream for every endpoint.
    let psql = |conninfo: String| {
        let password = a.password().to_owned();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = Command::new("psql")
                    .arg(conninfo)
                    .args([
                        "-XAtc",
                        "SELECT current_setting('port') || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    ])
                    .env("PGPASSWORD", password)
                    .env("PGCONNECT_TIMEOUT", "20")
                    .output()
                    .unwrap();
                (
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    // A dead server first: its endpoint passes the client on to A (read-only, refused by
    // libpq), whose endpoint is next; then B, verified against its own name.
    for (ports, want) in [
        (vec![a.port(), b.port()], b.port()),
        (vec![dead, a.port(), b.port()], b.port()),
    ] {
        let mut forward = super::sidecar::Forward::start(&sshd, &a, &[], &[("DATABASE_URL", &multi(&ports))]);
        let lines = forward.lines_through("psql: ");
        let url = lines
            .iter()
            .find_map(|l| l.strip_prefix("DATABASE_URL="))
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            url.contains("sslmode=disable")
                && !url.contains("sslrootcert")
                && url.contains("target_session_attrs=read-write"),
            "{url}"
        );
        let (ok, got, stderr) = psql(url.replace(":***@", &format!(":{}@", a.password()))).await;
        assert!(ok && got == format!("{want} true"), "{ports:?}: {got} {stderr}");
        forward.signal("TERM");
        let (status, stderr) = tokio::task::spawn_blocking(move || forward.wait()).await.unwrap();
        assert!(status.success(), "{stderr}");
    }
    // A certificate that fails verification ends libpq's attempt, through forward as directly.
    let mut forward =
        super::sidecar::Forward::start(&sshd, &a, &[], &[("DATABASE_URL", &multi(&[c.port(), b.port()]))]);
    let lines = forward.lines_through("psql: ");
    let url = lines
        .iter()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .unwrap()
        .to_owned();
    let (ok, _, through_forward) = psql(url.replace(":***@", &format!(":{}@", a.password()))).await;
    assert!(!ok && through_forward.contains("certificate"), "{through_forward}");
    let (ok, _, directly) = psql(format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname=postgres sslmode=verify-full sslrootcert={}",
        c.port(),
        b.port(),
        a.user(),
        ca.cert_path().display()
    ))
    .await;
    assert!(!ok && directly.contains("certificate"), "{directly}");
    drop(forward);
    for pg in [&a, &b, &c] {
        assert_no_plaintext(pg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_hostaddr_list_dials_each_address_and_checks_each_servers_own_name() {
    let ca = TestCa::new("sea-orm-tunnel test CA").await.unwrap();
    // Each certificate names only its own server; the bastion dials 127.0.0.1 for both.
    let (cert_a, cert_b) = tokio::join!(ca.server_cert("db-a.internal"), ca.server_cert("db-b.internal"));
    let (cert_a, cert_b) = (cert_a.unwrap(), cert_b.unwrap());
    let (a, b, sshd) = tokio::join!(
        TempPostgres::start_tls(&cert_a),
        TempPostgres::start_tls(&cert_b),
        OpenSshd::start()
    );
    let (a, b, sshd) = (a.unwrap(), b.unwrap(), sshd.unwrap());
    // A is read-only: read-write passes it by.
    let admin_a = tls_checker(&a).await;
    admin_a
        .execute_unprepared("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    let _: bool = scalar(&admin_a, "SELECT pg_reload_conf()").await;
    let url = |names: [&str; 2], attrs: &str| {
        format!(
            "postgres://{}:{}@{}:{},{}:{}/postgres?hostaddr=127.0.0.1,127.0.0.1&{}&target_session_attrs={attrs}",
            a.user(),
            a.password(),
            names[0],
            a.port(),
            names[1],
            b.port(),
            verify_full(ca.cert_path())
        )
    };
    // The remote target comes from the URL (its first host), as with SSH_REMOTE_HOST unset.
    let through = |database_url: String, prefix: &str| {
        fast_config(database_url, prefix).tunnel(
            sshd.tunnel_config("", 0)
                .connect_timeout(Duration::from_secs(5))
                .reconnect(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_millis(500))),
        )
    };
    let manager = ConnectionManager::new(through(url(["db-a.internal", "db-b.internal"], "read-write"), "tlsha"))
        .await
        .expect("B qualifies, verified as db-b.internal");
    let tunnel = manager.tunnel().unwrap().config().clone();
    assert_eq!(tunnel.remote_host, "127.0.0.1", "the first hostaddr is dialled");
    assert_eq!(tunnel.alternate_targets, [("127.0.0.1".to_owned(), b.port())]);
    assert_eq!(tunnel.alternate_server_names, ["db-b.internal"]);
    let port: String = scalar(manager.connection(), "SELECT current_setting('port')").await;
    assert_eq!(port, b.port().to_string());
    let on_b = tls_checker(&b).await;
    let (total, on_tls) = tls_backends(&on_b, "tlsha").await;
    assert!(total >= 1 && on_tls == total, "{on_tls} of {total} on TLS");
    manager.shutdown(Duration::from_secs(2)).await;
    // A's name verified on A too: with any role accepted, A (first) takes the pool.
    let manager = ConnectionManager::new(through(url(["db-a.internal", "db-b.internal"], "any"), "tlshy"))
        .await
        .expect("A verified as db-a.internal");
    let port: String = scalar(manager.connection(), "SELECT current_setting('port')").await;
    assert_eq!(port, a.port().to_string());
    manager.shutdown(Duration::from_secs(2)).await;

    // The names swapped: each server's certificate is checked against the other's name, and
    // both fail; nothing but the TLS handshake reached them.
    let error = refused(through(url(["db-b.internal", "db-a.internal"], "read-write"), "tlshs")).await;
    let text = error.to_string();
    assert!(matches!(error, Error::NoSuitableHost { .. }), "{error:?}");
    assert_eq!(
        text.matches("certificate is not valid").count(),
        2,
        "both refused for their certificate: {text}"
    );
    assert!(
        text.contains("at db-b.internal") && text.contains("at db-a.internal"),
        "each checked against its own (swapped) name: {text}"
    );
    assert!(!text.contains(a.password()), "no secret in {text}");

    // forward: the same list for libpq clients; psql reaches B, on TLS.
    let mut forward = super::sidecar::Forward::start(
        &sshd,
        &a,
        &[],
        &[("DATABASE_URL", &url(["db-a.internal", "db-b.internal"], "read-write"))],
    );
    let lines = forward.lines_through("psql: ");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("endpoint ") && l.ends_with(&format!("for 127.0.0.1:{}", b.port()))),
        "{lines:?}"
    );
    let printed = lines.iter().find_map(|l| l.strip_prefix("DATABASE_URL=")).unwrap();
    assert!(
        !printed.contains("hostaddr"),
        "the local URL dials the endpoints: {printed}"
    );
    let conninfo = printed.replace(":***@", &format!(":{}@", a.password()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(conninfo)
            .args([
                "-XAtc",
                "SELECT current_setting('port') || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .env("PGCONNECT_TIMEOUT", "20")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{} true", b.port()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(forward);
    assert_no_plaintext(&a);
    assert_no_plaintext(&b);
}
