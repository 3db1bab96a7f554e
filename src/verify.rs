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
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let why = if lines.is_empty() {
            "it is not signed".to_string()
        } else if lines.iter().any(|l| {
            l.contains("No principal matched")
                || l.contains("NO_PUBKEY")
                || l.contains("No public key")
        }) {
            "it is signed by a key that is not trusted here".to_string()
        } else if lines.iter().any(|l| {
            l.contains("BADSIG")
                || l.contains("Signature verification failed")
                || l.contains("incorrect signature")
        }) {
            "its signature is bad (the commit was changed after signing)".to_string()
        } else {
            format!("its signature does not verify: {}", lines.join("; "))
        };
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
