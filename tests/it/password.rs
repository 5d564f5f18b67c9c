//! A rotating database password (`DATABASE_PASSWORD_FILE`, providers) through a real sshd to a
//! real PostgreSQL: the role's password changes in PostgreSQL and in the file mid-load, and after
//! the recovery bound no request fails; a password that stays rejected becomes a permanent error
//! naming the file, never the password.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{BackoffPolicy, Config, Credential, PasswordSource};
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};

/// Writes the file as Vault Agent and Kubernetes do: a new file renamed over the old one.
fn rotate_file(path: &Path, password: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, format!("{password}\n")).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn role(admin: &sea_orm::DatabaseConnection, name: &str, password: &str) {
    admin
        .execute_unprepared(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
        .await
        .unwrap();
}

fn config(pg: &TempPostgres, sshd: &OpenSshd, user: &str, prefix: &str) -> Config {
    let url = format!("postgres://{user}@127.0.0.1:{}/{}", pg.port(), pg.database());
    let tunnel = sshd.tunnel_config("127.0.0.1", pg.port());
    fast_config(url, prefix)
        // Short lifetimes: connections are replaced all the time, so new logins run under load.
        .map_pool(|p| p.max_connections(4).max_lifetime(Duration::from_millis(400)))
        .recovery(
            BackoffPolicy::new(Duration::from_millis(50))
                .max_delay(Duration::from_millis(300))
                .max_retries(20),
        )
        .tunnel(tunnel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_in_postgres_and_in_the_file_mid_load_loses_no_request_after_the_bound() {
    let (pg, sshd) = servers().await;
    let admin = checker(&pg.url()).await;
    role(&admin, "rotating", "first-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db-password");
    rotate_file(&file, "first-secret");

    let manager = ConnectionManager::new(config(&pg, &sshd, "rotating", "rot").password_file(&file))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (manager, stop, served, failures) = (manager.clone(), stop.clone(), served.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match manager.retry(|db| async move { select_one(&db).await }).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push((Instant::now(), e.to_string()));
                        0
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let opened_before = manager.stats().connections_opened;

    // The secret store rotates: the server first, the file a moment later (the worst order).
    admin
        .execute_unprepared("ALTER ROLE rotating PASSWORD 'second-secret'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rotate_file(&file, "second-secret");
    let rotated = Instant::now();
    let bound = Duration::from_secs(3);
    tokio::time::sleep(bound + Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    let late: Vec<_> = failures
        .iter()
        .filter(|(at, _)| at.saturating_duration_since(rotated) > bound)
        .collect();
    assert!(late.is_empty(), "requests failed after the bound: {late:?}");
    assert!(served.load(Ordering::Relaxed) > 100, "load ran");
    // New logins happened after the rotation, so they used the new password.
    assert!(
        manager.stats().connections_opened >= opened_before + 4,
        "connections were replaced with the new password: {} -> {}",
        opened_before,
        manager.stats().connections_opened
    );
    let user: String = scalar(manager.connection(), "SELECT current_user::text").await;
    assert_eq!(user, "rotating");
    for (_, e) in &failures {
        assert!(!e.contains("secret"), "no password in errors: {e}");
    }
    eprintln!(
        "{} served, {} failed (all within the bound)",
        served.load(Ordering::Relaxed),
        failures.len()
    );
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_that_stays_rejected_is_a_permanent_error_naming_the_file() {
    let (pg, sshd) = servers().await;
    let admin = checker(&pg.url()).await;
    role(&admin, "stale", "old-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db-password");
    rotate_file(&file, "old-secret");
    let source = PasswordSource::file(&file).rejection_grace(Duration::from_millis(800));
    let manager = ConnectionManager::new(config(&pg, &sshd, "stale", "stale").password_source(source))
        .await
        .unwrap();
    select_one(manager.connection()).await.unwrap();

    // The server's password changes; the file never follows.
    admin
        .execute_unprepared("ALTER ROLE stale PASSWORD 'new-secret'")
        .await
        .unwrap();
    // Let every pooled connection expire, so the next query needs a new login.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    let error = manager
        .retry(|db| async move { select_one(&db).await })
        .await
        .expect_err("the old password is refused");
    assert!(matches!(error, Error::PasswordRejected { .. }), "{error:?}");
    assert!(!error.is_transient(), "permanent after the grace: {error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after the grace, not a loop"
    );
    let text = error.to_string();
    assert!(
        text.contains("DATABASE_PASSWORD_FILE") && text.contains(&file.display().to_string()),
        "{text}"
    );
    assert!(!text.contains("old-secret") && !text.contains("new-secret"), "{text}");

    // The file catches up: served again without a restart.
    rotate_file(&file, "new-secret");
    eventually("served with the rotated password", || async {
        select_one(manager.connection()).await.is_ok()
    })
    .await;
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_provider_supplies_the_password_and_is_asked_again_when_it_is_refused() {
    let (pg, sshd) = servers().await;
    let admin = checker(&pg.url()).await;
    role(&admin, "tokened", "token-1").await;
    let current = Arc::new(std::sync::Mutex::new("token-1".to_owned()));
    let calls = Arc::new(AtomicU64::new(0));
    let provider = {
        let (current, calls) = (current.clone(), calls.clone());
        move || {
            let (current, calls) = (current.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                let token = current.lock().unwrap().clone();
                // A short-lived token: refreshed ahead of this expiry anyway.
                Ok(Credential::new(token).expires_at(std::time::SystemTime::now() + Duration::from_secs(900)))
            }
        }
    };
    let manager = ConnectionManager::new(
        config(&pg, &sshd, "tokened", "tok").password_source(PasswordSource::provider(provider)),
    )
    .await
    .unwrap();
    select_one(manager.connection()).await.unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 1, "asked once at start");

    admin
        .execute_unprepared("ALTER ROLE tokened PASSWORD 'token-2'")
        .await
        .unwrap();
    *current.lock().unwrap() = "token-2".to_owned();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The next login is refused with token-1; the provider is asked again at once and the
    // retry logs in with token-2 (the next scheduled refresh is ~14 minutes away).
    manager
        .retry(|db| async move { select_one(&db).await })
        .await
        .expect("served after a fresh token");
    assert!(calls.load(Ordering::Relaxed) >= 2, "asked again after the refusal");
    manager.shutdown(Duration::from_secs(2)).await;
}

#[test]
fn a_url_password_and_a_password_file_together_are_refused() {
    let e = Config::new("postgres://app:pw@db.internal/app")
        .password_file("/run/secrets/db")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("password_source") && e.contains("carries a password"), "{e}");
    assert!(!e.contains("pw@"), "{e}");
    Config::new("postgres://app@db.internal/app")
        .password_file("/run/secrets/db")
        .validate()
        .unwrap();
}

#[test]
fn the_password_file_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let env = |url: &str| {
        let url = url.to_owned();
        let home = dir.path().to_str().unwrap().to_owned();
        move |name: &str| match name {
            "DATABASE_URL" => Some(url.clone()),
            "DATABASE_PASSWORD_FILE" => Some("~/secrets/db".to_owned()),
            "HOME" => Some(home.clone()),
            _ => None,
        }
    };
    let config = Config::from_env_with(env("postgres://app@db.internal/app")).unwrap();
    let source = config.password_source.expect("DATABASE_PASSWORD_FILE read");
    assert_eq!(
        source.describe(),
        format!("DATABASE_PASSWORD_FILE ({:?})", dir.path().join("secrets/db"))
    );
    let e = Config::from_env_with(env("postgres://app:pw@db.internal/app"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DATABASE_PASSWORD_FILE") && e.contains("DATABASE_URL carries a password"),
        "{e}"
    );
}
