//! The thin quinn shell both ends share (feature `quic`): frames over QUIC streams, and the
//! transport settings (keep-alive, idle timeout, congestion control). Everything it decides
//! is in `wire`; this only moves bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use quinn::{RecvStream, SendStream};

use crate::wire::session::Refusal;
use crate::wire::{ErrorCode, Frame};

/// Congestion control, a setting (DESIGN §4): Cubic by default, BBR where the link is lossy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// quinn's Cubic.
    Cubic,
    /// quinn's experimental BBR.
    Bbr,
}

/// Transport settings for either end.
pub fn transport(
    keep_alive: Duration,
    idle_timeout: Duration,
    congestion: Congestion,
    max_bidi_streams: u32,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle_timeout).unwrap_or(quinn::VarInt::MAX.into())));
    t.max_concurrent_bidi_streams(quinn::VarInt::from(max_bidi_streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from(0u32));
    match congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    Arc::new(t)
}

/// Bytes `read_frame` adds to its buffer when it runs out of room.
const READ_BUF_STEP: usize = 64 << 10;

/// Reads one frame; `Ok(None)` at a clean end of stream. `buf` carries bytes between calls.
pub async fn read_frame(recv: &mut RecvStream, buf: &mut BytesMut) -> Result<Option<Frame>, Refusal> {
    loop {
        match Frame::decode(buf) {
            Ok(Some((frame, n))) => {
                buf.advance(n);
                return Ok(Some(frame));
            }
            Ok(None) => {}
            Err(e) => return Err(Refusal { code: e.code(), message: e.to_string() }),
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => {
                // Grow in large steps: whole frames leave `buf` as shared views of its storage
                // (`Frame::decode_from`), so each new allocation serves many frames.
                if buf.capacity() - buf.len() < chunk.bytes.len() {
                    buf.reserve(chunk.bytes.len().max(READ_BUF_STEP));
                }
                buf.extend_from_slice(&chunk.bytes)
            }
            Ok(None) if buf.is_empty() => return Ok(None),
            Ok(None) => {
                return Err(Refusal { code: ErrorCode::Protocol, message: "stream ended inside a frame".into() });
            }
            Err(e) => return Err(Refusal { code: ErrorCode::NoError, message: e.to_string() }),
        }
    }
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), Refusal> {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    send.write_all(&out).await.map_err(|e| Refusal { code: ErrorCode::NoError, message: e.to_string() })
}
