//! Fuzz target: the properties of [`tscf_core::fuzzing::structured_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Running out of input is how the builder stops, not a finding.
    let _ = tscf_core::fuzzing::structured_message(
        &mut libfuzzer_sys::arbitrary::Unstructured::new(data),
    );
});
