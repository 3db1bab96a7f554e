//! User data in every form a cloud hands it over, read the way cloud-init reads it:
//! `#cloud-config` YAML (its troops section as the top-level `troops:` key, or as the
//! `/etc/troops/seed.yaml` entry of `write_files`, the schema-clean form), a
//! `#cloud-config-archive`, a JSON object with a `troops` key, MIME multipart holding any of
//! these (other parts, like shell scripts, are someone else's), each possibly gzip-compressed.
//!
//! Only the troops section is troops' business. The rest of a cloud-config is read with the
//! tolerance of PyYAML, cloud-init's parser (duplicate keys, any tag, keys that are not
//! strings, non-finite floats), and a document troops cannot read at all is reported as
//! having no troops section, so that the search goes on to the next source. Strict checks
//! (unknown keys, names, URLs) apply inside the troops section only.

use std::io::Read;

use base64::Engine as _;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{Seed, SeedError};

/// Decompressed user data larger than this is refused rather than read into memory.
const MAX_SIZE: u64 = 16 << 20;
/// cloud-init looks for `mime-version:` this far into the user data.
const MIME_SNIFF: usize = 4096;
/// Where the schema-clean seed lives, on the node and in `write_files`.
pub const SEED_FILE: &str = "/etc/troops/seed.yaml";
/// How deep YAML may nest: far beyond any real cloud-config, well within the stack.
const MAX_DEPTH: usize = 256;
const YAML_STACK: usize = 64 << 20;

/// What a piece of user data holds for troops.
#[derive(Debug, PartialEq, Eq)]
pub enum Section {
    Found(Seed),
    /// No troops section; why, when there is more to say than that (it could not be read,
    /// or it is a kind troops does not read).
    Absent(Option<String>),
}

fn malformed(origin: &str, message: impl Into<String>) -> SeedError {
    SeedError::Malformed {
        origin: origin.to_owned(),
        message: message.into(),
    }
}

/// Any YAML node, kept whole: the troops section is checked strictly after the document is
/// read loosely.
#[derive(Debug, Clone, PartialEq)]
enum Loose {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Seq(Vec<Loose>),
    /// In document order; duplicate keys stay, and the last wins, as in PyYAML.
    Map(Vec<(Loose, Loose)>),
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Loose, E> {
                Ok(Loose::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Loose, E> {
                Ok(Loose::Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Loose, E> {
                Ok(i128::try_from(v).map_or(Loose::Float(v as f64), Loose::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Loose, E> {
                Ok(Loose::Str(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Loose, E> {
                Ok(Loose::Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Loose, E> {
                Ok(Loose::Bytes(v))
            }
            fn visit_none<E>(self) -> Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
                Loose::deserialize(d)
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
                Loose::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(Loose::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = a.next_entry()? {
                    out.push(kv);
                }
                Ok(Loose::Map(out))
            }
            fn visit_enum<A: de::EnumAccess<'de>>(self, a: A) -> Result<Loose, A::Error> {
                // A tagged node (`!Ref x`): its value is what matters here.
                use de::VariantAccess;
                let (_, v) = a.variant::<de::IgnoredAny>()?;
                v.newtype_variant()
            }
        }
        d.deserialize_any(V)
    }
}

impl Loose {
    /// The value of the last `key` in a mapping, as PyYAML keeps it.
    fn get(&self, key: &str) -> Option<&Loose> {
        match self {
            Loose::Map(entries) => entries
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Loose::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Loose::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The troops section's values as JSON, for the strict `Seed` to check.
    fn to_json(&self) -> Result<serde_json::Value, String> {
        use serde_json::Value;
        Ok(match self {
            Loose::Null => Value::Null,
            Loose::Bool(b) => Value::Bool(*b),
            Loose::Int(i) => match i64::try_from(*i) {
                Ok(i) => i.into(),
                Err(_) => Value::String(i.to_string()),
            },
            Loose::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| format!("{f} is not a value troops takes"))?,
            Loose::Str(s) => Value::String(s.clone()),
            Loose::Bytes(_) => {
                return Err("binary data (!!binary) is not a value troops takes".into());
            }
            Loose::Seq(items) => {
                Value::Array(items.iter().map(Loose::to_json).collect::<Result<_, _>>()?)
            }
            Loose::Map(entries) => {
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    let Loose::Str(k) = k else {
                        return Err(format!("{k:?} is not a key troops takes (keys are names)"));
                    };
                    out.insert(k.clone(), v.to_json()?);
                }
                Value::Object(out)
            }
        })
    }
}

/// YAML as PyYAML reads it: the last of duplicate keys wins, non-finite floats are floats.
fn read_yaml(text: &str) -> Result<Loose, String> {
    let read = || {
        let mut budget = serde_saphyr::Budget::default();
        budget.max_depth = MAX_DEPTH;
        let opts = serde_saphyr::options! {
            budget: Some(budget),
            duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::LastWins,
            non_finite_float_policy: serde_saphyr::options::NonFiniteFloatPolicy::PassThrough,
            // `!!binary` holding gzip bytes (cloud-init's own write_files example) is read as
            // its base64 text; `seed_in_write_files` decodes it.
            ignore_binary_tag_for_string: true,
        };
        serde_saphyr::from_str_with_options::<Loose>(text, opts)
            .map_err(|e| yaml_error(&e.to_string()))
    };
    // Deserialising recurses once per level: on a thread whose stack is known to hold
    // MAX_DEPTH levels, whatever thread asked.
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("yaml".into())
            .stack_size(YAML_STACK)
            .spawn_scoped(s, read)
            .map_err(|e| format!("cannot start the YAML reader: {e}"))?
            .join()
            .map_err(|_| "the YAML reader failed".to_string())?
    })
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

/// A strict troops section from its loosely read node.
fn seed_from(node: &Loose, origin: &str, at: &str) -> Result<Seed, SeedError> {
    let json = node
        .to_json()
        .map_err(|m| malformed(origin, format!("{at}: {m}")))?;
    let seed: Seed =
        serde_json::from_value(json).map_err(|e| malformed(origin, format!("{at}: {e}")))?;
    seed.validate(origin)?;
    Ok(seed)
}

/// The schema-clean seed file's text (`/etc/troops/seed.yaml`): the troops section's keys
/// at the top level.
pub fn parse_seed_file(bytes: &[u8], origin: &str) -> Result<Seed, SeedError> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| malformed(origin, format!("not UTF-8 (at byte {})", e.valid_up_to())))?;
    match read_yaml(text).map_err(|m| malformed(origin, m))? {
        Loose::Null => Ok(Seed::default()),
        node => seed_from(&node, origin, "seed"),
    }
}

/// The `write_files` entry for the seed file, decoded as cloud-init would write it.
fn seed_in_write_files(write_files: &Loose, origin: &str) -> Result<Option<Seed>, SeedError> {
    let Loose::Seq(entries) = write_files else {
        return Ok(None);
    };
    let Some(entry) = entries
        .iter()
        .rev()
        .find(|e| e.get("path").and_then(Loose::as_str).map(str::trim) == Some(SEED_FILE))
    else {
        return Ok(None);
    };
    let at = format!("write_files {SEED_FILE}");
    let bad = |m: String| malformed(origin, format!("{at}: {m}"));
    if entry.get("source").is_some() {
        return Err(bad(
            "`source` (a URL to fetch) is not supported: give the seed as `content`".into(),
        ));
    }
    let raw = match entry.get("content") {
        None | Some(Loose::Null) => Vec::new(),
        Some(Loose::Str(s)) => s.clone().into_bytes(),
        Some(Loose::Bytes(b)) => b.clone(),
        Some(_) => return Err(bad("content is not text".into())),
    };
    let encoding = entry
        .get("encoding")
        .and_then(Loose::as_str)
        .unwrap_or("text/plain")
        .trim()
        .to_ascii_lowercase();
    let b64 = |b: &[u8]| {
        let clean: Vec<u8> = b
            .iter()
            .copied()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(clean)
            .map_err(|e| bad(format!("content is not base64: {e}")))
    };
    let gunzip = |b: &[u8]| {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(b)
            .take(MAX_SIZE)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("content is not gzip data: {e}")))?;
        Ok::<_, SeedError>(out)
    };
    let content = match encoding.as_str() {
        "text/plain" => raw,
        "b64" | "base64" => b64(&raw)?,
        // `content: !!binary |` arrives as the base64 text of the gzip bytes.
        "gz" | "gzip" if !raw.starts_with(&[0x1f, 0x8b]) => gunzip(&b64(&raw)?)?,
        "gz" | "gzip" => gunzip(&raw)?,
        "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64" => gunzip(&b64(&raw)?)?,
        other => {
            return Err(bad(format!(
                "encoding {other:?} is not one cloud-init knows"
            )));
        }
    };
    parse_seed_file(&content, &format!("{origin} ({at})")).map(Some)
}

/// The troops section of a `#cloud-config` document.
fn cloud_config(text: &str, origin: &str) -> Result<Section, SeedError> {
    let doc = match read_yaml(text) {
        Ok(d) => d,
        Err(m) => return Ok(Section::Absent(Some(format!("unreadable: {m}")))),
    };
    let by_key = match doc.get("troops") {
        None | Some(Loose::Null) => None,
        Some(node) => Some(seed_from(node, origin, "troops")?),
    };
    let by_file = match doc.get("write_files") {
        Some(w) => seed_in_write_files(w, origin)?,
        None => None,
    };
    match (by_key, by_file) {
        (Some(_), Some(_)) => Err(malformed(
            origin,
            format!(
                "both a `troops:` key and a write_files entry for {SEED_FILE}: give the seed once"
            ),
        )),
        (Some(s), None) | (None, Some(s)) => Ok(Section::Found(s)),
        (None, None) => Ok(Section::Absent(None)),
    }
}

/// A JSON object with a `troops` key (what older examples showed; cloud-init itself wants
/// `#cloud-config` in front, and YAML reads JSON).
fn json(text: &str, origin: &str) -> Result<Section, SeedError> {
    let doc: serde_json::Value = match serde_json::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            return Ok(Section::Absent(Some(format!(
                "unreadable: invalid JSON: {e}"
            ))));
        }
    };
    match doc.get("troops") {
        None | Some(serde_json::Value::Null) => Ok(Section::Absent(None)),
        Some(v) => {
            let seed: Seed = serde_json::from_value(v.clone())
                .map_err(|e| malformed(origin, format!("troops: {e}")))?;
            seed.validate(origin)?;
            Ok(Section::Found(seed))
        }
    }
}

/// What a piece of user data is, as cloud-init tells: by its first line, case-insensitively,
/// the longest prefix first.
#[derive(Debug, PartialEq)]
enum Kind {
    CloudConfig,
    Archive,
    Json,
    Unsupported(&'static str),
    NotOurs,
}

fn sniff(text: &str) -> Kind {
    let head: String = text
        .trim_start()
        .chars()
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    const PREFIXES: [(&str, Kind); 9] = [
        (
            "## template: jinja",
            Kind::Unsupported("a jinja template (## template: jinja)"),
        ),
        ("#cloud-config-archive", Kind::Archive),
        (
            "#cloud-config-jsonp",
            Kind::Unsupported("#cloud-config-jsonp"),
        ),
        ("#cloud-config", Kind::CloudConfig),
        (
            "#include-once",
            Kind::Unsupported("#include-once (troops does not fetch the URLs it lists)"),
        ),
        (
            "#include",
            Kind::Unsupported("#include (troops does not fetch the URLs it lists)"),
        ),
        ("#part-handler", Kind::Unsupported("#part-handler")),
        ("{", Kind::Json),
        ("#!", Kind::NotOurs),
    ];
    for (prefix, kind) in PREFIXES {
        if head.starts_with(prefix) {
            return kind;
        }
    }
    Kind::NotOurs
}

/// A MIME part's kind from its Content-Type; untyped text is sniffed as cloud-init does.
fn kind_of_type(ctype: &str, body: &str) -> Kind {
    match ctype.trim().to_ascii_lowercase().as_str() {
        "text/cloud-config" => match sniff(body) {
            k @ Kind::Unsupported(_) => k,
            _ => Kind::CloudConfig,
        },
        "text/cloud-config-archive" => Kind::Archive,
        "text/cloud-config-jsonp" => Kind::Unsupported("text/cloud-config-jsonp"),
        "text/x-include-url" | "text/x-include-once-url" => {
            Kind::Unsupported("#include (troops does not fetch the URLs it lists)")
        }
        "text/part-handler" => Kind::Unsupported("#part-handler"),
        "text/jinja2" => Kind::Unsupported("a jinja template (text/jinja2)"),
        "" | "text/plain" | "text/x-not-multipart" | "application/octet-stream" => sniff(body),
        _ => Kind::NotOurs,
    }
}

/// Sections found in parts (MIME, archive), at most one of which may carry troops.
struct Parts<'a> {
    origin: &'a str,
    found: Option<(Seed, String)>,
    reasons: Vec<String>,
}

impl Parts<'_> {
    fn add(&mut self, name: String, section: Section) -> Result<(), SeedError> {
        match section {
            Section::Found(seed) => {
                if let Some((_, first)) = &self.found {
                    return Err(malformed(
                        self.origin,
                        format!("two parts carry a troops section: {first} and {name}"),
                    ));
                }
                self.found = Some((seed, name));
            }
            Section::Absent(Some(why)) => self.reasons.push(format!("{name}: {why}")),
            Section::Absent(None) => {}
        }
        Ok(())
    }

    fn done(self) -> Section {
        match self.found {
            Some((seed, _)) => Section::Found(seed),
            None if self.reasons.is_empty() => Section::Absent(None),
            None => Section::Absent(Some(self.reasons.join("; "))),
        }
    }
}

/// The troops section in `bytes`.
pub fn parse(bytes: &[u8], origin: &str) -> Result<Section, SeedError> {
    parse_depth(bytes, origin, None, 0)
}

fn check_depth(origin: &str, depth: u32) -> Result<(), SeedError> {
    match depth > 4 {
        true => Err(malformed(
            origin,
            "user data nested too deeply (gzip, MIME or archives inside each other)",
        )),
        false => Ok(()),
    }
}

/// `ctype`: the Content-Type of the MIME part (or archive entry) these bytes came in.
fn parse_depth(
    bytes: &[u8],
    origin: &str,
    ctype: Option<&str>,
    depth: u32,
) -> Result<Section, SeedError> {
    check_depth(origin, depth)?;
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
        return parse_depth(&out, origin, None, depth + 1);
    }
    // Editors put a byte-order mark in front; cloud-init's reader drops it.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if ctype.is_none() && is_mime(bytes) {
        return parse_mime(bytes, origin, depth);
    }
    let lossy = String::from_utf8_lossy(bytes);
    let kind = match ctype {
        Some(t) => kind_of_type(t, &lossy),
        None => sniff(&lossy),
    };
    if kind == Kind::NotOurs {
        return Ok(Section::Absent(None));
    }
    if let Kind::Unsupported(what) = kind {
        return Ok(Section::Absent(Some(format!("not supported: {what}"))));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Ok(Section::Absent(Some(format!(
                "unreadable: not UTF-8 (at byte {})",
                e.valid_up_to()
            ))));
        }
    };
    match kind {
        Kind::CloudConfig => cloud_config(text, origin),
        Kind::Json => json(text, origin),
        Kind::Archive => archive(text, origin, depth),
        Kind::Unsupported(_) | Kind::NotOurs => unreachable!("returned above"),
    }
}

/// Whether cloud-init would read this as MIME: `mime-version:` in its first 4096 bytes, or
/// (as troops always has) a `Content-Type:` header first.
fn is_mime(bytes: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(MIME_SNIFF)]).to_ascii_lowercase();
    head.contains("mime-version:") || head.trim_start().starts_with("content-type:")
}

/// A `#cloud-config-archive`: a YAML list of parts, each its content as a string or a
/// mapping with `content` and an optional `type`.
fn archive(text: &str, origin: &str, depth: u32) -> Result<Section, SeedError> {
    let doc = match read_yaml(text) {
        Ok(d) => d,
        Err(m) => return Ok(Section::Absent(Some(format!("unreadable: {m}")))),
    };
    let Loose::Seq(items) = doc else {
        return Ok(Section::Absent(Some(
            "unreadable: a #cloud-config-archive is a list of parts".into(),
        )));
    };
    let mut parts = Parts {
        origin,
        found: None,
        reasons: Vec::new(),
    };
    for (i, item) in items.iter().enumerate() {
        let (content, ctype) = match item {
            Loose::Str(s) => (s.as_str(), None),
            Loose::Map(_) => match item.get("content").and_then(Loose::as_str) {
                Some(c) => (c, item.get("type").and_then(Loose::as_str)),
                None => continue,
            },
            _ => continue,
        };
        let name = item
            .get("filename")
            .and_then(Loose::as_str)
            .map_or_else(|| format!("part {}", i + 1), str::to_owned);
        let part_origin = format!("{origin} ({name})");
        parts.add(
            name,
            parse_depth(content.as_bytes(), &part_origin, ctype, depth + 1)?,
        )?;
    }
    Ok(parts.done())
}

fn parse_mime(bytes: &[u8], origin: &str, depth: u32) -> Result<Section, SeedError> {
    // An mbox `From ` line before the headers, as Python's email module allows.
    let bytes = match bytes.starts_with(b"From ") {
        true => bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(&bytes[..0], |i| &bytes[i + 1..]),
        false => bytes,
    };
    let mail = match mailparse::parse_mail(bytes) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Section::Absent(Some(format!(
                "unreadable: invalid MIME: {e}"
            ))));
        }
    };
    let mut leaves = Vec::new();
    collect_leaves(&mail, &mut leaves);
    let mut parts = Parts {
        origin,
        found: None,
        reasons: Vec::new(),
    };
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
        // mailparse answers text/plain for a part without a Content-Type: cloud-init sniffs
        // those, as it does text/plain.
        let ctype = part.ctype.mimetype.clone();
        let section = parse_depth(&body, &part_origin, Some(&ctype), depth + 1)?;
        parts.add(name, section)?;
    }
    Ok(parts.done())
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

    const SECTION: &str = "troops:\n  remotes: {origin: \"git@repos.example.com:deploy\"}\n  roles: [web]\n  verify: tip\n";
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

    fn found(bytes: &[u8]) -> Seed {
        match parse(bytes, "t") {
            Ok(Section::Found(s)) => s,
            other => panic!("no seed: {other:?}\n{}", String::from_utf8_lossy(bytes)),
        }
    }

    fn absent(bytes: &[u8]) -> Option<String> {
        match parse(bytes, "t") {
            Ok(Section::Absent(why)) => why,
            other => panic!(
                "expected no section: {other:?}\n{}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    #[test]
    fn cloud_config() {
        let s = found(YAML.as_bytes());
        assert_eq!(s.remotes["origin"], "git@repos.example.com:deploy");
        assert_eq!(s.roles, Some(vec!["web".into()]));
        assert_eq!(s.verify, Some(super::super::Verify::Tip));
    }

    #[test]
    fn json_mime_and_gzip() {
        let json =
            r#"{"troops": {"remotes": {"a": "https://git.example.com/d.git"}, "branch": "main"}}"#;
        assert_eq!(found(json.as_bytes()).branch.as_deref(), Some("main"));
        assert_eq!(
            found(format!("#cloud-config\n{json}").as_bytes())
                .branch
                .as_deref(),
            Some("main")
        );
        found(&gzip(json.as_bytes()));
        let m = mime(&[
            ("text/x-shellscript", "#!/bin/sh\necho hi"),
            ("text/cloud-config", YAML),
        ]);
        assert!(found(m.as_bytes()).remotes.contains_key("origin"));
        found(&gzip(m.as_bytes()));
    }

    #[test]
    fn the_schema_clean_seed_in_write_files() {
        let plain = "#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: hi\n  - path: /etc/troops/seed.yaml\n    permissions: \"0600\"\n    content: |\n      remotes: {origin: \"git@repos.example.com:deploy\"}\n      roles: [web]\n";
        assert_eq!(found(plain.as_bytes()).roles, Some(vec!["web".into()]));
        let body = "remotes: {origin: \"git@repos.example.com:deploy\"}\nbranch: prod\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(body);
        let gzb64 = base64::engine::general_purpose::STANDARD.encode(gzip(body.as_bytes()));
        for (enc, content) in [
            ("b64", &b64),
            ("base64", &b64),
            ("gz+b64", &gzb64),
            ("gzip+base64", &gzb64),
        ] {
            let doc = format!(
                "#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  encoding: {enc}\n  content: {content}\n"
            );
            assert_eq!(
                found(doc.as_bytes()).branch.as_deref(),
                Some("prod"),
                "{enc}"
            );
        }
        let binary = format!(
            "#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  encoding: gzip\n  content: !!binary |\n    {gzb64}\n"
        );
        assert_eq!(found(binary.as_bytes()).branch.as_deref(), Some("prod"));
        // Strict inside: an unknown key in the seed file is named.
        let e = parse(b"#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  content: 'remotez: {}'\n", "u")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/troops/seed.yaml") && e.contains("remotez"),
            "{e}"
        );
        // Once, not twice.
        let both = format!("{plain}{SECTION}");
        assert!(
            parse(both.as_bytes(), "u")
                .unwrap_err()
                .to_string()
                .contains("give the seed once")
        );
    }

    #[test]
    fn user_data_without_a_section() {
        assert_eq!(absent(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(absent(b"#cloud-config\npackages: [git]\n"), None);
        let m = mime(&[("text/x-shellscript", "#!/bin/sh\necho hi")]);
        assert_eq!(absent(m.as_bytes()), None);
    }

    #[test]
    fn what_pyyaml_accepts_never_fails_troops() {
        let deep = format!("x: {}1{}\n", "[".repeat(250), "]".repeat(250));
        let others = [
            "apt: {sources: {a: {source: x}}}\napt: {preserve_sources_list: true}\n",
            "write_files:\n - path: /x.gz\n   encoding: gzip\n   content: !!binary |\n     H4sIAAAAAAAA/ytJLS4BAKHIa9gEAAAA\n",
            "~: x\nnull: y\n1: one\n2.5: b\n[1, 2]: c\n",
            "a: .inf\nb: .nan\nc: -.Inf\n",
            "a: !Ref foo\nb: !!python/object:x {}\nc: !!set {a, b}\nd: !!omap [{a: 1}]\n",
            "a: &x {k: 1}\nb: *x\nc: {<<: *x, d: 2}\n",
            "a: 2001-12-14t21:59:43.10-05:00\nb: 0o17\nc: 0x1F\nd: 1_000\ne: yes\n",
            &deep,
        ];
        for other in others {
            for header in ["#cloud-config", "#Cloud-Config", "\u{feff}#cloud-config"] {
                let without = format!("{header}\n{other}");
                assert_eq!(absent(without.as_bytes()), None, "{without}");
                let with = format!("{header}\n{other}{SECTION}");
                assert_eq!(
                    found(with.as_bytes()).roles,
                    Some(vec!["web".into()]),
                    "{with}"
                );
            }
        }
        // The last of two troops keys wins, as in PyYAML.
        let two = format!("#cloud-config\ntroops: {{roles: [db]}}\n{SECTION}");
        assert_eq!(found(two.as_bytes()).roles, Some(vec!["web".into()]));
    }

    #[test]
    fn what_cannot_be_read_is_no_section_with_the_reason() {
        let why = absent(b"#cloud-config\ntroops: [\n").unwrap();
        assert!(
            why.starts_with("unreadable: invalid YAML: line 2 column 9: "),
            "{why}"
        );
        let deep = format!(
            "#cloud-config\nx: {}1{}\n",
            "[".repeat(400),
            "]".repeat(400)
        );
        assert!(absent(deep.as_bytes()).unwrap().starts_with("unreadable:"));
        assert!(
            absent(b"#cloud-config\na: 1\n---\nb: 2\n")
                .unwrap()
                .starts_with("unreadable:")
        );
        assert!(
            absent(b"#cloud-config\na: \xff\n")
                .unwrap()
                .contains("not UTF-8")
        );
        assert!(absent(b"{\"troops\": ").unwrap().contains("invalid JSON"));
    }

    #[test]
    fn unsupported_kinds_are_named() {
        for (text, says) in [
            ("## template: jinja\n#cloud-config\ntroops: {}\n", "jinja"),
            ("#include\nhttps://example.com/ud\n", "#include"),
            ("#include-once\nhttps://example.com/ud\n", "#include-once"),
            ("#part-handler\ndef list_types(): pass\n", "#part-handler"),
            ("#cloud-config-jsonp\n[]\n", "jsonp"),
        ] {
            let why = absent(text.as_bytes()).unwrap();
            assert!(
                why.starts_with("not supported: ") && why.contains(says),
                "{why}"
            );
        }
        let m = mime(&[("text/x-include-url", "https://example.com/ud")]);
        assert!(
            absent(m.as_bytes())
                .unwrap()
                .contains("not supported: #include")
        );
    }

    #[test]
    fn archives_and_mime_read_as_cloud_init_reads_them() {
        let archive = format!(
            "#cloud-config-archive\n- type: text/x-shellscript\n  content: \"#!/bin/sh\\necho hi\"\n- \"#!/bin/sh\\necho hi\"\n- type: text/cloud-config\n  content: |\n    {}\n",
            SECTION.replace('\n', "\n    ")
        );
        assert_eq!(found(archive.as_bytes()).roles, Some(vec!["web".into()]));
        // A part's type comes from its Content-Type: no `#cloud-config` line needed.
        let m = mime(&[("text/cloud-config", SECTION)]);
        found(m.as_bytes());
        // ... and a shell script that happens to start with #cloud-config is not one.
        let m = mime(&[("text/x-shellscript", YAML)]);
        assert_eq!(absent(m.as_bytes()), None);
        // MIME-Version anywhere in the first 4096 bytes, any case; a Subject first, or an
        // mbox From line.
        let m = mime(&[("text/cloud-config", YAML)]);
        for front in [
            "Subject: node\n",
            "From nobody Mon Jan  1 00:00:00 2024\n",
            "X-Mailer: troops\nX-Other: x\n",
        ] {
            found(format!("{front}{}", m.replace("MIME-Version", "mime-VERSION")).as_bytes());
        }
        let two = mime(&[("text/cloud-config", YAML), ("text/cloud-config", YAML)]);
        assert!(
            parse(two.as_bytes(), "m")
                .unwrap_err()
                .to_string()
                .contains("two parts")
        );
    }

    #[test]
    fn errors_inside_the_section_name_the_source_and_key() {
        let e = parse(b"#cloud-config\ntroops:\n  remotez: {}\n", "seed.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("seed.yaml:") && e.contains("remotez"), "{e}");
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
        let e = parse(b"#cloud-config\ntroops:\n  roles: [.inf]\n", "y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("troops"), "{e}");
    }

    /// tests/userdata: cloud-configs shaped like real ones (cloud-init's documented
    /// modules, Packer and Terraform templates), each read without and with a troops section.
    #[test]
    fn the_regression_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/userdata");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.display().to_string();
            match parse(&bytes, &name) {
                Ok(Section::Absent(None)) => {}
                other => panic!("{name}: {other:?}"),
            }
            let text = String::from_utf8(bytes).unwrap();
            let with = match text.split_once("\n{") {
                // JSON after the header: the section goes in as a JSON member.
                Some((head, rest)) => format!(
                    "{head}\n{{\"troops\": {{\"remotes\": {{\"o\": \"git@h:x\"}}, \"roles\": [\"web\"]}}, {rest}"
                ),
                None => format!("{}\n{SECTION}", text.trim_end_matches('\n')),
            }
            .into_bytes();
            match parse(&with, &name) {
                Ok(Section::Found(s)) => assert_eq!(s.roles, Some(vec!["web".into()]), "{name}"),
                other => panic!("{name} with a troops section: {other:?}"),
            }
            n += 1;
        }
        assert!(
            n >= 8,
            "the corpus is missing: {n} files in {}",
            dir.display()
        );
    }
}
