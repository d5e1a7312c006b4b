//! forkd benchmarks (see issue: warm pool and the bench crate).
