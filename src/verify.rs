//! Signed commits only: git's own `verify-commit`, with the key material taken only from
//! /etc/troops/allowed_signers (SSH signatures) and /etc/troops/trustedkeys.gpg (OpenPGP),
//! never from the caller's environment, home or keyrings. The only module that runs gpg.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::repo::CommitId;

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("failed to set up signature checks in {path}: {source}")]
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "verify = {verify}, but neither {signers} nor {keyring} holds a key: nothing can be verified, so nothing is taken or deployed"
    )]
    NoKeys {
        verify: String,
        signers: PathBuf,
        keyring: PathBuf,
    },
    #[error("failed to run git: {0}")]
    Spawn(std::io::Error),
    #[error("failed to list commits {range}: {message}")]
    RevList { range: String, message: String },
}

pub struct Verifier {
    allowed_signers: PathBuf,
    /// A private, empty GnuPG home that reads only the trusted keyring.
    gnupg: tempfile::TempDir,
    git_dir: Option<PathBuf>,
}

impl Verifier {
    /// `git_dir`: the repo, or `None` inside a hook, where git's environment names it (and
    /// the quarantine holding the pushed objects).
    pub fn new(
        allowed_signers: &Path,
        trusted_keys: &Path,
        git_dir: Option<&Path>,
    ) -> Result<Verifier, VerifyError> {
        let gnupg = tempfile::Builder::new()
            .prefix("troops-gnupg-")
            .tempdir()
            .map_err(|source| VerifyError::Setup {
                path: std::env::temp_dir(),
                source,
            })?;
        let mut conf =
            String::from("no-default-keyring\ntrust-model always\nno-auto-key-retrieve\n");
        if trusted_keys.exists() {
            conf.push_str(&format!("keyring {}\n", trusted_keys.display()));
        }
        let conf_path = gnupg.path().join("gpg.conf");
        std::fs::write(&conf_path, conf).map_err(|source| VerifyError::Setup {
            path: conf_path,
            source,
        })?;
        Ok(Verifier {
            allowed_signers: allowed_signers.to_owned(),
            gnupg,
            git_dir: git_dir.map(Path::to_owned),
        })
    }

    fn git(&self) -> Command {
        let mut cmd = Command::new("git");
        if let Some(d) = &self.git_dir {
            cmd.arg("--git-dir").arg(d);
        }
        // Command-line settings beat every config file; HOME and XDG point at the private
        // dir so no user's config or keys take part.
        // No hook or fsmonitor of any repository runs for root.
        cmd.args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
        ]);
        cmd.arg("-c")
            .arg(format!(
                "gpg.ssh.allowedSignersFile={}",
                self.allowed_signers.display()
            ))
            .args([
                "-c",
                "gpg.program=gpg",
                "-c",
                "gpg.ssh.program=ssh-keygen",
                "-c",
                "gpg.minTrustLevel=undefined",
            ])
            .env("GNUPGHOME", self.gnupg.path())
            .env("HOME", self.gnupg.path())
            .env("XDG_CONFIG_HOME", self.gnupg.path())
            .env_remove("GIT_CONFIG_GLOBAL")
            .env_remove("GIT_CONFIG_PARAMETERS")
            .env_remove("GIT_CONFIG_COUNT")
            .env_remove("SSH_AUTH_SOCK");
        cmd
    }

    /// `Ok(())` if `commit` carries a good signature by a trusted key; otherwise why not.
    pub fn check(&self, commit: CommitId) -> Result<Result<(), String>, VerifyError> {
        let out = self
            .git()
            .args(["verify-commit", "--raw", &commit.to_string()])
            .output()
            .map_err(VerifyError::Spawn)?;
        if out.status.success() {
            return Ok(Ok(()));
        }
        let why = refusal_reason(&String::from_utf8_lossy(&out.stderr));
        Ok(Err(format!("commit {} was refused: {why}", commit.short())))
    }

    /// Every commit in `stop..tip` by git's own rev-list (which sees a push's quarantine).
    pub fn rev_list(
        &self,
        tip: CommitId,
        stop: Option<CommitId>,
    ) -> Result<Vec<CommitId>, VerifyError> {
        let range = match stop {
            Some(s) => vec![tip.to_string(), format!("^{s}")],
            None => vec![tip.to_string()],
        };
        let out = self
            .git()
            .arg("rev-list")
            .args(&range)
            .output()
            .map_err(VerifyError::Spawn)?;
        if !out.status.success() {
            return Err(VerifyError::RevList {
                range: range.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect())
    }
}

/// One line a person reads from what `git verify-commit --raw` said: GnuPG's status lines
/// and ssh-keygen's messages, never passed on raw.
pub fn refusal_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let status = |word: &str| {
        lines.iter().find_map(|l| {
            let rest = l.strip_prefix("[GNUPG:] ")?;
            let (w, args) = rest.split_once(' ').unwrap_or((rest, ""));
            (w == word).then_some(args)
        })
    };
    let first_arg = |args: &str| args.split_whitespace().next().unwrap_or("").to_owned();
    let day = |unix: &str| {
        unix.parse::<u64>()
            .ok()
            .map(|s| {
                let t = crate::clock::rfc3339(s);
                t.get(..10)
                    .filter(|_| s <= crate::clock::LAST)
                    .unwrap_or(&t)
                    .to_owned()
            })
            .unwrap_or_else(|| unix.to_owned())
    };
    if lines.is_empty() {
        return "it is not signed".into();
    }
    if lines
        .iter()
        .filter(|l| **l == "[GNUPG:] NEWSIG" || l.starts_with("[GNUPG:] NEWSIG "))
        .count()
        > 1
    {
        return "it carries more than one signature".into();
    }
    if let Some(args) = status("REVKEYSIG") {
        return format!("signed by a revoked key ({})", first_arg(args));
    }
    if let Some(args) = status("EXPKEYSIG") {
        let when =
            status("KEYEXPIRED").map(|t| format!(", expired {}", day(first_arg(t).as_str())));
        return format!(
            "signed by an expired key ({}{})",
            first_arg(args),
            when.unwrap_or_default()
        );
    }
    // ssh-keygen: "key has expired: verify time X > valid-before Y" (or not yet valid).
    if let Some(l) = lines
        .iter()
        .find(|l| l.contains("valid-before ") || l.contains("valid-after "))
    {
        let bound = l
            .rsplit_once(" valid-")
            .map(|(_, b)| {
                format!(
                    "valid-{}",
                    b.get(..b.find('T').unwrap_or(b.len())).unwrap_or(b)
                )
            })
            .unwrap_or_default();
        return format!("SSH key not valid at the commit's date ({bound})");
    }
    if lines.iter().any(|l| {
        l.contains("No principal matched") || l.contains("NO_PUBKEY") || l.contains("No public key")
    }) {
        return "it is signed by a key that is not trusted here".into();
    }
    if lines.iter().any(|l| {
        l.contains("BADSIG")
            || l.contains("Signature verification failed")
            || l.contains("incorrect signature")
    }) {
        return "its signature is bad (the commit was changed after signing)".into();
    }
    // Something else: the human lines only, never GnuPG's machine status lines.
    let human: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("[GNUPG:]"))
        .collect();
    match human.is_empty() {
        true => "its signature does not verify".into(),
        false => format!("its signature does not verify: {}", human.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_a_person_reads() {
        let expired = "[GNUPG:] NEWSIG\n[GNUPG:] KEYEXPIRED 1714521600\n[GNUPG:] KEY_CONSIDERED ABCD 0\n[GNUPG:] EXPKEYSIG 0123456789ABCDEF Ops <ops@example.com>\n[GNUPG:] VALIDSIG ...\n";
        assert_eq!(
            refusal_reason(expired),
            "signed by an expired key (0123456789ABCDEF, expired 2024-05-01)"
        );
        let revoked =
            "[GNUPG:] NEWSIG\n[GNUPG:] REVKEYSIG 0123456789ABCDEF Ops <ops@example.com>\n";
        assert_eq!(
            refusal_reason(revoked),
            "signed by a revoked key (0123456789ABCDEF)"
        );
        let two = "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG A x\n[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG B y\n";
        assert_eq!(refusal_reason(two), "it carries more than one signature");
        let ssh = "Good \"git\" signature with ED25519 key SHA256:x\n/etc/troops/allowed_signers:1: key has expired: verify time 2026-12-02T12:11:15 > valid-before 2026-01-01T00:00:00\nNo principal matched.\n";
        assert_eq!(
            refusal_reason(ssh),
            "SSH key not valid at the commit's date (valid-before 2026-01-01)"
        );
        assert_eq!(refusal_reason(""), "it is not signed");
        assert_eq!(
            refusal_reason("[GNUPG:] ERRSIG A 1 8 00 1 9 -\n[GNUPG:] NO_PUBKEY A\n"),
            "it is signed by a key that is not trusted here"
        );
        let odd = "[GNUPG:] NEWSIG\n[GNUPG:] FAILURE x 1\ngpg: something odd\n";
        assert_eq!(
            refusal_reason(odd),
            "its signature does not verify: gpg: something odd"
        );
    }
}
