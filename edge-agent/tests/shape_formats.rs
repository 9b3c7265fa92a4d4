//! Every payload format against fixtures made by independent encoders
//! (`tests/fixtures/shape/make_fixtures.py`: pyasn1, Python protobuf, cbor2), and every
//! decoder against arbitrary bytes: an error into `_deadletter`, never a panic.

use std::path::Path;

use edge_agent::config::PayloadFormatConfig;
use edge_agent::shape::config::{ShapeConfig, compile};
use edge_agent::shape::decode::{Format, decode};
use edge_agent::shape::record::{Fields, Value};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shape").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn s(v: &str) -> Value {
    Value::Str(v.into())
}

fn get<'a>(f: &'a Fields, k: &str) -> &'a Value {
    f.get(k).unwrap_or_else(|| panic!("no field {k} in {f:?}"))
}

#[test]
fn cdr_voice_file_from_pyasn1() {
    let r = decode(&Format::CdrBer, "cdr/file", &fixture("cdr_voice.ber"), 100).unwrap();
    assert_eq!(r.len(), 2);
    let a = &r[0];
    assert_eq!(get(a, "record_type"), &s("moCall"));
    assert_eq!(get(a, "record_type_id"), &Value::Int(1));
    assert_eq!(get(a, "imsi"), &s("001010123456789"));
    assert_eq!(get(a, "msisdn"), &s("447700900123"));
    assert_eq!(get(a, "imei"), &s("3569380356438091"));
    assert_eq!(get(a, "called_number"), &s("447700900999"));
    assert_eq!(get(a, "start_time"), &s("2024-03-15T12:30:05+01:00"), "answer time wins over seizure");
    assert_eq!(get(a, "duration_s"), &Value::Int(95));
    assert_eq!(get(a, "cause_for_closing"), &Value::Int(0));
    assert_eq!(get(a, "cell"), &s("1234-5678"));
    assert_eq!(get(a, "charging_id"), &s("01020304"));
    assert_eq!(get(&r[1], "imsi"), &s("001010987654321"));
    assert_eq!(get(&r[1], "duration_s"), &Value::Int(0));
    assert_eq!(get(&r[1], "cause_for_closing"), &Value::Int(3));
}

#[test]
fn cdr_pgw_file_from_pyasn1() {
    let r = decode(&Format::CdrBer, "cdr/file", &fixture("cdr_pgw.ber"), 100).unwrap();
    assert_eq!(r.len(), 1);
    let p = &r[0];
    assert_eq!(get(p, "record_type"), &s("pgw"));
    assert_eq!(get(p, "record_type_id"), &Value::Int(85));
    assert_eq!(get(p, "imsi"), &s("001010555555555"));
    assert_eq!(get(p, "msisdn"), &s("447700900777"));
    assert_eq!(get(p, "charging_id"), &Value::Int(3_000_000_001));
    assert_eq!(get(p, "apn"), &s("internet"));
    assert_eq!(get(p, "start_time"), &s("2024-03-15T12:00:00+00:00"));
    assert_eq!(get(p, "duration_s"), &Value::Int(3600));
    assert_eq!(get(p, "cause_for_closing"), &Value::Int(16));
    assert_eq!(get(p, "cell"), &s("1234567"), "the ECGI's cell id");
    assert_eq!(get(p, "uplink_bytes"), &Value::Int(1200));
    assert_eq!(get(p, "downlink_bytes"), &Value::Int(5300));
}

#[test]
fn cdr_smf_chf_record_from_pyasn1() {
    let r = decode(&Format::CdrBer, "cdr/file", &fixture("cdr_smf.ber"), 100).unwrap();
    assert_eq!(r.len(), 1);
    let p = &r[0];
    assert_eq!(get(p, "record_type"), &s("smf"));
    assert_eq!(get(p, "record_type_id"), &Value::Int(200));
    assert_eq!(get(p, "imsi"), &s("001010111111111"), "the SUPI without its imsi- prefix");
    assert_eq!(get(p, "imei"), &s("3569380356438091"));
    assert_eq!(get(p, "start_time"), &s("2024-03-15T13:00:00+00:00"));
    assert_eq!(get(p, "duration_s"), &Value::Int(600));
    assert_eq!(get(p, "cause_for_closing"), &Value::Int(0));
    assert_eq!(get(p, "charging_id"), &Value::Int(4_000_000_001), "chargingID [27] over the PDU session's [0]");
    assert_eq!(get(p, "apn"), &s("internet"));
    assert_eq!(get(p, "cell"), &s("010203"));
    assert_eq!(get(p, "uplink_bytes"), &Value::Int(157));
    assert_eq!(get(p, "downlink_bytes"), &Value::Int(953));
}

#[test]
fn sparkplug_from_python_protobuf() {
    let r = decode(&Format::Sparkplug, "spBv1.0/plant1/DDATA/gw1/pump7", &fixture("sparkplug_ddata.pb"), 100).unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(get(&r[0], "group"), &s("plant1"));
    assert_eq!(get(&r[0], "device"), &s("pump7"));
    assert_eq!(get(&r[0], "seq"), &Value::Int(7));
    assert_eq!(get(&r[0], "name"), &s("Pressure"));
    assert_eq!(get(&r[0], "datatype"), &s("Double"));
    assert_eq!(get(&r[0], "value"), &Value::Float(3.25));
    assert_eq!(get(&r[0], "timestamp"), &Value::Int(1_700_000_000_100));
    assert_eq!(get(&r[1], "value"), &Value::Int(-2), "Int8 in a uint32 carrier");
    assert_eq!(get(&r[1], "timestamp"), &Value::Int(1_700_000_000_123), "the payload's time");
    assert_eq!(get(&r[2], "value"), &Value::Bool(true));
    assert_eq!(get(&r[3], "name"), &Value::Null);
    assert_eq!(get(&r[3], "alias"), &Value::Int(12));
    assert_eq!(get(&r[3], "value"), &s("ok"));
    assert_eq!(get(&r[4], "value"), &Value::Int(-5), "Int64 in a uint64 carrier");
}

#[test]
fn senml_json_and_cbor_agree() {
    let j = decode(&Format::SenmlJson, "t", &fixture("senml.json"), 100).unwrap();
    let c = decode(&Format::SenmlCbor, "t", &fixture("senml.cbor"), 100).unwrap();
    assert_eq!(j, c);
    assert_eq!(j.len(), 4);
    assert_eq!(get(&j[0], "n"), &s("urn:dev:mac:0024befffe804ff1:temp"));
    assert_eq!(get(&j[0], "u"), &s("Cel"), "the base unit");
    assert_eq!(get(&j[1], "t"), &Value::Float(1_700_000_010.0));
    assert_eq!(get(&j[2], "u"), &s("%RH"));
    assert_eq!(get(&j[2], "v"), &Value::Float(40.0));
    assert_eq!(get(&j[3], "vb"), &Value::Bool(true));
}

fn shaper(format: PayloadFormatConfig, shape: &str) -> edge_agent::shape::Shaper {
    let cfg: ShapeConfig = toml::from_str(shape).unwrap();
    compile("s", format, &cfg).unwrap().unwrap()
}

#[test]
fn malformed_input_of_each_format_is_dead_lettered_with_its_reason() {
    let cases: [(PayloadFormatConfig, &str, &str, Vec<u8>, &str); 7] = [
        (PayloadFormatConfig::Json, "[[rules]]\nkind = \"enrich\"", "t", b"{\"a\":".to_vec(), "invalid JSON"),
        (PayloadFormatConfig::Csv, "csv_columns = [\"a\", \"b\"]", "t", b"1,2,3\n".to_vec(), "3 values"),
        (PayloadFormatConfig::SenmlJson, "", "t", b"[{\"n\":\"x\",\"v\":\"y\"}]".to_vec(), "SenML entry 0"),
        (PayloadFormatConfig::SenmlCbor, "", "t", vec![0x81, 0xa1, 0x02], "SenML CBOR"),
        (PayloadFormatConfig::Sparkplug, "", "spBv1.0/g/NDATA/n", vec![0x12, 0x7f], "Sparkplug protobuf"),
        (PayloadFormatConfig::CdrBer, "", "cdr", fixture("cdr_voice.ber")[..100].to_vec(), "CDR file"),
        (PayloadFormatConfig::CdrBer, "", "cdr", corrupt_cdr(), "CDR 0 at byte 54"),
    ];
    for (format, shape, topic, payload, why) in cases {
        let mut sh = shaper(format, shape);
        let out = sh.handle(5, topic, &payload);
        assert!(out.records.is_empty(), "{format:?}");
        assert_eq!(out.dead.len(), 1, "{format:?}");
        assert!(out.dead[0].reason.contains(why), "{format:?}: {}", out.dead[0].reason);
        assert_eq!(out.dead[0].payload, payload, "the raw payload is kept for inspection");
    }
}

/// The voice fixture with the first record's servedIMSI TBCD digit made invalid.
fn corrupt_cdr() -> Vec<u8> {
    let mut f = fixture("cdr_voice.ber");
    let at = f.windows(2).position(|w| w == [0x81, 0x08]).expect("servedIMSI [1] of 8 bytes") + 2;
    f[at] = 0xab;
    f
}

#[test]
fn shaped_cdrs_carry_no_raw_imsi_or_msisdn() {
    let mut sh = shaper(
        PayloadFormatConfig::CdrBer,
        r#"
[[rules]]
kind = "drop"
when = 'record.duration_s < 1 && record.record_type == "moCall"'
[[rules]]
kind = "pseudonymise"
fields = ["imsi", "msisdn", "imei", "calling_number", "called_number"]
key_env = "PATH"
"#,
    );
    let out = sh.handle(5, "cdr/file", &fixture("cdr_voice.ber"));
    assert_eq!((out.records.len(), out.filtered), (1, 1), "the 0 s call is dropped");
    let text = String::from_utf8(out.records[0].payload.clone()).unwrap();
    for raw in ["001010123456789", "447700900123", "3569380356438091", "447700900999"] {
        assert!(!text.contains(raw), "{raw} in {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["imsi"].as_str().unwrap().len(), 64);
    assert_eq!(v["duration_s"], 95);
}

fn arb_topic() -> impl Strategy<Value = String> {
    prop_oneof![Just("spBv1.0/g/NDATA/n".to_owned()), Just("spBv1.0/g/DDATA/n/d".to_owned()), "[a-z/]{0,12}"]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_decoder_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), topic in arb_topic()) {
        let csv = Format::Csv(edge_agent::shape::decode::CsvFormat {
            columns: vec!["a".into(), "b".into()],
            types: vec![edge_agent::shape::decode::ColumnType::Int, edge_agent::shape::decode::ColumnType::String],
            delimiter: b',',
            header: false,
        });
        for f in [Format::Raw, Format::Json, csv, Format::SenmlJson, Format::SenmlCbor, Format::Sparkplug, Format::CdrBer] {
            let _ = decode(&f, &topic, &bytes, 64);
        }
    }

    /// Whatever the bytes, a message ends up as records or as a dead letter: never silently gone.
    #[test]
    fn every_payload_is_forwarded_or_dead_lettered(bytes in proptest::collection::vec(any::<u8>(), 0..256), topic in arb_topic()) {
        let formats = [
            (PayloadFormatConfig::Raw, ""),
            (PayloadFormatConfig::Json, ""),
            (PayloadFormatConfig::Csv, "csv_columns = [\"a\", \"b\"]"),
            (PayloadFormatConfig::SenmlJson, ""),
            (PayloadFormatConfig::SenmlCbor, ""),
            (PayloadFormatConfig::Sparkplug, ""),
            (PayloadFormatConfig::CdrBer, ""),
        ];
        for (format, shape) in formats {
            let mut sh = shaper(format, &format!("{shape}\n[[rules]]\nkind = \"enrich\""));
            let out = sh.handle(1, &topic, &bytes);
            prop_assert!(out.records.len() + out.dead.len() >= 1, "{:?}: {:?}", format, out);
            prop_assert_eq!(out.filtered, 0);
        }
    }

    #[test]
    fn fuzz_target_bodies_hold_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        use edge_agent::shape::fuzzing;
        fuzzing::json(&bytes);
        fuzzing::csv(&bytes);
        fuzzing::senml_json(&bytes);
        fuzzing::senml_cbor(&bytes);
        fuzzing::sparkplug(&bytes);
        fuzzing::cdr_ber(&bytes);
    }

    #[test]
    fn cdr_decoder_survives_any_mutation_of_a_real_file(at in 0usize..240, byte in any::<u8>(), cut in 0usize..240) {
        let mut f = fixture("cdr_voice.ber");
        let at = at % f.len();
        f[at] = byte;
        let _ = decode(&Format::CdrBer, "cdr", &f, 64);
        let _ = decode(&Format::CdrBer, "cdr", &f[..cut.min(f.len())], 64);
    }

    #[test]
    fn sparkplug_decoder_survives_any_mutation_of_a_real_payload(at in 0usize..108, byte in any::<u8>()) {
        let mut f = fixture("sparkplug_ddata.pb");
        let at = at % f.len();
        f[at] = byte;
        let _ = decode(&Format::Sparkplug, "spBv1.0/g/DDATA/n/d", &f, 64);
    }
}
