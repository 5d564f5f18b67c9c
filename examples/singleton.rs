//! Run with: `cargo run --example singleton`
//!
//! The process-wide tunnel: `initialize_instance` / `get_instance` / `reset_instance`.
//!
//! With `SSH_HOST` (and `SSH_USER`, `DATABASE_URL`, ...) set, the tunnel comes from the
//! environment (`SshTunnel::initialize_from_env`). Without them a throwaway PostgreSQL and an
//! in-process SSH bastion are started on loopback (`testkit::Sandbox`), so the example runs with
//! zero configuration.
//!
//! Prefer passing `SshTunnel` handles (they are `Clone`); the facade is for code that is shaped
//! around a global `getInstance()`.

use std::process::ExitCode;

use sea_orm::{ConnectionTrait, Database, Statement};
use sea_orm_tunnel::testkit::Sandbox;
use sea_orm_tunnel::tunnel::SshTunnel;
use sea_orm_tunnel::url::local_database_url;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Before initialisation the facade answers with an error, never a panic.
    match SshTunnel::get_instance() {
        Err(e) => println!("get_instance before initialisation: {e}"),
        Ok(_) => unreachable!("nothing initialised the tunnel yet"),
    }

    // Either the user's own bastion from the environment, or a private sandbox.
    let (sandbox, tunnel, database_url) = if std::env::var_os("SSH_HOST").is_some() {
        let tunnel = SshTunnel::initialize_from_env().await?;
        let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is required with SSH_HOST")?;
        (None, tunnel, url)
    } else {
        println!("no SSH_HOST set: starting a throwaway PostgreSQL and SSH bastion on loopback");
        let sandbox = Sandbox::start().await?;
        let tunnel = SshTunnel::initialize_instance(sandbox.tunnel_config()).await?;
        let url = sandbox.postgres().url();
        (Some(sandbox), tunnel, url)
    };
    println!("initialize_instance: connected = {}", tunnel.is_connected());
    println!("local endpoint: {}", tunnel.local_endpoint());

    // A second initialisation returns the existing instance.
    let again = match &sandbox {
        Some(s) => SshTunnel::initialize_instance(s.tunnel_config()).await?,
        None => SshTunnel::initialize_from_env().await?,
    };
    println!(
        "initialize_instance again: same endpoint = {}",
        again.local_endpoint() == tunnel.local_endpoint()
    );

    // Anywhere in the program: fetch the instance and use its endpoint.
    let instance = SshTunnel::get_instance()?;
    // The remote port names a Unix-socket endpoint's file; for TCP it is not used.
    let remote_port = instance.config().remote_port;
    let url = local_database_url(&database_url, instance.local_endpoint(), remote_port)?;
    let db = Database::connect(url.as_str()).await?;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_user::text AS who, version() AS version",
        ))
        .await?
        .ok_or("no row")?;
    let who: String = row.try_get("", "who")?;
    let version: String = row.try_get("", "version")?;
    println!(
        "query through the tunnel: user {who} on {}",
        version.split(',').next().unwrap_or("")
    );
    db.close().await?;

    // reset_instance disconnects; get_instance is then an error again.
    SshTunnel::reset_instance().await;
    println!("reset_instance: old handle connected = {}", instance.is_connected());
    match SshTunnel::get_instance() {
        Err(e) => println!("get_instance after reset: {e}"),
        Ok(_) => return Err("get_instance succeeded after reset_instance".into()),
    }
    drop(sandbox);
    Ok(())
}
