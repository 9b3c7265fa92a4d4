//! Tiering and tiered-read figures against a local S3-protocol server (moto's), printed, not
//! asserted. In one run:
//! 1. fills a data directory through the store (zstd batches of synthetic CDR-like JSON),
//! 2. tiers every closed segment with the real tierer (upload, read-back verify, index,
//!    create-only manifest, catalog, local delete) and reports MB/s of segment bytes,
//! 3. PUTs the same segment bytes with plain `object_store` puts (the peer figure),
//! 4. reads every record back from the bucket with the read engine and reports records/s.
//!
//! `cargo build --release -p core-ingest --example tier_bench &&
//! taskset -c 1 target/release/examples/tier_bench [MB]` (default 64 MB of batches). Needs
//! `python3 -m moto.server` (pip install 'moto[server]'); it is started pinned to CPU 0 on an
//! ephemeral port and stopped by PID.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use core_ingest::catalog::{CATALOG_FILE, Catalog};
use core_ingest::config::TierConfig;
use core_ingest::metrics::Metrics;
use core_ingest::read::{ReadQuery, ReadSources};
use core_ingest::store::{Store, StoreConfig};
use core_ingest::tier::Tierer;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shared::batch::{Batch, BatchEncoder, BatchLimits, BatchMeta, Compression, PayloadFormat, Record};
use shared::ids::{Epoch, Seq};
use shared::units::{ByteSize, Millis};
use shared::wire::session::ProducerKey;

const BUCKET: &str = "bench";
const RECORDS_PER_BATCH: u64 = 100;

fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::args().nth(1).map_or(Ok(64), |a| a.parse())?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // moto on CPU 0 (taskset execs, so the PID stays moto's); run the bench itself with
    // `taskset -c 1` to keep the two apart.
    let mut moto = Command::new("taskset")
        .args(["-c", "0", "python3", "-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = bench(port, mb, moto.id());
    let _ = moto.kill();
    let _ = moto.wait();
    result
}

fn bench(port: u16, mb: u64, moto_pid: u32) -> anyhow::Result<()> {
    let moto_cpu = || cpu_seconds_of(&format!("/proc/{moto_pid}/stat"));
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "moto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(create_bucket(port))?;
    let objects: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_access_key_id("bench")
            .with_secret_access_key("bench")
            .with_region("us-east-1")
            .build()?,
    );

    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().to_path_buf();
    let incarnation = shared::identity::open_or_create(&data_dir, core_ingest::run::IDENTITY_KIND)?;
    let metrics = Arc::new(Metrics::default());
    let config = StoreConfig {
        data_dir: data_dir.clone(),
        partitions: 2,
        segment_bytes_max: 8 << 20,
        direct_io: true,
        disk_budget_bytes: u64::MAX,
        tiered_ranges: vec![],
    };
    let (handle, thread) = Store::open(config, metrics.clone())?.spawn(256)?;

    // 1. Fill.
    let t = Instant::now();
    let records = rt.block_on(async {
        let mut records = 0u64;
        let mut k = 0u64;
        while metrics.bytes_stored.get() < mb << 20 {
            for edge in ["edge-a", "edge-b", "edge-c", "edge-d"] {
                let range = k * RECORDS_PER_BATCH..(k + 1) * RECORDS_PER_BATCH;
                let key = ProducerKey { edge: edge.into(), epoch: 1, stream: "cdr".into() };
                handle.append(key, range.clone(), batch(edge, range)?).await.map_err(|r| anyhow::anyhow!(r.message))?;
                records += RECORDS_PER_BATCH;
            }
            k += 1;
        }
        anyhow::Ok(records)
    })?;
    println!(
        "filled: {records} records, {:.1} MB of batches in {:.1} s",
        metrics.bytes_stored.get() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // 2. Tier with the tierer.
    let catalog = Arc::new(Mutex::new(Catalog::open(&data_dir.join(CATALOG_FILE))?));
    let tier_config = TierConfig {
        tier_after: Millis(0),
        local_retention: Millis(3_600_000),
        multipart_threshold_bytes: ByteSize(16 << 20),
        part_bytes: ByteSize(8 << 20),
        ..TierConfig::default()
    };
    let mut tierer = Tierer::new(
        tier_config,
        handle.clone(),
        objects.clone(),
        "tier".into(),
        "bench-core".into(),
        incarnation,
        catalog.clone(),
        metrics.clone(),
    );
    let (cpu0, moto0) = (cpu_seconds(), moto_cpu());
    let t = Instant::now();
    let report = rt.block_on(tierer.round())?;
    let tier_s = t.elapsed().as_secs_f64();
    let (tier_cpu, tier_moto) = (cpu_seconds() - cpu0, moto_cpu() - moto0);
    let tiered_bytes = metrics.tier.bytes.get();
    println!(
        "tierer: {} segments, {:.1} MB in {tier_s:.2} s = {:.1} MB/s (upload + read-back verify + index + manifest + catalog; CPU s: bench {tier_cpu:.2}, moto {tier_moto:.2})",
        report.uploaded,
        tiered_bytes as f64 / 1e6,
        tiered_bytes as f64 / 1e6 / tier_s
    );

    // 3. The peer: plain puts of the same bytes (single PUTs: 8 MiB segments stay below the
    //    tierer's 16 MiB multipart threshold, so both sides use single PUTs).
    let segments: Vec<_> = catalog.lock().unwrap().segments()?;
    let (cpu0, moto0) = (cpu_seconds(), moto_cpu());
    let t = Instant::now();
    let mut put_bytes = 0u64;
    rt.block_on(async {
        for s in &segments {
            let bytes = tokio::fs::read(&s.local_path).await?;
            put_bytes += bytes.len() as u64;
            let key = ObjectPath::from(format!("plain/{}/{}", s.id.partition, s.id.base_offset));
            objects.put(&key, PutPayload::from(bytes)).await?;
        }
        anyhow::Ok(())
    })?;
    let put_s = t.elapsed().as_secs_f64();
    println!(
        "plain object_store put: {} objects, {:.1} MB in {put_s:.2} s = {:.1} MB/s (CPU s: bench {:.2}, moto {:.2})",
        segments.len(),
        put_bytes as f64 / 1e6,
        put_bytes as f64 / 1e6 / put_s,
        cpu_seconds() - cpu0,
        moto_cpu() - moto0
    );

    // 4. Read everything back from the bucket (the local copies removed first).
    rt.block_on(async {
        let snap = handle.tier_snapshot().await.map_err(|r| anyhow::anyhow!(r.message))?;
        for p in snap.partitions {
            if let Some(last) = p.closed.last() {
                handle.release(p.stream, p.partition, last.end).await.map_err(anyhow::Error::msg)?;
            }
        }
        anyhow::Ok(())
    })?;
    let tiered_records: u64 = segments.iter().map(|s| s.records).sum();
    let src = ReadSources {
        data_dir: tmp.path().join("no-local-data"),
        node: "bench-core".into(),
        incarnation: Some(incarnation),
        objects: objects.clone(),
        prefix: "tier".into(),
        handle: rt.handle().clone(),
    };
    let q = ReadQuery { stream: "cdr".into(), ..ReadQuery::default() };
    let (cpu0, moto0) = (cpu_seconds(), moto_cpu());
    let t = Instant::now();
    let mut out_bytes = 0u64;
    let outcome = core_ingest::read::read_records(&src, &q, &mut |line| {
        out_bytes += line.len() as u64 + 1;
        Ok(())
    })?;
    let read_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(outcome.records == tiered_records, "read {} of {tiered_records} tiered records", outcome.records);
    anyhow::ensure!(outcome.problems.is_empty(), "problems: {:?}", outcome.problems);
    println!(
        "read from the bucket: {} records ({:.1} MB of NDJSON) in {read_s:.2} s = {:.0} records/s (CPU s: bench {:.2}, moto {:.2})",
        outcome.records,
        out_bytes as f64 / 1e6,
        outcome.records as f64 / read_s,
        cpu_seconds() - cpu0,
        moto_cpu() - moto0
    );
    println!("load average after the run: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    rt.block_on(handle.shutdown());
    let _ = thread.join();
    Ok(())
}

async fn create_bucket(port: u16) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    anyhow::ensure!(answer.starts_with("HTTP/1.1 200"), "create bucket: {answer}");
    Ok(())
}

/// A batch of CDR-like JSON records (what the edge would send), zstd level 1.
fn batch(edge: &str, range: std::ops::Range<u64>) -> anyhow::Result<Batch> {
    let records: Vec<Record> = range
        .clone()
        .map(|seq| {
            let payload = format!(
                r#"{{"imsi":"20801{:010}","msisdn":"3361{:07}","cell":"{:05}","bytes_up":{},"bytes_down":{},"duration_s":{},"seq":{seq}}}"#,
                seq.wrapping_mul(2_654_435_761) % 10_000_000_000,
                seq % 10_000_000,
                seq % 977,
                seq * 37 % 100_000,
                seq * 101 % 1_000_000,
                seq % 3600
            );
            Record { ts_ms: 1_795_369_718_000 + seq as i64, topic: format!("cdr/{edge}"), payload: payload.into_bytes().into(), attrs: vec![] }
        })
        .collect();
    let meta = BatchMeta {
        producer: edge.into(),
        epoch: Epoch(1),
        stream: "cdr".into(),
        base_seq: Seq(range.start),
        payload_format: PayloadFormat::Json,
    };
    let mut out = BytesMut::new();
    BatchEncoder::new(Compression::Zstd { level: 1 })?.encode(&meta, &records, &mut out)?;
    Ok(Batch::from_bytes(out.freeze(), &BatchLimits::default())?)
}

/// CPU seconds (user + system) of this process so far, from /proc.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}

/// CPU seconds (user + system) of the process whose `stat` file is `path`.
fn cpu_seconds_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
