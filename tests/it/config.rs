//! Configuration: profiles, every environment variable, every bad value, redaction,
//! contradictions, `.env.local` / `.env` precedence, backoff schedules.
//!
//! Nothing here touches the process environment or the current directory: variables come from
//! a map (`from_env_with`), files from a temp dir (`from_env_in_with`), so tests run in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{
    AuthConfig, BackoffPolicy, Config, ENV_VARS, HostKeyPolicy, JumpHost, LocalEndpointConfig, PoolConfig, Profile,
    SessionSettings, TunnelConfig, redact_url,
};
use secrecy::ExposeSecret;

const PASSWORD: &str = "pw-Zq9xSecret";
const PASSPHRASE: &str = "pp-Kx7 Secret";
const FINGERPRINT: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

/// A private home with a key file and an "agent socket" path, so defaults are exercised
/// without the real `~/.ssh`.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".ssh")).unwrap();
        Home { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn with_default_key(self) -> Self {
        std::fs::write(self.path().join(".ssh/id_ed25519"), "not parsed by config").unwrap();
        self
    }
    fn key(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, "not parsed by config").unwrap();
        p
    }
    /// `validate` only checks that the agent socket path exists.
    fn agent_socket(&self) -> PathBuf {
        let p = self.path().join("agent.sock");
        std::fs::write(&p, "").unwrap();
        p
    }
}

fn url() -> String {
    format!("postgres://app:{PASSWORD}@db.internal:6543/appdb")
}

type Vars = HashMap<String, String>;

fn vars(pairs: &[(&str, &str)]) -> Vars {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load(v: &Vars) -> sea_orm_tunnel::Result<Config> {
    Config::from_env_with(|name| v.get(name).cloned())
}

/// A valid tunnel environment in `home`, with a default key present.
fn tunnel_vars(home: &Home) -> Vars {
    vars(&[
        ("DATABASE_URL", &url()),
        ("HOME", home.path().to_str().unwrap()),
        ("SSH_HOST", "bastion.example.com"),
        ("SSH_USER", "deploy"),
    ])
}

fn config_error(result: sea_orm_tunnel::Result<impl std::fmt::Debug>) -> (String, String) {
    match result {
        Err(Error::Config { field, message }) => (field, message),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn profiles_carry_the_spec_numbers() {
    let ms = Duration::from_millis;
    // (profile, max, idle, connect, health, channels, sessions, retries, retry delay)
    let expected = [
        (Profile::Development, 20, 30_000, 2_000, 60_000, 10, 4, 3, 1_000),
        (Profile::Production, 100, 30_000, 3_000, 30_000, 20, 5, 5, 2_000),
    ];
    let home = Home::new().with_default_key();
    for (profile, max, idle, connect, health, channels, sessions, retries, delay) in expected {
        let mut v = tunnel_vars(&home);
        v.insert("APP_ENV".into(), profile.as_str().into());
        let from_env = load(&v).unwrap();
        let key = home.path().join(".ssh/id_ed25519");
        let in_code = Config::for_profile(profile, url())
            .tunnel(TunnelConfig::for_profile(profile, "b", "u").auth(AuthConfig::key_file(&key)));
        for c in [&from_env, &in_code] {
            assert_eq!(c.profile, profile);
            assert_eq!(c.pool.max_connections, max, "{profile}");
            assert_eq!(c.pool.idle_timeout, ms(idle), "{profile}");
            assert_eq!(c.pool.connect_timeout, ms(connect), "{profile}");
            assert_eq!(c.pool.acquire_timeout, ms(connect), "{profile}");
            assert_eq!(c.health.interval, ms(health), "{profile}");
            let t = c.tunnel.as_ref().unwrap();
            assert_eq!(t.max_channels, channels, "{profile}");
            assert_eq!(t.max_sessions, sessions, "{profile}");
            assert_eq!(t.reconnect.max_retries, retries, "{profile}");
            assert_eq!(t.reconnect.initial_delay, ms(delay), "{profile}");
            assert_eq!(t.connect_timeout, ms(connect), "{profile}");
            // The same for both profiles.
            assert_eq!(c.pool.min_connections, 0);
            assert_eq!(c.pool.max_lifetime, Duration::from_secs(30 * 60));
            assert_eq!(c.pool.test_if_idle_for, Duration::from_secs(10));
            assert_eq!(c.pool.application_name, "sea-orm-tunnel");
            assert!(c.pool.connection_ids);
            assert_eq!(c.pool.pool_label, "default");
            assert_eq!(c.pool.leak_detection_threshold, None);
            assert_eq!(c.shutdown_drain_timeout, ms(5_000));
            assert!(!c.log_to_db);
            assert_eq!(c.session.statement_timeout, None);
            assert_eq!(t.port, 22);
            assert_eq!(t.keepalive_interval, ms(5_000));
            assert_eq!(t.keepalive_max, 3);
            assert_eq!(t.host_key_policy, HostKeyPolicy::Strict);
            assert_eq!(t.local, LocalEndpointConfig::Tcp(0));
            // The spec's numbers pass our own validation (production needs its 5 sessions).
            c.validate().unwrap();
        }
        assert_eq!(profile.defaults().max_connections, max);
    }
    assert_eq!(Config::new(url()).profile, Profile::Development);
    assert_eq!(PoolConfig::default().max_connections, 20);
}

#[test]
fn every_variable_is_parsed() {
    let home = Home::new();
    let key = home.key("deploy_key");
    let socket = home.agent_socket();
    let v = vars(&[
        ("APP_ENV", "Production"),
        ("DATABASE_URL", &url()),
        ("POSTGRES_MAX_CONNECTIONS", "30"),
        ("POSTGRES_MIN_CONNECTIONS", "3"),
        ("POSTGRES_IDLE_TIMEOUT", "45000"),
        ("POSTGRES_CONNECTION_TIMEOUT", "2500"),
        ("POSTGRES_MAX_LIFETIME", "600000"),
        ("POSTGRES_HEALTH_CHECK_INTERVAL", "15000"),
        ("POSTGRES_STATEMENT_TIMEOUT", "7000"),
        ("POSTGRES_APPLICATION_NAME", "billing"),
        ("POSTGRES_CONNECTION_IDS", "off"),
        ("POSTGRES_LEAK_DETECTION_THRESHOLD", "20000"),
        ("CONNECTION_LOG_TO_DB", "YES"),
        ("SHUTDOWN_DRAIN_TIMEOUT", "8000"),
        ("SSH_HOST", "bastion.example.com"),
        ("SSH_PORT", "2222"),
        ("SSH_USER", "deploy"),
        ("SSH_KEY_PATH", "~/deploy_key"),
        ("SSH_KEY_PASSPHRASE", PASSPHRASE),
        ("SSH_USE_AGENT", "0"),
        ("SSH_KNOWN_HOSTS", "~/kh"),
        ("SSH_HOST_KEY_POLICY", FINGERPRINT),
        ("SSH_REMOTE_HOST", "10.0.0.5"),
        ("SSH_REMOTE_PORT", "5433"),
        ("SSH_LOCAL_PORT", "unix"),
        ("SSH_MAX_CHANNELS", "8"),
        ("SSH_MAX_SESSIONS", "6"),
        ("SSH_MAX_RETRIES", "0"),
        ("SSH_RETRY_DELAY", "750"),
        ("SSH_KEEPALIVE_INTERVAL", "1500"),
        ("SSH_KEEPALIVE_MAX", "2"),
        ("POSTGRES_PGBOUNCER", "false"),
        ("PGTARGETSESSIONATTRS", "Read-Write"),
        ("SSH_CHANNEL_WINDOW", "16777216"),
        ("SSH_SPARE_CHANNEL", "20000"),
        ("SSH_PROXY_JUMP", "ops@jump.example.com:2200,jump2.example.com"),
        ("SSH_CERTIFICATE_PATH", "~/deploy_key-cert.pub"),
        ("SSH_CONFIG", "none"),
        ("HOME", home.path().to_str().unwrap()),
        ("SSH_AUTH_SOCK", socket.to_str().unwrap()),
    ]);
    // The test covers every variable `from_env` reads (`ENV_VARS`, the README's configuration
    // table); DATABASE_PASSWORD_FILE excludes a password in
    // DATABASE_URL, so `password::the_password_file_comes_from_the_environment` covers it.
    for name in ENV_VARS.iter().filter(|n| **n != "DATABASE_PASSWORD_FILE") {
        assert!(v.contains_key(*name), "{name} is not exercised");
    }
    let c = load(&v).unwrap();
    let ms = Duration::from_millis;
    assert_eq!(c.profile, Profile::Production);
    assert_eq!(c.database_url.expose_secret(), url());
    assert_eq!(c.pool.max_connections, 30);
    assert_eq!(c.pool.min_connections, 3);
    assert_eq!(c.pool.idle_timeout, ms(45_000));
    assert_eq!(c.pool.connect_timeout, ms(2_500));
    assert_eq!(c.pool.acquire_timeout, ms(2_500));
    assert_eq!(c.pool.max_lifetime, ms(600_000));
    assert_eq!(c.health.interval, ms(15_000));
    assert_eq!(c.session.statement_timeout, Some(ms(7_000)));
    assert_eq!(c.pool.application_name, "billing");
    assert!(!c.pool.connection_ids);
    assert_eq!(c.pool.leak_detection_threshold, Some(ms(20_000)));
    assert!(c.log_to_db);
    assert!(
        !c.pgbouncer && !c.pgbouncer_mode(),
        "POSTGRES_PGBOUNCER (true excludes POSTGRES_STATEMENT_TIMEOUT)"
    );
    assert_eq!(c.shutdown_drain_timeout, ms(8_000));
    assert_eq!(
        c.target_session_attrs,
        sea_orm_tunnel::config::TargetSessionAttrs::ReadWrite
    );
    let t = c.tunnel.as_ref().expect("SSH_HOST set");
    assert_eq!(t.host, "bastion.example.com");
    assert_eq!(t.port, 2222);
    assert_eq!(t.user, "deploy");
    assert_eq!(t.auth.key_path.as_deref(), Some(key.as_path()));
    assert_eq!(
        t.auth.passphrase.as_ref().unwrap().expose_secret(),
        PASSPHRASE,
        "passphrase is not trimmed"
    );
    assert!(!t.auth.use_agent, "SSH_USE_AGENT=0 wins over an existing socket");
    assert_eq!(t.known_hosts, home.path().join("kh"));
    assert_eq!(t.host_key_policy, HostKeyPolicy::Fingerprint(FINGERPRINT.into()));
    assert_eq!((t.remote_host.as_str(), t.remote_port), ("10.0.0.5", 5433));
    assert_eq!(t.local, LocalEndpointConfig::Unix);
    assert_eq!(t.max_channels, 8);
    assert_eq!(t.max_sessions, 6);
    assert_eq!(t.reconnect.max_retries, 0);
    assert_eq!(t.reconnect.initial_delay, ms(750));
    assert_eq!(t.keepalive_interval, ms(1_500));
    assert_eq!(t.keepalive_max, 2);
    assert_eq!(t.channel_window, 16 * 1024 * 1024);
    assert_eq!(t.spare_channel, Some(ms(20_000)));
    assert_eq!(t.connect_timeout, ms(2_500), "the tunnel waits as long as the pool");
    assert_eq!(
        t.proxy_jump,
        vec![
            JumpHost::new("jump.example.com").user("ops").port(2200),
            JumpHost::new("jump2.example.com")
        ]
    );
    assert_eq!(
        t.auth.certificate_path.as_deref(),
        Some(home.path().join("deploy_key-cert.pub").as_path())
    );
}

#[test]
fn defaults_and_spellings_of_the_ssh_variables() {
    let home = Home::new().with_default_key();
    let socket = home.agent_socket();
    let mut v = tunnel_vars(&home);
    v.insert("SSH_AUTH_SOCK".into(), socket.to_str().unwrap().into());
    let c = load(&v).unwrap();
    let t = c.tunnel.unwrap();
    // Remote side from DATABASE_URL, key and known_hosts under HOME, agent on because the socket exists.
    assert_eq!((t.remote_host.as_str(), t.remote_port), ("db.internal", 6543));
    assert_eq!(t.auth.key_path, Some(home.path().join(".ssh/id_ed25519")));
    assert_eq!(t.known_hosts, home.path().join(".ssh/known_hosts"));
    assert!(t.auth.use_agent);
    assert!(t.auth.passphrase.is_none());

    for (policy, expected) in [
        ("strict", HostKeyPolicy::Strict),
        ("Accept-New", HostKeyPolicy::AcceptNew),
        ("insecure-accept-any", HostKeyPolicy::InsecureAcceptAny),
        (
            &format!("{FINGERPRINT}="),
            HostKeyPolicy::Fingerprint(FINGERPRINT.into()),
        ),
    ] {
        let mut v = tunnel_vars(&home);
        v.insert("SSH_HOST_KEY_POLICY".into(), policy.into());
        assert_eq!(load(&v).unwrap().tunnel.unwrap().host_key_policy, expected, "{policy}");
    }
    for (spelling, expected) in [
        ("true", true),
        ("1", true),
        ("On", true),
        ("FALSE", false),
        ("no", false),
    ] {
        let mut v = tunnel_vars(&home);
        v.insert("CONNECTION_LOG_TO_DB".into(), spelling.into());
        assert_eq!(load(&v).unwrap().log_to_db, expected, "{spelling}");
    }
    let mut v = tunnel_vars(&home);
    v.insert("SSH_LOCAL_PORT".into(), "15432".into());
    v.insert("POSTGRES_STATEMENT_TIMEOUT".into(), "0".into());
    v.insert("POSTGRES_LEAK_DETECTION_THRESHOLD".into(), "0".into());
    let c = load(&v).unwrap();
    assert_eq!(c.tunnel.unwrap().local, LocalEndpointConfig::Tcp(15432));
    assert_eq!(c.session.statement_timeout, None, "0 = no statement timeout");
    assert_eq!(c.pool.leak_detection_threshold, None, "0 = leak detection off");

    // No SSH_HOST (or an empty one): direct connection; SSH_* leftovers are not read.
    let v = vars(&[("DATABASE_URL", &url()), ("SSH_HOST", ""), ("SSH_PORT", "bad")]);
    assert!(load(&v).unwrap().tunnel.is_none());

    // A remote host without port and without DATABASE_URL (tunnel-only reader): PostgreSQL's port.
    let mut v = tunnel_vars(&home);
    v.remove("DATABASE_URL");
    v.insert("SSH_REMOTE_HOST".into(), "pg.internal".into());
    let t = TunnelConfig::from_env_with(|n| v.get(n).cloned()).unwrap();
    assert_eq!(t.remote_target(), "pg.internal:5432");
}

#[test]
fn each_bad_value_names_its_variable() {
    let home = Home::new().with_default_key();
    let cases: &[(&str, &str, &str)] = &[
        ("APP_ENV", "staging", "\"staging\" is not a profile"),
        ("POSTGRES_MAX_CONNECTIONS", "abc", "\"abc\" is not a whole number"),
        ("POSTGRES_MAX_CONNECTIONS", "-5", "\"-5\" is not a whole number"),
        ("POSTGRES_MAX_CONNECTIONS", "4294967296", "\"4294967296\" is too large"),
        ("POSTGRES_MIN_CONNECTIONS", "2.5", "\"2.5\" is not a whole number"),
        (
            "POSTGRES_IDLE_TIMEOUT",
            "30s",
            "\"30s\" is not a whole number of milliseconds",
        ),
        (
            "POSTGRES_CONNECTION_TIMEOUT",
            "fast",
            "\"fast\" is not a whole number of milliseconds",
        ),
        (
            "POSTGRES_MAX_LIFETIME",
            "1h",
            "\"1h\" is not a whole number of milliseconds",
        ),
        (
            "POSTGRES_HEALTH_CHECK_INTERVAL",
            "x",
            "\"x\" is not a whole number of milliseconds",
        ),
        (
            "POSTGRES_STATEMENT_TIMEOUT",
            "5 s",
            "\"5 s\" is not a whole number of milliseconds",
        ),
        ("POSTGRES_APPLICATION_NAME", "caf\u{e9}", "must be printable ASCII"),
        (
            "POSTGRES_LEAK_DETECTION_THRESHOLD",
            "off",
            "\"off\" is not a whole number of milliseconds",
        ),
        ("CONNECTION_LOG_TO_DB", "maybe", "\"maybe\" is not a boolean"),
        (
            "SHUTDOWN_DRAIN_TIMEOUT",
            "-1",
            "\"-1\" is not a whole number of milliseconds",
        ),
        ("SSH_PORT", "70000", "\"70000\" is not a port number"),
        ("SSH_PORT", "0", "\"0\" is not a port number"),
        ("SSH_USE_AGENT", "sometimes", "\"sometimes\" is not a boolean"),
        (
            "SSH_HOST_KEY_POLICY",
            "trust-me",
            "\"trust-me\" is not a host key fingerprint",
        ),
        (
            "SSH_HOST_KEY_POLICY",
            "SHA256:abc",
            "\"SHA256:abc\" is not a host key fingerprint",
        ),
        ("SSH_REMOTE_PORT", "pg", "\"pg\" is not a port number"),
        (
            "SSH_LOCAL_PORT",
            "socket",
            "\"socket\" is not a port number (0-65535, 0 = ephemeral) or `unix`",
        ),
        ("SSH_MAX_CHANNELS", "ten", "\"ten\" is not a whole number"),
        ("SSH_MAX_SESSIONS", "0x4", "\"0x4\" is not a whole number"),
        ("SSH_MAX_RETRIES", "forever", "\"forever\" is not a whole number"),
        (
            "SSH_RETRY_DELAY",
            "1e3",
            "\"1e3\" is not a whole number of milliseconds",
        ),
        (
            "SSH_KEEPALIVE_INTERVAL",
            "5000ms",
            "\"5000ms\" is not a whole number of milliseconds",
        ),
        ("SSH_KEEPALIVE_MAX", "three", "\"three\" is not a whole number"),
    ];
    for (var, bad, expected) in cases {
        let mut v = tunnel_vars(&home);
        v.insert(var.to_string(), bad.to_string());
        let (field, message) = config_error(load(&v));
        assert_eq!(&field, var, "{var}={bad}: {message}");
        assert!(message.contains(expected), "{var}={bad}: {message}");
        let shown = Error::config(field, message).to_string();
        assert!(shown.starts_with(&format!("invalid configuration: {var}: ")), "{shown}");
    }

    // The brief's example, verbatim.
    let mut v = tunnel_vars(&home);
    v.insert("POSTGRES_MAX_CONNECTIONS".into(), "abc".into());
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "invalid configuration: POSTGRES_MAX_CONNECTIONS: \"abc\" is not a whole number"
    );

    // Missing required values.
    let (field, _) = config_error(load(&vars(&[])));
    assert_eq!(field, "DATABASE_URL");
    let mut v = tunnel_vars(&home);
    v.remove("SSH_USER");
    let (field, message) = config_error(load(&v));
    assert_eq!(field, "SSH_USER");
    assert!(message.contains("required when SSH_HOST is set"), "{message}");
    let v = vars(&[("DATABASE_URL", &url())]);
    let (field, _) = config_error(TunnelConfig::from_env_with(|n| v.get(n).cloned()));
    assert_eq!(field, "SSH_HOST");
}

#[test]
fn secrets_are_never_shown() {
    let home = Home::new();
    let key = home.key("k");
    let tunnel = TunnelConfig::new("bastion", "deploy")
        .auth(AuthConfig::key_file(&key).passphrase(PASSPHRASE))
        .remote("db", 5432);
    let config = Config::new(url()).tunnel(tunnel.clone());
    let with_query = Config::new(format!("postgres://db/app?user=app&password={PASSWORD}"));

    let shown = [
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{tunnel:?}"),
        format!("{:?}", tunnel.auth),
        format!("{with_query:?}"),
        config.redacted_database_url(),
        with_query.redacted_database_url(),
    ];
    for s in &shown {
        assert!(!s.contains(PASSWORD) && !s.contains("pw-Zq9x"), "password shown: {s}");
        assert!(
            !s.contains(PASSPHRASE) && !s.contains("pp-Kx7"),
            "passphrase shown: {s}"
        );
    }
    assert!(
        shown[0].contains("postgres://app:***@db.internal:6543/appdb"),
        "{}",
        shown[0]
    );
    assert!(shown[3].contains("passphrase: Some(***)"), "{}", shown[3]);
    assert_eq!(redact_url(&url()), "postgres://app:***@db.internal:6543/appdb");

    // Errors about a URL never contain its password, however the URL is broken.
    let bad_urls = [
        format!("postgres://app:{PASSWORD}@db:notaport/app"),
        format!("postgres://app:{PASSWORD}"),
        format!("postgres://app:{PASSWORD}@/app?sslmode=sometimes"),
        format!("mysql://app:{PASSWORD}@db/app"),
        format!("app:{PASSWORD}@db/app"),
        format!("postgres://app:{PASSWORD}@db/app?host=/run/postgresql"),
    ];
    let keyed_home = Home::new().with_default_key();
    for bad in &bad_urls {
        let mut v = vars(&[("DATABASE_URL", bad)]);
        if bad.contains("host=/") {
            // Valid URL, but a Unix socket cannot be reached through a tunnel.
            v.extend(
                tunnel_vars(&keyed_home)
                    .into_iter()
                    .filter(|(k, _)| k != "DATABASE_URL"),
            );
        }
        let err = load(&v).expect_err(bad);
        let text = format!("{err} {err:?}");
        assert!(!text.contains("pw-Zq9x"), "password in error: {text}");
        assert!(
            text.contains("DATABASE_URL") || text.contains("SSH_REMOTE_HOST"),
            "{text}"
        );
        let code = Config::new(bad.as_str());
        let code = if bad.contains("host=/") {
            code.tunnel(TunnelConfig::new("b", "u").auth(AuthConfig::agent()))
        } else {
            code
        };
        let err = code.validate().expect_err(bad);
        let text = format!("{err} {err:?}");
        assert!(!text.contains("pw-Zq9x"), "password in error: {text}");
        // The Debug of a config holding the broken URL hides it too.
        let debug = format!("{:?}", Config::new(bad.as_str()));
        assert!(!debug.contains("pw-Zq9x"), "password in Debug: {debug}");
    }

    // A malformed .env line may hold a secret: the error gives the line number, not the line.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!("A=1\nSSH_KEY_PASSPHRASE '{PASSPHRASE}\n"),
    )
    .unwrap();
    let err = Config::from_env_in_with(dir.path(), |_| None).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::File { .. }), "{text}");
    assert!(text.contains("line 2"), "{text}");
    assert!(!text.contains("pp-Kx7"), "passphrase in error: {text}");
}

#[test]
fn contradictions_are_rejected() {
    let home = Home::new();
    let key = home.key("k");
    let tunnel = || TunnelConfig::new("bastion", "deploy").auth(AuthConfig::key_file(&key));
    let base = || Config::new(url()).tunnel(tunnel());
    base().validate().unwrap();

    let cases: Vec<(Config, &str, &str)> = vec![
        (
            base().map_pool(|p| p.max_connections(0)),
            "pool.max_connections",
            "at least 1",
        ),
        (
            Config::new(url()).tunnel(tunnel().alternate_fallthrough(true)),
            "tunnel.alternate_fallthrough",
            "the manager chooses among the servers itself",
        ),
        (
            base().map_pool(|p| p.min_connections(21)),
            "pool.min_connections",
            "21 is more than pool.max_connections (20)",
        ),
        (
            base().map_pool(|p| p.idle_timeout(Duration::ZERO)),
            "pool.idle_timeout",
            "greater than zero",
        ),
        (
            base().map_pool(|p| p.connect_timeout(Duration::ZERO)),
            "pool.connect_timeout",
            "greater than zero",
        ),
        (
            base().map_pool(|p| p.acquire_timeout(Duration::ZERO)),
            "pool.acquire_timeout",
            "greater than zero",
        ),
        (
            base().map_pool(|p| p.max_lifetime(Duration::ZERO)),
            "pool.max_lifetime",
            "greater than zero",
        ),
        (
            base().map_pool(|p| p.application_name("")),
            "pool.application_name",
            "empty",
        ),
        (
            base().map_pool(|p| p.application_name("x".repeat(41))),
            "pool.application_name",
            "at most 40",
        ),
        (
            base().map_pool(|p| p.pool_label("")),
            "pool.pool_label",
            "non-empty printable ASCII without spaces",
        ),
        (
            base().map_pool(|p| p.pool_label("read replica")),
            "pool.pool_label",
            "\"read replica\" must be non-empty printable ASCII without spaces",
        ),
        (
            base().map_pool(|p| p.pool_label("tab\tbed")),
            "pool.pool_label",
            "without spaces",
        ),
        (
            base().map_pool(|p| p.pool_label("réplica")),
            "pool.pool_label",
            "printable ASCII",
        ),
        (
            base().map_health(|h| h.interval(Duration::ZERO)),
            "health.interval",
            "greater than zero",
        ),
        (
            base().map_health(|h| h.timeout(Duration::ZERO)),
            "health.timeout",
            "greater than zero",
        ),
        (base().map_recovery(|b| b.factor(0.5)), "recovery.factor", ">= 1.0"),
        (base().map_recovery(|b| b.factor(f64::NAN)), "recovery.factor", ">= 1.0"),
        (
            base().map_recovery(|b| b.jitter(1.5)),
            "recovery.jitter",
            "outside 0.0..=1.0",
        ),
        (
            base().map_recovery(|b| b.jitter(-0.1)),
            "recovery.jitter",
            "outside 0.0..=1.0",
        ),
        (
            base().map_recovery(|b| b.initial_delay(Duration::ZERO)),
            "recovery.initial_delay",
            "busy loop",
        ),
        (
            base().map_recovery(|b| b.max_delay(Duration::from_millis(10))),
            "recovery.max_delay",
            "less than initial_delay",
        ),
        (
            base().map_recovery(|b| b.max_elapsed(Duration::ZERO)),
            "recovery.max_elapsed",
            "greater than zero",
        ),
        (
            base().map_session(|s| s.statement_timeout(Duration::ZERO)),
            "session.statement_timeout",
            "greater than zero",
        ),
        (
            base().map_session(|s| s.idle_in_transaction_session_timeout(Duration::from_secs(3_000_000))),
            "session.idle_in_transaction_session_timeout",
            "more than PostgreSQL accepts",
        ),
        (base().map_session(|s| s.role("")), "session.role", "not a role name"),
        (
            base().map_tunnel(|t| t.keepalive_interval(Duration::ZERO)),
            "tunnel.keepalive_interval",
            "greater than zero",
        ),
        (
            base().map_tunnel(|t| t.keepalive_max(0)),
            "tunnel.keepalive_max",
            "at least 1",
        ),
        (
            base().map_tunnel(|t| t.max_channels(0)),
            "tunnel.max_channels",
            "at least 1",
        ),
        (
            base().map_tunnel(|t| t.max_sessions(0)),
            "tunnel.max_sessions",
            "at least 1",
        ),
        (base().map_tunnel(|t| t.port(0)), "tunnel.port", "not a port"),
        (base().map_tunnel(|t| t.user("")), "tunnel.user", "required"),
        (
            base().map_tunnel(|t| t.connect_timeout(Duration::ZERO)),
            "tunnel.connect_timeout",
            "greater than zero",
        ),
        (
            base().map_tunnel(|t| t.map_reconnect(|r| r.jitter(2.0))),
            "tunnel.reconnect.jitter",
            "outside",
        ),
        (
            base().map_tunnel(|t| t.host_key_policy(HostKeyPolicy::Fingerprint("SHA256:short".into()))),
            "tunnel.host_key_policy",
            "43 base64",
        ),
        (
            base().map_tunnel(|t| t.auth(AuthConfig::key_file(&key).without_key())),
            "tunnel.auth",
            "no SSH authentication",
        ),
        (
            base().map_pool(|p| p.max_connections(41)),
            "pool.max_connections",
            "41 connections do not fit through the tunnel: SSH_MAX_CHANNELS (tunnel.max_channels) 10 × \
             SSH_MAX_SESSIONS (tunnel.max_sessions) 4 = 40",
        ),
        (
            // The production pool through a development-sized tunnel.
            Config::for_profile(Profile::Production, url()).tunnel(tunnel()),
            "pool.max_connections",
            "100 connections do not fit",
        ),
        (
            Config::new("postgres://app@db/app?host=/run/postgresql").tunnel(tunnel()),
            "tunnel.remote_host",
            "Unix socket",
        ),
    ];
    for (config, field, expected) in cases {
        let (f, message) = config_error(config.validate());
        assert_eq!(f, field, "{message}");
        assert!(message.contains(expected), "{field}: {message}");
    }

    // The same contradictions from the environment name the variables.
    let home = Home::new().with_default_key();
    for (var, value, expected) in [
        ("POSTGRES_MAX_CONNECTIONS", "0", "at least 1"),
        (
            "POSTGRES_MIN_CONNECTIONS",
            "50",
            "50 is more than POSTGRES_MAX_CONNECTIONS (20)",
        ),
        ("POSTGRES_IDLE_TIMEOUT", "0", "greater than zero"),
        ("POSTGRES_CONNECTION_TIMEOUT", "0", "greater than zero"),
        ("POSTGRES_HEALTH_CHECK_INTERVAL", "0", "greater than zero"),
        ("SSH_KEEPALIVE_INTERVAL", "0", "greater than zero"),
        ("SSH_KEEPALIVE_MAX", "0", "at least 1"),
        ("SSH_MAX_SESSIONS", "0", "at least 1"),
        ("SSH_RETRY_DELAY", "0", "busy loop"),
        ("SSH_MAX_CHANNELS", "4", "20 connections do not fit through the tunnel"),
    ] {
        let mut v = tunnel_vars(&home);
        v.insert(var.into(), value.into());
        let (field, message) = config_error(load(&v));
        let field_ok = field == var || (var == "SSH_MAX_CHANNELS" && field == "POSTGRES_MAX_CONNECTIONS");
        assert!(field_ok, "{var}={value}: {field}: {message}");
        assert!(message.contains(expected), "{var}={value}: {message}");
    }
    // A first retry delay above the default 30 s cap raises the cap instead of contradicting it.
    let mut v = tunnel_vars(&home);
    v.insert("SSH_RETRY_DELAY".into(), "60000".into());
    assert_eq!(
        load(&v).unwrap().tunnel.unwrap().reconnect.max_delay,
        Duration::from_secs(60)
    );

    // A tunnel on its own needs its remote side.
    let (field, message) = config_error(tunnel().validate());
    assert_eq!(field, "tunnel.remote_host");
    assert!(message.contains("TunnelConfig::remote"), "{message}");
    let (field, _) = config_error(tunnel().remote("db", 0).validate());
    assert_eq!(field, "tunnel.remote_port");
    tunnel().remote("db", 5432).validate().unwrap();
}

#[test]
fn missing_key_file_is_an_error_naming_the_path() {
    let home = Home::new();
    let missing = home.path().join("nope/id_rsa");

    // In code.
    let config = Config::new(url()).tunnel(TunnelConfig::new("b", "u").auth(AuthConfig::key_file(&missing)));
    match config.validate() {
        Err(Error::File {
            what, path, message, ..
        }) => {
            assert_eq!(what, "SSH private key");
            assert_eq!(path, missing);
            assert!(message.contains("does not exist"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A directory is not a key.
    let dir_as_key = Config::new(url()).tunnel(TunnelConfig::new("b", "u").auth(AuthConfig::key_file(home.path())));
    let err = dir_as_key.validate().unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");

    // From the environment, explicit path.
    let mut v = tunnel_vars(&home);
    v.insert("SSH_KEY_PATH".into(), missing.to_str().unwrap().into());
    let err = load(&v).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::File { ref path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        text.contains(missing.to_str().unwrap()) && text.contains("SSH_KEY_PATH"),
        "{text}"
    );

    // Default ~/.ssh/id_ed25519 absent and no agent: the default path is named.
    let v = tunnel_vars(&home);
    match load(&v) {
        Err(Error::File { path, message, .. }) => {
            assert_eq!(path, home.path().join(".ssh/id_ed25519"));
            assert!(
                message.contains("SSH_KEY_PATH") && message.contains("SSH_AUTH_SOCK"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // ... but with an agent the missing default key is simply skipped.
    let mut v = tunnel_vars(&home);
    v.insert("SSH_AUTH_SOCK".into(), home.agent_socket().to_str().unwrap().into());
    let auth = load(&v).unwrap().tunnel.unwrap().auth;
    assert!(auth.use_agent && auth.key_path.is_none(), "{auth:?}");
    // Asking for the agent when there is none is an error, not a silent fallback.
    let mut v = tunnel_vars(&Home::new().with_default_key());
    v.insert("SSH_USE_AGENT".into(), "true".into());
    let (field, message) = config_error(load(&v));
    assert_eq!(field, "SSH_USE_AGENT");
    assert!(message.contains("SSH_AUTH_SOCK is not set"), "{message}");
}

#[test]
fn dotenv_files_layer_with_precedence() {
    let home = Home::new().with_default_key();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "# shared defaults\nDATABASE_URL={}\nPOSTGRES_MAX_CONNECTIONS=7\nPOSTGRES_MIN_CONNECTIONS=1\n\
             POSTGRES_APPLICATION_NAME=from-env-file\nSSH_HOST=bastion\nSSH_USER=deploy\nHOME={}\n",
            url(),
            home.path().display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".env.local"),
        "\u{feff}POSTGRES_MAX_CONNECTIONS=8\nPOSTGRES_APPLICATION_NAME=\"from local\"\nPOSTGRES_APPLICATION_NAME=second-ignored\n",
    )
    .unwrap();

    let process = vars(&[("POSTGRES_APPLICATION_NAME", "from-process")]);
    let c = Config::from_env_in_with(dir.path(), |n| process.get(n).cloned()).unwrap();
    assert_eq!(c.pool.application_name, "from-process", "process env beats both files");
    assert_eq!(c.pool.max_connections, 8, ".env.local beats .env");
    assert_eq!(c.pool.min_connections, 1, ".env fills the rest");
    assert_eq!(c.tunnel.as_ref().unwrap().host, "bastion");

    let c = Config::from_env_in_with(dir.path(), |_| None).unwrap();
    assert_eq!(
        c.pool.application_name, "from local",
        "quoted value, first definition wins"
    );

    // An empty value in the process environment counts as unset (falls through to the files),
    // and `SSH_HOST=` in .env.local disables the tunnel from .env.
    std::fs::write(dir.path().join(".env.local"), "SSH_HOST=\n").unwrap();
    let process = vars(&[("POSTGRES_MAX_CONNECTIONS", "")]);
    let c = Config::from_env_in_with(dir.path(), |n| process.get(n).cloned()).unwrap();
    assert_eq!(c.pool.max_connections, 7);
    assert!(c.tunnel.is_none());

    // The tunnel-only reader sees the same layers.
    std::fs::remove_file(dir.path().join(".env.local")).unwrap();
    let t = TunnelConfig::from_env_in_with(dir.path(), |_| None).unwrap();
    assert_eq!(
        (t.host.as_str(), t.remote_host.as_str(), t.remote_port),
        ("bastion", "db.internal", 6543)
    );

    // No files at all is fine; the process lookup alone decides.
    let empty = tempfile::tempdir().unwrap();
    let only = vars(&[("DATABASE_URL", &url())]);
    assert!(Config::from_env_in_with(empty.path(), |n| only.get(n).cloned()).is_ok());
    let (field, _) = config_error(Config::from_env_in_with(empty.path(), |_| None));
    assert_eq!(field, "DATABASE_URL");
}

#[test]
fn builders_fill_the_tunnel_from_the_database_url() {
    let home = Home::new();
    let key = home.key("k");
    let c = Config::new(url()).tunnel(TunnelConfig::new("bastion", "deploy").auth(AuthConfig::key_file(&key)));
    let t = c.tunnel.as_ref().unwrap();
    assert_eq!(t.remote_target(), "db.internal:6543");
    c.validate().unwrap();

    // An explicit remote side wins; a half-set one is completed.
    let c = Config::new(url()).tunnel(TunnelConfig::new("b", "u").remote("10.1.1.1", 5433));
    assert_eq!(c.tunnel.as_ref().unwrap().remote_target(), "10.1.1.1:5433");
    let c = Config::new(url()).tunnel(TunnelConfig::new("b", "u").remote("10.1.1.1", 0));
    assert_eq!(c.tunnel.as_ref().unwrap().remote_target(), "10.1.1.1:6543");
    let c = Config::new("postgres://u:p@[fd00::5]:5439/db").tunnel(TunnelConfig::new("b", "u"));
    assert_eq!(c.tunnel.as_ref().unwrap().remote_target(), "[fd00::5]:5439");

    let c = Config::new(url())
        .log_to_db(true)
        .shutdown_drain_timeout(Duration::from_secs(1))
        .session(
            SessionSettings::new()
                .role("reader")
                .read_only(true)
                .statement_timeout(Duration::from_secs(3)),
        )
        .recovery(BackoffPolicy::new(Duration::from_millis(10)).max_retries(2))
        .tunnel(
            TunnelConfig::new("b", "u")
                .local(LocalEndpointConfig::Unix)
                .known_hosts("~/kh"),
        )
        .without_tunnel();
    assert!(c.log_to_db && c.tunnel.is_none());
    assert_eq!(c.session.role.as_deref(), Some("reader"));
    assert!(c.session.read_only);
    assert_eq!(c.recovery.max_retries, 2);
    let opts = c.database_options().unwrap();
    assert_eq!(
        (opts.get_host(), opts.get_port(), opts.get_database()),
        ("db.internal", 6543, Some("appdb"))
    );
    assert_eq!(c.database_target().unwrap(), Some(("db.internal".into(), 6543)));

    // `connect_timeout` sets both; `acquire_timeout` afterwards makes them differ.
    let p = PoolConfig::for_profile(Profile::Production)
        .connect_timeout(Duration::from_secs(4))
        .acquire_timeout(Duration::from_secs(9));
    assert_eq!(
        (p.connect_timeout, p.acquire_timeout),
        (Duration::from_secs(4), Duration::from_secs(9))
    );
}

#[test]
fn backoff_schedules() {
    let ms = Duration::from_millis;
    let plain = BackoffPolicy::new(ms(100))
        .jitter(0.0)
        .max_delay(ms(500))
        .max_retries(5);
    plain.validate().unwrap();
    assert_eq!(
        plain.delays().collect::<Vec<_>>(),
        [ms(100), ms(200), ms(400), ms(500), ms(500)]
    );

    // 0 retries = unlimited.
    let forever = plain.clone().max_retries(0);
    assert_eq!(forever.delays().take(1000).count(), 1000);
    assert!(forever.delays().take(1000).all(|d| d <= ms(500)));

    // max_elapsed bounds the sum of the delays: 100 + 200 + 400 = 700 <= 750 < 1200.
    let bounded = forever.clone().max_elapsed(ms(750));
    assert_eq!(bounded.delays().collect::<Vec<_>>(), [ms(100), ms(200), ms(400)]);

    // Jitter adds up to the fraction on top of each (capped) delay, and the bound still holds.
    let jittered = BackoffPolicy::new(ms(100))
        .jitter(0.5)
        .max_delay(ms(400))
        .max_retries(200);
    let base = [100u64, 200, 400];
    let mut saw_jitter = false;
    for (i, d) in jittered.delays_seeded(7).enumerate() {
        let b = ms(base[i.min(2)]);
        assert!(d >= b && d < b.mul_f64(1.5), "delay {i}: {d:?}");
        saw_jitter |= d != b;
    }
    assert!(saw_jitter);
    assert_eq!(jittered.delays().count(), 200);
    let a: Vec<_> = jittered.delays_seeded(1).collect();
    assert_eq!(
        a,
        jittered.delays_seeded(1).collect::<Vec<_>>(),
        "seeded schedules repeat"
    );
    for seed in 0..50 {
        let total: Duration = jittered.clone().max_elapsed(ms(1_000)).delays_seeded(seed).sum();
        assert!(total <= ms(1_000), "{total:?}");
    }

    // The presets are valid and documented.
    for p in [
        BackoffPolicy::retry(),
        BackoffPolicy::health_recheck(),
        BackoffPolicy::reconnect(Profile::Development),
        BackoffPolicy::reconnect(Profile::Production),
        BackoffPolicy::default(),
    ] {
        p.validate().unwrap();
    }
    assert_eq!(BackoffPolicy::reconnect(Profile::Production).delays().count(), 5);
    assert_eq!(BackoffPolicy::retry().delays().count(), 3);

    // An invalid policy is reported by validate() and does not panic when used anyway.
    let bad = BackoffPolicy::new(ms(1))
        .factor(f64::INFINITY)
        .jitter(f64::NAN)
        .max_retries(3);
    assert!(bad.validate().is_err());
    assert_eq!(bad.delays().count(), 3);
}

#[test]
fn is_set_sees_the_process_environment_without_returning_values() {
    use sea_orm_tunnel::config::is_set;
    // PATH is set for every test process; this name is not.
    assert!(is_set("PATH").unwrap());
    assert!(!is_set("SEA_ORM_TUNNEL_SURELY_UNSET_VARIABLE").unwrap());
}

#[test]
fn a_huge_bad_value_is_quoted_only_in_part() {
    let huge = "x".repeat(50_000);
    let err = Config::from_env_with(|name| match name {
        "DATABASE_URL" => Some("postgres://u@h/db".to_owned()),
        "POSTGRES_MAX_CONNECTIONS" => Some(huge.clone()),
        _ => None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("POSTGRES_MAX_CONNECTIONS"), "{err}");
    assert!(err.contains("50000 bytes"), "{err}");
    assert!(err.len() < 300, "{} bytes: {}", err.len(), &err[..300]);
}

#[test]
fn pool_label_is_one_validated_pool_setting() {
    assert_eq!(PoolConfig::default().pool_label, "default");
    assert_eq!(PoolConfig::for_profile(Profile::Production).pool_label, "default");
    let c = Config::new(url()).map_pool(|p| p.pool_label("replica-1"));
    assert_eq!(c.pool.pool_label, "replica-1");
    c.validate().unwrap();
    for label in ["primary", "billing_db", "eu.west:2/a"] {
        let c = Config::new(url()).map_pool(|p| p.pool_label(label));
        c.validate().unwrap_or_else(|e| panic!("{label}: {e}"));
    }
}

#[test]
fn ssh_spare_channel_is_off_by_default_and_checked() {
    let home = Home::new().with_default_key();
    let v = tunnel_vars(&home);
    assert_eq!(load(&v).unwrap().tunnel.unwrap().spare_channel, None);
    let mut v = tunnel_vars(&home);
    v.insert("SSH_SPARE_CHANNEL".into(), "0".into());
    assert_eq!(load(&v).unwrap().tunnel.unwrap().spare_channel, None, "0 = no spare");
    for bad in ["600001", "soon", "-5"] {
        let mut v = tunnel_vars(&home);
        v.insert("SSH_SPARE_CHANNEL".into(), bad.into());
        let (field, message) = config_error(load(&v));
        assert_eq!(field, "SSH_SPARE_CHANNEL", "{bad}: {message}");
    }
}

#[test]
fn ssh_channel_window_out_of_range_is_refused_naming_it() {
    let home = Home::new().with_default_key();
    for bad in ["1024", "4294967295"] {
        let mut v = tunnel_vars(&home);
        v.insert("SSH_CHANNEL_WINDOW".into(), bad.into());
        let (field, message) = config_error(load(&v));
        assert_eq!(field, "SSH_CHANNEL_WINDOW", "{message}");
        assert!(message.contains("64 KiB") && message.contains("1 GiB"), "{message}");
    }
}
