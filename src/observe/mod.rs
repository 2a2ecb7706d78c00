//! What floodgate shows of what it decides: metrics (`/metrics` on the
//! admin listener) and, later, the access log.
//!
//! Every part that records is handed its [`Metrics`] at construction; none
//! is global.

pub mod metrics;

pub use metrics::Metrics;
