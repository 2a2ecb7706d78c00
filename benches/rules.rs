//! `Rules::select` against 50 rules: the cost of picking a request's rule
//! (path normalisation included), for the request that matches the last
//! rule, one no rule matches (the default), and a path that needs
//! normalising. The budget is under 1 µs per request.

use std::hint::black_box;
use std::num::NonZeroU32;

use actix_web::http::Method;
use criterion::{Criterion, criterion_group, criterion_main};
use floodgate::Limit;
use floodgate::policy::{Match, Rule, Rules};

fn fifty_rules() -> Rules {
    let limit =
        |name: &str| Limit::new(name, "10/s".parse().unwrap(), NonZeroU32::new(10).unwrap());
    let rules = (0..50)
        .map(|i| {
            let name = format!("r{i}");
            let matcher = match i % 3 {
                0 => Match::any().path(&format!("/api/v{i}")),
                1 => Match::any()
                    .path(&format!("/app{i}/x"))
                    .methods([Method::POST, Method::PUT]),
                _ => Match::any()
                    .path(&format!("/site{i}"))
                    .host(format!("*.tenant{i}.example.com").parse().unwrap()),
            };
            Rule::new(name.clone())
                .matching(matcher)
                .limit(limit(&name))
        })
        .collect();
    Rules::new(rules, Rule::new("default").limit(limit("default"))).unwrap()
}

fn select(c: &mut Criterion) {
    let rules = fifty_rules();
    let mut group = c.benchmark_group("select_50_rules");
    for (id, method, path, host) in [
        (
            "last_rule",
            Method::GET,
            "/api/v48/items/17",
            Some("www.example.com"),
        ),
        (
            "default",
            Method::GET,
            "/static/app.js",
            Some("www.example.com"),
        ),
        (
            "normalised_path",
            Method::GET,
            "//api/v48/./%69tems/../items",
            Some("www.example.com"),
        ),
        (
            "host_rule",
            Method::GET,
            "/site47/page",
            Some("a.tenant47.example.com:8443"),
        ),
    ] {
        group.bench_function(id, |b| {
            b.iter(|| {
                black_box(&rules)
                    .select(&method, black_box(path), black_box(host))
                    .name
                    .len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
