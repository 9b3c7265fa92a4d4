//! Sparkplug B: protobuf payloads on `spBv1.0/<group>/<message_type>/<edge_node>[/<device>]`
//! topics, one record per metric. The message structs are written by hand with prost's
//! derives from the Eclipse Tahu `sparkplug_b.proto` (tags and types as there; no protoc).
//!
//! Record fields: `group`, `message_type`, `edge_node`, `device` (device messages), `seq`,
//! `name`, `alias`, `timestamp` (the metric's, else the payload's; ms), `datatype` (its
//! Sparkplug name), `value` (typed: signed types are read back from their two's-complement
//! unsigned carriers), `is_historical`, `is_transient`, `is_null`. DataSet, Template and
//! extension values are not decoded: their `value` is null. Metrics sent by alias only get
//! their `name` from [`Aliases`], which remembers each edge node's aliases from its NBIRTH and
//! DBIRTH messages (the shaper keeps one per stream); before a birth is seen, `name` is null.

use std::collections::HashMap;

use prost::Message;

use super::record::{Fields, Value};

/// `Payload` of sparkplug_b.proto (fields 1–5; extensions skipped).
#[derive(Clone, PartialEq, Message)]
pub struct Payload {
    /// ms since the epoch.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// The metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// Sequence number, 0–255.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    /// UUID of the body's format.
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    /// Opaque body.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric` (metadata, properties and the DataSet/Template/extension values are
/// skipped as unknown fields).
#[derive(Clone, PartialEq, Message)]
pub struct Metric {
    /// Name (absent when sent by alias).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Alias given in the birth message.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// ms since the epoch.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// Sparkplug data type.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// Historical data.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// Not to be stored.
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// A null value.
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// The value.
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// `Metric.value` (the scalar members of the oneof).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    /// Int8/16/32, UInt8/16/32.
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    /// Int64, UInt64, DateTime.
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    /// Float.
    #[prost(float, tag = "12")]
    FloatValue(f32),
    /// Double.
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    StringValue(String),
    /// Bytes, File.
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Sparkplug B data type names by number.
pub fn datatype_name(t: u32) -> &'static str {
    const NAMES: [&str; 35] = [
        "Unknown",
        "Int8",
        "Int16",
        "Int32",
        "Int64",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "Float",
        "Double",
        "Boolean",
        "String",
        "DateTime",
        "Text",
        "UUID",
        "DataSet",
        "Bytes",
        "File",
        "Template",
        "PropertySet",
        "PropertySetList",
        "Int8Array",
        "Int16Array",
        "Int32Array",
        "Int64Array",
        "UInt8Array",
        "UInt16Array",
        "UInt32Array",
        "UInt64Array",
        "FloatArray",
        "DoubleArray",
        "BooleanArray",
        "StringArray",
        "DateTimeArray",
    ];
    NAMES.get(t as usize).copied().unwrap_or("Unknown")
}

const MESSAGE_TYPES: [&str; 8] = ["NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD"];

/// Decodes a Sparkplug B payload received on `topic`.
pub fn decode(topic: &str, payload: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let (group, mtype, node, device) = match levels.as_slice() {
        ["spBv1.0", "STATE", ..] => return Err("Sparkplug STATE messages are JSON, not protobuf".into()),
        ["spBv1.0", g, t, n] => (*g, *t, *n, None),
        ["spBv1.0", g, t, n, d] => (*g, *t, *n, Some(*d)),
        _ => return Err(format!("topic {topic:?} is not spBv1.0/<group>/<type>/<edge_node>[/<device>]")),
    };
    if !MESSAGE_TYPES.contains(&mtype) {
        return Err(format!("topic {topic:?}: unknown message type {mtype:?}"));
    }
    if mtype.starts_with('D') != device.is_some() {
        return Err(format!("topic {topic:?}: {mtype} and the device level do not agree"));
    }
    let p = Payload::decode(payload).map_err(|e| format!("Sparkplug protobuf: {e}"))?;
    if p.metrics.len() > records_max {
        return Err(format!("Sparkplug: {} metrics, above records_per_payload_max {records_max}", p.metrics.len()));
    }
    let mut out = Vec::with_capacity(p.metrics.len());
    for (i, m) in p.metrics.into_iter().enumerate() {
        if m.name.is_none() && m.alias.is_none() {
            return Err(format!("Sparkplug metric {i}: neither name nor alias"));
        }
        let dt = m.datatype.unwrap_or(0);
        let mut f = vec![
            ("group".to_owned(), Value::Str(group.into())),
            ("message_type".into(), Value::Str(mtype.into())),
            ("edge_node".into(), Value::Str(node.into())),
        ];
        if let Some(d) = device {
            f.push(("device".into(), Value::Str(d.into())));
        }
        let opt_int =
            |v: Option<u64>| v.map_or(Value::Null, |x| i64::try_from(x).map_or(Value::Float(x as f64), Value::Int));
        f.push(("seq".into(), opt_int(p.seq)));
        f.push(("name".into(), m.name.map_or(Value::Null, Value::Str)));
        f.push(("alias".into(), opt_int(m.alias)));
        f.push(("timestamp".into(), opt_int(m.timestamp.or(p.timestamp))));
        f.push(("datatype".into(), Value::Str(datatype_name(dt).into())));
        let value = if m.is_null == Some(true) { Value::Null } else { value(dt, m.value) };
        f.push(("value".into(), value));
        f.push(("is_historical".into(), Value::Bool(m.is_historical.unwrap_or(false))));
        f.push(("is_transient".into(), Value::Bool(m.is_transient.unwrap_or(false))));
        f.push(("is_null".into(), Value::Bool(m.is_null.unwrap_or(false))));
        out.push(Fields(f));
    }
    Ok(out)
}

/// Each edge node's metric aliases (unique across the node and its devices, Sparkplug B §6.4),
/// learnt from birth messages; an NBIRTH starts the node's table afresh. At most `max` aliases
/// are held over all nodes; past that, new ones are not learnt (their metrics keep a null name).
#[derive(Debug)]
pub struct Aliases {
    nodes: HashMap<(String, String), HashMap<u64, String>>,
    held: usize,
    max: usize,
}

impl Aliases {
    /// An empty table holding at most `max` aliases.
    pub fn new(max: usize) -> Aliases {
        Aliases { nodes: HashMap::new(), held: 0, max }
    }

    /// Learns the aliases of a birth message's records, or names the alias-only metrics of any
    /// other message (records as [`decode`] made them, one message's worth).
    pub fn apply(&mut self, records: &mut [Fields]) {
        let text = |f: &Fields, k: &str| match f.get(k) {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let Some(first) = records.first() else { return };
        let (Some(group), Some(node), Some(mtype)) =
            (text(first, "group"), text(first, "edge_node"), text(first, "message_type"))
        else {
            return;
        };
        let key = (group, node);
        if mtype == "NBIRTH"
            && let Some(old) = self.nodes.remove(&key)
        {
            self.held -= old.len();
        }
        let birth = mtype.ends_with("BIRTH");
        for r in records.iter_mut() {
            let alias = match r.get("alias") {
                Some(Value::Int(a)) => *a as u64,
                _ => continue,
            };
            match (birth, r.get("name")) {
                (true, Some(Value::Str(name))) => {
                    let table = self.nodes.entry(key.clone()).or_default();
                    if (table.contains_key(&alias) || self.held < self.max)
                        && table.insert(alias, name.clone()).is_none()
                    {
                        self.held += 1;
                    }
                }
                (false, Some(Value::Null)) => {
                    if let Some(name) = self.nodes.get(&key).and_then(|t| t.get(&alias)) {
                        r.set("name", Value::Str(name.clone()));
                    }
                }
                _ => {}
            }
        }
    }
}

fn value(datatype: u32, v: Option<MetricValue>) -> Value {
    match (datatype, v) {
        (_, None) => Value::Null,
        (1, Some(MetricValue::IntValue(x))) => Value::Int(i64::from(x as u8 as i8)),
        (2, Some(MetricValue::IntValue(x))) => Value::Int(i64::from(x as u16 as i16)),
        (3, Some(MetricValue::IntValue(x))) => Value::Int(i64::from(x as i32)),
        (4, Some(MetricValue::LongValue(x))) => Value::Int(x as i64),
        (_, Some(MetricValue::IntValue(x))) => Value::Int(i64::from(x)),
        (_, Some(MetricValue::LongValue(x))) => i64::try_from(x).map_or(Value::Float(x as f64), Value::Int),
        (_, Some(MetricValue::FloatValue(x))) => Value::Float(f64::from(x)),
        (_, Some(MetricValue::DoubleValue(x))) => Value::Float(x),
        (_, Some(MetricValue::BooleanValue(x))) => Value::Bool(x),
        (_, Some(MetricValue::StringValue(x))) => Value::Str(x),
        (_, Some(MetricValue::BytesValue(x))) => Value::Bytes(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_prost_and_signed_carriers() {
        let p = Payload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(3),
            metrics: vec![
                Metric {
                    name: Some("temp".into()),
                    datatype: Some(10),
                    value: Some(MetricValue::DoubleValue(21.5)),
                    ..Default::default()
                },
                Metric {
                    alias: Some(7),
                    datatype: Some(1),
                    value: Some(MetricValue::IntValue(0xff)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = decode("spBv1.0/plant/DDATA/gw1/pump7", &p.encode_to_vec(), 10).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].get("value"), Some(&Value::Float(21.5)));
        assert_eq!(r[0].get("device"), Some(&Value::Str("pump7".into())));
        assert_eq!(r[1].get("value"), Some(&Value::Int(-1)), "Int8 0xff is -1");
        assert_eq!(r[1].get("name"), Some(&Value::Null));
        assert_eq!(r[1].get("timestamp"), Some(&Value::Int(1_700_000_000_000)));
    }

    #[test]
    fn aliases_learnt_from_births_name_later_metrics() {
        let birth = Payload {
            metrics: vec![Metric {
                name: Some("Temp".into()),
                alias: Some(3),
                datatype: Some(10),
                ..Default::default()
            }],
            ..Default::default()
        };
        let data = Payload {
            metrics: vec![Metric {
                alias: Some(3),
                datatype: Some(10),
                value: Some(MetricValue::DoubleValue(1.5)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut a = Aliases::new(10);
        let mut before = decode("spBv1.0/g/NDATA/n1", &data.encode_to_vec(), 10).unwrap();
        a.apply(&mut before);
        assert_eq!(before[0].get("name"), Some(&Value::Null), "no birth seen yet");
        let mut b = decode("spBv1.0/g/NBIRTH/n1", &birth.encode_to_vec(), 10).unwrap();
        a.apply(&mut b);
        let mut d = decode("spBv1.0/g/DDATA/n1/dev", &data.encode_to_vec(), 10).unwrap();
        a.apply(&mut d);
        assert_eq!(d[0].get("name"), Some(&Value::Str("Temp".into())));
        let mut other = decode("spBv1.0/g/NDATA/n2", &data.encode_to_vec(), 10).unwrap();
        a.apply(&mut other);
        assert_eq!(other[0].get("name"), Some(&Value::Null), "aliases are per edge node");
        let mut full = Aliases::new(0);
        full.apply(&mut decode("spBv1.0/g/NBIRTH/n1", &birth.encode_to_vec(), 10).unwrap());
        assert_eq!(full.held, 0, "the bound holds");
    }

    #[test]
    fn topics_and_bytes_are_checked() {
        assert!(decode("spBv1.0/STATE/h", b"{}", 10).unwrap_err().contains("STATE"));
        assert!(decode("sensors/x", b"", 10).unwrap_err().contains("not spBv1.0"));
        assert!(decode("spBv1.0/g/NDATA/n/d", b"", 10).unwrap_err().contains("do not agree"));
        assert!(decode("spBv1.0/g/NDATA/n", &[0x12, 0x05, 0x01], 10).unwrap_err().contains("protobuf"));
    }
}
