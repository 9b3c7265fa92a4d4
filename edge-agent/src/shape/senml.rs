//! SenML (RFC 8428), JSON and CBOR: a pack (array) of entries, each resolved against the base
//! fields in effect (bn + n, bt + t, bv + v, bs + s, u or bu) into one record.
//!
//! Record fields: `n` (resolved name), `bn` (base name in effect, if any: the device, for
//! `downsample`), `u`, one of `v` / `vs` / `vb` / `vd`, `s`, `t` (seconds, resolved; values
//! below 2^28 are relative to now, as the RFC says, and kept as given), `ut`. Entries that hold
//! only base fields make no record. Labels ending in `_` (must-understand) are refused.
//!
//! CBOR labels (RFC 8428 §6): bver -1, bn -2, bt -3, bu -4, bv -5, bs -6, n 0, u 1, v 2,
//! vs 3, vb 4, s 5, t 6, ut 7, vd 8.

use super::record::{Fields, Value};

#[derive(Clone, Debug, PartialEq)]
enum Raw {
    Num(f64),
    Text(String),
    Bool(bool),
    Bytes(Vec<u8>),
}

type Entry = Vec<(String, Raw)>;

/// Decodes a SenML JSON pack.
pub fn decode_json(payload: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("SenML JSON: {e}"))?;
    let serde_json::Value::Array(entries) = v else { return Err("SenML JSON: a pack is an array".into()) };
    if entries.len() > records_max {
        return Err(format!("SenML: {} entries, above records_per_payload_max {records_max}", entries.len()));
    }
    let mut pack = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let serde_json::Value::Object(map) = e else { return Err(format!("SenML entry {i}: not an object")) };
        let mut entry = Vec::with_capacity(map.len());
        for (k, v) in map {
            let raw = match v {
                serde_json::Value::Number(n) => {
                    Raw::Num(n.as_f64().ok_or_else(|| format!("SenML entry {i}: {k}: bad number"))?)
                }
                serde_json::Value::String(s) if k == "vd" => {
                    Raw::Bytes(base64url(&s).ok_or_else(|| format!("SenML entry {i}: vd: not base64url"))?)
                }
                serde_json::Value::String(s) => Raw::Text(s),
                serde_json::Value::Bool(b) => Raw::Bool(b),
                _ => return Err(format!("SenML entry {i}: {k}: not a number, string or boolean")),
            };
            entry.push((k, raw));
        }
        pack.push(entry);
    }
    resolve(pack)
}

/// Decodes a SenML CBOR pack.
pub fn decode_cbor(payload: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    let mut rest = payload;
    let v: ciborium::Value = ciborium::de::from_reader(&mut rest).map_err(|e| format!("SenML CBOR: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("SenML CBOR: {} bytes after the pack", rest.len()));
    }
    let ciborium::Value::Array(entries) = v else { return Err("SenML CBOR: a pack is an array".into()) };
    if entries.len() > records_max {
        return Err(format!("SenML: {} entries, above records_per_payload_max {records_max}", entries.len()));
    }
    let mut pack = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let ciborium::Value::Map(map) = e else { return Err(format!("SenML entry {i}: not a map")) };
        let mut entry = Vec::with_capacity(map.len());
        for (k, v) in map {
            let label = match k {
                ciborium::Value::Integer(n) => {
                    let n = i64::try_from(i128::from(n)).unwrap_or(i64::MAX);
                    cbor_label(n).ok_or_else(|| format!("SenML entry {i}: unknown label {n}"))?.to_owned()
                }
                ciborium::Value::Text(t) => t,
                _ => return Err(format!("SenML entry {i}: a label is an integer or text")),
            };
            let raw = match v {
                ciborium::Value::Integer(n) => Raw::Num(i128::from(n) as f64),
                ciborium::Value::Float(f) => Raw::Num(f),
                ciborium::Value::Text(t) => Raw::Text(t),
                ciborium::Value::Bool(b) => Raw::Bool(b),
                ciborium::Value::Bytes(b) => Raw::Bytes(b),
                _ => return Err(format!("SenML entry {i}: {label}: not a number, text, boolean or bytes")),
            };
            entry.push((label, raw));
        }
        pack.push(entry);
    }
    resolve(pack)
}

fn cbor_label(n: i64) -> Option<&'static str> {
    Some(match n {
        -1 => "bver",
        -2 => "bn",
        -3 => "bt",
        -4 => "bu",
        -5 => "bv",
        -6 => "bs",
        0 => "n",
        1 => "u",
        2 => "v",
        3 => "vs",
        4 => "vb",
        5 => "s",
        6 => "t",
        7 => "ut",
        8 => "vd",
        _ => return None,
    })
}

#[derive(Default)]
struct Base {
    bn: String,
    bt: f64,
    bu: Option<String>,
    bv: f64,
    bs: f64,
}

fn resolve(pack: Vec<Entry>) -> Result<Vec<Fields>, String> {
    let mut base = Base::default();
    let mut out = Vec::with_capacity(pack.len());
    for (i, entry) in pack.into_iter().enumerate() {
        let err = |what: &str| format!("SenML entry {i}: {what}");
        let (mut n, mut u, mut t, mut s, mut ut) = (None, None, 0.0, None, None);
        let mut value: Option<(&str, Value)> = None;
        let mut has_base = false;
        for (label, raw) in entry {
            match (label.as_str(), raw) {
                ("bn", Raw::Text(x)) => (base.bn, has_base) = (x, true),
                ("bt", Raw::Num(x)) => (base.bt, has_base) = (x, true),
                ("bu", Raw::Text(x)) => (base.bu, has_base) = (Some(x), true),
                ("bv", Raw::Num(x)) => (base.bv, has_base) = (x, true),
                ("bs", Raw::Num(x)) => (base.bs, has_base) = (x, true),
                ("bver", Raw::Num(x)) => {
                    has_base = true;
                    if !(x.fract() == 0.0 && (1.0..=64.0).contains(&x)) {
                        return Err(err("bver: not a version number"));
                    }
                }
                ("n", Raw::Text(x)) => n = Some(x),
                ("u", Raw::Text(x)) => u = Some(x),
                ("t", Raw::Num(x)) => t = x,
                ("ut", Raw::Num(x)) => ut = Some(x),
                ("s", Raw::Num(x)) => s = Some(x),
                ("v", Raw::Num(x)) => value = Some(("v", Value::Float(x))),
                ("vs", Raw::Text(x)) => value = Some(("vs", Value::Str(x))),
                ("vb", Raw::Bool(x)) => value = Some(("vb", Value::Bool(x))),
                ("vd", Raw::Bytes(x)) => value = Some(("vd", Value::Bytes(x))),
                (l, _) if l.ends_with('_') => {
                    return Err(err(&format!("must-understand label {l:?} is not understood")));
                }
                (
                    l @ ("bn" | "bt" | "bu" | "bv" | "bs" | "n" | "u" | "t" | "ut" | "s" | "v" | "vs" | "vb" | "vd"),
                    _,
                ) => {
                    return Err(err(&format!("{l}: wrong type")));
                }
                _ => {} // unknown labels without '_' may be ignored (RFC 8428 §4.4)
            }
        }
        if n.is_none() && value.is_none() && s.is_none() && has_base {
            continue; // base fields only
        }
        let name = format!("{}{}", base.bn, n.unwrap_or_default());
        if !valid_name(&name) {
            return Err(err(&format!("name {name:?}: 1+ of A-Z a-z 0-9 - : . / _, starting with a letter or digit")));
        }
        if value.is_none() && s.is_none() {
            return Err(err("no value and no sum"));
        }
        let mut f = vec![("n".to_owned(), Value::Str(name))];
        if !base.bn.is_empty() {
            f.push(("bn".into(), Value::Str(base.bn.clone())));
        }
        if let Some(unit) = u.or_else(|| base.bu.clone()) {
            f.push(("u".into(), Value::Str(unit)));
        }
        if let Some((label, v)) = value {
            let v = match v {
                Value::Float(x) => Value::Float(x + base.bv),
                v => v,
            };
            f.push((label.into(), v));
        }
        if let Some(x) = s {
            f.push(("s".into(), Value::Float(x + base.bs)));
        }
        f.push(("t".into(), Value::Float(base.bt + t)));
        if let Some(x) = ut {
            f.push(("ut".into(), Value::Float(x)));
        }
        out.push(Fields(f));
    }
    Ok(out)
}

fn valid_name(n: &str) -> bool {
    n.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-:./_".contains(&b))
}

/// base64url without padding (RFC 8428 §4.3), padding tolerated.
fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_8428_example_resolves_base_fields() {
        // RFC 8428 §5.1.2, multiple data points.
        let pack = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
            {"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3}]"#;
        let r = decode_json(pack, 10).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].get("n"), Some(&Value::Str("urn:dev:ow:10e2073a01080063:voltage".into())));
        assert_eq!(r[0].get("bn"), Some(&Value::Str("urn:dev:ow:10e2073a01080063:".into())));
        assert_eq!(r[1].get("t"), Some(&Value::Float(-5.0)));
        assert_eq!(r[2].get("v"), Some(&Value::Float(1.3)));
    }

    #[test]
    fn bad_packs_name_the_entry() {
        assert!(decode_json(b"{}", 10).unwrap_err().contains("array"));
        assert!(decode_json(br#"[{"n":"a","v":"x"}]"#, 10).unwrap_err().contains("entry 0: v: wrong type"));
        assert!(decode_json(br#"[{"n":"a","v":1},{"n":"b","x_":1,"v":1}]"#, 10).unwrap_err().contains("entry 1"));
        assert!(decode_json(br#"[{"n":" bad","v":1}]"#, 10).unwrap_err().contains("name"));
        assert!(decode_json(br#"[{"n":"a"}]"#, 10).unwrap_err().contains("no value"));
        assert!(decode_cbor(&[0x80, 0x00], 10).unwrap_err().contains("after the pack"));
    }

    #[test]
    fn base64url_vd() {
        let r = decode_json(br#"[{"n":"a","vd":"aGk"}]"#, 10).unwrap();
        assert_eq!(r[0].get("vd"), Some(&Value::Bytes(b"hi".to_vec())));
    }
}
