//! Every core-ingest config shipped under `deploy/` (the documented example, the quickstart's,
//! the Kubernetes template, and any added later) loads through the real config types, with
//! certificate files made on the spot and the `[tls]` paths pointed at them.

use std::path::{Path, PathBuf};

use core_ingest::config::Config;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Every `*.toml` under `dir` whose file name starts with `prefix`.
fn configs(dir: &Path, prefix: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            configs(&path, prefix, out);
        } else if path.extension().is_some_and(|e| e == "toml")
            && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))
        {
            out.push(path);
        }
    }
}

#[test]
fn every_core_ingest_config_in_deploy_loads() {
    let mut paths = Vec::new();
    configs(Path::new(DEPLOY), "core-ingest", &mut paths);
    paths.sort();
    let names: Vec<String> = paths.iter().map(|p| p.strip_prefix(DEPLOY).unwrap().display().to_string()).collect();
    for want in ["core-ingest.example.toml", "quickstart/core-ingest.toml", "kubernetes/core-ingest.toml"] {
        assert!(names.iter().any(|n| n == want), "{want} not found among {names:?}");
    }
    let (ca, ca_key) = shared::tls::generate_ca("deploy configs CA", 30).expect("CA");
    let (cert, key) = shared::tls::issue_server_cert(&ca, &ca_key, &["localhost".into()], 10).expect("server cert");
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tmp = tempfile::tempdir().expect("temp dir");
        let tls = doc.get_mut("tls").and_then(|t| t.as_table_mut()).expect("a [tls] table");
        for (field, pem) in [("ca_file", &ca), ("cert_file", &cert), ("key_file", &key)] {
            let file = tmp.path().join(field);
            std::fs::write(&file, pem).expect("writing a certificate");
            tls.insert(field.into(), toml::Value::String(file.display().to_string()));
        }
        let config = Config::parse(&toml::to_string(&doc).expect("TOML"), path)
            .unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()));
        assert!(!config.node.is_empty());
    }
}
