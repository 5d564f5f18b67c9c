//! ProxyJump chains against real OpenSSH: a jump host on 127.0.0.1 that may only forward to the
//! bastion on 127.0.0.2 (`PermitOpen`), and the bastion that reaches PostgreSQL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::support::*;
use std::collections::HashMap;

use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, Config, HostKeyPolicy, JumpHost, TunnelConfig};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::diagnose::{Outcome, StepKind, diagnose};
use sea_orm_tunnel::tunnel::{SshTunnel, TunnelEvent};

/// PostgreSQL, a bastion on 127.0.0.2 and a jump host on 127.0.0.1 that forwards only to it.
struct Chain {
    pg: TempPostgres,
    jump: OpenSshd,
    bastion: OpenSshd,
    /// Both hosts' known_hosts lines.
    known_hosts: PathBuf,
}

impl Chain {
    async fn start() -> Chain {
        let (pg, bastion) = tokio::join!(
            TempPostgres::start(),
            OpenSshd::builder().address("127.0.0.2".parse().unwrap()).start()
        );
        let (pg, bastion) = (
            pg.expect("PostgreSQL starts"),
            bastion.expect("sshd on 127.0.0.2 starts"),
        );
        let jump = OpenSshd::builder()
            .config_line(format!("PermitOpen {}:{}", bastion.host(), bastion.port()))
            // debug1 logs each direct-tcpip request: "server_request_direct_tcpip: ... target HOST port N".
            .config_line("LogLevel DEBUG1")
            .start()
            .await
            .expect("the jump sshd starts");
        // One client key for both hops, one known_hosts for both hosts.
        bastion.authorize_key(&jump.client_key_path()).unwrap();
        let known_hosts = jump.dir().join("chain_known_hosts");
        std::fs::write(
            &known_hosts,
            format!("{}\n{}\n", jump.known_hosts_line(), bastion.known_hosts_line()),
        )
        .unwrap();
        Chain {
            pg,
            jump,
            bastion,
            known_hosts,
        }
    }

    fn hop(&self) -> JumpHost {
        JumpHost::new(self.jump.host()).port(self.jump.port())
    }

    /// The tunnel to PostgreSQL through jump host → bastion.
    fn config(&self) -> TunnelConfig {
        self.bastion
            .tunnel_config("127.0.0.1", self.pg.port())
            .auth(AuthConfig::key_file(self.jump.client_key_path()))
            .known_hosts(&self.known_hosts)
            .proxy_jump([self.hop()])
            .connect_timeout(Duration::from_secs(10))
            .reconnect(
                BackoffPolicy::new(Duration::from_millis(100))
                    .max_delay(Duration::from_millis(500))
                    .jitter(0.0)
                    .max_retries(0),
            )
    }

    /// The whole configuration from environment variables (`SSH_PROXY_JUMP` included), as
    /// `check` reads it.
    fn env_config(&self, known_hosts: &std::path::Path, user: &str, jump: &str) -> Config {
        let vars: HashMap<&str, String> = [
            ("DATABASE_URL", self.pg.url()),
            ("SSH_CONFIG", "none".to_owned()),
            ("SSH_HOST", self.bastion.host().to_owned()),
            ("SSH_PORT", self.bastion.port().to_string()),
            ("SSH_USER", user.to_owned()),
            ("SSH_KEY_PATH", self.jump.client_key_path().display().to_string()),
            ("SSH_USE_AGENT", "false".to_owned()),
            ("SSH_KNOWN_HOSTS", known_hosts.display().to_string()),
            ("SSH_REMOTE_HOST", "127.0.0.1".to_owned()),
            ("SSH_PROXY_JUMP", jump.to_owned()),
        ]
        .into_iter()
        .collect();
        Config::from_env_with(|name| vars.get(name).cloned()).expect("valid configuration")
    }

    /// The jump host's log lines about forwarding to the bastion.
    fn forwarded_to_bastion(&self) -> usize {
        let log = std::fs::read_to_string(self.jump.log_path()).unwrap_or_default();
        let needle = format!("target {} port {}", self.bastion.host(), self.bastion.port());
        log.lines()
            .filter(|l| l.contains("server_request_direct_tcpip") && l.contains(&needle))
            .count()
    }
}

/// The median time of 50 sequential `SELECT 1`s (for the printed comparison only).
async fn median_select(db: &sea_orm::DatabaseConnection) -> Duration {
    let mut times = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        select(db, 1).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hop_chain_reaches_postgres_through_the_jump_host_and_errors_name_the_hop() {
    let c = Chain::start().await;

    // Direct to the bastion first, for the time comparison (and the bastion works on its own).
    let direct_config = c
        .bastion
        .tunnel_config("127.0.0.1", c.pg.port())
        .auth(AuthConfig::key_file(c.jump.client_key_path()))
        .known_hosts(&c.known_hosts);
    let t = Instant::now();
    let direct = SshTunnel::connect(direct_config).await.expect("direct connect");
    let direct_time = t.elapsed();
    let direct_db = pool(&url_via(&direct, &c.pg), 1).await;
    let direct_rtt = median_select(&direct_db).await;
    direct_db.close().await.unwrap();
    direct.disconnect().await;
    assert_eq!(c.forwarded_to_bastion(), 0, "nothing went through the jump host yet");

    let t = Instant::now();
    let tunnel = SshTunnel::connect(c.config()).await.expect("the chain connects");
    let chain_time = t.elapsed();
    eprintln!("connect: direct {direct_time:?}, through one jump host {chain_time:?}");
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &c.pg), 2).await;
    assert_eq!(select(&db, 7).await.unwrap(), 7);
    let chain_rtt = median_select(&db).await;
    eprintln!("sequential SELECT median: direct {direct_rtt:?}, through one jump host {chain_rtt:?}");
    // The jump host's log proves the bastion's connection was forwarded through it.
    let log = std::fs::read_to_string(c.jump.log_path()).unwrap();
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("direct_tcpip"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        c.forwarded_to_bastion() >= 1,
        "the jump host logs a forward to {}: {log}",
        c.bastion.addr()
    );
    db.close().await.unwrap();
    tunnel.disconnect().await;
    let closed = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Closed)).await;
    assert!(matches!(closed, TunnelEvent::Closed));

    // A wrong key recorded for the bastion: the error names hop 2, the bastion, and is permanent.
    let wrong = c.jump.dir().join("wrong_known_hosts");
    let jump_key = c.jump.host_public_key();
    std::fs::write(
        &wrong,
        format!(
            "{}\n[{}]:{} {jump_key}\n",
            c.jump.known_hosts_line(),
            c.bastion.host(),
            c.bastion.port()
        ),
    )
    .unwrap();
    let err = SshTunnel::connect(c.config().known_hosts(&wrong)).await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{err:?}");
    assert!(matches!(err.cause(), Error::HostKeyChanged { .. }), "{err:?}");
    assert!(matches!(err, Error::Hop { hop: 2, hops: 2, .. }), "{err:?}");
    assert!(text.contains("hop 2 of 2 (bastion "), "{text}");
    assert!(text.contains(&format!("127.0.0.2:{}", c.bastion.port())), "{text}");

    // HostKeyAlias names the bastion's entry (without a port); the jump host keeps its own.
    let aliased = c.jump.dir().join("alias_known_hosts");
    std::fs::write(
        &aliased,
        format!(
            "{}\nbastion-alias {}\n",
            c.jump.known_hosts_line(),
            c.bastion.host_public_key()
        ),
    )
    .unwrap();
    let tunnel = SshTunnel::connect(c.config().known_hosts(&aliased).host_key_alias("bastion-alias"))
        .await
        .expect("the alias's entry verifies the bastion");
    tunnel.disconnect().await;
    let err = SshTunnel::connect(c.config().known_hosts(&aliased)).await.unwrap_err();
    assert!(
        matches!(err.cause(), Error::HostKeyUnknown { .. }),
        "without the alias: {err:?}"
    );

    // A pinned fingerprint is the bastion's; the jump host is then checked strictly.
    let jump_only = c.jump.dir().join("jump_only_known_hosts");
    std::fs::write(&jump_only, format!("{}\n", c.jump.known_hosts_line())).unwrap();
    let pinned = HostKeyPolicy::fingerprint(&c.bastion.host_key_fingerprint()).unwrap();
    let tunnel = SshTunnel::connect(c.config().known_hosts(&jump_only).host_key_policy(pinned.clone()))
        .await
        .expect("pinned bastion, known jump host");
    tunnel.disconnect().await;
    let nothing = c.jump.dir().join("no_known_hosts");
    std::fs::write(&nothing, "").unwrap();
    let err = SshTunnel::connect(c.config().known_hosts(&nothing).host_key_policy(pinned))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Hop { hop: 1, .. }),
        "the jump host is not pinned: {err:?}"
    );
    assert!(matches!(err.cause(), Error::HostKeyUnknown { .. }), "{err:?}");
    // insecure-accept-any applies to every hop.
    let tunnel = SshTunnel::connect(
        c.config()
            .known_hosts(&nothing)
            .host_key_policy(HostKeyPolicy::InsecureAcceptAny),
    )
    .await
    .expect("insecure-accept-any accepts both hops");
    tunnel.disconnect().await;

    // The jump host unknown: hop 1 is named, and nothing reached the bastion.
    let only_bastion = c.jump.dir().join("bastion_only_known_hosts");
    std::fs::write(&only_bastion, format!("{}\n", c.bastion.known_hosts_line())).unwrap();
    let before = c.forwarded_to_bastion();
    let err = SshTunnel::connect(c.config().known_hosts(&only_bastion))
        .await
        .unwrap_err();
    assert!(matches!(err.cause(), Error::HostKeyUnknown { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("hop 1 of 2 (jump host "), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", c.jump.port())), "{text}");
    assert_eq!(
        c.forwarded_to_bastion(),
        before,
        "no channel is opened before hop 1 is trusted"
    );

    // Authentication refused on hop 2 (a user the bastion does not allow; hop 1 keeps its own).
    let err = SshTunnel::connect(
        c.config()
            .user("no-such-user-here")
            .proxy_jump([c.hop().user(c.jump.user())]),
    )
    .await
    .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(matches!(err.cause(), Error::Auth { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("hop 2 of 2 (bastion no-such-user-here@127.0.0.2"),
        "{text}"
    );

    // ... and refused on hop 1.
    let err = SshTunnel::connect(c.config().proxy_jump([c.hop().user("no-such-user-here")]))
        .await
        .unwrap_err();
    assert!(matches!(err.cause(), Error::Auth { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("hop 1 of 2 (jump host no-such-user-here@127.0.0.1"),
        "{err}"
    );

    // A jump host that may not forward to the bastion (PermitOpen): named, permanent.
    let err = SshTunnel::connect(c.config().host("127.0.0.3").known_hosts(&c.known_hosts))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("hop 2 of 2") && text.contains("administratively prohibited"),
        "{text}"
    );

    // `check` (the same diagnosis as data), configured through SSH_PROXY_JUMP.
    let jump = format!("{}:{}", c.jump.host(), c.jump.port());
    let d = diagnose(&c.env_config(&c.known_hosts, c.bastion.user(), &jump))
        .await
        .unwrap();
    for step in d.steps() {
        eprintln!("{:<15} {:?} {}", step.kind.name(), step.outcome, step.detail);
        assert_eq!(step.outcome, Outcome::Ok, "{step:?}");
    }
    let tcp = d.step(StepKind::TcpReach).unwrap();
    assert!(
        tcp.detail.contains(&format!("127.0.0.1:{}", c.jump.port())) && tcp.detail.contains("jump host 1 of 2"),
        "{tcp:?}"
    );
    let key = d.step(StepKind::HostKey).unwrap();
    assert!(key.detail.contains("on 2 hops: jump host"), "{key:?}");

    // A wrong key for hop 2: step 3 fails, naming hop 2.
    let d = diagnose(&c.env_config(&wrong, c.bastion.user(), &jump)).await.unwrap();
    let failed = d.failure().expect("a failed step");
    assert_eq!(failed.kind, StepKind::HostKey, "{failed:?}");
    assert_eq!(d.exit_code(), 13);
    assert!(failed.detail.contains("hop 2 of 2 (bastion "), "{failed:?}");

    // Authentication refused on hop 2 (the jump host keeps its own user): step 4, naming hop 2.
    let jump_with_user = format!("{}@{jump}", c.jump.user());
    let d = diagnose(&c.env_config(&c.known_hosts, "no-such-user-here", &jump_with_user))
        .await
        .unwrap();
    let failed = d.failure().expect("a failed step");
    assert_eq!(failed.kind, StepKind::Authentication, "{failed:?}");
    assert!(
        failed.detail.contains("hop 2 of 2 (bastion no-such-user-here@"),
        "{failed:?}"
    );
    let key = d.step(StepKind::HostKey).unwrap();
    assert!(key.detail.contains("hops 1 to 1 of 2 were verified"), "{key:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_reconnects_when_the_jump_host_or_the_bastion_drops_its_sessions() {
    let c = Chain::start().await;
    let tunnel = SshTunnel::connect(
        c.config()
            .keepalive_interval(Duration::from_millis(500))
            .keepalive_max(2),
    )
    .await
    .expect("the chain connects");
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &c.pg), 2).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);

    for (round, who) in [(1, &c.jump), (2, &c.bastion)] {
        let forwarded = c.forwarded_to_bastion();
        assert!(who.drop_sessions() > 0);
        let lost = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
        eprintln!("round {round}: {lost:?}");
        let back = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Connected { .. })).await;
        assert!(
            matches!(back, TunnelEvent::Connected { reconnect: true, .. }),
            "{back:?}"
        );
        // The new session rode the jump host again.
        assert!(
            c.forwarded_to_bastion() > forwarded,
            "round {round}: reconnected through the jump host"
        );
        eventually("queries work again", || async { select(&db, 2).await.ok() == Some(2) }).await;
    }
    assert_eq!(tunnel.stats().reconnects, 2);

    // A silent jump host (its sessions frozen): keepalive notices through the chain.
    let t = Instant::now();
    assert!(c.jump.pause_sessions() > 0);
    let lost = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
    eprintln!("silent jump host noticed after {:?}: {lost:?}", t.elapsed());
    c.jump.resume_sessions();
    wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Connected { .. })).await;
    eventually("queries work after the silent hop", || async {
        select(&db, 3).await.ok() == Some(3)
    })
    .await;
    db.close().await.unwrap();
    tunnel.disconnect().await;
}
