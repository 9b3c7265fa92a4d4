//! Forwarding to core-ingest over QUIC (DESIGN §4): [`driver`] runs the connection around the
//! pure `shared::wire::session::ForwardSession`; [`cursors`] keeps what each core acknowledged
//! in SQLite; [`bucket`] is the bandwidth cap; [`pick`] chooses the core node.

pub mod bucket;
pub mod cursors;
pub mod driver;
pub mod pick;
