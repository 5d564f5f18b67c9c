//! Host-key verification with OpenSSH `known_hosts` semantics.
//!
//! `russh::keys::check_known_hosts_path` is not OpenSSH-compatible: it rejects
//! a host with two keys of one type even when one matches, rejects tab-separated lines, ignores
//! wildcard patterns and ignores `@revoked`. This module does the lookup itself, on top of the
//! `ssh_key::known_hosts` entry parser (markers, hashed names, keys), with OpenSSH's rules
//! (`check_host_key` in OpenSSH's sshconnect.c):
//!
//! - The name looked up is the lower-cased `host` for port 22 and `[host]:port` otherwise, or the
//!   `HostKeyAlias` when one is set (the port is then not part of the name).
//! - **Port-less fallback.** When the `[host]:port` lookup knows no key of this type for the host
//!   at all (OpenSSH's `HOST_NEW`), the plain `host` name is looked up as well, and a line there
//!   holding the key accepts it (`debug1: found matching key w/out port`). A *changed* key under
//!   `[host]:port` is never rescued by the plain name, and the fallback never applies with a
//!   `HostKeyAlias`. A plain-name line with another key leaves the host unknown (strict rejects,
//!   accept-new learns the key under `[host]:port`, as `ssh` does).
//! - Every file is read: `known_hosts`, then the extra (read-only) files; accept-new appends to
//!   `known_hosts` only.
//! - Fields may be separated by spaces or tabs; blank lines and lines starting with `#` are skipped;
//!   malformed lines (old SSH1 keys, bad base64, unknown markers) are skipped, never fatal.
//! - A host field is a comma-separated list of patterns with `*` and `?` wildcards, matched without
//!   regard to ASCII case; a matching `!pattern` excludes the line even if another pattern matches.
//!   A hashed name `|1|salt|hash` matches when HMAC-SHA1(salt, name) equals the hash.
//! - `@revoked` lines for the host reject their key even if another line accepts it. Unlike
//!   OpenSSH, a key revoked under the plain name is also refused on other ports (OpenSSH would
//!   learn it under `[host]:port` with accept-new).
//! - `@cert-authority` lines are used only for host certificates (see
//!   [`HostKeyVerifier::verify_certificate`]); they never accept a plain key.
//! - The presented key is accepted when any matching line holds it, so a host may list an old and
//!   a new key during rotation. A host listed with other keys but not this one has a changed key,
//!   whatever their types: OpenSSH 9 says "REMOTE HOST IDENTIFICATION HAS CHANGED ... Offending
//!   ECDSA key" for an ed25519 key presented to a host known only by an ECDSA key, under strict
//!   and accept-new alike. Like `ssh`, the tunnel avoids that case by preferring, in the key
//!   exchange, the key types known for the host ([`HostKeyVerifier::known_key_algorithms`]).
//!
//! Verification reads the files on every call (they are small and only read per SSH connect), so
//! an edit to known_hosts takes effect on the next reconnect.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::PublicKey;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate, Fingerprint, HashAlg};
use sha1::Sha1;

use crate::config::{HostKeyPolicy, TunnelConfig};
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
    /// Read after `known_hosts`, never written.
    extra_known_hosts: Vec<PathBuf>,
    /// OpenSSH `HostKeyAlias`: the name looked up and recorded instead of `host`/`[host]:port`.
    alias: Option<String>,
}

/// One parsed known_hosts line that matched the looked-up name.
struct Line {
    /// Index into the verifier's files (0 = `known_hosts`).
    file: usize,
    /// 1-based.
    no: usize,
    entry: Entry,
}

/// All lines of all files, parsed once per verification.
struct Files {
    paths: Vec<PathBuf>,
    lines: Vec<Line>,
    /// `known_hosts` exists, is not empty and lacks a final newline (accept-new starts a line).
    primary_needs_newline: bool,
}

impl Files {
    fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines
            .iter()
            .filter(move |l| host_matches(l.entry.host_patterns(), name))
    }

    fn describe(&self, file: usize, lines: &[usize]) -> String {
        format!(
            "{} (line{} {})",
            self.paths[file].display(),
            if lines.len() > 1 { "s" } else { "" },
            lines.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )
    }
}

impl HostKeyVerifier {
    /// A verifier for `policy`, consulting (and, for accept-new, extending) `known_hosts`.
    pub(crate) fn new(policy: HostKeyPolicy, known_hosts: PathBuf) -> Self {
        Self {
            policy,
            known_hosts,
            extra_known_hosts: Vec::new(),
            alias: None,
        }
    }

    /// The verifier for a tunnel's bastion: its policy, known_hosts, extra known_hosts files and
    /// HostKeyAlias.
    pub(crate) fn for_tunnel(config: &TunnelConfig) -> Self {
        Self::new(config.host_key_policy.clone(), config.known_hosts.clone())
            .with_extra_known_hosts(config.extra_known_hosts.clone())
            .with_alias(config.host_key_alias.clone())
    }

    /// Also read these files (after `known_hosts`); accept-new never writes to them.
    #[must_use]
    pub(crate) fn with_extra_known_hosts(mut self, files: Vec<PathBuf>) -> Self {
        self.extra_known_hosts = files;
        self
    }

    /// OpenSSH `HostKeyAlias`: look the key up (and record it) under `alias` instead of the host
    /// name; the port is then not part of the name and there is no port-less fallback.
    #[must_use]
    pub(crate) fn with_alias(mut self, alias: Option<String>) -> Self {
        self.alias = alias.map(|a| a.trim().to_ascii_lowercase()).filter(|a| !a.is_empty());
        self
    }

    /// The primary name (`alias`, `host` or `[host]:port`) and the port-less fallback name.
    fn names(&self, host: &str, port: u16) -> (String, Option<String>) {
        match &self.alias {
            Some(alias) => (alias.clone(), None),
            None if port == 22 || port == 0 => (lookup_name(host, 22), None),
            None => (lookup_name(host, port), Some(lookup_name(host, 22))),
        }
    }

    /// Checks the key `host:port` presented.
    ///
    /// `Ok(())` when it is accepted; under accept-new an unknown host is appended to known_hosts
    /// (`[host]:port key`, or `host key` for port 22, or `alias key`), creating the file (0600)
    /// and its directory (0700) if needed.
    ///
    /// Errors: [`Error::HostKeyUnknown`] (also when the file does not exist under strict),
    /// [`Error::HostKeyChanged`] naming the host and both fingerprints, [`Error::HostKeyRevoked`],
    /// [`Error::File`] when known_hosts cannot be read or written, [`Error::Config`] for a pinned
    /// fingerprint that is not in `SHA256:<base64>` form. All are permanent.
    pub(crate) fn verify(&self, host: &str, port: u16, key: &PublicKey) -> Result<()> {
        let (name, fallback) = self.names(host, port);
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
                let files = self.read()?;
                let verdict = check(&files, &name, fallback.as_deref(), key);
                self.verdict_to_result(&files, (host, port, &name), key, verdict)
            }
            HostKeyPolicy::AcceptNew => {
                // Lock before reading so the check and the append are one step.
                let _guard = LEARN_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let files = self.read()?;
                match check(&files, &name, fallback.as_deref(), key) {
                    Verdict::Unknown => self.learn(&files, &name, key),
                    verdict => self.verdict_to_result(&files, (host, port, &name), key, verdict),
                }
            }
        }
    }

    /// Whether a host certificate could be verified for `host:port`: the policy consults
    /// known_hosts and some `@cert-authority` line matches the looked-up name (or the port-less
    /// fallback). Only then are host-certificate algorithms offered in the key exchange, so a
    /// known_hosts with plain keys only keeps working against servers that prefer certificates.
    pub(crate) fn could_verify_certificates(&self, host: &str, port: u16) -> bool {
        if !matches!(self.policy, HostKeyPolicy::Strict | HostKeyPolicy::AcceptNew) {
            return false;
        }
        let Ok(files) = self.read() else {
            return false;
        };
        let (name, fallback) = self.names(host, port);
        [Some(name), fallback].into_iter().flatten().any(|n| {
            files
                .matching(&n)
                .any(|l| l.entry.marker() == Some(&Marker::CertAuthority))
        })
    }

    /// The algorithms of the plain keys known_hosts lists for `host:port` (the port-less name's
    /// when the port-ful name has none), each once, in file order; empty for a pinned or
    /// insecure policy. The key exchange prefers them, as `ssh` does (`order_hostkeyalgs`), so a
    /// server with several host keys presents the one on record.
    pub(crate) fn known_key_algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        if !matches!(self.policy, HostKeyPolicy::Strict | HostKeyPolicy::AcceptNew) {
            return Vec::new();
        }
        let Ok(files) = self.read() else {
            return Vec::new();
        };
        let (name, fallback) = self.names(host, port);
        let mut found = Vec::new();
        for n in [Some(name), fallback].into_iter().flatten() {
            for line in files.matching(&n) {
                let algorithm = line.entry.public_key().algorithm();
                if line.entry.marker().is_none() && !found.contains(&algorithm) {
                    found.push(algorithm);
                }
            }
            if !found.is_empty() {
                break;
            }
        }
        found
    }

    /// Checks a host certificate `host:port` presented, as OpenSSH does.
    ///
    /// The certificate is trusted when an `@cert-authority` line for the host (looked up like a
    /// plain key, port-less fallback included) holds the CA key that signed it, the CA signature
    /// verifies, it is a host certificate, it is valid now, it names the host (or the
    /// HostKeyAlias) among its principals (`*`/`?` wildcards allowed, as OpenSSH allows them in
    /// host certificates), carries no critical option, and neither its key nor its CA is
    /// `@revoked`.
    ///
    /// When no `@cert-authority` line lists its CA, the certificate's plain key is verified as
    /// [`verify`](Self::verify) would (OpenSSH: "No matching CA found. Retry with plain key").
    /// When a CA line matches but the certificate fails a check, a plain known_hosts entry for
    /// its key still accepts it (as in OpenSSH); otherwise the error is
    /// [`Error::HostCertificate`] naming the problem. Unlike OpenSSH, accept-new does not learn
    /// the plain key of a certificate that failed its checks.
    ///
    /// A pinned fingerprint is compared with the certificate's key; insecure-accept-any accepts.
    pub(crate) fn verify_certificate(&self, host: &str, port: u16, cert: &Certificate) -> Result<()> {
        let plain = PublicKey::new(cert.public_key().clone(), "");
        if !matches!(self.policy, HostKeyPolicy::Strict | HostKeyPolicy::AcceptNew) {
            return self.verify(host, port, &plain);
        }
        let (name, fallback) = self.names(host, port);
        let principal = match &self.alias {
            Some(alias) => alias.clone(),
            None => lookup_name(host, 22),
        };
        let files = self.read()?;
        // Revocation of the certificate's key or of its CA, under either name, wins.
        for n in [Some(name.as_str()), fallback.as_deref()].into_iter().flatten() {
            for line in files.matching(n) {
                if line.entry.marker() != Some(&Marker::Revoked) {
                    continue;
                }
                let revoked = line.entry.public_key().key_data();
                if revoked == cert.public_key() {
                    return Err(Error::HostKeyRevoked {
                        host: name.clone(),
                        fingerprint: fingerprint(&plain),
                        known_hosts: files.paths[line.file].clone(),
                    });
                }
                if revoked == cert.signature_key() {
                    return Err(Error::HostCertificate {
                        host: principal,
                        problem: format!(
                            "its certificate authority {} is @revoked ({})",
                            key_fingerprint(cert.signature_key()),
                            files.describe(line.file, &[line.no])
                        ),
                        known_hosts: files.paths[line.file].clone(),
                    });
                }
            }
        }
        // The CA lines for the port-ful name; when there are none at all, the plain name's.
        let mut ca_lines = cert_authorities(&files, &name);
        if ca_lines.is_empty()
            && let Some(f) = &fallback
        {
            ca_lines = cert_authorities(&files, f);
        }
        let Some(ca_line) = ca_lines
            .iter()
            .find(|l| l.entry.public_key().key_data() == cert.signature_key())
        else {
            tracing::debug!(
                target: LOG_TARGET,
                host = %name,
                ca = %key_fingerprint(cert.signature_key()),
                "no @cert-authority line lists the host certificate's CA: checking its plain key"
            );
            return self.verify(host, port, &plain);
        };
        match check_certificate(cert, &principal, ca_line.entry.public_key().key_data(), unix_now()) {
            Ok(()) => {
                tracing::debug!(
                    target: LOG_TARGET,
                    host = %name,
                    key_id = cert.key_id(),
                    serial = cert.serial(),
                    ca = %key_fingerprint(cert.signature_key()),
                    "host certificate accepted"
                );
                Ok(())
            }
            Err(problem) => {
                if check(&files, &name, fallback.as_deref(), &plain) == Verdict::Accepted {
                    tracing::warn!(
                        target: LOG_TARGET,
                        host = %name,
                        %problem,
                        "host certificate refused, but its key is listed in known_hosts: accepted as a plain key"
                    );
                    return Ok(());
                }
                Err(Error::HostCertificate {
                    host: principal,
                    problem: format!(
                        "{problem} (key id {:?}, serial {}, CA {} from {})",
                        cert.key_id(),
                        cert.serial(),
                        key_fingerprint(cert.signature_key()),
                        files.describe(ca_line.file, &[ca_line.no])
                    ),
                    known_hosts: files.paths[ca_line.file].clone(),
                })
            }
        }
    }

    fn learn(&self, files: &Files, name: &str, key: &PublicKey) -> Result<()> {
        let line = try_known_hosts_line(name, key).map_err(|e| self.file_error("cannot encode the host key", e))?;
        append_line(&self.known_hosts, &line, files.primary_needs_newline)
            .map_err(|e| self.file_error("cannot add the new host key", e))?;
        tracing::info!(
            target: LOG_TARGET,
            host = %name,
            fingerprint = %fingerprint(key),
            known_hosts = %self.known_hosts.display(),
            "learned a new SSH host key (accept-new)"
        );
        Ok(())
    }

    /// Reads and parses every file. A missing file holds no host. An unreadable `known_hosts` is
    /// an error; an unreadable extra file is skipped with a warning (as `ssh` does).
    /// Non-UTF-8 bytes are replaced so that only the lines holding them fail to parse.
    fn read(&self) -> Result<Files> {
        let mut files = Files {
            paths: Vec::with_capacity(1 + self.extra_known_hosts.len()),
            lines: Vec::new(),
            primary_needs_newline: false,
        };
        for (index, path) in std::iter::once(&self.known_hosts)
            .chain(&self.extra_known_hosts)
            .enumerate()
        {
            files.paths.push(path.clone());
            let text = match fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if index == 0 => return Err(self.file_error("cannot read", e)),
                Err(e) => {
                    tracing::warn!(target: LOG_TARGET, file = %path.display(), error = %e, "skipping an unreadable known_hosts file");
                    continue;
                }
            };
            if index == 0 {
                files.primary_needs_newline = !text.is_empty() && !text.ends_with('\n');
            }
            for (i, raw) in text.lines().enumerate() {
                if let Some(entry) = parse_line(raw, i + 1) {
                    files.lines.push(Line {
                        file: index,
                        no: i + 1,
                        entry,
                    });
                }
            }
        }
        Ok(files)
    }

    fn file_error(&self, message: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::File {
            what: WHAT,
            path: self.known_hosts.clone(),
            message: format!("{message}: {source}"),
            source: Some(Arc::new(source)),
        }
    }

    fn verdict_to_result(
        &self,
        files: &Files,
        (host, port, name): (&str, u16, &str),
        key: &PublicKey,
        verdict: Verdict,
    ) -> Result<()> {
        match verdict {
            Verdict::Accepted => Ok(()),
            Verdict::Unknown => Err(Error::HostKeyUnknown {
                host: name.to_owned(),
                fingerprint: fingerprint(key),
                known_hosts: self.known_hosts.clone(),
            }),
            // Recorded by RSA keys only, and this build cannot negotiate RSA: not a changed key
            // but a missing feature (`ssh` would have asked for the RSA key).
            Verdict::Changed { only_rsa: true, .. } if !cfg!(feature = "rsa") => Err(Error::FeatureRequired {
                host: host.to_owned(),
                port,
                needs: format!(
                    "RSA host keys (known_hosts records {name} by RSA keys only; the bastion presented {})",
                    key.algorithm()
                ),
                feature: "rsa",
            }),
            Verdict::Changed { expected, .. } => {
                let fingerprints: Vec<&str> = expected.iter().map(|(fp, _, _)| fp.as_str()).collect();
                // Group the line numbers by file, in file order.
                let mut sources = Vec::new();
                for file in 0..files.paths.len() {
                    let lines: Vec<usize> = expected.iter().filter(|e| e.1 == file).map(|e| e.2).collect();
                    if !lines.is_empty() {
                        sources.push(files.describe(file, &lines));
                    }
                }
                Err(Error::HostKeyChanged {
                    host: name.to_owned(),
                    expected: fingerprints.join(", "),
                    actual: fingerprint(key),
                    source_of_expected: sources.join("; "),
                })
            }
            Verdict::Revoked { file, .. } => Err(Error::HostKeyRevoked {
                host: name.to_owned(),
                fingerprint: fingerprint(key),
                known_hosts: files.paths[file].clone(),
            }),
        }
    }
}

/// The checks of a host certificate whose CA known_hosts trusts (`ca`), at `now`; the text of
/// the first failure.
fn check_certificate(cert: &Certificate, principal: &str, ca: &KeyData, now: u64) -> std::result::Result<(), String> {
    if cert.cert_type() != CertType::Host {
        return Err("it is a user certificate, not a host certificate".to_owned());
    }
    if cert.verify_signature().is_err() {
        return Err("its CA signature does not verify".to_owned());
    }
    if now < cert.valid_after() || now >= cert.valid_before() {
        let state = if now < cert.valid_after() {
            "not yet valid"
        } else {
            "expired"
        };
        return Err(format!(
            "it is {state}: valid from {} to {}, now {}",
            format_unix(cert.valid_after()),
            format_unix(cert.valid_before()),
            format_unix(now)
        ));
    }
    // The full check (signature, trusted CA, window) as ssh-key defines it, so nothing above
    // is weaker than the library's own rule.
    let ca_fp = ca.fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&ca_fp]).is_err() {
        return Err("it does not validate against its CA".to_owned());
    }
    if let Some((option, _)) = cert.critical_options().iter().next() {
        return Err(format!("it has an unsupported critical option {option:?}"));
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Err("it lists no principals (OpenSSH requires the host name)".to_owned());
    }
    if !principals
        .iter()
        .any(|p| glob_match(p.to_ascii_lowercase().as_bytes(), principal.as_bytes()))
    {
        return Err(format!(
            "it is not issued for {principal:?}: its principals are {}",
            principals.join(", ")
        ));
    }
    Ok(())
}

/// The `@cert-authority` lines for `name`.
fn cert_authorities<'a>(files: &'a Files, name: &str) -> Vec<&'a Line> {
    files
        .lines
        .iter()
        .filter(|l| l.entry.marker() == Some(&Marker::CertAuthority) && host_matches(l.entry.host_patterns(), name))
        .collect()
}

/// `SHA256:` fingerprint of raw key data.
fn key_fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A UNIX time as `YYYY-MM-DDTHH:MM:SSZ` (`forever` for OpenSSH's "no expiry").
pub(crate) fn format_unix(secs: u64) -> String {
    if secs == u64::MAX {
        return "forever".to_owned();
    }
    let (y, m, d, hh, mm, ss) = crate::civil::civil_from_unix(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
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
    /// No plain-key line matches the host (OpenSSH's `HOST_NEW`).
    Unknown,
    /// The host is listed with other keys (of any type): `(fingerprint, file index, line number)` of each.
    /// `only_rsa`: those are all RSA keys and the presented one is not.
    Changed {
        expected: Vec<(String, usize, usize)>,
        only_rsa: bool,
    },
    /// An `@revoked` line for the host holds this key (file index, 1-based line number).
    Revoked { file: usize, line: usize },
}

/// OpenSSH's `check_host_key` verdict: `name` first; when it lists no key for the host at all
/// (`Unknown`), the port-less `fallback` name may accept the key ("found matching key w/out
/// port") or, unlike OpenSSH, revoke it. Anything else under the fallback leaves `name`'s verdict.
fn check(files: &Files, name: &str, fallback: Option<&str>, key: &PublicKey) -> Verdict {
    let verdict = lookup(files, name, key);
    let (Verdict::Unknown, Some(fallback)) = (&verdict, fallback) else {
        return verdict;
    };
    match lookup(files, fallback, key) {
        Verdict::Accepted => {
            tracing::debug!(target: LOG_TARGET, host = %name, plain = %fallback, "found the host key under the name without port");
            Verdict::Accepted
        }
        revoked @ Verdict::Revoked { .. } => revoked,
        _ => Verdict::Unknown,
    }
}

/// Looks `name` (already in lookup form) and `key` up in the parsed files.
fn lookup(files: &Files, name: &str, key: &PublicKey) -> Verdict {
    let mut accepted = false;
    let mut others = Vec::new();
    let mut others_rsa = true;
    for line in files.matching(name) {
        let listed = line.entry.public_key();
        let same_key = listed.key_data() == key.key_data();
        match line.entry.marker() {
            // Revocation wins over any accepting line, wherever it is in the files.
            Some(Marker::Revoked) if same_key => {
                return Verdict::Revoked {
                    file: line.file,
                    line: line.no,
                };
            }
            Some(Marker::Revoked) | Some(Marker::CertAuthority) => {}
            None if same_key => accepted = true,
            // Any other key, whatever its type: OpenSSH's `HOST_CHANGED`.
            None => others.push({
                others_rsa &= listed.algorithm().is_rsa();
                (
                    same_type(listed.algorithm(), key.algorithm()),
                    (listed.fingerprint(HashAlg::Sha256).to_string(), line.file, line.no),
                )
            }),
        }
    }
    if accepted {
        Verdict::Accepted
    } else if !others.is_empty() {
        // Name the keys of the presented type when there are any: those were replaced.
        let any_same = others.iter().any(|(same, _)| *same);
        Verdict::Changed {
            only_rsa: !key.algorithm().is_rsa() && others_rsa,
            expected: others
                .into_iter()
                .filter(|(same, _)| *same || !any_same)
                .map(|(_, e)| e)
                .collect(),
        }
    } else {
        Verdict::Unknown
    }
}

/// Key "type" as OpenSSH compares it: RSA regardless of signature hash, ECDSA per curve.
fn same_type(a: Algorithm, b: Algorithm) -> bool {
    match (a, b) {
        (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
        (a, b) => a == b,
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
