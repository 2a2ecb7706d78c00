//! Property tests for the request side of forwarding: the head written to
//! the upstream ([`write_request_head`]) and the framing decisions taken
//! from the client's headers ([`content_length`], [`websocket_handshake`]).

use actix_web::test::TestRequest;
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// Names that are dropped, rewritten or special on the way, in odd
/// spellings, and plain ones.
fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "KEEP-ALIVE",
        "transfer-encoding",
        "Content-Length",
        "Expect",
        "Host",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Real-IP",
        "X_Api_Key",
        "X-Api-Key",
        "Cookie",
        "Accept",
        "X-Secret",
        "Sec-WebSocket-Key",
    ])
    .prop_map(str::to_owned)
    .boxed()
    .prop_union("[A-Za-z][A-Za-z0-9_-]{0,10}".boxed())
    .boxed()
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("websocket".to_owned()),
        Just("100-continue".to_owned()),
        "[0-9]{1,3}",
        "[!-~][ -~]{0,15}[!-~]",
    ]
}

/// A `Connection` value: a list of names, `upgrade`, `close` and the like.
fn connection() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            name(),
            Just("upgrade".to_owned()),
            Just("close".to_owned()),
            Just("keep-alive".to_owned()),
        ],
        1..4,
    )
    .prop_map(|names| names.join(", "))
}

fn fields() -> impl Strategy<Value = Vec<(String, String)>> {
    vec(
        prop_oneof![
            3 => (name(), value()),
            1 => connection().prop_map(|v| ("Connection".to_owned(), v)),
        ],
        0..10,
    )
}

fn request(fields: &[(String, String)], peer: &str) -> HttpRequest {
    let mut req = TestRequest::get()
        .uri("/p?q=1")
        .peer_addr(peer.parse().expect("a socket address"));
    for (k, v) in fields {
        req = req.append_header((k.as_str(), v.as_str()));
    }
    req.to_http_request()
}

/// The head floodgate writes for `req`, as `forward` would, or `None` if
/// the request is refused first: by actix-http (a second `Host`,
/// `Content-Length` or `Transfer-Encoding`) or by `forward`.
fn written(req: &HttpRequest, up: &Upstream) -> Option<(String, bool)> {
    let headers = req.headers();
    for once in [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ] {
        if headers.get_all(once).count() > 1 {
            return None;
        }
    }
    let body_len = content_length(headers).ok()?;
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let websocket = websocket_handshake(headers, body_len, chunked).ok()?;
    let named = connection_named(headers);
    let peer = peer(req, up);
    let target = up.path_and_query(req.uri()).ok()?;
    let mut out = BytesMut::new();
    write_request_head(&mut out, req, up, &target, &named, peer.as_ref(), websocket);
    Some((
        String::from_utf8(out.to_vec()).expect("the head is text"),
        websocket,
    ))
}

/// The written head's fields, parsed back by httparse.
fn parsed(head: &str) -> Vec<(String, String)> {
    let raw = format!("{head}\r\n");
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    let status = req
        .parse(raw.as_bytes())
        .expect("floodgate writes a valid head");
    assert!(status.is_complete(), "a complete head: {head}");
    req.headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8(h.value.to_vec()).expect("values are text"),
            )
        })
        .collect()
}

proptest! {
    /// Whatever the client's headers, the upstream's head has no hop-by-hop
    /// header (bar the handshake floodgate writes itself), none the client's
    /// `Connection` names, none with `_`, no framing of the client's and no
    /// `Expect` (the `Host` and `X-Forwarded-*` floodgate writes itself
    /// aside); every other end-to-end header arrives as sent; there is one
    /// `Host` and one `X-Forwarded-For`, ending in the peer.
    #[test]
    fn only_end_to_end_headers_reach_the_upstream(
        fields in fields(),
        trusted_peer in any::<bool>(),
    ) {
        let up = Upstream::new("http://127.0.0.1:8080")
            .expect("an upstream URL")
            .trust(["10.0.0.0/8".parse::<IpNet>().expect("a CIDR")]);
        let peer = if trusted_peer { "10.0.0.1:999" } else { "192.0.2.9:999" };
        let req = request(&fields, peer);
        let Some((head, websocket)) = written(&req, &up) else { return Ok(()) };
        let out = parsed(&head);

        let named: Vec<String> = req
            .headers()
            .get_all(header::CONNECTION)
            .flat_map(|v| crate::headers::tokens(v.as_bytes()))
            .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
            .filter(|t| t != "host")
            .collect();
        for (k, v) in &out {
            let name = HeaderName::from_bytes(k.as_bytes()).expect("a header name");
            let own_handshake = websocket
                && ((name == header::UPGRADE && v == "websocket")
                    || (name == header::CONNECTION && v == "upgrade"));
            if own_handshake {
                continue;
            }
            prop_assert!(!is_hop_by_hop(&name), "{} reached the upstream:\n{}", k, head);
            // Floodgate writes these itself, whatever the client names.
            let own = [header::HOST, header::X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST];
            if !own.contains(&name) {
                prop_assert!(!named.contains(&name.as_str().to_owned()), "{} is named by Connection:\n{}", k, head);
            }
            prop_assert!(!k.contains('_'), "{}", head);
            prop_assert!(name != header::CONTENT_LENGTH && name != header::EXPECT, "{}", head);
        }
        let count = |n: &str| out.iter().filter(|(k, _)| k.eq_ignore_ascii_case(n)).count();
        prop_assert_eq!(count("host"), 1, "{}", head);
        prop_assert_eq!(count("x-forwarded-for"), 1, "{}", head);
        let xff = &out.iter().find(|(k, _)| k == "x-forwarded-for").expect("counted").1;
        let peer_ip = peer.split(':').next().expect("an address");
        prop_assert!(xff.ends_with(peer_ip), "{}", head);
        if !trusted_peer {
            prop_assert_eq!(xff.as_str(), peer_ip, "an untrusted client's claims are replaced");
        }

        for (k, v) in req.headers().iter() {
            let kept = !dropped(k, &connection_named(req.headers()))
                && *k != header::EXPECT
                && *k != header::CONTENT_LENGTH
                && *k != header::X_FORWARDED_FOR
                && (trusted_peer || !claims_to_forward(k));
            if kept {
                let v = v.to_str().expect("generated as text");
                prop_assert!(
                    out.iter().any(|(ok, ov)| ok == k.as_str() && ov == v.trim()),
                    "{}: {} did not arrive:\n{}", k, v, head
                );
            }
        }
    }

    /// `Content-Length` never panics; 1*DIGIT is read as its number and
    /// anything else (a sign as in `+5`, spaces inside, a list) is the
    /// client's error, by the same rule as an upstream's answer.
    #[test]
    fn content_length_reads_numbers_only(
        value in prop_oneof!["[0-9]{1,25}", "[+-]?[0-9]{1,3}", "[ -~]{0,12}"],
        pad in "[ \t]{0,2}",
    ) {
        let req = request(&[("Content-Length".into(), format!("{pad}{value}{pad}"))], "192.0.2.9:1");
        let got = content_length(req.headers());
        let digits = !value.trim().is_empty() && value.trim().bytes().all(|b| b.is_ascii_digit());
        match value.trim().parse::<u64>() {
            Ok(n) if digits => prop_assert_eq!(got.ok(), Some(Some(n))),
            Ok(_) | Err(_) => prop_assert!(got.is_err(), "{:?} is not 1*DIGIT but was accepted", value),
        }
    }

    /// A handshake is passed through only with `Upgrade: websocket`,
    /// `Connection: upgrade` and no body; `Upgrade: websocket` with a body is
    /// always refused (actix-http would read it until the connection closes).
    #[test]
    fn websocket_handshakes_carry_no_body(
        fields in fields(),
        body_len in proptest::option::of(0u64..3),
        chunked in any::<bool>(),
    ) {
        let req = request(&fields, "192.0.2.9:1");
        let headers = req.headers();
        let upgrade = headers
            .get_all(header::UPGRADE)
            .any(|v| v.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")));
        let connection_upgrade = headers
            .get_all(header::CONNECTION)
            .flat_map(|v| crate::headers::tokens(v.as_bytes()))
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        let body = chunked || body_len.is_some_and(|n| n > 0);
        let got = websocket_handshake(headers, body_len, chunked);
        match (upgrade, body, connection_upgrade) {
            (false, ..) => prop_assert!(matches!(got, Ok(false))),
            (true, true, _) | (true, false, false) => prop_assert!(got.is_err()),
            (true, false, true) => prop_assert!(matches!(got, Ok(true))),
        }
    }
}
