//! The files read once per tunnel, the rustls client built from them, the three verifiers
//! (none, chain, chain + name) and the mapping of a TLS failure to an [`Error::Tls`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use secrecy::ExposeSecret;
use tokio_rustls::TlsConnector;

use super::{PostgresTls, RootCerts, SslMode, TlsSession, Verification as Verify, default_file};
use crate::error::TlsErrorKind;
use crate::{Error, Result};

/// [`PostgresTls`] with its files read: ready to negotiate.
pub(crate) struct Loaded {
    pub(crate) mode: SslMode,
    pub(crate) verify: Verify,
    pub(crate) connector: TlsConnector,
    pub(crate) server_name: ServerName<'static>,
    /// The name as configured, for messages.
    pub(crate) name: String,
    /// Where the roots came from, for messages: `sslrootcert "/etc/ca.pem"`.
    pub(crate) roots: String,
    /// Whether a client certificate is offered.
    pub(crate) client_cert: bool,
    /// The latest handshake's session (for `check`, and users via [`PostgresTls::last_session`]).
    pub(crate) last: std::sync::Mutex<Option<TlsSession>>,
    /// The expiry warning was given (once per tunnel, not per connection).
    pub(crate) expiry_warned: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("mode", &self.mode)
            .field("verify", &self.verify)
            .field("name", &self.name)
            .field("roots", &self.roots)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

const ROOT_WHAT: &str = "PostgreSQL root certificate file (sslrootcert)";
const CERT_WHAT: &str = "PostgreSQL client certificate (sslcert)";
const KEY_WHAT: &str = "PostgreSQL client key (sslkey)";

fn file_error(what: &'static str, path: &Path, message: impl Into<String>) -> Error {
    Error::File {
        what,
        path: path.to_owned(),
        message: message.into(),
        source: None,
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::File {
        what,
        path: path.to_owned(),
        message: match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".into(),
            std::io::ErrorKind::PermissionDenied => "is not readable (permission denied)".into(),
            _ => format!("could not be read: {e}"),
        },
        source: Some(Arc::new(e)),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Loaded {
    pub(crate) fn new(tls: &PostgresTls) -> Result<Loaded> {
        let provider = provider();
        // As in libpq, sslmode=disable reads no certificate file: nothing is negotiated.
        let disabled = tls.mode == SslMode::Disable;
        let (roots, roots_desc) = if disabled {
            (None, "none (sslmode=disable)".to_owned())
        } else {
            load_roots(tls)?
        };
        let verify = match (tls.mode, &roots) {
            (SslMode::VerifyFull, Some(_)) => Verify::ChainAndName,
            (SslMode::VerifyCa, Some(_)) => Verify::Chain,
            (SslMode::VerifyFull | SslMode::VerifyCa, None) => {
                let path = super::home()
                    .map(|h| h.join(".postgresql/root.crt"))
                    .unwrap_or_else(|| PathBuf::from("~/.postgresql/root.crt"));
                return Err(file_error(
                    ROOT_WHAT,
                    &path,
                    format!(
                        "does not exist, and sslmode={} needs the CA that signed the server's certificate: \
                         set sslrootcert=<file>, sslrootcert=system (public CAs), or a weaker sslmode",
                        tls.mode
                    ),
                ));
            }
            // libpq: a root certificate present makes `require` (and prefer) verify the chain.
            (_, Some(_)) => Verify::Chain,
            (_, None) => Verify::None,
        };
        let server_name = match ServerName::try_from(tls.server_name.clone()) {
            Ok(name) => name,
            Err(_) if verify == Verify::ChainAndName => {
                return Err(Error::config(
                    "DATABASE_URL sslservername",
                    format!(
                        "{:?} is not a DNS name or IP address to check the server certificate against \
                         (sslmode=verify-full): set sslservername=<the name on the certificate>",
                        tls.server_name
                    ),
                ));
            }
            // Nothing checks the name: any valid placeholder will do (no SNI is sent for it).
            Err(_) => ServerName::try_from("postgres").expect("a valid DNS name"),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (verify, roots) {
            (Verify::None, _) | (_, None) => Arc::new(AnyCertificate(provider.clone())),
            (v, Some(roots)) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        Error::config("DATABASE_URL sslrootcert", format!("unusable root certificates: {e}"))
                    })?;
                if v == Verify::ChainAndName {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config("DATABASE_URL sslmode", format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client = if disabled { None } else { load_client_cert(tls)? };
        let (mut config, client_cert) = match client {
            Some((cert_path, certs, key_path, key)) => {
                let config = builder.with_client_auth_cert(certs, key).map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => file_error(
                        KEY_WHAT,
                        &key_path,
                        format!("does not match the certificate in {cert_path:?} (sslcert)"),
                    ),
                    other => file_error(KEY_WHAT, &key_path, format!("is not usable: {other}")),
                })?;
                (config, true)
            }
            None => (builder.with_no_client_auth(), false),
        };
        config.enable_sni = tls.sni;
        Ok(Loaded {
            mode: tls.mode,
            verify,
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            name: tls.server_name.clone(),
            roots: roots_desc,
            client_cert,
            last: std::sync::Mutex::new(None),
            expiry_warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The [`Error::Tls`] for a failed handshake (or a failure right after it).
    pub(crate) fn handshake_error(&self, e: &std::io::Error) -> Error {
        let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let (kind, message) = match tls {
            Some(rustls::Error::InvalidCertificate(cert)) => self.certificate_error(cert),
            Some(rustls::Error::AlertReceived(alert)) => {
                use rustls::AlertDescription as A;
                let client = matches!(
                    alert,
                    A::BadCertificate
                        | A::UnknownCA
                        | A::CertificateRequired
                        | A::CertificateExpired
                        | A::CertificateRevoked
                        | A::CertificateUnknown
                        | A::UnsupportedCertificate
                        | A::AccessDenied
                        | A::DecryptError
                );
                if client {
                    let what = if self.client_cert {
                        "our client certificate (sslcert)"
                    } else {
                        "the handshake: it may require a client certificate (sslcert/sslkey)"
                    };
                    (
                        TlsErrorKind::ClientCertificate,
                        format!("the server refused {what} (TLS alert {alert:?})"),
                    )
                } else {
                    (
                        TlsErrorKind::Handshake,
                        format!("the server aborted the handshake (TLS alert {alert:?})"),
                    )
                }
            }
            Some(other) => (TlsErrorKind::Handshake, format!("TLS handshake failed: {other}")),
            None => (
                TlsErrorKind::Io,
                format!("the connection closed during the TLS handshake: {e}"),
            ),
        };
        self.error(kind, message)
    }

    fn certificate_error(&self, cert: &CertificateError) -> (TlsErrorKind, String) {
        match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                TlsErrorKind::UnknownIssuer,
                format!(
                    "the server's certificate is not signed by a CA in {} (wrong sslrootcert?)",
                    self.roots
                ),
            ),
            CertificateError::Expired => (TlsErrorKind::Expired, "the server's certificate has expired".into()),
            CertificateError::ExpiredContext { not_after, .. } => (
                TlsErrorKind::Expired,
                format!(
                    "the server's certificate expired at {} (Unix time {})",
                    crate::tls::x509::format_unix(not_after.as_secs()),
                    not_after.as_secs()
                ),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                TlsErrorKind::NotYetValid,
                "the server's certificate is not valid yet (check the clocks)".into(),
            ),
            CertificateError::NotValidForName => (
                TlsErrorKind::NameMismatch,
                format!(
                    "the server's certificate is not valid for {:?}; if DATABASE_URL names the server by \
                     an address or an alias, set sslservername=<the name on the certificate>",
                    self.name
                ),
            ),
            CertificateError::NotValidForNameContext { presented, .. } => (
                TlsErrorKind::NameMismatch,
                format!(
                    "the server's certificate is not valid for {:?} (it is for {}); if DATABASE_URL names the \
                     server by an address or an alias, set sslservername=<the name on the certificate>",
                    self.name,
                    presented.join(", ")
                ),
            ),
            other => (
                TlsErrorKind::Certificate,
                format!("the server's certificate was refused: {other:?}"),
            ),
        }
    }

    /// The server answered `N` to the SSLRequest although `sslmode` requires TLS.
    pub(crate) fn not_supported(&self) -> Error {
        self.error(
            TlsErrorKind::NotSupported,
            format!(
                "the server does not support TLS (it answered N to the SSLRequest) and sslmode={} refuses \
                 plaintext",
                self.mode
            ),
        )
    }

    pub(crate) fn error(&self, kind: TlsErrorKind, message: String) -> Error {
        Error::Tls {
            host: self.name.clone(),
            kind,
            message,
        }
    }
}

fn load_roots(tls: &PostgresTls) -> Result<(Option<RootCertStore>, String)> {
    let path = match &tls.root_certs {
        RootCerts::System => {
            let store = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            return Ok((
                Some(store),
                "the system roots (sslrootcert=system, webpki-roots)".into(),
            ));
        }
        RootCerts::File(path) => path.clone(),
        RootCerts::Default => match default_file("root.crt") {
            Some(path) => path,
            None => return Ok((None, "no root certificate".into())),
        },
    };
    let pem = read(ROOT_WHAT, &path)?;
    let mut store = RootCertStore::empty();
    let mut found = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| file_error(ROOT_WHAT, &path, format!("is not valid PEM: {e}")))?;
        store.add(cert).map_err(|e| {
            file_error(
                ROOT_WHAT,
                &path,
                format!("holds a certificate that cannot be used: {e}"),
            )
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(file_error(ROOT_WHAT, &path, "holds no PEM CERTIFICATE"));
    }
    Ok((Some(store), format!("sslrootcert {path:?}")))
}

type ClientCert = (PathBuf, Vec<CertificateDer<'static>>, PathBuf, PrivateKeyDer<'static>);

fn load_client_cert(tls: &PostgresTls) -> Result<Option<ClientCert>> {
    let cert_path = match &tls.client_cert {
        Some(p) => p.clone(),
        None => match default_file("postgresql.crt") {
            Some(p) => p,
            None if tls.client_key.is_some() => {
                return Err(Error::config(
                    "DATABASE_URL sslkey",
                    "is set, but no client certificate (sslcert) goes with it",
                ));
            }
            None => return Ok(None),
        },
    };
    let pem = read(CERT_WHAT, &cert_path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| file_error(CERT_WHAT, &cert_path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(CERT_WHAT, &cert_path, "holds no PEM CERTIFICATE"));
    }
    let key_path = tls.client_key.clone().unwrap_or_else(|| {
        super::home()
            .map(|h| h.join(".postgresql/postgresql.key"))
            .unwrap_or_else(|| PathBuf::from("~/.postgresql/postgresql.key"))
    });
    let key = load_key(&key_path, tls)?;
    Ok(Some((cert_path, certs, key_path, key)))
}

fn load_key(path: &Path, tls: &PostgresTls) -> Result<PrivateKeyDer<'static>> {
    let pem = read(KEY_WHAT, path)?;
    check_key_permissions(path)?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(file_error(
            KEY_WHAT,
            path,
            "is encrypted in the legacy OpenSSL format, which sslpassword cannot open here: convert it \
             with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD -out NEW`",
        ));
    }
    if let Some(block) = pem_block(&text, "ENCRYPTED PRIVATE KEY") {
        let Some(password) = &tls.key_password else {
            return Err(file_error(KEY_WHAT, path, "is encrypted and no sslpassword was given"));
        };
        let (_, der) = pkcs8::der::pem::decode_vec(block.as_bytes())
            .map_err(|e| file_error(KEY_WHAT, path, format!("is not valid PEM: {e}")))?;
        let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der.as_slice())
            .map_err(|e| file_error(KEY_WHAT, path, format!("is not an encrypted PKCS#8 key: {e}")))?;
        let doc = info.decrypt(password.expose_secret().as_bytes()).map_err(|_| {
            // The error says nothing useful and the password stays out of it.
            file_error(
                KEY_WHAT,
                path,
                "could not be decrypted with sslpassword (wrong password?)",
            )
        })?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(doc.as_bytes().to_vec())));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        file_error(
            KEY_WHAT,
            path,
            format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

/// The text of the first `-----BEGIN <label>-----` ... `-----END <label>-----` block.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

/// libpq refuses a key others can read: 0600 or less, or 0640 or less when owned by root.
#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(file_error(
            KEY_WHAT,
            path,
            format!(
                "has permissions {mode:04o}: group or others can read it; it must be u=rw (0600) or less, or \
                 u=rw,g=r (0640) or less when owned by root (`chmod 600`)"
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<()> {
    Ok(())
}

/// `verify-ca`: the chain must verify; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a root certificate: libpq verifies nothing then (encryption
/// against a passive observer only). The handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(crate) use crate::sync::lock;

impl Loaded {
    /// Keeps `session` as the latest, and warns once when the certificate expires within
    /// [`EXPIRY_WARNING_DAYS`](super::EXPIRY_WARNING_DAYS).
    pub(crate) fn record(&self, session: TlsSession) {
        if let Some(left) = session.expires_in_secs()
            && left < super::EXPIRY_WARNING_DAYS * 86_400
            && !self.expiry_warned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                target: crate::observe::events::TARGET_TUNNEL,
                server = %session.server_name,
                days_left = left / 86_400,
                "the PostgreSQL server certificate expires within {} days",
                super::EXPIRY_WARNING_DAYS
            );
        }
        *lock(&self.last) = Some(session);
    }
}
