//! Hostile input: configuration values, database URLs, fingerprints and known_hosts files made of
//! garbage never panic and always fail with a clear error; a bastion that sends garbage, stalls
//! the handshake or closes channels at random never hangs the tunnel or the pool.
//!
//! The property tests are seeded: each prints its seed, and `HOSTILE_SEED=<seed>` replays it
//! (`HOSTILE_CASES=<n>` runs more cases).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::config::{AuthConfig, BackoffPolicy, Config, ENV_VARS, HostKeyPolicy, TunnelConfig, redact_url};
use sea_orm_tunnel::testkit::{Bastion, Sandbox};
use sea_orm_tunnel::tunnel::SshTunnel;
use sea_orm_tunnel::{ConnectionManager, Error};

// ---------------------------------------------------------------------------------------------
// Environment variables
// ---------------------------------------------------------------------------------------------

/// A complete, valid environment with a tunnel, so every variable is read.
struct Env {
    _dir: tempfile::TempDir,
    vars: HashMap<&'static str, String>,
    db_password: String,
    passphrase: String,
}

impl Env {
    fn new(g: &mut Gen) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = Bastion::generate_client_key(dir.path()).unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, "").unwrap();
        let db_password = format!("DbPw{}", g.token(16));
        let passphrase = format!("KeyPass{}", g.token(16));
        let vars = HashMap::from([
            ("APP_ENV", "development".to_owned()),
            (
                "DATABASE_URL",
                format!("postgres://app:{db_password}@db.internal:5432/app"),
            ),
            ("POSTGRES_MAX_CONNECTIONS", "20".to_owned()),
            ("POSTGRES_MIN_CONNECTIONS", "2".to_owned()),
            ("POSTGRES_IDLE_TIMEOUT", "30000".to_owned()),
            ("POSTGRES_CONNECTION_TIMEOUT", "2000".to_owned()),
            ("POSTGRES_MAX_LIFETIME", "1800000".to_owned()),
            ("POSTGRES_HEALTH_CHECK_INTERVAL", "60000".to_owned()),
            ("POSTGRES_STATEMENT_TIMEOUT", "5000".to_owned()),
            ("POSTGRES_APPLICATION_NAME", "svc".to_owned()),
            ("POSTGRES_CONNECTION_IDS", "true".to_owned()),
            ("POSTGRES_LEAK_DETECTION_THRESHOLD", "10000".to_owned()),
            ("CONNECTION_LOG_TO_DB", "false".to_owned()),
            ("SHUTDOWN_DRAIN_TIMEOUT", "5000".to_owned()),
            ("SSH_HOST", "bastion.example.com".to_owned()),
            ("SSH_PORT", "2222".to_owned()),
            ("SSH_USER", "deploy".to_owned()),
            ("SSH_KEY_PATH", key.display().to_string()),
            ("SSH_KEY_PASSPHRASE", passphrase.clone()),
            ("SSH_USE_AGENT", "false".to_owned()),
            ("SSH_KNOWN_HOSTS", known_hosts.display().to_string()),
            ("SSH_HOST_KEY_POLICY", "strict".to_owned()),
            ("SSH_REMOTE_HOST", "10.0.0.5".to_owned()),
            ("SSH_REMOTE_PORT", "5432".to_owned()),
            ("SSH_LOCAL_PORT", "0".to_owned()),
            ("SSH_MAX_CHANNELS", "10".to_owned()),
            ("SSH_MAX_SESSIONS", "4".to_owned()),
            ("SSH_MAX_RETRIES", "3".to_owned()),
            ("SSH_RETRY_DELAY", "1000".to_owned()),
            ("SSH_KEEPALIVE_INTERVAL", "5000".to_owned()),
            ("SSH_KEEPALIVE_MAX", "3".to_owned()),
            // Never the machine's ssh_config (the fuzzer may still set SSH_CONFIG itself).
            ("SSH_CONFIG", "none".to_owned()),
            ("HOME", dir.path().display().to_string()),
        ]);
        Env {
            _dir: dir,
            vars,
            db_password,
            passphrase,
        }
    }

    /// `Config::from_env_with` over the base environment with `overrides`, catching panics.
    fn read(&self, overrides: &[(&str, &str)]) -> std::thread::Result<sea_orm_tunnel::Result<Config>> {
        let lookup = |name: &str| {
            overrides
                .iter()
                .rev()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
                .or_else(|| self.vars.get(name).cloned())
        };
        catch_unwind(AssertUnwindSafe(|| Config::from_env_with(lookup)))
    }
}

/// What a variable's value must look like for `from_env` to accept it (trimmed; empty = unset).
fn accepts(var: &str, value: &str) -> Option<bool> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    let lower = v.to_ascii_lowercase();
    Some(match var {
        "POSTGRES_MAX_CONNECTIONS" | "POSTGRES_MIN_CONNECTIONS" | "SSH_MAX_RETRIES" => v.parse::<u32>().is_ok(),
        "SSH_MAX_CHANNELS" | "SSH_MAX_SESSIONS" | "SSH_KEEPALIVE_MAX" => v.parse::<usize>().is_ok(),
        "POSTGRES_IDLE_TIMEOUT"
        | "POSTGRES_CONNECTION_TIMEOUT"
        | "POSTGRES_MAX_LIFETIME"
        | "POSTGRES_HEALTH_CHECK_INTERVAL"
        | "POSTGRES_STATEMENT_TIMEOUT"
        | "POSTGRES_LEAK_DETECTION_THRESHOLD"
        | "SHUTDOWN_DRAIN_TIMEOUT"
        | "SSH_RETRY_DELAY"
        | "SSH_KEEPALIVE_INTERVAL" => v.parse::<u64>().is_ok(),
        "SSH_PORT" | "SSH_REMOTE_PORT" => v.parse::<u16>().is_ok_and(|p| p > 0),
        "SSH_LOCAL_PORT" => lower == "unix" || v.parse::<u16>().is_ok(),
        "CONNECTION_LOG_TO_DB" | "SSH_USE_AGENT" | "POSTGRES_CONNECTION_IDS" => {
            matches!(
                lower.as_str(),
                "true" | "1" | "yes" | "on" | "false" | "0" | "no" | "off"
            )
        }
        "APP_ENV" => matches!(lower.as_str(), "development" | "dev" | "production" | "prod"),
        "SSH_HOST_KEY_POLICY" => HostKeyPolicy::from_str(v).is_ok(),
        "POSTGRES_APPLICATION_NAME" => v.len() <= 40 && v.bytes().all(|b| (0x20..0x7f).contains(&b)),
        _ => return None,
    })
}

/// Checks one outcome of `from_env_with` after `mutated` variables were set to hostile values.
fn check_outcome(env: &Env, mutated: &[(&str, &str)], outcome: std::thread::Result<sea_orm_tunnel::Result<Config>>) {
    let shown: Vec<String> = mutated.iter().map(|(k, v)| format!("{k}={}", preview(v))).collect();
    let outcome = outcome.unwrap_or_else(|_| panic!("from_env_with panicked on {}", shown.join(" ")));
    let secrets = [env.db_password.as_str(), env.passphrase.as_str()];
    match outcome {
        Ok(config) => {
            // A mutated URL may no longer hold the password as a password (an edit that deletes
            // the ':' makes it part of the user name); see `password_is_delimited`.
            let url_mangled = mutated
                .iter()
                .any(|(k, v)| *k == "DATABASE_URL" && !password_is_delimited(v, &env.db_password));
            let shown_secrets: &[&str] = if url_mangled { &secrets[1..] } else { &secrets };
            assert_no_secret(&format!("{config:?}"), shown_secrets, "Debug of a Config");
            // A value that is garbage for its type is never silently ignored.
            for (var, value) in mutated {
                // Without SSH_HOST the SSH_* variables are not read at all.
                let ignored = var.starts_with("SSH_") && config.tunnel.is_none();
                if !ignored && accepts(var, value) == Some(false) {
                    panic!("from_env_with accepted {var}={}", preview(value));
                }
            }
        }
        Err(error) => {
            let display = error.to_string();
            let debug = format!("{error:?}");
            assert!(
                matches!(error, Error::Config { .. } | Error::File { .. }),
                "not a configuration error for {}: {debug}",
                shown.join(" ")
            );
            assert!(
                mutated.iter().any(|(var, _)| display.contains(var)),
                "error does not name the variable ({}): {display}",
                shown.join(" ")
            );
            assert_no_secret(&display, &secrets, "an error's Display");
            assert_no_secret(&debug, &secrets, "an error's Debug");
            // Paths are shown as they are (see `file_errors_escape_control_characters_in_paths`).
            if !matches!(error, Error::File { .. }) {
                assert!(
                    !has_raw_control(&display),
                    "error holds a raw control character (log injection) for {}: {display:?}",
                    shown.join(" ")
                );
            }
        }
    }
}

#[test]
fn env_values_never_panic_and_errors_name_the_variable() {
    let mut g = Gen::new(seed("env_values"));
    let env = Env::new(&mut g);
    // The base environment itself is valid (so every error below is caused by the mutation).
    let base = env.read(&[]).expect("no panic").expect("the base environment is valid");
    assert!(base.tunnel.is_some());

    let per_var = cases(120);
    let vars: Vec<&str> = ENV_VARS.iter().copied().filter(|v| *v != "SSH_AUTH_SOCK").collect();
    let (mut ok, mut err) = (0usize, 0usize);
    for var in &vars {
        let good = env.vars.get(var).cloned().unwrap_or_default();
        for _ in 0..per_var {
            let value = g.value_for(&good);
            // Secrets are tested separately (their value may legitimately be anything).
            if *var == "SSH_KEY_PASSPHRASE" && value.contains(&env.passphrase) {
                continue;
            }
            let outcome = env.read(&[(var, &value)]);
            if matches!(outcome, Ok(Ok(_))) {
                ok += 1;
            } else {
                err += 1;
            }
            check_outcome(&env, &[(var, &value)], outcome);
        }
    }
    eprintln!("env_values: {ok} accepted, {err} rejected");
    // Garbage dominates: most cases must have been rejected, some accepted (the generator mixes in
    // good values), or the test is not testing anything.
    assert!(err > ok && ok > 0, "accepted {ok}, rejected {err}");
}

#[test]
fn several_bad_variables_at_once_name_one_of_them() {
    let mut g = Gen::new(seed("env_multi"));
    let env = Env::new(&mut g);
    let vars: Vec<&'static str> = ENV_VARS.iter().copied().filter(|v| *v != "SSH_AUTH_SOCK").collect();
    for _ in 0..cases(1500) {
        let n = g.rng.usize(2..6);
        let mut mutated: Vec<(&str, String)> = Vec::new();
        for _ in 0..n {
            let var = *g.pick(&vars);
            let good = env.vars.get(var).cloned().unwrap_or_default();
            let value = g.value_for(&good);
            if value.contains(&env.passphrase) || value.contains(&env.db_password) {
                continue;
            }
            mutated.push((var, value));
        }
        let pairs: Vec<(&str, &str)> = mutated.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let outcome = env.read(&pairs);
        // With duplicates the last value wins: check against the effective ones.
        let mut effective: Vec<(&str, &str)> = Vec::new();
        for (k, v) in pairs.iter().rev() {
            if !effective.iter().any(|(e, _)| e == k) {
                effective.push((k, v));
            }
        }
        check_outcome(&env, &effective, outcome);
    }
}

#[test]
fn secrets_with_hostile_characters_never_leak() {
    let mut g = Gen::new(seed("env_secrets"));
    let env = Env::new(&mut g);
    for _ in 0..cases(1500) {
        // The passphrase may be anything at all, including control characters and huge values.
        let core = format!("Phrase{}", g.token(12));
        let passphrase = format!("{}{core}{}", g.string(6), g.string(6));
        let outcome = env.read(&[("SSH_KEY_PASSPHRASE", &passphrase), ("SSH_PORT", "x")]);
        let error = outcome.expect("no panic").expect_err("SSH_PORT=x is rejected");
        assert_no_secret(&format!("{error} {error:?}"), &[&core], "an error");
        let config = env
            .read(&[("SSH_KEY_PASSPHRASE", &passphrase)])
            .expect("no panic")
            .expect("any passphrase is accepted");
        let debug = format!("{config:?} {:?}", config.tunnel);
        assert_no_secret(&debug, &[&core, &env.db_password], "Debug of a Config");
    }
}

// ---------------------------------------------------------------------------------------------
// DATABASE_URL
// ---------------------------------------------------------------------------------------------

/// A URL-ish string around a password that contains `core`.
fn hostile_url(g: &mut Gen, core: &str) -> String {
    const SCHEMES: &[&str] = &[
        "postgres",
        "postgresql",
        "POSTGRES",
        "mysql",
        "http",
        "",
        "postgres:",
        "p g",
        "𝔭𝔤",
    ];
    const HOSTS: &[&str] = &[
        "db",
        "db.internal",
        "127.0.0.1",
        "[::1]",
        "[::1",
        "::1",
        "[fe80::1%eth0]",
        "",
        "höst",
        "a..b",
        "%2Fvar%2Frun",
        "db:5432:1",
        "@",
        "[]",
    ];
    const PORTS: &[&str] = &[
        "5432",
        "",
        "0",
        "65536",
        "-1",
        "abc",
        "5432/",
        "99999999999",
        "５４３２",
    ];
    let special = |g: &mut Gen| -> String {
        let n = g.rng.usize(0..4);
        (0..n)
            .map(|_| *g.pick(&['@', ':', '/', '#', '?', '%', ' ', '&', '=', '[', ']', 'é', '\n', '\0']))
            .collect()
    };
    let (pre, post) = (special(g), special(g));
    let scheme = *g.pick(SCHEMES);
    let user = if g.chance(0.2) { g.string(6) } else { "app".to_owned() };
    let host = (*g.pick(HOSTS)).to_owned();
    let port = *g.pick(PORTS);
    let db = if g.chance(0.2) { g.string(6) } else { "app".to_owned() };
    // (before the separator, separator, after the password); the password is `pre core post`.
    let (head, sep, tail) = match g.rng.u8(..8) {
        // Password in the user info.
        0..=3 => (
            format!("{scheme}://{user}"),
            ":".to_owned(),
            format!("@{host}:{port}/{db}"),
        ),
        // Password as a query parameter, in various spellings.
        4 => {
            let key = *g.pick(&["password", "PASSWORD", "Password", "passwd", "pass"]);
            (
                format!("{scheme}://{user}@{host}:{port}/{db}?sslmode=disable"),
                format!("&{key}="),
                "&x=1".to_owned(),
            )
        }
        // No '@': `user:password` alone.
        5 => (format!("{scheme}://{user}"), ":".to_owned(), String::new()),
        6 => (
            format!("{scheme}://{user}"),
            ":".to_owned(),
            format!("@{host}/{db}#{}", g.string(5)),
        ),
        _ => (
            format!("{scheme}://{user}"),
            ":".to_owned(),
            format!("@{host}:{port}/{db}?{}", g.string(10)),
        ),
    };
    // Mutate around the password, never the separator that makes it one.
    let head = match head.split_once("://") {
        Some((scheme, user)) if g.chance(0.5) => format!("{}://{}", g.mutate(scheme), g.mutate(user)),
        _ => head,
    };
    let tail = if g.chance(0.5) { g.mutate(&tail) } else { tail };
    format!("{head}{sep}{pre}{core}{post}{tail}")
}

/// Whether the text containing `core` is, syntactically, still a password: after `scheme://user:`
/// and before an `@` (or the end), with no `/`, `?` or `#` in between; or the value of a `pass…=`
/// query parameter with no `#` before it. Mutations can turn it into a path or a fragment, which
/// is no longer a password for any URL parser; `redact_url` is only held to real passwords here
/// (the two shapes it misses are in `redact_url_hides_passwords_that_hold_url_delimiters`).
fn password_is_delimited(url: &str, core: &str) -> bool {
    let Some(at) = url.find(core) else { return false };
    let Some(start) = url[..at].find("://").map(|i| i + 3) else {
        return false;
    };
    // The authority ends at the first '/', '?' or '#' after "://" (URL syntax).
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    let core_end = at + core.len();
    if core_end <= end {
        let authority = &url[start..end];
        let (at, core_end) = (at - start, core_end - start);
        return match authority.rfind('@') {
            // user info = up to the last '@'; the password follows its first ':'.
            Some(last_at) => last_at >= core_end && authority[..last_at].find(':').is_some_and(|c| c < at),
            // `user:password` alone: promised hidden unless what follows the last ':' is a port.
            // (An authority starting with '[' reads as an IPv6 literal with a port, not as a user.)
            None => {
                authority[..at].contains(':') && !authority[core_end..].contains(':') && !authority.starts_with('[')
            }
        };
    }
    // A query parameter whose key contains "pass" (no '#' before it, which would make it a fragment).
    let Some(q) = url[..at].find('?') else { return false };
    let query = &url[q + 1..at];
    let last_key = query
        .rsplit('&')
        .next()
        .and_then(|pair| pair.split_once('='))
        .map(|(k, _)| k);
    // An '@' after the '?' is the known gap of `redact_url_hides_passwords_that_hold_url_delimiters`.
    let at_in_query = url[q..].contains('@');
    q >= end
        && !query.contains('#')
        && !at_in_query
        && last_key.is_some_and(|k| k.to_ascii_lowercase().contains("pass"))
}

#[test]
fn database_url_garbage_never_leaks_the_password() {
    let mut g = Gen::new(seed("database_url"));
    let env = Env::new(&mut g);
    let (mut rejected, mut accepted, mut redact_checked) = (0usize, 0usize, 0usize);
    for _ in 0..cases(3000) {
        let core = format!("Sec{}", g.token(12));
        let url = hostile_url(&mut g, &core);
        let secrets = [core.as_str()];

        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let config = Config::new(url.clone());
            let validated = config.validate();
            let options = config.database_options().map(|_| ());
            let target = config.database_target();
            let tunneled = config.clone().tunnel(TunnelConfig::new("bastion", "deploy"));
            let redacted = redact_url(&url);
            (config, validated, options, target, tunneled, redacted)
        }))
        .unwrap_or_else(|_| panic!("panicked on DATABASE_URL {}", preview(&url)));
        let (config, validated, options, target, tunneled, redacted) = outcome;
        if password_is_delimited(&url, &core) {
            redact_checked += 1;
            assert_no_secret(&redacted, &secrets, &format!("redact_url({})", preview(&url)));
            let debug = format!("{config:?} {tunneled:?} {target:?}");
            assert_no_secret(&debug, &secrets, &format!("Debug of a Config for {}", preview(&url)));
        }
        for result in [&validated, &options] {
            if let Err(e) = result {
                assert!(matches!(e, Error::Config { .. }), "{e:?}");
                assert!(e.to_string().contains("database_url"), "{e}");
                assert_no_secret(&format!("{e} {e:?}"), &secrets, "a database_url error");
            }
        }

        let env_outcome = env.read(&[("DATABASE_URL", &url)]);
        let env_outcome = env_outcome.unwrap_or_else(|_| panic!("from_env panicked on {}", preview(&url)));
        match &env_outcome {
            Ok(c) => {
                accepted += 1;
                if password_is_delimited(&url, &core) {
                    assert_no_secret(&format!("{c:?}"), &secrets, "Debug of a Config");
                }
            }
            Err(e) => {
                rejected += 1;
                assert!(matches!(e, Error::Config { .. }), "{e:?}");
                let text = e.to_string();
                assert!(
                    text.contains("DATABASE_URL"),
                    "error does not name DATABASE_URL for {}: {text}",
                    preview(&url)
                );
                assert_no_secret(&format!("{e} {e:?}"), &secrets, "a DATABASE_URL error");
                assert!(!has_raw_control(&text), "raw control character in {text:?}");
            }
        }
    }
    eprintln!("database_url: {accepted} accepted, {rejected} rejected, {redact_checked} redactions checked");
    assert!(accepted > 0 && rejected > 0, "accepted {accepted}, rejected {rejected}");
    assert!(redact_checked > 1000, "{redact_checked}");
}

// ---------------------------------------------------------------------------------------------
// Fingerprints
// ---------------------------------------------------------------------------------------------

fn is_canonical_fingerprint(fp: &str) -> bool {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let Some(body) = fp.strip_prefix("SHA256:") else {
        return false;
    };
    body.len() == 43 && body.chars().all(|c| ALPHABET.contains(c))
}

#[test]
fn fingerprints_parse_or_fail_clearly() {
    let mut g = Gen::new(seed("fingerprints"));
    let good = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..cases(5000) {
        let input = match i % 4 {
            0 => g.string(60),
            1 => {
                let n = g.rng.usize(1..3);
                g.mutate_n(good, n)
            }
            2 => format!("SHA256:{}", g.string(50)),
            _ => g.value_for(good),
        };
        let parsed = catch_unwind(|| (HostKeyPolicy::from_str(&input), HostKeyPolicy::fingerprint(&input)))
            .unwrap_or_else(|_| panic!("panicked on {}", preview(&input)));
        match parsed.0 {
            Ok(HostKeyPolicy::Fingerprint(fp)) => {
                ok += 1;
                assert!(is_canonical_fingerprint(&fp), "{} became {fp:?}", preview(&input));
                // Display round-trips.
                let again = HostKeyPolicy::from_str(&HostKeyPolicy::Fingerprint(fp.clone()).to_string()).unwrap();
                assert_eq!(again, HostKeyPolicy::Fingerprint(fp.clone()));
                assert!(matches!(&parsed.1, Ok(HostKeyPolicy::Fingerprint(f)) if *f == fp));
            }
            Ok(other) => {
                let word = input.trim().to_ascii_lowercase();
                assert!(
                    matches!(word.as_str(), "strict" | "accept-new" | "insecure-accept-any"),
                    "{} parsed as {other:?}",
                    preview(&input)
                );
            }
            Err(e) => {
                err += 1;
                let text = e.to_string();
                assert!(
                    matches!(e, Error::Config { ref field, .. } if field == "SSH_HOST_KEY_POLICY"),
                    "{e:?}"
                );
                assert!(!has_raw_control(&text), "raw control character in {text:?}");
                assert!(
                    parsed.1.is_err(),
                    "fingerprint() accepted what from_str rejected: {}",
                    preview(&input)
                );
            }
        }
    }
    eprintln!("fingerprints: {ok} accepted, {err} rejected");
    assert!(ok > 0 && err > ok);
}

// ---------------------------------------------------------------------------------------------
// Host keys against a real bastion
// ---------------------------------------------------------------------------------------------

/// A bastion plus a client key; no PostgreSQL needed (the tunnel opens no channel at connect).
struct KeyLab {
    bastion: Bastion,
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl KeyLab {
    async fn start() -> KeyLab {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = Bastion::generate_client_key(dir.path()).unwrap();
        let bastion = Bastion::builder()
            .authorize_key(public)
            .allow_target("127.0.0.1", 9)
            .start()
            .await
            .expect("bastion starts");
        KeyLab { bastion, dir, key }
    }

    fn config(&self, known_hosts: &Path, policy: HostKeyPolicy) -> TunnelConfig {
        TunnelConfig::new("127.0.0.1", self.bastion.user())
            .port(self.bastion.port())
            .auth(AuthConfig::key_file(&self.key).use_agent(false))
            .known_hosts(known_hosts)
            .host_key_policy(policy)
            .remote("127.0.0.1", 9)
            .connect_timeout(Duration::from_secs(5))
            .reconnect(BackoffPolicy::new(Duration::from_millis(50)).jitter(0.0).max_retries(1))
    }

    /// Connects; `Ok(true)` = the key was accepted (tunnel up, then closed again).
    async fn accepted(&self, config: TunnelConfig) -> sea_orm_tunnel::Result<bool> {
        let started = Instant::now();
        let result = tokio::time::timeout(LIVENESS, SshTunnel::connect(config))
            .await
            .expect("connect finishes within the liveness bound");
        assert!(started.elapsed() < LIVENESS);
        match result {
            Ok(tunnel) => {
                tunnel.disconnect().await;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// The bastion's key blob (base64), as it appears in its known_hosts line.
    fn blob(&self) -> String {
        self.bastion
            .known_hosts_line()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned()
    }
}

/// A random known_hosts line that never holds the bastion's real key.
fn garbage_known_hosts_line(g: &mut Gen, port: u16, decoy_blob: &str, real_blob: &str) -> String {
    let hosts = [
        format!("[127.0.0.1]:{port}"),
        "127.0.0.1".to_owned(),
        "*".to_owned(),
        "[127.0.0.1]:*".to_owned(),
        format!("[127.0.0.?]:{port}"),
        "!*".to_owned(),
        format!("*,![127.0.0.1]:{port}"),
        format!("|1|{}|{}", g.token(27), g.token(27)),
        "|1|||".to_owned(),
        g.string(12),
        String::new(),
    ];
    let kinds = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ssh-dss",
        "",
        "ssh-ed25519-cert-v01@openssh.com",
    ];
    let markers = [
        "",
        "",
        "",
        "@revoked ",
        "@cert-authority ",
        "@bogus ",
        "@",
        "@revoked\t",
    ];
    // Key blobs that are not the bastion's: another real key, the real key with one base64
    // character changed (a different key or invalid), truncated, random base64, random text.
    let blob = match g.rng.u8(..6) {
        0 => decoy_blob.to_owned(),
        1 => {
            let mut chars: Vec<char> = real_blob.chars().collect();
            let at = g.rng.usize(20..chars.len());
            let alphabet: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                .chars()
                .collect();
            let mut c = *g.pick(&alphabet);
            while c == chars[at] {
                c = *g.pick(&alphabet);
            }
            chars[at] = c;
            chars.into_iter().collect()
        }
        2 => real_blob[..g.rng.usize(0..real_blob.len() - 1)].to_owned(),
        3 => {
            let len = g.rng.usize(0..200);
            (0..len)
                .map(|_| {
                    *g.pick(
                        &"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
                            .chars()
                            .collect::<Vec<_>>(),
                    )
                })
                .collect()
        }
        4 => format!("AAAAC3NzaC1lZDI1NTE5AAAAI{}", g.token(43)),
        _ => g.string(40),
    };
    let sep = *g.pick(&[" ", "\t", "  ", " \t "]);
    let line = format!(
        "{}{}{sep}{}{sep}{}{}",
        g.pick(&markers),
        g.pick(&hosts),
        g.pick(&kinds),
        blob,
        if g.chance(0.3) {
            format!(" {}", g.string(10))
        } else {
            String::new()
        }
    );
    if g.chance(0.3) { g.mutate(&line) } else { line }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_garbage_never_accepts_an_unlisted_key() {
    let mut g = Gen::new(seed("known_hosts"));
    let lab = KeyLab::start().await;
    let path = lab.dir.path().join("known_hosts");
    let real_line = lab.bastion.known_hosts_line();
    let real_blob = lab.blob();
    let decoy_dir = tempfile::tempdir().unwrap();
    let (_, decoy) = Bastion::generate_client_key(decoy_dir.path()).unwrap();
    let decoy_blob = decoy
        .to_openssh()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let port = lab.bastion.port();

    // Positive control: the real line is accepted, so a rejection below means something.
    std::fs::write(&path, format!("{real_line}\n")).unwrap();
    assert!(lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await.unwrap());

    let (mut rejected, mut accepted_with_real) = (0usize, 0usize);
    let started = Instant::now();
    for i in 0..cases(300) {
        let n = g.rng.usize(0..12);
        let mut lines: Vec<Vec<u8>> = (0..n)
            .map(|_| garbage_known_hosts_line(&mut g, port, &decoy_blob, &real_blob).into_bytes())
            .collect();
        // Raw bytes: invalid UTF-8, NULs, CR line ends, one huge line now and then.
        if g.chance(0.2) {
            lines.push((0..g.rng.usize(1..300)).map(|_| g.rng.u8(..)).collect());
        }
        if g.chance(0.05) {
            lines.push(vec![b'A'; 1 << 20]);
        }
        let include_real = i % 3 == 0;
        if include_real {
            let at = g.rng.usize(0..=lines.len());
            lines.insert(at, real_line.clone().into_bytes());
        }
        let eol: &[u8] = if g.chance(0.2) { b"\r\n" } else { b"\n" };
        let contents = lines.join(eol);
        std::fs::write(&path, &contents).unwrap();

        let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await;
        let has_real = contents.windows(real_blob.len()).any(|w| w == real_blob.as_bytes());
        match verdict {
            Ok(_) => {
                assert!(
                    has_real,
                    "accepted a key that is not listed; known_hosts:\n{}",
                    String::from_utf8_lossy(&contents)
                );
                accepted_with_real += 1;
            }
            Err(e) => {
                rejected += 1;
                assert!(
                    matches!(
                        e,
                        Error::HostKeyUnknown { .. } | Error::HostKeyChanged { .. } | Error::HostKeyRevoked { .. }
                    ),
                    "unexpected verdict {e:?} for known_hosts:\n{}",
                    String::from_utf8_lossy(&contents)
                );
                assert!(!e.is_transient(), "a host-key verdict is permanent: {e}");
                // The real, unmodified line among garbage is always accepted: garbage lines are
                // skipped, never fatal, and none of them revokes the real key.
                assert!(
                    !include_real,
                    "the listed key was rejected because of garbage lines ({e}); known_hosts:\n{}",
                    String::from_utf8_lossy(&contents)
                );
            }
        }
    }
    eprintln!(
        "known_hosts: {rejected} rejected, {accepted_with_real} accepted (real line present) in {:?}",
        started.elapsed()
    );
    assert!(accepted_with_real > 0 && rejected > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_key_under_a_non_matching_host_or_revoked_is_never_accepted() {
    let mut g = Gen::new(seed("known_hosts_targeted"));
    let lab = KeyLab::start().await;
    let path = lab.dir.path().join("known_hosts");
    let blob = lab.blob();
    let port = lab.bastion.port();
    let real_line = lab.bastion.known_hosts_line();
    // The plain `127.0.0.1` is not here: with no `[127.0.0.1]:PORT` line OpenSSH (and the tunnel)
    // fall back to the line without port; that case is checked below.
    let hosts = [
        format!("[127.0.0.1]:{}", port.wrapping_add(1).max(1)),
        "127.0.0.2".to_owned(),
        "127.0.0.?0".to_owned(),
        "!127.0.0.1,127.0.0.*".to_owned(),
        format!("[127.0.0.2]:{port}"),
        format!("[127.0.0.1]:{port}0"),
        format!("[127.0.0.1]:{port},!*"),
        format!("!*,[127.0.0.1]:{port}"),
        format!("![127.0.0.1]:{port},!127.0.0.1,*"),
        format!("|1|{}=|{}=", g.token(27), g.token(27)),
        "localhost".to_owned(),
        format!("[127.0.0.1] :{port}"),
        format!("127.0.0.1:{port}"),
    ];
    for host in &hosts {
        std::fs::write(&path, format!("{host} ssh-ed25519 {blob}\n")).unwrap();
        let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await;
        assert!(
            matches!(verdict, Err(Error::HostKeyUnknown { .. })),
            "host pattern {host:?}: {verdict:?}"
        );
    }
    // The port-less fallback: the plain line holds the key and the port has no line (accepted),
    // but never past a port-ful line with another key of the type, nor past a revocation.
    let decoy_dir = tempfile::tempdir().unwrap();
    let (_, decoy) = Bastion::generate_client_key(decoy_dir.path()).unwrap();
    let decoy = decoy.to_openssh().unwrap();
    // (Negating only the port-ful name leaves the plain name to `*`: OpenSSH accepts that too.)
    for host in [
        "127.0.0.1".to_owned(),
        "127.0.0.?".to_owned(),
        format!("![127.0.0.1]:{port},*"),
    ] {
        std::fs::write(&path, format!("{host} ssh-ed25519 {blob}\n")).unwrap();
        let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await;
        assert!(matches!(verdict, Ok(true)), "{host:?}, port without line: {verdict:?}");
    }
    std::fs::write(
        &path,
        format!("[127.0.0.1]:{port} {decoy}\n127.0.0.1 ssh-ed25519 {blob}\n"),
    )
    .unwrap();
    let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await;
    assert!(matches!(verdict, Err(Error::HostKeyChanged { .. })), "{verdict:?}");
    // Revoked, in any order relative to a line that lists it, under either name.
    for contents in [
        format!("@revoked * ssh-ed25519 {blob}\n{real_line}\n"),
        format!("{real_line}\n@revoked [127.0.0.1]:{port} ssh-ed25519 {blob}\n"),
        format!("127.0.0.1 ssh-ed25519 {blob}\n@revoked 127.0.0.1 ssh-ed25519 {blob}\n"),
    ] {
        std::fs::write(&path, &contents).unwrap();
        let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await;
        assert!(
            matches!(verdict, Err(Error::HostKeyRevoked { .. })),
            "{contents}: {verdict:?}"
        );
    }
    // A known_hosts that is a directory, or unreadable garbage bytes only: an error, never a pass.
    let as_dir = lab.dir.path().join("kh_dir");
    std::fs::create_dir(&as_dir).unwrap();
    let verdict = lab.accepted(lab.config(&as_dir, HostKeyPolicy::Strict)).await;
    assert!(verdict.is_err(), "{verdict:?}");
    // AcceptNew never learns over a changed key, whatever surrounds the recorded one.
    std::fs::write(&path, format!("# {}\n[127.0.0.1]:{port} {decoy}\n\0\n", g.string(20))).unwrap();
    let verdict = lab.accepted(lab.config(&path, HostKeyPolicy::AcceptNew)).await;
    assert!(matches!(verdict, Err(Error::HostKeyChanged { .. })), "{verdict:?}");
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(
        !after.contains(&blob),
        "accept-new must not learn a changed key:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_fingerprint_that_differs_by_one_character_is_refused() {
    let mut g = Gen::new(seed("pinned"));
    let lab = KeyLab::start().await;
    let empty = lab.dir.path().join("empty_known_hosts");
    let real = lab.bastion.host_key_fingerprint();
    assert!(
        lab.accepted(lab.config(&empty, HostKeyPolicy::fingerprint(&real).unwrap()))
            .await
            .unwrap()
    );
    let mut tried = 0;
    while tried < cases(40) {
        let candidate = g.mutate(&real);
        let Ok(policy) = HostKeyPolicy::fingerprint(&candidate) else {
            continue;
        };
        if policy == HostKeyPolicy::Fingerprint(real.clone()) {
            continue; // An edit that only changed padding or whitespace.
        }
        tried += 1;
        let verdict = lab.accepted(lab.config(&empty, policy.clone())).await;
        assert!(
            matches!(verdict, Err(Error::HostKeyChanged { .. })),
            "pinned {policy:?} (real {real}): {verdict:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A hostile bastion
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_that_sends_garbage_or_stalls_fails_the_connect_in_bounded_time() {
    let lab = KeyLab::start().await;
    let path = lab.dir.path().join("known_hosts");
    lab.bastion.write_known_hosts(&path).unwrap();
    let connect_timeout = Duration::from_secs(2);
    let retries = 1u32;
    // Every attempt is bounded by connect_timeout; one retry after 50 ms.
    let bound = connect_timeout * (retries + 1) + Duration::from_secs(5);

    for mode in ["garbage", "stall"] {
        match mode {
            "garbage" => lab.bastion.send_garbage_on_connect(true),
            _ => lab.bastion.stall_handshake(true),
        }
        for _ in 0..3 {
            let config = lab
                .config(&path, HostKeyPolicy::Strict)
                .connect_timeout(connect_timeout);
            let started = Instant::now();
            let result = tokio::time::timeout(bound + LIVENESS, SshTunnel::connect(config))
                .await
                .unwrap_or_else(|_| panic!("{mode}: connect hangs"));
            let took = started.elapsed();
            let error = result.expect_err("a hostile bastion never yields a tunnel");
            assert!(took < bound, "{mode}: connect took {took:?} (bound {bound:?})");
            assert!(error.is_transient(), "{mode}: {error:?}");
            let text = error.to_string();
            assert!(
                text.contains("127.0.0.1"),
                "{mode}: the error names the bastion: {text}"
            );
            assert!(!has_raw_control(&text), "{mode}: raw control character in {text:?}");
        }
        lab.bastion.send_garbage_on_connect(false);
        lab.bastion.stall_handshake(false);
    }
    // And the bastion (and the client side) is fine afterwards.
    assert!(lab.accepted(lab.config(&path, HostKeyPolicy::Strict)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_turning_hostile_mid_life_never_hangs_the_pool() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let config = sandbox
        .config()
        .map_tunnel(|t| t.connect_timeout(Duration::from_secs(2)))
        .map_pool(|p| p.max_connections(4).connect_timeout(Duration::from_secs(2)))
        .map_health(|h| h.interval(Duration::from_millis(500)).timeout(Duration::from_secs(2)));
    let manager = ConnectionManager::new(config).await.expect("manager starts");
    let db = manager.connection().clone();
    db.execute_unprepared("SELECT 1").await.expect("healthy at first");

    for mode in ["garbage", "stall"] {
        match mode {
            "garbage" => sandbox.bastion().send_garbage_on_connect(true),
            _ => sandbox.bastion().stall_handshake(true),
        }
        sandbox.bastion().drop_sessions();
        // Reconnects now hit the hostile bastion. Queries fail (or, if a session survived,
        // succeed) but every one finishes within a bounded time, with a clear error.
        for _ in 0..4 {
            let started = Instant::now();
            let result = tokio::time::timeout(LIVENESS, db.execute_unprepared("SELECT 1"))
                .await
                .unwrap_or_else(|_| panic!("{mode}: a query hangs"));
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{mode}: {:?}",
                started.elapsed()
            );
            if let Err(e) = result {
                let e = Error::from(e);
                assert!(e.is_transient(), "{mode}: {e:?}");
            }
        }
        let status = tokio::time::timeout(LIVENESS, manager.check_health())
            .await
            .unwrap_or_else(|_| panic!("{mode}: health check hangs"));
        assert!(!status.healthy, "{mode}: {status:?}");
        assert!(status.error.is_some());
        sandbox.bastion().send_garbage_on_connect(false);
        sandbox.bastion().stall_handshake(false);
        sandbox.bastion().drop_sessions();
        // Recovery once the bastion behaves.
        let healthy = holds_within(LIVENESS, || manager.status().healthy).await;
        assert!(healthy, "{mode}: not healthy again: {:?}", manager.status());
        tokio::time::timeout(LIVENESS, db.execute_unprepared("SELECT 1"))
            .await
            .expect("no hang")
            .unwrap_or_else(|e| panic!("{mode}: query after recovery failed: {e}"));
    }
    let report = tokio::time::timeout(LIVENESS, manager.shutdown(Duration::from_secs(5)))
        .await
        .expect("shutdown finishes");
    assert_eq!(report.forced, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_closed_at_random_fail_queries_clearly_and_never_hang() {
    let sandbox = Sandbox::start().await.expect("sandbox");
    let config = sandbox
        .config()
        .map_tunnel(|t| t.connect_timeout(Duration::from_secs(2)))
        .map_pool(|p| p.max_connections(6).connect_timeout(Duration::from_secs(2)));
    let manager = ConnectionManager::new(config).await.expect("manager starts");
    sandbox.bastion().close_channels_randomly(0.5);

    let (mut ok, mut failed) = (0usize, 0usize);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..6 {
        let manager = manager.clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..15 {
                let db = manager.connection().clone();
                let started = Instant::now();
                let r = tokio::time::timeout(
                    LIVENESS,
                    db.execute_unprepared(&format!("SELECT {worker} + {i}, pg_sleep(0.02)")),
                )
                .await;
                outcomes.push((r, started.elapsed()));
            }
            outcomes
        });
    }
    while let Some(outcomes) = tasks.join_next().await {
        for (r, took) in outcomes.expect("worker does not panic") {
            let r = r.expect("a query never hangs");
            assert!(took < Duration::from_secs(15), "{took:?}");
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    let e = Error::from(e);
                    assert!(e.is_transient(), "a closed channel is a transient failure: {e:?}");
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
    eprintln!("random channel closes, pooled: {ok} ok, {failed} failed");
    assert!(ok + failed == 90);

    // Fresh connections, each on a new channel: about half are closed during the connect or the
    // query. Each fails (or succeeds) promptly, with an I/O or protocol error.
    let endpoint = manager.tunnel().unwrap().local_endpoint().tcp_addr().unwrap();
    let pg = sandbox.postgres();
    let url = format!(
        "postgres://{}:{}@{endpoint}/{}",
        pg.user(),
        pg.password(),
        pg.database()
    );
    let (mut fresh_ok, mut fresh_failed) = (0usize, 0usize);
    for _ in 0..40 {
        use sea_orm::sqlx::{Connection, Executor};
        let started = Instant::now();
        let attempt = tokio::time::timeout(LIVENESS, async {
            let mut conn = sea_orm::sqlx::PgConnection::connect(&url).await?;
            conn.execute("SELECT pg_sleep(0.15)").await?;
            conn.close().await
        })
        .await
        .expect("a fresh connection never hangs");
        assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
        match attempt {
            Ok(()) => fresh_ok += 1,
            Err(e) => {
                fresh_failed += 1;
                assert!(
                    matches!(e, sea_orm::sqlx::Error::Io(_) | sea_orm::sqlx::Error::Protocol(_)),
                    "{e:?}"
                );
                assert!(!e.to_string().is_empty() && !e.to_string().contains(pg.password()));
            }
        }
    }
    eprintln!("random channel closes, fresh: {fresh_ok} ok, {fresh_failed} failed");
    assert!(
        fresh_failed > 0 && fresh_ok > 0,
        "half the channels are closed within 100 ms: {fresh_ok} ok, {fresh_failed} failed"
    );

    // manager.retry rides it out, and without the hostile mode everything works.
    let through_retry = manager
        .retry_with(
            &BackoffPolicy::new(Duration::from_millis(20))
                .max_retries(30)
                .max_delay(Duration::from_millis(200)),
            |db| async move { db.execute_unprepared("SELECT 1").await },
        )
        .await;
    assert!(through_retry.is_ok(), "{through_retry:?}");
    sandbox.bastion().close_channels_randomly(0.0);
    for _ in 0..10 {
        manager
            .retry(|db| async move { db.execute_unprepared("SELECT 1").await })
            .await
            .expect("queries work once the bastion behaves");
    }
    let report = tokio::time::timeout(LIVENESS, manager.shutdown(Duration::from_secs(5)))
        .await
        .expect("shutdown finishes");
    assert_eq!(report.forced, 0, "{report:?}");
}

/// A path from the environment must not be echoed raw in [`Error::File`]'s `Display`: a value
/// holding a newline or an ESC sequence would forge log lines or drive the terminal of whoever
/// reads the log. Paths are quoted and escaped (`{:?}`), like every other bad value.
#[test]
fn file_errors_escape_control_characters_in_paths() {
    let mut g = Gen::new(1);
    let env = Env::new(&mut g);
    for value in [
        "/tmp/no-such-key\n2025-01-01T00:00:00Z ERROR forged log line",
        "/tmp/no-such-key\u{1b}[2J\u{1b}[31mred",
    ] {
        let error = env
            .read(&[("SSH_KEY_PATH", value)])
            .expect("no panic")
            .expect_err("a missing key file is an error");
        let text = error.to_string();
        assert!(text.contains("SSH_KEY_PATH"), "{text}");
        assert!(!has_raw_control(&text), "raw control character in the error: {text:?}");
    }
}

/// `redact_url` (used by `Config`'s `Debug` and by every log line naming the database) must hide
/// a password that holds a URL delimiter, in three realistic shapes: an unencoded `#` inside a
/// `password=` query parameter (it must not be printed as a "fragment"); an unencoded `@` inside
/// a `password=` query parameter (it must not be taken as the end of the user info); and a URL
/// without a host whose password starts with `#`, `/` or `?`. When it is unclear where a password
/// ends, more is hidden rather than less.
#[test]
fn redact_url_hides_passwords_that_hold_url_delimiters() {
    for (url, secret) in [
        (
            "postgres://db.internal/app?user=app&password=ab#TopSecret1",
            "TopSecret1",
        ),
        ("postgres://app:#TopSecret2", "TopSecret2"),
        ("postgres://app:/TopSecret3", "TopSecret3"),
        ("postgres://app@db.internal/app?password=p@TopSecret4", "TopSecret4"),
    ] {
        let redacted = redact_url(url);
        assert!(!redacted.contains(secret), "redact_url({url:?}) = {redacted:?}");
        let debug = format!("{:?}", Config::new(url));
        assert!(!debug.contains(secret), "Debug of Config::new({url:?}) = {debug}");
    }
}
