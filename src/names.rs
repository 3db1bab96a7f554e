//! What an operator may call a remote, a role or a branch, and which remote URLs are allowed.
//! Checked before anything is written, so a typo never reaches the node's state.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "invalid remote name {0:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    Remote(String),
    #[error(
        "invalid role name {0:?}: use letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    Role(String),
    #[error("invalid branch name {0:?}: {1}")]
    Branch(String, String),
    #[error("remote {name:?}: unsupported URL {url:?}: {why}")]
    Url {
        name: String,
        url: String,
        why: &'static str,
    },
    #[error("invalid remote {0:?}: expected NAME=URL")]
    RemoteSpec(String),
    #[error("invalid user name {0:?}")]
    User(String),
}

fn is_simple_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.contains("..")
        && !s.ends_with(".lock")
}

pub fn check_remote_name(name: &str) -> Result<(), NameError> {
    is_simple_name(name)
        .then_some(())
        .ok_or_else(|| NameError::Remote(name.to_owned()))
}

pub fn check_role(role: &str) -> Result<(), NameError> {
    is_simple_name(role)
        .then_some(())
        .ok_or_else(|| NameError::Role(role.to_owned()))
}

/// A POSIX user or group name as Debian's adduser accepts it.
pub fn check_user(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    ok.then_some(())
        .ok_or_else(|| NameError::User(name.to_owned()))
}

/// Git's own rules for a branch name (check-ref-format), minus the ones that only make sense
/// for other refs.
pub fn check_branch(branch: &str) -> Result<(), NameError> {
    let bad = |why: &str| Err(NameError::Branch(branch.to_owned(), why.to_owned()));
    if branch.is_empty() {
        return bad("it is empty");
    }
    if branch.starts_with('-') || branch.starts_with('/') || branch.ends_with('/') {
        return bad("it may not start with '-' or '/' or end with '/'");
    }
    if branch.contains("..") || branch.contains("//") || branch.contains("@{") {
        return bad("it may not contain '..', '//' or '@{'");
    }
    if branch.ends_with(".lock") || branch.ends_with('.') || branch == "@" || branch == "HEAD" {
        return bad("it may not be '@' or 'HEAD' or end with '.' or '.lock'");
    }
    if branch.split('/').any(|c| c.starts_with('.')) {
        return bad("no path component may start with '.'");
    }
    if branch
        .chars()
        .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
    {
        return bad("it may not contain spaces, control characters or any of ~^:?*[\\");
    }
    Ok(())
}

/// Accept the transports a fleet uses: ssh (URL or scp-like), https/http, git, file and plain
/// local paths. Anything else, and git's `ext::` helper transport above all (it runs an
/// arbitrary command), is refused.
pub fn check_url(name: &str, url: &str) -> Result<(), NameError> {
    let bad = |why| {
        Err(NameError::Url {
            name: name.to_owned(),
            // Errors are printed and logged: never with the password a URL may carry.
            url: crate::repo::redact_url(url),
            why,
        })
    };
    if url.is_empty() {
        return bad("it is empty");
    }
    if !url.contains("://") && url.contains("::") {
        return bad("remote helper transports (like ext::) are not allowed");
    }
    if url.chars().any(|c| c.is_control() || c == ' ') {
        return bad("it contains spaces or control characters");
    }
    // What a terminal shows reordered (a right-to-left override) or what stood for bytes
    // that were not UTF-8: the URL shown would not be the URL fetched.
    if url.chars().any(|c| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')) {
        return bad("it contains a bidirectional-text control character");
    }
    if url.contains('\u{fffd}') {
        return bad("it contains U+FFFD, which stands for bytes that were not UTF-8");
    }
    if url.starts_with('-') {
        return bad("it starts with '-'");
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        // Where the host ends is read differently by different parsers when the authority
        // holds `?`, `#` or `\\` (gix ends it at `?`; a userinfo split at the last `@` does
        // not): such a URL could be fetched from one host and matched to another's config.
        let authority = rest.split('/').next().unwrap_or_default();
        if scheme != "file" && authority.contains(['?', '#', '\\']) {
            return bad("its host part contains '?', '#' or '\\'");
        }
        return match scheme {
            "ssh" | "git+ssh" | "ssh+git" | "https" | "http" | "git" if !rest.is_empty() => Ok(()),
            "file" if rest.starts_with('/') => Ok(()),
            "file" => bad("a file:// URL needs an absolute path"),
            _ => bad("the scheme must be ssh, https, http, git or file"),
        };
    }
    if url.starts_with('/') {
        return Ok(());
    }
    // scp-like `[user@]host:path`; a colon after a slash would make it a relative path.
    match url.split_once(':') {
        Some((host, path)) if !host.is_empty() && !host.contains('/') && !path.is_empty() => Ok(()),
        _ => bad(
            "expected an ssh, https, http, git or file URL, user@host:path, or an absolute path",
        ),
    }
}

/// Whether fetching `url` runs ssh, and so needs the node's key: an ssh URL or the
/// scp-like `[user@]host:path` (as `check_url` reads it).
pub fn needs_ssh_key(url: &str) -> bool {
    match url.split_once("://") {
        Some((scheme, _)) => matches!(scheme, "ssh" | "git+ssh" | "ssh+git"),
        None => {
            !url.starts_with('/')
                && url
                    .split_once(':')
                    .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
        }
    }
}

/// Split `NAME=URL` as given on the command line.
pub fn parse_remote_spec(spec: &str) -> Result<(String, String), NameError> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| NameError::RemoteSpec(spec.to_owned()))?;
    check_remote_name(name)?;
    check_url(name, url)?;
    Ok((name.to_owned(), url.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "file:///srv/a.git",
            "/srv/a.git",
            "git@repos.example.com:deploy",
            "ssh://git@host:2222/x.git",
            "https://git.example.com/deploy.git",
            "git://host/x",
            "https://host/x.git?query=1",
        ] {
            assert_eq!(check_url("o", ok), Ok(()), "{ok}");
        }
        for bad in [
            "ext::sh -c touch% /tmp/pwned",
            "fd::17",
            "ftp://host/x",
            "file://relative",
            "relative/path",
            "-oProxyCommand=x:y",
            "",
            "host:",
            "https://evil.example?@git.corp/x.git",
            "https://evil.example#@git.corp/x.git",
            "https://evil.example\\@git.corp/x.git",
        ] {
            assert!(check_url("o", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_role("web").is_ok());
        assert!(check_role("db-primary.eu").is_ok());
        for bad in ["", "-x", "a b", "a/b", "../x", "x.lock", "é"] {
            assert!(check_role(bad).is_err(), "{bad}");
            assert!(check_remote_name(bad).is_err(), "{bad}");
        }
        assert!(check_branch("master").is_ok());
        assert!(check_branch("release/2026").is_ok());
        for bad in [
            "", "a..b", "x.lock", "-x", "a b", "a:b", ".hidden", "HEAD", "a/",
        ] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn which_urls_need_the_key() {
        for url in ["git@h:x", "h:x.git", "ssh://git@h:22/x", "git+ssh://h/x"] {
            assert!(needs_ssh_key(url), "{url}");
        }
        for url in [
            "file:///srv/x.git",
            "/srv/x.git",
            "https://h/x.git",
            "git://h/x",
            "http://h:80/x",
        ] {
            assert!(!needs_ssh_key(url), "{url}");
        }
    }

    #[test]
    fn remote_spec() {
        assert_eq!(
            parse_remote_spec("a=file:///srv/a.git").unwrap(),
            ("a".into(), "file:///srv/a.git".into())
        );
        assert!(matches!(
            parse_remote_spec("nourl"),
            Err(NameError::RemoteSpec(_))
        ));
        assert!(matches!(
            parse_remote_spec("x=ext::sh"),
            Err(NameError::Url { .. })
        ));
    }
}
