//! Any bytes given to the wire frame decoder: an error, `None`, or a frame that re-encodes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzzing::frame_decode(data));
