//! Bad input gets a clear, typed error and changes nothing: malformed gRPC requests, raw
//! garbage on the wire, and forged, expired or misused signed URLs.

mod common;

use chunkstore::ChunkId;
use common::{bytes_for, client, file, start};
use proto::volume as pb;
use volume_client::VolumeClient;

const ORG: &str = "acme";

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: ORG.into(), name: name.into() })
}

fn file_entry(size: u64, chunks: Vec<(Vec<u8>, u32)>) -> pb::Entry {
    pb::Entry {
        mode: 0o644,
        mtime_ns: 0,
        kind: Some(pb::entry::Kind::File(pb::FileEntry {
            size,
            policy: Some(pb::ChunkPolicy { kind: Some(pb::chunk_policy::Kind::FixedSize(8 << 20)) }),
            chunks: chunks.into_iter().map(|(id, len)| pb::ChunkRef { id, len }).collect(),
        })),
    }
}

fn upsert(path: &str, e: pb::Entry) -> pb::Change {
    pb::Change { path: path.into(), op: Some(pb::change::Op::Upsert(e)) }
}

async fn expect_err(c: &mut VolumeClient, req: pb::CommitRequest, name: &str) {
    let err = c.grpc().commit(req.clone()).await.expect_err("must be rejected");
    assert_eq!(volume_client::error_name(&err).as_deref(), Some(name), "{req:?}: {err:?}");
    assert!(!err.message().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commits_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let vol = c.get_volume(ORG, "v", true).await.unwrap();
    let data = bytes_for(3, 100);
    let r = c.commit_files(ORG, "v", &vol.head, vec![file("ok", data.clone())], &[]).await.unwrap();
    let good_id = ChunkId::of(&data).as_bytes().to_vec();
    let good = file_entry(100, vec![(good_id.clone(), 100)]);
    let commit = |changes: Vec<pb::Change>| pb::CommitRequest {
        volume: vref("v"),
        base: r.commit.clone(),
        changes,
        message: String::new(),
        author: String::new(),
    };

    let inval = "VolumeInvalidArgumentError";
    for path in ["../escape", "a/../../b", "a\0b", "", "/", &"x/".repeat(300), &"n".repeat(256)] {
        expect_err(&mut c, commit(vec![upsert(path, good.clone())]), inval).await;
    }
    expect_err(&mut c, commit(vec![]), inval).await;
    expect_err(&mut c, commit(vec![upsert("a", good.clone()), upsert("/a/", good.clone())]), inval).await;
    expect_err(&mut c, commit(vec![pb::Change { path: "a".into(), op: None }]), inval).await;
    expect_err(&mut c, commit(vec![pb::Change { path: "a".into(), op: Some(pb::change::Op::Delete(false)) }]), inval).await;
    expect_err(&mut c, commit(vec![upsert("a", pb::Entry { mode: 0o644, mtime_ns: 0, kind: None })]), inval).await;
    expect_err(&mut c, commit(vec![upsert("a", pb::Entry { mode: 0o1_0000, ..good.clone() })]), inval).await;
    // Chunk lengths that do not add up to the size, a short id, a zero-length chunk.
    expect_err(&mut c, commit(vec![upsert("a", file_entry(101, vec![(good_id.clone(), 100)]))]), inval).await;
    expect_err(&mut c, commit(vec![upsert("a", file_entry(100, vec![(vec![1, 2, 3], 100)]))]), inval).await;
    expect_err(&mut c, commit(vec![upsert("a", file_entry(0, vec![(good_id.clone(), 0)]))]), inval).await;
    // A fixed-size file whose non-final chunk is short.
    expect_err(&mut c, commit(vec![upsert("a", file_entry(200, vec![(good_id.clone(), 100), (good_id.clone(), 100)]))]), inval)
        .await;
    // Symlink without a target.
    let bad_link =
        pb::Entry { mode: 0o777, mtime_ns: 0, kind: Some(pb::entry::Kind::Symlink(pb::SymlinkEntry { target: String::new() })) };
    expect_err(&mut c, commit(vec![upsert("l", bad_link)]), inval).await;
    // A message or an author over its limit.
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.message = "m".repeat(volume_model::commit::MAX_MESSAGE_BYTES + 1);
    expect_err(&mut c, req, inval).await;
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.author = "a".repeat(volume_model::commit::MAX_AUTHOR_BYTES + 1);
    expect_err(&mut c, req, inval).await;
    // Bad names and unknown or malformed base commits.
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.volume = Some(pb::VolumeRef { org: "../x".into(), name: "v".into() });
    expect_err(&mut c, req, inval).await;
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.base = "zz".into();
    expect_err(&mut c, req, inval).await;
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.base = "00".repeat(32);
    expect_err(&mut c, req, "VolumeCommitNotFoundError").await;
    // A chunk the store does not have.
    let missing = ChunkId::of(b"never uploaded").as_bytes().to_vec();
    expect_err(&mut c, commit(vec![upsert("a", file_entry(14, vec![(missing, 14)]))]), "VolumeMissingChunksError").await;
    // Unknown volume.
    let mut req = commit(vec![upsert("a", good.clone())]);
    req.volume = vref("absent");
    expect_err(&mut c, req, "VolumeNotFoundError").await;

    let head = c.head(ORG, "v").await.unwrap();
    assert_eq!(head.commit, r.commit, "no rejected request moved the head");
    assert_eq!(c.read_file(ORG, "v", "ok").await.unwrap(), data);

    other_rpcs_validate(&mut c).await;
}

/// ListDir, GetTree, MissingChunks and ChunkUrls reject malformed paths, ids and lengths.
async fn other_rpcs_validate(c: &mut VolumeClient) {
    let err = c
        .grpc()
        .list_dir(pb::ListDirRequest { volume: vref("v"), commit: String::new(), path: "../..".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c.grpc().get_tree(pb::GetTreeRequest { volume: vref("v"), tree: vec![0; 5] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c
        .grpc()
        .missing_chunks(pb::MissingChunksRequest {
            volume: vref("v"),
            chunks: vec![pb::ChunkSpec { id: vec![1; 32], len: 1 << 40, piece_cvs: vec![] }],
            accept_batches: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = c.grpc().chunk_urls(pb::ChunkUrlsRequest { volume: vref("v"), ids: vec![vec![0; 31]] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_gets_an_error_and_the_server_survives() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for payload in [vec![0xffu8; 64], vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], vec![]] {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(&payload);
        let resp = http
            .post(format!("{}/sail.volume.v1.VolumeService/Commit", server.endpoint()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(framed)
            .send()
            .await
            .unwrap();
        let status = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        assert!(matches!(status.as_deref(), Some(s) if s != "0"), "garbage accepted: {status:?}");
    }
    // Still serving.
    let mut c = client(&server).await;
    c.get_volume(ORG, "alive", true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misused_urls_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    c.get_volume(ORG, "u", true).await.unwrap();
    let http = reqwest::Client::new();
    let data = bytes_for(9, 4096);
    let id = ChunkId::of(&data);
    let other = bytes_for(10, 4096);
    let ask = |c: &mut VolumeClient, id: ChunkId, len: u64| {
        let req = pb::MissingChunksRequest {
            volume: vref("u"),
            chunks: vec![pb::ChunkSpec { id: id.as_bytes().to_vec(), len, piece_cvs: vec![] }],
            accept_batches: false,
        };
        let mut g = c.grpc().clone();
        async move { g.missing_chunks(req).await.unwrap().into_inner().uploads }
    };
    let url = ask(&mut c, id, 4096).await.remove(0).url;

    let status = |r: reqwest::Response| r.status().as_u16();
    // Forged signature, extended expiry, another chunk's id, wrong verb.
    let forged = url.replace("sig=", "sig=00");
    assert_eq!(status(http.put(&forged).body(data.clone()).send().await.unwrap()), 403);
    let exp: u64 = url.split("exp=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
    let extended = url.replace(&format!("exp={exp}"), &format!("exp={}", exp + 3_600_000));
    assert_eq!(status(http.put(&extended).body(data.clone()).send().await.unwrap()), 403);
    let other_id = ChunkId::of(&other);
    let swapped = url.replace(&id.to_hex(), &other_id.to_hex());
    assert_eq!(status(http.put(&swapped).body(other.clone()).send().await.unwrap()), 403);
    assert_eq!(status(http.get(&url).send().await.unwrap()), 403, "a PUT URL does not allow GET");
    // Right URL, wrong bytes (same length): hash mismatch, nothing stored.
    assert_eq!(status(http.put(&url).body(other.clone()).send().await.unwrap()), 422);
    // Right URL, wrong length.
    assert_eq!(status(http.put(&url).body(data[..100].to_vec()).send().await.unwrap()), 400);
    assert_eq!(ask(&mut c, id, 4096).await.len(), 1, "still missing after rejected uploads");

    // An expired URL: a server with a zero TTL hands out URLs that are dead on arrival.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = volumed::server::ServerConfig::local(dir2.path(), "127.0.0.1:0".parse().unwrap());
    cfg.url_ttl = std::time::Duration::ZERO;
    let short = volumed::server::Server::bind(cfg).await.unwrap().spawn();
    let mut c2 = VolumeClient::connect_with_key(&short.endpoint(), Some(short.operator_key())).await.unwrap();
    c2.get_volume(ORG, "u", true).await.unwrap();
    let req = pb::MissingChunksRequest {
        volume: vref("u"),
        chunks: vec![pb::ChunkSpec { id: id.as_bytes().to_vec(), len: 4096, piece_cvs: vec![] }],
        accept_batches: false,
    };
    let dead = c2.grpc().missing_chunks(req).await.unwrap().into_inner().uploads.remove(0).url;
    // Expiry has millisecond resolution: let the clock pass it (a millisecond or two).
    let exp: u64 = dead.split("exp=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
    while sysutil::clock::now_ms() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let resp = http.put(&dead).body(data.clone()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(resp.text().await.unwrap().contains("expired"));

    // The genuine upload works, and then the chunk downloads and verifies.
    assert!(http.put(&url).body(data.clone()).send().await.unwrap().status().is_success());
    assert!(ask(&mut c, id, 4096).await.is_empty());
    assert_eq!(c.download_chunks(ORG, "u", &[id]).await.unwrap()[0].as_ref(), &data[..]);
}
