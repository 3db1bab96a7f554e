//! Passwords and tokens for HTTPS remotes, kept out of every URL on disk: init moves a
//! remote URL's `user:token@` here, and only root's fetch reads it back.
//!
//! The file is in git-credential-store's format (one `https://user:password@host/path`
//! per line, user and password percent-encoded), so an operator can read, edit or
//! `git credential-store --file` it. It is written here rather than by running
//! `git credential-store store`: that would need the password on a pipe to a child and
//! could not be made part of init's all-or-nothing write.

use std::path::Path;

/// One stored credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub protocol: String,
    pub host: String,
    /// Empty: any path on the host.
    pub path: String,
    /// As they appear in a URL: percent-encoded.
    pub user: String,
    pub password: String,
}

impl Entry {
    fn parse(line: &str) -> Option<Entry> {
        let (protocol, authority, path) = split_url(line.trim())?;
        let (userinfo, host) = authority.rsplit_once('@')?;
        let (user, password) = userinfo.split_once(':')?;
        Some(Entry {
            protocol: protocol.to_owned(),
            host: host.to_owned(),
            path: path.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    pub fn line(&self) -> String {
        let path = match self.path.is_empty() {
            true => String::new(),
            false => format!("/{}", self.path),
        };
        format!(
            "{}://{}:{}@{}{path}",
            self.protocol, self.user, self.password, self.host
        )
    }

    /// From a URL with `user:password@` in it: the entry and the URL without them.
    pub fn from_url(url: &str) -> Option<(Entry, String)> {
        let (user, password, bare) = crate::repo::split_credentials(url)?;
        let (protocol, rest) = bare.split_once("://")?;
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) => (h, p),
            None => (rest, ""),
        };
        let entry = Entry {
            protocol: protocol.to_owned(),
            host: host.to_owned(),
            path: path.trim_end_matches('/').to_owned(),
            user,
            password,
        };
        Some((entry, bare))
    }

    fn matches(&self, protocol: &str, host: &str, path: &str) -> bool {
        self.protocol == protocol
            && self.host.eq_ignore_ascii_case(host)
            && (self.path.is_empty() || self.path == path.trim_matches('/'))
    }
}

/// Every entry in the store text; lines that are not entries are skipped, as git does.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter_map(Entry::parse).collect()
}

/// The store's text with `entry` in it, replacing one for the same protocol, host and path.
pub fn with_entry(text: &str, entry: &Entry) -> String {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| {
            Entry::parse(l).is_none_or(|e| {
                !(e.protocol == entry.protocol && e.host == entry.host && e.path == entry.path)
            })
        })
        .map(String::from)
        .collect();
    out.push(entry.line());
    out.join("\n") + "\n"
}

/// The account for `url` in the store at `path`, decoded; the most specific entry wins.
pub fn lookup(path: &Path, url: &str) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (protocol, authority, repo_path) = split_url(url)?;
    // The host is what follows the userinfo within the authority, never a later '@' in
    // the path: `https://evil/a@good/x` goes to evil, so it gets nothing of good's.
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if !matches!(protocol, "https" | "http") {
        return None;
    }
    let entries = parse(&text);
    let best = entries
        .iter()
        .filter(|e| e.matches(protocol, host, repo_path))
        .max_by_key(|e| e.path.len())?;
    Some((decode(&best.user), decode(&best.password)))
}

/// `scheme://authority/path` as its three parts; the authority ends at the first '/'.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (protocol, rest) = url.split_once("://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some((protocol, authority, path))
}

/// Percent-decoding of a URL's user or password.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if bytes[i] == b'%'
            && let Some(b) = hex
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_only_to_its_own_host() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("credentials");
        std::fs::write(&store, "https://deploy:t0ken@good.example/x.git\n").unwrap();
        assert_eq!(
            lookup(&store, "https://good.example/x.git"),
            Some(("deploy".into(), "t0ken".into()))
        );
        for elsewhere in [
            "https://evil.example/a@good.example/x.git",
            "https://evil.example/good.example/x.git",
            "https://good.example.evil.example/x.git",
            "https://good.example:8443/x.git",
            "http://good.example/x.git",
            "ssh://good.example/x.git",
            "https://good.example/y.git",
        ] {
            assert_eq!(lookup(&store, elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn a_url_gives_up_its_secret() {
        let (e, bare) = Entry::from_url("https://deploy:s%40cret@git.example.com/x.git").unwrap();
        assert_eq!(bare, "https://git.example.com/x.git");
        assert_eq!(e.line(), "https://deploy:s%40cret@git.example.com/x.git");
        assert!(Entry::from_url("https://git.example.com/x.git").is_none());
        // A token given as the user name is a secret too: stored with an empty password.
        let (e, bare) = Entry::from_url("https://ghp_t0k@git.example.com/x.git").unwrap();
        assert_eq!(bare, "https://git.example.com/x.git");
        assert_eq!(e.line(), "https://ghp_t0k:@git.example.com/x.git");
        assert!(Entry::from_url("ssh://git@git.example.com/x.git").is_none());
    }

    #[test]
    fn lookup_by_host_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials");
        let text = with_entry(
            "",
            &Entry::from_url("https://a:one@h.example/x.git").unwrap().0,
        );
        let text = with_entry(
            &text,
            &Entry::from_url("https://b:t%2Fwo@h.example").unwrap().0,
        );
        let text = with_entry(
            &text,
            &Entry::from_url("https://a:three@h.example/x.git")
                .unwrap()
                .0,
        );
        assert_eq!(text.lines().count(), 2, "{text}");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(
            lookup(&p, "https://h.example/x.git"),
            Some(("a".into(), "three".into()))
        );
        assert_eq!(
            lookup(&p, "https://h.example/y.git"),
            Some(("b".into(), "t/wo".into()))
        );
        assert_eq!(lookup(&p, "http://h.example/x.git"), None);
        assert_eq!(lookup(&p, "https://other.example/x.git"), None);
    }
}
