//! [`PgBouncer`]: the system `pgbouncer` in front of a [`TempPostgres`], on a free loopback port.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::TempPostgres;
use super::util::{self, OsUser, Result, Signal, TestkitError};

const INSTALL: &str = "apt-get install pgbouncer";
/// Generous: PgBouncer starts in milliseconds, but CI machines are loaded.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// PgBouncer's pooling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoolMode {
    /// A server connection per client transaction (what replicas at scale run).
    #[default]
    Transaction,
    /// A server connection per client connection.
    Session,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// Options for [`PgBouncer`]: [`PgBouncer::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PgBouncerBuilder {
    mode: PoolMode,
    default_pool_size: u32,
    max_client_conn: u32,
    ignore_startup_parameters: Vec<String>,
}

impl PgBouncerBuilder {
    /// Pool mode. Default [`PoolMode::Transaction`].
    pub fn mode(mut self, mode: PoolMode) -> Self {
        self.mode = mode;
        self
    }

    /// `default_pool_size`: server connections per database/user pair. Default 5.
    pub fn default_pool_size(mut self, size: u32) -> Self {
        self.default_pool_size = size;
        self
    }

    /// `max_client_conn`. Default 1000.
    pub fn max_client_conn(mut self, max: u32) -> Self {
        self.max_client_conn = max;
        self
    }

    /// `ignore_startup_parameters` (e.g. `extra_float_digits`). Default none, as PgBouncer ships:
    /// a client that sends other parameters is refused with "unsupported startup parameter".
    pub fn ignore_startup_parameter(mut self, name: impl Into<String>) -> Self {
        self.ignore_startup_parameters.push(name.into());
        self
    }

    /// Writes the configuration and starts PgBouncer in front of `pg`.
    pub async fn start(self, pg: &TempPostgres) -> Result<PgBouncer> {
        PgBouncer::start_with(self, pg).await
    }
}

/// The system PgBouncer (`/usr/sbin/pgbouncer`) with a private configuration in a temp dir, in
/// front of one [`TempPostgres`]: listens on `127.0.0.1` on a free port, SCRAM authentication
/// with the server's superuser credentials, every database of the server (`* = ...`), the admin
/// console (`pgbouncer` database) for that user.
///
/// Faults: [`stop`](Self::stop) / [`start_again`](Self::start_again) / [`restart`](Self::restart),
/// [`pause`](Self::pause) / [`resume`](Self::resume) (PgBouncer's `PAUSE` / `RESUME`).
///
/// When the process runs as root, PgBouncer runs as the unprivileged `postgres` OS user (it
/// refuses to run as root). Dropping it kills the server and removes its directory.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::{PgBouncer, PoolMode, TempPostgres};
///
/// let pg = TempPostgres::start().await?;
/// let bouncer = PgBouncer::builder().mode(PoolMode::Transaction).default_pool_size(5).start(&pg).await?;
/// println!("PgBouncer at {}", bouncer.url());
/// # Ok(()) }
/// ```
pub struct PgBouncer {
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    psql: Option<PathBuf>,
    run_as: Option<OsUser>,
    port: AtomicU16,
    user: String,
    password: String,
    database: String,
    mode: PoolMode,
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("dir", &self.dir.path())
            .field("port", &self.port())
            .field("mode", &self.mode)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

impl PgBouncer {
    /// [`builder`](Self::builder) with its defaults: transaction mode, pool size 5.
    pub async fn start(pg: &TempPostgres) -> Result<PgBouncer> {
        Self::builder().start(pg).await
    }

    /// Options: mode, pool size, client limit, ignored startup parameters.
    pub fn builder() -> PgBouncerBuilder {
        PgBouncerBuilder {
            mode: PoolMode::Transaction,
            default_pool_size: 5,
            max_client_conn: 1000,
            ignore_startup_parameters: Vec::new(),
        }
    }

    async fn start_with(options: PgBouncerBuilder, pg: &TempPostgres) -> Result<PgBouncer> {
        let bin = util::find_binary(
            "pgbouncer",
            &[
                PathBuf::from("/usr/sbin"),
                PathBuf::from("/usr/local/sbin"),
                PathBuf::from("/usr/bin"),
            ],
            INSTALL,
        )?;
        let psql = util::find_binary(
            "psql",
            &[PathBuf::from("/usr/bin")],
            "apt-get install postgresql-client",
        )
        .ok();
        let run_as = if util::is_root() {
            Some(util::lookup_user("postgres").ok_or_else(|| {
                TestkitError::Unsupported(
                    "running as root, but there is no `postgres` OS user to run PgBouncer as (it refuses \
                     to run as root; `apt-get install postgresql` creates the user)"
                        .to_owned(),
                )
            })?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-pgbouncer-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp dir for PgBouncer", e))?;
        if let Some(user) = &run_as {
            util::chown(dir.path(), user)?;
        }
        let bouncer = PgBouncer {
            child: Mutex::new(None),
            bin,
            psql,
            run_as,
            port: AtomicU16::new(util::free_port()?),
            user: pg.user().to_owned(),
            password: pg.password().to_owned(),
            database: pg.database(),
            mode: options.mode,
            dir,
        };
        let userlist = bouncer.dir.path().join("userlist.txt");
        write_private(
            &userlist,
            &format!("\"{}\" \"{}\"\n", bouncer.user, bouncer.password),
            bouncer.run_as.as_ref(),
        )?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            bouncer.write_config(&options, pg)?;
            match bouncer.spawn_and_wait().await {
                Ok(()) => return Ok(bouncer),
                Err(e) if attempts < 5 && e.to_string().contains("Address already in use") => {
                    bouncer.port.store(util::free_port()?, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The port PgBouncer listens on; stable across restarts.
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// The pool mode it runs in.
    pub fn mode(&self) -> PoolMode {
        self.mode
    }

    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/DB`: the server's database through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            self.user,
            self.password,
            self.port(),
            self.database
        )
    }

    /// The temp dir holding `pgbouncer.ini`, `userlist.txt` and `pgbouncer.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PgBouncer's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills PgBouncer (every client and server connection goes with it).
    pub async fn stop(&self) -> Result<()> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            util::signal(child.id(), Signal::KILL);
            if util::wait_child(&mut child, Duration::from_secs(10)).await.is_none() {
                util::kill_and_reap_blocking(&mut child);
            }
        }
        Ok(())
    }

    /// Starts it again on the same port. Starting a running PgBouncer does nothing.
    pub async fn start_again(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn_and_wait().await
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// `PAUSE`: waits for server connections to be released, then holds new queries.
    pub async fn pause(&self) -> Result<String> {
        self.admin("PAUSE").await
    }

    /// `RESUME` after [`pause`](Self::pause).
    pub async fn resume(&self) -> Result<String> {
        self.admin("RESUME").await
    }

    /// Runs an admin-console command (`SHOW POOLS`, `SHOW SERVERS`, ...) with `psql` and returns
    /// its unaligned output (`|`-separated, header first).
    pub async fn admin(&self, command: &str) -> Result<String> {
        let psql = match &self.psql {
            Some(psql) => psql.clone(),
            None => util::find_binary(
                "psql",
                &[PathBuf::from("/usr/bin")],
                "apt-get install postgresql-client",
            )?,
        };
        let mut cmd = Command::new(&psql);
        cmd.args(["-X", "-A", "-h", "127.0.0.1", "-p"])
            .arg(self.port().to_string())
            .args(["-U", &self.user, "-d", "pgbouncer", "-c", command])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        let out = util::run(cmd, "psql to the PgBouncer admin console").await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn write_config(&self, options: &PgBouncerBuilder, pg: &TempPostgres) -> Result<()> {
        let dir = self.dir.path().display();
        let ignore = options.ignore_startup_parameters.join(",");
        let config = format!(
            "; Generated by sea-orm-tunnel's test kit.\n\
             [databases]\n\
             * = host=127.0.0.1 port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {dir}/userlist.txt\n\
             admin_users = {user}\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = {max_client}\n\
             ignore_startup_parameters = {ignore}\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n\
             server_login_retry = 1\n\
             log_connections = 1\n\
             log_disconnections = 1\n",
            pg_port = pg.port(),
            port = self.port(),
            user = self.user,
            mode = options.mode.as_str(),
            pool = options.default_pool_size,
            max_client = options.max_client_conn,
        );
        write_private(&self.config_path(), &config, self.run_as.as_ref())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.ini")
    }

    async fn spawn_and_wait(&self) -> Result<()> {
        let _ = std::fs::remove_file(self.dir.path().join("pgbouncer.pid"));
        let stderr_path = self.dir.path().join("stderr.log");
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|e| TestkitError::io(format!("opening {}", stderr_path.display()), e))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        let child = cmd
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.bin.display()), e))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let started = Instant::now();
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(Ok(Some(status))) = guard.as_mut().map(|c| c.try_wait()) {
                    guard.take();
                    return Err(TestkitError::Process {
                        what: "pgbouncer".to_owned(),
                        message: format!(
                            "exited during startup ({status}):\n{}\n{}",
                            util::log_tail(&stderr_path, 10),
                            util::log_tail(&self.log_path(), 10)
                        ),
                    });
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port())).is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = self.stop().await;
                return Err(TestkitError::Timeout {
                    what: "pgbouncer".to_owned(),
                    after: READY_TIMEOUT,
                    detail: format!("; log:\n{}", util::log_tail(&self.log_path(), 20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            util::kill_and_reap_blocking(&mut child);
        }
    }
}

/// Writes `contents` readable only by its owner (`run_as` when set: PgBouncer must read it).
fn write_private(path: &Path, contents: &str, run_as: Option<&OsUser>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| TestkitError::io(format!("chmod {}", path.display()), e))?;
    if let Some(user) = run_as {
        util::chown(path, user)?;
    }
    Ok(())
}
