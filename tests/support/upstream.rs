//! Fake upstreams. [`upstream`] is a recording actix-web server with routes;
//! [`raw_upstream`] hands each accepted TCP connection to a closure, for the
//! misbehaviour no real web server volunteers (resets, stalls, truncation).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: Option<SocketAddr>,
}

impl Recorded {
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).first().copied()
    }

    /// Every value of `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        super::header_values(&self.headers, name)
    }
}

/// What a route answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

pub struct UpstreamBuilder {
    routes: HashMap<String, Handler>,
    latency: Duration,
}

/// A recording upstream. Unrouted paths answer `200 ok`.
pub fn upstream() -> UpstreamBuilder {
    UpstreamBuilder {
        routes: HashMap::new(),
        latency: Duration::ZERO,
    }
}

impl UpstreamBuilder {
    /// `path` (without query) answers 200 with `body`.
    pub fn route(self, path: &str, body: &str) -> Self {
        let body = body.to_owned();
        self.route_fn(path, move |_| Reply::ok(body.clone()))
    }

    pub fn route_fn(
        mut self,
        path: &str,
        f: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes.insert(path.to_owned(), Arc::new(f));
        self
    }

    /// Every answer waits this long first.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn run(self) -> UpstreamServer {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            routes: self.routes,
            latency: self.latency,
            recorded: recorded.clone(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::from(state.clone()))
                        .app_data(web::PayloadConfig::new(usize::MAX))
                        .default_service(web::to(handle))
                })
                .workers(2)
                .disable_signals()
                .shutdown_timeout(1)
                .listen(listener)
                .unwrap()
                .run();
                tx.send(server.handle()).unwrap();
                server.await
            })
        });
        let handle = rx.recv().expect("upstream started");
        UpstreamServer {
            addr,
            recorded,
            handle,
            thread: Some(thread),
        }
    }
}

struct State {
    routes: HashMap<String, Handler>,
    latency: Duration,
    recorded: Arc<Mutex<Vec<Recorded>>>,
}

async fn handle(req: HttpRequest, body: web::Bytes, state: web::Data<State>) -> HttpResponse {
    let recorded = Recorded {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        peer: req.peer_addr(),
    };
    state.recorded.lock().unwrap().push(recorded.clone());
    if !state.latency.is_zero() {
        actix_web::rt::time::sleep(state.latency).await;
    }
    let reply = match state.routes.get(req.path()) {
        Some(handler) => handler(&recorded),
        None => Reply::ok("ok"),
    };
    let mut res = HttpResponse::build(StatusCode::from_u16(reply.status).unwrap());
    for (k, v) in &reply.headers {
        res.append_header((k.as_str(), v.as_str()));
    }
    res.body(reply.body)
}

pub struct UpstreamServer {
    addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    handle: ServerHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl UpstreamServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        self.recorded.lock().unwrap().len()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    /// The only request received; panics if there was not exactly one.
    pub fn only(&self) -> Recorded {
        let all = self.recorded();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one upstream request, got {all:#?}"
        );
        all.into_iter().next().unwrap()
    }
}

impl Drop for UpstreamServer {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        let _ = std::thread::spawn(move || futures_executor(handle.stop(false))).join();
        if let Some(thread) = self.thread.take() {
            let joined = thread.join();
            if !std::thread::panicking() {
                joined
                    .expect("upstream thread panicked")
                    .expect("upstream server failed");
            }
        }
    }
}

/// Drives a future to completion on a throwaway runtime.
pub fn futures_executor<F: std::future::Future>(fut: F) -> F::Output {
    actix_web::rt::System::new().block_on(fut)
}

// === raw upstream ===

/// A TCP listener whose every connection is handled by `serve` on its own
/// thread. Counts connections.
pub struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

pub fn raw_upstream(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            count.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    RawUpstream { addr, connections }
}

/// Reads a request head (through the blank line) and returns it as text.
pub fn read_head(reader: &mut impl BufRead) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return head,
            Ok(_) => {}
        }
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

/// Reads a head and exactly `Content-Length` body bytes, if any.
pub fn read_request(stream: &TcpStream) -> (String, Vec<u8>) {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    let _ = reader.read_exact(&mut body);
    (head, body)
}
