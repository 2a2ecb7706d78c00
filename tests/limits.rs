//! Limits end to end: bursts, 429s and their headers, refill, per-key
//! isolation and exactness under concurrency.

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use support::{Response, proxy, request, upstream};

fn get_as(addr: std::net::SocketAddr, api_key: Option<&str>) -> Response {
    match api_key {
        Some(key) => request(addr, "GET", "/", &[("X-Api-Key", key)], b""),
        None => request(addr, "GET", "/", &[], b""),
    }
}

#[test]
fn the_burst_passes_then_429_with_retry_after_and_the_upstream_never_sees_it() {
    let up = upstream().route("/", "hello").run();
    let fg = proxy(up.addr()).rate("10/min").run();
    for remaining in (0..10).rev() {
        let res = get_as(fg.addr, None);
        assert_eq!(res.status, 200);
        assert_eq!(res.body, b"hello");
        assert_eq!(
            res.header("ratelimit-policy"),
            Some("\"default\";q=10;w=60")
        );
        let expected = format!("\"default\";r={remaining};t={}", (10 - remaining) * 6);
        assert_eq!(res.header("ratelimit"), Some(expected.as_str()));
    }
    let limited = get_as(fg.addr, None);
    assert_eq!(limited.status, 429);
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "retry-after {retry}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"default\";q=10;w=60")
    );
    assert!(
        limited
            .header("ratelimit")
            .unwrap()
            .starts_with("\"default\";r=0;t=")
    );
    assert_eq!(
        limited.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(limited.text().starts_with("Too Many Requests"));
    assert_eq!(up.requests(), 10);
}

#[test]
fn refused_requests_get_problem_json_when_they_accept_it() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate("1/h").run();
    let accept = [("Accept", "application/problem+json")];
    assert_eq!(request(fg.addr, "GET", "/", &accept, b"").status, 200);
    let res = request(fg.addr, "GET", "/", &accept, b"");
    assert_eq!(res.status, 429);
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let body = res.text();
    assert!(
        body.contains("\"status\":429") && body.contains("\"title\":\"Too Many Requests\""),
        "{body}"
    );
}

#[test]
fn a_key_recovers_one_request_per_emission_interval() {
    let clock = FakeRelativeClock::default();
    let up = upstream().run();
    let fg = proxy(up.addr()).rate("10/min").clock(clock.clone()).run();
    for _ in 0..10 {
        assert_eq!(get_as(fg.addr, None).status, 200);
    }
    let limited = get_as(fg.addr, None);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("6"));

    clock.advance(Duration::from_millis(5_999));
    let still = get_as(fg.addr, None);
    assert_eq!(still.status, 429);
    assert_eq!(
        still.header("retry-after"),
        Some("1"),
        "rounded up, never 0"
    );

    clock.advance(Duration::from_millis(1));
    assert_eq!(get_as(fg.addr, None).status, 200, "one cell back after 6 s");
    assert_eq!(get_as(fg.addr, None).status, 429, "and only one");

    clock.advance(Duration::from_secs(60));
    let res = get_as(fg.addr, None);
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("ratelimit"),
        Some("\"default\";r=9;t=6"),
        "a full burst again"
    );
    assert_eq!(up.requests(), 12);
}

#[test]
fn keys_are_isolated() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate("2/h")
        .env("FLOODGATE_KEY", "header:x-api-key")
        .run();
    for _ in 0..2 {
        assert_eq!(get_as(fg.addr, Some("alice")).status, 200);
    }
    assert_eq!(get_as(fg.addr, Some("alice")).status, 429);
    assert_eq!(
        get_as(fg.addr, Some("bob")).status,
        200,
        "bob has his own budget"
    );
    assert_eq!(
        get_as(fg.addr, None).status,
        200,
        "no key: counted by address"
    );
    assert_eq!(get_as(fg.addr, None).status, 200);
    assert_eq!(get_as(fg.addr, None).status, 429);
    assert_eq!(
        get_as(fg.addr, Some("bob")).status,
        200,
        "the address budget is not bob's"
    );
}

#[test]
fn client_addresses_behind_a_trusted_proxy_are_isolated() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate("1/h")
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
        .run();
    let from =
        |client: &str| request(fg.addr, "GET", "/", &[("X-Forwarded-For", client)], b"").status;
    assert_eq!(from("203.0.113.1"), 200);
    assert_eq!(from("203.0.113.1"), 429);
    assert_eq!(from("203.0.113.2"), 200);
    assert_eq!(from("2001:db8:1:2::1"), 200);
    assert_eq!(from("2001:db8:1:2::99"), 429, "same /64");
    assert_eq!(from("2001:db8:1:3::1"), 200, "another /64");
}

#[test]
fn legacy_and_no_headers() {
    let up = upstream().run();
    let legacy = proxy(up.addr())
        .rate("5/s")
        .env("FLOODGATE_HEADERS", "legacy")
        .run();
    let res = get_as(legacy.addr, None);
    assert_eq!(res.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(res.header("x-ratelimit-remaining"), Some("4"));
    assert_eq!(res.header("x-ratelimit-reset"), Some("1"));
    assert_eq!(res.header("ratelimit"), None);

    let none = proxy(up.addr())
        .rate("1/h")
        .env("FLOODGATE_HEADERS", "none")
        .run();
    let res = get_as(none.addr, None);
    assert_eq!(res.status, 200);
    assert!(res.header("ratelimit").is_none() && res.header("x-ratelimit-limit").is_none());
    let res = get_as(none.addr, None);
    assert_eq!(res.status, 429);
    assert_eq!(
        res.header("retry-after"),
        Some("3600"),
        "429 always says when to retry"
    );
}

#[test]
fn upstream_rate_limit_headers_are_replaced_not_duplicated() {
    let up = upstream()
        .route_fn("/", |_| {
            support::Reply::ok("x")
                .header("RateLimit", "\"upstream\";r=1;t=1")
                .header("RateLimit-Policy", "\"upstream\";q=1;w=1")
        })
        .run();
    let fg = proxy(up.addr()).rate("10/min").run();
    let res = get_as(fg.addr, None);
    assert_eq!(res.header_all("ratelimit"), vec!["\"default\";r=9;t=6"]);
    assert_eq!(
        res.header_all("ratelimit-policy"),
        vec!["\"default\";q=10;w=60"]
    );
}

#[test]
fn two_hundred_concurrent_requests_against_a_burst_of_one_hundred() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate("100/h").burst(100).run();
    let start = Arc::new(Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|_| {
            let start = start.clone();
            let addr = fg.addr;
            std::thread::spawn(move || {
                let raw = support::client::build("GET", "/", &[], b"");
                let mut stream = support::client::connect(addr);
                start.wait();
                use std::io::Write;
                stream.write_all(&raw).unwrap();
                support::client::read_response(&mut std::io::BufReader::new(stream), false)
                    .unwrap()
                    .status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (100, 100), "statuses: {statuses:?}");
    assert_eq!(up.requests(), 100, "exactly the burst reached the upstream");
}
