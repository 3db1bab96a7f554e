//! Signed commits only: real `ssh-keygen -Y sign` (git's gpg.format=ssh) and real GnuPG keys
//! made here, checked over pull and over push.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// An SSH signing key and the allowed_signers line that trusts it.
pub(crate) struct SshSigner {
    pub key: PathBuf,
    pub line: String,
}

pub(crate) fn ssh_signer(world: &World, name: &str) -> SshSigner {
    let key = world.path(&format!("signers/{name}"));
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut f = public.split_whitespace();
    let line = format!(
        "{name}@example.com {} {}",
        f.next().unwrap(),
        f.next().unwrap()
    );
    SshSigner { key, line }
}

/// Commit everything, signed with `key` (SSH) if given.
pub(crate) fn commit_ssh(up: &Upstream, message: &str, key: Option<&Path>) -> String {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(&up.dir)
        .args(["-c", "user.name=Ops", "-c", "user.email=ops@example.com"]);
    if let Some(k) = key {
        cmd.args(["-c", "gpg.format=ssh", "-c"])
            .arg(format!("user.signingkey={}", k.display()));
    }
    cmd.args(["commit", "-q", "--allow-empty", "-a", "-m", message]);
    if key.is_some() {
        cmd.arg("-S");
    }
    git(&up.dir, &["add", "-A"]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    up.head()
}

pub(crate) fn node_verifying(t: &One, verify: &str, allowed: &[&str]) {
    let seed = t.world.path("seed.json");
    let lines: Vec<String> = allowed.iter().map(|l| format!("{l:?}")).collect();
    std::fs::write(
        &seed,
        format!(
            r#"{{"troops": {{"remotes": {{"origin": "file://{}"}}, "verify": "{verify}", "allowed_signers": [{}]}}}}"#,
            t.remote.display(),
            lines.join(", ")
        ),
    )
    .unwrap();
    t.node
        .troops(&[
            "init",
            "--no-pull",
            "--group",
            &t.node.group,
            "--seed",
            seed.to_str().unwrap(),
        ])
        .ok();
}

#[test]
fn ssh_signed_commits_are_taken_and_the_rest_are_refused() {
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    let stranger = ssh_signer(&t.world, "stranger");
    node_verifying(&t, "all", &[&ops.line]);

    t.up.write("deploy.py", &simple_deploy("signed"));
    let signed = commit_ssh(&t.up, "signed", Some(&ops.key));
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&signed));

    // Unsigned: refused, the node stays, and it says which commit and why.
    t.up.write("deploy.py", &simple_deploy("unsigned"));
    let unsigned = commit_ssh(&t.up, "unsigned", None);
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains(&format!(
            "commit {} was refused: it is not signed",
            &unsigned[..12]
        )),
        "{}",
        out.stderr
    );
    assert_eq!(t.node.head().as_ref(), Some(&signed));
    assert_eq!(t.node.read("out/tag").as_deref(), Some("signed"));

    // A stranger's signature on top does not launder the unsigned commit under `all`.
    t.up.write("deploy.py", &simple_deploy("stranger"));
    let strange = commit_ssh(&t.up, "stranger", Some(&stranger.key));
    t.up.push(&t.remote);
    t.node.troops(&["pull"]).failed();
    assert_eq!(t.node.head().as_ref(), Some(&signed));

    // Even a good signature on top: with `all`, the forged commit in the middle is refused.
    t.up.write("deploy.py", &simple_deploy("good-on-top"));
    let on_top = commit_ssh(&t.up, "good on top", Some(&ops.key));
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).failed();
    assert!(out.stderr.contains(&unsigned[..12]), "{}", out.stderr);
    assert_eq!(t.node.head().as_ref(), Some(&signed));

    // With `tip`, only the commit landed on must be signed: it goes to the signed top.
    t.node.set("verify", "\"tip\"");
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&on_top));
    let _ = strange;
}

#[test]
fn a_wrong_key_is_refused_and_a_tampered_commit_has_a_bad_signature() {
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    let stranger = ssh_signer(&t.world, "stranger");
    node_verifying(&t, "tip", &[&ops.line]);
    t.up.write("deploy.py", &simple_deploy("stranger"));
    let c = commit_ssh(&t.up, "by a stranger", Some(&stranger.key));
    t.up.push(&t.remote);
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains(&format!(
            "commit {} was refused: it is signed by a key that is not trusted here",
            &c[..12]
        )),
        "{}",
        out.stderr
    );
    assert_eq!(t.node.head(), None);
    let human = t.node.troops(&["status"]).ok().stdout;
    assert!(
        human.contains("held") && human.contains("not trusted"),
        "{human}"
    );

    // A commit by ops (on a fresh history), then the same signed object with its message
    // changed: a forgery.
    git(&t.up.dir, &["checkout", "-q", "--orphan", "fresh"]);
    let good = commit_ssh(&t.up, "by ops", Some(&ops.key));
    let object = git(&t.up.dir, &["cat-file", "commit", &good]);
    let forged_object = object.replace("by ops", "by ops, honest");
    let mut hash = Command::new("git")
        .arg("-C")
        .arg(&t.up.dir)
        .args(["hash-object", "-t", "commit", "-w", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    hash.stdin
        .take()
        .unwrap()
        .write_all(format!("{forged_object}\n").as_bytes())
        .unwrap();
    let forged = String::from_utf8(hash.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    t.up.force_push(&t.remote, &forged);
    let out = t.node.troops(&["pull"]).failed();
    assert!(
        out.stderr.contains(&format!(
            "commit {} was refused: its signature is bad",
            &forged[..12]
        )),
        "{}",
        out.stderr
    );
    assert_eq!(t.node.head(), None);
}

/// A throwaway GnuPG home with one signing key; returns (home, fingerprint).
fn gpg_signer(world: &World) -> (PathBuf, String) {
    let (home, fpr, _) = gpg_key(world, "ops", "never", None);
    (home, fpr)
}

/// A GnuPG signing key for `name <name@example.com>` expiring as `expire` says, in its own
/// home; with `faked`, made (and later signing, through the returned gpg wrapper) as if at
/// that time, gpg's own clock option.
pub(crate) fn gpg_key(
    world: &World,
    name: &str,
    expire: &str,
    faked: Option<&str>,
) -> (PathBuf, String, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let home = world.path(&format!("gnupg-{name}"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let wrapper = world.path(&format!("gpg-{name}"));
    let clock = faked.map_or(String::new(), |t| format!("--faked-system-time {t} "));
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec gpg {clock}\"$@\"\n")).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let made = Command::new(&wrapper)
        .env("GNUPGHOME", &home)
        .args(["--batch", "--passphrase", "", "--quick-gen-key"])
        .arg(format!("{name} <{name}@example.com>"))
        .args(["ed25519", "sign", expire])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let list = Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--with-colons", "--list-secret-keys"])
        .output()
        .unwrap();
    let fpr = String::from_utf8_lossy(&list.stdout)
        .lines()
        .find(|l| l.starts_with("fpr:"))
        .and_then(|l| l.split(':').nth(9))
        .unwrap()
        .to_owned();
    (home, fpr, wrapper)
}

fn commit_gpg(up: &Upstream, home: &Path, fpr: &str, message: &str) -> String {
    git(&up.dir, &["add", "-A"]);
    let out = Command::new("git")
        .arg("-C")
        .arg(&up.dir)
        .args([
            "-c",
            "user.name=Ops",
            "-c",
            "user.email=ops@example.com",
            "-c",
        ])
        .arg(format!("user.signingkey={fpr}"))
        .args(["commit", "-q", "-S", "--allow-empty", "-m", message])
        .env("GNUPGHOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    up.head()
}

#[test]
fn gnupg_signatures_against_the_trusted_keyring_only() {
    let t = one_remote(&[]);
    let (home, fpr) = gpg_signer(&t.world);
    node_verifying(&t, "all", &[]);
    t.up.write("deploy.py", &simple_deploy("gpg"));
    let c = commit_gpg(&t.up, &home, &fpr, "signed with gpg");
    t.up.push(&t.remote);
    // Not in the node's keyring yet (the signer's own keyring does not count).
    let out: Run = t
        .node
        .command(&["pull"])
        .env("GNUPGHOME", &home)
        .output()
        .unwrap()
        .into();
    let out = out.failed();
    // With no key of its own the node refuses outright and names the keyring it lacks.
    assert!(
        out.stderr.contains("trustedkeys.gpg") && out.stderr.contains("nothing can be verified"),
        "{}",
        out.stderr
    );
    assert_eq!(t.node.deployed(), None);

    let export = Command::new("gpg")
        .env("GNUPGHOME", &home)
        .args(["--batch", "--export", &fpr])
        .output()
        .unwrap();
    std::fs::write(t.node.path("etc/troops/trustedkeys.gpg"), export.stdout).unwrap();
    t.node.troops(&["pull"]).ok();
    assert_eq!(t.node.deployed().as_ref(), Some(&c));
}

#[test]
fn a_push_is_refused_for_what_a_pull_would_refuse() {
    let t = one_remote(&[]);
    let ops = ssh_signer(&t.world, "ops");
    let stranger = ssh_signer(&t.world, "stranger");
    node_verifying(&t, "all", &[&ops.line]);
    // A local push as root runs receive-pack, and so the node's hooks, for real.
    let push = |up: &Upstream| -> Run {
        Command::new("git")
            .arg("-C")
            .arg(&up.dir)
            .args([
                "push",
                t.node.repo().to_str().unwrap(),
                "HEAD:refs/heads/master",
            ])
            .env("GIT_CONFIG_SYSTEM", t.node.path("etc/gitconfig"))
            .output()
            .unwrap()
            .into()
    };
    t.up.write("deploy.py", &simple_deploy("signed"));
    let signed = commit_ssh(&t.up, "signed", Some(&ops.key));
    let out = push(&t.up);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(t.node.pushed().as_ref(), Some(&signed));

    let u = commit_ssh(&t.up, "unsigned", None);
    let out = push(&t.up);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(&format!(
            "troops: refused: commit {} was refused: it is not signed",
            &u[..12]
        )),
        "{}",
        out.stderr
    );

    git(&t.up.dir, &["reset", "-q", "--hard", &signed]);
    let w = commit_ssh(&t.up, "stranger", Some(&stranger.key));
    let out = push(&t.up);
    assert!(
        out.stderr.contains(&format!(
            "commit {} was refused: it is signed by a key that is not trusted here",
            &w[..12]
        )),
        "{}",
        out.stderr
    );

    git(&t.up.dir, &["reset", "-q", "--hard", &signed]);
    let forged = commit_ssh(&t.up, "forged in the middle", None);
    commit_ssh(&t.up, "signed on top", Some(&ops.key));
    let out = push(&t.up);
    assert!(
        out.stderr
            .contains(&format!("commit {} was refused", &forged[..12])),
        "{}",
        out.stderr
    );
    assert_eq!(t.node.pushed().as_ref(), Some(&signed));
}
