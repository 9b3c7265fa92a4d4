//! Reads: the records of a stream, the same whether a segment is on this node's disk or in the
//! bucket (DESIGN §5), as NDJSON lines (`edge`, `epoch`, `stream`, `seq`, `ts`, `topic`,
//! `payload` or `payload_b64`, `attrs`).
//!
//! Sources, in this order: every manifest under `<prefix>/<stream>/` in the bucket (all nodes'
//! and incarnations'), sorted by earliest event time; then this node's local segments that no
//! manifest of this node covers. A record named by (edge, epoch, stream, seq) is printed once,
//! even when a failover stored it on two nodes: [`Cursor`] holds the seqs already delivered per
//! (edge, epoch), which is the dedup set and, encoded, the resumable cursor — a read resumed
//! with it skips what was delivered, whatever moved between disk and bucket meanwhile.
//! Output is grouped by segment, not globally time-ordered.
//!
//! Damage never stops a read: a damaged object or local segment is reported with its key (or
//! file) and byte offset, and the batches around it are still read.
//!
//! The engine is synchronous; object store calls run on the given handle of a multi-thread
//! runtime (`Handle::block_on` drives no IO on a current-thread one), so the CLI
//! (its own runtime) and the HTTP API (a blocking task) share it.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use shared::batch::{Batch, BatchLimits};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::storage::FsStorage;
use shared::log::{Log, LogConfig};
use shared::ranges::RangeSet;
use thiserror::Error;

use crate::logcmd::ndjson_line;
use crate::tier::manifest::{MANIFEST_SUFFIX, Manifest, stream_prefix};

/// Most bytes of one encoded cursor accepted.
pub const CURSOR_BYTES_MAX: usize = 64 << 10;

/// What to read.
#[derive(Clone, Debug, Default)]
pub struct ReadQuery {
    /// Stream.
    pub stream: String,
    /// Records with event time at or after this (ms).
    pub since_ms: Option<i64>,
    /// Records with event time before this (ms).
    pub until_ms: Option<i64>,
    /// Only this edge's records.
    pub edge: Option<String>,
    /// At most this many records; a cursor is returned to continue.
    pub limit: Option<u64>,
    /// Where a previous read stopped.
    pub cursor: Cursor,
}

/// Seqs already delivered per (edge, epoch): the dedup set and the resumable cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    delivered: BTreeMap<(String, u64), RangeSet>,
}

impl Cursor {
    /// Whether every seq of `seqs` was delivered.
    pub fn holds(&self, edge: &str, epoch: u64, seqs: &Range<u64>) -> bool {
        self.delivered.get(&(edge.to_string(), epoch)).is_some_and(|s| s.contains_range(seqs))
    }

    /// Marks `seq` delivered; false if it already was.
    pub fn take(&mut self, edge: &str, epoch: u64, seq: u64) -> bool {
        let set = self.delivered.entry((edge.to_string(), epoch)).or_default();
        if set.contains_range(&(seq..seq + 1)) {
            return false;
        }
        set.insert(seq..seq + 1);
        true
    }

    /// URL-safe text (base64 of compact JSON `[[edge, epoch, [[start, end], …]], …]`).
    pub fn encode(&self) -> String {
        let v: Vec<serde_json::Value> = self
            .delivered
            .iter()
            .map(|((edge, epoch), set)| {
                let ranges: Vec<[u64; 2]> = set.ranges().iter().map(|r| [r.start, r.end]).collect();
                serde_json::json!([edge, epoch, ranges])
            })
            .collect();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::Value::Array(v).to_string())
    }

    /// Parses [`Cursor::encode`]'s text, naming what is wrong.
    pub fn decode(text: &str) -> Result<Cursor, String> {
        if text.len() > CURSOR_BYTES_MAX {
            return Err(format!("cursor: {} bytes, above {CURSOR_BYTES_MAX}", text.len()));
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| format!("cursor: not base64url: {e}"))?;
        type Wire = Vec<(String, u64, Vec<[u64; 2]>)>;
        let wire: Wire = serde_json::from_slice(&raw).map_err(|e| format!("cursor: {e}"))?;
        let mut c = Cursor::default();
        for (edge, epoch, ranges) in wire {
            if let Some([s, e]) = ranges.iter().find(|[s, e]| s > e) {
                return Err(format!("cursor: range [{s}, {e}) of edge {edge} is reversed"));
            }
            c.delivered.insert((edge, epoch), RangeSet::from_ranges(ranges.into_iter().map(|[s, e]| s..e)));
        }
        Ok(c)
    }
}

/// Where records come from.
#[derive(Debug, Clone)]
pub struct ReadSources {
    /// This node's data directory (its local logs).
    pub data_dir: PathBuf,
    /// This node's name and incarnation (to skip local segments its manifests cover).
    pub node: String,
    /// The incarnation, if the data directory has one.
    pub incarnation: Option<u64>,
    /// The bucket.
    pub objects: Arc<dyn ObjectStore>,
    /// Key prefix in it.
    pub prefix: String,
    /// Runtime for object store calls.
    pub handle: tokio::runtime::Handle,
}

/// How a read ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Records printed.
    pub records: u64,
    /// Set when the limit stopped the read: continue from here.
    pub next_cursor: Option<String>,
    /// Damage met (key or file, byte offset, reason); the rest was read.
    pub problems: Vec<String>,
}

/// Read errors (damage is not one: it is reported in [`ReadOutcome::problems`]).
#[derive(Debug, Error)]
pub enum ReadError {
    /// Listing or fetching from the bucket failed.
    #[error("object store, key {key}: {source}")]
    ObjectStore {
        /// The key or prefix.
        key: String,
        /// The error.
        source: object_store::Error,
    },
    /// A local log could not be read.
    #[error("{0}")]
    Local(String),
    /// The output went away.
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
    /// The stream name is not valid.
    #[error("stream {0:?} is not a valid stream name")]
    BadStream(String),
}

/// Streams known here or in the bucket, sorted.
pub fn list_streams(src: &ReadSources) -> Result<Vec<String>, ReadError> {
    let mut names: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let dir = src.data_dir.join(shared::log::verify::STREAMS_DIR);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        names.extend(entries.filter_map(|e| e.ok()?.file_name().into_string().ok()));
    }
    let prefix = (!src.prefix.is_empty()).then(|| ObjectPath::from(src.prefix.as_str()));
    let listed = src
        .handle
        .block_on(src.objects.list_with_delimiter(prefix.as_ref()))
        .map_err(|source| ReadError::ObjectStore { key: src.prefix.clone(), source })?;
    names.extend(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)));
    Ok(names.into_iter().filter(|n| shared::batch::is_valid_stream_name(n)).collect())
}

/// Reads `q` from `src`, giving each NDJSON line (without newline) to `out`.
pub fn read_records(
    src: &ReadSources,
    q: &ReadQuery,
    out: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> Result<ReadOutcome, ReadError> {
    if !shared::batch::is_valid_stream_name(&q.stream) {
        return Err(ReadError::BadStream(q.stream.clone()));
    }
    let mut r = Reader { q, cursor: q.cursor.clone(), outcome: ReadOutcome::default(), out, done: false };
    let manifests = fetch_manifests(src, &q.stream, &mut r.outcome.problems)?;
    let mut covered: HashSet<(u32, u64)> = HashSet::new();
    let mine = src.incarnation.map(|i| format!("{i:016x}"));
    for m in &manifests {
        if m.node == src.node && Some(&m.incarnation) == mine.as_ref() {
            covered.insert((m.partition, m.base_offset));
        }
    }
    for m in &manifests {
        if r.done {
            break;
        }
        if !r.manifest_may_match(m) {
            continue;
        }
        let key = ObjectPath::from(m.segment_key.as_str());
        let bytes = match src.handle.block_on(async { src.objects.get(&key).await?.bytes().await }) {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                r.outcome.problems.push(format!("object {}: listed by its manifest but missing", m.segment_key));
                continue;
            }
            Err(source) => return Err(ReadError::ObjectStore { key: m.segment_key.clone(), source }),
        };
        r.read_object(m, &bytes)?;
    }
    if !r.done {
        read_local(src, &mut r, &covered)?;
    }
    if r.done {
        r.outcome.next_cursor = Some(r.cursor.encode());
    }
    Ok(r.outcome)
}

struct Reader<'a> {
    q: &'a ReadQuery,
    cursor: Cursor,
    outcome: ReadOutcome,
    out: &'a mut dyn FnMut(&str) -> std::io::Result<()>,
    done: bool,
}

impl Reader<'_> {
    fn manifest_may_match(&self, m: &Manifest) -> bool {
        let in_time = match (m.min_ts_ms, m.max_ts_ms) {
            (Some(lo), Some(hi)) => self.q.since_ms.is_none_or(|s| hi >= s) && self.q.until_ms.is_none_or(|u| lo < u),
            _ => false,
        };
        let has_edge = self.q.edge.as_ref().is_none_or(|e| m.ranges.iter().any(|r| &r.edge == e));
        let pending = m.ranges.iter().any(|r| !self.cursor.holds(&r.edge, r.epoch, &(r.start..r.end)));
        in_time && has_edge && pending
    }

    fn read_object(&mut self, m: &Manifest, bytes: &Bytes) -> Result<(), ReadError> {
        let crc = crc32c::crc32c(bytes);
        if crc != m.crc32c || bytes.len() as u64 != m.bytes {
            self.outcome.problems.push(format!(
                "object {}: {} bytes with CRC-32C {crc:08x}, its manifest says {} bytes with {:08x}; reading what is intact",
                m.segment_key,
                bytes.len(),
                m.bytes,
                m.crc32c
            ));
        }
        let limits = BatchLimits::default();
        let scan = shared::log::segment::scan(bytes, Offset(m.base_offset), &limits);
        for d in &scan.damage {
            self.outcome
                .problems
                .push(format!("object {} at byte {}: {} ({} bytes skipped)", m.segment_key, d.pos, d.reason, d.len));
        }
        if let Some(reason) = &scan.tail_reason {
            self.outcome.problems.push(format!("object {} at byte {}: {reason}", m.segment_key, scan.valid_len));
        }
        for f in &scan.frames {
            if self.done {
                break;
            }
            let start = f.pos as usize + shared::log::segment::FRAME_HEADER_LEN;
            let len = f.len as usize - shared::log::segment::FRAME_HEADER_LEN;
            match Batch::from_bytes(bytes.slice(start..start + len), &limits) {
                Ok(batch) => self.batch(&batch, &m.segment_key)?,
                Err(e) => self.outcome.problems.push(format!("object {} at byte {}: {e}", m.segment_key, f.pos)),
            }
        }
        Ok(())
    }

    fn batch(&mut self, batch: &Batch, whence: &str) -> Result<(), ReadError> {
        let h = batch.header();
        if h.is_gap()
            || self.q.edge.as_ref().is_some_and(|e| *e != h.producer)
            || self.q.since_ms.is_some_and(|s| h.max_ts_ms < s)
            || self.q.until_ms.is_some_and(|u| h.min_ts_ms >= u)
            || self.cursor.holds(&h.producer, h.epoch.0, &(h.base_seq.0..h.end_seq().0))
        {
            return Ok(());
        }
        let records = match batch.records() {
            Ok(r) => r,
            Err(e) => {
                self.outcome.problems.push(format!("{whence}: batch of {} at seq {}: {e}", h.producer, h.base_seq.0));
                return Ok(());
            }
        };
        for (i, rec) in records.iter().enumerate() {
            if self.q.since_ms.is_some_and(|s| rec.ts_ms < s) || self.q.until_ms.is_some_and(|u| rec.ts_ms >= u) {
                continue;
            }
            if self.q.limit.is_some_and(|l| self.outcome.records >= l) {
                self.done = true;
                return Ok(());
            }
            let seq = h.base_seq.0 + i as u64;
            if !self.cursor.take(&h.producer, h.epoch.0, seq) {
                continue;
            }
            (self.out)(&ndjson_line(&h.producer, Epoch(h.epoch.0), &h.stream, Seq(seq), rec))?;
            self.outcome.records += 1;
        }
        Ok(())
    }
}

/// Every manifest of `stream` in the bucket, by earliest event time then key.
fn fetch_manifests(src: &ReadSources, stream: &str, problems: &mut Vec<String>) -> Result<Vec<Manifest>, ReadError> {
    let prefix = ObjectPath::from(stream_prefix(&src.prefix, stream).as_str());
    let err = |source| ReadError::ObjectStore { key: prefix.to_string(), source };
    let metas: Vec<_> = src.handle.block_on(src.objects.list(Some(&prefix)).try_collect::<Vec<_>>()).map_err(err)?;
    let mut out = Vec::new();
    for meta in metas.into_iter().filter(|m| m.location.as_ref().ends_with(MANIFEST_SUFFIX)) {
        let key = meta.location.to_string();
        if meta.size > crate::tier::manifest::MANIFEST_BYTES_MAX as u64 {
            problems.push(format!("manifest {key}: {} bytes, too large; skipped", meta.size));
            continue;
        }
        let got = src.handle.block_on(async { src.objects.get(&meta.location).await?.bytes().await });
        match got {
            Ok(bytes) => match Manifest::decode(&bytes, &key) {
                Ok(m) if m.stream == stream => out.push(m),
                Ok(m) => problems.push(format!("manifest {key}: names stream {:?}; skipped", m.stream)),
                Err(e) => problems.push(format!("{e}; skipped")),
            },
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(ReadError::ObjectStore { key, source }),
        }
    }
    out.sort_by(|a, b| (a.min_ts_ms, &a.segment_key).cmp(&(b.min_ts_ms, &b.segment_key)));
    Ok(out)
}

/// This node's local segments of the stream that none of its manifests cover.
fn read_local(src: &ReadSources, r: &mut Reader<'_>, covered: &HashSet<(u32, u64)>) -> Result<(), ReadError> {
    let dir = shared::log::verify::stream_dir(&src.data_dir, &r.q.stream);
    let partitions: u32 = match std::fs::read_to_string(dir.join("partitions")) {
        Ok(t) => {
            t.trim().parse().map_err(|_| ReadError::Local(format!("{}/partitions: not a number", dir.display())))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ReadError::Local(format!("{}/partitions: {e}", dir.display()))),
    };
    for p in 0..partitions {
        let cfg = LogConfig { read_only: true, ..LogConfig::default() };
        let pdir = crate::store::partition_dir(&src.data_dir, &r.q.stream, p as usize);
        let mut log = Log::open(Arc::new(FsStorage), &pdir, cfg, 0).map_err(|e| ReadError::Local(e.to_string()))?;
        for problem in log.problems().iter().filter(|p| p.kind.is_corruption()) {
            r.outcome.problems.push(problem.to_string());
        }
        for seg in log.segments() {
            if covered.contains(&(p, seg.base.0)) {
                continue;
            }
            let mut from = seg.base;
            while from < seg.end.min(log.committed_offset()) && !r.done {
                let read = match log.read(from, 4 << 20) {
                    Ok(read) => read,
                    // The tierer removed the segment meanwhile: it is in the bucket now.
                    Err(_) if !seg.path.exists() => break,
                    Err(e) => return Err(ReadError::Local(e.to_string())),
                };
                for d in &read.damage {
                    r.outcome.problems.push(d.to_string());
                }
                for b in read.batches.iter().filter(|b| b.offset < seg.end) {
                    r.batch(&b.batch, &seg.path.display().to_string())?;
                }
                if read.next <= from {
                    break;
                }
                from = read.next;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_bad_ones_are_named() {
        let mut c = Cursor::default();
        for seq in [0, 1, 2, 5] {
            assert!(c.take("e1", u64::MAX, seq));
        }
        assert!(!c.take("e1", u64::MAX, 1), "a seq is delivered once");
        assert!(c.take("e2", 7, 1));
        assert!(c.holds("e1", u64::MAX, &(0..3)));
        assert!(!c.holds("e1", u64::MAX, &(0..4)));
        let text = c.encode();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{text}");
        assert_eq!(Cursor::decode(&text).unwrap(), c);
        assert!(Cursor::decode("!!").unwrap_err().contains("base64"));
        let reversed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"[["e",1,[[5,2]]]]"#);
        assert!(Cursor::decode(&reversed).unwrap_err().contains("reversed"));
        assert!(Cursor::decode(&"A".repeat(CURSOR_BYTES_MAX + 1)).unwrap_err().contains("above"));
    }
}
