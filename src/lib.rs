//! # floodgate
//!
//! ## What this library does
//!
//! floodgate is a rate-limiting reverse proxy. Each request gets a client key
//! (peer address, a trusted `X-Forwarded-For` address, or an API-key header),
//! the key is checked against a GCRA limit such as `10/min`, and the request is
//! either streamed to the upstream web server unchanged or answered
//! `429 Too Many Requests` with `Retry-After` and rate-limit headers. Limiter
//! state lives in memory (governor's keyed GCRA, bounded) or, for several
//! replicas, in Redis.
//!
//! ## Running the binary vs embedding in your own `App`
//!
//! The `floodgate` binary is configured by `FLOODGATE_*` environment variables
//! (see the README and `settings/default.toml`). The same pieces are a library:
//! [`RateLimit`] is an actix-web middleware over any [`Backend`] and any
//! [`KeyExtractor`](key::KeyExtractor), and [`proxy::configure`] adds the
//! streaming forwarder as an `App`'s default service.
//!
//! ```
//! use std::{num::NonZeroU32, sync::Arc};
//! use actix_web::{App, HttpResponse, web};
//! use floodgate::{Limit, MemoryBackend, Rate, RateLimit, key::HeaderKey, key::ClientIp};
//! use floodgate::proxy::{self, Upstream};
//!
//! // Built once, outside `HttpServer::new`, so all workers share the state.
//! let limit = Limit::new("default", "100/min".parse::<Rate>().unwrap(), NonZeroU32::new(20).unwrap());
//! let backend = Arc::new(MemoryBackend::new([&limit], 1_000_000));
//! let per_api_key = RateLimit::new(backend, limit)
//!     .key(HeaderKey::new("x-api-key".parse().unwrap(), ClientIp::new()));
//! let upstream = Upstream::new("http://127.0.0.1:8080").unwrap();
//!
//! // Inside the factory: one forwarder (and connection pool) per worker.
//! let app = App::new()
//!     .route("/health", web::get().to(HttpResponse::Ok)) // served locally
//!     .service(web::scope("/api").wrap(per_api_key.clone()).configure(proxy::configure(upstream.clone())));
//! ```

#![warn(missing_docs)]

pub mod error;
pub mod headers;
pub mod key;
pub mod limiter;
pub mod metrics;
pub mod middleware;
pub mod outage;
pub mod proxy;
pub mod server;
pub mod settings;

/// The README's Rust examples run as doctests, so it cannot show code that
/// does not compile.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use error::ProxyError;
pub use limiter::{
    Backend, BackendError, Decision, Health, Limit, MemoryBackend, Rate, RateKey, RedisBackend,
};
pub use middleware::{FailurePolicy, RateLimit};
pub use server::admin_probe;
