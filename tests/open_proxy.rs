//! floodgate is a reverse proxy for one upstream, never an open proxy: no
//! request target, `CONNECT`, `Host` header or WebSocket handshake can make it
//! connect anywhere else. A second listener stands for "elsewhere" and counts
//! connections; every case asserts it got none, and that whatever reached the
//! configured upstream asked for the expected path.

mod support;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::client::read_response;
use support::upstream::{RawUpstream, read_head, read_request};
use support::{Response, eventually, proxy, raw_upstream};

const GENEROUS: &str = "1000000/s";

/// A listener standing for any host floodgate must not reach. Answers, so
/// that a leak would show up as its body too.
fn elsewhere() -> RawUpstream {
    raw_upstream(|mut stream| {
        let _ = read_head(&mut BufReader::new(&stream));
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nelsewhere",
        );
    })
}

/// The configured upstream: records every request head and answers
/// `upstream`, closing each connection so every request is its own.
fn recording_upstream() -> (RawUpstream, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let record = heads.clone();
    let up = raw_upstream(move |mut stream| {
        let (head, _) = read_request(&stream);
        record.lock().unwrap().push(head);
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nupstream",
        );
    });
    (up, heads)
}

/// One floodgate in front of a recording upstream, and elsewhere.
struct Setup {
    fg: support::Proxy,
    upstream: RawUpstream,
    heads: Arc<Mutex<Vec<String>>>,
    elsewhere: RawUpstream,
}

impl Setup {
    fn new() -> Setup {
        let (upstream, heads) = recording_upstream();
        let fg = proxy(upstream.addr()).rate(GENEROUS).run();
        Setup {
            fg,
            upstream,
            heads,
            elsewhere: elsewhere(),
        }
    }

    fn elsewhere_authority(&self) -> String {
        self.elsewhere.addr().to_string()
    }

    /// Sends `raw` and returns the answer and the request lines that reached
    /// the configured upstream because of it.
    fn send(&self, raw: &str) -> (Response, Vec<String>) {
        let stream = support::client::connect_within(self.fg.addr, Duration::from_secs(5));
        (&stream).write_all(raw.as_bytes()).unwrap();
        let res = read_response(&mut BufReader::new(&stream), false)
            .unwrap_or_else(|e| panic!("no answer to {raw:?}: {e}"));
        let lines = std::mem::take(&mut *self.heads.lock().unwrap())
            .iter()
            .map(|head| head.lines().next().unwrap_or_default().to_owned())
            .collect();
        (res, lines)
    }

    /// The safety property, strictly: nothing went elsewhere, and the
    /// answer did not come from there.
    fn assert_contained(&self, what: &str, res: &Response) {
        assert_eq!(
            self.elsewhere.connections(),
            0,
            "{what}: floodgate connected elsewhere"
        );
        assert_ne!(res.body, b"elsewhere", "{what}: answered from elsewhere");
    }

    /// Whatever went through reached the configured upstream asking for
    /// `path`, and its answer came back.
    fn assert_forwarded(&self, what: &str, (res, lines): &(Response, Vec<String>), path: &str) {
        self.assert_contained(what, res);
        assert_eq!(res.status, 200, "{what}: {}", res.text());
        assert_eq!(res.body, b"upstream", "{what}");
        assert_eq!(lines, &[format!("GET {path} HTTP/1.1")], "{what}");
    }

    /// Refused with `status`, and nothing reached any upstream.
    fn assert_refused(&self, what: &str, (res, lines): &(Response, Vec<String>), status: u16) {
        self.assert_contained(what, res);
        assert_eq!(res.status, status, "{what}: {}", res.text());
        assert!(lines.is_empty(), "{what}: reached the upstream: {lines:?}");
    }

    /// Catches a connection to elsewhere that might still be in flight:
    /// connects there itself, and since accepts are served in order, once
    /// that probe is counted every earlier connection would have been too.
    fn assert_elsewhere_untouched_at_last(&self) {
        drop(TcpStream::connect(self.elsewhere.addr()).unwrap());
        let seen = eventually("elsewhere to count the probe", || {
            let n = self.elsewhere.connections();
            (n > 0).then_some(n)
        });
        assert_eq!(seen, 1, "only the test's own probe ever reached elsewhere");
    }
}

#[test]
fn absolute_form_targets_go_to_the_upstream_with_their_path_only() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "GET http://{other}/x HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n"
    ));
    s.assert_forwarded("absolute-form", &res, "/x");

    let res = s.send(&format!(
        "GET http://{other}/x/y?q=1 HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"
    ));
    s.assert_forwarded(
        "absolute-form with query and Host elsewhere",
        &res,
        "/x/y?q=1",
    );

    let res = s.send(&format!(
        "GET http://{other} HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n"
    ));
    s.assert_forwarded("absolute-form without a path", &res, "/");
    s.assert_elsewhere_untouched_at_last();
}

#[test]
fn connect_is_refused_with_405() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n"
    ));
    assert!(
        !(200..300).contains(&res.0.status),
        "CONNECT must never succeed: {}",
        res.0.status
    );
    s.assert_refused("CONNECT", &res, 405);
    assert!(
        res.0
            .header("allow")
            .is_some_and(|allow| !allow.contains("CONNECT")),
        "{:?}",
        res.0.headers
    );
    assert_eq!(s.upstream.connections(), 0);
    s.assert_elsewhere_untouched_at_last();
}

#[test]
fn a_target_starting_with_two_slashes_is_a_path() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "GET //{other}/path HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n"
    ));
    s.assert_forwarded("//host/path", &res, &format!("//{other}/path"));
    s.assert_elsewhere_untouched_at_last();
}

#[test]
fn a_target_starting_with_userinfo_is_refused() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "GET @{other}/ HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n"
    ));
    s.assert_refused("@host/", &res, 400);
    s.assert_elsewhere_untouched_at_last();
}

#[test]
fn a_host_header_naming_elsewhere_changes_nothing_but_the_host_header() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "GET /h HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"
    ));
    s.assert_forwarded("Host elsewhere", &res, "/h");
    s.assert_elsewhere_untouched_at_last();
}

#[test]
fn a_websocket_handshake_with_an_absolute_form_target_goes_to_the_upstream() {
    let s = Setup::new();
    let other = s.elsewhere_authority();
    let res = s.send(&format!(
        "GET http://{other}/ws HTTP/1.1\r\nHost: {other}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    ));
    // The upstream refuses the upgrade (answers 200), and that comes back.
    s.assert_forwarded("websocket, absolute-form", &res, "/ws");
    s.assert_elsewhere_untouched_at_last();
}
