//! Tiering end to end against a real S3-protocol server: moto's server (`python3 -m
//! moto.server`), started per test on an ephemeral loopback port and stopped by PID. The node is
//! the real binary; its data directory is filled beforehand through the store (the same writer
//! the QUIC acceptor feeds), so each test starts with known closed segments. What is proved
//! (DESIGN §5, §7): segments tier and their local copies go while reads still return every
//! record once; an object store that goes away mid-upload delays tiering but loses nothing and
//! no half-written object is taken for a segment; a node SIGKILLed while tiering resumes without
//! duplicate objects; a corrupt object is reported with key and offset while the records around
//! it still read; dedup covers batches whose segments left the disk.
//!
//! Every wait is bounded by [`WAIT`]; processes are killed when their handles drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use core_ingest::catalog::{CATALOG_FILE, Catalog, SegmentState};
use core_ingest::metrics::Metrics;
use core_ingest::store::{Store, StoreConfig, Stored};
use core_ingest::tier::manifest::Manifest;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;
use shared::batch::{BatchEncoder, BatchLimits, BatchMeta, Compression, PayloadFormat, Record};
use shared::ids::{Epoch, Offset, Seq};
use shared::tls;
use shared::wire::session::ProducerKey;

const BIN: &str = env!("CARGO_BIN_EXE_core-ingest");
const STREAM: &str = "cdr";
const BUCKET: &str = "backhaul-test";
const PREFIX: &str = "tier";
const RECORDS_PER_BATCH: u64 = 10;
const EDGES: [(&str, u64); 2] = [("edge-a", 0xa1a1_a1a1_a1a1_a1a1), ("edge-b", 7)];
/// The read API's token for `cdr` in the TLS test (given to the node through the environment).
const CDR_TOKEN: &str = "cdr-token-0123456789abcdef";
/// Bound on any single wait.
const WAIT: Duration = Duration::from_secs(60);

type Key = (String, u64, u64);

// ---- moto ----------------------------------------------------------------------------------

/// moto's S3 server on an ephemeral port, killed by PID on drop.
struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Moto {
    fn start() -> Moto {
        let addr = free_tcp_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let moto = Moto { child, addr };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let answer = raw_http(addr, &format!("PUT /{BUCKET} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"));
        assert!(answer.starts_with("HTTP/1.1 200"), "create bucket: {answer}");
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of moto that can go down: while down, open connections are cut and new
/// ones closed at once, as when the S3 endpoint dies mid-upload. It goes down by itself once
/// `cut_after_bytes` went upstream.
struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    upstream_bytes: Arc<AtomicU64>,
}

/// Whether the proxy's one automatic cut happened.
static TRIPPED: AtomicBool = AtomicBool::new(false);

impl Proxy {
    fn start(upstream: SocketAddr, cut_after_bytes: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let (d, n) = (down.clone(), upstream_bytes.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let (d1, d2, n1) = (d.clone(), d.clone(), n.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, &d1, Some((&n1, cut_after_bytes))));
                std::thread::spawn(move || pump(s2, c2, &d2, None));
            }
        });
        Proxy { addr, down, upstream_bytes }
    }
}

/// Copies `from` → `to` until either side closes or the proxy goes down.
fn pump(mut from: TcpStream, mut to: TcpStream, down: &AtomicBool, count: Option<(&AtomicU64, u64)>) {
    from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if down.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some((counter, cut)) = count
                    && counter.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > cut
                    && !TRIPPED.swap(true, Ordering::SeqCst)
                {
                    down.store(true, Ordering::SeqCst);
                    break;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

// ---- the node ------------------------------------------------------------------------------

/// A node directory (config, certificates, data) and, when running, its process.
struct Node {
    tmp: tempfile::TempDir,
    /// The test CA and its key (for edge certificates).
    ca: (String, String),
    listen: SocketAddr,
    s3: SocketAddr,
    admin: SocketAddr,
    read_api: SocketAddr,
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    /// A node whose bucket is reached at `s3`; `tier` adds lines to its `[tier]` table.
    fn new(s3: SocketAddr, tier: &str) -> Node {
        Node::with(s3, tier, "")
    }

    /// [`Node::new`], with `read_api` lines added to its `[read_api]` table.
    fn with(s3: SocketAddr, tier: &str, read_api: &str) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tmp.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let (ca, ca_key) = tls::generate_ca("Backhaul test CA", 11).unwrap();
        let (cert, key) = tls::issue_server_cert(&ca, &ca_key, &["localhost".into()], 10).unwrap();
        for (name, text) in [("ca.pem", &ca), ("server.pem", &cert), ("server.key", &key)] {
            std::fs::write(pki.join(name), text).unwrap();
        }
        let read_api_extra = read_api;
        let (listen, admin, read_api) = (free_udp_port(), free_tcp_port(), free_tcp_port());
        let config = format!(
            "node = \"test-core\"\ndata_dir = \"data\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
             partitions = 2\nsegment_bytes_max = \"64KiB\"\n\
             [tier]\nobject_store = \"s3://{BUCKET}/{PREFIX}\"\ntier_after = \"0ms\"\nlocal_retention = \"0ms\"\n\
             interval = \"100ms\"\nretry_backoff_initial = \"100ms\"\nretry_backoff_max = \"400ms\"\n{tier}\n\
             [read_api]\nlisten = \"{read_api}\"\n{read_api_extra}\n\
             [tls]\nca_file = \"pki/ca.pem\"\ncert_file = \"pki/server.pem\"\nkey_file = \"pki/server.key\"\n"
        );
        std::fs::write(tmp.path().join("core-ingest.toml"), config).unwrap();
        Node { tmp, ca: (ca, ca_key), listen, s3, admin, read_api, child: None, stderr: Arc::default() }
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("core-ingest.toml")
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("AWS_ENDPOINT", format!("http://{}", self.s3))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("CDR_TOKEN", CDR_TOKEN)
            .env("NO_COLOR", "1");
        c
    }

    fn start(&mut self) {
        let mut child = self
            .command()
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut r = std::io::BufReader::new(stderr);
            while std::io::BufRead::read_line(&mut r, &mut text).is_ok_and(|n| n > 0) {
                log.lock().unwrap().push_str(&text);
                text.clear();
            }
        });
        self.child = Some(child);
        self.wait_for("ready", |n| http_get(n.admin, "/readyz").starts_with("HTTP/1.1 200"));
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn metric(&self, name: &str) -> u64 {
        let text = http_get(self.admin, "/metrics");
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut(&Node) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}\n{}", self.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `closed` segments are tiered and their local copies gone.
    fn wait_tiered(&self, closed: u64) {
        self.wait_for("every closed segment tiered and deleted locally", |n| {
            n.metric("backhaul_core_tier_backlog_segments") == 0
                && n.metric("backhaul_core_local_segments_deleted_total") >= closed
        });
    }

    /// `core-ingest read --config … --stream cdr <extra>`.
    fn read(&self, extra: &[&str]) -> Output {
        self.command()
            .args(["read", "--config"])
            .arg(self.config())
            .args(["--stream", STREAM])
            .args(extra)
            .output()
            .unwrap()
    }

    /// Every record `read` prints, checked against its payload; panics on a failed read.
    fn read_all(&self) -> Vec<Key> {
        let o = self.read(&[]);
        assert_eq!(o.status.code(), Some(0), "read: {}", String::from_utf8_lossy(&o.stderr));
        keys_of(&String::from_utf8(o.stdout).unwrap())
    }

    /// The bucket as the node sees it.
    fn bucket(&self) -> Arc<dyn ObjectStore> {
        bucket_at(self.s3)
    }

    /// Segment files (`*.log`) on local disk.
    fn local_segments(&self) -> usize {
        let dir = self.data_dir().join("streams").join(STREAM);
        (0..2)
            .map(|p| {
                std::fs::read_dir(dir.join(p.to_string()))
                    .unwrap()
                    .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
                    .count()
            })
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The test bucket at the S3 endpoint `addr`.
fn bucket_at(addr: SocketAddr) -> Arc<dyn ObjectStore> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(format!("http://{addr}"))
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .build()
            .unwrap(),
    )
}

/// Fills `data_dir` through the store: `batches` batches per edge of [`EDGES`], records of
/// `payload_bytes`, segments of `segment_bytes`. Returns every record key and the number of
/// closed segments.
fn populate(data_dir: &Path, batches: u64, payload_bytes: usize, segment_bytes: u64) -> (Vec<Key>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    shared::identity::open_or_create(data_dir, core_ingest::run::IDENTITY_KIND).unwrap();
    let config = StoreConfig {
        data_dir: data_dir.into(),
        partitions: 2,
        segment_bytes_max: segment_bytes,
        direct_io: true,
        disk_budget_bytes: u64::MAX,
        tiered_ranges: vec![],
    };
    let store = Store::open(config, Arc::new(Metrics::default())).unwrap();
    let (handle, thread) = store.spawn(64).unwrap();
    let mut keys = Vec::new();
    rt.block_on(async {
        for k in 0..batches {
            for (edge, epoch) in EDGES {
                let range = k * RECORDS_PER_BATCH..(k + 1) * RECORDS_PER_BATCH;
                let key = ProducerKey { edge: edge.into(), epoch, stream: STREAM.into() };
                let batch = shared::batch::Batch::from_bytes(
                    batch_of(edge, epoch, range.clone(), payload_bytes),
                    &BatchLimits::default(),
                )
                .unwrap();
                assert_eq!(handle.append(key, range.clone(), batch).await.unwrap(), Stored::Durable);
                keys.extend(range.map(|s| (edge.to_string(), epoch, s)));
            }
        }
        handle.shutdown().await;
    });
    thread.join().unwrap();
    let logs: u64 = (0..2)
        .map(|p| {
            std::fs::read_dir(data_dir.join("streams").join(STREAM).join(p.to_string()))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
                .count() as u64
        })
        .sum();
    (keys, logs - 2)
}

fn batch_of(edge: &str, epoch: u64, range: std::ops::Range<u64>, payload_bytes: usize) -> Bytes {
    let records: Vec<Record> = range
        .clone()
        .map(|seq| {
            let mut payload =
                serde_json::json!({ "edge": edge, "epoch": format!("{epoch:016x}"), "seq": seq }).to_string();
            // Incompressible-ish filler so segments fill up.
            let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch;
            let filler: String = (0..payload_bytes.saturating_sub(payload.len()))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect();
            payload.insert_str(payload.len() - 1, &format!(",\"fill\":\"{filler}\""));
            Record {
                ts_ms: 1_795_369_718_000 + seq as i64,
                topic: format!("cdr/{edge}"),
                payload: payload.into_bytes().into(),
                attrs: vec![],
            }
        })
        .collect();
    let meta = BatchMeta {
        producer: edge.into(),
        epoch: Epoch(epoch),
        stream: STREAM.into(),
        base_seq: Seq(range.start),
        payload_format: PayloadFormat::Json,
    };
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::Zstd { level: 1 }).unwrap().encode(&meta, &records, &mut out).unwrap();
    out.freeze()
}

/// Record keys of NDJSON record lines (control lines skipped), each checked against its payload.
fn keys_of(ndjson: &str) -> Vec<Key> {
    ndjson
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            let edge = v.get("edge")?.as_str()?.to_string();
            let epoch = u64::from_str_radix(v["epoch"].as_str().unwrap(), 16).unwrap();
            let seq = v["seq"].as_u64().unwrap();
            assert_eq!(v["stream"], STREAM);
            let payload: Value = serde_json::from_str(v["payload"].as_str().unwrap()).unwrap();
            assert_eq!((payload["edge"].as_str(), payload["seq"].as_u64()), (Some(edge.as_str()), Some(seq)));
            Some((edge, epoch, seq))
        })
        .collect()
}

fn assert_exactly_once(got: &[Key], expected: &[Key]) {
    let mut counts: BTreeMap<&Key, u32> = BTreeMap::new();
    for k in got {
        *counts.entry(k).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "records read more than once: {twice:?}");
    let want: BTreeSet<&Key> = expected.iter().collect();
    let have: BTreeSet<&Key> = counts.keys().copied().collect();
    let missing: Vec<_> = want.difference(&have).take(5).collect();
    let extra: Vec<_> = have.difference(&want).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, unexpected {extra:?}");
}

/// Every object key under the test prefix.
fn list(bucket: &Arc<dyn ObjectStore>) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let prefix = ObjectPath::from(PREFIX);
    let mut keys: Vec<String> = rt
        .block_on(bucket.list(Some(&prefix)).try_collect::<Vec<_>>())
        .unwrap()
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    keys.sort();
    keys
}

fn get(bucket: &Arc<dyn ObjectStore>, key: &str) -> Bytes {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { bucket.get(&ObjectPath::from(key)).await.unwrap().bytes().await.unwrap() })
}

/// Each manifest's segment object is there, with the length and CRC-32C the manifest names,
/// and every data object belongs to a manifest. Returns the manifests.
fn check_bucket(bucket: &Arc<dyn ObjectStore>) -> Vec<Manifest> {
    check_bucket_with(bucket, false)
}

/// [`check_bucket`]; with `orphans_allowed`, data objects without a manifest yet (an upload
/// cut short) may be there — but no manifest may name bytes other than its segment's.
fn check_bucket_with(bucket: &Arc<dyn ObjectStore>, orphans_allowed: bool) -> Vec<Manifest> {
    let keys = list(bucket);
    let manifests: Vec<Manifest> = keys
        .iter()
        .filter(|k| k.ends_with(".manifest"))
        .map(|k| Manifest::decode(&get(bucket, k), k).unwrap())
        .collect();
    for m in &manifests {
        let seg = get(bucket, &m.segment_key);
        assert_eq!((seg.len() as u64, crc32c::crc32c(&seg)), (m.bytes, m.crc32c), "{}", m.segment_key);
        assert!(keys.contains(&m.index_key), "index object of {}", m.segment_key);
    }
    let named: BTreeSet<&String> = manifests.iter().flat_map(|m| [&m.segment_key, &m.index_key]).collect();
    let orphans: Vec<_> = keys.iter().filter(|k| !k.ends_with(".manifest") && !named.contains(k)).collect();
    assert!(orphans_allowed || orphans.is_empty(), "objects no manifest names: {orphans:?}");
    let mut segments: Vec<_> =
        manifests.iter().map(|m| (&m.node, &m.incarnation, m.partition, m.base_offset)).collect();
    segments.sort();
    segments.dedup();
    assert_eq!(segments.len(), manifests.len(), "one manifest per segment of a node incarnation");
    manifests
}

// ---- helpers ---------------------------------------------------------------------------------

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn free_tcp_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn raw_http(addr: SocketAddr, request: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    if s.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    raw_http(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"))
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// What an edge session saw: the WELCOME's held ranges of [`STREAM`], the first TIERED
/// frame's ranges (when asked to wait for one), the marks of the ack of a resent batch 0.
struct EdgeView {
    held: shared::ranges::RangeSet,
    tiered: Option<shared::ranges::RangeSet>,
    marks: u8,
}

/// Connects to `node` as `edge` (a certificate from the test CA), says HELLO, optionally waits
/// for TIERED, then resends batch 0 and reads its ack.
async fn edge_session(node: &Node, edge: &str, epoch: u64, wait_tiered: bool) -> EdgeView {
    use quinn::crypto::rustls::QuicClientConfig;
    use shared::quic::{read_frame, write_frame};
    use shared::wire::Frame;
    use shared::wire::frame::StreamOffer;
    let (cert, key) = tls::issue_edge_cert(&node.ca.0, &node.ca.1, edge, 10).unwrap();
    let tls = tls::client_config(node.ca.0.as_bytes(), cert.as_bytes(), key.as_bytes(), &[tls::ALPN_V1]).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep.connect_with(config, node.listen, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let streams = vec![StreamOffer { name: STREAM.into(), first_retained: 0, next: 1_000_000 }];
    write_frame(&mut send, &Frame::Hello { version: 1, epoch, edge_id: edge.into(), streams }).await.unwrap();
    let mut buf = shared::wire::FrameParts::default();
    let held = match tokio::time::timeout(WAIT, read_frame(&mut recv, &mut buf)).await.unwrap() {
        Ok(Some(Frame::Welcome { streams, .. })) => {
            streams.into_iter().find(|s| s.name == STREAM).map(|s| s.held).unwrap_or_default()
        }
        other => panic!("expected a welcome, got {other:?}"),
    };
    let tiered = if wait_tiered {
        match tokio::time::timeout(WAIT, read_frame(&mut recv, &mut buf)).await.unwrap() {
            Ok(Some(Frame::Tiered { stream, ranges })) if stream == STREAM => Some(ranges),
            other => panic!("expected TIERED, got {other:?}"),
        }
    } else {
        None
    };
    let (mut dsend, mut drecv) = conn.open_bi().await.unwrap();
    let open = Frame::Open { stream: STREAM.into(), lane: shared::wire::Lane::Live };
    write_frame(&mut dsend, &open).await.unwrap();
    write_frame(&mut dsend, &Frame::Batch(batch_of(edge, epoch, 0..RECORDS_PER_BATCH, 300))).await.unwrap();
    let mut dbuf = shared::wire::FrameParts::default();
    let marks = match tokio::time::timeout(WAIT, read_frame(&mut drecv, &mut dbuf)).await.unwrap() {
        Ok(Some(Frame::Ack { start: 0, end, marks })) if end == RECORDS_PER_BATCH => marks,
        other => panic!("expected the ack of batch 0, got {other:?}"),
    };
    conn.close(0u32.into(), b"done");
    EdgeView { held, tiered, marks }
}

// ---- the tests -----------------------------------------------------------------------------

#[test]
fn segments_tier_local_copies_go_and_reads_return_every_record_once() {
    let moto = Moto::start();
    let mut node = Node::new(moto.addr, "");
    let (expected, closed) = populate(&node.data_dir(), 150, 300, 64 << 10);
    assert!(closed >= 6, "the test needs several closed segments, got {closed}");
    node.start();
    node.wait_tiered(closed);
    assert_eq!(node.metric("backhaul_core_tiered_segments_total"), closed);
    assert_eq!(node.local_segments(), 2, "only the active segment of each partition stays on disk");

    let manifests = check_bucket(&node.bucket());
    assert_eq!(manifests.len() as u64, closed);
    assert!(manifests.iter().all(|m| m.segment_key.contains("/test-core-")), "keys carry node and incarnation");

    // CLI: everything once; then paged with the cursor, still everything once.
    assert_exactly_once(&node.read_all(), &expected);
    let (mut paged, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let limit = (expected.len() / 3 + 1).to_string();
        let mut args = vec!["--limit", limit.as_str()];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let o = node.read(&args);
        assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
        paged.extend(keys_of(&String::from_utf8(o.stdout).unwrap()));
        pages += 1;
        let err = String::from_utf8(o.stderr).unwrap();
        match err.lines().find_map(|l| l.strip_prefix("next_cursor=")) {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert!(pages >= 3, "the limit cut the read into pages ({pages})");
    assert_exactly_once(&paged, &expected);

    // One edge, a time window.
    let o = node.read(&["--edge", "edge-b", "--since", "1795369718100", "--until", "1795369718200"]);
    let window = keys_of(&String::from_utf8(o.stdout).unwrap());
    let want: Vec<Key> = (100..200).map(|s| ("edge-b".to_string(), 7, s)).collect();
    assert_exactly_once(&window, &want);

    // HTTP: the same records, the streams, the status.
    let r = http_get(node.read_api, "/v1/streams/cdr/records");
    assert!(r.starts_with("HTTP/1.1 200"), "{r:.300}");
    assert_exactly_once(&keys_of(body(&r)), &expected);
    let r = http_get(node.read_api, "/v1/streams/cdr/records?limit=5&edge=edge-a");
    let lines: Vec<Value> = body(&r).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "five records and the cursor line: {r:.500}");
    assert!(lines[5]["next_cursor"].is_string());
    let r = http_get(node.read_api, "/v1/streams");
    assert!(body(&r).contains("\"cdr\""), "{r}");
    let r = http_get(node.read_api, "/v1/status");
    let status: Value = serde_json::from_str(body(&r)).unwrap();
    assert_eq!(status["tiering_backlog_segments"], 0, "{status}");
    assert!(status["streams"][0]["tiered_bytes"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["streams"][0]["tiered_local_bytes"], 0, "{status}");
    assert!(http_get(node.read_api, "/v1/streams/cdr/records?since=yesterday").starts_with("HTTP/1.1 400"));

    let o = node.command().args(["status", "--config"]).arg(node.config()).output().unwrap();
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["tiering_backlog_segments"], 0, "{status}");

    // An edge that connects hears what of its stream is in the bucket (TIERED on the control
    // stream), and a resent batch is acked with the tiered mark.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (edge, epoch) = EDGES[1];
    let view = rt.block_on(edge_session(&node, edge, epoch, true));
    let (tiered, marks) = (view.tiered.unwrap(), view.marks);
    let in_closed: Vec<u64> = expected.iter().filter(|k| k.0 == edge).map(|k| k.2).collect();
    assert_eq!(tiered.ranges().len(), 1, "{tiered:?}");
    assert_eq!(tiered.ranges()[0].start, 0, "{tiered:?}");
    assert!(tiered.ranges()[0].end > 0 && tiered.ranges()[0].end <= in_closed.len() as u64, "{tiered:?}");
    assert_eq!(marks, shared::wire::frame::marks::DURABLE | shared::wire::frame::marks::TIERED);

    // A failover stored the same batches on a second node: its objects share the bucket, and
    // a read still gives each record once.
    node.kill();
    let bucket = node.bucket();
    let rt2 = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for m in &manifests {
        let mine = format!("/test-core-{}/", m.incarnation);
        let other = "/core-2-00000000000000ff/";
        let mut copy = m.clone();
        copy.node = "core-2".into();
        copy.incarnation = "00000000000000ff".into();
        copy.segment_key = m.segment_key.replace(&mine, other);
        copy.index_key = m.index_key.replace(&mine, other);
        let manifest_key = copy.segment_key.replace(".seg", ".manifest");
        rt2.block_on(async {
            for (from, to) in [(&m.segment_key, &copy.segment_key), (&m.index_key, &copy.index_key)] {
                let bytes = bucket.get(&ObjectPath::from(from.as_str())).await.unwrap().bytes().await.unwrap();
                bucket.put(&ObjectPath::from(to.as_str()), PutPayload::from(bytes)).await.unwrap();
            }
            bucket.put(&ObjectPath::from(manifest_key.as_str()), PutPayload::from(copy.encode())).await.unwrap();
        });
    }
    assert_eq!(check_bucket(&bucket).len(), 2 * manifests.len(), "two nodes' objects in the bucket");
    assert_exactly_once(&node.read_all(), &expected);

    // Dedup covers what left the disk: the catalog seeds the store, and a resent batch is held.
    let catalog = Catalog::open(&node.data_dir().join(CATALOG_FILE)).unwrap();
    assert!(catalog.segments().unwrap().iter().all(|s| s.state == SegmentState::LocalDeleted));
    let seed = core_ingest::run::dedup_seed(&catalog).unwrap();
    let config = StoreConfig {
        data_dir: node.data_dir(),
        partitions: 2,
        segment_bytes_max: 64 << 10,
        direct_io: true,
        disk_budget_bytes: u64::MAX,
        tiered_ranges: seed,
    };
    let (handle, thread) = Store::open(config, Arc::new(Metrics::default())).unwrap().spawn(8).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (edge, epoch) = EDGES[0];
        let key = ProducerKey { edge: edge.into(), epoch, stream: STREAM.into() };
        let first =
            shared::batch::Batch::from_bytes(batch_of(edge, epoch, 0..10, 300), &BatchLimits::default()).unwrap();
        assert_eq!(handle.append(key, 0..10, first).await.unwrap(), Stored::Duplicate, "seqs 0..10 are in the bucket");
        handle.shutdown().await;
    });
    thread.join().unwrap();
}

#[test]
fn s3_going_away_mid_upload_delays_tiering_without_loss() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.addr, 9 << 20);
    let mut node = Node::new(proxy.addr, "multipart_threshold_bytes = \"5MiB\"\npart_bytes = \"5MiB\"");
    // Segments of ~6 MiB go up as multipart uploads of 5 MiB parts.
    let (expected, closed) = populate(&node.data_dir(), 1300, 1000, 6 << 20);
    assert!(closed >= 2, "closed segments: {closed}");
    node.start();

    node.wait_for("the proxy cut the upload", |_| proxy.down.load(Ordering::SeqCst));
    node.wait_for("failed attempts counted", |n| n.metric("backhaul_core_tier_errors_total") >= 3);
    assert!(node.metric("backhaul_core_tier_backlog_segments") > 0, "the outage left a backlog");
    assert_eq!(node.metric("backhaul_core_local_segments_deleted_total"), 0, "nothing untiered leaves the disk");
    let direct = bucket_at(moto.addr);
    let during = check_bucket_with(&direct, true);
    assert!((during.len() as u64) < closed, "not everything went up before the cut");

    proxy.down.store(false, Ordering::SeqCst);
    node.wait_tiered(closed);
    let manifests = check_bucket(&direct);
    assert_eq!(manifests.len() as u64, closed);
    assert!(proxy.upstream_bytes.load(Ordering::SeqCst) > 9 << 20);
    assert!(node.stderr.lock().unwrap().contains("tiering failed; will retry"));
    assert_exactly_once(&node.read_all(), &expected);
}

#[test]
fn sigkill_during_tiering_resumes_without_duplicate_objects() {
    let moto = Moto::start();
    let mut node = Node::new(moto.addr, "");
    let (expected, closed) = populate(&node.data_dir(), 300, 300, 64 << 10);
    assert!(closed >= 10, "closed segments: {closed}");
    node.start();
    node.wait_for("a first segment tiered", |n| n.metric("backhaul_core_tiered_segments_total") >= 1);
    node.kill();
    let before = list(&node.bucket()).len();
    let catalog = Catalog::open(&node.data_dir().join(CATALOG_FILE)).unwrap();
    let states: Vec<SegmentState> = catalog.segments().unwrap().iter().map(|s| s.state).collect();
    drop(catalog);
    assert!(states.iter().filter(|s| s.is_tiered()).count() < closed as usize, "killed mid-way: {states:?}");

    node.start();
    node.wait_tiered(closed - states.iter().filter(|s| **s == SegmentState::LocalDeleted).count() as u64);
    node.wait_for("all tiered", |n| {
        Catalog::open(&n.data_dir().join(CATALOG_FILE))
            .unwrap()
            .segments()
            .unwrap()
            .iter()
            .filter(|s| s.state == SegmentState::LocalDeleted)
            .count() as u64
            == closed
    });
    let manifests = check_bucket(&node.bucket());
    assert_eq!(manifests.len() as u64, closed, "one manifest per segment, none twice");
    assert_eq!(list(&node.bucket()).len() as u64, 3 * closed, "segment, index and manifest per segment");
    assert!(before <= 3 * closed as usize);
    let incarnations: BTreeSet<&str> = manifests.iter().map(|m| m.incarnation.as_str()).collect();
    assert_eq!(incarnations.len(), 1, "a restart keeps the incarnation: same keys, no copies");
    assert_exactly_once(&node.read_all(), &expected);
}

#[test]
fn a_corrupt_object_is_reported_with_key_and_offset_and_the_rest_still_reads() {
    let moto = Moto::start();
    let mut node = Node::new(moto.addr, "");
    let (expected, closed) = populate(&node.data_dir(), 100, 300, 64 << 10);
    node.start();
    node.wait_tiered(closed);
    node.kill();

    let bucket = node.bucket();
    let manifests = check_bucket(&bucket);
    let victim = &manifests[0];
    let mut bytes = get(&bucket, &victim.segment_key).to_vec();
    let scan = shared::log::segment::scan(&bytes, Offset(victim.base_offset), &BatchLimits::default());
    let frame = &scan.frames[2];
    bytes[frame.pos as usize + 60] ^= 0xff;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(bucket.put(&ObjectPath::from(victim.segment_key.as_str()), PutPayload::from(bytes.clone()))).unwrap();
    let lost_frame = shared::log::segment::decode_frame(
        &get(&node.bucket(), &victim.segment_key)[frame.pos as usize..],
        &BatchLimits::default(),
    );
    assert!(lost_frame.is_err(), "the frame is damaged now");

    let o = node.read(&[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "damage is exit 1: {err}");
    assert!(err.contains(&format!("object {} at byte {}", victim.segment_key, frame.pos)), "key and offset: {err}");
    let got = keys_of(&String::from_utf8(o.stdout).unwrap());
    // Exactly the damaged batch's records are missing; every other record reads once.
    let intact = shared::log::segment::scan(
        &get(&node.bucket(), &victim.segment_key),
        Offset(victim.base_offset),
        &BatchLimits::default(),
    );
    assert_eq!(intact.frames.len(), scan.frames.len() - 1, "only the damaged frame is skipped");
    assert_eq!(got.len() as u64, expected.len() as u64 - RECORDS_PER_BATCH);
    let got_set: BTreeSet<&Key> = got.iter().collect();
    assert_eq!(got_set.len(), got.len(), "no duplicates");
}

/// `GET path` over HTTPS to `addr`, trusting `ca`, with an optional bearer token.
fn https_get(addr: SocketAddr, ca: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let config = tls::https_client_config(ca.as_bytes()).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn the_read_api_over_tls_serves_a_stream_only_with_its_token() {
    let moto = Moto::start();
    let sensors = "tokens = { cdr = \"env:CDR_TOKEN\", sensors = \"sensors-token-0123456789\" }";
    let read_api = format!("cert_file = \"pki/server.pem\"\nkey_file = \"pki/server.key\"\n{sensors}");
    let mut node = Node::with(moto.addr, "", &read_api);
    let (expected, closed) = populate(&node.data_dir(), 60, 300, 64 << 10);
    node.start();
    node.wait_tiered(closed);
    let ca = node.ca.0.clone();
    let records = "/v1/streams/cdr/records";

    let r = https_get(node.read_api, &ca, records, None);
    assert!(r.starts_with("HTTP/1.1 401") && r.contains("WWW-Authenticate: Bearer"), "{r:.300}");
    let r = https_get(node.read_api, &ca, records, Some("sensors-token-0123456789"));
    assert!(r.starts_with("HTTP/1.1 403"), "another stream's token: {r:.300}");
    let r = https_get(node.read_api, &ca, records, Some("not-a-token-at-all-xyz"));
    assert!(r.starts_with("HTTP/1.1 403"), "an unknown token: {r:.300}");
    let r = https_get(node.read_api, &ca, records, Some(CDR_TOKEN));
    assert!(r.starts_with("HTTP/1.1 200"), "{r:.300}");
    assert_exactly_once(&keys_of(body(&r)), &expected);
    let r = https_get(node.read_api, &ca, "/v1/streams", Some("sensors-token-0123456789"));
    assert!(body(&r).contains("\"streams\":[]"), "only the streams the token grants: {r}");
    let r = https_get(node.read_api, &ca, "/v1/status", Some(CDR_TOKEN));
    assert!(r.starts_with("HTTP/1.1 200"), "{r:.300}");
    assert!(!http_get(node.read_api, records).starts_with("HTTP/1.1"), "no plain HTTP on the TLS port");
}

#[test]
fn a_rebuilt_data_dir_still_knows_the_batches_in_the_bucket() {
    let moto = Moto::start();
    let mut node = Node::new(moto.addr, "");
    let (_, closed) = populate(&node.data_dir(), 60, 300, 64 << 10);
    node.start();
    node.wait_tiered(closed);
    node.kill();

    // Disk lost: a new data directory, so a new incarnation with an empty catalog.
    std::fs::remove_dir_all(node.data_dir()).unwrap();
    node.start();
    assert!(node.stderr.lock().unwrap().contains("dedup seeded from earlier incarnations' manifests"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (edge, epoch) = EDGES[1];
    let view = rt.block_on(edge_session(&node, edge, epoch, false));
    assert!(
        view.held.contains_range(&(0..RECORDS_PER_BATCH)),
        "the WELCOME names what the bucket holds: {:?}",
        view.held
    );
    assert_eq!(view.marks & shared::wire::frame::marks::DURABLE, shared::wire::frame::marks::DURABLE);
    assert_eq!(node.metric("backhaul_core_duplicate_batches_total"), 1, "acknowledged as held");
    assert_eq!(node.metric("backhaul_core_batches_stored_total"), 0, "not stored twice");
}
