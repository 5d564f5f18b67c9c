//! Every case runs against keys and files made by the real OpenSSH `ssh-keygen`.

use std::process::Command;
use std::sync::Mutex;

use super::*;

/// A scratch directory with keys made by `ssh-keygen`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh host key of `kind` (`ed25519`, `ecdsa`, `rsa`), as ssh-keygen writes it.
    fn key(&self, name: &str, kind: &str) -> PublicKey {
        let private = self.path(name);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", "", "-C", "test@host", "-f"])
            .arg(&private);
        if kind == "rsa" {
            cmd.args(["-b", "2048"]);
        }
        run(&mut cmd);
        PublicKey::read_openssh_file(private.with_extension("pub")).expect("ssh-keygen wrote a public key")
    }

    /// The `.pub` text (`type base64 comment`) of a key made by [`Scratch::key`].
    fn pub_text(&self, name: &str) -> String {
        fs::read_to_string(self.path(name).with_extension("pub"))
            .expect("read .pub")
            .trim_end()
            .to_owned()
    }

    fn write_known_hosts(&self, contents: &str) -> PathBuf {
        let path = self.path("known_hosts");
        fs::write(&path, contents).expect("write known_hosts");
        path
    }

    fn verifier(&self, policy: HostKeyPolicy) -> HostKeyVerifier {
        HostKeyVerifier::new(policy, self.path("known_hosts"))
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("ssh-keygen is installed (openssh-client)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn strict() -> HostKeyPolicy {
    HostKeyPolicy::Strict
}

#[track_caller]
fn assert_unknown(result: Result<()>) {
    assert!(
        matches!(result, Err(Error::HostKeyUnknown { .. })),
        "expected HostKeyUnknown, got {result:?}"
    );
}

#[track_caller]
fn assert_changed(result: Result<()>) {
    assert!(
        matches!(result, Err(Error::HostKeyChanged { .. })),
        "expected HostKeyChanged, got {result:?}"
    );
}

#[test]
fn fingerprint_matches_ssh_keygen_l() {
    let s = Scratch::new();
    for (name, kind) in [("ed", "ed25519"), ("ec", "ecdsa"), ("rsa", "rsa")] {
        let key = s.key(name, kind);
        let listed = run(Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(s.path(name).with_extension("pub")));
        let expected = listed.split_whitespace().nth(1).expect("fingerprint column");
        assert_eq!(fingerprint(&key), expected, "{kind}");
    }
}

#[test]
fn strict_accepts_a_listed_key_and_rejects_an_unlisted_host() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    s.write_known_hosts(&format!("bastion.example.com {}\n", s.pub_text("host")));
    let v = s.verifier(strict());
    v.verify("bastion.example.com", 22, &key)
        .expect("listed key is accepted");
    // Host names are matched without regard to ASCII case, like OpenSSH.
    v.verify("Bastion.Example.COM", 22, &key)
        .expect("case-insensitive host match");
    let err = v.verify("other.example.com", 22, &key).unwrap_err();
    match &err {
        Error::HostKeyUnknown {
            host,
            fingerprint: fp,
            known_hosts,
        } => {
            assert_eq!(host, "other.example.com");
            assert_eq!(fp, &fingerprint(&key));
            assert_eq!(known_hosts, &s.path("known_hosts"));
        }
        other => panic!("expected HostKeyUnknown, got {other:?}"),
    }
    assert!(!err.is_transient());
}

#[test]
fn strict_with_missing_file_is_unknown_not_a_crash() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    assert_unknown(s.verifier(strict()).verify("127.0.0.1", 22, &key));
    assert!(!s.path("known_hosts").exists(), "strict never creates the file");
}

#[test]
fn unreadable_file_is_a_file_error() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    // A directory where the file should be: reading fails with something other than NotFound
    // (permission bits cannot make a file unreadable when the tests run as root).
    fs::create_dir(s.path("known_hosts")).unwrap();
    for policy in [strict(), HostKeyPolicy::AcceptNew] {
        let result = s.verifier(policy).verify("127.0.0.1", 22, &key);
        match result {
            Err(Error::File { what, path, .. }) => {
                assert_eq!(what, "known_hosts file");
                assert_eq!(path, s.path("known_hosts"));
            }
            other => panic!("expected a File error, got {other:?}"),
        }
    }
}

#[test]
fn rotation_two_keys_of_one_type_where_one_matches_is_accepted() {
    let s = Scratch::new();
    let old = s.key("old", "ed25519");
    let new = s.key("new", "ed25519");
    s.write_known_hosts(&format!(
        "bastion {}\nbastion {}\n",
        s.pub_text("old"),
        s.pub_text("new")
    ));
    let v = s.verifier(strict());
    v.verify("bastion", 22, &old).expect("old key still accepted");
    v.verify("bastion", 22, &new).expect("new key accepted (rotation)");
}

#[test]
fn a_different_key_of_the_same_type_is_changed_and_names_both_fingerprints() {
    let s = Scratch::new();
    let listed = s.key("listed", "ed25519");
    let presented = s.key("presented", "ed25519");
    let other_type = s.key("ecdsa", "ecdsa");
    s.write_known_hosts(&format!(
        "# header\n[bastion]:2222 {}\n[bastion]:2222 {}\n",
        s.pub_text("ecdsa"),
        s.pub_text("listed")
    ));
    for policy in [strict(), HostKeyPolicy::AcceptNew] {
        let before = fs::read(s.path("known_hosts")).unwrap();
        let err = s
            .verifier(policy.clone())
            .verify("bastion", 2222, &presented)
            .unwrap_err();
        match &err {
            Error::HostKeyChanged {
                host,
                expected,
                actual,
                source_of_expected,
            } => {
                assert_eq!(host, "[bastion]:2222");
                assert_eq!(expected, &fingerprint(&listed), "only same-type keys are expected");
                assert_ne!(expected, &fingerprint(&other_type));
                assert_eq!(actual, &fingerprint(&presented));
                assert!(
                    source_of_expected.contains("known_hosts (line 3)"),
                    "{source_of_expected}"
                );
            }
            other => panic!("{policy:?}: expected HostKeyChanged, got {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(&fingerprint(&listed)) && message.contains(&fingerprint(&presented)));
        assert!(!err.is_transient());
        assert_eq!(
            fs::read(s.path("known_hosts")).unwrap(),
            before,
            "{policy:?} left the file untouched"
        );
    }
}

#[test]
fn a_host_known_only_with_other_key_types_has_a_changed_key_as_in_openssh() {
    // OpenSSH 9 (`check_hostkeys_by_key_or_type`): any other key on record for the host makes the
    // presented one "changed" ("Offending ECDSA key"), under strict and accept-new alike.
    let s = Scratch::new();
    s.key("ecdsa", "ecdsa");
    let ed = s.key("ed", "ed25519");
    s.write_known_hosts(&format!("bastion {}\n", s.pub_text("ecdsa")));
    for policy in [strict(), HostKeyPolicy::AcceptNew] {
        assert_changed(s.verifier(policy).verify("bastion", 22, &ed));
    }
    assert_eq!(
        fs::read_to_string(s.path("known_hosts")).unwrap().lines().count(),
        1,
        "nothing learned"
    );
    // The key exchange is steered to the type on record instead.
    let known = s.verifier(strict()).known_key_algorithms("bastion", 22);
    assert_eq!(
        known,
        vec![Algorithm::Ecdsa {
            curve: russh::keys::EcdsaCurve::NistP256
        }]
    );
    assert!(s.verifier(strict()).known_key_algorithms("elsewhere", 22).is_empty());
    // Both types on record: either is accepted.
    s.write_known_hosts(&format!(
        "bastion {}\nbastion {}\n",
        s.pub_text("ecdsa"),
        s.pub_text("ed")
    ));
    s.verifier(strict()).verify("bastion", 22, &ed).unwrap();
}

#[test]
fn revoked_key_is_rejected_even_when_another_line_accepts_it() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    let pub_text = s.pub_text("host");
    // The accepting line comes first: revocation must still win.
    s.write_known_hosts(&format!("bastion {pub_text}\n@revoked bastion {pub_text}\n"));
    for policy in [strict(), HostKeyPolicy::AcceptNew] {
        match s.verifier(policy).verify("bastion", 22, &key) {
            Err(Error::HostKeyRevoked {
                host, fingerprint: fp, ..
            }) => {
                assert_eq!(host, "bastion");
                assert_eq!(fp, fingerprint(&key));
            }
            other => panic!("expected HostKeyRevoked, got {other:?}"),
        }
    }
    // A wildcard revocation applies to every host; other keys are unaffected by it.
    s.write_known_hosts(&format!(
        "@revoked\t* {pub_text}\nbastion {pub_text}\nbastion {}\n",
        s.pub_text("other")
    ));
    let v = s.verifier(strict());
    assert!(matches!(
        v.verify("bastion", 22, &key),
        Err(Error::HostKeyRevoked { .. })
    ));
    v.verify("bastion", 22, &other).expect("an unrevoked key is accepted");
}

#[test]
fn cert_authority_lines_do_not_match_plain_keys() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    s.write_known_hosts(&format!("@cert-authority bastion {}\n", s.pub_text("host")));
    assert_unknown(s.verifier(strict()).verify("bastion", 22, &key));
}

#[test]
fn tab_separated_and_padded_lines_are_read() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let pub_text = s.pub_text("host");
    let (kind, rest) = pub_text.split_once(' ').unwrap();
    s.write_known_hosts(&format!("  \tbastion\t\t{kind}\t{rest}\r\n"));
    s.verifier(strict())
        .verify("bastion", 22, &key)
        .expect("tabs, indentation and CRLF");
}

#[test]
fn wildcards_and_negation() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    s.write_known_hosts(&format!(
        "*.example.com,!bad.example.com {pk}\n127.0.0.? {pk}\n[10.0.*]:2222 {pk}\n",
        pk = s.pub_text("host")
    ));
    let v = s.verifier(strict());
    v.verify("db.example.com", 22, &key).expect("* matches a label");
    v.verify("a.b.example.com", 22, &key)
        .expect("* spans dots, like OpenSSH");
    assert_unknown(v.verify("bad.example.com", 22, &key));
    assert_unknown(v.verify("example.com", 22, &key));
    v.verify("127.0.0.1", 22, &key).expect("? matches one character");
    assert_unknown(v.verify("127.0.0.10", 22, &key));
    // `[127.0.0.1]:2222` matches no line, so the port-less name is tried, and `127.0.0.?` holds it.
    v.verify("127.0.0.1", 2222, &key)
        .expect("port-less fallback through a wildcard, as OpenSSH");
    assert_unknown(v.verify("127.0.0.10", 2222, &key));
    v.verify("10.0.3.4", 2222, &key).expect("wildcard inside [host]:port");
    assert_unknown(v.verify("10.0.3.4", 22, &key));
    assert_unknown(v.verify("10.0.3.4", 2200, &key));
}

#[test]
fn negation_excludes_the_line_even_when_it_comes_last() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    s.write_known_hosts(&format!("*,!bastion {}\n", s.pub_text("host")));
    let v = s.verifier(strict());
    v.verify("elsewhere", 22, &key).expect("positive wildcard");
    assert_unknown(v.verify("bastion", 22, &key));
}

#[test]
fn bracketed_port_entries_only_match_their_port_and_plain_ones_only_where_the_port_has_none() {
    let s = Scratch::new();
    let k2222 = s.key("a", "ed25519");
    let k22 = s.key("b", "ed25519");
    s.write_known_hosts(&format!(
        "[127.0.0.1]:2222 {}\n127.0.0.1 {}\n",
        s.pub_text("a"),
        s.pub_text("b")
    ));
    let v = s.verifier(strict());
    v.verify("127.0.0.1", 2222, &k2222).unwrap();
    v.verify("127.0.0.1", 22, &k22).unwrap();
    // Each port with a record of its own: the other port's key is a changed key, not a match,
    // and the plain line does not rescue it (OpenSSH falls back only when the port has none).
    assert_changed(v.verify("127.0.0.1", 2222, &k22));
    assert_changed(v.verify("127.0.0.1", 22, &k2222));
    // Port 2200 has no record: the plain line is consulted and holds k22, not k2222.
    v.verify("127.0.0.1", 2200, &k22)
        .expect("found matching key w/out port");
    assert_unknown(v.verify("127.0.0.1", 2200, &k2222));
}

/// OpenSSH's `check_host_key`: `[host]:port` first; only when it knows no key of this type
/// (`HOST_NEW`) is the plain name tried, and only an accepting plain line counts.
#[test]
fn port_less_fallback_decision_table() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    s.key("other", "ed25519");
    s.key("ec", "ecdsa");
    let (pk, po, pe) = (s.pub_text("host"), s.pub_text("other"), s.pub_text("ec"));
    enum Want {
        Ok,
        Unknown,
        Changed,
        Revoked,
    }
    let cases = [
        ("plain line holds the key", format!("bastion {pk}\n"), Want::Ok),
        ("plain line, other key", format!("bastion {po}\n"), Want::Unknown),
        (
            "port-ful line holds another key",
            format!("[bastion]:2222 {po}\nbastion {pk}\n"),
            Want::Changed,
        ),
        (
            "port-ful line holds another type only",
            format!("[bastion]:2222 {pe}\nbastion {pk}\n"),
            Want::Changed,
        ),
        (
            "other port's line only",
            format!("[bastion]:2200 {pk}\n"),
            Want::Unknown,
        ),
        ("hashed plain name", String::new(), Want::Ok),
        ("wildcard plain", format!("bast*,!x {pk}\n"), Want::Ok),
        ("negated plain", format!("bast*,!bastion {pk}\n"), Want::Unknown),
        ("a bare * also matches the port-ful name", format!("* {pk}\n"), Want::Ok),
        (
            "revoked under the plain name",
            format!("bastion {pk}\n@revoked bastion {pk}\n"),
            Want::Revoked,
        ),
        (
            "revoked under the port-ful name",
            format!("bastion {pk}\n@revoked [bastion]:2222 {pk}\n"),
            Want::Revoked,
        ),
        (
            "CA line is not a key",
            format!("@cert-authority bastion {pk}\n"),
            Want::Unknown,
        ),
    ];
    for (what, contents, want) in cases {
        let contents = if contents.is_empty() {
            let path = s.write_known_hosts(&format!("bastion {pk}\n"));
            run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&path));
            fs::read_to_string(&path).unwrap()
        } else {
            contents
        };
        s.write_known_hosts(&contents);
        let result = s.verifier(strict()).verify("bastion", 2222, &key);
        let ok = match want {
            Want::Ok => result.is_ok(),
            Want::Unknown => matches!(&result, Err(Error::HostKeyUnknown { host, .. }) if host == "[bastion]:2222"),
            Want::Changed => matches!(&result, Err(Error::HostKeyChanged { host, .. }) if host == "[bastion]:2222"),
            Want::Revoked => matches!(result, Err(Error::HostKeyRevoked { .. })),
        };
        assert!(ok, "{what}: {contents:?} -> {result:?}");
    }
}

#[test]
fn accept_new_after_a_failed_fallback_learns_the_port_ful_name() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    let path = s.write_known_hosts(&format!("bastion {}\n", s.pub_text("other")));
    HostKeyVerifier::new(HostKeyPolicy::AcceptNew, path.clone())
        .verify("bastion", 2222, &key)
        .expect("OpenSSH learns `[bastion]:2222` here");
    let contents = fs::read_to_string(&path).unwrap();
    assert!(
        contents.ends_with(&format!("{}\n", known_hosts_line("bastion", 2222, &key))),
        "{contents}"
    );
    // The plain line is untouched and still holds the other key for port 22.
    s.verifier(strict()).verify("bastion", 22, &other).unwrap();
    assert_changed(s.verifier(strict()).verify("bastion", 22, &key));
}

#[test]
fn host_key_alias_replaces_the_name_and_disables_the_fallback() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let pk = s.pub_text("host");
    s.write_known_hosts(&format!("db-bastion {pk}\n10.9.9.9 {pk}\n"));
    let alias = |policy| s.verifier(policy).with_alias(Some("DB-Bastion".into()));
    alias(strict())
        .verify("10.0.0.1", 2222, &key)
        .expect("the alias' line, port ignored");
    alias(strict()).verify("10.0.0.1", 22, &key).expect("port 22 too");
    // Without the alias the real name is looked up.
    assert_unknown(s.verifier(strict()).verify("10.0.0.1", 2222, &key));
    // An alias with no line: no fallback to the host's own (plain) line.
    let none = s.verifier(strict()).with_alias(Some("nowhere".into()));
    match none.verify("10.9.9.9", 2222, &key) {
        Err(Error::HostKeyUnknown { host, .. }) => assert_eq!(host, "nowhere"),
        other => panic!("{other:?}"),
    }
    // accept-new records the alias, without a port.
    s.write_known_hosts("");
    alias(HostKeyPolicy::AcceptNew).verify("10.0.0.1", 2222, &key).unwrap();
    let contents = fs::read_to_string(s.path("known_hosts")).unwrap();
    assert!(contents.starts_with("db-bastion ssh-ed25519 "), "{contents}");
}

#[test]
fn extra_known_hosts_files_are_read_but_never_written() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    let global = s.path("ssh_known_hosts");
    fs::write(&global, format!("[bastion]:2222 {}\n", s.pub_text("host"))).unwrap();
    let missing = s.path("does-not-exist");
    let with_extra = |policy| {
        s.verifier(policy)
            .with_extra_known_hosts(vec![missing.clone(), global.clone()])
    };
    with_extra(strict())
        .verify("bastion", 2222, &key)
        .expect("found in the extra file");
    assert_unknown(s.verifier(strict()).verify("bastion", 2222, &key));
    // A changed key names the extra file's line.
    match with_extra(strict()).verify("bastion", 2222, &other) {
        Err(Error::HostKeyChanged { source_of_expected, .. }) => {
            assert!(
                source_of_expected.contains("ssh_known_hosts (line 1)"),
                "{source_of_expected}"
            );
        }
        other => panic!("{other:?}"),
    }
    // accept-new learns an unknown host into known_hosts, never into the extra file.
    let before = fs::read_to_string(&global).unwrap();
    with_extra(HostKeyPolicy::AcceptNew)
        .verify("elsewhere", 2222, &key)
        .unwrap();
    assert_eq!(fs::read_to_string(&global).unwrap(), before);
    assert!(
        fs::read_to_string(s.path("known_hosts"))
            .unwrap()
            .starts_with("[elsewhere]:2222 ")
    );
    // A revocation in an extra file applies to the main file's key.
    fs::write(&global, format!("@revoked * {}\n", s.pub_text("host"))).unwrap();
    match with_extra(strict()).verify("elsewhere", 2222, &key) {
        Err(Error::HostKeyRevoked { known_hosts, .. }) => assert_eq!(known_hosts, global),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hashed_names_written_by_ssh_keygen_h() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    let path = s.write_known_hosts(&format!(
        "bastion.example.com {pk}\n[127.0.0.1]:2222 {pk}\n",
        pk = s.pub_text("host")
    ));
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&path));
    let hashed = fs::read_to_string(&path).unwrap();
    assert!(
        !hashed.contains("bastion") && !hashed.contains("127.0.0.1"),
        "names are hashed:\n{hashed}"
    );
    assert_eq!(hashed.lines().filter(|l| l.starts_with("|1|")).count(), 2);

    let v = s.verifier(strict());
    v.verify("bastion.example.com", 22, &key).expect("hashed plain name");
    v.verify("BASTION.example.com", 22, &key)
        .expect("lookup name is lower-cased before hashing");
    v.verify("127.0.0.1", 2222, &key).expect("hashed [host]:port");
    assert_unknown(v.verify("127.0.0.1", 22, &key));
    assert_unknown(v.verify("bastion.example.org", 22, &key));
    assert_changed(v.verify("bastion.example.com", 22, &other));
}

#[test]
fn comments_blank_and_malformed_lines_are_skipped() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let pub_text = s.pub_text("host");
    let (kind, b64) = pub_text.split_once(' ').unwrap();
    let b64 = b64.split_whitespace().next().unwrap();
    s.write_known_hosts(&format!(
        "# a comment\n\n   \n\
         bastion 2048 35 1234567890\n\
         bastion ssh-ed25519 !!!notbase64!!!\n\
         bastion ssh-rsa {b64}\n\
         @bogus-marker bastion {pub_text}\n\
         bastion\n\
         |1|bad|hash {pub_text}\n\
         bastion {kind} {b64} trailing # comment with, commas\n"
    ));
    // Lines with invalid UTF-8 are only malformed lines.
    let mut bytes = fs::read(s.path("known_hosts")).unwrap();
    bytes.splice(0..0, b"\xff\xfe bastion junk\n".iter().copied());
    fs::write(s.path("known_hosts"), bytes).unwrap();
    s.verifier(strict())
        .verify("bastion", 22, &key)
        .expect("the one good line is found");
}

#[test]
fn accept_new_appends_exactly_one_line_then_strict_accepts() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    // A directory that does not exist yet, as for a first `~/.ssh`.
    let path = s.path("home/.ssh/known_hosts");
    let v = HostKeyVerifier::new(HostKeyPolicy::AcceptNew, path.clone());
    v.verify("127.0.0.1", 2222, &key).expect("unknown host is learned");
    v.verify("127.0.0.1", 2222, &key).expect("second verify finds it");

    let contents = fs::read_to_string(&path).unwrap();
    assert_eq!(contents, format!("{}\n", known_hosts_line("127.0.0.1", 2222, &key)));
    assert_eq!(contents.lines().count(), 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let dir_mode = fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(file_mode, 0o600);
        assert_eq!(dir_mode, 0o700);
    }
    HostKeyVerifier::new(strict(), path.clone())
        .verify("127.0.0.1", 2222, &key)
        .expect("strict accepts it");
    // OpenSSH itself finds the entry we wrote.
    let found = run(Command::new("ssh-keygen")
        .args(["-F", "[127.0.0.1]:2222", "-f"])
        .arg(&path));
    assert!(found.contains(&known_hosts_line("127.0.0.1", 2222, &key)), "{found}");
}

#[test]
fn accept_new_starts_a_new_line_when_the_file_lacks_a_final_newline() {
    let s = Scratch::new();
    let a = s.key("a", "ed25519");
    let b = s.key("b", "ed25519");
    s.write_known_hosts(&format!("alpha {}", s.pub_text("a")));
    s.verifier(HostKeyPolicy::AcceptNew).verify("beta", 22, &b).unwrap();
    let contents = fs::read_to_string(s.path("known_hosts")).unwrap();
    assert_eq!(contents.lines().count(), 2, "{contents}");
    let v = s.verifier(strict());
    v.verify("alpha", 22, &a).unwrap();
    v.verify("beta", 22, &b).unwrap();
}

#[test]
fn accept_new_from_many_threads_writes_one_line() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let v = s.verifier(HostKeyPolicy::AcceptNew);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| v.verify("bastion", 2222, &key).unwrap());
        }
    });
    let contents = fs::read_to_string(s.path("known_hosts")).unwrap();
    assert_eq!(contents.lines().count(), 1, "{contents}");
}

#[test]
fn known_hosts_line_format() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let pub_text = s.pub_text("host");
    let without_comment = pub_text.strip_suffix(" test@host").unwrap();
    assert_eq!(
        known_hosts_line("Bastion", 22, &key),
        format!("bastion {without_comment}")
    );
    assert_eq!(
        known_hosts_line("127.0.0.1", 2222, &key),
        format!("[127.0.0.1]:2222 {without_comment}")
    );
    assert_eq!(
        known_hosts_line("::1", 2222, &key),
        format!("[::1]:2222 {without_comment}")
    );
    assert_eq!(known_hosts_line("[::1]", 22, &key), format!("::1 {without_comment}"));
}

#[test]
fn rsa_and_ecdsa_keys() {
    let s = Scratch::new();
    let rsa = s.key("rsa", "rsa");
    let rsa2 = s.key("rsa2", "rsa");
    let ec = s.key("ec", "ecdsa");
    s.write_known_hosts(&format!(
        "bastion {}\nbastion {}\n",
        s.pub_text("rsa"),
        s.pub_text("ec")
    ));
    let v = s.verifier(strict());
    v.verify("bastion", 22, &rsa).unwrap();
    v.verify("bastion", 22, &ec).unwrap();
    assert_changed(v.verify("bastion", 22, &rsa2));
}

#[test]
fn pinned_fingerprint() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    let listed = run(Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(s.path("host").with_extension("pub")));
    let pin = listed.split_whitespace().nth(1).unwrap().to_owned();
    let v = HostKeyVerifier::new(HostKeyPolicy::Fingerprint(pin.clone()), s.path("no/such/known_hosts"));
    v.verify("bastion", 22, &key).expect("pinned fingerprint matches");
    HostKeyVerifier::new(HostKeyPolicy::Fingerprint(format!(" {pin}= ")), s.path("x"))
        .verify("bastion", 22, &key)
        .expect("surrounding space and base64 padding are tolerated");

    match v.verify("bastion", 2222, &other) {
        Err(Error::HostKeyChanged {
            host,
            expected,
            actual,
            source_of_expected,
        }) => {
            assert_eq!(host, "[bastion]:2222");
            assert_eq!(expected, pin);
            assert_eq!(actual, fingerprint(&other));
            assert!(source_of_expected.contains("pinned"));
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    assert!(!s.path("no").exists(), "a pinned fingerprint never touches known_hosts");

    let md5 = run(Command::new("ssh-keygen")
        .args(["-l", "-E", "md5", "-f"])
        .arg(s.path("host").with_extension("pub")));
    let md5 = md5.split_whitespace().nth(1).unwrap().to_owned();
    let bare = pin.strip_prefix("SHA256:").unwrap().to_owned();
    let sha512 = key.fingerprint(HashAlg::Sha512).to_string();
    for bad in [md5, bare, sha512, "SHA256:tooshort".to_owned(), String::new()] {
        let result = HostKeyVerifier::new(HostKeyPolicy::Fingerprint(bad.clone()), s.path("x")).verify("b", 22, &key);
        assert!(
            matches!(result, Err(Error::Config { .. })),
            "{bad:?} must be rejected as config, got {result:?}"
        );
    }
}

#[test]
fn insecure_accept_any_accepts_without_reading_known_hosts() {
    let s = Scratch::new();
    let key = s.key("host", "ed25519");
    let other = s.key("other", "ed25519");
    s.write_known_hosts(&format!("bastion {}\n", s.pub_text("other")));
    let before = fs::read(s.path("known_hosts")).unwrap();
    let v = s.verifier(HostKeyPolicy::InsecureAcceptAny);
    v.verify("bastion", 22, &key).expect("any key");
    v.verify("bastion", 22, &other).expect("any key");
    assert_eq!(fs::read(s.path("known_hosts")).unwrap(), before);
}

#[test]
fn glob_semantics() {
    let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
    assert!(m("*", ""));
    assert!(m("*", "anything"));
    assert!(m("a*b*c", "aXXbYYc"));
    assert!(m("a*b*c", "abbbc"));
    assert!(!m("a*b*c", "aXXbYY"));
    assert!(m("??", "ab"));
    assert!(!m("??", "abc"));
    assert!(m("*.Example.com", "db.example.COM"));
    assert!(!m("", "x"));
    assert!(m("", ""));
}

#[test]
fn hashed_name_matches_our_own_hmac() {
    // Cross-check against an entry hashed by ssh-keygen for a name given with -F's lookup rules.
    let s = Scratch::new();
    let _ = s.key("host", "ed25519");
    let path = s.write_known_hosts(&format!("[::1]:2222 {}\n", s.pub_text("host")));
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&path));
    let hashed = fs::read_to_string(&path).unwrap();
    let entry = parse_line(hashed.lines().next().unwrap(), 1).expect("hashed line parses");
    assert!(matches!(entry.host_patterns(), HostPatterns::HashedName { .. }));
    assert!(host_matches(entry.host_patterns(), &lookup_name("::1", 2222)));
    assert!(!host_matches(entry.host_patterns(), &lookup_name("::1", 22)));
}

/// The host key a server presents over the wire, exactly as russh hands it to `check_server_key`.
async fn wire_host_key(addr: std::net::SocketAddr) -> PublicKey {
    use russh::keys::PublicKeyOrCertificate;
    use std::sync::Arc;

    struct Capture(Arc<Mutex<Option<PublicKey>>>);
    impl russh::client::Handler for Capture {
        type Error = russh::Error;
        async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> std::result::Result<bool, Self::Error> {
            if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
                *self.0.lock().unwrap() = Some(key.clone());
            }
            // Stop after the key exchange: only the key is wanted.
            Ok(false)
        }
    }

    let slot = Arc::new(Mutex::new(None));
    let config = Arc::new(russh::client::Config::default());
    let attempt = russh::client::connect(config, addr, Capture(slot.clone()));
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), attempt)
        .await
        .expect("key exchange with sshd finished in time");
    assert!(result.is_err(), "rejecting the key must abort the connection");
    slot.lock().unwrap().take().expect("sshd presented a plain host key")
}

fn keyscan(port: u16) -> String {
    run(Command::new("ssh-keyscan").args(["-T", "20", "-p", &port.to_string(), "127.0.0.1"]))
}

#[tokio::test]
async fn real_sshd_key_from_the_wire_against_ssh_keyscan_output() {
    let sshd = crate::testkit::OpenSshd::start().await.expect("start sshd");
    let port = sshd.port();
    let s = Scratch::new();
    let key = wire_host_key(sshd.addr()).await;
    assert_eq!(fingerprint(&key), sshd.host_key_fingerprint());

    // What `ssh-keyscan` prints is what we would have written ourselves.
    let scanned = keyscan(port);
    let scanned_lines: Vec<&str> = scanned.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        scanned_lines,
        [known_hosts_line("127.0.0.1", port, &key).as_str()],
        "{scanned}"
    );

    let path = s.write_known_hosts(&scanned);
    let v = s.verifier(strict());
    v.verify("127.0.0.1", port, &key)
        .expect("keyscan entry accepts the wire key");
    assert_unknown(v.verify("127.0.0.1", 22, &key));
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&path));
    v.verify("127.0.0.1", port, &key)
        .expect("hashed keyscan entry accepts the wire key");

    // The server's key changes: every verifying policy refuses, naming both keys.
    sshd.rotate_host_key().await.expect("rotate host key");
    let rotated = wire_host_key(sshd.addr()).await;
    assert_ne!(fingerprint(&rotated), fingerprint(&key));
    let before = fs::read(&path).unwrap();
    for policy in [
        strict(),
        HostKeyPolicy::AcceptNew,
        HostKeyPolicy::Fingerprint(fingerprint(&key)),
    ] {
        match s.verifier(policy.clone()).verify("127.0.0.1", port, &rotated) {
            Err(Error::HostKeyChanged {
                host, expected, actual, ..
            }) => {
                assert_eq!(host, format!("[127.0.0.1]:{port}"));
                assert_eq!(expected, fingerprint(&key));
                assert_eq!(actual, fingerprint(&rotated));
            }
            other => panic!("{policy:?}: expected HostKeyChanged, got {other:?}"),
        }
    }
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a changed key never edits known_hosts"
    );

    // accept-new learns the server into an empty file; strict and OpenSSH's own lookup then find it.
    let fresh = s.path("fresh/known_hosts");
    HostKeyVerifier::new(HostKeyPolicy::AcceptNew, fresh.clone())
        .verify("127.0.0.1", port, &rotated)
        .unwrap();
    HostKeyVerifier::new(strict(), fresh.clone())
        .verify("127.0.0.1", port, &rotated)
        .unwrap();
    let written = fs::read_to_string(&fresh).unwrap();
    let rescanned = keyscan(port);
    assert!(
        rescanned.lines().any(|l| format!("{l}\n") == written),
        "{written} vs {rescanned}"
    );
}

/// Host certificates made by `ssh-keygen -s`, checked without a server.
mod certificates {
    use super::*;

    /// Signs `Scratch` key `name` with CA `ca` and returns the certificate.
    fn sign(s: &Scratch, ca: &str, name: &str, principals: &str, validity: &str, host: bool) -> Certificate {
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-s"])
            .arg(s.path(ca))
            .args(["-I", "test-id", "-z", "7", "-V", validity]);
        if !principals.is_empty() {
            cmd.args(["-n", principals]);
        }
        if host {
            cmd.arg("-h");
        }
        run(cmd.arg(s.path(name).with_extension("pub")));
        let mut cert_path = s.path(name).into_os_string();
        cert_path.push("-cert.pub");
        Certificate::read_file(Path::new(&cert_path)).expect("ssh-keygen wrote a certificate")
    }

    fn problem(result: Result<()>) -> String {
        match result {
            Err(e @ Error::HostCertificate { .. }) => {
                assert!(!e.is_transient());
                e.to_string()
            }
            other => panic!("expected HostCertificate, got {other:?}"),
        }
    }

    #[test]
    fn every_check_of_a_host_certificate() {
        let s = Scratch::new();
        s.key("ca", "ed25519");
        s.key("other_ca", "ed25519");
        s.key("host", "ed25519");
        let ca_line = format!("@cert-authority bastion,*.example.com {}\n", s.pub_text("ca"));
        s.write_known_hosts(&ca_line);
        let v = s.verifier(strict());

        let good = sign(&s, "ca", "host", "bastion,db-?.example.com", "-5m:+1h", true);
        v.verify_certificate("bastion", 22, &good)
            .expect("principal, CA, window");
        v.verify_certificate("Bastion", 2222, &good)
            .expect("port-less fallback for the CA line; names are case-insensitive");
        v.verify_certificate("db-1.example.com", 22, &good)
            .expect("a wildcard principal, as OpenSSH allows in host certificates");
        let text = problem(v.verify_certificate("db-10.example.com", 22, &good));
        assert!(text.contains("not issued for \"db-10.example.com\""), "{text}");
        assert!(text.contains("test-id") && text.contains("serial 7"), "{text}");

        let expired = sign(&s, "ca", "host", "bastion", "-2h:-1h", true);
        let text = problem(v.verify_certificate("bastion", 22, &expired));
        assert!(text.contains("expired: valid from"), "{text}");
        let future = sign(&s, "ca", "host", "bastion", "+1h:+2h", true);
        assert!(problem(v.verify_certificate("bastion", 22, &future)).contains("not yet valid"));

        let user_cert = sign(&s, "ca", "host", "bastion", "-5m:+1h", false);
        assert!(problem(v.verify_certificate("bastion", 22, &user_cert)).contains("user certificate"));

        let no_principals = sign(&s, "ca", "host", "", "-5m:+1h", true);
        assert!(problem(v.verify_certificate("bastion", 22, &no_principals)).contains("no principals"));

        // Signed by a CA known_hosts does not trust: the plain key decides (unknown here).
        let stranger = sign(&s, "other_ca", "host", "bastion", "-5m:+1h", true);
        assert_unknown(v.verify_certificate("bastion", 22, &stranger));

        // A refused certificate whose key is listed as a plain key is accepted, as in OpenSSH.
        s.write_known_hosts(&format!("{ca_line}bastion {}\n", s.pub_text("host")));
        v.verify_certificate("bastion", 22, &expired)
            .expect("plain key fallback");
        v.verify_certificate("bastion", 22, &stranger)
            .expect("plain key, unknown CA");

        // Revocation of the CA or of the certified key wins over everything.
        s.write_known_hosts(&format!(
            "{ca_line}bastion {}\n@revoked * {}\n",
            s.pub_text("host"),
            s.pub_text("ca")
        ));
        assert!(problem(v.verify_certificate("bastion", 22, &good)).contains("@revoked"));
        s.write_known_hosts(&format!("{ca_line}@revoked bastion {}\n", s.pub_text("host")));
        assert!(matches!(
            v.verify_certificate("bastion", 22, &good),
            Err(Error::HostKeyRevoked { .. })
        ));

        // A CA line under the port-ful name shadows the plain name's.
        s.write_known_hosts(&format!(
            "@cert-authority [bastion]:2222 {}\n{ca_line}",
            s.pub_text("other_ca")
        ));
        assert_unknown(v.verify_certificate("bastion", 2222, &good));
        v.verify_certificate("bastion", 22, &good).unwrap();
    }

    #[test]
    fn alias_policies_and_when_certificates_are_asked_for() {
        let s = Scratch::new();
        s.key("ca", "ed25519");
        s.key("host", "ed25519");
        s.write_known_hosts(&format!("@cert-authority db-bastion {}\n", s.pub_text("ca")));
        let cert = sign(&s, "ca", "host", "db-bastion", "-5m:+1h", true);
        let alias = s.verifier(strict()).with_alias(Some("db-bastion".into()));
        alias
            .verify_certificate("10.1.2.3", 2222, &cert)
            .expect("principal = alias");
        assert!(alias.could_verify_certificates("10.1.2.3", 2222));
        assert!(!s.verifier(strict()).could_verify_certificates("10.1.2.3", 2222));
        assert_unknown(s.verifier(strict()).verify_certificate("10.1.2.3", 2222, &cert));
        // Pinned: the certificate's key is compared; insecure: accepted.
        let key = PublicKey::new(cert.public_key().clone(), "");
        let pinned = HostKeyVerifier::new(HostKeyPolicy::Fingerprint(fingerprint(&key)), s.path("none"));
        pinned.verify_certificate("x", 22, &cert).unwrap();
        assert!(!pinned.could_verify_certificates("db-bastion", 22));
        HostKeyVerifier::new(HostKeyPolicy::InsecureAcceptAny, s.path("none"))
            .verify_certificate("x", 22, &cert)
            .unwrap();
    }

    #[test]
    fn unix_times_are_formatted_like_date() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix(1_764_633_599), "2025-12-01T23:59:59Z");
        assert_eq!(format_unix(u64::MAX), "forever");
        let out = run(Command::new("date").args(["-u", "-d", "@4102444800", "+%Y-%m-%dT%H:%M:%SZ"]));
        assert_eq!(format_unix(4_102_444_800), out.trim());
    }
}

#[test]
fn a_host_recorded_by_rsa_keys_only_is_told_apart_for_builds_without_rsa() {
    let s = Scratch::new();
    s.key("rsa", "rsa");
    let ed = s.key("ed", "ed25519");
    s.write_known_hosts(&format!("bastion {}\n", s.pub_text("rsa")));
    let v = s.verifier(strict());
    let files = v.read().unwrap();
    assert!(matches!(
        check(&files, "bastion", None, &ed),
        Verdict::Changed { only_rsa: true, .. }
    ));
    let result = v.verify("bastion", 22, &ed);
    if cfg!(feature = "rsa") {
        // With RSA the key exchange asks for the RSA key; an ed25519 one is a changed key.
        assert_changed(result);
    } else {
        match result {
            Err(e @ Error::FeatureRequired { .. }) => assert!(e.to_string().contains("`rsa` feature"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
    // Another key type on record besides RSA: a changed key in every build.
    s.key("ec", "ecdsa");
    s.write_known_hosts(&format!(
        "bastion {}\nbastion {}\n",
        s.pub_text("rsa"),
        s.pub_text("ec")
    ));
    let files = v.read().unwrap();
    assert!(matches!(
        check(&files, "bastion", None, &ed),
        Verdict::Changed { only_rsa: false, .. }
    ));
}
