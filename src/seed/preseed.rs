//! Debian preseeding: a d-i preseed file (`troops troops/remotes string origin=URL`), or the
//! debconf database the package's answers ended up in. Both become the same answers, and
//! the answers become a `Seed`.

use super::{Seed, SeedError, Verify};

/// Questions the package asks (packaging/debian/templates), each a debconf string.
const QUESTIONS: [&str; 8] = [
    "troops/remotes",
    "troops/roles",
    "troops/branch",
    "troops/admins",
    "troops/verify",
    "troops/known_hosts",
    "troops/proxy",
    "troops/ca_certs",
];

/// PEM text given on one line, as a debconf string must be: the BEGIN/END markers and the
/// base64 between them, separated by spaces, put back on lines of their own.
fn pem_from_line(value: &str) -> String {
    let mut out = String::new();
    let mut marker: Option<String> = None;
    for token in value.split_whitespace() {
        match marker.as_mut() {
            Some(m) => {
                m.push(' ');
                m.push_str(token);
            }
            None if token.starts_with("-----") => marker = Some(token.to_owned()),
            None => {
                out.push_str(token);
                out.push('\n');
            }
        }
        if let Some(m) = &marker
            && m.len() > 5
            && m.ends_with("-----")
        {
            out.push_str(m);
            out.push('\n');
            marker = None;
        }
    }
    out
}

fn list(value: &str) -> Vec<String> {
    value
        .split([' ', ',', '\t'])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Turn `(question, value)` answers into a seed. Empty answers say nothing.
pub fn from_answers(answers: &[(String, String)], origin: &str) -> Result<Option<Seed>, SeedError> {
    let mut seed = Seed::default();
    let mut any = false;
    for (q, v) in answers {
        let v = v.trim();
        if !QUESTIONS.contains(&q.as_str()) {
            return Err(SeedError::Invalid {
                origin: origin.to_owned(),
                key: q.trim_start_matches("troops/").to_owned(),
                message: format!("unknown question {q}; known: {}", QUESTIONS.join(", ")),
            });
        }
        if v.is_empty() {
            continue;
        }
        any = true;
        match q.as_str() {
            "troops/remotes" => {
                for spec in list(v) {
                    let (name, url) = spec.split_once('=').ok_or_else(|| SeedError::Invalid {
                        origin: origin.to_owned(),
                        key: "remotes".into(),
                        message: format!("{spec:?}: expected NAME=URL"),
                    })?;
                    seed.remotes.insert(name.to_owned(), url.to_owned());
                }
            }
            "troops/roles" => seed.roles = Some(list(v)),
            "troops/admins" => seed.admins = Some(list(v)),
            "troops/branch" => seed.branch = Some(v.to_owned()),
            // Host keys have spaces inside; one per `;`.
            "troops/known_hosts" => {
                seed.known_hosts = Some(
                    v.split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                )
            }
            "troops/proxy" => seed.proxy = Some(v.to_owned()),
            "troops/ca_certs" => seed.ca_certs = Some(pem_from_line(v)),
            "troops/verify" => {
                seed.verify = Some(match v {
                    "none" => Verify::None,
                    "tip" => Verify::Tip,
                    "all" => Verify::All,
                    other => {
                        return Err(SeedError::Invalid {
                            origin: origin.to_owned(),
                            key: "verify".into(),
                            message: format!("{other:?}: expected none, tip or all"),
                        });
                    }
                })
            }
            _ => unreachable!("checked against QUESTIONS"),
        }
    }
    if !any {
        return Ok(None);
    }
    seed.validate(origin)?;
    Ok(Some(seed))
}

/// A d-i preseed file: `owner question type value` lines, `#` comments, `\` continuations.
/// Only lines owned by `troops` are ours.
pub fn parse_preseed(text: &str, origin: &str) -> Result<Option<Seed>, SeedError> {
    let mut answers = Vec::new();
    let mut joined = String::new();
    for (n, raw) in text.lines().enumerate() {
        if let Some(stripped) = raw.strip_suffix('\\') {
            joined.push_str(stripped);
            continue;
        }
        joined.push_str(raw);
        let line = std::mem::take(&mut joined);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line
            .splitn(4, char::is_whitespace)
            .filter(|f| !f.is_empty());
        let (Some(owner), Some(question)) = (fields.next(), fields.next()) else {
            continue;
        };
        if owner != "troops" {
            continue;
        }
        let rest: Vec<&str> = line.splitn(3, char::is_whitespace).collect();
        let typed = rest.get(2).map(|r| r.trim_start()).unwrap_or("");
        let (kind, value) = typed.split_once(char::is_whitespace).unwrap_or((typed, ""));
        if !matches!(
            kind,
            "string" | "select" | "multiselect" | "boolean" | "note" | "text" | "password"
        ) {
            return Err(SeedError::Malformed {
                origin: origin.to_owned(),
                message: format!(
                    "line {}: {question}: expected a debconf type (string, select...), found {kind:?}",
                    n + 1
                ),
            });
        }
        answers.push((question.to_owned(), value.trim().to_owned()));
    }
    from_answers(&answers, origin)
}

/// debconf's own database, /var/cache/debconf/config.dat: RFC 822-style stanzas with
/// `Name:` and `Value:`.
pub fn parse_debconf_db(text: &str, origin: &str) -> Result<Option<Seed>, SeedError> {
    let mut answers = Vec::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut value = String::new();
        for line in stanza.lines() {
            if let Some(n) = line.strip_prefix("Name: ") {
                name = Some(n.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Value: ") {
                value = v.to_owned();
            }
        }
        if let Some(n) = name.filter(|n| n.starts_with("troops/")) {
            answers.push((n, value));
        }
    }
    // Every installed package leaves its templates' defaults here (branch master, verify
    // none): answers that name no remote are those defaults, not a seed, and must not hide
    // cloud-init's user data or IMDS behind them.
    Ok(from_answers(&answers, origin)?.filter(|seed| !seed.remotes.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preseed_file() {
        let text = "\
# Troops
d-i pkgsel/include string troops
troops troops/remotes string origin=git@repos.example.com:deploy \\
    mirror=https://git.example.com/deploy.git
troops troops/roles string web, cache
troops troops/verify select tip
";
        let s = parse_preseed(text, "preseed.cfg").unwrap().unwrap();
        assert_eq!(s.remotes.len(), 2);
        assert_eq!(s.remotes["mirror"], "https://git.example.com/deploy.git");
        assert_eq!(s.roles, Some(vec!["web".into(), "cache".into()]));
        assert_eq!(s.verify, Some(Verify::Tip));
        assert_eq!(parse_preseed("d-i foo/bar string x\n", "p").unwrap(), None);
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBkjCCATegAwIBAgIUZOWCwtKCw9pI//iT6LIxrYe+r70wCgYIKoZIzj0EAwIw\nHjEcMBoGA1UEAwwTVHJvb3BzIHVuaXQgdGVzdCBDQTAeFw0yNjEyMDIxODQyMzVa\nFw0zNjExMjkxODQyMzVaMB4xHDAaBgNVBAMME1Ryb29wcyB1bml0IHRlc3QgQ0Ew\nWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARVBIWirtGcmwQb9PO8Gnv/wVW7x4uy\ntDkV7YIjn/C04oI0vQQhZ1RJhHb50oqpt3BeJxH+1ZG4virtT+FfHTuUo1MwUTAd\nBgNVHQ4EFgQUq2L0hD6Vw6k7+6QNV+HPa78sK5swHwYDVR0jBBgwFoAUq2L0hD6V\nw6k7+6QNV+HPa78sK5swDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBG\nAiEAhRwxJG1oqAVSGiT5N6RLCQDDjyC+7ARA3Tep3qF9TZECIQC8tFB5xQxNcswP\nQAqbqG9AxQNXMfUMqqISjQ6UM2rLUw==\n-----END CERTIFICATE-----\n";

    #[test]
    fn proxy_and_a_ca_on_one_line() {
        let text = format!(
            "troops troops/remotes string origin=https://git.example.com/x.git\n\
             troops troops/proxy string http://proxy.example.com:3128\n\
             troops troops/ca_certs string {}\n",
            CA.replace('\n', " ")
        );
        let s = parse_preseed(&text, "p.cfg").unwrap().unwrap();
        assert_eq!(s.proxy.as_deref(), Some("http://proxy.example.com:3128"));
        assert_eq!(s.ca_certs.as_deref(), Some(CA));
        s.validate("p.cfg").unwrap();
        let bad = "troops troops/ca_certs string -----BEGIN CERTIFICATE----- nope -----END CERTIFICATE-----\n";
        let e = parse_preseed(bad, "p.cfg").unwrap_err().to_string();
        assert!(e.contains("p.cfg") && e.contains("troops.ca_certs"), "{e}");
        let e = parse_preseed("troops troops/proxy string http://u:pw@p:1\n", "p.cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("troops.proxy") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn preseed_errors() {
        let e = parse_preseed("troops troops/remotez string x=y\n", "p.cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.cfg") && e.contains("troops/remotez"), "{e}");
        let e = parse_preseed("troops troops/remotes string origin\n", "p.cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected NAME=URL"), "{e}");
        let e = parse_preseed("troops troops/roles strin web\n", "p.cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = parse_preseed("troops troops/remotes string o=ext::sh\n", "p.cfg")
            .unwrap_err()
            .to_string();
        assert!(e.contains("troops.remotes"), "{e}");
    }

    #[test]
    fn debconf_db() {
        let db = "Name: troops/remotes\nTemplate: troops/remotes\nValue: origin=git@h:d\nOwners: troops\n\nName: troops/roles\nTemplate: troops/roles\nValue: \nOwners: troops\n\nName: other/x\nValue: y\n";
        let s = parse_debconf_db(db, "db").unwrap().unwrap();
        assert_eq!(s.remotes["origin"], "git@h:d");
        assert_eq!(s.roles, None);
        assert_eq!(
            parse_debconf_db("Name: other/x\nValue: y\n", "db").unwrap(),
            None
        );
        // What a plain install leaves: the templates' defaults, no remotes.
        let defaults = "Name: troops/remotes\nValue: \n\nName: troops/branch\nValue: master\n\nName: troops/verify\nValue: none\n";
        assert_eq!(parse_debconf_db(defaults, "db").unwrap(), None);
    }
}
