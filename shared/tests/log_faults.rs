//! Named fault and behaviour tests of the log, on real files (`FsStorage`) where the fault can
//! be made with plain file operations, and on the simulator for failing fsyncs and full disks.
//!
//! `log_faults_direct.rs` includes this file again with the active segment appended through
//! direct IO ([`LogConfig::direct_io`]); [`direct_io`] tells the two crates apart.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use shared::batch::{Batch, BatchEncoder, BatchLimits, BatchMeta, Compression, GapReason, PayloadFormat, Record};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::sim::{Faults, SimStorage};
use shared::log::storage::FsStorage;
use shared::log::{FsyncPolicy, Log, LogConfig, LogError, ProblemKind, Retention, segment_file_name};

/// A batch of `n` records of ~300 bytes with event times from `ts`, one ms apart.
fn batch(seq: u64, n: u32, ts: i64) -> Batch {
    let meta = BatchMeta {
        producer: "edge-7".into(),
        epoch: Epoch(42),
        stream: "cdr".into(),
        base_seq: Seq(seq),
        payload_format: PayloadFormat::Json,
    };
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            ts_ms: ts + i64::from(i),
            topic: format!("cdr/site-1/probe-{i}"),
            payload: format!("{{\"seq\":{},\"pad\":\"{}\"}}", seq + u64::from(i), "x".repeat(280)).into(),
            attrs: vec![],
        })
        .collect();
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::None).unwrap().encode(&meta, &records, &mut out).unwrap();
    Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
}

/// Whether this build of the tests appends with direct IO (the `log_faults_direct` crate).
fn direct_io() -> bool {
    env!("CARGO_CRATE_NAME") == "log_faults_direct"
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 10,
        segment_age_ms: 0,
        index_interval_bytes: 1024,
        fsync: FsyncPolicy::Always,
        direct_io: direct_io(),
        ..LogConfig::default()
    }
}

/// Appends `count` batches of 4 records (seq = offset), event time = 1000 × seq.
fn fill(log: &mut Log, count: u64) {
    for _ in 0..count {
        let next = log.next_offset().0;
        log.append(&batch(next, 4, next as i64 * 1000), 0).unwrap();
    }
    log.sync().unwrap();
}

/// Every batch's offset, reading the whole committed log.
fn read_all(log: &mut Log) -> (Vec<u64>, Vec<shared::log::Problem>) {
    let (mut offsets, mut damage) = (Vec::new(), Vec::new());
    let mut from = log.start_offset();
    while from < log.committed_offset() {
        let r = log.read(from, 4096).unwrap();
        for b in &r.batches {
            assert_eq!(b.batch.header().base_seq.0, b.offset.0, "batch read at the wrong offset");
            offsets.push(b.offset.0);
        }
        damage.extend(r.damage);
        if r.next == from {
            break;
        }
        from = r.next;
    }
    (offsets, damage)
}

fn open_fs(dir: &Path) -> Log {
    open_fs_with(dir, config())
}

fn open_fs_with(dir: &Path, config: LogConfig) -> Log {
    let log = Log::open(Arc::new(FsStorage), dir, config, 0).unwrap();
    // The temp dir is on ext4 here: the direct path must not hide behind its fallback.
    assert_eq!(log.is_direct_io(), direct_io(), "direct IO in use");
    log
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn recovery_truncates_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 5);
    let next = log.next_offset();
    drop(log);
    // Half a frame written when the power went.
    let last = segment_files(&dir).pop().unwrap();
    let good_len = fs::metadata(&last).unwrap().len();
    let partial = batch(next.0, 4, 0);
    let mut frame = Vec::new();
    shared::log::segment::encode_frame(next, good_len, partial.bytes(), &mut frame);
    OpenOptions::new().append(true).open(&last).unwrap().write_all(&frame[..frame.len() / 2]).unwrap();

    let mut log = open_fs(&dir);
    assert_eq!(log.next_offset(), next);
    assert_eq!(log.problems().len(), 1);
    assert_eq!(log.problems()[0].kind, ProblemKind::TornTail);
    assert_eq!(log.problems()[0].pos, good_len);
    assert_eq!(fs::metadata(&last).unwrap().len(), good_len, "torn tail truncated on disk");
    let (offsets, damage) = read_all(&mut log);
    assert_eq!(offsets, (0..5).map(|i| i * 4).collect::<Vec<_>>());
    assert!(damage.is_empty());
    fill(&mut log, 1);
    drop(log);
    let mut log = open_fs(&dir);
    assert!(log.problems().is_empty(), "{:?}", log.problems());
    assert_eq!(read_all(&mut log).0.len(), 6);
}

#[test]
fn recovery_truncates_zero_padding_after_the_last_frame() {
    // A direct write pads the last block with zeros and cuts them off afterwards: a crash in
    // between leaves them on disk. They are a torn tail, not damage that stops the log.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 5);
    let expected = read_all(&mut log).0;
    drop(log);
    let last = segment_files(&dir).pop().unwrap();
    let good_len = fs::metadata(&last).unwrap().len();
    assert_ne!(good_len % 4096, 0, "the test wants a partial last block");
    let padded = good_len.next_multiple_of(4096) + 4096;
    OpenOptions::new().write(true).open(&last).unwrap().set_len(padded).unwrap();

    let mut log = open_fs(&dir);
    assert_eq!(log.problems().len(), 1, "{:?}", log.problems());
    assert_eq!(log.problems()[0].kind, ProblemKind::TornTail);
    assert_eq!(log.problems()[0].pos, good_len);
    assert_eq!(fs::metadata(&last).unwrap().len(), good_len, "padding truncated on disk");
    let (offsets, damage) = read_all(&mut log);
    assert_eq!(offsets, expected);
    assert!(damage.is_empty(), "{damage:?}");
    fill(&mut log, 3);
    drop(log);
    let mut log = open_fs(&dir);
    assert!(log.problems().is_empty(), "{:?}", log.problems());
    assert_eq!(read_all(&mut log).0.len(), expected.len() + 3);
}

#[test]
fn a_batch_in_pieces_is_stored_as_the_whole_batch() {
    // The core appends batches in the pieces they arrived in: cut anywhere (inside the header
    // too, in pieces of one byte), they read back as the same batch at the same offsets.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    let mut expected = Vec::new();
    for (k, step) in [1usize, 7, 100, 1000, 5000].into_iter().enumerate() {
        let whole = batch(log.next_offset().0, 3 + k as u32, 0);
        let bytes = whole.bytes().clone();
        let pieces: Vec<bytes::Bytes> =
            (0..bytes.len()).step_by(step).map(|at| bytes.slice(at..(at + step).min(bytes.len()))).collect();
        assert_eq!(pieces.len(), bytes.len().div_ceil(step));
        let parts = shared::batch::BatchParts::from_pieces(pieces, &BatchLimits::default()).unwrap();
        let appended = log.append_parts(&parts, 0).unwrap();
        assert_eq!(appended.offset.0, whole.header().base_seq.0);
        expected.push(whole);
    }
    log.sync().unwrap();
    drop(log);
    let mut log = open_fs(&dir);
    assert!(log.problems().is_empty(), "{:?}", log.problems());
    let read = log.read(Offset(0), 1 << 20).unwrap();
    let got: Vec<Batch> = read.batches.into_iter().map(|b| b.batch).collect();
    assert_eq!(got, expected);
}

#[test]
fn group_commit_on_files_reads_only_what_was_synced() {
    // Under direct IO the unsynced frames are not in the file yet: reads must stop before them
    // rather than take the short file for damage.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let cfg = LogConfig { fsync: FsyncPolicy::Interval { interval_ms: 5 }, ..config() };
    let mut log = open_fs_with(&dir, cfg);
    for round in 0..30u64 {
        let next = log.next_offset().0;
        log.append(&batch(next, 4, 0), 0).unwrap();
        log.append(&batch(next + 4, 4, 0), 0).unwrap();
        let (offsets, damage) = read_all(&mut log);
        assert!(damage.is_empty(), "round {round}: {damage:?}");
        // A roll syncs the closing segment, so a round's first batch may be committed already.
        let committed = log.committed_offset().0;
        assert!(committed < log.next_offset().0, "round {round}: the second batch waits for a sync");
        assert_eq!(offsets, (0..committed / 4).map(|i| i * 4).collect::<Vec<_>>(), "round {round}");
        assert_eq!(log.offset_for_time(0).unwrap(), (round > 0).then_some(Offset(0)));
        log.sync().unwrap();
    }
    assert!(log.segments().len() > 2, "rolled under group commit");
    // Appended but never synced: written at close as the page cache would hold it.
    let next = log.next_offset().0;
    log.append(&batch(next, 4, 0), 0).unwrap();
    drop(log);
    let mut log = open_fs_with(&dir, cfg);
    assert!(log.problems().is_empty(), "{:?}", log.problems());
    assert_eq!(read_all(&mut log).0.len(), 61);
}

#[test]
fn zeroed_block_mid_segment_is_skipped_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 40);
    let all = read_all(&mut log).0;
    drop(log);
    let segs = segment_files(&dir);
    assert!(segs.len() >= 3, "{segs:?}");
    // Zero 512 bytes in the middle of the first (closed) segment.
    let target = &segs[0];
    let mut bytes = fs::read(target).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 512].fill(0);
    fs::write(target, &bytes).unwrap();

    let mut log = open_fs(&dir);
    let (offsets, damage) = read_all(&mut log);
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].kind, ProblemKind::Damage);
    assert_eq!(&damage[0].file, target);
    assert!(damage[0].pos <= mid as u64 && damage[0].pos > 0);
    // Only the batches the zeroed bytes touched are gone; every later one reads.
    let lost: Vec<u64> = all.iter().copied().filter(|o| !offsets.contains(o)).collect();
    assert!((1..=2).contains(&lost.len()), "lost {lost:?}");
    assert_eq!(offsets.last(), all.last());
}

#[test]
fn zeroed_block_in_the_active_segment_is_reported_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 3);
    drop(log);
    let last = segment_files(&dir).pop().unwrap();
    let mut bytes = fs::read(&last).unwrap();
    bytes[100..612].fill(0);
    fs::write(&last, &bytes).unwrap();
    let mut log = open_fs(&dir);
    // Every batch was fsynced (policy always) before the damage: this is corruption.
    let p: Vec<_> = log.problems().iter().filter(|p| p.kind == ProblemKind::Damage).collect();
    assert_eq!(p.len(), 1, "{:?}", log.problems());
    assert_eq!(p[0].pos, 0);
    let (offsets, _) = read_all(&mut log);
    assert_eq!(offsets, vec![4, 8]);
}

#[test]
fn truncated_index_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 40);
    let expected = read_all(&mut log).0;
    drop(log);
    let idx = segment_files(&dir)[1].with_extension("idx");
    let len = fs::metadata(&idx).unwrap().len();
    OpenOptions::new().write(true).open(&idx).unwrap().set_len(len - 30).unwrap();

    let mut log = open_fs(&dir);
    assert!(log.problems().iter().any(|p| p.kind == ProblemKind::IndexRebuilt), "{:?}", log.problems());
    assert_eq!(fs::metadata(&idx).unwrap().len(), len, "index rewritten");
    assert_eq!(read_all(&mut log).0, expected);
    drop(log);
    assert!(open_fs(&dir).problems().is_empty());
}

#[test]
fn missing_index_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 40);
    let expected = read_all(&mut log).0;
    let t = log.offset_for_time(60_000).unwrap();
    drop(log);
    for seg in segment_files(&dir) {
        let _ = fs::remove_file(seg.with_extension("idx"));
    }
    let mut log = open_fs(&dir);
    let rebuilt = log.problems().iter().filter(|p| p.kind == ProblemKind::IndexRebuilt).count();
    assert_eq!(rebuilt, segment_files(&dir).len() - 1);
    assert_eq!(read_all(&mut log).0, expected);
    assert_eq!(log.offset_for_time(60_000).unwrap(), t);
}

#[test]
fn segment_deleted_under_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 40);
    let segs = log.segments();
    // A reader positioned in the first segment; store-and-forward releases it meanwhile.
    let cursor = Offset(4);
    log.release_below(segs[1].end);
    let removed = log.apply_retention(0).unwrap();
    assert_eq!(removed.len(), 2);
    assert!(!removed[0].path.exists());
    match log.read(cursor, 4096) {
        Err(LogError::OffsetOutOfRange { requested, start, .. }) => {
            assert_eq!((requested, start), (cursor, segs[2].base));
        }
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
    // A segment file removed behind the log's back: an error naming it, not a panic.
    drop(log);
    let mut log = open_fs(&dir);
    let victim = log.segments()[0].clone();
    fs::remove_file(&victim.path).unwrap();
    let err = log.read(victim.base, 4096).unwrap_err();
    assert!(err.to_string().contains(&segment_file_name(victim.base)), "{err}");
    // The rest of the log still reads.
    assert!(!log.read(log.segments()[1].base, 4096).unwrap().batches.is_empty());
}

#[test]
fn reads_stop_at_the_committed_offset_under_group_commit() {
    let sim = SimStorage::new();
    let cfg = LogConfig { fsync: FsyncPolicy::Interval { interval_ms: 5 }, ..config() };
    let mut log = Log::open(Arc::new(sim), Path::new("/d/cdr"), cfg, 0).unwrap();
    log.append(&batch(0, 4, 0), 0).unwrap();
    log.sync().unwrap();
    log.append(&batch(4, 4, 0), 0).unwrap();
    assert!(log.needs_sync());
    assert_eq!(log.committed_offset(), Offset(4));
    let r = log.read(Offset(0), 1 << 20).unwrap();
    assert_eq!(r.batches.len(), 1, "uncommitted batch must not be read");
    assert_eq!(r.next, Offset(4));
    log.sync().unwrap();
    assert_eq!(log.read(Offset(4), 1 << 20).unwrap().batches.len(), 1);
}

#[test]
fn fsync_failure_poisons_until_reopen() {
    let sim = SimStorage::new();
    let cfg = LogConfig { fsync: FsyncPolicy::Interval { interval_ms: 5 }, ..config() };
    let dir = Path::new("/d/cdr");
    let mut log = Log::open(Arc::new(sim.clone()), dir, cfg, 0).unwrap();
    fill(&mut log, 2);
    log.append(&batch(8, 4, 0), 0).unwrap();
    sim.set_faults(Faults { capacity_bytes: None, fail_syncs: 1 });
    assert!(log.sync().is_err());
    assert!(log.is_poisoned());
    assert_eq!(log.committed_offset(), Offset(8), "nothing after the last good fsync is committed");
    // Never retried: the next sync fails without touching the disk, appends are refused.
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    assert!(matches!(log.append(&batch(12, 4, 0), 0), Err(LogError::Poisoned { .. })));
    drop(log);
    let mut log = Log::open(Arc::new(sim), dir, cfg, 0).unwrap();
    assert!(!log.is_poisoned());
    let (offsets, _) = read_all(&mut log);
    assert!(offsets.starts_with(&[0, 4]));
    fill(&mut log, 1);
}

#[test]
fn full_disk_is_retryable_and_resumes() {
    let sim = SimStorage::new();
    let dir = Path::new("/d/cdr");
    let mut log = Log::open(Arc::new(sim.clone()), dir, config(), 0).unwrap();
    fill(&mut log, 3);
    sim.set_faults(Faults { capacity_bytes: Some(sim.used_bytes() + 100), fail_syncs: 0 });
    let err = log.append(&batch(12, 4, 0), 0).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(!log.is_poisoned());
    assert_eq!(log.next_offset(), Offset(12));
    sim.set_faults(Faults::default());
    log.append(&batch(12, 4, 0), 0).unwrap();
    let (offsets, damage) = read_all(&mut log);
    assert_eq!(offsets, vec![0, 4, 8, 12]);
    assert!(damage.is_empty(), "the partial frame was cut off: {damage:?}");
    drop(log);
    let log = Log::open(Arc::new(sim), dir, config(), 0).unwrap();
    assert!(log.problems().is_empty(), "{:?}", log.problems());
}

#[test]
fn find_by_timestamp_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open_fs(&tmp.path().join("cdr"));
    fill(&mut log, 40); // batch at offset o has event times o*1000 .. o*1000+3
    assert!(log.segments().len() > 3);
    assert_eq!(log.offset_for_time(i64::MIN).unwrap(), Some(Offset(0)));
    assert_eq!(log.offset_for_time(3).unwrap(), Some(Offset(0)));
    assert_eq!(log.offset_for_time(4).unwrap(), Some(Offset(4)));
    assert_eq!(log.offset_for_time(100_000).unwrap(), Some(Offset(100)));
    assert_eq!(log.offset_for_time(100_004).unwrap(), Some(Offset(104)));
    assert_eq!(log.offset_for_time(156_003).unwrap(), Some(Offset(156)));
    assert_eq!(log.offset_for_time(156_004).unwrap(), None);
}

#[test]
fn rolls_by_size_and_by_age() {
    let sim = SimStorage::new();
    let cfg = LogConfig { segment_age_ms: 1000, ..config() };
    let mut log = Log::open(Arc::new(sim), Path::new("/d/cdr"), cfg, 0).unwrap();
    log.append(&batch(0, 1, 0), 0).unwrap();
    log.append(&batch(1, 1, 0), 999).unwrap();
    assert_eq!(log.segments().len(), 1);
    log.append(&batch(2, 1, 0), 1000).unwrap();
    assert_eq!(log.segments().len(), 2, "rolled by age");
    for i in 3..60 {
        log.append(&batch(i, 1, 0), 1001).unwrap();
    }
    let segs = log.segments();
    assert!(segs.len() > 3, "rolled by size");
    assert!(segs.iter().all(|s| s.bytes <= 8 << 10));
    assert!(segs.windows(2).all(|w| w[0].end == w[1].base), "segments are contiguous");
}

#[test]
fn retention_by_bytes_and_age_and_release() {
    let sim = SimStorage::new();
    let dir = Path::new("/d/cdr");
    let mut log = Log::open(Arc::new(sim.clone()), dir, config(), 0).unwrap();
    fill(&mut log, 40);
    let n = log.segments().len();
    // Nothing released, no bounds: nothing goes.
    assert!(log.apply_retention(1_000_000).unwrap().is_empty());
    // Release part of the second segment: only the first goes.
    let segs = log.segments();
    log.release_below(Offset(segs[1].end.0 - 1));
    assert_eq!(log.apply_retention(0).unwrap().len(), 1);
    assert_eq!(log.start_offset(), segs[1].base);
    drop(log);

    let by_bytes = LogConfig { retention: Retention { bytes_max: Some(20 << 10), age_ms: None }, ..config() };
    let mut log = Log::open(Arc::new(sim.clone()), dir, by_bytes, 0).unwrap();
    log.apply_retention(0).unwrap();
    assert!(log.disk_bytes() <= 20 << 10, "{}", log.disk_bytes());
    assert!(log.segments().len() < n - 1);
    drop(log);

    // Newest event of the batches is 159_003 ms; keep 10 s of event time at now = 160 s.
    let by_age = LogConfig { retention: Retention { bytes_max: None, age_ms: Some(10_000) }, ..config() };
    let mut log = Log::open(Arc::new(sim), dir, by_age, 0).unwrap();
    let removed = log.apply_retention(160_000).unwrap();
    assert!(!removed.is_empty());
    assert!(removed.iter().all(|s| s.ts_range.unwrap().1 < 150_000), "{removed:?}");
    assert!(log.segments()[0].ts_range.unwrap().1 >= 150_000, "{:?}", log.segments()[0]);
}

#[test]
fn gap_batches_occupy_their_seqs() {
    let sim = SimStorage::new();
    let mut log = Log::open(Arc::new(sim), Path::new("/d/cdr"), config(), 0).unwrap();
    fill(&mut log, 1);
    let meta = BatchMeta {
        producer: "edge-7".into(),
        epoch: Epoch(42),
        stream: "cdr".into(),
        base_seq: Seq(4),
        payload_format: PayloadFormat::Json,
    };
    let mut out = BytesMut::new();
    shared::batch::encode_gap(&meta, 100, GapReason::DiskFullDropOldest, (0, 0), &mut out).unwrap();
    let gap = Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap();
    let a = log.append(&gap, 0).unwrap();
    assert_eq!((a.offset, a.end), (Offset(4), Offset(104)));
    fill(&mut log, 1);
    let r = log.read(Offset(0), 1 << 20).unwrap();
    assert_eq!(r.batches.iter().map(|b| b.offset.0).collect::<Vec<_>>(), vec![0, 4, 104]);
    assert!(r.batches[1].batch.header().is_gap());
}

#[test]
fn read_only_open_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr");
    let mut log = open_fs(&dir);
    fill(&mut log, 3);
    drop(log);
    let last = segment_files(&dir).pop().unwrap();
    OpenOptions::new().append(true).open(&last).unwrap().write_all(b"BHLF torn").unwrap();
    let before = fs::read(&last).unwrap();
    let ro = LogConfig { read_only: true, ..config() };
    let mut log = Log::open(Arc::new(FsStorage), &dir, ro, 0).unwrap();
    assert_eq!(read_all(&mut log).0, vec![0, 4, 8]);
    assert!(log.append(&batch(12, 1, 0), 0).is_err());
    assert_eq!(fs::read(&last).unwrap(), before, "read-only open must not truncate");
    let missing = Log::open(Arc::new(FsStorage), &tmp.path().join("nope"), ro, 0).unwrap();
    assert_eq!(missing.next_offset(), Offset(0));
}

#[test]
fn drop_oldest_replaces_a_segment_with_its_gap_atomically() {
    for seed in 0..40 {
        let sim = SimStorage::new();
        let dir = Path::new("/d/cdr");
        let mut log = Log::open(Arc::new(sim.clone()), dir, config(), 0).unwrap();
        fill(&mut log, 20);
        let victim = log.segments()[0].clone();
        let meta = BatchMeta {
            producer: "edge-7".into(),
            epoch: Epoch(42),
            stream: "cdr".into(),
            base_seq: Seq(victim.base.0),
            payload_format: PayloadFormat::Json,
        };
        let mut out = BytesMut::new();
        let count = (victim.end.0 - victim.base.0) as u32;
        shared::batch::encode_gap(&meta, count, GapReason::DiskFullDropOldest, victim.ts_range.unwrap(), &mut out)
            .unwrap();
        let gap = Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap();
        // A gap of the wrong size is refused.
        let mut bad = BytesMut::new();
        shared::batch::encode_gap(&meta, count + 1, GapReason::DiskFullDropOldest, (0, 0), &mut bad).unwrap();
        let bad = Batch::from_bytes(bad.freeze(), &BatchLimits::default()).unwrap();
        assert!(log.replace_segment_with_gap(victim.base, &bad).is_err());

        let used = sim.used_bytes();
        log.replace_segment_with_gap(victim.base, &gap).unwrap();
        assert!(sim.used_bytes() < used, "space reclaimed");
        let r = log.read(victim.base, 1).unwrap();
        assert!(r.batches[0].batch.header().is_gap());
        assert_eq!((r.batches[0].offset, r.next), (victim.base, victim.end));
        // Power loss right after: the data or the gap, never neither, and never damage.
        sim.crash(seed);
        let mut log = Log::open(Arc::new(sim.clone()), dir, config(), 0).unwrap();
        let first = log.read(victim.base, 1).unwrap();
        assert_eq!(first.batches[0].offset, victim.base, "seed {seed}");
        assert!(first.damage.is_empty(), "seed {seed}");
        let (offsets, damage) = read_all(&mut log);
        assert!(damage.is_empty());
        assert_eq!(offsets.last(), Some(&76), "seed {seed}");
    }
}
