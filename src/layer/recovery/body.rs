//! The request body the recovery layer hands to the inner service.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Request body seen by the service inside [`RecoveryLayer`](super::RecoveryLayer): the
    /// original body, or (for a request that may be retried) a buffered copy of it, replayed on
    /// every attempt.
    ///
    /// axum's `Router`/`Route` and tonic's `Routes` accept any body, so this is invisible there;
    /// a hand-written inner service takes `Request<RecoveryBody<B>>`.
    pub struct RecoveryBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Streaming { #[pin] body: B },
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> RecoveryBody<B> {
    /// Passes `body` through untouched.
    pub fn new(body: B) -> Self {
        RecoveryBody {
            kind: Kind::Streaming { body },
        }
    }

    /// A body that yields `data`, then `trailers`.
    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        RecoveryBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }
}

impl<B> fmt::Debug for RecoveryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Streaming { .. } => f.write_str("RecoveryBody::Streaming"),
            Kind::Buffered { data, .. } => f
                .debug_struct("RecoveryBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for RecoveryBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Streaming { body } => body.poll_frame(cx),
            KindProj::Buffered { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming { body } => body.is_end_stream(),
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Streaming { body } => body.size_hint(),
            Kind::Buffered { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
