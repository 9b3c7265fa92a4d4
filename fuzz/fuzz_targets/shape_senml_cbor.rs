//! Any bytes given to the shaping decoder for `senml_cbor`: records that re-encode as JSON, or an
//! error (a dead letter), never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::shape::fuzzing::senml_cbor(data));
