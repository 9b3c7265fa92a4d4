//! MQTT ingest: [`session`] is the pure ack bookkeeping of one broker connection;
//! [`driver`] runs the rumqttc connection around it.

pub mod driver;
pub mod session;
