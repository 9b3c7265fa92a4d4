//! The core's catalog: the one module that owns SQL (rusqlite, WAL). It records every closed
//! segment the tierer has seen (offsets, event-time range, bytes, the (edge, epoch, stream) seq
//! ranges it holds, local path, object key, checksum, state) and per-edge counters (last seen,
//! records, bytes, gaps, lag).
//!
//! Segment states move one way: `local` → `uploading` → `tiered` → `local_deleted`. A crash
//! between two steps leaves a segment in the earlier state and the tierer simply runs the step
//! again: uploads are idempotent and the manifest is create-only (see [`crate::tier`]).
//!
//! Schema migrations run by `PRAGMA user_version`: step `i` of `MIGRATIONS` takes version `i` to
//! `i + 1`, inside one transaction.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

/// File name of the catalog in the data directory.
pub const CATALOG_FILE: &str = "catalog.sqlite";

/// Schema steps, oldest first.
const MIGRATIONS: &[&str] = &[r"
CREATE TABLE segments (
    stream       TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    base_offset  INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    min_ts_ms    INTEGER,
    max_ts_ms    INTEGER,
    bytes        INTEGER NOT NULL,
    records      INTEGER NOT NULL,
    local_path   TEXT    NOT NULL,
    object_key   TEXT,
    checksum     INTEGER,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    updated_ms   INTEGER NOT NULL,
    PRIMARY KEY (stream, partition, base_offset)
);
CREATE INDEX segments_state ON segments (state);
CREATE TABLE segment_ranges (
    stream       TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    base_offset  INTEGER NOT NULL,
    edge         TEXT    NOT NULL,
    epoch        INTEGER NOT NULL,
    seq_start    INTEGER NOT NULL,
    seq_end      INTEGER NOT NULL
);
CREATE INDEX segment_ranges_segment ON segment_ranges (stream, partition, base_offset);
CREATE TABLE edges (
    edge         TEXT    PRIMARY KEY,
    last_seen_ms INTEGER NOT NULL,
    records      INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    gaps         INTEGER NOT NULL,
    lag_ms       INTEGER NOT NULL
);
"];

/// Where a segment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegmentState {
    /// Closed, only on local disk.
    Local,
    /// An upload started (it may have been cut short).
    Uploading,
    /// Object, index and manifest are in the bucket; the local copy is still there.
    Tiered,
    /// In the bucket only.
    LocalDeleted,
}

impl SegmentState {
    /// The name stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentState::Local => "local",
            SegmentState::Uploading => "uploading",
            SegmentState::Tiered => "tiered",
            SegmentState::LocalDeleted => "local_deleted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<SegmentState> {
        Some(match s {
            "local" => SegmentState::Local,
            "uploading" => SegmentState::Uploading,
            "tiered" => SegmentState::Tiered,
            "local_deleted" => SegmentState::LocalDeleted,
            _ => return None,
        })
    }

    /// Whether the segment is in the bucket.
    pub fn is_tiered(self) -> bool {
        matches!(self, SegmentState::Tiered | SegmentState::LocalDeleted)
    }
}

/// Identifies a segment on this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    /// Stream.
    pub stream: String,
    /// Partition.
    pub partition: u32,
    /// First offset.
    pub base_offset: u64,
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.stream, self.partition, self.base_offset)
    }
}

/// The seqs of one producer held in a segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProducerRange {
    /// Edge id.
    pub edge: String,
    /// Producer epoch.
    pub epoch: u64,
    /// Seqs `[start, end)`.
    pub seqs: Range<u64>,
}

/// A segment row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRow {
    /// Which.
    pub id: SegmentId,
    /// Offset after its last batch.
    pub next_offset: u64,
    /// Event-time range.
    pub ts_range: Option<(i64, i64)>,
    /// Bytes of the segment file.
    pub bytes: u64,
    /// Records (offsets) it holds.
    pub records: u64,
    /// Its file on this node.
    pub local_path: PathBuf,
    /// Its object, once an upload started.
    pub object_key: Option<String>,
    /// CRC-32C of the segment bytes, once known.
    pub checksum: Option<u32>,
    /// Where it is.
    pub state: SegmentState,
    /// Failed upload attempts.
    pub attempts: u32,
    /// The last upload error.
    pub last_error: Option<String>,
}

/// Counters of one edge, as added by one flush.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeDelta {
    /// Edge id.
    pub edge: String,
    /// When its last batch arrived (ms since the epoch).
    pub last_seen_ms: i64,
    /// Records stored.
    pub records: u64,
    /// Batch bytes stored.
    pub bytes: u64,
    /// Gap batches stored.
    pub gaps: u64,
    /// Arrival time minus the newest event time of its latest batch.
    pub lag_ms: i64,
}

/// An edge row: totals.
pub type EdgeRow = EdgeDelta;

/// Bytes of a stream by place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamBytes {
    /// Stream.
    pub stream: String,
    /// Closed segments only on local disk (untiered).
    pub local_untiered_bytes: u64,
    /// Segments in the bucket.
    pub tiered_bytes: u64,
    /// Of those, also still on local disk.
    pub tiered_local_bytes: u64,
    /// Segments waiting for upload (local or uploading).
    pub backlog_segments: u64,
}

/// Catalog errors.
#[derive(Debug, Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("catalog {}: {source}", path.display())]
    Sql {
        /// The catalog file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// A stored value makes no sense.
    #[error("catalog {}: {what}", path.display())]
    Corrupt {
        /// The catalog file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The file was written by a newer build.
    #[error("catalog {}: schema version {found} is newer than this build's {known}", path.display())]
    TooNew {
        /// The catalog file.
        path: PathBuf,
        /// On disk.
        found: u32,
        /// Known here.
        known: u32,
    },
}

/// The catalog: owns its connection.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl Catalog {
    /// Opens (creating and migrating) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let sql = |source| CatalogError::Sql { path: path.into(), source };
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql)?;
        let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
        let known = MIGRATIONS.len() as u32;
        if version > known {
            return Err(CatalogError::TooNew { path: path.into(), found: version, known });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(sql)?;
            tx.execute_batch(step).map_err(sql)?;
            tx.pragma_update(None, "user_version", i as u32 + 1).map_err(sql)?;
            tx.commit().map_err(sql)?;
        }
        Ok(Catalog { conn, path: path.into() })
    }

    /// Opens the catalog for reading only (CLI tools beside a running node). `None` if the data
    /// directory has none yet.
    pub fn open_read_only(path: &Path) -> Result<Option<Catalog>, CatalogError> {
        if !path.exists() {
            return Ok(None);
        }
        let sql = |source| CatalogError::Sql { path: path.into(), source };
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql)?;
        Ok(Some(Catalog { conn, path: path.into() }))
    }

    /// Records a closed segment seen on disk, with its producers' ranges; a known segment is
    /// left as it is. Returns whether it was new.
    pub fn insert_segment(
        &mut self,
        row: &SegmentRow,
        ranges: &[ProducerRange],
        now_ms: i64,
    ) -> Result<bool, CatalogError> {
        let path = self.path.clone();
        let sql = |source| CatalogError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        let id = &row.id;
        let added = tx
            .execute(
                "INSERT OR IGNORE INTO segments (stream, partition, base_offset, next_offset, min_ts_ms, max_ts_ms, \
                 bytes, records, local_path, object_key, checksum, state, attempts, last_error, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    id.stream,
                    id.partition,
                    id.base_offset as i64,
                    row.next_offset as i64,
                    row.ts_range.map(|t| t.0),
                    row.ts_range.map(|t| t.1),
                    row.bytes as i64,
                    row.records as i64,
                    row.local_path.to_string_lossy(),
                    row.object_key,
                    row.checksum,
                    row.state.as_str(),
                    row.attempts,
                    row.last_error,
                    now_ms
                ],
            )
            .map_err(sql)?
            == 1;
        if added {
            for r in ranges {
                tx.execute(
                    "INSERT INTO segment_ranges (stream, partition, base_offset, edge, epoch, seq_start, seq_end) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        id.stream,
                        id.partition,
                        id.base_offset as i64,
                        r.edge,
                        r.epoch as i64,
                        r.seqs.start as i64,
                        r.seqs.end as i64
                    ],
                )
                .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(added)
    }

    /// Moves a segment to `state`, recording its object key and checksum.
    pub fn set_state(
        &mut self,
        id: &SegmentId,
        state: SegmentState,
        object_key: Option<&str>,
        checksum: Option<u32>,
        now_ms: i64,
    ) -> Result<(), CatalogError> {
        let n = self
            .conn
            .execute(
                "UPDATE segments SET state = ?4, object_key = COALESCE(?5, object_key), \
                 checksum = COALESCE(?6, checksum), last_error = NULL, updated_ms = ?7 \
                 WHERE stream = ?1 AND partition = ?2 AND base_offset = ?3",
                params![id.stream, id.partition, id.base_offset as i64, state.as_str(), object_key, checksum, now_ms],
            )
            .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })?;
        if n == 1 { Ok(()) } else { Err(self.corrupt(format!("segment {id} is not in the catalog"))) }
    }

    /// Counts a failed upload attempt of a segment.
    pub fn note_failure(&mut self, id: &SegmentId, error: &str, now_ms: i64) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE segments SET attempts = attempts + 1, last_error = ?4, updated_ms = ?5 \
                 WHERE stream = ?1 AND partition = ?2 AND base_offset = ?3",
                params![id.stream, id.partition, id.base_offset as i64, error, now_ms],
            )
            .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })?;
        Ok(())
    }

    /// One segment.
    pub fn segment(&self, id: &SegmentId) -> Result<Option<SegmentRow>, CatalogError> {
        let mut stmt =
            self.prepare(&format!("{SELECT_SEGMENT} WHERE stream = ?1 AND partition = ?2 AND base_offset = ?3"))?;
        let row = stmt
            .query_row(params![id.stream, id.partition, id.base_offset as i64], raw_segment)
            .optional()
            .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })?;
        row.map(|r| self.segment_row(r)).transpose()
    }

    /// Every segment, by stream, partition and offset.
    pub fn segments(&self) -> Result<Vec<SegmentRow>, CatalogError> {
        let mut stmt = self.prepare(&format!("{SELECT_SEGMENT} ORDER BY stream, partition, base_offset"))?;
        let rows = stmt
            .query_map([], raw_segment)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })?;
        rows.into_iter().map(|r| self.segment_row(r)).collect()
    }

    /// The producer ranges of every segment in one of `states` (dedup seeding on start).
    pub fn ranges_in_states(&self, states: &[SegmentState]) -> Result<Vec<(String, ProducerRange)>, CatalogError> {
        let mut stmt = self.prepare(
            "SELECT r.stream, r.edge, r.epoch, r.seq_start, r.seq_end, s.state FROM segment_ranges r \
             JOIN segments s USING (stream, partition, base_offset)",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })?;
        let mut out = Vec::new();
        for (stream, edge, epoch, start, end, state) in rows {
            let state = SegmentState::parse(&state).ok_or_else(|| self.corrupt(format!("unknown state {state:?}")))?;
            if states.contains(&state) {
                out.push((stream, ProducerRange { edge, epoch: epoch as u64, seqs: start as u64..end as u64 }));
            }
        }
        Ok(out)
    }

    /// Adds one flush of edge counters (totals add up; last seen and lag are replaced).
    pub fn add_edges(&mut self, deltas: &[EdgeDelta]) -> Result<(), CatalogError> {
        let path = self.path.clone();
        let sql = |source| CatalogError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        for d in deltas {
            tx.execute(
                "INSERT INTO edges (edge, last_seen_ms, records, bytes, gaps, lag_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (edge) DO UPDATE SET last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms), \
                 records = records + excluded.records, bytes = bytes + excluded.bytes, \
                 gaps = gaps + excluded.gaps, lag_ms = excluded.lag_ms",
                params![d.edge, d.last_seen_ms, d.records as i64, d.bytes as i64, d.gaps as i64, d.lag_ms],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)
    }

    /// Every edge, by id.
    pub fn edges(&self) -> Result<Vec<EdgeRow>, CatalogError> {
        let mut stmt =
            self.prepare("SELECT edge, last_seen_ms, records, bytes, gaps, lag_ms FROM edges ORDER BY edge")?;
        stmt.query_map([], |r| {
            Ok(EdgeRow {
                edge: r.get(0)?,
                last_seen_ms: r.get(1)?,
                records: r.get::<_, i64>(2)? as u64,
                bytes: r.get::<_, i64>(3)? as u64,
                gaps: r.get::<_, i64>(4)? as u64,
                lag_ms: r.get(5)?,
            })
        })
        .and_then(|it| it.collect())
        .map_err(|source| CatalogError::Sql { path: self.path.clone(), source })
    }

    /// Bytes per stream by place, and the tiering backlog.
    pub fn stream_bytes(&self) -> Result<Vec<StreamBytes>, CatalogError> {
        let mut out: Vec<StreamBytes> = Vec::new();
        for s in self.segments()? {
            if out.last().is_none_or(|b| b.stream != s.id.stream) {
                out.push(StreamBytes { stream: s.id.stream.clone(), ..StreamBytes::default() });
            }
            let b = out.last_mut().expect("just pushed");
            match s.state {
                SegmentState::Local | SegmentState::Uploading => {
                    b.local_untiered_bytes += s.bytes;
                    b.backlog_segments += 1;
                }
                SegmentState::Tiered => {
                    b.tiered_bytes += s.bytes;
                    b.tiered_local_bytes += s.bytes;
                }
                SegmentState::LocalDeleted => b.tiered_bytes += s.bytes,
            }
        }
        Ok(out)
    }

    fn prepare(&self, sql: &str) -> Result<rusqlite::Statement<'_>, CatalogError> {
        self.conn.prepare(sql).map_err(|source| CatalogError::Sql { path: self.path.clone(), source })
    }

    fn corrupt(&self, what: String) -> CatalogError {
        CatalogError::Corrupt { path: self.path.clone(), what }
    }

    fn segment_row(&self, r: RawSegment) -> Result<SegmentRow, CatalogError> {
        let state = SegmentState::parse(&r.state)
            .ok_or_else(|| self.corrupt(format!("segment {}: unknown state {:?}", r.id, r.state)))?;
        Ok(SegmentRow {
            id: r.id,
            next_offset: r.next_offset as u64,
            ts_range: r.min_ts.zip(r.max_ts),
            bytes: r.bytes as u64,
            records: r.records as u64,
            local_path: PathBuf::from(r.local_path),
            object_key: r.object_key,
            checksum: r.checksum,
            state,
            attempts: r.attempts,
            last_error: r.last_error,
        })
    }
}

const SELECT_SEGMENT: &str = "SELECT stream, partition, base_offset, next_offset, min_ts_ms, max_ts_ms, bytes, records, \
     local_path, object_key, checksum, state, attempts, last_error FROM segments";

struct RawSegment {
    id: SegmentId,
    next_offset: i64,
    min_ts: Option<i64>,
    max_ts: Option<i64>,
    bytes: i64,
    records: i64,
    local_path: String,
    object_key: Option<String>,
    checksum: Option<u32>,
    state: String,
    attempts: u32,
    last_error: Option<String>,
}

fn raw_segment(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawSegment> {
    Ok(RawSegment {
        id: SegmentId { stream: r.get(0)?, partition: r.get(1)?, base_offset: r.get::<_, i64>(2)? as u64 },
        next_offset: r.get(3)?,
        min_ts: r.get(4)?,
        max_ts: r.get(5)?,
        bytes: r.get(6)?,
        records: r.get(7)?,
        local_path: r.get(8)?,
        object_key: r.get(9)?,
        checksum: r.get(10)?,
        state: r.get(11)?,
        attempts: r.get(12)?,
        last_error: r.get(13)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stream: &str, partition: u32, base: u64) -> SegmentRow {
        SegmentRow {
            id: SegmentId { stream: stream.into(), partition, base_offset: base },
            next_offset: base + 10,
            ts_range: Some((1_000, 2_000)),
            bytes: 4096,
            records: 10,
            local_path: format!("/d/{base}.log").into(),
            object_key: None,
            checksum: None,
            state: SegmentState::Local,
            attempts: 0,
            last_error: None,
        }
    }

    fn range(edge: &str, seqs: Range<u64>) -> ProducerRange {
        ProducerRange { edge: edge.into(), epoch: u64::MAX - 1, seqs }
    }

    #[test]
    fn segments_move_through_states_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CATALOG_FILE);
        let mut c = Catalog::open(&path).unwrap();
        assert!(c.insert_segment(&row("cdr", 1, 0), &[range("e1", 0..5), range("e2", 7..12)], 1).unwrap());
        assert!(!c.insert_segment(&row("cdr", 1, 0), &[range("e1", 0..5)], 2).unwrap(), "a known segment stays");
        let id = row("cdr", 1, 0).id;
        c.note_failure(&id, "connection refused", 3).unwrap();
        c.set_state(&id, SegmentState::Uploading, Some("p/cdr/1/n-1/0.seg"), Some(0xdead_beef), 4).unwrap();
        c.set_state(&id, SegmentState::Tiered, None, None, 5).unwrap();
        drop(c);
        let c = Catalog::open(&path).unwrap();
        let s = c.segment(&id).unwrap().unwrap();
        assert_eq!(s.state, SegmentState::Tiered);
        assert_eq!(s.object_key.as_deref(), Some("p/cdr/1/n-1/0.seg"));
        assert_eq!(s.checksum, Some(0xdead_beef));
        assert_eq!(s.attempts, 1);
        assert_eq!(s.last_error, None, "success clears the last error");
        let ranges = c.ranges_in_states(&[SegmentState::Tiered]).unwrap();
        assert_eq!(ranges, vec![("cdr".into(), range("e1", 0..5)), ("cdr".into(), range("e2", 7..12))]);
        assert!(c.ranges_in_states(&[SegmentState::Local]).unwrap().is_empty());
    }

    #[test]
    fn set_state_of_an_unknown_segment_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&dir.path().join(CATALOG_FILE)).unwrap();
        let err = c.set_state(&row("cdr", 0, 42).id, SegmentState::Tiered, None, None, 0).unwrap_err();
        assert!(err.to_string().contains("cdr/0/42"), "{err}");
    }

    #[test]
    fn edges_add_up_and_stream_bytes_split_by_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&dir.path().join(CATALOG_FILE)).unwrap();
        let d = |seen, records, lag| EdgeDelta {
            edge: "e1".into(),
            last_seen_ms: seen,
            records,
            bytes: records * 10,
            gaps: 1,
            lag_ms: lag,
        };
        c.add_edges(&[d(100, 5, 7)]).unwrap();
        c.add_edges(&[d(90, 3, 9)]).unwrap();
        let e = c.edges().unwrap();
        assert_eq!(
            e,
            vec![EdgeRow { edge: "e1".into(), last_seen_ms: 100, records: 8, bytes: 80, gaps: 2, lag_ms: 9 }]
        );

        for (base, state) in [(0, SegmentState::LocalDeleted), (10, SegmentState::Tiered), (20, SegmentState::Local)] {
            c.insert_segment(&row("cdr", 0, base), &[], 0).unwrap();
            c.set_state(&row("cdr", 0, base).id, state, None, None, 0).unwrap();
        }
        c.insert_segment(&row("sensors", 0, 0), &[], 0).unwrap();
        let b = c.stream_bytes().unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].tiered_bytes, b[0].tiered_local_bytes, b[0].local_untiered_bytes), (8192, 4096, 4096));
        assert_eq!((b[0].backlog_segments, b[1].backlog_segments), (1, 1));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CATALOG_FILE);
        drop(Catalog::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = Catalog::open(&path).unwrap_err();
        assert!(matches!(err, CatalogError::TooNew { found: 99, .. }), "{err}");
    }
}
