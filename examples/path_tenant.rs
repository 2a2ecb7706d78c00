//! A custom key extractor: the tenant named in the path.
//!
//! `/t/<tenant>/…` is limited per tenant (3 per minute each) and forwarded
//! to the upstream with its path unchanged; every other path is answered
//! here, never limited. Try it with the demo upstream:
//!
//! ```sh
//! cargo run --example demo_upstream &
//! cargo run --example path_tenant
//! curl -i localhost:8002/t/acme/orders      # the 4th within a minute is a 429
//! curl -i localhost:8002/t/globex/orders    # a budget of its own
//! ```
//!
//! The tenant comes from actix-web's router (`match_info`), which has already
//! percent-decoded the segment, so `/t/%61cme/` is the same tenant as
//! `/t/acme/` and a client cannot get a fresh budget by spelling the path
//! differently. The tenant is whatever the client writes in the path: this
//! limits tenants that behave, and pairs with authentication at the upstream
//! (a client naming another tenant spends that tenant's budget).
//! `tests/path_tenant.rs` runs this file's [`PathTenant`] and [`routes`].

use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::{App, HttpResponse, HttpServer, web};
use floodgate::key::{ClientIp, KeyError, KeyExtractor};
use floodgate::proxy::{self, Upstream};
use floodgate::{Limit, MemoryBackend, Rate, RateKey, RateLimit};

/// The scope whose second segment names the tenant.
pub const TENANT_SCOPE: &str = "/t/{tenant}";

/// Counts requests per tenant, the `{tenant}` segment of [`TENANT_SCOPE`];
/// a request the scope did not match (no tenant) is counted by address.
pub struct PathTenant {
    pub fallback: ClientIp,
}

impl KeyExtractor for PathTenant {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        match req.match_info().get("tenant") {
            Some(tenant) if !tenant.is_empty() => Ok(RateKey::bytes(format!("tenant:{tenant}"))),
            _ => self.fallback.extract(req),
        }
    }
}

/// The application's routes: `/t/<tenant>/…` limited by `per_tenant` and
/// forwarded to `upstream`; `/status` served here.
pub fn routes(per_tenant: RateLimit, upstream: Upstream) -> impl Fn(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.route(
            "/status",
            web::get().to(|| async { HttpResponse::Ok().body("fine\n") }),
        )
        .service(
            web::scope(TENANT_SCOPE)
                .wrap(per_tenant.clone())
                .configure(proxy::configure(upstream.clone())),
        );
    }
}

/// Three requests at once per tenant, then one every 20 s.
pub fn per_tenant_limit() -> RateLimit {
    let three = NonZeroU32::new(3).expect("3 is not zero");
    let limit = Limit::new("tenant", Rate::per_minute(three), three);
    // Built once, outside the server's factory, so every worker shares it.
    let backend = Arc::new(MemoryBackend::new(100_000));
    RateLimit::new(backend, limit).key(PathTenant {
        fallback: ClientIp::new(),
    })
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let upstream = Upstream::new(
        &std::env::var("UPSTREAM").unwrap_or_else(|_| "http://127.0.0.1:8080".into()),
    )?;
    let per_tenant = per_tenant_limit();
    log::info!(
        "per-tenant limits on http://127.0.0.1:8002/t/<tenant>/ (→ {})",
        upstream.url()
    );
    HttpServer::new(move || App::new().configure(routes(per_tenant.clone(), upstream.clone())))
        .bind("127.0.0.1:8002")?
        .run()
        .await?;
    Ok(())
}
