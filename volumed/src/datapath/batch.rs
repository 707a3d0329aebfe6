//! `PUT /v1/batches/{digest}`: many small chunks in one signed request (local backend).
//!
//! The URL (see [`super::sign`]) binds the chunk list's digest, its length, the body length and
//! the expiry. The body (format in [`crate::batch`]) streams to a blocking thread that parses
//! frames, verifies every chunk against its id and writes it to a temp file without fsync
//! ([`chunkstore::ChunkBatch`]), while re-computing the list's digest. Only when the body is
//! complete, has exactly the signed length, and its list matches the signed digest, are the
//! chunks made durable in one pass (fsync of each file, renames, one fsync per shard
//! directory) and recorded in RocksDB; then the server answers 201. Any failure (forged or
//! expired URL: 403; a chunk whose bytes do not match its id: 422; truncated, over-long or
//! malformed body: 400; a list other than the signed one: 403) stores nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chunkstore::{ChunkError, LocalBackend};
use serde::Deserialize;

use crate::datapath::body::{BodyError, Busy, LimitedBody, admit};
use crate::datapath::http::ChunkHttpState;
use crate::datapath::sign::SignedParams;
use crate::error::VolumeError;
use crate::meta::MetaStore;
use volume_model::batch::{BATCH_MAX_BYTES, BATCH_MAX_CHUNKS, BatchDigest, FrameError, FrameParser};

#[derive(Deserialize)]
pub(crate) struct BatchParams {
    exp: u64,
    len: u64,
    n: u64,
    sig: String,
}

/// Why a batch was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    /// The URL is forged or expired.
    #[error("{0}")]
    Signature(#[source] VolumeError),
    /// The body's chunk list is not the signed one.
    #[error("{0}")]
    List(String),
    /// Malformed body: length, count.
    #[error("{0}")]
    Body(String),
    /// The body could not be read, or broke the upload limits (stalled, too slow).
    #[error("{0}")]
    ReadBody(#[source] BodyError),
    /// Malformed framing.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A chunk larger than the store takes.
    #[error("{0}")]
    TooLarge(#[source] ChunkError),
    /// A chunk's bytes do not hash to its id.
    #[error("{0}")]
    Integrity(#[source] ChunkError),
    /// The chunk store failed writing the batch.
    #[error("{0}")]
    Chunk(#[source] ChunkError),
    /// Recording the chunks in the metadata store failed.
    #[error("{0}")]
    Record(#[source] VolumeError),
    /// The writer thread panicked or was cancelled.
    #[error("batch writer failed: {0}")]
    Writer(#[source] tokio::task::JoinError),
    /// Every upload slot is taken (answered with 503 and `Retry-After`).
    #[error("too many uploads in progress; retry")]
    Busy,
}

impl From<ChunkError> for BatchFailure {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::Integrity { .. } => BatchFailure::Integrity(e),
            ChunkError::TooLarge { .. } => BatchFailure::TooLarge(e),
            other => BatchFailure::Chunk(other),
        }
    }
}

impl BatchFailure {
    fn status(&self) -> StatusCode {
        match self {
            BatchFailure::Signature(_) | BatchFailure::List(_) => StatusCode::FORBIDDEN,
            BatchFailure::ReadBody(e) => e.status(),
            BatchFailure::Body(_) | BatchFailure::Frame(_) | BatchFailure::TooLarge(_) => StatusCode::BAD_REQUEST,
            BatchFailure::Integrity(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BatchFailure::Chunk(_) | BatchFailure::Record(_) | BatchFailure::Writer(_) => StatusCode::INTERNAL_SERVER_ERROR,
            BatchFailure::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What the receiving side tells the writer thread.
enum Msg {
    Data(Bytes),
    /// The whole body arrived with the signed length: store the batch if it checks out.
    End,
}

/// The batch upload handler.
pub(crate) async fn upload_batch(
    State(state): State<Arc<ChunkHttpState>>,
    Path(digest): Path<String>,
    Query(p): Query<BatchParams>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match receive(&state, digest, p, &headers, body).await {
        Ok((stored, present)) => {
            state.stats.batch_uploads.fetch_add(1, Ordering::Relaxed);
            state.stats.batch_chunks.fetch_add(stored as u64, Ordering::Relaxed);
            (StatusCode::CREATED, format!("stored {stored} chunks ({present} already present)\n")).into_response()
        }
        Err(BatchFailure::Busy) => {
            state.stats.rejected_uploads.fetch_add(1, Ordering::Relaxed);
            Busy.into_response()
        }
        Err(e) => {
            state.stats.rejected_uploads.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "batch upload rejected");
            (e.status(), format!("{e}\n")).into_response()
        }
    }
}

/// Checks the URL, streams the body to the writer thread, and returns (stored, already present).
async fn receive(
    state: &ChunkHttpState,
    digest: String,
    p: BatchParams,
    headers: &HeaderMap,
    body: Body,
) -> Result<(usize, usize), BatchFailure> {
    let (n, len) = check_request(state, &digest, p, headers)?;
    // The writer thread lives as long as the body arrives: the slot bounds how many do, and
    // the body's limits how long each may take (super::body).
    let _slot = admit(&state.slots, &state.limits).await.map_err(|_| BatchFailure::Busy)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(16);
    let (backend, store) = (state.backend.clone(), state.store.clone());
    let writer = tokio::task::spawn_blocking(move || write_batch(&backend, &store, &digest, n, rx));
    let failed = stream_body(LimitedBody::new(body, len, &state.limits), len, tx).await;
    let result = writer.await.map_err(BatchFailure::Writer)?;
    match failed {
        Some(e) => Err(e),
        None => result,
    }
}

/// Checks the digest's form, the signature, the limits and the Content-Length; returns the
/// signed chunk count and body length.
fn check_request(state: &ChunkHttpState, digest: &str, p: BatchParams, headers: &HeaderMap) -> Result<(u64, u64), BatchFailure> {
    if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(BatchFailure::Body("batch digest must be 64 lowercase hex digits".into()));
    }
    let params = SignedParams { exp: p.exp, len: p.len, sig: p.sig };
    state.signer.verify_batch(digest, p.n, &params).map_err(BatchFailure::Signature)?;
    let (n, len) = (p.n, params.len);
    if n == 0 || n > BATCH_MAX_CHUNKS as u64 || len > BATCH_MAX_BYTES {
        return Err(BatchFailure::Body(format!(
            "a batch holds 1..={BATCH_MAX_CHUNKS} chunks and at most {BATCH_MAX_BYTES} bytes"
        )));
    }
    if let Some(cl) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && cl != len
    {
        return Err(BatchFailure::Body(format!("Content-Length {cl} differs from signed length {len}")));
    }
    Ok((n, len))
}

/// The writer thread: parses frames as they arrive, stages each verified chunk, checks the
/// list against the signed digest once the body has ended, then makes the chunks durable and
/// records them. Returns (stored, already present).
fn write_batch(
    backend: &LocalBackend,
    store: &MetaStore,
    digest: &str,
    n: u64,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
) -> Result<(usize, usize), BatchFailure> {
    let started = std::time::Instant::now();
    let mut batch = backend.begin_batch()?;
    let mut parser = FrameParser::new();
    let mut list = BatchDigest::default();
    loop {
        match rx.blocking_recv() {
            Some(Msg::Data(bytes)) => parser.feed(&bytes, |id, data| {
                if list.count() as u64 >= n {
                    return Err(BatchFailure::List(format!("body holds more than the signed {n} chunks")));
                }
                list.push(&id, data.len() as u64);
                batch.add(id, data).map_err(BatchFailure::from)
            })?,
            Some(Msg::End) => break,
            // The body failed or was refused: dropping the batch removes its temp files.
            None => return Err(BatchFailure::Body("upload aborted".into())),
        }
    }
    parser.finish()?;
    if list.count() as u64 != n || list.hex() != digest {
        return Err(BatchFailure::List("the body's chunks are not the signed list".into()));
    }
    let present = batch.already_present();
    let received = started.elapsed();
    let chunks = batch.commit()?;
    let durable = started.elapsed();
    store.record_chunks(&chunks).map_err(BatchFailure::Record)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        chunks = chunks.len(),
        present,
        received_ms = ms(received),
        durable_ms = ms(durable - received),
        recorded_ms = ms(started.elapsed() - durable),
        "batch stored"
    );
    Ok((chunks.len() - present, present))
}

/// Streams the body to the writer (`Msg::End` once exactly `len` bytes arrived); returns why
/// the body itself was refused, if it was. The writer's own failure is its result.
async fn stream_body(mut body: LimitedBody, len: u64, tx: tokio::sync::mpsc::Sender<Msg>) -> Option<BatchFailure> {
    let mut received: u64 = 0;
    let mut writer_gone = false;
    loop {
        match body.next().await {
            Ok(None) => break,
            Ok(Some(bytes)) => {
                received += bytes.len() as u64;
                if received > len {
                    return Some(BatchFailure::Body(format!("body longer than the signed {len} bytes")));
                }
                // Once the writer has failed (its error is reported by the caller), the rest
                // of the body (at most the signed length) is read and dropped, so the client
                // gets the answer rather than a reset connection.
                if !writer_gone && tx.send(Msg::Data(bytes)).await.is_err() {
                    writer_gone = true;
                }
            }
            Err(e) => return Some(BatchFailure::ReadBody(e)),
        }
    }
    if writer_gone {
        return None;
    }
    if received != len {
        return Some(BatchFailure::Body(format!("body is {received} bytes, signed length is {len}")));
    }
    let _ = tx.send(Msg::End).await;
    None
}
