//! [`OpenSshd`]: the system OpenSSH `sshd` on a free loopback port, and [`SshForward`]: an
//! OpenSSH `ssh -N -L` client process through it.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::util::{self, Result, Signal, TestkitError};

const INSTALL_SERVER: &str = "apt-get install openssh-server";
const INSTALL_CLIENT: &str = "apt-get install openssh-client";
/// Generous: sshd starts in milliseconds, but CI machines are loaded.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The privilege-separation directory Debian's sshd insists on.
const PRIVSEP_DIR: &str = "/run/sshd";

/// Kind of an SSH key made by [`OpenSshd::generate_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyKind {
    /// `ssh-ed25519`.
    Ed25519,
    /// `ecdsa-sha2-nistp256`.
    Ecdsa,
    /// `rsa-sha2-*`, 2048 bits (fast to generate).
    Rsa,
}

impl KeyKind {
    fn keygen_args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Ed25519 => &["-t", "ed25519"],
            KeyKind::Ecdsa => &["-t", "ecdsa", "-b", "256"],
            KeyKind::Rsa => &["-t", "rsa", "-b", "2048"],
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            KeyKind::Ed25519 => "id_ed25519",
            KeyKind::Ecdsa => "id_ecdsa",
            KeyKind::Rsa => "id_rsa",
        }
    }
}

/// The system OpenSSH `sshd` with a private configuration in a temp dir.
///
/// It listens on `127.0.0.1` (or the [builder](OpenSshd::builder)'s loopback address) on a free port with its own ed25519 host key, allows only public
/// key authentication for the current OS user, and allows TCP forwarding. An unencrypted
/// ed25519 client key is generated and authorised, and a `known_hosts` file lists the host key
/// as `[127.0.0.1]:PORT`. [`OpenSshd::builder`] picks another loopback address and adds
/// `sshd_config` lines.
///
/// Faults: [`drop_sessions`](Self::drop_sessions) kills established sessions (the listener stays),
/// [`pause_sessions`](Self::pause_sessions) freezes them (a silent dead link),
/// [`stop`](Self::stop) / [`start_again`](Self::start_again) take the whole server down and up on
/// the same port, and [`rotate_host_key`](Self::rotate_host_key) comes back with a different host key.
///
/// Dropping it kills the server and every session, and removes the directory.
///
/// Needs `openssh-server` (`/usr/sbin/sshd`), `ssh-keygen`, and `/run/sshd` (created when running
/// as root).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
///
/// let pg = TempPostgres::start().await?;
/// let sshd = OpenSshd::start().await?;
/// let forward = sshd.ssh_forward("127.0.0.1", pg.port()).await?;
/// println!("PostgreSQL through OpenSSH at {}", forward.local_addr());
/// # Ok(()) }
/// ```
pub struct OpenSshd {
    // Declared first so the server dies before its directory is removed.
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
    sshd_bin: PathBuf,
    ssh_bin: PathBuf,
    keygen_bin: PathBuf,
    /// Fixed after the first successful start.
    port: AtomicU16,
    user: String,
    host_key: Mutex<HostKey>,
    counter: AtomicUsize,
    /// The loopback address sshd listens on (`127.0.0.1` unless the builder chose another).
    address: IpAddr,
    /// `host` as written in known_hosts and used to connect: the address's text.
    host: String,
    /// Extra sshd_config lines, written before the defaults, which they replace keyword by keyword.
    extra_config: Mutex<Vec<String>>,
}

/// Options for [`OpenSshd`]: [`OpenSshd::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::OpenSshd;
///
/// // A second bastion on another loopback address that drops unauthenticated connections early.
/// let sshd = OpenSshd::builder()
///     .address("127.0.0.2".parse()?)
///     .config_line("MaxStartups 3:50:6")
///     .start()
///     .await?;
/// assert_eq!(sshd.host(), "127.0.0.2");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct OpenSshdBuilder {
    address: IpAddr,
    extra_config: Vec<String>,
}

impl OpenSshdBuilder {
    /// Listen on this loopback address instead of `127.0.0.1` (e.g. `127.0.0.2`, for a second
    /// host in a jump chain). Only loopback addresses are accepted by [`start`](Self::start).
    pub fn address(mut self, address: IpAddr) -> Self {
        self.address = address;
        self
    }

    /// An extra `sshd_config` line (e.g. `MaxStartups 3:50:6`, `TrustedUserCAKeys /path`). It
    /// replaces the test kit's default line for the same keyword, if any (a `HostKey` or
    /// `HostCertificate` line adds to them). Lines are written in
    /// order, before the defaults.
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// Generates keys and config and starts sshd, as [`OpenSshd::start`] does.
    pub async fn start(self) -> Result<OpenSshd> {
        OpenSshd::start_with(self).await
    }
}

#[derive(Clone)]
struct HostKey {
    /// `ssh-ed25519 AAAA...` (no comment).
    public: String,
    /// `SHA256:...`.
    fingerprint: String,
}

impl fmt::Debug for OpenSshd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSshd")
            .field("dir", &self.dir.path())
            .field("port", &self.port())
            .field("user", &self.user)
            .field("host_key_fingerprint", &self.host_key_fingerprint())
            .field("running", &self.is_running())
            .finish()
    }
}

impl OpenSshd {
    /// Generates keys and config, starts `sshd -D -e -f CONFIG`, and returns once it listens.
    ///
    /// Fails with [`TestkitError::MissingBinary`] naming `apt-get install openssh-server` when
    /// `sshd` is not on `PATH` or in `/usr/sbin`.
    pub async fn start() -> Result<OpenSshd> {
        Self::builder().start().await
    }

    /// Options: listen address, extra `sshd_config` lines.
    pub fn builder() -> OpenSshdBuilder {
        OpenSshdBuilder {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            extra_config: Vec::new(),
        }
    }

    async fn start_with(options: OpenSshdBuilder) -> Result<OpenSshd> {
        if !options.address.is_loopback() {
            return Err(TestkitError::Unsupported(format!(
                "OpenSshd listens only on loopback addresses, not {}",
                options.address
            )));
        }
        let system_dirs = [
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/usr/local/sbin"),
            PathBuf::from("/sbin"),
            PathBuf::from("/usr/bin"),
        ];
        let sshd_bin = util::find_binary("sshd", &system_dirs, INSTALL_SERVER)?;
        let ssh_bin = util::find_binary("ssh", &system_dirs, INSTALL_CLIENT)?;
        let keygen_bin = util::find_binary("ssh-keygen", &system_dirs, INSTALL_CLIENT)?;
        ensure_privsep_dir()?;
        let user = util::current_user()?.name;

        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-sshd-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp dir for sshd", e))?;
        let sshd = OpenSshd {
            child: Mutex::new(None),
            sshd_bin,
            ssh_bin,
            keygen_bin,
            port: AtomicU16::new(util::free_port()?),
            user,
            host_key: Mutex::new(HostKey {
                public: String::new(),
                fingerprint: String::new(),
            }),
            counter: AtomicUsize::new(0),
            address: options.address,
            host: options.address.to_string(),
            extra_config: Mutex::new(options.extra_config),
            dir,
        };
        let client_key = sshd.client_key_path();
        let host_key = sshd.host_key_path();
        let (host, client) = tokio::join!(
            sshd.keygen(&host_key, KeyKind::Ed25519, None, "sea-orm-tunnel test host"),
            sshd.keygen(&client_key, KeyKind::Ed25519, None, "sea-orm-tunnel test client"),
        );
        host?;
        client?;
        sshd.authorize_key(&client_key)?;
        sshd.load_host_key().await?;
        // The free port may be taken between probing and binding it: then try another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            sshd.write_config()?;
            match sshd.spawn_and_wait().await {
                Ok(()) => break,
                Err(e) if attempts < 5 && e.to_string().contains("Address already in use") => {
                    sshd.port.store(util::free_port()?, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        sshd.trust_host_key()?;
        Ok(sshd)
    }

    /// The address sshd listens on as text: `127.0.0.1` unless [`OpenSshdBuilder::address`]
    /// chose another.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port sshd listens on; stable across [`stop`](Self::stop) / [`start_again`](Self::start_again).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// `HOST:PORT` (`127.0.0.1:PORT` by default).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port())
    }

    /// Appends an `sshd_config` line (replacing the test kit's default for that keyword) and
    /// restarts the server on the same port when it is running, so the line takes effect.
    pub async fn add_config_line(&self, line: impl Into<String>) -> Result<()> {
        self.extra_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line.into());
        self.write_config()?;
        if self.is_running() {
            self.restart().await?;
        }
        Ok(())
    }

    /// The OS user that may log in (the current user).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The temp dir holding config, keys, `known_hosts` and `sshd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The authorised, unencrypted ed25519 private key (`.pub` next to it).
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// A known_hosts file with one line: `[HOST]:PORT ssh-ed25519 ...`.
    ///
    /// [`rotate_host_key`](Self::rotate_host_key) leaves it unchanged (so it then records the
    /// old key); [`trust_host_key`](Self::trust_host_key) rewrites it.
    pub fn known_hosts_path(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The `authorized_keys` file sshd consults.
    pub fn authorized_keys_path(&self) -> PathBuf {
        self.dir.path().join("authorized_keys")
    }

    /// The server log (`sshd -e`, LogLevel VERBOSE), for debugging failed tests.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// The current host key's `SHA256:...` fingerprint (as `ssh-keygen -lf` prints it).
    pub fn host_key_fingerprint(&self) -> String {
        self.host_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint
            .clone()
    }

    /// The current host key as an OpenSSH public key line: `ssh-ed25519 AAAA...`.
    pub fn host_public_key(&self) -> String {
        self.host_key.lock().unwrap_or_else(|p| p.into_inner()).public.clone()
    }

    /// The known_hosts line for the current host key: `[HOST]:PORT ssh-ed25519 AAAA...`.
    pub fn known_hosts_line(&self) -> String {
        format!("[{}]:{} {}", self.host, self.port(), self.host_public_key())
    }

    /// Rewrites [`known_hosts_path`](Self::known_hosts_path) to list the current host key only.
    pub fn trust_host_key(&self) -> Result<()> {
        let path = self.known_hosts_path();
        std::fs::write(&path, format!("{}\n", self.known_hosts_line()))
            .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    /// Also trusts this server's host key as `[IP]:PORT` of `addr`, a proxy in front of it such
    /// as a [`DelayProxy`](super::DelayProxy), so clients connecting there verify it strictly
    /// (appends to [`known_hosts_path`](Self::known_hosts_path)).
    pub fn trust_host_key_at(&self, addr: SocketAddr) -> Result<()> {
        let path = self.known_hosts_path();
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TestkitError::io(format!("opening {}", path.display()), e))?;
        writeln!(file, "[{}]:{} {}", addr.ip(), addr.port(), self.host_public_key())
            .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    /// Appends a public key to `authorized_keys` (sshd reads it at each login; no restart).
    ///
    /// `key` is the `.pub` file, or the private key when its `.pub` sits next to it.
    pub fn authorize_key(&self, key: &Path) -> Result<()> {
        let public = public_key_file(key);
        let line = std::fs::read_to_string(&public)
            .map_err(|e| TestkitError::io(format!("reading public key {}", public.display()), e))?;
        let path = self.authorized_keys_path();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TestkitError::io(format!("opening {}", path.display()), e))?;
        writeln!(file, "{}", line.trim()).map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    /// Writes a new key pair into the temp dir *without* authorising it, and returns the
    /// private key's path (the public key is at the same path plus `.pub`).
    ///
    /// With a passphrase the private key is encrypted (the passphrase is passed to `ssh-keygen`
    /// on its command line: test keys only).
    pub async fn generate_key(&self, kind: KeyKind, passphrase: Option<&str>) -> Result<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("{}_{n}", kind.file_stem()));
        self.keygen(&path, kind, passphrase, "sea-orm-tunnel test key").await?;
        Ok(path)
    }

    /// Whether the listener process runs.
    pub fn is_running(&self) -> bool {
        self.listener_pid().is_some()
    }

    /// The listener's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.listener_pid()
    }

    /// Process ids of the established sessions (every process the listener forked, with
    /// their children).
    pub fn session_pids(&self) -> Vec<u32> {
        self.listener_pid().map(util::descendants).unwrap_or_default()
    }

    /// Kills every established session (SIGKILL: clients see the TCP connection close
    /// without an SSH disconnect), keeps listening. Returns how many processes were killed.
    pub fn drop_sessions(&self) -> usize {
        let pids = self.session_pids();
        for &pid in &pids {
            util::signal(pid, Signal::KILL);
        }
        util::wait_gone_blocking(&pids, Duration::from_secs(5));
        pids.len()
    }

    /// Freezes every established session (SIGSTOP): sockets stay open, nothing is answered,
    /// not even keepalives — a silent dead link. New connections are still served.
    /// Returns how many processes were stopped.
    pub fn pause_sessions(&self) -> usize {
        let pids = self.session_pids();
        for &pid in &pids {
            util::signal(pid, Signal::STOP);
        }
        pids.len()
    }

    /// Lets sessions frozen by [`pause_sessions`](Self::pause_sessions) run again (SIGCONT).
    pub fn resume_sessions(&self) -> usize {
        let pids = self.session_pids();
        for &pid in &pids {
            util::signal(pid, Signal::CONT);
        }
        pids.len()
    }

    /// Takes the server down: kills every session and the listener; returns once they are
    /// gone. Stopping a stopped server does nothing.
    pub async fn stop(&self) -> Result<()> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let pids = util::descendants(child.id());
            // The listener first, so it cannot fork a new session while we kill the others.
            util::signal(child.id(), Signal::KILL);
            pids.iter().for_each(|&p| util::signal(p, Signal::KILL));
            if util::wait_child(&mut child, Duration::from_secs(10)).await.is_none() {
                util::kill_and_reap_blocking(&mut child);
            }
            util::wait_gone_blocking(&pids, Duration::from_secs(5));
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same host key (unless rotated) and
    /// the same authorised keys. Starting a running server does nothing.
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

    /// Restarts the server on the same port with a freshly generated host key, for
    /// "host key changed" tests. [`known_hosts_path`](Self::known_hosts_path) keeps the old
    /// key until [`trust_host_key`](Self::trust_host_key).
    pub async fn rotate_host_key(&self) -> Result<()> {
        self.stop().await?;
        let key = self.host_key_path();
        for path in [key.clone(), public_key_file(&key)] {
            let _ = std::fs::remove_file(path);
        }
        self.keygen(&key, KeyKind::Ed25519, None, "sea-orm-tunnel test host (rotated)")
            .await?;
        self.load_host_key().await?;
        self.start_again().await
    }

    /// An OpenSSH client command that logs in to this server as [`user`](Self::user) with
    /// `identity` only (no agent, no user config), BatchMode, strict host key checking against
    /// [`known_hosts_path`](Self::known_hosts_path). Append the remote command, or `-N` and
    /// forwards.
    pub fn ssh_command(&self, identity: &Path) -> Command {
        self.ssh_command_to(identity, self.addr())
    }

    /// [`ssh_command`](Self::ssh_command) connecting to `addr` instead of this server's address
    /// (a proxy in front of it); [`known_hosts_path`](Self::known_hosts_path) must then list the
    /// host key for `[IP]:PORT` of `addr` too.
    fn ssh_command_to(&self, identity: &Path, addr: SocketAddr) -> Command {
        let mut cmd = Command::new(&self.ssh_bin);
        let host = if addr == self.addr() {
            self.host.clone()
        } else {
            addr.ip().to_string()
        };
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-i")
            .arg(identity)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "BatchMode=yes",
            ])
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts_path().display()))
            .args(["-o", "ConnectTimeout=20", "-l", &self.user, &host])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ssh -N -L 127.0.0.1:LOCAL:REMOTE_HOST:REMOTE_PORT` through this server with the
    /// authorised client key, and returns once the local port accepts connections.
    pub async fn ssh_forward(&self, remote_host: &str, remote_port: u16) -> Result<SshForward> {
        self.ssh_forward_with(remote_host, remote_port, &[]).await
    }

    /// [`ssh_forward`](Self::ssh_forward) with extra `ssh` arguments, e.g.
    /// `["-c", "aes128-gcm@openssh.com"]` to pick a cipher.
    pub async fn ssh_forward_with(
        &self,
        remote_host: &str,
        remote_port: u16,
        extra_args: &[&str],
    ) -> Result<SshForward> {
        self.ssh_forward_via(self.addr(), remote_host, remote_port, extra_args)
            .await
    }

    /// [`ssh_forward_with`](Self::ssh_forward_with), the `ssh` process connecting to `via`
    /// instead of this server's address: a proxy in front of it, such as a
    /// [`DelayProxy`](super::DelayProxy). Call [`trust_host_key_at`](Self::trust_host_key_at)`(via)`
    /// first: `ssh` checks the host key strictly under `via`'s `[IP]:PORT`.
    pub async fn ssh_forward_via(
        &self,
        via: SocketAddr,
        remote_host: &str,
        remote_port: u16,
        extra_args: &[&str],
    ) -> Result<SshForward> {
        let mut last_error = None;
        // The free port can be taken between probing and ssh binding it: try a few.
        for _ in 0..3 {
            match self.try_forward(via, remote_host, remote_port, extra_args).await {
                Ok(f) => return Ok(f),
                Err(e @ TestkitError::Process { .. }) if e.to_string().contains("Address already in use") => {
                    last_error = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| TestkitError::Unsupported("ssh forward failed".into())))
    }

    async fn try_forward(
        &self,
        via: SocketAddr,
        remote_host: &str,
        remote_port: u16,
        extra_args: &[&str],
    ) -> Result<SshForward> {
        let local_port = util::free_port()?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let log_path = self.dir.path().join(format!("ssh-forward-{n}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| TestkitError::io(format!("creating {}", log_path.display()), e))?;
        let mut cmd = self.ssh_command_to(&self.client_key_path(), via);
        cmd.args(["-N", "-v", "-o", "ExitOnForwardFailure=yes"])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])
            .arg("-L")
            .arg(format!("127.0.0.1:{local_port}:{remote_host}:{remote_port}"))
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.ssh_bin.display()), e))?;
        let mut forward = SshForward {
            child: Mutex::new(child),
            local_addr: SocketAddr::from(([127, 0, 0, 1], local_port)),
            log_path,
            cipher: None,
        };
        forward.wait_ready().await?;
        Ok(forward)
    }

    /// A tunnel configuration for this server, pre-filled: host, port, user, the authorised
    /// client key (no agent), this known_hosts with the strict policy, and the remote target.
    pub fn tunnel_config(&self, remote_host: &str, remote_port: u16) -> crate::config::TunnelConfig {
        use crate::config::{AuthConfig, HostKeyPolicy, TunnelConfig};
        TunnelConfig::new(self.host(), self.user())
            .port(self.port())
            .auth(AuthConfig::key_file(self.client_key_path()))
            .known_hosts(self.known_hosts_path())
            .host_key_policy(HostKeyPolicy::Strict)
            .remote(remote_host, remote_port)
    }

    fn host_key_path(&self) -> PathBuf {
        self.dir.path().join("ssh_host_ed25519_key")
    }

    fn listener_pid(&self) -> Option<u32> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    async fn keygen(&self, path: &Path, kind: KeyKind, passphrase: Option<&str>, comment: &str) -> Result<()> {
        let mut cmd = Command::new(&self.keygen_bin);
        cmd.arg("-q")
            .args(kind.keygen_args())
            .arg("-N")
            .arg(passphrase.unwrap_or(""))
            .arg("-C")
            .arg(comment)
            .arg("-f")
            .arg(path)
            .stdin(Stdio::null());
        util::run(cmd, "generating a key").await.map(drop)
    }

    async fn load_host_key(&self) -> Result<()> {
        let public_path = public_key_file(&self.host_key_path());
        let text = std::fs::read_to_string(&public_path)
            .map_err(|e| TestkitError::io(format!("reading {}", public_path.display()), e))?;
        let public = text.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let mut cmd = Command::new(&self.keygen_bin);
        cmd.arg("-l").arg("-f").arg(&public_path);
        let out = util::run(cmd, "fingerprinting the host key").await?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let fingerprint = listing
            .split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .ok_or_else(|| TestkitError::Process {
                what: "ssh-keygen -lf".to_owned(),
                message: format!("no SHA256 fingerprint in {listing:?}"),
            })?
            .to_owned();
        *self.host_key.lock().unwrap_or_else(|p| p.into_inner()) = HostKey { public, fingerprint };
        Ok(())
    }

    fn write_config(&self) -> Result<()> {
        let dir = self.dir.path().display();
        let extra_lines = self.extra_config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let extra: String = extra_lines.iter().map(|line| format!("{line}\n")).collect();
        let config = format!(
            "# Generated by sea-orm-tunnel's test kit.\n\
             {extra}\
             Port {port}\n\
             ListenAddress {address}\n\
             AddressFamily {family}\n\
             HostKey {dir}/ssh_host_ed25519_key\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             # Keys live under /tmp, which StrictModes would reject.\n\
             StrictModes no\n\
             AllowTcpForwarding yes\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             # The shared AuthorizedKeysFile would otherwise let any unlocked account in.\n\
             AllowUsers {user}\n\
             X11Forwarding no\n\
             AllowAgentForwarding no\n\
             PrintMotd no\n\
             UseDNS no\n\
             # Tests open many connections at once; the default 10:30:100 drops some at random.\n\
             MaxStartups 200\n\
             LoginGraceTime 30\n\
             LogLevel VERBOSE\n",
            port = self.port(),
            user = self.user,
            address = self.address,
            family = if self.address.is_ipv4() { "inet" } else { "inet6" },
        );
        // An extra line replaces the default for its keyword: sshd keeps the first value of most
        // keywords but the last of some (MaxStartups), so the default must not be there at all.
        let keyword = |line: &str| {
            line.split(|c: char| c.is_whitespace() || c == '=')
                .next()
                .unwrap_or("")
                .to_ascii_lowercase()
        };
        // Keywords that take several lines add to the defaults instead.
        const ACCUMULATE: [&str; 4] = ["hostkey", "hostcertificate", "acceptenv", "subsystem"];
        let overridden: Vec<String> = extra_lines
            .iter()
            .map(|l| keyword(l))
            .filter(|k| !ACCUMULATE.contains(&k.as_str()))
            .collect();
        let config: String = config
            .lines()
            .enumerate()
            .filter(|(i, line)| *i < extra_lines.len() + 1 || !overridden.contains(&keyword(line)))
            .map(|(_, line)| format!("{line}\n"))
            .collect();
        let path = self.config_path();
        std::fs::write(&path, config).map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    async fn spawn_and_wait(&self) -> Result<()> {
        let pid_file = self.dir.path().join("sshd.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| TestkitError::io(format!("opening {}", log_path.display()), e))?;
        let mut cmd = Command::new(&self.sshd_bin);
        // -D: stay in the foreground as our child; -e: log to stderr (our log file).
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.sshd_bin.display()), e))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);

        let started = Instant::now();
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
                match guard.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(None)) => {}
                    Some(Ok(Some(status))) => {
                        guard.take();
                        return Err(TestkitError::Process {
                            what: "sshd".to_owned(),
                            message: format!(
                                "exited during startup ({status}); log {}:\n{}",
                                log_path.display(),
                                util::log_tail(&log_path, 20)
                            ),
                        });
                    }
                    Some(Err(e)) => return Err(TestkitError::io("waiting for sshd", e)),
                    None => return Err(TestkitError::Unsupported("sshd was stopped during startup".into())),
                }
            }
            // sshd writes its PidFile once the listening socket is bound.
            if std::fs::read_to_string(&pid_file).is_ok_and(|s| !s.trim().is_empty()) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = self.stop().await;
                return Err(TestkitError::Timeout {
                    what: "sshd".to_owned(),
                    after: READY_TIMEOUT,
                    detail: format!("; log:\n{}", util::log_tail(&log_path, 20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for OpenSshd {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            let pids = util::descendants(child.id());
            util::kill_and_reap_blocking(&mut child);
            pids.iter().for_each(|&p| util::signal(p, Signal::KILL));
            util::wait_gone_blocking(&pids, Duration::from_secs(5));
        }
    }
}

/// An OpenSSH `ssh -N -L` client process forwarding a local loopback port through
/// [`OpenSshd`]: what users run today, for comparisons. Killed on drop.
pub struct SshForward {
    child: Mutex<Child>,
    local_addr: SocketAddr,
    log_path: PathBuf,
    cipher: Option<String>,
}

impl fmt::Debug for SshForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshForward")
            .field("local_addr", &self.local_addr)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl SshForward {
    /// The forwarded local address, `127.0.0.1:PORT`.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The forwarded local port.
    pub fn local_port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The negotiated server-to-client cipher, e.g. `chacha20-poly1305@openssh.com`, as
    /// reported by `ssh -v`.
    pub fn cipher(&self) -> Option<&str> {
        self.cipher.as_deref()
    }

    /// The `ssh` client's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    /// Whether the `ssh` process still runs.
    pub fn is_running(&self) -> bool {
        matches!(
            self.child.lock().unwrap_or_else(|p| p.into_inner()).try_wait(),
            Ok(None)
        )
    }

    /// The `ssh -v` output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills the `ssh` process (also done on drop).
    pub fn kill(&self) {
        util::kill_and_reap_blocking(&mut self.child.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let exited = self.child.get_mut().unwrap_or_else(|p| p.into_inner()).try_wait();
            match exited {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(TestkitError::Process {
                        what: "ssh -N -L".to_owned(),
                        message: format!("exited ({status}):\n{}", util::log_tail(&self.log_path, 15)),
                    });
                }
                Err(e) => return Err(TestkitError::io("waiting for ssh", e)),
            }
            // OpenSSH binds the forward only after authentication succeeded.
            let log = self.log();
            if log.contains("forwarding listening on") || tokio::net::TcpStream::connect(self.local_addr).await.is_ok()
            {
                self.cipher = log
                    .lines()
                    .find_map(|l| l.split("server->client cipher: ").nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_owned);
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill();
                return Err(TestkitError::Timeout {
                    what: "ssh -N -L".to_owned(),
                    after: READY_TIMEOUT,
                    detail: format!("; log:\n{}", util::log_tail(&self.log_path, 15)),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SshForward {
    fn drop(&mut self) {
        util::kill_and_reap_blocking(self.child.get_mut().unwrap_or_else(|p| p.into_inner()));
    }
}

/// `key.pub` for a private key path; a path already ending in `.pub` as is.
fn public_key_file(key: &Path) -> PathBuf {
    if key.extension().is_some_and(|e| e == "pub") {
        return key.to_owned();
    }
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// sshd refuses to start without its privilege-separation directory.
fn ensure_privsep_dir() -> Result<()> {
    let dir = Path::new(PRIVSEP_DIR);
    if dir.is_dir() {
        return Ok(());
    }
    if util::is_root() {
        use std::os::unix::fs::DirBuilderExt;
        return std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| TestkitError::io(format!("creating {PRIVSEP_DIR} for sshd"), e));
    }
    Err(TestkitError::Unsupported(format!(
        "sshd needs the directory {PRIVSEP_DIR}; create it once as root: `mkdir -p {PRIVSEP_DIR}`"
    )))
}

/// OpenSSH certificates: a certificate authority, user certificates for `TrustedUserCAKeys`,
/// host certificates for `HostCertificate` (all made by the real `ssh-keygen -s`).
impl OpenSshd {
    /// Generates a certificate authority key pair in the temp dir and returns its private key's
    /// path (the public key is the same path plus `.pub`, e.g. for an `@cert-authority` line).
    pub async fn generate_ca(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("ca_{name}"));
        self.keygen(&path, KeyKind::Ed25519, None, &format!("sea-orm-tunnel test CA {name}"))
            .await?;
        Ok(path)
    }

    /// Signs the public key of `key` (a private key with its `.pub` next to it, or the `.pub`)
    /// with the CA `ca` (`ssh-keygen -s CA -I ID -n PRINCIPALS -V VALIDITY [-h] KEY.pub`) and
    /// returns the certificate's path, `<key>-cert.pub`. `validity` is in `ssh-keygen -V` form
    /// (`-5m:+1h`, `always:forever`, `-2h:-1h` for an expired one); `host` makes a host
    /// certificate. An existing certificate file is replaced.
    pub async fn sign_key(
        &self,
        ca: &Path,
        key: &Path,
        id: &str,
        principals: &[&str],
        validity: &str,
        host: bool,
    ) -> Result<PathBuf> {
        let public = public_key_file(key);
        // `KEY.pub` → `KEY-cert.pub`, as ssh-keygen names it.
        let cert = {
            let mut s = public.with_extension("").into_os_string();
            s.push("-cert.pub");
            PathBuf::from(s)
        };
        let _ = std::fs::remove_file(&cert);
        let mut cmd = Command::new(&self.keygen_bin);
        cmd.arg("-q")
            .arg("-s")
            .arg(ca)
            .arg("-I")
            .arg(id)
            .arg("-V")
            .arg(validity)
            .arg("-z")
            .arg(self.counter.fetch_add(1, Ordering::Relaxed).to_string());
        if !principals.is_empty() {
            cmd.arg("-n").arg(principals.join(","));
        }
        if host {
            cmd.arg("-h");
        }
        cmd.arg(&public).stdin(Stdio::null());
        util::run(cmd, "signing a certificate (ssh-keygen -s)").await?;
        Ok(cert)
    }

    /// Signs [`client_key_path`](Self::client_key_path)-style user key `key` for this server's
    /// user: [`sign_key`](Self::sign_key) with principal [`user`](Self::user).
    pub async fn sign_user_key(&self, ca: &Path, key: &Path, id: &str, validity: &str) -> Result<PathBuf> {
        let user = self.user.clone();
        self.sign_key(ca, key, id, &[&user], validity, false).await
    }

    /// Makes sshd trust user certificates signed by `ca` (`TrustedUserCAKeys`) and empties
    /// `authorized_keys`, so plain keys are no longer authorised; restarts the server.
    pub async fn trust_user_ca(&self, ca: &Path) -> Result<()> {
        let path = self.authorized_keys_path();
        std::fs::write(&path, "").map_err(|e| TestkitError::io(format!("emptying {}", path.display()), e))?;
        self.add_config_line(format!("TrustedUserCAKeys {}", public_key_file(ca).display()))
            .await
    }

    /// Gives sshd a host certificate for its host key, signed by `ca` for `principals` and
    /// `validity` (`HostCertificate`), and restarts it. Calling it again replaces the
    /// certificate (and restarts again). Returns the certificate's path.
    pub async fn use_host_certificate(&self, ca: &Path, principals: &[&str], validity: &str) -> Result<PathBuf> {
        let cert = self
            .sign_key(
                ca,
                &self.host_key_path(),
                "sea-orm-tunnel test host",
                principals,
                validity,
                true,
            )
            .await?;
        let line = format!("HostCertificate {}", cert.display());
        let already = self
            .extra_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&line);
        if already {
            self.restart().await?;
        } else {
            self.add_config_line(line).await?;
        }
        Ok(cert)
    }

    /// A known_hosts line trusting `ca` for `hosts` (a pattern list): `@cert-authority HOSTS KEY`.
    pub fn cert_authority_line(&self, ca: &Path, hosts: &str) -> Result<String> {
        let public = public_key_file(ca);
        let text = std::fs::read_to_string(&public)
            .map_err(|e| TestkitError::io(format!("reading {}", public.display()), e))?;
        let key = text.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        Ok(format!("@cert-authority {hosts} {key}"))
    }
}
