//! No raw IMSI or MSISDN leaves the edge: a real Mosquitto, the real `edge-agent` with a
//! pseudonymising rule set, a real `core-ingest` over QUIC with mutual TLS, and every batch of
//! every stream the core stored searched for the raw identifiers. The pseudonyms the core holds
//! are the HMAC-SHA-256 of the identifiers under the edge's key (so the core can join on them),
//! and the payload that failed to decode (holding a raw IMSI) stays in the edge's
//! `_deadletter`, which is not forwarded.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, Core, Mosquitto, Pki, Publisher, broker_toml, forward_toml, read_stream, try_read_core_stream};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const KEY: &str = "site-lon1-pii-key-0123456789";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Raw identifiers in the fixtures and the CSV lines below.
const RAW: [&str; 11] = [
    "001010123456789",
    "447700900123",
    "001010987654321",
    "447700900456",
    "001010555555555",
    "447700900777",
    "310260000000001",
    "15550000001",
    "310260000000002",
    "001010111111111",
    "3569380356438091",
];

const STREAMS: &str = r##"
[[route]]
filter = "cdr/files/#"
stream = "cdr"
[[route]]
filter = "cdr/csv/#"
stream = "cdrcsv"

[streams.cdr]
format = "cdr_ber"
[[streams.cdr.shape.rules]]
name = "pii"
kind = "pseudonymise"
fields = ["imsi", "msisdn", "imei", "calling_number", "called_number"]
key_env = "BH_PII_KEY"

[streams.cdrcsv]
format = "csv"
[streams.cdrcsv.shape]
csv_columns = ["record_type", "imsi", "msisdn", "duration_s"]
csv_types = { duration_s = "int" }
[[streams.cdrcsv.shape.rules]]
name = "pii"
kind = "pseudonymise"
fields = ["imsi", "msisdn"]
key_env = "BH_PII_KEY"
[[streams.cdrcsv.shape.rules]]
kind = "enrich"
attrs = { site = "lon1" }
"##;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shape").join(name)).unwrap()
}

fn pseudonym(raw: &str) -> String {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(KEY.as_bytes()).unwrap();
    m.update(raw.as_bytes());
    m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every record (topic, payload, attributes) of every stream the core stored, as text.
fn core_texts(core_data: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let streams =
        std::fs::read_dir(core_data.join("streams")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    for entry in streams {
        let stream = entry.file_name().to_string_lossy().into_owned();
        for b in try_read_core_stream(core_data, &stream).unwrap_or_default() {
            for r in b.batch.records().expect("the core's batches decode") {
                let attrs: Vec<String> = r.attrs.iter().map(|a| format!("{}={}", a.key, a.value)).collect();
                let text = format!("{} {} {}", r.topic, String::from_utf8_lossy(&r.payload), attrs.join(" "));
                out.push((stream.clone(), text));
            }
        }
    }
    out
}

#[test]
fn no_raw_imsi_or_msisdn_reaches_the_core() {
    let pki = Pki::new();
    let core_data = tempfile::tempdir().unwrap();
    let mut core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().unwrap();
    let config = broker_toml(&broker, "3.1.1", &["cdr/#"]) + STREAMS + &forward_toml(&[&core], &pki, "");
    let mut agent = Agent::start_with(&config, data.path(), &[("BH_PII_KEY", KEY)], true);
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    publisher.publish("cdr/files/msc1", fixture("cdr_voice.ber"));
    publisher.publish("cdr/files/pgw1", fixture("cdr_pgw.ber"));
    publisher.publish("cdr/files/smf1", fixture("cdr_smf.ber"));
    publisher.publish(
        "cdr/csv/probe1",
        b"voice,310260000000001,15550000001,30\ndata,310260000000002,15550000002,0\n".to_vec(),
    );
    // One column short: not decodable, so it goes to _deadletter, raw IMSI and all.
    publisher.publish("cdr/csv/probe1", b"voice,310260000000009,15550000009\n".to_vec());
    publisher.wait_all_acked(TIMEOUT);

    let want = 4 + 2; // 2 voice CDRs, 1 PGW CDR, 1 SMF (CHF) record; 2 CSV lines
    let context = || format!("{}\n{}", agent.log_tail(), core.log_tail());
    common::wait_for("the core to hold every shaped record", TIMEOUT, context, || {
        let texts = core_texts(core_data.path());
        (texts.len() >= want).then_some(())
    });
    // Let anything else the agent might forward arrive before looking.
    std::thread::sleep(Duration::from_millis(500));

    let texts = core_texts(core_data.path());
    assert_eq!(texts.len(), want, "{texts:#?}");
    for (stream, text) in &texts {
        assert_ne!(stream, "_deadletter", "dead letters are not forwarded by default");
        for raw in RAW.iter().chain(&["310260000000009", "15550000009"]) {
            assert!(!text.contains(raw), "raw identifier {raw} reached the core in stream {stream}: {text}");
        }
    }
    let all: String = texts.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n");
    for raw in
        ["001010123456789", "447700900123", "001010555555555", "001010111111111", "310260000000001", "15550000002"]
    {
        assert!(all.contains(&pseudonym(raw)), "the pseudonym of {raw} is not at the core (no join possible)");
    }
    // The rules' own counts are on the running agent's /metrics.
    let changed =
        agent.metric("backhaul_edge_shape_rule_records_total", r#"stream="cdr",rule="pii",outcome="changed""#);
    assert_eq!(changed, 4.0, "2 voice, 1 PGW and 1 SMF record pseudonymised");
    let dead = agent.metric("backhaul_edge_records_dropped_total", r#"stream="cdrcsv",reason="invalid_payload""#);
    assert_eq!(dead, 1.0);
    // The undecodable payload stayed on the edge, with its reason.
    agent.sigterm_and_wait();
    let dead = read_stream(data.path(), "_deadletter");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(String::from_utf8_lossy(&dead[0].record.payload).contains("310260000000009"));
    core.sigterm_and_wait();
}
