//! A tiny web server to try floodgate without one of your own.
//!
//! ```sh
//! cargo run --example demo_upstream            # serves 127.0.0.1:8080
//! cargo run --release                          # floodgate on :8000 in front of it
//! curl -i localhost:8000/hello
//! ```
//!
//! `DEMO_LISTEN` changes the address. Every path answers with a short text
//! naming the path and the client address floodgate forwarded.

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

async fn hello(req: HttpRequest) -> HttpResponse {
    let client = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("direct");
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!(
            "hello from the demo upstream: {} {} (for {client})\n",
            req.method(),
            req.uri()
        ))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::var("DEMO_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    println!("demo upstream listening on http://{listen}");
    HttpServer::new(|| App::new().default_service(web::to(hello)))
        .bind(&listen)?
        .run()
        .await
}
