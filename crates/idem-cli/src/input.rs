//! Reading plan input: JSON Lines or CSV, from files or stdin, streamed in
//! constant memory, every bad line named by file and line number.

use idem_core::JobSpec;
use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One input record as written by the user. A field it does not know (a
/// misspelt `SHA256` or `sha`) is an error for its line: silently dropping
/// it would run the job without the check it asked for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    work_id: Option<String>,
    artifact_id: Option<String>,
    url: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    /// The artifact's URLs in the order they are tried (after `url`, if
    /// both are given).
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
}

/// The same record with unknown fields ignored (`--allow-unknown-fields`).
#[derive(Debug, Deserialize)]
struct LaxRecord {
    work_id: Option<String>,
    artifact_id: Option<String>,
    url: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    /// The artifact's URLs in the order they are tried (after `url`, if
    /// both are given).
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
}

impl From<LaxRecord> for Record {
    fn from(r: LaxRecord) -> Self {
        Self {
            work_id: r.work_id,
            artifact_id: r.artifact_id,
            url: r.url,
            sha256: r.sha256,
            content_type: r.content_type,
            urls: r.urls,
            headers: r.headers,
        }
    }
}

/// The fields (JSON) and columns (CSV) a plan line may have.
const FIELDS: [&str; 7] = [
    "work_id",
    "artifact_id",
    "url",
    "sha256",
    "content_type",
    "urls",
    "headers",
];

/// The known field nearest to `name`, for "did you mean".
fn nearest_field(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    FIELDS
        .iter()
        .min_by_key(|f| edit_distance(&lower, f))
        .copied()
        .unwrap_or("url")
}

/// Levenshtein distance over bytes (field names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_field(name: &str) -> String {
    let name = cut(name, 64);
    format!(
        "unknown field `{name}` (did you mean `{}`? the fields are {}; --allow-unknown-fields ignores others)",
        nearest_field(&name),
        FIELDS.join(", ")
    )
}

/// Most characters of a value quoted in an error: a line may carry a URL of
/// a megabyte, and reports must stay readable and small.
const MAX_SHOWN: usize = 200;

/// `s` cut to `max` characters, marked when cut.
pub(crate) fn cut(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} bytes in all)", &s[..i], s.len()).into(),
        None => s.into(),
    }
}

/// How a plan input is read.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ReadOptions {
    /// Ignore fields and columns that are not plan fields.
    pub(crate) allow_unknown_fields: bool,
}

/// Parses one JSON line into a record.
fn parse_json(text: &str, opts: ReadOptions) -> Result<Record, String> {
    let lax = || serde_json::from_str::<LaxRecord>(text).map(Record::from);
    let r = if opts.allow_unknown_fields {
        lax()
    } else {
        serde_json::from_str::<Record>(text)
    };
    r.map_err(|e| {
        let msg = e.to_string();
        // serde names the field first: "unknown field `X`, expected one of …"
        match msg
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
        {
            Some((name, _)) => unknown_field(name),
            None => format!(
                "not a JSON object with work_id, artifact_id, url: {}",
                cut(&msg, MAX_SHOWN)
            ),
        }
    })
}

/// A line that could not become a job.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BadLine {
    pub(crate) file: String,
    pub(crate) line: u64,
    pub(crate) error: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.error)
    }
}

/// An input item: a spec with where it came from, or a bad line.
pub(crate) enum Item {
    Spec {
        spec: JobSpec,
        file: String,
        line: u64,
    },
    Bad(BadLine),
}

fn to_spec(r: Record) -> Result<JobSpec, String> {
    let need = |v: Option<String>, f: &str| v.ok_or_else(|| format!("missing field `{f}`"));
    let work = need(r.work_id, "work_id")?;
    let art = need(r.artifact_id, "artifact_id")?;
    let mut urls = r.urls.unwrap_or_default().into_iter();
    let url = match r.url {
        Some(u) => u,
        None => urls
            .next()
            .ok_or_else(|| "missing field `url` (or `urls`)".to_owned())?,
    };
    let headers = r.headers.unwrap_or_default();
    JobSpec::new(
        &work,
        &art,
        &url,
        r.sha256.as_deref(),
        r.content_type.as_deref(),
    )
    .and_then(|s| s.with_mirrors(urls.as_slice().iter().map(String::as_str)))
    .and_then(|s| s.with_headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))))
    .map_err(|e| cut(&e.to_string(), MAX_SHOWN).into_owned())
}

/// Longest input line accepted; longer ones are reported and skipped
/// without being held in memory.
const MAX_LINE: usize = 1 << 20;

/// Reads one line (without its newline) into `buf`, keeping at most
/// `MAX_LINE` bytes. Returns the bytes consumed and whether it was cut.
fn read_line_capped(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok((consumed, too_long));
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let body = if done {
            &chunk[..take - 1]
        } else {
            &chunk[..take]
        };
        if buf.len() + body.len() > MAX_LINE {
            too_long = true;
        } else {
            buf.extend_from_slice(body);
        }
        r.consume(take);
        consumed += take;
        if done {
            return Ok((consumed, too_long));
        }
    }
}

/// Opens `name` (`-` is stdin).
fn open(name: &str) -> anyhow::Result<Box<dyn Read>> {
    if name == "-" {
        return Ok(Box::new(std::io::stdin()));
    }
    let f = std::fs::File::open(name)
        .map_err(|e| anyhow::anyhow!("cannot read plan file {name}: {e}"))?;
    Ok(Box::new(f))
}

fn is_csv(name: &str, first_line: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        || (!first_line.trim_start().starts_with('{') && first_line.contains("url"))
}

/// Streams the items of one input, calling `f` for each.
pub(crate) fn read(
    name: &str,
    opts: ReadOptions,
    mut f: impl FnMut(Item) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let shown = if name == "-" {
        "<stdin>".to_owned()
    } else {
        name.to_owned()
    };
    let mut reader = BufReader::with_capacity(1 << 16, open(name)?);
    let mut first = String::new();
    // Peek the first line to pick the format, then chain it back.
    let n = reader
        .read_line(&mut first)
        .map_err(|e| anyhow::anyhow!("reading {shown}: {e}"))?;
    if n == 0 {
        return Ok(());
    }
    let rest = std::io::Cursor::new(first.clone().into_bytes()).chain(reader);
    if is_csv(name, &first) {
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(rest);
        let headers = rdr
            .headers()
            .map_err(|e| anyhow::anyhow!("{shown}:1: bad CSV header: {e}"))?
            .clone();
        if !headers.iter().any(|h| h == "url" || h == "urls") {
            anyhow::bail!("{shown}:1: CSV header must name the columns work_id, artifact_id, url (and optionally sha256, content_type, urls)");
        }
        if headers.iter().any(|h| h == "headers") {
            anyhow::bail!("{shown}:1: column `headers`: request headers are given in JSON lines only (a `headers` object); nothing from this file was applied");
        }
        if !opts.allow_unknown_fields {
            if let Some(h) = headers.iter().find(|h| !FIELDS.contains(h)) {
                anyhow::bail!(
                    "{shown}:1: {}; nothing from this file was applied",
                    unknown_field(h)
                );
            }
        }
        let mut rec = csv::StringRecord::new();
        loop {
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {
                    let line = rec.position().map_or(0, csv::Position::line);
                    let get = |k: &str| {
                        headers
                            .iter()
                            .position(|h| h == k)
                            .and_then(|i| rec.get(i))
                            .filter(|v| !v.is_empty())
                            .map(str::to_owned)
                    };
                    let r = Record {
                        work_id: get("work_id"),
                        artifact_id: get("artifact_id"),
                        url: get("url"),
                        sha256: get("sha256"),
                        content_type: get("content_type"),
                        // Several URLs in one cell, separated by spaces.
                        urls: get("urls")
                            .map(|v| v.split_whitespace().map(str::to_owned).collect()),
                        headers: None,
                    };
                    f(match to_spec(r) {
                        Ok(spec) => Item::Spec {
                            spec,
                            file: shown.clone(),
                            line,
                        },
                        Err(error) => Item::Bad(BadLine {
                            file: shown.clone(),
                            line,
                            error,
                        }),
                    })?;
                }
                Err(e) => {
                    let line = e.position().map_or(0, csv::Position::line);
                    f(Item::Bad(BadLine {
                        file: shown.clone(),
                        line,
                        error: format!("bad CSV: {}", cut(&e.to_string(), MAX_SHOWN)),
                    }))?;
                }
            }
        }
        return Ok(());
    }
    let mut line_no = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    let mut r = BufReader::new(rest);
    loop {
        buf.clear();
        let (n, too_long) = read_line_capped(&mut r, &mut buf)
            .map_err(|e| anyhow::anyhow!("reading {shown}: {e}"))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let bad = |error: String| {
            Item::Bad(BadLine {
                file: shown.clone(),
                line: line_no,
                error,
            })
        };
        if too_long {
            f(bad(format!("line longer than {MAX_LINE} bytes")))?;
            continue;
        }
        let Ok(text) = std::str::from_utf8(&buf) else {
            f(bad("not valid UTF-8".into()))?;
            continue;
        };
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let item = match parse_json(text, opts).and_then(to_spec) {
            Ok(spec) => Item::Spec {
                spec,
                file: shown.clone(),
                line: line_no,
            },
            Err(error) => bad(error),
        };
        f(item)?;
    }
    Ok(())
}
