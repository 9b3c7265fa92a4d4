//! Listen mode: the agent is the MQTT endpoint devices publish to (3.1.1 and 5, QoS 0/1/2,
//! TCP and TLS). [`session`] is the pure per-connection state machine and the store of
//! disconnected devices' sessions; [`driver`] runs the listeners and one task per connection
//! around it, with rumqttc's `mqttbytes` as the codec; [`auth`] checks passwords;
//! [`config`] is the `[listen]` section. PUBLISHes reach the writer as subscribe mode's do,
//! and their PUBACK / PUBREC leaves only once the writer says the record is durable.

pub mod auth;
pub mod config;
pub mod driver;
pub mod session;
