//! Object keys, segment facts and the manifest: pure.
//!
//! Every segment of every node has its own key prefix, so nodes sharing a bucket never write
//! the same key:
//!
//! ```text
//! <prefix>/<stream>/<partition>/<node>-<incarnation:016x>/<base_offset:020>.seg       the segment file, byte for byte
//! <prefix>/<stream>/<partition>/<node>-<incarnation:016x>/<base_offset:020>.idx       its sparse index file
//! <prefix>/<stream>/<partition>/<node>-<incarnation:016x>/<base_offset:020>.manifest  JSON, written last, create-only
//! ```
//!
//! The data objects are idempotent (same key, same bytes); the manifest is what makes a
//! segment visible to readers and to dedup: it names the segment's CRC-32C and length, its
//! offsets and event-time range, and the (edge, epoch) seq ranges it holds. A segment object
//! without a manifest is an upload in progress (or cut short) and is never read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shared::batch::BatchLimits;
use shared::ids::Offset;
use shared::log::segment::{self, Damage};
use shared::ranges::RangeSet;

use crate::catalog::ProducerRange;

/// Manifest format version this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// Most bytes a manifest may have (a reader refuses larger ones before parsing).
pub const MANIFEST_BYTES_MAX: usize = 4 << 20;
/// Suffix of manifest objects.
pub const MANIFEST_SUFFIX: &str = ".manifest";

/// The three keys of one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKeys {
    /// The segment bytes.
    pub segment: String,
    /// The index bytes.
    pub index: String,
    /// The manifest.
    pub manifest: String,
}

/// The keys of segment `base` of `stream`/`partition` written by `node` in `incarnation`.
pub fn object_keys(prefix: &str, stream: &str, partition: u32, node: &str, incarnation: u64, base: u64) -> ObjectKeys {
    let dir = format!("{}/{partition}/{node}-{incarnation:016x}/{base:020}", stream_prefix(prefix, stream));
    ObjectKeys {
        segment: format!("{dir}.seg"),
        index: format!("{dir}.idx"),
        manifest: format!("{dir}{MANIFEST_SUFFIX}"),
    }
}

/// The key prefix under which every node's objects of `stream` live.
pub fn stream_prefix(prefix: &str, stream: &str) -> String {
    if prefix.is_empty() { stream.to_string() } else { format!("{prefix}/{stream}") }
}

/// What a segment's bytes hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentFacts {
    /// Offset after the last good batch.
    pub next_offset: u64,
    /// Offsets covered by good batches.
    pub records: u64,
    /// Event-time range of good batches.
    pub ts_range: Option<(i64, i64)>,
    /// Seq ranges per (edge, epoch), sorted.
    pub ranges: Vec<ProducerRange>,
    /// Damaged byte ranges skipped.
    pub damage: Vec<Damage>,
    /// Why bytes after the last good frame did not parse (a closed segment has none).
    pub tail_reason: Option<String>,
}

/// Scans a segment's bytes (first offset `base`) for its facts.
pub fn segment_facts(bytes: &[u8], base: u64, limits: &BatchLimits) -> SegmentFacts {
    let scan = segment::scan(bytes, Offset(base), limits);
    let mut by_producer: BTreeMap<(String, u64), RangeSet> = BTreeMap::new();
    let mut facts = SegmentFacts { next_offset: base, ..SegmentFacts::default() };
    for f in &scan.frames {
        let Ok(Some((_, h, _))) = segment::decode_frame(&bytes[f.pos as usize..], limits) else { continue };
        by_producer.entry((h.producer.clone(), h.epoch.0)).or_default().insert(h.base_seq.0..h.end_seq().0);
        facts.records += u64::from(f.count);
        facts.next_offset = f.end().0;
        facts.ts_range = Some(match facts.ts_range {
            None => (f.min_ts_ms, f.max_ts_ms),
            Some((lo, hi)) => (lo.min(f.min_ts_ms), hi.max(f.max_ts_ms)),
        });
    }
    facts.ranges = by_producer
        .into_iter()
        .flat_map(|((edge, epoch), set)| {
            set.ranges()
                .iter()
                .map(move |r| ProducerRange { edge: edge.clone(), epoch, seqs: r.clone() })
                .collect::<Vec<_>>()
        })
        .collect();
    facts.damage = scan.damage;
    facts.tail_reason = scan.tail_reason;
    facts
}

/// The manifest of one tiered segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Node that wrote the segment.
    pub node: String,
    /// Its incarnation, 16 hex digits.
    pub incarnation: String,
    /// Stream.
    pub stream: String,
    /// Partition.
    pub partition: u32,
    /// First offset.
    pub base_offset: u64,
    /// Offset after the last batch.
    pub next_offset: u64,
    /// Key of the segment object.
    pub segment_key: String,
    /// Key of the index object.
    pub index_key: String,
    /// Length of the segment object.
    pub bytes: u64,
    /// CRC-32C of the segment object.
    pub crc32c: u32,
    /// Offsets covered.
    pub records: u64,
    /// Earliest event time, ms.
    pub min_ts_ms: Option<i64>,
    /// Latest event time, ms.
    pub max_ts_ms: Option<i64>,
    /// Seq ranges held, per producer.
    pub ranges: Vec<ManifestRange>,
}

/// A producer's seqs in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestRange {
    /// Edge id.
    pub edge: String,
    /// Producer epoch.
    pub epoch: u64,
    /// First seq.
    pub start: u64,
    /// Seq after the last.
    pub end: u64,
}

impl Manifest {
    /// The manifest's JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serialises")
    }

    /// Parses and checks a manifest read from `key`.
    pub fn decode(bytes: &[u8], key: &str) -> Result<Manifest, String> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(format!("manifest {key}: {} bytes, above {MANIFEST_BYTES_MAX}", bytes.len()));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest {key}: {e}"))?;
        if m.format != MANIFEST_FORMAT {
            return Err(format!("manifest {key}: format {} (this build reads {MANIFEST_FORMAT})", m.format));
        }
        if m.next_offset < m.base_offset {
            return Err(format!("manifest {key}: next_offset {} below base_offset {}", m.next_offset, m.base_offset));
        }
        if let Some(r) = m.ranges.iter().find(|r| r.end < r.start) {
            return Err(format!(
                "manifest {key}: range of edge {} ends ({}) before it starts ({})",
                r.edge, r.end, r.start
            ));
        }
        if !shared::batch::is_valid_stream_name(&m.stream) {
            return Err(format!("manifest {key}: stream {:?} is not a valid name", m.stream));
        }
        Ok(m)
    }

    /// The producer ranges.
    pub fn producer_ranges(&self) -> Vec<ProducerRange> {
        self.ranges
            .iter()
            .map(|r| ProducerRange { edge: r.edge.clone(), epoch: r.epoch, seqs: r.start..r.end })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::batch::{BatchBuilder, BatchEncoder, BatchMeta, Compression};

    fn batch(edge: &str, epoch: u64, base_seq: u64, n: u32, ts: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push(ts + i64::from(i), "t/x", b"{}", &[]).unwrap();
        }
        let meta = BatchMeta {
            producer: edge.into(),
            epoch: shared::ids::Epoch(epoch),
            stream: "cdr".into(),
            base_seq: shared::ids::Seq(base_seq),
            payload_format: shared::batch::PayloadFormat::Json,
        };
        let mut out = bytes::BytesMut::new();
        BatchEncoder::new(Compression::None).unwrap().finish(&mut b, &meta, &mut out).unwrap();
        out.to_vec()
    }

    fn segment_of(batches: &[Vec<u8>], base: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = base;
        for b in batches {
            segment::encode_frame(Offset(offset), 0, b, &mut out);
            let (h, _) = shared::batch::Batch::decode(b, &BatchLimits::default()).unwrap().unwrap();
            offset += u64::from(h.record_count);
        }
        out
    }

    #[test]
    fn keys_are_per_node_incarnation_and_sort_by_offset() {
        let k = object_keys("p/q", "cdr", 3, "core-1", 0xab, 42);
        assert_eq!(k.segment, "p/q/cdr/3/core-1-00000000000000ab/00000000000000000042.seg");
        assert_eq!(k.index, "p/q/cdr/3/core-1-00000000000000ab/00000000000000000042.idx");
        assert_eq!(k.manifest, "p/q/cdr/3/core-1-00000000000000ab/00000000000000000042.manifest");
        assert_eq!(object_keys("", "cdr", 0, "n", 1, 0).segment, "cdr/0/n-0000000000000001/00000000000000000000.seg");
    }

    #[test]
    fn facts_merge_each_producers_ranges_and_report_damage() {
        let mut seg = segment_of(
            &[
                batch("e1", 7, 0, 3, 1000),
                batch("e2", 9, 10, 2, 500),
                batch("e1", 7, 3, 4, 2000),
                batch("e1", 7, 20, 1, 3000),
            ],
            100,
        );
        let f = segment_facts(&seg, 100, &BatchLimits::default());
        assert_eq!(f.next_offset, 110);
        assert_eq!(f.records, 10);
        assert_eq!(f.ts_range, Some((500, 3000)));
        let r = |e: &str, epoch, s: std::ops::Range<u64>| ProducerRange { edge: e.into(), epoch, seqs: s };
        assert_eq!(f.ranges, vec![r("e1", 7, 0..7), r("e1", 7, 20..21), r("e2", 9, 10..12)]);
        assert!(f.damage.is_empty());

        // Rot in the second frame: it is skipped and reported, the others still count.
        let second = segment::FRAME_HEADER_LEN + batch("e1", 7, 0, 3, 1000).len() + 40;
        seg[second] ^= 0xff;
        let f = segment_facts(&seg, 100, &BatchLimits::default());
        assert_eq!(f.records, 8);
        assert_eq!(f.damage.len(), 1, "{:?}", f.damage);
    }

    #[test]
    fn manifest_round_trips_and_bad_ones_are_named() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            node: "core-1".into(),
            incarnation: format!("{:016x}", 5),
            stream: "cdr".into(),
            partition: 0,
            base_offset: 10,
            next_offset: 20,
            segment_key: "cdr/0/x.seg".into(),
            index_key: "cdr/0/x.idx".into(),
            bytes: 100,
            crc32c: 0xdead_beef,
            records: 10,
            min_ts_ms: Some(1),
            max_ts_ms: Some(2),
            ranges: vec![ManifestRange { edge: "e1".into(), epoch: u64::MAX, start: 0, end: 10 }],
        };
        assert_eq!(Manifest::decode(&m.encode(), "k").unwrap(), m);
        let err = Manifest::decode(b"{not json", "the/key.manifest").unwrap_err();
        assert!(err.contains("the/key.manifest"), "{err}");
        let bad = Manifest { next_offset: 5, ..m.clone() };
        assert!(Manifest::decode(&bad.encode(), "k").unwrap_err().contains("next_offset"));
        let future = Manifest { format: 2, ..m };
        assert!(Manifest::decode(&future.encode(), "k").unwrap_err().contains("format 2"));
    }
}
