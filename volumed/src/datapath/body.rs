//! Upload bodies under limits, so stalled or slow clients cannot hang the service.
//!
//! Why: an upload used to hold a blocking thread (its writer) for as long as its client took
//! to send the body, with no deadline. Tokio's blocking pool is shared with every metadata
//! call (RocksDB runs there), so a few hundred clients that opened an upload and stopped
//! sending took every thread and every commit and read behind them waited forever. Now:
//!
//! - **Concurrency**: at most [`UploadLimits::concurrent`] bodies are received at once; an
//!   upload waits up to [`UploadLimits::queue_wait`] for a slot (reading nothing meanwhile),
//!   then gets `503 Service Unavailable` with `Retry-After` (clients retry it).
//! - **Stalls**: a body that sends nothing for [`UploadLimits::stall`] is refused (`408`).
//! - **Rate**: a body must arrive within [`UploadLimits::grace`] plus its length at
//!   [`UploadLimits::min_rate`] (a 256 MiB chunk at 256 KiB/s: about 17 minutes), else `408`.
//!
//! Single-chunk uploads no longer hold a thread while waiting for the network at all: the
//! body is gathered in blocks of [`WRITE_BLOCK`] bytes and each block is written on a blocking
//! thread that is released at once (`http::receive`).

use std::time::{Duration, Instant};

use axum::body::{Body, BodyDataStream};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes gathered before a block is written (single-chunk uploads).
pub const WRITE_BLOCK: usize = 1 << 20;

/// Limits on upload bodies (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Bodies received at once.
    pub concurrent: usize,
    /// Longest an upload waits for a slot before `503`.
    pub queue_wait: Duration,
    /// Longest a body may send nothing.
    pub stall: Duration,
    /// Slowest average rate a body may arrive at (after the grace), bytes per second.
    pub min_rate: u64,
    /// Time every body gets on top of its length at `min_rate`.
    pub grace: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            concurrent: 64,
            queue_wait: Duration::from_secs(10),
            stall: Duration::from_secs(20),
            min_rate: 256 << 10,
            grace: Duration::from_secs(30),
        }
    }
}

/// Why a body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Nothing arrived for the stall limit.
    #[error("the upload sent nothing for {0:?}")]
    Stalled(Duration),
    /// The body did not arrive by its deadline.
    #[error("the upload is slower than {0} bytes/s")]
    TooSlow(u64),
    /// The body could not be read (the client went away or broke the framing).
    #[error("reading request body: {0}")]
    Read(#[source] axum::Error),
}

impl BodyError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::Stalled(_) | BodyError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// No upload slot came free in time: answered with `503` and `Retry-After: 1`.
#[derive(Debug)]
pub struct Busy;

impl IntoResponse for Busy {
    fn into_response(self) -> Response {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, "too many uploads in progress; retry\n").into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

/// Waits for an upload slot (at most [`UploadLimits::queue_wait`]).
pub async fn admit(slots: &std::sync::Arc<Semaphore>, limits: &UploadLimits) -> Result<OwnedSemaphorePermit, Busy> {
    match tokio::time::timeout(limits.queue_wait, slots.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(Busy),
    }
}

/// A body read frame by frame under the stall and rate limits.
pub struct LimitedBody {
    stream: BodyDataStream,
    stall: Duration,
    min_rate: u64,
    deadline: Instant,
    received: u64,
}

impl LimitedBody {
    /// Reads `body`, expected to be `len` bytes long, under `limits`.
    pub fn new(body: Body, len: u64, limits: &UploadLimits) -> Self {
        let at_min_rate = Duration::from_secs_f64(len as f64 / limits.min_rate.max(1) as f64);
        Self {
            stream: body.into_data_stream(),
            stall: limits.stall,
            min_rate: limits.min_rate,
            deadline: Instant::now() + limits.grace + at_min_rate,
            received: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The next frame; `None` once the body ended.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = self.stall.min(left);
        match tokio::time::timeout(wait, self.stream.next()).await {
            Err(_) if wait < self.stall => Err(BodyError::TooSlow(self.min_rate)),
            Err(_) => Err(BodyError::Stalled(self.stall)),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(BodyError::Read(e)),
            Ok(Some(Ok(bytes))) => {
                self.received += bytes.len() as u64;
                Ok(Some(bytes))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_that_stops_sending_is_cut_off_after_the_stall_limit() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let limits = UploadLimits { stall: Duration::from_millis(200), ..UploadLimits::default() };
        let mut body = LimitedBody::new(Body::from_stream(rx), 10, &limits);
        tx.try_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"abc"));
        let started = Instant::now();
        assert!(matches!(body.next().await, Err(BodyError::Stalled(_))));
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(body.received(), 3);
    }

    #[tokio::test]
    async fn a_body_slower_than_the_minimum_rate_misses_its_deadline() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        // 1,000 bytes at >= 10,000 bytes/s with a 100 ms grace: due after 200 ms.
        let limits = UploadLimits {
            stall: Duration::from_secs(5),
            min_rate: 10_000,
            grace: Duration::from_millis(100),
            ..UploadLimits::default()
        };
        let mut body = LimitedBody::new(Body::from_stream(rx), 1000, &limits);
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                if tx.try_send(Ok(Bytes::from_static(b"x"))).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let outcome = loop {
            match body.next().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(matches!(outcome, Err(BodyError::TooSlow(10_000))), "{outcome:?}");
        feeder.abort();
    }
}
