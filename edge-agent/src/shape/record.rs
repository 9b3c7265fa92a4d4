//! The addressable record the rules work on: ordered, named, typed fields.
//!
//! Decoders build it ([`super::decode`]); the rules read and change it; [`Fields::encode_json`]
//! re-encodes it as one JSON object, field order kept. Bytes encode as lowercase hex strings
//! (JSON has no bytes type).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// A field's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// JSON null, an absent optional.
    Null,
    /// Boolean.
    Bool(bool),
    /// Signed integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// UTF-8 text.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A list.
    List(Vec<Value>),
    /// A nested object, field order kept.
    Map(Vec<(String, Value)>),
}

impl Value {
    /// The value as text for hashing, masking and keys: strings as they are, numbers in
    /// decimal, bytes in hex, anything else as its JSON.
    pub fn to_text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => "null".into(),
            Value::Bytes(b) => hex(b),
            v => serde_json::to_string(v).unwrap_or_default(),
        }
    }

    /// The value as a float, for aggregates.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }
}

/// A record's fields in order. Names are unique; lookups are linear (records have tens of
/// fields, and a scan of a small vector beats hashing).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields(pub Vec<(String, Value)>);

impl Fields {
    /// The value of field `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The value of field `name`, to change.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.0.iter_mut().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Sets field `name`, in place if present, else at the end.
    pub fn set(&mut self, name: &str, value: Value) {
        match self.get_mut(name) {
            Some(v) => *v = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    /// Removes field `name`; whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(k, _)| k != name);
        self.0.len() != before
    }

    /// Appends the record as one JSON object.
    pub fn encode_json(&self, out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail, and every value serializes (floats that are not
        // finite become null, as serde_json does).
        serde_json::to_writer(out, self).expect("a record always serializes to JSON");
    }

    /// Decodes one JSON object.
    pub fn decode_json(bytes: &[u8]) -> Result<Fields, String> {
        serde_json::from_slice::<Fields>(bytes).map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(_) => s.serialize_unit(),
            Value::Str(t) => s.serialize_str(t),
            Value::Bytes(b) => s.serialize_str(&hex(b)),
            Value::List(l) => {
                let mut seq = s.serialize_seq(Some(l.len()))?;
                for v in l {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Map(m) => serialize_map(m, s),
        }
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_map(&self.0, s)
    }
}

fn serialize_map<S: Serializer>(m: &[(String, Value)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// Depth of nesting a decoded value may have; serde_json stops at 128 on its own, this keeps
/// the conversion to CEL values shallow too.
const NESTING_MAX: usize = 32;

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut l = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            l.push(v);
        }
        Ok(Value::List(l))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            m.push((k, v));
        }
        Ok(Value::Map(m))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
        match Value::deserialize(d)? {
            Value::Map(mut m) => {
                if m.iter().any(|(_, v)| depth(v) >= NESTING_MAX) {
                    return Err(de::Error::custom(format!("nested deeper than {NESTING_MAX} levels")));
                }
                // A repeated name keeps its last value, as most JSON readers do. Records have
                // tens of fields: a pairwise scan costs less than hashing every name.
                let dup = if m.len() <= 32 {
                    (1..m.len()).any(|i| m[..i].iter().any(|(k, _)| *k == m[i].0))
                } else {
                    let mut seen = std::collections::HashSet::with_capacity(m.len());
                    !m.iter().all(|(k, _)| seen.insert(k.as_str()))
                };
                if dup {
                    let mut out: Vec<(String, Value)> = Vec::with_capacity(m.len());
                    for (k, v) in m.drain(..) {
                        match out.iter_mut().find(|(o, _)| *o == k) {
                            Some(slot) => slot.1 = v,
                            None => out.push((k, v)),
                        }
                    }
                    m = out;
                }
                Ok(Fields(m))
            }
            _ => Err(de::Error::custom("expected a JSON object")),
        }
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::List(l) => 1 + l.iter().map(depth).max().unwrap_or(0),
        Value::Map(m) => 1 + m.iter().map(|(_, v)| depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_order_and_types() {
        let text = br#"{"imsi":"001010123456789","duration_s":12,"rate":0.5,"ok":true,"n":null,"tags":["a",1],"loc":{"cell":"c1"}}"#;
        let f = Fields::decode_json(text).unwrap();
        assert_eq!(f.get("duration_s"), Some(&Value::Int(12)));
        assert_eq!(f.get("imsi"), Some(&Value::Str("001010123456789".into())));
        let mut out = Vec::new();
        f.encode_json(&mut out);
        assert_eq!(out, text.to_vec());
    }

    #[test]
    fn decode_errors_say_what_is_wrong() {
        assert!(Fields::decode_json(b"[1,2]").unwrap_err().contains("expected a JSON object"));
        assert!(Fields::decode_json(b"{\"a\":").unwrap_err().starts_with("invalid JSON"));
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        assert!(Fields::decode_json(deep.as_bytes()).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn repeated_names_keep_the_last_value() {
        let f = Fields::decode_json(br#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(f.0, vec![("a".into(), Value::Int(3)), ("b".into(), Value::Int(2))]);
    }
}
