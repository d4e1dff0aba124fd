//! Tests of `bank` (e2e): being written.
