//! The `loadgen` command line: `--version`, `--help`, and what it refuses before starting
//! anything.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_loadgen");

#[test]
fn version_and_help() {
    let o = Command::new(BIN).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8(o.stdout).unwrap(), format!("loadgen {}\n", env!("CARGO_PKG_VERSION")));
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("Backhaul") && help.contains("mqtt-ingest"), "{help}");
    assert_eq!(Command::new(BIN).arg("serve").output().unwrap().status.code(), Some(2), "unknown command");
}

#[test]
fn mqtt_ingest_help_names_every_option_and_its_default() {
    let o = Command::new(BIN).args(["mqtt-ingest", "--help"]).output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    for want in [
        "--messages",
        "[default: 200000]",
        "--payload-bytes",
        "[default: 250]",
        "--publishers",
        "[default: 4]",
        "--inflight",
        "[default: 1000]",
        "--agent-bin",
        "--keep",
    ] {
        assert!(help.contains(want), "{want} in\n{help}");
    }
}

#[test]
fn mqtt_ingest_refuses_bad_bounds_as_usage_errors() {
    for bad in [["--inflight", "0"], ["--inflight", "65536"], ["--messages", "0"], ["--publishers", "0"]] {
        let o = Command::new(BIN).arg("mqtt-ingest").args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn mqtt_ingest_names_a_missing_agent_binary() {
    let o = Command::new(BIN)
        .args(["mqtt-ingest", "--messages", "10", "--agent-bin", "/nonexistent/edge-agent"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no edge-agent at /nonexistent/edge-agent"), "{err}");
}
