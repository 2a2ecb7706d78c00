//! Property tests for the upstream answer's parsers: the head
//! ([`parse_head`]), the body decoder ([`ResponseBody`], over a real loopback
//! connection) and the chunked encoder ([`Conn::send_body`] with [`Frame::Chunked`]).
//!
//! `PROPTEST_CASES` raises the number of cases (see the README).

use std::time::Duration;

use futures_util::StreamExt;
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use actix_web::http::header;

// === answer heads ===

/// Header names a parser has to get right, in odd spellings, and a few
/// plain ones.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Content-Length".to_owned()),
        Just("content-length".to_owned()),
        Just("Transfer-Encoding".to_owned()),
        Just("TRANSFER-ENCODING".to_owned()),
        Just("Connection".to_owned()),
        Just("Keep-Alive".to_owned()),
        Just("Proxy-Connection".to_owned()),
        Just("TE".to_owned()),
        Just("Trailer".to_owned()),
        Just("Upgrade".to_owned()),
        Just("Proxy-Authenticate".to_owned()),
        Just("Proxy-Authorization".to_owned()),
        Just("Set-Cookie".to_owned()),
        Just("X-Hop".to_owned()),
        "[A-Za-z][A-Za-z0-9-]{0,12}",
    ]
}

/// Values that matter for framing, plus arbitrary visible text.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,4}",
        Just("+5".to_owned()),
        Just("-1".to_owned()),
        Just(" 5 ".to_owned()),
        Just("5, 5".to_owned()),
        Just("chunked".to_owned()),
        Just("Chunked".to_owned()),
        Just("gzip, chunked".to_owned()),
        Just("chunked, gzip".to_owned()),
        Just("gzip".to_owned()),
        Just("close".to_owned()),
        Just("keep-alive".to_owned()),
        Just("keep-alive, X-Hop".to_owned()),
        Just("Set-Cookie, close".to_owned()),
        Just("upgrade".to_owned()),
        Just("websocket".to_owned()),
        "[ -~]{0,20}",
    ]
}

#[derive(Debug, Clone)]
struct Head {
    version: &'static str,
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/{} {} X\r\n", self.version, self.status);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn head() -> impl Strategy<Value = Head> {
    (
        prop_oneof![Just("1.1"), Just("1.0")],
        prop_oneof![
            Just(100u16),
            Just(101),
            Just(103),
            Just(200),
            Just(204),
            Just(304),
            Just(404),
            100u16..600
        ],
        vec((header_name(), header_value()), 0..8),
    )
        .prop_map(|(version, status, headers)| Head {
            version,
            status,
            headers,
        })
}

fn parse(
    raw: &[u8],
    method: &Method,
    upgrade: bool,
) -> (Result<Option<Parsed>, ExchangeError>, BytesMut, HeaderMap) {
    let mut buf = BytesMut::from(raw);
    let mut headers = HeaderMap::new();
    let parsed = parse_head(&mut buf, method, upgrade, &mut headers);
    (parsed, buf, headers)
}

proptest! {
    #[test]
    fn parse_head_never_panics_on_arbitrary_bytes(raw in vec(any::<u8>(), 0..512)) {
        let _ = parse(&raw, &Method::GET, false);
    }

    #[test]
    fn parse_head_never_panics_after_a_status_line(
        lines in vec(vec(any::<u8>(), 0..40), 0..6),
    ) {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for line in lines {
            raw.extend_from_slice(&line);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        let _ = parse(&raw, &Method::GET, false);
    }

    /// Framing is strict (every `Content-Length` is 1*DIGIT and they agree,
    /// `Transfer-Encoding` is one `chunked` and never beside a length, a `101`
    /// answers only an upgrade), what a parsed answer says about its framing
    /// is what its headers say, the headers passed on carry no hop-by-hop or
    /// `Connection`-named header, and the bytes after the head stay in the
    /// buffer for the body.
    #[test]
    fn a_parsed_head_frames_as_its_headers_say(
        head in head(),
        head_method in any::<bool>(),
        upgrade in any::<bool>(),
        rest in vec(any::<u8>(), 0..32),
    ) {
        let method = if head_method { Method::HEAD } else { Method::GET };
        let mut raw = head.bytes();
        raw.extend_from_slice(&rest);
        let (parsed, buf, headers) = parse(&raw, &method, upgrade);

        let strict_lengths = head
            .values("content-length")
            .all(|v| { let v = v.trim(); !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) });
        let te: Vec<&str> = head.values("transfer-encoding").collect();
        let one_chunked = te.len() == 1 && te[0].trim().eq_ignore_ascii_case("chunked");
        let has_length = head.values("content-length").next().is_some();
        if !strict_lengths {
            prop_assert!(parsed.is_err(), "a Content-Length that is not 1*DIGIT must be refused");
        }
        if !te.is_empty() && (!one_chunked || has_length) {
            prop_assert!(parsed.is_err(), "ambiguous or undecodable framing must be refused");
        }
        if head.status == 101 && !upgrade {
            prop_assert!(parsed.is_err(), "a 101 nobody asked for must be refused");
        }

        let lengths: Vec<&str> = head.values("content-length").collect();
        let distinct_lengths = {
            let mut l: Vec<Option<u64>> = lengths.iter().map(|v| v.trim().parse().ok()).collect();
            l.sort();
            l.dedup();
            l
        };
        if distinct_lengths.len() > 1 {
            prop_assert!(parsed.is_err(), "two different Content-Lengths must be refused");
        }
        let Ok(Some(parsed)) = parsed else { return Ok(()) };
        prop_assert_eq!(&buf[..], &rest[..], "the head is taken off, the rest stays");

        let switching = head.status == 101;
        let named: Vec<String> = head
            .values("connection")
            .flat_map(|v| crate::headers::tokens(v.as_bytes()))
            .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
            .collect();
        for name in headers.keys() {
            if switching && *name == header::UPGRADE {
                continue;
            }
            prop_assert!(!crate::proxy::is_hop_by_hop(name), "{} passed on", name);
            prop_assert!(!named.contains(&name.as_str().to_owned()), "{} is named by Connection", name);
        }

        let codings: Vec<&str> = head.values("transfer-encoding").collect();
        if !codings.is_empty() {
            prop_assert_eq!(parsed.content_length, None);
            prop_assert!(!headers.contains_key(header::CONTENT_LENGTH), "never both framings");
        } else if let Some(first) = lengths.first() {
            prop_assert_eq!(parsed.content_length, first.trim().parse::<u64>().ok());
        }

        let bodiless = head_method || matches!(head.status, 100..=199 | 204 | 304);
        let expected = if switching {
            Framing::Close
        } else if bodiless {
            Framing::None
        } else if let Some(last) = codings.last() {
            let chunked_last = last
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            if chunked_last { Framing::Chunked } else { Framing::Close }
        } else {
            match parsed.content_length {
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        prop_assert_eq!(parsed.framing, expected);
        if parsed.keep_alive {
            prop_assert_ne!(parsed.framing, Framing::Close);
            prop_assert!(!named.iter().any(|t| t == "close"));
        }
    }
}

// === bodies over a real connection ===

/// Runs one case on a current-thread runtime inside a `LocalSet`, as on an
/// actix worker (the client's types are not `Send`, and its pool spawns its
/// idle watcher locally).
fn block_on<F: std::future::Future>(case: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    tokio::task::LocalSet::new().block_on(&runtime, case)
}

/// A connected loopback pair: (the client's end, the upstream's end).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding loopback");
    let addr = listener.local_addr().expect("a local address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connecting"), accepted.expect("accepting").0)
}

/// How long a body may take in a test before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// Reads `body` to its end: the bytes, and the error it ended with, if any.
async fn drain(mut body: ResponseBody) -> (Vec<u8>, Option<BodyError>) {
    let mut got = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(err) => return Some(err),
            }
        }
        None
    };
    let err = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the body ended (cleanly or not) within the deadline");
    (got, err)
}

/// Makes `wire` arrive as the upstream's answer body after a head: its
/// first `already` bytes were read together with the head, the rest arrive
/// in the pieces `cuts` gives, then the upstream closes. Returns what the
/// body yielded, the error it ended with, and how many connections went
/// back to the pool.
fn decode(
    framing: Framing,
    wire: &[u8],
    already: usize,
    cuts: &[usize],
) -> (Vec<u8>, Option<BodyError>, usize) {
    block_on(async {
        let (io, mut upstream) = pair().await;
        let already = already.min(wire.len());
        let client = Rc::new(UpstreamClient::new("127.0.0.1", 9));
        let conn = Conn {
            io,
            read: BytesMut::from(&wire[..already]),
            write: BytesMut::new(),
            alarm: client.alarm(),
        };
        let mut pieces = Vec::new();
        let mut rest = &wire[already..];
        for &cut in cuts {
            let (piece, tail) = rest.split_at(cut.min(rest.len()));
            pieces.push(piece.to_vec());
            rest = tail;
        }
        pieces.push(rest.to_vec());
        let writer = tokio::spawn(async move {
            for piece in pieces {
                if upstream.write_all(&piece).await.is_err() {
                    return;
                }
                let _ = upstream.flush().await;
                tokio::task::yield_now().await;
            }
            let _ = upstream.shutdown().await;
        });
        let parsed = Parsed {
            status: StatusCode::OK,
            content_length: None,
            framing,
            keep_alive: true,
        };
        let answer = client.answer(conn, parsed, false, PATIENCE);
        let (got, err) = drain(answer.body).await;
        writer.abort();
        let pooled = client.idle.borrow().len();
        (got, err, pooled)
    })
}

/// One chunk on the wire, spelled in any of the ways RFC 9112 allows.
#[derive(Debug, Clone)]
struct Spelling {
    upper: bool,
    zeros: usize,
    extension: Option<String>,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    (
        any::<bool>(),
        0usize..3,
        proptest::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
    )
        .prop_map(|(upper, zeros, extension)| Spelling {
            upper,
            zeros,
            extension,
        })
}

fn size_line(len: usize, spelling: &Spelling) -> String {
    let hex = if spelling.upper {
        format!("{len:X}")
    } else {
        format!("{len:x}")
    };
    let ext = spelling
        .extension
        .as_ref()
        .map_or(String::new(), |e| format!(";{e}"));
    format!("{}{hex}{ext}\r\n", "0".repeat(spelling.zeros))
}

/// `body` cut into chunks of the given (non-zero) sizes, chunk-encoded,
/// with optional trailer fields.
fn chunk_encode(
    body: &[u8],
    sizes: &[(usize, Spelling)],
    last: &Spelling,
    trailers: &[String],
) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut rest = body;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let (size, spelling) = sizes.next().expect("cycle of a non-empty list");
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        wire.extend_from_slice(size_line(chunk.len(), spelling).as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
        rest = tail;
    }
    wire.extend_from_slice(size_line(0, last).as_bytes());
    for trailer in trailers {
        wire.extend_from_slice(trailer.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

proptest! {
    // Each case opens a loopback connection: fewer cases by default.
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// Any body, cut into chunks of any sizes, spelled any allowed way and
    /// arriving in any pieces, decodes to exactly itself, and the
    /// connection is reused afterwards.
    #[test]
    fn chunked_bodies_round_trip(
        body in vec(any::<u8>(), 0..3000),
        sizes in vec((1usize..700, spelling()), 1..6),
        last in spelling(),
        trailers in vec("X-[a-z]{1,6}: [ -~]{0,10}", 0..3),
        already in 0usize..4000,
        cuts in vec(0usize..500, 0..6),
    ) {
        let wire = chunk_encode(&body, &sizes, &last, &trailers);
        let (got, err, pooled) = decode(Framing::Chunked, &wire, already, &cuts);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got, body);
        prop_assert_eq!(pooled, 1, "a fully read keep-alive body frees its connection");
    }

    /// A chunked body cut short anywhere is an error, never a clean end.
    #[test]
    fn truncated_chunked_bodies_are_errors(
        body in vec(any::<u8>(), 1..2000),
        sizes in vec((1usize..700, spelling()), 1..4),
        cut in any::<prop::sample::Index>(),
        already in 0usize..2000,
    ) {
        let wire = chunk_encode(&body, &sizes, &spelling_plain(), &[]);
        let short = &wire[..cut.index(wire.len())];
        let (got, err, pooled) = decode(Framing::Chunked, short, already, &[]);
        prop_assert!(err.is_some(), "ended cleanly after {} of {} bytes", got.len(), body.len());
        prop_assert!(body.starts_with(&got), "what came out is a prefix of the body");
        prop_assert_eq!(pooled, 0);
    }

    /// Arbitrary bytes as a chunked or sized body never panic the decoder;
    /// it yields no more than it was sent and ends within the deadline.
    #[test]
    fn arbitrary_body_bytes_never_panic(
        wire in prop_oneof![
            vec(any::<u8>(), 0..600),
            // A valid start, then anything.
            (vec(any::<u8>(), 0..200), vec(any::<u8>(), 0..200)).prop_map(|(body, junk)| {
                let mut wire = chunk_encode(&body, &[(7, spelling_plain())], &spelling_plain(), &[]);
                let keep = wire.len() / 2;
                wire.truncate(keep);
                wire.extend_from_slice(&junk);
                wire
            }),
        ],
        framing in prop_oneof![
            Just(Framing::Chunked),
            Just(Framing::Close),
            (0u64..700).prop_map(Framing::Length),
        ],
        already in 0usize..700,
    ) {
        let (got, err, _) = decode(framing, &wire, already, &[]);
        prop_assert!(got.len() <= wire.len());
        if let Framing::Length(n) = framing {
            prop_assert!(got.len() as u64 <= n);
            prop_assert_eq!(err.is_none(), wire.len() as u64 >= n, "clean only when complete");
        }
        if framing == Framing::Close {
            prop_assert!(err.is_none());
            prop_assert_eq!(got, wire);
        }
    }

    /// Whatever chunks a request body streams as (empty ones included), the
    /// upstream receives the buffered head and then a chunked body that
    /// httparse's chunk parser decodes to exactly those bytes.
    #[test]
    fn send_chunked_output_decodes_to_the_body(
        chunks in vec(vec(any::<u8>(), 0..1500), 0..8),
    ) {
        let head = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        let sent = block_on(async {
            let (io, mut upstream) = pair().await;
            let reader = tokio::spawn(async move {
                let mut all = Vec::new();
                upstream.read_to_end(&mut all).await.map(|_| all)
            });
            let client = UpstreamClient::new("127.0.0.1", 9);
            let mut conn = Conn {
                io,
                read: BytesMut::new(),
                write: BytesMut::from(&head[..]),
                alarm: client.alarm(),
            };
            let stream = futures_util::stream::iter(
                chunks.iter().map(|c| Ok::<_, BodyError>(Bytes::copy_from_slice(c))),
            );
            let sent = conn.send_body(Frame::Chunked, stream).await.expect("sending to loopback");
            assert!(matches!(sent, Sent::Complete), "the upstream never answers here");
            drop(conn);
            tokio::time::timeout(PATIENCE, reader)
                .await
                .expect("the upstream read to the end in time")
                .expect("the reader task")
                .expect("reading loopback")
        });
        prop_assert!(sent.starts_with(head), "the head goes first");
        let mut wire = &sent[head.len()..];
        let mut decoded = Vec::new();
        loop {
            let Ok(httparse::Status::Complete((used, size))) = httparse::parse_chunk_size(wire) else {
                return Err(TestCaseError::fail(format!("bad chunk size line in {:?}", String::from_utf8_lossy(wire))));
            };
            wire = &wire[used..];
            if size == 0 {
                break;
            }
            let size = size as usize;
            prop_assert!(wire.len() >= size + 2);
            decoded.extend_from_slice(&wire[..size]);
            prop_assert_eq!(&wire[size..size + 2], b"\r\n");
            wire = &wire[size + 2..];
        }
        prop_assert_eq!(wire, b"\r\n", "no trailers, nothing after the last chunk");
        prop_assert_eq!(decoded, chunks.concat());
    }
}

fn spelling_plain() -> Spelling {
    Spelling {
        upper: false,
        zeros: 0,
        extension: None,
    }
}

/// `default` cases, or `PROPTEST_CASES` if set (which an explicit
/// `with_cases` would otherwise override).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
