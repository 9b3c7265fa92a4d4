//! `loadgen core-ingest` end to end on a small run: the debug-built core node and a few
//! simulated edges for two seconds, then the same edges into the quinn peer (`loadgen
//! quic-sink`). Asserts what the run reports (every batch acknowledged and stored once, clean
//! exits, the peer's figures there and positive), never its timing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{BIN, ResultLine, run_ok, sibling_bin};
use loadgen::core_node::Pki;
use loadgen::quic_sink::{self, SinkCounts, SinkProc};
use shared::quic::Mtu;

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
    // The quinn peer ran beside it: a bare quinn receiver read bytes and used CPU for them.
    for key in ["quinn_peer_mb_per_s", "quinn_peer_cpu_s_per_gb", "core_to_quinn_cpu_ratio"] {
        let v: f64 = r.str(key).parse().unwrap_or_else(|e| panic!("{key}: {e}: {r:?}"));
        assert!(v.is_finite() && v > 0.0, "{key}: {r:?}");
    }
    assert!(stdout.contains("| core CPU per GB / quinn peer CPU per GB |"), "{stdout}");
}

#[test]
fn without_the_quinn_peer_the_result_line_leaves_its_figures_out() {
    let core = sibling_bin("core-ingest");
    let core = core.to_str().expect("a UTF-8 path");
    let stdout = run_ok(&[
        "core-ingest",
        "--edges",
        "1",
        "--seconds",
        "1",
        "--pool-batches",
        "1",
        "--no-quinn-peer",
        "--core-bin",
        core,
    ]);
    let r = ResultLine::of(&stdout);
    assert!(r.num("sent") > 0, "{r:?}");
    assert!(!stdout.contains("quinn"), "{stdout}");
}

#[test]
fn a_paced_quinn_peer_says_so_and_reads_bytes() {
    let core = sibling_bin("core-ingest");
    let core = core.to_str().expect("a UTF-8 path");
    let stdout = run_ok(&[
        "core-ingest",
        "--edges",
        "2",
        "--seconds",
        "1",
        "--pool-batches",
        "1",
        "--quinn-peer-paced",
        "--core-bin",
        core,
    ]);
    let r = ResultLine::of(&stdout);
    let mb_s: f64 = r.str("quinn_peer_mb_per_s").parse().unwrap();
    assert!(mb_s > 0.0, "{r:?}");
    assert!(stdout.contains(" (paced to "), "{stdout}");
}

#[test]
fn quic_sink_is_hidden_answers_its_counts_and_exits_when_stdin_closes() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("core-ingest") && !help.contains("quic-sink"), "{help}");

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki")).unwrap();
    let command = quic_sink::command(Path::new(BIN), &pki, Mtu { min: 1200, max: 6500 });
    let mut sink = SinkProc::start(command, &tmp.path().join("quic-sink.log")).unwrap();
    assert!(sink.listen.ip().is_loopback() && sink.listen.port() != 0, "{}", sink.listen);
    assert_eq!(sink.counts().unwrap(), SinkCounts { bytes: 0, connections: 0 });
    assert_eq!(sink.counts().unwrap(), SinkCounts { bytes: 0, connections: 0 });
    let exit = sink.stop(Duration::from_secs(30)).unwrap();
    assert!(exit.success(), "{exit}");

    // A key file that is not there is named.
    let o = Command::new(BIN)
        .arg("quic-sink")
        .arg("--ca")
        .arg(pki.ca_file())
        .arg("--cert")
        .arg(pki.server_cert_file())
        .args(["--key", "/nonexistent/server.key"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/server.key"), "{err}");
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
