//! `loadgen e2e-latency` end to end on a small run: a real Mosquitto (installed by `.ci/run`),
//! the debug-built edge agent forwarding to the debug-built core node, paced publishers for two
//! seconds. Asserts the counts (every record stored at the core once, clean exits), never the
//! latency.

mod common;

use std::process::Command;

use common::{BIN, ResultLine, run_ok, sibling_bin};

const RATE: u64 = 200;
const SECONDS: u64 = 2;

#[test]
fn every_record_published_is_stored_at_the_core_once_and_both_stop_cleanly() {
    let (agent, core) = (sibling_bin("edge-agent"), sibling_bin("core-ingest"));
    let stdout = run_ok(&[
        "e2e-latency",
        "--rate",
        &RATE.to_string(),
        "--seconds",
        &SECONDS.to_string(),
        "--publishers",
        "2",
        "--agent-bin",
        agent.to_str().expect("a UTF-8 path"),
        "--core-bin",
        core.to_str().expect("a UTF-8 path"),
    ]);
    let r = ResultLine::of(&stdout);
    let n = RATE * SECONDS;
    for key in ["records", "published", "appended", "acked", "core_verified_records"] {
        assert_eq!(r.num(key), n, "{key}: {r:?}");
    }
    let batches = r.num("edge_batches");
    assert!(batches > 0, "{r:?}");
    assert_eq!(r.num("forwarded_acked"), batches, "{r:?}");
    assert_eq!(r.num("core_stored"), batches, "{r:?}");
    for key in ["duplicates", "agent_exit", "core_exit", "agent_verify_exit", "core_verify_exit"] {
        assert_eq!(r.num(key), 0, "{key}: {r:?}");
    }
    for want in ["[forward]", "linger = \"5ms\"", "max_queued_messages 0", "node = \"loadgen-core\""] {
        assert!(stdout.contains(want), "{want} in\n{stdout}");
    }
}

#[test]
fn e2e_latency_refuses_bad_bounds_and_names_a_missing_binary() {
    for bad in [["--rate", "0"], ["--seconds", "0"], ["--publishers", "0"], ["--inflight", "0"]] {
        let o = Command::new(BIN).arg("e2e-latency").args(bad).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = Command::new(BIN).args(["e2e-latency", "--agent-bin", "/nonexistent/edge-agent"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no edge-agent at /nonexistent/edge-agent"), "{err}");
}
