//! What floodgate shows of what it decides: metrics (`/metrics` on the
//! admin listener), the status page's [`Board`] and the access log (stdout,
//! [`access_log`]).
//!
//! Every part that records is handed its [`Metrics`], [`Board`] and
//! [`AccessLog`] at construction; none is global.

pub mod access_log;
pub mod board;
pub mod log_format;
pub mod metrics;

pub use access_log::AccessLog;
pub use board::Board;
pub use log_format::LogFormat;
pub use metrics::Metrics;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::Error;
use actix_web::HttpMessage;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use futures_util::future::{LocalBoxFuture, Ready, ready};

use crate::verdict::Verdict;
use access_log::{Logged, WorkerLog};

/// How long the upstream took to answer one request: the forwarder puts it
/// in the response's extensions, so the observers can read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamTiming {
    /// From sending the request head to the upstream's answer head (time to
    /// first byte).
    pub first_byte: Duration,
}

/// One answered request as the observers see it when its response head is
/// ready: what the gate decided, what was answered, and how long it took.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// The gate's verdict, when the rate-limit middleware saw the request
    /// (absent for a request refused before it, e.g. an oversize body).
    pub verdict: Option<&'a Verdict>,
    /// The status answered.
    pub status: StatusCode,
    /// From the request reaching floodgate's service to its response head.
    pub elapsed: Duration,
    /// The upstream's share, when the request was forwarded.
    pub upstream: Option<UpstreamTiming>,
}

/// The outermost middleware of the client listener: reads each request's
/// [`Verdict`] and response once the answer is ready, and hands them to the
/// observers (metrics, the status page's board, and the access log when there
/// is one). Wrap it last, so it times every answer, `403`, `413` and `429`
/// included.
#[derive(Clone)]
pub struct Observe {
    metrics: Arc<Metrics>,
    board: Arc<Board>,
    access_log: Option<AccessLog>,
}

impl Observe {
    /// Observes into `metrics` and `board`, with no access log.
    pub fn new(metrics: Arc<Metrics>, board: Arc<Board>) -> Self {
        Observe {
            metrics,
            board,
            access_log: None,
        }
    }

    /// Writes a line per request to `log` (none: no access log, and nothing
    /// extra done per request).
    pub fn access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }
}

impl<S, B> Transform<S, ServiceRequest> for Observe
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B, Logged<B>>>;
    type Error = Error;
    type Transform = ObserveService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ObserveService {
            service: Rc::new(service),
            access_log: self.access_log.as_ref().map(AccessLog::worker),
            // The worker's buffer holds the access log; a request's copy of
            // `Observe` need not (one shared reference count fewer to write).
            observe: Observe {
                access_log: None,
                ..self.clone()
            },
        }))
    }
}

/// The per-worker service built by [`Observe`].
pub struct ObserveService<S> {
    service: Rc<S>,
    observe: Observe,
    /// This worker's access-log buffer, when there is an access log.
    access_log: Option<Rc<WorkerLog>>,
}

impl<S, B> Service<ServiceRequest> for ObserveService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B, Logged<B>>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let started = Instant::now();
        let service = self.service.clone();
        let observe = self.observe.clone();
        let access_log = self.access_log.clone();
        Box::pin(async move {
            let res = service.call(req).await?;
            let extensions = res.request().extensions();
            let exchange = Exchange {
                verdict: extensions.get::<Verdict>(),
                status: res.status(),
                elapsed: started.elapsed(),
                upstream: res.response().extensions().get::<UpstreamTiming>().copied(),
            };
            observe.metrics.answered(&exchange);
            observe.board.record(&exchange, started + exchange.elapsed);
            let upstream = exchange.upstream;
            drop(extensions);
            Ok(match access_log {
                None => res.map_into_left_body(),
                Some(log) => {
                    let pending = log.start(res.request().clone(), res.status(), started, upstream);
                    res.map_body(|_, body| EitherBody::right(Logged::new(body, pending)))
                }
            })
        })
    }
}
