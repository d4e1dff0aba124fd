//! Tests of `bank` (accounts): being written.
