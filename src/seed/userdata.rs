//! User data in every form a cloud hands it over: `#cloud-config` YAML with a top-level
//! `troops:` key, a JSON object with a `troops` key, MIME multipart holding either (other
//! parts, like shell scripts, are someone else's), and any of these gzip-compressed.

use std::io::Read;

use serde::Deserialize;

use super::{Seed, SeedError};

/// Decompressed user data larger than this is refused rather than read into memory.
const MAX_SIZE: u64 = 16 << 20;

#[derive(Deserialize)]
struct Document {
    // Only our section; cloud-config's own keys are cloud-init's business.
    troops: Option<Seed>,
}

fn malformed(origin: &str, message: impl Into<String>) -> SeedError {
    SeedError::Malformed {
        origin: origin.to_owned(),
        message: message.into(),
    }
}

/// The troops section in `bytes`, `Ok(None)` if the user data is fine but has none.
pub fn parse(bytes: &[u8], origin: &str) -> Result<Option<Seed>, SeedError> {
    parse_depth(bytes, origin, 0)
}

fn parse_depth(bytes: &[u8], origin: &str, depth: u32) -> Result<Option<Seed>, SeedError> {
    if depth > 4 {
        return Err(malformed(
            origin,
            "user data nested too deeply (gzip or MIME inside each other)",
        ));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .take(MAX_SIZE + 1)
            .read_to_end(&mut out)
            .map_err(|e| malformed(origin, format!("bad gzip data: {e}")))?;
        if out.len() as u64 > MAX_SIZE {
            return Err(malformed(
                origin,
                format!("gzip data expands beyond {MAX_SIZE} bytes"),
            ));
        }
        return parse_depth(&out, origin, depth + 1);
    }
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim_start();
    let head = trimmed
        .get(..trimmed.len().min(200))
        .unwrap_or("")
        .to_ascii_lowercase();
    if head.starts_with("content-type:") || head.starts_with("mime-version:") {
        return parse_mime(bytes, origin, depth);
    }
    if trimmed.starts_with("#cloud-config") {
        let doc: Document = serde_saphyr::from_str(&text)
            .map_err(|e| malformed(origin, yaml_error(&e.to_string())))?;
        return section(doc, origin);
    }
    if trimmed.starts_with('{') {
        let doc: Document = serde_json::from_str(&text)
            .map_err(|e| malformed(origin, format!("invalid JSON: {e}")))?;
        return section(doc, origin);
    }
    // A shell script, an #include list, cloud-boothook...: not ours.
    Ok(None)
}

fn section(doc: Document, origin: &str) -> Result<Option<Seed>, SeedError> {
    if let Some(seed) = &doc.troops {
        seed.validate(origin)?;
    }
    Ok(doc.troops)
}

/// serde-saphyr's messages go on to quote the source over several lines; the first says
/// where and what.
fn yaml_error(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    let first = first.split(" --> ").next().unwrap_or(first);
    format!(
        "invalid YAML: {}",
        first.trim().trim_start_matches("error: ")
    )
}

fn parse_mime(bytes: &[u8], origin: &str, depth: u32) -> Result<Option<Seed>, SeedError> {
    let mail = mailparse::parse_mail(bytes)
        .map_err(|e| malformed(origin, format!("invalid MIME: {e}")))?;
    let mut found: Option<(Seed, String)> = None;
    let mut leaves = Vec::new();
    collect_leaves(&mail, &mut leaves);
    for (i, part) in leaves.into_iter().enumerate() {
        let name = part
            .get_content_disposition()
            .params
            .get("filename")
            .cloned()
            .unwrap_or_else(|| format!("part {}", i + 1));
        let part_origin = format!("{origin} ({name})");
        let body = part
            .get_body_raw()
            .map_err(|e| malformed(&part_origin, format!("invalid MIME part: {e}")))?;
        if let Some(seed) = parse_depth(&body, &part_origin, depth + 1)? {
            if let Some((_, first)) = &found {
                return Err(malformed(
                    origin,
                    format!("two parts carry a troops section: {first} and {name}"),
                ));
            }
            found = Some((seed, name));
        }
    }
    Ok(found.map(|(s, _)| s))
}

fn collect_leaves<'a>(
    mail: &'a mailparse::ParsedMail<'a>,
    out: &mut Vec<&'a mailparse::ParsedMail<'a>>,
) {
    if mail.subparts.is_empty() {
        out.push(mail);
    } else {
        for p in &mail.subparts {
            collect_leaves(p, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const YAML: &str = "#cloud-config\npackages: [git]\ntroops:\n  remotes: {origin: \"git@repos.example.com:deploy\"}\n  roles: [web]\n  verify: tip\n";

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn mime(parts: &[(&str, &str)]) -> String {
        let mut s =
            String::from("Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n");
        for (ctype, body) in parts {
            s.push_str(&format!(
                "--XX\nContent-Type: {ctype}\nMIME-Version: 1.0\n\n{body}\n"
            ));
        }
        s.push_str("--XX--\n");
        s
    }

    #[test]
    fn cloud_config() {
        let s = parse(YAML.as_bytes(), "t").unwrap().unwrap();
        assert_eq!(s.remotes["origin"], "git@repos.example.com:deploy");
        assert_eq!(s.roles, Some(vec!["web".into()]));
        assert_eq!(s.verify, Some(super::super::Verify::Tip));
    }

    #[test]
    fn json_mime_and_gzip() {
        let json =
            r#"{"troops": {"remotes": {"a": "https://git.example.com/d.git"}, "branch": "main"}}"#;
        assert_eq!(
            parse(json.as_bytes(), "t")
                .unwrap()
                .unwrap()
                .branch
                .as_deref(),
            Some("main")
        );
        assert!(parse(&gzip(json.as_bytes()), "t").unwrap().is_some());
        let m = mime(&[
            ("text/x-shellscript", "#!/bin/sh\necho hi"),
            ("text/cloud-config", YAML),
        ]);
        assert!(
            parse(m.as_bytes(), "t")
                .unwrap()
                .unwrap()
                .remotes
                .contains_key("origin")
        );
        assert!(parse(&gzip(m.as_bytes()), "t").unwrap().is_some());
    }

    #[test]
    fn user_data_without_a_section() {
        assert_eq!(parse(b"#!/bin/sh\necho hi\n", "t").unwrap(), None);
        assert_eq!(
            parse(b"#cloud-config\npackages: [git]\n", "t").unwrap(),
            None
        );
        let m = mime(&[("text/x-shellscript", "#!/bin/sh\necho hi")]);
        assert_eq!(parse(m.as_bytes(), "t").unwrap(), None);
    }

    #[test]
    fn errors_name_the_source_key_and_place() {
        let e = parse(b"#cloud-config\ntroops:\n  remotez: {}\n", "seed.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("seed.yaml:") && e.contains("remotez"), "{e}");
        let e = parse(b"#cloud-config\ntroops: [\n", "seed.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "seed.yaml: invalid YAML: line 2 column 9: expected mapping start"
        );
        let e = parse(b"{\"troops\": {\"roles\": [1}", "j")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid JSON") && e.contains("line 1 column"),
            "{e}"
        );
        let e = parse(b"{\"troops\": {\"verify\": \"sometimes\"}}", "j")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes"), "{e}");
        let e = parse(&[0x1f, 0x8b, 1, 2, 3], "gz").unwrap_err().to_string();
        assert!(e.contains("bad gzip"), "{e}");
        let e = parse(b"#cloud-config\ntroops:\n  roles: [\"a b\"]\n", "y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("troops.roles"), "{e}");
        let two = mime(&[("text/cloud-config", YAML), ("text/cloud-config", YAML)]);
        assert!(
            parse(two.as_bytes(), "m")
                .unwrap_err()
                .to_string()
                .contains("two parts")
        );
    }
}
