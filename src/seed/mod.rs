//! First-boot seeds: where a node learns its remotes and roles, once. Sources are tried in
//! one fixed order (DESIGN.md, "Seed sources"); the first that holds a `troops` section wins,
//! and flags on the command line override it.
//!
//! To add a source: a variant in `SourceKind`, its place in `SourceKind::ORDER`, and a
//! `read` arm that returns `Ok(None)` when it has nothing (no file, a 404), never an error.

pub mod imds;
pub mod preseed;
pub mod userdata;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names;

pub use crate::settings::Verify;

/// The `troops` section of a seed, parsed strictly: an unknown key is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    #[serde(default)]
    pub remotes: BTreeMap<String, String>,
    pub branch: Option<String>,
    pub roles: Option<Vec<String>>,
    pub admins: Option<Vec<String>>,
    pub known_hosts: Option<Vec<String>>,
    pub allowed_signers: Option<Vec<String>>,
    pub verify: Option<Verify>,
    /// The HTTP(S) proxy every fetch goes through (written as `http.proxy` in the node's
    /// system git config), so that a first boot behind an egress proxy works.
    pub proxy: Option<String>,
    /// PEM certificates trusted for HTTPS remotes beside the system's roots (a company CA).
    pub ca_certs: Option<String>,
}

#[derive(Debug, Error)]
pub enum SeedError {
    #[error("{origin}: {message}")]
    Malformed { origin: String, message: String },
    #[error("{origin}: troops.{key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: failed to read: {message}")]
    Read { origin: String, message: String },
    #[error(transparent)]
    Imds(#[from] imds::ImdsError),
    #[error("no seed found; looked at: {}", .0.join("; "))]
    NotFound(Vec<String>),
}

impl Seed {
    /// Check every value, naming the key and where it came from.
    pub fn validate(&self, origin: &str) -> Result<(), SeedError> {
        let invalid = |key: &str, message: String| SeedError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        for (name, url) in &self.remotes {
            names::check_remote_name(name).map_err(|e| invalid("remotes", e.to_string()))?;
            names::check_url(name, url).map_err(|e| invalid("remotes", e.to_string()))?;
        }
        if let Some(b) = &self.branch {
            names::check_branch(b).map_err(|e| invalid("branch", e.to_string()))?;
        }
        for r in self.roles.iter().flatten() {
            names::check_role(r).map_err(|e| invalid("roles", e.to_string()))?;
        }
        for a in self.admins.iter().flatten() {
            names::check_user(a).map_err(|e| invalid("admins", e.to_string()))?;
        }
        for (key, lines) in [
            ("known_hosts", &self.known_hosts),
            ("allowed_signers", &self.allowed_signers),
        ] {
            for l in lines.iter().flatten() {
                if l.trim().is_empty() || l.contains('\n') || l.split_whitespace().count() < 3 {
                    return Err(invalid(
                        key,
                        format!(
                            "{l:?} is not a line of the form `HOSTS|PRINCIPALS KEYTYPE BASE64KEY`"
                        ),
                    ));
                }
            }
        }
        if let Some(p) = &self.proxy {
            check_proxy(p).map_err(|m| invalid("proxy", m))?;
        }
        if let Some(pem) = &self.ca_certs {
            // The file is world-readable: a key pasted with a certificate must not land there.
            if let Some(label) = pem
                .lines()
                .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
                .map(|l| l.trim_end_matches('-'))
                .find(|l| *l != "CERTIFICATE" && *l != "TRUSTED CERTIFICATE")
            {
                return Err(invalid(
                    "ca_certs",
                    format!("holds a {label} block; only certificates belong here"),
                ));
            }
            crate::repo::check_ca_bundle(pem.as_bytes()).map_err(|m| invalid("ca_certs", m))?;
        }
        Ok(())
    }

    /// `over` wins wherever it says something: flags over a seed.
    pub fn merged(self, over: Seed) -> Seed {
        let mut remotes = self.remotes;
        remotes.extend(over.remotes);
        Seed {
            remotes,
            branch: over.branch.or(self.branch),
            roles: over.roles.or(self.roles),
            admins: over.admins.or(self.admins),
            known_hosts: over.known_hosts.or(self.known_hosts),
            allowed_signers: over.allowed_signers.or(self.allowed_signers),
            verify: over.verify.or(self.verify),
            proxy: over.proxy.or(self.proxy),
            ca_certs: over.ca_certs.or(self.ca_certs),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Seed::default()
    }
}

/// A proxy as git's `http.proxy` takes it: `[scheme://]host:port`, over http or https.
/// Credentials are refused: the system git config they would live in is world-readable.
fn check_proxy(proxy: &str) -> Result<(), String> {
    let (scheme, rest) = proxy.split_once("://").unwrap_or(("http", proxy));
    if !matches!(scheme, "http" | "https") {
        return Err(format!(
            "{}: the scheme must be http or https (SOCKS proxies are not supported)",
            crate::repo::redact_url(proxy)
        ));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "{}: credentials in a proxy URL are not supported (they would be readable by every user in /etc/gitconfig)",
            crate::repo::redact_url(&format!("http://{authority}"))
        ));
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if host.is_empty() || proxy.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{proxy:?} is not a proxy URL (http://host:port)"));
    }
    Ok(())
}

/// Where a seed can come from, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `--seed FILE`: any user-data format.
    File(PathBuf),
    /// `--preseed FILE`: a d-i preseed file.
    PreseedFile(PathBuf),
    /// The debconf answers the package was installed with.
    Debconf,
    /// The schema-clean seed cloud-init's `write_files` put on the node.
    SeedFile,
    /// cloud-init's own copy of the user data.
    CloudInit,
    /// A NoCloud seed directory.
    NoCloud,
    /// EC2 instance metadata (IMDSv2), only where the machine is on EC2 or settings name an
    /// endpoint, so that a machine off EC2 never waits on 169.254.169.254.
    Imds {
        endpoint: String,
        deadline: Duration,
    },
}

pub const EC2_IMDS: &str = "http://169.254.169.254";

/// Where the sources look, relative to the node's root.
const DEBCONF_DB: &str = "var/cache/debconf/config.dat";
const CLOUD_INIT_COPY: &str = "var/lib/cloud/instance/user-data.txt";
const NOCLOUD_DIRS: [&str; 2] = [
    "var/lib/cloud/seed/nocloud",
    "var/lib/cloud/seed/nocloud-net",
];

/// Whether DMI says this machine is an EC2 instance (Nitro or Xen).
pub fn on_ec2(root: &Path) -> bool {
    let read = |f: &str| {
        std::fs::read_to_string(root.join("sys/class/dmi/id").join(f)).unwrap_or_default()
    };
    read("sys_vendor").trim() == "Amazon EC2"
        || read("board_vendor").trim() == "Amazon EC2"
        || read("product_uuid").to_ascii_lowercase().starts_with("ec2")
        || read("bios_version").contains("amazon")
}

/// The sources to try, in order.
pub fn sources(
    root: &Path,
    file: Option<&Path>,
    preseed: Option<&Path>,
    imds: Option<(String, Duration)>,
) -> Vec<SourceKind> {
    let mut out = Vec::new();
    if let Some(f) = file {
        out.push(SourceKind::File(f.to_owned()));
    }
    if let Some(p) = preseed {
        out.push(SourceKind::PreseedFile(p.to_owned()));
    }
    out.extend([
        SourceKind::Debconf,
        SourceKind::SeedFile,
        SourceKind::CloudInit,
        SourceKind::NoCloud,
    ]);
    if let Some((endpoint, deadline)) = imds {
        out.push(SourceKind::Imds { endpoint, deadline });
    } else if on_ec2(root) {
        out.push(SourceKind::Imds {
            endpoint: EC2_IMDS.into(),
            deadline: Duration::from_secs(120),
        });
    }
    out
}

/// What one source said.
#[derive(Debug)]
pub enum Found {
    Seed {
        seed: Seed,
        origin: String,
    },
    /// It had user data, but no troops section in it.
    NoSection(String),
    Nothing(String),
    /// It would not say, for this reason.
    Refused(String, String),
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, SeedError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SeedError::Read {
            origin: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// A file only root may have written: it says which remotes root fetches and runs code
/// from. Not a symlink, a regular file owned by root that no one else may write, in a
/// directory no one else may write.
fn read_root_only(path: &Path) -> Result<Option<Vec<u8>>, SeedError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let refuse = |message: String| SeedError::Read {
        origin: path.display().to_string(),
        message,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refuse(
                "is a symlink; troops reads the seed only from a file root wrote".into(),
            ));
        }
        Err(e) => return Err(refuse(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| refuse(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir_meta = std::fs::symlink_metadata(dir).map_err(|e| refuse(e.to_string()))?;
    for (what, m) in [("it", &meta), ("its directory", &dir_meta)] {
        if m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "{what} is owned by uid {} with mode {:o}: a seed says what root runs, so only root may write it (chown root, chmod go-w)",
                m.uid(),
                m.mode() & 0o7777
            )));
        }
    }
    if !meta.is_file() {
        return Err(refuse("is not a regular file".into()));
    }
    let mut out = Vec::new();
    file.by_ref()
        .take(MAX_SEED_FILE + 1)
        .read_to_end(&mut out)
        .map_err(|e| refuse(e.to_string()))?;
    if out.len() as u64 > MAX_SEED_FILE {
        return Err(refuse(format!("is larger than {MAX_SEED_FILE} bytes")));
    }
    Ok(Some(out))
}

/// A seed is a few lines; a bigger file is not one.
const MAX_SEED_FILE: u64 = 1 << 20;

fn from_userdata(bytes: &[u8], origin: String) -> Result<Found, SeedError> {
    Ok(match userdata::parse(bytes, &origin)? {
        userdata::Section::Found(seed) => Found::Seed { seed, origin },
        userdata::Section::Absent(None) => Found::NoSection(origin),
        userdata::Section::Absent(Some(why)) => {
            Found::Refused(origin, format!("no troops section: {why}"))
        }
    })
}

impl SourceKind {
    pub fn read(&self, root: &Path) -> Result<Found, SeedError> {
        match self {
            SourceKind::File(path) => {
                let origin = path.display().to_string();
                let bytes = std::fs::read(path).map_err(|e| SeedError::Read {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
                from_userdata(&bytes, origin)
            }
            SourceKind::PreseedFile(path) => {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| SeedError::Read {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
                Ok(match preseed::parse_preseed(&text, &origin)? {
                    Some(seed) => Found::Seed { seed, origin },
                    None => Found::NoSection(origin),
                })
            }
            SourceKind::Debconf => {
                let path = root.join(DEBCONF_DB);
                let origin = format!("debconf answers ({})", path.display());
                let Some(bytes) = read_optional(&path)? else {
                    return Ok(Found::Nothing(origin));
                };
                Ok(
                    match preseed::parse_debconf_db(&String::from_utf8_lossy(&bytes), &origin)? {
                        Some(seed) => Found::Seed { seed, origin },
                        None => Found::Nothing(origin),
                    },
                )
            }
            SourceKind::SeedFile => {
                let path = root.join(userdata::SEED_FILE.trim_start_matches('/'));
                let origin = path.display().to_string();
                let Some(bytes) = read_root_only(&path)? else {
                    return Ok(Found::Nothing(origin));
                };
                let Some(seed) = userdata::parse_seed_file(&bytes, &origin)? else {
                    return Ok(Found::NoSection(origin));
                };
                // A file left from the image's build (cloud-init clean keeps it) must not
                // quietly outrank this instance's own user data.
                let copy = root.join(CLOUD_INIT_COPY);
                if let Some(b) = read_optional(&copy)?
                    && let Ok(userdata::Section::Found(theirs)) =
                        userdata::parse(&b, &copy.display().to_string())
                    && theirs != seed
                {
                    return Err(SeedError::Malformed {
                        origin,
                        message: format!(
                            "differs from the troops seed in this instance's user data ({}): left from an earlier instance or image? Remove the one that is wrong",
                            copy.display()
                        ),
                    });
                }
                Ok(Found::Seed { seed, origin })
            }
            SourceKind::CloudInit => {
                let path = root.join(CLOUD_INIT_COPY);
                match read_optional(&path)? {
                    Some(b) => from_userdata(&b, path.display().to_string()),
                    None => Ok(Found::Nothing(path.display().to_string())),
                }
            }
            SourceKind::NoCloud => {
                for dir in NOCLOUD_DIRS {
                    let path = root.join(dir).join("user-data");
                    if let Some(b) = read_optional(&path)? {
                        return from_userdata(&b, path.display().to_string());
                    }
                }
                Ok(Found::Nothing(format!(
                    "NoCloud seed ({})",
                    root.join(NOCLOUD_DIRS[0]).display()
                )))
            }
            SourceKind::Imds { endpoint, deadline } => {
                let origin = format!("EC2 user data ({endpoint})");
                let client = imds::Imds::new(endpoint, *deadline);
                match client.user_data(&mut |line| tracing::warn!("{line}"))? {
                    imds::UserData::Found(b) => from_userdata(&b, origin),
                    imds::UserData::Absent => Ok(Found::Nothing(origin)),
                    imds::UserData::Refused(why) => Ok(Found::Refused(origin, why)),
                }
            }
        }
    }
}

/// Try `sources` in order; the first with a troops section wins.
pub fn discover(root: &Path, sources: &[SourceKind]) -> Result<(Seed, String), SeedError> {
    let mut looked = Vec::new();
    for source in sources {
        match source.read(root)? {
            Found::Seed { seed, origin } => {
                seed.validate(&origin)?;
                return Ok((seed, origin));
            }
            Found::NoSection(origin) => {
                looked.push(format!("{origin} (user data without a troops section)"))
            }
            Found::Nothing(origin) => looked.push(format!("{origin} (none)")),
            Found::Refused(origin, why) => looked.push(format!("{origin} ({why})")),
        }
    }
    if !sources.iter().any(|s| matches!(s, SourceKind::Imds { .. })) {
        looked.push("EC2 IMDS (not asked: DMI does not say EC2 and no imds setting)".into());
    }
    Err(SeedError::NotFound(looked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_seed() {
        let seed = Seed {
            remotes: [("origin".to_string(), "git@a:x".to_string())].into(),
            branch: Some("main".into()),
            roles: Some(vec!["web".into()]),
            ..Seed::default()
        };
        let flags = Seed {
            remotes: [("mirror".to_string(), "git@b:x".to_string())].into(),
            roles: Some(vec!["db".into()]),
            ..Seed::default()
        };
        let m = seed.merged(flags);
        assert_eq!(m.remotes.len(), 2);
        assert_eq!(m.branch.as_deref(), Some("main"));
        assert_eq!(m.roles, Some(vec!["db".to_string()]));
    }

    #[test]
    fn validation_names_the_key() {
        let s = Seed {
            roles: Some(vec!["bad role".into()]),
            ..Seed::default()
        };
        let e = s.validate("user-data").unwrap_err().to_string();
        assert!(e.starts_with("user-data: troops.roles:"), "{e}");
        let s = Seed {
            remotes: [("o".to_string(), "ext::sh".to_string())].into(),
            ..Seed::default()
        };
        assert!(
            s.validate("x")
                .unwrap_err()
                .to_string()
                .contains("troops.remotes")
        );
        let s = Seed {
            known_hosts: Some(vec!["justonefield".into()]),
            ..Seed::default()
        };
        assert!(
            s.validate("x")
                .unwrap_err()
                .to_string()
                .contains("troops.known_hosts")
        );
    }
}

#[cfg(test)]
mod examples {
    //! The examples in cloud-init/ are what operators copy: each must parse as written.
    use std::path::Path;

    fn example(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("cloud-init")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn every_example_parses() {
        for name in ["user-data.yaml", "user-data.json", "user-data.mime"] {
            let super::userdata::Section::Found(seed) =
                super::userdata::parse(&example(name), name).unwrap_or_else(|e| panic!("{e}"))
            else {
                panic!("{name} has no troops section")
            };
            assert_eq!(
                seed.remotes["origin"], "git@repos.example.com:deploy",
                "{name}"
            );
            assert_eq!(seed.roles, Some(vec!["web".to_string()]), "{name}");
        }
        let text = String::from_utf8(example("preseed.cfg")).unwrap();
        let seed = super::preseed::parse_preseed(&text, "preseed.cfg")
            .unwrap()
            .unwrap();
        assert_eq!(seed.remotes.len(), 2);
        assert_eq!(seed.known_hosts.as_ref().map(Vec::len), Some(1));
        // autoinstall carries flags, not a troops section; it must be valid YAML that runs init
        // in the target.
        let auto: serde_json::Value =
            serde_saphyr::from_slice(&example("autoinstall.yaml")).unwrap();
        let late = auto["autoinstall"]["late-commands"][0].as_str().unwrap();
        assert!(
            late.starts_with("curtin in-target -- troops init --no-pull --remote origin="),
            "{late}"
        );
    }
}
