//! What a client can do to floodgate's HTTP/1 connections, and what floodgate
//! does about it: a request head that stalls on a kept-alive connection, a
//! refused body that never ends, `Expect: 100-continue` on a refused and on
//! an allowed upload, and chunked trailers that would hide the next request.
//! Several of these depend on floodgate's patch of actix-http
//! (patches/actix-http/FLOODGATE-PATCH.md) and fail without it.

mod support;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::client::read_response;
use support::{Response, proxy, upstream};

const GENEROUS: &str = "1000000/s";

/// The client timeout every test here runs with.
const CLIENT_TIMEOUT: &str = "1s";

/// How long after the 1 s client timeout a connection may take to close:
/// actix's clock is coarse, the 408 is flushed, and the machine is shared.
const MARGIN: Duration = Duration::from_millis(2500);

/// The earliest a head may time out: actix counts the deadline from its
/// clock that ticks every 500 ms, so a 1 s timeout can end after 0.5 s.
const EARLIEST: Duration = Duration::from_millis(400);

/// Socket timeout on every read and write: past it, floodgate hung.
const HUNG: Duration = Duration::from_secs(8);

// === helpers ===

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_read_timeout(Some(HUNG)).unwrap();
    stream.set_write_timeout(Some(HUNG)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until floodgate closes the connection and returns what came, or
/// panics if it is still open after [`HUNG`].
fn until_closed(reader: &mut impl Read, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return got;
            }
            Err(e) => panic!(
                "{what}: the connection is still open after {HUNG:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Asserts that whatever came before the close is at most a `408`.
fn assert_408_or_nothing(got: &[u8], what: &str) {
    let text = String::from_utf8_lossy(got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 408 "),
        "{what}: only a 408 may precede the close, got {text:?}"
    );
}

/// A kept-alive connection on which one request was answered.
fn kept_alive(addr: SocketAddr, path: &str) -> (TcpStream, BufReader<TcpStream>) {
    let stream = connect(addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    write!(&stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let res = read_response(&mut reader, false).expect("the first answer");
    assert_eq!(res.status, 200, "{}", res.text());
    assert_ne!(res.header("connection"), Some("close"), "kept alive");
    (stream, reader)
}

/// floodgate in front of `up` that has already let one request through a
/// limit of 1 per hour, so the next request from 127.0.0.1 is refused.
fn spent_proxy(up: SocketAddr) -> support::Proxy {
    let fg = proxy(up)
        .rate("1/h")
        .burst(1)
        .env("FLOODGATE_CLIENT_TIMEOUT", CLIENT_TIMEOUT)
        .run();
    assert_eq!(support::get(fg.addr, "/spend").status, 200);
    fg
}

/// Sends a stalled second head (one byte, then nothing) on a kept-alive
/// connection to `addr` and asserts floodgate closes it after the client
/// timeout.
fn stalled_second_head_is_closed(addr: SocketAddr, path: &str, what: &str) {
    let (stream, mut reader) = kept_alive(addr, path);
    let start = Instant::now();
    (&stream).write_all(b"G").unwrap();
    let got = until_closed(&mut reader, what);
    let took = start.elapsed();
    assert_408_or_nothing(&got, what);
    assert!(
        took >= EARLIEST && took < Duration::from_secs(1) + MARGIN,
        "{what}: closed about 1 s after the head began, took {took:?}"
    );
}

// === every request head has a deadline ===

#[test]
fn a_second_request_head_that_stalls_on_a_kept_alive_connection_is_closed() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_CLIENT_TIMEOUT", CLIENT_TIMEOUT)
        .run();
    stalled_second_head_is_closed(fg.addr, "/first", "client listener");
    assert_eq!(up.requests(), 1);
}

#[test]
fn a_second_request_head_that_stalls_on_the_admin_listener_is_closed() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_CLIENT_TIMEOUT", CLIENT_TIMEOUT)
        .run();
    stalled_second_head_is_closed(fg.admin, "/healthz", "admin listener");
}

#[test]
fn a_second_request_head_trickled_a_byte_at_a_time_is_closed() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_CLIENT_TIMEOUT", CLIENT_TIMEOUT)
        .run();
    let (stream, _reader) = kept_alive(fg.addr, "/first");
    // Every byte comes well within any idle timeout; the head as a whole
    // never completes.
    let head = b"GET /second HTTP/1.1\r\nX-Padding: "
        .iter()
        .chain([b'p'; 200].iter());
    stream
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    let closed = 'trickle: {
        for &byte in head {
            if (&stream).write_all(&[byte]).is_err() {
                break 'trickle true;
            }
            // Pacing the deliberately slow client; also notices the close.
            let mut buf = [0; 512];
            match (&stream).read(&mut buf) {
                Ok(0) => break 'trickle true,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break 'trickle true,
            }
            if start.elapsed() > Duration::from_secs(1) + MARGIN {
                break 'trickle false;
            }
        }
        false
    };
    let took = start.elapsed();
    assert!(
        closed,
        "a head trickled for {took:?} is still being read (client timeout 1 s)"
    );
    assert_408_or_nothing(&answer, "trickled head");
    assert!(took >= EARLIEST, "closed too early: {took:?}");
    assert_eq!(
        up.requests(),
        1,
        "the trickled request never reaches the upstream"
    );
}

#[test]
fn an_idle_kept_alive_connection_outlives_the_client_timeout() {
    // The client timeout bounds a head once it has begun, not the pause
    // between requests (that is keep-alive's).
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_CLIENT_TIMEOUT", CLIENT_TIMEOUT)
        .run();
    let (stream, mut reader) = kept_alive(fg.addr, "/first");
    // A deliberately idle client, for longer than the client timeout.
    std::thread::sleep(Duration::from_millis(1500));
    write!(&stream, "GET /second HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let res = read_response(&mut reader, false).expect("the second answer");
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(up.requests(), 2);
}

// === a refused body cannot hold the connection ===

#[test]
fn a_refused_upload_whose_body_never_ends_is_answered_then_closed() {
    let up = upstream().run();
    let fg = spent_proxy(up.addr());
    for (framing, head, piece) in [
        (
            "chunked",
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            &b"5\r\nhello\r\n"[..],
        ),
        (
            "sized",
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
            &b"hello"[..],
        ),
    ] {
        let stream = connect(fg.addr);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        (&stream).write_all(head.as_bytes()).unwrap();
        // The body keeps coming, a piece every 50 ms, for as long as
        // floodgate takes it (bounded at 20 s).
        let writer = stream.try_clone().unwrap();
        let piece = piece.to_vec();
        let uploading = std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if (&writer).write_all(&piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let res = read_response(&mut reader, false)
            .unwrap_or_else(|e| panic!("{framing}: no answer: {e}"));
        assert_eq!(res.status, 429, "{framing}: {}", res.text());
        assert_eq!(
            res.header("connection"),
            Some("close"),
            "{framing}: the unread body ends the connection"
        );
        let start = Instant::now();
        let after = until_closed(&mut reader, framing);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{framing}: closed soon after the 429, took {:?}",
            start.elapsed()
        );
        assert!(
            after.is_empty(),
            "{framing}: nothing after the 429: {after:?}"
        );
        let _ = stream.shutdown(std::net::Shutdown::Both);
        uploading.join().unwrap();
    }
    assert_eq!(up.requests(), 1, "only the request that spent the limit");
}

// === Expect: 100-continue ===

/// Reads one response, interim ones included.
fn next_response(reader: &mut impl BufRead, what: &str) -> Response {
    read_response(reader, false).unwrap_or_else(|e| panic!("{what}: no answer: {e}"))
}

#[test]
fn a_refused_request_expecting_100_continue_gets_its_429_without_a_100() {
    let up = upstream().run();
    let fg = spent_proxy(up.addr());
    let stream = connect(fg.addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    (&stream)
        .write_all(
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    // The client waits for the invitation and sends nothing more.
    let res = next_response(&mut reader, "refused expectation");
    assert_eq!(
        res.status, 429,
        "the refusal comes first, with no 100 Continue: {} {:?}",
        res.status, res.headers
    );
    assert_eq!(res.header("connection"), Some("close"));
    let after = until_closed(&mut reader, "refused expectation");
    assert!(after.is_empty(), "nothing after the 429: {after:?}");
    assert_eq!(up.requests(), 1, "only the request that spent the limit");
}

#[test]
fn an_allowed_request_expecting_100_continue_is_invited_and_forwarded_whole() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    for (framing, head, wire) in [
        (
            "sized",
            format!(
                "PUT /sized HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            ),
            body.clone(),
        ),
        (
            "chunked",
            "PUT /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
                .to_owned(),
            [
                format!("{:x}\r\n", body.len()).as_bytes(),
                &body,
                b"\r\n0\r\n\r\n",
            ]
            .concat(),
        ),
    ] {
        let stream = connect(fg.addr);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        (&stream).write_all(head.as_bytes()).unwrap();
        // Like curl, the client holds the body back until invited.
        let interim = next_response(&mut reader, framing);
        assert_eq!(interim.status, 100, "{framing}: {:?}", interim.headers);
        (&stream).write_all(&wire).unwrap();
        let res = next_response(&mut reader, framing);
        assert_eq!(res.status, 200, "{framing}: {}", res.text());
    }
    let recorded = up.recorded();
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    for rec in recorded {
        assert!(rec.body == body, "{}: the upstream got every byte", rec.uri);
        assert_eq!(rec.header("expect"), None, "{}", rec.uri);
    }
}

// === chunked framing ===

#[test]
fn a_bare_lf_in_chunked_trailers_is_refused_and_hides_no_request() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    for (what, trailers) in [
        ("a trailer line ending in LF", "X-Trailer: y\n"),
        ("a trailer section ending in LF", "\n"),
    ] {
        let stream = connect(fg.addr);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        // A front end that takes a bare LF as a line end sees two requests
        // here; a back end that skips it sees one with the second inside its
        // trailers.
        write!(
            &stream,
            "POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n{trailers}\
             GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        let res = next_response(&mut reader, what);
        assert_eq!(res.status, 400, "{what}: {}", res.text());
        assert_eq!(res.header("connection"), Some("close"), "{what}");
        let after = until_closed(&mut reader, what);
        assert!(
            after.is_empty(),
            "{what}: no answer to a request hidden after the bad trailers: {:?}",
            String::from_utf8_lossy(&after)
        );
    }
    let recorded = up.recorded();
    assert!(
        recorded.is_empty(),
        "neither request is passed on: {recorded:#?}"
    );
}

#[test]
fn proper_chunked_trailers_still_end_the_body() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let stream = connect(fg.addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    write!(
        &stream,
        "POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\nX-Checksum: abc\tdef\r\n\r\n\
         GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    for path in ["/first", "/second"] {
        let res = next_response(&mut reader, path);
        assert_eq!(res.status, 200, "{path}: {}", res.text());
    }
    let uris: Vec<_> = up.recorded().into_iter().map(|r| (r.uri, r.body)).collect();
    assert_eq!(
        uris,
        [
            ("/first".to_owned(), b"hello".to_vec()),
            ("/second".to_owned(), Vec::new())
        ]
    );
}
