//! [`TempPostgres`]: a throwaway PostgreSQL server on a free loopback port.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::certs::CertPair;
use super::util::{self, OsUser, Result, Signal, TestkitError};

const INSTALL: &str = "apt-get install postgresql";
/// How long a start may take on a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before it is escalated to SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The template's name for itself; bump when the template layout or initdb options change.
const TEMPLATE_LAYOUT: &str = "v1";

/// A private PostgreSQL server for tests: `initdb` in a temp dir, password (SCRAM) auth for a
/// generated superuser, listening on `127.0.0.1` on a free port only.
///
/// Tuned for speed, not durability (`fsync=off`, `synchronous_commit=off`, `full_page_writes=off`).
/// When the process runs as root, PostgreSQL runs as the unprivileged `postgres` OS user (it
/// refuses to run as root).
///
/// Startup is fast because `initdb` runs once per machine into a template cache
/// (`$TMPDIR/sea-orm-tunnel-testkit-<uid>/`, safe to delete) that is copied per instance.
///
/// Dropping it stops the server (immediate shutdown) and removes its directory.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::TempPostgres;
///
/// let pg = TempPostgres::start().await?;
/// let db = sea_orm::Database::connect(pg.url()).await?;
/// pg.restart().await?;
/// # Ok(()) }
/// ```
pub struct TempPostgres {
    // Declared first so it is dropped last: the directory outlives the server.
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<OsUser>,
    /// Fixed after the first successful start.
    port: AtomicU16,
    user: String,
    password: String,
    /// Extra `-c name=value` settings (TLS).
    settings: Vec<String>,
}

/// TLS for [`TempPostgres::start_tls_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgServerTls {
    /// The server's certificate and key.
    pub server: CertPair,
    /// CA whose client certificates the server accepts (`ssl_ca_file`); needed for `cert`.
    pub client_ca: Option<PathBuf>,
    /// A role that logs in with a client certificate (pg_hba `cert`: the certificate's CN must
    /// be this name). The role is not created: create it with the superuser.
    pub cert_user: Option<String>,
}

impl PgServerTls {
    /// TLS with `server`'s certificate, password logins only.
    pub fn new(server: &CertPair) -> Self {
        PgServerTls {
            server: server.clone(),
            client_ca: None,
            cert_user: None,
        }
    }

    /// `user` logs in with a client certificate signed by `client_ca` (pg_hba `cert`).
    #[must_use]
    pub fn cert_auth(mut self, client_ca: impl Into<PathBuf>, user: impl Into<String>) -> Self {
        self.client_ca = Some(client_ca.into());
        self.cert_user = Some(user.into());
        self
    }
}

impl fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempPostgres")
            .field("dir", &self.dir.path())
            .field("port", &self.port())
            .field("user", &self.user)
            .field("password", &"[REDACTED]")
            .field("running", &self.is_running())
            .finish()
    }
}

/// An `initdb`-ed data directory that instances copy.
struct Template {
    data_dir: PathBuf,
    user: String,
    password: String,
}

static TEMPLATE: OnceCell<Template> = OnceCell::const_new();

impl TempPostgres {
    /// Creates a fresh cluster and starts it; returns once it accepts connections.
    ///
    /// Fails with [`TestkitError::MissingBinary`] (naming `apt-get install postgresql`) when
    /// `initdb`/`postgres` are not on `PATH` or in `/usr/lib/postgresql/*/bin`.
    pub async fn start() -> Result<TempPostgres> {
        Self::start_with(None).await
    }

    /// [`start`](Self::start) with TLS only: `ssl=on` with `server`'s certificate, and a
    /// pg_hba.conf of `hostssl` lines only (a plaintext TCP connection is refused, and the
    /// refusal is logged as `no encryption`). `log_connections` is on, so the log shows each
    /// connection's TLS.
    pub async fn start_tls(server: &CertPair) -> Result<TempPostgres> {
        Self::start_with(Some(PgServerTls::new(server))).await
    }

    /// [`start_tls`](Self::start_tls) with client-certificate authentication (see [`PgServerTls`]).
    pub async fn start_tls_with(tls: PgServerTls) -> Result<TempPostgres> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<PgServerTls>) -> Result<TempPostgres> {
        let bin_dir = find_bin_dir()?;
        let run_as = if util::is_root() {
            Some(util::lookup_user("postgres").ok_or_else(|| {
                TestkitError::Unsupported(
                    "running as root, but there is no `postgres` OS user to run PostgreSQL as \
                     (PostgreSQL refuses to run as root; `apt-get install postgresql` creates it)"
                        .to_owned(),
                )
            })?)
        } else {
            None
        };
        let template = TEMPLATE
            .get_or_try_init(|| build_or_load_template(bin_dir.clone(), run_as.clone()))
            .await?;

        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-pg-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp dir for PostgreSQL", e))?;
        if let Some(user) = &run_as {
            util::chown(dir.path(), user)?;
        }
        let data_dir = dir.path().join("data");
        // `cp -a` keeps the owner (postgres) and the 0700 mode PostgreSQL insists on.
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&template.data_dir).arg(&data_dir);
        util::run(cp, "copying the PostgreSQL template").await?;
        let settings = match &tls {
            Some(tls) => install_tls(dir.path(), &data_dir, tls, run_as.as_ref())?,
            None => Vec::new(),
        };

        let pg = TempPostgres {
            child: Mutex::new(None),
            log_path: dir.path().join("postgres.log"),
            data_dir,
            dir,
            bin_dir,
            run_as,
            port: AtomicU16::new(util::free_port()?),
            user: template.user.clone(),
            password: template.password.clone(),
            settings,
        };
        match pg.spawn_on_a_free_port().await {
            Ok(()) => Ok(pg),
            Err(TestkitError::Process { what, message }) => Err(TestkitError::Process {
                what,
                message: format!(
                    "{message}\n(if this persists, delete the template cache {})",
                    template.data_dir.parent().unwrap_or(&template.data_dir).display()
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Starts the server; the free port may be taken between probing and binding it: then
    /// another is tried (5 attempts).
    async fn spawn_on_a_free_port(&self) -> Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.spawn_and_wait().await {
                Err(e) if attempts < 5 && e.to_string().contains("Address already in use") => {
                    self.port.store(util::free_port()?, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// A streaming-replication standby of this server: `pg_basebackup -R -X stream` into a new
    /// instance (same credentials, its own port and directory), started and replaying. It is
    /// in recovery (`pg_is_in_recovery()` true, read-only) until [`promote`](Self::promote).
    pub async fn start_standby(&self) -> Result<TempPostgres> {
        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-pg-standby-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp dir for the standby", e))?;
        if let Some(user) = &self.run_as {
            util::chown(dir.path(), user)?;
        }
        let data_dir = dir.path().join("data");
        let mut backup = self.command("pg_basebackup");
        backup
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port().to_string())
            .arg("-U")
            .arg(&self.user)
            .arg("-D")
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"])
            .env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable");
        util::run(backup, "pg_basebackup").await?;
        let standby = TempPostgres {
            child: Mutex::new(None),
            log_path: dir.path().join("postgres.log"),
            data_dir,
            dir,
            bin_dir: self.bin_dir.clone(),
            run_as: self.run_as.clone(),
            port: AtomicU16::new(util::free_port()?),
            user: self.user.clone(),
            password: self.password.clone(),
            settings: self.settings.clone(),
        };
        standby.spawn_on_a_free_port().await?;
        Ok(standby)
    }

    /// Promotes a standby ([`start_standby`](Self::start_standby)) to a primary
    /// (`pg_ctl promote --wait`): returns once it accepts writes.
    pub async fn promote(&self) -> Result<()> {
        let mut promote = self.command("pg_ctl");
        promote
            .arg("promote")
            .arg("-w")
            .arg("-t")
            .arg("30")
            .arg("-D")
            .arg(&self.data_dir);
        util::run(promote, "pg_ctl promote").await.map(drop)
    }

    /// `postgres://USER:PASSWORD@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for(&self.database())
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            self.user,
            self.password,
            self.port(),
            database
        )
    }

    /// Always `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The TCP port; it stays the same across [`stop`](Self::stop) / [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// The superuser's name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The superuser's password (test credentials; still never printed by `Debug`).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The default database, `postgres`.
    pub fn database(&self) -> String {
        "postgres".to_owned()
    }

    /// The instance's directory (data dir, socket, `postgres.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log, for debugging failed tests.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the postmaster is running.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Fast shutdown (SIGINT: roll back open transactions, disconnect clients, checkpoint);
    /// returns when the server has exited. Stopping a stopped server does nothing.
    pub async fn stop(&self) -> Result<()> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut child) = child else { return Ok(()) };
        util::signal(child.id(), Signal::INT);
        if util::wait_child(&mut child, STOP_TIMEOUT).await.is_none() {
            let pids = util::descendants(child.id());
            util::kill_and_reap_blocking(&mut child);
            pids.iter().for_each(|&p| util::signal(p, Signal::KILL));
            return Err(TestkitError::Timeout {
                what: "PostgreSQL fast shutdown".to_owned(),
                after: STOP_TIMEOUT,
                detail: " (killed it)".to_owned(),
            });
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same data. Starting a running server
    /// does nothing.
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

    /// Crashes the server: SIGKILL to the postmaster and every backend, no shutdown. The next
    /// [`start_again`](Self::start_again) runs crash recovery.
    pub fn kill(&self) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let pids = util::descendants(child.id());
            // The postmaster first, or it would restart the backends we kill.
            util::kill_and_reap_blocking(&mut child);
            pids.iter().for_each(|&p| util::signal(p, Signal::KILL));
            // Backends must be gone before a restart: a live one still holds the shared memory.
            util::wait_gone_blocking(&pids, Duration::from_secs(5));
        }
    }

    /// Creates a database owned by the superuser and returns its URL.
    ///
    /// `name` must be a plain identifier (ASCII letters, digits, `_`).
    pub async fn create_database(&self, name: &str) -> crate::Result<String> {
        use sea_orm::ConnectionTrait;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(crate::Error::config(
                "database name",
                format!("{name:?} is not a plain identifier (letters, digits, _)"),
            ));
        }
        let db = sea_orm::Database::connect(self.url()).await?;
        db.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await?;
        db.close().await?;
        Ok(self.url_for(name))
    }

    async fn spawn_and_wait(&self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| TestkitError::io(format!("opening {}", self.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the log file handle", e))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D").arg(&self.data_dir).arg("-p").arg(self.port().to_string());
        let socket_dir = format!("unix_socket_directories={}", self.dir.path().display());
        for setting in [
            "listen_addresses=127.0.0.1",
            socket_dir.as_str(),
            // Speed over durability: this data is thrown away.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            // Pools of 100 (production profile) in several managers at once.
            "max_connections=300",
            "shared_buffers=32MB",
            // Dynamic shared memory in the data dir, so even a crashed instance leaves nothing in /dev/shm.
            "dynamic_shared_memory_type=mmap",
            "logging_collector=off",
            "log_line_prefix=%m [%p] %q%a ",
        ] {
            cmd.arg("-c").arg(setting);
        }
        for setting in &self.settings {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.bin_dir.join("postgres").display()), e))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);

        let started = Instant::now();
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(None)) => {}
                    Some(Ok(Some(status))) => {
                        guard.take();
                        return Err(TestkitError::Process {
                            what: "postgres".to_owned(),
                            message: format!(
                                "exited during startup ({status}); log {}:\n{}",
                                self.log_path.display(),
                                util::log_tail(&self.log_path, 20)
                            ),
                        });
                    }
                    Some(Err(e)) => return Err(TestkitError::io("waiting for postgres", e)),
                    None => return Err(TestkitError::Unsupported("postgres was stopped during startup".into())),
                }
            }
            // Line 8 of postmaster.pid is the status pg_ctl waits for too.
            if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready")) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill();
                return Err(TestkitError::Timeout {
                    what: "PostgreSQL".to_owned(),
                    after: READY_TIMEOUT,
                    detail: format!("; log:\n{}", util::log_tail(&self.log_path, 20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn command(&self, program: &str) -> Command {
        pg_command(&self.bin_dir, program, self.dir.path(), self.run_as.as_ref())
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            // Immediate shutdown: the postmaster stops its backends and releases its shared
            // memory, unlike SIGKILL, which would leak a SysV segment per test.
            let pids = util::descendants(child.id());
            util::signal(child.id(), Signal::QUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            util::kill_and_reap_blocking(&mut child);
            pids.iter().for_each(|&p| util::signal(p, Signal::KILL));
            util::wait_gone_blocking(&pids, Duration::from_secs(5));
        }
        // `dir` (a TempDir) removes the directory after this.
    }
}

/// Copies the certificate files into the instance dir (owned by the server's user, keys 0600,
/// as PostgreSQL insists), writes a `hostssl`-only pg_hba.conf, and returns the settings.
fn install_tls(dir: &Path, data_dir: &Path, tls: &PgServerTls, run_as: Option<&OsUser>) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let copy = |from: &Path, name: &str, mode: u32| -> Result<PathBuf> {
        let to = dir.join(name);
        std::fs::copy(from, &to).map_err(|e| TestkitError::io(format!("copying {}", from.display()), e))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .map_err(|e| TestkitError::io(format!("chmod {}", to.display()), e))?;
        if let Some(user) = run_as {
            util::chown(&to, user)?;
        }
        Ok(to)
    };
    let cert = copy(&tls.server.cert, "server.crt", 0o644)?;
    let key = copy(&tls.server.key, "server.key", 0o600)?;
    let mut settings = vec![
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
        "log_connections=on".to_owned(),
    ];
    if let Some(ca) = &tls.client_ca {
        let ca = copy(ca, "client-ca.crt", 0o644)?;
        settings.push(format!("ssl_ca_file={}", ca.display()));
    }
    let mut hba = String::from("local all all scram-sha-256\n");
    if let Some(user) = &tls.cert_user {
        hba.push_str(&format!("hostssl all \"{user}\" 127.0.0.1/32 cert\n"));
    }
    hba.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n");
    // Nothing else: `hostnossl` has no line, so a plaintext TCP login is refused.
    std::fs::write(data_dir.join("pg_hba.conf"), hba).map_err(|e| TestkitError::io("writing pg_hba.conf", e))?;
    Ok(settings)
}

fn pg_command(bin_dir: &Path, program: &str, cwd: &Path, run_as: Option<&OsUser>) -> Command {
    let mut cmd = Command::new(bin_dir.join(program));
    // A cwd the postgres user can enter (not /root), and messages in plain C locale.
    cmd.current_dir(cwd).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// `initdb` and `postgres` from `PATH`, else the highest `/usr/lib/postgresql/N/bin`.
fn find_bin_dir() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    dirs.extend(versioned.into_iter().map(|(_, d)| d));
    for dir in &dirs {
        let Ok(initdb) = std::fs::canonicalize(dir.join("initdb")) else {
            continue;
        };
        // Debian links only some tools into PATH: use the directory the real initdb lives in.
        if let Some(real_dir) = initdb.parent()
            && real_dir.join("postgres").is_file()
        {
            return Ok(real_dir.to_owned());
        }
    }
    Err(TestkitError::MissingBinary {
        program: "PostgreSQL server (initdb, postgres)".to_owned(),
        searched: "PATH and /usr/lib/postgresql/*/bin".to_owned(),
        install: INSTALL,
    })
}

/// Loads the machine-wide template for this PostgreSQL build, or creates it with `initdb`.
async fn build_or_load_template(bin_dir: PathBuf, run_as: Option<OsUser>) -> Result<Template> {
    let mut version_cmd = pg_command(&bin_dir, "postgres", Path::new("/"), None);
    version_cmd.arg("--version");
    let version = util::run(version_cmd, "postgres --version").await?;
    let key = format!(
        "{TEMPLATE_LAYOUT} {} {}",
        bin_dir.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    let root = std::env::temp_dir().join(format!(
        "sea-orm-tunnel-testkit-{}",
        rustix::process::geteuid().as_raw()
    ));
    ensure_private_dir(&root)?;
    let final_dir = root.join(format!("pg-template-{:016x}", fnv1a(key.as_bytes())));
    if let Some(t) = load_template(&final_dir) {
        return Ok(t);
    }

    let staging = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&root)
        .map_err(|e| TestkitError::io(format!("creating a staging dir in {}", root.display()), e))?;
    if let Some(user) = &run_as {
        util::chown(staging.path(), user)?;
    }
    let user = format!("test_{}", util::random_token(8));
    let password = util::random_token(24);
    let pwfile = staging.path().join("pwfile");
    std::fs::write(&pwfile, format!("{password}\n"))
        .map_err(|e| TestkitError::io("writing the initdb password file", e))?;
    if let Some(u) = &run_as {
        util::chown(&pwfile, u)?;
    }
    let mut initdb = pg_command(&bin_dir, "initdb", staging.path(), run_as.as_ref());
    initdb
        .arg("-D")
        .arg(staging.path().join("data"))
        .arg("-U")
        .arg(&user)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args([
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
    util::run(initdb, "initdb").await?;
    let _ = std::fs::remove_file(&pwfile);
    std::fs::write(staging.path().join("credentials"), format!("{user}\n{password}\n"))
        .map_err(|e| TestkitError::io("writing the template credentials", e))?;

    // Only the owner (and root) may read the template and its credentials.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| TestkitError::io(format!("chmod {}", staging.path().display()), e))?;
    }
    let staging = staging.keep();
    // Another process may have won the race: then use its template and discard ours.
    if std::fs::rename(&staging, &final_dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    load_template(&final_dir).ok_or_else(|| TestkitError::Process {
        what: "PostgreSQL template".to_owned(),
        message: format!(
            "{} is incomplete after initdb; delete it and retry",
            final_dir.display()
        ),
    })
}

fn load_template(dir: &Path) -> Option<Template> {
    let creds = std::fs::read_to_string(dir.join("credentials")).ok()?;
    let mut lines = creds.lines();
    let user = lines.next()?.to_owned();
    let password = lines.next()?.to_owned();
    let data_dir = dir.join("data");
    if user.is_empty() || password.is_empty() || !data_dir.join("global/pg_control").is_file() {
        return None;
    }
    Some(Template {
        data_dir,
        user,
        password,
    })
}

/// Creates `dir` 0711 (others may only traverse it: the `postgres` user must reach its own
/// staging dir inside), and refuses one another user planted in the shared temp dir.
fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TestkitError::io(format!("creating {}", dir.display()), e)),
    }
    let meta =
        std::fs::symlink_metadata(dir).map_err(|e| TestkitError::io(format!("inspecting {}", dir.display()), e))?;
    if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o066 != 0 {
        return Err(TestkitError::Unsupported(format!(
            "{} is not a private directory owned by this user; remove it",
            dir.display()
        )));
    }
    // The umask may have narrowed the mode at creation.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| TestkitError::io(format!("chmod {}", dir.display()), e))
}

/// FNV-1a: a stable name for the template of one PostgreSQL build.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
