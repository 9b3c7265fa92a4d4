//! Operating the two services as an operator would: certificates rotated on disk and reloaded
//! with SIGHUP while an edge is connected, and the systemd notify protocol (READY, WATCHDOG,
//! STOPPING) as a `Type=notify` unit sees it. Real Mosquitto, the real `edge-agent` and
//! `core-ingest` binaries over QUIC with mutual TLS on loopback.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Agent, CORE_SERVER_NAME, Core, Mosquitto, Pki, Publisher, broker_toml, core_held, forward_toml, messages,
};

/// Everything published reaches the core within this.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// A reload shows in the metrics within this.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);

fn cdr_only(broker: &Mosquitto) -> String {
    broker_toml(broker, "3.1.1", &["cdr/#"])
        + "\n[[route]]\nfilter = \"cdr/#\"\nstream = \"cdr\"\n\n[streams.cdr]\nformat = \"json\"\n\n"
}

/// Writes `pem` to `path` as a rotation tool would: a new file renamed over the old one.
fn replace_file(path: &Path, pem: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, pem).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming over {}: {e}", path.display()));
}

fn sighup(pid: u32) {
    let sent = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("running kill");
    assert!(sent.success(), "kill -HUP {pid} failed");
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    common::metric_value(text, name, labels).unwrap_or(-1.0)
}

/// Waits until the core holds `0..n` of the edge's `cdr` stream (one epoch).
fn wait_core_holds(core: &Core, agent: &Agent, n: u64) {
    common::wait_for(
        &format!("the core to hold cdr 0..{n}"),
        FORWARD_TIMEOUT,
        || format!("held {:?}\n{}\n{}", core_held(&core.data_dir, "cdr"), agent.log_tail(), core.log_tail()),
        || core_held(&core.data_dir, "cdr").values().any(|&held| held >= n).then_some(()),
    );
}

/// The serial of the certificate the core presents to a new connection, seen by a QUIC client
/// that completes only the handshake (it sends no HELLO, so it supersedes no session).
fn served_serial(core: &Core, pki: &Pki) -> String {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let tls = shared::tls::client_config(
        &read(&pki.ca_file),
        &read(&pki.edge_cert),
        &read(&pki.edge_key),
        &[shared::tls::ALPN_V1],
    )
    .expect("client TLS config");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client config");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")).expect("client endpoint");
        let conn = endpoint
            .connect_with(quinn::ClientConfig::new(Arc::new(quic)), core.listen, CORE_SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake with the core");
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .expect("the core presented certificates");
        let serial = shared::tls::cert_serial(certs[0].as_ref()).expect("a parsable certificate");
        conn.close(0u32.into(), b"probe done");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        serial
    })
}

/// `text` without ANSI colour sequences (`ESC [ … m`), which the log may hold.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The `cert_serial` of every "edge session started" line of the core's log, in order.
fn session_serials(core: &Core) -> Vec<String> {
    strip_ansi(&core.log_text())
        .lines()
        .filter(|l| l.contains("edge session started"))
        .filter_map(|l| l.split("cert_serial=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn certificate_rotation_keeps_the_connected_edge_flowing() {
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let agent = Agent::start(&(cdr_only(&broker) + &forward_toml(&[&core], &pki, "")), data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);

    // Before: records flow over one connection with the first certificates.
    publisher.publish_all(&messages(0, 300, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    wait_core_holds(&core, &agent, 300);
    let old_server = shared::tls::pem_serial(&std::fs::read(&pki.server_cert).expect("server cert")).expect("serial");
    let old_edge = shared::tls::pem_serial(&std::fs::read(&pki.edge_cert).expect("edge cert")).expect("serial");
    assert_eq!(served_serial(&core, &pki), old_server, "the probe sees the certificate in use");
    assert_eq!(session_serials(&core), vec![old_edge.clone()], "one session, with the first edge certificate");
    let connects = metric(&agent.metrics(), "backhaul_edge_forward_connects_total", "");
    assert_eq!(connects, 1.0);

    // Rotate: new certificates from the same CA (valid 1 day instead of 2), SIGHUP both.
    let (server, server_key) =
        shared::tls::issue_server_cert(&pki.ca_pem, &pki.ca_key_pem, &[CORE_SERVER_NAME.to_owned()], 1)
            .expect("new server certificate");
    let (edge, edge_key) =
        shared::tls::issue_edge_cert(&pki.ca_pem, &pki.ca_key_pem, common::EDGE_ID, 1).expect("new edge certificate");
    let new_server = shared::tls::pem_serial(server.as_bytes()).expect("serial");
    let new_edge = shared::tls::pem_serial(edge.as_bytes()).expect("serial");
    let server_expiry = shared::tls::pem_not_after(server.as_bytes(), "certificate").expect("expiry") as f64;
    let edge_expiry = shared::tls::pem_not_after(edge.as_bytes(), "certificate").expect("expiry") as f64;
    let before = metric(
        &core.try_metrics().unwrap_or_default(),
        "backhaul_core_tls_cert_expiry_timestamp_seconds",
        "cert=\"server\"",
    );
    assert!(before > server_expiry, "the first server certificate outlives the new one ({before} vs {server_expiry})");
    replace_file(&pki.server_key, &server_key);
    replace_file(&pki.server_cert, &server);
    replace_file(&pki.edge_key, &edge_key);
    replace_file(&pki.edge_cert, &edge);
    sighup(core.pid());
    sighup(agent.pid());
    common::wait_for(
        "both to export the new certificates' expiry",
        RELOAD_TIMEOUT,
        || format!("{}\n{}", agent.log_tail(), core.log_tail()),
        || {
            let core_m = core.try_metrics().unwrap_or_default();
            let edge_m = agent.try_metrics().unwrap_or_default();
            (metric(&core_m, "backhaul_core_tls_cert_expiry_timestamp_seconds", "cert=\"server\"") == server_expiry
                && metric(&edge_m, "backhaul_edge_tls_cert_expiry_timestamp_seconds", "cert=\"client\"") == edge_expiry)
                .then_some(())
        },
    );
    assert!(metric(&core.try_metrics().unwrap_or_default(), "backhaul_core_tls_reloads_total", "result=\"ok\"") >= 1.0);
    assert!(metric(&agent.metrics(), "backhaul_edge_tls_reloads_total", "result=\"ok\"") >= 1.0);

    // The connected edge keeps flowing on its connection: no reconnect, no failover.
    publisher.publish_all(&messages(300, 300, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    wait_core_holds(&core, &agent, 600);
    let m = agent.metrics();
    assert_eq!(metric(&m, "backhaul_edge_forward_connects_total", ""), 1.0, "the edge did not reconnect");
    assert_eq!(metric(&m, "backhaul_edge_forward_failovers_total", ""), 0.0);
    assert_eq!(metric(&m, "backhaul_edge_forward_connected", ""), 1.0);
    assert_eq!(session_serials(&core).len(), 1, "still the one session");

    // New connections present the new certificates: the core's to a new client at once; the
    // edge's when it next connects (here after a core restart).
    assert_eq!(served_serial(&core, &pki), new_server, "a new connection gets the new server certificate");
    let status = core.sigterm_and_wait();
    assert!(status.success(), "core-ingest exited with {status}\n{}", core.log_tail());
    core.start();
    publisher.publish_all(&messages(600, 300, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    wait_core_holds(&core, &agent, 900);
    let serials = session_serials(&core);
    assert_eq!(serials.first(), Some(&old_edge), "{serials:?}");
    assert_eq!(serials.last(), Some(&new_edge), "the edge's next connection presents its new certificate: {serials:?}");
    assert_ne!(old_edge, new_edge);
}

#[test]
fn a_certificate_set_that_does_not_load_is_refused_and_the_old_one_kept() {
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let core = Core::started("core-a", &pki, core_data.path());
    let before = core.try_metrics().unwrap_or_default();
    let expiry = metric(&before, "backhaul_core_tls_cert_expiry_timestamp_seconds", "cert=\"server\"");
    assert!(expiry > 0.0, "the expiry is exported from the start:\n{before}");
    // A key that belongs to another certificate.
    let (_, other_key) =
        shared::tls::issue_server_cert(&pki.ca_pem, &pki.ca_key_pem, &[CORE_SERVER_NAME.to_owned()], 1).expect("cert");
    replace_file(&pki.server_key, &other_key);
    sighup(core.pid());
    common::wait_for(
        "the failed reload to be counted",
        RELOAD_TIMEOUT,
        || core.log_tail(),
        || {
            let m = core.try_metrics().unwrap_or_default();
            (metric(&m, "backhaul_core_tls_reloads_total", "result=\"failed\"") >= 1.0).then_some(m)
        },
    );
    let m = core.try_metrics().unwrap_or_default();
    assert_eq!(metric(&m, "backhaul_core_tls_cert_expiry_timestamp_seconds", "cert=\"server\""), expiry);
    let old = shared::tls::pem_serial(&std::fs::read(&pki.server_cert).expect("cert")).expect("serial");
    assert_eq!(served_serial(&core, &pki), old, "the node still serves with the certificates it had");
    assert!(core.log_text().contains("certificate reload failed"), "{}", core.log_tail());
}

#[test]
fn a_core_picks_up_rotated_files_without_a_signal() {
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let core = Core::started("core-a", &pki, core_data.path());
    let (server, server_key) =
        shared::tls::issue_server_cert(&pki.ca_pem, &pki.ca_key_pem, &[CORE_SERVER_NAME.to_owned()], 1).expect("cert");
    let expiry = shared::tls::pem_not_after(server.as_bytes(), "certificate").expect("expiry") as f64;
    replace_file(&pki.server_key, &server_key);
    replace_file(&pki.server_cert, &server);
    // Checked every 10 s, acted on once two checks agree: within about 20 s.
    common::wait_for(
        "the core to load the new files by itself",
        Duration::from_secs(40),
        || core.log_tail(),
        || {
            let m = core.try_metrics().unwrap_or_default();
            (metric(&m, "backhaul_core_tls_cert_expiry_timestamp_seconds", "cert=\"server\"") == expiry).then_some(())
        },
    );
    let m = core.try_metrics().unwrap_or_default();
    assert_eq!(
        metric(&m, "backhaul_core_tls_reloads_total", "result=\"failed\""),
        0.0,
        "no half-rotated set was tried"
    );
    let new = shared::tls::pem_serial(server.as_bytes()).expect("serial");
    assert_eq!(served_serial(&core, &pki), new);
}

#[test]
fn removing_an_edge_from_allow_edges_and_sighup_revokes_it_without_a_restart() {
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::new("core-a", &pki, core_data.path());
    let config = std::fs::read_to_string(&core.config_path).expect("core config");
    let with_allow =
        |ids: &str| config.replacen("partitions = 4\n", &format!("partitions = 4\nallow_edges = [{ids}]\n"), 1);
    std::fs::write(&core.config_path, with_allow(&format!("\"{}\", \"edge-other\"", common::EDGE_ID))).expect("write");
    core.start();
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let agent = Agent::start(&(cdr_only(&broker) + &forward_toml(&[&core], &pki, "")), data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    publisher.publish_all(&messages(0, 100, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    wait_core_holds(&core, &agent, 100);

    // Revoke: the edge's session is closed, its reconnects are refused and counted.
    std::fs::write(&core.config_path, with_allow("\"edge-other\"")).expect("write");
    sighup(core.pid());
    common::wait_for(
        "the core to refuse the revoked edge",
        RELOAD_TIMEOUT,
        || format!("{}\n{}", agent.log_tail(), core.log_tail()),
        || {
            let m = core.try_metrics().unwrap_or_default();
            let edge = agent.try_metrics().unwrap_or_default();
            (metric(&m, "backhaul_core_refused_total", "reason=\"not_allowed\"") >= 1.0
                && metric(&m, "backhaul_core_connections", "") == 0.0
                && metric(&edge, "backhaul_edge_forward_connected", "") == 0.0)
                .then_some(())
        },
    );
    publisher.publish_all(&messages(100, 100, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        core_held(&core.data_dir, "cdr").values().all(|&held| held == 100),
        "nothing reaches the core from a revoked edge: {:?}",
        core_held(&core.data_dir, "cdr")
    );

    // Allowed again: it reconnects (within its backoff) and sends what it kept.
    std::fs::write(&core.config_path, with_allow(&format!("\"{}\"", common::EDGE_ID))).expect("write");
    sighup(core.pid());
    wait_core_holds(&core, &agent, 200);
    assert!(core.log_text().contains("allow_edges reloaded"), "{}", core.log_tail());
}

/// Receives notifications on `socket` until `n` of them (in `got` too) hold the line `want`,
/// within `timeout`.
fn wait_notifications(socket: &UnixDatagram, want: &str, n: usize, timeout: Duration, got: &mut Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while count(got, want) < n {
        assert!(Instant::now() < deadline, "not {n} × {want} within {timeout:?}; got {got:?}");
        if let Ok(len) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
    }
}

/// Notifications holding the line `line`.
fn count(got: &[String], line: &str) -> usize {
    got.iter().filter(|m| m.lines().any(|l| l == line)).count()
}

fn notify_socket(dir: &Path, name: &str) -> (UnixDatagram, String) {
    let path = dir.join(name);
    let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    (socket, path.to_str().expect("UTF-8 path").to_owned())
}

/// READY=1 first, then watchdog pings (200 ms apart: WATCHDOG_USEC is 400 ms), STOPPING=1
/// after SIGTERM; `got` ends with every notification received.
fn check_ready_watchdog(socket: &UnixDatagram, got: &mut Vec<String>) {
    wait_notifications(socket, "READY=1", 1, Duration::from_secs(10), got);
    wait_notifications(socket, "WATCHDOG=1", 3, Duration::from_secs(10), got);
    let ready = got.iter().position(|m| m.lines().any(|l| l == "READY=1")).expect("READY=1 received");
    assert_eq!(count(&got[..ready], "STOPPING=1"), 0, "{got:?}");
}

#[test]
fn both_binaries_speak_sd_notify_ready_watchdog_stopping() {
    let dir = tempfile::tempdir().expect("socket dir");
    let watchdog_usec = "400000";

    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let mut core = Core::new("core-a", &pki, core_data.path());
    let (core_socket, core_path) = notify_socket(dir.path(), "core.sock");
    core.env = vec![("NOTIFY_SOCKET".to_owned(), core_path), ("WATCHDOG_USEC".to_owned(), watchdog_usec.to_owned())];
    core.start();
    let mut got = Vec::new();
    check_ready_watchdog(&core_socket, &mut got);
    let status = core.sigterm_and_wait();
    assert!(status.success(), "{}", core.log_tail());
    wait_notifications(&core_socket, "STOPPING=1", 1, Duration::from_secs(5), &mut got);

    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let (edge_socket, edge_path) = notify_socket(dir.path(), "edge.sock");
    let env = [("NOTIFY_SOCKET", edge_path.as_str()), ("WATCHDOG_USEC", watchdog_usec)];
    let mut agent = Agent::start_with(&cdr_only(&broker), data.path(), &env, true);
    let mut got = Vec::new();
    check_ready_watchdog(&edge_socket, &mut got);
    let status = agent.sigterm_and_wait();
    assert!(status.success(), "{}", agent.log_tail());
    wait_notifications(&edge_socket, "STOPPING=1", 1, Duration::from_secs(5), &mut got);
}

/// Metrics the dashboard and the alerts query that no binary serves yet, each with where it
/// will come from (none now: tiering brought `backhaul_core_tier_backlog_bytes`).
const COMING: [(&str, &str); 0] = [];

/// Every `backhaul_…` metric name in `text`.
fn metric_names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("backhaul_") {
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Names of the series in a Prometheus text exposition (sample lines only).
fn served_series(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn dashboard_and_alerts_query_only_metrics_the_binaries_serve() {
    const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/backhaul.json");
    const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/backhaul-alerts.yml");
    let pki = Pki::new();
    let core_data = tempfile::tempdir().expect("core data dir");
    let core = Core::started("core-a", &pki, core_data.path());
    let broker = Mosquitto::start("");
    let data = tempfile::tempdir().expect("edge data dir");
    let config = cdr_only(&broker).replace("format = \"json\"\n", "format = \"json\"\ndisk_budget_bytes = \"1GiB\"\n")
        + "[disk]\nbudget_bytes = \"2GiB\"\n\n"
        + &forward_toml(&[&core], &pki, "");
    let agent = Agent::start(&config, data.path());
    let publisher = Publisher::connect(&broker, "publisher");
    agent.wait_subscribed(&publisher);
    publisher.publish_all(&messages(0, 50, &["cdr/a"]));
    publisher.wait_all_acked(FORWARD_TIMEOUT);
    wait_core_holds(&core, &agent, 50);
    let mut served = served_series(&agent.metrics());
    served.extend(served_series(&core.try_metrics().expect("core /metrics")));

    let dashboard = std::fs::read_to_string(DASHBOARD).expect("reading the dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 15, "the dashboard queries: {exprs:?}");
    let alerts = std::fs::read_to_string(ALERTS).expect("reading the alert rules");
    for (file, text) in [("dashboard", exprs.join("\n")), ("alerts", alerts)] {
        let names = metric_names_in(&text);
        assert!(names.len() >= 10, "{file}: {names:?}");
        for name in names {
            let coming = COMING.iter().any(|(n, _)| *n == name);
            assert!(
                served.contains(&name) || coming,
                "{file} queries {name}, which neither binary serves:\n{served:#?}"
            );
        }
    }
    for (name, _) in COMING {
        assert!(!served.contains(name), "{name} is served now: take it off COMING");
    }
}
