//! Rules built in code: a strict limit on `POST /login` per address with a
//! daily quota beside it, and a limit per API key on `/api`, plus the
//! default rule for everything else. No settings file involved.
//!
//! ```sh
//! cargo run --example demo_upstream &
//! cargo run --example rules_in_code
//! for i in 1 2 3 4; do curl -si -X POST localhost:8003/login | head -1; done  # the 4th: 429
//! curl -si -H 'X-Api-Key: k-1' localhost:8003/api/orders | grep -i ratelimit
//! ```
//!
//! `tests/rules_in_code.rs` runs this file's [`rules`] and [`gate`].

use std::num::NonZeroU32;
use std::sync::Arc;

use actix_web::http::Method;
use actix_web::{App, HttpServer};
use floodgate::limiter::Algorithm;
use floodgate::policy::{KeySpec, Match, Rule, Rules};
use floodgate::proxy::{self, Upstream};
use floodgate::{Limit, MemoryBackend, Rate, RateLimit};

fn n(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("not zero")
}

/// Two rules and a default.
pub fn rules() -> Rules {
    let login = Rule::new("login")
        .matching(Match::any().path("/login").methods([Method::POST]))
        .limit(Limit::new("login", Rate::per_minute(n(3)), n(3)))
        .limit(
            Limit::window(
                "login-daily",
                "20/day".parse().expect("a rate"),
                Algorithm::FixedWindow,
            )
            .expect("a window limit"),
        );
    let api = Rule::new("api")
        .matching(Match::any().path("/api"))
        .key("header:x-api-key".parse::<KeySpec>().expect("a key spec"))
        .limit(Limit::new("api", Rate::per_second(n(10)), n(20)))
        // One budget for every client, whoever calls: protects the upstream.
        .limit_by(
            Limit::new("api-total", Rate::per_second(n(100)), n(100)),
            KeySpec::global(),
        );
    let default = Rule::new("default").limit(Limit::new("default", Rate::per_second(n(50)), n(50)));
    Rules::new(vec![login, api], default).expect("unique, valid names")
}

/// The middleware enforcing [`rules`] over one in-memory backend. Build it
/// once, outside the server's factory, so every worker shares its state.
pub fn gate() -> RateLimit {
    RateLimit::from_rules(Arc::new(MemoryBackend::new(100_000)), rules())
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let upstream = Upstream::new(
        &std::env::var("UPSTREAM").unwrap_or_else(|_| "http://127.0.0.1:8080".into()),
    )?;
    let gate = gate();
    log::info!(
        "rules in code on http://127.0.0.1:8003 (→ {})",
        upstream.url()
    );
    HttpServer::new(move || {
        App::new()
            .wrap(gate.clone())
            .configure(proxy::configure(upstream.clone()))
    })
    .bind("127.0.0.1:8003")?
    .run()
    .await?;
    Ok(())
}
