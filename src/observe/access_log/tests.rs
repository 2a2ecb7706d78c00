use super::*;

fn entry<'a>(path: &'a str, key: Option<&'a str>) -> Entry<'a> {
    Entry {
        method: "GET",
        path,
        status: 429,
        bytes: 12,
        total: Duration::from_micros(1_234),
        upstream: None,
        rule: Some("login"),
        decision: Some("limited"),
        decided_by: Some("backend"),
        limit: Some("login.daily"),
        client: Some("192.0.2.7".parse().unwrap()),
        key,
    }
}

#[test]
fn text_lines_are_logfmt_with_absent_fields_left_out() {
    let mut out = Vec::new();
    entry("/a/b", None).write_text(&mut out).unwrap();
    let line = String::from_utf8(out).unwrap();
    let rest = line.split_once(' ').unwrap().1;
    assert_eq!(
        rest,
        "method=GET path=/a/b status=429 bytes=12 total_ms=1.234 rule=login \
         decision=limited decided_by=backend limit=login.daily client=192.0.2.7\n"
    );
    assert!(line.starts_with("time=20"), "{line}");
}

#[test]
fn text_values_that_could_break_a_line_are_quoted_and_escaped() {
    let mut out = Vec::new();
    text_value(&mut out, b"/a b\"c\\d=\n\x01\xff");
    assert_eq!(out, br#""/a b\"c\\d=\x0a\x01\xff""#);
    let mut out = Vec::new();
    text_value(&mut out, b"");
    assert_eq!(out, b"\"\"");
}

#[test]
fn json_lines_parse_with_every_field() {
    let mut out = Vec::new();
    entry("/we\"ird\u{1}/é", Some("h:00ff"))
        .write_json(&mut out)
        .unwrap();
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["path"], "/we\"ird\u{1}/é");
    assert_eq!(v["status"], 429);
    assert_eq!(v["total_ms"], 1.234);
    assert!(v["upstream_ms"].is_null());
    assert_eq!(v["limit"], "login.daily");
    assert_eq!(v["client"], "192.0.2.7");
    assert_eq!(v["key"], "h:00ff");
    v["time"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .unwrap();
}

#[test]
fn header_and_composite_keys_are_secret_addresses_are_not() {
    use actix_web::http::header::HeaderValue;
    let ip = RateKey::ip("192.0.2.1".parse().unwrap());
    let header = RateKey::header(HeaderValue::from_static("sk"));
    assert!(!is_secret(&ip));
    assert!(!is_secret(&RateKey::global()));
    assert!(is_secret(&header));
    assert!(is_secret(&RateKey::composite([header, ip])));
}

/// A writer that records what reached it.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[actix_web::test]
async fn a_line_is_written_when_the_body_ends_or_is_dropped() {
    let sink = Sink::default();
    let log = AccessLog::to_writer(
        LogFormat::Json,
        Fingerprinter::new(b"floodgate:"),
        ClientIp::new(),
        sink.clone(),
    )
    .unwrap();
    let closed = log.closed();
    let worker = log.worker();
    let started = Instant::now();

    // Read to its end.
    let req = actix_web::test::TestRequest::get()
        .uri("/done?token=secret")
        .peer_addr("192.0.2.9:5555".parse().unwrap())
        .to_http_request();
    let body = Logged::new(
        Bytes::from_static(b"hello"),
        worker.start(req, StatusCode::OK, started, None),
    );
    let bytes = actix_web::body::to_bytes(body).await.unwrap();
    assert_eq!(bytes, "hello");

    // Dropped before a byte was read: the client went away.
    let req = actix_web::test::TestRequest::get()
        .uri("/gone")
        .to_http_request();
    drop(Logged::new(
        Bytes::from_static(b"never read"),
        worker.start(req, StatusCode::OK, started, None),
    ));

    drop(worker);
    drop(log);
    assert!(closed.wait(Duration::from_secs(10)), "writer thread ended");
    let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["path"], "/done");
    assert_eq!(lines[0]["bytes"], 5);
    assert_eq!(lines[0]["client"], "192.0.2.9");
    assert!(
        lines[0]["rule"].is_null(),
        "no verdict: the gate never saw it"
    );
    assert_eq!(lines[1]["path"], "/gone");
    assert_eq!(lines[1]["bytes"], 0);
    assert!(!out.contains("secret"));
}

#[actix_web::test]
async fn a_full_queue_drops_lines_and_counts_them() {
    // A writer that blocks until released: the queue fills.
    struct Stuck(mpsc::Receiver<()>);
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let (release, stuck) = mpsc::channel();
    let log = AccessLog::to_writer(
        LogFormat::Text,
        Fingerprinter::new(b"floodgate:"),
        ClientIp::new(),
        Stuck(stuck),
    )
    .unwrap();
    let worker = log.worker();
    // One batch is taken by the thread and stuck there, QUEUE_BATCHES
    // wait; every batch after that is dropped, never waited for.
    let sent = QUEUE_BATCHES as u64 + 10;
    for _ in 0..sent {
        worker.write(&entry("/", None));
        worker.flush();
    }
    let dropped = log.dropped();
    let queued = QUEUE_BATCHES as u64;
    assert!(
        (sent - queued - 1..=sent - queued).contains(&dropped),
        "{dropped} of {sent} dropped"
    );
    drop(release);
}
