//! The chunk HTTP endpoint volumed serves for the local backend: `GET` and `PUT`
//! `/v1/chunks/{id}` at signed, expiring URLs (see [`super::sign`]).
//!
//! An upload streams into a temp file while being hashed and becomes visible (renamed into
//! place, fsynced) only if its BLAKE3 equals the id in the URL and its length equals the
//! signed length; anything else is rejected and leaves nothing behind. A download is read
//! and verified against its id before the first byte is sent. A download with
//! `Range: bytes=A-B` returns just those bytes (206), unverified here: the client checks them
//! against the chunk's piece chaining values (chunkstore::pieces). `PUT /v1/batches/{digest}`
//! stores many small chunks in one request (see [`super::batch`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chunkstore::{Backend, ChunkError, ChunkId, LocalBackend, MAX_CHUNK_SIZE};
use futures::StreamExt;
use serde::Deserialize;

use crate::datapath::DataPathStats;
use crate::datapath::body::{BodyError, LimitedBody, UploadLimits, WRITE_BLOCK, admit};
use crate::datapath::sign::{SignedParams, UrlSigner};
use crate::error::VolumeError;
use crate::meta::MetaStore;

/// What the chunk routes need.
#[derive(Clone)]
pub struct ChunkHttpState {
    /// Where chunks are stored.
    pub backend: LocalBackend,
    /// Signs and checks URLs.
    pub signer: UrlSigner,
    /// Records verified uploads as present.
    pub store: MetaStore,
    /// Upload counters.
    pub stats: Arc<DataPathStats>,
    /// Limits on upload bodies.
    pub limits: UploadLimits,
    /// Upload slots ([`UploadLimits::concurrent`]).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Downloads read and verified whole at once ([`WHOLE_READS`]).
    pub whole_reads: Arc<tokio::sync::Semaphore>,
}

/// Downloads of chunks without piece CVs (each up to `PIECED_MIN` = 16 MiB in memory, or a
/// larger chunk stored before CVs existed) served at once; the rest wait.
pub const WHOLE_READS: usize = 32;

/// Pieces read ahead of a streamed download's client (each 1 MiB).
const STREAM_AHEAD: usize = 2;

/// A whole-chunk download sent piece by piece, each 1 MiB piece read and verified against
/// the chunk's registered CVs (which merge into its id) just before it is sent, so a
/// download holds about [`STREAM_AHEAD`] + 1 pieces in memory however large the chunk (up to
/// 256 MiB: 40 concurrent downloads used to hold 10 GiB; `tests/downloads.rs`). A piece that
/// fails verification ends the body early (the client sees a short body, never bad bytes)
/// and is logged. None: no usable CVs (the caller reads the chunk whole).
async fn stream_pieces(state: &ChunkHttpState, chunk: ChunkId) -> Option<Response> {
    use chunkstore::pieces::{piece_count, piece_range, root_from_cvs, verify_piece};
    let cvs = state.store.pieces(&chunk).ok().flatten()?;
    let len = state.backend.size(chunk).await.ok().flatten()?;
    if root_from_cvs(len, &cvs) != Some(chunk) {
        return None;
    }
    let backend = state.backend.clone();
    let pieces = futures::stream::iter(0..piece_count(len))
        .map(move |idx| {
            let (backend, cvs) = (backend.clone(), cvs.clone());
            async move {
                let (start, n) = piece_range(len, idx);
                let bytes = backend.get_range(chunk, start, n).await?;
                verify_piece(chunk, len, &cvs, idx, &bytes)?;
                Ok::<_, ChunkError>(bytes)
            }
        })
        .buffered(STREAM_AHEAD)
        .inspect(move |r| {
            if let Err(e) = r {
                tracing::error!(%chunk, error = %e, "stored chunk failed verification while being sent");
            }
        });
    let body = Body::from_stream(pieces);
    Some(
        ([(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_LENGTH, len.to_string())], body)
            .into_response(),
    )
}

#[derive(Deserialize)]
struct Params {
    exp: u64,
    #[serde(default)]
    len: u64,
    sig: String,
}

/// The axum routes of the data path.
pub fn routes(state: ChunkHttpState) -> Router {
    Router::new()
        .route("/v1/chunks/{id}", get(download).put(upload))
        .route("/v1/batches/{digest}", axum::routing::put(super::batch::upload_batch))
        .with_state(Arc::new(state))
}

fn reject(status: StatusCode, err: impl std::fmt::Display) -> Response {
    (status, format!("{err}\n")).into_response()
}

/// Parses the chunk id and checks the URL's signature and expiry.
fn check(state: &ChunkHttpState, method: &str, id: &str, p: Params) -> Result<(ChunkId, u64), (StatusCode, String)> {
    let chunk: ChunkId = id.parse().map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let params = SignedParams { exp: p.exp, len: p.len, sig: p.sig };
    state.signer.verify(method, id, &params).map_err(|e| (StatusCode::FORBIDDEN, format!("{e}\n")))?;
    Ok((chunk, params.len))
}

/// Parses `bytes=A-B` (one closed range) into (offset, len).
fn parse_range(h: &HeaderMap) -> Option<Result<(u64, u64), ()>> {
    let raw = h.get(header::RANGE)?.to_str().ok()?;
    let spec = raw.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    Some(match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) if b >= a && b - a < MAX_CHUNK_SIZE => Ok((a, b - a + 1)),
        _ => Err(()),
    })
}

async fn download(
    State(state): State<Arc<ChunkHttpState>>,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let (chunk, _) = match check(&state, "GET", &id, p) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    match parse_range(&headers) {
        Some(Ok((offset, len))) => {
            return match state.backend.get_range(chunk, offset, len).await {
                Ok(bytes) => (
                    StatusCode::PARTIAL_CONTENT,
                    [
                        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                        (header::CONTENT_RANGE, format!("bytes {offset}-{}/*", offset + len - 1)),
                    ],
                    bytes,
                )
                    .into_response(),
                Err(ChunkError::NotFound(_)) => reject(StatusCode::NOT_FOUND, format!("chunk {chunk} not found")),
                Err(e) => reject(StatusCode::RANGE_NOT_SATISFIABLE, e),
            };
        }
        Some(Err(())) => {
            return reject(StatusCode::RANGE_NOT_SATISFIABLE, "unsupported Range header");
        }
        None => {}
    }
    if let Some(streamed) = stream_pieces(&state, chunk).await {
        return streamed;
    }
    // A chunk of one piece, or one whose piece CVs were never registered (under
    // `PIECED_MIN`, or stored before CVs existed): read and verified whole, at most
    // `WHOLE_READS` at a time.
    let _read = match state.whole_reads.acquire().await {
        Ok(permit) => permit,
        Err(e) => return reject(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    match state.backend.get(chunk).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(ChunkError::NotFound(_)) => reject(StatusCode::NOT_FOUND, format!("chunk {chunk} not found")),
        Err(e @ ChunkError::Integrity { .. }) => {
            tracing::error!(%chunk, "stored chunk failed verification");
            reject(StatusCode::INTERNAL_SERVER_ERROR, e)
        }
        Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn upload(
    State(state): State<Arc<ChunkHttpState>>,
    Path(id): Path<String>,
    Query(p): Query<Params>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = store_one(&state, id, p, headers, body).await;
    let counter = if response.status().is_success() { &state.stats.chunk_uploads } else { &state.stats.rejected_uploads };
    counter.fetch_add(1, Ordering::Relaxed);
    response
}

async fn store_one(state: &ChunkHttpState, id: String, p: Params, headers: HeaderMap, body: Body) -> Response {
    let (chunk, len) = match check(state, "PUT", &id, p) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if len > MAX_CHUNK_SIZE {
        return reject(StatusCode::PAYLOAD_TOO_LARGE, format!("{len} bytes exceeds {MAX_CHUNK_SIZE}"));
    }
    if let Some(cl) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && cl != len
    {
        return reject(StatusCode::BAD_REQUEST, format!("Content-Length {cl} differs from signed length {len}"));
    }
    if matches!(state.store.chunk_known(&chunk), Ok(true)) {
        return StatusCode::OK.into_response();
    }
    let _slot = match admit(&state.slots, &state.limits).await {
        Ok(permit) => permit,
        Err(busy) => return busy.into_response(),
    };
    match receive(state, chunk, len, body).await {
        // A RocksDB write (and the upload's fsyncs before it): keep them off the async workers.
        Ok(()) => {
            let store = state.store.clone();
            match tokio::task::spawn_blocking(move || store.record_chunks(&[(chunk, len)])).await {
                Ok(Ok(())) => StatusCode::CREATED.into_response(),
                Ok(Err(e)) => reject(StatusCode::INTERNAL_SERVER_ERROR, e),
                Err(e) => reject(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        Err(Received::Body(e)) => {
            tracing::debug!(%chunk, error = %e, "upload body cut off");
            reject(e.status(), e)
        }
        Err(Received::Store(e)) => {
            let status = match &e {
                e if e.is_integrity() => StatusCode::UNPROCESSABLE_ENTITY,
                VolumeError::InvalidArgument(_) | VolumeError::RequestBody(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            reject(status, e)
        }
    }
}

/// Why an upload was not stored.
enum Received {
    /// The body broke a limit or could not be read.
    Body(BodyError),
    /// The bytes were refused or could not be stored.
    Store(VolumeError),
}

impl From<VolumeError> for Received {
    fn from(e: VolumeError) -> Self {
        Received::Store(e)
    }
}

impl From<ChunkError> for Received {
    fn from(e: ChunkError) -> Self {
        Received::Store(e.into())
    }
}

/// Writes one block of an upload on a blocking thread, released as soon as it is written
/// (no thread waits on the network).
async fn write_block(
    mut upload: chunkstore::backend::local::ChunkUpload,
    block: bytes::Bytes,
) -> Result<chunkstore::backend::local::ChunkUpload, Received> {
    tokio::task::spawn_blocking(move || upload.write(&block).map(|()| upload))
        .await
        .map_err(VolumeError::task("chunk upload writer"))?
        .map_err(Received::from)
}

/// Receives the body under the upload limits into a verified upload: gathered in blocks of
/// [`WRITE_BLOCK`] bytes, each written on a blocking thread (the upload hashes as it writes),
/// then finished (fsync + rename) if it is the signed length and hashes to the id.
async fn receive(state: &ChunkHttpState, chunk: ChunkId, len: u64, body: Body) -> Result<(), Received> {
    let backend = state.backend.clone();
    let mut upload = tokio::task::spawn_blocking(move || backend.begin_upload(chunk, len))
        .await
        .map_err(VolumeError::task("chunk upload writer"))??;
    let mut body = LimitedBody::new(body, len, &state.limits);
    let mut block = bytes::BytesMut::new();
    while let Some(frame) = body.next().await.map_err(Received::Body)? {
        if body.received() > len {
            return Err(VolumeError::invalid(format!("body longer than the signed {len} bytes")).into());
        }
        block.extend_from_slice(&frame);
        if block.len() >= WRITE_BLOCK {
            upload = write_block(upload, block.split().freeze()).await?;
        }
    }
    if !block.is_empty() {
        upload = write_block(upload, block.freeze()).await?;
    }
    let written =
        tokio::task::spawn_blocking(move || upload.finish()).await.map_err(VolumeError::task("chunk upload writer"))??;
    if written != len {
        return Err(VolumeError::invalid(format!("body is {written} bytes, signed length is {len}")).into());
    }
    Ok(())
}
