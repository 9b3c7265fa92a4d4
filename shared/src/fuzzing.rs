//! Bodies of the fuzz targets in `fuzz/`. CI runs them through proptest; `cargo fuzz` runs
//! them coverage-guided. Each asserts the decoder's contract on any input: no panic, and
//! whatever it accepts is consistent.

use std::path::Path;
use std::sync::Arc;

use crate::batch::{Batch, BatchHeader, BatchLimits};
use crate::ids::Offset;
use crate::log::sim::SimStorage;
use crate::log::storage::Storage;
use crate::log::{Log, LogConfig, segment, segment_file_name};

/// Tight limits, so the fuzzer reaches the bounds quickly.
const LIMITS: BatchLimits = BatchLimits { body_bytes_max: 1 << 16, raw_bytes_max: 1 << 18, records_max: 1 << 12 };

/// Batch decoding: any bytes give a batch, `None` (incomplete) or an error, never a panic.
/// Each input is tried twice: as it is, and with its CRCs made right, so the fuzzer reaches
/// the field checks and the record decoder behind them instead of stopping at a CRC.
pub fn batch_decode(data: &[u8]) {
    batch_decode_once(data);
    batch_decode_once(&with_valid_crcs(data));
}

/// `data` with the header and body CRC-32Cs recomputed where the lengths allow.
fn with_valid_crcs(data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    if d.len() < 20 {
        return d;
    }
    let header_len = usize::from(u16::from_le_bytes([d[6], d[7]]));
    let body_len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) as usize;
    if header_len < 24 || header_len > d.len() {
        return d;
    }
    if let Some(body) = d.get(header_len..header_len.saturating_add(body_len)) {
        let crc = crc32c::crc32c(body);
        d[16..20].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&d[..header_len - 4]);
    d[header_len - 4..header_len].copy_from_slice(&crc.to_le_bytes());
    d
}

fn batch_decode_once(data: &[u8]) {
    let header = BatchHeader::decode(data, &LIMITS);
    if let Ok(Some((h, len))) = Batch::decode(data, &LIMITS) {
        assert!(len <= data.len());
        assert_eq!(header.ok().flatten().as_ref(), Some(&h));
        let batch = Batch::from_bytes(bytes::Bytes::copy_from_slice(&data[..len]), &LIMITS).expect("decoded once");
        if let Ok(records) = batch.records() {
            let expected = if h.is_gap() { 0 } else { h.record_count as usize };
            assert_eq!(records.len(), expected);
        }
    }
}

/// Wire frames: any bytes give a frame, `None` or an error; a frame re-encodes to the same bytes.
pub fn frame_decode(data: &[u8]) {
    // The pieces reader, fed the bytes in two chunks, agrees with the copying decoder.
    let mut parts = crate::wire::FrameParts::default();
    let cut = data.first().map_or(0, |&b| usize::from(b).min(data.len()));
    parts.push(bytes::Bytes::copy_from_slice(&data[..cut]));
    parts.push(bytes::Bytes::copy_from_slice(&data[cut..]));
    let parted = parts.take_frame();
    let copied = crate::wire::Frame::decode(data);
    match (&parted, &copied) {
        (Ok(Some(a)), Ok(Some((b, len)))) => assert!(a.clone().into_frame() == *b && parts.len() == data.len() - len),
        (Ok(None), Ok(None)) => assert_eq!(parts.len(), data.len()),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("parts {parted:?} but decode {copied:?}"),
    }
    if let Ok(Some((frame, len))) = copied {
        assert!(len <= data.len());
        let mut out = bytes::BytesMut::new();
        frame.encode(&mut out);
        let again = crate::wire::Frame::decode(&out).expect("re-decodes").expect("whole");
        assert_eq!(again.0, frame);
    }
}

/// Log recovery: any bytes as the last segment of a log. The scan's frames are in order and
/// in bounds, and opening the log keeps exactly those frames, readable.
pub fn log_recovery(data: &[u8]) {
    let scan = segment::scan(data, Offset(0), &LIMITS);
    assert!(scan.valid_len as usize <= data.len());
    let mut end = Offset(0);
    for f in &scan.frames {
        assert!(f.offset >= end && f.pos + f.len <= scan.valid_len);
        end = f.end();
    }

    let sim = SimStorage::new();
    let dir = Path::new("/fuzz/log");
    sim.create_dir_all(dir).expect("sim directory");
    sim.write_file_synced(&dir.join(segment_file_name(Offset(0))), data).expect("sim write");
    let config = LogConfig { batch_limits: LIMITS, ..LogConfig::default() };
    let mut log = Log::open(Arc::new(sim), dir, config, 0).expect("a log opens over any bytes");
    assert_eq!(log.next_offset(), scan.frames.last().map_or(Offset(0), |f| f.end()));
    let mut from = log.start_offset();
    let mut seen = Vec::new();
    while from < log.committed_offset() {
        let read = log.read(from, 1 << 20).expect("reads after recovery");
        seen.extend(read.batches.iter().map(|b| b.offset));
        if read.next == from {
            break;
        }
        from = read.next;
    }
    assert_eq!(seen, scan.frames.iter().map(|f| f.offset).collect::<Vec<_>>());
}
