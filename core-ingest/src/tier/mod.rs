//! Tiering: closed segments go to object storage, plan then act (DESIGN §5, STYLE "Tiering
//! is plan, then act").
//!
//! - [`manifest`]: object keys, segment facts and the manifest codec (pure).
//! - [`plan`]: what to upload and which local copies may go (pure).
//! - [`store`]: the object store named by the config.
//! - [`Tierer`]: the thin async shell. Each round: a snapshot of the closed segments from the
//!   store's writer → new segments into the catalog → plan → per segment: upload the segment
//!   object (multipart when large) → read it back and compare its CRC-32C → upload the index
//!   object → create-only PUT of the manifest → catalog `tiered`; then local copies that the
//!   plan lets go are removed through the writer and marked `local_deleted`.
//!
//! A crash between two steps is safe: a data object is rewritten with the same bytes under the
//! same key (and a retry that finds the same key with the same CRC skips the upload); a manifest
//! that already exists with the same CRC and length counts as written; the catalog moves only
//! after the bucket holds everything, and local files go only after the catalog says tiered.
//! Object store errors end the round and retry after a capped exponential backoff; they are
//! counted in `backhaul_core_tier_errors_total` and never lose data.

pub mod manifest;
pub mod plan;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use shared::batch::BatchLimits;
use shared::ranges::RangeSet;
use shared::wire::session::ProducerKey;
use thiserror::Error;

use crate::catalog::{Catalog, CatalogError, SegmentId, SegmentRow, SegmentState};
use crate::config::TierConfig;
use crate::metrics::Metrics;
use crate::store::StoreHandle;
use manifest::{MANIFEST_FORMAT, Manifest, ManifestRange, object_keys};
use plan::{PlanLimits, SegmentView};

/// Seq ranges in the bucket per (edge, epoch, stream).
pub type TieredRanges = HashMap<ProducerKey, RangeSet>;

/// What the catalog says is in the bucket, per producer.
pub fn tiered_ranges(catalog: &Catalog) -> Result<TieredRanges, CatalogError> {
    let mut out = TieredRanges::new();
    for (stream, r) in catalog.ranges_in_states(&[SegmentState::Tiered, SegmentState::LocalDeleted])? {
        out.entry(ProducerKey { edge: r.edge, epoch: r.epoch, stream }).or_default().insert(r.seqs);
    }
    Ok(out)
}

/// Seq ranges held in the bucket by earlier incarnations of `node` (a data directory rebuilt
/// after a disk loss: its catalog is gone, its objects are not). Walks
/// `<prefix>/<stream>/<partition>/<node>-*/` and reads the manifests there, skipping
/// `incarnation` (the current one, which the catalog covers). Damaged manifests are skipped
/// with a warning.
pub async fn earlier_incarnations_ranges(
    objects: &dyn ObjectStore,
    prefix: &str,
    node: &str,
    incarnation: u64,
) -> Result<Vec<(ProducerKey, std::ops::Range<u64>)>, object_store::Error> {
    use futures::TryStreamExt;
    let root = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let mine = format!("{node}-{incarnation:016x}");
    let mut out = Vec::new();
    for stream in objects.list_with_delimiter(root.as_ref()).await?.common_prefixes {
        for partition in objects.list_with_delimiter(Some(&stream)).await?.common_prefixes {
            for dir in objects.list_with_delimiter(Some(&partition)).await?.common_prefixes {
                let name = dir.filename().unwrap_or_default();
                let earlier = name
                    .strip_prefix(node)
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|inc| inc.len() == 16 && inc.bytes().all(|b| b.is_ascii_hexdigit()));
                if !earlier || name == mine {
                    continue;
                }
                let metas: Vec<_> = objects.list(Some(&dir)).try_collect().await?;
                for meta in metas.iter().filter(|m| m.location.as_ref().ends_with(manifest::MANIFEST_SUFFIX)) {
                    let key = meta.location.to_string();
                    let bytes = objects.get(&meta.location).await?.bytes().await?;
                    match Manifest::decode(&bytes, &key) {
                        Ok(m) => {
                            out.extend(m.producer_ranges().into_iter().map(|r| {
                                (ProducerKey { edge: r.edge, epoch: r.epoch, stream: m.stream.clone() }, r.seqs)
                            }))
                        }
                        Err(error) => tracing::warn!(%error, "skipping a damaged manifest"),
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT_MAX: usize = 4;

/// Errors of one tiering round.
#[derive(Debug, Error)]
pub enum TierError {
    /// The object store failed (retried next round).
    #[error("object store, key {key}: {source}")]
    ObjectStore {
        /// The key.
        key: String,
        /// The error.
        source: object_store::Error,
    },
    /// An object read back did not match what was written.
    #[error("object {key}: read back {got_len} bytes with CRC-32C {got_crc:08x}, wrote {len} bytes with {crc:08x}")]
    Verify {
        /// The key.
        key: String,
        /// Written length.
        len: u64,
        /// Written CRC-32C.
        crc: u32,
        /// Read length.
        got_len: u64,
        /// Read CRC-32C.
        got_crc: u32,
    },
    /// A manifest already exists for the key and describes other bytes.
    #[error("manifest {key} already exists for other bytes (CRC-32C {found:08x}, ours {ours:08x})")]
    ManifestConflict {
        /// The key.
        key: String,
        /// In the bucket.
        found: u32,
        /// Ours.
        ours: u32,
    },
    /// A local file could not be read.
    #[error("{}: {source}", path.display())]
    Local {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The store's writer refused or stopped.
    #[error("store: {0}")]
    Store(String),
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Segments uploaded.
    pub uploaded: usize,
    /// Local segments removed.
    pub deleted: usize,
    /// Closed segments not in the bucket after the round.
    pub backlog: usize,
}

/// The tierer: owns the object store client and shares the catalog.
#[derive(Debug)]
pub struct Tierer {
    config: TierConfig,
    store: StoreHandle,
    objects: Arc<dyn ObjectStore>,
    prefix: String,
    node: String,
    incarnation: u64,
    catalog: Arc<Mutex<Catalog>>,
    metrics: Arc<Metrics>,
    failures: u32,
    tiered: Option<tokio::sync::watch::Sender<Arc<TieredRanges>>>,
}

impl Tierer {
    /// A tierer for this node.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: TierConfig,
        store: StoreHandle,
        objects: Arc<dyn ObjectStore>,
        prefix: String,
        node: String,
        incarnation: u64,
        catalog: Arc<Mutex<Catalog>>,
        metrics: Arc<Metrics>,
    ) -> Tierer {
        Tierer { config, store, objects, prefix, node, incarnation, catalog, metrics, failures: 0, tiered: None }
    }

    /// Publishes what is in the bucket to `tx` (now, and after each round that tiered more).
    pub fn publish_tiered(&mut self, tx: tokio::sync::watch::Sender<Arc<TieredRanges>>) -> Result<(), CatalogError> {
        tx.send_replace(Arc::new(tiered_ranges(&self.catalog())?));
        self.tiered = Some(tx);
        Ok(())
    }

    /// Runs rounds every `interval` (after a failure: after the backoff) until `stop`.
    pub async fn drive(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let wait = match self.round().await {
                Ok(report) => {
                    self.failures = 0;
                    if report.uploaded + report.deleted > 0 {
                        tracing::info!(
                            uploaded = report.uploaded,
                            deleted = report.deleted,
                            backlog = report.backlog,
                            "tiering round"
                        );
                    }
                    self.config.interval.0
                }
                Err(error) => {
                    self.failures = self.failures.saturating_add(1);
                    self.metrics.tier.errors.inc();
                    let wait =
                        backoff_ms(self.config.retry_backoff_initial.0, self.config.retry_backoff_max.0, self.failures);
                    tracing::warn!(%error, failures = self.failures, retry_in_ms = wait, "tiering failed; will retry");
                    wait
                }
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    }

    /// One round: catalog new segments, upload what is due, remove local copies that may go.
    pub async fn round(&mut self) -> Result<RoundReport, TierError> {
        let snap = self.store.tier_snapshot().await.map_err(|r| TierError::Store(r.message))?;
        let now = now_ms();
        self.catalog().add_edges(&snap.edges)?;
        let known: HashMap<SegmentId, SegmentRow> =
            self.catalog().segments()?.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut views = Vec::new();
        for part in &snap.partitions {
            for (i, seg) in part.closed.iter().enumerate() {
                let id = SegmentId { stream: part.stream.clone(), partition: part.partition, base_offset: seg.base.0 };
                let state = match known.get(&id) {
                    Some(row) => row.state,
                    None => {
                        self.register(&id, seg, part.known.get(i).and_then(Option::as_ref), now).await?;
                        SegmentState::Local
                    }
                };
                let modified_ms = modified_ms(&seg.path).unwrap_or(now);
                let index_bytes = std::fs::metadata(seg.path.with_extension("idx")).map_or(0, |m| m.len());
                views.push(SegmentView {
                    id,
                    end_offset: seg.end.0,
                    disk_bytes: seg.bytes + index_bytes,
                    modified_ms,
                    state,
                });
            }
        }
        let limits = PlanLimits {
            tier_after_ms: self.config.tier_after.0,
            local_retention_ms: self.config.local_retention.0,
            disk_budget_bytes: self.config.disk_budget_bytes.0,
        };
        let plan = plan::plan(&views, snap.disk_bytes, now, &limits);
        let mut report = RoundReport::default();
        let untiered = views.iter().filter(|v| !v.state.is_tiered()).count();
        let mut untiered_bytes: u64 = views.iter().filter(|v| !v.state.is_tiered()).map(|v| v.disk_bytes).sum();
        self.metrics.tier.backlog_segments.set(untiered as u64);
        self.metrics.tier.backlog_bytes.set(untiered_bytes);
        for id in &plan.upload {
            let row = self.catalog().segment(id)?.ok_or_else(|| {
                TierError::Catalog(CatalogError::Corrupt {
                    path: "catalog".into(),
                    what: format!("segment {id} vanished"),
                })
            })?;
            if let Err(e) = self.tier_segment(&row).await {
                self.catalog().note_failure(id, &e.to_string(), now_ms())?;
                if report.uploaded > 0
                    && let Some(tx) = &self.tiered
                {
                    tx.send_replace(Arc::new(tiered_ranges(&self.catalog())?));
                }
                self.metrics.tier.backlog_segments.set((untiered - report.uploaded) as u64);
                self.metrics.tier.backlog_bytes.set(untiered_bytes);
                return Err(e);
            }
            report.uploaded += 1;
            let done: u64 = views.iter().filter(|v| &v.id == id).map(|v| v.disk_bytes).sum();
            untiered_bytes = untiered_bytes.saturating_sub(done);
        }
        report.backlog = untiered - report.uploaded;
        if report.uploaded > 0
            && let Some(tx) = &self.tiered
        {
            tx.send_replace(Arc::new(tiered_ranges(&self.catalog())?));
        }
        self.metrics.tier.backlog_segments.set(report.backlog as u64);
        self.metrics.tier.backlog_bytes.set(untiered_bytes);
        for release in plan.delete_local {
            let removed = self
                .store
                .release(release.stream.clone(), release.partition, shared::ids::Offset(release.below))
                .await
                .map_err(TierError::Store)?;
            for seg in removed {
                let id =
                    SegmentId { stream: release.stream.clone(), partition: release.partition, base_offset: seg.base.0 };
                self.catalog().set_state(&id, SegmentState::LocalDeleted, None, None, now_ms())?;
                self.metrics.tier.local_deleted.inc();
                report.deleted += 1;
            }
        }
        Ok(report)
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a newly closed segment, with its producers' ranges: as the writer saw them go in
    /// (`known`), else read from the file (a segment begun before this process started).
    async fn register(
        &self,
        id: &SegmentId,
        seg: &shared::log::SegmentSummary,
        known: Option<&crate::store::SegmentFacts>,
        now: i64,
    ) -> Result<(), TierError> {
        let facts = match known {
            Some(k) => crate::store::SegmentFacts::clone(k),
            None => {
                let bytes = tokio::fs::read(&seg.path)
                    .await
                    .map_err(|source| TierError::Local { path: seg.path.clone(), source })?;
                let facts = manifest::segment_facts(&bytes, seg.base.0, &BatchLimits::default());
                for d in &facts.damage {
                    tracing::error!(segment = %seg.path.display(), pos = d.pos, len = d.len, reason = %d.reason, "damaged bytes in a closed segment; tiering what is readable as is");
                }
                crate::store::SegmentFacts { records: facts.records, ranges: facts.ranges }
            }
        };
        let row = SegmentRow {
            id: id.clone(),
            next_offset: seg.end.0,
            ts_range: seg.ts_range,
            bytes: seg.bytes,
            records: facts.records,
            local_path: seg.path.clone(),
            object_key: None,
            checksum: None,
            state: SegmentState::Local,
            attempts: 0,
            last_error: None,
        };
        self.catalog().insert_segment(&row, &facts.ranges, now)?;
        Ok(())
    }

    /// Upload → verify → index → manifest → catalog.
    async fn tier_segment(&self, row: &SegmentRow) -> Result<(), TierError> {
        let id = &row.id;
        let keys = object_keys(&self.prefix, &id.stream, id.partition, &self.node, self.incarnation, id.base_offset);
        let path = &row.local_path;
        let bytes =
            Bytes::from(tokio::fs::read(path).await.map_err(|source| TierError::Local { path: path.clone(), source })?);
        let crc = crc32c::crc32c(&bytes);
        self.catalog().set_state(id, SegmentState::Uploading, Some(&keys.segment), Some(crc), now_ms())?;
        self.put_data(&keys.segment, bytes.clone(), crc).await?;
        let index_path = path.with_extension("idx");
        if let Ok(index) = tokio::fs::read(&index_path).await {
            let index_crc = crc32c::crc32c(&index);
            self.put_data(&keys.index, Bytes::from(index), index_crc).await?;
        }
        let facts = manifest::segment_facts(&bytes, id.base_offset, &BatchLimits::default());
        let m = Manifest {
            format: MANIFEST_FORMAT,
            node: self.node.clone(),
            incarnation: format!("{:016x}", self.incarnation),
            stream: id.stream.clone(),
            partition: id.partition,
            base_offset: id.base_offset,
            next_offset: row.next_offset,
            segment_key: keys.segment.clone(),
            index_key: keys.index.clone(),
            bytes: bytes.len() as u64,
            crc32c: crc,
            records: facts.records,
            min_ts_ms: facts.ts_range.map(|t| t.0),
            max_ts_ms: facts.ts_range.map(|t| t.1),
            ranges: facts
                .ranges
                .iter()
                .map(|r| ManifestRange { edge: r.edge.clone(), epoch: r.epoch, start: r.seqs.start, end: r.seqs.end })
                .collect(),
        };
        self.put_manifest(&keys.manifest, &m).await?;
        self.catalog().set_state(id, SegmentState::Tiered, None, None, now_ms())?;
        self.metrics.tier.segments.inc();
        self.metrics.tier.bytes.add(bytes.len() as u64);
        Ok(())
    }

    /// Writes an idempotent data object: skipped if the key already holds these bytes, else
    /// written (multipart when large) and read back.
    async fn put_data(&self, key: &str, bytes: Bytes, crc: u32) -> Result<(), TierError> {
        let path = ObjectPath::from(key);
        let err = |source| TierError::ObjectStore { key: key.into(), source };
        match self.objects.head(&path).await {
            Ok(meta) if meta.size == bytes.len() as u64 => {
                if let Ok((got_len, got_crc)) = self.object_crc(&path).await
                    && (got_len, got_crc) == (bytes.len() as u64, crc)
                {
                    return Ok(());
                }
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(err(e)),
        }
        let len = bytes.len() as u64;
        if len >= self.config.multipart_threshold_bytes.0 {
            let upload = self.objects.put_multipart(&path).await.map_err(err)?;
            let part = self.config.part_bytes.0 as usize;
            let mut w = WriteMultipart::new_with_chunk_size(upload, part);
            let mut rest = bytes;
            while !rest.is_empty() {
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT_MAX).await {
                    let _ = w.abort().await;
                    return Err(err(e));
                }
                w.put(rest.split_to(part.min(rest.len())));
            }
            w.finish().await.map_err(err)?;
        } else {
            self.objects.put(&path, PutPayload::from(bytes)).await.map_err(err)?;
        }
        let (got_len, got_crc) = self.object_crc(&path).await?;
        if (got_len, got_crc) != (len, crc) {
            return Err(TierError::Verify { key: key.into(), len, crc, got_len, got_crc });
        }
        Ok(())
    }

    async fn object_crc(&self, path: &ObjectPath) -> Result<(u64, u32), TierError> {
        let err = |source| TierError::ObjectStore { key: path.to_string(), source };
        let got = self.objects.get(path).await.map_err(err)?.bytes().await.map_err(err)?;
        Ok((got.len() as u64, crc32c::crc32c(&got)))
    }

    /// The create-only manifest PUT; an existing manifest for the same bytes counts as written.
    async fn put_manifest(&self, key: &str, m: &Manifest) -> Result<(), TierError> {
        let path = ObjectPath::from(key);
        let err = |source| TierError::ObjectStore { key: key.into(), source };
        match self.objects.put_opts(&path, PutPayload::from(m.encode()), PutMode::Create.into()).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let got = self.objects.get(&path).await.map_err(err)?.bytes().await.map_err(err)?;
                match Manifest::decode(&got, key) {
                    Ok(found) if found.crc32c == m.crc32c && found.bytes == m.bytes => Ok(()),
                    Ok(found) => {
                        Err(TierError::ManifestConflict { key: key.into(), found: found.crc32c, ours: m.crc32c })
                    }
                    Err(_) => Err(TierError::ManifestConflict { key: key.into(), found: 0, ours: m.crc32c }),
                }
            }
            Err(e) => Err(err(e)),
        }
    }
}

/// The wait after `failures` failures in a row: `initial`, doubling, at most `max`.
pub fn backoff_ms(initial: u64, max: u64, failures: u32) -> u64 {
    let shift = failures.saturating_sub(1).min(32);
    initial.saturating_mul(1u64 << shift).min(max)
}

fn modified_ms(path: &Path) -> Option<i64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b: Vec<u64> = (1..=6).map(|f| backoff_ms(100, 1_000, f)).collect();
        assert_eq!(b, vec![100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(backoff_ms(100, 1_000, u32::MAX), 1_000, "no overflow");
    }
}
