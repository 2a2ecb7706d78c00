//! # floodgate
//!
//! ## What this library does
//!
//! floodgate is a rate-limiting reverse proxy in front of one web server.
//! Each request gets a client key (peer address, a trusted `X-Forwarded-For`
//! address, or an API-key header), the key is checked against the limits of
//! the rule the request matches (GCRA such as `10/min` with a burst by
//! default, or fixed and sliding windows), and the request is either streamed to the
//! upstream (hop-by-hop headers stripped, `X-Forwarded-*` set) or answered
//! `429 Too Many Requests` with `Retry-After` and rate-limit headers. Limiter
//! state lives in memory (governor's GCRA over a bounded key table) or, for
//! several replicas, in Redis, with a policy for when Redis is down.
//!
//! ## Running the binary vs embedding in your own `App`
//!
//! The `floodgate` binary is configured by `FLOODGATE_*` environment variables
//! (see the README and `settings/default.toml`); [`Settings`](settings::Settings)
//! is that configuration as typed values, and [`server`] builds the binary's
//! two listeners from it. The same pieces are a library (the crates.io package
//! is `floodgate-proxy`, imported as `floodgate`):
//!
//! * [`RateLimit`] is an actix-web middleware charging each request against a
//!   [`Limit`], over any [`Backend`] (where state lives: [`MemoryBackend`],
//!   [`RedisBackend`] or your own) and any [`KeyExtractor`](key::KeyExtractor)
//!   (who is counted: [`ClientIp`](key::ClientIp),
//!   [`HeaderKey`](key::HeaderKey) or your own).
//! * [`RateLimit::from_rules`] enforces a [`Rules`](policy::Rules) set
//!   instead of one limit: named rules matched by method, normalised path
//!   and host, each with several limits decided all-or-nothing, allow and
//!   deny lists and shadow mode; [`RateLimit::reload`] swaps the set for
//!   every worker at once. Each request's [`Verdict`](verdict::Verdict) is
//!   in its extensions, and every answer the gate makes itself comes from
//!   [`respond`].
//! * [`proxy::configure`] adds the streaming forwarder as the default service
//!   of an `App` or a scope. Call it inside the `HttpServer::new` factory: it
//!   builds one upstream connection pool per worker. [`proxy::Upstream`] holds
//!   the timeouts and the request body cap; wrap [`proxy::MaxBody`] outside
//!   `RateLimit` to refuse an oversize `Content-Length` before it is charged.
//! * Every failure becomes a status code in one place, [`ProxyError`]. An
//!   outage of the upstream or of Redis is logged as transitions and periodic
//!   counts ([`outage`]), never a line per request.
//! * [`observe`] shows what the gate decides: hand the same
//!   [`Metrics`](observe::Metrics) to [`RateLimit::metrics`] and
//!   [`proxy::Upstream::metrics`], and wrap [`Observe`](observe::Observe)
//!   outermost, so every answer is timed and counted (and, with an
//!   [`AccessLog`](observe::AccessLog), logged; the status page's
//!   [`Board`](observe::Board) is fed there too). Keys appear only as
//!   [fingerprints](key::Fingerprinter).
//! * [`admin`] is the admin listener's side: [`admin::configure`] adds
//!   `/healthz`, `/readyz`, `/metrics`, `/rules`, `/limits/{rule}/{key}`
//!   (inspect and reset one client, through [`Backend::inspect`] and
//!   [`Backend::reset`]) and the status page to an `App`, behind the
//!   `FLOODGATE_ADMIN_TOKEN` / loopback guard ([`admin::auth`]).
//!
//! ```
//! use std::{num::NonZeroU32, sync::Arc};
//! use actix_web::{App, HttpResponse, web};
//! use floodgate::{Limit, MemoryBackend, Rate, RateLimit, key::HeaderKey, key::ClientIp};
//! use floodgate::proxy::{self, MaxBody, Upstream};
//!
//! // Built once, outside `HttpServer::new`, so all workers share the state.
//! let max_body = Some(10 << 20); // 10 MiB
//! let limit = Limit::new("default", "100/min".parse::<Rate>().unwrap(), NonZeroU32::new(20).unwrap());
//! let backend = Arc::new(MemoryBackend::new(1_000_000));
//! let per_api_key = RateLimit::new(backend, limit)
//!     .key(HeaderKey::new("x-api-key".parse().unwrap(), ClientIp::new()));
//! let upstream = Upstream::new("http://127.0.0.1:8080").unwrap().max_body(max_body);
//!
//! // Inside the factory: one forwarder (and connection pool) per worker.
//! let app = App::new()
//!     .route("/health", web::get().to(HttpResponse::Ok)) // served locally
//!     .service(
//!         web::scope("/api")
//!             .wrap(per_api_key.clone())
//!             .wrap(MaxBody::new(max_body)) // the last `wrap` runs first
//!             .configure(proxy::configure(upstream.clone())),
//!     );
//! ```
//!
//! floodgate's own build patches actix-http (`patches/actix-http/`,
//! described in its `FLOODGATE-PATCH.md`: a deadline for every request head,
//! not only a connection's first; `100 Continue` only when the body is read;
//! no draining of an unread chunked body when the response closes the
//! connection; strict chunked trailers).
//! Cargo applies `[patch]` only from the top-level workspace, so an
//! application embedding floodgate gets those behaviours only if it applies
//! the same patch.

#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod error;
pub mod headers;
pub mod key;
pub mod limiter;
pub mod middleware;
pub mod observe;
pub mod outage;
pub mod policy;
pub mod proxy;
pub mod respond;
pub mod server;
pub mod settings;
pub mod verdict;

/// The README's Rust examples run as doctests, so it cannot show code that
/// does not compile.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use admin::admin_probe;
pub use error::ProxyError;
pub use limiter::{
    Backend, BackendError, Decision, Health, KeyStateError, Limit, MemoryBackend, Rate, RateKey,
    RedisBackend,
};
pub use middleware::{FailurePolicy, RateLimit};
