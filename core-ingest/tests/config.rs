//! `deploy/core-ingest.example.toml` loads, documents every field, and shows the defaults.

use std::fs;
use std::path::Path;
use std::process::Command;

use core_ingest::config::Config;
use shared::tls;

const BIN: &str = env!("CARGO_BIN_EXE_core-ingest");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/core-ingest.example.toml");

/// Every key of [`Config`] and its `[tls]` table. `deny_unknown_fields` catches keys the
/// example has and the config does not; this list catches the other way round.
const KEYS: [&str; 26] = [
    "node",
    "data_dir",
    "listen",
    "admin_listen",
    "allow_edges",
    "connections_max",
    "partitions",
    "udp_buffer_bytes",
    "mtu_min",
    "mtu_max",
    "segment_bytes_max",
    "keep_alive",
    "idle_timeout",
    "ca_file",
    "cert_file",
    "key_file",
    "object_store",
    "tier_after",
    "local_retention",
    "disk_budget_bytes",
    "interval",
    "retry_backoff_initial",
    "retry_backoff_max",
    "multipart_threshold_bytes",
    "part_bytes",
    "tokens",
];

/// The example next to a `pki/` directory holding the certificates it names.
fn example_beside_certs(dir: &Path) -> std::path::PathBuf {
    let pki = dir.join("pki");
    fs::create_dir(&pki).unwrap();
    let (ca, ca_key) = tls::generate_ca("Example CA", 60).unwrap();
    let (cert, key) = tls::issue_server_cert(&ca, &ca_key, &["localhost".into()], 30).unwrap();
    for (name, text) in [("ca.pem", &ca), ("server.pem", &cert), ("server.key", &key)] {
        fs::write(pki.join(name), text).unwrap();
    }
    let path = dir.join("core-ingest.toml");
    fs::copy(EXAMPLE, &path).unwrap();
    path
}

#[test]
fn example_config_loads_with_every_field_at_its_default() {
    let tmp = tempfile::tempdir().unwrap();
    let path = example_beside_certs(tmp.path());
    let text = fs::read_to_string(&path).unwrap();
    let config = Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.tls.ca_file, tmp.path().join("pki/ca.pem"), "relative to the file's directory");
    assert_eq!(config.allow_edges, None, "allow_edges is shown commented out");

    for key in KEYS {
        let documented = text.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{key} = "))
        });
        assert!(documented, "{key} is not in the example");
    }

    // Only the required fields: everything else takes its default, which the example shows.
    let minimal = format!(
        "node = {:?}\ndata_dir = {:?}\nlisten = \"{}\"\n[tls]\nca_file = \"pki/ca.pem\"\ncert_file = \
         \"pki/server.pem\"\nkey_file = \"pki/server.key\"\n",
        config.node, config.data_dir, config.listen,
    );
    let defaults = Config::parse(&minimal, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(format!("{config:?}"), format!("{defaults:?}"), "the example's values are the defaults");

    // QUIC packet sizes: within QUIC's floor and the GSO-safe ceiling, min ≤ max.
    for (from, to, field) in [
        ("mtu_max = 1452", "mtu_max = 9001", "mtu_max"),
        ("mtu_min = 1200", "mtu_min = 1000", "mtu_min"),
        ("mtu_min = 1200", "mtu_min = 1500", "mtu_min"),
    ] {
        let e = Config::parse(&text.replacen(from, to, 1), &path).unwrap_err();
        assert!(e.problems.iter().any(|(k, why)| k == field && why.contains("8972")), "{to}: {e}");
    }
    let jumbo = Config::parse(
        &text.replacen("mtu_min = 1200", "mtu_min = 8952", 1).replacen("mtu_max = 1452", "mtu_max = 8972", 1),
        &path,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(jumbo.mtu(), shared::quic::Mtu { min: 8952, max: 8972 });

    let uncommented = text.replacen("# allow_edges = ", "allow_edges = ", 1);
    let allowing = Config::parse(&uncommented, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(allowing.allow_edges, Some(vec!["edge-lyon-01".into(), "edge-lyon-02".into()]));
}

#[test]
fn validate_accepts_the_example_and_names_a_typo() {
    let tmp = tempfile::tempdir().unwrap();
    let path = example_beside_certs(tmp.path());
    let validate = |p: &Path| Command::new(BIN).arg("validate").arg("--config").arg(p).env_remove("RUST_LOG").output();
    let out = validate(&path).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));

    let text = fs::read_to_string(&path).unwrap();
    let typo = tmp.path().join("typo.toml");
    assert!(text.contains("\nkeep_alive = \"10s\""));
    fs::write(&typo, text.replacen("\nkeep_alive = \"10s\"", "\nkeepalive = \"10s\"", 1)).unwrap();
    let out = validate(&typo).unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("keepalive"), "the unknown key is named: {said}");

    let out = validate(&tmp.path().join("pki/missing.toml")).unwrap();
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn tier_and_read_api_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = example_beside_certs(tmp.path());
    let text = fs::read_to_string(&path).unwrap();
    let bad = text
        .replacen("# object_store = \"s3://backhaul-core/prod\"", "object_store = \"gs://elsewhere\"", 1)
        .replacen("# listen = \"127.0.0.1:9466\"", "listen = \"0.0.0.0:9466\"", 1)
        .replacen("part_bytes = \"8MiB\"", "part_bytes = \"1MiB\"", 1)
        .replacen("retry_backoff_max = \"60s\"", "retry_backoff_max = \"10ms\"", 1);
    let err = Config::parse(&bad, &path).unwrap_err().to_string();
    for key in ["tier.object_store", "read_api.listen", "tier.part_bytes", "tier.retry_backoff_max"] {
        assert!(err.contains(key), "{key} is named: {err}");
    }
    let ok = text.replacen("# listen = \"127.0.0.1:9466\"", "listen = \"127.0.0.1:9466\"", 1);
    assert_eq!(Config::parse(&ok, &path).unwrap().read_api.listen, Some("127.0.0.1:9466".parse().unwrap()));

    // Non-loopback with HTTPS and tokens is accepted; a short token is named.
    let public = text
        .replacen("# listen = \"127.0.0.1:9466\"", "listen = \"0.0.0.0:9466\"", 1)
        .replacen("# cert_file = \"pki/read-api.pem\"", "cert_file = \"pki/server.pem\"", 1)
        .replacen("# key_file = \"pki/read-api.key\"", "key_file = \"pki/server.key\"", 1)
        .replacen("# tokens = { cdr = \"env:BACKHAUL_READ_TOKEN_CDR\" }", "tokens = { cdr = \"0123456789abcdef\" }", 1);
    let c = Config::parse(&public, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.read_api.cert_file, Some(tmp.path().join("pki/server.pem")), "relative to the file");
    let short = public.replacen("0123456789abcdef", "short", 1);
    let err = Config::parse(&short, &path).unwrap_err().to_string();
    assert!(err.contains("read_api.tokens.cdr"), "{err}");
    let unset = public.replacen("\"0123456789abcdef\"", "\"env:BACKHAUL_TEST_UNSET_VAR\"", 1);
    let err = Config::parse(&unset, &path).unwrap_err().to_string();
    assert!(err.contains("BACKHAUL_TEST_UNSET_VAR"), "{err}");
}
