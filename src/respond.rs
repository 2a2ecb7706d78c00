//! Every answer the gate makes itself, in one place (linkerd2-proxy's
//! `errors/respond.rs`): `400` for a key that cannot be derived, `403` for a
//! denied client network, `429` for a refusal, `503` when the limiter cannot
//! decide under the `closed` failure policy.
//!
//! Bodies are short: plain text, or RFC 9457 `application/problem+json` for
//! the `403` and the `429` when the client's `Accept` asks for JSON. The
//! `400` and the `503` share [`ProxyError`]'s one status map and text bodies
//! with the forwarder's own failures. A refused request that announced a body
//! gets `Connection: close` ([`refuse`]).

use std::time::Duration;

use actix_web::body::{BoxBody, EitherBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use bytes::Bytes;

use crate::error::ProxyError;
use crate::headers::{LimitHeaders, Recent, retry_after_secs};
use crate::key::KeyError;
use crate::verdict::Verdict;

/// `Retry-After` sent with a `503` under the `closed` failure policy.
pub const CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The plain-text body of a `403`.
const FORBIDDEN_TEXT: &str = "Forbidden: this client network is denied\n";

/// The problem+json body of a `403`.
const FORBIDDEN_JSON: &str = "{\"type\":\"about:blank\",\"title\":\"Forbidden\",\"status\":403,\
                              \"detail\":\"This client network is denied.\"}\n";

const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// `400`: no key could be derived for the request.
pub fn bad_key(err: KeyError) -> HttpResponse {
    ProxyError::from(err).error_response()
}

/// `503` with `Retry-After`: the limiter could not decide and the failure
/// policy is `closed`.
pub fn limiter_unavailable() -> HttpResponse {
    ProxyError::LimiterUnavailable {
        retry_after: CLOSED_RETRY_AFTER,
    }
    .error_response()
}

/// `403`: the client network is on a deny list.
pub fn denied(req: &ServiceRequest) -> HttpResponse {
    let mut res = HttpResponse::new(StatusCode::FORBIDDEN);
    let (content_type, body) = if wants_problem_json(req.headers()) {
        (PROBLEM_JSON, FORBIDDEN_JSON)
    } else {
        (TEXT, FORBIDDEN_TEXT)
    };
    res.headers_mut().insert(header::CONTENT_TYPE, content_type);
    res.set_body(BoxBody::new(body))
}

/// `429` for a refused `verdict`, with the rule's rate-limit headers and
/// `Retry-After`. The body names the limit that refused; `Retry-After` says
/// when to come back. The text body is the same for every refusal by one
/// limit, and `recent` keeps the last one built, so a flood of refusals
/// costs no formatting or allocation.
pub fn too_many_requests(
    req: &ServiceRequest,
    verdict: &Verdict,
    headers: &LimitHeaders,
    recent: &mut Recent,
) -> HttpResponse {
    let mut res = HttpResponse::new(StatusCode::TOO_MANY_REQUESTS);
    let refusing = verdict.refusing().map(|l| &l.limit);
    let body = if wants_problem_json(req.headers()) {
        let retry = verdict.retry_after().map_or(1, retry_after_secs);
        res.headers_mut().insert(header::CONTENT_TYPE, PROBLEM_JSON);
        let body = match refusing {
            Some(limit) => {
                let name = serde_json::to_string(limit.name()).expect("a string serialises");
                let detail = serde_json::to_string(&format!(
                    "Rate limit {:?} exceeded; retry in {retry} s.",
                    limit.name()
                ))
                .expect("a string serialises");
                format!(
                    "{{\"type\":\"about:blank\",\"title\":\"Too Many Requests\",\"status\":429,\
                     \"detail\":{detail},\"limit\":{name}}}\n"
                )
            }
            None => format!(
                "{{\"type\":\"about:blank\",\"title\":\"Too Many Requests\",\"status\":429,\
                 \"detail\":\"Rate limit exceeded; retry in {retry} s.\"}}\n"
            ),
        };
        BoxBody::new(body)
    } else {
        res.headers_mut().insert(header::CONTENT_TYPE, TEXT);
        let body = match refusing {
            Some(limit) => match &recent.body {
                Some((id, body)) if *id == limit.id() => body.clone(),
                _ => {
                    let body =
                        Bytes::from(format!("Too Many Requests: limit {:?}\n", limit.name()));
                    recent.body = Some((limit.id(), body.clone()));
                    body
                }
            },
            None => Bytes::from_static(b"Too Many Requests\n"),
        };
        BoxBody::new(body)
    };
    headers.apply(verdict, res.headers_mut(), recent);
    res.set_body(body)
}

/// Whether the client prefers RFC 9457 problem details: its `Accept` names
/// `application/problem+json` or `application/json` with a non-zero weight.
pub fn wants_problem_json(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).any(|value| {
        value.to_str().is_ok_and(|accept| {
            accept.split(',').any(|range| {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                let json = media.eq_ignore_ascii_case("application/problem+json")
                    || media.eq_ignore_ascii_case("application/json");
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                json && !refused
            })
        })
    })
}

/// The answer to a refused request. Nobody reads a refused request's body, so
/// when one was announced the connection closes once the answer is written:
/// a body that trickles or never ends cannot hold the connection, and no
/// unread body is left where the next request should start.
pub fn refuse<B>(req: ServiceRequest, mut res: HttpResponse) -> ServiceResponse<EitherBody<B>> {
    if announces_body(req.headers()) {
        res.head_mut().set_connection_type(ConnectionType::Close);
    }
    req.into_response(res).map_into_right_body()
}

/// Whether a request comes with a body: chunked (or any transfer coding), or
/// a `Content-Length` other than 0.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::HeaderStyle;
    use crate::limiter::{Decision, Limit};
    use crate::verdict::DecidedBy;
    use actix_web::test as at;
    use std::num::NonZeroU32;

    #[test]
    fn accept_negotiation() {
        let with = |accept: &str| {
            let req = at::TestRequest::default()
                .insert_header(("accept", accept))
                .to_srv_request();
            wants_problem_json(req.headers())
        };
        assert!(with("application/json"));
        assert!(with("text/plain, Application/Problem+JSON;q=0.5"));
        assert!(!with("application/json;q=0"));
        assert!(!with("text/html, */*"));
        assert!(!with("application/jsonx"));
    }

    fn refused(name: &str) -> (Verdict, LimitHeaders) {
        let limit = Limit::new(name, "1/min".parse().unwrap(), NonZeroU32::new(1).unwrap());
        let mut verdict = Verdict::new("r".into(), false);
        verdict.decided(
            [&limit],
            &[Decision::Limited {
                retry_after: Duration::from_millis(5_500),
                reset_after: Duration::from_secs(60),
            }],
            DecidedBy::Backend,
        );
        let headers = LimitHeaders::new(HeaderStyle::Ietf, std::slice::from_ref(&limit));
        (verdict, headers)
    }

    async fn body(res: HttpResponse) -> String {
        let bytes = actix_web::body::to_bytes(res.into_body()).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[actix_web::test]
    async fn a_429_names_the_limit_that_refused() {
        let (verdict, headers) = refused("login");
        let mut recent = Recent::default();
        let req = at::TestRequest::default().to_srv_request();
        let res = too_many_requests(&req, &verdict, &headers, &mut recent);
        assert_eq!(res.headers().get("retry-after").unwrap(), "6");
        assert_eq!(body(res).await, "Too Many Requests: limit \"login\"\n");

        let req = at::TestRequest::default()
            .insert_header(("accept", "application/problem+json"))
            .to_srv_request();
        let res = too_many_requests(&req, &verdict, &headers, &mut recent);
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        let json: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
        assert_eq!(json["status"], 429);
        assert_eq!(json["limit"], "login");
        assert_eq!(
            json["detail"],
            "Rate limit \"login\" exceeded; retry in 6 s."
        );
    }

    #[actix_web::test]
    async fn a_limit_name_cannot_break_the_json() {
        let (verdict, headers) = refused("a\"b\\c");
        let req = at::TestRequest::default()
            .insert_header(("accept", "application/json"))
            .to_srv_request();
        let res = too_many_requests(&req, &verdict, &headers, &mut Recent::default());
        let json: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
        assert_eq!(json["limit"], "a\"b\\c");
    }

    #[actix_web::test]
    async fn a_403_in_text_or_json() {
        let req = at::TestRequest::default().to_srv_request();
        let res = denied(&req);
        assert_eq!(res.status(), 403);
        assert_eq!(body(res).await, FORBIDDEN_TEXT);
        let req = at::TestRequest::default()
            .insert_header(("accept", "application/problem+json"))
            .to_srv_request();
        let res = denied(&req);
        let json: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
        assert_eq!(json["status"], 403);
    }
}
