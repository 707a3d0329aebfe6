//! volume-client: the typed client of volumed ([`VolumeClient`]), what the CLI, the FUSE
//! helper (in guests too), tests and benches link. Metadata goes over gRPC; chunk bytes go
//! straight to the signed URLs the server hands out, with bounded concurrency, and every
//! downloaded chunk is verified against its id (and optionally kept in a [`ChunkCache`]).
//!
//! It never links the server: no RocksDB, no HTTP server, no S3 SDK, so the helper runs in a
//! guest without C++ libraries. The model and validation it shares with the server live in
//! volume-model.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use volume_client::{VolumeClient, FileUpload};
//! let mut c = VolumeClient::connect("http://127.0.0.1:7420").await?;
//! let vol = c.get_volume("acme", "workspace", true).await?;
//! let file = FileUpload::from_bytes("notes/hello.txt", b"hello".to_vec(), 0o644);
//! let commit = c.commit_files("acme", "workspace", &vol.head, vec![file], &[]).await?;
//! let bytes = c.read_file("acme", "workspace", "notes/hello.txt").await?;
//! assert_eq!(bytes, b"hello");
//! # let _ = commit; Ok(()) }
//! ```
#![warn(missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use chunkstore::{ChunkCache, ChunkError, ChunkId, Chunking};
use futures::{StreamExt, TryStreamExt};
use proto::volume as pb;
use proto::volume::volume_service_client::VolumeServiceClient;
use tenancy::client::AuthedChannel;
use tonic::transport::Channel;

use volume_model::convert::{MAX_CHUNKS_PER_REQUEST, chunking_from_proto, entry_from_proto, policy_to_proto};
use volume_model::{EntryKind, InvalidRequest, batch};

/// Reads the contract error name back out of a status.
pub fn error_name(status: &tonic::Status) -> Option<String> {
    use prost::Message;
    pb::ErrorDetail::decode(status.details()).ok().map(|d| d.name).filter(|n| !n.is_empty())
}

/// Chunk transfers in flight at once.
pub const TRANSFER_CONCURRENCY: usize = 4;

/// Uploads in flight at once when the chunks are small (under 1 MiB on average) and each has
/// its own URL (S3, or a server without batches): each costs the store a durable write, and
/// they are latency-bound, so many overlap well.
pub const SMALL_TRANSFER_CONCURRENCY: usize = 64;

/// Batch uploads (many small chunks in one signed request, volumed's local backend) in flight
/// at once: each is one durable pass on the server, and a few keep both sides busy.
pub const BATCH_CONCURRENCY: usize = 4;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server returned an error; `name` is the contract error name when present.
    #[error("{name}: {message}")]
    Server {
        /// Contract error name (e.g. "VolumeNotFoundError"); "SailError" when absent.
        name: String,
        /// gRPC code.
        code: tonic::Code,
        /// Message.
        message: String,
    },
    /// Could not reach the server.
    #[error("cannot connect to volumed at {endpoint}: {message}")]
    Connect {
        /// Endpoint tried.
        endpoint: String,
        /// Why, with the transport's whole chain of causes.
        message: String,
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// `SAIL_API_KEY` or the endpoint's key file holds something that is not a key.
    #[error(transparent)]
    Credentials(#[from] tenancy::credentials::CredentialsError),
    /// A signed-URL request could not be sent, or its answer not read.
    #[error("chunk transfer failed: {what}: {source}")]
    Transfer {
        /// The request ("PUT chunk", "GET <id>", ...).
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The data path refused a signed-URL request.
    #[error("chunk transfer failed: {what} returned {status}: {body}")]
    Refused {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The answer's text (volumed says why).
        body: String,
    },
    /// The local chunk cache failed (reading, filling, or the fetch it ran).
    #[error("chunk transfer failed: {0}")]
    Cache(#[source] ChunkError),
    /// Downloaded bytes did not match their id.
    #[error("integrity failure: {0}")]
    Integrity(#[source] IntegrityFailure),
    /// The server's answer was malformed.
    #[error("malformed response: {0}")]
    Protocol(String),
    /// A value in the server's answer does not decode or validate (an id, an entry).
    #[error("malformed response: {0}")]
    Invalid(#[from] InvalidRequest),
}

/// A boxed error of another library kept as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why downloaded bytes are not trusted.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityFailure {
    /// A chunk or piece did not hash to its id or chaining value.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The piece chaining values offered for a chunk do not merge into its id.
    #[error("piece CVs of chunk {0} do not merge into its id")]
    PieceCvs(ChunkId),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Server {
            name: error_name(&s).unwrap_or_else(|| "SailError".into()),
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl ClientError {
    /// The contract error name, if the server sent one.
    pub fn name(&self) -> Option<&str> {
        match self {
            ClientError::Server { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Result alias for client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A whole file to upload in a commit.
#[derive(Clone, Debug)]
pub struct FileUpload {
    /// Volume-relative path.
    pub path: String,
    /// Contents.
    pub data: Bytes,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (ns since the epoch).
    pub mtime_ns: i64,
}

impl FileUpload {
    /// A file with the current time as mtime.
    pub fn from_bytes(path: impl Into<String>, data: impl Into<Bytes>, mode: u32) -> Self {
        Self { path: path.into(), data: data.into(), mode, mtime_ns: sysutil::clock::now_ns() }
    }
}

/// Byte counts of a transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Chunks sent.
    pub chunks_uploaded: usize,
    /// Bytes sent.
    pub bytes_uploaded: u64,
    /// Chunks the store already had.
    pub chunks_skipped: usize,
    /// Batch requests sent (each carrying many small chunks).
    pub batches: usize,
    /// Chunks sent in those batches (counted in `chunks_uploaded` too).
    pub chunks_batched: usize,
}

/// A connection to volumed.
#[derive(Clone)]
pub struct VolumeClient {
    grpc: VolumeServiceClient<AuthedChannel>,
    http: reqwest::Client,
    cache: Option<ChunkCache>,
    batches: bool,
    verify: Verify,
    author: String,
    /// Buffers downloaded bodies are received into (shared by clones).
    pool: std::sync::Arc<chunkstore::memory::BufferPool>,
    /// Counters of the last upload.
    pub last_upload: TransferStats,
}

/// Whether a status is a failure of the connection rather than the server's answer (every
/// sail server puts an `ErrorDetail` in its errors; a dead connection gives none).
pub fn is_transport_failure(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) && error_name(s).is_none()
}

/// Longest silence on a data connection (no byte arrives) before the transfer fails as a
/// transport error (and is retried): a stalled connection must not hang a FUSE read.
const HTTP_STALL: Duration = Duration::from_secs(30);

/// Idle receive buffers a client keeps for later downloads (see
/// [`chunkstore::memory::BufferPool`]): four 8 MiB chunks in flight, twice over.
const RECEIVE_POOL_BYTES: usize = 64 << 20;

/// How idempotent calls are retried after a transport failure: 5 more tries, 50 ms doubling
/// to at most 2 s between them (about 4 s in all), each over a new connection (the channel
/// reconnects). What this covers: a server restarted, or a guest woken from sleep or forked
/// whose connections died with its old VMM. What it does not: a server that stays down, which
/// fails the call after those ~4 s (a FUSE read then returns EIO instead of hanging).
fn transport_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(5)
}

/// Runs an idempotent gRPC call, retrying it after transport failures (see
/// [`is_transport_failure`]); the server's own errors return at once.
pub async fn retry_idempotent<T, F, Fut>(call: F) -> std::result::Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    use backon::Retryable;
    call.retry(transport_backoff()).when(is_transport_failure).await
}

fn vref(org: &str, name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: org.to_owned(), name: name.to_owned() })
}

impl VolumeClient {
    /// Connects to `endpoint` (`http://host:port`) with the key this machine keeps for it:
    /// `SAIL_API_KEY`, else the endpoint's key file (see [`tenancy::credentials`]); without
    /// either, calls go out without a key (a sailbox's volume gateway needs none: it knows
    /// its guest by the listener reached; volumed answers `Unauthenticated`).
    pub async fn connect(endpoint: &str) -> Result<Self> {
        let key = tenancy::credentials::find_key(endpoint)?;
        Self::connect_with_key(endpoint, key.as_ref()).await
    }

    /// Connects to `endpoint`, sending `key` on every call.
    pub async fn connect_with_key(endpoint: &str, key: Option<&tenancy::ApiKey>) -> Result<Self> {
        let err = |message: String, source: BoxError| ClientError::Connect { endpoint: endpoint.to_owned(), message, source };
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|e| err(e.to_string(), Box::new(e)))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| err(format!("{e:?}"), Box::new(e)))?;
        let grpc = VolumeServiceClient::new(tenancy::client::authed(channel, key))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        // Presigned S3 URLs may be https: make sure a TLS provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A system without CA certificates (a minimal guest image) cannot verify https, and
        // the platform verifier then refuses to build at all; plain http (a sailbox's volume
        // gateway, a local volumed) still works without roots, and an https URL then fails
        // with a certificate error instead of every call failing here.
        let build = |roots: bool| {
            // A connection that goes silent (a peer or a NAT that lost it) fails the read
            // after HTTP_STALL instead of hanging it; GETs and PUTs are then retried.
            let b = reqwest::Client::builder()
                .pool_max_idle_per_host(SMALL_TRANSFER_CONCURRENCY)
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(HTTP_STALL);
            if roots { b } else { b.tls_certs_only(Vec::new()) }.build()
        };
        let http = build(true).or_else(|_| build(false)).map_err(|e| err(e.to_string(), Box::new(e)))?;
        // SAIL_BATCH_UPLOADS=0 turns batches off for every client of the process (the FUSE
        // helper included): for comparing both paths, or for a server that misbehaves.
        let batches = std::env::var("SAIL_BATCH_UPLOADS").map_or(true, |v| v != "0");
        Ok(Self {
            grpc,
            http,
            cache: None,
            batches,
            verify: Verify::Hash,
            author: String::new(),
            pool: chunkstore::memory::BufferPool::new(RECEIVE_POOL_BYTES),
            last_upload: TransferStats::default(),
        })
    }

    /// Reads chunks through `cache`: cached chunks are served locally (verified), missing ones
    /// are fetched once per host however many readers want them, then cached.
    pub fn with_cache(mut self, cache: ChunkCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Trusts the endpoint's chunk bytes instead of hashing them: for a helper inside a
    /// sailbox whose endpoint is vmm-host's volume gateway, which fetched and verified every
    /// chunk on the host before serving it (the host is trusted by the guest it runs; a
    /// guest's BLAKE3 under TCG runs at ~71 MiB/s, below its own disk). Lengths are still
    /// checked. Never for an endpoint that relays a bucket's bytes unverified (volumed's
    /// signed URLs): there the hash is the only integrity check.
    pub fn trusting_endpoint(mut self) -> Self {
        self.verify = Verify::Length;
        self
    }

    /// Whether this client trusts its endpoint's bytes ([`VolumeClient::trusting_endpoint`]).
    pub fn trusts_endpoint(&self) -> bool {
        self.verify == Verify::Length
    }

    /// Whether uploads offer batches (on by default, unless `SAIL_BATCH_UPLOADS=0`): small
    /// chunks then travel many per signed request where the server takes them. Off, every
    /// chunk gets its own URL.
    pub fn with_batch_uploads(mut self, on: bool) -> Self {
        self.batches = on;
        self
    }

    /// Who this client's commits are by (like git's author; empty by default): sent in every
    /// commit it makes ([`Self::commit_files`], and the FUSE helper's own commits). Free-form,
    /// at most [`volume_model::commit::MAX_AUTHOR_BYTES`] bytes (volumed refuses longer ones).
    /// A sailbox's volume gateway replaces it with `sailbox/<id>` whatever the guest sends.
    pub fn with_author(mut self, author: impl Into<String>) -> Self {
        self.author = author.into();
        self
    }

    /// The author this client's commits carry.
    pub fn author(&self) -> &str {
        &self.author
    }

    /// The chunk cache reads go through, if any.
    pub fn cache(&self) -> Option<&ChunkCache> {
        self.cache.as_ref()
    }

    /// The raw gRPC client, for calls this wrapper does not cover.
    pub fn grpc(&mut self) -> &mut VolumeServiceClient<AuthedChannel> {
        &mut self.grpc
    }

    /// Gets (or with `mint`, creates) a volume.
    pub async fn get_volume(&mut self, org: &str, name: &str, mint: bool) -> Result<pb::Volume> {
        let req = pb::GetVolumeRequest { volume: vref(org, name), mint_if_missing: mint, chunking: 0 };
        let g = &self.grpc;
        Ok(retry_idempotent(|| {
            let (mut g, req) = (g.clone(), req.clone());
            async move { g.get_volume(req).await }
        })
        .await?
        .into_inner())
    }

    /// The volume's head.
    pub async fn head(&mut self, org: &str, name: &str) -> Result<pb::Head> {
        let g = &self.grpc;
        Ok(retry_idempotent(|| {
            let mut g = g.clone();
            async move { g.get_head(pb::GetHeadRequest { volume: vref(org, name) }).await }
        })
        .await?
        .into_inner())
    }

    /// Uploads the chunks the store lacks; returns what was sent. Chunks of at least
    /// [`chunkstore::pieces::PIECED_MIN`] bytes get their piece CVs computed and registered, so
    /// readers can verify ranges of them.
    pub async fn upload_chunks(&mut self, org: &str, name: &str, chunks: &HashMap<ChunkId, Bytes>) -> Result<TransferStats> {
        let pieces: HashMap<ChunkId, Vec<u8>> = chunks
            .iter()
            .filter(|(_, b)| b.len() as u64 >= chunkstore::pieces::PIECED_MIN)
            .map(|(id, b)| (*id, chunkstore::pieces::piece_cvs(b)))
            .collect();
        self.upload_chunks_with_pieces(org, name, chunks, &pieces).await
    }

    /// [`VolumeClient::upload_chunks`] for callers that computed the piece CVs already.
    pub async fn upload_chunks_with_pieces(
        &mut self,
        org: &str,
        name: &str,
        chunks: &HashMap<ChunkId, Bytes>,
        pieces: &HashMap<ChunkId, Vec<u8>>,
    ) -> Result<TransferStats> {
        let specs: Vec<pb::ChunkSpec> = chunks
            .iter()
            .map(|(id, b)| pb::ChunkSpec {
                id: id.as_bytes().to_vec(),
                len: b.len() as u64,
                piece_cvs: pieces.get(id).cloned().unwrap_or_default(),
            })
            .collect();
        let mut uploads = Vec::new();
        let mut batches = Vec::new();
        for part in specs.chunks(MAX_CHUNKS_PER_REQUEST) {
            let req = pb::MissingChunksRequest { volume: vref(org, name), chunks: part.to_vec(), accept_batches: self.batches };
            let g = &self.grpc;
            let resp = retry_idempotent(|| {
                let (mut g, req) = (g.clone(), req.clone());
                async move { g.missing_chunks(req).await }
            })
            .await?
            .into_inner();
            uploads.extend(resp.uploads);
            batches.extend(resp.batches);
        }
        let lookup = |raw: &[u8]| -> Result<(ChunkId, Bytes)> {
            let id = ChunkId::from_slice(raw).map_err(InvalidRequest::from)?;
            let data =
                chunks.get(&id).cloned().ok_or_else(|| ClientError::Protocol(format!("server asked for unknown chunk {id}")))?;
            Ok((id, data))
        };
        let mut jobs = Vec::with_capacity(uploads.len());
        for u in uploads {
            let (_, data) = lookup(&u.id)?;
            jobs.push((u, data));
        }
        let mut batch_jobs = Vec::with_capacity(batches.len());
        let mut stats = TransferStats::default();
        for b in batches {
            let mut parts = Vec::with_capacity(b.ids.len());
            for raw in &b.ids {
                parts.push(lookup(raw)?);
            }
            let body = batch_body(&parts)?;
            if body.len() as u64 != b.body_len {
                return Err(ClientError::Protocol(format!("batch body is {} bytes, server expects {}", body.len(), b.body_len)));
            }
            stats.batches += 1;
            stats.chunks_batched += parts.len();
            stats.bytes_uploaded += parts.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
            batch_jobs.push((b, body));
        }
        let single_bytes: u64 = jobs.iter().map(|(_, d)| d.len() as u64).sum();
        stats.chunks_uploaded = jobs.len() + stats.chunks_batched;
        stats.bytes_uploaded += single_bytes;
        stats.chunks_skipped = chunks.len().saturating_sub(stats.chunks_uploaded);
        let http = self.http.clone();
        let small = !jobs.is_empty() && single_bytes / (jobs.len() as u64) < 1 << 20;
        let concurrency = if small { SMALL_TRANSFER_CONCURRENCY } else { TRANSFER_CONCURRENCY };
        let singles = futures::stream::iter(jobs)
            .map(|(u, data)| put_chunk(&http, u, data))
            .buffer_unordered(concurrency)
            .try_collect::<Vec<()>>();
        let batches = futures::stream::iter(batch_jobs)
            .map(|(b, body)| put_batch(&http, b, body))
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<Vec<()>>();
        futures::try_join!(singles, batches)?;
        self.last_upload = stats;
        Ok(stats)
    }

    /// Downloads and verifies chunks, in order (through the cache, when there is one).
    pub async fn download_chunks(&mut self, org: &str, name: &str, ids: &[ChunkId]) -> Result<Vec<Bytes>> {
        let mut found: HashMap<ChunkId, Bytes> = HashMap::new();
        if let Some(cache) = &self.cache {
            for id in ids {
                if !found.contains_key(id)
                    && let Some(bytes) = cache.get(*id).await.map_err(cache_error)?
                {
                    found.insert(*id, bytes);
                }
            }
        }
        let mut wanted: Vec<ChunkId> = Vec::new();
        for id in ids {
            if !found.contains_key(id) && !wanted.contains(id) {
                wanted.push(*id);
            }
        }
        let urls = self.chunk_urls(org, name, &wanted).await?;
        let (http, verify, pool) = (self.http.clone(), self.verify, self.pool.clone());
        let cache = self.cache.clone();
        let fetched: Vec<(ChunkId, Bytes)> = futures::stream::iter(urls.into_iter().zip(wanted))
            .map(|(u, id)| {
                let (http, cache, pool) = (http.clone(), cache.clone(), pool.clone());
                async move {
                    let bytes = match cache {
                        Some(cache) => cache
                            .get_or_fetch(id, || async {
                                get_chunk(&http, &pool, u, id, verify)
                                    .await
                                    .map_err(|e| chunkstore::ChunkError::Fetch { chunk: id, source: Box::new(e) })
                            })
                            .await
                            .map_err(cache_error)?,
                        None => get_chunk(&http, &pool, u, id, verify).await?,
                    };
                    Ok::<_, ClientError>((id, bytes))
                }
            })
            .buffered(TRANSFER_CONCURRENCY)
            .try_collect()
            .await?;
        found.extend(fetched);
        ids.iter()
            .map(|id| found.get(id).cloned().ok_or_else(|| ClientError::Protocol(format!("no URL for chunk {id}"))))
            .collect()
    }

    /// Signed download URLs (with piece CVs where the server knows them), in `ids` order.
    pub async fn chunk_urls(&mut self, org: &str, name: &str, ids: &[ChunkId]) -> Result<Vec<pb::SignedUrl>> {
        let mut urls = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_CHUNKS_PER_REQUEST) {
            let req =
                pb::ChunkUrlsRequest { volume: vref(org, name), ids: batch.iter().map(|i| i.as_bytes().to_vec()).collect() };
            let g = &self.grpc;
            let resp = retry_idempotent(|| {
                let (mut g, req) = (g.clone(), req.clone());
                async move { g.chunk_urls(req).await }
            })
            .await?;
            urls.extend(resp.into_inner().downloads);
        }
        if urls.len() != ids.len() {
            return Err(ClientError::Protocol(format!("asked for {} chunk URLs, got {}", ids.len(), urls.len())));
        }
        Ok(urls)
    }

    /// Fetches piece `idx` of chunk `id` (`len` bytes) with an HTTP range request and verifies
    /// it against the URL's piece CVs (which must merge into `id`); from a trusted endpoint
    /// (see [`VolumeClient::trusting_endpoint`]) only its length is checked.
    pub async fn fetch_piece(&self, url: &pb::SignedUrl, id: ChunkId, len: u64, idx: usize) -> Result<Bytes> {
        use chunkstore::pieces::{piece_range, root_from_cvs, verify_piece};
        // A trusted endpoint serves ranges of chunks it verified, with or without CVs.
        if self.verify == Verify::Hash && root_from_cvs(len, &url.piece_cvs) != Some(id) {
            return Err(ClientError::Integrity(IntegrityFailure::PieceCvs(id)));
        }
        let (start, n) = piece_range(len, idx);
        if n == 0 {
            return Err(ClientError::Protocol(format!("chunk {id} has no piece {idx}")));
        }
        let what = format!("GET {id} piece {idx}");
        let (bytes, _) = self.get_range(url, start, start + n - 1, &what).await?;
        match self.verify {
            Verify::Hash => verify_piece(id, len, &url.piece_cvs, idx, &bytes).map_err(|e| ClientError::Integrity(e.into()))?,
            Verify::Length if bytes.len() as u64 != n => {
                return Err(ClientError::Protocol(format!("{what}: got {} bytes, expected {n}", bytes.len())));
            }
            Verify::Length => {}
        }
        Ok(bytes)
    }

    /// Bytes `[start, start + len)` of a chunk from a trusted endpoint (see
    /// [`VolumeClient::trusting_endpoint`]), with one range request: what a reader's first
    /// read of a chunk waits for, instead of the whole chunk. Only the length is checked, so
    /// this refuses to run against an endpoint that is not trusted (there a range can only be
    /// verified as whole pieces: [`VolumeClient::fetch_piece`]).
    pub async fn fetch_trusted_range(&self, url: &pb::SignedUrl, id: ChunkId, start: u64, len: u64) -> Result<Bytes> {
        if self.verify != Verify::Length {
            return Err(ClientError::Protocol(format!("GET {id} range: an unverified range from an untrusted endpoint")));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let what = format!("GET {id} bytes {start}+{len}");
        let (bytes, _) = self.get_range(url, start, start + len - 1, &what).await?;
        if bytes.len() as u64 != len {
            return Err(ClientError::Protocol(format!("{what}: got {} bytes", bytes.len())));
        }
        Ok(bytes)
    }

    /// Downloads (and verifies, unless the endpoint is trusted) one chunk from a URL the
    /// caller already holds (from [`VolumeClient::chunk_urls`]), without touching the cache.
    pub async fn fetch_chunk_at(&self, url: pb::SignedUrl, id: ChunkId) -> Result<Bytes> {
        get_chunk(&self.http, &self.pool, url, id, self.verify).await
    }

    /// Fetches piece `idx` of a chunk whose length the caller does not know (a relay that
    /// was asked for a range, like vmm-host's gateway): the server's `Content-Range` says it.
    /// The piece is always verified against the URL's piece CVs, which must merge into `id`
    /// for that length. Returns the piece and the chunk's length.
    pub async fn fetch_piece_of_unknown_length(&self, url: &pb::SignedUrl, id: ChunkId, idx: usize) -> Result<(Bytes, u64)> {
        use chunkstore::pieces::{PIECE_SIZE, root_from_cvs, verify_piece};
        let what = format!("GET {id} piece {idx}");
        let start = idx as u64 * PIECE_SIZE;
        let (bytes, total) = self.get_range(url, start, start + PIECE_SIZE - 1, &what).await?;
        let len = total.ok_or_else(|| ClientError::Protocol(format!("{what}: no chunk length in the answer")))?;
        if root_from_cvs(len, &url.piece_cvs) != Some(id) {
            return Err(ClientError::Integrity(IntegrityFailure::PieceCvs(id)));
        }
        verify_piece(id, len, &url.piece_cvs, idx, &bytes).map_err(|e| ClientError::Integrity(e.into()))?;
        Ok((bytes, len))
    }

    /// GET of bytes `[start, end]` of a signed URL, retried after transport failures; the
    /// body and the total length from `Content-Range`, when the server sent one.
    async fn get_range(&self, url: &pb::SignedUrl, start: u64, end: u64, what: &str) -> Result<(Bytes, Option<u64>)> {
        use backon::Retryable;
        let once = || async {
            let req = self.http.get(&url.url).header("range", format!("bytes={start}-{end}"));
            let resp = send_signed(req, &url.headers, what).await?;
            let total = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, t)| t.parse::<u64>().ok());
            let body = read_body(resp, &self.pool, what).await?;
            Ok((body, total))
        };
        once.retry(transport_backoff()).when(|e| matches!(e, ClientError::Transfer { .. })).await
    }

    /// PUTs `body` to a signed upload URL with the headers it must carry (a relay, such as
    /// vmm-host's volume gateway, forwarding an upload it checked).
    pub async fn put_url(&self, url: &str, headers: &HashMap<String, String>, body: Bytes) -> Result<()> {
        put_retrying(&self.http, url, headers, body, "PUT (relayed)").await
    }

    /// Chunks whole files with the volume's chunker, uploads missing chunks, and commits them
    /// (plus delete markers for `deletes`) against `base`, by this client's
    /// [author](Self::with_author). Returns the commit response.
    pub async fn commit_files(
        &mut self,
        org: &str,
        name: &str,
        base: &str,
        files: Vec<FileUpload>,
        deletes: &[&str],
    ) -> Result<pb::CommitResponse> {
        let vol = self.get_volume(org, name, false).await?;
        let chunking = chunking_from_proto(vol.chunking).unwrap_or(Chunking::Fixed);
        let mut chunks: HashMap<ChunkId, Bytes> = HashMap::new();
        let mut changes = Vec::with_capacity(files.len() + deletes.len());
        for f in files {
            let policy = chunking.policy_for(f.data.len() as u64);
            let spans = policy.chunk_parallel(&f.data);
            let mut refs = Vec::with_capacity(spans.len());
            for s in spans {
                chunks.insert(s.id, f.data.slice(s.offset as usize..(s.offset + s.len) as usize));
                refs.push(pb::ChunkRef { id: s.id.as_bytes().to_vec(), len: s.len as u32 });
            }
            let entry = pb::Entry {
                mode: f.mode,
                mtime_ns: f.mtime_ns,
                kind: Some(pb::entry::Kind::File(pb::FileEntry {
                    size: f.data.len() as u64,
                    policy: Some(policy_to_proto(&policy)),
                    chunks: refs,
                })),
            };
            changes.push(pb::Change { path: f.path, op: Some(pb::change::Op::Upsert(entry)) });
        }
        for d in deletes {
            changes.push(pb::Change { path: (*d).to_owned(), op: Some(pb::change::Op::Delete(true)) });
        }
        self.upload_chunks(org, name, &chunks).await?;
        let req = pb::CommitRequest {
            volume: vref(org, name),
            base: base.to_owned(),
            changes,
            message: String::new(),
            author: self.author.clone(),
        };
        Ok(self.grpc.commit(req).await?.into_inner())
    }

    /// Reads a whole file at the head (downloads and verifies every chunk).
    pub async fn read_file(&mut self, org: &str, name: &str, path: &str) -> Result<Vec<u8>> {
        let req = pb::StatRequest { volume: vref(org, name), commit: String::new(), path: path.to_owned() };
        let g = &self.grpc;
        let entry = retry_idempotent(|| {
            let (mut g, req) = (g.clone(), req.clone());
            async move { g.stat(req).await }
        })
        .await?
        .into_inner()
        .entry;
        let entry = entry.ok_or_else(|| ClientError::Protocol("stat returned no entry".into()))?;
        let entry = entry_from_proto(&entry, false)?;
        let EntryKind::File(file) = entry.kind else {
            return Err(ClientError::Protocol(format!("{path} is not a regular file")));
        };
        let ids: Vec<ChunkId> = file.chunks.iter().map(|(id, _)| *id).collect();
        let parts = self.download_chunks(org, name, &ids).await?;
        let out = parts.concat();
        if out.len() as u64 != file.size {
            return Err(ClientError::Protocol(format!("{path}: chunks hold {} bytes, entry says {}", out.len(), file.size)));
        }
        Ok(out)
    }
}

fn cache_error(e: ChunkError) -> ClientError {
    match e {
        ChunkError::Integrity { .. } | ChunkError::PieceIntegrity { .. } => ClientError::Integrity(e.into()),
        other => ClientError::Cache(other),
    }
}

/// Sends a signed-URL request with the headers the URL requires; non-2xx is an error.
async fn send_signed(req: reqwest::RequestBuilder, headers: &HashMap<String, String>, what: &str) -> Result<reqwest::Response> {
    let req = headers.iter().fold(req, |req, (k, v)| req.header(k, v));
    let resp = req.send().await.map_err(|source| ClientError::Transfer { what: what.to_owned(), source })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(ClientError::Refused { what: what.to_owned(), status: status.as_u16(), body: body.trim().to_owned() });
    }
    Ok(resp)
}

/// The body of a batch upload: one frame per chunk, in the server's order (see [`volume_model::batch`]).
fn batch_body(parts: &[(ChunkId, Bytes)]) -> Result<Vec<u8>> {
    let len = batch::body_len(parts.iter().map(|(_, d)| d.len() as u64));
    let mut body = Vec::with_capacity(len as usize);
    for (id, data) in parts {
        let n = u32::try_from(data.len())
            .ok()
            .filter(|&n| n as u64 <= batch::BATCH_CHUNK_MAX)
            .ok_or_else(|| ClientError::Protocol(format!("server batched chunk {id} of {} bytes", data.len())))?;
        body.extend_from_slice(&batch::frame_header(id, n));
        body.extend_from_slice(data);
    }
    Ok(body)
}

async fn put_batch(http: &reqwest::Client, b: pb::BatchUpload, body: Vec<u8>) -> Result<()> {
    put_retrying(http, &b.url, &b.headers, Bytes::from(body), &format!("PUT batch of {} chunks", b.ids.len())).await
}

async fn put_chunk(http: &reqwest::Client, u: pb::SignedUrl, data: Bytes) -> Result<()> {
    put_retrying(http, &u.url, &u.headers, data, "PUT chunk").await
}

/// A signed PUT, retried after transport failures (a PUT of content-addressed bytes is
/// idempotent; see `transport_backoff`).
async fn put_retrying(
    http: &reqwest::Client,
    url: &str,
    headers: &HashMap<String, String>,
    body: Bytes,
    what: &str,
) -> Result<()> {
    use backon::Retryable;
    let once = || async { send_signed(http.put(url).body(body.clone()), headers, what).await.map(|_| ()) };
    // Also retried: a server that had no upload slot free (503) or cut off a body that
    // arrived too slowly (408); see volumed's `datapath::body`.
    let retryable =
        |e: &ClientError| matches!(e, ClientError::Transfer { .. } | ClientError::Refused { status: 408 | 429 | 503, .. });
    once.retry(transport_backoff()).when(retryable).await
}

/// A response's body, received frame by frame into a buffer of `pool` sized from its
/// `Content-Length` (so the frames hyper read are dropped at once and its read buffer is
/// reused, and the body lands in memory that is already faulted in; see
/// [`chunkstore::memory::BufferPool`]). A body over [`chunkstore::MAX_CHUNK_SIZE`] is refused
/// whatever its headers say.
async fn read_body(
    mut resp: reqwest::Response,
    pool: &std::sync::Arc<chunkstore::memory::BufferPool>,
    what: &str,
) -> Result<Bytes> {
    let max = chunkstore::MAX_CHUNK_SIZE;
    let expect = resp.content_length().unwrap_or(0).min(max);
    let mut buf = pool.take(expect as usize);
    while let Some(frame) = resp.chunk().await.map_err(|source| ClientError::Transfer { what: what.to_owned(), source })? {
        if (buf.len() + frame.len()) as u64 > max {
            return Err(ClientError::Protocol(format!("{what}: the body is longer than the largest chunk ({max} bytes)")));
        }
        buf.extend_from_slice(&frame);
    }
    Ok(buf.freeze())
}

async fn get_chunk(
    http: &reqwest::Client,
    pool: &std::sync::Arc<chunkstore::memory::BufferPool>,
    u: pb::SignedUrl,
    id: ChunkId,
    verify: Verify,
) -> Result<Bytes> {
    use backon::Retryable;
    let what = format!("GET {id}");
    let once = || async {
        let resp = send_signed(http.get(&u.url), &u.headers, &what).await?;
        read_body(resp, pool, &what).await
    };
    // A GET is idempotent: a connection that died (see `transport_backoff`) is retried.
    let bytes = once.retry(transport_backoff()).when(|e| matches!(e, ClientError::Transfer { .. })).await?;
    match verify {
        Verify::Hash => id.verify(&bytes).map_err(|e| ClientError::Integrity(e.into()))?,
        // The chunk's length is in its URL's request (the entry), not here: callers check it
        // against the entry when they assemble files; an empty answer is never a chunk.
        Verify::Length if bytes.is_empty() => return Err(ClientError::Protocol(format!("GET {id}: empty body"))),
        Verify::Length => {}
    }
    Ok(bytes)
}

/// How downloaded bytes are checked (see [`VolumeClient::trusting_endpoint`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    /// BLAKE3 against the chunk id (and piece CVs for ranges).
    Hash,
    /// Lengths only: the endpoint verified the bytes.
    Length,
}
