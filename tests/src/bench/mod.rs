//! Helpers of the benchmark (`benches/bench.rs`): pure pieces with unit tests, so the numbers the
//! benchmark prints rest on checked arithmetic.
//!
//! - `stats`: percentiles of samples and the plain-text result table.
//! - `fleet`: a synthetic fleet and backlog for the placement benchmark.
//! - `history`: finished job records shaped like real ones, for the history benchmark.
//! - `lines`: the numbered-line log generator (a Python script) and its streaming checker.
//! - `http_load`: an HTTP load generator (pooled keep-alive clients on a runtime of its own).

pub mod fleet;
pub mod history;
pub mod http_load;
pub mod lines;
pub mod stats;
