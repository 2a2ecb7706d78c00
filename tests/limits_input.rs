//! Oversized input gets a 4xx, never a 5xx or a crash: the request body cap
//! (`FLOODGATE_MAX_BODY`) and the limits of the HTTP server floodgate is
//! built on (actix-http: a request head of at most 128 KiB, at most 96
//! headers; the `http` crate: a URI of at most 65534 bytes), each as the
//! README's "Limits and timeouts" table states it.
//!
//! Oversized heads are sent so that floodgate reads every byte before it
//! answers (a head cut off exactly at the 128 KiB limit, or small enough to
//! be read whole): a server closing a socket with unread input resets it,
//! and the client may then never see the answer.

mod support;

use std::io::{BufReader, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use support::client::{connect, read_response};
use support::upstream::read_head;
use support::{proxy, raw_upstream, request, send, upstream};

const GENEROUS: &str = "1000000/s";

/// actix-http's `MAX_BUFFER_SIZE`: a request head that has not ended within
/// this many bytes is answered `431`.
const HEAD_LIMIT: usize = 131_072;

/// A request head that does not end within [`HEAD_LIMIT`]: `start`, then
/// `name: xxxx…` filling it to exactly the limit (no blank line).
fn head_cut_at_the_limit(start: &str, name: &str) -> Vec<u8> {
    let mut raw = format!("{start}Host: floodgate.test\r\n{name}: ").into_bytes();
    raw.resize(HEAD_LIMIT, b'x');
    raw
}

// === FLOODGATE_MAX_BODY ===

#[test]
fn a_content_length_past_the_cap_is_413_uncharged_and_never_forwarded() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate("1/h")
        .burst(1)
        .env("FLOODGATE_MAX_BODY", "1k")
        .run();
    // Only the head: floodgate answers without reading the body.
    let res = send(
        fg.addr,
        b"POST /upload HTTP/1.1\r\nHost: floodgate.test\r\nContent-Length: 1025\r\n\r\n",
    );
    assert_eq!(res.status, 413, "{res:?}");
    assert_eq!(res.header("connection"), Some("close"));
    assert!(res.text().contains("at most 1024 bytes"), "{}", res.text());
    assert_eq!(up.requests(), 0, "nothing was forwarded");

    // The refusal cost no budget: the one request of the burst still passes,
    // with a body of exactly the cap.
    let body = vec![b'b'; 1024];
    let res = request(fg.addr, "POST", "/upload", &[], &body);
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(up.only().body, body);
}

#[test]
fn a_chunked_body_past_the_cap_is_cut_off_and_answered_413() {
    let (seen_tx, seen) = mpsc::channel();
    let up = raw_upstream(move |stream| {
        let mut reader = BufReader::new(&stream);
        let head = read_head(&mut reader);
        // The upstream never answers: floodgate must give up on its own.
        let mut body = Vec::new();
        let _ = reader.read_to_end(&mut body);
        let _ = seen_tx.send((head, body));
    });
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_MAX_BODY", "1k")
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "30s")
        .run();
    let mut stream = connect(fg.addr);
    let first = vec![b'a'; 1000];
    let second = vec![b'c'; 100];
    let mut raw =
        b"POST /upload HTTP/1.1\r\nHost: floodgate.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    raw.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
    raw.extend_from_slice(&first);
    raw.extend_from_slice(b"\r\n");
    stream.write_all(&raw).unwrap();
    // The second chunk takes the body to 1100 bytes, past 1024. The body
    // never ends: only the cap can end this exchange.
    let mut raw = format!("{:x}\r\n", second.len()).into_bytes();
    raw.extend_from_slice(&second);
    raw.extend_from_slice(b"\r\n");
    stream.write_all(&raw).unwrap();
    let res = read_response(&mut BufReader::new(&stream), false).unwrap();
    assert_eq!(res.status, 413, "{res:?}");
    assert_eq!(res.header("connection"), Some("close"));

    let (head, body) = seen
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream's connection was closed");
    assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
    let body = String::from_utf8_lossy(&body);
    assert!(
        !body.contains('c'),
        "no byte past the cap reached the upstream: {body}"
    );
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "the body was not passed on as complete"
    );
}

#[test]
fn without_a_cap_any_body_length_passes() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let body = vec![b'z'; 3 << 20];
    let res = request(fg.addr, "PUT", "/big", &[], &body);
    assert_eq!(res.status, 200);
    assert_eq!(up.only().body.len(), body.len());
}

// === the HTTP server's limits ===

#[test]
fn a_uri_past_65534_bytes_is_400() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let target = format!("/{}", "u".repeat(70_000));
    let res = request(fg.addr, "GET", &target, &[], b"");
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(up.requests(), 0);
}

#[test]
fn a_uri_past_the_head_limit_is_431() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let mut raw = b"GET /".to_vec();
    raw.resize(HEAD_LIMIT, b'u');
    let res = send(fg.addr, &raw);
    assert_eq!(res.status, 431, "{res:?}");
    assert_eq!(up.requests(), 0);
}

#[test]
fn a_header_past_the_head_limit_is_431() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = send(
        fg.addr,
        &head_cut_at_the_limit("GET / HTTP/1.1\r\n", "x-big"),
    );
    assert_eq!(res.status, 431, "{res:?}");
    assert_eq!(up.requests(), 0);
}

#[test]
fn more_than_96_headers_is_431() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let names: Vec<String> = (0..97).map(|n| format!("x-h{n}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let res = request(fg.addr, "GET", "/", &headers, b"");
    assert_eq!(res.status, 431, "{res:?}");
    assert_eq!(up.requests(), 0);
}

#[test]
fn a_huge_key_header_is_counted_by_its_fingerprint_or_refused_431() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate("1/h")
        .burst(1)
        .env("FLOODGATE_KEY", "header:x-api-key")
        .run();
    // 100 KB: within the head limit, so a key like any other.
    let key = "k".repeat(100_000);
    let res = request(fg.addr, "GET", "/", &[("x-api-key", &key)], b"");
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(up.only().header("x-api-key"), Some(key.as_str()));
    let res = request(fg.addr, "GET", "/", &[("x-api-key", &key)], b"");
    assert_eq!(res.status, 429, "the same huge key, counted");
    let mut other = key.clone();
    other.push('!');
    let res = request(fg.addr, "GET", "/", &[("x-api-key", &other)], b"");
    assert_eq!(res.status, 200, "another huge key has its own budget");

    // Past the head limit: refused before any key is taken.
    let res = send(
        fg.addr,
        &head_cut_at_the_limit("GET / HTTP/1.1\r\n", "x-api-key"),
    );
    assert_eq!(res.status, 431, "{res:?}");
    assert_eq!(up.requests(), 2);
}
