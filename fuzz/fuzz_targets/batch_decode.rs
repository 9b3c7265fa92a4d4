//! Any bytes given to the batch decoder: an error or a consistent batch, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzzing::batch_decode(data));
