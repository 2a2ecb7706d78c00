//! `examples/path_tenant.rs`, run as it is: its key extractor and its routes
//! inside an `App`, forwarding to a real upstream.

mod support;

#[allow(dead_code)] // its `main` is the example's, not the test's
#[path = "../examples/path_tenant.rs"]
mod example;

use actix_web::{App, test};
use floodgate::proxy::Upstream;

#[actix_web::test]
async fn each_tenant_in_the_path_has_its_own_budget() {
    let up = support::upstream()
        .route("/t/acme/orders", "acme orders")
        .route("/t/globex/orders", "globex orders")
        .run();
    let upstream = Upstream::new(&format!("http://{}", up.addr())).unwrap();
    let app = test::init_service(
        App::new().configure(example::routes(example::per_tenant_limit(), upstream)),
    )
    .await;
    // One client address for every request: only the tenant tells them apart.
    let peer = "192.0.2.1:4000".parse().unwrap();
    let get = |path: &'static str| {
        test::TestRequest::get()
            .uri(path)
            .peer_addr(peer)
            .to_request()
    };

    for _ in 0..3 {
        let res = test::call_service(&app, get("/t/acme/orders")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(test::read_body(res).await, "acme orders");
    }
    let refused = test::call_service(&app, get("/t/acme/orders")).await;
    assert_eq!(refused.status(), 429, "acme's burst of 3 is spent");
    assert!(refused.headers().contains_key("retry-after"));
    // Another spelling of the same tenant is the same budget.
    assert_eq!(
        test::call_service(&app, get("/t/%61cme/orders"))
            .await
            .status(),
        429,
        "a percent-encoded tenant is still acme"
    );

    for _ in 0..3 {
        let res = test::call_service(&app, get("/t/globex/orders")).await;
        assert_eq!(res.status(), 200, "globex has a budget of its own");
        assert_eq!(test::read_body(res).await, "globex orders");
    }
    assert_eq!(
        test::call_service(&app, get("/t/globex/orders"))
            .await
            .status(),
        429
    );

    for _ in 0..5 {
        assert_eq!(
            test::call_service(&app, get("/status")).await.status(),
            200,
            "routes outside the tenant scope are never limited"
        );
    }
    let recorded = up.recorded();
    assert_eq!(
        recorded.len(),
        6,
        "refused requests never reach the upstream"
    );
    assert_eq!(
        recorded
            .iter()
            .filter(|r| r.uri == "/t/acme/orders")
            .count(),
        3
    );
}
