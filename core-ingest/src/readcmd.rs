//! `core-ingest read` and `core-ingest status`: the read engine ([`crate::read`]) and the
//! catalog, from the command line, beside a running node or without one.

use std::io::Write;

use anyhow::Context;
use serde_json::{Value, json};

use crate::catalog::{CATALOG_FILE, Catalog};
use crate::cli::ReadArgs;
use crate::config::Config;
use crate::read::{Cursor, ReadOutcome, ReadQuery, ReadSources};

/// The read sources a config names, object store calls running on `handle`.
pub fn sources(config: &Config, handle: tokio::runtime::Handle) -> anyhow::Result<ReadSources> {
    let (objects, prefix) =
        crate::tier::store::open(config.tier.object_store.as_deref(), &config.data_dir).map_err(anyhow::Error::msg)?;
    let incarnation = shared::identity::read_existing(&config.data_dir, crate::run::IDENTITY_KIND)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    Ok(ReadSources {
        data_dir: config.data_dir.clone(),
        node: config.node.clone(),
        incarnation,
        objects,
        prefix,
        handle,
    })
}

/// Parses a query's parameters, naming the bad one.
pub fn query(
    stream: &str,
    since: Option<&str>,
    until: Option<&str>,
    edge: Option<&str>,
    limit: Option<u64>,
    cursor: Option<&str>,
) -> Result<ReadQuery, String> {
    let time = |name: &str, v: Option<&str>| -> Result<Option<i64>, String> {
        v.map(|t| {
            shared::ndjson::parse_time_ms(t).ok_or_else(|| format!("{name}: {t:?} is not an RFC 3339 time or ms"))
        })
        .transpose()
    };
    Ok(ReadQuery {
        stream: stream.to_string(),
        since_ms: time("since", since)?,
        until_ms: time("until", until)?,
        edge: edge.map(str::to_string),
        limit,
        cursor: cursor.map(Cursor::decode).transpose()?.unwrap_or_default(),
    })
}

/// `read`: records to `out`, problems and the next cursor to `err`. Returns the exit status.
pub fn read(args: &ReadArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<u8> {
    let config = Config::load(&args.config)?;
    let q = query(
        &args.stream,
        args.since.as_deref(),
        args.until.as_deref(),
        args.edge.as_deref(),
        args.limit,
        args.cursor.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Multi-thread: the engine calls `Handle::block_on`, which cannot drive IO on a
    // current-thread runtime.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("tokio runtime")?;
    let src = sources(&config, runtime.handle().clone())?;
    let result = crate::read::read_records(&src, &q, &mut |line| {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")
    });
    let outcome: ReadOutcome = match result {
        Err(crate::read::ReadError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
        r => r?,
    };
    out.flush()?;
    for p in &outcome.problems {
        writeln!(err, "damaged: {p}")?;
    }
    if let Some(c) = &outcome.next_cursor {
        writeln!(err, "next_cursor={c}")?;
    }
    Ok(if outcome.problems.is_empty() { 0 } else { 1 })
}

/// The status document: edges, streams, tiering backlog, from the catalog at `data_dir`.
pub fn status_json(node: &str, catalog: Option<&Catalog>, now_ms: i64) -> anyhow::Result<Value> {
    let (edges, streams) = match catalog {
        Some(c) => (c.edges()?, c.stream_bytes()?),
        None => (Vec::new(), Vec::new()),
    };
    let edges: Vec<Value> = edges
        .iter()
        .map(|e| {
            json!({
                "edge": e.edge,
                "last_seen": shared::ndjson::rfc3339_ms(e.last_seen_ms),
                "last_seen_ago_ms": now_ms.saturating_sub(e.last_seen_ms),
                "lag_ms": e.lag_ms,
                "records": e.records,
                "bytes": e.bytes,
                "gaps": e.gaps,
            })
        })
        .collect();
    let backlog: u64 = streams.iter().map(|s| s.backlog_segments).sum();
    let streams: Vec<Value> = streams
        .iter()
        .map(|s| {
            json!({
                "stream": s.stream,
                "local_untiered_bytes": s.local_untiered_bytes,
                "tiered_bytes": s.tiered_bytes,
                "tiered_local_bytes": s.tiered_local_bytes,
                "backlog_segments": s.backlog_segments,
            })
        })
        .collect();
    Ok(json!({ "node": node, "edges": edges, "streams": streams, "tiering_backlog_segments": backlog }))
}

/// `status`: the status document of the node a config names.
pub fn status(config_path: &std::path::Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let catalog = Catalog::open_read_only(&config.data_dir.join(CATALOG_FILE))?;
    let doc = status_json(&config.node, catalog.as_ref(), now_ms())?;
    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
