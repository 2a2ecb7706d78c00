//! `examples/rules_in_code.rs`, run as it is: its rules and middleware in
//! an `App`, forwarding to a real upstream.

mod support;

#[allow(dead_code)] // its `main` is the example's, not the test's
#[path = "../examples/rules_in_code.rs"]
mod example;

use actix_web::{App, test};
use floodgate::proxy::{self, Upstream};

#[actix_web::test]
async fn two_rules_built_in_code_decide_their_own_requests() {
    let up = support::upstream().run();
    let upstream = Upstream::new(&format!("http://{}", up.addr())).unwrap();
    let app = test::init_service(
        App::new()
            .wrap(example::gate())
            .configure(proxy::configure(upstream)),
    )
    .await;
    let peer = "192.0.2.1:4000".parse().unwrap();

    for _ in 0..3 {
        let req = test::TestRequest::post()
            .uri("/login")
            .peer_addr(peer)
            .to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers().get("ratelimit-policy").unwrap(),
            "\"login\";q=3;w=60, \"login-daily\";q=20;w=86400"
        );
    }
    let req = test::TestRequest::post()
        .uri("//login/")
        .peer_addr(peer)
        .to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), 429, "the fourth login within a minute");
    assert_eq!(
        test::read_body(res).await,
        "Too Many Requests: limit \"login\"\n"
    );

    let req = test::TestRequest::get()
        .uri("/api/orders")
        .insert_header(("x-api-key", "k-1"))
        .peer_addr(peer)
        .to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), 200, "the api rule has its own budget");
    assert_eq!(
        res.headers().get("ratelimit-policy").unwrap(),
        "\"api\";q=10;w=1, \"api-total\";q=100;w=1"
    );
    assert_eq!(res.headers().get("ratelimit").unwrap(), "\"api\";r=19;t=1");

    let req = test::TestRequest::get()
        .uri("/")
        .peer_addr(peer)
        .to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers().get("ratelimit-policy").unwrap(),
        "\"default\";q=50;w=1"
    );
    assert_eq!(
        up.requests(),
        5,
        "the refused login never reached the upstream"
    );
}
