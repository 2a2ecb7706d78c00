//! The request body cap (`FLOODGATE_MAX_BODY`) before the rate limiter.
//!
//! [`forward`](super::forward) enforces the cap itself (a `Content-Length`
//! past it is refused before anything is sent, a chunked body is counted as
//! it streams), but by then the rate limiter has charged the request. Like
//! nginx's `client_max_body_size`, which is checked once the head is read and
//! before `limit_req` runs, [`MaxBody`] refuses an announced oversize body
//! in front of the limiter, so a refused upload costs the client no budget.
//! A chunked body announces no length: it is charged, and cut off at the cap.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::{Error, ResponseError};
use futures_util::future::{Ready, ready};

use crate::error::ProxyError;

/// `413` when a `Content-Length` is past `max`.
pub(super) fn check(len: Option<u64>, max: Option<u64>) -> Result<(), ProxyError> {
    match (len, max) {
        (Some(len), Some(max)) if len > max => Err(ProxyError::PayloadTooLarge(max)),
        _ => Ok(()),
    }
}

/// Middleware answering `413 Payload Too Large` to a request whose
/// `Content-Length` is past the cap, without calling the wrapped service.
/// Wrap it outside [`RateLimit`](crate::RateLimit) (actix runs the last
/// `wrap` first); `None` lets everything through.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaxBody {
    max: Option<u64>,
}

impl MaxBody {
    /// Refuses a `Content-Length` past `max` bytes; `None`: no cap (pass
    /// the same value as [`Upstream::max_body`](super::Upstream::max_body)).
    pub fn new(max: Option<u64>) -> Self {
        MaxBody { max }
    }
}

impl<S, B> Transform<S, ServiceRequest> for MaxBody
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = MaxBodyService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(MaxBodyService {
            service: Rc::new(service),
            max: self.max,
        }))
    }
}

/// The per-worker service built by [`MaxBody`].
pub struct MaxBodyService<S> {
    service: Rc<S>,
    max: Option<u64>,
}

impl<S, B> Service<ServiceRequest> for MaxBodyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = MaxBodyFuture<S::Future, B>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        if self.max.is_some() {
            // A malformed length is left to `forward`, which answers 400.
            let len = super::content_length(req.headers()).ok().flatten();
            if let Err(err) = check(len, self.max) {
                let res = err.error_response();
                return MaxBodyFuture::Refused {
                    res: Some(req.into_response(res).map_into_right_body()),
                };
            }
        }
        MaxBodyFuture::Passed {
            inner: self.service.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The wrapped service's answer, or the `413`.
    #[project = MaxBodyProj]
    pub enum MaxBodyFuture<F, B> {
        Passed { #[pin] inner: F },
        Refused { res: Option<ServiceResponse<EitherBody<B>>> },
    }
}

impl<F, B> Future for MaxBodyFuture<F, B>
where
    F: Future<Output = Result<ServiceResponse<B>, Error>>,
{
    type Output = Result<ServiceResponse<EitherBody<B>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            MaxBodyProj::Passed { inner } => inner
                .poll(cx)
                .map(|res| res.map(ServiceResponse::map_into_left_body)),
            MaxBodyProj::Refused { res } => match res.take() {
                Some(res) => Poll::Ready(Ok(res)),
                None => Poll::Pending,
            },
        }
    }
}
