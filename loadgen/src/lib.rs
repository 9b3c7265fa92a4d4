//! `loadgen`: Backhaul's capacity-test driver. Each scenario starts what it needs (broker,
//! agent) on ephemeral ports in a temp dir, drives it, prints its figures and stops everything
//! by PID.
//!
//! - [`mqtt_ingest`]: `loadgen mqtt-ingest`, edge-agent subscribe mode against Mosquitto's own
//!   publish → subscriber rate.
//! - [`mosquitto`]: a private Mosquitto with the settings of `deploy/mosquitto/backhaul.conf`.
//! - [`agent`]: the `edge-agent` process, its config and its admin endpoint.
//! - [`mqtt`]: rumqttc publishers and subscriber that count what the broker delivers and acks.
//! - [`payload`]: the message set, seeded realistic CDR JSON from `shared::synth`.
//! - [`prom`]: the few Prometheus text-format series the scenarios read, and quantiles.
//! - [`process`]: child processes killed by PID on drop, CPU seconds from `/proc`.
//! - [`report`]: the table printed at the end.

pub mod agent;
pub mod mosquitto;
pub mod mqtt;
pub mod mqtt_ingest;
pub mod payload;
pub mod process;
pub mod prom;
pub mod report;
