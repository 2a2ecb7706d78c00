//! The library seam: the middleware and the forwarder inside someone else's
//! `App`, with their own key extractor (as `examples/embed.rs` does).

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::{App, HttpResponse, test, web};
use floodgate::key::{ClientIp, KeyError, KeyExtractor};
use floodgate::proxy::{self, Upstream};
use floodgate::{Limit, MemoryBackend, Rate, RateKey, RateLimit};

struct Tenant;

impl KeyExtractor for Tenant {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        match req.headers().get("x-tenant") {
            Some(t) => Ok(RateKey::bytes(format!(
                "tenant:{}",
                t.to_str().unwrap_or("?")
            ))),
            None => ClientIp::new().extract(req),
        }
    }
}

#[actix_web::test]
async fn a_scope_of_my_app_is_limited_per_tenant_and_forwarded() {
    let up = support::upstream().route("/api/orders", "orders").run();
    let limit = Limit::new(
        "tenant",
        Rate::per_minute(NonZeroU32::new(2).unwrap()),
        NonZeroU32::new(2).unwrap(),
    );
    let backend = Arc::new(MemoryBackend::new(1000));
    let per_tenant = RateLimit::new(backend, limit).key(Tenant);
    let upstream = Upstream::new(&format!("http://{}", up.addr())).unwrap();
    let app = test::init_service(
        App::new()
            .route(
                "/status",
                web::get().to(|| async { HttpResponse::Ok().body("fine") }),
            )
            .service(
                web::scope("/api")
                    .wrap(per_tenant)
                    .configure(proxy::configure(upstream)),
            ),
    )
    .await;
    let peer = "192.0.2.1:4000".parse().unwrap();
    let call = |path: &'static str, tenant: &'static str| {
        test::TestRequest::get()
            .uri(path)
            .peer_addr(peer)
            .insert_header(("x-tenant", tenant))
            .to_request()
    };

    for _ in 0..2 {
        let res = test::call_service(&app, call("/api/orders", "acme")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(test::read_body(res).await, "orders");
    }
    let res = test::call_service(&app, call("/api/orders", "acme")).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(
        test::call_service(&app, call("/api/orders", "globex"))
            .await
            .status(),
        200
    );
    for _ in 0..5 {
        let res = test::call_service(&app, call("/status", "acme")).await;
        assert_eq!(
            res.status(),
            200,
            "routes outside the scope are never limited"
        );
    }
    let recorded = up.recorded();
    assert_eq!(recorded.len(), 3);
    assert!(
        recorded.iter().all(|r| r.uri == "/api/orders"),
        "the full path is forwarded"
    );
}
