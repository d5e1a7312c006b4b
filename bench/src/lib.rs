//! Library half of `forkd-bench`: the perf-regression check's statistics and
//! decision rule, kept free of measuring so they are tested on fixed inputs
//! and recorded files (`bench/testdata/`).

pub mod perfcheck;
pub mod stats;
