//! The tonic gRPC service: request validation, dispatch to [`Volumes`], typed status errors.

use chunkstore::Chunking;
use prost::Message;
use proto::volume as pb;
use proto::volume::volume_service_server::VolumeService;
use tonic::{Code, Request, Response, Status};

use crate::error::VolumeError;
use crate::meta::VolumeRecord;
use crate::service::volumes::Volumes;
use tenancy::Identity;
use volume_model::convert::{self, ValidRef, chunk_ids, optional_commit_id, volume_ref};
use volume_model::{InvalidRequest, TreeId, TreeNode, VolPath};

/// Largest page of commits one Log call returns.
pub const MAX_LOG_LIMIT: u32 = 1000;

/// The gRPC face of [`Volumes`].
#[derive(Clone)]
pub struct GrpcVolumes {
    inner: Volumes,
}

impl GrpcVolumes {
    /// Wraps the service.
    pub fn new(inner: Volumes) -> Self {
        Self { inner }
    }

    /// The tonic server for this service, with request size bounded (16 MiB covers a commit
    /// of 100,000 changes).
    pub fn into_server(self) -> pb::volume_service_server::VolumeServiceServer<Self> {
        pb::volume_service_server::VolumeServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// Maps an error to a status whose details carry [`pb::ErrorDetail`] with the contract name.
pub fn to_status(e: impl Into<VolumeError>) -> Status {
    let e = e.into();
    let code = match &e {
        VolumeError::NotFound { .. } | VolumeError::CommitNotFound(_) | VolumeError::PathNotFound(_) => Code::NotFound,
        VolumeError::InvalidArgument(_) | VolumeError::RequestBody(_) => Code::InvalidArgument,
        VolumeError::CommitConflict(_) => Code::Aborted,
        VolumeError::MissingChunks { .. } => Code::FailedPrecondition,
        VolumeError::Integrity(_) | VolumeError::Decode(_) | VolumeError::TreeMissing(_) | VolumeError::ChunkIntegrity(_) => {
            Code::DataLoss
        }
        VolumeError::BadSignature(_) => Code::PermissionDenied,
        VolumeError::RocksDb(_)
        | VolumeError::MissingColumnFamily(_)
        | VolumeError::Io { .. }
        | VolumeError::BadSigningKey(_)
        | VolumeError::Task { .. }
        | VolumeError::Chunk(_)
        | VolumeError::Unsupported(_) => Code::Internal,
    };
    let detail = pb::ErrorDetail { name: e.name().to_owned(), message: e.to_string() };
    Status::with_details(code, e.to_string(), detail.encode_to_vec().into())
}

/// Converts a volume record to its protobuf form.
fn volume_to_proto(rec: &VolumeRecord) -> pb::Volume {
    pb::Volume {
        id: rec.id.to_string(),
        org: rec.org.clone(),
        name: rec.name.clone(),
        head: rec.head.to_hex(),
        created_unix_ms: rec.created_ms,
        chunking: match rec.chunking {
            Chunking::Fixed => pb::Chunking::Fixed as i32,
            Chunking::FastCdc => pb::Chunking::Fastcdc as i32,
        },
        commit_count: rec.seq + 1,
    }
}

fn entries(node: TreeNode) -> Vec<pb::NamedEntry> {
    node.entries.into_iter().map(|(name, e)| pb::NamedEntry { name, entry: Some(convert::entry_to_proto(&e)) }).collect()
}

type R<T> = Result<Response<T>, Status>;

/// The volume a request names, in the org its caller acts in (see [`Identity::scope`]: a
/// member's own org; naming another is refused before anything is looked up).
fn scoped(who: &Identity, v: Option<&pb::VolumeRef>) -> Result<ValidRef, Status> {
    let mut r = v.cloned().ok_or_else(|| to_status(VolumeError::invalid("missing volume reference")))?;
    r.org = who.scope(&r.org)?;
    volume_ref(Some(&r)).map_err(to_status)
}

#[tonic::async_trait]
impl VolumeService for GrpcVolumes {
    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> R<pb::Volume> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let chunking = convert::chunking_from_proto(req.chunking).map_err(to_status)?;
        let rec = self.inner.get_volume(v, req.mint_if_missing, chunking).await.map_err(to_status)?;
        Ok(Response::new(volume_to_proto(&rec)))
    }

    async fn list_volumes(&self, req: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
        let org = Identity::of(&req)?.scope(&req.get_ref().org)?;
        let recs = self.inner.list(org).await.map_err(to_status)?;
        Ok(Response::new(pb::ListVolumesResponse { volumes: recs.iter().map(volume_to_proto).collect() }))
    }

    async fn delete_volume(&self, req: Request<pb::DeleteVolumeRequest>) -> R<pb::DeleteVolumeResponse> {
        let who = Identity::of(&req)?;
        let v = scoped(&who, req.into_inner().volume.as_ref())?;
        self.inner.delete(v).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn get_head(&self, req: Request<pb::GetHeadRequest>) -> R<pb::Head> {
        let who = Identity::of(&req)?;
        let v = scoped(&who, req.into_inner().volume.as_ref())?;
        let (rec, commit) = self.inner.head(v).await.map_err(to_status)?;
        Ok(Response::new(pb::Head { commit: rec.head.to_hex(), root: commit.root.as_bytes().to_vec(), seq: rec.seq }))
    }

    async fn list_dir(&self, req: Request<pb::ListDirRequest>) -> R<pb::ListDirResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let commit = optional_commit_id(&req.commit).map_err(to_status)?;
        let path = VolPath::parse(&req.path).map_err(to_status)?;
        let (commit, tree, node) = self.inner.list_dir(v, commit, path).await.map_err(to_status)?;
        Ok(Response::new(pb::ListDirResponse { commit: commit.to_hex(), tree: tree.as_bytes().to_vec(), entries: entries(node) }))
    }

    async fn get_tree(&self, req: Request<pb::GetTreeRequest>) -> R<pb::GetTreeResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let tree = TreeId::from_slice(&req.tree).map_err(to_status)?;
        let node = self.inner.tree(v, tree).await.map_err(to_status)?;
        Ok(Response::new(pb::GetTreeResponse { entries: entries(node) }))
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> R<pb::StatResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let commit = optional_commit_id(&req.commit).map_err(to_status)?;
        let path = VolPath::parse(&req.path).map_err(to_status)?;
        let (commit, entry) = self.inner.stat(v, commit, path).await.map_err(to_status)?;
        Ok(Response::new(pb::StatResponse { commit: commit.to_hex(), entry: Some(convert::entry_to_proto(&entry)) }))
    }

    async fn diff(&self, req: Request<pb::DiffRequest>) -> R<pb::DiffResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let from = optional_commit_id(&req.from)
            .and_then(|c| c.ok_or_else(|| InvalidRequest::new("diff needs a `from` commit")))
            .map_err(to_status)?;
        let to = optional_commit_id(&req.to).map_err(to_status)?;
        let changes = self.inner.diff(v, from, to).await.map_err(to_status)?;
        Ok(Response::new(pb::DiffResponse { changes: changes.iter().map(convert::change_to_proto).collect() }))
    }

    async fn missing_chunks(&self, req: Request<pb::MissingChunksRequest>) -> R<pb::MissingChunksResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let ids = chunk_ids(&req.chunks.iter().map(|c| c.id.clone()).collect::<Vec<_>>()).map_err(to_status)?;
        let mut pieces = Vec::new();
        for (id, spec) in ids.iter().zip(&req.chunks) {
            if spec.piece_cvs.is_empty() {
                continue;
            }
            if chunkstore::pieces::root_from_cvs(spec.len, &spec.piece_cvs) != Some(*id) {
                return Err(to_status(VolumeError::invalid(format!("piece_cvs of chunk {id} do not merge into its id"))));
            }
            pieces.push((*id, spec.piece_cvs.clone()));
        }
        let chunks = ids.into_iter().zip(req.chunks.iter().map(|c| c.len)).collect();
        self.inner.record_pieces(&v, pieces).await.map_err(to_status)?;
        let missing = self.inner.missing_chunks(v, chunks, req.accept_batches).await.map_err(to_status)?;
        let batches = missing
            .batches
            .into_iter()
            .map(|b| pb::BatchUpload {
                url: b.url.url,
                method: b.url.method.to_owned(),
                expires_unix_ms: b.url.expires_unix_ms,
                headers: b.url.headers.into_iter().collect(),
                ids: b.chunks.iter().map(|(id, _)| id.as_bytes().to_vec()).collect(),
                body_len: b.body_len,
            })
            .collect();
        Ok(Response::new(pb::MissingChunksResponse { uploads: missing.single.into_iter().map(signed).collect(), batches }))
    }

    async fn chunk_urls(&self, req: Request<pb::ChunkUrlsRequest>) -> R<pb::ChunkUrlsResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let ids = chunk_ids(&req.ids).map_err(to_status)?;
        let urls = self.inner.chunk_urls(v, ids).await.map_err(to_status)?;
        let pieces = self.inner.pieces_of(urls.iter().map(|(id, _)| *id).collect()).await.map_err(to_status)?;
        let downloads = urls
            .into_iter()
            .zip(pieces)
            .map(|(u, cvs)| pb::SignedUrl { piece_cvs: cvs.unwrap_or_default(), ..signed(u) })
            .collect();
        Ok(Response::new(pb::ChunkUrlsResponse { downloads }))
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> R<pb::CommitResponse> {
        let who = Identity::of(&req)?;
        let mut req = req.into_inner();
        if let Some(v) = req.volume.as_mut() {
            v.org = who.scope(&v.org)?;
        }
        let valid = convert::validate_commit(&req).map_err(to_status)?;
        let out = self.inner.commit(valid).await.map_err(to_status)?;
        Ok(Response::new(pb::CommitResponse { commit: out.commit.to_hex(), seq: out.seq, merged: out.merged }))
    }

    async fn log(&self, req: Request<pb::LogRequest>) -> R<pb::LogResponse> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let v = scoped(&who, req.volume.as_ref())?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(MAX_LOG_LIMIT),
        } as usize;
        let before = (req.before_seq != 0).then_some(req.before_seq);
        let commits = self.inner.log(v, before, limit).await.map_err(to_status)?;
        Ok(Response::new(pb::LogResponse {
            commits: commits
                .into_iter()
                .map(|(id, c)| pb::CommitInfo {
                    id: id.to_hex(),
                    parent: c.parent.map(|p| p.to_hex()).unwrap_or_default(),
                    base: c.base.map(|b| b.to_hex()).unwrap_or_default(),
                    root: c.root.as_bytes().to_vec(),
                    seq: c.seq,
                    time_unix_ms: c.time_ms,
                    change_count: c.change_count,
                    message: c.message,
                    author: c.author,
                })
                .collect(),
        }))
    }
}

fn signed((id, p): (chunkstore::ChunkId, chunkstore::Presigned)) -> pb::SignedUrl {
    pb::SignedUrl {
        id: id.as_bytes().to_vec(),
        url: p.url,
        method: p.method.to_owned(),
        expires_unix_ms: p.expires_unix_ms,
        headers: p.headers.into_iter().collect(),
        piece_cvs: Vec::new(),
    }
}
