//! The batch: Backhaul's one unit of data, from edge disk through the wire to the bucket.
//!
//! A batch is built once, at the edge; its bytes never change afterwards. The core validates
//! the header and the CRCs without decompressing; readers decompress.
//!
//! Invariants:
//! - Every length is bounded twice: by a hard ceiling of the format and by [`BatchLimits`].
//!   A decoder given any bytes returns an error, never panics, and never allocates more than
//!   the declared (and already bounded) lengths; zstd output is capped at the declared raw length.
//! - The header carries its own CRC-32C so a reader can resynchronise on the next header after
//!   damage; the body has a second CRC-32C over its bytes as stored (compressed).
//! - A batch covers seqs `[base_seq, base_seq + record_count)` of (producer, epoch, stream).
//!   A gap batch (flag bit 0) has no body: its range names seqs deliberately dropped, and a TLV
//!   names the reason.
//!
//! Byte layout, integers little-endian:
//!
//! ```text
//! off  len  field
//!   0    4  magic "BHB1"
//!   4    1  format version (1)
//!   5    1  flags: bit 0 gap; bit 1 payloads shredded; other bits must be zero
//!   6    2  header_len: bytes from the magic through header_crc
//!   8    4  body_len: body bytes after the header, as stored
//!  12    4  raw_len: body bytes before compression
//!  16    4  body_crc: CRC-32C of the stored body
//!  20    1  codec: 0 none | 1 zstd | 2 zstd with dictionary
//!  21    1  payload format: 0 raw | 1 json | 2 senml | 3 sparkplug | 4 cdr-ber | other: opaque
//!  22    2  reserved, zero
//!  24    8  dictionary id (content hash of the dictionary; zero unless codec is 2)
//!  32    8  producer epoch
//!  40    8  base_seq
//!  48    4  record_count (>= 1)
//!  52    8  min event time, ms since the Unix epoch (i64)
//!  60    8  max event time, ms (i64, >= min)
//!  68    1  producer length P (1..=64), then P bytes of UTF-8
//!   .    1  stream length S (1..=64), then S bytes of [a-z0-9_.-]
//!   .    2  TLV length T (<= 1024), then T bytes of TLVs: type u16, length u16, value
//!   .    4  header_crc: CRC-32C of every header byte before it
//!
//! body (raw, before compression): five columns, so like goes with like and compresses
//! better (payloads stand together as they would in a plain zstd stream):
//!   5 × varint  byte length of each column, in this order
//!   ts          per record: varint, zigzag delta from the previous record's ts (the first from 0)
//!   topics      per record: varint length, topic bytes (UTF-8)
//!   lengths     per record: varint payload length
//!   payloads    the payloads, back to back
//!   attrs       per record: varint count, then per attribute:
//!               varint key length, key (UTF-8); varint value length, value (UTF-8)
//! ```
//!
//! With flag bit 1 the payloads column is *shredded* (see the `shred` module): JSON-like
//! payloads stored as their distinct templates plus their values column by column, which zstd
//! compresses 15–20% better than the payloads themselves on CDRs. The encoder shreds the JSON
//! batches it compresses (not SenML: its packs vary in shape, and shredding them measured
//! worse), and falls back to the plain column when a batch has more than 64 distinct templates. A reader rebuilds the payloads byte for byte; their total length
//! is bounded by `BatchLimits::raw_bytes_max` like any raw body.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::ids::{Epoch, Seq};

mod shred;

/// First four bytes of every batch.
pub const MAGIC: [u8; 4] = *b"BHB1";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Flag bit: a gap batch (no body; the range was dropped on purpose).
pub const FLAG_GAP: u8 = 0x01;
/// Flag bit: the payloads column is shredded into templates and value columns.
pub const FLAG_SHREDDED: u8 = 0x02;

/// Bytes of the fixed part of the header, up to and including the producer length byte.
const FIXED_LEN: usize = 69;
/// Longest producer (edge id) in bytes.
pub const PRODUCER_LEN_MAX: usize = 64;
/// Longest stream name in bytes.
pub const STREAM_LEN_MAX: usize = 64;
/// Most TLV bytes in a header.
pub const TLV_BYTES_MAX: usize = 1024;
/// Longest possible header.
pub const HEADER_LEN_MAX: usize = FIXED_LEN + PRODUCER_LEN_MAX + 1 + STREAM_LEN_MAX + 2 + TLV_BYTES_MAX + 4;
/// Shortest possible header: one-byte producer and stream, no TLVs.
pub const HEADER_LEN_MIN: usize = FIXED_LEN + 1 + 1 + 1 + 2 + 4;
/// Hard ceiling of `body_len` and `raw_len`, whatever the limits say.
pub const BODY_LEN_CEILING: u32 = 256 << 20;
/// Longest topic (MQTT's own limit).
pub const TOPIC_LEN_MAX: usize = 65_535;
/// Most attributes on one record.
pub const ATTRS_MAX: usize = 64;
/// Longest attribute key in bytes.
pub const ATTR_KEY_LEN_MAX: usize = 255;
/// Longest attribute value in bytes.
pub const ATTR_VALUE_LEN_MAX: usize = 4096;
/// Smallest encoded record: ts, topic length, payload length, attribute count.
const RECORD_LEN_MIN: u32 = 4;

/// TLV type: reason of a gap batch (one byte, see [`GapReason`]).
pub const TLV_GAP_REASON: u16 = 1;

/// Well-known attribute keys.
pub mod attr {
    /// MQTT client id the record came from.
    pub const MQTT_CLIENT: &str = "mqtt.client";
    /// MQTT packet id the record came with (decimal).
    pub const MQTT_PACKET_ID: &str = "mqtt.pid";
    /// "1" on a device's Will, stored because its connection failed (listen mode).
    pub const MQTT_WILL: &str = "mqtt.will";
    /// Site of the edge.
    pub const SITE: &str = "site";
    /// Cell the record was produced in.
    pub const CELL: &str = "cell";
    /// Name of the routing or shaping rule that matched.
    pub const RULE: &str = "rule";
}

/// Bounds a decoder enforces beyond the format's own ceilings; tests make them tiny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest stored body (compressed bytes).
    pub body_bytes_max: u32,
    /// Largest body before compression; zstd output is capped here.
    pub raw_bytes_max: u32,
    /// Most records (or, for a gap, seqs) in one batch.
    pub records_max: u32,
}

impl Default for BatchLimits {
    /// 8 MiB stored, 32 MiB raw: well above the 1 MiB batches the batcher makes by default,
    /// small enough that a hostile peer cannot make a reader allocate much.
    fn default() -> Self {
        Self { body_bytes_max: 8 << 20, raw_bytes_max: 32 << 20, records_max: 1 << 20 }
    }
}

/// How a batch body is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    None,
    /// zstd frame.
    Zstd,
    /// zstd frame that needs the dictionary named by the header's dictionary id.
    ZstdDict,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::ZstdDict => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self, BatchError> {
        match b {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Zstd),
            2 => Ok(Codec::ZstdDict),
            _ => Err(BatchError::Invalid { field: "codec", reason: "unknown codec" }),
        }
    }
}

/// What the payloads of a batch are. Unknown ids are carried, not refused: the core never
/// looks inside payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadFormat {
    /// Opaque bytes.
    Raw,
    /// One JSON document per payload.
    Json,
    /// SenML (RFC 8428) JSON.
    Senml,
    /// Sparkplug B protobuf.
    Sparkplug,
    /// CDRs in ASN.1 BER.
    CdrBer,
    /// An id this version does not know.
    Other(u8),
}

impl PayloadFormat {
    /// The id stored in the header.
    pub fn to_byte(self) -> u8 {
        match self {
            PayloadFormat::Raw => 0,
            PayloadFormat::Json => 1,
            PayloadFormat::Senml => 2,
            PayloadFormat::Sparkplug => 3,
            PayloadFormat::CdrBer => 4,
            PayloadFormat::Other(b) => b,
        }
    }

    /// The format of a stored id.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => PayloadFormat::Raw,
            1 => PayloadFormat::Json,
            2 => PayloadFormat::Senml,
            3 => PayloadFormat::Sparkplug,
            4 => PayloadFormat::CdrBer,
            b => PayloadFormat::Other(b),
        }
    }
}

/// Why a gap batch's seqs were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The stream's disk budget was reached under the `drop_oldest` policy.
    DiskFullDropOldest,
    /// Data found corrupt on the edge's disk and skipped.
    Corruption,
    /// Older than the stream's retention before it was forwarded.
    RetentionExpired,
    /// A reason this version does not know.
    Other(u8),
}

impl GapReason {
    fn to_byte(self) -> u8 {
        match self {
            GapReason::DiskFullDropOldest => 1,
            GapReason::Corruption => 2,
            GapReason::RetentionExpired => 3,
            GapReason::Other(b) => b,
        }
    }

    fn from_byte(b: u8) -> Self {
        match b {
            1 => GapReason::DiskFullDropOldest,
            2 => GapReason::Corruption,
            3 => GapReason::RetentionExpired,
            b => GapReason::Other(b),
        }
    }
}

/// One attribute of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Key, e.g. [`attr::MQTT_CLIENT`].
    pub key: String,
    /// Value, text.
    pub value: String,
}

/// One record: a message as it came in, with when and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Event time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The MQTT topic (the record's key).
    pub topic: String,
    /// The payload, untouched.
    pub payload: Bytes,
    /// Optional attributes (site, cell, matched rule, MQTT client and packet id).
    pub attrs: Vec<Attr>,
}

impl Record {
    /// The value of attribute `key`, if present.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.iter().find(|a| a.key == key).map(|a| a.value.as_str())
    }
}

/// Who made a batch and where it belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    /// The edge id (at the core it must equal the client certificate's).
    pub producer: String,
    /// The edge's producer epoch.
    pub epoch: Epoch,
    /// Stream name.
    pub stream: String,
    /// Seq of the first record.
    pub base_seq: Seq,
    /// What the payloads are.
    pub payload_format: PayloadFormat,
}

/// One TLV extension in a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlv {
    /// Type.
    pub kind: u16,
    /// Value.
    pub value: Vec<u8>,
}

/// A decoded and validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Flag bits.
    pub flags: u8,
    /// Header length in bytes.
    pub header_len: u16,
    /// Stored body length.
    pub body_len: u32,
    /// Body length before compression.
    pub raw_len: u32,
    /// CRC-32C of the stored body.
    pub body_crc: u32,
    /// Body codec.
    pub codec: Codec,
    /// Dictionary id (codec [`Codec::ZstdDict`]).
    pub dict_id: u64,
    /// Payload format.
    pub payload_format: PayloadFormat,
    /// Producer epoch.
    pub epoch: Epoch,
    /// First seq.
    pub base_seq: Seq,
    /// Records in the batch, or seqs covered by a gap.
    pub record_count: u32,
    /// Earliest event time, ms.
    pub min_ts_ms: i64,
    /// Latest event time, ms.
    pub max_ts_ms: i64,
    /// Edge id.
    pub producer: String,
    /// Stream name.
    pub stream: String,
    /// Extensions, in order.
    pub tlvs: Vec<Tlv>,
}

impl BatchHeader {
    /// Decodes and validates the header at the start of `buf`. `Ok(None)` if `buf` is a
    /// correct but incomplete prefix.
    pub fn decode(buf: &[u8], limits: &BatchLimits) -> Result<Option<BatchHeader>, BatchError> {
        let magic_len = buf.len().min(4);
        if buf[..magic_len] != MAGIC[..magic_len] {
            return Err(BatchError::BadMagic);
        }
        if buf.len() < 8 {
            return Ok(None);
        }
        if buf[4] != VERSION {
            return Err(BatchError::UnsupportedVersion(buf[4]));
        }
        let header_len = usize::from(u16::from_le_bytes([buf[6], buf[7]]));
        if !(HEADER_LEN_MIN..=HEADER_LEN_MAX).contains(&header_len) {
            return Err(BatchError::HeaderLen(header_len));
        }
        if buf.len() < header_len {
            return Ok(None);
        }
        let head = &buf[..header_len];
        let (covered, crc_bytes) = head.split_at(header_len - 4);
        let stored = u32::from_le_bytes(crc_bytes.try_into().expect("split at len - 4"));
        let actual = crc32c::crc32c(covered);
        if stored != actual {
            return Err(BatchError::HeaderCrc { stored, actual });
        }
        parse_header(covered, limits).map(Some)
    }

    /// Whether this is a gap batch.
    pub fn is_gap(&self) -> bool {
        self.flags & FLAG_GAP != 0
    }

    /// Whether the payloads column is shredded.
    pub fn is_shredded(&self) -> bool {
        self.flags & FLAG_SHREDDED != 0
    }

    /// Bytes of the whole batch, header and body.
    pub fn batch_len(&self) -> usize {
        usize::from(self.header_len) + self.body_len as usize
    }

    /// The seq after the last one this batch covers.
    pub fn end_seq(&self) -> Seq {
        Seq(self.base_seq.0 + u64::from(self.record_count))
    }

    /// The reason of a gap batch.
    pub fn gap_reason(&self) -> Option<GapReason> {
        self.tlvs
            .iter()
            .find(|t| t.kind == TLV_GAP_REASON)
            .and_then(|t| t.value.first())
            .map(|&b| GapReason::from_byte(b))
    }
}

/// A whole batch: its validated header and its bytes, exactly as encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
    /// Bounds the payloads a shredded body expands to.
    limits: BatchLimits,
}

impl Batch {
    /// Decodes the batch at the start of `buf`, checking both CRCs but not decompressing.
    /// Returns the batch and its length; `Ok(None)` for a correct but incomplete prefix.
    pub fn decode(buf: &[u8], limits: &BatchLimits) -> Result<Option<(BatchHeader, usize)>, BatchError> {
        let Some(header) = BatchHeader::decode(buf, limits)? else {
            return Ok(None);
        };
        let len = header.batch_len();
        if buf.len() < len {
            return Ok(None);
        }
        let body = &buf[usize::from(header.header_len)..len];
        let actual = crc32c::crc32c(body);
        if actual != header.body_crc {
            return Err(BatchError::BodyCrc { stored: header.body_crc, actual });
        }
        Ok(Some((header, len)))
    }

    /// Takes `bytes` as exactly one batch, validated as [`Batch::decode`] does.
    pub fn from_bytes(bytes: Bytes, limits: &BatchLimits) -> Result<Batch, BatchError> {
        match Batch::decode(&bytes, limits)? {
            None => Err(BatchError::Truncated { have: bytes.len() }),
            Some((header, len)) if len == bytes.len() => Ok(Batch { header, bytes, limits: *limits }),
            Some((_, len)) => Err(BatchError::TrailingBytes { batch_len: len, have: bytes.len() }),
        }
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The encoded bytes, as they go to disk, the wire and the bucket.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The stored body.
    pub fn body(&self) -> &[u8] {
        &self.bytes[usize::from(self.header.header_len)..]
    }

    /// Decompresses and decodes the records. A gap batch has none.
    pub fn records(&self) -> Result<Vec<Record>, BatchError> {
        if self.header.is_gap() {
            return Ok(Vec::new());
        }
        let raw = match self.header.codec {
            Codec::None => self.bytes.slice(usize::from(self.header.header_len)..),
            Codec::Zstd => Bytes::from(decompress(self.body(), self.header.raw_len)?),
            Codec::ZstdDict => return Err(BatchError::UnknownDictionary(self.header.dict_id)),
        };
        let expand_max = self.header.is_shredded().then_some(self.limits.raw_bytes_max.min(BODY_LEN_CEILING) as usize);
        decode_records(&raw, self.header.record_count, expand_max)
    }
}

/// A whole batch whose bytes arrived in pieces (a QUIC stream's chunks), validated as
/// [`Batch::from_bytes`] does and never joined: the log writes the pieces as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchParts {
    header: BatchHeader,
    pieces: Vec<Bytes>,
}

impl BatchParts {
    /// Takes `pieces`, in order, as exactly one batch: both CRCs checked, nothing decompressed.
    pub fn from_pieces(mut pieces: Vec<Bytes>, limits: &BatchLimits) -> Result<BatchParts, BatchError> {
        pieces.retain(|p| !p.is_empty());
        let have: usize = pieces.iter().map(Bytes::len).sum();
        if pieces.len() <= 1 {
            let batch = Batch::from_bytes(pieces.pop().unwrap_or_default(), limits)?;
            return Ok(batch.into());
        }
        // The header, copied out when it spans pieces (it is at most HEADER_LEN_MAX bytes).
        let first = &pieces[0];
        let copied;
        let head: &[u8] = if first.len() >= HEADER_LEN_MAX || first.len() == have {
            first
        } else {
            let mut h = Vec::with_capacity(HEADER_LEN_MAX.min(have));
            for p in &pieces {
                let k = p.len().min(h.capacity() - h.len());
                h.extend_from_slice(&p[..k]);
                if h.len() == h.capacity() {
                    break;
                }
            }
            copied = h;
            &copied
        };
        let Some(header) = BatchHeader::decode(head, limits)? else {
            return Err(BatchError::Truncated { have });
        };
        let len = header.batch_len();
        if have < len {
            return Err(BatchError::Truncated { have });
        }
        // The body's CRC, over bytes header_len..len of the pieces.
        let (mut at, body) = (0, usize::from(header.header_len)..len);
        let mut crc = 0;
        for p in &pieces {
            let (from, to) = (body.start.clamp(at, at + p.len()), body.end.clamp(at, at + p.len()));
            crc = crc32c::crc32c_append(crc, &p[from - at..to - at]);
            at += p.len();
        }
        if crc != header.body_crc {
            return Err(BatchError::BodyCrc { stored: header.body_crc, actual: crc });
        }
        if have > len {
            return Err(BatchError::TrailingBytes { batch_len: len, have });
        }
        Ok(BatchParts { header, pieces })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The encoded bytes, in pieces, as they go to disk.
    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Bytes of the whole batch.
    pub fn len(&self) -> usize {
        self.header.batch_len()
    }

    /// Never true: a batch has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl From<Batch> for BatchParts {
    fn from(batch: Batch) -> BatchParts {
        BatchParts { header: batch.header, pieces: vec![batch.bytes] }
    }
}

/// How to compress batch bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Store bodies as they are.
    None,
    /// zstd at this level (1 is the measured sweet spot for CDR JSON).
    Zstd {
        /// zstd level, 1..=22 (negative levels are zstd's fast modes).
        level: i32,
    },
}

/// Collects records into a raw body, ready to be compressed into a batch.
///
/// The batcher pushes records as they arrive and finishes the batch when its linger or byte
/// bound is reached; [`BatchBuilder::raw_len`] tells how big it has grown.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    cols: [Vec<u8>; COLUMNS],
    count: u32,
    prev_ts: i64,
    min_ts: i64,
    max_ts: i64,
}

const COLUMNS: usize = 5;
const COL_TS: usize = 0;
const COL_TOPIC: usize = 1;
const COL_LEN: usize = 2;
const COL_PAYLOAD: usize = 3;
const COL_ATTRS: usize = 4;

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one record. Refuses a record that breaks a bound, leaving the builder unchanged.
    pub fn push(&mut self, ts_ms: i64, topic: &str, payload: &[u8], attrs: &[Attr]) -> Result<(), BatchError> {
        check_len("topic", topic.len(), TOPIC_LEN_MAX)?;
        check_len("payload", payload.len(), BODY_LEN_CEILING as usize)?;
        check_len("attrs", attrs.len(), ATTRS_MAX)?;
        for a in attrs {
            check_len("attr key", a.key.len(), ATTR_KEY_LEN_MAX)?;
            check_len("attr value", a.value.len(), ATTR_VALUE_LEN_MAX)?;
        }
        if self.count == u32::MAX {
            return Err(BatchError::TooLarge {
                field: "record_count",
                value: u64::from(self.count),
                max: u64::from(u32::MAX - 1),
            });
        }
        put_varint(&mut self.cols[COL_TS], zigzag(ts_ms.wrapping_sub(self.prev_ts)));
        put_bytes(&mut self.cols[COL_TOPIC], topic.as_bytes());
        put_varint(&mut self.cols[COL_LEN], payload.len() as u64);
        self.cols[COL_PAYLOAD].extend_from_slice(payload);
        let a = &mut self.cols[COL_ATTRS];
        put_varint(a, attrs.len() as u64);
        for attr in attrs {
            put_bytes(a, attr.key.as_bytes());
            put_bytes(a, attr.value.as_bytes());
        }
        if self.count == 0 {
            self.min_ts = ts_ms;
            self.max_ts = ts_ms;
        } else {
            self.min_ts = self.min_ts.min(ts_ms);
            self.max_ts = self.max_ts.max(ts_ms);
        }
        self.prev_ts = ts_ms;
        self.count += 1;
        Ok(())
    }

    /// Appends a [`Record`].
    pub fn push_record(&mut self, r: &Record) -> Result<(), BatchError> {
        self.push(r.ts_ms, &r.topic, &r.payload, &r.attrs)
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// Raw (uncompressed) body bytes so far.
    pub fn raw_len(&self) -> usize {
        self.cols.iter().map(|c| c.len() + varint_len(c.len() as u64)).sum()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The raw body: column lengths, then the columns; `payloads` replaces the payloads column.
    fn write_raw(&self, payloads: Option<&[u8]>, out: &mut Vec<u8>) {
        let cols: [&[u8]; COLUMNS] =
            std::array::from_fn(|i| if i == COL_PAYLOAD { payloads.unwrap_or(&self.cols[i]) } else { &self.cols[i] });
        out.clear();
        out.reserve(cols.iter().map(|c| c.len() + 10).sum());
        for c in cols {
            put_varint(out, c.len() as u64);
        }
        for c in cols {
            out.extend_from_slice(c);
        }
    }

    /// Every payload's length, read back from the lengths column.
    fn payload_lens(&self, out: &mut Vec<usize>) {
        out.clear();
        let mut r = Reader { buf: &self.cols[COL_LEN], pos: 0 };
        while r.pos < r.buf.len() {
            out.push(r.varint().expect("the builder wrote these varints") as usize);
        }
    }

    fn reset(&mut self) {
        self.cols.iter_mut().for_each(Vec::clear);
        self.count = 0;
        self.prev_ts = 0;
    }
}

/// Turns builders into batches; holds the zstd context so it is reused batch after batch.
pub struct BatchEncoder {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    shred: bool,
    shredder: shred::Shredder,
    shredded: Vec<u8>,
    lens: Vec<usize>,
    raw: Vec<u8>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("compression", &self.compression)
            .field("shred", &self.shred)
            .finish_non_exhaustive()
    }
}

impl BatchEncoder {
    /// An encoder for `compression`.
    pub fn new(compression: Compression) -> Result<Self, BatchError> {
        let zstd = match compression {
            Compression::None => None,
            Compression::Zstd { level } => {
                Some(zstd::bulk::Compressor::new(level).map_err(|e| BatchError::Compress(e.to_string()))?)
            }
        };
        Ok(Self {
            compression,
            zstd,
            shred: true,
            shredder: shred::Shredder::default(),
            shredded: Vec::new(),
            lens: Vec::new(),
            raw: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Whether JSON batches that are compressed get their payloads shredded (on by default;
    /// off stores the payloads column plain, as benches compare).
    pub fn set_shred(&mut self, on: bool) {
        self.shred = on;
    }

    /// Encodes the builder's records as one batch appended to `out`, and empties the builder.
    pub fn finish(
        &mut self,
        builder: &mut BatchBuilder,
        meta: &BatchMeta,
        out: &mut BytesMut,
    ) -> Result<BatchHeader, BatchError> {
        if builder.is_empty() {
            return Err(BatchError::Invalid {
                field: "record_count",
                reason: "a data batch needs at least one record",
            });
        }
        check_len("raw_len", builder.raw_len(), BODY_LEN_CEILING as usize)?;
        let mut flags = 0;
        let shred = self.shred && self.zstd.is_some() && meta.payload_format == PayloadFormat::Json && {
            builder.payload_lens(&mut self.lens);
            self.shredder.shred(&builder.cols[COL_PAYLOAD], &self.lens, &mut self.shredded)
        };
        if shred {
            flags |= FLAG_SHREDDED;
        }
        builder.write_raw(shred.then_some(&self.shredded[..]), &mut self.raw);
        let raw_len = self.raw.len() as u32;
        let (codec, body): (Codec, &[u8]) = match self.zstd.as_mut() {
            None => (Codec::None, &self.raw),
            Some(z) => {
                self.scratch.clear();
                self.scratch.reserve(zstd::zstd_safe::compress_bound(self.raw.len()));
                z.compress_to_buffer(&self.raw, &mut self.scratch).map_err(|e| BatchError::Compress(e.to_string()))?;
                (Codec::Zstd, &self.scratch)
            }
        };
        let header = HeaderFields {
            flags,
            codec,
            meta,
            record_count: builder.count,
            raw_len,
            min_ts: builder.min_ts,
            max_ts: builder.max_ts,
            tlvs: &[],
        };
        let start = out.len();
        write_header(&header, body, out)?;
        out.extend_from_slice(body);
        builder.reset();
        let unbounded =
            BatchLimits { body_bytes_max: BODY_LEN_CEILING, raw_bytes_max: BODY_LEN_CEILING, records_max: u32::MAX };
        debug_assert!(Batch::decode(&out[start..], &unbounded).is_ok_and(|b| b.is_some()));
        header_of(&out[start..])
    }

    /// Encodes a batch of `records` in one call.
    pub fn encode(
        &mut self,
        meta: &BatchMeta,
        records: &[Record],
        out: &mut BytesMut,
    ) -> Result<BatchHeader, BatchError> {
        let mut builder = BatchBuilder::new();
        for r in records {
            builder.push_record(r)?;
        }
        self.finish(&mut builder, meta, out)
    }
}

/// Encodes a gap batch: `count` seqs from `meta.base_seq` were dropped for `reason`.
/// `ts_ms` is the event-time range the dropped records had (or the time of the drop).
pub fn encode_gap(
    meta: &BatchMeta,
    count: u32,
    reason: GapReason,
    ts_ms: (i64, i64),
    out: &mut BytesMut,
) -> Result<BatchHeader, BatchError> {
    if count == 0 {
        return Err(BatchError::Invalid { field: "record_count", reason: "a gap covers at least one seq" });
    }
    let tlv = [Tlv { kind: TLV_GAP_REASON, value: vec![reason.to_byte()] }];
    let header = HeaderFields {
        flags: FLAG_GAP,
        codec: Codec::None,
        meta,
        record_count: count,
        raw_len: 0,
        min_ts: ts_ms.0.min(ts_ms.1),
        max_ts: ts_ms.0.max(ts_ms.1),
        tlvs: &tlv,
    };
    let start = out.len();
    write_header(&header, &[], out)?;
    header_of(&out[start..])
}

/// Errors of the batch codec. Every one names what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a batch: bad magic")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported batch format version {0}")]
    UnsupportedVersion(u8),
    /// `header_len` outside the format's bounds.
    #[error("header length {0} outside {HEADER_LEN_MIN}..={HEADER_LEN_MAX}")]
    HeaderLen(usize),
    /// The header CRC does not match.
    #[error("header CRC mismatch: stored {stored:#010x}, computed {actual:#010x}")]
    HeaderCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        actual: u32,
    },
    /// The body CRC does not match.
    #[error("body CRC mismatch: stored {stored:#010x}, computed {actual:#010x}")]
    BodyCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        actual: u32,
    },
    /// A field holds a value the format forbids.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A length or count beyond its bound.
    #[error("{field} is {value}, above the bound {max}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The bound.
        max: u64,
    },
    /// A record in the body could not be decoded.
    #[error("record {index}: {reason}")]
    Record {
        /// Index of the record in the batch.
        index: u32,
        /// Why.
        reason: &'static str,
    },
    /// The buffer ends inside the batch.
    #[error("batch truncated: only {have} bytes")]
    Truncated {
        /// Bytes present.
        have: usize,
    },
    /// Bytes follow the batch where exactly one was expected.
    #[error("{have} bytes given for a batch of {batch_len}")]
    TrailingBytes {
        /// Length of the batch.
        batch_len: usize,
        /// Bytes given.
        have: usize,
    },
    /// zstd refused to decompress (or the output passed `raw_len`).
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// zstd refused to compress.
    #[error("compression failed: {0}")]
    Compress(String),
    /// The batch needs a dictionary this reader does not have.
    #[error("unknown dictionary {0:#018x}")]
    UnknownDictionary(u64),
}

// ---- helpers -------------------------------------------------------------------------------

struct HeaderFields<'a> {
    flags: u8,
    codec: Codec,
    meta: &'a BatchMeta,
    record_count: u32,
    raw_len: u32,
    min_ts: i64,
    max_ts: i64,
    tlvs: &'a [Tlv],
}

fn write_header(h: &HeaderFields<'_>, body: &[u8], out: &mut BytesMut) -> Result<(), BatchError> {
    check_name("producer", &h.meta.producer, PRODUCER_LEN_MAX, false)?;
    check_name("stream", &h.meta.stream, STREAM_LEN_MAX, true)?;
    check_len("body_len", body.len(), BODY_LEN_CEILING as usize)?;
    let tlv_len: usize = h.tlvs.iter().map(|t| 4 + t.value.len()).sum();
    check_len("tlv_len", tlv_len, TLV_BYTES_MAX)?;
    if h.meta.base_seq.0.checked_add(u64::from(h.record_count)).is_none() {
        return Err(BatchError::Invalid { field: "base_seq", reason: "base_seq + record_count overflows" });
    }
    let header_len = FIXED_LEN + h.meta.producer.len() + 1 + h.meta.stream.len() + 2 + tlv_len + 4;
    let start = out.len();
    out.reserve(header_len + body.len());
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(h.flags);
    out.put_u16_le(header_len as u16);
    out.put_u32_le(body.len() as u32);
    out.put_u32_le(h.raw_len);
    out.put_u32_le(crc32c::crc32c(body));
    out.put_u8(h.codec.to_byte());
    out.put_u8(h.meta.payload_format.to_byte());
    out.put_u16_le(0);
    out.put_u64_le(0);
    out.put_u64_le(h.meta.epoch.0);
    out.put_u64_le(h.meta.base_seq.0);
    out.put_u32_le(h.record_count);
    out.put_i64_le(h.min_ts);
    out.put_i64_le(h.max_ts);
    out.put_u8(h.meta.producer.len() as u8);
    out.put_slice(h.meta.producer.as_bytes());
    out.put_u8(h.meta.stream.len() as u8);
    out.put_slice(h.meta.stream.as_bytes());
    out.put_u16_le(tlv_len as u16);
    for t in h.tlvs {
        out.put_u16_le(t.kind);
        out.put_u16_le(t.value.len() as u16);
        out.put_slice(&t.value);
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.put_u32_le(crc);
    debug_assert_eq!(out.len() - start, header_len);
    Ok(())
}

fn header_of(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let limits =
        BatchLimits { body_bytes_max: BODY_LEN_CEILING, raw_bytes_max: BODY_LEN_CEILING, records_max: u32::MAX };
    BatchHeader::decode(buf, &limits)?.ok_or(BatchError::Truncated { have: buf.len() })
}

/// Parses the CRC-checked header bytes (without the trailing CRC).
fn parse_header(b: &[u8], limits: &BatchLimits) -> Result<BatchHeader, BatchError> {
    let mut r = Reader { buf: b, pos: 8 };
    let flags = b[5];
    if flags & !(FLAG_GAP | FLAG_SHREDDED) != 0 {
        return Err(BatchError::Invalid { field: "flags", reason: "unknown flag bits set" });
    }
    let header_len = u16::from_le_bytes([b[6], b[7]]);
    let body_len = r.u32()?;
    let raw_len = r.u32()?;
    let body_crc = r.u32()?;
    let codec = Codec::from_byte(r.u8()?)?;
    let payload_format = PayloadFormat::from_byte(r.u8()?);
    if r.u16()? != 0 {
        return Err(BatchError::Invalid { field: "reserved", reason: "must be zero" });
    }
    let dict_id = r.u64()?;
    let epoch = Epoch(r.u64()?);
    let base_seq = Seq(r.u64()?);
    let record_count = r.u32()?;
    let min_ts_ms = r.u64()? as i64;
    let max_ts_ms = r.u64()? as i64;
    let producer = r.name("producer", PRODUCER_LEN_MAX)?;
    let stream = r.name("stream", STREAM_LEN_MAX)?;
    check_name("stream", &stream, STREAM_LEN_MAX, true)?;
    let tlv_len = usize::from(r.u16()?);
    check_len("tlv_len", tlv_len, TLV_BYTES_MAX)?;
    let mut tlv_bytes = Reader { buf: r.take(tlv_len)?, pos: 0 };
    if r.pos != b.len() {
        return Err(BatchError::Invalid { field: "header_len", reason: "does not match the fields" });
    }
    let mut tlvs = Vec::new();
    while tlv_bytes.pos < tlv_bytes.buf.len() {
        let kind = tlv_bytes.u16()?;
        let len = usize::from(tlv_bytes.u16()?);
        tlvs.push(Tlv { kind, value: tlv_bytes.take(len)?.to_vec() });
    }

    // Field rules.
    let gap = flags & FLAG_GAP != 0;
    check_len("body_len", body_len as usize, limits.body_bytes_max.min(BODY_LEN_CEILING) as usize)?;
    check_len("raw_len", raw_len as usize, limits.raw_bytes_max.min(BODY_LEN_CEILING) as usize)?;
    check_len("record_count", record_count as usize, limits.records_max as usize)?;
    if record_count == 0 {
        return Err(BatchError::Invalid { field: "record_count", reason: "must be at least 1" });
    }
    if base_seq.0.checked_add(u64::from(record_count)).is_none() {
        return Err(BatchError::Invalid { field: "base_seq", reason: "base_seq + record_count overflows" });
    }
    if min_ts_ms > max_ts_ms {
        return Err(BatchError::Invalid { field: "max_ts", reason: "below min_ts" });
    }
    if gap {
        if body_len != 0 || raw_len != 0 || codec != Codec::None || flags & FLAG_SHREDDED != 0 {
            return Err(BatchError::Invalid { field: "flags", reason: "a gap batch has no body" });
        }
    } else {
        if u64::from(raw_len) < u64::from(record_count) * u64::from(RECORD_LEN_MIN) {
            return Err(BatchError::Invalid { field: "raw_len", reason: "too short for record_count" });
        }
        if codec == Codec::None && body_len != raw_len {
            return Err(BatchError::Invalid { field: "body_len", reason: "differs from raw_len without compression" });
        }
    }
    match (codec, dict_id) {
        (Codec::ZstdDict, 0) => {
            return Err(BatchError::Invalid { field: "dict_id", reason: "zero with codec zstd+dict" });
        }
        (Codec::None | Codec::Zstd, d) if d != 0 => {
            return Err(BatchError::Invalid { field: "dict_id", reason: "set without codec zstd+dict" });
        }
        _ => {}
    }
    Ok(BatchHeader {
        flags,
        header_len,
        body_len,
        raw_len,
        body_crc,
        codec,
        dict_id,
        payload_format,
        epoch,
        base_seq,
        record_count,
        min_ts_ms,
        max_ts_ms,
        producer,
        stream,
        tlvs,
    })
}

fn decompress(body: &[u8], raw_len: u32) -> Result<Vec<u8>, BatchError> {
    // `raw_len` is already bounded by the limits; zstd refuses to write past the capacity.
    let out = zstd::bulk::decompress(body, raw_len as usize).map_err(|e| BatchError::Decompress(e.to_string()))?;
    if out.len() != raw_len as usize {
        return Err(BatchError::Decompress(format!("{} bytes out, header says {raw_len}", out.len())));
    }
    Ok(out)
}

/// Decodes a raw body. `expand_max` is set when the payloads column is shredded: the most
/// payload bytes it may expand to.
fn decode_records(raw: &Bytes, count: u32, expand_max: Option<usize>) -> Result<Vec<Record>, BatchError> {
    let bad = |reason| BatchError::Invalid { field: "body", reason };
    let mut head = Reader { buf: raw, pos: 0 };
    let mut lens = [0usize; COLUMNS];
    for l in &mut lens {
        *l = usize::try_from(head.varint()?).map_err(|_| bad("column length"))?;
    }
    let total = lens.iter().try_fold(head.pos, |acc, &l| acc.checked_add(l)).ok_or(bad("column lengths overflow"))?;
    if total != raw.len() {
        return Err(bad("column lengths do not add up to raw_len"));
    }
    let mut at = head.pos;
    let mut cols: [Reader<'_>; COLUMNS] = std::array::from_fn(|i| {
        let c = Reader { buf: &raw[at..at + lens[i]], pos: 0 };
        at += lens[i];
        c
    });
    // The payloads: a slice of the raw body, or rebuilt from the shredded column.
    let (payloads, payload_base) = match expand_max {
        None => (raw.clone(), head.pos + lens[..COL_PAYLOAD].iter().sum::<usize>()),
        Some(max) => {
            let mut plens = Vec::with_capacity(count as usize);
            let mut sum = 0usize;
            let mut l = Reader { buf: cols[COL_LEN].buf, pos: 0 };
            for index in 0..count {
                let len = l.varint().map_err(|_| BatchError::Record { index, reason: "bad payload length" })?;
                sum = sum.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                if sum > max {
                    return Err(BatchError::TooLarge {
                        field: "shredded payloads",
                        value: sum as u64,
                        max: max as u64,
                    });
                }
                plens.push(len as usize);
            }
            let mut out = Vec::with_capacity(sum);
            shred::unshred(cols[COL_PAYLOAD].buf, &plens, &mut out)?;
            (Bytes::from(out), 0)
        }
    };
    let mut payload_col = Reader { buf: &payloads[payload_base..], pos: 0 };
    if expand_max.is_none() {
        payload_col.buf = &payload_col.buf[..lens[COL_PAYLOAD]];
    }
    cols[COL_PAYLOAD] = Reader { buf: &[], pos: 0 };
    // `count` is bounded by raw_len / RECORD_LEN_MIN, so this allocation is bounded by raw_len.
    let mut records = Vec::with_capacity(count as usize);
    let mut prev_ts = 0i64;
    for index in 0..count {
        let err = |reason| BatchError::Record { index, reason };
        let ts = prev_ts.wrapping_add(unzigzag(cols[COL_TS].varint().map_err(|_| err("bad timestamp"))?));
        prev_ts = ts;
        let topic = cols[COL_TOPIC].bytes_field(TOPIC_LEN_MAX).map_err(|_| err("bad topic length"))?;
        let topic = std::str::from_utf8(topic).map_err(|_| err("topic is not UTF-8"))?.to_owned();
        let payload_len = cols[COL_LEN].varint().map_err(|_| err("bad payload length"))?;
        let payload_len = usize::try_from(payload_len).map_err(|_| err("bad payload length"))?;
        let start = payload_col.pos;
        payload_col.take(payload_len).map_err(|_| err("payload runs past its column"))?;
        let payload = payloads.slice(payload_base + start..payload_base + start + payload_len);
        let a = &mut cols[COL_ATTRS];
        let n_attrs = a.varint().map_err(|_| err("bad attribute count"))?;
        if n_attrs > ATTRS_MAX as u64 {
            return Err(err("too many attributes"));
        }
        let mut attrs = Vec::with_capacity(n_attrs as usize);
        for _ in 0..n_attrs {
            let key = a.bytes_field(ATTR_KEY_LEN_MAX).map_err(|_| err("bad attribute key"))?;
            let key = std::str::from_utf8(key).map_err(|_| err("attribute key is not UTF-8"))?.to_owned();
            let value = a.bytes_field(ATTR_VALUE_LEN_MAX).map_err(|_| err("bad attribute value"))?;
            let value = std::str::from_utf8(value).map_err(|_| err("attribute value is not UTF-8"))?.to_owned();
            attrs.push(Attr { key, value });
        }
        records.push(Record { ts_ms: ts, topic, payload, attrs });
    }
    if cols.iter().any(|c| c.pos != c.buf.len()) || payload_col.pos != payload_col.buf.len() {
        return Err(bad("bytes left in a column after the last record"));
    }
    Ok(records)
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), BatchError> {
    if len > max {
        return Err(BatchError::TooLarge { field, value: len as u64, max: max as u64 });
    }
    Ok(())
}

/// Producer: 1..=max bytes of UTF-8 without control characters. Stream: `[a-z0-9_.-]`.
fn check_name(field: &'static str, name: &str, max: usize, stream: bool) -> Result<(), BatchError> {
    if name.is_empty() {
        return Err(BatchError::Invalid { field, reason: "empty" });
    }
    check_len(field, name.len(), max)?;
    let ok = if stream {
        name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'))
    } else {
        !name.chars().any(char::is_control)
    };
    if !ok {
        return Err(BatchError::Invalid {
            field,
            reason: if stream { "only a-z 0-9 _ . - allowed" } else { "control characters" },
        });
    }
    Ok(())
}

/// Whether `name` is a valid stream name (also a directory name in the log).
pub fn is_valid_stream_name(name: &str) -> bool {
    check_name("stream", name, STREAM_LEN_MAX, true).is_ok() && name != "." && name != ".."
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A bounds-checked cursor; every read fails cleanly at the end of the buffer.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(BatchError::Invalid { field: "length", reason: "runs past the end" })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, BatchError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, BatchError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("took 2")))
    }

    fn u32(&mut self) -> Result<u32, BatchError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("took 4")))
    }

    fn u64(&mut self) -> Result<u64, BatchError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("took 8")))
    }

    fn name(&mut self, field: &'static str, max: usize) -> Result<String, BatchError> {
        let len = usize::from(self.u8()?);
        if len == 0 || len > max {
            return Err(BatchError::Invalid { field, reason: "length out of bounds" });
        }
        let b = self.take(len)?;
        let s = std::str::from_utf8(b).map_err(|_| BatchError::Invalid { field, reason: "not UTF-8" })?;
        Ok(s.to_owned())
    }

    fn varint(&mut self) -> Result<u64, BatchError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if shift == 63 && b > 1 {
                    break;
                }
                return Ok(v);
            }
        }
        Err(BatchError::Invalid { field: "varint", reason: "longer than 64 bits" })
    }

    fn bytes_field(&mut self, max: usize) -> Result<&'a [u8], BatchError> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(BatchError::Invalid { field: "length", reason: "above its bound" });
        }
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(base: u64) -> BatchMeta {
        BatchMeta {
            producer: "edge-01".into(),
            epoch: Epoch(0xdead_beef),
            stream: "cdr".into(),
            base_seq: Seq(base),
            payload_format: PayloadFormat::Json,
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let attr = ("[a-z.]{1,12}", "\\PC{0,40}").prop_map(|(key, value)| Attr { key, value });
        (
            any::<i64>(),
            "\\PC{0,64}",
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(attr, 0..4),
        )
            .prop_map(|(ts_ms, topic, payload, attrs)| Record { ts_ms, topic, payload: payload.into(), attrs })
    }

    fn encode(records: &[Record], compression: Compression) -> Bytes {
        let mut out = BytesMut::new();
        BatchEncoder::new(compression).unwrap().encode(&meta(7), records, &mut out).unwrap();
        out.freeze()
    }

    #[test]
    fn round_trip_keeps_header_fields() {
        let recs = vec![
            Record { ts_ms: 1_700_000_000_123, topic: "a/b".into(), payload: Bytes::from_static(b"{}"), attrs: vec![] },
            Record {
                ts_ms: 1_700_000_000_100,
                topic: "a/c".into(),
                payload: Bytes::from_static(b"[1]"),
                attrs: vec![Attr { key: attr::MQTT_PACKET_ID.into(), value: "42".into() }],
            },
        ];
        let bytes = encode(&recs, Compression::Zstd { level: 1 });
        let batch = Batch::from_bytes(bytes, &BatchLimits::default()).unwrap();
        let h = batch.header();
        assert_eq!((h.base_seq, h.end_seq(), h.record_count), (Seq(7), Seq(9), 2));
        assert_eq!((h.min_ts_ms, h.max_ts_ms), (1_700_000_000_100, 1_700_000_000_123));
        assert_eq!((h.producer.as_str(), h.stream.as_str(), h.epoch), ("edge-01", "cdr", Epoch(0xdead_beef)));
        assert_eq!(h.codec, Codec::Zstd);
        assert_eq!(batch.records().unwrap(), recs);
        assert_eq!(batch.records().unwrap()[1].attr(attr::MQTT_PACKET_ID), Some("42"));
    }

    #[test]
    fn gap_batch_round_trips_with_reason() {
        let mut out = BytesMut::new();
        encode_gap(&meta(100), 50, GapReason::DiskFullDropOldest, (5, 9), &mut out).unwrap();
        let batch = Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap();
        assert!(batch.header().is_gap());
        assert_eq!(batch.header().end_seq(), Seq(150));
        assert_eq!(batch.header().gap_reason(), Some(GapReason::DiskFullDropOldest));
        assert!(batch.records().unwrap().is_empty());
    }

    #[test]
    fn incomplete_prefix_is_none_not_error() {
        let recs = vec![Record { ts_ms: 1, topic: "t".into(), payload: Bytes::from_static(b"x"), attrs: vec![] }];
        let bytes = encode(&recs, Compression::None);
        for cut in 0..bytes.len() {
            assert_eq!(Batch::decode(&bytes[..cut], &BatchLimits::default()), Ok(None), "cut at {cut}");
        }
        assert!(Batch::decode(&bytes, &BatchLimits::default()).unwrap().is_some());
    }

    #[test]
    fn limits_refuse_oversize_batches() {
        let recs = vec![Record { ts_ms: 1, topic: "t".into(), payload: vec![b'x'; 1000].into(), attrs: vec![] }];
        let bytes = encode(&recs, Compression::None);
        let tight = BatchLimits { body_bytes_max: 100, raw_bytes_max: 100, records_max: 10 };
        assert!(matches!(Batch::decode(&bytes, &tight), Err(BatchError::TooLarge { field: "body_len", .. })));
    }

    #[test]
    fn zstd_output_is_capped_at_raw_len() {
        // A valid zstd frame of 10 KiB of zeros, declared as 100 bytes raw.
        let recs = vec![Record { ts_ms: 1, topic: "t".into(), payload: vec![0; 10_000].into(), attrs: vec![] }];
        let good = encode(&recs, Compression::Zstd { level: 1 });
        let mut forged = BytesMut::from(&good[..]);
        forged[12..16].copy_from_slice(&100u32.to_le_bytes());
        let hl = usize::from(u16::from_le_bytes([forged[6], forged[7]]));
        let crc = crc32c::crc32c(&forged[..hl - 4]);
        forged[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
        let batch = Batch::from_bytes(forged.freeze(), &BatchLimits::default()).unwrap();
        assert!(matches!(batch.records(), Err(BatchError::Decompress(_))));
    }

    fn json_records(n: usize, key_len: usize) -> Vec<Record> {
        let key = "k".repeat(key_len);
        (0..n)
            .map(|i| Record {
                ts_ms: i as i64,
                topic: "cdr/x".into(),
                payload: format!(r#"{{"{key}":{i},"imsi":"3102607{i:08}"}}"#).into_bytes().into(),
                attrs: vec![],
            })
            .collect()
    }

    #[test]
    fn json_batches_are_shredded_when_compressed_only() {
        let recs = json_records(50, 4);
        for (format, compression, shredded) in [
            (PayloadFormat::Json, Compression::Zstd { level: 1 }, true),
            (PayloadFormat::Senml, Compression::Zstd { level: 1 }, false),
            (PayloadFormat::Raw, Compression::Zstd { level: 1 }, false),
            (PayloadFormat::Json, Compression::None, false),
        ] {
            let mut m = meta(0);
            m.payload_format = format;
            let mut out = BytesMut::new();
            BatchEncoder::new(compression).unwrap().encode(&m, &recs, &mut out).unwrap();
            let batch = Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap();
            assert_eq!(batch.header().is_shredded(), shredded, "{format:?} {compression:?}");
            assert_eq!(batch.records().unwrap(), recs);
        }
        let mut enc = BatchEncoder::new(Compression::Zstd { level: 1 }).unwrap();
        enc.set_shred(false);
        let mut out = BytesMut::new();
        assert!(!enc.encode(&meta(0), &recs, &mut out).unwrap().is_shredded());
    }

    #[test]
    fn shredded_payloads_expand_only_up_to_the_raw_limit() {
        // 200 payloads of ~930 bytes share one template: a few KB raw, 186 KB of payloads.
        let recs = json_records(200, 900);
        let bytes = encode(&recs, Compression::Zstd { level: 1 });
        let tight = BatchLimits { raw_bytes_max: 100_000, ..BatchLimits::default() };
        let batch = Batch::from_bytes(bytes.clone(), &tight).expect("the stored raw body is small");
        assert!(batch.header().raw_len < 100_000);
        assert!(matches!(batch.records(), Err(BatchError::TooLarge { field: "shredded payloads", .. })));
        let batch = Batch::from_bytes(bytes, &BatchLimits::default()).unwrap();
        assert_eq!(batch.records().unwrap(), recs);
    }

    #[test]
    fn a_gap_batch_may_not_claim_shredded_payloads() {
        let mut out = BytesMut::new();
        encode_gap(&meta(0), 3, GapReason::Corruption, (0, 0), &mut out).unwrap();
        out[5] |= FLAG_SHREDDED;
        let hl = usize::from(u16::from_le_bytes([out[6], out[7]]));
        let crc = crc32c::crc32c(&out[..hl - 4]);
        out[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Batch::decode(&out, &BatchLimits::default()),
            Err(BatchError::Invalid { field: "flags", .. })
        ));
    }

    #[test]
    fn bad_names_are_refused_on_encode() {
        let mut m = meta(0);
        m.stream = "CDR/../x".into();
        let mut out = BytesMut::new();
        let r = encode_gap(&m, 1, GapReason::Corruption, (0, 0), &mut out);
        assert!(matches!(r, Err(BatchError::Invalid { field: "stream", .. })));
    }

    proptest! {
        #[test]
        fn batch_round_trips(records in proptest::collection::vec(arb_record(), 1..20), zstd in any::<bool>()) {
            let compression = if zstd { Compression::Zstd { level: 1 } } else { Compression::None };
            let bytes = encode(&records, compression);
            let batch = Batch::from_bytes(bytes, &BatchLimits::default()).unwrap();
            prop_assert_eq!(batch.header().record_count as usize, records.len());
            prop_assert_eq!(batch.records().unwrap(), records);
        }

        #[test]
        fn a_batch_in_pieces_is_judged_as_the_whole_one(
            records in proptest::collection::vec(arb_record(), 1..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
            cut_end in proptest::option::of(any::<prop::sample::Index>()),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            // Damaged, cut short or with bytes after it: the pieces get the verdict the whole
            // bytes get, wherever they are cut (the header spanning pieces included).
            let mut bytes = encode(&records, Compression::None).to_vec();
            if let Some((at, x)) = flip {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            if let Some(at) = cut_end {
                bytes.truncate(at.index(bytes.len() + 1));
            }
            bytes.extend_from_slice(&extra);
            let whole = Bytes::from(bytes);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(whole.len() + 1)).collect();
            at.push(0);
            at.push(whole.len());
            at.sort();
            let pieces: Vec<Bytes> = at.windows(2).map(|w| whole.slice(w[0]..w[1])).collect();
            let limits = BatchLimits::default();
            let expected = Batch::from_bytes(whole.clone(), &limits).map(|b| b.header().clone());
            let parts = BatchParts::from_pieces(pieces, &limits);
            prop_assert_eq!(parts.as_ref().map(|p| p.header().clone()).map_err(Clone::clone), expected);
            if let Ok(p) = parts {
                prop_assert_eq!(p.len(), whole.len());
                prop_assert_eq!(p.pieces().concat(), whole.to_vec());
            }
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_any_bytes(&bytes);
        }

        #[test]
        fn decoding_mutated_batches_never_panics(records in proptest::collection::vec(arb_record(), 1..4), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut bytes = encode(&records, Compression::Zstd { level: 1 }).to_vec();
            for (at, v) in edits {
                let i = at % bytes.len();
                bytes[i] = v;
            }
            check_any_bytes(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(records in proptest::collection::vec(arb_record(), 1..6), bit in any::<usize>(), zstd in any::<bool>()) {
            let compression = if zstd { Compression::Zstd { level: 1 } } else { Compression::None };
            let bytes = encode(&records, compression);
            let mut flipped = bytes.to_vec();
            let bit = bit % (flipped.len() * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Batch::from_bytes(Bytes::from(flipped), &BatchLimits::default()).is_err());
        }
    }

    /// Also the body of the `batch_decode` fuzz target.
    fn check_any_bytes(bytes: &[u8]) {
        crate::fuzzing::batch_decode(bytes);
    }
}
