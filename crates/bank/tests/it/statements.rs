//! Tests of `bank` (statements): being written.
