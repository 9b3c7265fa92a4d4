//! `loadgen`: Backhaul's capacity-test driver. Each scenario starts what it needs (broker,
//! agent) on ephemeral ports in a temp dir, drives it, prints its figures and stops everything
//! by PID.
//!
//! - [`bench`](mod@bench): `loadgen bench SCENARIO`, the named scenarios with their reports.
//! - [`mqtt_ingest`]: `loadgen mqtt-ingest`, edge-agent subscribe mode against Mosquitto's own
//!   publish → subscriber rate.
//! - [`listen_ingest`]: `loadgen listen-ingest`, devices publishing straight to edge-agent's
//!   listen mode (100 and 1,000 connections) beside Mosquitto's publish → subscriber rate;
//!   PUBACK latency at half the agent's rate; the agent's idle RSS.
//! - [`mosquitto`]: a private Mosquitto with the settings of `deploy/mosquitto/backhaul.conf`.
//! - [`agent`]: the `edge-agent` process, its config and its admin endpoint.
//! - [`mqtt`]: rumqttc publishers and subscriber that count what the broker delivers and acks.
//! - [`payload`]: the message set, seeded realistic CDR JSON from `shared::synth`.
//! - [`prom`]: the few Prometheus text-format series the scenarios read, and quantiles.
//! - [`progress`]: the progress bar (or a plain line every 5 s) of every run.
//! - [`process`]: child processes killed by PID on drop, CPU seconds from `/proc`.
//! - [`report`]: the table printed at the end.
//! - [`core_ingest`]: `loadgen core-ingest`, many simulated edges into one core node over QUIC:
//!   durable MB/s and batches/s, group commits, the core's CPU per GB, beside the disk's own rate.
//! - [`e2e_latency`]: `loadgen e2e-latency`, paced MQTT publishers → Mosquitto → edge-agent →
//!   QUIC → core-ingest: publish-to-durable latency at a target rate.
//! - [`core_node`]: the `core-ingest` process, its config and metrics, and the scenario's private CA.
//! - [`quic_edge`]: simulated edges speaking the wire protocol with pre-encoded batches, or
//!   sending the same bytes to a bare quinn receiver.
//! - [`quic_sink`]: `loadgen quic-sink` (hidden), that bare quinn receiver: the peer of
//!   `core-ingest` for CPU per GB over QUIC.
//! - [`forwarding_agent`]: an `edge-agent` process that forwards to a core.
//! - [`paced`]: QoS 1 publishers paced by a token schedule.
//! - [`disk_peer`]: the disk's own append + `sync_data` rate for the same bytes.
//! - [`devices`]: `loadgen mqtt`, many device connections publishing traceable messages to a
//!   broker or the agent's listener, with a manifest for `loadgen verify`.
//! - [`nats_peer`]: the NATS leaf node + JetStream peer of `outage` (stream sourcing as
//!   store-and-forward).
//! - [`outage`]: `loadgen outage`, a WAN outage and the backfill, Backhaul beside a Mosquitto
//!   bridge fed the same traffic, both verified message by message.
//! - [`quickstart`]: `loadgen quickstart`, the README's one command: core and agent (listen
//!   mode), devices for 30 s, everything read back and verified.
//! - [`trace`]: traceable device payloads (CDRs, SenML) carrying an id and a send time.
//! - [`verify`]: `loadgen verify`, every acknowledged message found exactly once.
//! - [`wan`]: `loadgen wan`, a UDP impairment proxy (loss, delay, jitter, reordering,
//!   duplication, bandwidth cap, scheduled outages) to put between an edge and its core.

pub mod agent;
pub mod bench;
pub mod bench_report;
pub mod core_ingest;
pub mod core_node;
pub mod devices;
pub mod disk_peer;
pub mod e2e_latency;
pub mod forwarding_agent;
pub mod listen_ingest;
pub mod mosquitto;
pub mod mqtt;
pub mod mqtt_ingest;
pub mod nats_peer;
pub mod outage;
pub mod paced;
pub mod payload;
pub mod process;
pub mod progress;
pub mod prom;
pub mod quic_edge;
pub mod quic_sink;
pub mod quickstart;
pub mod report;
pub mod trace;
pub mod verify;
pub mod wan;
