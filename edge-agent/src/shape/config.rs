//! `[streams.NAME.shape]`: how a stream's payloads are decoded and which rules run on them.
//! Validated and compiled here; `crate::config` calls [`problems`] for each stream and the
//! writer calls [`compile`]. Reading key files and variables is the only IO.
//!
//! ```toml
//! [streams.cdr]
//! format = "csv"
//! full_policy = "backpressure"
//! [streams.cdr.shape]
//! csv_columns = ["record_type", "imsi", "msisdn", "duration_s"]
//! csv_types = { duration_s = "int" }
//! [[streams.cdr.shape.rules]]
//! kind = "drop"
//! when = 'record.duration_s < 1 && record.record_type == "voice"'
//! [[streams.cdr.shape.rules]]
//! kind = "pseudonymise"
//! fields = ["imsi", "msisdn"]
//! key_env = "BACKHAUL_PII_KEY"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, KeyInit};
use serde::Deserialize;
use sha2::Sha256;
use shared::units::Millis;

use super::Shaper;
use super::decode::{ColumnType, CsvFormat, Format};
use super::rules::{Action, Dedup, Downsampler, Predicate, Rule, Sampler, Series, TOPIC_FIELD};
use crate::config::PayloadFormatConfig;

/// Shortest pseudonymisation key, bytes (HMAC-SHA-256 wants at least 32 for full strength; 16
/// is the floor below which a key is likely a placeholder).
pub const KEY_BYTES_MIN: usize = 16;

/// `[streams.NAME.shape]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeConfig {
    /// CSV (`format = "csv"`): the column names, in order.
    #[serde(default)]
    pub csv_columns: Vec<String>,
    /// CSV: a type per column name (`string`, `int`, `float`, `bool`); unnamed columns are
    /// strings, so IMSIs keep their leading zeros.
    #[serde(default)]
    pub csv_types: BTreeMap<String, ColumnType>,
    /// CSV: the separator, one ASCII character.
    #[serde(default = "ShapeConfig::default_csv_delimiter")]
    pub csv_delimiter: String,
    /// CSV: whether each payload starts with a header line to skip.
    #[serde(default)]
    pub csv_header: bool,
    /// Most records one payload may hold (CSV lines, SenML entries, Sparkplug metrics, CDRs);
    /// a payload with more is dead-lettered.
    #[serde(default = "ShapeConfig::default_records_per_payload_max")]
    pub records_per_payload_max: usize,
    /// Sparkplug: most metric aliases remembered from birth messages, over all edge nodes.
    #[serde(default = "ShapeConfig::default_sparkplug_aliases_max")]
    pub sparkplug_aliases_max: usize,
    /// The rules, applied in order.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

impl ShapeConfig {
    fn default_csv_delimiter() -> String {
        ",".into()
    }
    fn default_records_per_payload_max() -> usize {
        10_000
    }
    fn default_sparkplug_aliases_max() -> usize {
        100_000
    }
}

impl Default for ShapeConfig {
    fn default() -> Self {
        Self {
            csv_columns: Vec::new(),
            csv_types: BTreeMap::new(),
            csv_delimiter: Self::default_csv_delimiter(),
            csv_header: false,
            records_per_payload_max: Self::default_records_per_payload_max(),
            sparkplug_aliases_max: Self::default_sparkplug_aliases_max(),
            rules: Vec::new(),
        }
    }
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Drop records for which `when` holds.
    Drop,
    /// Keep only records for which `when` holds.
    Keep,
    /// Keep 1 in `every` (per `key` if given).
    Sample,
    /// Replace `fields` by a keyed hash (HMAC-SHA-256, hex) so the core can join on them.
    Pseudonymise,
    /// Replace all but the last `keep_last` characters of `fields` with `*`.
    Mask,
    /// Remove `fields`.
    Remove,
    /// Add `attrs` (site, region, cell, …) and the names of the rules that matched.
    Enrich,
    /// Drop a record whose `key` was seen within `window`.
    Dedup,
    /// Fold series into min/max/mean/count/last per `device` and metric per `window`.
    Downsample,
}

/// `[[streams.NAME.shape.rules]]`: which keys apply depends on `kind`; others are refused.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name in metrics and in the `rule` attribute; default `<kind>_<index>`.
    pub name: Option<String>,
    /// `drop`, `keep`, `sample`, `pseudonymise`, `mask`, `remove`, `enrich`, `dedup`, `downsample`.
    pub kind: RuleKind,
    /// drop, keep: a CEL predicate over `record` (the fields), `topic` and `ts_ms`.
    pub when: Option<String>,
    /// sample: keep 1 in this many.
    pub every: Option<u64>,
    /// sample (optional), dedup: the fields that make a record's key.
    #[serde(default)]
    pub key: Vec<String>,
    /// pseudonymise, mask, remove: the fields to change.
    #[serde(default)]
    pub fields: Vec<String>,
    /// pseudonymise: a file holding the key (relative to the config file).
    pub key_file: Option<PathBuf>,
    /// pseudonymise: the environment variable holding the key.
    pub key_env: Option<String>,
    /// mask: characters left readable at the end (default 0).
    pub keep_last: Option<usize>,
    /// enrich: attributes to add.
    #[serde(default)]
    pub attrs: BTreeMap<String, String>,
    /// dedup, downsample: the window (event time).
    pub window: Option<Millis>,
    /// downsample: the field naming the device, or `$topic`.
    pub device: Option<String>,
    /// downsample (long form): the field naming the metric.
    pub metric: Option<String>,
    /// downsample (long form): the field holding the value.
    pub value: Option<String>,
    /// downsample (wide form): fields that are each a metric.
    #[serde(default)]
    pub values: Vec<String>,
    /// sample, dedup, downsample: most keys (series) held at once. Default 100000.
    pub keys_max: Option<usize>,
}

const KEYS_MAX_DEFAULT: usize = 100_000;
/// Longest `window` of dedup and downsample: state held longer than a week is a store, not a
/// window (and keeps times far from overflow).
pub const WINDOW_MS_MAX: u64 = 7 * 86_400_000;

impl ShapeConfig {
    /// Makes `key_file`s relative to the config file's directory `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for r in &mut self.rules {
            if let Some(f) = r.key_file.as_mut()
                && f.is_relative()
            {
                *f = base.join(&*f);
            }
        }
    }
}

/// Whether a stream of `format` with `shape` is shaped at all (plain `raw`/`json` streams
/// without rules keep the writer's own checks).
pub fn is_active(format: PayloadFormatConfig, shape: &ShapeConfig) -> bool {
    !shape.rules.is_empty() || !matches!(format, PayloadFormatConfig::Raw | PayloadFormatConfig::Json)
}

/// Every problem of stream `stream`'s shaping, as (key, reason). `backpressure`: the stream's
/// `full_policy` is `backpressure`, where windowed rules are refused (DESIGN §3).
pub fn problems(
    stream: &str,
    format: PayloadFormatConfig,
    shape: &ShapeConfig,
    backpressure: bool,
) -> Vec<(String, String)> {
    let mut p = match compile(stream, format, shape) {
        Ok(_) => Vec::new(),
        Err(p) => p,
    };
    if backpressure {
        for (i, r) in shape.rules.iter().enumerate() {
            if matches!(r.kind, RuleKind::Dedup | RuleKind::Downsample) {
                p.push((
                    format!("streams.{stream}.shape.rules[{i}].kind"),
                    format!(
                        "{} holds records in a window: refused on full_policy = \"backpressure\" streams, whose \
                         input would be acknowledged before its output is durable",
                        kind_name(r.kind)
                    ),
                ));
            }
        }
    }
    p
}

/// Compiles stream `stream`'s shaping: `None` if it is not shaped, else the shaper, or every
/// problem as (key, reason).
pub fn compile(
    stream: &str,
    format: PayloadFormatConfig,
    shape: &ShapeConfig,
) -> Result<Option<Shaper>, Vec<(String, String)>> {
    if !is_active(format, shape) {
        return Ok(None);
    }
    let mut p = Vec::new();
    let base = format!("streams.{stream}.shape");
    let fmt = match format {
        PayloadFormatConfig::Raw => Format::Raw,
        PayloadFormatConfig::Json => Format::Json,
        PayloadFormatConfig::Csv => {
            if shape.csv_columns.is_empty() {
                p.push((format!("{base}.csv_columns"), "format = \"csv\" needs the column names".into()));
            }
            for c in shape.csv_types.keys() {
                if !shape.csv_columns.contains(c) {
                    p.push((format!("{base}.csv_types.{c}"), "not one of csv_columns".into()));
                }
            }
            let delimiter = match shape.csv_delimiter.as_bytes() {
                [b] if b.is_ascii() && *b != b'"' && *b != b'\n' => *b,
                _ => {
                    p.push((format!("{base}.csv_delimiter"), "one ASCII character other than '\"' or newline".into()));
                    b','
                }
            };
            Format::Csv(CsvFormat {
                types: shape
                    .csv_columns
                    .iter()
                    .map(|c| shape.csv_types.get(c).copied().unwrap_or(ColumnType::String))
                    .collect(),
                columns: shape.csv_columns.clone(),
                delimiter,
                header: shape.csv_header,
            })
        }
        PayloadFormatConfig::SenmlJson => Format::SenmlJson,
        PayloadFormatConfig::SenmlCbor => Format::SenmlCbor,
        PayloadFormatConfig::Sparkplug => Format::Sparkplug,
        PayloadFormatConfig::CdrBer => Format::CdrBer,
    };
    if format != PayloadFormatConfig::Csv && (!shape.csv_columns.is_empty() || !shape.csv_types.is_empty()) {
        p.push((format!("{base}.csv_columns"), "only for format = \"csv\"".into()));
    }
    if shape.records_per_payload_max == 0 || shape.records_per_payload_max > 1_000_000 {
        p.push((format!("{base}.records_per_payload_max"), "between 1 and 1000000".into()));
    }
    let mut rules = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in shape.rules.iter().enumerate() {
        let k = |f: &str| format!("{base}.rules[{i}].{f}");
        let name = r.name.clone().unwrap_or_else(|| format!("{}_{i}", kind_name(r.kind)));
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            p.push((k("name"), "1 to 64 of a-z A-Z 0-9 _ - .".into()));
        }
        if !names.insert(name.clone()) {
            p.push((k("name"), "used by another rule of this stream".into()));
        }
        for key in inapplicable(r) {
            p.push((k(key), format!("does not apply to kind = \"{}\"", kind_name(r.kind))));
        }
        if format == PayloadFormatConfig::Raw
            && matches!(r.kind, RuleKind::Pseudonymise | RuleKind::Mask | RuleKind::Remove | RuleKind::Downsample)
        {
            p.push((k("kind"), "raw payloads are kept byte for byte: no rule may change their fields".into()));
        }
        match rule(r) {
            Ok(action) => rules.push(Rule { name, action, counters: Arc::default() }),
            Err((key, why)) => p.push((k(key), why)),
        }
    }
    if p.is_empty() {
        Ok(Some(Shaper::with_aliases(fmt, shape.records_per_payload_max, rules, shape.sparkplug_aliases_max)))
    } else {
        Err(p)
    }
}

fn kind_name(k: RuleKind) -> &'static str {
    match k {
        RuleKind::Drop => "drop",
        RuleKind::Keep => "keep",
        RuleKind::Sample => "sample",
        RuleKind::Pseudonymise => "pseudonymise",
        RuleKind::Mask => "mask",
        RuleKind::Remove => "remove",
        RuleKind::Enrich => "enrich",
        RuleKind::Dedup => "dedup",
        RuleKind::Downsample => "downsample",
    }
}

/// Keys set on `r` that its kind does not use.
fn inapplicable(r: &RuleConfig) -> Vec<&'static str> {
    use RuleKind::*;
    let set = [
        ("when", r.when.is_some(), &[Drop, Keep][..]),
        ("every", r.every.is_some(), &[Sample][..]),
        ("key", !r.key.is_empty(), &[Sample, Dedup][..]),
        ("fields", !r.fields.is_empty(), &[Pseudonymise, Mask, Remove][..]),
        ("key_file", r.key_file.is_some(), &[Pseudonymise][..]),
        ("key_env", r.key_env.is_some(), &[Pseudonymise][..]),
        ("keep_last", r.keep_last.is_some(), &[Mask][..]),
        ("attrs", !r.attrs.is_empty(), &[Enrich][..]),
        ("window", r.window.is_some(), &[Dedup, Downsample][..]),
        ("device", r.device.is_some(), &[Downsample][..]),
        ("metric", r.metric.is_some(), &[Downsample][..]),
        ("value", r.value.is_some(), &[Downsample][..]),
        ("values", !r.values.is_empty(), &[Downsample][..]),
        ("keys_max", r.keys_max.is_some(), &[Sample, Dedup, Downsample][..]),
    ];
    set.into_iter().filter(|(_, is_set, kinds)| *is_set && !kinds.contains(&r.kind)).map(|(k, _, _)| k).collect()
}

type Problem = (&'static str, String);

fn rule(r: &RuleConfig) -> Result<Action, Problem> {
    let keys_max = r.keys_max.unwrap_or(KEYS_MAX_DEFAULT);
    if keys_max == 0 {
        return Err(("keys_max", "at least 1".into()));
    }
    let need_fields = || {
        if r.fields.is_empty() { Err(("fields", "name at least one field".to_string())) } else { Ok(r.fields.clone()) }
    };
    let window = || match r.window {
        Some(w) if w.0 > 0 && w.0 <= WINDOW_MS_MAX => Ok(w.0 as i64),
        _ => Err(("window", "a window above zero and at most 7 days, e.g. \"60s\"".to_string())),
    };
    Ok(match r.kind {
        RuleKind::Drop | RuleKind::Keep => {
            let src = r.when.as_deref().ok_or(("when", "a CEL predicate, e.g. 'record.duration_s < 1'".to_string()))?;
            let p = Predicate::compile(src).map_err(|e| ("when", e))?;
            if r.kind == RuleKind::Drop { Action::Drop(p) } else { Action::Keep(p) }
        }
        RuleKind::Sample => match r.every {
            Some(n) if n >= 1 => Action::Sample(Sampler::new(n, r.key.clone(), keys_max)),
            _ => return Err(("every", "keep 1 in N: N at least 1".into())),
        },
        RuleKind::Pseudonymise => {
            let fields = need_fields()?;
            let key = load_key(r)?;
            let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).map_err(|e| ("key_file", e.to_string()))?;
            Action::Pseudonymise { fields, mac: Box::new(mac) }
        }
        RuleKind::Mask => Action::Mask { fields: need_fields()?, keep_last: r.keep_last.unwrap_or(0) },
        RuleKind::Remove => Action::Remove(need_fields()?),
        RuleKind::Enrich => Action::Enrich(r.attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        RuleKind::Dedup => {
            if r.key.is_empty() {
                return Err(("key", "the fields that identify a record, e.g. [\"charging_id\"]".into()));
            }
            Action::Dedup(Dedup::new(r.key.clone(), window()?, keys_max))
        }
        RuleKind::Downsample => {
            let device =
                r.device.clone().ok_or(("device", format!("a field naming the device, or {TOPIC_FIELD:?}")))?;
            let series = match (&r.metric, &r.value, r.values.is_empty()) {
                (Some(m), Some(v), true) => Series::Long { metric: m.clone(), value: v.clone() },
                (None, None, false) => Series::Wide(r.values.clone()),
                _ => {
                    return Err((
                        "values",
                        "either metric and value (one metric per record) or values (fields that are metrics)".into(),
                    ));
                }
            };
            Action::Downsample(Downsampler::new(device, series, window()?, keys_max))
        }
    })
}

fn load_key(r: &RuleConfig) -> Result<Vec<u8>, Problem> {
    let (key, origin) = match (&r.key_file, &r.key_env) {
        (Some(f), None) => {
            let bytes = std::fs::read(f).map_err(|e| ("key_file", format!("{}: {e}", f.display())))?;
            (bytes, "key_file")
        }
        (None, Some(var)) => {
            let v = std::env::var_os(var).ok_or(("key_env", format!("environment variable {var} is not set")))?;
            (v.into_encoded_bytes(), "key_env")
        }
        _ => return Err(("key_file", "exactly one of key_file and key_env".into())),
    };
    let end = key.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    if end < KEY_BYTES_MIN {
        return Err((origin, format!("the key is {end} bytes; at least {KEY_BYTES_MIN}")));
    }
    Ok(key[..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(toml_text: &str) -> ShapeConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn problems_name_the_rule_and_key() {
        let s = shape(
            r#"
[[rules]]
kind = "drop"
[[rules]]
kind = "keep"
when = "record.a <"
every = 3
[[rules]]
kind = "pseudonymise"
fields = ["imsi"]
key_env = "BH_SHAPE_TEST_SURELY_UNSET"
[[rules]]
kind = "dedup"
key = ["id"]
window = "10s"
"#,
        );
        let p = problems("cdr", PayloadFormatConfig::Json, &s, true);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"streams.cdr.shape.rules[0].when"), "{p:?}");
        assert!(keys.contains(&"streams.cdr.shape.rules[1].when"), "{p:?}");
        assert!(keys.contains(&"streams.cdr.shape.rules[1].every"), "{p:?}");
        assert!(keys.contains(&"streams.cdr.shape.rules[2].key_env"), "{p:?}");
        let windowed = p.iter().find(|(k, _)| k == "streams.cdr.shape.rules[3].kind").expect("dedup refused");
        assert!(windowed.1.contains("backpressure"), "{windowed:?}");
        assert!(
            problems(
                "cdr",
                PayloadFormatConfig::Json,
                &shape("[[rules]]\nkind = \"dedup\"\nkey = [\"id\"]\nwindow = \"10s\""),
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn raw_streams_refuse_changing_rules_and_csv_needs_columns() {
        let p =
            problems("s", PayloadFormatConfig::Raw, &shape("[[rules]]\nkind = \"remove\"\nfields = [\"a\"]"), false);
        assert_eq!(p[0].0, "streams.s.shape.rules[0].kind", "{p:?}");
        let p = problems("s", PayloadFormatConfig::Csv, &ShapeConfig::default(), false);
        assert_eq!(p[0].0, "streams.s.shape.csv_columns", "{p:?}");
    }

    #[test]
    fn short_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "short\n").unwrap();
        let text =
            format!("[[rules]]\nkind = \"pseudonymise\"\nfields = [\"a\"]\nkey_file = {:?}", f.display().to_string());
        let p = problems("s", PayloadFormatConfig::Json, &shape(&text), false);
        assert!(p[0].1.contains("at least 16"), "{p:?}");
        std::fs::write(&f, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert!(problems("s", PayloadFormatConfig::Json, &shape(&text), false).is_empty());
    }
}
