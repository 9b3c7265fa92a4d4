//! Decoders: a payload in a stream's format into records of [`Fields`]. Pure; every error
//! names what was wrong (line, column, offset, field).
//!
//! One payload may hold several records (CSV lines, a SenML pack, a Sparkplug payload's
//! metrics, a CDR file); at most `records_max` are taken, more is an error.

use super::record::{Fields, Value};

/// A payload format the shaper decodes.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// Any bytes: one record whose field `payload` is the text (or bytes, if not UTF-8).
    Raw,
    /// One JSON object per payload.
    Json,
    /// CSV lines, one record each, columns named by config.
    Csv(CsvFormat),
    /// SenML (RFC 8428) JSON: one record per pack entry, base values resolved.
    SenmlJson,
    /// SenML (RFC 8428) CBOR.
    SenmlCbor,
    /// Sparkplug B protobuf: one record per metric.
    Sparkplug,
    /// A 3GPP CDR file (TS 32.297 framing, TS 32.298 BER records): one record per CDR.
    CdrBer,
}

/// How CSV lines become fields.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvFormat {
    /// Column names, in order; a line must have exactly this many values.
    pub columns: Vec<String>,
    /// Type of each column, by index.
    pub types: Vec<ColumnType>,
    /// Field separator.
    pub delimiter: u8,
    /// Whether the first line of each payload is a header to skip.
    pub header: bool,
}

/// A CSV column's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// Text as it is (the default: IMSIs and MSISDNs keep their leading zeros).
    String,
    /// A signed integer; empty is null.
    Int,
    /// A float; empty is null.
    Float,
    /// `true`/`false` (or `1`/`0`); empty is null.
    Bool,
}

/// Decodes `payload` of `format` (`topic` is what it came on) into at most `records_max` records.
pub fn decode(format: &Format, topic: &str, payload: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    let records = match format {
        Format::Raw => Ok(vec![decode_raw(payload)]),
        Format::Json => Fields::decode_json(payload).map(|f| vec![f]),
        Format::Csv(c) => decode_csv(c, payload, records_max),
        Format::SenmlJson => super::senml::decode_json(payload, records_max),
        Format::SenmlCbor => super::senml::decode_cbor(payload, records_max),
        Format::Sparkplug => super::sparkplug::decode(topic, payload, records_max),
        Format::CdrBer => super::cdr::decode_file(payload, records_max),
    }?;
    if records.len() > records_max {
        return Err(format!("{} records in one payload, above records_per_payload_max {records_max}", records.len()));
    }
    Ok(records)
}

/// A raw payload as one record.
pub fn decode_raw(payload: &[u8]) -> Fields {
    let v = match std::str::from_utf8(payload) {
        Ok(s) => Value::Str(s.to_owned()),
        Err(_) => Value::Bytes(payload.to_vec()),
    };
    Fields(vec![("payload".into(), v)])
}

fn decode_csv(c: &CsvFormat, payload: &[u8], records_max: usize) -> Result<Vec<Fields>, String> {
    let mut reader =
        csv::ReaderBuilder::new().has_headers(c.header).delimiter(c.delimiter).flexible(true).from_reader(payload);
    let mut out = Vec::new();
    let mut row = csv::ByteRecord::new();
    loop {
        let more = reader.read_byte_record(&mut row).map_err(|e| format!("CSV: {e}"))?;
        if !more {
            break;
        }
        let line = row.position().map_or(0, csv::Position::line);
        if row.len() == 1 && row[0].is_empty() {
            continue; // a blank line
        }
        if row.len() != c.columns.len() {
            return Err(format!("CSV line {line}: {} values, expected {} columns", row.len(), c.columns.len()));
        }
        if out.len() == records_max {
            return Err(format!("CSV: more than records_per_payload_max {records_max} lines"));
        }
        let mut fields = Vec::with_capacity(c.columns.len());
        for (i, raw) in row.iter().enumerate() {
            let text =
                std::str::from_utf8(raw).map_err(|_| format!("CSV line {line} column {}: not UTF-8", c.columns[i]))?;
            let v = typed(text, c.types[i])
                .ok_or_else(|| format!("CSV line {line} column {}: {text:?} is not {:?}", c.columns[i], c.types[i]))?;
            fields.push((c.columns[i].clone(), v));
        }
        out.push(Fields(fields));
    }
    Ok(out)
}

fn typed(text: &str, t: ColumnType) -> Option<Value> {
    let trimmed = text.trim();
    if t != ColumnType::String && trimmed.is_empty() {
        return Some(Value::Null);
    }
    match t {
        ColumnType::String => Some(Value::Str(text.to_owned())),
        ColumnType::Int => trimmed.parse().ok().map(Value::Int),
        ColumnType::Float => trimmed.parse::<f64>().ok().filter(|f| f.is_finite()).map(Value::Float),
        ColumnType::Bool => match trimmed {
            "true" | "1" => Some(Value::Bool(true)),
            "false" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv_format() -> Format {
        Format::Csv(CsvFormat {
            columns: vec!["record_type".into(), "imsi".into(), "duration_s".into()],
            types: vec![ColumnType::String, ColumnType::String, ColumnType::Int],
            delimiter: b',',
            header: false,
        })
    }

    #[test]
    fn csv_lines_become_typed_records() {
        let recs = decode(&csv_format(), "t", b"voice,001010000000001,12\n\ndata,001010000000002,\n", 10).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].get("imsi"), Some(&Value::Str("001010000000001".into())));
        assert_eq!(recs[0].get("duration_s"), Some(&Value::Int(12)));
        assert_eq!(recs[1].get("duration_s"), Some(&Value::Null));
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let e = decode(&csv_format(), "t", b"voice,1,12\nvoice,2,x\n", 10).unwrap_err();
        assert!(e.contains("line 2 column duration_s"), "{e}");
        let e = decode(&csv_format(), "t", b"voice,1\n", 10).unwrap_err();
        assert!(e.contains("2 values, expected 3"), "{e}");
        let e = decode(&csv_format(), "t", b"a,1,1\na,1,1\na,1,1\n", 2).unwrap_err();
        assert!(e.contains("records_per_payload_max"), "{e}");
    }

    #[test]
    fn raw_keeps_text_or_bytes() {
        assert_eq!(decode_raw(b"hi").get("payload"), Some(&Value::Str("hi".into())));
        assert_eq!(decode_raw(&[0xff]).get("payload"), Some(&Value::Bytes(vec![0xff])));
    }
}
