//! A blocking HTTP/1.1 client that writes exactly the bytes a test gives it,
//! so tests can send what real clients would not (absolute-form targets,
//! duplicate headers, `Connection` games) and see exactly what came back.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of `name` (case-insensitive).
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).first().copied()
    }

    /// Every value of `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        super::header_values(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects with generous timeouts so a broken proxy fails the test instead
/// of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    connect_within(addr, Duration::from_secs(30))
}

/// Connects with `timeout` on every read and write.
pub fn connect_within(addr: SocketAddr, timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    stream
}

/// Writes `raw` and reads one response; errors (a truncated body, a reset)
/// are returned, not panicked on.
pub fn try_send(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let mut stream = connect(addr);
    stream.write_all(raw)?;
    let head_only = raw.starts_with(b"HEAD ");
    let mut reader = BufReader::new(stream);
    loop {
        let res = read_response(&mut reader, head_only)?;
        // Interim answers (100 Continue) precede the real one.
        if !(100..200).contains(&res.status) || res.status == 101 {
            return Ok(res);
        }
    }
}

/// As [`try_send`], panicking on any error.
pub fn send(addr: SocketAddr, raw: &[u8]) -> Response {
    try_send(addr, raw).unwrap_or_else(|e| panic!("request to {addr} failed: {e}"))
}

/// A well-formed request with `Host`, `Content-Length` (when there is a
/// body) and `Connection: close`, plus `headers`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    send(addr, &build(method, target, headers, body))
}

pub fn build(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        raw.push_str("Host: floodgate.test\r\n");
    }
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        raw.push_str("Connection: close\r\n");
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

pub fn get(addr: SocketAddr, target: &str) -> Response {
    request(addr, "GET", target, &[], b"")
}

/// Reads one response. A body shorter than its framing promised is an
/// `UnexpectedEof` error: that is how a client sees truncation.
pub fn read_response(reader: &mut impl BufRead, head_only: bool) -> io::Result<Response> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "headers cut off",
            ));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, l.to_owned()))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut res = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(res);
    }
    if res
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("bad chunk size {line:?}"),
                    )
                })?;
            if size == 0 {
                line.clear();
                reader.read_line(&mut line)?;
                break;
            }
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk)?;
            res.body.extend_from_slice(&chunk);
            let mut crlf = [0; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = res.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))?;
        res.body = vec![0; len];
        reader.read_exact(&mut res.body)?;
    } else {
        reader.read_to_end(&mut res.body)?;
    }
    Ok(res)
}
