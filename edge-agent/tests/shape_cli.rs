//! `edge-agent rules test` as an operator runs it: the real binary, a config file, a CDR file
//! on stdin, NDJSON on stdout.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn run(config: &Path, stream: &str, input: &str, stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["rules", "test", "--config"])
        .arg(config)
        .args(["--stream", stream, "--input", input, "--topic", "cdr/site1/file"])
        .env("BH_TEST_PII_KEY", "a-key-of-at-least-16-bytes")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

const CONFIG: &str = r##"
edge_id = "edge-1"
data_dir = "data"
[[broker]]
name = "main"
url = "mqtt://127.0.0.1:1883"
subscriptions = ["cdr/#"]
[[route]]
filter = "cdr/#"
stream = "cdr"
[streams.cdr]
format = "cdr_ber"
[[streams.cdr.shape.rules]]
name = "short_calls"
kind = "drop"
when = 'record.duration_s < 1 && record.record_type == "moCall"'
[[streams.cdr.shape.rules]]
name = "pii"
kind = "pseudonymise"
fields = ["imsi", "msisdn", "imei", "calling_number", "called_number"]
key_env = "BH_TEST_PII_KEY"
[[streams.cdr.shape.rules]]
kind = "enrich"
attrs = { site = "lon1" }
"##;

#[test]
fn rules_test_prints_the_shaped_records_of_a_cdr_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let file = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shape/cdr_voice.ber")).unwrap();
    let (code, out, err) = run(&config, "cdr", "whole", &file);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 messages: 1 records forwarded, 1 filtered, 0 dead-lettered"), "{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["stream"], "cdr");
    assert_eq!(line["topic"], "cdr/site1/file");
    assert_eq!(line["attrs"]["site"], "lon1");
    assert_eq!(line["attrs"]["rule"], "pii");
    let record: serde_json::Value = serde_json::from_str(line["payload"].as_str().unwrap()).unwrap();
    assert_eq!(record["duration_s"], 95);
    assert_eq!(record["imsi"].as_str().unwrap().len(), 64);
    assert!(!out.contains("001010123456789") && !out.contains("447700900123"), "{out}");
}

#[test]
fn rules_test_names_config_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, CONFIG.replace("record.duration_s < 1", "record.duration_s <")).unwrap();
    let (code, _, err) = run(&config, "cdr", "whole", b"");
    assert_eq!(code, 2);
    assert!(err.contains("streams.cdr.shape.rules[0].when"), "{err}");
}
