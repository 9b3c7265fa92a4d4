//! Backhaul's shared core: what edge and core both need, with no tokio and no sockets.
//!
//! - [`ids`]: newtypes for offsets, seqs and epochs.
//! - [`batch`]: the record model and the batch codec — the one format from edge disk through
//!   the wire to the bucket.
//! - [`log`]: the segmented, crash-safe log of batches, over a storage seam
//!   ([`log::storage`]) with a power-loss simulator ([`log::sim`]).
//! - [`fuzzing`]: bodies of the fuzz targets, also run by proptest in CI.
//! - [`ndjson`]: the NDJSON record view that `log dump` and the read API print.
//! - [`synth`]: seeded generators of realistic CDRs and sensor readings, for benches and loadgen.
//! - [`units`]: byte sizes and durations as config values.

pub mod batch;
pub mod fuzzing;
pub mod ids;
pub mod log;
pub mod ndjson;
pub mod synth;
pub mod units;
