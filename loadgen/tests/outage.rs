//! `loadgen outage` on a short run: a real Mosquitto, edge agent and core node with the UDP WAN
//! proxy between them, then a real Mosquitto bridge and a real NATS leaf node + hub (Debian's
//! nats-server, installed by `.ci/run`) through the TCP proxy, all through a 3 s outage. Backhaul must lose and duplicate nothing; the peer's figures are printed and its
//! verification must have seen every message it was given.

mod common;

use common::{ResultLine, run_ok, sibling_bin};

#[test]
fn backhaul_loses_nothing_across_an_outage_and_the_peer_is_judged_the_same_way() {
    let (agent, core) = (sibling_bin("edge-agent"), sibling_bin("core-ingest"));
    let reports = tempfile::tempdir().unwrap();
    let stdout = run_ok(&[
        "outage",
        "--rate",
        "200",
        "--seconds",
        "8",
        "--devices",
        "4",
        "--outage",
        "3s@2s",
        "--systems",
        "backhaul,mosquitto-bridge,nats-leaf",
        "--report-dir",
        reports.path().to_str().unwrap(),
        "--agent-bin",
        agent.to_str().unwrap(),
        "--core-bin",
        core.to_str().unwrap(),
    ]);
    let results: Vec<ResultLine> =
        stdout.lines().filter(|l| l.starts_with("RESULT system=")).map(ResultLine::of).collect();
    assert_eq!(results.len(), 3, "{stdout}");
    let backhaul = &results[0];
    assert_eq!(backhaul.str("system"), "backhaul");
    assert_eq!(backhaul.num("acked"), 1600, "{backhaul:?}");
    assert_eq!((backhaul.num("found"), backhaul.num("lost"), backhaul.num("duplicated")), (1600, 0, 0));
    let bridge = &results[1];
    assert_eq!(bridge.str("system"), "mosquittobridge");
    assert_eq!(bridge.num("acked"), 1600, "{bridge:?}");
    assert_eq!(bridge.num("found") + bridge.num("lost"), 1600, "{bridge:?}");
    let nats = &results[2];
    assert_eq!(nats.str("system"), "natsleaf");
    assert_eq!(nats.num("acked"), 1600, "{nats:?}");
    assert_eq!(nats.num("found") + nats.num("lost"), 1600, "{nats:?}");
    for stem in ["outage-backhaul", "outage-mosquittobridge", "outage-natsleaf"] {
        for ext in ["json", "md", "svg"] {
            let p = reports.path().join(format!("{stem}.{ext}"));
            assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 100), "{}", p.display());
        }
    }
}
