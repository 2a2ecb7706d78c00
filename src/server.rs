//! Wiring: settings → backend, middleware and forwarder → two listeners.
//!
//! Clients are served on `listen`; `/healthz`, `/readyz` and `/metrics` on
//! `admin_listen`, a separate server, so client traffic can never reach them.
//! The backend is built once, here, and shared by every worker.
//!
//! Every client connection is bounded here in number (`max_connections`) and
//! in the time a write toward it may stall (`send_timeout`); see
//! [`client_on_connect`] and [`per_worker`].

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::dev::{Extensions, Server, ServerHandle};
use actix_web::http::KeepAlive;
use actix_web::{App, HttpServer};
use anyhow::Context as _;

use crate::admin::{self, Access, Admin, LastReload, ReloadStatus};
use crate::key::{ClientIp, Fingerprinter};
use crate::limiter::{Backend, Fallback, MemoryBackend, RedisBackend, RedisTarget};
use crate::middleware::{FailurePolicy, RateLimit};
use crate::observe::{AccessLog, Board, Metrics, Observe};
use crate::proxy::{self, Upstream};
use crate::settings::{BackendKind, Settings, redact_url};

/// How often idle keys are dropped from in-memory state.
pub const RETAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Client keep-alive, as nginx's `keepalive_timeout` default.
const KEEP_ALIVE: Duration = Duration::from_secs(75);

/// Everything one floodgate process serves with, built once.
#[derive(Clone)]
pub struct Floodgate {
    /// The settings everything below was built from.
    pub settings: Settings,
    /// The limiter state every worker shares; `/readyz` asks its
    /// [`health`](Backend::health).
    pub backend: Arc<dyn Backend>,
    /// The middleware that charges each client request against the rules
    /// (`settings.policy`), already holding `backend`, the client address
    /// resolution and the header style; [`reload`](Self::reload) swaps its
    /// rules.
    pub rate_limit: RateLimit,
    /// Where allowed requests go, with every upstream setting applied; each
    /// worker builds its own forwarder (and connection pool) from a clone.
    pub upstream: Upstream,
    /// Counters served as `/metrics`, shared by the middleware, the forwarder
    /// and (with Redis) the backend.
    pub metrics: Arc<Metrics>,
    /// The outcome of the last reload, for `GET /rules`.
    pub last_reload: Arc<ReloadStatus>,
    /// Fingerprints of keys, as Redis key names carry them (scoped by the
    /// Redis prefix): logs and `/rules` show secrets only this way.
    pub fingerprints: Fingerprinter,
    /// The access log on stdout (`FLOODGATE_ACCESS_LOG`), if it is on.
    pub access_log: Option<AccessLog>,
    /// The status page's live counters, fed by [`Observe`] on the client
    /// listener and read by the admin listener.
    pub board: Arc<Board>,
    draining: Arc<AtomicBool>,
}

impl Floodgate {
    /// The parts the admin listener reads.
    pub fn admin(&self) -> Admin {
        Admin {
            backend: self.backend.clone(),
            rate_limit: self.rate_limit.clone(),
            metrics: self.metrics.clone(),
            last_reload: self.last_reload.clone(),
            fingerprints: self.fingerprints.clone(),
            draining: self.draining.clone(),
            board: self.board.clone(),
            redis_failure: self.settings.redis.failure,
            access: Access::new(self.settings.admin_token.clone()),
            access_log: self.access_log.clone(),
        }
    }

    /// Builds the backend the settings ask for.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        if let Some(everyone) = settings
            .trusted_proxies
            .iter()
            .find(|net| net.prefix_len() == 0)
        {
            log::warn!(
                "FLOODGATE_TRUSTED_PROXIES includes {everyone}: every client is trusted, so every \
                 client can name its own address in X-Forwarded-For"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let backend: Arc<dyn Backend> = match settings.backend {
            BackendKind::Memory => Arc::new(
                MemoryBackend::new(settings.max_keys).fingerprints(fingerprints(&settings)),
            ),
            BackendKind::Redis => {
                let redis = &settings.redis;
                let target = if redis.cluster.is_empty() {
                    RedisTarget::Single(redis.url.clone())
                } else {
                    RedisTarget::Cluster(redis.cluster.clone())
                };
                Arc::new(
                    RedisBackend::new(
                        target,
                        redis.prefix.clone(),
                        redis.timeout,
                        redis.failure,
                        settings.max_keys,
                    )
                    .map(|backend| backend.metrics(metrics.clone()))
                    .map_err(|e| {
                        anyhow::anyhow!("FLOODGATE_REDIS_URL: {}", redact_url(&e.to_string()))
                    })?,
                )
            }
        };
        Self::assemble(settings, backend, metrics)
    }

    /// As [`new`](Self::new) with a given backend.
    pub fn with_backend(settings: Settings, backend: Arc<dyn Backend>) -> anyhow::Result<Self> {
        Self::assemble(settings, backend, Arc::default())
    }

    fn assemble(
        settings: Settings,
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let upstream = Upstream::new(&settings.upstream)
            .with_context(|| format!("FLOODGATE_UPSTREAM={}", settings.upstream))?
            .timeout(settings.upstream_timeout)
            .client_timeout(settings.client_timeout)
            .websocket_idle_timeout(settings.websocket_idle_timeout)
            .host_header(settings.host_header)
            .max_body(settings.max_body)
            .reuse_after_body(settings.upstream_reuse_after_body)
            .trust(settings.trusted_proxies.iter().copied());
        let upstream = upstream.metrics(metrics.clone());
        let fingerprints = fingerprints(&settings);
        let board = Arc::new(Board::new(fingerprints.clone()));
        let rate_limit = RateLimit::from_rules(backend.clone(), settings.policy.rules.clone())
            .client_ip(client_ip(&settings))
            .fingerprints(fingerprints.clone())
            .headers(settings.headers)
            .on_backend_error(match settings.redis.failure {
                Fallback::Closed => FailurePolicy::Closed,
                Fallback::Open | Fallback::Local => FailurePolicy::Open,
            })
            .metrics(metrics.clone());
        let access_log = settings
            .access_log
            .map(|format| AccessLog::stdout(format, fingerprints.clone(), client_ip(&settings)))
            .transpose()
            .context("FLOODGATE_ACCESS_LOG: starting the access-log writer")?;
        Ok(Floodgate {
            settings,
            backend,
            rate_limit,
            upstream,
            metrics,
            last_reload: Arc::default(),
            fingerprints,
            access_log,
            board,
            draining: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Reads the settings file again and, if it is valid, swaps the rules
    /// atomically: no connection or in-flight request is dropped, and
    /// limits whose name and algorithm are unchanged keep their counters.
    /// The environment is not read again, and only the rules change (the
    /// other settings need a restart). An invalid file is refused with one
    /// line per problem, each logged, and the old rules stay. The outcome
    /// is kept for `GET /rules`.
    pub fn reload(&self) -> Result<(), Vec<String>> {
        match self.settings.reload() {
            Ok(rules) => {
                let count = rules.rules().count();
                self.rate_limit.reload(rules);
                self.last_reload.set(LastReload::ok());
                self.metrics.reloaded(true);
                log::info!("rules reloaded: {count} rules and the default");
                Ok(())
            }
            Err(err) => {
                for problem in &err.problems {
                    log::error!("reload refused, the old rules stay: {problem}");
                }
                self.last_reload
                    .set(LastReload::refused(err.problems.clone()));
                self.metrics.reloaded(false);
                Err(err.problems)
            }
        }
    }
}

/// How keys are fingerprinted: scoped by `FLOODGATE_REDIS_PREFIX`, as Redis
/// key names are, so logs, admin answers and every replica agree.
pub fn fingerprints(settings: &Settings) -> Fingerprinter {
    Fingerprinter::new(settings.redis.prefix.as_bytes())
}

/// How client addresses are resolved: `FLOODGATE_TRUSTED_PROXIES` and
/// `FLOODGATE_IPV6_PREFIX`.
pub fn client_ip(settings: &Settings) -> ClientIp {
    ClientIp::new()
        .trust(settings.trusted_proxies.iter().copied())
        .ipv6_prefix(settings.ipv6_prefix)
}

/// Both listening sockets, bound before anything is served so that a port in
/// use stops startup with a clear error.
pub struct Listeners {
    /// Bound to `listen`: client traffic.
    pub main: TcpListener,
    /// Bound to `admin_listen`: `/healthz`, `/readyz` and `/metrics`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen` and `admin_listen`, reporting every failure.
    pub fn bind(settings: &Settings) -> Result<Self, Vec<String>> {
        let main = bind_one("FLOODGATE_LISTEN", settings.listen);
        let admin = bind_one("FLOODGATE_ADMIN_LISTEN", settings.admin_listen);
        match (main, admin) {
            (Ok(main), Ok(admin)) => Ok(Listeners { main, admin }),
            (main, admin) => Err([main.err(), admin.err()].into_iter().flatten().collect()),
        }
    }
}

/// Connections the kernel completes and holds until floodgate accepts them
/// (the `listen(2)` backlog): actix-web's own default. `TcpListener::bind`
/// gives 128, and once every worker is at its `max_connections` share the
/// 130th waiting client would have its handshake dropped and retried (after
/// 1 s, 3 s, …) instead of waiting in line. Linux caps it at
/// `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 1024;

fn bind_one(var: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    listen_on(addr).map_err(|e| format!("{var}={addr}: cannot listen: {e}"))
}

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As `TcpListener::bind` does: a restart binds while the last run's
    // connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

// === connection bounds ===

/// Each worker's share of `max_connections` (`HttpServer::max_connections`
/// counts per worker): rounded down, so the process never holds more than
/// `max_connections`, but at least one, so every worker serves.
pub fn per_worker(max_connections: usize, workers: usize) -> usize {
    (max_connections / workers.max(1)).max(1)
}

/// The client listener's `on_connect`: [`proxy::on_connect`]'s per-connection
/// peer, plus `send_timeout` as the socket's `TCP_USER_TIMEOUT`.
///
/// With it the kernel drops the connection when bytes it has for the client
/// stay unacknowledged for `send_timeout`, or stay unsent because the client
/// keeps its receive window at zero (it stopped reading) that long: Linux
/// counts the time its zero-window probes go unanswered by an open window
/// (tests/connections.rs checks this; older kernels differed). Any write floodgate
/// is waiting on then fails: actix-http drops the response body, and with it
/// the upstream connection mid-answer, which is closed, never pooled; a
/// WebSocket tunnel ends both ways. This is nginx's `send_timeout` ("between
/// two successive write operations, not for the transmission of the whole
/// response"), measured on acknowledged progress rather than on writes into
/// floodgate's own buffers, and with no timer per write. Go's
/// `http.Server.WriteTimeout` is different: one deadline for the whole
/// response, which would cut long downloads and tunnels.
pub fn client_on_connect(
    upstream: &Upstream,
    send_timeout: Duration,
) -> impl Fn(&dyn std::any::Any, &mut Extensions) + Send + Sync + 'static {
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    log::warn!(
        "FLOODGATE_SEND_TIMEOUT is not enforced on this system (no TCP_USER_TIMEOUT): \
         a client that stops reading holds its connection until the kernel gives up"
    );
    let peer = proxy::on_connect(upstream);
    move |conn, extensions| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>()
            && let Err(err) = set_send_timeout(tcp, send_timeout)
        {
            log::debug!("cannot set the send timeout on a client connection: {err}");
        }
        peer(conn, extensions);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_send_timeout(tcp: &actix_web::rt::net::TcpStream, timeout: Duration) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout))
}

// TODO: elsewhere there is no TCP_USER_TIMEOUT; a client that stops reading
// is then not bounded (`client_on_connect` warns once at startup).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_send_timeout(
    _tcp: &actix_web::rt::net::TcpStream,
    _timeout: Duration,
) -> std::io::Result<()> {
    Ok(())
}

/// Open files a process needs for `max_connections`: a client and an
/// upstream connection each, plus a reserve for pooled upstream connections
/// (up to 256 per worker), listeners, Redis and the runtime.
fn files_needed(max_connections: usize, workers: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256 * workers as u64 + 64)
}

/// For the binary: raises the open-file soft limit to the hard limit, as
/// nginx's `worker_rlimit_nofile` and Go's runtime do (the soft limit is
/// often 1024, which a proxy reaches at about 500 clients), and logs the
/// result once. A failure is a warning; so is a limit too low for
/// `max_connections` (nginx warns the same way): floodgate still serves, and
/// past the limit new connections wait until files are free. Embedders own
/// their process's limits and do not call this.
pub fn raise_open_file_limit(settings: &Settings) {
    use rlimit::Resource;
    let soft = match Resource::NOFILE.get() {
        Ok((soft, hard)) if soft >= hard => {
            log::info!("open files: soft limit {soft} is already the hard limit {hard}");
            soft
        }
        Ok((soft, hard)) => match Resource::NOFILE.set(hard, hard) {
            Ok(()) => {
                log::info!("open files: soft limit raised from {soft} to the hard limit {hard}");
                hard
            }
            Err(err) => {
                log::warn!(
                    "open files: cannot raise the soft limit {soft} to the hard limit {hard}: {err}"
                );
                soft
            }
        },
        Err(err) => {
            log::warn!("open files: cannot read the limit: {err}");
            return;
        }
    };
    let needed = files_needed(settings.max_connections, settings.workers);
    if soft < needed {
        log::warn!(
            "FLOODGATE_MAX_CONNECTIONS={} needs about {needed} open files but the limit is {soft}: \
             past it connections wait or fail (502); raise the hard limit (ulimit -Hn, \
             LimitNOFILE=, docker --ulimit nofile=) or lower FLOODGATE_MAX_CONNECTIONS",
            settings.max_connections
        );
    }
}

/// The running servers.
pub struct Running {
    /// The address clients are served on (with port 0 in `listen`, the port
    /// the kernel chose).
    pub addr: SocketAddr,
    /// The address the admin endpoints are served on.
    pub admin_addr: SocketAddr,
    main: Server,
    admin: Server,
    floodgate: Floodgate,
}

/// Starts serving on `listeners`. Must be called within an actix system.
/// Signals are not handled here; see [`Running::until_signal`].
pub fn start(floodgate: Floodgate, listeners: Listeners) -> anyhow::Result<Running> {
    let settings = &floodgate.settings;
    let addr = listeners
        .main
        .local_addr()
        .context("reading the listen address")?;
    let admin_addr = listeners
        .admin
        .local_addr()
        .context("reading the admin address")?;

    let rate_limit = floodgate.rate_limit.clone();
    let upstream = floodgate.upstream.clone();
    // Outermost: an oversize body is refused before it is charged.
    let max_body = proxy::MaxBody::new(settings.max_body);
    // Outside that: every answer is observed, a 413 included.
    let observe = Observe::new(floodgate.metrics.clone(), floodgate.board.clone())
        .access_log(floodgate.access_log.clone());
    let main = HttpServer::new(move || {
        App::new()
            .wrap(rate_limit.clone())
            .wrap(max_body)
            .wrap(observe.clone())
            .configure(proxy::configure(upstream.clone()))
    })
    .on_connect(client_on_connect(
        &floodgate.upstream,
        settings.send_timeout,
    ))
    .workers(settings.workers)
    .max_connections(per_worker(settings.max_connections, settings.workers))
    .tcp_nodelay(true)
    .keep_alive(KeepAlive::Timeout(KEEP_ALIVE))
    .client_request_timeout(settings.client_timeout)
    .shutdown_timeout(settings.shutdown_timeout.as_secs_f64().ceil() as u64)
    .disable_signals()
    .listen(listeners.main)
    .with_context(|| format!("serving on {addr}"))?
    .run();

    let admin = admin::configure(floodgate.admin());
    let admin = HttpServer::new(move || App::new().configure(admin.clone()))
        .workers(1)
        .client_request_timeout(settings.client_timeout)
        .shutdown_timeout(1)
        .disable_signals()
        .listen(listeners.admin)
        .with_context(|| format!("serving admin on {admin_addr}"))?
        .run();

    // `Backend::start` runs when the first worker builds its middleware.
    let backend = floodgate.backend.clone();
    actix_web::rt::spawn(async move {
        let mut ticks = actix_web::rt::time::interval(RETAIN_INTERVAL);
        loop {
            ticks.tick().await;
            backend.retain_recent();
        }
    });

    Ok(Running {
        addr,
        admin_addr,
        main,
        admin,
        floodgate,
    })
}

impl Running {
    /// Handles to stop the servers from elsewhere (tests).
    pub fn handles(&self) -> (ServerHandle, ServerHandle) {
        (self.main.handle(), self.admin.handle())
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully: `/readyz`
    /// turns 503, the listener closes, in-flight requests get up to
    /// `shutdown_timeout` to finish, and the call returns. SIGHUP reloads
    /// the rules ([`Floodgate::reload`]) and never stops the process.
    pub async fn until_signal(self) -> anyhow::Result<()> {
        let main_handle = self.main.handle();
        let draining = self.floodgate.draining.clone();
        let timeout = self.floodgate.settings.shutdown_timeout;
        // Installed before anything else runs, so that from here on a SIGHUP
        // is a reload, never the default action (which ends the process).
        let mut signals = Signals::install();
        let floodgate = self.floodgate.clone();
        actix_web::rt::spawn(async move {
            let signal = loop {
                match signals.next().await {
                    "SIGHUP" => {
                        log::info!("SIGHUP received: reloading the rules");
                        let floodgate = floodgate.clone();
                        // The file is read off the runtime's thread.
                        let _ =
                            actix_web::rt::task::spawn_blocking(move || floodgate.reload()).await;
                    }
                    other => break other,
                }
            };
            log::info!(
                "{signal} received: draining, in-flight requests have {timeout:?} to finish"
            );
            draining.store(true, Ordering::SeqCst);
            main_handle.stop(true).await;
        });
        self.wait().await
    }

    /// Waits until the client server has stopped, then stops the admin one.
    pub async fn wait(self) -> anyhow::Result<()> {
        let admin = self.admin.handle();
        let admin_task = actix_web::rt::spawn(self.admin);
        let result = self.main.await;
        admin.stop(false).await;
        let _ = admin_task.await;
        result.context("serving clients")
    }
}

/// The signals floodgate acts on.
struct Signals {
    streams: Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some((term, int, hup)),
            _ => {
                log::error!("cannot install signal handlers; stop floodgate with SIGKILL");
                None
            }
        };
        Signals { streams }
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        match &mut self.streams {
            Some((term, int, hup)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            },
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_is_split_across_workers_rounding_down() {
        assert_eq!(per_worker(10_000, 4), 2_500);
        assert_eq!(per_worker(10, 4), 2, "8 in all: never more than asked");
        assert_eq!(per_worker(3, 4), 1, "every worker serves at least one");
        assert_eq!(per_worker(5, 1), 5);
    }

    #[test]
    fn each_connection_counts_twice_against_open_files() {
        assert_eq!(files_needed(10_000, 2), 20_000 + 512 + 64);
    }
}
