//! Every edge-agent config shipped under `deploy/` (the documented example, the quickstart's,
//! the Kubernetes template, and any added later) loads through the real config types. Their
//! certificate files are made on the spot (for the edge id each config names) and the paths
//! pointed at them; everything else is loaded as shipped.

use std::path::{Path, PathBuf};

use edge_agent::config::Config;

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
fn every_edge_agent_config_in_deploy_loads() {
    let mut paths = Vec::new();
    configs(Path::new(DEPLOY), "edge-agent", &mut paths);
    paths.sort();
    let names: Vec<String> = paths.iter().map(|p| p.strip_prefix(DEPLOY).unwrap().display().to_string()).collect();
    for want in ["edge-agent.example.toml", "quickstart/edge-agent.toml", "kubernetes/edge-agent.toml"] {
        assert!(names.iter().any(|n| n == want), "{want} not found among {names:?}");
    }
    let (ca, ca_key) = shared::tls::generate_ca("deploy configs CA", 30).expect("CA");
    let mut variants = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(on) = uncomment_forward(&text) {
            variants.push((path.clone(), on, true));
        }
        variants.push((path.clone(), text, false));
    }
    assert!(variants.len() > paths.len(), "the example documents [forward] commented out");
    for (path, text, forwards) in &variants {
        let mut doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tmp = tempfile::tempdir().expect("temp dir");
        if let Some(forward) = doc.get_mut("forward").and_then(|f| f.as_table_mut()) {
            let edge_id = text
                .parse::<toml::Table>()
                .ok()
                .and_then(|t| t.get("edge_id")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| panic!("{}: no edge_id", path.display()));
            let (cert, key) = shared::tls::issue_edge_cert(&ca, &ca_key, &edge_id, 10).expect("edge certificate");
            for (field, pem) in [("ca_file", &ca), ("cert_file", &cert), ("key_file", &key)] {
                let file = tmp.path().join(field);
                std::fs::write(&file, pem).expect("writing a certificate");
                forward.insert(field.into(), toml::Value::String(file.display().to_string()));
            }
        }
        let config = Config::parse(&toml::to_string(&doc).expect("TOML"), path)
            .unwrap_or_else(|e| panic!("{} does not load:\n{e}\n{text}", path.display()));
        assert!(!config.streams.is_empty(), "{}: no streams", path.display());
        if *forwards {
            let f = config.forward.as_ref().expect("the uncommented [forward] table");
            assert_eq!(f.cores.len(), 2, "{}", path.display());
        }
    }
}

/// `text` with its commented-out `# [forward]` table (to the end of the file) switched on:
/// `# key = value` lines lose their `# `; `# # comments` stay comments.
fn uncomment_forward(text: &str) -> Option<String> {
    let at = text.find("\n# [forward]\n")? + 1;
    let (head, tail) = text.split_at(at);
    let on: Vec<&str> =
        tail.lines().map(|l| if l.starts_with("# #") { "" } else { l.strip_prefix("# ").unwrap_or(l) }).collect();
    Some(format!("{head}{}\n", on.join("\n")))
}
