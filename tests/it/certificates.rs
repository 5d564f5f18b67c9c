//! OpenSSH certificates (user and host), the known_hosts port-less fallback compared with the real
//! `ssh`, HostKeyAlias, extra known_hosts files, extra identity files and IdentitiesOnly, all
//! against real OpenSSH sshd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::support::*;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, HostKeyPolicy, TunnelConfig};
use sea_orm_tunnel::testkit::{KeyKind, OpenSshd};
use sea_orm_tunnel::tunnel::SshTunnel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tunnel config to a target nobody listens on: most tests only need the SSH session.
fn cfg(sshd: &OpenSshd) -> TunnelConfig {
    sshd.tunnel_config("127.0.0.1", 9)
        .connect_timeout(Duration::from_secs(10))
        .reconnect(
            BackoffPolicy::new(Duration::from_millis(200))
                .jitter(0.0)
                .max_retries(1),
        )
}

async fn connect(config: TunnelConfig) -> Result<SshTunnel, Error> {
    tokio::time::timeout(LIVENESS, SshTunnel::connect(config))
        .await
        .expect("connect returns within the liveness bound")
}

/// Whether the tunnel connects; the tunnel is closed again.
async fn tunnel_verdict(config: TunnelConfig) -> Result<(), Error> {
    let tunnel = connect(config).await?;
    tunnel.disconnect().await;
    Ok(())
}

fn sshd_log(sshd: &OpenSshd) -> String {
    std::fs::read_to_string(sshd.log_path()).unwrap_or_default()
}

/// Runs the system OpenSSH client (`ssh ... true`, strict, `known_hosts_path()`); its verdict
/// and stderr.
async fn ssh_verdict(sshd: &OpenSshd, identity: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = sshd.ssh_command(identity);
    // ssh reads options after the host name too (it restarts option parsing there); options
    // ssh_command already set keep their value (the first one wins).
    cmd.args(extra).arg("true").stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("ssh runs"))
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn is_host_key_error(e: &Error) -> bool {
    matches!(
        e,
        Error::HostKeyUnknown { .. }
            | Error::HostKeyChanged { .. }
            | Error::HostKeyRevoked { .. }
            | Error::HostCertificate { .. }
    )
}

fn public_text(key: &Path) -> String {
    let text = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// known_hosts: the port-less fallback, verdict for verdict with the real `ssh`
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_verdicts_match_the_openssh_client() {
    let sshd = OpenSshd::start().await.unwrap();
    let port = sshd.port();
    assert_ne!(port, 22, "the fallback only exists for other ports");
    let host_key = sshd.host_public_key();
    let other = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let other = public_text(&other);
    let ecdsa = sshd.generate_key(KeyKind::Ecdsa, None).await.unwrap();
    let ecdsa = public_text(&ecdsa);
    let kh = sshd.known_hosts_path();
    // (what, known_hosts, expected verdict: Some(true) = both accept; None = just compare).
    let cases: Vec<(&str, String, Option<bool>)> = vec![
        ("port-ful line", format!("[127.0.0.1]:{port} {host_key}\n"), Some(true)),
        ("plain line only", format!("127.0.0.1 {host_key}\n"), Some(true)),
        ("plain line, another key", format!("127.0.0.1 {other}\n"), Some(false)),
        (
            "port-ful line with another key shadows the plain one",
            format!("[127.0.0.1]:{port} {other}\n127.0.0.1 {host_key}\n"),
            Some(false),
        ),
        (
            "port-ful line with another key type, plain line holds the key",
            format!("[127.0.0.1]:{port} {ecdsa}\n127.0.0.1 {host_key}\n"),
            Some(false),
        ),
        (
            "another key type only",
            format!("[127.0.0.1]:{port} {ecdsa}\n"),
            Some(false),
        ),
        (
            "another key type only, plain name",
            format!("127.0.0.1 {ecdsa}\n"),
            Some(false),
        ),
        (
            "another port's line only",
            format!("[127.0.0.1]:{} {host_key}\n", port.wrapping_add(1).max(1)),
            Some(false),
        ),
        ("plain wildcard", format!("127.0.0.* {host_key}\n"), Some(true)),
        (
            "negating only the port-ful name",
            format!("![127.0.0.1]:{port},* {host_key}\n"),
            Some(true),
        ),
        (
            "negating the plain name",
            format!("127.0.0.?,!127.0.0.1 {host_key}\n"),
            Some(false),
        ),
        (
            "bare star, plain name negated",
            format!("*,!127.0.0.1 {host_key}\n"),
            Some(true),
        ),
        (
            "plain line revoked",
            format!("127.0.0.1 {host_key}\n@revoked 127.0.0.1 {host_key}\n"),
            Some(false),
        ),
        (
            "revoked everywhere",
            format!("@revoked * {host_key}\n[127.0.0.1]:{port} {host_key}\n"),
            Some(false),
        ),
        (
            "CA line is not a key",
            format!("@cert-authority 127.0.0.1 {host_key}\n"),
            Some(false),
        ),
        ("hashed plain line", String::new(), Some(true)),
    ];
    let mut table = String::new();
    for (what, contents, expected) in cases {
        if contents.is_empty() {
            std::fs::write(&kh, format!("127.0.0.1 {host_key}\n")).unwrap();
            let out = Command::new("ssh-keygen")
                .arg("-H")
                .arg("-f")
                .arg(&kh)
                .output()
                .unwrap();
            assert!(out.status.success());
        } else {
            std::fs::write(&kh, &contents).unwrap();
        }
        let (ssh_ok, stderr) = ssh_verdict(&sshd, &sshd.client_key_path(), &[]).await;
        let ours = tunnel_verdict(cfg(&sshd)).await;
        if let Err(e) = &ours {
            assert!(is_host_key_error(e), "{what}: not a host-key verdict: {e:?}");
            assert!(!e.is_transient(), "{what}: {e}");
        }
        table.push_str(&format!("{what}: ssh {ssh_ok}, tunnel {}\n", ours.is_ok()));
        assert_eq!(
            ours.is_ok(),
            ssh_ok,
            "{what}: known_hosts\n{}\nssh: {stderr}\ntunnel: {ours:?}",
            std::fs::read_to_string(&kh).unwrap()
        );
        if let Some(expected) = expected {
            assert_eq!(ssh_ok, expected, "{what}: ssh said {stderr}");
        }
    }
    eprintln!("{table}");
}

/// OpenSSH prefers the host-key types known_hosts lists for the host; so does the tunnel, so a
/// server with an ed25519 and an ECDSA key, recorded by its ECDSA key only, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_several_host_keys_presents_the_type_on_record() {
    let keys = tempfile::tempdir().unwrap();
    let ecdsa = keys.path().join("ssh_host_ecdsa_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ecdsa", "-N", "", "-f"])
        .arg(&ecdsa)
        .output()
        .unwrap();
    assert!(out.status.success());
    // HostKey is a list: the extra line adds a key to the test kit's ed25519 one.
    let sshd = OpenSshd::builder()
        .config_line(format!("HostKey {}", ecdsa.display()))
        .start()
        .await
        .unwrap();
    let recorded = format!("[127.0.0.1]:{} {}", sshd.port(), public_text(&ecdsa));
    std::fs::write(sshd.known_hosts_path(), format!("{recorded}\n")).unwrap();
    tunnel_verdict(cfg(&sshd))
        .await
        .expect("the ECDSA key on record is negotiated");
    let (ok, stderr) = ssh_verdict(&sshd, &sshd.client_key_path(), &[]).await;
    assert!(ok, "{stderr}");
    // Recorded by its ed25519 key only: that one is negotiated.
    std::fs::write(sshd.known_hosts_path(), format!("{}\n", sshd.known_hosts_line())).unwrap();
    tunnel_verdict(cfg(&sshd)).await.expect("the ed25519 key on record");
}

// ---------------------------------------------------------------------------------------------
// HostKeyAlias, extra known_hosts files
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_alias_looks_the_key_up_under_the_alias_like_ssh() {
    let sshd = OpenSshd::start().await.unwrap();
    let kh = sshd.known_hosts_path();
    std::fs::write(&kh, format!("db-bastion {}\n", sshd.host_public_key())).unwrap();
    assert!(matches!(
        tunnel_verdict(cfg(&sshd)).await,
        Err(Error::HostKeyUnknown { .. })
    ));
    tunnel_verdict(cfg(&sshd).host_key_alias("db-bastion"))
        .await
        .expect("found under the alias");
    let (ssh_ok, stderr) = ssh_verdict(&sshd, &sshd.client_key_path(), &["-o", "HostKeyAlias=db-bastion"]).await;
    assert!(ssh_ok, "{stderr}");
    // accept-new records the alias (no port) in known_hosts.
    std::fs::write(&kh, "").unwrap();
    tunnel_verdict(
        cfg(&sshd)
            .host_key_alias("other-alias")
            .host_key_policy(HostKeyPolicy::AcceptNew),
    )
    .await
    .unwrap();
    let learned = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(learned, format!("other-alias {}\n", sshd.host_public_key()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_known_hosts_files_are_consulted_and_never_written() {
    let sshd = OpenSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let global = dir.path().join("ssh_known_hosts");
    std::fs::write(&global, format!("{}\n", sshd.known_hosts_line())).unwrap();
    let empty = dir.path().join("known_hosts");
    let config = || {
        cfg(&sshd)
            .known_hosts(&empty)
            .extra_known_hosts([dir.path().join("missing"), global.clone()])
    };
    tunnel_verdict(config()).await.expect("the extra file knows the host");
    assert!(matches!(
        tunnel_verdict(cfg(&sshd).known_hosts(&empty)).await,
        Err(Error::HostKeyUnknown { .. })
    ));
    // accept-new with the host known in the extra file: nothing to learn, nothing written.
    tunnel_verdict(config().host_key_policy(HostKeyPolicy::AcceptNew))
        .await
        .unwrap();
    assert!(!empty.exists(), "nothing was learned");
    let before = std::fs::read_to_string(&global).unwrap();
    // A host the extra file does not know is learned into known_hosts only.
    std::fs::write(&global, "# nothing\n").unwrap();
    tunnel_verdict(config().host_key_policy(HostKeyPolicy::AcceptNew))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&global).unwrap(), "# nothing\n");
    assert_eq!(std::fs::read_to_string(&empty).unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// Identity files: extra keys, IdentitiesOnly
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_key_paths_are_offered_in_order_after_the_key_path() {
    let sshd = OpenSshd::start().await.unwrap();
    let stranger = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let second = sshd.generate_key(KeyKind::Ecdsa, None).await.unwrap();
    let missing = sshd.dir().join("no_such_identity");
    let encrypted = sshd
        .generate_key(KeyKind::Ed25519, Some("another passphrase"))
        .await
        .unwrap();
    let auth = || AuthConfig::key_file(&stranger).extra_key_paths([missing.clone(), encrypted.clone(), second.clone()]);
    match tunnel_verdict(cfg(&sshd).auth(auth())).await {
        Err(Error::Auth { tried, .. }) => {
            let first = tried.find(&stranger.display().to_string()).expect("key_path listed");
            let then = tried.find(&second.display().to_string()).expect("extra key listed");
            assert!(first < then, "key_path first: {tried}");
            assert!(
                !tried.contains("no_such_identity"),
                "a missing extra key is skipped: {tried}"
            );
            assert!(
                tried.contains(&format!("publickey {} skipped", encrypted.display())),
                "an unusable extra key is skipped and named: {tried}"
            );
        }
        other => panic!("expected Error::Auth, got {other:?}"),
    }
    sshd.authorize_key(&second).unwrap();
    tunnel_verdict(cfg(&sshd).auth(auth()))
        .await
        .expect("the second identity file is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_only_offers_only_agent_keys_that_match_a_configured_key() {
    let sshd = OpenSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let in_agent = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    sshd.authorize_key(&in_agent).unwrap();
    agent.add(&in_agent);
    let configured = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let auth = |only| {
        AuthConfig::key_file(&configured)
            .agent_socket(&agent.socket)
            .identities_only(only)
    };
    tunnel_verdict(cfg(&sshd).auth(auth(false)))
        .await
        .expect("without IdentitiesOnly the agent's key is offered");
    match tunnel_verdict(cfg(&sshd).auth(auth(true))).await {
        Err(Error::Auth { tried, .. }) => {
            assert!(tried.contains("1 not offered (IdentitiesOnly"), "{tried}");
            assert!(tried.contains("0 refused"), "{tried}");
        }
        other => panic!("expected Error::Auth, got {other:?}"),
    }
    // The agent's key is the configured one: offered (by the agent, which holds the private half).
    let public_only = dir.path().join("agent_key");
    std::fs::copy(&in_agent, &public_only).unwrap();
    tunnel_verdict(
        cfg(&sshd).auth(
            AuthConfig::key_file(&public_only)
                .agent_socket(&agent.socket)
                .identities_only(true),
        ),
    )
    .await
    .expect("a configured key held by the agent is offered under IdentitiesOnly");
}

// ---------------------------------------------------------------------------------------------
// User certificates
// ---------------------------------------------------------------------------------------------

/// An sshd that accepts only certificates signed by its user CA; the CA's path.
async fn cert_only_sshd() -> (OpenSshd, PathBuf) {
    let sshd = OpenSshd::start().await.unwrap();
    let ca = sshd.generate_ca("users").await.unwrap();
    sshd.trust_user_ca(&ca).await.unwrap();
    (sshd, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_signed_user_certificate_logs_in_where_the_plain_key_is_refused() {
    let (sshd, ca) = cert_only_sshd().await;
    let key = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    match tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key))).await {
        Err(Error::Auth { tried, .. }) => assert!(tried.contains("refused"), "{tried}"),
        other => panic!("a plain key is not authorised here: {other:?}"),
    }
    // `<key>-cert.pub` next to the key is found without configuration.
    let cert = sshd
        .sign_user_key(&ca, &key, "cert-default-path", "-5m:+1h")
        .await
        .unwrap();
    assert_eq!(cert, PathBuf::from(format!("{}-cert.pub", key.display())));
    tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key)))
        .await
        .expect("the certificate next to the key logs in");
    assert!(sshd_log(&sshd).contains("ID cert-default-path"), "{}", sshd_log(&sshd));
    // An explicit certificate file elsewhere (SSH_CERTIFICATE_PATH).
    let elsewhere = sshd.dir().join("issued.cert");
    std::fs::rename(&cert, &elsewhere).unwrap();
    tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key)))
        .await
        .expect_err("no certificate next to the key any more");
    tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key).certificate(&elsewhere)))
        .await
        .expect("the configured certificate logs in");
    // A configured certificate that does not exist is a file error naming it.
    let missing = sshd.dir().join("no.cert");
    match tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key).certificate(&missing))).await {
        Err(e @ Error::File { .. }) => {
            assert!(e.to_string().contains("no.cert"), "{e}");
            assert!(!e.is_transient());
        }
        other => panic!("{other:?}"),
    }
    // A certificate of another key is refused before anything is sent.
    let other = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let other_cert = sshd.sign_user_key(&ca, &other, "other", "-5m:+1h").await.unwrap();
    match tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key).certificate(&other_cert))).await {
        Err(e @ Error::File { .. }) => assert!(e.to_string().contains("certifies another key"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_user_certificate_is_a_clear_error_naming_the_file_and_window() {
    let (sshd, ca) = cert_only_sshd().await;
    let key = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let cert = sshd.sign_user_key(&ca, &key, "expired", "-2h:-1h").await.unwrap();
    let err = tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key)))
        .await
        .unwrap_err();
    let cause = match &err {
        Error::TunnelFailed(inner) => &**inner,
        other => other,
    };
    match cause {
        Error::UserCertificateExpired {
            path,
            valid_after,
            valid_before,
            ..
        } => {
            assert_eq!(path, &cert);
            assert!(valid_after < valid_before, "{valid_after} .. {valid_before}");
        }
        other => panic!("expected UserCertificateExpired, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&cert.display().to_string()) && text.contains("valid from"),
        "{text}"
    );
    // Transient: a renewal on disk heals it, so the tunnel keeps retrying.
    assert!(cause.is_transient());
    assert!(
        !sshd_log(&sshd).contains("ID expired"),
        "an expired certificate is not offered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_user_certificate_on_disk_is_used_by_the_next_session() {
    let (sshd, ca) = cert_only_sshd().await;
    let echo = echo_server().await;
    let key = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    sshd.sign_user_key(&ca, &key, "renewal-1", "-5m:+1h").await.unwrap();
    let config = sshd
        .tunnel_config("127.0.0.1", echo.port())
        .auth(AuthConfig::key_file(&key))
        .connect_timeout(Duration::from_secs(10))
        .reconnect(
            BackoffPolicy::new(Duration::from_millis(200))
                .max_delay(Duration::from_millis(500))
                .jitter(0.0)
                .max_retries(0)
                .max_elapsed(None),
        );
    let tunnel = connect(config).await.expect("first certificate");
    let addr = tunnel.local_endpoint().tcp_addr().unwrap();
    echo_roundtrip(addr, b"one".to_vec()).await;
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();

    // The renewal agent replaces the file: established connections are not disturbed.
    sshd.sign_user_key(&ca, &key, "renewal-2", "-5m:+1h").await.unwrap();
    held.write_all(b"more").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    assert!(!sshd_log(&sshd).contains("ID renewal-2"));

    // The sessions die: the reconnect reads the new certificate.
    assert!(sshd.drop_sessions() > 0);
    wait_until("reconnected with the renewed certificate", PATIENCE, || {
        tunnel.is_connected() && sshd_log(&sshd).contains("ID renewal-2")
    })
    .await;
    echo_roundtrip(addr, b"two".to_vec()).await;

    // An expired certificate on disk: the reconnect rounds fail, clearly, and keep reading the
    // file; a renewal heals the tunnel.
    sshd.sign_user_key(&ca, &key, "renewal-expired", "-2h:-1h")
        .await
        .unwrap();
    assert!(sshd.drop_sessions() > 0);
    wait_until("the expired certificate reported", PATIENCE, || {
        !tunnel.is_connected()
            && tunnel
                .last_error()
                .is_some_and(|e| matches!(&*e, Error::UserCertificateExpired { .. }))
    })
    .await;
    sshd.sign_user_key(&ca, &key, "renewal-3", "-5m:+1h").await.unwrap();
    wait_until("healed by the renewal", PATIENCE, || {
        tunnel.is_connected() && sshd_log(&sshd).contains("ID renewal-3")
    })
    .await;
    echo_roundtrip(addr, b"three".to_vec()).await;
    assert!(!sshd_log(&sshd).contains("ID renewal-expired"));
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_held_user_certificate_logs_in() {
    let (sshd, ca) = cert_only_sshd().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let key = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    agent.add(&key);
    match tunnel_verdict(cfg(&sshd).auth(AuthConfig::agent().agent_socket(&agent.socket))).await {
        Err(Error::Auth { tried, .. }) => assert!(tried.contains("1 refused"), "{tried}"),
        other => panic!("the agent's plain key is not authorised: {other:?}"),
    }
    sshd.sign_user_key(&ca, &key, "agent-cert", "-5m:+1h").await.unwrap();
    let added = agent.add(&key);
    assert!(added.contains("Certificate added"), "{added}");
    tunnel_verdict(cfg(&sshd).auth(AuthConfig::agent().agent_socket(&agent.socket)))
        .await
        .expect("the agent's certificate logs in");
    assert!(sshd_log(&sshd).contains("ID agent-cert"), "{}", sshd_log(&sshd));
}

// ---------------------------------------------------------------------------------------------
// Host certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_certificates_are_verified_against_cert_authority_lines() {
    let sshd = OpenSshd::start().await.unwrap();
    let ca = sshd.generate_ca("hosts").await.unwrap();
    let kh = sshd.known_hosts_path();
    let plain_line = sshd.known_hosts_line();
    sshd.use_host_certificate(&ca, &["127.0.0.1"], "-5m:+1h").await.unwrap();
    let ca_line = sshd.cert_authority_line(&ca, "127.0.0.1").unwrap();
    let id = sshd.client_key_path();

    // Only the CA is known (under the port-less name): the certificate must carry it.
    std::fs::write(&kh, format!("{ca_line}\n")).unwrap();
    tunnel_verdict(cfg(&sshd))
        .await
        .expect("a host certificate from a trusted CA");
    assert!(ssh_verdict(&sshd, &id, &[]).await.0, "ssh agrees");

    // A wildcard CA line and a HostKeyAlias principal.
    sshd.use_host_certificate(&ca, &["db-bastion"], "-5m:+1h")
        .await
        .unwrap();
    std::fs::write(&kh, format!("{}\n", sshd.cert_authority_line(&ca, "db-*").unwrap())).unwrap();
    tunnel_verdict(cfg(&sshd).host_key_alias("db-bastion"))
        .await
        .expect("principal = HostKeyAlias");
    assert!(ssh_verdict(&sshd, &id, &["-o", "HostKeyAlias=db-bastion"]).await.0);

    // Wrong principal.
    std::fs::write(&kh, format!("{ca_line}\n")).unwrap();
    match tunnel_verdict(cfg(&sshd)).await {
        Err(e @ Error::HostCertificate { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("not issued for \"127.0.0.1\"") && text.contains("db-bastion"),
                "{text}"
            );
            assert!(!e.is_transient());
        }
        other => panic!("wrong principal: {other:?}"),
    }
    assert!(!ssh_verdict(&sshd, &id, &[]).await.0, "ssh refuses too");
    // ...but a plain known_hosts entry for its key still accepts it, as in OpenSSH.
    std::fs::write(&kh, format!("{ca_line}\n{plain_line}\n")).unwrap();
    tunnel_verdict(cfg(&sshd)).await.expect("plain key fallback");
    assert!(ssh_verdict(&sshd, &id, &[]).await.0);

    // Expired.
    sshd.use_host_certificate(&ca, &["127.0.0.1"], "-2h:-1h").await.unwrap();
    std::fs::write(&kh, format!("{ca_line}\n")).unwrap();
    match tunnel_verdict(cfg(&sshd)).await {
        Err(e @ Error::HostCertificate { .. }) => {
            assert!(e.to_string().contains("expired: valid from"), "{e}");
            assert!(!e.is_transient());
        }
        other => panic!("expired host certificate: {other:?}"),
    }
    assert!(!ssh_verdict(&sshd, &id, &[]).await.0);

    // Revoked CA.
    sshd.use_host_certificate(&ca, &["127.0.0.1"], "-5m:+1h").await.unwrap();
    let ca_key = ca_line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
    std::fs::write(&kh, format!("{ca_line}\n@revoked * {ca_key}\n")).unwrap();
    match tunnel_verdict(cfg(&sshd)).await {
        Err(e @ Error::HostCertificate { .. }) => {
            assert!(e.to_string().contains("@revoked"), "{e}");
            assert!(!e.is_transient());
        }
        other => panic!("revoked CA: {other:?}"),
    }
    assert!(!ssh_verdict(&sshd, &id, &[]).await.0);

    // A CA that is not the signer: no trusted CA, so the plain key decides (unknown here).
    let stranger_ca = sshd.generate_ca("stranger").await.unwrap();
    std::fs::write(
        &kh,
        format!("{}\n", sshd.cert_authority_line(&stranger_ca, "127.0.0.1").unwrap()),
    )
    .unwrap();
    assert!(matches!(
        tunnel_verdict(cfg(&sshd)).await,
        Err(Error::HostKeyUnknown { .. })
    ));
    assert!(!ssh_verdict(&sshd, &id, &[]).await.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_known_hosts_keeps_working_against_a_server_that_offers_a_certificate() {
    let sshd = OpenSshd::start().await.unwrap();
    let ca = sshd.generate_ca("hosts").await.unwrap();
    sshd.use_host_certificate(&ca, &["127.0.0.1"], "-2h:-1h").await.unwrap();
    // known_hosts has the plain key only (and a CA line for another host): no certificate is
    // asked for, so even an expired one on the server does not matter.
    let other_ca = sshd.cert_authority_line(&ca, "elsewhere.example").unwrap();
    std::fs::write(
        sshd.known_hosts_path(),
        format!("{other_ca}\n{}\n", sshd.known_hosts_line()),
    )
    .unwrap();
    tunnel_verdict(cfg(&sshd)).await.expect("plain key verified");
    let (ok, stderr) = ssh_verdict(&sshd, &sshd.client_key_path(), &[]).await;
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_certificates_of_every_key_type_log_in() {
    let (sshd, ca) = cert_only_sshd().await;
    for kind in [KeyKind::Ed25519, KeyKind::Ecdsa, KeyKind::Rsa] {
        let key = sshd.generate_key(kind, None).await.unwrap();
        let id = format!("every-type-{kind:?}");
        sshd.sign_user_key(&ca, &key, &id, "-5m:+1h").await.unwrap();
        tunnel_verdict(cfg(&sshd).auth(AuthConfig::key_file(&key)))
            .await
            .unwrap_or_else(|e| panic!("{kind:?} certificate: {e}"));
        assert!(sshd_log(&sshd).contains(&format!("ID {id}")), "{kind:?}");
    }
}
