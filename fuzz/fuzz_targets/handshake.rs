//! Fuzz target `handshake`: the input format and the checks are documented at
//! `herald_fuzz::handshake` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::handshake(data));
