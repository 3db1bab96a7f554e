//! The node's bare repository. This is the only module that talks to gix: opening and
//! creating the repo, its remotes, fetching one branch, ancestry, compare-and-swap ref
//! updates, and materialising a commit's tree.
//!
//! gix fetches `file://` and local remotes by spawning `git-upload-pack` and ssh remotes by
//! spawning `ssh`, so both must be installed; the per-remote timeout lives with the caller,
//! which runs each fetch in its own process group (see `fetch.rs`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;

use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::remote::Direction;
use thiserror::Error;

/// Whether a fetch may have failed because another fetch wrote the same pack at the same
/// moment (each removes its pack's .keep file when done: the other then finds it gone).
/// Anything else that looks the same costs one serialised retry, no more. A fetch that
/// began while another was replacing a same-named pack can also find a tracking ref whose
/// object is, for that moment, in no pack ("object could not be found").
fn collided(message: &str) -> bool {
    [
        "os error 2)",
        "os error 17)",
        ".keep",
        "object could not be found",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// One commit of [`Repo::commit_graph`].
#[derive(Debug, Clone)]
pub struct GraphCommit {
    pub id: CommitId,
    pub parents: Vec<CommitId>,
    pub time: i64,
    pub message: String,
}

/// The overflow uid Debian names `nobody`: local repositories are read as it.
const NOBODY: u32 = 65534;

/// A commit id, kept apart from gix's type so the rest of the agent never names gix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(gix::ObjectId);

impl CommitId {
    pub fn short(&self) -> String {
        self.0.to_hex_with_len(12).to_string()
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for CommitId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        gix::ObjectId::from_hex(s.as_bytes())
            .map(CommitId)
            .map_err(|e| format!("{s:?} is not a commit id: {e}"))
    }
}

impl serde::Serialize for CommitId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CommitId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One file of a tree, as a checkout writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Relative, `/`-separated.
    pub path: String,
    pub kind: FileKind,
    /// The blob's id, hex.
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Executable,
    Symlink,
    /// A submodule: never updated in place.
    Other,
}

#[derive(Debug, Error)]
pub enum RepoError {
    #[error("{path}: failed to {what}: {message}")]
    Git {
        path: PathBuf,
        what: String,
        message: String,
    },
    #[error("remote {remote:?} ({url}): {message}")]
    Fetch {
        remote: String,
        url: String,
        message: String,
    },
    #[error("no remote named {0:?}")]
    NoSuchRemote(String),
    #[error(
        "{reference} moved while we were updating it (expected {expected}); nothing was changed"
    )]
    Moved { reference: String, expected: String },
    #[error("failed to check out {commit} into {path}: {message}")]
    Checkout {
        commit: CommitId,
        path: PathBuf,
        message: String,
    },
}

/// The whole chain of a gix error on one line: gix nests the useful part deep.
/// Whether `config` (a system gitconfig) trusts `repo` for every user. git refuses to work
/// in a repository another user owns (safe.directory) unless the system config says so; a
/// pusher's receive-pack runs as the pusher in the root-owned node repo.
pub fn trusted_for_all(config: &Path, repo: &Path) -> bool {
    std::process::Command::new("git")
        .arg("config")
        .arg("--file")
        .arg(config)
        .args(["--get-all", "safe.directory"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| Path::new(l.trim()) == repo)
        })
        .unwrap_or(false)
}

/// Add `repo` to `config`'s safe.directory list (git writes the file under a lock).
pub fn trust_for_all(config: &Path, repo: &Path) -> Result<(), RepoError> {
    let fail = |message: String| RepoError::Git {
        path: config.to_owned(),
        what: format!("add {} to safe.directory", repo.display()),
        message,
    };
    let out = std::process::Command::new("git")
        .arg("config")
        .arg("--file")
        .arg(config)
        .args(["--add", "safe.directory"])
        .arg(repo)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Set `key` to `value` in a system git config, replacing every earlier value (git writes the
/// file under its lock).
pub fn set_system_value(config: &Path, key: &str, value: &str) -> Result<(), RepoError> {
    let fail = |message: String| RepoError::Git {
        path: config.to_owned(),
        what: format!("set {key}"),
        message,
    };
    let out = std::process::Command::new("git")
        .arg("config")
        .arg("--file")
        .arg(config)
        .args(["--replace-all", key, value])
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Ancestry as git's own CLI sees it from inside a hook: receive-pack keeps a push's objects
/// in a quarantine that only git (through the environment it sets) can see, gix cannot.
pub fn hook_is_ancestor(ancestor: CommitId, descendant: CommitId) -> Result<bool, RepoError> {
    let status = std::process::Command::new("git")
        .args([
            "merge-base",
            "--is-ancestor",
            &ancestor.to_string(),
            &descendant.to_string(),
        ])
        .status()
        .map_err(|e| RepoError::Git {
            path: ".".into(),
            what: "run git merge-base".into(),
            message: e.to_string(),
        })?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(RepoError::Git {
            path: ".".into(),
            what: format!("check whether {ancestor} is an ancestor of {descendant}"),
            message: format!("git merge-base exited with {status}"),
        }),
    }
}

/// A repository's config file, read as data: a symlink, a FIFO or anything but a regular
/// file of at most 1 MiB is refused, includes are not followed. Absent: empty.
fn read_config(path: &Path, what: &str) -> Result<gix::config::File, RepoError> {
    read_config_stat(path, what).map(|(file, _)| file)
}

/// [`read_config`], with the metadata of the file it read (None: there was none).
fn read_config_stat(
    path: &Path,
    what: &str,
) -> Result<(gix::config::File, Option<std::fs::Metadata>), RepoError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |message: String| RepoError::Git {
        path: path.to_owned(),
        what: what.to_owned(),
        message,
    };
    const MAX: u64 = 1 << 20;
    let meta = gix::config::file::Metadata::from(gix::config::Source::Local);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((gix::config::File::new(meta), None));
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(fail(format!("{e} (a symlink is refused)")));
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    let stat = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !stat.is_file() || stat.len() > MAX {
        return Err(fail(format!(
            "not a regular file of at most {MAX} bytes; refused"
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    gix::config::File::from_bytes_no_includes(&bytes, meta, Default::default())
        .map(|f| (f, Some(stat)))
        .map_err(|e| fail(format!("not a git config file: {}", chain(&e))))
}

/// The node's system git config (`<root>/etc/gitconfig`), read as data like every config
/// troops reads. Absent: empty.
pub fn system_config(path: &Path) -> Result<crate::hosting::SystemConfig, RepoError> {
    use std::os::unix::fs::MetadataExt;
    let (parsed, stat) = read_config_stat(path, "read the system git config")?;
    let mut entries = Vec::new();
    for section in parsed.sections() {
        let header = section.header();
        let body = section.body();
        // value_names is in file order; values(name) holds each name's values in order.
        let mut taken: std::collections::HashMap<String, usize> = Default::default();
        for name in body.value_names() {
            let i = taken.entry(name.to_ascii_lowercase()).or_default();
            let value = body.values(&name).get(*i).map(|v| v.to_string());
            *i += 1;
            entries.push(crate::hosting::Entry {
                section: header.name().to_string().to_ascii_lowercase(),
                subsection: header.subsection_name().map(|s| s.to_string()),
                name,
                value,
            });
        }
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    // Judged on the file that was read, not on whatever is at the path a moment later.
    let root_owned = stat
        .as_ref()
        .is_none_or(|m| (m.uid() == 0 || m.uid() == me) && m.mode() & 0o022 == 0);
    Ok(crate::hosting::SystemConfig {
        entries,
        root_owned,
        world_readable: stat.as_ref().is_some_and(|m| m.mode() & 0o004 != 0),
        path: path.display().to_string(),
    })
}

/// A repository's new config, written into its lock file (`config.lock`, created
/// exclusively) and not yet in place: init stages it with everything else, and a failure
/// before `commit` leaves the old config untouched.
pub struct StagedConfig {
    lock: gix::lock::File,
    path: PathBuf,
}

impl StagedConfig {
    pub fn commit(self) -> Result<(), RepoError> {
        let path = self.path;
        self.lock.commit().map_err(|e| RepoError::Git {
            path: path.clone(),
            what: "write the config".into(),
            message: e.error.to_string(),
        })?;
        Ok(())
    }
}

/// `remotes` (with the usual fetch refspec) and `values` set in `git_dir`'s config, staged.
/// The config is read as data ([`read_config`]) and the repository is never opened: this is
/// also how root edits the members' shared repository.
pub fn stage_config(
    git_dir: &Path,
    remotes: &[(String, String)],
    values: &[(&str, &str)],
) -> Result<StagedConfig, RepoError> {
    let path = git_dir.join("config");
    let fail = |what: String| {
        let path = path.clone();
        move |e: &dyn std::fmt::Display| RepoError::Git {
            path,
            what,
            message: e.to_string(),
        }
    };
    let mut config = read_config(&path, "read the config")?;
    for (name, url) in remotes {
        let spec = format!("+refs/heads/*:refs/remotes/{name}/*");
        for (key, value) in [("url", url.as_str()), ("fetch", spec.as_str())] {
            config
                .set_raw_value_by("remote", Some(name.as_str().into()), key, value)
                .map_err(|e| fail(format!("set remote.{name}.{key}"))(&e))?;
        }
    }
    for (key, value) in values {
        config
            .set_raw_value(*key, *value)
            .map_err(|e| fail(format!("set {key}"))(&e))?;
    }
    let mut lock = gix::lock::File::acquire_to_update_resource(
        &path,
        gix::lock::acquire::Fail::AfterDurationWithBackoff(std::time::Duration::from_secs(5)),
        None,
        0,
    )
    .map_err(|e| fail("lock the config".into())(&e))?;
    config
        .write_to(&mut lock)
        .map_err(|e| fail("write the config".into())(&e))?;
    Ok(StagedConfig { lock, path })
}

/// The remotes a member configured in the shared repo, as `(name, url)` in file order: only
/// `remote.<name>.url` is read. The file is input written by the admin group, so it is
/// opened without following a symlink, must be a regular file of sane size, and its
/// includes are not followed; nothing else in it (sshCommand, uploadpack, credential
/// helpers, proxies) ever reaches a git run by root.
pub fn remote_urls(config: &Path) -> Result<Vec<(String, String)>, RepoError> {
    let parsed = read_config(config, "read the remotes")?;
    let mut out: Vec<(String, String)> = Vec::new();
    for section in parsed.sections_by_name("remote").into_iter().flatten() {
        let Some(name) = section.header().subsection_name() else {
            continue;
        };
        let name = name.to_string();
        let Some(url) = section.value("url") else {
            continue;
        };
        // A later section of the same name wins, as in git.
        out.retain(|(n, _)| *n != name);
        out.push((name, url.to_string()));
    }
    out.sort();
    Ok(out)
}

/// Whether the fetch could use `url` at all, by the parser it uses.
pub fn check_url(remote: &str, url: &str) -> Result<(), RepoError> {
    gix::url::parse(gix::bstr::BStr::new(url))
        .map(|_| ())
        .map_err(|e| RepoError::Fetch {
            remote: remote.to_owned(),
            url: redact_url(url),
            message: redact_text(&chain(&e), &[url]),
        })
}

/// `url` with its secrets replaced by `***`, for everything that is printed or kept where
/// others read it. Over http(s) that is the password, a user name standing alone (tokens
/// are often given that way) and the query; an ssh user (`git@`) is no secret and stays.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let http = matches!(scheme, "http" | "https");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let tail = match tail.split_once('?') {
        Some((path, _)) if http => format!("{path}?***"),
        _ => tail.to_owned(),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None if http => format!("***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Every URL-with-password in `text` redacted: error messages from transports quote URLs.
pub fn redact_text(text: &str, urls: &[&str]) -> String {
    let mut out = text.to_owned();
    for url in urls {
        let safe = redact_url(url);
        if safe != *url {
            out = out.replace(url, &safe);
        }
    }
    out
}

/// `url` without the user and password [`split_credentials`] finds in it.
pub fn without_credentials(url: &str) -> String {
    split_credentials(url).map_or_else(|| url.to_owned(), |(_, _, bare)| bare)
}

/// The user and password in `url` (an http(s) user alone counts, with an empty password:
/// a token given as the user name), and the URL without them.
pub fn split_credentials(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let (user, password) = match rest[..at].split_once(':') {
        Some((user, password)) => (user, password),
        None if matches!(scheme, "http" | "https") => (&rest[..at], ""),
        None => return None,
    };
    Some((
        user.to_owned(),
        password.to_owned(),
        format!("{scheme}://{}", &rest[at + 1..]),
    ))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out.replace('\n', " ")
}

/// What one fetch of a remote found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// None: the remote has no such branch.
    pub tip: Option<CommitId>,
    /// Where an HTTP server redirected the repository to (redacted), if it did.
    pub moved_to: Option<String>,
}

struct FetchAttempt<'a> {
    remote: &'a str,
    url: &'a str,
    branch: &'a str,
    tracking: &'a str,
    account: Option<(String, String)>,
    plan: &'a crate::hosting::Plan,
}

/// gix's HTTP options for `plan`. gix's reqwest backend leaves proxy, CA and certificate
/// checks to the client it builds, so those are set on the client here.
fn http_options(
    plan: &crate::hosting::Plan,
) -> Result<gix::protocol::transport::client::blocking_io::http::Options, RepoError> {
    use gix::protocol::transport::client::blocking_io::http;
    use http::options::FollowRedirects;
    let config_error = |what: String, message: String| RepoError::Git {
        path: PathBuf::from("/etc/gitconfig"),
        what,
        message,
    };
    let proxy = match &plan.proxy {
        Some(p) => Some(
            reqwest::Proxy::all(p.as_str())
                .map_err(|e| config_error(format!("use the proxy {}", redact_url(p)), chain(&e)))?,
        ),
        None => None,
    };
    let bundle = |path: &PathBuf, what: &str| -> Result<Vec<reqwest::Certificate>, RepoError> {
        let fail = |message: String| RepoError::Git {
            path: path.clone(),
            what: format!("read the CA bundle {what}"),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        check_ca_bundle(&pem).map_err(fail)?;
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(chain(&e)))
    };
    let roots = match &plan.ca_info {
        Some(path) => Some(bundle(path, "named by http.sslCAInfo")?),
        None => None,
    };
    let extra = match &plan.extra_roots {
        Some(path) => bundle(path, "from the seed's ca_certs")?,
        None => Vec::new(),
    };
    let verify = plan.verify;
    let configure_client: Box<http::reqwest::ConfigureClientFn> = Box::new(move |builder| {
        // Never reqwest's own reading of the environment: the plan already chose, with
        // git's precedence and no_proxy, and loopback is proxied like any other host.
        let mut builder = builder.no_proxy();
        if let Some(p) = proxy.clone() {
            builder = builder.proxy(p);
        }
        // git's http.sslCAInfo replaces the system's roots; the seed's CAs add to them.
        match roots.clone() {
            Some(certs) => builder = builder.tls_certs_only(certs.into_iter().chain(extra.clone())),
            None if !extra.is_empty() => builder = builder.tls_certs_merge(extra.clone()),
            None => {}
        }
        if !verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        Ok(builder)
    });
    let backend = http::reqwest::Options {
        configure_client: Some(configure_client),
        configure_request: None,
    };
    Ok(http::Options {
        extra_headers: plan.extra_headers.clone(),
        follow_redirects: match plan.redirects {
            crate::hosting::Redirects::Initial => FollowRedirects::Initial,
            crate::hosting::Redirects::All => FollowRedirects::All,
            crate::hosting::Redirects::None => FollowRedirects::None,
        },
        user_agent: Some(format!("git/2.0 (troops {})", env!("CARGO_PKG_VERSION"))),
        backend: Some(std::sync::Arc::new(std::sync::Mutex::new(backend))),
        ..Default::default()
    })
}

/// How many certificates a PEM bundle holds; an error naming what is wrong when it holds
/// none or cannot be read.
pub fn check_ca_bundle(pem: &[u8]) -> Result<usize, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| format!("not PEM certificates: {}", chain(&e)))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    let n = certs.len();
    // Loading PEM only decodes base64; the certificates themselves are parsed when a client
    // takes them as roots, so that is the check.
    reqwest::blocking::Client::builder()
        .tls_certs_only(certs)
        .build()
        .map_err(|e| format!("not usable as CA certificates: {}", chain(&e)))?;
    Ok(n)
}

/// A fetch error as an operator needs it: a refused or missing credential said plainly,
/// and the proxy named when one was in the way.
fn explain_fetch_error(message: &str, url: &str, plan: &crate::hosting::Plan) -> String {
    if !crate::hosting::is_http(url) {
        return message.to_owned();
    }
    let refused = ["AuthenticationRequired", "HTTP status 401"];
    let message = if message.contains("No credentials were returned") {
        format!(
            "the server refused the credentials (HTTP 401) for {}: none are configured for it",
            redact_url(url)
        )
    } else if refused.iter().any(|a| message.contains(a)) {
        format!(
            "the server refused the credentials (HTTP 401) for {}",
            redact_url(url)
        )
    } else if message.contains("refusing to follow redirect after request headers were configured")
    {
        format!(
            "{message}: the server redirects {} elsewhere, and a configured http.extraHeader is \
             never sent to another URL; update the remote's URL",
            redact_url(url)
        )
    } else {
        message.to_owned()
    };
    match &plan.proxy {
        Some(p) => format!("{message} (through the proxy {})", redact_url(p)),
        None => message,
    }
}

pub struct Repo {
    repo: gix::Repository,
    path: PathBuf,
}

impl Repo {
    fn err<E: std::error::Error + 'static>(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> RepoError {
        let path = self.path.clone();
        let what = what.into();
        move |e| RepoError::Git {
            path,
            what,
            message: chain(&e),
        }
    }

    pub fn open(path: &Path) -> Result<Repo, RepoError> {
        // Only the repository's own config, none of the environment but HTTP's (proxies are
        // root's to set): a git hook's GIT_OBJECT_DIRECTORY or a member's ~/.gitconfig must
        // not decide what root (or the pre-receive hook) reads.
        let mut permissions = gix::open::Permissions::isolated();
        permissions.env.http_transport = gix::sec::Permission::Allow;
        // The node's ssh command is OpenSSH: said here, gix does not first run it with `-G`
        // (through `sh -c`) before every ssh fetch to find out.
        let repo = gix::open_opts(
            path,
            gix::open::Options::isolated()
                .permissions(permissions)
                .config_overrides(["ssh.variant=ssh"]),
        )
        .map_err(|e| RepoError::Git {
            path: path.to_owned(),
            what: "open the repository".into(),
            message: chain(&e),
        })?;
        Ok(Repo {
            repo,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every remote with its fetch URL, in name order.
    pub fn remotes(&self) -> Vec<(String, String)> {
        self.repo
            .remote_names()
            .into_iter()
            .filter_map(|name| {
                let remote = self
                    .repo
                    .find_remote(name.as_ref() as &gix::bstr::BStr)
                    .ok()?;
                let url = remote.url(Direction::Fetch)?.to_bstring().to_string();
                Some((name.to_string(), url))
            })
            .collect()
    }

    /// A value from the repository's own config file.
    pub fn config_value(&self, key: &str) -> Option<String> {
        self.repo
            .config_snapshot()
            .string(key)
            .map(|v| v.to_string())
    }

    /// Add or re-point `remotes` (as `git remote add/set-url` would) and set `values` (like
    /// `core.sshCommand`), all in one locked write of the config file: either all of it
    /// lands or none.
    pub fn configure(
        &mut self,
        remotes: &[(String, String)],
        values: &[(&str, &str)],
    ) -> Result<(), RepoError> {
        stage_config(&self.path, remotes, values)?.commit()?;
        self.repo = Repo::open(&self.path)?.repo;
        Ok(())
    }

    /// Create a bare repository at `path`, which must not exist, whose HEAD names `branch`
    /// (so that a clone of it checks out the node's branch, not a `main` that never exists).
    pub fn create(path: &Path, branch: &str) -> Result<Repo, RepoError> {
        gix::init_bare(path).map_err(|e| RepoError::Git {
            path: path.to_owned(),
            what: "create a bare repository".into(),
            message: chain(&e),
        })?;
        let head = path.join("HEAD");
        crate::fsutil::write_atomic(
            &head,
            format!("ref: refs/heads/{branch}\n").as_bytes(),
            0o644,
        )
        .map_err(|e| RepoError::Git {
            path: head.clone(),
            what: "point HEAD at the branch".into(),
            message: e.to_string(),
        })?;
        Repo::open(path)
    }

    /// Fetch `branch` from `url` into `tracking`; `remote` names it in errors. The tip is
    /// `None` when the remote has no such branch. `account` answers an HTTP server that asks
    /// for credentials before `plan`'s helpers do; with neither, the server's refusal is the
    /// error (never a prompt). `plan` says how to reach an http(s) URL.
    pub fn fetch_branch(
        &self,
        remote: &str,
        url: &str,
        branch: &str,
        tracking: &str,
        account: Option<(String, String)>,
        plan: &crate::hosting::Plan,
    ) -> Result<Fetch, RepoError> {
        // Remotes are fetched in parallel, each on its own: a slow one holds nothing the
        // others need. Mirrors can send byte-identical packs with identical names, which may
        // collide in objects/pack; the one that loses tries again, serialised, and finds
        // the objects already there.
        let attempt = FetchAttempt {
            remote,
            url,
            branch,
            tracking,
            account,
            plan,
        };
        match self.fetch_attempt(&attempt, false) {
            Err(RepoError::Fetch { message, .. }) if collided(&message) => {
                tracing::debug!("{remote}: a pack collided with another fetch's; again");
                // A fresh handle: the object database as it is now, with the other's pack.
                Repo::open(&self.path)?.fetch_attempt(&attempt, true)
            }
            other => other,
        }
    }

    fn fetch_attempt(&self, a: &FetchAttempt<'_>, serialise: bool) -> Result<Fetch, RepoError> {
        let url = a.url;
        let fail = |e: &(dyn std::error::Error + 'static)| RepoError::Fetch {
            remote: a.remote.to_owned(),
            url: redact_url(url),
            message: explain_fetch_error(&redact_text(&chain(e), &[url]), url, a.plan),
        };
        // Only the followed branch, whatever refspecs the remote is configured with.
        let spec = format!("+refs/heads/{}:{}", a.branch, a.tracking);
        let anonymous = self
            .repo
            .remote_at(url)
            .map_err(|e| fail(&e))?
            .with_refspecs([spec.as_str()], Direction::Fetch)
            .map_err(|e| fail(&e))?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        if !crate::hosting::is_http(url) {
            let connection = anonymous.connect(Direction::Fetch).map_err(|e| fail(&e))?;
            return self
                .receive(connection, a, serialise, &fail)
                .map(|tip| Fetch {
                    tip,
                    moved_to: None,
                });
        }
        // Over HTTP the transport is made here, not by gix from the repo's config: its
        // options come from the plan (the node's system git config and environment), and it
        // outlives the fetch so that a redirect can be read back from it.
        let parsed = gix::url::parse(gix::bstr::BStr::new(url)).map_err(|e| fail(&e))?;
        let mut transport = gix::protocol::transport::client::blocking_io::http::connect::<
            gix::protocol::transport::client::blocking_io::http::reqwest::Remote,
        >(parsed, gix::protocol::transport::Protocol::V2, false);
        let asked = transport.to_url().to_string();
        let connection = anonymous
            .to_connection_with_transport(&mut transport)
            .with_transport_options(Box::new(http_options(a.plan)?));
        // The account is for the URL's own host: a redirect elsewhere is asked, and
        // answered with nothing. Helpers from the system config are asked for any host, as
        // git asks them; each decides what it answers for.
        let own = gix::url::parse(gix::bstr::BStr::new(url))
            .ok()
            .and_then(|u| {
                let host = u.host()?.to_owned();
                let host = match u.port {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                };
                Some((u.scheme.as_str().to_owned(), host))
            });
        let account = a.account.clone();
        let mut helpers = gix::credentials::helper::Cascade::default();
        helpers.programs.clear();
        let helpers =
            helpers.extend(a.plan.helpers.iter().filter_map(|h| {
                gix::credentials::Program::from_custom_definition(h.as_str()).ok()
            }));
        let helpers = std::sync::Mutex::new(helpers);
        // Never a prompt, whatever terminal troops was started from.
        let quiet = gix::prompt::Options {
            askpass: None,
            mode: gix::prompt::Mode::Disable,
        };
        let answered_by_store = AtomicBool::new(false);
        let connection = connection.with_credentials(move |action| {
            if let gix::credentials::helper::Action::Get(ctx) = &action {
                // gix hands over the URL; protocol and host are filled in from it here.
                let mut asked = ctx.clone();
                let asked = asked.destructure_url_in_place(false).ok();
                let ours = own.as_ref().zip(asked).is_some_and(|((scheme, host), c)| {
                    c.protocol.as_deref() == Some(scheme.as_str())
                        && c.host.as_deref() == Some(host.as_str())
                });
                if let (true, Some((username, password))) = (ours, account.clone()) {
                    answered_by_store.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(Some(gix::credentials::protocol::Outcome {
                        identity: gix::sec::identity::Account {
                            username,
                            password,
                            oauth_refresh_token: None,
                        },
                        next: ctx.clone().into(),
                    }));
                }
            }
            // gix reports the outcome (store, erase) of what it was given; what troops' own
            // store answered is none of a helper's business, to keep or to forget.
            let ours = answered_by_store.load(std::sync::atomic::Ordering::Relaxed);
            let get = matches!(action, gix::credentials::helper::Action::Get(_));
            let mut helpers = helpers.lock().unwrap_or_else(|p| p.into_inner());
            match helpers.programs.is_empty() || (ours && !get) {
                true => Ok(None),
                false => helpers.invoke(action, quiet.clone()),
            }
        });
        let tip = self.receive(connection, a, serialise, &fail)?;
        use gix::protocol::transport::client::TransportWithoutIO;
        let now = transport.to_url().to_string();
        Ok(Fetch {
            tip,
            moved_to: (now != asked).then(|| redact_url(&now)),
        })
    }

    /// The fetch proper over an open connection: the ref map, then the pack if the branch
    /// is there.
    fn receive<'c, T: gix::protocol::transport::client::blocking_io::Transport>(
        &self,
        connection: gix::remote::Connection<'c, '_, '_, T>,
        a: &FetchAttempt<'_>,
        serialise: bool,
        fail: &dyn Fn(&(dyn std::error::Error + 'static)) -> RepoError,
    ) -> Result<Option<CommitId>, RepoError> {
        let tracking = a.tracking;
        let prepared = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| fail(&e))?;
        // An empty repository (a fresh main.git nobody pushed to) or a remote without the
        // branch: nothing to take, not a failure.
        if !prepared
            .ref_map()
            .mappings
            .iter()
            .any(|m| m.local.as_ref().is_some_and(|l| l == tracking))
        {
            return Ok(None);
        }
        let lock = match serialise {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(self.path.join("troops-fetch.lock"))
                    .and_then(|f| f.lock().map(|()| f))
                    .map_err(|e| fail(&e))?,
            ),
            false => None,
        };
        let outcome = prepared
            .receive(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(|e| fail(&e))?;
        self.share_packs().map_err(|e| fail(&e))?;
        drop(lock);
        Ok(outcome
            .ref_map
            .mappings
            .iter()
            .filter(|m| m.local.as_ref().is_some_and(|l| l == tracking))
            .find_map(|m| m.remote.as_id())
            .map(|id| CommitId(id.to_owned())))
    }

    /// Remove git lock files (`*.lock`: refs, packed-refs, HEAD, config) older than
    /// `older_than`, which a process killed mid-write left: git never removes them itself,
    /// and each one makes every later update of that ref fail. Call with the node lock held
    /// (then nothing else writes here). The paths removed, relative to the repo.
    pub fn remove_stale_locks(&self, older_than: std::time::Duration) -> Vec<String> {
        let mut removed = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if meta.is_dir() {
                    if dir == self.path && name == "objects" {
                        continue;
                    }
                    stack.push(path);
                    continue;
                }
                // troops-fetch.lock is troops' own flock file, never a stale git lock.
                let stale = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age >= older_than);
                if name.ends_with(".lock")
                    && name != "troops-fetch.lock"
                    && meta.is_file()
                    && stale
                    && std::fs::remove_file(&path).is_ok()
                {
                    let rel = path.strip_prefix(&self.path).unwrap_or(&path);
                    removed.push(rel.display().to_string());
                }
            }
        }
        removed.sort();
        removed
    }

    /// Fetch `branch` from the local repository at `url` (a path or file:// URL) into
    /// `tracking`, reading it with the admin group's rights only: git's upload-pack runs as
    /// the unprivileged `nobody` with `gid` as its one group. A repository members can write
    /// (or name in a remote) then gives root nothing a member could not read already, and a
    /// symlink planted in it to a root-only repository leads nowhere. `fsck` checks every
    /// object that arrives (what members wrote). `Ok(None)` when there is no such branch.
    pub fn fetch_local_as_group(
        &self,
        remote: &str,
        url: &str,
        branch: &str,
        tracking: &str,
        gid: u32,
        fsck: bool,
    ) -> Result<Option<CommitId>, RepoError> {
        let fail = |message: String| RepoError::Fetch {
            remote: remote.to_owned(),
            url: url.to_owned(),
            message,
        };
        // setpriv (util-linux, Essential in Debian) drops to nobody: git passes this through
        // a shell, with the repository's path appended quoted.
        let upload_pack = format!(
            "setpriv --reuid={NOBODY} --regid={gid} --clear-groups --inh-caps=-all -- git -c safe.directory=* -c core.hooksPath=/dev/null upload-pack"
        );
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(&self.path)
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
            ])
            .args(["-c", "protocol.file.allow=always", "-c", "gc.auto=0"])
            .args([
                "-c",
                "maintenance.auto=false",
                "-c",
                "fetch.writeCommitGraph=false",
            ])
            .args(["-c", &format!("transfer.fsckObjects={fsck}")])
            .args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"])
            .args(["--no-recurse-submodules", "--no-auto-gc", "--upload-pack"])
            .arg(upload_pack)
            .arg("--")
            .arg(url)
            .arg(format!("+refs/heads/{branch}:{tracking}"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| fail(format!("failed to run git fetch: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("couldn't find remote ref") {
                return Ok(None);
            }
            let said: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            return Err(fail(said.join("; ")));
        }
        self.ref_target(tracking)
    }

    /// gix writes packs readable by their owner only; pushers (the admin group) must read
    /// them too, or their receive-pack cannot see the commits the node fetched.
    fn share_packs(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.repo.objects.store_ref().path().join("pack");
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o040 == 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o040))?;
            }
        }
        Ok(())
    }

    /// `git gc --auto`: gix never repacks, and every fetch that brings objects adds a pack;
    /// git's own thresholds (gc.autoPackLimit, gc.auto) decide whether anything is done.
    pub fn maintain(&self) -> Result<(), RepoError> {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(&self.path)
            // In the foreground: a detached gc would be killed with a oneshot unit's cgroup.
            // Hooks off (pre-auto-gc), whatever any config says.
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(["-c", "gc.autoDetach=false", "gc", "--auto", "--quiet"])
            .output()
            .map_err(|e| RepoError::Git {
                path: self.path.clone(),
                what: "run git gc --auto".into(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(RepoError::Git {
                path: self.path.clone(),
                what: "run git gc --auto".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Every ref whose target object is not in the repository (a pack holding it was lost
    /// or set aside): its name and the id it names.
    pub fn refs_to_missing(&self) -> Result<Vec<(String, CommitId)>, RepoError> {
        let mut refs = self.all_refs()?;
        refs.retain(|(_, id)| !self.has(*id));
        Ok(refs)
    }

    /// Every ref that names an object directly, with that id.
    pub fn all_refs(&self) -> Result<Vec<(String, CommitId)>, RepoError> {
        let platform = self
            .repo
            .references()
            .map_err(self.err("list references"))?;
        let mut refs = Vec::new();
        for r in platform.all().map_err(self.err("list references"))? {
            let Ok(r) = r else { continue };
            if let Some(id) = r.target().try_id() {
                refs.push((r.name().as_bstr().to_string(), CommitId(id.to_owned())));
            }
        }
        Ok(refs)
    }

    /// Remove `name` if it still points at `expected`.
    pub fn delete_ref(&self, name: &str, expected: CommitId) -> Result<(), RepoError> {
        let edit = RefEdit {
            change: Change::Delete {
                expected: PreviousValue::MustExistAndMatch(gix::refs::Target::Object(expected.0)),
                log: RefLog::AndReference,
            },
            name: name
                .try_into()
                .map_err(self.err(format!("use {name:?} as a reference name")))?,
            deref: false,
        };
        self.repo
            .edit_references([edit])
            .map_err(self.err(format!("delete {name}")))?;
        Ok(())
    }

    /// The id a ref names, without reading the object: still answers when the object is
    /// lost. `Ok(None)` if the ref does not exist or is symbolic.
    pub fn ref_id(&self, name: &str) -> Result<Option<CommitId>, RepoError> {
        let r = self
            .repo
            .try_find_reference(name)
            .map_err(self.err(format!("read {name}")))?;
        Ok(r.and_then(|r| r.target().try_id().map(|id| CommitId(id.to_owned()))))
    }

    /// Whether the object `id` is in the repository.
    pub fn has(&self, id: CommitId) -> bool {
        self.repo.has_object(id.0)
    }

    /// The commit a ref points at, peeled; `Ok(None)` if the ref does not exist.
    pub fn ref_target(&self, name: &str) -> Result<Option<CommitId>, RepoError> {
        let Some(mut r) = self
            .repo
            .try_find_reference(name)
            .map_err(self.err(format!("read {name}")))?
        else {
            return Ok(None);
        };
        let id = r
            .peel_to_id()
            .map_err(self.err(format!("resolve {name}")))?;
        Ok(Some(CommitId(id.detach())))
    }

    /// Point `name` at `new` only if it still points at `expected` (`None`: must not exist).
    pub fn update_ref(
        &self,
        name: &str,
        new: CommitId,
        expected: Option<CommitId>,
        message: &str,
    ) -> Result<(), RepoError> {
        let previous = match expected {
            Some(old) => PreviousValue::MustExistAndMatch(gix::refs::Target::Object(old.0)),
            None => PreviousValue::MustNotExist,
        };
        let edit = RefEdit {
            change: Change::Update {
                log: LogChange {
                    mode: RefLog::AndReference,
                    force_create_reflog: false,
                    message: message.into(),
                },
                expected: previous,
                new: gix::refs::Target::Object(new.0),
            },
            name: name
                .try_into()
                .map_err(self.err(format!("use {name:?} as a reference name")))?,
            deref: false,
        };
        let time = format!(
            "{} +0000",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        // A bare repo has no user.name; the reflog still wants a committer.
        let committer = gix::actor::SignatureRef {
            name: "troops".into(),
            email: "troops@localhost".into(),
            time: &time,
        };
        self.repo
            .edit_references_as([edit], Some(committer))
            .map_err(|e| {
                // Tell a lost race apart from a broken repository: the caller reports it as such.
                match self.ref_target(name) {
                    Ok(now) if now != expected => RepoError::Moved {
                        reference: name.to_owned(),
                        expected: expected.map_or("nothing".into(), |c| c.to_string()),
                    },
                    _ => self.err(format!("update {name}"))(e),
                }
            })?;
        Ok(())
    }

    /// Every commit reachable from `tip` but not from `stop`, with its parents, committer
    /// time and message: the graph rollout and signature decisions are made over.
    pub fn commit_graph(
        &self,
        tip: CommitId,
        stop: Option<CommitId>,
    ) -> Result<Vec<GraphCommit>, RepoError> {
        let mut out = Vec::new();
        for id in self.commits_between(tip, stop)? {
            let commit = self
                .repo
                .find_commit(id.0)
                .map_err(self.err(format!("find commit {id}")))?;
            let time = commit
                .time()
                .map_err(self.err(format!("read the date of {id}")))?;
            let message = commit
                .message_raw()
                .map_err(self.err(format!("read the message of {id}")))?
                .to_string();
            out.push(GraphCommit {
                id,
                parents: commit.parent_ids().map(|p| CommitId(p.detach())).collect(),
                time: time.seconds,
                message,
            });
        }
        Ok(out)
    }

    /// Every commit reachable from `tip` but not from `stop`, merged side branches included.
    pub fn commits_between(
        &self,
        tip: CommitId,
        stop: Option<CommitId>,
    ) -> Result<Vec<CommitId>, RepoError> {
        let walk = self.repo.rev_walk([tip.0]).with_hidden(stop.map(|s| s.0));
        let mut out = Vec::new();
        for info in walk
            .all()
            .map_err(self.err(format!("walk the history of {tip}")))?
        {
            let info = info.map_err(self.err(format!("walk the history of {tip}")))?;
            out.push(CommitId(info.id));
        }
        Ok(out)
    }

    /// Whether `ancestor` is reachable from `descendant` (equal counts).
    pub fn is_ancestor(&self, ancestor: CommitId, descendant: CommitId) -> Result<bool, RepoError> {
        if ancestor == descendant {
            return Ok(true);
        }
        let base = self
            .repo
            .merge_base(ancestor.0, descendant.0)
            .map_err(self.err(format!(
                "find the merge base of {ancestor} and {descendant}"
            )));
        match base {
            Ok(base) => Ok(base.map(|b| b.detach()) == Some(ancestor.0)),
            // Unrelated histories have no merge base; gix reports that as an error.
            Err(_) if !self.exists(ancestor) || !self.exists(descendant) => Err(RepoError::Git {
                path: self.path.clone(),
                what: format!("find {ancestor} or {descendant}"),
                message: "object missing".into(),
            }),
            Err(_) => Ok(false),
        }
    }

    fn exists(&self, id: CommitId) -> bool {
        self.repo.has_object(id.0)
    }

    fn tree_of(&self, commit: CommitId) -> Result<gix::Tree<'_>, RepoError> {
        self.repo
            .find_commit(commit.0)
            .map_err(self.err(format!("find commit {commit}")))?
            .tree()
            .map_err(self.err(format!("find the tree of {commit}")))
    }

    /// The object id of `path` in `commit`'s tree (a tree for a directory), if it exists.
    pub fn entry_id(&self, commit: CommitId, path: &str) -> Result<Option<String>, RepoError> {
        let tree = self.tree_of(commit)?;
        if path.is_empty() {
            return Ok(Some(tree.id.to_string()));
        }
        let entry = tree
            .lookup_entry_by_path(path)
            .map_err(self.err(format!("look up {path} in {commit}")))?;
        Ok(entry.map(|e| e.object_id().to_string()))
    }

    /// The contents of the file at `path` in `commit`, if it is there.
    pub fn read_file(&self, commit: CommitId, path: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let tree = self.tree_of(commit)?;
        let Some(entry) = tree
            .lookup_entry_by_path(path)
            .map_err(self.err(format!("look up {path} in {commit}")))?
        else {
            return Ok(None);
        };
        if !entry.mode().is_blob() {
            return Ok(None);
        }
        let object = entry
            .object()
            .map_err(self.err(format!("read {path} in {commit}")))?;
        Ok(Some(object.data.clone()))
    }

    /// Every file of `commit`'s tree, sorted by path as git sorts them.
    pub fn files(&self, commit: CommitId) -> Result<Vec<TreeFile>, RepoError> {
        let tree = self.tree_of(commit)?.id;
        let index = self
            .repo
            .index_from_tree(&tree)
            .map_err(self.err(format!("list the files of {commit}")))?;
        Ok(index
            .entries()
            .iter()
            .map(|e| TreeFile {
                path: e.path(&index).to_string(),
                kind: match e.mode {
                    gix::index::entry::Mode::FILE => FileKind::Regular,
                    gix::index::entry::Mode::FILE_EXECUTABLE => FileKind::Executable,
                    gix::index::entry::Mode::SYMLINK => FileKind::Symlink,
                    _ => FileKind::Other,
                },
                id: e.id.to_string(),
            })
            .collect())
    }

    /// The id git gives a blob holding `data` (hex), to compare a file with a tree's.
    pub fn blob_id(&self, data: &[u8]) -> String {
        gix::objs::compute_hash(self.repo.object_hash(), gix::objs::Kind::Blob, data)
            .map(|id| id.to_string())
            .unwrap_or_default()
    }

    /// The contents of the blob `id` (hex), as `files` names it.
    pub fn blob(&self, id: &str) -> Result<Vec<u8>, RepoError> {
        let oid = gix::ObjectId::from_hex(id.as_bytes())
            .map_err(self.err(format!("parse object id {id}")))?;
        let object = self
            .repo
            .find_object(oid)
            .map_err(self.err(format!("read blob {id}")))?;
        Ok(object.detach().data)
    }

    /// Write `commit`'s tree into `dest`, which must not exist yet. The caller builds into a
    /// fresh temp dir and renames it, because gix's checkout never deletes stale files.
    pub fn checkout(&self, commit: CommitId, dest: &Path) -> Result<(), RepoError> {
        let fail = |message: String| RepoError::Checkout {
            commit,
            path: dest.to_owned(),
            message,
        };
        let tree = self.tree_of(commit)?.id;
        let mut index = self
            .repo
            .index_from_tree(&tree)
            .map_err(|e| fail(chain(&e)))?;
        let mut options = self
            .repo
            .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
            .map_err(|e| fail(chain(&e)))?;
        options.destination_is_initially_empty = true;
        std::fs::create_dir(dest).map_err(|e| fail(e.to_string()))?;
        let objects = self
            .repo
            .objects
            .clone()
            .into_arc()
            .map_err(|e| fail(e.to_string()))?;
        let outcome = gix::worktree::state::checkout(
            &mut index,
            dest,
            objects,
            &gix::progress::Discard,
            &gix::progress::Discard,
            &AtomicBool::new(false),
            options,
        )
        .map_err(|e| fail(chain(&e)))?;
        if let Some(e) = outcome.errors.first() {
            return Err(fail(format!("{}: {}", e.path, chain(&e.error))));
        }
        if let Some(c) = outcome.collisions.first() {
            return Err(fail(format!("path collision at {}", c.path)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_survive_redaction() {
        for (url, shown) in [
            (
                "https://deploy:t0k@host/x.git",
                "https://deploy:***@host/x.git",
            ),
            (
                "https://ghp_t0k@github.com/o/r.git",
                "https://***@github.com/o/r.git",
            ),
            (
                "https://host/x.git?access_token=t0k",
                "https://host/x.git?***",
            ),
            ("ssh://git@host/x.git", "ssh://git@host/x.git"),
            ("ssh://git:pw@host/x.git", "ssh://git:***@host/x.git"),
            ("https://host/a@b/x.git", "https://host/a@b/x.git"),
            ("git@host:x.git", "git@host:x.git"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn credentials_come_out_of_the_url() {
        assert_eq!(
            split_credentials("https://ghp_t0k@github.com/o/r.git"),
            Some((
                "ghp_t0k".into(),
                String::new(),
                "https://github.com/o/r.git".into()
            ))
        );
        assert_eq!(split_credentials("ssh://git@host/x.git"), None);
        assert_eq!(split_credentials("https://host/a@b/x"), None);
    }
}
