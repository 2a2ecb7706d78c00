//! Who may use the admin API: `FLOODGATE_ADMIN_TOKEN`, or else loopback
//! peers only.
//!
//! The admin listener serves two kinds of endpoints. `/healthz`, `/readyz`
//! and `/metrics` stay open to anyone who can reach the port: orchestrators
//! probe them and scrapers read them without credentials. The rest
//! (`/limits/…`, `/rules`, the status page and its JSON) show the policy and
//! can reset a client's limits, so they answer only:
//!
//! - with a token set ([`Access::Token`]): requests carrying
//!   `Authorization: Bearer <token>`, from any peer; 401 otherwise. The
//!   presented token is compared with the configured one in constant time
//!   (as BLAKE3 digests of both, so not even the length is told apart);
//! - without one ([`Access::LoopbackOnly`]): peers on loopback (127.0.0.0/8,
//!   `::1`, and IPv4-mapped loopback); 403 for anyone else. In a container
//!   the host reaches a published port through the bridge, not loopback, so
//!   compose deployments set a token.
//!
//! [`RequireAdmin`] is the middleware the route table wraps each protected
//! resource in; [`Access::check`] is its decision, testable on its own
//! (a test cannot make a non-loopback peer on 127.0.0.1).

use std::fmt;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{Error, HttpResponse};
use futures_util::future::{LocalBoxFuture, Ready, ready};
use serde_json::json;

/// The shortest token accepted: 16 characters. Anyone who reaches the admin
/// port may guess, and a token is checked per request, unthrottled.
pub const MIN_TOKEN_LEN: usize = 16;

/// The admin token (`FLOODGATE_ADMIN_TOKEN`): a secret, so it is kept only
/// as its digest and never shown (`Debug` prints a placeholder).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    digest: blake3::Hash,
}

/// Why a token was refused; the text says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminTokenError {
    /// Empty or blank. An empty token would let any request with
    /// `Authorization: Bearer ` through, so it is refused rather than read
    /// as "unset".
    #[error(
        "set but empty; unset it to serve the admin API to loopback peers only, or set a secret of at least {MIN_TOKEN_LEN} characters"
    )]
    Empty,
    /// Shorter than [`MIN_TOKEN_LEN`].
    #[error(
        "{0} characters; expected a secret of at least {MIN_TOKEN_LEN} (e.g. openssl rand -hex 32)"
    )]
    TooShort(usize),
    /// A character that cannot be sent in a header after `Bearer `.
    #[error(
        "expected visible ASCII characters only (letters, digits, punctuation; no spaces), as a Bearer token is sent"
    )]
    Invalid,
}

impl AdminToken {
    /// A token from its text (as the setting holds it, surrounding
    /// whitespace removed).
    pub fn new(text: &str) -> Result<Self, AdminTokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AdminTokenError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AdminTokenError::Invalid);
        }
        if text.len() < MIN_TOKEN_LEN {
            return Err(AdminTokenError::TooShort(text.len()));
        }
        Ok(AdminToken {
            digest: blake3::hash(text.as_bytes()),
        })
    }

    /// Whether `presented` is this token, in time independent of where (or
    /// whether) they differ: `blake3::Hash` compares in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        blake3::hash(presented) == self.digest
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

/// Who may use the protected admin endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `Authorization: Bearer <token>` from any peer.
    Token(Arc<AdminToken>),
    /// No token configured: loopback peers only.
    LoopbackOnly,
}

/// Why [`Access::check`] refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no token, or the wrong one.
    Unauthorized,
    /// 403: no token is configured and the peer is not on loopback.
    Forbidden,
}

impl Access {
    /// With `token` if one is set, else loopback only.
    pub fn new(token: Option<AdminToken>) -> Self {
        token.map_or(Access::LoopbackOnly, |t| Access::Token(Arc::new(t)))
    }

    /// The decision for a request from `peer` (`None`: the connection has
    /// no address, e.g. a Unix socket) carrying `authorization`.
    pub fn check(
        &self,
        peer: Option<IpAddr>,
        authorization: Option<&HeaderValue>,
    ) -> Result<(), Refusal> {
        match self {
            Access::Token(token) => match authorization.and_then(bearer) {
                Some(presented) if token.matches(presented) => Ok(()),
                _ => Err(Refusal::Unauthorized),
            },
            Access::LoopbackOnly => match peer {
                Some(ip) if is_loopback(ip) => Ok(()),
                _ => Err(Refusal::Forbidden),
            },
        }
    }
}

/// The credentials of `Bearer <credentials>` (the scheme in any case, RFC
/// 9110 §11.1; one or more spaces after it).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|b| *b != b' ')?;
    let credentials = &rest[start..];
    let end = credentials
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    Some(&credentials[..end])
}

/// 127.0.0.0/8, `::1`, and IPv4-mapped loopback (`::ffff:127.0.0.1`, what a
/// dual-stack listener sees for an IPv4 loopback client).
pub fn is_loopback(ip: IpAddr) -> bool {
    crate::key::canonical(ip).is_loopback()
}

impl Refusal {
    /// The JSON answer for this refusal.
    pub fn response(self) -> HttpResponse {
        let (status, code, message) = match self {
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <FLOODGATE_ADMIN_TOKEN>",
            ),
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "without FLOODGATE_ADMIN_TOKEN this endpoint answers loopback peers only",
            ),
        };
        let mut res = HttpResponse::build(status);
        if self == Refusal::Unauthorized {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        res.content_type("application/json").body(format!(
            "{}\n",
            json!({ "error": code, "message": message })
        ))
    }
}

// === RequireAdmin ===

/// Middleware answering 401 or 403 (see [`Access::check`]) before the
/// wrapped endpoint runs. Wrap each protected resource or scope in it:
///
/// ```
/// use actix_web::{App, HttpResponse, web};
/// use floodgate::admin::auth::{Access, RequireAdmin};
///
/// let guard = RequireAdmin::new(Access::LoopbackOnly);
/// let app = App::new().service(
///     web::resource("/rules")
///         .wrap(guard.clone())
///         .route(web::get().to(HttpResponse::Ok)),
/// );
/// ```
#[derive(Debug, Clone)]
pub struct RequireAdmin {
    access: Access,
}

impl RequireAdmin {
    /// Admits what `access` admits.
    pub fn new(access: Access) -> Self {
        RequireAdmin { access }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RequireAdmin
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = RequireAdminService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequireAdminService {
            service: Rc::new(service),
            access: self.access.clone(),
        }))
    }
}

/// The per-worker service built by [`RequireAdmin`].
pub struct RequireAdminService<S> {
    service: Rc<S>,
    access: Access,
}

impl<S, B> Service<ServiceRequest> for RequireAdminService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let peer = req.peer_addr().map(|a| a.ip());
        match self
            .access
            .check(peer, req.headers().get(header::AUTHORIZATION))
        {
            Ok(()) => {
                let service = self.service.clone();
                Box::pin(async move { Ok(service.call(req).await?.map_into_left_body()) })
            }
            Err(refusal) => {
                log::debug!(
                    "admin {} {} refused: {refusal:?} peer={peer:?}",
                    req.method(),
                    req.path()
                );
                let res = req.into_response(refusal.response()).map_into_right_body();
                Box::pin(async move { Ok(res) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret-admin-token-0123";

    fn token() -> Access {
        Access::new(Some(AdminToken::new(TOKEN).unwrap()))
    }

    fn auth(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_token_admits_only_requests_that_carry_it_from_any_peer() {
        let access = token();
        for peer in [ip("127.0.0.1"), ip("203.0.113.9"), ip("2001:db8::1"), None] {
            let good = auth(&format!("Bearer {TOKEN}"));
            assert_eq!(access.check(peer, Some(&good)), Ok(()), "{peer:?}");
            for spelling in [format!("bearer {TOKEN}"), format!("BEARER   {TOKEN} ")] {
                assert_eq!(access.check(peer, Some(&auth(&spelling))), Ok(()));
            }
            for bad in [
                "".to_owned(),
                "Bearer".to_owned(),
                "Bearer ".to_owned(),
                format!("Basic {TOKEN}"),
                format!("Bearer {TOKEN}x"),
                format!("Bearer {}", &TOKEN[1..]),
                format!("Bearer{TOKEN}"),
                TOKEN.to_owned(),
            ] {
                assert_eq!(
                    access.check(peer, Some(&auth(&bad))),
                    Err(Refusal::Unauthorized),
                    "{bad:?}"
                );
            }
            assert_eq!(access.check(peer, None), Err(Refusal::Unauthorized));
        }
    }

    #[test]
    fn without_a_token_only_loopback_peers_are_admitted() {
        let access = Access::new(None);
        for peer in ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(access.check(ip(peer), None), Ok(()), "{peer}");
        }
        for peer in [
            "10.0.0.1",
            "172.17.0.1",
            "203.0.113.9",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "0.0.0.0",
            "::",
        ] {
            assert_eq!(
                access.check(ip(peer), None),
                Err(Refusal::Forbidden),
                "{peer}"
            );
            // A header does not open the door when no token is configured.
            let any = auth("Bearer anything-at-all-long-enough");
            assert_eq!(access.check(ip(peer), Some(&any)), Err(Refusal::Forbidden));
        }
        assert_eq!(access.check(None, None), Err(Refusal::Forbidden));
    }

    #[test]
    fn tokens_must_be_long_visible_and_are_never_shown() {
        assert_eq!(AdminToken::new(""), Err(AdminTokenError::Empty));
        assert_eq!(AdminToken::new("  \t"), Err(AdminTokenError::Empty));
        assert_eq!(AdminToken::new("short"), Err(AdminTokenError::TooShort(5)));
        assert_eq!(
            AdminToken::new("has a space in it, long"),
            Err(AdminTokenError::Invalid)
        );
        let t = AdminToken::new(&format!("  {TOKEN} ")).unwrap();
        assert!(t.matches(TOKEN.as_bytes()));
        assert!(!format!("{t:?}").contains(TOKEN));
        assert!(!format!("{:?}", token()).contains(TOKEN));
    }

    #[test]
    fn refusals_answer_json_with_their_status() {
        let res = Refusal::Unauthorized.response();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            res.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer"
        );
        assert_eq!(
            Refusal::Forbidden.response().status(),
            StatusCode::FORBIDDEN
        );
    }
}
