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

/// One node as YAML gives it, before its tag is looked at.
struct Untagged(Loose);

impl<'de> Deserialize<'de> for Untagged {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Untagged, D::Error> {
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
        d.deserialize_any(V).map(Untagged)
    }
}

impl<'de> Deserialize<'de> for Loose {
    /// Through serde-saphyr's tag wrapper (`Tagged<T>`'s protocol: the node, then its tag),
    /// so that `!!binary` becomes the bytes PyYAML would give, not base64 text.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a YAML node and its tag")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Loose, A::Error> {
                let Untagged(node) = a
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("a tagged node without its value"))?;
                let tag: Option<String> = a.next_element::<String>()?;
                let binary = tag
                    .as_deref()
                    .is_some_and(|t| t == "!!binary" || t == "tag:yaml.org,2002:binary");
                Ok(match node {
                    Loose::Str(text) if binary => python_b64decode(text.as_bytes())
                        .map(Loose::Bytes)
                        .map_err(|e| de::Error::custom(format!("!!binary: {e}")))?,
                    other => other,
                })
            }
        }
        d.deserialize_newtype_struct("__yaml_tagged", V)
    }
}

/// base64 as Python's `b64decode` reads it (cloud-init's decoder): characters outside the
/// alphabet are dropped, and stray low bits in the last character are allowed.
fn python_b64decode(text: &[u8]) -> Result<Vec<u8>, String> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
    );
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
        .collect();
    LENIENT
        .decode(clean)
        .map_err(|e| format!("not base64: {e}"))
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
                    // Strict inside the section: a key given twice is a mistake to name,
                    // not one to resolve silently.
                    if out.insert(k.clone(), v.to_json()?).is_some() {
                        return Err(format!("{k:?} is given twice"));
                    }
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
        // PyYAML has no such heuristic: a config that uses one anchor a hundred times is
        // fine there. Replayed aliases still count against the node and byte budgets.
        budget.enforce_alias_anchor_ratio = false;
        let opts = serde_saphyr::options! {
            budget: Some(budget),
            // Every entry reaches `Loose::Map`: the last wins outside the troops section,
            // as in PyYAML, and a repeated key inside it is named.
            duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::PassThrough,
            non_finite_float_policy: serde_saphyr::options::NonFiniteFloatPolicy::PassThrough,
            // `!!binary` arrives as its base64 text with its tag; `Loose` decodes it.
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
/// at the top level. `None` when it is empty (or only comments).
pub fn parse_seed_file(bytes: &[u8], origin: &str) -> Result<Option<Seed>, SeedError> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| malformed(origin, format!("not UTF-8 (at byte {})", e.valid_up_to())))?;
    match read_yaml(text).map_err(|m| malformed(origin, m))? {
        Loose::Null => Ok(None),
        node => seed_from(&node, origin, "seed").map(Some),
    }
}

/// A write_files path as cloud-init resolves it (`os.path.abspath`, from `/`), with a
/// leading `//` read as `/`, as Linux does.
fn normalise_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The seed file's bytes as cloud-init's write_files would leave them: entries for its
/// path in order (those with `defer: true` after the rest, as cloud-init writes them
/// later), `append` adding to what is there, each decoded as `extract_contents` does.
fn seed_in_write_files(write_files: &Loose, origin: &str) -> Result<Option<Seed>, SeedError> {
    let Loose::Seq(entries) = write_files else {
        return Ok(None);
    };
    let at = format!("write_files {SEED_FILE}");
    let bad = |m: String| malformed(origin, format!("{at}: {m}"));
    let ours: Vec<&Loose> = entries
        .iter()
        .filter(|e| {
            e.get("path")
                .and_then(Loose::as_str)
                .map(normalise_path)
                .as_deref()
                == Some(SEED_FILE)
        })
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let deferred = |e: &Loose| matches!(e.get("defer"), Some(Loose::Bool(true)));
    let mut file: Vec<u8> = Vec::new();
    for entry in ours
        .iter()
        .filter(|e| !deferred(e))
        .chain(ours.iter().filter(|e| deferred(e)))
    {
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
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let gunzip = |b: &[u8]| {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(b)
                .take(MAX_SIZE)
                .read_to_end(&mut out)
                .map_err(|e| bad(format!("content is not gzip data: {e}")))?;
            Ok::<_, SeedError>(out)
        };
        let b64 = |b: &[u8]| python_b64decode(b).map_err(|e| bad(format!("content is {e}")));
        let content = match encoding.as_str() {
            "gz" | "gzip" => gunzip(&raw)?,
            "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64" => gunzip(&b64(&raw)?)?,
            "b64" | "base64" => b64(&raw)?,
            "" | "text/plain" => raw,
            other => {
                // cloud-init warns and writes it as text: so does troops.
                tracing::warn!("{origin}: {at}: unknown encoding {other:?}, read as text/plain");
                raw
            }
        };
        let append = matches!(entry.get("append"), Some(Loose::Bool(true)));
        if !append {
            file.clear();
        }
        file.extend_from_slice(&content);
    }
    parse_seed_file(&file, &format!("{origin} ({at})"))
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
    /// A bare JSON object at the top level: cloud-init ignores it, troops has always read it.
    Json,
    Unsupported(&'static str),
    NotOurs,
}

const INCLUDE: &str = "#include (troops does not fetch the URLs it lists)";

/// The kind cloud-init's `type_from_starts_with` finds, `None` for text it does not know.
fn sniff(text: &str) -> Option<Kind> {
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
        ("#include", Kind::Unsupported(INCLUDE)),
        ("#part-handler", Kind::Unsupported("#part-handler")),
        ("#cloud-boothook", Kind::NotOurs),
        ("#!", Kind::NotOurs),
    ];
    PREFIXES
        .into_iter()
        .find(|(prefix, _)| head.starts_with(prefix))
        .map(|(_, kind)| kind)
}

/// cloud-init decompresses a MIME part of these types, then looks at what it holds.
const GZIP_TYPES: [&str; 8] = [
    "application/gzip",
    "application/gzip-compressed",
    "application/gzipped",
    "application/x-compress",
    "application/x-compressed",
    "application/x-gunzip",
    "application/x-gzip",
    "application/x-gzip-compressed",
];

/// A declared type's kind. cloud-init looks again at what a part holds only when its type
/// says little (`text/plain`, `text/x-not-multipart`) or is a shell script (which may be a
/// cloud-config under the wrong label); a declared type is otherwise taken as it is.
fn kind_of_type(ctype: &str, body: &str) -> Kind {
    match ctype.trim().to_ascii_lowercase().as_str() {
        "text/plain" | "text/x-not-multipart" | "text/x-shellscript" => {
            sniff(body).unwrap_or(Kind::NotOurs)
        }
        "text/cloud-config" => match sniff(body) {
            Some(k @ Kind::Unsupported(_)) => k,
            _ => Kind::CloudConfig,
        },
        "text/cloud-config-archive" => Kind::Archive,
        "text/cloud-config-jsonp" => Kind::Unsupported("text/cloud-config-jsonp"),
        "text/x-include-url" => Kind::Unsupported(INCLUDE),
        "text/x-include-once-url" => Kind::Unsupported(INCLUDE),
        "text/part-handler" => Kind::Unsupported("#part-handler"),
        "text/jinja2" => Kind::Unsupported("a jinja template (text/jinja2)"),
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
    // cloud-init decompresses the whole of the user data once, before anything else.
    let unzipped;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        unzipped = gunzip_capped(bytes).map_err(|m| malformed(origin, m))?;
        &unzipped[..]
    } else {
        bytes
    };
    // Editors put a byte-order mark in front of what they save.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    if is_mime(bytes) {
        return parse_mime(bytes, origin);
    }
    let lossy = String::from_utf8_lossy(bytes);
    let kind = match lossy.trim_start().starts_with('{') {
        true => Kind::Json,
        false => sniff(&lossy).unwrap_or(Kind::NotOurs),
    };
    read_as(bytes, kind, origin, 0)
}

fn gunzip_capped(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("bad gzip data: {e}"))?;
    if out.len() as u64 > MAX_SIZE {
        return Err(format!("gzip data expands beyond {MAX_SIZE} bytes"));
    }
    Ok(out)
}

/// `bytes` read as `kind` says.
fn read_as(bytes: &[u8], kind: Kind, origin: &str, depth: u32) -> Result<Section, SeedError> {
    if depth > 4 {
        return Err(malformed(
            origin,
            "user data nested too deeply (archives inside each other)",
        ));
    }
    let kind = match kind {
        Kind::NotOurs => return Ok(Section::Absent(None)),
        Kind::Unsupported(what) => {
            return Ok(Section::Absent(Some(format!("not supported: {what}"))));
        }
        k => k,
    };
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
        Kind::Unsupported(_) | Kind::NotOurs => Ok(Section::Absent(None)),
    }
}

/// Whether cloud-init would read this as MIME: `mime-version:` in its first 4096 bytes
/// and headers where Python's email parser looks for them (after an optional mbox `From `
/// line, a line `Name: …`); or, as troops always has, a `Content-Type:` header first.
fn is_mime(bytes: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(MIME_SNIFF)]).to_ascii_lowercase();
    if head.trim_start().starts_with("content-type:") {
        return true;
    }
    if !head.contains("mime-version:") {
        return false;
    }
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("");
    if first.starts_with("from ") {
        first = lines.next().unwrap_or("");
    }
    // Python's feedparser: `^(From |[\041-\071\073-\176]*:|[\t ])`.
    let name_then_colon = first.split_once(':').is_some_and(|(name, _)| {
        name.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b':')
    });
    name_then_colon || first.starts_with([' ', '\t'])
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
        let kind = match ctype {
            Some(t) => kind_of_type(t, content),
            None => sniff(content).unwrap_or(Kind::CloudConfig),
        };
        parts.add(
            name,
            read_as(content.as_bytes(), kind, &part_origin, depth + 1)?,
        )?;
    }
    Ok(parts.done())
}

fn parse_mime(bytes: &[u8], origin: &str) -> Result<Section, SeedError> {
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
        // mailparse answers text/plain for a part without a Content-Type, as Python does.
        let ctype = part.ctype.mimetype.to_ascii_lowercase();
        let section = if GZIP_TYPES.contains(&ctype.as_str()) {
            match gunzip_capped(&body) {
                Ok(b) => {
                    let kind = sniff(&String::from_utf8_lossy(&b)).unwrap_or(Kind::NotOurs);
                    read_as(&b, kind, &part_origin, 1)?
                }
                Err(m) => Section::Absent(Some(format!("unreadable: {m}"))),
            }
        } else {
            let kind = kind_of_type(&ctype, &String::from_utf8_lossy(&body));
            read_as(&body, kind, &part_origin, 1)?
        };
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
        // !!binary with no encoding: the decoded bytes, as cloud-init writes them.
        let tagged = format!(
            "#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  content: !!binary |\n    {b64}\n"
        );
        assert_eq!(found(tagged.as_bytes()).branch.as_deref(), Some("prod"));
        // Paths as cloud-init resolves them; append adds; an empty file is no seed.
        for path in [
            "//etc/troops/seed.yaml",
            "/etc/troops/./seed.yaml",
            "/etc/x/../troops/seed.yaml",
            "etc/troops/seed.yaml",
        ] {
            let doc =
                format!("#cloud-config\nwrite_files:\n- path: {path}\n  content: 'branch: prod'\n");
            assert_eq!(
                found(doc.as_bytes()).branch.as_deref(),
                Some("prod"),
                "{path}"
            );
        }
        let appended = "#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  content: \"branch: prod\\n\"\n- path: /etc/troops/seed.yaml\n  append: true\n  content: \"roles: [web]\\n\"\n";
        let seed = found(appended.as_bytes());
        assert_eq!(
            (seed.branch.as_deref(), seed.roles),
            (Some("prod"), Some(vec!["web".into()]))
        );
        assert_eq!(
            absent(b"#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n"),
            None
        );
        // An encoding cloud-init does not know is text to it, and to troops.
        let odd = "#cloud-config\nwrite_files:\n- path: /etc/troops/seed.yaml\n  encoding: utf-8\n  content: 'branch: prod'\n";
        assert_eq!(found(odd.as_bytes()).branch.as_deref(), Some("prod"));
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
            &format!("x: &v 1\ny: [{}]\n", vec!["*v"; 150].join(", ")),
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
        // An entry with no type and no header is a cloud-config, as cloud-init defaults it.
        let untyped = format!(
            "#cloud-config-archive\n- content: |\n    {}\n",
            SECTION.replace('\n', "\n    ")
        );
        found(untyped.as_bytes());
        let bare = format!("#cloud-config-archive\n- {:?}\n", SECTION);
        found(bare.as_bytes());
        // A part's type comes from its Content-Type: no `#cloud-config` line needed.
        let m = mime(&[("text/cloud-config", SECTION)]);
        found(m.as_bytes());
        // cloud-init looks again at a shell script part: one that starts with
        // #cloud-config is a cloud-config.
        let m = mime(&[("text/x-shellscript", YAML)]);
        found(m.as_bytes());
        // A part cloud-init would not read as a cloud-config carries no seed, even gzipped,
        // even as text/plain JSON.
        let b64gz = base64::engine::general_purpose::STANDARD.encode(gzip(YAML.as_bytes()));
        for (ctype, body) in [
            (
                "text/x-shellscript\nContent-Transfer-Encoding: base64",
                b64gz.as_str(),
            ),
            ("application/octet-stream", YAML),
            ("image/png", YAML),
            ("text/plain", r#"{"troops": {"remotes": {"o": "git@h:x"}}}"#),
        ] {
            assert_eq!(absent(mime(&[(ctype, body)]).as_bytes()), None, "{ctype}");
        }
        // A gzip part of a gzip type is unpacked and looked at.
        let m = mime(&[(
            "application/x-gzip\nContent-Transfer-Encoding: base64",
            b64gz.as_str(),
        )]);
        found(m.as_bytes());
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
        // "MIME-Version:" inside a cloud-config is text, not headers (the first line is not
        // one).
        let inside = format!(
            "#cloud-config\nwrite_files:\n - path: /etc/mail/t\n   content: \"MIME-Version: 1.0\"\n{SECTION}"
        );
        found(inside.as_bytes());
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
        let e = parse(
            b"#cloud-config\ntroops:\n  roles: [web]\n  roles: [db]\n",
            "y",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"roles\" is given twice"), "{e}");
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
