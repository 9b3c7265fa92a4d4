//! Edge shaping: decode a stream's payloads into records of named, typed fields, run the
//! stream's rules on them in order, re-encode what is left (JSON), and say what goes to
//! `_deadletter` and why. Pure: no tokio, no sockets, no clock (times come in as arguments).
//!
//! ```text
//! payload ─decode─▶ [Fields]* ─rule 1─▶ … ─rule n─▶ encode ─▶ records for the batch
//!    │ fails                     │ fails                 
//!    ▼                           ▼                       
//! dead letter (raw payload)   dead letter (the record as JSON so far, e.g. already pseudonymised)
//! ```
//!
//! - [`record`]: the record model and its JSON codec.
//! - [`decode`]: the payload formats.
//! - [`rules`]: the rules (CEL predicates, sample, pseudonymise, mask, remove, enrich,
//!   dedup, downsample) and their counters.
//! - [`config`]: `[streams.NAME.shape]` in the agent's TOML, validated and compiled here.
//! - [`trial`]: `edge-agent rules test`, the rules run on sample messages (stdin to stdout).
//!
//! `raw` streams keep their payloads byte for byte: only rules that do not change fields
//! (drop, keep, sample, dedup, enrich) are allowed on them. Every other format is re-encoded
//! as one JSON object per record.

pub mod cdr;
pub mod config;
pub mod decode;
pub mod fuzzing;
pub mod record;
pub mod rules;
pub mod senml;
pub mod sparkplug;
pub mod trial;

use std::sync::Arc;

use decode::Format;
use record::Fields;
use rules::{Action, Item, Rule, RuleCounters, Step};

/// A record ready for the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct OutRecord {
    /// Event time, ms.
    pub ts_ms: i64,
    /// Topic (its key in the batch).
    pub topic: String,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// Attributes `enrich` added.
    pub attrs: Vec<(String, String)>,
}

/// A payload or record that goes to `_deadletter`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Event time of the message, ms.
    pub ts_ms: i64,
    /// Its topic.
    pub topic: String,
    /// What is kept: the raw payload (decode failure) or the record as JSON (rule failure).
    pub payload: Vec<u8>,
    /// Why.
    pub reason: String,
}

/// What one call made.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shaped {
    /// Records to append.
    pub records: Vec<OutRecord>,
    /// Dead letters.
    pub dead: Vec<DeadLetter>,
    /// Records dropped by rules (or folded into a window).
    pub filtered: u64,
}

/// A stream's compiled shaping.
#[derive(Debug)]
pub struct Shaper {
    format: Format,
    records_max: usize,
    rules: Vec<Rule>,
    /// Sparkplug streams: aliases learnt from birth messages.
    aliases: Option<sparkplug::Aliases>,
}

impl Shaper {
    /// A shaper for `format` with `rules` (compiled by [`config::compile`]).
    pub fn new(format: Format, records_max: usize, rules: Vec<Rule>) -> Shaper {
        Shaper::with_aliases(format, records_max, rules, 0)
    }

    /// As [`Shaper::new`]; a Sparkplug stream remembers at most `aliases_max` metric aliases.
    pub fn with_aliases(format: Format, records_max: usize, rules: Vec<Rule>, aliases_max: usize) -> Shaper {
        let aliases = (format == Format::Sparkplug).then(|| sparkplug::Aliases::new(aliases_max));
        Shaper { format, records_max, rules, aliases }
    }

    /// Decodes `payload`, runs the rules on each record and encodes the survivors.
    pub fn handle(&mut self, ts_ms: i64, topic: &str, payload: &[u8]) -> Shaped {
        let mut out = Shaped::default();
        let records = match decode::decode(&self.format, topic, payload, self.records_max) {
            // A payload that holds no record (an empty CSV or SenML pack, a CDR file of no
            // CDRs) would otherwise vanish uncounted: it is dead-lettered, never silently gone.
            Ok(r) if r.is_empty() => {
                out.dead.push(DeadLetter {
                    ts_ms,
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                    reason: "decode: the payload holds no records".into(),
                });
                return out;
            }
            Ok(mut r) => {
                if let Some(a) = self.aliases.as_mut() {
                    a.apply(&mut r);
                }
                r
            }
            Err(reason) => {
                out.dead.push(DeadLetter {
                    ts_ms,
                    topic: topic.to_owned(),
                    payload: payload.to_vec(),
                    reason: format!("decode: {reason}"),
                });
                return out;
            }
        };
        for fields in records {
            let item = Item { ts_ms, topic: topic.to_owned(), fields, attrs: Vec::new(), matched: Vec::new() };
            self.run(0, item, Some(payload), &mut out);
        }
        out
    }

    /// Windowed output due at `now_ms` (everything still held when `None`: at shutdown).
    pub fn poll(&mut self, now_ms: Option<i64>) -> Shaped {
        let mut out = Shaped::default();
        for i in 0..self.rules.len() {
            let emitted = match &mut self.rules[i].action {
                Action::Downsample(d) => d.poll(now_ms),
                _ => continue,
            };
            for item in emitted {
                self.run(i + 1, item, None, &mut out);
            }
        }
        out
    }

    /// Whether a rule holds records across calls (dedup, downsample).
    pub fn is_windowed(&self) -> bool {
        self.rules.iter().any(Rule::is_windowed)
    }

    /// Whether a rule can hold records back for a later [`Shaper::poll`].
    pub fn holds_records(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.action, Action::Downsample(_)))
    }

    /// Each rule's name and counters.
    pub fn counters(&self) -> Vec<(String, Arc<RuleCounters>)> {
        self.rules.iter().map(|r| (r.name.clone(), r.counters.clone())).collect()
    }

    fn run(&mut self, from: usize, mut item: Item, original: Option<&[u8]>, out: &mut Shaped) {
        for rule in &mut self.rules[from..] {
            match rule.apply(&mut item) {
                Step::Pass => {}
                Step::Gone => {
                    out.filtered += 1;
                    return;
                }
                Step::Fail(why) => {
                    let mut payload = Vec::new();
                    item.fields.encode_json(&mut payload);
                    out.dead.push(DeadLetter {
                        ts_ms: item.ts_ms,
                        topic: item.topic,
                        payload,
                        reason: format!("rule {}: {why}", rule.name),
                    });
                    return;
                }
            }
        }
        let payload = match (&self.format, original) {
            // Raw streams keep the bytes as they came (the rules allowed there change no field).
            (Format::Raw, Some(p)) => p.to_vec(),
            _ => encode(&item.fields),
        };
        out.records.push(OutRecord { ts_ms: item.ts_ms, topic: item.topic, payload, attrs: item.attrs });
    }
}

/// The JSON encoding of a record.
pub fn encode(fields: &Fields) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    fields.encode_json(&mut v);
    v
}
