//! Fuzz target `client_message`: the input format and the checks are documented at
//! `herald_fuzz::client_message` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::client_message(data));
