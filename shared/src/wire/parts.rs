//! Frames taken out of a stream's chunks as they arrive, without joining a batch's bytes.
//!
//! A QUIC stream arrives as chunks, one per STREAM frame received (about a packet each). A BATCH
//! frame's body comes out as the pieces of those chunks that carry it: the core's log copies
//! them once, straight into its write buffer, instead of a join here and a copy there. Other
//! frames are small and are joined and decoded as [`Frame::decode`] does.
//!
//! A piece shares the whole receive buffer it came from (quinn copies each batch of received
//! datagrams into one allocation of up to 64 KiB). So that a peer sending tiny pieces cannot
//! pin a receive buffer per byte, at most `pieces_max` pieces are held as they came: past that,
//! what arrives is copied into a buffer of our own until everything held has been taken.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::frame::{Frame, FrameError};

/// The type byte of a BATCH frame.
const BATCH_TYPE: u8 = 4;

/// Default of [`FrameParts::new`]'s bound: a 256 KiB batch in 1452-byte packets (about 185
/// pieces) stays in pieces; at most 16 MiB of receive buffers pinned per stream.
pub const PIECES_MAX: usize = 256;

/// What [`FrameParts::take_frame`] takes out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parted {
    /// A BATCH frame's body, as the pieces that carried it, in order (not joined).
    Batch(Vec<Bytes>),
    /// Any other frame.
    Frame(Frame),
}

impl Parted {
    /// The frame, a batch's pieces joined.
    pub fn into_frame(self) -> Frame {
        match self {
            Parted::Batch(pieces) => Frame::Batch(join(pieces)),
            Parted::Frame(f) => f,
        }
    }
}

/// A stream's bytes not yet taken as frames, as the chunks they came in.
#[derive(Debug)]
pub struct FrameParts {
    /// Received, not yet taken; the front one may be partly taken already.
    chunks: VecDeque<Bytes>,
    /// Received after `chunks` once they were `pieces_max`, copied.
    spill: BytesMut,
    /// Bytes in `chunks` and `spill`.
    len: usize,
    /// Most chunks held before they are copied into one.
    pieces_max: usize,
}

impl Default for FrameParts {
    fn default() -> Self {
        FrameParts::new(PIECES_MAX)
    }
}

impl FrameParts {
    /// Holds at most `pieces_max` chunks as they came (at least 2).
    pub fn new(pieces_max: usize) -> FrameParts {
        FrameParts { chunks: VecDeque::new(), spill: BytesMut::new(), len: 0, pieces_max: pieces_max.max(2) }
    }

    /// Bytes received and not yet taken.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pieces held: chunks as they came, and the copied ones as one.
    pub fn pieces(&self) -> usize {
        self.chunks.len() + usize::from(!self.spill.is_empty())
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        if self.spill.is_empty() && self.chunks.len() < self.pieces_max {
            self.chunks.push_back(chunk);
        } else {
            self.spill.extend_from_slice(&chunk);
        }
    }

    /// Takes the next whole frame; `Ok(None)` while only part of it is here. An error (a
    /// length out of bounds, a frame that does not decode) leaves the stream unusable.
    pub fn take_frame(&mut self) -> Result<Option<Parted>, FrameError> {
        let mut head = [0u8; 5];
        let have = self.peek(&mut head);
        let Some(n) = Frame::wire_len(&head[..have])? else { return Ok(None) };
        if self.len < n {
            return Ok(None);
        }
        // A whole frame is at least 5 bytes (length and type), so `head` is full.
        let mut pieces = self.take(n);
        if head[4] == BATCH_TYPE {
            skip(&mut pieces, 5);
            return Ok(Some(Parted::Batch(pieces)));
        }
        match Frame::decode_shared(&join(pieces))? {
            Some(frame) => Ok(Some(Parted::Frame(frame))),
            None => unreachable!("a whole frame decodes or fails"),
        }
    }

    /// Copies the first bytes held into `out`; returns how many.
    fn peek(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for c in self.chunks.iter().map(|c| &c[..]).chain([&self.spill[..]]) {
            let k = c.len().min(out.len() - n);
            out[n..n + k].copy_from_slice(&c[..k]);
            n += k;
            if n == out.len() {
                break;
            }
        }
        n
    }

    /// Takes the first `n` bytes held (`n <= len`) as pieces.
    fn take(&mut self, mut n: usize) -> Vec<Bytes> {
        self.len -= n;
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                out.push(self.spill.split_to(n).freeze());
                break;
            };
            if front.len() <= n {
                n -= front.len();
                out.push(self.chunks.pop_front().expect("front exists"));
            } else {
                out.push(front.split_to(n));
                n = 0;
            }
        }
        out
    }
}

/// Drops the first `n` bytes of `pieces` (they hold at least `n`).
fn skip(pieces: &mut Vec<Bytes>, mut n: usize) {
    while n > 0 {
        if pieces[0].len() <= n {
            n -= pieces.remove(0).len();
        } else {
            pieces[0] = pieces[0].slice(n..);
            n = 0;
        }
    }
}

/// The pieces as one `Bytes` (no copy when there is one piece).
pub fn join(mut pieces: Vec<Bytes>) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop().expect("one piece"),
        _ => {
            let mut out = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
            pieces.iter().for_each(|p| out.extend_from_slice(p));
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::tests::samples;
    use proptest::prelude::*;

    fn wire_of(frames: &[Frame]) -> Bytes {
        let mut wire = BytesMut::new();
        frames.iter().for_each(|f| f.encode(&mut wire));
        wire.freeze()
    }

    /// Feeds `wire` cut at `cuts` and takes every frame as soon as it is whole.
    fn feed(wire: &Bytes, cuts: &[usize], pieces_max: usize) -> (Vec<Parted>, FrameParts) {
        let mut parts = FrameParts::new(pieces_max);
        let mut got = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&wire.len()]) {
            let cut = cut.clamp(at, wire.len());
            parts.push(wire.slice(at..cut));
            at = cut;
            while let Some(p) = parts.take_frame().unwrap() {
                got.push(p);
            }
            assert!(parts.pieces() <= pieces_max.max(2) + 1);
        }
        (got, parts)
    }

    #[test]
    fn frames_come_out_whole_from_any_cut_and_batches_stay_in_pieces() {
        let frames = samples();
        let wire = wire_of(&frames);
        // A byte at a time: every frame once, and nothing left over.
        let cuts: Vec<usize> = (1..wire.len()).collect();
        let (got, rest) = feed(&wire, &cuts, 1 << 20);
        assert!(rest.is_empty());
        assert_eq!(got.into_iter().map(Parted::into_frame).collect::<Vec<_>>(), frames);

        // A batch body across three chunks comes out as views of them, not a copy.
        let body = Bytes::from(vec![7u8; 3000]);
        let wire = wire_of(&[Frame::Batch(body.clone())]);
        let (got, _) = feed(&wire, &[1000, 2000], 16);
        let [Parted::Batch(pieces)] = &got[..] else { panic!("one batch: {got:?}") };
        assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), [995, 1000, 1005]);
        assert_eq!(pieces[1].as_ptr(), wire[1000..].as_ptr(), "shared with the chunk");
        assert_eq!(join(pieces.clone()), body);
    }

    #[test]
    fn tiny_chunks_are_copied_together_past_the_bound() {
        let body = Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<_>>());
        let wire = wire_of(&[Frame::Batch(body.clone())]);
        let cuts: Vec<usize> = (1..wire.len()).collect();
        let (got, _) = feed(&wire, &cuts, 8);
        let [Parted::Batch(pieces)] = &got[..] else { panic!("one batch") };
        assert!(pieces.len() <= 9, "{} pieces held", pieces.len());
        assert_eq!(join(pieces.clone()), body);
    }

    #[test]
    fn bad_lengths_and_frames_are_errors() {
        let mut parts = FrameParts::default();
        parts.push(Bytes::from_static(&[0, 0]));
        assert_eq!(parts.take_frame(), Ok(None), "no length yet");
        parts.push(Bytes::from_static(&[0, 0, 4]));
        assert_eq!(parts.take_frame(), Err(FrameError::Length(0)));

        let mut parts = FrameParts::default();
        parts.push(Bytes::from(u32::MAX.to_le_bytes().to_vec()));
        assert_eq!(parts.take_frame(), Err(FrameError::Length(u32::MAX as usize)), "refused before it is all here");

        let mut parts = FrameParts::default();
        parts.push(Bytes::from_static(&[1, 0, 0, 0, 99]));
        assert_eq!(parts.take_frame(), Err(FrameError::Type(99)));
    }

    proptest! {
        #[test]
        fn any_cutting_gives_the_frames_decode_gives(
            cuts in proptest::collection::vec(0usize..200, 0..40),
            pieces_max in 2usize..8,
        ) {
            let frames = samples();
            let wire = wire_of(&frames);
            let mut cuts = cuts;
            cuts.sort();
            let (got, rest) = feed(&wire, &cuts, pieces_max);
            prop_assert!(rest.is_empty());
            prop_assert_eq!(got.into_iter().map(Parted::into_frame).collect::<Vec<_>>(), frames);
        }
    }
}
