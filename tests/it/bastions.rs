//! Several bastions (`SSH_HOST=a,b:2222`): sshd A on 127.0.0.1 (preferred) and sshd B on
//! 127.0.0.2, both reaching the same PostgreSQL. Failover when A is down or its sessions die,
//! back to A later, and a permanent error on one bastion that does not stop the other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::support::*;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, BastionHost, Config, TunnelConfig};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::{SshTunnel, TunnelEvent};

struct Two {
    pg: TempPostgres,
    a: OpenSshd,
    b: OpenSshd,
    known_hosts: PathBuf,
}

impl Two {
    async fn start() -> Two {
        let (pg, a, b) = tokio::join!(
            TempPostgres::start(),
            OpenSshd::start(),
            OpenSshd::builder().address("127.0.0.2".parse().unwrap()).start()
        );
        let (pg, a, b) = (pg.unwrap(), a.unwrap(), b.unwrap());
        b.authorize_key(&a.client_key_path()).unwrap();
        let known_hosts = a.dir().join("both_known_hosts");
        std::fs::write(
            &known_hosts,
            format!("{}\n{}\n", a.known_hosts_line(), b.known_hosts_line()),
        )
        .unwrap();
        Two { pg, a, b, known_hosts }
    }

    fn name_a(&self) -> String {
        self.a.addr().to_string()
    }

    fn name_b(&self) -> String {
        self.b.addr().to_string()
    }

    fn config(&self) -> TunnelConfig {
        self.a
            .tunnel_config("127.0.0.1", self.pg.port())
            .auth(AuthConfig::key_file(self.a.client_key_path()))
            .known_hosts(&self.known_hosts)
            .fallback_host(self.b.host(), self.b.port())
            .connect_timeout(Duration::from_secs(10))
            .keepalive_interval(Duration::from_millis(500))
            .keepalive_max(2)
            .reconnect(
                BackoffPolicy::new(Duration::from_millis(100))
                    .max_delay(Duration::from_millis(500))
                    .jitter(0.0)
                    .max_retries(0),
            )
    }

    /// known_hosts recording B's key for A: A fails permanently (host key changed).
    fn a_key_wrong(&self) -> PathBuf {
        let path = self.a.dir().join("a_wrong_known_hosts");
        std::fs::write(
            &path,
            format!(
                "[{}]:{} {}\n{}\n",
                self.a.host(),
                self.a.port(),
                self.b.host_public_key(),
                self.b.known_hosts_line()
            ),
        )
        .unwrap();
        path
    }
}

fn vars_config(vars: &[(&str, String)]) -> Config {
    let mut vars: HashMap<&str, String> = vars.iter().cloned().collect();
    // Never the machine's ssh_config.
    vars.entry("SSH_CONFIG").or_insert_with(|| "none".to_owned());
    Config::from_env_with(|name| vars.get(name).cloned()).expect("valid configuration")
}

#[test]
fn ssh_host_lists_bastions_in_order_and_ssh_port_is_the_default_port() {
    // The key file is only checked for existence when the configuration is read.
    let key = tempfile::NamedTempFile::new().unwrap();
    let key = key.path().display().to_string();
    let config = vars_config(&[
        ("DATABASE_URL", "postgres://u:p@db.internal:5432/app".to_owned()),
        ("SSH_CONFIG", "none".to_owned()),
        ("SSH_HOST", "a.example, b.example:2222,[::1]:23".to_owned()),
        ("SSH_PORT", "2200".to_owned()),
        ("SSH_USER", "deploy".to_owned()),
        ("SSH_KEY_PATH", key.clone()),
        ("SSH_USE_AGENT", "false".to_owned()),
        ("SSH_KNOWN_HOSTS", "/nonexistent/known_hosts".to_owned()),
    ]);
    let tunnel = config.tunnel.expect("a tunnel");
    assert_eq!((tunnel.host.as_str(), tunnel.port), ("a.example", 2200));
    assert_eq!(
        tunnel.fallback_hosts,
        vec![BastionHost::new("b.example", 2222), BastionHost::new("::1", 23)]
    );
    let all: Vec<String> = tunnel.bastions().iter().map(ToString::to_string).collect();
    assert_eq!(all, ["a.example:2200", "b.example:2222", "[::1]:23"]);

    // One bastion, as before; its own port wins over SSH_PORT.
    let one = vars_config(&[
        ("DATABASE_URL", "postgres://u:p@db.internal:5432/app".to_owned()),
        ("SSH_CONFIG", "none".to_owned()),
        ("SSH_HOST", "a.example:2201".to_owned()),
        ("SSH_PORT", "2200".to_owned()),
        ("SSH_USER", "deploy".to_owned()),
        ("SSH_KEY_PATH", key.clone()),
        ("SSH_USE_AGENT", "false".to_owned()),
        ("SSH_KNOWN_HOSTS", "/nonexistent/known_hosts".to_owned()),
    ])
    .tunnel
    .unwrap();
    assert_eq!((one.host.as_str(), one.port), ("a.example", 2201));
    assert!(one.fallback_hosts.is_empty());

    for bad in ["a,,b", "a:0", "deploy@a", ","] {
        let vars: HashMap<&str, String> = [
            ("DATABASE_URL", "postgres://u:p@db.internal:5432/app".to_owned()),
            ("SSH_CONFIG", "none".to_owned()),
            ("SSH_HOST", bad.to_owned()),
            ("SSH_USER", "deploy".to_owned()),
        ]
        .into_iter()
        .collect();
        let err = Config::from_env_with(|name| vars.get(name).cloned()).unwrap_err();
        assert!(err.to_string().contains("SSH_HOST"), "{bad}: {err}");
    }
}

#[test]
fn with_the_first_bastion_down_the_tunnel_connects_through_the_second_and_metrics_say_so() {
    let recorder = TestMetrics::default();
    recorder.run(async {
        let two = Two::start().await;
        two.a.stop().await.unwrap();
        let tunnel = SshTunnel::connect_labeled(two.config(), "orders")
            .await
            .expect("B takes over");
        assert_eq!(tunnel.bastion(), Some(two.name_b()));
        let db = pool(&url_via(&tunnel, &two.pg), 2).await;
        assert_eq!(select(&db, 5).await.unwrap(), 5);
        let b = two.name_b();
        let a = two.name_a();
        assert_eq!(
            recorder.get(&format!("ssh_tunnel_failovers_total{{bastion={b},pool=orders}}")),
            1.0
        );
        assert_eq!(
            recorder.get(&format!("ssh_tunnel_bastion_sessions{{bastion={b},pool=orders}}")),
            1.0
        );
        assert_eq!(
            recorder.get(&format!("ssh_tunnel_bastion_sessions{{bastion={a},pool=orders}}")),
            0.0
        );
        db.close().await.unwrap();
        tunnel.disconnect().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_killed_under_load_move_traffic_to_the_second_bastion_and_back_later() {
    let two = Two::start().await;
    let tunnel = SshTunnel::connect(two.config()).await.unwrap();
    assert_eq!(tunnel.bastion(), Some(two.name_a()), "the first bastion is preferred");
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &two.pg), 4).await;

    // Load: four workers querying in a loop.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (db, ok, failed, stop) = (db.clone(), ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match select(&db, i).await {
                        Ok(v) if v == i => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    eventually("load runs", || async { ok.load(Ordering::Relaxed) > 20 }).await;

    // A's sessions die under load, then A goes away for good.
    assert!(two.a.drop_sessions() > 0);
    two.a.stop().await.unwrap();
    let lost = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
    assert!(
        matches!(&lost, TunnelEvent::Disconnected { bastion, .. } if *bastion == two.name_a()),
        "{lost:?}"
    );
    let back = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Connected { .. })).await;
    assert!(
        matches!(&back, TunnelEvent::Connected { bastion, reconnect: true, .. } if *bastion == two.name_b()),
        "{back:?}"
    );
    let at_failover = ok.load(Ordering::Relaxed);
    eventually("traffic continues through B", || async {
        ok.load(Ordering::Relaxed) > at_failover + 50
    })
    .await;
    assert_eq!(tunnel.bastion(), Some(two.name_b()));
    eprintln!(
        "failover under load: {} ok, {} failed (the queries in flight on A's sessions)",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    // A is back; when B's sessions die the tunnel returns to the preferred A.
    two.a.start_again().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(two.b.drop_sessions() > 0);
    let back = wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Connected { reconnect: true, .. })
    })
    .await;
    assert!(
        matches!(&back, TunnelEvent::Connected { bastion, .. } if *bastion == two.name_a()),
        "{back:?}"
    );
    let at_return = ok.load(Ordering::Relaxed);
    eventually("traffic continues through A again", || async {
        ok.load(Ordering::Relaxed) > at_return + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_on_one_bastion_does_not_stop_failover_and_all_permanent_is_permanent() {
    let two = Two::start().await;

    // A's key is wrong: A is out for good, B serves.
    let tunnel = SshTunnel::connect(two.config().known_hosts(two.a_key_wrong()))
        .await
        .expect("B serves although A's host key is wrong");
    assert_eq!(tunnel.bastion(), Some(two.name_b()));
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &two.pg), 2).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);

    // B goes down: the tunnel keeps trying (A's permanent error does not end it) and names both.
    two.b.stop().await.unwrap();
    let failed = wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Reconnecting { attempt: 2.., .. })
    })
    .await;
    let TunnelEvent::Reconnecting { error, .. } = &failed else {
        unreachable!()
    };
    assert!(error.contains("all 2 bastions failed"), "{error}");
    assert!(
        error.contains("HOST KEY CHANGED") && error.contains(&two.name_b()),
        "{error}"
    );
    let err = tunnel.last_error().expect("an error is recorded");
    assert!(err.is_transient(), "B may come back: {err}");
    two.b.start_again().await.unwrap();
    let back = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Connected { .. })).await;
    assert!(
        matches!(&back, TunnelEvent::Connected { bastion, .. } if *bastion == two.name_b()),
        "{back:?}"
    );
    eventually("queries work through B again", || async {
        select(&db, 2).await.ok() == Some(2)
    })
    .await;
    db.close().await.unwrap();
    tunnel.disconnect().await;

    // Both keys wrong: permanent, at once, naming both bastions.
    let none_known: &Path = &two.a.dir().join("empty_known_hosts");
    std::fs::write(none_known, "").unwrap();
    let err = SshTunnel::connect(two.config().known_hosts(none_known))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(
        matches!(err, Error::AllBastionsFailed { ref errors } if errors.len() == 2),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&format!("[127.0.0.1]:{}", two.a.port())), "{text}");
    assert!(text.contains(&format!("[127.0.0.2]:{}", two.b.port())), "{text}");
}
