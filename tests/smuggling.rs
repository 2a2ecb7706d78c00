//! Request smuggling: requests whose framing two HTTP parsers could read
//! differently, sent to a real floodgate in front of an upstream that
//! records every byte it receives. Each is either refused (no request reaches
//! the upstream) or harmless: the upstream sees exactly the requests the
//! client got answers for, each framed one way only, with the body floodgate
//! parsed. The known cases are checked one by one; a property test then
//! mutates them, and another sends well-formed bodies of any size in either
//! framing.
//!
//! `PROPTEST_CASES` raises the number of mutated cases (see the README).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use support::client::{Response, connect_within, read_response};
use support::{proxy, raw_upstream};

const GENEROUS: &str = "1000000/s";

/// How long one socket wait may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// What the upstream received on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A complete request, framed by one `Content-Length` or by
    /// `Transfer-Encoding: chunked` alone, with its decoded body.
    Request { target: String, body: Vec<u8> },
    /// A head that framed its body ambiguously (both framings, two
    /// lengths, a coding other than `chunked`).
    Ambiguous(String),
    /// Bytes that are not a request head: the upstream and floodgate
    /// disagree on where the last request ended.
    Garbage(Vec<u8>),
}

/// An upstream that parses what it receives as strictly as RFC 9112 asks,
/// records it, and answers `200 ok` to every complete request.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let up = raw_upstream(move |stream| serve(stream, &log));
        Recorder {
            addr: up.addr(),
            seen,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Seen>>) {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        loop {
            match reader.read_until(b'\n', &mut head) {
                Ok(0) | Err(_) => {
                    // The connection ended; a partial head is not a request.
                    return;
                }
                Ok(_) if head.ends_with(b"\r\n\r\n") || head == b"\r\n" => break,
                Ok(_) => {}
            }
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            log.lock().unwrap().push(Seen::Garbage(head));
            return;
        }
        let target = req.path.unwrap_or("").to_owned();
        let values = |name: &str| -> Vec<Vec<u8>> {
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value.to_vec())
                .collect()
        };
        let lengths = values("content-length");
        let codings = values("transfer-encoding");
        let text = String::from_utf8_lossy(&head).into_owned();
        let body = match (&lengths[..], &codings[..]) {
            ([], []) => Some(Vec::new()),
            ([len], []) => match std::str::from_utf8(len).ok().and_then(|l| l.parse().ok()) {
                Some(len) if len < 1 << 20 => {
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).ok().map(|()| body)
                }
                _ => {
                    log.lock().unwrap().push(Seen::Ambiguous(text));
                    return;
                }
            },
            ([], [coding]) if coding == b"chunked" => read_chunked(&mut reader),
            _ => {
                log.lock().unwrap().push(Seen::Ambiguous(text));
                return;
            }
        };
        // A body cut short was never a request.
        let Some(body) = body else { return };
        log.lock().unwrap().push(Seen::Request { target, body });
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// A chunked body, decoded strictly; `None` if it is cut short or
/// malformed.
fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).ok()?;
        let Ok(httparse::Status::Complete((_, size))) = httparse::parse_chunk_size(&line) else {
            return None;
        };
        if size == 0 {
            break;
        }
        let mut chunk = vec![0; usize::try_from(size).ok().filter(|&s| s < 1 << 20)?];
        reader.read_exact(&mut chunk).ok()?;
        body.extend_from_slice(&chunk);
        let mut crlf = [0; 2];
        reader.read_exact(&mut crlf).ok()?;
        if &crlf != b"\r\n" {
            return None;
        }
    }
    // Trailer fields up to the blank line.
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        if line == b"\r\n" {
            return Some(body);
        }
    }
}

/// Sends `raw` on one connection, closes the sending side, and reads every
/// answer until floodgate closes the connection.
fn answers(addr: SocketAddr, raw: &[u8]) -> Vec<Response> {
    let stream = connect_within(addr, PATIENCE);
    let mut writer = stream.try_clone().unwrap();
    // floodgate may refuse before reading everything and close: a failed
    // write is part of the answer, not a test failure.
    let _ = writer.write_all(raw);
    let _ = writer.shutdown(Shutdown::Write);
    let mut reader = BufReader::new(stream);
    let mut all = Vec::new();
    while let Ok(res) = read_response(&mut reader, false) {
        all.push(res);
    }
    all
}

/// What a case did: floodgate's answers and what the upstream received.
struct Outcome {
    answers: Vec<Response>,
    seen: Vec<Seen>,
}

impl Outcome {
    fn forwarded(&self) -> Vec<(&str, &[u8])> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Request { target, body } => Some((target.as_str(), body.as_slice())),
                _ => None,
            })
            .collect()
    }

    fn upstream_answers(&self) -> usize {
        self.answers
            .iter()
            .filter(|r| r.status == 200 && r.body == b"ok")
            .count()
    }

    /// Holds for every request, however malformed: the upstream never sees
    /// a framing it could read two ways or bytes outside any request, and
    /// sees exactly as many requests as the client got its answers for.
    fn harmless(&self) -> Result<(), String> {
        for seen in &self.seen {
            if !matches!(seen, Seen::Request { .. }) {
                return Err(format!("the upstream received {seen:?}"));
            }
        }
        let forwarded = self.forwarded().len();
        let answered = self.upstream_answers();
        if forwarded != answered {
            return Err(format!(
                "the upstream saw {forwarded} requests, the client got {answered} answers from it"
            ));
        }
        Ok(())
    }
}

fn run(raw: &[u8]) -> Outcome {
    let up = Recorder::start();
    let fg = proxy(up.addr).rate(GENEROUS).run();
    let answers = answers(fg.addr, raw);
    drop(fg);
    Outcome {
        answers,
        seen: up.seen(),
    }
}

/// What a known case must come to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refused: `400`, and nothing reaches the upstream.
    Refused,
    /// A malformed body: refused with `400` or by closing the connection,
    /// and nothing reaches the upstream.
    BadBody,
    /// One request reaches the upstream, with this body.
    Forwarded(&'static [u8]),
}

/// The known smuggling pairs: framing headers that parsers have read
/// differently (RFC 9112 §6.3 and §11.2; hyper's `role.rs` refuses the same).
/// Each carries a second request where a parser that got the framing wrong
/// would find one.
const CASES: &[(&str, &[u8], Expect)] = &[
    (
        "two different Content-Lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 41\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    (
        "two equal Content-Lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "a Content-Length list",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 41\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Content-Length and Transfer-Encoding (CL.TE)",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Transfer-Encoding and Content-Length (TE.CL)",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n2c\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Transfer-Encoding not ending in chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Transfer-Encoding: gzip",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Transfer-Encoding: identity",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "a coding after chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "chunked twice",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "xchunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "quoted chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Content-Length: +5",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "Content-Length: -5",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "Content-Length in hex",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "Content-Length with an inner space",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "obs-fold continuing Transfer-Encoding",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "obs-fold hiding a Transfer-Encoding line",
        b"POST /a HTTP/1.1\r\nHost: x\r\nX-Note: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "bare CR between headers",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\rTransfer-Encoding: chunked\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "a space before the colon",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Refused,
    ),
    (
        "a vertical tab before chunked",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Expect::Refused,
    ),
    (
        "a chunk size with a sign",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        Expect::BadBody,
    ),
    (
        "a chunk size in 0x hex",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        Expect::BadBody,
    ),
    (
        "a chunk size that overflows 64 bits",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        Expect::BadBody,
    ),
    (
        "chunk data longer than its size",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        Expect::BadBody,
    ),
    (
        "Upgrade: websocket with a body",
        b"POST /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Refused,
    ),
    // Spellings that mean plain chunked or a plain length: forwarded, with
    // floodgate's own single framing.
    (
        "Chunked in capitals",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Expect::Forwarded(b"hello"),
    ),
    (
        "chunked with surrounding whitespace",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \t chunked \t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Expect::Forwarded(b"hello"),
    ),
    (
        "a lower-case header name",
        b"POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Expect::Forwarded(b"hello"),
    ),
    (
        "chunk extensions and trailers",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
        Expect::Forwarded(b"hello"),
    ),
    (
        "a smuggled request inside a chunk stays body",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n23\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        Expect::Forwarded(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
    ),
    (
        "Content-Length with whitespace",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length:   5 \t\r\n\r\nhello",
        Expect::Forwarded(b"hello"),
    ),
    (
        "a smuggled request inside a sized body stays body",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Expect::Forwarded(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
    ),
];

#[test]
fn known_smuggling_cases_are_refused_or_harmless() {
    let mut failures = Vec::new();
    for (name, raw, expect) in CASES {
        let outcome = run(raw);
        let statuses: Vec<u16> = outcome.answers.iter().map(|r| r.status).collect();
        let problem = outcome.harmless().err().or_else(|| match expect {
            Expect::Refused => (!outcome.forwarded().is_empty() || statuses != [400])
                .then(|| format!("expected a 400 and nothing forwarded, got {statuses:?}")),
            Expect::BadBody => (!outcome.forwarded().is_empty()
                || statuses.iter().any(|&s| s != 400))
            .then(|| format!("expected a 400 or a close, nothing forwarded, got {statuses:?}")),
            Expect::Forwarded(body) => (outcome.forwarded() != [("/a", *body)])
                .then(|| format!("expected /a with {body:?} forwarded, got {statuses:?}")),
        });
        if let Some(problem) = problem {
            failures.push(format!(
                "{name}: {problem}; the upstream saw {:?}",
                outcome.seen
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One edit of a known case's head: bytes that matter to HTTP framing
/// inserted, deleted, doubled or replaced.
#[derive(Debug, Clone)]
enum Edit {
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Replace(prop::sample::Index, u8),
    DuplicateLine(prop::sample::Index),
    FlipCase(prop::sample::Index),
}

fn framing_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b" \t\r\n,:;0159aAfF+-\"\x0b\x00\x7f\xff".to_vec())
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), framing_byte()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), framing_byte()).prop_map(|(i, b)| Edit::Replace(i, b)),
        any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
        any::<prop::sample::Index>().prop_map(Edit::FlipCase),
    ]
}

/// `raw` with `edits` applied after its request line (edits to the line
/// itself only make a request floodgate refuses, which teaches nothing).
fn mutate(raw: &[u8], edits: &[Edit]) -> Vec<u8> {
    let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let (line, rest) = raw.split_at(line_end);
    let mut rest = rest.to_vec();
    for edit in edits {
        if rest.is_empty() {
            break;
        }
        match edit {
            Edit::Insert(i, b) => rest.insert(i.index(rest.len() + 1), *b),
            Edit::Delete(i) => {
                rest.remove(i.index(rest.len()));
            }
            Edit::Replace(i, b) => {
                let at = i.index(rest.len());
                rest[at] = *b;
            }
            Edit::DuplicateLine(i) => {
                let at = i.index(rest.len());
                let start = rest[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = rest[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |p| at + p + 1);
                let copy = rest[start..end].to_vec();
                rest.splice(start..start, copy);
            }
            Edit::FlipCase(i) => {
                let at = i.index(rest.len());
                if rest[at].is_ascii_uppercase() {
                    rest[at] = rest[at].to_ascii_lowercase();
                } else {
                    rest[at] = rest[at].to_ascii_uppercase();
                }
            }
        }
    }
    [line, &rest[..]].concat()
}

/// `default` cases, or `PROPTEST_CASES` if set.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    // Each case starts its own floodgate and upstream.
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    /// However a known case is edited, what reaches the upstream is never
    /// framed two ways, never falls outside a request, and is exactly the
    /// requests the client got answers for.
    #[test]
    fn mutated_smuggling_cases_stay_harmless(
        case in 0..CASES.len(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        let raw = mutate(CASES[case].1, &edits);
        let outcome = run(&raw);
        if let Err(problem) = outcome.harmless() {
            return Err(TestCaseError::fail(format!(
                "{problem}\nsent {:?}\nthe upstream saw {:?}",
                String::from_utf8_lossy(&raw),
                outcome.seen
            )));
        }
    }
}

/// A client body in one framing or the other, as a client would send it.
fn framed_request(body: &[u8], chunks: Option<&[usize]>) -> Vec<u8> {
    let mut raw = b"POST /a HTTP/1.1\r\nHost: x\r\n".to_vec();
    match chunks {
        None => {
            raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(body);
        }
        Some(sizes) => {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            let mut rest = body;
            let mut sizes = sizes.iter().cycle();
            while !rest.is_empty() {
                let size = (*sizes.next().expect("a non-empty list")).min(rest.len());
                let (chunk, tail) = rest.split_at(size);
                raw.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                raw.extend_from_slice(chunk);
                raw.extend_from_slice(b"\r\n");
                rest = tail;
            }
            raw.extend_from_slice(b"0\r\n\r\n");
        }
    }
    raw
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(32)))]

    /// Any body, sized or chunked any way, reaches the upstream exactly,
    /// in floodgate's own single framing, as one request.
    #[test]
    fn bodies_arrive_exactly_in_one_framing(
        body in prop::collection::vec(any::<u8>(), 0..20_000),
        chunks in proptest::option::of(prop::collection::vec(1usize..5000, 1..5)),
    ) {
        let raw = framed_request(&body, chunks.as_deref());
        let outcome = run(&raw);
        prop_assert!(outcome.harmless().is_ok(), "{:?}", outcome.harmless());
        prop_assert_eq!(outcome.forwarded(), vec![("/a", &body[..])]);
    }
}
