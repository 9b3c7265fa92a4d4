//! Backhaul's shared core: what edge and core both need, with no tokio and no sockets.
//!
//! - [`identity`]: a data directory's random id (edge epoch, core incarnation).
//! - `admin` (feature `admin`): the admin HTTP endpoint both binaries serve.
//! - `reload` (feature `admin`): when to reload certificates (SIGHUP, or the files changed).
//! - `systemd` (feature `admin`): `sd_notify` (READY, WATCHDOG from the main loop's progress,
//!   STOPPING) for `Type=notify` units.
//! - [`ids`]: newtypes for offsets, seqs and epochs.
//! - [`batch`]: the record model and the batch codec — the one format from edge disk through
//!   the wire to the bucket.
//! - [`log`]: the segmented, crash-safe log of batches, over a storage seam
//!   ([`log::storage`]) with a power-loss simulator ([`log::sim`]).
//! - [`fuzzing`]: bodies of the fuzz targets, also run by proptest in CI.
//! - [`ndjson`]: the NDJSON record view that `log dump` and the read API print.
//! - [`synth`]: seeded generators of realistic CDRs and sensor readings, for benches and loadgen.
//! - [`tls`]: mutual TLS for the edge → core link: rustls configs (ring, TLS 1.3), the edge id
//!   from a client certificate, ALPN versions, and the private CA that issues certificates.
//! - [`config`]: strict TOML config files and errors that name the key.
//! - [`units`]: byte sizes and durations as config values.
//! - [`ranges`]: sets of seq ranges (what a core holds, what an edge had acknowledged).
//! - `quic` (feature `quic`): frames over quinn streams and transport settings, for both ends.
//! - [`wire`]: the edge ↔ core protocol: frames and session state machines.

#[cfg(feature = "admin")]
pub mod admin;
pub mod batch;
pub mod config;
pub mod fuzzing;
pub mod identity;
pub mod ids;
pub mod log;
pub mod ndjson;
#[cfg(feature = "quic")]
pub mod quic;
pub mod ranges;
#[cfg(feature = "admin")]
pub mod reload;
pub mod synth;
#[cfg(feature = "admin")]
pub mod systemd;
pub mod tls;
pub mod units;
pub mod wire;
