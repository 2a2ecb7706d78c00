//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/rules`,
//! `/limits/{rule}/{key}` and the status page (`/` and `/status.json`, see
//! [`status`]).
//!
//! It is a separate server on `FLOODGATE_ADMIN_LISTEN`, so client traffic
//! can never reach it. [`Admin`] holds the parts its endpoints read, handed
//! over at construction; [`configure`] adds the endpoints to an `App`.
//! `/healthz`, `/readyz` and `/metrics` are open to whoever reaches the
//! port; the rest answer only what [`Admin::access`] admits (see [`auth`]),
//! each wrapped in [`Admin::guard`].

pub mod auth;
pub mod limits;
pub mod rules;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{HttpResponse, web};

use crate::key::Fingerprinter;
use crate::limiter::{Backend, Fallback, Health};
use crate::middleware::RateLimit;
use crate::observe::{AccessLog, Board, Metrics, metrics};

pub use auth::{Access, AdminToken, RequireAdmin};
pub use rules::{LastReload, ReloadStatus};

/// What the admin endpoints read: shared with the client listener's parts.
#[derive(Clone)]
pub struct Admin {
    /// The limiter state (`/readyz` asks its health).
    pub backend: Arc<dyn Backend>,
    /// The middleware, for the rules in force.
    pub rate_limit: RateLimit,
    /// What `/metrics` renders (with the backend's state read at scrape
    /// time).
    pub metrics: Arc<Metrics>,
    /// The outcome of the last reload.
    pub last_reload: Arc<ReloadStatus>,
    /// How secrets are shown.
    pub fingerprints: Fingerprinter,
    /// Set once shutdown begins: `/readyz` answers 503.
    pub draining: Arc<AtomicBool>,
    /// The status page's live counters.
    pub board: Arc<Board>,
    /// What Redis failures do (`FLOODGATE_REDIS_FAILURE`), for the status
    /// page; unused by the memory backend.
    pub redis_failure: Fallback,
    /// The access log, if it is on (`/metrics` reports the lines it
    /// dropped).
    pub access_log: Option<AccessLog>,
    /// Who may use `/rules`, `/limits/…` and the status page
    /// (`FLOODGATE_ADMIN_TOKEN`, else loopback peers only).
    pub access: Access,
}

impl Admin {
    /// The middleware every protected admin resource is wrapped in.
    pub fn guard(&self) -> RequireAdmin {
        RequireAdmin::new(self.access.clone())
    }
}

/// Adds the admin endpoints for `admin` to an `App`.
pub fn configure(admin: Admin) -> impl Fn(&mut web::ServiceConfig) + Clone {
    let guard = admin.guard();
    let admin = web::Data::new(admin);
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(admin.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .service(
                web::resource("/rules")
                    .wrap(guard.clone())
                    .route(web::get().to(rules)),
            )
            .service(
                web::resource("/limits/{rule}/{key}")
                    .wrap(guard.clone())
                    .route(web::get().to(limits::get))
                    .route(web::delete().to(limits::delete)),
            )
            // Last: this scope's empty prefix would otherwise take every
            // path.
            .service(web::scope("").wrap(guard.clone()).configure(status::routes));
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(admin: web::Data<Admin>) -> HttpResponse {
    if admin.draining.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("draining\n");
    }
    let kind = admin.backend.kind();
    match admin.backend.health() {
        Health::Up => HttpResponse::Ok()
            .content_type("text/plain")
            .body(format!("ready: {kind} backend\n")),
        Health::Degraded(note) => HttpResponse::Ok()
            .content_type("text/plain")
            .body(format!("ready, degraded: {kind} backend: {note}\n")),
        Health::Down(note) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {kind} backend: {note}\n")),
    }
}

async fn rules(admin: web::Data<Admin>) -> HttpResponse {
    let doc = rules::rules_json(
        &admin.rate_limit.rules(),
        &admin.last_reload.get(),
        &admin.fingerprints,
    );
    HttpResponse::Ok()
        .content_type("application/json")
        .body(format!("{doc:#}\n"))
}

async fn metrics(admin: web::Data<Admin>) -> HttpResponse {
    HttpResponse::Ok().content_type(metrics::CONTENT_TYPE).body(
        admin
            .metrics
            .render_with(Some(admin.backend.clone()), admin.access_log.as_ref()),
    )
}
/// `GET path` on a local admin listener, blocking, with short timeouts.
/// Returns the status code. A wildcard address (`0.0.0.0`, `[::]`) is probed
/// on loopback.
pub fn admin_probe(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..])? {
            0 => break,
            n => len += n,
        }
    }
    std::str::from_utf8(&head[..len])
        .ok()
        .and_then(|h| h.strip_prefix("HTTP/1."))
        .and_then(|h| h.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}
