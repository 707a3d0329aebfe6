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
        Err(e) => {
            let status = match &e {
                e if e.is_integrity() => StatusCode::UNPROCESSABLE_ENTITY,
                VolumeError::InvalidArgument(_) | VolumeError::RequestBody(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            reject(status, e)
        }
    }
}

/// Streams the body into a verified upload on a blocking thread.
async fn receive(state: &ChunkHttpState, chunk: ChunkId, len: u64, body: Body) -> Result<(), VolumeError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let backend = state.backend.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, VolumeError> {
        let mut upload = backend.begin_upload(chunk, len)?;
        while let Some(frame) = rx.blocking_recv() {
            upload.write(&frame)?;
        }
        Ok(upload.finish()?)
    });
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    let mut failed = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(bytes) => {
                received += bytes.len() as u64;
                if received > len {
                    failed = Some(VolumeError::invalid(format!("body longer than the signed {len} bytes")));
                    break;
                }
                if tx.send(bytes).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failed = Some(VolumeError::RequestBody(e));
                break;
            }
        }
    }
    drop(tx);
    if let Some(e) = failed {
        writer.abort();
        return Err(e);
    }
    let written = writer.await.map_err(VolumeError::task("chunk upload writer"))??;
    if written != len {
        return Err(VolumeError::invalid(format!("body is {written} bytes, signed length is {len}")));
    }
    Ok(())
}
