//! SSH authentication: private key file first, then ssh-agent.
//!
//! Order (documented on [`AuthConfig`](crate::config::AuthConfig)):
//!
//! 1. The key file at `key_path`, if configured. It is loaded and decrypted once, when the tunnel is
//!    created, so a missing file or a wrong passphrase fails `connect()` at once (permanent errors)
//!    and reconnects do not pay for the key derivation again. RSA keys need the `rsa` cargo
//!    feature and sign with the best hash the server advertises in `server-sig-algs`
//!    (rsa-sha2-512, then rsa-sha2-256).
//! 2. Every identity held by the ssh-agent, if `use_agent` is set and an agent socket is known
//!    (`agent_socket`, else `SSH_AUTH_SOCK`). An unreachable agent is reported, not fatal.
//!
//! When every method is refused the error is [`Error::Auth`] listing each method and its outcome.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::{AuthResult, Handle, Handler};
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use secrecy::ExposeSecret;

use crate::config::AuthConfig;
use crate::{Error, Result};

const KEY_WHAT: &str = "SSH private key";

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

/// Key material and agent location, resolved once per tunnel.
pub(crate) struct Credentials {
    key: Option<(PathBuf, Arc<PrivateKey>)>,
    agent: Option<PathBuf>,
    /// The agent is enabled, whether or not a socket was found.
    use_agent: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Credentials")
            .field("key", &self.key.as_ref().map(|(p, _)| p))
            .field("agent", &self.agent)
            .finish()
    }
}

impl Credentials {
    /// Loads (and decrypts) the key file and locates the agent (`agent_socket`, else `SSH_AUTH_SOCK`).
    pub(crate) fn load(auth: &AuthConfig) -> Result<Self> {
        let key = match &auth.key_path {
            Some(path) => {
                // The passphrase stays a `SecretString` (zeroed on drop) until the decrypt call.
                Some((path.clone(), Arc::new(load_key(path, auth.passphrase.as_ref())?)))
            }
            None => None,
        };
        let agent = if auth.use_agent {
            auth.agent_socket
                .clone()
                .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from))
        } else {
            None
        };
        if key.is_none() && !auth.use_agent {
            return Err(Error::config(
                "tunnel.auth",
                "no authentication method: set a key path (SSH_KEY_PATH) or enable the agent (SSH_USE_AGENT)",
            ));
        }
        Ok(Self {
            key,
            agent,
            use_agent: auth.use_agent,
        })
    }

    /// Authenticates `user` on a fresh session, trying the key file then the agent.
    pub(crate) async fn authenticate<H: Handler>(
        &self,
        handle: &mut Handle<H>,
        user: &str,
        host: &str,
        port: u16,
    ) -> Result<()> {
        let mut tried = String::new();
        if let Some((path, key)) = &self.key {
            let hash = if key.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            let outcome = match handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await
            {
                Ok(AuthResult::Success) => return Ok(()),
                Ok(AuthResult::Failure {
                    partial_success: true, ..
                }) => "accepted, but the server wants a second factor",
                Ok(_) => "refused",
                Err(e) => return Err(transport_error(host, port, e)),
            };
            let _ = write!(tried, "publickey {} ({}) {outcome}", path.display(), key.algorithm());
        }
        if let Some(sock) = &self.agent {
            if !tried.is_empty() {
                tried.push_str(", ");
            }
            let _ = write!(tried, "ssh-agent {}", sock.display());
            match self
                .try_agent(handle, user, sock)
                .await
                .map_err(|e| transport_error(host, port, e))?
            {
                AgentOutcome::Success => return Ok(()),
                AgentOutcome::Failed(why) => {
                    let _ = write!(tried, " ({why})");
                }
            }
        } else if self.use_agent {
            if !tried.is_empty() {
                tried.push_str(", ");
            }
            tried.push_str("ssh-agent (enabled, but SSH_AUTH_SOCK is not set)");
        }
        Err(Error::Auth {
            user: user.to_owned(),
            host: host.to_owned(),
            tried,
        })
    }

    async fn try_agent<H: Handler>(
        &self,
        handle: &mut Handle<H>,
        user: &str,
        sock: &Path,
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
        let mut errors = Vec::new();
        for identity in &identities {
            let public = identity.public_key().into_owned();
            let hash = if public.algorithm().is_rsa() {
                rsa_hash(handle).await
            } else {
                None
            };
            match handle.authenticate_publickey_with(user, public, hash, &mut agent).await {
                Ok(AuthResult::Success) => return Ok(AgentOutcome::Success),
                Ok(_) => refused += 1,
                Err(russh::AgentAuthError::Send(_)) => return Err(russh::Error::SendError),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let mut why = format!("{} key(s): {refused} refused", identities.len());
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
