//! The NDJSON view of records that `log dump` and the read API print, one object per line:
//! `stream`, `seq`, `ts` (RFC 3339, UTC, ms), `topic`, `payload` (UTF-8 text) or
//! `payload_b64`, `attrs` (object), and `edge` where the reader adds it.

use base64::Engine;
use serde_json::{Map, Value};

use crate::batch::Record;
use crate::ids::Seq;

/// One record as a JSON object (without the trailing newline).
pub fn record_line(edge: Option<&str>, stream: &str, seq: Seq, record: &Record) -> String {
    let mut obj = Map::new();
    if let Some(edge) = edge {
        obj.insert("edge".into(), Value::from(edge));
    }
    obj.insert("stream".into(), Value::from(stream));
    obj.insert("seq".into(), Value::from(seq.0));
    obj.insert("ts".into(), Value::from(rfc3339_ms(record.ts_ms)));
    obj.insert("topic".into(), Value::from(record.topic.as_str()));
    match std::str::from_utf8(&record.payload) {
        Ok(text) => obj.insert("payload".into(), Value::from(text)),
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&record.payload);
            obj.insert("payload_b64".into(), Value::from(b64))
        }
    };
    let attrs: Map<String, Value> =
        record.attrs.iter().map(|a| (a.key.clone(), Value::from(a.value.as_str()))).collect();
    obj.insert("attrs".into(), Value::Object(attrs));
    Value::Object(obj).to_string()
}

/// `ms` since the Unix epoch as RFC 3339 in UTC with milliseconds, e.g.
/// `2026-11-22T17:35:18.123Z`. Covers years 0000..=9999; outside that it clamps.
pub fn rfc3339_ms(ms: i64) -> String {
    const MIN: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(MIN, MAX);
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Parses what [`rfc3339_ms`] prints, and any RFC 3339 time with an offset (`Z`, `+hh:mm`),
/// fractional seconds optional; also a plain integer of ms since the epoch.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i.min(start + 3))?;
        if digits.is_empty() {
            return None;
        }
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && matches!(&tz[..1], "+" | "-") && &tz[3..4] == ":" => {
            let sign = if &tz[..1] == "-" { -1 } else { 1 };
            sign * (tz[1..3].parse::<i64>().ok()? * 60 + tz[4..6].parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + h * 3600 + mi * 60 + se - offset_min * 60) * 1000) + frac_ms)
}

// Howard Hinnant's civil-calendar algorithms.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Attr;
    use bytes::Bytes;
    use proptest::prelude::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_369_718_123), "2026-11-22T17:48:38.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_offsets_and_fractions() {
        assert_eq!(parse_time_ms("2026-11-22T17:48:38.123Z"), Some(1_795_369_718_123));
        assert_eq!(parse_time_ms("2026-11-22T18:48:38.1+01:00"), Some(1_795_369_718_100));
        assert_eq!(parse_time_ms("1795369718123"), Some(1_795_369_718_123));
        assert_eq!(parse_time_ms("2026-13-22T17:48:38Z"), None);
        assert_eq!(parse_time_ms("yesterday"), None);
    }

    #[test]
    fn record_line_has_the_documented_fields() {
        let r = Record {
            ts_ms: 0,
            topic: "cdr/x".into(),
            payload: Bytes::from_static(b"{\"a\":1}"),
            attrs: vec![Attr { key: "site".into(), value: "lyon-3".into() }],
        };
        let v: Value = serde_json::from_str(&record_line(None, "cdr", Seq(4), &r)).unwrap();
        assert_eq!(v["stream"], "cdr");
        assert_eq!(v["seq"], 4);
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["payload"], "{\"a\":1}");
        assert_eq!(v["attrs"]["site"], "lyon-3");
        let bin = Record { payload: Bytes::from_static(&[0xff, 0]), ..r };
        let v: Value = serde_json::from_str(&record_line(Some("e1"), "cdr", Seq(4), &bin)).unwrap();
        assert_eq!(v["payload_b64"], "/wA=");
        assert_eq!(v["edge"], "e1");
        assert!(v.get("payload").is_none());
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(ms in -62_167_219_200_000i64..253_402_300_799_999) {
            prop_assert_eq!(parse_time_ms(&rfc3339_ms(ms)), Some(ms));
        }
    }
}
