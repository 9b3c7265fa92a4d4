//! `edge-agent log verify` and `log dump` as an operator runs them: the built binary over a
//! data directory of real files, written by the real log.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use base64::Engine;
use bytes::BytesMut;
use serde_json::Value;
use shared::batch::{
    Attr, Batch, BatchEncoder, BatchLimits, BatchMeta, Compression, GapReason, PayloadFormat, Record, encode_gap,
};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::segment::{self, FrameInfo};
use shared::log::storage::FsStorage;
use shared::log::verify::stream_dir;
use shared::log::{FsyncPolicy, Log, LogConfig, SegmentSummary};

const BIN: &str = env!("CARGO_BIN_EXE_edge-agent");
const T0_MS: i64 = 1_795_369_718_000;

/// A data directory and every record written to it.
struct DataDir {
    tmp: tempfile::TempDir,
    /// (stream, seq, record), in write order.
    records: Vec<(String, u64, Record)>,
}

impl DataDir {
    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn arg(&self) -> &str {
        self.path().to_str().expect("temp paths are UTF-8")
    }

    /// Segments of `stream` as the log sees them.
    fn segments(&self, stream: &str) -> Vec<SegmentSummary> {
        open_log(self.path(), stream).segments()
    }

    fn expected(&self, stream: &str, keep: impl Fn(u64) -> bool) -> Vec<(u64, Record)> {
        self.records.iter().filter(|(s, seq, _)| s == stream && keep(*seq)).map(|(_, q, r)| (*q, r.clone())).collect()
    }
}

/// Small segments so each stream has several; records that are text, binary and attributed.
fn config() -> LogConfig {
    LogConfig { segment_bytes_max: 4096, fsync: FsyncPolicy::Always, ..LogConfig::default() }
}

fn open_log(data: &Path, stream: &str) -> Log {
    Log::open(Arc::new(FsStorage), &stream_dir(data, stream), config(), 0).unwrap()
}

fn meta(stream: &str, seq: u64) -> BatchMeta {
    BatchMeta {
        producer: "edge-test".into(),
        epoch: Epoch(42),
        stream: stream.into(),
        base_seq: Seq(seq),
        payload_format: PayloadFormat::Json,
    }
}

fn record(stream: &str, seq: u64) -> Record {
    let payload: Vec<u8> = if stream == "sensors" && seq % 5 == 3 {
        vec![0xff, 0x00, 0x80, seq as u8] // not UTF-8: printed as payload_b64
    } else {
        // Hex noise so zstd cannot shrink the batches below a few segments' worth.
        let noise: String =
            (1..=4u64).map(|k| format!("{:016x}", (seq + k).wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
        format!(r#"{{"imsi":"20801{seq:010}","bytes_up":{},"note":"{noise}"}}"#, seq * 37).into_bytes()
    };
    let mut attrs = vec![Attr { key: "site".into(), value: "lyon-3".into() }];
    if seq.is_multiple_of(2) {
        attrs.push(Attr { key: "cell".into(), value: format!("cell-{}", seq % 7) });
    }
    Record {
        ts_ms: T0_MS + seq as i64 * 10,
        topic: format!("{stream}/site-1/dev-{}", seq % 3),
        payload: payload.into(),
        attrs,
    }
}

/// Appends `batches` data batches of `per_batch` records to `log`; a gap batch of 3 seqs goes
/// after batch number `gap_after`.
fn fill(
    log: &mut Log,
    stream: &str,
    batches: usize,
    per_batch: u64,
    gap_after: Option<usize>,
    compression: Compression,
) -> Vec<(String, u64, Record)> {
    let mut encoder = BatchEncoder::new(compression).unwrap();
    let mut written = Vec::new();
    for i in 0..batches {
        let base = log.next_offset().0;
        let records: Vec<Record> = (base..base + per_batch).map(|seq| record(stream, seq)).collect();
        let mut out = BytesMut::new();
        encoder.encode(&meta(stream, base), &records, &mut out).unwrap();
        log.append(&Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap(), 0).unwrap();
        written.extend(records.into_iter().enumerate().map(|(j, r)| (stream.to_owned(), base + j as u64, r)));
        if gap_after == Some(i) {
            let mut out = BytesMut::new();
            let at = log.next_offset().0;
            encode_gap(&meta(stream, at), 3, GapReason::DiskFullDropOldest, (T0_MS, T0_MS), &mut out).unwrap();
            log.append(&Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap(), 0).unwrap();
        }
    }
    written
}

/// Stream `cdr`: 24 batches of 4 text records, uncompressed, a gap of seqs [40, 43).
/// Stream `sensors`: 20 zstd batches of 5 records, some binary.
fn build() -> DataDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut records = fill(&mut open_log(tmp.path(), "cdr"), "cdr", 24, 4, Some(9), Compression::None);
    records.extend(fill(&mut open_log(tmp.path(), "sensors"), "sensors", 20, 5, None, Compression::Zstd { level: 1 }));
    let data = DataDir { tmp, records };
    assert!(data.segments("cdr").len() >= 4, "cdr needs several segments");
    assert!(data.segments("sensors").len() >= 2, "sensors needs several segments");
    data
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn dump(data: &DataDir, stream: &str, extra: &[&str]) -> Output {
    let mut args = vec!["log", "dump", "--data-dir", data.arg(), "--stream", stream];
    args.extend_from_slice(extra);
    run(&args)
}

fn verify(data: &DataDir) -> Output {
    run(&["log", "verify", "--data-dir", data.arg()])
}

/// Checks that `out` holds exactly `expected`, line by line, as the documented NDJSON.
fn assert_ndjson(out: &str, stream: &str, expected: &[(u64, Record)]) {
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    let seqs = |v: &[Value]| v.iter().map(|l| l["seq"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(seqs(&lines), expected.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    for (line, (seq, r)) in lines.iter().zip(expected) {
        assert_eq!(line["stream"], stream);
        assert_eq!(line["topic"], r.topic.as_str());
        let ts = line["ts"].as_str().unwrap();
        assert_eq!(shared::ndjson::parse_time_ms(ts), Some(r.ts_ms), "seq {seq}: {ts}");
        match std::str::from_utf8(&r.payload) {
            Ok(text) => assert_eq!((line["payload"].as_str(), line.get("payload_b64")), (Some(text), None)),
            Err(_) => {
                let b64 = line["payload_b64"].as_str().expect("binary payload as payload_b64");
                assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), r.payload.as_ref());
                assert!(line.get("payload").is_none());
            }
        }
        let attrs: serde_json::Map<String, Value> =
            r.attrs.iter().map(|a| (a.key.clone(), Value::from(a.value.as_str()))).collect();
        assert_eq!(line["attrs"], Value::Object(attrs), "seq {seq}");
        let keys: Vec<&str> = line.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "seq {seq}: {keys:?}");
    }
}

/// The frames of a segment file, from its bytes.
fn frames(seg: &SegmentSummary) -> Vec<FrameInfo> {
    segment::scan(&fs::read(&seg.path).unwrap(), seg.base, &BatchLimits::default()).frames
}

fn dir_listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap()).map(|e| (e.path(), e.metadata().unwrap().len())).collect();
    v.sort();
    v
}

#[test]
fn help_and_version() {
    let o = run(&["--version"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), format!("edge-agent {}\n", env!("CARGO_PKG_VERSION")));
    let o = run(&["--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("Backhaul edge agent") && stdout(&o).contains("log"), "{}", stdout(&o));
    for sub in [&["log", "--help"][..], &["log", "verify", "--help"], &["log", "dump", "--help"]] {
        let o = run(sub);
        assert!(o.status.success(), "{sub:?}");
    }
    assert!(stdout(&run(&["log", "dump", "--help"])).contains("--from-seq"));
    assert_eq!(run(&[]).status.code(), Some(2), "no command is a usage error");
    assert_eq!(run(&["log", "frobnicate"]).status.code(), Some(2));
}

#[test]
fn verify_clean_data_dir_exits_0_with_seq_ranges() {
    let data = build();
    let o = verify(&data);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    let cdr = out.lines().find(|l| l.starts_with("cdr: ")).expect(&out);
    let segs = data.segments("cdr").len();
    assert!(cdr.contains(&format!("{segs} segment(s), 25 batch(es) (1 gap), 96 record(s), seq [0, 99)")), "{cdr}");
    assert!(out.lines().any(|l| l.starts_with("sensors: ") && l.contains("100 record(s), seq [0, 100)")), "{out}");
    assert!(out.contains("2 stream(s) verified: no corruption"), "{out}");
}

#[test]
fn dump_prints_exactly_the_records_appended() {
    let data = build();
    for stream in ["cdr", "sensors"] {
        let o = dump(&data, stream, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_ndjson(&stdout(&o), stream, &data.expected(stream, |_| true));
    }
    let err = stderr(&dump(&data, "cdr", &[]));
    assert!(err.contains("cdr: 96 record(s) printed; 1 gap batch(es) covering 3 seq(s) not printed\n"), "{err}");
}

#[test]
fn dump_from_seq_and_limit() {
    let data = build();
    let o = dump(&data, "cdr", &["--from-seq", "7", "--limit", "5"]);
    assert_ndjson(&stdout(&o), "cdr", &data.expected("cdr", |s| (7..12).contains(&s)));
    // Inside the gap [40, 43): starts at the first record after it.
    let o = dump(&data, "cdr", &["--from-seq", "41", "--limit", "3"]);
    assert_ndjson(&stdout(&o), "cdr", &data.expected("cdr", |s| (43..46).contains(&s)));
    let o = dump(&data, "sensors", &["--from-seq", "97"]);
    assert_ndjson(&stdout(&o), "sensors", &data.expected("sensors", |s| s >= 97));
    let o = dump(&data, "sensors", &["--from-seq", "1000"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), ""));
    let o = dump(&data, "cdr", &["--limit", "0"]);
    assert_eq!(stdout(&o), "");
}

#[test]
fn zeroed_block_in_closed_segment_is_corruption_and_dump_skips_it() {
    let data = build();
    let seg = data.segments("cdr")[1].clone();
    let before = frames(&seg);
    let start = seg.bytes / 2 - 256;
    let zeroed = start..start + 512;
    let hit: Vec<&FrameInfo> = before.iter().filter(|f| f.pos < zeroed.end && f.pos + f.len > zeroed.start).collect();
    assert!(before.last().unwrap().pos >= zeroed.end, "good frames must follow the damage");
    let mut bytes = fs::read(&seg.path).unwrap();
    bytes[zeroed.start as usize..zeroed.end as usize].fill(0);
    fs::write(&seg.path, &bytes).unwrap();
    let at = format!("{}@{}: Damage: ", seg.path.display(), hit[0].pos);

    let o = verify(&data);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains(&at), "{}", stdout(&o));
    assert!(stdout(&o).contains("corruption in cdr"), "{}", stdout(&o));

    let lost = hit.first().unwrap().offset.0..hit.last().unwrap().end().0;
    let o = dump(&data, "cdr", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_ndjson(&stdout(&o), "cdr", &data.expected("cdr", |s| !lost.contains(&s)));
    assert!(stderr(&o).contains(&at), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 damaged range(s) skipped"), "{}", stderr(&o));
    assert_eq!(fs::read(&seg.path).unwrap(), bytes, "the tools must not repair");
}

#[test]
fn torn_tail_is_reported_but_not_corruption_and_left_alone() {
    let data = build();
    let seg = data.segments("cdr").last().unwrap().clone();
    let last = frames(&seg).pop().unwrap();
    OpenOptions::new().write(true).open(&seg.path).unwrap().set_len(seg.bytes - 10).unwrap();

    let o = verify(&data);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let at = format!("{}@{}: TornTail: ", seg.path.display(), last.pos);
    assert!(stdout(&o).contains(&at), "{}", stdout(&o));
    assert!(stdout(&o).contains(&format!("seq [0, {})", last.offset)), "{}", stdout(&o));

    let o = dump(&data, "cdr", &[]);
    assert_eq!(o.status.code(), Some(0));
    assert_ndjson(&stdout(&o), "cdr", &data.expected("cdr", |s| s < last.offset.0));
    assert!(stderr(&o).contains(&at), "{}", stderr(&o));
    assert_eq!(fs::metadata(&seg.path).unwrap().len(), seg.bytes - 10, "the tools must not truncate");
}

#[test]
fn missing_index_is_benign_and_not_rebuilt() {
    let data = build();
    let idx = data.segments("sensors")[0].path.with_extension("idx");
    fs::remove_file(&idx).unwrap();
    let o = verify(&data);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains(&format!("{}@0: IndexRebuilt: index missing", idx.display())), "{}", stdout(&o));
    let o = dump(&data, "sensors", &[]);
    assert_ndjson(&stdout(&o), "sensors", &data.expected("sensors", |_| true));
    assert!(!idx.exists(), "the tools must not write indexes");
}

#[test]
fn works_beside_a_writer() {
    let data = build();
    let dir = stream_dir(data.path(), "cdr");
    let mut writer = open_log(data.path(), "cdr");
    let more = fill(&mut writer, "cdr", 3, 4, None, Compression::None);
    let listing = dir_listing(&dir);

    assert_eq!(verify(&data).status.code(), Some(0));
    let o = dump(&data, "cdr", &["--from-seq", "99"]);
    let expected: Vec<(u64, Record)> = more.iter().map(|(_, s, r)| (*s, r.clone())).collect();
    assert_ndjson(&stdout(&o), "cdr", &expected);
    assert_eq!(dir_listing(&dir), listing, "read-only tools changed the directory");
    // The writer carries on.
    fill(&mut writer, "cdr", 1, 4, None, Compression::None);
    assert_eq!(writer.next_offset(), Offset(115));
}

#[test]
fn closed_stdout_ends_dump_quietly() {
    let data = build();
    let mut log = open_log(data.path(), "bulk");
    fill(&mut log, "bulk", 200, 10, None, Compression::Zstd { level: 1 }); // ~300 KiB of NDJSON
    let mut child = Command::new(BIN)
        .args(["log", "dump", "--data-dir", data.arg(), "--stream", "bulk"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap(); // `| head -1`
    let o = child.wait_with_output().unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!((&first["stream"], &first["seq"]), (&Value::from("bulk"), &Value::from(0)));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn missing_data_dir_or_stream_exits_2_naming_it() {
    let data = build();
    let missing = data.path().join("not-here");
    let o = run(&["log", "verify", "--data-dir", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(missing.to_str().unwrap()), "{}", stderr(&o));
    let o = run(&["log", "dump", "--data-dir", missing.to_str().unwrap(), "--stream", "cdr"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(missing.to_str().unwrap()), "{}", stderr(&o));

    let o = dump(&data, "nope", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains(r#"no stream "nope""#) && stderr(&o).contains("cdr, sensors"), "{}", stderr(&o));
    assert_eq!(dump(&data, "Bad/Name", &[]).status.code(), Some(2), "invalid stream name is a usage error");
    assert_eq!(run(&["log", "verify", "--data-dir", data.arg(), "--stream", "nope"]).status.code(), Some(2));
}
