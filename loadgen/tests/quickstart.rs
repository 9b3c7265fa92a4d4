//! The README quickstart's path on a short run: `loadgen quickstart` with the shipped configs of
//! `deploy/quickstart/`, moved to ephemeral ports and a temp dir — real core-ingest and
//! edge-agent (listen mode) processes, simulated devices, segments tiered to the local object
//! store, everything read back (`core-ingest read`, disk and bucket) and verified.

mod common;

use std::net::TcpListener;

use common::{ResultLine, run_ok, sibling_bin};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The shipped config with its ports and paths moved.
fn moved(file: &str, ports: &[(&str, u16)]) -> String {
    let path = format!("{}/../deploy/quickstart/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in ports {
        text = text.replace(from, &format!("127.0.0.1:{to}"));
    }
    for shipped in ["17443", "19465", "19464", "18830"] {
        assert!(!text.contains(&format!("127.0.0.1:{shipped}")), "port {shipped} left in {path}");
    }
    assert!(text.contains("../../target/quickstart/"), "{path}");
    // Smaller segments than shipped, so a 3 s run closes some and they tier.
    text.replace("../../target/quickstart/", "work/")
        .replace("segment_bytes_max = \"256KiB\"", "segment_bytes_max = \"64KiB\"")
}

#[test]
fn the_quickstart_stores_every_acknowledged_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [
        ("127.0.0.1:17443", free_port()),
        ("127.0.0.1:19465", free_port()),
        ("127.0.0.1:19464", free_port()),
        ("127.0.0.1:18830", free_port()),
    ];
    let core = dir.path().join("core-ingest.toml");
    let agent = dir.path().join("edge-agent.toml");
    std::fs::write(&core, moved("core-ingest.toml", &ports)).unwrap();
    std::fs::write(&agent, moved("edge-agent.toml", &ports)).unwrap();
    let stdout = run_ok(&[
        "quickstart",
        "--seconds",
        "3",
        "--devices",
        "10",
        "--rate",
        "1000",
        "--core-config",
        core.to_str().unwrap(),
        "--agent-config",
        agent.to_str().unwrap(),
        "--agent-bin",
        sibling_bin("edge-agent").to_str().unwrap(),
        "--core-bin",
        sibling_bin("core-ingest").to_str().unwrap(),
        "--report-dir",
        dir.path().join("report").to_str().unwrap(),
    ]);
    let r = stdout.lines().filter(|l| l.starts_with("RESULT acked=")).map(ResultLine::of).next().expect("summary");
    assert_eq!(r.num("acked"), 3000, "{stdout}");
    assert_eq!((r.num("found"), r.num("stored")), (3000, 3000));
    assert!(r.num("objects") > 0, "closed segments went to the bucket: {stdout}");
    assert_eq!((r.num("lost"), r.num("duplicated")), (0, 0));
    assert_eq!((r.num("agent_exit"), r.num("core_exit")), (0, 0));
    assert!(stdout.contains("Look at the data:") && stdout.contains("log dump --data-dir"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report/quickstart.json")).unwrap()).unwrap();
    assert!(report["series"].as_array().unwrap().len() >= 2, "{report}");
    assert!(report["failures"].as_array().unwrap().is_empty());
    let svg = std::fs::read_to_string(dir.path().join("report/quickstart.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
}
