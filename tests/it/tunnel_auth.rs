//! Authentication and host-key verification of the SSH tunnel against real OpenSSH sshd.

use std::time::Duration;

use super::support::*;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, HostKeyPolicy, TunnelConfig};
use sea_orm_tunnel::testkit::{KeyKind, OpenSshd};
use sea_orm_tunnel::tunnel::{SshTunnel, TunnelEvent, TunnelState};

/// A tunnel config to an echo-less target: these tests only need the SSH session.
fn cfg(sshd: &OpenSshd) -> TunnelConfig {
    sshd.tunnel_config("127.0.0.1", 9)
        .connect_timeout(Duration::from_secs(10))
        // Retrying would hide a permanent error behind a delay: make any retry visible.
        .reconnect(BackoffPolicy::new(Duration::from_secs(5)).jitter(0.0).max_retries(3))
}

async fn connect(config: TunnelConfig) -> Result<SshTunnel, Error> {
    tokio::time::timeout(Duration::from_secs(4), SshTunnel::connect(config))
        .await
        .expect("connect returns promptly: permanent errors are not retried")
}

fn sshd_log(sshd: &OpenSshd) -> String {
    std::fs::read_to_string(sshd.log_path()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_ecdsa_and_rsa_keys_authenticate() {
    let sshd = OpenSshd::start().await.unwrap();
    for kind in [KeyKind::Ed25519, KeyKind::Ecdsa, KeyKind::Rsa] {
        let key = sshd.generate_key(kind, None).await.unwrap();
        sshd.authorize_key(&key).unwrap();
        // RSA: OpenSSH 9 refuses SHA-1 `ssh-rsa` signatures, so success means rsa-sha2-256/512.
        let tunnel = connect(cfg(&sshd).auth(AuthConfig::key_file(&key)))
            .await
            .unwrap_or_else(|e| panic!("{kind:?} key: {e}"));
        assert!(tunnel.is_connected(), "{kind:?}");
        tunnel.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorised_key_fails_at_once_saying_what_was_tried() {
    let sshd = OpenSshd::start().await.unwrap();
    let key = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let err = connect(cfg(&sshd).auth(AuthConfig::key_file(&key))).await.unwrap_err();
    match &err {
        Error::Auth { user, tried, .. } => {
            assert_eq!(user, sshd.user());
            assert!(tried.contains(&key.display().to_string()), "{tried}");
            assert!(tried.contains("refused"), "{tried}");
        }
        other => panic!("expected Error::Auth, got {other:?}"),
    }
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_keys_need_the_right_passphrase() {
    let sshd = OpenSshd::start().await.unwrap();
    let secret = "correct horse battery staple";
    let key = sshd.generate_key(KeyKind::Ed25519, Some(secret)).await.unwrap();
    sshd.authorize_key(&key).unwrap();

    let tunnel = connect(cfg(&sshd).auth(AuthConfig::key_file(&key).passphrase(secret)))
        .await
        .expect("right passphrase");
    assert!(tunnel.is_connected());
    tunnel.disconnect().await;

    let wrong = "not the passphrase";
    let err = connect(cfg(&sshd).auth(AuthConfig::key_file(&key).passphrase(wrong)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::KeyPassphrase { path, problem } if path == &key && problem.contains("wrong")),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(wrong) && !shown.contains(secret),
        "passphrases never shown: {shown}"
    );

    let err = connect(cfg(&sshd).auth(AuthConfig::key_file(&key))).await.unwrap_err();
    assert!(
        matches!(&err, Error::KeyPassphrase { problem, .. } if problem.contains("no passphrase")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_file_is_a_file_error_naming_the_path() {
    let sshd = OpenSshd::start().await.unwrap();
    let missing = sshd.dir().join("no_such_key");
    let err = connect(cfg(&sshd).auth(AuthConfig::key_file(&missing)))
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::File { path, .. } if path == &missing), "{err:?}");
    assert!(err.to_string().contains(&missing.display().to_string()));
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_ssh_agent_authenticates_after_a_refused_key_file() {
    let sshd = OpenSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());

    // Agent without keys: refused, and the error lists both methods in order.
    let stranger = sshd.generate_key(KeyKind::Ed25519, None).await.unwrap();
    let err = connect(cfg(&sshd).auth(AuthConfig::key_file(&stranger).agent_socket(&agent.socket)))
        .await
        .unwrap_err();
    match &err {
        Error::Auth { tried, .. } => {
            let file_at = tried.find(&stranger.display().to_string()).expect("key file listed");
            let agent_at = tried.find("ssh-agent").expect("agent listed");
            assert!(file_at < agent_at, "key file first, then agent: {tried}");
            assert!(tried.contains("no keys"), "{tried}");
        }
        other => panic!("expected Error::Auth, got {other:?}"),
    }

    // The agent holds an authorised (RSA, to exercise the agent's SHA-2 signing) key.
    let key = sshd.generate_key(KeyKind::Rsa, None).await.unwrap();
    sshd.authorize_key(&key).unwrap();
    agent.add(&key);
    let tunnel = connect(cfg(&sshd).auth(AuthConfig::key_file(&stranger).agent_socket(&agent.socket)))
        .await
        .expect("the agent's key is accepted after the key file was refused");
    assert!(tunnel.is_connected());
    tunnel.disconnect().await;

    // Agent only.
    let tunnel = connect(cfg(&sshd).auth(AuthConfig::agent().agent_socket(&agent.socket)))
        .await
        .expect("agent only");
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_accepts_a_known_host_and_rejects_an_unknown_one() {
    let sshd = OpenSshd::start().await.unwrap();
    let tunnel = connect(cfg(&sshd)).await.expect("known host");
    tunnel.disconnect().await;

    let dir = tempfile::tempdir().unwrap();
    for known_hosts in [dir.path().join("missing"), {
        let p = dir.path().join("other");
        // Another host's entry only.
        std::fs::write(&p, format!("[127.0.0.1]:1 {}\n", sshd.host_public_key())).unwrap();
        p
    }] {
        let err = connect(cfg(&sshd).known_hosts(&known_hosts)).await.unwrap_err();
        match &err {
            Error::HostKeyUnknown { host, fingerprint, .. } => {
                assert_eq!(host, &format!("[127.0.0.1]:{}", sshd.port()));
                assert_eq!(fingerprint, &sshd.host_key_fingerprint());
            }
            other => panic!("expected HostKeyUnknown, got {other:?}"),
        }
        assert!(!err.is_transient());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_new_learns_an_unknown_host_then_strict_trusts_it() {
    let sshd = OpenSshd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("ssh").join("known_hosts");
    let tunnel = connect(
        cfg(&sshd)
            .known_hosts(&known_hosts)
            .host_key_policy(HostKeyPolicy::AcceptNew),
    )
    .await
    .expect("accept-new learns the host");
    tunnel.disconnect().await;
    let written = std::fs::read_to_string(&known_hosts).expect("entry written");
    assert!(
        written.contains(&format!("[127.0.0.1]:{} {}", sshd.port(), sshd.host_public_key())),
        "{written}"
    );
    let tunnel = connect(cfg(&sshd).known_hosts(&known_hosts))
        .await
        .expect("strict trusts it now");
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_fingerprint_must_match() {
    let sshd = OpenSshd::start().await.unwrap();
    let tunnel = connect(cfg(&sshd).host_key_policy(HostKeyPolicy::Fingerprint(sshd.host_key_fingerprint())))
        .await
        .expect("right fingerprint");
    tunnel.disconnect().await;
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let err = connect(cfg(&sshd).host_key_policy(HostKeyPolicy::Fingerprint(wrong.into())))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::HostKeyChanged { expected, actual, .. } if expected.contains(wrong) && actual == &sshd.host_key_fingerprint()),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_rejected_under_every_policy_before_any_credential_is_sent() {
    let sshd = OpenSshd::start().await.unwrap();
    let old = sshd.host_key_fingerprint();
    sshd.rotate_host_key().await.unwrap();
    let new = sshd.host_key_fingerprint();
    assert_ne!(old, new);
    let log_before = sshd_log(&sshd).len();

    for policy in [
        HostKeyPolicy::Strict,
        HostKeyPolicy::AcceptNew,
        HostKeyPolicy::Fingerprint(old.clone()),
    ] {
        let err = connect(cfg(&sshd).host_key_policy(policy.clone())).await.unwrap_err();
        match &err {
            Error::HostKeyChanged {
                host, expected, actual, ..
            } => {
                assert_eq!(host, &format!("[127.0.0.1]:{}", sshd.port()), "{policy:?}");
                assert!(expected.contains(&old), "{policy:?}: {expected}");
                assert_eq!(actual, &new, "{policy:?}");
            }
            other => panic!("{policy:?}: expected HostKeyChanged, got {other:?}"),
        }
        assert!(!err.is_transient());
        let msg = err.to_string();
        assert!(
            msg.contains(&old) && msg.contains(&new),
            "both fingerprints named: {msg}"
        );
    }
    // accept-new must not have overwritten the recorded key.
    assert!(
        !std::fs::read_to_string(sshd.known_hosts_path())
            .unwrap()
            .contains(&sshd.host_public_key())
    );
    // sshd never saw an authentication request from those connections.
    let log = sshd_log(&sshd);
    let after = &log[log_before.min(log.len())..];
    assert!(
        !after.contains("publickey") && !after.contains("Accepted") && !after.contains("userauth"),
        "credentials were sent after a host-key rejection:\n{after}"
    );

    // Only the explicitly insecure option connects.
    let tunnel = connect(cfg(&sshd).host_key_policy(HostKeyPolicy::InsecureAcceptAny))
        .await
        .expect("insecure-accept-any connects");
    tunnel.disconnect().await;
    // ... and that one did authenticate, which sshd logs (so the check above can see it).
    assert!(sshd_log(&sshd)[log_before..].contains("Accepted publickey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_change_during_reconnect_fails_at_once_without_retrying() {
    let sshd = OpenSshd::start().await.unwrap();
    let tunnel = connect(
        cfg(&sshd).reconnect(
            BackoffPolicy::new(Duration::from_millis(100))
                .jitter(0.0)
                .max_retries(0),
        ),
    )
    .await
    .unwrap();
    let mut events = tunnel.subscribe();
    sshd.rotate_host_key().await.unwrap();
    let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Failed { .. })).await;
    let TunnelEvent::Failed { error } = ev else {
        unreachable!()
    };
    assert!(matches!(*error, Error::HostKeyChanged { .. }), "{error}");
    assert!(matches!(*tunnel.state().borrow(), TunnelState::Failed { .. }));
    // No second attempt follows a permanent error.
    let more = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if let Ok(TunnelEvent::Reconnecting { attempt, .. }) = events.recv().await {
                return attempt;
            }
        }
    })
    .await;
    assert!(more.is_err(), "retried after a permanent error: attempt {more:?}");
    assert!(matches!(
        tunnel.ensure_connected().await,
        Err(Error::HostKeyChanged { .. })
    ));
    tunnel.disconnect().await;
}
