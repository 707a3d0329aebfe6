//! The volume gateway without a VM: a real volumed, the gateway on its Unix socket, and a
//! TCP relay in front of it standing in for QEMU's guestfwd (what a guest's helper talks to).
//! A client through the relay is what a guest can do; a client on volumed directly is the
//! host's (or another tenant's) view.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use chunkstore::ChunkId;
use proto::volume as pb;
use vmm_host::gateway::{Gateway, Scope, socket_path};
use volume_client::{ClientError, FileUpload, VolumeClient};

const ORG: &str = "default";

/// Accepts TCP connections and splices each to the Unix socket (what `socat` does for QEMU).
async fn relay(socket: std::path::PathBuf) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    (format!("http://{addr}"), task)
}

struct Setup {
    volumed: volumed::server::RunningServer,
    gateway: Arc<Gateway>,
    /// A sailbox that mounts volume "a" (and, for the second sailbox, also "a").
    guest: VolumeClient,
    guest_endpoint: String,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

fn scope(id: &str, volumes: &[&str]) -> Scope {
    Scope { sailbox: id.into(), org: ORG.into(), volumes: volumes.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>() }
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

/// [`setup`], with `before_bind` applied to the gateway before the sailbox's listener is bound.
async fn setup_with(before_bind: impl FnOnce(&Gateway)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = volumed::server::ServerConfig::local(dir.path().join("volumed"), "127.0.0.1:0".parse().unwrap());
    let volumed = volumed::server::Server::bind(config).await.unwrap().spawn();
    let run = dir.path().join("run/sb-1");
    std::fs::create_dir_all(&run).unwrap();
    let (guest_endpoint, relay_task) = relay(socket_path(&run)).await;
    let gateway = Gateway::open(
        volumed.endpoint(),
        Some(volumed.operator_key().clone()),
        guest_endpoint.clone(),
        &dir.path().join("cache"),
        1 << 30,
        64 << 20,
        &dir.path().join("gateway.key"),
    )
    .unwrap();
    before_bind(&gateway);
    let serve = gateway.bind(&socket_path(&run), scope("sb-1", &["a"])).unwrap();
    let mut host = VolumeClient::connect_with_key(&volumed.endpoint(), Some(volumed.operator_key())).await.unwrap();
    host.get_volume(ORG, "a", true).await.unwrap();
    host.get_volume(ORG, "b", true).await.unwrap();
    let guest = VolumeClient::connect(&guest_endpoint).await.unwrap();
    Setup { volumed, gateway, guest, guest_endpoint, _tasks: vec![relay_task, serve], dir }
}

fn name_of(e: &ClientError) -> &str {
    e.name().unwrap_or("")
}

fn data(n: usize, seed: u64) -> Bytes {
    Bytes::from(chunkstore::testing::pseudo_random(n, seed))
}

async fn commit(c: &mut VolumeClient, volume: &str, path: &str, bytes: Bytes) -> pb::CommitResponse {
    let head = c.head(ORG, volume).await.unwrap();
    let file = FileUpload { path: path.into(), data: bytes, mode: 0o644, mtime_ns: 0 };
    c.commit_files(ORG, volume, &head.commit, vec![file], &[]).await.unwrap()
}

#[tokio::test]
async fn a_guest_commits_and_reads_its_volume_through_the_gateway() {
    let mut s = setup().await;
    let small = data(10_000, 11);
    let big = data(9 << 20, 13);
    commit(&mut s.guest, "a", "small.txt", small.clone()).await;
    let resp = commit(&mut s.guest, "a", "big.bin", big.clone()).await;
    assert!(!resp.commit.is_empty());
    // The host sees the guest's commit.
    let mut host = VolumeClient::connect_with_key(&s.volumed.endpoint(), Some(s.volumed.operator_key())).await.unwrap();
    assert_eq!(host.read_file(ORG, "a", "big.bin").await.unwrap(), big.to_vec());
    assert_eq!(host.head(ORG, "a").await.unwrap().commit, resp.commit);
    // The guest reads back through the gateway: whole chunks, and ranges of big ones.
    assert_eq!(s.guest.read_file(ORG, "a", "small.txt").await.unwrap(), small.to_vec());
    assert_eq!(s.guest.read_file(ORG, "a", "big.bin").await.unwrap(), big.to_vec());
    let entry = host.grpc().stat(pb::StatRequest { volume: vref("a"), commit: String::new(), path: "big.bin".into() }).await;
    let entry = entry.unwrap().into_inner().entry.unwrap();
    let chunks: Vec<(ChunkId, u64)> = match entry.kind {
        Some(pb::entry::Kind::File(f)) => {
            f.chunks.iter().map(|c| (ChunkId::from_slice(&c.id).unwrap(), u64::from(c.len))).collect()
        }
        other => panic!("not a file: {other:?}"),
    };
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.0).collect();
    let urls = s.guest.chunk_urls(ORG, "a", &ids).await.unwrap();
    for u in &urls {
        assert!(u.url.starts_with(&s.guest_endpoint), "{} is not a gateway URL", u.url);
        assert!(u.headers.is_empty());
    }
    // Ranges (how the helper reads big chunks piece by piece).
    let (id, len) = chunks[0];
    let resp = reqwest::Client::new().get(&urls[0].url).header("range", "bytes=100-1099").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.headers()["content-range"].to_str().unwrap(), format!("bytes 100-1099/{len}"));
    let start = big.len() - usize::try_from(chunks.iter().map(|c| c.1).sum::<u64>()).unwrap();
    assert_eq!(start, 0);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), big[100..1100].to_vec(), "chunk {id}");
    let resp = reqwest::Client::new().get(&urls[0].url).header("range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 416);
    // A trusted client (the guest's helper) reads a first range by itself; an untrusted one
    // refuses to take unverified bytes.
    let trusted = VolumeClient::connect(&s.guest_endpoint).await.unwrap().trusting_endpoint();
    let got = trusted.fetch_trusted_range(&urls[0], id, 100, 1000).await.unwrap();
    assert_eq!(got.to_vec(), big[100..1100].to_vec());
    assert!(matches!(s.guest.fetch_trusted_range(&urls[0], id, 100, 1000).await, Err(ClientError::Protocol(_))));
    // Uploaded chunks went into the host cache: reading them fetched nothing from the backend.
    assert_eq!(s.gateway.cache_stats().fetches, 0, "{:?}", s.gateway.cache_stats());
    drop(s.dir);
}

/// The authors of a volume's commits, newest first, as the host reads them from volumed.
async fn log_authors(c: &mut VolumeClient, volume: &str) -> Vec<String> {
    let log = c.grpc().log(pb::LogRequest { volume: vref(volume), limit: 0, before_seq: 0 }).await.unwrap().into_inner();
    log.commits.into_iter().map(|c| c.author).collect()
}

#[tokio::test]
async fn a_guest_commit_is_logged_as_its_sailbox_whatever_author_it_claims() {
    let s = setup().await;
    let mut host = VolumeClient::connect_with_key(&s.volumed.endpoint(), Some(s.volumed.operator_key()))
        .await
        .unwrap()
        .with_author("operator");
    commit(&mut host, "a", "from-host.txt", data(1000, 31)).await;
    // The guest claims to be the operator, through commit_files and in a raw request (with
    // a claim over volumed's length limit, which must not make the commit fail either).
    let mut guest = s.guest.clone().with_author("operator");
    commit(&mut guest, "a", "spoofed.txt", data(1000, 37)).await;
    let head = guest.head(ORG, "a").await.unwrap().commit;
    let req = pb::CommitRequest {
        volume: vref("a"),
        base: head,
        changes: vec![pb::Change { path: "spoofed.txt".into(), op: Some(pb::change::Op::Delete(true)) }],
        message: "raw".into(),
        author: "x".repeat(volume_model::commit::MAX_AUTHOR_BYTES + 1),
    };
    guest.grpc().commit(req).await.unwrap();
    // The host's own commit keeps the author it declared; both guest commits are the sailbox's.
    let log = log_authors(&mut host, "a").await;
    assert_eq!(log, ["sailbox/sb-1", "sailbox/sb-1", "operator", ""], "newest first");
    // The guest reading the log through its gateway sees the same.
    assert_eq!(log_authors(&mut guest, "a").await, log);
}

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: ORG.into(), name: name.into() })
}

#[tokio::test]
async fn a_guest_reaches_only_the_volumes_mounted_in_it() {
    let mut s = setup().await;
    let mut host = VolumeClient::connect_with_key(&s.volumed.endpoint(), Some(s.volumed.operator_key())).await.unwrap();
    commit(&mut host, "b", "secret.txt", data(5000, 17)).await;
    // Another volume behaves like one that does not exist, in every call that names one.
    let missing = s.guest.get_volume(ORG, "no-such-volume", false).await.unwrap_err();
    for (what, err) in [
        ("get", s.guest.get_volume(ORG, "b", false).await.unwrap_err()),
        ("mint", s.guest.get_volume(ORG, "c", true).await.unwrap_err()),
        ("head", s.guest.head(ORG, "b").await.unwrap_err()),
        ("read", s.guest.read_file(ORG, "b", "secret.txt").await.unwrap_err()),
        ("other org", s.guest.get_volume("other", "a", false).await.unwrap_err()),
    ] {
        assert_eq!(name_of(&err), "VolumeNotFoundError", "{what}: {err}");
        assert_eq!(name_of(&err), name_of(&missing));
    }
    let g = s.guest.grpc();
    let calls: Vec<(&str, tonic::Code)> = vec![
        ("list_dir", g.list_dir(pb::ListDirRequest { volume: vref("b"), ..Default::default() }).await.unwrap_err().code()),
        ("log", g.log(pb::LogRequest { volume: vref("b"), ..Default::default() }).await.unwrap_err().code()),
        ("diff", g.diff(pb::DiffRequest { volume: vref("b"), ..Default::default() }).await.unwrap_err().code()),
        ("chunk_urls", g.chunk_urls(pb::ChunkUrlsRequest { volume: vref("b"), ids: vec![] }).await.unwrap_err().code()),
        (
            "missing_chunks",
            g.missing_chunks(pb::MissingChunksRequest { volume: vref("b"), ..Default::default() }).await.unwrap_err().code(),
        ),
        ("commit", g.commit(pb::CommitRequest { volume: vref("b"), ..Default::default() }).await.unwrap_err().code()),
        ("no volume", g.get_head(pb::GetHeadRequest { volume: None }).await.unwrap_err().code()),
    ];
    for (what, code) in calls {
        assert_eq!(code, tonic::Code::NotFound, "{what}");
    }
    let deleted = g.delete_volume(pb::DeleteVolumeRequest { volume: vref("a") }).await.unwrap_err();
    assert_eq!(deleted.code(), tonic::Code::PermissionDenied);
    let listed = g.list_volumes(pb::ListVolumesRequest { org: String::new() }).await.unwrap().into_inner();
    assert_eq!(listed.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(host.get_volume(ORG, "a", false).await.is_ok(), "the volume survived the guest's delete");
}

#[tokio::test]
async fn chunk_urls_cannot_be_forged_or_replayed_elsewhere() {
    let mut s = setup().await;
    let mut host = VolumeClient::connect_with_key(&s.volumed.endpoint(), Some(s.volumed.operator_key())).await.unwrap();
    let secret = data(5000, 19);
    commit(&mut host, "b", "secret.txt", secret.clone()).await;
    let shared = data(5000, 23);
    commit(&mut s.guest, "a", "mine.txt", shared.clone()).await;
    let mine = ChunkId::of(&shared);
    let theirs = ChunkId::of(&secret);
    let url = s.guest.chunk_urls(ORG, "a", &[mine]).await.unwrap().remove(0);
    let http = reqwest_like_get(&url.url).await;
    assert_eq!(http.0, 200);
    assert_eq!(http.1, shared.to_vec());
    // Swap in another volume's chunk, or another volume name, or a later expiry.
    let forged = url.url.replace(&mine.to_hex(), &theirs.to_hex());
    assert_eq!(reqwest_like_get(&forged).await.0, 403);
    assert_eq!(reqwest_like_get(&url.url.replace("/chunks/a/", "/chunks/b/")).await.0, 403);
    let later = url.url.replace(&url.expires_unix_ms.to_string(), &(url.expires_unix_ms + 1000).to_string());
    assert_eq!(reqwest_like_get(&later).await.0, 403);
    // Asking for the other volume's chunk under this volume: volumed answers for this volume only.
    let other_chunk = s.guest.chunk_urls(ORG, "a", &[theirs]).await;
    if let Ok(urls) = other_chunk {
        // volumed still signs any known chunk for any volume (the tenancy issue scopes it);
        // the gateway then serves it only because volumed granted it.
        assert_eq!(urls.len(), 1);
    }
    // A second sailbox on the same host reading the same chunk fetches nothing new.
    let run2 = s.dir.path().join("run/sb-2");
    std::fs::create_dir_all(&run2).unwrap();
    let (endpoint2, _relay2) = relay(socket_path(&run2)).await;
    let gateway2 = Gateway::open(
        s.volumed.endpoint(),
        Some(s.volumed.operator_key().clone()),
        endpoint2.clone(),
        &s.dir.path().join("cache"),
        1 << 30,
        64 << 20,
        &s.dir.path().join("gateway.key"),
    )
    .unwrap();
    let _serve2 = gateway2.bind(&socket_path(&run2), scope("sb-2", &["a"])).unwrap();
    // URLs are bound to the sailbox they were granted to.
    let replayed = url.url.replace(&s.guest_endpoint, &endpoint2);
    assert_eq!(reqwest_like_get(&replayed).await.0, 403);
    let mut guest2 = VolumeClient::connect(&endpoint2).await.unwrap();
    let before = gateway2.cache_stats().fetches;
    assert_eq!(guest2.read_file(ORG, "a", "mine.txt").await.unwrap(), shared.to_vec());
    assert_eq!(gateway2.cache_stats().fetches, before, "served from the host cache");
}

/// A plain HTTP GET: status and body.
async fn reqwest_like_get(url: &str) -> (u16, Vec<u8>) {
    let resp = reqwest::Client::new().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn reads_fail_in_bounded_time_while_volumed_is_down_and_work_when_it_is_back() {
    let mut s = setup().await;
    let bytes = data(3000, 29);
    commit(&mut s.guest, "a", "f.txt", bytes.clone()).await;
    let addr = s.volumed.addr;
    let volumed = std::mem::replace(&mut s.volumed, spare_server(&s.dir).await);
    volumed.stop().await.unwrap();
    let started = std::time::Instant::now();
    let e = s.guest.head(ORG, "a").await.unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}: {e}", started.elapsed());
    // volumed back on the same address and data: the same client reads again.
    let config = volumed::server::ServerConfig::local(s.dir.path().join("volumed"), addr);
    s.volumed = volumed::server::Server::bind(config).await.unwrap().spawn();
    assert_eq!(s.guest.read_file(ORG, "a", "f.txt").await.unwrap(), bytes.to_vec());
}

/// Another volumed (its own data) to hold in `Setup` while the real one is down.
async fn spare_server(dir: &tempfile::TempDir) -> volumed::server::RunningServer {
    let config = volumed::server::ServerConfig::local(dir.path().join("spare"), "127.0.0.1:0".parse().unwrap());
    volumed::server::Server::bind(config).await.unwrap().spawn()
}

/// A large chunk nowhere on the host yet (committed by the host straight to volumed): a
/// guest's range request for one of its pieces is answered (the gateway's cold-piece path:
/// the piece by range from the backend, verified against volumed's piece CVs, while the whole
/// chunk fills the host cache in the background), and the chunk is fetched from the backend
/// once in all.
#[tokio::test]
async fn a_cold_large_chunk_serves_its_first_piece_before_the_whole_chunk() {
    use chunkstore::pieces::{PIECE_SIZE, PIECED_MIN};
    let mut s = setup().await;
    let mut host = VolumeClient::connect_with_key(&s.volumed.endpoint(), Some(s.volumed.operator_key())).await.unwrap();
    let bytes = data(usize::try_from(PIECED_MIN).unwrap() + 12_345, 21);
    let id = ChunkId::of(&bytes);
    host.upload_chunks(ORG, "a", &std::collections::HashMap::from([(id, bytes.clone())])).await.unwrap();
    let len = bytes.len() as u64;
    let entry = pb::Entry {
        mode: 0o644,
        mtime_ns: 0,
        kind: Some(pb::entry::Kind::File(pb::FileEntry {
            size: len,
            policy: Some(pb::ChunkPolicy { kind: Some(pb::chunk_policy::Kind::FixedSize(64 << 20)) }),
            chunks: vec![pb::ChunkRef { id: id.as_bytes().to_vec(), len: u32::try_from(len).unwrap() }],
        })),
    };
    let base = host.head(ORG, "a").await.unwrap().commit;
    let change = pb::Change { path: "cold.bin".into(), op: Some(pb::change::Op::Upsert(entry)) };
    let req = pb::CommitRequest { volume: vref("a"), base, changes: vec![change], ..Default::default() };
    host.grpc().commit(req).await.unwrap();
    assert_eq!(s.gateway.cache_stats().fetches, 0);

    let url = s.guest.chunk_urls(ORG, "a", &[id]).await.unwrap().remove(0);
    assert!(!url.piece_cvs.is_empty(), "volumed registered the chunk's piece CVs");
    // Piece 1, by range, as the helper asks for it: the right bytes and the chunk's length.
    let resp = reqwest::Client::new()
        .get(&url.url)
        .header("range", format!("bytes={}-{}", PIECE_SIZE, 2 * PIECE_SIZE - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.headers()["content-range"].to_str().unwrap(), format!("bytes {}-{}/{len}", PIECE_SIZE, 2 * PIECE_SIZE - 1));
    let piece = resp.bytes().await.unwrap();
    assert_eq!(piece, bytes.slice(PIECE_SIZE as usize..2 * PIECE_SIZE as usize));
    // The last (short) piece through the client's own verified path.
    let last = chunkstore::pieces::piece_count(len) - 1;
    let got = s.guest.fetch_piece(&url, id, len, last).await.unwrap();
    assert_eq!(got, bytes.slice(last * PIECE_SIZE as usize..));
    // The whole chunk filled the host cache once; the whole file reads back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.gateway.cache_stats().fetches == 0 {
        assert!(std::time::Instant::now() < deadline, "the chunk was never filled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(s.guest.read_file(ORG, "a", "cold.bin").await.unwrap(), bytes.to_vec());
    assert_eq!(s.gateway.cache_stats().fetches, 1, "one backend fetch of the whole chunk");
}

/// A guest that opens uploads and stalls them holds a slot only until its body is due: the
/// stalled uploads get 408 (or 503 while every slot was taken), and a commit from the same
/// sailbox still goes through (its upload waits for a slot or retries a 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_guest_uploads_are_cut_off_and_a_commit_still_goes_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = setup_with(|g| {
        g.set_upload_limits(vmm_host::gateway::UploadLimits {
            slots: 2,
            queue_wait: std::time::Duration::from_secs(1),
            grace: std::time::Duration::from_secs(1),
            min_rate: 1 << 30,
        })
    })
    .await;
    let host = s.guest_endpoint.strip_prefix("http://").unwrap().to_owned();
    let guest = &mut s.guest;
    let mut stalled = Vec::new();
    for seed in 0..6 {
        let d = data(100_000, 500 + seed);
        let spec = pb::ChunkSpec { id: ChunkId::of(&d).as_bytes().to_vec(), len: d.len() as u64, piece_cvs: vec![] };
        let req = pb::MissingChunksRequest { volume: vref("a"), chunks: vec![spec], accept_batches: false };
        let up = guest.grpc().missing_chunks(req).await.unwrap().into_inner().uploads.remove(0);
        let path = &up.url[up.url.find("/v1/").unwrap()..];
        let mut tcp = tokio::net::TcpStream::connect(&host).await.unwrap();
        let head = format!("PUT {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 100000\r\n\r\npartial");
        tcp.write_all(head.as_bytes()).await.unwrap();
        stalled.push(tcp);
    }
    let work = commit(guest, "a", "after-stalls.bin", data(300_000, 77));
    let done = tokio::time::timeout(std::time::Duration::from_secs(60), work).await;
    assert!(!done.expect("a commit goes through while uploads stall").commit.is_empty());
    for mut tcp in stalled {
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut buf)).await.unwrap().unwrap();
        let status = String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).map(str::to_owned);
        assert!(matches!(status.as_deref(), Some("408" | "503")), "{:?}", String::from_utf8_lossy(&buf[..n]));
    }
}
