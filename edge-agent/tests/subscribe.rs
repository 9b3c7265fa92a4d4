//! Subscribe mode end to end: a real Mosquitto, the real `edge-agent` binary, a rumqttc
//! publisher, and the agent's logs read back through `shared::log` (not through the agent).
//! The durability contract under test (DESIGN §3, §7): a PUBACK leaves the agent only once the
//! record is durable, so whatever the agent has not acknowledged stays with the broker — across
//! SIGKILL and a full disk — and a redelivery of what it already holds is not stored twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Agent, BIN, Logged, Mosquitto, Msg, Publisher, Rng, Tmpfs, agent_client_id, broker_toml, id_counts, id_of,
    messages, metric_value, payload, read_stream, try_read_stream,
};
use edge_agent::config::Config;

/// Publishes reach the broker within this.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent takes in what the broker holds within this.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

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

/// `cdr/#` → `cdr` (JSON), `sensors/#` → `sensors` (raw), defaults otherwise.
fn two_streams(broker: &Mosquitto, protocol: &str) -> String {
    broker_toml(broker, protocol, &["cdr/#", "sensors/#"])
        + ROUTES
        + "\n[streams.cdr]\nformat = \"json\"\n\n[streams.sensors]\nformat = \"raw\"\n"
}

fn stream_of(topic: &str) -> &str {
    topic.split('/').next().expect("split yields one item")
}

fn appended_total(metrics: &str, streams: &[&str]) -> u64 {
    streams
        .iter()
        .map(|s| {
            metric_value(metrics, "backhaul_edge_records_appended_total", &format!("stream=\"{s}\"")).unwrap_or(0.0)
        })
        .sum::<f64>() as u64
}

fn duplicates_total(metrics: &str) -> u64 {
    ["cdr", "sensors"]
        .iter()
        .map(|s| {
            let labels = format!("stream=\"{s}\",reason=\"duplicate\"");
            metric_value(metrics, "backhaul_edge_records_dropped_total", &labels).unwrap_or(0.0)
        })
        .sum::<f64>() as u64
}

#[test]
fn qos1_messages_arrive_in_the_log_exactly_as_published() {
    messages_arrive_exactly_once_in_order("3.1.1", 3_200);
}

#[test]
fn mqtt5_connection_works() {
    messages_arrive_exactly_once_in_order("5", 600);
}

/// Publishes `total` messages over [`TOPICS`], waits until the agent appended them all, stops
/// it with SIGTERM and checks the logs against what was published.
fn messages_arrive_exactly_once_in_order(protocol: &str, total: u64) {
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("data dir");
    let mut agent = Agent::start(&two_streams(&broker, protocol), data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let msgs = messages(0, total, &TOPICS);
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let want = |stream: &str| msgs.iter().filter(|m| stream_of(&m.topic) == stream).count() as u64;
    let (cdr, sensors) = (want("cdr"), want("sensors"));
    agent.wait_for(&format!("{cdr} records appended to cdr and {sensors} to sensors"), DRAIN_TIMEOUT, |a| {
        (a.appended("cdr") >= cdr && a.appended("sensors") >= sensors).then_some(())
    });

    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    for stream in ["cdr", "sensors"] {
        assert_log_holds_exactly(data.path(), stream, &msgs);
    }
}

/// The log of `stream` holds the messages of `msgs` routed to it, each once, byte for byte,
/// in publish order per topic, with the MQTT client id and packet id as attributes.
fn assert_log_holds_exactly(data_dir: &Path, stream: &str, msgs: &[Msg]) {
    let logged = read_stream(data_dir, stream);
    let expected: Vec<&Msg> = msgs.iter().filter(|m| stream_of(&m.topic) == stream).collect();
    let by_id: HashMap<u64, &Msg> = expected.iter().map(|m| (m.id, *m)).collect();
    let client = agent_client_id();
    let mut seen = HashSet::new();
    for l in &logged {
        let r = &l.record;
        let id = id_of(&r.payload).unwrap_or_else(|| panic!("{stream} seq {}: payload without an id: {r:?}", l.seq));
        assert!(seen.insert(id), "{stream}: id {id} stored twice (again at seq {})", l.seq);
        let m = by_id.get(&id).unwrap_or_else(|| panic!("{stream} seq {}: id {id} was not published here", l.seq));
        assert_eq!(r.topic, m.topic, "{stream} seq {}: topic of id {id}", l.seq);
        assert!(r.payload[..] == m.payload[..], "{stream} seq {}: payload of id {id} differs", l.seq);
        assert_eq!(r.attr("mqtt.client"), Some(client.as_str()), "{stream} seq {}: attrs {:?}", l.seq, r.attrs);
        let pid: Option<u16> = r.attr("mqtt.pid").and_then(|p| p.parse().ok());
        assert!(pid.is_some_and(|p| p > 0), "{stream} seq {}: mqtt.pid in {:?}", l.seq, r.attrs);
    }
    let missing: Vec<u64> = expected.iter().map(|m| m.id).filter(|id| !seen.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{stream}: {} published ids missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(logged.len(), expected.len(), "{stream}: record count");
    for topic in TOPICS.iter().filter(|t| stream_of(t) == stream) {
        let got: Vec<u64> =
            logged.iter().filter(|l| l.record.topic == *topic).filter_map(|l| id_of(&l.record.payload)).collect();
        let want: Vec<u64> = expected.iter().filter(|m| m.topic == *topic).map(|m| m.id).collect();
        assert!(
            got == want,
            "{topic}: log order differs from publish order at index {:?}",
            first_difference(&got, &want)
        );
    }
}

fn first_difference(a: &[u64], b: &[u64]) -> Option<(usize, Option<u64>, Option<u64>)> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)).map(|i| (i, a.get(i).copied(), b.get(i).copied()))
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_stores_nothing_twice() {
    const TOTAL: u64 = 20_000;
    const KILLS: usize = 6;
    let mut rng = Rng::new();
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("data dir");
    let mut agent = Agent::start(&two_streams(&broker, "3.1.1"), data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    // The agent's session must exist (subscribed) before anything is published, so the broker
    // keeps for it whatever arrives while it is dead.
    agent.wait_subscribed(&publisher);

    let msgs = messages(0, TOTAL, &TOPICS);
    let t0 = Instant::now();
    // ~3,000 messages/s for ~7 s: the kills below fall while messages flow.
    let background = publisher.spawn_all(msgs.clone(), 30, Duration::from_millis(10));
    let mut kills = Vec::new();
    for _ in 0..KILLS {
        let delay = Duration::from_millis(rng.below(800));
        std::thread::sleep(delay);
        // Only kill an agent that has taken something in (unless nothing is left to take).
        let (appended, duplicates) =
            agent.wait_for("the agent to append something before the kill", DRAIN_TIMEOUT, |a| {
                let m = a.try_metrics().unwrap_or_default();
                let n = appended_total(&m, &["cdr", "sensors"]);
                (n > 0 || background.is_finished()).then(|| (n, duplicates_total(&m)))
            });
        agent.sigkill();
        kills.push(format!(
            "{:>6} ms (after {delay:?}; this run appended {appended}, recognised {duplicates} redeliveries; {} published)",
            t0.elapsed().as_millis(),
            publisher.queued()
        ));
        agent.restart();
    }
    let kills = kills.join("\n  ");
    let context = format!("seed {} (SUBSCRIBE_TEST_SEED), SIGKILLs at:\n  {kills}", rng.seed());
    eprintln!("{context}");

    common::wait_for(
        "the background publisher to finish",
        PUBLISH_TIMEOUT,
        || context.clone(),
        || background.is_finished().then_some(()),
    );
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    let ids_in_log = || -> usize {
        let mut ids = HashSet::new();
        for s in ["cdr", "sensors"] {
            if let Ok(records) = try_read_stream(data.path(), s) {
                ids.extend(records.iter().filter_map(|l| id_of(&l.record.payload)));
            }
        }
        ids.len()
    };
    eprintln!("{:>6} ms: the broker holds all {TOTAL}", t0.elapsed().as_millis());
    let drained = Instant::now();
    while ids_in_log() < TOTAL as usize && drained.elapsed() < DRAIN_TIMEOUT {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("{:>6} ms: the log holds {} distinct ids", t0.elapsed().as_millis(), ids_in_log());
    let final_metrics = agent.metrics();
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{context}\n{}", agent.log_tail());

    let cdr = read_stream(data.path(), "cdr");
    let sensors = read_stream(data.path(), "sensors");
    let counts = id_counts(cdr.iter().chain(&sensors));
    let missing: Vec<u64> = (0..TOTAL).filter(|id| !counts.contains_key(id)).collect();
    let mut twice: Vec<(u64, u32)> = counts.iter().filter(|&(_, &n)| n > 1).map(|(&id, &n)| (id, n)).collect();
    twice.sort_unstable();
    let unknown: Vec<u64> = counts.keys().copied().filter(|&id| id >= TOTAL).collect();
    // The counters that tell what the last run saw: drops (duplicates) and reconnects.
    let counters = |m: &str| -> String {
        let telling = |l: &&str| (l.contains("dropped_total") && !l.ends_with(" 0")) || l.contains("reconnects_total");
        m.lines().filter(telling).collect::<Vec<_>>().join("\n  ")
    };
    assert!(
        missing.is_empty() && twice.is_empty() && unknown.is_empty(),
        "{} of {TOTAL} ids missing (first {:?}), {} stored more than once (first {:?}), unknown {:?}\n{context}\n\
         last run's metrics:\n  {}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        twice.len(),
        &twice[..twice.len().min(20)],
        unknown,
        counters(&final_metrics),
        agent.log_tail()
    );
    // And each record is the message published under its id.
    let by_id: HashMap<u64, &Msg> = msgs.iter().map(|m| (m.id, m)).collect();
    for l in cdr.iter().chain(&sensors) {
        let m = by_id[&id_of(&l.record.payload).expect("counted above")];
        assert!(
            l.record.topic == m.topic && l.record.payload[..] == m.payload[..],
            "seq {}: id {} altered",
            l.seq,
            m.id
        );
    }
}

#[test]
fn disk_full_stops_acks_and_resumes_without_loss() {
    const TOTAL: u64 = 3_000;
    let broker = Mosquitto::start("");
    // Declared before the agent, so unmounted after it is gone.
    let disk = Tmpfs::mount("4m");
    let data_dir = disk.path().join("data");
    let config = broker_toml(&broker, "3.1.1", &["cdr/#"])
        + "[[route]]\nfilter = \"cdr/#\"\nstream = \"cdr\"\n\n\
           [streams.cdr]\nformat = \"raw\"\nzstd_level = 0\nsegment_bytes_max = \"64KiB\"\n\
           full_policy = \"backpressure\"\n";
    let mut agent = Agent::start(&config, &data_dir);
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let filler = disk.fill_leaving(200 << 10);
    // 3,000 × 250 B of barely compressible text, stored uncompressed: ~4× what fits.
    let msgs: Vec<Msg> =
        (0..TOTAL).map(|id| Msg { id, topic: "cdr/a".into(), payload: payload(id, id, 250, false) }).collect();
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    agent.wait_for("backhaul_edge_disk_full{stream=\"cdr\"} = 1", DRAIN_TIMEOUT, |a| {
        (a.metric("backhaul_edge_disk_full", "stream=\"cdr\"") == 1.0).then_some(())
    });
    let stalled_at = agent.appended("cdr");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.is_running(), "the agent died on a full disk\n{}", agent.log_tail());
    let still = agent.appended("cdr");
    assert!(
        still == stalled_at && still < TOTAL,
        "appends should stop on a full disk: {stalled_at} then {still} of {TOTAL}\n{}",
        agent.log_tail()
    );
    assert_eq!(agent.metric("backhaul_edge_disk_full", "stream=\"cdr\""), 1.0, "still full");

    std::fs::remove_file(&filler).expect("removing the filler");
    agent.wait_for(&format!("{TOTAL} records appended once there is room"), DRAIN_TIMEOUT, |a| {
        (a.appended("cdr") >= TOTAL).then_some(())
    });
    agent.wait_for("backhaul_edge_disk_full{stream=\"cdr\"} = 0", DRAIN_TIMEOUT, |a| {
        (a.metric("backhaul_edge_disk_full", "stream=\"cdr\"") == 0.0).then_some(())
    });
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    assert_log_holds_exactly(&data_dir, "cdr", &msgs);
}

#[test]
fn invalid_json_is_dead_lettered_and_oversize_does_not_stall() {
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("data dir");
    let config = broker_toml(&broker, "3.1.1", &["cdr/#", "sensors/#"])
        + ROUTES
        + "\n[streams.cdr]\nformat = \"json\"\nrecord_bytes_max = \"1KiB\"\n\n[streams.sensors]\nformat = \"raw\"\n";
    let mut agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    let valid = Msg { id: 0, topic: "cdr/a".into(), payload: payload(0, 0, 250, false) };
    let invalid =
        Msg { id: 1, topic: "cdr/a".into(), payload: b"{\"id\":1,\"topic_seq\":1,\"pad\":\"unterminated".to_vec() };
    let oversize = Msg { id: 2, topic: "cdr/b".into(), payload: payload(2, 0, 5 << 10, false) };
    let later = messages(3, 300, &TOPICS);
    let mut all = vec![valid.clone(), invalid.clone(), oversize.clone()];
    all.extend(later.iter().cloned());
    publisher.publish_all(&all);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);

    let good: Vec<Msg> = std::iter::once(valid).chain(later).collect();
    let want = |stream: &str| good.iter().filter(|m| stream_of(&m.topic) == stream).count() as u64;
    let (cdr, sensors) = (want("cdr"), want("sensors"));
    agent.wait_for("every later message appended (nothing stalled behind the bad ones)", DRAIN_TIMEOUT, |a| {
        (a.appended("cdr") >= cdr && a.appended("sensors") >= sensors && a.appended("_deadletter") >= 2).then_some(())
    });
    let dropped = |reason: &str| {
        agent.metric("backhaul_edge_records_dropped_total", &format!("stream=\"cdr\",reason=\"{reason}\""))
    };
    assert_eq!(dropped("too_large"), 1.0, "records_dropped_total{{cdr, too_large}}");
    assert_eq!(dropped("invalid_payload"), 1.0, "records_dropped_total{{cdr, invalid_payload}}");

    let status = agent.sigterm_and_wait();
    assert!(status.success(), "edge-agent exited with {status} after SIGTERM\n{}", agent.log_tail());
    assert_log_holds_exactly(data.path(), "cdr", &good);
    assert_log_holds_exactly(data.path(), "sensors", &good);

    let dead = read_stream(data.path(), "_deadletter");
    assert_eq!(dead.len(), 2, "dead letters: {dead:?}");
    let find = |topic: &str| -> &Logged {
        dead.iter().find(|l| l.record.topic == topic).unwrap_or_else(|| panic!("no dead letter on {topic}: {dead:?}"))
    };
    let bad = find(&invalid.topic);
    assert!(bad.record.payload[..] == invalid.payload[..], "the invalid payload is kept as it came: {bad:?}");
    let reason = bad.record.attr("deadletter.reason").unwrap_or_default();
    assert!(reason.starts_with("invalid JSON"), "deadletter.reason {reason:?}");
    assert_eq!(bad.record.attr("deadletter.stream"), Some("cdr"));
    assert_eq!(bad.record.attr("mqtt.client"), Some(agent_client_id().as_str()));
    let big = find(&oversize.topic);
    assert!(big.record.payload.is_empty(), "an oversize payload is not kept: {} bytes", big.record.payload.len());
    assert_eq!(big.record.attr("deadletter.stream"), Some("cdr"));
    let reason = big.record.attr("deadletter.reason").unwrap_or_default();
    assert!(reason.contains("record_bytes_max"), "deadletter.reason {reason:?}");
}

#[test]
fn example_config_loads() {
    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/edge-agent.example.toml");
    const BROKER_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mosquitto/backhaul.conf");
    let text = std::fs::read_to_string(EXAMPLE).expect("reading the example config");
    let config = Config::parse(&text, Path::new(EXAMPLE)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.stream_names(), ["_deadletter", "cdr", "sensors"]);
    assert_eq!(config.brokers.len(), 1);

    // The shipped broker config keeps what the example agent has not acknowledged.
    let broker_conf = std::fs::read_to_string(BROKER_CONF).expect("reading the Mosquitto config");
    let setting = |key: &str| -> Option<u64> {
        broker_conf.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    };
    assert_eq!(setting("max_queued_messages"), Some(0), "no queue limit");
    assert_eq!(setting("max_inflight_messages"), Some(u64::from(config.brokers[0].inflight_max)));

    let validate =
        |path: &Path| Command::new(BIN).arg("validate").arg("--config").arg(path).env_remove("RUST_LOG").output();
    let out = validate(Path::new(EXAMPLE)).expect("running edge-agent validate");
    assert_eq!(out.status.code(), Some(0), "validate on the example: {}", String::from_utf8_lossy(&out.stdout));

    let dir = tempfile::tempdir().expect("temp dir");
    let typo = dir.path().join("typo.toml");
    assert!(text.contains("\nlinger = \"5ms\""));
    std::fs::write(&typo, text.replacen("\nlinger = \"5ms\"", "\nlingr = \"5ms\"", 1)).expect("writing typo.toml");
    let out = validate(&typo).expect("running edge-agent validate");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "validate on a config with a typo: {said}");
    assert!(said.contains("streams.cdr.lingr"), "the error names the key: {said}");
}

/// TLS and a password towards the broker: a Mosquitto TLS listener with a certificate from a
/// private CA and a password file. The agent connects with `mqtts://`, `ca_file`, `username`
/// and `password_env`, takes messages, and with a wrong password never becomes ready.
#[test]
fn tls_and_password_towards_the_broker() {
    let pki = common::Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let passwords = dir.path().join("passwords");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["backhaul", "s3cret"])
        .status()
        .expect("running mosquitto_passwd (from the mosquitto package)");
    assert!(made.success(), "mosquitto_passwd failed");
    let tls_port = common::free_port();
    let broker = Mosquitto::start(&format!(
        "password_file {}\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        passwords.display(),
        pki.ca_file.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    ));
    let config = |password_var: &str| {
        format!(
            "[[broker]]\nname = \"main\"\nurl = \"mqtts://{}:{tls_port}\"\nca_file = \"{}\"\nusername = \"backhaul\"\n\
             password_env = \"{password_var}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
             subscriptions = [\"cdr/#\", \"{}\"]\n\n[[route]]\nfilter = \"cdr/#\"\nstream = \"cdr\"\n\n\
             [streams.cdr]\nformat = \"json\"\n",
            common::CORE_SERVER_NAME,
            pki.ca_file.display(),
            common::PROBE_FILTER
        )
    };
    let data = tempfile::tempdir().expect("data dir");
    let mut agent =
        Agent::start_with(&config("BH_BROKER_PASSWORD"), data.path(), &[("BH_BROKER_PASSWORD", "s3cret")], true);
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    let msgs = messages(0, 200, &["cdr/a"]);
    publisher.publish_all(&msgs);
    publisher.wait_all_acked(PUBLISH_TIMEOUT);
    agent.wait_for("200 records appended over TLS", DRAIN_TIMEOUT, |a| (a.appended("cdr") >= 200).then_some(()));
    assert!(agent.sigterm_and_wait().success());
    assert_log_holds_exactly(data.path(), "cdr", &msgs);

    let data = tempfile::tempdir().expect("data dir");
    let mut wrong =
        Agent::start_with(&config("BH_BROKER_PASSWORD"), data.path(), &[("BH_BROKER_PASSWORD", "nope")], false);
    std::thread::sleep(Duration::from_secs(2));
    let connected = wrong.metric("backhaul_edge_broker_connected", "connection=\"main\"");
    assert_eq!(connected, 0.0, "connected with a wrong password\n{}", wrong.log_tail());
    assert!(wrong.log_tail().contains("broker connection lost"), "{}", wrong.log_tail());
    assert!(wrong.sigterm_and_wait().success());
}
