//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same property
//! checks the fuzz targets run, so that every seed and every input the fuzzer once found
//! interesting stays a regression test of `cargo test`.

// The corpus lives on disk; reading it is the point of this test, not core code doing I/O.
#![allow(clippy::disallowed_methods)]

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use arbitrary::Unstructured;
use tscf_core::fuzzing;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    assert!(!files.is_empty(), "{} holds no seeds", dir.display());
    // A stable order, so that a failure names the same file every run.
    files.sort();
    files
}

/// Runs `property` over every input of `target`'s corpus, naming the input that fails.
fn replay(target: &str, property: impl Fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        // The panic is re-raised at once, so no broken state is observed after it.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| property(&bytes)));
        if let Err(panic) = outcome {
            eprintln!("property of {target} failed on {}", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn control_message_corpus() {
    replay("control_message", fuzzing::control_message);
}

#[test]
fn stream_deframer_corpus() {
    replay("stream_deframer", fuzzing::stream_deframer);
}

#[test]
fn stun_corpus() {
    replay("stun", fuzzing::stun);
}

#[test]
fn structured_message_corpus() {
    replay("structured_message", |bytes| {
        // Running out of input is how the builder stops, not a failure.
        let _ = fuzzing::structured_message(&mut Unstructured::new(bytes));
    });
}

#[test]
fn director_corpus() {
    replay("director", |bytes| {
        let _ = fuzzing::director(&mut Unstructured::new(bytes));
    });
}

#[test]
fn cluster_director_corpus() {
    replay("cluster_director", |bytes| {
        let _ = fuzzing::cluster_director(&mut Unstructured::new(bytes));
    });
}

#[test]
fn client_corpus() {
    replay("client", |data| {
        let _ = fuzzing::client(&mut Unstructured::new(data));
    });
}
