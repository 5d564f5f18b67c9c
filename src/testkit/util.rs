//! Shared helpers of the test kit: the error type, binary lookup, free ports, OS users,
//! signals and process trees (all through `/proc` and `rustix`, no `unsafe`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

pub(crate) use rustix::process::Signal;

/// Result alias of the test kit.
pub(crate) type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Why a test-kit server could not be started or controlled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// A required program is not installed.
    #[error("{program} not found (searched {searched}); install it with `{install}`")]
    MissingBinary {
        /// The program, e.g. `sshd` or `initdb`.
        program: String,
        /// Where it was looked for.
        searched: String,
        /// The command that installs it on Debian/Ubuntu.
        install: &'static str,
    },

    /// A file-system or process-spawn operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A helper program ran but failed, or a server exited during startup.
    #[error("{what} failed: {message}")]
    Process {
        /// The program or server, e.g. `initdb` or `sshd`.
        what: String,
        /// Exit status and the tail of its output or log.
        message: String,
    },

    /// A server did not become ready in time.
    #[error("{what} was not ready after {after:?}{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
        /// Extra context (empty or starting with a separator), e.g. the tail of the log.
        detail: String,
    },

    /// The test kit cannot work in this environment (e.g. running as root without a `postgres` user).
    #[error("{0}")]
    Unsupported(String),
}

impl TestkitError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        TestkitError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<TestkitError> for crate::Error {
    fn from(e: TestkitError) -> Self {
        match e {
            TestkitError::Io { context, source } => crate::Error::Io {
                context,
                source: source.into(),
            },
            other => crate::Error::Io {
                context: "test kit".to_owned(),
                source: io::Error::other(other.to_string()).into(),
            },
        }
    }
}

/// Finds `program` on `PATH`, then in `extra_dirs`, in that order.
pub(crate) fn find_binary(program: &str, extra_dirs: &[PathBuf], install: &'static str) -> Result<PathBuf> {
    let mut searched: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        searched.extend(std::env::split_paths(&path));
    }
    searched.extend(extra_dirs.iter().cloned());
    for dir in &searched {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            // Absolute paths: sshd refuses to re-exec itself from a relative one.
            return Ok(std::path::absolute(&candidate).unwrap_or(candidate));
        }
    }
    Err(TestkitError::MissingBinary {
        program: program.to_owned(),
        searched: if searched.is_empty() {
            "nothing: PATH is empty".to_owned()
        } else {
            searched
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        },
        install,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback port that was free a moment ago.
///
/// There is a small race between releasing it and the server binding it; servers that fail
/// to bind are reported with their log, and callers that can retry do.
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| TestkitError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| TestkitError::io("reading the free port", e))
}

/// An OS account.
#[derive(Debug, Clone)]
pub(crate) struct OsUser {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

fn passwd_entries() -> Vec<OsUser> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some(OsUser {
                name: name.to_owned(),
                uid,
                gid,
            })
        })
        .collect()
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The user this process runs as (effective uid), by name.
pub(crate) fn current_user() -> Result<OsUser> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    if let Some(user) = passwd_entries().into_iter().find(|u| u.uid == uid) {
        return Ok(user);
    }
    match std::env::var("USER") {
        Ok(name) if !name.is_empty() => Ok(OsUser { name, uid, gid }),
        _ => Err(TestkitError::Unsupported(format!(
            "uid {uid} has no entry in /etc/passwd and USER is not set; sshd needs a named account"
        ))),
    }
}

/// Looks an account up by name in `/etc/passwd`.
pub(crate) fn lookup_user(name: &str) -> Option<OsUser> {
    passwd_entries().into_iter().find(|u| u.name == name)
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Every live descendant of `root` (children, grandchildren, ...), parents before children.
pub(crate) fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, state)) = proc_stat(pid)
            && state != 'Z'
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                queue.push(k);
            }
        }
    }
    out
}

/// `(ppid, state)` of a process from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` is still running (a zombie counts as gone: it holds no sockets or memory).
pub(crate) fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, state)| state != 'Z')
}

/// Waits (blocking, briefly) until every pid in `pids` has exited.
pub(crate) fn wait_gone_blocking(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for a child to exit, polling so it works on any runtime; `None` after `limit`.
pub(crate) async fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills a child with SIGKILL and reaps it (blocking, briefly): for `Drop` and crash tests.
pub(crate) fn kill_and_reap_blocking(child: &mut Child) {
    let _ = child.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(child.try_wait(), Ok(Some(_)) | Err(_)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs a short helper program to completion off the async threads; a non-zero exit is an
/// error carrying its stderr.
pub(crate) async fn run(mut cmd: Command, what: &str) -> Result<Output> {
    let what = what.to_owned();
    let program = cmd.get_program().to_owned();
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| TestkitError::io(format!("running {what}"), io::Error::other(e)))?
        .map_err(|e| TestkitError::io(format!("running {} ({what})", Path::new(&program).display()), e))?;
    if !output.status.success() {
        return Err(TestkitError::Process {
            what: format!("{} ({what})", display_program(&program)),
            message: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(output)
}

fn display_program(program: &OsStr) -> String {
    Path::new(program).display().to_string()
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// A random alphanumeric token (user names, passwords).
pub(crate) fn random_token(len: usize) -> String {
    let mut s = String::with_capacity(len);
    // Start with a letter: valid as a PostgreSQL identifier without quoting.
    s.push(fastrand::lowercase());
    while s.len() < len {
        s.push(fastrand::alphanumeric().to_ascii_lowercase());
    }
    s
}

/// Changes the owner of `path` (not following symlinks).
pub(crate) fn chown(path: &Path, user: &OsUser) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| TestkitError::io(format!("chown {} to {}", path.display(), user.name), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let err = find_binary(
            "sea-orm-tunnel-no-such-program",
            &[PathBuf::from("/nonexistent")],
            "apt-get install x",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sea-orm-tunnel-no-such-program not found"), "{msg}");
        assert!(msg.contains("/nonexistent"), "{msg}");
        assert!(msg.ends_with("install it with `apt-get install x`"), "{msg}");
    }

    #[test]
    fn finds_sh_and_walks_process_trees() {
        assert!(find_binary("sh", &[], "-").unwrap().is_absolute());
        let me = std::process::id();
        assert!(is_alive(me));
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(descendants(me).contains(&child.id()));
        kill_and_reap_blocking(&mut child);
        assert!(!descendants(me).contains(&child.id()));
    }
}
