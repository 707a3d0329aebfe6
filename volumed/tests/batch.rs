//! Batch uploads: many small chunks through one signed URL. A commit of many small files goes
//! through batches; tampered batches (wrong bytes, truncated, over-long, reordered or foreign
//! frames, forged or expired URLs) are rejected with nothing stored; large chunks keep a URL
//! of their own.

mod common;

use std::sync::atomic::Ordering;

use chunkstore::ChunkId;
use common::{bytes_for, client, file, start};
use proto::volume as pb;
use volume_client::VolumeClient;
use volume_model::batch::{BATCH_CHUNK_MAX, BATCH_MAX_CHUNKS, frame_header};
use volumed::server::RunningServer;

const ORG: &str = "acme";

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: ORG.into(), name: name.into() })
}

fn spec(data: &[u8]) -> pb::ChunkSpec {
    pb::ChunkSpec { id: ChunkId::of(data).as_bytes().to_vec(), len: data.len() as u64, piece_cvs: vec![] }
}

async fn ask(c: &mut VolumeClient, vol: &str, chunks: &[Vec<u8>]) -> pb::MissingChunksResponse {
    let req =
        pb::MissingChunksRequest { volume: vref(vol), chunks: chunks.iter().map(|d| spec(d)).collect(), accept_batches: true };
    c.grpc().missing_chunks(req).await.unwrap().into_inner()
}

/// A batch body for `chunks` in this order.
fn body(chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&frame_header(&ChunkId::of(c), c.len() as u32));
        out.extend_from_slice(c);
    }
    out
}

/// Chunk files in the local backend (temp files excluded).
fn stored_chunks(dir: &std::path::Path) -> usize {
    let Ok(shards) = std::fs::read_dir(dir.join("chunks/chunks")) else {
        return 0;
    };
    shards.map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count()).sum()
}

/// Temp entries of the chunk store, other than the open store's owner file (chunkstore's
/// staging: it marks the live opener's temp files).
fn temp_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("chunks/tmp"))
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".owner"))
        .count()
}

fn batch_stats(s: &RunningServer) -> (u64, u64, u64, u64) {
    let st = &s.data_stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    (load(&st.chunk_uploads), load(&st.batch_uploads), load(&st.batch_chunks), load(&st.rejected_uploads))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_many_small_files_uploads_them_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let vol = c.get_volume(ORG, "src", true).await.unwrap();
    let n = BATCH_MAX_CHUNKS + 500; // more than one batch
    let files: Vec<_> =
        (0..n).map(|i| file(&format!("d{}/f{i}.rs", i % 37), bytes_for(i as u64, 50 + (i * 13) % 9000))).collect();
    // One large file: its 8 MiB chunk gets a URL of its own, its 10-byte tail is batched.
    let big = bytes_for(99_999, (8 << 20) + 10);
    let mut all = files.clone();
    all.push(file("big.bin", big.clone()));
    let r = c.commit_files(ORG, "src", &vol.head, all, &[]).await.unwrap();
    let up = c.last_upload;
    assert_eq!(up.chunks_uploaded, n + 2);
    assert_eq!(up.chunks_batched, n + 1, "every small chunk went through a batch");
    assert!(up.batches >= 2, "{} batches", up.batches);
    assert_eq!(batch_stats(&server), (1, up.batches as u64, n as u64 + 1, 0));
    assert_eq!(stored_chunks(dir.path()), n + 2);
    assert_eq!(temp_files(dir.path()), 0);
    for i in [0, 1, 777, n - 1] {
        assert_eq!(
            c.read_file(ORG, "src", &format!("d{}/f{i}.rs", i % 37)).await.unwrap(),
            bytes_for(i as u64, 50 + (i * 13) % 9000)
        );
    }
    assert_eq!(c.read_file(ORG, "src", "big.bin").await.unwrap(), big);

    // The same files again, in another volume: nothing is uploaded.
    let other = c.get_volume(ORG, "copy", true).await.unwrap();
    c.commit_files(ORG, "copy", &other.head, files, &[]).await.unwrap();
    assert_eq!((c.last_upload.chunks_uploaded, c.last_upload.batches), (0, 0));
    assert!(!r.commit.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_chunks_batches_small_chunks_only_and_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    c.get_volume(ORG, "v", true).await.unwrap();
    let small: Vec<Vec<u8>> = (0..5).map(|i| bytes_for(i, 1000 + i as usize)).collect();
    let edge = bytes_for(50, BATCH_CHUNK_MAX as usize);
    let large = bytes_for(51, BATCH_CHUNK_MAX as usize + 1);
    let mut chunks = small.clone();
    chunks.extend([edge.clone(), large.clone(), small[0].clone()]); // a duplicate too
    let resp = ask(&mut c, "v", &chunks).await;
    assert_eq!(resp.uploads.len(), 1);
    assert_eq!(resp.uploads[0].id, spec(&large).id);
    assert_eq!(resp.batches.len(), 1);
    let b = &resp.batches[0];
    assert_eq!(b.ids.len(), 6, "five small chunks and the 1 MiB one, the duplicate once");
    assert_eq!(b.method, "PUT");
    // Without accept_batches: one URL per chunk, as before.
    let req =
        pb::MissingChunksRequest { volume: vref("v"), chunks: chunks.iter().map(|d| spec(d)).collect(), accept_batches: false };
    let plain = c.grpc().missing_chunks(req).await.unwrap().into_inner();
    assert_eq!((plain.uploads.len(), plain.batches.len()), (7, 0));
    drop(server);
}

/// PUTs `body` to `url`; returns the status and the answer's text.
async fn put(http: &reqwest::Client, url: String, body: Vec<u8>) -> (u16, String) {
    let resp = http.put(url).body(body).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Bodies that do not match the signed list are refused: wrong bytes, truncated, over-long,
/// reordered, foreign and zero-length frames (7 rejections).
async fn refuse_tampered_bodies(http: &reqwest::Client, b: &pb::BatchUpload, ordered: &[&[u8]], good: &[u8]) {
    // Wrong bytes for an id (same length): 422.
    let mut wrong = good.to_vec();
    let last = wrong.len() - 1;
    wrong[last] ^= 1;
    assert_eq!(put(http, b.url.clone(), wrong).await.0, 422);
    // Truncated inside a frame, and cut at a frame boundary: 400.
    assert_eq!(put(http, b.url.clone(), good[..good.len() - 10].to_vec()).await.0, 400);
    let first_frame = 36 + ordered[0].len();
    assert_eq!(put(http, b.url.clone(), good[..first_frame].to_vec()).await.0, 400);
    // Longer than signed: 400.
    let mut long = good.to_vec();
    long.extend_from_slice(&frame_header(&ChunkId::of(b"x"), 1));
    long.push(b'x');
    assert_eq!(put(http, b.url.clone(), long).await.0, 400);
    // Same bytes, other order: the list is not the signed one, 403.
    let mut swapped = ordered.to_vec();
    swapped.swap(0, 1);
    assert_eq!(put(http, b.url.clone(), body(&swapped)).await.0, 403);
    // A valid chunk that is not in the list, in place of one that is (same length): 403.
    let foreign = bytes_for(77, ordered[3].len());
    let mut replaced = ordered.to_vec();
    replaced[3] = &foreign;
    assert_eq!(put(http, b.url.clone(), body(&replaced)).await.0, 403);
    // A frame with a zero length: 400.
    let mut zero = body(&ordered[..3]);
    zero.extend_from_slice(&frame_header(&ChunkId::of(ordered[3]), 0));
    zero.resize(good.len(), 0);
    assert_eq!(put(http, b.url.clone(), zero).await.0, 400);
}

/// URLs changed after signing are refused: signature, digest, count, expiry, and a batch URL
/// used as a chunk URL (5 rejections).
async fn refuse_tampered_urls(http: &reqwest::Client, b: &pb::BatchUpload, good: &[u8]) {
    // Forged signature, changed digest, count or length, extended expiry: 403.
    assert_eq!(put(http, b.url.replace("sig=", "sig=00"), good.to_vec()).await.0, 403);
    let digest = b.url.split("/v1/batches/").nth(1).unwrap().split('?').next().unwrap().to_owned();
    assert_eq!(put(http, b.url.replace(&digest, &"ab".repeat(32)), good.to_vec()).await.0, 403);
    assert_eq!(put(http, b.url.replace("&n=4&", "&n=3&"), good.to_vec()).await.0, 403);
    let exp: u64 = b.url.split("exp=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
    let extended = b.url.replace(&format!("exp={exp}"), &format!("exp={}", exp + 3_600_000));
    assert_eq!(put(http, extended, good.to_vec()).await.0, 403);
    // A batch URL is not a chunk URL.
    let as_chunk = b.url.replace("/v1/batches/", "/v1/chunks/");
    assert_eq!(put(http, as_chunk, good.to_vec()).await.0, 403);
}

/// A commit of one file per chunk (`f0`, `f1`, ...) onto `base`.
fn commit_of(vol: &str, base: &str, chunks: &[Vec<u8>]) -> pb::CommitRequest {
    let entries: Vec<pb::Change> = chunks
        .iter()
        .enumerate()
        .map(|(i, d)| pb::Change {
            path: format!("f{i}"),
            op: Some(pb::change::Op::Upsert(pb::Entry {
                mode: 0o644,
                mtime_ns: 0,
                kind: Some(pb::entry::Kind::File(pb::FileEntry {
                    size: d.len() as u64,
                    policy: Some(pb::ChunkPolicy { kind: Some(pb::chunk_policy::Kind::FixedSize(8 << 20)) }),
                    chunks: vec![pb::ChunkRef { id: ChunkId::of(d).as_bytes().to_vec(), len: d.len() as u32 }],
                })),
            })),
        })
        .collect();
    pb::CommitRequest {
        volume: vref(vol),
        base: base.to_owned(),
        changes: entries,
        message: String::new(),
        author: String::new(),
    }
}

/// An expired batch URL is refused: a server with a zero TTL hands out URLs dead on arrival.
async fn refuse_expired_url(http: &reqwest::Client, chunks: &[Vec<u8>], ordered: &[&[u8]]) {
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = volumed::server::ServerConfig::local(dir2.path(), "127.0.0.1:0".parse().unwrap());
    cfg.url_ttl = std::time::Duration::ZERO;
    let short = volumed::server::Server::bind(cfg).await.unwrap().spawn();
    let mut c2 = VolumeClient::connect_with_key(&short.endpoint(), Some(short.operator_key())).await.unwrap();
    c2.get_volume(ORG, "t", true).await.unwrap();
    let dead = ask(&mut c2, "t", chunks).await.batches.remove(0);
    while sysutil::clock::now_ms() <= dead.expires_unix_ms {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let (status, text) = put(http, dead.url, body(ordered)).await;
    assert_eq!(status, 403);
    assert!(text.contains("expired"), "{text}");
    assert_eq!(stored_chunks(dir2.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_batches_are_rejected_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let vol = c.get_volume(ORG, "t", true).await.unwrap();
    let http = reqwest::Client::new();
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| bytes_for(10 + i, 3000 + 7 * i as usize)).collect();
    let resp = ask(&mut c, "t", &chunks).await;
    assert_eq!(resp.batches.len(), 1);
    let b = resp.batches[0].clone();
    // Frames in the server's order.
    let ordered: Vec<&[u8]> =
        b.ids.iter().map(|id| chunks.iter().find(|d| ChunkId::of(d).as_bytes() == id.as_slice()).unwrap().as_slice()).collect();
    let good = body(&ordered);
    assert_eq!(good.len() as u64, b.body_len);

    refuse_tampered_bodies(&http, &b, &ordered, &good).await;
    refuse_tampered_urls(&http, &b, &good).await;

    // Nothing of all that was stored, and every chunk is still missing.
    assert_eq!(stored_chunks(dir.path()), 0);
    assert_eq!(temp_files(dir.path()), 0);
    let again = ask(&mut c, "t", &chunks).await;
    assert_eq!(again.batches[0].ids.len(), 4);
    let commit = commit_of("t", &vol.head, &chunks);
    let err = c.grpc().commit(commit.clone()).await.unwrap_err();
    assert_eq!(volume_client::error_name(&err).as_deref(), Some("VolumeMissingChunksError"));
    let (_, _, _, rejected) = batch_stats(&server);
    assert_eq!(rejected, 12);

    // The genuine body is stored (201), once; then the commit goes through.
    let (status, text) = put(&http, b.url.clone(), good.clone()).await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(stored_chunks(dir.path()), 4);
    assert!(ask(&mut c, "t", &chunks).await.batches.is_empty());
    c.grpc().commit(commit).await.unwrap();
    assert_eq!(c.read_file(ORG, "t", "f2").await.unwrap(), chunks[2]);
    // Replaying the URL stores nothing new.
    let (status, text) = put(&http, b.url.clone(), good).await;
    assert_eq!(status, 201);
    assert!(text.contains("stored 0 chunks (4 already present)"), "{text}");

    refuse_expired_url(&http, &chunks, &ordered).await;
}
