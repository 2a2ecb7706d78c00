//! Bounds on client connections: a client that stops reading is cut after
//! `FLOODGATE_SEND_TIMEOUT` (a response body, a WebSocket tunnel, floodgate's
//! own answers), and the upstream connection serving it is closed with it;
//! `FLOODGATE_MAX_CONNECTIONS` caps the connections served at once.
//!
//! "Floodgate's end of the connection is gone" is read from the kernel's
//! socket table (`/proc/net/tcp`): a client that does not read cannot see
//! the close itself, since the kernel drops the connection without a word.

mod support;

use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use support::client::read_response;
use support::upstream::read_head;
use support::{eventually, patience, proxy, raw_upstream, upstream};

const GENEROUS: &str = "1000000/s";
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// floodgate with a 1 s send timeout and every other timer far away, so
/// nothing else can close a connection during a test.
fn stalling_proxy(upstream: SocketAddr, rate: &str) -> support::Proxy {
    proxy(upstream)
        .rate(rate)
        .env("FLOODGATE_SEND_TIMEOUT", "1s")
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "10m")
        .env("FLOODGATE_CLIENT_TIMEOUT", "10m")
        .env("FLOODGATE_WEBSOCKET_IDLE_TIMEOUT", "10m")
        .run()
}

/// A client socket with a small receive buffer, so that a client that does
/// not read closes its window after a few kilobytes.
fn slow_reader(addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(patience())).unwrap();
    stream.set_write_timeout(Some(patience())).unwrap();
    stream
}

/// Whether the kernel still has a TCP connection from `local` to `remote`.
fn connection_exists(local: SocketAddr, remote: SocketAddr) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let parse = |field: &str| -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // The address is printed as the in-memory (network order) word.
        Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port).into())
    };
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(l), Some(r)) = (fields.next(), fields.next()) else {
            return false;
        };
        parse(l) == Some(local) && parse(r) == Some(remote)
    })
}

/// Waits until floodgate's end of `client` is gone; returns when, or panics
/// naming `what`.
fn floodgate_drops(client: &TcpStream, what: &str) -> Instant {
    let ours = client.local_addr().unwrap();
    let theirs = client.peer_addr().unwrap();
    assert!(
        connection_exists(theirs, ours),
        "floodgate's end of the {what} connection is listed while open"
    );
    eventually(&format!("floodgate to drop the {what} connection"), || {
        (!connection_exists(theirs, ours)).then(Instant::now)
    })
}

/// Reads what is left; the connection must end (reset or EOF), never time
/// out. Returns the bytes read.
fn drain_until_closed(mut client: TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0; 64 * 1024];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the {what} connection did not end once drained: {e}"),
        }
    }
}

/// How a fake upstream's writing ended.
#[derive(Debug, PartialEq)]
enum Writing {
    /// floodgate closed the connection (reset or broken pipe).
    Closed,
    /// The write made no progress for the test's patience.
    Stuck,
}

/// Writes `bytes` forever, then reports how it stopped.
fn write_forever(mut stream: &TcpStream, tx: mpsc::Sender<Writing>) {
    stream
        .set_write_timeout(Some(patience() + SEND_TIMEOUT))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    loop {
        if let Err(e) = stream.write_all(&chunk) {
            let _ = tx.send(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Writing::Stuck,
                _ => Writing::Closed,
            });
            return;
        }
    }
}

fn upstream_report(rx: &Receiver<Writing>) -> Writing {
    rx.recv_timeout(patience() * 2 + SEND_TIMEOUT)
        .expect("the upstream reported nothing")
}

// === send timeout ===

#[test]
fn a_client_that_stops_reading_a_response_is_cut_and_the_upstream_released() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let up = raw_upstream(move |stream| {
        let mut reader = BufReader::new(&stream);
        let head = read_head(&mut reader);
        if head.starts_with("GET /small ") {
            let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall");
            let _ = reader.read(&mut [0; 1]);
            return;
        }
        let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n");
        let tx = tx.lock().unwrap().clone();
        write_forever(&stream, tx);
    });
    let fg = stalling_proxy(up.addr(), GENEROUS);

    let mut client = slow_reader(fg.addr);
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: floodgate.test\r\n\r\n")
        .unwrap();
    let asked = Instant::now();
    let dropped = floodgate_drops(&client, "stalled download");
    let after = dropped - asked;
    assert!(
        after >= SEND_TIMEOUT,
        "dropped after {after:?}, before the send timeout"
    );
    assert_eq!(
        upstream_report(&rx),
        Writing::Closed,
        "the upstream connection is closed, not kept for reuse"
    );
    let got = drain_until_closed(client, "stalled download");
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{:?}",
        &got[..got.len().min(20)]
    );
    assert!(
        got.len() < 64 << 20,
        "the body was cut: {} bytes",
        got.len()
    );

    let res = support::get(fg.addr, "/small");
    assert_eq!(res.status, 200, "floodgate still serves: {res:?}");
    assert_eq!(res.body, b"small");
}

#[test]
fn a_client_that_reads_slowly_but_steadily_is_never_cut() {
    const BODY: usize = 256 * 1024;
    let up = raw_upstream(|stream| {
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        answer.resize(answer.len() + BODY, b'x');
        let _ = (&stream).write_all(&answer);
        let _ = reader.read(&mut [0; 1]);
    });
    let fg = stalling_proxy(up.addr(), GENEROUS);

    let mut client = slow_reader(fg.addr);
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0; 8 * 1024];
    loop {
        // Reads a little, ten times a second: well inside the send timeout
        // each time, far beyond it in all.
        std::thread::sleep(Duration::from_millis(100));
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "cut after {:?} and {} bytes: {e}",
                started.elapsed(),
                got.len()
            ),
        }
    }
    assert!(
        started.elapsed() > SEND_TIMEOUT * 2,
        "the test read too fast to show anything: {:?}",
        started.elapsed()
    );
    assert!(got.ends_with(&[b'x'; 1024]), "the whole body arrived");
    let head_len = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - head_len, BODY);
}

#[test]
fn a_client_that_stops_reading_a_tunnel_is_cut_and_the_upstream_released() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let up = raw_upstream(move |stream| {
        let mut reader = BufReader::new(&stream);
        let _ = read_head(&mut reader);
        let _ = (&stream).write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: x\r\n\r\n",
        );
        let tx = tx.lock().unwrap().clone();
        write_forever(&stream, tx);
    });
    let fg = stalling_proxy(up.addr(), GENEROUS);

    let mut client = slow_reader(fg.addr);
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: floodgate.test\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let asked = Instant::now();
    let dropped = floodgate_drops(&client, "stalled tunnel");
    assert!(dropped - asked >= SEND_TIMEOUT, "{:?}", dropped - asked);
    assert_eq!(
        upstream_report(&rx),
        Writing::Closed,
        "the tunnel's upstream side is closed too"
    );
    let got = drain_until_closed(client, "stalled tunnel");
    assert!(
        got.starts_with(b"HTTP/1.1 101 "),
        "{:?}",
        &got[..got.len().min(20)]
    );
}

#[test]
fn a_client_that_pipelines_without_reading_floodgates_answers_is_cut() {
    let up = upstream().run();
    let fg = stalling_proxy(up.addr(), "1/h");
    assert_eq!(
        support::get(fg.addr, "/").status,
        200,
        "uses the only request"
    );

    const REQUESTS: usize = 20_000;
    let client = slow_reader(fg.addr);
    let mut writer = client.try_clone().unwrap();
    let pipelined = std::thread::spawn(move || {
        let one = b"GET /limited HTTP/1.1\r\nHost: floodgate.test\r\n\r\n";
        for _ in 0..REQUESTS {
            // floodgate stops reading once its answers back up; then this
            // write blocks until the connection is gone.
            if writer.write_all(one).is_err() {
                return;
            }
        }
    });
    let asked = Instant::now();
    let dropped = floodgate_drops(&client, "pipelining");
    assert!(dropped - asked >= SEND_TIMEOUT, "{:?}", dropped - asked);

    let mut reader = BufReader::new(client);
    let mut answers = 0;
    loop {
        match read_response(&mut reader, false) {
            Ok(res) => {
                assert_eq!(res.status, 429, "{res:?}");
                answers += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("the connection did not end once drained: {e}"),
        }
    }
    pipelined.join().unwrap();
    assert!(
        answers < REQUESTS,
        "the connection was cut before every answer went out ({answers})"
    );
    assert_eq!(up.requests(), 1, "429s never reach the upstream");
}

// === max connections ===

/// A keep-alive request on `stream`; the answer's status.
fn keep_alive_get(stream: &TcpStream, reader: &mut BufReader<TcpStream>) -> io::Result<u16> {
    let mut w = stream;
    w.write_all(b"GET / HTTP/1.1\r\nHost: floodgate.test\r\n\r\n")?;
    read_response(reader, false).map(|res| res.status)
}

fn connect(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let stream = support::client::connect(addr);
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

#[test]
fn connections_past_the_cap_wait_until_one_closes() {
    let up = upstream().run();
    // Two workers, one connection each.
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_MAX_CONNECTIONS", "2")
        .run();

    let (a, mut a_reader) = connect(fg.addr);
    assert_eq!(keep_alive_get(&a, &mut a_reader).unwrap(), 200);
    let (b, mut b_reader) = connect(fg.addr);
    assert_eq!(keep_alive_get(&b, &mut b_reader).unwrap(), 200);

    // The kernel completes the handshake, but floodgate does not accept.
    let (c, mut c_reader) = connect(fg.addr);
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let waiting = keep_alive_get(&c, &mut c_reader).unwrap_err();
    assert!(
        matches!(
            waiting.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "a third connection is not served while two are open: {waiting}"
    );
    assert_eq!(up.requests(), 2);
    assert_eq!(
        keep_alive_get(&b, &mut b_reader).unwrap(),
        200,
        "the open ones are still served"
    );

    drop(a_reader);
    drop(a);
    c.set_read_timeout(Some(patience())).unwrap();
    let res = read_response(&mut c_reader, false).expect("served once a slot is free");
    assert_eq!(res.status, 200);
    assert_eq!(keep_alive_get(&c, &mut c_reader).unwrap(), 200);
    assert_eq!(up.requests(), 5);
}

#[test]
fn hundreds_of_connections_past_the_cap_wait_in_line_and_are_all_served() {
    const WAITING: usize = 300;
    let up = upstream().run();
    let fg = proxy(up.addr())
        .rate(GENEROUS)
        .env("FLOODGATE_MAX_CONNECTIONS", "2")
        .run();
    let (a, mut a_reader) = connect(fg.addr);
    assert_eq!(keep_alive_get(&a, &mut a_reader).unwrap(), 200);
    let (b, mut b_reader) = connect(fg.addr);
    assert_eq!(keep_alive_get(&b, &mut b_reader).unwrap(), 200);

    // Each handshake completes at once: the listen queue has room for them
    // all (a full queue drops the handshake, which the client retries only
    // after a second).
    let waiting: Vec<TcpStream> = (0..WAITING)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&fg.addr, Duration::from_millis(500))
                .unwrap_or_else(|e| panic!("connection {i} past the cap: {e}"));
            stream.set_read_timeout(Some(patience())).unwrap();
            (&stream)
                .write_all(b"GET / HTTP/1.1\r\nHost: floodgate.test\r\nConnection: close\r\n\r\n")
                .unwrap();
            stream
        })
        .collect();
    assert_eq!(up.requests(), 2, "none of them is served yet");

    drop((a, a_reader, b, b_reader));
    for (i, stream) in waiting.into_iter().enumerate() {
        let res = read_response(&mut BufReader::new(stream), false)
            .unwrap_or_else(|e| panic!("waiting connection {i}: {e}"));
        assert_eq!(res.status, 200, "waiting connection {i}");
    }
    assert_eq!(up.requests(), 2 + WAITING);
}
