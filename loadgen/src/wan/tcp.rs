//! `loadgen wan --tcp`: the same WAN for TCP peers (a Mosquitto bridge, a NATS leaf node), so
//! they can be judged beside Backhaul's QUIC link under the same outage and delay.
//!
//! A byte stream has no datagrams to lose: TCP would retransmit them. So here an outage is a
//! black hole for open connections — bytes sent during it are held and arrive after it ends,
//! so a peer's own keep-alive decides whether it gives the connection up — and new connections
//! during it are closed at once, so the peer's reconnect policy decides how soon it is back.
//! What a peer loses in an outage is what its own timeouts and queues throw away, which is the
//! point of the comparison. Delay holds every
//! chunk for the one-way delay; the bandwidth cap is shared by all connections of a direction.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::model::Outage;

/// Bytes read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks waiting for their delivery time, per direction of a connection.
const CHUNKS_WAITING_MAX: usize = 1024;

/// What the TCP proxy does to each direction.
#[derive(Clone, Debug, Default)]
pub struct TcpImpairment {
    /// One-way delay of every chunk.
    pub delay: Duration,
    /// Bytes per second per direction, all connections together.
    pub rate: Option<u64>,
    /// Black-hole windows.
    pub outages: Vec<Outage>,
}

impl TcpImpairment {
    /// The end of the outage covering `t`, if any.
    fn outage_end(&self, t: Duration) -> Option<Duration> {
        self.outages.iter().filter(|o| o.covers(t)).map(|o| o.start + o.length).max()
    }
}

/// Counters of the TCP proxy.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpCounts {
    /// Connections accepted.
    pub connections: u64,
    /// Bytes client → upstream.
    pub up_bytes: u64,
    /// Bytes upstream → client.
    pub down_bytes: u64,
    /// Chunks held back by an outage.
    pub held: u64,
    /// Connections closed at once because they came during an outage.
    pub refused: u64,
}

struct Shared {
    imp: Mutex<TcpImpairment>,
    start: Instant,
    /// When each direction's capped link is free again (up, down).
    busy: Mutex<[Duration; 2]>,
    counts: Mutex<TcpCounts>,
}

/// A running TCP proxy; dropping it stops it (open connections end with it).
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpProxy {
    /// Listens on `listen` and relays each connection to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, imp: TcpImpairment) -> anyhow::Result<TcpProxy> {
        if imp.rate == Some(0) {
            anyhow::bail!("rate must be above 0 bytes/s (leave it out for no cap)");
        }
        let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            imp: Mutex::new(imp),
            start: Instant::now(),
            busy: Mutex::new([Duration::ZERO; 2]),
            counts: Mutex::new(TcpCounts::default()),
        });
        let task = tokio::spawn(accept(listener, upstream, shared.clone()));
        Ok(TcpProxy { addr, shared, task })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Schedules a black hole from `at` for `length`.
    pub fn add_outage(&self, at: std::time::Instant, length: Duration) {
        let o = Outage { start: at.saturating_duration_since(self.shared.start.into_std()), length };
        self.shared.imp.lock().unwrap_or_else(PoisonError::into_inner).outages.push(o);
    }

    /// What passed so far.
    pub fn counts(&self) -> TcpCounts {
        *self.shared.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (client, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "wan tcp: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (in_outage, delay) = {
            let imp = shared.imp.lock().unwrap_or_else(PoisonError::into_inner);
            (imp.outage_end(shared.start.elapsed()).is_some(), imp.delay)
        };
        {
            let mut c = shared.counts.lock().unwrap_or_else(PoisonError::into_inner);
            c.connections += 1;
            c.refused += u64::from(in_outage);
        }
        if in_outage {
            // The link is down: the client's reconnect policy decides when it tries again.
            drop(client);
            continue;
        }
        let shared = shared.clone();
        conns.spawn(async move {
            tokio::time::sleep(delay * 2).await;
            let up = match TcpStream::connect(upstream).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(client = %from, error = %e, "wan tcp: upstream refused");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = up.into_split();
            let a = tokio::spawn(pump(cr, uw, shared.clone(), 0));
            let b = tokio::spawn(pump(ur, cw, shared, 1));
            let _ = tokio::join!(a, b);
        });
        // Reap finished connections now and then.
        while conns.try_join_next().is_some() {}
    }
}

/// Reads chunks from `r` and writes each to `w` at its delivery time; direction 0 is up.
async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, shared: Arc<Shared>, dir: usize) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_WAITING_MAX);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = shared.start.elapsed();
        let mut sent = now;
        let (end, rate, delay) = {
            let imp = shared.imp.lock().unwrap_or_else(PoisonError::into_inner);
            (imp.outage_end(now), imp.rate, imp.delay)
        };
        if let Some(end) = end {
            sent = end;
            shared.counts.lock().unwrap_or_else(PoisonError::into_inner).held += 1;
        }
        if let Some(rate) = rate {
            let mut busy = shared.busy.lock().unwrap_or_else(PoisonError::into_inner);
            let start = busy[dir].max(sent);
            busy[dir] = start + Duration::from_secs_f64(n as f64 / rate as f64);
            sent = busy[dir];
        }
        {
            let mut c = shared.counts.lock().unwrap_or_else(PoisonError::into_inner);
            if dir == 0 {
                c.up_bytes += n as u64;
            } else {
                c.down_bytes += n as u64;
            }
        }
        if tx.send((shared.start + sent + delay, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(proxy: SocketAddr, msg: &[u8]) -> (Vec<u8>, Duration) {
        let t = std::time::Instant::now();
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        (back, t.elapsed())
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_after_the_delay() {
        let imp = TcpImpairment { delay: Duration::from_millis(30), ..TcpImpairment::default() };
        let p = TcpProxy::start("127.0.0.1:0".parse().unwrap(), echo().await, imp).await.unwrap();
        let (back, rtt) = round_trip(p.local_addr(), b"hello through the wan").await;
        assert_eq!(back, b"hello through the wan");
        // Connect (2 × delay before the upstream connect) plus one delay each way, at least.
        assert!(rtt >= Duration::from_millis(120), "{rtt:?}");
        let c = p.counts();
        assert_eq!((c.connections, c.up_bytes, c.down_bytes), (1, 21, 21));
    }

    #[tokio::test]
    async fn an_outage_holds_open_connections_bytes_and_closes_new_connections() {
        let p = TcpProxy::start("127.0.0.1:0".parse().unwrap(), echo().await, TcpImpairment::default()).await.unwrap();
        let mut open = TcpStream::connect(p.local_addr()).await.unwrap();
        open.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();
        p.add_outage(std::time::Instant::now(), Duration::from_millis(400));
        let t = std::time::Instant::now();
        let msg: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        open.write_all(&msg).await.unwrap();
        // A connection opened during the outage is closed at once.
        let mut refused = TcpStream::connect(p.local_addr()).await.unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(refused.read(&mut buf).await, Ok(0) | Err(_)));
        let mut back = vec![0u8; msg.len()];
        open.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg, "held, not lost");
        assert!(t.elapsed() >= Duration::from_millis(350), "{:?}", t.elapsed());
        let c = p.counts();
        assert_eq!((c.connections, c.refused), (2, 1));
        assert!(c.held > 0);
    }

    #[tokio::test]
    async fn the_rate_cap_spaces_the_bytes() {
        let imp = TcpImpairment { rate: Some(1_000_000), ..TcpImpairment::default() };
        let p = TcpProxy::start("127.0.0.1:0".parse().unwrap(), echo().await, imp).await.unwrap();
        let msg = vec![7u8; 300_000];
        let (back, rtt) = round_trip(p.local_addr(), &msg).await;
        assert_eq!(back.len(), msg.len());
        // 300 kB at 1 MB/s each way, the two directions overlapping: at least 0.3 s.
        assert!(rtt >= Duration::from_millis(290), "{rtt:?}");
    }
}
