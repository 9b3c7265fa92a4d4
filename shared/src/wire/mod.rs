//! The edge ↔ core protocol over QUIC (DESIGN §4): [`frame`] is the codec, [`session`] the
//! state machines of both ends. Pure; the quinn drivers live in the binaries.
//!
//! A connection is QUIC with mutual TLS; ALPN names the protocol version (`shared::tls`). The
//! edge opens a control stream (HELLO → WELCOME, later TIERED and DICT) and one data stream per
//! log stream and lane (OPEN, then BATCH frames; the core answers ACK frames after its fsync).

pub mod frame;
pub mod parts;
pub mod session;

pub use frame::{ErrorCode, Frame, FrameError, Lane};
pub use parts::{FrameParts, Parted};
pub use session::{DedupIndex, Delivery, ForwardSession, IngestSession, ProducerKey, StreamSend, Verdict};
