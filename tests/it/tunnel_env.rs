//! `SshTunnel::initialize_from_env` reads the real process environment. Changing the environment
//! of a running test needs `unsafe` (edition 2024), so the test re-runs its own binary as a child
//! process with the variables set, and the child does what a user's program would.

use std::process::Command;
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use sea_orm_tunnel::tunnel::SshTunnel;

use super::support::{env_block, servers, test_path};

/// Set in the child only.
const CHILD: &str = "SEA_ORM_TUNNEL_ENV_TEST_CHILD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_from_env_reads_the_environment_and_env_files() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let (pg, sshd) = servers().await;
    let dir = tempfile::tempdir().unwrap();
    // Part of the configuration comes from a `.env.local` in the child's working directory,
    // the rest (and a value the file would contradict) from the real environment, which wins.
    std::fs::write(
        dir.path().join(".env.local"),
        format!(
            "SSH_KNOWN_HOSTS={}\nSSH_KEEPALIVE_INTERVAL=1000\nSSH_PORT=1\n",
            sshd.known_hosts_path().display()
        ),
    )
    .unwrap();

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &test_path(
                module_path!(),
                "initialize_from_env_reads_the_environment_and_env_files",
            ),
            "--nocapture",
        ])
        .current_dir(dir.path())
        .env(CHILD, "1")
        .envs(env_block(&sshd, &pg))
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("child: SELECT 1 through the tunnel returned 1"),
        "the child did not query through the tunnel:\n{stdout}\n{stderr}"
    );
    assert!(!stdout.contains(pg.password()), "the password was printed:\n{stdout}");
}

/// The user's side: initialise from the environment, use the instance, reset.
async fn child() {
    assert!(
        matches!(SshTunnel::get_instance(), Err(sea_orm_tunnel::Error::NotInitialized(_))),
        "nothing is initialised yet"
    );
    let tunnel = SshTunnel::initialize_from_env().await.expect("initialize_from_env");
    let config = tunnel.config();
    // SSH_PORT from the environment beats the `.env.local` value; the file supplied the rest.
    assert_ne!(config.port, 1);
    assert_eq!(config.keepalive_interval, Duration::from_millis(1000));
    assert!(config.known_hosts.ends_with("known_hosts"));

    let addr = tunnel.local_endpoint().tcp_addr().expect("a TCP endpoint by default");
    let url = std::env::var("DATABASE_URL").unwrap();
    let (credentials, _) = url.rsplit_once('@').unwrap();
    let db = Database::connect(format!("{credentials}@{addr}/postgres"))
        .await
        .expect("connects");
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT 1::int4"))
        .await
        .unwrap()
        .unwrap();
    let one: i32 = row.try_get_by_index(0).unwrap();
    println!("child: SELECT 1 through the tunnel returned {one}");
    db.close().await.unwrap();

    // The same instance again, then a reset.
    let again = SshTunnel::initialize_from_env().await.unwrap();
    assert_eq!(again.local_endpoint(), tunnel.local_endpoint());
    SshTunnel::reset_instance().await;
    assert!(SshTunnel::get_instance().is_err());
    assert!(!tunnel.is_connected());
}
