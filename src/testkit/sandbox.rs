//! [`Sandbox`]: a complete throwaway environment — PostgreSQL behind an in-process SSH bastion —
//! with a [`Config`] that reaches it through a verified tunnel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{AuthConfig, Config, HostKeyPolicy, TunnelConfig};
use crate::testkit::{Bastion, TempPostgres};

/// PostgreSQL behind an SSH bastion, both private to this process and on loopback.
///
/// Needs no `sshd` and no configuration: the bastion is the in-process [`Bastion`], the client
/// key is generated into a temp dir, and the bastion's host key is written to a private
/// `known_hosts`, so [`Sandbox::config`] verifies the host key strictly like a production setup.
///
/// This is what `cargo run --example quickstart` runs on when no `DATABASE_URL`/`SSH_HOST` is set.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::Sandbox;
///
/// let sandbox = Sandbox::start().await?;
/// let config = sandbox.config(); // tunnel through the bastion to PostgreSQL
/// # let _ = config;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Sandbox {
    postgres: TempPostgres,
    bastion: Bastion,
    key_path: PathBuf,
    known_hosts: PathBuf,
    // Holds the key and known_hosts files; removed on drop.
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// Starts PostgreSQL and a bastion that forwards only to it, generates and authorises a
    /// client key, and records the bastion's host key in a private known_hosts file.
    pub async fn start() -> crate::Result<Sandbox> {
        let postgres = TempPostgres::start().await?;
        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-sandbox-")
            .tempdir()
            .map_err(|source| crate::Error::Io {
                context: "creating the sandbox directory".into(),
                source: source.into(),
            })?;
        let (key_path, public_key) = Bastion::generate_client_key(dir.path())?;
        let bastion = Bastion::builder()
            .authorize_key(public_key)
            .allow_target(postgres.host(), postgres.port())
            .start()
            .await?;
        let known_hosts = dir.path().join("known_hosts");
        bastion.write_known_hosts(&known_hosts)?;
        Ok(Sandbox {
            postgres,
            bastion,
            key_path,
            known_hosts,
            dir,
        })
    }

    /// A development-profile [`Config`] whose tunnel goes through the bastion to PostgreSQL, with
    /// strict host-key checking against the sandbox's known_hosts. Keepalive and reconnect delays
    /// are shortened so faults show within a second or two.
    pub fn config(&self) -> Config {
        Config::new(self.postgres.url()).tunnel(self.tunnel_config())
    }

    /// The tunnel part of [`Sandbox::config`], for using [`SshTunnel`](crate::tunnel::SshTunnel) alone.
    pub fn tunnel_config(&self) -> TunnelConfig {
        TunnelConfig::new(self.bastion.addr().ip().to_string(), self.bastion.user())
            .port(self.bastion.port())
            .auth(AuthConfig::key_file(&self.key_path).use_agent(false))
            .known_hosts(&self.known_hosts)
            .host_key_policy(HostKeyPolicy::Strict)
            .remote(self.postgres.host(), self.postgres.port())
            .keepalive_interval(Duration::from_millis(500))
            .keepalive_max(2)
            .map_reconnect(|p| p.initial_delay(Duration::from_millis(100)).max_retries(0))
    }

    /// The PostgreSQL server.
    pub fn postgres(&self) -> &TempPostgres {
        &self.postgres
    }

    /// The bastion (for fault injection: `drop_sessions`, `blackhole`, ...).
    pub fn bastion(&self) -> &Bastion {
        &self.bastion
    }

    /// The generated client private key.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The private known_hosts file holding the bastion's host key.
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }

    /// The directory holding the key and known_hosts files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
