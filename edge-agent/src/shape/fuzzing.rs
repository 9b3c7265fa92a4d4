//! Bodies of the shaping fuzz targets in `fuzz/` (`shape_*`). CI runs them through proptest
//! (`tests/shape_formats.rs`); `cargo fuzz` runs them coverage-guided. Each asserts the
//! decoder's contract on any input: no panic, at most `RECORDS_MAX` records, and every record
//! it accepts re-encodes to one valid JSON object.

use super::decode::{ColumnType, CsvFormat, Format, decode};

/// Records per payload the targets allow (small, so the bound is reached).
pub const RECORDS_MAX: usize = 64;

/// JSON objects.
pub fn json(data: &[u8]) {
    check(&Format::Json, "t", data);
}

/// CSV lines of three typed columns.
pub fn csv(data: &[u8]) {
    let f = Format::Csv(CsvFormat {
        columns: vec!["a".into(), "b".into(), "c".into()],
        types: vec![ColumnType::String, ColumnType::Int, ColumnType::Float],
        delimiter: b',',
        header: false,
    });
    check(&f, "t", data);
}

/// SenML JSON packs.
pub fn senml_json(data: &[u8]) {
    check(&Format::SenmlJson, "t", data);
}

/// SenML CBOR packs.
pub fn senml_cbor(data: &[u8]) {
    check(&Format::SenmlCbor, "t", data);
}

/// Sparkplug B payloads; the first byte picks a node or a device topic.
pub fn sparkplug(data: &[u8]) {
    let (topic, rest) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("spBv1.0/g/NDATA/n", rest),
        Some((_, rest)) => ("spBv1.0/g/DDATA/n/d", rest),
        None => ("spBv1.0/g/NDATA/n", data),
    };
    check(&Format::Sparkplug, topic, rest);
}

/// 3GPP CDR files. The input is also tried behind a valid file header (lengths made right),
/// so the fuzzer reaches the CDR framing and the BER records instead of stopping at the header.
pub fn cdr_ber(data: &[u8]) {
    check(&Format::CdrBer, "cdr", data);
    let mut file = vec![0u8; 50];
    file.extend_from_slice(data);
    let len = file.len() as u32;
    file[..4].copy_from_slice(&len.to_be_bytes());
    file[4..8].copy_from_slice(&50u32.to_be_bytes());
    file[18..22].copy_from_slice(&u32::MAX.to_be_bytes()); // count unknown
    check(&Format::CdrBer, "cdr", &file);
}

fn check(format: &Format, topic: &str, data: &[u8]) {
    if let Ok(records) = decode(format, topic, data, RECORDS_MAX) {
        assert!(records.len() <= RECORDS_MAX, "{} records above the bound", records.len());
        for r in records {
            let bytes = super::encode(&r);
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("a decoded record re-encodes as JSON");
            assert!(v.is_object());
        }
    }
}
