//! Fuzz target: the properties of [`tscf_core::fuzzing::stream_deframer`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tscf_core::fuzzing::stream_deframer(data));
