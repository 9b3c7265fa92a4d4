//! `loadgen mqtt-ingest` end to end on a small run: a real Mosquitto (installed by `.ci/run`)
//! and the debug-built edge agent. Asserts what the run reports, never its timing.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_loadgen");
const MESSAGES: u64 = 2000;

/// `edge-agent` beside `loadgen` in `target/<profile>/`: cargo names only a package's own
/// binaries in `CARGO_BIN_EXE_*`, and `cargo test --workspace` builds every binary before any
/// test runs.
fn agent_bin() -> PathBuf {
    let dir = Path::new(BIN).parent().expect("the loadgen binary is in a directory");
    let agent = dir.join("edge-agent");
    assert!(
        agent.is_file(),
        "no edge-agent at {}: `cargo test --workspace` builds it; with `-p loadgen` alone, run \
         `cargo build -p edge-agent` first",
        agent.display()
    );
    agent
}

#[test]
fn mqtt_ingest_appends_every_message_and_the_agent_stops_cleanly() {
    let o = Command::new(BIN)
        .args(["mqtt-ingest", "--messages", &MESSAGES.to_string(), "--publishers", "2", "--agent-bin"])
        .arg(agent_bin())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running loadgen");
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "loadgen exited with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", o.status);
    let result =
        stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("no RESULT line in\n{stdout}"));
    let field = |key: &str| -> &str {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in {result}"))
    };
    let n = MESSAGES.to_string();
    assert_eq!(field("messages"), n);
    assert_eq!(field("appended"), n, "{result}");
    assert_eq!(field("acked"), n, "{result}");
    assert_eq!(field("agent_exit"), "0", "{result}");
    assert_eq!(field("log_verify_exit"), "0", "{result}");
    let ratio: f64 = field("ratio").parse().expect("ratio is a number");
    assert!(ratio > 0.0 && ratio.is_finite(), "{result}");
    // The exact configs are printed with the figures.
    for want in
        ["max_queued_messages 0", "max_inflight_messages 1000", "inflight_max = 1000", "fsync_interval = \"5ms\""]
    {
        assert!(stdout.contains(want), "{want} in\n{stdout}");
    }
}
