//! Forwarding fidelity: what the client sends is what the upstream gets, and
//! back, minus hop-by-hop headers, plus X-Forwarded-*.

mod support;

use support::{Reply, proxy, request, send, upstream};

const GENEROUS: &str = "1000000/s";

#[test]
fn every_method_path_and_query_arrive_unchanged() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let methods = [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PURGE",
    ];
    for method in methods {
        let target = "/some/path%20x/?q=1&q=2&empty=&utf=%C3%A9#frag-is-not-sent";
        let sent_target = target.split('#').next().unwrap();
        let res = request(fg.addr, method, sent_target, &[], b"");
        assert_eq!(res.status, 200, "{method}");
    }
    let recorded = up.recorded();
    assert_eq!(recorded.len(), methods.len());
    for (rec, method) in recorded.iter().zip(methods) {
        assert_eq!(rec.method, method);
        assert_eq!(rec.uri, "/some/path%20x/?q=1&q=2&empty=&utf=%C3%A9");
    }
}

#[test]
fn end_to_end_headers_arrive_and_hop_by_hop_ones_do_not() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(
        fg.addr,
        "GET",
        "/",
        &[
            ("Host", "app.example"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Authorization", "Bearer secret"),
            ("Cookie", "a=1; b=2"),
            ("Connection", "keep-alive, X-Per-Hop"),
            ("X-Per-Hop", "must go"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Authenticate", "Basic"),
        ],
        b"",
    );
    assert_eq!(res.status, 200);
    let rec = up.only();
    assert_eq!(
        rec.header("host"),
        Some("app.example"),
        "the client's Host is passed on"
    );
    assert_eq!(rec.header_all("x-custom"), vec!["one", "two"]);
    assert_eq!(rec.header("authorization"), Some("Bearer secret"));
    assert_eq!(rec.header("cookie"), Some("a=1; b=2"));
    for gone in [
        "x-per-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        assert_eq!(rec.header(gone), None, "{gone} must not reach the upstream");
    }
    assert!(
        rec.header_all("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-per-hop")),
        "{:?}",
        rec.headers
    );
}

/// What the upstream receives for `GET /` with `headers`, sent through a
/// floodgate that trusts no proxy.
fn upstream_sees(headers: &[(&str, &str)]) -> support::upstream::Recorded {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    request(fg.addr, "GET", "/", headers, b"");
    up.only()
}

#[test]
fn forwarded_headers_are_set() {
    let rec = upstream_sees(&[
        ("Host", "app.example:8443"),
        ("X-Forwarded-For", "198.51.100.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
    ]);
    // The peer is not a trusted proxy, so its claims are replaced.
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-host"), Some("app.example:8443"));
}

#[test]
fn forwarded_for_is_appended_for_trusted_proxies() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.0/8")
        .run();
    request(
        fg.addr,
        "GET",
        "/",
        &[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-For", "10.1.2.3"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
        ],
        b"",
    );
    let rec = up.only();
    assert_eq!(
        rec.header("x-forwarded-for"),
        Some("203.0.113.9, 10.1.2.3, 127.0.0.1")
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert_eq!(rec.header("x-forwarded-host"), Some("public.example"));
}

#[test]
fn host_header_can_be_the_upstreams() {
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_HOST_HEADER", "upstream")
        .run();
    request(fg.addr, "GET", "/", &[("Host", "app.example")], b"");
    assert_eq!(
        up.only().header("host"),
        Some(up.addr().to_string().as_str())
    );
}

#[test]
fn status_headers_every_set_cookie_and_body_come_back() {
    let up = upstream()
        .route_fn("/teapot", |_| {
            Reply::ok(b"\x00\x01binary\xffbody".to_vec())
                .status(418)
                .header("Set-Cookie", "a=1; Path=/")
                .header("Set-Cookie", "b=2; HttpOnly")
                .header("Set-Cookie", "c=3")
                .header("X-Upstream", "yes")
                .header("Content-Type", "application/x-tea")
                .header("Cache-Control", "no-store")
        })
        .run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "GET", "/teapot", &[], b"");
    assert_eq!(res.status, 418);
    assert_eq!(
        res.header_all("set-cookie"),
        vec!["a=1; Path=/", "b=2; HttpOnly", "c=3"]
    );
    assert_eq!(res.header("x-upstream"), Some("yes"));
    assert_eq!(res.header("content-type"), Some("application/x-tea"));
    assert_eq!(res.header("cache-control"), Some("no-store"));
    assert_eq!(res.body, b"\x00\x01binary\xffbody");
    assert!(
        res.header("ratelimit").is_some(),
        "allowed responses carry rate-limit headers"
    );
}

#[test]
fn response_without_content_type_gets_none_added() {
    let up = raw_bare_upstream();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "GET", "/", &[], b"");
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), None, "{:?}", res.headers);
    assert_eq!(res.body, b"bare");
}

fn raw_bare_upstream() -> support::upstream::RawUpstream {
    support::raw_upstream(|stream| {
        use std::io::Write;
        let _ = support::upstream::read_request(&stream);
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=3\r\n\r\nbare");
    })
}

#[test]
fn hop_by_hop_response_headers_are_stripped() {
    let up = raw_bare_upstream();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "GET", "/", &[], b"");
    assert_eq!(res.header("x-hop"), None);
    assert_eq!(res.header("keep-alive"), None);
}

#[test]
fn request_bodies_arrive_byte_for_byte() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let res = request(
        fg.addr,
        "POST",
        "/upload",
        &[("Content-Type", "application/octet-stream")],
        &body,
    );
    assert_eq!(res.status, 200);
    let rec = up.only();
    assert_eq!(rec.body, body);
    assert_eq!(
        rec.header("content-length"),
        Some("200000"),
        "a sized body stays sized"
    );
    assert_eq!(rec.header("transfer-encoding"), None);
}

#[test]
fn chunked_request_bodies_arrive_whole() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let raw = b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let res = send(fg.addr, raw);
    assert_eq!(res.status, 200);
    assert_eq!(up.only().body, b"hello world");
}

#[test]
fn bodiless_requests_stay_bodiless() {
    let up = raw_recording_upstream();
    let fg = proxy(up.0.addr()).rate(GENEROUS).run();
    request(fg.addr, "GET", "/", &[], b"");
    let head = up.1.recv().unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("content-length"), "{head}");
    assert!(!lower.contains("transfer-encoding"), "{head}");
    assert!(
        !lower.contains("user-agent"),
        "no default headers are added:\n{head}"
    );
}

fn raw_recording_upstream() -> (
    support::upstream::RawUpstream,
    std::sync::mpsc::Receiver<String>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let up = support::raw_upstream(move |stream| {
        use std::io::Write;
        let (head, _) = support::upstream::read_request(&stream);
        let _ = tx.lock().unwrap().send(head);
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    (up, rx)
}

#[test]
fn head_keeps_the_upstreams_content_length() {
    let up = upstream().route("/doc", "twelve bytes").run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "HEAD", "/doc", &[], b"");
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-length"), Some("12"));
    assert!(res.body.is_empty());
}

#[test]
fn no_content_and_not_modified_have_no_body() {
    let up = upstream()
        .route_fn("/204", |_| Reply::ok(Vec::new()).status(204))
        .route_fn("/304", |_| {
            Reply::ok(Vec::new()).status(304).header("ETag", "\"v1\"")
        })
        .run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "GET", "/204", &[], b"");
    assert_eq!(res.status, 204);
    let res = request(fg.addr, "GET", "/304", &[("If-None-Match", "\"v1\"")], b"");
    assert_eq!(res.status, 304);
    assert_eq!(res.header("etag"), Some("\"v1\""));
}

#[test]
fn keep_alive_clients_get_many_answers_on_one_connection() {
    use std::io::{BufReader, Write};
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let mut stream = support::client::connect(fg.addr);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..5 {
        write!(stream, "GET /ka/{i} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let res = support::client::read_response(&mut reader, false).unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(res.body, b"ok");
    }
    assert_eq!(up.requests(), 5);
}

#[test]
fn expect_continue_uploads_work() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(
        fg.addr,
        "PUT",
        "/e",
        &[("Expect", "100-continue")],
        b"payload",
    );
    assert_eq!(res.status, 200);
    let rec = up.only();
    assert_eq!(rec.body, b"payload");
    assert_eq!(
        rec.header("expect"),
        None,
        "floodgate answers the expectation itself"
    );
}

/// An upstream answering every request on a connection with `answer`, then
/// closing it after `per_connection` answers.
fn scripted_upstream(
    answer: &'static [u8],
    per_connection: usize,
) -> support::upstream::RawUpstream {
    support::raw_upstream(move |stream| {
        use std::io::{BufReader, Write};
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        for _ in 0..per_connection {
            let head = support::upstream::read_head(&mut reader);
            if head.is_empty() {
                return;
            }
            if stream.write_all(answer).is_err() {
                return;
            }
        }
    })
}

/// Status and body a client gets through floodgate when the upstream
/// answers one request with `answer`.
fn relayed(answer: &'static [u8]) -> (u16, String) {
    let up = scripted_upstream(answer, 1);
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let res = request(fg.addr, "GET", "/", &[], b"");
    (res.status, res.text())
}

#[test]
fn a_body_delimited_by_connection_close_arrives_whole() {
    assert_eq!(
        relayed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstreamed until the end"),
        (200, "streamed until the end".to_owned())
    );
}

#[test]
fn http_1_0_upstreams_work() {
    assert_eq!(
        relayed(b"HTTP/1.0 200 OK\r\n\r\nold school"),
        (200, "old school".to_owned())
    );
}

#[test]
fn interim_answers_are_not_relayed() {
    assert_eq!(
        relayed(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
        ),
        (200, "final".to_owned())
    );
}

#[test]
fn an_idle_connection_the_upstream_closed_is_not_a_502() {
    // Keep-alive answers, but the upstream closes each connection after one
    // exchange without saying so: the pooled connection is dead when reused.
    let up = scripted_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1);
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    for i in 0..5 {
        let res = request(fg.addr, "GET", "/", &[], b"");
        assert_eq!(res.status, 200, "request {i}");
        assert_eq!(res.text(), "ok");
    }
}

#[test]
fn upstream_connections_are_reused() {
    let up = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        usize::MAX,
    );
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_WORKERS", "1")
        .run();
    for _ in 0..20 {
        assert_eq!(request(fg.addr, "GET", "/", &[], b"").status, 200);
    }
    assert_eq!(
        up.connections(),
        1,
        "one keep-alive connection served every request"
    );
}

#[test]
fn upgrade_websocket_without_a_proper_handshake_cannot_smuggle_requests() {
    // actix-http reads the body of any `Upgrade: websocket` request until the
    // connection closes; forwarded as an ordinary request, the bytes after it
    // would reach the upstream as more requests nobody counted.
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let attacks: [&[u8]; 3] = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 5\r\n\r\nhelloDELETE /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for raw in attacks {
        let res = support::try_send(fg.addr, raw);
        if let Ok(res) = &res {
            assert_eq!(res.status, 400, "{}", res.text());
        }
    }
    let seen: Vec<String> = up.recorded().into_iter().map(|r| r.uri).collect();
    assert!(
        seen.iter().all(|uri| uri != "/smuggled"),
        "smuggled: {seen:?}"
    );
    assert!(seen.is_empty(), "nothing reached the upstream: {seen:?}");
}

#[test]
fn a_post_on_a_connection_the_upstream_closed_while_idle_still_arrives() {
    // Answers keep-alive, then closes after 300 ms idle (gunicorn's default is
    // 2 s): the pooled connection is dead when the next request comes.
    let up = support::raw_upstream(|stream| {
        use std::io::{BufReader, Read, Write};
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        loop {
            let head = support::upstream::read_head(&mut reader);
            if head.is_empty() {
                return; // idle timeout or EOF: close
            }
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_WORKERS", "1")
        .run();
    assert_eq!(request(fg.addr, "GET", "/", &[], b"").status, 200);
    std::thread::sleep(std::time::Duration::from_millis(600)); // the upstream closes meanwhile
    let res = request(fg.addr, "POST", "/", &[], b"payload");
    assert_eq!(res.status, 200, "{}", res.text());
}

#[test]
fn an_early_answer_to_an_upload_is_relayed() {
    // The upstream refuses a large upload after its head, without reading it.
    let up = support::raw_upstream(|stream| {
        use std::io::{BufReader, Write};
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let _ = support::upstream::read_head(&mut reader);
        let mut stream = stream;
        let _ = stream.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Keep reading (and dropping) a while, as servers that answer early do,
        // so the answer is not lost to a reset.
        let _ = std::io::copy(
            &mut std::io::Read::take(reader, 64 << 20),
            &mut std::io::sink(),
        );
    });
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let body = vec![b'x'; 8 << 20];
    let res = support::try_send(
        fg.addr,
        &support::client::build("POST", "/upload", &[], &body),
    );
    let res = res.expect("an answer");
    assert_eq!(res.status, 413, "{}", res.text());
    assert_eq!(res.text(), "too big\n");
}

#[test]
fn client_claims_about_forwarding_and_underscore_headers_are_not_passed_on() {
    let rec = upstream_sees(&[
        ("Forwarded", "for=6.6.6.6;proto=https"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X_Api_Key", "other"),
        ("X-Api-Key", "mine"),
    ]);
    assert_eq!(rec.header("forwarded"), None);
    assert_eq!(rec.header("x-real-ip"), None);
    assert_eq!(rec.header("x_forwarded_for"), None);
    assert_eq!(rec.header("x_api_key"), None);
    assert_eq!(rec.header("x-api-key"), Some("mine"));

    let up = upstream().run();
    let trusting = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1")
        .run();
    request(
        trusting.addr,
        "GET",
        "/t",
        &[("Forwarded", "for=192.0.2.1"), ("X-Real-IP", "192.0.2.1")],
        b"",
    );
    let rec = up.recorded().into_iter().find(|r| r.uri == "/t").unwrap();
    assert_eq!(
        rec.header("forwarded"),
        Some("for=192.0.2.1"),
        "a trusted proxy's header stays"
    );
    assert_eq!(rec.header("x-real-ip"), Some("192.0.2.1"));
}

// === what one client can do to the next (pooled connections) ===

/// Reads request heads off one upstream connection until EOF; `answer`
/// writes the answer to each (it gets the head's first line) and says
/// whether to go on.
fn serve_heads(
    stream: std::net::TcpStream,
    mut answer: impl FnMut(&str, &mut std::net::TcpStream) -> bool,
) {
    use std::io::BufReader;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let head = support::upstream::read_head(&mut reader);
        let Some(line) = head.lines().next() else {
            return;
        };
        if !answer(line, &mut stream) {
            return;
        }
    }
}

/// An answer whose body is the request's target.
fn echo_target(line: &str, stream: &mut std::net::TcpStream) -> bool {
    use std::io::Write;
    let target = line.split(' ').nth(1).unwrap_or("?");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{target}",
        target.len()
    )
    .is_ok()
}

#[test]
fn a_second_answer_sent_after_a_head_never_reaches_the_next_client() {
    use std::sync::mpsc;
    use std::time::Duration;
    // The upstream answers HEAD, then (once told to) writes a second,
    // unasked-for answer on the same connection.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (written_tx, written_rx) = mpsc::channel::<()>();
    let go = std::sync::Mutex::new(go_rx);
    let written = std::sync::Mutex::new(written_tx);
    let up = support::raw_upstream(move |stream| {
        // "Written" must mean sent, not held back by Nagle until the next
        // request's ACK (a stray answer still in flight when the next request
        // goes out cannot be told from that request's answer).
        stream.set_nodelay(true).unwrap();
        serve_heads(stream, |line, stream| {
            use std::io::Write;
            if !line.starts_with("HEAD ") {
                return echo_target(line, stream);
            }
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                .is_err()
            {
                return false;
            }
            let told = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
            let ok = told.is_ok()
                && stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
                    .is_ok();
            let _ = written.lock().unwrap().send(());
            ok
        })
    });
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_WORKERS", "1")
        .run();
    for i in 0..3 {
        let res = request(fg.addr, "HEAD", "/head", &[], b"");
        assert_eq!(res.status, 200, "round {i}");
        go_tx.send(()).unwrap();
        written_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream wrote its stray answer");
        let next = format!("/next/{i}");
        let res = request(fg.addr, "GET", &next, &[], b"");
        assert_eq!(
            (res.status, res.text()),
            (200, next),
            "round {i}: the next client gets its own answer"
        );
    }
}

#[test]
fn idle_connections_the_upstream_writes_to_or_closes_are_dropped_at_once() {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    for misbehaviour in ["stray bytes", "close"] {
        // Once its answer is in (and its connection back in the pool), the
        // upstream writes bytes nobody asked for, or closes its side, and
        // reports how soon floodgate closed the connection. No request
        // follows that could find out at checkout.
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go = std::sync::Mutex::new(go_rx);
        let (tx, rx) = mpsc::channel::<Option<Duration>>();
        let tx = std::sync::Mutex::new(tx);
        let up = support::raw_upstream(move |stream| {
            let _ = support::upstream::read_request(&stream);
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            let _ = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
            let start = Instant::now();
            if misbehaviour == "close" {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            } else {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx");
            }
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let closed = matches!(stream.read(&mut [0; 64]), Ok(0) | Err(_))
                && start.elapsed() < Duration::from_secs(5);
            let _ = tx.lock().unwrap().send(closed.then(|| start.elapsed()));
        });
        let fg = proxy(up.addr()).rate(GENEROUS).run();
        // The whole answer reached the client, so its connection is pooled.
        assert_eq!(request(fg.addr, "GET", "/", &[], b"").text(), "ok");
        go_tx.send(()).unwrap();
        let closed = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream reports");
        assert!(
            closed.is_some_and(|after| after < Duration::from_secs(1)),
            "{misbehaviour}: floodgate kept an idle connection that turned readable ({closed:?})"
        );
    }
}

#[test]
fn an_unasked_for_101_is_a_502_and_the_connection_is_closed() {
    let up = scripted_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        usize::MAX,
    );
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_WORKERS", "1")
        .run();
    for i in 0..2 {
        let res = request(fg.addr, "GET", "/plain", &[], b"");
        assert_eq!(res.status, 502, "request {i}: {}", res.text());
    }
    assert_eq!(up.connections(), 2, "the connection is never reused");
}

#[test]
fn requests_with_a_body_go_with_connection_close_unless_reuse_is_enabled() {
    let (up, heads) = raw_recording_upstream();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_WORKERS", "1")
        .run();
    for (method, body) in [("POST", &b"payload"[..]), ("PUT", b"x"), ("GET", b"")] {
        assert_eq!(request(fg.addr, method, "/", &[], body).status, 200);
        let head = heads.recv().unwrap().to_ascii_lowercase();
        assert_eq!(
            head.contains("\r\nconnection: close\r\n"),
            !body.is_empty(),
            "{method}:\n{head}"
        );
    }
    let chunked = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    assert_eq!(send(fg.addr, chunked).status, 200);
    let head = heads.recv().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");

    // An upstream that keeps every connection open: a POST's connection is
    // still never reused, unless the operator says so.
    for (reuse, connections) in [("false", 5), ("true", 1)] {
        let up = scripted_upstream(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            usize::MAX,
        );
        let fg = proxy(up.addr())
            .rate(GENEROUS)
            .env("FLOODGATE_WORKERS", "1")
            .env("FLOODGATE_UPSTREAM_REUSE_AFTER_BODY", reuse)
            .run();
        for _ in 0..5 {
            assert_eq!(request(fg.addr, "POST", "/", &[], b"body").status, 200);
        }
        assert_eq!(up.connections(), connections, "reuse after body: {reuse}");
    }
}

#[test]
fn an_upstream_that_ignores_a_body_cannot_run_it_as_requests() {
    use std::sync::mpsc;
    use std::time::Duration;
    // A CL.0 upstream: it answers without reading the body and takes the
    // body's bytes for the next request, unless told `Connection: close`.
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    let tx = std::sync::Mutex::new(tx);
    let up = support::raw_upstream(move |stream| {
        use std::io::{BufReader, Write};
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let mut seen = Vec::new();
        loop {
            let head = support::upstream::read_head(&mut reader);
            let Some(line) = head.lines().next() else {
                break;
            };
            seen.push(line.split(' ').nth(1).unwrap_or("?").to_owned());
            let _ = echo_target(line, &mut stream);
            if head
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n")
            {
                break;
            }
        }
        let _ = stream.flush();
        let _ = tx.lock().unwrap().send(seen);
    });
    let fg = proxy(up.addr())
        .rate("1/h")
        .env("FLOODGATE_WORKERS", "1")
        .run();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50);
    let res = request(fg.addr, "POST", "/counted", &[], smuggled.as_bytes());
    assert_eq!((res.status, res.text().as_str()), (200, "/counted"));
    let seen = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream connection ends");
    assert_eq!(seen, vec!["/counted"], "the body ran as requests");
    let res = request(fg.addr, "GET", "/later", &[], b"");
    assert_eq!(res.status, 429, "one request an hour: {}", res.text());
}

#[test]
fn an_early_answer_stops_the_upload_and_its_connection_is_not_reused() {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Duration;
    // With or without reuse after a body: the interrupted connection is
    // never pooled.
    for reuse in [None, Some("true")] {
        // The upstream answers the head of an upload at once (keep-alive, as if
        // it would read on), then counts the body bytes that still arrive.
        let (tx, rx) = mpsc::channel::<usize>();
        let tx = std::sync::Mutex::new(tx);
        let up = support::raw_upstream(move |stream| {
            use std::io::BufReader;
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let head = support::upstream::read_head(&mut reader);
            let mut stream = stream;
            if head.starts_with("GET ") {
                let _ = echo_target(head.lines().next().unwrap(), &mut stream);
                return;
            }
            let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            let _ = tx
                .lock()
                .unwrap()
                .send(rest.iter().filter(|&&b| b == b'L').count());
        });
        let mut fg = proxy(up.addr())
            .rate(GENEROUS)
            .env("FLOODGATE_WORKERS", "1");
        if let Some(reuse) = reuse {
            fg = fg.env("FLOODGATE_UPSTREAM_REUSE_AFTER_BODY", reuse);
        }
        let fg = fg.run();
        let stream = support::client::connect_within(fg.addr, Duration::from_secs(5));
        let mut writer = &stream;
        writer
            .write_all(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\nearly bytes",
            )
            .unwrap();
        // The answer comes while most of the body is still unsent.
        let mut reader = std::io::BufReader::new(&stream);
        let res = support::client::read_response(&mut reader, false).expect("the early answer");
        assert_eq!((res.status, res.text().as_str()), (403, "no\n"));
        assert_eq!(
            res.header("connection"),
            Some("close"),
            "the rest of the client's body was never read"
        );
        // What the client sends now never reaches the upstream.
        let _ = writer.write_all(&[b'L'; 100_000]);
        let late = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("floodgate closes the upstream connection");
        assert_eq!(late, 0, "late body bytes reached the upstream");
        assert_eq!(request(fg.addr, "GET", "/next", &[], b"").text(), "/next");
        assert_eq!(
            up.connections(),
            2,
            "reuse after body {reuse:?}: the interrupted connection is not reused"
        );
    }
}

#[test]
fn an_absolute_form_targets_authority_is_the_host_the_upstream_sees() {
    let up = upstream().run();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    for (target, host) in [
        ("http://a.example/x?y=1", "a.example"),
        ("http://a.example:8081/x?y=1", "a.example:8081"),
    ] {
        let raw = support::client::build("GET", target, &[("Host", "b.example")], b"");
        assert_eq!(send(fg.addr, &raw).status, 200, "{target}");
        let rec = up.recorded().pop().unwrap();
        assert_eq!(rec.uri, "/x?y=1");
        assert_eq!(rec.header_all("host"), vec![host], "{target}");
        assert_eq!(rec.header("x-forwarded-host"), Some(host), "{target}");
    }

    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_HOST_HEADER", "upstream")
        .run();
    let raw = support::client::build("GET", "http://a.example/x", &[("Host", "b.example")], b"");
    assert_eq!(send(fg.addr, &raw).status, 200);
    assert_eq!(
        up.only().header_all("host"),
        vec![up.addr().to_string().as_str()]
    );
}
