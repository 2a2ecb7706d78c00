//! Embedding floodgate in your own actix-web application.
//!
//! Some routes are served by this app itself; everything under `/api` is
//! rate-limited per tenant (a custom key extractor) and forwarded to an
//! upstream. Try it with the demo upstream:
//!
//! ```sh
//! cargo run --example demo_upstream &
//! cargo run --example embed
//! curl -i -H 'X-Tenant: acme' localhost:8001/api/orders   # 5 per minute per tenant
//! curl -i localhost:8001/status                           # served here, never limited
//! ```

use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::{App, HttpResponse, HttpServer, web};
use floodgate::key::{ClientIp, KeyError, KeyExtractor};
use floodgate::proxy::{self, Upstream};
use floodgate::{Limit, MemoryBackend, Rate, RateKey, RateLimit};

/// Counts requests per tenant, named by the `X-Tenant` header; requests
/// without one are counted by client address.
struct Tenant {
    fallback: ClientIp,
}

impl KeyExtractor for Tenant {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        match req.headers().get("x-tenant").and_then(|v| v.to_str().ok()) {
            Some(tenant) if !tenant.is_empty() => Ok(RateKey::bytes(format!("tenant:{tenant}"))),
            _ => self.fallback.extract(req),
        }
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    // Built once, outside the factory, so every worker shares one state.
    let limit = Limit::new(
        "tenant",
        Rate::per_minute(NonZeroU32::new(5).unwrap()),
        NonZeroU32::new(5).unwrap(),
    );
    let backend = Arc::new(MemoryBackend::new(100_000));
    let per_tenant = RateLimit::new(backend, limit).key(Tenant {
        fallback: ClientIp::new(),
    });
    let upstream = Upstream::new(
        &std::env::var("UPSTREAM").unwrap_or_else(|_| "http://127.0.0.1:8080".into()),
    )
    .expect("UPSTREAM is http://host:port");

    println!(
        "embedded floodgate on http://127.0.0.1:8001 (/api → {})",
        upstream.url()
    );
    HttpServer::new(move || {
        App::new()
            .route(
                "/status",
                web::get().to(|| async { HttpResponse::Ok().body("fine\n") }),
            )
            .service(
                web::scope("/api")
                    .wrap(per_tenant.clone())
                    .configure(proxy::configure(upstream.clone())),
            )
    })
    .bind("127.0.0.1:8001")?
    .run()
    .await
}
