//! Nothing is buffered whole: a gibibyte goes through floodgate each way, with
//! and without `Content-Length`, while the binary's resident memory stays
//! flat (read from /proc, which is why these run the real binary).

mod support;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use support::upstream::{RawUpstream, read_head};
use support::{Binary, eventually};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Every write, on either side, is this big.
const CHUNK: usize = 64 * 1024;
/// How much the proxy's peak resident memory may grow over a transfer.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// No single read or write may stall longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// A transfer that has not moved for this long is taken as held back.
const STALL: Duration = Duration::from_millis(500);

static PAYLOAD: [u8; CHUNK] = [0xa5; CHUNK];

fn bounded(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// The value of header `name` in a head (request or response).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn is_chunked(head: &str) -> bool {
    header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
}

fn short(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("body cut off after {got} of {expected} bytes"),
    )
}

/// Reads the body `head` announces (chunked, sized, or up to EOF) and returns
/// its length, keeping none of it.
fn count_body(reader: &mut impl BufRead, head: &str) -> io::Result<u64> {
    if is_chunked(head) {
        let mut total = 0;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {line:?} after {total} bytes"),
                )
            })?;
            if size == 0 {
                // Trailers, if any, then the blank line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                        return Ok(total);
                    }
                }
            }
            let got = io::copy(&mut reader.by_ref().take(size), &mut io::sink())?;
            if got != size {
                return Err(short(total + size, total + got));
            }
            total += size;
            let mut crlf = [0; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = header(head, "content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        let got = io::copy(&mut reader.by_ref().take(len), &mut io::sink())?;
        if got != len {
            return Err(short(len, got));
        }
        Ok(len)
    } else {
        io::copy(reader, &mut io::sink())
    }
}

/// Writes `len` bytes in `CHUNK`-sized writes, chunk-framed if `chunked`,
/// adding each chunk's size to `progress` once it is written.
fn write_body(
    out: &mut impl Write,
    len: u64,
    chunked: bool,
    progress: &AtomicU64,
) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        if chunked {
            write!(out, "{n:x}\r\n")?;
            out.write_all(&PAYLOAD[..n])?;
            out.write_all(b"\r\n")?;
        } else {
            out.write_all(&PAYLOAD[..n])?;
        }
        progress.fetch_add(n as u64, Ordering::SeqCst);
        left -= n as u64;
    }
    if chunked {
        out.write_all(b"0\r\n\r\n")?;
    }
    out.flush()
}

/// What the upstream shares with a test.
#[derive(Default)]
struct Shared {
    /// Response body bytes the upstream has written.
    sent: AtomicU64,
    /// When set, the next upload's body is not read until this says so.
    hold_upload: Mutex<Option<mpsc::Receiver<()>>>,
}

/// The upstream: `GET /small` answers two bytes; `GET /sized/<n>` and
/// `GET /chunked/<n>` answer `n` bytes with or without `Content-Length`;
/// `POST /upload` counts the request body and answers the count.
fn serve(stream: TcpStream, shared: &Shared) {
    bounded(&stream);
    let mut reader = BufReader::with_capacity(CHUNK, &stream);
    let head = read_head(&mut reader);
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut out = &stream;
    let _ = if target == "/small" {
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    } else if let Some(len) = target.strip_prefix("/sized/") {
        let len: u64 = len.parse().unwrap();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .and_then(|()| write_body(&mut out, len, false, &shared.sent))
    } else if let Some(len) = target.strip_prefix("/chunked/") {
        let len: u64 = len.parse().unwrap();
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .and_then(|()| write_body(&mut out, len, true, &shared.sent))
    } else if target == "/upload" {
        let hold = shared.hold_upload.lock().unwrap().take();
        if let Some(release) = hold {
            let _ = release.recv_timeout(IO_TIMEOUT);
        }
        let answer = match count_body(&mut reader, &head) {
            Ok(n) => format!("{n}"),
            Err(e) => format!("upstream read failed: {e}"),
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        )
    } else {
        out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
}

/// floodgate in front of [`serve`], warmed up by one small request. Returns
/// the binary and its peak resident memory after the warm-up.
fn warmed_up(shared: Arc<Shared>) -> (Binary, RawUpstream, u64) {
    let up = support::raw_upstream(move |stream| serve(stream, &shared));
    let fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_RATE", "1000/s"),
        ("FLOODGATE_WORKERS", "2"),
    ]);
    let res = support::get(fg.addr, "/small");
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"ok");
    let baseline = fg.peak_rss_kib();
    (fg, up, baseline)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    bounded(&stream);
    stream
}

/// Downloads `target` through floodgate; returns the response head and the
/// body length.
fn download(addr: SocketAddr, target: &str) -> (String, u64) {
    let stream = connect(addr);
    (&stream)
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut reader = BufReader::with_capacity(CHUNK, &stream);
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len = count_body(&mut reader, &head)
        .unwrap_or_else(|e| panic!("reading the download: {e}\n{head}"));
    (head, len)
}

/// Uploads `len` bytes through floodgate, counting what was written in
/// `sent`; returns what the upstream counted.
fn upload(addr: SocketAddr, len: u64, chunked: bool, sent: &AtomicU64) -> u64 {
    let stream = connect(addr);
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    let mut out = &stream;
    write!(
        out,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n{framing}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    write_body(&mut out, len, chunked, sent).unwrap_or_else(|e| panic!("sending the upload: {e}"));
    let res = support::client::read_response(&mut BufReader::new(&stream), false)
        .unwrap_or_else(|e| panic!("reading the upload's answer: {e}"));
    assert_eq!(res.status, 200, "{}", res.text());
    res.text()
        .parse()
        .unwrap_or_else(|_| panic!("upstream: {}", res.text()))
}

/// Runs `transfer` through `fg` and checks that the proxy's peak RSS grew by
/// less than the bound over the warm-up baseline. Returns what `transfer`
/// returned.
fn transfer<T>(
    fg: &Binary,
    baseline_kib: u64,
    what: &str,
    bytes: u64,
    transfer: impl FnOnce() -> T,
) -> T {
    let start = Instant::now();
    let result = transfer();
    let took = start.elapsed();
    let peak = fg.peak_rss_kib();
    let growth = peak.saturating_sub(baseline_kib);
    println!(
        "{what}: {} MiB in {took:.1?}; proxy VmHWM {baseline_kib} KiB after warm-up, {peak} KiB after (+{:.1} MiB), VmRSS now {} KiB",
        bytes / MIB,
        growth as f64 / 1024.0,
        fg.rss_kib()
    );
    assert!(
        growth < RSS_BOUND_KIB,
        "{what}: the proxy's peak RSS grew by {growth} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    result
}

#[test]
fn a_gibibyte_download_with_content_length_streams() {
    let (fg, _up, baseline) = warmed_up(Arc::default());
    let (head, len) = transfer(&fg, baseline, "1 GiB download", GIB, || {
        download(fg.addr, &format!("/sized/{GIB}"))
    });
    assert_eq!(len, GIB);
    assert_eq!(
        header(&head, "content-length"),
        Some("1073741824"),
        "{head}"
    );
}

#[test]
fn a_gibibyte_upload_with_content_length_streams() {
    let (fg, _up, baseline) = warmed_up(Arc::default());
    let counted = transfer(&fg, baseline, "1 GiB upload", GIB, || {
        upload(fg.addr, GIB, false, &AtomicU64::new(0))
    });
    assert_eq!(counted, GIB);
}

#[test]
fn a_chunked_download_streams() {
    let len = 256 * MIB;
    let (fg, _up, baseline) = warmed_up(Arc::default());
    let (head, got) = transfer(&fg, baseline, "256 MiB chunked download", len, || {
        download(fg.addr, &format!("/chunked/{len}"))
    });
    assert_eq!(got, len);
    assert_eq!(
        header(&head, "content-length"),
        None,
        "a length floodgate does not know cannot be announced: {head}"
    );
}

#[test]
fn a_chunked_upload_streams() {
    let len = 256 * MIB;
    let (fg, _up, baseline) = warmed_up(Arc::default());
    let counted = transfer(&fg, baseline, "256 MiB chunked upload", len, || {
        upload(fg.addr, len, true, &AtomicU64::new(0))
    });
    assert_eq!(counted, len);
}

/// Waits until `counter` is non-zero and has not moved for [`STALL`];
/// returns where it stopped.
fn stalled(what: &str, counter: &AtomicU64) -> u64 {
    let mut last = (counter.load(Ordering::SeqCst), Instant::now());
    eventually(what, || {
        let now = counter.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
            return None;
        }
        (now > 0 && last.1.elapsed() >= STALL).then_some(now)
    })
}

fn assert_held_back(fg: &Binary, baseline_kib: u64, what: &str, stalled_at: u64) {
    let growth = fg.peak_rss_kib().saturating_sub(baseline_kib);
    println!(
        "{what}: held back after {:.1} MiB of 1024; proxy VmHWM +{:.1} MiB",
        stalled_at as f64 / MIB as f64,
        growth as f64 / 1024.0
    );
    assert!(
        stalled_at < RSS_BOUND_KIB * 1024,
        "{what}: {stalled_at} bytes moved with nobody taking them"
    );
    assert!(
        growth < RSS_BOUND_KIB,
        "{what}: the proxy's peak RSS grew by {growth} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
}

#[test]
fn a_client_that_stops_reading_holds_the_upstream_back() {
    let shared = Arc::new(Shared::default());
    let (fg, _up, baseline) = warmed_up(shared.clone());
    let stream = connect(fg.addr);
    (&stream)
        .write_all(
            format!("GET /sized/{GIB} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut reader = BufReader::with_capacity(CHUNK, &stream);
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The client reads nothing more: the upstream must stop once the buffers
    // in between are full, and floodgate must not be one of them.
    let stalled_at = stalled("the upstream to be held back", &shared.sent);
    assert_held_back(&fg, baseline, "slow client", stalled_at);

    let len = count_body(&mut reader, &head)
        .unwrap_or_else(|e| panic!("reading the download: {e}\n{head}"));
    assert_eq!(len, GIB, "everything arrives once the client reads again");
}

#[test]
fn an_upstream_that_stops_reading_holds_the_client_back() {
    let shared = Arc::new(Shared::default());
    let (release, hold) = mpsc::channel();
    *shared.hold_upload.lock().unwrap() = Some(hold);
    let (fg, _up, baseline) = warmed_up(shared);
    let sent = Arc::new(AtomicU64::new(0));
    let client = std::thread::spawn({
        let (addr, sent) = (fg.addr, sent.clone());
        move || upload(addr, GIB, false, &sent)
    });

    let stalled_at = stalled("the client to be held back", &sent);
    assert_held_back(&fg, baseline, "slow upstream", stalled_at);

    release.send(()).unwrap();
    let counted = client.join().expect("the upload");
    assert_eq!(
        counted, GIB,
        "everything arrives once the upstream reads again"
    );
}
