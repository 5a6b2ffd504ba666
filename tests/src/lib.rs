//! Shared helpers for the tscf integration tests live here; the tests themselves are in `tests/`.
