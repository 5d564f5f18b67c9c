//! [`TestCa`]: a throwaway certificate authority (the system `openssl` command), for
//! PostgreSQL servers with TLS ([`TempPostgres::start_tls`](super::TempPostgres::start_tls)) and
//! the clients that talk to them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::util::{self, Result, TestkitError};

const INSTALL: &str = "apt-get install openssl";

/// A certificate and its private key (PEM files, the key mode 0600).
#[derive(Debug, Clone)]
pub struct CertPair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM; encrypted when made by [`TestCa::client_cert_encrypted`]).
    pub key: PathBuf,
}

/// A private CA in a temp dir: an EC P-256 root that signs server and client certificates.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sea_orm_tunnel::testkit::{TempPostgres, TestCa};
///
/// let ca = TestCa::new("test CA").await?;
/// let server = ca.server_cert("db.internal").await?;
/// let pg = TempPostgres::start_tls(&server).await?;
/// // DATABASE_URL=...@db.internal:PORT/postgres?sslmode=verify-full&sslrootcert=<ca.cert_path()>
/// # let _ = pg; Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    next: AtomicU32,
    /// `openssl ca` shares the index and serial files: one signature at a time, so that
    /// certificates may be issued concurrently.
    signing: tokio::sync::Mutex<()>,
}

impl TestCa {
    /// A new self-signed root, valid for ten years, with `name` as its common name.
    pub async fn new(name: &str) -> Result<TestCa> {
        let dir = tempfile::Builder::new()
            .prefix("sea-orm-tunnel-ca-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp dir for the test CA", e))?;
        let key = dir.path().join("ca.key");
        let cert = dir.path().join("ca.crt");
        gen_key(&key).await?;
        let mut req = openssl()?;
        req.args(["req", "-new", "-x509", "-sha256", "-days", "3650", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .arg("-subj")
            .arg(format!("/CN={}", subject_value(name)))
            .args([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        util::run(req, "openssl req (test CA)").await?;
        std::fs::write(dir.path().join("index.txt"), "").map_err(|e| TestkitError::io("writing the CA index", e))?;
        Ok(TestCa {
            dir,
            cert,
            key,
            next: AtomicU32::new(1),
            signing: tokio::sync::Mutex::new(()),
        })
    }

    /// The CA certificate (what a client's `sslrootcert` names).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// A server certificate for the DNS name `dns_name` (subjectAltName and CN), valid from an
    /// hour ago for a year.
    pub async fn server_cert(&self, dns_name: &str) -> Result<CertPair> {
        self.issue(dns_name, Usage::Server, Validity::Current).await
    }

    /// A server certificate for several names, each a DNS name or an IP address (for example
    /// `["db.internal", "127.0.0.1"]`: a client that dials the address itself, as through an
    /// `ssh -L` forward, can then verify the name it dialled). The first name is the CN. Valid
    /// from an hour ago for a year.
    pub async fn server_cert_for_names(&self, names: &[&str]) -> Result<CertPair> {
        let Some(first) = names.first() else {
            return Err(TestkitError::Unsupported(
                "TestCa::server_cert_for_names needs at least one name".to_owned(),
            ));
        };
        self.issue_for(first, names, Usage::Server, Validity::Current).await
    }

    /// A server certificate for `dns_name` that expired a year ago (valid 2020-01-01 to
    /// 2021-01-01).
    pub async fn expired_server_cert(&self, dns_name: &str) -> Result<CertPair> {
        self.issue(dns_name, Usage::Server, Validity::Expired).await
    }

    /// A server certificate for `dns_name` that expires in `days` days (for expiry warnings).
    pub async fn server_cert_expiring_in(&self, dns_name: &str, days: u32) -> Result<CertPair> {
        self.issue(dns_name, Usage::Server, Validity::Days(days)).await
    }

    /// A client certificate with `user` as its common name (pg_hba `cert` maps it to that role).
    pub async fn client_cert(&self, user: &str) -> Result<CertPair> {
        self.issue(user, Usage::Client, Validity::Current).await
    }

    /// [`client_cert`](Self::client_cert) with the key encrypted as PKCS#8 (PBES2, AES-256-CBC)
    /// under `password` (what a client's `sslpassword` gives).
    pub async fn client_cert_encrypted(&self, user: &str, password: &str) -> Result<CertPair> {
        let pair = self.client_cert(user).await?;
        let encrypted = pair.key.with_extension("enc.key");
        let mut cmd = openssl()?;
        cmd.args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in"])
            .arg(&pair.key)
            .arg("-out")
            .arg(&encrypted)
            .arg("-passout")
            .arg(format!("pass:{password}"));
        util::run(cmd, "openssl pkcs8 (encrypting a key)").await?;
        private(&encrypted)?;
        Ok(CertPair {
            cert: pair.cert,
            key: encrypted,
        })
    }

    async fn issue(&self, name: &str, usage: Usage, validity: Validity) -> Result<CertPair> {
        self.issue_for(name, &[name], usage, validity).await
    }

    /// `name` is the CN; a server certificate's subjectAltName lists `alt_names` (IP or DNS).
    async fn issue_for(&self, name: &str, alt_names: &[&str], usage: Usage, validity: Validity) -> Result<CertPair> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let base = self.dir.path().join(format!("{n:03}-{}", file_stem(name)));
        let key = base.with_extension("key");
        let csr = base.with_extension("csr");
        let cert = base.with_extension("crt");
        gen_key(&key).await?;
        let mut req = openssl()?;
        req.args(["req", "-new", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .arg("-subj")
            .arg(format!("/CN={}", subject_value(name)));
        util::run(req, "openssl req (certificate request)").await?;

        let ext = base.with_extension("ext");
        let mut text = String::from("basicConstraints=critical,CA:FALSE\n");
        match usage {
            Usage::Server => {
                let alt: Vec<String> = alt_names
                    .iter()
                    .map(|n| match n.parse::<std::net::IpAddr>() {
                        Ok(ip) => format!("IP:{ip}"),
                        Err(_) => format!("DNS:{n}"),
                    })
                    .collect();
                let _ = writeln!(text, "subjectAltName={}", alt.join(","));
                text.push_str("keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n");
            }
            Usage::Client => text.push_str("keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"),
        }
        std::fs::write(&ext, text).map_err(|e| TestkitError::io("writing certificate extensions", e))?;

        // `openssl x509 -req` cannot back-date; `openssl ca` can (-startdate/-enddate).
        let (start, end) = validity.dates();
        let config = base.with_extension("cnf");
        let dir = self.dir.path().display();
        std::fs::write(
            &config,
            format!(
                "[ca]\ndefault_ca=test\n[test]\ndatabase={dir}/index.txt\nnew_certs_dir={dir}\n\
                 serial={dir}/serial\ndefault_md=sha256\npolicy=any\nunique_subject=no\n[any]\ncommonName=supplied\n"
            ),
        )
        .map_err(|e| TestkitError::io("writing the CA config", e))?;
        let _signing = self.signing.lock().await;
        std::fs::write(self.dir.path().join("serial"), format!("{:016X}\n", fastrand::u64(1..)))
            .map_err(|e| TestkitError::io("writing the CA serial", e))?;
        let mut ca = openssl()?;
        ca.args(["ca", "-batch", "-notext", "-config"])
            .arg(&config)
            .arg("-cert")
            .arg(&self.cert)
            .arg("-keyfile")
            .arg(&self.key)
            .arg("-in")
            .arg(&csr)
            .arg("-out")
            .arg(&cert)
            .arg("-extfile")
            .arg(&ext)
            .arg("-startdate")
            .arg(start)
            .arg("-enddate")
            .arg(end);
        util::run(ca, "openssl ca (signing a certificate)").await?;
        Ok(CertPair { cert, key })
    }
}

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
}

#[derive(Clone, Copy)]
enum Validity {
    Current,
    Expired,
    Days(u32),
}

impl Validity {
    /// `YYYYMMDDHHMMSSZ` start and end.
    fn dates(self) -> (String, String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stamp = |secs: u64| {
            // "YYYY-MM-DD HH:MM:SS UTC" -> "YYYYMMDDHHMMSSZ"
            let text = crate::tls::format_unix(secs);
            let digits: String = text.chars().filter(char::is_ascii_digit).collect();
            format!("{digits}Z")
        };
        match self {
            Validity::Current => (stamp(now - 3600), stamp(now + 365 * 86_400)),
            Validity::Expired => ("20200101000000Z".into(), "20210101000000Z".into()),
            Validity::Days(days) => (stamp(now - 3600), stamp(now + u64::from(days) * 86_400)),
        }
    }
}

fn openssl() -> Result<Command> {
    let path = util::find_binary("openssl", &[], INSTALL)?;
    let mut cmd = Command::new(path);
    cmd.env("LC_ALL", "C");
    Ok(cmd)
}

async fn gen_key(path: &Path) -> Result<()> {
    let mut cmd = openssl()?;
    cmd.args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
    ])
    .arg(path);
    util::run(cmd, "openssl genpkey").await?;
    private(path)
}

fn private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| TestkitError::io(format!("chmod 600 {}", path.display()), e))
}

/// A name safe inside `-subj /CN=...`.
fn subject_value(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || " ._-@".contains(*c))
        .collect()
}

fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}
