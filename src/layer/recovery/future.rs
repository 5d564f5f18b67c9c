use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// Response future of [`Recovery`](super::Recovery).
    pub struct ResponseFuture<F>
    where
        F: Future,
    {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F>
    where
        F: Future,
    {
        // Healthy and not retryable: the inner future as is, no allocation.
        Inner { #[pin] future: F },
        // Answered without calling the service.
        Ready { output: Option<F::Output> },
        // Waiting for recovery, or retrying.
        Boxed { future: BoxFuture<F::Output> },
    }
}

impl<F: Future> ResponseFuture<F> {
    pub(super) fn inner(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner { future },
        }
    }

    pub(super) fn ready(output: F::Output) -> Self {
        ResponseFuture {
            kind: Kind::Ready { output: Some(output) },
        }
    }

    pub(super) fn boxed(future: BoxFuture<F::Output>) -> Self {
        ResponseFuture {
            kind: Kind::Boxed { future },
        }
    }
}

impl<F: Future> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Ready { .. } => "Ready",
            Kind::Boxed { .. } => "Boxed",
        };
        f.debug_struct("ResponseFuture").field("kind", &kind).finish()
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Ready { output } => Poll::Ready(output.take().expect("ResponseFuture polled after completion")),
            KindProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}
