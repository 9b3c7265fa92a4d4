//! The thin quinn shell both ends share (feature `quic`): frames over QUIC streams, and the
//! transport settings (keep-alive, idle timeout, congestion control). Everything it decides
//! is in `wire`; this only moves bytes.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};

use crate::wire::session::Refusal;
use crate::wire::{ErrorCode, Frame, FrameParts, Parted};

/// Congestion control, a setting (DESIGN §4): Cubic by default, BBR where the link is lossy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// quinn's Cubic.
    Cubic,
    /// quinn's experimental BBR.
    Bbr,
}

/// QUIC packet sizes, in UDP payload bytes (the link MTU less 48 bytes of IPv6 and UDP
/// headers, or 28 for IPv4): `min` is what the path is known to carry — packets start there
/// and a suspected black hole never takes them below it — and path MTU discovery probes up
/// to `max`. Bigger packets mean fewer of them per GB: on a jumbo-frame link or loopback the
/// per-packet work of both ends shrinks several times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mtu {
    /// Known-good size (≥ [`Mtu::FLOOR`]).
    pub min: u16,
    /// Discovery's upper bound (≤ [`Mtu::CEILING`]).
    pub max: u16,
}

impl Mtu {
    /// QUIC's own floor: every path must carry 1200-byte datagrams.
    pub const FLOOR: u16 = 1200;
    /// The highest `max` allowed: a 9000-byte jumbo frame less IPv4 and UDP headers.
    pub const CEILING: u16 = 8972;
    /// The defaults: start at QUIC's floor, discover up to a 1500-byte Ethernet MTU over IPv6.
    pub const DEFAULT: Mtu = Mtu { min: 1200, max: 1452 };

    /// Default `mtu_min` of a config (for `#[serde(default = …)]`).
    pub fn default_min() -> u16 {
        Mtu::DEFAULT.min
    }

    /// Default `mtu_max` of a config.
    pub fn default_max() -> u16 {
        Mtu::DEFAULT.max
    }

    /// The config problem, if any, as (key, why): keys `{prefix}mtu_min` / `{prefix}mtu_max`,
    /// the one out of range named (`mtu_min` when they are in the wrong order).
    pub fn problem(self, prefix: &str) -> Option<(String, String)> {
        let why = self.check().err()?;
        let key = if self.max > Mtu::CEILING { "mtu_max" } else { "mtu_min" };
        Some((format!("{prefix}{key}"), why))
    }

    /// Why `self` is not a usable setting, if it is not.
    pub fn check(self) -> Result<(), String> {
        if self.min < Mtu::FLOOR || self.max > Mtu::CEILING || self.min > self.max {
            return Err(format!(
                "mtu_min {} and mtu_max {} must satisfy {} <= mtu_min <= mtu_max <= {}",
                self.min,
                self.max,
                Mtu::FLOOR,
                Mtu::CEILING
            ));
        }
        Ok(())
    }

    /// Packets one GSO send may carry at this `max`: the kernel refuses a send over 64 KiB with
    /// EMSGSIZE, which quinn-udp takes for a lost MTU probe and drops in silence (quinn's own
    /// batches of 10 × 8952 bytes lost 36% of packets on loopback), so the batch shrinks as
    /// the packets grow.
    pub fn gso_segments(self) -> usize {
        (GSO_BYTES_MAX / usize::from(self.max.max(Mtu::FLOOR))).max(1)
    }

    /// The endpoint settings that let peers send packets up to `max`.
    pub fn endpoint_config(self) -> quinn::EndpointConfig {
        let mut e = quinn::EndpointConfig::default();
        // In range by `check` (1200..=65527 is quinn's own bound).
        let _ = e.max_udp_payload_size(self.max.max(Mtu::FLOOR));
        e
    }
}

impl Default for Mtu {
    fn default() -> Self {
        Mtu::DEFAULT
    }
}

/// Most bytes one GSO send may carry: 64 KiB less the IPv4 and UDP headers.
const GSO_BYTES_MAX: usize = 65_535 - 28;

/// A quinn endpoint on `socket` (a server when `server` is given) whose packets may grow to
/// `mtu.max`, its GSO sends capped at [`Mtu::gso_segments`].
pub fn endpoint(socket: UdpSocket, mtu: Mtu, server: Option<quinn::ServerConfig>) -> io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for quinn"))?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(GsoCapped { inner, segments: mtu.gso_segments() });
    quinn::Endpoint::new_with_abstract_socket(mtu.endpoint_config(), server, socket, runtime)
}

/// A client endpoint bound to `addr` (port 0: any), packets up to `mtu.max`.
pub fn client_endpoint(addr: SocketAddr, mtu: Mtu) -> io::Result<quinn::Endpoint> {
    endpoint(UdpSocket::bind(addr)?, mtu, None)
}

/// quinn's own socket, reporting at most `segments` packets per send.
struct GsoCapped {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    segments: usize,
}

impl fmt::Debug for GsoCapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsoCapped").field("inner", &self.inner).field("segments", &self.segments).finish()
    }
}

impl quinn::AsyncUdpSocket for GsoCapped {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Transport settings for either end.
pub fn transport(
    keep_alive: Duration,
    idle_timeout: Duration,
    congestion: Congestion,
    max_bidi_streams: u32,
    mtu: Mtu,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(mtu.max);
    t.mtu_discovery_config(Some(discovery));
    t.initial_mtu(mtu.min);
    t.min_mtu(mtu.min);
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

/// Chunks `read_parted` takes from quinn at a time.
const READ_CHUNKS: usize = 16;

/// Reads the next frame, a BATCH frame's body in the pieces it arrived in (not joined);
/// `Ok(None)` at a clean end of stream. `parts` carries bytes between calls.
pub async fn read_parted(recv: &mut RecvStream, parts: &mut FrameParts) -> Result<Option<Parted>, Refusal> {
    loop {
        match parts.take_frame() {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => return Err(Refusal { code: e.code(), message: e.to_string() }),
        }
        // Several chunks per call: one lock of the connection for all of them.
        let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(n)) => chunks.into_iter().take(n).for_each(|c| parts.push(c)),
            Ok(None) if parts.is_empty() => return Ok(None),
            Ok(None) => {
                return Err(Refusal { code: ErrorCode::Protocol, message: "stream ended inside a frame".into() });
            }
            Err(e) => return Err(Refusal { code: ErrorCode::NoError, message: e.to_string() }),
        }
    }
}

/// Reads one frame (a batch's pieces joined); `Ok(None)` at a clean end of stream.
pub async fn read_frame(recv: &mut RecvStream, parts: &mut FrameParts) -> Result<Option<Frame>, Refusal> {
    Ok(read_parted(recv, parts).await?.map(Parted::into_frame))
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), Refusal> {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    send.write_all(&out).await.map_err(|e| Refusal { code: ErrorCode::NoError, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_sizes_stay_between_quics_floor_and_the_gso_safe_ceiling() {
        assert_eq!(Mtu::default().check(), Ok(()));
        assert_eq!(Mtu { min: 8972, max: 8972 }.check(), Ok(()));
        for bad in [Mtu { min: 1199, max: 1452 }, Mtu { min: 1200, max: 8973 }, Mtu { min: 1452, max: 1400 }] {
            let why = bad.check().unwrap_err();
            assert!(why.contains(&bad.min.to_string()) && why.contains("8972"), "{why}");
        }
        // One GSO send of the largest packets stays within 64 KiB less IPv4 and UDP headers.
        for max in [1200, 1452, 6500, 6501, 8952, Mtu::CEILING] {
            let segments = Mtu { min: 1200, max }.gso_segments();
            assert!(segments >= 1 && segments * usize::from(max) <= 65_535 - 28, "{max}: {segments}");
            assert!((segments + 1) * usize::from(max) > 65_535 - 28, "{max}: {segments} is not the most");
        }
        // quinn accepts the ceiling as a peer's largest packet.
        let _ = Mtu { min: 1200, max: Mtu::CEILING }.endpoint_config();
    }
}
