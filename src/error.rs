//! Where a failure came from, and the one place it becomes a status code
//! (pingora's `fail_to_proxy`).
//!
//! | error | status |
//! | --- | --- |
//! | `Downstream` (bad key), `Malformed`, `ClientBody` (unreadable body) | 400 |
//! | `MethodNotAllowed` (`CONNECT` and the like) | 405 |
//! | client stopped sending its body | 408 |
//! | request body past `FLOODGATE_MAX_BODY` | 413 |
//! | upstream refused, reset, closed or spoke garbage | 502 |
//! | upstream answered nothing in time (our deadline, or the OS timing out) | 504 |
//! | limiter state unavailable under `closed` policy | 503 |
//! | anything else | 500 |
//!
//! Bodies are one short line of text; the details go to the log, once, here
//! (at debug for failures of the upstream or the limiter, which
//! [`OutageLog`](crate::outage::OutageLog) reports as outages).

use std::io;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::key::KeyError;
use crate::proxy::client::ExchangeError;

/// A request that could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request itself is unacceptable.
    #[error("{0}")]
    Downstream(#[from] KeyError),
    /// A request floodgate refuses to forward as it is.
    #[error("{0}")]
    Malformed(&'static str),
    /// `CONNECT` and friends: floodgate only talks to its one upstream.
    #[error("method {0} is not allowed")]
    MethodNotAllowed(actix_web::http::Method),
    /// The client sent part of its body and then stopped for too long.
    #[error("client sent no body bytes for {0:?}")]
    ClientTimeout(Duration),
    /// The request body is longer than `FLOODGATE_MAX_BODY` allows.
    #[error("request body longer than {0} bytes")]
    PayloadTooLarge(u64),
    /// The client's body could not be read (it disconnected, or framed it badly).
    #[error("reading the request body: {0}")]
    ClientBody(String),
    /// The upstream refused the connection, reset it, closed it, or answered
    /// garbage; an I/O failure keeps its [`io::ErrorKind`]
    /// ([`ExchangeError::io_kind`]).
    #[error("upstream unavailable: {0}")]
    Upstream(#[source] ExchangeError),
    /// The upstream did not answer within the timeout.
    #[error("upstream timed out after {0:?}")]
    UpstreamTimeout(Duration),
    /// Limiter state could not be read and the failure policy is `closed`.
    #[error("rate limiter unavailable")]
    LimiterUnavailable {
        /// Sent as the 503's `Retry-After`, in whole seconds rounded up (at
        /// least 1).
        retry_after: Duration,
    },
    /// A state floodgate's own code should never reach (e.g. a `101` answer
    /// without a raw connection to tunnel); answered 500 and logged at warn.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ResponseError for ProxyError {
    fn status_code(&self) -> StatusCode {
        match self {
            ProxyError::Downstream(_) | ProxyError::Malformed(_) | ProxyError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Upstream(err) => match err.io_kind() {
                Some(io::ErrorKind::TimedOut) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::LimiterUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        match self {
            ProxyError::Downstream(_)
            | ProxyError::Malformed(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::PayloadTooLarge(_) => {
                log::debug!("refused request: {self}")
            }
            ProxyError::ClientTimeout(_) | ProxyError::ClientBody(_) => {
                log::info!("client error: {self}")
            }
            // Traffic during an outage: the part that sees it (the forwarder,
            // the middleware) logs the outage once and counts it.
            ProxyError::Upstream(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::LimiterUnavailable { .. } => {
                log::debug!("{self}; answering {}", status.as_u16())
            }
            _ => log::warn!("{self}; answering {}", status.as_u16()),
        }
        let mut res = HttpResponse::build(status);
        res.insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"));
        match self {
            ProxyError::MethodNotAllowed(_) => {
                res.insert_header((
                    header::ALLOW,
                    "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE",
                ));
            }
            ProxyError::LimiterUnavailable { retry_after } => {
                res.insert_header((
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::headers::retry_after_secs(*retry_after)),
                ));
            }
            // The rest of the body is unread: the connection cannot carry
            // another request.
            ProxyError::ClientTimeout(_)
            | ProxyError::ClientBody(_)
            | ProxyError::PayloadTooLarge(_) => {
                res.force_close();
            }
            _ => {}
        }
        res.body(self.client_message())
    }
}

impl ProxyError {
    /// What the client reads: the reason, never internal detail.
    fn client_message(&self) -> String {
        match self {
            ProxyError::Downstream(e) => format!("Bad Request: {e}\n"),
            ProxyError::Malformed(reason) => format!("Bad Request: {reason}\n"),
            ProxyError::MethodNotAllowed(m) => format!("Method Not Allowed: {m}\n"),
            ProxyError::ClientTimeout(_) => "Request Timeout\n".into(),
            ProxyError::PayloadTooLarge(max) => {
                format!("Payload Too Large: the request body may be at most {max} bytes\n")
            }
            ProxyError::ClientBody(_) => "Bad Request: unreadable request body\n".into(),
            ProxyError::Upstream(_) | ProxyError::UpstreamTimeout(_) => match self.status_code() {
                StatusCode::GATEWAY_TIMEOUT => "Gateway Timeout\n".into(),
                _ => "Bad Gateway\n".into(),
            },
            ProxyError::LimiterUnavailable { .. } => {
                "Service Unavailable: rate limiter unavailable\n".into()
            }
            ProxyError::Internal(_) => "Internal Server Error\n".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(kind: io::ErrorKind) -> ProxyError {
        ProxyError::Upstream(ExchangeError::Connect(kind.into()))
    }

    #[test]
    fn upstream_failures_map_by_their_kind() {
        for (err, status) in [
            (upstream(io::ErrorKind::ConnectionRefused), 502),
            (upstream(io::ErrorKind::ConnectionReset), 502),
            (upstream(io::ErrorKind::HostUnreachable), 502),
            (upstream(io::ErrorKind::TimedOut), 504),
            (
                ProxyError::Upstream(ExchangeError::Receive(io::ErrorKind::TimedOut.into())),
                504,
            ),
            (ProxyError::Upstream(ExchangeError::Closed), 502),
            (ProxyError::Upstream(ExchangeError::Invalid("bad")), 502),
            (ProxyError::UpstreamTimeout(Duration::from_secs(1)), 504),
        ] {
            assert_eq!(err.status_code().as_u16(), status, "{err}");
        }
        let res = upstream(io::ErrorKind::TimedOut).error_response();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn the_io_error_is_kept_as_the_source() {
        let err = upstream(io::ErrorKind::ConnectionRefused);
        let mut source = std::error::Error::source(&err);
        let mut kind = None;
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                kind = Some(io.kind());
            }
            source = e.source();
        }
        assert_eq!(kind, Some(io::ErrorKind::ConnectionRefused));
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
