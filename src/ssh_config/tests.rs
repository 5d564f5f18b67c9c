use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::parse::{host_line_matches, parse_time, split_line};
use super::*;

/// A temp HOME with `.ssh/`, an empty system dir, and files written on demand.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home/.ssh")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        Home { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    fn user_config(&self, text: &str) -> PathBuf {
        self.write("home/.ssh/config", text)
    }
    fn resolver(&self, source: SshConfigSource) -> Resolver<'static> {
        let env: HashMap<String, String> = HashMap::from([
            ("HOME".into(), self.home().display().to_string()),
            ("USER".into(), "localme".into()),
            ("RUNTIME".into(), "/run/user/1000".into()),
        ]);
        Resolver::with_env(source, move |n| env.get(n).cloned()).system_dir(self.dir.path().join("etc"))
    }
    fn resolve(&self, host: &str) -> Result<ResolvedHost> {
        self.resolver(SshConfigSource::Standard).resolve(host)
    }
}

fn err(r: Result<ResolvedHost>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn lines_split_like_openssh() {
    let l = split_line("  Port=2222").unwrap().unwrap();
    assert_eq!((l.keyword.as_str(), l.args.clone()), ("port", vec!["2222".to_owned()]));
    let l = split_line("HostName = db.example ").unwrap().unwrap();
    assert_eq!(l.args, vec!["db.example"]);
    let l = split_line("IDENTITYFILE \"/k/my key\" 'x y'z # comment")
        .unwrap()
        .unwrap();
    assert_eq!(l.keyword, "identityfile");
    assert_eq!(l.written, "IDENTITYFILE");
    assert_eq!(l.args, vec!["/k/my key", "x yz"]);
    let l = split_line(r"User a\ b").unwrap().unwrap();
    assert_eq!(l.args, vec!["a b"]);
    assert!(split_line("# only a comment").unwrap().is_none());
    assert!(split_line("   ").unwrap().is_none());
    assert!(split_line("User \"unterminated").is_err());
}

#[test]
fn patterns_and_negation() {
    let p = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(host_line_matches("db-1.prod", &p(&["*.prod"])));
    assert!(host_line_matches("db1", &p(&["db?"])));
    assert!(!host_line_matches("db12", &p(&["db?"])));
    assert!(host_line_matches("a", &p(&["x", "a"])));
    assert!(!host_line_matches("db-1.prod", &p(&["*.prod", "!db-*"])));
    assert!(!host_line_matches("db-1.prod", &p(&["!db-*", "*.prod"])));
    // Only negated patterns: matches nothing, not "everything else".
    assert!(!host_line_matches("other", &p(&["!db"])));
    // Case-sensitive, as OpenSSH.
    assert!(!host_line_matches("DB", &p(&["db"])));
    assert_eq!(parse_time("90"), Some(90));
    assert_eq!(parse_time("1m30s"), Some(90));
    assert_eq!(parse_time("2h"), Some(7200));
    assert_eq!(parse_time("x"), None);
}

#[test]
fn first_value_wins_and_identity_files_accumulate() {
    let h = Home::new();
    h.user_config(
        "Host db\n  HostName 10.0.0.5\n  User deploy\n  IdentityFile /k/one\n\
         Host d*\n  User other\n  Port 2200\n  IdentityFile /k/two\n  HostName wrong\n\
         Host *\n  Port 22\n  User fallback\n  IdentityFile /k/three\n  ServerAliveInterval 7\n  ServerAliveCountMax 4\n  ConnectTimeout 9\n",
    );
    let r = h.resolve("db").unwrap();
    assert_eq!(r.host_name.as_deref(), Some("10.0.0.5"));
    assert_eq!(r.user.as_deref(), Some("deploy"));
    assert_eq!(r.port, Some(2200));
    assert_eq!(
        r.identity_files,
        vec![
            PathBuf::from("/k/one"),
            PathBuf::from("/k/two"),
            PathBuf::from("/k/three")
        ]
    );
    assert_eq!(r.server_alive_interval, Some(Duration::from_secs(7)));
    assert_eq!(r.server_alive_count_max, Some(4));
    assert_eq!(r.connect_timeout, Some(Duration::from_secs(9)));
    // `Host *` defaults apply to a host without its own block.
    let r = h.resolve("web").unwrap();
    assert_eq!(
        (r.user.as_deref(), r.port, r.host_name.as_deref()),
        (Some("fallback"), Some(22), None)
    );
    assert_eq!(r.dial_host(), "web");
}

#[test]
fn user_file_before_system_file_and_explicit_file_replaces_both() {
    let h = Home::new();
    h.user_config("Host db\n  Port 1\n");
    h.write("etc/ssh_config", "Host *\n  Port 2\n  User sys\n");
    let r = h.resolve("db").unwrap();
    assert_eq!((r.port, r.user.as_deref()), (Some(1), Some("sys")));
    assert_eq!(r.files.len(), 2);
    let only = h.write("other", "Host db\n  Port 3\n");
    let r = h.resolver(SshConfigSource::File(only.clone())).resolve("db").unwrap();
    assert_eq!((r.port, r.user.as_deref()), (Some(3), None));
    assert_eq!(r.files, vec![only]);
    let r = h.resolver(SshConfigSource::Disabled).resolve("db").unwrap();
    assert_eq!((r.port, r.user.as_deref(), r.files.len()), (None, None, 0));
    // An explicit file must exist; the default ones need not.
    let e = err(h.resolver(SshConfigSource::File(h.home().join("nope"))).resolve("db"));
    assert!(e.contains("does not exist") && e.contains("SSH_CONFIG"), "{e}");
    assert!(Home::new().resolve("db").is_ok());
}

#[test]
fn include_globs_relative_to_dot_ssh_and_only_in_matching_blocks() {
    let h = Home::new();
    h.write("home/.ssh/conf.d/20-b.conf", "Host b\n  Port 20\n");
    h.write(
        "home/.ssh/conf.d/10-a.conf",
        "Host a\n  Port 10\nHost b\n  User from-a-file\n",
    );
    h.write("home/.ssh/conf.d/.hidden.conf", "Host a\n  User hidden\n");
    h.write("home/.ssh/inner.conf", "Port 77\nHost zzz\n  Port 1\n");
    h.user_config("Include conf.d/*.conf\nHost c\n  Include ~/.ssh/inner.conf\n  User c-user\nHost *\n  Port 5\n");
    let r = h.resolve("a").unwrap();
    assert_eq!((r.port, r.user.as_deref()), (Some(10), None));
    let r = h.resolve("b").unwrap();
    assert_eq!((r.port, r.user.as_deref()), (Some(20), Some("from-a-file")));
    // The include applies inside `Host c`, and a Host line inside it does not end that block.
    let r = h.resolve("c").unwrap();
    assert_eq!((r.port, r.user.as_deref()), (Some(77), Some("c-user")));
    // For another host the included file's own `Host zzz` never matches either.
    let r = h.resolve("zzz").unwrap();
    assert_eq!(r.port, Some(5));
    // System includes are relative to the system dir.
    let h = Home::new();
    h.write("etc/ssh_config.d/x.conf", "Host *\n  User sysinc\n");
    h.write("etc/ssh_config", "Include ssh_config.d/*.conf\n");
    assert_eq!(h.resolve("any").unwrap().user.as_deref(), Some("sysinc"));
}

#[test]
fn tokens_tilde_and_env_are_expanded() {
    let h = Home::new();
    h.user_config(
        "Host db\n  HostName %h.internal\n  User deploy\n  Port 2022\n\
         IdentityFile ~/.ssh/id_%r@%h:%p_%n_%u_%%\n  IdentityFile %d/k\n  CertificateFile ~/c-%h\n\
         UserKnownHostsFile ~/.ssh/kh_%h %d/kh2\n  GlobalKnownHostsFile /etc/kh ~/gkh\n\
         IdentityAgent ${RUNTIME}/agent.%u\n",
    );
    let r = h.resolve("DB").unwrap();
    // Not matched: Host patterns are case-sensitive, but the dialled name is lowercased.
    assert_eq!(r.host_name, None);
    assert_eq!(r.dial_host(), "db");
    let r = h.resolve("db").unwrap();
    let home = h.home();
    assert_eq!(r.host_name.as_deref(), Some("db.internal"));
    assert_eq!(
        r.identity_files,
        vec![
            home.join(".ssh/id_deploy@db.internal:2022_db_localme_%"),
            home.join("k")
        ]
    );
    assert_eq!(r.certificate_files, vec![home.join("c-db.internal")]);
    assert_eq!(
        r.user_known_hosts_files,
        Some(vec![home.join(".ssh/kh_db.internal"), home.join("kh2")])
    );
    assert_eq!(
        r.global_known_hosts_files,
        Some(vec![PathBuf::from("/etc/kh"), home.join("gkh")])
    );
    assert_eq!(
        r.identity_agent,
        Some(IdentityAgent::Socket(PathBuf::from("/run/user/1000/agent.localme")))
    );
    // An explicit user and port (as ssh -l / -p) are what %r and %p see.
    let r = h
        .resolver(SshConfigSource::Standard)
        .user(Some("ops".into()))
        .port(Some(9))
        .resolve("db")
        .unwrap();
    assert_eq!(r.identity_files[0], home.join(".ssh/id_ops@db.internal:9_db_localme_%"));
    // An unknown token or variable names the file and line.
    h.user_config("Host db\n  IdentityFile ~/%C\n");
    let e = err(h.resolve("db"));
    assert!(e.contains("line 2") && e.contains("%C"), "{e}");
    h.user_config("Host db\n  IdentityFile ${NOPE}/k\n");
    assert!(err(h.resolve("db")).contains("NOPE"));
}

#[test]
fn identity_agent_and_strict_host_key_checking() {
    let h = Home::new();
    h.user_config(
        "Host a\n  IdentityAgent none\n  StrictHostKeyChecking accept-new\n\
         Host b\n  IdentityAgent SSH_AUTH_SOCK\n  StrictHostKeyChecking ask\n\
         Host c\n  StrictHostKeyChecking yes\n\
         Host d\n  StrictHostKeyChecking no\n\
         Host e\n  StrictHostKeyChecking sometimes\n",
    );
    let r = h.resolve("a").unwrap();
    assert_eq!(r.identity_agent, Some(IdentityAgent::Disabled));
    assert_eq!(r.host_key_policy, Some(HostKeyPolicy::AcceptNew));
    let r = h.resolve("b").unwrap();
    assert_eq!(r.identity_agent, Some(IdentityAgent::Environment));
    assert_eq!(r.host_key_policy, Some(HostKeyPolicy::Strict));
    assert_eq!(h.resolve("c").unwrap().host_key_policy, Some(HostKeyPolicy::Strict));
    // `no` is kept as an error, raised when applied without an explicit policy.
    let r = h.resolve("d").unwrap();
    let mut t = crate::config::TunnelConfig::new("d", "u");
    let e = r.apply_to(&mut t, Explicit::default()).unwrap_err().to_string();
    assert!(
        e.contains("StrictHostKeyChecking no") && e.contains("SSH_HOST_KEY_POLICY=insecure-accept-any"),
        "{e}"
    );
    assert!(e.contains("line 10") && e.contains("\"d\""), "{e}");
    let explicit = Explicit {
        policy: true,
        ..Explicit::default()
    };
    r.apply_to(&mut t, explicit).unwrap();
    assert!(err(h.resolve("e")).contains("sometimes"));
}

#[test]
fn unsupported_directives_are_errors_only_where_they_apply() {
    let h = Home::new();
    let file = h.user_config(
        "Host other\n  ProxyCommand nc %h %p\n  BindAddress 10.0.0.1\n\
         Host db\n  ProxyCommand ssh -W %h:%p jump\n\
         Host direct\n  ProxyCommand none\n  ProxyJump j1\n\
         Host jumped\n  ProxyJump alice@j1:2222,j2\n  ProxyCommand nc %h %p\n\
         Host dns\n  VerifyHostKeyDNS yes\n\
         Host dns-off\n  VerifyHostKeyDNS no\n  CanonicalizeHostname no\n",
    );
    // `other`'s ProxyCommand and BindAddress do not matter for `db`.
    let e = err(h.resolve("db"));
    assert!(e.contains("ProxyCommand is not supported"), "{e}");
    assert!(e.contains("line 5") && e.contains(&format!("{:?}", file)), "{e}");
    assert!(e.contains("\"db\""), "{e}");
    assert!(!crate::Error::is_transient(&h.resolve("db").unwrap_err()));
    // `ProxyCommand none` takes the proxy slot: the later ProxyJump is ignored, as in ssh.
    assert_eq!(h.resolve("direct").unwrap().proxy_jump, Some(vec![]));
    // ProxyJump first: the later ProxyCommand would not take effect, so it is no error.
    let r = h.resolve("jumped").unwrap();
    assert_eq!(
        r.proxy_jump,
        Some(vec![
            crate::config::JumpHost::new("j1").user("alice").port(2222),
            crate::config::JumpHost::new("j2")
        ])
    );
    assert!(err(h.resolve("dns")).contains("VerifyHostKeyDNS"));
    assert!(h.resolve("dns-off").is_ok());
}

#[test]
fn match_blocks() {
    let h = Home::new();
    h.user_config(
        "Host db\n  HostName db.internal\n\
         Match host db.internal user deploy\n  Port 2201\n\
         Match originalhost db !localuser nobody\n  User deploy\n  IdentityFile /k/m\n\
         Match final host db.internal\n  ServerAliveInterval 11\n\
         Match all\n  ConnectTimeout 3\n\
         Match host other exec \"exit 0\"\n  Port 1\n",
    );
    let r = h.resolve("db").unwrap();
    assert_eq!(r.user.as_deref(), Some("deploy"));
    // `Match host ... user deploy` comes before User is set, so the first pass (local user)
    // skips it; `Match final` asks for OpenSSH's second pass, where User is deploy.
    assert_eq!(r.port, Some(2201));
    assert_eq!(r.server_alive_interval, Some(Duration::from_secs(11)));
    assert_eq!(r.connect_timeout, Some(Duration::from_secs(3)));
    // `exec` after a failed criterion is never evaluated; reached, it is an error.
    let e = err(h.resolve("other"));
    assert!(e.contains("Match exec is not supported"), "{e}");
}

#[test]
fn ignored_unknown_and_algorithm_directives() {
    let h = Home::new();
    h.user_config(
        "Host *\n  SendEnv LANG LC_*\n  HashKnownHosts yes\n  GSSAPIAuthentication yes\n  ForwardAgent yes\n\
         AddKeysToAgent yes\n  ControlMaster auto\n  ControlPath ~/.ssh/cm-%r@%h:%p\n  ControlPersist 10m\n\
         SetEnv A=b\n  UseKeychain yes\n  LogLevel ERROR\n  Ciphers +aes128-ctr\n  KexAlgorithms ^curve25519-sha256\n",
    );
    assert!(h.resolve("x").is_ok());
    h.user_config("Host x\n  FrobnicateWidgets yes\n");
    let e = err(h.resolve("x"));
    assert!(e.contains("FrobnicateWidgets") && e.contains("IgnoreUnknown"), "{e}");
    assert!(h.resolve("y").is_ok(), "an unknown keyword elsewhere is no error");
    h.user_config("IgnoreUnknown Frob*\nHost x\n  FrobnicateWidgets yes\n");
    assert!(h.resolve("x").is_ok());
    // A host key algorithm list the tunnel's offer does not obey is refused (trust) ...
    h.user_config("Host x\n  HostKeyAlgorithms ssh-ed25519\n");
    let e = err(h.resolve("x"));
    assert!(
        e.contains("HostKeyAlgorithms") && e.contains("ecdsa-sha2-nistp256"),
        "{e}"
    );
    h.user_config("Host x\n  HostKeyAlgorithms ssh-ed25519,ecdsa-sha2-*,rsa-sha2-*,ssh-rsa\n");
    assert!(h.resolve("x").is_ok());
    h.user_config("Host x\n  HostKeyAlgorithms -ssh-ed25519\n");
    assert!(err(h.resolve("x")).contains("ssh-ed25519"));
    // ... transport lists are not (RHEL's crypto-policies exclude some of russh's key exchanges,
    // inside `Match final all`).
    h.write(
        "etc/crypto.config",
        "Ciphers aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes128-gcm@openssh.com,aes128-ctr\n\
         KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org,diffie-hellman-group16-sha512\n\
         MACs hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com\n\
         GSSAPIKexAlgorithms gss-curve25519-sha256-\n  PubkeyAcceptedAlgorithms ssh-ed25519\n\
         CASignatureAlgorithms ssh-ed25519\n  RequiredRSASize 2048\n",
    );
    h.write(
        "etc/ssh_config",
        "Include ssh_config.d/*.conf\nHost *\n  SendEnv LANG\n",
    );
    h.write(
        "etc/ssh_config.d/50-redhat.conf",
        &format!(
            "Match final all\n  Include {}\n  GSSAPIAuthentication yes\n  ForwardX11Trusted yes\n",
            h.dir.path().join("etc/crypto.config").display()
        ),
    );
    h.user_config("Host x\n  Ciphers *\n  MACs -hmac-sha1*\n");
    assert!(h.resolve("x").is_ok());
    assert!(h.resolve("y").is_ok());
}

#[test]
fn writable_user_config_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    let p = h.user_config("Host *\n  Port 2\n");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = err(h.resolve("x"));
    assert!(e.contains("permissions"), "{e}");
    // An explicit file (ssh -F) is not checked, as in ssh.
    assert!(h.resolver(SshConfigSource::File(p)).resolve("x").is_ok());
}

#[test]
fn apply_to_respects_explicit_values() {
    let h = Home::new();
    let key = h.write("home/.ssh/k1", "not read here");
    h.user_config(&format!(
        "Host db\n  HostName 10.1.2.3\n  Port 2222\n  User deploy\n  IdentityFile /missing\n  IdentityFile {}\n\
         ProxyJump j1\n  HostKeyAlias dbkey\n  UserKnownHostsFile /kh/a /kh/b\n  GlobalKnownHostsFile /kh/g\n",
        key.display()
    ));
    let r = h.resolve("db").unwrap();
    assert_eq!(r.keys(false), Some((Some(key.clone()), vec![])));
    let mut t = crate::config::TunnelConfig::new("db", "");
    r.apply_to(&mut t, Explicit::default()).unwrap();
    assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("10.1.2.3", 2222, "deploy"));
    assert_eq!(t.ssh_alias.as_deref(), Some("db"));
    assert_eq!(t.known_hosts, Path::new("/kh/a"));
    assert_eq!(
        t.extra_known_hosts,
        vec![PathBuf::from("/kh/b"), PathBuf::from("/kh/g")]
    );
    assert_eq!(t.host_key_alias.as_deref(), Some("dbkey"));
    assert_eq!(t.proxy_jump.len(), 1);
    let mut t = crate::config::TunnelConfig::new("db", "me").port(2);
    let explicit = Explicit {
        port: true,
        user: true,
        known_hosts: true,
        proxy_jump: true,
        ..Explicit::default()
    };
    r.apply_to(&mut t, explicit).unwrap();
    assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("10.1.2.3", 2, "me"));
    assert!(t.proxy_jump.is_empty());
    assert_eq!(t.extra_known_hosts, vec![PathBuf::from("/kh/g")]);
}

#[test]
fn final_pass_adds_identity_files_without_repeating_them() {
    let h = Home::new();
    h.user_config(
        "Host db\n  HostName 10.0.0.1\n  IdentityFile /k/db\nMatch final host *.x\n  Port 1\n\
         Host 10.0.0.1\n  IdentityFile /k/final\nHost *\n  IdentityFile /k/all\n  IdentityFile /k/db\n",
    );
    // As `ssh -G db`: the final pass matches `Host 10.0.0.1`; repeated paths are kept once.
    let r = h.resolve("db").unwrap();
    assert_eq!(
        r.identity_files,
        vec![
            PathBuf::from("/k/db"),
            PathBuf::from("/k/all"),
            PathBuf::from("/k/final")
        ]
    );
}
