//! Tests of `bank` (demo): being written.
