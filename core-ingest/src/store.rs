//! The core's store: one log per (stream, partition), a writer thread that group-commits, and
//! dedup by durable seq ranges per (edge, epoch, stream) (DESIGN §5).
//!
//! The writer takes everything queued, appends what is new, fsyncs every log it touched once,
//! and only then answers: a group commit of many edges' batches. A batch whose whole range was
//! already appended is a duplicate: it is acknowledged after the same fsync (the original was
//! appended earlier, so that fsync covers it too) and not stored again. On start the dedup
//! state is rebuilt from the logs.
//!
//! Layout: `<data_dir>/streams/<stream>/partitions` (the count, fixed when the stream is
//! created) and `<data_dir>/streams/<stream>/<partition>/` (a log).

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shared::batch::{Batch, BatchHeader, BatchParts};
use shared::ids::Offset;
use shared::log::storage::{FsStorage, Storage};
use shared::log::verify::stream_dir;
use shared::log::{FsyncPolicy, Log, LogConfig};
use shared::ranges::RangeSet;
use shared::wire::ErrorCode;
use shared::wire::session::{DedupIndex, ProducerKey, Refusal, Verdict};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Most inputs the writer takes before it syncs and answers.
const DRAIN_MAX: usize = 4096;

/// Settings of the store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Partitions of a new stream.
    pub partitions: u32,
    /// Segment size.
    pub segment_bytes_max: u64,
    /// Append to the logs with direct IO ([`LogConfig::direct_io`]).
    pub direct_io: bool,
    /// Past this many bytes of logs on disk, appends wait unanswered (backpressure) until the
    /// tierer frees room; nothing untiered is ever deleted for room.
    pub disk_budget_bytes: u64,
    /// Seq ranges held in tiered segments whose local copies are gone (from the catalog), so a
    /// batch resent after its segment left the disk is acknowledged, not stored twice.
    pub tiered_ranges: Vec<(ProducerKey, Range<u64>)>,
}

/// What the tierer learns from the writer in one round.
#[derive(Clone, Debug, Default)]
pub struct TierSnapshot {
    /// Closed segments of every partition, oldest first.
    pub partitions: Vec<PartitionSegments>,
    /// Bytes of all logs on disk.
    pub disk_bytes: u64,
    /// Per-edge counters since the last snapshot.
    pub edges: Vec<crate::catalog::EdgeDelta>,
    /// Whether appends are waiting for room (disk budget reached).
    pub backpressure: bool,
}

/// The closed segments of one partition.
#[derive(Clone, Debug)]
pub struct PartitionSegments {
    /// Stream.
    pub stream: String,
    /// Partition.
    pub partition: u32,
    /// Closed segments (the active one is not listed), oldest first.
    pub closed: Vec<shared::log::SegmentSummary>,
    /// For each closed segment, its facts when the writer saw every batch of it go in (it was
    /// opened and closed while this process ran, since the last snapshot): the tierer then
    /// need not read the file back. Handed out once.
    pub known: Vec<Option<SegmentFacts>>,
}

/// What the writer learned of a segment while appending to it: the same records and producer
/// ranges a scan of the file would find (`tier::manifest::segment_facts`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentFacts {
    /// Offsets covered by its batches.
    pub records: u64,
    /// Seq ranges per (edge, epoch), sorted.
    pub ranges: Vec<crate::catalog::ProducerRange>,
}

/// The facts of a partition's active segment, gathered append by append.
#[derive(Debug, Default)]
struct ActiveFacts {
    base: Offset,
    /// False when the segment held batches before this process opened it: then the facts
    /// are partial and the tierer reads the file.
    complete: bool,
    records: u64,
    /// Seqs by edge, then epoch (looked up by `&str`: no allocation per batch).
    producers: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, RangeSet>>,
}

impl ActiveFacts {
    fn of(log: &Log) -> ActiveFacts {
        let base = log.active_base();
        ActiveFacts { base, complete: log.next_offset() == base, records: 0, producers: Default::default() }
    }

    fn add(&mut self, h: &BatchHeader) {
        self.records += u64::from(h.record_count);
        let epochs = match self.producers.get_mut(h.producer.as_str()) {
            Some(epochs) => epochs,
            None => self.producers.entry(h.producer.clone()).or_default(),
        };
        epochs.entry(h.epoch.0).or_default().insert(h.base_seq.0..h.end_seq().0);
    }

    fn finish(self) -> SegmentFacts {
        let ranges = self
            .producers
            .into_iter()
            .flat_map(|(edge, epochs)| {
                epochs
                    .into_iter()
                    .flat_map(|(epoch, set)| {
                        set.ranges()
                            .iter()
                            .map(|r| crate::catalog::ProducerRange { edge: edge.clone(), epoch, seqs: r.clone() })
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        SegmentFacts { records: self.records, ranges }
    }
}

/// How an append ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Appended and fsynced.
    Durable,
    /// Already held; not stored again.
    Duplicate,
}

/// Requests to the writer thread.
#[derive(Debug)]
pub enum StoreInput {
    /// Store a batch of `key` covering `range`; answered after the covering fsync.
    Append(Box<AppendRequest>),
    /// The durable ranges of `keys` (for a WELCOME).
    Held {
        /// Whose.
        keys: Vec<ProducerKey>,
        /// The answer, in the same order.
        reply: oneshot::Sender<Vec<RangeSet>>,
    },
    /// Closed segments, disk use and edge counters, for the tierer.
    TierSnapshot {
        /// The answer.
        reply: oneshot::Sender<TierSnapshot>,
    },
    /// The tierer has these segments in the bucket: remove local segments of `stream`'s
    /// `partition` below `below`. Answers with what was removed.
    Release {
        /// Stream.
        stream: String,
        /// Partition.
        partition: u32,
        /// Offset below which segments go.
        below: Offset,
        /// The answer.
        reply: oneshot::Sender<Result<Vec<shared::log::SegmentSummary>, String>>,
    },
    /// Sync and stop.
    Shutdown,
}

/// An appended batch waiting for the sync: its key, seqs, verdict, oldest event time, reply.
type Answer = (Arc<ProducerKey>, Range<u64>, Stored, i64, Reply);

/// A batch to store; answered after the covering fsync.
#[derive(Debug)]
pub struct AppendRequest {
    /// Whose (shared: every batch of a data stream has the same).
    pub key: Arc<ProducerKey>,
    /// Its seqs.
    pub range: Range<u64>,
    /// The batch, in the pieces it arrived in.
    pub batch: BatchParts,
    /// The answer.
    pub reply: Reply,
}

/// Where the answer to an append goes.
pub type Reply = oneshot::Sender<Result<Stored, Refusal>>;

/// A handle to send requests to the writer.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    tx: mpsc::Sender<StoreInput>,
}

impl StoreHandle {
    /// Stores a batch; resolves once it is durable (or known held).
    pub async fn append(
        &self,
        key: impl Into<Arc<ProducerKey>>,
        range: Range<u64>,
        batch: impl Into<BatchParts>,
    ) -> Result<Stored, Refusal> {
        self.append_pipelined(key, range, batch).await?.await.map_err(|_| stopped())?
    }

    /// Queues a batch and returns the receiver of its answer, so a data stream can pipeline.
    pub async fn append_pipelined(
        &self,
        key: impl Into<Arc<ProducerKey>>,
        range: Range<u64>,
        batch: impl Into<BatchParts>,
    ) -> Result<oneshot::Receiver<Result<Stored, Refusal>>, Refusal> {
        let (reply, rx) = oneshot::channel();
        let request = Box::new(AppendRequest { key: key.into(), range, batch: batch.into(), reply });
        self.tx.send(StoreInput::Append(request)).await.map_err(|_| stopped())?;
        Ok(rx)
    }

    /// The durable ranges of `keys`.
    pub async fn held(&self, keys: Vec<ProducerKey>) -> Result<Vec<RangeSet>, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreInput::Held { keys, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Closed segments, disk use and edge counters.
    pub async fn tier_snapshot(&self) -> Result<TierSnapshot, Refusal> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(StoreInput::TierSnapshot { reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Removes local segments of a partition below `below` (they are in the bucket).
    pub async fn release(
        &self,
        stream: String,
        partition: u32,
        below: Offset,
    ) -> Result<Vec<shared::log::SegmentSummary>, String> {
        let (reply, rx) = oneshot::channel();
        let input = StoreInput::Release { stream, partition, below, reply };
        self.tx.send(input).await.map_err(|_| "the store is stopping".to_string())?;
        rx.await.map_err(|_| "the store is stopping".to_string())?
    }

    /// Asks the writer to sync and stop.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(StoreInput::Shutdown).await;
    }
}

fn stopped() -> Refusal {
    Refusal { code: ErrorCode::Internal, message: "the store is stopping".into() }
}

struct StreamLogs {
    logs: Vec<Log>,
    /// Per partition, the facts of its active segment.
    facts: Vec<ActiveFacts>,
}

/// The writer's state.
pub struct Store {
    config: StoreConfig,
    storage: Arc<dyn Storage>,
    streams: HashMap<String, StreamLogs>,
    appended: DedupIndex,
    durable: DedupIndex,
    metrics: Arc<Metrics>,
    /// Appends waiting for room on disk (unanswered: backpressure). Bounded by the edges'
    /// in-flight windows: an edge sends no more than its window without acks.
    parked: Vec<AppendRequest>,
    edges: HashMap<String, crate::catalog::EdgeDelta>,
    /// Facts of segments closed since the last tier snapshot, by (stream, partition, base).
    closed_facts: HashMap<(String, usize, u64), SegmentFacts>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("streams", &self.streams.len()).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens every stream found under the data directory and rebuilds dedup from the logs.
    pub fn open(config: StoreConfig, metrics: Arc<Metrics>) -> std::io::Result<Store> {
        let storage: Arc<dyn Storage> = Arc::new(FsStorage);
        let mut store = Store {
            config,
            storage,
            streams: HashMap::new(),
            appended: DedupIndex::new(),
            durable: DedupIndex::new(),
            metrics,
            parked: Vec::new(),
            edges: HashMap::new(),
            closed_facts: HashMap::new(),
        };
        for (key, range) in store.config.tiered_ranges.clone() {
            store.appended.insert(&key, range.clone());
            store.durable.insert(&key, range);
        }
        let streams_dir = store.config.data_dir.join(shared::log::verify::STREAMS_DIR);
        let names = match std::fs::read_dir(&streams_dir) {
            Ok(d) => d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for name in names.into_iter().filter(|n| shared::batch::is_valid_stream_name(n)) {
            store.open_stream(&name).map_err(|e| std::io::Error::other(format!("stream {name}: {e}")))?;
        }
        Ok(store)
    }

    /// Starts the writer thread; returns its handle and the thread.
    pub fn spawn(self, queue_len: usize) -> std::io::Result<(StoreHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(queue_len);
        let thread = std::thread::Builder::new().name("store".into()).spawn(move || self.run(rx))?;
        Ok((StoreHandle { tx }, thread))
    }

    fn run(mut self, mut rx: mpsc::Receiver<StoreInput>) {
        let mut waiting: Vec<Answer> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut stop = false;
            let mut next = Some(first);
            let mut taken = 0;
            let mut over_budget = self.disk_bytes() > self.config.disk_budget_bytes;
            if !over_budget {
                for req in std::mem::take(&mut self.parked) {
                    self.take_append(req, &mut waiting);
                }
            }
            while let Some(input) = next.take() {
                taken += 1;
                match input {
                    StoreInput::Append(req) if over_budget => {
                        if self.parked.is_empty() {
                            tracing::warn!(
                                budget = self.config.disk_budget_bytes,
                                "disk budget full of untiered data: holding acks until the tierer frees room"
                            );
                        }
                        self.metrics.tier.backpressure_waits.inc();
                        self.parked.push(*req);
                    }
                    StoreInput::Append(req) => self.take_append(*req, &mut waiting),
                    StoreInput::Held { keys, reply } => {
                        let _ = reply.send(keys.iter().map(|k| self.durable.held(k)).collect());
                    }
                    StoreInput::TierSnapshot { reply } => {
                        let _ = reply.send(self.tier_snapshot());
                    }
                    StoreInput::Release { stream, partition, below, reply } => {
                        let _ = reply.send(self.release(&stream, partition as usize, below));
                        over_budget = self.disk_bytes() > self.config.disk_budget_bytes;
                        if !over_budget {
                            for req in std::mem::take(&mut self.parked) {
                                self.take_append(req, &mut waiting);
                            }
                        }
                    }
                    StoreInput::Shutdown => stop = true,
                }
                if taken < DRAIN_MAX && !stop {
                    next = rx.try_recv().ok();
                }
            }
            let synced = self.sync_all();
            let now = now_ms();
            for (key, range, stored, min_ts, reply) in waiting.drain(..) {
                if synced && stored == Stored::Durable {
                    self.metrics.event_to_durable.observe_us(now.saturating_sub(min_ts).saturating_mul(1000));
                }
                let answer = if synced {
                    self.durable.insert(&key, range);
                    Ok(stored)
                } else {
                    Err(Refusal { code: ErrorCode::Internal, message: "fsync failed; send again".into() })
                };
                let _ = reply.send(answer);
            }
            if stop {
                break;
            }
        }
        self.sync_all();
        for req in self.parked.drain(..) {
            let _ = req.reply.send(Err(stopped()));
        }
    }

    fn take_append(&mut self, req: AppendRequest, waiting: &mut Vec<Answer>) {
        let AppendRequest { key, range, batch, reply } = req;
        match self.append(&key, &range, &batch) {
            Ok(stored) => waiting.push((key, range, stored, batch.header().min_ts_ms, reply)),
            Err(refusal) => {
                let _ = reply.send(Err(refusal));
            }
        }
    }

    /// Bytes of every log on disk.
    fn disk_bytes(&self) -> u64 {
        self.streams.values().flat_map(|s| s.logs.iter()).map(Log::disk_bytes).sum()
    }

    fn tier_snapshot(&mut self) -> TierSnapshot {
        let mut partitions = Vec::new();
        for (name, s) in &self.streams {
            for (p, log) in s.logs.iter().enumerate() {
                let mut closed = log.segments();
                closed.pop();
                let known = closed.iter().map(|seg| self.closed_facts.remove(&(name.clone(), p, seg.base.0))).collect();
                partitions.push(PartitionSegments { stream: name.clone(), partition: p as u32, closed, known });
            }
        }
        // Facts of segments already gone (retention) are of no use.
        self.closed_facts.clear();
        partitions.sort_by(|a, b| (&a.stream, a.partition).cmp(&(&b.stream, b.partition)));
        let mut edges: Vec<_> = self.edges.drain().map(|(_, d)| d).collect();
        edges.sort_by(|a, b| a.edge.cmp(&b.edge));
        TierSnapshot { partitions, disk_bytes: self.disk_bytes(), edges, backpressure: !self.parked.is_empty() }
    }

    fn release(&mut self, stream: &str, p: usize, below: Offset) -> Result<Vec<shared::log::SegmentSummary>, String> {
        let log = self
            .streams
            .get_mut(stream)
            .and_then(|s| s.logs.get_mut(p))
            .ok_or_else(|| format!("no partition {p} of stream {stream}"))?;
        log.release_below(below);
        log.apply_retention(now_ms()).map_err(|e| format!("stream {stream} partition {p}: {e}"))
    }

    /// Appends unless held; returns how it will be answered after the sync.
    fn append(&mut self, key: &ProducerKey, range: &Range<u64>, batch: &BatchParts) -> Result<Stored, Refusal> {
        match self.appended.check(key, range) {
            Verdict::Duplicate => {
                self.metrics.duplicates.inc();
                return Ok(Stored::Duplicate);
            }
            Verdict::Conflict => {
                self.metrics.conflicts.inc();
                let held = self.appended.held(key);
                return Err(Refusal {
                    code: ErrorCode::SeqConflict,
                    message: format!("seqs {range:?} partly overlap what is held {held:?}"),
                });
            }
            Verdict::New { handover } => {
                if handover {
                    self.metrics.handovers.inc();
                    tracing::info!(edge = %key.edge, epoch = %format!("{:016x}", key.epoch), stream = %key.stream, from_seq = range.start, "handover: first data of this producer on this node");
                }
            }
        }
        let partition = self.partition_of(key);
        let internal = |e: String| Refusal { code: ErrorCode::Internal, message: e };
        let logs = self.stream_logs(&key.stream).map_err(internal)?;
        let log = &mut logs.logs[partition];
        match log.append_parts(batch, now_ms()) {
            Ok(appended) => {
                let facts = &mut logs.facts[partition];
                let base = log.active_base();
                let mut closed = None;
                if facts.base != base {
                    // The log rolled: this batch opened the new segment.
                    let fresh = ActiveFacts { base, complete: appended.offset == base, ..ActiveFacts::default() };
                    closed = Some(std::mem::replace(facts, fresh)).filter(|done| done.complete);
                }
                facts.add(batch.header());
                if let Some(done) = closed {
                    self.closed_facts.insert((key.stream.clone(), partition, done.base.0), done.finish());
                }
                if batch.header().is_gap() {
                    self.metrics.gaps.inc();
                }
                self.metrics.batches_stored.inc();
                if !batch.header().is_gap() {
                    self.metrics.records_stored.add(u64::from(batch.header().record_count));
                }
                self.metrics.bytes_stored.add(batch.len() as u64);
                self.note_edge(batch.header());
                self.appended.insert(key, range.clone());
                Ok(Stored::Durable)
            }
            Err(e) => {
                tracing::error!(stream = %key.stream, partition, error = %e, "append failed");
                let code = if e.is_retryable() { ErrorCode::Overloaded } else { ErrorCode::Internal };
                if log.is_poisoned() {
                    self.reopen(&key.stream, partition);
                }
                Err(Refusal { code, message: format!("append failed: {e}") })
            }
        }
    }

    /// Fsyncs every log with unsynced appends; false if any failed (those are reopened).
    fn sync_all(&mut self) -> bool {
        let (mut ok, mut synced) = (true, false);
        let mut failed = Vec::new();
        for (name, s) in &mut self.streams {
            for (p, log) in s.logs.iter_mut().enumerate() {
                if !log.needs_sync() {
                    continue;
                }
                synced = true;
                if let Err(e) = log.sync() {
                    tracing::error!(stream = %name, partition = p, error = %e, "fsync failed; reopening the log");
                    failed.push((name.clone(), p));
                    ok = false;
                }
            }
        }
        for (name, p) in failed {
            self.reopen(&name, p);
            self.rebuild_dedup(&name, p);
        }
        if ok && synced {
            self.metrics.group_commits.inc();
        }
        ok
    }

    fn reopen(&mut self, stream: &str, p: usize) {
        let dir = partition_dir(&self.config.data_dir, stream, p);
        match Log::open(self.storage.clone(), &dir, self.log_config(), now_ms()) {
            Ok(log) => {
                if let Some(s) = self.streams.get_mut(stream) {
                    s.facts[p] = ActiveFacts::of(&log);
                    s.logs[p] = log;
                }
            }
            Err(e) => tracing::error!(stream, partition = p, error = %e, "reopening failed; will retry"),
        }
    }

    /// After a failed fsync the log was reopened through recovery: what it holds now is the
    /// truth (an fsync that failed may have lost writes for good). Rebuilds the dedup state
    /// of the producers of that partition from it, so what was lost is taken again when sent.
    fn rebuild_dedup(&mut self, stream: &str, p: usize) {
        let n = self.streams.get(stream).map_or(0, |s| s.logs.len());
        let mine = |k: &ProducerKey| k.stream == stream && partition_of(&k.edge, n) == p;
        self.appended.retain(|k| !mine(k));
        self.durable.retain(|k| !mine(k));
        for (key, range) in self.config.tiered_ranges.iter().filter(|(k, _)| mine(k)) {
            self.appended.insert(key, range.clone());
            self.durable.insert(key, range.clone());
        }
        let Some(log) = self.streams.get_mut(stream).map(|s| &mut s.logs[p]) else { return };
        if let Err(e) = read_headers(log, |key, range| {
            self.appended.insert(&key, range.clone());
            self.durable.insert(&key, range);
        }) {
            tracing::error!(stream, partition = p, error = %e, "rebuilding dedup failed");
        }
    }

    fn note_edge(&mut self, h: &BatchHeader) {
        let now = now_ms();
        let d = match self.edges.get_mut(h.producer.as_str()) {
            Some(d) => d,
            None => self
                .edges
                .entry(h.producer.clone())
                .or_insert_with(|| crate::catalog::EdgeDelta { edge: h.producer.clone(), ..Default::default() }),
        };
        d.last_seen_ms = now;
        d.bytes += h.batch_len() as u64;
        d.lag_ms = now.saturating_sub(h.max_ts_ms);
        if h.is_gap() {
            d.gaps += 1;
        } else {
            d.records += u64::from(h.record_count);
        }
    }

    fn partition_of(&self, key: &ProducerKey) -> usize {
        let n = self.streams.get(&key.stream).map_or(self.config.partitions as usize, |s| s.logs.len());
        partition_of(&key.edge, n)
    }

    fn stream_logs(&mut self, stream: &str) -> Result<&mut StreamLogs, String> {
        if !self.streams.contains_key(stream) {
            self.open_stream(stream)?;
        }
        Ok(self.streams.get_mut(stream).expect("just opened"))
    }

    fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes_max: self.config.segment_bytes_max,
            fsync: FsyncPolicy::Interval { interval_ms: 0 },
            direct_io: self.config.direct_io,
            ..LogConfig::default()
        }
    }

    /// Opens (creating if new) a stream's partition logs and reads their batches into dedup.
    fn open_stream(&mut self, stream: &str) -> Result<(), String> {
        let dir = stream_dir(&self.config.data_dir, stream);
        let count_file = dir.join("partitions");
        let partitions = match std::fs::read_to_string(&count_file) {
            Ok(t) => t.trim().parse::<u32>().map_err(|_| format!("{}: not a number", count_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.storage.create_dir_all(&dir).map_err(|e| e.to_string())?;
                write_synced(&count_file, &format!("{}\n", self.config.partitions)).map_err(|e| e.to_string())?;
                self.storage.sync_dir(&dir).map_err(|e| e.to_string())?;
                self.config.partitions
            }
            Err(e) => return Err(format!("{}: {e}", count_file.display())),
        };
        let mut logs = Vec::with_capacity(partitions as usize);
        for p in 0..partitions as usize {
            let mut log = Log::open(
                self.storage.clone(),
                &partition_dir(&self.config.data_dir, stream, p),
                self.log_config(),
                now_ms(),
            )
            .map_err(|e| e.to_string())?;
            for problem in log.problems() {
                tracing::warn!(stream, partition = p, %problem, "log recovery");
            }
            let (appended, durable) = (&mut self.appended, &mut self.durable);
            read_headers(&mut log, |key, range| {
                appended.insert(&key, range.clone());
                durable.insert(&key, range);
            })
            .map_err(|e| e.to_string())?;
            logs.push(log);
        }
        let facts = logs.iter().map(ActiveFacts::of).collect();
        self.streams.insert(stream.into(), StreamLogs { logs, facts });
        Ok(())
    }
}

/// The partition of `edge` among `n`: FNV-1a of the edge id, stable across builds and
/// toolchains (std's hasher is not), so an edge's batches stay in one partition.
pub fn partition_of(edge: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in edge.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

/// Calls `f` with the producer key and seq range of every batch `log` holds.
fn read_headers(log: &mut Log, mut f: impl FnMut(ProducerKey, Range<u64>)) -> Result<(), shared::log::LogError> {
    let mut from = log.start_offset();
    while from < log.committed_offset() {
        let read = log.read(from, 8 << 20)?;
        for b in &read.batches {
            let h = b.batch.header();
            f(
                ProducerKey { edge: h.producer.clone(), epoch: h.epoch.0, stream: h.stream.clone() },
                h.base_seq.0..h.end_seq().0,
            );
        }
        if read.next <= from {
            break;
        }
        from = read.next;
    }
    Ok(())
}

/// Directory of partition `p` of `stream`.
pub fn partition_dir(data_dir: &Path, stream: &str, p: usize) -> PathBuf {
    stream_dir(data_dir, stream).join(p.to_string())
}

/// Writes `path` whole or not at all: a temp file, fsynced, renamed over it (the caller
/// fsyncs the directory).
fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Reads every batch of every partition of `stream` (for tools and tests).
pub fn read_stream(data_dir: &Path, stream: &str) -> std::io::Result<Vec<(usize, Offset, Batch)>> {
    let dir = stream_dir(data_dir, stream);
    let partitions: usize =
        std::fs::read_to_string(dir.join("partitions"))?.trim().parse().map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    for p in 0..partitions {
        let cfg = LogConfig { read_only: true, ..LogConfig::default() };
        let mut log = Log::open(Arc::new(FsStorage), &partition_dir(data_dir, stream, p), cfg, 0)
            .map_err(std::io::Error::other)?;
        let mut from = log.start_offset();
        while from < log.committed_offset() {
            let read = log.read(from, 8 << 20).map_err(std::io::Error::other)?;
            out.extend(read.batches.into_iter().map(|b| (p, b.offset, b.batch)));
            if read.next <= from {
                break;
            }
            from = read.next;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use shared::batch::{BatchEncoder, BatchLimits, BatchMeta, Compression, PayloadFormat, Record};
    use shared::ids::{Epoch, Seq};

    fn batch(k: u64) -> Batch {
        batch_of("e1", 1, k)
    }

    fn batch_of(edge: &str, epoch: u64, k: u64) -> Batch {
        let records: Vec<Record> = (0..10)
            .map(|i| Record { ts_ms: 1_000 + i, topic: "t".into(), payload: vec![b'x'; 2000].into(), attrs: vec![] })
            .collect();
        let meta = BatchMeta {
            producer: edge.into(),
            epoch: Epoch(epoch),
            stream: "cdr".into(),
            base_seq: Seq(k * 10),
            payload_format: PayloadFormat::Raw,
        };
        let mut out = BytesMut::new();
        BatchEncoder::new(Compression::None).unwrap().encode(&meta, &records, &mut out).unwrap();
        Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
    }

    fn key() -> ProducerKey {
        ProducerKey { edge: "e1".into(), epoch: 1, stream: "cdr".into() }
    }

    #[test]
    fn a_full_disk_budget_holds_acks_until_room_is_freed() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            data_dir: dir.path().into(),
            partitions: 1,
            segment_bytes_max: 64 << 10,
            direct_io: true,
            disk_budget_bytes: 200 << 10,
            tiered_ranges: vec![],
        };
        let metrics = Arc::new(Metrics::default());
        let (handle, thread) = Store::open(config, metrics.clone()).unwrap().spawn(8).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // ~20 KB batches: past 200 KiB the next append is held, not refused.
            let mut k = 0;
            let held = loop {
                let rx = handle.append_pipelined(key(), k * 10..k * 10 + 10, batch(k)).await.unwrap();
                let snap = handle.tier_snapshot().await.unwrap();
                if k == 0 {
                    let e = &snap.edges[0];
                    assert_eq!((e.edge.as_str(), e.records, e.gaps), ("e1", 10, 0), "{e:?}");
                    assert!(e.bytes > 20_000 && e.last_seen_ms > 0, "{e:?}");
                }
                if snap.backpressure {
                    break rx;
                }
                assert_eq!(rx.await.unwrap().unwrap(), Stored::Durable);
                k += 1;
                assert!(k < 100, "the budget never filled");
            };
            let snap = handle.tier_snapshot().await.unwrap();
            assert!(snap.disk_bytes > 200 << 10);
            assert!(snap.edges.is_empty(), "edge counters go to the tierer once");
            assert_eq!(metrics.tier.backpressure_waits.get(), 1);
            let mut held = held;
            assert!(held.try_recv().is_err(), "no answer while the disk budget is full");

            // The tierer frees room (here: everything closed goes); the held append lands.
            let closed = &snap.partitions[0].closed;
            let below = closed.last().unwrap().end;
            let removed = handle.release("cdr".into(), 0, below).await.unwrap();
            assert_eq!(removed.len(), closed.len());
            assert_eq!(held.await.unwrap().unwrap(), Stored::Durable);
            assert!(!handle.tier_snapshot().await.unwrap().backpressure);
            handle.shutdown().await;
        });
        thread.join().unwrap();
    }

    #[test]
    fn logs_append_with_direct_io_as_configured() {
        for direct_io in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let config = StoreConfig {
                data_dir: dir.path().into(),
                partitions: 2,
                segment_bytes_max: 64 << 10,
                direct_io,
                disk_budget_bytes: u64::MAX,
                tiered_ranges: vec![],
            };
            let mut store = Store::open(config, Arc::new(Metrics::default())).unwrap();
            let logs = &store.stream_logs("cdr").unwrap().logs;
            // The temp dir's file system does O_DIRECT here: the direct path is really taken.
            assert!(logs.iter().all(|l| l.is_direct_io() == direct_io), "direct_io = {direct_io}");
        }
    }

    #[test]
    fn seeded_tiered_ranges_make_a_resent_batch_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            data_dir: dir.path().into(),
            partitions: 1,
            segment_bytes_max: 64 << 10,
            direct_io: true,
            disk_budget_bytes: u64::MAX,
            tiered_ranges: vec![(key(), 0..20)],
        };
        let (handle, thread) = Store::open(config, Arc::new(Metrics::default())).unwrap().spawn(8).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            assert_eq!(handle.append(key(), 10..20, batch(1)).await.unwrap(), Stored::Duplicate);
            assert_eq!(handle.append(key(), 20..30, batch(2)).await.unwrap(), Stored::Durable);
            let held = handle.held(vec![key()]).await.unwrap();
            assert!(held[0].contains_range(&(0..30)) && held[0].ranges().len() == 1, "{held:?}");
            handle.shutdown().await;
        });
        thread.join().unwrap();
    }

    #[test]
    fn the_writer_hands_the_tierer_what_a_scan_of_each_closed_segment_would_find() {
        let dir = tempfile::tempdir().unwrap();
        let config = || StoreConfig {
            data_dir: dir.path().into(),
            partitions: 1,
            segment_bytes_max: 64 << 10,
            disk_budget_bytes: u64::MAX,
            tiered_ranges: vec![],
            direct_io: true,
        };
        let producers = [("e1", 1), ("e2", 7), ("e1", 2)];
        let send = |handle: &StoreHandle, rt: &tokio::runtime::Runtime, ks: std::ops::Range<u64>| {
            rt.block_on(async {
                for k in ks {
                    // Every third k of a producer is skipped, so its ranges have holes.
                    for (edge, epoch) in producers {
                        if (k + epoch) % 3 == 0 {
                            continue;
                        }
                        let key = ProducerKey { edge: edge.into(), epoch, stream: "cdr".into() };
                        let stored = handle.append(key, k * 10..k * 10 + 10, batch_of(edge, epoch, k)).await.unwrap();
                        assert_eq!(stored, Stored::Durable);
                    }
                }
            })
        };
        let scan = |seg: &shared::log::SegmentSummary| {
            let facts = crate::tier::manifest::segment_facts(
                &std::fs::read(&seg.path).unwrap(),
                seg.base.0,
                &BatchLimits::default(),
            );
            assert!(facts.damage.is_empty() && facts.tail_reason.is_none());
            SegmentFacts { records: facts.records, ranges: facts.ranges }
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

        let (handle, thread) = Store::open(config(), Arc::new(Metrics::default())).unwrap().spawn(8).unwrap();
        send(&handle, &rt, 0..8);
        let snap = rt.block_on(handle.tier_snapshot()).unwrap();
        let part = &snap.partitions[0];
        assert!(part.closed.len() >= 3, "{} closed segments", part.closed.len());
        assert_eq!(part.known.len(), part.closed.len());
        for (seg, known) in part.closed.iter().zip(&part.known) {
            let known = known.as_ref().unwrap_or_else(|| panic!("no facts for {}", seg.path.display()));
            assert_eq!(known, &scan(seg), "{}", seg.path.display());
            assert!(known.ranges.iter().any(|r| r.edge == "e2" && r.epoch == 7), "{known:?}");
        }
        let again = rt.block_on(handle.tier_snapshot()).unwrap();
        assert!(again.partitions[0].known.iter().all(Option::is_none), "facts are handed out once");
        rt.block_on(handle.shutdown());
        thread.join().unwrap();

        // After a restart the active segment holds batches the new writer never saw: its facts
        // are partial, so none are handed out for it; the segments after it are known again.
        let (handle, thread) = Store::open(config(), Arc::new(Metrics::default())).unwrap().spawn(8).unwrap();
        let before = rt.block_on(handle.tier_snapshot()).unwrap().partitions[0].closed.len();
        send(&handle, &rt, 8..16);
        let snap = rt.block_on(handle.tier_snapshot()).unwrap();
        let part = &snap.partitions[0];
        assert!(part.closed.len() >= before + 2, "{} then {}", before, part.closed.len());
        assert!(part.known[before].is_none(), "the segment begun before the restart is read, not guessed");
        for (seg, known) in part.closed.iter().zip(&part.known).skip(before + 1) {
            assert_eq!(known.as_ref(), Some(&scan(seg)), "{}", seg.path.display());
        }
        rt.block_on(handle.shutdown());
        thread.join().unwrap();
    }
}
