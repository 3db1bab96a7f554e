//! Where everything of a node lives, under a root prefix (like `dpkg --root`), so that
//! tests and benchmarks run many nodes side by side without touching the machine.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn under(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn etc(&self) -> PathBuf {
        self.under("etc/troops")
    }
    pub fn settings_file(&self) -> PathBuf {
        self.under("etc/troops/troops.toml")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.under("var/lib/troops")
    }
    /// Admins the seed named whose accounts did not exist yet (admins.rs).
    pub fn pending_admins(&self) -> PathBuf {
        self.under("var/lib/troops/pending-admins")
    }
    /// The system git config: where the repo is marked safe for pushers.
    pub fn system_gitconfig(&self) -> PathBuf {
        self.under("etc/gitconfig")
    }
    /// The drop-in that sets troops-pull.timer's interval from the settings.
    pub fn timer_dropin(&self) -> PathBuf {
        self.under("etc/systemd/system/troops-pull.timer.d/troops-interval.conf")
    }
    /// The drop-in that bounds troops-pull.service's run above deploy_timeout.
    pub fn pull_service_dropin(&self) -> PathBuf {
        self.under("etc/systemd/system/troops-pull.service.d/troops-timeout.conf")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.under("var/lib/troops/ssh")
    }
    pub fn trusted_keys(&self) -> PathBuf {
        self.under("etc/troops/trustedkeys.gpg")
    }
    pub fn machine_id(&self) -> PathBuf {
        self.under("etc/machine-id")
    }
    pub fn allowed_signers(&self) -> PathBuf {
        self.under("etc/troops/allowed_signers")
    }
    /// The shared repository: pushers push here and `git remote add` here. Root reads it
    /// only as input (see `node_repo`).
    pub fn repo(&self) -> PathBuf {
        self.under("var/lib/troops/repo/main.git")
    }
    /// Root's own repository: what root fetched, verified and deployed. Only root writes it.
    pub fn node_repo(&self) -> PathBuf {
        self.under("var/lib/troops/repo/node.git")
    }
    /// Passwords and tokens for HTTPS remotes, git-credential-store format, root only.
    pub fn credentials(&self) -> PathBuf {
        self.under("etc/troops/credentials")
    }
    /// CAs from the seed's `ca_certs`, trusted for HTTPS remotes beside the system's roots.
    pub fn ca_certs(&self) -> PathBuf {
        self.under("etc/troops/ca-certificates.pem")
    }
    /// The drop-in that gives troops.socket the admin group.
    pub fn socket_dropin(&self) -> PathBuf {
        self.under("etc/systemd/system/troops.socket.d/troops-group.conf")
    }
    pub fn venvs(&self) -> PathBuf {
        self.under("var/lib/troops/venvs")
    }
    /// Each interpreter's pip, unpacked once and shared by its venvs.
    pub fn shared_pip(&self) -> PathBuf {
        self.under("var/lib/troops/pip")
    }
    /// pip's and uv's download caches, root's only.
    pub fn cache(&self) -> PathBuf {
        self.under("var/cache/troops")
    }
    pub fn work(&self) -> PathBuf {
        self.under("var/lib/troops/work")
    }
    pub fn runs(&self) -> PathBuf {
        self.under("var/lib/troops/runs")
    }
    /// Where a module found beside a development build is copied under its importable name.
    pub fn python_module_copy(&self) -> PathBuf {
        self.under("var/lib/troops/python")
    }
    /// The flock that serialises every pull and deploy on the node.
    pub fn lock_file(&self) -> PathBuf {
        self.under("var/lib/troops/lock")
    }
    /// What the last pull saw of each remote, for `status`.
    pub fn pull_report(&self) -> PathBuf {
        self.under("var/lib/troops/pull.json")
    }
    /// When this node first saw each commit carrying a rollout trailer: ramps run from it.
    pub fn first_seen(&self) -> PathBuf {
        self.under("var/lib/troops/first-seen.json")
    }
    /// Failed attempts at the current commit, for retry backoff.
    pub fn retry_state(&self) -> PathBuf {
        self.under("var/lib/troops/retry.json")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.under("run/troops")
    }
}
