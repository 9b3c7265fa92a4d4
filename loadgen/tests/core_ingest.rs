//! `loadgen core-ingest` end to end on a small run: the debug-built core node and a few
//! simulated edges for two seconds. Asserts what the run reports (every batch acknowledged and
//! stored once, clean exits), never its timing.

mod common;

use std::process::Command;

use common::{BIN, ResultLine, run_ok, sibling_bin};

#[test]
fn every_batch_sent_is_acknowledged_and_stored_once_and_the_core_stops_cleanly() {
    let core = sibling_bin("core-ingest");
    let core = core.to_str().expect("a UTF-8 path");
    let stdout = run_ok(&["core-ingest", "--edges", "3", "--seconds", "2", "--pool-batches", "2", "--core-bin", core]);
    let r = ResultLine::of(&stdout);
    assert_eq!(r.num("edges"), 3);
    let sent = r.num("sent");
    assert!(sent > 0, "{r:?}");
    for key in ["acked", "stored", "verified_batches"] {
        assert_eq!(r.num(key), sent, "{key}: {r:?}");
    }
    assert_eq!(r.num("verified_records"), r.num("acked_records"), "{r:?}");
    for key in ["duplicates", "conflicts", "refused", "core_exit", "log_verify_exit"] {
        assert_eq!(r.num(key), 0, "{key}: {r:?}");
    }
    // The config is printed with the figures.
    assert!(stdout.contains("partitions = 4") && stdout.contains("[tls]"), "{stdout}");
}

#[test]
fn core_ingest_refuses_bad_bounds_and_names_a_missing_core() {
    for bad in [["--edges", "0"], ["--seconds", "0"], ["--batch-bytes", "10"], ["--window-bytes", "0"]] {
        let o = Command::new(BIN).arg("core-ingest").args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = Command::new(BIN).args(["core-ingest", "--core-bin", "/nonexistent/core-ingest"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no core-ingest at /nonexistent/core-ingest"), "{err}");
}
