//! Frames of the edge ↔ core protocol. Pure, buffer-first: `encode(&self, &mut BytesMut)`,
//! `Frame::decode(&[u8]) -> Result<Option<(Frame, usize)>>` (an incomplete frame is `Ok(None)`).
//!
//! ```text
//! frame:   u32 LE length L (of type + payload, 1..=FRAME_LEN_MAX) | u8 type | payload (L - 1 bytes)
//! str8:    u8 length, UTF-8 bytes          ranges:  u32 LE count N, N × (u64 start, u64 end)
//!
//! type 1  HELLO    edge → core, control stream, first frame
//!         u16 version | u64 epoch | str8 edge id (informational: the certificate decides)
//!         | u16 stream count | per stream: str8 name, u64 first_retained, u64 next
//! type 2  WELCOME  core → edge, control stream, answer to HELLO
//!         str8 node | u64 incarnation | u16 stream count | per stream: str8 name, ranges held durably
//! type 3  OPEN     edge → core, first frame of a data stream: str8 stream | u8 lane (0 live, 1 backlog)
//! type 4  BATCH    edge → core, data stream: the batch bytes, exactly as in the edge log
//! type 5  ACK      core → edge, data stream: u64 start | u64 end | u8 marks (bit 0 durable, bit 1 tiered)
//! type 6  TIERED   core → edge, control stream: str8 stream | ranges now in the bucket
//! type 7  DICT     edge → core, control stream: u64 dictionary id | dictionary bytes
//! type 8  ERROR    either way, any stream, last frame: u16 code | u16 LE length, UTF-8 message
//! ```
//!
//! Every count and length is bounded before anything is allocated for it.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use crate::batch::{HEADER_LEN_MAX, is_valid_stream_name};
use crate::ranges::RangeSet;

/// Largest frame: a batch of the largest body plus its header, with room to spare.
pub const FRAME_LEN_MAX: usize = (8 << 20) + HEADER_LEN_MAX + 64;
/// Most streams in a HELLO or WELCOME.
pub const STREAMS_MAX: usize = 1024;
/// Most ranges per stream in a frame.
pub const RANGES_MAX: usize = 65_536;
/// Longest error message.
pub const MESSAGE_LEN_MAX: usize = 1024;

/// Which lane of a log stream a data stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Data appended since the session began (and, oldest-first, everything).
    Live,
    /// What the core lacks from before the session began, sent behind live data.
    Backlog,
}

/// Per-stream part of a HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOffer {
    /// Stream name.
    pub name: String,
    /// First seq the edge still holds.
    pub first_retained: u64,
    /// The seq after the last one the edge holds.
    pub next: u64,
}

/// Per-stream part of a WELCOME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeld {
    /// Stream name.
    pub name: String,
    /// Seq ranges of (edge, epoch, stream) the core holds durably.
    pub held: RangeSet,
}

/// Bits of [`Frame::Ack`]'s marks.
pub mod marks {
    /// Fsynced at the core.
    pub const DURABLE: u8 = 0x01;
    /// In the bucket.
    pub const TIERED: u8 = 0x02;
}

/// Application error codes, also used as QUIC stream reset and connection close codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Orderly close.
    NoError = 0,
    /// A frame that does not decode or comes out of order.
    Protocol = 1,
    /// A frame above [`FRAME_LEN_MAX`].
    FrameTooLarge = 2,
    /// A batch whose header or CRCs are wrong.
    BadBatch = 3,
    /// A batch whose producer is not the certificate's edge id, or of another epoch or stream.
    WrongProducer = 4,
    /// A batch that partly overlaps what the core holds.
    SeqConflict = 5,
    /// A protocol version the core does not speak.
    UnsupportedVersion = 6,
    /// The edge is not on the allow-list.
    NotAllowed = 7,
    /// The core is at a limit (connections, disk budget).
    Overloaded = 8,
    /// A newer session of the same edge took over.
    Superseded = 9,
    /// The core failed internally.
    Internal = 10,
}

impl ErrorCode {
    /// The code for a number; unknown numbers are [`ErrorCode::Protocol`].
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        [
            NoError,
            Protocol,
            FrameTooLarge,
            BadBatch,
            WrongProducer,
            SeqConflict,
            UnsupportedVersion,
            NotAllowed,
            Overloaded,
            Superseded,
            Internal,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
        .unwrap_or(Protocol)
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See the module doc.
    Hello {
        /// Protocol version.
        version: u16,
        /// Producer epoch.
        epoch: u64,
        /// What the edge says it is (the certificate decides).
        edge_id: String,
        /// Streams and the seqs the edge holds.
        streams: Vec<StreamOffer>,
    },
    /// See the module doc.
    Welcome {
        /// Node name.
        node: String,
        /// Node incarnation.
        incarnation: u64,
        /// Per stream, the ranges held durably.
        streams: Vec<StreamHeld>,
    },
    /// See the module doc.
    Open {
        /// Stream name.
        stream: String,
        /// Lane.
        lane: Lane,
    },
    /// See the module doc.
    Batch(bytes::Bytes),
    /// See the module doc.
    Ack {
        /// First seq.
        start: u64,
        /// Seq after the last.
        end: u64,
        /// [`marks`] bits.
        marks: u8,
    },
    /// See the module doc.
    Tiered {
        /// Stream name.
        stream: String,
        /// Ranges now in the bucket.
        ranges: RangeSet,
    },
    /// See the module doc.
    Dict {
        /// Dictionary id (content hash).
        id: u64,
        /// The dictionary.
        bytes: bytes::Bytes,
    },
    /// See the module doc.
    Error {
        /// Code.
        code: ErrorCode,
        /// For a person.
        message: String,
    },
}

/// A frame that does not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is zero or above [`FRAME_LEN_MAX`].
    #[error("frame length {0} outside 1..={FRAME_LEN_MAX}")]
    Length(usize),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// A field is wrong.
    #[error("bad {field}: {reason}")]
    Field {
        /// Which.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl FrameError {
    /// The error code to close the stream with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Length(_) => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Protocol,
        }
    }
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32_le(0);
        match self {
            Frame::Hello { version, epoch, edge_id, streams } => {
                out.put_u8(1);
                out.put_u16_le(*version);
                out.put_u64_le(*epoch);
                put_str8(out, edge_id);
                out.put_u16_le(streams.len() as u16);
                for s in streams {
                    put_str8(out, &s.name);
                    out.put_u64_le(s.first_retained);
                    out.put_u64_le(s.next);
                }
            }
            Frame::Welcome { node, incarnation, streams } => {
                out.put_u8(2);
                put_str8(out, node);
                out.put_u64_le(*incarnation);
                out.put_u16_le(streams.len() as u16);
                for s in streams {
                    put_str8(out, &s.name);
                    put_ranges(out, &s.held);
                }
            }
            Frame::Open { stream, lane } => {
                out.put_u8(3);
                put_str8(out, stream);
                out.put_u8(match lane {
                    Lane::Live => 0,
                    Lane::Backlog => 1,
                });
            }
            Frame::Batch(b) => {
                out.put_u8(4);
                out.put_slice(b);
            }
            Frame::Ack { start, end, marks } => {
                out.put_u8(5);
                out.put_u64_le(*start);
                out.put_u64_le(*end);
                out.put_u8(*marks);
            }
            Frame::Tiered { stream, ranges } => {
                out.put_u8(6);
                put_str8(out, stream);
                put_ranges(out, ranges);
            }
            Frame::Dict { id, bytes } => {
                out.put_u8(7);
                out.put_u64_le(*id);
                out.put_slice(bytes);
            }
            Frame::Error { code, message } => {
                out.put_u8(8);
                out.put_u16_le(*code as u16);
                let m = truncate_utf8(message, MESSAGE_LEN_MAX);
                out.put_u16_le(m.len() as u16);
                out.put_slice(m.as_bytes());
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes the frame at the start of `buf`: the frame and the bytes it took, `Ok(None)`
    /// if `buf` holds only part of it.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        Frame::decode_inner(buf, None)
    }

    /// Decodes the frame at the start of `whole`, sharing a BATCH or DICT body with it.
    pub(super) fn decode_shared(whole: &bytes::Bytes) -> Result<Option<Frame>, FrameError> {
        Ok(Frame::decode_inner(whole, Some(whole))?.map(|(frame, _)| frame))
    }

    /// The whole length on the wire of the frame `buf` starts with (its length prefix
    /// included), once the prefix is there; an error if the prefix is out of bounds.
    pub fn wire_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(len) = buf.get(..4) else { return Ok(None) };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len == 0 || len > FRAME_LEN_MAX {
            return Err(FrameError::Length(len));
        }
        Ok(Some(4 + len))
    }

    /// Decodes from `buf`; a body is a slice of `owned` (the same bytes) when given.
    fn decode_inner(buf: &[u8], owned: Option<&bytes::Bytes>) -> Result<Option<(Frame, usize)>, FrameError> {
        // Bytes from the reader's position to the end of the body: shared or copied.
        let body_rest = |r: &mut Reader<'_>| {
            let at = 5 + r.pos;
            let rest = r.rest();
            match owned {
                Some(b) => b.slice(at..at + rest.len()),
                None => bytes::Bytes::copy_from_slice(rest),
            }
        };
        let Some(n) = Frame::wire_len(buf)? else { return Ok(None) };
        let Some(body) = buf.get(4..n) else { return Ok(None) };
        let mut r = Reader { buf: &body[1..], pos: 0 };
        let frame = match body[0] {
            1 => {
                let version = r.u16()?;
                let epoch = r.u64()?;
                let edge_id = r.str8("edge id")?;
                let n = r.count16("stream count", STREAMS_MAX)?;
                let mut streams = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.stream_name()?;
                    let (first_retained, next) = (r.u64()?, r.u64()?);
                    if first_retained > next {
                        return Err(FrameError::Field { field: "first_retained", reason: "above next" });
                    }
                    streams.push(StreamOffer { name, first_retained, next });
                }
                Frame::Hello { version, epoch, edge_id, streams }
            }
            2 => {
                let node = r.str8("node")?;
                let incarnation = r.u64()?;
                let n = r.count16("stream count", STREAMS_MAX)?;
                let mut streams = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.stream_name()?;
                    streams.push(StreamHeld { name, held: r.ranges()? });
                }
                Frame::Welcome { node, incarnation, streams }
            }
            3 => {
                let stream = r.stream_name()?;
                let lane = match r.u8()? {
                    0 => Lane::Live,
                    1 => Lane::Backlog,
                    _ => return Err(FrameError::Field { field: "lane", reason: "unknown" }),
                };
                Frame::Open { stream, lane }
            }
            4 => Frame::Batch(body_rest(&mut r)),
            5 => {
                let (start, end, marks) = (r.u64()?, r.u64()?, r.u8()?);
                if start >= end {
                    return Err(FrameError::Field { field: "ack", reason: "empty range" });
                }
                Frame::Ack { start, end, marks }
            }
            6 => Frame::Tiered { stream: r.stream_name()?, ranges: r.ranges()? },
            7 => Frame::Dict { id: r.u64()?, bytes: body_rest(&mut r) },
            8 => {
                let code = ErrorCode::from_u16(r.u16()?);
                let len = usize::from(r.u16()?);
                if len > MESSAGE_LEN_MAX {
                    return Err(FrameError::Field { field: "message", reason: "too long" });
                }
                let message = String::from_utf8_lossy(r.take(len)?).into_owned();
                Frame::Error { code, message }
            }
            t => return Err(FrameError::Type(t)),
        };
        if r.pos != r.buf.len() {
            return Err(FrameError::Field { field: "frame", reason: "bytes left after the last field" });
        }
        Ok(Some((frame, n)))
    }
}

fn put_str8(out: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, 255);
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn put_ranges(out: &mut BytesMut, r: &RangeSet) {
    let ranges = &r.ranges()[..r.ranges().len().min(RANGES_MAX)];
    out.put_u32_le(ranges.len() as u32);
    for x in ranges {
        out.put_u64_le(x.start);
        out.put_u64_le(x.end);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(FrameError::Field { field: "frame", reason: "ends early" })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn str8(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u8()?);
        let b = self.take(len)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| FrameError::Field { field, reason: "not UTF-8" })
    }

    fn stream_name(&mut self) -> Result<String, FrameError> {
        let s = self.str8("stream")?;
        if !is_valid_stream_name(&s) {
            return Err(FrameError::Field { field: "stream", reason: "not a valid stream name" });
        }
        Ok(s)
    }

    fn count16(&mut self, field: &'static str, max: usize) -> Result<usize, FrameError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(FrameError::Field { field, reason: "above its bound" });
        }
        Ok(n)
    }

    fn ranges(&mut self) -> Result<RangeSet, FrameError> {
        let n = self.u32()? as usize;
        if n > RANGES_MAX || n.saturating_mul(16) > self.buf.len() - self.pos {
            return Err(FrameError::Field { field: "ranges", reason: "count above its bound or the frame" });
        }
        let mut prev_end = None;
        let mut set = RangeSet::new();
        for _ in 0..n {
            let (start, end) = (self.u64()?, self.u64()?);
            if start >= end || prev_end.is_some_and(|p| start <= p) {
                return Err(FrameError::Field { field: "ranges", reason: "not sorted, disjoint and non-empty" });
            }
            prev_end = Some(end);
            set.insert(start..end);
        }
        Ok(set)
    }
}

#[cfg(test)]
// One-range sets are the point of several assertions here, not a mistaken range literal.
#[allow(clippy::single_range_in_vec_init)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: 1,
                epoch: 0xfeed,
                edge_id: "edge-1".into(),
                streams: vec![StreamOffer { name: "cdr".into(), first_retained: 5, next: 90 }],
            },
            Frame::Welcome {
                node: "core-a".into(),
                incarnation: 7,
                streams: vec![StreamHeld { name: "cdr".into(), held: RangeSet::from_ranges([0..10, 20..30]) }],
            },
            Frame::Open { stream: "sensors".into(), lane: Lane::Backlog },
            Frame::Batch(bytes::Bytes::from_static(b"BHB1...")),
            Frame::Ack { start: 10, end: 20, marks: marks::DURABLE },
            Frame::Tiered { stream: "cdr".into(), ranges: RangeSet::from_ranges([0..5]) },
            Frame::Dict { id: 3, bytes: bytes::Bytes::from_static(b"dict") },
            Frame::Error { code: ErrorCode::SeqConflict, message: "overlap".into() },
        ]
    }

    #[test]
    fn frames_round_trip_and_prefixes_are_incomplete() {
        for f in samples() {
            let mut out = BytesMut::new();
            f.encode(&mut out);
            assert_eq!(Frame::decode(&out).unwrap(), Some((f.clone(), out.len())));
            for cut in 0..out.len() {
                assert_eq!(Frame::decode(&out[..cut]).unwrap(), None, "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocation() {
        let mut huge = BytesMut::new();
        huge.put_u32_le(u32::MAX);
        assert_eq!(Frame::decode(&huge), Err(FrameError::Length(u32::MAX as usize)));
        // A WELCOME claiming 2^32-1 ranges in a tiny frame.
        let mut w = BytesMut::new();
        w.put_u32_le(0);
        w.put_u8(2);
        put_str8(&mut w, "n");
        w.put_u64_le(0);
        w.put_u16_le(1);
        put_str8(&mut w, "cdr");
        w.put_u32_le(u32::MAX);
        let len = (w.len() - 4) as u32;
        w[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(Frame::decode(&w), Err(FrameError::Field { field: "ranges", .. })));
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            crate::fuzzing::frame_decode(&bytes);
        }
    }
}
