//! Tenancy over the wire (issue 19, items 1 and 2): every call carries a key; a key acts only
//! in its org; another org's volume answers exactly like one that does not exist; keys are
//! created, listed and revoked by admins of their own org.
//!
//! Table-driven: one row per RPC of `sail.volume.v1`, made with org B's key on org A's
//! volume, compared with org A's own call on a volume name that does not exist.

use proto::tenancy as tpb;
use proto::tenancy::key_service_client::KeyServiceClient;
use proto::volume as pb;
use proto::volume::volume_service_client::VolumeServiceClient;
use tenancy::ApiKey;
use tenancy::client::{AuthedChannel, authed};
use volume_client::{FileUpload, VolumeClient};

type Volumes = VolumeServiceClient<AuthedChannel>;
type Keys = KeyServiceClient<AuthedChannel>;

async fn channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap()
}

async fn clients(endpoint: &str, key: Option<&ApiKey>) -> (Volumes, Keys) {
    let ch = channel(endpoint).await;
    (VolumeServiceClient::new(authed(ch.clone(), key)), KeyServiceClient::new(authed(ch, key)))
}

/// A new key of `org` with `role`, made by `by` (over gRPC, as `sail key create` does).
async fn create_key(by: &mut Keys, org: &str, role: tenancy::Role) -> ApiKey {
    let req = tpb::CreateKeyRequest { org: org.into(), role: role.to_proto() as i32, name: format!("{org} test") };
    by.create_key(req).await.unwrap().into_inner().secret.parse().unwrap()
}

type Outcome = Result<(), (tonic::Code, String)>;

fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Outcome {
    r.map(|_| ()).map_err(|s| (s.code(), proto::error_name(&s).unwrap_or_default()))
}

/// Object ids of org A's volume that org B tries to use.
struct Known {
    head: String,
    root: Vec<u8>,
    chunk: Vec<u8>,
}

async fn call(c: &mut Volumes, rpc: &str, volume: &str, k: &Known) -> Outcome {
    let v = || Some(pb::VolumeRef { org: String::new(), name: volume.into() });
    match rpc {
        "GetVolume" => outcome(c.get_volume(pb::GetVolumeRequest { volume: v(), mint_if_missing: false, chunking: 0 }).await),
        "DeleteVolume" => outcome(c.delete_volume(pb::DeleteVolumeRequest { volume: v() }).await),
        "GetHead" => outcome(c.get_head(pb::GetHeadRequest { volume: v() }).await),
        "ListDir" => outcome(c.list_dir(pb::ListDirRequest { volume: v(), commit: String::new(), path: String::new() }).await),
        "ListDirAtCommit" => {
            outcome(c.list_dir(pb::ListDirRequest { volume: v(), commit: k.head.clone(), path: String::new() }).await)
        }
        "GetTree" => outcome(c.get_tree(pb::GetTreeRequest { volume: v(), tree: k.root.clone() }).await),
        "Stat" => outcome(c.stat(pb::StatRequest { volume: v(), commit: String::new(), path: "secret.txt".into() }).await),
        "Diff" => outcome(c.diff(pb::DiffRequest { volume: v(), from: k.head.clone(), to: String::new() }).await),
        "MissingChunks" => {
            let chunks = vec![pb::ChunkSpec { id: k.chunk.clone(), len: 6, piece_cvs: Vec::new() }];
            outcome(c.missing_chunks(pb::MissingChunksRequest { volume: v(), chunks, accept_batches: false }).await)
        }
        "ChunkUrls" => outcome(c.chunk_urls(pb::ChunkUrlsRequest { volume: v(), ids: vec![k.chunk.clone()] }).await),
        "Commit" => {
            let req = pb::CommitRequest {
                volume: v(),
                base: k.head.clone(),
                changes: Vec::new(),
                message: "x".into(),
                author: String::new(),
            };
            outcome(c.commit(req).await)
        }
        "Log" => outcome(c.log(pb::LogRequest { volume: v(), limit: 10, before_seq: 0 }).await),
        other => panic!("no row for {other}"),
    }
}

const ROWS: [&str; 13] = [
    "GetVolume",
    "GetHead",
    "ListDir",
    "ListDirAtCommit",
    "GetTree",
    "Stat",
    "Diff",
    "MissingChunks",
    "ChunkUrls",
    "Commit",
    "Log",
    "DeleteVolume",
    "GetVolume",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_orgs_volumes_behave_as_if_they_did_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let server = volumed::server::Server::bind(volumed::server::ServerConfig::local(dir.path(), "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap()
        .spawn();
    let endpoint = server.endpoint();
    // The operator starts two orgs, each with an admin; the second admin makes a member.
    let (_, mut operator) = clients(&endpoint, Some(server.operator_key())).await;
    let key_a = create_key(&mut operator, "acme", tenancy::Role::Admin).await;
    let admin_b = create_key(&mut operator, "globex", tenancy::Role::Admin).await;
    let (_, mut keys_admin_b) = clients(&endpoint, Some(&admin_b)).await;
    let key_b = create_key(&mut keys_admin_b, "", tenancy::Role::Member).await;

    // Org A writes a volume (its client names no org: the key's own).
    let mut a = VolumeClient::connect_with_key(&endpoint, Some(&key_a)).await.unwrap();
    let vol = a.get_volume("", "shared", true).await.unwrap();
    assert_eq!(vol.org, "acme");
    let file = FileUpload::from_bytes("secret.txt", b"secret".to_vec(), 0o644);
    a.commit_files("", "shared", &vol.head, vec![file], &[]).await.unwrap();
    let head = a.head("", "shared").await.unwrap();
    let chunk = chunkstore::ChunkId::of(b"secret").as_bytes().to_vec();
    let known = Known { head: head.commit.clone(), root: head.root.clone(), chunk };

    let (mut va, _) = clients(&endpoint, Some(&key_a)).await;
    let (mut vb, mut kb) = clients(&endpoint, Some(&key_b)).await;
    for rpc in ROWS {
        let by_b = call(&mut vb, rpc, "shared", &known).await;
        let nonexistent = call(&mut va, rpc, "no-such-volume", &known).await;
        assert!(by_b.is_err(), "{rpc}: org B reached org A's volume");
        assert_eq!(by_b, nonexistent, "{rpc}: org B's answer differs from a missing volume's");
    }
    // Naming org A outright is refused, whatever the call (and says nothing about A's volumes).
    let named = |name: &str| Some(pb::VolumeRef { org: "acme".into(), name: name.into() });
    for (name, mint) in [("shared", false), ("no-such", false), ("new", true)] {
        let e =
            vb.get_volume(pb::GetVolumeRequest { volume: named(name), mint_if_missing: mint, chunking: 0 }).await.unwrap_err();
        assert_eq!(
            (e.code(), proto::error_name(&e).as_deref()),
            (tonic::Code::PermissionDenied, Some("SailPermissionDeniedError"))
        );
    }
    let e = vb.list_volumes(pb::ListVolumesRequest { org: "acme".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let listed = vb.list_volumes(pb::ListVolumesRequest { org: String::new() }).await.unwrap().into_inner().volumes;
    assert!(listed.is_empty(), "org B lists nothing of org A's: {listed:?}");
    // B's own volume of the same name is B's, and A's is untouched.
    let mine = vb.get_volume(pb::GetVolumeRequest {
        volume: Some(pb::VolumeRef { org: String::new(), name: "shared".into() }),
        mint_if_missing: true,
        chunking: 0,
    });
    let mine = mine.await.unwrap().into_inner();
    assert_eq!(mine.org, "globex");
    assert_ne!(mine.id, vol.id);
    assert_eq!(a.read_file("", "shared", "secret.txt").await.unwrap(), b"secret");

    // Keys: a member manages none; an admin only its own org's; nobody but an operator makes
    // operator keys; another org's key id is "not found", like a made-up one.
    let e = kb.create_key(tpb::CreateKeyRequest { org: String::new(), role: 0, name: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = kb.list_keys(tpb::ListKeysRequest { org: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let (_, mut ka) = clients(&endpoint, Some(&key_a)).await;
    let op = tpb::CreateKeyRequest { org: String::new(), role: tenancy::Role::Operator.to_proto() as i32, name: String::new() };
    assert_eq!(ka.create_key(op).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let e = ka.create_key(tpb::CreateKeyRequest { org: "globex".into(), role: 0, name: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let listed = ka.list_keys(tpb::ListKeysRequest { org: String::new() }).await.unwrap().into_inner().keys;
    assert_eq!(listed.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), vec![key_a.id()], "only org A's key");
    let theirs = outcome(ka.revoke_key(tpb::RevokeKeyRequest { id: key_b.id().into(), org: String::new() }).await);
    let made_up = outcome(ka.revoke_key(tpb::RevokeKeyRequest { id: "0123456789abcdef".into(), org: String::new() }).await);
    assert_eq!(theirs, made_up);
    assert_eq!(theirs.unwrap_err().0, tonic::Code::NotFound);
    let me = kb.who_am_i(tpb::WhoAmIRequest {}).await.unwrap().into_inner().key.unwrap();
    assert_eq!((me.org.as_str(), me.id.as_str()), ("globex", key_b.id()));

    // No key, a made-up key, a revoked key: nothing is served, on either service.
    let (mut anon_v, mut anon_k) = clients(&endpoint, None).await;
    let (mut fake_v, _) = clients(&endpoint, Some(&ApiKey::generate())).await;
    for e in [
        anon_v.list_volumes(pb::ListVolumesRequest::default()).await.unwrap_err(),
        anon_k.who_am_i(tpb::WhoAmIRequest {}).await.unwrap_err(),
        fake_v.list_volumes(pb::ListVolumesRequest::default()).await.unwrap_err(),
    ] {
        assert_eq!((e.code(), proto::error_name(&e).as_deref()), (tonic::Code::Unauthenticated, Some("SailAuthenticationError")));
    }
    keys_admin_b.revoke_key(tpb::RevokeKeyRequest { id: key_b.id().into(), org: String::new() }).await.unwrap();
    assert_eq!(vb.list_volumes(pb::ListVolumesRequest::default()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_keys_are_kept_in_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = volumed::server::ServerConfig::local(dir.path(), "127.0.0.1:0".parse().unwrap());
    let first = volumed::server::Server::bind(config.clone()).await.unwrap().spawn();
    let admin = first.admin_key().clone();
    first.stop().await.unwrap();
    let on_disk = tenancy::credentials::read_key_file(&dir.path().join("keys/admin.key")).unwrap().unwrap();
    assert_eq!(on_disk, admin);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("keys/admin.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the key file is private");
    // A restart serves the same key (the quickstart's CLI keeps working).
    let again = volumed::server::Server::bind(config).await.unwrap().spawn();
    let mut c = VolumeClient::connect_with_key(&again.endpoint(), Some(&admin)).await.unwrap();
    assert_eq!(c.get_volume("", "v", true).await.unwrap().org, "default");
}

#[tokio::test]
async fn a_listener_beyond_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:0", "[::]:0", "10.1.2.3:0"] {
        let config = volumed::server::ServerConfig::local(dir.path(), addr.parse().unwrap());
        let e = volumed::server::Server::bind(config).await.err().expect("refused");
        assert!(e.to_string().contains("refusing to listen"), "{e}");
    }
    assert!(!dir.path().join("meta").exists(), "nothing is opened before the refusal");
}
