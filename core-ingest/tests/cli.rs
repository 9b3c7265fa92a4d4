//! The `core-ingest` binary answers `--version` and `--help`.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_core-ingest");

#[test]
fn version_and_help() {
    let o = Command::new(BIN).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8(o.stdout).unwrap(), format!("core-ingest {}\n", env!("CARGO_PKG_VERSION")));
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8(o.stdout).unwrap().contains("Backhaul"));
    assert_eq!(Command::new(BIN).arg("serve").output().unwrap().status.code(), Some(2), "no commands yet");
}
