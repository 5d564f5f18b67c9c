//! OpenSSH client configuration (`~/.ssh/config`, `/etc/ssh/ssh_config`): resolve a host alias
//! the way `ssh` does, and apply it to a [`TunnelConfig`](crate::config::TunnelConfig).
//!
//! ```no_run
//! use sea_orm_tunnel::config::TunnelConfig;
//!
//! // `Host db-bastion` in ~/.ssh/config names the real host, user, port, key and known_hosts.
//! let tunnel = TunnelConfig::from_ssh_config("db-bastion")?.remote("db.internal", 5432);
//! # Ok::<(), sea_orm_tunnel::Error>(())
//! ```
//!
//! With [`Config::from_env`](crate::config::Config::from_env), `SSH_HOST` is looked up the same
//! way (`SSH_CONFIG` chooses the file, `none` disables it), and every `SSH_*` variable that is
//! set wins over the file.
//!
//! # What is read
//!
//! The files and their order are OpenSSH's: `~/.ssh/config`, then `/etc/ssh/ssh_config`
//! ([`SshConfigSource::Standard`]), or one file instead of both ([`SshConfigSource::File`], as
//! `ssh -F`). For each directive the **first** value obtained wins, except `IdentityFile` and
//! `CertificateFile`, which accumulate. `Host` patterns take `*`, `?` and `!` negation (a line of
//! negated patterns only matches nothing), are matched case-sensitively against the alias as
//! given, and `Include` takes globs (`*`, `?`), relative to `~/.ssh` for user files and
//! `/etc/ssh` for the system file. `Match` is evaluated for `all`, `host`, `originalhost`,
//! `user`, `localuser`, `tagged`, `canonical` and `final` (with OpenSSH's second, final pass).
//! `Keyword value` and `Keyword=value` are the same, keywords ignore case, arguments may be
//! quoted. User files (and included files) that others can write to are refused, as `ssh` does.
//!
//! # Directives
//!
//! | directive | effect |
//! |---|---|
//! | `HostName` (`%h`) | the host dialled and looked up in known_hosts |
//! | `User`, `Port` | login name (else the local user) and port, unless `SSH_USER` / `SSH_PORT` is set |
//! | `IdentityFile` (several), `IdentitiesOnly`, `CertificateFile`, `IdentityAgent` | keys, certificate, agent (`none` = no agent, `SSH_AUTH_SOCK` = the environment's) |
//! | `ProxyJump` | the jump hosts (`none` = direct) |
//! | `UserKnownHostsFile` (several), `GlobalKnownHostsFile` | known_hosts files; the first user file is the one `accept-new` appends to |
//! | `StrictHostKeyChecking` | `yes`/`ask` = strict, `accept-new`; `no`/`off` are an error (use `SSH_HOST_KEY_POLICY=insecure-accept-any`) |
//! | `HostKeyAlias`, `ServerAliveInterval`, `ServerAliveCountMax`, `ConnectTimeout` | as in OpenSSH |
//! | `Include`, `IgnoreUnknown`, `Tag`, `Host`, `Match` | structure |
//! | `HostKeyAlgorithms` | accepted when it only adds (`+`) or reorders (`^`), or allows every host key algorithm the tunnel offers; otherwise an error naming them |
//! | `Ciphers`, `MACs`, `KexAlgorithms` | the same check, but a list that excludes some of the tunnel's algorithms is logged (warning) and ignored: they protect the transport, not the host's identity, the tunnel's lists are modern only, and RHEL/Fedora set them system-wide |
//! | `ProxyCommand`, `KnownHostsCommand`, `RevokedHostKeys` (other than `none`), `CanonicalizeHostname`, `VerifyHostKeyDNS`, `NoHostAuthenticationForLocalhost`, `Tunnel` (other than `no`), `AddressFamily` (other than `any`), `BindAddress`, `BindInterface`, `Match exec` / `localnetwork` / other criteria | **error**: they change how the host is reached or which host key is trusted, and the tunnel cannot do that |
//! | everything else (`ControlMaster`/`ControlPath`/`ControlPersist`, `ForwardAgent`, `GSSAPI*`, `SendEnv`, `SetEnv`, `HashKnownHosts`, `AddKeysToAgent`, `UseKeychain`, `LogLevel`, `RequestTTY`, `LocalForward`, `Compression`, `PubkeyAcceptedAlgorithms`, `CASignatureAlgorithms`, …) | ignored: it changes neither the route nor the trust |
//!
//! An unsupported directive matters only where it would take effect: in a block that applies
//! to the host, and only when no earlier block already set that directive. The error names the
//! directive, the file and line, and the host. Keywords the crate does not know are an error
//! in a block that applies (list them in `IgnoreUnknown` to skip them).
//!
//! `%` tokens are expanded where OpenSSH expands them: `HostName` takes `%h`; `IdentityFile`,
//! `CertificateFile`, `IdentityAgent` and `UserKnownHostsFile` take `%h %p %r %u %n %d %k %l %L
//! %i %%`, `~` and `${VAR}`. `~` is `$HOME`, as everywhere in this crate (OpenSSH takes it from
//! the password database).

mod parse;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{HostKeyPolicy, JumpHost};
use crate::{Error, Result};
use parse::{Line, host_line_matches, match_pattern, match_pattern_list, parse_flag, parse_time, split_line};

/// Which ssh_config files to read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SshConfigSource {
    /// `~/.ssh/config`, then `/etc/ssh/ssh_config` (what `ssh` reads). Missing files are skipped.
    Standard,
    /// Only this file, instead of both (`SSH_CONFIG=path`, as `ssh -F path`). It must exist.
    File(PathBuf),
    /// No ssh_config at all (`SSH_CONFIG=none`). The default of code-built
    /// [`TunnelConfig`](crate::config::TunnelConfig)s.
    Disabled,
}

impl SshConfigSource {
    /// The `SSH_CONFIG` spelling: `none` (any case) disables, anything else is a file path.
    pub fn parse(value: &str) -> SshConfigSource {
        let value = value.trim();
        if value.eq_ignore_ascii_case("none") {
            SshConfigSource::Disabled
        } else {
            SshConfigSource::File(PathBuf::from(value))
        }
    }
}

impl fmt::Display for SshConfigSource {
    /// The `SSH_CONFIG` spelling (`Standard` shows as the two default files).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SshConfigSource::Standard => f.write_str("~/.ssh/config, /etc/ssh/ssh_config"),
            SshConfigSource::File(p) => write!(f, "{}", p.display()),
            SshConfigSource::Disabled => f.write_str("none"),
        }
    }
}

/// `IdentityAgent`: which ssh-agent to use.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityAgent {
    /// `IdentityAgent none`: no agent.
    Disabled,
    /// `IdentityAgent SSH_AUTH_SOCK`: the agent the environment names.
    Environment,
    /// An agent socket path (tokens, `~` and `${VAR}` expanded).
    Socket(PathBuf),
}

/// What ssh_config says about one host: every value is `None` / empty when no block that
/// applies sets it. Tokens, `~` and `${VAR}` are already expanded.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ResolvedHost {
    /// The name that was looked up (OpenSSH `%n`).
    pub alias: String,
    /// `HostName`, `%h` expanded and lowercased.
    pub host_name: Option<String>,
    /// `User`.
    pub user: Option<String>,
    /// `Port`.
    pub port: Option<u16>,
    /// `IdentityFile`s, in order.
    pub identity_files: Vec<PathBuf>,
    /// `IdentitiesOnly`.
    pub identities_only: Option<bool>,
    /// `CertificateFile`s, in order.
    pub certificate_files: Vec<PathBuf>,
    /// `IdentityAgent`.
    pub identity_agent: Option<IdentityAgent>,
    /// `ProxyJump` (`Some(empty)` = `none`).
    pub proxy_jump: Option<Vec<JumpHost>>,
    /// `UserKnownHostsFile`s (`none` = `/dev/null`).
    pub user_known_hosts_files: Option<Vec<PathBuf>>,
    /// `GlobalKnownHostsFile`s (`none` = `/dev/null`).
    pub global_known_hosts_files: Option<Vec<PathBuf>>,
    /// `StrictHostKeyChecking` mapped to a policy (`yes`/`ask` = strict, `accept-new`).
    pub host_key_policy: Option<HostKeyPolicy>,
    /// `StrictHostKeyChecking no`/`off`, kept as an error that is raised only if no explicit
    /// policy overrides it.
    pub(crate) insecure_policy: Option<Error>,
    /// `HostKeyAlias`.
    pub host_key_alias: Option<String>,
    /// `ServerAliveInterval` (0 = OpenSSH's "off").
    pub server_alive_interval: Option<Duration>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<usize>,
    /// `ConnectTimeout` (`none` leaves it `None`).
    pub connect_timeout: Option<Duration>,
    /// The files read, in order (including `Include`d ones).
    pub files: Vec<PathBuf>,
}

impl ResolvedHost {
    /// The host to dial: `HostName`, or the alias itself (lowercased, as `ssh` does).
    pub fn dial_host(&self) -> String {
        self.host_name
            .clone()
            .unwrap_or_else(|| self.alias.to_ascii_lowercase())
    }
}

type Env<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Resolves host aliases in ssh_config files.
///
/// ```
/// use sea_orm_tunnel::ssh_config::{Resolver, SshConfigSource};
///
/// let dir = tempfile::tempdir().unwrap();
/// let file = dir.path().join("config");
/// std::fs::write(&file, "Host db\n  HostName 10.0.0.5\n  User deploy\nHost *\n  Port 2222\n").unwrap();
/// let host = Resolver::new(SshConfigSource::File(file)).resolve("db").unwrap();
/// assert_eq!(host.dial_host(), "10.0.0.5");
/// assert_eq!((host.user.as_deref(), host.port), (Some("deploy"), Some(2222)));
/// ```
pub struct Resolver<'a> {
    source: SshConfigSource,
    env: Env<'a>,
    home: Option<PathBuf>,
    local_user: Option<String>,
    user: Option<String>,
    port: Option<u16>,
    system_dir: PathBuf,
    label: &'static str,
}

impl fmt::Debug for Resolver<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("source", &self.source)
            .field("home", &self.home)
            .field("local_user", &self.local_user)
            .field("user", &self.user)
            .field("port", &self.port)
            .field("system_dir", &self.system_dir)
            .finish_non_exhaustive()
    }
}

impl Resolver<'static> {
    /// A resolver reading `source`, with `HOME`, `USER` and `${VAR}`s from the process
    /// environment.
    pub fn new(source: SshConfigSource) -> Resolver<'static> {
        Resolver::with_env(source, |name| std::env::var(name).ok())
    }
}

impl<'a> Resolver<'a> {
    /// A resolver whose `HOME` (`~`, `%d`), local user (`USER`, then `LOGNAME`: `%u` and the
    /// default login name), `SSH_AUTH_SOCK` and `${VAR}`s come from `env`.
    pub fn with_env(source: SshConfigSource, env: impl Fn(&str) -> Option<String> + 'a) -> Resolver<'a> {
        let get = |n: &str| env(n).filter(|v| !v.is_empty());
        let home = get("HOME").map(PathBuf::from);
        let local_user = get("USER").or_else(|| get("LOGNAME"));
        Resolver {
            source,
            env: Box::new(env),
            home,
            local_user,
            user: None,
            port: None,
            system_dir: PathBuf::from("/etc/ssh"),
            label: "host",
        }
    }

    /// A login name that wins over `User` (as `ssh -l`): used for `%r` and `Match user`.
    #[must_use]
    pub fn user(mut self, user: Option<String>) -> Self {
        self.user = user;
        self
    }

    /// A port that wins over `Port` (as `ssh -p`): used for `%p`.
    #[must_use]
    pub fn port(mut self, port: Option<u16>) -> Self {
        self.port = port;
        self
    }

    /// Where the system file and relative system `Include`s live. Default `/etc/ssh`.
    #[must_use]
    pub fn system_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.system_dir = dir.into();
        self
    }

    /// How messages call the host (`SSH_HOST` when it comes from the environment).
    pub(crate) fn label(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// The local login name this resolver uses (`%u`, default user).
    pub fn local_user(&self) -> Option<&str> {
        self.local_user.as_deref()
    }

    /// Resolves `host` (an alias or a host name). With [`SshConfigSource::Disabled`] nothing is
    /// read and the result only carries the alias.
    ///
    /// Errors ([`Error::File`], permanent) name the file and line, the directive and the host:
    /// a file given as [`SshConfigSource::File`] that does not exist, a file others can write to,
    /// a malformed line, an unsupported directive that would apply, `StrictHostKeyChecking no`
    /// is kept in the result and raised by [`apply`](crate::config::TunnelConfig::from_ssh_config)
    /// only when no explicit policy overrides it.
    pub fn resolve(&self, host: &str) -> Result<ResolvedHost> {
        let mut state = State::default();
        let files: Vec<(PathBuf, bool, bool)> = match &self.source {
            SshConfigSource::Disabled => Vec::new(),
            // (path, user file, must exist)
            SshConfigSource::File(p) => vec![(self.expand_tilde(p, "SSH_CONFIG", 0, host)?, true, true)],
            SshConfigSource::Standard => {
                let mut v = Vec::new();
                if let Some(home) = &self.home {
                    v.push((home.join(".ssh/config"), true, false));
                }
                v.push((self.system_dir.join("ssh_config"), false, false));
                v
            }
        };
        let mut pass = Pass {
            host: host.to_owned(),
            original: host.to_owned(),
            final_pass: false,
        };
        self.read_all(&files, &pass, &mut state)?;
        // The host name as of the first pass is the one dialled: ssh matches its final pass
        // against it (lowercased) and does not re-read a HostName set only in that pass.
        let host_name = match &state.host_name {
            Some(_) => Some(self.final_host_name(&state, host)?.to_ascii_lowercase()),
            None => None,
        };
        if state.want_final {
            pass.host = host_name.clone().unwrap_or_else(|| host.to_ascii_lowercase());
            pass.final_pass = true;
            self.read_all(&files, &pass, &mut state)?;
        }
        self.finish(host, host_name, state)
    }

    fn read_all(&self, files: &[(PathBuf, bool, bool)], pass: &Pass, state: &mut State) -> Result<()> {
        for (path, user_conf, must_exist) in files {
            let mut active = true;
            let flags = Flags {
                explicit: *must_exist,
                user_conf: *user_conf,
                check_perm: *user_conf && !*must_exist,
                never_match: false,
            };
            let found = self.read_file(path, flags, pass, state, &mut active, 0)?;
            if !found && *must_exist {
                return Err(file_error(
                    path,
                    format!(
                        "does not exist (SSH_CONFIG; `none` disables ssh_config) while resolving {} {:?}",
                        self.label, pass.original
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads one file; `Ok(false)` when it does not exist.
    fn read_file(
        &self,
        path: &Path,
        flags: Flags,
        pass: &Pass,
        state: &mut State,
        active: &mut bool,
        depth: usize,
    ) -> Result<bool> {
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                let named = if flags.explicit { " (SSH_CONFIG)" } else { "" };
                return Err(file_error(
                    path,
                    format!(
                        "cannot be read{named}: {e} (resolving {} {:?})",
                        self.label, pass.original
                    ),
                ));
            }
        };
        if flags.check_perm {
            check_permissions(path)?;
        }
        if !pass.final_pass && !state.files.iter().any(|f| f == path) {
            state.files.push(path.to_owned());
        }
        let text = String::from_utf8_lossy(&text);
        for (i, raw) in text.lines().enumerate() {
            let at = Loc {
                file: path,
                line: i + 1,
                host: &pass.original,
                label: self.label,
            };
            let line = split_line(raw).map_err(|m| at.error(m))?;
            if let Some(line) = line {
                self.line(&line, &at, flags, pass, state, active, depth)?;
            }
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn line(
        &self,
        line: &Line,
        at: &Loc<'_>,
        flags: Flags,
        pass: &Pass,
        state: &mut State,
        active: &mut bool,
        depth: usize,
    ) -> Result<()> {
        let args = &line.args;
        let kw = line.keyword.as_str();
        let first = || -> Result<&str> {
            args.first()
                .map(String::as_str)
                .ok_or_else(|| at.error(format!("{} has no value", line.written)))
        };
        match kw {
            "host" => {
                if args.is_empty() {
                    return Err(at.error("Host has no pattern"));
                }
                *active = !flags.never_match && host_line_matches(&pass.host, args);
                return Ok(());
            }
            "match" => {
                *active = !flags.never_match && self.match_line(line, at, pass, state)?;
                return Ok(());
            }
            "include" => {
                if args.is_empty() {
                    return Err(at.error("Include has no file"));
                }
                return self.include(line, at, flags, pass, state, active, depth);
            }
            _ => {}
        }
        if !*active {
            return Ok(());
        }
        let s = state;
        match kw {
            "hostname" => set(&mut s.host_name, at, || Ok(first()?.to_owned()))?,
            "user" => set(&mut s.user, at, || Ok(first()?.to_owned()))?,
            "port" => set(&mut s.port, at, || {
                let v = first()?;
                match v.parse::<u16>() {
                    Ok(p) if p > 0 => Ok(p),
                    _ => Err(at.error(format!("Port {v:?} is not a port number (1-65535)"))),
                }
            })?,
            // These accumulate; a repeated path is skipped, as ssh does (it also repeats in the
            // final pass).
            "identityfile" => push_unique(&mut s.identity_files, at.located(first()?.to_owned())),
            "certificatefile" => push_unique(&mut s.certificate_files, at.located(first()?.to_owned())),
            "identitiesonly" => set(&mut s.identities_only, at, || flag(line, first()?, at))?,
            "identityagent" => set(&mut s.identity_agent, at, || Ok(first()?.to_owned()))?,
            "proxyjump" => {
                if s.proxy.is_none() {
                    let v = first()?;
                    let hops = JumpHost::parse_list(v, "ProxyJump").map_err(|e| at.error(e.to_string()))?;
                    s.proxy = Some(Proxy::Jump(hops));
                }
            }
            "proxycommand" => {
                if s.proxy.is_none() {
                    if args.len() == 1 && args[0].eq_ignore_ascii_case("none") {
                        s.proxy = Some(Proxy::CommandNone);
                    } else {
                        return Err(at.unsupported(
                            &line.written,
                            "runs a command to reach the host; use ProxyJump (SSH_PROXY_JUMP) instead",
                        ));
                    }
                }
            }
            "userknownhostsfile" => set(&mut s.user_known_hosts, at, || nonempty(line, at))?,
            "globalknownhostsfile" => set(&mut s.global_known_hosts, at, || nonempty(line, at))?,
            "stricthostkeychecking" => set(&mut s.strict, at, || Ok(first()?.to_owned()))?,
            "hostkeyalias" => set(&mut s.host_key_alias, at, || Ok(first()?.to_owned()))?,
            "serveraliveinterval" => set(&mut s.server_alive_interval, at, || time(line, first()?, at))?,
            "serveralivecountmax" => set(&mut s.server_alive_count_max, at, || {
                let v = first()?;
                v.parse::<usize>()
                    .map_err(|_| at.error(format!("ServerAliveCountMax {v:?} is not a whole number")))
            })?,
            "connecttimeout" => set(&mut s.connect_timeout, at, || {
                let v = first()?;
                if v.eq_ignore_ascii_case("none") {
                    Ok(None)
                } else {
                    time(line, v, at).map(Some)
                }
            })?,
            "ignoreunknown" => set(&mut s.ignore_unknown, at, || Ok(first()?.to_owned()))?,
            "tag" => set(&mut s.tag, at, || Ok(first()?.to_owned()))?,
            "ciphers" | "macs" | "kexalgorithms" | "hostkeyalgorithms" => {
                if s.first_seen.insert(kw.to_owned()) {
                    check_algorithms(kw, &line.written, first()?, at)?;
                }
            }
            _ => match classify(kw) {
                Kind::Ignored => {}
                Kind::Unsupported { harmless, why } => {
                    // First value wins for these too: only the first one would take effect.
                    if s.first_seen.insert(kw.to_owned()) {
                        let v = args.first().map(|a| a.to_ascii_lowercase());
                        if !v.as_deref().is_some_and(|v| harmless.contains(&v)) {
                            return Err(at.unsupported(&line.written, why));
                        }
                    }
                }
                Kind::Unknown => {
                    let ignored = s
                        .ignore_unknown
                        .as_ref()
                        .is_some_and(|list| match_pattern_list(kw, &list.value, true) == Some(true));
                    if !ignored {
                        return Err(at.error(format!(
                            "{} is not a directive this crate knows (add it to IgnoreUnknown to skip it)",
                            line.written
                        )));
                    }
                }
            },
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn include(
        &self,
        line: &Line,
        at: &Loc<'_>,
        flags: Flags,
        pass: &Pass,
        state: &mut State,
        active: &mut bool,
        depth: usize,
    ) -> Result<()> {
        if depth >= 16 {
            return Err(at.error("Include nests more than 16 levels deep"));
        }
        let outer = *active;
        for arg in &line.args {
            if arg.starts_with('~') && !flags.user_conf {
                return Err(at.error(format!("Include {arg:?}: ~ is not allowed in the system file")));
            }
            let path = if arg.starts_with('~') {
                self.expand_tilde(Path::new(arg), "Include", at.line, at.host)
                    .map_err(|e| at.error(e.to_string()))?
            } else if Path::new(arg).is_absolute() {
                PathBuf::from(arg)
            } else if flags.user_conf {
                match &self.home {
                    Some(h) => h.join(".ssh").join(arg),
                    None => return Err(at.error(format!("Include {arg:?} is relative to ~/.ssh but HOME is not set"))),
                }
            } else {
                self.system_dir.join(arg)
            };
            for file in glob(&path).map_err(|m| at.error(format!("Include {arg:?}: {m}")))? {
                let inner = Flags {
                    explicit: false,
                    check_perm: true,
                    never_match: flags.never_match || !outer,
                    ..flags
                };
                self.read_file(&file, inner, pass, state, active, depth + 1)?;
                // A Match or Host inside an included file does not change the including block.
                *active = outer;
            }
        }
        Ok(())
    }

    /// `Match` criteria; `Ok(true)` when all hold.
    fn match_line(&self, line: &Line, at: &Loc<'_>, pass: &Pass, state: &mut State) -> Result<bool> {
        let mut args = line.args.iter();
        let mut result = true;
        let mut any = false;
        while let Some(raw) = args.next() {
            any = true;
            let (negate, crit) = match raw.strip_prefix('!') {
                Some(c) => (true, c.to_ascii_lowercase()),
                None => (false, raw.to_ascii_lowercase()),
            };
            let hit = match crit.as_str() {
                "all" => true,
                "canonical" | "final" => {
                    if crit == "final" {
                        state.want_final = true;
                    }
                    pass.final_pass
                }
                "host" | "originalhost" | "user" | "localuser" | "tagged" => {
                    let list = args
                        .next()
                        .ok_or_else(|| at.error(format!("Match {crit} has no pattern")))?;
                    if !result {
                        continue;
                    }
                    match crit.as_str() {
                        "host" => {
                            let name = match &state.host_name {
                                Some(h) if !pass.final_pass => expand_hostname(&h.value, &pass.original, at)?,
                                _ => pass.host.clone(),
                            };
                            match_pattern_list(&name, list, true) == Some(true)
                        }
                        "originalhost" => match_pattern_list(&pass.original, list, true) == Some(true),
                        "user" => {
                            let user = self
                                .user
                                .clone()
                                .or_else(|| state.user.as_ref().map(|u| u.value.clone()))
                                .or_else(|| self.local_user.clone())
                                .unwrap_or_default();
                            match_pattern_list(&user, list, false) == Some(true)
                        }
                        "localuser" => {
                            match_pattern_list(self.local_user.as_deref().unwrap_or(""), list, false) == Some(true)
                        }
                        _ => {
                            match_pattern_list(state.tag.as_ref().map_or("", |t| t.value.as_str()), list, false)
                                == Some(true)
                        }
                    }
                }
                other => {
                    if !result {
                        // OpenSSH does not evaluate a criterion after one failed (no `exec`).
                        args.next();
                        continue;
                    }
                    return Err(at.error(format!(
                        "Match {other} is not supported (it cannot be evaluated without running or probing \
                         something; supported: all, host, originalhost, user, localuser, tagged, canonical, final)"
                    )));
                }
            };
            if hit == negate {
                result = false;
            }
        }
        if !any {
            return Err(at.error("Match has no criteria"));
        }
        Ok(result)
    }

    fn final_host_name(&self, state: &State, host: &str) -> Result<String> {
        match &state.host_name {
            Some(h) => {
                let at = Loc {
                    file: &h.file,
                    line: h.line,
                    host,
                    label: self.label,
                };
                expand_hostname(&h.value, host, &at)
            }
            None => Ok(host.to_owned()),
        }
    }

    fn finish(&self, host: &str, host_name: Option<String>, s: State) -> Result<ResolvedHost> {
        let dial = host_name.clone().unwrap_or_else(|| host.to_ascii_lowercase());
        let user = self
            .user
            .clone()
            .or_else(|| s.user.as_ref().map(|u| u.value.clone()))
            .or_else(|| self.local_user.clone())
            .unwrap_or_default();
        let port = self.port.or(s.port.as_ref().map(|p| p.value)).unwrap_or(22);
        let host_key_alias = s.host_key_alias.as_ref().map(|a| a.value.clone());
        let tokens = Tokens {
            h: &dial,
            n: host,
            p: port,
            r: &user,
            u: self.local_user.as_deref().unwrap_or(""),
            k: host_key_alias.as_deref().unwrap_or(&dial),
        };
        let path = |v: &Located<String>| self.expand_path(&v.value, &tokens, &v.loc(host, self.label));
        let paths = |v: &Located<Vec<String>>| -> Result<Vec<PathBuf>> {
            v.value
                .iter()
                .map(|p| {
                    if p.eq_ignore_ascii_case("none") {
                        Ok(PathBuf::from("/dev/null"))
                    } else {
                        self.expand_path(p, &tokens, &v.loc(host, self.label))
                    }
                })
                .collect()
        };
        let identity_agent = match &s.identity_agent {
            None => None,
            Some(a) if a.value.eq_ignore_ascii_case("none") => Some(IdentityAgent::Disabled),
            Some(a) if a.value == "SSH_AUTH_SOCK" => Some(IdentityAgent::Environment),
            Some(a) => {
                // `$NAME` alone names an environment variable holding the socket path.
                let v = match a.value.strip_prefix('$').filter(|n| !n.starts_with('{')) {
                    Some(name) => (self.env)(name).ok_or_else(|| {
                        a.loc(host, self.label)
                            .error(format!("IdentityAgent {:?}: ${name} is not set", a.value))
                    })?,
                    None => a.value.clone(),
                };
                Some(IdentityAgent::Socket(self.expand_path(
                    &v,
                    &tokens,
                    &a.loc(host, self.label),
                )?))
            }
        };
        let (host_key_policy, insecure_policy) = match &s.strict {
            None => (None, None),
            Some(v) => match v.value.to_ascii_lowercase().as_str() {
                "yes" | "true" | "ask" => (Some(HostKeyPolicy::Strict), None),
                "accept-new" => (Some(HostKeyPolicy::AcceptNew), None),
                "no" | "false" | "off" => (
                    None,
                    Some(v.loc(host, self.label).error(format!(
                        "StrictHostKeyChecking {} accepts any host key; this crate does not turn that on \
                         from ssh_config. If you really mean it, set SSH_HOST_KEY_POLICY=insecure-accept-any \
                         (or HostKeyPolicy::InsecureAcceptAny); otherwise use yes or accept-new",
                        v.value
                    ))),
                ),
                other => {
                    return Err(v.loc(host, self.label).error(format!(
                        "StrictHostKeyChecking {other:?} is not yes, accept-new, ask, no or off"
                    )));
                }
            },
        };
        if let Some(Proxy::Jump(hops)) = &s.proxy {
            // As ssh: jumping through the host itself would recurse forever.
            if let Some(hop) = hops
                .iter()
                .find(|j| (j.host == host || j.host == dial) && j.port.unwrap_or(22) == port)
            {
                return Err(Error::config(
                    "ProxyJump",
                    format!("jump host {hop} is the host {host:?} itself (a jump host loop)"),
                ));
            }
        }
        Ok(ResolvedHost {
            alias: host.to_owned(),
            host_name,
            user: s.user.map(|u| u.value),
            port: s.port.map(|p| p.value),
            identity_files: s.identity_files.iter().map(path).collect::<Result<_>>()?,
            identities_only: s.identities_only.map(|v| v.value),
            certificate_files: s.certificate_files.iter().map(path).collect::<Result<_>>()?,
            identity_agent,
            proxy_jump: match s.proxy {
                Some(Proxy::Jump(h)) => Some(h),
                Some(Proxy::CommandNone) => Some(Vec::new()),
                None => None,
            },
            user_known_hosts_files: s.user_known_hosts.as_ref().map(paths).transpose()?,
            global_known_hosts_files: s
                .global_known_hosts
                .as_ref()
                .map(|v| {
                    // No tokens here (OpenSSH expands none), only `~`.
                    v.value
                        .iter()
                        .map(|p| {
                            if p.eq_ignore_ascii_case("none") {
                                Ok(PathBuf::from("/dev/null"))
                            } else {
                                self.expand_tilde(Path::new(p), "GlobalKnownHostsFile", v.line, host)
                                    .map_err(|e| v.loc(host, self.label).error(e.to_string()))
                            }
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?,
            host_key_policy,
            insecure_policy,
            host_key_alias,
            server_alive_interval: s.server_alive_interval.map(|v| Duration::from_secs(v.value)),
            server_alive_count_max: s.server_alive_count_max.map(|v| v.value),
            connect_timeout: s.connect_timeout.and_then(|v| v.value).map(Duration::from_secs),
            files: s.files,
        })
    }

    /// `~`, `${VAR}` and `%` tokens in a path.
    fn expand_path(&self, raw: &str, t: &Tokens<'_>, at: &Loc<'_>) -> Result<PathBuf> {
        let tilde = self
            .expand_tilde(Path::new(raw), "path", at.line, at.host)
            .map_err(|e| at.error(e.to_string()))?;
        let s = tilde.to_string_lossy();
        let s = self.expand_env(&s, at)?;
        Ok(PathBuf::from(self.expand_tokens(&s, t, at)?))
    }

    fn expand_tilde(&self, p: &Path, what: &str, _line: usize, host: &str) -> Result<PathBuf> {
        let s = p.to_string_lossy();
        let rest = match s.strip_prefix('~') {
            None => return Ok(p.to_owned()),
            Some("") => "",
            Some(r) if r.starts_with('/') => r.trim_start_matches('/'),
            Some(_) => {
                return Err(Error::config(
                    what,
                    format!("{s:?}: ~user paths are not supported (host {host:?}); write the path out"),
                ));
            }
        };
        match &self.home {
            Some(h) => Ok(h.join(rest)),
            None => Err(Error::config(
                what,
                format!("{s:?} starts with ~ but HOME is not set (host {host:?})"),
            )),
        }
    }

    fn expand_env(&self, s: &str, at: &Loc<'_>) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| at.error(format!("{s:?} has ${{ without }}")))?;
            let name = &after[..end];
            let value =
                (self.env)(name).ok_or_else(|| at.error(format!("{s:?} uses ${{{name}}}, which is not set")))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn expand_tokens(&self, s: &str, t: &Tokens<'_>, at: &Loc<'_>) -> Result<String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('h') => out.push_str(t.h),
                Some('n') => out.push_str(t.n),
                Some('p') => out.push_str(&t.p.to_string()),
                Some('r') => out.push_str(t.r),
                Some('u') => out.push_str(t.u),
                Some('k') => out.push_str(t.k),
                Some('d') => match &self.home {
                    Some(h) => out.push_str(&h.to_string_lossy()),
                    None => return Err(at.error(format!("{s:?} uses %d but HOME is not set"))),
                },
                Some('l') => out.push_str(&local_host_name()),
                Some('L') => out.push_str(local_host_name().split('.').next().unwrap_or("")),
                Some('i') => out.push_str(&current_uid().map_or_else(String::new, |u| u.to_string())),
                Some(other) => {
                    return Err(at.error(format!(
                        "{s:?} uses the token %{other}, which is not supported here \
                         (supported: %h %p %r %u %n %d %k %l %L %i %%)"
                    )));
                }
                None => return Err(at.error(format!("{s:?} ends with a lone %"))),
            }
        }
        Ok(out)
    }
}

/// Resolves `host` in `source` with the process environment; see [`Resolver`].
pub fn resolve(host: &str, source: &SshConfigSource) -> Result<ResolvedHost> {
    Resolver::new(source.clone()).resolve(host)
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Flags {
    /// The file [`SshConfigSource::File`] names (errors opening it name `SSH_CONFIG`).
    explicit: bool,
    user_conf: bool,
    check_perm: bool,
    never_match: bool,
}

struct Pass {
    /// Matched by `Host`: the alias, or the final host name in the final pass.
    host: String,
    original: String,
    final_pass: bool,
}

struct Loc<'a> {
    file: &'a Path,
    line: usize,
    host: &'a str,
    /// What the host is called in messages: `host`, or `SSH_HOST` from the environment.
    label: &'static str,
}

impl Loc<'_> {
    fn error(&self, message: impl fmt::Display) -> Error {
        file_error(
            self.file,
            format!(
                "line {}: {message} (resolving {} {:?})",
                self.line, self.label, self.host
            ),
        )
    }

    fn unsupported(&self, directive: &str, why: &str) -> Error {
        self.error(format!(
            "{directive} is not supported: it {why}. Remove it from the block for this host, \
             or set SSH_CONFIG=none to ignore ssh_config"
        ))
    }

    fn located<T>(&self, value: T) -> Located<T> {
        Located {
            value,
            file: self.file.to_owned(),
            line: self.line,
        }
    }
}

fn file_error(path: &Path, message: String) -> Error {
    Error::File {
        what: "ssh_config file",
        path: path.to_owned(),
        message,
        source: None,
    }
}

#[derive(Debug, Clone)]
struct Located<T> {
    value: T,
    file: PathBuf,
    line: usize,
}

impl<T> Located<T> {
    fn loc<'a>(&'a self, host: &'a str, label: &'static str) -> Loc<'a> {
        Loc {
            file: &self.file,
            line: self.line,
            host,
            label,
        }
    }
}

enum Proxy {
    Jump(Vec<JumpHost>),
    CommandNone,
}

#[derive(Default)]
struct State {
    host_name: Option<Located<String>>,
    user: Option<Located<String>>,
    port: Option<Located<u16>>,
    identity_files: Vec<Located<String>>,
    certificate_files: Vec<Located<String>>,
    identities_only: Option<Located<bool>>,
    identity_agent: Option<Located<String>>,
    proxy: Option<Proxy>,
    user_known_hosts: Option<Located<Vec<String>>>,
    global_known_hosts: Option<Located<Vec<String>>>,
    strict: Option<Located<String>>,
    host_key_alias: Option<Located<String>>,
    server_alive_interval: Option<Located<u64>>,
    server_alive_count_max: Option<Located<usize>>,
    connect_timeout: Option<Located<Option<u64>>>,
    ignore_unknown: Option<Located<String>>,
    tag: Option<Located<String>>,
    first_seen: HashSet<String>,
    files: Vec<PathBuf>,
    want_final: bool,
}

/// First value wins: sets `slot` only when it is empty (the value is still parsed, so a
/// malformed later value is reported as OpenSSH does).
fn set<T>(slot: &mut Option<Located<T>>, at: &Loc<'_>, value: impl FnOnce() -> Result<T>) -> Result<()> {
    let v = value()?;
    if slot.is_none() {
        *slot = Some(at.located(v));
    }
    Ok(())
}

fn push_unique(list: &mut Vec<Located<String>>, item: Located<String>) {
    if !list.iter().any(|l| l.value == item.value) {
        list.push(item);
    }
}

fn flag(line: &Line, v: &str, at: &Loc<'_>) -> Result<bool> {
    parse_flag(v).ok_or_else(|| at.error(format!("{} {v:?} is not yes or no", line.written)))
}

fn time(line: &Line, v: &str, at: &Loc<'_>) -> Result<u64> {
    parse_time(v).ok_or_else(|| at.error(format!("{} {v:?} is not a time (e.g. 30, 30s, 1m)", line.written)))
}

fn nonempty(line: &Line, at: &Loc<'_>) -> Result<Vec<String>> {
    if line.args.is_empty() {
        return Err(at.error(format!("{} has no value", line.written)));
    }
    Ok(line.args.clone())
}

fn expand_hostname(raw: &str, alias: &str, at: &Loc<'_>) -> Result<String> {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('h') => out.push_str(alias),
            Some(o) => return Err(at.error(format!("HostName {raw:?}: %{o} is not supported here (only %h and %%)"))),
            None => return Err(at.error(format!("HostName {raw:?} ends with a lone %"))),
        }
    }
    Ok(out)
}

struct Tokens<'a> {
    h: &'a str,
    n: &'a str,
    p: u16,
    r: &'a str,
    u: &'a str,
    k: &'a str,
}

enum Kind {
    Ignored,
    Unsupported {
        /// Values (lowercase) that change nothing and are accepted.
        harmless: &'static [&'static str],
        why: &'static str,
    },
    Unknown,
}

/// Directives other than the applied ones: ignored (they change neither the route nor the
/// trust), unsupported (an error where they would take effect) or unknown.
fn classify(keyword: &str) -> Kind {
    const ROUTE: &str = "changes how the host is reached, which the tunnel cannot do";
    match keyword {
        "knownhostscommand" => Kind::Unsupported {
            harmless: &["none"],
            why: "runs a command to find trusted host keys",
        },
        "revokedhostkeys" => Kind::Unsupported {
            harmless: &["none"],
            why: "lists revoked host keys, which the tunnel does not read",
        },
        "canonicalizehostname" => Kind::Unsupported {
            harmless: &["no", "false"],
            why: "rewrites the host name through DNS, which the tunnel does not do",
        },
        "verifyhostkeydns" => Kind::Unsupported {
            harmless: &["no", "false"],
            why: "trusts host keys published in DNS, which the tunnel does not do",
        },
        "nohostauthenticationforlocalhost" => Kind::Unsupported {
            harmless: &["no", "false"],
            why: "skips host key checks for localhost, which the tunnel never does",
        },
        "tunnel" => Kind::Unsupported {
            harmless: &["no", "false"],
            why: ROUTE,
        },
        "addressfamily" => Kind::Unsupported {
            harmless: &["any"],
            why: "restricts the address family, which the tunnel does not do",
        },
        "bindaddress" | "bindinterface" => Kind::Unsupported {
            harmless: &[],
            why: "chooses the local address, which the tunnel does not do",
        },
        // Connection sharing, forwarding, session and UI settings, other authentication
        // methods, logging: none changes which host is reached or which host key is trusted.
        "controlmaster"
        | "controlpath"
        | "controlpersist"
        | "forwardagent"
        | "forwardx11"
        | "forwardx11timeout"
        | "forwardx11trusted"
        | "xauthlocation"
        | "sendenv"
        | "setenv"
        | "hashknownhosts"
        | "addkeystoagent"
        | "usekeychain"
        | "loglevel"
        | "logverbose"
        | "syslogfacility"
        | "requesttty"
        | "remotecommand"
        | "localcommand"
        | "permitlocalcommand"
        | "escapechar"
        | "enableescapecommandline"
        | "sessiontype"
        | "stdinnull"
        | "forkafterauthentication"
        | "batchmode"
        | "compression"
        | "ipqos"
        | "tcpkeepalive"
        | "rekeylimit"
        | "connectionattempts"
        | "localforward"
        | "remoteforward"
        | "dynamicforward"
        | "gatewayports"
        | "exitonforwardfailure"
        | "clearallforwardings"
        | "permitremoteopen"
        | "streamlocalbindmask"
        | "streamlocalbindunlink"
        | "tunneldevice"
        | "canonicaldomains"
        | "canonicalizefallbacklocal"
        | "canonicalizemaxdots"
        | "canonicalizepermittedcnames"
        | "passwordauthentication"
        | "kbdinteractiveauthentication"
        | "kbdinteractivedevices"
        | "challengeresponseauthentication"
        | "pubkeyauthentication"
        | "hostbasedauthentication"
        | "hostbasedacceptedalgorithms"
        | "hostbasedkeytypes"
        | "preferredauthentications"
        | "numberofpasswordprompts"
        | "pubkeyacceptedalgorithms"
        | "pubkeyacceptedkeytypes"
        | "casignaturealgorithms"
        | "requiredrsasize"
        | "securitykeyprovider"
        | "pkcs11provider"
        | "smartcarddevice"
        | "enablesshkeysign"
        | "updatehostkeys"
        | "fingerprinthash"
        | "visualhostkey"
        | "checkhostip"
        | "proxyusefdpass"
        | "obscurekeystroketiming"
        | "channeltimeout"
        | "protocol"
        | "cipher"
        | "useroaming"
        | "userknownhostsfile2"
        | "globalknownhostsfile2"
        | "rsaauthentication"
        | "rhostsrsaauthentication"
        | "compressionlevel"
        | "useprivilegedport"
        | "warnweakcrypto" => Kind::Ignored,
        k if k.starts_with("gssapi") => Kind::Ignored,
        _ => Kind::Unknown,
    }
}

/// `Ciphers`, `MACs`, `KexAlgorithms`, `HostKeyAlgorithms`: the tunnel cannot change its
/// algorithm lists, so a list is accepted only when the tunnel's offer already obeys it.
fn check_algorithms(keyword: &str, written: &str, value: &str, at: &Loc<'_>) -> Result<()> {
    // `+` appends, `^` moves to the front: neither forbids what the tunnel offers.
    if value.starts_with('+') || value.starts_with('^') {
        return Ok(());
    }
    let offered = offered_algorithms(keyword);
    let refused: Vec<&str> = match value.strip_prefix('-') {
        Some(removed) => offered
            .iter()
            .filter(|a| match_pattern_list(a, removed, false) == Some(true))
            .map(String::as_str)
            .collect(),
        None => offered
            .iter()
            .filter(|a| match_pattern_list(a, value, false) != Some(true))
            .map(String::as_str)
            .collect(),
    };
    if refused.is_empty() {
        return Ok(());
    }
    let message = format!(
        "{written} {value:?} excludes {} which the tunnel offers, and the tunnel cannot change its \
         algorithm list; allow them for this host (or use `{written} +...`), or set SSH_CONFIG=none",
        refused.join(", ")
    );
    if keyword == "hostkeyalgorithms" {
        // Which host key type is verified is a trust decision: refuse rather than ignore it.
        return Err(at.error(message));
    }
    // Ciphers, MACs and key exchange protect the transport, not the host's identity, and the
    // tunnel's lists hold only modern algorithms; distributions set these lists system-wide
    // (RHEL/Fedora crypto-policies, inside `Match final all`), so refusing them would break
    // every tunnel there. Say so instead.
    tracing::warn!(
        target: crate::observe::events::TARGET_TUNNEL,
        file = %at.file.display(),
        line = at.line,
        host = at.host,
        "ssh_config: {message} (ignored: it changes neither the route nor the host key check)"
    );
    Ok(())
}

/// The algorithm names the tunnel offers (src/tunnel/session.rs), for [`check_algorithms`].
fn offered_algorithms(keyword: &str) -> Vec<String> {
    let p = russh::Preferred::DEFAULT;
    match keyword {
        // The tunnel's cipher list (session.rs `preferred_ciphers`, both orders).
        "ciphers" => [
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_128_GCM,
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_CTR,
        ]
        .iter()
        .map(|n| n.as_ref().to_owned())
        .collect(),
        "macs" => p.mac.iter().map(|n| n.as_ref().to_owned()).collect(),
        "kexalgorithms" => p
            .kex
            .iter()
            .map(|n| n.as_ref().to_owned())
            // Protocol extension markers, not algorithms.
            .filter(|n| !n.starts_with("ext-info-") && !n.starts_with("kex-strict-"))
            .collect(),
        _ => p
            .key
            .iter()
            .filter(|a| cfg!(feature = "rsa") || !matches!(a, russh::keys::Algorithm::Rsa { .. }))
            .map(|a| a.as_str().to_owned())
            .collect(),
    }
}

/// `*` and `?` globs in any path component, sorted; a component not starting with `.` does not
/// match hidden names (as glob(3)).
fn glob(path: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let mut found = vec![PathBuf::new()];
    for comp in path.components() {
        let part = comp.as_os_str().to_string_lossy();
        if !part.contains(['*', '?']) {
            for f in &mut found {
                f.push(comp);
            }
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let entries = match std::fs::read_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                Ok(e) => e,
                Err(_) => continue,
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| (part.starts_with('.') || !n.starts_with('.')) && match_pattern(n, &part))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
        }
        found = next;
    }
    Ok(found.into_iter().filter(|p| p.is_file()).collect())
}

/// OpenSSH refuses user config files that someone else owns or that group or others may write.
fn check_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| file_error(path, format!("cannot be read: {e}")))?;
    let me = current_uid();
    let foreign_owner = meta.uid() != 0 && me.is_some_and(|u| u != meta.uid());
    if foreign_owner || meta.mode() & 0o022 != 0 {
        return Err(file_error(
            path,
            format!(
                "has bad owner or permissions (mode {:o}, owner {}): it must belong to you or root and \
                 not be writable by group or others, as ssh requires",
                meta.mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    Ok(())
}

fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Applying a resolved host to a TunnelConfig
// ---------------------------------------------------------------------------------------------

/// Which settings were given explicitly (environment or code) and so win over ssh_config.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Explicit {
    pub(crate) port: bool,
    pub(crate) user: bool,
    pub(crate) certificate: bool,
    pub(crate) known_hosts: bool,
    pub(crate) policy: bool,
    pub(crate) proxy_jump: bool,
    pub(crate) keepalive_interval: bool,
    pub(crate) keepalive_max: bool,
    pub(crate) connect_timeout: bool,
}

impl ResolvedHost {
    /// Whether any block that applies set anything (an alias, or only `Host *` defaults).
    pub fn applies(&self) -> bool {
        self.host_name.is_some()
            || self.user.is_some()
            || self.port.is_some()
            || !self.identity_files.is_empty()
            || self.identities_only.is_some()
            || !self.certificate_files.is_empty()
            || self.identity_agent.is_some()
            || self.proxy_jump.is_some()
            || self.user_known_hosts_files.is_some()
            || self.global_known_hosts_files.is_some()
            || self.host_key_policy.is_some()
            || self.insecure_policy.is_some()
            || self.host_key_alias.is_some()
            || self.server_alive_interval.is_some()
            || self.server_alive_count_max.is_some()
            || self.connect_timeout.is_some()
    }

    /// The login name: `User`, else the local user.
    pub(crate) fn default_user(&self, local_user: Option<&str>) -> Option<String> {
        self.user.clone().or_else(|| local_user.map(str::to_owned))
    }

    /// The agent setting from `IdentityAgent`: `Some((use_agent, socket))` when the file says.
    pub(crate) fn agent(&self, environment_agent: bool) -> Option<(bool, Option<PathBuf>)> {
        match self.identity_agent.as_ref()? {
            IdentityAgent::Disabled => Some((false, None)),
            IdentityAgent::Environment => Some((environment_agent, None)),
            IdentityAgent::Socket(p) => Some((p.exists(), Some(p.clone()))),
        }
    }

    /// The key files from `IdentityFile`: the ones that exist (ssh skips missing ones), or, when
    /// none exists and no agent is in use, the first (so validation names it). `None` when the
    /// file lists none.
    pub(crate) fn keys(&self, use_agent: bool) -> Option<(Option<PathBuf>, Vec<PathBuf>)> {
        if self.identity_files.is_empty() {
            return None;
        }
        let mut existing: Vec<PathBuf> = self.identity_files.iter().filter(|p| p.exists()).cloned().collect();
        if existing.is_empty() {
            return Some(match use_agent {
                true => (None, Vec::new()),
                false => (self.identity_files.first().cloned(), Vec::new()),
            });
        }
        let first = existing.remove(0);
        Some((Some(first), existing))
    }

    /// Fills `t` from this host, except what `explicit` marks: the dialled host becomes
    /// `HostName`, and `StrictHostKeyChecking no` is an error unless a policy was given.
    pub(crate) fn apply_to(&self, t: &mut crate::config::TunnelConfig, explicit: Explicit) -> Result<()> {
        if !self.applies() {
            return Ok(());
        }
        // Without HostName the name stays as given (ssh would lowercase it; known_hosts
        // matching ignores case anyway).
        if let Some(h) = &self.host_name {
            t.host = h.clone();
        }
        t.ssh_alias = Some(self.alias.clone());
        if let (false, Some(p)) = (explicit.port, self.port) {
            t.port = p;
        }
        if let (false, Some(u)) = (explicit.user, &self.user) {
            t.user = u.clone();
        }
        if let (false, Some(c)) = (explicit.certificate, self.certificate_files.first()) {
            t.auth.certificate_path = Some(c.clone());
        }
        if let Some(only) = self.identities_only {
            t.auth.identities_only = only;
        }
        let mut extra = Vec::new();
        if let (false, Some(Some((first, rest)))) = (
            explicit.known_hosts,
            self.user_known_hosts_files.as_ref().map(|f| f.split_first()),
        ) {
            t.known_hosts = first.clone();
            extra.extend(rest.iter().cloned());
        }
        if let Some(global) = &self.global_known_hosts_files {
            extra.extend(global.iter().cloned());
        }
        if !extra.is_empty() {
            t.extra_known_hosts = extra;
        }
        if !explicit.policy {
            if let Some(e) = &self.insecure_policy {
                return Err(e.clone());
            }
            if let Some(p) = &self.host_key_policy {
                t.host_key_policy = p.clone();
            }
        }
        if let Some(alias) = &self.host_key_alias {
            t.host_key_alias = Some(alias.clone());
        }
        if let (false, Some(hops)) = (explicit.proxy_jump, &self.proxy_jump) {
            t.proxy_jump = hops.clone();
        }
        // ServerAliveInterval 0 is OpenSSH's "off"; the tunnel always keeps alive (that is how
        // it finds a dead link), so 0 keeps the tunnel's interval.
        if let (false, Some(i)) = (
            explicit.keepalive_interval,
            self.server_alive_interval.filter(|i| !i.is_zero()),
        ) {
            t.keepalive_interval = i;
        }
        if let (false, Some(n)) = (explicit.keepalive_max, self.server_alive_count_max.filter(|n| *n > 0)) {
            t.keepalive_max = n;
        }
        if let (false, Some(c)) = (explicit.connect_timeout, self.connect_timeout.filter(|c| !c.is_zero())) {
            t.connect_timeout = c;
        }
        Ok(())
    }
}

impl crate::config::TunnelConfig {
    /// A tunnel through the ssh_config host `alias` (development profile), resolved now in
    /// `~/.ssh/config` and `/etc/ssh/ssh_config` with the process environment, as `ssh alias`
    /// would: `HostName`, `User` (else `$USER`), `Port`, `IdentityFile`s, `CertificateFile`,
    /// `IdentityAgent`, `ProxyJump`, known_hosts files, `StrictHostKeyChecking`, `HostKeyAlias`,
    /// `ServerAlive*` and `ConnectTimeout` (see [`ssh_config`](crate::ssh_config)).
    ///
    /// Builder calls after this one win over the file. The remote side is still to be set
    /// ([`remote`](Self::remote) or [`Config::tunnel`](crate::config::Config::tunnel)).
    pub fn from_ssh_config(alias: impl Into<String>) -> Result<Self> {
        Self::new(alias, "").apply_ssh_config(SshConfigSource::Standard)
    }

    /// Resolves [`host`](Self::host) as an alias in `source` and takes every value the file
    /// sets, replacing the current ones (so call it before the builders that should win),
    /// except the user: a non-empty [`user`](Self::user) wins over `User` (as `ssh -l`); an empty
    /// one becomes the file's `User`, else `$USER`. With
    /// [`SshConfigSource::Disabled`] only [`ssh_config`](Self::ssh_config) changes.
    pub fn apply_ssh_config(mut self, source: SshConfigSource) -> Result<Self> {
        let resolver = Resolver::new(source.clone()).user(Some(self.user.clone()).filter(|u| !u.is_empty()));
        let resolved = resolver.resolve(&self.host)?;
        if self.user.is_empty() {
            self.user = resolved.default_user(resolver.local_user()).unwrap_or_default();
        }
        if let Some((use_agent, socket)) = resolved.agent(self.auth.use_agent) {
            self.auth.use_agent = use_agent;
            self.auth.agent_socket = socket;
        }
        if let Some((key, extra)) = resolved.keys(self.auth.use_agent) {
            self.auth.key_path = key;
            self.auth.extra_key_paths = extra;
        }
        resolved.apply_to(
            &mut self,
            Explicit {
                user: true,
                ..Explicit::default()
            },
        )?;
        self.ssh_config = source;
        Ok(self)
    }
}
