//! API keys: the store of keys (hashed), the first keys of a new data directory, the
//! in-process authenticator, and the `sail.tenancy.v1.KeyService` gRPC service.
//!
//! A key record holds the org, the role, a label, the creation time and the BLAKE3-derived
//! hash of the secret (see `tenancy`'s key format); the secret itself is shown once, in the
//! `CreateKey` answer, and never stored. Revoking deletes the record (synced) and drops it
//! from the authenticator's cache in the same call, so a revoked key fails its next call.
//!
//! Bootstrap ([`Keys::bootstrap`]): a data directory gets two keys the first time it is
//! opened, kept in `<data_dir>/keys/` (mode 0600) so every later start finds them: `admin.key`
//! (org `default`, role admin: what `sail up` gives the local CLI and SDK) and `operator.key`
//! (role operator: what vmm-host uses to call volumed for its sailboxes). A key file whose key
//! the store does not know (a revoked bootstrap key, a copied directory) is replaced.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use proto::tenancy as pb;
use serde::{Deserialize, Serialize};
use tenancy::server::{AuthError, Authenticator, BoxFuture};
use tenancy::{ApiKey, Identity, Role};
use tonic::{Request, Response, Status};

use crate::error::{Result, VolumeError};
use crate::meta::MetaStore;

/// The org `sail up`'s first admin key belongs to.
pub const DEFAULT_ORG: &str = "default";
/// Longest key label.
pub const MAX_KEY_NAME: usize = 64;
/// Keys one org may hold at once.
pub const MAX_KEYS_PER_ORG: usize = 1000;
/// Identities the authenticator keeps in memory (then it starts over).
const CACHE_MAX: usize = 4096;

/// A stored key (never the secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's id.
    pub id: String,
    /// Its org.
    pub org: String,
    /// "member", "admin" or "operator".
    pub role: String,
    /// Label.
    pub name: String,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// Hex of the secret's hash.
    pub hash: String,
}

impl KeyRecord {
    fn role(&self) -> Option<Role> {
        self.role.parse().ok()
    }

    fn to_proto(&self) -> pb::KeyInfo {
        pb::KeyInfo {
            id: self.id.clone(),
            org: self.org.clone(),
            role: self.role().map(|r| r.to_proto() as i32).unwrap_or_default(),
            name: self.name.clone(),
            created_unix_ms: self.created_unix_ms,
        }
    }
}

/// The two keys a data directory starts with.
#[derive(Clone, Debug)]
pub struct BootstrapKeys {
    /// Org `default`, role admin.
    pub admin: ApiKey,
    /// Role operator (vmm-host's calls).
    pub operator: ApiKey,
}

/// The key store and authenticator. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    store: MetaStore,
    cache: Arc<Mutex<HashMap<String, (tenancy::KeyHash, Identity)>>>,
    /// Serialises creation (the per-org count) and revocation.
    write: Arc<Mutex<()>>,
}

fn check_org(org: &str) -> Result<()> {
    proto::volume::check_volume_name("org", org).map_err(VolumeError::invalid)
}

impl Keys {
    /// Keys kept in `store`.
    pub fn new(store: MetaStore) -> Self {
        Self { store, cache: Arc::default(), write: Arc::default() }
    }

    fn record(&self, id: &str) -> Result<Option<KeyRecord>> {
        let Some(raw) = self.store.key(id)? else { return Ok(None) };
        serde_json::from_slice(&raw).map(Some).map_err(|e| VolumeError::Integrity(format!("API key record {id}: {e}")))
    }

    /// Every key of `org`, oldest first.
    pub fn list(&self, org: &str) -> Result<Vec<KeyRecord>> {
        let mut out = Vec::new();
        for raw in self.store.keys()? {
            let rec: KeyRecord =
                serde_json::from_slice(&raw).map_err(|e| VolumeError::Integrity(format!("API key record: {e}")))?;
            if rec.org == org {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    /// A new key of `org` with `role`; the returned key is the only copy of its secret.
    pub fn create(&self, org: &str, role: Role, name: &str) -> Result<(KeyRecord, ApiKey)> {
        check_org(org)?;
        if name.len() > MAX_KEY_NAME || name.chars().any(char::is_control) {
            return Err(VolumeError::invalid(format!("a key name is at most {MAX_KEY_NAME} bytes without control characters")));
        }
        let _write = self.write.lock();
        if self.list(org)?.len() >= MAX_KEYS_PER_ORG {
            return Err(VolumeError::invalid(format!("org {org} already has {MAX_KEYS_PER_ORG} keys: revoke some first")));
        }
        let key = ApiKey::generate();
        let rec = KeyRecord {
            id: key.id().to_owned(),
            org: org.to_owned(),
            role: role.as_str().to_owned(),
            name: name.to_owned(),
            created_unix_ms: sysutil::clock::now_ms(),
            hash: key.hash().to_hex().to_string(),
        };
        let raw = serde_json::to_vec(&rec).map_err(|e| VolumeError::Integrity(format!("encoding a key record: {e}")))?;
        self.store.put_key(&rec.id, &raw)?;
        Ok((rec, key))
    }

    /// Revokes key `id` of `org` (another org's key is "not found"); returns its record.
    pub fn revoke(&self, org: &str, id: &str) -> Result<Option<KeyRecord>> {
        if !tenancy::valid_id(id) {
            return Err(VolumeError::invalid(format!("{id:?} is not a key id (16 hex digits)")));
        }
        let _write = self.write.lock();
        let Some(rec) = self.record(id)?.filter(|r| r.org == org) else { return Ok(None) };
        self.store.delete_key(id)?;
        self.cache.lock().remove(id);
        Ok(Some(rec))
    }

    /// Who `key` is, if it is a stored key with the right secret.
    pub fn check(&self, key: &ApiKey) -> Result<Option<Identity>> {
        let hash = key.hash();
        if let Some((h, identity)) = self.cache.lock().get(key.id()) {
            // blake3::Hash compares in constant time.
            return Ok((*h == hash).then(|| identity.clone()));
        }
        let Some(rec) = self.record(key.id())? else { return Ok(None) };
        let stored = blake3::Hash::from_hex(&rec.hash).map_err(|e| VolumeError::Integrity(format!("API key {}: {e}", rec.id)))?;
        let Some(role) = rec.role() else {
            return Err(VolumeError::Integrity(format!("API key {} has an unknown role {:?}", rec.id, rec.role)));
        };
        let identity = Identity { org: rec.org, role, key_id: rec.id };
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(identity.key_id.clone(), (stored, identity.clone()));
        Ok((stored == hash).then_some(identity))
    }

    /// The data directory's first keys (created on first use; see the module docs).
    pub fn bootstrap(&self, data_dir: &Path) -> Result<BootstrapKeys> {
        let dir = data_dir.join("keys");
        let one = |file: &str, role: Role, name: &str| -> Result<ApiKey> {
            let path = dir.join(file);
            let read = tenancy::credentials::read_key_file(&path).ok().flatten();
            if let Some(k) = read
                && self.check(&k)?.is_some_and(|i| i.role == role)
            {
                return Ok(k);
            }
            let (_, key) = self.create(DEFAULT_ORG, role, name)?;
            tenancy::credentials::write_key_file(&path, &key)
                .map_err(|e| VolumeError::io(format!("writing {}", path.display()), e))?;
            Ok(key)
        };
        Ok(BootstrapKeys {
            admin: one("admin.key", Role::Admin, "sail up: first admin key")?,
            operator: one("operator.key", Role::Operator, "sail up: vmm-host")?,
        })
    }
}

impl Authenticator for Keys {
    fn authenticate<'a>(&'a self, key: &'a ApiKey) -> BoxFuture<'a, std::result::Result<Identity, AuthError>> {
        // A point lookup (cached after the first call of a key): cheap enough to run inline.
        let answer = match self.check(key) {
            Ok(Some(identity)) => Ok(identity),
            Ok(None) => Err(AuthError::UnknownKey(key.id().to_owned())),
            Err(e) => Err(AuthError::Unavailable(e.to_string())),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// The gRPC face of [`Keys`].
#[derive(Clone)]
pub struct GrpcKeys {
    keys: Keys,
}

impl GrpcKeys {
    /// Wraps the store.
    pub fn new(keys: Keys) -> Self {
        Self { keys }
    }

    /// The tonic server.
    pub fn into_server(self) -> pb::key_service_server::KeyServiceServer<Self> {
        pb::key_service_server::KeyServiceServer::new(self).max_decoding_message_size(64 << 10)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> std::result::Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?.map_err(crate::service::to_status)
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for GrpcKeys {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> std::result::Result<Response<pb::CreateKeyResponse>, Status> {
        let who = Identity::of(&req)?;
        who.require_admin()?;
        let req = req.into_inner();
        let org = who.scope(&req.org)?;
        let role = Role::from_proto(req.role).ok_or_else(|| Status::invalid_argument(format!("unknown role {}", req.role)))?;
        if role == Role::Operator && who.role != Role::Operator {
            return Err(tenancy::permission_denied("only an operator key creates operator keys"));
        }
        let keys = self.keys.clone();
        let (rec, key) = blocking(move || keys.create(&org, role, &req.name)).await?;
        tracing::info!(key = %rec.id, org = %rec.org, role = %rec.role, by = %who.key_id, "API key created");
        Ok(Response::new(pb::CreateKeyResponse { key: Some(rec.to_proto()), secret: key.to_string() }))
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> std::result::Result<Response<pb::ListKeysResponse>, Status> {
        let who = Identity::of(&req)?;
        who.require_admin()?;
        let org = who.scope(&req.into_inner().org)?;
        let keys = self.keys.clone();
        let recs = blocking(move || keys.list(&org)).await?;
        Ok(Response::new(pb::ListKeysResponse { keys: recs.iter().map(KeyRecord::to_proto).collect() }))
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> std::result::Result<Response<pb::RevokeKeyResponse>, Status> {
        let who = Identity::of(&req)?;
        who.require_admin()?;
        let req = req.into_inner();
        let org = who.scope(&req.org)?;
        let keys = self.keys.clone();
        let id = req.id.clone();
        match blocking(move || keys.revoke(&org, &id)).await? {
            Some(rec) => {
                tracing::info!(key = %rec.id, org = %rec.org, by = %who.key_id, "API key revoked");
                Ok(Response::new(pb::RevokeKeyResponse { key: Some(rec.to_proto()) }))
            }
            None => Err(proto::ErrorDetail::to_status(tonic::Code::NotFound, "SailError", format!("no API key {}", req.id))),
        }
    }

    async fn who_am_i(&self, req: Request<pb::WhoAmIRequest>) -> std::result::Result<Response<pb::WhoAmIResponse>, Status> {
        let who = Identity::of(&req)?;
        let keys = self.keys.clone();
        let id = who.key_id.clone();
        let rec = blocking(move || keys.record(&id)).await?;
        let mut info = rec.map(|r| r.to_proto()).unwrap_or_default();
        // What the layer resolved is the answer, whatever the record's label.
        info.id = who.key_id;
        info.org = who.org;
        info.role = who.role.to_proto() as i32;
        Ok(Response::new(pb::WhoAmIResponse { key: Some(info) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_checked_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(MetaStore::open(dir.path().join("meta")).unwrap());
        let (rec, key) = keys.create("acme", Role::Member, "ci").unwrap();
        assert!(!serde_json::to_string(&rec).unwrap().contains(&key.to_string()[22..]), "the secret is not stored");
        let who = keys.check(&key).unwrap().unwrap();
        assert_eq!((who.org.as_str(), who.role), ("acme", Role::Member));
        let forged: ApiKey = format!("sail_{}_{}", key.id(), "0".repeat(64)).parse().unwrap();
        assert_eq!(keys.check(&forged).unwrap(), None, "right id, wrong secret (also once cached)");
        assert_eq!(keys.list("acme").unwrap(), vec![rec.clone()]);
        assert!(keys.list("globex").unwrap().is_empty());
        assert_eq!(keys.revoke("globex", key.id()).unwrap(), None, "another org's key is not found");
        assert!(keys.check(&key).unwrap().is_some());
        assert_eq!(keys.revoke("acme", key.id()).unwrap(), Some(rec));
        assert_eq!(keys.check(&key).unwrap(), None, "revoked at once");
        assert!(keys.create("../x", Role::Member, "").is_err());
        assert!(keys.create("acme", Role::Member, &"n".repeat(65)).is_err());
        assert!(keys.revoke("acme", "nothex").is_err());
    }

    #[test]
    fn bootstrap_keys_survive_restarts_and_are_replaced_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path().join("meta")).unwrap();
        let keys = Keys::new(store.clone());
        let first = keys.bootstrap(dir.path()).unwrap();
        let again = Keys::new(store).bootstrap(dir.path()).unwrap();
        assert_eq!((first.admin.id(), first.operator.id()), (again.admin.id(), again.operator.id()));
        assert_eq!(keys.check(&first.operator).unwrap().unwrap().role, Role::Operator);
        keys.revoke(DEFAULT_ORG, first.admin.id()).unwrap();
        let third = keys.bootstrap(dir.path()).unwrap();
        assert_ne!(third.admin.id(), first.admin.id());
        assert_eq!(keys.check(&third.admin).unwrap().unwrap().role, Role::Admin);
    }
}
