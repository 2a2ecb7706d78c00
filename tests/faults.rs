//! Upstream and client faults: refused, reset and silent upstreams, truncated
//! and stalled bodies, slow clients. Every wait is bounded, and a failure must
//! reach the client as a status (502, 504, 408) or as a connection closed
//! before the body is complete: never a hang, never a body that looks whole.

mod support;

use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use support::client::read_response;
use support::upstream::{RawUpstream, read_head, read_request};
use support::{Response, proxy, raw_upstream, upstream};

const GENEROUS: &str = "1000000/s";

/// Socket timeout for exchanges that should end within a couple of seconds:
/// long enough not to be mistaken for the answer, short enough that a hang
/// fails the test quickly.
const QUICK: Duration = Duration::from_secs(5);

// === helpers ===

/// Connects with `limit` on every read and write.
fn connect(addr: SocketAddr, limit: Duration) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.set_write_timeout(Some(limit)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads one final response (skipping `100 Continue`).
fn read_final(stream: &TcpStream, head_only: bool) -> io::Result<Response> {
    let mut reader = BufReader::new(stream);
    loop {
        let res = read_response(&mut reader, head_only)?;
        if !(100..200).contains(&res.status) {
            return Ok(res);
        }
    }
}

/// Writes `raw` and reads one response with `limit` on every socket wait;
/// returns how long the whole exchange took.
fn exchange(addr: SocketAddr, raw: &[u8], limit: Duration) -> (io::Result<Response>, Duration) {
    let start = Instant::now();
    let stream = connect(addr, limit);
    let result = (&stream)
        .write_all(raw)
        .and_then(|()| read_final(&stream, raw.starts_with(b"HEAD ")));
    (result, start.elapsed())
}

fn get_raw(target: &str) -> Vec<u8> {
    support::client::build("GET", target, &[], b"")
}

/// The error a client sees when the connection was closed under it, as
/// opposed to its own read timeout firing (which would mean a hang).
fn assert_closed(err: &io::Error, what: &str) {
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
        "{what}: expected the connection to be closed, got {:?} ({err}); \
         WouldBlock/TimedOut means floodgate hung",
        err.kind()
    );
}

/// Asserts a truncated response: the client never gets a complete one.
fn assert_truncated(result: io::Result<Response>, what: &str) {
    match result {
        Ok(res) => panic!(
            "{what}: the client got a complete response ({} with {} body bytes) \
             from an upstream that never sent one",
            res.status,
            res.body.len()
        ),
        Err(err) => assert_closed(&err, what),
    }
}

/// Holds a stalled upstream's connection open until released (or 20 s pass,
/// so no thread outlives its test for long). Released on drop.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let guard = open.lock().unwrap();
        let _ = cv
            .wait_timeout_while(guard, Duration::from_secs(20), |open| !*open)
            .unwrap();
    }

    fn open(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// Opens its gate when the test ends, pass or fail.
struct Release(Gate);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// An upstream that reads the request head and then neither answers nor
/// reads on, until the gate opens.
fn silent_upstream() -> (RawUpstream, Release) {
    let gate = Gate::default();
    let held = gate.clone();
    let up = raw_upstream(move |stream| {
        let _ = read_head(&mut BufReader::new(&stream));
        held.wait();
    });
    (up, Release(gate))
}

/// An upstream that reads the request, writes `bytes` and closes.
fn scripted_upstream(bytes: impl Into<Vec<u8>>) -> RawUpstream {
    let bytes = bytes.into();
    raw_upstream(move |mut stream| {
        let _ = read_request(&stream);
        let _ = stream.write_all(&bytes);
    })
}

/// The value of one Prometheus series (`name{labels}`) in a scrape.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

// === refused, reset, garbage ===

#[test]
fn refused_connection_is_a_502_and_floodgate_recovers_when_the_upstream_comes_up() {
    let dead: SocketAddr = format!("127.0.0.1:{}", support::proxy::free_port())
        .parse()
        .unwrap();
    let fg = proxy(dead).rate(GENEROUS).run();

    for attempt in 0..3 {
        let (res, took) = exchange(fg.addr, &get_raw("/down"), QUICK);
        let res = res.unwrap_or_else(|e| panic!("attempt {attempt}: no answer: {e}"));
        assert_eq!(res.status, 502, "attempt {attempt}: {}", res.text());
        assert!(
            res.header("content-type")
                .is_some_and(|v| v.starts_with("text/plain")),
            "{:?}",
            res.headers
        );
        let text = res.text();
        assert!(
            !text.is_empty() && text.len() < 100 && text.lines().count() == 1,
            "a short line of text: {text:?}"
        );
        assert!(
            !text.contains(&dead.port().to_string()) && !text.contains("refused"),
            "no internal detail reaches the client: {text:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "attempt {attempt}: a refused connection is answered at once, took {took:?}"
        );
    }

    // The upstream comes up on the same address: floodgate serves again.
    let listener = TcpListener::bind(dead)
        .unwrap_or_else(|e| panic!("rebinding the freed upstream port {dead}: {e}"));
    let back = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(QUICK)).unwrap();
        let _ = read_request(&stream);
        (&stream)
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nback")
            .unwrap();
    });
    let (res, _) = exchange(fg.addr, &get_raw("/up"), QUICK);
    let res = res.expect("floodgate answers once the upstream is back");
    assert_eq!((res.status, res.text().as_str()), (200, "back"));
    back.join().unwrap();
    assert_eq!(support::get(fg.admin, "/healthz").status, 200);
}

#[test]
fn upstream_closing_resetting_or_speaking_garbage_before_answering_is_a_502() {
    let closes = raw_upstream(|stream| {
        let _ = read_request(&stream);
        // Dropped: FIN without a byte of answer.
    });
    let resets = raw_upstream(|stream| {
        let _ = read_request(&stream);
        // SO_LINGER 0: close sends RST.
        let socket = tokio::net::TcpSocket::from_std_stream(stream);
        socket.set_zero_linger().unwrap();
        drop(socket);
    });
    let garbage = scripted_upstream(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http at all\r\n\r\n");
    for (what, up) in [
        ("closes", &closes),
        ("resets", &resets),
        ("garbage", &garbage),
    ] {
        let fg = proxy(up.addr()).rate(GENEROUS).run();
        let (res, took) = exchange(fg.addr, &get_raw("/"), QUICK);
        let res = res.unwrap_or_else(|e| panic!("upstream {what}: no answer: {e}"));
        assert_eq!(res.status, 502, "upstream {what}: {}", res.text());
        assert!(
            took < Duration::from_secs(3),
            "upstream {what}: answered at once, took {took:?}"
        );
        assert_eq!(up.connections(), 1, "upstream {what}: no retry");
    }
}

// === timeouts ===

#[test]
fn upstream_that_never_answers_is_a_504_after_the_upstream_timeout() {
    let (up, _release) = silent_upstream();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "1s")
        .run();
    let (res, took) = exchange(fg.addr, &get_raw("/never"), QUICK);
    let res = res.expect("a 504, not a closed connection");
    assert_eq!(res.status, 504, "{}", res.text());
    assert!(res.text().starts_with("Gateway Timeout"), "{}", res.text());
    assert!(
        took >= Duration::from_millis(900),
        "504 only after the 1 s timeout, took {took:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "504 soon after the 1 s timeout, took {took:?}"
    );
}

#[test]
fn upstream_stalling_mid_body_closes_the_client_connection_after_the_timeout() {
    for (framing, head) in [
        (
            "sized",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"[..],
        ),
        (
            "chunked",
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n"[..],
        ),
    ] {
        let gate = Gate::default();
        let _release = Release(gate.clone());
        let up = raw_upstream(move |mut stream| {
            let _ = read_request(&stream);
            let _ = stream.write_all(head);
            let _ = stream.write_all(&[b'x'; 100]);
            gate.wait();
        });
        let fg = proxy(up.addr())
            .rate(GENEROUS)
            .env("FLOODGATE_UPSTREAM_TIMEOUT", "1s")
            .run();
        let (res, took) = exchange(fg.addr, &get_raw("/stall"), QUICK);
        assert_truncated(res, &format!("{framing} body stalled"));
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{framing}: closed about 1 s after the body stalled, took {took:?}"
        );
    }
}

#[test]
fn client_stalling_mid_body_gets_408_after_the_client_timeout() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_CLIENT_TIMEOUT", "1s")
        .run();
    let start = Instant::now();
    let stream = connect(fg.addr, QUICK);
    (&stream)
        .write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .unwrap();
    // ...and nothing more, with the connection left open.
    let result = read_final(&stream, false);
    let took = start.elapsed();
    match result {
        Ok(res) => {
            assert_eq!(res.status, 408, "{}", res.text());
            assert_eq!(
                res.header("connection"),
                Some("close"),
                "the rest of the body is never coming: the connection closes"
            );
        }
        Err(err) => assert_closed(&err, "client stalled"),
    }
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "ended about 1 s after the client stalled, took {took:?}"
    );
    assert_eq!(
        up.requests(),
        0,
        "the upstream never takes 10 of 100 bytes for a whole request"
    );
}

#[test]
fn large_upload_to_an_upstream_that_never_reads_it_ends_within_seconds() {
    let (up, _release) = silent_upstream();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "1s")
        .run();
    const LEN: usize = 16 << 20;
    let start = Instant::now();
    let stream = connect(fg.addr, Duration::from_secs(8));
    let mut writer = stream.try_clone().unwrap();
    let uploading = std::thread::spawn(move || -> io::Result<()> {
        write!(
            writer,
            "PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\nConnection: close\r\n\r\n"
        )?;
        let block = vec![b'u'; 1 << 20];
        for _ in 0..LEN / block.len() {
            writer.write_all(&block)?;
        }
        Ok(())
    });
    let result = read_final(&stream, false);
    let took = start.elapsed();
    // Unblocks the upload if it is still waiting on a full socket.
    let _ = stream.shutdown(Shutdown::Both);
    let _ = uploading.join().unwrap();
    match result {
        Ok(res) => assert_eq!(res.status, 504, "{}", res.text()),
        Err(err) => assert_closed(&err, "upload never read"),
    }
    assert!(
        took < Duration::from_secs(5),
        "ended within seconds of the upstream stalling, took {took:?}"
    );
}

#[test]
fn slow_upload_that_keeps_flowing_outlasts_every_timeout() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "2s")
        .env("FLOODGATE_CLIENT_TIMEOUT", "2s")
        .run();
    const CHUNKS: usize = 15;
    const CHUNK: usize = 1000;
    let body: Vec<u8> = (0..CHUNKS * CHUNK).map(|i| (i * 7 % 251) as u8).collect();
    let start = Instant::now();
    let stream = connect(fg.addr, Duration::from_secs(10));
    write!(
        &stream,
        "POST /slow-upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    for (i, chunk) in body.chunks(CHUNK).enumerate() {
        if i > 0 {
            // Pacing a deliberately slow client.
            std::thread::sleep(Duration::from_millis(400));
        }
        (&stream).write_all(chunk).unwrap();
    }
    let res = read_final(&stream, false).expect("an answer to the slow upload");
    assert!(
        start.elapsed() > Duration::from_secs(5),
        "the upload must outlast the 2 s timeouts and the 5 s defaults to prove anything"
    );
    assert_eq!(res.status, 200, "{}", res.text());
    let rec = up.only();
    assert_eq!(rec.body.len(), body.len());
    assert!(rec.body == body, "the upstream got every byte, in order");
}

// === truncation ===

/// An upstream answering `answer` and closing: the client must see the
/// connection close before the body is complete.
fn assert_cut_reaches_the_client_cut(what: &str, answer: Vec<u8>) {
    let up = scripted_upstream(answer);
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let (res, took) = exchange(fg.addr, &get_raw("/truncated"), QUICK);
    assert_truncated(res, what);
    assert!(took < Duration::from_secs(3), "{what}: took {took:?}");
}

#[test]
fn sized_upstream_body_cut_short_reaches_the_client_truncated() {
    assert_cut_reaches_the_client_cut(
        "Content-Length 1000, 500 sent",
        [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"[..],
            &[b'a'; 500],
        ]
        .concat(),
    );
}

#[test]
fn chunked_upstream_body_cut_mid_chunk_reaches_the_client_truncated() {
    assert_cut_reaches_the_client_cut(
        "chunked, 0x3e8-byte chunk cut after 500 bytes",
        [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"[..],
            &[b'b'; 500],
        ]
        .concat(),
    );
}

#[test]
fn chunked_upstream_body_cut_before_the_last_chunk_reaches_the_client_truncated() {
    assert_cut_reaches_the_client_cut(
        "chunked, closed before the last chunk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
    );
}

// === metrics ===

#[test]
fn upstream_failures_are_counted_in_metrics() {
    let gate = Gate::default();
    let _release = Release(gate.clone());
    let up = raw_upstream(move |stream| {
        let head = read_head(&mut BufReader::new(&stream));
        if !head.starts_with("GET /close ") {
            gate.wait();
        }
    });
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "1s")
        .run();
    let (res, _) = exchange(fg.addr, &get_raw("/close"), QUICK);
    assert_eq!(res.expect("a 502").status, 502);
    let (res, _) = exchange(fg.addr, &get_raw("/stall"), QUICK);
    assert_eq!(res.expect("a 504").status, 504);

    let scrape = support::get(fg.admin, "/metrics");
    assert_eq!(scrape.status, 200);
    let text = scrape.text();
    assert_eq!(
        metric(&text, "floodgate_upstream_errors_total{kind=\"closed\"}"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric(&text, "floodgate_upstream_errors_total{kind=\"timeout\"}"),
        Some(1),
        "{text}"
    );
}

// === strict framing of answers ===

#[test]
fn answers_with_ambiguous_framing_are_a_502_and_never_pooled() {
    for (what, answer) in [
        (
            "signed length",
            &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"[..],
        ),
        (
            "length with a space inside",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\nhello",
        ),
        (
            "length and chunked",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "gzip, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "gzip alone",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "chunked twice",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let answer = answer.to_vec();
        // Answers every request on a connection the same way, keeping it open.
        let up = raw_upstream(move |stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut stream = stream;
            while !read_head(&mut reader).is_empty() {
                if stream.write_all(&answer).is_err() {
                    return;
                }
            }
        });
        let fg = proxy(up.addr())
            .rate(GENEROUS)
            .env("FLOODGATE_WORKERS", "1")
            .run();
        for i in 0..2 {
            let (res, _) = exchange(fg.addr, &get_raw("/"), QUICK);
            let res = res.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
            assert_eq!(res.status, 502, "{what}, request {i}: {}", res.text());
        }
        assert_eq!(up.connections(), 2, "{what}: the connection is not reused");
    }
}
