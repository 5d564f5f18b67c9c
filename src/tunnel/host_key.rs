//! Host-key verification with OpenSSH `known_hosts` semantics.
//!
//! `russh::keys::check_known_hosts_path` is not OpenSSH-compatible: it rejects
//! a host with two keys of one type even when one matches, rejects tab-separated lines, ignores
//! wildcard patterns and ignores `@revoked`. This module does the lookup itself, on top of the
//! `ssh_key::known_hosts` entry parser (markers, hashed names, keys), with OpenSSH's rules:
//!
//! - The name looked up is the lower-cased `host` for port 22 and `[host]:port` otherwise, so a plain
//!   `127.0.0.1` entry only matches port 22 (like `ssh` without `CheckHostIP`).
//! - Fields may be separated by spaces or tabs; blank lines and lines starting with `#` are skipped;
//!   malformed lines (old SSH1 keys, bad base64, unknown markers) are skipped, never fatal.
//! - A host field is a comma-separated list of patterns with `*` and `?` wildcards, matched without
//!   regard to ASCII case; a matching `!pattern` excludes the line even if another pattern matches.
//!   A hashed name `|1|salt|hash` matches when HMAC-SHA1(salt, name) equals the hash.
//! - `@revoked` lines for the host reject their key even if another line accepts it.
//!   `@cert-authority` lines are ignored: this crate verifies plain host keys, not certificates.
//! - The presented key is accepted when any matching line holds it, so a host may list an old and
//!   a new key of the same type during rotation. A host listed with other keys of the *same* type
//!   but not this one has a changed key.
//! - A host listed only with keys of *other* types is treated like OpenSSH does: the presented key
//!   is not known (not "changed"); `strict` rejects it as unknown and `accept-new` learns it.
//!   OpenSSH's client avoids that case by preferring the known key types during key exchange.
//!
//! Verification reads the file on every call (it is small and only read per SSH connect), so an
//! edit to known_hosts takes effect on the next reconnect.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::PublicKey;
use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use russh::keys::ssh_key::{Algorithm, Fingerprint, HashAlg};
use sha1::Sha1;

use crate::config::HostKeyPolicy;
use crate::{Error, Result};

const WHAT: &str = "known_hosts file";
/// Same target as the rest of the tunnel, so one filter covers the insecure-policy warning.
const LOG_TARGET: &str = "sea_orm_tunnel::tunnel";

/// Serialises learn-on-first-use so that several sessions connecting at once to a new host
/// append one line, not one each.
static LEARN_LOCK: Mutex<()> = Mutex::new(());

/// Verifies a bastion's host key according to a [`HostKeyPolicy`].
#[derive(Debug, Clone)]
pub(crate) struct HostKeyVerifier {
    policy: HostKeyPolicy,
    known_hosts: PathBuf,
}

impl HostKeyVerifier {
    /// A verifier for `policy`, consulting (and, for accept-new, extending) `known_hosts`.
    pub(crate) fn new(policy: HostKeyPolicy, known_hosts: PathBuf) -> Self {
        Self { policy, known_hosts }
    }

    /// Checks the key `host:port` presented.
    ///
    /// `Ok(())` when it is accepted; under accept-new an unknown host is appended to known_hosts
    /// (`[host]:port key`, or `host key` for port 22), creating the file (0600) and its directory
    /// (0700) if needed.
    ///
    /// Errors: [`Error::HostKeyUnknown`] (also when the file does not exist under strict),
    /// [`Error::HostKeyChanged`] naming the host and both fingerprints, [`Error::HostKeyRevoked`],
    /// [`Error::File`] when known_hosts cannot be read or written, [`Error::Config`] for a pinned
    /// fingerprint that is not in `SHA256:<base64>` form. All are permanent.
    pub(crate) fn verify(&self, host: &str, port: u16, key: &PublicKey) -> Result<()> {
        let name = lookup_name(host, port);
        match &self.policy {
            HostKeyPolicy::InsecureAcceptAny => {
                tracing::warn!(
                    target: LOG_TARGET,
                    host = %name,
                    fingerprint = %fingerprint(key),
                    "accepting the SSH host key WITHOUT verification (insecure host key policy)"
                );
                Ok(())
            }
            HostKeyPolicy::Fingerprint(pinned) => verify_pinned(&name, pinned, key),
            HostKeyPolicy::Strict => {
                let text = self.read()?;
                self.verdict_to_result(&name, key, lookup(text.as_deref().unwrap_or(""), &name, key))
            }
            HostKeyPolicy::AcceptNew => {
                // Lock before reading so the check and the append are one step.
                let _guard = LEARN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let text = self.read()?;
                let contents = text.as_deref().unwrap_or("");
                match lookup(contents, &name, key) {
                    Verdict::Unknown { other_types } => {
                        let line = try_known_hosts_line(&name, key)
                            .map_err(|e| self.file_error("cannot encode the host key", e))?;
                        let newline_first = !contents.is_empty() && !contents.ends_with('\n');
                        append_line(&self.known_hosts, &line, newline_first)
                            .map_err(|e| self.file_error("cannot add the new host key", e))?;
                        tracing::info!(
                            target: LOG_TARGET,
                            host = %name,
                            fingerprint = %fingerprint(key),
                            known_hosts = %self.known_hosts.display(),
                            other_key_types_known = other_types,
                            "learned a new SSH host key (accept-new)"
                        );
                        Ok(())
                    }
                    verdict => self.verdict_to_result(&name, key, verdict),
                }
            }
        }
    }

    /// Reads known_hosts. A missing file is `None` (no host is known); other failures are errors.
    /// Non-UTF-8 bytes are replaced so that only the lines holding them fail to parse.
    fn read(&self) -> Result<Option<String>> {
        match fs::read(&self.known_hosts) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.file_error("cannot read", e)),
        }
    }

    fn file_error(&self, message: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::File {
            what: WHAT,
            path: self.known_hosts.clone(),
            message: format!("{message}: {source}"),
            source: Some(Arc::new(source)),
        }
    }

    fn verdict_to_result(&self, name: &str, key: &PublicKey, verdict: Verdict) -> Result<()> {
        match verdict {
            Verdict::Accepted => Ok(()),
            Verdict::Unknown { other_types } => {
                if other_types {
                    tracing::warn!(
                        target: LOG_TARGET,
                        host = %name,
                        key_type = key.algorithm().as_str(),
                        "known_hosts lists this host only with keys of other types"
                    );
                }
                Err(Error::HostKeyUnknown {
                    host: name.to_owned(),
                    fingerprint: fingerprint(key),
                    known_hosts: self.known_hosts.clone(),
                })
            }
            Verdict::Changed { expected } => {
                let fingerprints: Vec<&str> = expected.iter().map(|(fp, _)| fp.as_str()).collect();
                let lines: Vec<String> = expected.iter().map(|(_, line)| line.to_string()).collect();
                Err(Error::HostKeyChanged {
                    host: name.to_owned(),
                    expected: fingerprints.join(", "),
                    actual: fingerprint(key),
                    source_of_expected: format!(
                        "{} (line{} {})",
                        self.known_hosts.display(),
                        if lines.len() > 1 { "s" } else { "" },
                        lines.join(", ")
                    ),
                })
            }
            Verdict::Revoked { .. } => Err(Error::HostKeyRevoked {
                host: name.to_owned(),
                fingerprint: fingerprint(key),
                known_hosts: self.known_hosts.clone(),
            }),
        }
    }
}

/// The key's SHA-256 fingerprint as `ssh-keygen -l` prints it: `SHA256:` + unpadded base64.
pub(crate) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The known_hosts line for `host:port` and `key`, without a trailing newline:
/// `host keytype base64` for port 22, `[host]:port keytype base64` otherwise.
#[allow(
    dead_code,
    reason = "API for the tunnel and tests (e.g. to write a known_hosts file); verify appends via the same formatter"
)]
pub(crate) fn known_hosts_line(host: &str, port: u16, key: &PublicKey) -> String {
    let name = lookup_name(host, port);
    // Encoding a parsed key cannot fail in practice; should it, yield a harmless comment line.
    try_known_hosts_line(&name, key)
        .unwrap_or_else(|e| format!("# {name}: host key {} could not be encoded: {e}", fingerprint(key)))
}

fn try_known_hosts_line(name: &str, key: &PublicKey) -> std::result::Result<String, russh::keys::ssh_key::Error> {
    // `to_openssh` appends the key's comment, which does not belong in known_hosts.
    let mut key = key.clone();
    key.set_comment("");
    let text = key.to_openssh()?;
    Ok(format!("{name} {}", text.trim_end()))
}

/// The name OpenSSH looks up: `host` for port 22, `[host]:port` otherwise, lower-cased.
fn lookup_name(host: &str, port: u16) -> String {
    let host = host.trim();
    // Accept an already bracketed IPv6 literal such as `[::1]`.
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.to_ascii_lowercase();
    if port == 22 { host } else { format!("[{host}]:{port}") }
}

fn verify_pinned(name: &str, pinned: &str, key: &PublicKey) -> Result<()> {
    let pinned = pinned.trim();
    let parsed = pinned
        .strip_prefix("SHA256:")
        // ssh-keygen prints unpadded base64; tolerate padding pasted from elsewhere.
        .and_then(|b64| {
            format!("SHA256:{}", b64.trim_end_matches('='))
                .parse::<Fingerprint>()
                .ok()
        })
        .filter(|fp| fp.is_sha256());
    let Some(expected) = parsed else {
        return Err(Error::config(
            "SSH_HOST_KEY_POLICY",
            format!(
                "pinned host key fingerprint {pinned:?} is not of the form SHA256:<base64> (see `ssh-keygen -lf KEY`)"
            ),
        ));
    };
    let actual = key.fingerprint(HashAlg::Sha256);
    if constant_time_eq(expected.as_bytes(), actual.as_bytes()) {
        Ok(())
    } else {
        Err(Error::HostKeyChanged {
            host: name.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
            source_of_expected: "the pinned fingerprint (SSH_HOST_KEY_POLICY)".to_owned(),
        })
    }
}

/// Compares without an early exit so timing does not reveal how much of a fingerprint matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Outcome of a known_hosts lookup.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A line for the host holds this key and no `@revoked` line does.
    Accepted,
    /// No line for the host holds a key of this type. `other_types`: the host is listed with keys of other types.
    Unknown { other_types: bool },
    /// The host is listed with other keys of this type: `(fingerprint, line number)` of each.
    Changed { expected: Vec<(String, usize)> },
    /// An `@revoked` line for the host holds this key (1-based line number).
    Revoked { line: usize },
}

/// Looks `name` (already in lookup form) and `key` up in known_hosts `contents`.
fn lookup(contents: &str, name: &str, key: &PublicKey) -> Verdict {
    let key_type = type_class(key.algorithm());
    let mut accepted = false;
    let mut same_type = Vec::new();
    let mut other_types = false;
    for (index, raw) in contents.lines().enumerate() {
        let line_no = index + 1;
        let Some(entry) = parse_line(raw, line_no) else {
            continue;
        };
        if !host_matches(entry.host_patterns(), name) {
            continue;
        }
        let listed = entry.public_key();
        let same_key = listed.key_data() == key.key_data();
        match entry.marker() {
            // Revocation wins over any accepting line, wherever it is in the file.
            Some(Marker::Revoked) if same_key => return Verdict::Revoked { line: line_no },
            Some(Marker::Revoked) | Some(Marker::CertAuthority) => {}
            None if same_key => accepted = true,
            None if type_class(listed.algorithm()) == key_type => {
                same_type.push((listed.fingerprint(HashAlg::Sha256).to_string(), line_no));
            }
            None => other_types = true,
        }
    }
    if accepted {
        Verdict::Accepted
    } else if !same_type.is_empty() {
        Verdict::Changed { expected: same_type }
    } else {
        Verdict::Unknown { other_types }
    }
}

/// Key "type" as OpenSSH compares it: RSA regardless of signature hash, ECDSA per curve.
fn type_class(algorithm: Algorithm) -> Algorithm {
    match algorithm {
        Algorithm::Rsa { .. } => Algorithm::Rsa { hash: None },
        other => other,
    }
}

/// Parses one known_hosts line; `None` for blank lines, comments and malformed lines.
fn parse_line(raw: &str, line_no: usize) -> Option<Entry> {
    let line = raw.trim_matches([' ', '\t', '\r']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    // OpenSSH separates fields by any run of spaces or tabs; the ssh-key parser wants single
    // spaces, so rebuild the line from its fields (dropping the trailing key comment).
    let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
    let mut normalized = String::with_capacity(line.len());
    let first = fields.next()?;
    if first.starts_with('@') {
        normalized.push_str(first);
        normalized.push(' ');
        normalized.push_str(fields.next().unwrap_or(""));
    } else {
        normalized.push_str(first);
    }
    for _ in 0..2 {
        normalized.push(' ');
        normalized.push_str(fields.next().unwrap_or(""));
    }
    match normalized.parse::<Entry>() {
        Ok(entry) => Some(entry),
        Err(e) => {
            tracing::debug!(target: LOG_TARGET, line = line_no, error = %e, "skipping malformed known_hosts line");
            None
        }
    }
}

/// Whether a line's host field applies to `name` (OpenSSH `match_hostname` semantics).
fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => {
            let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(salt) else {
                return false;
            };
            // `verify_slice` compares in constant time.
            mac.chain_update(name.as_bytes()).verify_slice(hash).is_ok()
        }
        HostPatterns::Patterns(list) => {
            let mut positive = false;
            for pattern in list {
                let (negated, pattern) = match pattern.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, pattern.as_str()),
                };
                if glob_match(pattern.as_bytes(), name.as_bytes()) {
                    if negated {
                        // A matching negation excludes the line, whatever else matches.
                        return false;
                    }
                    positive = true;
                }
            }
            positive
        }
    }
}

/// `*` matches any run of bytes, `?` any one byte; ASCII case-insensitive.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index it consumed up to).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more byte and retry.
                Some((after_star, consumed)) => {
                    p = after_star;
                    t = consumed + 1;
                    star = Some((after_star, consumed + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Appends `line` to known_hosts, creating the directory (0700) and file (0600) when missing.
fn append_line(path: &Path, line: &str, newline_first: bool) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
    }
    let mut options = fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    // One write, so a concurrent reader never sees half a line.
    let mut buf = String::with_capacity(line.len() + 2);
    if newline_first {
        buf.push('\n');
    }
    buf.push_str(line);
    buf.push('\n');
    file.write_all(buf.as_bytes())?;
    file.sync_data()
}

#[cfg(test)]
mod tests;
