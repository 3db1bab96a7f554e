//! How the node reaches its git hosting over HTTP(S): what the node's system git config
//! (`<root>/etc/gitconfig`, root's to write) and the unit's environment say about proxies,
//! CAs, certificate checks, extra headers, redirects and credential helpers, decided per
//! remote. Plain data in, a plan out; `repo.rs` carries the plan out with gix.
//!
//! git's own keys and precedence are the interface, so `git config --system` is how an
//! operator sets any of it, and the same file works for git on the node.

use std::path::PathBuf;

/// One `section.subsection.name = value` line of a git config file, in file order. The
/// section is lower-cased; the name is as written (for messages) and compared without case,
/// as git does; the subsection is case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub section: String,
    pub subsection: Option<String>,
    pub name: String,
    /// None: the key without `=` (a boolean true).
    pub value: Option<String>,
}

impl Entry {
    pub fn key(&self) -> String {
        match &self.subsection {
            Some(s) => format!("{}.{s}.{}", self.section, self.name),
            None => format!("{}.{}", self.section, self.name),
        }
    }
}

/// The system git config as troops reads it.
#[derive(Debug, Clone, Default)]
pub struct SystemConfig {
    pub entries: Vec<Entry>,
    /// Whether the file may name programs for root to run: owned by root (or whoever runs
    /// troops) and writable by nobody else.
    pub root_owned: bool,
    /// Whether every user may read it (as /etc/gitconfig usually is): no place for secrets.
    pub world_readable: bool,
    /// Where it was read from, for warnings.
    pub path: String,
}

/// The conventional proxy and CA variables, as the unit's environment sets them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub vars: Vec<(String, String)>,
}

/// What a fetch worker keeps of its parent's environment: the proxy and CA conventions, and
/// nothing that could point ssh or git elsewhere (`GIT_SSH*`, `SSH_AUTH_SOCK`, `GIT_DIR`…).
pub const PASSED_ENV: &[&str] = &[
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

impl Env {
    pub fn from_process() -> Env {
        Env {
            vars: PASSED_ENV
                .iter()
                .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
                .collect(),
        }
    }

    fn get(&self, names: &[&str]) -> Option<&str> {
        names.iter().find_map(|n| {
            self.vars
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// git's default: the first request may be redirected, later ones not.
    Initial,
    All,
    None,
}

/// How one remote is to be fetched over HTTP(S).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The proxy URL, or None to connect directly.
    pub proxy: Option<String>,
    /// A CA bundle that replaces the system's roots (git's `http.sslCAInfo`).
    pub ca_info: Option<PathBuf>,
    /// CAs trusted beside the roots (the seed's `ca_certs`); set by the caller.
    pub extra_roots: Option<PathBuf>,
    pub verify: bool,
    pub extra_headers: Vec<String>,
    pub redirects: Redirects,
    /// `credential.helper` values in order, after the last empty one.
    pub helpers: Vec<String>,
    /// What the operator should hear about on every pull.
    pub warnings: Vec<String>,
}

/// Whether `url` is fetched over HTTP(S), where this module's plan applies.
pub fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The `http.*` keys troops carries out; any other is named in a warning.
const SUPPORTED_HTTP: &[&str] = &[
    "proxy",
    "noproxy",
    "sslcainfo",
    "sslverify",
    "extraheader",
    "followredirects",
];

/// The plan for fetching remote `remote` from `url` (credentials already taken out).
/// `root_named`: root configured this remote (init, the seed); a member's remote does not
/// get secrets given for no host in particular (an unscoped `http.extraHeader` or
/// `credential.helper`): a member chooses its URL, and root's token would go wherever it
/// points.
pub fn plan(config: &SystemConfig, env: &Env, remote: &str, url: &str, root_named: bool) -> Plan {
    let target = UrlParts::parse(url);
    let mut warnings = Vec::new();
    let empty = SystemConfig::default();
    let config = match config.root_owned {
        true => config,
        false => {
            warnings.push(format!(
                "{} is writable by others than root: ignored (proxy, CA, headers, helpers)",
                config.path
            ));
            &empty
        }
    };
    // Whether an entry scoped to `pattern` (None: unscoped) applies to this URL, and how
    // specifically (git's urlmatch: an exact host over a wildcard, then the longer path).
    let rank = |pattern: &Option<String>| -> Option<(u8, usize)> {
        match pattern {
            None => Some((0, 0)),
            Some(p) => target
                .as_ref()
                .and_then(|t| UrlParts::parse(p).and_then(|p| p.matches(t))),
        }
    };
    // The values of `http.<name>` for this URL, in file order, as git collects them: an
    // entry counts if it matches at least as specifically as every one before it.
    let http_values = |name: &str| -> Vec<&Entry> {
        let mut best = (0, 0);
        let mut chosen = Vec::new();
        for e in config
            .entries
            .iter()
            .filter(|e| e.section == "http" && e.name.eq_ignore_ascii_case(name))
        {
            let Some(r) = rank(&e.subsection) else {
                continue;
            };
            if r >= best {
                best = r;
                chosen.push(e);
            }
        }
        chosen
    };
    let last = |name: &str| -> Option<String> {
        http_values(name)
            .last()
            .map(|e| e.value.clone().unwrap_or_else(|| "true".into()))
    };

    let https = target.as_ref().is_some_and(|t| t.scheme == "https");
    let configured = config
        .entries
        .iter()
        .rfind(|e| {
            e.section == "remote"
                && e.subsection.as_deref() == Some(remote)
                && e.name.eq_ignore_ascii_case("proxy")
        })
        .map(|e| e.value.clone().unwrap_or_default())
        .or_else(|| last("proxy"));
    let from_env = || -> Option<String> {
        let scheme_var = match https {
            true => env.get(&["https_proxy", "HTTPS_PROXY"]),
            // curl reads only the lower-case http_proxy (HTTP_PROXY is CGI's to set); so do we.
            false => env.get(&["http_proxy"]),
        };
        scheme_var
            .or_else(|| env.get(&["all_proxy", "ALL_PROXY"]))
            .map(str::to_owned)
    };
    let no_proxy = last("noproxy").or_else(|| env.get(&["no_proxy", "NO_PROXY"]).map(Into::into));
    let proxy = configured
        .or_else(from_env)
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .filter(|_| {
            !target
                .as_ref()
                .is_some_and(|t| no_proxy.as_deref().is_some_and(|n| excluded(&t.host, n)))
        })
        .map(|p| match p.contains("://") {
            true => p,
            // git's rule: a proxy without a scheme is an HTTP proxy.
            false => format!("http://{p}"),
        });

    let verify = match last("sslverify") {
        None => true,
        Some(v) => match parse_bool(&v) {
            Some(b) => b,
            None => {
                warnings.push(format!(
                    "{}: http.sslVerify={v:?} is not a boolean; certificates are checked",
                    config.path
                ));
                true
            }
        },
    };
    if !verify {
        warnings.push(format!(
            "http.sslVerify=false in {}: the TLS certificate of {} is not checked",
            config.path,
            crate::repo::redact_url(url)
        ));
    }
    let redirects = match last("followredirects").as_deref().map(str::to_lowercase) {
        None => Redirects::Initial,
        Some(v) if v == "initial" => Redirects::Initial,
        Some(v) => match parse_bool(&v) {
            Some(true) => Redirects::All,
            Some(false) => Redirects::None,
            None => {
                warnings.push(format!(
                    "{}: http.followRedirects={v:?} is not true, false or initial; using initial",
                    config.path
                ));
                Redirects::Initial
            }
        },
    };
    // Multi-valued: an empty value clears what came before, as in git.
    let mut withheld = Vec::new();
    let mut extra_headers = Vec::new();
    for e in http_values("extraheader") {
        match e.value.as_deref().unwrap_or_default() {
            "" => extra_headers.clear(),
            _ if e.subsection.is_none() && !root_named => withheld.push("http.extraHeader"),
            h => extra_headers.push(h.to_owned()),
        }
    }
    let mut helpers = Vec::new();
    for e in config
        .entries
        .iter()
        .filter(|e| e.section == "credential" && e.name.eq_ignore_ascii_case("helper"))
        .filter(|e| rank(&e.subsection).is_some())
    {
        match e.value.as_deref().unwrap_or_default() {
            "" => helpers.clear(),
            _ if e.subsection.is_none() && !root_named => withheld.push("credential.helper"),
            h => helpers.push(h.to_owned()),
        }
    }
    withheld.dedup();
    if !withheld.is_empty() {
        warnings.push(format!(
            "{}: {} without a URL is not used for remote {remote}, which a member added; \
             scope it to the host (http.<url>.extraHeader, credential.<url>.helper)",
            config.path,
            withheld.join(" and ")
        ));
    }
    if config.world_readable
        && (!extra_headers.is_empty()
            || proxy
                .as_deref()
                .is_some_and(|p| crate::repo::redact_url(p) != p))
    {
        warnings.push(format!(
            "{} is readable by every user and holds a header or proxy password: \
             use /etc/troops/credentials or a credential helper reading a root-only file",
            config.path
        ));
    }
    if proxy.as_deref().is_some_and(|p| p.starts_with("socks")) {
        warnings.push(format!(
            "the proxy {} is a SOCKS proxy, which troops does not support: use an HTTP proxy",
            crate::repo::redact_url(proxy.as_deref().unwrap_or_default())
        ));
    }
    if config
        .entries
        .iter()
        .any(|e| e.section == "include" || e.section == "includeif")
    {
        warnings.push(format!(
            "{}: include and includeIf are not followed by troops",
            config.path
        ));
    }
    let mut unsupported: Vec<String> = config
        .entries
        .iter()
        .filter(|e| {
            e.section == "http" && !SUPPORTED_HTTP.contains(&e.name.to_ascii_lowercase().as_str())
        })
        .map(|e| match &e.subsection {
            Some(s) => format!("http.{s}.{}", e.name),
            None => format!("http.{}", e.name),
        })
        .collect();
    unsupported.dedup();
    if !unsupported.is_empty() {
        warnings.push(format!(
            "{}: not supported by troops and ignored: {}",
            config.path,
            unsupported.join(", ")
        ));
    }
    Plan {
        proxy,
        ca_info: last("sslcainfo")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        extra_roots: None,
        verify,
        extra_headers,
        redirects,
        helpers,
        warnings,
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" | "" => Some(false),
        _ => None,
    }
}

/// Whether `host` is excluded from proxying by a curl-style `no_proxy` list: `*` for all,
/// else comma- or space-separated names, each matching itself and its subdomains (a
/// leading dot optional), or an address exactly.
pub fn excluded(host: &str, no_proxy: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry
                .trim_start_matches('.')
                .trim_start_matches('[')
                .to_ascii_lowercase();
            // A port in the entry ("host:8080") is ignored, as curl did for years.
            let entry = match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
                    h.to_owned()
                }
                _ => entry,
            };
            let entry = entry.trim_end_matches(']');
            entry == "*"
                || host == entry
                || host
                    .strip_suffix(&entry)
                    .is_some_and(|rest| rest.ends_with('.'))
        })
}

/// The parts of a URL git's `http.<url>.*` matching compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlParts {
    scheme: String,
    user: Option<String>,
    host: String,
    port: Option<u16>,
    path: String,
}

impl UrlParts {
    fn parse(url: &str) -> Option<UrlParts> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.split(':').next().unwrap_or_default().to_owned()), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && !p.contains(']') => (h, Some(p.parse().ok()?)),
            _ => (hostport, None),
        };
        let port = port.or(match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        });
        let path = path.split(['?', '#']).next().unwrap_or("/");
        Some(UrlParts {
            scheme,
            user,
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            port,
            path: path.to_owned(),
        })
    }

    /// If this config URL matches `url` (git's urlmatch rules: same scheme and port, host
    /// equal or matched label by label with `*`, a user only if the URL has it, the path a
    /// prefix ending at a `/`): how specific the match is, an exact host over a wildcard,
    /// then the length of the matched path.
    fn matches(&self, url: &UrlParts) -> Option<(u8, usize)> {
        if self.scheme != url.scheme || self.port != url.port {
            return None;
        }
        if self.user.is_some() && self.user != url.user {
            return None;
        }
        let labels: Vec<&str> = self.host.split('.').collect();
        let theirs: Vec<&str> = url.host.split('.').collect();
        if labels.len() != theirs.len()
            || labels.iter().zip(&theirs).any(|(p, h)| *p != "*" && p != h)
        {
            return None;
        }
        let host_rank = match labels.contains(&"*") {
            true => 1,
            false => 2,
        };
        let prefix = self.path.trim_end_matches('/');
        let path = url.path.as_str();
        let ok = prefix.is_empty()
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'));
        ok.then_some((host_rank, prefix.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str) -> Entry {
        let (section, rest) = key.split_once('.').unwrap();
        let (sub, name) = match rest.rsplit_once('.') {
            Some((s, n)) => (Some(s.to_owned()), n),
            None => (None, rest),
        };
        Entry {
            section: section.to_lowercase(),
            subsection: sub,
            name: name.to_owned(),
            value: Some(value.to_owned()),
        }
    }

    fn config(lines: &[(&str, &str)]) -> SystemConfig {
        SystemConfig {
            entries: lines.iter().map(|(k, v)| entry(k, v)).collect(),
            root_owned: true,
            world_readable: false,
            path: "/etc/gitconfig".into(),
        }
    }

    fn env(vars: &[(&str, &str)]) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const URL: &str = "https://git.example.com/team/app.git";

    #[test]
    fn proxy_precedence_is_gits() {
        let e = env(&[("https_proxy", "http://env:1")]);
        let c = config(&[]);
        assert_eq!(
            plan(&c, &e, "origin", URL, true).proxy.as_deref(),
            Some("http://env:1")
        );
        let c = config(&[("http.proxy", "plain:3128")]);
        assert_eq!(
            plan(&c, &e, "origin", URL, true).proxy.as_deref(),
            Some("http://plain:3128"),
            "config beats the environment; no scheme means http"
        );
        let c = config(&[
            ("http.proxy", "http://plain:1"),
            ("http.https://git.example.com/.proxy", "http://scoped:1"),
        ]);
        assert_eq!(
            plan(&c, &e, "origin", URL, true).proxy.as_deref(),
            Some("http://scoped:1")
        );
        let c = config(&[
            ("http.https://git.example.com/.proxy", "http://scoped:1"),
            ("remote.origin.proxy", "http://remote:1"),
        ]);
        assert_eq!(
            plan(&c, &e, "origin", URL, true).proxy.as_deref(),
            Some("http://remote:1")
        );
        assert_eq!(
            plan(&c, &e, "mirror", URL, true).proxy.as_deref(),
            Some("http://scoped:1"),
            "remote.<name>.proxy is that remote's only"
        );
        let c = config(&[("http.proxy", "http://p:1"), ("remote.origin.proxy", "")]);
        assert_eq!(
            plan(&c, &e, "origin", URL, true).proxy,
            None,
            "empty: direct"
        );
        // Plain http reads http_proxy, not https_proxy.
        assert_eq!(
            plan(&config(&[]), &e, "o", "http://h/x.git", true).proxy,
            None
        );
        let e = env(&[("ALL_PROXY", "socks5://s:1")]);
        assert_eq!(
            plan(&config(&[]), &e, "o", URL, true).proxy.as_deref(),
            Some("socks5://s:1")
        );
    }

    #[test]
    fn no_proxy_excludes_by_domain() {
        assert!(excluded("localhost", "localhost"));
        assert!(excluded("git.example.com", ".example.com"));
        assert!(excluded("git.example.com", "example.com, other"));
        assert!(excluded("anything", "*"));
        assert!(excluded("127.0.0.1", "10.0.0.1,127.0.0.1"));
        assert!(excluded("git.example.com", "example.com:443"));
        assert!(!excluded("badexample.com", "example.com"));
        assert!(!excluded("127.0.0.1", "localhost"));
        let e = env(&[("https_proxy", "http://p:1"), ("NO_PROXY", "example.com")]);
        assert_eq!(plan(&config(&[]), &e, "o", URL, true).proxy, None);
        let c = config(&[
            ("http.proxy", "http://p:1"),
            ("http.noProxy", "git.example.com"),
        ]);
        assert_eq!(plan(&c, &env(&[]), "o", URL, true).proxy, None);
    }

    #[test]
    fn url_scoped_keys_match_like_git() {
        let c = config(&[
            ("http.sslCAInfo", "/all.pem"),
            ("http.https://git.example.com/team.sslCAInfo", "/team.pem"),
            (
                "http.https://git.example.com/te.sslCAInfo",
                "/not-a-segment.pem",
            ),
            ("http.https://*.example.com/.sslCAInfo", "/wild.pem"),
            ("http.http://git.example.com/.sslCAInfo", "/http.pem"),
            ("http.https://git.example.com:8443/.sslCAInfo", "/port.pem"),
        ]);
        let ca = |url: &str| plan(&c, &env(&[]), "o", url, true).ca_info;
        assert_eq!(ca(URL), Some("/team.pem".into()));
        assert_eq!(
            ca("https://git.example.com/other/x.git"),
            Some("/wild.pem".into())
        );
        assert_eq!(ca("https://elsewhere.org/x.git"), Some("/all.pem".into()));
        assert_eq!(ca("https://a.b.example.com/x.git"), Some("/all.pem".into()));
        assert_eq!(
            ca("https://git.example.com:8443/x"),
            Some("/port.pem".into())
        );
        assert_eq!(
            ca("https://git.example.com:443/x"),
            Some("/wild.pem".into())
        );
    }

    #[test]
    fn ssl_verify_false_is_warned_every_time() {
        let p = plan(
            &config(&[("http.sslVerify", "false")]),
            &env(&[]),
            "o",
            URL,
            true,
        );
        assert!(!p.verify);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("http.sslVerify=false"))
        );
        let p = plan(
            &config(&[("http.sslVerify", "maybe")]),
            &env(&[]),
            "o",
            URL,
            true,
        );
        assert!(p.verify, "an unreadable value keeps checking");
        assert!(!p.warnings.is_empty());
    }

    #[test]
    fn unsupported_http_keys_are_named() {
        let c = config(&[
            ("http.sslCert", "/c.pem"),
            ("http.https://x/.postBuffer", "1"),
            ("http.proxy", "p:1"),
        ]);
        let p = plan(&c, &env(&[]), "o", URL, true);
        let w = p.warnings.join("\n");
        assert!(
            w.contains("http.sslCert") && w.contains("http.https://x/.postBuffer"),
            "{w}"
        );
        assert!(!w.contains("http.proxy"), "{w}");
    }

    #[test]
    fn headers_and_helpers_are_lists_an_empty_value_clears() {
        let c = config(&[
            ("http.extraHeader", "A: 1"),
            ("http.extraHeader", ""),
            ("http.extraHeader", "B: 2"),
            ("credential.helper", "cache"),
            ("credential.helper", ""),
            ("credential.helper", "store --file /s"),
            ("credential.https://elsewhere.org.helper", "other"),
        ]);
        let p = plan(&c, &env(&[]), "o", URL, true);
        assert_eq!(p.extra_headers, vec!["B: 2".to_owned()]);
        assert_eq!(p.helpers, vec!["store --file /s".to_owned()]);
        // A remote a member added gets no unscoped secret; a scoped one goes to its host.
        let mut scoped = c.clone();
        scoped
            .entries
            .push(entry("http.https://git.example.com/.extraHeader", "C: 3"));
        let p = plan(&scoped, &env(&[]), "o", URL, false);
        assert_eq!(p.extra_headers, vec!["C: 3".to_owned()]);
        assert!(p.helpers.is_empty());
        assert!(
            p.warnings.iter().any(|w| w.contains("a member added")),
            "{:?}",
            p.warnings
        );
        // git keeps an unscoped header before a scoped one, not after it.
        let c2 = config(&[
            ("http.extraHeader", "A: 1"),
            ("http.https://git.example.com/.extraHeader", "B: 2"),
            ("http.extraHeader", "late: 3"),
        ]);
        assert_eq!(
            plan(&c2, &env(&[]), "o", URL, true).extra_headers,
            vec!["A: 1".to_owned(), "B: 2".to_owned()]
        );
        let mut c = c;
        c.root_owned = false;
        c.entries.push(entry("http.sslVerify", "false"));
        let p = plan(&c, &env(&[]), "o", URL, true);
        assert!(p.helpers.is_empty(), "a file others may write runs nothing");
        assert!(p.verify, "nor weakens TLS");
        assert!(p.warnings.iter().any(|w| w.contains("writable by others")));
    }

    #[test]
    fn an_exact_host_beats_a_wildcard_with_a_longer_path() {
        let c = config(&[
            ("http.https://*.example.com/team.sslCAInfo", "/wild.pem"),
            ("http.https://git.example.com/.sslCAInfo", "/exact.pem"),
            ("http.https://git.example.com./x.sslCAInfo", "/dot.pem"),
        ]);
        assert_eq!(
            plan(&c, &env(&[]), "o", URL, true).ca_info,
            Some("/exact.pem".into())
        );
        assert_eq!(
            plan(&c, &env(&[]), "o", "https://git.example.com/x/y.git", true).ca_info,
            Some("/dot.pem".into()),
            "a trailing dot names the same host"
        );
        assert!(excluded("[::1]", "[::1]"));
    }

    #[test]
    fn redirects_follow_git() {
        let r = |v: &str| {
            plan(
                &config(&[("http.followRedirects", v)]),
                &env(&[]),
                "o",
                URL,
                true,
            )
            .redirects
        };
        assert_eq!(
            plan(&config(&[]), &env(&[]), "o", URL, true).redirects,
            Redirects::Initial
        );
        assert_eq!(r("true"), Redirects::All);
        assert_eq!(r("false"), Redirects::None);
        assert_eq!(r("initial"), Redirects::Initial);
    }
}
