//! The head of an upstream's answer: parsed strictly (RFC 9112's framing
//! rules, as hyper's `proto/h1/role.rs` holds a peer to them), with the
//! end-to-end headers copied out and the body's framing decided once.

use std::mem::MaybeUninit;

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode, Version};
use bytes::BytesMut;
use smallvec::SmallVec;

use super::{ExchangeError, MAX_HEAD, MAX_HEADERS};

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (HTTP/1.0 style, or after a
    /// protocol switch).
    Close,
}

pub(super) struct Parsed {
    pub(super) status: StatusCode,
    pub(super) content_length: Option<u64>,
    pub(super) framing: Framing,
    pub(super) keep_alive: bool,
}

/// Whether `buf` holds a complete final answer head (after any interim
/// ones), or something that is no answer at all: either way there is no
/// point sending more of the request body.
pub(super) fn answered(buf: &[u8]) -> bool {
    let mut rest = buf;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(rest) {
            Ok(httparse::Status::Complete(len)) => match response.code {
                Some(code) if (100..200).contains(&code) && code != 101 => rest = &rest[len..],
                _ => return true,
            },
            Ok(httparse::Status::Partial) => return rest.len() >= MAX_HEAD,
            Err(_) => return true,
        }
        if rest.is_empty() {
            return false;
        }
    }
}

/// Parses a complete head off the front of `buf`, or `None` if incomplete.
/// `upgrade`: whether the request asked to switch protocols (only then may
/// the answer be a `101`).
pub(super) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    upgrade: bool,
    headers: &mut HeaderMap,
) -> Result<Option<Parsed>, ExchangeError> {
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many headers"));
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed head")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Invalid("bad status"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };

    // Positions of names and values, to slice the frozen head without copying.
    let base = buf.as_ptr() as usize;
    // HTTP/1.0 closes unless the answer says `keep-alive`; a `close` token
    // wins over a `keep-alive` anywhere in the head, whatever their order.
    let mut keep_alive_10 = false;
    let mut close_named = false;
    let mut named: Vec<HeaderName> = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut spans: SmallVec<[(usize, usize, usize, usize); 16]> = SmallVec::new();
    for h in response.headers.iter() {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        spans.push((n, n + h.name.len(), v, v + h.value.len()));
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in crate::headers::tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close_named = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_10 = true;
                } else if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = crate::headers::content_length(h.value)
                .ok_or(ExchangeError::Invalid("content-length is not a number"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ExchangeError::Invalid("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Exactly one coding, chunked: floodgate decodes no other, and
            // re-framing a body it cannot read would change the message.
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(ExchangeError::Invalid(
                    "transfer coding other than one chunked",
                ));
            }
            chunked = true;
        }
    }
    if chunked && content_length.is_some() {
        return Err(ExchangeError::Invalid(
            "both content-length and transfer-encoding",
        ));
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !upgrade {
        return Err(ExchangeError::Invalid(
            "101 to a request that asked for no upgrade",
        ));
    }
    let head = buf.split_to(len).freeze();
    headers.clear();
    for (ns, ne, vs, ve) in spans {
        let Ok(name) = HeaderName::from_bytes(&head[ns..ne]) else {
            return Err(ExchangeError::Invalid("bad header name"));
        };
        let keep_upgrade = switching && name == header::UPGRADE;
        if !keep_upgrade && (crate::proxy::is_hop_by_hop(&name) || named.contains(&name)) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| ExchangeError::Invalid("bad header value"))?;
        headers.append(name, value);
    }

    let no_body = *method == Method::HEAD
        || status.is_informational() && !switching
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if switching {
        Framing::Close
    } else if no_body {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let connection_close = close_named || (version == Version::HTTP_10 && !keep_alive_10);
    let keep_alive = !connection_close && !matches!(framing, Framing::Close);
    Ok(Some(Parsed {
        status,
        content_length,
        framing,
        keep_alive,
    }))
}
