//! `loadgen mqtt` against a real Mosquitto, and `loadgen verify` on what a real subscriber
//! (`mosquitto_sub`) received: every acknowledged message found once; an injected loss and an
//! injected duplicate each fail the verification, naming the message.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, ResultLine, run_ok};
use loadgen::mosquitto::{self, Mosquitto};

const DEVICES: u32 = 20;
const RATE: u64 = 500;
const SECONDS: u64 = 2;

fn verify(manifest: &std::path::Path, lines: &[String], dir: &std::path::Path) -> (Option<i32>, String) {
    let records = dir.join("records.ndjson");
    let mut f = std::fs::File::create(&records).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    let o = Command::new(BIN)
        .args(["verify", "--manifest", manifest.to_str().unwrap(), "--records", records.to_str().unwrap()])
        .output()
        .unwrap();
    (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn devices_publish_and_verify_proves_each_acked_message_arrived_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&mosquitto::find_exe().unwrap(), dir.path(), 1000).unwrap();
    let total = RATE * SECONDS;
    let sub = Command::new("mosquitto_sub")
        .args(["-p", &broker.port.to_string(), "-t", "cdr/#", "-q", "1", "-C", &total.to_string(), "-W", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian's mosquitto-clients)");
    std::thread::sleep(Duration::from_millis(500));
    let manifest = dir.path().join("manifest.json");
    let stdout = run_ok(&[
        "mqtt",
        "--port",
        &broker.port.to_string(),
        "--devices",
        &DEVICES.to_string(),
        "--rate",
        &RATE.to_string(),
        "--seconds",
        &SECONDS.to_string(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let r = ResultLine::of(&stdout);
    assert_eq!((r.num("connected"), r.num("acked"), r.num("unconfirmed")), (u64::from(DEVICES), total, 0), "{r:?}");
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success(), "mosquitto_sub: {}", out.status);
    // mosquitto_sub prints one payload per line; wrap each as a read-API record.
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|p| serde_json::json!({ "payload": p }).to_string())
        .collect();
    assert_eq!(lines.len() as u64, total);
    broker.stop().unwrap();

    let (code, text) = verify(&manifest, &lines, dir.path());
    assert_eq!(code, Some(0), "{text}");
    let v = ResultLine::of(&text);
    assert_eq!((v.num("expected"), v.num("found"), v.num("lost"), v.num("duplicated")), (total, total, 0, 0));

    let mut lossy = lines.clone();
    let gone = lossy.remove(123);
    let (code, text) = verify(&manifest, &lossy, dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(ResultLine::of(&text).num("lost"), 1);
    let gone_id = serde_json::from_str::<serde_json::Value>(
        serde_json::from_str::<serde_json::Value>(&gone).unwrap()["payload"].as_str().unwrap(),
    )
    .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(&format!("lost, first 1: {gone_id}")), "{text}");

    let mut doubled = lines.clone();
    doubled.push(lines[7].clone());
    let (code, text) = verify(&manifest, &doubled, dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(ResultLine::of(&text).num("duplicated"), 1);
}

#[test]
fn bad_options_are_refused() {
    for bad in [["--qos", "3"], ["--devices", "0"], ["--burst", "2s"]] {
        let o = Command::new(BIN).arg("mqtt").args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = Command::new(BIN).args(["verify", "--manifest", "/nonexistent/m.json", "--records", "-"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/m.json"));
}
