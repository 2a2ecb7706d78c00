//! WebSocket pass-through: the client's handshake reaches the upstream as
//! sent (its own `Sec-WebSocket-Key`), the upstream's answer comes back (101
//! or a refusal with its body), and after 101 floodgate tunnels bytes both
//! ways, frames or not. An upgrade counts as one request against the limit.

mod support;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use support::client::read_response;
use support::upstream::{RawUpstream, read_head};
use support::{Response, patience, proxy, raw_upstream, request};

const GENEROUS: &str = "1000000/s";

/// The RFC 6455 example key; the upstream must see exactly this.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// What a raw upstream saw.
#[derive(Debug)]
enum Seen {
    Head(String),
    /// The client side of the tunnel ended (EOF from floodgate).
    Closed,
}

/// An upstream that accepts every WebSocket handshake with 101, then echoes
/// raw bytes until floodgate closes its side. Reports what it saw.
fn echo_upstream() -> (RawUpstream, Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let up = raw_upstream(move |stream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader);
        let upgrade = head
            .to_ascii_lowercase()
            .contains("\r\nupgrade: websocket\r\n");
        let _ = tx.send(Seen::Head(head));
        if !upgrade {
            let _ = writer.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 10\r\nConnection: close\r\n\r\nno upgrade",
            );
            return;
        }
        if writer
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            )
            .is_err()
        {
            return;
        }
        let mut buf = [0; 16 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(Seen::Closed);
                    break;
                }
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    (up, rx)
}

fn next_seen(rx: &Receiver<Seen>) -> Seen {
    rx.recv_timeout(patience())
        .expect("the upstream reported nothing")
}

fn handshake_raw(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: floodgate.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
}

/// A client connection after its handshake: the stream for writing, a
/// buffered reader (which may hold bytes past the answer) for reading.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

/// Connects, sends the handshake for `path` and reads the answer head (and
/// body, for a refusal).
fn handshake(addr: SocketAddr, path: &str) -> (Client, Response) {
    let stream = support::client::connect_within(addr, Duration::from_secs(5));
    stream.set_nodelay(true).unwrap();
    (&stream).write_all(handshake_raw(path).as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let res = read_response(&mut reader, false).expect("a handshake answer");
    (Client { stream, reader }, res)
}

impl Client {
    fn round_trip(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        let mut back = vec![0; bytes.len()];
        self.reader
            .read_exact(&mut back)
            .unwrap_or_else(|e| panic!("reading {} echoed bytes: {e}", bytes.len()));
        assert!(back == bytes, "the same bytes come back");
    }

    /// Closes the writing side and expects the tunnel to end: EOF, with
    /// nothing left to read.
    fn close(mut self) {
        self.stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes after close: {rest:?}"),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                panic!("the tunnel stayed open after the client closed")
            }
            Err(e) => panic!("the tunnel ended with an error instead of EOF: {e}"),
        }
    }
}

#[test]
fn handshake_passes_through_and_bytes_are_tunnelled_both_ways() {
    let (up, seen) = echo_upstream();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let (mut client, res) = handshake(fg.addr, "/chat?room=1");
    assert_eq!(res.status, 101, "{res:?}");
    assert_eq!(res.header("upgrade"), Some("websocket"));
    assert!(
        connection_tokens(&res).contains(&"upgrade".to_owned()),
        "{:?}",
        res.headers
    );
    assert_eq!(
        res.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the upstream's accept key comes back unchanged"
    );

    let Seen::Head(head) = next_seen(&seen) else {
        panic!("expected the handshake first")
    };
    let request_line = head.lines().next().unwrap();
    assert_eq!(request_line, "GET /chat?room=1 HTTP/1.1");
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        header("sec-websocket-key"),
        Some(KEY),
        "the client's own key, unchanged:\n{head}"
    );
    assert_eq!(header("sec-websocket-version"), Some("13"));
    assert_eq!(header("sec-websocket-protocol"), Some("chat, superchat"));
    assert_eq!(
        header("sec-websocket-extensions"),
        Some("permessage-deflate")
    );
    assert!(
        header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{head}"
    );
    assert!(
        header("connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );

    for i in 0..5 {
        client.round_trip(format!("round trip {i}: not a websocket frame").as_bytes());
    }
    client.round_trip(b"\x00\xff\x81\x85binary\r\n\r\nHTTP/1.1 200 OK\r\n\r\n");
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut writer = client.stream.try_clone().unwrap();
    let sent = big.clone();
    let writing = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0; big.len()];
    client.reader.read_exact(&mut back).unwrap();
    writing.join().unwrap().unwrap();
    assert!(back == big, "a megabyte comes back intact");
    client.round_trip(b"after the big one");

    client.close();
    assert!(
        matches!(next_seen(&seen), Seen::Closed),
        "the upstream sees the client's close"
    );
    assert_eq!(up.connections(), 1);
}

/// The `Connection` options of a response, lower-cased.
fn connection_tokens(res: &Response) -> Vec<String> {
    res.header_all("connection")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

#[test]
fn a_101_answer_says_upgrade_and_not_close() {
    let (up, _seen) = echo_upstream();
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let (client, res) = handshake(fg.addr, "/chat");
    assert_eq!(res.status, 101, "{res:?}");
    assert_eq!(
        connection_tokens(&res),
        vec!["upgrade"],
        "RFC 6455 §4.2.2: `Connection: Upgrade`; `close` contradicts the switch \
         (RFC 9112 §9.6): {:?}",
        res.headers
    );
    client.close();
}

#[test]
fn upstream_closing_the_tunnel_closes_the_client() {
    let up = raw_upstream(|stream| {
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let _ = (&stream).write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: x\r\n\r\ngoodbye",
        );
        // Dropped: the upstream ends the tunnel.
    });
    let fg = proxy(up.addr()).rate(GENEROUS).run();
    let (mut client, res) = handshake(fg.addr, "/bye");
    assert_eq!(res.status, 101);
    let mut rest = Vec::new();
    client
        .reader
        .read_to_end(&mut rest)
        .expect("EOF once the upstream closed");
    assert_eq!(rest, b"goodbye", "bytes sent with the 101 arrive first");
}

#[test]
fn a_refused_handshake_comes_back_with_its_status_and_body() {
    for close_after in [false, true] {
        let up = raw_upstream(move |stream| {
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut reader = BufReader::new(&stream);
            let _ = read_head(&mut reader);
            let _ = (&stream).write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nno",
            );
            if !close_after {
                // Keeps the connection until floodgate lets go of it.
                let _ = reader.fill_buf();
            }
        });
        let fg = proxy(up.addr()).rate(GENEROUS).run();
        let (_client, res) = handshake(fg.addr, "/ws");
        assert_eq!(res.status, 403, "close_after={close_after}: {res:?}");
        assert_eq!(res.body, b"no", "close_after={close_after}");
        assert_eq!(res.header("content-type"), Some("text/plain"));
        assert_eq!(
            res.header("upgrade"),
            None,
            "close_after={close_after}: not switching"
        );
    }
}

#[test]
fn an_upgrade_counts_as_one_request_against_the_limit() {
    let (up, seen) = echo_upstream();
    let fg = proxy(up.addr()).rate("1/h").run();
    let (mut client, res) = handshake(fg.addr, "/ws");
    assert_eq!(res.status, 101, "{res:?}");
    assert!(matches!(next_seen(&seen), Seen::Head(_)));
    client.round_trip(b"still open");

    let res = request(fg.addr, "GET", "/plain", &[], b"");
    assert_eq!(res.status, 429, "the upgrade used the only request");
    client.round_trip(b"the tunnel is not cut by the limit");
    client.close();

    let (_again, res) = handshake(fg.addr, "/ws");
    assert_eq!(res.status, 429, "another upgrade is limited too");
    assert_eq!(
        up.connections(),
        1,
        "limited requests never reach the upstream"
    );
}

// === idle timeout ===

const IDLE: Duration = Duration::from_secs(1);

/// floodgate whose tunnels close after [`IDLE`] without a byte either way.
fn idle_proxy(upstream: SocketAddr) -> support::Proxy {
    proxy(upstream)
        .rate(GENEROUS)
        .env("FLOODGATE_WEBSOCKET_IDLE_TIMEOUT", "1s")
        .run()
}

/// More than the idle timeout, in steps well inside it.
const STEPS: u32 = 15;
const STEP: Duration = Duration::from_millis(200);

#[test]
fn an_idle_tunnel_is_closed_on_both_sides() {
    let (up, seen) = echo_upstream();
    let fg = idle_proxy(up.addr());
    let (mut client, res) = handshake(fg.addr, "/idle");
    assert_eq!(res.status, 101, "{res:?}");
    assert!(matches!(next_seen(&seen), Seen::Head(_)));
    client.round_trip(b"one message, then silence");
    let last_byte = Instant::now();

    let mut rest = Vec::new();
    client
        .reader
        .read_to_end(&mut rest)
        .expect("the client sees the tunnel end (EOF), not a read timeout");
    let after = last_byte.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        after >= IDLE,
        "closed after {after:?}, before the idle timeout"
    );
    assert!(
        matches!(next_seen(&seen), Seen::Closed),
        "the upstream sees the tunnel closed"
    );
}

#[test]
fn a_tunnel_exchanging_messages_outlives_the_idle_timeout() {
    let (up, seen) = echo_upstream();
    let fg = idle_proxy(up.addr());
    let (mut client, res) = handshake(fg.addr, "/busy");
    assert_eq!(res.status, 101, "{res:?}");
    let opened = Instant::now();
    for i in 0..STEPS {
        std::thread::sleep(STEP);
        client.round_trip(format!("message {i}").as_bytes());
    }
    assert!(opened.elapsed() > IDLE * 2);
    client.close();
    assert!(matches!(next_seen(&seen), Seen::Head(_)));
    assert!(matches!(next_seen(&seen), Seen::Closed));
}

/// Bytes in one direction alone keep a tunnel open.
#[test]
fn bytes_one_way_alone_keep_a_tunnel_open() {
    let accept =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: x\r\n\r\n";
    // Client to upstream only: the upstream says nothing until it has every
    // byte, then answers once.
    let listener = raw_upstream(move |stream| {
        stream.set_read_timeout(Some(patience())).unwrap();
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let _ = (&stream).write_all(accept);
        let mut got = vec![0; STEPS as usize];
        if reader.read_exact(&mut got).is_ok() {
            let _ = (&stream).write_all(b"heard you");
        }
    });
    let fg = idle_proxy(listener.addr());
    let (mut client, res) = handshake(fg.addr, "/talk");
    assert_eq!(res.status, 101, "{res:?}");
    for _ in 0..STEPS {
        std::thread::sleep(STEP);
        client
            .stream
            .write_all(b".")
            .expect("the tunnel is still open while the client talks alone");
    }
    let mut answer = [0; 9];
    client
        .reader
        .read_exact(&mut answer)
        .expect("the tunnel is still open after the client talked alone");
    assert_eq!(&answer, b"heard you");

    // Upstream to client only: the client never writes.
    let talker = raw_upstream(move |stream| {
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let _ = (&stream).write_all(accept);
        for _ in 0..STEPS {
            std::thread::sleep(STEP);
            if (&stream).write_all(b".").is_err() {
                return;
            }
        }
        let _ = (&stream).write_all(b"done");
    });
    let fg = idle_proxy(talker.addr());
    let (mut client, res) = handshake(fg.addr, "/listen");
    assert_eq!(res.status, 101, "{res:?}");
    let mut got = vec![0; STEPS as usize + 4];
    client
        .reader
        .read_exact(&mut got)
        .expect("the tunnel is still open while the upstream talks alone");
    assert!(got.ends_with(b"done"), "{got:?}");
}

#[test]
fn a_tunnel_whose_upstream_stops_reading_falls_idle_and_is_closed() {
    let (release, held) = mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    let up = raw_upstream(move |stream| {
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let _ = (&stream).write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: x\r\n\r\n",
        );
        // Neither reads nor writes again until the test ends.
        let _ = held.lock().unwrap().recv_timeout(patience() * 2);
    });
    let fg = idle_proxy(up.addr());
    let (mut client, res) = handshake(fg.addr, "/deaf");
    assert_eq!(res.status, 101, "{res:?}");
    let mut writer = client.stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        // Blocks once every buffer on the way is full, fails once the
        // tunnel is closed.
        while writer.write_all(&chunk).is_ok() {}
    });
    let mut rest = Vec::new();
    match client.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the tunnel stayed open while the upstream read nothing: {e}"),
    }
    writing.join().unwrap();
    drop(release);
}
