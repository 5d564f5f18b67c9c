//! SSH authentication: private key files (with their OpenSSH certificates), then ssh-agent.
//!
//! Order (documented on [`AuthConfig`](crate::config::AuthConfig)), as `ssh` offers them:
//!
//! 1. For each key file (`key_path`, then `extra_key_paths`): its OpenSSH user certificate, if
//!    any (`certificate_path` for `key_path`, else `<key>-cert.pub` when that file exists), then
//!    the plain key. The key files are loaded and decrypted when the tunnel is created, so a
//!    missing `key_path` or a wrong passphrase fails `connect()` at once (permanent errors); a
//!    missing extra key is skipped, as `ssh` skips a missing `IdentityFile`. RSA keys need the
//!    `rsa` cargo feature and sign with the best hash the server advertises in `server-sig-algs`
//!    (rsa-sha2-512, then rsa-sha2-256).
//! 2. Every identity held by the ssh-agent (plain keys and certificates), if `use_agent` is set
//!    and an agent socket is known (`agent_socket`, else `SSH_AUTH_SOCK`); with
//!    `identities_only` only those whose key is one of the key files' (or their certificates').
//!    An unreachable agent is reported, not fatal.
//!
//! **Renewal.** Every new SSH session reads the key and certificate files again (a key is
//! decrypted again only when its file changed), so a certificate renewed on disk (Vault, step-ca)
//! is used by the next session and by the next reconnect round, while established sessions keep
//! running. A file that cannot be read or parsed at that point keeps the last good copy (with a
//! warning): a renewal caught half-written does not break the tunnel. A certificate outside its
//! validity window is not offered; when nothing else is accepted the error is
//! [`Error::UserCertificateExpired`] naming the file and its window (transient: the next attempt
//! reads the file again).
//!
//! When every method is refused the error is [`Error::Auth`] listing each method and its outcome.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client::{AuthResult, Handle, Handler};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use secrecy::{ExposeSecret, SecretString};

use super::host_key::{format_unix, unix_now};
use crate::config::AuthConfig;
use crate::{Error, Result};

const KEY_WHAT: &str = "SSH private key";
const CERT_WHAT: &str = "SSH user certificate";
/// Same target as the rest of the tunnel.
const LOG_TARGET: &str = "sea_orm_tunnel::tunnel";

/// PKCS#8's `rsaEncryption`: what russh reports for an RSA PKCS#8 key when built without RSA.
const RSA_ENCRYPTION_OID: &str = "1.2.840.113549.1.1.1";

/// Refuses an RSA key in a build without the `rsa` feature, before it is offered to a server
/// (russh would only fail once the server has accepted the key, with an error naming no feature).
pub(crate) fn require_rsa_support(path: &Path, algorithm: &Algorithm) -> Result<()> {
    check_rsa_support(cfg!(feature = "rsa"), path, algorithm)
}

/// [`require_rsa_support`] with the feature as a parameter, so both outcomes are tested in one build.
fn check_rsa_support(rsa_enabled: bool, path: &Path, algorithm: &Algorithm) -> Result<()> {
    if rsa_enabled || !matches!(algorithm, Algorithm::Rsa { .. }) {
        return Ok(());
    }
    Err(rsa_disabled(path))
}

fn rsa_disabled(path: &Path) -> Error {
    Error::File {
        what: KEY_WHAT,
        path: path.to_owned(),
        message: "is an RSA key, and this build has no RSA support: enable the `rsa` feature of \
                  sea-orm-tunnel, or use an ed25519 or ECDSA key (RSA is off by default because of \
                  RUSTSEC-2023-0071)"
            .into(),
        source: None,
    }
}

/// Key material and agent location of a tunnel; key and certificate files are refreshed from
/// disk for every session.
pub(crate) struct Credentials {
    keys: Vec<KeySource>,
    /// Extra key files that could not be loaded, with why (listed in an authentication error).
    skipped: Vec<String>,
    passphrase: Option<SecretString>,
    agent: Option<PathBuf>,
    /// The agent is enabled, whether or not a socket was found.
    use_agent: bool,
    identities_only: bool,
}

/// One key file and its certificate, with the last good copies read from disk.
struct KeySource {
    path: PathBuf,
    /// The certificate file; `explicit` = configured (must exist at load), else `<key>-cert.pub`.
    cert_path: PathBuf,
    cert_explicit: bool,
    state: Mutex<KeyState>,
}

#[derive(Clone)]
struct KeyState {
    /// The key file's bytes when `key` was decoded from it.
    key_bytes: Vec<u8>,
    key: Arc<PrivateKey>,
    /// The certificate file's text when `cert` was parsed from it, and the certificate.
    cert: Option<(String, Certificate)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Credentials")
            .field("keys", &self.keys.iter().map(|k| &k.path).collect::<Vec<_>>())
            .field("agent", &self.agent)
            .field("identities_only", &self.identities_only)
            .finish()
    }
}

/// `<key>-cert.pub`, as `ssh` looks for it.
fn default_cert_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push("-cert.pub");
    PathBuf::from(name)
}

fn cert_file_error(path: &Path, message: String, source: Option<crate::error::SharedError>) -> Error {
    Error::File {
        what: CERT_WHAT,
        path: path.to_owned(),
        message,
        source,
    }
}

/// Reads and parses a certificate file; `Ok(None)` when it does not exist.
fn read_certificate(path: &Path) -> Result<Option<(String, Certificate)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cert_file_error(path, format!("cannot be read: {e}"), Some(Arc::new(e)))),
    };
    let cert = Certificate::from_openssh(text.trim())
        .map_err(|e| cert_file_error(path, format!("is not an OpenSSH certificate: {e}"), Some(Arc::new(e))))?;
    Ok(Some((text, cert)))
}

/// Whether `cert` certifies `key` (the certificate file belongs to the key file).
fn certifies(cert: &Certificate, key: &PrivateKey) -> bool {
    cert.public_key() == key.public_key().key_data()
}

/// The validity window of a certificate, `from .. to` (UTC).
fn window(cert: &Certificate) -> (String, String) {
    (format_unix(cert.valid_after()), format_unix(cert.valid_before()))
}

fn is_valid_at(cert: &Certificate, now: u64) -> bool {
    cert.valid_after() <= now && now < cert.valid_before()
}

impl KeySource {
    /// Loads the key (and its certificate) when the tunnel is created.
    fn load(path: &Path, cert: Option<&Path>, passphrase: Option<&SecretString>) -> Result<Self> {
        let key_bytes = std::fs::read(path).unwrap_or_default();
        let key = Arc::new(load_key(path, passphrase)?);
        let (cert_path, cert_explicit) = match cert {
            Some(c) => (c.to_owned(), true),
            None => (default_cert_path(path), false),
        };
        let cert = match read_certificate(&cert_path)? {
            Some((text, cert)) => {
                if !certifies(&cert, &key) {
                    return Err(cert_file_error(
                        &cert_path,
                        format!(
                            "certifies another key ({}), not {}",
                            cert.public_key().fingerprint(HashAlg::Sha256),
                            path.display()
                        ),
                        None,
                    ));
                }
                Some((text, cert))
            }
            None if cert_explicit => {
                return Err(cert_file_error(&cert_path, "does not exist".into(), None));
            }
            None => None,
        };
        Ok(Self {
            path: path.to_owned(),
            cert_path,
            cert_explicit,
            state: Mutex::new(KeyState { key_bytes, key, cert }),
        })
    }

    /// The key and certificate as on disk now; the last good copy of whatever cannot be read.
    async fn refresh(&self, passphrase: Option<&SecretString>) -> KeyState {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match std::fs::read(&self.path) {
            Ok(bytes) if bytes != state.key_bytes => {
                let path = self.path.clone();
                let pass = passphrase.cloned();
                let decoded = tokio::task::spawn_blocking(move || load_key(&path, pass.as_ref())).await;
                match decoded {
                    Ok(Ok(key)) => {
                        tracing::info!(target: LOG_TARGET, key = %self.path.display(), "SSH key file changed: using the new key");
                        state.key = Arc::new(key);
                        state.key_bytes = bytes;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(target: LOG_TARGET, key = %self.path.display(), error = %e, "SSH key file changed but cannot be loaded: keeping the previous key");
                    }
                    Err(e) => {
                        tracing::warn!(target: LOG_TARGET, key = %self.path.display(), error = %e, "loading the SSH key file failed: keeping the previous key");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, key = %self.path.display(), error = %e, "SSH key file cannot be read: keeping the previous key");
            }
        }
        match read_certificate(&self.cert_path) {
            Ok(Some((text, cert))) => {
                let changed = state.cert.as_ref().is_none_or(|(old, _)| *old != text);
                if !certifies(&cert, &state.key) {
                    if changed {
                        tracing::warn!(target: LOG_TARGET, certificate = %self.cert_path.display(), key = %self.path.display(), "the SSH certificate certifies another key: not offered");
                    }
                    state.cert = None;
                } else {
                    if changed {
                        let (from, to) = window(&cert);
                        tracing::info!(target: LOG_TARGET, certificate = %self.cert_path.display(), key_id = cert.key_id(), serial = cert.serial(), valid_from = %from, valid_to = %to, "read the SSH user certificate");
                    }
                    state.cert = Some((text, cert));
                }
            }
            Ok(None) => {
                if state.cert.is_some() {
                    tracing::warn!(target: LOG_TARGET, certificate = %self.cert_path.display(), explicit = self.cert_explicit, "the SSH certificate file is gone: offering the last one read");
                }
            }
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, certificate = %self.cert_path.display(), error = %e, "the SSH certificate cannot be read: offering the last one read");
            }
        }
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        state
    }
}

/// What authentication found out besides refusals.
#[derive(Default)]
struct Attempts {
    tried: String,
    /// The first certificate not offered because it is outside its validity window.
    expired: Option<Error>,
}

impl Attempts {
    fn note(&mut self, text: std::fmt::Arguments<'_>) {
        if !self.tried.is_empty() {
            self.tried.push_str(", ");
        }
        let _ = self.tried.write_fmt(text);
    }

    fn expired(&mut self, path: &Path, cert: &Certificate, now: u64) {
        let (valid_after, valid_before) = window(cert);
        self.note(format_args!(
            "certificate {} not offered (valid from {valid_after} to {valid_before})",
            path.display()
        ));
        self.expired.get_or_insert(Error::UserCertificateExpired {
            path: path.to_owned(),
            valid_after,
            valid_before,
            now: format_unix(now),
        });
    }
}

fn outcome_text(result: &AuthResult) -> &'static str {
    match result {
        AuthResult::Success => "accepted",
        AuthResult::Failure {
            partial_success: true, ..
        } => "accepted, but the server wants a second factor",
        _ => "refused",
    }
}

impl Credentials {
    /// Loads (and decrypts) the key files with their certificates and locates the agent
    /// (`agent_socket`, else `SSH_AUTH_SOCK`).
    pub(crate) fn load(auth: &AuthConfig) -> Result<Self> {
        let mut keys = Vec::new();
        if let Some(path) = &auth.key_path {
            // The passphrase stays a `SecretString` (zeroed on drop) until the decrypt call.
            keys.push(KeySource::load(
                path,
                auth.certificate_path.as_deref(),
                auth.passphrase.as_ref(),
            )?);
        } else if let Some(cert) = &auth.certificate_path {
            return Err(Error::config(
                "SSH_CERTIFICATE_PATH",
                format!(
                    "a certificate ({}) needs its private key: set SSH_KEY_PATH too",
                    cert.display()
                ),
            ));
        }
        let mut skipped = Vec::new();
        for path in &auth.extra_key_paths {
            if !path.exists() {
                tracing::debug!(target: LOG_TARGET, key = %path.display(), "skipping a missing extra SSH key file");
                continue;
            }
            // As `ssh` does with an IdentityFile it cannot use: skip it, say so, go on.
            match KeySource::load(path, None, auth.passphrase.as_ref()) {
                Ok(source) => keys.push(source),
                Err(e) => {
                    tracing::warn!(target: LOG_TARGET, key = %path.display(), error = %e, "skipping an extra SSH key file");
                    skipped.push(format!("publickey {} skipped ({e})", path.display()));
                }
            }
        }
        let agent = if auth.use_agent {
            auth.agent_socket
                .clone()
                .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from))
        } else {
            None
        };
        if keys.is_empty() && !auth.use_agent && skipped.is_empty() {
            return Err(Error::config(
                "tunnel.auth",
                "no authentication method: set a key path (SSH_KEY_PATH) or enable the agent (SSH_USE_AGENT)",
            ));
        }
        Ok(Self {
            keys,
            skipped,
            passphrase: auth.passphrase.clone(),
            agent,
            use_agent: auth.use_agent,
            identities_only: auth.identities_only,
        })
    }

    /// Authenticates `user` on a fresh session: each key file's certificate then the key, then
    /// the agent. Key and certificate files are read again first.
    pub(crate) async fn authenticate<H: Handler>(
        &self,
        handle: &mut Handle<H>,
        user: &str,
        host: &str,
        port: u16,
    ) -> Result<()> {
        let mut attempts = Attempts::default();
        let now = unix_now();
        let mut configured: Vec<KeyData> = Vec::new();
        for source in &self.keys {
            let state = source.refresh(self.passphrase.as_ref()).await;
            let key = state.key.clone();
            configured.push(key.public_key().key_data().clone());
            if let Some((_, cert)) = &state.cert {
                if is_valid_at(cert, now) {
                    let result = authenticate_certificate(handle, user, &key, cert)
                        .await
                        .map_err(|e| transport_error(host, port, e))?;
                    if result.success() {
                        return Ok(());
                    }
                    attempts.note(format_args!(
                        "certificate {} (key id {:?}, serial {}) {}",
                        source.cert_path.display(),
                        cert.key_id(),
                        cert.serial(),
                        outcome_text(&result)
                    ));
                } else {
                    attempts.expired(&source.cert_path, cert, now);
                }
            }
            let hash = if key.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            let result = handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
                .map_err(|e| transport_error(host, port, e))?;
            if result.success() {
                return Ok(());
            }
            attempts.note(format_args!(
                "publickey {} ({}) {}",
                source.path.display(),
                key.algorithm(),
                outcome_text(&result)
            ));
        }
        for skipped in &self.skipped {
            attempts.note(format_args!("{skipped}"));
        }
        if let Some(sock) = &self.agent {
            match self
                .try_agent(handle, user, sock, &configured, now, &mut attempts)
                .await
                .map_err(|e| transport_error(host, port, e))?
            {
                AgentOutcome::Success => return Ok(()),
                AgentOutcome::Failed(why) => attempts.note(format_args!("ssh-agent {} ({why})", sock.display())),
            }
        } else if self.use_agent {
            attempts.note(format_args!("ssh-agent (enabled, but SSH_AUTH_SOCK is not set)"));
        }
        if let Some(expired) = attempts.expired {
            return Err(expired);
        }
        Err(Error::Auth {
            user: user.to_owned(),
            host: host.to_owned(),
            tried: attempts.tried,
        })
    }

    async fn try_agent<H: Handler>(
        &self,
        handle: &mut Handle<H>,
        user: &str,
        sock: &Path,
        configured: &[KeyData],
        now: u64,
        attempts: &mut Attempts,
    ) -> Result<AgentOutcome, russh::Error> {
        let mut agent = match AgentClient::connect_uds(sock).await {
            Ok(a) => a,
            Err(e) => return Ok(AgentOutcome::Failed(format!("unreachable: {e}"))),
        };
        let identities = match agent.request_identities().await {
            Ok(ids) => ids,
            Err(e) => return Ok(AgentOutcome::Failed(format!("listing keys failed: {e}"))),
        };
        if identities.is_empty() {
            return Ok(AgentOutcome::Failed("holds no keys".into()));
        }
        let mut refused = 0usize;
        let mut skipped = 0usize;
        let mut errors = Vec::new();
        for identity in &identities {
            let public = identity.public_key().into_owned();
            // IdentitiesOnly: only the configured keys (an agent-held certificate of one counts).
            if self.identities_only && !configured.contains(public.key_data()) {
                skipped += 1;
                continue;
            }
            let hash = if public.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            let result = match identity {
                AgentIdentity::Certificate { certificate, comment } => {
                    if !is_valid_at(certificate, now) {
                        let (from, to) = window(certificate);
                        attempts.note(format_args!(
                            "ssh-agent certificate {comment:?} (key id {:?}) not offered (valid from {from} to {to})",
                            certificate.key_id()
                        ));
                        skipped += 1;
                        continue;
                    }
                    handle
                        .authenticate_certificate_with(user, certificate.clone(), hash, &mut agent)
                        .await
                }
                AgentIdentity::PublicKey { .. } => {
                    handle.authenticate_publickey_with(user, public, hash, &mut agent).await
                }
            };
            match result {
                Ok(AuthResult::Success) => return Ok(AgentOutcome::Success),
                Ok(_) => refused += 1,
                Err(russh::AgentAuthError::Send(_)) => return Err(russh::Error::SendError),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let mut why = format!("{} key(s): {refused} refused", identities.len());
        if skipped > 0 {
            let _ = write!(
                why,
                ", {skipped} not offered{}",
                if self.identities_only {
                    " (IdentitiesOnly: not a configured key, or an expired certificate)"
                } else {
                    " (expired certificates)"
                }
            );
        }
        if !errors.is_empty() {
            let _ = write!(why, ", {} failed to sign: {}", errors.len(), errors.join("; "));
        }
        Ok(AgentOutcome::Failed(why))
    }
}

enum AgentOutcome {
    Success,
    Failed(String),
}

/// Offers `cert` with its private `key`. RSA certificates are signed with the best SHA-2 hash
/// the server accepts (`rsa-sha2-512-cert-v01@openssh.com`, ...): russh's
/// `authenticate_openssh_cert` would announce `ssh-rsa-cert-v01` (SHA-1), which OpenSSH 8.8+
/// refuses, so they go through `authenticate_certificate_with` and an in-memory signer.
async fn authenticate_certificate<H: Handler>(
    handle: &mut Handle<H>,
    user: &str,
    key: &Arc<PrivateKey>,
    cert: &Certificate,
) -> Result<AuthResult, russh::Error> {
    #[cfg(feature = "rsa")]
    if key.algorithm().is_rsa() {
        let hash = rsa_hash(handle).await;
        return match handle
            .authenticate_certificate_with(user, cert.clone(), hash, &mut RsaSigner(key.clone()))
            .await
        {
            Ok(result) => Ok(result),
            Err(RsaSignError::Send) => Err(russh::Error::SendError),
            Err(RsaSignError::Sign(why)) => {
                tracing::warn!(target: LOG_TARGET, error = %why, "signing with the RSA certificate's key failed");
                Ok(AuthResult::Failure {
                    remaining_methods: russh::MethodSet::empty(),
                    partial_success: false,
                })
            }
        };
    }
    handle.authenticate_openssh_cert(user, key.clone(), cert.clone()).await
}

/// Signs the user-authentication request with an RSA key held in memory, for the hash russh asks.
#[cfg(feature = "rsa")]
struct RsaSigner(Arc<PrivateKey>);

#[cfg(feature = "rsa")]
enum RsaSignError {
    Send,
    Sign(String),
}

#[cfg(feature = "rsa")]
impl From<russh::SendError> for RsaSignError {
    fn from(_: russh::SendError) -> Self {
        RsaSignError::Send
    }
}

#[cfg(feature = "rsa")]
impl russh::Signer for RsaSigner {
    type Error = RsaSignError;

    fn auth_sign(
        &mut self,
        _identity: &AgentIdentity,
        hash_alg: Option<HashAlg>,
        mut to_sign: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send {
        use russh::keys::signature::Signer as _;
        use russh::keys::ssh_key::encoding::Encode as _;
        use russh::keys::ssh_key::private::KeypairData;
        let signed = match self.0.key_data() {
            KeypairData::Rsa(pair) => (pair, hash_alg.or(Some(HashAlg::Sha256)))
                .try_sign(&to_sign)
                .map_err(|e| RsaSignError::Sign(e.to_string()))
                .and_then(|sig| {
                    // The signature goes after the signed data, as one SSH string.
                    sig.encode_prefixed(&mut to_sign)
                        .map_err(|e| RsaSignError::Sign(e.to_string()))
                        .map(|()| to_sign)
                }),
            _ => Err(RsaSignError::Sign("not an RSA key".into())),
        };
        std::future::ready(signed)
    }
}

/// The hash for an RSA signature: the best the server advertises, rsa-sha2-256 if it says nothing
/// (every OpenSSH since 7.2 accepts it; SHA-1 `ssh-rsa` is disabled by default since 8.8).
async fn rsa_hash<H: Handler>(handle: &Handle<H>) -> Option<HashAlg> {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(Some(alg))) => Some(alg),
        Ok(Some(None)) => None,
        _ => Some(HashAlg::Sha256),
    }
}

fn transport_error(host: &str, port: u16, e: russh::Error) -> Error {
    Error::SshConnect {
        host: host.to_owned(),
        port,
        message: format!("authentication interrupted: {e}"),
        source: Some(Arc::new(e)),
    }
}

/// Reads and decrypts a private key file.
///
/// OpenSSH-format keys are parsed with `ssh_key` directly so an encrypted key is told apart from a
/// corrupt one; PEM/PKCS#8 keys go through russh's decoder.
pub(crate) fn load_key(path: &Path, passphrase: Option<&secrecy::SecretString>) -> Result<PrivateKey> {
    let key = decode_key(path, passphrase)?;
    require_rsa_support(path, &key.algorithm())?;
    Ok(key)
}

fn decode_key(path: &Path, passphrase: Option<&secrecy::SecretString>) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        what: KEY_WHAT,
        path: path.to_owned(),
        message: match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".into(),
            std::io::ErrorKind::PermissionDenied => "is not readable (permission denied)".into(),
            _ => format!("cannot be read: {e}"),
        },
        source: Some(Arc::new(e)),
    })?;
    let malformed = |message: String, source: Option<crate::error::SharedError>| Error::File {
        what: KEY_WHAT,
        path: path.to_owned(),
        message,
        source,
    };
    if text.trim_start().starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let key = PrivateKey::from_openssh(text.as_bytes())
            .map_err(|e| malformed(format!("is not a valid OpenSSH private key: {e}"), Some(Arc::new(e))))?;
        // Before asking for a passphrase: the key type is readable while still encrypted.
        require_rsa_support(path, &key.algorithm())?;
        if !key.is_encrypted() {
            return Ok(key);
        }
        let Some(pass) = passphrase else {
            return Err(Error::KeyPassphrase {
                path: path.to_owned(),
                problem: "no passphrase was given",
            });
        };
        return key.decrypt(pass.expose_secret()).map_err(|_| Error::KeyPassphrase {
            path: path.to_owned(),
            problem: "the passphrase is wrong",
        });
    }
    let encrypted_pem = text.contains("ENCRYPTED");
    russh::keys::decode_secret_key(&text, passphrase.map(|p| p.expose_secret())).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => Error::KeyPassphrase {
            path: path.to_owned(),
            problem: "no passphrase was given",
        },
        // Without the `rsa` feature russh rejects RSA PEM and PKCS#8 keys before decoding them.
        russh::keys::Error::UnsupportedKeyType { key_type_string, .. } if key_type_string == "RSA" => {
            rsa_disabled(path)
        }
        russh::keys::Error::UnknownAlgorithm(oid) if oid.to_string() == RSA_ENCRYPTION_OID => rsa_disabled(path),
        _ if encrypted_pem && passphrase.is_some() => Error::KeyPassphrase {
            path: path.to_owned(),
            problem: "the passphrase is wrong",
        },
        other => malformed(
            format!("is not a supported private key: {other}"),
            Some(Arc::new(other)),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/keys/id_rsa";

    fn rsa_error_text(result: Result<()>) -> String {
        match result {
            Err(e @ Error::File { .. }) => {
                assert!(!e.is_transient(), "a build without RSA does not heal by retrying");
                e.to_string()
            }
            other => panic!("expected the missing-feature error, got {other:?}"),
        }
    }

    #[test]
    fn an_rsa_key_without_the_feature_names_the_feature_and_the_file() {
        for hash in [None, Some(HashAlg::Sha256), Some(HashAlg::Sha512)] {
            let text = rsa_error_text(check_rsa_support(false, Path::new(PATH), &Algorithm::Rsa { hash }));
            assert!(text.contains("enable the `rsa` feature of sea-orm-tunnel"), "{text}");
            assert!(text.contains(PATH), "{text}");
            assert!(text.contains("RSA key"), "{text}");
        }
    }

    #[test]
    fn the_default_certificate_is_next_to_the_key_as_ssh_looks_for_it() {
        assert_eq!(
            default_cert_path(Path::new("/home/u/.ssh/id_ed25519")),
            PathBuf::from("/home/u/.ssh/id_ed25519-cert.pub")
        );
        assert_eq!(
            default_cert_path(Path::new("keys/deploy.key")),
            PathBuf::from("keys/deploy.key-cert.pub")
        );
    }

    #[test]
    fn a_certificate_is_required_to_have_its_key() {
        let auth = AuthConfig::agent().certificate("/certs/id-cert.pub");
        match Credentials::load(&auth) {
            Err(Error::Config { field, message }) => {
                assert_eq!(field, "SSH_CERTIFICATE_PATH");
                assert!(message.contains("SSH_KEY_PATH"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_key_types_need_no_feature_and_rsa_is_accepted_with_it() {
        let ecdsa = Algorithm::Ecdsa {
            curve: russh::keys::EcdsaCurve::NistP256,
        };
        for algorithm in [Algorithm::Ed25519, ecdsa] {
            check_rsa_support(false, Path::new(PATH), &algorithm).unwrap();
            check_rsa_support(true, Path::new(PATH), &algorithm).unwrap();
        }
        check_rsa_support(true, Path::new(PATH), &Algorithm::Rsa { hash: None }).unwrap();
    }

    /// What this build does (the crate's own tests enable `rsa`; `cargo check` without it is the
    /// other half).
    #[cfg(feature = "rsa")]
    #[test]
    fn this_build_accepts_rsa_keys() {
        require_rsa_support(Path::new(PATH), &Algorithm::Rsa { hash: None }).unwrap();
    }

    #[cfg(not(feature = "rsa"))]
    #[test]
    fn this_build_refuses_rsa_keys() {
        let text = rsa_error_text(require_rsa_support(Path::new(PATH), &Algorithm::Rsa { hash: None }));
        assert!(text.contains("`rsa` feature"), "{text}");
    }
}
