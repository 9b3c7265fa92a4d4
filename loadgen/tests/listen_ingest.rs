//! `loadgen listen-ingest` end to end on a small run: a real Mosquitto (installed by `.ci/run`)
//! and the debug-built edge agent in listen mode. Asserts what the run reports, never its timing.

mod common;

use common::{ResultLine, run_ok, sibling_bin};

#[test]
fn listen_ingest_acks_every_message_durably_and_the_agent_stops_cleanly() {
    let agent = sibling_bin("edge-agent");
    let agent = agent.to_str().expect("a UTF-8 path");
    let stdout = run_ok(&[
        "listen-ingest",
        "--messages",
        "2000",
        "--devices",
        "5,50",
        "--inflight",
        "20",
        "--latency-seconds",
        "1",
        "--agent-bin",
        agent,
    ]);
    let r = ResultLine::of(&stdout);
    assert_eq!(r.num("messages"), 2000);
    assert_eq!(r.num("appended_ok"), 2, "both device counts appended every message: {r:?}");
    assert_eq!(r.num("agent_exit"), 0, "{r:?}");
    assert_eq!(r.num("log_verify_exit"), 0, "{r:?}");
    for key in ["peer_msg_per_s_5", "agent_msg_per_s_5", "peer_msg_per_s_50", "agent_msg_per_s_50", "latency_acked"] {
        assert!(r.num(key) > 0, "{key}: {r:?}");
    }
    assert!(r.num("idle_rss_kib") > 0 && r.num("peak_rss_kib") >= r.num("idle_rss_kib"), "{r:?}");
    // The exact configs are printed with the figures.
    for want in ["max_inflight_messages 20", "inflight_max = 20", "fsync_interval = \"5ms\"", "[listen]"] {
        assert!(stdout.contains(want), "{want} in\n{stdout}");
    }
}
