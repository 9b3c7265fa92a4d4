//! Forwarding end to end: a real Mosquitto, the real `edge-agent` and `core-ingest` binaries
//! talking QUIC with mutual TLS on loopback, and what each core stored read back from its
//! partition logs through `shared::log` (not through either service).
//!
//! The contract under test (DESIGN §1, §4, §7): per (edge, epoch, stream) the core ends up
//! holding seqs `0..N` exactly once, the batches byte for byte as the edge made them, whatever
//! is SIGKILLed on the way (the core, the edge, the primary of two cores); a wiped edge starts a
//! new epoch from seq 0; live-first delivery lets new data overtake a backlog.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Agent, Core, CoreBatch, EDGE_ID, Mosquitto, Msg, Pki, Publisher, Rng, SeqCheck, broker_toml, by_producer,
    forward_toml, id_of, messages, metric_value, read_core_stream, records_by_seq, try_read_core_stream,
    try_read_log_dir,
};
use shared::log::verify::stream_dir;
use shared::ranges::RangeSet;

/// Publishes reach the broker within this.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// Everything published reaches the core(s) within this.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

const ROUTES: &str = r#"
[[route]]
filter = "cdr/#"
stream = "cdr"

[[route]]
filter = "sensors/#"
stream = "sensors"
"#;

/// Two topics of each stream: `cdr` (JSON) and `sensors` (raw; the payloads are not UTF-8).
const TOPICS: [&str; 4] = ["cdr/a", "cdr/b", "sensors/x", "sensors/y"];
const STREAMS: [&str; 2] = ["cdr", "sensors"];

/// Broker, routes and the two streams (`stream_extra` added to both), without `[forward]`.
fn two_streams(broker: &Mosquitto, stream_extra: &str) -> String {
    broker_toml(broker, "3.1.1", &["cdr/#", "sensors/#"])
        + ROUTES
        + &format!(
            "\n[streams.cdr]\nformat = \"json\"\n{stream_extra}\n\n[streams.sensors]\nformat = \"raw\"\n{stream_extra}\n\n"
        )
}

fn stream_of(topic: &str) -> &str {
    topic.split('/').next().expect("split yields one item")
}

/// The messages of `msgs` routed to `stream`, in publish order.
fn of_stream<'a>(msgs: &'a [Msg], stream: &str) -> Vec<&'a Msg> {
    msgs.iter().filter(|m| stream_of(&m.topic) == stream).collect()
}

/// The edge's producer epoch, from its data directory's identity file.
fn edge_epoch(data_dir: &Path) -> u64 {
    assert!(data_dir.join("identity").is_file(), "no identity file in {}", data_dir.display());
    shared::identity::open_or_create(data_dir, "backhaul-edge").expect("reading the edge identity")
}

/// Seqs of each epoch of [`EDGE_ID`]'s `stream` held by the union of the cores under `dirs`.
fn held(dirs: &[&Path], stream: &str) -> BTreeMap<u64, RangeSet> {
    let mut out: BTreeMap<u64, RangeSet> = BTreeMap::new();
    for dir in dirs {
        for b in try_read_core_stream(dir, stream).unwrap_or_default() {
            let (edge, epoch) = b.producer();
            if edge == EDGE_ID {
                out.entry(epoch).or_default().insert(b.seqs());
            }
        }
    }
    out
}

/// `stream: epoch → ranges` of every stream, for failure messages.
fn held_summary(dirs: &[&Path]) -> String {
    STREAMS
        .iter()
        .map(|s| {
            let h: Vec<String> = held(dirs, s).iter().map(|(e, r)| format!("{e:016x}: {:?}", r.ranges())).collect();
            format!("  {s}: {}", h.join("; "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until, for each `(stream, n)` of `want`, epoch `epoch` (or, if `None`, some epoch)
/// of the edge holds `0..n` in the union of `dirs`.
fn wait_held(dirs: &[&Path], epoch: Option<u64>, want: &[(&str, u64)], context: impl Fn() -> String) {
    let what = format!("the core(s) to hold {want:?} (epoch {epoch:x?})");
    common::wait_for(
        &what,
        FORWARD_TIMEOUT,
        || format!("held:\n{}\n{}", held_summary(dirs), context()),
        || {
            want.iter()
                .all(|&(stream, n)| {
                    held(dirs, stream).iter().any(|(e, r)| epoch.is_none_or(|x| x == *e) && r.contains_range(&(0..n)))
                })
                .then_some(())
        },
    );
}

/// Distinct seqs the cores under `dirs` hold over all streams and epochs.
fn held_total(dirs: &[&Path]) -> u64 {
    STREAMS.iter().flat_map(|s| held(dirs, s).into_values()).map(|r| r.len()).sum()
}

/// `batches` (one producer stream) hold every seq of `0..expected.len()` exactly once, no
/// gap, and the record at seq `i` is `expected[i]`: topic and payload byte for byte.
fn assert_holds_in_order(what: &str, batches: &[&CoreBatch], expected: &[&Msg]) {
    let check = SeqCheck::of(batches.iter().copied());
    assert!(
        check.is_exactly_once() && check.end == expected.len() as u64,
        "{what}: expected seqs 0..{} exactly once; end {}, duplicated {:?}, missing {:?}, gap batches {:?}",
        expected.len(),
        check.end,
        check.duplicated,
        check.missing,
        check.gaps
    );
    let records = records_by_seq(batches.iter().copied());
    let got: Vec<Option<u64>> = records.values().map(|r| id_of(&r.payload)).collect();
    let want: Vec<Option<u64>> = expected.iter().map(|m| Some(m.id)).collect();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!("{what}: seq {i} holds id {:?}, publish order has {:?} there", got.get(i), want.get(i));
    }
    for (seq, r) in &records {
        let m = expected[*seq as usize];
        assert_eq!(r.topic, m.topic, "{what}: topic at seq {seq}");
        assert!(r.payload[..] == m.payload[..], "{what}: payload at seq {seq} (id {}) differs", m.id);
    }
}

/// Each batch the core stored is, byte for byte, the batch the edge logged at that seq.
fn assert_same_bytes_as_edge(edge_data: &Path, stream: &str, stored: &[&CoreBatch]) {
    let edge: BTreeMap<u64, shared::batch::Batch> = try_read_log_dir(&stream_dir(edge_data, stream))
        .unwrap_or_else(|e| panic!("reading the edge log: {e}"))
        .into_iter()
        .collect();
    for b in stored {
        let seq = b.seqs().start;
        let e = edge.get(&seq).unwrap_or_else(|| panic!("{stream}: the edge log has no batch at seq {seq}"));
        assert!(e.bytes() == b.batch.bytes(), "{stream}: the core's batch at seq {seq} differs from the edge's");
    }
}

/// The one producer stream of `batches`: checks it is [`EDGE_ID`] with `epoch` and returns them.
fn only_producer<'a>(stream: &str, batches: &'a [CoreBatch], epoch: u64) -> Vec<&'a CoreBatch> {
    let mut producers = by_producer(batches);
    let keys: Vec<(String, u64)> = producers.keys().cloned().collect();
    assert_eq!(keys, vec![(EDGE_ID.to_owned(), epoch)], "{stream}: producers at the core");
    producers.remove(&(EDGE_ID.to_owned(), epoch)).expect("checked above")
}

fn core_counter(metrics: &str, name: &str) -> u64 {
    metric_value(metrics, name, "").unwrap_or(0.0) as u64
}

/// The counters of one core run that tell what happened to its batches.
fn core_counters(metrics: &str) -> String {
    ["received", "stored", "duplicate", "conflicting", "handovers"]
        .iter()
        .zip([
            "backhaul_core_batches_received_total",
            "backhaul_core_batches_stored_total",
            "backhaul_core_duplicate_batches_total",
            "backhaul_core_conflicting_batches_total",
            "backhaul_core_handovers_total",
        ])
        .map(|(label, name)| format!("{label} {}", core_counter(metrics, name)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn end_to_end_every_record_arrives_once_in_order() {
    const TOTAL: u64 = 2_400;
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let config = two_streams(&broker, "") + &forward_toml(&[&core], &pki, "");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let msgs = messages(0, TOTAL, &TOPICS);
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&msgs, s).len() as u64)).collect();
    let context = || format!("{}\n{}", agent.log_tail(), core.log_tail());
    wait_held(&[core_data.path()], None, &want, context);
    let metrics = core.try_metrics().unwrap_or_default();
    assert_eq!(core_counter(&metrics, "backhaul_core_duplicate_batches_total"), 0, "nothing was sent twice");

    let epoch = edge_epoch(data.path());
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{}", core.log_tail());
    for stream in STREAMS {
        let stored = read_core_stream(core_data.path(), stream);
        let batches = only_producer(stream, &stored, epoch);
        assert_holds_in_order(stream, &batches, &of_stream(&msgs, stream));
        assert_same_bytes_as_edge(data.path(), stream, &batches);
    }
}

#[test]
fn sigkill_core_mid_stream_loses_nothing_stores_nothing_twice() {
    const TOTAL: u64 = 4_000;
    const KILLS: usize = 3;
    let mut rng = Rng::new();
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let config = two_streams(&broker, "") + &forward_toml(&[&core], &pki, "");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let msgs = messages(0, TOTAL, &TOPICS);
    let t0 = Instant::now();
    // ~500 messages/s for ~8 s: the kills below fall while messages flow.
    let background = publisher.spawn_all(msgs.clone(), 20, Duration::from_millis(40));
    let dirs = [core_data.path()];
    let (mut runs, mut duplicates) = (Vec::new(), 0u64);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        // Only kill a core that has stored something in this run: the kill then falls between
        // appends, fsyncs and acks of a session that is moving.
        let metrics = common::wait_for(
            "the core to store a batch in this run",
            FORWARD_TIMEOUT,
            || format!("{}\n{}", agent.log_tail(), core.log_tail()),
            || core.try_metrics().filter(|m| core_counter(m, "backhaul_core_batches_stored_total") > 0),
        );
        core.sigkill();
        duplicates += core_counter(&metrics, "backhaul_core_duplicate_batches_total");
        runs.push(format!(
            "{:>6} ms: {} (held {}, {} published)",
            t0.elapsed().as_millis(),
            core_counters(&metrics),
            held_total(&dirs),
            publisher.queued()
        ));
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        core.start();
    }

    common::wait_for(
        "the background publisher to finish",
        PUBLISH_TIMEOUT,
        || format!("{} published", publisher.queued()),
        || background.is_finished().then_some(()),
    );
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&msgs, s).len() as u64)).collect();
    wait_held(&dirs, None, &want, || format!("seed {}\n{}\n{}", rng.seed(), agent.log_tail(), core.log_tail()));
    let last = core.try_metrics().unwrap_or_default();
    runs.push(format!("{:>6} ms: {} (last run, at the end)", t0.elapsed().as_millis(), core_counters(&last)));
    duplicates += core_counter(&last, "backhaul_core_duplicate_batches_total");
    let context = format!(
        "seed {} (SUBSCRIBE_TEST_SEED); core runs, counters just before each SIGKILL:\n  {}",
        rng.seed(),
        runs.join("\n  ")
    );
    eprintln!("{context}");
    if duplicates == 0 {
        // SIGKILL keeps the page cache: whatever the core appended before the kill is found by
        // recovery, enters the rebuilt dedup state and the next WELCOME, so the edge does not
        // send it again even when its ack was lost. Only power loss (or an edge that resends
        // before the core's fsync answers) makes the core see a batch twice.
        eprintln!("no duplicate batches: every batch whose ack a kill lost was in the WELCOME of the next run");
    }

    let epoch = edge_epoch(data.path());
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{context}\n{}", agent.log_tail());
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{context}\n{}", core.log_tail());
    for stream in STREAMS {
        let stored = read_core_stream(core_data.path(), stream);
        let batches = only_producer(stream, &stored, epoch);
        assert_holds_in_order(&format!("{stream} ({context})"), &batches, &of_stream(&msgs, stream));
        assert_same_bytes_as_edge(data.path(), stream, &batches);
    }
}

#[test]
fn sigkill_edge_mid_forward_resumes_from_what_the_core_holds() {
    const TOTAL: u64 = 2_000;
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    // Not started yet: the edge logs a backlog first.
    let mut core = Core::new("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    // ~500 KB of uncompressed batches at 100 KiB/s: about 5 s of forwarding to kill into.
    let config =
        two_streams(&broker, "zstd_level = 0") + &forward_toml(&[&core], &pki, "bandwidth_bytes_per_s = \"100KiB\"");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let msgs = messages(0, TOTAL, &TOPICS);
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    agent.wait_for(&format!("{TOTAL} records appended"), FORWARD_TIMEOUT, |a| {
        (STREAMS.iter().map(|s| a.appended(s)).sum::<u64>() >= TOTAL).then_some(())
    });

    core.start();
    let dirs = [core_data.path()];
    let at_kill = common::wait_for(
        "the core to hold 40% of the backlog",
        FORWARD_TIMEOUT,
        || format!("{}\n{}", agent.log_tail(), core.log_tail()),
        || {
            let n = held_total(&dirs);
            (n >= TOTAL * 2 / 5).then_some(n)
        },
    );
    agent.sigkill();
    assert!(at_kill < TOTAL, "forwarding was over before the kill ({at_kill} held): lower bandwidth_bytes_per_s");
    agent.restart();

    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&msgs, s).len() as u64)).collect();
    wait_held(&dirs, None, &want, || format!("{}\n{}", agent.log_tail(), core.log_tail()));
    let metrics = core.try_metrics().unwrap_or_default();
    eprintln!("the core held {at_kill} of {TOTAL} records at the edge's SIGKILL; core: {}", core_counters(&metrics));

    let epoch = edge_epoch(data.path());
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{}", core.log_tail());
    for stream in STREAMS {
        let stored = read_core_stream(core_data.path(), stream);
        let batches = only_producer(stream, &stored, epoch);
        assert_holds_in_order(stream, &batches, &of_stream(&msgs, stream));
        assert_same_bytes_as_edge(data.path(), stream, &batches);
    }
}

#[test]
fn live_first_interleaves_live_and_backlog() {
    const BACKLOG: u64 = 1_200;
    const LIVE_MAX: u64 = 1_000;
    const LIVE_TOPICS: [&str; 2] = ["cdr/a", "cdr/b"];
    const BATCH_BYTES_MAX: u64 = 8 << 10;
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::new("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    // ~300 KB of backlog in ~8 KiB batches at 48 KiB/s: ~6 s to drain, during which live data
    // (~10 KB/s) arrives. The window bounds how much backlog is queued ahead of a live batch.
    let config = broker_toml(&broker, "3.1.1", &["cdr/#"])
        + "[[route]]\nfilter = \"cdr/#\"\nstream = \"cdr\"\n\n\
           [streams.cdr]\nformat = \"json\"\nzstd_level = 0\nbatch_bytes_max = \"8KiB\"\ndelivery = \"live_first\"\n\n"
        + &forward_toml(&[&core], &pki, "window_bytes = \"64KiB\"\nbandwidth_bytes_per_s = \"48KiB\"");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let backlog = messages(0, BACKLOG, &LIVE_TOPICS);
    publisher.publish_all(&backlog);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    agent.wait_for(&format!("{BACKLOG} records appended"), FORWARD_TIMEOUT, |a| {
        (a.appended("cdr") >= BACKLOG).then_some(())
    });

    core.start();
    let dirs = [core_data.path()];
    let started = Instant::now();
    // Live data, ~40 messages/s, until the core holds the whole backlog.
    let live_all = messages(BACKLOG, LIVE_MAX, &LIVE_TOPICS);
    let mut live = 0usize;
    let backlog_done = |dirs: &[&Path]| held(dirs, "cdr").values().any(|r| r.contains_range(&(0..BACKLOG)));
    while !backlog_done(&dirs) {
        assert!(
            live + 2 <= live_all.len(),
            "the backlog did not drain while {live} live messages were published ({:?})\nheld:\n{}\n{}\n{}",
            started.elapsed(),
            held_summary(&dirs),
            agent.log_tail(),
            core.log_tail()
        );
        publisher.publish_all(&live_all[live..live + 2]);
        live += 2;
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained_in = started.elapsed();
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let msgs: Vec<Msg> = backlog.iter().chain(&live_all[..live]).cloned().collect();
    wait_held(&dirs, None, &[("cdr", msgs.len() as u64)], || format!("{}\n{}", agent.log_tail(), core.log_tail()));

    let epoch = edge_epoch(data.path());
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{}", core.log_tail());

    let stored = read_core_stream(core_data.path(), "cdr");
    let batches = only_producer("cdr", &stored, epoch);
    assert_holds_in_order("cdr", &batches, &msgs.iter().collect::<Vec<_>>());
    // One edge's stream goes to one partition: its log order is the order the core stored.
    assert!(batches.iter().all(|b| b.partition == batches[0].partition), "one edge, one partition");
    let order: Vec<std::ops::Range<u64>> = batches.iter().map(|b| b.seqs()).collect();
    let last_backlog = order.iter().rposition(|r| r.start < BACKLOG).expect("backlog batches are stored");
    let live_before = order[..last_backlog].iter().filter(|r| r.start >= BACKLOG).count();
    let live_batches = order.iter().filter(|r| r.start >= BACKLOG).count();
    eprintln!(
        "backlog of {BACKLOG} drained in {drained_in:?} while {live} live messages were published; \
         {live_before} of {live_batches} live batches were stored before the last backlog batch \
         (stored order: {} batches, the last backlog batch at index {last_backlog})",
        order.len()
    );
    // The precondition of interleaving: backlog batches of about `batch_bytes_max`, so the
    // window holds several and a live batch can be sent between two of them. A batch closes
    // once its records reach the bound, so it may pass it by one record (~300 bytes here).
    let edge_batches = try_read_log_dir(&stream_dir(data.path(), "cdr")).expect("reading the edge log");
    let oversize: Vec<(u64, u32, u32)> = edge_batches
        .iter()
        .map(|(seq, b)| (*seq, b.header().record_count, b.header().raw_len))
        .filter(|&(_, _, raw)| u64::from(raw) > BATCH_BYTES_MAX + 1024)
        .collect();
    assert!(
        live_before > 0,
        "live-first: no live batch (seq ≥ {BACKLOG}) was stored before the last backlog batch; the live data \
         waited for the whole backlog ({drained_in:?}). Edge batches above batch_bytes_max = {BATCH_BYTES_MAX} \
         (seq, records, raw bytes): {oversize:?}. Stored order of seq ranges: {order:?}"
    );
    assert!(
        oversize.is_empty(),
        "edge batches above batch_bytes_max = {BATCH_BYTES_MAX} (seq, records, raw bytes): {oversize:?}"
    );
}

#[test]
fn wiped_edge_starts_a_new_epoch() {
    const FIRST: u64 = 600;
    const SECOND: u64 = 400;
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let config = two_streams(&broker, "") + &forward_toml(&[&core], &pki, "");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    let dirs = [core_data.path()];
    let context = |agent: &Agent, core: &Core| format!("{}\n{}", agent.log_tail(), core.log_tail());

    let first = messages(0, FIRST, &TOPICS);
    publisher.publish_all(&first);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let epoch1 = edge_epoch(data.path());
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&first, s).len() as u64)).collect();
    wait_held(&dirs, Some(epoch1), &want, || context(&agent, &core));
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());

    // A wiped (or re-imaged) edge: same config, same certificate, empty data directory.
    std::fs::remove_dir_all(data.path()).expect("wiping the edge data dir");
    agent.restart();
    let epoch2 = edge_epoch(data.path());
    assert_ne!(epoch1, epoch2, "a new data directory draws a new epoch");
    let second = messages(FIRST, SECOND, &TOPICS);
    publisher.publish_all(&second);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&second, s).len() as u64)).collect();
    wait_held(&dirs, Some(epoch2), &want, || context(&agent, &core));
    let metrics = core.try_metrics().unwrap_or_default();
    eprintln!("core: {}", core_counters(&metrics));
    assert_eq!(core_counter(&metrics, "backhaul_core_duplicate_batches_total"), 0, "core: {}", core_counters(&metrics));
    assert_eq!(
        core_counter(&metrics, "backhaul_core_conflicting_batches_total"),
        0,
        "core: {}",
        core_counters(&metrics)
    );

    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{}", core.log_tail());
    for stream in STREAMS {
        let stored = read_core_stream(core_data.path(), stream);
        let mut producers = by_producer(&stored);
        let keys: Vec<(String, u64)> = producers.keys().cloned().collect();
        let mut expected_keys = vec![(EDGE_ID.to_owned(), epoch1), (EDGE_ID.to_owned(), epoch2)];
        expected_keys.sort();
        assert_eq!(keys, expected_keys, "{stream}: one producer stream per epoch");
        let old = producers.remove(&(EDGE_ID.to_owned(), epoch1)).expect("checked above");
        assert_holds_in_order(&format!("{stream}, first epoch"), &old, &of_stream(&first, stream));
        let new = producers.remove(&(EDGE_ID.to_owned(), epoch2)).expect("checked above");
        assert_holds_in_order(&format!("{stream}, second epoch"), &new, &of_stream(&second, stream));
    }
}

#[test]
fn two_core_nodes_failover() {
    const FIRST: u64 = 800;
    const SECOND: u64 = 1_600;
    let pki = Pki::new();
    let (data_a, data_b) = (tempfile::tempdir().expect("core a data"), tempfile::tempdir().expect("core b data"));
    let mut cores = [Core::started("core-a", &pki, data_a.path()), Core::started("core-b", &pki, data_b.path())];
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    // Small segments, released once acknowledged: what the edge still holds at the failover
    // (and so sends the other node again) is close to what the primary had not acknowledged.
    let config = two_streams(&broker, "segment_bytes_max = \"4KiB\"")
        + &forward_toml(&[&cores[0], &cores[1]], &pki, "failover_hold_down = \"10m\"");
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    let all_dirs = [data_a.path(), data_b.path()];
    let context = |agent: &Agent, cores: &[Core]| {
        format!("{}\n{}\n{}", agent.log_tail(), cores[0].log_tail(), cores[1].log_tail())
    };

    let first = messages(0, FIRST, &TOPICS);
    publisher.publish_all(&first);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&first, s).len() as u64)).collect();
    wait_held(&all_dirs, None, &want, || context(&agent, &cores));
    let primary = (0..2).find(|&i| held_total(&[all_dirs[i]]) > 0).expect("a node holds the data");
    let secondary = 1 - primary;
    assert_eq!(held_total(&[all_dirs[secondary]]), 0, "only the primary gets data while it is up");
    let endpoints = [cores[0].endpoint(), cores[1].endpoint()];
    assert_eq!(
        edge_agent::forward::pick::preference(EDGE_ID, &endpoints)[0],
        primary,
        "the primary is the node rendezvous hashing picks"
    );

    let second = messages(FIRST, SECOND, &TOPICS);
    // ~400 messages/s for ~4 s; the primary dies early in it.
    let background = publisher.spawn_all(second.clone(), 20, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(700));
    let edge_metrics = agent.metrics();
    cores[primary].sigkill();
    let acked_at_kill =
        metric_value(&edge_metrics, "backhaul_edge_forward_batches_acked_total", "").unwrap_or(0.0) as u64;
    common::wait_for(
        "the background publisher to finish",
        PUBLISH_TIMEOUT,
        || format!("{} published", publisher.queued()),
        || background.is_finished().then_some(()),
    );
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let msgs: Vec<Msg> = first.iter().chain(&second).cloned().collect();
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&msgs, s).len() as u64)).collect();
    wait_held(&all_dirs, None, &want, || context(&agent, &cores));
    let failovers = agent.metric("backhaul_edge_forward_failovers_total", "") as u64;
    let secondary_metrics = cores[secondary].try_metrics().unwrap_or_default();
    assert!(failovers >= 1, "the edge counted no failover\n{}", agent.log_tail());
    let handovers = core_counter(&secondary_metrics, "backhaul_core_handovers_total");
    assert_eq!(handovers, 2, "the secondary counts one handover per stream: {}", core_counters(&secondary_metrics));

    let epoch = edge_epoch(data.path());
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    let status = cores[secondary].sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status} after SIGTERM\n{}", cores[secondary].log_tail());

    let mut report = Vec::new();
    let (mut primary_batches, mut dup_batches) = (0u64, 0u64);
    for stream in STREAMS {
        let on: Vec<Vec<CoreBatch>> = all_dirs.iter().map(|d| read_core_stream(d, stream)).collect();
        let p = only_producer(stream, &on[primary], epoch);
        let s = only_producer(stream, &on[secondary], epoch);
        for (node, batches) in [(primary, &p), (secondary, &s)] {
            let check = SeqCheck::of(batches.iter().copied());
            assert!(
                check.duplicated.is_empty() && check.gaps.is_empty(),
                "{stream} on {}: duplicated {:?}, gap batches {:?}",
                cores[node].node,
                check.duplicated,
                check.gaps
            );
        }
        // Seqs on both nodes: the same batches, byte for byte (a batch never changes).
        let on_primary: BTreeMap<u64, &CoreBatch> = p.iter().map(|b| (b.seqs().start, *b)).collect();
        let mut dup_records = 0u64;
        for b in &s {
            if let Some(a) = on_primary.get(&b.seqs().start) {
                assert!(a.batch.bytes() == b.batch.bytes(), "{stream}: seq {} differs between nodes", b.seqs().start);
                dup_records += b.seqs().end - b.seqs().start;
                dup_batches += 1;
            } else {
                let held_a = RangeSet::from_ranges(p.iter().map(|b| b.seqs()));
                assert!(
                    !held_a.overlaps(&b.seqs()),
                    "{stream}: {:?} overlaps the primary's batches differently",
                    b.seqs()
                );
            }
        }
        primary_batches += p.len() as u64;
        let union: Vec<&CoreBatch> =
            p.iter().chain(s.iter().filter(|b| !on_primary.contains_key(&b.seqs().start))).copied().collect();
        assert_holds_in_order(&format!("{stream}, both nodes"), &union, &of_stream(&msgs, stream));
        let first_on_secondary = s.iter().map(|b| b.seqs().start).min().unwrap_or(0);
        // What the primary acknowledged before the failover phase was released at the edge
        // (small segments), so the secondary starts above seq 0: a handover, not a resend of
        // everything.
        assert!(first_on_secondary > 0, "{stream}: the secondary got the stream from seq 0 again");
        let primary_end = p.iter().map(|b| b.seqs().end).max().unwrap_or(0);
        report.push(format!(
            "{stream}: primary {} holds 0..{primary_end} ({} batches), secondary {} from seq {first_on_secondary} \
             ({} batches); {dup_records} records on both",
            cores[primary].node,
            p.len(),
            cores[secondary].node,
            s.len()
        ));
    }
    // Batches the primary stored but the edge had not seen acknowledged when it died; an
    // upper bound, since acks may have arrived between the scrape and the kill.
    let unacked_at_primary = primary_batches.saturating_sub(acked_at_kill);
    eprintln!(
        "{}\nfailovers {failovers}; the edge had {acked_at_kill} batch acks when the primary died, which had stored \
         {primary_batches} batches (so ≤ {unacked_at_primary} unacknowledged); {dup_batches} batches are on both \
         nodes, of which ≥ {} had been acknowledged by the primary; secondary: {}",
        report.join("\n"),
        dup_batches.saturating_sub(unacked_at_primary),
        core_counters(&secondary_metrics)
    );
}

/// Segment files of `stream` in an edge data directory.
fn edge_segments(data: &Path, stream: &str) -> usize {
    std::fs::read_dir(stream_dir(data, stream))
        .expect("the stream's log directory")
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log")))
        .count()
}

#[test]
fn release_on_tiered_frees_the_edge_log_only_once_the_core_has_tiered() {
    const TOTAL: u64 = 2_400;
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let tier =
        "segment_bytes_max = \"64KiB\"\n[tier]\ntier_after = \"1h\"\nlocal_retention = \"1h\"\ninterval = \"100ms\"\n";
    let mut core = Core::new_with("core-a", &pki, core_data.path(), tier);
    core.start();
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let config = two_streams(&broker, "segment_bytes_max = \"16KiB\"\nrelease_on = \"tiered\"")
        + &forward_toml(&[&core], &pki, "");
    let agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    let msgs = messages(0, TOTAL, &TOPICS);
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, of_stream(&msgs, s).len() as u64)).collect();
    let context = || format!("{}\n{}", agent.log_tail(), core.log_tail());
    wait_held(&[core_data.path()], None, &want, context);

    // Durable at the core is not enough: the edge keeps its copy.
    let before = edge_segments(data.path(), "cdr");
    assert!(before >= 4, "the test needs several edge segments, got {before}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(edge_segments(data.path(), "cdr"), before, "released before anything was tiered");
    assert_eq!(core.metric("backhaul_core_tiered_segments_total"), 0);

    // The core restarts with tiering due at once; its TIERED frames let the edge release.
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status}\n{}", core.log_tail());
    core.edit_config("tier_after = \"1h\"", "tier_after = \"0ms\"");
    core.start();
    let deadline = Instant::now() + FORWARD_TIMEOUT;
    while edge_segments(data.path(), "cdr") >= before {
        assert!(Instant::now() < deadline, "the edge released nothing\n{}\n{}", agent.log_tail(), core.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(core.metric("backhaul_core_tiered_segments_total") > 0, "released only after tiering");
}
