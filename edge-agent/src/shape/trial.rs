//! `edge-agent rules test`: runs a stream's decoding and rules on sample messages and prints
//! what would be appended, so an operator can try a rule before deploying it. Nothing is
//! written anywhere; the shaper is the one the agent would build from the same config.
//!
//! Input (`--input`): `lines` (each line one payload; default), `whole` (all of stdin one
//! payload: CDR files, CBOR, protobuf), or `ndjson` (the lines `log dump` prints: `topic`,
//! `ts`, `payload` or `payload_b64`), so a raw stream's log can be replayed through new rules.
//! Output: one NDJSON line per record as `log dump` prints it, `stream` naming the stream or
//! `_deadletter` (with `deadletter.reason`); a summary on `err`. Windows still open at the end
//! are flushed, as at shutdown.

use std::io::{BufRead, Read, Write};

use base64::Engine;
use bytes::Bytes;
use shared::batch::{Attr, Record};
use shared::ids::Seq;
use shared::ndjson::{parse_time_ms, record_line};

use super::Shaped;
use crate::config::{Config, DEADLETTER_STREAM};
use crate::writer::{ATTR_REASON, ATTR_STREAM};

/// How stdin is cut into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputMode {
    /// Each line is one payload.
    Lines,
    /// All of the input is one payload.
    Whole,
    /// Each line is a `log dump` record: `topic`, `ts`, `payload` or `payload_b64`.
    Ndjson,
}

/// Largest input taken with `--input whole`, bytes (a CDR file is a few MB at most).
pub const WHOLE_INPUT_BYTES_MAX: u64 = 64 << 20;

/// What the trial saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages read.
    pub messages: u64,
    /// Records that would be appended to the stream.
    pub forwarded: u64,
    /// Records dropped by rules (or folded into windows).
    pub filtered: u64,
    /// Dead letters.
    pub dead: u64,
}

/// Runs stream `stream`'s shaping from `config` on `input`; messages without their own topic
/// and time get `topic` and `now_ms`.
pub fn run(
    config: &Config,
    stream: &str,
    mode: InputMode,
    topic: &str,
    now_ms: i64,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Tally, String> {
    let s = config.streams.get(stream).ok_or_else(|| format!("no [streams.{stream}] in the config"))?;
    let mut shaper = super::config::compile(stream, s.format, &s.shape)
        .map_err(|p| p.iter().map(|(k, why)| format!("{k}: {why}")).collect::<Vec<_>>().join("; "))?
        .ok_or_else(|| format!("stream {stream} is not shaped (format {:?}, no rules)", s.format))?;
    let mut t = Tally::default();
    let emit = |shaped: Shaped, t: &mut Tally, out: &mut dyn Write| -> Result<(), String> {
        t.filtered += shaped.filtered;
        for r in shaped.records {
            let attrs = r.attrs.into_iter().map(|(key, value)| Attr { key, value }).collect();
            let rec = Record { ts_ms: r.ts_ms, topic: r.topic, payload: Bytes::from(r.payload), attrs };
            writeln!(out, "{}", record_line(None, stream, Seq(t.forwarded), &rec)).map_err(|e| e.to_string())?;
            t.forwarded += 1;
        }
        for d in shaped.dead {
            let attrs = vec![
                Attr { key: ATTR_REASON.into(), value: d.reason },
                Attr { key: ATTR_STREAM.into(), value: stream.into() },
            ];
            let rec = Record { ts_ms: d.ts_ms, topic: d.topic, payload: Bytes::from(d.payload), attrs };
            writeln!(out, "{}", record_line(None, DEADLETTER_STREAM, Seq(t.dead), &rec)).map_err(|e| e.to_string())?;
            t.dead += 1;
        }
        Ok(())
    };
    match mode {
        InputMode::Whole => {
            let mut buf = Vec::new();
            input.take(WHOLE_INPUT_BYTES_MAX + 1).read_to_end(&mut buf).map_err(|e| format!("stdin: {e}"))?;
            if buf.len() as u64 > WHOLE_INPUT_BYTES_MAX {
                return Err(format!("stdin: more than {WHOLE_INPUT_BYTES_MAX} bytes"));
            }
            t.messages += 1;
            emit(shaper.handle(now_ms, topic, &buf), &mut t, out)?;
        }
        InputMode::Lines | InputMode::Ndjson => {
            for (n, line) in input.lines().enumerate() {
                let line = line.map_err(|e| format!("stdin line {}: {e}", n + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let (ts, tp, payload) = if mode == InputMode::Ndjson {
                    dump_line(&line).map_err(|e| format!("stdin line {}: {e}", n + 1))?
                } else {
                    (now_ms, topic.to_owned(), line.into_bytes())
                };
                t.messages += 1;
                emit(shaper.handle(ts, &tp, &payload), &mut t, out)?;
            }
        }
    }
    emit(shaper.poll(None), &mut t, out)?;
    out.flush().map_err(|e| e.to_string())?;
    Ok(t)
}

/// (ts, topic, payload) of a `log dump` line.
fn dump_line(line: &str) -> Result<(i64, String, Vec<u8>), String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let topic = v["topic"].as_str().ok_or("no \"topic\" string")?.to_owned();
    let ts = match &v["ts"] {
        serde_json::Value::String(s) => parse_time_ms(s).ok_or_else(|| format!("\"ts\": {s:?} is not a time"))?,
        serde_json::Value::Number(n) => n.as_i64().ok_or("\"ts\": not an integer of ms")?,
        _ => return Err("no \"ts\"".into()),
    };
    let payload = match (&v["payload"], &v["payload_b64"]) {
        (serde_json::Value::String(p), _) => p.clone().into_bytes(),
        (_, serde_json::Value::String(b)) => {
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("\"payload_b64\": {e}"))?
        }
        _ => return Err("neither \"payload\" nor \"payload_b64\"".into()),
    };
    Ok((ts, topic, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r##"
edge_id = "e"
data_dir = "/tmp/x"
[[broker]]
name = "main"
url = "mqtt://127.0.0.1:1883"
subscriptions = ["#"]
[streams.cdr]
format = "csv"
[streams.cdr.shape]
csv_columns = ["kind", "imsi", "duration_s"]
csv_types = { duration_s = "int" }
[[streams.cdr.shape.rules]]
kind = "drop"
when = "record.duration_s < 1"
[[streams.cdr.shape.rules]]
kind = "mask"
fields = ["imsi"]
keep_last = 2
"##;

    #[test]
    fn prints_what_would_be_forwarded_and_dead_lettered() {
        let config = Config::parse(CONFIG, std::path::Path::new("t.toml")).unwrap();
        let input = "voice,001010123456789,12\nvoice,001010123456780,0\nvoice,1\n";
        let mut out = Vec::new();
        let t = run(&config, "cdr", InputMode::Lines, "cdr/x", 0, &mut input.as_bytes(), &mut out).unwrap();
        assert_eq!(t, Tally { messages: 3, forwarded: 1, filtered: 1, dead: 1 });
        let lines: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["stream"], "cdr");
        let payload: serde_json::Value = serde_json::from_str(lines[0]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["imsi"], "*************89");
        assert_eq!(lines[1]["stream"], DEADLETTER_STREAM);
        assert!(lines[1]["attrs"][ATTR_REASON].as_str().unwrap().contains("2 values"));
    }

    #[test]
    fn replays_log_dump_lines() {
        let config = Config::parse(CONFIG, std::path::Path::new("t.toml")).unwrap();
        let input =
            r#"{"stream":"raw","seq":0,"ts":"2026-11-22T17:35:18.123Z","topic":"cdr/a","payload":"d,1,5","attrs":{}}"#;
        let mut out = Vec::new();
        let t = run(&config, "cdr", InputMode::Ndjson, "-", 0, &mut input.as_bytes(), &mut out).unwrap();
        assert_eq!(t.forwarded, 1);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((line["topic"].as_str(), line["ts"].as_str()), (Some("cdr/a"), Some("2026-11-22T17:35:18.123Z")));
        let bad = run(&config, "cdr", InputMode::Ndjson, "-", 0, &mut "{\"ts\":1}".as_bytes(), &mut Vec::new());
        assert!(bad.unwrap_err().contains("stdin line 1: no \"topic\""));
        let none = run(&config, "nope", InputMode::Lines, "-", 0, &mut "".as_bytes(), &mut Vec::new());
        assert!(none.unwrap_err().contains("no [streams.nope]"));
    }
}
