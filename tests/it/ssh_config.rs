//! `~/.ssh/config`: the resolution is OpenSSH's (`ssh -F FILE -G HOST` is the reference), an
//! alias in a temp HOME's config reaches PostgreSQL through a real sshd, `SSH_CONFIG=none`
//! ignores the file, set variables win over it, and an unsupported directive that applies is a
//! clear error.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::config::{Config, HostKeyPolicy, JumpHost, SshConfigSource, TunnelConfig};
use sea_orm_tunnel::ssh_config::{IdentityAgent, ResolvedHost, Resolver};
use sea_orm_tunnel::testkit::fast_config;
use sea_orm_tunnel::{Error, SshTunnel};

use super::support::{select_one, servers};

/// The local login name as OpenSSH sees it (`%u`, the default `User`).
fn local_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id runs");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `ssh -F file -G host`: OpenSSH's resolution, as `key -> values` (a key printed on several
/// lines, like `identityfile`, keeps every value in order).
fn openssh_g(file: &Path, host: &str) -> HashMap<String, Vec<String>> {
    let out = Command::new("ssh")
        .arg("-F")
        .arg(file)
        .arg("-G")
        .arg(host)
        .output()
        .expect("the OpenSSH client runs");
    assert!(
        out.status.success(),
        "ssh -G {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        map.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    map
}

fn one<'a>(g: &'a HashMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    g.get(key).and_then(|v| v.first()).map(String::as_str)
}

fn paths(v: &[PathBuf]) -> String {
    v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
}

/// Writes `text` as a config file that ssh accepts (mode 0600).
fn write_config(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Our resolution of `host` in `file` agrees with `ssh -G` on every directive we apply.
fn assert_same_as_openssh(file: &Path, host: &str) -> ResolvedHost {
    let user = local_user();
    let ours = Resolver::with_env(SshConfigSource::File(file.to_owned()), |name| match name {
        "USER" => Some(user.clone()),
        _ => None,
    })
    .resolve(host)
    .unwrap_or_else(|e| panic!("{host}: {e}"));
    let g = openssh_g(file, host);
    let ctx = |what: &str| format!("{host}: {what} (ours {ours:#?})");
    assert_eq!(
        one(&g, "hostname"),
        Some(ours.dial_host().as_str()),
        "{}",
        ctx("hostname")
    );
    assert_eq!(
        one(&g, "user").map(str::to_owned),
        Some(ours.user.clone().unwrap_or(user.clone())),
        "{}",
        ctx("user")
    );
    assert_eq!(
        one(&g, "port"),
        Some(ours.port.unwrap_or(22).to_string().as_str()),
        "{}",
        ctx("port")
    );
    let id: Vec<String> = ours.identity_files.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        g.get("identityfile").cloned().unwrap_or_default(),
        id,
        "{}",
        ctx("identityfile")
    );
    let certs: Vec<String> = ours.certificate_files.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        g.get("certificatefile").cloned().unwrap_or_default(),
        certs,
        "{}",
        ctx("certificatefile")
    );
    assert_eq!(
        one(&g, "userknownhostsfile").map(str::to_owned),
        ours.user_known_hosts_files.as_deref().map(paths),
        "{}",
        ctx("userknownhostsfile")
    );
    assert_eq!(
        one(&g, "globalknownhostsfile").map(str::to_owned),
        ours.global_known_hosts_files.as_deref().map(paths),
        "{}",
        ctx("globalknownhostsfile")
    );
    let policy = match one(&g, "stricthostkeychecking") {
        Some("true" | "yes" | "ask") => Some(HostKeyPolicy::Strict),
        Some("accept-new") => Some(HostKeyPolicy::AcceptNew),
        other => panic!("{host}: stricthostkeychecking {other:?}"),
    };
    assert_eq!(ours.host_key_policy, policy, "{}", ctx("stricthostkeychecking"));
    assert_eq!(
        one(&g, "hostkeyalias"),
        ours.host_key_alias.as_deref(),
        "{}",
        ctx("hostkeyalias")
    );
    let jump = ours
        .proxy_jump
        .as_ref()
        // `ProxyJump none` (no hops) is not printed by ssh -G.
        .filter(|hops| !hops.is_empty())
        .map(|hops| hops.iter().map(JumpHost::to_string).collect::<Vec<_>>().join(","));
    assert_eq!(one(&g, "proxyjump").map(str::to_owned), jump, "{}", ctx("proxyjump"));
    assert_eq!(
        one(&g, "serveraliveinterval"),
        Some(
            ours.server_alive_interval
                .map_or(0, |d| d.as_secs())
                .to_string()
                .as_str()
        ),
        "{}",
        ctx("serveraliveinterval")
    );
    assert_eq!(
        one(&g, "serveralivecountmax"),
        Some(ours.server_alive_count_max.unwrap_or(3).to_string().as_str()),
        "{}",
        ctx("serveralivecountmax")
    );
    assert_eq!(
        one(&g, "connecttimeout").map(str::to_owned),
        Some(
            ours.connect_timeout
                .map_or("none".to_owned(), |d| d.as_secs().to_string())
        ),
        "{}",
        ctx("connecttimeout")
    );
    let only = match one(&g, "identitiesonly") {
        Some("yes") => true,
        Some("no") => false,
        other => panic!("{host}: identitiesonly {other:?}"),
    };
    assert_eq!(ours.identities_only.unwrap_or(false), only, "{}", ctx("identitiesonly"));
    let agent = match &ours.identity_agent {
        None => None,
        Some(IdentityAgent::Disabled) => Some("none".to_owned()),
        Some(IdentityAgent::Environment) => Some("SSH_AUTH_SOCK".to_owned()),
        Some(IdentityAgent::Socket(p)) => Some(p.display().to_string()),
        Some(other) => panic!("{host}: unexpected {other:?}"),
    };
    assert_eq!(
        one(&g, "identityagent").map(str::to_owned),
        agent,
        "{}",
        ctx("identityagent")
    );
    ours
}

#[test]
fn resolution_matches_openssh_on_a_realistic_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let file = dir.path().join("config");
    write_config(
        &dir.path().join("conf.d/10-teams.conf"),
        &format!(
            "Host jump.corp.example\n  ProxyJump none\n  User jumper\n\
             Host *.corp.example\n  User team\n  IdentityFile {d}/keys/team\n  ProxyJump jump.corp.example\n"
        ),
    );
    write_config(&dir.path().join("conf.d/20-late.conf"), "Host db-prod\n  Port 9999\n");
    write_config(
        &file,
        &format!(
            "# Operator's config\n\
             Include {d}/conf.d/*.conf\n\
             \n\
             Host db-prod\n\
             \tHostName 10.20.30.40\n\
             \tUser=deploy\n\
             \tPort 2222\n\
             \tIdentityFile {d}/keys/prod_ed25519\n\
             \tIdentityFile \"{d}/keys/with space\"\n\
             \tCertificateFile {d}/keys/prod_ed25519-cert.pub\n\
             \tIdentitiesOnly yes\n\
             \tIdentityAgent none\n\
             \tProxyJump ops@bastion.example.com:2200,[fd00::1]:22\n\
             \tHostKeyAlias db-prod-key\n\
             \tStrictHostKeyChecking accept-new\n\
             \n\
             Host db-* !db-legacy\n\
             \tHostName %h.internal.example\n\
             \tUserKnownHostsFile {d}/kh/%h_%p {d}/kh/%n-%r\n\
             \tIdentityAgent {d}/agent/%h.sock\n\
             \tServerAliveInterval 1m\n\
             \n\
             Host db-legacy\n\
             \tHostName 192.0.2.7\n\
             \tStrictHostKeyChecking ask\n\
             \n\
             Match originalhost web*\n\
             \tPort 8022\n\
             \n\
             # OpenSSH's final pass: `Host` then matches the resolved HostName.\n\
             Match final host *.internal.example\n\
             \tHostKeyAlias staging-final\n\
             Host db-staging.internal.example\n\
             \tCertificateFile {d}/keys/final-cert.pub\n\
             \n\
             Host *\n\
             \tUser fallback\n\
             \tIdentityFile {d}/keys/default\n\
             \tUserKnownHostsFile {d}/kh/default\n\
             \tGlobalKnownHostsFile {d}/kh/global1 {d}/kh/global2\n\
             \tStrictHostKeyChecking yes\n\
             \tServerAliveInterval 15\n\
             \tServerAliveCountMax 5\n\
             \tConnectTimeout 7\n\
             \tSendEnv LANG LC_*\n\
             \tHashKnownHosts yes\n\
             \tGSSAPIAuthentication no\n\
             \tControlMaster auto\n\
             \tControlPath /tmp/cm-%r@%h:%p\n\
             \tAddKeysToAgent yes\n"
        ),
    );
    let prod = assert_same_as_openssh(&file, "db-prod");
    assert_eq!(prod.dial_host(), "10.20.30.40");
    // The Include comes first in the file, so its `Port 9999` wins (first value wins).
    assert_eq!(prod.port, Some(9999));
    let staging = assert_same_as_openssh(&file, "db-staging");
    assert_eq!(staging.dial_host(), "db-staging.internal.example");
    assert_eq!(staging.host_key_alias.as_deref(), Some("staging-final"));
    assert_eq!(staging.certificate_files.len(), 1);
    let legacy = assert_same_as_openssh(&file, "db-legacy");
    assert_eq!(legacy.dial_host(), "192.0.2.7");
    for host in [
        "web1",
        "app.corp.example",
        "jump.corp.example",
        "unknown-host",
        "Db-Prod",
    ] {
        assert_same_as_openssh(&file, host);
    }
}

/// A temp HOME whose `~/.ssh/config` names the test sshd as `pg-bastion`.
fn home_with_alias(sshd: &sea_orm_tunnel::testkit::OpenSshd, extra: &str) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    write_config(
        &home.path().join(".ssh/config"),
        &format!(
            "Host pg-bastion\n  HostName {host}\n  Port {port}\n  User {user}\n  IdentityFile {key}\n\
             IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n\
             ServerAliveInterval 2\n  ConnectTimeout 10\n{extra}\
             Host other\n  ProxyCommand nc %h %p\n",
            host = sshd.host(),
            port = sshd.port(),
            user = sshd.user(),
            key = sshd.client_key_path().display(),
            kh = sshd.known_hosts_path().display(),
        ),
    );
    home
}

fn env<'a>(pairs: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
}

#[tokio::test]
async fn an_alias_in_home_ssh_config_reaches_postgres() {
    let (pg, sshd) = servers().await;
    sshd.trust_host_key().unwrap();
    let home = home_with_alias(&sshd, "");
    // No SSH_USER, no SSH_PORT, no key, no known_hosts: all from ~/.ssh/config.
    let vars = [
        ("HOME", home.path().display().to_string()),
        ("DATABASE_URL", pg.url()),
        ("SSH_HOST", "pg-bastion".to_owned()),
    ];
    let config = Config::from_env_with(env(&vars)).unwrap();
    let t = config.tunnel.clone().unwrap();
    assert_eq!(
        (t.host.as_str(), t.port, t.user.as_str()),
        (sshd.host(), sshd.port(), sshd.user())
    );
    assert_eq!(t.ssh_alias.as_deref(), Some("pg-bastion"));
    assert_eq!(t.known_hosts, sshd.known_hosts_path());
    assert_eq!(t.auth.key_path.as_deref(), Some(sshd.client_key_path().as_path()));
    assert!(!t.auth.use_agent && t.auth.identities_only);
    assert_eq!(t.keepalive_interval, Duration::from_secs(2));
    assert_eq!(t.ssh_config, SshConfigSource::Standard);

    // The same file read by OpenSSH gives the same host, port and user.
    let g = openssh_g(&home.path().join(".ssh/config"), "pg-bastion");
    assert_eq!(one(&g, "hostname"), Some(t.host.as_str()));
    assert_eq!(one(&g, "port"), Some(t.port.to_string().as_str()));
    assert_eq!(one(&g, "user"), Some(t.user.as_str()));

    // A real connection: the dialled host is the HostName, verified strictly in that known_hosts.
    let config = fast_config(pg.url(), "sshcfg").tunnel(t);
    let manager = tokio::time::timeout(Duration::from_secs(60), ConnectionManager::new(config))
        .await
        .expect("connects in time")
        .expect("connects through the alias");
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(5)).await;

    // Code-built: the same alias from an explicit file, the builders after it win.
    let t = TunnelConfig::new("pg-bastion", "")
        .apply_ssh_config(SshConfigSource::File(home.path().join(".ssh/config")))
        .unwrap()
        .remote("127.0.0.1", pg.port());
    assert_eq!(
        (t.host.as_str(), t.port, t.user.as_str()),
        (sshd.host(), sshd.port(), sshd.user())
    );
    let tunnel = tokio::time::timeout(Duration::from_secs(60), SshTunnel::connect(t))
        .await
        .expect("starts in time")
        .expect("the tunnel starts through the alias");
    tunnel.disconnect().await;
}

#[test]
fn ssh_config_none_ignores_the_file_and_set_variables_win() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    write_config(
        &home.join(".ssh/config"),
        "Host pg-bastion\n  HostName 10.9.8.7\n  Port 2200\n  User filed\n  ServerAliveInterval 9\n\
         StrictHostKeyChecking accept-new\n",
    );
    std::fs::write(home.join(".ssh/id_ed25519"), "placeholder").unwrap();
    let base = |more: &[(&'static str, &str)]| {
        let mut v = vec![
            ("HOME", home.display().to_string()),
            ("DATABASE_URL", "postgres://app:pw@db.internal:5432/app".to_owned()),
            ("SSH_HOST", "pg-bastion".to_owned()),
        ];
        v.extend(more.iter().map(|(k, x)| (*k, x.to_string())));
        v
    };

    let v = base(&[("SSH_CONFIG", "none"), ("SSH_USER", "me")]);
    let t = TunnelConfig::from_env_with(env(&v)).unwrap();
    assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("pg-bastion", 22, "me"));
    assert_eq!(t.host_key_policy, HostKeyPolicy::Strict);
    assert_eq!(t.ssh_config, SshConfigSource::Disabled);
    assert_eq!(t.ssh_alias, None);

    // Without SSH_USER (and without USER in this environment), `none` leaves no user.
    let v = base(&[("SSH_CONFIG", "NONE")]);
    let e = TunnelConfig::from_env_with(env(&v)).unwrap_err().to_string();
    assert!(
        e.contains("SSH_USER") && e.contains("required when SSH_HOST is set"),
        "{e}"
    );
    // ... and the local user is the fallback, as in ssh.
    let v = base(&[("SSH_CONFIG", "none"), ("USER", "localme")]);
    assert_eq!(TunnelConfig::from_env_with(env(&v)).unwrap().user, "localme");

    // With the file: set variables win, unset ones come from it.
    let v = base(&[
        ("SSH_PORT", "2999"),
        ("SSH_KEEPALIVE_INTERVAL", "1500"),
        ("USER", "localme"),
    ]);
    let t = TunnelConfig::from_env_with(env(&v)).unwrap();
    assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("10.9.8.7", 2999, "filed"));
    assert_eq!(t.keepalive_interval, Duration::from_millis(1500));
    assert_eq!(t.host_key_policy, HostKeyPolicy::AcceptNew);
    let v = base(&[("SSH_USER", "explicit"), ("SSH_HOST_KEY_POLICY", "strict")]);
    let t = TunnelConfig::from_env_with(env(&v)).unwrap();
    assert_eq!((t.port, t.user.as_str()), (2200, "explicit"));
    assert_eq!(t.host_key_policy, HostKeyPolicy::Strict);
    assert_eq!(t.keepalive_interval, Duration::from_secs(9));

    // SSH_CONFIG=path replaces both default files (~ is $HOME).
    write_config(&home.join("alt_config"), "Host pg-bastion\n  Port 2300\n  User alt\n");
    let v = base(&[("SSH_CONFIG", "~/alt_config")]);
    let t = TunnelConfig::from_env_with(env(&v)).unwrap();
    assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("pg-bastion", 2300, "alt"));
    assert_eq!(t.ssh_config, SshConfigSource::File(home.join("alt_config")));
    let v = base(&[("SSH_CONFIG", "~/missing_config"), ("SSH_USER", "me")]);
    let e = TunnelConfig::from_env_with(env(&v)).unwrap_err().to_string();
    assert!(e.contains("missing_config") && e.contains("does not exist"), "{e}");
}

#[test]
fn an_unsupported_directive_for_the_host_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let file = home.join(".ssh/config");
    write_config(
        &file,
        "Host other\n  ProxyCommand nc %h %p\n\
         Host pg-bastion\n  HostName 10.9.8.7\n  User filed\n  ProxyCommand ssh -W %h:%p jump\n\
         Host insecure\n  User u\n  StrictHostKeyChecking no\n",
    );
    std::fs::write(home.join(".ssh/id_ed25519"), "placeholder").unwrap();
    let vars = |host: &str, more: &[(&'static str, &str)]| {
        let mut v = vec![
            ("HOME", home.display().to_string()),
            ("DATABASE_URL", "postgres://app:pw@db.internal:5432/app".to_owned()),
            ("SSH_HOST", host.to_owned()),
        ];
        v.extend(more.iter().map(|(k, x)| (*k, x.to_string())));
        v
    };
    let v = vars("pg-bastion", &[]);
    let err = Config::from_env_with(env(&v)).unwrap_err();
    assert!(!err.is_transient());
    let e = err.to_string();
    assert!(e.contains("ProxyCommand is not supported"), "{e}");
    assert!(
        e.contains(&format!("{file:?}")) && e.contains("line 6") && e.contains("\"pg-bastion\""),
        "{e}"
    );
    assert!(
        e.contains("ProxyJump"),
        "the error suggests the supported alternative: {e}"
    );
    // The same directive in another host's block does not matter.
    let v = vars("elsewhere", &[("SSH_USER", "me")]);
    assert!(Config::from_env_with(env(&v)).is_ok());

    // `StrictHostKeyChecking no` names the explicitly insecure policy; setting it explicitly works.
    let v = vars("insecure", &[]);
    let e = Config::from_env_with(env(&v)).unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("SSH_HOST_KEY_POLICY=insecure-accept-any") && e.contains("line 9"),
        "{e}"
    );
    let v = vars("insecure", &[("SSH_HOST_KEY_POLICY", "insecure-accept-any")]);
    let t = Config::from_env_with(env(&v)).unwrap().tunnel.unwrap();
    assert_eq!(t.host_key_policy, HostKeyPolicy::InsecureAcceptAny);
}
