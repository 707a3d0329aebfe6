//! The volume gateway: how a guest reaches its volumes, and the host's one verified chunk
//! cache that every sailbox on the host reads through.
//!
//! Each sailbox has its own listener, 127.0.0.1:7420 inside the sailbox's host-NIC network
//! namespace ([`crate::host_nic`]), served by [`Gateway::serve`]. The guest reaches it at
//! [`GUEST_ADDR`] on its host NIC, whose passt runs in that namespace and maps that one
//! address there (docs/networking.md), so the guest never sees volumed, the host's loopback or
//! another sailbox's gateway. Which listener a connection arrives on is the guest's identity;
//! what it may reach is the sailbox's [`Scope`]: its org and the volumes mounted in it.
//! ([`Gateway::bind`] serves the same on a Unix socket, for tests and tools without a VM.)
//!
//! What a listener serves:
//! - **`sail.volume.v1.VolumeService`** (gRPC, what the guest's `sail-volume-fuse` calls),
//!   forwarded to volumed with the org forced to the sailbox's. A volume outside the scope
//!   gets exactly volumed's answer for a volume that does not exist; `DeleteVolume` is refused,
//!   `GetVolume` never mints, `ListVolumes` lists the mounted ones, and a `Commit`'s author is
//!   set to `sailbox/<sailbox id>` whatever the guest sent, so the log shows which sailbox
//!   made each commit.
//! - **Chunk reads.** `ChunkUrls` answers carry gateway URLs
//!   `/v1/chunks/<volume>/<chunk>/<expires>/<mac>` (the MAC binds sailbox, volume, chunk and
//!   expiry under a host key, so a guest cannot read a chunk by guessing its hash: it must
//!   have been granted through `ChunkUrls` of a mounted volume, which volumed answered). A GET
//!   (whole or `Range`) is served from memory, else the host's disk cache, else fetched from
//!   the backend through volumed's signed URL — once per host however many sailboxes want it,
//!   verified here before it is cached (the host is trusted, the guest is not).
//! - **Uploads.** `MissingChunks` answers carry `/v1/uploads/<token>`; a PUT is checked (a
//!   single chunk must hash to its id and may not exceed the declared length; a batch must
//!   have its exact length) and relayed to volumed's signed URL. Uploaded chunks enter the
//!   host cache, so other sailboxes read a fresh commit without a backend fetch. Tokens live
//!   in memory until their URL expires (a commit that outlives a vmm-host restart asks again).
//!
//! Costs: a chunk fetched cold crosses the backend once per host; the guest's read then costs
//! the host NIC (passt and the guest's TCP stack; docs/networking.md) and no hashing in the
//! guest (the agent mounts with `--trusted-endpoint`); figures in docs/benchmarks.md
//! ("Volumes inside a sailbox").

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chunkstore::{ChunkCache, ChunkId};
use parking_lot::Mutex;
use proto::ErrorDetail;
use proto::volume as pb;
use proto::volume::volume_service_server::{VolumeService, VolumeServiceServer};
use tokio::sync::OnceCell;
use tonic::{Code, Request, Status};
use volume_client::VolumeClient;

use crate::error::{Result, SailboxError};
use sysutil::clock::now_ms;

/// Where a guest reaches its gateway: the one address of its host NIC that leads anywhere
/// (the NIC's passt turns it into `127.0.0.1:`[`crate::host_nic::GATEWAY_PORT`] inside the
/// sailbox's own network namespace, where only its gateway listens; docs/networking.md).
pub const GUEST_ADDR: &str = "10.0.3.2:7420";

/// [`GUEST_ADDR`] as the endpoint URL a guest's helper is given.
pub fn guest_endpoint() -> String {
    format!("http://{GUEST_ADDR}")
}

/// A Unix socket path in a run directory for [`Gateway::bind`] (tests and tools that serve a
/// gateway without a VM; sailboxes are served through [`Gateway::serve`]).
pub fn socket_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("volumes.sock")
}

/// Upload tokens one sailbox may hold at once (a commit asks for one per missing chunk or
/// batch; expired ones are dropped first).
const MAX_UPLOAD_TOKENS: usize = 200_000;
/// Largest gRPC message either way (volumed's own limit).
const MAX_MESSAGE: usize = 64 << 20;
/// Largest upload body (a batch; volumed checks the exact frame layout).
const MAX_UPLOAD_BODY: u64 = 64 << 20;

/// The host-wide part: the connection to volumed, the chunk caches, the URL key.
pub struct Gateway {
    upstream: String,
    upstream_key: Option<tenancy::ApiKey>,
    guest_endpoint: String,
    client: OnceCell<VolumeClient>,
    disk: ChunkCache,
    memory: chunkstore::memory::ByteCache<ChunkId>,
    /// Chunks being fetched whole in the background after a cold piece was served.
    filling: Mutex<std::collections::HashSet<ChunkId>>,
    key: [u8; 32],
    upload_limits: Mutex<UploadLimits>,
}

/// Limits on a sailbox's upload bodies, so a guest that opens uploads and stalls them holds
/// neither memory nor tasks without end (each body is buffered whole to be verified).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Bodies one sailbox may send at once (each buffered up to 64 MiB).
    pub slots: usize,
    /// Longest an upload waits for a slot before `503` (+ `Retry-After`; the helper retries).
    pub queue_wait: std::time::Duration,
    /// Time every body gets on top of its length at `min_rate`, else `408`.
    pub grace: std::time::Duration,
    /// Slowest average rate a body may arrive at, bytes per second.
    pub min_rate: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            slots: 8,
            queue_wait: std::time::Duration::from_secs(10),
            grace: std::time::Duration::from_secs(30),
            min_rate: 256 << 10,
        }
    }
}

/// What one sailbox may reach: its org and the volumes mounted in it.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The sailbox (bound into every chunk URL it gets).
    pub sailbox: String,
    /// Its org.
    pub org: String,
    /// Names of the volumes mounted in it.
    pub volumes: BTreeSet<String>,
}

impl Scope {
    /// The author every commit through this sailbox's gateway records: `sailbox/<id>`.
    pub fn author(&self) -> String {
        format!("sailbox/{}", self.sailbox)
    }
}

/// An upload the gateway granted: where it goes and what it may carry.
struct Upload {
    url: String,
    headers: HashMap<String, String>,
    expires_unix_ms: u64,
    kind: UploadKind,
}

#[derive(Clone, Copy)]
enum UploadKind {
    /// One chunk: the body must hash to the id and be at most `len` bytes.
    Chunk { id: ChunkId, len: u64 },
    /// A batch of frames: the body must be exactly `len` bytes (volumed checks the frames).
    Batch { len: u64 },
}

/// One sailbox's gateway state, shared by its gRPC service and its data routes.
struct Sailbox {
    gateway: Arc<Gateway>,
    scope: Scope,
    uploads: Mutex<HashMap<String, Upload>>,
    /// Upload slots ([`UploadLimits::slots`]).
    upload_slots: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    /// A gateway forwarding to volumed at `upstream`, caching chunks in `cache_dir` (at most
    /// `cache_bytes` on disk, `memory_bytes` in memory), signing chunk URLs with the key kept
    /// at `key_file` (made on first use). URLs it hands out start with `guest_endpoint`, where
    /// guests reach their socket ([`GUEST_ADDR`] on a sailbox's host NIC). Calls to volumed
    /// carry `upstream_key` (an operator key: the gateway names each sailbox's org itself).
    pub fn open(
        upstream: String,
        upstream_key: Option<tenancy::ApiKey>,
        guest_endpoint: String,
        cache_dir: &Path,
        cache_bytes: u64,
        memory_bytes: u64,
        key_file: &Path,
    ) -> Result<Arc<Self>> {
        let disk = ChunkCache::open(cache_dir, cache_bytes)
            .map_err(|e| SailboxError::Setup(format!("opening the chunk cache {}: {e}", cache_dir.display())))?;
        let key = load_or_create_key(key_file)?;
        // Chunks are up to 64 MiB: one shard, or they would not be kept (chunkstore::memory).
        let memory = chunkstore::memory::byte_cache(memory_bytes.max(1), 8 << 20);
        Ok(Arc::new(Self {
            upstream,
            upstream_key,
            guest_endpoint,
            client: OnceCell::new(),
            disk,
            memory,
            filling: Mutex::default(),
            key,
            upload_limits: Mutex::new(UploadLimits::default()),
        }))
    }

    /// Replaces the limits on upload bodies (for sailboxes bound from now on).
    pub fn set_upload_limits(&self, limits: UploadLimits) {
        *self.upload_limits.lock() = limits;
    }

    /// The disk cache's counters (`fetches`: chunks fetched from the backend).
    pub fn cache_stats(&self) -> chunkstore::CacheStats {
        self.disk.stats()
    }

    /// Checks that a volume exists (minting it with `mint`), for a create that mounts it.
    pub async fn resolve(&self, org: &str, name: &str, mint: bool) -> Result<()> {
        let mut c = self.client().await.map_err(|s| SailboxError::Creation(s.message().to_owned()))?;
        match c.get_volume(org, name, mint).await {
            Ok(_) => Ok(()),
            Err(volume_client::ClientError::Server { code: Code::NotFound, .. }) => Err(SailboxError::InvalidConfig(format!(
                "volume {name} does not exist (mint it at create, e.g. `sail box create --volume {name}:/path --mint`)"
            ))),
            Err(e) => Err(SailboxError::Creation(format!("looking up volume {name}: {e}"))),
        }
    }

    /// A client of volumed (connected on first use; a failed connect is retried next time).
    pub async fn client(&self) -> std::result::Result<VolumeClient, Status> {
        let c = self
            .client
            .get_or_try_init(|| async {
                VolumeClient::connect_with_key(&self.upstream, self.upstream_key.as_ref())
                    .await
                    .map(|c| c.with_cache(self.disk.clone()))
            })
            .await
            .map_err(|e| Status::unavailable(format!("the volume service is unreachable: {e}")))?;
        Ok(c.clone())
    }

    /// Serves `scope`'s gateway on `socket` (replacing a stale one) until the returned task
    /// is aborted.
    pub fn bind(self: &Arc<Self>, socket: &Path, scope: Scope) -> Result<tokio::task::JoinHandle<()>> {
        let _ = std::fs::remove_file(socket);
        let listener =
            tokio::net::UnixListener::bind(socket).map_err(|e| SailboxError::io(format!("binding {}", socket.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| SailboxError::io(format!("restricting {}", socket.display()), e))?;
        Ok(self.spawn(listener, scope))
    }

    /// Serves `scope`'s gateway on a TCP listener (non-blocking; the one in the sailbox's
    /// host-NIC namespace, [`crate::host_nic`]) until the returned task is aborted.
    pub fn serve(self: &Arc<Self>, listener: std::net::TcpListener, scope: Scope) -> Result<tokio::task::JoinHandle<()>> {
        use axum::serve::ListenerExt;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| SailboxError::io("gateway listener", e))?;
        // Small requests (gRPC, range GETs) must not wait for Nagle.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        Ok(self.spawn(listener, scope))
    }

    fn spawn<L: axum::serve::Listener>(self: &Arc<Self>, listener: L, scope: Scope) -> tokio::task::JoinHandle<()>
    where
        L::Addr: std::fmt::Debug,
    {
        let upload_slots = Arc::new(tokio::sync::Semaphore::new(self.upload_limits.lock().slots.max(1)));
        let sailbox = Arc::new(Sailbox { gateway: self.clone(), scope, uploads: Mutex::default(), upload_slots });
        let router = router(sailbox.clone());
        let span = tracing::info_span!("gateway", sailbox = %sailbox.scope.sailbox);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::warn!(error = %e, "volume gateway stopped");
                }
            },
            span,
        ))
    }

    fn mac(&self, sailbox: &str, volume: &str, id: &ChunkId, expires: u64) -> String {
        let msg = format!("{sailbox}\0{volume}\0{}\0{expires}", id.to_hex());
        blake3::keyed_hash(&self.key, msg.as_bytes()).to_hex()[..32].to_owned()
    }

    /// Piece `idx` of a chunk that is nowhere on this host and not being fetched yet, straight
    /// from the backend (a range request, verified against volumed's piece CVs), with the
    /// chunk's length; the whole chunk is then fetched into the caches in the background, and
    /// the reader's next pieces wait for that. So a cold reader's first byte waits for one
    /// 1 MiB piece, not a 64 MiB chunk. `None`: take the whole-chunk path (cached, being
    /// filled, small, or no CVs known).
    async fn cold_piece(self: &Arc<Self>, org: &str, volume: &str, id: ChunkId, idx: usize) -> Option<(Bytes, u64)> {
        if self.memory.contains_key(&id) || self.disk.contains(id) || !self.filling.lock().insert(id) {
            return None;
        }
        let got = async {
            let mut client = self.client().await.ok()?;
            let url = client.chunk_urls(org, volume, &[id]).await.ok()?.pop()?;
            if url.piece_cvs.is_empty() {
                return None;
            }
            match client.fetch_piece_of_unknown_length(&url, id, idx).await {
                Ok(got) => Some(got),
                Err(e) => {
                    tracing::debug!(chunk = %id, error = %e, "cold piece not fetched; reading the chunk whole");
                    None
                }
            }
        }
        .await;
        let (this, org, volume) = (self.clone(), org.to_owned(), volume.to_owned());
        tokio::spawn(async move {
            let _ = this.chunk(&org, &volume, id).await;
            this.filling.lock().remove(&id);
        });
        got
    }

    /// A chunk's bytes: memory, else disk, else the backend (verified, then cached).
    async fn chunk(&self, org: &str, volume: &str, id: ChunkId) -> std::result::Result<Bytes, Status> {
        let guard = match self.memory.get_value_or_guard_async(&id).await {
            Ok(bytes) => return Ok(bytes),
            Err(guard) => guard,
        };
        let mut client = self.client().await?;
        let bytes = client.download_chunks(org, volume, &[id]).await.map_err(client_status)?.pop();
        let bytes = bytes.ok_or_else(|| Status::internal(format!("volumed returned no bytes for chunk {id}")))?;
        let _ = guard.insert(bytes.clone());
        Ok(bytes)
    }
}

/// The key file's 32 bytes, made (0600) if missing.
fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    sysutil::keyfile::load_or_create(path, rand::random).map_err(|e| SailboxError::Setup(format!("the gateway key: {e}")))
}

/// The status a client error becomes: volumed's own status where it gave one.
fn client_status(e: volume_client::ClientError) -> Status {
    match e {
        volume_client::ClientError::Server { name, code, message } => ErrorDetail::to_status(code, name, message),
        other => Status::unavailable(other.to_string()),
    }
}

fn not_found(org: &str, name: &str) -> Status {
    ErrorDetail::to_status(Code::NotFound, "VolumeNotFoundError", format!("volume {org}/{name} not found"))
}

impl Sailbox {
    /// Checks that `volume` is mounted in this sailbox and puts the sailbox's org in it.
    fn admit(&self, volume: &mut Option<pb::VolumeRef>) -> std::result::Result<String, Status> {
        let v = volume.get_or_insert_with(Default::default);
        let org = if v.org.is_empty() { self.scope.org.clone() } else { v.org.clone() };
        if org != self.scope.org || !self.scope.volumes.contains(&v.name) {
            return Err(not_found(&org, &v.name));
        }
        v.org = org;
        Ok(v.name.clone())
    }

    fn chunk_url(&self, volume: &str, u: pb::SignedUrl) -> std::result::Result<pb::SignedUrl, Status> {
        let id = ChunkId::from_slice(&u.id).map_err(|e| Status::internal(format!("volumed returned a bad chunk id: {e}")))?;
        let mac = self.gateway.mac(&self.scope.sailbox, volume, &id, u.expires_unix_ms);
        let url = format!("{}/v1/chunks/{volume}/{}/{}/{mac}", self.gateway.guest_endpoint, id.to_hex(), u.expires_unix_ms);
        Ok(pb::SignedUrl { url, headers: HashMap::new(), ..u })
    }

    /// Records an upload and returns its gateway URL.
    fn grant_upload(&self, url: String, headers: HashMap<String, String>, expires_unix_ms: u64, kind: UploadKind) -> String {
        let token = format!("{:032x}", rand::random::<u128>());
        let mut uploads = self.uploads.lock();
        if uploads.len() >= MAX_UPLOAD_TOKENS {
            let now = now_ms();
            uploads.retain(|_, u| u.expires_unix_ms > now);
        }
        if uploads.len() >= MAX_UPLOAD_TOKENS {
            // Full of live grants: the oldest-expiring make room (their commit retries).
            if let Some(k) = uploads.iter().min_by_key(|(_, u)| u.expires_unix_ms).map(|(k, _)| k.clone()) {
                uploads.remove(&k);
            }
        }
        uploads.insert(token.clone(), Upload { url, headers, expires_unix_ms, kind });
        format!("{}/v1/uploads/{token}", self.gateway.guest_endpoint)
    }
}

/// The gRPC service one sailbox's guest talks to.
struct Service(Arc<Sailbox>);

type GrpcResult<T> = std::result::Result<tonic::Response<T>, Status>;

impl Sailbox {
    /// Admits a request's volume and returns the request with a client to forward it with.
    async fn forwardable<T>(
        &self,
        req: Request<T>,
        volume: impl FnOnce(&mut T) -> &mut Option<pb::VolumeRef>,
    ) -> std::result::Result<(T, VolumeClient), Status> {
        let mut req = req.into_inner();
        self.admit(volume(&mut req))?;
        Ok((req, self.gateway.client().await?))
    }
}

#[tonic::async_trait]
impl VolumeService for Service {
    async fn get_head(&self, req: Request<pb::GetHeadRequest>) -> GrpcResult<pb::Head> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().get_head(req).await
    }

    async fn list_dir(&self, req: Request<pb::ListDirRequest>) -> GrpcResult<pb::ListDirResponse> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().list_dir(req).await
    }

    async fn get_tree(&self, req: Request<pb::GetTreeRequest>) -> GrpcResult<pb::GetTreeResponse> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().get_tree(req).await
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> GrpcResult<pb::StatResponse> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().stat(req).await
    }

    async fn diff(&self, req: Request<pb::DiffRequest>) -> GrpcResult<pb::DiffResponse> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().diff(req).await
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> GrpcResult<pb::CommitResponse> {
        let (mut req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        // A sailbox's commits are its own, whatever the guest claims.
        req.author = self.0.scope.author();
        c.grpc().commit(req).await
    }

    async fn log(&self, req: Request<pb::LogRequest>) -> GrpcResult<pb::LogResponse> {
        let (req, mut c) = self.0.forwardable(req, |r| &mut r.volume).await?;
        c.grpc().log(req).await
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> GrpcResult<pb::Volume> {
        let mut req = req.into_inner();
        self.0.admit(&mut req.volume)?;
        req.mint_if_missing = false;
        self.0.gateway.client().await?.grpc().get_volume(req).await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> std::result::Result<tonic::Response<pb::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        if !req.org.is_empty() && req.org != self.0.scope.org {
            return Ok(tonic::Response::new(pb::ListVolumesResponse::default()));
        }
        let req = pb::ListVolumesRequest { org: self.0.scope.org.clone() };
        let mut resp = self.0.gateway.client().await?.grpc().list_volumes(req).await?.into_inner();
        resp.volumes.retain(|v| self.0.scope.volumes.contains(&v.name));
        Ok(tonic::Response::new(resp))
    }

    async fn delete_volume(
        &self,
        _req: Request<pb::DeleteVolumeRequest>,
    ) -> std::result::Result<tonic::Response<pb::DeleteVolumeResponse>, Status> {
        Err(ErrorDetail::to_status(Code::PermissionDenied, "SailError", "volumes cannot be deleted from inside a sailbox"))
    }

    async fn chunk_urls(
        &self,
        req: Request<pb::ChunkUrlsRequest>,
    ) -> std::result::Result<tonic::Response<pb::ChunkUrlsResponse>, Status> {
        let mut req = req.into_inner();
        let volume = self.0.admit(&mut req.volume)?;
        let resp = self.0.gateway.client().await?.grpc().chunk_urls(req).await?.into_inner();
        let downloads =
            resp.downloads.into_iter().map(|u| self.0.chunk_url(&volume, u)).collect::<std::result::Result<_, _>>()?;
        Ok(tonic::Response::new(pb::ChunkUrlsResponse { downloads }))
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> std::result::Result<tonic::Response<pb::MissingChunksResponse>, Status> {
        let mut req = req.into_inner();
        self.0.admit(&mut req.volume)?;
        let lens: HashMap<Vec<u8>, u64> = req.chunks.iter().map(|c| (c.id.clone(), c.len)).collect();
        let resp = self.0.gateway.client().await?.grpc().missing_chunks(req).await?.into_inner();
        let mut uploads = Vec::with_capacity(resp.uploads.len());
        for u in resp.uploads {
            let id = ChunkId::from_slice(&u.id).map_err(|e| Status::internal(format!("volumed returned a bad chunk id: {e}")))?;
            let len = lens.get(&u.id).copied().unwrap_or(chunkstore::MAX_CHUNK_SIZE);
            let url = self.0.grant_upload(u.url, u.headers, u.expires_unix_ms, UploadKind::Chunk { id, len });
            uploads.push(pb::SignedUrl { url, headers: HashMap::new(), ..u });
        }
        let batches = resp
            .batches
            .into_iter()
            .map(|b| {
                let kind = UploadKind::Batch { len: b.body_len };
                let url = self.0.grant_upload(b.url, b.headers, b.expires_unix_ms, kind);
                pb::BatchUpload { url, headers: HashMap::new(), ..b }
            })
            .collect();
        Ok(tonic::Response::new(pb::MissingChunksResponse { uploads, batches }))
    }
}

fn router(sailbox: Arc<Sailbox>) -> axum::Router {
    use axum::routing::{get, put};
    let service = VolumeServiceServer::new(Service(sailbox.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let grpc = tonic::service::Routes::new(service).prepare().into_axum_router();
    let data = axum::Router::new()
        .route("/v1/chunks/{volume}/{id}/{expires}/{mac}", get(get_chunk))
        .route("/v1/uploads/{token}", put(put_upload))
        .with_state(sailbox);
    grpc.merge(data)
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

async fn get_chunk(
    State(sb): State<Arc<Sailbox>>,
    UrlPath((volume, id, expires, mac)): UrlPath<(String, String, u64, String)>,
    headers: HeaderMap,
) -> Response {
    let Ok(id) = id.parse::<ChunkId>() else { return plain(StatusCode::BAD_REQUEST, "bad chunk id") };
    let expected = sb.gateway.mac(&sb.scope.sailbox, &volume, &id, expires);
    if !constant_time_eq(expected.as_bytes(), mac.as_bytes()) || !sb.scope.volumes.contains(&volume) {
        return plain(StatusCode::FORBIDDEN, "this URL was not granted to this sailbox");
    }
    if expires <= now_ms() {
        return plain(StatusCode::FORBIDDEN, "this URL has expired; ask for a new one");
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // A cold chunk's first piece (what a reader's first byte waits for) comes on its own.
    if let Some((idx, want)) = range.and_then(single_piece)
        && let Some((piece, total)) = sb.gateway.cold_piece(&sb.scope.org, &volume, id, idx).await
        && !piece.is_empty()
    {
        let piece = piece.slice(..piece.len().min(want));
        let start = idx as u64 * chunkstore::pieces::PIECE_SIZE;
        let end = start + piece.len() as u64 - 1;
        let content_range = format!("bytes {start}-{end}/{total}");
        return (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, content_range)], Body::from(piece)).into_response();
    }
    let bytes = match sb.gateway.chunk(&sb.scope.org, &volume, id).await {
        Ok(b) => b,
        Err(s) if s.code() == Code::NotFound => return plain(StatusCode::NOT_FOUND, s.message()),
        Err(s) => return plain(StatusCode::BAD_GATEWAY, s.message()),
    };
    let total = bytes.len() as u64;
    match range {
        None => ([(header::CONTENT_LENGTH, total.to_string())], Body::from(bytes)).into_response(),
        Some(range) => match parse_range(range, total) {
            Some((start, end)) => {
                let part = bytes.slice(start as usize..=end as usize);
                let content_range = format!("bytes {start}-{end}/{total}");
                (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, content_range)], Body::from(part)).into_response()
            }
            None => (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{total}"))]).into_response(),
        },
    }
}

/// The piece a `bytes=a-b` range starts (what `VolumeClient::fetch_piece` asks for: a
/// piece-aligned start, at most one piece long) and how many bytes it wants, if it is one.
fn single_piece(spec: &str) -> Option<(usize, usize)> {
    use chunkstore::pieces::PIECE_SIZE;
    let (a, b) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if a % PIECE_SIZE != 0 || b < a || b - a >= PIECE_SIZE {
        return None;
    }
    Some((usize::try_from(a / PIECE_SIZE).ok()?, usize::try_from(b - a + 1).ok()?))
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `total` bytes, inclusive.
fn parse_range(spec: &str, total: u64) -> Option<(u64, u64)> {
    let (a, b) = spec.strip_prefix("bytes=")?.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (total.checked_sub(n.min(total))?, total.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, total.checked_sub(1)?),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(total.checked_sub(1)?)),
    };
    (start <= end && end < total).then_some((start, end))
}

/// Compares two MACs in time that does not depend on where they differ (shared with
/// [`crate::seal`]).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn put_upload(State(sb): State<Arc<Sailbox>>, UrlPath(token): UrlPath<String>, body: Body) -> Response {
    let grant = {
        let uploads = sb.uploads.lock();
        uploads.get(&token).map(|u| (u.url.clone(), u.headers.clone(), u.expires_unix_ms, u.kind))
    };
    let Some((url, headers, expires, kind)) = grant else {
        return plain(StatusCode::FORBIDDEN, "no such upload grant (it expired, or vmm-host restarted): ask again");
    };
    if expires <= now_ms() {
        return plain(StatusCode::FORBIDDEN, "this upload URL has expired; ask for a new one");
    }
    let limit = match kind {
        UploadKind::Chunk { len, .. } | UploadKind::Batch { len } => len.min(MAX_UPLOAD_BODY),
    };
    let limits = *sb.gateway.upload_limits.lock();
    let Ok(Ok(_slot)) = tokio::time::timeout(limits.queue_wait, sb.upload_slots.clone().acquire_owned()).await else {
        let mut busy = plain(StatusCode::SERVICE_UNAVAILABLE, "too many uploads in progress; retry");
        busy.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return busy;
    };
    let due = limits.grace + std::time::Duration::from_secs_f64(limit as f64 / limits.min_rate.max(1) as f64);
    let data = match tokio::time::timeout(due, axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, format!("upload body: {e}")),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, format!("the upload did not arrive within {due:?}")),
    };
    // The chunks the body carries, each checked against its id (cached after the upload).
    let chunks: Vec<(ChunkId, Bytes)> = match kind {
        UploadKind::Chunk { id, .. } => {
            if id.verify(&data).is_err() {
                return plain(StatusCode::BAD_REQUEST, format!("the body does not hash to chunk {id}"));
            }
            vec![(id, data.clone())]
        }
        UploadKind::Batch { len } => {
            if data.len() as u64 != len {
                return plain(StatusCode::BAD_REQUEST, format!("a batch body must be {len} bytes, got {}", data.len()));
            }
            match batch_chunks(&data) {
                Ok(chunks) => chunks,
                Err(why) => return plain(StatusCode::BAD_REQUEST, why),
            }
        }
    };
    let client = match sb.gateway.client().await {
        Ok(c) => c,
        Err(s) => return plain(StatusCode::BAD_GATEWAY, s.message()),
    };
    if let Err(e) = client.put_url(&url, &headers, data.clone()).await {
        return plain(StatusCode::BAD_GATEWAY, e.to_string());
    }
    // Verified above: other sailboxes on this host read them without a backend fetch.
    for (id, bytes) in chunks {
        if let Err(e) = sb.gateway.disk.insert_verified(id, bytes).await {
            tracing::debug!(error = %e, chunk = %id, "caching an uploaded chunk failed");
        }
    }
    StatusCode::OK.into_response()
}

/// The chunks of a batch body, each verified against its id.
fn batch_chunks(body: &Bytes) -> std::result::Result<Vec<(ChunkId, Bytes)>, String> {
    use volume_model::batch::{FrameError, FrameParser};
    #[derive(Debug)]
    enum Bad {
        Frame(FrameError),
        Hash(ChunkId),
    }
    impl From<FrameError> for Bad {
        fn from(e: FrameError) -> Self {
            Bad::Frame(e)
        }
    }
    let mut parser = FrameParser::new();
    let mut chunks = Vec::new();
    let fed = parser.feed(body, |id, bytes| {
        id.verify(bytes).map_err(|_| Bad::Hash(id))?;
        chunks.push((id, Bytes::copy_from_slice(bytes)));
        Ok::<_, Bad>(())
    });
    match fed.map_err(|b| match b {
        Bad::Frame(e) => format!("bad batch body: {e}"),
        Bad::Hash(id) => format!("a batch frame does not hash to chunk {id}"),
    }) {
        Ok(()) => parser.finish().map(|_| chunks).map_err(|e| format!("bad batch body: {e}")),
        Err(why) => Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=9-0", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
